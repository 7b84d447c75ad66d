/*
 * Number printers on COM1: lowercase hexadecimal with a fixed number of digits, and
 * unsigned decimal without leading zeros.  64-bit values travel as EDX:EAX in every
 * mode so the same arithmetic (two 32-bit divisions per digit) works in real mode too.
 */
#include "bits.h"

    .text
    CODE_MODE

/* Print the low nibble of AL as one hex digit. */
hex_digit:
    push WAX
    and $0x0f, %al
    cmp $10, %al
    jb 1f
    add $'a' - '0' - 10, %al
1:  add $'0', %al
    call FN(putc)
    pop WAX
    ret

/* EAX as 8 hex digits. */
    .globl FN(put_hex32)
FN(put_hex32):
    push WCX
    push WDX
    mov %eax, %edx
    mov $8, %ecx
1:  rol $4, %edx
    push WAX
    mov %dl, %al
    call hex_digit
    pop WAX
    dec %ecx
    jnz 1b
    pop WDX
    pop WCX
    ret

/* AL as 2 hex digits. */
    .globl FN(put_hex8)
FN(put_hex8):
    push WAX
    push WCX
    mov %al, %cl
    shr $4, %al
    call hex_digit
    mov %cl, %al
    call hex_digit
    pop WCX
    pop WAX
    ret

/* EDX:EAX as 16 hex digits. */
    .globl FN(put_hex64)
FN(put_hex64):
    push WAX
    mov %edx, %eax
    call FN(put_hex32)
    pop WAX
    call FN(put_hex32)
    ret

#if BITS == 64
/* RAX as 16 hex digits. */
    .globl put_hex_rax_64
put_hex_rax_64:
    push %rax
    push %rdx
    mov %rax, %rdx
    shr $32, %rdx
    call put_hex64_64
    pop %rdx
    pop %rax
    ret
#endif

/* EAX in decimal. */
    .globl FN(put_dec32)
FN(put_dec32):
    push WDX
    xor %edx, %edx
    call FN(put_dec64)
    pop WDX
    ret

/* EDX:EAX in decimal. */
    .globl FN(put_dec64)
FN(put_dec64):
    push WAX
    push WBX
    push WCX
    push WDX
    push WSI
    push WDI
    mov $10, %ebx
    xor %ecx, %ecx                  /* digits pushed */
1:  mov %eax, %esi                  /* low half */
    mov %edx, %eax
    xor %edx, %edx
    div %ebx                        /* high half / 10 */
    mov %eax, %edi                  /* high quotient */
    mov %esi, %eax
    div %ebx                        /* (remainder:low) / 10 */
    push WDX                        /* the digit */
    inc %ecx
    mov %edi, %edx
    mov %eax, %esi
    or %edx, %esi
    jnz 1b
2:  pop WAX
    add $'0', %al
    call FN(putc)
    dec %ecx
    jnz 2b
    pop WDI
    pop WSI
    pop WDX
    pop WCX
    pop WBX
    pop WAX
    ret

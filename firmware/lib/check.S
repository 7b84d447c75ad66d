/*
 * Self-test reporting for the CPU test guests: one line "PASS <name>" or
 * "FAIL <name> <details>" per check, then "ALL PASS" or "FAILED <count>".
 * Values are word-sized (32 bits in pm32, 64 bits in long mode).
 */
#include "bits.h"

    .text
    CODE_MODE

#if BITS == 64
#define PUT_HEXW put_hex_rax_64
#else
#define PUT_HEXW FN(put_hex32)
#endif

put_pass:
    push WSI
    push WSI
    mov $str_pass, %esi
    call FN(puts)
    pop WSI
    call FN(puts)
    call FN(put_crlf)
    pop WSI
    ret

put_fail_name:
    push WSI
    push WSI
    mov $str_fail, %esi
    call FN(puts)
    pop WSI
    call FN(puts)
    incl MEM(FN(check_failures))
    pop WSI
    ret

/* WSI = name, WAX = value got, WDX = value wanted. */
    .globl FN(check_eq)
FN(check_eq):
    cmp WDX, WAX
    jne 1f
    jmp put_pass
1:  push WSI
    push WAX
    call put_fail_name
    mov $str_got, %esi
    call FN(puts)
    call PUT_HEXW
    mov $str_want, %esi
    call FN(puts)
    mov WDX, WAX
    call PUT_HEXW
    call FN(put_crlf)
    pop WAX
    pop WSI
    ret

/* WSI = name, WAX = value, passes when WBX <= value < WDX (unsigned). */
    .globl FN(check_range)
FN(check_range):
    cmp WBX, WAX
    jb 1f
    cmp WDX, WAX
    jae 1f
    jmp put_pass
1:  push WSI
    push WAX
    call put_fail_name
    mov $str_value, %esi
    call FN(puts)
    call PUT_HEXW
    mov $str_range, %esi
    call FN(puts)
    mov WBX, WAX
    call PUT_HEXW
    mov $',', %al
    call FN(putc)
    mov WDX, WAX
    call PUT_HEXW
    mov $')', %al
    call FN(putc)
    call FN(put_crlf)
    pop WAX
    pop WSI
    ret

/* Print the verdict; returns EAX = 0 when every check passed, 1 otherwise. */
    .globl FN(check_summary)
FN(check_summary):
    push WSI
    mov MEM(FN(check_failures)), %eax
    test %eax, %eax
    jnz 1f
    mov $str_all_pass, %esi
    call FN(puts)
    pop WSI
    ret
1:  mov $str_failed, %esi
    call FN(puts)
    call FN(put_dec32)
    call FN(put_crlf)
    mov $1, %eax
    pop WSI
    ret

    .data
    .balign 4
    .globl FN(check_failures)
FN(check_failures):
    .long 0

    .section .rodata
str_pass:       .asciz "PASS "
str_fail:       .asciz "FAIL "
str_got:        .asciz " got="
str_want:       .asciz " want="
str_value:      .asciz " value="
str_range:      .asciz " range=["
str_all_pass:   .asciz "ALL PASS\r\n"
str_failed:     .asciz "FAILED "

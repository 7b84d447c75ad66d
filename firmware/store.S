/*
 * store.elf: a memory-store loop for dirty-page tracking.  Fills the 16 MiB buffer at
 * physical 16 MiB (run with -m 64M) "passes=N" times (default 10).  Pass p (0-based)
 * uses salt = (p + 1) * 0x01000193:
 *   rep=0 (default): a loop of 32-bit mov stores, each 16-byte block at address A gets
 *                    A + salt in all four dwords;
 *   rep=1:           rep stosd of salt over the whole buffer.
 * Then it folds the buffer, dword by dword in address order, into a 32-bit sum:
 * sum = 0x811c9dc5; sum = rol32((sum ^ dword) * 0x01000193 mod 2^32, 15).
 * Prints "store passes=<N> bytes=<N * 16777216> sum=<8 hex digits>\r\n", exit 0.
 * With "progress=1" it also prints "pass <p>\r\n" after each pass, so that the guest
 * writes to its serial port all along (migration and replication tests).
 */
#define BUF_START   0x01000000
#define BUF_SIZE    0x01000000
#define SALT_STEP   0x01000193

    .text
    .code32
    .globl main
main:
    mov $key_passes, %esi
    call cmdline_uint
    jnc 1f
    mov $10, %eax
1:  mov %eax, passes
    mov $key_rep, %esi
    xor %eax, %eax
    call cmdline_uint
    jnc 2f
    xor %eax, %eax
2:  mov %eax, use_rep
    mov $key_progress, %esi
    call cmdline_uint
    jnc 8f
    xor %eax, %eax
8:  mov %eax, progress

    xor %esi, %esi                  /* pass number */
3:  cmp passes, %esi
    jae 6f
    lea 1(%esi), %ebp
    imul $SALT_STEP, %ebp, %ebp     /* salt */
    cmpl $0, use_rep
    jne 5f
    mov $BUF_START, %edi
    mov $BUF_START + BUF_SIZE, %edx
    .balign 16
4:  lea (%edi,%ebp), %eax           /* 8 instructions per 16 bytes */
    mov %eax, (%edi)
    mov %eax, 4(%edi)
    mov %eax, 8(%edi)
    mov %eax, 12(%edi)
    add $16, %edi
    cmp %edx, %edi
    jb 4b
    jmp 9f
5:  mov $BUF_START, %edi
    mov $BUF_SIZE / 4, %ecx
    mov %ebp, %eax
    cld
    rep stosl
9:  inc %esi
    cmpl $0, progress
    je 3b
    push %esi
    mov $str_pass, %esi
    call puts
    mov (%esp), %eax
    call put_dec32
    call put_crlf
    pop %esi
    jmp 3b

6:  mov $BUF_START, %esi
    mov $BUF_SIZE / 4, %ecx
    mov $0x811c9dc5, %ebx
7:  xor (%esi), %ebx
    imul $SALT_STEP, %ebx, %ebx
    rol $15, %ebx
    add $4, %esi
    dec %ecx
    jnz 7b

    mov $str_passes, %esi
    call puts
    mov passes, %eax
    call put_dec32
    mov $str_bytes, %esi
    call puts
    mov passes, %edx                /* passes * 2^24 as EDX:EAX */
    mov %edx, %eax
    shr $8, %edx
    shl $24, %eax
    call put_dec64
    mov $str_sum, %esi
    call puts
    mov %ebx, %eax
    call put_hex32
    call put_crlf
    xor %eax, %eax
    ret

    .section .rodata
key_passes: .asciz "passes="
key_rep:    .asciz "rep="
key_progress: .asciz "progress="
str_pass:   .asciz "pass "
str_passes: .asciz "store passes="
str_bytes:  .asciz " bytes="
str_sum:    .asciz " sum="

    .bss
    .balign 4
passes:     .skip 4
use_rep:    .skip 4
progress:   .skip 4

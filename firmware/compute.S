/*
 * compute.elf: an integer loop for speed measurements.  "n=N" iterations (default
 * 10000000) of a 32-bit xorshift (13, 17, 5) whose states are summed; the loop body is
 * exactly 12 instructions (see COMPUTE_INSNS_PER_ITER in README.md).  Prints
 * "compute n=<N> result=<sum as 8 hex digits>\r\n" and exits with 0.
 */
#define SEED 0x12345678

    .text
    .code32
    .globl main
main:
    mov $key_n, %esi
    call cmdline_uint
    jnc 1f
    mov $10000000, %eax
1:  mov %eax, %ecx
    mov $str_n, %esi
    call puts
    call put_dec32
    mov $SEED, %eax
    xor %ebx, %ebx
    test %ecx, %ecx
    jz 3f
    .balign 16
2:  mov %eax, %edx                  /* 12 instructions per iteration */
    shl $13, %edx
    xor %edx, %eax
    mov %eax, %edx
    shr $17, %edx
    xor %edx, %eax
    mov %eax, %edx
    shl $5, %edx
    xor %edx, %eax
    add %eax, %ebx
    dec %ecx
    jnz 2b
3:  mov $str_result, %esi
    call puts
    mov %ebx, %eax
    call put_hex32
    call put_crlf
    xor %eax, %eax
    ret

    .section .rodata
key_n:      .asciz "n="
str_n:      .asciz "compute n="
str_result: .asciz " result="

/*
 * portio.elf: port-I/O exits for speed measurements.  "n=N" (default 1000000) writes to
 * port 0x80 (the POST / I/O-delay port every PC has), one OUT per iteration, then prints
 * "portio n=<N>\r\n" and exits with 0.
 */
    .text
    .code32
    .globl main
main:
    mov $key_n, %esi
    call cmdline_uint
    jnc 1f
    mov $1000000, %eax
1:  mov %eax, %ecx
    test %ecx, %ecx
    jz 3f
    xor %eax, %eax
    .balign 16
2:  out %al, $0x80
    dec %ecx
    jnz 2b
3:  mov $str_n, %esi
    call puts
    mov $key_n, %esi
    call cmdline_uint
    jnc 4f
    mov $1000000, %eax
4:  call put_dec32
    call put_crlf
    xor %eax, %eax
    ret

    .section .rodata
key_n:  .asciz "n="
str_n:  .asciz "portio n="

/*
 * serialout.elf: serial output throughput.  Sends "bytes=N" (default 1000000) bytes on
 * COM1, polling LSR.THRE before each byte as a simple driver does, in lines of 64
 * characters ("0123...\r\n"), then exits with 0.  Nothing else is printed, so the output
 * is exactly N bytes.
 */
    .text
    .code32
    .globl main
main:
    mov $key_bytes, %esi
    call cmdline_uint
    jnc 1f
    mov $1000000, %eax
1:  mov %eax, %ecx
    xor %ebx, %ebx                   /* position in the line */
    test %ecx, %ecx
    jz 4f
2:  mov $0x3fd, %dx
3:  in %dx, %al
    test $0x20, %al
    jz 3b
    mov line(%ebx), %al
    mov $0x3f8, %dx
    out %al, %dx
    inc %ebx
    cmp $64, %ebx
    jne 5f
    xor %ebx, %ebx
5:  dec %ecx
    jnz 2b
4:  xor %eax, %eax
    ret

    .section .rodata
key_bytes: .asciz "bytes="
line:      .ascii "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ\r\n"

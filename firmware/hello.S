/* hello.elf: prints one line on COM1 and exits with 0 through isa-debug-exit. */
    .text
    .code32
    .globl main
main:
    mov $greeting, %esi
    call puts
    xor %eax, %eax
    ret

    .section .rodata
greeting:
    .asciz "Hello from emu-colo!\r\n"

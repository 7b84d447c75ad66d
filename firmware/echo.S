/*
 * echo.elf: interrupt-driven serial echo.  Prints "echo ready\r\n", then echoes every
 * byte received on COM1 (CR as CR LF) while idling with sti;hlt.  'q' is not echoed:
 * it prints "bye\r\n" and exits with 0.
 */
    .text
    .code32
    .globl main
main:
    call interrupts_init
    call serial_rx_init
    mov $str_ready, %esi
    call puts
1:  call serial_rx_wait
    cmp $'q', %al
    je 2f
    call putc
    cmp $'\r', %al
    jne 1b
    mov $'\n', %al
    call putc
    jmp 1b
2:  mov $str_bye, %esi
    call puts
    xor %eax, %eax
    ret

    .section .rodata
str_ready:  .asciz "echo ready\r\n"
str_bye:    .asciz "bye\r\n"

/*
 * COM1 output by polling: uart_init, putc, puts, put_crlf.
 * Calling convention of the whole library: arguments in registers as documented,
 * every register other than the documented result is preserved (flags are not).
 */
#include "bits.h"
#include "defs.h"

    .text
    CODE_MODE

/* 115200 8N1, FIFOs enabled and cleared, interrupts off, DTR|RTS. */
    .globl FN(uart_init)
FN(uart_init):
    push WAX
    push WDX
    mov $COM1 + UART_IER, %dx
    xor %al, %al
    out %al, %dx
    mov $COM1 + UART_LCR, %dx
    mov $0x80, %al                  /* DLAB=1: divisor latch */
    out %al, %dx
    mov $COM1 + 0, %dx
    mov $1, %al                     /* DLL: 115200 baud */
    out %al, %dx
    mov $COM1 + 1, %dx
    xor %al, %al                    /* DLM */
    out %al, %dx
    mov $COM1 + UART_LCR, %dx
    mov $0x03, %al                  /* 8 data bits, no parity, 1 stop, DLAB=0 */
    out %al, %dx
    mov $COM1 + UART_FCR, %dx
    mov $0x07, %al                  /* enable FIFOs, clear RX and TX */
    out %al, %dx
    mov $COM1 + UART_MCR, %dx
    mov $UART_MCR_DTR | UART_MCR_RTS, %al
    out %al, %dx
    pop WDX
    pop WAX
    ret

/* Send AL once the transmit holding register is empty (LSR.THRE). */
    .globl FN(putc)
FN(putc):
    push WDX
    push WAX
    mov $COM1 + UART_LSR, %dx
1:  in %dx, %al
    test $UART_LSR_THRE, %al
    jz 1b
    pop WAX
    mov $COM1 + UART_THR, %dx
    out %al, %dx
    pop WDX
    ret

/* Send the NUL-terminated string at WSI. */
    .globl FN(puts)
FN(puts):
    push WSI
    push WAX
1:  mov (WSI), %al
    test %al, %al
    jz 2f
    call FN(putc)
    inc WSI
    jmp 1b
2:  pop WAX
    pop WSI
    ret

    .globl FN(put_crlf)
FN(put_crlf):
    push WAX
    mov $'\r', %al
    call FN(putc)
    mov $'\n', %al
    call FN(putc)
    pop WAX
    ret

/*
 * Interrupt-driven COM1 receive for the 32-bit guests.
 *
 * The IRQ4 handler drains the UART (until LSR.DR clears) into a ring buffer, so bytes
 * that arrive while the guest is busy printing are kept; the reader sleeps with
 * sti;hlt while the ring is empty.  Requires idt32_init, lapic_virtual_wire and
 * pic_init to have run.
 */
#include "defs.h"

#define RX_RING_SIZE    4096        /* a power of two */

    .text
    .code32

/* Install the IRQ4 handler, enable the UART's received-data interrupt and IRQ4. */
    .globl serial_rx_init
serial_rx_init:
    push %eax
    push %ecx
    push %edx
    mov $IRQ_BASE + COM1_IRQ, %eax
    mov $com1_irq_handler, %edx
    mov $0x8e, %cl
    call idt32_set
    mov $COM1 + UART_IER, %dx
    mov $UART_IER_RDA, %al
    out %al, %dx
    mov $COM1 + UART_MCR, %dx
    mov $UART_MCR_DTR | UART_MCR_RTS | UART_MCR_OUT2, %al
    out %al, %dx
    mov $COM1_IRQ, %al
    call pic_unmask
    pop %edx
    pop %ecx
    pop %eax
    ret

com1_irq_handler:
    push %eax
    push %ecx
    push %edx
1:  mov $COM1 + UART_LSR, %dx
    in %dx, %al
    test $UART_LSR_DR, %al
    jz 3f
    mov $COM1 + UART_RBR, %dx
    in %dx, %al
    mov rx_head, %ecx
    lea 1(%ecx), %edx
    and $RX_RING_SIZE - 1, %edx
    cmp rx_tail, %edx
    je 2f                           /* full: the byte is dropped and counted */
    mov %al, rx_ring(%ecx)
    mov %edx, rx_head
    jmp 1b
2:  incl rx_dropped
    jmp 1b
3:  mov $PIC_EOI, %al
    out %al, $PIC1_CMD
    pop %edx
    pop %ecx
    pop %eax
    iret

/* Return the next received byte in AL, sleeping (sti;hlt) until there is one. Leaves IF set. */
    .globl serial_rx_wait
serial_rx_wait:
    push %ecx
1:  cli
    mov rx_tail, %ecx
    cmp rx_head, %ecx
    jne 2f
    sti
    hlt
    jmp 1b
2:  mov rx_ring(%ecx), %al
    inc %ecx
    and $RX_RING_SIZE - 1, %ecx
    mov %ecx, rx_tail
    sti
    pop %ecx
    ret

    .bss
    .balign 4
rx_head:    .skip 4                 /* written by the handler */
rx_tail:    .skip 4                 /* written by the reader */
    .globl rx_dropped
rx_dropped: .skip 4
rx_ring:    .skip RX_RING_SIZE

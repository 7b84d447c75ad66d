/*
 * Common start-up of the interrupt-using 32-bit guests: IDT, local APIC in virtual
 * wire mode, 8259A remapped to IRQ_BASE with every line masked.
 */
#include "defs.h"

    .text
    .code32
    .globl interrupts_init
interrupts_init:
    push %eax
    call idt32_init
    call lapic_virtual_wire
    mov $(IRQ_BASE + 8) << 8 | IRQ_BASE, %eax
    call pic_init
    pop %eax
    ret

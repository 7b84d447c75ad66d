/*
 * delivery.elf: faults raised while an event is being delivered (32-bit protected mode).
 *
 * SDM vol. 3, 6.15 "Exception and interrupt reference" (interrupt 8) and table 6-5: only
 * an exception can be the first half of a double fault.  A fault while delivering an
 * external interrupt or INT n is delivered on its own, whatever the event's vector number,
 * as QEMU's check_exception does:
 *   int8     INT 8 through a not-present gate: #NP(8*8+2), not a triple fault, with EIP on
 *            the INT instruction;
 *   irq8     the PIT's IRQ0 with the 8259A at its BIOS base 0x08 (vector 8), gate not
 *            present: #NP(8*8+2, EXT not compared), EIP after the interrupted HLT;
 *   df       a #GP whose gate is not present: #NP while delivering #GP is a double fault,
 *            #DF with error code 0.
 * Output: "PASS <name>" / "FAIL <name> ..." lines, "ALL PASS" and exit 0, or "FAILED <n>"
 * and exit 1; an unexpected exception prints "FATAL ..." and exits 3.
 */
#include "defs.h"

#define GATE_INT32      0x8e        /* present, DPL0, 32-bit interrupt gate */
#define GATE_ABSENT     0x0e        /* the same, not present */

#define CHECK_BITS 32
#include "check_macro.h"

    .macro CHECK_LOG n, vector, err, eip, name, err_mask=-1  /* log entry n: vector, error code, EIP */
    mov log_count, %eax
    mov $\n + 1, %edx
    CHECK \name\().count
    mov log_vector + (\n) * 4, %eax
    mov $\vector, %edx
    CHECK \name\().vector
    mov log_err + (\n) * 4, %eax
    and $\err_mask, %eax
    mov $\err, %edx
    CHECK \name\().error_code
    mov log_eip + (\n) * 4, %eax
    mov $\eip, %edx
    CHECK \name\().eip
    .endm

    .macro GATE vector, handler, type
    mov $\vector, %eax
    mov $\handler, %edx
    mov $\type, %cl
    call idt32_set
    .endm

    .text
    .code32
    .globl main
main:
    call idt32_init
    call lapic_virtual_wire
    mov $0x7008, %eax               /* the BIOS's bases: IRQ0 is vector 8 */
    call pic_init
    mov $str_banner, %esi
    call puts
    GATE 8, np_handler, GATE_ABSENT /* any use of gate 8 raises #NP */
    GATE 11, np_handler, GATE_INT32

    call test_int8
    call test_irq8
    call test_double_fault

    call check_summary
    ret

test_int8:
    movl $0, log_count
    movl $int8_resume, resume_eip
int8_fault:
    int $8
int8_resume:
    CHECK_LOG 0, 11, (8*8+2), int8_fault, int8.np
    ret

test_irq8:
    movl $0, log_count
    mov $PIT_DIV_1000HZ, %eax
    call pit_periodic
    xor %eax, %eax
    call pic_unmask
    sti
    hlt
irq8_after:
    cli
    call pic_mask_all
    xor %eax, %eax
    call pic_eoi                    /* the PIC took the IRQ (INTA) before the gate failed */
    /* EXT (bit 0): the SDM sets it for an external event, QEMU 7.2 does not (its
       do_interrupt_protected raises #NP with vector * 8 + 2): not compared */
    CHECK_LOG 0, 11, (8*8+2), irq8_after, irq8.np, ~1
    ret

test_double_fault:
    GATE 8, df_handler, GATE_INT32
    GATE 13, np_handler, GATE_ABSENT
    movl $0, log_count
    movl $df_resume, resume_eip
    mov $0x1008, %ax                /* beyond the GDT: #GP(0x1008) */
df_fault:
    mov %ax, %ds
df_resume:
    mov $SEL_DATA32, %ax
    mov %ax, %ds
    mov log_count, %eax
    mov $1, %edx
    CHECK df.count
    mov log_vector, %eax
    mov $8, %edx
    CHECK df.vector
    mov log_err, %eax
    xor %edx, %edx
    CHECK df.error_code
    ret

/* #NP (and any use of an absent gate): log vector 11, error code, EIP; resume_eip if set. */
np_handler:
    push %eax
    mov $11, %eax
    jmp log_and_resume
df_handler:
    push %eax
    mov $8, %eax
log_and_resume:                     /* (ESP) = EAX, 4 = error code, 8 = EIP */
    push %ebx
    mov log_count, %ebx
    and $3, %ebx
    mov %eax, log_vector(,%ebx,4)
    mov 8(%esp), %eax
    mov %eax, log_err(,%ebx,4)
    mov 12(%esp), %eax
    mov %eax, log_eip(,%ebx,4)
    incl log_count
    mov resume_eip, %eax
    test %eax, %eax
    jz 1f
    mov %eax, 12(%esp)
    movl $0, resume_eip
1:  pop %ebx
    pop %eax
    add $4, %esp
    iret

    .section .rodata
str_banner: .asciz "delivery: faults while delivering\r\n"

    .bss
    .balign 4
log_count:  .long 0
log_vector: .skip 16
log_err:    .skip 16
log_eip:    .skip 16
resume_eip: .long 0

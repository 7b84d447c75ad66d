/*
 * apicipi.elf: the local APIC's interrupt flow, driven by self IPIs (32-bit protected mode).
 *
 * With the 8259A masked and the APIC software-enabled through its page at 0xfee00000
 * (SVR), fixed IPIs to ourselves go IRR -> ISR (INTA) -> EOI; every handler logs on entry
 * its vector, the interrupted EIP and what the APIC showed for its vector (ISR, IRR, TMR
 * bits), may run an action (send another IPI with interrupts enabled), logs its exit and
 * EOIs.  SDM vol. 3 chapter 11 (10 in older editions) and QEMU's hw/intc/apic.c:
 *   once     a self IPI (shorthand self, then destination = our APIC ID) runs its handler
 *            exactly once: in service and not requested while it runs, idle after the EOI;
 *   order    two IPIs pending while IF=0 are taken highest vector first;
 *   nesting  a higher priority class interrupts a handler that enabled interrupts; the
 *            same or a lower class waits for the EOI (PPR);
 *   tpr      an IPI whose class is <= TPR's stays in IRR until TPR drops; PPR follows;
 *   sti      an IPI pending while IF=0 is taken after the instruction that follows STI;
 *            after STI; MOV SS the shadow is not extended (the first one counts);
 *   mov ss   an IPI sent just before MOV SS is taken after the instruction after it;
 *   level    a level-triggered fixed IPI sets its TMR bit, an edge one clears it;
 *   msr      IA32_APIC_BASE reads the base, enable and BSP bits; writing it back keeps it.
 *            (A reserved bit is #GP(0) by the SDM and here; QEMU 7.2 drops it: not compared.)
 * Output: "PASS <name>" / "FAIL <name> ..." lines, "ALL PASS" and exit 0, or "FAILED <n>"
 * and exit 1; an unexpected exception or interrupt prints "FATAL ..." and exits 3.
 */
#include "defs.h"

#define APIC            0xfee00000
#define APIC_ID         0x020
#define APIC_TPR        0x080
#define APIC_PPR        0x0a0
#define APIC_EOI        0x0b0
#define APIC_SVR        0x0f0
#define APIC_ISR        0x100
#define APIC_TMR        0x180
#define APIC_IRR        0x200
#define APIC_ICR_LOW    0x300
#define APIC_ICR_HIGH   0x310

#define ICR_SELF        0x40000     /* destination shorthand: self */
#define ICR_LEVEL       0xc000      /* trigger mode level, level assert */

#define SEEN_ISR        1           /* the vector's ISR bit at handler entry */
#define SEEN_IRR        2           /* its IRR bit */
#define SEEN_TMR        4           /* its TMR bit */
#define EXIT            0x100       /* log entry: the handler of (vector) is about to EOI */

#define EV_VECTOR       0
#define EV_EIP          4
#define EV_SEEN         8
#define EV_SIZE         12
#define EV_MAX          16

#define CHECK_BITS 32
#include "check_macro.h"

    .macro EVENT n, field           /* EAX = field of log entry n */
    mov ev_log + (\n) * EV_SIZE + \field, %eax
    .endm

    .macro CHECK_EVENT n, value, name  /* log entry n has vector (or EXIT | vector) value */
    EVENT \n, EV_VECTOR
    mov $\value, %edx
    CHECK \name
    .endm

    .macro CHECK_COUNT n, name
    mov ev_count, %eax
    mov $\n, %edx
    CHECK \name
    .endm

    .macro SELF_IPI vector, mode=0
    movl $ICR_SELF | \mode | \vector, APIC + APIC_ICR_LOW
    .endm

    .macro START
    movl $0, ev_count
    .endm

    .macro SPIN                     /* time for anything still pending to arrive */
    mov $1000, %ecx
9:  loop 9b
    .endm

    .text
    .code32
    .globl main
main:
    call idt32_init
    mov $(IRQ_BASE + 8) << 8 | IRQ_BASE, %eax
    call pic_init                   /* every 8259A line masked */
    call install_handlers
    movl $0x1ff, APIC + APIC_SVR    /* software enable, spurious vector 0xff */
    movl $0, APIC + APIC_TPR
    mov $str_banner, %esi
    call puts

    call test_once_self
    call test_once_physical
    call test_order
    call test_nesting
    call test_tpr
    call test_sti
    call test_sti_mov_ss
    call test_mov_ss
    call test_level
    call test_base_msr

    call check_summary
    ret

/* One self IPI (shorthand self), IF set: its handler runs once, and only once. */
test_once_self:
    START
    sti
    nop
    incl ev_count                   /* START again: the ICR write is not a block's first */
    movl $0, ev_count
    SELF_IPI 0x40
    SPIN
    cli
    CHECK_COUNT 2, once_self.events
    CHECK_EVENT 0, 0x40, once_self.vector
    EVENT 0, EV_SEEN
    mov $SEEN_ISR, %edx
    CHECK once_self.in_service_not_requested
    CHECK_EVENT 1, EXIT | 0x40, once_self.exit
    mov APIC + APIC_ISR + 0x20, %eax  /* vectors 0x40-0x5f */
    xor %edx, %edx
    CHECK once_self.isr_idle_after_eoi
    mov APIC + APIC_IRR + 0x20, %eax
    xor %edx, %edx
    CHECK once_self.irr_idle_after_eoi
    ret

/* Two IPIs to our own APIC ID (physical destination, no shorthand), one after the other. */
test_once_physical:
    START
    mov APIC + APIC_ID, %eax
    and $0xff000000, %eax
    mov %eax, APIC + APIC_ICR_HIGH
    sti
    movl $0x41, APIC + APIC_ICR_LOW
    SPIN
    movl $0x41, APIC + APIC_ICR_LOW
    SPIN
    cli
    CHECK_COUNT 4, once_physical.events
    CHECK_EVENT 0, 0x41, once_physical.first
    CHECK_EVENT 1, EXIT | 0x41, once_physical.first_exit
    CHECK_EVENT 2, 0x41, once_physical.second
    CHECK_EVENT 3, EXIT | 0x41, once_physical.second_exit
    ret

/* Pending while IF=0: both in IRR; STI takes the higher vector first. */
test_order:
    START
    SELF_IPI 0x40
    SELF_IPI 0x60
    mov APIC + APIC_IRR + 0x20, %eax
    mov $1, %edx
    CHECK order.irr_low_pending
    mov APIC + APIC_IRR + 0x30, %eax
    mov $1, %edx
    CHECK order.irr_high_pending
    sti
    nop
    SPIN
    cli
    CHECK_COUNT 4, order.events
    CHECK_EVENT 0, 0x60, order.high_first
    CHECK_EVENT 1, EXIT | 0x60, order.high_exit
    CHECK_EVENT 2, 0x40, order.low_next
    CHECK_EVENT 3, EXIT | 0x40, order.low_exit
    ret

/* A handler that enables interrupts and sends another IPI: a higher class nests, the same
   or a lower class waits for the EOI. */
test_nesting:
    START
    sti
    SELF_IPI 0x42                   /* its action sends 0x62 */
    SPIN
    cli
    CHECK_COUNT 4, nest_higher.events
    CHECK_EVENT 0, 0x42, nest_higher.outer
    CHECK_EVENT 1, 0x62, nest_higher.inner
    CHECK_EVENT 2, EXIT | 0x62, nest_higher.inner_exit
    CHECK_EVENT 3, EXIT | 0x42, nest_higher.outer_exit
    EVENT 1, EV_SEEN
    mov $SEEN_ISR, %edx
    CHECK nest_higher.inner_in_service

    START
    sti
    SELF_IPI 0x63                   /* its action sends 0x43 */
    SPIN
    cli
    CHECK_COUNT 4, nest_lower.events
    CHECK_EVENT 0, 0x63, nest_lower.first
    CHECK_EVENT 1, EXIT | 0x63, nest_lower.first_exit
    CHECK_EVENT 2, 0x43, nest_lower.waited
    CHECK_EVENT 3, EXIT | 0x43, nest_lower.waited_exit

    START
    sti
    SELF_IPI 0x44                   /* its action sends 0x45, the same class */
    SPIN
    cli
    CHECK_COUNT 4, nest_same_class.events
    CHECK_EVENT 0, 0x44, nest_same_class.first
    CHECK_EVENT 1, EXIT | 0x44, nest_same_class.first_exit
    CHECK_EVENT 2, 0x45, nest_same_class.waited
    CHECK_EVENT 3, EXIT | 0x45, nest_same_class.waited_exit
    ret

/* TPR = 0x50: class 4 waits in IRR, class 6 is taken; TPR = 0 releases class 4. */
test_tpr:
    START
    movl $0x50, APIC + APIC_TPR
    sti
    SELF_IPI 0x46
    SPIN
    mov ev_count, %eax
    xor %edx, %edx
    CHECK tpr.masked_waits
    mov APIC + APIC_IRR + 0x20, %eax
    mov $1 << 6, %edx
    CHECK tpr.masked_in_irr
    mov APIC + APIC_PPR, %eax
    mov $0x50, %edx
    CHECK tpr.ppr
    SELF_IPI 0x66
    SPIN
    CHECK_COUNT 2, tpr.above_taken
    CHECK_EVENT 0, 0x66, tpr.above_vector
    movl $0, APIC + APIC_TPR
    SPIN
    cli
    CHECK_COUNT 4, tpr.released
    CHECK_EVENT 2, 0x46, tpr.released_vector
    ret

/* Pending while IF=0, then STI: taken after the instruction that follows STI. */
test_sti:
    START
    cli
    SELF_IPI 0x47
    sti
sti_next:
    nop
sti_after:
    nop
    SPIN
    cli
    CHECK_COUNT 2, sti.events
    EVENT 0, EV_EIP
    mov $sti_after, %edx
    CHECK sti.after_one_instruction
    ret

/* STI; MOV SS: the second shadow does not extend the first (QEMU: "if several
   instructions disable interrupts, only the first does it"). */
test_sti_mov_ss:
    START
    cli
    SELF_IPI 0x48
    mov %ss, %ax
    sti
    mov %ax, %ss
stimovss_after:
    nop
    nop
    SPIN
    cli
    CHECK_COUNT 2, sti_mov_ss.events
    EVENT 0, EV_EIP
    mov $stimovss_after, %edx
    CHECK sti_mov_ss.after_mov_ss
    ret

/* IF set; the IPI is sent right before MOV SS: taken after the instruction after MOV SS. */
test_mov_ss:
    START
    mov %ss, %ax
    sti
    nop
    SELF_IPI 0x4a
    mov %ax, %ss
movss_next:
    nop
movss_after:
    nop
    SPIN
    cli
    CHECK_COUNT 2, mov_ss.events
    EVENT 0, EV_EIP
    mov $movss_after, %edx
    CHECK mov_ss.after_one_instruction
    ret

/* A level-triggered fixed IPI sets the TMR bit; an edge one (the same vector) clears it. */
test_level:
    START
    sti
    SELF_IPI 0x49, ICR_LEVEL
    SPIN
    SELF_IPI 0x49
    SPIN
    cli
    CHECK_COUNT 4, level.events
    EVENT 0, EV_SEEN
    mov $SEEN_ISR | SEEN_TMR, %edx
    CHECK level.tmr_set
    EVENT 2, EV_SEEN
    mov $SEEN_ISR, %edx
    CHECK level.edge_tmr_clear
    ret

/* IA32_APIC_BASE (MSR 0x1b): 0xfee00000 | enable (bit 11) | BSP (bit 8). */
test_base_msr:
    mov $0x1b, %ecx
    rdmsr
    push %edx
    mov $APIC | 0x900, %edx
    CHECK msr.reads_base_enable_bsp
    pop %eax
    xor %edx, %edx
    CHECK msr.reads_high_zero
    mov $0x1b, %ecx
    mov $APIC | 0x900, %eax
    xor %edx, %edx
    wrmsr
    rdmsr
    mov $APIC | 0x900, %edx
    CHECK msr.write_back_keeps
    ret

/* ------------------------------------------------------------------ handlers */

/* Log (EAX, EDX, EBX); clobbers ECX. */
log_event:
    mov ev_count, %ecx
    cmp $EV_MAX, %ecx
    jae 1f
    imul $EV_SIZE, %ecx
    mov %eax, ev_log + EV_VECTOR(%ecx)
    mov %edx, ev_log + EV_EIP(%ecx)
    mov %ebx, ev_log + EV_SEEN(%ecx)
1:  incl ev_count
    ret

/* In: EAX = vector, EDX = interrupted EIP.  Log entry, action, log exit, EOI. */
irq_common:
    push %esi
    mov %eax, %esi
    mov %eax, %ecx
    shr $5, %ecx
    shl $4, %ecx                    /* the register that holds the vector's bit */
    and $31, %eax
    xor %ebx, %ebx
    mov APIC + APIC_ISR(%ecx), %edi
    bt %eax, %edi
    jnc 1f
    or $SEEN_ISR, %ebx
1:  mov APIC + APIC_IRR(%ecx), %edi
    bt %eax, %edi
    jnc 2f
    or $SEEN_IRR, %ebx
2:  mov APIC + APIC_TMR(%ecx), %edi
    bt %eax, %edi
    jnc 3f
    or $SEEN_TMR, %ebx
3:  mov %esi, %eax
    call log_event
    mov actions(,%esi,4), %eax
    test %eax, %eax
    jz 4f
    call *%eax
4:  mov %esi, %eax
    or $EXIT, %eax
    xor %edx, %edx
    xor %ebx, %ebx
    call log_event
    movl $0, APIC + APIC_EOI
    pop %esi
    ret

    .macro IRQ_STUB v
irq_stub_\v:
    push %eax
    push %ebx
    push %ecx
    push %edx
    push %edi
    mov $\v, %eax
    mov 20(%esp), %edx
    call irq_common
    pop %edi
    pop %edx
    pop %ecx
    pop %ebx
    pop %eax
    iret
    .pushsection .rodata
    .long \v, irq_stub_\v
    .popsection
    .endm

    .section .rodata
    .balign 4
irq_stubs:
    .text
    .irp v, 0x40,0x41,0x42,0x43,0x44,0x45,0x46,0x47,0x48,0x49,0x4a,0x60,0x62,0x63,0x66
    IRQ_STUB \v
    .endr
    .section .rodata
irq_stubs_end:
    .text

install_handlers:
    mov $irq_stubs, %esi
    mov $0x8e, %cl                  /* interrupt gate */
1:  mov (%esi), %eax
    mov 4(%esi), %edx
    call idt32_set
    add $8, %esi
    cmp $irq_stubs_end, %esi
    jb 1b
    movl $action_send_62, actions + 0x42 * 4
    movl $action_send_43, actions + 0x63 * 4
    movl $action_send_45, actions + 0x44 * 4
    ret

    .macro ACTION name, vector      /* enable interrupts, send vector, give it time */
\name:
    sti
    SELF_IPI \vector
    SPIN
    cli
    ret
    .endm
    ACTION action_send_62, 0x62
    ACTION action_send_43, 0x43
    ACTION action_send_45, 0x45

    .section .rodata
str_banner: .asciz "apicipi: local APIC self IPIs\r\n"

    .bss
    .balign 4
actions:    .skip 256 * 4
ev_log:     .skip EV_SIZE * EV_MAX
ev_count:   .long 0

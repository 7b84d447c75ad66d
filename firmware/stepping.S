/*
 * stepping.elf: single-step (EFLAGS.TF) self-test in long mode.
 *
 * The 32-bit entry identity-maps the first GiB with 2 MiB user pages (plus the local APIC
 * page), enables PAE, EFER.LME/SCE and paging, and far-jumps to 64-bit code.  There a
 * #DB handler (IST1) logs every debug trap (RIP, CS, DR6) into one event log shared with
 * the other handlers, and clears TF in the interrupted RFLAGS once the test's step budget
 * is spent.  The checks follow the SDM (vol. 3, 17.3.1.4 "Single-step exception
 * condition", 6.8.3 "Masking exceptions and interrupts when switching stacks") and what
 * QEMU does:
 *   popf     the trap comes after the instruction that follows POPF, DR6.BS set;
 *   mov ss   the interrupt shadow delays the trap by one more instruction; so does POP SS
 *            (checked in 32-bit mode before long mode: 64-bit mode has no POP SS);
 *   iretq    TF loaded by IRETQ: the trap comes after the first instruction returned to;
 *   int n    the handler runs with TF clear, no trap inside it;
 *   #UD      likewise for an exception;
 *   syscall  SFMASK with TF: no trap in the kernel, and the TF that SYSRETQ loads from R11
 *            traps right after SYSRETQ (RIP = RCX); SFMASK without TF: the trap comes
 *            after SYSCALL, on the kernel's first instruction (RIP = LSTAR, CS = kernel);
 *   external an interrupt pending when POPF sets IF and TF is taken first (TF cleared in
 *            its handler), and stepping goes on after its IRETQ.
 * Then faults while an event is delivered in long mode (SDM 6.14, QEMU's do_interrupt64):
 *   stack    INT n with a non-canonical RSP: the push is #GP(0) (QEMU; the SDM says #SS),
 *            taken on an IST stack; without one the #GP's own push fails too: #DF(0);
 *   tss      a gate whose IST slot lies beyond the TSS limit: #TS(TR selector).
 * Not checked here: STI, which holds interrupts but not the trap (SDM); QEMU 7.2 holds both
 * (fixed in QEMU 9.2.4, "target/i386: do not block singlestep for STI"), so no differential
 * check can cover it.
 * Output: "PASS <name>" / "FAIL <name> ..." lines, then "ALL PASS" and exit 0, or
 * "FAILED <n>" and exit 1; an exception nobody expected prints "FATAL ..." and exits 3.
 */
#include "defs.h"
#include "long64.h"

#define SEL_KCODE64     0x08
#define SEL_KDATA       0x10
#define SEL_UCODE32     0x18        /* only there so STAR can name the sysret pair */
#define SEL_UDATA       0x20
#define SEL_UCODE64     0x28
#define SEL_TSS         0x30
#define SEL_TSS_SHORT   0x40        /* the same TSS with a limit that ends before IST1 */


#define MSR_STAR        0xc0000081
#define MSR_LSTAR       0xc0000082
#define MSR_SFMASK      0xc0000084

#define LAPIC_BASE      0xfee00000
#define LAPIC_TPR       0x080
#define LAPIC_EOI       0x0b0
#define LAPIC_SVR       0x0f0
#define LAPIC_ICR_LOW   0x300

#define RFLAGS_TF       0x100
#define RFLAGS_IF       0x200
#define DR6_BS          0x4000

#define VEC_INT         0x81        /* int n while stepping */
#define VEC_USER_EXIT   0x80        /* int 0x80: leave ring 3 */
#define VEC_IPI         0x50        /* self IPI while stepping */
#define VEC_IST_SHORT   0x84        /* an IST1 gate, used while TR is the short TSS */

/* Event log entry: what happened, where (the interrupted RIP and CS), and one more value */
#define EV_VECTOR       0
#define EV_RIP          8
#define EV_CS           16
#define EV_EXTRA        24          /* #DB: DR6; others: RFLAGS inside the handler */
#define EV_SIZE         32
#define EV_MAX          16


/* ------------------------------------------------------------------ 32-bit setup */
    .text
    .code32
    .globl main
main:
    call lapic_virtual_wire         /* software-enables the APIC (spurious vector 0xff) */
    mov $(IRQ_BASE + 8) << 8 | IRQ_BASE, %eax
    call pic_init                   /* every 8259A line masked: only our own events */
    call test_pop_ss_32             /* checked in 64-bit mode (check_pop_ss) */
    mov $pdpt, %eax
    or $PTE_P | PTE_RW | PTE_US, %eax
    mov %eax, pml4
    mov $pd0, %eax
    or $PTE_P | PTE_RW | PTE_US, %eax
    mov %eax, pdpt
    mov $pd3, %eax
    or $PTE_P | PTE_RW, %eax
    mov %eax, pdpt + 3 * 8
    xor %ecx, %ecx                  /* PD0: the first GiB in 2 MiB user pages */
1:  mov %ecx, %eax
    shl $21, %eax
    or $PTE_P | PTE_RW | PTE_US | PTE_PS, %eax
    mov %eax, pd0(,%ecx,8)
    inc %ecx
    cmp $512, %ecx
    jb 1b
    mov $LAPIC_BASE | PTE_P | PTE_RW | PTE_PWT | PTE_PCD | PTE_PS, %eax
    mov %eax, pd3 + ((LAPIC_BASE >> 21) & 511) * 8

    movl $rsp0_stack_top, tss64 + 4 /* RSP0: int 0x80 from ring 3 */
    movl $ist1_stack_top, tss64 + 36 /* IST1: #DB, whatever RSP was */
    movl $ist2_stack_top, tss64 + 44 /* IST2: #DF */
    movl $ist3_stack_top, tss64 + 52 /* IST3: #GP, in one test */
    movw $104, tss64 + 102
    TSS64_DESCRIPTOR gdt64 + SEL_TSS, tss64
    mov gdt64 + SEL_TSS, %eax       /* the short TSS: the same base, limit 0x23 */
    mov %eax, gdt64 + SEL_TSS_SHORT
    mov gdt64 + SEL_TSS + 4, %eax
    mov %eax, gdt64 + SEL_TSS_SHORT + 4
    movw $0x23, gdt64 + SEL_TSS_SHORT
    movb $0x89, gdt64 + SEL_TSS_SHORT + 5
    lgdt gdt64_desc

    ENTER_LONG_MODE 0x101, 0x80000001, pml4, SEL_KCODE64, long_entry  /* EFER LME | SCE; CR0 PG, PE */

/* POP SS (no such instruction in 64-bit mode), in 32-bit protected mode with the
   library's IDT: as MOV SS, it delays the trap by one more instruction. */
test_pop_ss_32:
    call idt32_init
    mov $1, %eax
    mov $db_handler_32, %edx
    mov $0x8e, %cl
    call idt32_set
    movl $0, ev_count
    push %ss
    pushf
    orl $RFLAGS_TF, (%esp)
    popf
    pop %ss
popss_2: nop
popss_3: nop
    ret

/* #DB in 32-bit mode: log it as db_handler does (high dwords 0), TF off in the frame. */
db_handler_32:
    push %eax
    push %ebx
    mov ev_count, %eax
    cmp $EV_MAX, %eax
    jae 1f
    shl $5, %eax
    movl $1, ev_log + EV_VECTOR(%eax)
    movl $0, ev_log + EV_VECTOR + 4(%eax)
    mov 8(%esp), %ebx
    mov %ebx, ev_log + EV_RIP(%eax)
    movl $0, ev_log + EV_RIP + 4(%eax)
    mov 12(%esp), %ebx
    mov %ebx, ev_log + EV_CS(%eax)
    movl $0, ev_log + EV_CS + 4(%eax)
    mov %dr6, %ebx
    mov %ebx, ev_log + EV_EXTRA(%eax)
    movl $0, ev_log + EV_EXTRA + 4(%eax)
1:  incl ev_count
    andl $~RFLAGS_TF, 16(%esp)
    xor %ebx, %ebx
    mov %ebx, %dr6
    pop %ebx
    pop %eax
    iret

/* ------------------------------------------------------------------ 64-bit kernel */
    .code64

#define CHECK_BITS 64
#include "check_macro.h"

    .macro EVENT n, field           /* RAX = field of event n */
    mov ev_log + (\n) * EV_SIZE + \field(%rip), %rax
    .endm

    .macro CHECK_EVENT n, vector, label, name  /* event n: vector at label (a symbol) */
    EVENT \n, EV_VECTOR
    mov $\vector, %edx
    CHECK \name\().vector
    EVENT \n, EV_RIP
    mov $\label, %edx
    CHECK \name\().rip
    .endm

    .macro CHECK_BS n, name         /* event n is a single-step trap: DR6.BS, no B0-B3 */
    EVENT \n, EV_EXTRA
    and $DR6_BS | 0xf, %eax
    mov $DR6_BS, %edx
    CHECK \name\().dr6_bs
    .endm

    .macro CHECK_COUNT n, name
    mov ev_count(%rip), %eax
    mov $\n, %edx
    CHECK \name\().events
    .endm

    .macro START budget             /* a new test: empty log, step budget */
    movl $0, ev_count(%rip)
    movl $\budget, step_budget(%rip)
    .endm

    .macro SET_TF                   /* the trap comes after the next instruction */
    pushfq
    orq $RFLAGS_TF, (%rsp)
    popfq
    .endm

long_entry:
    LONG_MODE_SEGMENTS SEL_KDATA, SEL_TSS, boot_stack_top
    call idt64_init
    mov $str_banner, %esi
    call puts_64

    call check_pop_ss
    call test_popf
    call test_mov_ss
    call test_iretq
    call test_int_n
    call test_exception
    call test_syscall_masked
    call test_syscall_unmasked
    call test_external_interrupt
    call test_noncanonical_stack
    call test_tss_limit

    call check_summary_64
    jmp debug_exit_64

/* What test_pop_ss_32 logged before long mode: one trap, after the instruction after POP SS. */
check_pop_ss:
    CHECK_COUNT 1, pop_ss
    CHECK_EVENT 0, 1, popss_3, pop_ss.after_shadow
    CHECK_BS 0, pop_ss.after_shadow
    ret

/* POPF sets TF: traps after the 1st, 2nd and 3rd instruction after it. */
test_popf:
    START 3
    SET_TF
popf_1: nop
popf_2: nop
popf_3: nop
popf_4: nop
    CHECK_COUNT 3, popf
    CHECK_EVENT 0, 1, popf_2, popf.first
    CHECK_BS 0, popf.first
    CHECK_EVENT 1, 1, popf_3, popf.second
    CHECK_EVENT 2, 1, popf_4, popf.third
    CHECK_BS 2, popf.third
    EVENT 0, EV_CS
    mov $SEL_KCODE64, %edx
    CHECK popf.first.cs
    ret

/* MOV SS: no trap after it; the one trap comes after the instruction that follows it. */
test_mov_ss:
    START 1
    mov %ss, %ax
    SET_TF
movss_1:
    mov %ax, %ss
movss_2: nop
movss_3: nop
    CHECK_COUNT 1, mov_ss
    CHECK_EVENT 0, 1, movss_3, mov_ss.after_shadow
    CHECK_BS 0, mov_ss.after_shadow
    ret

/* IRETQ loads TF: the trap comes after the instruction it returned to. */
test_iretq:
    START 1
    mov %rsp, %rax
    push $SEL_KDATA
    push %rax
    pushfq
    orq $RFLAGS_TF, (%rsp)
    push $SEL_KCODE64
    mov $iret_1, %eax
    push %rax
    iretq
iret_1: nop
iret_2: nop
    CHECK_COUNT 1, iretq
    CHECK_EVENT 0, 1, iret_2, iretq.after_first
    CHECK_BS 0, iretq.after_first
    ret

/* INT n clears TF for its handler; its IRETQ sets TF again: the next trap comes after the
   instruction that follows INT n. */
test_int_n:
    START 1
    SET_TF
int_1:
    int $VEC_INT
int_2: nop
int_3: nop
    CHECK_COUNT 2, int_n
    CHECK_EVENT 0, VEC_INT, int_2, int_n.handler
    EVENT 0, EV_EXTRA
    and $RFLAGS_TF, %eax
    xor %edx, %edx
    CHECK int_n.handler_tf_clear
    CHECK_EVENT 1, 1, int_3, int_n.after_return
    CHECK_BS 1, int_n.after_return
    ret

/* A fault while stepping: its handler runs with TF clear, the instruction it resumes at is
   stepped. */
test_exception:
    START 1
    mov $ud_resume, %eax
    mov %rax, resume_rip(%rip)
    SET_TF
ud_1:
    ud2
    nop
ud_resume:
    nop
ud_2: nop
    CHECK_COUNT 2, exception
    CHECK_EVENT 0, 6, ud_1, exception.ud
    EVENT 0, EV_EXTRA
    and $RFLAGS_TF, %eax
    xor %edx, %edx
    CHECK exception.handler_tf_clear
    CHECK_EVENT 1, 1, ud_2, exception.after_resume
    ret

/* SYSCALL from ring 3 with TF set, STAR/LSTAR as an OS sets them, SFMASK = EAX. */
setup_syscall:
    push %rax
    mov $MSR_SFMASK, %ecx
    xor %edx, %edx
    wrmsr
    mov $MSR_STAR, %ecx
    xor %eax, %eax
    mov $(SEL_UCODE32 | 3) << 16 | SEL_KCODE64, %edx
    wrmsr
    mov $MSR_LSTAR, %ecx
    mov $syscall_entry, %eax
    xor %edx, %edx
    wrmsr
    pop %rax
    ret

/* Run the ring-3 code at RAX (IF clear) until it leaves with int 0x80. */
run_user:
    mov %rsp, kernel_resume_rsp(%rip)
    push $SEL_UDATA | 3
    mov $user_stack_top, %edx
    push %rdx
    push $0x2
    push $SEL_UCODE64 | 3
    push %rax
    iretq
user_returned:
    mov kernel_resume_rsp(%rip), %rsp
    mov $SEL_KDATA, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    ret

/* SFMASK clears TF: the kernel is not stepped; SYSRETQ loads TF from R11 and traps at
   once, on the user instruction it returned to. */
test_syscall_masked:
    mov $0x700, %eax                /* TF, IF, DF */
    call setup_syscall
    START 1
    mov $user_syscall_1, %eax
    call run_user
    CHECK_COUNT 2, syscall_masked
    CHECK_EVENT 0, 0x5c, user_syscall_1_after, syscall_masked.kernel
    EVENT 0, EV_EXTRA
    and $RFLAGS_TF, %eax
    xor %edx, %edx
    CHECK syscall_masked.kernel_tf_clear
    CHECK_EVENT 1, 1, user_syscall_1_after, syscall_masked.after_sysret
    CHECK_BS 1, syscall_masked.after_sysret
    EVENT 1, EV_CS
    mov $SEL_UCODE64 | 3, %edx
    CHECK syscall_masked.after_sysret.cs
    ret

/* SFMASK keeps TF: the trap comes after SYSCALL, on the kernel's first instruction; the
   #DB handler clears TF there, and SYSRETQ (R11 has TF) traps again in ring 3. */
test_syscall_unmasked:
    mov $0x600, %eax                /* IF, DF */
    call setup_syscall
    START 1
    mov $user_syscall_2, %eax
    call run_user
    CHECK_COUNT 3, syscall_unmasked
    CHECK_EVENT 0, 1, syscall_entry, syscall_unmasked.kernel_entry
    CHECK_BS 0, syscall_unmasked.kernel_entry
    EVENT 0, EV_CS
    mov $SEL_KCODE64, %edx
    CHECK syscall_unmasked.kernel_entry.cs
    CHECK_EVENT 1, 0x5c, user_syscall_2_after, syscall_unmasked.kernel
    CHECK_EVENT 2, 1, user_syscall_2_after, syscall_unmasked.after_sysret
    ret

/* A self IPI pending while IF is clear; POPF sets IF and TF together.  The interrupt is
   taken before the next instruction (its handler runs with TF clear), then the
   instructions after POPF are stepped. */
test_external_interrupt:
    START 2
    cli
    mov $LAPIC_BASE, %ebx
    movl $0x1ff, LAPIC_SVR(%rbx)    /* enabled, spurious vector 0xff (lapic_virtual_wire
                                       finds the page through IA32_APIC_BASE) */
    movl $0, LAPIC_TPR(%rbx)
    movl $0x40000 | VEC_IPI, LAPIC_ICR_LOW(%rbx)   /* shorthand self, fixed, edge */
    pushfq
    orq $RFLAGS_TF | RFLAGS_IF, (%rsp)
    popfq
ext_1: nop
ext_2: nop
ext_3: nop
    cli
    CHECK_COUNT 3, external
    CHECK_EVENT 0, VEC_IPI, ext_1, external.interrupt
    EVENT 0, EV_EXTRA
    and $RFLAGS_TF, %eax
    xor %edx, %edx
    CHECK external.handler_tf_clear
    CHECK_EVENT 1, 1, ext_2, external.step1
    CHECK_EVENT 2, 1, ext_3, external.step2
    ret

/* INT n with RSP non-canonical: the push is #GP(0).  With #GP on IST3 that is delivered;
   with #GP on the same stack its own push fails too: #DF(0) on IST2. */
test_noncanonical_stack:
    mov $13, %eax
    mov $gp_handler, %edx
    mov $0x038e, %ecx               /* IST3 */
    call idt64_set
    START 0
    mov %rsp, saved_rsp(%rip)
    mov $nc_resume_1, %eax
    mov %rax, resume_rip(%rip)
    mov $0x8000000000000000, %rsp
nc_fault_1:
    int $VEC_INT
nc_resume_1:                        /* the handler put saved_rsp back into RSP */
    CHECK_COUNT 1, stack
    CHECK_EVENT 0, 13, nc_fault_1, stack.gp
    EVENT 0, EV_EXTRA
    xor %edx, %edx
    CHECK stack.gp.error_code

    mov $13, %eax
    mov $exc_stub_13, %edx
    mov $0x008e, %ecx               /* #GP on the current stack again */
    call idt64_set
    START 0
    mov %rsp, saved_rsp(%rip)
    mov $nc_resume_2, %eax
    mov %rax, resume_rip(%rip)
    mov $0x8000000000000000, %rsp
    int $VEC_INT
nc_resume_2:
    CHECK_COUNT 1, stack_df
    EVENT 0, EV_VECTOR
    mov $8, %edx
    CHECK stack_df.double_fault
    EVENT 0, EV_EXTRA
    xor %edx, %edx
    CHECK stack_df.error_code
    ret

/* A TSS whose limit (0x23) ends before IST1: a gate on IST1 gives #TS(its selector). */
test_tss_limit:
    START 0
    mov $ts_resume, %eax
    mov %rax, resume_rip(%rip)
    mov $SEL_TSS_SHORT, %ax
    ltr %ax
ts_fault:
    int $VEC_IST_SHORT
ts_resume:
    andb $~0x02, gdt64 + SEL_TSS + 5(%rip)   /* the first TSS: available again */
    mov $SEL_TSS, %ax
    ltr %ax
    CHECK_COUNT 1, tss
    CHECK_EVENT 0, 10, ts_fault, tss.ts
    EVENT 0, EV_EXTRA
    mov $SEL_TSS_SHORT, %edx
    CHECK tss.ts.error_code
    ret

/* ------------------------------------------------------------------ handlers */


/* Log event RDI with the frame at RSI (-> RIP, CS) and RDX; clobbers RAX, RBX. */
record_event:
    mov ev_count(%rip), %eax
    cmp $EV_MAX, %eax
    jae 1f
    shl $5, %eax
    mov $ev_log, %ebx
    add %rax, %rbx
    mov %rdi, EV_VECTOR(%rbx)
    mov (%rsi), %rax
    mov %rax, EV_RIP(%rbx)
    mov 8(%rsi), %rax
    mov %rax, EV_CS(%rbx)
    mov %rdx, EV_EXTRA(%rbx)
1:  incl ev_count(%rip)
    ret

    .macro SAVE_SCRATCH
    push %rax
    push %rbx
    push %rdx
    push %rsi
    push %rdi
    .endm
    .macro RESTORE_SCRATCH
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rbx
    pop %rax
    .endm
#define FRAME 40                    /* SAVE_SCRATCH's bytes: the CPU frame is above */

/* Exceptions with an error code that a test expects (#TS, #DF on IST2): log vector, RIP,
   CS and the error code; resume at resume_rip with the RSP saved_rsp holds, if set. */
    .macro ERROR_HANDLER name, vector
\name:
    SAVE_SCRATCH
    mov $\vector, %edi
    lea FRAME + 8(%rsp), %rsi
    mov FRAME(%rsp), %rdx
    call record_event
    mov resume_rip(%rip), %rax
    mov %rax, FRAME + 8(%rsp)
    movq $0, resume_rip(%rip)
    mov saved_rsp(%rip), %rax
    test %rax, %rax
    jz 1f
    mov %rax, FRAME + 8 + 24(%rsp)
    movq $0, saved_rsp(%rip)
1:  RESTORE_SCRATCH
    add $8, %rsp
    iretq
    .endm
    ERROR_HANDLER ts_handler, 10
    ERROR_HANDLER df_handler, 8
    ERROR_HANDLER gp_handler, 13

/* #DB (IST1): log RIP, CS, DR6; clear DR6; TF off in the frame when the budget is spent
   (or the log is full: a runaway). */
db_handler:
    SAVE_SCRATCH
    mov $1, %edi
    lea FRAME(%rsp), %rsi
    mov %dr6, %rdx
    call record_event
    xor %eax, %eax
    mov %rax, %dr6
    decl step_budget(%rip)
    jle 1f
    cmpl $EV_MAX, ev_count(%rip)
    jb 2f
1:  andq $~RFLAGS_TF, FRAME + 16(%rsp)
2:  RESTORE_SCRATCH
    iretq

/* int n while stepping: log it with the handler's own RFLAGS. */
int_handler:
    SAVE_SCRATCH
    mov $VEC_INT, %edi
    lea FRAME(%rsp), %rsi
    pushfq
    pop %rdx
    call record_event
    RESTORE_SCRATCH
    iretq

/* The self IPI: log it with the handler's RFLAGS, EOI. */
ipi_handler:
    SAVE_SCRATCH
    mov $VEC_IPI, %edi
    lea FRAME(%rsp), %rsi
    pushfq
    pop %rdx
    call record_event
    mov $LAPIC_BASE + LAPIC_EOI, %eax
    movl $0, (%rax)
    RESTORE_SCRATCH
    iretq

/* The SYSCALL entry (RSP is still the user's): log it as event 0x5c with the return
   address from RCX, then SYSRETQ. */
syscall_entry:
    mov %rsp, syscall_user_rsp(%rip)
    mov $syscall_stack_top, %esp
    SAVE_SCRATCH
    push $SEL_UCODE64 | 3           /* a frame for record_event: RIP = RCX, CS = user */
    push %rcx
    mov $0x5c, %edi
    mov %rsp, %rsi
    pushfq
    pop %rdx
    call record_event
    add $16, %rsp
    RESTORE_SCRATCH
    mov syscall_user_rsp(%rip), %rsp
    sysretq

/* int 0x80 from ring 3: back to run_user's caller. */
user_exit_handler:
    jmp user_returned

/* Exceptions: log them; resume at resume_rip if one is set, otherwise FATAL. */
#include "exc_stubs.h"

fatal_other:
    push $0
    push $0xff
exc_common:                         /* (RSP) = vector, 8(RSP) = error code, 16(RSP) = frame */
    SAVE_SCRATCH
    mov FRAME(%rsp), %rdi
    lea FRAME + 16(%rsp), %rsi
    pushfq
    pop %rdx
    call record_event
    mov resume_rip(%rip), %rax
    test %rax, %rax
    jz 1f
    mov %rax, FRAME + 16(%rsp)
    movq $0, resume_rip(%rip)
    RESTORE_SCRATCH
    add $16, %rsp
    iretq
1:  mov $str_fatal, %esi
    call puts_64
    mov FRAME(%rsp), %eax
    call put_hex8_64
    mov $str_err, %esi
    call puts_64
    mov FRAME + 8(%rsp), %rax
    call put_hex_rax_64
    mov $str_rip, %esi
    call puts_64
    mov FRAME + 16(%rsp), %rax
    call put_hex_rax_64
    call put_crlf_64
    mov $3, %al
    jmp debug_exit_64

    IDT64_SET_FUNCTION idt64, SEL_KCODE64

idt64_init:
    xor %eax, %eax
    mov $0x008e, %ecx               /* interrupt gate, DPL0, no IST */
1:  mov $fatal_other, %edx
    cmp $32, %eax
    jae 2f
    mov $exc_stubs, %edx
    mov (%rdx,%rax,4), %edx
2:  call idt64_set
    inc %eax
    cmp $256, %eax
    jb 1b
    mov $1, %eax
    mov $db_handler, %edx
    mov $0x018e, %ecx               /* IST1 */
    call idt64_set
    mov $0x008e, %ecx
    mov $VEC_INT, %eax
    mov $int_handler, %edx
    call idt64_set
    mov $VEC_IPI, %eax
    mov $ipi_handler, %edx
    call idt64_set
    mov $0xff, %eax                 /* the APIC's spurious vector */
    mov $irq_ignore, %edx
    call idt64_set
    mov $VEC_USER_EXIT, %eax
    mov $user_exit_handler, %edx
    mov $0x00ee, %ecx               /* DPL3 */
    call idt64_set
    mov $8, %eax
    mov $df_handler, %edx
    mov $0x028e, %ecx               /* IST2 */
    call idt64_set
    mov $10, %eax
    mov $ts_handler, %edx
    mov $0x008e, %ecx
    call idt64_set
    mov $VEC_IST_SHORT, %eax
    mov $int_handler, %edx
    mov $0x018e, %ecx               /* IST1: beyond the short TSS */
    call idt64_set
    lidt idt64_desc(%rip)
    ret

irq_ignore:
    iretq

/* ------------------------------------------------------------------ ring 3 */
    .section .user_text, "ax"
user_syscall_1:
    SET_TF
    syscall
user_syscall_1_after:
    nop
    int $VEC_USER_EXIT

user_syscall_2:
    SET_TF
    syscall
user_syscall_2_after:
    nop
    int $VEC_USER_EXIT

/* ------------------------------------------------------------------ data */
    .data
    .balign 8
gdt64:
    .quad 0
    .quad 0x00af9a000000ffff        /* 0x08 kernel code, 64-bit */
    .quad 0x00cf92000000ffff        /* 0x10 kernel data */
    .quad 0x00cffa000000ffff        /* 0x18 user code, 32-bit (sysret base) */
    .quad 0x00cff2000000ffff        /* 0x20 user data */
    .quad 0x00affa000000ffff        /* 0x28 user code, 64-bit */
    .quad 0, 0                      /* 0x30 TSS, filled in by main */
    .quad 0, 0                      /* 0x40 the short TSS, likewise */
gdt64_end:
    .balign 2
gdt64_desc:
    .word gdt64_end - gdt64 - 1
    .long gdt64

    .section .rodata
    .balign 2
idt64_desc:
    .word 256 * 16 - 1
    .long idt64, 0
str_banner:     .asciz "stepping: 64-bit mode entered\r\n"
str_fatal:      .asciz "FATAL vector="
str_err:        .asciz " err="
str_rip:        .asciz " rip="

    .bss
    .balign 4096
pml4:   .skip 4096
pdpt:   .skip 4096
pd0:    .skip 4096
pd3:    .skip 4096
idt64:  .skip 256 * 16
    .balign 16
tss64:  .skip 104
    .balign 16
rsp0_stack_bottom:  .skip 4096
rsp0_stack_top:
ist1_stack_bottom:  .skip 4096
ist1_stack_top:
ist2_stack_bottom:  .skip 4096
ist2_stack_top:
ist3_stack_bottom:  .skip 4096
ist3_stack_top:
syscall_stack_bottom: .skip 4096
syscall_stack_top:
user_stack_bottom:  .skip 4096
user_stack_top:
    .balign 16
ev_log:             .skip EV_SIZE * EV_MAX
ev_count:           .long 0
step_budget:        .long 0
    .balign 8
resume_rip:         .quad 0
kernel_resume_rsp:  .quad 0
syscall_user_rsp:   .quad 0
saved_rsp:          .quad 0

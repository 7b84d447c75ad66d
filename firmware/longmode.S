/*
 * longmode.elf: 64-bit CPU self-test.
 *
 * From the 32-bit multiboot entry it builds 4-level page tables (the first GiB
 * identity-mapped: 4 KiB pages for the first 2 MiB so ring-3 pages can carry the user
 * bit and page 0 stays unmapped, 2 MiB pages above; plus the local APIC page), enables
 * PAE, EFER.LME/SCE and paging, and far-jumps to 64-bit code.  There it installs a
 * 64-bit IDT and a TSS (RSP0, IST1) and checks interrupt and exception delivery:
 * PIT through the remapped 8259A, the local APIC timer, #PF, #GP, #UD, #DE, #BP on IST1,
 * ring 3 entered with iretq, int 0x80 and syscall/sysretq from ring 3, and faults
 * raised in ring 3.  Output: "PASS <name>" / "FAIL <name> ..." lines, then "ALL PASS"
 * and exit 0, or "FAILED <n>" and exit 1.  An exception nobody expected prints
 * "FATAL ..." and exits 3.
 *
 * Expected faults use a resume address: the test stores where execution continues in
 * resume_rip, the common handler logs the CPU-pushed frame and replaces the saved RIP,
 * and the test then compares the logged frame with what the architecture specifies.
 */
#include "defs.h"
#include "long64.h"

#define SEL_KCODE64     0x08
#define SEL_KDATA       0x10
#define SEL_UCODE32     0x18        /* only there so STAR can name the sysret pair */
#define SEL_UDATA       0x20
#define SEL_UCODE64     0x28
#define SEL_TSS         0x30


#define MSR_STAR        0xc0000081
#define MSR_LSTAR       0xc0000082
#define MSR_SFMASK      0xc0000084
#define MSR_APIC_BASE   0x1b

#define LAPIC_BASE      0xfee00000
#define LAPIC_TPR       0x080
#define LAPIC_EOI       0x0b0
#define LAPIC_SVR       0x0f0
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_TIMER_ICR 0x380
#define LAPIC_TIMER_DCR 0x3e0

#define VEC_LAPIC_TIMER 0x40
#define VEC_SYSCALL     0x80
#define VEC_SPURIOUS    0xff

#define PF_WINDOW       0x40000000  /* 1 GiB: unmapped until the #PF handler maps it */
#define SYS_EXIT        0xe0e0      /* int 0x80: leave ring 3 for good */
#define SYS_EXPECT      0xe1e1      /* int 0x80: the next fault resumes at RBX */
#define SFMASK_BITS     0x700       /* TF, IF, DF cleared on syscall */

/* Exception log entry */
#define LOG_VECTOR      0
#define LOG_ERR         8
#define LOG_RIP         16
#define LOG_CS          24
#define LOG_RFLAGS      32
#define LOG_RSP         40
#define LOG_SS          48
#define LOG_CR2         56
#define LOG_FRAME       64          /* address of the CPU-pushed frame: tells the stack */
#define LOG_SIZE        128
#define LOG_MAX         16


/* ------------------------------------------------------------------ 32-bit setup */
    .text
    .code32
    .globl main
main:
    call lapic_virtual_wire         /* while paging is off: PIC interrupts via LINT0 */
    MAP_FIRST_GIB pml4, pdpt, pd0, pt0  /* the first GiB; the ring-3 range gets the user bit */
    /* PDPT[3] -> PD3, with the local APIC page, uncached. */
    mov $pd3, %eax
    or $PTE_P | PTE_RW, %eax
    mov %eax, pdpt + 3 * 8
    mov $LAPIC_BASE | PTE_P | PTE_RW | PTE_PWT | PTE_PCD | PTE_PS, %eax
    mov %eax, pd3 + ((LAPIC_BASE >> 21) & 511) * 8

    /* 64-bit TSS: RSP0 for ring-3 entries, IST1 for #BP, no I/O bitmap. */
    movl $rsp0_stack_top, tss64 + 4
    movl $ist1_stack_top, tss64 + 36
    movw $104, tss64 + 102
    TSS64_DESCRIPTOR gdt64 + SEL_TSS, tss64
    lgdt gdt64_desc

    ENTER_LONG_MODE 0x101, 0x80010001, pml4, SEL_KCODE64, long_entry  /* EFER LME | SCE; CR0 PG, WP, PE */

    .pushsection .rodata
str_base_msr_skip: .asciz "SKIP lapic.base_msr: IA32_APIC_BASE reads 0 (not implemented by this CPU)"
    .popsection

/* ------------------------------------------------------------------ 64-bit kernel */
    .code64

#define CHECK_BITS 64
#include "check_macro.h"

    .macro CHECK_RANGE name         /* RBX <= RAX < RDX */
    .pushsection .rodata
.Lname\@: .asciz "\name"
    .popsection
    push %rsi
    mov $.Lname\@, %esi
    call check_range_64
    pop %rsi
    .endm

    .macro EXPECT label             /* the next exception resumes at label */
    push %rax
    mov $\label, %eax
    mov %rax, resume_rip(%rip)
    pop %rax
    .endm

    .macro LOGGED n, field          /* RAX = field of exception log entry n */
    mov exc_log + (\n) * LOG_SIZE + \field(%rip), %rax
    .endm

long_entry:
    LONG_MODE_SEGMENTS SEL_KDATA, SEL_TSS, boot_stack_top
    call idt64_init
    mov $str_banner, %esi
    call puts_64

    call test_pit
    call test_lapic_timer
    call test_page_fault
    call test_general_protection
    call test_ud_de_bp
    call test_ring3

    call check_summary_64
    jmp debug_exit_64

/* Sleep with sti;hlt until the 32-bit counter at RBX reaches ECX. */
wait_ticks:
1:  cli
    cmp %ecx, (%rbx)
    jae 2f
    sti
wait_hlt:
    hlt
    jmp 1b
2:  ret

/* (a) PIT IRQ0 at 1000 Hz through the 8259A remapped to vectors 0x20-0x2f. */
test_pit:
    mov $(IRQ_BASE + 8) << 8 | IRQ_BASE, %eax
    call pic_init_64
    mov $PIT_DIV_1000HZ, %eax
    call pit_periodic_64
    xor %eax, %eax
    call pic_unmask_64
    mov $pit_ticks, %ebx
    mov $5, %ecx
    call wait_ticks
    call pic_mask_all_64
    mov pit_ticks(%rip), %eax
    mov $5, %ebx
    mov $0x7fffffff, %edx
    CHECK_RANGE pit.irq0_ticks
    mov irq_in_sti_shadow(%rip), %eax
    xor %edx, %edx
    CHECK pit.sti_hlt_return_address
    ret

/* (b) Local APIC timer, periodic, with the 8259A masked. */
test_lapic_timer:
    call pic_mask_all_64
    mov $MSR_APIC_BASE, %ecx
    rdmsr
    test %eax, %eax                 /* 0: a CPU without the IA32_APIC_BASE MSR (Unicorn) */
    jnz 1f
    mov $str_base_msr_skip, %esi
    call puts_64
    call put_crlf_64
    jmp 2f
1:  push %rax
    and $0xfffff000, %eax
    mov $LAPIC_BASE, %edx
    CHECK lapic.base_msr
    pop %rax
    or $0x800, %eax                 /* global enable */
    mov $MSR_APIC_BASE, %ecx
    xor %edx, %edx
    wrmsr
2:
    mov $LAPIC_BASE, %ebx
    movl $0, LAPIC_TPR(%rbx)
    movl $0x100 | VEC_SPURIOUS, LAPIC_SVR(%rbx)
    movl $0x3, LAPIC_TIMER_DCR(%rbx)            /* divide by 16 */
    movl $0x20000 | VEC_LAPIC_TIMER, LAPIC_LVT_TIMER(%rbx)   /* periodic */
    movl $100000, LAPIC_TIMER_ICR(%rbx)
    mov $lapic_ticks, %ebx
    mov $5, %ecx
    call wait_ticks
    mov $LAPIC_BASE, %ebx
    movl $0x10000, LAPIC_LVT_TIMER(%rbx)        /* masked */
    movl $0, LAPIC_TIMER_ICR(%rbx)
    mov lapic_ticks(%rip), %eax
    mov $5, %ebx
    mov $0x7fffffff, %edx
    CHECK_RANGE lapic.timer_ticks
    mov irq_in_sti_shadow(%rip), %eax
    xor %edx, %edx
    CHECK lapic.sti_hlt_return_address
    ret

/* (c) #PF on a read of an unmapped address; the handler maps it and the read retries. */
test_page_fault:
    movl $0, log_count(%rip)
    movb $1, pf_fixup(%rip)
    mov $PF_WINDOW + pf_magic, %ebx
    xor %eax, %eax
pf_fault:
    mov (%rbx), %rax
    mov %rax, %r12
    LOGGED 0, LOG_VECTOR
    mov $14, %edx
    CHECK pf.vector
    LOGGED 0, LOG_CR2
    mov %rbx, %rdx
    CHECK pf.cr2
    LOGGED 0, LOG_ERR
    xor %edx, %edx                  /* not present, read, supervisor */
    CHECK pf.error_code
    LOGGED 0, LOG_RIP
    mov $pf_fault, %edx
    CHECK pf.rip
    mov %r12, %rax
    mov pf_magic(%rip), %rdx
    CHECK pf.retry_reads_mapped_page
    mov log_count(%rip), %eax
    mov $1, %edx
    CHECK pf.count
    ret

/* (d) #GP: a selector beyond the GDT limit, and a non-canonical address. */
test_general_protection:
    movl $0, log_count(%rip)
    EXPECT gp_sel_resume
    mov $0x1008, %ax
gp_sel_fault:
    mov %ax, %ds
gp_sel_resume:
    mov $SEL_KDATA, %ax
    mov %ax, %ds
    LOGGED 0, LOG_VECTOR
    mov $13, %edx
    CHECK gp.selector_vector
    LOGGED 0, LOG_ERR
    mov $0x1008, %edx
    CHECK gp.selector_error_code
    LOGGED 0, LOG_RIP
    mov $gp_sel_fault, %edx
    CHECK gp.selector_rip

    EXPECT gp_nc_resume
    mov $0x8000000000000000, %rbx
gp_nc_fault:
    mov (%rbx), %rax
gp_nc_resume:
    LOGGED 1, LOG_VECTOR
    mov $13, %edx
    CHECK gp.noncanonical_vector
    LOGGED 1, LOG_ERR
    xor %edx, %edx
    CHECK gp.noncanonical_error_code
    LOGGED 1, LOG_RIP
    mov $gp_nc_fault, %edx
    CHECK gp.noncanonical_rip
    ret

/* (g) #UD, #DE (faults: RIP of the instruction) and #BP (trap: RIP after int3, on IST1). */
test_ud_de_bp:
    movl $0, log_count(%rip)
    EXPECT ud_resume
ud_fault:
    ud2
ud_resume:
    LOGGED 0, LOG_VECTOR
    mov $6, %edx
    CHECK ud.vector
    LOGGED 0, LOG_RIP
    mov $ud_fault, %edx
    CHECK ud.rip
    LOGGED 0, LOG_FRAME
    mov $boot_stack_bottom, %ebx
    mov $boot_stack_top, %edx
    CHECK_RANGE ud.same_stack

    EXPECT de_resume
    xor %ecx, %ecx
    mov $1, %eax
    xor %edx, %edx
de_fault:
    div %ecx
de_resume:
    LOGGED 1, LOG_VECTOR
    xor %edx, %edx
    CHECK de.vector
    LOGGED 1, LOG_RIP
    mov $de_fault, %edx
    CHECK de.rip

    EXPECT bp_after
    mov %rsp, %r12
    int3
bp_after:
    LOGGED 2, LOG_VECTOR
    mov $3, %edx
    CHECK bp.vector
    LOGGED 2, LOG_RIP
    mov $bp_after, %edx
    CHECK bp.rip_after_int3
    /* (f) IST1: the frame is on the IST1 stack and records the interrupted RSP. */
    LOGGED 2, LOG_FRAME
    mov $ist1_stack_bottom, %ebx
    mov $ist1_stack_top, %edx
    CHECK_RANGE ist1.handler_stack
    LOGGED 2, LOG_RSP
    mov %r12, %rdx
    CHECK ist1.frame_rsp
    mov log_count(%rip), %eax
    mov $3, %edx
    CHECK exceptions.count
    ret

/* (e) Ring 3: iretq to user code, int 0x80, syscall/sysretq, faults from ring 3. */
test_ring3:
    mov $MSR_STAR, %ecx
    xor %eax, %eax
    mov $(SEL_UCODE32 | 3) << 16 | SEL_KCODE64, %edx
    wrmsr
    mov $MSR_LSTAR, %ecx
    mov $syscall_entry, %eax
    xor %edx, %edx
    wrmsr
    mov $MSR_SFMASK, %ecx
    mov $SFMASK_BITS, %eax
    wrmsr
    movl $0, log_count(%rip)
    cli
    mov %rsp, kernel_resume_rsp(%rip)
    push $SEL_UDATA | 3
    mov $user_stack_top, %eax
    push %rax
    push $0x202                     /* IF set in ring 3 */
    push $SEL_UCODE64 | 3
    mov $user_entry, %eax
    push %rax
    iretq

user_returned:                      /* from int 0x80 SYS_EXIT, on the RSP0 stack no more */
    mov $SEL_KDATA, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $str_user_exit, %esi
    call puts_64

    mov user_res_int80(%rip), %rax
    mov $0x1234 * 3 + 1, %edx
    CHECK user.int80_result
    mov int80_frame(%rip), %rax
    mov $rsp0_stack_bottom, %ebx
    mov $rsp0_stack_top, %edx
    CHECK_RANGE user.int80_on_rsp0_stack
    mov int80_cs(%rip), %rax
    mov $SEL_UCODE64 | 3, %edx
    CHECK user.int80_frame_cs
    mov int80_ss(%rip), %rax
    mov $SEL_UDATA | 3, %edx
    CHECK user.int80_frame_ss
    mov int80_rsp(%rip), %rax
    mov $user_stack_bottom, %ebx
    mov $user_stack_top + 1, %edx
    CHECK_RANGE user.int80_frame_rsp

    mov user_res_syscall(%rip), %rax
    mov $~0x5678, %rdx
    CHECK user.syscall_result
    mov syscall_rcx(%rip), %rax
    mov $user_after_syscall, %edx
    CHECK user.syscall_rcx
    mov syscall_r11(%rip), %rax
    and $0x200, %eax
    mov $0x200, %edx
    CHECK user.syscall_r11_rflags
    mov syscall_rflags(%rip), %rax
    and $SFMASK_BITS, %eax
    xor %edx, %edx
    CHECK user.syscall_sfmask
    mov syscall_cs(%rip), %rax
    mov $SEL_KCODE64, %edx
    CHECK user.syscall_cs
    mov syscall_ss(%rip), %rax
    mov $SEL_KDATA, %edx
    CHECK user.syscall_ss
    mov user_cs(%rip), %rax
    mov $SEL_UCODE64 | 3, %edx
    CHECK user.sysret_cs
    mov user_ss(%rip), %rax
    mov $SEL_UDATA | 3, %edx
    CHECK user.sysret_ss
    mov user_rflags(%rip), %rax
    and $0x200, %eax
    mov $0x200, %edx
    CHECK user.sysret_rflags

    LOGGED 0, LOG_VECTOR
    mov $13, %edx
    CHECK user.cli_gp_vector
    LOGGED 0, LOG_ERR
    xor %edx, %edx
    CHECK user.cli_gp_error_code
    LOGGED 0, LOG_RIP
    mov $user_gp_fault, %edx
    CHECK user.cli_gp_rip
    LOGGED 0, LOG_CS
    mov $SEL_UCODE64 | 3, %edx
    CHECK user.cli_gp_cs
    LOGGED 0, LOG_FRAME
    mov $rsp0_stack_bottom, %ebx
    mov $rsp0_stack_top, %edx
    CHECK_RANGE user.cli_gp_on_rsp0_stack

    LOGGED 1, LOG_VECTOR
    mov $14, %edx
    CHECK user.pf_vector
    LOGGED 1, LOG_ERR
    mov $PTE_P | PTE_US, %edx       /* protection violation, read, user */
    CHECK user.pf_error_code
    LOGGED 1, LOG_CR2
    mov $pf_magic, %edx
    CHECK user.pf_cr2
    LOGGED 1, LOG_RIP
    mov $user_pf_fault, %edx
    CHECK user.pf_rip
    mov log_count(%rip), %eax
    mov $2, %edx
    CHECK user.exceptions_count
    ret

/* ------------------------------------------------------------------ IDT and handlers */

    IDT64_SET_FUNCTION idt64, SEL_KCODE64

idt64_init:
    xor %eax, %eax
    mov $0x008e, %ecx               /* interrupt gate, DPL0, no IST */
1:  mov $fatal_other, %edx
    cmp $32, %eax
    jae 2f
    mov $exc_stubs, %edx
    mov (%rdx,%rax,4), %edx
2:  cmp $IRQ_BASE, %eax
    jb 3f
    cmp $IRQ_BASE + 15, %eax
    ja 3f
    mov $irq_ignore, %edx
3:  call idt64_set
    inc %eax
    cmp $256, %eax
    jb 1b
    mov $3, %eax                    /* #BP on IST1 */
    mov $exc_stub_3, %edx
    mov $0x018e, %ecx
    call idt64_set
    mov $IRQ_BASE, %eax
    mov $irq0_handler, %edx
    mov $0x008e, %ecx
    call idt64_set
    mov $VEC_LAPIC_TIMER, %eax
    mov $lapic_timer_handler, %edx
    call idt64_set
    mov $VEC_SPURIOUS, %eax
    mov $irq_ignore, %edx
    call idt64_set
    mov $VEC_SYSCALL, %eax
    mov $int80_handler, %edx
    mov $0x00ee, %ecx               /* DPL3: reachable with int from ring 3 */
    call idt64_set
    lidt idt64_desc(%rip)
    ret

irq_ignore:
    iretq

/* Counts an interrupt whose saved RIP is the hlt itself: it must be the next one. */
    .macro NOTE_SHADOW_VIOLATION
    push %rax
    mov $wait_hlt, %eax
    cmp %rax, 16(%rsp)
    jne 9f
    incl irq_in_sti_shadow(%rip)
9:  pop %rax
    .endm

irq0_handler:
    push %rax
    incl pit_ticks(%rip)
    NOTE_SHADOW_VIOLATION
    mov $PIC_EOI, %al
    out %al, $PIC1_CMD
    pop %rax
    iretq

lapic_timer_handler:
    push %rax
    incl lapic_ticks(%rip)
    NOTE_SHADOW_VIOLATION
    mov $LAPIC_BASE + LAPIC_EOI, %eax
    movl $0, (%rax)
    pop %rax
    iretq

/* int 0x80 from ring 3 (interrupt gate, DPL3): RAX = value or SYS_* request. */
int80_handler:
    cmp $SYS_EXIT, %rax
    je 2f
    cmp $SYS_EXPECT, %rax
    jne 1f
    mov %rbx, resume_rip(%rip)
    iretq
1:  push %rbx
    lea 8(%rsp), %rbx
    mov %rbx, int80_frame(%rip)
    mov 8(%rbx), %rbx
    mov %rbx, int80_cs(%rip)
    mov 8 + 32(%rsp), %rbx
    mov %rbx, int80_ss(%rip)
    mov 8 + 24(%rsp), %rbx
    mov %rbx, int80_rsp(%rip)
    pop %rbx
    lea 1(%rax,%rax,2), %rax
    iretq
2:  mov kernel_resume_rsp(%rip), %rsp
    jmp user_returned

/* syscall from ring 3: no stack switch by the CPU, so switch by hand. RAX = ~RAX. */
syscall_entry:
    mov %rsp, syscall_user_rsp(%rip)
    mov $syscall_stack_top, %esp
    push %rax
    pushfq
    pop %rax
    mov %rax, syscall_rflags(%rip)
    mov %rcx, syscall_rcx(%rip)
    mov %r11, syscall_r11(%rip)
    xor %eax, %eax
    mov %cs, %ax
    mov %rax, syscall_cs(%rip)
    mov %ss, %ax
    mov %rax, syscall_ss(%rip)
    pop %rax
    not %rax
    mov syscall_user_rsp(%rip), %rsp
    sysretq

/* CPU exceptions: stubs push a dummy error code where the CPU pushes none, then the vector. */
#include "exc_stubs.h"

fatal_other:
    push $0
    push $0xff
exc_common:
    push %rax
    push %rbx
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %rbp
    push %r8
    push %r9
    push %r10
    push %r11
    push %r12
    push %r13
    push %r14
    push %r15
    lea 15 * 8(%rsp), %rbp          /* -> vector, error code, RIP, CS, RFLAGS, RSP, SS */
    call exc_record
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rbp
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rbx
    pop %rax
    add $16, %rsp
    iretq

/* Log the frame at RBP, then retry (#PF being fixed up), resume, or stop: unexpected. */
exc_record:
    mov log_count(%rip), %eax
    cmp $LOG_MAX, %eax
    jae 2f
    shl $7, %eax
    add $exc_log, %eax
    mov %rax, %rdi
    mov %rbp, %rsi
    mov $7, %ecx
    cld
    rep movsq                       /* vector .. SS */
    mov %cr2, %rax
    mov %rax, (%rdi)
    lea 16(%rbp), %rax
    mov %rax, 8(%rdi)
    incl log_count(%rip)
2:  cmpq $14, (%rbp)
    jne 3f
    cmpb $0, pf_fixup(%rip)
    je 3f
    movb $0, pf_fixup(%rip)
    /* Map the 1 GiB window: PDPT[1] -> PD_HI, whose first 2 MiB page is physical 0. */
    mov $pd_hi, %eax
    or $PTE_P | PTE_RW, %eax
    mov %rax, pdpt + 8(%rip)
    movq $PTE_P | PTE_RW | PTE_PS, pd_hi(%rip)
    mov %cr2, %rax
    invlpg (%rax)
    ret
3:  mov resume_rip(%rip), %rax
    test %rax, %rax
    jz 4f
    mov %rax, 16(%rbp)
    movq $0, resume_rip(%rip)
    ret
4:  mov $str_fatal, %esi
    call puts_64
    mov (%rbp), %eax
    call put_hex8_64
    mov $str_err, %esi
    call puts_64
    mov 8(%rbp), %rax
    call put_hex_rax_64
    mov $str_rip, %esi
    call puts_64
    mov 16(%rbp), %rax
    call put_hex_rax_64
    mov $str_cr2, %esi
    call puts_64
    mov %cr2, %rax
    call put_hex_rax_64
    call put_crlf_64
    mov $3, %al
    jmp debug_exit_64

/* ------------------------------------------------------------------ ring 3 */
    .section .user_text, "ax"
user_entry:
    mov $0x1234, %eax
    int $0x80
    mov %rax, user_res_int80(%rip)
    mov $0x5678, %eax
    syscall
user_after_syscall:
    mov %rax, user_res_syscall(%rip)
    xor %eax, %eax
    mov %cs, %ax
    mov %rax, user_cs(%rip)
    mov %ss, %ax
    mov %rax, user_ss(%rip)
    pushfq
    pop %rax
    mov %rax, user_rflags(%rip)
    mov $SYS_EXPECT, %eax
    mov $user_gp_resume, %ebx
    int $0x80
user_gp_fault:
    cli                             /* CPL 3 > IOPL 0: #GP(0) */
user_gp_resume:
    mov $SYS_EXPECT, %eax
    mov $user_pf_resume, %ebx
    int $0x80
user_pf_fault:
    mov pf_magic(%rip), %rax        /* a supervisor page: #PF(P|U) */
user_pf_resume:
    mov $SYS_EXIT, %eax
    int $0x80
    jmp .

    .section .user_data, "aw"
    .balign 16
user_res_int80:     .quad 0
user_res_syscall:   .quad 0
user_cs:            .quad 0
user_ss:            .quad 0
user_rflags:        .quad 0
    .balign 16
user_stack_bottom:
    .skip 4096
user_stack_top:

/* ------------------------------------------------------------------ data */
    .data
    .balign 8
pf_magic:           .quad 0x0123456789abcdef
gdt64:
    .quad 0
    .quad 0x00af9a000000ffff        /* 0x08 kernel code, 64-bit */
    .quad 0x00cf92000000ffff        /* 0x10 kernel data */
    .quad 0x00cffa000000ffff        /* 0x18 user code, 32-bit (sysret base) */
    .quad 0x00cff2000000ffff        /* 0x20 user data */
    .quad 0x00affa000000ffff        /* 0x28 user code, 64-bit */
    .quad 0, 0                      /* 0x30 TSS, filled in by main */
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
str_banner:     .asciz "longmode: 64-bit mode entered\r\n"
str_user_exit:  .asciz "longmode: back from ring 3\r\n"
str_fatal:      .asciz "FATAL vector="
str_err:        .asciz " err="
str_rip:        .asciz " rip="
str_cr2:        .asciz " cr2="

    .bss
    .balign 4096
pml4:   .skip 4096
pdpt:   .skip 4096
pd0:    .skip 4096
pd3:    .skip 4096
pd_hi:  .skip 4096
pt0:    .skip 4096
idt64:  .skip 256 * 16
    .balign 16
tss64:  .skip 104
    .balign 16
rsp0_stack_bottom:  .skip 4096
rsp0_stack_top:
ist1_stack_bottom:  .skip 4096
ist1_stack_top:
syscall_stack_bottom: .skip 4096
syscall_stack_top:
    .balign 16
exc_log:            .skip LOG_SIZE * LOG_MAX
log_count:          .long 0
pit_ticks:          .long 0
lapic_ticks:        .long 0
irq_in_sti_shadow:  .long 0
pf_fixup:           .byte 0
    .balign 8
resume_rip:         .quad 0
kernel_resume_rsp:  .quad 0
int80_frame:        .quad 0
int80_cs:           .quad 0
int80_ss:           .quad 0
int80_rsp:          .quad 0
syscall_user_rsp:   .quad 0
syscall_rflags:     .quad 0
syscall_rcx:        .quad 0
syscall_r11:        .quad 0
syscall_cs:         .quad 0
syscall_ss:         .quad 0

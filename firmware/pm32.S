/*
 * pm32.elf: 32-bit protected-mode CPU self-test.
 *
 * Flat ring-0 and ring-3 segments, a TSS with SS0:ESP0, an IDT with interrupt gates
 * (IF cleared on entry) and one trap gate (IF kept), and 32-bit paging: 4 KiB pages for
 * the first 4 MiB (user bit only on the ring-3 range, page 0 unmapped) and 4 MiB PSE
 * pages up to 64 MiB.  Checks: gate types, PIT IRQ0 through the remapped 8259A (in
 * ring 0 with sti;hlt, then arriving while ring 3 runs: stack switch to ESP0 and the
 * user SS:ESP in the frame), int 0x80 from ring 3, #GP with error codes, #PF with CR2
 * (the handler maps a 4 MiB page and the read retries), #DE, #UD, int3 and into (#OF).
 * Output: "PASS <name>" / "FAIL <name> ..." lines, then "ALL PASS" and exit 0, or
 * "FAILED <n>" and exit 1; an unexpected exception prints "FATAL ..." and exits 3.
 *
 * Expected faults use a resume address (see longmode.S): resume_eip says where the
 * common handler sends execution after logging the CPU-pushed frame.
 */
#include "defs.h"

#define SEL_KCODE       0x08
#define SEL_KDATA       0x10
#define SEL_UCODE       0x18
#define SEL_UDATA       0x20
#define SEL_TSS         0x28


#define PF_WINDOW       0x10000000  /* 256 MiB: unmapped until the #PF handler maps it */
#define SYS_EXIT        0xe0e0
#define SYS_EXPECT      0xe1e1
#define VEC_TRAP_GATE   0x81
#define VEC_INT_GATE    0x82
#define EFLAGS_IF       0x200

#define LOG_VECTOR      0
#define LOG_ERR         4
#define LOG_EIP         8
#define LOG_CS          12
#define LOG_EFLAGS      16
#define LOG_ESP         20          /* valid only for entries from ring 3 */
#define LOG_SS          24
#define LOG_CR2         28
#define LOG_FRAME       32
#define LOG_SIZE        64
#define LOG_MAX         16


#define CHECK_BITS 32
#include "check_macro.h"

    .macro CHECK_RANGE name         /* EBX <= EAX < EDX */
    .pushsection .rodata
.Lname\@: .asciz "\name"
    .popsection
    push %esi
    mov $.Lname\@, %esi
    call check_range
    pop %esi
    .endm

    .macro EXPECT label
    movl $\label, resume_eip
    .endm

    .macro LOGGED n, field
    mov exc_log + (\n) * LOG_SIZE + \field, %eax
    .endm

    .text
    .code32
    .globl main
main:
    mov $str_banner, %esi
    call puts
    call setup_gdt_tss
    call setup_idt
    call lapic_virtual_wire
    call setup_paging
    mov $(IRQ_BASE + 8) << 8 | IRQ_BASE, %eax
    call pic_init
    mov $PIT_DIV_1000HZ, %eax
    call pit_periodic

    call test_gates
    call test_pit
    call test_page_fault
    call test_general_protection
    call test_de_ud_bp_of
    call test_ring3

    call check_summary
    ret

setup_gdt_tss:
    movl $esp0_stack_top, tss32 + 4
    movl $SEL_KDATA, tss32 + 8
    movw $104, tss32 + 102          /* I/O bitmap beyond the limit: none */
    mov $tss32, %eax
    movw $103, gdt32 + SEL_TSS
    mov %ax, gdt32 + SEL_TSS + 2
    shr $16, %eax
    mov %al, gdt32 + SEL_TSS + 4
    movb $0x89, gdt32 + SEL_TSS + 5 /* present, DPL0, available 32-bit TSS */
    mov %ah, gdt32 + SEL_TSS + 7
    lgdt gdt32_desc
    ljmp $SEL_KCODE, $1f
1:  mov $SEL_KDATA, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $SEL_TSS, %ax
    ltr %ax
    ret

setup_idt:
    call idt32_init
    xor %eax, %eax
    mov $0x8e, %cl
1:  mov exc_stubs(,%eax,4), %edx
    call idt32_set
    inc %eax
    cmp $32, %eax
    jb 1b
    mov $IRQ_BASE, %eax
    mov $irq0_handler, %edx
    call idt32_set
    mov $0x80, %eax
    mov $int80_handler, %edx
    mov $0xee, %cl                  /* interrupt gate, DPL3 */
    call idt32_set
    mov $VEC_TRAP_GATE, %eax
    mov $gate_probe, %edx
    mov $0x8f, %cl                  /* trap gate, DPL0 */
    call idt32_set
    mov $VEC_INT_GATE, %eax
    mov $gate_probe, %edx
    mov $0x8e, %cl                  /* interrupt gate, DPL0 */
    call idt32_set
    ret

setup_paging:
    mov $pt0, %eax
    or $PTE_P | PTE_RW | PTE_US, %eax
    mov %eax, pgdir
    mov $1, %ecx
1:  mov %ecx, %eax
    shl $12, %eax
    or $PTE_P | PTE_RW, %eax
    mov %eax, pt0(,%ecx,4)
    inc %ecx
    cmp $1024, %ecx
    jb 1b
    mov $__user_start, %ecx
    shr $12, %ecx
    mov $__user_end, %edx
    shr $12, %edx
2:  cmp %edx, %ecx
    jae 3f
    orl $PTE_US, pt0(,%ecx,4)
    inc %ecx
    jmp 2b
3:  mov $1, %ecx
4:  mov %ecx, %eax
    shl $22, %eax
    or $PTE_P | PTE_RW | PTE_PS, %eax
    mov %eax, pgdir(,%ecx,4)
    inc %ecx
    cmp $16, %ecx
    jb 4b
    mov %cr4, %eax
    or $0x10, %eax                  /* PSE */
    mov %eax, %cr4
    mov $pgdir, %eax
    mov %eax, %cr3
    mov %cr0, %eax
    or $0x80010000, %eax            /* PG, WP */
    mov %eax, %cr0
    ret

/* Sleep with sti;hlt until the counter at EBX reaches ECX. */
wait_ticks:
1:  cli
    cmp %ecx, (%ebx)
    jae 2f
    sti
wait_hlt:
    hlt
    jmp 1b
2:  ret

/* A trap gate keeps IF, an interrupt gate clears it. */
test_gates:
    sti
    int $VEC_TRAP_GATE
    mov probe_eflags, %eax
    int $VEC_INT_GATE
    cli
    and $EFLAGS_IF, %eax
    mov $EFLAGS_IF, %edx
    CHECK gate.trap_keeps_if
    mov probe_eflags, %eax
    and $EFLAGS_IF, %eax
    xor %edx, %edx
    CHECK gate.interrupt_clears_if
    ret

test_pit:
    xor %eax, %eax
    call pic_unmask
    mov $pit_ticks, %ebx
    mov $5, %ecx
    call wait_ticks
    call pic_mask_all
    mov pit_ticks, %eax
    mov $5, %ebx
    mov $0x7fffffff, %edx
    CHECK_RANGE pit.irq0_ticks
    mov irq_in_sti_shadow, %eax
    xor %edx, %edx
    CHECK pit.sti_hlt_return_address
    ret

test_page_fault:
    movl $0, log_count
    movb $1, pf_fixup
    mov $PF_WINDOW + pf_magic, %ebx
    xor %eax, %eax
pf_fault:
    mov (%ebx), %eax
    mov %eax, %edi
    LOGGED 0, LOG_VECTOR
    mov $14, %edx
    CHECK pf.vector
    LOGGED 0, LOG_CR2
    mov %ebx, %edx
    CHECK pf.cr2
    LOGGED 0, LOG_ERR
    xor %edx, %edx                  /* not present, read, supervisor */
    CHECK pf.error_code
    LOGGED 0, LOG_EIP
    mov $pf_fault, %edx
    CHECK pf.eip
    mov %edi, %eax
    mov pf_magic, %edx
    CHECK pf.retry_reads_4m_page
    mov log_count, %eax
    mov $1, %edx
    CHECK pf.count
    ret

test_general_protection:
    movl $0, log_count
    EXPECT gp_resume
    mov $0x1008, %ax
gp_fault:
    mov %ax, %ds                    /* beyond the GDT limit: #GP(selector) */
gp_resume:
    LOGGED 0, LOG_VECTOR
    mov $13, %edx
    CHECK gp.vector
    LOGGED 0, LOG_ERR
    mov $0x1008, %edx
    CHECK gp.error_code
    LOGGED 0, LOG_EIP
    mov $gp_fault, %edx
    CHECK gp.eip
    ret

test_de_ud_bp_of:
    movl $0, log_count
    EXPECT de_resume
    xor %ecx, %ecx
    mov $1, %eax
    xor %edx, %edx
de_fault:
    div %ecx
de_resume:
    LOGGED 0, LOG_VECTOR
    xor %edx, %edx
    CHECK de.vector
    LOGGED 0, LOG_EIP
    mov $de_fault, %edx
    CHECK de.eip

    EXPECT ud_resume
ud_fault:
    ud2
ud_resume:
    LOGGED 1, LOG_VECTOR
    mov $6, %edx
    CHECK ud.vector
    LOGGED 1, LOG_EIP
    mov $ud_fault, %edx
    CHECK ud.eip

    EXPECT bp_after
    int3
bp_after:
    LOGGED 2, LOG_VECTOR
    mov $3, %edx
    CHECK bp.vector
    LOGGED 2, LOG_EIP
    mov $bp_after, %edx
    CHECK bp.eip_after_int3

    EXPECT of_after
    mov $0x7f, %al
    add $1, %al                     /* signed overflow: OF=1 */
    into
of_after:
    LOGGED 3, LOG_VECTOR
    mov $4, %edx
    CHECK into.vector
    LOGGED 3, LOG_EIP
    mov $of_after, %edx
    CHECK into.eip_after_into

    EXPECT no_of_after              /* OF=0: into does nothing */
    xor %eax, %eax
    into
no_of_after:
    movl $0, resume_eip
    mov log_count, %eax
    mov $4, %edx
    CHECK exceptions.count
    ret

test_ring3:
    movl $0, log_count
    xor %eax, %eax
    call pic_unmask                 /* PIT ticks arrive while ring 3 spins */
    cli
    mov %esp, kernel_resume_esp
    mov $SEL_UDATA | 3, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %fs
    mov %ax, %gs
    push $SEL_UDATA | 3
    push $user_stack_top
    push $0x202                     /* IF set, IOPL 0 */
    push $SEL_UCODE | 3
    push $user_entry
    iret

user_returned:
    mov $SEL_KDATA, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %fs
    mov %ax, %gs
    call pic_mask_all
    mov $str_user_exit, %esi
    call puts

    mov user_ticks, %eax
    mov $3, %ebx
    mov $0x7fffffff, %edx
    CHECK_RANGE ring3.pit_ticks
    mov user_irq_frame, %eax
    mov $esp0_stack_bottom, %ebx
    mov $esp0_stack_top, %edx
    CHECK_RANGE ring3.pit_on_esp0_stack
    mov user_irq_cs, %eax
    mov $SEL_UCODE | 3, %edx
    CHECK ring3.pit_frame_cs
    mov user_irq_ss, %eax
    mov $SEL_UDATA | 3, %edx
    CHECK ring3.pit_frame_ss
    mov user_irq_esp, %eax
    mov $user_stack_bottom, %ebx
    mov $user_stack_top + 1, %edx
    CHECK_RANGE ring3.pit_frame_esp

    mov user_res_int80, %eax
    mov $0x1234 * 3 + 1, %edx
    CHECK ring3.int80_result
    mov int80_frame, %eax
    mov $esp0_stack_bottom, %ebx
    mov $esp0_stack_top, %edx
    CHECK_RANGE ring3.int80_on_esp0_stack
    mov int80_cs, %eax
    mov $SEL_UCODE | 3, %edx
    CHECK ring3.int80_frame_cs
    mov int80_ss, %eax
    mov $SEL_UDATA | 3, %edx
    CHECK ring3.int80_frame_ss
    mov int80_esp, %eax
    mov $user_stack_bottom, %ebx
    mov $user_stack_top + 1, %edx
    CHECK_RANGE ring3.int80_frame_esp

    LOGGED 0, LOG_VECTOR
    mov $13, %edx
    CHECK ring3.cli_gp_vector
    LOGGED 0, LOG_ERR
    xor %edx, %edx
    CHECK ring3.cli_gp_error_code
    LOGGED 0, LOG_EIP
    mov $user_cli_fault, %edx
    CHECK ring3.cli_gp_eip
    LOGGED 0, LOG_CS
    mov $SEL_UCODE | 3, %edx
    CHECK ring3.cli_gp_cs
    LOGGED 0, LOG_FRAME
    mov $esp0_stack_bottom, %ebx
    mov $esp0_stack_top, %edx
    CHECK_RANGE ring3.cli_gp_on_esp0_stack

    LOGGED 1, LOG_VECTOR
    mov $13, %edx
    CHECK ring3.kernel_ds_gp_vector
    LOGGED 1, LOG_ERR
    mov $SEL_KDATA, %edx            /* DPL0 data segment loaded at CPL3 */
    CHECK ring3.kernel_ds_gp_error_code

    LOGGED 2, LOG_VECTOR
    mov $14, %edx
    CHECK ring3.pf_vector
    LOGGED 2, LOG_ERR
    mov $PTE_P | PTE_US, %edx       /* protection violation, read, user */
    CHECK ring3.pf_error_code
    LOGGED 2, LOG_CR2
    mov $pf_magic, %edx
    CHECK ring3.pf_cr2
    LOGGED 2, LOG_EIP
    mov $user_pf_fault, %edx
    CHECK ring3.pf_eip
    mov log_count, %eax
    mov $3, %edx
    CHECK ring3.exceptions_count
    ret

/* ------------------------------------------------------------------ handlers */

/* Vectors 0x81 (trap gate) and 0x82 (interrupt gate): record EFLAGS as seen inside. */
gate_probe:
    push %eax
    pushf
    pop %eax
    mov %eax, probe_eflags
    pop %eax
    iret

irq0_handler:
    push %eax
    push %ds
    mov $SEL_KDATA, %ax
    mov %ax, %ds
    incl pit_ticks
    cmpl $wait_hlt, 8(%esp)         /* the saved EIP may never be the hlt itself */
    jne 1f
    incl irq_in_sti_shadow
1:  testl $3, 12(%esp)
    jz 2f
    incl user_ticks
    cmpl $0, user_irq_frame
    jne 2f
    lea 8(%esp), %eax
    mov %eax, user_irq_frame
    mov 12(%esp), %eax
    mov %eax, user_irq_cs
    mov 20(%esp), %eax
    mov %eax, user_irq_esp
    mov 24(%esp), %eax
    mov %eax, user_irq_ss
2:  mov $PIC_EOI, %al
    out %al, $PIC1_CMD
    pop %ds
    pop %eax
    iret

/* int 0x80 from ring 3: EAX = value (returns EAX*3+1) or a SYS_* request. */
int80_handler:
    push %ds
    push %ecx
    mov $SEL_KDATA, %cx
    mov %cx, %ds
    cmp $SYS_EXIT, %eax
    je 3f
    cmp $SYS_EXPECT, %eax
    jne 1f
    mov %ebx, resume_eip
    jmp 2f
1:  lea 8(%esp), %ecx
    mov %ecx, int80_frame
    mov 4(%ecx), %ecx
    mov %ecx, int80_cs
    mov 8 + 12(%esp), %ecx
    mov %ecx, int80_esp
    mov 8 + 16(%esp), %ecx
    mov %ecx, int80_ss
    lea 1(%eax,%eax,2), %eax
2:  pop %ecx
    pop %ds
    iret
3:  mov kernel_resume_esp, %esp
    jmp user_returned

#include "exc_stubs.h"

exc_common:
    pusha
    push %ds
    push %es
    mov $SEL_KDATA, %ax
    mov %ax, %ds
    mov %ax, %es
    lea 40(%esp), %ebp              /* -> vector, error code, EIP, CS, EFLAGS[, ESP, SS] */
    call exc_record
    pop %es
    pop %ds
    popa
    add $8, %esp
    iret

exc_record:
    mov log_count, %eax
    cmp $LOG_MAX, %eax
    jae 2f
    shl $6, %eax
    lea exc_log(%eax), %edi
    mov %ebp, %esi
    mov $7, %ecx
    cld
    rep movsl                       /* vector .. SS (the last two meaningful from ring 3) */
    mov %cr2, %eax
    mov %eax, (%edi)
    lea 8(%ebp), %eax
    mov %eax, 4(%edi)
    incl log_count
2:  cmpl $14, (%ebp)
    jne 3f
    cmpb $0, pf_fixup
    je 3f
    movb $0, pf_fixup
    /* Map the window's first 4 MiB to physical 0 with one PSE page. */
    movl $PTE_P | PTE_RW | PTE_PS, pgdir + (PF_WINDOW >> 22) * 4
    mov %cr2, %eax
    invlpg (%eax)
    ret
3:  mov resume_eip, %eax
    test %eax, %eax
    jz 4f
    mov %eax, 8(%ebp)
    movl $0, resume_eip
    ret
4:  mov $str_fatal, %esi
    call puts
    mov (%ebp), %eax
    call put_hex8
    mov $str_err, %esi
    call puts
    mov 4(%ebp), %eax
    call put_hex32
    mov $str_eip, %esi
    call puts
    mov 8(%ebp), %eax
    call put_hex32
    mov $str_cr2, %esi
    call puts
    mov %cr2, %eax
    call put_hex32
    call put_crlf
    mov $3, %al
    jmp debug_exit

/* ------------------------------------------------------------------ ring 3 */
    .section .user_text, "ax"
user_entry:
1:  cmpl $3, user_ticks             /* spin until the PIT has interrupted ring 3 thrice */
    jb 1b
    mov $0x1234, %eax
    int $0x80
    mov %eax, user_res_int80
    mov $SYS_EXPECT, %eax
    mov $user_cli_resume, %ebx
    int $0x80
user_cli_fault:
    cli                             /* CPL 3 > IOPL 0: #GP(0) */
user_cli_resume:
    mov $SYS_EXPECT, %eax
    mov $user_ds_resume, %ebx
    int $0x80
    mov $SEL_KDATA, %ax
    mov %ax, %ds                    /* DPL 0 < CPL 3: #GP(0x10) */
user_ds_resume:
    mov $SYS_EXPECT, %eax
    mov $user_pf_resume, %ebx
    int $0x80
user_pf_fault:
    mov pf_magic, %eax              /* a supervisor page: #PF(P|U) */
user_pf_resume:
    mov $SYS_EXIT, %eax
    int $0x80
    jmp .

    .section .user_data, "aw"
    .balign 16
user_ticks:         .long 0
user_res_int80:     .long 0
    .balign 16
user_stack_bottom:
    .skip 4096
user_stack_top:

/* ------------------------------------------------------------------ data */
    .data
    .balign 8
pf_magic:   .long 0x600dcafe
gdt32:
    .quad 0
    .quad 0x00cf9a000000ffff        /* 0x08 kernel code */
    .quad 0x00cf92000000ffff        /* 0x10 kernel data */
    .quad 0x00cffa000000ffff        /* 0x18 user code */
    .quad 0x00cff2000000ffff        /* 0x20 user data */
    .quad 0                         /* 0x28 TSS, filled in by setup_gdt_tss */
gdt32_end:
    .balign 2
gdt32_desc:
    .word gdt32_end - gdt32 - 1
    .long gdt32

    .section .rodata
str_banner:     .asciz "pm32: protected mode\r\n"
str_user_exit:  .asciz "pm32: back from ring 3\r\n"
str_fatal:      .asciz "FATAL vector="
str_err:        .asciz " err="
str_eip:        .asciz " eip="
str_cr2:        .asciz " cr2="

    .bss
    .balign 4096
pgdir:  .skip 4096
pt0:    .skip 4096
    .balign 16
tss32:  .skip 104
    .balign 16
esp0_stack_bottom:  .skip 4096
esp0_stack_top:
exc_log:            .skip LOG_SIZE * LOG_MAX
log_count:          .skip 4
pit_ticks:          .skip 4
irq_in_sti_shadow:  .skip 4
probe_eflags:       .skip 4
resume_eip:         .skip 4
kernel_resume_esp:  .skip 4
user_irq_frame:     .skip 4
user_irq_cs:        .skip 4
user_irq_esp:       .skip 4
user_irq_ss:        .skip 4
int80_frame:        .skip 4
int80_cs:           .skip 4
int80_esp:          .skip 4
int80_ss:           .skip 4
pf_fixup:           .skip 1

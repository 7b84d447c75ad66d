/*
 * cpuedges.elf: CPU corner cases that a CPU model must get right, in 64-bit mode.
 *
 * The multiboot entry (32-bit) builds the same 4-level page tables as longmode.elf (the
 * first GiB identity-mapped, 4 KiB pages for the first 2 MiB so that only the ring-3
 * range carries the user bit), enters long mode and runs checks whose answers the SDM
 * fixes, each guarded by the CPUID bit that offers the feature (so a CPU that does not
 * offer one is checked for #UD/#GP instead):
 *   - the CPUID feature line ("cpuedges: xsave=1 ..."), so the verdicts below are read
 *     against the features the CPU claims;
 *   - IA32_TSC_AUX (MSR 0xc0000103): what WRMSR wrote comes back from RDMSR, RDTSCP (ECX,
 *     bits 63:32 of RCX cleared) and RDPID;
 *   - XSAVE: CPUID.1:ECX.OSXSAVE follows CR4.OSXSAVE; XGETBV/XSETBV/XSAVE/XRSTOR are #UD
 *     without it; XSETBV #GP for ECX != 0, x87 cleared, AVX without SSE, reserved or
 *     unsupported bits, CPL 3; XGETBV #GP for an ECX not offered; XSAVE/XRSTOR #GP on an
 *     area not 64-byte aligned, #NM with CR0.TS; XRSTOR #GP on a bad header;
 *   - CR4 bits the CPU does not offer (LA57, SMAP, PKE), STAC/CLAC and RDPKRU without
 *     SMAP/PKU;
 *   - non-canonical bases: LGDT, LIDT, WRMSR to FS/GS/KERNEL_GS base, WRFSBASE, LTR of a
 *     TSS descriptor with a non-canonical base (the outcome each CPU gives is printed as
 *     "PASS <name>" only when it is the one QEMU 7.2 TCG gives).
 * Output: "PASS <name>" / "FAIL <name> got=.. want=.." lines, then "ALL PASS" (exit 0)
 * or "FAILED <n>" (exit 1); an exception nobody expected prints "FATAL ..." (exit 3).
 *
 * A check arms a resume address (ARM), runs one instruction and reads the outcome
 * (OUTCOME): the exception handler records vector | error code << 8 and continues at the
 * resume address; 0xff means no exception.
 */
#include "defs.h"
#include "long64.h"

#define SEL_KCODE64     0x08
#define SEL_KDATA       0x10
#define SEL_UCODE32     0x18
#define SEL_UDATA       0x20
#define SEL_UCODE64     0x28
#define SEL_TSS         0x30
#define SEL_TSS_BAD     0x40        /* a 64-bit TSS descriptor with a non-canonical base */


#define MSR_FS_BASE     0xc0000100
#define MSR_GS_BASE     0xc0000101
#define MSR_KERNEL_GS   0xc0000102
#define MSR_TSC_AUX     0xc0000103

#define CR0_TS          (1 << 3)
#define CR4_FSGSBASE    (1 << 16)
#define CR4_OSXSAVE     (1 << 18)
#define CR4_SMAP        (1 << 21)
#define CR4_PKE         (1 << 22)
#define CR4_LA57        (1 << 12)

#define NONE            0xff        /* outcome: no exception */
#define UD              0x06
#define NM              0x07
#define GP0             0x0d        /* #GP with error code 0 */


/* ------------------------------------------------------------------ 32-bit setup */
    .text
    .code32
    .globl main
main:
    MAP_FIRST_GIB pml4, pdpt, pd0, pt0
    movl $rsp0_stack_top, tss64 + 4
    movw $104, tss64 + 102
    TSS64_DESCRIPTOR gdt64 + SEL_TSS, tss64
    TSS64_DESCRIPTOR gdt64 + SEL_TSS_BAD, tss64 /* the same TSS with bits 63:32 of its base 0x80000000 */
    movl $0x80000000, gdt64 + SEL_TSS_BAD + 8
    lgdt gdt64_desc
    ENTER_LONG_MODE 0x100, 0x80010001, pml4, SEL_KCODE64, long_entry  /* EFER LME; CR0 PG, WP, PE */

/* ------------------------------------------------------------------ 64-bit checks */
    .code64

#define CHECK_BITS 64
#include "check_macro.h"

    .macro ARM label                /* an exception in what follows resumes at label */
    push %rax
    mov $\label, %eax
    mov %rax, resume_rip(%rip)
    movq $NONE, outcome(%rip)
    pop %rax
    .endm

    .macro OUTCOME name, want       /* the exception (vector | error << 8) or NONE */
    movq $0, resume_rip(%rip)
    mov outcome(%rip), %rax
    mov $\want, %edx
    CHECK \name
    .endm

    .macro NOTE name                /* print "<name> outcome=<hex>": where QEMU 7.2 and the SDM differ */
    movq $0, resume_rip(%rip)
    PRINT "\name outcome="
    mov outcome(%rip), %eax
    call put_hex32_64
    call put_crlf_64
    .endm

    .macro IF_FEATURE flag, else_label
    cmpb $0, \flag(%rip)
    je \else_label
    .endm

    .macro PRINT text
    .pushsection .rodata
.Ltext\@: .asciz "\text"
    .popsection
    push %rsi
    mov $.Ltext\@, %esi
    call puts_64
    pop %rsi
    .endm

long_entry:
    LONG_MODE_SEGMENTS SEL_KDATA, SEL_TSS, boot_stack_top
    call idt64_init
    call read_features
    call test_tsc_aux
    call test_xsave
    call test_cr4
    call test_smap_pku
    call test_canonical
    call check_summary_64
    jmp debug_exit_64

/* CPUID bit: leaf EAX, subleaf ECX, register index R (0 EAX .. 3 EDX), bit B -> flag. */
    .macro FEATURE leaf, sub, reg, bit, flag
    mov $\leaf, %eax
    mov $\sub, %ecx
    cpuid
    mov %eax, cpuid_out(%rip)
    mov %ebx, cpuid_out + 4(%rip)
    mov %ecx, cpuid_out + 8(%rip)
    mov %edx, cpuid_out + 12(%rip)
    mov cpuid_out + 4 * \reg(%rip), %eax
    shr $\bit, %eax
    and $1, %eax
    mov %al, \flag(%rip)
    .endm

    .macro PRINT_FLAG text, flag
    PRINT "\text"
    movzbl \flag(%rip), %eax
    add $'0', %al
    call putc_64
    .endm

read_features:
    FEATURE 1, 0, 2, 26, feat_xsave
    FEATURE 0x80000001, 0, 3, 27, feat_rdtscp
    FEATURE 7, 0, 1, 0, feat_fsgsbase
    FEATURE 7, 0, 1, 20, feat_smap
    FEATURE 7, 0, 2, 3, feat_pku
    FEATURE 7, 0, 2, 16, feat_la57
    FEATURE 7, 0, 2, 22, feat_rdpid
    mov $0x40000000, %eax           /* QEMU TCG's hypervisor vendor: "TCGTCGTCGTCG" */
    cpuid
    cmp $0x54474354, %ebx
    jne 2f
    movb $1, on_qemu_tcg(%rip)
2:  movq $0, xcr0_supported(%rip)
    IF_FEATURE feat_xsave, 1f
    FEATURE 0xd, 1, 0, 2, feat_xgetbv1
    mov $0xd, %eax
    xor %ecx, %ecx
    cpuid
    mov %eax, xcr0_supported(%rip)
    mov %edx, xcr0_supported + 4(%rip)
1:  PRINT_FLAG "cpuedges: xsave=", feat_xsave
    PRINT_FLAG " xgetbv1=", feat_xgetbv1
    PRINT_FLAG " rdtscp=", feat_rdtscp
    PRINT_FLAG " rdpid=", feat_rdpid
    PRINT_FLAG " fsgsbase=", feat_fsgsbase
    PRINT_FLAG " smap=", feat_smap
    PRINT_FLAG " pku=", feat_pku
    PRINT_FLAG " la57=", feat_la57
    PRINT " xcr0_supported="
    mov xcr0_supported(%rip), %rax
    call put_hex_rax_64
    call put_crlf_64
    ret

/* ---- IA32_TSC_AUX: WRMSR, then RDMSR, RDTSCP and RDPID read it back */
    .macro TSC_AUX_VALUE value
    mov $MSR_TSC_AUX, %ecx
    mov $\value, %eax
    xor %edx, %edx
    wrmsr
    xor %eax, %eax
    rdmsr
    mov $\value, %edx
    CHECK tscaux.rdmsr_\value
    IF_FEATURE feat_rdtscp, 1f
    mov $-1, %rcx
    rdtscp
    mov %rcx, %rax
    mov $\value, %edx
    CHECK tscaux.rdtscp_\value
1:  IF_FEATURE feat_rdpid, 2f
    mov $-1, %rax
    rdpid %rax
    mov $\value, %edx
    CHECK tscaux.rdpid_\value
2:
    .endm

test_tsc_aux:
    TSC_AUX_VALUE 10
    TSC_AUX_VALUE 256
    TSC_AUX_VALUE 0xdeadbeef
    cmpb $0, feat_rdtscp(%rip)
    jne 1f
    ARM 2f
    rdtscp
2:  OUTCOME tscaux.rdtscp_not_offered_ud, UD
1:  cmpb $0, feat_rdpid(%rip)
    jne 3f
    ARM 4f
    rdpid %rax
4:  OUTCOME tscaux.rdpid_not_offered_ud, UD
3:  ret

/* ---- XSAVE and its faults */
    .macro CPUID1_OSXSAVE            /* RAX = CPUID.1:ECX.OSXSAVE */
    mov $1, %eax
    cpuid
    mov %ecx, %eax
    shr $27, %eax
    and $1, %eax
    .endm

    .macro XSETBV_GP name, ecx_value, edx_value, eax_value
    mov $\ecx_value, %ecx
    mov $\edx_value, %edx
    mov $\eax_value, %eax
    ARM 1f
    xsetbv
1:  OUTCOME \name, GP0
    .endm

test_xsave:
    IF_FEATURE feat_xsave, xsave_not_offered
    CPUID1_OSXSAVE
    xor %edx, %edx
    CHECK osxsave.cpuid_clear_before_cr4
    xor %ecx, %ecx
    ARM 1f
    xgetbv
1:  OUTCOME xgetbv.without_osxsave_ud, UD
    xor %ecx, %ecx
    xor %edx, %edx
    mov $1, %eax
    ARM 1f
    xsetbv
1:  OUTCOME xsetbv.without_osxsave_ud, UD
    mov $-1, %eax
    mov $-1, %edx
    ARM 1f
    xsave xsave_area(%rip)
1:  OUTCOME xsave.without_osxsave_ud, UD
    ARM 1f
    xrstor xsave_area(%rip)
1:  OUTCOME xrstor.without_osxsave_ud, UD

    mov %cr4, %rax
    or $CR4_OSXSAVE, %eax
    mov %rax, %cr4
    CPUID1_OSXSAVE
    mov $1, %edx
    CHECK osxsave.cpuid_set_after_cr4

    xor %ecx, %ecx
    xgetbv
    shl $32, %rdx
    or %rdx, %rax
    mov $1, %edx
    CHECK xgetbv.xcr0_after_reset
    IF_FEATURE feat_xgetbv1, 2f
    mov $1, %ecx
    ARM 1f
    xgetbv
1:  OUTCOME xgetbv.ecx1_offered, NONE
    jmp 3f
2:  mov $1, %ecx
    ARM 1f
    xgetbv
1:  OUTCOME xgetbv.ecx1_not_offered_gp, GP0
3:  mov $2, %ecx
    ARM 1f
    xgetbv
1:  OUTCOME xgetbv.ecx2_gp, GP0

    XSETBV_GP xsetbv.ecx1_gp, 1, 0, 1
    XSETBV_GP xsetbv.x87_clear_gp, 0, 0, 2
    XSETBV_GP xsetbv.avx_without_sse_gp, 0, 0, 5
    XSETBV_GP xsetbv.reserved_bit10_gp, 0, 0, 0x403
    XSETBV_GP xsetbv.reserved_bit63_gp, 0, 0x80000000, 3
    /* every component CPUID.0xD.0 does not list is refused */
    mov xcr0_supported(%rip), %rax
    not %rax
    bsf %rax, %rcx                  /* the lowest bit not supported */
    mov $1, %eax
    shl %cl, %rax
    or xcr0_supported(%rip), %rax
    mov %rax, %rdx
    shr $32, %rdx
    xor %ecx, %ecx
    ARM 1f
    xsetbv
1:  OUTCOME xsetbv.unsupported_component_gp, GP0
    mov xcr0_supported(%rip), %rax  /* all supported components: accepted */
    mov %rax, %rdx
    shr $32, %rdx
    xor %ecx, %ecx
    ARM 1f
    xsetbv
1:  OUTCOME xsetbv.supported_components, NONE
    xor %ecx, %ecx
    xgetbv
    shl $32, %rdx
    or %rdx, %rax
    mov xcr0_supported(%rip), %rdx
    CHECK xgetbv.reads_xcr0_set
    xor %ecx, %ecx
    xor %edx, %edx
    mov $3, %eax
    xsetbv

    /* XSAVE / XRSTOR of x87 + SSE */
    mov $3, %eax
    xor %edx, %edx
    ARM 1f
    xsave xsave_area(%rip)
1:  OUTCOME xsave.aligned, NONE
    mov $3, %eax
    xor %edx, %edx
    ARM 1f
    xsave xsave_area + 16(%rip)
1:  OUTCOME xsave.misaligned_gp, GP0
    mov $3, %eax
    xor %edx, %edx
    ARM 1f
    xrstor xsave_area + 16(%rip)
1:  OUTCOME xrstor.misaligned_gp, GP0
    mov $3, %eax
    xor %edx, %edx
    ARM 1f
    xrstor xsave_area(%rip)
1:  OUTCOME xrstor.valid, NONE

    .macro XRSTOR_BAD_HEADER name, offset, value
    lea xsave_area(%rip), %rsi
    lea xsave_bad(%rip), %rdi
    mov $576 / 8, %ecx
    cld
    rep movsq
    mov $\value, %rax
    or %rax, xsave_bad + \offset(%rip)
    mov $3, %eax
    xor %edx, %edx
    ARM 1f
    xrstor xsave_bad(%rip)
1:  OUTCOME \name, GP0
    .endm

    XRSTOR_BAD_HEADER xrstor.xstate_bv_not_in_xcr0_gp, 512, 4
    XRSTOR_BAD_HEADER xrstor.header_reserved_gp, 528, 1
    XRSTOR_BAD_HEADER xrstor.compacted_without_xsavec_gp, 520, 0x8000000000000000

    /* CR0.TS: XSAVE and XRSTOR raise #NM, XGETBV does not care */
    mov %cr0, %rax
    or $CR0_TS, %eax
    mov %rax, %cr0
    mov $3, %eax
    xor %edx, %edx
    ARM 1f
    xsave xsave_area(%rip)
1:  NOTE xsave.cr0_ts             /* SDM: #NM (07); QEMU 7.2: none (ff) */
    mov $3, %eax
    xor %edx, %edx
    ARM 1f
    xrstor xsave_area(%rip)
1:  NOTE xrstor.cr0_ts
    xor %ecx, %ecx
    ARM 1f
    xgetbv
1:  OUTCOME xgetbv.cr0_ts_no_fault, NONE
    clts

    /* CPL 3: XSETBV #GP(0), XGETBV reads */
    call enter_ring3
    ret

    .pushsection .user_text, "ax"
user_xsetbv:
    xor %ecx, %ecx
    xor %edx, %edx
    mov $3, %eax
    xsetbv
    ud2                             /* not reached when the CPU gets it right */
    .popsection

xsave_not_offered:
    xor %ecx, %ecx
    ARM 1f
    xgetbv
1:  OUTCOME xgetbv.not_offered_ud, UD
    ret

/* Run user_xsetbv in ring 3; the #GP handler comes back to user_xsetbv_done in ring 0. */
enter_ring3:
    mov %rsp, ring0_rsp(%rip)
    movb $1, resume_ring0(%rip)
    ARM user_xsetbv_done
    push $SEL_UDATA | 3
    mov $user_stack_top, %eax
    push %rax
    push $0x2
    push $SEL_UCODE64 | 3
    mov $user_xsetbv, %eax
    push %rax
    iretq
user_xsetbv_done:
    movb $0, resume_ring0(%rip)
    mov ring0_rsp(%rip), %rsp
    mov $SEL_KDATA, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov outcome(%rip), %rax
    movq $0, resume_rip(%rip)
    mov $GP0, %edx
    CHECK xsetbv.cpl3_gp
    ret

/* ---- CR4 bits the CPU does not offer */
    .macro CR4_BIT name, bit, flag, offered_outcome, missing_outcome
    cmpb $0, \flag(%rip)
    je 2f
    mov $\offered_outcome, %ebx
    jmp 3f
2:  mov $\missing_outcome, %ebx
3:  mov %cr4, %r12
    mov %r12, %rax
    mov $\bit, %ecx
    or %rcx, %rax
    ARM 1f
    mov %rax, %cr4
1:  mov %r12, %cr4                  /* back as it was, whatever happened */
    movq $0, resume_rip(%rip)
    mov outcome(%rip), %rax
    mov %rbx, %rdx
    CHECK \name
    .endm

test_cr4:
    /* QEMU 7.2 TCG livelocks on a CR4 write with a bit reserved for its CPU model (it
       takes the SVM "VMRUN error" exit outside a guest and restarts the instruction) */
    IF_FEATURE on_qemu_tcg, 1f
    PRINT "SKIP cr4: reserved bits hang QEMU 7.2 TCG\r\n"
    ret
1:  /* LA57 cannot change in long mode, offered or not */
    CR4_BIT cr4.la57_in_long_mode_gp, CR4_LA57, feat_la57, GP0, GP0
    CR4_BIT cr4.smap, CR4_SMAP, feat_smap, NONE, GP0
    CR4_BIT cr4.pke, CR4_PKE, feat_pku, NONE, GP0
    CR4_BIT cr4.reserved_bit31_gp, 0x80000000, feat_la57, GP0, GP0
    ret

/* ---- SMAP and PKU: supervisor access to a user page, protection keys (or #UD without) */
    .macro READ_PROBE name, want    /* a supervisor read of the user page */
    ARM 1f
    mov user_probe(%rip), %rax
1:  OUTCOME \name, \want
    .endm

test_smap_pku:
    IF_FEATURE feat_smap, 2f
    mov %cr4, %rax
    or $CR4_SMAP, %eax
    mov %rax, %cr4
    READ_PROBE smap.supervisor_read_of_user_page_pf, 0x10e  /* #PF, P */
    ARM 1f
    movq $1, user_probe(%rip)
1:  OUTCOME smap.supervisor_write_of_user_page_pf, 0x30e    /* #PF, P | W */
    stac
    READ_PROBE smap.read_with_ac_set, NONE
    clac
    READ_PROBE smap.read_after_clac_pf, 0x10e
    mov %cr4, %rax
    and $~CR4_SMAP, %eax
    mov %rax, %cr4
    READ_PROBE smap.read_with_cr4_smap_clear, NONE
    jmp 3f
2:  ARM 1f
    stac
1:  OUTCOME smap.stac_not_offered_ud, UD
    ARM 1f
    clac
1:  OUTCOME smap.clac_not_offered_ud, UD
3:  IF_FEATURE feat_pku, 2f
    call test_pku
    jmp 3f
2:  xor %ecx, %ecx
    ARM 1f
    rdpkru
1:  OUTCOME pku.rdpkru_not_offered_ud, UD
3:  ret

    .macro OSPKE_BIT                /* RAX = CPUID.7.0:ECX.OSPKE */
    mov $7, %eax
    xor %ecx, %ecx
    cpuid
    mov %ecx, %eax
    shr $4, %eax
    and $1, %eax
    .endm

    .macro PKRU_IS name, value
    xor %ecx, %ecx
    rdpkru
    mov $\value, %edx
    CHECK \name
    .endm

    .macro SET_PKRU value
    xor %ecx, %ecx
    xor %edx, %edx
    mov $\value, %eax
    wrpkru
    .endm

/* Protection key 1 on the user page; PKRU.AD1 (bit 2) forbids reading it, in ring 0 too. */
test_pku:
    OSPKE_BIT
    xor %edx, %edx
    CHECK pku.cpuid_ospke_clear_before_cr4
    xor %ecx, %ecx
    ARM 1f
    rdpkru
1:  OUTCOME pku.rdpkru_without_cr4_pke_ud, UD
    mov %cr4, %rax
    or $CR4_PKE, %eax
    mov %rax, %cr4
    OSPKE_BIT
    mov $1, %edx
    CHECK pku.cpuid_ospke_set_after_cr4
    PKRU_IS pku.pkru_after_reset, 0
    mov $user_probe, %ebx
    shr $12, %ebx
    mov $1 << 59, %rax              /* PTE bits 62:59: the page's protection key */
    mov $pt0, %edx
    or %rax, (%rdx,%rbx,8)
    mov $user_probe, %eax
    invlpg (%rax)
    READ_PROBE pku.key1_read_allowed, NONE
    SET_PKRU 4
    PKRU_IS pku.wrpkru_rdpkru, 4
    READ_PROBE pku.key1_access_disabled_pf, 0x210e      /* #PF, P | PK */
    SET_PKRU 8                        /* WD1: writes refused, reads allowed */
    READ_PROBE pku.key1_write_disabled_read_allowed, NONE
    ARM 1f
    movq $1, user_probe(%rip)
1:  OUTCOME pku.key1_write_disabled_write_pf, 0x230e    /* #PF, P | W | PK */
    SET_PKRU 0
    mov $1, %ecx
    ARM 1f
    rdpkru
1:  OUTCOME pku.rdpkru_ecx1_gp, GP0
    mov $1, %ecx
    xor %edx, %edx
    xor %eax, %eax
    ARM 1f
    wrpkru
1:  OUTCOME pku.wrpkru_ecx1_gp, GP0
    mov $user_probe, %ebx
    shr $12, %ebx
    mov $~(0xf << 59), %rax
    mov $pt0, %edx
    and %rax, (%rdx,%rbx,8)
    mov $user_probe, %eax
    invlpg (%rax)
    mov %cr4, %rax
    and $~CR4_PKE, %eax
    mov %rax, %cr4
    ret

/* ---- non-canonical bases */
test_canonical:
    sgdt saved_gdtr(%rip)
    sidt saved_idtr(%rip)
    mov saved_gdtr(%rip), %ax
    mov %ax, bad_gdtr(%rip)
    mov saved_idtr(%rip), %ax
    mov %ax, bad_idtr(%rip)
    ARM 1f
    lgdt bad_gdtr(%rip)
1:  lgdt saved_gdtr(%rip)
    NOTE lgdt.noncanonical          /* SDM: #GP(0) (0d); QEMU 7.2: none (ff) */
    ARM 1f
    lidt bad_idtr(%rip)
1:  lidt saved_idtr(%rip)
    NOTE lidt.noncanonical

    .macro MSR_BASE name, msr
    mov $\msr, %ecx
    xor %eax, %eax
    mov $0x80000000, %edx
    ARM 1f
    wrmsr
1:  mov $\msr, %ecx
    xor %eax, %eax
    xor %edx, %edx
    wrmsr
    NOTE \name
    .endm
    MSR_BASE wrmsr.fs_base_noncanonical, MSR_FS_BASE
    MSR_BASE wrmsr.gs_base_noncanonical, MSR_GS_BASE
    MSR_BASE wrmsr.kernel_gs_base_noncanonical, MSR_KERNEL_GS
    IF_FEATURE feat_fsgsbase, 3f
    mov %cr4, %rax
    or $CR4_FSGSBASE, %eax
    mov %rax, %cr4
    mov $0x8000000000000000, %rax
    ARM 1f
    wrfsbase %rax
1:  xor %eax, %eax
    wrfsbase %rax
    NOTE wrfsbase.noncanonical
    mov $0x8000000000000000, %rax
    ARM 1f
    wrgsbase %rax
1:  xor %eax, %eax
    wrgsbase %rax
    NOTE wrgsbase.noncanonical
3:  mov $SEL_TSS_BAD, %ax
    ARM 1f
    ltr %ax
1:  NOTE ltr.noncanonical_base
    ret

/* ------------------------------------------------------------------ IDT and handlers */
idt64_init:
    xor %eax, %eax
1:  mov $fatal_other, %edx
    cmp $32, %eax
    jae 2f
    mov $exc_stubs, %edx
    mov (%rdx,%rax,4), %edx
2:  mov %eax, %ebx
    shl $4, %ebx
    add $idt64, %ebx
    mov %dx, (%rbx)
    movw $SEL_KCODE64, 2(%rbx)
    movw $0x8e00, 4(%rbx)           /* interrupt gate, DPL0 */
    shr $16, %edx
    mov %dx, 6(%rbx)
    movq $0, 8(%rbx)
    inc %eax
    cmp $256, %eax
    jb 1b
    lidt idt64_desc(%rip)
    ret

#include "exc_stubs.h"

fatal_other:
    push $0
    push $0xff
/* Frame: vector, error code, RIP, CS, RFLAGS, RSP, SS. */
exc_common:
    push %rax
    push %rbp
    lea 16(%rsp), %rbp
    mov resume_rip(%rip), %rax
    test %rax, %rax
    jz 2f
    mov %rax, 16(%rbp)
    mov 8(%rbp), %rax
    shl $8, %rax
    or (%rbp), %rax
    mov %rax, outcome(%rip)
    movq $0, resume_rip(%rip)
    cmpb $0, resume_ring0(%rip)
    je 1f
    movq $SEL_KCODE64, 24(%rbp)     /* come back to ring 0 (the resume code reloads RSP) */
    movq $SEL_KDATA, 48(%rbp)
    mov ring0_rsp(%rip), %rax
    mov %rax, 40(%rbp)
1:  pop %rbp
    pop %rax
    add $16, %rsp
    iretq
2:  mov $str_fatal, %esi
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
    call put_crlf_64
    mov $3, %al
    jmp debug_exit_64

/* ------------------------------------------------------------------ data */
    .section .user_data, "aw"
    .balign 16
user_probe:                         /* a user page the supervisor reads (SMAP, PKU) */
    .quad 0x5a5a5a5a5a5a5a5a
    .balign 16
user_stack_bottom:
    .skip 4096
user_stack_top:

    .data
    .balign 8
gdt64:
    .quad 0
    .quad 0x00af9a000000ffff        /* 0x08 kernel code, 64-bit */
    .quad 0x00cf92000000ffff        /* 0x10 kernel data */
    .quad 0x00cffa000000ffff        /* 0x18 user code, 32-bit */
    .quad 0x00cff2000000ffff        /* 0x20 user data */
    .quad 0x00affa000000ffff        /* 0x28 user code, 64-bit */
    .quad 0, 0                      /* 0x30 TSS, filled in by main */
    .quad 0, 0                      /* 0x40 TSS with a non-canonical base */
gdt64_end:
    .balign 2
gdt64_desc:
    .word gdt64_end - gdt64 - 1
    .long gdt64
    .balign 2
bad_gdtr:   .word 0                 /* limit copied from SGDT */
            .quad 0x8000000000000000
    .balign 2
bad_idtr:   .word 0
            .quad 0x8000000000000000

    .section .rodata
    .balign 2
idt64_desc:
    .word 256 * 16 - 1
    .long idt64, 0
str_fatal:      .asciz "FATAL vector="
str_err:        .asciz " err="
str_rip:        .asciz " rip="

    .bss
    .balign 4096
pml4:   .skip 4096
pdpt:   .skip 4096
pd0:    .skip 4096
pt0:    .skip 4096
idt64:  .skip 256 * 16
    .balign 64
xsave_area:     .skip 4096
xsave_bad:      .skip 4096
    .balign 16
tss64:  .skip 104
    .balign 16
rsp0_stack_bottom:  .skip 4096
rsp0_stack_top:
    .balign 8
resume_rip:     .quad 0
outcome:        .quad 0
ring0_rsp:      .quad 0
xcr0_supported: .quad 0
cpuid_out:      .skip 16
saved_gdtr:     .skip 16
saved_idtr:     .skip 16
resume_ring0:   .byte 0
feat_xsave:     .byte 0
feat_xgetbv1:   .byte 0
feat_rdtscp:    .byte 0
feat_rdpid:     .byte 0
feat_fsgsbase:  .byte 0
feat_smap:      .byte 0
feat_pku:       .byte 0
feat_la57:      .byte 0
on_qemu_tcg:    .byte 0

/*
 * The 32-bit steps of entering long mode that the 64-bit test guests share (assembler
 * macros, so that each guest keeps its own GDT, TSS, page tables and labels).
 *
 * TSS64_DESCRIPTOR desc, tss: an available 64-bit TSS descriptor (present, DPL 0, limit
 * 103) for ``tss`` in the 16 bytes at ``desc``; the base's bits 63:32 stay as they are.
 * ENTER_LONG_MODE efer, cr0, pml4, cs, target: CR4.PAE, CR3 = pml4, EFER |= efer (LME and
 * more), CR0 |= cr0 (PG, PE and more), then a far jump to cs:target in 64-bit code.
 * ENTER_LONG_MODE clobbers EAX, ECX and EDX; TSS64_DESCRIPTOR clobbers EAX.
 * LONG_MODE_SEGMENTS data, tss, stack_top (64-bit code, first thing after the far jump): DS,
 * ES and SS = ``data``, FS = GS = null, RSP = ``stack_top``, TR = ``tss``.  Clobbers EAX.
 * MAP_FIRST_GIB pml4, pdpt, pd0, pt0: identity-map the first GiB through those tables (4 KiB
 * pages in the first 2 MiB, page 0 left out, 2 MiB pages above), supervisor pages except
 * __user_start..__user_end, which get the user bit.  Clobbers EAX, ECX and EDX.
 * IDT64_SET_FUNCTION idt, cs: the function idt64_set (64-bit code): the interrupt gate for
 * vector EAX in the 16-byte entries at ``idt``, handler EDX in segment ``cs``, type and
 * attributes CL, IST index CH.
 */
    .macro TSS64_DESCRIPTOR desc, tss
    mov $\tss, %eax
    movw $103, \desc
    mov %ax, \desc + 2
    shr $16, %eax
    mov %al, \desc + 4
    movb $0x89, \desc + 5          /* present, DPL0, available 64-bit TSS */
    mov %ah, \desc + 7
    .endm

    .macro ENTER_LONG_MODE efer, cr0, pml4, cs, target
    mov %cr4, %eax
    or $0x20, %eax                  /* PAE */
    mov %eax, %cr4
    mov $\pml4, %eax
    mov %eax, %cr3
    mov $MSR_EFER, %ecx
    rdmsr
    or $\efer, %eax
    wrmsr
    mov %cr0, %eax
    or $\cr0, %eax
    mov %eax, %cr0
    ljmp $\cs, $\target
    .endm

    .macro IDT64_SET_FUNCTION idt, cs
idt64_set:
    push %rax
    push %rbx
    mov %eax, %ebx
    shl $4, %ebx
    add $\idt, %ebx
    mov %dx, (%rbx)
    movw $\cs, 2(%rbx)
    mov %ch, 4(%rbx)
    mov %cl, 5(%rbx)
    mov %edx, %eax
    shr $16, %eax
    mov %ax, 6(%rbx)
    movl $0, 8(%rbx)
    movl $0, 12(%rbx)
    pop %rbx
    pop %rax
    ret
    .endm

    .macro MAP_FIRST_GIB pml4, pdpt, pd0, pt0
    mov $\pdpt, %eax
    or $PTE_P | PTE_RW | PTE_US, %eax
    mov %eax, \pml4
    mov $\pd0, %eax
    or $PTE_P | PTE_RW | PTE_US, %eax
    mov %eax, \pdpt
    mov $\pt0, %eax
    or $PTE_P | PTE_RW | PTE_US, %eax
    mov %eax, \pd0
    mov $1, %ecx
1:  mov %ecx, %eax
    shl $21, %eax
    or $PTE_P | PTE_RW | PTE_PS, %eax
    mov %eax, \pd0(,%ecx,8)
    inc %ecx
    cmp $512, %ecx
    jb 1b
    mov $1, %ecx
2:  mov %ecx, %eax
    shl $12, %eax
    or $PTE_P | PTE_RW, %eax
    mov %eax, \pt0(,%ecx,8)
    inc %ecx
    cmp $512, %ecx
    jb 2b
    mov $__user_start, %ecx
    shr $12, %ecx
    mov $__user_end, %edx
    shr $12, %edx
3:  cmp %edx, %ecx
    jae 4f
    orl $PTE_US, \pt0(,%ecx,8)
    inc %ecx
    jmp 3b
4:
    .endm

    .macro LONG_MODE_SEGMENTS data, tss, stack_top
    mov $\data, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    xor %eax, %eax
    mov %ax, %fs
    mov %ax, %gs
    mov $\stack_top, %esp
    mov $\tss, %ax
    ltr %ax
    .endm

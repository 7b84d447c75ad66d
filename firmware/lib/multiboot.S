/*
 * Multiboot v1 header and 32-bit entry shared by every kernel guest.
 *
 * The loader enters here in flat 32-bit protected mode with paging and interrupts off,
 * EAX = 0x2badb002 and EBX = the multiboot information structure.  The entry copies
 * the command line, installs its own flat GDT (the loader's may be anywhere), clears
 * .bss, sets up a stack and COM1, and calls main.  main returns the exit value in AL,
 * which goes to isa-debug-exit.
 */
#include "defs.h"

    .section .multiboot, "a"
    .balign 4
    .long MB_HEADER_MAGIC
    .long 0                         /* flags: ELF image, nothing requested */
    .long -MB_HEADER_MAGIC

    .text
    .code32
    .globl _start
_start:
    cli
    cld
    /* Command line into cmdline_buf (in .data, so clearing .bss keeps it). */
    cmp $MB_BOOT_MAGIC, %eax
    jne 2f
    testl $MB_INFO_CMDLINE, (%ebx)
    jz 2f
    mov 16(%ebx), %esi
    mov $cmdline_buf, %edi
    mov $CMDLINE_MAX - 1, %ecx
1:  lodsb
    test %al, %al
    jz 2f
    stosb
    loop 1b
2:  lgdt gdt_flat_desc
    ljmp $SEL_CODE32, $3f
3:  mov $SEL_DATA32, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %fs
    mov %ax, %gs
    mov %ax, %ss
    mov $__bss_start, %edi
    mov $__bss_end, %ecx
    sub %edi, %ecx
    shr $2, %ecx
    xor %eax, %eax
    rep stosl
    mov $boot_stack_top, %esp
    call uart_init
    call main
    jmp debug_exit

    .data
    .globl cmdline_buf
cmdline_buf:
    .fill CMDLINE_MAX, 1, 0

    .section .rodata
    .balign 8
gdt_flat:
    .quad 0
    .quad 0x00cf9a000000ffff        /* 0x08: code, base 0, 4 GiB, 32-bit, DPL0 */
    .quad 0x00cf92000000ffff        /* 0x10: data, base 0, 4 GiB, DPL0 */
gdt_flat_end:
gdt_flat_desc:
    .word gdt_flat_end - gdt_flat - 1
    .long gdt_flat

    .bss
    .balign 16
    .globl boot_stack_bottom, boot_stack_top
boot_stack_bottom:
    .skip 16384
boot_stack_top:

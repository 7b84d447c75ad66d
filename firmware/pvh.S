/*
 * A PVH kernel (Xen's x86/HVM direct boot ABI, as QEMU boots an ELF with -kernel): no
 * multiboot header, only an ELF note XEN_ELFNOTE_PHYS32_ENTRY naming the 32-bit entry.  It
 * checks what the ABI promises and prints what the loader handed over: the hvm_start_info
 * magic and version, protected mode with paging off, the command line, RAM at 0 and at
 * 1 MiB in the memory map, and the first module (-initrd) as text.  Standalone (no lib/ objects),
 * linked with plain `ld -m elf_i386 -Ttext=0x100000`; COM1 by polling, exit through 0xf4.
 */
#define START_INFO_MAGIC 0x336ec578

    .section .note.Xen, "a", @note
    .balign 4
    .long 4, 4, 18                  /* namesz, descsz, XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long pvh_start

    .text
    .code32
    .globl pvh_start
pvh_start:
    cli
    mov $0x7000, %esp
    mov %ebx, %ebp                  /* hvm_start_info */
    cmpl $START_INFO_MAGIC, (%ebp)
    jne fail
    cmpl $1, 4(%ebp)                /* version 1: the memory map fields exist */
    jb fail
    mov $msg_magic, %esi
    call puts
    mov %cr0, %eax
    and $0x80000001, %eax
    cmp $1, %eax                    /* PE on, PG off */
    jne fail
    mov $msg_mode, %esi
    call puts
    /* the command line */
    mov $msg_cmdline, %esi
    call puts
    mov 24(%ebp), %esi              /* cmdline_paddr (low half) */
    call puts
    mov $msg_close, %esi
    call puts
    /* the memory map: an entry of type 1 (RAM) at 0, and one at 1 MiB */
    mov 40(%ebp), %esi              /* memmap_paddr */
    mov 48(%ebp), %ecx              /* memmap_entries */
    xor %edi, %edi                  /* bit 0: RAM at 0, bit 1: RAM at 1 MiB */
1:  test %ecx, %ecx
    jz 3f
    cmpl $1, 16(%esi)
    jne 2f
    cmpl $0, 4(%esi)
    jne 2f
    cmpl $0, (%esi)
    jne 4f
    or $1, %edi
4:  cmpl $0x100000, (%esi)
    jne 2f
    or $2, %edi
2:  add $24, %esi
    dec %ecx
    jmp 1b
3:  cmp $3, %edi
    jne fail
    mov $msg_memmap, %esi
    call puts
    /* the modules */
    mov 12(%ebp), %ecx              /* nr_modules */
    test %ecx, %ecx
    jz done
    mov $msg_module, %esi
    call puts
    mov 16(%ebp), %ebx              /* modlist_paddr */
    mov (%ebx), %esi                /* first module: paddr */
    mov 8(%ebx), %ecx               /* size */
5:  test %ecx, %ecx
    jz 6f
    lodsb
    cmp $'\n', %al
    je 6f
    call putc
    dec %ecx
    jmp 5b
6:  mov $msg_close, %esi
    call puts
done:
    mov $msg_done, %esi
    call puts
    xor %al, %al
    out %al, $0xf4
    hlt
fail:
    mov $msg_fail, %esi
    call puts
    mov $1, %al
    out %al, $0xf4
    hlt

#include "polled_puts.h"

    .section .rodata
msg_magic:   .asciz "pvh: start info magic and version ok\r\n"
msg_mode:    .asciz "pvh: protected mode, paging off\r\n"
msg_cmdline: .asciz "pvh: cmdline ["
msg_close:   .asciz "]\r\n"
msg_memmap:  .asciz "pvh: memory map has RAM at 0 and at 1 MiB\r\n"
msg_module:  .asciz "pvh: module ["
msg_done:    .asciz "pvh: done\r\n"
msg_fail:    .asciz "pvh: FAIL\r\n"

/*
 * A first kernel as tutorials write it: the multiboot header at the start of .text and the
 * image linked with plain `ld -m elf_i386 -Ttext=0x100000`, no linker script.  binutils'
 * default layout (separate code, 2.31 and later) then adds a read-only PT_LOAD holding only
 * the ELF and program headers at 0xff000, inside the BIOS area: a loader must leave those
 * bytes out (QEMU's copy there hits the read-only BIOS shadow) and run the kernel.
 * Standalone (no lib/ objects): prints on COM1 by polling LSR.THRE, exits through port 0xf4.
 */
    .text
    .code32
    .balign 4
    .long 0x1BADB002, 0, -0x1BADB002

    .globl _start
_start:
    cli
    mov $0x7000, %esp
    xor %edi, %edi                  /* the exit value */
    mov $msg_running, %esi
    cmp $0x2BADB002, %eax
    je 1f
    mov $msg_magic, %esi
    inc %edi
1:  call puts
    mov %edi, %eax
    out %al, $0xf4
    hlt

#include "polled_puts.h"

    .section .rodata
msg_running: .asciz "mbplain: running at 1 MiB\r\n"
msg_magic:   .asciz "mbplain: bad boot magic in EAX\r\n"

/*
 * A multiboot kernel in conventional memory: text at 0x8000, data from 0x8100 to 0xa84b,
 * over the page at 0x9000 where QEMU's loader puts the multiboot information.  The kernel
 * image must arrive whole: the guest checks its code and every byte of its data pattern.
 * It does not read the information structure (under QEMU, EBX then points at kernel
 * bytes).  Standalone (no lib/ objects): COM1 by polling, exit through port 0xf4.
 */
#define PATTERN_BYTES (0xa84c - 0x8100 - 4)

    .text
    .code32
    .balign 4
    .long 0x1BADB002, 0, -0x1BADB002

    .globl _start
_start:
    cli
    mov $0x7000, %esp
    /* the data: a 0x5a pattern up to 0xa84b, then the end marker */
    mov $pattern, %esi
    mov $PATTERN_BYTES, %ecx
1:  lodsb
    cmp $0x5a, %al
    jne broken
    loop 1b
    cmpl $0x454e4421, (%esi)     /* "!DNE" */
    jne broken
    mov $msg_intact, %esi
    call puts
    xor %al, %al
    out %al, $0xf4
    hlt
broken:
    mov $msg_broken, %esi
    call puts
    mov $1, %al
    out %al, $0xf4
    hlt

#include "polled_puts.h"

msg_intact: .asciz "mblow: image intact\r\n"
msg_broken: .asciz "mblow: image damaged\r\n"

    .data
pattern:
    .fill PATTERN_BYTES, 1, 0x5a
    .long 0x454e4421

/*
 * tripleloop.rom: a -bios image that triple-faults at once, on every boot.
 *
 * From the reset vector it writes one 'R' to COM1 (a boot count the host can read), loads
 * an IVT limit of 0 and executes int3: vector 3 lies beyond the limit (#GP), so does #GP
 * itself (#GP while delivering #GP: #DF), and so does #DF: a triple fault, which resets
 * the machine, which boots this ROM again.  Under -no-reboot the first one ends the run
 * (exit status 0 on QEMU); otherwise it resets for ever, a few hundred times a second.
 */
#include "defs.h"

    .text
    .code16
start:
    mov $'R', %al
    mov $COM1 + UART_THR, %dx
    out %al, %dx
    lidt %cs:ivt_none
    int3
    jmp start                       /* not reached */

ivt_none:
    .word 0                         /* limit 0: no vector fits */
    .long 0

    .section .reset, "ax"
    .globl reset_vector
reset_vector:
    ljmp $0xf000, $start

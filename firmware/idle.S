/*
 * idle.elf: PIT at 100 Hz, sti;hlt until "ticks=N" IRQ0 ticks (default 200, 2 s) have
 * been counted, then prints "idle ticks=<N>\r\n" and exits with 0.
 */
#include "defs.h"

    .text
    .code32
    .globl main
main:
    mov $key_ticks, %esi
    call cmdline_uint
    jnc 1f
    mov $200, %eax
1:  mov %eax, %ecx
    call interrupts_init
    mov $IRQ_BASE, %eax
    mov $irq0_count, %edx
    push %ecx
    mov $0x8e, %cl
    call idt32_set
    pop %ecx
    mov $PIT_DIV_100HZ, %eax
    call pit_periodic
    xor %eax, %eax
    call pic_unmask
2:  cli
    cmp %ecx, irq0_ticks
    jae 3f
    sti
    hlt
    jmp 2b
3:  call pic_mask_all
    mov $str_idle, %esi
    call puts
    mov %ecx, %eax
    call put_dec32
    call put_crlf
    xor %eax, %eax
    ret

    .section .rodata
key_ticks:  .asciz "ticks="
str_idle:   .asciz "idle ticks="

    .bss
    .balign 4

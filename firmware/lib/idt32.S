/*
 * A 256-entry protected-mode IDT for the 32-bit guests.
 *
 * idt32_init fills every vector: CPU exceptions report "FATAL vector=.. err=.. eip=.."
 * and exit with 3, the 16 PIC vectors (IRQ_BASE..IRQ_BASE+15) return at once
 * (that is what a spurious IRQ7/IRQ15 needs; other lines stay masked unless a guest
 * installs a handler) and so does the local APIC spurious vector 0xff; anything else
 * is fatal.  Guests then install their own gates.
 */
#include "defs.h"

#define GATE_INT32      0x8e        /* present, DPL0, 32-bit interrupt gate */

    .text
    .code32

/* An IRQ0 handler for the timer guests: counts ticks in irq0_ticks and acknowledges the
   master PIC. */
    .globl irq0_count
irq0_count:
    push %eax
    incl irq0_ticks
    mov $PIC_EOI, %al
    out %al, $PIC1_CMD
    pop %eax
    iret

/* Install handler EDX for vector EAX with type/attribute byte CL (e.g. 0x8e, 0xee, 0x8f). */
    .globl idt32_set
idt32_set:
    push %eax
    push %ebx
    lea idt32(,%eax,8), %ebx
    mov %dx, (%ebx)
    movw $SEL_CODE32, 2(%ebx)
    movb $0, 4(%ebx)
    mov %cl, 5(%ebx)
    mov %edx, %eax
    shr $16, %eax
    mov %ax, 6(%ebx)
    pop %ebx
    pop %eax
    ret

    .globl idt32_init
idt32_init:
    push %eax
    push %ecx
    push %edx
    xor %eax, %eax
    mov $GATE_INT32, %cl
1:  mov $fatal_other, %edx
    cmp $32, %eax
    jae 2f
    mov fatal_stubs(,%eax,4), %edx
2:  cmp $0xff, %eax                /* local APIC spurious vector */
    je 3f
    cmp $IRQ_BASE, %eax
    jb 4f
    cmp $IRQ_BASE + 15, %eax
    ja 4f
3:  mov $irq_ignore, %edx
4:  call idt32_set
    inc %eax
    cmp $256, %eax
    jb 1b
    lidt idt32_desc
    pop %edx
    pop %ecx
    pop %eax
    ret

irq_ignore:
    iret

/* Vectors that push an error code: #DF, #TS, #NP, #SS, #GP, #PF, #AC, #CP, #VC, #SX. */

    .macro FATAL_STUB v
fatal_stub_\v:
    .if HAS_ERROR_CODE(\v) == 0
    push $0
    .endif
    push $\v
    jmp fatal_common
    .pushsection .rodata
    .long fatal_stub_\v
    .popsection
    .endm

    .section .rodata
    .balign 4
fatal_stubs:
    .text
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    FATAL_STUB \v
    .endr

fatal_other:
    push $0
    push $0xff                      /* vector unknown: reported as 0xff */
fatal_common:
    mov $SEL_DATA32, %ax
    mov %ax, %ds
    mov %ax, %es
    mov $str_fatal, %esi
    call puts
    mov (%esp), %eax
    call put_hex8
    mov $str_err, %esi
    call puts
    mov 4(%esp), %eax
    call put_hex32
    mov $str_eip, %esi
    call puts
    mov 8(%esp), %eax
    call put_hex32
    call put_crlf
    mov $3, %al
    jmp debug_exit

    .section .rodata
str_fatal:  .asciz "FATAL vector="
str_err:    .asciz " err="
str_eip:    .asciz " eip="

    .bss
    .balign 4
    .globl irq0_ticks
irq0_ticks:
    .skip 4
    .balign 8
    .globl idt32
idt32:
    .skip 256 * 8

    .section .rodata
    .balign 2
idt32_desc:
    .word 256 * 8 - 1
    .long idt32

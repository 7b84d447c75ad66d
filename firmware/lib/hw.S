/*
 * 8259A, 8254 and isa-debug-exit helpers.
 */
#include "bits.h"
#include "defs.h"

    .text
    CODE_MODE

/*
 * Initialise both PICs: edge triggered, cascaded on IRQ2, 8086 mode, every line masked.
 * In: AL = master vector base, AH = slave vector base.
 */
    .globl FN(pic_init)
FN(pic_init):
    push WAX
    push WCX
    mov %eax, %ecx
    mov $0x11, %al                  /* ICW1: edge, cascade, ICW4 follows */
    out %al, $PIC1_CMD
    out %al, $PIC2_CMD
    mov %cl, %al                    /* ICW2: vector bases */
    out %al, $PIC1_DATA
    mov %ch, %al
    out %al, $PIC2_DATA
    mov $0x04, %al                  /* ICW3: slave on IRQ2 */
    out %al, $PIC1_DATA
    mov $0x02, %al                  /* ICW3: slave identity 2 */
    out %al, $PIC2_DATA
    mov $0x01, %al                  /* ICW4: 8086 mode, normal EOI */
    out %al, $PIC1_DATA
    out %al, $PIC2_DATA
    mov $0xff, %al                  /* OCW1: mask everything */
    out %al, $PIC1_DATA
    out %al, $PIC2_DATA
    pop WCX
    pop WAX
    ret

/* Unmask IRQ AL (0-15); a slave line also unmasks the cascade IRQ2. */
    .globl FN(pic_unmask)
FN(pic_unmask):
    push WAX
    push WCX
    mov %al, %cl
    cmp $8, %cl
    jae 1f
    in $PIC1_DATA, %al
    btr %ecx, %eax
    out %al, $PIC1_DATA
    jmp 2f
1:  sub $8, %cl
    in $PIC2_DATA, %al
    btr %ecx, %eax
    out %al, $PIC2_DATA
    in $PIC1_DATA, %al
    and $0xfb, %al
    out %al, $PIC1_DATA
2:  pop WCX
    pop WAX
    ret

    .globl FN(pic_mask_all)
FN(pic_mask_all):
    push WAX
    mov $0xff, %al
    out %al, $PIC1_DATA
    out %al, $PIC2_DATA
    pop WAX
    ret

/* Non-specific EOI for IRQ AL (to both chips for a slave line). */
    .globl FN(pic_eoi)
FN(pic_eoi):
    push WAX
    cmp $8, %al
    mov $PIC_EOI, %al
    jb 1f
    out %al, $PIC2_CMD
1:  out %al, $PIC1_CMD
    pop WAX
    ret

/* PIT channel 0 as a rate generator (mode 2). In: EAX = 16-bit divisor (0 = 65536). */
    .globl FN(pit_periodic)
FN(pit_periodic):
    push WAX
    push WDX
    mov %eax, %edx
    mov $0x34, %al                  /* channel 0, lobyte/hibyte, mode 2, binary */
    out %al, $PIT_CMD
    mov %dl, %al
    out %al, $PIT_CH0
    mov %dh, %al
    out %al, $PIT_CH0
    pop WDX
    pop WAX
    ret

/*
 * Leave through isa-debug-exit with AL as the value (QEMU status (AL << 1) | 1).
 * Halts for good if the device is absent.
 */
    .globl FN(debug_exit)
FN(debug_exit):
    out %al, $DEBUG_EXIT_PORT
1:  cli
    hlt
    jmp 1b

#if BITS != 16
/*
 * Route the 8259A through the local APIC ("virtual wire" mode of the MP spec): after
 * reset the APIC is globally enabled but LINT0 is masked, so PIC interrupts would not
 * reach the CPU.  Software-enables the APIC (spurious vector 0xff), LINT0 = ExtINT,
 * LINT1 = NMI.  Must run while the APIC page is reachable (paging off, or mapped).
 */
    .globl FN(lapic_virtual_wire)
FN(lapic_virtual_wire):
    push WAX
    push WCX
    push WDX
    push WBX
    mov $0x1b, %ecx                 /* IA32_APIC_BASE */
    rdmsr
    or $0x800, %eax                 /* global enable (already set after reset) */
    wrmsr
    and $0xfffff000, %eax
    mov %eax, %ebx
    movl $0x1ff, 0xf0(WBX)          /* SVR: software enable, spurious vector 0xff */
    movl $0x700, 0x350(WBX)         /* LVT LINT0: ExtINT, edge, unmasked */
    movl $0x400, 0x360(WBX)         /* LVT LINT1: NMI */
    pop WBX
    pop WDX
    pop WCX
    pop WAX
    ret
#endif

/*
 * realmode.rom: a 64 KiB BIOS image (-bios) that stays in real mode.
 *
 * The CPU starts at F000:FFF0 and jumps to start.  With no BIOS underneath, it sets up
 * a stack, COM1, an interrupt vector table, the 8259A pair (vector bases 0x08 / 0x70,
 * as a PC BIOS does) and the PIT at 1000 Hz, then checks: IRQ0 ticks through the IVT
 * while idling with sti;hlt, a software interrupt int 0x21 (IF cleared inside, return
 * address on the stack), and #DE from a division by zero, whose handler moves the saved
 * IP past the div (on a 286 or later the saved IP points at the div itself).  Output:
 * "PASS <name>" / "FAIL <name> ..." lines, then "ALL PASS" and exit 0, or "FAILED <n>"
 * and exit 1; an interrupt with no handler prints "FATAL ..." and exits 3.
 *
 * Segments: DS = F000 (the ROM, for strings), ES = 0 (RAM variables), SS:SP = 0:7000.
 */
#include "defs.h"

#define ROM_SEG             0xf000
#define STACK_TOP           0x7000
#define RAM_VARS            0x500       /* first free byte after the BIOS data area */
#define RAM_TICKS           (RAM_VARS + 0x00)
#define RAM_SHADOW          (RAM_VARS + 0x02)
#define RAM_DE_COUNT        (RAM_VARS + 0x04)
#define RAM_DE_IP           (RAM_VARS + 0x06)
#define RAM_INT21_COUNT     (RAM_VARS + 0x08)
#define RAM_INT21_FLAGS     (RAM_VARS + 0x0a)
#define RAM_INT21_IP        (RAM_VARS + 0x0c)
#define RAM_INT21_CS        (RAM_VARS + 0x0e)
#define RAM_FAILURES        (RAM_VARS + 0x10)
#define RAM_VARS_WORDS      16
#define PIC_BASE_MASTER     0x08
#define PIC_BASE_SLAVE      0x70
#define ROM_SEL_CODE32      0x08
#define ROM_SEL_FLAT        0x10
#define ROM_SEL_DATA16      0x18
#define ROM_SEL_CODE16      0x20
#define IVT_DE              (0x00 * 4)
#define IVT_IRQ0            (PIC_BASE_MASTER * 4)
#define IVT_INT21           (0x21 * 4)

    .code16
    .text

    .macro CHECK name               /* EAX = got, EDX = wanted */
    .pushsection .rodata
.Lname\@: .asciz "\name"
    .popsection
    mov $.Lname\@, %esi
    call check_eq
    .endm

start:
    cli
    cld
    xor %ax, %ax
    mov %ax, %ss
    mov $STACK_TOP, %esp
    mov %ax, %es
    mov $ROM_SEG, %ax
    mov %ax, %ds
    call uart_init_16
    mov $str_banner, %esi
    call puts_16

    mov $RAM_VARS, %di
    mov $RAM_VARS_WORDS, %cx
    xor %ax, %ax
    rep stosw

    /* IVT: PIC vectors return at once (spurious IRQ7/15), the rest is fatal. */
    xor %bx, %bx
1:  mov $unexpected_isr, %ax
    mov %bl, %cl
    and $0xf8, %cl
    cmp $PIC_BASE_MASTER, %cl
    je 2f
    cmp $PIC_BASE_SLAVE, %cl
    jne 3f
2:  mov $iret_isr, %ax
3:  shl $2, %bx
    mov %ax, %es:(%bx)
    movw $ROM_SEG, %es:2(%bx)
    shr $2, %bx
    inc %bx
    cmp $256, %bx
    jb 1b
    movw $de_isr, %es:IVT_DE
    movw $irq0_isr, %es:IVT_IRQ0
    movw $int21_isr, %es:IVT_INT21

    call lapic_virtual_wire

    mov $PIC_BASE_SLAVE << 8 | PIC_BASE_MASTER, %eax
    call pic_init_16
    mov $PIT_DIV_1000HZ, %eax
    call pit_periodic_16

    call test_pit
    call test_int21
    call test_divide_error

    mov $str_all_pass, %esi
    xor %al, %al
    cmpw $0, %es:RAM_FAILURES
    je 1f
    mov $str_failed, %esi
    mov $1, %al
1:  call puts_16
    jmp debug_exit_16

test_pit:
    xor %al, %al
    call pic_unmask_16
1:  cli
    cmpw $5, %es:RAM_TICKS
    jae 2f
    sti
wait_hlt:
    hlt
    jmp 1b
2:  call pic_mask_all_16
    xor %eax, %eax
    mov %es:RAM_TICKS, %ax
    cmp $5, %ax                     /* at least five ticks (more may land before cli) */
    jb 1f
    mov $5, %ax
1:  mov $5, %edx
    CHECK pit.irq0_ticks
    xor %eax, %eax
    mov %es:RAM_SHADOW, %ax
    xor %edx, %edx
    CHECK pit.sti_hlt_return_address
    ret

test_int21:
    mov $0x1234, %ax
    sti
    int $0x21
int21_return:
    cli
    movzwl %ax, %eax
    mov $0x1234 * 3 + 1, %edx
    CHECK int21.result
    xor %eax, %eax
    mov %es:RAM_INT21_COUNT, %ax
    mov $1, %edx
    CHECK int21.count
    mov %es:RAM_INT21_IP, %ax
    mov $int21_return, %edx
    CHECK int21.return_ip
    mov %es:RAM_INT21_CS, %ax
    mov $ROM_SEG, %edx
    CHECK int21.return_cs
    mov %es:RAM_INT21_FLAGS, %ax
    and $0x200, %ax
    xor %edx, %edx
    CHECK int21.if_cleared
    ret

test_divide_error:
    mov $100, %ax
    xor %dx, %dx
    xor %bx, %bx
de_fault:
    div %bx
de_resume:
    xor %eax, %eax
    mov %es:RAM_DE_COUNT, %ax
    mov $1, %edx
    CHECK div0.count
    mov %es:RAM_DE_IP, %ax
    mov $de_fault, %edx
    CHECK div0.saved_ip
    ret

/*
 * The local APIC leaves reset with LINT0 masked, so 8259A interrupts would never reach
 * the CPU.  Like any PC BIOS, put it in virtual wire mode (LINT0 = ExtINT, LINT1 = NMI).
 * Its registers at 0xfee00000 are out of reach of real-mode addressing, so take a short
 * trip through 32-bit protected mode and come back (SDM vol. 3, 9.9.2): code segments
 * are based at 0xf0000 so link-time offsets stay valid in both modes.
 */
lapic_virtual_wire:
    pushfl
    cli
    lgdtl rom_gdt_desc
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $ROM_SEL_CODE32, $1f
    .code32
1:  mov $ROM_SEL_FLAT, %ax
    mov %ax, %ds
    mov $0x1b, %ecx                 /* IA32_APIC_BASE */
    rdmsr
    and $0xfffff000, %eax
    movl $0x1ff, 0xf0(%eax)         /* SVR: software enable, spurious vector 0xff */
    movl $0x700, 0x350(%eax)        /* LVT LINT0: ExtINT */
    movl $0x400, 0x360(%eax)        /* LVT LINT1: NMI */
    mov $ROM_SEL_DATA16, %ax        /* 64 KiB limits before going back to real mode */
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    ljmp $ROM_SEL_CODE16, $2f
    .code16
2:  mov %cr0, %eax
    and $~1, %eax
    mov %eax, %cr0
    ljmp $ROM_SEG, $3f
3:  xor %ax, %ax
    mov %ax, %ss
    mov %ax, %es
    mov $ROM_SEG, %ax
    mov %ax, %ds
    popfl
    ret

/* EAX = got, EDX = wanted, SI = name. */
check_eq:
    push %esi
    cmp %edx, %eax
    jne 1f
    mov $str_pass, %esi
    call puts_16
    pop %esi
    call puts_16
    jmp put_crlf_16
1:  incw %es:RAM_FAILURES
    mov $str_fail, %esi
    call puts_16
    pop %esi
    call puts_16
    mov $str_got, %esi
    call puts_16
    call put_hex32_16
    mov $str_want, %esi
    call puts_16
    push %eax
    mov %edx, %eax
    call put_hex32_16
    pop %eax
    jmp put_crlf_16

/* ------------------------------------------------------------------ interrupt handlers */
iret_isr:
    iret

irq0_isr:
    push %ax
    push %bp
    mov %sp, %bp
    incw %es:RAM_TICKS
    cmpw $wait_hlt, 4(%bp)          /* the saved IP may never be the hlt itself */
    jne 1f
    incw %es:RAM_SHADOW
1:  mov $PIC_EOI, %al
    out %al, $PIC1_CMD
    pop %bp
    pop %ax
    iret

/* AX = AX * 3 + 1; records IP, CS and FLAGS as seen by the handler. */
int21_isr:
    push %bp
    mov %sp, %bp
    push %bx
    incw %es:RAM_INT21_COUNT
    mov 2(%bp), %bx
    mov %bx, %es:RAM_INT21_IP
    mov 4(%bp), %bx
    mov %bx, %es:RAM_INT21_CS
    pushf
    pop %bx
    mov %bx, %es:RAM_INT21_FLAGS
    mov %ax, %bx
    add %ax, %ax
    add %bx, %ax
    inc %ax
    pop %bx
    pop %bp
    iret

/* #DE: a fault, so the saved IP is the div; continue after it. */
de_isr:
    push %bp
    mov %sp, %bp
    push %ax
    incw %es:RAM_DE_COUNT
    mov 2(%bp), %ax
    mov %ax, %es:RAM_DE_IP
    cmp $de_fault, %ax
    jne unexpected_isr
    movw $de_resume, 2(%bp)
    pop %ax
    pop %bp
    iret

unexpected_isr:
    mov $ROM_SEG, %ax
    mov %ax, %ds
    mov $str_fatal, %esi
    call puts_16
    mov %sp, %bp
    mov 2(%bp), %ax                 /* CS:IP of whatever was interrupted */
    shl $16, %eax
    mov (%bp), %ax
    call put_hex32_16
    call put_crlf_16
    mov $3, %al
    jmp debug_exit_16

    .section .rodata
str_banner:     .asciz "realmode: running from F000:FFF0\r\n"
str_pass:       .asciz "PASS "
str_fail:       .asciz "FAIL "
str_got:        .asciz " got="
str_want:       .asciz " want="
str_all_pass:   .asciz "ALL PASS\r\n"
str_failed:     .asciz "FAILED\r\n"
str_fatal:      .asciz "FATAL unexpected interrupt at cs:ip="

    .balign 8
rom_gdt:
    .quad 0
    .quad 0x00409a0f0000ffff        /* 0x08: 32-bit code, base 0xf0000, 64 KiB */
    .quad 0x00cf92000000ffff        /* 0x10: flat 4 GiB data */
    .quad 0x000092000000ffff        /* 0x18: 16-bit data, base 0, 64 KiB */
    .quad 0x00009a0f0000ffff        /* 0x20: 16-bit code, base 0xf0000, 64 KiB */
rom_gdt_end:
rom_gdt_desc:
    .word rom_gdt_end - rom_gdt - 1
    .long ROM_SEG * 16 + rom_gdt

    .section .reset, "ax"
    .globl reset_vector
reset_vector:
    ljmp $ROM_SEG, $start

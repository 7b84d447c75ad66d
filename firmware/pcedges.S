/*
 * pcedges.elf: what a PC does at its edges, checked against QEMU's pc machine.
 *
 * - unassigned physical memory (beyond RAM with -m 64M, the PCI hole at 0xe0000000)
 *   drops writes; the value it reads is printed (all ones on a PC's bus and here, 0 on
 *   QEMU 7.2);
 * - the A20 gate through port 0x92: with A20 off, bit 20 of every address is 0 (an
 *   address in an odd MiB reaches the even MiB below it), and port 0x92 reads back;
 * - the i8042 keyboard controller: self-test (0xaa -> 0x55), the command byte (0x20 /
 *   0x60), the output port's A20 bit (0xd0 / 0xd1, QEMU's I8042_OUTPORT_A20);
 * - "X", a byte to a port no device claims, "Y": traces must not change what comes out.
 *
 * With "reset=1" or "reset=2" it then resets the machine through the keyboard
 * controller's output port (0x64 <- 0xfe) or the reset control register (0xcf9 <- 0x06);
 * under -no-reboot the run ends there (status 0), otherwise the guest boots again.
 * A reset that does nothing prints "FAIL reset" and exits with v=1.
 */
#include "defs.h"

#define BEYOND_RAM      0x08000000      /* 128 MiB: unassigned with -m 64M */
#define PCI_HOLE        0xe0000000
#define A20_HIGH        0x003f0000      /* odd MiB: with A20 off it is A20_LOW */
#define A20_LOW         0x002f0000
#define LOW_CODE        0x00020000      /* the A20 probe runs here: bit 20 clear */
#define KBD_DATA        0x60
#define KBD_STATUS      0x64
#define UNCLAIMED_PORT  0x2e0

    .text
    .code32
    .globl main
main:
    /* unassigned memory: the value read is printed (a PC's bus reads all ones, QEMU
       7.2 reads 0), a write must change nothing */
    mov $str_beyond, %esi
    mov BEYOND_RAM, %eax
    call show_value
    movl $0x12345678, BEYOND_RAM
    mov $str_dropped, %esi
    mov BEYOND_RAM, %edx
    xchg %eax, %edx
    call check_eq
    mov $str_hole, %esi
    mov PCI_HOLE, %eax
    call show_value
    movl $0x12345678, PCI_HOLE
    mov $str_hole_dropped, %esi
    mov PCI_HOLE, %edx
    xchg %eax, %edx
    call check_eq
    mov $str_hole_byte, %esi
    movzbl PCI_HOLE + 3, %eax
    call show_value

    /* A20 through port 0x92, the probe running below 1 MiB */
    movl $0x11111111, A20_LOW
    movl $0x22222222, A20_HIGH
    mov $a20_probe, %esi
    mov $LOW_CODE, %edi
    mov $a20_probe_end - a20_probe, %ecx
    rep movsb
    mov $LOW_CODE, %eax
    call *%eax                      /* EBX = A20_HIGH read with A20 off, ECX = port 0x92 */
    mov $str_a20_port, %esi
    mov %ecx, %eax
    and $0x03, %eax
    xor %edx, %edx
    call check_eq
    mov $str_a20_wraps, %esi
    mov %ebx, %eax
    mov $0x11111111, %edx
    call check_eq
    mov $str_a20_wrote, %esi
    mov A20_LOW, %eax
    mov $0x33333333, %edx
    call check_eq
    mov $str_a20_on, %esi
    mov A20_HIGH, %eax
    mov $0x22222222, %edx
    call check_eq
    mov $str_port92, %esi
    in $0x92, %al
    and $0x03, %eax
    mov $0x02, %edx
    call check_eq

    /* the i8042 */
    mov $0xaa, %al
    call kbd_command
    call kbd_read
    mov $str_kbd_selftest, %esi
    mov $0x55, %edx
    call check_eq
    mov $0x60, %al                  /* write the command byte: IRQs off, translate */
    call kbd_command
    mov $0x44, %al
    call kbd_data
    mov $0x20, %al
    call kbd_command
    call kbd_read
    mov $str_kbd_ctr, %esi
    mov $0x44, %edx
    call check_eq
    mov $0xd0, %al                  /* output port: A20 follows the gate */
    call kbd_command
    call kbd_read
    mov $str_kbd_outport, %esi
    and $0x03, %eax
    mov $0x03, %edx
    call check_eq
    mov $str_kbd_status, %esi
    in $KBD_STATUS, %al
    and $0x01, %eax                 /* nothing left to read */
    xor %edx, %edx
    call check_eq

    /* a trace must not change the output */
    mov $'X', %al
    call putc
    mov $0x5a, %al
    mov $UNCLAIMED_PORT, %dx
    out %al, %dx
    mov $'Y', %al
    call putc
    mov $5000000, %ecx              /* a few CPU slices after the unclaimed port */
1:  dec %ecx
    jnz 1b
    call put_crlf

    mov $key_reset, %esi
    call cmdline_uint
    jc 3f
    call check_summary
    test %eax, %eax
    jnz 4f
    mov $str_resetting, %esi
    call puts
    cmp $2, %eax                    /* reset=1: keyboard controller, reset=2: 0xcf9 */
    je 2f
    call kbd_wait
    mov $0xfe, %al
    out %al, $KBD_STATUS
    jmp 5f
2:  mov $0x02, %al
    mov $0xcf9, %dx
    out %al, %dx
    mov $0x06, %al
    out %al, %dx
5:  mov $1000000, %ecx
6:  dec %ecx
    jnz 6b
    mov $str_no_reset, %esi
    call puts
    mov $1, %eax
    ret
3:  call check_summary
4:  ret

/* Position independent, no stack: runs at LOW_CODE while A20 is off. */
a20_probe:
    in $0x92, %al
    and $0xfc, %al
    out %al, $0x92                  /* A20 off */
    in $0x92, %al
    movzbl %al, %ecx
    mov A20_HIGH, %ebx              /* reaches A20_LOW */
    movl $0x33333333, A20_HIGH      /* writes A20_LOW */
    in $0x92, %al
    or $0x02, %al
    out %al, $0x92                  /* A20 on again */
    ret
a20_probe_end:

show_value:                         /* "<name> value=<EAX>", EAX kept */
    push %eax
    call puts
    mov $str_value, %esi
    call puts
    call put_hex32
    call put_crlf
    pop %eax
    ret

kbd_wait:                           /* until the input buffer is empty */
    push %eax
1:  in $KBD_STATUS, %al
    test $0x02, %al
    jnz 1b
    pop %eax
    ret
kbd_command:
    call kbd_wait
    out %al, $KBD_STATUS
    ret
kbd_data:
    call kbd_wait
    out %al, $KBD_DATA
    ret
kbd_read:                           /* EAX = the next byte of the output buffer */
    push %ecx
    mov $1000000, %ecx
1:  in $KBD_STATUS, %al
    test $0x01, %al
    jnz 2f
    loop 1b
    mov $0xffffffff, %eax
    pop %ecx
    ret
2:  in $KBD_DATA, %al
    movzbl %al, %eax
    pop %ecx
    ret

    .section .rodata
key_reset:          .asciz "reset="
str_beyond:         .asciz "unassigned.beyond_ram"
str_hole:           .asciz "unassigned.pci_hole"
str_dropped:        .asciz "unassigned.beyond_ram_write_dropped"
str_hole_byte:      .asciz "unassigned.pci_hole_byte"
str_hole_dropped:   .asciz "unassigned.pci_hole_write_dropped"
str_value:          .asciz " value="
str_a20_port:       .asciz "a20.port92_reads_off"
str_a20_wraps:      .asciz "a20.off_wraps_read"
str_a20_wrote:      .asciz "a20.off_wraps_write"
str_a20_on:         .asciz "a20.on_again"
str_port92:         .asciz "a20.port92_reads_on"
str_kbd_selftest:   .asciz "i8042.self_test"
str_kbd_ctr:        .asciz "i8042.command_byte"
str_kbd_outport:    .asciz "i8042.output_port"
str_kbd_status:     .asciz "i8042.output_empty"
str_resetting:      .asciz "resetting\r\n"
str_no_reset:       .asciz "FAIL reset\r\n"

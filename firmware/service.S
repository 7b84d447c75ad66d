/*
 * service.elf: a small stateful line service on COM1 for the replication demo.
 *
 * Prints "service ready\r\n", then idles with sti;hlt; received bytes come in through
 * the IRQ4 ring buffer (lib/serial_rx.S), so input that arrives while an answer is
 * being printed is kept.  A line ends with CR or LF (an LF right after a CR is part of
 * the same line end).  State kept in RAM: a request counter (every line counts, empty
 * ones too) and a running 32-bit FNV-1a checksum over every byte of every line
 * received, terminators excluded, never reset.  Answers, with <n> the counter after the
 * line in decimal:
 *   "QUIT"        -> "bye\r\n", exit 0
 *   "TIME"        -> "<n> T <RTC seconds since midnight>\r\n"  (deliberately not
 *                    deterministic: it depends on when the line arrives)
 *   "NODE"        -> "<n> N <node text>\r\n", the contents of the fw_cfg file
 *                    "opt/emu-colo/node" as the host configured it (QEMU's and our
 *                    -fw_cfg name=opt/emu-colo/node,string=TEXT), looked up in the fw_cfg
 *                    file directory and read at answer time, never from guest RAM: the
 *                    two VMs of a replicated pair configured with different texts answer
 *                    differently, a deterministic divergence.  Up to NODE_MAX bytes of
 *                    the file, whatever they are; no such file gives "<n> N \r\n".
 *   anything else -> "<n> <checksum, 8 lowercase hex digits> <line>\r\n"
 * QUIT, TIME and NODE lines count and enter the checksum like any other line.
 * Lines longer than LINE_MAX bytes are answered with their first LINE_MAX bytes (the
 * checksum still covers all of them).
 */
#include "defs.h"

#define LINE_MAX        1024
#define FNV_OFFSET      0x811c9dc5
#define FNV_PRIME       0x01000193
#define WORD_QUIT       0x54495551  /* "QUIT" as a little-endian dword */
#define WORD_TIME       0x454d4954  /* "TIME" */
#define WORD_NODE       0x45444f4e  /* "NODE" */
#define NODE_MAX        200

/* QEMU fw_cfg, x86 I/O-port interface (docs/specs/fw_cfg.rst) */
#define FW_CFG_PORT_SEL     0x510   /* 16-bit write: select an item, data offset 0 */
#define FW_CFG_PORT_DATA    0x511   /* 8-bit read: next byte, 0 past the end */
#define FW_CFG_FILE_DIR     0x19    /* directory: be32 count, then 64-byte records of */
#define FW_CFG_NAME_LEN     56      /* be32 size, be16 select, be16 reserved, name[56] */

    .text
    .code32
    .globl main
main:
    movl $FNV_OFFSET, checksum
    call interrupts_init
    call serial_rx_init
    mov $str_ready, %esi
    call puts
next_byte:
    call serial_rx_wait
    cmp $'\n', %al
    jne 1f
    cmpb $0, after_cr
    movb $0, after_cr
    jne next_byte                   /* the LF of a CR LF pair */
    jmp 3f
1:  movb $0, after_cr
    cmp $'\r', %al
    jne 2f
    movb $1, after_cr
    jmp 3f
2:  movzbl %al, %edx                /* a byte of the line */
    xor checksum, %edx
    imul $FNV_PRIME, %edx, %edx
    mov %edx, checksum
    mov line_len, %ecx
    cmp $LINE_MAX, %ecx
    jae next_byte
    mov %al, line_buf(%ecx)
    incl line_len
    jmp next_byte
3:  call answer_line
    movl $0, line_len
    jmp next_byte

answer_line:
    incl counter
    cmpl $4, line_len
    jne 2f
    cmpl $WORD_QUIT, line_buf
    jne 1f
    mov $str_bye, %esi
    call puts
    xor %eax, %eax
    jmp debug_exit
1:  cmpl $WORD_TIME, line_buf
    jne 5f
    mov counter, %eax
    call put_dec32
    mov $str_time, %esi
    call puts
    call rtc_seconds_of_day
    call put_dec32
    jmp put_crlf
5:  cmpl $WORD_NODE, line_buf
    jne 2f
    mov counter, %eax
    call put_dec32
    mov $str_node, %esi
    call puts
    call put_node_file
    jmp put_crlf
2:  mov counter, %eax
    call put_dec32
    mov $' ', %al
    call putc
    mov checksum, %eax
    call put_hex32
    mov $' ', %al
    call putc
    mov $line_buf, %esi
    mov line_len, %ecx
    cmp $LINE_MAX, %ecx
    jbe 3f
    mov $LINE_MAX, %ecx
3:  test %ecx, %ecx
    jz 4f
    lodsb
    call putc
    dec %ecx
    jmp 3b
4:  jmp put_crlf

/* Print the fw_cfg file node_file: at most NODE_MAX bytes, nothing if there is no such
 * file.  Walks the file directory as a guest driver does (the selectors depend on which
 * other files the host added), on every call, so the answer is this host's configuration. */
put_node_file:
    push %eax
    push %ebx
    push %ecx
    push %edx
    push %esi
    push %edi
    push %ebp
    mov $FW_CFG_FILE_DIR, %ax
    call fw_cfg_select
    mov $4, %ecx
    call fw_cfg_read_be
    mov %eax, %ebx                  /* directory records left */
1:  test %ebx, %ebx
    jz 4f                           /* no such file */
    dec %ebx
    mov $4, %ecx
    call fw_cfg_read_be
    mov %eax, %edi                  /* the file's size */
    mov $4, %ecx
    call fw_cfg_read_be             /* select, reserved */
    shr $16, %eax
    mov %eax, %ebp                  /* the file's selector */
    mov $node_file, %esi
    mov $FW_CFG_NAME_LEN, %ecx
    xor %ah, %ah                    /* AH: nonzero once a name byte differs */
2:  in %dx, %al                     /* all 56 bytes, to stay at the next record */
    xor (%esi), %al
    or %al, %ah
    inc %esi
    loop 2b
    test %ah, %ah
    jnz 1b
    mov %ebp, %eax
    call fw_cfg_select
    mov %edi, %ecx
    cmp $NODE_MAX, %ecx
    jbe 3f
    mov $NODE_MAX, %ecx
3:  test %ecx, %ecx
    jz 4f
    in %dx, %al
    call putc
    dec %ecx
    jmp 3b
4:  pop %ebp
    pop %edi
    pop %esi
    pop %edx
    pop %ecx
    pop %ebx
    pop %eax
    ret

/* EAX = the next ECX (1-4) bytes of the selected item, big-endian; DX at the data port.
 * Clobbers ECX. */
fw_cfg_read_be:
1:  shl $8, %eax
    in %dx, %al
    loop 1b
    ret

/* Select fw_cfg item AX; leaves DX at the data port. */
fw_cfg_select:
    mov $FW_CFG_PORT_SEL, %dx
    out %ax, %dx
    mov $FW_CFG_PORT_DATA, %dx
    ret

/* Read RTC register AL into AL. */
rtc_read:
    out %al, $RTC_INDEX
    in $RTC_DATA, %al
    ret

/* Seconds, minutes, hours into BL, BH, CL once no update is in progress. */
rtc_read_time:
1:  mov $0x0a, %al
    call rtc_read
    test $0x80, %al                 /* UIP: an update is about to happen */
    jnz 1b
    mov $0x00, %al
    call rtc_read
    mov %al, %bl
    mov $0x02, %al
    call rtc_read
    mov %al, %bh
    mov $0x04, %al
    call rtc_read
    mov %al, %cl
    ret

/* AL (BCD) -> AL (binary). */
bcd_to_binary:
    push %ecx
    mov %al, %cl
    shr $4, %al
    mov $10, %ch
    mul %ch
    and $0x0f, %cl
    add %cl, %al
    pop %ecx
    ret

/* EAX = hours * 3600 + minutes * 60 + seconds from the MC146818, honouring its
 * binary/BCD and 12/24-hour formats (register B bits 2 and 1). */
rtc_seconds_of_day:
    push %ebx
    push %ecx
    push %edx
    push %esi
1:  call rtc_read_time              /* read twice until stable: no torn update */
    mov %ebx, %esi
    mov %cl, %dl
    call rtc_read_time
    cmp %bx, %si
    jne 1b
    cmp %cl, %dl
    jne 1b
    mov $0x0b, %al
    call rtc_read
    mov %al, %dh                    /* register B */
    mov %cl, %ch
    and $0x80, %ch                  /* PM flag (12-hour mode) */
    and $0x7f, %cl
    test $0x04, %dh
    jnz 2f
    mov %bl, %al
    call bcd_to_binary
    mov %al, %bl
    mov %bh, %al
    call bcd_to_binary
    mov %al, %bh
    mov %cl, %al
    call bcd_to_binary
    mov %al, %cl
2:  test $0x02, %dh
    jnz 3f
    cmp $12, %cl                    /* 12-hour mode: 12 AM is 0, PM adds 12 */
    jne 4f
    xor %cl, %cl
4:  test %ch, %ch
    jz 3f
    add $12, %cl
3:  movzbl %cl, %eax
    imul $3600, %eax, %eax
    movzbl %bh, %edx
    imul $60, %edx, %edx
    add %edx, %eax
    movzbl %bl, %edx
    add %edx, %eax
    pop %esi
    pop %edx
    pop %ecx
    pop %ebx
    ret

    .section .rodata
str_ready:  .asciz "service ready\r\n"
str_bye:    .asciz "bye\r\n"
str_time:   .asciz " T "
str_node:   .asciz " N "
node_file:  .ascii "opt/emu-colo/node"   /* the name as the directory holds it: NUL-padded */
            .fill FW_CFG_NAME_LEN - (. - node_file), 1, 0

    .bss
    .balign 4
counter:    .skip 4
checksum:   .skip 4
line_len:   .skip 4
after_cr:   .skip 1
line_buf:   .skip LINE_MAX

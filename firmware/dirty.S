/*
 * dirty.elf: the guest of the checkpoint benchmark, a mostly idle service that keeps
 * dirtying memory at a steady rate.  PIT at 100 Hz; on every IRQ0 tick it writes one
 * dword to each of "pages=N" (default 15: 300 pages per 200 ms) distinct 4 KiB pages,
 * going round a region that starts at physical 16 MiB and spans "span=MiB" (default 32),
 * page after page.  The value written is the running count of writes, so a page changes
 * every time it comes round again.  Between ticks it waits in sti;hlt.
 *
 * It runs forever, printing nothing, unless "ticks=N" is given: then after N ticks it
 * prints "dirty: <N> ticks, <N * pages> page writes\r\n" and exits with 0.
 *
 * The span must fit in RAM above 16 MiB (CMOS 0x34/0x35, in 64 KiB units, as the BIOS
 * reads it) and pages must not exceed the pages of the span; otherwise it prints
 * "dirty: ..." saying which and exits with 1.
 */
#include "defs.h"

#define BUF_START           0x01000000
#define CMOS_ABOVE_16M      0x34        /* word: RAM above 16 MiB in 64 KiB units */

    .text
    .code32
    .globl main
main:
    mov $key_pages, %esi
    call cmdline_uint
    jnc 1f
    mov $15, %eax
1:  mov %eax, pages_per_tick
    mov $key_span, %esi
    call cmdline_uint
    jnc 2f
    mov $32, %eax
2:  mov %eax, span_mib
    mov $key_ticks, %esi
    call cmdline_uint
    setnc limited
    mov %eax, tick_limit

    /* the span against the RAM above 16 MiB, in MiB */
    mov $CMOS_ABOVE_16M + 1, %al
    out %al, $RTC_INDEX
    in $RTC_DATA, %al
    mov %al, %ah
    mov $CMOS_ABOVE_16M, %al
    out %al, $RTC_INDEX
    in $RTC_DATA, %al
    movzwl %ax, %eax
    shr $4, %eax
    mov span_mib, %ecx
    test %ecx, %ecx
    jz bad_span
    cmp %eax, %ecx
    ja bad_span
    shl $8, %ecx                    /* MiB -> 4 KiB pages */
    mov %ecx, span_pages
    cmp %ecx, pages_per_tick
    ja bad_pages

    call interrupts_init
    mov $IRQ_BASE, %eax
    mov $irq0_count, %edx
    mov $0x8e, %cl
    call idt32_set
    mov $PIT_DIV_100HZ, %eax
    call pit_periodic
    xor %eax, %eax
    call pic_unmask

    /* Each tick counted by the handler is served here, one batch of writes per tick. */
3:  cli
    mov done, %eax
    cmpb $0, limited
    je 4f
    cmp tick_limit, %eax
    jae 6f
4:  cmp irq0_ticks, %eax
    jne 5f
    sti
    hlt
    jmp 3b
5:  sti
    call dirty_pages
    incl done
    jmp 3b

6:  call pic_mask_all
    mov $str_dirty, %esi
    call puts
    mov done, %eax
    call put_dec32
    mov $str_ticks, %esi
    call puts
    mov writes, %eax
    mov writes + 4, %edx
    call put_dec64
    mov $str_writes, %esi
    call puts
    xor %eax, %eax
    ret

bad_span:
    mov %eax, %ebx
    mov $str_dirty_span, %esi
    call puts
    mov span_mib, %eax
    call put_dec32
    mov $str_no_fit, %esi
    call puts
    mov %ebx, %eax
    call put_dec32
    mov $str_mib_end, %esi
    call puts
    mov $1, %eax
    ret

bad_pages:
    mov $str_dirty_pages, %esi
    call puts
    mov pages_per_tick, %eax
    call put_dec32
    mov $str_exceeds, %esi
    call puts
    mov span_pages, %eax
    call put_dec32
    mov $str_pages_end, %esi
    call puts
    mov $1, %eax
    ret

/* One tick's writes: pages_per_tick pages from the cursor on, each gets ++writes. */
dirty_pages:
    mov pages_per_tick, %ecx
    test %ecx, %ecx
    jz 2f
    mov cursor, %edx
    mov writes, %eax
1:  add $1, %eax
    adcl $0, writes + 4
    mov %edx, %edi
    shl $12, %edi
    mov %eax, BUF_START(%edi)
    inc %edx
    cmp span_pages, %edx
    jb 3f
    xor %edx, %edx
3:  dec %ecx
    jnz 1b
    mov %eax, writes
    mov %edx, cursor
2:  ret

    .section .rodata
key_pages:  .asciz "pages="
key_span:   .asciz "span="
key_ticks:  .asciz "ticks="
str_dirty:  .asciz "dirty: "
str_ticks:  .asciz " ticks, "
str_writes: .asciz " page writes\r\n"
str_dirty_span: .asciz "dirty: span="
str_no_fit: .asciz " MiB does not fit in the RAM above 16 MiB ("
str_mib_end: .asciz " MiB)\r\n"
str_dirty_pages: .asciz "dirty: pages="
str_exceeds: .asciz " exceeds the "
str_pages_end: .asciz " pages of the span\r\n"

    .bss
    .balign 4
pages_per_tick: .skip 4
span_mib:   .skip 4
span_pages: .skip 4
tick_limit: .skip 4
done:       .skip 4             /* ticks whose writes are done */
cursor:     .skip 4             /* next page index in the span */
    .balign 8
writes:     .skip 8             /* page writes so far (64-bit) */
limited:    .skip 1

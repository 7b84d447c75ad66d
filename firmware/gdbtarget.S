/*
 * gdbtarget.elf: a guest for debugger sessions (tests/test_gdbstub.py).  It calls bump()
 * "n=N" times (default 3): bump adds 1 to the 32-bit variable `counter` with one store, a
 * write watchpoint's target.  Then it prints "counter=<counter as 8 hex digits>
 * word=<the string `word`>\r\n" and exits with 0.  `counter` and `word` live in .data, so
 * a debugger can change what is printed; a large n keeps the guest busy for seconds (a
 * target for Ctrl-C).
 */
    .text
    .code32
    .globl main
main:
    mov $key_n, %esi
    call cmdline_uint
    jnc 1f
    mov $3, %eax
1:  mov %eax, %ecx
    test %ecx, %ecx
    jz 3f
2:  call bump
    dec %ecx
    jnz 2b
3:  mov $str_counter, %esi
    call puts
    mov counter, %eax
    call put_hex32
    mov $str_word, %esi
    call puts
    mov $word, %esi
    call puts
    call put_crlf
    xor %eax, %eax
    ret

    .globl bump
bump:
    mov counter, %eax
    inc %eax
    mov %eax, counter
    ret

    .data
    .globl counter, word
    .balign 4
counter:    .long 0
word:       .asciz "emu!"

    .section .rodata
key_n:       .asciz "n="
str_counter: .asciz "counter="
str_word:    .asciz " word="

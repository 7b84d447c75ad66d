/*
 * gdbtarget.elf: a guest for debugger sessions (tests/test_gdbstub.py).  It calls bump()
 * "n=N" times (default 3): bump adds 1 to the 32-bit variable `counter` with one store, a
 * write watchpoint's target.  Then it prints "counter=<counter as 8 hex digits>
 * word=<the string `word`>\r\n" and exits with 0.  `counter` and `word` live in .data, so
 * a debugger can change what is printed; a large n keeps the guest busy for seconds (a
 * target for Ctrl-C).  Before printing it executes one ud2 (at `trap_here`), whose #UD
 * handler `ud_handler` steps over it: a single step there lands on the handler.
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
3:  call idt32_init
    mov $6, %eax                    /* #UD */
    mov $ud_handler, %edx
    mov $0x8e, %cl
    call idt32_set
    .globl trap_here
trap_here:
    ud2
    mov $str_counter, %esi
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

    .globl ud_handler
ud_handler:
    addl $2, (%esp)                 /* return past the 2-byte ud2 */
    iret

    .data
    .globl counter, word
    .balign 4
counter:    .long 0
word:       .asciz "emu!"

    .section .rodata
key_n:       .asciz "n="
str_counter: .asciz "counter="
str_word:    .asciz " word="

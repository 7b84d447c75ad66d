/*
 * COM1 output for the standalone guests (mbplain, mblow, pvh), which are linked with plain
 * `ld` and no lib/ objects, as a first kernel is: putc sends AL, puts the NUL-terminated
 * string at ESI, each polling LSR.THRE first; both keep ECX and EDX.  Included with cpp.
 */
putc:
    push %edx
    mov %al, %ah
    mov $0x3fd, %dx
1:  in %dx, %al
    test $0x20, %al
    jz 1b
    mov $0x3f8, %dx
    mov %ah, %al
    out %al, %dx
    pop %edx
    ret
puts:
    lodsb
    test %al, %al
    jz 1f
    call putc
    jmp puts
1:  ret

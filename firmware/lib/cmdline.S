/*
 * Multiboot command line: "key=NUMBER" options.
 *
 * The entry code copies the loader's command line into cmdline_buf before it clears
 * .bss (a loader may put the string right after the image).  QEMU passes
 * "<kernel file name> <-append text>", so options are matched only at the start of a
 * space-separated word, and the first match wins.
 */
#include "bits.h"

#if BITS != 16
    .text
    CODE_MODE

/*
 * In: WSI = NUL-terminated key including the '=' (e.g. "n=").
 * Out: CF clear and EAX = the decimal value (modulo 2^32) when a word "key<digits>"
 * is present; CF set and EAX unchanged otherwise.
 */
    .globl FN(cmdline_uint)
FN(cmdline_uint):
    push WBX
    push WCX
    push WDX
    push WDI
    mov $cmdline_buf, %edi
.Lnext_word:
    movb (WDI), %cl
    cmp $' ', %cl
    jne 1f
    inc WDI
    jmp .Lnext_word
1:  test %cl, %cl
    jz .Lnot_found
    mov WSI, WBX                    /* key */
    mov WDI, WDX                    /* word */
2:  movb (WBX), %cl
    test %cl, %cl
    jz .Lkey_matched
    cmpb (WDX), %cl
    jne .Lskip_word
    inc WBX
    inc WDX
    jmp 2b
.Lkey_matched:
    movb (WDX), %cl                 /* at least one digit */
    sub $'0', %cl
    cmp $9, %cl
    ja .Lskip_word
    xor %ebx, %ebx
3:  movzbl (WDX), %ecx
    sub $'0', %ecx
    cmp $9, %ecx
    ja 4f
    imul $10, %ebx, %ebx
    add %ecx, %ebx
    inc WDX
    jmp 3b
4:  movb (WDX), %cl                 /* the number must end the word */
    test %cl, %cl
    jz .Lfound
    cmp $' ', %cl
    jne .Lskip_word
.Lfound:
    mov %ebx, %eax
    pop WDI
    pop WDX
    pop WCX
    pop WBX
    clc
    ret
.Lskip_word:
    movb (WDI), %cl
    test %cl, %cl
    jz .Lnot_found
    cmp $' ', %cl
    je .Lnext_word
    inc WDI
    jmp .Lskip_word
.Lnot_found:
    pop WDI
    pop WDX
    pop WCX
    pop WBX
    stc
    ret
#endif

/*
 * The 32 exception entry stubs of a guest with an IDT of its own, and their table
 * `exc_stubs` (one .long per vector, in .rodata): each stub pushes a zero error code where
 * the CPU pushes none, then the vector, and jumps to the guest's own `exc_common`.
 * Included with cpp where the stubs go; leaves the assembler in .text.
 */
    .macro EXC_STUB v
exc_stub_\v:
    .if HAS_ERROR_CODE(\v) == 0
    push $0
    .endif
    push $\v
    jmp exc_common
    .pushsection .rodata
    .long exc_stub_\v
    .popsection
    .endm

    .section .rodata
    .balign 4
exc_stubs:
    .text
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    EXC_STUB \v
    .endr

/*
 * CHECK name: one check of a self-test guest, reported by lib/check.S as "PASS name" when
 * the value got equals the one wanted (check_eq), else "FAIL name ...".  In 32-bit code
 * (CHECK_BITS 32) got is EAX and wanted EDX; in 64-bit code (CHECK_BITS 64) RAX and RDX.
 * Define CHECK_BITS, then include this where the macro is wanted.
 */
#if CHECK_BITS == 64
    .macro CHECK name               /* RAX = got, RDX = wanted */
    .pushsection .rodata
.Lname\@: .asciz "\name"
    .popsection
    push %rsi
    mov $.Lname\@, %esi
    call check_eq_64
    pop %rsi
    .endm
#else
    .macro CHECK name               /* EAX = got, EDX = wanted */
    .pushsection .rodata
.Lname\@: .asciz "\name"
    .popsection
    push %esi
    mov $.Lname\@, %esi
    call check_eq
    pop %esi
    .endm
#endif

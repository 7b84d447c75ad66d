/*
 * Word-size abstraction so the shared library assembles for real mode (BITS=16),
 * protected mode (BITS=32) and long mode (BITS=64) from one source.
 *
 * Wxx names the register used for pointers and saved state: %exx in 16/32-bit code
 * (real-mode code uses the 386 32-bit registers through operand-size prefixes), %rxx in
 * 64-bit code.  FN() gives each build its own symbol names so a 32-bit and a 64-bit copy
 * can live in the same ELF32 file.  MEM() names a variable: RIP-relative in 64-bit code
 * because an ELF32 object cannot hold the sign-extended absolute relocation.
 */
#ifndef FIRMWARE_BITS_H
#define FIRMWARE_BITS_H

#ifndef BITS
#define BITS 32
#endif

#if BITS == 64
#define CODE_MODE .code64
#define FN(name) name##_64
#define WAX %rax
#define WBX %rbx
#define WCX %rcx
#define WDX %rdx
#define WSI %rsi
#define WDI %rdi
#define WBP %rbp
#define MEM(sym) sym(%rip)
#elif BITS == 32
#define CODE_MODE .code32
#define FN(name) name
#define WAX %eax
#define WBX %ebx
#define WCX %ecx
#define WDX %edx
#define WSI %esi
#define WDI %edi
#define WBP %ebp
#define MEM(sym) sym
#elif BITS == 16
#define CODE_MODE .code16
#define FN(name) name##_16
#define WAX %eax
#define WBX %ebx
#define WCX %ecx
#define WDX %edx
#define WSI %esi
#define WDI %edi
#define WBP %ebp
#define MEM(sym) sym
#else
#error "BITS must be 16, 32 or 64"
#endif

#endif

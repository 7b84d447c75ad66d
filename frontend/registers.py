"""HMP ``info registers``: the CPU as QEMU's x86_cpu_dump_state() prints it for a 64-bit CPU
(target/i386/cpu-dump.c), FPU and SSE included."""

from unicorn import x86_const as X

from emu.cpu import context as xc
from emu.cpu.state import MSRS

_SEG_NAMES = ("es", "cs", "ss", "ds", "fs", "gs")
_SYS_TYPES = (
    ("Reserved", "TSS16-avl", "LDT", "TSS16-busy", "CallGate16", "TaskGate", "IntGate16", "TrapGate16",
     "Reserved", "TSS32-avl", "Reserved", "TSS32-busy", "CallGate32", "Reserved", "IntGate32", "TrapGate32"),
    ("<hiword>", "Reserved", "LDT", "Reserved", "Reserved", "Reserved", "Reserved", "Reserved", "Reserved",
     "TSS64-avl", "Reserved", "TSS64-busy", "CallGate64", "Reserved", "IntGate64", "TrapGate64"),
)


def format_registers(cpu):
    """``info registers`` as QEMU's x86_cpu_dump_state() prints it for a 64-bit CPU
    (target/i386/cpu-dump.c), with the FPU and SSE part."""
    ctx = cpu.context()
    lma = bool(ctx.hflags & xc.HF_LMA)
    pe = bool(cpu.reg("cr0") & 1)
    lines = ["", "CPU#0"] + _general_register_lines(cpu, ctx.hflags)
    for name in _SEG_NAMES:
        lines.append(_segment_text(name.upper(), ctx.segment(name), pe, lma))
    lines.append(_segment_text("LDT", ctx.system_segment("ldt"), pe, lma))
    lines.append(_segment_text("TR", ctx.system_segment("tr"), pe, lma))
    lines += _system_register_lines(cpu) + _fpu_sse_lines(cpu, ctx.hflags)
    return "\n".join(lines) + "\n"


def _general_register_lines(cpu, hflags):
    reg = cpu.reg
    lines = []
    names = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp"] + [f"r{i}" for i in range(8, 16)]
    for row in range(4):
        lines.append(" ".join(f"{name.upper():3s}={reg(name):016x}" for name in names[4 * row:4 * row + 4]))
    eflags = cpu.eflags
    flag_chars = "".join(ch if eflags & bit else "-" for ch, bit in
                         (("D", 1 << 10), ("O", 1 << 11), ("S", 1 << 7), ("Z", 1 << 6), ("A", 1 << 4),
                          ("P", 1 << 2), ("C", 1)))
    lines.append(f"RIP={reg('rip'):016x} RFL={eflags:08x} [{flag_chars}] CPL={hflags & 3} "
                 f"II={(hflags >> 3) & 1} A20=1 SMM=0 HLT={int(bool(cpu.halted))}")
    return lines


def _segment_text(name, values, pe, lma):
    """One segment cache line, as cpu-dump.c's cpu_x86_dump_seg_cache()."""
    selector, base, limit, flags = values
    text = f"{name:3s}={selector:04x} {base:016x} {limit:08x} {flags & 0x00FFFF00:08x}"
    if not (pe and flags & xc.DESC_P):
        return text
    text += f" DPL={(flags >> xc.DESC_DPL_SHIFT) & 3} "
    if not flags & xc.DESC_S:
        return text + _SYS_TYPES[int(lma)][(flags >> 8) & 15]
    if flags & xc.DESC_CS:
        text += "CS64" if flags & xc.DESC_L else ("CS32" if flags & xc.DESC_B else "CS16")
        text += f" [{'C' if flags & xc.DESC_C else '-'}{'R' if flags & xc.DESC_W else '-'}"
    else:
        text += "DS  " if flags & xc.DESC_B or lma else "DS16"
        text += f" [{'E' if flags & (1 << 10) else '-'}{'W' if flags & xc.DESC_W else '-'}"
    return text + f"{'A' if flags & xc.DESC_A else '-'}]"


def _system_register_lines(cpu):
    """GDTR, IDTR, the control and debug registers and EFER."""
    uc, reg = cpu.uc, cpu.reg
    lines = []
    for table in ("gdtr", "idtr"):
        _, base, limit, _ = uc.reg_read(getattr(X, f"UC_X86_REG_{table.upper()}"))
        lines.append(f"{table[:3].upper()}=     {base:016x} {limit:08x}")
    lines.append(f"CR0={reg('cr0') & 0xFFFFFFFF:08x} CR2={reg('cr2'):016x} CR3={reg('cr3'):016x} "
                 f"CR4={reg('cr4') & 0xFFFFFFFF:08x}")
    lines.append("".join(f"DR{i}={reg(f'dr{i}'):016x} " for i in range(4)))
    lines.append(f"DR6={reg('dr6'):016x} DR7={reg('dr7'):016x}")
    lines.append(f"EFER={uc.reg_read(X.UC_X86_REG_MSR, MSRS['efer']):016x}")
    return lines


def _fpu_sse_lines(cpu, hflags):
    uc = cpu.uc
    fsw = uc.reg_read(X.UC_X86_REG_FPSW)
    tags = uc.reg_read(X.UC_X86_REG_FPTAG)
    ftw = sum(1 << i for i in range(8) if (tags >> (2 * i)) & 3 != 3)
    lines = [f"FCW={uc.reg_read(X.UC_X86_REG_FPCW):04x} FSW={fsw:04x} [ST={(fsw >> 11) & 7}] FTW={ftw:02x} "
             f"MXCSR={uc.reg_read(X.UC_X86_REG_MXCSR):08x}"]
    fpr = []
    for i in range(8):
        mantissa, exponent = uc.reg_read(getattr(X, f"UC_X86_REG_FP{i}"))
        fpr.append(f"FPR{i}={mantissa:016x} {exponent:04x}")
    lines += [" ".join(fpr[i:i + 2]) for i in range(0, 8, 2)]
    xmm = []
    for i in range(16 if hflags & xc.HF_CS64 else 8):
        value = uc.reg_read(getattr(X, f"UC_X86_REG_XMM{i}"))
        xmm.append(f"XMM{i:02d}={value >> 64:016x} {value & (2**64 - 1):016x}")
    lines += [" ".join(xmm[i:i + 2]) for i in range(0, len(xmm), 2)]
    return lines

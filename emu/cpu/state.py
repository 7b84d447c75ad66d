"""The CPU's state by register name, for snapshots, migration and checkpoints.

Everything is saved by name and value, not as Unicorn's opaque context: the general,
segment (with their hidden caches), control, debug, x87/SSE registers, the MSRs a guest
can program (including the MTRRs Unicorn's context omits), the internal ``hflags`` (CPL,
interrupt shadow, ...), in subsections XCR0, PKRU and the machine-check MSRs (older
streams lack them), and what only the emulator knows: halted, the TSC offset and the
deterministic work counter.
"""

from unicorn import x86_const as X

from emu.errors import StateError
from emu.state.vmstate import I64, U32, U64, Array, Bool, Subsection, VMStateDescription

GENERAL = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12", "r13",
           "r14", "r15", "rip", "rflags"]
CONTROL = ["cr0", "cr2", "cr3", "cr4", "cr8"]
DEBUG = ["dr0", "dr1", "dr2", "dr3", "dr6", "dr7"]
SEGMENTS = ["es", "cs", "ss", "ds", "fs", "gs"]
MSRS = {
    "efer": 0xC0000080, "star": 0xC0000081, "lstar": 0xC0000082, "cstar": 0xC0000083, "sfmask": 0xC0000084,
    "fs_base": 0xC0000100, "gs_base": 0xC0000101, "kernel_gs_base": 0xC0000102, "tsc_aux": 0xC0000103,
    "sysenter_cs": 0x174, "sysenter_esp": 0x175, "sysenter_eip": 0x176, "pat": 0x277,
    "mtrr_def_type": 0x2FF, "mtrr_fix64k_00000": 0x250, "mtrr_fix16k_80000": 0x258, "mtrr_fix16k_a0000": 0x259,
    **{f"mtrr_fix4k_{0xC0000 + 0x8000 * i:05x}": 0x268 + i for i in range(8)},
    **{f"mtrr_phys{'base' if i % 2 == 0 else 'mask'}{i // 2}": 0x200 + i for i in range(16)},
    "misc_enable": 0x1A0,
}
#: The version_id that added an MSR to the stream (others: 1); an older stream keeps the reset value.
MSR_SINCE = {"misc_enable": 2}
XCR0_RESET = 1  # x87 state only (SDM vol. 1, 13.3)
XCR0_X87_SSE = 3
#: MSRs in a subsection (streams from before they were saved lack them): the machine-check
#: MSRs, MCG_STATUS, MCG_CTL and the 10 banks MCG_CAP reports (MCi_CTL/STATUS/ADDR/MISC)
MCE_MSRS = {"mcg_status": 0x17A, "mcg_ctl": 0x17B,
            **{f"mc{i // 4}_{('ctl', 'status', 'addr', 'misc')[i % 4]}": 0x400 + i for i in range(40)}}
X87 = [f"fp{i}" for i in range(8)]  # the physical x87 registers (mantissa, exponent)
XMM = [f"xmm{i}" for i in range(16)]


def _reg_id(name):
    return getattr(X, "UC_X86_REG_" + name.upper())


_PLAIN = GENERAL + CONTROL + DEBUG
_PLAIN_IDS = [_reg_id(name) for name in _PLAIN]
_XMM_IDS = [_reg_id(name) for name in XMM]
_SAVED_MSRS = {**MSRS, **MCE_MSRS}
_MSR_INDEX = list(_SAVED_MSRS.values())


class CpuState:
    """The fields of the CPU as attributes, for the ``cpu`` section of a state stream.

    ``CpuState.capture(cpu)`` reads them from an :class:`~emu.cpu.x86.X86Cpu` (a save);
    ``CpuState(cpu)`` starts empty, a state load fills the fields (``VMSTATE.apply``) and
    :meth:`write_to_cpu` puts them into the CPU.
    """

    msr_misc_enable = 1     # the reset value (fast strings on), for streams from before version 2

    def __init__(self, cpu):
        self.cpu = cpu
        # a stream without cpu/xsave is from a build that did not save XCR0 and restored
        # Unicorn's x87 | SSE: the value an OS sets on a CPU without AVX, so keep it
        self.xcr0 = XCR0_X87_SSE
        self.pkru = 0  # idem, cpu/pkru

    @classmethod
    def capture(cls, cpu):
        """The state of ``cpu`` now."""
        state = cls(cpu)
        state._read_cpu()
        return state

    def _read_cpu(self):
        uc = self.cpu.uc
        for name, value in zip(_PLAIN, uc.reg_read_batch(_PLAIN_IDS), strict=True):  # one engine call, not 60
            setattr(self, name, value)
        ctx = self.cpu.ctx.save()
        for seg in SEGMENTS:
            setattr(self, f"seg_{seg}", list(ctx.segment(seg)))
        for seg in ("ldt", "tr"):
            setattr(self, f"seg_{seg}", list(ctx.system_segment(seg)))
        for table in ("gdtr", "idtr"):
            _, base, limit, _ = uc.reg_read(_reg_id(table))
            setattr(self, f"{table}_base", base)
            setattr(self, f"{table}_limit", limit)
        self.hflags = ctx.hflags
        self.hflags2 = ctx.u32("hflags2")
        self.xcr0 = ctx.u64("xcr0")
        self.pkru = ctx.u32("pkru")
        cpu = self.cpu
        values = cpu.ffi.new("uint64_t[]", len(_SAVED_MSRS))
        if cpu.clib.read_msrs(cpu.cstate, cpu._uc_handle, X.UC_X86_REG_MSR, _MSR_INDEX, values, len(_SAVED_MSRS)):
            raise StateError("cpu: the engine refused to read an MSR")
        for name, value in zip(_SAVED_MSRS, values, strict=True):
            setattr(self, f"msr_{name}", value)
        self.fpcw = uc.reg_read(X.UC_X86_REG_FPCW)
        self.fpsw = uc.reg_read(X.UC_X86_REG_FPSW)
        self.fptag = uc.reg_read(X.UC_X86_REG_FPTAG)
        self.mxcsr = uc.reg_read(X.UC_X86_REG_MXCSR)
        self.x87 = []
        for name in X87:
            mantissa, exponent = uc.reg_read(_reg_id(name))
            self.x87 += [mantissa, exponent]
        self.xmm = []
        for value in uc.reg_read_batch(_XMM_IDS):
            self.xmm += [value & (2**64 - 1), value >> 64]
        self.halted = self.cpu.halted
        self.tsc_offset = self.cpu.cstate.tsc_offset
        self.work_counter = self.cpu.cstate.clock.icount

    def write_to_cpu(self):
        """Write every field into the engine (the stream was verified before this runs)."""
        cpu, uc = self.cpu, self.cpu.uc
        cpu._power_on_context()
        # control registers first: they decide how the rest is interpreted
        uc.reg_write(X.UC_X86_REG_MSR, (MSRS["efer"], self.msr_efer))
        uc.reg_write(X.UC_X86_REG_CR4, self.cr4)
        uc.reg_write(X.UC_X86_REG_CR3, self.cr3)
        uc.reg_write(X.UC_X86_REG_CR0, self.cr0)
        for name in ("cr2", "cr8") + tuple(DEBUG):
            uc.reg_write(_reg_id(name), getattr(self, name))
        for name, index in _SAVED_MSRS.items():
            if name != "efer" and hasattr(self, f"msr_{name}"):  # a subsection's: absent from older streams
                uc.reg_write(X.UC_X86_REG_MSR, (index, getattr(self, f"msr_{name}")))
        for table in ("gdtr", "idtr"):
            uc.reg_write(_reg_id(table), (0, getattr(self, f"{table}_base"), getattr(self, f"{table}_limit"), 0))
        uc.reg_write(X.UC_X86_REG_FPCW, self.fpcw)
        uc.reg_write(X.UC_X86_REG_FPSW, self.fpsw)
        uc.reg_write(X.UC_X86_REG_FPTAG, self.fptag)
        uc.reg_write(X.UC_X86_REG_MXCSR, self.mxcsr)
        for i, name in enumerate(X87):
            uc.reg_write(_reg_id(name), (self.x87[2 * i], self.x87[2 * i + 1]))
        for i, name in enumerate(XMM):
            uc.reg_write(_reg_id(name), self.xmm[2 * i] | (self.xmm[2 * i + 1] << 64))
        for name in GENERAL:
            uc.reg_write(_reg_id(name), getattr(self, name))
        ctx = cpu.ctx.save()
        for seg in SEGMENTS:
            ctx.load_segment(seg, *getattr(self, f"seg_{seg}"))
        for seg in ("ldt", "tr"):
            ctx.load_system_segment(seg, *getattr(self, f"seg_{seg}"))
        ctx.set_u32("hflags", self.hflags)  # exact: CPL, interrupt shadow, modes
        ctx.set_u32("hflags2", self.hflags2)
        ctx.set_u64("xcr0", self.xcr0)
        ctx.set_u32("pkru", self.pkru)
        ctx.set_i32("old_exception", -1)
        ctx.restore()
        uc.reg_write(X.UC_X86_REG_RIP, self.rip)
        cpu.cstate.tsc_offset = self.tsc_offset
        cpu.cstate.clock.icount = self.work_counter
        cpu._after_restore()
        cpu.halted = self.halted


def _check(state, version_id):
    """post_load: reject register values no x86 CPU can hold."""
    if state.rflags & (1 << 17):
        raise StateError("cpu: field rflags: virtual-8086 mode is not supported")
    if not state.rflags & 2:
        raise StateError(f"cpu: field rflags: {state.rflags:#x} has reserved bit 1 clear")
    if state.cr0 & 0x80000000 and not state.cr0 & 1:
        raise StateError(f"cpu: field cr0: {state.cr0:#x} enables paging without protection")
    if state.msr_efer & (1 << 10) and not state.cr0 & 0x80000000:
        raise StateError(f"cpu: field msr_efer: long mode active ({state.msr_efer:#x}) without paging")
    _check_xcr0(state)
    if state.pkru and not state.cpu.cpuid(7, 0)[2] & (1 << 3):
        raise StateError(f"cpu: field pkru: {state.pkru:#x} on a CPU without protection keys")
    for seg in SEGMENTS + ["ldt", "tr"]:
        # the engine's segment cache holds a 16-bit selector and 32-bit limit and flags
        selector, _base, limit, flags = getattr(state, f"seg_{seg}")
        if selector > 0xFFFF:
            raise StateError(f"cpu: field seg_{seg}: selector {selector:#x} is wider than 16 bits")
        if limit > 0xFFFFFFFF or flags > 0xFFFFFFFF:
            raise StateError(f"cpu: field seg_{seg}: limit {limit:#x} or flags {flags:#x} wider than 32 bits")


def _check_xcr0(state):
    """XCR0 as XSETBV would have accepted it on this CPU (SDM vol. 1, 13.3)."""
    eax, _, _, edx = state.cpu.cpuid(0xD, 0)
    supported = (edx << 32) | eax
    xcr0 = state.xcr0
    if not xcr0 & 1 or xcr0 & ~(supported | XCR0_RESET) or (xcr0 & 6) == 4:
        raise StateError(f"cpu: field xcr0: {xcr0:#x} is not a valid XCR0 for this CPU "
                         f"(x87 required, AVX needs SSE, supported components {supported:#x})")


def _fields():
    fields = [U64(name) for name in GENERAL + CONTROL + DEBUG]
    for seg in SEGMENTS + ["ldt", "tr"]:
        fields.append(Array(f"seg_{seg}", U64, 4))
    fields += [U64("gdtr_base"), U32("gdtr_limit"), U64("idtr_base"), U32("idtr_limit"),
               U32("hflags"), U32("hflags2")]
    fields += [U64(f"msr_{name}", since=MSR_SINCE.get(name, 1)) for name in MSRS]
    fields += [U32("fpcw"), U32("fpsw"), U32("fptag"), U32("mxcsr"),
               Array("x87", U64, 16), Array("xmm", U64, 32), Bool("halted"), I64("tsc_offset"),
               U64("work_counter")]
    return fields


VMSTATE_XSAVE = VMStateDescription("cpu/xsave", version_id=1, minimum_version_id=1, fields=[U64("xcr0")])
VMSTATE_PKRU = VMStateDescription("cpu/pkru", version_id=1, minimum_version_id=1, fields=[U32("pkru")])
VMSTATE_MCE = VMStateDescription("cpu/mce", version_id=1, minimum_version_id=1,
                                 fields=[U64(f"msr_{name}") for name in MCE_MSRS])
_SUBSECTIONS = [
    Subsection(VMSTATE_XSAVE, needed=lambda state: True),
    Subsection(VMSTATE_PKRU, needed=lambda state: state.pkru != 0),
    Subsection(VMSTATE_MCE, needed=lambda state: True),  # as QEMU's: whenever there are MCA banks (always)
]
VMSTATE = VMStateDescription("cpu", version_id=2, minimum_version_id=1, fields=_fields(), subsections=_SUBSECTIONS,
                             post_load=_check)

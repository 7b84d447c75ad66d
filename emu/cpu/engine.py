"""The CPU engine: which libunicorn is loaded, and the controls our own build adds.

``make setup`` builds libunicorn from the pinned source with the patch series in
``engine/unicorn/`` (see ``engine/README.md``), and ``emu/__init__.py`` points the PyPI
binding at it.  Its extra ``uc_ctl`` controls give an exact dirty log kept by the engine,
code invalidation by physical address, an interrupt-window exit, the halt state, the
A20 line, ROM writes that are dropped and SYSCALL/SYSENTER done inside the engine.  With
the stock wheel (no cmake or compiler) they are absent: the machine then falls back to
hooks, which is correct but several times slower, and says so once.
"""

import ctypes
import sys

from unicorn import UC_ARCH_X86, UC_ERR_OK, Uc
from unicorn.unicorn_py3.unicorn import uclib
from unicorn.x86_const import UC_CPU_X86_SKYLAKE_SERVER

#: The engine's CPU model.  Skylake-Server is the newest model whose features TCG (the
#: engine's QEMU 5) implements once the ones it lacks are dropped (AVX, AVX-512, TSX...):
#: SMAP and PKU among them, which the default Haswell model lacks.  Icelake-Server would
#: add 5-level paging, which our own page walker (delivery, X86Cpu.translate) lacks.
CPU_MODEL = UC_CPU_X86_SKYLAKE_SERVER

# uc_control_type values of engine/unicorn/00*.patch (far from upstream's numbers)
UC_CTL_DIRTY_LOG = 0x4000
UC_CTL_DIRTY_LOG_SYNC = 0x4001
UC_CTL_TB_REMOVE_CACHE_PHYS = 0x4002
UC_CTL_CPU_IRQ_WINDOW = 0x4003
UC_CTL_CPU_HALTED = 0x4004
UC_CTL_X86_A20 = 0x4005
UC_CTL_DISCARD_PROTECTED_WRITES = 0x4006
UC_CTL_X86_NATIVE_SYSCALL = 0x4007
_IO_WRITE, _IO_READ = 1, 2

_warned = False


def new_engine(mode):
    """A Unicorn x86 engine of our CPU model.  Every engine whose state or answers we use
    (the CPU, the reset context, the CPUID and context-layout probes) must be one."""
    uc = Uc(UC_ARCH_X86, mode)
    uc.ctl_set_cpu_model(CPU_MODEL)
    return uc


def _control(kind, nargs, rw):
    """UC_CTL(type, nr, rw) of unicorn.h, as the C int that uc_ctl takes."""
    return ctypes.c_int32(kind | (nargs << 26) | (rw << 30))


class EngineControls:
    """The patched engine's controls on one Unicorn instance (``patched`` is False on the
    stock wheel, where none of the methods may be called)."""

    def __init__(self, uc: Uc):
        self._uch = uc._uch
        probe = ctypes.c_int(-1)
        err = uclib.uc_ctl(self._uch, _control(UC_CTL_CPU_HALTED, 1, _IO_READ), ctypes.byref(probe))
        self.patched = err == UC_ERR_OK
        self._int = ctypes.c_int(0)
        self._halted_code = _control(UC_CTL_CPU_HALTED, 1, _IO_READ)
        self._window_write = _control(UC_CTL_CPU_IRQ_WINDOW, 1, _IO_WRITE)
        self._window_read = _control(UC_CTL_CPU_IRQ_WINDOW, 1, _IO_READ)
        self._sync_code = _control(UC_CTL_DIRTY_LOG_SYNC, 3, _IO_READ | _IO_WRITE)
        self._invalidate_code = _control(UC_CTL_TB_REMOVE_CACHE_PHYS, 2, _IO_WRITE)

    def _check(self, err, what):
        if err != UC_ERR_OK:
            raise RuntimeError(f"cpu: engine control {what} failed with Unicorn error {err}")

    def halted(self):
        """The last emu_start ended on the guest's hlt."""
        self._check(uclib.uc_ctl(self._uch, self._halted_code, ctypes.byref(self._int)), "CPU_HALTED")
        return bool(self._int.value)

    def request_irq_window(self, request):
        self._check(uclib.uc_ctl(self._uch, self._window_write, ctypes.c_int(1 if request else 0)), "IRQ_WINDOW")

    def irq_window_pending(self):
        self._check(uclib.uc_ctl(self._uch, self._window_read, ctypes.byref(self._int)), "IRQ_WINDOW")
        return bool(self._int.value)

    def set_a20(self, enabled):
        """The A20 line: the engine masks bit 20 of physical addresses from the next access."""
        self._check(uclib.uc_ctl(self._uch, _control(UC_CTL_X86_A20, 1, _IO_WRITE), ctypes.c_int(int(enabled))),
                    "X86_A20")

    def discard_protected_writes(self, enable):
        """A write to read-only memory that the ROM write hook saw has no effect (ROM)."""
        self._check(uclib.uc_ctl(self._uch, _control(UC_CTL_DISCARD_PROTECTED_WRITES, 1, _IO_WRITE),
                                 ctypes.c_int(int(enable))), "DISCARD_PROTECTED_WRITES")

    def native_syscall(self, enable):
        """SYSCALL and SYSENTER enter the guest kernel inside the engine, as on the CPU,
        instead of stopping the engine for the host to do it (one exit per system call)."""
        self._check(uclib.uc_ctl(self._uch, _control(UC_CTL_X86_NATIVE_SYSCALL, 1, _IO_WRITE),
                                 ctypes.c_int(int(enable))), "X86_NATIVE_SYSCALL")

    def dirty_log(self, enable):
        self._check(uclib.uc_ctl(self._uch, _control(UC_CTL_DIRTY_LOG, 1, _IO_WRITE), ctypes.c_int(int(enable))),
                    "DIRTY_LOG")

    def dirty_log_sync(self, begin, size, bitmap_address):
        """Collect and clear the log of [begin, begin + size) into the uint64 words at
        ``bitmap_address`` (one bit per page)."""
        self._check(uclib.uc_ctl(self._uch, self._sync_code, ctypes.c_uint64(begin), ctypes.c_uint64(size),
                                 ctypes.c_void_p(bitmap_address)), "DIRTY_LOG_SYNC")

    def invalidate_code(self, begin, end):
        """Drop translated code in guest-physical [begin, end) (the host wrote it)."""
        self._check(uclib.uc_ctl(self._uch, self._invalidate_code, ctypes.c_uint64(begin), ctypes.c_uint64(end)),
                    "TB_REMOVE_CACHE_PHYS")


def warn_if_stock(controls):
    """Once per process: say that the stock engine is in use, and what it costs."""
    global _warned
    if not controls.patched and not _warned:
        _warned = True
        print("emu: warning: running on the stock unicorn wheel (run `make setup` with cmake and a C compiler "
              "to build the patched engine): guest code runs several times slower", file=sys.stderr)

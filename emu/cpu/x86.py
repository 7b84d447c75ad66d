"""The x86 CPU: one Unicorn engine plus everything Unicorn does not do for a full system.

Unicorn executes instructions and nothing more: it has no way to raise an interrupt and
never enters the guest's IDT (Unicorn issues 1857 and 1227), leaves stale exception state
behind after a fault (issue 1883) and reports no ``hlt`` (issue 1082); ``engine/README.md``
lists what our engine build adds.  This module adds, on the host side:

* interrupt and exception delivery in real mode (IVT), 32-bit protected mode (IDT with
  interrupt/trap gates, privilege change through the TSS) and long mode (16-byte gates,
  RSP0 and IST stacks), with the double-fault and triple-fault rules;
* the interrupt shadow after ``sti`` / ``mov ss``;
* ``hlt`` detection, ``syscall`` entry at LSTAR, a truthful CPUID, the virtual TSC
  (C hook) and the workarounds for Unicorn's stale exception state after every slice.

The engine is created in ``UC_MODE_64`` and started from a real-mode context, so that every
register is reachable in every mode; ``emu_start`` then takes RIP (not a linear address).
"""

import ctypes
import fractions
import os
import struct
import weakref

from unicorn import (UC_CTL_IO_WRITE, UC_CTL_TLB_FLUSH, UC_ERR_FETCH_UNMAPPED, UC_ERR_INSN_INVALID,
                     UC_ERR_READ_UNMAPPED, UC_ERR_WRITE_UNMAPPED, UC_HOOK_BLOCK, UC_HOOK_CODE, UC_HOOK_INSN,
                     UC_HOOK_INTR, UC_HOOK_MEM_READ, UC_HOOK_MEM_UNMAPPED, UC_HOOK_MEM_WRITE, UC_HOOK_MEM_WRITE_PROT,
                     UC_MEM_FETCH_UNMAPPED, UC_MEM_WRITE_UNMAPPED, UC_MODE_16, UC_MODE_64, UC_PROT_ALL, UC_PROT_EXEC,
                     UC_PROT_READ, UcError)
from unicorn import x86_const as X
from unicorn.unicorn_py3.arch.types import uc_hook_h
from unicorn.unicorn_py3.unicorn import uclib

from emu.cpu import context as xc
from emu.cpu.engine import EngineControls, new_engine, warn_if_stock
from emu.errors import GuestError, UnsupportedError

NEVER = 0xFFFF_FFFF_FFFF_FFFF

# vectors
DE, DB, NMI, BP, OF, BR, UD, NM, DF = 0, 1, 2, 3, 4, 5, 6, 7, 8
TS, NP, SS, GP, PF, MF, AC, MC = 10, 11, 12, 13, 14, 16, 17, 18
HAS_ERROR_CODE = {DF, TS, NP, SS, GP, PF, AC, 21, 29, 30}
CONTRIBUTORY = {DE, TS, NP, SS, GP}
EXCEPTION_NAMES = {0: "#DE", 1: "#DB", 2: "NMI", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM", 8: "#DF",
                   10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF", 17: "#AC", 18: "#MC",
                   19: "#XM", 20: "#VE", 21: "#CP"}

DR6_BS = 1 << 14  # single-step trap
EFLAGS_TF, EFLAGS_IF, EFLAGS_NT, EFLAGS_RF, EFLAGS_VM, EFLAGS_AC = 1 << 8, 1 << 9, 1 << 14, 1 << 16, 1 << 17, 1 << 18
CR0_PE, CR0_WP, CR0_PG = 1, 1 << 16, 1 << 31
CR4_PSE, CR4_PAE, CR4_OSXSAVE, CR4_PKE = 1 << 4, 1 << 5, 1 << 18, 1 << 22
XCR0_X87, XCR0_SSE = 1, 2
EFER_SCE, EFER_LME, EFER_LMA = 1, 1 << 8, 1 << 10
MSR_EFER, MSR_STAR, MSR_LSTAR, MSR_SFMASK = 0xC0000080, 0xC0000081, 0xC0000082, 0xC0000084
MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING = 0x1A0, 1 << 0
CPUID_7_EBX_ERMS = 1 << 9
CPUID_7_EDX_ARCH_CAPABILITIES = 1 << 29
MSR_IA32_ARCH_CAPABILITIES = 0x10A
#: IA32_ARCH_CAPABILITIES: not affected by Meltdown (RDCL_NO), speculative store bypass,
#: MDS, the page-size-change machine check, TAA, the MMIO stale-data variants (SBDR_SSDP,
#: FBSDP, PSDP), branch history injection, post-barrier RSB predictions, GDS, RFDS and ITS.
#: True of a translated CPU, which does not speculate; Linux then skips page table isolation,
#: the buffer clearing on every return to user mode and the return thunks.
ARCH_CAPABILITIES = sum(1 << bit for bit in (0, 4, 5, 6, 8, 13, 14, 15, 20, 24, 26, 27, 62))

TSC_HZ = 1_000_000_000  # the virtual TSC ticks once per guest nanosecond (1 GHz, constant)
# The core crystal of CPUID leaf 0x15, which Linux also takes as the local APIC timer's input
# clock: emu/devices/apic.py's timer counts guest nanoseconds, a 1 GHz bus clock as in QEMU.
CRYSTAL_HZ = 1_000_000_000



_CPUS_WITH_TIMER = weakref.WeakSet()  # their deadline timer thread does not survive a fork
_CPUS = weakref.WeakSet()


def raise_in_running_cpu(exc):
    """Hand ``exc`` (from a signal handler) to the CPU whose engine runs now, if any.

    Python runs a signal handler between two bytecodes of the main thread; inside
    ``emu_start`` that is inside one of our C-called callbacks, where an exception
    raised before the callback's own ``try`` is printed and dropped by ctypes.  The CPU
    takes it as a hook's error instead: its engine stops and the run loop raises it.
    False: no engine runs, the caller raises it itself."""
    handed = False
    for cpu in list(_CPUS):
        if cpu.running:
            cpu._callback_error(type(exc), exc, None)
            handed = True
    return handed


def _restart_timers_after_fork():
    """In a forked child (``-daemonize``) each deadline timer thread must be started anew."""
    for cpu in list(_CPUS_WITH_TIMER):
        if cpu.clib.deadline_timer_after_fork(cpu.cstate) != 0:
            raise GuestError("cpu: cannot restart the deadline timer thread after fork")


os.register_at_fork(after_in_child=_restart_timers_after_fork)

class Fault(Exception):
    """An exception raised by our own delivery code (a fault while pushing a frame...)."""

    def __init__(self, vector, error_code=0, cr2=None):
        super().__init__(f"{EXCEPTION_NAMES.get(vector, vector)} error={error_code:#x}")
        self.vector, self.error_code, self.cr2 = vector, error_code, cr2


class TripleFault(GuestError):
    pass


def is_double_fault(first, second):
    """SDM vol. 3 table 6-5: which fault during delivery of which event becomes #DF."""
    if first in CONTRIBUTORY and second in CONTRIBUTORY:
        return True
    return first == PF and (second in CONTRIBUTORY or second == PF)


class DebugStop:
    """Why a debugger hook stopped the guest: ``kind`` "breakpoint" (``address`` is RIP,
    the instruction not yet executed), or "watch" / "rwatch" / "awatch" (``address`` is
    the watchpoint's, the accessing instruction completed)."""

    __slots__ = ("kind", "address")

    def __init__(self, kind, address):
        self.kind, self.address = kind, address

    def __repr__(self):
        return f"DebugStop({self.kind!r}, {self.address:#x})"


WATCH_KINDS = ("watch", "rwatch", "awatch")  # gdb's names: write, read, access


class PendingEvent:
    """What the hooks recorded during a slice, for the run loop to act on."""

    __slots__ = ("kind", "vector", "error_code", "is_software", "next_ip", "cr2", "detail")

    def __init__(self, kind, vector=None, error_code=0, is_software=False, next_ip=None, cr2=None, detail=None):
        self.kind, self.vector, self.error_code = kind, vector, error_code
        self.is_software, self.next_ip, self.cr2, self.detail = is_software, next_ip, cr2, detail


# CPUID bits (SDM vol. 2A, CPUID): features, and the ones that follow CR4
CPUID1_ECX_XSAVE, CPUID1_ECX_OSXSAVE = 1 << 26, 1 << 27
CPUID7_ECX_PKU, CPUID7_ECX_OSPKE = 1 << 3, 1 << 4
#: leaves with subleaves, and how many of them the table holds (0xD: up to PKRU, component 9)
_SUBLEAVES = {4: 4, 7: 4, 0xB: 4, 0xD: 10}
#: the callback type of engine patch 0014's RDMSR / WRMSR hooks (that of CPUID hooks)
_MSR_HOOK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)


def _uc_function_pointer(name):
    return ctypes.cast(getattr(uclib, name), ctypes.c_void_p).value


class X86Cpu:
    """A single x86-64 CPU on a Unicorn engine, with host-side interrupt delivery."""

    def __init__(self, ram, ports, clock, cstate, ffi, clib, *, icount=False, has_lapic=False, trace=None):
        self.ram = ram
        self.ports = ports
        self.clock = clock
        self.cstate = cstate  # the C helper's emu_state
        self.ffi, self.clib = ffi, clib
        self.icount = icount
        self.has_lapic = has_lapic
        self.trace = trace  # callable(category, message) or None
        self.halted = False
        self.events = []
        self.hook_error = None
        self.mmio = []  # (base, size, device)
        self._keep = []  # cffi callbacks and hook handles that must outlive the engine
        self.exception_counts = {}
        self.stop_requested = False
        self.running = False  # inside emu_start: only then does a stop request reach the engine
        self._pending_a20_mask = None  # an A20 change asked for by an I/O hook, applied after the slice
        self.on_slice_end = []  # callables run after every slice (a memory map change waits there)
        self._rom_hooks = {}  # base of a ROM mapping -> its write-protection hook
        self._rom_write_handler = None
        self._msr_handlers = {}  # MSR index -> (read, write): add_msr
        self.debug_stop = None  # a DebugStop recorded by a breakpoint or watchpoint hook
        self._breakpoints = {}  # linear address -> code hook
        self._watchpoints = {}  # (kind, linear, length) -> memory hooks
        self._watch_step_hook = None  # a code hook at every instruction while watchpoints exist
        self.stepping = False  # a single step runs: breakpoints do not stop it (as QEMU)

        self.uc = new_engine(UC_MODE_64)
        self.engine = EngineControls(self.uc)
        warn_if_stock(self.engine)
        if self.engine.patched:
            self.engine.discard_protected_writes(True)  # ROM: writes are ignored, as on a PC
            self.engine.native_syscall(True)  # no exit to the host per system call
        # the patched engine needs no hook at every block in real-time mode: deadlines come
        # from a timer thread, the interrupt window from the engine itself
        self.block_hook = icount or not self.engine.patched
        self.ctx = xc.ContextView(self.uc)
        self._real_mode_context = self._reset_context()
        self._context_fresh = False  # ctx holds the engine's current state (reads need no engine call)
        self.ctx.load_raw(self._real_mode_context)
        self.ctx.restore()
        self.uc.mem_map_ptr(0, ram.size, UC_PROT_ALL, ram.address)
        self._install_hooks()
        ram.write_listeners.append(self._host_wrote_ram)

    # ------------------------------------------------------------------ setup
    def _reset_context(self):
        """A fresh real-mode engine's context, with XCR0 as after RESET: x87 state only
        (Unicorn enables SSE state too, for user-mode code that never runs XSETBV)."""
        raw = bytearray(bytes(new_engine(UC_MODE_16).context_save()))
        struct.pack_into("<Q", raw, xc.OFFSETS["xcr0"], XCR0_X87)
        return bytes(raw)

    def _c_hook(self, hook_type, fn_name, *extra, begin=1, end=0):
        handle = uc_hook_h()
        fn = int(self.ffi.cast("uintptr_t", getattr(self.clib, fn_name)))
        user = int(self.ffi.cast("uintptr_t", self.cstate))
        args = [ctypes.c_uint64(begin), ctypes.c_uint64(end)] + [ctypes.c_int(e) for e in extra]
        err = uclib.uc_hook_add(self.uc._uch, ctypes.byref(handle), hook_type, ctypes.c_void_p(fn),
                                ctypes.c_void_p(user), *args)
        if err:
            raise GuestError(f"cpu: uc_hook_add({fn_name}) failed with error {err}")
        self._keep.append(handle)
        return handle

    def _install_hooks(self):
        cstate = self.cstate
        cstate.emu_stop = self.ffi.cast("void *", _uc_function_pointer("uc_emu_stop"))
        cstate.reg_write = self.ffi.cast("void *", _uc_function_pointer("uc_reg_write"))
        cstate.reg_read = self.ffi.cast("void *", _uc_function_pointer("uc_reg_read"))
        cstate.tsc_hz = TSC_HZ
        cstate.icount_limit = NEVER
        cstate.deadline_ns = 2**62

        @self.ffi.callback("uint32_t(uint32_t, int)", onerror=self._callback_error, error=0xFFFFFFFF)
        def py_in(port, size):
            return self.ports.read(port, size)

        @self.ffi.callback("void(uint32_t, int, uint32_t)", onerror=self._callback_error)
        def py_out(port, size, value):
            self.ports.write(port, size, value)

        self._keep += [py_in, py_out]
        cstate.py_in = py_in
        cstate.py_out = py_out
        self._c_hook(UC_HOOK_INSN, "on_out", X.UC_X86_INS_OUT)
        self._c_hook(UC_HOOK_INSN, "on_in", X.UC_X86_INS_IN)
        self._c_hook(UC_HOOK_INSN, "on_rdtsc", X.UC_X86_INS_RDTSC)
        self._c_hook(UC_HOOK_INSN, "on_rdtscp", X.UC_X86_INS_RDTSCP)
        if self.block_hook:
            self._c_hook(UC_HOOK_BLOCK, "on_block")
        self._setup_fast_delivery()
        self.uc.hook_add(UC_HOOK_INTR, self._on_interrupt)
        if not self.engine.patched:
            self.uc.hook_add(UC_HOOK_INSN, self._on_syscall, None, 1, 0, X.UC_X86_INS_SYSCALL)
        self.uc.hook_add(UC_HOOK_INSN, self._on_cpuid, None, 1, 0, X.UC_X86_INS_CPUID)
        # bounded to what lies above RAM (mapped from 0): a memory hook that covers RAM keeps
        # every guest store on the engine's slow path
        self.uc.hook_add(UC_HOOK_MEM_UNMAPPED, self._on_unmapped, None, self.ram.size, NEVER)
        self._cpuid_table = self._native_cpuid()
        self._offer_arch_capabilities()
        if not self.block_hook:
            if self.clib.deadline_timer_start(cstate, self._uc_handle) != 0:
                raise GuestError("cpu: cannot start the deadline timer thread")
            weakref.finalize(self, self.clib.deadline_timer_stop, cstate)
            _CPUS_WITH_TIMER.add(self)
        _CPUS.add(self)

    def add_msr(self, index, read, write):
        """RDMSR / WRMSR of MSR ``index`` call ``read() -> value`` / ``write(value) -> bool``
        (False: the write raises #GP(0)).  Needs the patched engine (engine patch 0014); the
        stock one keeps its own answers (IA32_APIC_BASE reads 0)."""
        if not self.engine.patched:
            return False
        if not self._msr_handlers:
            for insn, method in ((X.UC_X86_INS_RDMSR, self._on_rdmsr), (X.UC_X86_INS_WRMSR, self._on_wrmsr)):
                callback = _MSR_HOOK(lambda uc, user, method=method: method())
                handle = uc_hook_h()
                err = uclib.uc_hook_add(self.uc._uch, ctypes.byref(handle), UC_HOOK_INSN, callback, None,
                                        ctypes.c_uint64(1), ctypes.c_uint64(0), ctypes.c_int(insn))
                if err:
                    raise GuestError(f"cpu: uc_hook_add(MSR hook) failed with error {err}")
                self._keep += [callback, handle]
        self._msr_handlers[index] = (read, write)
        return True

    def _on_rdmsr(self):
        """0: the engine answers; 1: done (EDX:EAX written)."""
        try:
            handler = self._msr_handlers.get(self.uc.reg_read(X.UC_X86_REG_ECX) & 0xFFFFFFFF)
            if handler is None:
                return 0
            value = handler[0]()
            self.uc.reg_write(X.UC_X86_REG_RAX, value & 0xFFFFFFFF)
            self.uc.reg_write(X.UC_X86_REG_RDX, (value >> 32) & 0xFFFFFFFF)
            return 1
        except BaseException as e:  # re-raised from the run loop
            self._callback_error(type(e), e, e.__traceback__)
            return 0

    def _on_wrmsr(self):
        """0: the engine performs it; 1: done; 2: #GP(0)."""
        try:
            handler = self._msr_handlers.get(self.uc.reg_read(X.UC_X86_REG_ECX) & 0xFFFFFFFF)
            if handler is None:
                return 0
            value = (self.uc.reg_read(X.UC_X86_REG_EDX) & 0xFFFFFFFF) << 32 | (
                self.uc.reg_read(X.UC_X86_REG_EAX) & 0xFFFFFFFF)
            return 1 if handler[1](value) else 2
        except BaseException as e:
            self._callback_error(type(e), e, e.__traceback__)
            return 1

    def add_c_memory_write_hook(self, fn_name, begin, end):
        return self._c_hook(UC_HOOK_MEM_WRITE, fn_name, begin=begin, end=end)

    def remove_hook(self, handle):
        uclib.uc_hook_del(self.uc._uch, handle)
        self._keep.remove(handle)

    def _setup_fast_delivery(self):
        """Hand the C delivery path what it needs: our context buffer and its layout, RAM."""
        cstate, ffi = self.cstate, self.ffi
        cstate.ctx = ffi.cast("void *", self.ctx.address)
        cstate.context_save = ffi.cast("void *", _uc_function_pointer("uc_context_save"))
        cstate.context_restore = ffi.cast("void *", _uc_function_pointer("uc_context_restore"))
        for field in ("regs", "eip", "eflags", "hflags", "segs", "tr", "idt", "gdt", "cr", "old_exception"):
            setattr(cstate, f"off_{field}", xc.OFFSETS[field])
        cstate.reg_rsp, cstate.reg_rip, cstate.reg_eflags = X.UC_X86_REG_RSP, X.UC_X86_REG_RIP, X.UC_X86_REG_EFLAGS
        cstate.ram = ffi.cast("uint8_t *", self.ram.address)
        cstate.ram_size = self.ram.size
        cstate.host_dirty = ffi.cast("uint8_t *", self.ram.host_dirty_address)
        self._uc_handle = ffi.cast("void *", self.uc._uch.value)
        self.fast_delivery = True

    def _callback_error(self, exc_type, exc, tb):
        """An exception inside a C-called Python callback: stop the engine, re-raise later."""
        if self.hook_error is None:
            self.hook_error = exc.with_traceback(tb)
        self.request_stop()

    def map_memory(self, base, size, host_address, writable):
        """Host memory at guest-physical ``base`` (RAM, or ROM when not ``writable``: a write
        there reaches the ROM write handler and is ignored, as on a PC)."""
        perms = UC_PROT_ALL if writable else UC_PROT_READ | UC_PROT_EXEC
        self.uc.mem_map_ptr(base, size, perms, host_address)
        if not writable:
            # bounded to the ROM: a write-protection hook over RAM would keep every store slow
            self._rom_hooks[base] = self.uc.hook_add(UC_HOOK_MEM_WRITE_PROT, self._on_rom_write, None, base,
                                                     base + size - 1)

    def unmap(self, base, size):
        self.uc.mem_unmap(base, size)
        hook = self._rom_hooks.pop(base, None)
        if hook is not None:
            self.uc.hook_del(hook)

    def set_rom_write_handler(self, handler):
        """``handler(address, size, value)`` hears of every guest write to ROM."""
        self._rom_write_handler = handler

    def _on_rom_write(self, uc, access, address, size, value, user):
        try:
            if self._rom_write_handler is not None:
                self._rom_write_handler(address, size, value)
        except BaseException as e:  # re-raised from the run loop
            self._callback_error(type(e), e, e.__traceback__)
        # the patched engine then discards the write; the stock one would perform it, so
        # there the write stops the emulator (UC_ERR_WRITE_PROT) instead
        return self.engine.patched

    def after_memory_map_change(self, flush_code):
        """Translations are stale after a remap; so is code translated from remapped memory."""
        self.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
        if flush_code:
            self.uc.ctl_flush_tb()
        self._invalidate_context()

    def map_mmio(self, base, size, device, offset=0):
        """``device.mmio_read/mmio_write`` at ``base`` (``offset``: where in the device's
        own range this mapping starts)."""
        def read(uc, address, sz, user):
            try:
                return device.mmio_read(offset + address, sz)
            except BaseException as e:  # re-raised from the run loop
                self._callback_error(type(e), e, e.__traceback__)
                return 0

        def write(uc, address, sz, value, user):
            try:
                device.mmio_write(offset + address, sz, value)
            except BaseException as e:
                self._callback_error(type(e), e, e.__traceback__)

        self._keep += [read, write]
        self.uc.mmio_map(base, size, read, None, write, None)
        self.mmio.append((base, size, device))

    # ------------------------------------------------------------------ hooks
    def request_stop(self):
        """Ask the engine to return as soon as possible (from a hook or a device)."""
        if not self.running:
            return
        self.stop_requested = True
        if self.block_hook:
            # the block hook stops before the next block.  Deterministic mode needs that (an
            # emu_stop from an I/O hook would end wherever the current translated block
            # happens to end), and so does the stock engine: its emu_stop from an MMIO write
            # callback leaves RIP on the store that was just done, which then ran twice (a
            # self IPI through the APIC's ICR was sent again on every return from its handler)
            self.cstate.stop_reason |= self.clib.STOP_REQUEST
            if self.icount:
                self.cstate.icount_limit = self.cstate.clock.icount
        else:
            self.uc.emu_stop()

    def _on_interrupt(self, uc, intno, user):
        ctx = self.ctx.save()
        event = PendingEvent("exception", vector=intno, error_code=ctx.i32("error_code") & 0xFFFFFFFF,
                             is_software=bool(ctx.i32("exception_is_int")),
                             next_ip=ctx.u64("exception_next_eip"),
                             cr2=uc.reg_read(X.UC_X86_REG_CR2) if intno == PF else None)
        self.events.append(event)
        self._stop_at_this_instruction()

    def _on_syscall(self, uc, user):
        self.events.append(PendingEvent("syscall"))
        self._stop_at_this_instruction()

    def _stop_at_this_instruction(self):
        """An exception or syscall is an event of this very instruction: the engine stops here
        in deterministic mode too (the stop point is the instruction itself, not a host
        moment).  Left to the next block start, Unicorn would fetch a faulting instruction
        again first, and its second #PF would become #DF."""
        self.request_stop()
        if self.running and self.block_hook:
            self.uc.emu_stop()

    def _on_unmapped(self, uc, access, address, size, value, user):
        kinds = {UC_MEM_WRITE_UNMAPPED: "write to", UC_MEM_FETCH_UNMAPPED: "instruction fetch from"}
        kind = kinds.get(access, "read of")
        self.events.append(PendingEvent("unmapped", detail=f"{kind} unmapped physical address {address:#x} "
                                                           f"(size {size})"))
        return False

    # ---- CPUID: the engine's own answers, corrected to describe this machine
    def _native_cpuid(self):
        probe = new_engine(UC_MODE_64)
        probe.mem_map(0, 0x1000)
        probe.mem_write(0, b"\x0f\xa2\xf4")  # cpuid; hlt
        table = {}

        def ask(leaf, sub=0):
            probe.reg_write(X.UC_X86_REG_EAX, leaf)
            probe.reg_write(X.UC_X86_REG_ECX, sub)
            probe.emu_start(0, 2)
            return [probe.reg_read(r) for r in (X.UC_X86_REG_EAX, X.UC_X86_REG_EBX, X.UC_X86_REG_ECX, X.UC_X86_REG_EDX)]

        max_basic = ask(0)[0]
        for leaf in range(0, max_basic + 1):
            for sub in range(0, _SUBLEAVES.get(leaf, 1)):
                table[(leaf, sub)] = ask(leaf, sub)
        max_ext = ask(0x80000000)[0]
        for leaf in range(0x80000000, max_ext + 1):
            table[(leaf, 0)] = ask(leaf)
        a, b, c, d = table[(1, 0)]
        d = (d | (1 << 9)) if self.has_lapic else (d & ~(1 << 9))  # APIC present only with a LAPIC
        c &= ~((1 << 21) | (1 << 24) | (1 << 3))  # no x2APIC, no TSC-deadline, no MONITOR
        c |= 1 << 31  # hypervisor present
        c &= ~CPUID1_ECX_OSXSAVE  # follows CR4 (_dynamic_cpuid); the probe engine had it set
        if (7, 0) in table:
            table[(7, 0)][2] &= ~CPUID7_ECX_OSPKE
        b &= 0x0000FFFF  # initial APIC id 0, one logical processor
        if self.icount:
            # Unicorn's RDRAND and RDSEED return host entropy: a deterministic machine offers neither
            # (Linux seeds from them and its paths then differ from run to run, timing included)
            c &= ~(1 << 30)
            table[(7, 0)][1] &= ~(1 << 18)
        table[(1, 0)] = [a, b, c, d]
        # no ERMS: a translated rep movsb/stosb moves one byte per iteration, so a guest that
        # trusts the hint (Linux's clear_user/copy_user) runs 4-8 times slower than with
        # rep movsq/stosq; QEMU's default CPU model does not offer it either
        table[(7, 0)][1] &= ~CPUID_7_EBX_ERMS
        self._xsave_components(table)
        # hypervisor leaves: vendor "emu-colo    ", no features
        vendor = struct.unpack("<III", b"EmuColoEmuCo")
        table[(0x40000000, 0)] = [0x40000000, *vendor]
        max_basic = self._add_frequency_leaves(table, max_basic)
        self._max_basic, self._max_ext = max_basic, max_ext
        return table

    @staticmethod
    def _xsave_components(table):
        """Leaf 0xD lists only the state components whose feature CPUID offers, as QEMU's
        does.  The stock engine derives its list before dropping the features TCG lacks (AVX),
        so it names AVX state although AVX is #UD (our build re-derives it: patch 0012).  The
        state-dependent parts (the OSXSAVE bit, the size for the current XCR0) are filled in
        at each CPUID (_dynamic_cpuid)."""
        ecx1, ebx7, ecx7 = table[(1, 0)][2], table.get((7, 0), [0] * 4)[1], table.get((7, 0), [0] * 4)[2]
        if not ecx1 & CPUID1_ECX_XSAVE:
            for sub in range(_SUBLEAVES[0xD]):
                table[(0xD, sub)] = [0, 0, 0, 0]
            return
        offered = XCR0_X87 | XCR0_SSE
        if ecx1 & (1 << 28):
            offered |= 1 << 2  # AVX: YMM upper halves
        if ebx7 & (1 << 14):
            offered |= 3 << 3  # MPX: BNDREGS, BNDCSR
        if ebx7 & (1 << 16):
            offered |= 7 << 5  # AVX-512: opmask, ZMM upper halves, high ZMM
        if ecx7 & (1 << 3):
            offered |= 1 << 9  # PKRU
        eax, _, _, edx = table[(0xD, 0)]
        supported = ((edx << 32) | eax) & offered
        for sub in range(2, _SUBLEAVES[0xD]):
            if not supported & (1 << sub):
                table[(0xD, sub)] = [0, 0, 0, 0]
        table[(0xD, 0)] = [supported & 0xFFFFFFFF, 0, 0, supported >> 32]
        table[(0xD, 0)][2] = X86Cpu._xsave_area_size(table, supported)

    @staticmethod
    def _xsave_area_size(table, xcr0):
        """Bytes of a standard-format XSAVE area holding the components of xcr0 (legacy area
        and header: 576)."""
        size = 576
        for sub in range(2, _SUBLEAVES[0xD]):
            if xcr0 & (1 << sub):
                length, offset = table[(0xD, sub)][:2]
                size = max(size, offset + length)
        return size

    def _offer_arch_capabilities(self):
        """CPUID.7.0:EDX[29] and the MSR's value, where the engine implements its RDMSR
        (engine patch 0013; the stock engine reads every unknown MSR as 0)."""
        self.uc.reg_write(X.UC_X86_REG_MSR, (MSR_IA32_ARCH_CAPABILITIES, ARCH_CAPABILITIES))
        if self.uc.reg_read(X.UC_X86_REG_MSR, MSR_IA32_ARCH_CAPABILITIES) == ARCH_CAPABILITIES:
            self._cpuid_table[(7, 0)][3] |= CPUID_7_EDX_ARCH_CAPABILITIES

    @staticmethod
    def _add_frequency_leaves(table, max_basic):
        """Leaves 0x15 (TSC = crystal * EBX / EAX, crystal in ECX) and 0x16 (base, max and bus
        MHz), as real Intel CPUs and QEMU/KVM report them: Linux then knows the TSC rate
        without timing it against the PIT, which fails in real-time mode (guest time runs on
        while code is translated, so the calibration loops see gaps).  Leaves 0xE-0x14 in
        between stay zero: no feature they describe is emulated."""
        ratio = fractions.Fraction(TSC_HZ, CRYSTAL_HZ)
        table[(0x15, 0)] = [ratio.denominator, ratio.numerator, CRYSTAL_HZ, 0]
        mhz = TSC_HZ // 1_000_000
        table[(0x16, 0)] = [mhz, mhz, CRYSTAL_HZ // 1_000_000, 0]
        max_basic = max(max_basic, 0x16)
        table[(0, 0)] = [max_basic, *table[(0, 0)][1:]]
        return max_basic

    def cpuid(self, leaf, sub):
        """The CPUID answer as the table holds it (without the bits that follow CPU state)."""
        key = (leaf, sub) if leaf in _SUBLEAVES else (leaf, 0)
        return self._cpuid_table.get(key, [0, 0, 0, 0])

    def _dynamic_cpuid(self, leaf, sub, cr4, xcr0):
        """The CPUID answer with the bits that follow the CPU's state, as QEMU's
        cpu_x86_cpuid() computes them: OSXSAVE mirrors CR4.OSXSAVE, OSPKE mirrors CR4.PKE,
        leaf 0xD.0 EBX is the XSAVE area size for the components enabled in XCR0."""
        a, b, c, d = self.cpuid(leaf, sub)
        if leaf == 1 and c & CPUID1_ECX_XSAVE and cr4 & CR4_OSXSAVE:
            c |= CPUID1_ECX_OSXSAVE
        elif leaf == 7 and sub == 0 and c & CPUID7_ECX_PKU and cr4 & CR4_PKE:
            c |= CPUID7_ECX_OSPKE
        elif leaf == 0xD and sub == 0 and a:
            b = self._xsave_area_size(self._cpuid_table, xcr0)
        return a, b, c, d

    def _on_cpuid(self, uc, user):
        leaf = uc.reg_read(X.UC_X86_REG_EAX)
        sub = uc.reg_read(X.UC_X86_REG_ECX)
        # read the engine, not self.context(): the cached copy may predate this slice's work
        cr4 = uc.reg_read(X.UC_X86_REG_CR4)
        xcr0 = self.ctx.save().u64("xcr0") if leaf == 0xD else 0
        a, b, c, d = self._dynamic_cpuid(leaf, sub, cr4, xcr0)
        uc.reg_write(X.UC_X86_REG_RAX, a)
        uc.reg_write(X.UC_X86_REG_RBX, b)
        uc.reg_write(X.UC_X86_REG_RCX, c)
        uc.reg_write(X.UC_X86_REG_RDX, d)
        return 1

    def _host_wrote_ram(self, address, length):
        """Translated code does not see host writes: drop what they overwrote (loaders, DMA)."""
        if self.engine.patched:
            self.engine.invalidate_code(address, address + length)
        else:
            self.uc.ctl_flush_tb()

    def set_a20(self, enabled):
        """Address line 20 (QEMU's x86_cpu_set_a20): while it is low the engine's page walker
        clears bit 20 of every physical address, from the very next access.  The stock engine
        offers no control for it: its context is patched between slices, so a change made by
        an I/O hook lands when the slice ends (it ends at once, after the current block)."""
        if self.engine.patched:
            self.engine.set_a20(enabled)
            return
        mask = -1 if enabled else ~(1 << 20)
        if self.running:
            self._pending_a20_mask = mask
            self.request_stop()
            return
        self._pending_a20_mask = None
        ctx = self.context()
        if ctx.i32("a20_mask") != mask:
            ctx.set_i32("a20_mask", mask)
            ctx.restore()
            self.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)  # every translation may change

    def host_wrote_pages(self, pages):
        """The same for a sorted array of page numbers (a state load): one engine call per run
        of consecutive pages, or one flush of everything when that is cheaper."""
        if not self.engine.patched or len(pages) > 4096:
            self.uc.ctl_flush_tb()
            return
        if not len(pages):
            return
        import numpy as np  # pages is an array: only state loads come here
        breaks = np.flatnonzero(np.diff(pages) != 1) + 1
        for first, last in zip(pages[np.r_[0, breaks]], pages[np.r_[breaks - 1, len(pages) - 1]], strict=True):
            self.engine.invalidate_code(int(first) << 12, (int(last) + 1) << 12)

    # ------------------------------------------------------------------ registers
    def context(self):
        """The engine's state as a :class:`~emu.cpu.context.ContextView`, saved at most once
        between changes: the run loop reads RIP, IF, the mode and the control registers
        from it instead of paying for one engine call per register."""
        if not self._context_fresh:
            self.ctx.save()
            self._context_fresh = True
        return self.ctx

    def _invalidate_context(self):
        self._context_fresh = False

    def reg(self, name):
        return self.uc.reg_read(getattr(X, "UC_X86_REG_" + name.upper()))

    def set_reg(self, name, value):
        self._invalidate_context()
        self.uc.reg_write(getattr(X, "UC_X86_REG_" + name.upper()), value)

    @property
    def rip(self):
        return self.context().u64("eip")

    @property
    def eflags(self):
        """The full EFLAGS (arithmetic flags are computed lazily by the engine: ask it)."""
        return self.uc.reg_read(X.UC_X86_REG_EFLAGS)

    def interrupts_enabled(self):
        return bool(self.context().u64("eflags") & EFLAGS_IF)

    def mode(self):
        """'real', 'protected32' (or 16-bit PM), 'long64' (or compatibility), 'vm86'."""
        ctx = self.context()
        if not ctx.u64("cr") & CR0_PE:
            return "real"
        if ctx.u64("eflags") & EFLAGS_VM:
            return "vm86"
        if ctx.hflags & xc.HF_LMA:
            return "long64"
        return "protected32"

    # ------------------------------------------------------------------ entry states
    def reset(self):
        """Power-on state: real mode, CS:IP = F000:FFF0 with the hidden base FFFF0000."""
        self._power_on_context()
        ctx = self.ctx.save()
        _, _, limit, flags = ctx.segment("cs")
        ctx.load_segment("cs", 0xF000, 0xFFFF0000, limit, flags)
        ctx.restore()
        self.uc.reg_write(X.UC_X86_REG_RIP, 0xFFF0)
        self.uc.reg_write(X.UC_X86_REG_EDX, 0x663)  # family/model/stepping as after RESET
        self._after_restore()

    def _power_on_context(self):
        """Real mode as after RESET: IDTR base 0 limit 0xffff (the real-mode IVT), GDTR idem."""
        self.ctx.load_raw(self._real_mode_context)
        self.ctx.restore()
        self.uc.reg_write(X.UC_X86_REG_IDTR, (0, 0, 0xFFFF, 0))
        self.uc.reg_write(X.UC_X86_REG_GDTR, (0, 0, 0xFFFF, 0))
        self.uc.reg_write(X.UC_X86_REG_CR0, 0x60000010)
        # x87 and SSE control words as after RESET/FINIT (Unicorn leaves them 0)
        self.uc.reg_write(X.UC_X86_REG_FPCW, 0x37F)
        self.uc.reg_write(X.UC_X86_REG_MXCSR, 0x1F80)
        # IA32_MISC_ENABLE as QEMU's reset leaves it: fast strings on (Unicorn clears it)
        self.uc.reg_write(X.UC_X86_REG_MSR, (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING))
        # LDTR and TR caches as QEMU's x86_cpu_reset: present, LDT type 2, busy 32-bit TSS
        ctx = self.ctx.save()
        ctx.load_system_segment("ldt", 0, 0, 0xFFFF, xc.DESC_P | (2 << 8))
        ctx.load_system_segment("tr", 0, 0, 0xFFFF, xc.DESC_P | (11 << 8))
        ctx.restore()
        self._invalidate_context()

    def enter(self, entry):
        """Start from a loader's :class:`~emu.loaders.EntryState`."""
        self._power_on_context()
        if entry.mode == "real":
            ctx = self.ctx.save()
            for seg in ("cs", "ds", "es", "ss", "fs", "gs"):
                sel = entry.cs if seg == "cs" else entry.regs.get(seg, 0)
                base = entry.cs_base if seg == "cs" else None
                _, _, limit, flags = ctx.segment(seg)
                ctx.load_segment(seg, sel, (sel << 4) if base is None else base, limit, flags)
            ctx.restore()
        elif entry.mode in ("protected32", "long64"):
            long_mode = entry.mode == "long64"
            if long_mode:
                self.uc.reg_write(X.UC_X86_REG_CR3, entry.regs.get("cr3", 0))
                self.uc.reg_write(X.UC_X86_REG_CR4, CR4_PAE)
                self.uc.reg_write(X.UC_X86_REG_MSR, (MSR_EFER, EFER_LME | EFER_LMA))
                self.uc.reg_write(X.UC_X86_REG_CR0, CR0_PE | CR0_PG | 0x10)
            else:
                self.uc.reg_write(X.UC_X86_REG_CR0, CR0_PE | 0x10)
            ctx = self.ctx.save()
            code = xc.DESC_P | xc.DESC_S | xc.DESC_CS | xc.DESC_W | xc.DESC_A | xc.DESC_G | 0xF0000
            data = xc.DESC_P | xc.DESC_S | xc.DESC_W | xc.DESC_A | xc.DESC_G | xc.DESC_B | 0xF0000
            code |= xc.DESC_L if long_mode else xc.DESC_B
            cs_sel = entry.cs or 0x10
            ctx.load_segment("cs", cs_sel, 0, 0xFFFFFFFF, code)
            for seg in ("ss", "ds", "es", "fs", "gs"):
                ctx.load_segment(seg, entry.regs.get("ds_selector", cs_sel + 8), 0, 0xFFFFFFFF, data)
            ctx.restore()
            if "gdt" in entry.regs:
                self.uc.reg_write(X.UC_X86_REG_GDTR, (0, entry.regs["gdt"], entry.regs.get("gdt_limit", 0x27), 0))
        else:
            raise GuestError(f"cpu: unknown entry mode {entry.mode!r}")
        for name, value in entry.regs.items():
            if name in ("cr3", "gdt", "gdt_limit", "ds_selector", "ds", "es", "ss", "fs", "gs"):
                continue
            self.set_reg(name, value)
        self.uc.reg_write(X.UC_X86_REG_RIP, entry.ip)
        self.uc.reg_write(X.UC_X86_REG_EFLAGS, 0x2)
        self._after_restore()

    def _after_restore(self):
        self._invalidate_context()
        self.halted = False
        self.events.clear()
        self.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
        self.uc.ctl_flush_tb()

    # ------------------------------------------------------------------ running
    def run_slice(self, deadline_ns, interrupt_waiting=False, past_shadow=False, count=0):
        """Run until the deadline (guest ns), a stop request, a halt or an event.

        ``interrupt_waiting``: an interrupt is pending while IF is clear; the slice then
        ends at the first block that starts with IF set.  ``past_shadow``: the CPU is in an
        interrupt shadow (after ``sti`` / ``mov ss``), where QEMU translates a block of that
        one instruction; the slice ends at the block start after it.  (An instruction-count
        limit would do the same, but Unicorn drops every translated block at the next
        uncounted ``emu_start`` after one.)  ``count``: at most that many instructions (a
        debugger's single step)."""
        cstate = self.cstate
        cstate.stop_reason = 0
        cstate.watch_hit = 0
        window = interrupt_waiting or past_shadow
        if not self.engine.patched:
            cstate.irq_waiting = 1 if window else 0
            cstate.irq_skip_blocks = 1 if past_shadow else 0
        elif window:
            self.engine.request_irq_window(True)  # the engine lets a shadowed instruction pass
        ctx = self.context()
        cr2 = ctx.u64("cr", 2)
        rip = ctx.u64("eip")
        self.stop_requested = False
        cstate.deadline_ns = deadline_ns
        if self.icount:
            budget = max(1, (deadline_ns - self.clock.now() + self.clock.ns_per_unit - 1) // self.clock.ns_per_unit)
            cstate.icount_limit = cstate.clock.icount + budget
        elif not self.block_hook:
            self.clib.deadline_timer_arm(cstate, deadline_ns)
        self._invalidate_context()
        if count:
            # Unicorn counts in a code hook that it adds now, which code translated before
            # does not call: a block translated without it would run on past the count
            self.uc.ctl_flush_tb()
        self.running = True
        try:
            self.uc.emu_start(rip, NEVER, count=count)
        except UcError as e:
            if not self.cstate.exiting:  # after an exit request the rest of the block does not matter
                self._engine_error(e)
        finally:
            self.running = False
            self._invalidate_context()  # a hook may have read registers mid-slice: that copy is old now
            if not self.block_hook:
                self.clib.deadline_timer_disarm(cstate)
            if window and self.engine.patched:
                if self.engine.irq_window_pending():
                    self.engine.request_irq_window(False)  # the slice ended for another reason
                else:
                    cstate.stop_reason |= self.clib.STOP_IRQ_WINDOW
            if not self.engine.patched:
                self._repair_after_slice(cr2)  # the stock engine's phantom page fault
            if self._pending_a20_mask is not None:
                self.set_a20(self._pending_a20_mask == -1)
            for callback in self.on_slice_end:
                callback()
        if self.hook_error is not None:
            err, self.hook_error = self.hook_error, None
            raise err

    def _repair_after_slice(self, cr2):
        """Unicorn leaves a phantom #PF (CR2, old_exception) after every emu_start: undo it."""
        ctx = self.context()
        changed = False
        if ctx.i32("old_exception") != -1:
            ctx.set_i32("old_exception", -1)
            changed = True
        pf = [e for e in self.events if e.kind == "exception" and e.vector == PF]
        want_cr2 = pf[-1].cr2 if pf else cr2
        if ctx.u64("cr", 2) != want_cr2:
            ctx.set_u64("cr", want_cr2, 2)
            changed = True
        if changed:
            ctx.restore()  # the view stays equal to the engine

    def _engine_error(self, e):
        if e.errno == UC_ERR_INSN_INVALID:
            self.events.append(PendingEvent("exception", vector=UD))
            return
        if e.errno in (UC_ERR_READ_UNMAPPED, UC_ERR_WRITE_UNMAPPED, UC_ERR_FETCH_UNMAPPED):
            detail = next((ev.detail for ev in self.events if ev.kind == "unmapped"), str(e))
            raise GuestError(f"cpu: {detail} at RIP={self.rip:#x}") from None
        raise GuestError(f"cpu: Unicorn stopped with {e} at RIP={self.rip:#x}") from None

    def finished_on_hlt(self):
        """True when the engine returned because the guest executed ``hlt``."""
        if self.engine.patched:
            return not self.events and self.engine.halted()
        if self.cstate.stop_reason or self.stop_requested or self.events:
            return False
        result = self.clib.after_hlt(self.cstate, self._uc_handle)  # reads the context into self.ctx
        self._context_fresh = result >= 0
        return result == 1

    def interrupt_shadow(self):
        return bool(self.context().hflags & xc.HF_INHIBIT_IRQ)

    # ------------------------------------------------------------------ memory through the MMU
    def translate(self, linear, write=False, user=False):
        """Linear -> physical through the guest page tables (raises Fault(#PF))."""
        ctx = self.context()
        cr0 = ctx.u64("cr", 0)
        long_mode = bool(ctx.hflags & xc.HF_LMA)
        if long_mode and (linear >> 47) not in (0, (1 << 17) - 1):
            # QEMU's get_physical_address: #GP(0) for a non-canonical address, a stack's too
            raise Fault(GP, 0)
        if not cr0 & CR0_PG:
            return linear if long_mode else linear & 0xFFFFFFFF
        cr3 = ctx.u64("cr", 3)
        cr4 = ctx.u64("cr", 4)
        err = (2 if write else 0) | (4 if user else 0)

        def fault(present):
            raise Fault(PF, err | (1 if present else 0), cr2=linear)

        def check(entry):
            if not entry & 1:
                fault(False)
            if write and not entry & 2 and (user or cr0 & CR0_WP):
                fault(True)
            if user and not entry & 4:
                fault(True)

        ram = self.ram
        if cr4 & CR4_PAE:
            if long_mode:
                table = cr3 & 0x000F_FFFF_FFFF_F000
                levels = ((39, 1), (30, 1 << 30), (21, 1 << 21), (12, 1 << 12))
            else:
                pdpte = ram.read_u64((cr3 & 0xFFFFFFE0) + ((linear >> 30) & 3) * 8)
                if not pdpte & 1:
                    fault(False)
                table = pdpte & 0x000F_FFFF_FFFF_F000
                levels = ((21, 1 << 21), (12, 1 << 12))
            for shift, page in levels:
                entry = self._read_pte(table + ((linear >> shift) & 511) * 8, 8)
                check(entry)
                if shift == 12 or (entry & 0x80 and shift in (30, 21)):
                    base = entry & 0x000F_FFFF_FFFF_F000 & ~(page - 1)
                    return base | (linear & (page - 1))
                table = entry & 0x000F_FFFF_FFFF_F000
        linear &= 0xFFFFFFFF
        pde = self._read_pte((cr3 & 0xFFFFF000) + (linear >> 22) * 4, 4)
        check(pde)
        if pde & 0x80 and cr4 & CR4_PSE:
            return (pde & 0xFFC00000) | ((pde & 0x1FE000) << 19) | (linear & 0x3FFFFF)
        pte = self._read_pte((pde & 0xFFFFF000) + ((linear >> 12) & 1023) * 4, 4)
        check(pte)
        return (pte & 0xFFFFF000) | (linear & 0xFFF)

    def _read_pte(self, physical, size):
        if physical + size > self.ram.size:
            raise GuestError(f"cpu: page table entry at {physical:#x} is outside RAM")
        return int.from_bytes(self.ram.view[physical:physical + size], "little")

    def read_virtual(self, linear, length, user=False):
        out = bytearray()
        while length:
            chunk = min(length, 0x1000 - (linear & 0xFFF))
            phys = self.translate(linear, user=user)
            out += self._read_physical(phys, chunk)
            linear, length = linear + chunk, length - chunk
        return bytes(out)

    def write_virtual(self, linear, data, user=False):
        data = bytes(data)
        pos = 0
        # translate every page first: a fault must not leave a half-written frame
        pieces = []
        while pos < len(data):
            chunk = min(len(data) - pos, 0x1000 - ((linear + pos) & 0xFFF))
            pieces.append((self.translate(linear + pos, write=True, user=user), data[pos:pos + chunk]))
            pos += chunk
        for phys, piece in pieces:
            self._write_physical(phys, piece)

    def _read_physical(self, phys, length):
        if phys + length <= self.ram.size:
            return bytes(self.ram.view[phys:phys + length])
        return bytes(self.uc.mem_read(phys, length))

    def _write_physical(self, phys, data):
        if phys + len(data) <= self.ram.size:
            self.ram.view[phys:phys + len(data)] = memoryview(data).cast("B")
            self.ram.mark_dirty(phys, len(data))
        else:
            raise GuestError(f"cpu: interrupt frame write to {phys:#x} outside RAM")

    # ------------------------------------------------------------------ debugger access and hooks
    def read_debug(self, linear, length):
        """Guest memory at a linear address as a debugger sees it: through the page tables
        with no permission check and no accessed/dirty bits set (QEMU's
        cpu_memory_rw_debug; MMIO is read from its device, as there).  Raises Fault(#PF)
        where a page is not mapped, GuestError where no memory is."""
        out = bytearray()
        while length:
            chunk = min(length, 0x1000 - (linear & 0xFFF))
            phys = self.translate(linear)
            try:
                out += self._read_physical(phys, chunk)
            except UcError:
                raise GuestError(f"cpu: debugger read of unmapped physical address {phys:#x}") from None
            linear, length = linear + chunk, length - chunk
        return bytes(out)

    def write_debug(self, linear, data):
        """A debugger's write at a linear address: even to read-only pages, every page
        translated before any byte is written; translated code over it is dropped."""
        pieces, pos = [], 0
        while pos < len(data):
            chunk = min(len(data) - pos, 0x1000 - ((linear + pos) & 0xFFF))
            phys = self.translate(linear + pos)
            if phys + chunk > self.ram.size:
                raise GuestError(f"cpu: debugger write to {phys:#x} outside RAM")
            pieces.append((phys, data[pos:pos + chunk]))
            pos += chunk
        for phys, piece in pieces:
            self.ram.write(phys, piece)  # marks the pages dirty and invalidates their code

    def load_segment_register(self, name, selector):
        """Load ``name`` (cs, ss, ds, es, fs, gs) with ``selector`` as ``mov`` would
        (QEMU's cpu_x86_load_seg, which its gdbstub uses): ``selector << 4`` as the base
        in real mode, the GDT/LDT descriptor in protected mode (Fault when invalid), a null
        data selector as an unusable segment.  A debugger's register write."""
        ctx = self.context()
        _, _, limit, flags = ctx.segment(name)
        if self.mode() in ("real", "vm86"):
            ctx.load_segment(name, selector, selector << 4, limit, flags)
        elif not selector & 0xFFFC and name != "cs":
            ctx.load_segment(name, selector, 0, 0, 0)
        else:
            base, limit, flags = self._descriptor(selector, ctx)
            # the cache says "accessed", as after mov (which also sets the bit in the GDT: not done here)
            ctx.load_segment(name, selector, base, limit, flags | xc.DESC_A)
        ctx.restore()
        self._invalidate_context()

    def msr(self, index):
        return self.uc.reg_read(X.UC_X86_REG_MSR, index)

    def set_msr(self, index, value):
        self._invalidate_context()
        self.uc.reg_write(X.UC_X86_REG_MSR, (index, value))

    def add_breakpoint(self, linear):
        """Stop before the instruction at ``linear`` (a code hook on that one byte: nothing
        else is slowed).  Translated code is flushed: a hook reaches only code translated
        after it was added."""
        if linear in self._breakpoints:
            return
        self._breakpoints[linear] = self.uc.hook_add(UC_HOOK_CODE, self._on_breakpoint, None, linear, linear)
        self.uc.ctl_flush_tb()

    def remove_breakpoint(self, linear):
        """False when there was none at ``linear``."""
        hook = self._breakpoints.pop(linear, None)
        if hook is None:
            return False
        self.uc.hook_del(hook)
        self.uc.ctl_flush_tb()  # no translated block keeps calling into the removed hook
        return True

    def add_watchpoint(self, kind, linear, length):
        """Stop after an instruction that writes ("watch"), reads ("rwatch") or accesses
        ("awatch") a byte of [linear, linear + length).  Memory hooks only record the hit;
        a C code hook at every instruction (on_watch_step) then stops before the next one,
        so the accessing instruction completes (a stop from the memory hook itself would
        end the slice inside the instruction).  Guest code runs several times slower while
        any watchpoint exists."""
        if kind not in WATCH_KINDS:
            raise GuestError(f"cpu: unknown watchpoint kind {kind!r}")
        key = (kind, linear, length)
        if key in self._watchpoints or length <= 0:
            return
        types = {"watch": (UC_HOOK_MEM_WRITE,), "rwatch": (UC_HOOK_MEM_READ,),
                 "awatch": (UC_HOOK_MEM_READ, UC_HOOK_MEM_WRITE)}[kind]
        self._watchpoints[key] = [self.uc.hook_add(t, self._on_watched_access, key, linear, linear + length - 1)
                                  for t in types]
        if self._watch_step_hook is None:
            self._watch_step_hook = self._c_hook(UC_HOOK_CODE, "on_watch_step")
        self.uc.ctl_flush_tb()

    def remove_watchpoint(self, kind, linear, length):
        """False when there was no such watchpoint."""
        hooks = self._watchpoints.pop((kind, linear, length), None)
        if hooks is None:
            return False
        for hook in hooks:
            self.uc.hook_del(hook)
        if not self._watchpoints and self._watch_step_hook is not None:
            self.remove_hook(self._watch_step_hook)
            self._watch_step_hook = None
        self.uc.ctl_flush_tb()
        return True

    def remove_debug_hooks(self):
        """Every breakpoint and watchpoint (a debugger detached or went away)."""
        for linear in list(self._breakpoints):
            self.remove_breakpoint(linear)
        for key in list(self._watchpoints):
            self.remove_watchpoint(*key)
        self.debug_stop = None

    def _on_breakpoint(self, uc, address, size, user):
        if self.stepping:  # a single step overrides breakpoints (QEMU's check_for_breakpoints)
            return
        if self.debug_stop is None:
            self.debug_stop = DebugStop("breakpoint", address)
        self._stop_at_this_instruction()

    def _on_watched_access(self, uc, access, address, size, value, key):
        if self.debug_stop is None:
            self.debug_stop = DebugStop(key[0], key[1])
        self.cstate.watch_hit = 1  # the C code hook (on_watch_step) stops before the next instruction

    # ------------------------------------------------------------------ descriptors
    def _descriptor(self, selector, ctx):
        """(base, limit, flags) of a GDT/LDT descriptor; Fault(#GP/#NP) when invalid."""
        index = selector & ~7
        if selector & 4:
            _, table, limit, _ = ctx.system_segment("ldt")
        else:
            _, table, limit, _ = self.uc.reg_read(X.UC_X86_REG_GDTR)
        if index + 7 > limit or (index == 0 and not selector & 4):
            raise Fault(GP, selector & 0xFFFC)
        low, high = struct.unpack("<II", self.read_virtual(table + index, 8))
        return xc.descriptor_parts(low, high)

    # ------------------------------------------------------------------ delivery
    def deliver(self, vector, *, external=False, software=False, error_code=None, next_ip=None):
        """Deliver one interrupt or exception; a fault while delivering follows the SDM's
        double-fault table, and a fault while delivering #DF is a triple fault."""
        self.halted = False
        try:
            self._deliver_with_fault_rules(vector, external, software, error_code, next_ip)
        finally:
            self._invalidate_context()

    def _deliver_with_fault_rules(self, vector, external, software, error_code, next_ip):
        # Only an exception can be the first of a double fault: a fault while delivering an
        # external interrupt or INT n is handled on its own, whatever the vector number (an
        # IRQ on vector 8 or an int $8 is no #DF), as QEMU's check_exception sees it.
        first_is_exception = not external and not software
        while True:
            try:
                self._deliver_once(vector, external, software, error_code, next_ip)
                self.exception_counts[vector] = self.exception_counts.get(vector, 0) + 1
                return
            except Fault as fault:
                if fault.vector == PF and fault.cr2 is not None:
                    self._invalidate_context()
                    self.uc.reg_write(X.UC_X86_REG_CR2, fault.cr2)
                if software:
                    # a fault raised by int n / int3 / into points at that instruction
                    start = self._software_interrupt_start(next_ip)
                    self._invalidate_context()
                    self.uc.reg_write(X.UC_X86_REG_RIP, start)
                if first_is_exception and vector == DF:
                    raise TripleFault(f"cpu: triple fault: {EXCEPTION_NAMES.get(fault.vector)} while delivering "
                                      f"#DF at RIP={self.rip:#x}") from None
                if first_is_exception and is_double_fault(vector, fault.vector):
                    vector, error_code = DF, 0
                else:
                    vector, error_code = fault.vector, fault.error_code
                external, software, next_ip = False, False, None
                first_is_exception = True

    def _software_interrupt_start(self, next_ip):
        """Address of the int n (CD ib), int3 (CC), into (CE) or int1 (F1) that ended at next_ip."""
        linear_next = self._linear_rip() - self.rip + next_ip
        try:
            if self.read_virtual(linear_next - 2, 1) == b"\xcd":
                return next_ip - 2
        except Fault:
            pass
        return next_ip - 1

    def _deliver_once(self, vector, external, software, error_code, next_ip):
        mode = self.mode()
        return_ip = next_ip if software and next_ip is not None else self.rip
        push_error = (not software and not external and vector in HAS_ERROR_CODE)
        if self.trace:
            where = "" if external else f" at [{self.disassemble(1)}]"
            self.trace("int", f"deliver {EXCEPTION_NAMES.get(vector, 'vector')} {vector:#x} mode={mode} "
                              f"rip={self.rip:#x}{where} ret={return_ip:#x}"
                              + (f" err={error_code:#x}" if push_error else "") + (" (external)" if external else ""))
        if self.fast_delivery and mode in ("protected32", "long64"):
            # the common case in C; anything unusual (a fault on the way...) comes back here
            if self.clib.deliver_fast(self.cstate, self._uc_handle, vector, int(bool(software)), return_ip,
                                      int(push_error), (error_code or 0) & 0xFFFFFFFF) == 0:
                return
        if mode == "real":
            self._deliver_real(vector, return_ip)
        elif mode == "vm86":
            raise UnsupportedError(f"cpu: interrupt {vector:#x} in virtual-8086 mode is not supported")
        elif mode == "long64":
            self._deliver_long(vector, return_ip, software, push_error, error_code or 0, external)
        else:
            self._deliver_protected(vector, return_ip, software, push_error, error_code or 0, external)

    def _deliver_real(self, vector, return_ip):
        _, idt_base, idt_limit, _ = self.uc.reg_read(X.UC_X86_REG_IDTR)
        if vector * 4 + 3 > idt_limit:
            raise Fault(GP, vector * 8 + 2)
        ctx = self.context()
        ss_sel, ss_base, _, _ = ctx.segment("ss")
        cs_sel = ctx.segment("cs")[0]
        sp = self.uc.reg_read(X.UC_X86_REG_SP)
        flags = self.eflags
        for word in (flags & 0xFFFF, cs_sel, return_ip & 0xFFFF):  # FLAGS, CS, IP; SP wraps at 64 KiB
            sp = (sp - 2) & 0xFFFF
            self._write_physical(ss_base + sp, struct.pack("<H", word))
        ip, cs = struct.unpack("<HH", self._read_physical(idt_base + vector * 4, 4))
        _, _, limit, cs_flags = ctx.segment("cs")
        ctx.load_segment("cs", cs, cs << 4, limit, cs_flags)
        ctx.set_i32("old_exception", -1)
        ctx.restore()
        self.uc.reg_write(X.UC_X86_REG_SP, sp)
        self.uc.reg_write(X.UC_X86_REG_EFLAGS, flags & ~(EFLAGS_IF | EFLAGS_TF | EFLAGS_AC | EFLAGS_RF))
        self.uc.reg_write(X.UC_X86_REG_RIP, ip)

    def _gate(self, vector, size, external):
        _, idt_base, idt_limit, _ = self.uc.reg_read(X.UC_X86_REG_IDTR)
        ext = 1 if external else 0
        if vector * size + size - 1 > idt_limit:
            raise Fault(GP, vector * 8 + 2 + ext)
        raw = self.read_virtual(idt_base + vector * size, size)
        low, high = struct.unpack_from("<II", raw)
        gate_type = (high >> 8) & 0x1F
        dpl = (high >> 13) & 3
        present = high & (1 << 15)
        return raw, low, high, gate_type, dpl, present, ext

    def _check_gate(self, vector, gate_type, dpl, present, software, ext, cpl, allowed):
        if gate_type == 5:
            raise UnsupportedError(f"cpu: vector {vector:#x} uses a task gate, which is not supported")
        if gate_type not in allowed:
            raise Fault(GP, vector * 8 + 2 + ext)
        if software and dpl < cpl:
            raise Fault(GP, vector * 8 + 2)
        if not present:
            raise Fault(NP, vector * 8 + 2 + ext)

    def _target_code_segment(self, selector, ctx, ext):
        if not selector & 0xFFFC:
            raise Fault(GP, ext)
        base, limit, flags = self._descriptor(selector, ctx)
        if not flags & xc.DESC_S or not flags & xc.DESC_CS:
            raise Fault(GP, (selector & 0xFFFC) + ext)
        if not flags & xc.DESC_P:
            raise Fault(NP, (selector & 0xFFFC) + ext)
        return base, limit, flags

    def _deliver_protected(self, vector, return_ip, software, push_error, error_code, external):
        ctx = self.context()
        cpl = ctx.cpl
        _, low, high, gate_type, gate_dpl, present, ext = self._gate(vector, 8, external)
        self._check_gate(vector, gate_type, gate_dpl, present, software, ext, cpl, (6, 7, 0xE, 0xF))
        offset = (low & 0xFFFF) | (high & 0xFFFF0000)
        selector = low >> 16
        is32 = gate_type & 8
        if not is32:
            offset &= 0xFFFF
        cs_base, cs_limit, cs_flags = self._target_code_segment(selector, ctx, ext)
        target_dpl = (cs_flags >> xc.DESC_DPL_SHIFT) & 3
        if target_dpl > cpl:
            raise Fault(GP, (selector & 0xFFFC) + ext)
        old_cs = ctx.segment("cs")[0]
        old_ss, ss_base, _, ss_flags = ctx.segment("ss")
        esp = self.uc.reg_read(X.UC_X86_REG_ESP)
        eflags = self.eflags
        if target_dpl < cpl and not cs_flags & xc.DESC_C:
            new_ss, stack_base, new_ss_limit, new_ss_flags, sp = self._tss_stack(vector, ctx, target_dpl, ext)
            new_ss_cache = (new_ss, stack_base, new_ss_limit, new_ss_flags)
            stack_mask = 0xFFFFFFFF if new_ss_flags & xc.DESC_B else 0xFFFF
            words = [old_ss, esp, eflags, old_cs, return_ip]
        else:
            words = [eflags, old_cs, return_ip]
            stack_base, sp, stack_mask = ss_base, esp, 0xFFFFFFFF if ss_flags & xc.DESC_B else 0xFFFF
            new_ss_cache = None
            target_dpl = cpl
        if push_error:
            words.append(error_code)
        fmt = "<I" if is32 else "<H"
        frame = b"".join(struct.pack(fmt, w & (0xFFFFFFFF if is32 else 0xFFFF)) for w in reversed(words))
        sp = (sp - len(frame)) & stack_mask
        try:
            self.write_virtual(stack_base + sp, frame)
        except Fault as f:
            if f.vector == PF:
                raise
            raise Fault(SS, ext) from None
        if new_ss_cache is not None:
            ctx.load_segment("ss", *new_ss_cache)
        ctx.load_segment("cs", (selector & 0xFFFC) | target_dpl, cs_base, cs_limit, cs_flags)
        ctx.set_i32("old_exception", -1)
        ctx.restore()
        # QEMU's SET_ESP (target/i386/tcg/seg_helper.c): a 16-bit stack keeps the bits of the
        # stack pointer above 15, a 32-bit one clears bits 63:32
        self.uc.reg_write(X.UC_X86_REG_SP if stack_mask == 0xFFFF else X.UC_X86_REG_RSP, sp)
        new_flags = eflags & ~(EFLAGS_TF | EFLAGS_NT | EFLAGS_RF | EFLAGS_VM)
        if not gate_type & 1:  # interrupt gate
            new_flags &= ~EFLAGS_IF
        self.uc.reg_write(X.UC_X86_REG_EFLAGS, new_flags)
        self.uc.reg_write(X.UC_X86_REG_RIP, offset)

    def _tss_stack(self, vector, ctx, dpl, ext):
        """The stack of ring ``dpl`` from the 32-bit TSS: (SS selector, base, limit, flags, ESP)."""
        tr, tss_base, tss_limit, tss_flags = ctx.system_segment("tr")
        if (tss_flags >> 8) & 0xF not in (9, 0xB):
            raise UnsupportedError(f"cpu: vector {vector:#x}: privilege change through a 16-bit TSS "
                                   f"is not supported")
        slot = 4 + 8 * dpl
        if slot + 7 > tss_limit:
            raise Fault(TS, tr & 0xFFFC)  # the TSS is the culprit (QEMU's get_ss_esp_from_tss)
        esp, selector = struct.unpack("<II", self.read_virtual(tss_base + slot, 8))
        selector &= 0xFFFF
        if not selector & 0xFFFC:
            raise Fault(TS, ext)
        # SS of the new ring (SDM, INT n: #TS(SS) unless RPL = DPL = the ring, a writable data
        # segment; QEMU's do_interrupt_protected checks the same)
        bad_stack = Fault(TS, (selector & 0xFFFC) + ext)
        if selector & 3 != dpl:
            raise bad_stack
        try:
            base, limit, flags = self._descriptor(selector, ctx)
        except Fault as f:
            if f.vector == PF:
                raise
            raise bad_stack from None
        if ((flags >> xc.DESC_DPL_SHIFT) & 3 != dpl or not flags & xc.DESC_S or flags & xc.DESC_CS
                or not flags & xc.DESC_W):
            raise bad_stack
        if not flags & xc.DESC_P:
            raise Fault(SS, (selector & 0xFFFC) + ext)
        return selector, base, limit, flags, esp

    def _deliver_long(self, vector, return_ip, software, push_error, error_code, external):
        ctx = self.context()
        cpl = ctx.cpl
        raw, low, high, gate_type, gate_dpl, present, ext = self._gate(vector, 16, external)
        self._check_gate(vector, gate_type, gate_dpl, present, software, ext, cpl, (0xE, 0xF))
        high2 = struct.unpack_from("<I", raw, 8)[0]
        offset = (low & 0xFFFF) | (high & 0xFFFF0000) | (high2 << 32)
        selector = low >> 16
        ist = high & 7
        cs_base, cs_limit, cs_flags = self._target_code_segment(selector, ctx, ext)
        if not cs_flags & xc.DESC_L or cs_flags & xc.DESC_B:
            raise Fault(GP, (selector & 0xFFFC) + ext)
        target_dpl = (cs_flags >> xc.DESC_DPL_SHIFT) & 3
        if cs_flags & xc.DESC_C:
            target_dpl = cpl
        if target_dpl > cpl:
            raise Fault(GP, (selector & 0xFFFC) + ext)
        old_cs = ctx.segment("cs")[0]
        old_ss = ctx.segment("ss")[0]
        rsp = self.uc.reg_read(X.UC_X86_REG_RSP)
        rflags = self.uc.reg_read(X.UC_X86_REG_RFLAGS)
        if ist or target_dpl < cpl:
            tr, tss_base, tss_limit, _ = ctx.system_segment("tr")
            slot = 0x24 + 8 * (ist - 1) if ist else 4 + 8 * target_dpl
            if slot + 7 > tss_limit:
                raise Fault(TS, tr & 0xFFFC)  # the TSS is the culprit (QEMU's get_rsp_from_tss)
            new_rsp = struct.unpack("<Q", self.read_virtual(tss_base + slot, 8))[0]
        else:
            new_rsp = rsp
        new_rsp &= ~0xF
        words = [old_ss, rsp, rflags, old_cs, return_ip] + ([error_code] if push_error else [])
        frame = struct.pack(f"<{len(words)}Q", *[w & NEVER for w in reversed(words)])
        new_rsp = (new_rsp - len(frame)) & NEVER
        self.write_virtual(new_rsp, frame)
        if target_dpl < cpl:
            ctx.load_segment("ss", target_dpl, 0, 0, target_dpl << xc.DESC_DPL_SHIFT)
        ctx.load_segment("cs", (selector & 0xFFFC) | target_dpl, cs_base, cs_limit, cs_flags)
        ctx.set_i32("old_exception", -1)
        ctx.restore()
        self.uc.reg_write(X.UC_X86_REG_RSP, new_rsp)
        new_flags = rflags & ~(EFLAGS_TF | EFLAGS_NT | EFLAGS_RF | EFLAGS_VM)
        if not gate_type & 1:
            new_flags &= ~EFLAGS_IF
        self.uc.reg_write(X.UC_X86_REG_RFLAGS, new_flags)
        self.uc.reg_write(X.UC_X86_REG_RIP, offset)

    def do_syscall(self):
        """SYSCALL as the SDM describes it, for the stock engine (which only calls the hook and
        skips the instruction; our build does it inside the engine).  The engine's own
        single-step trap for it saw the TF from before SFMASK: the run loop drops it, and
        the trap is taken here when TF is still set in the kernel."""
        efer = self.uc.reg_read(X.UC_X86_REG_MSR, MSR_EFER)
        if not efer & EFER_SCE or not efer & EFER_LMA:
            raise Fault(UD)
        next_rip = self.rip
        self._invalidate_context()
        star = self.uc.reg_read(X.UC_X86_REG_MSR, MSR_STAR)
        lstar = self.uc.reg_read(X.UC_X86_REG_MSR, MSR_LSTAR)
        fmask = self.uc.reg_read(X.UC_X86_REG_MSR, MSR_SFMASK)
        rflags = self.uc.reg_read(X.UC_X86_REG_RFLAGS)
        self.uc.reg_write(X.UC_X86_REG_RCX, next_rip)
        self.uc.reg_write(X.UC_X86_REG_R11, rflags & ~EFLAGS_RF)
        selector = (star >> 32) & 0xFFFC
        ctx = self.ctx.save()
        ctx.load_segment("cs", selector, 0, 0xFFFFFFFF, xc.DESC_G | xc.DESC_P | xc.DESC_S | xc.DESC_CS
                         | xc.DESC_W | xc.DESC_A | xc.DESC_L | 0xF0000)
        ctx.load_segment("ss", selector + 8, 0, 0xFFFFFFFF, xc.DESC_G | xc.DESC_B | xc.DESC_P | xc.DESC_S
                         | xc.DESC_W | xc.DESC_A | 0xF0000)
        ctx.restore()
        self.uc.reg_write(X.UC_X86_REG_RFLAGS, rflags & ~fmask & ~EFLAGS_RF)
        self.uc.reg_write(X.UC_X86_REG_RIP, lstar)
        self._invalidate_context()
        if rflags & ~fmask & EFLAGS_TF:
            # TF survives SFMASK: the trap comes once SYSCALL has completed, on the
            # kernel's first instruction (QEMU's helper_rechecking_single_step)
            self.single_step_trap()

    def single_step_trap(self):
        """The single-step trap (#DB with DR6.BS) at the current instruction boundary."""
        self._invalidate_context()
        self.uc.reg_write(X.UC_X86_REG_DR6, self.uc.reg_read(X.UC_X86_REG_DR6) | DR6_BS)
        self.deliver(DB)

    def disassemble(self, count=4):
        """The next instructions at RIP, for error messages and traces (capstone)."""
        import capstone

        mode = self.mode()
        cs_mode = {"real": capstone.CS_MODE_16, "long64": capstone.CS_MODE_64}.get(mode, capstone.CS_MODE_32)
        try:
            code = self.read_virtual(self._linear_rip(), 32)
        except (Fault, GuestError):
            return "<unreadable>"
        md = capstone.Cs(capstone.CS_ARCH_X86, cs_mode)
        return "; ".join(f"{i.mnemonic} {i.op_str}".strip() for i in list(md.disasm(code, self.rip))[:count])

    def _linear_rip(self):
        if self.mode() == "long64":
            return self.rip
        return (self.context().segment("cs")[1] + self.rip) & 0xFFFFFFFF

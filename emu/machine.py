"""The machine: CPU, RAM, buses, clock and devices, and the one run loop that drives them.

The loop runs the CPU in slices up to the nearest timer deadline, then (between slices)
fires due timers, services host file descriptors with ``selectors``, acts on what the CPU
hooks recorded (exceptions, ``syscall``, ``hlt``) and delivers a pending interrupt when the
guest can take it.  A halted CPU sleeps on the host until the next deadline or host input.
"""

import selectors
import sys
import time

from emu.cpu import _emuc
from emu.clock import VirtualClock
from emu.cpu.x86 import DB, UD, DebugStop, Fault, TripleFault, X86Cpu
from emu.device import Device, PortBus
from emu.errors import EmuError, GuestError
from emu.memmap import PhysicalMemory
from emu.memory import GuestRam

MAX_SLICE_NS = 10_000_000  # host input is looked at least every 10 ms of guest time
EPOLL_RESOLUTION_S = 0.001  # epoll_wait's timeout unit
IDLE_WAIT_CAP_S = 0.5


class Machine:
    """A single-CPU x86 machine; boards (``machines/``) add and wire the devices."""

    def __init__(self, machine_type, ram_size, *, icount=False, no_reboot=False, trace=None, has_lapic=False,
                 ns_per_unit=1):
        self.machine_type = machine_type
        self.no_reboot = no_reboot
        self.trace_categories = set(trace or ())
        self.ffi, self.clib = _emuc.ffi, _emuc.lib
        self.cstate = self.ffi.new("emu_state *")
        # guest time lives in the C state, where the TSC and deadline hooks read it
        self.clock = VirtualClock("icount" if icount else "realtime", base=self.ffi.addressof(self.cstate, "clock"),
                                  ns_per_unit=ns_per_unit)
        self.ram = GuestRam(ram_size)
        self.ports = PortBus()
        cpu_trace = self.trace if "int" in self.trace_categories else None
        self.cpu = X86Cpu(self.ram, self.ports, self.clock, self.cstate, self.ffi, self.clib,
                          icount=icount, has_lapic=has_lapic, trace=cpu_trace)
        trace_holes = self.trace if "unassigned" in self.trace_categories else None
        physical_bits = self.cpu.cpuid(0x80000008, 0)[0] & 0xFF or 36  # what CPUID tells the guest
        #: the physical address space: RAM from 0 now; boards add ROMs and MMIO windows
        self.memory = PhysicalMemory(self.cpu, 1 << physical_bits, trace_holes)
        self.memory.host_writes.append(self._memory_remapped)
        #: objects with close() that hold host resources (backends, ROM buffers) for the machine's life
        self.host_resources = []
        self.drives = {}  # drive id -> emu.blockrep.ReplicatedDrive: the disks, as a pair replicates them
        self.devices = []
        self._polled_devices = []  # the devices that have host-side work between slices
        self.fast_paths = []  # C shortcuts that hold device state: to_model() / from_model()
        self.after_load = []  # board hooks run once all state is loaded (re-drive IRQ lines)
        self.pause_requested = False
        self.single_step = False  # the next run executes one instruction, then stops for the debugger
        self.debug_listeners = []  # called with a DebugStop when the guest stops for a debugger
        self.status = "running"  # QEMU's RunState names: running, paused, prelaunch, inmigrate, ...
        self.event_listeners = []
        self.background_jobs = []  # callables run between slices (live migration passes, COLO)
        self.idle_wait_cap = IDLE_WAIT_CAP_S  # longest host sleep between runs of the background jobs
        self._fd_handlers = {}
        self._watched = []      # (backend, on_readable): network backends (watch_backend)
        self._watched_fds = {}  # id(backend) -> its registered fds
        self._dirty_log_on = False
        self._dirty_hook = None  # the stock engine's C write hook
        self.interrupt_controller = None  # has_interrupt() / acknowledge()
        self.exit_status = None
        self.exit_message = None
        self.shutdown_reason = "guest-shutdown"  # QEMU's SHUTDOWN event reason for the end of main_loop
        self.reset_requested = False
        self.boot = None  # callable that loads images and sets the CPU entry state
        self.serial_backends = []  # the host side of the board's serial ports (CharBackend); closed with it
        self.net_backends = []     # the host side of the board's NICs (emu.netdev); closed by the board
        self.name = None  # the guest's name (-name), for QMP query-name
        self.selector = selectors.DefaultSelector()
        self._input_states = []  # (backend, consumer, pending bytearray), one per input
        self._inputs = {}  # fd -> one of _input_states
        self.stats = {"slices": 0, "halts": 0, "interrupts": 0, "exceptions": 0, "resets": 0}
        self.trace_file = sys.stderr
        if "unassigned" in self.trace_categories or "io" in self.trace_categories:
            self.ports.trace = self._trace_io
        self._configure_unassigned_fast_path()

    # ------------------------------------------------------------------ wiring
    def add_device(self, device, ports=(), mmio=None):
        """Attach a device: ``ports`` is a list of (base, count); ``mmio`` a (base, size)."""
        self.devices.append(device)
        if type(device).poll is not Device.poll:
            self._polled_devices.append(device)
        for base, count, *origin in ports:  # (base, count) or (base, count, origin)
            self.ports.register(base, count, device, *origin)
            for port in range(base, base + count):
                self.cstate.in_kind[port] = self.clib.IN_PYTHON
                self.cstate.out_kind[port] = self.clib.OUT_PYTHON
        if mmio is not None:
            self.cpu.map_mmio(mmio[0], mmio[1], device)
        return device

    def add_drive(self, drive_id, image):
        """A disk image (emu.blockdev) under ``drive_id``; returns the backend its device
        must use, through which the disk replication logs and overlays the guest's writes."""
        from emu.blockrep import ReplicatedDrive
        drive = self.drives[drive_id] = ReplicatedDrive(drive_id, image)
        return drive

    def _memory_remapped(self, base, size):
        """A part of the address space was mapped anew (a PAM window): its pages were never
        seen by the engine's dirty log under their new mapping, so count them dirty."""
        if base < self.ram.size:
            self.ram.mark_dirty(base, min(size, self.ram.size - base))

    def map_ports(self, base, count, device):
        """Ports decoded from now on (a PCI I/O BAR): to the device's io_read/io_write."""
        self.ports.register(base, count, device)
        for port in range(base, base + count):
            self.cstate.in_kind[port] = self.clib.IN_PYTHON
            self.cstate.out_kind[port] = self.clib.OUT_PYTHON

    def unmap_ports(self, base, count):
        """Ports no device decodes any more: unassigned again (counted in C unless traced)."""
        self.ports.unregister(base, count)
        traced = "unassigned" in self.trace_categories
        for port in range(base, base + count):
            self.cstate.in_kind[port] = self.clib.IN_PYTHON if traced else self.clib.IN_UNASSIGNED
            self.cstate.out_kind[port] = self.clib.OUT_PYTHON if traced else self.clib.OUT_UNASSIGNED

    def ports_free(self, base, count):
        return self.ports.free(base, count)

    def _configure_unassigned_fast_path(self):
        """Unclaimed ports are counted in C (all ones on read) unless they are traced."""
        traced = "unassigned" in self.trace_categories
        in_kind = self.clib.IN_PYTHON if traced else self.clib.IN_UNASSIGNED
        out_kind = self.clib.OUT_PYTHON if traced else self.clib.OUT_UNASSIGNED
        self.ffi.buffer(self.cstate.in_kind)[:] = bytes([in_kind]) * 0x10000
        self.ffi.buffer(self.cstate.out_kind)[:] = bytes([out_kind]) * 0x10000

    def unassigned_counts(self):
        counts = dict(self.ports.unassigned)
        for port in range(0x10000):
            n = self.cstate.unassigned[port]
            if n:
                counts[port] = counts.get(port, 0) + n
        return counts

    def add_input(self, backend, consumer):
        """Host input: bytes read from ``backend`` are offered to ``consumer(data) -> accepted``."""
        state = (backend, consumer, bytearray())
        self._input_states.append(state)
        for fd in backend.read_fds():
            self._inputs[fd] = state
            self.selector.register(fd, selectors.EVENT_READ, state)

    def discard_pending_input(self, backend):
        """Forget input from ``backend`` not yet taken by the guest (after a state load the
        backend re-reads its stream from the loaded position)."""
        for state in self._input_states:
            if state[0] is backend:
                state[2].clear()

    def _refresh_inputs(self):
        """A backend's fds can change (a TCP client connects): re-register them."""
        wanted = {}
        for state in self._input_states:
            for fd in state[0].read_fds():
                wanted[fd] = state
        for fd in list(self._inputs):
            if fd not in wanted:
                try:
                    self.selector.unregister(fd)
                except (KeyError, ValueError):
                    pass
                del self._inputs[fd]
        for fd, state in wanted.items():
            if fd not in self._inputs:
                self._inputs[fd] = state
                self.selector.register(fd, selectors.EVENT_READ, state)

    def request_exit(self, status, message=None):
        self.exit_status = status
        self.exit_message = message
        self.cstate.exiting = 1  # Unicorn finishes the current block: let it touch no device
        self.cpu.request_stop()

    def request_reset(self):
        self.reset_requested = True
        self.cpu.request_stop()

    # ------------------------------------------------------------------ replication surface
    # What migration and replication may use of a machine: emu.replication.ReplicationSurface.
    def pause(self, status="paused"):
        """Stop the guest (QMP ``stop``, a checkpoint): guest time stops at once, run()
        returns at the next slice boundary, the monitor hears STOP.  ``status``: QEMU's
        RunState for the stop ("debug" when a debugger stopped it)."""
        if self.status == "running":
            self.status = status
            self.pause_requested = True
            self.cpu.request_stop()
            self.clock.stop()  # guest time stops now, not when the loop gets to return
            self.emit("STOP")

    def resume(self):
        """Let a paused (or not yet started, or migrated) guest run again (QMP ``cont``)."""
        if self.status in ("paused", "prelaunch", "postmigrate", "debug"):
            self.status = "running"
            self.pause_requested = False
            self.clock.start()  # a pause/resume pair inside the loop (a checkpoint) must not freeze guest time
            self.emit("RESUME")

    @property
    def ram_size(self):
        return self.ram.size

    @property
    def page_count(self):
        return self.ram.npages

    def save_state(self, ram_pages=None, out=None):
        """Device state (CPU, clock, devices) as a checked stream; RAM pages if asked
        ("all" or page numbers); written to the binary file ``out`` if given.  Never
        changes the machine."""
        from emu.state import machinestate  # numpy and the stream format: not needed to run
        return machinestate.save(self, ram_pages, out)

    def check_state(self, data, verify_checksum=True):
        """Check a whole stream from :meth:`save_state` without applying it (everything
        :meth:`load_state` checks); returns what :meth:`apply_state` takes."""
        from emu.state import machinestate
        return machinestate.check(self, data, verify_checksum)

    def apply_state(self, checked, rollback=True):
        """Apply a stream :meth:`check_state` passed; should a device refuse it still, the
        machine is left as it was.  ``rollback``: the device state to return to then, a
        :meth:`save_state` stream taken since the guest last ran (True: taken now; False:
        nothing worth keeping, no copy)."""
        from emu.state import machinestate
        machinestate.load(self, checked, rollback)

    def load_state(self, data, rollback=True):
        """Load a stream from :meth:`save_state`; rejected whole, machine untouched, if bad."""
        self.apply_state(self.check_state(data), rollback)

    def save_ram(self, pages):
        from emu.state import machinestate  # numpy and the stream format: not needed to run
        return machinestate.save_ram(self, pages)

    def check_ram(self, data, verify_checksum=True):
        """Check a whole RAM-only stream without writing it; returns its pages."""
        from emu.state import machinestate
        return machinestate.check_ram(self, data, verify_checksum)

    def load_ram(self, data):
        from emu.state import machinestate  # numpy and the stream format: not needed to run
        return machinestate.load_ram(self, data)

    def copy_ram(self):
        """A copy of all of RAM (a COLO secondary's RAM cache starts as one)."""
        return self.ram.buf.copy()

    def write_ram_pages(self, pages, source):
        """Copy ``pages`` of ``source`` (a buffer the size of RAM, e.g. a RAM cache) into
        RAM, as a host write: translated code over them is dropped, the dirty log sees them."""
        from emu.state import machinestate
        machinestate.write_pages(self, pages, source)

    def count_zero_pages(self, pages):
        from emu.state import machinestate
        return machinestate.count_zero_pages(self, pages)

    def state_digest(self):
        from emu.state import machinestate  # numpy and the stream format: not needed to run
        return machinestate.digest(self)

    def page_fingerprints(self):
        from emu.state import machinestate
        return machinestate.page_fingerprints(self)

    def start_dirty_log(self):
        """Track every page written from now on, by the CPU or the host.

        The patched engine logs in its TLB (the first store to a clean page takes the slow
        path), including the page walker's accessed/dirty bits; the stock engine needs a C
        write hook, which puts every load and store on the slow path and misses those."""
        if self._dirty_log_on:
            return
        import numpy as np  # page arrays: only migration and COLO use the dirty log
        self.ram.clear_host_dirty()
        self._dirty_out = np.empty(self.ram.npages, dtype=np.uint32)
        if self.cpu.engine.patched:
            self._dirty_bitmap = np.zeros((self.ram.npages + 63) // 64, dtype=np.uint64)
            self.cpu.engine.dirty_log(True)
        else:
            self._dirty_map = np.zeros(self.ram.npages, dtype=np.uint8)
            self.cstate.dirty_map = self.ffi.cast("uint8_t *", self._dirty_map.ctypes.data)
            self.cstate.ram_pages = self.ram.npages
            self._dirty_hook = self.cpu.add_c_memory_write_hook("on_mem_write", 0, self.ram.size - 1)
        self._dirty_log_on = True

    def dirty_pages(self):
        """Page numbers written since the last call (or the start); clears the log."""
        if not self._dirty_log_on:
            raise EmuError("machine: the dirty log is not running")
        out, host = self._dirty_out, self.ffi.cast("uint8_t *", self.ram.host_dirty_address)
        if self.cpu.engine.patched:
            ranges = self.memory.ram_ranges()
            if ranges == [(0, self.ram.size, 0)]:  # RAM in one piece: the engine's bitmap is the page map
                self.cpu.engine.dirty_log_sync(0, self.ram.size, self._dirty_bitmap.ctypes.data)
                bitmap = self.ffi.cast("uint64_t *", self._dirty_bitmap.ctypes.data)
                n = self.clib.collect_dirty_bitmap(bitmap, host, self.ram.npages,
                                                   self.ffi.cast("uint32_t *", out.ctypes.data))
            else:  # PAM windows split it: each piece's bits land at its place in the host map
                for base, size, offset in ranges:
                    self.cpu.engine.dirty_log_sync(base, size, self._dirty_bitmap.ctypes.data)
                    self.clib.or_bits_into_bytes(self.ffi.cast("uint64_t *", self._dirty_bitmap.ctypes.data),
                                                 size >> 12, self.ffi.cast("uint8_t *", host) + (offset >> 12))
                n = self.clib.collect_dirty(host, host, self.ram.npages, self.ffi.cast("uint32_t *", out.ctypes.data))
        else:
            n = self.clib.collect_dirty(self.ffi.cast("uint8_t *", self._dirty_map.ctypes.data), host,
                                        self.ram.npages, self.ffi.cast("uint32_t *", out.ctypes.data))
        return out[:n].copy()

    def stop_dirty_log(self):
        if not self._dirty_log_on:
            return
        if self.cpu.engine.patched:
            self.cpu.engine.dirty_log(False)
        else:
            self.cpu.remove_hook(self._dirty_hook)
            self._dirty_hook = None
        self._dirty_log_on = False

    # the disks (emu.replication.DiskReplicable; the work is emu.blockrep's)
    def disk_sizes(self):
        return {drive_id: drive.size for drive_id, drive in self.drives.items()}

    def disk_chunk_digests(self):
        return {drive_id: drive.chunk_digests() for drive_id, drive in self.drives.items()}

    def start_disk_write_log(self):
        for drive in self.drives.values():
            drive.start_write_log()

    def disk_writes(self):
        return {drive_id: drive.take_written() for drive_id, drive in self.drives.items() if not drive.readonly}

    def stop_disk_write_log(self):
        for drive in self.drives.values():
            drive.stop_write_log()

    def save_disk_blocks(self, blocks):
        from emu import blockrep
        return blockrep.encode(self.drives, blocks)

    def check_disk_blocks(self, data, verify_checksum=True):
        from emu import blockrep
        return blockrep.check(self.drives, data, verify_checksum)

    def write_disk_blocks(self, checked):
        checked.write_into_images()

    def start_disk_overlay(self):
        for drive in self.drives.values():
            drive.start_overlay()

    def discard_disk_overlay(self):
        return sum(drive.discard_overlay() for drive in self.drives.values())

    def end_disk_overlay(self, commit):
        for drive in self.drives.values():
            drive.end_overlay(commit)

    def notify_interrupt(self):
        """A device raised an interrupt: end the CPU slice so that it is delivered promptly."""
        self.cpu.request_stop()

    # ------------------------------------------------------------------ tracing
    def trace(self, category, message):
        print(f"[{self.clock.now() / 1e6:12.3f} ms] {category}: {message}", file=self.trace_file)

    def _trace_io(self, kind, port, size, value, device):
        if device is None and "unassigned" in self.trace_categories:
            self.trace("unassigned", f"{kind} port {port:#06x} size {size} value {value:#x} "
                                     f"(no device; reads return all ones) rip={self.cpu.rip:#x}")
        elif device is not None and "io" in self.trace_categories:
            self.trace("io", f"{kind} port {port:#06x} size {size} value {value:#x} -> {device.name}")

    # ------------------------------------------------------------------ lifecycle
    def close(self):
        """Release host resources (terminal settings, sockets, files)."""
        for device in self.devices:
            device.poll()
        for backend in self.serial_backends:
            backend.close()
        for resource in self.host_resources:
            if hasattr(resource, "close"):
                resource.close()

    def reset(self):
        """System reset: every device and the CPU back to power-on, images reloaded."""
        self.cstate.exiting = 0
        for device in self.devices:
            device.reset()
        self.cpu.reset()
        if self.boot:
            self.boot(self)
        self.reset_requested = False
        self.stats["resets"] += 1

    # ------------------------------------------------------------------ the run loop
    def run(self, until_ns=None):
        """Run until the guest exits (returns the exit status) or ``until_ns`` of guest time.

        A triple fault resets the machine and the run goes on (a loop: a guest that keeps
        triple-faulting resets for ever, as on QEMU); under ``-no-reboot`` it ends the run
        with status 0 instead."""
        clock = self.clock
        clock.start()
        try:
            while True:
                try:
                    return self._run_until_exit(until_ns)
                except TripleFault as e:
                    if "cpu" in self.trace_categories and not self.no_reboot:
                        self.trace("cpu", f"{e}; resetting")
                    if self._guest_reset(str(e)):
                        return self.exit_status
        finally:
            clock.stop()
            self._poll_devices()

    def _run_until_exit(self, until_ns):
        """The run loop proper: slices, timers, host I/O, interrupts, guest-requested resets."""
        clock, cpu = self.clock, self.cpu
        while self.exit_status is None:
            clock.run_due_timers()
            self._poll_devices()
            self._service_host_io(0)
            for job in list(self.background_jobs):
                job()
            if self.reset_requested:
                if self._guest_reset("guest requested a reset"):
                    break
                continue
            if self.exit_status is not None:
                break
            now = clock.now()
            if until_ns is not None and now >= until_ns:
                return None
            if self.pause_requested:
                return None
            if self.single_step and not cpu.halted:
                self._step()  # no interrupt first: QEMU steps with SSTEP_NOIRQ
                continue
            self._maybe_deliver_interrupt()  # then run its handler in this same iteration
            deadline = clock.next_deadline()
            if cpu.halted:
                self._idle(deadline, until_ns)
                continue
            limit = now + MAX_SLICE_NS
            if deadline is not None:
                limit = min(limit, deadline)
            if until_ns is not None:
                limit = min(limit, until_ns)
            intc = self.interrupt_controller
            self._run_cpu(limit, interrupt_waiting=intc is not None and intc.has_interrupt())
        return self.exit_status

    def _guest_reset(self, why):
        """A reset the guest caused (8042, 0xcf9, a triple fault): under ``-no-reboot`` the
        run ends with status 0 (True), otherwise the machine resets and runs on (False)."""
        if self.no_reboot:
            self.request_exit(0, f"{why}; stopping (-no-reboot)")
            self.shutdown_reason = "guest-reset"
            return True
        self.reset()
        self.emit("RESET", {"guest": True, "reason": "guest-reset"})
        return False

    def _run_cpu(self, limit_ns, interrupt_waiting=False, past_shadow=False, count=0):
        cpu = self.cpu
        self.stats["slices"] += 1
        cpu.run_slice(limit_ns, interrupt_waiting, past_shadow, count)
        events, cpu.events = cpu.events, []
        if self.exit_status is not None or self.reset_requested:
            return
        after_syscall = False
        for event in events:
            if event.kind == "exception" and after_syscall and event.vector == DB and not event.is_software:
                after_syscall = False  # the engine's trap for the TF before SFMASK: do_syscall decided
                continue
            after_syscall = event.kind == "syscall"
            if event.kind == "exception":
                self.stats["exceptions"] += 1
                cpu.deliver(event.vector, software=event.is_software, error_code=event.error_code,
                            next_ip=event.next_ip)
            elif event.kind == "syscall":
                try:
                    cpu.do_syscall()
                except Fault:
                    cpu.deliver(UD)
            elif event.kind == "unmapped":
                raise GuestError(f"cpu: {event.detail} at RIP={cpu.rip:#x}")
        if not events and cpu.finished_on_hlt():
            cpu.halted = True
            self.stats["halts"] += 1
        if cpu.debug_stop is not None and not count:  # a step reports its own stop
            stop, cpu.debug_stop = cpu.debug_stop, None
            self._stop_for_debugger(stop)

    def _step(self):
        """One instruction for a debugger, then stop.  An exception it raises is delivered,
        so the step ends on the handler's first instruction, as on QEMU."""
        cpu = self.cpu
        self.single_step = False
        start = cpu.rip
        cpu.stepping = True
        try:
            # far from any timer deadline: a timer must not end the step before the instruction
            self._run_cpu(self.clock.now() + MAX_SLICE_NS, count=1)
        finally:
            cpu.stepping = False
        if self.exit_status is not None or self.reset_requested:
            return
        stop, cpu.debug_stop = cpu.debug_stop, None
        self._stop_for_debugger(stop or DebugStop("step", start))

    def _stop_for_debugger(self, stop):
        """A breakpoint, watchpoint or step ended: the guest stops (RunState "debug") and
        the debugger hears why."""
        self.pause(status="debug")
        for listener in list(self.debug_listeners):
            listener(stop)

    def _maybe_deliver_interrupt(self):
        """Deliver one external interrupt if one is pending and the guest can take it."""
        intc, cpu = self.interrupt_controller, self.cpu
        if intc is None or not intc.has_interrupt():
            return False
        if not cpu.interrupts_enabled():
            return False
        if cpu.interrupt_shadow():
            # the instruction after sti / mov ss runs before any interrupt
            limit = self.clock.now() + MAX_SLICE_NS
            deadline = self.clock.next_deadline()
            self._run_cpu(limit if deadline is None else min(limit, deadline), past_shadow=True)
            if (self.exit_status is not None or self.pause_requested or not intc.has_interrupt()
                    or not cpu.interrupts_enabled()):
                return False
        vector = intc.acknowledge()
        if vector is None:
            return False
        self.stats["interrupts"] += 1
        cpu.deliver(vector, external=True)
        return True

    def _idle(self, deadline, until_ns):
        """A halted CPU: sleep until the next timer or host input (no busy spin)."""
        clock = self.clock
        if until_ns is not None:
            deadline = until_ns if deadline is None else min(deadline, until_ns)
        if clock.mode == "icount":
            self._service_host_io(0)
            if self._has_pending_input_work():
                return
            if deadline is None:
                if not self._inputs:
                    self.request_exit(1, "guest halted with no timer armed and no input possible")
                    return
                self._service_host_io(self.idle_wait_cap)
                return
            clock.warp_to(deadline)
            return
        timeout = self.idle_wait_cap if deadline is None else max(0.0, (deadline - clock.now()) / 1e9)
        self._service_host_io(min(timeout, self.idle_wait_cap))

    def _has_pending_input_work(self):
        intc = self.interrupt_controller
        return intc is not None and intc.has_interrupt() and self.cpu.interrupts_enabled()

    def _poll_devices(self):
        for device in self._polled_devices:
            device.poll()

    def _service_host_io(self, timeout):
        """Read host input (non-blocking when timeout is 0), retry held-back bytes, and run
        the handlers of other host file descriptors (monitor, migration)."""
        held_back = False
        for _backend, consumer, pending in self._input_states:
            if pending:
                del pending[:consumer(bytes(pending))]
                held_back = held_back or bool(pending)
        if held_back:
            timeout = min(timeout, 0.001)  # the guest may drain its FIFO any moment
        if not self._inputs and not self._fd_handlers:
            if timeout:
                time.sleep(timeout)
            return
        changed = False
        ready = self.selector.select(0 if 0 < timeout < EPOLL_RESOLUTION_S else timeout)
        if not ready and 0 < timeout < EPOLL_RESOLUTION_S:
            # epoll waits in whole milliseconds (Python rounds up): a deadline closer than
            # that (a NIC's transmit window, a guest's high-resolution timer) would come up
            # to a millisecond late, so sleep the exact time and look once more
            time.sleep(timeout)
            ready = self.selector.select(0)
        for key, _ in ready:
            if callable(key.data):
                key.data()
                continue
            backend, consumer, pending = key.data
            data = backend.on_readable(key.fd)
            changed = True
            if data:
                pending += data
                del pending[:consumer(bytes(pending))]
        if changed:
            self._refresh_inputs()

    # ------------------------------------------------------------------ host side services
    def add_background_job(self, job):
        """Call ``job()`` between slices, and while paused (live migration passes, COLO)."""
        self.background_jobs.append(job)

    def remove_background_job(self, job):
        if job in self.background_jobs:
            self.background_jobs.remove(job)

    def add_fd_handler(self, fd, callback):
        """Call ``callback()`` between slices whenever ``fd`` is readable (monitor, migration)."""
        self._fd_handlers[fd] = callback
        self.selector.register(fd, selectors.EVENT_READ, callback)

    def watch_backend(self, backend, on_readable):
        """Call ``on_readable(fd)`` between slices whenever one of ``backend.read_fds()`` is
        readable; the set may change (a listening socket accepts its peer, a peer leaves)."""
        self._watched.append((backend, on_readable))
        self._sync_watched()

    def _sync_watched(self):
        for backend, on_readable in self._watched:
            wanted, current = set(backend.read_fds()), self._watched_fds.get(id(backend), set())
            for fd in current - wanted:
                self.remove_fd_handler(fd)
            for fd in wanted - current:
                self.add_fd_handler(fd, lambda fd=fd, handler=on_readable: (handler(fd), self._sync_watched()))
            self._watched_fds[id(backend)] = wanted

    def remove_fd_handler(self, fd):
        if self._fd_handlers.pop(fd, None) is not None:
            try:
                self.selector.unregister(fd)
            except (KeyError, ValueError):
                pass

    def emit(self, event, data=None):
        """A machine event (STOP, RESUME, RESET, SHUTDOWN, ...) for the monitor."""
        for listener in list(self.event_listeners):
            listener(event, data or {})

    def main_loop(self):
        """Run until the guest exits; while paused only the host side (monitor...) is served."""
        while self.exit_status is None:
            if self.status != "running":
                self._service_host_io(min(IDLE_WAIT_CAP_S / 5, self.idle_wait_cap))
                for job in list(self.background_jobs):
                    job()
                continue
            self.run()
        self.status = "shutdown"
        self.emit("SHUTDOWN", {"guest": True, "reason": self.shutdown_reason})
        return self.exit_status

"""The A20 gate: address line 20 of the CPU's physical accesses, masked when disabled.

A PC powers up with A20 enabled; port 0x92 bit 1 (``emu.pcports``) and the keyboard
controller's output port bit 1 (``emu.i8042``) drive it, the last writer winning (QEMU
``hw/i386/pc.c`` handle_a20_line_change -> x86_cpu_set_a20).  While it is low, bit 20 of
every physical address is 0: an address in an odd MiB reaches the even MiB below it.

Unicorn has no address mask, so a disabled gate remaps memory: every odd MiB of RAM is
unmapped and replaced by a window that forwards to the MiB below it (through Python, at
MMIO speed: only boot code runs with A20 off).  Writes through a window mark the page dirty
like any host write.  Code cannot be fetched through a window (as from any MMIO), and code
already translated from a page written through one is not retranslated.  Addresses above
RAM keep their mapping (unassigned either way).
"""

from unicorn import UC_CTL_IO_WRITE, UC_CTL_TLB_FLUSH, UC_PROT_ALL

from .device import Device
from .vmstate import Bool, VMStateDescription

MIB = 1 << 20


class _AliasWindow(Device):
    """An odd MiB while A20 is low: every access lands one MiB lower in RAM."""

    def __init__(self, ram, base):
        super().__init__(f"a20-alias@{base:#x}")
        self.ram = ram
        self.target = base - MIB

    def mmio_read(self, offset, size):
        start = self.target + offset
        return int.from_bytes(self.ram.buf[start:start + size].tobytes(), "little")

    def mmio_write(self, offset, size, value):
        start = self.target + offset
        self.ram.buf[start:start + size] = list(value.to_bytes(size, "little"))
        self.ram.mark_dirty(start, size)


class A20Gate(Device):
    """The A20 line; ``set_level(0/1)`` from the devices that drive it."""

    def __init__(self, name, cpu, ram):
        super().__init__(name)
        self.cpu = cpu
        self.ram = ram
        self.enabled = True
        self._applied = True  # what the engine's memory map currently reflects

    def set_level(self, level):
        self.enabled = bool(level)
        self._apply()

    def reset(self):
        self.set_level(1)

    def _apply(self):
        if self.enabled == self._applied:
            return
        uc = self.cpu.uc
        cr2 = self.cpu.snapshot().u64("cr", 2)
        for base in range(MIB, self.ram.size, 2 * MIB):
            size = min(MIB, self.ram.size - base)
            uc.mem_unmap(base, size)
            if self.enabled:
                uc.mem_map_ptr(base, size, UC_PROT_ALL, self.ram.address + base)
            else:
                window = _AliasWindow(self.ram, base)
                self.cpu.map_mmio(base, size, window)
        if self.enabled:
            self.cpu.mmio = [entry for entry in self.cpu.mmio if not isinstance(entry[2], _AliasWindow)]
        self._applied = self.enabled
        uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
        uc.ctl_flush_tb()
        self._repair_fault_state(cr2)

    def _repair_fault_state(self, cr2):
        """Unicorn's mem_unmap leaves a phantom page fault behind (CR2 and old_exception,
        as after every emu_start).  Inside a slice the slice is ended, and the CPU's
        repair after every slice undoes it; between slices it is undone here."""
        if self.cpu.running:
            self.cpu.request_stop()
            return
        self.cpu._stale()
        context = self.cpu.snapshot()
        context.set_i32("old_exception", -1)
        context.set_u64("cr", cr2, 2)
        context.restore()

    VMSTATE = VMStateDescription("a20", version_id=1, minimum_version_id=1, fields=[Bool("enabled")],
                                 post_load=lambda dev, version_id: dev._apply())

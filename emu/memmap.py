"""The physical address space: regions that may overlap, flattened onto the engine.

Unicorn maps only disjoint ranges.  A PC's address space is layered (QEMU's memory
regions): RAM, the BIOS ROM and its alias below 1 MiB, the i440FX's PAM windows that turn
the 0xc0000-0xfffff range between ROM and RAM, PCI BARs that firmware or the guest move at
run time, the local APIC, and everywhere else nothing (a read of all ones).  This module
keeps the layers as :class:`Region` objects with priorities and, on :meth:`commit`,
computes the flat view (the highest-priority region wins every byte, gaps are
unassigned) and changes only the engine mappings that differ.

Kinds of region:

* ``ram``: host memory the guest reads, writes and executes (``GuestRam`` or a part of it);
* ``rom``: host memory the guest reads and executes; its writes are ignored, counted and
  traced under ``-d unassigned`` (a PC's ROM, or shadow RAM set read-only by the PAM);
* ``mmio``: a device's ``mmio_read``/``mmio_write`` (offsets from the region's base);
* unassigned: what no region covers (:class:`UnassignedMemory`).

A change made while the CPU runs a slice (a PCI config or PAM write from an I/O hook)
takes effect when the slice ends, which it does at once (the rest of the translated block
runs first, as for any stop requested by a hook).
"""

import ctypes
import mmap
from dataclasses import dataclass, field

from emu.device import Device
from emu.errors import ConfigError

PAGE = 0x1000
#: the usual layers, lowest first: PCI BARs lie under RAM (a BAR over RAM is hidden, as in
#: QEMU's "pci" region below "ram"), ROMs and the PAM windows over it, the local APIC on top
BAR_PRIORITY, RAM_PRIORITY, ROM_PRIORITY, SHADOW_PRIORITY, APIC_PRIORITY = 1, 10, 20, 30, 40


@dataclass(eq=False)
class Region:
    """One layer of the address space (``target``: a host address for ram/rom, a device
    for mmio).  ``offset`` is where in the target the region starts."""

    name: str
    base: int
    size: int
    kind: str
    target: object
    priority: int = 0
    offset: int = 0
    enabled: bool = True
    writes_ignored: int = field(default=0)

    @property
    def end(self):
        return self.base + self.size


class UnassignedMemory(Device):
    """A hole of the physical address space: reads all ones, writes are dropped.

    On a PC such an access ends as a PCI master abort, and the machine goes on.  Every
    access is counted, and traced under ``-d unassigned`` (QEMU's "Invalid access at addr
    ..." log).  QEMU 7.2 itself reads 0 there (its unassigned_mem_read); a PC's bus, and
    this machine, read all ones."""

    def __init__(self, base, size, trace=None):
        super().__init__(f"unassigned@{base:#x}")
        self.base = base
        self.size = size
        self.trace = trace
        self.reads = 0
        self.writes = 0

    def mmio_read(self, offset, size):
        self.reads += 1
        if self.trace is not None:
            self.trace("unassigned", f"read of physical address {self.base + offset:#x} size {size} "
                                     "(no device; reads all ones)")
        return (1 << (8 * size)) - 1

    def mmio_write(self, offset, size, value):
        self.writes += 1
        if self.trace is not None:
            self.trace("unassigned", f"write to physical address {self.base + offset:#x} size {size} "
                                     f"value {value:#x} (no device; dropped)")


@dataclass(frozen=True)
class _Piece:
    """A disjoint part of the flat view: [base, base + size) of ``region`` (None: a hole)."""

    base: int
    size: int
    region: Region | None


class PhysicalMemory:
    """The layered address space of one CPU, up to ``limit`` (what CPUID's physical
    address width lets the guest reach)."""

    def __init__(self, cpu, limit, trace=None):
        self.cpu = cpu
        self.limit = limit
        self.trace = trace  # callable(category, message) under -d unassigned
        self.regions = []
        self._applied = []  # the flat view the engine maps now
        self._holes = {}    # base -> UnassignedMemory of the current holes
        self._pending = False
        self.host_writes = []  # callables(base, size): a ram/rom mapping changed there
        cpu.on_slice_end.append(self._commit_if_pending)
        cpu.set_rom_write_handler(self._rom_write)
        # guest RAM from 0, which the CPU maps at its creation, is the first layer
        ram = cpu.ram
        self.ram = Region("ram", 0, ram.size, "ram", ram.address, priority=RAM_PRIORITY)
        self.regions.append(self.ram)
        self._applied = [_Piece(0, ram.size, self.ram)]

    # ------------------------------------------------------------------ layers
    def add(self, name, base, size, kind, target, priority=0, offset=0, commit=True):
        if kind not in ("ram", "rom", "mmio"):
            raise ConfigError(f"memory: region {name}: unknown kind {kind!r}")
        if base % PAGE or size % PAGE or size <= 0:
            raise ConfigError(f"memory: region {name} at {base:#x}+{size:#x} is not page aligned")
        region = Region(name, base, size, kind, target, priority, offset)
        self.regions.append(region)
        if commit:
            self.commit()
        return region

    def remove(self, region, commit=True):
        self.regions.remove(region)
        if commit:
            self.commit()

    def move(self, region, base, enabled=True, commit=True):
        """Place ``region`` at ``base`` (a BAR the guest programmed), or hide it."""
        if base % PAGE:
            raise ConfigError(f"memory: region {region.name}: base {base:#x} is not page aligned")
        region.base, region.enabled = base, enabled
        if commit:
            self.commit()

    def region_at(self, address):
        """The region that decodes ``address`` now (None: unassigned)."""
        for piece in self._applied:
            if piece.base <= address < piece.base + piece.size:
                return piece.region
        return None

    def ram_ranges(self):
        """(guest-physical base, size, offset into guest RAM) of every mapped piece backed
        by guest RAM, writable or not (the dirty log collects over these)."""
        ram = self.cpu.ram.address
        out = []
        for piece in self._applied:
            region = piece.region
            if region is not None and region.kind in ("ram", "rom") and region.target == ram:
                out.append((piece.base, piece.size, region.offset + piece.base - region.base))
        return out

    # ------------------------------------------------------------------ flattening
    def _flatten(self):
        """The disjoint pieces of [0, limit): the highest priority wins, then the region
        added last; gaps are holes."""
        active = [r for r in self.regions if r.enabled and r.base < self.limit]
        cuts = sorted({0, self.limit, *(r.base for r in active), *(min(r.end, self.limit) for r in active)})
        ranked = sorted(enumerate(active), key=lambda item: (item[1].priority, item[0]), reverse=True)
        pieces = []
        for start, stop in zip(cuts, cuts[1:], strict=False):
            owner = next((r for _, r in ranked if r.base <= start and stop <= r.end), None)
            if pieces and pieces[-1].region is owner and pieces[-1].base + pieces[-1].size == start:
                pieces[-1] = _Piece(pieces[-1].base, pieces[-1].size + stop - start, owner)
            else:
                pieces.append(_Piece(start, stop - start, owner))
        return pieces

    def commit(self):
        """Make the engine map the flat view (deferred to the end of a running slice)."""
        if self.cpu.running:
            self._pending = True
            self.cpu.request_stop()
            return
        self._pending = False
        wanted = self._flatten()
        old = set(self._applied)
        new = set(wanted)
        for piece in sorted(old - new, key=lambda p: p.base):
            self.cpu.unmap(piece.base, piece.size)
            if piece.region is None:
                self._holes.pop(piece.base, None)
        changed_memory = False
        for piece in sorted(new - old, key=lambda p: p.base):
            changed_memory |= self._map(piece)
        self._applied = wanted
        if old != new:
            self.cpu.after_memory_map_change(flush_code=changed_memory)

    def _commit_if_pending(self):
        if self._pending:
            self.commit()

    def _map(self, piece):
        """Map one piece; True when it is memory (code may have been translated there)."""
        region, cpu = piece.region, self.cpu
        if region is None:
            hole = UnassignedMemory(piece.base, piece.size, self.trace)
            self._holes[piece.base] = hole
            cpu.map_mmio(piece.base, piece.size, hole)
            return False
        start = region.offset + piece.base - region.base
        if region.kind == "mmio":
            cpu.map_mmio(piece.base, piece.size, region.target, offset=start)
            return False
        cpu.map_memory(piece.base, piece.size, region.target + start, writable=region.kind == "ram")
        for listener in self.host_writes:
            listener(piece.base, piece.size)
        return True

    def _rom_write(self, address, size, value):
        """A guest store to a rom piece: ignored, as on a PC (counted, traced)."""
        region = self.region_at(address)
        if region is not None:
            region.writes_ignored += 1
        if self.trace is not None:
            name = region.name if region is not None else "?"
            self.trace("unassigned", f"write to read-only {name} at {address:#x} size {size} value "
                                     f"{value:#x} (ignored)")

    @property
    def holes(self):
        """The UnassignedMemory objects of the current holes (for statistics and tests)."""
        return list(self._holes.values())


class HostBuffer:
    """Page-aligned host memory holding a ROM image (the engine maps host memory in place:
    the buffer must outlive every mapping of it)."""

    def __init__(self, data):
        size = max(PAGE, (len(data) + PAGE - 1) // PAGE * PAGE)
        self._memory = mmap.mmap(-1, size)
        self._memory[:len(data)] = bytes(data)
        self.size = size
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self._memory))

    @property
    def data(self):
        """The contents (a read-only view)."""
        return memoryview(self._memory).toreadonly()

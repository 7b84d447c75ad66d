"""Physical addresses that no RAM, ROM or device claims.

On a PC such an access ends as a PCI master abort: a read returns all ones and a write
is dropped, and the machine goes on.  The holes are mapped as MMIO regions (rather than
left to Unicorn's unmapped-memory hook, which can only stop the engine), so that a guest
probing for memory sees what it would see on hardware.  Every access is counted, and
traced under ``-d unassigned`` (QEMU's "Invalid access at addr ..." log).  QEMU 7.2 itself
reads 0 there (its unassigned_mem_read); a PC's bus, and this machine, read all ones.
"""

from emu.device import Device

PAGE = 0x1000


class UnassignedMemory(Device):
    """One hole of the physical address space: reads all ones, writes are dropped."""

    def __init__(self, base, size, trace=None):
        super().__init__(f"unassigned@{base:#x}")
        self.base = base
        self.size = size
        self.trace = trace  # callable(category, message) under -d unassigned, else None
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


def holes(mapped, limit):
    """The page-aligned gaps of [0, limit) between the ``mapped`` (begin, end inclusive) ranges."""
    gaps, cursor = [], 0
    for begin, end in sorted(mapped):
        if begin > cursor:
            gaps.append((cursor, begin - cursor))
        cursor = max(cursor, end + 1)
    if cursor < limit:
        gaps.append((cursor, limit - cursor))
    return [(base, size) for base, size in gaps if base % PAGE == 0 and size % PAGE == 0 and size]


def map_holes(cpu, limit, trace=None):
    """Fill every unmapped part of [0, limit) with :class:`UnassignedMemory`; call it once
    RAM, ROM and MMIO devices are mapped.  Returns the regions."""
    regions = []
    for base, size in holes([(begin, end) for begin, end, _ in cpu.uc.mem_regions()], limit):
        region = UnassignedMemory(base, size, trace)
        cpu.map_mmio(base, size, region)
        regions.append(region)
    return regions

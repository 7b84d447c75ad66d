"""Guest physical RAM: one page-aligned numpy buffer that Unicorn maps in place.

The buffer is owned here for the engine's whole life (``mem_map_ptr`` keeps no reference
and a freed buffer crashes the process).  Every host-side write into guest RAM (loaders,
device DMA, state loads) goes through :meth:`GuestRam.write`, which marks the pages in the
host dirty log and asks the CPU to drop translated code that may cover them.
"""

import numpy as np

from .errors import ConfigError, GuestError

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT


def parse_size(text):
    """QEMU-style sizes: ``64M``, ``1G``, ``512k``, plain numbers are MiB (as ``-m``)."""
    t = str(text).strip().upper().removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        if t and t[-1] in mult:
            return int(float(t[:-1]) * mult[t[-1]])
        return int(t) << 20
    except ValueError:
        raise ConfigError(f"bad size {text!r} (expected e.g. 64M or 1G)") from None


class GuestRam:
    """Guest RAM at physical address 0 .. size."""

    def __init__(self, size):
        if size < (1 << 20) or size % PAGE_SIZE:
            raise ConfigError(f"RAM size {size} must be at least 1 MiB and a multiple of 4 KiB")
        if size > 0xE000_0000:
            raise ConfigError(f"RAM size {size >> 20} MiB is above the 3.5 GiB the pc machine maps below 4 GiB")
        self.size = size
        self.npages = size >> PAGE_SHIFT
        raw = np.zeros(size + PAGE_SIZE, dtype=np.uint8)
        offset = (-raw.ctypes.data) % PAGE_SIZE
        self._raw = raw  # keeps the allocation alive
        self.buf = raw[offset:offset + size]
        self.address = self.buf.ctypes.data
        #: pages written by the host since the last collection (OR-ed into the dirty log)
        self.host_dirty = np.zeros(self.npages, dtype=np.uint8)
        #: callables(addr, length) told about host writes (TB flush on the CPU)
        self.write_listeners = []

    def check(self, addr, length):
        if addr < 0 or length < 0 or addr + length > self.size:
            raise GuestError(f"ram: access {addr:#x}+{length:#x} outside RAM of {self.size:#x} bytes")

    def read(self, addr, length):
        self.check(addr, length)
        return self.buf[addr:addr + length].tobytes()

    def write(self, addr, data):
        """A host-side write (loader, DMA): marks dirty pages and invalidates code."""
        data = bytes(data)
        self.check(addr, len(data))
        if not data:
            return
        self.buf[addr:addr + len(data)] = np.frombuffer(data, dtype=np.uint8)
        self.mark_dirty(addr, len(data))
        for listener in self.write_listeners:
            listener(addr, len(data))

    def mark_dirty(self, addr, length):
        if length:
            self.host_dirty[addr >> PAGE_SHIFT:((addr + length - 1) >> PAGE_SHIFT) + 1] = 1

    def read_u32(self, addr):
        return int.from_bytes(self.read(addr, 4), "little")

    def read_u64(self, addr):
        return int.from_bytes(self.read(addr, 8), "little")

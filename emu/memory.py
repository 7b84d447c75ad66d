"""Guest physical RAM: one anonymous page-aligned mapping that Unicorn maps in place.

The mapping is owned here for the engine's whole life (``mem_map_ptr`` keeps no reference
and a freed buffer crashes the process).  Every host-side write into guest RAM (loaders,
device DMA, state loads) goes through :meth:`GuestRam.write`, which marks the pages in the
host dirty log and asks the CPU to drop translated code that may cover them.

``view`` (a memoryview) is what a plain run needs; ``buf`` and ``host_dirty`` are numpy
views of the same memory for page-wise work (snapshots, migration, COLO), made on first
use: importing numpy would double the start-up time of a small guest.
"""

import ctypes
import mmap

from emu.errors import ConfigError, GuestError

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


MAX_RAM_SIZE = 0xE000_0000  # 3.5 GiB: the pc machine maps RAM below 4 GiB only


class GuestRam:
    """Guest RAM at physical address 0 .. size."""

    def __init__(self, size):
        if size < (1 << 20) or size % PAGE_SIZE:
            raise ConfigError(f"RAM size {size} must be at least 1 MiB and a multiple of 4 KiB")
        if size > MAX_RAM_SIZE:
            raise ConfigError(f"RAM size {size >> 20} MiB is above the 3.5 GiB the pc machine maps below 4 GiB")
        self.size = size
        self.npages = size >> PAGE_SHIFT
        self._memory = mmap.mmap(-1, size)  # zero-filled, page aligned, allocated as it is touched
        self.view = memoryview(self._memory)
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self._memory))
        #: pages written by the host since the last collection (OR-ed into the dirty log)
        self._host_dirty = bytearray(self.npages)
        self.host_dirty_address = ctypes.addressof(ctypes.c_char.from_buffer(self._host_dirty))
        self._numpy = None
        #: callables(addr, length) told about host writes (TB flush on the CPU)
        self.write_listeners = []

    @property
    def buf(self):
        """RAM as a numpy uint8 array (the same memory)."""
        return self._numpy_views()[0]

    @property
    def host_dirty(self):
        """The host-write page map as a numpy uint8 array (the same bytes)."""
        return self._numpy_views()[1]

    def _numpy_views(self):
        if self._numpy is None:
            import numpy as np
            self._numpy = (np.frombuffer(self._memory, dtype=np.uint8), np.frombuffer(self._host_dirty, dtype=np.uint8))
        return self._numpy

    def check(self, addr, length):
        if addr < 0 or length < 0 or addr + length > self.size:
            raise GuestError(f"ram: access {addr:#x}+{length:#x} outside RAM of {self.size:#x} bytes")

    def read(self, addr, length):
        self.check(addr, length)
        return bytes(self.view[addr:addr + length])

    def write(self, addr, data):
        """A host-side write (loader, DMA): marks dirty pages and invalidates code."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            data = bytes(data)
        data = memoryview(data).cast("B")
        self.check(addr, len(data))
        if not data:
            return
        self.view[addr:addr + len(data)] = data
        self.mark_dirty(addr, len(data))
        for listener in self.write_listeners:
            listener(addr, len(data))

    def mark_dirty(self, addr, length):
        if length:
            first, last = addr >> PAGE_SHIFT, (addr + length - 1) >> PAGE_SHIFT
            self._host_dirty[first:last + 1] = b"\x01" * (last + 1 - first)

    def clear_host_dirty(self):
        self._host_dirty[:] = bytes(self.npages)

    def read_u32(self, addr):
        return int.from_bytes(self.read(addr, 4), "little")

    def read_u64(self, addr):
        return int.from_bytes(self.read(addr, 8), "little")

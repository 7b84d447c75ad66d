"""The device base class and the two buses (port I/O and MMIO) devices sit on.

A device is a small object with an id (``"serial@0x3f8"``), ``io_read(offset, size)`` /
``io_write(offset, size, value)`` for the ports it claims, ``reset()``, a ``VMSTATE``
description of its guest-visible state, and optionally timers on the machine clock.  It
raises interrupts only through the :class:`~emu.irq.IrqLine` it was given and never
touches another device.
"""

from emu.errors import ConfigError


class Device:
    """Base class of every device model."""

    #: the declarative state description (``emu.state.vmstate.VMStateDescription``)
    VMSTATE = None

    def __init__(self, name):
        self.name = name

    def reset(self):
        """Return to the power-on state (called at machine creation and on system reset)."""

    def io_read(self, offset, size):
        raise NotImplementedError

    def io_write(self, offset, size, value):
        raise NotImplementedError

    # MMIO devices implement these instead
    def mmio_read(self, offset, size):
        raise NotImplementedError

    def mmio_write(self, offset, size, value):
        raise NotImplementedError

    def poll(self):
        """Service host-side backends between CPU slices (optional)."""

    def state_objects(self):
        """The objects whose ``VMSTATE`` make up this device's guest-visible state."""
        return [self] if self.VMSTATE is not None else []

    def __repr__(self):
        return f"<{type(self).__name__} {self.name}>"


ALL_ONES = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF}


class PortBus:
    """The 64 KiB x86 I/O port space.

    Accesses to unclaimed ports read as all ones and are counted (``unassigned``), never
    fatal: a real ISA bus floats high.  A multi-byte access to a port range owned by one
    device is handed to the device whole; one that straddles devices is split into bytes.
    """

    def __init__(self):
        self._owner = [None] * 0x10000  # port -> (device, base)
        self.unassigned = {}  # port -> count of accesses
        self.trace = None  # callable(kind, port, size, value) when tracing is on

    def register(self, base, count, device, origin=None):
        """``device`` decodes [base, base + count); it sees offsets from ``origin`` (``base``
        unless the device's ports have a gap another device fills, as 0xcf9 in 0xcf8-0xcff)."""
        for port in range(base, base + count):
            if self._owner[port] is not None:
                other = self._owner[port][0]
                raise ConfigError(f"ports: {device.name} claims port {port:#x}, already owned by {other.name}")
            self._owner[port] = (device, base if origin is None else origin)

    def unregister(self, base, count):
        for port in range(base, base + count):
            self._owner[port] = None

    def free(self, base, count):
        """Whether no device claims any port of [base, base + count)."""
        return all(self._owner[port] is None for port in range(base, base + count))

    def read(self, port, size):
        port &= 0xFFFF
        entry = self._owner[port]
        if entry is not None and (size == 1 or self._owner[(port + size - 1) & 0xFFFF] is entry
                                  or (self._owner[(port + size - 1) & 0xFFFF] or (None,))[0] is entry[0]):
            device, base = entry
            value = device.io_read(port - base, size) & ALL_ONES[size]
            if self.trace:
                self.trace("in", port, size, value, device)
            return value
        if entry is None and size == 1:
            self._unassigned(port, "in", size, 0xFF)
            return 0xFF
        value = 0
        for i in range(size):
            value |= self.read(port + i, 1) << (8 * i)
        return value

    def write(self, port, size, value):
        port &= 0xFFFF
        value &= ALL_ONES[size]
        entry = self._owner[port]
        if entry is not None and (size == 1 or (self._owner[(port + size - 1) & 0xFFFF] or (None,))[0] is entry[0]):
            device, base = entry
            if self.trace:
                self.trace("out", port, size, value, device)
            device.io_write(port - base, size, value)
            return
        if entry is None and size == 1:
            self._unassigned(port, "out", size, value)
            return
        for i in range(size):
            self.write(port + i, 1, (value >> (8 * i)) & 0xFF)

    def _unassigned(self, port, kind, size, value):
        self.unassigned[port] = self.unassigned.get(port, 0) + 1
        if self.trace:
            self.trace(kind, port, size, value, None)


class MmioRegion:
    __slots__ = ("base", "size", "device")

    def __init__(self, base, size, device):
        self.base, self.size, self.device = base, size, device

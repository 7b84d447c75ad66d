"""Two small PC ports: the POST code port 0x80 and System Control Port A at 0x92.

* Port 0x80 (QEMU ``hw/i386/pc.c`` ioport80_read/ioport80_write, unchanged through 7.2):
  firmware writes progress codes and operating systems write to it as an I/O delay.  QEMU
  ignores the writes and reads return all ones; we also keep the last code written
  (``last_post_code``), as a POST card would show it, for traces and error reports.
* Port 0x92 (QEMU ``hw/i386/port92.c``): bit 0 ``INIT_NOW`` requests a system reset on a
  0 -> 1 transition, bit 1 ``ALT_A20_GATE`` drives the A20 line; the byte reads back as
  written and a system reset clears bit 0.  This machine always runs with A20 enabled, so a
  write that would drive A20 low (bit 1 clear without a reset request) raises
  :class:`~emu.errors.UnsupportedError`; a write that requests a reset is honoured whatever
  bit 1 says, since the reset re-enables A20 anyway.
"""

from .device import Device
from .errors import UnsupportedError
from .vmstate import U8, VMStateDescription

PORT92_RESET = 0x01
PORT92_A20 = 0x02


class PostCodePort(Device):
    """Port 0x80: write-only POST codes."""

    def __init__(self, name):
        super().__init__(name)
        self.last_post_code = 0

    def io_read(self, offset, size):
        return (1 << (8 * size)) - 1

    def io_write(self, offset, size, value):
        self.last_post_code = value & 0xFF

    VMSTATE = VMStateDescription("ioport80", version_id=1, minimum_version_id=1, fields=[U8("last_post_code")])


class SystemControlPortA(Device):
    """Port 0x92 (fast reset and fast A20); ``on_reset()`` requests a system reset."""

    def __init__(self, name, on_reset):
        super().__init__(name)
        self.on_reset = on_reset
        self.outport = 0

    def io_read(self, offset, size):
        value = self.outport
        if size > 1:
            value |= ((1 << (8 * (size - 1))) - 1) << 8  # one port: the bytes above float high
        return value

    def io_write(self, offset, size, value):
        value &= 0xFF
        reset_requested = value & PORT92_RESET and not self.outport & PORT92_RESET
        if not value & PORT92_A20 and not reset_requested:
            raise UnsupportedError(f"port 0x92: disabling the A20 gate is not supported (write {value:#04x})")
        self.outport = value
        if reset_requested:
            self.on_reset()

    def reset(self):
        self.outport &= ~PORT92_RESET

    VMSTATE = VMStateDescription("port92", version_id=1, minimum_version_id=1, fields=[U8("outport")])

"""QEMU's ``isa-debugcon`` (``-debugcon DEV``): a port whose writes go to a character device.

Follows QEMU ``hw/char/debugcon.c``: every byte written to the port (0xe9 by default, or
``-global isa-debugcon.iobase=0x402``, where SeaBIOS writes its log) is sent to the
backend; a read returns the readback value 0xe9, which is how the Bochs BIOS and SeaBIOS
probe for it.  It has no guest state.
"""

from emu.device import Device
from emu.state.vmstate import VMStateDescription

DEFAULT_IOBASE = 0xE9
READBACK = 0xE9


class IsaDebugcon(Device):
    def __init__(self, name, backend):
        super().__init__(name)
        self.backend = backend

    def io_read(self, offset, size):
        return READBACK

    def io_write(self, offset, size, value):
        self.backend.write(bytes([value & 0xFF]))

    def poll(self):
        self.backend.flush()

    VMSTATE = VMStateDescription("isa-debugcon", version_id=1, minimum_version_id=1, fields=[])

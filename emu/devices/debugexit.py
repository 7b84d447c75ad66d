"""QEMU's ``isa-debug-exit`` device: a guest write ends the emulator with a chosen status.

Follows QEMU ``hw/misc/debugexit.c`` as used with ``-device isa-debug-exit,iobase=0xf4,
iosize=0x04``: a write of value ``v`` (any width) requests exit with status ``(v << 1) | 1``,
so a guest can never make the emulator report plain success (0).  The process exit code
keeps the low 8 bits, as ``exit()`` does in QEMU.  Reads return 0 (QEMU's
``debug_exit_read``), which is also how a guest can tell the device is there: an empty ISA
port would read all ones.  The device has no state.
"""

from emu.device import Device
from emu.state.vmstate import VMStateDescription


class IsaDebugExit(Device):
    """``on_exit(status)`` is called on every write (the machine stops the CPU and exits)."""

    def __init__(self, name, on_exit):
        super().__init__(name)
        self.on_exit = on_exit

    def io_read(self, offset, size):
        return 0

    def io_write(self, offset, size, value):
        self.on_exit((value << 1) | 1)

    VMSTATE = VMStateDescription("isa-debug-exit", version_id=1, minimum_version_id=1, fields=[])

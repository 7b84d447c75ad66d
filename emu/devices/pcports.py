"""Small PC ports: the POST code port 0x80, System Control Port A at 0x92 and the reset
control register at 0xcf9.

* Port 0x80 (QEMU ``hw/i386/pc.c`` ioport80_read/ioport80_write, unchanged through 7.2):
  firmware writes progress codes and operating systems write to it as an I/O delay.  QEMU
  ignores the writes and reads return all ones; we also keep the last code written
  (``last_post_code``), as a POST card would show it, for traces and error reports.
* Port 0x92 (QEMU ``hw/i386/port92.c``): bit 0 ``INIT_NOW`` requests a system reset on a
  0 -> 1 transition, bit 1 ``ALT_A20_GATE`` drives the A20 line (``emu.devices.a20``); the byte
  reads back as written and a system reset clears bit 0.
* Port 0xcf9, the PIIX3 reset control register (QEMU ``hw/isa/piix3.c`` rcr_write): a
  write with bit 2 set resets the system; otherwise bit 1 (hard or soft reset, which this
  machine does not tell apart) is kept and reads back.  Linux's ``reboot=pci`` and
  firmware use it.
"""

from emu.device import Device
from emu.errors import StateError
from emu.state.vmstate import U8, VMStateDescription

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
    """Port 0x92 (fast reset and fast A20); ``on_reset()`` requests a system reset and
    ``a20.set_level(level)`` drives the A20 line."""

    def __init__(self, name, on_reset, a20):
        super().__init__(name)
        self.on_reset = on_reset
        self.a20 = a20
        self.outport = 0

    def io_read(self, offset, size):
        value = self.outport
        if size > 1:
            value |= ((1 << (8 * (size - 1))) - 1) << 8  # one port: the bytes above float high
        return value

    def io_write(self, offset, size, value):
        value &= 0xFF
        reset_requested = value & PORT92_RESET and not self.outport & PORT92_RESET
        self.outport = value
        self.a20.set_level(value & PORT92_A20)
        if reset_requested:
            self.on_reset()

    def reset(self):
        self.outport &= ~PORT92_RESET

    VMSTATE = VMStateDescription("port92", version_id=1, minimum_version_id=1, fields=[U8("outport")])


RCR_SYSTEM_RESET = 0x02
RCR_RESET_CPU = 0x04


class ResetControl(Device):
    """Port 0xcf9 (PIIX3 RCR); ``on_reset()`` requests a system reset."""

    def __init__(self, name, on_reset):
        super().__init__(name)
        self.on_reset = on_reset
        self.rcr = 0

    def io_read(self, offset, size):
        value = self.rcr
        if size > 1:
            value |= ((1 << (8 * (size - 1))) - 1) << 8
        return value

    def io_write(self, offset, size, value):
        if value & RCR_RESET_CPU:
            self.on_reset()
            return
        self.rcr = value & RCR_SYSTEM_RESET

    def reset(self):
        self.rcr = 0

    def _check_loaded_state(self):
        if self.rcr & ~RCR_SYSTEM_RESET:
            raise StateError(f"{self.name}: field rcr: {self.rcr:#04x} has bits other than {RCR_SYSTEM_RESET:#04x}")

    VMSTATE = VMStateDescription("piix3-rcr", version_id=1, minimum_version_id=1, fields=[U8("rcr")],
                                 post_load=lambda dev, version_id: dev._check_loaded_state())

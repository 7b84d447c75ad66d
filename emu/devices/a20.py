"""The A20 gate: address line 20 of the CPU's physical accesses, masked when disabled.

A PC powers up with A20 enabled; port 0x92 bit 1 (``emu.devices.pcports``) and the keyboard
controller's output port bit 1 (``emu.devices.i8042``) drive it, the last writer winning (QEMU
``hw/i386/pc.c`` handle_a20_line_change -> x86_cpu_set_a20).  While it is low, bit 20 of
every physical address the CPU forms is 0: an address in an odd MiB reaches the even MiB
below it.  The engine is QEMU's: its page walker applies the CPU's ``a20_mask`` to every
physical address, code fetches included, so the gate only sets that mask (``X86Cpu.set_a20``).
Host-side accesses (DMA, loaders) are not masked, as on a PC where the gate sits in the CPU's
path only.
"""

from emu.device import Device
from emu.state.vmstate import Bool, VMStateDescription


class A20Gate(Device):
    """The A20 line; ``set_level(0/1)`` from the devices that drive it."""

    def __init__(self, name, cpu):
        super().__init__(name)
        self.cpu = cpu
        self.enabled = True

    def set_level(self, level):
        self.enabled = bool(level)
        self.cpu.set_a20(self.enabled)

    def reset(self):
        self.set_level(1)

    VMSTATE = VMStateDescription("a20", version_id=1, minimum_version_id=1, fields=[Bool("enabled")],
                                 post_load=lambda dev, version_id: dev.cpu.set_a20(dev.enabled))

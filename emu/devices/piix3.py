"""The Intel 82371SB (PIIX3) PCI-to-ISA bridge, PCI 00:01.0, as on QEMU's pc board
(hw/isa/piix3.c; datasheet 290550, 2.2).

What it does here: it identifies the ISA bridge (8086:7000, class 0x0601, a multifunction
device) and routes the four PCI interrupt lines PIRQA-D to ISA IRQs through its PIRQ route
control registers (0x60-0x63: bit 7 disables the route, bits 3:0 name the IRQ).  Several
PIRQs routed to one IRQ are wire-ORed, as QEMU's piix3_set_irq_level does; PCI interrupts
are level triggered, which firmware tells the 8259s through their ELCR registers.
"""

from emu.devices.pci import PciDevice, pci_vmstate

PIRQRC = 0x60
DISABLED = 0x80
#: IRQs a PIRQ may be routed to (datasheet: 0-2, 8 and 13 are reserved)
ROUTABLE = {3, 4, 5, 6, 7, 9, 10, 11, 12, 14, 15}


class Piix3IsaBridge(PciDevice):
    """``isa_irq(n)`` gives the IrqLine of ISA IRQ ``n`` (the 8259 input)."""

    def __init__(self, name, isa_irq):
        super().__init__(name, vendor_id=0x8086, device_id=0x7000, class_code=0x060100, multifunction=True,
                         subsystem_vendor_id=0x1AF4, subsystem_id=0x1100)
        self.isa_irq = isa_irq
        self.pirq_levels = [0, 0, 0, 0]
        self._lines = {}
        self._driven = {}  # irq -> level this bridge drives
        for i in range(4):
            self.config[PIRQRC + i] = DISABLED
            self.wmask[PIRQRC + i] = 0x8F

    def route(self, pirq):
        """The ISA IRQ ``pirq`` is routed to, or None."""
        value = self.config[PIRQRC + pirq]
        irq = value & 0x0F
        return None if value & DISABLED or irq not in ROUTABLE else irq

    def set_pirq(self, pirq, level):
        """The PCI bus's wire-OR of the INTx pins on PIRQ ``pirq`` changed."""
        self.pirq_levels[pirq] = level
        self._drive()

    def config_written(self, offset, size):
        if offset < PIRQRC + 4 and offset + size > PIRQRC:
            self._drive()

    def reset_function(self):
        self.pirq_levels = [0, 0, 0, 0]
        self._drive()

    def _drive(self):
        levels = {}
        for pirq in range(4):
            irq = self.route(pirq)
            if irq is not None:
                levels[irq] = levels.get(irq, 0) | self.pirq_levels[pirq]
        for irq in set(levels) | set(self._driven):
            level = levels.get(irq, 0)
            if self._driven.get(irq, 0) != level or irq not in self._driven:
                if irq not in self._lines:
                    self._lines[irq] = self.isa_irq(irq)
                self._lines[irq].set_level(level)
            if irq in levels:
                self._driven[irq] = level
            else:
                self._driven.pop(irq, None)

    VMSTATE = pci_vmstate("PIIX3")

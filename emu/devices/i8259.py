"""Intel 8259A programmable interrupt controllers: the master/slave pair of a PC.

Follows the Intel 8259A datasheet (order no. 231468) and the behaviour of QEMU's
``hw/intc/i8259.c`` / ``hw/intc/i8259_common.c``, with the PIIX-style ELCR (ports
0x4d0/0x4d1) that selects edge or level triggering per input.

Wiring on the port bus (``io_read``/``io_write`` get an offset from the base)::

    device          base    count   ports
    pic.master      0x20    2       0x20 command (ICW1, OCW2, OCW3; IRR/ISR/poll) 0x21 data (ICW2-4, IMR)
    pic.slave       0xa0    2       0xa0, 0xa1 likewise
    pic.elcr        0x4d0   2       0x4d0 master ELCR, 0x4d1 slave ELCR

:meth:`Pic8259Pair.port_devices` returns exactly these triples.  The pair itself claims no
ports: it is the machine's interrupt controller (``has_interrupt()``, ``acknowledge()``)
and the sink of the sixteen ISA IRQ lines (``set_irq``, ``irq_lines()``).  Each chip has its
own ``VMSTATE``; the ELCR port device and the pair hold no state of their own.

Chipset facts taken from the PIIX/QEMU model rather than the bare 8259A: the slave is always
on master input 2 (ICW3 is accepted and ignored), vectors are always 8086-style (ICW4 uPM is
ignored), and ELCR bits for IRQ 0, 1, 2, 8 and 13 are wired to 0 (edge).
"""

from emu.device import Device
from emu.errors import StateError
from emu.irq import IrqLine
from emu.state.vmstate import U8, Bool, VMStateDescription

CASCADE_INPUT = 2  # the master input the slave's INT output drives
SPURIOUS_LEVEL = 7  # a chip answers INTA with IR7 when no request is left
MASTER_ELCR_MASK = 0xF8  # IRQ 0, 1, 2 always edge triggered
SLAVE_ELCR_MASK = 0xDE  # IRQ 8 and 13 always edge triggered
NUM_IRQS = 16


def _no_output(level):
    """An INT output connected to nothing."""


class Pic8259(Device):
    """One 8259A chip: IRR, ISR, IMR, priority logic, and the ICW/OCW command decoder."""

    def __init__(self, name, *, is_master, elcr_mask, int_output=None):
        super().__init__(name)
        self.is_master = is_master
        self.elcr_mask = elcr_mask
        self.int_output = int_output or _no_output
        self.output_level = 0  # derived: INT pin, re-computed from the registers
        self.last_irr = 0
        self.irr = 0
        self.elcr = 0
        self.ltim = False
        self.reset()

    # ------------------------------------------------------------------ reset
    def reset(self):
        """Power-on: like an ICW1, plus ELCR and LTIM cleared and all inputs seen low."""
        self.elcr = 0
        self.ltim = False
        self.last_irr = 0
        self._initialization_reset()
        self._update_output()

    def _initialization_reset(self):
        """What ICW1 does (datasheet "Initialization Command Words", a-e).

        The edge sense latches are reset, so an input that stays high must go low and high
        again to request; ``last_irr`` keeps the sensed pin levels for exactly that reason.
        Level-triggered requests keep following their pins.
        """
        self.irr = self.last_irr & self._level_triggered()
        self.imr = 0
        self.isr = 0
        self.priority_add = 0  # IR7 lowest priority
        self.irq_base = 0
        self.read_reg_select = False  # status read set to IRR
        self.poll_pending = False
        self.special_mask = False
        self.init_state = 0
        self.auto_eoi = False
        self.rotate_on_auto_eoi = False
        self.special_fully_nested_mode = False
        self.init4 = False
        self.single_mode = False

    # ------------------------------------------------------------------ inputs and priority
    def _level_triggered(self):
        """The inputs that are level triggered: all with ICW1 LTIM, else those set in ELCR."""
        return 0xFF if self.ltim else self.elcr

    def set_input(self, level_index, level):
        """The IRn pin ``level_index`` (0..7) is driven to ``level``."""
        mask = 1 << level_index
        if self._level_triggered() & mask:
            if level:
                self.irr |= mask
                self.last_irr |= mask
            else:
                self.irr &= ~mask
                self.last_irr &= ~mask
        elif level:
            if not self.last_irr & mask:
                self.irr |= mask  # rising edge; the request stays latched after the pin drops
            self.last_irr |= mask
        else:
            self.last_irr &= ~mask
        self._update_output()

    def _rank(self, level):
        """0 is the highest priority; ``priority_add`` is the level just after the lowest."""
        return (level - self.priority_add) & 7

    def _highest(self, mask):
        """The highest-priority level set in ``mask``, or None."""
        for rank in range(8):
            level = (rank + self.priority_add) & 7
            if mask & (1 << level):
                return level
        return None

    def highest_request(self):
        """The level this chip would present on INTA now, or None.

        Normal (fully nested) mode: an unmasked request interrupts only if its priority is
        higher than every level in service.  Special fully nested mode (master): the slave's
        input is not locked out by its own in-service bit, so a higher request inside the
        slave gets through.  Special mask mode: every unmasked level not in service may
        interrupt, lower as well as higher (datasheet "Special Mask Mode").
        """
        requests = self.irr & ~self.imr & 0xFF
        if not requests:
            return None
        nested_cascade = self.is_master and self.special_fully_nested_mode
        if self.special_mask:
            eligible = requests & ~self.isr
            if nested_cascade:
                eligible |= requests & (1 << CASCADE_INPUT)
            return self._highest(eligible)
        level = self._highest(requests)
        in_service = self._highest(self.isr)
        if in_service is None or self._rank(level) < self._rank(in_service):
            return level
        if nested_cascade and level == in_service == CASCADE_INPUT:
            return level
        return None

    def _update_output(self):
        level = 1 if self.highest_request() is not None else 0
        if level != self.output_level:
            self.output_level = level
            self.int_output(level)

    def acknowledge_level(self, level):
        """The INTA cycle (or a poll read) took ``level``: set its ISR bit, clear an edge request."""
        mask = 1 << level
        if self.auto_eoi:
            if self.rotate_on_auto_eoi:
                self.priority_add = (level + 1) & 7
        else:
            self.isr |= mask
        if not self._level_triggered() & mask:
            self.irr &= ~mask  # a level request follows its pin, INTA does not clear it
        self._update_output()

    # ------------------------------------------------------------------ guest access
    def io_read(self, offset, size):
        value = 0
        for i in range(size):
            value |= self._read_byte((offset + i) & 1) << (8 * i)
        return value

    def io_write(self, offset, size, value):
        for i in range(size):
            self._write_byte((offset + i) & 1, (value >> (8 * i)) & 0xFF)

    def _read_byte(self, offset):
        if self.poll_pending:
            # The poll command turns the next read (either port) into an INTA.
            self.poll_pending = False
            level = self.highest_request()
            if level is None:
                return 0
            self.acknowledge_level(level)
            return 0x80 | level
        if offset == 0:
            return self.isr if self.read_reg_select else self.irr
        return self.imr

    def _write_byte(self, offset, value):
        if offset == 0:
            if value & 0x10:
                self._write_icw1(value)
            elif value & 0x08:
                self._write_ocw3(value)
            else:
                self._write_ocw2(value)
        else:
            self._write_data(value)

    def _write_icw1(self, value):
        # ADI and the MCS-80 address bits have no meaning on a PC and are ignored.
        self.ltim = bool(value & 0x08)
        self._initialization_reset()
        self.init_state = 1
        self.init4 = bool(value & 0x01)
        self.single_mode = bool(value & 0x02)
        self._update_output()

    def _write_data(self, value):
        if self.init_state == 0:  # OCW1
            self.imr = value
            self._update_output()
        elif self.init_state == 1:  # ICW2
            self.irq_base = value & 0xF8
            if self.single_mode:
                self.init_state = 3 if self.init4 else 0
            else:
                self.init_state = 2
        elif self.init_state == 2:  # ICW3: the cascade is wired on a PC
            self.init_state = 3 if self.init4 else 0
        else:  # ICW4
            self.special_fully_nested_mode = bool(value & 0x10)
            self.auto_eoi = bool(value & 0x02)
            self.init_state = 0
            self._update_output()

    def _write_ocw2(self, value):
        command = value >> 5
        level = value & 7
        if command in (0, 4):  # rotate in automatic EOI mode: clear / set
            self.rotate_on_auto_eoi = command == 4
        elif command in (1, 5):  # non-specific EOI, optionally rotating
            # In special mask mode masked levels are invisible to a non-specific EOI.
            in_service = self.isr & ~self.imr if self.special_mask else self.isr
            top = self._highest(in_service)
            if top is not None:
                self.isr &= ~(1 << top)
                if command == 5:
                    self.priority_add = (top + 1) & 7
        elif command == 3:  # specific EOI
            self.isr &= ~(1 << level)
        elif command == 6:  # set priority: ``level`` becomes the lowest
            self.priority_add = (level + 1) & 7
        elif command == 7:  # rotate on specific EOI
            self.isr &= ~(1 << level)
            self.priority_add = (level + 1) & 7
        # command 2 is a no-operation
        self._update_output()

    def _write_ocw3(self, value):
        if value & 0x04:
            self.poll_pending = True
        if value & 0x02:
            self.read_reg_select = bool(value & 0x01)
        if value & 0x40:
            self.special_mask = bool(value & 0x20)
        self._update_output()

    # ------------------------------------------------------------------ ELCR
    def read_elcr(self):
        return self.elcr

    def write_elcr(self, value):
        """Select edge (0) or level (1) per input; wired-edge inputs ignore the write."""
        self.elcr = value & self.elcr_mask
        level = self._level_triggered()
        self.irr = (self.irr & ~level) | (self.last_irr & level)  # level requests follow the pins
        self._update_output()

    # ------------------------------------------------------------------ state
    def _post_load(self, version_id):
        def bad(field, why):
            raise StateError(f"{self.name}: field {field}: {why}")

        if self.init_state > 3:
            bad("init_state", f"value {self.init_state} is not 0..3")
        if self.init_state == 2 and self.single_mode:
            bad("init_state", "waiting for ICW3 in single mode")
        if self.init_state == 3 and not self.init4:
            bad("init_state", "waiting for ICW4 that ICW1 did not announce")
        if self.priority_add > 7:
            bad("priority_add", f"value {self.priority_add} is not 0..7")
        if self.irq_base & 7:
            bad("irq_base", f"value {self.irq_base:#x} is not a multiple of 8")
        if self.elcr & ~self.elcr_mask:
            bad("elcr", f"value {self.elcr:#x} sets bits outside the mask {self.elcr_mask:#x}")
        self.output_level = 1 if self.highest_request() is not None else 0

    VMSTATE = VMStateDescription(
        "i8259", version_id=1, minimum_version_id=1,
        fields=[
            U8("last_irr"), U8("irr"), U8("imr"), U8("isr"), U8("priority_add"), U8("irq_base"),
            Bool("read_reg_select"), Bool("poll_pending"), Bool("special_mask"), U8("init_state"),
            Bool("auto_eoi"), Bool("rotate_on_auto_eoi"), Bool("special_fully_nested_mode"),
            Bool("init4"), Bool("single_mode"), U8("elcr"), Bool("ltim"),
        ],
        post_load=lambda dev, version_id: dev._post_load(version_id),
    )


class ElcrPorts(Device):
    """Ports 0x4d0 (master) and 0x4d1 (slave): the edge/level control registers.

    Stateless: the ELCR bits belong to each chip's state.
    """

    def __init__(self, master, slave, name="elcr@0x4d0"):
        super().__init__(name)
        self.chips = (master, slave)

    def io_read(self, offset, size):
        value = 0
        for i in range(size):
            value |= self.chips[(offset + i) & 1].read_elcr() << (8 * i)
        return value

    def io_write(self, offset, size, value):
        for i in range(size):
            self.chips[(offset + i) & 1].write_elcr((value >> (8 * i)) & 0xFF)


class Pic8259Pair(Device):
    """The PC's two cascaded 8259As, seen by the CPU as one interrupt controller.

    ``int_output(level)`` is called whenever the master's INT pin changes.  ISA IRQ ``n``
    (0..15) enters through :meth:`set_irq`; IRQ 2 is the master's cascade input itself.
    """

    def __init__(self, int_output=None, name="pic"):
        super().__init__(name)
        self.int_output = int_output or _no_output
        self.master = Pic8259("pic@0x20", is_master=True, elcr_mask=MASTER_ELCR_MASK,
                              int_output=self._master_output)
        self.slave = Pic8259("pic@0xa0", is_master=False, elcr_mask=SLAVE_ELCR_MASK,
                             int_output=self._slave_output)
        self.elcr = ElcrPorts(self.master, self.slave)

    def port_devices(self):
        """The (device, base port, port count) triples the machine registers on the PortBus."""
        return [(self.master, 0x20, 2), (self.slave, 0xA0, 2), (self.elcr, 0x4D0, 2)]

    def _master_output(self, level):
        self.int_output(level)

    def _slave_output(self, level):
        self.master.set_input(CASCADE_INPUT, level)

    # ------------------------------------------------------------------ inputs
    def set_irq(self, irq, level):
        """The sink of the ISA IRQ lines (``IrqLine(pic.set_irq, n)``)."""
        if not 0 <= irq < NUM_IRQS:
            raise ValueError(f"{self.name}: IRQ {irq} is not 0..15")
        if irq < 8:
            self.master.set_input(irq, level)
        else:
            self.slave.set_input(irq - 8, level)

    def irq_line(self, irq):
        if not 0 <= irq < NUM_IRQS:
            raise ValueError(f"{self.name}: IRQ {irq} is not 0..15")
        return IrqLine(self.set_irq, irq)

    def irq_lines(self):
        """Sixteen lines; element n drives ISA IRQ n."""
        return [self.irq_line(n) for n in range(NUM_IRQS)]

    # ------------------------------------------------------------------ the CPU side
    @property
    def int_pending(self):
        """The master's INT pin: an interrupt would be delivered if the CPU accepted one."""
        return bool(self.master.output_level)

    def has_interrupt(self):
        return self.int_pending

    def acknowledge(self):
        """The INTA cycle: the vector the CPU receives.

        A chip with no request left answers with its IR7 vector and sets no ISR bit (a
        spurious interrupt).  A request on the cascade input makes the slave supply the
        vector; the master's ISR bit 2 is set even if the slave's answer is spurious.
        """
        master, slave = self.master, self.slave
        level = master.highest_request()
        if level is None:
            return master.irq_base + SPURIOUS_LEVEL
        if level != CASCADE_INPUT:
            master.acknowledge_level(level)
            return master.irq_base + level
        slave_level = slave.highest_request()
        if slave_level is None:
            vector = slave.irq_base + SPURIOUS_LEVEL
        else:
            slave.acknowledge_level(slave_level)
            vector = slave.irq_base + slave_level
        master.acknowledge_level(CASCADE_INPUT)
        return vector

    # ------------------------------------------------------------------ lifecycle
    def reset(self):
        self.master.reset()
        self.slave.reset()

    def sync_outputs(self):
        """After a state load: re-drive the cascade wire and report the master's INT level."""
        self.master.set_input(CASCADE_INPUT, self.slave.output_level)
        self.int_output(self.master.output_level)

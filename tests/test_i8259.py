"""8259A pair: register behaviour through the port bus, qtest style."""

import pytest

from emu.device import PortBus
from emu.errors import StateError
from emu.devices.i8259 import Pic8259Pair

MASTER_CMD, MASTER_DATA, SLAVE_CMD, SLAVE_DATA, ELCR = 0x20, 0x21, 0xA0, 0xA1, 0x4D0
EOI = 0x20


class Board:
    """A pair on a port bus, its sixteen lines and a log of the master INT pin."""

    def __init__(self):
        self.int_log = []
        self.pic = Pic8259Pair(int_output=self.int_log.append)
        self.bus = PortBus()
        for device, base, count in self.pic.port_devices():
            self.bus.register(base, count, device)
        self.irq = self.pic.irq_lines()

    def outb(self, port, value):
        self.bus.write(port, 1, value)

    def inb(self, port):
        return self.bus.read(port, 1)

    def linux_init(self):
        """arch/x86/kernel/i8259.c init_8259A(auto_eoi=0), then all lines unmasked."""
        self.outb(MASTER_DATA, 0xFF)
        self.outb(SLAVE_DATA, 0xFF)
        self.outb(MASTER_CMD, 0x11)  # ICW1: edge, cascade, ICW4 follows
        self.outb(MASTER_DATA, 0x30)  # ICW2: vectors 0x30-0x37
        self.outb(MASTER_DATA, 0x04)  # ICW3: slave on IR2
        self.outb(MASTER_DATA, 0x01)  # ICW4: 8086, normal EOI
        self.outb(SLAVE_CMD, 0x11)
        self.outb(SLAVE_DATA, 0x38)
        self.outb(SLAVE_DATA, 0x02)
        self.outb(SLAVE_DATA, 0x01)
        self.outb(MASTER_DATA, 0x00)
        self.outb(SLAVE_DATA, 0x00)

    def bios_init(self):
        """SeaBIOS pic_setup(): vectors 0x08 and 0x70, only the cascade unmasked."""
        for cmd, data, base, icw3 in ((MASTER_CMD, MASTER_DATA, 0x08, 0x04), (SLAVE_CMD, SLAVE_DATA, 0x70, 0x02)):
            self.outb(cmd, 0x11)
            self.outb(data, base)
            self.outb(data, icw3)
            self.outb(data, 0x01)
        self.outb(MASTER_DATA, 0xFB)
        self.outb(SLAVE_DATA, 0xFF)

    def read_isr(self, cmd_port):
        self.outb(cmd_port, 0x0B)
        value = self.inb(cmd_port)
        self.outb(cmd_port, 0x0A)
        return value

    def read_irr(self, cmd_port):
        self.outb(cmd_port, 0x0A)
        return self.inb(cmd_port)


@pytest.fixture
def board():
    b = Board()
    b.linux_init()
    return b


def test_port_devices_are_the_pc_ranges():
    pic = Pic8259Pair()
    assert [(base, count) for _, base, count in pic.port_devices()] == [(0x20, 2), (0xA0, 2), (0x4D0, 2)]
    assert [d.name for d, _, _ in pic.port_devices()] == ["pic@0x20", "pic@0xa0", "elcr@0x4d0"]


def test_linux_init_then_edge_irq_delivers_vector(board):
    assert board.inb(MASTER_DATA) == 0x00
    board.outb(MASTER_DATA, 0xB8)
    assert board.inb(MASTER_DATA) == 0xB8  # OCW1 reads back (Linux caches and checks it)
    board.outb(MASTER_DATA, 0x00)
    assert not board.pic.int_pending
    board.irq[1].raise_irq()
    assert board.pic.int_pending and board.pic.has_interrupt()
    assert board.int_log[-1] == 1
    assert board.read_irr(MASTER_CMD) == 0x02
    assert board.pic.acknowledge() == 0x31
    assert board.read_isr(MASTER_CMD) == 0x02
    assert board.read_irr(MASTER_CMD) == 0x00  # an edge request is cleared by INTA
    assert not board.pic.int_pending and board.int_log[-1] == 0
    board.outb(MASTER_CMD, EOI)
    assert board.read_isr(MASTER_CMD) == 0


def test_bios_init_masks_and_vectors():
    b = Board()
    b.bios_init()
    b.irq[0].raise_irq()
    assert not b.pic.int_pending
    assert b.pic.acknowledge() == 0x0F  # nothing deliverable: the master's spurious IR7
    b.outb(MASTER_DATA, 0xFA)  # the BIOS enables the timer once its handler is in place
    assert b.pic.acknowledge() == 0x08
    b.outb(MASTER_CMD, EOI)
    b.irq[8].raise_irq()  # RTC: masked on the slave
    assert not b.pic.int_pending
    b.outb(SLAVE_DATA, 0xFE)
    assert b.pic.int_pending
    assert b.pic.acknowledge() == 0x70
    b.irq[3].raise_irq()
    assert not b.pic.int_pending  # masked on the master
    assert b.read_irr(MASTER_CMD) & 0x08


def test_edge_needs_new_rising_edge_and_latches_pulses(board):
    board.irq[4].raise_irq()
    assert board.pic.acknowledge() == 0x34
    board.outb(MASTER_CMD, EOI)
    board.irq[4].raise_irq()  # still high: no new edge
    assert not board.pic.int_pending
    board.irq[4].lower_irq()
    board.irq[4].pulse()  # a pulse is latched even though the pin is low again
    assert board.pic.int_pending
    assert board.pic.acknowledge() == 0x34


def test_level_triggered_via_elcr_redelivers_until_lowered(board):
    board.outb(ELCR + 1, 0x04)  # IRQ 10 level triggered
    board.irq[10].raise_irq()
    assert board.pic.acknowledge() == 0x3A
    assert board.read_irr(SLAVE_CMD) & 0x04  # INTA does not clear a level request
    board.outb(SLAVE_CMD, EOI)
    board.outb(MASTER_CMD, EOI)
    assert board.pic.int_pending
    assert board.pic.acknowledge() == 0x3A
    board.irq[10].lower_irq()
    board.outb(SLAVE_CMD, EOI)
    board.outb(MASTER_CMD, EOI)
    assert not board.pic.int_pending
    assert board.read_irr(SLAVE_CMD) == 0


def test_elcr_wired_edge_bits_and_word_access():
    b = Board()
    b.outb(ELCR, 0xFF)
    b.outb(ELCR + 1, 0xFF)
    assert b.inb(ELCR) == 0xF8  # IRQ 0, 1, 2 stay edge
    assert b.inb(ELCR + 1) == 0xDE  # IRQ 8, 13 stay edge
    assert b.bus.read(ELCR, 2) == 0xDEF8
    b.bus.write(ELCR, 2, 0x0020)
    assert (b.inb(ELCR), b.inb(ELCR + 1)) == (0x20, 0x00)
    b.pic.reset()
    assert b.inb(ELCR) == 0


def test_priority_nesting_and_masking(board):
    board.irq[5].raise_irq()
    board.irq[3].raise_irq()
    assert board.pic.acknowledge() == 0x33
    assert not board.pic.int_pending  # 5 is lower than 3 in service
    board.irq[1].raise_irq()
    assert board.pic.acknowledge() == 0x31  # 1 nests above 3
    board.outb(MASTER_CMD, EOI)  # non-specific EOI clears the highest: 1
    assert board.read_isr(MASTER_CMD) == 0x08
    assert not board.pic.int_pending
    board.outb(MASTER_DATA, 0x20)  # mask 5
    board.outb(MASTER_CMD, EOI)
    assert not board.pic.int_pending
    board.outb(MASTER_DATA, 0x00)
    assert board.pic.acknowledge() == 0x35


def test_specific_eoi_and_rotation_commands(board):
    board.irq[3].raise_irq()
    board.irq[6].raise_irq()
    assert board.pic.acknowledge() == 0x33
    board.outb(MASTER_CMD, 0x60 | 6)  # specific EOI for a level not in service: no effect
    assert board.read_isr(MASTER_CMD) == 0x08
    board.outb(MASTER_CMD, 0x60 | 3)
    assert board.read_isr(MASTER_CMD) == 0
    assert board.pic.acknowledge() == 0x36
    board.outb(MASTER_CMD, 0xA0)  # rotate on non-specific EOI: 6 becomes lowest
    assert board.pic.master.priority_add == 7
    board.irq[0].raise_irq()
    board.irq[7].raise_irq()
    assert board.pic.acknowledge() == 0x37  # 7 now outranks 0
    board.outb(MASTER_CMD, 0xE0 | 7)  # rotate on specific EOI: 7 lowest
    assert board.pic.acknowledge() == 0x30
    board.outb(MASTER_CMD, EOI)
    board.outb(MASTER_CMD, 0xC0 | 2)  # set priority: IR2 lowest, IR3 highest
    board.irq[1].lower_irq()
    board.irq[1].raise_irq()
    board.irq[4].raise_irq()
    assert board.pic.acknowledge() == 0x34
    board.outb(MASTER_CMD, 0x40)  # no-operation
    assert board.read_isr(MASTER_CMD) == 0x10


def test_auto_eoi_and_rotate_in_auto_eoi():
    b = Board()
    b.outb(MASTER_CMD, 0x11)
    b.outb(MASTER_DATA, 0x20)
    b.outb(MASTER_DATA, 0x04)
    b.outb(MASTER_DATA, 0x03)  # ICW4: 8086, auto EOI
    b.irq[3].raise_irq()
    assert b.pic.acknowledge() == 0x23
    assert b.read_isr(MASTER_CMD) == 0
    b.outb(MASTER_CMD, 0x80)  # rotate in AEOI: set
    b.irq[5].raise_irq()
    assert b.pic.acknowledge() == 0x25
    assert b.pic.master.priority_add == 6
    b.irq[4].raise_irq()
    b.irq[6].raise_irq()
    assert b.pic.acknowledge() == 0x26
    b.outb(MASTER_CMD, 0x00)  # rotate in AEOI: clear
    assert b.pic.acknowledge() == 0x24
    assert b.pic.master.priority_add == 7


def test_cascade_irq10_arrives_through_irq2():
    b = Board()
    b.bios_init()
    b.outb(SLAVE_DATA, 0x00)
    b.irq[10].raise_irq()
    assert b.read_irr(MASTER_CMD) == 0x04
    assert b.pic.acknowledge() == 0x72
    assert b.read_isr(MASTER_CMD) == 0x04
    assert b.read_isr(SLAVE_CMD) == 0x04
    b.irq[9].raise_irq()  # higher on the slave, but the master's IR2 is in service
    assert not b.pic.int_pending
    b.outb(SLAVE_CMD, EOI)
    b.outb(MASTER_CMD, EOI)
    assert b.pic.acknowledge() == 0x71


def test_special_fully_nested_mode_lets_higher_slave_irq_through():
    b = Board()
    b.outb(MASTER_CMD, 0x11)
    b.outb(MASTER_DATA, 0x08)
    b.outb(MASTER_DATA, 0x04)
    b.outb(MASTER_DATA, 0x11)  # ICW4: SFNM
    b.outb(SLAVE_CMD, 0x11)
    b.outb(SLAVE_DATA, 0x70)
    b.outb(SLAVE_DATA, 0x02)
    b.outb(SLAVE_DATA, 0x01)
    b.irq[10].raise_irq()
    assert b.pic.acknowledge() == 0x72
    b.irq[11].raise_irq()  # lower inside the slave: the slave itself holds it back
    assert not b.pic.int_pending
    b.irq[3].raise_irq()  # lower than IR2 on the master: still blocked
    assert not b.pic.int_pending
    b.irq[9].raise_irq()
    assert b.pic.acknowledge() == 0x71
    assert b.read_isr(SLAVE_CMD) == 0x06


def test_spurious_irq7_when_level_request_vanishes(board):
    board.outb(ELCR, 0x20)  # IRQ 5 level
    board.irq[5].raise_irq()
    assert board.pic.int_pending
    board.irq[5].lower_irq()  # gone before INTA
    assert not board.pic.int_pending
    assert board.pic.acknowledge() == 0x37
    assert board.read_isr(MASTER_CMD) == 0  # a spurious IR7 sets no ISR bit


def test_spurious_irq15_sets_master_isr2_only(board):
    board.outb(ELCR + 1, 0x08)  # IRQ 11 level
    board.irq[11].raise_irq()
    board.irq[11].lower_irq()  # the master's edge-triggered IR2 stays latched
    assert board.pic.int_pending
    assert board.pic.acknowledge() == 0x3F
    assert board.read_isr(MASTER_CMD) == 0x04
    assert board.read_isr(SLAVE_CMD) == 0


def test_poll_command(board):
    board.outb(MASTER_CMD, 0x0C)
    assert board.inb(MASTER_CMD) == 0x00  # nothing pending
    board.irq[6].raise_irq()
    board.irq[4].raise_irq()
    board.outb(MASTER_CMD, 0x0C)
    assert board.inb(MASTER_DATA) == 0x84  # the poll read works on either port
    assert board.read_isr(MASTER_CMD) == 0x10
    assert board.inb(MASTER_DATA) == 0x00  # poll is one-shot: IMR again
    board.outb(MASTER_CMD, EOI)
    board.outb(MASTER_CMD, 0x0C)
    assert board.inb(MASTER_CMD) == 0x86


def test_special_mask_mode_enables_lower_levels(board):
    board.irq[3].raise_irq()
    assert board.pic.acknowledge() == 0x33
    board.irq[5].raise_irq()
    assert not board.pic.int_pending
    board.outb(MASTER_CMD, 0x68)  # OCW3: set special mask
    board.outb(MASTER_DATA, 0x08)  # mask the level in service
    assert board.pic.acknowledge() == 0x35
    board.outb(MASTER_CMD, EOI)  # non-specific EOI ignores masked IS bits in special mask mode
    assert board.read_isr(MASTER_CMD) == 0x08
    board.outb(MASTER_CMD, 0x48)  # reset special mask
    board.outb(MASTER_CMD, 0x60 | 3)
    assert board.read_isr(MASTER_CMD) == 0


def test_icw1_resets_imr_isr_and_edge_requests(board):
    board.outb(ELCR, 0x40)  # IRQ 6 level
    board.irq[6].raise_irq()
    board.irq[3].raise_irq()
    board.irq[4].raise_irq()
    assert board.pic.acknowledge() == 0x33
    board.outb(MASTER_DATA, 0x80)
    board.outb(MASTER_CMD, 0x11)
    assert board.inb(MASTER_DATA) == 0  # IMR cleared
    assert board.read_irr(MASTER_CMD) == 0x40  # the level request survives, the edge does not
    assert board.read_isr(MASTER_CMD) == 0
    assert board.inb(ELCR) == 0x40  # ELCR is not touched by ICW1
    board.outb(MASTER_DATA, 0x50)
    board.outb(MASTER_DATA, 0x04)
    board.outb(MASTER_DATA, 0x01)
    assert board.pic.acknowledge() == 0x56
    board.irq[4].raise_irq()  # held high across ICW1: no new edge
    assert board.read_irr(MASTER_CMD) == 0x40


def test_icw1_ltim_makes_every_input_level_triggered():
    b = Board()
    b.outb(MASTER_CMD, 0x19)  # LTIM
    b.outb(MASTER_DATA, 0x08)
    b.outb(MASTER_DATA, 0x04)
    b.outb(MASTER_DATA, 0x01)
    b.irq[1].raise_irq()
    assert b.pic.acknowledge() == 0x09
    assert b.read_irr(MASTER_CMD) & 0x02
    b.irq[1].lower_irq()
    assert b.read_irr(MASTER_CMD) == 0


def test_single_mode_skips_icw3():
    b = Board()
    b.outb(MASTER_CMD, 0x13)  # single, ICW4
    b.outb(MASTER_DATA, 0x40)
    b.outb(MASTER_DATA, 0x01)  # this is ICW4, not ICW3
    b.outb(MASTER_DATA, 0x01)  # OCW1
    assert b.inb(MASTER_DATA) == 0x01
    b.irq[0].raise_irq()
    assert not b.pic.int_pending
    b.irq[1].raise_irq()
    assert b.pic.acknowledge() == 0x41


def test_int_output_callback_follows_master_pin(board):
    board.int_log.clear()
    board.irq[12].raise_irq()
    board.irq[1].raise_irq()
    assert board.int_log == [1]
    board.pic.acknowledge()
    board.pic.acknowledge()
    assert board.int_log == [1, 0]


def _busy_board():
    b = Board()
    b.linux_init()
    b.outb(ELCR + 1, 0x08)
    b.outb(MASTER_CMD, 0xC0 | 4)  # priority rotated: 5 highest
    b.irq[3].raise_irq()
    b.irq[6].raise_irq()
    b.irq[11].raise_irq()
    assert b.pic.acknowledge() == 0x36
    b.irq[14].raise_irq()
    b.outb(SLAVE_CMD, 0x0B)  # ISR selected on the slave
    b.outb(SLAVE_CMD, 0x11)  # slave part-way through its init sequence
    b.outb(SLAVE_DATA, 0x38)
    return b


def _save(pic):
    return pic.master.VMSTATE.save(pic.master), pic.slave.VMSTATE.save(pic.slave)


def _restore(master_bytes, slave_bytes):
    fresh = Board()
    fresh.pic.master.VMSTATE.load(fresh.pic.master, master_bytes, 1)
    fresh.pic.slave.VMSTATE.load(fresh.pic.slave, slave_bytes, 1)
    fresh.pic.sync_outputs()
    return fresh


def _run_script(b):
    trace = [b.pic.int_pending]
    b.outb(SLAVE_DATA, 0x02)
    b.outb(SLAVE_DATA, 0x01)
    for _ in range(4):
        trace.append(b.pic.acknowledge())
        trace += [b.read_isr(MASTER_CMD), b.read_isr(SLAVE_CMD), b.read_irr(MASTER_CMD), b.read_irr(SLAVE_CMD)]
        b.outb(SLAVE_CMD, EOI)
        b.outb(MASTER_CMD, EOI)
    b.irq[11].lower_irq()
    trace.append(b.pic.int_pending)
    return trace


def test_vmstate_round_trip_mid_operation():
    original = _busy_board()
    saved = _save(original.pic)
    restored = _restore(*saved)
    assert _save(restored.pic) == saved
    assert restored.pic.int_pending == original.pic.int_pending
    assert _run_script(restored) == _run_script(original)


def test_post_load_rejects_inconsistent_state():
    b = _busy_board()
    master, _ = _save(b.pic)
    fields = [f.name for f in b.pic.master.VMSTATE.fields]
    for name, value in (("priority_add", 9), ("elcr", 0x01), ("irq_base", 0x31), ("init_state", 4)):
        corrupt = bytearray(master)
        corrupt[fields.index(name)] = value  # every field is one byte
        fresh = Board()
        with pytest.raises(StateError, match=f"pic@0x20: field {name}"):
            fresh.pic.master.VMSTATE.load(fresh.pic.master, bytes(corrupt), 1)

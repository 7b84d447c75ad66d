"""The 8042 keyboard controller at register level, as QEMU's pckbd.c and ps2.c answer."""

import pytest

from emu.device import PortBus
from emu.errors import StateError
from emu.devices.i8042 import I8042
from emu.irq import IrqLine, IrqRecorder


class A20Line:
    def __init__(self):
        self.levels = []

    def set_level(self, level):
        self.levels.append(1 if level else 0)


class Board:
    def __init__(self):
        self.irqs = IrqRecorder()
        self.a20 = A20Line()
        self.resets = []
        self.kbc = I8042("i8042@0x60", kbd_irq=IrqLine(self.irqs, 1), mouse_irq=IrqLine(self.irqs, 12),
                         a20=self.a20, on_reset=lambda: self.resets.append(True))
        self.bus = PortBus()
        self.bus.register(0x60, 1, self.kbc)
        self.bus.register(0x64, 1, self.kbc.command_port())

    def status(self):
        return self.bus.read(0x64, 1)

    def command(self, value, data=None):
        self.bus.write(0x64, 1, value)
        if data is not None:
            self.bus.write(0x60, 1, data)

    def read_all(self):
        out = []
        while self.status() & 0x01:
            out.append(self.bus.read(0x60, 1))
        return out


@pytest.fixture
def board():
    return Board()


def test_power_on_status_and_command_byte(board):
    assert board.status() == 0x18  # command flag, unlocked
    board.command(0x20)
    assert board.read_all() == [0x03]  # IRQ1 and IRQ12 enabled


def test_self_test_sets_the_system_flag(board):
    board.command(0xAA)
    assert board.status() & 0x04
    assert board.read_all() == [0x55]


def test_keyboard_reset_and_id(board):
    board.bus.write(0x60, 1, 0xFF)
    assert board.read_all() == [0xFA, 0xAA]
    board.bus.write(0x60, 1, 0xF2)
    assert board.read_all() == [0xFA, 0xAB, 0x83]
    board.command(0x60, 0x40)  # translation on: the ID reads as translated
    board.bus.write(0x60, 1, 0xF2)
    assert board.read_all() == [0xFA, 0xAB, 0x41]


def test_keyboard_commands_with_an_argument(board):
    board.bus.write(0x60, 1, 0xED)
    board.bus.write(0x60, 1, 0x07)
    assert board.read_all() == [0xFA, 0xFA]
    board.bus.write(0x60, 1, 0xF0)
    board.bus.write(0x60, 1, 0x00)
    assert board.read_all() == [0xFA, 0xFA, 0x41]  # scancode set 2
    board.bus.write(0x60, 1, 0xEE)
    assert board.read_all() == [0xEE]


def test_irq1_follows_the_output_buffer(board):
    board.command(0xAA)
    assert board.irqs.levels[1] == 1
    board.bus.read(0x60, 1)
    assert board.irqs.levels[1] == 0
    board.command(0x60, 0x00)  # IRQs off
    board.command(0xAA)
    assert board.irqs.levels[1] == 0


def test_empty_buffer_repeats_the_last_byte(board):
    board.command(0xAA)
    assert board.bus.read(0x60, 1) == 0x55
    assert board.bus.read(0x60, 1) == 0x55  # ps2_read_data, for EMM386


def test_aux_loopback_and_mouse(board):
    board.command(0xD3, 0x5A)  # Linux's i8042_check_aux
    assert board.status() & 0x21 == 0x21
    assert board.irqs.levels[12] == 1
    assert board.read_all() == [0x5A]
    board.command(0xD4, 0xFF)
    assert board.read_all() == [0xFA, 0xAA, 0x00]
    board.command(0xD4, 0xF2)
    assert board.read_all() == [0xFA, 0x00]
    board.command(0xD4, 0xE9)
    assert board.read_all() == [0xFA, 0x00, 0x02, 100]


def test_reset_by_pulse_and_by_output_port(board):
    board.command(0xFE)
    assert board.resets == [True]
    board.command(0xF0)  # pulse bits 3-0, bit 0 among them
    board.command(0xFF)  # pulse none
    assert board.resets == [True, True]
    board.command(0xD1, 0xDF)  # reset line high, A20 on: no reset
    assert board.resets == [True, True] and board.a20.levels[-1] == 1
    board.command(0xD1, 0xDE)
    assert board.resets == [True, True, True]


def test_output_port_drives_a20(board):
    board.command(0xD1, 0xDD)  # A20 off
    assert board.a20.levels == [0]
    board.command(0xD0)
    assert board.read_all() == [0xDD]
    board.command(0xDF)
    assert board.a20.levels == [0, 1]


def test_state_round_trip_keeps_queues_and_pending_command(board):
    board.bus.write(0x60, 1, 0xF2)
    board.command(0xD4)  # the next data byte goes to the mouse
    saved = [obj.VMSTATE.save(obj) for obj in board.kbc.state_objects()]
    other = Board()
    for obj, data in zip(other.kbc.state_objects(), saved, strict=True):
        obj.VMSTATE.load(obj, data, 1)
    other.kbc.sync_irq()
    assert [obj.VMSTATE.save(obj) for obj in other.kbc.state_objects()] == saved
    assert other.irqs.levels[1] == 1
    other.bus.write(0x60, 1, 0xF2)
    assert other.read_all() == [0xFA, 0xAB, 0x83, 0xFA, 0x00]


def test_state_check_rejects_a_pending_command_without_argument(board):
    data = bytearray(board.kbc.VMSTATE.save(board.kbc))
    data[0] = 0xAA
    with pytest.raises(StateError, match=r"i8042@0x60: field write_cmd: 0xaa"):
        board.kbc.VMSTATE.load(board.kbc, bytes(data), 1)

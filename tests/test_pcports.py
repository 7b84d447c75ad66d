"""isa-debug-exit, the POST code port 0x80, System Control Port A (0x92) and the reset
control register (0xcf9)."""

import pytest

from emu.devices.debugexit import IsaDebugExit
from emu.device import PortBus
from emu.errors import StateError
from emu.devices.pcports import PostCodePort, ResetControl, SystemControlPortA


def on_bus(device, base, count):
    bus = PortBus()
    bus.register(base, count, device)
    return bus


# ---------------------------------------------------------------------- isa-debug-exit
@pytest.mark.parametrize("size, value, status", [
    (1, 0x00, 0x01),
    (1, 0x10, 0x21),  # the usual "success" code of test kernels
    (1, 0x11, 0x23),
    (4, 0x10, 0x21),
    (2, 0x1234, 0x2469),
    (4, 0x7FFFFFFF, 0xFFFFFFFF),
])
def test_debug_exit_status(size, value, status):
    exits = []
    device = IsaDebugExit("debugexit@0xf4", on_exit=exits.append)
    bus = on_bus(device, 0xF4, 4)
    bus.write(0xF4, size, value)
    assert exits == [status]


def test_debug_exit_any_port_of_the_range():
    exits = []
    bus = on_bus(IsaDebugExit("debugexit@0xf4", on_exit=exits.append), 0xF4, 4)
    bus.write(0xF7, 1, 3)
    assert exits == [7]


def test_debug_exit_reads_zero_without_exiting():
    exits = []
    bus = on_bus(IsaDebugExit("debugexit@0xf4", on_exit=exits.append), 0xF4, 4)
    assert bus.read(0xF4, 1) == 0
    assert bus.read(0xF4, 4) == 0
    assert exits == []


def test_debug_exit_state_is_empty():
    device = IsaDebugExit("debugexit@0xf4", on_exit=lambda status: None)
    data = device.VMSTATE.save(device)
    assert data == b"\0"  # no fields, no subsections
    device.VMSTATE.load(device, data, 1)


# ---------------------------------------------------------------------- port 0x80
def test_post_code_is_stored_and_reads_all_ones():
    post = PostCodePort("post@0x80")
    bus = on_bus(post, 0x80, 1)
    bus.write(0x80, 1, 0x55)
    assert post.last_post_code == 0x55
    assert bus.read(0x80, 1) == 0xFF
    bus.write(0x80, 2, 0xAA42)  # split by the bus: only the low byte reaches port 0x80
    assert post.last_post_code == 0x42


def test_post_code_state_round_trip():
    post = PostCodePort("post@0x80")
    post.io_write(0, 1, 0x3C)
    data = post.VMSTATE.save(post)
    other = PostCodePort("post@0x80")
    other.VMSTATE.load(other, data, 1)
    assert other.last_post_code == 0x3C
    assert other.VMSTATE.save(other) == data


# ---------------------------------------------------------------------- port 0x92
class A20Line:
    """Records the levels driven onto the A20 line."""

    def __init__(self):
        self.levels = []

    def set_level(self, level):
        self.levels.append(1 if level else 0)


def make_port92(a20=None):
    resets = []
    port = SystemControlPortA("port92", on_reset=lambda: resets.append(True), a20=a20 or A20Line())
    return port, on_bus(port, 0x92, 1), resets


def test_port92_power_on_value():
    port, bus, _ = make_port92()
    assert bus.read(0x92, 1) == 0x00


def test_port92_enable_a20_reads_back():
    port, bus, resets = make_port92()
    bus.write(0x92, 1, bus.read(0x92, 1) | 0x02)  # Linux's enable_a20_fast
    assert bus.read(0x92, 1) == 0x02
    assert resets == []


def test_port92_fast_reset_on_rising_edge_of_bit_0():
    port, bus, resets = make_port92()
    bus.write(0x92, 1, 0x02)
    bus.write(0x92, 1, 0x03)
    assert resets == [True]
    bus.write(0x92, 1, 0x03)  # bit 0 already set: no new edge
    assert resets == [True]
    port.reset()  # the system reset the machine performs clears bit 0
    assert bus.read(0x92, 1) == 0x02
    bus.write(0x92, 1, 0x03)
    assert resets == [True, True]


def test_port92_reset_request_with_a20_bit_clear_is_a_reset():
    port, bus, resets = make_port92()
    bus.write(0x92, 1, 0x01)  # "in al,0x92; or al,1; out 0x92,al" straight after power-on
    assert resets == [True]


def test_port92_bit_1_drives_the_a20_line():
    a20 = A20Line()
    port, bus, resets = make_port92(a20)
    bus.write(0x92, 1, 0x02)
    bus.write(0x92, 1, 0x00)  # Linux's real-mode A20 probe and DOS extenders turn it off
    assert a20.levels == [1, 0]
    assert bus.read(0x92, 1) == 0x00
    assert resets == []


def test_port92_other_bits_are_stored():
    port, bus, _ = make_port92()
    bus.write(0x92, 1, 0xC2)
    assert bus.read(0x92, 1) == 0xC2


def test_port92_state_round_trip():
    port, bus, _ = make_port92()
    bus.write(0x92, 1, 0x42)
    data = port.VMSTATE.save(port)
    other, other_bus, resets = make_port92()
    other.VMSTATE.load(other, data, 1)
    assert other_bus.read(0x92, 1) == 0x42
    assert other.VMSTATE.save(other) == data
    other_bus.write(0x92, 1, 0x43)  # the loaded copy still sees the 0 -> 1 edge of bit 0
    assert resets == [True]


# ---------------------------------------------------------------------- port 0xcf9
def make_rcr():
    resets = []
    rcr = ResetControl("rcr@0xcf9", on_reset=lambda: resets.append(True))
    return rcr, on_bus(rcr, 0xCF9, 1), resets


def test_rcr_reset_on_bit_2():
    rcr, bus, resets = make_rcr()
    bus.write(0xCF9, 1, 0x02)  # Linux reboot=pci: hard reset type, then "reset CPU"
    assert resets == [] and bus.read(0xCF9, 1) == 0x02
    bus.write(0xCF9, 1, 0x06)
    assert resets == [True]


def test_rcr_keeps_only_the_reset_type_bit():
    rcr, bus, resets = make_rcr()
    bus.write(0xCF9, 1, 0xFB)
    assert bus.read(0xCF9, 1) == 0x02
    rcr.reset()
    assert bus.read(0xCF9, 1) == 0x00 and resets == []


def test_rcr_state_round_trip_and_check():
    rcr, bus, _ = make_rcr()
    bus.write(0xCF9, 1, 0x02)
    data = rcr.VMSTATE.save(rcr)
    other, other_bus, _ = make_rcr()
    other.VMSTATE.load(other, data, 1)
    assert other_bus.read(0xCF9, 1) == 0x02
    with pytest.raises(StateError, match=r"rcr@0xcf9: field rcr: 0x04"):
        other.VMSTATE.load(other, b"\x04\x00", 1)

"""isa-debug-exit, the POST code port 0x80 and System Control Port A (0x92)."""

import pytest

from emu.debugexit import IsaDebugExit
from emu.device import PortBus
from emu.errors import UnsupportedError
from emu.pcports import PostCodePort, SystemControlPortA


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
def make_port92():
    resets = []
    port = SystemControlPortA("port92", on_reset=lambda: resets.append(True))
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


@pytest.mark.parametrize("value", [0x00, 0xFC])
def test_port92_disabling_a20_is_unsupported(value):
    port, bus, resets = make_port92()
    bus.write(0x92, 1, 0x02)
    with pytest.raises(UnsupportedError, match=r"port 0x92: disabling the A20 gate is not supported"):
        bus.write(0x92, 1, value)
    assert bus.read(0x92, 1) == 0x02  # the failed write changed nothing
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

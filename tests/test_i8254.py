"""8254 PIT and port 0x61 on a manual virtual clock, qtest style."""

import pytest

from emu.clock import VirtualClock
from emu.device import PortBus
from emu.errors import StateError
from emu.devices.i8254 import MIN_IRQ_PERIOD_NS, PIT_FREQ_HZ, Pit8254, SystemControlPortB
from emu.irq import IrqLine

CH0, CH1, CH2, MODE, PORT_B = 0x40, 0x41, 0x42, 0x43, 0x61


def tick_time(ticks):
    """The first ns at which ``ticks`` PIT clocks have elapsed."""
    return -(-ticks * 1_000_000_000 // PIT_FREQ_HZ)


class TimedLine:
    """An IRQ sink that remembers when the level changed."""

    def __init__(self, clock):
        self.clock = clock
        self.level = 0
        self.changes = []

    def __call__(self, number, level):
        if level != self.level:
            self.changes.append((self.clock.now(), level))
        self.level = level

    def rises(self, since=0):
        return [t - since for t, level in self.changes if level == 1 and t >= since]


class Board:
    def __init__(self, start_ns=0):
        self.clock = VirtualClock("manual")
        self.clock.step(start_ns)
        self.line = TimedLine(self.clock)
        self.pit = Pit8254(self.clock, IrqLine(self.line, 0))
        self.port_b = SystemControlPortB(self.pit, self.clock)
        self.bus = PortBus()
        self.bus.register(0x40, 4, self.pit)
        self.bus.register(0x61, 1, self.port_b)

    def outb(self, port, value):
        self.bus.write(port, 1, value)

    def inb(self, port):
        return self.bus.read(port, 1)

    def program(self, channel, control, count):
        self.outb(MODE, control)
        self.outb(CH0 + channel, count & 0xFF)
        self.outb(CH0 + channel, count >> 8)

    def read_word(self, port):
        lsb = self.inb(port)
        return lsb | self.inb(port) << 8


@pytest.mark.parametrize("divisor", [1193, 11932, 0x10000])
def test_mode2_periodic_irq0_edges(divisor):
    b = Board(start_ns=123_456)
    t0 = b.clock.now()
    b.line.changes.clear()
    b.program(0, 0x34, divisor & 0xFFFF)  # channel 0, LSB/MSB, mode 2, binary (Linux's periodic setup)
    b.clock.step(tick_time(divisor * 5) + 1)
    assert b.line.rises(t0) == [tick_time(divisor * k) for k in range(1, 6)]
    falls = [t - t0 for t, level in b.line.changes if level == 0]
    assert falls == [tick_time(divisor * k - 1) for k in range(1, 6)]  # one clock low before each edge
    if divisor == 1193:
        assert abs(b.line.rises(t0)[0] - 1_000_000) < 200  # ~1 ms


def test_mode3_square_wave_and_count_by_two():
    b = Board()
    t0 = b.clock.now()
    b.line.changes.clear()
    b.program(0, 0x36, 1000)  # mode 3
    b.clock.step(tick_time(2000) + 1)
    assert [(t - t0, lvl) for t, lvl in b.line.changes] == [
        (tick_time(500), 0), (tick_time(1000), 1), (tick_time(1500), 0), (tick_time(2000), 1)]
    b2 = Board()
    b2.program(2, 0xB6, 7)  # odd count on channel 2 (gate still low: held)
    b2.outb(PORT_B, 0x01)  # gate rises: the CE loads and counts
    t2 = b2.clock.now()
    seen = []
    for k in range(14):
        b2.clock.step(t2 + tick_time(k) - b2.clock.now())
        seen.append((b2.pit.counter(2), b2.pit.output(2)))
    # odd N: high for (N+1)/2 clocks reading N, N-1, N-3, ...; low for (N-1)/2 reading N, N-3, ...
    assert seen[:7] == [(7, 1), (6, 1), (4, 1), (2, 1), (7, 0), (4, 0), (2, 0)]
    assert seen[7:] == seen[:7]


def test_mode0_one_shot_interrupt_on_terminal_count():
    b = Board()
    b.program(0, 0x30, 5000)
    t0 = b.clock.now()
    assert b.line.level == 0  # mode 0 drives OUT low at the control word
    assert b.pit.next_transition(0) == t0 + tick_time(5000)
    b.clock.step(tick_time(5000) - 1)
    assert b.line.level == 0
    assert b.read_word(CH0) == 1  # one clock before terminal count
    b.clock.step(1)
    assert b.line.level == 1
    assert b.pit.next_transition(0) is None and not b.pit.irq_timer.armed
    b.clock.step(tick_time(10))
    assert b.read_word(CH0) == (0x10000 - 10) & 0xFFFF  # the CE wraps and keeps counting
    assert b.line.level == 1


def test_counter_latch_command():
    b = Board()
    b.program(1, 0x74, 50000)  # channel 1, mode 2
    b.clock.step(tick_time(100))
    b.outb(MODE, 0x40)  # latch channel 1
    b.clock.step(tick_time(1000))
    b.outb(MODE, 0x40)  # a second latch before reading is ignored
    assert b.read_word(CH1) == 50000 - 100
    assert b.read_word(CH1) == 50000 - 1100  # live again
    b.outb(MODE, 0x40)
    assert b.inb(CH1) == (50000 - 1100) & 0xFF
    b.outb(MODE, 0x70)  # reprogramming drops a half-read latch
    assert b.pit.count_latched[1] == 0


def test_read_back_status_and_counts():
    b = Board()
    b.program(0, 0x34, 1000)
    b.outb(MODE, 0x96)  # channel 2: LSB only, mode 3, no count yet
    b.clock.step(tick_time(10))
    b.outb(MODE, 0xC0 | 0x0E)  # read-back: count and status of all three
    assert b.inb(CH0) == 0x80 | 0x30 | 0x04  # OUT high, LSB/MSB, mode 2
    assert b.read_word(CH0) == 990
    assert b.inb(CH2) == 0x80 | 0x40 | 0x10 | 0x06  # null count: no count written since the control word
    assert b.inb(CH1) & 0x3F == 0x36  # power-on channel 1: LSB/MSB, mode 3
    b.outb(MODE, 0xE0 | 0x02)  # read-back: status only of channel 0 (count not latched)
    b.clock.step(tick_time(5))
    assert b.inb(CH0) == 0xB4
    assert b.read_word(CH0) == 985
    b.outb(MODE, 0xD0 | 0x02)  # read-back: count only
    b.clock.step(tick_time(5))
    assert b.read_word(CH0) == 985


def test_bcd_counting():
    b = Board()
    b.program(2, 0xB1, 0x1000)  # channel 2, mode 0, BCD 1000
    b.outb(PORT_B, 0x01)
    b.program(2, 0xB1, 0x1000)
    b.clock.step(tick_time(1))
    assert b.read_word(CH2) == 0x0999
    b.clock.step(tick_time(999) - tick_time(1))
    assert b.read_word(CH2) == 0x0001 and b.pit.output(2) == 0
    b.clock.step(tick_time(1000) - tick_time(999))
    assert b.read_word(CH2) == 0x0000 and b.pit.output(2) == 1
    b.clock.step(tick_time(1001) - tick_time(1000))
    assert b.read_word(CH2) == 0x9999  # wraps in decimal
    b.program(2, 0xB1, 0x0000)  # 0 means 10000 in BCD
    b.clock.step(tick_time(2))
    assert b.read_word(CH2) == 0x9998


def test_linux_quick_pit_calibrate_pattern():
    """arch/x86/kernel/tsc.c quick_pit_calibrate(): channel 2, mode 0, MSB polled."""
    b = Board(start_ns=777)
    b.outb(PORT_B, (b.inb(PORT_B) & ~0x02) | 0x01)  # gate high, speaker off
    b.outb(MODE, 0xB0)
    b.outb(CH2, 0xFF)
    b.outb(CH2, 0xFF)
    t0 = b.clock.now()
    msb_seen = []
    for k in range(0, 0x40 * 256, 64):  # sample every 64 clocks (LSB then MSB, as pit_verify_msb)
        b.clock.step(t0 + tick_time(k) - b.clock.now())
        b.inb(CH2)
        msb_seen.append((k, b.inb(CH2)))
    for k, msb in msb_seen:
        assert msb == (0xFFFF - k) >> 8
    assert not b.inb(PORT_B) & 0x20


def test_linux_pit_calibrate_tsc_polls_port61_bit5():
    """arch/x86/kernel/tsc.c pit_calibrate_tsc(): 50 ms mode 0 count, poll OUT 2 at port 0x61."""
    b = Board()
    latch = PIT_FREQ_HZ // 20
    b.outb(PORT_B, (b.inb(PORT_B) & ~0x02) | 0x01)
    b.program(2, 0xB0, latch)
    t0 = b.clock.now()
    polls = 0
    while not b.inb(PORT_B) & 0x20:
        b.clock.step(10_000)
        polls += 1
    assert polls == -(-tick_time(latch) // 10_000)
    assert abs((b.clock.now() - t0) - 50_000_000) < 10_000


def test_gate_pauses_mode0_and_retriggers_mode1():
    b = Board()
    b.outb(PORT_B, 0x01)
    b.program(2, 0xB0, 1000)
    b.clock.step(tick_time(300))
    b.outb(PORT_B, 0x00)  # gate low: mode 0 holds its count
    held = b.read_word(CH2)
    b.clock.step(tick_time(5000))
    assert b.read_word(CH2) == held == 700
    b.outb(PORT_B, 0x01)
    b.clock.step(tick_time(700) - 1)
    assert not b.inb(PORT_B) & 0x20
    b.clock.step(tick_time(1))
    assert b.inb(PORT_B) & 0x20

    b.outb(PORT_B, 0x00)
    b.program(2, 0xB2, 500)  # mode 1: waits for a trigger with OUT high
    b.clock.step(tick_time(2000))
    assert b.pit.output(2) == 1 and b.pit.next_transition(2) is None
    b.outb(PORT_B, 0x01)  # trigger
    assert b.pit.output(2) == 0
    b.clock.step(tick_time(400))
    b.outb(PORT_B, 0x00)  # the gate level does not pause mode 1
    b.outb(PORT_B, 0x01)  # ... but a rising edge retriggers
    b.clock.step(tick_time(200))
    b.outb(PORT_B, 0x03)  # speaker on, gate still high: no edge, no retrigger
    b.clock.step(tick_time(499) - tick_time(200))
    assert b.pit.output(2) == 0
    b.clock.step(tick_time(2))
    assert b.pit.output(2) == 1


def test_mode5_hardware_strobe_and_mode4_software_strobe():
    b = Board()
    b.program(2, 0xBA, 100)  # mode 5
    b.clock.step(tick_time(500))
    assert b.pit.output(2) == 1
    b.outb(PORT_B, 0x01)
    t_trigger = b.clock.now()
    assert b.pit.next_transition(2) == t_trigger + tick_time(100)
    b.clock.step(tick_time(100))
    assert b.pit.output(2) == 0  # one clock low
    b.clock.step(tick_time(101) - tick_time(100))
    assert b.pit.output(2) == 1

    b.line.changes.clear()
    t0 = b.clock.now()
    b.program(0, 0x38, 200)  # channel 0, mode 4
    b.clock.step(tick_time(300))
    assert [(t - t0, lvl) for t, lvl in b.line.changes] == [(tick_time(200), 0), (tick_time(201), 1)]


def test_mode2_gate_low_forces_out_high_and_rising_gate_reloads():
    b = Board()
    b.outb(PORT_B, 0x01)
    b.program(2, 0xB4, 100)
    b.clock.step(tick_time(99))
    assert b.pit.output(2) == 0  # the one-clock low pulse
    b.outb(PORT_B, 0x00)
    assert b.pit.output(2) == 1
    b.clock.step(tick_time(1000))
    b.outb(PORT_B, 0x01)
    assert b.read_word(CH2) == 100
    b.clock.step(tick_time(10))
    assert b.read_word(CH2) == 90


def test_mode2_new_count_takes_effect_at_period_end():
    b = Board()
    t0 = b.clock.now()
    b.line.changes.clear()
    b.program(0, 0x34, 1000)
    b.clock.step(tick_time(1500))
    b.outb(CH0, 3000 & 0xFF)  # no control word: the running period ends first
    b.outb(CH0, 3000 >> 8)
    assert b.pit.null_count[0] == 1
    assert b.read_word(CH0) == 500
    b.clock.step(tick_time(8000) - tick_time(1500) + 10)
    assert b.line.rises(t0) == [tick_time(1000), tick_time(2000), tick_time(2000) + tick_time(3000),
                                tick_time(2000) + tick_time(6000)]
    assert b.pit.null_count[0] == 0


def test_tiny_divisor_does_not_storm():
    b = Board()
    fired = []
    callback = b.pit.irq_timer.callback
    b.pit.irq_timer.callback = lambda: (fired.append(b.clock.now()), callback())
    t0 = b.clock.now()
    b.line.changes.clear()
    b.program(0, 0x34, 2)  # 1.676 us period
    b.clock.step(1_000_000)
    assert len(fired) <= 1_000_000 // MIN_IRQ_PERIOD_NS + 1
    rises = b.line.rises(t0)
    assert len(rises) >= 1_000_000 // MIN_IRQ_PERIOD_NS - 1
    assert all(later - earlier >= MIN_IRQ_PERIOD_NS for earlier, later in zip(rises, rises[1:], strict=False))
    for r in rises:  # every edge sits exactly on a period boundary of the real counter
        clocks = r * PIT_FREQ_HZ // 1_000_000_000
        assert clocks % 2 == 0 and r == tick_time(clocks)
    b.outb(MODE, 0x00)
    assert b.read_word(CH0) in (1, 2)  # reads stay exact


def test_late_timer_delivers_one_edge_not_a_backlog():
    b = Board()
    b.program(0, 0x34, 1193)
    b.clock.step(tick_time(1193) + 1)
    b.line.changes.clear()
    fired = []
    callback = b.pit.irq_timer.callback
    b.pit.irq_timer.callback = lambda: (fired.append(1), callback())
    b.clock.set_now(b.clock.now() + 100_000_000)  # the host fell 100 ms behind
    b.clock.run_due_timers()
    assert len(fired) <= 2
    assert len(b.line.rises()) == 1
    assert b.pit.irq_timer.deadline > b.clock.now()


def test_port61_refresh_toggle_and_writable_bits():
    b = Board()
    b.outb(PORT_B, 0xFF)
    value = b.inb(PORT_B)
    assert value & 0x0F == 0x0F and value & 0xC0 == 0
    assert b.port_b.speaker_data_enabled
    toggles = []
    for _ in range(8):
        toggles.append((b.inb(PORT_B) >> 4) & 1)
        b.clock.step(15085)
    assert toggles == [0, 1, 0, 1, 0, 1, 0, 1]
    b.outb(PORT_B, 0x00)
    assert b.inb(PORT_B) & 0x0F == 0
    assert b.pit.gate[2] == 0


def test_power_on_state_like_qemu():
    b = Board()
    assert b.line.changes == [(0, 1)]  # reset drives IRQ 0 to OUT 0, high in mode 3
    assert b.pit.next_transition(0) == tick_time(0x8000)  # mode 3, count 65536, running
    b.clock.step(tick_time(0x10000))
    assert b.line.rises() == [0, tick_time(0x10000)]
    assert b.pit.output(2) == 1 and b.pit.gate == [1, 1, 0]


def _save(board):
    return board.pit.VMSTATE.save(board.pit), board.port_b.VMSTATE.save(board.port_b)


def _restore(pit_bytes, port_b_bytes, now, line_level):
    """A fresh board loaded with the saved state; ``line_level``: the IRQ 0 level the
    interrupt controller last saw (in a machine, part of the PIC's own saved state)."""
    fresh = Board(start_ns=now)
    fresh.pit.VMSTATE.load(fresh.pit, pit_bytes, 1)
    fresh.port_b.VMSTATE.load(fresh.port_b, port_b_bytes, 1)
    fresh.line.level = line_level
    return fresh


def _observe(b, steps):
    """Edges relative to now plus every channel's count and OUT along the way."""
    t0 = b.clock.now()
    b.line.changes.clear()
    seen = []
    for step in steps:
        b.clock.step(step)
        seen.append([b.pit.counter(ch) for ch in range(3)] + [b.pit.output(ch) for ch in range(3)])
        seen.append(b.inb(PORT_B) & 0x2F)
    b.outb(MODE, 0xCE)  # read-back latch of all counts, read as the guest would
    seen.append([b.read_word(port) for port in (CH0, CH1, CH2)])
    return [t - t0 for t, _ in b.line.changes], [lvl for _, lvl in b.line.changes], seen


def test_vmstate_round_trip_mid_count():
    b = Board(start_ns=5_000_000)
    b.program(0, 0x34, 1193)
    b.program(1, 0x76, 333)
    b.outb(PORT_B, 0x03)
    b.outb(MODE, 0xB0)  # channel 2 mode 0, first byte of the count only
    b.outb(CH2, 0x34)
    b.outb(CH2, 0x12)
    b.clock.step(2_500_000)
    b.outb(CH0, 2386 & 0xFF)  # a pending period-end reload on channel 0
    b.outb(CH0, 2386 >> 8)
    b.outb(MODE, 0x80)  # latch channel 2 and read only its LSB
    b.inb(CH2)
    b.clock.step(12_345)
    saved = _save(b)
    restored = _restore(*saved, now=b.clock.now(), line_level=b.line.level)
    assert _save(restored) == saved
    assert restored.pit.irq_timer.deadline == b.pit.irq_timer.deadline
    steps = [100_000] * 30 + [7_777] * 20 + [2_000_000] * 5
    assert _observe(restored, steps) == _observe(b, steps)


def test_vmstate_rejects_inconsistent_state():
    b = Board()
    pit_bytes, _ = _save(b)
    fields = [f.name for f in b.pit.VMSTATE.fields]
    offset = 0
    for f in b.pit.VMSTATE.fields:
        if f.name == "rw_mode":
            break
        offset += f.count * {"u8": 1, "u16": 2, "u32": 4, "i64": 8}[f.element.kind]
    corrupt = bytearray(pit_bytes)
    corrupt[offset] = 0
    fresh = Board()
    with pytest.raises(StateError, match=r"pit@0x40: field rw_mode\[0\]"):
        fresh.pit.VMSTATE.load(fresh.pit, bytes(corrupt), 1)
    assert "count" in fields
    fresh = Board()
    fresh.pit.count[1] = 0
    with pytest.raises(StateError, match=r"field count\[1\]"):
        fresh.pit._post_load(1)
    fresh = Board()
    fresh.pit.reload_time[2] = 5
    with pytest.raises(StateError, match=r"field reload_time\[2\]"):
        fresh.pit._post_load(1)
    fresh.port_b.control_bits = 0x21
    with pytest.raises(StateError, match="port61@0x61: field control_bits"):
        fresh.port_b._post_load(1)


def test_a_machine_saved_while_an_irq0_edge_is_due_loads_equal_and_latches_it_once():
    """A realtime clock runs on between the last timer and a pause, so a saved PIT can be
    past an OUT 0 transition its timer has not delivered yet.  The loaded machine must equal
    the saved one (a COLO secondary is checked against its primary that way) and both must
    latch the edge when the timer fires, not the load."""
    from machines import pc

    def machine():
        return pc.build(ram_size=4 << 20, serial=["null"], icount_shift=0)

    source = machine()
    for port, value in ((0x20, 0x11), (0x21, 0x08), (0x21, 0x04), (0x21, 0x01), (0x21, 0x00)):
        source.ports.write(port, 1, value)  # PIC master initialised (edge requests cleared), unmasked
    source.ports.write(MODE, 1, 0x30)  # channel 0 mode 0: OUT low, rises at terminal count
    source.ports.write(CH0, 1, 1193 & 0xFF)
    source.ports.write(CH0, 1, 1193 >> 8)
    due = source.clock.next_deadline()
    source.clock.set_now(due + 10_000)  # the edge is due, the timer has not run
    saved = source.save_state()
    loaded = machine()
    loaded.load_state(saved)
    assert loaded.save_state() == saved
    assert not loaded.interrupt_controller.pic.master.irr & 1
    for m in (source, loaded):
        assert m.clock.run_due_timers() >= 1
        assert m.interrupt_controller.pic.master.irr & 1
    assert loaded.state_digest() == source.state_digest()

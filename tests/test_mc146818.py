"""MC146818 RTC/CMOS register behaviour on a manual virtual clock (QEMU qtest style)."""

import calendar

import pytest

from emu.clock import VirtualClock
from emu.errors import StateError
from emu.irq import IrqRecorder
from emu.devices.mc146818 import (
    NEVER,
    NS_PER_SEC,
    UIP_HOLD_NS,
    Mc146818Rtc,
    civil_from_days,
    days_from_civil,
)

MS = 1_000_000
RTC_IRQ = 8
# Thursday 2024-02-29 13:45:30 UTC
BASE = calendar.timegm((2024, 2, 29, 13, 45, 30))

SECONDS, SECONDS_ALARM, MINUTES, MINUTES_ALARM, HOURS, HOURS_ALARM = 0, 1, 2, 3, 4, 5
DAY_OF_WEEK, DAY, MONTH, YEAR, REG_A, REG_B, REG_C, REG_D, CENTURY = 6, 7, 8, 9, 0xA, 0xB, 0xC, 0xD, 0x32


class Bench:
    def __init__(self, base=BASE, ram_size=64 << 20):
        self.clock = VirtualClock("manual")
        self.irqs = IrqRecorder()
        self.rtc = Mc146818Rtc("rtc", irq=self.irqs.line(RTC_IRQ), clock=self.clock, base_time=base,
                               ram_size=ram_size)

    def read(self, index):
        self.rtc.io_write(0, 1, index)
        return self.rtc.io_read(1, 1)

    def write(self, index, value):
        self.rtc.io_write(0, 1, index)
        self.rtc.io_write(1, 1, value)

    def step(self, ns):
        self.clock.step(ns)

    def step_to(self, ns):
        self.clock.step(ns - self.clock.now())

    @property
    def level(self):
        return self.irqs.levels.get(RTC_IRQ, 0)

    def rising_edges(self):
        return sum(1 for number, level in self.irqs.edges if number == RTC_IRQ and level == 1)

    def time_registers(self):
        return [self.read(i) for i in (SECONDS, MINUTES, HOURS, DAY_OF_WEEK, DAY, MONTH, YEAR, CENTURY)]


@pytest.fixture
def bench():
    return Bench()


# ---------------------------------------------------------------------- calendar helpers
@pytest.mark.parametrize("date", [(1970, 1, 1), (2000, 2, 29), (2024, 12, 31), (1900, 3, 1), (2100, 2, 28)])
def test_calendar_round_trip_matches_python(date):
    days = days_from_civil(*date)
    assert days * 86400 == calendar.timegm((*date, 0, 0, 0))
    assert civil_from_days(days) == date


# ---------------------------------------------------------------------- reading the time
def test_power_on_registers(bench):
    assert bench.read(REG_A) == 0x26
    assert bench.read(REG_B) == 0x02
    assert bench.read(REG_C) == 0x00
    assert bench.read(REG_D) == 0x80  # VRT: the battery is fine
    assert bench.level == 0


def test_bcd_24h_time(bench):
    # 2024-02-29 was a Thursday: day of week 5 with Sunday = 1
    assert bench.time_registers() == [0x30, 0x45, 0x13, 0x05, 0x29, 0x02, 0x24, 0x20]


def test_time_follows_clock_steps(bench):
    bench.step(29 * NS_PER_SEC + 999 * MS)
    assert bench.read(SECONDS) == 0x59 and bench.read(MINUTES) == 0x45
    bench.step(1 * MS)
    assert bench.read(SECONDS) == 0x00 and bench.read(MINUTES) == 0x46
    bench.step(3600 * NS_PER_SEC)
    assert bench.read(HOURS) == 0x14


def test_new_year_and_century_rollover():
    b = Bench(base=calendar.timegm((2099, 12, 31, 23, 59, 59)))
    assert b.time_registers() == [0x59, 0x59, 0x23, 0x05, 0x31, 0x12, 0x99, 0x20]
    b.step(NS_PER_SEC)
    # 2100-01-01 is a Friday (6)
    assert b.time_registers() == [0x00, 0x00, 0x00, 0x06, 0x01, 0x01, 0x00, 0x21]


def test_binary_mode(bench):
    bench.write(REG_B, 0x06)  # DM (binary) | 24h
    assert bench.time_registers() == [30, 45, 13, 5, 29, 2, 24, 20]


@pytest.mark.parametrize("reg_b, hour, expected", [
    (0x00, 13, 0x81),  # BCD, 1 PM
    (0x00, 0, 0x12),   # BCD, 12 AM
    (0x00, 12, 0x92),  # BCD, 12 PM
    (0x00, 23, 0x91),  # BCD, 11 PM
    (0x00, 9, 0x09),   # BCD, 9 AM
    (0x04, 23, 0x8B),  # binary, 11 PM
    (0x04, 10, 0x0A),  # binary, 10 AM
])
def test_12_hour_mode(reg_b, hour, expected):
    b = Bench(base=calendar.timegm((2024, 2, 29, hour, 5, 0)))
    b.write(REG_B, reg_b)
    assert b.read(HOURS) == expected


def test_uip_is_set_for_the_last_244us_of_each_second(bench):
    assert UIP_HOLD_NS == 244140
    boundary = NS_PER_SEC
    bench.step_to(boundary - UIP_HOLD_NS - 1)
    assert bench.read(REG_A) == 0x26
    bench.step_to(boundary - UIP_HOLD_NS)
    assert bench.read(REG_A) == 0xA6
    assert bench.read(SECONDS) == 0x30  # the registers still hold the old second
    bench.step_to(boundary - 1)
    assert bench.read(REG_A) & 0x80
    bench.step_to(boundary)
    assert bench.read(REG_A) == 0x26
    assert bench.read(SECONDS) == 0x31
    # the window repeats every second
    bench.step_to(2 * boundary - 100_000)
    assert bench.read(REG_A) & 0x80


def test_uip_never_set_in_set_mode(bench):
    bench.write(REG_B, 0x82)
    bench.step_to(NS_PER_SEC - 1000)
    assert bench.read(REG_A) == 0x26


def test_uip_written_by_guest_is_ignored(bench):
    bench.write(REG_A, 0xA6)
    assert bench.read(REG_A) == 0x26


# ---------------------------------------------------------------------- periodic interrupt
def count_periodic_interrupts(bench, rate_hz, duration_ns):
    """Step in half periods and acknowledge every interrupt through register C."""
    half_period = NS_PER_SEC // rate_hz // 2
    start = bench.clock.now()
    while bench.clock.now() - start < duration_ns:
        bench.step(min(half_period, duration_ns - (bench.clock.now() - start)))
        if bench.level:
            flags = bench.read(REG_C)
            assert flags & 0xC0 == 0xC0, f"IRQ high but C = {flags:#x}"
            assert bench.level == 0
    return bench.rising_edges()


@pytest.mark.parametrize("rate, hz", [(6, 1024), (3, 8192), (1, 256), (2, 128), (15, 2), (0x0A, 64)])
def test_periodic_interrupt_rate(bench, rate, hz):
    bench.write(REG_A, 0x20 | rate)
    bench.write(REG_B, 0x42)  # PIE | 24h
    # the first interrupt comes one period after PIE is set; the hz-th exactly at 1 s (+1 ns)
    assert count_periodic_interrupts(bench, hz, NS_PER_SEC) == hz - 1
    bench.step(1)
    assert bench.level == 1


def test_periodic_interrupt_needs_pie(bench):
    bench.step(10 * MS)
    assert bench.level == 0
    assert not bench.rtc.periodic_timer.armed
    assert bench.read(REG_C) & 0x40 == 0  # as QEMU: PF only ticks while PIE is set


def test_periodic_interrupt_stops_when_pie_cleared(bench):
    bench.write(REG_B, 0x42)
    assert count_periodic_interrupts(bench, 1024, 10 * MS) == 10
    bench.write(REG_B, 0x02)
    assert not bench.rtc.periodic_timer.armed
    bench.step(10 * MS)
    assert bench.rising_edges() == 10


def test_periodic_rate_zero_disables(bench):
    bench.write(REG_B, 0x42)
    bench.write(REG_A, 0x20)
    assert not bench.rtc.periodic_timer.armed


def test_periodic_rate_change_counts_from_last_interrupt(bench):
    bench.write(REG_A, 0x2F)  # 2 Hz
    bench.write(REG_B, 0x42)
    bench.step(400 * MS)  # 400 ms since the (virtual) last interrupt
    bench.write(REG_A, 0x2E)  # 4 Hz: 250 ms period, already exceeded -> next interrupt now
    deadline = bench.rtc.periodic_timer.deadline
    assert deadline - bench.clock.now() <= 1
    bench.step(1)
    assert bench.level == 1


def test_enabling_pie_with_pf_pending_interrupts_at_once(bench):
    bench.write(REG_B, 0x42)
    bench.step(2 * MS)
    bench.write(REG_B, 0x02)  # disable: IRQF and the line drop, PF stays
    assert bench.level == 0
    bench.write(REG_B, 0x42)
    assert bench.level == 1
    assert bench.read(REG_C) == 0xC0


# ---------------------------------------------------------------------- update-ended and alarm
def test_update_ended_interrupt_every_second(bench):
    bench.write(REG_B, 0x12)  # UIE | 24h
    for second in range(1, 6):
        bench.step_to(second * NS_PER_SEC - 1)
        assert bench.level == 0
        bench.step_to(second * NS_PER_SEC)
        assert bench.level == 1
        assert bench.read(REG_C) == 0x90  # IRQF | UF
        assert bench.level == 0
    assert bench.rising_edges() == 5


def test_uf_is_set_without_uie_and_interrupts_when_enabled(bench):
    bench.step(NS_PER_SEC)
    assert bench.level == 0
    bench.write(REG_B, 0x12)  # enabling UIE with UF already latched interrupts at once
    assert bench.level == 1
    assert bench.read(REG_C) == 0x90


def test_update_timer_idles_when_nobody_reads_register_c(bench):
    bench.step(2 * NS_PER_SEC)
    # UF latched and unread: the timer only waits for the next alarm match (00:00:00 daily)
    midnight = calendar.timegm((2024, 3, 1, 0, 0, 0))
    assert bench.rtc.update_timer.deadline == (midnight - BASE) * NS_PER_SEC
    bench.write(SECONDS_ALARM, 0xC0)
    bench.write(MINUTES_ALARM, 0xC0)
    bench.write(HOURS_ALARM, 0xC0)
    bench.step(NS_PER_SEC)  # AF latches too: nothing can change any more
    assert not bench.rtc.update_timer.armed
    assert bench.read(REG_C) == 0x30  # UF | AF, no IRQF: no interrupt was enabled
    assert bench.rtc.update_timer.deadline == 4 * NS_PER_SEC


def test_set_mode_clears_uie(bench):
    bench.write(REG_B, 0x92)
    assert bench.read(REG_B) == 0x82


def set_alarm(bench, hours, minutes, seconds):
    bench.write(HOURS_ALARM, hours)
    bench.write(MINUTES_ALARM, minutes)
    bench.write(SECONDS_ALARM, seconds)


def test_alarm_interrupt(bench):
    set_alarm(bench, 0x13, 0x45, 0x35)
    bench.write(REG_B, 0x22)  # AIE | 24h
    bench.step_to(5 * NS_PER_SEC - 1)
    assert bench.level == 0
    bench.step_to(5 * NS_PER_SEC)
    assert bench.level == 1
    assert bench.read(REG_C) == 0xB0  # IRQF | AF | UF
    bench.step(3600 * NS_PER_SEC)  # the next match is tomorrow
    assert bench.level == 0


def test_alarm_with_dont_care_minutes_and_hours(bench):
    set_alarm(bench, 0xFF, 0xC0, 0x00)  # every minute at :00
    bench.write(REG_B, 0x22)
    bench.read(REG_C)
    bench.step_to(30 * NS_PER_SEC - 1)
    assert bench.level == 0
    bench.step_to(30 * NS_PER_SEC)
    assert bench.level == 1
    assert bench.read(REG_C) & 0xA0 == 0xA0
    bench.step_to(90 * NS_PER_SEC - 1)
    assert bench.level == 0
    bench.step_to(90 * NS_PER_SEC)
    assert bench.level == 1


def test_alarm_every_second(bench):
    set_alarm(bench, 0xC0, 0xC0, 0xC0)
    bench.write(REG_B, 0x22)
    for second in range(1, 4):
        bench.step_to(second * NS_PER_SEC)
        assert bench.level == 1
        assert bench.read(REG_C) == 0xB0


def test_alarm_in_12_hour_mode_compares_register_bytes(bench):
    bench.write(REG_B, 0x20)  # AIE, BCD, 12 h
    set_alarm(bench, 0x81, 0x46, 0x00)  # 1:46:00 PM
    bench.read(REG_C)
    bench.step_to(30 * NS_PER_SEC - 1)
    assert bench.level == 0
    bench.step_to(30 * NS_PER_SEC)
    assert bench.level == 1


def test_alarm_that_can_never_match(bench):
    set_alarm(bench, 0x13, 0x45, 0x60)  # second 60 does not exist
    bench.write(REG_B, 0x22)
    assert bench.rtc.next_alarm_time == NEVER
    bench.step(120 * NS_PER_SEC)
    assert bench.level == 0


# ---------------------------------------------------------------------- setting the time
def test_guest_sets_time_in_set_mode(bench):
    bench.write(REG_B, 0x82)  # SET | 24h
    for index, value in ((SECONDS, 0x00), (MINUTES, 0x00), (HOURS, 0x08), (DAY, 0x15), (MONTH, 0x06),
                         (YEAR, 0x30), (CENTURY, 0x20)):
        bench.write(index, value)
    bench.step(10 * NS_PER_SEC)  # the registers do not move while SET is on
    assert bench.read(SECONDS) == 0x00 and bench.read(HOURS) == 0x08
    bench.write(REG_B, 0x02)
    bench.step(1500 * MS)
    # 2030-06-15 is a Saturday (7)
    assert bench.time_registers() == [0x01, 0x00, 0x08, 0x07, 0x15, 0x06, 0x30, 0x20]
    assert bench.rtc.current_time() == calendar.timegm((2030, 6, 15, 8, 0, 1))


def test_write_while_running_moves_the_time(bench):
    bench.write(MINUTES, 0x10)
    assert bench.read(MINUTES) == 0x10 and bench.read(SECONDS) == 0x30
    bench.step(60 * NS_PER_SEC)
    assert bench.read(MINUTES) == 0x11


def test_set_mode_freezes_current_time(bench):
    bench.step(2500 * MS)
    bench.write(REG_B, 0x82)
    bench.step(5 * NS_PER_SEC)
    assert bench.read(SECONDS) == 0x32


def test_divider_reset_stops_time_and_restarts_half_a_second_later(bench):
    bench.write(REG_A, 0x76)  # divider chain in reset
    assert not bench.rtc.update_timer.armed
    bench.step(5 * NS_PER_SEC)
    assert bench.read(SECONDS) == 0x30
    bench.write(REG_A, 0x26)
    bench.step(500 * MS - 1)
    assert bench.read(SECONDS) == 0x30
    bench.step(1)
    assert bench.read(SECONDS) == 0x31


def test_ps2_century_alias(bench):
    assert bench.read(0x37) == 0x20
    bench.write(0x37, 0x19)
    assert bench.read(CENTURY) == 0x19
    assert bench.read(YEAR) == 0x24


def test_registers_c_and_d_are_read_only(bench):
    bench.write(REG_C, 0xF0)
    bench.write(REG_D, 0x00)
    assert bench.read(REG_C) == 0x00
    assert bench.read(REG_D) == 0x80


def test_index_port_reads_all_ones(bench):
    assert bench.rtc.io_read(0, 1) == 0xFF


# ---------------------------------------------------------------------- CMOS contents
def word(bench, index):
    return bench.read(index) | bench.read(index + 1) << 8


def checksum(bench):
    return sum(bench.read(i) for i in range(0x10, 0x2E)) & 0xFFFF


@pytest.mark.parametrize("ram_mib, extended, above_16m", [
    (64, 63 * 1024, 48 * 16),
    (256, 0xFFFF, 240 * 16),
    (8, 7 * 1024, 0),
])
def test_memory_size_registers_and_checksum(ram_mib, extended, above_16m):
    b = Bench(ram_size=ram_mib << 20)
    assert word(b, 0x15) == 640
    assert word(b, 0x17) == extended
    assert word(b, 0x30) == extended
    assert word(b, 0x34) == above_16m
    assert [b.read(i) for i in (0x5B, 0x5C, 0x5D)] == [0, 0, 0]
    assert b.read(0x14) == 0x06  # FPU, PS/2 mouse, no floppy, VGA
    assert b.read(0x2E) << 8 | b.read(0x2F) == checksum(b)


def test_memory_size_values_for_64_mib():
    b = Bench(ram_size=64 << 20)
    assert [b.read(i) for i in (0x15, 0x16, 0x17, 0x18, 0x34, 0x35)] == [0x80, 0x02, 0x00, 0xFC, 0x00, 0x03]


def test_nvram_bytes_are_read_write(bench):
    bench.write(0x40, 0x5A)
    bench.write(0x7F, 0xA5)
    assert bench.read(0x40) == 0x5A and bench.read(0x7F) == 0xA5


def test_nmi_mask_bit_is_stored_and_not_part_of_the_index(bench):
    bench.rtc.io_write(0, 1, 0x80 | REG_D)
    assert bench.rtc.nmi_masked
    assert bench.rtc.io_read(1, 1) == 0x80
    bench.rtc.io_write(0, 1, REG_D)
    assert not bench.rtc.nmi_masked
    assert bench.rtc.index == REG_D


def test_word_access_is_index_then_data(bench):
    bench.rtc.io_write(0, 2, 0x55 << 8 | 0x41)
    assert bench.read(0x41) == 0x55
    bench.rtc.io_write(0, 1, 0x41)
    assert bench.rtc.io_read(0, 2) == 0x55FF


def test_reset_clears_enables_and_flags_but_keeps_time_and_cmos(bench):
    bench.write(0x0F, 0x0A)
    bench.write(0x40, 0x77)
    bench.write(REG_B, 0x7A)  # PIE | AIE | UIE | SQWE | 24h
    bench.step(NS_PER_SEC)
    assert bench.level == 1
    bench.rtc.reset()
    assert bench.level == 0
    assert bench.read(REG_B) == 0x12  # UIE and 24h survive, as in QEMU
    assert bench.read(REG_C) == 0x00
    assert bench.read(0x0F) == 0x00 and bench.read(0x40) == 0x77
    assert bench.read(SECONDS) == 0x31
    assert not bench.rtc.periodic_timer.armed


def test_reset_keeps_s3_resume_marker(bench):
    bench.write(0x0F, 0xFE)
    bench.rtc.reset()
    assert bench.read(0x0F) == 0xFE


# ---------------------------------------------------------------------- state
def clone(bench):
    """A fresh RTC (other base time and RAM size) on a clock at the same time, loaded from bench."""
    other = Bench(base=0, ram_size=1 << 20)
    other.clock.set_now(bench.clock.now())
    data = bench.rtc.VMSTATE.save(bench.rtc)
    other.rtc.VMSTATE.load(other.rtc, data, bench.rtc.VMSTATE.version_id)
    other.irqs.levels[RTC_IRQ] = bench.level  # the machine re-evaluates lines after a load
    return other, data


def test_state_round_trip_is_byte_identical(bench):
    bench.write(REG_B, 0x62)
    set_alarm(bench, 0x13, 0x46, 0x00)
    bench.rtc.io_write(0, 1, 0x80 | 0x20)
    bench.step(1234567)
    other, data = clone(bench)
    assert other.rtc.VMSTATE.save(other.rtc) == data
    assert other.rtc.nmi_masked and other.rtc.index == 0x20


def test_state_load_continues_identically(bench):
    bench.write(REG_A, 0x2A)  # 64 Hz
    bench.write(REG_B, 0x72)  # PIE | AIE | UIE
    set_alarm(bench, 0xC0, 0x45, 0x33)
    bench.step(1_500_000_000 + 12345)
    other, _ = clone(bench)
    assert other.rtc.irq_level() == bench.rtc.irq_level()
    edges_before = len(bench.irqs.edges)
    for _ in range(400):
        for b in (bench, other):
            b.step(7 * MS)
            if b.level:
                b.read(REG_C)
        assert bench.read(REG_C) == other.read(REG_C)
        assert bench.read(REG_A) == other.read(REG_A)
        assert bench.time_registers() == other.time_registers()
    assert bench.irqs.edges[edges_before:] == other.irqs.edges
    assert bench.rtc.VMSTATE.save(bench.rtc) == other.rtc.VMSTATE.save(other.rtc)


def test_state_pending_alarm_fires_after_load(bench):
    set_alarm(bench, 0x13, 0x45, 0x35)
    bench.write(REG_B, 0x22)  # AIE
    bench.step(2500 * MS)  # UF latched and unread: the update timer now waits for the alarm
    other, _ = clone(bench)
    for b in (bench, other):
        b.step_to(5 * NS_PER_SEC)
        assert b.level == 1
        assert b.read(REG_C) == 0xB0


def test_state_set_mode_and_guest_time_survive(bench):
    bench.write(REG_B, 0x82)  # SET
    bench.write(HOURS, 0x07)
    other, _ = clone(bench)
    other.step(3 * NS_PER_SEC)
    assert other.read(HOURS) == 0x07
    other.write(REG_B, 0x02)
    other.step(NS_PER_SEC)
    assert other.read(HOURS) == 0x07 and other.read(SECONDS) == 0x31


def test_changing_data_mode_does_not_convert_the_registers(bench):
    bench.write(REG_B, 0x82)  # SET: the registers hold 13:45:30 in BCD
    bench.write(REG_B, 0x86)  # binary: 0x13 hours now means 19 and 0x45 minutes 69
    bench.write(REG_B, 0x06)
    assert bench.read(HOURS) == 20 and bench.read(MINUTES) == 9 and bench.read(SECONDS) == 0x30


def tampered(bench, offset, value):
    data = bytearray(bench.rtc.VMSTATE.save(bench.rtc))
    data[offset] = value
    return bytes(data)


def test_load_rejects_index_out_of_range(bench):
    data = tampered(bench, 128, 0x80)  # the index follows the 128 CMOS bytes
    other = Bench()
    with pytest.raises(StateError, match="rtc: index 0x80"):
        other.rtc.VMSTATE.load(other.rtc, data, 1)


def test_load_rejects_periodic_timer_without_pie(bench):
    data = tampered(bench, 0x0B, 0x42)  # PIE on, but the saved periodic timer is idle
    other = Bench()
    with pytest.raises(StateError, match="rtc: periodic_timer is idle"):
        other.rtc.VMSTATE.load(other.rtc, data, 1)


def test_load_rejects_subsecond_out_of_range(bench):
    data = bytearray(bench.rtc.VMSTATE.save(bench.rtc))
    # cmos(128) index(1) nmi(1) base_seconds(8) base_clock_ns(8) -> subsecond_ns (u32)
    data[146:150] = (NS_PER_SEC).to_bytes(4, "big")
    other = Bench()
    with pytest.raises(StateError, match="subsecond_ns"):
        other.rtc.VMSTATE.load(other.rtc, bytes(data), 1)

"""Intel 8254 programmable interval timer and the PC's port 0x61 (system control port B).

Follows the Intel 82C54 datasheet (order no. 231244) and QEMU's ``hw/timer/i8254.c``,
``hw/timer/i8254_common.c`` and ``hw/audio/pcspk.c``.

Time base, as in QEMU: nothing ticks.  Each channel remembers the virtual time at which its
counting element (CE) was loaded (``count_load_time``); the elapsed input clocks are
``floor((now - count_load_time) * 1193182 / 1e9)``, and the count, OUT and the time of the
next OUT change are functions of that number.  Reads are therefore cheap and exact, and
only channel 0 (whose OUT is IRQ 0) has a timer, armed for its next OUT transition.

Where QEMU is knowingly approximate the datasheet is followed: mode 1 OUT is low during the
one-shot; modes 1 and 5 start only on a GATE rising edge; GATE low pauses modes 0 and 4 and
stops modes 2 and 3 with OUT high; mode 2 OUT is high with a one-clock low pulse; a count
written in mode 2 or 3 while counting takes effect at the end of the current period (not
half-period, in mode 3); mode 3 reads back counts decremented by two; BCD counting; the
read-back status has NULL COUNT; the first byte of a two-byte count stops mode 0.  As in
QEMU, a written count is loaded at once rather than on the next CLK pulse.

Ports: ``Pit8254`` at 0x40-0x43 (base 0x40, count 4), ``SystemControlPortB`` at 0x61
(base 0x61, count 1).  Channel 0 and 1 gates are tied high; channel 2's gate is port 0x61
bit 0 and its OUT is port 0x61 bit 5.
"""

from emu.device import Device
from emu.errors import StateError
from emu.irq import NullIrq
from emu.state.vmstate import I64, U8, U16, U32, Array, TimerField, VMStateDescription

PIT_FREQ_HZ = 1_193_182
NS_PER_SEC = 1_000_000_000
NUM_CHANNELS = 3

# Channel 0 in mode 2 or 3 with a period below this gets at most one IRQ 0 edge per this
# much virtual time (the falling edges in between are skipped), so a tiny divisor cannot
# flood the run loop with timer callbacks.  Counts read back stay exact.
MIN_IRQ_PERIOD_NS = 20_000

# read_state / write_state / count_latched values (as QEMU): which byte comes next
RW_LSB, RW_MSB, RW_WORD0, RW_WORD1 = 1, 2, 3, 4

# what the counting element is doing
CE_WAITING = 0  # no count since the control word (modes 0, 2, 3, 4) or no trigger yet (1, 5)
CE_COUNTING = 1
CE_HELD = 2  # gate low: paused (modes 0, 4) or stopped with OUT high (modes 2, 3)


def _ticks_for_ns(delta_ns):
    """Input clocks that have elapsed after ``delta_ns`` nanoseconds."""
    return max(0, delta_ns) * PIT_FREQ_HZ // NS_PER_SEC


def _ns_for_ticks(ticks):
    """The first nanosecond at which ``ticks`` clocks have elapsed."""
    return -(-ticks * NS_PER_SEC // PIT_FREQ_HZ)


def _from_bcd(raw):
    """A BCD count as a number; nibbles above 9 just weigh in (the chip does not check them)."""
    return sum(((raw >> (4 * i)) & 0xF) * 10 ** i for i in range(4))


def _to_bcd(value):
    value %= 10000
    return sum((value // 10 ** i % 10) << (4 * i) for i in range(4))


class Pit8254(Device):
    """Three 16-bit counters on a 1.193182 MHz clock; channel 0's OUT drives ``irq``."""

    def __init__(self, clock, irq=None, name="pit@0x40"):
        super().__init__(name)
        self.clock = clock
        self.irq = irq if irq is not None else NullIrq()
        self.irq_timer = clock.new_timer(self._on_irq_timer, f"{name} out0")
        self._irq_event_time = None  # derived: the deadline irq_timer is armed for
        self.reset()

    # ------------------------------------------------------------------ reset
    def reset(self):
        """Power-on as in QEMU: every channel in mode 3 with count 65536; channel 0 runs."""
        now = self.clock.now()
        n = NUM_CHANNELS
        self.mode = [3] * n  # as written (0..7); 6 and 7 act as 2 and 3
        self.bcd = [0] * n
        self.rw_mode = [RW_WORD0] * n  # access mode: 1 LSB, 2 MSB, 3 LSB then MSB
        self.read_state = [RW_WORD0] * n
        self.write_state = [RW_WORD0] * n
        self.write_latch = [0] * n
        self.latched_count = [0] * n
        self.count_latched = [0] * n
        self.status = [0] * n
        self.status_latched = [0] * n
        self.null_count = [0] * n
        self.gate = [1, 1, 0]
        self.counter_state = [CE_COUNTING, CE_COUNTING, CE_HELD]
        self.count = [0x10000] * n  # the initial count of the current run of the CE
        self.reload_value = [0x10000] * n  # the count register (CR): the last count written
        self.count_load_time = [now] * n
        self.reload_time = [-1] * n  # modes 2/3: when a newly written CR replaces the count
        self.held_ticks = [0] * n  # elapsed clocks frozen while CE_HELD
        self._drive_irq(now)

    # ------------------------------------------------------------------ the counting model
    def _mode(self, ch):
        mode = self.mode[ch]
        return mode & 3 if mode >= 6 else mode

    def _modulus(self, ch):
        return 10000 if self.bcd[ch] else 0x10000

    def _settle(self, ch, now):
        """Apply a mode 2/3 period-end reload that has come due."""
        due = self.reload_time[ch]
        if due >= 0 and now >= due:
            self.count[ch] = self.reload_value[ch]
            self.count_load_time[ch] = due
            self.reload_time[ch] = -1
            self.null_count[ch] = 0

    def _elapsed(self, ch, now):
        if self.counter_state[ch] == CE_HELD:
            return self.held_ticks[ch]
        return _ticks_for_ns(now - self.count_load_time[ch])

    def _out_after(self, ch, elapsed):
        """OUT of a counting channel ``elapsed`` clocks after the CE was loaded."""
        mode, n = self._mode(ch), self.count[ch]
        if mode in (0, 1):
            return 1 if elapsed >= n else 0
        if mode == 2:
            return 1 if n == 1 or elapsed % n != n - 1 else 0  # a count of 1 is illegal
        if mode == 3:
            return 1 if elapsed % n < (n + 1) // 2 else 0
        return 0 if elapsed == n else 1  # modes 4, 5: a one-clock strobe

    def _out(self, ch, now):
        state, mode = self.counter_state[ch], self._mode(ch)
        if state == CE_WAITING:
            return 0 if mode == 0 else 1
        if state == CE_HELD and mode in (2, 3):
            return 1
        return self._out_after(ch, self._elapsed(ch, now))

    def _counter_value(self, ch, now):
        """The CE as the guest reads it (BCD-encoded in BCD mode)."""
        mode, n = self._mode(ch), self.count[ch]
        if self.counter_state[ch] == CE_WAITING:
            value = n
        else:
            elapsed = self._elapsed(ch, now)
            if mode == 2:
                value = n - elapsed % n
            elif mode == 3:
                value = self._mode3_value(n, elapsed)
            else:
                value = n - elapsed
        value %= self._modulus(ch)
        return _to_bcd(value) if self.bcd[ch] else value

    @staticmethod
    def _mode3_value(n, elapsed):
        """Mode 3 counts down by two each half-period (datasheet, odd and even counts)."""
        phase, high_len = elapsed % n, (n + 1) // 2
        high = phase < high_len
        step = phase if high else phase - high_len
        if step == 0:
            return n
        if n % 2 == 0:
            return n - 2 * step
        return n + 1 - 2 * step if high else n - 1 - 2 * step

    def _next_transition_after(self, ch, t):
        """The absolute time OUT next changes after ``t``, or None."""
        if self.counter_state[ch] != CE_COUNTING:
            return None
        mode, n = self._mode(ch), self.count[ch]
        elapsed = self._elapsed(ch, t)
        tick = None
        if mode in (0, 1):
            tick = n if elapsed < n else None
        elif mode == 2 and n > 1:
            phase = elapsed % n
            tick = elapsed - phase + (n - 1 if phase < n - 1 else n)
        elif mode == 3 and n > 1:
            phase, high_len = elapsed % n, (n + 1) // 2
            tick = elapsed - phase + (high_len if phase < high_len else n)
        elif mode in (4, 5):
            tick = n if elapsed < n else n + 1 if elapsed == n else None
        when = None if tick is None else self.count_load_time[ch] + _ns_for_ticks(tick)
        return self._earlier_reload(ch, when, t)

    def _first_rising_edge_from(self, ch, t):
        """The first time at or after ``t`` at which OUT goes high, or None."""
        if self.counter_state[ch] != CE_COUNTING:
            return None
        mode, n, base = self._mode(ch), self.count[ch], self.count_load_time[ch]
        first = _ticks_for_ns(t - base)
        if base + _ns_for_ticks(first) < t:
            first += 1
        tick = None
        if mode in (2, 3) and n > 1:
            tick = max(1, -(-first // n)) * n
        elif mode in (0, 1):
            tick = n if n >= first else None
        elif mode in (4, 5):
            tick = n + 1 if n + 1 >= first else None
        when = None if tick is None else base + _ns_for_ticks(tick)
        return self._earlier_reload(ch, when, t - 1)

    def _earlier_reload(self, ch, when, after):
        """A pending period-end reload is an OUT event too (a rising edge)."""
        due = self.reload_time[ch]
        if due > after and (when is None or due < when):
            return due
        return when

    def _rises_at(self, ch, t):
        if self.counter_state[ch] != CE_COUNTING:
            return False
        elapsed = _ticks_for_ns(t - self.count_load_time[ch])
        return self._out_after(ch, elapsed) == 1 and self._out_after(ch, elapsed - 1) == 0

    # ------------------------------------------------------------------ IRQ 0
    def _drive_irq(self, now):
        """OUT 0 may have changed because the guest touched channel 0."""
        self.irq.set_level(self._out(0, now))
        self._arm_irq_timer(now)

    def _on_irq_timer(self):
        event_time = self._irq_event_time
        self._irq_event_time = None
        if event_time is None:
            event_time = self.clock.now()
        now = max(self.clock.now(), event_time)
        self._settle(0, event_time)
        level = self._out(0, event_time)
        if level and self._rises_at(0, event_time):
            self.irq.set_level(0)  # the low phase may have been skipped (see MIN_IRQ_PERIOD_NS)
        self.irq.set_level(level)
        upcoming = self._next_transition_after(0, event_time)
        if upcoming is not None and upcoming <= now:
            # The host fell behind: the transitions up to now all happened while no guest code
            # ran, and the PIC latches one edge of them as well as many.
            missed_rise = self._first_rising_edge_from(0, event_time + 1)
            self._settle(0, now)
            if missed_rise is not None and missed_rise <= now:
                self.irq.set_level(0)
                self.irq.set_level(1)
            self.irq.set_level(self._out(0, now))
            event_time = now
        self._arm_irq_timer(event_time)

    def _arm_irq_timer(self, t):
        deadline = self._next_transition_after(0, t)
        if deadline is not None and self._mode(0) in (2, 3) and self._period_ns(0) < MIN_IRQ_PERIOD_NS:
            deadline = self._earlier_reload(0, self._first_rising_edge_from(0, t + MIN_IRQ_PERIOD_NS), t)
        self._irq_event_time = deadline
        if deadline is None:
            self.irq_timer.cancel()
        else:
            self.irq_timer.arm(deadline)

    def _period_ns(self, ch):
        return _ns_for_ticks(self.count[ch])

    # ------------------------------------------------------------------ programming
    def _write_control(self, value):
        channel = value >> 6
        if channel == 3:
            self._read_back(value)
            return
        access = (value >> 4) & 3
        if access == 0:
            self._latch_count(channel, self.clock.now())
            return
        ch = channel
        self.rw_mode[ch] = access
        self.read_state[ch] = access
        self.write_state[ch] = access
        self.mode[ch] = (value >> 1) & 7
        self.bcd[ch] = value & 1
        # A control word resets the channel: latches dropped, OUT to its initial level.
        self.count_latched[ch] = 0
        self.status_latched[ch] = 0
        self.null_count[ch] = 1
        self.counter_state[ch] = CE_WAITING
        self.reload_time[ch] = -1
        if ch == 0:
            self._drive_irq(self.clock.now())

    def _read_back(self, value):
        now = self.clock.now()
        for ch in range(NUM_CHANNELS):
            if not value & (2 << ch):
                continue
            if not value & 0x20:
                self._latch_count(ch, now)
            if not value & 0x10 and not self.status_latched[ch]:
                self._settle(ch, now)
                self.status[ch] = (self._out(ch, now) << 7 | self.null_count[ch] << 6
                                   | self.rw_mode[ch] << 4 | self.mode[ch] << 1 | self.bcd[ch])
                self.status_latched[ch] = 1

    def _latch_count(self, ch, now):
        if not self.count_latched[ch]:  # a second latch before the read is ignored
            self._settle(ch, now)
            self.latched_count[ch] = self._counter_value(ch, now)
            self.count_latched[ch] = self.rw_mode[ch]

    def _write_count(self, ch, value):
        state = self.write_state[ch]
        if state == RW_LSB:
            self._load_count(ch, value)
        elif state == RW_MSB:
            self._load_count(ch, value << 8)
        elif state == RW_WORD0:
            self.write_latch[ch] = value
            self.write_state[ch] = RW_WORD1
            if self._mode(ch) == 0:
                # Mode 0: the first byte stops counting and drives OUT low at once.
                self.counter_state[ch] = CE_WAITING
                if ch == 0:
                    self._drive_irq(self.clock.now())
        else:
            self.write_state[ch] = RW_WORD0
            self._load_count(ch, self.write_latch[ch] | value << 8)

    def _load_count(self, ch, raw):
        now = self.clock.now()
        self._settle(ch, now)
        if self.bcd[ch]:
            n = _from_bcd(raw) or 10000
        else:
            n = raw or 0x10000
        self.reload_value[ch] = n
        mode, state = self._mode(ch), self.counter_state[ch]
        if mode in (0, 4) or (mode in (2, 3) and state == CE_WAITING):
            self.count[ch] = n
            self.null_count[ch] = 0
            self.reload_time[ch] = -1
            self._start_or_hold(ch, now)
        elif mode in (2, 3) and state == CE_COUNTING:
            # The running period completes with the old count; the new one takes over after.
            elapsed = self._elapsed(ch, now)
            period = self.count[ch]
            end = (elapsed // period + 1) * period
            self.reload_time[ch] = self.count_load_time[ch] + _ns_for_ticks(end)
            self.null_count[ch] = 1
        else:
            # Modes 1 and 5 load the CE on the next trigger; modes 2 and 3 with the gate low
            # load it when the gate rises.
            self.null_count[ch] = 1
        if ch == 0:
            self._drive_irq(now)

    def _start_or_hold(self, ch, now):
        if self.gate[ch]:
            self.counter_state[ch] = CE_COUNTING
            self.count_load_time[ch] = now
        else:
            self.counter_state[ch] = CE_HELD
            self.held_ticks[ch] = 0

    def set_gate(self, ch, level):
        """Drive the GATE input of channel ``ch`` (only channel 2's is wired, to port 0x61)."""
        level = 1 if level else 0
        now = self.clock.now()
        self._settle(ch, now)
        rising = level and not self.gate[ch]
        falling = self.gate[ch] and not level
        self.gate[ch] = level
        mode, state = self._mode(ch), self.counter_state[ch]
        if mode in (1, 5):
            if rising:  # trigger: (re)load the CE from the count register
                self._trigger(ch, now)
        elif falling and state == CE_COUNTING:
            self.held_ticks[ch] = self._elapsed(ch, now)
            self.counter_state[ch] = CE_HELD
            self.reload_time[ch] = -1  # modes 2, 3 reload from the count register when the gate rises
        elif rising and state == CE_HELD:
            if mode in (0, 4):  # resume where the CE stopped
                self.counter_state[ch] = CE_COUNTING
                self.count_load_time[ch] = now - _ns_for_ticks(self.held_ticks[ch])
            else:  # modes 2, 3: reload and restart
                self._trigger(ch, now)
        if ch == 0:
            self._drive_irq(now)

    def _trigger(self, ch, now):
        self.count[ch] = self.reload_value[ch]
        self.count_load_time[ch] = now
        self.counter_state[ch] = CE_COUNTING
        self.reload_time[ch] = -1
        self.null_count[ch] = 0

    # ------------------------------------------------------------------ guest access
    def io_read(self, offset, size):
        value = 0
        for i in range(size):
            value |= self._read_byte((offset + i) & 3) << (8 * i)
        return value

    def io_write(self, offset, size, value):
        for i in range(size):
            self._write_byte((offset + i) & 3, (value >> (8 * i)) & 0xFF)

    def _write_byte(self, offset, value):
        if offset == 3:
            self._write_control(value)
        else:
            self._write_count(offset, value)

    def _read_byte(self, offset):
        if offset == 3:
            return 0  # the control word register cannot be read (QEMU returns 0)
        ch = offset
        if self.status_latched[ch]:
            self.status_latched[ch] = 0
            return self.status[ch]
        latched = self.count_latched[ch]
        if latched:
            if latched == RW_MSB:
                self.count_latched[ch] = 0
                return self.latched_count[ch] >> 8
            self.count_latched[ch] = RW_MSB if latched == RW_WORD0 else 0
            return self.latched_count[ch] & 0xFF
        now = self.clock.now()
        self._settle(ch, now)
        count = self._counter_value(ch, now)
        state = self.read_state[ch]
        if state == RW_WORD0:
            self.read_state[ch] = RW_WORD1
        elif state == RW_WORD1:
            self.read_state[ch] = RW_WORD0
        return count >> 8 if state in (RW_MSB, RW_WORD1) else count & 0xFF

    # ------------------------------------------------------------------ for port 0x61 and tests
    def output(self, ch):
        """The OUT pin of channel ``ch`` now."""
        now = self.clock.now()
        self._settle(ch, now)
        return self._out(ch, now)

    def counter(self, ch):
        """The value a read of channel ``ch`` would return now (BCD-encoded in BCD mode)."""
        now = self.clock.now()
        self._settle(ch, now)
        return self._counter_value(ch, now)

    def next_transition(self, ch):
        """The virtual time (ns) of the next OUT change of channel ``ch``, or None."""
        now = self.clock.now()
        self._settle(ch, now)
        return self._next_transition_after(ch, now)

    # ------------------------------------------------------------------ state
    def _post_load(self, version_id):
        """Reject a state no 8254 channel can be in (fields checked in order, channel by channel)."""
        for ch in range(NUM_CHANNELS):
            self._check_loaded_access(ch)
            self._check_loaded_counter(ch)
        # IRQ 0 is not re-driven here (QEMU's pit_post_load does not either): the PIC's own
        # state holds the level it last saw, and an OUT transition that was due but not yet
        # delivered when the state was saved (a realtime clock runs on between the last timer
        # and the pause) is the restored irq_timer's to deliver.  Driving OUT as of the load's
        # "now" would latch that edge early, and then once more when the timer fires.
        self._irq_event_time = self.irq_timer.deadline

    def _bad_field(self, field, ch, why):
        raise StateError(f"{self.name}: field {field}[{ch}]: {why}")

    def _check_loaded_access(self, ch):
        """The control word's fields and the access state machine."""
        bad = self._bad_field
        for field in ("bcd", "status_latched", "null_count", "gate"):
            if getattr(self, field)[ch] > 1:
                bad(field, ch, f"value {getattr(self, field)[ch]} is not 0 or 1")
        if self.mode[ch] > 7:
            bad("mode", ch, f"value {self.mode[ch]} is not 0..7")
        rw = self.rw_mode[ch]
        if not RW_LSB <= rw <= RW_WORD0:
            bad("rw_mode", ch, f"value {rw} is not 1..3")
        allowed = (RW_WORD0, RW_WORD1) if rw == RW_WORD0 else (rw,)
        if self.read_state[ch] not in allowed:
            bad("read_state", ch, f"value {self.read_state[ch]} does not fit access mode {rw}")
        if self.write_state[ch] not in allowed:
            bad("write_state", ch, f"value {self.write_state[ch]} does not fit access mode {rw}")
        if self.count_latched[ch] > RW_WORD0:
            bad("count_latched", ch, f"value {self.count_latched[ch]} is not 0..3")

    def _check_loaded_counter(self, ch):
        """The counting element and its timing."""
        bad = self._bad_field
        if self.counter_state[ch] > CE_HELD:
            bad("counter_state", ch, f"value {self.counter_state[ch]} is not 0..2")
        for field in ("count", "reload_value"):
            if not 1 <= getattr(self, field)[ch] <= 0x10000:
                bad(field, ch, f"value {getattr(self, field)[ch]} is not 1..65536")
        if self.held_ticks[ch] < 0:
            bad("held_ticks", ch, f"value {self.held_ticks[ch]} is negative")
        if self.reload_time[ch] != -1:
            if self.reload_time[ch] < 0:
                bad("reload_time", ch, f"value {self.reload_time[ch]} is negative")
            if self.counter_state[ch] != CE_COUNTING or self._mode(ch) not in (2, 3):
                bad("reload_time", ch, "a period-end reload is pending on a channel that is not "
                                       "counting in mode 2 or 3")

    VMSTATE = VMStateDescription(
        "i8254", version_id=1, minimum_version_id=1,
        fields=[
            Array("mode", U8, NUM_CHANNELS), Array("bcd", U8, NUM_CHANNELS),
            Array("rw_mode", U8, NUM_CHANNELS), Array("read_state", U8, NUM_CHANNELS),
            Array("write_state", U8, NUM_CHANNELS), Array("write_latch", U8, NUM_CHANNELS),
            Array("latched_count", U16, NUM_CHANNELS), Array("count_latched", U8, NUM_CHANNELS),
            Array("status", U8, NUM_CHANNELS), Array("status_latched", U8, NUM_CHANNELS),
            Array("null_count", U8, NUM_CHANNELS), Array("gate", U8, NUM_CHANNELS),
            Array("counter_state", U8, NUM_CHANNELS), Array("count", U32, NUM_CHANNELS),
            Array("reload_value", U32, NUM_CHANNELS), Array("count_load_time", I64, NUM_CHANNELS),
            Array("reload_time", I64, NUM_CHANNELS), Array("held_ticks", I64, NUM_CHANNELS),
            TimerField("irq_timer"),
        ],
        post_load=lambda dev, version_id: dev._post_load(version_id),
    )


class SystemControlPortB(Device):
    """Port 0x61: PIT channel 2 gate and OUT, speaker enable, refresh toggle (PIIX "NMI SC").

    Bit 0 is channel 2's GATE, bits 1-3 (speaker data enable, SERR# and IOCHK# NMI enables)
    read back as written, bit 4 toggles every 15.085 us of virtual time like DRAM refresh
    requests (QEMU pcspk's historical ``(now / 15085) & 1``), bit 5 is channel 2's OUT.
    No NMI source exists, so bits 6 and 7 read 0.
    """

    REFRESH_HALF_PERIOD_NS = 15085
    WRITABLE_BITS = 0x0E

    def __init__(self, pit, clock, name="port61@0x61"):
        super().__init__(name)
        self.pit = pit
        self.clock = clock
        self.control_bits = 0

    def reset(self):
        self.control_bits = 0

    @property
    def speaker_data_enabled(self):
        return bool(self.control_bits & 0x02)

    def io_read(self, offset, size):
        refresh = (self.clock.now() // self.REFRESH_HALF_PERIOD_NS) & 1
        return self.pit.gate[2] | self.control_bits | refresh << 4 | self.pit.output(2) << 5

    def io_write(self, offset, size, value):
        self.control_bits = value & self.WRITABLE_BITS
        self.pit.set_gate(2, value & 1)

    def _post_load(self, version_id):
        if self.control_bits & ~self.WRITABLE_BITS:
            raise StateError(f"{self.name}: field control_bits: value {self.control_bits:#x} "
                             f"sets read-only bits")

    VMSTATE = VMStateDescription(
        "port61", version_id=1, minimum_version_id=1,
        fields=[U8("control_bits")],
        post_load=lambda dev, version_id: dev._post_load(version_id),
    )

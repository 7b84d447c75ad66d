"""Motorola MC146818A real-time clock and 128 bytes of CMOS RAM (ports 0x70-0x71, IRQ 8).

Follows the MC146818A datasheet and the behaviour of QEMU's ``hw/rtc/mc146818rtc.c``:

* Port 0x70 selects the CMOS index (bit 7 is the NMI mask on a PC; stored, see
  :attr:`Mc146818Rtc.nmi_masked`); port 0x71 reads and writes the selected byte.  Index
  0x37 (IBM PS/2 century) is an alias of the century byte 0x32, as in QEMU.
* The time is never ticked: it is computed on demand from the virtual clock.  The guest
  RTC time in ns is ``base_seconds * 1e9 + subsecond_ns + (now - base_clock_ns)``;
  ``base_time`` (Unix seconds, UTC) is the RTC time at virtual time 0.  Writing a time
  register while the clock runs, or clearing SET / releasing the divider reset after
  writing them, moves the base to the time in the registers.
* UIP reads as 1 during the last 244 us (8 cycles of 32.768 kHz) before each second.
* Periodic interrupt (PF) at the register A rate while PIE is set, update-ended (UF) and
  alarm (AF, with "don't care" values 0xC0-0xFF) interrupts from one update timer that only
  runs while a flag can still change (QEMU's check_update_timer), and IRQ 8 driven high
  exactly while IRQF is set; reading register C clears the flags and lowers the line.
* The PC memory-size bytes are filled like QEMU's ``pc_cmos_init`` (``hw/i386/pc.c``); the
  standard checksum over 0x10-0x2d is kept at 0x2e (high) / 0x2f (low).

The alarm compares the register bytes exactly as the chip does (so an impossible alarm value
never matches); daylight saving (DSE) is stored but not applied, as in QEMU.
"""

from emu.device import Device
from emu.errors import StateError
from emu.state.vmstate import I64, U8, U32, Bool, Bytes, TimerField, VMStateDescription

NS_PER_SEC = 1_000_000_000
SECONDS_PER_DAY = 86400
RTC_CLOCK_HZ = 32768
UIP_HOLD_NS = 8 * NS_PER_SEC // RTC_CLOCK_HZ  # 244 us: UIP is high this long before an update
NEVER = -1  # next_alarm_time when no time of day can match the alarm registers

# register indexes
REG_SECONDS, REG_SECONDS_ALARM, REG_MINUTES, REG_MINUTES_ALARM = 0x00, 0x01, 0x02, 0x03
REG_HOURS, REG_HOURS_ALARM, REG_DAY_OF_WEEK, REG_DAY_OF_MONTH = 0x04, 0x05, 0x06, 0x07
REG_MONTH, REG_YEAR = 0x08, 0x09
REG_A, REG_B, REG_C, REG_D = 0x0A, 0x0B, 0x0C, 0x0D
REG_SHUTDOWN_STATUS = 0x0F
REG_CENTURY = 0x32
REG_PS2_CENTURY = 0x37
TIME_REGISTERS = (REG_SECONDS, REG_MINUTES, REG_HOURS, REG_DAY_OF_WEEK, REG_DAY_OF_MONTH, REG_MONTH, REG_YEAR,
                  REG_CENTURY)
ALARM_REGISTERS = (REG_SECONDS_ALARM, REG_MINUTES_ALARM, REG_HOURS_ALARM)

# register A
A_UIP = 0x80
A_DIVIDER = 0x70  # DV2-DV0; 010 = 32.768 kHz time base running
A_DIVIDER_RESET = 0x60
A_RATE = 0x0F

# register B
B_SET, B_PIE, B_AIE, B_UIE, B_SQWE, B_DM, B_24H, B_DSE = 0x80, 0x40, 0x20, 0x10, 0x08, 0x04, 0x02, 0x01

# register C
C_IRQF, C_PF, C_AF, C_UF = 0x80, 0x40, 0x20, 0x10
C_FLAGS = C_PF | C_AF | C_UF  # the flags that pair with PIE / AIE / UIE in register B

# register D
D_VRT = 0x80

# PC CMOS layout (QEMU pc_cmos_init)
CMOS_EQUIPMENT = 0x14
CMOS_BASE_MEMORY = 0x15
CMOS_EXTENDED_MEMORY = 0x17
CMOS_CHECKSUM = 0x2E
CMOS_EXTENDED_MEMORY_COPY = 0x30
CMOS_MEMORY_ABOVE_16M = 0x34
CMOS_MEMORY_ABOVE_4G = 0x5B
EQUIPMENT_FPU_AND_PS2_MOUSE = 0x06  # what QEMU's pc machine reports with no floppy drive


# ---------------------------------------------------------------------- calendar arithmetic
def days_from_civil(year, month, day):
    """Days since 1970-01-01 of a proleptic Gregorian date (total: garbage in, a number out)."""
    year -= month <= 2
    era = year // 400
    year_of_era = year - era * 400
    month_from_march = (month + 9) % 12
    day_of_year = (153 * month_from_march + 2) // 5 + day - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    return era * 146097 + day_of_era - 719468


def civil_from_days(days):
    """(year, month, day) of a day number counted from 1970-01-01."""
    days += 719468
    era = days // 146097
    day_of_era = days - era * 146097
    year_of_era = (day_of_era - day_of_era // 1460 + day_of_era // 36524 - day_of_era // 146096) // 365
    day_of_year = day_of_era - (365 * year_of_era + year_of_era // 4 - year_of_era // 100)
    month_from_march = (5 * day_of_year + 2) // 153
    day = day_of_year - (153 * month_from_march + 2) // 5 + 1
    month = month_from_march + 3 if month_from_march < 10 else month_from_march - 9
    return year_of_era + era * 400 + (month <= 2), month, day


class Mc146818Rtc(Device):
    """The PC's RTC/CMOS chip.

    ``irq`` is the IRQ 8 :class:`~emu.irq.IrqLine`, ``clock`` the machine's virtual clock,
    ``base_time`` the RTC time (Unix seconds, UTC) at virtual time 0, ``ram_size`` the guest
    RAM in bytes (for the CMOS memory-size bytes).
    """

    def __init__(self, name, irq, clock, base_time, ram_size):
        super().__init__(name)
        self.irq = irq
        self.clock = clock
        self.cmos = bytearray(128)
        self.index = 0
        self.nmi_masked = False
        self.base_seconds = int(base_time)
        self.base_clock_ns = 0
        self.subsecond_ns = 0
        self.next_periodic_time = 0
        self.next_alarm_time = NEVER
        self.periodic_timer = clock.new_timer(self._periodic_tick, f"{name}.periodic")
        self.update_timer = clock.new_timer(self._update_tick, f"{name}.update")
        self.period = 0  # periodic interval in 32.768 kHz cycles (0: off); derived from A and B

        self.cmos[REG_A] = 0x26  # 32.768 kHz time base, 1024 Hz rate
        self.cmos[REG_B] = B_24H
        self.cmos[REG_C] = 0x00
        self.cmos[REG_D] = D_VRT
        self._store_time(self.base_seconds)
        self._fill_pc_configuration(ram_size)
        self._check_update_timer()

    # ------------------------------------------------------------------ PC CMOS contents
    def _fill_pc_configuration(self, ram_size):
        """Memory sizes and equipment byte as QEMU's pc_cmos_init, then the checksum."""
        base_kib = min(ram_size // 1024, 640)
        extended_kib = min((ram_size - (1 << 20)) // 1024, 0xFFFF) if ram_size > (1 << 20) else 0
        above_16m = min((ram_size - (16 << 20)) // 65536, 0xFFFF) if ram_size > (16 << 20) else 0
        above_4g = 0  # the pc machine maps all RAM below 4 GiB
        self._set_word(CMOS_BASE_MEMORY, base_kib)
        self._set_word(CMOS_EXTENDED_MEMORY, extended_kib)
        self._set_word(CMOS_EXTENDED_MEMORY_COPY, extended_kib)
        self._set_word(CMOS_MEMORY_ABOVE_16M, above_16m)
        self.cmos[CMOS_MEMORY_ABOVE_4G:CMOS_MEMORY_ABOVE_4G + 3] = above_4g.to_bytes(3, "little")
        self.cmos[CMOS_EQUIPMENT] = EQUIPMENT_FPU_AND_PS2_MOUSE
        checksum = sum(self.cmos[0x10:CMOS_CHECKSUM]) & 0xFFFF
        self.cmos[CMOS_CHECKSUM] = checksum >> 8
        self.cmos[CMOS_CHECKSUM + 1] = checksum & 0xFF

    def _set_word(self, index, value):
        self.cmos[index] = value & 0xFF
        self.cmos[index + 1] = (value >> 8) & 0xFF

    # ------------------------------------------------------------------ register encoding
    def _to_reg(self, value):
        """A number as the chip stores it: binary when DM is set, else BCD."""
        if self.cmos[REG_B] & B_DM:
            return value & 0xFF
        return (((value // 10) << 4) | (value % 10)) & 0xFF

    def _from_reg(self, byte):
        """A register byte as a number; 0xC0-0xFF ("don't care") decode as -1, as in QEMU."""
        if byte & 0xC0 == 0xC0:
            return -1
        if self.cmos[REG_B] & B_DM:
            return byte
        return (byte >> 4) * 10 + (byte & 0x0F)

    def _encode_hour(self, hour):
        if self.cmos[REG_B] & B_24H:
            return self._to_reg(hour)
        return self._to_reg(hour % 12 or 12) | (0x80 if hour >= 12 else 0)

    def _decode_hour(self, byte):
        hour = self._from_reg(byte & 0x7F)
        if not self.cmos[REG_B] & B_24H:
            hour = hour % 12 + (12 if byte & 0x80 else 0)
        return hour

    # ------------------------------------------------------------------ time keeping
    def _running(self):
        """The time registers follow the clock: SET clear and the divider chain running."""
        return not self.cmos[REG_B] & B_SET and (self.cmos[REG_A] & A_DIVIDER) <= 0x20

    def _guest_ns(self):
        return self.base_seconds * NS_PER_SEC + self.subsecond_ns + self.clock.now() - self.base_clock_ns

    def _store_time(self, seconds):
        """Write the calendar time ``seconds`` (Unix, UTC) into the time registers."""
        days, second_of_day = divmod(seconds, SECONDS_PER_DAY)
        year, month, day = civil_from_days(days)
        hour, rest = divmod(second_of_day, 3600)
        minute, second = divmod(rest, 60)
        cmos = self.cmos
        cmos[REG_SECONDS] = self._to_reg(second)
        cmos[REG_MINUTES] = self._to_reg(minute)
        cmos[REG_HOURS] = self._encode_hour(hour)
        cmos[REG_DAY_OF_WEEK] = self._to_reg((days + 4) % 7 + 1)  # 1970-01-01 was a Thursday; 1 = Sunday
        cmos[REG_DAY_OF_MONTH] = self._to_reg(day)
        cmos[REG_MONTH] = self._to_reg(month)
        cmos[REG_YEAR] = self._to_reg(year % 100)
        cmos[REG_CENTURY] = self._to_reg(year // 100)

    def _registers_time(self):
        """The time in the registers as Unix seconds (QEMU's rtc_get_time + mktimegm)."""
        cmos = self.cmos
        year = self._from_reg(cmos[REG_YEAR]) + self._from_reg(cmos[REG_CENTURY]) * 100
        days = days_from_civil(year, self._from_reg(cmos[REG_MONTH]), self._from_reg(cmos[REG_DAY_OF_MONTH]))
        return (days * SECONDS_PER_DAY + self._decode_hour(cmos[REG_HOURS]) * 3600
                + self._from_reg(cmos[REG_MINUTES]) * 60 + self._from_reg(cmos[REG_SECONDS]))

    def _refresh_time(self):
        """Bring the time registers up to the clock while the RTC runs."""
        if self._running():
            self._store_time(self._guest_ns() // NS_PER_SEC)

    def _set_base_from_registers(self):
        """The guest set the time: the registers' time is the RTC time from now on."""
        self.base_seconds = self._registers_time()
        self.base_clock_ns = self.clock.now()

    def _update_in_progress(self):
        if not self._running():
            return False
        deadline = self.update_timer.deadline
        if deadline is not None and self.clock.now() >= deadline - UIP_HOLD_NS:
            # latched until the update timer has run, so the guest never sees UIP drop early
            self.cmos[REG_A] |= A_UIP
            return True
        return self._guest_ns() % NS_PER_SEC >= NS_PER_SEC - UIP_HOLD_NS

    # ------------------------------------------------------------------ periodic interrupt
    def _periodic_cycles(self):
        """The periodic interval in 32.768 kHz cycles, 0 when PIE is clear or the rate is 0."""
        if not self.cmos[REG_B] & B_PIE:
            return 0
        rate = self.cmos[REG_A] & A_RATE
        if rate == 0:
            return 0
        if rate <= 2:
            rate += 7  # rates 1 and 2 repeat 256 Hz and 128 Hz
        return 1 << (rate - 1)

    def _rearm_periodic(self, current_ns, old_period, period_changed):
        """QEMU's periodic_timer_update with the "discard" lost-tick policy."""
        period = self._periodic_cycles()
        self.period = period
        if not period:
            self.periodic_timer.cancel()
            return
        current_cycle = current_ns * RTC_CLOCK_HZ // NS_PER_SEC
        elapsed = 0
        if old_period and period_changed:
            # a new rate counts from the last interrupt, not from the write
            next_cycle = self.next_periodic_time * RTC_CLOCK_HZ // NS_PER_SEC
            elapsed = max(0, current_cycle - (next_cycle - old_period))
        elapsed = min(elapsed, period)
        next_cycle = current_cycle + period - elapsed
        # +1 ns so that converting the deadline back to cycles gives next_cycle exactly
        self.next_periodic_time = next_cycle * NS_PER_SEC // RTC_CLOCK_HZ + 1
        self.periodic_timer.arm(self.next_periodic_time)

    def _periodic_tick(self):
        self._rearm_periodic(self.next_periodic_time, self.period, False)
        self.cmos[REG_C] |= C_PF
        if self.cmos[REG_B] & B_PIE:
            self.cmos[REG_C] |= C_IRQF
            self.irq.raise_irq()

    # ------------------------------------------------------------------ update and alarm
    def _seconds_to_alarm(self):
        """Seconds (1..86400) until the time registers next match the alarm, or None if never.

        The chip compares register bytes, so the candidate times are encoded in the current
        data mode and compared byte for byte; 0xC0-0xFF matches anything.
        """
        cmos = self.cmos

        def matching(alarm_byte, count, encode):
            if alarm_byte & 0xC0 == 0xC0:
                return list(range(count))
            return [v for v in range(count) if encode(v) == alarm_byte]

        hours = matching(cmos[REG_HOURS_ALARM], 24, self._encode_hour)
        minutes = matching(cmos[REG_MINUTES_ALARM], 60, self._to_reg)
        seconds = matching(cmos[REG_SECONDS_ALARM], 60, self._to_reg)
        if not (hours and minutes and seconds):
            return None
        hour = self._decode_hour(cmos[REG_HOURS])
        minute = self._from_reg(cmos[REG_MINUTES])
        second = self._from_reg(cmos[REG_SECONDS])
        now = hour * 3600 + minute * 60 + second

        def first_after(values, current):
            return next((v for v in values if v > current), None)

        match = None
        if hour in hours and minute in minutes:
            s = first_after(seconds, second)
            if s is not None:
                match = (hour, minute, s)
        if match is None and hour in hours:
            m = first_after(minutes, minute)
            if m is not None:
                match = (hour, m, seconds[0])
        if match is None:
            h = first_after(hours, hour)
            if h is not None:
                match = (h, minutes[0], seconds[0])
        if match is None:
            h, m, s = hours[0], minutes[0], seconds[0]
            return h * 3600 + m * 60 + s + SECONDS_PER_DAY - now
        h, m, s = match
        return h * 3600 + m * 60 + s - now

    def _check_update_timer(self):
        """Arm the update timer for the next second, or for the alarm once UF is latched.

        The timer only runs while UF or AF can still change: with UF set and unread it
        jumps to the alarm time, and with both set (or SET on) it stops.
        """
        if self.cmos[REG_A] & A_DIVIDER_RESET == A_DIVIDER_RESET:
            self.update_timer.cancel()
            return
        now = self.clock.now()
        next_update = now + NS_PER_SEC - self._guest_ns() % NS_PER_SEC
        self._refresh_time()
        to_alarm = self._seconds_to_alarm()
        self.next_alarm_time = NEVER if to_alarm is None else next_update + (to_alarm - 1) * NS_PER_SEC
        if not self.cmos[REG_A] & A_UIP and self.cmos[REG_C] & C_UF:
            if self.cmos[REG_B] & B_SET or self.cmos[REG_C] & C_AF or self.next_alarm_time == NEVER:
                self.update_timer.cancel()
                return
            next_update = self.next_alarm_time
        if self.update_timer.deadline != next_update:
            self.update_timer.arm(next_update)

    def _update_tick(self):
        self._refresh_time()
        self.cmos[REG_A] &= ~A_UIP
        flags = C_UF
        if self.next_alarm_time != NEVER and self.clock.now() >= self.next_alarm_time:
            flags |= C_AF
        new_flags = flags & ~self.cmos[REG_C]
        self.cmos[REG_C] |= flags
        if new_flags & self.cmos[REG_B]:
            self.cmos[REG_C] |= C_IRQF
            self.irq.raise_irq()
        self._check_update_timer()

    # ------------------------------------------------------------------ port I/O
    def io_read(self, offset, size):
        value = 0
        for i in range(size):  # the chip has byte-wide ports; wider accesses are split
            value |= self._read_byte(offset + i) << (8 * i)
        return value

    def io_write(self, offset, size, value):
        for i in range(size):
            self._write_byte(offset + i, (value >> (8 * i)) & 0xFF)

    def _read_byte(self, offset):
        if offset != 1:
            return 0xFF  # the index port is write-only
        index = self.index
        if index == REG_PS2_CENTURY:
            index = self.index = REG_CENTURY
        if index in TIME_REGISTERS:
            self._refresh_time()
            return self.cmos[index]
        if index == REG_A:
            value = self.cmos[REG_A]
            if self._update_in_progress():
                value |= A_UIP
            return value
        if index == REG_C:
            value = self.cmos[REG_C]
            self.irq.lower_irq()
            self.cmos[REG_C] = 0
            if value & (C_UF | C_AF):
                self._check_update_timer()
            return value
        return self.cmos[index]

    def _write_byte(self, offset, value):
        if offset == 0:
            self.index = value & 0x7F
            self.nmi_masked = bool(value & 0x80)
            return
        if offset != 1:
            return
        index = self.index
        if index == REG_PS2_CENTURY:
            index = self.index = REG_CENTURY
        if index in ALARM_REGISTERS:
            self.cmos[index] = value
            self._check_update_timer()
        elif index in TIME_REGISTERS:
            self.cmos[index] = value
            if self._running():
                self._set_base_from_registers()
                self._check_update_timer()
        elif index == REG_A:
            self._write_register_a(value)
        elif index == REG_B:
            self._write_register_b(value)
        elif index in (REG_C, REG_D):
            pass  # read-only
        else:
            self.cmos[index] = value

    def _write_register_a(self, value):
        old = self.cmos[REG_A]
        rate_changed = (old ^ value) & A_RATE
        old_period = self._periodic_cycles()
        if value & A_DIVIDER_RESET == A_DIVIDER_RESET:
            self._refresh_time()  # the time stops where it is
            self.cmos[REG_A] &= ~A_UIP
        elif old & A_DIVIDER_RESET == A_DIVIDER_RESET and (value & A_DIVIDER) <= 0x20:
            # datasheet: the first update after the divider reset is removed comes 500 ms later
            if not self.cmos[REG_B] & B_SET:
                self.subsecond_ns = NS_PER_SEC // 2
                self._set_base_from_registers()
            self.cmos[REG_A] &= ~A_UIP
        self.cmos[REG_A] = (value & ~A_UIP) | (self.cmos[REG_A] & A_UIP)  # UIP is read-only
        if rate_changed:
            self._rearm_periodic(self.clock.now(), old_period, True)
        self._check_update_timer()

    def _write_register_b(self, value):
        old = self.cmos[REG_B]
        pie_changed = (old ^ value) & B_PIE
        old_period = self._periodic_cycles()
        if value & B_SET:
            self._refresh_time()  # freeze the registers at the current time
            self.cmos[REG_A] &= ~A_UIP
            value &= ~B_UIE  # datasheet: SET going high clears UIE
        elif old & B_SET and (self.cmos[REG_A] & A_DIVIDER) <= 0x20:
            # leaving set mode: the registers' time starts now, keeping the sub-second phase
            self.subsecond_ns = self._guest_ns() % NS_PER_SEC
            self._set_base_from_registers()
        if value & self.cmos[REG_C] & C_FLAGS:
            # a flag already set when its interrupt is enabled interrupts at once
            self.cmos[REG_C] |= C_IRQF
            self.irq.raise_irq()
        else:
            self.cmos[REG_C] &= ~C_IRQF
            self.irq.lower_irq()
        self.cmos[REG_B] = value
        if pie_changed:
            self._rearm_periodic(self.clock.now(), old_period, True)
        self._check_update_timer()

    # ------------------------------------------------------------------ machine interface
    def irq_level(self):
        """The level IRQ 8 should have: high exactly while IRQF is set (for re-evaluation after a load)."""
        return 1 if self.cmos[REG_C] & C_IRQF else 0

    def current_time(self):
        """The RTC's time as Unix seconds (what the registers read now), for tests and the monitor."""
        self._refresh_time()
        return self._registers_time()

    def reset(self):
        """QEMU's rtc_reset: interrupt enables and flags cleared, the time and CMOS kept."""
        if self.cmos[REG_SHUTDOWN_STATUS] != 0xFE:  # 0xFE marks an S3 resume for the firmware
            self.cmos[REG_SHUTDOWN_STATUS] = 0
        self.cmos[REG_B] &= ~(B_PIE | B_AIE | B_SQWE)
        self.cmos[REG_C] &= ~(C_UF | C_IRQF | C_PF | C_AF)
        self._rearm_periodic(self.clock.now(), 0, False)
        self._check_update_timer()
        self.irq.lower_irq()

    # ------------------------------------------------------------------ state
    def _pre_save(self):
        # the time registers are a cache of the clock while running: save the current time
        self._refresh_time()

    def _post_load(self, version_id):
        name = self.name
        if self.index > 0x7F:
            raise StateError(f"{name}: index {self.index:#x} is beyond the 128 CMOS bytes")
        if not 0 <= self.subsecond_ns < NS_PER_SEC:
            raise StateError(f"{name}: subsecond_ns {self.subsecond_ns} is not below one second")
        if self.next_alarm_time < NEVER:
            raise StateError(f"{name}: next_alarm_time {self.next_alarm_time} is negative")
        period = self._periodic_cycles()
        if bool(period) != self.periodic_timer.armed:
            raise StateError(f"{name}: periodic_timer is {'armed' if self.periodic_timer.armed else 'idle'} "
                             f"but PIE/rate say the periodic interrupt is {'on' if period else 'off'}")
        if period and self.periodic_timer.deadline != self.next_periodic_time:
            raise StateError(f"{name}: periodic_timer deadline {self.periodic_timer.deadline} "
                             f"!= next_periodic_time {self.next_periodic_time}")
        if self.cmos[REG_A] & A_DIVIDER_RESET == A_DIVIDER_RESET and self.update_timer.armed:
            raise StateError(f"{name}: update_timer is armed while the divider is in reset")
        self.period = period

    VMSTATE = VMStateDescription(
        "mc146818rtc", version_id=1, minimum_version_id=1,
        fields=[
            Bytes("cmos", 128),
            U8("index"),
            Bool("nmi_masked"),
            I64("base_seconds"),
            I64("base_clock_ns"),
            U32("subsecond_ns"),
            I64("next_periodic_time"),
            TimerField("periodic_timer"),
            I64("next_alarm_time"),
            TimerField("update_timer"),
        ],
        pre_save=lambda dev: dev._pre_save(),
        post_load=lambda dev, version_id: dev._post_load(version_id),
    )

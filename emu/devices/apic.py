"""The local APIC (xAPIC mode) of a single-CPU machine.

Follows the Intel SDM vol. 3A chapter 10 ("Advanced Programmable Interrupt Controller") and
QEMU's ``hw/intc/apic.c`` / ``hw/intc/apic_common.c``.

Registers live in a 4 KiB MMIO page (``MMIO_BASE``); the machine calls ``mmio_read(offset,
size)`` / ``mmio_write(offset, size, value)`` with the offset into that page.  As in QEMU the
register is selected by ``offset >> 4``, accesses narrower than 4 bytes read 0 and are
ignored on write (the SDM leaves them model specific), and an 8-byte access is split into
two 4-byte accesses at ``offset`` and ``offset + 4``.  Offsets outside the SDM's register
table (table 10-1) are reserved: they read 0 and set "illegal register address" in the ESR;
writes to read-only registers are ignored, as QEMU does.  Offsets 0x000-0x01F (where QEMU
decodes MSI writes) are reserved here: there is no MSI.

Interrupt flow: a fixed interrupt (self IPI, timer, error, :meth:`LocalApic.deliver_irq`)
sets its IRR bit (and its TMR bit when level triggered); :meth:`has_interrupt` is true when
the highest IRR vector's priority class is above PPR's; :meth:`get_interrupt` (INTA) moves
it to ISR; an EOI write clears the highest ISR bit.  ``notify()`` is called whenever an
interrupt may have become deliverable, so the run loop can stop the CPU and deliver.  The
8259's INTR reaches the CPU through LINT0 in ExtINT mode ("virtual wire"): the run loop asks
:meth:`accept_pic_interrupt` and, as QEMU's ``apic_get_interrupt`` does, lets the PIC go
first when it is accepted and has a request (ExtINT ignores the APIC priorities).

Timer, exactly as QEMU: a 1 GHz bus clock taken from the virtual clock, so after a write of
the initial count at ``load`` the timer has counted ``(now - load) >> count_shift`` ticks.
One-shot mode interrupts once at tick ``initial + 1``, periodic mode every ``initial + 1``
ticks, and the current count is ``initial - ticks`` (one-shot, floored at 0) or ``initial -
ticks % (initial + 1)`` (periodic).  Where QEMU is loose the SDM is followed: a divide
configuration write keeps the current count (only the rate changes); a periodic timer whose
period is shorter than ``MIN_PERIODIC_IRQ_INTERVAL_NS`` fires at most once per that much
virtual time (missed periods coalesce in the IRR bit, as they would on a busy CPU); TSC-
deadline mode (LVT timer bit 18, which our CPUID does not offer) raises UnsupportedError.

SDM rules beyond QEMU's model: an explicit software disable (SVR bit 8 cleared) sets every
LVT mask bit and the masks cannot be cleared until it is enabled again; fixed interrupts
that arrive while the APIC is disabled are dropped (INIT/NMI/SMI/SIPI only are answered in
that state); vectors 0-15 are never accepted and set the illegal-vector ESR bits; the ESR is
write-then-read (errors collect in ``esr_pending`` and a write to the ESR publishes them),
and each error is signalled through the LVT error entry.  The ICR's delivery status always
reads idle: an IPI is delivered at once.

Not modelled, recorded in ``ignored_messages`` and otherwise ignored: INIT, SIPI, NMI and SMI
messages (there is no second CPU; an INIT to ourselves does not reset the CPU), the NMI,
SMI and INIT delivery modes of the LVT entries, the LINT1 pin, CMCI (the version register
says five LVT entries, as QEMU's), EOI broadcast suppression, remote read.

IA32_APIC_BASE (MSR 0x1b): ``base_msr`` with :meth:`read_base_msr` / :meth:`write_base_msr`.
Clearing the global enable bit acts like a software disable and makes the APIC transparent
(no APIC interrupts; the PIC's INTR goes straight to the CPU); it can be set again (FSB
processors, current QEMU).  The base address is recorded only: the machine maps the page.
"""

from emu.device import Device
from emu.errors import StateError, UnsupportedError
from emu.state.vmstate import I64, U8, U16, U32, U64, Array, TimerField, VMStateDescription

MMIO_BASE = 0xFEE00000
MMIO_SIZE = 0x1000

APIC_VERSION = 0x14  # an integrated xAPIC (QEMU's default)
NUM_LVT = 6  # timer, thermal, performance counters, LINT0, LINT1, error
VERSION_REGISTER = (NUM_LVT - 1) << 16 | APIC_VERSION

# IA32_APIC_BASE
MSR_IA32_APIC_BASE = 0x1B
BASE_BSP = 1 << 8
BASE_X2APIC = 1 << 10
BASE_ENABLE = 1 << 11
BASE_ADDRESS_MASK = ~0xFFF
DEFAULT_BASE_MSR = MMIO_BASE | BASE_ENABLE | BASE_BSP
PHYS_ADDR_BITS = 40  # CPUID 0x80000008 of the engine's CPU model

# register indexes (offset >> 4), SDM table 10-1
REG_ID, REG_VERSION, REG_TPR, REG_APR, REG_PPR, REG_EOI, REG_RRD = 0x02, 0x03, 0x08, 0x09, 0x0A, 0x0B, 0x0C
REG_LDR, REG_DFR, REG_SVR = 0x0D, 0x0E, 0x0F
REG_ISR, REG_TMR, REG_IRR = 0x10, 0x18, 0x20  # eight registers each
REG_ESR, REG_ICR_LOW, REG_ICR_HIGH, REG_LVT = 0x28, 0x30, 0x31, 0x32  # LVT: six registers
REG_INITIAL_COUNT, REG_CURRENT_COUNT, REG_DIVIDE_CONFIG = 0x38, 0x39, 0x3E
READ_ONLY = {REG_VERSION, REG_APR, REG_PPR, REG_RRD, REG_CURRENT_COUNT, *range(REG_ISR, REG_IRR + 8)}

# spurious-interrupt vector register
SVR_ENABLE = 1 << 8
SVR_FOCUS_DISABLE = 1 << 9
SVR_WRITABLE = 0x3FF  # vector, enable, focus checking (no EOI-broadcast suppression: version bit 24 is 0)

# LVT entries (index into ``lvt``) and their bits, SDM figure 10-8
LVT_TIMER, LVT_THERMAL, LVT_PERF, LVT_LINT0, LVT_LINT1, LVT_ERROR = range(NUM_LVT)
LVT_NAMES = ("LVT timer", "LVT thermal", "LVT performance counter", "LVT LINT0", "LVT LINT1", "LVT error")
LVT_MASKED = 1 << 16
LVT_TIMER_PERIODIC = 1 << 17
LVT_TIMER_TSC_DEADLINE = 1 << 18
LVT_LEVEL_TRIGGER = 1 << 15
LVT_WRITABLE = (
    0x000300FF,  # timer: vector, mask, periodic
    0x000107FF,  # thermal: vector, delivery mode, mask
    0x000107FF,  # performance counters: likewise
    0x0001A7FF,  # LINT0: vector, delivery mode, polarity, trigger mode, mask
    0x0001A7FF,  # LINT1: likewise
    0x000100FF,  # error: vector, mask
)
LVT_RESET = LVT_MASKED
LINT0_BSP_RESET = 0x700  # ExtINT, unmasked: the virtual wire a BIOS sets up (QEMU apic_reset_common)

# delivery modes (LVT bits 8-10, ICR bits 8-10)
DM_FIXED, DM_LOWEST, DM_SMI, DM_REMOTE_READ, DM_NMI, DM_INIT, DM_SIPI, DM_EXTINT = range(8)
DM_NAMES = ("fixed", "lowest-priority", "SMI", "remote-read", "NMI", "INIT", "SIPI", "ExtINT")

# interrupt command register
ICR_LOW_WRITABLE = 0x000CCFFF  # vector, delivery mode, dest mode, level, trigger, shorthand
ICR_HIGH_WRITABLE = 0xFF000000
ICR_DEST_LOGICAL = 1 << 11
ICR_LEVEL_ASSERT = 1 << 14
ICR_TRIGGER_LEVEL = 1 << 15
SHORTHAND_NONE, SHORTHAND_SELF, SHORTHAND_ALL, SHORTHAND_OTHERS = range(4)

# error status register bits
ESR_SEND_ILLEGAL_VECTOR = 1 << 5
ESR_RECEIVE_ILLEGAL_VECTOR = 1 << 6
ESR_ILLEGAL_REGISTER = 1 << 7
ESR_BITS = 0xFF

DFR_FLAT, DFR_CLUSTER = 0xF, 0x0
DIVIDE_CONFIG_WRITABLE = 0xB
FIRST_LEGAL_VECTOR = 16

# A periodic timer with a shorter period fires at most once per this much virtual time, so a
# tiny initial count cannot flood the run loop; the current count stays exact.
MIN_PERIODIC_IRQ_INTERVAL_NS = 20_000


def count_shift_for(divide_config):
    """Divide configuration (bits 0, 1, 3) -> log2 of the divisor (SDM figure 10-10)."""
    code = (divide_config & 3) | (divide_config >> 1) & 4
    return (code + 1) & 7


def _highest_bit(words):
    """The highest vector set in an eight-word IRR/ISR/TMR image, or -1."""
    for index in range(7, -1, -1):
        if words[index]:
            return index * 32 + words[index].bit_length() - 1
    return -1


def _no_notify():
    """A notify callback connected to nothing."""


class LocalApic(Device):
    """The local APIC of the one CPU: registers, priority logic, timer and the IA32_APIC_BASE MSR.

    ``notify()`` is called whenever an interrupt may have become deliverable (the run loop then
    asks :meth:`has_interrupt` and :meth:`accept_pic_interrupt`).  ``eoi_broadcast(vector)``,
    if given, is called on the EOI of a level-triggered vector (for a future I/O APIC).
    """

    def __init__(self, name, clock, notify=None, *, apic_id=0, bsp=True, eoi_broadcast=None,
                 phys_addr_bits=PHYS_ADDR_BITS):
        super().__init__(name)
        self.clock = clock
        self.notify = notify or _no_notify
        self.eoi_broadcast = eoi_broadcast
        self.reset_apic_id = apic_id & 0xFF
        self.bsp = bool(bsp)
        self.phys_addr_bits = phys_addr_bits
        self.timer = clock.new_timer(self._on_timer, f"{name} timer")
        # host-side diagnostics, not guest state: what we were asked to do and did not
        self.ignored_messages = {}
        self.last_ignored_message = None
        self.reset()

    # ------------------------------------------------------------------ reset
    def reset(self):
        """Power-on / RESET (SDM 10.4.7.1), with the BSP's LINT0 in virtual-wire mode as in QEMU."""
        self.base_msr = MMIO_BASE | BASE_ENABLE | (BASE_BSP if self.bsp else 0)
        self.apic_id = self.reset_apic_id
        self.tpr = 0
        self.svr = 0xFF
        self.ldr = 0  # logical APIC ID (LDR bits 24-31)
        self.dfr_model = DFR_FLAT
        self.isr = [0] * 8
        self.tmr = [0] * 8
        self.irr = [0] * 8
        self.lvt = [LVT_RESET] * NUM_LVT
        if self.bsp:
            self.lvt[LVT_LINT0] = LINT0_BSP_RESET
        self.esr = 0
        self.esr_pending = 0
        self.icr_low = 0
        self.icr_high = 0
        self.divide_config = 0
        self.count_shift = count_shift_for(0)
        self.initial_count = 0
        self.initial_count_load_time = 0
        self.timer.cancel()

    # ------------------------------------------------------------------ state predicates
    @property
    def globally_enabled(self):
        return bool(self.base_msr & BASE_ENABLE)

    @property
    def software_enabled(self):
        return bool(self.svr & SVR_ENABLE)

    @property
    def enabled(self):
        return self.globally_enabled and self.software_enabled

    @property
    def spurious_vector(self):
        return self.svr & 0xFF

    @property
    def mmio_base(self):
        """The physical address IA32_APIC_BASE places the register page at."""
        return self.base_msr & BASE_ADDRESS_MASK & ((1 << self.phys_addr_bits) - 1)

    # ------------------------------------------------------------------ priorities
    def ppr(self):
        """Processor priority (SDM 10.8.3.1): TPR, or the class of the highest in-service vector."""
        isrv = max(_highest_bit(self.isr), 0)
        if self.tpr >> 4 >= isrv >> 4:
            return self.tpr
        return isrv & 0xF0

    def apr(self):
        """Arbitration priority (SDM 10.6.2.4 of the P6 family), from TPR, ISRV and IRRV."""
        tpr_class = self.tpr >> 4
        isr_class = max(_highest_bit(self.isr), 0) >> 4
        irr_class = max(_highest_bit(self.irr), 0) >> 4
        if tpr_class >= irr_class and tpr_class > isr_class:
            return self.tpr
        return max(tpr_class, isr_class, irr_class) << 4

    def _deliverable_vector(self):
        if not self.enabled:
            return -1
        irrv = _highest_bit(self.irr)
        if irrv < 0 or irrv >> 4 <= self.ppr() >> 4:
            return -1
        return irrv

    # ------------------------------------------------------------------ the machine's interface
    def has_interrupt(self):
        """True when a fixed interrupt is pending whose priority class is above PPR's."""
        return self._deliverable_vector() >= 0

    def get_interrupt(self):
        """INTA: move the highest deliverable IRR vector to ISR and return it.

        With nothing deliverable (raced with a TPR raise, or masked by PPR) the answer is the
        spurious vector, and neither ISR nor IRR changes (SDM 10.9).
        """
        vector = self._deliverable_vector()
        if vector < 0:
            return self.spurious_vector
        self.irr[vector >> 5] &= ~(1 << (vector & 31))
        self.isr[vector >> 5] |= 1 << (vector & 31)
        return vector

    def accept_pic_interrupt(self):
        """True when the 8259's INTR is to be taken by the CPU.

        That is when the APIC is globally disabled (it is transparent), software disabled, or
        LINT0 is an unmasked ExtINT entry (virtual wire).  QEMU's ``apic_accept_pic_intr``
        checks the global enable and the LINT0 mask; the delivery mode check is KVM's.
        """
        if not self.enabled:
            return True
        lint0 = self.lvt[LVT_LINT0]
        return not lint0 & LVT_MASKED and (lint0 >> 8) & 7 == DM_EXTINT

    def deliver_irq(self, vector, level_triggered=False):
        """A fixed interrupt message for us (from an I/O APIC or MSI)."""
        self._accept(vector & 0xFF, level_triggered)

    def read_cr8(self):
        """CR8 is TPR[7:4] in 64-bit mode (SDM 10.8.6.1)."""
        return self.tpr >> 4

    def write_cr8(self, value):
        self._set_tpr((value & 0xF) << 4)

    # ------------------------------------------------------------------ IA32_APIC_BASE
    def read_base_msr(self):
        return self.base_msr

    def base_msr_reserved(self, value):
        """The bits of an IA32_APIC_BASE value that are reserved here (x2APIC included)."""
        return value & (0xFF | 1 << 9 | BASE_X2APIC | ~((1 << self.phys_addr_bits) - 1))

    def write_base_msr(self, value):
        """Returns False when the write must raise #GP(0) instead (reserved bits, x2APIC)."""
        if self.base_msr_reserved(value):
            return False
        was_enabled, pic_before = self.globally_enabled, self.accept_pic_interrupt()
        self.base_msr = (value & BASE_ADDRESS_MASK) | (value & BASE_ENABLE) | (self.base_msr & BASE_BSP)
        if was_enabled and not self.globally_enabled:
            self._software_disable()
        self._changed(pic_before)
        return True

    # ------------------------------------------------------------------ MMIO
    def mmio_read(self, offset, size):
        if size == 8:
            return self.mmio_read(offset, 4) | self.mmio_read(offset + 4, 4) << 32
        if size < 4:
            return 0
        return self._read_register((offset >> 4) & 0xFF)

    def mmio_write(self, offset, size, value):
        if size == 8:
            self.mmio_write(offset, 4, value & 0xFFFFFFFF)
            self.mmio_write(offset + 4, 4, value >> 32)
            return
        if size < 4:
            return
        self._write_register((offset >> 4) & 0xFF, value & 0xFFFFFFFF)

    def _read_register(self, index):
        """Register ``index`` (MMIO offset / 16) of the xAPIC map (SDM vol. 3, table 11-1); an
        index no register has reads 0 and signals an illegal register address."""
        for base, count, name in ARRAY_REGISTERS:
            if base <= index < base + count:
                return getattr(self, name)[index - base]
        read = REGISTER_READERS.get(index)
        if read is None:
            self._signal_error(ESR_ILLEGAL_REGISTER)
            return 0
        return read(self)

    def _write_register(self, index, value):
        if index in READ_ONLY:
            return
        if index == REG_ID:
            self.apic_id = value >> 24
        elif index == REG_TPR:
            self._set_tpr(value & 0xFF)
        elif index == REG_EOI:
            self._eoi()
        elif index == REG_LDR:
            self.ldr = value >> 24
        elif index == REG_DFR:
            self.dfr_model = value >> 28
        elif index == REG_SVR:
            self._write_svr(value)
        elif index == REG_ESR:
            self.esr, self.esr_pending = self.esr_pending, 0
        elif index == REG_ICR_LOW:
            self.icr_low = value & ICR_LOW_WRITABLE
            self._send_ipi()
        elif index == REG_ICR_HIGH:
            self.icr_high = value & ICR_HIGH_WRITABLE
        elif REG_LVT <= index < REG_LVT + NUM_LVT:
            self._write_lvt(index - REG_LVT, value)
        elif index == REG_INITIAL_COUNT:
            self.initial_count = value
            self.initial_count_load_time = self.clock.now()
            self._arm_timer(self.initial_count_load_time)
        elif index == REG_DIVIDE_CONFIG:
            self._write_divide_config(value)
        else:
            self._signal_error(ESR_ILLEGAL_REGISTER)

    # ------------------------------------------------------------------ register side effects
    def _changed(self, pic_before=True):
        """Tell the machine when something may now be deliverable."""
        if self.has_interrupt() or (not pic_before and self.accept_pic_interrupt()):
            self.notify()

    def _set_tpr(self, value):
        self.tpr = value
        self._changed()

    def _write_svr(self, value):
        pic_before = self.accept_pic_interrupt()
        self.svr = value & SVR_WRITABLE
        if not self.software_enabled:
            self._software_disable()
        self._changed(pic_before)

    def _software_disable(self):
        """SDM 10.4.7.2: every LVT mask bit is set (and stays set until re-enabled)."""
        self.svr &= ~SVR_ENABLE
        self.lvt = [entry | LVT_MASKED for entry in self.lvt]
        self._arm_timer(self.clock.now())

    def _write_lvt(self, entry, value):
        if entry == LVT_TIMER and value & LVT_TIMER_TSC_DEADLINE:
            mode = "TSC-deadline" if not value & LVT_TIMER_PERIODIC else "reserved (0b11)"
            raise UnsupportedError(f"{self.name}: LVT timer (offset 0x320) write {value:#010x} selects "
                                   f"{mode} timer mode, which is not supported")
        pic_before = self.accept_pic_interrupt()
        value &= LVT_WRITABLE[entry]
        if not self.software_enabled:
            value |= LVT_MASKED
        self.lvt[entry] = value
        if entry == LVT_TIMER:
            self._arm_timer(self.clock.now())
        elif entry == LVT_LINT0:
            self._changed(pic_before)

    def _write_divide_config(self, value):
        """The count keeps its value; only the rate changes from now on."""
        now = self.clock.now()
        ticks = self._elapsed_ticks(now)
        self.divide_config = value & DIVIDE_CONFIG_WRITABLE
        self.count_shift = count_shift_for(self.divide_config)
        if self.initial_count:
            self.initial_count_load_time = now - (ticks << self.count_shift)
            self._arm_timer(now)

    # ------------------------------------------------------------------ acceptance, EOI, errors
    def _accept(self, vector, level_triggered):
        if vector < FIRST_LEGAL_VECTOR:
            self._signal_error(ESR_RECEIVE_ILLEGAL_VECTOR)
            return
        if not self.enabled:
            self._ignore("fixed interrupt while disabled", vector)
            return
        word, bit = vector >> 5, 1 << (vector & 31)
        self.irr[word] |= bit
        if level_triggered:
            self.tmr[word] |= bit
        else:
            self.tmr[word] &= ~bit
        self._changed()

    def _eoi(self):
        vector = _highest_bit(self.isr)
        if vector < 0:
            return
        word, bit = vector >> 5, 1 << (vector & 31)
        self.isr[word] &= ~bit
        if self.tmr[word] & bit and self.eoi_broadcast is not None:
            self.eoi_broadcast(vector)
        self._changed()

    def _signal_error(self, esr_bit):
        """Log an error for the next ESR write and raise the LVT error interrupt (SDM 10.5.3)."""
        self.esr_pending |= esr_bit
        lvt = self.lvt[LVT_ERROR]
        if lvt & LVT_MASKED:
            return
        vector = lvt & 0xFF
        if vector < FIRST_LEGAL_VECTOR:
            self.esr_pending |= ESR_RECEIVE_ILLEGAL_VECTOR  # no second error interrupt for this one
            return
        self._accept(vector, False)

    def _local_deliver(self, entry):
        """A local source (timer, error) fires through its LVT entry."""
        lvt = self.lvt[entry]
        if lvt & LVT_MASKED:
            return
        mode = (lvt >> 8) & 7
        if mode == DM_FIXED:
            level = entry in (LVT_LINT0, LVT_LINT1) and bool(lvt & LVT_LEVEL_TRIGGER)
            self._accept(lvt & 0xFF, level)
        elif mode == DM_EXTINT:
            self.notify()
        else:
            self._ignore(f"{LVT_NAMES[entry]} {DM_NAMES[mode]}", lvt & 0xFF)

    def _ignore(self, kind, detail):
        self.ignored_messages[kind] = self.ignored_messages.get(kind, 0) + 1
        self.last_ignored_message = (kind, detail)

    # ------------------------------------------------------------------ IPIs
    def _targets_self(self):
        shorthand = (self.icr_low >> 18) & 3
        if shorthand in (SHORTHAND_SELF, SHORTHAND_ALL):
            return True
        if shorthand == SHORTHAND_OTHERS:
            return False
        dest = self.icr_high >> 24
        if not self.icr_low & ICR_DEST_LOGICAL:
            return dest in (0xFF, self.apic_id)
        if self.dfr_model == DFR_FLAT:
            return bool(dest & self.ldr)
        if self.dfr_model == DFR_CLUSTER:
            return dest >> 4 == self.ldr >> 4 and bool(dest & self.ldr & 0xF)
        return False

    def _send_ipi(self):
        """Deliver the IPI just written to ICR low, to ourselves if we are a destination."""
        icr = self.icr_low
        vector, mode = icr & 0xFF, (icr >> 8) & 7
        if mode in (DM_FIXED, DM_LOWEST):
            if vector < FIRST_LEGAL_VECTOR:
                self._signal_error(ESR_SEND_ILLEGAL_VECTOR)
            elif self._targets_self():
                self._accept(vector, bool(icr & ICR_TRIGGER_LEVEL))
            return
        if mode == DM_INIT and not icr & ICR_LEVEL_ASSERT and icr & ICR_TRIGGER_LEVEL:
            return  # INIT level de-assert: only resynchronises arbitration IDs
        target = "self" if self._targets_self() else "others"
        self._ignore(f"{DM_NAMES[mode]} IPI to {target}", vector)

    # ------------------------------------------------------------------ timer
    def _elapsed_ticks(self, now):
        return max(0, now - self.initial_count_load_time) >> self.count_shift

    def _periodic(self):
        return bool(self.lvt[LVT_TIMER] & LVT_TIMER_PERIODIC)

    def current_count(self):
        """The current-count register: computed from the virtual time elapsed since the load."""
        ticks = self._elapsed_ticks(self.clock.now())
        if self._periodic():
            return self.initial_count - ticks % (self.initial_count + 1)
        return max(0, self.initial_count - ticks)

    def _next_expiry_after(self, t):
        """The first timer interrupt strictly after virtual time ``t`` (QEMU apic_next_timer).

        Unlike QEMU, a one-shot re-evaluated while the count reads 0 still interrupts at the
        end of that tick (QEMU drops it), so unmasking then does not lose the interrupt.
        """
        if self.lvt[LVT_TIMER] & LVT_MASKED:
            return None
        ticks = self._elapsed_ticks(t)
        if self._periodic():
            if self.initial_count == 0:
                return None
            period = self.initial_count + 1
            tick = (ticks // period + 1) * period
        else:
            if self.initial_count == 0 or ticks > self.initial_count:
                return None
            tick = self.initial_count + 1  # the count reads 0 during tick ``initial``
        return self.initial_count_load_time + (tick << self.count_shift)

    def _arm_timer(self, t, after_expiry=False):
        deadline = self._next_expiry_after(t)
        if deadline is not None and after_expiry and self._periodic():
            if (self.initial_count + 1) << self.count_shift < MIN_PERIODIC_IRQ_INTERVAL_NS:
                deadline = self._next_expiry_after(t + MIN_PERIODIC_IRQ_INTERVAL_NS - 1)
        if deadline is None:
            self.timer.cancel()
        else:
            self.timer.arm(deadline)

    def _on_timer(self):
        self._local_deliver(LVT_TIMER)
        # Periods that passed while the host was behind coalesce into the one IRR bit.
        self._arm_timer(self.clock.now(), after_expiry=True)

    # ------------------------------------------------------------------ state
    def _post_load(self, version_id):
        """Reject a state this APIC cannot be in; derive the timer's count shift."""
        self._check_loaded_registers()
        self._check_loaded_timer()
        self.count_shift = count_shift_for(self.divide_config)

    def _bad_state(self, field, why):
        raise StateError(f"{self.name}: field {field}: {why}")

    def _check_loaded_registers(self):
        bad = self._bad_state
        if self.base_msr_reserved(self.base_msr):
            bad("base_msr", f"value {self.base_msr:#x} sets reserved bits")
        if self.svr & ~SVR_WRITABLE:
            bad("svr", f"value {self.svr:#x} sets reserved bits")
        if self.dfr_model > 0xF:
            bad("dfr_model", f"value {self.dfr_model:#x} is not 0..15")
        for entry, (value, writable) in enumerate(zip(self.lvt, LVT_WRITABLE, strict=True)):
            if value & ~writable:
                bad(f"lvt[{entry}]", f"value {value:#x} sets reserved or read-only bits of the {LVT_NAMES[entry]}")
        if self.icr_low & ~ICR_LOW_WRITABLE:
            bad("icr_low", f"value {self.icr_low:#x} sets reserved or read-only bits")
        if self.icr_high & ~ICR_HIGH_WRITABLE:
            bad("icr_high", f"value {self.icr_high:#x} sets reserved bits")
        for field in ("esr", "esr_pending"):
            if getattr(self, field) & ~ESR_BITS:
                bad(field, f"value {getattr(self, field):#x} sets reserved bits")
        if self.divide_config & ~DIVIDE_CONFIG_WRITABLE:
            bad("divide_config", f"value {self.divide_config:#x} sets reserved bits")
        for field in ("irr", "isr", "tmr"):
            if getattr(self, field)[0] & 0xFFFF:
                bad(field, f"vectors 0-15 ({getattr(self, field)[0] & 0xFFFF:#06x}) are never accepted")

    def _check_loaded_timer(self):
        deadline = self.timer.deadline
        if deadline is None:
            return
        if self.lvt[LVT_TIMER] & LVT_MASKED:
            self._bad_state("timer", "armed while the LVT timer entry is masked")
        if self.initial_count == 0:
            self._bad_state("timer", "armed with an initial count of 0")
        if deadline <= self.initial_count_load_time:
            self._bad_state("timer", f"deadline {deadline} is not after the count load time "
                                     f"{self.initial_count_load_time}")

    VMSTATE = VMStateDescription(
        "apic", version_id=1, minimum_version_id=1,
        fields=[
            U64("base_msr"), U8("apic_id"), U8("tpr"), U16("svr"), U8("ldr"), U8("dfr_model"),
            Array("isr", U32, 8), Array("tmr", U32, 8), Array("irr", U32, 8),
            Array("lvt", U32, NUM_LVT), U32("esr"), U32("esr_pending"),
            U32("icr_low"), U32("icr_high"),
            U8("divide_config"), U32("initial_count"), I64("initial_count_load_time"),
            TimerField("timer"),
        ],
        post_load=lambda dev, version_id: dev._post_load(version_id),
    )


#: the array registers of the map: (first index, count, attribute)
ARRAY_REGISTERS = ((REG_ISR, 8, "isr"), (REG_TMR, 8, "tmr"), (REG_IRR, 8, "irr"), (REG_LVT, NUM_LVT, "lvt"))
#: what reading each other register gives (SDM vol. 3, table 11-1)
REGISTER_READERS = {
    REG_ID: lambda apic: apic.apic_id << 24,
    REG_VERSION: lambda apic: VERSION_REGISTER,
    REG_TPR: lambda apic: apic.tpr,
    REG_APR: LocalApic.apr,
    REG_PPR: LocalApic.ppr,
    REG_EOI: lambda apic: 0,
    REG_RRD: lambda apic: 0,
    REG_LDR: lambda apic: apic.ldr << 24,
    REG_DFR: lambda apic: apic.dfr_model << 28 | 0x0FFFFFFF,
    REG_SVR: lambda apic: apic.svr,
    REG_ESR: lambda apic: apic.esr,
    REG_ICR_LOW: lambda apic: apic.icr_low,  # delivery status (bit 12) idle: IPIs are sent at once
    REG_ICR_HIGH: lambda apic: apic.icr_high,
    REG_INITIAL_COUNT: lambda apic: apic.initial_count,
    REG_CURRENT_COUNT: LocalApic.current_count,
    REG_DIVIDE_CONFIG: lambda apic: apic.divide_config,
}

"""Local APIC: registers, priorities, IPIs and the timer on a manual virtual clock, qtest style."""

import pytest

from emu.devices.apic import MMIO_BASE, LocalApic
from emu.clock import VirtualClock
from emu.errors import StateError, UnsupportedError

ID, VERSION, TPR, APR, PPR, EOI, RRD, LDR, DFR, SVR = 0x20, 0x30, 0x80, 0x90, 0xA0, 0xB0, 0xC0, 0xD0, 0xE0, 0xF0
ISR, TMR, IRR, ESR, ICR_LOW, ICR_HIGH = 0x100, 0x180, 0x200, 0x280, 0x300, 0x310
LVT_TIMER, LVT_THERMAL, LVT_PERF, LVT_LINT0, LVT_LINT1, LVT_ERROR = 0x320, 0x330, 0x340, 0x350, 0x360, 0x370
INITIAL_COUNT, CURRENT_COUNT, DIVIDE = 0x380, 0x390, 0x3E0
MASKED, PERIODIC = 1 << 16, 1 << 17
SELF, ALL, OTHERS = 1 << 18, 2 << 18, 3 << 18
DIVIDERS = {0xB: 1, 0x0: 2, 0x1: 4, 0x2: 8, 0x3: 16, 0x8: 32, 0x9: 64, 0xA: 128}


class Board:
    """One APIC on a manual clock, with a log of the virtual times ``notify()`` was called."""

    def __init__(self, **kwargs):
        self.clock = VirtualClock("manual")
        self.notified = []
        self.eois = []
        self.apic = LocalApic("lapic@0xfee00000", self.clock, lambda: self.notified.append(self.clock.now()),
                              eoi_broadcast=self.eois.append, **kwargs)

    def r(self, offset):
        return self.apic.mmio_read(offset, 4)

    def w(self, offset, value):
        self.apic.mmio_write(offset, 4, value)

    def enable(self, spurious=0xFF):
        self.w(SVR, 0x100 | spurious)

    def esr(self):
        self.w(ESR, 0)
        return self.r(ESR)

    def vector_set(self, base, vector):
        return bool(self.r(base + 0x10 * (vector >> 5)) & (1 << (vector & 31)))

    def irr_vectors(self):
        return [v for v in range(256) if self.vector_set(IRR, v)]

    def self_ipi(self, vector, level=False):
        self.w(ICR_LOW, SELF | vector | (1 << 15 if level else 0))

    def inta_and_eoi(self):
        vector = self.apic.get_interrupt()
        self.w(EOI, 0)
        return vector

    def save(self):
        return LocalApic.VMSTATE.save(self.apic)


@pytest.fixture
def board():
    b = Board()
    b.enable()
    return b


# ---------------------------------------------------------------- registers

def test_reset_values_follow_sdm_and_qemu():
    b = Board()
    assert b.r(ID) == 0
    assert b.r(VERSION) == 0x00050014
    assert (b.r(TPR), b.r(APR), b.r(PPR), b.r(LDR)) == (0, 0, 0, 0)
    assert b.r(DFR) == 0xFFFFFFFF
    assert b.r(SVR) == 0xFF
    assert [b.r(o) for o in (LVT_TIMER, LVT_THERMAL, LVT_PERF, LVT_LINT1, LVT_ERROR)] == [MASKED] * 5
    assert b.r(LVT_LINT0) == 0x700  # QEMU: the BSP's LINT0 is the virtual wire
    assert (b.r(INITIAL_COUNT), b.r(CURRENT_COUNT), b.r(DIVIDE), b.r(ESR)) == (0, 0, 0, 0)
    assert (b.r(ICR_LOW), b.r(ICR_HIGH)) == (0, 0)
    assert b.apic.base_msr == b.apic.read_base_msr() == 0xFEE00900
    assert b.apic.mmio_base == MMIO_BASE
    assert not b.apic.has_interrupt()


def test_apic_id_option_and_reset_restores_registers():
    b = Board(apic_id=3)
    assert b.r(ID) == 3 << 24
    b.w(ID, 7 << 24)
    b.w(TPR, 0x40)
    b.enable()
    b.apic.reset()
    assert (b.r(ID), b.r(TPR), b.r(SVR)) == (3 << 24, 0, 0xFF)


def test_writable_bits_of_each_register():
    b = Board()
    b.enable()
    b.w(ID, 0xFFFFFFFF)
    assert b.r(ID) == 0xFF000000
    b.w(TPR, 0xFFFFFFFF)
    assert b.r(TPR) == 0xFF
    b.w(LDR, 0xFFFFFFFF)
    assert b.r(LDR) == 0xFF000000
    b.w(DFR, 0)
    assert b.r(DFR) == 0x0FFFFFFF  # bits 0-27 are reserved ones
    b.w(SVR, 0xFFFFFFFF)
    assert b.r(SVR) == 0x3FF  # vector, enable, focus; no EOI-broadcast suppression
    b.w(ICR_HIGH, 0xFFFFFFFF)
    assert b.r(ICR_HIGH) == 0xFF000000
    b.w(DIVIDE, 0xFFFFFFFF)
    assert b.r(DIVIDE) == 0xB
    b.w(LVT_TIMER, 0x0003FFFF)
    assert b.r(LVT_TIMER) == 0x000300FF
    for offset in (LVT_THERMAL, LVT_PERF):
        b.w(offset, 0xFFFBFFFF)
        assert b.r(offset) == 0x000107FF
    for offset in (LVT_LINT0, LVT_LINT1):
        b.w(offset, 0xFFFFFFFF)
        assert b.r(offset) == 0x0001A7FF  # delivery status and remote IRR are read-only
    b.w(LVT_ERROR, 0xFFFFFFFF)
    assert b.r(LVT_ERROR) == 0x000100FF
    assert b.esr() == 0


def test_writes_to_read_only_registers_are_ignored_without_error(board):
    board.self_ipi(0x40)
    before = {o: board.r(o) for o in (VERSION, APR, PPR, RRD, ISR, TMR, IRR + 0x20, CURRENT_COUNT)}
    for offset in before:
        board.w(offset, 0xFFFFFFFF)
    assert {o: board.r(o) for o in before} == before
    assert board.esr() == 0


@pytest.mark.parametrize("offset", [0x000, 0x010, 0x040, 0x070, 0x2F0, 0x3A0, 0x3D0, 0x3F0, 0x400, 0xFF0])
def test_reserved_register_reads_zero_and_sets_illegal_register_after_esr_write(board, offset):
    assert board.r(offset) == 0
    assert board.r(ESR) == 0  # errors show only after a write to the ESR
    board.w(ESR, 0)
    assert board.r(ESR) == 0x80
    board.w(ESR, 0)
    assert board.r(ESR) == 0
    board.w(offset, 0x1234)
    assert board.esr() == 0x80


def test_esr_write_publishes_errors_logged_since_the_previous_write(board):
    board.r(0x400)
    board.w(ESR, 0)
    board.self_ipi(3)  # send illegal vector, logged after the write above
    assert board.r(ESR) == 0x80
    board.w(ESR, 0)
    assert board.r(ESR) == 0x20


def test_error_interrupt_through_lvt_error(board):
    board.w(LVT_ERROR, 0xFE)
    board.r(0x400)
    assert board.irr_vectors() == [0xFE]
    assert board.apic.get_interrupt() == 0xFE


def test_illegal_error_vector_does_not_recurse(board):
    board.w(LVT_ERROR, 0x03)
    board.r(0x400)
    assert board.irr_vectors() == []
    assert board.esr() == 0xC0  # illegal register, then the illegal error vector was received


def test_narrow_accesses_read_zero_and_are_ignored(board):
    board.w(TPR, 0x20)
    assert board.apic.mmio_read(TPR, 1) == 0
    assert board.apic.mmio_read(TPR, 2) == 0
    board.apic.mmio_write(TPR, 1, 0x50)
    board.apic.mmio_write(TPR, 2, 0x50)
    assert board.r(TPR) == 0x20
    assert board.r(TPR + 4) == 0x20  # the register is selected by offset >> 4, as in QEMU
    board.w(ID, 5 << 24)
    assert board.apic.mmio_read(ID, 8) == (5 << 24) | (5 << 56)


# ---------------------------------------------------------------- acceptance, priority, EOI

def test_self_ipi_inta_eoi_cycle(board):
    board.self_ipi(0x41)
    assert board.notified == [0]
    assert board.apic.has_interrupt()
    assert board.irr_vectors() == [0x41]
    assert board.r(ICR_LOW) == SELF | 0x41  # delivery status reads idle
    assert board.apic.get_interrupt() == 0x41
    assert board.irr_vectors() == []
    assert board.vector_set(ISR, 0x41)
    assert board.r(PPR) == 0x40
    assert not board.apic.has_interrupt()
    board.w(EOI, 0)
    assert not board.vector_set(ISR, 0x41)
    assert board.r(PPR) == 0


def test_priority_classes_and_nesting(board):
    for vector in (0x31, 0x55, 0x52, 0x80):
        board.self_ipi(vector)
    assert board.apic.get_interrupt() == 0x80
    assert not board.apic.has_interrupt()  # everything left is of a lower class than 0x80
    board.self_ipi(0x91)  # a higher class nests
    assert board.apic.get_interrupt() == 0x91
    board.w(EOI, 0)  # clears 0x91, the highest in service
    assert board.vector_set(ISR, 0x80) and not board.vector_set(ISR, 0x91)
    board.w(EOI, 0)
    assert board.apic.get_interrupt() == 0x55
    assert not board.apic.has_interrupt()  # 0x52 is in the same class as 0x55
    assert board.apic.get_interrupt() == 0xFF  # so INTA now answers the spurious vector
    assert board.vector_set(IRR, 0x52)
    board.w(EOI, 0)
    assert board.apic.get_interrupt() == 0x52
    board.w(EOI, 0)
    assert board.inta_and_eoi() == 0x31
    assert not board.apic.has_interrupt()


def test_tpr_masks_and_lowering_it_notifies(board):
    board.w(TPR, 0x5A)
    board.self_ipi(0x55)
    assert board.notified == []
    assert not board.apic.has_interrupt()
    assert board.r(PPR) == 0x5A
    board.enable(spurious=0xEF)
    assert board.apic.get_interrupt() == 0xEF  # spurious: nothing moves to ISR
    assert board.vector_set(IRR, 0x55) and not board.vector_set(ISR, 0x55)
    board.self_ipi(0x61)
    assert board.notified == [0]
    assert board.inta_and_eoi() == 0x61
    board.w(TPR, 0x40)
    assert board.notified == [0, 0]
    assert board.apic.get_interrupt() == 0x55


def test_ppr_from_tpr_and_isrv(board):
    board.self_ipi(0x20)
    board.apic.get_interrupt()
    board.w(TPR, 0x35)
    assert board.r(PPR) == 0x35
    board.w(TPR, 0x15)
    assert board.r(PPR) == 0x20
    board.w(TPR, 0x2F)
    assert board.r(PPR) == 0x2F  # same class as ISRV: TPR wins, sub-class bits included


def test_apr(board):
    board.w(TPR, 0x20)
    board.self_ipi(0x45)
    assert board.r(APR) == 0x40
    board.w(TPR, 0x53)
    assert board.r(APR) == 0x53


def test_cr8_is_tpr_high_nibble(board):
    board.apic.write_cr8(0x15)
    assert board.r(TPR) == 0x50
    assert board.apic.read_cr8() == 5


def test_level_triggered_interrupt_sets_tmr_and_broadcasts_eoi(board):
    board.apic.deliver_irq(0x61, level_triggered=True)
    assert board.vector_set(TMR, 0x61)
    assert board.inta_and_eoi() == 0x61
    assert board.eois == [0x61]
    board.apic.deliver_irq(0x61)  # edge: the TMR bit follows the last acceptance
    assert not board.vector_set(TMR, 0x61)
    assert board.inta_and_eoi() == 0x61
    assert board.eois == [0x61]
    board.self_ipi(0x70, level=True)
    assert board.vector_set(TMR, 0x70)


def test_eoi_with_nothing_in_service_is_harmless(board):
    board.w(EOI, 0)
    assert board.esr() == 0
    assert board.eois == []


def test_illegal_vectors_are_not_accepted(board):
    board.apic.deliver_irq(0x0F)
    assert board.irr_vectors() == []
    assert board.esr() == 0x40
    board.self_ipi(0x05)
    assert board.irr_vectors() == []
    assert board.esr() == 0x20


def test_edge_interrupts_coalesce_in_irr(board):
    board.self_ipi(0x40)
    board.self_ipi(0x40)
    assert board.inta_and_eoi() == 0x40
    assert not board.apic.has_interrupt()


# ---------------------------------------------------------------- IPI destinations and kinds

def test_physical_destination_matches_own_id_or_broadcast(board):
    board.w(ICR_HIGH, 0 << 24)
    board.w(ICR_LOW, 0x41)
    board.w(ICR_HIGH, 5 << 24)
    board.w(ICR_LOW, 0x42)
    board.w(ICR_HIGH, 0xFF << 24)
    board.w(ICR_LOW, 0x43)
    assert board.irr_vectors() == [0x41, 0x43]
    board.w(ID, 5 << 24)
    board.w(ICR_HIGH, 5 << 24)
    board.w(ICR_LOW, 0x44)
    assert board.irr_vectors() == [0x41, 0x43, 0x44]


def test_shorthands(board):
    board.w(ICR_HIGH, 9 << 24)  # the destination field is ignored with a shorthand
    board.w(ICR_LOW, SELF | 0x50)
    board.w(ICR_LOW, ALL | 0x51)
    board.w(ICR_LOW, OTHERS | 0x52)
    assert board.irr_vectors() == [0x50, 0x51]


def test_logical_flat_and_cluster_destinations(board):
    logical = 1 << 11
    board.w(LDR, 0x02 << 24)
    for dest, vector in ((0x02, 0x60), (0x01, 0x61), (0x03, 0x62)):
        board.w(ICR_HIGH, dest << 24)
        board.w(ICR_LOW, logical | vector)
    assert board.irr_vectors() == [0x60, 0x62]
    board.w(DFR, 0x0FFFFFFF)  # cluster model
    board.w(LDR, 0x21 << 24)
    for dest, vector in ((0x23, 0x70), (0x13, 0x71), (0x22, 0x72)):
        board.w(ICR_HIGH, dest << 24)
        board.w(ICR_LOW, logical | vector)
    assert board.irr_vectors() == [0x60, 0x62, 0x70]


def test_lowest_priority_ipi_to_self_is_accepted(board):
    board.w(ICR_LOW, SELF | 1 << 8 | 0x66)
    assert board.irr_vectors() == [0x66]


def test_init_sipi_nmi_are_recorded_and_ignored(board):
    board.w(ICR_LOW, OTHERS | 0x4500)  # INIT assert to all others
    board.w(ICR_LOW, OTHERS | 0x8500)  # INIT level de-assert: not even recorded
    board.w(ICR_LOW, OTHERS | 0x0608)  # SIPI, vector 8
    board.w(ICR_LOW, SELF | 0x4500)  # INIT to ourselves
    board.w(ICR_LOW, SELF | 0x0400)  # NMI to ourselves
    assert board.irr_vectors() == []
    assert board.apic.ignored_messages == {"INIT IPI to others": 1, "SIPI IPI to others": 1,
                                           "INIT IPI to self": 1, "NMI IPI to self": 1}
    assert board.apic.last_ignored_message == ("NMI IPI to self", 0)
    assert board.r(ICR_LOW) == SELF | 0x0400
    assert board.esr() == 0


# ---------------------------------------------------------------- software / global disable, virtual wire

def test_software_disable_masks_lvts_and_holds_pending_interrupts(board):
    board.self_ipi(0x40)
    board.w(LVT_TIMER, 0x30)
    board.w(INITIAL_COUNT, 100)
    board.w(SVR, 0xFF)
    assert board.r(LVT_TIMER) == MASKED | 0x30
    assert board.r(LVT_LINT0) == MASKED | 0x700
    board.w(LVT_TIMER, 0x30)
    assert board.r(LVT_TIMER) == MASKED | 0x30  # the mask cannot be cleared while disabled
    assert not board.apic.has_interrupt()
    assert board.apic.get_interrupt() == 0xFF
    board.apic.deliver_irq(0x50)  # fixed interrupts are not accepted while disabled
    board.clock.step(10_000)  # the timer is masked: no interrupt
    assert board.irr_vectors() == [0x40]
    board.enable()
    assert board.notified[-1] == 10_000
    assert board.apic.get_interrupt() == 0x40  # the held IRR bit is delivered
    assert board.r(LVT_TIMER) == MASKED | 0x30  # LVT masks stay set after re-enabling


def test_lvt_writes_at_power_on_are_masked_until_enabled():
    b = Board()
    b.w(LVT_TIMER, 0x30)
    assert b.r(LVT_TIMER) == MASKED | 0x30
    b.enable()
    b.w(LVT_TIMER, 0x30)
    assert b.r(LVT_TIMER) == 0x30


@pytest.mark.parametrize("svr_enabled, lint0, expected", [
    (False, 0x700, True),  # power-on: software disabled, virtual wire
    (False, MASKED, True),  # software disabled: the APIC is out of the way
    (True, 0x700, True),  # virtual wire
    (True, 0x8700, True),  # virtual wire, level (SeaBIOS)
    (True, MASKED | 0x700, False),  # ExtINT masked (symmetric I/O mode)
    (True, 0x31, False),  # LINT0 in fixed mode
    (True, 0x400, False),  # LINT0 in NMI mode
])
def test_accept_pic_interrupt_truth_table(svr_enabled, lint0, expected):
    b = Board()
    if svr_enabled:
        b.enable()
    b.w(LVT_LINT0, lint0)
    assert b.apic.accept_pic_interrupt() is expected


def test_accept_pic_interrupt_when_globally_disabled():
    b = Board()
    b.enable()
    b.w(LVT_LINT0, MASKED | 0x700)
    assert not b.apic.accept_pic_interrupt()
    assert b.apic.write_base_msr(0xFEE00000)
    assert b.apic.accept_pic_interrupt()
    assert b.notified == [0]  # the PIC may now reach the CPU


def test_unmasking_virtual_wire_notifies():
    b = Board()
    b.enable()
    b.w(LVT_LINT0, MASKED | 0x700)
    assert b.notified == []
    b.w(LVT_LINT0, 0x700)
    assert b.notified == [0]


def test_base_msr_global_disable_and_reenable(board):
    board.self_ipi(0x40)
    assert board.apic.write_base_msr(0xFEE00000)  # EN cleared; BSP is read-only
    assert board.apic.read_base_msr() == 0xFEE00100
    assert not board.apic.has_interrupt()
    assert board.r(SVR) == 0xFF
    board.apic.deliver_irq(0x50)
    assert board.irr_vectors() == [0x40]
    assert board.apic.write_base_msr(0xFEE00800)
    assert board.apic.read_base_msr() == 0xFEE00900
    assert not board.apic.has_interrupt()  # still software disabled
    board.enable()
    assert board.apic.get_interrupt() == 0x40


@pytest.mark.parametrize("value", [0xFEE00901, 0xFEE00D00, 0xFEE00B00, 1 << 40 | 0xFEE00900])
def test_base_msr_reserved_bits_fault(board, value):
    assert board.apic.write_base_msr(value) is False  # the CPU raises #GP(0)
    assert board.apic.read_base_msr() == 0xFEE00900


def test_base_msr_relocation_is_recorded(board):
    assert board.apic.write_base_msr(0xFED00900)
    assert board.apic.mmio_base == 0xFED00000


# ---------------------------------------------------------------- timer

def start_timer(b, initial, divide=0xB, lvt=0x30):
    b.w(DIVIDE, divide)
    b.w(LVT_TIMER, lvt)
    b.w(INITIAL_COUNT, initial)


@pytest.mark.parametrize("divide, divisor", sorted(DIVIDERS.items()))
def test_one_shot_fires_at_initial_plus_one_ticks(board, divide, divisor):
    board.clock.step(12_345)
    start = board.clock.now()
    start_timer(board, 100, divide)
    fire = start + 101 * divisor
    board.clock.step(37 * divisor + divisor - 1)
    assert board.r(CURRENT_COUNT) == 100 - 37
    board.clock.step(fire - board.clock.now() - 1)
    assert board.r(CURRENT_COUNT) == 0
    assert board.notified == []
    board.clock.step(1)
    assert board.notified == [fire]
    assert board.irr_vectors() == [0x30]
    board.clock.step(1_000_000)
    assert board.notified == [fire]  # once
    assert board.r(CURRENT_COUNT) == 0
    assert not board.apic.timer.armed


@pytest.mark.parametrize("divide, divisor", [(0xB, 1), (0x0, 2), (0x3, 16), (0xA, 128)])
def test_periodic_fires_every_initial_plus_one_ticks(board, divide, divisor):
    start_timer(board, 24_999, divide, lvt=PERIODIC | 0x31)
    period = 25_000 * divisor
    for n in range(1, 5):
        board.clock.step(period // 2)
        assert board.r(CURRENT_COUNT) == 24_999 - (period // 2) // divisor
        board.clock.step(period - period // 2)
        assert board.notified[-1] == n * period
        assert board.inta_and_eoi() == 0x31
        assert board.r(CURRENT_COUNT) == 24_999
    assert board.notified == [n * period for n in range(1, 5)]


def test_timer_counts_while_masked_and_unmasking_arms_it(board):
    start_timer(board, 1000, lvt=MASKED | 0x30)
    board.clock.step(500)
    assert board.r(CURRENT_COUNT) == 500
    assert not board.apic.timer.armed
    board.w(LVT_TIMER, 0x30)
    board.clock.step(500)
    assert board.notified == []
    board.clock.step(1)
    assert board.notified == [1001]


def test_unmasking_while_the_count_reads_zero_still_fires(board):
    start_timer(board, 1000, lvt=MASKED | 0x30)
    board.clock.step(1000)
    assert board.r(CURRENT_COUNT) == 0
    board.w(LVT_TIMER, 0x30)
    board.clock.step(1)
    assert board.notified == [1001]


def test_unmasking_after_one_shot_expiry_does_not_fire(board):
    start_timer(board, 1000, lvt=MASKED | 0x30)
    board.clock.step(5000)
    board.w(LVT_TIMER, 0x30)
    board.clock.step(5000)
    assert board.notified == [] and board.r(CURRENT_COUNT) == 0


def test_masking_mid_count_cancels_the_interrupt(board):
    start_timer(board, 1000, lvt=PERIODIC | 0x30)
    board.clock.step(600)
    board.w(LVT_TIMER, MASKED | PERIODIC | 0x30)
    board.clock.step(10_000)
    assert board.notified == []
    assert board.r(CURRENT_COUNT) == 1000 - (10_600 % 1001)


def test_initial_count_zero_stops_the_timer(board):
    start_timer(board, 1000, lvt=PERIODIC | 0x30)
    board.clock.step(300)
    board.w(INITIAL_COUNT, 0)
    assert not board.apic.timer.armed
    assert board.r(CURRENT_COUNT) == 0
    board.clock.step(10_000)
    assert board.notified == []


def test_rewriting_initial_count_restarts_the_count(board):
    start_timer(board, 1000)
    board.clock.step(700)
    board.w(INITIAL_COUNT, 1000)
    assert board.r(CURRENT_COUNT) == 1000
    board.clock.step(1000)
    assert board.notified == []
    board.clock.step(1)
    assert board.notified == [1701]


def test_switching_one_shot_to_periodic_keeps_the_phase(board):
    start_timer(board, 99)
    board.clock.step(150)  # the one-shot fired at 100
    assert board.inta_and_eoi() == 0x30
    board.w(LVT_TIMER, PERIODIC | 0x30)
    assert board.r(CURRENT_COUNT) == 99 - 50
    board.clock.step(50)
    assert board.notified == [100, 200]


def test_divide_change_keeps_the_current_count(board):
    start_timer(board, 1000)
    board.clock.step(400)
    assert board.r(CURRENT_COUNT) == 600
    board.w(DIVIDE, 0x0)  # divide by 2 from now on
    assert board.r(CURRENT_COUNT) == 600
    board.clock.step(200)
    assert board.r(CURRENT_COUNT) == 500
    board.clock.step(1001)
    assert board.notified == []
    board.clock.step(1)  # 600 remaining counts plus the final tick, two ns each, after t=400
    assert board.notified == [400 + 601 * 2]


def test_tiny_periodic_timer_is_rate_limited_but_counts_exactly(board):
    start_timer(board, 9, lvt=PERIODIC | 0x30)  # a 10 ns period
    fired = []
    board.apic.notify = lambda: fired.append(board.clock.now())
    for _ in range(100):
        board.clock.step(10_000)
        board.apic.get_interrupt()
        board.w(EOI, 0)
    assert 40 <= len(fired) <= 51  # about one per MIN_PERIODIC_IRQ_INTERVAL_NS in 1 ms
    board.clock.step(3)
    assert board.r(CURRENT_COUNT) == 9 - (1_000_003 % 10)


def test_tsc_deadline_mode_is_unsupported(board):
    board.w(LVT_TIMER, 0x30)
    with pytest.raises(UnsupportedError, match=r"lapic@0xfee00000: LVT timer \(offset 0x320\) write 0x00040030"):
        board.w(LVT_TIMER, 0x40030)
    assert board.r(LVT_TIMER) == 0x30


def test_timer_interrupt_with_illegal_vector_sets_esr(board):
    start_timer(board, 10, lvt=0x05)
    board.clock.step(100)
    assert board.irr_vectors() == []
    assert board.esr() == 0x40


# ---------------------------------------------------------------- state

def busy_board():
    b = Board()
    b.enable(spurious=0xEF)
    b.w(ID, 2 << 24)
    b.w(LDR, 0x04 << 24)
    b.w(TPR, 0x20)
    b.w(LVT_ERROR, 0xFE)
    b.w(LVT_LINT0, MASKED | 0x700)
    b.apic.deliver_irq(0x91, level_triggered=True)
    b.apic.get_interrupt()
    b.self_ipi(0x45)
    b.r(0x400)  # a pending error for the next ESR write
    b.w(ICR_HIGH, 2 << 24)
    b.w(DIVIDE, 0x1)
    b.w(LVT_TIMER, PERIODIC | 0xA0)
    b.w(INITIAL_COUNT, 12_345)
    b.clock.step(123_457)
    return b


def test_save_load_save_is_identical():
    a = busy_board()
    data = a.save()
    b = Board()
    b.clock.set_now(a.clock.now())
    LocalApic.VMSTATE.load(b.apic, data, 1)
    assert b.save() == data
    assert b.r(CURRENT_COUNT) == a.r(CURRENT_COUNT)
    assert (b.r(ID), b.r(LDR), b.r(TPR), b.r(SVR), b.r(DIVIDE)) == (2 << 24, 4 << 24, 0x20, 0x1EF, 0x1)


def test_restored_apic_continues_mid_count_identically():
    a = busy_board()
    b = Board()
    b.clock.set_now(a.clock.now())
    LocalApic.VMSTATE.load(b.apic, a.save(), 1)
    a.notified.clear()
    for board in (a, b):
        for _ in range(7):
            board.clock.step(31_111)
            board.apic.get_interrupt()
            board.w(EOI, 0)
    assert b.notified == a.notified and len(a.notified) >= 3
    assert b.r(CURRENT_COUNT) == a.r(CURRENT_COUNT)
    assert b.esr() == a.esr() == 0x80
    assert b.save() == a.save()


def test_saving_does_not_change_the_device():
    a = busy_board()
    first = a.save()
    assert a.save() == first
    assert a.apic.timer.armed


@pytest.mark.parametrize("mutate, field", [
    (lambda apic: apic.irr.__setitem__(0, 1 << 3), "irr"),
    (lambda apic: setattr(apic, "svr", 0x1000), "svr"),
    (lambda apic: apic.lvt.__setitem__(0, 1 << 18), r"lvt\[0\]"),
    (lambda apic: setattr(apic, "divide_config", 0x4), "divide_config"),
    (lambda apic: setattr(apic, "icr_low", 1 << 12), "icr_low"),
    (lambda apic: setattr(apic, "esr_pending", 0x100), "esr_pending"),
    (lambda apic: setattr(apic, "base_msr", 0xFEE00D00), "base_msr"),
    (lambda apic: apic.lvt.__setitem__(0, MASKED | PERIODIC | 0xA0), "timer"),
])
def test_post_load_rejects_inconsistent_state(mutate, field):
    a = busy_board()
    mutate(a.apic)
    data = a.save()
    b = Board()
    with pytest.raises(StateError, match=rf"lapic@0xfee00000: field {field}"):
        LocalApic.VMSTATE.load(b.apic, data, 1)

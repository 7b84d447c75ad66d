"""16550A UART register behaviour on a manual virtual clock (qtest style)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emu.clock import VirtualClock
from emu.errors import StateError
from emu.irq import IrqRecorder
from emu.devices.uart16550 import Uart16550

RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR, MCR, LSR, MSR, SCR = 3, 4, 5, 6, 7

IER_RDI, IER_THRI, IER_RLSI, IER_MSI = 1, 2, 4, 8
MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2, MCR_LOOP = 1, 2, 4, 8, 0x10
LSR_DR, LSR_OE, LSR_BI, LSR_THRE, LSR_TEMT, LSR_FIFO_ERR = 1, 2, 0x10, 0x20, 0x40, 0x80
IRQ = 4


class RecordingBackend:
    def __init__(self):
        self.out = bytearray()
        self.writes = 0

    def write(self, data):
        assert isinstance(data, bytes)
        self.out += data
        self.writes += 1


class Rig:
    def __init__(self):
        self.clock = VirtualClock("manual")
        self.irqs = IrqRecorder()
        self.backend = RecordingBackend()
        self.uart = Uart16550("serial@0x3f8", self.irqs.line(IRQ), self.clock, self.backend)

    def inb(self, reg):
        return self.uart.io_read(reg, 1)

    def outb(self, reg, value):
        self.uart.io_write(reg, 1, value)

    @property
    def irq(self):
        return self.irqs.levels.get(IRQ, 0)

    def edges(self):
        return [level for number, level in self.irqs.edges if number == IRQ]

    def init_8n1(self, divisor=1, fifo=None, ier=0, mcr=MCR_DTR | MCR_RTS | MCR_OUT2):
        self.outb(LCR, 0x80)
        self.outb(DLL, divisor & 0xFF)
        self.outb(DLM, divisor >> 8)
        self.outb(LCR, 0x03)
        if fifo is not None:
            self.outb(FCR, fifo)
        self.outb(MCR, mcr)
        self.outb(IER, ier)


@pytest.fixture
def rig():
    return Rig()


# ---------------------------------------------------------------- reset and plain registers
def test_reset_values(rig):
    assert [rig.inb(r) for r in (IER, IIR, LCR, MCR, LSR, MSR)] == [0, 0x01, 0, 0, 0x60, 0xB0]
    assert rig.irq == 0


def test_divisor_latch_and_scratch(rig):
    rig.outb(LCR, 0x83)
    rig.outb(DLL, 0x34)
    rig.outb(DLM, 0x12)
    assert (rig.inb(DLL), rig.inb(DLM)) == (0x34, 0x12)
    assert rig.backend.out == b""  # the DLL write did not transmit
    rig.outb(LCR, 0x03)
    assert rig.uart.divisor == 0x1234
    assert rig.inb(IER) == 0  # IER is back in place of DLM
    rig.outb(SCR, 0xA5)
    assert rig.inb(SCR) == 0xA5


def test_word_access_is_split_into_bytes(rig):
    rig.outb(LCR, 0x80)
    rig.uart.io_write(DLL, 2, 0x0180)
    assert rig.uart.divisor == 0x0180
    assert rig.uart.io_read(DLL, 2) == 0x0180


def test_system_reset_keeps_divisor_and_scratch(rig):
    rig.init_8n1(divisor=3, fifo=0x01, ier=IER_THRI)
    rig.outb(SCR, 0x5A)
    rig.uart.reset()
    assert rig.uart.divisor == 3 and rig.inb(SCR) == 0x5A
    assert [rig.inb(r) for r in (IER, IIR, LCR, MCR, LSR)] == [0, 0x01, 0, 0, 0x60]
    assert rig.irq == 0


# ---------------------------------------------------------------- transmitter and THRE
def test_thr_write_goes_to_backend_at_once(rig):
    rig.init_8n1()
    for ch in b"hello":
        rig.outb(THR, ch)
        assert rig.inb(LSR) & (LSR_THRE | LSR_TEMT) == LSR_THRE | LSR_TEMT
    assert rig.backend.out == b"hello"


def test_thre_interrupt_qemu_semantics(rig):
    rig.init_8n1()
    rig.outb(IER, IER_THRI)  # rising ETBEI with THR empty raises THRE
    assert rig.inb(IIR) == 0x02
    assert rig.irq == 0  # that IIR read cleared it
    assert rig.inb(IIR) == 0x01
    rig.outb(IER, IER_THRI)  # unchanged IER: no resample
    assert rig.inb(IIR) == 0x01 and rig.irq == 0
    rig.outb(IER, 0)
    rig.outb(IER, IER_THRI)  # 0 -> 1 resamples
    assert rig.irq == 1
    edges_before = len(rig.edges())
    rig.outb(THR, ord("x"))  # the write drops THRE, the byte leaving raises it again: a fresh edge
    assert rig.edges()[edges_before:] == [0, 1]
    assert rig.irq == 1 and rig.inb(IIR) == 0x02


def test_thre_not_cleared_by_iir_read_when_another_source_is_reported(rig):
    rig.init_8n1(ier=IER_THRI | IER_RDI)
    rig.uart.receive(b"a")
    assert rig.inb(IIR) == 0x04  # RDA outranks THRE
    rig.inb(RBR)
    assert rig.inb(IIR) == 0x02  # THRE survived
    assert rig.inb(IIR) == 0x01


def test_out2_gates_the_irq_line(rig):
    rig.init_8n1(mcr=MCR_DTR | MCR_RTS, ier=IER_THRI)
    assert rig.inb(IIR) == 0x02 and rig.irq == 0  # pending, but OUT2 is low; the read consumed it
    rig.outb(IER, 0)
    rig.outb(IER, IER_THRI)
    assert rig.irq == 0  # pending, but OUT2 is low
    rig.outb(MCR, MCR_OUT2)
    assert rig.irq == 1
    rig.outb(MCR, MCR_OUT2 | MCR_LOOP)  # loopback forces the OUT2 pin inactive
    assert rig.irq == 0
    rig.outb(MCR, MCR_OUT2)
    assert rig.irq == 1
    rig.outb(MCR, 0)
    assert rig.irq == 0
    assert rig.inb(IIR) == 0x02  # the chip still reports the source


def test_tx_fifo_reset_reraises_thre(rig):
    rig.init_8n1(fifo=0x01, ier=IER_THRI)
    assert rig.inb(IIR) == 0xC2
    assert rig.irq == 0
    rig.outb(FCR, 0x05)  # XFR
    assert rig.irq == 1 and rig.inb(IIR) == 0xC2


# ---------------------------------------------------------------- receiver, 16450 mode
def test_receive_without_fifo(rig):
    rig.init_8n1(ier=IER_RDI)
    assert rig.uart.can_receive() == 1
    assert rig.uart.receive(b"ab") == 1
    assert rig.uart.can_receive() == 0 and rig.uart.receive(b"b") == 0
    assert rig.irq == 1 and rig.inb(IIR) == 0x04
    assert rig.inb(LSR) & LSR_DR
    assert rig.inb(RBR) == ord("a")
    assert rig.irq == 0 and not rig.inb(LSR) & LSR_DR
    assert rig.inb(RBR) == ord("a")  # the RBR keeps its last character
    assert rig.uart.receive(b"b") == 1 and rig.inb(RBR) == ord("b")


def test_overrun_without_fifo_in_loopback(rig):
    rig.init_8n1(ier=IER_RDI | IER_RLSI, mcr=MCR_LOOP)
    rig.outb(THR, 0x11)
    rig.outb(THR, 0x22)
    assert rig.backend.out == b""  # nothing reaches the host in loopback
    assert rig.inb(IIR) == 0x06  # line status outranks received data
    lsr = rig.inb(LSR)
    assert lsr & (LSR_OE | LSR_DR) == LSR_OE | LSR_DR
    assert not rig.inb(LSR) & LSR_OE  # cleared by the read
    assert rig.inb(IIR) == 0x04
    assert rig.inb(RBR) == 0x22  # the older character was overwritten


# ---------------------------------------------------------------- FIFO mode
def test_fifo_fill_and_drain(rig):
    rig.init_8n1(fifo=0x07)
    assert rig.inb(IIR) & 0xC0 == 0xC0
    assert rig.uart.can_receive() == 16
    assert rig.uart.receive(bytes(range(20))) == 16
    assert rig.uart.can_receive() == 0
    assert not rig.inb(LSR) & LSR_OE  # host input is held back, not overrun
    assert bytes(rig.inb(RBR) for _ in range(16)) == bytes(range(16))
    assert not rig.inb(LSR) & LSR_DR
    assert rig.inb(RBR) == 0  # an empty FIFO reads 0


@pytest.mark.parametrize("fcr, level", [(0x01, 1), (0x41, 4), (0x81, 8), (0xC1, 14)])
def test_rx_trigger_levels(rig, fcr, level):
    rig.init_8n1(fifo=fcr, ier=IER_RDI)
    assert rig.uart.receive(bytes(level - 1)) == level - 1
    assert rig.irq == 0 and rig.inb(IIR) == 0xC1
    rig.uart.receive(b"x")
    assert rig.irq == 1 and rig.inb(IIR) == 0xC4
    rig.inb(RBR)  # one below the trigger level: RDA goes away
    assert rig.inb(IIR) == 0xC1 and rig.irq == 0
    assert rig.inb(LSR) & LSR_DR == (1 if level > 1 else 0)


def test_fifo_disable_clears_and_hides_fifo_bits(rig):
    rig.init_8n1(fifo=0x01)
    rig.uart.receive(b"abc")
    rig.outb(FCR, 0x00)
    assert rig.inb(IIR) == 0x01
    assert not rig.inb(LSR) & LSR_DR
    rig.outb(FCR, 0x01)
    assert rig.uart.receive(b"z") == 1 and rig.inb(RBR) == ord("z")


def test_rx_fifo_reset(rig):
    rig.init_8n1(fifo=0x01, ier=IER_RDI)
    rig.uart.receive(b"abc")
    assert rig.irq == 1
    rig.outb(FCR, 0x03)
    assert rig.irq == 0 and not rig.inb(LSR) & LSR_DR and rig.uart.can_receive() == 16
    rig.clock.step(10_000_000)
    assert rig.inb(IIR) == 0xC1  # the timeout was cancelled with the data


def test_fifo_overrun_in_loopback(rig):
    rig.init_8n1(fifo=0x01, ier=IER_RLSI, mcr=MCR_LOOP)
    for i in range(17):
        rig.outb(THR, i)
    assert rig.inb(IIR) == 0xC6
    assert rig.inb(LSR) & LSR_OE
    assert rig.inb(IIR) == 0xC1
    assert bytes(rig.inb(RBR) for _ in range(16)) == bytes(range(16))  # the 17th was lost


# ---------------------------------------------------------------- character timeout
def char_time_ns(rig):
    return rig.uart.character_time_ns()


def test_character_time_from_divisor_and_lcr(rig):
    rig.init_8n1(divisor=1)
    assert char_time_ns(rig) == 10 * 1_000_000_000 // 115200  # 8N1: 10 bits
    rig.outb(LCR, 0x80)
    rig.outb(DLL, 12)
    rig.outb(LCR, 0x1A)  # 7 data bits, even parity, 1 stop: 10 bits at 9600
    assert char_time_ns(rig) == 10 * 12 * 1_000_000_000 // 115200
    rig.outb(LCR, 0x0F)  # 8 data, parity, 2 stop: 12 bits
    assert char_time_ns(rig) == 12 * 12 * 1_000_000_000 // 115200
    rig.outb(LCR, 0x04)  # 5 data, 1.5 stop: 7.5 bits
    assert char_time_ns(rig) == 15 * 12 * 1_000_000_000 // (2 * 115200)


@pytest.mark.parametrize("divisor, lcr", [(1, 0x03), (12, 0x03), (96, 0x0F)])
def test_character_timeout_after_four_character_times(rig, divisor, lcr):
    rig.init_8n1(divisor=divisor, fifo=0xC1, ier=IER_RDI)  # trigger 14: 3 bytes never trigger RDA
    rig.outb(LCR, lcr)
    timeout = 4 * char_time_ns(rig)
    rig.uart.receive(b"abc")
    rig.clock.step(timeout - 1)
    assert rig.irq == 0 and rig.inb(IIR) == 0xC1
    rig.clock.step(1)
    assert rig.irq == 1 and rig.inb(IIR) == 0xCC
    assert rig.inb(RBR) == ord("a")  # a read clears the timeout and restarts the timer
    assert rig.irq == 0 and rig.inb(IIR) == 0xC1
    rig.clock.step(timeout - 1)
    assert rig.irq == 0
    rig.clock.step(1)
    assert rig.inb(IIR) == 0xCC
    rig.inb(RBR)
    rig.inb(RBR)
    rig.clock.step(10 * timeout)  # FIFO empty: no more timeouts
    assert rig.inb(IIR) == 0xC1 and rig.irq == 0


def test_new_character_restarts_the_timeout(rig):
    rig.init_8n1(fifo=0xC1, ier=IER_RDI)
    timeout = 4 * char_time_ns(rig)
    rig.uart.receive(b"a")
    rig.clock.step(timeout - 10)
    rig.uart.receive(b"b")
    rig.clock.step(timeout - 10)
    assert rig.irq == 0
    rig.clock.step(10)
    assert rig.inb(IIR) == 0xCC


def test_character_timeout_is_masked_by_rdi(rig):
    rig.init_8n1(fifo=0xC1, ier=0)
    rig.uart.receive(b"a")
    rig.clock.step(10_000_000)
    assert rig.inb(IIR) == 0xC1 and rig.irq == 0
    rig.outb(IER, IER_RDI)
    assert rig.inb(IIR) == 0xCC and rig.irq == 1


# ---------------------------------------------------------------- priorities
def test_iir_priority_order(rig):
    rig.init_8n1(fifo=0x01, ier=0, mcr=MCR_LOOP | MCR_OUT2)
    rig.outb(THR, 0x41)
    rig.outb(MCR, MCR_LOOP | MCR_OUT2 | MCR_RTS)  # CTS changes: DCTS
    for _ in range(16):
        rig.outb(THR, 0x42)  # overrun
    rig.outb(IER, 0x0F)
    assert rig.inb(IIR) == 0xC6
    rig.inb(LSR)
    assert rig.inb(IIR) == 0xC4
    while rig.inb(LSR) & LSR_DR:
        rig.inb(RBR)
    assert rig.inb(IIR) == 0xC2
    assert rig.inb(IIR) == 0xC0  # the IIR read took THRE; modem status is left
    msr = rig.inb(MSR)
    assert msr == 0x90 | 0x03  # CTS from RTS, DCD from OUT2; CTS and DSR changed since reset
    assert rig.inb(IIR) == 0xC1


# ---------------------------------------------------------------- modem status
def test_loopback_mirrors_modem_lines_like_linux_autoconfig(rig):
    rig.outb(MCR, MCR_LOOP | 0x0A)
    assert rig.inb(MSR) & 0xF0 == 0x90
    rig.outb(MCR, MCR_LOOP | MCR_DTR | MCR_OUT1)
    assert rig.inb(MSR) & 0xF0 == 0x60
    rig.outb(MCR, MCR_LOOP)
    msr = rig.inb(MSR)
    assert msr == 0x02 | 0x04  # DSR and RI fell: DDSR and TERI
    rig.outb(MCR, 0)
    assert rig.inb(MSR) & 0xF0 == 0xB0  # the pins again


def test_modem_input_deltas_and_interrupt(rig):
    rig.init_8n1(ier=IER_MSI)
    assert rig.irq == 0
    rig.uart.set_modem_inputs(cts=False)
    assert rig.irq == 1 and rig.inb(IIR) == 0x00
    assert rig.inb(MSR) == 0xA0 | 0x01
    assert rig.irq == 0 and rig.inb(MSR) == 0xA0
    rig.uart.set_modem_inputs(ri=True)
    assert rig.inb(MSR) == 0xE0  # rising RI: no TERI
    rig.uart.set_modem_inputs(ri=False, dcd=False)
    assert rig.inb(MSR) == 0x20 | 0x04 | 0x08


# ---------------------------------------------------------------- break
def test_loopback_break_is_received_after_one_character_time(rig):
    rig.init_8n1(fifo=0x01, ier=IER_RLSI | IER_RDI, mcr=MCR_LOOP)
    rig.outb(THR, ord("x"))
    rig.outb(LCR, 0x43)
    rig.outb(THR, ord("y"))  # sent during break: lost
    rig.clock.step(char_time_ns(rig) - 1)
    assert rig.inb(IIR) == 0xC4
    rig.clock.step(1)
    # the break character is in the FIFO but not at the top: LSR bit 7 only, no line status interrupt
    assert rig.inb(IIR) == 0xC4
    assert rig.inb(LSR) & (LSR_BI | LSR_FIFO_ERR) == LSR_FIFO_ERR
    assert rig.inb(RBR) == ord("x")
    assert rig.inb(IIR) == 0xC6
    lsr = rig.inb(LSR)
    assert lsr & (LSR_BI | LSR_DR | LSR_FIFO_ERR) == LSR_BI | LSR_DR | LSR_FIFO_ERR
    assert not rig.inb(LSR) & (LSR_BI | LSR_FIFO_ERR)
    assert rig.inb(RBR) == 0
    rig.clock.step(100 * char_time_ns(rig))
    assert not rig.inb(LSR) & LSR_DR  # one break, one character
    assert rig.backend.out == b""


def test_break_outside_loopback_drops_output(rig):
    rig.init_8n1()
    rig.outb(LCR, 0x43)
    assert not rig.uart.fast_tx_allowed()
    rig.outb(THR, ord("a"))
    rig.outb(LCR, 0x03)
    rig.outb(THR, ord("b"))
    assert rig.backend.out == b"b"


# ---------------------------------------------------------------- fast path contract
def test_fast_tx_allowed_conditions(rig):
    rig.init_8n1()
    assert rig.uart.fast_tx_allowed()
    assert rig.uart.fast_lsr_value() == 0x60
    for reg, value in ((LCR, 0x83), (MCR, MCR_LOOP | MCR_OUT2), (IER, IER_THRI)):
        saved = rig.inb(reg)
        rig.outb(reg, value)
        assert not rig.uart.fast_tx_allowed(), (reg, value)
        rig.outb(reg, saved)
        assert rig.uart.fast_tx_allowed()
    rig.uart.emit_fast(b"xyz")
    assert rig.backend.out == b"xyz"


def test_fast_path_write_leaves_the_same_state_as_a_slow_write(rig):
    other = Rig()
    for r in (rig, other):
        r.init_8n1(fifo=0x01, ier=IER_RDI | IER_MSI)
    assert rig.uart.fast_tx_allowed()
    rig.outb(THR, ord("q"))
    other.uart.emit_fast(b"q")
    assert rig.uart.VMSTATE.save(rig.uart) == other.uart.VMSTATE.save(other.uart)
    assert rig.backend.out == other.backend.out == b"q"


def test_fast_lsr_value_is_none_while_a_read_would_clear_bits(rig):
    rig.init_8n1(mcr=MCR_LOOP)
    rig.outb(THR, 1)
    rig.outb(THR, 2)
    assert rig.uart.fast_lsr_value() is None  # OE set
    rig.inb(LSR)
    assert rig.uart.fast_lsr_value() == 0x61


# ---------------------------------------------------------------- state
def save(uart):
    return uart.VMSTATE.save(uart)


def load_into_fresh(rig):
    data = save(rig.uart)
    fresh = Rig()
    fresh.clock.set_now(rig.clock.now())
    fresh.uart.VMSTATE.load(fresh.uart, data, fresh.uart.VMSTATE.version_id)
    fresh.uart.refresh_irq()
    return fresh, data


def test_vmstate_round_trip_is_byte_identical(rig):
    rig.init_8n1(divisor=5, fifo=0x81, ier=0x0F)
    rig.outb(SCR, 0x77)
    rig.uart.receive(b"hello")
    fresh, data = load_into_fresh(rig)
    assert save(fresh.uart) == data
    assert fresh.irq == rig.irq == 1


def test_vmstate_mid_operation_continues_identically(rig):
    rig.init_8n1(divisor=12, fifo=0xC1, ier=IER_RDI | IER_THRI)
    rig.inb(IIR)  # consume THRE
    rig.uart.receive(b"abcde")
    rig.clock.step(1000)
    assert rig.uart.timeout_timer.armed
    fresh, _ = load_into_fresh(rig)
    timeout = 4 * char_time_ns(rig)
    trace = []
    for r in (rig, fresh):
        seen = []
        r.clock.step(timeout - 1000 - 1)
        seen.append((r.irq, r.inb(IIR)))
        r.clock.step(1)
        seen.append((r.irq, r.inb(IIR)))
        seen.append(bytes(r.inb(RBR) for _ in range(5)))
        r.outb(THR, ord("!"))
        seen.append((r.irq, r.inb(IIR), r.inb(LSR), bytes(r.backend.out)))
        seen.append(save(r.uart))
        trace.append(seen)
    assert trace[0] == trace[1]
    assert trace[0][1] == (1, 0xCC)


def test_vmstate_loopback_break_timer_survives(rig):
    rig.init_8n1(fifo=0x01, ier=IER_RLSI, mcr=MCR_LOOP)
    rig.outb(LCR, 0x43)
    rig.clock.step(10)
    fresh, data = load_into_fresh(rig)
    assert save(fresh.uart) == data
    for r in (rig, fresh):
        r.clock.step(char_time_ns(r))
        assert r.inb(IIR) == 0xC6


@pytest.mark.parametrize("field, value, message", [
    ("ier", 0x10, "ier"),
    ("fcr", 0x40, "fcr"),
    ("rx_fifo", bytearray(b"ab"), "rx_fifo"),
    ("iir", 0x04, "iir"),
    ("thr_ipending", True, "thr_ipending"),
    ("msr", 0x30, "msr"),
])
def test_post_load_rejects_inconsistent_state(rig, field, value, message):
    rig.init_8n1()
    setattr(rig.uart, field, value)
    if field == "rx_fifo":
        rig.uart.rx_fifo_errors = bytearray(2)
    data = save(rig.uart)
    fresh = Rig()
    with pytest.raises(StateError, match=rf"serial@0x3f8: field {message}"):
        fresh.uart.VMSTATE.load(fresh.uart, data, 1)


def test_post_load_does_not_touch_the_irq_line(rig):
    rig.init_8n1(ier=IER_THRI)
    assert rig.irq == 1
    data = save(rig.uart)
    fresh = Rig()
    fresh.uart.VMSTATE.load(fresh.uart, data, 1)
    assert fresh.irqs.edges == []
    fresh.uart.refresh_irq()
    assert fresh.irq == 1


# ---------------------------------------------------------------- random operation sequences

# typical driver writes (FIFO on with each trigger level, IER, MCR with OUT2 / loopback, LCR
# with break, THR) mixed with arbitrary ones, so that short sequences reach deep states
USUAL_WRITES = [("out", FCR, v) for v in (0x01, 0x41, 0x81, 0xC1, 0x07, 0x00)] + \
    [("out", IER, v) for v in (0x01, 0x02, 0x05, 0x0F)] + \
    [("out", MCR, v) for v in (0x0B, 0x1B, 0x19)] + \
    [("out", LCR, v) for v in (0x03, 0x43)] + [("out", THR, 0x55)]

operations = st.lists(st.one_of(
    st.sampled_from(USUAL_WRITES),
    st.tuples(st.just("out"), st.integers(0, 7), st.integers(0, 255)),
    st.tuples(st.just("in"), st.sampled_from([RBR, IIR, LSR, MSR, IER])),
    st.tuples(st.just("rx"), st.binary(min_size=1, max_size=20)),
    st.tuples(st.just("step"), st.sampled_from([1, 1000, 1_000_000, 4_200_000, 50_000_000])),
    st.tuples(st.just("modem"), st.booleans(), st.booleans()),
), max_size=40)


def apply(r, op):
    kind = op[0]
    if kind == "out":
        r.outb(op[1], op[2])
        return None
    if kind == "in":
        return r.inb(op[1])
    if kind == "rx":
        return r.uart.receive(op[1])
    if kind == "step":
        r.clock.step(op[1])
        return None
    r.uart.set_modem_inputs(cts=op[1], ri=op[2])
    return None


@settings(max_examples=150, deadline=None)
@given(before=operations, after=operations)
def test_restored_uart_continues_identically(before, after):
    rig = Rig()
    for op in before:
        apply(rig, op)
    fresh, data = load_into_fresh(rig)
    assert save(fresh.uart) == data
    assert fresh.irq == rig.irq
    output_before = len(rig.backend.out)
    for op in after:
        assert apply(rig, op) == apply(fresh, op)
        assert rig.irq == fresh.irq
    assert save(rig.uart) == save(fresh.uart)
    assert rig.backend.out[output_before:] == fresh.backend.out


@settings(max_examples=150, deadline=None)
@given(before=operations, byte=st.integers(0, 255))
def test_fast_tx_is_invisible_whenever_allowed(before, byte):
    slow, fast = Rig(), Rig()
    for op in before:
        apply(slow, op)
        apply(fast, op)
    if not slow.uart.fast_tx_allowed():
        return
    lsr = fast.uart.fast_lsr_value()
    slow.outb(THR, byte)
    fast.uart.emit_fast(bytes([byte]))
    assert save(slow.uart) == save(fast.uart)
    assert slow.irqs.edges == fast.irqs.edges
    assert slow.backend.out == fast.backend.out
    if lsr is not None:
        assert slow.inb(LSR) == lsr  # the constant the C path would have returned

"""16550A UART, as on a PC's COM ports.

Follows the TI/National PC16550D datasheet (SNLS378) and QEMU ``hw/char/serial.c``:

* Registers at offsets 0-7: RBR/THR/DLL, IER/DLM, IIR/FCR, LCR, MCR, LSR, MSR, SCR; the
  divisor latch replaces RBR/THR and IER while LCR.DLAB is set.  Wider accesses are split
  into byte accesses at consecutive offsets (the chip has an 8-bit bus).
* 16-byte RX and TX FIFOs (FCR), RX trigger levels 1/4/8/14, the character timeout
  interrupt four character times after the last received character or RBR read, as
  counted on the virtual clock from the divisor and the LCR frame format.
* IIR priorities: line status > received data / character timeout > THR empty > modem
  status.  The THR-empty interrupt behaves as in QEMU: it is cleared by reading IIR when it
  is the reported source or by writing THR, set again when THR empties, and re-raised when
  IER.ETBEI goes from 0 to 1 while THR is empty (Windows and Linux's THRE test rely on it).
* In FIFO mode the PE/FE/BI bits belong to a character and show in LSR when that character
  reaches the top of the RX FIFO; LSR bit 7 flags an erroneous character in the FIFO.  The
  error bits clear when LSR is read.  Overrun: a character arriving at a full RX FIFO (or
  at a full RBR in 16450 mode) sets OE and is lost (the RBR is overwritten in 16450 mode).
* MCR loopback: transmitted characters go to the receiver instead of the backend, the
  receiver ignores the host, and the modem inputs follow the MCR outputs (DTR->DSR,
  RTS->CTS, OUT1->RI, OUT2->DCD) with delta bits and the modem status interrupt, as the
  datasheet describes (QEMU mirrors the bits but sets no deltas).  LCR.break in loopback
  makes the receiver see a break (a 0x00 character with BI) after one character time;
  characters sent while break is set are lost, as on the wire.

Interrupt routing follows the PC, not QEMU: the chip's INTR reaches the ISA IRQ line only
through a buffer enabled by the OUT2 output pin.  The line is therefore driven only while
MCR.OUT2 is set and loopback is off (the datasheet's MCR bit 4: loopback forces the
output pins inactive).  Master reset clears MCR, so a guest must set OUT2 to get interrupts, as
Linux and DOS drivers do.  IIR still shows the pending source when the line is gated.

Output is not paced at the line speed: a byte written to THR leaves at once through
:meth:`_transmit` (as in QEMU when the backend accepts), so THR and the TX FIFO are always
empty between accesses and LSR reads THRE|TEMT.  Host input is pushed in with
:meth:`receive`, which takes only what fits (the run loop keeps the rest).
"""

from emu.clock import NS_PER_SEC
from emu.device import Device
from emu.errors import StateError
from emu.state.vmstate import U8, U16, Bool, TimerField, VarBytes, VMStateDescription

FIFO_SIZE = 16
BAUD_BASE = 1_843_200 // 16  # the PC's 1.8432 MHz crystal, divided by the 16x sampling clock
POWER_ON_DIVISOR = 12  # 9600 baud, like QEMU (the datasheet leaves it undefined)

IER_RDI = 0x01  # received data available (and character timeout)
IER_THRI = 0x02  # THR empty
IER_RLSI = 0x04  # receiver line status
IER_MSI = 0x08  # modem status

IIR_NO_INT = 0x01
IIR_MSI = 0x00
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_RLSI = 0x06
IIR_CTI = 0x0C
IIR_ID_MASK = 0x0F
IIR_FIFO_ENABLED = 0xC0

FCR_FE = 0x01
FCR_RFR = 0x02
FCR_XFR = 0x04
FCR_DMS = 0x08
FCR_ITL = 0xC0
RX_TRIGGER_LEVELS = (1, 4, 8, 14)

LCR_WLS = 0x03
LCR_STB = 0x04
LCR_PEN = 0x08
LCR_BREAK = 0x40
LCR_DLAB = 0x80

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_MASK = 0x1F

LSR_DR = 0x01
LSR_OE = 0x02
LSR_PE = 0x04
LSR_FE = 0x08
LSR_BI = 0x10
LSR_THRE = 0x20
LSR_TEMT = 0x40
LSR_FIFO_ERROR = 0x80
LSR_INT_ANY = LSR_OE | LSR_PE | LSR_FE | LSR_BI  # sources of the line status interrupt
LSR_CHAR_ERRORS = LSR_PE | LSR_FE | LSR_BI  # errors that travel with a character
LSR_CLEARED_BY_READ = LSR_INT_ANY | LSR_FIFO_ERROR

MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_ANY_DELTA = 0x0F
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
MSR_LINES = 0xF0


def loopback_modem_lines(mcr):
    """The MSR input nibble that the MCR outputs produce in loopback (datasheet, MCR bit 4)."""
    return ((mcr & (MCR_OUT1 | MCR_OUT2)) << 4) | ((mcr & MCR_RTS) << 3) | ((mcr & MCR_DTR) << 5)


class Uart16550(Device):
    """One 16550A at 8 consecutive ports; ``backend`` (an :class:`~emu.chardev.CharBackend`,
    or None: output is dropped) receives the transmitted bytes.

    The machine calls :meth:`receive` with host input, :meth:`poll` between CPU slices
    (lets a backend flush), and :meth:`refresh_irq` after a state load.
    """

    def __init__(self, name, irq, clock, backend=None):
        super().__init__(name)
        self.irq = irq
        self.clock = clock
        self.backend = backend
        self.timeout_timer = clock.new_timer(self._character_timeout, f"{name}.rx-timeout")
        self.break_timer = clock.new_timer(self._loopback_break_detected, f"{name}.loopback-break")
        # master reset leaves the divisor latch, RBR and SCR alone (datasheet, UART reset configuration)
        self.divisor = POWER_ON_DIVISOR
        self.rbr = 0
        self.scr = 0
        # the levels on the CTS/DSR/RI/DCD pins: a connected, ready peer (QEMU's default)
        self.modem_inputs = MSR_DCD | MSR_DSR | MSR_CTS
        self.reset()

    def reset(self):
        """Master reset (datasheet, UART reset configuration table)."""
        self.timeout_timer.cancel()
        self.break_timer.cancel()
        self.ier = 0
        self.iir = IIR_NO_INT
        self.fcr = 0
        self.lcr = 0
        self.mcr = 0
        self.lsr = LSR_THRE | LSR_TEMT
        self.msr = self.modem_inputs
        self.rx_fifo = bytearray()
        self.rx_fifo_errors = bytearray()  # per character: its PE/FE/BI bits
        self.tx_fifo = bytearray()
        self.thr_ipending = False
        self.timeout_ipending = False
        self._update_irq()

    # ------------------------------------------------------------------ port access
    def io_read(self, offset, size):
        if size == 1:
            return self._read(offset & 7)
        value = 0
        for i in range(size):
            value |= self._read((offset + i) & 7) << (8 * i)
        return value

    def io_write(self, offset, size, value):
        if size == 1:
            self._write(offset & 7, value & 0xFF)
            return
        for i in range(size):
            self._write((offset + i) & 7, (value >> (8 * i)) & 0xFF)

    def _read(self, reg):
        if reg == 0:
            return self.divisor & 0xFF if self.lcr & LCR_DLAB else self._read_rbr()
        if reg == 1:
            return self.divisor >> 8 if self.lcr & LCR_DLAB else self.ier
        if reg == 2:
            return self._read_iir()
        if reg == 3:
            return self.lcr
        if reg == 4:
            return self.mcr
        if reg == 5:
            return self._read_lsr()
        if reg == 6:
            return self._read_msr()
        return self.scr

    def _write(self, reg, value):
        if reg == 0:
            if self.lcr & LCR_DLAB:
                self.divisor = (self.divisor & 0xFF00) | value
            else:
                self._write_thr(value)
        elif reg == 1:
            if self.lcr & LCR_DLAB:
                self.divisor = (self.divisor & 0x00FF) | (value << 8)
            else:
                self._write_ier(value)
        elif reg == 2:
            self._write_fcr(value)
        elif reg == 3:
            self._write_lcr(value)
        elif reg == 4:
            self._write_mcr(value)
        elif reg == 7:
            self.scr = value
        # LSR and MSR writes are for factory testing only; the chip ignores them here as QEMU does

    # ------------------------------------------------------------------ receiver
    def _read_rbr(self):
        if self.fcr & FCR_FE:
            if self.rx_fifo:
                value = self.rx_fifo.pop(0)
                del self.rx_fifo_errors[0]
            else:
                value = 0  # an empty FIFO reads as 0 (QEMU)
            if self.rx_fifo:
                self.lsr |= self.rx_fifo_errors[0]  # the next character's errors surface at the top
                self.timeout_timer.arm_in(4 * self.character_time_ns())
            else:
                self.lsr &= ~LSR_DR
                self.timeout_timer.cancel()
            self.timeout_ipending = False
        else:
            value = self.rbr
            self.lsr &= ~LSR_DR
        self._update_irq()
        return value

    def can_receive(self):
        """How many host bytes :meth:`receive` would take now."""
        if self.mcr & MCR_LOOP:
            return 0  # the receiver listens to the transmitter, not to the host
        if self.fcr & FCR_FE:
            return FIFO_SIZE - len(self.rx_fifo)
        return 0 if self.lsr & LSR_DR else 1

    def receive(self, data):
        """Host input: take the bytes that fit; returns how many (the caller retries the rest)."""
        count = min(self.can_receive(), len(data))
        if count:
            for byte in data[:count]:
                self._receive_char(byte, 0)
            self._update_irq()
        return count

    def _receive_char(self, byte, errors):
        """A character (with its PE/FE/BI bits) arrives from the line."""
        if self.fcr & FCR_FE:
            if len(self.rx_fifo) >= FIFO_SIZE:
                self.lsr |= LSR_OE  # kept out of the FIFO; the FIFO is not changed
            else:
                if not self.rx_fifo:
                    self.lsr |= errors
                if errors:
                    self.lsr |= LSR_FIFO_ERROR
                self.rx_fifo.append(byte)
                self.rx_fifo_errors.append(errors)
                self.lsr |= LSR_DR
            self.timeout_timer.arm_in(4 * self.character_time_ns())
        else:
            if self.lsr & LSR_DR:
                self.lsr |= LSR_OE
            self.rbr = byte
            self.lsr |= LSR_DR | errors

    def _character_timeout(self):
        if self.fcr & FCR_FE and self.rx_fifo:
            self.timeout_ipending = True
            self._update_irq()

    def _reset_rx_fifo(self):
        self.rx_fifo.clear()
        self.rx_fifo_errors.clear()
        self.lsr &= ~(LSR_DR | LSR_FIFO_ERROR)
        self.timeout_timer.cancel()
        self.timeout_ipending = False

    # ------------------------------------------------------------------ transmitter
    def _write_thr(self, value):
        if self.thr_ipending:
            self.thr_ipending = False
            self._update_irq()  # the THRE interrupt drops while THR is full (an edge for the next one)
        self.lsr &= ~(LSR_THRE | LSR_TEMT)
        if self.fcr & FCR_FE:
            if len(self.tx_fifo) >= FIFO_SIZE:
                del self.tx_fifo[0]  # a write to a full TX FIFO overwrites (QEMU)
            self.tx_fifo.append(value)
            data = bytes(self.tx_fifo)
            self.tx_fifo.clear()
        else:
            data = bytes((value,))
        self.lsr |= LSR_THRE | LSR_TEMT
        if self.ier & IER_THRI:
            self.thr_ipending = True
        self._shift_out(data)
        self._update_irq()

    def _shift_out(self, data):
        """Bytes leave the transmit shift register: to the receiver in loopback, else to the host."""
        if self.lcr & LCR_BREAK:
            return  # the line is held at spacing: the characters are lost
        if self.mcr & MCR_LOOP:
            for byte in data:
                self._receive_char(byte, 0)
        else:
            self._transmit(data)

    def _transmit(self, data):
        """The single exit of guest output (bytes) to the host."""
        if self.backend is not None:
            self.backend.write(data)

    def emit_fast(self, data):
        """Bytes that THR writes made through the C fast path while :meth:`fast_tx_allowed` held."""
        self._transmit(data)

    def fast_tx_allowed(self):
        """True when a THR write would do nothing guest-visible except emit the byte."""
        return (not self.lcr & (LCR_DLAB | LCR_BREAK) and not self.mcr & MCR_LOOP and not self.ier & IER_THRI
                and not self.tx_fifo and self.lsr & (LSR_THRE | LSR_TEMT) == LSR_THRE | LSR_TEMT)

    def fast_lsr_value(self):
        """The LSR value if reading LSR has no side effect (no clear-on-read bit set), else None.

        The value only changes through port accesses, :meth:`receive` and :meth:`reset`
        (the timers change IIR, or act only in loopback, where the fast path is off).
        """
        lsr = self.lsr
        return None if lsr & LSR_CLEARED_BY_READ else lsr

    # ------------------------------------------------------------------ control registers
    def _write_ier(self, value):
        value &= 0x0F
        changed = self.ier ^ value
        self.ier = value
        if changed & IER_THRI:
            # QEMU: enabling ETBEI samples THRE anew (even if an IIR read had cleared it);
            # with ETBEI clear the flag is unused and kept 0
            self.thr_ipending = bool(value & IER_THRI and self.lsr & LSR_THRE)
        if changed:
            self._update_irq()

    def _write_fcr(self, value):
        if value & FCR_FE:
            if not self.fcr & FCR_FE:
                value |= FCR_RFR | FCR_XFR  # switching modes clears both FIFOs
            if value & FCR_RFR:
                self._reset_rx_fifo()
            if value & FCR_XFR:
                self._reset_tx_fifo()
            self.fcr = value & (FCR_ITL | FCR_DMS | FCR_FE)
        else:
            # FCR0=0: the other bits are not programmed (datasheet, FCR bit 0)
            if self.fcr & FCR_FE:
                self._reset_rx_fifo()
                self._reset_tx_fifo()
            self.fcr = 0
        self._update_irq()

    def _reset_tx_fifo(self):
        self.tx_fifo.clear()
        self.lsr |= LSR_THRE | LSR_TEMT
        if self.ier & IER_THRI:
            self.thr_ipending = True  # QEMU re-raises THRE on a TX FIFO reset

    def _write_lcr(self, value):
        changed = self.lcr ^ value
        self.lcr = value
        if changed & LCR_BREAK:
            self._update_break_detector()

    def _write_mcr(self, value):
        value &= MCR_MASK
        changed = self.mcr ^ value
        self.mcr = value
        if changed & MCR_LOOP:
            self._update_break_detector()
        self._update_modem_status()
        self._update_irq()

    def _update_break_detector(self):
        """In loopback, a break lasting one character time reaches the receiver."""
        if self.mcr & MCR_LOOP and self.lcr & LCR_BREAK:
            self.break_timer.arm_in(self.character_time_ns())
        else:
            self.break_timer.cancel()

    def _loopback_break_detected(self):
        if self.mcr & MCR_LOOP and self.lcr & LCR_BREAK:
            self._receive_char(0, LSR_BI)
            self._update_irq()

    # ------------------------------------------------------------------ status registers
    def _read_iir(self):
        value = self.iir
        if value & IIR_ID_MASK == IIR_THRI:
            self.thr_ipending = False
            self._update_irq()
        return value

    def _read_lsr(self):
        value = self.lsr
        if value & LSR_CLEARED_BY_READ:
            self.lsr &= ~LSR_INT_ANY
            if not any(self.rx_fifo_errors[1:]):
                self.lsr &= ~LSR_FIFO_ERROR  # cleared unless a later character in the FIFO has an error
            self._update_irq()
        return value

    def _read_msr(self):
        value = self.msr
        if value & MSR_ANY_DELTA:
            self.msr &= MSR_LINES
            self._update_irq()
        return value

    def set_modem_inputs(self, cts=None, dsr=None, ri=None, dcd=None):
        """Host side: change the levels on the modem input pins (None leaves a line alone)."""
        lines = self.modem_inputs
        for level, bit in ((cts, MSR_CTS), (dsr, MSR_DSR), (ri, MSR_RI), (dcd, MSR_DCD)):
            if level is not None:
                lines = lines | bit if level else lines & ~bit
        self.modem_inputs = lines
        self._update_modem_status()
        self._update_irq()

    def _update_modem_status(self):
        """Take the modem lines the chip sees now into MSR, setting the delta bits."""
        new = loopback_modem_lines(self.mcr) if self.mcr & MCR_LOOP else self.modem_inputs
        old = self.msr & MSR_LINES
        if new == old:
            return
        delta = (new ^ old) >> 4
        if new & MSR_RI:
            delta &= ~MSR_TERI  # TERI marks only the trailing edge of RI
        self.msr = new | (self.msr & MSR_ANY_DELTA) | delta

    # ------------------------------------------------------------------ timing and interrupts
    def character_time_ns(self):
        """One character on the line: start + data + parity + stop bits at the programmed baud rate."""
        lcr = self.lcr
        data_bits = 5 + (lcr & LCR_WLS)
        half_bits = 2 * (1 + data_bits + (1 if lcr & LCR_PEN else 0))
        if lcr & LCR_STB:
            half_bits += 3 if data_bits == 5 else 4  # 1.5 stop bits with 5-bit words, else 2
        else:
            half_bits += 2
        divisor = self.divisor or 0x10000  # a divisor of 0 counts through all 16 bits
        return half_bits * divisor * NS_PER_SEC // (2 * BAUD_BASE)

    def _pending_interrupt(self):
        """The IIR id of the highest-priority pending source (datasheet, interrupt control functions)."""
        ier, lsr = self.ier, self.lsr
        if ier & IER_RLSI and lsr & LSR_INT_ANY:
            return IIR_RLSI
        if ier & IER_RDI:
            if self.timeout_ipending:
                return IIR_CTI
            if lsr & LSR_DR and (not self.fcr & FCR_FE or len(self.rx_fifo) >= RX_TRIGGER_LEVELS[self.fcr >> 6]):
                return IIR_RDI
        if ier & IER_THRI and self.thr_ipending:
            return IIR_THRI
        if ier & IER_MSI and self.msr & MSR_ANY_DELTA:
            return IIR_MSI
        return IIR_NO_INT

    def _line_level(self):
        """INTR as the ISA bus sees it: gated by the OUT2 pin, which loopback forces inactive."""
        return int(self.iir & IIR_NO_INT == 0 and self.mcr & (MCR_OUT2 | MCR_LOOP) == MCR_OUT2)

    def _update_irq(self):
        self.iir = self._pending_interrupt() | (IIR_FIFO_ENABLED if self.fcr & FCR_FE else 0)
        level = self._line_level()
        if level != self.irq.level:
            self.irq.set_level(level)

    def refresh_irq(self):
        """Drive the IRQ line from the current state (the machine calls it after a state load)."""
        self.irq.set_level(self._line_level())

    def poll(self):
        if self.backend is not None:
            self.backend.flush()

    # ------------------------------------------------------------------ state
    def _check_loaded_state(self, version_id):
        """Reject a state this chip cannot be in; nothing is derived beyond what is checked."""
        fifo_mode = bool(self.fcr & FCR_FE)
        self._check_loaded_registers(fifo_mode)
        self._check_loaded_fifos(fifo_mode)
        self._check_loaded_interrupts(fifo_mode)

    def _bad_field(self, field, why):
        raise StateError(f"{self.name}: field {field}: {why}")

    def _check_loaded_registers(self, fifo_mode):
        bad = self._bad_field
        if self.ier & ~0x0F:
            bad("ier", f"{self.ier:#x} has bits above 3 set")
        if self.mcr & ~MCR_MASK:
            bad("mcr", f"{self.mcr:#x} has bits above 4 set")
        if self.fcr & ~(FCR_ITL | FCR_DMS | FCR_FE) or (self.fcr and not fifo_mode):
            bad("fcr", f"{self.fcr:#x} is not a value the FIFO control register can hold")
        if self.modem_inputs & ~MSR_LINES:
            bad("modem_inputs", f"{self.modem_inputs:#x} has delta bits set")

    def _check_loaded_fifos(self, fifo_mode):
        bad = self._bad_field
        if len(self.rx_fifo_errors) != len(self.rx_fifo):
            bad("rx_fifo_errors", f"{len(self.rx_fifo_errors)} entries for {len(self.rx_fifo)} characters")
        if any(e & ~LSR_CHAR_ERRORS for e in self.rx_fifo_errors):
            bad("rx_fifo_errors", "holds bits other than PE/FE/BI")
        if self.rx_fifo and not fifo_mode:
            bad("rx_fifo", "holds data while the FIFOs are disabled")
        if fifo_mode and bool(self.lsr & LSR_DR) != bool(self.rx_fifo):
            bad("lsr", f"DR is {self.lsr & LSR_DR} with {len(self.rx_fifo)} characters in the RX FIFO")
        if self.lsr & LSR_FIFO_ERROR and not fifo_mode:
            bad("lsr", "FIFO error bit set while the FIFOs are disabled")
        if self.tx_fifo or self.lsr & (LSR_THRE | LSR_TEMT) != LSR_THRE | LSR_TEMT:
            bad("tx_fifo", "the transmitter holds data between accesses, which this model never does")

    def _check_loaded_interrupts(self, fifo_mode):
        bad = self._bad_field
        if self.thr_ipending and not self.ier & IER_THRI:
            bad("thr_ipending", "set while IER.ETBEI is clear")
        if self.timeout_ipending and not (fifo_mode and self.rx_fifo):
            bad("timeout_ipending", "set without characters in the RX FIFO")
        if self.timeout_timer.armed and not (fifo_mode and self.rx_fifo):
            bad("timeout_timer", "armed without characters in the RX FIFO")
        if self.break_timer.armed and not (self.mcr & MCR_LOOP and self.lcr & LCR_BREAK):
            bad("break_timer", "armed outside loopback with break")
        seen = loopback_modem_lines(self.mcr) if self.mcr & MCR_LOOP else self.modem_inputs
        if self.msr & MSR_LINES != seen:
            bad("msr", f"lines {self.msr & MSR_LINES:#x} differ from the inputs {seen:#x}")
        expected_iir = self._pending_interrupt() | (IIR_FIFO_ENABLED if fifo_mode else 0)
        if self.iir != expected_iir:
            bad("iir", f"{self.iir:#x} but the pending sources give {expected_iir:#x}")

    VMSTATE = VMStateDescription(
        "uart16550", version_id=1, minimum_version_id=1,
        fields=[
            U16("divisor"), U8("rbr"), U8("ier"), U8("iir"), U8("fcr"), U8("lcr"), U8("mcr"),
            U8("lsr"), U8("msr"), U8("scr"), U8("modem_inputs"),
            VarBytes("rx_fifo", max_len=FIFO_SIZE), VarBytes("rx_fifo_errors", max_len=FIFO_SIZE),
            VarBytes("tx_fifo", max_len=FIFO_SIZE),
            Bool("thr_ipending"), Bool("timeout_ipending"),
            TimerField("timeout_timer"), TimerField("break_timer"),
        ],
        post_load=lambda dev, version_id: dev._check_loaded_state(version_id),
    )

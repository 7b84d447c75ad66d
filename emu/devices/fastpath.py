"""C fast paths for the hottest ports, kept invisible to the guest.

A Python port access costs about 1 us; the C hook handles an access in tens of ns.  A
port may be routed through C only while doing so has exactly the effect the device model
would have had.  The device model stays the single source of truth: after every access
that reaches it, :class:`UartFastPath` re-derives whether the C path may be used.
"""

from emu.device import Device

LSR_OFFSET = 5
THR_OFFSET = 0
RING_SIZE = 0x10000  # the C helper's RING_SIZE


class UartFastPath(Device):
    """Stands on the UART's ports; forwards every access to the model and keeps the C path.

    While ``uart.fast_tx_allowed()`` holds and no received data or error is pending, a THR
    write only emits the byte and an LSR read returns a constant: both then run in C, the
    byte landing in a C ring that :meth:`poll` drains to the UART's backend.
    """

    def __init__(self, uart, base, cstate, clib, ring):
        super().__init__(uart.name)
        self.uart = uart
        self.base = base
        self.cstate = cstate
        self.clib = clib
        self.ring = ring
        self.enabled = True
        self.fast = False
        cstate.out_last[base + THR_OFFSET] = ring

    def state_objects(self):
        return [self.uart]

    # the machine registers this object on the UART's 8 ports
    def io_read(self, offset, size):
        self.drain()
        value = self.uart.io_read(offset, size)
        self.sync()
        return value

    def io_write(self, offset, size, value):
        self.drain()
        self.uart.io_write(offset, size, value)
        self.sync()

    def reset(self):
        self.drain()
        self.uart.reset()
        self.sync()

    def poll(self):
        """Between slices: hand over what the guest wrote through C (the model's state did not
        change, so the routing stays as it is)."""
        self.drain()
        self.uart.poll()

    def receive(self, data):
        """Host input: the model takes what fits; the C path must step aside while RX data waits."""
        accepted = self.uart.receive(data)
        self.sync()
        return accepted

    def drain(self):
        """Hand the bytes the guest wrote through C to the backend, in order.

        The ring's head and tail are free-running 32-bit counters: their difference is
        taken modulo 2**32 (after 4 GiB of output the head wraps before the tail does).
        The C side never lets the head run more than a ring ahead of the tail."""
        cstate, ring = self.cstate, self.ring
        head, tail = cstate.ring_head[ring], cstate.ring_tail[ring]
        pending = (head - tail) & 0xFFFFFFFF
        if not pending:
            return
        start = tail & (RING_SIZE - 1)
        first = min(pending, RING_SIZE - start)
        data = bytes(cstate.ring[ring][start:start + first]) + bytes(cstate.ring[ring][0:pending - first])
        cstate.ring_tail[ring] = head
        self.uart.emit_fast(data)

    def sync(self):
        """Route THR/LSR through C exactly when the model says it is safe."""
        lsr = self.uart.fast_lsr_value() if self.enabled else None
        fast = lsr is not None and self.uart.fast_tx_allowed()
        cstate, clib = self.cstate, self.clib
        if fast:
            cstate.out_kind[self.base + THR_OFFSET] = clib.OUT_RING
            cstate.in_kind[self.base + LSR_OFFSET] = clib.IN_CONST
            cstate.in_value[self.base + LSR_OFFSET] = lsr
        elif self.fast:
            cstate.out_kind[self.base + THR_OFFSET] = clib.OUT_PYTHON
            cstate.in_kind[self.base + LSR_OFFSET] = clib.IN_PYTHON
        self.fast = fast


class PostCodeFastPath:
    """Port 0x80 in C: Linux writes it as an I/O delay around slow port accesses, so it is
    the hottest port of all.  Byte writes land in the C state's ``out_last[0x80]``; the
    model's ``last_post_code`` is brought up to date before its state is saved or traced
    (:meth:`to_model`) and pushed back after a load (:meth:`from_model`)."""

    PORT = 0x80

    def __init__(self, device, cstate, clib):
        self.device = device
        self.cstate = cstate
        cstate.out_kind[self.PORT] = clib.OUT_STORE
        cstate.in_kind[self.PORT] = clib.IN_CONST
        cstate.in_value[self.PORT] = device.io_read(0, 1)
        self.from_model()

    def to_model(self):
        self.device.last_post_code = self.cstate.out_last[self.PORT]

    def from_model(self):
        self.cstate.out_last[self.PORT] = self.device.last_post_code & 0xFF

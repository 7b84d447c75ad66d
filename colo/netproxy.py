"""The client endpoint of a networked COLO pair (``emu colo proxy --netdev tap,ifname=TAP``).

The serial endpoint (:mod:`colo.proxy`) with a wire in place of the client socket: the
host side of the pair's NIC, a tap in the user's network namespace (or a ``-netdev
socket`` peer).  Frames the host sends to the guest are appended to the input stream as
records (:mod:`colo.netstream`) and mirrored to both VMs; the frames each VM sends come
back as its output stream.  Everything the serial endpoint guarantees holds, with frames
for bytes: a frame reaches the wire only once the pair can no longer take it back.

What changes is the compare (:mod:`colo.netcompare`): in compare mode the primary's frames
go out, in order, as the secondary matches them flow by flow, and the first one it cannot
match holds the rest (a mismatch asks for a checkpoint at once, a frame left unmatched
asks after the compare timeout).  The secondary's frames are never sent while the pair
lasts; its TCP connections opened since the last checkpoint get their acknowledgements
moved into its own sequence space.  After the secondary takes over, its frames the clients
do not have yet go out first, moved into the primary's sequence space as every later frame
of those connections, so that an established connection goes on.
"""

import selectors
import time

from emu import netdev
from emu.errors import ConfigError

from . import netstream as ns
from . import proxywire as pw
from .netcompare import ClientSpace, NetCompare
from .proxy import VM_QUEUE, ColoProxy

INPUT_LIMIT = 4 << 20        # input not yet sent to every VM beyond which the wire is not read
INPUT_WAIT_POLL_S = 0.02    # while the secondary's input waits (netcompare.INPUT_WAIT_S at most)
SECONDARY_AHEAD = 20000      # frames of the secondary kept unmatched beyond which a checkpoint is asked


def open_wire(spec):
    """The host side of the pair's NIC from a ``-netdev`` value (``tap,ifname=...`` or ``socket,...``)."""
    kind = spec.split(",", 1)[0]
    if kind not in ("tap", "socket"):
        raise ConfigError(f"proxy: --netdev {spec!r}: the wire is a tap or a socket netdev")
    _, backend = netdev.parse_netdev(spec if ",id=" in f",{spec}" else f"{spec},id=wire")
    return backend


class NetProxy(ColoProxy):
    """The endpoint of a pair whose links are ``-netdev colo``: the wire is ``wire`` (an
    :mod:`emu.netdev` backend: ``read_fds``/``on_readable``/``send_offloaded``/``close``)."""

    CHANNEL = "net"

    def __init__(self, wire, listen=("127.0.0.1", 0), compare_timeout_ms=100, log=None):
        super().__init__(None, listen, compare_timeout_ms, log)
        self.wire = wire
        self.compare = NetCompare()
        self.client_space = ClientSpace()
        self._wire_fds = set()
        self._wire_reading = True
        self.frames_in = self.frames_out = self.frames_compared = 0
        self._input_waits = False
        self._sync_wire_fds()

    # ------------------------------------------------------------------ the wire
    def _sync_wire_fds(self):
        wanted = set(self.wire.read_fds()) if self._wire_reading else set()
        for fd in self._wire_fds - wanted:
            self._sel.unregister(fd)
        for fd in wanted - self._wire_fds:
            self._sel.register(fd, selectors.EVENT_READ, lambda events, fd=fd: self._wire_io(fd))
        self._wire_fds = wanted

    def _wire_io(self, fd):
        for frame in self.wire.on_readable(fd):
            if self.client_space:
                self.client_space.from_wire(frame, self._in_base + len(self._input))
            self._input += ns.record(ns.NO_HEADER, frame)
            self.frames_in += 1
        self._sync_wire_fds()  # a socket wire's listener may have become its peer

    def _flush_client(self):
        """Decided records go to the wire, whole; a partial one waits for its end."""
        if not self._held:
            return
        records, end = ns.split_records(self._held)
        send = getattr(self.wire, "send_offloaded", None)
        for _, header, frame in records:
            if self.client_space:
                frame = self.client_space.to_clients(header, frame)
            if send is not None:
                send(header, frame)
            else:
                self.wire.send(frame)
        self.frames_out += len(records)
        del self._held[:end]
        self.released += end

    def _update_client_interest(self):
        reading = self._input_backlog() <= INPUT_LIMIT
        if reading != self._wire_reading:
            self._wire_reading = reading
            self._sync_wire_fds()

    def _close_peers(self):
        super()._close_peers()
        self.wire.close()

    # ------------------------------------------------------------------ input
    def _pump_input(self):
        """As the serial endpoint, in whole records, moved into the serving VMs' sequence
        space (:class:`ClientSpace`), and the secondary's into its own."""
        end = self._in_base + len(self._input)
        self._input_waits = False
        self.client_space.forget_below(self._in_base)
        for conn in self._vms.values():
            if conn is None:
                continue
            conn.in_sent = max(conn.in_sent, self._in_base)
            if conn.in_sent >= end or len(conn.wbuf) >= VM_QUEUE:
                continue
            start = conn.in_sent - self._in_base
            records, stop = ns.split_records(self._input, start)
            if conn.role == "secondary" or self.client_space:
                chunk, stop, now = bytearray(), start, time.monotonic()
                for offset, header, frame in records:
                    moved = self.client_space.to_vms(frame, self._in_base + offset) if self.client_space else frame
                    if conn.role == "secondary":
                        moved = self.compare.input_for_secondary(moved, now)
                        if moved is None:
                            self._input_waits = True  # for the secondary's SYN-ACK: look again soon
                            break
                    chunk += ns.record(header, moved)
                    stop = offset + ns.RECORD_HEAD.size + len(header) + len(frame)
            else:
                chunk = self._input[start:stop]
            if chunk:
                conn.send(pw.data(pw.IN, conn.in_sent, chunk))
                conn.in_sent += stop - start

    def _wait(self, timeout):
        wait = super()._wait(timeout)
        if self._input_waits:
            return INPUT_WAIT_POLL_S if wait is None else min(wait, INPUT_WAIT_POLL_S)
        return wait

    # ------------------------------------------------------------------ output
    def _trim_streams(self, decided):
        p = self._vms["primary"]
        if p is not None:
            p.stream.drop_below(decided)
            while p.arrivals and p.arrivals[0][0] <= decided:
                p.arrivals.popleft()
        s = self._vms["secondary"]
        if s is not None and not (self.mode == "solo" and self._active is s):
            if self.mode == "paired" and s is self._synced and self._paired_mode == "compare":
                self._ingest_secondary()
            elif s.stream.base is not None:
                s.stream.drop_below(s.stream.end)  # nothing to compare it with

    def _ingest_secondary(self):
        s = self._synced
        if s is None or s.stream.base is None or not s.stream.data:
            return
        records, end = ns.split_records(s.stream.data)
        for _, header, frame in records:
            self.compare.secondary_frame(header, frame)
        s.stream.drop_below(s.stream.base + end)

    def _advance_paired(self):
        p, s = self._vms["primary"], self._synced
        if self._paired_mode == "passive" or p is None or s is None or not s.open:
            return
        self._ingest_secondary()
        decided = self.released + len(self._held)
        P = p.stream
        if self._diverged_at is None and P.base is not None:
            P.drop_below(decided)
            if self._gap(p, decided):
                return
            limit = min([P.end] + list(self._marks.values()))
            if limit > decided:
                records, end = ns.split_records(P.view(decided, limit))
                taken = 0
                for offset, header, frame in records:
                    ok, why = self.compare.check_primary(frame)
                    if not ok:
                        if why is not None:
                            self._diverged_at = decided + offset
                            self.mismatches += 1
                            self._log(f"frames differ at offset {self._diverged_at} ({why}): holding output "
                                      f"until the next checkpoint")
                        break
                    self.compare.released(frame)
                    self.frames_compared += 1
                    taken = offset + ns.RECORD_HEAD.size + len(header) + len(frame)
                if taken:
                    self._held += P.view(decided, decided + taken)
                self.compare.trim_secondary()
        if self._diverged_at is None and len(self.compare.secondary_records) > SECONDARY_AHEAD \
                and not self._mismatch_requested:
            self._mismatch_requested = True
            self._request_checkpoint(p, "mismatch", f"the secondary is {SECONDARY_AHEAD} frames ahead")
            return
        if self._diverged_at is not None and not self._mismatch_requested:
            self._mismatch_requested = True
            self._request_checkpoint(p, "mismatch", f"mismatch at offset {self._diverged_at}")

    def _released_for(self, conn):
        """The secondary's frames are not the primary's: its stream has offsets of its own
        from the last checkpoint on, so it may forget what the endpoint has taken of it."""
        if conn.role == "secondary" and conn.stream.base is not None:
            return conn.stream.base
        return self.released

    def _synced_now(self, committed):
        if committed:
            records, _ = ns.split_records(committed)
            for _, _, frame in records:
                self.compare.released(frame, compared=False)
        self.compare.synced()

    def _took_over(self, conn):
        if conn.role != "secondary":
            return
        self._ingest_secondary_for_takeover(conn)
        for header, frame in self.compare.unreleased_secondary_frames():
            self._held += ns.record(header, self.compare.release_from_secondary(header, frame))
        self.compare.secondary_records.clear()

    def _ingest_secondary_for_takeover(self, conn):
        if conn is self._synced and self._paired_mode == "compare":
            self._ingest_secondary()
        elif conn.stream.base is not None:
            conn.stream.drop_below(conn.stream.end)

    def _promoting(self, conn):
        """A former secondary becomes the primary: its output offsets and the TCP sequence
        space of the connections it took over are its own, and its new secondary, a copy of
        it, shares them.  The endpoint goes on in them: the difference of output offsets on
        everything the new pair says (``out_shift``), the connections' offsets folded into
        :attr:`client_space`, and a compare that starts afresh in the new primary's space."""
        if conn.role != "secondary":
            return
        self._advance_solo()  # every whole frame it sent so far is decided: its stream starts past them
        decided = self.released + len(self._held)
        position = conn.stream.base if conn.stream.base is not None else conn.out_end
        shift, own = decided - position, position - conn.out_shift
        conn.out_shift += shift
        conn.out_end += shift
        if conn.stream.base is not None:
            conn.stream.base += shift
        offsets = self.compare.secondary_offsets()
        self.client_space.fold(offsets)
        compared, self.compare = self.compare.compared_bytes, NetCompare()
        self.compare.compared_bytes = compared
        self._log(f"{conn}'s output goes on at its offset {own} (the endpoint's {decided}); "
                  f"{len(offsets)} TCP connection(s) keep its sequence space")

    def _advance_solo(self):
        conn = self._active
        if conn is None or not conn.open or conn.stream.base is None:
            return
        if conn.role == "primary":
            super()._advance_solo()
            return
        records, end = ns.split_records(conn.stream.data)  # the secondary's space: frames, moved
        for _, header, frame in records:
            self._held += ns.record(header, self.compare.release_from_secondary(header, frame))
        conn.stream.drop_below(conn.stream.base + end)

    def status(self):
        info = super().status()
        info.update({"channel": "net", "frames_in": self.frames_in, "frames_out": self.frames_out,
                     "frames_compared": self.frames_compared, "bytes_compared": self.compare.compared_bytes,
                     "wire_dropped": getattr(self.wire, "dropped", 0)})
        return info

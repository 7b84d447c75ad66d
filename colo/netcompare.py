"""The network compare of a COLO pair: which of the primary's frames the secondary has matched.

QEMU's colo-compare, in the endpoint's terms.  The two VMs get the same input frames, but
they cut their TCP streams into different segments, acknowledge at different moments and
pick different initial sequence numbers for a connection opened since the last
checkpoint.  So a frame of the primary is released when the secondary produced the same
thing *for that flow*, not the same frame:

* TCP, per connection, in sequence order: payload bytes equal to the secondary's bytes at
  the same position of the stream (positions are counted from each side's own initial
  sequence number, learnt from its SYN, so ``offset = secondary ISN - primary ISN``);
  SYN, FIN and RST when the secondary sent the same; a bare acknowledgement when the
  secondary acknowledged at least as far.  Retransmitted bytes already released go again.
* UDP and ICMP, per flow, in order: equal bytes after the IP header (its ID differs).
* Anything else (ARP, ...): equal whole frames, in order.

A payload byte that differs is a mismatch; one the secondary has not produced yet waits
(the endpoint's compare timeout then asks for a checkpoint).  After a checkpoint the two
VMs are one state again: :meth:`NetCompare.synced` forgets what the secondary did and every
offset is 0 until new connections open.

The offsets also serve the endpoint (filter-rewriter's part): input for the secondary gets
its acknowledgement fields moved into the secondary's space (:meth:`input_for_secondary`),
and after the secondary takes over, its frames are moved into the primary's space, which
is the one the clients know (:meth:`release_from_secondary`).
"""

import collections

from . import netstream as ns
from .netstream import ACK, FIN, MASK32, PROTO_TCP, RST, SYN

HALF = 1 << 31
INPUT_WAIT_S = 0.5  # the longest the secondary's input waits for it to answer a connection


def _ahead(a, b):
    """a - b in sequence space (negative when a is before b)."""
    d = (a - b) & MASK32
    return d - (1 << 32) if d >= HALF else d


class TcpFlow:
    """One TCP connection as the compare knows it: what the primary had released, and what
    the secondary has sent since the last checkpoint (in its own sequence space)."""

    __slots__ = ("p_isn", "s_isn", "s_syn_flags", "p_hi", "p_ack_hi", "p_fin", "p_rst", "p_syn",
                 "s_anchor", "s_data", "s_ack", "s_fin", "s_rst", "offset", "input_wait_since")

    def __init__(self):
        self.offset = 0              # secondary seq - primary seq, for every segment of the flow
        self.p_isn = self.s_isn = self.s_syn_flags = None
        self.p_hi = None             # primary payload released below this (primary space)
        self.p_ack_hi = None         # highest acknowledgement released
        self.p_syn = self.p_fin = self.p_rst = False
        self.input_wait_since = None # input for the secondary waits for its SYN-ACK since then
        self.forget_secondary()

    def forget_secondary(self):
        self.s_anchor = None         # secondary space: s_data holds [s_anchor, s_anchor + len)
        self.s_data = bytearray()
        self.s_ack = None
        self.s_fin = None
        self.s_rst = False

    def learn_isns(self):
        if self.p_isn is not None and self.s_isn is not None:
            self.offset = (self.s_isn - self.p_isn) & MASK32

    def released_payload(self, seq, length):
        end = (seq + length) & MASK32
        if self.p_hi is None or _ahead(end, self.p_hi) > 0:
            self.p_hi = end
        if self.s_anchor is not None:  # the secondary's bytes below it are not needed again
            drop = _ahead((self.p_hi + self.offset) & MASK32, self.s_anchor)
            if drop > 0:
                del self.s_data[:drop]
                self.s_anchor = (self.s_anchor + drop) & MASK32


class SecondaryFrame:
    """A frame the secondary sent since the last checkpoint, kept until the clients have its
    content in the primary's copy (after a takeover the others go out)."""

    __slots__ = ("header", "frame", "packet", "matched")

    def __init__(self, header, frame, packet):
        self.header, self.frame, self.packet, self.matched = header, frame, packet, False


class NetCompare:
    """Feed it the secondary's frames (:meth:`secondary_frame`); ask it about the primary's
    (:meth:`check_primary`), and tell it what was released (:meth:`released`)."""

    def __init__(self):
        self.flows = {}                                  # key -> TcpFlow
        self.others = {}                                 # key -> deque of (compare bytes, SecondaryFrame)
        self.secondary_records = collections.deque()     # SecondaryFrame, since the last checkpoint
        self.compared_bytes = 0                          # primary payload released by the compare

    # ------------------------------------------------------------------ the secondary's frames
    def secondary_frame(self, header, frame):
        frame = bytes(frame)
        packet = ns.parse(frame, outgoing=True)
        kept = SecondaryFrame(bytes(header), frame, packet)
        self.secondary_records.append(kept)
        if packet.proto != PROTO_TCP:
            self.others.setdefault(packet.key, collections.deque()).append((ns.compare_bytes(frame, packet), kept))
            return
        flow = self.flows.get(packet.key)
        if flow is None:
            flow = self.flows[packet.key] = TcpFlow()
        if packet.flags & SYN:
            flow.s_isn, flow.s_syn_flags = packet.seq, packet.flags & (SYN | ACK)
            flow.learn_isns()
            flow.s_anchor, flow.s_data = (packet.seq + 1) & MASK32, bytearray()
        elif flow.s_anchor is None:
            flow.s_anchor = packet.seq
        if packet.flags & ACK and (flow.s_ack is None or _ahead(packet.ack, flow.s_ack) > 0):
            flow.s_ack = packet.ack
        if packet.flags & RST:
            flow.s_rst = True
        start = (packet.seq + (1 if packet.flags & SYN else 0)) & MASK32
        if packet.payload_len:
            rel = _ahead(start, flow.s_anchor)
            payload = frame[packet.payload_start:packet.payload_start + packet.payload_len]
            if rel > len(flow.s_data):       # a hole: start again from here
                flow.s_anchor, flow.s_data = start, bytearray(payload)
            elif rel + len(payload) > len(flow.s_data):
                flow.s_data += payload[max(0, len(flow.s_data) - rel):]
        if packet.flags & FIN:
            flow.s_fin = (start + packet.payload_len) & MASK32

    # ------------------------------------------------------------------ the primary's frames
    def check_primary(self, frame):
        """``(True, None)``: release it; ``(False, None)``: wait; ``(False, why)``: a mismatch."""
        packet = ns.parse(frame, outgoing=True)
        if packet.proto != PROTO_TCP:
            return self._check_other(frame, packet)
        flow = self.flows.get(packet.key)
        if flow is None:
            return False, None
        flags = packet.flags
        if flags & SYN:
            if flow.s_syn_flags is None:
                return False, None
            if flow.s_syn_flags != flags & (SYN | ACK):
                return False, f"{_flow_name(packet)}: SYN flags differ"
            flow.p_isn = packet.seq
            flow.learn_isns()
        if flags & RST and not flow.s_rst:
            return False, None
        start = (packet.seq + (1 if flags & SYN else 0)) & MASK32
        if packet.payload_len:
            verdict = self._check_payload(flow, packet, frame, start)
            if verdict is not True:
                return verdict
        if flags & FIN:
            if flow.s_fin is None:
                return False, None
            if flow.s_fin != (start + packet.payload_len + flow.offset) & MASK32:
                return False, f"{_flow_name(packet)}: the FIN is at another position of the stream"
        elif not packet.payload_len and not flags & (SYN | RST) and flags & ACK:
            if flow.s_ack is None or _ahead(flow.s_ack, packet.ack) < 0:
                return False, None
        return True, None

    def _check_other(self, frame, packet):
        queue = self.others.get(packet.key)
        if not queue:
            return False, None
        mine = ns.compare_bytes(frame, packet)
        if queue[0][0] != mine:
            return False, f"{_flow_name(packet)}: a frame of {len(mine)} bytes differs"
        return True, None

    def _check_payload(self, flow, packet, frame, start):
        n, skip = packet.payload_len, 0
        if flow.p_hi is not None:
            skip = max(0, min(n, _ahead(flow.p_hi, start)))  # released before: a retransmission
        if skip == n:
            return True
        if flow.s_anchor is None:
            return False, None
        rel = _ahead((start + skip + flow.offset) & MASK32, flow.s_anchor)
        if rel < 0:
            return False, None
        need = n - skip
        if rel + need > len(flow.s_data):
            have = max(0, len(flow.s_data) - rel)
            theirs = flow.s_data[rel:rel + have]
            mine = frame[packet.payload_start + skip:packet.payload_start + skip + have]
            if have and theirs != mine:
                return False, f"{_flow_name(packet)}: payload differs"
            return False, None
        mine = frame[packet.payload_start + skip:packet.payload_start + n]
        if flow.s_data[rel:rel + need] != mine:
            return False, f"{_flow_name(packet)}: payload differs"
        return True

    def released(self, frame, compared=True):
        """The primary's ``frame`` went to the clients (``compared``: the compare matched it;
        else a checkpoint committed it)."""
        packet = ns.parse(frame, outgoing=True)
        if packet.proto != PROTO_TCP:
            if compared:
                queue = self.others.get(packet.key)
                if queue:
                    queue.popleft()[1].matched = True
            return
        flow = self.flows.get(packet.key)
        if flow is None:
            flow = self.flows[packet.key] = TcpFlow()
        flags = packet.flags
        start = (packet.seq + (1 if flags & SYN else 0)) & MASK32
        if flags & SYN:
            flow.p_syn, flow.p_isn = True, packet.seq
            flow.learn_isns()
        if flags & FIN:
            flow.p_fin = True
        if flags & RST:
            flow.p_rst = True
        if flags & ACK and (flow.p_ack_hi is None or _ahead(packet.ack, flow.p_ack_hi) > 0):
            flow.p_ack_hi = packet.ack
        if packet.payload_len or flags & (SYN | FIN):
            if compared:
                self.compared_bytes += packet.payload_len
            flow.released_payload(start, packet.payload_len + (1 if flags & FIN else 0))

    def synced(self):
        """A checkpoint was applied: both VMs are the primary's state of then."""
        for key in [key for key, flow in self.flows.items() if flow.p_fin or flow.p_rst]:
            del self.flows[key]
        for flow in self.flows.values():
            flow.forget_secondary()
            flow.offset, flow.p_isn, flow.s_isn, flow.s_syn_flags = 0, None, None, None
            flow.input_wait_since = None
        self.others.clear()
        self.secondary_records.clear()

    def trim_secondary(self):
        """Drop the secondary's frames that the clients already have in the primary's copy
        (kept until then: after a takeover the others go out)."""
        records = self.secondary_records
        while records and self._redundant(records[0]):
            records.popleft()

    def _redundant(self, kept):
        packet = kept.packet
        if packet.proto != PROTO_TCP:
            return kept.matched
        flow = self.flows.get(packet.key)
        if flow is None:
            return False
        flags = packet.flags
        if flags & SYN and not flow.p_syn or flags & FIN and not flow.p_fin or flags & RST and not flow.p_rst:
            return False
        if flags & ACK and (flow.p_ack_hi is None or _ahead(flow.p_ack_hi, packet.ack) < 0):
            return False
        if packet.payload_len or flags & FIN:
            start = (packet.seq - flow.offset + (1 if flags & SYN else 0)) & MASK32
            end = (start + packet.payload_len + (1 if flags & FIN else 0)) & MASK32
            return flow.p_hi is not None and _ahead(end, flow.p_hi) <= 0
        return True

    # ------------------------------------------------------------------ rewriting
    def input_for_secondary(self, frame, now=None):
        """``frame`` (client -> guest) as the secondary must see it: its acknowledgement in
        the secondary's sequence space.  Returns the frame itself when nothing moves, and
        None when it must wait: the client acknowledges the primary's SYN-ACK of a
        connection whose SYN-ACK the secondary has not sent yet (the offset is unknown, and
        a wrong acknowledgement would make its kernel reset the connection).  A wait ends
        after ``INPUT_WAIT_S`` (``now``: monotonic seconds) with the frame as it is."""
        packet = ns.parse(frame, outgoing=False)
        if packet.proto != PROTO_TCP or not packet.flags & ACK:
            return frame
        flow = self.flows.get(packet.key)
        if flow is None:
            return frame
        if flow.p_isn is not None and flow.s_isn is None and now is not None:
            if flow.input_wait_since is None:
                flow.input_wait_since = now
            if now - flow.input_wait_since < INPUT_WAIT_S:
                return None
        if not flow.offset:
            return frame
        moved = bytearray(frame)
        ns.shift_tcp(moved, packet, ack_delta=flow.offset)
        return moved

    def release_from_secondary(self, header, frame):
        """The secondary's ``frame`` as the clients must see it (primary sequence space); its
        SYN-ACK of a connection the primary had answered gives the offset."""
        packet = ns.parse(frame, outgoing=True)
        if packet.proto != PROTO_TCP:
            return frame
        flow = self.flows.get(packet.key)
        if flow is not None and packet.flags & SYN and flow.s_isn is None:
            flow.s_isn, flow.s_syn_flags = packet.seq, packet.flags & (SYN | ACK)
            flow.learn_isns()
        if flow is None or not flow.offset:
            return frame
        moved = bytearray(frame)
        ns.shift_tcp(moved, packet, seq_delta=-flow.offset, checksum_complete=not header[0] & ns.NEEDS_CSUM)
        return moved

    def secondary_offsets(self):
        """{flow key: secondary seq - primary seq} of the flows whose spaces differ."""
        return {key: flow.offset for key, flow in self.flows.items() if flow.offset}

    def unreleased_secondary_frames(self):
        """At a takeover: the secondary's frames since the last checkpoint that the clients
        may not have, in order: those no released frame of the primary matched, and TCP
        segments not wholly covered by what was released."""
        return [(kept.header, kept.frame) for kept in self.secondary_records if not self._redundant(kept)]


class ClientSpace:
    """Where the clients' TCP sequence space is not the one the VMs serving them use.

    After a former secondary takes over, the connections opened since the last checkpoint
    run in its own sequence space (:meth:`NetCompare.release_from_secondary` moves them).
    When it re-protects, the new pair is its copy, so those connections stay in its space
    for good, and the compare of the new pair works in it: their offsets are folded here
    (:meth:`fold`), and every frame between the wire and the VMs is moved by them, input
    (:meth:`to_vms`, acknowledgements) and output (:meth:`to_clients`, sequence numbers).
    A later takeover and re-protection fold on top.  A new connection on the same ports
    (a client's SYN) ends a flow's shift for input after it, and at once for output."""

    def __init__(self):
        self.shifts = {}  # flow key -> [delta (VM seq - client seq), input offset it ends at or None]

    def __bool__(self):
        return bool(self.shifts)

    def fold(self, offsets):
        """``offsets``: {flow key: VM seq - client seq} of the VM that becomes the primary."""
        for key, delta in offsets.items():
            shift = self.shifts.get(key)
            if shift is None or shift[1] is not None:
                self.shifts[key] = [delta & MASK32, None]
            else:
                shift[0] = (shift[0] + delta) & MASK32

    def from_wire(self, frame, offset):
        """A client's ``frame``, at input offset ``offset``: a SYN ends its flow's shift there."""
        packet = ns.parse(frame, outgoing=False)
        shift = self.shifts.get(packet.key)
        if shift is not None and shift[1] is None and packet.flags & SYN and not packet.flags & ACK:
            shift[1] = offset

    def to_vms(self, frame, offset):
        """Input ``frame`` (at input offset ``offset``) in the serving VMs' space."""
        packet = ns.parse(frame, outgoing=False)
        shift = self.shifts.get(packet.key)
        if shift is None or (shift[1] is not None and offset >= shift[1]) or not packet.flags & ACK:
            return frame
        moved = bytearray(frame)
        ns.shift_tcp(moved, packet, ack_delta=shift[0])
        return moved

    def to_clients(self, header, frame):
        """Output ``frame`` in the clients' space."""
        packet = ns.parse(frame, outgoing=True)
        shift = self.shifts.get(packet.key)
        if shift is None or shift[1] is not None:
            return frame
        moved = bytearray(frame)
        ns.shift_tcp(moved, packet, seq_delta=-shift[0], checksum_complete=not header[0] & ns.NEEDS_CSUM)
        return moved

    def forget_below(self, offset):
        """Input below ``offset`` is gone: the shifts that ended there are not needed."""
        for key in [k for k, (_, until) in self.shifts.items() if until is not None and until <= offset]:
            del self.shifts[key]


def _flow_name(packet):
    proto, guest, gport, peer, pport = packet.key

    def addr(raw):
        if len(raw) == 4:
            return ".".join(str(b) for b in raw)
        return ":".join(f"{raw[i] << 8 | raw[i + 1]:x}" for i in range(0, 16, 2))
    name = {6: "TCP", 17: "UDP", 1: "ICMP"}.get(proto, f"IP proto {proto}")
    return f"{name} {addr(guest)}:{gport} <-> {addr(peer)}:{pport}" if gport or pport else \
        f"{name} {addr(guest)} <-> {addr(peer)}"

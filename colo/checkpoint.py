"""The COLO checkpoint transaction between a primary and a secondary machine.

Message sequence (after QEMU's ``migration/colo.c``), every message a frame
``type u8 | length u64 | payload`` (big-endian), the protocol version exchanged first::

    primary                                   secondary
    CHECKPOINT_READY (version, machine) ->
                                         <-   CHECKPOINT_READY (version, machine)
    CHECKPOINT_REQUEST seq               ->   stops its VM
                                         <-   CHECKPOINT_REPLY seq
    pauses; dirty pages, device state
    VMSTATE_SEND seq, n | RAM stream (n bytes, raw)
    VMSTATE_SIZE m | device state (m bytes, raw)
    VMSTATE_DIGEST SHA-256(seq | RAM stream | device state) [| state digest]
                                              RAM stream -> staging, device state -> its own
                                              buffer; sizes, digest, both streams checked
                                         <-   VMSTATE_RECEIVED seq
                                              cache updated, flushed into RAM, state loaded,
                                              resumes
                                         <-   VMSTATE_LOADED seq
    resumes

Either side may send ``ABANDON seq | reason`` in place of its next message.  A checkpoint
whose content is refused (digest, sizes, a stream that does not parse, a sequence number
already seen) is abandoned and the channel goes on in step; a framing or transport error
breaks the channel.  Nothing of a checkpoint reaches the secondary's RAM cache or its RAM
before the whole of it has arrived and checked out.

The secondary keeps a RAM cache, a full copy of guest RAM equal to the primary's RAM at
the last applied checkpoint.  Its own dirty log says which pages it wrote since; at a
checkpoint every page dirtied by either side is written from the (updated) cache, so its
RAM ends equal to the primary's.  The primary clears a dirty bit only when the secondary
has loaded the checkpoint that carried the page: pages of an abandoned checkpoint go out
again with the next one.

In debug mode the primary adds its full state digest (:meth:`Machine.state_digest`) taken
while paused, and the secondary checks that its own state digest equals it once loaded.
"""

import hashlib
import hmac
import socket
import struct
import time
from dataclasses import dataclass, field

import numpy as np

from emu import machinestate, snapshot
from emu.errors import EmuError, StateError

from .wire import HEADER, ChannelError

MAGIC = b"EMUCKPT\0"
PROTOCOL_VERSION = 1

# message types (a numbering of this channel's own)
CHECKPOINT_READY = 1
CHECKPOINT_REQUEST = 2
CHECKPOINT_REPLY = 3
VMSTATE_SEND = 4
VMSTATE_SIZE = 5
VMSTATE_DIGEST = 6
VMSTATE_RECEIVED = 7
VMSTATE_LOADED = 8
ABANDON = 9

NAMES = {CHECKPOINT_READY: "CHECKPOINT_READY", CHECKPOINT_REQUEST: "CHECKPOINT_REQUEST",
         CHECKPOINT_REPLY: "CHECKPOINT_REPLY", VMSTATE_SEND: "VMSTATE_SEND", VMSTATE_SIZE: "VMSTATE_SIZE",
         VMSTATE_DIGEST: "VMSTATE_DIGEST", VMSTATE_RECEIVED: "VMSTATE_RECEIVED",
         VMSTATE_LOADED: "VMSTATE_LOADED", ABANDON: "ABANDON"}

SEQ = struct.Struct(">Q")
SEND = struct.Struct(">QQ")
DIGEST_SIZE = hashlib.sha256().digest_size
MAX_REASON = 4096
MAX_READY = 512
MAX_DEVICE_STATE = 64 << 20
REPLY_TIMEOUT_S = 30.0

# exact payload sizes, or (minimum, maximum)
_PAYLOAD_SIZES = {
    CHECKPOINT_READY: (len(MAGIC) + 4 + 2 + 8, MAX_READY),
    CHECKPOINT_REQUEST: SEQ.size, CHECKPOINT_REPLY: SEQ.size, VMSTATE_RECEIVED: SEQ.size,
    VMSTATE_LOADED: SEQ.size, VMSTATE_SEND: SEND.size, VMSTATE_SIZE: SEQ.size,
    VMSTATE_DIGEST: (DIGEST_SIZE + 1, DIGEST_SIZE + 1 + DIGEST_SIZE),
    ABANDON: (SEQ.size, SEQ.size + MAX_REASON),
}


class CheckpointError(EmuError):
    """A checkpoint failed; the secondary applied nothing of it."""


class CheckpointAbandoned(CheckpointError):
    """The peer abandoned the checkpoint (the channel is still in step)."""

    def __init__(self, seq, reason):
        super().__init__(f"checkpoint {seq} abandoned by the peer: {reason}")
        self.seq, self.reason = seq, reason


class CheckpointRejected(CheckpointError):
    """This side refused the checkpoint's content and abandoned it (the channel is still in step)."""


class ConsistencyError(CheckpointError):
    """Debug mode: the secondary's state after loading differs from the primary's."""


def ready_payload(machine):
    name = machine.machine_type.encode()
    return MAGIC + struct.pack(">IH", PROTOCOL_VERSION, len(name)) + name + SEQ.pack(machine.ram.size)


def check_ready(payload, machine):
    """Refuse a peer that speaks another protocol version or runs another machine."""
    if payload[:len(MAGIC)] != MAGIC:
        raise ChannelError("colo: not a COLO checkpoint channel")
    version, nlen = struct.unpack_from(">IH", payload, len(MAGIC))
    pos = len(MAGIC) + 6
    if pos + nlen + 8 != len(payload):
        raise ChannelError(f"colo: malformed CHECKPOINT_READY ({len(payload)} bytes)")
    if version != PROTOCOL_VERSION:
        raise ChannelError(f"colo: peer speaks checkpoint protocol {version}, this side {PROTOCOL_VERSION}")
    name = payload[pos:pos + nlen].decode("ascii", "replace")
    (ram_size,) = SEQ.unpack_from(payload, pos + nlen)
    if name != machine.machine_type:
        raise ChannelError(f"colo: peer machine type {name!r}, this machine is {machine.machine_type!r}")
    if ram_size != machine.ram.size:
        raise ChannelError(f"colo: peer has {ram_size >> 20} MiB of RAM, this machine {machine.ram.size >> 20} MiB")


def checkpoint_digest(seq, ram_stream, device_state):
    """SHA-256 over the whole checkpoint; the sequence number makes a replay fail it."""
    h = hashlib.sha256(SEQ.pack(seq))
    h.update(ram_stream)
    h.update(device_state)
    return h.digest()


def max_ram_stream(machine):
    """The largest RAM stream a checkpoint of this machine can need (every page, with data)."""
    return machine.ram.size + 5 * machine.ram.npages + 4096


class Channel:
    """Framed messages and raw buffers on a blocking socket with a timeout."""

    def __init__(self, sock, timeout=REPLY_TIMEOUT_S):
        self.sock = sock
        self.timeout = timeout
        self.closed = False
        sock.settimeout(timeout)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # the replies are small

    def send(self, kind, payload=b"", raw=None):
        """One frame, optionally followed by a raw buffer (one send call for small ones)."""
        try:
            data = HEADER.pack(kind, len(payload)) + payload
            if raw is not None and len(raw) <= 65536:
                self.sock.sendall(data + bytes(raw))
                return
            self.sock.sendall(data)
            if raw is not None:
                self.sock.sendall(raw)
        except socket.timeout:
            raise ChannelError(f"colo: sending {NAMES[kind]} timed out after {self.timeout} s") from None
        except OSError as e:
            raise ChannelError(f"colo: connection lost sending {NAMES[kind]}: {e}") from None

    def abandon(self, seq, reason):
        """Best effort: the peer may already be gone."""
        try:
            self.send(ABANDON, SEQ.pack(seq) + reason.encode()[:MAX_REASON])
        except ChannelError:
            pass

    def recv(self, expected):
        """The next frame, which must be of a type in ``expected``; an ABANDON raises
        :class:`CheckpointAbandoned`.  Lengths are checked before the payload is read."""
        kind, length = HEADER.unpack(self.recv_exact(HEADER.size))
        if kind not in NAMES:
            raise ChannelError(f"colo: unknown message type {kind}")
        size = _PAYLOAD_SIZES[kind]
        low, high = size if isinstance(size, tuple) else (size, size)
        if not low <= length <= high:
            raise ChannelError(f"colo: {NAMES[kind]} with a payload of {length} bytes (expected {low}..{high})")
        payload = bytes(self.recv_exact(length))
        if kind == ABANDON:
            (seq,) = SEQ.unpack_from(payload)
            raise CheckpointAbandoned(seq, payload[SEQ.size:].decode("utf-8", "replace"))
        if kind not in expected:
            names = " or ".join(NAMES[k] for k in expected)
            raise ChannelError(f"colo: expected {names}, got {NAMES[kind]}")
        return kind, payload

    def recv_seq(self, kind, seq):
        _, payload = self.recv((kind,))
        (got,) = SEQ.unpack(payload)
        if got != seq:
            raise ChannelError(f"colo: {NAMES[kind]} for checkpoint {got}, expected {seq}")

    def recv_exact(self, n):
        buf = bytearray(n)
        view = memoryview(buf)
        pos = 0
        try:
            while pos < n:
                got = self.sock.recv_into(view[pos:], min(n - pos, 8 << 20))
                if not got:
                    raise ChannelError(f"colo: connection closed by the peer ({pos} of {n} bytes received)")
                pos += got
        except socket.timeout:
            raise ChannelError(f"colo: nothing from the peer within {self.timeout} s "
                               f"({pos} of {n} bytes received)") from None
        except OSError as e:
            raise ChannelError(f"colo: connection lost: {e}") from None
        return buf

    def close(self):
        if not self.closed:
            self.closed = True
            try:
                self.sock.close()
            except OSError:
                pass


@dataclass
class Checkpoint:
    """What the primary captured while paused."""

    seq: int
    pages: np.ndarray
    ram_stream: bytes
    device_state: bytes
    digest: bytes
    state_digest: bytes | None = None  # debug mode


@dataclass
class CheckpointRecord:
    """One checkpoint as one side saw it (times in ms)."""

    seq: int
    status: str = "started"  # ok / abandoned / rejected / failed
    error: str | None = None
    pages: int = 0
    ram_bytes: int = 0
    device_bytes: int = 0
    pause_ms: float = 0.0
    phases: dict = field(default_factory=dict)
    primary_digest: str | None = None  # primary, debug mode: its state digest while paused
    own_dirty: int = 0  # secondary: pages it wrote itself since the last checkpoint
    restored: int = 0   # secondary: of those, pages the primary did not send (taken from the cache)


class _Phases:
    def __init__(self, record):
        self.record = record
        self.last = time.perf_counter()

    def mark(self, name):
        now = time.perf_counter()
        self.record.phases[name] = (now - self.last) * 1e3
        self.last = now


class CheckpointPrimary:
    """The primary side.  On construction the secondary's RAM must equal this machine's
    RAM (after the initial full migration): the dirty log starts from here."""

    def __init__(self, machine, sock, debug=False, timeout=REPLY_TIMEOUT_S):
        self.machine = machine
        self.channel = Channel(sock, timeout)
        self.debug = debug
        self.seq = 0
        self.unacked = np.zeros(machine.ram.npages, dtype=bool)  # sent, not yet loaded by the peer
        self.records = []
        machine.start_dirty_log()
        machine.dirty_pages()

    def handshake(self):
        self.channel.send(CHECKPOINT_READY, ready_payload(self.machine))
        _, payload = self.channel.recv((CHECKPOINT_READY,))
        check_ready(payload, self.machine)

    def checkpoint(self):
        """One whole transaction; returns its record.  Raises :class:`CheckpointAbandoned`
        (the secondary refused it, the channel goes on), :class:`CheckpointError` (this side
        could not capture) or :class:`ChannelError` (the channel is broken).  The machine
        runs on as before in every case."""
        m, ch = self.machine, self.channel
        self.seq += 1
        seq = self.seq
        record = CheckpointRecord(seq)
        self.records.append(record)
        phases = _Phases(record)
        was_running = None
        try:
            ch.send(CHECKPOINT_REQUEST, SEQ.pack(seq))
            ch.recv_seq(CHECKPOINT_REPLY, seq)
            phases.mark("request")
            paused_at = time.perf_counter()
            was_running = m.status == "running"
            m.stop()
            try:
                ck = self.capture(seq)
            except EmuError as e:
                ch.abandon(seq, f"primary could not capture its state: {e}")
                raise CheckpointError(f"colo: checkpoint {seq}: {e}") from None
            record.pages = len(ck.pages)
            record.ram_bytes, record.device_bytes = len(ck.ram_stream), len(ck.device_state)
            if ck.state_digest is not None:
                record.primary_digest = ck.state_digest.hex()
            phases.mark("capture")
            self.send_checkpoint(ck)
            phases.mark("send")
            ch.recv_seq(VMSTATE_RECEIVED, seq)
            phases.mark("received")
            ch.recv_seq(VMSTATE_LOADED, seq)
            phases.mark("loaded")
            self.unacked[:] = False
            record.status = "ok"
        except CheckpointAbandoned as e:
            record.status, record.error = "abandoned", str(e)
            raise
        except (CheckpointError, ChannelError) as e:
            record.status, record.error = "failed", str(e)
            raise
        finally:
            if was_running is not None:
                record.pause_ms = (time.perf_counter() - paused_at) * 1e3
                if was_running:
                    m.cont()
        return record

    def capture(self, seq):
        """Paused: the pages to send (this interval's and any not yet acknowledged), the
        device state in a buffer, the digest over both."""
        m = self.machine
        self.unacked[m.dirty_pages()] = True
        pages = np.flatnonzero(self.unacked)
        ram_stream = m.save_ram(pages)
        device_state = m.save_state()
        state_digest = bytes.fromhex(m.state_digest()) if self.debug else None
        return Checkpoint(seq, pages, ram_stream, device_state, checkpoint_digest(seq, ram_stream, device_state),
                          state_digest)

    def send_checkpoint(self, ck):
        ch = self.channel
        ch.send(VMSTATE_SEND, SEND.pack(ck.seq, len(ck.ram_stream)), ck.ram_stream)
        ch.send(VMSTATE_SIZE, SEQ.pack(len(ck.device_state)), ck.device_state)
        extra = b"\x01" + ck.state_digest if ck.state_digest is not None else b"\x00"
        ch.send(VMSTATE_DIGEST, ck.digest + extra)

    def close(self):
        self.channel.close()


@dataclass
class _Incoming:
    seq: int
    ram: snapshot.RamPages
    device_state: bytes
    state_digest: bytes | None


class CheckpointSecondary:
    """The secondary side.  On construction this machine must hold the primary's state
    (after the initial full migration): the RAM cache is copied from its RAM and its own
    dirty log starts."""

    def __init__(self, machine, sock, timeout=REPLY_TIMEOUT_S):
        self.machine = machine
        self.channel = Channel(sock, timeout)
        self.cache = machine.ram.buf.copy()
        self.last_state = machine.save_state()  # device state of the last applied checkpoint
        self.last_seq = 0      # highest sequence number seen (a replay is refused)
        self.applied_seq = 0   # the checkpoint the cache and last_state stand for
        self.records = []
        machine.start_dirty_log()
        machine.dirty_pages()

    def handshake(self):
        _, payload = self.channel.recv((CHECKPOINT_READY,))
        try:
            check_ready(payload, self.machine)
        except ChannelError as e:
            self.channel.abandon(0, str(e))
            self.channel.close()
            raise
        self.channel.send(CHECKPOINT_READY, ready_payload(self.machine))

    def serve_one(self):
        """Wait for and take one checkpoint; returns its record.

        Raises :class:`CheckpointRejected` (this side refused the content) or
        :class:`CheckpointAbandoned` (the primary gave up): nothing applied, the VM resumed
        as it was, the channel goes on.  Raises :class:`ChannelError` when the channel broke
        (it is then closed): nothing applied and the VM left stopped, for the caller to
        decide (:meth:`restore_last_checkpoint` for a failover)."""
        m, ch = self.machine, self.channel
        _, payload = ch.recv((CHECKPOINT_REQUEST,))
        (seq,) = SEQ.unpack(payload)
        record = CheckpointRecord(seq)
        self.records.append(record)
        phases = _Phases(record)
        if seq <= self.last_seq:
            reason = f"checkpoint {seq} is not newer than checkpoint {self.last_seq} (replayed?)"
            record.status, record.error = "rejected", reason
            ch.abandon(seq, reason)
            raise CheckpointRejected(f"colo: {reason}")
        self.last_seq = seq
        stopped_at = time.perf_counter()
        was_running = m.status == "running"
        m.stop()
        try:
            ch.send(CHECKPOINT_REPLY, SEQ.pack(seq))
            incoming = self._receive(seq, record)
            phases.mark("receive")
            ch.send(VMSTATE_RECEIVED, SEQ.pack(seq))
            self._apply(incoming, record)
            phases.mark("apply")
            if incoming.state_digest is not None:
                mine = m.state_digest()
                if mine != incoming.state_digest.hex():
                    raise ConsistencyError(f"colo: checkpoint {seq}: secondary state digest {mine} differs from "
                                           f"the primary's {incoming.state_digest.hex()}")
                phases.mark("debug-check")
        except CheckpointAbandoned as e:
            record.status, record.error = "abandoned", str(e)
            self._resume(was_running, stopped_at, record)
            raise
        except (CheckpointError, StateError) as e:
            record.status, record.error = "rejected", str(e)
            ch.abandon(seq, str(e))
            self._resume(was_running, stopped_at, record)
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointRejected(f"colo: checkpoint {seq}: {e}") from None
        except ChannelError as e:
            record.status, record.error = "failed", str(e)
            record.pause_ms = (time.perf_counter() - stopped_at) * 1e3
            ch.abandon(seq, str(e))
            ch.close()
            raise
        self._resume(was_running, stopped_at, record)
        ch.send(VMSTATE_LOADED, SEQ.pack(seq))
        record.status = "ok"
        return record

    def _resume(self, was_running, stopped_at, record):
        record.pause_ms = (time.perf_counter() - stopped_at) * 1e3
        if was_running:
            self.machine.cont()

    def _receive(self, seq, record):
        """Everything of checkpoint ``seq`` into this side's own buffers, then checked."""
        m, ch = self.machine, self.channel
        _, payload = ch.recv((VMSTATE_SEND,))
        got_seq, ram_len = SEND.unpack(payload)
        if got_seq != seq:
            raise ChannelError(f"colo: VMSTATE_SEND for checkpoint {got_seq} inside checkpoint {seq}")
        if ram_len > max_ram_stream(m):
            raise ChannelError(f"colo: checkpoint {seq}: RAM stream of {ram_len} bytes exceeds the "
                               f"{max_ram_stream(m)} this machine can need")
        ram_stream = ch.recv_exact(ram_len)
        _, payload = ch.recv((VMSTATE_SIZE,))
        (state_len,) = SEQ.unpack(payload)
        if state_len > MAX_DEVICE_STATE:
            raise ChannelError(f"colo: checkpoint {seq}: device state of {state_len} bytes exceeds the limit "
                               f"of {MAX_DEVICE_STATE}")
        device_state = bytes(ch.recv_exact(state_len))
        _, payload = ch.recv((VMSTATE_DIGEST,))
        digest, flag = payload[:DIGEST_SIZE], payload[DIGEST_SIZE]
        if flag not in (0, 1) or len(payload) != DIGEST_SIZE + 1 + flag * DIGEST_SIZE:
            raise ChannelError(f"colo: checkpoint {seq}: malformed VMSTATE_DIGEST")
        state_digest = payload[DIGEST_SIZE + 1:] if flag else None
        record.ram_bytes, record.device_bytes = ram_len, state_len
        if not hmac.compare_digest(digest, checkpoint_digest(seq, ram_stream, device_state)):
            raise CheckpointRejected(f"colo: checkpoint {seq}: digest mismatch (corrupted, truncated or replayed)")
        try:
            parsed_ram = snapshot.parse(ram_stream, m.machine_type, m.ram.size)
            if parsed_ram.devices:
                raise StateError("the RAM stream carries device sections")
            if parsed_ram.ram_pages is None:
                raise StateError("the RAM stream has no RAM section")
            parsed_state, _ = machinestate.decode(m, device_state)
            if parsed_state.ram_pages is not None:
                raise StateError("the device state carries RAM pages")
        except StateError as e:
            raise CheckpointRejected(f"colo: checkpoint {seq}: {e}") from None
        record.pages = len(parsed_ram.ram_pages.pages)
        return _Incoming(seq, parsed_ram.ram_pages, device_state, state_digest)

    def _apply(self, incoming, record):
        """Device state first (the load checks it all again and rolls back by itself if a
        device refuses), then the cache, then RAM from the cache."""
        m = self.machine
        m.load_state(incoming.device_state)
        incoming.ram.write_into(self.cache)
        own = m.dirty_pages()
        mask = np.zeros(m.ram.npages, dtype=bool)
        mask[own] = True
        record.own_dirty = len(own)
        record.restored = int(len(own) - np.count_nonzero(np.isin(own, incoming.ram.pages)))
        mask[incoming.ram.pages] = True
        self._flush(np.flatnonzero(mask))
        self.last_state = incoming.device_state
        self.applied_seq = incoming.seq

    def _flush(self, pages):
        """Write ``pages`` of the cache into RAM (through the machine's RAM loader, which
        drops translated code over them); the loader's own marks leave the dirty log."""
        m = self.machine
        if len(pages):
            writer = snapshot.StreamWriter(m.machine_type, m.ram.size)
            writer.ram(self.cache, pages)
            m.load_ram(writer.finish())
        m.dirty_pages()

    def restore_last_checkpoint(self):
        """Put the (stopped) machine back to the last applied checkpoint: the pages it
        wrote since come from the cache, the device state from that checkpoint."""
        m = self.machine
        m.load_state(self.last_state)
        self._flush(m.dirty_pages())

    def close(self):
        self.channel.close()

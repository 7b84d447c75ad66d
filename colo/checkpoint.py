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
    VMSTATE_DIGEST kind | digest(seq | RAM stream | device state) [| state digest]
                                              RAM stream -> staging, device state -> its own
                                              buffer; sizes and digest checked
                                         <-   VMSTATE_RECEIVED seq
    resumes                                   both streams parsed (a bad one is abandoned
                                              whole), cache updated, flushed into RAM, state loaded,
                                              resumes
                                         <-   VMSTATE_LOADED seq
    clears the dirty bits it sent

Both sides send ``HEARTBEAT`` while idle; any frame counts as a sign of life and a
receiver skips heartbeats wherever it waits.  ``VMSTATE_LOADED`` carries the secondary's
own pause (stop to resume, in microseconds) for the records.

With a shared key every frame is followed by an HMAC-SHA256 tag over a per-direction
counter, the frame header and its payload; the raw buffers are covered through the
SHA-256 checkpoint digest inside the (tagged) ``VMSTATE_DIGEST``.  A frame with a bad or
missing tag breaks the channel: only the paired peer can drive the secondary.

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

import contextlib
import hashlib
import hmac
import queue
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import xxhash

from emu.state import machinestate

from emu.state import stream as snapshot
from emu.errors import EmuError, StateError

from .framing import FrameFormat, FrameReader, read_frame
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
HEARTBEAT = 10

NAMES = {CHECKPOINT_READY: "CHECKPOINT_READY", CHECKPOINT_REQUEST: "CHECKPOINT_REQUEST",
         CHECKPOINT_REPLY: "CHECKPOINT_REPLY", VMSTATE_SEND: "VMSTATE_SEND", VMSTATE_SIZE: "VMSTATE_SIZE",
         VMSTATE_DIGEST: "VMSTATE_DIGEST", VMSTATE_RECEIVED: "VMSTATE_RECEIVED",
         VMSTATE_LOADED: "VMSTATE_LOADED", ABANDON: "ABANDON", HEARTBEAT: "HEARTBEAT"}

SEQ = struct.Struct(">Q")
SEND = struct.Struct(">QQ")
LOADED = struct.Struct(">QQ")  # seq, the secondary's pause in microseconds
TAG_SIZE = 32
DIGEST_SIZES = {0: 16, 1: 32}  # by digest kind
STATE_DIGEST_SIZE = hashlib.sha256().digest_size  # Machine.state_digest()
MAX_REASON = 4096
MAX_READY = 512
MAX_DEVICE_STATE = 64 << 20
REPLY_TIMEOUT_S = 30.0
HANDSHAKE_TIMEOUT_S = 30.0
SOCKET_BUFFER = 8 << 20
SEND_PIECE = 1 << 20

# exact payload sizes, or (minimum, maximum)
_PAYLOAD_SIZES = {
    CHECKPOINT_READY: (len(MAGIC) + 4 + 2 + 8, MAX_READY),
    CHECKPOINT_REQUEST: SEQ.size, CHECKPOINT_REPLY: SEQ.size, VMSTATE_RECEIVED: SEQ.size,
    VMSTATE_LOADED: LOADED.size, VMSTATE_SEND: SEND.size, VMSTATE_SIZE: SEQ.size, HEARTBEAT: 0,
    VMSTATE_DIGEST: (1 + 16 + 1, 1 + 32 + 1 + STATE_DIGEST_SIZE),  # kind | digest | flag [| state digest]
    ABANDON: (SEQ.size, SEQ.size + MAX_REASON),
}


FORMAT = FrameFormat(HEADER, NAMES, ChannelError, max_payload=0, sizes=_PAYLOAD_SIZES, prefix="colo: ")


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


READY_PASSIVE = 1  # CHECKPOINT_READY flag: the secondary stays stopped between checkpoints


def ready_payload(machine, flags=0):
    name = machine.machine_type.encode()
    return (MAGIC + struct.pack(">IH", PROTOCOL_VERSION, len(name)) + name + SEQ.pack(machine.ram.size)
            + bytes([flags]))


def check_ready(payload, machine):
    """Refuse a peer that speaks another protocol version or runs another machine; returns
    the peer's flags."""
    if payload[:len(MAGIC)] != MAGIC:
        raise ChannelError("colo: not a COLO checkpoint channel")
    version, nlen = struct.unpack_from(">IH", payload, len(MAGIC))
    pos = len(MAGIC) + 6
    if version != PROTOCOL_VERSION:
        raise ChannelError(f"colo: peer speaks checkpoint protocol {version}, this side {PROTOCOL_VERSION}")
    if pos + nlen + 9 != len(payload):
        raise ChannelError(f"colo: malformed CHECKPOINT_READY ({len(payload)} bytes)")
    name = payload[pos:pos + nlen].decode("ascii", "replace")
    (ram_size,) = SEQ.unpack_from(payload, pos + nlen)
    flags = payload[-1]
    if name != machine.machine_type:
        raise ChannelError(f"colo: peer machine type {name!r}, this machine is {machine.machine_type!r}")
    if ram_size != machine.ram.size:
        raise ChannelError(f"colo: peer has {ram_size >> 20} MiB of RAM, this machine {machine.ram.size >> 20} MiB")
    if flags & ~READY_PASSIVE:
        raise ChannelError(f"colo: CHECKPOINT_READY with unknown flags {flags:#x}")
    return flags


DIGEST_XXH3 = 0    # XXH3-128: catches corruption, truncation and replay at 20 GB/s
DIGEST_SHA256 = 1  # with a shared key: the (tagged) digest then vouches for the raw buffers too


def checkpoint_digest(seq, ram_stream, device_state, kind=DIGEST_XXH3):
    """A digest of the whole checkpoint; the sequence number makes a replay fail it."""
    h = hashlib.sha256() if kind == DIGEST_SHA256 else xxhash.xxh3_128()
    h.update(SEQ.pack(seq))
    h.update(ram_stream)
    h.update(device_state)
    return h.digest()


def max_ram_stream(machine):
    """The largest RAM stream a checkpoint of this machine can need (every page, with data)."""
    return machine.ram.size + 5 * machine.ram.npages + 4096


class Channel:
    """Framed messages and raw buffers on a blocking socket with a timeout.

    ``last_heard`` is when the peer last sent anything (heartbeats included);
    ``last_sent`` when this side last did.  With ``key`` every frame carries an HMAC tag."""

    def __init__(self, sock, timeout=REPLY_TIMEOUT_S, key=None, role="primary"):
        self.sock = sock
        self.timeout = timeout
        self.closed = False
        self.key = key
        self.send_label, self.recv_label = (b"P", b"S") if role == "primary" else (b"S", b"P")
        self.send_count = self.recv_count = 0
        self.last_heard = self.last_sent = time.monotonic()
        self.heartbeats_received = 0
        self.reader = FrameReader(FORMAT)
        sock.settimeout(timeout)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # the replies are small
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):  # a whole checkpoint in flight at once
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)

    def _tag(self, label, count, header_and_payload):
        mac = hmac.new(self.key, label + SEQ.pack(count), hashlib.sha256)
        mac.update(header_and_payload)
        return mac.digest()

    def send(self, kind, payload=b"", raw=None):
        """One frame, optionally followed by a raw buffer (one send call for small ones)."""
        try:
            data = FORMAT.frame(kind, payload)
            if self.key is not None:
                self.send_count += 1
                data += self._tag(self.send_label, self.send_count, data)
            if raw is not None and len(raw) <= 65536:
                self.sock.sendall(data + bytes(raw))
            else:
                self.sock.sendall(data)
                if raw is not None:  # in pieces: the timeout then means "no progress", not "too big"
                    view = memoryview(raw)
                    for start in range(0, len(view), SEND_PIECE):
                        self.sock.sendall(view[start:start + SEND_PIECE])
            self.last_sent = time.monotonic()
        except socket.timeout:
            raise ChannelError(f"colo: sending {NAMES[kind]} timed out after {self.timeout} s") from None
        except OSError as e:
            raise ChannelError(f"colo: connection lost sending {NAMES[kind]}: {e}") from None

    def heartbeat(self):
        self.send(HEARTBEAT)

    @contextlib.contextmanager
    def patience(self, timeout):
        """A longer timeout for one exchange (set-up, not a sign of life)."""
        self.sock.settimeout(max(timeout, self.timeout))
        try:
            yield
        finally:
            self.sock.settimeout(self.timeout)

    def abandon(self, seq, reason):
        """Best effort: the peer may already be gone."""
        try:
            self.send(ABANDON, SEQ.pack(seq) + reason.encode()[:MAX_REASON])
        except ChannelError:
            pass

    def recv_frame(self):
        """The next frame, heartbeats included: (type, payload).  Lengths are checked before
        the payload is read; an ABANDON raises :class:`CheckpointAbandoned`."""
        kind, payload = read_frame(self.reader, self.recv_exact)
        if self.key is not None:
            tag = bytes(self.recv_exact(TAG_SIZE))
            self.recv_count += 1
            header = FORMAT.header.pack(kind, len(payload))
            if not hmac.compare_digest(tag, self._tag(self.recv_label, self.recv_count, header + payload)):
                raise ChannelError(f"colo: {NAMES[kind]} with a bad authentication tag "
                                   "(wrong key, or not the paired peer)")
        self.last_heard = time.monotonic()
        if kind == HEARTBEAT:
            self.heartbeats_received += 1
        elif kind == ABANDON:
            (seq,) = SEQ.unpack_from(payload)
            raise CheckpointAbandoned(seq, payload[SEQ.size:].decode("utf-8", "replace"))
        return kind, payload

    def recv_any(self):
        """The next frame other than a heartbeat (for waits inside a transaction)."""
        while True:
            kind, payload = self.recv_frame()
            if kind != HEARTBEAT:
                return kind, payload

    def poll(self):
        """Frames the peer has already sent, without waiting for more: a list of
        (type, payload), heartbeats left out; an ABANDON is returned as (ABANDON, exception)."""
        frames = []
        while self.readable():
            try:
                kind, payload = self.recv_frame()
            except CheckpointAbandoned as e:
                frames.append((ABANDON, e))
                continue
            if kind != HEARTBEAT:
                frames.append((kind, payload))
        return frames

    def recv(self, expected):
        """The next frame, which must be of a type in ``expected``."""
        kind, payload = self.recv_any()
        if kind not in expected:
            names = " or ".join(NAMES[k] for k in expected)
            raise ChannelError(f"colo: expected {names}, got {NAMES[kind]}")
        return kind, payload

    def recv_seq(self, kind, seq):
        _, payload = self.recv((kind,))
        (got,) = SEQ.unpack_from(payload)
        if got != seq:
            raise ChannelError(f"colo: {NAMES[kind]} for checkpoint {got}, expected {seq}")
        return payload

    def readable(self):
        """Has the peer sent something (a frame may be read without waiting long)?"""
        if self.closed:
            return False
        r, _, _ = select.select([self.sock], [], [], 0)
        return bool(r)

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
                self.last_heard = time.monotonic()
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
    trigger: str = "forced"  # periodic / output / mismatch / timeout / forced
    time: float = 0.0        # seconds since the pair entered COLO
    status: str = "started"  # ok / abandoned / rejected / failed
    error: str | None = None
    pages: int = 0
    ram_bytes: int = 0
    device_bytes: int = 0
    pause_ms: float = 0.0
    secondary_pause_ms: float | None = None  # primary: as the secondary reported it
    phases: dict = field(default_factory=dict)
    primary_digest: str | None = None  # primary, debug mode: its state digest while paused
    own_dirty: int = 0  # secondary: pages it wrote itself since the last checkpoint
    restored: int = 0   # secondary: of those, pages the primary did not send (taken from the cache)

    def as_dict(self):
        """The fields the records files and the report use."""
        return {"seq": self.seq, "time": round(self.time, 6), "trigger": self.trigger, "status": self.status,
                "pages": self.pages, "ram_bytes": self.ram_bytes, "device_bytes": self.device_bytes,
                "pause_ms": round(self.pause_ms, 3),
                "secondary_pause_ms": None if self.secondary_pause_ms is None else round(self.secondary_pause_ms, 3),
                "phases": {k: round(v, 3) for k, v in self.phases.items()}, "error": self.error}


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
    RAM (after the initial full migration): the dirty log starts from here.

    The transaction runs in steps so that the guest keeps running while the secondary
    gets ready and while it applies: :meth:`request` sends CHECKPOINT_REQUEST;
    :meth:`on_reply` (CHECKPOINT_REPLY has come) pauses, captures, sends, waits for
    VMSTATE_RECEIVED and resumes; :meth:`on_loaded` ends it.  :meth:`checkpoint` does all
    three in one blocking call.  ``on_pause(seq)`` / ``on_unpause(seq, ok)`` let the caller
    mark the output stream (paused with the guest stopped, resumed with it)."""

    def __init__(self, machine, sock, debug=False, timeout=REPLY_TIMEOUT_S, key=None):
        self.machine = machine
        self.channel = Channel(sock, timeout, key, role="primary")
        self.debug = debug
        self.seq = 0
        self.unacked = np.zeros(machine.ram.npages, dtype=bool)  # sent, not yet loaded by the peer
        self.records = []
        self.pending = None  # the record of the transaction in progress
        self.pending_phase = None  # "requested" (waiting for REPLY) or "loading" (waiting for LOADED)
        self.started = time.monotonic()
        self.on_pause = None
        self.on_unpause = None
        self.peer_passive = False
        self.background_send = False
        self.sending = False      # the sender thread has a checkpoint: nobody else may write to the channel
        self.send_error = None
        self._sender = None
        self._send_queue = queue.Queue()
        self.digest_kind = DIGEST_SHA256 if key is not None else DIGEST_XXH3
        machine.start_dirty_log()
        machine.dirty_pages()

    def handshake(self):
        with self.channel.patience(HANDSHAKE_TIMEOUT_S):  # the secondary first copies all of RAM into its cache
            self.channel.send(CHECKPOINT_READY, ready_payload(self.machine))
            _, payload = self.channel.recv((CHECKPOINT_READY,))
        self.peer_passive = bool(check_ready(payload, self.machine) & READY_PASSIVE)

    def checkpoint(self, trigger="forced"):
        """One whole transaction, blocking; returns its record.  Raises
        :class:`CheckpointAbandoned` (the secondary refused it, the channel goes on),
        :class:`CheckpointError` (this side could not capture) or :class:`ChannelError` (the
        channel is broken).  The machine runs on as before in every case."""
        record = self.request(trigger)
        kind, payload = self._recv_step()
        self.step(kind, payload)
        if self.pending is record:
            kind, payload = self._recv_step()
            self.step(kind, payload)
        return record

    def _recv_step(self):
        try:
            return self.channel.recv_any()
        except CheckpointAbandoned as e:
            return ABANDON, e
        except ChannelError as e:
            self._fail(str(e))
            raise

    def request(self, trigger):
        """Start checkpoint ``seq + 1``: ask the secondary to get ready."""
        if self.pending is not None or self.sending:
            raise CheckpointError(f"colo: checkpoint {self.seq} is still in progress")
        self.seq += 1
        record = CheckpointRecord(self.seq, trigger=trigger, time=time.monotonic() - self.started)
        self.records.append(record)
        self.pending, self.pending_phase = record, "requested"
        self._phases = _Phases(record)
        try:
            self.channel.send(CHECKPOINT_REQUEST, SEQ.pack(self.seq))
        except ChannelError as e:
            self._fail(str(e))
            raise
        return record

    def step(self, kind, payload):
        """Act on a frame read from the channel (CHECKPOINT_REPLY, VMSTATE_LOADED, or an
        ABANDON passed as the exception): the caller's loop reads, this side acts."""
        record = self.pending
        if kind == ABANDON:
            if record is None:
                return
            record.status, record.error = "abandoned", str(payload)
            self._end(ok=False)
            raise payload
        if record is None:
            raise ChannelError(f"colo: unexpected {NAMES[kind]} with no checkpoint in progress")
        (seq,) = SEQ.unpack_from(payload)
        if seq != record.seq:
            raise self._fail(f"colo: {NAMES[kind]} for checkpoint {seq}, expected {record.seq}")
        expected = {"requested": CHECKPOINT_REPLY, "sending": VMSTATE_RECEIVED, "loading": VMSTATE_LOADED}
        if kind != expected[self.pending_phase]:
            raise self._fail(f"colo: unexpected {NAMES[kind]} while waiting for "
                             f"{NAMES[expected[self.pending_phase]]}")
        if kind == CHECKPOINT_REPLY:
            self.on_reply(record)
        elif kind == VMSTATE_RECEIVED:
            self._fault("after-received", seq)
            self._phases.mark("received")
            self.pending_phase = "loading"
        else:
            self.on_loaded(record, payload)

    def on_reply(self, record):
        """The secondary is stopped and ready: pause, capture, send; resume once it has
        received and checked everything.  With ``background_send`` the guest resumes as
        soon as its state is copied into the checkpoint's buffers (Remus' speculative
        execution: its later output is held until the checkpoint is applied anyway), and a
        thread sends them while it runs."""
        m, ch = self.machine, self.channel
        seq = record.seq
        self._fault("after-request", seq)
        self._phases.mark("request")
        paused_at = time.perf_counter()
        was_running = m.status == "running"
        m.stop()
        if self.on_pause is not None:
            self.on_pause(seq)
        try:
            try:
                self._phases.mark("stop")
                ck = self.capture(seq, self._phases)
            except EmuError as e:
                ch.abandon(seq, f"primary could not capture its state: {e}")
                record.status, record.error = "failed", str(e)
                self._end(ok=False)
                raise CheckpointError(f"colo: checkpoint {seq}: {e}") from None
            record.pages = len(ck.pages)
            record.ram_bytes, record.device_bytes = len(ck.ram_stream), len(ck.device_state)
            if ck.state_digest is not None:
                record.primary_digest = ck.state_digest.hex()
            if self.background_send:
                self.pending_phase = "sending"
                self.sending = True
                self.send_error = None
                if self._sender is None:  # one long-lived thread: starting one costs a GIL hand-over
                    self._sender = threading.Thread(target=self._sender_loop, daemon=True, name="checkpoint sender")
                    self._sender.start()
                self._send_queue.put(ck)
                return
            try:
                self.send_checkpoint(ck)
                self._phases.mark("send")
                ch.recv_seq(VMSTATE_RECEIVED, seq)
                self._fault("after-received", seq)
            except CheckpointAbandoned as e:
                record.status, record.error = "abandoned", str(e)
                self._end(ok=False)
                raise
            except ChannelError as e:
                self._fail(str(e))
                raise
            self._phases.mark("received")
            self.pending_phase = "loading"
        finally:
            record.pause_ms = (time.perf_counter() - paused_at) * 1e3
            if was_running:
                m.cont()

    def _sender_loop(self):
        while True:
            ck = self._send_queue.get()
            if ck is None:
                return
            try:
                self.send_checkpoint(ck)
                self._phases.mark("send")
            except ChannelError as e:
                self.send_error = e  # the run loop's next look at the channel reports it
            except BaseException as e:  # noqa: BLE001 (the thread must report, not vanish)
                self.send_error = ChannelError(f"colo: sending checkpoint {ck.seq} failed: {e!r}")
            finally:
                self.sending = False

    def on_loaded(self, record, payload):
        _, pause_us = LOADED.unpack(payload)
        record.secondary_pause_ms = pause_us / 1e3
        self._phases.mark("loaded")
        self.unacked[:] = False
        record.status = "ok"
        self._end(ok=True)

    def _end(self, ok):
        seq = self.pending.seq
        self.pending = self.pending_phase = None
        if self.on_unpause is not None:
            self.on_unpause(seq, ok)

    def _fail(self, reason):
        """The channel broke in the middle of a transaction: end it (nothing acknowledged)."""
        if self.pending is not None:
            self.pending.status, self.pending.error = "failed", reason
            self._end(ok=False)
        return ChannelError(reason)

    def capture(self, seq, phases=None):
        """Paused: the pages to send (this interval's and any not yet acknowledged), the
        device state in a buffer, the digest over both."""
        m = self.machine
        mark = phases.mark if phases is not None else (lambda name: None)
        self.unacked[m.dirty_pages()] = True
        pages = np.flatnonzero(self.unacked)
        mark("dirty-log")
        ram_stream = m.save_ram(pages)
        mark("save-ram")
        device_state = m.save_state()
        mark("save-devices")
        state_digest = bytes.fromhex(m.state_digest()) if self.debug else None
        digest = checkpoint_digest(seq, ram_stream, device_state, self.digest_kind)
        mark("digest")
        return Checkpoint(seq, pages, ram_stream, device_state, digest, state_digest)

    def send_checkpoint(self, ck):
        ch = self.channel
        self._fault("before-send", ck.seq)
        if self._fault_armed("mid-ram", ck.seq):
            ch.send(VMSTATE_SEND, SEND.pack(ck.seq, len(ck.ram_stream)))
            ch.sock.sendall(ck.ram_stream[:len(ck.ram_stream) // 2])
            self._fault("mid-ram", ck.seq)
        ch.send(VMSTATE_SEND, SEND.pack(ck.seq, len(ck.ram_stream)), ck.ram_stream)
        if self._fault_armed("mid-device", ck.seq):  # between VMSTATE_SIZE and the end of the buffer
            ch.send(VMSTATE_SIZE, SEQ.pack(len(ck.device_state)))
            ch.sock.sendall(ck.device_state[:len(ck.device_state) // 2])
            self._fault("mid-device", ck.seq)
        ch.send(VMSTATE_SIZE, SEQ.pack(len(ck.device_state)), ck.device_state)
        self._fault("before-digest", ck.seq)
        extra = b"\x01" + ck.state_digest if ck.state_digest is not None else b"\x00"
        ch.send(VMSTATE_DIGEST, bytes([self.digest_kind]) + ck.digest + extra)

    # Fault injection for the failover tests: ``fault_at = (phase, seq)`` and ``fault`` a
    # callable (the test kills this process there).  Phases: after-request, before-send,
    # mid-ram, mid-device, before-digest, after-received.
    fault_at = None
    fault = None

    def _fault_armed(self, phase, seq):
        return self.fault_at is not None and self.fault_at[0] == phase and seq >= self.fault_at[1]

    def _fault(self, phase, seq):
        if self._fault_armed(phase, seq) and self.fault is not None:
            self.fault(phase, seq)

    def close(self):
        if self._sender is not None:
            self._send_queue.put(None)
        self.channel.close()


@dataclass
class _Received:
    seq: int
    ram_stream: bytearray
    device_state: bytes
    state_digest: bytes | None


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

    def __init__(self, machine, sock, timeout=REPLY_TIMEOUT_S, key=None, passive=False):
        self.machine = machine
        self.channel = Channel(sock, timeout, key, role="secondary")
        self.passive = passive
        self.digest_kind = DIGEST_SHA256 if key is not None else DIGEST_XXH3
        self.after_apply = None  # callable(seq): the state of checkpoint seq is loaded (before resuming)
        self.cache = machine.ram.buf.copy()
        self.last_state = machine.save_state()  # device state of the last applied checkpoint
        self.last_seq = 0      # highest sequence number seen (a replay is refused)
        self.applied_seq = 0   # the checkpoint the cache and last_state stand for
        self.records = []
        machine.start_dirty_log()
        machine.dirty_pages()

    def handshake(self):
        with self.channel.patience(HANDSHAKE_TIMEOUT_S):
            _, payload = self.channel.recv((CHECKPOINT_READY,))
        try:
            check_ready(payload, self.machine)
        except ChannelError as e:
            self.channel.abandon(0, str(e))
            self.channel.close()
            raise
        self.channel.send(CHECKPOINT_READY, ready_payload(self.machine, READY_PASSIVE if self.passive else 0))

    def serve_one(self):
        """Wait for and take one checkpoint; returns its record.

        Raises :class:`CheckpointRejected` (this side refused the content) or
        :class:`CheckpointAbandoned` (the primary gave up): nothing applied, the VM resumed
        as it was, the channel goes on.  Raises :class:`ChannelError` when the channel broke
        (it is then closed): nothing applied and the VM left stopped, for the caller to
        decide (:meth:`restore_last_checkpoint` for a failover)."""
        _, payload = self.channel.recv((CHECKPOINT_REQUEST,))
        return self.take(payload)

    def take(self, request_payload):
        """Serve the checkpoint whose CHECKPOINT_REQUEST payload the caller has read."""
        m, ch = self.machine, self.channel
        (seq,) = SEQ.unpack(request_payload)
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
            with ch.patience(REPLY_TIMEOUT_S):  # the primary may take a while to capture (debug mode)
                received = self._receive(seq, record)
            phases.mark("receive")
            ch.send(VMSTATE_RECEIVED, SEQ.pack(seq))
            incoming = self._parse(received, record)
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
        if self.after_apply is not None:
            self.after_apply(seq)
        self._resume(was_running, stopped_at, record)
        record.status = "ok"
        ch.send(VMSTATE_LOADED, LOADED.pack(seq, int(record.pause_ms * 1e3)))
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
        kind = payload[0]
        if kind != self.digest_kind:
            raise ChannelError(f"colo: checkpoint {seq}: digest kind {kind}, expected {self.digest_kind}"
                               f"{' (a keyed channel needs SHA-256)' if self.channel.key else ''}")
        size = DIGEST_SIZES[kind]
        digest, flag = payload[1:1 + size], payload[1 + size] if len(payload) > 1 + size else None
        if flag not in (0, 1) or len(payload) != 1 + size + 1 + flag * STATE_DIGEST_SIZE:
            raise ChannelError(f"colo: checkpoint {seq}: malformed VMSTATE_DIGEST")
        state_digest = payload[2 + size:] if flag else None
        record.ram_bytes, record.device_bytes = ram_len, state_len
        if not hmac.compare_digest(digest, checkpoint_digest(seq, ram_stream, device_state, kind)):
            raise CheckpointRejected(f"colo: checkpoint {seq}: digest mismatch (corrupted, truncated or replayed)")
        return _Received(seq, ram_stream, device_state, state_digest)

    def _parse(self, received, record):
        """The buffers of a verified checkpoint, parsed (refused whole if anything is off)."""
        m, seq = self.machine, received.seq
        ram_stream, device_state = received.ram_stream, received.device_state
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
        return _Incoming(seq, parsed_ram.ram_pages, device_state, received.state_digest)

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

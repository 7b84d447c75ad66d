"""The COLO checkpoint channel: its messages, framing, handshake and digest.

Message sequence of one checkpoint (after QEMU's ``migration/colo.c``), every message a
frame ``type u8 | length u64 | payload`` (big-endian, :mod:`colo.framing`), the protocol
version exchanged first (:mod:`colo.checkpoint` runs the transaction)::

    primary                                   secondary
    CHECKPOINT_READY (version, machine) ->
                                         <-   CHECKPOINT_READY (version, machine, flags)
    CHECKPOINT_REQUEST seq               ->   stops its VM
                                         <-   CHECKPOINT_REPLY seq
    pauses; dirty pages, device state, replication part, written disk blocks
    VMSTATE_SEND seq, n | RAM stream (n bytes, raw)
    VMSTATE_SIZE m | device state (m bytes, raw)
    REPLICATION_STATE r | replication part (r bytes, raw)
    DISK_WRITES d | disk stream (d bytes, raw)
    VMSTATE_DIGEST kind | digest(seq | RAM stream | device state | replication part
                                 | disk stream) [| state digest]
                                              every buffer into its own, sizes and digest
                                              checked
                                         <-   VMSTATE_RECEIVED seq
    resumes                                   every stream checked whole (a bad one is
                                              abandoned whole); device state applied, the
                                              disk overlay discarded and the blocks written
                                              into the images, the RAM pages into the cache
                                              and RAM, the link state; resumes
                                         <-   VMSTATE_LOADED seq
    clears the dirty bits and the disk blocks it sent

The replication part (:mod:`colo.replicationpart`) is state of the pair, not of the guest:
the COLO link's stream positions and unreleased output.  Protocol version 2 added it
(``REPLICATION_STATE``, and the digest covers it); version 1 carried the link as a section
of the machine stream.  The disk stream (``emu/blockrep.py``) holds the 4 KiB blocks the
primary's guest wrote since the last checkpoint it saw acknowledged, as its images hold
them at the pause; protocol version 3 added it (``DISK_WRITES``, and the digest covers it).

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
breaks the channel.
"""

import contextlib
import hashlib
import hmac
import select
import socket
import struct
import time

import xxhash

from emu.errors import EmuError
from emu.replication import MAX_PAGES

from .framing import FrameFormat, FrameReader, read_frame
from .wire import HEADER, ChannelError

MAGIC = b"EMUCKPT\0"
PROTOCOL_VERSION = 3

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
REPLICATION_STATE = 11
DISK_WRITES = 12

NAMES = {CHECKPOINT_READY: "CHECKPOINT_READY", CHECKPOINT_REQUEST: "CHECKPOINT_REQUEST",
         CHECKPOINT_REPLY: "CHECKPOINT_REPLY", VMSTATE_SEND: "VMSTATE_SEND", VMSTATE_SIZE: "VMSTATE_SIZE",
         VMSTATE_DIGEST: "VMSTATE_DIGEST", VMSTATE_RECEIVED: "VMSTATE_RECEIVED",
         VMSTATE_LOADED: "VMSTATE_LOADED", ABANDON: "ABANDON", HEARTBEAT: "HEARTBEAT",
         REPLICATION_STATE: "REPLICATION_STATE", DISK_WRITES: "DISK_WRITES"}

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
PAYLOAD_SIZES = {
    CHECKPOINT_READY: (len(MAGIC) + 4 + 2 + 8, MAX_READY),
    CHECKPOINT_REQUEST: SEQ.size, CHECKPOINT_REPLY: SEQ.size, VMSTATE_RECEIVED: SEQ.size,
    VMSTATE_LOADED: LOADED.size, VMSTATE_SEND: SEND.size, VMSTATE_SIZE: SEQ.size, HEARTBEAT: 0,
    REPLICATION_STATE: SEQ.size, DISK_WRITES: SEQ.size,
    # kind | digest | flag [| state digest | page fingerprints (debug mode)]
    VMSTATE_DIGEST: (1 + 16 + 1, 1 + 32 + 1 + STATE_DIGEST_SIZE + 8 * MAX_PAGES),
    ABANDON: (SEQ.size, SEQ.size + MAX_REASON),
}
FORMAT = FrameFormat(HEADER, NAMES, ChannelError, max_payload=0, sizes=PAYLOAD_SIZES, prefix="colo: ")


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
    return (MAGIC + struct.pack(">IH", PROTOCOL_VERSION, len(name)) + name + SEQ.pack(machine.ram_size)
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
    if ram_size != machine.ram_size:
        raise ChannelError(f"colo: peer has {ram_size >> 20} MiB of RAM, this machine {machine.ram_size >> 20} MiB")
    if flags & ~READY_PASSIVE:
        raise ChannelError(f"colo: CHECKPOINT_READY with unknown flags {flags:#x}")
    return flags


DIGEST_XXH3 = 0    # XXH3-128: catches corruption, truncation and replay at 20 GB/s
DIGEST_SHA256 = 1  # with a shared key: the (tagged) digest then vouches for the raw buffers too


def checkpoint_digest(seq, ram_stream, device_state, replication_part, disk_stream, kind=DIGEST_XXH3):
    """A digest of the whole checkpoint; the sequence number makes a replay fail it."""
    h = hashlib.sha256() if kind == DIGEST_SHA256 else xxhash.xxh3_128()
    h.update(SEQ.pack(seq))
    h.update(ram_stream)
    h.update(device_state)
    h.update(replication_part)
    h.update(disk_stream)
    return h.digest()


def max_ram_stream(machine):
    """The largest RAM stream a checkpoint of this machine can need (every page, with data)."""
    return machine.ram_size + 5 * machine.page_count + 4096


def max_disk_stream(machine):
    """The largest disk stream a checkpoint of this machine can need (every block of every
    drive: 4 KiB and its number each, a header per drive)."""
    sizes = machine.disk_sizes().values()
    return sum(-(-size // 4096) * 4100 + 300 for size in sizes) + 64


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

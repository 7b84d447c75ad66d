"""The migration channel's messages.

Every message is a frame ``type u8 | length u64 | payload`` (big-endian,
:mod:`colo.framing`).  Lengths are checked against a limit before anything is buffered,
so a hostile peer cannot make us allocate without bound.
"""

import socket
import struct

from emu.errors import ConfigError, EmuError

from .framing import FrameFormat, FrameReader, read_frame

HEADER = struct.Struct(">BQ")
MAX_FRAME = 1 << 31  # a whole 1 GiB machine's RAM fits

# message types
HELLO = 1          # source -> destination: protocol version, machine type, RAM size
ACCEPT = 2         # destination -> source: the stream will be taken
RAM = 3            # a RAM stream (emu.state.stream format, pages only)
STATE = 4          # a device-state stream
COMPLETE = 5       # source: that was the last of it, apply and run
DONE = 6           # destination: applied, running
ABANDON = 7        # either side: give up; payload is the reason (UTF-8)
SYNC = 8           # source: tell me when you have applied everything up to here (u64 sequence)
SYNCED = 9         # destination: applied up to that SYNC
REPLICATION = 10   # source, x-colo only, before COMPLETE: the pair's replication part (colo.replicationpart)
DISKS = 11         # source, x-colo only, first: its drives and a digest of every 1 MiB (colo.disksync)
DISK_DIFF = 12     # destination: the chunks of each drive that differ from its own image
DISK = 13          # source, x-colo only: a disk stream (emu.blockrep) to write into the images

NAMES = {HELLO: "HELLO", ACCEPT: "ACCEPT", RAM: "RAM", STATE: "STATE", COMPLETE: "COMPLETE", DONE: "DONE",
         ABANDON: "ABANDON", SYNC: "SYNC", SYNCED: "SYNCED", REPLICATION: "REPLICATION", DISKS: "DISKS",
         DISK_DIFF: "DISK_DIFF", DISK: "DISK"}

MAGIC = b"EMUMIGR\0"
PROTOCOL_VERSION = 3  # 2: REPLICATION (a COLO link's state no longer travels in the device state); 3: the disks


class ChannelError(EmuError):
    """The peer broke the protocol, went away, or abandoned."""


FORMAT = FrameFormat(HEADER, NAMES, ChannelError, max_payload=MAX_FRAME)


def frame(kind, payload=b""):
    return FORMAT.frame(kind, payload)


def frame_reader(max_payload=None):
    """A reader of this channel's frames (``max_payload``: a tighter limit)."""
    return FrameReader(FORMAT, max_payload)


def hello_payload(machine_type, ram_size):
    name = machine_type.encode()
    return MAGIC + struct.pack(">IH", PROTOCOL_VERSION, len(name)) + name + struct.pack(">Q", ram_size)


def parse_hello(payload):
    """(protocol version, machine type, RAM size) of a HELLO; ChannelError if malformed."""
    try:
        if payload[:len(MAGIC)] != MAGIC:
            raise ChannelError("not an emu-colo migration stream")
        version, nlen = struct.unpack_from(">IH", payload, len(MAGIC))
        pos = len(MAGIC) + 6
        name = payload[pos:pos + nlen].decode("ascii")
        (ram_size,) = struct.unpack_from(">Q", payload, pos + nlen)
        if pos + nlen + 8 != len(payload):
            raise ChannelError("HELLO has trailing bytes")
        return version, name, ram_size
    except (struct.error, UnicodeDecodeError):
        raise ChannelError("malformed HELLO") from None


def recv_frame(sock, reader, timeout):
    """Blocking receive of one frame, where the protocol waits for a reply (``reader``
    keeps what was received before)."""
    sock.settimeout(timeout)
    try:
        return read_frame(reader, lambda n: _recv_exact(sock, n))
    except socket.timeout:
        raise ChannelError(f"no reply within {timeout} s") from None
    except OSError as e:
        raise ChannelError(f"connection lost: {e}") from None


def _recv_exact(sock, n):
    chunks = bytearray()
    while len(chunks) < n:
        data = sock.recv(min(n - len(chunks), 1 << 20))
        if not data:
            raise ChannelError("connection closed by the peer")
        chunks += data
    return bytes(chunks)


def parse_tcp_uri(uri, what):
    """'tcp:HOST:PORT' -> (host, port); HOST defaults to 127.0.0.1 (loopback only)."""
    if not uri.startswith("tcp:"):
        raise ConfigError(f"{what}: unsupported URI {uri!r} (expected tcp:HOST:PORT)")
    rest = uri[4:].split(",")[0]
    host, _, port = rest.rpartition(":")
    try:
        port = int(port)
    except ValueError:
        raise ConfigError(f"{what}: bad port in {uri!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"{what}: port {port} out of range in {uri!r}")
    return host or "127.0.0.1", port

"""Messages between the client endpoint (``emu colo proxy``) and the serial links of the VMs.

Every message is a frame ``type u8 | length u32 | payload`` (big-endian).  Streams are
addressed by absolute byte offsets, so a message that arrives twice or late does no harm:

``HELLO`` (VM -> proxy, first)
    JSON ``{"version": 1, "role": "primary"|"secondary", "node": NAME, "mode": "compare"|"passive",
    "channel": "serial"|"net"}`` (``channel``: what the streams carry, bytes of COM1 or the
    frame records of :mod:`colo.netstream`; absent means serial); a monitor (status queries
    only) says ``{"version": 1, "role": "monitor"}``.
``IN`` (proxy -> VM)
    ``offset u64 | bytes``: client input, bytes ``[offset, offset + n)`` of the one input stream.
``OUT`` (VM -> proxy)
    ``offset u64 | bytes``: guest output, bytes ``[offset, offset + n)`` of that VM's output stream.
``RELEASED`` (proxy -> VM)
    ``offset u64``: the client has been sent every output byte below ``offset``.
``SYNC`` (secondary -> proxy)
    ``seq u64 | in_offset u64 | out_offset u64 | log_base u64 | log bytes``: the secondary now
    holds the primary's state of checkpoint ``seq`` (0: the initial migration).  Its input
    stream continues at ``in_offset`` (the proxy re-sends input from there), its output
    stream at ``out_offset``; ``log`` is the primary's committed output
    ``[log_base, out_offset)``, releasable now.
``MARK`` (primary -> proxy)
    ``seq u64 | out_offset u64``: the primary paused for checkpoint ``seq`` with its output
    stream at ``out_offset``.  Sent in the order of its OUT messages, so the proxy knows
    that every later byte belongs to the next epoch: none of those is released (not even
    when the compare matches it) until the SYNC of checkpoint ``seq`` or later arrives, or
    an ``UNMARK``.
``UNMARK`` (primary -> proxy)
    ``seq u64``: checkpoint ``seq`` did not happen (abandoned or failed); release as before.
``CHECKPOINT`` (proxy -> primary)
    UTF-8 reason: the compare wants a checkpoint (``mismatch ...`` or ``timeout ...``).
``TAKEOVER`` (VM -> proxy)
    ``epoch u64``: this VM serves alone from now on, under the lease ``epoch`` it holds
    from the arbiter; the proxy accepts only an epoch above every epoch accepted before.
``ACTIVE`` / ``REFUSED`` (proxy -> VM)
    The answer to TAKEOVER (REFUSED carries a UTF-8 reason: this VM must not serve).
``STATUS`` (monitor -> proxy: empty; proxy -> monitor: JSON)
    The proxy's figures.
``PROMOTE`` (VM -> proxy, empty)
    Re-protection: the VM that serves alone (after its ACTIVE) becomes the primary of a new
    pair: its output is released as before, unprotected, until a new secondary's SYNC.
``EPOCH`` (proxy -> VM)
    ``epoch u64``: the highest epoch the proxy has accepted, sent at HELLO and after each
    takeover.  Without an arbiter both VMs of a pair take over under this epoch + 1, so
    that the first takeover is accepted and the second refused, pair after pair.
"""

import json
import struct

from emu.errors import EmuError

from .framing import FrameFormat, FrameReader

HEADER = struct.Struct(">BI")
U64 = struct.Struct(">Q")
SYNC_HEAD = struct.Struct(">QQQQ")
MAX_PAYLOAD = 16 << 20
PROTOCOL_VERSION = 1

(HELLO, IN, OUT, RELEASED, SYNC, CHECKPOINT, TAKEOVER, ACTIVE, REFUSED, STATUS, MARK, UNMARK, PROMOTE,
 EPOCH) = range(1, 15)
NAMES = {HELLO: "HELLO", IN: "IN", OUT: "OUT", RELEASED: "RELEASED", SYNC: "SYNC", CHECKPOINT: "CHECKPOINT",
         TAKEOVER: "TAKEOVER", ACTIVE: "ACTIVE", REFUSED: "REFUSED", STATUS: "STATUS", MARK: "MARK",
         UNMARK: "UNMARK", PROMOTE: "PROMOTE", EPOCH: "EPOCH"}
MARK_BODY = struct.Struct(">QQ")
ROLES = ("primary", "secondary", "monitor")
MODES = ("compare", "passive")


class ProxyProtocolError(EmuError):
    """A peer sent something that is not a well-formed message of this protocol."""


FORMAT = FrameFormat(HEADER, NAMES, ProxyProtocolError, max_payload=MAX_PAYLOAD, prefix="proxy: ")


def frame(kind, payload=b""):
    return FORMAT.frame(kind, payload)


def frame_reader():
    """A reader of this protocol's frames."""
    return FrameReader(FORMAT)


CHANNELS = ("serial", "net")


def hello(role, node="", mode="compare", channel="serial"):
    return frame(HELLO, json.dumps({"version": PROTOCOL_VERSION, "role": role, "node": node,
                                    "mode": mode, "channel": channel}).encode())


def parse_hello(payload):
    try:
        info = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        raise ProxyProtocolError("proxy: HELLO is not JSON") from None
    if not isinstance(info, dict):
        raise ProxyProtocolError("proxy: HELLO is not a JSON object")
    if info.get("version") != PROTOCOL_VERSION:
        raise ProxyProtocolError(f"proxy: HELLO with protocol version {info.get('version')!r}, "
                                 f"this side speaks {PROTOCOL_VERSION}")
    if info.get("role") not in ROLES:
        raise ProxyProtocolError(f"proxy: HELLO with unknown role {info.get('role')!r}")
    if info.get("mode", "compare") not in MODES:
        raise ProxyProtocolError(f"proxy: HELLO with unknown mode {info.get('mode')!r}")
    if info.get("channel", "serial") not in CHANNELS:
        raise ProxyProtocolError(f"proxy: HELLO with unknown channel {info.get('channel')!r}")
    return info


def data(kind, offset, payload):
    """An IN or OUT message."""
    return frame(kind, U64.pack(offset) + bytes(payload))


def parse_data(payload):
    if len(payload) < U64.size:
        raise ProxyProtocolError("proxy: data message shorter than its offset")
    return U64.unpack_from(payload)[0], payload[U64.size:]


def offset_message(kind, offset):
    """A RELEASED, TAKEOVER or UNMARK message."""
    return frame(kind, U64.pack(offset))


def parse_offset(payload):
    if len(payload) != U64.size:
        raise ProxyProtocolError(f"proxy: expected an 8-byte number, got {len(payload)} bytes")
    return U64.unpack(payload)[0]


def mark(seq, out_offset):
    return frame(MARK, MARK_BODY.pack(seq, out_offset))


def parse_mark(payload):
    """(seq, out_offset)."""
    if len(payload) != MARK_BODY.size:
        raise ProxyProtocolError(f"proxy: MARK of {len(payload)} bytes (expected {MARK_BODY.size})")
    return MARK_BODY.unpack(payload)


def sync(seq, in_offset, out_offset, log_base, log):
    if log_base + len(log) != out_offset:
        raise ProxyProtocolError(f"proxy: SYNC log [{log_base}, +{len(log)}) does not end at {out_offset}")
    return frame(SYNC, SYNC_HEAD.pack(seq, in_offset, out_offset, log_base) + bytes(log))


def parse_sync(payload):
    """(seq, in_offset, out_offset, log_base, log)."""
    if len(payload) < SYNC_HEAD.size:
        raise ProxyProtocolError("proxy: truncated SYNC")
    seq, in_offset, out_offset, log_base = SYNC_HEAD.unpack_from(payload)
    log = payload[SYNC_HEAD.size:]
    if log_base + len(log) != out_offset:
        raise ProxyProtocolError(f"proxy: SYNC log [{log_base}, +{len(log)}) does not end at {out_offset}")
    return seq, in_offset, out_offset, log_base, log

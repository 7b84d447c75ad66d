"""Ethernet frames as the byte streams of a COLO pair, and what the endpoint reads in them.

The serial pair addresses every byte of its two streams by offset (:mod:`colo.proxywire`);
the network pair keeps that machinery whole by making each direction one byte stream of
*records*::

    length u32 (big-endian) | virtio_net_hdr_v1 (12 bytes) | Ethernet frame

``length`` counts the header and the frame.  Input records (wire -> guest) carry a zero
header; output records carry the guest's, so that a frame left to the host to checksum or
to cut into segments (CSUM, TSO) goes out through the endpoint's tap as it would through
the VM's own.  A record is never split across a stream position that a checkpoint, a
SYNC or a release can name: offsets are record boundaries.

:func:`parse` reads what the compare needs of a frame (IPv4 and IPv6; TCP, UDP, ICMP);
:func:`shift_tcp` moves a TCP segment between two sequence spaces, as QEMU's
filter-rewriter does, fixing the checksum.
"""

import struct
from dataclasses import dataclass

RECORD_HEAD = struct.Struct(">I")
VNET_HEADER_SIZE = 12
NO_HEADER = bytes(VNET_HEADER_SIZE)
MAX_RECORD = VNET_HEADER_SIZE + 65550  # a 64 KiB TSO segment with its Ethernet and IP headers
NEEDS_CSUM = 1                         # virtio_net_hdr flags: the checksum field holds the pseudo-header sum

ETH_IPV4, ETH_IPV6, ETH_VLAN = 0x0800, 0x86DD, 0x8100
PROTO_ICMP, PROTO_TCP, PROTO_UDP, PROTO_ICMPV6 = 1, 6, 17, 58
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
TCP_OPT_SACK = 5
MASK32 = 0xFFFFFFFF


class RecordError(ValueError):
    """A stream that is not a sequence of records."""


def record(header, frame):
    """The stream bytes of one frame (``header``: its virtio_net_hdr, or ``NO_HEADER``)."""
    return RECORD_HEAD.pack(VNET_HEADER_SIZE + len(frame)) + bytes(header) + bytes(frame)


def split_records(buf, start=0):
    """``(records, end)``: each whole record in ``buf[start:]`` as ``(offset, header, frame)``
    (bytes), and where the first incomplete one begins."""
    pos, out, size = start, [], len(buf)
    with memoryview(buf) as view:
        while pos + RECORD_HEAD.size <= size:
            (length,) = RECORD_HEAD.unpack_from(view, pos)
            if not VNET_HEADER_SIZE <= length <= MAX_RECORD:
                raise RecordError(f"record at byte {pos} announces {length} bytes "
                                  f"({VNET_HEADER_SIZE}..{MAX_RECORD})")
            end = pos + RECORD_HEAD.size + length
            if end > size:
                break
            body = pos + RECORD_HEAD.size
            out.append((pos, bytes(view[body:body + VNET_HEADER_SIZE]), bytes(view[body + VNET_HEADER_SIZE:end])))
            pos = end
    return out, pos


@dataclass(slots=True)
class Packet:
    """What the compare reads of one frame.  ``key`` names its flow with the guest's end
    first: ``(proto, guest address, guest port, peer address, peer port)`` (ports 0 for
    ICMP); None for a frame that is not IP.  ``l4`` is where the transport header starts."""

    proto: int            # 6, 17, 1/58, or 0 for a frame compared whole
    key: tuple | None
    l4: int = 0
    seq: int = 0
    ack: int = 0
    flags: int = 0
    payload_start: int = 0
    payload_len: int = 0


def parse(frame, outgoing):
    """A :class:`Packet` for ``frame``; ``outgoing``: the guest sent it (else it goes to the guest)."""
    n = len(frame)
    if n < 14:
        return Packet(0, None)
    ethertype, l3 = (frame[12] << 8) | frame[13], 14
    if ethertype == ETH_VLAN and n >= 18:
        ethertype, l3 = (frame[16] << 8) | frame[17], 18
    if ethertype == ETH_IPV4 and n >= l3 + 20 and frame[l3] >> 4 == 4:
        ihl = (frame[l3] & 15) * 4
        total = (frame[l3 + 2] << 8) | frame[l3 + 3]
        fragment = ((frame[l3 + 6] << 8) | frame[l3 + 7]) & 0x3FFF
        if ihl < 20 or fragment:
            return Packet(0, None)
        proto, src, dst = frame[l3 + 9], bytes(frame[l3 + 12:l3 + 16]), bytes(frame[l3 + 16:l3 + 20])
        l4, end = l3 + ihl, min(n, l3 + total) if total else n  # TSO: tot_len may be 0 past 64 KiB
    elif ethertype == ETH_IPV6 and n >= l3 + 40 and frame[l3] >> 4 == 6:
        proto, src, dst = frame[l3 + 6], bytes(frame[l3 + 8:l3 + 24]), bytes(frame[l3 + 24:l3 + 40])
        l4, end = l3 + 40, min(n, l3 + 40 + ((frame[l3 + 4] << 8) | frame[l3 + 5]))
        if proto == PROTO_ICMPV6:
            proto = PROTO_ICMP
    else:
        return Packet(0, None)
    guest, peer = (src, dst) if outgoing else (dst, src)
    if proto == PROTO_TCP and end >= l4 + 20:
        sport, dport, seq, ack, off_flags = struct.unpack_from(">HHIIH", frame, l4)
        header = (off_flags >> 12) * 4
        gport, pport = (sport, dport) if outgoing else (dport, sport)
        start = l4 + header
        return Packet(PROTO_TCP, (PROTO_TCP, guest, gport, peer, pport), l4, seq, ack, off_flags & 0x3F,
                      start, max(0, end - start))
    if proto == PROTO_UDP and end >= l4 + 8:
        sport, dport = struct.unpack_from(">HH", frame, l4)
        gport, pport = (sport, dport) if outgoing else (dport, sport)
        return Packet(PROTO_UDP, (PROTO_UDP, guest, gport, peer, pport), l4, payload_start=l4, payload_len=end - l4)
    if proto == PROTO_ICMP:
        return Packet(PROTO_ICMP, (PROTO_ICMP, guest, 0, peer, 0), l4, payload_start=l4, payload_len=end - l4)
    return Packet(0, (proto, guest, 0, peer, 0), l4, payload_start=l4, payload_len=end - l4)


def compare_bytes(frame, packet):
    """What two frames of a non-TCP flow must share: everything after the IP header for an
    IP frame (the IP header's ID and checksum differ between two machines), else the frame."""
    if packet.key is None:
        return bytes(frame)
    return bytes(frame[packet.payload_start:packet.payload_start + packet.payload_len])


def _checksum_adjust(checksum, old, new):
    """RFC 1624: the one's-complement checksum after a 32-bit field changed from old to new."""
    total = (~checksum & 0xFFFF) + (~(old >> 16) & 0xFFFF) + (~old & 0xFFFF) + (new >> 16) + (new & 0xFFFF)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def shift_tcp(frame, packet, seq_delta=0, ack_delta=0, checksum_complete=True):
    """Move the TCP segment in ``frame`` (a bytearray) by ``seq_delta`` in its sequence field
    and ``ack_delta`` in its acknowledgement field and SACK blocks.  ``checksum_complete``:
    the checksum field is the full checksum (else it holds only the pseudo-header sum, which
    neither field enters, as in a frame the host is to checksum)."""
    l4 = packet.l4
    checksum = (frame[l4 + 16] << 8) | frame[l4 + 17]

    def move(pos, delta):
        nonlocal checksum
        old = struct.unpack_from(">I", frame, pos)[0]
        new = (old + delta) & MASK32
        struct.pack_into(">I", frame, pos, new)
        if checksum_complete:
            checksum = _checksum_adjust(checksum, old, new)

    if seq_delta:
        move(l4 + 4, seq_delta)
    if ack_delta and packet.flags & ACK:
        move(l4 + 8, ack_delta)
        pos, end = l4 + 20, packet.payload_start
        while pos < end:
            kind = frame[pos]
            if kind == 0:
                break
            if kind == 1:
                pos += 1
                continue
            if pos + 1 >= end or frame[pos + 1] < 2:
                break
            length = frame[pos + 1]
            if kind == TCP_OPT_SACK:
                for edge in range(pos + 2, min(pos + length, end) - 3, 4):
                    move(edge, ack_delta)
            pos += length
    struct.pack_into(">H", frame, l4 + 16, checksum)

"""Ethernet frames built from their fields, with correct checksums, for the network compare's tests."""

import struct

GUEST_MAC, HOST_MAC = bytes.fromhex("525400123456"), bytes.fromhex("525400abcdef")
GUEST_IP, CLIENT_IP = bytes([10, 0, 2, 15]), bytes([10, 0, 2, 2])


def ones_complement_sum(data, total=0):
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total += sum(struct.unpack(f">{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def checksum(data, total=0):
    return ~ones_complement_sum(data, total) & 0xFFFF


def ipv4(proto, src, dst, l4, ident=1):
    header = bytearray(struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), ident, 0x4000, 64, proto, 0, src, dst))
    struct.pack_into(">H", header, 10, checksum(header))
    return bytes(header)


def tcp(seq, ack, flags, payload=b"", outgoing=True, sport=80, dport=40000, options=b"", ident=1):
    """A TCP/IPv4 frame, guest -> client when ``outgoing`` (else client -> guest, ports swapped)."""
    src, dst = (GUEST_IP, CLIENT_IP) if outgoing else (CLIENT_IP, GUEST_IP)
    if not outgoing:
        sport, dport = dport, sport
    offset = (20 + len(options)) // 4
    segment = bytearray(struct.pack(">HHIIHHHH", sport, dport, seq, ack, offset << 12 | flags, 65535, 0, 0))
    segment += options + payload
    pseudo = src + dst + struct.pack(">BBH", 0, 6, len(segment))
    struct.pack_into(">H", segment, 16, checksum(pseudo + segment))
    macs = HOST_MAC + GUEST_MAC if outgoing else GUEST_MAC + HOST_MAC
    return macs + b"\x08\x00" + ipv4(6, src, dst, segment, ident) + bytes(segment)


def udp(payload, outgoing=True, sport=53, dport=40001, ident=1):
    src, dst = (GUEST_IP, CLIENT_IP) if outgoing else (CLIENT_IP, GUEST_IP)
    datagram = struct.pack(">HHHH", sport, dport, 8 + len(payload), 0) + payload
    return HOST_MAC + GUEST_MAC + b"\x08\x00" + ipv4(17, src, dst, datagram, ident) + datagram


def tcp_checksum_ok(frame):
    """Whether the TCP/IPv4 ``frame``'s checksum is right."""
    ihl = (frame[14] & 15) * 4
    segment = frame[14 + ihl:]
    pseudo = frame[26:34] + struct.pack(">BBH", 0, 6, len(segment))
    return ones_complement_sum(pseudo + segment) == 0xFFFF


def arp(target_ip):
    body = struct.pack(">HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, GUEST_MAC, GUEST_IP, bytes(6), target_ip)
    return b"\xff" * 6 + GUEST_MAC + b"\x08\x06" + body

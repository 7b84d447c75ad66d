"""The machine state stream: snapshots, migration and checkpoints all use this one format.

Layout (all integers big-endian; the full description is ``docs/state-format.md``)::

    header   magic "EMUCOLO\\0" | format version u32 | machine type (u16 len, bytes) | RAM size u64
    section  kind u8 (1 device state, 2 RAM pages) | id (u16 len, bytes) | instance u32 |
             version u32 | payload length u64 | payload | footer u32 0x454e4421 ("END!") |
             section index u32
    ...
    end      kind u8 0xff | SHA-256 over every byte before it (32 bytes)

A RAM payload is: page size u32 | page count u32 | per page: page number u32, encoding u8
(0 zero page, 1 raw 4 KiB follow).  Zero pages cost five bytes.

Reading is two steps: :func:`parse` checks the whole stream (magic, version, checksum,
every length and footer) without touching anything, and only then does the machine apply
the result.  A stream is hostile until proven otherwise.
"""

import hashlib
import struct

import numpy as np

from .errors import StateError

MAGIC = b"EMUCOLO\0"
FORMAT_VERSION = 1
MIN_FORMAT_VERSION = 1
FOOTER = 0x454E4421
KIND_DEVICE = 1
KIND_RAM = 2
KIND_END = 0xFF
PAGE_SIZE = 4096
DIGEST_SIZE = 32
MAX_SECTIONS = 4096


class StreamWriter:
    """Builds one stream in memory (the size is known before anything is sent)."""

    def __init__(self, machine_type, ram_size):
        self.buf = bytearray()
        self.sections = 0
        name = machine_type.encode()
        self.buf += MAGIC + struct.pack(">I", FORMAT_VERSION) + struct.pack(">H", len(name)) + name
        self.buf += struct.pack(">Q", ram_size)

    def _section(self, kind, section_id, instance, version, payload):
        name = section_id.encode()
        self.buf += struct.pack(">BH", kind, len(name)) + name
        self.buf += struct.pack(">IIQ", instance, version, len(payload))
        self.buf += payload
        self.buf += struct.pack(">II", FOOTER, self.sections)
        self.sections += 1

    def device(self, section_id, instance, version, payload):
        self._section(KIND_DEVICE, section_id, instance, version, payload)

    def ram(self, ram_buf, pages):
        """Pages of ``ram_buf`` (a numpy uint8 array); all-zero pages are stored as a flag."""
        pages = np.asarray(pages, dtype=np.int64)
        view = ram_buf.reshape(-1, PAGE_SIZE)
        chosen = view[pages]
        nonzero = chosen.view(np.uint64).any(axis=1) if len(pages) else np.zeros(0, dtype=bool)
        parts = [struct.pack(">II", PAGE_SIZE, len(pages))]
        head = np.zeros(len(pages), dtype=[("page", ">u4"), ("enc", "u1")])
        head["page"] = pages
        head["enc"] = nonzero
        raw_heads = head.tobytes()
        # interleave: header, then data for non-zero pages
        data_rows = chosen[nonzero]
        if nonzero.all():
            entry = np.zeros(len(pages), dtype=[("page", ">u4"), ("enc", "u1"), ("data", "u1", PAGE_SIZE)])
            entry["page"], entry["enc"], entry["data"] = pages, 1, chosen
            parts.append(entry.tobytes())
        else:
            pos, row = 0, 0
            for i, is_data in enumerate(nonzero):
                parts.append(raw_heads[pos:pos + 5])
                pos += 5
                if is_data:
                    parts.append(data_rows[row].tobytes())
                    row += 1
                del i
        self._section(KIND_RAM, "ram", 0, 1, b"".join(parts))

    def finish(self):
        self.buf.append(KIND_END)
        self.buf += hashlib.sha256(self.buf).digest()
        return bytes(self.buf)


class ParsedStream:
    """A verified stream: header fields, device payloads by (id, instance), RAM pages."""

    def __init__(self, machine_type, ram_size, format_version):
        self.machine_type = machine_type
        self.ram_size = ram_size
        self.format_version = format_version
        self.devices = {}  # (id, instance) -> (version, payload bytes)
        self.ram_pages = None  # (page numbers int64 array, data uint8 array [n, 4096], zero mask)


def _need(buf, pos, n, what):
    if pos + n > len(buf):
        raise StateError(f"state stream truncated in {what} (offset {pos}, need {n} more bytes of {len(buf)})")


def parse(data, expect_machine=None, expect_ram_size=None):
    """Check a whole stream and split it into sections; touches nothing."""
    buf = memoryview(bytes(data))
    _need(buf, 0, len(MAGIC) + 4, "header")
    if bytes(buf[:len(MAGIC)]) != MAGIC:
        raise StateError(f"not an emu-colo state stream (magic {bytes(buf[:len(MAGIC)])!r})")
    (version,) = struct.unpack_from(">I", buf, len(MAGIC))
    if version > FORMAT_VERSION:
        raise StateError(f"state stream format version {version} is newer than supported {FORMAT_VERSION}")
    if version < MIN_FORMAT_VERSION:
        raise StateError(f"state stream format version {version} is older than supported {MIN_FORMAT_VERSION}")
    if len(buf) < DIGEST_SIZE + 1:
        raise StateError("state stream truncated (no checksum)")
    body, digest = buf[:-DIGEST_SIZE], bytes(buf[-DIGEST_SIZE:])
    if hashlib.sha256(body).digest() != digest:
        raise StateError("state stream checksum mismatch (corrupted or truncated)")
    pos = len(MAGIC) + 4
    _need(buf, pos, 2, "machine type")
    (nlen,) = struct.unpack_from(">H", buf, pos)
    pos += 2
    _need(buf, pos, nlen + 8, "machine type")
    machine_type = bytes(buf[pos:pos + nlen]).decode("ascii", "replace")
    pos += nlen
    (ram_size,) = struct.unpack_from(">Q", buf, pos)
    pos += 8
    if expect_machine is not None and machine_type != expect_machine:
        raise StateError(f"state stream is for machine {machine_type!r}, this machine is {expect_machine!r}")
    if expect_ram_size is not None and ram_size != expect_ram_size:
        raise StateError(f"state stream has {ram_size >> 20} MiB of RAM, this machine {expect_ram_size >> 20} MiB")
    parsed = ParsedStream(machine_type, ram_size, version)
    end = len(body)
    index = 0
    while True:
        _need(body, pos, 1, "section kind")
        kind = body[pos]
        pos += 1
        if kind == KIND_END:
            if pos != end:
                raise StateError(f"state stream has {end - pos} bytes after its end marker")
            return parsed
        if kind not in (KIND_DEVICE, KIND_RAM):
            raise StateError(f"state stream section {index}: unknown kind {kind}")
        if index >= MAX_SECTIONS:
            raise StateError(f"state stream has more than {MAX_SECTIONS} sections")
        _need(body, pos, 2, f"section {index} header")
        (nlen,) = struct.unpack_from(">H", body, pos)
        pos += 2
        _need(body, pos, nlen + 16, f"section {index} header")
        section_id = bytes(body[pos:pos + nlen]).decode("ascii", "replace")
        pos += nlen
        instance, sversion, length = struct.unpack_from(">IIQ", body, pos)
        pos += 16
        _need(body, pos, length + 8, f"section {section_id!r}")
        payload = body[pos:pos + length]
        pos += length
        footer, footer_index = struct.unpack_from(">II", body, pos)
        pos += 8
        if footer != FOOTER or footer_index != index:
            raise StateError(f"section {section_id!r}: bad footer (length field wrong or data misplaced)")
        if kind == KIND_RAM:
            if parsed.ram_pages is not None:
                raise StateError("state stream has two RAM sections")
            parsed.ram_pages = _parse_ram(payload, ram_size)
        else:
            key = (section_id, instance)
            if key in parsed.devices:
                raise StateError(f"section {section_id!r} instance {instance} appears twice")
            parsed.devices[key] = (sversion, bytes(payload))
        index += 1


def _parse_ram(payload, ram_size):
    _need(payload, 0, 8, "RAM section")
    page_size, count = struct.unpack_from(">II", payload, 0)
    if page_size != PAGE_SIZE:
        raise StateError(f"RAM section: page size {page_size}, expected {PAGE_SIZE}")
    npages = ram_size // PAGE_SIZE
    if count > npages:
        raise StateError(f"RAM section: {count} pages for a RAM of {npages}")
    pages = np.empty(count, dtype=np.int64)
    zero = np.zeros(count, dtype=bool)
    data = np.zeros((count, PAGE_SIZE), dtype=np.uint8)
    raw = np.frombuffer(payload, dtype=np.uint8)
    pos = 8
    for i in range(count):
        _need(payload, pos, 5, "RAM page header")
        page, enc = struct.unpack_from(">IB", payload, pos)
        pos += 5
        if page >= npages:
            raise StateError(f"RAM section: page {page} beyond RAM ({npages} pages)")
        if enc == 0:
            zero[i] = True
        elif enc == 1:
            _need(payload, pos, PAGE_SIZE, f"RAM page {page}")
            data[i] = raw[pos:pos + PAGE_SIZE]
            pos += PAGE_SIZE
        else:
            raise StateError(f"RAM section: page {page} has unknown encoding {enc}")
        pages[i] = page
    if pos != len(payload):
        raise StateError(f"RAM section: {len(payload) - pos} trailing bytes")
    if len(np.unique(pages)) != count:
        raise StateError("RAM section: a page appears twice")
    return pages, data, zero

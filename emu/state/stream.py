"""The machine state stream: snapshots, migration and checkpoints all use this one format.

Layout (all integers big-endian; the full description is ``docs/state-format.md``)::

    header   magic "EMUCOLO\\0" | format version u32 | machine type (u16 len, bytes) | RAM size u64
    section  kind u8 (1 device state, 2 RAM pages) | id (u16 len, bytes) | instance u32 |
             version u32 | payload length u64 | payload | footer u32 0x454e4421 ("END!") |
             section index u32
    ...
    end      kind u8 0xff | XXH3-128 over every byte before it (16 bytes, big-endian)

A RAM payload is: page size u32 | page count N u32 | N page numbers u32 | N encodings u8
(0 zero page, 1 data) | the 4 KiB of every data page, in list order.  Zero pages cost five
bytes, and both directions are whole-array operations.

Reading is two steps: :func:`parse` checks the whole stream (magic, version, checksum,
every length and footer) without touching anything, and only then does the machine apply
the result.  A stream is hostile until proven otherwise.
"""

import os
import struct

import numpy as np
import xxhash

from emu.cpu import _emuc
from emu.errors import StateError

MAGIC = b"EMUCOLO\0"
FORMAT_VERSION = 1
MIN_FORMAT_VERSION = 1
FOOTER = 0x454E4421
KIND_DEVICE = 1
KIND_RAM = 2
KIND_END = 0xFF
PAGE_SIZE = 4096
DIGEST_SIZE = 16
MAX_SECTIONS = 4096



NAME_SHOWN = 48  # characters of a name from a stream that an error message shows


def printable_name(raw):
    """A name read from a stream, safe to print in one line: non-printable bytes escaped,
    long names cut (a mutated name must not fill the screen)."""
    text = raw.decode("ascii", "backslashreplace")
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= NAME_SHOWN else f"{text[:NAME_SHOWN]}...({len(raw)} bytes)"

#: Below this many pages (a checkpoint's dirty pages, which are backed anyway) reading them
#: costs less than reading their range of /proc/self/pagemap.
PAGEMAP_MIN_PAGES = 1024
#: Up to this many pages, pagemap is read entry by entry instead of over their whole range.
PAGEMAP_SINGLE_READS = 64


def nonzero_pages(ram_buf, pages, anonymous=False):
    """Boolean mask: which of ``pages`` of ``ram_buf`` hold a non-zero byte (C, early exit).
    ``anonymous``: ``ram_buf`` is an anonymous mapping (guest RAM), so a page the host never
    backed is zero without being read (see :func:`backed_pages`)."""
    pages = np.ascontiguousarray(pages, dtype=np.int64)
    if anonymous and len(pages) >= PAGEMAP_MIN_PAGES:
        backed = backed_pages(ram_buf, pages)
        if not backed.all():
            mask = np.zeros(len(pages), dtype=bool)
            mask[backed] = nonzero_pages(ram_buf, pages[backed])
            return mask
    mask = np.zeros(len(pages), dtype=np.uint8)
    _emuc.lib.mark_nonzero_pages(_emuc.ffi.cast("uint8_t *", ram_buf.ctypes.data),
                                 _emuc.ffi.cast("int64_t *", pages.ctypes.data), len(pages),
                                 _emuc.ffi.cast("uint8_t *", mask.ctypes.data))
    return mask.astype(bool)


def backed_pages(ram_buf, pages):
    """Which of ``pages`` of ``ram_buf`` the host kernel backs (present, or swapped out, in
    /proc/self/pagemap).  A page of an anonymous mapping it does not back was never touched
    and reads as zero: knowing it without reading spares a page fault per page (0.4 s for
    256 MiB of a fresh machine).  Where pagemap cannot be read, every page counts as backed."""
    if not len(pages):
        return np.zeros(0, dtype=bool)
    first, last = int(pages.min()), int(pages.max())
    base = ram_buf.ctypes.data >> 12
    few = len(pages) <= PAGEMAP_SINGLE_READS  # one read per page, not their whole range
    count = len(pages) if few else last - first + 1
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY)
        try:
            if few:
                raw = b"".join(os.pread(fd, 8, 8 * (base + int(page))) for page in pages)
            else:
                raw = os.pread(fd, 8 * count, 8 * (base + first))
        finally:
            os.close(fd)
    except OSError:
        raw = b""
    if len(raw) != 8 * count:
        return np.ones(len(pages), dtype=bool)
    entries = np.frombuffer(raw, dtype=np.uint64)
    if not few:
        entries = entries[pages - first]
    return (entries >> np.uint64(62)) != 0  # bit 63 present, bit 62 swapped


def zero_where_not_zero(ram_buf, pages):
    """Make ``pages`` of ``ram_buf`` (an anonymous mapping) zero, writing only those that are
    not: touching untouched host memory would make the kernel allocate it, and reading it
    costs a page fault."""
    pages = pages[backed_pages(ram_buf, np.ascontiguousarray(pages, dtype=np.int64))]
    ram_buf.reshape(-1, PAGE_SIZE)[pages[nonzero_pages(ram_buf, pages)]] = 0


class StreamWriter:
    """Builds one stream in memory (so that its size is known before anything is sent).

    Parts are kept as a list and joined once; the checksum is computed as they come."""

    def __init__(self, machine_type, ram_size):
        self.parts = []
        self.hash = xxhash.xxh3_128()
        self.sections = 0
        self.ram_size = ram_size
        name = machine_type.encode()
        self._add(MAGIC + struct.pack(">IH", FORMAT_VERSION, len(name)) + name + struct.pack(">Q", ram_size))

    def _add(self, data):
        self.parts.append(data)
        self.hash.update(data)

    def _section(self, kind, section_id, instance, version, payload_parts):
        name = section_id.encode()
        length = sum(len(p) for p in payload_parts)
        self._add(struct.pack(">BH", kind, len(name)) + name + struct.pack(">IIQ", instance, version, length))
        for part in payload_parts:
            self._add(part)
        self._add(struct.pack(">II", FOOTER, self.sections))
        self.sections += 1

    def device(self, section_id, instance, version, payload):
        self._section(KIND_DEVICE, section_id, instance, version, [payload])

    def ram(self, ram_buf, pages):
        """Pages of ``ram_buf`` (guest RAM as a numpy uint8 array over its anonymous mapping);
        all-zero pages are stored as a flag."""
        pages = np.ascontiguousarray(pages, dtype=np.int64)
        npages = len(ram_buf) // PAGE_SIZE
        if len(pages) and (pages.min() < 0 or pages.max() >= npages):
            raise StateError("RAM section: page number outside RAM")
        nonzero = nonzero_pages(ram_buf, pages, anonymous=True)
        view = ram_buf.reshape(-1, PAGE_SIZE)
        data_pages = pages[nonzero]
        if len(data_pages) == npages and (data_pages == np.arange(npages)).all():
            data = memoryview(ram_buf)  # every page, in order: no copy
        else:
            data = memoryview(view[data_pages].reshape(-1))
        self._section(KIND_RAM, "ram", 0, 1, [struct.pack(">II", PAGE_SIZE, len(pages)),
                                              pages.astype(">u4").tobytes(), nonzero.astype(np.uint8).tobytes(),
                                              data])

    def finish(self, out=None):
        """The stream as bytes, or, with ``out`` (a binary file), written there part by
        part without joining (returns the size)."""
        self._add(bytes([KIND_END]))
        self.parts.append(self.hash.digest())
        if out is None:
            return b"".join(self.parts)
        for part in self.parts:
            out.write(part)
        return sum(len(p) for p in self.parts)


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


def parse(data, expect_machine=None, expect_ram_size=None, verify_checksum=True):
    """Check a whole stream and split it into sections; touches nothing.

    ``verify_checksum=False`` skips the checksum comparison alone (every other check
    stays), for a caller that has verified a digest over these very bytes."""
    body, pos, parsed = _parse_header(memoryview(data).cast("B"), expect_machine, expect_ram_size,
                                      verify_checksum)
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
        pos = _parse_section(body, pos, kind, index, parsed)
        index += 1


def _parse_header(buf, expect_machine, expect_ram_size, verify_checksum):
    """Magic, format version and checksum of the whole stream, then machine type and RAM size:
    (the body without the checksum, the offset of the first section, an empty ParsedStream)."""
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
    if verify_checksum and xxhash.xxh3_128(body).digest() != digest:
        raise StateError("state stream checksum mismatch (corrupted or truncated)")
    pos = len(MAGIC) + 4
    # bounds against the body: the checksum after it is not part of the header
    _need(body, pos, 2, "machine type")
    (nlen,) = struct.unpack_from(">H", body, pos)
    pos += 2
    _need(body, pos, nlen + 8, "machine type")
    machine_type = printable_name(bytes(body[pos:pos + nlen]))
    pos += nlen
    (ram_size,) = struct.unpack_from(">Q", body, pos)
    pos += 8
    if expect_machine is not None and machine_type != expect_machine:
        raise StateError(f"state stream is for machine {machine_type!r}, this machine is {expect_machine!r}")
    if expect_ram_size is not None and ram_size != expect_ram_size:
        raise StateError(f"state stream has {ram_size >> 20} MiB of RAM, this machine {expect_ram_size >> 20} MiB")
    return body, pos, ParsedStream(machine_type, ram_size, version)


def _parse_section(body, pos, kind, index, parsed):
    """One section after its kind byte (name, instance, version, length, payload, footer)
    into ``parsed``; returns the offset after it."""
    _need(body, pos, 2, f"section {index} header")
    (nlen,) = struct.unpack_from(">H", body, pos)
    pos += 2
    _need(body, pos, nlen + 16, f"section {index} header")
    section_id = printable_name(bytes(body[pos:pos + nlen]))
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
        parsed.ram_pages = _parse_ram(payload, parsed.ram_size)
    else:
        key = (section_id, instance)
        if key in parsed.devices:
            raise StateError(f"section {section_id!r} instance {instance} appears twice")
        parsed.devices[key] = (sversion, bytes(payload))
    return pos


def _parse_ram(payload, ram_size):
    _need(payload, 0, 8, "RAM section")
    page_size, count = struct.unpack_from(">II", payload, 0)
    if page_size != PAGE_SIZE:
        raise StateError(f"RAM section: page size {page_size}, expected {PAGE_SIZE}")
    npages = ram_size // PAGE_SIZE
    if count > npages:
        raise StateError(f"RAM section: {count} pages for a RAM of {npages}")
    _need(payload, 8, 5 * count, "RAM page list")
    raw = np.frombuffer(payload, dtype=np.uint8)
    pages = np.frombuffer(payload, dtype=">u4", count=count, offset=8).astype(np.int64)
    enc = raw[8 + 4 * count:8 + 5 * count]
    if count and pages.max() >= npages:
        raise StateError(f"RAM section: page {int(pages.max())} beyond RAM ({npages} pages)")
    if (enc > 1).any():
        raise StateError(f"RAM section: unknown page encoding {int(enc.max())}")
    if len(np.unique(pages)) != count:
        raise StateError("RAM section: a page appears twice")
    nonzero = enc == 1
    data_start = 8 + 5 * count
    expected = data_start + int(nonzero.sum()) * PAGE_SIZE
    if len(payload) != expected:
        raise StateError(f"RAM section: {len(payload)} bytes, the page list says {expected}")
    return RamPages(pages, nonzero, raw[data_start:].reshape(-1, PAGE_SIZE))


class RamPages:
    """The pages of a RAM section: page numbers, which carry data, and that data (a view)."""

    def __init__(self, pages, nonzero, data):
        self.pages, self.nonzero, self.data = pages, nonzero, data

    def write_into(self, ram_buf):
        view = ram_buf.reshape(-1, PAGE_SIZE)
        if len(self.pages) == len(view) and self.nonzero.all() and (self.pages == np.arange(len(view))).all():
            view[:] = self.data
        else:
            view[self.pages[self.nonzero]] = self.data
            zero_where_not_zero(ram_buf, self.pages[~self.nonzero])

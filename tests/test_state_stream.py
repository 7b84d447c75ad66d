"""Hostile state streams (docs/state-format.md): every malformed stream is refused.

The streams are real: machine ``pc`` runs longmode.elf in deterministic mode and is saved
mid-run, once with all of RAM and once with device state only.  Each corruption must make
``load_state`` raise :class:`StateError` with a message that names the problem, leave the
machine's state digest as it was, and leave the machine running on exactly like a twin that
never saw the stream (same serial output, same digest).

The format helpers below are a second, independent reader and writer written from the
document; they re-checksum a corrupted stream so that the checks behind the checksum are
reached.
"""

import dataclasses
import re
import struct

import pytest
import xxhash
from conftest import firmware, run_emu

from emu.cpu.state import VMSTATE as CPU_VMSTATE
from emu.errors import StateError
from emu.state.machinestate import CLOCK_VMSTATE, state_objects
from emu.state.vmstate import U8, U16, VMStateDescription
from machines import pc

RAM_SIZE = 4 << 20
NPAGES = RAM_SIZE // 4096
GUEST = "longmode.elf"
SAVE_AT_NS = 7_000_000  # the 8254 and the LAPIC timer are both armed, four lines printed
TARGET_AT_NS = 2_000_000  # where the machine under test starts: a loaded stream would move it
STEP_NS = 400_000

# ---------------------------------------------------------------- the format, from the doc

MAGIC = b"EMUCOLO\0"
FOOTER = 0x454E4421
KIND_DEVICE, KIND_RAM, KIND_END = 1, 2, 0xFF
DIGEST = 16


def seal(body):
    """Append the checksum: XXH3-128 (seed 0) of every byte before it, canonical big-endian."""
    return bytes(body) + xxhash.xxh3_128(bytes(body)).digest()


@dataclasses.dataclass
class Section:
    kind: int
    sid: str
    instance: int
    version: int
    payload: bytes
    offset: int = 0  # where the section starts in the stream it was read from
    payload_offset: int = 0


@dataclasses.dataclass
class Stream:
    format_version: int
    machine: str
    ram_size: int
    sections: list
    header_size: int = 0
    end_offset: int = 0  # offset of the end marker

    def section(self, sid):
        return next(s for s in self.sections if s.sid == sid)

    def index(self, sid):
        return next(i for i, s in enumerate(self.sections) if s.sid == sid)


def split(data):
    assert data[:8] == MAGIC
    assert xxhash.xxh3_128(data[:-DIGEST]).digest() == data[-DIGEST:]
    version, nlen = struct.unpack_from(">IH", data, 8)
    pos = 14 + nlen
    (ram_size,) = struct.unpack_from(">Q", data, pos)
    pos += 8
    stream = Stream(version, data[14:14 + nlen].decode(), ram_size, [], header_size=pos)
    while data[pos] != KIND_END:
        start = pos
        kind, nlen = struct.unpack_from(">BH", data, pos)
        sid = data[pos + 3:pos + 3 + nlen].decode()
        pos += 3 + nlen
        instance, sversion, length = struct.unpack_from(">IIQ", data, pos)
        pos += 16
        stream.sections.append(Section(kind, sid, instance, sversion, data[pos:pos + length], start, pos))
        pos += length
        assert struct.unpack_from(">II", data, pos) == (FOOTER, len(stream.sections) - 1)
        pos += 8
    stream.end_offset = pos
    assert pos + 1 + DIGEST == len(data)
    return stream


def header_bytes(format_version=1, machine="pc", ram_size=RAM_SIZE, magic=MAGIC):
    name = machine.encode()
    return magic + struct.pack(">IH", format_version, len(name)) + name + struct.pack(">Q", ram_size)


def section_bytes(section, index, length=None, footer=FOOTER, footer_index=None):
    name = section.sid.encode()
    length = len(section.payload) if length is None else length
    return (struct.pack(">BH", section.kind, len(name)) + name
            + struct.pack(">IIQ", section.instance, section.version, length) + section.payload
            + struct.pack(">II", footer, index if footer_index is None else footer_index))


def build(stream, sections=None, header=None, end=b"\xff"):
    """A sealed stream; ``sections`` holds Section objects (numbered in order) or raw bytes."""
    sections = stream.sections if sections is None else sections
    if header is None:
        header = header_bytes(stream.format_version, stream.machine, stream.ram_size)
    parts = [s if isinstance(s, bytes) else section_bytes(s, i) for i, s in enumerate(sections)]
    return seal(header + b"".join(parts) + end)


def replace(stream, sid, **changes):
    """The stream's sections with the one named ``sid`` changed (Section attributes)."""
    return [dataclasses.replace(s, **changes) if s.sid == sid else s for s in stream.sections]


# device payloads ----------------------------------------------------------------------

INT_FORMATS = {"u8": ">B", "u16": ">H", "u32": ">I", "u64": ">Q", "i64": ">q", "timer": ">q"}


def encode_field(schema, value):
    kind = schema["kind"]
    if kind in INT_FORMATS:
        return struct.pack(INT_FORMATS[kind], value)
    if kind == "bool":
        return bytes([value])
    if kind == "bytes":
        return bytes(value)
    if kind == "varbytes":
        return struct.pack(">I", len(value)) + bytes(value)
    if kind == "array":
        return b"".join(struct.pack(INT_FORMATS[schema["element"]], v) for v in value)
    raise AssertionError(f"unknown field kind {kind}")


def encode_values(description, decoded):
    """Payload bytes for ``decoded`` (the shape VMStateDescription.decode returns)."""
    out = bytearray()
    for field in description.fields:
        if field.name in decoded["fields"]:
            out += encode_field(field.schema(), decoded["fields"][field.name])
    known = {s.description.name: s.description for s in description.subsections}
    out.append(len(decoded["subsections"]))
    for name, (version, values) in decoded["subsections"].items():
        body = encode_values(known[name], values)
        out += bytes([len(name)]) + name.encode() + struct.pack(">II", version, len(body)) + body
    return bytes(out)


def descriptions(machine):
    """Section id -> state description, for a built machine."""
    return {"cpu": CPU_VMSTATE, "clock": CLOCK_VMSTATE, **{n: o.VMSTATE for n, o in state_objects(machine)}}


# RAM payloads --------------------------------------------------------------------------

def ram_payload(pages, encodings, data, page_size=4096):
    return (struct.pack(">II", page_size, len(pages)) + b"".join(struct.pack(">I", p) for p in pages)
            + bytes(encodings) + data)


# ---------------------------------------------------------------- machines

def build_machine(out_path, kernel=GUEST):
    return pc.build(ram_size=RAM_SIZE, kernel=firmware(kernel), serial=[f"file:{out_path}"], icount_shift=0,
                    no_reboot=True)


@dataclasses.dataclass
class Source:
    full: bytes  # saved at SAVE_AT_NS with every RAM page
    devices: bytes  # the same moment, device state only
    digest: bytes  # state_digest() at the save
    output_after_save: bytes  # what the guest printed from the save to its exit
    final_digest: str
    exit_status: int
    descriptions: dict


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    out = tmp_path_factory.mktemp("source") / "com1"
    machine = build_machine(out)
    assert machine.run(until_ns=SAVE_AT_NS) is None
    printed = len(out.read_bytes())
    full, devices = machine.save_state(ram_pages="all"), machine.save_state()
    digest = machine.state_digest()
    status = machine.run()
    machine.close()
    return Source(full, devices, digest, out.read_bytes()[printed:], machine.state_digest(), status,
                  descriptions(machine))


class Twins:
    """The machine under test and a twin that never sees a stream, run in lock-step."""

    def __init__(self, directory):
        self.dir = directory
        self.generation = 0
        self.machine = self.twin = None
        self.start()

    def start(self):
        for m in (self.machine, self.twin):
            if m is not None:
                m.close()
        self.generation += 1
        self.out, self.twin_out = (self.dir / f"{name}{self.generation}" for name in ("target", "twin"))
        self.machine, self.twin = build_machine(self.out), build_machine(self.twin_out)
        for m in (self.machine, self.twin):
            assert m.run(until_ns=TARGET_AT_NS) is None

    def refuse(self, data, pattern):
        """Load ``data``: it must raise StateError matching ``pattern`` and change nothing."""
        before = self.machine.state_digest()
        try:
            with pytest.raises(StateError, match=pattern) as info:
                self.machine.load_state(data)
            assert self.machine.state_digest() == before, "a refused stream changed the machine"
        except BaseException:
            self.start()
            raise
        return str(info.value)

    def step(self):
        """Run both a little further: same output, same state; start over once the guest exited."""
        try:
            until = self.machine.clock.now() + STEP_NS
            status, twin_status = self.machine.run(until_ns=until), self.twin.run(until_ns=until)
            assert status == twin_status
            assert self.out.read_bytes() == self.twin_out.read_bytes()
            assert self.machine.state_digest() == self.twin.state_digest()
        except BaseException:
            self.start()
            raise
        if status is not None:
            self.start()


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    twins = Twins(tmp_path_factory.mktemp("twins"))
    yield twins
    twins.machine.close()
    twins.twin.close()


def _stream(source, which):
    return source.full if which == "full" else source.devices


# ---------------------------------------------------------------- the streams are sound

@pytest.mark.parametrize("which", ["full", "devices"])
def test_independent_reader_and_writer_agree_with_the_stream(source, which):
    data = _stream(source, which)
    stream = split(data)
    assert build(stream) == data
    assert [s.sid for s in stream.sections][:2] == ["cpu", "clock"]
    assert (stream.sections[-1].kind == KIND_RAM) == (which == "full")
    for section in stream.sections:
        if section.kind == KIND_DEVICE:
            description = source.descriptions[section.sid]
            assert section.version == description.version_id
            assert encode_values(description, description.decode(section.payload, section.version)) == section.payload


def test_xxh3_digest_bytes_are_the_big_endian_128_bit_value():
    h = xxhash.xxh3_128(b"abc")
    assert h.digest() == h.intdigest().to_bytes(16, "big")
    assert h.hexdigest() == "06b05ab6733a618578af5f94892f3950"
    assert xxhash.xxh3_128(b"").hexdigest() == "99aa06d3014798d86001c324468d497f"


def test_valid_streams_load_and_continue_like_their_source(source, tmp_path):
    machine = build_machine(tmp_path / "com1")
    machine.load_state(source.full)
    assert machine.state_digest() == source.digest
    machine.load_state(source.devices)  # device state only: RAM stays
    assert machine.state_digest() == source.digest
    assert machine.run() == source.exit_status == 1
    machine.close()
    assert (tmp_path / "com1").read_bytes() == source.output_after_save
    assert b"ALL PASS" in source.output_after_save
    assert machine.state_digest() == source.final_digest


# ---------------------------------------------------------------- truncation and flipped bytes

def test_a_load_into_a_fresh_machine_leaves_its_zero_pages_unallocated(source, tmp_path):
    """Zero pages of the stream are neither read nor written where the host never backed them
    (a page fault each: 0.4 s for 256 MiB), and a page the machine had written is zeroed."""
    import numpy as np

    from emu.state.stream import backed_pages
    machine = build_machine(tmp_path / "com1")
    pages = np.arange(machine.ram.npages, dtype=np.int64)
    last = machine.ram.npages - 1
    machine.ram.write(last * 4096, b"\x55" * 4096)       # beyond what the guest uses: zero in the stream
    before = int(backed_pages(machine.ram.buf, pages).sum())
    machine.load_state(source.full)
    after = backed_pages(machine.ram.buf, pages)  # before anything reads the whole of RAM
    assert after[last] and int(after.sum()) < before + 64, (before, int(after.sum()), len(pages))
    assert machine.ram.read(last * 4096, 4096) == bytes(4096)
    assert machine.state_digest() == source.digest
    machine.close()


def _cut_points(stream, data):
    """(name, offset) pairs: inside the header, a section header, payloads, RAM, checksum."""
    cpu, clock, last = stream.section("cpu"), stream.section("clock"), stream.sections[-1]
    points = [
        ("magic", 3), ("format version", 10), ("machine type length", 13), ("machine type", 15),
        ("RAM size", stream.header_size - 3), ("section kind", cpu.offset),
        ("section id", cpu.offset + 4), ("section length", cpu.payload_offset - 2),
        ("cpu payload", cpu.payload_offset + 100), ("clock footer", clock.payload_offset + len(clock.payload) + 5),
        ("last section payload", last.payload_offset + len(last.payload) // 2),
        ("end marker", stream.end_offset), ("checksum", len(data) - 9), ("checksum last byte", len(data) - 1),
    ]
    if last.kind == KIND_RAM:
        points += [("RAM page list", last.payload_offset + 8 + 400),
                   ("RAM encodings", last.payload_offset + 8 + 4 * NPAGES + 3),
                   ("RAM page data", last.payload_offset + len(last.payload) - 5000)]
    return points


def _raw_truncation_message(offset):
    if offset < 12:
        return r"truncated in header"
    if offset < 17:
        return r"truncated \(no checksum\)"
    return r"checksum mismatch"


@pytest.mark.parametrize("which", ["full", "devices"])
def test_truncated_streams(source, twins, which):
    data = _stream(source, which)
    points = _cut_points(split(data), data)
    assert len(points) >= 14
    for name, offset in points:
        message = twins.refuse(data[:offset], _raw_truncation_message(offset))
        assert "state stream" in message, name
    twins.step()


def _sealed_truncation_message(stream, offset):
    """What a body cut at ``offset`` and re-checksummed is refused with."""
    if offset < stream.header_size:
        return r"truncated in (header|machine type)"
    for index, section in enumerate(stream.sections):
        if offset < section.payload_offset:
            return rf"truncated in section ({index} header|kind)"
        if offset < section.payload_offset + len(section.payload) + 8:
            return rf"truncated in section '{section.sid}'"
    return r"truncated in section kind"


@pytest.mark.parametrize("which", ["full", "devices"])
def test_truncated_and_rechecksummed_streams(source, twins, which):
    """Cut the body, re-seal it: the structural checks must still see the cut."""
    data = _stream(source, which)
    stream = split(data)
    for name, offset in _cut_points(stream, data):
        if 12 <= offset <= stream.end_offset:
            message = twins.refuse(seal(data[:offset]), _sealed_truncation_message(stream, offset))
            assert "truncated" in message, name
    twins.step()


@pytest.mark.parametrize("which", ["full", "devices"])
def test_flipped_bytes(source, twins, which):
    data = _stream(source, which)
    twins.refuse(_flip(data, 0), r"not an emu-colo state stream")
    twins.refuse(_flip(data, 8), r"format version \d+ is newer than supported 1")
    for name, offset in _cut_points(split(data), data):
        if offset >= 12:
            assert twins.refuse(_flip(data, offset), r"checksum mismatch \(corrupted or truncated\)"), name
    twins.step()


def _flip(data, offset, mask=0x40):
    return data[:offset] + bytes([data[offset] ^ mask]) + data[offset + 1:]


# ---------------------------------------------------------------- re-checksummed corruptions

def _with_fields(source, stream, sid, subsection=None, **values):
    """The stream's sections with fields of section ``sid`` (or of one of its subsections) changed."""
    section = stream.section(sid)
    description = source.descriptions[sid]
    decoded = description.decode(section.payload, section.version)
    target = decoded["subsections"][subsection][1] if subsection else decoded
    for name, value in values.items():
        assert name in target["fields"], name
        target["fields"][name] = value
    return replace(stream, sid, payload=encode_values(description, decoded))


def _with_list_item(source, stream, sid, name, index, value):
    decoded = source.descriptions[sid].decode(stream.section(sid).payload, stream.section(sid).version)
    items = list(decoded["fields"][name])
    items[index] = value
    return _with_fields(source, stream, sid, **{name: items})


def _rename_subsection(stream, sid, old, new):
    payload = stream.section(sid).payload
    assert payload.count(old.encode()) == 1
    return replace(stream, sid, payload=payload.replace(bytes([len(old)]) + old.encode(),
                                                        bytes([len(new)]) + new.encode()))


def _duplicate_subsection(stream, sid):
    payload = stream.section(sid).payload
    count_at = payload.index(b"\x0afw_cfg/dma") - 1
    assert payload[count_at] == 1
    sub = payload[count_at + 1:]
    return replace(stream, sid, payload=payload[:count_at] + b"\x02" + sub + sub)


def _subsection_version(stream, sid, version):
    payload = stream.section(sid).payload
    at = payload.index(b"\x0afw_cfg/dma") + 11
    return replace(stream, sid, payload=payload[:at] + struct.pack(">I", version) + payload[at + 4:])


def _sections_with_raw(stream, index, make_raw):
    """Sections where the one at ``index`` is given as raw bytes by ``make_raw(section, index)``."""
    return [make_raw(s, i) if i == index else s for i, s in enumerate(stream.sections)]


def _swap(stream, a, b):
    """Swap two sections whole, each keeping its own footer (index) as a byte splice would."""
    i, j = stream.index(a), stream.index(b)
    raw = [section_bytes(s, k) for k, s in enumerate(stream.sections)]
    raw[i], raw[j] = raw[j], raw[i]
    return raw


def _extra_section(stream, section, at):
    sections = list(stream.sections)
    sections.insert(at, section)
    return sections


def _pit_bytes(stream):
    return stream.section("pit@0x40").payload


def _device_cases():
    """(name, make(source, stream) -> bytes, pattern): corruptions that apply to both streams."""
    pit = "pit@0x40"
    return [
        ("bad magic", lambda src, st: build(st, header=header_bytes(magic=b"EMUCOLO\x01")),
         r"not an emu-colo state stream"),
        ("newer format version", lambda src, st: build(st, header=header_bytes(format_version=2)),
         r"format version 2 is newer than supported 1"),
        ("older format version", lambda src, st: build(st, header=header_bytes(format_version=0)),
         r"format version 0 is older than supported 1"),
        ("wrong machine type", lambda src, st: build(st, header=header_bytes(machine="q35")),
         r"stream is for machine 'q35', this machine is 'pc'"),
        ("empty machine type", lambda src, st: build(st, header=header_bytes(machine="")),
         r"stream is for machine '', this machine is 'pc'"),
        ("wrong RAM size", lambda src, st: build(st, header=header_bytes(ram_size=8 << 20)),
         r"stream has 8 MiB of RAM, this machine 4 MiB"),
        ("section length too large", lambda src, st: build(st, _sections_with_raw(
            st, st.index(pit), lambda s, i: section_bytes(s, i, length=len(s.payload) + 1))),
         r"section 'pit@0x40': bad footer"),
        ("section length too small", lambda src, st: build(st, _sections_with_raw(
            st, st.index(pit), lambda s, i: section_bytes(s, i, length=len(s.payload) - 1))),
         r"section 'pit@0x40': bad footer"),
        ("section length huge", lambda src, st: build(st, _sections_with_raw(
            st, st.index(pit), lambda s, i: section_bytes(s, i, length=1 << 63))),
         r"truncated in section 'pit@0x40'"),
        ("last section length too large", lambda src, st: build(st, _sections_with_raw(
            st, len(st.sections) - 1, lambda s, i: section_bytes(s, i, length=len(s.payload) + 1))),
         r"bad footer"),
        ("section id longer than the rest", lambda src, st: build(st, st.sections[:3] + [b"\x01\xff\xffpit"]),
         r"truncated in section 3 header"),
        ("bad footer magic", lambda src, st: build(st, _sections_with_raw(
            st, 1, lambda s, i: section_bytes(s, i, footer=FOOTER ^ 1))),
         r"section 'clock': bad footer"),
        ("wrong footer index", lambda src, st: build(st, _sections_with_raw(
            st, 1, lambda s, i: section_bytes(s, i, footer_index=7))),
         r"section 'clock': bad footer"),
        ("section duplicated", lambda src, st: build(st, _extra_section(st, st.section(pit), st.index(pit))),
         r"section 'pit@0x40' instance 0 appears twice"),
        ("sections reordered", lambda src, st: build(st, _swap(st, "pic@0x20", pit)),
         r"section 'pit@0x40': bad footer"),
        ("unknown section id", lambda src, st: build(st, _extra_section(
            st, Section(KIND_DEVICE, "floppy@0x3f0", 0, 1, b"\x00"), 5)),
         r"state stream has unknown sections: floppy@0x3f0#0"),
        ("unknown section instance", lambda src, st: build(st, _extra_section(
            st, dataclasses.replace(st.section(pit), instance=1), 5)),
         r"state stream has unknown sections: pit@0x40#1"),
        ("mangled section name", lambda src, st: build(st, [dataclasses.replace(x, sid=x.sid + "\x01" * 300)
                                                                if x.sid == "rtc@0x70" else x for x in st.sections]),
         r"state stream has unknown sections: rtc@0x70(\\x01){10}\.\.\.\(308 bytes\)#0$"),
        ("missing device section", lambda src, st: build(st, [s for s in st.sections if s.sid != "rtc@0x70"]),
         r"state stream lacks sections: rtc@0x70$"),
        ("missing cpu and clock", lambda src, st: build(st, st.sections[2:]),
         r"state stream lacks sections: clock, cpu$"),
        ("no sections at all", lambda src, st: build(st, []),
         r"state stream lacks sections: a20, clock, cpu, debugexit@0xf4"),
        ("unknown section kind", lambda src, st: build(st, replace(st, "pic@0x20", kind=3)),
         r"state stream section 2: unknown kind 3"),
        ("bytes after the end marker", lambda src, st: build(st, end=b"\xff\x00"),
         r"state stream has 1 bytes after its end marker"),
        ("too many sections", lambda src, st: build(st, st.sections + [
            Section(KIND_DEVICE, f"x{i}", 0, 1, b"\x00") for i in range(4097)]),
         r"state stream has more than 4096 sections"),
        ("payload with trailing bytes", lambda src, st: build(st, replace(st, pit, payload=_pit_bytes(st) + b"\0")),
         r"section 'pit@0x40': i8254: 1 trailing bytes"),
        ("payload truncated in a field", lambda src, st: build(st, replace(st, pit, payload=_pit_bytes(st)[:10])),
         r"section 'pit@0x40': field read_state: truncated"),
        ("payload without subsection count", lambda src, st: build(st, replace(st, pit, payload=_pit_bytes(st)[:-1])),
         r"section 'pit@0x40': i8254: truncated before subsection count"),
        ("empty payload", lambda src, st: build(st, replace(st, "debugexit@0xf4", payload=b"")),
         r"section 'debugexit@0xf4': isa-debug-exit: truncated before subsection count"),
        ("subsection unknown", lambda src, st: build(st, _rename_subsection(st, "fw_cfg@0x510", "fw_cfg/dma",
                                                                            "fw_cfg/xyz")),
         r"section 'fw_cfg@0x510': fw_cfg: unknown subsection 'fw_cfg/xyz'"),
        ("subsection where none exist", lambda src, st: build(st, replace(
            st, "port92", payload=st.section("port92").payload[:-1] + b"\x01\x03abc" + bytes(8))),
         r"section 'port92': port92: unknown subsection 'abc'"),
        ("subsection twice", lambda src, st: build(st, _duplicate_subsection(st, "fw_cfg@0x510")),
         r"section 'fw_cfg@0x510': fw_cfg: subsection 'fw_cfg/dma' appears twice"),
        ("subsection newer", lambda src, st: build(st, _subsection_version(st, "fw_cfg@0x510", 2)),
         r"section 'fw_cfg@0x510': fw_cfg/dma: version 2 is newer than supported 1"),
        ("section version newer", lambda src, st: build(st, replace(st, "serial@0x3f8", version=2)),
         r"section 'serial@0x3f8': uart16550: version 2 is newer than supported 1"),
        ("section version older than minimum", lambda src, st: build(st, replace(st, "serial@0x3f8", version=0)),
         r"section 'serial@0x3f8': uart16550: version 0 is older than minimum 1"),
        # field values refused while decoding
        ("UART RX FIFO too long", lambda src, st: build(st, _with_fields(
            src, st, "serial@0x3f8", rx_fifo=bytes(17), rx_fifo_errors=bytes(17))),
         r"section 'serial@0x3f8': field rx_fifo: length 17 > max 16"),
        ("boolean byte not 0 or 1", lambda src, st: build(st, _with_fields(src, st, "cpu", halted=2)),
         r"section 'cpu': field halted: boolean byte 0x2 is not 0 or 1"),
        ("timer deadline negative", lambda src, st: build(st, _with_fields(src, st, pit, irq_timer=-2)),
         r"section 'pit@0x40': field irq_timer: deadline -2 is negative"),
        # field values a device's post_load refuses: device state was already being applied
        ("UART register out of range", lambda src, st: build(st, _with_fields(src, st, "serial@0x3f8", ier=0xFF)),
         r"^serial@0x3f8: field ier: 0xff has bits above 3 set$"),
        ("UART RX FIFO without LSR.DR", lambda src, st: build(st, _with_fields(
            src, st, "serial@0x3f8", rx_fifo=b"x", rx_fifo_errors=b"\0")),
         r"^serial@0x3f8: field lsr: DR is 0 with 1 characters in the RX FIFO$"),
        ("PIT mode out of range", lambda src, st: build(st, _with_list_item(src, st, pit, "mode", 1, 9)),
         r"^pit@0x40: field mode\[1\]: value 9 is not 0..7$"),
        ("RTC index beyond CMOS", lambda src, st: build(st, _with_fields(src, st, "rtc@0x70", index=0x80)),
         r"^rtc@0x70: index 0x80 is beyond the 128 CMOS bytes$"),
        ("slave 8259 vector base", lambda src, st: build(st, _with_fields(src, st, "pic@0xa0", irq_base=0x71)),
         r"^pic@0xa0: field irq_base: value 0x71 is not a multiple of 8$"),
        ("port 0x61 read-only bits", lambda src, st: build(st, _with_fields(src, st, "port61@0x61",
                                                                             control_bits=0x30)),
         r"^port61@0x61: field control_bits: value 0x30 sets read-only bits$"),
        ("fw_cfg selector", lambda src, st: build(st, _with_fields(src, st, "fw_cfg@0x510", cur_entry=0x7777)),
         r"^fw_cfg@0x510: cur_entry 0x7777 is not a valid selector$"),
        ("LAPIC reserved bits (the last section)", lambda src, st: build(st, _with_fields(
            src, st, "lapic@0xfee00000", svr=0xFFFF)),
         r"^lapic@0xfee00000: field svr: value 0xffff sets reserved bits$"),
        ("CPU reserved flag", lambda src, st: build(st, _with_fields(src, st, "cpu", rflags=0)),
         r"^cpu: field rflags: 0x0 has reserved bit 1 clear$"),
        ("CPU paging without protection", lambda src, st: build(st, _with_fields(src, st, "cpu", cr0=0x80000000)),
         r"^cpu: field cr0: 0x80000000 enables paging without protection$"),
        ("CPU selector wider than 16 bits", lambda src, st: build(st, _with_list_item(
            src, st, "cpu", "seg_ss", 0, (1 << 32) | 0x10)),
         r"^cpu: field seg_ss: selector 0x100000010 is wider than 16 bits$"),
        ("negative clock", lambda src, st: build(st, _with_fields(src, st, "clock", now_ns=-5)),
         r"^clock: field now_ns: negative time -5$"),
    ]


def _ram_cases():
    """Corruptions of the RAM section (the full stream only)."""
    def ram(st, payload):
        return build(st, replace(st, "ram", payload=payload))

    def pages_and_data(st):
        payload = st.section("ram").payload
        count = struct.unpack_from(">I", payload, 4)[0]
        pages = list(struct.unpack_from(f">{count}I", payload, 8))
        encodings = list(payload[8 + 4 * count:8 + 5 * count])
        return pages, encodings, payload[8 + 5 * count:]

    def set_page(st, index, number):
        pages, encodings, data = pages_and_data(st)
        pages[index] = number
        return ram(st, ram_payload(pages, encodings, data))

    def set_encoding(st, index, value):
        pages, encodings, data = pages_and_data(st)
        encodings[index] = value
        return ram(st, ram_payload(pages, encodings, data))

    def with_data(st, extra):
        pages, encodings, data = pages_and_data(st)
        return ram(st, ram_payload(pages, encodings, data[:len(data) + extra] if extra < 0 else data + bytes(extra)))

    def second_ram(st):
        return build(st, st.sections + [Section(KIND_RAM, "ram", 0, 1, ram_payload([], [], b""))])

    return [
        ("RAM page beyond RAM", lambda src, st: set_page(st, 5, NPAGES),
         r"RAM section: page 1024 beyond RAM \(1024 pages\)"),
        ("RAM page far beyond RAM", lambda src, st: set_page(st, 5, 0xFFFFFFFF), r"page 4294967295 beyond RAM"),
        ("duplicate RAM pages", lambda src, st: set_page(st, 5, 4), r"RAM section: a page appears twice"),
        ("unknown page encoding", lambda src, st: set_encoding(st, 7, 2), r"RAM section: unknown page encoding 2"),
        ("RAM data missing", lambda src, st: with_data(st, -1), r"RAM section: \d+ bytes, the page list says \d+"),
        ("RAM data extra", lambda src, st: with_data(st, 4096), r"RAM section: \d+ bytes, the page list says \d+"),
        ("RAM page size", lambda src, st: ram(st, struct.pack(">I", 8192) + st.section("ram").payload[4:]),
         r"RAM section: page size 8192, expected 4096"),
        ("more RAM pages than RAM", lambda src, st: ram(st, ram_payload(list(range(NPAGES + 1)), [0] * (NPAGES + 1),
                                                                         b"")),
         r"RAM section: 1025 pages for a RAM of 1024"),
        ("RAM page list truncated", lambda src, st: ram(st, st.section("ram").payload[:8 + 100]),
         r"truncated in RAM page list"),
        ("RAM section without header", lambda src, st: ram(st, b"\0\0\x10"), r"truncated in RAM section"),
        ("two RAM sections", lambda src, st: second_ram(st), r"state stream has two RAM sections"),
    ]


CASES = [("full", *case) for case in _device_cases() + _ram_cases()] + [("devices", *case) for case in _device_cases()]


@pytest.mark.parametrize("which, name, make, pattern", CASES, ids=[f"{c[0]}: {c[1]}" for c in CASES])
def test_corruption_is_refused_and_changes_nothing(source, twins, which, name, make, pattern):
    stream = split(_stream(source, which))
    data = make(source, stream)
    assert xxhash.xxh3_128(data[:-DIGEST]).digest() == data[-DIGEST:]
    twins.refuse(data, pattern)
    twins.step()


def test_reordered_sections_are_refused_even_with_consistent_indices(source, tmp_path):
    """A writer emits sections in one order (cpu, clock, then the devices as the machine
    lists them); a stream in any other order is refused, even when every footer carries
    its new position."""
    stream = split(source.full)
    machine = build_machine(tmp_path / "com1")
    before = machine.state_digest()
    with pytest.raises(StateError, match=r"sections out of order: expected 'cpu' at position 0"):
        machine.load_state(build(stream, list(reversed(stream.sections))))
    assert machine.state_digest() == before
    machine.close()


# ---------------------------------------------------------------- section versions

def _post_code_v2(calls):
    """ioport80 version 2: adds a field; version 1 streams are upgraded by post_load."""
    def post_load(device, version_id):
        calls.append(version_id)
        if version_id < 2:
            device.post_codes_seen = 1 if device.last_post_code else 0
        if device.post_codes_seen > 1000:
            raise StateError(f"{device.name}: field post_codes_seen: {device.post_codes_seen} is too many")

    return VMStateDescription("ioport80", version_id=2, minimum_version_id=1,
                              fields=[U8("last_post_code"), U16("post_codes_seen", since=2)], post_load=post_load)


def test_description_upgrades_an_older_version():
    calls = []
    description = _post_code_v2(calls)

    class Device:
        name = "post@0x80"
        last_post_code = 0
        post_codes_seen = 7

    device = Device()
    description.load(device, b"\x42\x00", 1)  # version 1: no post_codes_seen on the wire
    assert (device.last_post_code, device.post_codes_seen, calls) == (0x42, 1, [1])
    description.load(device, b"\x43\x00\x05\x00", 2)
    assert (device.last_post_code, device.post_codes_seen, calls) == (0x43, 5, [1, 2])
    with pytest.raises(StateError, match=r"ioport80: 2 trailing bytes"):
        description.load(device, b"\x43\x00\x05\x00", 1)  # a v2 payload labelled v1
    with pytest.raises(StateError, match=r"ioport80: version 3 is newer than supported 2"):
        description.load(device, b"\x43\x00\x05\x00", 3)
    with pytest.raises(StateError, match=r"ioport80: version 0 is older than minimum 1"):
        description.load(device, b"\x43\x00", 0)
    assert (device.last_post_code, device.post_codes_seen) == (0x43, 5)


def test_machine_loads_an_older_section_version_and_refuses_a_newer_one(source, tmp_path, monkeypatch):
    machine = build_machine(tmp_path / "com1")
    post = next(d for d in machine.devices if d.name == "post@0x80")
    calls = []
    monkeypatch.setattr(post, "VMSTATE", _post_code_v2(calls), raising=False)
    post.post_codes_seen = 0
    stream = split(source.full)
    assert stream.section("post@0x80").version == 1
    machine.load_state(source.full)  # version 1 section: accepted and upgraded
    assert calls == [1]
    assert post.post_codes_seen == (1 if post.last_post_code else 0)

    v2 = build(stream, replace(stream, "post@0x80", version=2, payload=bytes([0x99]) + b"\x01\x2c\x00"))
    machine.load_state(v2)
    assert (post.last_post_code, post.post_codes_seen, calls[-1]) == (0x99, 300, 2)
    saved = split(machine.save_state()).section("post@0x80")
    assert (saved.version, saved.payload) == (2, bytes([0x99]) + b"\x01\x2c\x00")

    before = machine.state_digest()
    v3 = build(stream, replace(stream, "post@0x80", version=3, payload=bytes([0x99]) + b"\x01\x2c\x00"))
    with pytest.raises(StateError, match=r"section 'post@0x80': ioport80: version 3 is newer than supported 2"):
        machine.load_state(v3)
    too_many = build(stream, replace(stream, "post@0x80", version=2, payload=b"\x01\xff\xff\x00"))
    with pytest.raises(StateError, match=r"post@0x80: field post_codes_seen: 65535 is too many"):
        machine.load_state(too_many)
    assert machine.state_digest() == before
    machine.close()

    plain = build_machine(tmp_path / "com1b")  # the stock version 1 description refuses version 2
    with pytest.raises(StateError, match=r"section 'post@0x80': ioport80: version 2 is newer than supported 1"):
        plain.load_state(v2)
    plain.close()


# ---------------------------------------------------------------- the command line

@pytest.fixture(scope="module")
def snapshot_files(source, tmp_path_factory):
    directory = tmp_path_factory.mktemp("cli")
    good, bad = directory / "good.state", directory / "flipped.state"
    good.write_bytes(source.full)
    bad.write_bytes(_flip(source.full, len(source.full) // 2))
    return good, bad


def _cli(path, memory="4M"):
    return run_emu("-m", memory, "-kernel", firmware(GUEST), "-icount", "-no-reboot", "-serial", "stdio",
                   "-loadvm", str(path))


def test_cli_loadvm_continues_the_saved_guest(source, snapshot_files):
    result = _cli(snapshot_files[0])
    assert result.returncode == source.exit_status, result.stderr
    assert result.stdout == source.output_after_save


@pytest.mark.parametrize("case", ["corrupted", "wrong RAM size", "missing"])
def test_cli_loadvm_refuses_a_bad_file_in_one_line(snapshot_files, case, tmp_path):
    good, bad = snapshot_files
    path, memory, reason = {
        "corrupted": (bad, "4M", r"state stream checksum mismatch \(corrupted or truncated\)"),
        "wrong RAM size": (good, "64M", r"state stream has 4 MiB of RAM, this machine 64 MiB"),
        "missing": (tmp_path / "nothing.state", "4M", r"cannot read '.*nothing\.state': No such file"),
    }[case]
    result = _cli(path, memory)
    assert result.returncode == 2
    assert result.stdout == b""
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert re.fullmatch(rf"emu: -loadvm: .*{reason}.*", lines[0]), lines[0]
    assert str(path.name) in lines[0]

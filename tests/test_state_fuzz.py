"""Property-based fuzzing of the state loader with real streams (hypothesis).

A machine ``pc`` running longmode.elf deterministically gives two base streams (all of RAM,
and device state only).  Each example mutates one (byte flips, byte values, integers
written over fields, insertions, deletions, truncations, whole sections dropped, duplicated,
moved or taken from the other stream) and, most of the time, re-checksums it so that the
checks behind the checksum are reached.  Loading it into the machine under test must either
raise :class:`StateError` and leave the machine exactly as it was, or succeed (the mutation
was semantically valid: then the machine must still save, and it is put back).  Nothing
else may escape and nothing may hang.

``make test`` runs a fixed (derandomized) set of 300 examples; ``make soak`` (EMU_SOAK=1)
runs 10,000 random ones.
"""

import contextlib
import dataclasses
import datetime
import os
import re
import signal

import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st
from test_state_stream import (DIGEST, SAVE_AT_NS, TARGET_AT_NS, build_machine, descriptions, header_bytes,
                               section_bytes, seal, split)

from emu.errors import StateError

SOAK = os.environ.get("EMU_SOAK") == "1"
HANG_SECONDS = 20  # one load of a 4 MiB stream takes milliseconds

COMMON = dict(deadline=datetime.timedelta(seconds=5), database=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MAKE_TEST = settings(max_examples=300, derandomize=True, **COMMON)
SOAK_RUN = settings(max_examples=10_000, derandomize=False, **COMMON)

INTERESTING = [0, 1, 2, 3, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
               1 << 32, 1 << 63, (1 << 64) - 1, 4096, 0x454E4421]


@dataclasses.dataclass(repr=False)
class World:
    machine: object
    digest: str  # the machine's state digest between examples
    home: bytes  # its own full stream, to put it back after an accepted load
    streams: dict  # "full" / "devices" -> bytes
    parsed: dict  # "full" / "devices" -> test_state_stream.Stream
    hot: dict  # "full" / "devices" -> offsets of section starts, payloads, footers
    spans: dict  # "full" / "devices" -> {part: [(offset, size) of every integer in it]}

    def __repr__(self):
        return "<World: the machine under test and its base streams>"

    def restore(self):
        self.machine.load_state(self.home)
        assert self.machine.state_digest() == self.digest


def _hot_offsets(stream):
    offsets = {12, 14, stream.header_size - 8, stream.end_offset}
    for s in stream.sections:
        offsets |= {s.offset, s.offset + 3, s.payload_offset - 16, s.payload_offset - 12, s.payload_offset - 8,
                    s.payload_offset, s.payload_offset + len(s.payload) - 1, s.payload_offset + len(s.payload),
                    s.payload_offset + len(s.payload) + 4}
    return sorted(offsets)


SIZES = {"u8": 1, "u16": 2, "u32": 4, "u64": 8, "i64": 8, "timer": 8, "bool": 1}


def _payload_spans(description, payload, base):
    """(stream offset, size) of every integer, flag, length and count in a device payload."""
    spans, pos = [], 0
    for field in description.fields:
        schema = field.schema()
        kind = schema["kind"]
        if kind in SIZES:
            spans.append((base + pos, SIZES[kind]))
            pos += SIZES[kind]
        elif kind == "array":
            size = SIZES[schema["element"]]
            spans += [(base + pos + size * k, size) for k in range(schema["count"])]
            pos += size * schema["count"]
        elif kind == "bytes":
            spans += [(base + pos + k, 1) for k in range(schema["length"])]
            pos += schema["length"]
        elif kind == "varbytes":
            spans.append((base + pos, 4))
            pos += 4 + int.from_bytes(payload[pos:pos + 4], "big")
    spans.append((base + pos, 1))  # subsection count
    known = {sub.description.name: sub.description for sub in description.subsections}
    for _ in range(payload[pos]):
        pos += 1
        nlen = payload[pos]
        name = payload[pos + 1:pos + 1 + nlen].decode()
        spans += [(base + pos, 1), (base + pos + 1 + nlen, 4), (base + pos + 5 + nlen, 4)]
        pos += 9 + nlen
        length = int.from_bytes(payload[pos - 4:pos], "big")
        spans += _payload_spans(known[name], payload[pos:pos + length], base + pos)
        pos += length - 1
    return spans


def _spans(stream, descriptions):
    """Every integer of the stream by part: the header and section framing, each payload."""
    framing = [(8, 4), (12, 2), (stream.header_size - 8, 8), (stream.end_offset, 1)]
    parts = {}
    for s in stream.sections:
        framing += [(s.offset, 1), (s.offset + 1, 2), (s.payload_offset - 16, 4), (s.payload_offset - 12, 4),
                    (s.payload_offset - 8, 8), (s.payload_offset + len(s.payload), 4),
                    (s.payload_offset + len(s.payload) + 4, 4)]
        if s.sid == "ram":
            count = int.from_bytes(s.payload[4:8], "big")
            p = s.payload_offset
            parts["ram"] = ([(p, 4), (p + 4, 4)] + [(p + 8 + 4 * k, 4) for k in range(0, count, 37)]
                            + [(p + 8 + 4 * count + k, 1) for k in range(0, count, 37)])
        else:
            parts[s.sid] = _payload_spans(descriptions[s.sid], s.payload, s.payload_offset)
    parts["framing"] = framing
    return parts


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fuzz")
    source = build_machine(directory / "source")
    source.run(until_ns=SAVE_AT_NS)
    streams = {"full": source.save_state(ram_pages="all"), "devices": source.save_state()}
    source.close()
    machine = build_machine(directory / "target")
    machine.run(until_ns=TARGET_AT_NS)
    parsed = {k: split(v) for k, v in streams.items()}
    world = World(machine, machine.state_digest(), machine.save_state(ram_pages="all"), streams, parsed,
                  {k: _hot_offsets(v) for k, v in parsed.items()},
                  {k: _spans(v, descriptions(machine)) for k, v in parsed.items()})
    yield world
    machine.close()


@st.composite
def mutated_streams(draw, world):
    which = draw(st.sampled_from(["full", "devices"]))
    base, stream = world.streams[which], world.parsed[which]
    other = world.parsed["devices" if which == "full" else "full"]
    mode = draw(st.sampled_from(["fields", "fields", "bytes", "splice"]))
    if mode == "splice":
        body = bytearray(_spliced(draw, stream, other))
    else:
        body = bytearray(base[:-DIGEST])
    if mode == "fields":  # integers of the header, the framing and the payloads, re-checksummed
        spans = world.spans[which]
        for _ in range(draw(st.integers(1, 3))):
            _edit_integer(draw, body, draw(st.sampled_from(spans[draw(st.sampled_from(sorted(spans)))])))
        return seal(body)
    for _ in range(draw(st.integers(1 if mode == "bytes" else 0, 3 if mode == "bytes" else 1))):
        _edit_bytes(draw, body, world.hot[which])
    if draw(st.integers(0, 3)):  # mostly re-checksummed, so that the structural checks are reached
        data = seal(body)
    else:
        data = bytes(body) + base[-DIGEST:]
        if draw(st.booleans()):
            data = data[:draw(st.integers(0, len(data)))]
    return data


def _spliced(draw, stream, other):
    """The body of ``stream`` with whole sections dropped, duplicated, moved or borrowed."""
    entries = [(s, i) for i, s in enumerate(stream.sections)]  # (section, index in its own stream)
    foreign = [(s, i) for i, s in enumerate(other.sections)]
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["drop", "duplicate", "move", "borrow", "swap"]))
        if not entries:
            op = "borrow"
        i = draw(st.integers(0, max(0, len(entries) - 1)))
        j = draw(st.integers(0, len(entries)))
        if op == "drop":
            entries.pop(i)
        elif op == "duplicate":
            entries.insert(j, entries[i])
        elif op == "move":
            entries.insert(j, entries.pop(i))
        elif op == "swap":
            j = min(j, len(entries) - 1)
            entries[i], entries[j] = entries[j], entries[i]
        else:
            entries.insert(j, draw(st.sampled_from(foreign)))
    renumber = draw(st.booleans())  # footers that agree with the new order reach the section checks
    header = header_bytes(stream.format_version, stream.machine, stream.ram_size)
    return (header + b"".join(section_bytes(s, k if renumber else orig) for k, (s, orig) in enumerate(entries))
            + b"\xff")


def _edit_integer(draw, body, span):
    offset, size = span
    bits = 8 * size
    value = int.from_bytes(body[offset:offset + size], "big")
    op = draw(st.sampled_from(["bit", "interesting", "any", "step"]))
    if op == "bit":
        value ^= 1 << draw(st.integers(0, bits - 1))
    elif op == "interesting":
        value = draw(st.sampled_from(INTERESTING))
    elif op == "any":
        value = draw(st.integers(0, (1 << bits) - 1))
    else:
        value += draw(st.sampled_from([-2, -1, 1, 2]))
    body[offset:offset + size] = (value % (1 << bits)).to_bytes(size, "big")


def _edit_bytes(draw, body, hot):
    if not body:
        return
    n = len(body)
    offset = draw(st.one_of(st.integers(0, n - 1), st.sampled_from([h for h in hot if h < n] or [0])))
    if offset < 14:
        offset = draw(st.integers(0, n - 1))  # the magic and version are cheap to hit, and checked first
    op = draw(st.sampled_from(["flip", "byte", "int", "insert", "delete", "truncate"]))
    if op == "flip":
        body[offset] ^= draw(st.integers(1, 255))
    elif op == "byte":
        body[offset] = draw(st.sampled_from([0, 1, 2, 0x7F, 0x80, 0xFE, 0xFF]))
    elif op == "int":
        size = draw(st.sampled_from([1, 2, 4, 8]))
        value = draw(st.one_of(st.sampled_from(INTERESTING), st.integers(0, (1 << (8 * size)) - 1)))
        body[offset:offset + size] = (value % (1 << (8 * size))).to_bytes(size, "big")
    elif op == "insert":
        body[offset:offset] = draw(st.binary(min_size=1, max_size=16))
    elif op == "delete":
        del body[offset:offset + draw(st.integers(1, 16))]
    else:
        del body[offset:]


class Hang(Exception):
    pass


@contextlib.contextmanager
def hang_guard(seconds):
    def expire(signum, frame):
        raise Hang(f"load_state did not return within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _kind_of(message):
    """The message without its numbers and names, for hypothesis' statistics."""
    return re.sub(r"'[^']*'|\d+|0x[0-9a-f]+", "_", message)[:70]


def check_load(world, data):
    machine = world.machine
    try:
        with hang_guard(HANG_SECONDS):
            machine.load_state(data)
    except StateError as e:
        assert str(e), "a StateError must say what is wrong"
        if currently_in_test_context():
            event(_kind_of(str(e)))
        assert machine.state_digest() == world.digest, f"refused ({e}) but the machine changed"
        return False
    if currently_in_test_context():
        event("accepted")
    machine.state_digest()  # an accepted state must still save
    world.restore()
    return True


@MAKE_TEST
@given(data=st.data())
def test_mutated_streams_are_refused_cleanly_or_valid(world, data):
    check_load(world, data.draw(mutated_streams(world), label="stream"))


@pytest.mark.soak
@pytest.mark.skipif(not SOAK, reason="the 10,000-example campaign runs under `make soak` (EMU_SOAK=1)")
@SOAK_RUN
@given(data=st.data())
def test_mutated_streams_soak(world, data):
    check_load(world, data.draw(mutated_streams(world), label="stream"))


def test_unmutated_streams_are_accepted(world):
    """The property is not vacuous: the base streams themselves load."""
    assert check_load(world, world.streams["full"])
    assert check_load(world, world.streams["devices"])
    assert not check_load(world, world.streams["full"][:-1])

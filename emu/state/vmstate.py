"""Declarative device state descriptions, in the spirit of QEMU's VMState.

A device declares *what* its guest-visible state is; this module turns that into bytes
and back.  Example::

    VMSTATE = VMStateDescription(
        "uart16550", version_id=1, minimum_version_id=1,
        fields=[U8("ier"), U8("lcr"), VarBytes("rx_fifo", max_len=16),
                TimerField("tx_timer")],
        subsections=[Subsection(OTHER_DESC, needed=lambda dev: dev.something)],
        post_load=lambda dev, version_id: dev.check_loaded_state(),
    )

Field values are attributes of the device (``getattr(device, name)``).  Encoding is
big-endian.  ``post_load`` validates and re-derives the device's own state only and raises
:class:`~emu.errors.StateError` naming device and field when a value is inconsistent.
"""

import struct

from emu.errors import StateError


class Field:
    """One named, typed piece of state; ``since`` is the version_id that introduced it.

    ``packed`` is the field's ``struct`` format when it is a fixed run of integers: runs of
    such fields are then packed and unpacked with one precompiled Struct (a checkpoint
    saves every device's state in the guest's pause); the field's own ``encode`` and
    ``decode`` stay the reference and name the field when a value does not fit."""

    kind = "?"
    packed = None

    def __init__(self, name, since=1):
        self.name = name
        self.since = since

    def get(self, device):
        return getattr(device, self.name)

    def set(self, device, value):
        setattr(device, self.name, value)

    def schema(self):
        return {"name": self.name, "kind": self.kind, "since": self.since}


class _Int(Field):
    fmt = ">B"
    bits = 8
    signed = False

    def encode(self, value, out):
        value = int(value)
        lo, hi = (-(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1) if self.signed else (0, (1 << self.bits) - 1)
        if not lo <= value <= hi:
            raise StateError(f"field {self.name}: value {value} does not fit {self.kind}")
        out += struct.pack(self.fmt, value)

    @property
    def packed(self):
        return self.fmt[1:]

    def values(self, value):
        return (value,)

    def from_values(self, values):
        return values[0]

    def decode(self, buf, pos):
        size = struct.calcsize(self.fmt)
        if pos + size > len(buf):
            raise StateError(f"field {self.name}: truncated")
        return struct.unpack_from(self.fmt, buf, pos)[0], pos + size


class U8(_Int):
    kind, fmt, bits = "u8", ">B", 8


class U16(_Int):
    kind, fmt, bits = "u16", ">H", 16


class U32(_Int):
    kind, fmt, bits = "u32", ">I", 32


class U64(_Int):
    kind, fmt, bits = "u64", ">Q", 64


class I64(_Int):
    kind, fmt, bits, signed = "i64", ">q", 64, True


class Bool(Field):
    kind = "bool"
    packed = "B"

    def values(self, value):
        return (1 if value else 0,)

    def from_values(self, values):
        if values[0] > 1:
            raise ValueError  # decode() names it
        return bool(values[0])

    def encode(self, value, out):
        out.append(1 if value else 0)

    def decode(self, buf, pos):
        if pos >= len(buf):
            raise StateError(f"field {self.name}: truncated")
        if buf[pos] > 1:
            raise StateError(f"field {self.name}: boolean byte {buf[pos]:#x} is not 0 or 1")
        return bool(buf[pos]), pos + 1


class Bytes(Field):
    """A fixed-length byte string (``bytes`` or ``bytearray`` attribute)."""

    kind = "bytes"

    def __init__(self, name, length, since=1):
        super().__init__(name, since)
        self.length = length

    def encode(self, value, out):
        if len(value) != self.length:
            raise StateError(f"field {self.name}: length {len(value)} != {self.length}")
        out += bytes(value)

    def decode(self, buf, pos):
        if pos + self.length > len(buf):
            raise StateError(f"field {self.name}: truncated")
        return bytearray(buf[pos:pos + self.length]), pos + self.length

    def schema(self):
        return {**super().schema(), "length": self.length}


class VarBytes(Field):
    """A byte string of 0..max_len bytes (a FIFO's contents), stored with a u32 length."""

    kind = "varbytes"

    def __init__(self, name, max_len, since=1):
        super().__init__(name, since)
        self.max_len = max_len

    def encode(self, value, out):
        if len(value) > self.max_len:
            raise StateError(f"field {self.name}: length {len(value)} > max {self.max_len}")
        out += struct.pack(">I", len(value)) + bytes(value)

    def decode(self, buf, pos):
        if pos + 4 > len(buf):
            raise StateError(f"field {self.name}: truncated")
        (n,) = struct.unpack_from(">I", buf, pos)
        if n > self.max_len:
            raise StateError(f"field {self.name}: length {n} > max {self.max_len}")
        pos += 4
        if pos + n > len(buf):
            raise StateError(f"field {self.name}: truncated")
        return bytearray(buf[pos:pos + n]), pos + n

    def schema(self):
        return {**super().schema(), "max_len": self.max_len}


class Array(Field):
    """A fixed-count list of integers of one type (``U8``, ``U16``, ``U32``, ``U64``, ``I64``)."""

    kind = "array"

    def __init__(self, name, element, count, since=1):
        super().__init__(name, since)
        self.element = element(name)
        self.count = count

    @property
    def packed(self):
        return self.element.packed * self.count

    def values(self, value):
        return value

    def from_values(self, values):
        return list(values)

    def encode(self, value, out):
        if len(value) != self.count:
            raise StateError(f"field {self.name}: {len(value)} elements, expected {self.count}")
        for v in value:
            self.element.encode(v, out)

    def decode(self, buf, pos):
        values = []
        for _ in range(self.count):
            v, pos = self.element.decode(buf, pos)
            values.append(v)
        return values, pos

    def schema(self):
        return {**super().schema(), "element": self.element.kind, "count": self.count}


class TimerField(Field):
    """A :class:`~emu.clock.Timer` stored as its absolute deadline in ns (-1 when idle)."""

    kind = "timer"

    def encode(self, timer, out):
        out += struct.pack(">q", -1 if timer.deadline is None else timer.deadline)

    def decode(self, buf, pos):
        if pos + 8 > len(buf):
            raise StateError(f"field {self.name}: truncated")
        (v,) = struct.unpack_from(">q", buf, pos)
        if v < -1:
            raise StateError(f"field {self.name}: deadline {v} is negative")
        return v, pos + 8

    def set(self, device, value):
        timer = getattr(device, self.name)
        if value < 0:
            timer.cancel()
        else:
            timer.arm(value)


class Subsection:
    """Optional extra state, sent only when ``needed(device)`` is true (QEMU subsections)."""

    def __init__(self, description, needed):
        self.description = description
        self.needed = needed


def _plan(fields):
    """Runs of packable fields as (Struct, [fields]); any other field alone as (None, field)."""
    plan, run = [], []

    def close_run():
        if run:
            plan.append((struct.Struct(">" + "".join(f.packed for f in run)), list(run)))
            run.clear()

    for f in fields:
        if f.packed:
            run.append(f)
        else:
            close_run()
            plan.append((None, f))
    close_run()
    return plan


class VMStateDescription:
    def __init__(self, name, version_id, minimum_version_id, fields, subsections=(),
                 pre_save=None, post_load=None):
        self.name = name
        self.version_id = version_id
        self.minimum_version_id = minimum_version_id
        self.fields = list(fields)
        self.subsections = list(subsections)
        self.pre_save = pre_save
        self.post_load = post_load
        self._plan = _plan(self.fields)

    # --- encoding -------------------------------------------------------------------
    def save(self, device):
        """The device's state as bytes; never changes the device."""
        out = bytearray()
        if self.pre_save:
            self.pre_save(device)
        for layout, fields in self._plan:
            if layout is None:
                fields.encode(fields.get(device), out)
                continue
            values = [v for f in fields for v in f.values(f.get(device))]
            try:
                out += layout.pack(*values)
            except (struct.error, TypeError):  # a value that does not fit: let its field say which
                for f in fields:
                    f.encode(f.get(device), out)
        subs = [s for s in self.subsections if s.needed(device)]
        out.append(len(subs))
        for s in subs:
            body = s.description.save(device)
            name = s.description.name.encode()
            out += struct.pack(">B", len(name)) + name + struct.pack(">II", s.description.version_id, len(body)) + body
        return bytes(out)

    def decode(self, buf, version_id):
        """Parse and check ``buf`` without touching any device; returns the parsed values."""
        if version_id > self.version_id:
            raise StateError(f"{self.name}: version {version_id} is newer than supported {self.version_id}")
        if version_id < self.minimum_version_id:
            raise StateError(f"{self.name}: version {version_id} is older than minimum {self.minimum_version_id}")
        values, pos = self._decode_fields(buf, version_id)
        if pos >= len(buf):
            raise StateError(f"{self.name}: truncated before subsection count")
        nsub = buf[pos]
        pos += 1
        known = {s.description.name: s for s in self.subsections}
        subs = {}
        for _ in range(nsub):
            if pos >= len(buf):
                raise StateError(f"{self.name}: truncated subsection header")
            nlen = buf[pos]
            name = bytes(buf[pos + 1:pos + 1 + nlen]).decode("ascii", "replace")
            pos += 1 + nlen
            if pos + 8 > len(buf):
                raise StateError(f"{self.name}: truncated subsection {name!r}")
            sver, slen = struct.unpack_from(">II", buf, pos)
            pos += 8
            if name not in known:
                raise StateError(f"{self.name}: unknown subsection {name!r}")
            if name in subs:
                raise StateError(f"{self.name}: subsection {name!r} appears twice")
            if pos + slen > len(buf):
                raise StateError(f"{self.name}: subsection {name!r} truncated")
            subs[name] = (sver, known[name].description.decode(bytes(buf[pos:pos + slen]), sver))
            pos += slen
        if pos != len(buf):
            raise StateError(f"{self.name}: {len(buf) - pos} trailing bytes")
        return {"version": version_id, "fields": values, "subsections": subs}

    def _decode_fields(self, buf, version_id):
        values, pos = {}, 0
        if version_id != self.version_id:  # fields added since are absent: one by one
            for f in self.fields:
                if f.since <= version_id:
                    values[f.name], pos = f.decode(buf, pos)
            return values, pos
        for layout, fields in self._plan:
            if layout is None:
                values[fields.name], pos = fields.decode(buf, pos)
                continue
            try:
                flat, start = layout.unpack_from(buf, pos), 0
                for f in fields:
                    n = len(f.packed)
                    values[f.name] = f.from_values(flat[start:start + n])
                    start += n
                pos += layout.size
            except (struct.error, ValueError):  # truncated or out of range: let the field say which
                for f in fields:
                    values[f.name], pos = f.decode(buf, pos)
        return values, pos

    def apply(self, device, parsed):
        """Write already-checked values into the device, then run ``post_load``."""
        for f in self.fields:
            if f.name in parsed["fields"]:
                f.set(device, parsed["fields"][f.name])
        for s in self.subsections:
            name = s.description.name
            if name in parsed["subsections"]:
                s.description.apply(device, parsed["subsections"][name][1])
        if self.post_load:
            self.post_load(device, parsed["version"])

    def load(self, device, buf, version_id):
        self.apply(device, self.decode(buf, version_id))

    def schema(self):
        """A JSON-able description, for the golden schema test."""
        return {
            "name": self.name,
            "version_id": self.version_id,
            "minimum_version_id": self.minimum_version_id,
            "fields": [f.schema() for f in self.fields],
            "subsections": [s.description.schema() for s in self.subsections],
        }

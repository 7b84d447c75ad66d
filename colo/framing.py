"""Frames ``type | length | payload``: the one framing of every colo channel.

The migration channel, the checkpoint channel and the client endpoint's protocol differ
only in their header (the width of the length field), their message names and the payload
sizes they allow: each is a :class:`FrameFormat`.  :class:`FrameReader` checks every
header before it buffers the payload behind it, so a hostile peer cannot make us allocate
without bound.  The same reader serves a non-blocking socket (``feed`` what arrived, take
``frames()``) and a blocking one (:func:`read_frame` reads exactly what the next frame
still lacks, so no byte of what follows it is taken).
"""


class FrameFormat:
    """One protocol's framing.

    ``header``: a ``struct.Struct`` of (type, payload length); ``names``: message type ->
    name, the known types; ``error``: the exception class a bad header raises, its message
    starting with ``prefix``; ``max_payload``: the limit for every type, unless ``sizes``
    gives a type its own: an exact length, or a (minimum, maximum) pair."""

    def __init__(self, header, names, error, *, max_payload, sizes=None, prefix=""):
        self.header = header
        self.names = names
        self.error = error
        self.max_payload = max_payload
        self.sizes = {kind: size if isinstance(size, tuple) else (size, size) for kind, size in (sizes or {}).items()}
        self.prefix = prefix

    def frame(self, kind, payload=b""):
        """A whole frame, checked as a reader would check it."""
        self.check(kind, len(payload))
        return self.header.pack(kind, len(payload)) + bytes(payload)

    def check(self, kind, length, max_payload=None):
        """Refuse an unknown type or a payload length the type does not allow."""
        if kind not in self.names:
            raise self.error(f"{self.prefix}unknown message type {kind}")
        low, high = self.sizes.get(kind, (0, self.max_payload))
        if max_payload is not None:
            high = min(high, max_payload)
        if not low <= length <= high:
            expected = f"{low}" if low == high else f"at most {high}" if low == 0 else f"{low}..{high}"
            raise self.error(f"{self.prefix}{self.names[kind]} with a payload of {length} bytes (expected {expected})")


class FrameReader:
    """Reassembles the frames of one format from a byte stream.

    ``max_payload`` tightens the format's limit for this reader (a peer that only ever
    sends short replies)."""

    def __init__(self, frame_format, max_payload=None):
        self.format = frame_format
        self.max_payload = max_payload
        self.buf = bytearray()

    def feed(self, data):
        self.buf += data

    def missing(self):
        """Bytes the next frame still lacks (0: it is complete); its header is checked as
        soon as the header is whole."""
        size = self.format.header.size
        if len(self.buf) < size:
            return size - len(self.buf)
        kind, length = self.format.header.unpack_from(self.buf)
        self.format.check(kind, length, self.max_payload)
        return max(0, size + length - len(self.buf))

    def next_frame(self):
        """The next complete frame as (type, payload), or None."""
        if self.missing():
            return None
        size = self.format.header.size
        kind, length = self.format.header.unpack_from(self.buf)
        payload = bytes(self.buf[size:size + length])
        del self.buf[:size + length]
        return kind, payload

    def frames(self):
        """Every complete frame buffered so far."""
        out = []
        while (frame := self.next_frame()) is not None:
            out.append(frame)
        return out


def read_frame(reader, read_exact):
    """Blocking: the next frame, reading with ``read_exact(n)`` (returns exactly n bytes or
    raises) only what it still lacks."""
    while missing := reader.missing():
        reader.feed(read_exact(missing))
    return reader.next_frame()

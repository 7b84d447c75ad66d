"""The replication part of a checkpoint: what of the pair, not of the guest, travels with it.

A checkpoint carries the machine's state (the machine stream of ``docs/state-format.md``)
and, beside it, the replication part: state that belongs to the replication, not to the
guest, yet must be taken at the same instant as the guest's for a failover to be exact.
Today that is the COLO link's :class:`~colo.link.LinkState`.  Layout (big-endian)::

    count u8 | count x (name length u8 | name ASCII | version u16 | length u32 | payload)

Entries: ``colo-link`` (version 1), present exactly when the VM's COM1 is a COLO link.
A reader refuses an unknown name, a name twice, another version, a length beyond the
data, trailing bytes, and an entry for a link this side does not have (or none for one
it has).
"""

import struct

from emu.errors import StateError

from .link import LinkState

LINK = "colo-link"
LINK_VERSION = 1
ENTRY_HEAD = struct.Struct(">HI")  # version, length (after the name)
MAX_SIZE = 1 + 1 + len(LINK) + ENTRY_HEAD.size + LinkState.MAX_SIZE


def encode(link_state):
    """The replication part for a pair whose link is in ``link_state`` (None: no link)."""
    if link_state is None:
        return b"\x00"
    payload = link_state.encode()
    name = LINK.encode()
    return bytes([1, len(name)]) + name + ENTRY_HEAD.pack(LINK_VERSION, len(payload)) + payload


def decode(data, has_link):
    """The LinkState a replication part carries (None when the pair has no link), checked
    whole against this side (``has_link``: its COM1 is a COLO link)."""
    entries = _entries(memoryview(data))
    if set(entries) - {LINK}:
        names = ", ".join(sorted(set(entries) - {LINK}))
        raise StateError(f"replication part: unknown entries {names}")
    if LINK in entries and not has_link:
        raise StateError(f"replication part: a {LINK!r} entry, but this side has no COLO link")
    if LINK not in entries and has_link:
        raise StateError(f"replication part: no {LINK!r} entry for this side's COLO link")
    if LINK not in entries:
        return None
    version, payload = entries[LINK]
    if version != LINK_VERSION:
        raise StateError(f"replication part: {LINK!r} version {version}, this side reads {LINK_VERSION}")
    return LinkState.decode(payload)


def _entries(view):
    """{name: (version, payload)}, every length checked."""
    if len(view) < 1:
        raise StateError("replication part: empty")
    count, pos, entries = view[0], 1, {}
    for index in range(count):
        if pos + 1 > len(view) or pos + 1 + view[pos] + ENTRY_HEAD.size > len(view):
            raise StateError(f"replication part: entry {index} truncated")
        name = bytes(view[pos + 1:pos + 1 + view[pos]]).decode("ascii", "backslashreplace")
        pos += 1 + view[pos]
        version, length = ENTRY_HEAD.unpack_from(view, pos)
        pos += ENTRY_HEAD.size
        if pos + length > len(view):
            raise StateError(f"replication part: entry {name!r} truncated ({length} bytes announced)")
        if name in entries:
            raise StateError(f"replication part: entry {name!r} appears twice")
        entries[name] = (version, bytes(view[pos:pos + length]))
        pos += length
    if pos != len(view):
        raise StateError(f"replication part: {len(view) - pos} bytes after its last entry")
    return entries

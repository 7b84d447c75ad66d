"""The disks' initial sync when a COLO pair forms (the live migration that is its checkpoint 0).

Each VM has its own copy of every disk image, and the pair starts only from equal copies.
Before the first RAM pass the source starts logging its guest's disk writes, so that every
block written from then on goes over again (with a dirty pass or the stop-and-copy), and
sends a SHA-256 of every 1 MiB of each image (``DISKS``).  The destination compares them with
its own and answers which chunks differ (``DISK_DIFF``), or refuses the migration when the
drives themselves differ (ids, sizes, a read-only copy that differs).  The source then
copies the differing chunks as disk streams (``DISK``, ``emu/blockrep.py``'s format) while
the guest runs, and the RAM passes follow.  Layouts (big-endian)::

    DISKS      count u16 | per drive: id length u8 | id | image size u64 | chunks n u32 | n x 32 bytes
    DISK_DIFF  count u16 | per drive: id length u8 | id | chunks n u32 | n x chunk index u32

The destination writes the chunks into its images as they come: a migration that fails
after that leaves them part-copied, and the destination exits (its copies were about to be
overwritten anyway; the next attempt copies what still differs).  Hashing runs in the run
loop, about 0.7 s per GiB of image on each side.

Both sides use the machine only through its replication surface.
"""

import struct
import sys

import numpy as np

from emu.errors import StateError

CHUNK = 1 << 20
BLOCK = 4096
DIGEST = 32
COPY_STEP = 16  # chunks per disk stream while copying (16 MiB, as a RAM chunk of the first pass)
COUNT = struct.Struct(">H")
SIZE_AND_CHUNKS = struct.Struct(">QI")
CHUNKS = struct.Struct(">I")


def chunk_count(size):
    return -(-size // CHUNK)


def _mib(n):
    return f"{n / CHUNK:g} MiB"


def digests_payload(machine):
    """The source's DISKS: every drive's size and chunk digests."""
    sizes, digests = machine.disk_sizes(), machine.disk_chunk_digests()
    parts = [COUNT.pack(len(sizes))]
    for drive_id, size in sizes.items():
        name = drive_id.encode()
        parts += [bytes([len(name)]), name, SIZE_AND_CHUNKS.pack(size, chunk_count(size)), digests[drive_id]]
    return b"".join(parts)


def _drive_entries(payload, what, body):
    """{id: body(view, pos, id) -> (value, next pos)} of a DISKS or DISK_DIFF payload."""
    view = memoryview(payload)
    if len(view) < COUNT.size:
        raise StateError(f"{what}: truncated")
    (count,), pos, entries = COUNT.unpack_from(view), COUNT.size, {}
    for _ in range(count):
        if pos >= len(view) or pos + 1 + view[pos] > len(view):
            raise StateError(f"{what}: truncated")
        drive_id = bytes(view[pos + 1:pos + 1 + view[pos]]).decode("ascii", "backslashreplace")
        pos += 1 + view[pos]
        if drive_id in entries:
            raise StateError(f"{what}: drive {drive_id!r} twice")
        entries[drive_id], pos = body(view, pos, drive_id)
    if pos != len(view):
        raise StateError(f"{what}: {len(view) - pos} bytes after its last drive")
    return entries


def _digests_body(view, pos, drive_id):
    if pos + SIZE_AND_CHUNKS.size > len(view):
        raise StateError("DISKS: truncated")
    size, n = SIZE_AND_CHUNKS.unpack_from(view, pos)
    pos += SIZE_AND_CHUNKS.size
    if n != chunk_count(size) or pos + n * DIGEST > len(view):
        raise StateError(f"DISKS: drive {drive_id!r}: {n} chunk digests for {size} bytes")
    return (size, np.frombuffer(view, np.uint8, n * DIGEST, pos).reshape(n, DIGEST)), pos + n * DIGEST


def differing_chunks(machine, payload):
    """The destination's side: {drive id: the chunks that differ} between the source's
    digests and this machine's images.  A drive that one side lacks, or of another size,
    refuses the pair (StateError): copies of one image are what it needs.  (A read-only
    copy that differs is refused when its first chunk arrives.)"""
    theirs = _drive_entries(payload, "DISKS", _digests_body)
    sizes = machine.disk_sizes()
    for drive_id in sorted(set(theirs) ^ set(sizes)):
        where = "the source" if drive_id in theirs else "this side"
        raise StateError(f"disk {drive_id}: only {where} has it (the pair needs the same -drive ids on both)")
    ours = machine.disk_chunk_digests()
    diff = {}
    for drive_id, (size, digests) in theirs.items():
        if size != sizes[drive_id]:
            raise StateError(f"disk {drive_id}: {size} bytes on the source, {sizes[drive_id]} here "
                             "(give both VMs a copy of the same image)")
        mine = np.frombuffer(ours[drive_id], np.uint8).reshape(-1, DIGEST)
        diff[drive_id] = np.flatnonzero((mine != digests).any(axis=1))
    return diff


def diff_payload(diff):
    parts = [COUNT.pack(len(diff))]
    for drive_id, chunks in diff.items():
        name = drive_id.encode()
        parts += [bytes([len(name)]), name, CHUNKS.pack(len(chunks)), np.asarray(chunks, ">u4").tobytes()]
    return b"".join(parts)


def parse_diff(payload, sizes):
    """The source's side: {drive id: chunks to copy} of a DISK_DIFF, checked against ``sizes``."""
    def body(view, pos, drive_id):
        if drive_id not in sizes or pos + CHUNKS.size > len(view):
            raise StateError(f"DISK_DIFF: drive {drive_id!r} unknown or truncated")
        (n,) = CHUNKS.unpack_from(view, pos)
        pos += CHUNKS.size
        if pos + 4 * n > len(view):
            raise StateError(f"DISK_DIFF: drive {drive_id!r} truncated")
        chunks = np.frombuffer(view, ">u4", n, pos).astype(np.int64)
        if n and (chunks.max() >= chunk_count(sizes[drive_id]) or (np.diff(chunks) <= 0).any()):
            raise StateError(f"DISK_DIFF: drive {drive_id!r}: bad chunk numbers")
        return chunks, pos + 4 * n
    return _drive_entries(payload, "DISK_DIFF", body)


class DiskCopy:
    """The source's copy of the differing chunks, a disk stream at a time."""

    def __init__(self, machine, diff, log=None):
        self.machine = machine
        self.sizes = machine.disk_sizes()
        self.todo = [(drive_id, int(chunk)) for drive_id, chunks in diff.items() for chunk in chunks]
        self.copied = dict.fromkeys(diff, 0)
        self.log = log or (lambda text: print(f"emu: migrate: {text}", file=sys.stderr, flush=True))
        for drive_id, chunks in diff.items():
            if not len(chunks):
                self.log(f"disk {drive_id}: images identical ({_mib(self.sizes[drive_id])} checked)")

    def done(self):
        return not self.todo

    def next_stream(self):
        """A disk stream of the next COPY_STEP chunks (read from the images now)."""
        step, self.todo = self.todo[:COPY_STEP], self.todo[COPY_STEP:]
        blocks = {}
        for drive_id, chunk in step:
            size = self.sizes[drive_id]
            first, end = chunk * CHUNK // BLOCK, -(-min((chunk + 1) * CHUNK, size) // BLOCK)
            blocks.setdefault(drive_id, []).append(np.arange(first, end))
            self.copied[drive_id] += min(CHUNK, size - chunk * CHUNK)
        stream = self.machine.save_disk_blocks({d: np.concatenate(b) for d, b in blocks.items()})
        for drive_id in {d for d, _ in step}:
            if not any(d == drive_id for d, _ in self.todo):
                self.log(f"disk {drive_id}: copied {_mib(self.copied[drive_id])} "
                         f"(of {_mib(self.sizes[drive_id])} checked)")
        return stream

"""Block replication for a COLO pair, a drive at a time (after QEMU's ``block/replication.c``).

Each VM of a pair has its own copy of every disk image.  A :class:`ReplicatedDrive` stands
between a disk device and its image and gives the pair what it needs of the disk:

* on the primary, a **write log**: which 4 KiB blocks the guest wrote since the last look.
  Requests are synchronous and done between CPU slices, so when the guest is paused every
  write it was told was complete is in the image and in the log: a checkpoint reads those
  blocks from the image and carries them (:func:`encode`).
* on the secondary, an **overlay**: the secondary runs too, and its own writes must not
  reach its image, which stays equal to the primary's disk at the last checkpoint.  They go
  to 4 KiB blocks in memory that reads consult first.  At a checkpoint the overlay is
  discarded and the primary's blocks are written into the image; on a failover it is
  either committed into the image or discarded (see ``colo.checkpoint``).

QEMU's secondary keeps the same three layers in files: the active disk (the overlay), the
hidden disk (copy-on-write of what the primary's writes, which arrive at once over NBD,
overwrote) and the secondary disk (the image).  Here the primary's writes arrive with the
checkpoint, after it has been checked whole, so the image alone plays the hidden disk's
and the secondary disk's parts.

The disk stream (``docs/state-format.md`` section 11), big-endian::

    magic "EMUDISK\\0" | version u16 | drive count u16
    per drive: id length u8 | id ASCII | image size u64 | block count n u32 |
               n block numbers u32 (ascending) | n x 4096 bytes (past the image's end: zeros)
    XXH3-128 over every byte before it

numpy and xxhash are imported only by the functions that replication uses.
"""

import hashlib
import struct

from emu.errors import StateError

BLOCK = 4096
CHUNK = 1 << 20  # the unit in which two images are compared when a pair forms
MAGIC = b"EMUDISK\0"
VERSION = 1
HEAD = struct.Struct(">HH")  # version, drive count
DRIVE = struct.Struct(">QI")  # image size, block count
DIGEST_SIZE = 16


def block_count(size):
    return -(-size // BLOCK)


class ReplicatedDrive:
    """The block backend a disk device is given: ``image`` (emu.blockdev), plus the write
    log and the overlay, both off until replication turns them on."""

    def __init__(self, drive_id, image):
        self.id = drive_id
        self.image = image
        self.path, self.readonly, self.serial, self.size = image.path, image.readonly, image.serial, image.size
        self.blocks = block_count(image.size)
        self._log = None      # bytearray, a byte per block: 1 = written since the last take_written()
        self._overlay = None  # {block: bytearray(BLOCK)}: the secondary's own writes

    @property
    def sectors(self):
        return self.image.sectors

    # ------------------------------------------------------------------ the device's side
    def read(self, offset, length):
        data = self.image.read(offset, length)
        if not self._overlay or not length:
            return data
        first, last = offset // BLOCK, (offset + length - 1) // BLOCK
        hits = [b for b in range(first, last + 1) if b in self._overlay]
        if not hits:
            return data
        out = bytearray(data)
        for b in hits:
            start, end = max(offset, b * BLOCK), min(offset + length, (b + 1) * BLOCK)
            out[start - offset:end - offset] = self._overlay[b][start - b * BLOCK:end - b * BLOCK]
        return bytes(out)

    def write(self, offset, data):
        if self.readonly or self._overlay is None:
            self.image.write(offset, data)  # (a read-only image raises)
        else:
            self._write_overlay(offset, data)
        if self._log is not None and data:
            first, last = offset // BLOCK, (offset + len(data) - 1) // BLOCK
            self._log[first:last + 1] = b"\x01" * (last - first + 1)

    def _write_overlay(self, offset, data):
        view = memoryview(data)
        for b in range(offset // BLOCK, (offset + len(data) - 1) // BLOCK + 1):
            start, end = max(offset, b * BLOCK), min(offset + len(data), (b + 1) * BLOCK)
            block = self._overlay.get(b)
            if block is None:  # a partial block starts as the image's
                whole = end - start == BLOCK
                block = self._overlay[b] = bytearray(BLOCK) if whole else bytearray(self.image.read(b * BLOCK, BLOCK))
            block[start - b * BLOCK:end - b * BLOCK] = view[start - offset:end - offset]

    def flush(self):
        if self._overlay is None:
            self.image.flush()  # with an overlay nothing of the guest's is in the image to flush

    def close(self):
        self.image.close()

    # ------------------------------------------------------------------ primary: the write log
    def start_write_log(self):
        if self._log is None and not self.readonly:
            self._log = bytearray(self.blocks)

    def take_written(self):
        """Block numbers (ascending, int64) written since the last call or the start; clears the log."""
        import numpy as np
        if self._log is None:
            return np.zeros(0, dtype=np.int64)
        written = np.flatnonzero(np.frombuffer(self._log, dtype=np.uint8))
        if len(written):
            self._log[:] = bytes(self.blocks)
        return written

    def stop_write_log(self):
        self._log = None

    def read_blocks(self, blocks):
        """The 4 KiB of each of ``blocks`` (ascending) as the guest sees them, in one buffer."""
        return b"".join(self.read(first * BLOCK, count * BLOCK) for first, count in _runs(blocks))

    def chunk_digests(self):
        """SHA-256 of every CHUNK of the image, concatenated (the last chunk may be short)."""
        return b"".join(hashlib.sha256(self.image.read(start, min(CHUNK, self.size - start))).digest()
                        for start in range(0, self.size, CHUNK))

    # ------------------------------------------------------------------ secondary: the overlay
    def start_overlay(self):
        if self._overlay is None:
            self._overlay = {}

    def discard_overlay(self):
        """Forget the guest's writes since the overlay began or was last discarded; returns how
        many blocks they were."""
        count = len(self._overlay or ())
        if self._overlay:
            self._overlay = {}
        return count

    def end_overlay(self, commit):
        """Writes go straight to the image again; ``commit``: the overlay's blocks go there first."""
        if self._overlay is None:
            return
        overlay, self._overlay = self._overlay, None
        if commit and overlay:
            for b in sorted(overlay):
                self.image.write(b * BLOCK, bytes(overlay[b][:min(BLOCK, self.size - b * BLOCK)]))
            self.image.flush()

    def write_blocks(self, blocks, data):
        """Write ``blocks`` (ascending) with ``data`` (their 4 KiB each, in order) into the image
        itself, past the overlay; the part of a last block beyond the image's end is dropped."""
        pos = 0
        for first, count in _runs(blocks):
            length = min(count * BLOCK, self.size - first * BLOCK)
            self.image.write(first * BLOCK, data[pos:pos + length])
            pos += count * BLOCK
        if pos:
            self.image.flush()


def _runs(blocks):
    """(first block, count) of each run of consecutive numbers in ``blocks`` (ascending)."""
    import numpy as np
    blocks = np.asarray(blocks, dtype=np.int64)
    if not len(blocks):
        return []
    breaks = np.flatnonzero(np.diff(blocks) != 1) + 1
    starts = np.concatenate(([0], breaks))
    counts = np.diff(np.concatenate((starts, [len(blocks)])))
    return list(zip(blocks[starts].tolist(), counts.tolist(), strict=True))


# ---------------------------------------------------------------------- the disk stream
def encode(drives, blocks):
    """The disk stream of ``blocks`` ({drive id: ascending block numbers}) of ``drives``
    ({drive id: ReplicatedDrive}), read from the images now."""
    import numpy as np
    import xxhash
    parts = [MAGIC, HEAD.pack(VERSION, len(blocks))]
    for drive_id, numbers in blocks.items():
        drive, name = drives[drive_id], drive_id.encode()
        numbers = np.asarray(numbers, dtype=np.int64)
        parts += [bytes([len(name)]), name, DRIVE.pack(drive.size, len(numbers)), numbers.astype(">u4").tobytes(),
                  drive.read_blocks(numbers)]
    h = xxhash.xxh3_128()
    for part in parts:
        h.update(part)
    parts.append(h.digest())
    return b"".join(parts)


class CheckedDiskBlocks:
    """A disk stream that passed :func:`check`: ``entries`` of (drive, block numbers, data)."""

    def __init__(self, entries):
        self.entries = entries
        self.count = sum(len(blocks) for _, blocks, _ in entries)  # blocks in all

    def write_into_images(self):
        for drive, blocks, data in self.entries:
            drive.write_blocks(blocks, data)


def check(drives, data, verify_checksum=True):
    """Check a whole disk stream against ``drives`` without writing a block of it: every
    length, the drives (known, writable, each once, of the same size as here), the block
    numbers (ascending, inside the image) and, unless the caller has verified a digest over
    these bytes, the checksum.  Returns a :class:`CheckedDiskBlocks`."""
    import xxhash
    view = memoryview(data).cast("B")
    end = len(view) - DIGEST_SIZE
    if end < len(MAGIC) + HEAD.size:
        raise StateError(f"disk stream: truncated ({len(view)} bytes)")
    if bytes(view[:len(MAGIC)]) != MAGIC:
        raise StateError("disk stream: bad magic")
    version, count = HEAD.unpack_from(view, len(MAGIC))
    if version != VERSION:
        raise StateError(f"disk stream: version {version}, this side reads {VERSION}")
    if verify_checksum and xxhash.xxh3_128(view[:end]).digest() != bytes(view[end:]):
        raise StateError("disk stream: checksum mismatch")
    pos, entries, seen = len(MAGIC) + HEAD.size, [], set()
    for index in range(count):
        drive, pos, entry = _check_entry(drives, view, pos, end, index)
        if drive.id in seen:
            raise StateError(f"disk stream: drive {drive.id!r} appears twice")
        seen.add(drive.id)
        entries.append(entry)
    if pos != end:
        raise StateError(f"disk stream: {end - pos} bytes after its last drive")
    return CheckedDiskBlocks(entries)


def _check_entry(drives, view, pos, end, index):
    """One drive's part of a disk stream: (drive, position after it, (drive, blocks, data))."""
    import numpy as np
    if pos + 1 > end or pos + 1 + view[pos] + DRIVE.size > end:
        raise StateError(f"disk stream: drive entry {index} truncated")
    name = bytes(view[pos + 1:pos + 1 + view[pos]]).decode("ascii", "backslashreplace")
    pos += 1 + view[pos]
    size, n = DRIVE.unpack_from(view, pos)
    pos += DRIVE.size
    drive = drives.get(name)
    if drive is None:
        raise StateError(f"disk stream: unknown drive {name!r} (this machine has {', '.join(drives) or 'none'})")
    if drive.readonly:
        raise StateError(f"disk stream: drive {name!r} is read-only here")
    if size != drive.size:
        raise StateError(f"disk stream: drive {name!r} has {size} bytes, this side's image {drive.size}")
    if pos + n * (4 + BLOCK) > end:
        raise StateError(f"disk stream: drive {name!r} truncated ({n} blocks announced)")
    blocks = np.frombuffer(view, dtype=">u4", count=n, offset=pos).astype(np.int64)
    pos += 4 * n
    if n > 1 and (np.diff(blocks) <= 0).any():
        raise StateError(f"disk stream: drive {name!r}: block numbers not ascending")
    if n and blocks[-1] >= drive.blocks:
        raise StateError(f"disk stream: drive {name!r}: block {blocks[-1]} beyond the image's end "
                         f"({drive.blocks} blocks)")
    return drive, pos + n * BLOCK, (drive, blocks, view[pos:pos + n * BLOCK])

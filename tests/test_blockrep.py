"""A drive as a COLO pair replicates it (emu/blockrep.py): the primary's write log, the
secondary's overlay, and the disk stream between them, refused whole when anything is off.
The writes come through virtio-blk requests (tests/virtiodriver.py), as a guest's do."""

import os
import re
import struct

import numpy as np
import pytest
import xxhash
from virtiodriver import Rig

from emu import blockrep
from emu.blockdev import RawImage
from emu.devices import virtio
from emu.devices.virtio_blk import F_FLUSH, S_OK, T_FLUSH, T_IN, T_OUT, VirtioBlk
from emu.errors import StateError

SECTOR, BLOCK = 512, 4096
SIZE = 9 * BLOCK + 3 * SECTOR  # ten blocks, the last one partial
DATA, HEADER_AT, STATUS_AT = 0x200000, 0x300000, 0x300100


def make_image(path, seed):
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, SIZE, dtype=np.uint8).tobytes())
    return path


class Disk:
    """A virtio-blk device on ``path`` behind a ReplicatedDrive, and a queue to drive it."""

    def __init__(self, path, drive_id="drive0"):
        self.drive = blockrep.ReplicatedDrive(drive_id, RawImage(str(path)))
        self.rig = Rig(lambda ram, msi, trace, clock: VirtioBlk("virtio-blk@03.0", ram, self.drive, msi, trace=trace))
        (self.queue,) = self.rig.setup(virtio.F_VERSION_1 | F_FLUSH, [256])

    def request(self, kind, sector, length=0, data=None):
        ram = self.rig.ram
        ram.write(HEADER_AT, struct.pack("<IIQ", kind, 0, sector))
        if data is not None:
            ram.write(DATA, data)
        buffers = [(DATA, length or len(data), data is None)] if (length or data) else []
        self.queue.add_chain([(HEADER_AT, 16, False)] + buffers + [(STATUS_AT, 1, True)])
        self.queue.kick()
        assert ram.read(STATUS_AT, 1)[0] == S_OK
        return ram.read(DATA, length) if data is None and length else None

    def write(self, sector, data):
        self.request(T_OUT, sector, data=data)

    def read(self, sector, length):
        return self.request(T_IN, sector, length)


def test_the_write_log_holds_every_block_a_request_wrote(tmp_path):
    disk = Disk(make_image(tmp_path / "p.img", 1))
    disk.drive.start_write_log()
    disk.write(1, b"a" * SECTOR)                       # inside block 0
    disk.write(7, b"b" * (2 * SECTOR))                 # sectors 7-8: blocks 0 and 1
    disk.write(8 * 5, b"c" * (3 * BLOCK))              # blocks 5, 6, 7
    disk.write(SIZE // SECTOR - 1, b"d" * SECTOR)      # the last, partial block
    assert disk.drive.take_written().tolist() == [0, 1, 5, 6, 7, 9]
    assert disk.drive.take_written().tolist() == []    # taking clears
    disk.read(0, BLOCK)
    disk.request(T_FLUSH, 0)
    assert disk.drive.take_written().tolist() == []    # reads and flushes are not writes


def test_a_disk_stream_makes_another_image_equal_block_for_block(tmp_path):
    primary = Disk(make_image(tmp_path / "p.img", 1))
    secondary = blockrep.ReplicatedDrive("drive0", RawImage(str(make_image(tmp_path / "s.img", 2))))
    primary.drive.start_write_log()
    primary.write(5, os.urandom(5 * SECTOR))  # sectors 5-9: blocks 0 and 1
    primary.write(SIZE // SECTOR - 2, os.urandom(2 * SECTOR))
    stream = blockrep.encode({"drive0": primary.drive}, {"drive0": primary.drive.take_written()})
    checked = blockrep.check({"drive0": secondary}, stream)
    assert checked.count == 3  # blocks 0, 1 and 9
    checked.write_into_images()
    mine, theirs = (tmp_path / "s.img").read_bytes(), (tmp_path / "p.img").read_bytes()
    assert len(mine) == SIZE  # the last block's padding stays out of the image
    for b in (0, 1, 9):
        assert mine[b * BLOCK:(b + 1) * BLOCK] == theirs[b * BLOCK:(b + 1) * BLOCK]
    assert mine[2 * BLOCK:9 * BLOCK] != theirs[2 * BLOCK:9 * BLOCK]  # nothing else was written


def test_the_overlay_keeps_the_guests_writes_out_of_the_image(tmp_path):
    path = make_image(tmp_path / "s.img", 3)
    before = path.read_bytes()
    disk = Disk(path)
    disk.drive.start_overlay()
    disk.write(9, b"x" * 100 + b"y" * 412)                   # part of block 1
    disk.write(8 * 3, b"z" * BLOCK)                          # all of block 3
    disk.write(SIZE // SECTOR - 1, b"w" * SECTOR)            # the partial last block
    assert path.read_bytes() == before
    disk.request(T_FLUSH, 0)
    expected = bytearray(before)
    expected[9 * SECTOR:10 * SECTOR] = b"x" * 100 + b"y" * 412
    expected[3 * BLOCK:4 * BLOCK] = b"z" * BLOCK
    expected[SIZE - SECTOR:] = b"w" * SECTOR
    assert disk.read(0, SIZE) == bytes(expected)             # reads see the overlay over the image
    assert disk.read(10, SECTOR) == before[10 * SECTOR:11 * SECTOR]  # and the image around it
    assert disk.drive.discard_overlay() == 3
    assert disk.read(0, SIZE) == before and path.read_bytes() == before
    disk.write(9, b"x" * 100 + b"y" * 412)
    disk.drive.end_overlay(commit=True)
    assert path.read_bytes() == before[:9 * SECTOR] + b"x" * 100 + b"y" * 412 + before[10 * SECTOR:]
    disk.write(0, b"v" * SECTOR)                              # overlay off: straight to the image
    assert path.read_bytes()[:SECTOR] == b"v" * SECTOR


def test_an_overlay_ended_without_commit_leaves_the_image_as_it_was(tmp_path):
    path = make_image(tmp_path / "s.img", 4)
    before = path.read_bytes()
    disk = Disk(path)
    disk.drive.start_overlay()
    disk.write(0, b"q" * (4 * BLOCK))
    disk.drive.end_overlay(commit=False)
    assert path.read_bytes() == before and disk.read(0, BLOCK) == before[:BLOCK]


def test_chunk_digests_cover_the_image_per_mib(tmp_path):
    path = tmp_path / "big.img"
    path.write_bytes(bytes(blockrep.CHUNK * 2 + 5))
    drive = blockrep.ReplicatedDrive("d", RawImage(str(path)))
    digests = drive.chunk_digests()
    assert len(digests) == 3 * 32 and digests[:32] == digests[32:64] != digests[64:]


# ------------------------------------------------------------------ hostile disk streams
def good_stream(tmp_path):
    primary = blockrep.ReplicatedDrive("drive0", RawImage(str(make_image(tmp_path / "p.img", 5))))
    return blockrep.encode({"drive0": primary}, {"drive0": np.array([2, 4, 9])})


def resealed(body):
    return body + xxhash.xxh3_128(body).digest()


def rename(stream, name):
    body = stream[:-16]
    return resealed(body[:12] + bytes([len(name)]) + name + body[13 + 6:])


def set_blocks(stream, numbers):
    body = bytearray(stream[:-16])
    at = 12 + 1 + 6 + 12
    body[at:at + 12] = np.array(numbers, ">u4").tobytes()
    return resealed(bytes(body))


def set_size(stream, size):
    body = bytearray(stream[:-16])
    body[19:27] = struct.pack(">Q", size)
    return resealed(bytes(body))


@pytest.mark.parametrize("mutate, message", [
    (lambda s: s[:len(s) // 2], "checksum mismatch"),
    (lambda s: resealed(s[:-16][:-BLOCK]), "truncated (3 blocks announced)"),
    (lambda s: resealed(s[:30]), "truncated"),
    (lambda s: s[:10], "truncated (10 bytes)"),
    (lambda s: s[:-1] + bytes([s[-1] ^ 1]), "checksum mismatch"),
    (lambda s: resealed(s[:-16] + b"\0"), "1 bytes after its last drive"),
    (lambda s: rename(s, b"drive7"), "unknown drive 'drive7'"),
    (lambda s: set_blocks(s, [2, 4, 10]), "block 10 beyond the image's end (10 blocks)"),
    (lambda s: set_blocks(s, [4, 2, 9]), "not ascending"),
    (lambda s: set_blocks(s, [2, 2, 9]), "not ascending"),
    (lambda s: set_size(s, SIZE + BLOCK), f"has {SIZE + BLOCK} bytes, this side's image {SIZE}"),
    (lambda s: resealed(b"EMUDISK\0\x00\x02" + s[10:-16]), "version 2"),
    (lambda s: resealed(s[:8] + b"\x00\x01\x00\x02" + s[12:-16] + s[12:-16]), "appears twice"),
    (lambda s: resealed(b"EMUDISC\0" + s[8:-16]), "bad magic"),
])
def test_a_bad_disk_stream_is_refused_before_a_block_is_written(tmp_path, mutate, message):
    stream = good_stream(tmp_path)
    path = make_image(tmp_path / "s.img", 6)
    before = path.read_bytes()
    secondary = blockrep.ReplicatedDrive("drive0", RawImage(str(path)))
    blockrep.check({"drive0": secondary}, stream)  # the stream itself is fine
    with pytest.raises(StateError, match="disk stream: .*" + re.escape(message)):
        blockrep.check({"drive0": secondary}, mutate(stream))
    assert path.read_bytes() == before


def test_a_read_only_drive_takes_no_disk_stream(tmp_path):
    stream = good_stream(tmp_path)
    path = make_image(tmp_path / "s.img", 6)
    secondary = blockrep.ReplicatedDrive("drive0", RawImage(str(path), readonly=True))
    with pytest.raises(StateError, match="drive 'drive0' is read-only here"):
        blockrep.check({"drive0": secondary}, stream)

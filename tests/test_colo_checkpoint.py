"""The COLO checkpoint transaction, two pc machines in this process over a socketpair.

Both run store.elf (it rewrites a 16 MiB buffer pass after pass) in deterministic mode.
The secondary starts from the primary's full state; then both run for different lengths
of guest time (so they diverge, and the secondary writes pages the primary has not
written yet), and a checkpoint must make the secondary's full state digest equal to the
primary's at the moment it paused.  A checkpoint that is corrupted or cut short is
refused and changes nothing of the secondary's last good state; the pages it carried go
out again with the next one.  The secondary side runs in a thread, driven one checkpoint
at a time.  The disk tests give each machine a virtio disk on its own copy of an image:
the primary's writes travel with the checkpoint, the secondary's stay in its overlay, and
a bad disk stream refuses the checkpoint whole.
"""

import os
import socket
import struct
import threading

import numpy as np
import pytest
import xxhash
from conftest import firmware

from colo import checkpoint as ck
from colo import checkpointwire
from colo.wire import HEADER, ChannelError
from emu import blockrep
from emu.state import machinestate
from machines import pc

MS = 1_000_000
APPEND = "passes=100000 progress=1"


def build():
    return pc.build(kernel=firmware("store.elf"), append=APPEND, serial=["null"], icount_shift=0)


def advance(machine, ns):
    assert machine.run(until_ns=machine.clock.now() + ns) is None, "the guest must still be running"


def state_fingerprint(machine):
    """What Machine.state_digest() covers, hashed with XXH3 (milliseconds, not 0.1 s)."""
    h = xxhash.xxh3_128(machinestate.device_state_digest_bytes(machine))
    h.update(machine.ram.buf)
    return h.hexdigest()


def ram_hash(buf):
    return xxhash.xxh3_128(buf).hexdigest()


class Pair:
    def __init__(self, primary_cls=ck.CheckpointPrimary, debug=True, timeout=10.0):
        self.pm = self.build()
        advance(self.pm, 3 * MS)
        self.sm = self.build()
        self.sm.load_state(self.pm.save_state(ram_pages="all"))
        assert state_fingerprint(self.sm) == state_fingerprint(self.pm)
        a, b = socket.socketpair()
        self.primary = primary_cls(self.pm, a, debug=debug, timeout=timeout)
        self.secondary = ck.CheckpointSecondary(self.sm, b, timeout=timeout)
        both(self.secondary.handshake, self.primary.handshake)

    def build(self):
        return build()

    def checkpoint(self):
        """(primary record or exception, secondary record or exception)."""
        return both(self.secondary.serve_one, self.primary.checkpoint, capture=True)

    def good_checkpoint(self):
        prec, srec = self.checkpoint()
        assert not isinstance(prec, Exception), prec
        assert not isinstance(srec, Exception), srec
        assert prec.status == srec.status == "ok"
        assert prec.primary_digest is not None  # the secondary checked its state digest against it
        assert state_fingerprint(self.sm) == state_fingerprint(self.pm)
        assert ram_hash(self.secondary.cache) == ram_hash(self.pm.ram.buf)
        assert self.pm.status == self.sm.status == "running"
        return prec, srec

    def close(self):
        self.primary.close()
        self.secondary.close()


def both(secondary_fn, primary_fn, capture=False):
    """Run ``secondary_fn`` in a thread and ``primary_fn`` here; results (or, with
    ``capture``, the exceptions) of both."""
    out = {}

    def run_secondary():
        try:
            out["s"] = secondary_fn()
        except Exception as e:  # noqa: BLE001 - handed to the test
            out["s"] = e

    t = threading.Thread(target=run_secondary)
    t.start()
    try:
        p = primary_fn()
    except Exception as e:
        if not capture:
            raise
        p = e
    finally:
        t.join(20)
    assert not t.is_alive(), "the secondary side hung"
    if not capture and isinstance(out["s"], Exception):
        raise out["s"]
    return p, out["s"]


@pytest.fixture
def pair():
    p = Pair()
    yield p
    p.close()


def test_checkpoint_makes_the_diverged_secondary_equal_to_the_paused_primary(pair):
    advance(pair.pm, 3 * MS)
    advance(pair.sm, 5 * MS)  # ahead of the primary: it writes pages the primary has not
    assert state_fingerprint(pair.sm) != state_fingerprint(pair.pm)
    prec, srec = pair.good_checkpoint()
    assert pair.sm.state_digest() == prec.primary_digest
    assert 0 < prec.pages < pair.pm.ram.npages // 2, "only the dirtied pages travel"
    assert srec.pages == prec.pages and srec.device_bytes == prec.device_bytes > 0
    assert srec.restored > 0, "pages only the secondary wrote must be restored from the cache"
    assert srec.own_dirty > srec.restored
    # from the same state, in deterministic mode, both continue identically
    advance(pair.pm, 2 * MS)
    advance(pair.sm, 2 * MS)
    assert state_fingerprint(pair.sm) == state_fingerprint(pair.pm)


def test_several_checkpoints_in_a_row(pair):
    for i, (p_ns, s_ns) in enumerate([(2 * MS, 1 * MS), (1 * MS, 3 * MS), (0, 2 * MS), (2 * MS, 0)], start=1):
        advance(pair.pm, p_ns) if p_ns else None
        advance(pair.sm, s_ns) if s_ns else None
        prec, srec = pair.good_checkpoint()
        assert prec.seq == srec.seq == i
        if p_ns == 0:
            assert prec.pages == 0, "an idle primary has nothing to send"
    assert pair.secondary.applied_seq == 4
    assert not pair.primary.unacked.any()


class CorruptingPrimary(ck.CheckpointPrimary):
    """Sends one checkpoint altered by ``self.corrupt(checkpoint)``, or cut off after
    ``self.cut_after`` bytes of its device state."""

    corrupt = None
    cut_after = None

    def send_checkpoint(self, c):
        if self.corrupt is not None:
            c, self.corrupt = self.corrupt(c), None
        if self.cut_after is None:
            return super().send_checkpoint(c)
        ch = self.channel
        ch.send(ck.VMSTATE_SEND, ck.SEND.pack(c.seq, len(c.ram_stream)), c.ram_stream)
        ch.send(ck.VMSTATE_SIZE, ck.SEQ.pack(len(c.device_state)), c.device_state[:self.cut_after])
        self.channel.sock.shutdown(socket.SHUT_WR)  # the primary dies here


@pytest.fixture
def cpair():
    p = Pair(primary_cls=CorruptingPrimary)
    yield p
    p.close()


def wrong_digest(c):
    c.digest = bytes([c.digest[0] ^ 1]) + c.digest[1:]
    return c


def truncated_device_state(c):
    """A shorter device buffer, consistently announced and digested: only parsing catches it."""
    c.device_state = c.device_state[:len(c.device_state) // 2]
    c.digest = ck.checkpoint_digest(c.seq, c.ram_stream, c.device_state, c.replication_part, c.disk_stream)
    return c


def stale_digest(c):
    """A digest made for another sequence number (a replayed checkpoint)."""
    c.digest = ck.checkpoint_digest(c.seq - 1, c.ram_stream, c.device_state, c.replication_part, c.disk_stream)
    return c


@pytest.mark.parametrize("corrupt, message", [
    (wrong_digest, "digest mismatch"),
    (truncated_device_state, "truncated"),
    (stale_digest, "digest mismatch"),
])
def test_refused_checkpoint_changes_nothing_and_its_pages_go_again(cpair, corrupt, message):
    advance(cpair.pm, 2 * MS)
    cpair.good_checkpoint()
    good_digest = state_fingerprint(cpair.sm)
    good_cache = ram_hash(cpair.secondary.cache)
    advance(cpair.pm, 2 * MS)
    cpair.primary.corrupt = corrupt
    prec, srec = cpair.checkpoint()
    assert isinstance(srec, ck.CheckpointRejected) and message in str(srec), srec
    assert isinstance(prec, ck.CheckpointAbandoned) and message in prec.reason, prec
    assert cpair.primary.records[-1].status == "abandoned"
    refused_pages = set(np.flatnonzero(cpair.primary.unacked).tolist())
    assert len(refused_pages) == cpair.primary.records[-1].pages > 0
    # nothing applied: state, cache and the last applied checkpoint are those of the good one
    assert state_fingerprint(cpair.sm) == good_digest
    assert ram_hash(cpair.secondary.cache) == good_cache
    assert cpair.secondary.applied_seq == 1
    assert cpair.pm.status == cpair.sm.status == "running"
    # the primary did not run: the next checkpoint carries exactly the refused pages, and they make it
    prec, _ = cpair.good_checkpoint()
    assert prec.seq == 3 and prec.pages == len(refused_pages)


def test_checkpoint_a_device_refuses_leaves_the_secondary_as_it_was(cpair):
    """A checkpoint whose digest and streams check out, but whose UART state the device
    refuses when it is applied: the secondary goes back to its own state of the pause (not
    the last checkpoint's: it ran on since), the cache is untouched, the pages go again."""
    advance(cpair.pm, 2 * MS)
    cpair.good_checkpoint()
    advance(cpair.sm, 1 * MS)
    own_state, good_cache = state_fingerprint(cpair.sm), ram_hash(cpair.secondary.cache)
    advance(cpair.pm, 2 * MS)
    uart = dict(machinestate.state_objects(cpair.pm))["serial@0x3f8"]

    def refused_by_the_uart(c):
        ier, uart.ier = uart.ier, 0xFF
        try:
            c.device_state = cpair.pm.save_state()
        finally:
            uart.ier = ier
        c.digest = ck.checkpoint_digest(c.seq, c.ram_stream, c.device_state, c.replication_part, c.disk_stream)
        return c
    cpair.primary.corrupt = refused_by_the_uart
    prec, srec = cpair.checkpoint()
    assert isinstance(srec, ck.CheckpointRejected) and "field ier" in str(srec), srec
    assert isinstance(prec, ck.CheckpointAbandoned), prec
    assert state_fingerprint(cpair.sm) == own_state
    assert ram_hash(cpair.secondary.cache) == good_cache
    assert cpair.secondary.applied_seq == 1
    prec, _ = cpair.good_checkpoint()
    assert prec.seq == 3


def test_checkpoint_cut_off_mid_device_state_is_not_applied(cpair):
    advance(cpair.pm, 2 * MS)
    advance(cpair.sm, 1 * MS)
    cpair.good_checkpoint()
    good_digest = state_fingerprint(cpair.sm)
    good_cache = ram_hash(cpair.secondary.cache)
    advance(cpair.pm, 2 * MS)
    advance(cpair.sm, 3 * MS)  # the secondary runs on meanwhile
    cpair.primary.cut_after = 100
    prec, srec = cpair.checkpoint()
    assert isinstance(srec, ChannelError) and "connection closed" in str(srec), srec
    assert isinstance(prec, (ChannelError, ck.CheckpointAbandoned)), prec  # a live primary hears why
    assert cpair.secondary.records[-1].status == "failed"
    assert cpair.sm.status == "paused"
    assert ram_hash(cpair.secondary.cache) == good_cache
    assert cpair.secondary.applied_seq == 1
    # a failover resumes from the last applied checkpoint
    cpair.secondary.restore_last_checkpoint()
    assert state_fingerprint(cpair.sm) == good_digest


def test_secondary_that_ran_on_goes_back_to_the_last_checkpoint(pair):
    pair.good_checkpoint()
    good_digest = state_fingerprint(pair.sm)
    advance(pair.sm, 3 * MS)
    assert state_fingerprint(pair.sm) != good_digest
    pair.sm.pause()
    pair.secondary.restore_last_checkpoint()
    assert state_fingerprint(pair.sm) == good_digest


def test_debug_mode_catches_an_inconsistent_secondary(pair, monkeypatch):
    advance(pair.pm, 1 * MS)
    advance(pair.sm, 2 * MS)
    monkeypatch.setattr(pair.secondary, "_flush", lambda pages: pair.sm.dirty_pages())
    prec, srec = pair.checkpoint()
    assert isinstance(srec, ck.ConsistencyError), srec
    assert isinstance(prec, ck.CheckpointAbandoned) and "differs" in prec.reason
    assert pair.primary.unacked.any(), "an unconfirmed checkpoint keeps its pages"
    assert "device sections none" in str(srec) and "0 of them neither sent nor written here" in str(srec), srec


def test_debug_mode_names_a_page_the_primary_dirty_log_missed(pair):
    advance(pair.pm, 1 * MS)
    advance(pair.sm, 2 * MS)
    pair.pm.ram.buf[0x7123] ^= 0x5A  # behind the dirty log's back
    prec, srec = pair.checkpoint()
    assert isinstance(srec, ck.ConsistencyError), srec
    assert "1 RAM pages (0x7000)" in str(srec) and "1 of them neither sent nor written here" in str(srec), srec


# ---------------------------------------------------------------- hostile peers, raw frames
def frame(kind, payload=b""):
    return HEADER.pack(kind, len(payload)) + payload


@pytest.fixture
def raw_secondary():
    """A secondary fed by hand-made frames (no guest needs to run)."""
    machine = build()
    a, b = socket.socketpair()
    secondary = ck.CheckpointSecondary(machine, b, timeout=5.0)
    digest = state_fingerprint(machine)
    yield secondary, a, digest
    a.close()
    secondary.close()


def reply(sock):
    kind, length = HEADER.unpack(sock.recv(HEADER.size, socket.MSG_WAITALL))
    return kind, sock.recv(length, socket.MSG_WAITALL) if length else b""


@pytest.mark.parametrize("version", [checkpointwire.PROTOCOL_VERSION - 1, checkpointwire.PROTOCOL_VERSION + 1])
def test_handshake_refuses_another_protocol_version(raw_secondary, version):
    secondary, peer, _ = raw_secondary
    bad = bytearray(ck.ready_payload(secondary.machine))
    magic = checkpointwire.MAGIC
    bad[len(magic):len(magic) + 4] = struct.pack(">I", version)
    peer.sendall(frame(ck.CHECKPOINT_READY, bytes(bad)))
    with pytest.raises(ChannelError, match=f"protocol {version}"):
        secondary.handshake()
    kind, payload = reply(peer)
    assert kind == ck.ABANDON and f"protocol {version}".encode() in payload


@pytest.mark.parametrize("frames, message", [
    ([frame(ck.CHECKPOINT_REQUEST, ck.SEQ.pack(1)), frame(ck.VMSTATE_SEND, ck.SEND.pack(1, 1 << 40))],
     "exceeds"),
    ([frame(ck.CHECKPOINT_REQUEST, ck.SEQ.pack(1)), frame(ck.VMSTATE_SEND, ck.SEND.pack(1, 0)),
      frame(ck.VMSTATE_SIZE, ck.SEQ.pack(1 << 40))], "exceeds the limit"),
    ([frame(ck.CHECKPOINT_REQUEST, ck.SEQ.pack(1)), frame(ck.VMSTATE_SEND, ck.SEND.pack(7, 0))],
     "checkpoint 7 inside checkpoint 1"),
    ([frame(ck.CHECKPOINT_REQUEST, ck.SEQ.pack(1) + b"x")], "payload of 9 bytes"),
    ([HEADER.pack(ck.CHECKPOINT_REQUEST, 1 << 40)], "payload of"),
    ([frame(77)], "unknown message type 77"),
    ([frame(ck.VMSTATE_LOADED, ck.LOADED.pack(1, 0))], "expected CHECKPOINT_REQUEST"),
])
def test_hostile_frames_are_refused_before_use(raw_secondary, frames, message):
    secondary, peer, digest = raw_secondary
    peer.sendall(b"".join(frames))
    with pytest.raises(ChannelError, match=message):
        secondary.serve_one()
    assert secondary.applied_seq == 0
    assert state_fingerprint(secondary.machine) == digest


def test_replayed_sequence_number_is_refused(raw_secondary):
    secondary, peer, digest = raw_secondary
    secondary.last_seq = 5  # as after five checkpoints
    peer.sendall(frame(ck.CHECKPOINT_REQUEST, ck.SEQ.pack(5)))
    with pytest.raises(ck.CheckpointRejected, match="not newer"):
        secondary.serve_one()
    kind, _ = reply(peer)
    assert kind == ck.ABANDON
    assert state_fingerprint(secondary.machine) == digest



# ---------------------------------------------------------------- disks (emu/blockrep.py)
IMAGE_SIZE = 1 << 20
DRIVE = "drive0"


class DiskPair(Pair):
    """A pair whose machines each have a virtio disk on their own copy of one image.  The
    guest's writes go through the drive, the path of every virtio-blk request."""

    def __init__(self, tmp_path):
        self.p_img, self.s_img = tmp_path / "p.img", tmp_path / "s.img"
        self.p_img.write_bytes(np.random.default_rng(7).integers(0, 256, IMAGE_SIZE, dtype=np.uint8).tobytes())
        self.s_img.write_bytes(self.p_img.read_bytes())  # as the pair's initial sync leaves them
        self._images = iter([self.p_img, self.s_img])
        super().__init__(primary_cls=CorruptingPrimary)

    def build(self):
        return pc.build(kernel=firmware("store.elf"), append=APPEND, serial=["null"], icount_shift=0,
                        drives=[f"file={next(self._images)},format=raw,if=virtio"])

    def write(self, machine, block, data):
        machine.drives[DRIVE].write(block * 4096, data)

    def view(self, machine):
        """The disk as the machine's guest reads it."""
        return machine.drives[DRIVE].read(0, IMAGE_SIZE)


@pytest.fixture
def dpair(tmp_path):
    p = DiskPair(tmp_path)
    yield p
    p.close()


def test_a_checkpoint_carries_the_primarys_disk_writes_and_discards_the_secondarys(dpair):
    original = dpair.s_img.read_bytes()
    advance(dpair.pm, 1 * MS)
    dpair.write(dpair.pm, 3, b"p" * 8192)         # blocks 3 and 4
    dpair.write(dpair.pm, 255, b"q" * 512)        # part of the last block
    dpair.write(dpair.sm, 3, b"s" * 512)          # the secondary's own writes: only in its overlay
    dpair.write(dpair.sm, 100, b"t" * 4096)
    assert dpair.view(dpair.sm)[100 * 4096:101 * 4096] == b"t" * 4096
    assert dpair.s_img.read_bytes() == original
    prec, srec = dpair.good_checkpoint()
    assert prec.disk_blocks == srec.disk_blocks == 3 and srec.own_disk_blocks == 2
    assert prec.disk_bytes == srec.disk_bytes > 3 * 4096
    assert dpair.s_img.read_bytes() == dpair.p_img.read_bytes()
    assert dpair.view(dpair.sm) == dpair.view(dpair.pm)
    prec, _ = dpair.good_checkpoint()
    assert prec.disk_blocks == 0, "acknowledged blocks do not go again"


def _redigest(c, disk_stream):
    c.disk_stream = disk_stream
    c.digest = ck.checkpoint_digest(c.seq, c.ram_stream, c.device_state, c.replication_part, c.disk_stream)
    return c


def disk_cut_short(c, drive):
    """A disk stream cut in its last block, consistently announced and digested."""
    return _redigest(c, c.disk_stream[:-100])


def disk_of_an_unknown_drive(c, drive):
    return _redigest(c, blockrep.encode({"drive9": drive}, {"drive9": np.array([1])}))


def disk_block_past_the_end(c, drive):
    return _redigest(c, blockrep.encode({DRIVE: drive}, {DRIVE: np.array([3, IMAGE_SIZE // 4096])}))


def disk_bytes_flipped(c, drive):
    c.disk_stream = c.disk_stream[:40] + bytes([c.disk_stream[40] ^ 1]) + c.disk_stream[41:]
    return c


@pytest.mark.parametrize("corrupt, message", [
    (disk_cut_short, "disk stream: drive 'drive0' truncated"),
    (disk_of_an_unknown_drive, "unknown drive 'drive9'"),
    (disk_block_past_the_end, "block 256 beyond the image's end (256 blocks)"),
    (disk_bytes_flipped, "digest mismatch"),
])
def test_a_bad_disk_stream_refuses_the_checkpoint_whole_and_its_blocks_go_again(dpair, corrupt, message):
    dpair.write(dpair.pm, 1, b"a" * 4096)
    dpair.good_checkpoint()
    good_image, good_cache = dpair.s_img.read_bytes(), ram_hash(dpair.secondary.cache)
    advance(dpair.pm, 2 * MS)
    dpair.write(dpair.pm, 3, b"b" * 4096)
    dpair.write(dpair.pm, 200, b"c" * 512)
    dpair.write(dpair.sm, 7, b"d" * 4096)           # the secondary's own write, in its overlay
    own_view, own_state = dpair.view(dpair.sm), state_fingerprint(dpair.sm)
    dpair.primary.corrupt = lambda c: corrupt(c, dpair.pm.drives[DRIVE])
    prec, srec = dpair.checkpoint()
    assert isinstance(srec, ck.CheckpointRejected) and message in str(srec), srec
    assert isinstance(prec, ck.CheckpointAbandoned), prec
    # nothing touched: state, cache, image, and the overlay of the secondary's own write
    assert state_fingerprint(dpair.sm) == own_state and ram_hash(dpair.secondary.cache) == good_cache
    assert dpair.s_img.read_bytes() == good_image and dpair.view(dpair.sm) == own_view
    assert dpair.secondary.applied_seq == 1
    prec, srec = dpair.good_checkpoint()  # the refused blocks go again, and make it
    assert prec.seq == 3 and prec.disk_blocks == 2 and srec.own_disk_blocks == 1
    assert dpair.s_img.read_bytes() == dpair.p_img.read_bytes()


def test_a_checkpoint_cut_off_in_its_disk_stream_writes_nothing(dpair):
    dpair.good_checkpoint()
    good_image = dpair.s_img.read_bytes()
    dpair.write(dpair.pm, 9, os.urandom(3 * 4096))

    def cut_in_the_disk_stream(c):
        ch = dpair.primary.channel
        ch.send(ck.VMSTATE_SEND, ck.SEND.pack(c.seq, len(c.ram_stream)), c.ram_stream)
        ch.send(ck.VMSTATE_SIZE, ck.SEQ.pack(len(c.device_state)), c.device_state)
        ch.send(ck.REPLICATION_STATE, ck.SEQ.pack(len(c.replication_part)), c.replication_part)
        ch.send(ck.DISK_WRITES, ck.SEQ.pack(len(c.disk_stream)), c.disk_stream[:5000])
        ch.sock.shutdown(socket.SHUT_WR)  # the primary dies here
        raise ChannelError("the primary died")
    dpair.primary.send_checkpoint = cut_in_the_disk_stream
    prec, srec = dpair.checkpoint()
    assert isinstance(srec, ChannelError) and "connection closed" in str(srec), srec
    assert dpair.s_img.read_bytes() == good_image and dpair.secondary.applied_seq == 1


def test_failover_to_the_last_checkpoint_discards_the_secondarys_own_writes(dpair):
    dpair.write(dpair.pm, 5, b"e" * 4096)
    dpair.good_checkpoint()
    checkpointed = dpair.s_img.read_bytes()
    advance(dpair.sm, 2 * MS)
    dpair.write(dpair.sm, 6, b"f" * 4096)
    dpair.sm.pause()
    dpair.secondary.restore_last_checkpoint()
    assert dpair.view(dpair.sm) == checkpointed
    dpair.write(dpair.sm, 8, b"g" * 4096)  # serving alone: writes reach the image
    assert dpair.s_img.read_bytes()[8 * 4096:9 * 4096] == b"g" * 4096


def test_failover_from_its_own_state_keeps_the_secondarys_own_writes(dpair):
    """Compare mode's takeover: the secondary goes on from the RAM it ran to, whose page
    cache and file system know of its own writes, so they are committed into the image."""
    dpair.good_checkpoint()
    dpair.write(dpair.pm, 4, b"h" * 4096)  # never checkpointed: lost with the primary
    dpair.write(dpair.sm, 6, b"i" * 4096)
    seen = dpair.view(dpair.sm)
    dpair.secondary.keep_own_state()
    assert dpair.s_img.read_bytes() == seen and seen[6 * 4096:7 * 4096] == b"i" * 4096
    assert seen[4 * 4096:5 * 4096] != b"h" * 4096
    dpair.write(dpair.sm, 8, b"j" * 512)
    assert dpair.s_img.read_bytes()[8 * 4096:8 * 4096 + 512] == b"j" * 512

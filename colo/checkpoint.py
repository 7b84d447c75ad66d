"""The COLO checkpoint transaction, each side read top to bottom in one place.

:meth:`CheckpointPrimary._transaction` and :meth:`CheckpointSecondary.take` follow
QEMU's ``colo_do_checkpoint_transaction`` and ``colo_process_incoming_thread``
(``migration/colo.c``); their messages are :mod:`colo.checkpointwire`'s.  Both sides use
a machine only through its replication surface (:mod:`emu.replication`), and a VM's
COLO link (:mod:`colo.link`) for the checkpoint's replication part.

The primary's side runs inside the run loop, and the guest runs while the secondary gets
ready and while it applies: the transaction is a generator that yields the
:class:`Phase` it then waits in, and :meth:`CheckpointPrimary.step` resumes it with the
secondary's message that ends that phase (:data:`TRANSITIONS`).  The guest is paused only
to capture its state, which a sender thread then sends while it runs on (Remus'
speculative execution: its later output is held until the checkpoint is applied anyway).

The secondary keeps a RAM cache, a full copy of guest RAM equal to the primary's RAM at
the last applied checkpoint.  Nothing of a checkpoint reaches the cache or RAM before the
whole of it has arrived and checked out.  Then, in one pass, the received pages go into
the cache, and every page dirtied by either side since goes from the cache into RAM, so
that RAM ends equal to the primary's.  The primary clears a dirty bit only when the
secondary has loaded the checkpoint that carried the page: pages of an abandoned
checkpoint go out again with the next one.

The disks follow the same rule (QEMU's block replication, ``emu/blockrep.py``): the
primary logs the 4 KiB blocks its guest writes and each checkpoint carries those not yet
acknowledged, read from its images while paused; the secondary's own writes go to an
overlay in memory, which a checkpoint discards before it writes the primary's blocks into
the images.  So the secondary's images always hold the primary's disks of the last applied
checkpoint, and its guest sees them under its own writes since.

In debug mode the primary adds its full state digest (``state_digest()``) and a hash of
every RAM page, taken while paused, and the secondary checks that its own state digest
equals it once loaded; if not, it names the device sections and the pages that differ,
and whether those pages travelled in the checkpoint or were dirtied by the secondary.
"""

import enum
import hmac
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from emu.errors import EmuError, StateError
from emu.replication import PAGE_SIZE, CheckedDiskBlocks, CheckedRam, CheckedState, ReplicationSurface

from . import replicationpart
from .checkpointwire import (
    ABANDON,
    CHECKPOINT_READY,
    CHECKPOINT_REPLY,
    CHECKPOINT_REQUEST,
    DIGEST_SHA256,
    DIGEST_SIZES,
    DIGEST_XXH3,
    DISK_WRITES,
    HANDSHAKE_TIMEOUT_S,
    LOADED,
    MAX_DEVICE_STATE,
    NAMES,
    READY_PASSIVE,
    REPLICATION_STATE,
    REPLY_TIMEOUT_S,
    SEND,
    SEQ,
    STATE_DIGEST_SIZE,
    VMSTATE_DIGEST,
    VMSTATE_LOADED,
    VMSTATE_RECEIVED,
    VMSTATE_SEND,
    VMSTATE_SIZE,
    Channel,
    CheckpointAbandoned,
    CheckpointError,
    CheckpointRejected,
    ConsistencyError,
    check_ready,
    checkpoint_digest,
    max_disk_stream,
    max_ram_stream,
    ready_payload,
)
from .wire import ChannelError

#: phases of a checkpoint at which the fault-injection tests may kill the primary
FAULT_PHASES = ("after-request", "before-send", "mid-ram", "mid-device", "before-digest", "after-received")


class Phase(enum.Enum):
    """Where the primary's side of a checkpoint waits; each phase ends with one message."""

    REQUESTED = "requested"  # CHECKPOINT_REQUEST sent: the secondary stops and gets ready
    SENDING = "sending"      # captured: the state is on its way, the secondary checks it
    LOADING = "loading"      # the secondary has all of it and applies it


#: The message from the secondary that ends each phase.  ABANDON ends any phase (the
#: checkpoint is given up, the channel stays in step); any other message breaks the channel.
TRANSITIONS = {
    Phase.REQUESTED: CHECKPOINT_REPLY,
    Phase.SENDING: VMSTATE_RECEIVED,
    Phase.LOADING: VMSTATE_LOADED,
}


@dataclass
class Checkpoint:
    """What the primary captured while paused."""

    seq: int
    pages: np.ndarray
    ram_stream: bytes
    device_state: bytes
    replication_part: bytes
    disk_stream: bytes
    disk_blocks: int
    digest: bytes
    state_digest: bytes | None = None  # debug mode
    page_fingerprints: bytes | None = None  # debug mode


@dataclass
class CheckpointRecord:
    """One checkpoint as one side saw it (times in ms)."""

    seq: int
    trigger: str = "forced"  # periodic / output / mismatch / timeout / forced
    time: float = 0.0        # seconds since the pair entered COLO
    status: str = "started"  # ok / abandoned / rejected / failed
    error: str | None = None
    pages: int = 0
    ram_bytes: int = 0
    device_bytes: int = 0    # the device state and the replication part
    disk_blocks: int = 0     # 4 KiB disk blocks carried
    disk_bytes: int = 0      # the disk stream
    pause_ms: float = 0.0
    secondary_pause_ms: float | None = None  # primary: as the secondary reported it
    phases: dict = field(default_factory=dict)
    primary_digest: str | None = None  # primary, debug mode: its state digest while paused
    own_dirty: int = 0  # secondary: pages it wrote itself since the last checkpoint
    own_disk_blocks: int = 0  # secondary: disk blocks it wrote itself since (discarded)
    restored: int = 0   # secondary: of those, pages the primary did not send (taken from the cache)

    def as_dict(self):
        """The fields the records files and the report use."""
        return {"seq": self.seq, "time": round(self.time, 6), "trigger": self.trigger, "status": self.status,
                "pages": self.pages, "ram_bytes": self.ram_bytes, "device_bytes": self.device_bytes,
                "disk_blocks": self.disk_blocks, "disk_bytes": self.disk_bytes,
                "pause_ms": round(self.pause_ms, 3),
                "secondary_pause_ms": None if self.secondary_pause_ms is None else round(self.secondary_pause_ms, 3),
                "phases": {k: round(v, 3) for k, v in self.phases.items()}, "error": self.error}


class _Phases:
    """Times each step of a checkpoint into its record."""

    def __init__(self, record):
        self.record = record
        self.last = time.perf_counter()

    def mark(self, name):
        now = time.perf_counter()
        self.record.phases[name] = (now - self.last) * 1e3
        self.last = now


@dataclass(frozen=True)
class FaultInjection:
    """For the failover tests: call ``action(phase, seq)`` (which kills this process) at
    ``phase`` (one of :data:`FAULT_PHASES`) of checkpoint ``seq`` or any later one."""

    phase: str
    seq: int
    action: Callable[[str, int], None]

    def armed(self, phase, seq):
        return phase == self.phase and seq >= self.seq

    def hit(self, phase, seq):
        if self.armed(phase, seq):
            self.action(phase, seq)


class CheckpointListener(Protocol):
    """Who hears where the primary's checkpoints are (the COLO controller's triggers)."""

    def checkpoint_paused(self, seq: int) -> None:
        """The guest is paused for checkpoint ``seq``: the capture is about to start."""

    def checkpoint_ended(self, seq: int, ok: bool) -> None:
        """Checkpoint ``seq`` is over: loaded by the secondary, or not (its output is
        released as before, its pages go out again with the next one)."""


class CheckpointPrimary:
    """The primary side.  On construction the secondary's RAM must equal this machine's
    RAM (after the initial full migration): the dirty log starts from here.

    :meth:`request` starts a checkpoint and :meth:`step` takes every message the caller
    reads for it; :meth:`checkpoint` does both in one blocking call.  ``link``: the VM's
    COLO link, whose state travels in each checkpoint's replication part and whose output
    stream is marked at each pause.  ``background_send``: the guest resumes as soon as its
    state is captured, and a thread sends it (otherwise it stays paused until the
    secondary has received it)."""

    def __init__(self, machine: ReplicationSurface, sock, *, link=None, listener: CheckpointListener | None = None,
                 debug=False, timeout=REPLY_TIMEOUT_S, key=None, background_send=False, faults=None, started=None):
        self.machine = machine
        self.channel = Channel(sock, timeout, key, role="primary")
        self.link = link
        self.listener = listener
        self.debug = debug
        self.background_send = background_send
        self.faults = faults
        self.started = time.monotonic() if started is None else started
        self.digest_kind = DIGEST_SHA256 if key is not None else DIGEST_XXH3
        self.seq = 0
        self.unacked = np.zeros(machine.page_count, dtype=bool)  # sent, not yet loaded by the peer
        self.unacked_blocks = {drive_id: np.zeros(-(-size // 4096), dtype=bool)  # the same, of the disks
                               for drive_id, size in machine.disk_sizes().items()}
        self.records = []
        self.pending = None  # the record of the checkpoint in progress
        self.phase = None    # its Phase
        self.peer_passive = False
        self.sending = False      # the sender thread has a checkpoint: nobody else may write to the channel
        self.send_error = None
        self._steps = None        # the generator of the checkpoint in progress
        self._phases = None
        self._sender = None
        self._send_queue = queue.Queue()
        machine.start_dirty_log()
        machine.dirty_pages()
        machine.start_disk_write_log()
        machine.disk_writes()

    def handshake(self):
        with self.channel.patience(HANDSHAKE_TIMEOUT_S):  # the secondary first copies all of RAM into its cache
            self.channel.send(CHECKPOINT_READY, ready_payload(self.machine))
            _, payload = self.channel.recv((CHECKPOINT_READY,))
        self.peer_passive = bool(check_ready(payload, self.machine) & READY_PASSIVE)

    def checkpoint(self, trigger="forced"):
        """One whole checkpoint, blocking; returns its record.  Raises
        :class:`CheckpointAbandoned` (the secondary refused it, the channel goes on),
        :class:`CheckpointError` (this side could not capture) or :class:`ChannelError` (the
        channel is broken).  The machine runs on as before in every case."""
        record = self.request(trigger)
        while self.pending is record:
            try:
                kind, payload = self.channel.recv_any()
            except CheckpointAbandoned as e:
                kind, payload = ABANDON, e
            except ChannelError as e:
                self.fail_pending(str(e))
                raise
            self.step(kind, payload)
        return record

    def peer_busy(self):
        """Whether the secondary is working on a checkpoint (and so silent)."""
        return self.sending or self.phase in (Phase.SENDING, Phase.LOADING)

    def request(self, trigger):
        """Start checkpoint ``seq + 1``: ask the secondary to get ready."""
        if self.pending is not None or self.sending:
            raise CheckpointError(f"colo: checkpoint {self.seq} is still in progress")
        self.seq += 1
        record = CheckpointRecord(self.seq, trigger=trigger, time=time.monotonic() - self.started)
        self.records.append(record)
        self.pending, self._phases = record, _Phases(record)
        self._steps = self._transaction(record)
        self._advance(None)
        return record

    def step(self, kind, payload):
        """Act on a frame read from the channel (an ABANDON passed as its exception): the
        caller's loop reads, the transaction goes on."""
        record = self.pending
        if kind == ABANDON:
            if record is None:
                return
            record.status, record.error = "abandoned", str(payload)
            self._end(ok=False)
            raise payload
        if record is None:
            raise ChannelError(f"colo: unexpected {NAMES[kind]} with no checkpoint in progress")
        (seq,) = SEQ.unpack_from(payload)
        awaited = TRANSITIONS[self.phase]
        if seq != record.seq:
            self._break(f"colo: {NAMES[kind]} for checkpoint {seq}, expected {record.seq}")
        if kind != awaited:
            self._break(f"colo: unexpected {NAMES[kind]} while waiting for {NAMES[awaited]}")
        self._advance(payload)

    def _transaction(self, record):
        """One checkpoint, top to bottom (QEMU's ``colo_do_checkpoint_transaction``).

        Yields the phase it waits in; :meth:`step` sends in the message that ends it."""
        seq, phases = record.seq, self._phases
        self.channel.send(CHECKPOINT_REQUEST, SEQ.pack(seq))
        yield Phase.REQUESTED  # until CHECKPOINT_REPLY: the secondary has stopped
        self._fault("after-request", seq)
        phases.mark("request")
        resume = self._pause(record)
        try:
            checkpoint = self._capture_or_abandon(record)
            if self.background_send:
                self._send_in_background(checkpoint)
                resume()  # the guest runs on while its state goes out
            else:
                self.send_checkpoint(checkpoint)
                phases.mark("send")
            yield Phase.SENDING  # until VMSTATE_RECEIVED: the secondary has all of it, checked
        finally:
            resume()
        self._fault("after-received", seq)
        phases.mark("received")
        loaded = yield Phase.LOADING  # until VMSTATE_LOADED: the secondary runs the new state
        record.secondary_pause_ms = LOADED.unpack(loaded)[1] / 1e3
        phases.mark("loaded")
        self.unacked[:] = False  # pages dirtied since the capture are still in the machine's log
        for unacked in self.unacked_blocks.values():
            unacked[:] = False
        record.status = "ok"

    def _pause(self, record):
        """Pause the guest for ``record``'s capture and mark the output stream; returns
        the function that resumes it (once) and times the pause."""
        machine, seq = self.machine, record.seq
        paused_at = time.perf_counter()
        was_running = machine.status == "running"
        machine.pause()
        if self.link is not None:
            self.link.mark(seq)  # later output belongs to the next epoch
        if self.listener is not None:
            self.listener.checkpoint_paused(seq)
        self._phases.mark("stop")
        resumed = False

        def resume():
            nonlocal resumed
            if not resumed:
                resumed = True
                record.pause_ms = (time.perf_counter() - paused_at) * 1e3
                if was_running:
                    machine.resume()
        return resume

    def _capture_or_abandon(self, record):
        try:
            checkpoint = self.capture(record.seq, self._phases)
        except EmuError as e:
            self.channel.abandon(record.seq, f"primary could not capture its state: {e}")
            record.status, record.error = "failed", str(e)
            raise CheckpointError(f"colo: checkpoint {record.seq}: {e}") from None
        record.pages = len(checkpoint.pages)
        record.ram_bytes = len(checkpoint.ram_stream)
        record.device_bytes = len(checkpoint.device_state) + len(checkpoint.replication_part)
        record.disk_blocks, record.disk_bytes = checkpoint.disk_blocks, len(checkpoint.disk_stream)
        if checkpoint.state_digest is not None:
            record.primary_digest = checkpoint.state_digest.hex()
        return checkpoint

    def _advance(self, payload):
        """Run the transaction up to its next wait; the end of it ends the checkpoint."""
        record = self.pending
        try:
            self.phase = self._steps.send(payload)
        except StopIteration:
            self._end(ok=True)
        except ChannelError as e:
            if record.status == "started":
                record.status, record.error = "failed", str(e)
            self._end(ok=False)
            raise
        except BaseException:
            self._end(ok=False)
            raise

    def _end(self, ok):
        seq, steps = self.pending.seq, self._steps
        self.pending = self.phase = self._steps = None
        if steps is not None:
            steps.close()  # a transaction that waited paused resumes the guest on its way out
        if not ok and self.link is not None:
            self.link.unmark(seq)
        if self.listener is not None:
            self.listener.checkpoint_ended(seq, ok)

    def _break(self, reason):
        self.fail_pending(reason)
        raise ChannelError(reason)

    def fail_pending(self, reason):
        """The channel broke: end the checkpoint in progress, if any, as failed (nothing of
        it is acknowledged)."""
        if self.pending is not None:
            self.pending.status, self.pending.error = "failed", reason
            self._end(ok=False)

    def capture(self, seq, phases=None):
        """Paused: the pages to send (this interval's and any not yet acknowledged), the
        device state, the replication part and the disk blocks to send (the same rule) in
        buffers, the digest over them."""
        machine = self.machine
        mark = phases.mark if phases is not None else (lambda name: None)
        self.unacked[machine.dirty_pages()] = True
        pages = np.flatnonzero(self.unacked)
        mark("dirty-log")
        ram_stream = machine.save_ram(pages)
        mark("save-ram")
        device_state = machine.save_state()
        replication_part = replicationpart.encode(self.link.link_state() if self.link is not None else None)
        mark("save-devices")
        blocks = {}
        for drive_id, written in machine.disk_writes().items():
            self.unacked_blocks[drive_id][written] = True
            blocks[drive_id] = np.flatnonzero(self.unacked_blocks[drive_id])
        disk_stream = machine.save_disk_blocks(blocks)
        mark("save-disks")
        state_digest = bytes.fromhex(machine.state_digest()) if self.debug else None
        fingerprints = machine.page_fingerprints().tobytes() if self.debug else None
        digest = checkpoint_digest(seq, ram_stream, device_state, replication_part, disk_stream, self.digest_kind)
        mark("digest")
        return Checkpoint(seq, pages, ram_stream, device_state, replication_part, disk_stream,
                          sum(len(b) for b in blocks.values()), digest, state_digest, fingerprints)

    def _send_in_background(self, checkpoint):
        self.sending = True
        self.send_error = None
        if self._sender is None:  # one long-lived thread: starting one costs a GIL hand-over
            self._sender = threading.Thread(target=self._sender_loop, daemon=True, name="checkpoint sender")
            self._sender.start()
        self._send_queue.put(checkpoint)

    def _sender_loop(self):
        while True:
            checkpoint = self._send_queue.get()
            if checkpoint is None:
                return
            try:
                self.send_checkpoint(checkpoint)
                self._phases.mark("send")
            except ChannelError as e:
                self.send_error = e  # the run loop's next look at the channel reports it
            except BaseException as e:  # noqa: BLE001 (the thread must report, not vanish)
                self.send_error = ChannelError(f"colo: sending checkpoint {checkpoint.seq} failed: {e!r}")
            finally:
                self.sending = False

    def send_checkpoint(self, checkpoint):
        channel, seq = self.channel, checkpoint.seq
        self._fault("before-send", seq)
        if self._fault_armed("mid-ram", seq):
            channel.send(VMSTATE_SEND, SEND.pack(seq, len(checkpoint.ram_stream)))
            channel.sock.sendall(checkpoint.ram_stream[:len(checkpoint.ram_stream) // 2])
            self._fault("mid-ram", seq)
        channel.send(VMSTATE_SEND, SEND.pack(seq, len(checkpoint.ram_stream)), checkpoint.ram_stream)
        if self._fault_armed("mid-device", seq):  # between VMSTATE_SIZE and the end of the buffer
            channel.send(VMSTATE_SIZE, SEQ.pack(len(checkpoint.device_state)))
            channel.sock.sendall(checkpoint.device_state[:len(checkpoint.device_state) // 2])
            self._fault("mid-device", seq)
        channel.send(VMSTATE_SIZE, SEQ.pack(len(checkpoint.device_state)), checkpoint.device_state)
        channel.send(REPLICATION_STATE, SEQ.pack(len(checkpoint.replication_part)), checkpoint.replication_part)
        channel.send(DISK_WRITES, SEQ.pack(len(checkpoint.disk_stream)), checkpoint.disk_stream)
        self._fault("before-digest", seq)
        extra = (b"\x01" + checkpoint.state_digest + checkpoint.page_fingerprints
                 if checkpoint.state_digest is not None else b"\x00")
        channel.send(VMSTATE_DIGEST, bytes([self.digest_kind]) + checkpoint.digest + extra)

    def _fault_armed(self, phase, seq):
        return self.faults is not None and self.faults.armed(phase, seq)

    def _fault(self, phase, seq):
        if self.faults is not None:
            self.faults.hit(phase, seq)

    def close(self):
        if self._sender is not None:
            self._send_queue.put(None)
        self.channel.close()
        self.machine.stop_disk_write_log()


@dataclass
class _Received:
    """The buffers of a checkpoint whose sizes and digest checked out."""

    seq: int
    ram_stream: bytearray
    device_state: bytes
    replication_part: bytes
    disk_stream: bytes
    state_digest: bytes | None
    page_fingerprints: bytes | None


@dataclass
class _Incoming:
    """A checkpoint whose every stream checked out whole: ready to apply."""

    seq: int
    ram: CheckedRam       # the RAM stream's pages
    state: CheckedState   # the device state
    device_state: bytes   # the same, as received (the state to return to on a failover)
    link_state: object    # the link's LinkState, or None
    disk: CheckedDiskBlocks
    state_digest: bytes | None
    page_fingerprints: bytes | None


class CheckpointSecondary:
    """The secondary side.  On construction this machine (and its link, and its disks) must
    hold the primary's state (after the initial full migration): the RAM cache is copied
    from its RAM, its own dirty log starts, and its guest's disk writes go to the overlay."""

    def __init__(self, machine: ReplicationSurface, sock, *, link=None, timeout=REPLY_TIMEOUT_S, key=None,
                 passive=False, started=None):
        self.machine = machine
        self.started = time.monotonic() if started is None else started  # the records' time 0
        self.channel = Channel(sock, timeout, key, role="secondary")
        self.link = link
        self.passive = passive
        self.digest_kind = DIGEST_SHA256 if key is not None else DIGEST_XXH3
        self.cache = machine.copy_ram()
        self.last_state = machine.save_state()  # device state of the last applied checkpoint
        self.last_link_state = link.link_state() if link is not None else None
        self.last_seq = 0      # highest sequence number seen (a replay is refused)
        self.applied_seq = 0   # the checkpoint the cache and last_state stand for
        self.records = []
        self._own_dirty = np.empty(0, dtype=np.int64)  # the pages this side wrote before the last apply
        machine.start_dirty_log()
        machine.dirty_pages()
        machine.start_disk_overlay()

    def handshake(self):
        """Agree with the primary on the protocol, then tell the client endpoint that this
        side holds checkpoint 0 (the initial migration)."""
        with self.channel.patience(HANDSHAKE_TIMEOUT_S):
            _, payload = self.channel.recv((CHECKPOINT_READY,))
        try:
            check_ready(payload, self.machine)
        except ChannelError as e:
            self.channel.abandon(0, str(e))
            self.channel.close()
            raise
        self.channel.send(CHECKPOINT_READY, ready_payload(self.machine, READY_PASSIVE if self.passive else 0))
        if self.link is not None:
            self.link.send_sync(0)

    def serve_one(self):
        """Wait for and take one checkpoint; returns its record (see :meth:`take`)."""
        _, payload = self.channel.recv((CHECKPOINT_REQUEST,))
        return self.take(payload)

    def take(self, request_payload):
        """Serve the checkpoint whose CHECKPOINT_REQUEST payload the caller has read, top to
        bottom (QEMU's ``colo_process_incoming_thread``); returns its record.

        Raises :class:`CheckpointRejected` (this side refused the content) or
        :class:`CheckpointAbandoned` (the primary gave up): nothing applied, the VM resumed
        as it was, the channel goes on.  Raises :class:`ChannelError` when the channel broke
        (it is then closed): nothing applied and the VM left paused, for the caller to
        decide (:meth:`restore_last_checkpoint` for a failover)."""
        machine, channel = self.machine, self.channel
        (seq,) = SEQ.unpack(request_payload)
        record = CheckpointRecord(seq, time=time.monotonic() - self.started)
        self.records.append(record)
        self._refuse_replay(seq, record)
        phases = _Phases(record)
        stopped_at = time.perf_counter()
        was_running = machine.status == "running"
        machine.pause()
        try:
            channel.send(CHECKPOINT_REPLY, SEQ.pack(seq))
            own_state = machine.save_state()  # to return to if a device refuses; taken while the primary captures
            with channel.patience(REPLY_TIMEOUT_S):  # the primary may take a while to capture (debug mode)
                received = self._receive(seq, record)
            phases.mark("receive")
            channel.send(VMSTATE_RECEIVED, SEQ.pack(seq))
            incoming = self._check(received, record)
            self._apply(incoming, record, own_state)
            phases.mark("apply")
            if incoming.state_digest is not None:
                self._check_consistency(incoming)
                phases.mark("debug-check")
        except ChannelError as e:
            record.status, record.error = "failed", str(e)
            record.pause_ms = (time.perf_counter() - stopped_at) * 1e3
            channel.abandon(seq, str(e))
            channel.close()
            raise
        except (CheckpointError, StateError) as e:
            self._give_up(seq, record, e)
            self._resume(was_running, stopped_at, record)
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointRejected(f"colo: checkpoint {seq}: {e}") from None
        if self.link is not None:
            self.link.send_sync(seq)  # the client endpoint learns which output is committed now
        self._resume(was_running, stopped_at, record)
        record.status = "ok"
        channel.send(VMSTATE_LOADED, LOADED.pack(seq, int(record.pause_ms * 1e3)))
        return record

    def _refuse_replay(self, seq, record):
        if seq <= self.last_seq:
            reason = f"checkpoint {seq} is not newer than checkpoint {self.last_seq} (replayed?)"
            record.status, record.error = "rejected", reason
            self.channel.abandon(seq, reason)
            raise CheckpointRejected(f"colo: {reason}")
        self.last_seq = seq

    def _give_up(self, seq, record, error):
        """The checkpoint is not applied: say why (unless the primary gave up first)."""
        if isinstance(error, CheckpointAbandoned):
            record.status, record.error = "abandoned", str(error)
            return
        record.status, record.error = "rejected", str(error)
        self.channel.abandon(seq, str(error))

    def _resume(self, was_running, stopped_at, record):
        record.pause_ms = (time.perf_counter() - stopped_at) * 1e3
        if was_running:
            self.machine.resume()

    def _receive(self, seq, record):
        """Everything of checkpoint ``seq`` into this side's own buffers: sizes against
        their limits before anything is read, then the digest over all of it."""
        channel = self.channel
        _, payload = channel.recv((VMSTATE_SEND,))
        got_seq, ram_len = SEND.unpack(payload)
        if got_seq != seq:
            raise ChannelError(f"colo: VMSTATE_SEND for checkpoint {got_seq} inside checkpoint {seq}")
        ram_stream = channel.recv_exact(self._checked_size(seq, "RAM stream", ram_len, max_ram_stream(self.machine)))
        device_state = bytes(channel.recv_exact(self._recv_size(seq, VMSTATE_SIZE, "device state", MAX_DEVICE_STATE)))
        replication_part = bytes(channel.recv_exact(
            self._recv_size(seq, REPLICATION_STATE, "replication part", replicationpart.MAX_SIZE)))
        disk_stream = channel.recv_exact(self._recv_size(seq, DISK_WRITES, "disk stream",
                                                         max_disk_stream(self.machine)))
        _, payload = channel.recv((VMSTATE_DIGEST,))
        digest, state_digest, fingerprints = self._parse_digest(seq, payload)
        record.ram_bytes, record.device_bytes = len(ram_stream), len(device_state) + len(replication_part)
        record.disk_bytes = len(disk_stream)
        expected = checkpoint_digest(seq, ram_stream, device_state, replication_part, disk_stream, self.digest_kind)
        if not hmac.compare_digest(digest, expected):
            raise CheckpointRejected(f"colo: checkpoint {seq}: digest mismatch (corrupted, truncated or replayed)")
        return _Received(seq, ram_stream, device_state, replication_part, disk_stream, state_digest, fingerprints)

    def _recv_size(self, seq, kind, what, limit):
        _, payload = self.channel.recv((kind,))
        (size,) = SEQ.unpack(payload)
        return self._checked_size(seq, what, size, limit)

    @staticmethod
    def _checked_size(seq, what, size, limit):
        if size > limit:
            raise ChannelError(f"colo: checkpoint {seq}: {what} of {size} bytes exceeds the limit of {limit}")
        return size

    def _parse_digest(self, seq, payload):
        """(digest, state digest or None, page fingerprints or None) of a VMSTATE_DIGEST payload."""
        kind = payload[0]
        if kind != self.digest_kind:
            raise ChannelError(f"colo: checkpoint {seq}: digest kind {kind}, expected {self.digest_kind}"
                               f"{' (a keyed channel needs SHA-256)' if self.channel.key else ''}")
        size = DIGEST_SIZES[kind]
        digest, flag = payload[1:1 + size], payload[1 + size] if len(payload) > 1 + size else None
        debug_size = STATE_DIGEST_SIZE + 8 * self.machine.page_count
        if flag not in (0, 1) or len(payload) != 1 + size + 1 + flag * debug_size:
            raise ChannelError(f"colo: checkpoint {seq}: malformed VMSTATE_DIGEST")
        if not flag:
            return digest, None, None
        debug = payload[2 + size:]
        return digest, debug[:STATE_DIGEST_SIZE], debug[STATE_DIGEST_SIZE:]

    def _check(self, received, record):
        """Every stream of a checkpoint whose digest checked out, checked whole (refused
        whole if anything is off).  The digest vouches for the bytes, so the streams' own
        checksums are not computed again."""
        machine, seq = self.machine, received.seq
        try:
            ram = machine.check_ram(received.ram_stream, verify_checksum=False)
            state = machine.check_state(received.device_state, verify_checksum=False)
            if state.ram_pages is not None:
                raise StateError("the device state carries RAM pages")
            link_state = replicationpart.decode(received.replication_part, has_link=self.link is not None)
            disk = machine.check_disk_blocks(received.disk_stream, verify_checksum=False)
        except StateError as e:
            raise CheckpointRejected(f"colo: checkpoint {seq}: {e}") from None
        record.pages, record.disk_blocks = len(ram.pages), disk.count
        return _Incoming(seq, ram, state, received.device_state, link_state, disk, received.state_digest,
                         received.page_fingerprints)

    def _apply(self, incoming, record, own_state):
        """Device state first (a device that still refuses puts back ``own_state``, and
        nothing else has been touched), then the disks (this side's own writes discarded,
        the primary's blocks into the images), then the received pages into the cache, then
        every page either side dirtied from the cache into RAM, then the link."""
        machine = self.machine
        machine.apply_state(incoming.state, rollback=own_state)
        record.own_disk_blocks = machine.discard_disk_overlay()
        machine.write_disk_blocks(incoming.disk)
        incoming.ram.write_into(self.cache)
        own = machine.dirty_pages()
        flush = np.zeros(machine.page_count, dtype=bool)
        flush[incoming.ram.pages] = True
        record.own_dirty = len(own)
        self._own_dirty = own  # for a debug check's report
        record.restored = int(len(own) - np.count_nonzero(flush[own]))
        flush[own] = True
        self._flush(np.flatnonzero(flush))
        if self.link is not None:
            self.link.restore(incoming.link_state)
        self.last_state, self.last_link_state = incoming.device_state, incoming.link_state
        self.applied_seq = incoming.seq

    def _flush(self, pages):
        """Write ``pages`` of the cache into RAM; the machine's own marks of that write
        leave its dirty log."""
        self.machine.write_ram_pages(pages, self.cache)
        self.machine.dirty_pages()

    def _check_consistency(self, incoming):
        mine = self.machine.state_digest()
        if mine != incoming.state_digest.hex():
            raise ConsistencyError(f"colo: checkpoint {incoming.seq}: secondary state digest {mine} differs from "
                                   f"the primary's {incoming.state_digest.hex()}: {self._differences(incoming)}")

    def _differences(self, incoming):
        """Which device sections and RAM pages differ from the primary's, and for the
        pages, whether the checkpoint carried them and whether this side wrote them: a
        page in neither is one the primary's dirty log missed."""
        machine = self.machine
        own_sections = machine.check_state(machine.save_state(), verify_checksum=False).parsed.devices
        theirs = incoming.state.parsed.devices
        sections = sorted(f"{name}.{instance}" for name, instance in own_sections.keys() | theirs.keys()
                          if own_sections.get((name, instance)) != theirs.get((name, instance)))
        differ = np.flatnonzero(machine.page_fingerprints() != np.frombuffer(incoming.page_fingerprints, np.uint64))
        carried = np.isin(differ, incoming.ram.pages)
        written = np.isin(differ, self._own_dirty)
        pages = ", ".join(f"{p * PAGE_SIZE:#x}{'(sent)' if c else ''}{'(own)' if w else ''}"
                          for p, c, w in zip(differ[:16], carried[:16], written[:16], strict=True))
        return (f"device sections {', '.join(sections) or 'none'}; {len(differ)} RAM pages ({pages}"
                f"{', ...' if len(differ) > 16 else ''}), {int(np.count_nonzero(~carried & ~written))} of them "
                f"neither sent nor written here")

    def restore_last_checkpoint(self):
        """Put the (paused) machine back to the last applied checkpoint, to serve from it:
        the pages it wrote since come from the cache, the device state and the link's
        streams from that checkpoint, and its disks are the images (which hold that
        checkpoint's): the overlay of its writes since is discarded, and writes go to the
        images from now on.  Its writes cannot be kept: the restored RAM (page cache,
        journal position, the file system's idea of what is on disk) knows nothing of them."""
        machine = self.machine
        machine.load_state(self.last_state)
        self._flush(machine.dirty_pages())
        if self.link is not None:
            self.link.restore(self.last_link_state)
        machine.end_disk_overlay(commit=False)

    def keep_own_state(self):
        """Serve from the state this side reached itself (a failover in COLO's compare mode,
        and any failover outside a checkpoint's apply): its RAM and devices stay as they
        ran, so its disks must be what its guest saw, the last checkpoint's images under
        its own writes since.  The overlay is committed into the images and writes go
        there from now on, as QEMU's failover commits the active and hidden disks into the
        secondary disk (``block/replication.c``, ``replication_stop``): the secondary's own
        writes are kept, and the primary's since the checkpoint, which here travel only
        inside the next checkpoint, are lost with it."""
        self.machine.end_disk_overlay(commit=True)

    def close(self):
        self.channel.close()

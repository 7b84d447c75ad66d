"""COLO in the run loop: the primary's and the secondary's side of a protected pair.

A pair enters COLO at the end of a live migration with the ``x-colo`` capability: the
migration socket becomes the checkpoint channel (:mod:`colo.checkpoint`), and both
machines keep running their loops; this module drives the transaction from there:

* The primary asks for a checkpoint every ``x-checkpoint-delay`` ms, when the client
  endpoint asks (the compare found a mismatch, or primary output waited too long for its
  twin), in passive mode as soon as output waits (``output`` trigger: Remus' output
  commit, so latency stays low), and at once when the delay is changed.  The guest keeps
  running while the secondary gets ready and while it applies; it is paused only to
  capture, send, and hear VMSTATE_RECEIVED.
* Both sides send heartbeats on the channel when idle; silence longer than the timeout, a
  broken channel or ``x-colo-lost-heartbeat`` ends COLO on that side.
* Whoever is left must hold the arbiter's lease before it serves (split brain: when the
  link is cut but both live, only the lease holder goes on); it then tells the client
  endpoint TAKEOVER.  The secondary continues from its own state, which is the last
  applied checkpoint in passive mode (it never ran) and, in compare mode, a state whose
  every released byte it produced itself; an incomplete checkpoint was never applied.
"""

import collections
import os
import signal
import sys
import time
from dataclasses import dataclass

from emu.errors import EmuError

from . import checkpoint as ck
from .wire import ChannelError

LEASE_RETRY_S = 0.02
RECENT_RECORDS = 1000


@dataclass
class ColoSettings:
    """What a pair is configured with (``emu colo`` options; QMP for the checkpoint delay)."""

    heartbeat_period_ms: float = 100.0
    heartbeat_timeout_ms: float = 1000.0
    output_delay_ms: float = 1.0       # passive: checkpoint this soon after output appears
    arbiter: tuple | None = None       # (host, port)
    group: str = "colo"
    node: str = ""
    key: bytes | None = None
    debug: bool = False                # compare full state digests after every checkpoint
    records: str | None = None         # per-checkpoint records file (.json / .csv)
    status_line: bool | None = None    # live status line (default: when stderr is a terminal)
    kill_at: tuple | None = None       # (phase, seq): the primary SIGKILLs itself there (failover tests)


class ColoStatus:
    """query-colo-status: the mode now, the mode before the last exit, and why it ended."""

    def __init__(self):
        self.mode = "none"
        self.last_mode = "none"
        self.reason = "none"

    def info(self):
        return {"mode": self.mode, "last-mode": self.last_mode, "reason": self.reason}


class Lease:
    """The right to serve: from the arbiter when one is configured, else a local epoch
    (the client endpoint then accepts the first takeover of a given epoch only)."""

    def __init__(self, settings, node):
        self.client = None
        self.epoch = 0
        if settings.arbiter is not None:
            from .arbiter import ArbiterClient
            self.client = ArbiterClient(settings.arbiter, settings.group, node,
                                        timeout=max(settings.heartbeat_timeout_ms / 1e3, 0.2))

    def acquire(self, bump=False):
        if self.client is None:
            self.epoch = max(self.epoch, 1) + (1 if bump else 0)
            return self.epoch
        self.epoch = self.client.acquire(bump=bump)
        return self.epoch

    def renew(self):
        if self.client is not None:
            self.client.renew()

    def close(self):
        if self.client is not None:
            self.client.close()


class _Side:
    """What both sides share: the channel, heartbeats, the exit, the figures."""

    mode = "none"

    def __init__(self, machine, migration, settings, link):
        self.machine = machine
        self.migration = migration
        self.settings = settings
        self.link = link
        self.status = migration.colo_status
        self.active = False
        self.exit_reason = None
        self.channel = None
        self.lease = None
        self.started = time.monotonic()
        self.writer = None
        self.totals = {"checkpoints": 0, "ok": 0, "failed": 0, "rejected": 0, "bytes": 0, "triggers": {}}
        self.recent = collections.deque(maxlen=RECENT_RECORDS)  # finished records, for medians
        self.status_line = None
        self.last_status = 0.0
        self.failover_ms = None
        self.serving = False  # took over (or never had a peer to lose): renews its lease while it serves
        self.last_renew = time.monotonic()
        self.lease_warned = False

    def _begin(self, channel):
        m = self.machine
        self.channel = channel
        self.active = True
        self.status.mode = self.mode
        self.status.reason = "processing"
        self.migration.colo = self
        self.migration.state.status = "colo"
        self._channel_fd = channel.sock.fileno()  # kept: a closed socket no longer tells its number
        m.add_fd_handler(self._channel_fd, self._on_readable)
        m.background_jobs.append(self._tick)
        m.idle_wait_cap = min(m.idle_wait_cap, self.settings.heartbeat_period_ms / 2e3)
        if self.settings.records:
            from .report import RecordWriter
            self.writer = RecordWriter(self.settings.records)
        from .status import StatusLine
        self.status_line = StatusLine(enabled=self.settings.status_line)

    def _heartbeat(self, now):
        ch, s = self.channel, self.settings
        if self.sending():  # a checkpoint on its way: the data is the sign of life, and has the channel
            return True
        if now - ch.last_sent >= s.heartbeat_period_ms / 1e3:
            try:
                ch.heartbeat()
            except ChannelError as e:
                self.peer_lost(f"{e}", "error")
                return False
        # the peer sends nothing while it takes a checkpoint: a dead one closes its socket,
        # a hung one is given the transaction's own, longer timeout
        limit = ck.REPLY_TIMEOUT_S if self.busy() else s.heartbeat_timeout_ms / 1e3
        if now - ch.last_heard > limit:
            self.peer_lost(f"colo: no heartbeat from the peer for {limit * 1e3:.0f} ms", "error")
            return False
        return True

    def _leave(self, reason_text, reason):
        """Stop replicating (the caller then serves alone or stops)."""
        m = self.machine
        self.active = False
        self.exit_reason = reason_text
        if self.channel is not None:
            m.remove_fd_handler(self._channel_fd)
            self.channel.close()
        self.status.last_mode, self.status.mode, self.status.reason = self.mode, "none", reason
        self.migration.state.status = "completed"
        self._say(f"leaving COLO ({reason}): {reason_text}")

    def _renew_lease(self, now):
        """Keep the lease while this side serves or protects; losing it means another side
        was granted the right to serve: stop at once."""
        if self.lease is None or now - self.last_renew < self.settings.heartbeat_period_ms / 1e3:
            return
        self.last_renew = now
        try:
            self.lease.renew()
        except EmuError as e:
            from .arbiter import LeaseLost
            if isinstance(e, LeaseLost):
                self._say(f"lost the lease: {e}; stopping")
                self.machine.stop()
                self.machine.request_exit(1, f"colo: lost the arbiter lease ({e}): another side serves")
            elif not self.lease_warned:
                self.lease_warned = True
                self._say(f"cannot renew the lease: {e}")

    def sending(self):
        return False

    def busy(self):
        """Whether the peer is working on a checkpoint (and so silent)."""
        return False

    def _tick(self):
        """Between slices: heartbeats, lease, triggers (while in COLO); the lease alone after."""
        now = time.monotonic()
        if self.active:
            self._tick_active(now)
            return
        if self.serving:
            self._renew_lease(now)
        self._update_status_line(now, serving=self.serving)

    def _exit_event(self, reason):
        self.machine.emit("COLO_EXIT", {"mode": self.mode, "reason": reason})

    def _takeover(self, bump):
        """Hold the lease, then ask the client endpoint to serve this side alone; True if
        this side may serve."""
        deadline = time.monotonic() + self.settings.heartbeat_timeout_ms / 1e3 + 2.0
        while True:
            try:
                epoch = self.lease.acquire(bump=bump)
                break
            except EmuError as e:
                if time.monotonic() >= deadline:
                    self._say(f"may not serve: {e}")
                    return False
                time.sleep(LEASE_RETRY_S)
        self.takeover_answer = None
        self.link.on_takeover_reply = self._takeover_reply
        self.link.takeover(epoch)
        self.serving = True
        self.last_renew = time.monotonic()
        return True

    def _takeover_reply(self, accepted, reason):
        self.takeover_answer = (accepted, reason)
        if not accepted:
            self.serving = False
            self._say(f"the client endpoint refused the takeover: {reason}; stopping")
            self.machine.stop()
            self.machine.request_exit(1, f"colo: fenced off by the client endpoint: {reason}")

    def _flush_records(self, force=False):
        """Finished records go to the records file and into the totals; only the last
        RECENT_RECORDS stay in memory (a pair may run for days)."""
        records = self.records()
        done = 0
        while done < len(records) and records[done].status != "started":
            record = records[done]
            if self.writer is not None:
                self.writer.write(record.as_dict())
            t = self.totals
            t["checkpoints"] += 1
            t["triggers"][record.trigger] = t["triggers"].get(record.trigger, 0) + 1
            if record.status == "ok":
                t["ok"] += 1
                t["bytes"] += record.ram_bytes + record.device_bytes
            elif record.status == "rejected":
                t["rejected"] += 1
            else:
                t["failed"] += 1
            self.recent.append(record)
            done += 1
        del records[:done]
        if force and self.writer is not None:
            self.writer.close()
            self.writer = None

    def _update_status_line(self, now, serving):
        if self.status_line is None or not self.status_line.enabled or now - self.last_status < 0.1:
            return
        self.last_status = now
        self._flush_records()
        ok = [r for r in self.recent if r.status == "ok"]
        pauses = sorted(r.pause_ms for r in ok)
        self.status_line.update(role=self.mode if self.active else f"{self.status.last_mode}, alone",
                                checkpoints=self.totals["checkpoints"], ok=self.totals["ok"],
                                last_pause_ms=ok[-1].pause_ms if ok else None,
                                median_pause_ms=pauses[len(pauses) // 2] if pauses else None,
                                dirty_pages=ok[-1].pages if ok else None,
                                peer="alive" if self.active else "lost",
                                state="serving" if serving else "protected")

    def info(self):
        """The COLO figures of query-migrate (counts since the start; pauses over the last
        RECENT_RECORDS checkpoints)."""
        self._flush_records()
        t = self.totals
        ok = [r for r in self.recent if r.status == "ok"]
        pauses = sorted(r.pause_ms for r in ok)
        return {
            "mode": self.status.mode, "checkpoints": t["checkpoints"], "ok": t["ok"],
            "failed": t["failed"], "rejected": t["rejected"],  # rejected: corrupted, truncated or replayed
            "triggers": dict(t["triggers"]),
            "pause-ms-median": pauses[len(pauses) // 2] if pauses else None,
            "pause-ms-max": pauses[-1] if pauses else None,
            "last-pause-ms": ok[-1].pause_ms if ok else None,
            "last-dirty-pages": ok[-1].pages if ok else None,
            "bytes": t["bytes"],
            "heartbeats-received": self.channel.heartbeats_received if self.channel else 0,
            "failover-ms": self.failover_ms,
            "exit-reason": self.exit_reason,
        }

    def close(self):
        self._flush_records(force=True)
        if self.status_line is not None:
            self.status_line.close()
        if self.lease is not None:
            self.lease.close()

    def _say(self, text):
        print(f"colo {self.mode if self.active else self.status.last_mode}: {text}", file=sys.stderr, flush=True)


class ColoPrimary(_Side):
    mode = "primary"

    def __init__(self, machine, migration, settings, link, sock):
        super().__init__(machine, migration, settings, link)
        self.node = settings.node or "primary"
        self.lease = Lease(settings, self.node)
        self.lease.acquire()
        self.cp = ck.CheckpointPrimary(machine, sock, debug=settings.debug,
                                       timeout=settings.heartbeat_timeout_ms / 1e3, key=settings.key)
        self.cp.started = self.started
        self.cp.handshake()
        self.passive = self.cp.peer_passive
        if settings.kill_at is not None:
            self.cp.fault_at = settings.kill_at
            self.cp.fault = _kill_self
        self.cp.background_send = True
        self.cp.on_pause = self._on_pause
        self.cp.on_unpause = self._on_unpause
        self.forced = None
        self.next_periodic = time.monotonic() + self.delay_s()
        self.captured_out = link.out_offset if link is not None else 0
        self.output_since = None
        if link is not None:
            link.on_checkpoint_request = self._proxy_request
        migration.parameter_listeners.append(self._parameter_changed)
        self._begin(self.cp.channel)

    def records(self):
        return self.cp.records

    def sending(self):
        return self.cp.sending

    def busy(self):
        return self.cp.sending or self.cp.pending_phase in ("sending", "loading")

    def delay_s(self):
        return self.migration.parameters["x-checkpoint-delay"] / 1e3

    def _parameter_changed(self, name, value):
        if name == "x-checkpoint-delay" and self.active:
            self.forced = "forced"  # as QEMU: a new delay takes effect with a checkpoint now

    def _proxy_request(self, reason):
        word = reason.split()[0] if reason else "forced"
        self.forced = word if word in ("mismatch", "timeout") else "forced"

    def request_checkpoint(self, trigger="forced"):
        self.forced = trigger

    def _on_pause(self, seq):
        if self.link is not None:
            self.link.mark(seq)
            self.captured_out = self.link.out_offset
        self.output_since = None

    def _on_unpause(self, seq, ok):
        if not ok and self.link is not None:
            self.link.unmark(seq)
        self.next_periodic = time.monotonic() + self.delay_s()

    def _on_readable(self):
        if not self.active:
            return
        try:
            for kind, payload in self.cp.channel.poll():
                try:
                    self.cp.step(kind, payload)
                except ck.CheckpointError as e:  # abandoned or not captured: the next one retries
                    self._say(str(e))
        except ChannelError as e:
            self.peer_lost(str(e), "error")

    def _tick_active(self, now):
        if self.cp.send_error is not None:
            self.peer_lost(str(self.cp.send_error), "error")
            return
        if not self._heartbeat(now):
            return
        self._renew_lease(now)
        if not self.cp.sending and self.cp.pending is None and self.machine.status == "running":
            trigger = self._due_trigger(now)
            if trigger is not None:
                self.forced = None
                try:
                    self.cp.request(trigger)
                except ChannelError as e:
                    self.peer_lost(str(e), "error")
                    return
        self._flush_records()
        self._update_status_line(now, serving=False)

    def _due_trigger(self, now):
        if self.forced is not None:
            return self.forced
        if self.passive and self.link is not None:
            if self.link.out_offset > self.captured_out:
                if self.output_since is None:
                    self.output_since = now
                    # a halted guest must not sleep past the output delay
                    self.machine.idle_wait_cap = self.settings.output_delay_ms / 1e3
                elif now - self.output_since >= self.settings.output_delay_ms / 1e3:
                    self.machine.idle_wait_cap = self.settings.heartbeat_period_ms / 2e3
                    return "output"
        if now >= self.next_periodic:
            return "periodic"
        return None

    def peer_lost(self, reason_text, reason):
        """The secondary is gone (or declared gone): leave COLO and serve alone."""
        if not self.active:
            return
        lost_at = time.monotonic()
        self.cp._fail(reason_text)
        self._leave(reason_text, reason)
        self.cp.close()  # the sender thread too
        self._flush_records()
        m = self.machine
        if self.link is not None and not self._takeover(bump=True):
            m.stop()
            m.request_exit(1, "colo: the secondary is lost and this primary holds no lease: stopping "
                              "(exactly one side may serve)")
        self.failover_ms = (time.monotonic() - lost_at) * 1e3
        self._exit_event(reason)


def _kill_self(phase, seq):
    """Die the way a crashed host does: no goodbye on any socket."""
    print(f"colo primary: killing this process at {phase} of checkpoint {seq} (--x-kill-at)",
          file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


class ColoSecondary(_Side):
    mode = "secondary"

    def __init__(self, machine, migration, settings, link, sock, passive=False):
        super().__init__(machine, migration, settings, link)
        self.node = settings.node or "secondary"
        self.passive = passive
        self.lease = Lease(settings, self.node)
        self.cs = ck.CheckpointSecondary(machine, sock, timeout=settings.heartbeat_timeout_ms / 1e3,
                                         key=settings.key, passive=passive)
        self.cs.handshake()
        self.cs.after_apply = self._after_apply
        self.stopped_for_checkpoint = False
        if link is not None:
            link.send_sync(0)
        self._begin(self.cs.channel)
        if not passive:
            machine.cont()

    def records(self):
        return self.cs.records

    def _after_apply(self, seq):
        if self.link is not None:
            self.link.send_sync(seq)

    def _on_readable(self):
        if not self.active:
            return
        try:
            for kind, payload in self.cs.channel.poll():
                if kind == ck.ABANDON:
                    continue  # the primary gave up a checkpoint we were not taking
                if kind != ck.CHECKPOINT_REQUEST:
                    raise ChannelError(f"colo: expected CHECKPOINT_REQUEST, got {ck.NAMES[kind]}")
                try:
                    self.cs.take(payload)
                except (ck.CheckpointRejected, ck.CheckpointAbandoned) as e:
                    self._say(str(e))
        except ck.ConsistencyError as e:
            self._say(str(e))
            self.machine.request_exit(1, str(e))
        except ChannelError as e:
            self.peer_lost(str(e), "error")
        self._flush_records()

    def _tick_active(self, now):
        if self._heartbeat(now):
            self._flush_records()
            self._update_status_line(now, serving=False)

    def peer_lost(self, reason_text, reason):
        """The primary is gone (or declared gone): take over from this side's state."""
        if not self.active:
            return
        lost_at = time.monotonic()
        m = self.machine
        m.stop()
        self._leave(reason_text, reason)
        if self.link is not None and not self._takeover(bump=False):
            m.request_exit(1, "colo: the primary is lost but this secondary may not serve (split brain "
                              "averted: the lease is held elsewhere)")
            return
        m.cont()
        self.failover_ms = (time.monotonic() - lost_at) * 1e3
        self._say(f"serving alone from checkpoint {self.cs.applied_seq} "
                  f"(failover took {self.failover_ms:.1f} ms)")
        self._exit_event(reason)

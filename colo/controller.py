"""COLO in the run loop: the primary's and the secondary's side of a protected pair.

A pair enters COLO at the end of a live migration with the ``x-colo`` capability: the
migration socket becomes the checkpoint channel (:mod:`colo.checkpoint`), and both
machines keep running their loops; this module drives the transaction from there:

* The primary asks for a checkpoint every ``x-checkpoint-delay`` ms, when the client
  endpoint asks (the compare found a mismatch, or primary output waited too long for its
  twin), in passive mode as soon as output waits (``output`` trigger: Remus' output
  commit, so latency stays low), and at once when the delay is changed.  The guest keeps
  running while the secondary gets ready and while it applies; it is paused only to
  capture its state, which a thread then sends while it runs on.
* Both sides send heartbeats on the channel when idle; silence longer than the timeout, a
  broken channel or ``x-colo-lost-heartbeat`` ends COLO on that side.
* Whoever is left must hold the arbiter's lease before it serves (split brain: when the
  link is cut but both live, only the lease holder goes on); it then tells the client
  endpoint TAKEOVER.  The secondary continues from its own state, which is the last
  applied checkpoint in passive mode (it never ran) and, in compare mode, a state whose
  every released byte it produced itself; an incomplete checkpoint was never applied.
"""

import collections
import fcntl
import os
import signal
import struct
import sys
import termios
import time
from dataclasses import dataclass

from emu.errors import EmuError
from emu.replication import ReplicationSurface

from .checkpoint import CheckpointPrimary, CheckpointSecondary, FaultInjection
from .checkpointwire import (
    ABANDON,
    CHECKPOINT_REQUEST,
    NAMES,
    REPLY_TIMEOUT_S,
    CheckpointAbandoned,
    CheckpointError,
    CheckpointRejected,
    ConsistencyError,
)
from .wire import ChannelError

LEASE_RETRY_S = 0.02
RECENT_RECORDS = 1000


@dataclass
class ColoSettings:
    """What a pair is configured with (``emu colo`` options; QMP for the checkpoint delay)."""

    heartbeat_period_ms: float = 100.0
    heartbeat_timeout_ms: float = 1000.0
    output_delay_ms: float = 1.0       # passive: checkpoint this soon after output appears
    arbiter: object = None             # (host, port) of emu colo arbiter, or an etcdarbiter.EtcdAddress
    group: str = "colo"
    node: str = ""
    key: bytes | None = None
    debug: bool = False                # compare full state digests after every checkpoint
    records: str | None = None         # per-checkpoint records file (.json / .csv)
    status_line: bool | None = None    # live status line (default: when stderr is a terminal)
    kill_at: tuple | None = None       # (phase, seq): the primary SIGKILLs itself there (failover tests)


class ColoStatus:
    """query-colo-status: the mode now, the mode before the last exit, and why it ended
    (QEMU's fields), and ``protection``: ``protected`` (in a pair), ``failing over``
    (the peer is lost, the takeover not yet answered), ``unprotected`` (serving alone, or
    never paired), ``re-protecting`` (a survivor's migration into a new secondary) or
    ``standby`` (a secondary waiting for its primary)."""

    def __init__(self):
        self.mode = "none"
        self.last_mode = "none"
        self.reason = "none"
        self.protection = "unprotected"

    def info(self):
        return {"mode": self.mode, "last-mode": self.last_mode, "reason": self.reason,
                "protection": self.protection}

    def entered(self, mode):
        self.mode, self.reason, self.protection = mode, "processing", "protected"

    def left(self, mode, reason):
        self.last_mode, self.mode, self.reason, self.protection = mode, "none", reason, "failing over"


class Lease:
    """The right to serve: from the arbiter when one is configured, else the epoch after the
    last one the client endpoint accepted (``link.proxy_epoch``): both sides of a pair ask
    for the same one, and the endpoint accepts only the first takeover of it."""

    def __init__(self, settings, node, link=None):
        self.client = None
        self.link = link
        self.epoch = 0
        if settings.arbiter is not None and hasattr(settings.arbiter, "endpoints"):
            from .etcdarbiter import EtcdArbiterClient
            self.client = EtcdArbiterClient(settings.arbiter, settings.group, node)
        elif settings.arbiter is not None:
            from .arbiter import ArbiterClient
            self.client = ArbiterClient(settings.arbiter, settings.group, node,
                                        timeout=max(settings.heartbeat_timeout_ms / 1e3, 0.2))

    def acquire(self, bump=False):
        if self.client is None:
            self.epoch = (self.link.proxy_epoch if self.link is not None else 0) + 1
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
    """What both sides share: the channel, heartbeats, the lease, the exit, the figures.

    It hears the VM's COLO link (a :class:`colo.link.LinkListener`)."""

    mode = "none"

    def __init__(self, machine: ReplicationSurface, migration, settings, link):
        self.machine = machine
        self.migration = migration
        self.settings = settings
        self.link = link
        self.colo_status = migration.colo_status
        self.active = False
        self.exit_reason = None
        self.channel = None
        self.lease = None
        self.writer = migration.records_writer()  # also sets colo_origin, the records' time 0
        self.started = migration.colo_origin
        self.totals = {"checkpoints": 0, "ok": 0, "failed": 0, "rejected": 0, "bytes": 0, "triggers": {}}
        self.recent = collections.deque(maxlen=RECENT_RECORDS)  # finished records, for medians
        self.status_line = None
        self.last_status = 0.0
        self.failover_ms = None
        self.serving = False  # took over (or never had a peer to lose): renews its lease while it serves
        self.last_renew = time.monotonic()
        self.lease_warned = False
        self._unacked = None  # (bytes unacknowledged on the channel, since when) while the peer is busy
        if link is not None:
            link.listen(self)

    def _begin(self, channel):
        machine = self.machine
        self.channel = channel
        self.active = True
        self.colo_status.entered(self.mode)
        self.migration.colo_started(self)
        self._channel_fd = channel.sock.fileno()  # kept: a closed socket no longer tells its number
        machine.add_fd_handler(self._channel_fd, self._on_readable)
        machine.add_background_job(self._tick)
        machine.idle_wait_cap = min(machine.idle_wait_cap, self.settings.heartbeat_period_ms / 2e3)
        from .status import StatusLine
        self.status_line = StatusLine(enabled=self.settings.status_line)

    def _heartbeat(self, now):
        channel, settings = self.channel, self.settings
        if self.sending():  # a checkpoint on its way: the data is the sign of life, and has the channel
            return True
        if now - channel.last_sent >= settings.heartbeat_period_ms / 1e3:
            try:
                channel.heartbeat()
            except ChannelError as e:
                self.peer_lost(f"{e}", "error")
                return False
        # the peer sends nothing while it takes a checkpoint: a dead one closes its socket,
        # a hung one is given the transaction's own, longer timeout; but a cut link shows
        # sooner, as bytes its host does not acknowledge
        busy = self.busy()
        limit = REPLY_TIMEOUT_S if busy else settings.heartbeat_timeout_ms / 1e3
        if busy and self._unacknowledged_for(now) > settings.heartbeat_timeout_ms / 1e3:
            self.peer_lost(f"colo: the peer's host acknowledged nothing for {settings.heartbeat_timeout_ms:.0f} ms "
                           f"(the link is down)", "error")
            return False
        if now - channel.last_heard > limit:
            self.peer_lost(f"colo: no heartbeat from the peer for {limit * 1e3:.0f} ms", "error")
            return False
        return True

    def _unacknowledged_for(self, now):
        """Seconds for which bytes sent on the channel have waited, none of them acknowledged
        by the peer's TCP (0: everything sent was acknowledged, or some was since)."""
        try:
            queued = struct.unpack("i", fcntl.ioctl(self.channel.sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
        except OSError:
            return 0.0
        last = self._unacked
        if queued == 0 or last is None or queued < last[0]:
            self._unacked = (queued, now) if queued else None
            return 0.0
        self._unacked = (queued, last[1])
        return now - last[1]

    def _leave(self, reason_text, reason):
        """Stop replicating (the caller then serves alone or stops)."""
        self.active = False
        self.exit_reason = reason_text
        if self.channel is not None:
            self.machine.remove_fd_handler(self._channel_fd)
            self.channel.close()
        self.colo_status.left(self.mode, reason)
        self.migration.colo_ended()
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
                self.machine.pause()
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
        self.colo_status.protection = "unprotected"  # the failover is over: this side serves alone
        self.machine.emit("COLO_EXIT", {"mode": self.mode, "reason": reason})
        self._flush_records()  # the checkpoints before it come first in the records
        took = "" if self.failover_ms is None else f" ({self.failover_ms:.1f} ms)"
        self.migration.colo_event("failover" if self.mode == "secondary" else "secondary-lost",
                                  f"{self.exit_reason}{took}")

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
        self.serving = True
        self.last_renew = time.monotonic()
        self.link.takeover(epoch)  # a link that lost the endpoint answers no at once
        return self.serving

    def checkpoint_requested(self, reason):
        """The client endpoint asks for a checkpoint: only a primary takes one."""

    def takeover_answered(self, accepted, reason):
        if not accepted:
            self.serving = False
            self._say(f"the client endpoint says this VM must not serve: {reason}; stopping")
            self.machine.pause()
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
            totals = self.totals
            totals["checkpoints"] += 1
            totals["triggers"][record.trigger] = totals["triggers"].get(record.trigger, 0) + 1
            if record.status == "ok":
                totals["ok"] += 1
                totals["bytes"] += record.ram_bytes + record.device_bytes + record.disk_bytes
            elif record.status == "rejected":
                totals["rejected"] += 1
            else:
                totals["failed"] += 1
            self.recent.append(record)
            done += 1
        del records[:done]
        if force and self.writer is not None:
            self.writer.flush()  # the file stays open: a survivor's pairs to come write on

    def _update_status_line(self, now, serving):
        if self.status_line is None or not self.status_line.enabled or now - self.last_status < 0.1:
            return
        self.last_status = now
        self._flush_records()
        ok = [r for r in self.recent if r.status == "ok"]
        pauses = sorted(r.pause_ms for r in ok)
        self.status_line.update(role=f"{self.mode if self.active else self.colo_status.last_mode}, "
                                     f"{self.colo_status.protection}",
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
        totals = self.totals
        ok = [r for r in self.recent if r.status == "ok"]
        pauses = sorted(r.pause_ms for r in ok)
        return {
            "mode": self.colo_status.mode, "checkpoints": totals["checkpoints"], "ok": totals["ok"],
            "failed": totals["failed"], "rejected": totals["rejected"],  # rejected: corrupted, truncated or replayed
            "triggers": dict(totals["triggers"]),
            "pause-ms-median": pauses[len(pauses) // 2] if pauses else None,
            "pause-ms-max": pauses[-1] if pauses else None,
            "last-pause-ms": ok[-1].pause_ms if ok else None,
            "last-dirty-pages": ok[-1].pages if ok else None,
            "last-disk-blocks": ok[-1].disk_blocks if ok else None,
            "bytes": totals["bytes"],
            "heartbeats-received": self.channel.heartbeats_received if self.channel else 0,
            "failover-ms": self.failover_ms,
            "exit-reason": self.exit_reason,
        }

    def retire(self):
        """This side's part is over while its machine runs on: a survivor that becomes the
        primary of a new pair (re-protection) hands over to the new side, which takes the
        lease anew."""
        self.serving = False
        self.machine.remove_background_job(self._tick)
        self.close()

    def close(self):
        self._flush_records(force=True)
        if self.status_line is not None:
            self.status_line.close()
        if self.lease is not None:
            self.lease.close()

    def _say(self, text):
        print(f"colo {self.mode if self.active else self.colo_status.last_mode}: {text}", file=sys.stderr, flush=True)


class ColoPrimary(_Side):
    """The primary: checkpoints on its triggers (a :class:`colo.checkpoint.CheckpointListener`)."""

    mode = "primary"

    def __init__(self, machine, migration, settings, link, sock):
        super().__init__(machine, migration, settings, link)
        self.node = settings.node or "primary"
        self.lease = Lease(settings, self.node, link)
        self.lease.acquire()
        faults = FaultInjection(*settings.kill_at, _kill_self) if settings.kill_at is not None else None
        self.checkpoints = CheckpointPrimary(machine, sock, link=link, listener=self, debug=settings.debug,
                                             timeout=settings.heartbeat_timeout_ms / 1e3, key=settings.key,
                                             background_send=True, faults=faults, started=self.started)
        self.checkpoints.handshake()
        self.passive = self.checkpoints.peer_passive
        self.forced = None
        self.next_periodic = time.monotonic() + self.delay_s()
        self.captured_out = link.out_offset if link is not None else 0
        self.output_since = None
        migration.add_parameter_listener(self._parameter_changed)
        self._begin(self.checkpoints.channel)

    def records(self):
        return self.checkpoints.records

    def sending(self):
        return self.checkpoints.sending

    def busy(self):
        return self.checkpoints.peer_busy()

    def delay_s(self):
        return self.migration.parameters["x-checkpoint-delay"] / 1e3

    def _parameter_changed(self, name, value):
        if name == "x-checkpoint-delay" and self.active:
            self.forced = "forced"  # as QEMU: a new delay takes effect with a checkpoint now

    def checkpoint_requested(self, reason):
        word = reason.split()[0] if reason else "forced"
        self.forced = word if word in ("mismatch", "timeout") else "forced"

    def checkpoint_paused(self, seq):
        if self.link is not None:
            self.captured_out = self.link.out_offset
        self.output_since = None

    def checkpoint_ended(self, seq, ok):
        self.next_periodic = time.monotonic() + self.delay_s()

    def _on_readable(self):
        if not self.active:
            return
        try:
            for kind, payload in self.checkpoints.channel.poll():
                try:
                    self.checkpoints.step(kind, payload)
                except CheckpointError as e:  # abandoned or not captured: the next one retries
                    self._say(str(e))
        except ChannelError as e:
            self.peer_lost(str(e), "error")

    def _tick_active(self, now):
        checkpoints = self.checkpoints
        if checkpoints.send_error is not None:
            self.peer_lost(str(checkpoints.send_error), "error")
            return
        if not self._heartbeat(now):
            return
        self._renew_lease(now)
        if not checkpoints.sending and checkpoints.pending is None and self.machine.status == "running":
            trigger = self._due_trigger(now)
            if trigger is not None:
                self.forced = None
                try:
                    checkpoints.request(trigger)
                except ChannelError as e:
                    self.peer_lost(str(e), "error")
                    return
        self._flush_records()
        self._update_status_line(now, serving=False)

    def _due_trigger(self, now):
        if self.forced is not None:
            return self.forced
        if self.passive and self.link is not None and self._output_waited(now):
            return "output"
        if now >= self.next_periodic:
            return "periodic"
        return None

    def _output_waited(self, now):
        """Passive pairs: has output waited ``output_delay_ms`` for a checkpoint?"""
        if self.link.out_offset <= self.captured_out:
            return False
        if self.output_since is None:
            self.output_since = now
            # a halted guest must not sleep past the output delay
            self.machine.idle_wait_cap = self.settings.output_delay_ms / 1e3
            return False
        if now - self.output_since >= self.settings.output_delay_ms / 1e3:
            self.machine.idle_wait_cap = self.settings.heartbeat_period_ms / 2e3
            return True
        return False

    def peer_lost(self, reason_text, reason):
        """The secondary is gone (or declared gone): leave COLO and serve alone."""
        if not self.active:
            return
        lost_at = time.monotonic()
        self.checkpoints.fail_pending(reason_text)
        self._leave(reason_text, reason)
        self.checkpoints.close()  # the sender thread too
        self._flush_records()
        machine = self.machine
        if self.link is not None and not self._takeover(bump=True):
            machine.pause()
            machine.request_exit(1, "colo: the secondary is lost and this primary holds no lease: stopping "
                                    "(exactly one side may serve)")
        self.failover_ms = (time.monotonic() - lost_at) * 1e3
        self._exit_event(reason)


def _kill_self(phase, seq):
    """Die the way a crashed host does: no goodbye on any socket."""
    print(f"colo primary: killing this process at {phase} of checkpoint {seq} (--x-kill-at)",
          file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


class ColoSecondary(_Side):
    """The secondary: takes the primary's checkpoints; serves alone when the primary is lost."""

    mode = "secondary"

    def __init__(self, machine, migration, settings, link, sock, passive=False):
        super().__init__(machine, migration, settings, link)
        self.node = settings.node or "secondary"
        self.passive = passive
        self.lease = Lease(settings, self.node, link)
        self.checkpoints = CheckpointSecondary(machine, sock, link=link, timeout=settings.heartbeat_timeout_ms / 1e3,
                                               key=settings.key, passive=passive, started=self.started)
        self.checkpoints.handshake()
        self._begin(self.checkpoints.channel)
        if not passive:
            machine.resume()

    def records(self):
        return self.checkpoints.records

    def _on_readable(self):
        if not self.active:
            return
        try:
            for kind, payload in self.checkpoints.channel.poll():
                if kind == ABANDON:
                    continue  # the primary gave up a checkpoint we were not taking
                if kind != CHECKPOINT_REQUEST:
                    raise ChannelError(f"colo: expected CHECKPOINT_REQUEST, got {NAMES[kind]}")
                try:
                    self.checkpoints.take(payload)
                except (CheckpointRejected, CheckpointAbandoned) as e:
                    self._say(str(e))
        except ConsistencyError as e:
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
        machine = self.machine
        machine.pause()
        self._leave(reason_text, reason)
        if self.link is not None and not self._takeover(bump=False):
            machine.request_exit(1, "colo: the primary is lost but this secondary may not serve (split brain "
                                    "averted: the lease is held elsewhere)")
            return
        self.checkpoints.keep_own_state()
        machine.resume()
        self.failover_ms = (time.monotonic() - lost_at) * 1e3
        self._say(f"serving alone from checkpoint {self.checkpoints.applied_seq} "
                  f"(failover took {self.failover_ms:.1f} ms)")
        self._exit_event(reason)

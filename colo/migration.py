"""Live migration between two emulator processes (precopy), driven from the run loop.

Source (QMP ``migrate``): HELLO, then a full RAM pass in chunks while the guest keeps
running, then passes over the pages the guest dirtied meanwhile.  Each pass ends with a
SYNC that the destination answers once it has applied everything before it, so the
source never stops the guest while the destination still has a backlog.  When the
remaining pages fit the downtime limit at the bandwidth achieved so far (or after
``MAX_DIRTY_PASSES``) the guest stops, the last pages and the device state go over, and
the destination answers DONE; the source ends as ``postmigrate``.  Any failure or
``migrate_cancel`` abandons: the source runs on as before and the destination exits with
a clear error.

Destination (``-incoming tcp:HOST:PORT``): waits in ``inmigrate``, checks HELLO (machine
type, RAM size, protocol version), writes RAM streams into its RAM as they arrive, loads
the device state on COMPLETE and runs.

With ``x-colo`` the migration is the pair's checkpoint 0: the source also sends the
replication part (:mod:`colo.replicationpart`, its COLO link's stream positions and
unreleased output) before COMPLETE, the destination restores its link from it, and the
connection goes on as the checkpoint channel.  Each VM has its own copy of the disk
images: right after HELLO they are compared and made equal (:mod:`colo.disksync`), and the
blocks the guest writes from then on go over with each dirty pass and the stop-and-copy.

Both sides use a machine only through its replication surface (:mod:`emu.replication`).
"""

import socket
import subprocess
import sys
import time

import numpy as np

from emu.chardev import listen_tcp
from emu.errors import ConfigError, EmuError, StateError
from emu.replication import ReplicationSurface

from . import disksync, replicationpart, wire

CAPABILITIES = ("events", "return-path", "x-colo", "xbzrle", "postcopy-ram", "auto-converge",
                "pause-before-switchover")
SUPPORTED_CAPABILITIES = {"events", "return-path", "x-colo"}
DEFAULT_PARAMETERS = {  # (COLO's heartbeat and lease settings are ColoSettings, set by `emu colo`)
    "max-bandwidth": 128 << 20,     # bytes/s, QEMU's default
    "downtime-limit": 300,          # ms, QEMU's default
    "x-checkpoint-delay": 20000,    # ms, QEMU's default (COLO)
}
MAX_DIRTY_PASSES = 30
CHUNK_PAGES = 4096                  # 16 MiB of RAM per step of the first pass
REPLY_TIMEOUT_S = 30.0


class MigrationState:
    """What query-migrate reports (QEMU's MigrationInfo)."""

    def __init__(self):
        self.status = "none"
        self.error = None
        self.start = None
        self.setup_time_ms = 0
        self.total_time_ms = None
        self.downtime_ms = None
        self.transferred = 0
        self.normal_pages = 0
        self.zero_pages = 0
        self.passes = 0
        self.remaining_pages = 0
        self.dirty_rate = 0.0

    def info(self, ram_size):
        if self.status == "none":
            return {}
        if self.total_time_ms is not None:
            elapsed = self.total_time_ms
        else:  # (the secondary of a COLO pair has no outgoing migration of its own)
            elapsed = (time.monotonic() - self.start) * 1e3 if self.start is not None else 0.0
        info = {
            "status": self.status,
            "total-time": int(elapsed),
            "setup-time": int(self.setup_time_ms),
            "ram": {
                "transferred": self.transferred,
                "total": ram_size,
                "remaining": self.remaining_pages * 4096,
                "duplicate": self.zero_pages,
                "normal": self.normal_pages,
                "normal-bytes": self.normal_pages * 4096,
                "dirty-sync-count": self.passes,
                "dirty-pages-rate": int(self.dirty_rate),
                "mbps": (self.transferred * 8 / 1e6) / max(elapsed / 1e3, 1e-6),
                "page-size": 4096,
            },
        }
        if self.downtime_ms is not None:
            info["downtime"] = round(self.downtime_ms, 3)
        if self.error:
            info["error-desc"] = self.error
        return info


class MigrationController:
    """The source side, and the capabilities/parameters QMP sets on either side."""

    def __init__(self, machine: ReplicationSurface):
        self.machine = machine
        self.capabilities = {name: False for name in CAPABILITIES}
        self.parameters = dict(DEFAULT_PARAMETERS)
        self.state = MigrationState()
        self._parameter_listeners = []  # callables(name, value) (COLO reacts to x-checkpoint-delay)
        self._job = None
        # COLO: set up by `emu colo` (settings, the serial link) and by the pair once it runs
        from .controller import ColoSettings, ColoStatus
        self.colo_settings = ColoSettings()
        self.colo_status = ColoStatus()
        self.colo_link = None
        self.colo_passive = False
        self.colo = None  # the ColoPrimary / ColoSecondary once in COLO
        self.colo_origin = None  # monotonic time this VM first entered COLO: its records' time 0
        self._records = None  # the records file (colo.report.RecordWriter), one for all its pairs
        self.incoming = None  # the IncomingMigration of -incoming, if any
        self._start_incoming = None  # with -incoming defer: callable(uri) -> IncomingMigration

    # ------------------------------------------------------------------ QMP surface
    def defer_incoming(self, start):
        """``-incoming defer``: QMP ``migrate-incoming`` gives the URI later (as QEMU)."""
        self._start_incoming = start

    def start_incoming(self, uri):
        """QMP ``migrate-incoming``: only once, and only after ``-incoming defer``."""
        if self._start_incoming is None:
            raise EmuError("The incoming migration has already been started" if self.incoming is not None
                           else "'-incoming' was not specified on the command line")
        self.incoming = self._start_incoming(uri)
        self._start_incoming = None

    def set_capabilities(self, entries):
        if self.active():
            raise EmuError("There's a migration process in progress")
        updates = {}
        for entry in entries:
            name, state = entry.get("capability"), entry.get("state")
            if name not in self.capabilities:
                raise EmuError(f"Parameter 'capability' does not accept value '{name}'")
            if not isinstance(state, bool):
                raise EmuError("Parameter 'state' expects boolean")
            if state and name not in SUPPORTED_CAPABILITIES:
                raise EmuError(f"capability {name!r} is not supported by emu-colo")
            updates[name] = state
        self.capabilities.update(updates)

    def query_capabilities(self):
        return [{"capability": name, "state": state} for name, state in self.capabilities.items()]

    def set_parameters(self, params):
        checked = {}
        for name, value in params.items():
            if name not in self.parameters:
                raise EmuError(f"Parameter '{name}' is unexpected")
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise EmuError(f"Parameter '{name}' expects a non-negative integer")
            if name == "max-bandwidth" and value == 0:
                raise EmuError("Parameter 'max-bandwidth' must be positive")
            checked[name] = value
        self.parameters.update(checked)
        for name, value in checked.items():
            for listener in self._parameter_listeners:
                listener(name, value)

    def add_parameter_listener(self, listener):
        """Call ``listener(name, value)`` whenever QMP sets a parameter."""
        self._parameter_listeners.append(listener)

    def query_parameters(self):
        return dict(self.parameters)

    def query(self):
        info = self.state.info(self.machine.ram_size)
        if self.colo is not None:
            info["x-colo"] = self.colo.info()
        return info

    def lost_heartbeat(self):
        """QMP x-colo-lost-heartbeat: declare the peer lost (failover on a secondary, leave
        COLO on a primary)."""
        if self.colo is None or not self.colo.active:
            raise EmuError("VM is not in COLO mode")
        self.colo.peer_lost("x-colo-lost-heartbeat", "request")

    def records_writer(self):
        """The per-checkpoint records file of ``--records`` (None without): opened when the
        VM first enters COLO and kept across failovers and re-protections."""
        if self.colo_origin is None:
            self.colo_origin = time.monotonic()
        if self._records is None and self.colo_settings.records:
            from .report import RecordWriter
            self._records = RecordWriter(self.colo_settings.records)
        return self._records

    def colo_event(self, event, detail=None):
        """Mark a protection event (colo.report.EVENTS) in the records, on their time axis."""
        writer = self.records_writer()
        if writer is not None:
            from .report import event_record
            writer.write(event_record(event, time.monotonic() - self.colo_origin, detail))
            writer.flush()

    def enter_colo_primary(self, sock):
        from .controller import ColoPrimary
        reprotected = self.colo is not None
        if reprotected:  # re-protection: the side that served alone hands over
            self.colo.retire()
            self.colo = None
        side = ColoPrimary(self.machine, self, self.colo_settings, self.colo_link, sock)
        if reprotected:
            self.colo_event("protected", "a new secondary holds checkpoint 0")
        return side

    def enter_colo_secondary(self, sock):
        from .controller import ColoSecondary
        return ColoSecondary(self.machine, self, self.colo_settings, self.colo_link, sock,
                             passive=self.colo_passive)

    def colo_started(self, side):
        """The pair runs: query-migrate reports ``colo`` and the side's figures."""
        self.colo = side
        self.state.status = "colo"

    def colo_ended(self):
        self.state.status = "completed"

    def active(self):
        return self.state.status in ("setup", "active", "device")

    def start(self, uri):
        if self.active():
            raise EmuError("There's a migration process in progress")
        if self.machine.status not in ("running", "paused"):
            raise EmuError(f"cannot migrate a machine in state {self.machine.status!r}")
        link = self.colo_link
        if self.capabilities["x-colo"] and link is not None and link.role != "primary":
            if self.colo is not None and self.colo.active:
                raise EmuError("migrate: this VM is a COLO secondary: only the side that serves may protect")
        if uri.startswith("tcp:"):
            host, port = wire.parse_tcp_uri(uri, "migrate")
            self._job = PrecopyJob(self, _tcp_channel(host, port))
        elif uri.startswith("exec:") or uri.startswith("file:"):
            self._job = OneWayJob(self, _sink_channel(uri))
        else:
            raise EmuError(f"migrate: unsupported URI {uri!r} (tcp:HOST:PORT, exec:COMMAND or file:PATH)")
        self.state = MigrationState()
        self.state.start = time.monotonic()
        self.set_status("setup")
        if self.capabilities["x-colo"] and self.colo_status.last_mode != "none":
            self.colo_status.protection = "re-protecting"
            self.colo_event("re-protecting", f"migrating into {uri}")
        self._job.begin()

    def cancel(self):
        if self._job is not None and self.active():
            self._job.abandon("cancelled", "migration cancelled by the user")

    # ------------------------------------------------------------------ for the jobs
    def set_status(self, status):
        """The migration's status, announced as a MIGRATION event (with ``events``, as QEMU)."""
        self.state.status = status
        if self.capabilities["events"]:
            self.machine.emit("MIGRATION", {"status": status})

    def end_job(self, status, error=None):
        """The outgoing migration is over with ``status``: its job leaves the run loop and
        the dirty log stops."""
        state = self.state
        state.total_time_ms = (time.monotonic() - state.start) * 1e3
        state.error = error
        self.set_status(status)
        if status != "completed" and self.colo_status.protection == "re-protecting":
            self.colo_status.protection = "unprotected"
            self.colo_event("re-protection-failed", error or status)
        self.machine.remove_background_job(self._job)
        self.machine.stop_dirty_log()
        self.machine.stop_disk_write_log()


def _tcp_channel(host, port):
    try:
        sock = socket.create_connection((host, port), timeout=5)
    except OSError as e:
        raise EmuError(f"migrate: failed to connect to {host}:{port}: {e.strerror or e}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class _PipeSink:
    """exec:/file: targets: a one-way byte sink."""

    def __init__(self, uri):
        self.proc = None
        if uri.startswith("file:"):
            self.file = open(uri[5:], "wb")  # noqa: SIM115 - closed in close()
        else:
            self.proc = subprocess.Popen(uri[5:], shell=True, stdin=subprocess.PIPE)
            self.file = self.proc.stdin

    def sendall(self, data):
        self.file.write(data)

    def close(self):
        self.file.close()
        if self.proc is not None and self.proc.wait(timeout=30) != 0:
            raise EmuError(f"migrate: the exec command exited with status {self.proc.returncode}")


def _sink_channel(uri):
    try:
        return _PipeSink(uri)
    except OSError as e:
        raise EmuError(f"migrate: cannot open {uri!r}: {e.strerror or e}") from None


class PrecopyJob:
    """One outgoing live migration, advanced a step at a time between CPU slices."""

    def __init__(self, controller, sock):
        self.controller = controller
        self.machine = controller.machine
        self.sock = sock
        self.next_full_page = 0
        self.phase = "full"
        self.bytes_at = (time.monotonic(), 0)
        self.last_pass = None
        self.was_running = None
        self.send_seconds = 0.0
        self.sync_sent = 0
        self.sync_acked = 0
        self.replies = wire.frame_reader(max_payload=64 << 20)  # (a DISK_DIFF: 4 bytes per MiB of disk)
        self.disk_copy = None  # x-colo: the chunks of the images still to copy

    def begin(self):
        machine, controller = self.machine, self.controller
        try:
            self._send(wire.HELLO, wire.hello_payload(machine.machine_type, machine.ram_size))
            self._expect_reply(wire.ACCEPT, "HELLO", "refused")
            if controller.capabilities["x-colo"]:
                self._compare_disks()
        except (wire.ChannelError, StateError, OSError) as e:
            self._fail(str(e))
            raise EmuError(f"migrate: {e}") from None
        machine.start_dirty_log()
        controller.state.setup_time_ms = (time.monotonic() - controller.state.start) * 1e3
        controller.set_status("active")
        machine.add_background_job(self)

    def _compare_disks(self):
        """x-colo: log the guest's disk writes from now on, then learn from the destination
        which chunks of the images differ (the copy runs before the first RAM pass)."""
        machine = self.machine
        machine.start_disk_write_log()
        self._send(wire.DISKS, disksync.digests_payload(machine))
        payload = self._expect_reply(wire.DISK_DIFF, "DISKS", "refused the disks")
        self.disk_copy = disksync.DiskCopy(machine, disksync.parse_diff(payload, machine.disk_sizes()))
        if not self.disk_copy.done():
            self.phase = "disks"

    def __call__(self):
        """One step (from the run loop): some chunks of the disks, a chunk of the first
        pass or one dirty pass."""
        try:
            if not self._bandwidth_allows():
                return
            if self.phase == "disks":
                self._send(wire.DISK, self.disk_copy.next_stream())
                if self.disk_copy.done():
                    self.phase = "full"
            elif self.phase == "full":
                self._full_pass_step()
            else:
                self._dirty_pass()
        except (wire.ChannelError, OSError) as e:
            self._fail(f"connection lost: {e}")

    def _expect_reply(self, kind, after, refusal):
        """Wait for the destination's answer ``kind`` to ``after``; ABANDON is its refusal."""
        got, payload = wire.recv_frame(self.sock, self.replies, REPLY_TIMEOUT_S)
        if got == wire.ABANDON:
            raise wire.ChannelError(f"destination {refusal}: {payload.decode(errors='replace')}")
        if got != kind:
            raise wire.ChannelError(f"destination answered {wire.NAMES[got]} to {after}")
        return payload

    def _bandwidth_allows(self):
        since, sent = self.bytes_at
        limit = self.controller.parameters["max-bandwidth"]
        elapsed = time.monotonic() - since
        return self.controller.state.transferred - sent <= limit * elapsed

    def _send(self, kind, payload=b""):
        started = time.monotonic()
        self.sock.sendall(wire.frame(kind, payload))
        self.send_seconds += time.monotonic() - started
        self.controller.state.transferred += len(payload) + wire.HEADER.size

    def _measured_bandwidth(self):
        """Bytes per second of sending (and building) the streams so far."""
        return max(self.controller.state.transferred / max(self.send_seconds, 1e-6), 1.0)

    def _send_pages(self, pages):
        if len(pages) == 0:
            return
        stream = self.machine.save_ram(pages)
        zero = self.machine.count_zero_pages(pages)
        self.controller.state.zero_pages += zero
        self.controller.state.normal_pages += len(pages) - zero
        self._send(wire.RAM, stream)

    def _send_disk_writes(self):
        """x-colo: the disk blocks the guest wrote since the last time."""
        if self.disk_copy is not None:
            written = self.machine.disk_writes()
            if any(len(blocks) for blocks in written.values()):
                self._send(wire.DISK, self.machine.save_disk_blocks(written))

    def _full_pass_step(self):
        npages = self.machine.page_count
        end = min(npages, self.next_full_page + CHUNK_PAGES)
        self._send_pages(np.arange(self.next_full_page, end))
        self.next_full_page = end
        self.controller.state.remaining_pages = npages - end
        if end == npages:
            self.phase = "dirty"
            self.last_pass = time.monotonic()
            self._send_sync()

    def _send_sync(self):
        self.sync_sent += 1
        self._send(wire.SYNC, self.sync_sent.to_bytes(8, "big"))

    def _synced(self):
        """Non-blocking: has the destination applied everything up to our last SYNC?"""
        self.sock.setblocking(False)
        try:
            while True:
                try:
                    data = self.sock.recv(65536)
                except BlockingIOError:
                    break
                if not data:
                    raise wire.ChannelError("the destination closed the connection")
                self.replies.feed(data)
        finally:
            self.sock.setblocking(True)
        for kind, payload in self.replies.frames():
            if kind == wire.ABANDON:
                raise wire.ChannelError(f"destination abandoned: {payload.decode(errors='replace')}")
            if kind != wire.SYNCED:
                raise wire.ChannelError(f"unexpected {wire.NAMES[kind]} from the destination")
            self.sync_acked = int.from_bytes(payload, "big")
        return self.sync_acked == self.sync_sent

    def _dirty_pass(self):
        if not self._synced():
            return  # the destination is still applying: let the guest run meanwhile
        state, parameters = self.controller.state, self.controller.parameters
        pages = self.machine.dirty_pages()
        now = time.monotonic()
        state.passes += 1
        state.dirty_rate = len(pages) / max(now - self.last_pass, 1e-6)
        self.last_pass = now
        state.remaining_pages = len(pages)
        # as QEMU: the bandwidth actually achieved so far decides whether the rest fits
        bandwidth = min(parameters["max-bandwidth"], self._measured_bandwidth())
        expected_ms = len(pages) * 4096 / bandwidth * 1e3
        if expected_ms <= parameters["downtime-limit"] or state.passes >= MAX_DIRTY_PASSES:
            self._stop_and_copy(pages)
        else:
            self._send_pages(pages)
            self._send_disk_writes()
            self._send_sync()

    def _stop_and_copy(self, pages):
        """The guest stops; the last pages and the device state go over (with ``x-colo``
        also the replication part: this is the pair's checkpoint 0)."""
        machine, controller = self.machine, self.controller
        stopped_at = time.monotonic()
        self.was_running = machine.status == "running"
        machine.pause()
        link = controller.colo_link if controller.capabilities["x-colo"] else None
        if link is not None and (link.role != "primary" or link.serving_alone):
            link.promote()  # re-protection: the survivor is the new pair's primary
        if link is not None:
            link.mark(0)  # output beyond this point waits for the pair (checkpoint 0)
        controller.set_status("device")
        try:
            mask = np.zeros(machine.page_count, dtype=bool)  # (np.union1d's lazy import costs 11 ms)
            mask[pages] = True
            mask[machine.dirty_pages()] = True
            self._send_pages(np.flatnonzero(mask))
            self._send_disk_writes()
            self._send(wire.STATE, machine.save_state())
            if controller.capabilities["x-colo"]:
                self._send(wire.REPLICATION, replicationpart.encode(link.link_state() if link is not None else None))
            self._send(wire.COMPLETE)
            self._expect_reply(wire.DONE, "COMPLETE", "abandoned")
        except (wire.ChannelError, OSError) as e:
            if link is not None:
                link.unmark(0)
            self._fail(f"{e}")
            return
        controller.state.downtime_ms = (time.monotonic() - stopped_at) * 1e3
        controller.state.remaining_pages = 0
        if controller.capabilities["x-colo"]:
            self._enter_colo(link)
            return
        self.sock.close()
        machine.status = "postmigrate"
        controller.end_job("completed")

    def _enter_colo(self, link):
        """The migration is checkpoint 0 of the pair: this connection becomes its channel."""
        self.controller.end_job("completed")
        try:
            self.controller.enter_colo_primary(self.sock)
        except EmuError as e:
            if link is not None:
                link.unmark(0)  # no pair after all: serve unprotected
            self._fail(f"entering COLO: {e}")
            return
        if self.was_running:
            self.machine.resume()

    def abandon(self, status, reason):
        try:
            self._send(wire.ABANDON, reason.encode())
        except OSError:
            pass
        self._close_and_resume()
        self.controller.end_job(status, reason if status == "failed" else None)

    def _fail(self, reason):
        try:
            self.sock.sendall(wire.frame(wire.ABANDON, reason.encode()))
        except OSError:
            pass
        self._close_and_resume()
        self.controller.end_job("failed", reason)

    def _close_and_resume(self):
        try:
            self.sock.close()
        except OSError:
            pass
        if self.was_running:
            self.machine.resume()


class OneWayJob(PrecopyJob):
    """exec:/file: targets: the guest stops, everything is written once (no replies)."""

    def begin(self):
        machine, state = self.machine, self.controller.state
        self.was_running = machine.status == "running"
        machine.pause()
        stopped_at = time.monotonic()
        try:
            self._send(wire.HELLO, wire.hello_payload(machine.machine_type, machine.ram_size))
            self._send_pages(np.arange(machine.page_count))
            self._send(wire.STATE, machine.save_state())
            self._send(wire.COMPLETE)
            self.sock.close()
        except (OSError, EmuError) as e:
            self._fail(str(e))
            raise EmuError(f"migrate: {e}") from None
        state.downtime_ms = (time.monotonic() - stopped_at) * 1e3
        machine.status = "postmigrate"
        self.controller.end_job("completed")


class IncomingMigration:
    """The destination of ``-incoming``: takes one migration stream, then runs."""

    def __init__(self, machine: ReplicationSurface, uri, autostart=True, on_error=None, controller=None):
        self.machine = machine
        self.controller = controller  # its capabilities say whether the pair goes on in COLO
        if controller is not None:
            controller.colo_status.protection = "standby"
        self.autostart = autostart
        self.on_error = on_error or self._exit_with_error
        self.reader = wire.frame_reader()
        self.conn = None
        self.listener = None
        self.hello_ok = False
        self.state_stream = None
        self.replication_received = False  # x-colo: the source's replication part has come
        self.disks_compared = False  # x-colo: the source's DISKS has come and been answered
        self.link_state = None
        self.pages_received = 0
        self.probes = 0  # connections dropped before they began a migration
        self.peer = None
        self.port = None
        machine.status = "inmigrate"
        if uri.startswith("tcp:"):
            host, port = wire.parse_tcp_uri(uri, "-incoming")
            self.listener = listen_tcp(host, port, 1, lambda reason: ConfigError(f"-incoming {uri}: {reason}"))
            self.port = self.listener.getsockname()[1]
            machine.add_fd_handler(self.listener.fileno(), self._accept)
            if port == 0:  # the caller needs to learn the port the system chose
                print(f"emu: listening for a migration on {host}:{self.port}", file=sys.stderr, flush=True)
        elif uri.startswith("exec:") or uri.startswith("file:"):
            self._read_one_way(uri)
        else:
            raise ConfigError(f"-incoming: unsupported URI {uri!r} (tcp:HOST:PORT, exec:COMMAND, file:PATH or defer)")

    def _accept(self):
        """A connection on the listening port.  Until it has said HELLO it may be a port
        probe or junk: the port keeps listening, and a newer connection replaces one that
        has not spoken yet.  Only a source's HELLO commits this side to it."""
        try:
            conn, peer = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        if self.conn is not None:
            self._discard_probe("a newer connection arrived before it sent a migration")
        conn.setblocking(False)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn = conn
        self.peer = peer
        self.machine.add_fd_handler(conn.fileno(), self._readable)

    def _discard_probe(self, reason):
        """Drop a connection that never began a migration; the destination goes on waiting."""
        self.probes += 1
        peer = "{}:{}".format(*self.peer[:2]) if self.peer else "?"
        print(f"emu: -incoming: ignored a connection from {peer}: {reason} ({self.probes} so far); "
              f"still waiting on port {self.port}", file=sys.stderr, flush=True)
        self._close()
        self.reader = wire.frame_reader()

    def _committed(self):
        """The source said HELLO: no other connection is taken from now on."""
        if self.listener is not None:
            self.machine.remove_fd_handler(self.listener.fileno())
            self.listener.close()
            self.listener = None

    def _readable(self):
        try:
            data = self.conn.recv(8 << 20)
        except BlockingIOError:
            return
        except OSError as e:
            if not self.hello_ok:
                self._discard_probe(f"connection error {e}")
                return
            self._error(f"connection lost: {e}")
            return
        if not data:
            if not self.hello_ok:
                self._discard_probe("it closed without sending a migration")
                return
            self._error("the source closed the connection before the migration completed")
            return
        said_hello = self.hello_ok  # a source that says HELLO is refused, not ignored, if it does not fit
        try:
            self.reader.feed(data)
            for kind, payload in self.reader.frames():
                if not self.hello_ok and kind != wire.HELLO and self.listener is not None:
                    self._discard_probe(f"it sent {wire.NAMES.get(kind, kind)} instead of a migration HELLO")
                    return
                said_hello = True
                self._message(kind, payload)
                if self.conn is None:
                    return
        except (wire.ChannelError, StateError) as e:
            if not said_hello and self.listener is not None:
                self._discard_probe(f"not a migration stream ({e})")
                return
            self._refuse(str(e))

    def _reply(self, kind, payload=b""):
        self.conn.setblocking(True)
        try:
            self.conn.sendall(wire.frame(kind, payload))
        finally:
            self.conn.setblocking(False)

    def _message(self, kind, payload, reply=True):
        """One message of the source (``reply``: a live source waits for answers)."""
        machine = self.machine
        if kind == wire.ABANDON:
            raise wire.ChannelError(f"the source abandoned the migration: {payload.decode(errors='replace')}")
        if not self.hello_ok:
            self._hello(kind, payload, reply)
        elif kind == wire.RAM:
            self.pages_received += machine.load_ram(payload)
        elif kind == wire.SYNC:
            if reply:
                self._reply(wire.SYNCED, payload)
        elif kind == wire.STATE:
            self.state_stream = payload
        elif kind == wire.REPLICATION and self._colo(reply):
            self.link_state = replicationpart.decode(payload, has_link=self.controller.colo_link is not None)
            self.replication_received = True
        elif kind == wire.DISKS and self._colo(reply) and not self.disks_compared:
            self._reply(wire.DISK_DIFF, disksync.diff_payload(disksync.differing_chunks(machine, payload)))
            self.disks_compared = True
        elif kind == wire.DISK and self.disks_compared:
            machine.write_disk_blocks(machine.check_disk_blocks(payload))
        elif kind == wire.COMPLETE:
            self._complete(reply)
        else:
            raise wire.ChannelError(f"unexpected {wire.NAMES[kind]}")

    def _colo(self, reply):
        """Whether this migration is the checkpoint 0 of a COLO pair."""
        return reply and self.controller is not None and self.controller.capabilities["x-colo"]

    def _hello(self, kind, payload, reply):
        machine = self.machine
        if kind != wire.HELLO:
            raise wire.ChannelError(f"expected HELLO, got {wire.NAMES[kind]}")
        version, machine_type, ram_size = wire.parse_hello(payload)
        if version != wire.PROTOCOL_VERSION:
            raise wire.ChannelError(f"protocol version {version}, this side speaks {wire.PROTOCOL_VERSION}")
        if machine_type != machine.machine_type:
            raise wire.ChannelError(f"machine type {machine_type!r}, this machine is {machine.machine_type!r}")
        if ram_size != machine.ram_size:
            raise wire.ChannelError(f"RAM size {ram_size >> 20} MiB, this machine has {machine.ram_size >> 20} MiB")
        self.hello_ok = True
        self._committed()
        if reply:
            self._reply(wire.ACCEPT)

    def _complete(self, reply):
        """COMPLETE: everything has come; check the rest, apply it, answer DONE and run (or,
        in a COLO pair, go on as its secondary)."""
        machine, colo = self.machine, self._colo(reply)
        if self.state_stream is None:
            raise wire.ChannelError("COMPLETE without device state")
        if colo and not self.replication_received:
            raise wire.ChannelError("COMPLETE without the replication part a COLO pair needs")
        if colo and not self.disks_compared:
            raise wire.ChannelError("COMPLETE without the disks' comparison a COLO pair needs")
        checked = machine.check_state(self.state_stream)
        machine.apply_state(checked, rollback=False)  # nothing to roll back to: a failed one ends this process
        if colo and self.link_state is not None:
            self.controller.colo_link.restore(self.link_state)
        if reply:
            self._reply(wire.DONE)
            if colo:
                self._enter_colo()
                return
            self._close()
        machine.status = "paused"
        if self.autostart:
            machine.resume()

    def _enter_colo(self):
        """The pair goes on as primary and secondary: this connection is the checkpoint channel."""
        conn, self.conn = self.conn, None
        self.machine.remove_fd_handler(conn.fileno())
        conn.setblocking(True)
        self.machine.status = "paused"
        try:
            self.controller.enter_colo_secondary(conn)
        except EmuError as e:
            conn.close()
            self._error(f"entering COLO: {e}")

    def _refuse(self, reason):
        try:
            self._reply(wire.ABANDON, reason.encode())
        except OSError:
            pass
        self._error(reason)

    def _error(self, reason):
        self._close()
        self.on_error(reason)

    def _close(self):
        if self.conn is not None:
            self.machine.remove_fd_handler(self.conn.fileno())
            self.conn.close()
            self.conn = None

    def _exit_with_error(self, reason):
        self.machine.emit("MIGRATION", {"status": "failed"})
        self.machine.request_exit(1, f"incoming migration failed: {reason}")

    def _read_one_way(self, uri):
        try:
            if uri.startswith("file:"):
                with open(uri[5:], "rb") as f:
                    data = f.read()
            else:
                data = subprocess.run(uri[5:], shell=True, stdout=subprocess.PIPE, check=True).stdout
        except (OSError, subprocess.CalledProcessError) as e:
            raise EmuError(f"-incoming: cannot read {uri!r}: {e}") from None
        self.reader.feed(data)
        try:
            frames = self.reader.frames()
            for kind, payload in frames:
                self._message(kind, payload, reply=False)
        except (wire.ChannelError, StateError) as e:
            raise EmuError(f"-incoming: {uri}: {e}") from None
        if self.machine.status == "inmigrate":
            raise EmuError(f"-incoming: {uri}: the stream ends before the migration completed")

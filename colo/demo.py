"""``emu colo demo``: a whole protected pair, a checked client, a killed primary, and the figures.

One command starts what a deployment needs, each in its own process as an operator would
(``emu colo arbiter``, ``proxy``, ``secondary``, ``primary`` running the service firmware),
then plays the client: numbered requests one at a time through the proxy, every answer
checked against a model of the service (request counter and FNV-1a checksum; every K-th
request is NODE, which each VM answers with its own host configuration (``-fw_cfg
opt/emu-colo/node``): a deliberate divergence, so every such answer is an output mismatch
and a checkpoint, and the client must only ever get the primary's version).  After ``--kill-after``
requests the primary is SIGKILLed and the client carries on against the former secondary;
with ``--failovers K`` above 1 (2 by default) a new secondary is started and the survivor
migrates into it over QMP (re-protection), and the next primary is killed in its turn.
The verdict is the client's own: the received byte stream must be exactly the expected
answers, in order, nothing lost and nothing twice.

Figures come from where an operator would get them: the proxy (a monitor connection,
STATUS) and the VMs' QMP monitors (the primary's ``query-migrate`` ``x-colo``, both VMs'
``query-colo-status``).  Every process is stopped on the way out, Ctrl-C included; their
logs and per-checkpoint records stay in the log directory.
"""

import argparse
import json
import pathlib
import re
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time

from emu.errors import ConfigError, EmuError

from . import proxywire as pw
from .processes import ROOT, START_TIMEOUT_S, Process, ProcessFailure, connect_qmp, protect_over_qmp, stop_all

SERVICE = ROOT / "firmware" / "build" / "service.elf"
MEMORY = "32M"
HEARTBEAT_PERIOD_MS = 50
HEARTBEAT_TIMEOUT_MS = 500
LEASE_MS = 1000
ANSWER_TIMEOUT_S = 20.0
SETTLE_S = 0.3                # after the last answer: long enough for a duplicate to show up
POLL_S = 0.2                  # figures from the proxy and the VMs, ~5 per second
PROGRESS_EVERY = 50           # requests between plain progress lines
KILL_WINDOW = 10              # requests after the kill whose answer times count as "around the kill"
READY = b"service ready\r\n"
ROLES = ("primary", "secondary")
NODES = {"primary": "vm-a", "secondary": "vm-b"}  # names, so that "the former secondary" is visibly the same VM
NEW_NODES = "cdefghijklmnopqrstuvwxyz"       # the secondaries of re-protection: vm-c, vm-d, ...
NODE_FILE = "opt/emu-colo/node"  # what service.elf's NODE answers with: each VM's own name
UNIX_PATH_MAX = 100           # sun_path is 108 bytes on Linux; keep a margin


#: The run went wrong (a process died, an answer was lost, repeated or wrong): exit 1.
DemoFailure = ProcessFailure


class ProxyMonitor:
    """A monitor connection to the proxy's VM listener: HELLO as "monitor", then STATUS."""

    def __init__(self, port, timeout=2.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.reader = pw.frame_reader()
        self.sock.sendall(pw.hello("monitor", "demo"))

    def status(self):
        self.sock.sendall(pw.frame(pw.STATUS))
        while True:
            for kind, payload in self.reader.frames():
                if kind == pw.STATUS:
                    return json.loads(payload)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EmuError("proxy: monitor connection closed")
            self.reader.feed(chunk)

    def close(self):
        self.sock.close()


class Figures(threading.Thread):
    """Polls the proxy and both VMs ~5 times a second and keeps the latest figures.

    ``proxy`` is the proxy's STATUS; ``colo`` the ``x-colo`` of the primary's query-migrate
    (the checkpoint figures: kept as last seen once it is gone); ``status[role]`` each VM's
    query-colo-status.  The secondary is not asked query-migrate: on the incoming side that
    command fails inside the emulator (no migration start time)."""

    def __init__(self, proxy_port, qmp, on_event):
        super().__init__(name="colo-demo-figures", daemon=True)
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.proxy_port = proxy_port
        self.qmp = dict(qmp)  # role -> QmpClient (removed once that VM is gone)
        self.proxy_conn = None
        self.proxy = {}
        self.colo = {}
        self.status = {role: {} for role in ROLES}
        self.on_event = on_event
        self.errors = []

    def run(self):
        while not self.stopped.wait(POLL_S):
            self.poll()

    def poll(self):
        with self.lock:
            self._poll_proxy()
            for role, client in list(self.qmp.items()):
                try:
                    self.status[role] = client.execute("query-colo-status")
                    if role == "primary":
                        self.colo = client.execute("query-migrate").get("x-colo") or self.colo
                except (OSError, EmuError) as e:
                    self._forget(role, f"{role} QMP: {e}")

    def _poll_proxy(self):
        try:
            if self.proxy_conn is None:
                self.proxy_conn = ProxyMonitor(self.proxy_port)
            status = self.proxy_conn.status()
        except (OSError, EmuError, ValueError) as e:
            if self.proxy_conn is not None:
                self.proxy_conn.close()
                self.proxy_conn = None
            self.errors.append(f"proxy STATUS: {e}")
            return
        before = self.proxy.get("mode")
        self.proxy = status
        if before is not None and status["mode"] != before:
            self.on_event(_mode_change(before, status))

    def _forget(self, role, why=None):
        client = self.qmp.pop(role, None)
        if client is not None:
            client.close()
            if why:
                self.errors.append(why)

    def forget(self, role):
        """That VM is gone on purpose: keep its last figures, stop asking."""
        with self.lock:
            self._forget(role)

    def close(self):
        self.stopped.set()
        if self.is_alive():
            self.join(5)
        with self.lock:
            for role in list(self.qmp):
                self._forget(role)
            if self.proxy_conn is not None:
                self.proxy_conn.close()
                self.proxy_conn = None


def _mode_change(before, status):
    mode = status["mode"]
    if mode == "solo":
        role = status["active"]
        node = status.get(role, {}).get("node") or role
        failover = status.get("failover_ms")
        took = f", {failover:.1f} ms after it lost the other VM" if failover is not None else ""
        return f"proxy: {before} -> solo: {role} {node} serves alone (epoch {status['epoch']}{took})"
    return f"proxy: {before} -> {mode}"


# ---------------------------------------------------------------------- the client
def fnv1a(data, h=0x811C9DC5):
    for b in data:
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h


class ServiceClient:
    """The service's client: one request at a time, every answer checked as it arrives.

    The model follows the firmware (firmware/service.S): every line counts, every line's
    bytes enter a running FNV-1a checksum; ``req ...`` lines are answered
    ``<n> <checksum> <line>``, TIME ``<n> T <seconds>`` (the seconds are not checked: they
    depend on which VM answers and when), NODE ``<n> N <node>`` where node is the serving
    VM's name (``self.node``: the primary's until it is killed).  ``self.end`` is how much of the received
    stream has been accounted for; anything else there is lost, repeated or wrong."""

    def __init__(self, port, time_every, node_every=0, node=None, timeout=START_TIMEOUT_S):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.create_connection(("127.0.0.1", port), timeout=2)
                break
            except OSError as e:
                if time.monotonic() > deadline:
                    raise DemoFailure(f"client: cannot connect to the proxy on port {port}: {e}") from None
                time.sleep(0.05)
        self.sock.settimeout(0.2)
        self.time_every = time_every
        self.node_every = node_every
        self.node = node
        self.received = bytearray()
        self.end = 0
        self.counter = 0
        self.checksum = 0x811C9DC5
        self.sent = 0
        self.answered = 0
        self.duplicated = 0
        self.answers = set()      # every answer line seen (to recognise one that comes twice)
        self.latencies = []       # seconds from sending request i to its whole answer

    @property
    def lost(self):
        return self.sent - self.answered

    def _recv(self, predicate, timeout, what):
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise DemoFailure(f"client: no {what} within {timeout:.0f} s "
                                  f"(received after the last answer: {bytes(self.received[self.end:])[:200]!r})")
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError as e:
                raise DemoFailure(f"client: connection to the proxy lost waiting for {what}: {e}") from None
            if not chunk:
                raise DemoFailure(f"client: the proxy closed the connection waiting for {what}")
            self.received += chunk

    def ready(self):
        self._recv(lambda: len(self.received) >= len(READY), START_TIMEOUT_S, "'service ready'")
        if not self.received.startswith(READY):
            raise DemoFailure(f"client: expected {READY!r} first, got {bytes(self.received[:80])!r}")
        self.end = len(READY)

    def request(self):
        """Send the next request and check its answer (DemoFailure if it is not exactly right)."""
        i = self.sent
        is_time = self.time_every and i % self.time_every == self.time_every - 1
        is_node = not is_time and self.node_every and i % self.node_every == self.node_every - 1
        line = "TIME" if is_time else "NODE" if is_node else f"req {i} {'x' * (i % 7)}"
        self.counter += 1
        self.checksum = fnv1a(line.encode(), self.checksum)
        started = time.monotonic()
        self.sock.sendall(line.encode() + b"\r\n")
        self.sent += 1
        self._recv(lambda: b"\r\n" in self.received[self.end:], ANSWER_TIMEOUT_S, f"answer to request {i + 1}")
        stop = self.received.index(b"\r\n", self.end) + 2
        answer = bytes(self.received[self.end:stop])
        if is_time:
            m = re.fullmatch(rb"(\d+) T (\d+)\r\n", answer)
            right = m is not None and int(m.group(1)) == self.counter and int(m.group(2)) < 86400
            expected = f"{self.counter} T <seconds>\r\n".encode()
        elif is_node:
            expected = f"{self.counter} N {self.node}\r\n".encode()
            right = answer == expected
        else:
            expected = f"{self.counter} {self.checksum:08x} {line}\r\n".encode()
            right = answer == expected
        if not right:
            if answer in self.answers:
                self.duplicated += 1
                raise DemoFailure(f"request {i + 1}: an earlier answer came again: {answer!r} (expected {expected!r})")
            raise DemoFailure(f"request {i + 1}: expected {expected!r}, got {answer!r}")
        self.answers.add(answer)
        self.end = stop
        self.answered += 1
        self.latencies.append(time.monotonic() - started)

    def finish(self):
        """Nothing may follow the last answer (a repeated answer would)."""
        time.sleep(SETTLE_S)
        self.sock.settimeout(0.05)
        try:
            while chunk := self.sock.recv(65536):
                self.received += chunk
        except OSError:
            pass
        extra = bytes(self.received[self.end:])
        if extra:
            lines = [line + b"\r\n" for line in extra.split(b"\r\n") if line]
            self.duplicated += sum(line in self.answers for line in lines)
            raise DemoFailure(f"client: {len(extra)} bytes after the last answer "
                              f"({self.duplicated} repeated answers): {extra[:200]!r}")

    def close(self):
        self.sock.close()


# ---------------------------------------------------------------------- the run
class LiveView:
    """A demo's output: timed event lines, and a live table (``render()``) on a terminal
    unless ``--no-live``, with the event lines printed above it."""

    live = None

    def say(self, text):
        with self.print_lock:
            if self.live is not None:
                self.live.console.print(text, markup=False, highlight=False)
            else:
                print(text, flush=True)

    def event(self, text):
        self.say(f"[{time.monotonic() - self.started:6.1f} s] {text}")

    def _start_live(self):
        if self.args.no_live or not sys.stdout.isatty():
            return
        from rich.console import Console
        from rich.live import Live

        self.live = Live(get_renderable=self.render, console=Console(), refresh_per_second=5,
                         redirect_stdout=False, redirect_stderr=False)
        self.live.start()

    def _stop_live(self):
        if self.live is not None:
            with self.print_lock:
                self.live.refresh()
                self.live.stop()
                self.live = None


class Demo(LiveView):
    def __init__(self, args):
        self.args = args
        self.started = time.monotonic()
        self.processes = []
        self.figures = None
        self.client = None
        self.killed_after = None     # requests answered when the primary was killed
        self.killed_at = None        # and when (monotonic)
        self.killed_primary = None   # its x-colo figures just before
        self.first_after_kill = None
        self.kills = []              # (requests answered, node killed, node that took over), in order
        self.reprotections = []      # (survivor, new secondary, seconds), in order
        self._reprotecting = None    # the thread doing one now
        self._reprotect_error = None
        self.failure = None
        self.live = None
        self.print_lock = threading.Lock()
        if args.records is None:
            self.dir = pathlib.Path(tempfile.mkdtemp(prefix="emu-colo-demo-"))
        else:
            self.dir = pathlib.Path(args.records).resolve()
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ConfigError(f"--records: cannot create {str(self.dir)!r}: {e.strerror or e}") from None
        self.sock_dir = self.dir
        if len(str(self.dir / "secondary.qmp")) > UNIX_PATH_MAX:  # too long for a unix socket path
            self.sock_dir = pathlib.Path(tempfile.mkdtemp(prefix="emu-colo-demo-qmp-"))

    # -- start
    def start(self):
        a = self.args
        kills = ", ".join(str(a.kill_after + k * a.kill_spacing) for k in range(a.failovers))
        self.say(f"emu colo demo: {a.mode} pair, checkpoint every {a.checkpoint_delay} ms, {a.requests} requests, "
                 f"primary killed after {kills}{' with re-protection in between' if a.failovers > 1 else ''}; "
                 f"logs in {self.dir}")
        arbiter = self._spawn("arbiter", ["arbiter", "--listen", "tcp:127.0.0.1:0", "--lease", str(LEASE_MS)])
        arbiter_port = int(arbiter.wait_for(r"listening on [\d.]+:(\d+)").group(1))
        proxy = self._spawn("proxy", ["proxy", "--client", "tcp:127.0.0.1:0", "--listen", "tcp:127.0.0.1:0"])
        m = proxy.wait_for(r"client on [\d.]+:(\d+), VMs on [\d.]+:(\d+)")
        self.client_port, self.vm_port = int(m.group(1)), int(m.group(2))
        common = ["-kernel", str(SERVICE), "-m", MEMORY, "-no-reboot", "--no-status",
                  "--proxy", f"tcp:127.0.0.1:{self.vm_port}", "--arbiter", f"tcp:127.0.0.1:{arbiter_port}",
                  "--heartbeat-period", str(HEARTBEAT_PERIOD_MS), "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT_MS)]
        self.common, self.passive_args = common, ["--passive"] if a.mode == "passive" else []
        self.node_of = dict(NODES)   # role -> the node in that role now
        self.qmp_paths = {role: self.sock_dir / f"{role}.qmp" for role in ROLES}
        for path in self.qmp_paths.values():
            path.unlink(missing_ok=True)
        passive = ["--passive"] if a.mode == "passive" else []
        secondary = self._spawn("secondary", [
            "secondary", "--node", NODES["secondary"], *common, "--listen", "tcp:127.0.0.1:0", *passive,
            "-fw_cfg", f"name={NODE_FILE},string={NODES['secondary']}",
            "--records", str(self.dir / "secondary.csv"), "-qmp", f"unix:{self.qmp_paths['secondary']},server,nowait"])
        listen = int(secondary.wait_for(r"waiting for the primary on tcp:[\d.]+:(\d+)").group(1))
        self._spawn("primary", [
            "primary", "--node", NODES["primary"], *common, "--secondary", f"tcp:127.0.0.1:{listen}",
            "-fw_cfg", f"name={NODE_FILE},string={NODES['primary']}",
            "--checkpoint-delay", str(a.checkpoint_delay), "--records", str(self.dir / "primary.csv"),
            "-qmp", f"unix:{self.qmp_paths['primary']},server,nowait"])
        self.procs = {p.name: p for p in self.processes}
        qmp = {}
        try:
            for role in ROLES:
                qmp[role] = connect_qmp(self.qmp_paths[role], self.procs[role])
            self._wait_colo(qmp)
        except BaseException:
            for client in qmp.values():
                client.close()
            raise
        self.figures = Figures(self.vm_port, qmp, self.event)
        self.event(f"pair in COLO: primary {NODES['primary']} (pid {self.procs['primary'].pid}) -> secondary "
                   f"{NODES['secondary']} (pid {self.procs['secondary'].pid}), {a.mode}")

    def _spawn(self, name, args):
        self.processes.append(Process(self.dir, name, args))
        return self.processes[-1]

    def _wait_colo(self, qmp):
        deadline = time.monotonic() + START_TIMEOUT_S
        for role in ROLES:
            while qmp[role].execute("query-colo-status")["mode"] != role:
                for p in self.processes:
                    if not p.alive():
                        raise DemoFailure(f"{p.name} exited with status {p.proc.returncode} before the pair "
                                          f"entered COLO ({p.log}):\n{p.tail()}")
                if time.monotonic() > deadline:
                    raise DemoFailure(f"the {role} did not enter COLO within {START_TIMEOUT_S:.0f} s "
                                      f"({self.procs[role].log}):\n{self.procs[role].tail()}")
                time.sleep(0.05)

    # -- the workload
    def run(self):
        a = self.args
        self.start()
        self.client = ServiceClient(self.client_port, a.time_every, a.node_every, NODES["primary"])
        self.client.ready()
        self.event("client: 'service ready' through the proxy")
        self.figures.poll()
        self.figures.start()
        self._start_live()
        kill_at = [a.kill_after + k * a.kill_spacing for k in range(a.failovers)]
        try:
            for i in range(a.requests):
                if kill_at and i >= kill_at[0] and self._reprotecting is None:
                    kill_at.pop(0)
                    self._kill_primary()
                    if kill_at:
                        self._start_reprotection()
                self.client.request()
                if self.killed_after is not None and self.first_after_kill is None:
                    self.first_after_kill = time.monotonic() - self.killed_at
                    self.event(f"client: request {i + 1} answered by the former secondary {self.client.node}, "
                               f"{self.first_after_kill * 1e3:.0f} ms after the SIGKILL")
                if self._reprotect_error is not None:
                    raise DemoFailure(self._reprotect_error)
                if self.live is None and (i + 1) % PROGRESS_EVERY == 0 and i + 1 < a.requests:
                    self.say(self.progress_line())
                time.sleep(max(0.0, a.interval / 1e3 - self.client.latencies[-1]))
            self.client.finish()
        except DemoFailure as e:
            self.failure = str(e)
        finally:
            self._stop_live()
        self.figures.poll()
        if self.failure is None and len(self.kills) < a.failovers:
            self.failure = f"{len(self.kills)} of {a.failovers} failovers happened (the re-protection took too long)"
        if self.failure is None and self.killed_after is not None and self._served_after_kill() is None:
            self.failure = "the proxy does not report the former secondary serving after the kill"
        self.summary()
        return 0 if self.failure is None else 1

    def _kill_primary(self):
        self.figures.poll()  # its checkpoint figures as they stand just before
        self.killed_primary = dict(self.figures.colo)
        self.figures.forget("primary")
        primary = self.procs["primary"]
        self.killed_after = self.client.answered
        self.first_after_kill = None
        self.event(f"SIGKILL primary {self.node_of['primary']} (pid {primary.pid}) after {self.killed_after} "
                   f"requests")
        self.killed_at = time.monotonic()
        primary.kill(wait=False)  # the client goes on at once, as it would when a host crashes
        self.kills.append((self.killed_after, self.node_of["primary"], self.node_of["secondary"]))
        self.client.node = self.node_of["secondary"]  # from now on the former secondary answers NODE

    # -- re-protection
    def _start_reprotection(self):
        """A new secondary, and the survivor migrates into it over QMP (in a thread: the client goes on)."""
        self._reprotecting = threading.Thread(target=self._reprotect_guarded, name="colo-demo-reprotect",
                                              daemon=True)
        self._reprotecting.start()

    def _reprotect_guarded(self):
        try:
            self._reprotect()
        except (DemoFailure, EmuError, OSError) as e:
            self._reprotect_error = f"re-protection: {e}"
        finally:
            self._reprotecting = None

    def _reprotect(self):
        began = time.monotonic()
        survivor = self.procs["secondary"]
        self._wait_status("secondary", lambda s: s.get("mode") == "none" and s.get("protection") == "unprotected",
                          "the survivor serving alone")
        node = f"vm-{NEW_NODES[len(self.reprotections)]}"
        name = f"secondary-{node}"
        qmp_path = self.sock_dir / f"{name}.qmp"
        qmp_path.unlink(missing_ok=True)
        new = self._spawn(name, [
            "secondary", "--node", node, *self.common, "--listen", "tcp:127.0.0.1:0", *self.passive_args,
            "-fw_cfg", f"name={NODE_FILE},string={node}", "--records", str(self.dir / f"{name}.csv"),
            "-qmp", f"unix:{qmp_path},server,nowait"])
        listen = int(new.wait_for(r"waiting for the primary on tcp:[\d.]+:(\d+)").group(1))
        new_qmp = connect_qmp(qmp_path, new)
        f = self.figures
        with f.lock:
            # the survivor's monitor (its role in the figures: the old one)
            protect_over_qmp(f.qmp["secondary"], f"tcp:127.0.0.1:{listen}", self.args.checkpoint_delay)
        self.event(f"re-protecting: {self.node_of['secondary']} migrates into a new secondary {node} "
                   f"(pid {new.pid})")
        self._wait_status("secondary", lambda s: s.get("mode") == "primary", "the survivor back in COLO")
        with f.lock:  # the survivor is the primary now, the new VM its secondary
            f.qmp["primary"], f.qmp["secondary"] = f.qmp.pop("secondary"), new_qmp
            f.status["primary"], f.status["secondary"] = f.status["secondary"], {}
            f.colo = {}
        self.node_of = {"primary": self.node_of["secondary"], "secondary": node}
        self.procs["primary"], self.procs["secondary"] = survivor, new
        self.killed_primary = None
        seconds = time.monotonic() - began
        self.reprotections.append((self.node_of["primary"], node, seconds))
        self.event(f"protected again: primary {self.node_of['primary']} -> secondary {node} "
                   f"({seconds:.1f} s after the failover)")

    def _wait_status(self, role, predicate, what):
        deadline = time.monotonic() + START_TIMEOUT_S
        while not predicate(self.figures.status.get(role) or {}):
            if time.monotonic() > deadline:
                raise DemoFailure(f"{what}: not within {START_TIMEOUT_S:.0f} s "
                                  f"({self.figures.status.get(role)})")
            time.sleep(0.05)

    def _served_after_kill(self):
        proxy = self.figures.proxy
        if proxy.get("mode") == "solo" and proxy.get("active") == "secondary":
            return proxy
        return None

    # -- live view
    def _state(self):
        """The figures shown, live or as a progress line."""
        f, c = self.figures, self.client
        proxy = f.proxy
        primary = f.colo if self.killed_primary is None else self.killed_primary
        gaps = c.latencies
        return {
            "answered": c.answered, "lost": c.lost, "duplicated": c.duplicated,
            "serving": _who_serves(proxy), "proxy_mode": proxy.get("mode", "?"),
            "checkpoints": primary.get("checkpoints", 0), "ok": primary.get("ok", 0),
            "triggers": _triggers(primary.get("triggers") or {}),
            "mismatches": proxy.get("mismatches", 0),
            "last_pause": primary.get("last-pause-ms"), "median_pause": primary.get("pause-ms-median"),
            "failover_ms": proxy.get("failover_ms"),
            "gap_ms": max(gaps) * 1e3 if gaps else None, "last_ms": gaps[-1] * 1e3 if gaps else None,
        }

    def render(self):
        from rich.table import Table

        s = self._state()
        a = self.args
        t = Table(title=f"emu colo demo ({a.mode}, checkpoint every {a.checkpoint_delay} ms)", show_header=False,
                  title_justify="left", min_width=72)
        t.add_column(style="bold")
        t.add_column()
        t.add_row("requests", f"{s['answered']}/{a.requests} answered, lost {s['lost']}, "
                              f"duplicated {s['duplicated']}")
        t.add_row("serving", s["serving"])
        t.add_row("proxy mode", s["proxy_mode"])
        t.add_row("VMs", f"primary: {self._vm_text('primary')}; secondary: {self._vm_text('secondary')}")
        frozen = " (primary gone: none since)" if self.killed_primary is not None else ""
        t.add_row("checkpoints", f"{s['checkpoints']} (ok {s['ok']}): {s['triggers'] or '-'}{frozen}")
        t.add_row("mismatches", str(s["mismatches"]))
        t.add_row("pause", f"last {_ms(s['last_pause'])}, median {_ms(s['median_pause'])}")
        failover = "primary not killed yet"
        if self.killed_after is not None:
            failover = f"primary killed after request {self.killed_after}"
            if s["failover_ms"] is not None:
                failover += f"; takeover {_ms(s['failover_ms'])} after the proxy lost it"
            if self.first_after_kill is not None:
                failover += f"; first answer {self.first_after_kill * 1e3:.0f} ms after the SIGKILL"
        t.add_row("failover", failover)
        t.add_row("client gap", f"last {_ms(s['last_ms'])}, longest {_ms(s['gap_ms'])}")
        t.add_row("elapsed", f"{time.monotonic() - self.started:.1f} s")
        return t

    def _vm_text(self, role):
        if role == "primary" and self.killed_after is not None:
            return "killed"
        status = self.figures.status[role]
        if status.get("mode") in ROLES:
            return f"COLO {status['mode']}"
        if status.get("last-mode") in ROLES:
            return f"left COLO ({status.get('reason')})"
        return status.get("mode", "?")

    def progress_line(self):
        s = self._state()
        return (f"[{time.monotonic() - self.started:6.1f} s] {s['answered']}/{self.args.requests} answered, "
                f"lost {s['lost']}, duplicated {s['duplicated']} | {s['serving']} | checkpoints {s['checkpoints']} "
                f"({s['triggers'] or '-'}) | mismatches {s['mismatches']} | pause last {_ms(s['last_pause'])}, "
                f"median {_ms(s['median_pause'])}")

    # -- the end
    def summary(self):
        a, c, f = self.args, self.client, self.figures
        proxy = f.proxy if f is not None else {}
        lines = ["", "emu colo demo: summary"]
        if c is not None:
            lines.append(f"  requests     {c.sent} of {a.requests} sent, {c.answered} answered correctly, "
                         f"lost {c.lost}, duplicated {c.duplicated}")
        if self.killed_after is not None:
            served = self._served_after_kill()
            who = (f"the former secondary ({served['secondary'].get('node')}, alone, epoch {served['epoch']})"
                   if served else f"? (proxy: {_who_serves(proxy)})")
            first, spans = 1, []
            for k, (after, killed, _) in enumerate(self.kills):
                name = "the primary" if k == 0 else f"{killed} (re-protected)"
                spans.append(f"{name} for requests {first}-{after}")
                first = after + 1
            lines.append(f"  served by    {', then '.join(spans)}, then {who} for requests {first}-{c.answered}")
        elif proxy:
            lines.append(f"  served by    {_who_serves(proxy)}")
        for survivor, node, seconds in self.reprotections:
            lines.append(f"  re-protected {survivor} took a new secondary {node}, protected again {seconds:.1f} s "
                         f"after the failover")
        primary = self.killed_primary if self.killed_primary is not None else (f.colo if f else {})
        if primary:
            lines.append(f"  checkpoints  {primary.get('checkpoints', 0)} (ok {primary.get('ok', 0)}), "
                         f"pause median {_ms(primary.get('pause-ms-median'))}, max {_ms(primary.get('pause-ms-max'))}; "
                         f"by trigger: {_triggers(primary.get('triggers') or {}) or '-'}")
        if proxy:
            asked = proxy.get("checkpoint_requests") or {}
            lines.append(f"  mismatches   {proxy.get('mismatches', 0)} (checkpoints the proxy asked for: "
                         f"{asked.get('mismatch', 0)} on a mismatch, {asked.get('timeout', 0)} on a compare timeout)")
        if self.killed_after is not None:
            m = re.search(r"serving alone from checkpoint (\d+) \(failover took ([\d.]+) ms\)",
                          self.procs["secondary"].text())
            own = f"; the secondary served from checkpoint {m[1]}, {m[2]} ms after it lost the primary" if m else ""
            lines.append(f"  failover     the proxy accepted the takeover {_ms(proxy.get('failover_ms'))} after it "
                         f"lost the primary{own}")
        if c is not None and c.latencies:
            lines.append(f"  client gap   {self._gap_text()}")
        if f is not None and f.errors:
            lines.append(f"  monitoring   {len(f.errors)} errors, last: {f.errors[-1]}")
        if self.failure is None:
            lines.append("  result       OK: every request answered exactly once, correctly")
        else:
            lines.append(f"  result       FAILED: {self.failure}")
            lines.append(f"               logs: {self.dir}")
        lines.append(f"  records      emu colo report {self.dir / 'primary.csv'} -o {self.dir / 'checkpoints.png'}")
        self.say("\n".join(lines))

    def _gap_text(self):
        lat = self.client.latencies
        median = statistics.median(lat) * 1e3
        if self.first_after_kill is None:
            return f"longest answer time {max(lat) * 1e3:.0f} ms; median {median:.1f} ms"
        window = range(self.killed_after, min(len(lat), self.killed_after + KILL_WINDOW))
        worst = max(window, key=lambda i: lat[i])
        return (f"SIGKILL to the first answer {self.first_after_kill * 1e3:.0f} ms; longest answer time around the "
                f"kill {lat[worst] * 1e3:.0f} ms (request {worst + 1}); median answer time {median:.1f} ms")

    def close(self):
        if self.live is not None:
            self._stop_live()
        if self.figures is not None:
            self.figures.close()
        if self.client is not None:
            self.client.close()
        stop_all(self.processes[::-1], who="emu colo demo")
        if self.sock_dir != self.dir:
            for path in self.sock_dir.iterdir():
                path.unlink(missing_ok=True)
            self.sock_dir.rmdir()


def _who_serves(proxy):
    mode = proxy.get("mode")
    if mode == "paired":
        sec = proxy.get("secondary") or {}
        return f"primary {proxy['primary'].get('node')}, protected by secondary {sec.get('node')} ({sec.get('mode')})"
    if mode == "solo":
        role = proxy.get("active")
        return f"{role} {(proxy.get(role) or {}).get('node')} alone (epoch {proxy.get('epoch')})"
    if mode == "waiting":
        return "nobody yet (waiting for the first checkpoint)"
    return "?"


def _triggers(counts):
    return ", ".join(f"{name} {n}" for name, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def _ms(value):
    return "-" if value is None else f"{value:.1f} ms"


# ---------------------------------------------------------------------- command
GUESTS = ("service", "linux")


def _guest_option(argv):
    """``--guest service|linux`` (the service firmware on a serial pair, or Debian's Linux
    serving HTTP with a disk on a networked pair: :mod:`colo.netdemo`) and the other options."""
    rest, guest, i = [], "service", 0
    while i < len(argv):
        if argv[i] == "--guest" and i + 1 < len(argv):
            guest, i = argv[i + 1], i + 2
            continue
        if argv[i].startswith("--guest="):
            guest = argv[i].split("=", 1)[1]
        else:
            rest.append(argv[i])
        i += 1
    if guest not in GUESTS:
        raise ConfigError(f"colo demo: --guest {guest!r}: one of {', '.join(GUESTS)}")
    return guest, rest


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(f"colo demo: {message}")


def parse_args(argv):
    p = _Parser(prog="emu colo demo", allow_abbrev=False,
                description="A protected pair, a checked client, and a primary killed mid-run "
                            "(--guest linux: Debian's Linux serving HTTP with a disk, on a networked pair).")
    p.add_argument("--requests", type=int, default=400, metavar="N", help="requests to send (default 400)")
    p.add_argument("--kill-after", type=int, metavar="N",
                   help="SIGKILL the primary after N answers (default: the requests split evenly by the kills)")
    p.add_argument("--failovers", type=int, default=2, metavar="K",
                   help="primaries killed (default 2): after each kill but the last, a new secondary is started "
                        "and the survivor migrates into it (re-protection); the kills are evenly spaced")
    p.add_argument("--mode", choices=("compare", "passive"), default="compare",
                   help="compare: the secondary runs and output is compared (COLO); passive: it stays stopped "
                        "between checkpoints (Remus)")
    p.add_argument("--checkpoint-delay", type=int, default=200, metavar="MS",
                   help="periodic checkpoint interval (default 200)")
    p.add_argument("--interval", type=int, default=40, metavar="MS",
                   help="a new request every MS ms at most (the client's pace; default 40, so that checkpoints "
                        "fall between requests)")
    p.add_argument("--node-every", type=int, default=7, metavar="K",
                   help="every K-th request is NODE, which the two VMs answer differently (0: none; default 7)")
    p.add_argument("--time-every", type=int, default=0, metavar="K",
                   help="every K-th request is TIME, whose answer rarely differs between the VMs (default 0: none)")
    p.add_argument("--records", metavar="DIR", help="logs and per-checkpoint records here (default: a new temporary "
                                                    "directory)")
    p.add_argument("--no-live", action="store_true", help="plain progress lines instead of the live view")
    args = p.parse_args(argv)
    if args.requests < 1:
        raise ConfigError("colo demo: --requests must be at least 1")
    if args.failovers < 1:
        raise ConfigError("colo demo: --failovers must be at least 1")
    if args.kill_after is None:
        args.kill_after = args.requests // (args.failovers + 1)
    args.kill_spacing = max(1, (args.requests - args.kill_after) // args.failovers)
    last_kill = args.kill_after + (args.failovers - 1) * args.kill_spacing
    if not 0 <= args.kill_after < args.requests or last_kill >= args.requests:
        raise ConfigError(f"colo demo: --kill-after must be from 0 to {args.requests - 1} (below --requests, so "
                          f"that the former secondary serves some)")
    if args.checkpoint_delay < 1:
        raise ConfigError("colo demo: --checkpoint-delay must be at least 1 ms")
    if args.interval < 0:
        raise ConfigError("colo demo: --interval must be 0 or more")
    if args.time_every < 0 or args.node_every < 0:
        raise ConfigError("colo demo: --time-every and --node-every must be 0 (none) or more")
    return args


def main(argv):
    guest, argv = _guest_option(argv)
    if guest == "linux":
        from .netdemo import main as linux_demo
        return linux_demo(argv)
    args = parse_args(argv)
    if not SERVICE.exists():
        raise ConfigError(f"colo demo: {SERVICE.relative_to(ROOT)} is missing (run `make firmware`)")

    def interrupt(signum, frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, interrupt)
    demo = None
    started = time.monotonic()
    try:
        demo = Demo(args)
        return demo.run()
    except KeyboardInterrupt:
        print("\nemu colo demo: interrupted; stopping every process", file=sys.stderr, flush=True)
        return 130
    except DemoFailure as e:
        print(f"emu colo demo: FAILED: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        # a second Ctrl-C must not leave processes behind
        interrupted = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        if demo is not None:
            demo.close()
        for sig, handler in interrupted.items():
            signal.signal(sig, handler)
        signal.signal(signal.SIGTERM, previous)
        print(f"  wall time    {time.monotonic() - started:.1f} s", flush=True)

"""``emu colo pair``: a primary and a secondary, kept protected: after each failover a new
secondary, and the survivor migrates into it (re-protection), as often as it takes.

It starts ``emu colo secondary`` and ``emu colo primary`` as child processes with the same
machine options, each with a QMP monitor (a unix socket in ``--dir``).  When one of them
dies, the other serves alone (the pair's own failover: the supervisor has no part in it);
the supervisor then waits until the survivor serves, starts a new secondary (or takes the
next ``--standby`` address: a secondary already listening on another host) and tells the
survivor over QMP what a QEMU user would: ``migrate-set-capabilities x-colo``, then
``migrate``.  The survivor becomes the new pair's primary; the client endpoint follows
without its clients noticing.  A new secondary that dies before the pair forms, or within
``STABLE_S`` of it, makes the next attempt wait (1 s, doubled each time, at most 30 s).

Nodes are named vm-1, vm-2, ... in the order they start, so that the log says which VM
serves.  SIGTERM or SIGINT stops every child (SIGTERM first) and ends with status 0; the
supervisor ends with status 1 when no VM is left.
"""

import pathlib
import signal
import sys
import tempfile
import time

from emu.errors import ConfigError, EmuError

from .netloop import CommandParser
from .processes import START_TIMEOUT_S, Process, ProcessFailure, connect_qmp, protect_over_qmp, stop_all
from .wire import parse_tcp_uri

POLL_S = 0.1
PROTECT_TIMEOUT_S = 120.0
STABLE_S = 10.0               # a secondary that lives this long after the pair formed resets the backoff
BACKOFF_FIRST_S, BACKOFF_MAX_S = 1.0, 30.0  # s; --max-backoff sets the longest


class _Stop(Exception):
    """SIGTERM or SIGINT: stop every child."""


class Vm:
    def __init__(self, process, node, qmp_path):
        self.process, self.node, self.qmp_path = process, node, qmp_path
        self.qmp = None

    def monitor(self):
        if self.qmp is None:
            self.qmp = connect_qmp(self.qmp_path, self.process)
        return self.qmp

    def colo_status(self):
        return self.monitor().execute("query-colo-status")

    def close(self):
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None


class Supervisor:
    def __init__(self, args, machine_args):
        self.args = args
        self.machine = machine_args
        self.dir = pathlib.Path(args.dir) if args.dir else pathlib.Path(tempfile.mkdtemp(prefix="emu-colo-pair-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.count = 0
        self.vms = []                  # every VM started, in order
        self.primary = self.secondary = None
        self.standbys = list(args.standby or [])
        self.backoff = 0.0
        self.failovers = self.reprotections = 0
        self.stop_signal = None        # set by the SIGTERM/SIGINT handler

    def say(self, text):
        print(f"colo pair: {text}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ children
    def _next(self):
        self.count += 1
        node = f"vm-{self.count}"
        return node, self.dir / f"{node}.qmp"

    def _common(self, node, qmp_path):
        return [*self.machine, "--node", node, "-qmp", f"unix:{qmp_path},server,nowait"]

    def start_secondary(self):
        """A new local secondary; returns (Vm, its address for migrate)."""
        node, qmp_path = self._next()
        args = ["secondary", *self._common(node, qmp_path), "--listen", "tcp:127.0.0.1:0"]
        if self.args.passive:
            args.append("--passive")
        vm = Vm(Process(self.dir, node, args), node, qmp_path)
        self.vms.append(vm)
        port = vm.process.wait_for(r"waiting for the primary on tcp:[\d.]+:(\d+)")[1]
        self.say(f"started secondary {node} (pid {vm.process.pid}), listening on 127.0.0.1:{port}")
        return vm, f"tcp:127.0.0.1:{port}"

    def start(self):
        secondary, address = self.start_secondary()
        node, qmp_path = self._next()
        args = ["primary", *self._common(node, qmp_path), "--secondary", address,
                "--checkpoint-delay", str(self.args.checkpoint_delay)]
        primary = Vm(Process(self.dir, node, args), node, qmp_path)
        self.vms.append(primary)
        self.say(f"started primary {node} (pid {primary.process.pid})")
        self.primary, self.secondary = primary, secondary
        self._wait_protected(primary, secondary, "the pair formed")

    def _wait_protected(self, primary, secondary, what):
        deadline = time.monotonic() + PROTECT_TIMEOUT_S
        while True:
            self._check_signal()
            if not primary.process.alive():
                raise ProcessFailure(f"{primary.node} died before {what}:\n{primary.process.tail()}")
            if secondary.process is not None and not secondary.process.alive():
                raise ProcessFailure(f"{secondary.node} died before {what}:\n{secondary.process.tail()}")
            try:
                if primary.colo_status()["mode"] == "primary":
                    break
            except EmuError:
                pass
            if time.monotonic() > deadline:
                raise ProcessFailure(f"{what}: no COLO within {PROTECT_TIMEOUT_S:.0f} s:\n{primary.process.tail()}")
            time.sleep(POLL_S)
        self.protected_at = time.monotonic()
        self.say(f"protected: primary {primary.node} -> secondary {secondary.node} ({what})")

    # ------------------------------------------------------------------ the loop
    def run(self):
        self.start()
        while True:
            self._check_signal()
            p_alive, s_alive = self.primary.process.alive(), self.secondary.process is None or \
                self.secondary.process.alive()
            if p_alive and s_alive:
                if self.backoff and time.monotonic() - self.protected_at > STABLE_S:
                    self.backoff = 0.0
                time.sleep(POLL_S)
                continue
            if not p_alive and not s_alive:
                self.say("both VMs are gone: nothing left to protect")
                return 1
            lost, survivor = (self.primary, self.secondary) if not p_alive else (self.secondary, self.primary)
            if survivor.process is None:  # a standby on another host: not ours to watch
                self.say(f"{lost.node} is gone and the survivor runs on another host: nothing left to supervise")
                return 1
            self.failovers += 1
            if lost is self.secondary and time.monotonic() - self.protected_at < STABLE_S:
                self.backoff = self._longer_backoff()
            self.say(f"{lost.node} is gone ({_how(lost)}); {survivor.node} serves alone")
            lost.close()
            if not self._reprotect(survivor):
                return 1

    def _longer_backoff(self):
        """The wait before the next secondary, doubled from BACKOFF_FIRST_S up to --max-backoff."""
        return min(self.args.max_backoff, max(BACKOFF_FIRST_S, 2 * self.backoff))

    def _reprotect(self, survivor):
        """Until ``survivor`` is the primary of a new pair (False: the survivor is gone too)."""
        began = time.monotonic()
        if not self._wait_serving(survivor):
            return False
        while True:
            if self.backoff:
                self.say(f"waiting {self.backoff:.0f} s before the next secondary (the last one died young)")
                self._sleep(self.backoff)
            if not survivor.process.alive():
                self.say(f"{survivor.node} died too: nothing left to protect")
                return False
            try:
                if self.standbys:
                    address = self.standbys.pop(0)
                    node, _ = self._next()
                    secondary = Vm(None, node, None)
                    self.say(f"re-protecting onto the standby secondary at {address} ({node})")
                else:
                    secondary, address = self.start_secondary()
                protect_over_qmp(survivor.monitor(), address, self.args.checkpoint_delay)
                self._wait_protected(survivor, secondary, f"re-protected in {time.monotonic() - began:.1f} s")
            except (ProcessFailure, EmuError) as e:
                self.backoff = self._longer_backoff()
                self.say(f"re-protection failed: {e}")
                continue
            self.reprotections += 1
            self.primary, self.secondary = survivor, secondary
            return True

    def _wait_serving(self, survivor):
        """Until the survivor has left COLO and serves alone (its takeover done)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while survivor.process.alive():
            self._check_signal()
            try:
                if survivor.colo_status()["mode"] == "none":
                    return True
            except EmuError:
                pass
            if time.monotonic() > deadline:
                self.say(f"{survivor.node} did not leave COLO within {START_TIMEOUT_S:.0f} s")
                return False
            time.sleep(POLL_S)
        self.say(f"{survivor.node} is gone too ({_how(survivor)}): nothing left to protect")
        return False

    def _sleep(self, seconds):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self._check_signal()
            time.sleep(min(POLL_S, end - time.monotonic()))

    def _check_signal(self):
        if self.stop_signal is not None:
            raise _Stop()

    def close(self):
        for vm in self.vms:
            vm.close()
        stop_all([vm.process for vm in self.vms if vm.process is not None], who="colo pair")


def _how(vm):
    code = vm.process.proc.returncode
    return "killed by a signal" if code is not None and code < 0 else f"exit status {code}"


def parse_args(argv):
    p = CommandParser("pair", (
        "A primary and a secondary kept protected: a new secondary after each failover. Every option not "
        "listed here goes to both VMs (emu run options, --proxy/--net-proxy, --arbiter, --heartbeat-*, ...)."))
    p.add_argument("--checkpoint-delay", type=int, default=200, metavar="MS")
    p.add_argument("--passive", action="store_true", help="the secondaries only take checkpoints (Remus)")
    p.add_argument("--standby", action="append", metavar="tcp:HOST:PORT",
                   help="a secondary already listening there (emu colo secondary --listen, another host, say): "
                        "the next re-protection goes to it before a local one is started; repeatable")
    p.add_argument("--max-backoff", type=float, default=BACKOFF_MAX_S, metavar="S",
                   help=f"the longest wait before starting another secondary when they keep dying young "
                        f"(doubling from {BACKOFF_FIRST_S:g} s; default {BACKOFF_MAX_S:g} s)")
    p.add_argument("--dir", metavar="DIR", help="the VMs' logs and QMP sockets (default: a temporary directory)")

    args, rest = p.parse_known_args(argv)
    for name in ("--node", "-qmp", "--listen", "--secondary"):
        if any(a == name or a.startswith(name + "=") for a in rest):
            raise ConfigError(f"colo pair: {name} is the supervisor's to set for each VM")
    if not any(a in ("--proxy", "--net-proxy") or a.startswith(("--proxy=", "--net-proxy=")) for a in rest):
        raise ConfigError("colo pair: --proxy or --net-proxy tcp:HOST:PORT (the client endpoint) is needed")
    if args.checkpoint_delay < 1:
        raise ConfigError("colo pair: --checkpoint-delay must be at least 1 ms")
    if not args.max_backoff >= 0:  # NaN too
        raise ConfigError(f"colo pair: --max-backoff must be a number of seconds >= 0, not {args.max_backoff:g}")
    for address in args.standby or []:
        parse_tcp_uri(address, "--standby")
    return args, rest


def main(argv):
    args, machine = parse_args(argv)
    supervisor = Supervisor(args, machine)

    def on_signal(signum, frame):
        supervisor.stop_signal = signum

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return supervisor.run()
    except _Stop:
        supervisor.say(f"stopping every VM (signal {supervisor.stop_signal})")
        return 0
    except ProcessFailure as e:
        supervisor.say(f"FAILED: {e}")
        return 1
    finally:
        supervisor.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)

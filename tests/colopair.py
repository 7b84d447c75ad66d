"""A whole COLO deployment in real processes: arbiter, client endpoint, secondary, primary,
and a line client talking to the service firmware through the endpoint."""

import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

from conftest import ROOT, firmware
from emuproc import Qmp

SERVICE = "service.elf"


class Proc:
    """One ``python -m emu ...`` process, stderr to a file we can wait on."""

    def __init__(self, tmp_path, name, args, prefix=()):
        self.name = name
        self.err_path = pathlib.Path(tmp_path) / f"{name}.err"
        self.out_path = pathlib.Path(tmp_path) / f"{name}.out"
        cmd = [*prefix, sys.executable, "-m", "emu", *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=open(self.out_path, "wb"),
                                     stderr=open(self.err_path, "wb"))

    def stderr(self):
        return self.err_path.read_text(errors="replace")

    def wait_for(self, pattern, timeout=30):
        """The first match of ``pattern`` in stderr (fails with the log if the process dies)."""
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.stderr())
            if m:
                return m
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited ({self.proc.returncode}) before {pattern!r}:\n"
                                     f"{self.stderr()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no {pattern!r} within {timeout} s:\n{self.stderr()}")
            time.sleep(0.02)

    def kill(self, sig=signal.SIGKILL):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def alive(self):
        return self.proc.poll() is None


class LineClient:
    """The client of the service: sends lines, reads answers, keeps every byte received."""

    def __init__(self, port, timeout=30, connect=None):
        """``connect(port)``: the socket to the endpoint (default: to 127.0.0.1 here)."""
        connect = connect or (lambda p: socket.create_connection(("127.0.0.1", p), timeout=2))
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = connect(port)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.received = bytearray()
        self.sock.settimeout(0.2)

    def send(self, text):
        self.sock.sendall(text.encode())

    def read_until(self, predicate, timeout=30):
        """Read until ``predicate(received)`` holds; returns the received bytes."""
        deadline = time.monotonic() + timeout
        while not predicate(bytes(self.received)):
            if time.monotonic() > deadline:
                raise AssertionError(f"client: timed out; received so far: {bytes(self.received)[-400:]!r}")
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not chunk:
                raise AssertionError(f"client: the endpoint closed; received: {bytes(self.received)[-400:]!r}")
            self.received += chunk
        return bytes(self.received)

    def lines(self):
        return bytes(self.received).decode(errors="replace").split("\r\n")

    def close(self):
        self.sock.close()


def fnv1a(data, h=0x811C9DC5):
    for b in data:
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h


class ServiceModel:
    """What the service firmware must answer (counter and running checksum)."""

    def __init__(self):
        self.counter = 0
        self.checksum = 0x811C9DC5

    def expect(self, line):
        self.counter += 1
        self.checksum = fnv1a(line.encode(), self.checksum)
        return f"{self.counter} {self.checksum:08x} {line}"


class Workload:
    """Numbered requests, one at a time, every answer checked against the model as it
    arrives; every ``time_every``-th request is a TIME (its answer differs between the
    two VMs: a source of divergence).  The whole received stream must be exactly the
    answers in order: nothing lost, nothing twice."""

    def __init__(self, client, time_every=0, node_every=0, node=None):
        self.client = client
        self.model = ServiceModel()
        self.time_every = time_every
        self.node_every = node_every  # every n-th request is NODE, answered with ``node`` (set by the test)
        self.node = node
        self.sent = 0
        self.expected_end = 0  # bytes of the stream accounted for
        self.gaps = []         # seconds between a request and its answer

    def ready(self, timeout=30):
        self.client.read_until(lambda b: b"service ready\r\n" in b, timeout)
        self.expected_end = len(b"service ready\r\n")
        assert bytes(self.client.received[:self.expected_end]) == b"service ready\r\n"

    def step(self, timeout=30):
        i = self.sent
        self.sent += 1
        is_time = self.time_every and i % self.time_every == self.time_every - 1
        is_node = not is_time and self.node_every and i % self.node_every == self.node_every - 1
        line = "TIME" if is_time else "NODE" if is_node else f"req {i} {'x' * (i % 7)}"
        expected = self.model.expect(line)
        if is_node:
            expected = f"{self.model.counter} N {self.node}"
        started = time.monotonic()
        self.client.send(line + "\r\n")
        if is_time:
            pattern = re.compile(rb"%d T (\d+)\r\n" % self.model.counter)
            got = self.client.read_until(lambda b: len(b) > self.expected_end and b"\r\n" in b[self.expected_end:],
                                         timeout)
            answer = got[self.expected_end:got.index(b"\r\n", self.expected_end) + 2]
            assert pattern.fullmatch(answer), f"request {i}: TIME answered {answer!r}"
        else:
            answer = (expected + "\r\n").encode()
            got = self.client.read_until(lambda b: len(b) >= self.expected_end + len(answer), timeout)
            actual = got[self.expected_end:self.expected_end + len(answer)]
            assert actual == answer, f"request {i}: expected {answer!r}, got {actual!r} (stream lost or repeated bytes)"
        self.expected_end += len(answer)
        self.gaps.append(time.monotonic() - started)

    def finish(self, settle=0.3):
        """Nothing more may arrive after the last answer (a duplicate would)."""
        time.sleep(settle)
        self.client.sock.settimeout(0.05)
        try:
            while True:
                chunk = self.client.sock.recv(65536)
                if not chunk:
                    break
                self.client.received += chunk
        except OSError:
            pass
        extra = bytes(self.client.received[self.expected_end:])
        assert not extra, f"unexpected bytes after the last answer: {extra[:200]!r}"


class ColoDeployment:
    """Start what a test needs; ``close()`` kills whatever is left."""

    def __init__(self, tmp_path, guest=SERVICE, mode="compare", checkpoint_delay=200, arbiter=True,
                 primary_args=(), secondary_args=(), proxy_args=(), heartbeat=(50, 1000), memory="32M",
                 records=True, secondary_port_hook=None, guest_args=None, protect_by_qmp=False):
        self.tmp = pathlib.Path(tmp_path)
        self.procs = []
        self.arbiter = None
        arbiter_uri = arbiter if isinstance(arbiter, str) else None  # etcd://... given by the test
        if arbiter is True:
            self.arbiter = self._start("arbiter", ["colo", "arbiter", "--listen", "tcp:127.0.0.1:0", "--lease", "1000"])
            self.arbiter_port = int(self.arbiter.wait_for(r"listening on [\d.]+:(\d+)").group(1))
            arbiter_uri = f"tcp:127.0.0.1:{self.arbiter_port}"
        self.proxy = self._start("proxy", ["colo", "proxy", "--client", "tcp:127.0.0.1:0", "--listen",
                                           "tcp:127.0.0.1:0", *proxy_args])
        m = self.proxy.wait_for(r"client on [\d.]+:(\d+), VMs on [\d.]+:(\d+)")
        self.client_port, self.vm_port = int(m.group(1)), int(m.group(2))
        machine = list(guest_args) if guest_args is not None else ["-kernel", str(firmware(guest))]
        machine += ["-m", memory, "-no-reboot"]
        common = machine + ["--proxy", f"tcp:127.0.0.1:{self.vm_port}", "--heartbeat-period", str(heartbeat[0]),
                            "--heartbeat-timeout", str(heartbeat[1]), "--no-status"]
        if arbiter_uri:
            common += ["--arbiter", arbiter_uri]
        self.qmp_paths = {role: self.tmp / f"{role}.qmp" for role in ("primary", "secondary")}
        self.records = {role: self.tmp / f"{role}.json" for role in ("primary", "secondary")}
        self._secondary_base = ["colo", "secondary", *common, "--listen", "tcp:127.0.0.1:0", *secondary_args]
        if mode == "passive":
            self._secondary_base.append("--passive")
        self.generation = 0
        sec = ["colo", "secondary", *common, "--listen", "tcp:127.0.0.1:0",
               "-qmp", f"unix:{self.qmp_paths['secondary']},server,nowait", *secondary_args]
        if records:
            sec += ["--records", str(self.records["secondary"])]
        if mode == "passive":
            sec.append("--passive")
        self.secondary = self._start("secondary", sec)
        listen = int(self.secondary.wait_for(r"waiting for the primary on tcp:[\d.]+:(\d+)").group(1))
        if secondary_port_hook is not None:  # e.g. a relay the test can cut
            listen = secondary_port_hook(listen)
        self.secondary_uri = f"tcp:127.0.0.1:{listen}"
        self.checkpoint_delay = checkpoint_delay
        qmp = ["-qmp", f"unix:{self.qmp_paths['primary']},server,nowait"]
        if protect_by_qmp:  # a plain `emu run` whose protection the test starts over QMP, as with QEMU
            pri = ["run", *machine, "-serial", f"colo:127.0.0.1:{self.vm_port},role=primary,node=primary",
                   *qmp, *primary_args]
        else:
            pri = ["colo", "primary", *common, "--secondary", self.secondary_uri,
                   "--checkpoint-delay", str(checkpoint_delay), *qmp, *primary_args]
            if records:
                pri += ["--records", str(self.records["primary"])]
        self.primary = self._start("primary", pri)
        self._qmp = {}

    def protect(self):
        """QMP on the primary: x-colo, return-path, x-checkpoint-delay, migrate to the secondary."""
        q = self.qmp("primary")
        q("migrate-set-capabilities", capabilities=[{"capability": "x-colo", "state": True},
                                                    {"capability": "return-path", "state": True}])
        q("migrate-set-parameters", **{"x-checkpoint-delay": self.checkpoint_delay})
        q("migrate", uri=self.secondary_uri)

    def reprotect(self, timeout=60):
        """After the secondary took over: a new secondary process (node ``vm-N``), and the
        survivor migrates into it with x-colo over its QMP, as with QEMU.  The survivor is
        then ``self.primary``, the new process ``self.secondary``."""
        self.generation += 1
        name = f"secondary{self.generation}"
        qmp_path = self.tmp / f"{name}.qmp"
        args = [*self._secondary_base, "--node", f"vm-{self.generation}", "-qmp", f"unix:{qmp_path},server,nowait"]
        self.records[name] = self.tmp / f"{name}.json"
        new = self._start(name, [*args, "--records", str(self.records[name])])
        port = int(new.wait_for(r"waiting for the primary on tcp:[\d.]+:(\d+)").group(1))
        old_qmp = self._qmp.pop("primary", None)
        if old_qmp is not None:
            try:
                old_qmp.close()
            except Exception:
                pass
        self.primary, self.secondary = self.secondary, new
        self.qmp_paths["primary"], self.qmp_paths["secondary"] = self.qmp_paths["secondary"], qmp_path
        if "secondary" in self._qmp:
            self._qmp["primary"] = self._qmp.pop("secondary")
        self.secondary_uri = f"tcp:127.0.0.1:{port}"
        self.protect()
        self.wait_colo(timeout)

    def _start(self, name, args):
        proc = Proc(self.tmp, name, args)
        self.procs.append(proc)
        return proc

    def qmp(self, role):
        if role not in self._qmp:
            self._qmp[role] = Qmp(self.qmp_paths[role])
        return self._qmp[role]

    def wait_colo(self, timeout=30):
        """Until both sides report COLO."""
        deadline = time.monotonic() + timeout
        for role in ("primary", "secondary"):
            while self.qmp(role)("query-colo-status")["mode"] != role:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{role} never entered COLO:\n{getattr(self, role).stderr()}")
                time.sleep(0.05)

    def client(self):
        return LineClient(self.client_port)

    def close(self):
        for qmp in self._qmp.values():
            try:
                qmp.close()
            except Exception:
                pass
        for proc in self.procs:
            proc.kill(signal.SIGKILL)

    def logs(self):
        return "\n".join(f"--- {p.name} ---\n{p.stderr()}" for p in self.procs)

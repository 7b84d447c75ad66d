"""The child processes of ``emu colo demo`` and ``emu colo pair``: each an ``emu`` command
with its stderr in a log file that can be waited on, and the QMP client that drives them."""

import concurrent.futures
import ctypes
import json
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

from emu.errors import EmuError

ROOT = pathlib.Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 30.0


class ProcessFailure(EmuError):
    """A child process died, or did not start, or its monitor did not answer."""


def _die_with_parent():
    """In the child: the kernel SIGKILLs it if its parent dies without cleaning up."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# PR_SET_PDEATHSIG fires when the *thread* that forked the child ends, not the process: so
# every child is forked by this one thread, which lives as long as the process does, and a
# child started from a short-lived thread (a demo's re-protection) does not die with it
_FORKER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="colo-forker")


class Process:
    """One ``python -m emu colo ...`` process (``command``: what follows ``emu``), stderr to
    ``NAME.log`` (which we can wait on).

    Its own session, so a Ctrl-C at the terminal reaches the parent only, which stops
    the processes itself, in order."""

    def __init__(self, log_dir, name, args, command=("colo",)):
        self.name = name
        self.log = log_dir / f"{name}.log"
        with open(self.log, "wb") as err:
            self.proc = _FORKER.submit(subprocess.Popen, [sys.executable, "-m", "emu", *command, *args], cwd=ROOT,
                                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                       start_new_session=True, preexec_fn=_die_with_parent).result()
        self.pid = self.proc.pid

    def text(self):
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines=15):
        return "\n".join(f"    {line}" for line in self.text().splitlines()[-lines:])

    def alive(self):
        return self.proc.poll() is None

    def wait_for(self, pattern, timeout=START_TIMEOUT_S):
        """The first match of ``pattern`` in the log; ProcessFailure if the process dies first."""
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.text())
            if m:
                return m
            if not self.alive():
                raise ProcessFailure(f"{self.name} exited with status {self.proc.returncode} while starting "
                                  f"({self.log}):\n{self.tail()}")
            if time.monotonic() > deadline:
                raise ProcessFailure(f"{self.name} did not start within {timeout:.0f} s ({self.log}):\n{self.tail()}")
            time.sleep(0.02)

    def kill(self, wait=True):
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
        if wait:
            self.proc.wait()


def stop_all(processes, grace=5.0, who="emu colo"):
    """SIGTERM to all (each flushes its records and closes its sockets), SIGKILL to stragglers."""
    for p in processes:
        if p.alive():
            try:
                p.proc.send_signal(signal.SIGTERM)
            except OSError:
                pass
    deadline = time.monotonic() + grace
    for p in processes:
        try:
            p.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"{who}: {p.name} (pid {p.pid}) did not stop within {grace:.0f} s of SIGTERM: SIGKILL",
                  file=sys.stderr, flush=True)
            p.kill()



# ---------------------------------------------------------------------- monitors
class QmpClient:
    """Just enough QMP for figures: JSON lines over a unix socket, events skipped."""

    def __init__(self, path, timeout=2.0):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.buf = bytearray()
        try:
            self.sock.connect(self.path)
            greeting = self._read()
            if "QMP" not in greeting:
                raise EmuError(f"QMP {self.path}: no greeting, got {greeting!r}")
            self.execute("qmp_capabilities")
        except BaseException:
            self.sock.close()
            raise

    def _read(self):
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EmuError(f"QMP {self.path}: connection closed")
            self.buf += chunk
        line, _, rest = bytes(self.buf).partition(b"\n")
        self.buf = bytearray(rest)
        try:
            return json.loads(line)
        except ValueError:
            raise EmuError(f"QMP {self.path}: not JSON: {line[:200]!r}") from None

    def execute(self, command, arguments=None):
        message = {"execute": command} | ({"arguments": arguments} if arguments else {})
        self.sock.sendall(json.dumps(message).encode() + b"\r\n")
        while True:
            reply = self._read()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise EmuError(f"QMP {command}: {reply['error'].get('desc', reply['error'])}")
            # an event ({"event": ...}): not ours to handle

    def close(self):
        self.sock.close()


def connect_qmp(path, process, timeout=START_TIMEOUT_S):
    """A QMP connection once the VM's monitor socket is there."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return QmpClient(path)
        except (OSError, EmuError) as e:
            if not process.alive():
                raise ProcessFailure(f"{process.name} exited with status {process.proc.returncode} "
                                  f"({process.log}):\n{process.tail()}") from None
            if time.monotonic() > deadline:
                raise ProcessFailure(f"{process.name}: no QMP monitor at {path} within {timeout:.0f} s: {e}") from None
            time.sleep(0.05)


def protect_over_qmp(qmp, uri, checkpoint_delay_ms):
    """What a QEMU user gives a VM to make it the primary of a pair with the secondary
    listening at ``uri``: x-colo and return-path, the checkpoint delay, migrate."""
    qmp.execute("migrate-set-capabilities", {"capabilities": [{"capability": "x-colo", "state": True},
                                                            {"capability": "return-path", "state": True}]})
    qmp.execute("migrate-set-parameters", {"x-checkpoint-delay": checkpoint_delay_ms})
    qmp.execute("migrate", {"uri": uri})

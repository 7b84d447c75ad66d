"""``emu colo pair``: a pair kept protected on its own.  The primary is killed, then the
new primary, then a secondary: after each failure the supervisor starts a new secondary
and the survivor migrates into it, and the client sees every answer once throughout.  The
first re-protection goes to a --standby that fails the migration: the supervisor says so,
backs off, and starts a local secondary instead."""

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

from colopair import ROOT, LineClient, Proc, Workload
from conftest import firmware


class _RefusingStandby:
    """A "secondary" at an address that accepts the migration and closes it at once."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            conn.close()

    def close(self):
        self.listener.close()


def _pid(pair, node):
    return int(pair.wait_for(rf"started \w+ {node} \(pid (\d+)\)").group(1))


def test_the_supervisor_reprotects_after_every_failure(tmp_path):
    standby = _RefusingStandby()
    proxy = Proc(tmp_path, "proxy", ["colo", "proxy", "--client", "tcp:127.0.0.1:0", "--listen", "tcp:127.0.0.1:0"])
    pair = None
    try:
        m = proxy.wait_for(r"client on [\d.]+:(\d+), VMs on [\d.]+:(\d+)")
        client_port, vm_port = int(m.group(1)), int(m.group(2))
        pair = Proc(tmp_path, "pair", [
            "colo", "pair", "-kernel", str(firmware("service.elf")), "-m", "32M", "-no-reboot",
            "--proxy", f"tcp:127.0.0.1:{vm_port}", "--heartbeat-period", "50", "--heartbeat-timeout", "1000",
            "--no-status", "--checkpoint-delay", "40", "--dir", str(tmp_path / "vms"),
            "--standby", f"tcp:127.0.0.1:{standby.port}"])
        pair.wait_for(r"protected: primary vm-2 -> secondary vm-1", timeout=60)
        w = Workload(LineClient(client_port), time_every=5)
        w.ready()

        def serve(n):
            for _ in range(n):
                w.step()

        serve(20)
        _kill(_pid(pair, "vm-2"))   # the primary: vm-1 takes over, the standby fails, vm-4 is started
        serve(20)
        pair.wait_for(r"re-protection failed", timeout=60)
        pair.wait_for(r"protected: primary vm-1 -> secondary vm-4 \(re-protected", timeout=90)
        serve(20)
        _kill(_pid(pair, "vm-1"))   # the new primary: vm-4 takes over, vm-5 is started
        serve(20)
        pair.wait_for(r"protected: primary vm-4 -> secondary vm-5 \(re-protected", timeout=90)
        serve(20)
        _kill(_pid(pair, "vm-5"))   # a secondary: vm-4 serves on, vm-6 is started
        serve(20)
        pair.wait_for(r"protected: primary vm-4 -> secondary vm-6 \(re-protected", timeout=90)
        serve(20)
        w.finish()
        log = pair.stderr()
        assert re.search(r"waiting \d+ s before the next secondary", log), log
        assert "vm-2 is gone" in log and "vm-1 is gone" in log and "vm-5 is gone" in log
        pair.kill(signal.SIGTERM)
        assert pair.proc.wait(30) == 0
        assert "stopping every VM" in pair.stderr()
    except BaseException:
        print(proxy.stderr())
        if pair is not None:
            print(pair.stderr())
            for log in sorted((tmp_path / "vms").glob("*.log")):
                print(f"--- {log.name} ---\n{log.read_text()[-2000:]}")
        raise
    finally:
        standby.close()
        if pair is not None:
            pair.kill()
        proxy.kill()


def _kill(pid):
    """SIGKILL: a VM dies as a crashed host does."""
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.05)


def test_a_bad_max_backoff_is_refused_before_anything_starts(tmp_path):
    r = subprocess.run([sys.executable, "-m", "emu", "colo", "pair", "-kernel", firmware("service.elf"),
                        "--proxy", "tcp:127.0.0.1:1", "--max-backoff", "-1", "--dir", str(tmp_path / "vms")],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "--max-backoff must be a number of seconds >= 0, not -1" in r.stderr
    assert not (tmp_path / "vms").exists() or not any((tmp_path / "vms").iterdir())  # no VM was started

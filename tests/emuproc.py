"""Emulator processes driven over QMP with QEMU's own client library (qemu.qmp)."""

import asyncio
import os
import pathlib
import socket
import subprocess
import sys
import time

from conftest import ROOT
from qemu.qmp import QMPClient


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Qmp:
    """A synchronous wrapper around qemu.qmp's asyncio client."""

    def __init__(self, path, timeout=20):
        self.loop = asyncio.new_event_loop()
        self.client = QMPClient("emu-colo-test")
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.loop.run_until_complete(self.client.connect(str(path)))
                break
            except Exception:  # the process is still starting
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
                self.client = QMPClient("emu-colo-test")

    def __call__(self, command, **arguments):
        return self.loop.run_until_complete(self.client.execute(command, arguments or None))

    def close(self):
        try:
            self.loop.run_until_complete(self.client.disconnect())
        finally:
            self.loop.close()


class EmuProcess:
    """``python -m emu run ARGS -qmp unix:...``; output captured to a file."""

    def __init__(self, tmp_path, name, *args):
        self.qmp_path = pathlib.Path(tmp_path) / f"{name}.qmp"
        self.out_path = pathlib.Path(tmp_path) / f"{name}.out"
        self.err_path = pathlib.Path(tmp_path) / f"{name}.err"
        cmd = [sys.executable, "-m", "emu", "run", *args, "-qmp", f"unix:{self.qmp_path},server,nowait"]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=open(self.out_path, "wb"),
                                     stderr=open(self.err_path, "wb"))
        self._qmp = None

    @property
    def qmp(self):
        if self._qmp is None:
            self._qmp = Qmp(self.qmp_path)  # qemu.qmp negotiates capabilities itself
        return self._qmp

    def output(self):
        return self.out_path.read_bytes()

    def stderr(self):
        return self.err_path.read_text(errors="replace")

    def wait_output(self, marker, timeout=30):
        deadline = time.monotonic() + timeout
        while marker not in self.output():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no {marker!r} in output {self.output()[-200:]!r}; stderr {self.stderr()}")
            time.sleep(0.02)

    def wait(self, timeout=60):
        return self.proc.wait(timeout=timeout)

    def close(self):
        if self._qmp is not None:
            try:
                self._qmp.close()
            except Exception:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def wait_for(predicate, timeout=30, interval=0.05, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def remove(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

"""Debian's Linux on ``emu run`` as a real process, driven through its serial console, and
the network namespaces the networking tests run it in."""

import os
import select
import shutil
import subprocess
import sys
import time
import uuid

import pytest
from conftest import ROOT

APPEND = "console=ttyS0 noapic nolapic nosmp panic=-1 quiet"
SHELL = "built-in shell (ash)"


class LinuxGuest:
    """``emu run`` of the Linux guest with ``args`` (in network namespace ``netns``)."""

    def __init__(self, kernel, initrd, *args, append=APPEND, netns=None, memory="256M", program=None):
        cmd = program or [sys.executable, "-m", "emu", "run"]
        cmd = cmd + ["-m", memory, "-kernel", kernel, "-initrd", initrd, "-append", append, "-serial", "stdio",
                     "-no-reboot", *args]
        if netns is not None:
            cmd = ["ip", "netns", "exec", netns] + cmd
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self.text = b""

    def expect(self, marker, timeout=60, start=0):
        deadline = time.monotonic() + timeout
        while marker.encode() not in self.text[start:]:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise AssertionError(f"no {marker!r} within {timeout}s; the console ends with "
                                     f"{self.text[-2500:].decode('latin1')}")
            ready, _, _ = select.select([self.proc.stdout], [], [], min(left, 0.5))
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if chunk:
                    self.text += chunk
        return self.text

    def boot(self, timeout=240):
        self.expect(SHELL, timeout)
        self._prompt(0)

    def _prompt(self, start):
        """The shell's prompt after ``start`` (typing before it may be taken as the answer to
        the line editor's cursor-position query)."""
        self.expect("# ", 60, start)

    def run(self, command, timeout=120):
        """Run ``command`` in the shell; returns what it printed (up to the next prompt)."""
        marker = f"END-{uuid.uuid4().hex[:8]}"
        start = len(self.text)
        self.proc.stdin.write(f"{command}; echo {marker}-$((1+1))\n".encode())
        self.proc.stdin.flush()
        self.expect(f"{marker}-2", timeout, start)
        end = self.text.index(f"{marker}-2".encode(), start)
        self._prompt(end)
        out = self.text[start:end].decode("latin1")
        echoed = f"{marker}-$((1+1))"  # the end of the line as the terminal echoed it (maybe wrapped)
        return out[out.index(echoed) + len(echoed):].lstrip("\r\n") if echoed in out else out

    def type(self, line):
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def poweroff(self, timeout=60):
        """``reboot -f`` under -no-reboot ends the run (there is no ACPI power-off)."""
        self.type("sync; reboot -f")
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        return self.proc.returncode

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _have(tool):
    return shutil.which(tool) is not None


def network_namespaces_available():
    """None when the tests can make netns and tap devices, else why not."""
    if os.geteuid() != 0:
        return "creating network namespaces and tap devices needs root"
    if not _have("ip"):
        return "iproute2's ip is not installed"
    if not os.path.exists("/dev/net/tun"):
        return "the kernel has no /dev/net/tun"
    name = f"emu-probe-{os.getpid()}"
    result = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if result.returncode:
        return f"ip netns add failed: {result.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


class TapNetwork:
    """A network namespace with a bridge at ``host_ip`` and tap interfaces on it: the host
    side of the guests' NICs.  Everything is made here and removed by ``close()``."""

    def __init__(self, taps=("tap0",), host_ip="10.0.2.2/24"):
        self.ns = f"emu-{uuid.uuid4().hex[:8]}"
        self.taps = list(taps)
        self.host_ip = host_ip.split("/")[0]
        self._ip("netns", "add", self.ns)
        self.exec("ip", "link", "set", "lo", "up")
        self.exec("ip", "link", "add", "br0", "type", "bridge")
        self.exec("ip", "addr", "add", host_ip, "dev", "br0")
        self.exec("ip", "link", "set", "br0", "up")
        for tap in self.taps:
            self.exec("ip", "tuntap", "add", tap, "mode", "tap")
            self.exec("ip", "link", "set", tap, "master", "br0")
            self.exec("ip", "link", "set", tap, "up")

    def _ip(self, *args):
        subprocess.run(["ip", *args], check=True, capture_output=True)

    def exec(self, *cmd, check=True, **kw):
        return subprocess.run(["ip", "netns", "exec", self.ns, *cmd], check=check, capture_output=True, **kw)

    def close(self):
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)


@pytest.fixture
def tap_network():
    reason = network_namespaces_available()
    if reason:
        pytest.skip(reason)
    network = TapNetwork(taps=("tap0", "tap1"))
    yield network
    network.close()

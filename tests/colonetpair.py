"""A networked COLO pair of Linux guests in real processes, inside a network namespace.

The endpoint (``emu colo proxy --netdev tap,ifname=tap0``) owns the tap on the
namespace's bridge; the secondary (``emu colo secondary``) and the primary (``emu run``
with ``-netdev colo``, protected over QMP as with QEMU) reach it on the namespace's
loopback.  Clients are real programs run in the namespace (``curl``, ``netclient.py``).
The primary's console is a unix socket the test types into before the pair forms.
"""

import pathlib
import re
import shutil
import socket
import subprocess
import sys
import time

from colopair import Proc
from emuproc import Qmp
from linuxguest import APPEND, SHELL, TapNetwork

GUEST_IP = "10.0.2.15"
NETCLIENT = pathlib.Path(__file__).with_name("netclient.py")


class NsProc(Proc):
    """A ``python -m emu`` process in network namespace ``ns``."""

    def __init__(self, tmp_path, name, args, ns):
        super().__init__(tmp_path, name, args, prefix=["ip", "netns", "exec", ns])


class UnixConsole:
    """The primary's serial console (``-serial unix:PATH,server,nowait``)."""

    def __init__(self, path, timeout=30):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.sock.settimeout(0.2)
        self.received = bytearray()

    def expect(self, marker, timeout=120, start=0):
        deadline = time.monotonic() + timeout
        while marker.encode() not in self.received[start:]:
            if time.monotonic() > deadline:
                raise AssertionError(f"console: no {marker!r}; it ends with {bytes(self.received[-1500:])!r}")
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not chunk:
                raise AssertionError(f"console closed; it ends with {bytes(self.received[-1500:])!r}")
            self.received += chunk
        return bytes(self.received)

    def run(self, command, timeout=120):
        """Type ``command`` at the prompt; wait for it to finish.  Returns its output."""
        start = len(self.received)
        self.sock.sendall(f"{command}; echo DONE-$((40+2))\n".encode())
        self.expect("DONE-42", timeout, start)
        end = self.received.index(b"DONE-42", start)
        self.expect("# ", 60, end)
        return bytes(self.received[start:end]).decode("latin1")

    def close(self):
        self.sock.close()


class NetPair:
    """Endpoint, secondary and primary of ``kernel``/``initrd`` with 256 MiB, in a fresh namespace."""

    def __init__(self, tmp_path, debian_linux, mode="compare", checkpoint_delay=200, heartbeat=(100, 2000),
                 proxy_args=(), guest_args=(), secondary_args=(), primary_colo_args=None, disk_mb=None):
        kernel, initrd = debian_linux
        self.tmp = pathlib.Path(tmp_path)
        self.images = {}
        if disk_mb:  # the primary's ext4 image; the secondary's blank: the pair copies what differs
            self.images = {role: self.tmp / f"{role}.img" for role in ("primary", "secondary")}
            subprocess.run(["mkfs.ext4", "-F", "-q", str(self.images["primary"]), f"{disk_mb}M"], check=True,
                           capture_output=True)
            with open(self.images["secondary"], "wb") as f:
                f.truncate(disk_mb << 20)
        self.net = TapNetwork(taps=("tap0",))
        self.procs, self._qmp = [], {}
        self.checkpoint_delay = checkpoint_delay
        try:
            self.proxy = self._start("proxy", ["colo", "proxy", "--netdev", "tap,ifname=tap0", "--listen",
                                               "tcp:127.0.0.1:0", "--status-file", str(self.tmp / "proxy.json"),
                                               *proxy_args])
            vm_port = int(self.proxy.wait_for(r"VMs on [\d.]+:(\d+)").group(1))
            machine = ["-m", "256M", "-kernel", kernel, "-initrd", initrd, "-no-reboot",
                       "-append", f"{APPEND} emu.ip={GUEST_IP}/24,10.0.2.2", *guest_args]
            self.qmp_paths = {role: self.tmp / f"{role}.qmp" for role in ("primary", "secondary")}
            self.console_path = self.tmp / "primary.console"
            drive = {role: ["-drive", f"file={image},format=raw,if=virtio"] for role, image in self.images.items()}
            sec = ["colo", "secondary", *machine, *drive.get("secondary", ()), "-netdev", "tap,id=n0,ifname=unused",
                   "-device", "virtio-net-pci,netdev=n0", "--net-proxy", f"tcp:127.0.0.1:{vm_port}",
                   "--listen", "tcp:127.0.0.1:0", "--no-status", "--heartbeat-period", str(heartbeat[0]),
                   "--heartbeat-timeout", str(heartbeat[1]), "-serial", f"file:{self.tmp / 'secondary.console'}",
                   "-qmp", f"unix:{self.qmp_paths['secondary']},server,nowait", *secondary_args]
            if mode == "passive":
                sec.append("--passive")
            self.secondary = self._start("secondary", sec)
            port = int(self.secondary.wait_for(r"waiting for the primary on tcp:[\d.]+:(\d+)").group(1))
            self.secondary_uri = f"tcp:127.0.0.1:{port}"
            console_qmp = ["-serial", f"unix:{self.console_path},server,nowait",
                           "-qmp", f"unix:{self.qmp_paths['primary']},server,nowait"]
            if primary_colo_args is None:  # a plain emu run, as a QEMU user starts a primary
                self.primary = self._start("primary", [
                    "run", *machine, *drive.get("primary", ()),
                    "-netdev", f"colo,id=n0,proxy=127.0.0.1:{vm_port},role=primary,node=primary",
                    "-device", "virtio-net-pci,netdev=n0", *console_qmp])
            else:  # emu colo primary (its fault injection, ...), still protected over QMP
                self.primary = self._start("primary", [
                    "colo", "primary", *machine, *drive.get("primary", ()), "-netdev", "tap,id=n0,ifname=unused",
                    "-device", "virtio-net-pci,netdev=n0", "--net-proxy", f"tcp:127.0.0.1:{vm_port}", "--secondary",
                    self.secondary_uri, "--protect-after", "1e9", "--no-status", "--heartbeat-period",
                    str(heartbeat[0]), "--heartbeat-timeout", str(heartbeat[1]), *console_qmp, *primary_colo_args])
            self.console = UnixConsole(self.console_path)
        except BaseException:
            self.close()
            raise

    def _start(self, name, args):
        proc = NsProc(self.tmp, name, args, self.net.ns)
        self.procs.append(proc)
        return proc

    def boot(self, setup):
        """Wait for the primary's shell and run ``setup`` in it (before the pair forms)."""
        self.console.expect(SHELL, 240)
        self.console.expect("# ", 60)
        time.sleep(0.5)  # the line editor's cursor query is answered; typed input is a command now
        return self.console.run(setup)

    def qmp(self, role):
        if role not in self._qmp:
            self._qmp[role] = Qmp(self.qmp_paths[role])
        return self._qmp[role]

    def protect(self, timeout=120):
        """x-colo + migrate on the primary's QMP, then wait until both sides report COLO."""
        q = self.qmp("primary")
        q("migrate-set-capabilities", capabilities=[{"capability": "x-colo", "state": True},
                                                    {"capability": "return-path", "state": True}])
        q("migrate-set-parameters", **{"x-checkpoint-delay": self.checkpoint_delay})
        q("migrate", uri=self.secondary_uri)
        deadline = time.monotonic() + timeout
        for role in ("primary", "secondary"):
            while self.qmp(role)("query-colo-status")["mode"] != role:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{role} never entered COLO:\n{self.logs()}")
                time.sleep(0.05)

    def client(self, *args):
        """``netclient.py ARGS`` in the namespace, started now (its JSON report on stdout)."""
        return subprocess.Popen(["ip", "netns", "exec", self.net.ns, sys.executable, str(NETCLIENT), *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def curl(self, *args):
        return subprocess.Popen(["ip", "netns", "exec", self.net.ns, "curl", "-sS", *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def disk_file(self, role, path):
        """File ``path`` of ``role``'s ext4 image, read on the host once the VMs are gone: on a
        copy whose journal e2fsck has replayed, as a mount after a crash would see it."""
        copy = self.tmp / f"{role}-checked.img"
        shutil.copyfile(self.images[role], copy)
        fsck = subprocess.run(["e2fsck", "-f", "-y", str(copy)], capture_output=True, text=True)
        if fsck.returncode not in (0, 1):  # 1: errors corrected (the journal replayed)
            raise AssertionError(f"e2fsck of the {role}'s image ({fsck.returncode}): {fsck.stdout[-800:]}")
        return subprocess.run(["debugfs", "-R", f"cat {path}", str(copy)], check=True, capture_output=True).stdout

    def took_over(self):
        return re.search(r"serving alone from checkpoint (\d+)", self.secondary.stderr())

    def close(self):
        for qmp in self._qmp.values():
            try:
                qmp.close()
            except Exception:
                pass
        self._qmp.clear()
        if hasattr(self, "console"):
            self.console.close()
        for proc in self.procs:
            proc.kill()
        self.net.close()

    def logs(self):
        return "\n".join(f"--- {p.name} ---\n{p.stderr()[-4000:]}" for p in self.procs)

"""A networked COLO pair of Linux guests in real processes, inside a network namespace.

The endpoint (``emu colo proxy --netdev tap,ifname=tap0``) owns the tap on the
namespace's bridge; the secondary (``emu colo secondary``) and the primary (``emu run``
with ``-netdev colo``, protected over QMP as with QEMU) reach it on the namespace's
loopback.  Clients are real programs run in the namespace (``curl``, ``netclient.py``).
The primary's console is a unix socket the test types into before the pair forms.
"""

import ctypes
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

from colopair import Proc
from emuproc import Qmp
from linuxguest import APPEND, TapNetwork

from colo.netdemo import Console

GUEST_IP = "10.0.2.15"
NETCLIENT = pathlib.Path(__file__).with_name("netclient.py")
LINKSHAPER = pathlib.Path(__file__).with_name("linkshaper.py")


class SplitNetwork:
    """Endpoint, primary and secondary each in a namespace of their own, joined by veth.

    The endpoint's namespace (``ns``, the clients' too) is a :class:`TapNetwork`: bridge
    br0 at 10.0.2.2/24 with tap0.  Its veth links reach the primary (10.9.1.1 - 10.9.1.2)
    and the secondary (10.9.2.1 - 10.9.2.2); the replication link joins the primary
    (10.9.3.1) and the secondary (10.9.3.2) directly, its ends named ``repl`` (MTU 9000,
    jumbo frames as on a storage or replication network), where :meth:`shape` delays and
    drops packets and :meth:`cut` drops them all.

    That link is a veth shaped by netem where the kernel has ``sch_netem``; where it lacks
    it (``tc`` then says "Specified qdisc kind is unknown"), a TUN device at each end
    with ``linkshaper.py`` between them, which delays and drops as netem does."""

    PROXY = {"primary": "10.9.1.1", "secondary": "10.9.2.1"}
    REPLICATION = {"primary": "10.9.3.1", "secondary": "10.9.3.2"}

    def __init__(self):
        self.endpoint = TapNetwork(taps=("tap0",))
        self.ns = self.endpoint.ns
        self.vm_ns = {}
        try:
            for role in ("primary", "secondary"):
                self.vm_ns[role] = f"{self.ns}-{role[0]}"
                subprocess.run(["ip", "netns", "add", self.vm_ns[role]], check=True, capture_output=True)
                self._ip(role, "link", "set", "lo", "up")
            self._veth(self.ns, "to-primary", "10.9.1.1/24", "primary", "to-endpoint", "10.9.1.2/24")
            self._veth(self.ns, "to-secondary", "10.9.2.1/24", "secondary", "to-endpoint", "10.9.2.2/24")
            self.shaper = None
            self._replication_link()
        except BaseException:
            self.close()
            raise

    def _replication_link(self):
        p, s = self.vm_ns["primary"], self.vm_ns["secondary"]
        self._veth(p, "repl", "10.9.3.1/24", "secondary", "repl", "10.9.3.2/24")
        if self._netem("primary", "delay", "0ms").returncode == 0:
            return
        subprocess.run(["ip", "-n", p, "link", "del", "repl"], check=True, capture_output=True)
        self.shaper = subprocess.Popen([sys.executable, str(LINKSHAPER), p, s, "repl"], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True)
        if self.shaper.stdout.readline().strip() != "ready":
            raise AssertionError(f"linkshaper did not start ({self.shaper.poll()})")
        for role, addr in (("primary", "10.9.3.1/24"), ("secondary", "10.9.3.2/24")):
            self._ip(role, "addr", "add", addr, "dev", "repl")
            self._ip(role, "link", "set", "repl", "mtu", "9000", "up")

    def _netem(self, role, *netem):
        return subprocess.run(["ip", "netns", "exec", self.vm_ns[role], "tc", "qdisc", "replace", "dev", "repl",
                               "root", "netem", *netem], capture_output=True, text=True)

    def _ip(self, role, *args):
        subprocess.run(["ip", "-n", self.vm_ns[role], *args], check=True, capture_output=True)

    def _veth(self, ns, name, address, peer_role, peer_name, peer_address):
        peer_ns = self.vm_ns[peer_role]
        subprocess.run(["ip", "-n", ns, "link", "add", name, "type", "veth", "peer", "name", peer_name,
                        "netns", peer_ns], check=True, capture_output=True)
        for where, dev, addr in ((ns, name, address), (peer_ns, peer_name, peer_address)):
            subprocess.run(["ip", "-n", where, "addr", "add", addr, "dev", dev], check=True, capture_output=True)
            subprocess.run(["ip", "-n", where, "link", "set", dev, "up"], check=True, capture_output=True)

    def shape(self, delay_ms, loss_percent):
        """Each packet on the replication link waits ``delay_ms`` and ``loss_percent`` of
        them are lost, each way (a round trip: twice the delay)."""
        if self.shaper is not None:
            self._tell_shaper(f"shape {delay_ms} {loss_percent}")
            return
        for role in ("primary", "secondary"):
            done = self._netem(role, "delay", f"{delay_ms}ms", "loss", f"{loss_percent}%")
            if done.returncode:
                raise AssertionError(f"tc netem in the {role}'s namespace: {done.stderr.strip()}")

    def cut(self):
        """The replication link drops everything, both ways, as a pulled cable: no reset, no error."""
        if self.shaper is not None:
            self._tell_shaper("cut")
        else:
            self.shape(0, 100)

    def _tell_shaper(self, command):
        self.shaper.stdin.write(command + "\n")
        self.shaper.stdin.flush()

    def add_etcd_namespace(self):
        """A fourth namespace for etcd, with a veth to each VM: the primary reaches it at
        10.9.4.2, the secondary at 10.9.5.2.  :meth:`cut_etcd` takes one VM's link down."""
        self.etcd_ns = f"{self.ns}-e"
        subprocess.run(["ip", "netns", "add", self.etcd_ns], check=True, capture_output=True)
        self.vm_ns["etcd"] = self.etcd_ns
        self._ip("etcd", "link", "set", "lo", "up")
        self._veth(self.vm_ns["primary"], "to-etcd", "10.9.4.1/24", "etcd", "to-primary", "10.9.4.2/24")
        self._veth(self.vm_ns["secondary"], "to-etcd", "10.9.5.1/24", "etcd", "to-secondary", "10.9.5.2/24")
        return ("10.9.4.2", "10.9.5.2")

    def cut_etcd(self, role):
        """``role``'s link to etcd goes down: its requests fail, etcd goes on for the other."""
        self._ip(role, "link", "set", "to-etcd", "down")

    def close(self):
        if getattr(self, "shaper", None) is not None:
            self.shaper.stdin.close()
            self.shaper.wait(10)
        for ns in self.vm_ns.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.endpoint.close()


def connect_in(namespace, port, host="127.0.0.1"):
    """A TCP connection made from inside ``namespace`` (a thread of ours enters it: a
    network namespace is per thread, and the socket keeps the one it was made in)."""
    made = {}

    def work():
        fd = os.open(f"/var/run/netns/{namespace}", os.O_RDONLY)
        try:
            if ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
                raise OSError(ctypes.get_errno(), "setns")
            made["sock"] = socket.create_connection((host, port), timeout=2)
        except OSError as e:
            made["error"] = e
        finally:
            os.close(fd)
    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    if "error" in made:
        raise made["error"]
    return made["sock"]


class NsProc(Proc):
    """A ``python -m emu`` process in network namespace ``ns``."""

    def __init__(self, tmp_path, name, args, ns):
        super().__init__(tmp_path, name, args, prefix=["ip", "netns", "exec", ns])


class NetPair:
    """Endpoint, secondary and primary of ``kernel``/``initrd`` with 256 MiB, in a fresh namespace."""

    def __init__(self, tmp_path, debian_linux, mode="compare", checkpoint_delay=200, heartbeat=(100, 2000),
                 proxy_args=(), guest_args=(), secondary_args=(), primary_colo_args=None, disk_mb=None,
                 split=False):
        """``split``: each process in a namespace of its own (:class:`SplitNetwork`), the
        replication link between the VMs a veth of its own; else all on one loopback."""
        kernel, initrd = debian_linux
        self.tmp = pathlib.Path(tmp_path)
        self.images = {}
        if disk_mb:  # the primary's ext4 image; the secondary's blank: the pair copies what differs
            self.images = {role: self.tmp / f"{role}.img" for role in ("primary", "secondary")}
            subprocess.run(["mkfs.ext4", "-F", "-q", str(self.images["primary"]), f"{disk_mb}M"], check=True,
                           capture_output=True)
            with open(self.images["secondary"], "wb") as f:
                f.truncate(disk_mb << 20)
        self.net = SplitNetwork() if split else TapNetwork(taps=("tap0",))
        self.procs, self._qmp = [], {}
        self.generation = 0
        proxy_at = SplitNetwork.PROXY if split else dict.fromkeys(("primary", "secondary"), "127.0.0.1")
        listen_at = self._listen_at = SplitNetwork.REPLICATION["secondary"] if split else "127.0.0.1"
        self.checkpoint_delay = checkpoint_delay
        try:
            listen = "tcp:0.0.0.0:0" if split else "tcp:127.0.0.1:0"
            self.proxy = self._start("proxy", ["colo", "proxy", "--netdev", "tap,ifname=tap0", "--listen", listen,
                                               "--status-file", str(self.tmp / "proxy.json"),
                                               *proxy_args])
            vm_port = int(self.proxy.wait_for(r"VMs on [\d.]+:(\d+)").group(1))
            machine = ["-m", "256M", "-kernel", kernel, "-initrd", initrd, "-no-reboot",
                       "-append", f"{APPEND} emu.ip={GUEST_IP}/24,10.0.2.2", *guest_args]
            self.qmp_paths = {role: self.tmp / f"{role}.qmp" for role in ("primary", "secondary")}
            self.console_path = self.tmp / "primary.console"
            drive = {role: ["-drive", f"file={image},format=raw,if=virtio"] for role, image in self.images.items()}
            self._secondary_base = [
                "colo", "secondary", *machine, "-netdev", "tap,id=n0,ifname=unused",
                "-device", "virtio-net-pci,netdev=n0", "--net-proxy", f"tcp:{proxy_at['secondary']}:{vm_port}",
                "--listen", f"tcp:{listen_at}:0", "--no-status", "--heartbeat-period", str(heartbeat[0]),
                "--heartbeat-timeout", str(heartbeat[1]), *(["--passive"] if mode == "passive" else []),
                *secondary_args]
            self._start_secondary("secondary")
            console_qmp = ["-serial", f"unix:{self.console_path},server,nowait",
                           "-qmp", f"unix:{self.qmp_paths['primary']},server,nowait"]
            if primary_colo_args is None:  # a plain emu run, as a QEMU user starts a primary
                self.primary = self._start("primary", [
                    "run", *machine, *drive.get("primary", ()),
                    "-netdev", f"colo,id=n0,proxy={proxy_at['primary']}:{vm_port},role=primary,node=primary",
                    "-device", "virtio-net-pci,netdev=n0", *console_qmp], "primary")
            else:  # emu colo primary (its fault injection, ...), still protected over QMP
                self.primary = self._start("primary", [
                    "colo", "primary", *machine, *drive.get("primary", ()), "-netdev", "tap,id=n0,ifname=unused",
                    "-device", "virtio-net-pci,netdev=n0", "--net-proxy", f"tcp:{proxy_at['primary']}:{vm_port}",
                    "--secondary", self.secondary_uri, "--protect-after", "1e9", "--no-status",
                    "--heartbeat-period", str(heartbeat[0]), "--heartbeat-timeout", str(heartbeat[1]),
                    *console_qmp, *primary_colo_args], "primary")
            self.console = Console(self.console_path, self.primary)
        except BaseException:
            self.close()
            raise

    def _start_secondary(self, name):
        """A secondary process ``name`` (its own console, QMP and disk image: blank, the
        primary copies what differs), waiting for its primary; it is ``self.secondary``."""
        if self.images and name not in self.images:
            self.images[name] = self.tmp / f"{name}.img"
            with open(self.images[name], "wb") as f:
                f.truncate(self.images["primary"].stat().st_size)
        self.qmp_paths[name] = self.tmp / f"{name}.qmp"
        drive = ["-drive", f"file={self.images[name]},format=raw,if=virtio"] if self.images else []
        self.secondary = self._start(name, [*self._secondary_base, *drive, "--node", name,
                                            "-serial", f"file:{self.tmp / (name + '.console')}",
                                            "-qmp", f"unix:{self.qmp_paths[name]},server,nowait"], "secondary")
        port = int(self.secondary.wait_for(r"waiting for the primary on tcp:[\d.]+:(\d+)").group(1))
        self.secondary_uri = f"tcp:{self._listen_at}:{port}"

    def reprotect(self, timeout=120):
        """After the secondary took over: a new secondary process, into which the survivor
        migrates with x-colo over its QMP, as with QEMU.  The survivor is then
        ``self.primary``, the new process ``self.secondary``."""
        assert not isinstance(self.net, SplitNetwork), "re-protection runs on one loopback"
        self.generation += 1
        survivor = self.secondary
        self._start_secondary(f"secondary{self.generation}")
        self._close_qmp()  # the roles' sockets change
        self.primary = survivor
        self.qmp_paths["primary"] = self.qmp_paths[survivor.name]
        self.qmp_paths["secondary"] = self.qmp_paths[self.secondary.name]
        self.protect(timeout)

    def _start(self, name, args, role=None):
        ns = self.net.vm_ns[role] if role and isinstance(self.net, SplitNetwork) else self.net.ns
        proc = NsProc(self.tmp, name, args, ns)
        self.procs.append(proc)
        return proc

    def boot(self, setup):
        """Wait for the primary's shell and run ``setup`` in it (before the pair forms)."""
        self.console.wait_for_shell(240)
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

    def _close_qmp(self):
        for qmp in self._qmp.values():
            try:
                qmp.close()
            except Exception:
                pass  # a dead VM's
        self._qmp.clear()

    def close(self):
        self._close_qmp()
        if hasattr(self, "console"):
            self.console.close()
        for proc in self.procs:
            proc.kill()
        self.net.close()

    def logs(self):
        """Every process's stderr, the secondary's console and the endpoint's last status."""
        text = "\n".join(f"--- {p.name} ---\n{p.stderr()[-4000:]}" for p in self.procs)
        for name in ("secondary.console", "proxy.json"):
            path = self.tmp / name
            if path.exists():
                text += f"\n--- {name} ---\n{path.read_text(errors='replace')[-3000:]}"
        return text

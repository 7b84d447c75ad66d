"""``emu colo demo --guest linux``: Debian's Linux serving HTTP and storing uploads on its
disk, on a networked pair, with the primary SIGKILLed in the middle of the traffic.

The demo makes a network namespace with a bridge (10.0.2.2/24) and the endpoint's tap, and
runs everything inside it: ``emu colo proxy --netdev tap``, ``emu colo secondary`` and a
primary started unprotected (``emu run`` with ``-netdev colo``).  Each VM has its own copy
of an ext4 disk image.  Through the primary's console the guest mounts the disk and starts
busybox httpd with a file to download and an upload CGI that stores each body on the disk,
fsyncs it and answers ``<number> <sha256> <uptime>``; then the pair forms over QMP, as a
QEMU user would form it.  The uptime differs between the two VMs, so every upload answer is
an output mismatch that the endpoint resolves with a checkpoint.

Two clients run in the demo's own threads: one downloads the file again and again and
checks every byte (SHA-256); the other uploads random bodies and checks that each answer
is the next number with the right digest.  After ``--kill-after`` seconds the primary is
SIGKILLed; the clients go on against the former secondary.  At the end the survivor lists
what its disk holds, which must be exactly the uploads the client was told were stored.
"""

import ctypes
import hashlib
import http.client
import os
import pathlib
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid

from emu.errors import ConfigError

from .demo import ROLES, DemoFailure, Figures, LiveView, _ms, _Parser, _triggers, _who_serves
from .processes import Process, connect_qmp, protect_over_qmp, stop_all

GUEST_IP, HOST_IP = "10.0.2.15", "10.0.2.2"
MEMORY = "256M"
DISK_MB = 64
BLOB_MB = 8
UPLOAD_BYTES = 64 << 10
BOOT_TIMEOUT_S = 240
HTTP_TIMEOUT_S = 30
CLONE_NEWNET = 0x40000000
APPEND = "console=ttyS0 noapic nolapic nosmp panic=-1 quiet"
UPLOAD_CGI = ("n=$(( $(cat /mnt/up/.n) + 1 )); head -c $CONTENT_LENGTH > /mnt/up/$n && sync /mnt/up/$n && "
              "echo $n > /mnt/up/.n && sync /mnt/up/.n && "
              "printf 'Content-Type: text/plain\\r\\n\\r\\n%s %s %s\\n' $n "
              "$(sha256sum /mnt/up/$n | cut -d' ' -f1) $(cut -d' ' -f1 /proc/uptime) || "
              "printf 'Content-Type: text/plain\\r\\n\\r\\nnot stored\\n'")
# the listing reads the disk, not the page cache (which lives in RAM, replicated anyway)
LIST_CGI = ("sync; echo 3 > /proc/sys/vm/drop_caches; printf 'Content-Type: text/plain\\r\\n\\r\\n'; "
            "cd /mnt/up && sha256sum $(ls | sort -n)")


def _write_cgi(name, body):
    """Shell that writes /srv/cgi-bin/NAME (typed at the guest's prompt)."""
    quoted = body.replace("'", "'\\''")
    return f"printf '%s\\n' '#!/bin/sh' '{quoted}' > /srv/cgi-bin/{name} && chmod +x /srv/cgi-bin/{name}"


SETUP = " && ".join([
    "mount /dev/vda /mnt", "mkdir -p /mnt/up /srv/cgi-bin", "echo 0 > /mnt/up/.n",
    f"dd if=/dev/urandom of=/srv/blob bs=1M count={BLOB_MB} 2>/dev/null", "sha256sum /srv/blob",
    _write_cgi("up", UPLOAD_CGI), _write_cgi("list", LIST_CGI), "httpd -p 80 -h /srv"])


# ---------------------------------------------------------------------- the namespace
def namespaces_missing():
    """Why this host cannot make the demo's network namespace, or None."""
    if os.geteuid() != 0:
        return "the Linux demo makes a network namespace and a tap device: run it as root"
    if shutil.which("ip") is None:
        return "the Linux demo needs iproute2's ip"
    if not os.path.exists("/dev/net/tun"):
        return "the Linux demo needs /dev/net/tun"
    if shutil.which("mkfs.ext4") is None:
        return "the Linux demo needs e2fsprogs' mkfs.ext4 for its disk"
    return None


class Namespace:
    """A network namespace with bridge br0 at 10.0.2.2/24 and tap0 on it; ``enter()`` moves
    this process (and what it starts from then on) into it."""

    def __init__(self):
        self.name = f"emu-demo-{uuid.uuid4().hex[:6]}"
        self._ip("netns", "add", self.name)
        try:
            for args in (("link", "set", "lo", "up"), ("link", "add", "br0", "type", "bridge"),
                         ("addr", "add", f"{HOST_IP}/24", "dev", "br0"), ("link", "set", "br0", "up"),
                         ("tuntap", "add", "tap0", "mode", "tap"), ("link", "set", "tap0", "master", "br0"),
                         ("link", "set", "tap0", "up")):
                self._ip("-n", self.name, *args)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _ip(*args):
        result = subprocess.run(["ip", *args], capture_output=True, text=True)
        if result.returncode:
            raise ConfigError(f"colo demo: ip {' '.join(args)}: {result.stderr.strip()}")

    def enter(self):
        fd = os.open(f"/var/run/netns/{self.name}", os.O_RDONLY)
        try:
            if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
                raise ConfigError(f"colo demo: setns into {self.name}: {os.strerror(ctypes.get_errno())}")
        finally:
            os.close(fd)

    def close(self):
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


# ---------------------------------------------------------------------- the guest's console
class Console:
    """A VM's serial console on a unix socket (``-serial unix:PATH,server,nowait``): wait for
    the shell, type a command, wait for its end.  ``process``: the VM (``alive()``), whose
    death ends the wait for the socket."""

    def __init__(self, path, process=None):
        deadline = time.monotonic() + 30
        while True:
            self.sock = socket.socket(socket.AF_UNIX)
            try:
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if (process is not None and not process.alive()) or time.monotonic() > deadline:
                    tail = f":\n{process.tail()}" if hasattr(process, "tail") else ""
                    raise DemoFailure(f"{getattr(process, 'name', 'VM')}: no console at {path}{tail}") from None
                time.sleep(0.05)
        self.sock.settimeout(0.5)
        self.text = bytearray()

    def expect(self, marker, timeout, start=0):
        deadline = time.monotonic() + timeout
        while marker.encode() not in self.text[start:]:
            if time.monotonic() > deadline:
                raise DemoFailure(f"guest console: no {marker!r} within {timeout:.0f} s; it ends with "
                                  f"{bytes(self.text[-600:]).decode('latin1')!r}")
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not chunk:
                raise DemoFailure("guest console closed")
            self.text += chunk

    def wait_for_shell(self, timeout):
        """Until busybox's shell prompts, after a boot of up to ``timeout`` s."""
        self.expect("built-in shell (ash)", timeout)
        self.expect("# ", 60)
        time.sleep(0.5)  # the shell's line editor has had the answer to its cursor query

    def run(self, command, timeout=120):
        start = len(self.text)
        self.sock.sendall(f"{command}; echo END-$((40+2))\n".encode())
        self.expect("END-42", timeout, start)
        end = self.text.index(b"END-42", start)
        self.expect("# ", 30, end)
        return bytes(self.text[start:end]).decode("latin1")

    def close(self):
        self.sock.close()


# ---------------------------------------------------------------------- the clients
class Clients:
    """The downloader and the uploader, each a thread, every byte checked."""

    def __init__(self, blob_sha):
        self.blob_sha = blob_sha
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.downloads = self.downloaded_bytes = 0
        self.uploads = {}             # number -> sha256 of what the guest said it stored
        self.lost = self.duplicated = 0
        self.longest_stall = 0.0
        self.failure = None
        self.threads = [threading.Thread(target=self._guarded, args=(fn,), daemon=True, name=fn.__name__)
                        for fn in (self._download_loop, self._upload_loop)]

    def start(self):
        for thread in self.threads:
            thread.start()

    def finish(self):
        self.stop.set()
        for thread in self.threads:
            thread.join(HTTP_TIMEOUT_S + 5)

    def _guarded(self, loop):
        try:
            loop()
        except Exception as e:  # the first failure ends the run
            with self.lock:
                if self.failure is None:
                    self.failure = f"{loop.__name__.strip('_').replace('_', ' ')}: {type(e).__name__}: {e}"
            self.stop.set()

    def _stalled(self, seconds):
        with self.lock:
            self.longest_stall = max(self.longest_stall, seconds)

    def _download_loop(self):
        while not self.stop.is_set():
            conn = http.client.HTTPConnection(GUEST_IP, 80, timeout=HTTP_TIMEOUT_S)
            conn.request("GET", "/blob")
            response = conn.getresponse()
            digest, size, last = hashlib.sha256(), 0, time.monotonic()
            while chunk := response.read(65536):
                now = time.monotonic()
                self._stalled(now - last)
                last = now
                digest.update(chunk)
                size += len(chunk)
                with self.lock:
                    self.downloaded_bytes += len(chunk)
            conn.close()
            if size != BLOB_MB << 20 or digest.hexdigest() != self.blob_sha:
                raise DemoFailure(f"download {self.downloads + 1}: {size} bytes with SHA-256 {digest.hexdigest()}, "
                                  f"not the file's {BLOB_MB << 20} bytes {self.blob_sha}")
            with self.lock:
                self.downloads += 1

    def _upload_loop(self):
        rng = random.Random()
        while not self.stop.is_set():
            body = rng.randbytes(UPLOAD_BYTES)
            began = time.monotonic()
            conn = http.client.HTTPConnection(GUEST_IP, 80, timeout=HTTP_TIMEOUT_S)
            conn.request("POST", "/cgi-bin/up", body=body, headers={"Content-Type": "application/octet-stream"})
            answer = conn.getresponse().read().decode("latin1").split()
            conn.close()
            self._stalled(time.monotonic() - began)
            expected = len(self.uploads) + 1
            if len(answer) != 3 or not answer[0].isdigit():
                raise DemoFailure(f"upload {expected}: the answer is {' '.join(answer)!r}")
            number, digest = int(answer[0]), answer[1]
            with self.lock:
                if number in self.uploads:
                    self.duplicated += 1
                elif number > expected:
                    self.lost += number - expected
            if number != expected:
                raise DemoFailure(f"upload {expected}: the guest stored it as number {number}")
            if digest != hashlib.sha256(body).hexdigest():
                raise DemoFailure(f"upload {number}: the guest stored other bytes (SHA-256 {digest})")
            with self.lock:
                self.uploads[number] = digest

    def verify_disk(self):
        """What the survivor's disk holds: exactly the acknowledged uploads (a text, or DemoFailure)."""
        conn = http.client.HTTPConnection(GUEST_IP, 80, timeout=HTTP_TIMEOUT_S)
        conn.request("GET", "/cgi-bin/list")
        listing = conn.getresponse().read().decode("latin1")
        conn.close()
        stored = {}
        for line in listing.splitlines():
            digest, _, name = line.partition("  ")
            if name.isdigit():
                stored[int(name)] = digest
        if stored != self.uploads:
            missing = sorted(set(self.uploads) - set(stored))
            extra = sorted(set(stored) - set(self.uploads))
            wrong = sorted(n for n in set(stored) & set(self.uploads) if stored[n] != self.uploads[n])
            raise DemoFailure(f"the survivor's disk: missing uploads {missing[:10]}, unacknowledged {extra[:10]}, "
                              f"other bytes in {wrong[:10]}")
        mib = len(stored) * UPLOAD_BYTES / (1 << 20)
        return f"{len(stored)} uploads on the survivor's disk, each as acknowledged ({mib:.1f} MiB)"


# ---------------------------------------------------------------------- the run
class LinuxDemo(LiveView):
    def __init__(self, args, guest_files, workdir):
        self.args = args
        self.kernel, self.initrd = guest_files
        self.dir = workdir
        self.started = time.monotonic()
        self.processes, self.figures, self.clients, self.console = [], None, None, None
        self.killed_at = None
        self.killed_primary = None
        self.live = None
        self.print_lock = threading.Lock()

    def _spawn(self, name, args):
        self.processes.append(Process(self.dir, name, args, command=()))
        return self.processes[-1]

    def start(self):
        a = self.args
        images = {role: self.dir / f"{role}.img" for role in ROLES}
        subprocess.run(["mkfs.ext4", "-F", "-q", str(images["primary"]), f"{DISK_MB}M"], check=True,
                       capture_output=True)
        shutil.copyfile(images["primary"], images["secondary"])
        proxy = self._spawn("proxy", ["colo", "proxy", "--netdev", "tap,ifname=tap0", "--listen", "tcp:127.0.0.1:0"])
        self.vm_port = int(proxy.wait_for(r"VMs on [\d.]+:(\d+)").group(1))
        machine = ["-m", MEMORY, "-kernel", self.kernel, "-initrd", self.initrd, "-no-reboot",
                   "-append", f"{APPEND} emu.ip={GUEST_IP}/24,{HOST_IP}"]
        self.qmp_paths = {role: self.dir / f"{role}.qmp" for role in ROLES}
        passive = ["--passive"] if a.mode == "passive" else []
        secondary = self._spawn("secondary", [
            "colo", "secondary", *machine, "-drive", f"file={images['secondary']},format=raw,if=virtio",
            "--net-proxy", f"tcp:127.0.0.1:{self.vm_port}", "--listen", "tcp:127.0.0.1:0", "--no-status",
            "--node", "vm-b", "-serial", f"file:{self.dir / 'secondary.console'}", *passive,
            "--records", str(self.dir / "secondary.csv"), "-qmp", f"unix:{self.qmp_paths['secondary']},server,nowait"])
        self.secondary_uri = "tcp:127.0.0.1:" + secondary.wait_for(r"waiting for the primary on tcp:[\d.]+:(\d+)")[1]
        console_path = self.dir / "primary.console"
        primary = self._spawn("primary", [
            "run", *machine, "-drive", f"file={images['primary']},format=raw,if=virtio",
            "-netdev", f"colo,id=n0,proxy=127.0.0.1:{self.vm_port},role=primary,node=vm-a",
            "-device", "virtio-net-pci,netdev=n0", "-serial", f"unix:{console_path},server,nowait",
            "-qmp", f"unix:{self.qmp_paths['primary']},server,nowait"])
        self.procs = {p.name: p for p in self.processes}
        self.say(f"emu colo demo --guest linux: {a.mode} pair, checkpoint every {a.checkpoint_delay} ms; "
                 f"booting Debian's Linux on the primary (logs in {self.dir})")
        self.console = Console(console_path, primary)
        self.console.wait_for_shell(BOOT_TIMEOUT_S)
        out = self.console.run(SETUP)
        blob_sha = next((w for w in out.split() if len(w) == 64), None)
        if blob_sha is None:
            raise DemoFailure(f"the guest's set-up failed: {out[-600:]!r}")
        self.event(f"guest ready: httpd on {GUEST_IP}, disk /dev/vda on /mnt; forming the pair over QMP")
        self._protect()
        self.clients = Clients(blob_sha)

    def _protect(self):
        a = self.args
        qmp = {role: connect_qmp(self.qmp_paths[role], self.procs[role]) for role in ROLES}
        protect_over_qmp(qmp["primary"], self.secondary_uri, a.checkpoint_delay)
        deadline = time.monotonic() + 120
        for role in ROLES:
            while qmp[role].execute("query-colo-status")["mode"] != role:
                if time.monotonic() > deadline or not self.procs[role].alive():
                    raise DemoFailure(f"the {role} did not enter COLO:\n{self.procs[role].tail()}")
                time.sleep(0.05)
        self.figures = Figures(self.vm_port, qmp, self.event)
        self.event(f"pair in COLO: primary vm-a (pid {self.procs['primary'].pid}) -> secondary vm-b "
                   f"(pid {self.procs['secondary'].pid}), {a.mode}")

    def run(self):
        a = self.args
        self.start()
        self.figures.poll()
        self.figures.start()
        self.clients.start()
        self.event("clients: downloading and uploading through the endpoint")
        self._start_live()
        failure, disk = None, None
        try:
            end = time.monotonic() + a.seconds
            kill = time.monotonic() + a.kill_after
            while time.monotonic() < end and not self.clients.stop.is_set():
                if self.killed_at is None and time.monotonic() >= kill:
                    self._kill_primary()
                if self.live is None:
                    self.say(self.progress_line())
                time.sleep(1.0 if self.live is None else 0.2)
        finally:
            self.clients.finish()
            self._stop_live()
        failure = self.clients.failure
        if failure is None:
            try:
                disk = self.clients.verify_disk()
            except (DemoFailure, OSError, http.client.HTTPException) as e:
                failure = str(e)
        self.figures.poll()
        self.summary(failure, disk)
        return 0 if failure is None else 1

    def _kill_primary(self):
        self.figures.poll()
        self.killed_primary = dict(self.figures.colo)
        self.figures.forget("primary")
        self.event(f"SIGKILL primary vm-a (pid {self.procs['primary'].pid}) in the middle of the traffic")
        self.killed_at = time.monotonic()
        self.procs["primary"].kill(wait=False)

    def _state(self):
        c, proxy = self.clients, self.figures.proxy
        primary = self.figures.colo if self.killed_primary is None else self.killed_primary
        return {"downloads": c.downloads, "mb": c.downloaded_bytes / (1 << 20), "uploads": len(c.uploads),
                "lost": c.lost, "duplicated": c.duplicated, "stall": c.longest_stall * 1e3,
                "serving": _who_serves(proxy), "checkpoints": primary.get("checkpoints", 0),
                "triggers": _triggers(primary.get("triggers") or {}), "mismatches": proxy.get("mismatches", 0),
                "compared": (proxy.get("bytes_compared") or 0) / (1 << 20), "pause": primary.get("pause-ms-median")}

    def progress_line(self):
        s = self._state()
        return (f"[{time.monotonic() - self.started:6.1f} s] downloads {s['downloads']} ({s['mb']:.0f} MB checked), "
                f"uploads {s['uploads']}, lost {s['lost']}, duplicated {s['duplicated']} | {s['serving']} | "
                f"checkpoints {s['checkpoints']} ({s['triggers'] or '-'}) | mismatches {s['mismatches']} | "
                f"pause median {_ms(s['pause'])} | longest stall {s['stall']:.0f} ms")

    def render(self):
        from rich.table import Table

        s = self._state()
        t = Table(title=f"emu colo demo --guest linux ({self.args.mode}, checkpoint every "
                        f"{self.args.checkpoint_delay} ms)", show_header=False, title_justify="left", min_width=72)
        t.add_column(style="bold")
        t.add_column()
        t.add_row("downloads", f"{s['downloads']} whole files, {s['mb']:.0f} MB checked")
        t.add_row("uploads", f"{s['uploads']} stored and acknowledged, lost {s['lost']}, duplicated {s['duplicated']}")
        t.add_row("serving", s["serving"])
        frozen = " (primary gone: none since)" if self.killed_primary is not None else ""
        t.add_row("checkpoints", f"{s['checkpoints']}: {s['triggers'] or '-'}{frozen}")
        t.add_row("mismatches", f"{s['mismatches']} (frames the two VMs sent differently)")
        t.add_row("compared", f"{s['compared']:.1f} MB of TCP payload matched before release")
        t.add_row("pause", f"median {_ms(s['pause'])}")
        t.add_row("failover", "primary not killed yet" if self.killed_at is None else
                  f"primary killed {time.monotonic() - self.killed_at:.1f} s ago")
        t.add_row("longest stall", f"{s['stall']:.0f} ms")
        return t

    def summary(self, failure, disk):
        s, proxy = self._state(), self.figures.proxy
        primary = self.killed_primary or self.figures.colo
        lines = ["", "emu colo demo --guest linux: summary",
                 f"  downloads    {s['downloads']} files of {BLOB_MB} MB, {s['mb']:.0f} MB, every byte checked",
                 f"  uploads      {s['uploads']} acknowledged, lost {s['lost']}, duplicated {s['duplicated']}",
                 f"  compared     {s['compared']:.1f} MB of TCP payload, {proxy.get('frames_compared', 0)} frames; "
                 f"mismatches {s['mismatches']}",
                 f"  checkpoints  {primary.get('checkpoints', 0)}, pause median {_ms(primary.get('pause-ms-median'))}, "
                 f"max {_ms(primary.get('pause-ms-max'))}; by trigger: {s['triggers'] or '-'}",
                 f"  served by    {s['serving']}",
                 f"  failover     the endpoint accepted the takeover {_ms(proxy.get('failover_ms'))} after it lost "
                 f"the primary" if self.killed_at is not None else "  failover     the primary was not killed",
                 f"  client stall longest {s['stall']:.0f} ms (between two reads of a download, or one upload)",
                 f"  disk         {disk or '-'}"]
        if failure is None:
            lines.append("  result       OK: lost 0, duplicated 0, every byte checked, the disk verified")
        else:
            lines.append(f"  result       FAILED: {failure}")
            lines.append(f"               logs: {self.dir}")
        self.say("\n".join(lines))

    def close(self):
        self._stop_live()
        if self.figures is not None:
            self.figures.close()
        if self.console is not None:
            self.console.close()
        stop_all(self.processes[::-1], who="emu colo demo")


# ---------------------------------------------------------------------- command
def parse_args(argv):
    p = _Parser(prog="emu colo demo --guest linux", allow_abbrev=False,
                description="Linux serving HTTP with a disk on a networked pair; the primary killed.")
    p.add_argument("--mode", choices=("compare", "passive"), default="compare")
    p.add_argument("--checkpoint-delay", type=int, default=200, metavar="MS")
    p.add_argument("--seconds", type=float, default=20, metavar="S", help="how long the clients run (default 20)")
    p.add_argument("--kill-after", type=float, metavar="S", help="SIGKILL the primary S seconds in (default 1/3)")
    p.add_argument("--records", metavar="DIR", help="logs, disk images and records here (default: a temporary "
                                                    "directory)")
    p.add_argument("--no-live", action="store_true", help="plain progress lines instead of the live view")
    args = p.parse_args(argv)
    if args.kill_after is None:
        args.kill_after = args.seconds / 3
    if not 0 < args.kill_after < args.seconds:
        raise ConfigError("colo demo --guest linux: --kill-after must be between 0 and --seconds")
    return args


def main(argv):
    args = parse_args(argv)
    reason = namespaces_missing()
    if reason:
        raise ConfigError(f"colo demo: {reason}")
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
    from linux import build

    try:
        files = build.build(log=lambda message: print(f"colo demo: {message}", flush=True))
    except build.BuildError as e:
        raise ConfigError(f"colo demo: cannot fetch Debian's kernel and busybox: {e}") from None
    workdir = pathlib.Path(args.records).resolve() if args.records else pathlib.Path(
        tempfile.mkdtemp(prefix="emu-colo-linux-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    namespace = Namespace()
    demo = None
    try:
        namespace.enter()
        demo = LinuxDemo(args, files, workdir)
        return demo.run()
    except KeyboardInterrupt:
        print("\nemu colo demo: interrupted; stopping every process", file=sys.stderr, flush=True)
        return 130
    except DemoFailure as e:
        print(f"emu colo demo: FAILED: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        if demo is not None:
            demo.close()
        namespace.close()

"""Debian's Linux 6.1 to a busybox shell: wall time from process start to the shell's banner,
for our emulator and for QEMU TCG with the same kernel, initramfs and command line.

One run each (a boot takes about 20 s here): the figure is the whole process, Python's
imports and QEMU's BIOS included, as a user would wait for it.  The guest files come from
``linux.build`` (cached; it fetches them once); without them the figure is skipped with a note.
"""

import os
import pathlib
import select
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
QEMU = shutil.which("qemu-system-x86_64")
# the command line of tests/test_linux.py's boot test
APPEND = "console=ttyS0 earlyprintk=serial,ttyS0,115200 noapic nolapic nosmp panic=-1 lpj=1000000"
SHELL_BANNER = b"built-in shell (ash)"
TIMEOUT_S = 300
TARGET = "<= 10 s"


def boot_to_shell(cmd):
    """Seconds from starting ``cmd`` until the shell banner appears on its stdout."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    text = b""
    try:
        while SHELL_BANNER not in text:
            if time.perf_counter() - t0 > TIMEOUT_S or proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]}: no shell within {TIMEOUT_S} s; output ends with "
                                   f"{text[-300:].decode('latin1')!r}")
            ready, _, _ = select.select([proc.stdout], [], [], 1)
            if ready:
                text += os.read(proc.stdout.fileno(), 65536)
        return time.perf_counter() - t0
    finally:
        proc.kill()
        proc.wait()


def guest_files():
    """(kernel, initrd), or a note saying why there are none."""
    sys.path.insert(0, str(ROOT))
    from linux import build

    try:
        return build.build(log=lambda message: None), None
    except build.BuildError as e:
        return None, f"skipped: cannot fetch Debian's kernel and busybox ({e})"


def run():
    files, note = guest_files()
    if files is None:
        return [{"figure": "Linux 6.1 boot to a busybox shell", "unit": "s", "value": None, "target": TARGET,
                 "notes": [note]}]
    kernel, initrd = files
    emu = [sys.executable, "-m", "emu", "run", "-m", "256M", "-kernel", kernel, "-initrd", initrd,
           "-append", APPEND, "-serial", "stdio", "-no-reboot"]
    rows = [{"figure": "Linux 6.1 boot to a busybox shell (emu)", "unit": "s", "value": boot_to_shell(emu),
             "target": TARGET}]
    if QEMU:
        qemu = [QEMU, "-M", "pc", "-accel", "tcg", "-m", "256M", "-nographic", "-no-reboot", "-kernel", kernel,
                "-initrd", initrd, "-append", APPEND]
        rows.append({"figure": "Linux 6.1 boot to a busybox shell (QEMU TCG)", "unit": "s",
                     "value": boot_to_shell(qemu), "target": "(reference)"})
    else:
        rows[0]["notes"] = ["QEMU not installed: no reference figure"]
    for mode in ("compare", "passive"):
        try:
            rows += colo_pause_rows(kernel, initrd, mode)
        except Exception as e:  # reported, the other figures stand
            rows.append({"figure": f"checkpoint pause with Linux running ({mode}): failed", "unit": "",
                         "value": None, "target": "", "notes": [str(e)]})
    return rows


COLO_RUN_S = 6.0


def colo_pause_rows(kernel, initrd, mode):
    """A Linux shell as a COLO pair formed over QMP once it has booted (as a QEMU user
    would): the checkpoint figures of ``COLO_RUN_S`` seconds at a 200 ms delay."""
    import tempfile

    from bench.colo import HOST, Processes, proxy_status

    with tempfile.TemporaryDirectory() as tmp, Processes(tmp) as ps:
        proxy = ps.start("proxy", "colo", "proxy", "--client", f"tcp:{HOST}:0", "--listen", f"tcp:{HOST}:0")
        m = proxy.wait_for(r"client on [\d.]+:(\d+), VMs on [\d.]+:(\d+)")
        client_port, vm_port = int(m.group(1)), int(m.group(2))
        guest = ["-m", "256M", "-kernel", kernel, "-initrd", initrd, "-append", APPEND + " quiet", "-no-reboot"]
        passive = ["--passive"] if mode == "passive" else []
        sec = ps.start("secondary", "colo", "secondary", *guest, "--no-status", "--proxy", f"tcp:{HOST}:{vm_port}",
                       "--listen", f"tcp:{HOST}:0", "--heartbeat-timeout", "2000", *passive)
        port = sec.wait_for(r"waiting for the primary on tcp:[\d.]+:(\d+)").group(1)
        qmp_path = pathlib.Path(tmp) / "primary.qmp"
        ps.start("primary", "run", *guest, "-serial", f"colo:{HOST}:{vm_port},role=primary",
                 "-qmp", f"unix:{qmp_path},server,nowait")
        _wait_for_shell(client_port)
        qmp = _connect_qmp(qmp_path)
        qmp.execute("migrate-set-capabilities", {"capabilities": [{"capability": "x-colo", "state": True}]})
        qmp.execute("migrate-set-parameters", {"x-checkpoint-delay": 200})
        qmp.execute("migrate", {"uri": f"tcp:{HOST}:{port}"})
        deadline = time.monotonic() + 60
        while proxy_status(vm_port)["mode"] != "paired":
            if time.monotonic() > deadline:
                raise RuntimeError("the Linux pair did not form within 60 s")
            time.sleep(0.1)
        time.sleep(COLO_RUN_S)
        info = qmp.execute("query-migrate")["x-colo"]
        qmp.close()
    label = f"checkpoint pause with Linux idle at its shell ({mode}, 200 ms delay)"
    return [{"figure": f"{label}, median", "unit": "ms", "value": info["pause-ms-median"], "target": "<= 5 ms"},
            {"figure": f"{label}, max", "unit": "ms", "value": info["pause-ms-max"], "target": ""},
            {"figure": f"  dirty pages at the last checkpoint ({info['ok']} checkpoints)", "unit": "pages",
             "value": info["last-dirty-pages"], "target": ""}]


def _wait_for_shell(port):
    import socket

    deadline = time.monotonic() + TIMEOUT_S
    while True:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("cannot reach the proxy") from None
            time.sleep(0.1)
    with sock:
        seen = b""
        sock.settimeout(TIMEOUT_S)
        while SHELL_BANNER not in seen:
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError("the proxy closed the client connection during the boot")
            seen += chunk


def _connect_qmp(path, timeout=30):
    from colo.processes import QmpClient

    deadline = time.monotonic() + timeout
    while True:
        try:
            return QmpClient(path)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)

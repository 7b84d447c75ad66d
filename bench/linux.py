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
    return rows


if __name__ == "__main__":
    from bench.__main__ import print_rows

    print_rows(run())

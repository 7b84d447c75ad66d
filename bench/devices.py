"""Debian's Linux with a virtio NIC and a virtio disk: host curl against busybox httpd in the
guest over a tap, and dd on a raw image in the guest, for our emulator and for QEMU TCG with
the same kernel, initramfs, command line and devices.

The tap lives in a network namespace made here (as in ``tests/test_linux_devices.py``), so the
figures need root and /dev/net/tun; without them they are skipped with the reason.  Each
figure is one run: the round trip of a ping from the guest to the host beside that of a
command over the serial console (the bar: a small request over the NIC is no slower than
over the serial link), requests per second over ``SMALL_REQUESTS`` fetches of a 1 KiB
file in one curl process, MB/s for one 50 MB file, and dd's sequential MB/s over ``DISK_MB`` of the disk
with the page cache dropped (read) or synced (write), timed on the host around the command.
"""

import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
QEMU = shutil.which("qemu-system-x86_64")
GUEST_IP, HOST_IP = "10.0.2.15", "10.0.2.2"
SMALL_REQUESTS = 200
BIG_MB = 50
DISK_MB = 64


def _helpers():
    sys.path.insert(0, str(ROOT / "tests"))
    import linuxguest

    return linuxguest


def _guest(lg, kernel, initrd, image, netns, qemu):
    devices = ["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no", "-device", "virtio-net-pci,netdev=n0",
               "-drive", f"file={image},format=raw,if=virtio"]
    qemu_cmd = [QEMU, "-M", "pc", "-accel", "tcg", "-nodefaults", "-display", "none", "-monitor", "none"]
    program = qemu_cmd if qemu else None
    return lg.LinuxGuest(kernel, initrd, *devices, append=f"{lg.APPEND} emu.ip={GUEST_IP}/24,{HOST_IP}",
                         netns=netns, program=program)


def _timed(guest, command, timeout=300):
    t0 = time.perf_counter()
    out = guest.run(command, timeout=timeout)
    return time.perf_counter() - t0, out


def _measure(lg, network, kernel, initrd, qemu):
    """{figure: (value, unit)} for one emulator."""
    with tempfile.TemporaryDirectory() as tmp:
        image = pathlib.Path(tmp) / "disk.img"
        subprocess.run(["truncate", "-s", f"{DISK_MB * 2}M", str(image)], check=True)
        guest = _guest(lg, kernel, initrd, image, network.ns, qemu)
        try:
            guest.boot()
            guest.run(f"dd if=/dev/urandom of=/srv/small bs=1024 count=1 2>/dev/null; "
                      f"dd if=/dev/zero of=/srv/big bs=1M count={BIG_MB} 2>/dev/null; httpd -p 80 -h /srv")
            url = f"http://{GUEST_IP}"
            network.exec("curl", "-sS", "--max-time", "30", "-o", "/dev/null", f"{url}/small")  # ARP, warm-up
            out = guest.run(f"ping -c 30 -i 0.05 -q {HOST_IP}")
            rtt = re.search(r"min/avg/max = [\d.]+/([\d.]+)/", out)
            if rtt is None:
                raise RuntimeError(f"ping: {out[-300:]!r}")
            serial = sorted(_timed(guest, "true")[0] for _ in range(9))[4]
            args = []
            for _ in range(SMALL_REQUESTS):
                args += ["-o", "/dev/null", f"{url}/small"]
            t0 = time.perf_counter()
            network.exec("curl", "-sS", "--max-time", "120", *args)
            requests_per_s = SMALL_REQUESTS / (time.perf_counter() - t0)
            t0 = time.perf_counter()
            got = network.exec("curl", "-sS", "--max-time", "300", "-o", "/dev/null", "-w", "%{size_download}",
                               f"{url}/big").stdout
            big_mb_per_s = int(got) / (1 << 20) / (time.perf_counter() - t0)
            write_s, _ = _timed(guest, f"dd if=/dev/zero of=/dev/vda bs=1M count={DISK_MB} conv=fsync 2>/dev/null")
            guest.run("sync; echo 3 > /proc/sys/vm/drop_caches")
            read_s, out = _timed(guest, f"dd if=/dev/vda of=/dev/null bs=1M count={DISK_MB} 2>&1")
            if not re.search(rf"{DISK_MB}\+0 records in", out):
                raise RuntimeError(f"dd read: {out[-300:]!r}")
            return {"small request: ping guest -> host, average round trip": (float(rtt.group(1)), "ms"),
                    "small request: a shell command over the serial console, median": (serial * 1000, "ms"),
                    "HTTP small file (1 KiB), host curl": (requests_per_s, "req/s"),
                    f"HTTP {BIG_MB} MB file, host curl": (big_mb_per_s, "MB/s"),
                    f"disk sequential write, dd {DISK_MB} MB": (DISK_MB / write_s, "MB/s"),
                    f"disk sequential read, dd {DISK_MB} MB": (DISK_MB / read_s, "MB/s")}
        finally:
            guest.close()


def _in_own_namespace(lg, kernel, initrd, qemu):
    network = lg.TapNetwork(taps=("tap0",))
    try:
        return _measure(lg, network, kernel, initrd, qemu)
    finally:
        network.close()


def run():
    lg = _helpers()
    from bench.linux import guest_files

    reason = lg.network_namespaces_available()
    files, note = guest_files()
    if reason or files is None:
        return [{"figure": "virtio-net and virtio-blk", "unit": "", "value": None, "target": "",
                 "notes": [f"skipped: {reason or note}"]}]
    kernel, initrd = files
    ours = _in_own_namespace(lg, kernel, initrd, qemu=False)
    theirs = _in_own_namespace(lg, kernel, initrd, qemu=True) if QEMU else {}
    rows = []
    for figure, (value, unit) in ours.items():
        reference = theirs.get(figure, (None,))[0]
        latency = unit == "ms"  # lower is better
        target = "<= 2x QEMU" if latency else ">= 1/2 of QEMU"
        if figure.startswith("small request: ping"):
            target = "<= the serial console's"  # the bar for a small request over the NIC
        rows.append({"figure": f"{figure} (emu)", "unit": unit, "value": value, "target": target})
        if reference is not None:
            ratio = f"emu/QEMU time {value / reference:.2f}" if latency else f"emu/QEMU {value / reference:.2f}"
            rows.append({"figure": f"{figure} (QEMU TCG)", "unit": unit, "value": reference, "target": ratio})
    return rows

"""Debian's Linux with a virtio disk and NIC, against real programs on the host: an ext4
image made with mkfs.ext4 and read back with debugfs, curl and ping in a network namespace
the test makes, and two emulators on a socket netdev."""

import hashlib
import re
import shutil
import socket
import subprocess

import pytest
from linuxguest import APPEND, LinuxGuest, tap_network  # noqa: F401  (tap_network is a fixture)

GUEST_IP, HOST_IP = "10.0.2.15", "10.0.2.2"


def _need(*tools):
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (e2fsprogs, curl)")


def _ext4_image(path, files):
    """A 32 MiB ext4 image holding ``files`` {name: bytes}, made by e2fsprogs."""
    subprocess.run(["truncate", "-s", "32M", str(path)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(path)], check=True, capture_output=True)
    for name, data in files.items():
        source = path.parent / f"src-{name}"
        source.write_bytes(data)
        subprocess.run(["debugfs", "-w", "-R", f"write {source} {name}", str(path)], check=True, capture_output=True)


def _debugfs_cat(path, name):
    return subprocess.run(["debugfs", "-R", f"cat {name}", str(path)], check=True, capture_output=True).stdout


def test_a_disk_made_on_the_host_is_read_and_written_by_the_guest(debian_linux, tmp_path):
    _need("mkfs.ext4", "debugfs")
    kernel, initrd = debian_linux
    payload = bytes(range(256)) * 4096  # 1 MiB
    image = tmp_path / "disk.img"
    _ext4_image(image, {"host.bin": payload})
    guest = LinuxGuest(kernel, initrd, "-drive", f"file={image},format=raw,if=virtio,serial=emu-disk")
    try:
        guest.boot()
        out = guest.run("cat /sys/block/vda/serial; mount /dev/vda /mnt && sha256sum /mnt/host.bin")
        assert "emu-disk" in out and hashlib.sha256(payload).hexdigest() in out, out
        out = guest.run("dd if=/dev/urandom of=/mnt/guest.bin bs=64k count=32 2>/dev/null; "
                        "sha256sum /mnt/guest.bin; umount /mnt")
        guest_sha = re.search(r"([0-9a-f]{64})  /mnt/guest.bin", out).group(1)
        assert guest.poweroff() == 0
    finally:
        guest.close()
    assert hashlib.sha256(_debugfs_cat(image, "guest.bin")).hexdigest() == guest_sha
    subprocess.run(["e2fsck", "-n", "-f", str(image)], check=True, capture_output=True)  # the guest left it clean


def test_a_read_only_drive_mounts_read_only(debian_linux, tmp_path):
    _need("mkfs.ext4", "debugfs")
    kernel, initrd = debian_linux
    image = tmp_path / "disk.img"
    _ext4_image(image, {"note": b"read me\n"})
    before = image.read_bytes()
    guest = LinuxGuest(kernel, initrd, "-drive", f"file={image},format=raw,if=none,id=d0,readonly=on",
                       "-device", "virtio-blk-pci,drive=d0")
    try:
        guest.boot()
        out = guest.run("cat /sys/block/vda/ro; mount -o ro /dev/vda /mnt && cat /mnt/note; "
                        "dd if=/dev/zero of=/dev/vda bs=512 count=1 2>&1")
        assert out.splitlines()[0].strip() == "1" and "read me" in out, out
        assert "Operation not permitted" in out or "Read-only" in out, out
    finally:
        guest.close()
    assert image.read_bytes() == before


def test_curl_on_the_host_fetches_a_file_from_httpd_in_the_guest(debian_linux, tap_network):  # noqa: F811
    _need("curl")
    kernel, initrd = debian_linux
    guest = LinuxGuest(kernel, initrd, "-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no",
                       "-device", "virtio-net-pci,netdev=n0", append=f"{APPEND} emu.ip={GUEST_IP}/24,{HOST_IP}",
                       netns=tap_network.ns)
    try:
        guest.boot()
        out = guest.run("dd if=/dev/urandom of=/srv/blob bs=64k count=64 2>/dev/null; sha256sum /srv/blob; "
                        "httpd -p 80 -h /srv")
        guest_sha = re.search(r"([0-9a-f]{64})  /srv/blob", out).group(1)
        fetched = tap_network.exec("curl", "-sS", "--max-time", "60", f"http://{GUEST_IP}/blob").stdout
        assert len(fetched) == 64 * 65536 and hashlib.sha256(fetched).hexdigest() == guest_sha
        out = guest.run(f"ping -c 3 -W 5 {HOST_IP}")
        assert "3 packets received" in out, out
        out = guest.run("cat /sys/class/net/eth0/address")
        assert "52:54:00:12:34:56" in out
    finally:
        guest.close()


def test_two_emulators_on_a_socket_netdev_ping_each_other(debian_linux, tmp_path):
    kernel, initrd = debian_linux
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    left = LinuxGuest(kernel, initrd, "-netdev", f"socket,id=n0,listen=127.0.0.1:{port}",
                      "-device", "virtio-net-pci,netdev=n0", append=f"{APPEND} emu.ip=10.0.3.1/24")
    right = None
    try:
        left.expect("init started", 120)  # listening since its start
        right = LinuxGuest(kernel, initrd, "-netdev", f"socket,id=n0,connect=127.0.0.1:{port}",
                           "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:99",
                           append=f"{APPEND} emu.ip=10.0.3.2/24")
        left.boot()
        right.boot()
        out = left.run("ping -c 3 -W 5 10.0.3.2")
        assert "3 packets received" in out, out
        out = right.run("ping -c 2 -W 5 10.0.3.1")
        assert "2 packets received" in out, out
    finally:
        left.close()
        if right is not None:
            right.close()


@pytest.mark.parametrize("append, kind", [(APPEND, "XT-PIC"), ("console=ttyS0 panic=-1 quiet", "PCI-MSI")])
def test_linux_takes_the_cards_interrupts_with_and_without_the_local_apic(debian_linux, tmp_path, append, kind):
    kernel, initrd = debian_linux
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    guest = LinuxGuest(kernel, initrd, "-drive", f"file={image},format=raw,if=virtio", append=append)
    try:
        guest.boot()
        out = guest.run("dd if=/dev/vda of=/dev/null bs=4k count=64 2>/dev/null; grep -E 'virtio|XT-PIC' "
                        "/proc/interrupts")
        lines = [line for line in out.splitlines() if "virtio" in line]
        assert lines and all(kind in line for line in lines), out
        assert any(int(line.split()[1]) > 0 for line in lines), out  # they did arrive
    finally:
        guest.close()

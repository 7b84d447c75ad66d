"""Live migration of Debian's Linux in the middle of I/O: curl on the host is downloading a
file from httpd in the guest over a tap, and the guest is copying one virtio disk onto
another with dd, when the guest moves to a second emulator (its NIC on a second tap of the
same bridge, its disks the same image files, as with shared storage).  The download
finishes with the right checksum, the copy is exact, and the guest goes on."""

import hashlib
import os
import subprocess

import pytest
from emuproc import Qmp, free_port, wait_for
from linuxguest import APPEND, LinuxGuest, tap_network  # noqa: F401  (tap_network is a fixture)

GUEST_IP, HOST_IP = "10.0.2.15", "10.0.2.2"
CHUNKS, CHUNK = 48, 512 << 10  # 24 MiB copied in chunks, each synced, with pauses between them
DOWNLOAD = 16 << 20


def _guest(kernel, initrd, tmp_path, name, tap, source, target, network, *extra):
    return LinuxGuest(kernel, initrd, "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
                      "-device", "virtio-net-pci,netdev=n0",
                      "-drive", f"file={source},format=raw,if=virtio,readonly=on",
                      "-drive", f"file={target},format=raw,if=virtio",
                      "-qmp", f"unix:{tmp_path / name}.qmp,server,nowait", *extra,
                      append=f"{APPEND} emu.ip={GUEST_IP}/24,{HOST_IP}", netns=network.ns)


def test_migration_during_a_download_and_a_dd(debian_linux, tap_network, tmp_path):  # noqa: F811
    if subprocess.run(["which", "curl"], capture_output=True).returncode:
        pytest.skip("curl is not installed")
    kernel, initrd = debian_linux
    source, target = tmp_path / "source.img", tmp_path / "target.img"
    data = os.urandom(CHUNKS * CHUNK)
    source.write_bytes(data)
    target.write_bytes(bytes(len(data)))
    port = free_port()
    dst = _guest(kernel, initrd, tmp_path, "dst", "tap1", source, target, tap_network,
                 "-incoming", f"tcp:127.0.0.1:{port}")
    src = _guest(kernel, initrd, tmp_path, "src", "tap0", source, target, tap_network)
    curl = None
    try:
        src.boot()
        src.run(f"mkdir -p /srv && dd if=/dev/vda of=/srv/blob bs=1M count={DOWNLOAD >> 20} 2>/dev/null; "
                "httpd -p 80 -h /srv")
        curl = subprocess.Popen(["ip", "netns", "exec", tap_network.ns, "curl", "-sS", "--max-time", "120",
                                 "--limit-rate", "3M", "-o", str(tmp_path / "fetched"),
                                 f"http://{GUEST_IP}/blob"], stderr=subprocess.PIPE)
        src.type(f"for i in $(seq 0 {CHUNKS - 1}); do dd if=/dev/vda of=/dev/vdb bs={CHUNK} skip=$i seek=$i "
                 "count=1 conv=fsync 2>/dev/null; sleep 0.1; done; echo COPY-$((40+2)); "
                 "md5sum /dev/vdb")
        wait_for(lambda: os.path.exists(tmp_path / "fetched") and os.path.getsize(tmp_path / "fetched") > 1 << 20,
                 timeout=60, what="the download under way")
        qmp = Qmp(tmp_path / "src.qmp")
        qmp("migrate", uri=f"tcp:127.0.0.1:{port}")
        info = wait_for(lambda: (lambda i: i if i["status"] in ("completed", "failed") else None)(
            qmp("query-migrate")), timeout=120, what="the migration")
        assert info["status"] == "completed", info
        assert qmp("query-status")["status"] == "postmigrate"
        assert target.read_bytes() != data  # the copy was still going on
        partial = os.path.getsize(tmp_path / "fetched")
        assert partial < DOWNLOAD  # and so was the download
        qmp.close()
        src.close()  # the source is gone: its tap carries nothing more
        dst.expect("COPY-42", 120)
        assert curl.wait(120) == 0, curl.stderr.read()
        fetched = (tmp_path / "fetched").read_bytes()
        assert hashlib.sha256(fetched).digest() == hashlib.sha256(data[:DOWNLOAD]).digest()
        dst.expect(hashlib.md5(data).hexdigest(), 60)  # the guest reads back the whole copy
        assert dst.poweroff() == 0
    finally:
        if curl is not None and curl.poll() is None:
            curl.kill()
        src.close()
        dst.close()
    assert target.read_bytes() == data

"""Debian's Linux under COLO: a shell on the pair survives the death of the primary.

The primary boots alone (its console reaches the client unprotected), the pair is formed
over QMP as with QEMU once the shell is up, a file is written in /tmp, the primary is
SIGKILLed, and the same shell goes on answering on the former secondary, file included.
With a virtio disk, each VM on its own copy of an ext4 image, every record a loop reported
as written is on the survivor's image.
"""

import json
import re
import shutil
import socket
import subprocess
import time

import pytest
from colopair import ColoDeployment
from conftest import requires_patched_engine

from colo import report

APPEND = "console=ttyS0 noapic nolapic nosmp panic=-1 quiet"


def _command(client, line, marker, timeout=60):
    """Type ``line`` (which must print ``marker``) and wait for its output and the next prompt,
    as a user would: busybox's line editor asks the terminal where its cursor is when it
    prints the prompt, and input typed ahead of that is taken as the answer."""
    start = len(client.received)
    client.send(line + "\n")
    client.read_until(lambda b: marker.encode() in b[start:], timeout)  # the typed line has $((...)), not it
    after = bytes(client.received).index(marker.encode(), start)
    client.read_until(lambda b: b"# " in b[after:], timeout)
    return bytes(client.received[start:]).decode("latin1")


@pytest.mark.parametrize("mode", ["passive", "compare"])
def test_a_shell_on_the_pair_survives_the_primary(debian_linux, tmp_path, mode):
    kernel, initrd = debian_linux
    d = ColoDeployment(tmp_path, guest_args=["-kernel", kernel, "-initrd", initrd, "-append", APPEND],
                       memory="256M", mode=mode, arbiter=False, protect_by_qmp=True, checkpoint_delay=200,
                       heartbeat=(100, 2000))
    try:
        client = d.client()
        client.read_until(lambda b: b"built-in shell (ash)" in b, 240)
        _command(client, "echo kept > /tmp/f; echo WROTE-$((40+2))", "WROTE-42")
        d.protect()
        d.wait_colo(timeout=120)
        out = _command(client, "echo more >> /tmp/f; cat /tmp/f; echo SYNCED-$((3*3))", "SYNCED-9")
        assert "kept\r\nmore" in out
        d.primary.kill()
        out = _command(client, "cat /tmp/f; uname -sm; echo AFTER-$((6*7))", "AFTER-42", timeout=120)
        assert "kept\r\nmore" in out and "Linux x86_64" in out, out
        assert re.search(r"serving alone from checkpoint \d+", d.secondary.stderr())
        out = _command(client, "cat /proc/interrupts; echo STILL-$((5+5))", "STILL-10")
        assert re.search(r"^\s*0:\s+\d+", out, re.M), out
    except BaseException:
        print(d.logs())
        raise
    finally:
        d.close()


def _digests_agree_over_checkpoints(debian_linux, tmp_path, mode, checkpoints):
    """Debug mode: after every checkpoint the secondary compares the digest of its whole state
    (CPU, devices, every RAM page) with the primary's, while a shell loop forks, writes files
    and takes page faults (accessed and dirty bits set by the page walker included).  A page
    the primary's dirty log missed would differ at once and stop the secondary."""
    kernel, initrd = debian_linux
    d = ColoDeployment(tmp_path, guest_args=["-kernel", kernel, "-initrd", initrd, "-append", APPEND],
                       memory="128M", mode=mode, arbiter=False, checkpoint_delay=30, heartbeat=(100, 5000),
                       primary_args=["--debug-consistency", "--protect-after", "6000"])
    try:
        client = d.client()
        client.read_until(lambda b: b"built-in shell (ash)" in b, 240)
        d.wait_colo(timeout=120)
        client.send("i=0; while :; do echo $i > /tmp/n; cat /tmp/n > /dev/null; i=$((i+1)); done\n")
        q = d.qmp("primary")
        deadline = time.monotonic() + 60 + checkpoints
        while (x := q("query-migrate").get("x-colo", {})).get("ok", 0) < checkpoints:
            assert d.secondary.alive(), d.secondary.stderr()[-2000:]
            assert time.monotonic() < deadline, x
            time.sleep(0.2)
        assert x["failed"] == 0 and x["rejected"] == 0, x
        assert "differs" not in d.secondary.stderr()
        records = report.checkpoints(json.loads(d.records["secondary"].read_text() or "[]"))
        checked = [r for r in records if "debug-check" in r["phases"]]
        assert len(checked) >= checkpoints - 1 and all(r["status"] == "ok" for r in checked)
    except BaseException:
        print(d.logs())
        raise
    finally:
        d.close()


@requires_patched_engine  # the stock engine's write hook misses the page walker's A/D bits
def test_every_checkpoint_of_a_busy_linux_leaves_the_secondary_equal(debian_linux, tmp_path):
    """Compare mode, where the secondary also runs (and writes) between checkpoints; make
    soak runs both modes over 300 checkpoints."""
    _digests_agree_over_checkpoints(debian_linux, tmp_path, "compare", checkpoints=25)


@pytest.mark.soak
@requires_patched_engine
@pytest.mark.parametrize("mode", ["passive", "compare"])
def test_every_checkpoint_of_a_busy_linux_leaves_the_secondary_equal_soak(debian_linux, tmp_path, mode):
    _digests_agree_over_checkpoints(debian_linux, tmp_path, mode, checkpoints=300)


def _need(*tools):
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (e2fsprogs)")


@pytest.mark.parametrize("mode", ["passive", "compare"])
def test_every_record_reported_before_the_primary_died_is_on_the_survivors_disk(debian_linux, tmp_path, mode):
    """A shell loop appends numbered records to a file on an ext4 disk (made by mkfs.ext4)
    and prints each number once fsync returned (busybox's ``sync FILE``).  The pair forms
    while it runs (the disks are compared, the differing chunks copied, the writes of the
    migration carried along), the primary is SIGKILLed mid-loop, the loop runs on on the
    survivor, and the file on the survivor's image, read by debugfs on the host, holds every
    record that was reported, in order, none twice."""
    _need("mkfs.ext4", "debugfs")
    kernel, initrd = debian_linux
    p_img, s_img = tmp_path / "p.img", tmp_path / "s.img"
    subprocess.run(["mkfs.ext4", "-F", "-q", str(p_img), "32M"], check=True, capture_output=True)
    s_img.write_bytes(bytes(32 << 20))  # a blank copy: the pair copies what differs
    d = ColoDeployment(tmp_path, guest_args=["-kernel", kernel, "-initrd", initrd, "-append", APPEND],
                       memory="128M", mode=mode, arbiter=False, protect_by_qmp=True,
                       checkpoint_delay=100 if mode == "passive" else 500,  # compare: the survivor's own
                       heartbeat=(100, 2000),  # writes since the last checkpoint are in its overlay
                       primary_args=["-drive", f"file={p_img},format=raw,if=virtio"],
                       secondary_args=["-drive", f"file={s_img},format=raw,if=virtio"])
    try:
        client = d.client()
        client.read_until(lambda b: b"built-in shell (ash)" in b, 240)
        _command(client, "mount /dev/vda /mnt; echo MOUNTED-$((2*3))", "MOUNTED-6")
        # a record fills most of a 4 KiB block: the blocks of the records before the failover
        # are never written again after it (a record in the block the survivor appends to
        # would come back from its page cache, whatever the checkpoints carried)
        client.send('i=0; while :; do i=$((i+1)); printf "record %d %4080s\\n" $i . >> /mnt/log; sync /mnt/log; '
                    'echo R$i; done\n')
        client.read_until(lambda b: b"R5\r\n" in b, 60)
        assert b"applet not found" not in client.received, bytes(client.received[-300:])
        d.protect()  # while the loop runs: its writes during the migration go along
        d.wait_colo(timeout=60)
        d.primary.wait_for(r"disk drive0: copied \d+ MiB")
        q, deadline = d.qmp("primary"), time.monotonic() + 30
        while (colo := q("query-migrate")["x-colo"])["ok"] < 5:
            assert time.monotonic() < deadline, colo
            _drain(client)
        reported = _reported(client.received)
        client.read_until(lambda b: max(_reported(b)) >= max(reported) + 5, 60)
        time.sleep(0.2)  # away from the checkpoint that released those: the secondary runs on its own
        d.primary.kill()
        killed_at = max(_reported(client.received))
        client.read_until(lambda b: max(_reported(b)) >= killed_at + 20, 60)  # on the survivor
        assert re.search(r"serving alone from checkpoint \d+", d.secondary.stderr())
        client.send("\x03")
        _command(client, "umount /mnt; echo UNMOUNTED-$((4+4))", "UNMOUNTED-8")
    except BaseException:
        print(d.logs())
        raise
    finally:
        d.close()
    reported = _reported(client.received)
    assert reported == list(range(1, len(reported) + 1)), "the console reports each record once, in order"
    log = subprocess.run(["debugfs", "-R", "cat /log", str(s_img)], check=True, capture_output=True).stdout
    count = len(re.findall(rb"record \d+ ", log))
    assert log == b"".join(b"record %d %4080s\n" % (i, b".") for i in range(1, count + 1)), \
        "the file holds records 1 to n, whole, in order, once"
    assert count >= len(reported) > killed_at, (count, len(reported), killed_at)
    assert colo["last-disk-blocks"] is not None and colo["ok"] >= 5
    subprocess.run(["e2fsck", "-n", "-f", str(s_img)], check=True, capture_output=True)


def _drain(client):
    """What the client has been sent so far, without waiting for more than a moment."""
    try:
        client.received += client.sock.recv(1 << 20)
    except socket.timeout:
        pass


def _reported(received):
    return [int(n) for n in re.findall(rb"(?<![$\w])R(\d+)\r\n", bytes(received))]

"""Debian's Linux under COLO: a shell on the pair survives the death of the primary.

The primary boots alone (its console reaches the client unprotected), the pair is formed
over QMP as with QEMU once the shell is up, a file is written in /tmp, the primary is
SIGKILLed, and the same shell goes on answering on the former secondary, file included.
"""

import json
import re
import time

import pytest
from colopair import ColoDeployment
from conftest import requires_patched_engine

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
        records = json.loads(d.records["secondary"].read_text() or "[]")
        checked = [r for r in records if "debug-check" in r["phases"]]
        assert len(checked) >= checkpoints - 1 and all(r["status"] == "ok" for r in checked)
    except BaseException:
        print(d.logs())
        raise
    finally:
        d.close()


@requires_patched_engine  # the stock engine's write hook misses the page walker's A/D bits
@pytest.mark.parametrize("mode", ["passive", "compare"])
def test_every_checkpoint_of_a_busy_linux_leaves_the_secondary_equal(debian_linux, tmp_path, mode):
    _digests_agree_over_checkpoints(debian_linux, tmp_path, mode, checkpoints=40)


@pytest.mark.soak
@requires_patched_engine
@pytest.mark.parametrize("mode", ["passive", "compare"])
def test_every_checkpoint_of_a_busy_linux_leaves_the_secondary_equal_soak(debian_linux, tmp_path, mode):
    _digests_agree_over_checkpoints(debian_linux, tmp_path, mode, checkpoints=300)

"""Debian's Linux under COLO: a shell on the pair survives the death of the primary.

The primary boots alone (its console reaches the client unprotected), the pair is formed
over QMP as with QEMU once the shell is up, a file is written in /tmp, the primary is
SIGKILLed, and the same shell goes on answering on the former secondary, file included.
"""

import re

import pytest
from colopair import ColoDeployment

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

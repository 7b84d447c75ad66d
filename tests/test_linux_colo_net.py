"""A networked Linux service on the COLO pair: its TCP clients never notice a death.

Debian's kernel and busybox serve HTTP (busybox httpd: a 50 MB file and a CGI counter) on
a virtio-net NIC whose backend is the pair's network link.  Real clients run in the
namespace of the endpoint's tap: curl downloads the file, and a request loop asks for the
counter again and again, each on a new connection.  One VM is SIGKILLed at a random
moment; the download must end with the right checksum and no reset, and the counter's
answers must be 1, 2, 3, ... with none missing and none twice.  Each VM has its own ext4
image; the counter's CGI appends record n to a file there and fsyncs it before it answers
n, and the survivor's image, checked on the host, must hold every record answered, once.
"""

import hashlib
import json
import random
import re
import time

import pytest
from colonetpair import GUEST_IP, NetPair
from conftest import requires_patched_engine
from linuxguest import network_namespaces_available

pytestmark = requires_patched_engine

BLOB_MB = 50
COUNTER = "/srv/cgi-bin/n"
DISK_MB = 32
# each answer n is also record n on the disk, fsynced before the answer: a record fills most
# of a 4 KiB block, so the blocks of the records before a failover are not written again
# after it (the survivor's image holds them only if the checkpoints carried them)
RECORD = r"record %d %4080s\n"  # printf's format, in the guest
SETUP = (f"mount /dev/vda /mnt && mkdir -p /srv/cgi-bin && "
         f"dd if=/dev/urandom of=/srv/blob bs=1M count={BLOB_MB} 2>/dev/null && "
         f"sha256sum /srv/blob && echo 0 > /tmp/n && echo '#!/bin/sh' > {COUNTER} && "
         f"echo 'n=$(( $(cat /tmp/n) + 1 )); printf \"{RECORD}\" $n . >> /mnt/log && "
         f"sync /mnt/log && echo $n > /tmp/n; "
         f"printf \"Content-Type: text/plain\\r\\n\\r\\n%s\\n\" $n' >> {COUNTER} && chmod +x {COUNTER} && "
         f"httpd -p 80 -h /srv")


@pytest.fixture
def netns():
    reason = network_namespaces_available()
    if reason:
        pytest.skip(reason)


def _served_pair(tmp_path, debian_linux, mode, primary_colo_args=None):
    pair = NetPair(tmp_path, debian_linux, mode=mode, primary_colo_args=primary_colo_args, disk_mb=DISK_MB)
    try:
        out = pair.boot(SETUP)
        blob_sha = re.search(r"([0-9a-f]{64})  /srv/blob", out).group(1)
        pair.protect()
    except BaseException:
        print(pair.logs())
        pair.close()
        raise
    return pair, blob_sha


def _report(proc, timeout=120):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return json.loads(out)


def primary_killed_round(tmp_path, debian_linux, mode, kill, seed):
    """One pair, curl and the request loop, the primary SIGKILLed: at a random moment
    (``kill`` "random") or at a checkpoint phase (``kill`` "PHASE:SEQ", by the primary itself).
    Fails unless the clients noticed nothing; returns the round's figures."""
    rng = random.Random(seed)
    phase_kill = None if kill == "random" else ["--x-kill-at", kill]
    pair, blob_sha = _served_pair(tmp_path, debian_linux, mode, primary_colo_args=phase_kill)
    kill_after = rng.uniform(0.2, 1.5)
    try:
        curl = pair.curl("--max-time", "120", f"http://{GUEST_IP}/blob")
        requests = pair.client("loop", f"http://{GUEST_IP}/cgi-bin/n", "4")
        if phase_kill is None:
            time.sleep(kill_after)
            pair.primary.kill()
        loop = assert_clients_saw_everything_once(curl, requests, blob_sha)
        assert len(loop["answers"]) >= 3
        deadline = time.monotonic() + 30
        while not pair.took_over():  # a phase kill may come after the clients are done
            assert time.monotonic() < deadline and pair.secondary.alive(), pair.logs()
            time.sleep(0.1)
        status = json.loads((tmp_path / "proxy.json").read_text())
        assert status["syncs"] >= 1
        after = _report(pair.client("download", f"http://{GUEST_IP}/blob"))
        assert after["error"] is None and after["sha256"] == blob_sha  # the survivor serves on
    except BaseException:
        when = f"killed {kill_after:.2f} s into the transfer" if phase_kill is None else f"killed at {kill}"
        print(f"seed {seed}, {mode}: primary {when}\n{pair.logs()}")
        raise
    finally:
        pair.close()
    assert_records_on_disk(pair, "secondary", len(loop["answers"]))
    return {"mode": mode, "kill": kill, "requests": len(loop["answers"]) + 2,
            "worst_request_ms": loop["max_request_s"] * 1e3}


def assert_clients_saw_everything_once(curl, requests, blob_sha, stop_requests=False):
    """The download ended whole, with the file's SHA-256, and the request loop's answers are
    1, 2, 3, ... with none missing and none twice; returns the loop's report.
    ``stop_requests``: the loop ends when the download has (SIGTERM), not at its own time."""
    try:
        assert_download_whole(curl, blob_sha)
    finally:
        if stop_requests:
            requests.terminate()
    return assert_answered_once(requests)


def assert_download_whole(curl, blob_sha):
    """``curl`` (its body on stdout) ended well with the whole file."""
    body, curl_err = curl.communicate(timeout=150)
    assert curl.returncode == 0, f"curl failed ({curl.returncode}): {curl_err.decode()[-400:]}"
    assert len(body) == BLOB_MB << 20 and hashlib.sha256(body).hexdigest() == blob_sha


def assert_answered_once(requests):
    """The request loop's answers are 1, 2, 3, ... with none missing and none twice; its report."""
    loop = _report(requests)
    assert loop["error"] is None, loop
    assert loop["answers"] == [str(n) for n in range(1, len(loop["answers"]) + 1)], loop
    return loop


def assert_records_on_disk(pair, role, answered):
    """``role``'s image holds records 1 to n, whole, in order, once, with n at least the
    number of answers the client had: nothing a client was told is stored is missing."""
    log = pair.disk_file(role, "/log")
    count = len(re.findall(rb"record \d+ ", log))
    expected = b"".join((RECORD.replace("\\n", "\n") % (i, ".")).encode() for i in range(1, count + 1))
    assert log == expected, f"the {role}'s /log is not records 1 to {count}, whole and once each"
    assert count >= answered, f"the {role}'s disk holds {count} records, the client was answered {answered}"


def test_clients_of_a_passive_pair_notice_nothing_when_the_primary_dies(debian_linux, tmp_path, netns):
    """Compare mode's kills: test_colo_net_reprotect (three in a row) and the sample below;
    make soak's campaign kills both modes at random moments."""
    primary_killed_round(tmp_path, debian_linux, "passive", "random", random.randrange(1 << 30))


def test_clients_notice_nothing_when_the_primary_dies_inside_a_checkpoint(debian_linux, tmp_path, netns):
    """A sample of the kill campaign (make soak): the primary dies while it sends its RAM."""
    primary_killed_round(tmp_path, debian_linux, "compare", "mid-ram:4", random.randrange(1 << 30))


def test_the_primary_serves_on_alone_when_the_secondary_dies(debian_linux, tmp_path, netns):
    pair, blob_sha = _served_pair(tmp_path, debian_linux, "compare")
    try:
        download = pair.client("download", f"http://{GUEST_IP}/blob")
        time.sleep(0.5)
        pair.secondary.kill()
        report = _report(download)
        assert report["error"] is None and report["sha256"] == blob_sha, report
        assert report["max_stall_s"] <= 1.0, report
        assert pair.primary.alive() and not pair.took_over()
    except BaseException:
        print(pair.logs())
        raise
    finally:
        pair.close()


def serving_pair_stays_equal(tmp_path, debian_linux, mode, checkpoints):
    """Debug mode while the clients are served: after every checkpoint the secondary checks
    that its whole state (CPU, every device, the NICs' rings in RAM, every page) equals the
    primary's; the first difference stops it, naming the device sections and pages."""
    pair, blob_sha = _served_pair(tmp_path, debian_linux, mode, primary_colo_args=["--debug-consistency"])
    try:
        curl = pair.curl("--max-time", "120", f"http://{GUEST_IP}/blob")
        requests = pair.client("loop", f"http://{GUEST_IP}/cgi-bin/n", "6")
        assert_clients_saw_everything_once(curl, requests, blob_sha)
        q = pair.qmp("primary")
        deadline = time.monotonic() + 60
        while (ok := q("query-migrate").get("x-colo", {}).get("ok", 0)) < checkpoints:
            assert time.monotonic() < deadline, f"{ok} checkpoints in 60 s"
            time.sleep(0.2)
        assert pair.secondary.alive() and "differs" not in pair.secondary.stderr(), pair.logs()
    except BaseException:
        print(pair.logs())
        raise
    finally:
        pair.close()


@pytest.mark.soak  # a minute per mode; make test has the cause's own tests (test_virtio_*: a save does no device work)
@pytest.mark.parametrize("mode", ["compare", "passive"])
def test_every_checkpoint_of_a_serving_linux_leaves_the_secondary_equal(debian_linux, tmp_path, netns, mode):
    serving_pair_stays_equal(tmp_path, debian_linux, mode, checkpoints=20)

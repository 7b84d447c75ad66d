"""Re-protection of a networked pair: three failovers in a row, the survivor re-protected
over QMP after the first two, while TCP clients are served.

Each failover kills the primary just after a download has opened its connection, with no
checkpoint in between (checkpoints a second apart, and a compare timeout as long, so that
a secondary lagging behind the downloads does not force them; a download whose
connection a checkpoint caught is left to run, and another is started): the survivor
serves that connection in a TCP sequence space of its own, and its new secondary, a copy
of it, shares that space.  The endpoint goes on translating between the clients' space
and the pair's across each re-protection and the next failover.  Every download ends
whole, the request loop's answers are 1, 2, 3, ..., and the last survivor's disk holds
every record the loop was answered.
"""

import re
import time

from colonetpair import GUEST_IP, NetPair
from conftest import requires_patched_engine
from test_linux_colo_net import (  # noqa: F401  (netns is a fixture)
    DISK_MB, SETUP, _report, assert_answered_once, assert_download_whole, assert_records_on_disk, netns)

pytestmark = requires_patched_engine

FAILOVERS = 3


def _checkpoints(pair):
    return pair.qmp("primary")("query-migrate")["x-colo"]["ok"]


def _download_since_the_last_checkpoint(pair, downloads):
    """A rate-limited download whose connection opened since the primary's last checkpoint."""
    for _ in range(5):
        before = _checkpoints(pair)
        downloads.append(pair.curl("--max-time", "120", "--limit-rate", "6M", f"http://{GUEST_IP}/blob"))
        time.sleep(0.15)  # connected, and some of the file sent
        if _checkpoints(pair) == before:
            return
    raise AssertionError(f"a checkpoint came within 150 ms of every one of 5 downloads: "
                         f"{pair.qmp('primary')('query-migrate')['x-colo']}")


def _wait_serving(pair, timeout=60):
    deadline = time.monotonic() + timeout
    while not pair.took_over():
        assert pair.secondary.alive() and time.monotonic() < deadline, pair.logs()
        time.sleep(0.05)


def test_a_networked_pair_fails_over_three_times_with_reprotection_in_between(debian_linux, tmp_path,
                                                                             netns):  # noqa: F811
    pair = NetPair(tmp_path, debian_linux, checkpoint_delay=1000, heartbeat=(100, 1000), disk_mb=DISK_MB,
                   proxy_args=["--compare-timeout", "1000"])
    downloads = []
    try:
        blob_sha = re.search(r"([0-9a-f]{64})  /srv/blob", pair.boot(SETUP)).group(1)
        pair.protect()
        loop = pair.client("loop", f"http://{GUEST_IP}/cgi-bin/n", "300")  # until stopped
        for failover in range(FAILOVERS):
            time.sleep(0.5)
            _download_since_the_last_checkpoint(pair, downloads)
            survivor = pair.secondary
            pair.primary.kill()
            _wait_serving(pair)
            if failover < FAILOVERS - 1:
                pair.reprotect()
        try:
            for curl in downloads:
                assert_download_whole(curl, blob_sha)
        finally:
            loop.terminate()
        answers = assert_answered_once(loop)
        after = _report(pair.client("download", f"http://{GUEST_IP}/blob"))
        assert after["error"] is None and after["sha256"] == blob_sha  # the last survivor serves on
        log = pair.proxy.stderr()
        assert log.count("is the primary again") == FAILOVERS - 1, log
        assert len(re.findall(r"takeover by secondary \S+ with epoch \d+ accepted", log)) == FAILOVERS, log
    except BaseException:
        print(pair.logs())
        raise
    finally:
        pair.close()
    assert_records_on_disk(pair, survivor.name, len(answers["answers"]))
    kept = [int(n) for n in re.findall(r"(\d+) TCP connection\(s\) keep its sequence space", log)]
    assert len(kept) == FAILOVERS - 1 and all(kept), kept  # the download opened since the last checkpoint, at least

"""The networked pair spread over namespaces, as over hosts: the endpoint (with the
clients), the primary and the secondary each in its own, joined by veth, the replication
link a veth of its own between the two VMs.

That link is shaped as with netem (2.5 ms each way: a 5 ms round trip, and 1 % of the packets
lost each way): checkpoints keep flowing.  The checkpoint's first step waits for the
secondary's reply, a round trip, while the guest runs on; the guest is paused only to
capture its state, so the pause does not take the round trip.  Then the link is cut (every
packet dropped, no reset): both VMs lose their heartbeats, both ask the endpoint to serve
alone under the same epoch, and exactly one is accepted; the other stops.  The clients
(a request loop and a rate-limited curl download) see every answer once, and the
survivor's disk holds every record the loop was answered.
"""

import re
import statistics
import time

from colonetpair import GUEST_IP, NetPair
from conftest import requires_patched_engine
from test_linux_colo_net import (  # noqa: F401  (netns is a fixture)
    DISK_MB, SETUP, _report, assert_clients_saw_everything_once, assert_records_on_disk, netns)

from colo.report import checkpoints, load_records

pytestmark = requires_patched_engine

ONE_WAY_MS = 2.5
RTT_MS = 2 * ONE_WAY_MS


def _wait_checkpoints(pair, ok, timeout):
    """Until the primary has applied ``ok`` checkpoints; returns its x-colo figures."""
    q, deadline = pair.qmp("primary"), time.monotonic() + timeout
    while (colo := q("query-migrate")["x-colo"])["ok"] < ok:
        assert time.monotonic() < deadline, f"{colo['ok']} checkpoints of {ok} within {timeout} s: {colo}"
        assert pair.primary.alive() and pair.secondary.alive(), pair.logs()
        time.sleep(0.1)
    return colo


def test_a_shaped_replication_link_keeps_checkpointing_and_a_cut_one_leaves_one_server(debian_linux, tmp_path,
                                                                                        netns):  # noqa: F811
    records_path = tmp_path / "primary.csv"
    pair = NetPair(tmp_path, debian_linux, split=True, disk_mb=DISK_MB,
                   primary_colo_args=["--records", str(records_path)])
    try:
        blob_sha = re.search(r"([0-9a-f]{64})  /srv/blob", pair.boot(SETUP)).group(1)
        pair.protect()
        loop = pair.client("loop", f"http://{GUEST_IP}/cgi-bin/n", "300")  # until stopped, after the cut
        unshaped = _wait_checkpoints(pair, 10, 60)["ok"]
        pair.net.shape(ONE_WAY_MS, 1)
        shaped = _wait_checkpoints(pair, unshaped + 20, 120)["ok"]
        # a download that spans the cut (50 MB at 4 MB/s), then the cut
        curl = pair.curl("--max-time", "120", "--limit-rate", "4M", f"http://{GUEST_IP}/blob")
        time.sleep(2)
        pair.net.cut()
        accepted = pair.proxy.wait_for(r"takeover by (primary|secondary) \S+ with epoch \d+ accepted", 60)
        survivor = accepted[1]
        fenced = {"primary": pair.secondary, "secondary": pair.primary}[survivor]
        assert fenced.proc.wait(60) == 1, fenced.stderr()
        answers = assert_clients_saw_everything_once(curl, loop, blob_sha, stop_requests=True)
        proxy_log = pair.proxy.stderr()
        assert len(re.findall(r"takeover by \S+ \S+ with epoch \d+ accepted", proxy_log)) == 1, proxy_log
        assert {"primary": pair.primary, "secondary": pair.secondary}[survivor].alive()
        after = _report(pair.client("download", f"http://{GUEST_IP}/blob"))
        assert after["error"] is None and after["sha256"] == blob_sha  # the survivor serves on
    except BaseException:
        print(pair.logs())
        raise
    finally:
        pair.close()
    assert_records_on_disk(pair, survivor, len(answers["answers"]))

    records = [r for r in checkpoints(load_records(records_path)) if r["status"] == "ok"]
    before = [r for r in records if r["seq"] <= unshaped]
    during = [r for r in records if unshaped < r["seq"] <= shaped]
    assert len(during) >= 15, f"{len(during)} checkpoints applied over the shaped link"
    request = {name: statistics.median(r["phases"]["request"] for r in rs)
               for name, rs in (("unshaped", before), ("shaped", during))}
    pause = {name: statistics.median(r["pause_ms"] for r in rs) for name, rs in (("unshaped", before),
                                                                                  ("shaped", during))}
    # the shaped link is in the path: the request waits for a reply across it...
    assert request["shaped"] >= RTT_MS, request
    # ...and the guest is not paused across that round trip
    assert pause["shaped"] < request["shaped"], (pause, request)
    print(f"\nreplication link {RTT_MS:.0f} ms RTT, 1% loss: checkpoint request {request['unshaped']:.2f} -> "
          f"{request['shaped']:.2f} ms, pause {pause['unshaped']:.2f} -> {pause['shaped']:.2f} ms (medians); "
          f"cut: the {survivor} serves alone")

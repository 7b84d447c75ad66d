"""Continuous protection: how soon a pair is protected again after a failover, what a lease
costs with etcd against ``emu colo arbiter``, and the client's gap at a failover with etcd.

* Re-protection.  ``emu colo pair`` serving service.elf with 128 MiB and with 256 MiB of
  RAM; its primary is SIGKILLed; the figure is the time from the kill to the supervisor's
  ``protected`` line (the survivor took over, a new secondary started, the survivor
  migrated into it and the pair is in COLO again).  Median of ``RUNS``.
* Leases.  One node's acquire (our arbiter: one JSON line over TCP; etcd: a lease grant and
  a transaction over its HTTP/JSON gateway) and renewal (our arbiter's renew; etcd's
  keepalive), medians over ``LEASE_OPS`` each, against a real 1-node etcd (Debian's
  etcd-server) on loopback.
* Failover gap.  A serial pair (service.elf) with each arbiter, a request every step; the
  longest answer time across a SIGKILL of the primary.  etcd's lease (TTL 1 s) outlives a
  dead holder, so the survivor waits for it to run out.
"""

import os
import pathlib
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
RUNS = 3
LEASE_OPS = 200


def _helpers():
    sys.path.insert(0, str(ROOT / "tests"))
    import colopair
    import etcdcluster

    return colopair, etcdcluster


def reprotect_seconds(cp, memory):
    """Seconds from a primary's SIGKILL to ``emu colo pair`` saying the pair is protected again."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        proxy = cp.Proc(tmp, "proxy", ["colo", "proxy", "--client", "tcp:127.0.0.1:0", "--listen", "tcp:127.0.0.1:0"])
        pair = None
        try:
            vm_port = int(proxy.wait_for(r"VMs on [\d.]+:(\d+)").group(1))
            pair = cp.Proc(tmp, "pair", ["colo", "pair", "-kernel", str(ROOT / "firmware/build/service.elf"),
                                         "-m", memory, "-no-reboot", "--proxy", f"tcp:127.0.0.1:{vm_port}",
                                         "--no-status", "--checkpoint-delay", "200", "--dir", str(tmp / "vms")])
            pair.wait_for(r"protected: primary vm-2 -> secondary vm-1", timeout=120)
            pid = int(pair.wait_for(r"started primary vm-2 \(pid (\d+)\)").group(1))
            killed = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            pair.wait_for(r"protected: primary vm-1 -> secondary vm-3", timeout=180)
            return time.monotonic() - killed
        finally:
            if pair is not None:
                pair.kill(signal.SIGTERM)
                pair.proc.wait(30)
            proxy.kill()


def lease_latencies(cp, ec, tmp):
    """{arbiter: (acquire ms, renew ms)} medians."""
    from colo.arbiter import ArbiterClient
    from colo.etcdarbiter import EtcdArbiterClient, parse_etcd_url

    figures = {}
    arbiter = cp.Proc(tmp, "arbiter", ["colo", "arbiter", "--listen", "tcp:127.0.0.1:0", "--lease", "1000"])
    try:
        port = int(arbiter.wait_for(r"listening on [\d.]+:(\d+)").group(1))
        client = ArbiterClient(("127.0.0.1", port), "bench", "vm-a")
        figures["emu colo arbiter"] = _timed(lambda: client.acquire(bump=True), client.renew)
        client.close()
    finally:
        arbiter.kill()
    cluster = ec.EtcdCluster(tmp, nodes=1)
    try:
        client = EtcdArbiterClient(parse_etcd_url(cluster.url(ttl=5)), "bench", "vm-a")
        client.acquire()

        def fresh_acquire():
            client.release()  # a new lease and the transaction that takes the key
            client.acquire()

        figures["etcd (1 node)"] = _timed(fresh_acquire, client.keep_alive_once)
        client.close()
    finally:
        cluster.close()
    return figures


def _timed(acquire, renew):
    def median_ms(fn):
        times = []
        for _ in range(LEASE_OPS):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    return median_ms(acquire), median_ms(renew)


def failover_gap_ms(cp, tmp, arbiter):
    """The longest answer time (ms) of a request loop across a SIGKILL of the primary."""
    d = cp.ColoDeployment(tmp, mode="compare", checkpoint_delay=50, arbiter=arbiter, records=False)
    try:
        d.wait_colo()
        w = cp.Workload(d.client(), time_every=5)
        w.ready()
        for _ in range(30):
            w.step()
        d.primary.kill()
        longest = 0.0
        for _ in range(60):
            t0 = time.perf_counter()
            w.step()
            longest = max(longest, time.perf_counter() - t0)
        w.finish()
        if not re.search(r"serving alone from checkpoint", d.secondary.stderr()):
            raise RuntimeError("the secondary did not take over")
        return longest * 1e3
    finally:
        d.close()


def run():
    cp, ec = _helpers()
    rows = []
    section = "re-protection: SIGKILL of the primary -> protected again (emu colo pair, service.elf)"
    for memory in ("128M", "256M"):
        runs = sorted(reprotect_seconds(cp, memory) for _ in range(RUNS))
        rows.append({"figure": f"failover to protected again, {memory[:-1]} MiB guest", "unit": "s",
                     "value": statistics.median(runs), "target": "", "section": section,
                     "notes": [f"each run: {', '.join(f'{r:.2f}' for r in runs)} s"]})
    reason = ec.etcd_missing()
    if reason:
        rows.append({"figure": "etcd as the arbiter", "unit": "", "value": None, "target": "",
                     "notes": [f"skipped: {reason}"], "section": "leases"})
        return rows
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="emu-bench-lease-"))
    try:
        for name, (acquire, renew) in lease_latencies(cp, ec, tmp).items():
            rows += [{"figure": f"lease acquisition, {name}", "unit": "ms", "value": acquire, "target": "",
                      "section": "leases (median of 200, loopback)"},
                     {"figure": f"lease renewal, {name}", "unit": "ms", "value": renew, "target": "",
                      "section": "leases (median of 200, loopback)"}]
        (tmp / "gap").mkdir()
        cluster = ec.EtcdCluster(tmp / "gap", nodes=1)
        try:
            for name, arbiter in (("emu colo arbiter", True), ("etcd, lease TTL 1 s", cluster.url(ttl=1))):
                where = tmp / f"pair-{len(rows)}"
                where.mkdir()
                rows.append({"figure": f"client gap at failover, {name}", "unit": "ms",
                             "value": failover_gap_ms(cp, where, arbiter), "target": "",
                             "section": "failover with each arbiter (serial pair, longest answer time)"})
        finally:
            cluster.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    from bench.__main__ import print_rows
    print_rows(run())

"""The networked COLO pair serving HTTP: throughput through the pair against the same guest
alone, the checkpoint pause under that load, and the gap a client sees at a failover.

The pair is ``tests/colonetpair.py``'s: endpoint, secondary and primary of Debian's Linux
in one network namespace, clients (curl, ``tests/netclient.py``) in it too.  "Alone" is
the primary before the pair forms: the same guest, NIC and endpoint, with nothing to
compare.  Requests/s: ``SMALL_REQUESTS`` fetches of a 1 KiB file in one curl process (one
connection, as ``bench/devices.py`` does over a plain tap); MB/s: one ``BIG_MB`` MB file.
The pause figures are the primary's (``query-migrate`` ``x-colo``) and the secondary's
apply time (its per-checkpoint records) over the loaded runs.  The failover gap is the
longest request of a loop of small requests, each on a new connection, across a SIGKILL
of the primary.  The shaped link: the same pair with endpoint, primary and secondary each
in a namespace of its own, the replication link between the VMs given a 5 ms round trip
and 1 % loss each way; the checkpoint's request step (a round trip to the secondary, the
guest running) and the pause, before and after shaping, and the requests/s.  Needs root for
the namespaces; skipped with the reason otherwise.
"""

import json
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
SMALL_REQUESTS = 200
BIG_MB = 50
FAILOVER_RUNS = 3
SETUP = (f"dd if=/dev/urandom of=/srv/small bs=1024 count=1 2>/dev/null; "
         f"dd if=/dev/urandom of=/srv/big bs=1M count={BIG_MB} 2>/dev/null; httpd -p 80 -h /srv")


def _helpers():
    sys.path.insert(0, str(ROOT / "tests"))
    import colonetpair
    import linuxguest

    return colonetpair, linuxguest


def _http_figures(pair, url):
    """(requests/s, MB/s) of host curl against the guest now."""
    args = []
    for _ in range(SMALL_REQUESTS):
        args += ["-o", "/dev/null", f"{url}/small"]
    t0 = time.perf_counter()
    small = pair.curl("--max-time", "120", *args)
    _, err = small.communicate(timeout=180)
    if small.returncode:
        raise RuntimeError(f"curl (small requests) failed: {err.decode()[-300:]}")
    requests_per_s = SMALL_REQUESTS / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    big = pair.curl("--max-time", "300", "-o", "/dev/null", "-w", "%{size_download}", f"{url}/big")
    out, err = big.communicate(timeout=330)
    if big.returncode or int(out) != BIG_MB << 20:
        raise RuntimeError(f"curl (big file) failed ({big.returncode}, {out!r}): {err.decode()[-300:]}")
    return requests_per_s, BIG_MB / (time.perf_counter() - t0)


def _secondary_apply_ms(records_path):
    from colo.report import checkpoints, load_records

    try:
        records = load_records(records_path)
    except (OSError, ValueError):
        return None
    applies = [r["phases"]["apply"] for r in checkpoints(records) if r["status"] == "ok" and "apply" in r["phases"]]
    return statistics.median(applies) if applies else None


def throughput(cp, debian_linux, mode):
    """{figure: value} of one pair: alone first, then protected in ``mode``."""
    with tempfile.TemporaryDirectory() as tmp:
        records = pathlib.Path(tmp) / "secondary-records.json"
        pair = cp.NetPair(tmp, debian_linux, mode=mode, secondary_args=["--records", str(records)])
        try:
            pair.boot(SETUP)
            url = f"http://{cp.GUEST_IP}"
            pair.curl("--max-time", "30", "-o", "/dev/null", f"{url}/small").communicate(timeout=40)  # ARP
            alone = _http_figures(pair, url)
            pair.protect()
            paired = _http_figures(pair, url)
            colo = pair.qmp("primary")("query-migrate")["x-colo"]
            pair.secondary.kill(15)  # SIGTERM: its records are flushed
            status = json.loads((pathlib.Path(tmp) / "proxy.json").read_text())
        finally:
            pair.close()
        return {"alone": alone, "paired": paired, "pause_median": colo["pause-ms-median"],
                "pause_max": colo["pause-ms-max"], "checkpoints": colo["ok"], "triggers": colo["triggers"],
                "apply_median": _secondary_apply_ms(records), "bytes_compared": status.get("bytes_compared")}


def failover_gap(cp, debian_linux, mode):
    """The longest request (ms) of a small-request loop across a primary kill, and the median request."""
    with tempfile.TemporaryDirectory() as tmp:
        pair = cp.NetPair(tmp, debian_linux, mode=mode)
        try:
            pair.boot(SETUP)
            pair.protect()
            loop = pair.client("loop", f"http://{cp.GUEST_IP}/small", "3")
            time.sleep(1.5)
            pair.primary.kill()
            out, err = loop.communicate(timeout=60)
            report = json.loads(out)
            if report["error"] or not pair.took_over():
                raise RuntimeError(f"the loop failed across the kill: {report['error']} {err[-300:]}")
        finally:
            pair.close()
        return report["max_request_s"] * 1000


def _checkpoint_medians(records_path, first, last):
    """Medians (request ms, pause ms) of the checkpoints ``first``..``last`` applied."""
    from colo.report import checkpoints, load_records

    records = [r for r in checkpoints(load_records(records_path)) if r["status"] == "ok" and first <= r["seq"] <= last]
    return (statistics.median(r["phases"]["request"] for r in records),
            statistics.median(r["pause_ms"] for r in records), len(records))


def shaped_link(cp, debian_linux, one_way_ms=2.5, loss_percent=1, checkpoints=20):
    """{figure: value} of a split pair (compare) before and after its replication link is shaped."""
    with tempfile.TemporaryDirectory() as tmp:
        records = pathlib.Path(tmp) / "primary.csv"
        pair = cp.NetPair(tmp, debian_linux, split=True, primary_colo_args=["--records", str(records)])
        try:
            pair.boot(SETUP)
            url = f"http://{cp.GUEST_IP}"
            pair.protect()
            q = pair.qmp("primary")
            figures = {}
            for name in ("unshaped", "shaped"):
                if name == "shaped":
                    pair.net.shape(one_way_ms, loss_percent)
                first = q("query-migrate")["x-colo"]["ok"] + 1
                rps, _ = _http_figures(pair, url)
                deadline = time.monotonic() + 120
                while q("query-migrate")["x-colo"]["ok"] < first + checkpoints:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{name}: fewer than {checkpoints} checkpoints in 120 s")
                    time.sleep(0.1)
                last = q("query-migrate")["x-colo"]["ok"]
                figures[name] = {"rps": rps, "range": (first, last)}
            pair.primary.kill(15)  # SIGTERM: its records are flushed
            pair.primary.proc.wait(30)
        finally:
            pair.close()
        for f in figures.values():
            f["request"], f["pause"], f["count"] = _checkpoint_medians(records, *f["range"])
        return figures


def run():
    cp, lg = _helpers()
    from bench.linux import guest_files

    reason = lg.network_namespaces_available()
    files, note = guest_files()
    if reason or files is None:
        return [{"figure": "networked COLO pair", "unit": "", "value": None, "target": "",
                 "notes": [f"skipped: {reason or note}"]}]
    rows = []
    for mode in ("compare", "passive"):
        f = throughput(cp, files, mode)
        (alone_rps, alone_mbs), (rps, mbs) = f["alone"], f["paired"]
        section = f"HTTP through the pair ({mode}), 200 ms checkpoint delay"
        triggers = ", ".join(f"{k} {v}" for k, v in sorted(f["triggers"].items()))
        rows += [
            {"figure": "requests/s, 1 KiB file, alone", "unit": "req/s", "value": alone_rps, "target": ""},
            {"figure": "requests/s, 1 KiB file, through the pair", "unit": "req/s", "value": rps,
             "target": ">= 50 % of alone" if mode == "compare" else "",
             "notes": [f"{100 * rps / alone_rps:.0f} % of alone"]},
            {"figure": f"MB/s, {BIG_MB} MB file, alone", "unit": "MB/s", "value": alone_mbs, "target": ""},
            {"figure": f"MB/s, {BIG_MB} MB file, through the pair", "unit": "MB/s", "value": mbs, "target": "",
             "notes": [f"{100 * mbs / alone_mbs:.0f} % of alone"]},
            {"figure": "checkpoint pause under load, median", "unit": "ms", "value": f["pause_median"],
             "target": "<= 5 ms", "notes": [f"{f['checkpoints']} checkpoints ({triggers})"]},
            {"figure": "checkpoint pause under load, max", "unit": "ms", "value": f["pause_max"], "target": ""},
            {"figure": "secondary's apply time, median", "unit": "ms", "value": f["apply_median"], "target": ""},
        ]
        for row in rows[-7:]:
            row["section"] = section
        gaps = sorted(failover_gap(cp, files, mode) for _ in range(FAILOVER_RUNS))
        rows.append({"figure": f"client-visible failover gap ({mode}), median of {FAILOVER_RUNS}", "unit": "ms",
                     "value": gaps[len(gaps) // 2], "target": "<= 300 ms",
                     "notes": [f"each run: {', '.join(f'{g:.0f}' for g in gaps)} ms (the longest request of a "
                               f"loop across the kill)"], "section": section})
    f = shaped_link(cp, files)
    u, s = f["unshaped"], f["shaped"]
    section = "replication link shaped: 5 ms round trip, 1 % loss each way (compare, VMs in namespaces of their own)"
    rows += [
        {"figure": "checkpoint request (round trip to the secondary), median", "unit": "ms", "value": s["request"],
         "target": "", "notes": [f"unshaped {u['request']:.2f} ms; {s['count']} checkpoints shaped"]},
        {"figure": "checkpoint pause, shaped link, median", "unit": "ms", "value": s["pause"], "target": "<= 5 ms",
         "notes": [f"unshaped {u['pause']:.2f} ms: the guest runs while the request goes round"]},
        {"figure": "requests/s, 1 KiB file, shaped link", "unit": "req/s", "value": s["rps"], "target": "",
         "notes": [f"unshaped {u['rps']:.1f} req/s"]},
    ]
    for row in rows[-3:]:
        row["section"] = section
    return rows

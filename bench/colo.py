"""COLO: checkpoint pause, guest throughput under COLO, and failover time.

Every figure runs real ``emu colo`` processes on loopback, as a deployment would:

* Checkpoint pause.  A 128 MiB dirty.elf guest (300 pages written per 200 ms) as primary and
  secondary, ``--checkpoint-delay 200``, for a few seconds, once with the secondary running
  (COLO's compare mode) and once with it stopped between checkpoints (``--passive``).  The
  figures come from the primary's per-checkpoint records (colo.report).  QEMU 7.2's COLO
  pauses 91 ms (median) on a machine like ours; under TCG it deadlocks at the first
  checkpoint, so it is not run here.
* Guest throughput.  compute.elf (CPU-bound, writes almost no memory) alone and as a COLO
  primary, with its secondary running (compare mode: the guest runs twice, on this host's
  CPUs) and stopped (passive: only the checkpoints cost); each measured as two runs of
  different length, whose difference cancels start-up and, for COLO, the migration that
  starts the pair.
* Latency.  service.elf answering one request at a time: alone, and through the client
  endpoint as a compare pair (identical answers; every 7th answer different, NODE) and as
  a passive pair; with checkpoints per minute.
* Failover.  A whole deployment (arbiter, proxy, secondary, primary) serving service.elf with
  the default heartbeat settings; a client sends a line every 10 ms while the primary is
  killed (SIGKILL).  Figures: the proxy's ``failover_ms`` (the primary's link closed ->
  the secondary's TAKEOVER accepted) and the longest gap between two answers the client saw.

``run()`` returns the rows (``section`` groups them, ``notes`` explain a missed target);
``python -m bench.colo`` prints them.
"""

import itertools
import json
import os
import pathlib
import re
import resource
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
FW = ROOT / "firmware" / "build"
HOST = "127.0.0.1"

CHECKPOINT_DELAY_MS = 200
PAUSE_RUN_S = 6.0
PAUSE_TARGET_MS = 5.0
QEMU_PAUSE_MS = 91.0
DIRTY_PAGES_PER_DELAY = 300      # dirty.elf's default: 15 pages per 100 Hz tick
OUTSIDE_PAUSE = ("request", "loaded")  # primary phases before the stop and after the resume
COMPUTE_INSNS_PER_ITER = 12      # firmware/README.md
COMPUTE_SMALL, COMPUTE_LARGE = 100_000_000, 1_500_000_000
THROUGHPUT_TARGET_PCT = 85
FAILOVER_RUNS = 5
FAILOVER_TARGET_MS = 300.0
PING_PERIOD_S = 0.01
START_TIMEOUT_S = 20.0


class Proc:
    """One ``python -m emu ARGS`` process; its stderr goes to a file that can be waited on."""

    def __init__(self, tmp, name, args):
        self.name = name
        self.err_path = pathlib.Path(tmp) / f"{name}.err"
        with open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "emu", *args], cwd=ROOT, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err)
        self.pid = self.proc.pid

    def stderr(self):
        return self.err_path.read_text(errors="replace")

    def alive(self):
        return self.proc.poll() is None

    def wait_for(self, pattern, timeout=START_TIMEOUT_S):
        """The first match of ``pattern`` in stderr; fails with the log if the process dies first."""
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.stderr())
            if m:
                return m
            if not self.alive():
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}) before printing {pattern!r}: "
                                   f"{self.stderr()[-400:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: no {pattern!r} within {timeout:.0f} s: {self.stderr()[-400:]}")
            time.sleep(0.01)

    def stop(self, sig=signal.SIGTERM, timeout=10.0):
        """Send ``sig`` and reap; SIGKILL if it is still there after ``timeout`` s."""
        if self.alive():
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Processes:
    """The processes of one measurement: leaving the ``with`` block kills whatever still runs,
    so that no failure (or Ctrl-C) leaves an emulator behind."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.procs = []

    def start(self, name, *args):
        proc = Proc(self.tmp, name, args)
        self.procs.append(proc)
        return proc

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        for proc in reversed(self.procs):
            proc.stop(signal.SIGKILL)
        if exc_type is RuntimeError:  # a measurement failed: say where each process was
            lasts = "; ".join(f"{p.name}: {(p.stderr().strip().splitlines() or ['(nothing)'])[-1]}"
                              for p in self.procs)
            raise RuntimeError(f"{exc} [last log lines: {lasts}]") from exc


def _median(values):
    return statistics.median(values) if values else None


# --- 1. checkpoint pause ---------------------------------------------------------------------

def checkpoint_records(tmp, passive, seconds=PAUSE_RUN_S):
    """The primary's records of a dirty.elf pair left to checkpoint for ``seconds``."""
    from colo.report import load_records

    records = pathlib.Path(tmp) / f"{'passive' if passive else 'compare'}.json"
    guest = ["-kernel", str(FW / "dirty.elf"), "-m", "128M", "-serial", "null", "--no-status"]
    with Processes(tmp) as ps:
        sec = ps.start("secondary", "colo", "secondary", *guest, "--listen", f"tcp:{HOST}:0",
                       *(["--passive"] if passive else []))
        port = sec.wait_for(r"waiting for the primary on tcp:[\d.]+:(\d+)").group(1)
        pri = ps.start("primary", "colo", "primary", *guest, "--secondary", f"tcp:{HOST}:{port}",
                       "--checkpoint-delay", str(CHECKPOINT_DELAY_MS), "--records", str(records))
        pri.wait_for(r"colo primary: migrating to")
        time.sleep(seconds)  # the measurement window
        if not pri.alive() or not sec.alive():
            raise RuntimeError(f"the pair did not last {seconds:.0f} s: primary: {pri.stderr()[-300:]} "
                               f"secondary: {sec.stderr()[-300:]}")
        pri.stop(signal.SIGTERM)  # SIGTERM: the records are flushed
        sec.stop(signal.SIGTERM)
    return load_records(records)


def pause_rows(label, records):
    from colo.report import checkpoints, summarize

    s = summarize(records)
    ok = [r for r in checkpoints(records) if r["status"] == "ok"]
    if len(ok) < 2:
        raise RuntimeError(f"{label}: only {len(ok)} checkpoint(s) completed ({s['by_status']})")
    per_s = (len(ok) - 1) / max(ok[-1]["time"] - ok[0]["time"], 1e-9)
    pause, pages = s["pause_ms"], s["pages"]["median"]
    section = f"checkpoint pause, 128 MiB dirty.elf, {CHECKPOINT_DELAY_MS} ms delay, {label}"
    rows = [
        {"figure": "pause (primary stop to resume), median", "unit": "ms", "value": pause["median"],
         "target": f"<= {PAUSE_TARGET_MS:g} ms (QEMU 7.2: {QEMU_PAUSE_MS:g} ms)"},
        {"figure": "pause, p90", "unit": "ms", "value": pause["p90"], "target": ""},
        {"figure": "pause, max", "unit": "ms", "value": pause["max"], "target": ""},
        {"figure": "dirty pages per checkpoint, median", "unit": "pages", "value": pages,
         "target": f"~{DIRTY_PAGES_PER_DELAY} (what the guest writes)"},
        {"figure": "secondary pause, median", "unit": "ms", "value": s["secondary_pause_ms"]["median"],
         "target": ""},
        {"figure": "checkpoints per second", "unit": "/s", "value": per_s,
         "target": f"~{1000 / CHECKPOINT_DELAY_MS:g} (delay + transaction)"},
    ]
    for row in rows:
        row["section"] = section
    if pause["median"] > PAUSE_TARGET_MS:
        names = [name for name in ok[-1]["phases"] if name not in OUTSIDE_PAUSE]
        parts = ", ".join(f"{name} {_median([r['phases'][name] for r in ok if name in r['phases']]):.1f}"
                          for name in names)
        rows[0]["notes"] = [f"misses the target; median phases of the pause (ms): {parts} ('received': waiting "
                            f"for the secondary to take and check the checkpoint; both are Python processes on "
                            f"this host)"]
    if pages is not None and pages < DIRTY_PAGES_PER_DELAY / 3:
        rows[3]["notes"] = ["the guest barely ran between checkpoints (its 100 Hz timer writes 15 pages a tick); "
                            "likely reason: guest time does not flow again after a checkpoint's stop/cont inside "
                            "the run loop, so the timer never fires"]
    return rows


def checkpoint_figures():
    rows = []
    for passive, label in ((False, "compare (COLO)"), (True, "passive")):
        with tempfile.TemporaryDirectory() as tmp:
            rows += pause_rows(label, checkpoint_records(tmp, passive))
    rows[0].setdefault("notes", []).append(
        f"QEMU 7.2's COLO pauses {QEMU_PAUSE_MS:g} ms (median) on a machine like ours; under TCG it deadlocks at "
        f"the first checkpoint, so it is not run here")
    return rows


# --- 2. throughput under COLO ------------------------------------------------------------------

def _compute_args(n):
    return ["-kernel", str(FW / "compute.elf"), "-append", f"n={n}", "-m", "64M", "-serial", "null",
            "-no-reboot"]


def _timed(proc, timeout):
    """(wall seconds, CPU seconds) of ``proc`` from now until it exits with the guest's success
    status (1), or None after ``timeout``.  The CPU time is what the children reaped meanwhile
    used: only ``proc`` (the secondary of a pair is reaped later)."""
    t0, cpu0 = time.perf_counter(), _children_cpu()
    try:
        rc = proc.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None
    if rc != 1:
        raise RuntimeError(f"{proc.name} exited {rc}: {proc.stderr()[-300:]}")
    return time.perf_counter() - t0, _children_cpu() - cpu0


def _children_cpu():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def compute_alone(tmp, n):
    """(wall s, CPU s, paused s) of ``emu run`` compute.elf n=N."""
    with Processes(tmp) as ps:
        wall, cpu = _timed(ps.start("alone", "run", *_compute_args(n)), 120)
    return wall, cpu, 0.0


def compute_colo(tmp, n, timeout, passive=False):
    """(wall s, CPU s, paused s) of the COLO primary from its start to the guest's exit (the
    secondary is ready before the clock starts), or None if it takes more than ``timeout``."""
    from colo.report import checkpoints, load_records

    records = pathlib.Path(tmp) / f"compute-{n}.json"
    with Processes(tmp) as ps:
        sec = ps.start("secondary", "colo", "secondary", *_compute_args(n), "--listen", f"tcp:{HOST}:0",
                       "--no-status", *(["--passive"] if passive else []))
        port = sec.wait_for(r"waiting for the primary on tcp:[\d.]+:(\d+)").group(1)
        pri = ps.start("primary", "colo", "primary", *_compute_args(n), "--secondary", f"tcp:{HOST}:{port}",
                       "--checkpoint-delay", str(CHECKPOINT_DELAY_MS), "--no-status", "--records", str(records))
        timed = _timed(pri, timeout)
    if timed is None:
        return None
    return *timed, sum(r["pause_ms"] for r in checkpoints(load_records(records))) / 1e3


def throughput_figures(repeat=2):
    """Each point is the best of ``repeat`` runs (other work on the host only ever adds time),
    the runs interleaved; a figure is the difference between the long and the short run.  The
    passive pair shows what the checkpoints alone cost: its secondary does not compete with
    the primary for a CPU."""
    section = f"guest throughput, compute.elf, alone vs COLO primary ({CHECKPOINT_DELAY_MS} ms delay)"
    target = f">= {THROUGHPUT_TARGET_PCT:g} %"
    work = (COMPUTE_LARGE - COMPUTE_SMALL) * COMPUTE_INSNS_PER_ITER / 1e6
    kinds = ("alone", "compare", "passive")
    runs = {(kind, n): [] for kind in kinds for n in (COMPUTE_SMALL, COMPUTE_LARGE)}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeat):
            for n in (COMPUTE_SMALL, COMPUTE_LARGE):
                alone = compute_alone(tmp, n)
                runs["alone", n].append(alone)
                limit = 3 * alone[0] + 5
                for kind in kinds[1:]:
                    run = compute_colo(tmp, n, limit, passive=kind == "passive")
                    if run is None:
                        return [{"section": section, "figure": f"throughput under COLO ({kind}) / alone",
                                 "unit": "%", "value": None, "target": target,
                                 "notes": [f"the COLO primary did not finish n={n} within {limit:.0f} s (alone: "
                                           f"{alone[0]:.1f} s): the guest barely progresses under COLO"]}]
                    runs[kind, n].append(run)
    best = {key: min(values) for key, values in runs.items()}
    # per kind: (wall s, CPU s, paused s) of the extra work of the long run
    extra = {kind: [max(a - b, 1e-6) for a, b in zip(best[kind, COMPUTE_LARGE], best[kind, COMPUTE_SMALL],
                                                      strict=True)]
             for kind in kinds}
    rows = [{"figure": "compute alone", "unit": "MIPS", "value": work / extra["alone"][0], "target": ""}]
    for kind, mode in (("compare", "secondary running (COLO)"), ("passive", "secondary stopped (passive)")):
        wall, cpu, paused = extra[kind]
        ratio = 100 * extra["alone"][0] / wall
        rows.append({"figure": f"compute as COLO primary, {mode}", "unit": "MIPS", "value": work / wall,
                     "target": ""})
        rows.append({"figure": f"  throughput / alone ({kind})", "unit": "%", "value": ratio,
                     "target": target if kind == "compare" else "(no CPU shared with the secondary)"})
        if ratio < THROUGHPUT_TARGET_PCT:
            rows[-1]["notes"] = [
                f"below {THROUGHPUT_TARGET_PCT:g} %: checkpoint pauses take {100 * paused / wall:.0f} % of the "
                f"extra run time and the primary used {cpu / extra['alone'][1]:.2f}x the CPU time of the guest "
                f"alone; the rest is waiting for a CPU" + (", which the secondary running the guest too competes "
                                                            "for" if kind == "compare" else "") +
                f" (host: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f})"]
        elif ratio > 105:
            rows[-1]["notes"] = [f"above 100 %: other work on the host slowed the runs alone more than these "
                                 f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs); the ratios "
                                 f"are only as steady as the host"]
    for row in rows:
        row["section"] = section
    return rows


# --- 3. failover -------------------------------------------------------------------------------

def proxy_status(vm_port):
    """The proxy's STATUS figures, asked as a monitor on its VM listener (colo/proxywire.py)."""
    from colo import proxywire as pw

    with socket.create_connection((HOST, vm_port), timeout=5) as sock:
        sock.sendall(pw.hello("monitor") + pw.frame(pw.STATUS))
        reader = pw.frame_reader()
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError("proxy: closed the monitor connection without answering STATUS")
            reader.feed(chunk)
            for kind, payload in reader.frames():
                if kind == pw.STATUS:
                    return json.loads(payload)


def wait_paired(vm_port, timeout=START_TIMEOUT_S):
    """Until the proxy compares the pair's output and a periodic checkpoint has been applied."""
    deadline = time.monotonic() + timeout
    while True:
        status = proxy_status(vm_port)
        if status["mode"] == "paired" and (status["last_sync_seq"] or 0) >= 1:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the pair completed no checkpoint within {timeout:.0f} s (proxy: {status})")
        time.sleep(0.02)


ANSWER = re.compile(rb"(\d+) [0-9a-f]{8} p(\d+)\r\n")


def ping_through(sock, kill, before=0.5, after=0.5, timeout=10.0):
    """Send ``p<i>`` every 10 ms; call ``kill()`` after ``before`` s; stop ``after`` s past the
    first answer after it.  Returns (longest gap between answers from the last one before the
    kill on, in s; whether every line was answered once, in order, with the right counter)."""
    buf = b""
    answers = []  # (arrival time, counter, i)
    sent = 0
    start = next_send = time.monotonic()
    killed_at = answered_after = None
    while True:
        now = time.monotonic()
        if now >= next_send:
            sock.sendall(f"p{sent}\r".encode())
            sent += 1
            next_send = max(next_send + PING_PERIOD_S, now)
        if killed_at is None and now - start >= before:
            kill()
            killed_at = time.monotonic()
        if killed_at is not None:
            if answered_after is None and answers and answers[-1][0] > killed_at:
                answered_after = answers[-1][0]
            if answered_after is not None and now - answered_after >= after:
                break
            if answered_after is None and now - killed_at > timeout:
                raise RuntimeError(f"no answer within {timeout:.0f} s of the kill")
        readable, _, _ = select.select([sock], [], [], max(0.0, next_send - time.monotonic()))
        if readable:
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError("the proxy closed the client connection")
            t = time.monotonic()
            buf += chunk
            for m in ANSWER.finditer(buf):
                answers.append((t, int(m.group(1)), int(m.group(2))))
            buf = buf[buf.rfind(b"\n") + 1:]
    times = [t for t, _, _ in answers]
    before_kill = [t for t in times if t <= killed_at]
    around = ([before_kill[-1]] if before_kill else [killed_at]) + [t for t in times if t > killed_at]
    gap = max(b - a for a, b in itertools.pairwise(around))
    in_order = all(n == i + 1 and i == k for k, (_, n, i) in enumerate(answers))
    return gap, in_order


def failover_once(tmp):
    """(proxy failover_ms, client gap ms, secondary's own failover ms or None, answers in order)."""
    service = str(FW / "service.elf")
    with Processes(tmp) as ps:
        arbiter = ps.start("arbiter", "colo", "arbiter", "--listen", f"tcp:{HOST}:0")
        proxy = ps.start("proxy", "colo", "proxy", "--client", f"tcp:{HOST}:0", "--listen", f"tcp:{HOST}:0")
        arbiter_port = arbiter.wait_for(r"listening on [\d.]+:(\d+)").group(1)
        m = proxy.wait_for(r"client on [\d.]+:(\d+), VMs on [\d.]+:(\d+)")
        client_port, vm_port = int(m.group(1)), int(m.group(2))
        common = ["-kernel", service, "-m", "32M", "-no-reboot", "--no-status", "--proxy", f"tcp:{HOST}:{vm_port}",
                  "--arbiter", f"tcp:{HOST}:{arbiter_port}"]
        sec = ps.start("secondary", "colo", "secondary", *common, "--listen", f"tcp:{HOST}:0")
        port = sec.wait_for(r"waiting for the primary on tcp:[\d.]+:(\d+)").group(1)
        pri = ps.start("primary", "colo", "primary", *common, "--secondary", f"tcp:{HOST}:{port}")
        wait_paired(vm_port)
        with socket.create_connection((HOST, client_port), timeout=5) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            greeting = b""
            while b"service ready\r\n" not in greeting:
                chunk = sock.recv(4096)
                if not chunk:
                    raise RuntimeError(f"the proxy closed the client connection; received {greeting!r}")
                greeting += chunk
            gap, in_order = ping_through(sock, lambda: os.kill(pri.pid, signal.SIGKILL))
        status = proxy_status(vm_port)
        if status["mode"] != "solo" or status["active"] != "secondary" or status["failover_ms"] is None:
            raise RuntimeError(f"after the kill the proxy is {status['mode']} with {status['active']} active, "
                               f"not serving the secondary alone: {proxy.stderr()[-400:]}")
        own = re.search(r"failover took ([\d.]+) ms", sec.stderr())
        return status["failover_ms"], gap * 1e3, float(own.group(1)) if own else None, in_order


def failover_figures(runs=FAILOVER_RUNS):
    results = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            results.append(failover_once(tmp))
    proxy_ms = [r[0] for r in results]
    gaps = [r[1] for r in results]
    own = [r[2] for r in results if r[2] is not None]
    target = f"<= {FAILOVER_TARGET_MS:g} ms"
    section = f"failover, service.elf, SIGKILL of the primary, default heartbeat ({runs} runs)"
    rows = [
        {"figure": "primary lost -> TAKEOVER accepted (proxy), median", "unit": "ms", "value": _median(proxy_ms),
         "target": target},
        {"figure": "primary lost -> TAKEOVER accepted (proxy), max", "unit": "ms", "value": max(proxy_ms),
         "target": target},
        {"figure": "secondary: peer lost -> serving, median", "unit": "ms", "value": _median(own), "target": ""},
        {"figure": "client-visible gap (a line every 10 ms), median", "unit": "ms", "value": _median(gaps),
         "target": target},
        {"figure": "client-visible gap, max", "unit": "ms", "value": max(gaps), "target": target},
    ]
    for row in rows:
        row["section"] = section
    rows[0]["notes"] = ["SIGKILL lets the kernel close the primary's sockets, so its loss is seen at once; a host "
                        "that vanishes (power, network) is noticed only after the 1000 ms heartbeat timeout"]
    slow = [row for row in rows if row["target"] and row["value"] > FAILOVER_TARGET_MS]
    if slow:
        slow[0].setdefault("notes", []).append(
            "misses the target; the kill closes the primary's sockets, so the secondary should notice at once: a "
            "figure near the 1000 ms heartbeat timeout means it waited for silence instead (or for the arbiter's "
            "lease)")
    if not all(r[3] for r in results):
        rows[-1].setdefault("notes", []).append(
            "the client's lines were not all answered once, in order, across the failover")
    return rows


# --- 4. latency added by the pair ------------------------------------------------------------------

LATENCY_REQUESTS = 150
LATENCY_PACE_S = 0.01
NODE_FILE = "name=opt/emu-colo/node,string="


def _read_line(sock, buf):
    while b"\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("the service's connection closed")
        buf += chunk
    line, _, rest = buf.partition(b"\r\n")
    return line, rest


def request_latencies(port, node_every=0, n=LATENCY_REQUESTS):
    """One request at a time (every ``node_every``-th a NODE, answered differently by the
    two VMs), a new one every 10 ms at most; the answer times in ms and the wall time."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            sock = socket.create_connection((HOST, port), timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"cannot connect to the service on port {port}") from None
            time.sleep(0.05)
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = b""
        while True:
            line, buf = _read_line(sock, buf)
            if line == b"service ready":
                break
        times = []
        started = time.monotonic()
        for i in range(n):
            request = b"NODE" if node_every and i % node_every == node_every - 1 else b"req %d" % i
            t0 = time.monotonic()
            sock.sendall(request + b"\r")
            line, buf = _read_line(sock, buf)
            times.append((time.monotonic() - t0) * 1e3)
            if not line.startswith(b"%d " % (i + 1)):
                raise RuntimeError(f"request {i + 1}: unexpected answer {line!r}")
            time.sleep(max(0.0, LATENCY_PACE_S - (time.monotonic() - t0)))
        return times, time.monotonic() - started


def latency_alone(tmp):
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port = probe.getsockname()[1]
    with Processes(tmp) as ps:
        ps.start("alone", "run", "-kernel", str(FW / "service.elf"), "-m", "32M", "-no-reboot",
                 "-serial", f"tcp:{HOST}:{port},server")  # waits for the client: nothing printed is lost
        times, _ = request_latencies(port)
    return times, None


def latency_pair(tmp, mode, node_every):
    service = str(FW / "service.elf")
    with Processes(tmp) as ps:
        proxy = ps.start("proxy", "colo", "proxy", "--client", f"tcp:{HOST}:0", "--listen", f"tcp:{HOST}:0")
        m = proxy.wait_for(r"client on [\d.]+:(\d+), VMs on [\d.]+:(\d+)")
        client_port, vm_port = int(m.group(1)), int(m.group(2))
        common = ["-kernel", service, "-m", "32M", "-no-reboot", "--no-status", "--proxy", f"tcp:{HOST}:{vm_port}"]
        passive = ["--passive"] if mode == "passive" else []
        sec = ps.start("secondary", "colo", "secondary", *common, "--listen", f"tcp:{HOST}:0", *passive,
                       "-fw_cfg", NODE_FILE + "vm-b")
        port = sec.wait_for(r"waiting for the primary on tcp:[\d.]+:(\d+)").group(1)
        ps.start("primary", "colo", "primary", *common, "--secondary", f"tcp:{HOST}:{port}",
                 "--checkpoint-delay", str(CHECKPOINT_DELAY_MS), "-fw_cfg", NODE_FILE + "vm-a")
        wait_paired(vm_port)
        before = proxy_status(vm_port)["syncs"]
        times, wall = request_latencies(client_port, node_every)
        status = proxy_status(vm_port)
    return times, {"per_minute": (status["syncs"] - before) / wall * 60, "mismatches": status["mismatches"]}


def latency_figures():
    runs = [("alone (emu run, -serial tcp)", lambda tmp: latency_alone(tmp)),
            ("COLO compare, identical answers", lambda tmp: latency_pair(tmp, "compare", 0)),
            ("COLO compare, every 7th answer differs (NODE)", lambda tmp: latency_pair(tmp, "compare", 7)),
            ("COLO passive (output commit per answer)", lambda tmp: latency_pair(tmp, "passive", 0))]
    section = (f"service.elf request latency, {LATENCY_REQUESTS} requests, one every 10 ms at most, "
               f"checkpoint every {CHECKPOINT_DELAY_MS} ms")
    rows, alone = [], None
    for label, measure in runs:
        with tempfile.TemporaryDirectory() as tmp:
            times, extra = measure(tmp)
        median = _median(times)
        alone = median if alone is None else alone
        p90 = sorted(times)[int(len(times) * 0.9)]
        added = "" if extra is None else f", {median - alone:+.2f} ms on alone"
        rows.append({"figure": f"{label}: median (p90 {p90:.1f} ms{added})", "unit": "ms", "value": median,
                     "target": ""})
        if extra is not None:
            rows.append({"figure": f"  checkpoints per minute ({extra['mismatches']} mismatches)", "unit": "/min",
                         "value": extra["per_minute"], "target": ""})
    for row in rows:
        row["section"] = section
    return rows


# --- all ---------------------------------------------------------------------------------------

GROUPS = (("checkpoint pause", checkpoint_figures), ("throughput", throughput_figures),
          ("failover", failover_figures), ("latency", latency_figures))


def run():
    rows = []
    for name, figures in GROUPS:
        try:
            rows += figures()
        except Exception as e:  # a failing group is reported, the others still run
            rows.append({"section": name, "figure": f"{name}: failed", "unit": "", "value": None, "target": "",
                         "notes": [str(e)]})
    return rows


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    from bench.__main__ import print_rows

    print_rows(run())

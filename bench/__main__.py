"""``make bench``: the machine core's figures, with QEMU TCG beside them when installed.

Each throughput figure runs the same firmware twice with a small and a large amount of
work and divides the difference in work by the difference in wall time, so that process
start-up (Python imports, QEMU's BIOS) cancels out.  Prints a table and writes
``bench/results/core.json``.
"""

import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
FW = ROOT / "firmware" / "build"
RESULTS = ROOT / "bench" / "results"
QEMU = shutil.which("qemu-system-x86_64")

COMPUTE_INSNS_PER_ITER = 12  # see firmware/README.md
STORE_BYTES_PER_PASS = 16 << 20
PORTIO_EXITS_PER_ITER = 1


def emu_cmd(kernel, append="", serial="null"):
    return [sys.executable, "-m", "emu", "run", "-m", "64M", "-kernel", str(kernel), "-append", append,
            "-serial", serial, "-no-reboot"]


def qemu_cmd(kernel, append="", serial="null"):
    return [QEMU, "-machine", "pc", "-accel", "tcg", "-m", "64M", "-nodefaults", "-nographic", "-no-reboot",
            "-display", "none", "-monitor", "none", "-serial", serial,
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-kernel", str(kernel), "-append", append]


def wall(cmd, repeat=3):
    """Best wall time of ``repeat`` runs (the guest must exit through isa-debug-exit)."""
    best = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = subprocess.run(cmd, capture_output=True, cwd=ROOT, timeout=600)
        dt = time.perf_counter() - t0
        if result.returncode != 1:
            raise RuntimeError(f"{' '.join(map(str, cmd))} exited {result.returncode}: {result.stderr[-300:]!r}")
        best = dt if best is None else min(best, dt)
    return best


def rate(make_cmd, kernel, key, small, large, unit_per_step):
    """Work units per second from the wall-time difference of two runs."""
    t_small = wall(make_cmd(kernel, f"{key}={small}"))
    t_large = wall(make_cmd(kernel, f"{key}={large}"))
    return (large - small) * unit_per_step / max(t_large - t_small, 1e-6)


def hello_in_process(runs=10):
    """Machine creation + boot-to-exit of hello.elf inside one Python process (imports excluded)."""
    from machines import pc

    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        machine = pc.build(kernel=str(FW / "hello.elf"), serial=["null"], no_reboot=True)
        status = machine.run()
        machine.close()
        times.append(time.perf_counter() - t0)
        assert status == 1, status
    return statistics.median(times)


def serial_rate(make_cmd, n_small, n_large):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "serial.out")
        t_small = wall(make_cmd(FW / "serialout.elf", f"bytes={n_small}", f"file:{out}"))
        t_large = wall(make_cmd(FW / "serialout.elf", f"bytes={n_large}", f"file:{out}"))
        size = os.path.getsize(out)
        if size < n_large:
            raise RuntimeError(f"serial output {size} bytes, expected {n_large}")
    return (n_large - n_small) / max(t_large - t_small, 1e-6)


def idle_cpu_percent(ticks=200):
    from machines import pc

    machine = pc.build(kernel=str(FW / "idle.elf"), append=f"ticks={ticks}", serial=["null"], no_reboot=True)
    c0, t0 = time.process_time(), time.perf_counter()
    machine.run()
    c1, t1 = time.process_time(), time.perf_counter()
    machine.close()
    return 100.0 * (c1 - c0) / (t1 - t0)


def measure(name, fn):
    try:
        return fn()
    except Exception as e:  # a failing figure is reported, the others still run
        print(f"  {name}: failed: {e}", file=sys.stderr)
        return None


FIGURES = [
    # name, unit, emu function, qemu function, target text, higher is better
    ("hello boot-to-exit (in process)", "ms", lambda: hello_in_process() * 1e3, None, "<= 200 ms median", False),
    ("hello boot-to-exit (whole process)", "ms", lambda: wall(emu_cmd(FW / "hello.elf"), 5) * 1e3,
     lambda: wall(qemu_cmd(FW / "hello.elf"), 5) * 1e3, "<= 120 ms", False),
    ("compute loop", "MIPS",
     lambda: rate(emu_cmd, FW / "compute.elf", "n", 1_000_000, 100_000_000, COMPUTE_INSNS_PER_ITER) / 1e6,
     lambda: rate(qemu_cmd, FW / "compute.elf", "n", 1_000_000, 100_000_000, COMPUTE_INSNS_PER_ITER) / 1e6,
     ">= 0.5x QEMU", True),
    ("store loop", "MB/s",
     lambda: rate(emu_cmd, FW / "store.elf", "passes", 2, 40, STORE_BYTES_PER_PASS) / 1e6,
     lambda: rate(qemu_cmd, FW / "store.elf", "passes", 2, 40, STORE_BYTES_PER_PASS) / 1e6,
     ">= 0.5x QEMU", True),
    ("port I/O exits (port 0x80)", "M/s",
     lambda: rate(emu_cmd, FW / "portio.elf", "n", 1_000_000, 50_000_000, PORTIO_EXITS_PER_ITER) / 1e6,
     lambda: rate(qemu_cmd, FW / "portio.elf", "n", 1_000_000, 20_000_000, PORTIO_EXITS_PER_ITER) / 1e6,
     ">= 10 M/s", True),
    ("serial output to a file", "MB/s",
     lambda: serial_rate(emu_cmd, 100_000, 20_000_000) / 1e6,
     lambda: serial_rate(qemu_cmd, 100_000, 2_000_000) / 1e6, ">= 2x QEMU", True),
    ("idle guest (100 Hz timer) host CPU", "%", lambda: idle_cpu_percent(), None, "< 5%", False),
]


def print_rows(rows):
    """Rows of a group: a heading where ``section`` changes, ``notes`` under their row."""
    section = None
    for row in rows:
        if row.get("section") and row["section"] != section:
            section = row["section"]
            print(f"  {section}:")
        value = "-" if row.get("value") is None else f"{row['value']:,.2f}"
        print(f"  {row['figure']:48s} {value:>12s} {row['unit']:5s} target {row.get('target', '')}", flush=True)
        for note in row.get("notes", ()):
            print(f"      note: {note}", flush=True)


def main():
    RESULTS.mkdir(parents=True, exist_ok=True)
    print(f"emu-colo machine core benchmarks ({'QEMU ' + QEMU if QEMU else 'QEMU not installed'})")
    rows = []
    for name, unit, emu_fn, qemu_fn, target, _higher in FIGURES:
        ours = measure(name, emu_fn)
        theirs = measure(name, qemu_fn) if (qemu_fn and QEMU) else None
        ratio = (ours / theirs) if (ours and theirs) else None
        rows.append({"figure": name, "unit": unit, "emu": ours, "qemu": theirs, "ratio": ratio, "target": target})
        fmt = lambda v: "-" if v is None else f"{v:,.2f}"
        print(f"  {name:38s} {fmt(ours):>12s} {unit:5s} qemu {fmt(theirs):>12s}  "
              f"ratio {fmt(ratio):>6s}  target {target}", flush=True)
    (RESULTS / "core.json").write_text(json.dumps({"time": time.time(), "figures": rows}, indent=2))
    print(f"wrote {RESULTS / 'core.json'}")
    for title, module in (("save helpers", "bench.state"), ("live migration", "bench.migration"),
                          ("COLO", "bench.colo"), ("Linux boot", "bench.linux"),
                          ("virtio NIC and disk", "bench.devices"), ("networked COLO pair", "bench.colonet"),
                          ("continuous protection", "bench.coloreprotect")):
        print(f"emu-colo {title}")
        try:
            extra = __import__(module, fromlist=["run"]).run()
        except Exception as e:  # one failing group does not hide the others
            print(f"  failed: {e}", file=sys.stderr)
            continue
        print_rows(extra)
        name = module.split(".")[1]
        (RESULTS / f"{name}.json").write_text(json.dumps({"time": time.time(), "figures": extra}, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()

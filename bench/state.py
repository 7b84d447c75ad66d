"""State benchmarks: whole-machine save and load, and what the dirty log costs.

Figures, with the targets of the issue:

* save and load time and stream size of a 64 MiB and a 256 MiB ``pc`` machine, (a) mostly
  untouched (hello.elf has run) and (b) every byte of RAM dirtied with random data.  The
  stream carries all of RAM (``ram_pages="all"``) and stays in memory (bytes); it is
  loaded into a fresh machine of the same configuration.  Target: at most half of QEMU
  7.2's savevm / loadvm on a machine like ours, which takes about 0.10 s / 0.10 s at
  64 MiB and 0.40 s / 0.38 s at 256 MiB.
* the store-loop guest (store.elf) with the dirty log running, against without: <= 1.1x
  (the engine logs in its TLB: only the first store to each page takes the slow path).
* collecting the dirty pages of one checkpoint (``dirty_pages()``) when 1% of 128 MiB is
  dirty: <= 0.1 ms.

Times are the best of several runs (other work on the host only ever adds time).
``run()`` returns the rows; ``python -m bench.state`` prints them as a table.
"""

import pathlib
import re
import statistics
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
FW = ROOT / "firmware" / "build"
PAGE = 4096

#: QEMU 7.2 savevm / loadvm seconds on a machine like ours, by RAM size in MiB
QEMU_SAVEVM_S = {64: (0.10, 0.10), 256: (0.40, 0.38)}
STORE_PASSES = 60
STORE_SLOWDOWN_TARGET = 1.1
COLLECT_RAM_MIB = 128
COLLECT_FRACTION = 0.01
COLLECT_TARGET_MS = 0.1


def _build(ram_mib, kernel="hello.elf", append=""):
    from machines import pc

    return pc.build(ram_size=ram_mib << 20, kernel=str(FW / kernel), append=append, serial=["null"],
                    no_reboot=True)


def _row(figure, unit, value, limit=None, note=""):
    target = "" if limit is None else f"<= {limit:.3g} {unit}"
    if note:
        target = f"{target} ({note})" if target else note
    return {"figure": figure, "unit": unit, "value": value, "target": target}


def save_load(ram_mib, dirtied, repeat):
    """(best save s, best load s, stream bytes) for one machine size and RAM content."""
    source = _build(ram_mib)
    status = source.run()
    if status != 1:
        raise RuntimeError(f"hello.elf exited with status {status}")
    if dirtied:
        noise = np.random.default_rng(ram_mib).bytes(source.ram.size)
        source.ram.buf[:] = np.frombuffer(noise, dtype=np.uint8)
        del noise
    saves, loads = [], []
    data = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        data = source.save_state(ram_pages="all")
        saves.append(time.perf_counter() - t0)
    device_state = source.save_state()
    for attempt in range(repeat):
        target = _build(ram_mib)
        t0 = time.perf_counter()
        target.load_state(data)
        loads.append(time.perf_counter() - t0)
        if attempt == 0 and (not np.array_equal(target.ram.buf, source.ram.buf)
                             or target.save_state() != device_state):
            raise RuntimeError(f"{ram_mib} MiB: the loaded machine differs from the saved one")
        target.close()
        del target
    size = len(data)
    source.close()
    return min(saves), min(loads), size


def store_loop(passes, log):
    """Wall time of store.elf's run (boot excluded), with or without the dirty log."""
    machine = _build(64, "store.elf", f"passes={passes}")
    if log:
        machine.start_dirty_log()
    t0 = time.perf_counter()
    status = machine.run()
    elapsed = time.perf_counter() - t0
    if status != 1:
        raise RuntimeError(f"store.elf exited with status {status}")
    if log and len(machine.dirty_pages()) < (16 << 20) // PAGE:
        raise RuntimeError("the dirty log missed pages of store.elf's 16 MiB buffer")
    machine.close()
    return elapsed


def collect_cost(ram_mib=COLLECT_RAM_MIB, fraction=COLLECT_FRACTION, rounds=200):
    """Median seconds of one dirty_pages() call with ``fraction`` of RAM dirty: half of the
    pages marked by the engine (a store through its memory API; on the stock engine, the C
    write hook called as the engine calls it), half by host writes."""
    machine = _build(ram_mib)
    machine.start_dirty_log()
    machine.dirty_pages()
    ffi, hook = machine.ffi, machine.clib.on_mem_write
    user = ffi.cast("void *", machine.cstate)
    patched = machine.cpu.engine.patched
    npages = machine.ram.npages
    count = int(npages * fraction)
    rng = np.random.default_rng(7)
    times = []
    for _ in range(rounds):
        chosen = rng.choice(npages, count, replace=False)
        for i, page in enumerate(chosen.tolist()):
            if i % 2 and patched:
                machine.cpu.uc.mem_write(page * PAGE, b"\x01")
            elif i % 2:
                hook(ffi.NULL, 0, page * PAGE, 4, 0, user)
            else:
                machine.ram.mark_dirty(page * PAGE, PAGE)
        t0 = time.perf_counter()
        got = machine.dirty_pages()
        times.append(time.perf_counter() - t0)
        if len(got) != count:
            raise RuntimeError(f"dirty_pages() listed {len(got)} pages, {count} were dirtied")
    machine.stop_dirty_log()
    machine.close()
    return statistics.median(times), count, npages


def run():
    """Measure every figure; returns rows of {figure, unit, value, target}."""
    rows = []
    for ram_mib, repeat in ((64, 5), (256, 3)):
        qemu_save, qemu_load = QEMU_SAVEVM_S[ram_mib]
        for dirtied, what in ((False, "after hello.elf"), (True, "all RAM dirtied")):
            save_s, load_s, size = save_load(ram_mib, dirtied, repeat)
            label = f"{ram_mib} MiB, {what}"
            rows.append(_row(f"save {label}", "s", save_s, qemu_save / 2, f"QEMU savevm {qemu_save} s"))
            rows.append(_row(f"load {label}", "s", load_s, qemu_load / 2, f"QEMU loadvm {qemu_load} s"))
            rows.append(_row(f"stream size {label}", "MiB", size / (1 << 20)))
    plain = min(store_loop(STORE_PASSES, False) for _ in range(3))
    logged = min(store_loop(STORE_PASSES, True) for _ in range(3))
    rows.append(_row(f"store.elf passes={STORE_PASSES}, dirty log off", "s", plain))
    rows.append(_row(f"store.elf passes={STORE_PASSES}, dirty log on", "s", logged))
    rows.append(_row("store.elf slowdown with the dirty log", "x", logged / plain, STORE_SLOWDOWN_TARGET))
    seconds, count, npages = collect_cost()
    rows.append(_row(f"dirty_pages(), {count} of {npages} pages dirty", "ms", seconds * 1e3, COLLECT_TARGET_MS,
                     f"1% of {COLLECT_RAM_MIB} MiB"))
    return rows


def met(row):
    """True / False against the row's target, None when it has none."""
    match = re.match(r"<= ([0-9.e+-]+)", row["target"])
    if match is None or row["value"] is None:
        return None
    return row["value"] <= float(match.group(1))


def main():
    print("emu-colo state benchmarks (best of several runs)")
    for row in run():
        verdict = {None: "", True: "ok", False: "MISSED"}[met(row)]
        print(f"  {row['figure']:48s} {row['value']:10.4f} {row['unit']:4s} {verdict:6s} {row['target']}",
              flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()

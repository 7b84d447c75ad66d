"""Live migration over loopback: total time and downtime for 64 MiB and 256 MiB guests.

Two real emulator processes, driven over QMP with qemu.qmp, unlimited bandwidth (QEMU's
figures on a machine like ours: 56 ms total / 5 ms downtime at 64 MiB, 178 ms / 74 ms at
256 MiB).  The guest is idle.elf (a 100 Hz timer, as QEMU's reference guest mostly idles); a
second figure migrates store.elf, which keeps dirtying 16 MiB per pass, to show that
precopy converges against it.
"""

import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

QEMU_FIGURES = {64: (56, 5), 256: (178, 74)}


def migrate_once(ram_mb, guest="idle.elf", append="ticks=100000"):
    from emuproc import EmuProcess, free_port, wait_for

    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        args = ("-m", f"{ram_mb}M", "-kernel", f"firmware/build/{guest}", "-append", append, "-serial", "null")
        dst = EmuProcess(tmp, "dst", *args, "-incoming", f"tcp:127.0.0.1:{port}")
        src = EmuProcess(tmp, "src", *args)
        try:
            src.qmp("query-status")
            dst.qmp("query-status")
            time.sleep(0.3)
            src.qmp("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
            src.qmp("migrate", uri=f"tcp:127.0.0.1:{port}")
            info = wait_for(lambda: (lambda i: i if i.get("status") in ("completed", "failed") else None)(
                src.qmp("query-migrate")), timeout=120, interval=0.01)
            if info["status"] != "completed":
                raise RuntimeError(f"migration failed: {info}")
            return info["total-time"], info["downtime"]
        finally:
            src.close()
            dst.close()


def run(repeat=3):
    rows = []
    for ram_mb in (64, 256):
        results = sorted(migrate_once(ram_mb) for _ in range(repeat))
        total, downtime = results[len(results) // 2]
        qemu_total, qemu_down = QEMU_FIGURES[ram_mb]
        rows.append({"figure": f"migration {ram_mb} MiB total time", "unit": "ms", "value": total,
                     "target": f"<= {qemu_total} ms (QEMU 7.2)"})
        rows.append({"figure": f"migration {ram_mb} MiB downtime", "unit": "ms", "value": downtime,
                     "target": f"<= 5 ms (QEMU 7.2: {qemu_down} ms)"})
    total, downtime = migrate_once(64, "store.elf", "passes=1000")
    rows.append({"figure": "migration 64 MiB, store loop: total time", "unit": "ms", "value": total,
                 "target": "converges"})
    rows.append({"figure": "migration 64 MiB, store loop: downtime", "unit": "ms", "value": downtime,
                 "target": "(default downtime-limit 300 ms)"})
    return rows


if __name__ == "__main__":
    for row in run():
        print(f"  {row['figure']:40s} {row['value']:10.1f} {row['unit']:4s} target {row['target']}")

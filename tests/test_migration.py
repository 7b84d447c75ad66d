"""Live migration between two real emulator processes, driven over QMP (qemu.qmp)."""

import pytest
from conftest import engine_patched
from emuproc import EmuProcess, free_port, wait_for
from firmware_cases import STORE_SUMS

STORE = "firmware/build/store.elf"
# enough passes that the guest is still storing while the migration runs (a pass of 16 MiB
# takes a few ms on the patched engine, about 150 ms on the stock wheel)
PASSES = 300 if engine_patched() else 10
STORE_FINAL = b"store passes=%d bytes=%d sum=%08x\r\n" % (PASSES, PASSES << 24, STORE_SUMS[(PASSES, False)])


def progress_lines(passes):
    return b"".join(b"pass %d\r\n" % p for p in range(1, passes + 1))


@pytest.fixture
def procs():
    started = []
    yield started
    for p in started:
        p.close()


def start(procs, tmp_path, name, *args):
    p = EmuProcess(tmp_path, name, *args)
    procs.append(p)
    return p


def migrate_and_wait(src, uri):
    src.qmp("migrate", uri=uri)
    return wait_for(lambda: (lambda info: info if info.get("status") in ("completed", "failed", "cancelled")
                             else None)(src.qmp("query-migrate")), what="migration end")


def test_live_migration_of_a_dirtying_guest(procs, tmp_path):
    """The guest keeps storing 16 MiB per pass and printing; the destination finishes it."""
    port = free_port()
    append = f"passes={PASSES} progress=1"
    dst = start(procs, tmp_path, "dst", "-kernel", STORE, "-append", append, "-serial", "stdio",
                "-incoming", f"tcp:127.0.0.1:{port}")
    src = start(procs, tmp_path, "src", "-kernel", STORE, "-append", append, "-serial", "stdio")
    assert dst.qmp("query-status")["status"] == "inmigrate"
    src.wait_output(b"pass 1\r\n")
    src.qmp("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
    info = migrate_and_wait(src, f"tcp:127.0.0.1:{port}")
    assert info["status"] == "completed", info
    assert info["ram"]["total"] == 64 << 20
    assert info["ram"]["transferred"] > 0 and "downtime" in info and info["total-time"] > 0
    assert src.qmp("query-status")["status"] == "postmigrate"
    assert dst.wait() == 1, dst.stderr()
    # everything the guest printed, once: before the switch on the source, after it on the destination
    combined = src.output() + dst.output()
    assert combined == progress_lines(PASSES) + STORE_FINAL, combined[-300:]


def test_deterministic_continuation_equals_uninterrupted_run(procs, tmp_path):
    """With -icount the destination continues byte for byte as an uninterrupted run would."""
    append = f"passes={PASSES} progress=1"
    whole = start(procs, tmp_path, "whole", "-icount", "shift=0", "-kernel", STORE, "-append", append,
                  "-serial", "stdio")
    assert whole.wait() == 1
    port = free_port()
    dst = start(procs, tmp_path, "dst", "-icount", "shift=0", "-kernel", STORE, "-append", append,
                "-serial", "stdio", "-incoming", f"tcp:127.0.0.1:{port}")
    src = start(procs, tmp_path, "src", "-icount", "shift=0", "-kernel", STORE, "-append", append,
                "-serial", "stdio")
    assert dst.qmp("query-status")["status"] == "inmigrate"  # listening
    src.wait_output(b"pass 2\r\n")
    info = migrate_and_wait(src, f"tcp:127.0.0.1:{port}")
    assert info["status"] == "completed", info
    assert dst.wait() == 1
    assert src.output() + dst.output() == whole.output()


@pytest.mark.parametrize("dst_args, reason", [
    (("-m", "128M"), "RAM size"),
    (("-machine", "pc", "-m", "64M", "-no-lapic"), "section"),
])
def test_destination_refusal_leaves_the_source_running(procs, tmp_path, dst_args, reason):
    port = free_port()
    append = f"passes={PASSES} progress=1"
    dst = start(procs, tmp_path, "dst", "-kernel", STORE, "-append", append, "-serial", "null",
                "-incoming", f"tcp:127.0.0.1:{port}", *dst_args)
    src = start(procs, tmp_path, "src", "-kernel", STORE, "-append", append, "-serial", "stdio")
    assert dst.qmp("query-status")["status"] == "inmigrate"  # listening
    src.wait_output(b"pass 1\r\n")
    try:
        info = migrate_and_wait(src, f"tcp:127.0.0.1:{port}")
        assert info["status"] == "failed" and reason in info.get("error-desc", ""), info
    except Exception as e:  # refused already at HELLO: migrate itself reports the error
        assert reason in str(e), e
    assert src.qmp("query-status")["status"] == "running"
    assert dst.wait() == 1 and reason in dst.stderr()
    assert src.wait() == 1
    assert src.output() == progress_lines(PASSES) + STORE_FINAL


@pytest.mark.parametrize("how", ["cancel", "kill"])
def test_cancel_and_broken_connection_keep_the_source_running(procs, tmp_path, how):
    port = free_port()
    dst = start(procs, tmp_path, "dst", "-kernel", STORE, "-append", f"passes={PASSES}", "-serial", "null",
                "-incoming", f"tcp:127.0.0.1:{port}")
    src = start(procs, tmp_path, "src", "-kernel", STORE, "-append", f"passes={PASSES} progress=1", "-serial", "stdio")
    assert dst.qmp("query-status")["status"] == "inmigrate"  # listening
    src.wait_output(b"pass 1\r\n")
    src.qmp("migrate-set-parameters", **{"max-bandwidth": 8 << 20})  # slow enough to interrupt
    src.qmp("migrate", uri=f"tcp:127.0.0.1:{port}")
    wait_for(lambda: src.qmp("query-migrate")["ram"]["transferred"] > 0, what="transfer started")
    if how == "cancel":
        src.qmp("migrate_cancel")
    else:
        dst.proc.kill()
    info = wait_for(lambda: (lambda i: i if i["status"] in ("cancelled", "failed") else None)(
        src.qmp("query-migrate")), what="abandon")
    assert info["status"] == ("cancelled" if how == "cancel" else "failed")
    assert src.qmp("query-status")["status"] == "running"
    before = src.output().count(b"pass ")
    wait_for(lambda: src.output().count(b"pass ") > before, what="the source making progress")
    if how == "cancel":
        assert dst.wait() == 1 and "abandon" in dst.stderr().lower()


def test_migration_to_a_file_and_back(procs, tmp_path):
    path = tmp_path / "vm.mig"
    append = f"passes={PASSES} progress=1"  # still storing when the migration starts
    src = start(procs, tmp_path, "src", "-icount", "shift=0", "-kernel", STORE, "-append", append,
                "-serial", "stdio")
    src.wait_output(b"pass 1\r\n")
    info = migrate_and_wait(src, f"file:{path}")
    assert info["status"] == "completed"
    dst = start(procs, tmp_path, "dst", "-icount", "shift=0", "-kernel", STORE, "-append", append,
                "-serial", "stdio", "-incoming", f"file:{path}")
    assert dst.wait() == 1
    assert src.output() + dst.output() == progress_lines(PASSES) + STORE_FINAL

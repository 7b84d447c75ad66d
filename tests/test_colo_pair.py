"""A COLO pair of real emulator processes: set up over QMP as with QEMU, checkpoints that
leave the secondary equal to the primary, heartbeats, failover requests and the shared key."""

import json

import pytest
from colopair import Proc
from conftest import firmware, run_emu
from emuproc import Qmp
from emuproc import wait_for as wait

from colo.report import checkpoints


@pytest.fixture
def connect():
    """Qmp(path), closed when the test ends."""
    opened = []

    def open_qmp(path):
        opened.append(Qmp(path))
        return opened[-1]
    yield open_qmp
    for qmp in opened:
        try:
            qmp.close()
        except Exception:
            pass


def test_pair_set_up_over_qmp_as_with_qemu(tmp_path, connect):
    """Secondary: -incoming + x-colo; primary: x-colo, return-path, x-checkpoint-delay, migrate."""
    guest = ["-kernel", firmware("idle.elf"), "-m", "32M", "-serial", "null"]
    sec = Proc(tmp_path, "secondary", ["run", *guest, "-incoming", "tcp:127.0.0.1:0",
                                       "-qmp", f"unix:{tmp_path}/s.qmp,server,nowait"])
    pri = Proc(tmp_path, "primary", ["run", *guest, "-qmp", f"unix:{tmp_path}/p.qmp,server,nowait"])
    try:
        sq, pq = connect(tmp_path / "s.qmp"), connect(tmp_path / "p.qmp")
        assert sq("query-colo-status") == {"mode": "none", "last-mode": "none", "reason": "none",
                                           "protection": "standby"}
        sq("migrate-set-capabilities", capabilities=[{"capability": "x-colo", "state": True}])
        pq("migrate-set-capabilities", capabilities=[{"capability": "x-colo", "state": True},
                                                     {"capability": "return-path", "state": True}])
        pq("migrate-set-parameters", **{"x-checkpoint-delay": 100})
        port = wait(lambda: _listening_port(sec), what="the secondary's port")
        pq("migrate", uri=f"tcp:127.0.0.1:{port}")
        wait(lambda: pq("query-colo-status")["mode"] == "primary", what="primary in COLO")
        assert pq("query-colo-status") == {"mode": "primary", "last-mode": "none", "reason": "processing",
                                           "protection": "protected"}
        assert sq("query-colo-status")["mode"] == "secondary"
        assert sq("query-migrate")["status"] == "colo"
        info = wait(lambda: (i := pq("query-migrate")) and i["x-colo"]["ok"] >= 3 and i, what="3 checkpoints")
        assert info["status"] == "colo"
        assert info["x-colo"]["triggers"]["periodic"] >= 3
        # a new delay takes effect with a checkpoint at once
        before = pq("query-migrate")["x-colo"]["triggers"].get("forced", 0)
        pq("migrate-set-parameters", **{"x-checkpoint-delay": 60000})
        wait(lambda: pq("query-migrate")["x-colo"]["triggers"].get("forced", 0) > before, what="forced checkpoint")
        # the primary leaves COLO on request and runs on alone
        pq("x-colo-lost-heartbeat")
        assert pq("query-colo-status") == {"mode": "none", "last-mode": "primary", "reason": "request",
                                           "protection": "unprotected"}
        assert pq("query-status")["status"] == "running"
        events = [e for e in _events(pq) if e["event"] == "COLO_EXIT"]
        assert events and events[0]["data"] == {"mode": "primary", "reason": "request"}
        # the secondary hears the channel close and takes over by itself
        wait(lambda: sq("query-colo-status")["mode"] == "none", what="secondary failover")
        assert sq("query-colo-status") == {"mode": "none", "last-mode": "secondary", "reason": "error",
                                           "protection": "unprotected"}
        assert sq("query-status")["status"] == "running"
        with pytest.raises(Exception, match="not in COLO mode"):
            sq("x-colo-lost-heartbeat")
    finally:
        pri.kill()
        sec.kill()


def _listening_port(proc):
    import re
    out = proc.stderr()
    m = re.search(r"listening for a migration on [\d.]+:(\d+)", out)
    return int(m.group(1)) if m else None


def _events(qmp):
    """The events qemu.qmp has buffered so far."""
    events = []
    while True:
        try:
            event = qmp.client.events._queue.get_nowait()  # noqa: SLF001 (no public non-blocking getter)
        except Exception:
            return events
        events.append(event)


def _pair(tmp_path, guest, *, primary=(), secondary=(), delay=100, heartbeat=(50, 500), memory="32M"):
    common = ["-kernel", firmware(guest), "-m", memory, "-serial", "null", "--no-status",
              "--heartbeat-period", str(heartbeat[0]), "--heartbeat-timeout", str(heartbeat[1])]
    sec = Proc(tmp_path, "secondary", ["colo", "secondary", *common, "--listen", "tcp:127.0.0.1:0",
                                       "--records", str(tmp_path / "secondary.json"),
                                       "-qmp", f"unix:{tmp_path}/s.qmp,server,nowait", *secondary])
    port = int(sec.wait_for(r"waiting for the primary on tcp:[\d.]+:(\d+)").group(1))
    pri = Proc(tmp_path, "primary", ["colo", "primary", *common, "--secondary", f"tcp:127.0.0.1:{port}",
                                     "--checkpoint-delay", str(delay), "--records", str(tmp_path / "primary.json"),
                                     "-qmp", f"unix:{tmp_path}/p.qmp,server,nowait", *primary])
    return pri, sec


def test_every_checkpoint_leaves_the_secondary_equal_to_the_primary(tmp_path, connect):
    """Debug mode: the secondary compares its full state digest with the primary's after each
    load, while a guest rewrites RAM all the time; any difference would stop it."""
    pri, sec = _pair(tmp_path, "store.elf", primary=["-append", "passes=1000000", "--debug-consistency"],
                     secondary=["--passive"], delay=50)
    try:
        pq = connect(tmp_path / "p.qmp")
        info = wait(lambda: (i := pq("query-migrate")).get("x-colo", {}).get("ok", 0) >= 12 and i,
                    what="12 checkpoints")
        assert info["x-colo"]["failed"] == 0 and info["x-colo"]["rejected"] == 0
        assert info["x-colo"]["last-dirty-pages"] > 0
        assert sec.alive(), sec.stderr()
        sq = connect(tmp_path / "s.qmp")
        assert sq("query-colo-status")["mode"] == "secondary"
    finally:
        pri.kill()
        sec.kill()
    assert "differs" not in sec.stderr()
    records = checkpoints(json.loads((tmp_path / "secondary.json").read_text() or "[]"))  # not the failover event
    assert records and all(r["status"] == "ok" for r in records)
    assert any("debug-check" in r["phases"] for r in records)


def test_secondary_fails_over_when_the_primary_stops_answering(tmp_path, connect):
    """SIGSTOP: the channel stays open but silent; the heartbeat timeout decides."""
    import signal
    pri, sec = _pair(tmp_path, "idle.elf", secondary=["--passive"], heartbeat=(30, 300))
    try:
        sq = connect(tmp_path / "s.qmp")
        wait(lambda: sq("query-colo-status")["mode"] == "secondary", what="COLO")
        pq = connect(tmp_path / "p.qmp")
        wait(lambda: pq("query-migrate").get("x-colo", {}).get("ok", 0) >= 2, what="2 checkpoints")
        pri.proc.send_signal(signal.SIGSTOP)
        wait(lambda: sq("query-colo-status")["mode"] == "none", what="failover")
        assert sq("query-colo-status") == {"mode": "none", "last-mode": "secondary", "reason": "error",
                                           "protection": "unprotected"}
        assert sq("query-status")["status"] == "running"
        assert "no heartbeat from the peer" in sec.stderr()
    finally:
        pri.proc.send_signal(signal.SIGCONT)
        pri.kill()
        sec.kill()


def test_lost_heartbeat_request_on_the_secondary(tmp_path, connect):
    pri, sec = _pair(tmp_path, "idle.elf", secondary=["--passive"])
    try:
        sq = connect(tmp_path / "s.qmp")
        wait(lambda: sq("query-colo-status")["mode"] == "secondary", what="COLO")
        assert sq("query-status")["status"] == "paused"  # passive: stopped between checkpoints
        sq("x-colo-lost-heartbeat")
        assert sq("query-colo-status") == {"mode": "none", "last-mode": "secondary", "reason": "request",
                                           "protection": "unprotected"}
        assert sq("query-status")["status"] == "running"
        events = [e for e in _events(sq) if e["event"] == "COLO_EXIT"]
        assert events and events[0]["data"] == {"mode": "secondary", "reason": "request"}
        pq = connect(tmp_path / "p.qmp")
        wait(lambda: pq("query-colo-status")["mode"] == "none", what="the primary leaving COLO")
        assert pq("query-colo-status")["last-mode"] == "primary"
    finally:
        pri.kill()
        sec.kill()


def test_shared_key_pairs_only_with_the_same_key(tmp_path, connect):
    (tmp_path / "k1").write_text("correct horse\n")
    (tmp_path / "k2").write_text("battery staple\n")
    pri, sec = _pair(tmp_path, "idle.elf", primary=["--key-file", str(tmp_path / "k1")],
                     secondary=["--key-file", str(tmp_path / "k1")])
    try:
        pq = connect(tmp_path / "p.qmp")
        wait(lambda: pq("query-migrate").get("x-colo", {}).get("ok", 0) >= 2, what="keyed checkpoints")
    finally:
        pri.kill()
        sec.kill()
    bad = tmp_path / "bad"
    bad.mkdir()
    pri, sec = _pair(bad, "idle.elf", primary=["--key-file", str(tmp_path / "k1")],
                     secondary=["--key-file", str(tmp_path / "k2")])
    try:
        sec.wait_for(r"bad authentication tag", timeout=20)
        assert sec.proc.wait(10) == 1  # it never serves a stranger's state
        pq = connect(bad / "p.qmp")
        assert pq("query-colo-status")["mode"] == "none"
        assert pq("query-status")["status"] == "running"  # the primary runs on, unprotected
    finally:
        pri.kill()
        sec.kill()


def test_a_snapshot_of_a_colo_vm_loads_in_a_plain_run(tmp_path):
    """The COLO link keeps no guest state (its stream positions travel with checkpoints,
    not in the machine stream): ``-savevm-at`` of a VM whose COM1 is a COLO link writes a
    plain machine's snapshot, which ``emu run`` loads with any COM1 and runs to the end."""
    proxy = Proc(tmp_path, "proxy", ["colo", "proxy", "--client", "tcp:127.0.0.1:0", "--listen", "tcp:127.0.0.1:0"])
    try:
        vm_port = proxy.wait_for(r"client on [\d.]+:\d+, VMs on [\d.]+:(\d+)").group(1)
        guest = ["-icount", "-kernel", firmware("idle.elf"), "-append", "ticks=2"]
        snapshot = tmp_path / "colo-vm.snap"
        saved = run_emu(*guest, "-serial", f"colo:127.0.0.1:{vm_port},role=primary", "-savevm-at", "5", str(snapshot))
        assert saved.returncode == 1 and b"saved the machine at" in saved.stderr, saved.stderr
        restored = run_emu(*guest, "-serial", "null", "-loadvm", str(snapshot))
        assert restored.returncode == saved.returncode, restored.stderr
    finally:
        proxy.kill()

"""Failover with a client in front: every request answered exactly once, in order, right.

A whole deployment in processes (arbiter, client endpoint, secondary, primary running the
service firmware); the primary is SIGKILLed at each phase of a checkpoint (it kills itself
at the injected point) and at random moments; the secondary is killed too; and the
replication link is cut while both live (only the lease holder may serve).
"""

import random
import re
import signal
import socket
import threading
import time

import pytest
from colopair import ColoDeployment, Workload

PHASES = ["after-request", "before-send", "mid-ram", "mid-device", "before-digest", "after-received"]


@pytest.fixture
def deploy(tmp_path):
    """ColoDeployment(tmp_path, ...); at the end every process is killed and the logs are
    printed (pytest shows them when the test failed)."""
    made = []

    def make(**options):
        made.append(ColoDeployment(tmp_path, **options))
        return made[-1]
    yield make
    for d in made:
        print(d.logs())
        d.close()


def _serving_checkpoint(deployment):
    m = deployment.secondary.wait_for(r"serving alone from checkpoint (\d+)", timeout=30)
    return int(m.group(1))


def _run_until_dead(workload, proc, steps_after=8, limit_s=30):
    """Requests until ``proc`` has died, then ``steps_after`` more.  Bounded by time, not by
    a number of requests: a request takes well under a millisecond, and the checkpoint a
    kill waits for comes every checkpoint delay."""
    deadline = time.monotonic() + limit_s
    while proc.alive() and time.monotonic() < deadline:
        workload.step()
    assert not proc.alive(), f"{proc.name} never died"
    for _ in range(steps_after):
        workload.step()
    workload.finish()


@pytest.mark.parametrize("phase", PHASES)
def test_passive_pair_survives_primary_death_in_every_phase(deploy, phase):
    """Passive (Remus): a checkpoint that did not arrive whole is never applied; one that
    was received is applied even if the primary dies before hearing VMSTATE_LOADED."""
    d = deploy(mode="passive", primary_args=["--x-kill-at", f"{phase}:3"])
    d.wait_colo()
    w = Workload(d.client())
    w.ready()
    _run_until_dead(w, d.primary)
    assert d.primary.proc.returncode == -signal.SIGKILL
    assert f"killing this process at {phase} of checkpoint 3" in d.primary.stderr()
    assert _serving_checkpoint(d) == (3 if phase == "after-received" else 2)
    assert d.qmp("secondary")("query-colo-status") == {"mode": "none", "last-mode": "secondary",
                                                        "reason": "error", "protection": "unprotected"}


@pytest.mark.parametrize("phase", ["mid-device", "after-received"])
def test_compare_pair_survives_primary_death_mid_checkpoint(deploy, phase):
    d = deploy(mode="compare", checkpoint_delay=40, primary_args=["--x-kill-at", f"{phase}:4"])
    d.wait_colo()
    w = Workload(d.client(), time_every=4)
    w.ready()
    _run_until_dead(w, d.primary)
    assert d.primary.proc.returncode == -signal.SIGKILL
    _serving_checkpoint(d)


@pytest.mark.parametrize("mode,seed", [("compare", 1), ("passive", 2)])
def test_client_survives_sigkill_of_the_primary_at_a_random_moment(deploy, mode, seed):
    rng = random.Random(seed)
    d = deploy(mode=mode, checkpoint_delay=30)
    d.wait_colo()
    w = Workload(d.client(), time_every=5)
    w.ready()
    killer = threading.Timer(rng.uniform(0.2, 0.8), d.primary.kill)
    killer.start()
    try:
        _run_until_dead(w, d.primary, steps_after=10)
    finally:
        killer.cancel()
    _serving_checkpoint(d)


@pytest.mark.parametrize("mode", ["compare", "passive"])
def test_primary_serves_alone_when_the_secondary_dies(deploy, mode):
    d = deploy(mode=mode, checkpoint_delay=30)
    d.wait_colo()
    w = Workload(d.client(), time_every=5)
    w.ready()
    for _ in range(10):
        w.step()
    d.secondary.kill()
    for _ in range(15):
        w.step()
    w.finish()
    status = d.qmp("primary")("query-colo-status")
    assert status == {"mode": "none", "last-mode": "primary", "reason": "error", "protection": "unprotected"}
    assert d.qmp("primary")("query-status")["status"] == "running"
    d.proxy.wait_for(r"takeover by primary \S+ with epoch 2 accepted")


class Relay:
    """A TCP relay standing for the replication link, so a test can cut it."""

    def __init__(self, target_port):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target_port = target_port
        self.socks = []
        self.cut_event = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        a, _ = self.listener.accept()
        b = socket.create_connection(("127.0.0.1", self.target_port))
        self.socks = [a, b]
        for src, dst in ((a, b), (b, a)):
            threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src, dst):
        try:
            while not self.cut_event.is_set():
                data = src.recv(1 << 20)
                if not data or self.cut_event.is_set():
                    break
                dst.sendall(data)
        except OSError:
            pass

    def cut(self):
        """Both ends see the link die; both processes live on."""
        self.cut_event.set()
        for s in self.socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self.listener.close()


def cut_link_between_live_vms(deploy, **options):
    """A pair whose replication link runs through a relay, serving a client; the relay is
    cut while both VMs live, and the secondary, refused the lease, stops (exit status 1).
    Returns the deployment and the workload, which goes on."""
    relays = []

    def through_relay(port):
        relays.append(Relay(port))
        return relays[0].port
    d = deploy(mode="compare", checkpoint_delay=50, secondary_port_hook=through_relay, **options)
    d.wait_colo()
    w = Workload(d.client(), time_every=5)
    w.ready()
    for _ in range(10):
        w.step()
    relays[0].cut()
    for _ in range(20):
        w.step()
    d.secondary.wait_for(r"split brain averted", timeout=30)
    assert d.secondary.proc.wait(10) == 1
    return d, w


def test_partition_only_the_lease_holder_serves(deploy):
    """Cut the link between two live VMs: the primary keeps its lease and serves alone; the
    secondary is refused by the arbiter and does not serve (split brain averted)."""
    d, w = cut_link_between_live_vms(deploy)
    for _ in range(5):
        w.step()
    w.finish()
    assert d.primary.alive()
    assert d.qmp("primary")("query-colo-status")["mode"] == "none"
    assert re.search(r"takeover by primary \S+ with epoch \d+ accepted", d.proxy.stderr())
    assert "takeover by secondary" not in d.proxy.stderr()
    assert re.search(r"acquire.*refused|lease held by primary", d.secondary.stderr() + d.arbiter.stderr())


def test_a_primary_serves_unprotected_until_protection_starts(deploy):
    """--protect-after: the guest starts alone (a boot, say); its output reaches the client at
    once; the pair forms later and a failover after that loses nothing."""
    d = deploy(mode="compare", checkpoint_delay=50, primary_args=["--protect-after", "1500"])
    w = Workload(d.client(), time_every=5)
    w.ready()
    for _ in range(5):
        w.step()
    assert d.qmp("primary")("query-colo-status")["mode"] == "none"
    d.wait_colo()
    for _ in range(5):
        w.step()
    d.primary.kill()
    for _ in range(10):
        w.step()
    w.finish()
    _serving_checkpoint(d)


def test_diverging_answers_force_checkpoints_and_the_client_gets_the_primary_version(deploy):
    """NODE answers with host configuration, which differs between the two VMs: every such
    answer is a mismatch; the client must only ever see the primary's version, and the
    secondary's own once it serves alone."""
    node = "name=opt/emu-colo/node,string="
    d = deploy(mode="compare", checkpoint_delay=5000,
                       primary_args=["-fw_cfg", node + "vm-a"], secondary_args=["-fw_cfg", node + "vm-b"])
    d.wait_colo()
    w = Workload(d.client(), node_every=3, node="vm-a")
    w.ready()
    for _ in range(30):
        w.step()
    info = d.qmp("primary")("query-migrate")["x-colo"]
    assert info["triggers"].get("mismatch", 0) >= 5, info
    assert info["triggers"].get("periodic", 0) == 0  # the period is far off: mismatches alone
    d.primary.kill()
    w.node = "vm-b"
    for _ in range(12):
        w.step()
    w.finish()
    assert re.search(r"output differs at offset \d+ \(primary b'a', secondary b'b'\)", d.proxy.stderr())

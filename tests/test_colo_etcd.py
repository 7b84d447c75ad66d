"""etcd as the arbiter (``--arbiter etcd://...``), against real etcd servers (Debian's
etcd-server) on loopback ports: one node, and three for the quorum test.

First the lease itself, as two nodes of a pair see it (two clients): exactly one holds
the right to serve, the epoch is the key's revision and only grows, a dead holder's right
ends with its lease, a holder cut off from etcd keeps it only while its lease is valid,
and without a quorum nobody gets it.  Then whole pairs with etcd as their arbiter: a
primary killed, the replication link cut, and the primary cut from etcd.
"""

import os
import signal
import subprocess
import sys
import time

import pytest
from colopair import ROOT, Workload
from etcdcluster import Blackhole, EtcdCluster, etcd_missing
from test_colo_failover import _run_until_dead, _serving_checkpoint, cut_link_between_live_vms, deploy  # noqa: F401

from colo.arbiter import ArbiterError, LeaseLost, LeaseRefused
from colo.etcdarbiter import EtcdArbiterClient, parse_etcd_url
from emu.errors import ConfigError


@pytest.fixture
def etcd(tmp_path):
    """A 1-node etcd cluster of its own."""
    reason = etcd_missing()
    if reason:
        pytest.skip(reason)
    cluster = EtcdCluster(tmp_path)
    yield cluster
    cluster.close()


def _client(url, node, group="pair"):
    return EtcdArbiterClient(parse_etcd_url(url), group, node)


def _acquires(client, refusal=LeaseRefused):
    """Whether ``client`` gets the right now (False: ``refusal`` was raised)."""
    try:
        client.acquire()
        return True
    except refusal:
        return False


def _until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


# ---------------------------------------------------------------------- the address
@pytest.mark.parametrize("text,message", [
    ("etcd://127.0.0.1:2379", "no key PREFIX"),
    ("etcd:///prefix", "expected etcd://HOST:PORT"),
    ("etcd://127.0.0.1/prefix", "endpoint '127.0.0.1' is not HOST:PORT"),
    ("etcd://127.0.0.1:2379,h:99999/p", "endpoint 'h:99999' is not HOST:PORT"),
    ("etcd://127.0.0.1:2379/p?ttl=0", "ttl='0' is not a whole number of seconds >= 1"),
    ("etcd://127.0.0.1:2379/p?lease=3", "unknown parameter 'lease'"),
])
def test_a_bad_etcd_address_is_refused_with_what_is_wrong(text, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("?", r"\?")):
        parse_etcd_url(text)


def test_an_etcd_address_names_every_endpoint_the_prefix_and_the_ttl():
    address = parse_etcd_url("etcd://10.0.0.1:2379,10.0.0.2:2381/colo/site-a?ttl=3")
    assert address.endpoints == (("10.0.0.1", 2379), ("10.0.0.2", 2381))
    assert (address.prefix, address.ttl_s) == ("/colo/site-a", 3)


def test_a_command_with_a_bad_etcd_address_exits_2_and_starts_nothing(tmp_path):
    r = subprocess.run([sys.executable, "-m", "emu", "colo", "secondary", "-m", "32M", "--listen", "tcp:127.0.0.1:0",
                        "--proxy", "tcp:127.0.0.1:1", "--arbiter", "etcd://127.0.0.1/x"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "endpoint '127.0.0.1' is not HOST:PORT" in r.stderr, r.stderr


# ---------------------------------------------------------------------- the lease
def test_exactly_one_node_holds_the_right_and_the_epoch_only_grows(etcd):
    a, b = _client(etcd.url(ttl=1), "vm-a"), _client(etcd.url(ttl=1), "vm-b")
    try:
        first = a.acquire()
        assert a.acquire() == first  # again: the same epoch
        with pytest.raises(LeaseRefused) as refused:
            b.acquire()
        assert refused.value.holder == "vm-a" and refused.value.epoch == first
        assert 0 <= refused.value.expires_in_ms <= 2000
        bumped = a.acquire(bump=True)
        assert bumped > first
        a.renew()
        assert b.status()["holder"] == "vm-a" and b.status()["epoch"] == bumped
        a.close()  # revoked: the other side may take it at once, under a higher epoch
        assert b.acquire() > bumped
        assert a.status()["holder"] == "vm-b"
    finally:
        a.close()
        b.close()


def test_a_dead_holders_right_ends_with_its_lease(etcd):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from colo.etcdarbiter import EtcdArbiterClient, parse_etcd_url; "
        f"c = EtcdArbiterClient(parse_etcd_url({etcd.url(ttl=1)!r}), 'pair', 'vm-a'); "
        "print(c.acquire(), flush=True); time.sleep(60)")], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    b = _client(etcd.url(ttl=1), "vm-b")
    try:
        epoch = int(holder.stdout.readline())
        time.sleep(1.5)  # its keepalives hold the lease past its TTL
        with pytest.raises(LeaseRefused):
            b.acquire()
        holder.send_signal(signal.SIGKILL)  # no revoke: the lease runs out
        killed = time.monotonic()
        _until(lambda: _acquires(b), 10, "the dead holder's lease never ran out")
        assert time.monotonic() - killed <= 3.5  # TTL 1 s (etcd's minimum here) and a keepalive period
        assert b.epoch > epoch
        # b's lease was granted at its first, refused try: held since, it lasts past its TTL
        time.sleep(1.5)
        b.renew()
        assert b.status()["holder"] == "vm-b"
    finally:
        holder.kill()
        holder.wait()
        b.close()


def test_a_holder_cut_off_from_etcd_keeps_its_right_only_while_its_lease_is_valid(etcd):
    a, b = _client(etcd.url(ttl=2), "vm-a"), _client(etcd.url(ttl=2), "vm-b")
    try:
        a.acquire()
        time.sleep(1)
        etcd.pause(0)  # etcd no longer answers anyone
        cut = time.monotonic()
        a.renew()  # still valid: it was renewed less than a TTL ago
        with pytest.raises(ArbiterError):
            b.acquire()  # the other side cannot get the right: it never serves alone
        with pytest.raises(LeaseLost, match="ran out"):
            while True:
                a.renew()
                time.sleep(0.02)
        assert time.monotonic() - cut <= 2.1  # never past a TTL from the last renewal
    finally:
        etcd.resume(0)
        a.close()
        b.close()


def test_without_a_quorum_the_holder_serves_until_its_lease_ends_and_then_nobody_does(tmp_path):
    reason = etcd_missing()
    if reason:
        pytest.skip(reason)
    cluster = EtcdCluster(tmp_path, nodes=3)
    a, b = _client(cluster.url(ttl=2), "vm-a"), _client(cluster.url(ttl=2), "vm-b")
    try:
        a.acquire()
        time.sleep(0.8)
        cluster.pause(1)
        cluster.pause(2)  # one node of three left: no quorum
        lost_quorum = time.monotonic()
        a.renew()
        with pytest.raises(ArbiterError):
            b.acquire()
        with pytest.raises(LeaseLost):
            while True:
                a.renew()
                time.sleep(0.02)
        # the leader renews leases on its own until it sees it lost its quorum (an election
        # timeout, 0.5 s here): a TTL after that at the most
        assert time.monotonic() - lost_quorum <= 2 + 0.5 + 0.2
        with pytest.raises(ArbiterError):
            b.acquire()  # nobody serves alone: safe
        cluster.resume(1)
        cluster.resume(2)
        # the quorum is back: the lease a gave up is not kept alive; b gets the right once it ends
        _until(lambda: _acquires(b, ArbiterError), 15,  # LeaseRefused too
               "b never got the right back after the quorum returned")
    finally:
        a.close()
        b.close()
        cluster.close()


# ---------------------------------------------------------------------- pairs on etcd
def test_a_pair_on_etcd_fails_over_when_the_primary_dies(deploy, etcd):  # noqa: F811
    d = deploy(mode="compare", checkpoint_delay=30, arbiter=etcd.url(ttl=1))
    d.wait_colo()
    w = Workload(d.client(), time_every=5)
    w.ready()
    for _ in range(20):
        w.step()
    d.primary.kill()
    _run_until_dead(w, d.primary, steps_after=10)
    _serving_checkpoint(d)
    time.sleep(1.5)  # past the TTL of the lease the secondary took over with
    holder = _client(etcd.url(), "observer", group="colo").status()
    assert holder["holder"] == "secondary" and d.secondary.alive(), (holder, d.secondary.stderr()[-1500:])


def test_a_pair_on_etcd_with_its_link_cut_keeps_the_lease_holder_serving(deploy, etcd):  # noqa: F811
    d, w = cut_link_between_live_vms(deploy, arbiter=etcd.url(ttl=1))
    w.finish()
    assert d.primary.alive()
    assert "takeover by secondary" not in d.proxy.stderr()


def test_a_primary_cut_from_etcd_stops_once_its_lease_ends_and_the_secondary_takes_over(deploy, etcd):  # noqa: F811
    port = etcd.endpoints().split(":")[1]
    relay = Blackhole(int(port))
    d = deploy(mode="compare", checkpoint_delay=50, arbiter=etcd.url(ttl=1),
               primary_args=["--arbiter", f"etcd://127.0.0.1:{relay.port}/emu-colo?ttl=1"])
    try:
        d.wait_colo()
        w = Workload(d.client(), time_every=5)
        w.ready()
        for _ in range(10):
            w.step()
        relay.cut()
        _run_until_dead(w, d.primary, steps_after=10)
        assert d.primary.proc.returncode == 1
        assert "lost the lease" in d.primary.stderr()
        _serving_checkpoint(d)
        assert os.path.exists(d.qmp_paths["secondary"])
    finally:
        relay.close()

"""Partitions, with the pair's parts in namespaces of their own as on separate hosts: the
client endpoint (and the client), the primary, the secondary and etcd, joined by veth.
etcd is the arbiter (lease TTL 1 s).  Whatever is cut, no output reaches the client twice:

* the replication link: the primary holds the lease and goes on; the secondary is refused
  and stops (split brain averted);
* the primary's link to etcd: its lease runs out, it stops, and the secondary takes over;
* etcd's quorum (3 nodes, 2 stopped) while the primary serves alone: it serves until its
  lease ends, and then nobody serves alone, which is safe.
"""

import re
import time

import pytest
from colonetpair import NsProc, SplitNetwork, connect_in
from colopair import LineClient, Workload
from conftest import firmware
from etcdcluster import EtcdCluster, etcd_missing
from linuxguest import network_namespaces_available


class SplitSerialPair:
    """proxy (endpoint namespace), primary and secondary (their own), etcd (its own)."""

    def __init__(self, tmp_path, etcd_nodes=1):
        self.tmp, self.procs, self.etcd = tmp_path, [], None
        self.net = SplitNetwork()
        try:
            hosts = self.net.add_etcd_namespace()
            self.etcd = EtcdCluster(tmp_path, nodes=etcd_nodes, namespace=self.net.etcd_ns, hosts=hosts)
            self.proxy = self._start("proxy", self.net.ns, ["colo", "proxy", "--client", "tcp:127.0.0.1:0",
                                                            "--listen", "tcp:0.0.0.0:0"])
            m = self.proxy.wait_for(r"client on [\d.]+:(\d+), VMs on [\d.]+:(\d+)")
            self.client_port, vm_port = int(m.group(1)), int(m.group(2))
            guest = ["-kernel", firmware("service.elf"), "-m", "32M", "-no-reboot", "--no-status",
                     "--heartbeat-period", "50", "--heartbeat-timeout", "1000"]
            self.secondary = self._start("secondary", self.net.vm_ns["secondary"], [
                "colo", "secondary", *guest, "--node", "vm-b", "--listen", "tcp:10.9.3.2:0",
                "--proxy", f"tcp:{SplitNetwork.PROXY['secondary']}:{vm_port}",
                "--arbiter", self.etcd.url(ttl=1, host=hosts[1])])
            port = int(self.secondary.wait_for(r"waiting for the primary on tcp:[\d.]+:(\d+)").group(1))
            self.primary = self._start("primary", self.net.vm_ns["primary"], [
                "colo", "primary", *guest, "--node", "vm-a", "--secondary", f"tcp:10.9.3.2:{port}",
                "--proxy", f"tcp:{SplitNetwork.PROXY['primary']}:{vm_port}", "--checkpoint-delay", "50",
                "--arbiter", self.etcd.url(ttl=1, host=hosts[0])])
            self.primary.wait_for(r"migrating to", timeout=60)
            self.proxy.wait_for(r"mode waiting -> paired", timeout=60)
            self.client = LineClient(self.client_port, connect=lambda p: connect_in(self.net.ns, p))
        except BaseException:
            print(self.logs())
            self.close()
            raise

    def _start(self, name, namespace, args):
        self.procs.append(NsProc(self.tmp, name, args, namespace))
        return self.procs[-1]

    def logs(self):
        return "\n".join(f"--- {p.name} ---\n{p.stderr()[-3000:]}" for p in self.procs)

    def close(self):
        for proc in self.procs:
            proc.kill()
        if self.etcd is not None:
            self.etcd.close()
        self.net.close()


@pytest.fixture
def split_pair(tmp_path):
    reason = network_namespaces_available() or etcd_missing()
    if reason:
        pytest.skip(reason)
    made = []

    def make(**options):
        made.append(SplitSerialPair(tmp_path, **options))
        return made[-1]
    yield make
    for pair in made:
        print(pair.logs())
        pair.close()


def _serve(workload, n):
    for _ in range(n):
        workload.step()


def test_cut_replication_link_the_lease_holder_serves_the_other_stops(split_pair):
    d = split_pair()
    w = Workload(d.client, time_every=5)
    w.ready()
    _serve(w, 20)
    d.net.cut()
    _serve(w, 40)
    d.secondary.wait_for(r"split brain averted", timeout=30)
    assert d.secondary.proc.wait(10) == 1
    _serve(w, 10)
    w.finish()
    assert d.primary.alive()
    assert "takeover by secondary" not in d.proxy.stderr()


def test_primary_cut_from_etcd_stops_when_its_lease_ends_and_the_secondary_takes_over(split_pair):
    d = split_pair()
    w = Workload(d.client, time_every=5)
    w.ready()
    _serve(w, 20)
    cut = time.monotonic()
    d.net.cut_etcd("primary")
    deadline = time.monotonic() + 30
    while d.primary.alive():
        assert time.monotonic() < deadline, "the primary went on serving past its lease"
        w.step()
    stopped = time.monotonic() - cut
    assert d.primary.proc.returncode == 1 and "lost the lease" in d.primary.stderr()
    assert stopped <= 1.5 + 1.0, stopped  # TTL 1 s after its last renewal, and a poll
    _serve(w, 20)  # the secondary, once the primary's lease ran out at etcd
    w.finish()
    assert re.search(r"serving alone from checkpoint \d+", d.secondary.stderr())
    assert len(re.findall(r"takeover by \S+ \S+ with epoch \d+ accepted", d.proxy.stderr())) == 1


def test_without_a_quorum_the_primary_serves_until_its_lease_ends_then_nobody_does(split_pair):
    d = split_pair(etcd_nodes=3)
    w = Workload(d.client, time_every=5)
    w.ready()
    _serve(w, 20)
    d.secondary.kill()  # the primary serves alone, holding its lease
    _serve(w, 20)
    assert "takeover by primary vm-a" in d.proxy.stderr()
    d.etcd.pause(1)
    d.etcd.pause(2)
    lost_quorum = time.monotonic()
    while True:  # answers go on while the lease lasts; then a request gets none
        assert time.monotonic() < lost_quorum + 30, "the primary went on serving past its lease"
        try:
            w.step(timeout=3)
        except AssertionError:
            break
    d.primary.proc.wait(10)
    assert d.primary.proc.returncode == 1 and "lost the lease" in d.primary.stderr()
    assert "ran out" in d.primary.stderr()
    # nobody serves now, and nothing was sent twice: the stream is exactly the answers given
    time.sleep(2)
    try:
        d.client.read_until(lambda b: False, timeout=1)
    except AssertionError:
        pass
    assert len(d.client.received) == w.expected_end, bytes(d.client.received[w.expected_end:])
    assert len(re.findall(r"takeover by \S+ \S+ with epoch \d+ accepted", d.proxy.stderr())) == 1

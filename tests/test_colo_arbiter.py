"""The lease arbiter over real sockets: grants, refusals, expiry, connection-tied leases, epochs, bad input."""

import io
import json
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT

from colo.arbiter import Arbiter, ArbiterClient, ArbiterError, LeaseLost, LeaseRefused, main, parse_arbiter_address
from emu.errors import ConfigError

GROUP = "pair0"


class Running:
    """An Arbiter serving in a thread, with the clients made for it (all closed at the end)."""

    def __init__(self, lease_ms, listen=("127.0.0.1", 0)):
        self.log = io.StringIO()
        self.arbiter = Arbiter(listen, lease_ms=lease_ms, log=self.log)
        self.address = ("127.0.0.1", self.arbiter.port)
        self.thread = threading.Thread(target=self.arbiter.serve_forever, daemon=True)
        self.thread.start()
        self.clients = []

    def client(self, node, group=GROUP, timeout=2.0):
        client = ArbiterClient(self.address, group, node, timeout=timeout)
        self.clients.append(client)
        return client

    def raw(self):
        sock = socket.create_connection(self.address, timeout=2.0)
        self.clients.append(sock)
        return sock

    def stop(self):
        for client in self.clients:
            client.close()
        self.arbiter.close()
        self.thread.join(5)
        assert not self.thread.is_alive()


@pytest.fixture
def start():
    running = []

    def _start(lease_ms=1000, **kw):
        running.append(Running(lease_ms, **kw))
        return running[-1]

    yield _start
    for r in running:
        r.stop()


def poll(what, condition, timeout=5.0, interval=0.01):
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(interval)


def try_acquire(client):
    try:
        return client.acquire()
    except LeaseRefused:
        return None


def read_line(sock):
    line = sock.makefile("rb", buffering=0).readline()  # unbuffered: no later line is left in a buffer
    assert line.endswith(b"\n"), f"connection closed after {line!r}"
    return json.loads(line)


def assert_closed(sock):
    assert sock.recv(4096) == b""


# ---------------------------------------------------------------------- grants and refusals
def test_first_acquire_gets_epoch_1(start):
    arb = start()
    a = arb.client("vm-a")
    assert a.status() == {"holder": None, "epoch": 0, "expires_in_ms": None}
    assert a.acquire() == 1
    assert a.epoch == 1
    status = a.status()
    assert (status["holder"], status["epoch"]) == ("vm-a", 1)
    assert 0 < status["expires_in_ms"] <= 1000
    assert "group pair0: epoch 1 granted to vm-a" in arb.log.getvalue()


def test_second_node_refused_while_held_and_renewed(start):
    arb = start()
    a, b = arb.client("vm-a"), arb.client("vm-b")
    a.acquire()
    with pytest.raises(LeaseRefused) as refused:
        b.acquire()
    assert (refused.value.holder, refused.value.epoch) == ("vm-a", 1)
    assert 0 < refused.value.expires_in_ms <= 1000
    assert b.epoch is None
    a.renew()
    assert a.acquire() == 1  # re-acquiring is a renewal: same epoch
    with pytest.raises(LeaseRefused):
        b.acquire()
    with pytest.raises(LeaseLost):
        b.renew()  # holds nothing
    assert a.status()["holder"] == "vm-a"


def test_groups_are_independent(start):
    arb = start()
    assert arb.client("vm-a", group="one").acquire() == 1
    assert arb.client("vm-b", group="two").acquire() == 1


def test_holder_connection_closing_frees_the_lease_at_once(start):
    arb = start(lease_ms=60_000)  # far beyond the poll: only the close can free it
    a, b = arb.client("vm-a"), arb.client("vm-b")
    a.acquire()
    a.close()
    assert poll("vm-b's grant", lambda: try_acquire(b)) == 2
    assert "epoch 1 of vm-a freed: its connection closed" in arb.log.getvalue()


def test_killed_holder_process_frees_the_lease(start):
    arb = start(lease_ms=60_000)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from colo.arbiter import ArbiterClient; "
         f"c = ArbiterClient(('127.0.0.1', {arb.arbiter.port}), '{GROUP}', 'vm-a'); "
         "print(c.acquire(), flush=True); time.sleep(60)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "1"
        b = arb.client("vm-b")
        with pytest.raises(LeaseRefused):
            b.acquire()
        holder.kill()
        holder.wait(5)
        assert poll("vm-b's grant", lambda: try_acquire(b)) == 2
    finally:
        holder.kill()
        holder.wait(5)
        holder.stdout.close()


def test_lease_expires_without_renewal(start):
    arb = start(lease_ms=200)
    a, b = arb.client("vm-a"), arb.client("vm-b")
    a.acquire()
    assert poll("vm-b's grant after expiry", lambda: try_acquire(b)) == 2
    assert "epoch 1 of vm-a expired" in arb.log.getvalue()
    with pytest.raises(LeaseLost, match="superseded by epoch 2"):
        a.renew()
    assert a.epoch is None


def test_expired_lease_shows_free_and_cannot_be_renewed(start):
    arb = start(lease_ms=200)
    a = arb.client("vm-a")
    a.acquire()
    poll("expiry", lambda: a.status()["holder"] is None)
    with pytest.raises(LeaseLost, match="epoch 1 of vm-a expired"):
        a.renew()
    assert a.acquire() == 2  # a new grant, never the old epoch


def test_renew_after_reconnect_is_lease_lost(start):
    first = start()
    port = first.arbiter.port
    a = first.client("vm-a")
    a.acquire()
    first.stop()  # the connection a holds is now broken
    second = start(listen=("127.0.0.1", port))
    with pytest.raises(LeaseLost):
        a.renew()  # sent again on a new connection, where no lease was ever granted
    assert a.acquire() == 1
    a.renew()
    assert second.client("vm-b").status()["holder"] == "vm-a"


def test_release_frees_the_lease(start):
    arb = start()
    a, b = arb.client("vm-a"), arb.client("vm-b")
    a.acquire()
    a.release()
    assert a.epoch is None
    assert b.acquire() == 2
    a.release()  # holds nothing: no-op
    with pytest.raises(LeaseLost):
        a.renew()


# ---------------------------------------------------------------------- epochs
def test_bump_gives_a_higher_epoch(start):
    arb = start()
    a = arb.client("vm-a")
    assert a.acquire() == 1
    assert a.acquire(bump=True) == 2
    a.renew()
    assert a.status()["epoch"] == 2
    assert "epoch 2 bumped for vm-a" in arb.log.getvalue()


def test_epochs_strictly_increase_across_holders(start):
    arb = start()
    a, b, c = arb.client("vm-a"), arb.client("vm-b"), arb.client("vm-c")
    epochs = [a.acquire()]
    a.release()
    epochs.append(b.acquire())
    b.close()
    epochs.append(poll("vm-c's grant", lambda: try_acquire(c)))
    epochs.append(c.acquire(bump=True))
    c.release()
    epochs.append(a.acquire())
    epochs.append(a.acquire())  # renewal: unchanged
    assert epochs == [1, 2, 3, 4, 5, 5]


def test_same_node_on_a_new_connection_gets_a_new_epoch(start):
    arb = start()
    old, new = arb.client("vm-a"), arb.client("vm-a")
    assert old.acquire() == 1
    assert new.acquire() == 2
    with pytest.raises(LeaseLost, match="superseded by epoch 2"):
        old.renew()
    new.renew()


# ---------------------------------------------------------------------- partition
def test_partition_primary_keeps_the_lease_secondary_stays_refused(start):
    """Replication link cut, both alive: the renewing primary keeps serving, the secondary never may."""
    lease_ms = 300
    arb = start(lease_ms=lease_ms)
    primary, secondary = arb.client("primary"), arb.client("secondary")
    epoch = primary.acquire()
    began = time.monotonic()
    refusals = 0
    while time.monotonic() - began < 2.5 * lease_ms / 1000:
        primary.renew()
        with pytest.raises(LeaseRefused) as refused:
            secondary.acquire()
        assert (refused.value.holder, refused.value.epoch) == ("primary", epoch)
        refusals += 1
        time.sleep(lease_ms / 1000 / 10)  # the primary's renewal period
    assert refusals > 10
    assert primary.epoch == epoch
    assert arb.log.getvalue().count("refused secondary") == 1  # repeated refusals are logged once


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize("line, error", [
    (b"not json\n", "not JSON"),
    (b"\xff\xfe\n", "not JSON"),
    (b"[1, 2]\n", "not a JSON object"),
    (b'{"op": "steal", "group": "pair0", "node": "x"}\n', "unknown op"),
    (b'{"op": "acquire", "node": "x"}\n', "group must be"),
    (b'{"op": "renew", "group": "pair0", "node": "x", "epoch": "1"}\n', "epoch must be"),
    (b'{"op": "acquire", "group": "pair0", "node": "x", "bump": 1}\n', "bump must be"),
    (b"x" * 5000 + b"\n", "longer than 4096"),
    (b"{" * 5000, "longer than 4096"),  # no newline at all
])
def test_bad_lines_get_an_error_and_close_without_disturbing_others(start, line, error):
    arb = start()
    a, b = arb.client("vm-a"), arb.client("vm-b")
    a.acquire()
    bad = arb.raw()
    bad.sendall(line)
    reply = read_line(bad)
    assert reply["ok"] is False and error in reply["error"]
    assert_closed(bad)
    a.renew()
    with pytest.raises(LeaseRefused):
        b.acquire()
    assert a.status()["holder"] == "vm-a"


def test_protocol_error_frees_the_offenders_lease(start):
    arb = start(lease_ms=60_000)
    bad = arb.raw()
    bad.sendall(b'{"op": "acquire", "group": "pair0", "node": "vm-a"}\n')
    assert read_line(bad)["epoch"] == 1
    bad.sendall(b"garbage\n")
    assert read_line(bad)["ok"] is False
    assert arb.client("vm-b").acquire() == 2


def test_pipelined_requests_get_replies_in_order(start):
    arb = start()
    sock = arb.raw()
    sock.sendall(b'{"op": "acquire", "group": "pair0", "node": "vm-a"}\n'
                 b'{"op": "renew", "group": "pair0", "node": "vm-a", "epoch": 1}\n'
                 b'{"op": "status", "group": "pair0"}\n')
    assert read_line(sock) == {"ok": True, "epoch": 1, "holder": "vm-a", "lease_ms": 1000}
    assert read_line(sock)["ok"] is True
    assert read_line(sock)["holder"] == "vm-a"


# ---------------------------------------------------------------------- client errors
def test_client_reports_an_unreachable_arbiter():
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    with pytest.raises(ArbiterError, match=f"arbiter 127.0.0.1:{port}: unreachable"):
        ArbiterClient(("127.0.0.1", port), GROUP, "vm-a").acquire()


def test_client_times_out_on_a_silent_arbiter():
    with socket.create_server(("127.0.0.1", 0)) as silent:
        client = ArbiterClient(silent.getsockname(), GROUP, "vm-a", timeout=0.2)
        with pytest.raises(ArbiterError, match="no reply within 0.2 s"):
            client.acquire()
        client.close()


def test_parse_arbiter_address():
    assert parse_arbiter_address("tcp:10.0.0.5:7000") == ("10.0.0.5", 7000)
    assert parse_arbiter_address("localhost:7000") == ("localhost", 7000)
    assert parse_arbiter_address(":7000") == ("127.0.0.1", 7000)
    for bad in ("7000x", "host:port", "tcp:h:70000", "h:0", "udp:h:1"):
        with pytest.raises(ConfigError):
            parse_arbiter_address(bad)


# ---------------------------------------------------------------------- command
def test_main_rejects_bad_options(capsys):
    assert main(["--listen", "udp:127.0.0.1:0"]) == 2
    assert main(["--listen", "tcp::0", "--lease", "0"]) == 2
    assert main([]) == 2
    assert "arbiter: " in capsys.readouterr().err


def test_main_serves_until_sigterm():
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from colo.arbiter import main; sys.exit(main(sys.argv[1:]))",
         "--listen", "tcp:127.0.0.1:0", "--lease", "500"],
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        ready, _, _ = select.select([proc.stderr], [], [], 10)
        assert ready, "the arbiter did not start"
        first = proc.stderr.readline().decode()
        match = re.fullmatch(r"arbiter: listening on 127\.0\.0\.1:(\d+) \(lease 500 ms\)\n", first)
        assert match, first
        with ArbiterClient(("127.0.0.1", int(match.group(1))), GROUP, "vm-a") as client:
            assert client.acquire() == 1
            assert client.status()["holder"] == "vm-a"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(5) == 0
        assert "arbiter: group pair0: epoch 1 granted to vm-a" in proc.stderr.read().decode()
    finally:
        proc.kill()
        proc.wait(5)
        proc.stderr.close()

"""The client endpoint (``emu colo proxy``) against fake VMs, a fake client and a monitor.

Each test runs a real ColoProxy in a thread and talks to it over real sockets on 127.0.0.1:
the VMs and the monitor are plain sockets speaking :mod:`colo.proxywire`, the client a plain
TCP connection.  "Nothing more was released" is checked without sleeping: once a STATUS
reply shows the proxy holds both streams, the next STATUS reply comes from a later round,
after the release decision on those bytes.
"""

import io
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT

from colo import proxywire as pw
from colo.proxy import ColoProxy

WAIT_S = 5.0


class Peer:
    """A VM (or monitor) connection: sends proxywire messages, keeps every frame it receives."""

    def __init__(self, port, role, node=None, mode="compare", hello=True):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
        self.reader = pw.frame_reader()
        self.frames = []
        self.closed = False
        if hello:
            self.send(pw.hello(role, node or role, mode))

    def send(self, message):
        self.sock.sendall(message)

    def out(self, offset, data):
        self.send(pw.data(pw.OUT, offset, data))

    def _receive(self, deadline):
        self.sock.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            return
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.closed = True
            return
        self.reader.feed(chunk)
        self.frames += self.reader.frames()

    def poll(self, done, what):
        """Receive until ``done()`` is true; fails after WAIT_S or when the proxy closes the connection."""
        deadline = time.monotonic() + WAIT_S
        while not done():
            if self.closed or time.monotonic() > deadline:
                got = [(pw.NAMES[k], p[:60]) for k, p in self.frames]
                raise AssertionError(f"{what}: not seen ({'closed' if self.closed else 'timed out'}); got {got}")
            self._receive(deadline)

    def wait(self, kind, match=lambda payload: True, after=0):
        """The payload of the first frame of ``kind`` (from index ``after`` on) that ``match`` accepts."""
        def found():
            return next((p for k, p in self.frames[after:] if k == kind and match(p)), None)
        self.poll(lambda: found() is not None, pw.NAMES[kind])
        return found()

    def count(self, kind):
        return sum(k == kind for k, _ in self.frames)

    def input(self):
        """The input stream as the IN messages so far build it (offsets must fit together)."""
        stream = bytearray()
        for kind, payload in self.frames:
            if kind == pw.IN:
                offset, data = pw.parse_data(payload)
                assert offset <= len(stream), f"IN at {offset} leaves a gap after {len(stream)}"
                assert stream[offset:offset + len(data)] == data[:len(stream) - offset], "IN rewrites input"
                stream += data[len(stream) - offset:]
        return bytes(stream)

    def wait_closed(self):
        deadline = time.monotonic() + WAIT_S
        while not self.closed:
            assert time.monotonic() < deadline, "the proxy did not close the connection"
            self._receive(deadline)


class Client:
    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
        self.data = bytearray()
        self.closed = False

    def read(self, n):
        """Everything received once ``n`` bytes have come (fails after WAIT_S)."""
        deadline = time.monotonic() + WAIT_S
        while len(self.data) < n:
            assert not self.closed, f"client: closed after {bytes(self.data)!r}"
            assert time.monotonic() < deadline, f"client: only {bytes(self.data)!r} of {n} bytes"
            self.sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                chunk = b""
            self.closed = not chunk
            self.data += chunk
        return bytes(self.data)

    def wait_closed(self):
        self.sock.settimeout(WAIT_S)
        try:
            assert self.sock.recv(1) == b"", "the client connection should have been closed"
        except ConnectionResetError:
            pass


class Harness:
    """A ColoProxy serving in a thread, and the peers a test opened."""

    def __init__(self, **options):
        self.log = io.StringIO()
        options.setdefault("compare_timeout_ms", 60_000)  # no timeout requests unless a test wants them
        self.proxy = ColoProxy(log=self.log, **options)
        self.thread = threading.Thread(target=self.proxy.serve_forever, daemon=True)
        self.thread.start()
        self.socks = []
        self._monitor = None

    def vm(self, role, node=None, mode="compare", hello=True):
        peer = Peer(self.proxy.listen_port, role, node, mode, hello)
        self.socks.append(peer.sock)
        return peer

    def client(self):
        client = Client(self.proxy.client_port)
        self.socks.append(client.sock)
        return client

    def status(self):
        if self._monitor is None:
            self._monitor = self.vm("monitor")
        after = len(self._monitor.frames)
        self._monitor.send(pw.frame(pw.STATUS))
        return json.loads(self._monitor.wait(pw.STATUS, after=after))

    def wait_status(self, predicate):
        deadline = time.monotonic() + WAIT_S
        while not predicate(status := self.status()):
            assert time.monotonic() < deadline, f"status never matched: {status}"
        return status

    def settled(self, predicate):
        """The status one round after ``predicate`` first held (the proxy has acted on what it showed)."""
        self.wait_status(predicate)
        return self.status()

    def wait_log(self, pattern):
        deadline = time.monotonic() + WAIT_S
        while not (m := re.search(pattern, self.log.getvalue())):
            assert time.monotonic() < deadline, f"no {pattern!r} in the log:\n{self.log.getvalue()}"
            time.sleep(0.005)
        return m

    def close(self):
        self.proxy.close()
        self.thread.join(WAIT_S)
        for sock in self.socks:
            sock.close()


@pytest.fixture
def start():
    harnesses = []

    def start(**options):
        harnesses.append(Harness(**options))
        return harnesses[-1]
    yield start
    for h in harnesses:
        h.close()
        assert not h.thread.is_alive()


def pair(h, secondary_mode="compare"):
    """Primary, secondary and client connected, and the initial SYNC (checkpoint 0) taken."""
    p, s = h.vm("primary", "vm-a"), h.vm("secondary", "vm-b", secondary_mode)
    c = h.client()
    s.send(pw.sync(0, 0, 0, 0, b""))
    h.wait_status(lambda st: st["mode"] == "paired" and st["primary"]["connected"] and st["client_connected"])
    return p, s, c


def test_input_is_mirrored_to_both_vms_with_offsets(start):
    h = start()
    p = h.vm("primary")
    c = h.client()
    h.wait_status(lambda st: st["primary"]["connected"] and st["client_connected"])
    c.sock.sendall(b"hello ")
    p.poll(lambda: p.input() == b"hello ", "input to the primary")
    s = h.vm("secondary")  # a late VM gets the input from offset 0 all the same
    c.sock.sendall(b"world")
    for vm in (p, s):
        vm.poll(lambda vm=vm: vm.input() == b"hello world", f"input to the {vm}")
    assert h.status()["input"] == 11
    assert h.status()["released"] == 0


def test_before_the_pair_forms_the_primary_serves_unprotected_up_to_its_mark(start):
    """Waiting: primary output goes out as it comes, but nothing beyond the MARK of the
    initial migration's pause until that checkpoint's SYNC (the secondary holds only that)."""
    h = start()
    p = h.vm("primary")
    c = h.client()
    p.out(0, b"boot log\r\n")
    assert c.read(10) == b"boot log\r\n"
    p.send(pw.mark(0, 12))
    p.out(10, b"$ after the mark")
    assert c.read(12) == b"boot log\r\n$ "
    st = h.settled(lambda st: st["released"] == 12)
    assert st["mode"] == "waiting" and st["released"] == 12
    s = h.vm("secondary", "vm-b")
    s.send(pw.sync(0, 0, 12, 10, b"$ "))
    h.wait_status(lambda st: st["mode"] == "paired")
    s.out(12, b"after the mark")
    assert c.read(26) == b"boot log\r\n$ after the mark"


def test_compare_releases_identical_bytes(start):
    h = start()
    p, s, c = pair(h)
    p.out(0, b"hello")
    s.out(0, b"hel")
    assert c.read(3) == b"hel"
    s.out(3, b"lo world")
    p.out(5, b" world")
    assert c.read(11) == b"hello world"
    for vm in (p, s):
        vm.wait(pw.RELEASED, lambda payload: pw.parse_offset(payload) == 11)
    st = h.settled(lambda st: st["released"] == 11)
    assert st["mismatches"] == 0 and st["mode"] == "paired" and st["held"] == 0


def test_mismatch_asks_for_a_checkpoint_and_the_client_gets_the_primary_version(start):
    h = start()
    p, s, c = pair(h)
    p.out(0, b"abcX")
    s.out(0, b"abcY")
    assert c.read(3) == b"abc"
    assert p.wait(pw.CHECKPOINT) == b"mismatch at offset 3"
    p.out(4, b"Z")
    s.out(4, b"Z")  # equal again, but after the difference: held until the checkpoint
    st = h.settled(lambda st: st["primary"]["out_end"] == 5 and st["secondary"]["out_end"] == 5)
    assert st["released"] == 3 and st["mismatches"] == 1 and st["checkpoint_requests"]["mismatch"] == 1
    assert p.count(pw.CHECKPOINT) == 1 and s.count(pw.CHECKPOINT) == 0
    # checkpoint 1: the secondary now holds the primary's state; the committed output comes with it
    s.send(pw.sync(1, 0, 5, 3, b"XZ"))
    assert c.read(5) == b"abcXZ"
    p.out(5, b"!")
    s.out(5, b"!")
    assert c.read(6) == b"abcXZ!"
    st = h.settled(lambda st: st["released"] == 6)
    assert bytes(c.data) == b"abcXZ!" and st["syncs"] == 2 and st["last_sync_seq"] == 1


def test_unmatched_primary_output_asks_for_a_checkpoint_after_the_timeout(start):
    h = start(compare_timeout_ms=20)
    p, s, c = pair(h)
    p.out(0, b"x")
    assert p.wait(pw.CHECKPOINT).startswith(b"timeout")
    st = h.status()
    assert st["checkpoint_requests"]["timeout"] >= 1 and st["released"] == 0
    s.out(0, b"x")
    assert c.read(1) == b"x"


def test_mark_holds_later_bytes_until_the_sync_or_unmark(start):
    h = start()
    p, s, c = pair(h)
    p.out(0, b"ab")
    p.send(pw.mark(1, 2))
    p.out(2, b"cd")
    s.out(0, b"abcd")
    assert c.read(2) == b"ab"
    st = h.settled(lambda st: st["primary"]["out_end"] == 4 and st["secondary"]["out_end"] == 4)
    assert st["released"] == 2, "bytes after the MARK went out although they compared equal"
    s.send(pw.sync(1, 0, 2, 2, b""))
    s.out(2, b"cd")
    assert c.read(4) == b"abcd"
    p.send(pw.mark(2, 4))
    p.out(4, b"ef")
    s.out(4, b"ef")
    st = h.settled(lambda st: st["primary"]["out_end"] == 6 and st["secondary"]["out_end"] == 6)
    assert st["released"] == 4
    p.send(pw.offset_message(pw.UNMARK, 2))  # checkpoint 2 did not happen: release as before
    assert c.read(6) == b"abcdef"


def test_passive_mode_releases_only_what_a_sync_commits(start):
    h = start()
    p, s, c = pair(h, secondary_mode="passive")
    p.out(0, b"hello")
    st = h.settled(lambda st: st["primary"]["out_end"] == 5)
    assert st["released"] == 0 and st["secondary"]["mode"] == "passive"
    s.send(pw.sync(1, 0, 5, 0, b"hello"))
    assert c.read(5) == b"hello"


def test_sync_resends_input_from_its_offset(start):
    h = start()
    p, s, c = pair(h)
    c.sock.sendall(b"abcdef")
    s.poll(lambda: s.input() == b"abcdef", "input to the secondary")
    seen = len(s.frames)
    s.send(pw.sync(1, 2, 0, 0, b""))
    resent = s.wait(pw.IN, after=seen)
    assert pw.parse_data(resent) == (2, b"cdef")
    p.poll(lambda: p.input() == b"abcdef", "input to the primary")


def test_takeover_by_the_secondary_continues_the_stream(start):
    h = start()
    p, s, c = pair(h)
    p.out(0, b"abc")
    s.out(0, b"abc")
    p.out(3, b"dQ")
    s.out(3, b"d")
    assert c.read(4) == b"abcd"
    p.sock.close()
    h.wait_log(r"primary vm-a (closed its connection|connection lost)")
    s.send(pw.offset_message(pw.TAKEOVER, 1))
    s.wait(pw.ACTIVE)
    s.out(3, b"deFG")  # its own bytes from where it stood, overlapping what was released
    assert c.read(7) == b"abcdeFG"
    st = h.settled(lambda st: st["secondary"]["out_end"] == 7)
    assert bytes(c.data) == b"abcdeFG" and st["released"] == 7
    assert st["mode"] == "solo" and st["active"] == "secondary" and st["epoch"] == 1 and st["takeovers"] == 1
    assert st["failover_ms"] is not None and st["failover_ms"] >= 0
    h.wait_log(r"takeover by secondary vm-b with epoch 1 accepted")


def test_epochs_must_rise_and_a_fenced_vm_is_never_released(start):
    h = start()
    p, s = h.vm("primary", "vm-a"), h.vm("secondary", "vm-b")
    c = h.client()
    h.wait_status(lambda st: st["primary"]["connected"] and st["secondary"]["connected"])
    s.send(pw.offset_message(pw.TAKEOVER, 0))
    assert s.wait(pw.REFUSED) == b"epoch 0 is not above 0 held by nobody (the initial epoch)"
    s.send(pw.offset_message(pw.TAKEOVER, 2))
    s.wait(pw.ACTIVE)
    p.wait_closed()  # fenced off
    p2 = h.vm("primary", "vm-a")
    h.wait_status(lambda st: st["primary"]["connected"])
    p2.send(pw.offset_message(pw.TAKEOVER, 2))
    assert p2.wait(pw.REFUSED) == b"epoch 2 is not above 2 held by vm-b"
    p2.out(0, b"EVIL")
    s.out(0, b"good")
    assert c.read(4) == b"good"
    st = h.settled(lambda st: st["primary"]["out_end"] == 4 and st["secondary"]["out_end"] == 4)
    assert st["released"] == 4 and bytes(c.data) == b"good"
    p2.send(pw.offset_message(pw.TAKEOVER, 3))
    p2.wait(pw.ACTIVE)
    s.wait_closed()
    s2 = h.vm("secondary", "vm-b")
    s2.out(0, b"late!")  # the old secondary again: a fresh connection, not served
    p2.out(4, b"more")
    assert c.read(8) == b"goodmore"
    st = h.settled(lambda st: st["secondary"]["out_end"] == 5 and st["primary"]["out_end"] == 8)
    assert st["released"] == 8 and bytes(c.data) == b"goodmore" and st["active"] == "primary"
    h.wait_log(r"refused the takeover by primary vm-a: epoch 2 is not above 2")


def test_malformed_messages_close_only_that_connection(start):
    h = start()
    bad = h.vm("primary", "junk", hello=False)
    bad.send(b"\x63\x00\x00\x00\x00")  # message type 99
    bad.wait_closed()
    h.wait_log(r"protocol error: unknown message type 99")
    early = h.vm("primary", hello=False)
    early.out(0, b"x")
    early.wait_closed()
    h.wait_log(r"protocol error: OUT before HELLO")
    p = h.vm("primary", "vm-a")
    h.wait_status(lambda st: st["primary"]["connected"])
    twin = h.vm("primary", "vm-c")
    twin.wait_closed()
    h.wait_log(r"refused a second primary connection \(vm-c .*vm-a is connected")
    p.out(0, b"ab")
    p.out(5, b"x")
    p.wait_closed()
    h.wait_log(r"primary vm-a protocol error: OUT at offset 5 leaves a gap: the stream ends at 2")
    m = h.vm("monitor")
    m.out(0, b"x")
    m.wait_closed()
    h.wait_log(r"a monitor may only send STATUS, not OUT")
    s = h.vm("secondary", "vm-b")
    s.send(pw.sync(0, 0, 10, 5, b"12345"))  # commits output from 5 on: bytes [0, 5) would never reach anyone
    s.wait_closed()
    h.wait_log(r"secondary vm-b protocol error: SYNC 0 .*OUTPUT \[[02], 5\) IS LOST")  # ab may have gone out
    st = h.status()
    assert h.thread.is_alive() and st["mode"] == "waiting" and st["syncs"] == 0
    assert not st["primary"]["connected"] and not st["secondary"]["connected"]


def test_one_client_at_a_time_and_held_output_goes_to_the_next(start):
    h = start()
    c1 = h.client()
    h.wait_status(lambda st: st["client_connected"])
    c2 = h.client()
    c2.wait_closed()
    h.wait_log(r"refused a second client from 127\.0\.0\.1:\d+: 127\.0\.0\.1:\d+ is connected")
    c1.sock.close()
    h.wait_status(lambda st: not st["client_connected"])
    s = h.vm("secondary", "vm-b")
    s.send(pw.offset_message(pw.TAKEOVER, 1))
    s.wait(pw.ACTIVE)
    s.out(0, b"kept for you")
    st = h.settled(lambda st: st["secondary"]["out_end"] == 12)
    assert st["released"] == 0 and st["held"] == 12  # no client: nothing is released
    c3 = h.client()
    assert c3.read(12) == b"kept for you"
    s.wait(pw.RELEASED, lambda payload: pw.parse_offset(payload) == 12)


def test_status_from_a_monitor(start):
    h = start()
    p, s, c = pair(h)
    c.sock.sendall(b"in")
    p.out(0, b"ok")
    s.out(0, b"ok")
    c.read(2)
    st = h.settled(lambda st: st["released"] == 2 and st["input"] == 2)
    assert st == {"mode": "paired", "active": None, "epoch": 0, "released": 2, "held": 0, "input": 2,
                  "primary": {"connected": True, "node": "vm-a", "out_end": 2},
                  "secondary": {"connected": True, "node": "vm-b", "mode": "compare", "out_end": 2},
                  "mismatches": 0, "checkpoint_requests": {"mismatch": 0, "timeout": 0}, "syncs": 1,
                  "last_sync_seq": 0, "takeovers": 0, "failover_ms": None, "client_connected": True}


def test_main_listens_and_stops_on_sigterm(tmp_path):
    status_file = tmp_path / "proxy.json"
    run_main = "import sys; from colo.proxy import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", run_main, "--client", "tcp:127.0.0.1:0",
                             "--listen", "tcp:127.0.0.1:0", "--status-file", str(status_file)],
                            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        line = proc.stderr.readline().decode()
        m = re.fullmatch(r"proxy: client on 127\.0\.0\.1:(\d+), VMs on 127\.0\.0\.1:(\d+)\n", line)
        assert m, line
        vm = Peer(int(m.group(2)), "monitor")
        vm.send(pw.frame(pw.STATUS))
        assert json.loads(vm.wait(pw.STATUS))["mode"] == "waiting"
        client = socket.create_connection(("127.0.0.1", int(m.group(1))), timeout=WAIT_S)
        deadline = time.monotonic() + WAIT_S  # the file is rewritten (every 100 ms at most) as figures change
        while not json.loads(status_file.read_text())["client_connected"]:
            assert time.monotonic() < deadline, status_file.read_text()
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT_S) == 0
        client.close()
        vm.sock.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()

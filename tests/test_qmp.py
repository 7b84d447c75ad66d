"""The QMP monitor: QEMU's own client library (qemu.qmp) and raw sockets against `emu run -qmp`.

The guest is idle.elf: it counts PIT ticks (100 Hz) in the bss word ``ticks``, which HMP
``xp`` reads, so every test can see whether guest time moves.
"""

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import firmware, run_emu
from elftools.elf.elffile import ELFFile
from qemu.qmp import QMPClient

from frontend import qmp as qmpmod
from emu.errors import ConfigError, EmuError
from frontend.qmp import JsonStream, QmpServer, parse_address

IDLE = firmware("idle.elf")


def _symbol(path, name):
    with open(path, "rb") as f:
        return ELFFile(f).get_section_by_name(".symtab").get_symbol_by_name(name)[0]["st_value"]


TICKS = _symbol(IDLE, "irq0_ticks")


# ---------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def emu_process(workdir, *extra):
    """``emu run`` idle.elf with a QMP unix socket in ``workdir``; yields (process, socket path)."""
    path = os.path.join(workdir, "qmp.sock")
    proc = subprocess.Popen([sys.executable, "-m", "emu", "run", "-kernel", IDLE, "-append", "ticks=100000",
                             "-serial", "null", "-qmp", f"unix:{path},server,nowait", *extra],
                            cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        while not os.path.exists(path):
            if proc.poll() is not None:
                pytest.fail(f"emu exited with {proc.returncode}: {proc.stderr.read().decode()}")
            if time.monotonic() > deadline:
                pytest.fail("the QMP socket never appeared")
            time.sleep(0.02)
        yield proc, path
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()


async def hmp(client, line):
    return await client.execute("human-monitor-command", {"command-line": line})


async def guest_ticks(client):
    out = await hmp(client, f"xp /1wx {TICKS:#x}")
    assert out.startswith(f"{TICKS:016x}: 0x"), out
    return int(out.split()[1], 16)


async def next_event(client, name, timeout=5):
    while True:
        event = await asyncio.wait_for(client.events.get(), timeout)
        if event["event"] == name:
            return event


async def wait_ticks_above(client, value, timeout=5):
    deadline = time.monotonic() + timeout
    while (now := await guest_ticks(client)) <= value:
        assert time.monotonic() < deadline, f"guest ticks stuck at {now}"
        await asyncio.sleep(0.02)
    return now


async def connected(path):
    client = QMPClient("test")
    await client.connect(path)
    return client


async def disconnect(client):
    with contextlib.suppress(EOFError):
        await client.disconnect()


class RawClient:
    """A line-level QMP client on a plain socket (what the library would refuse to send)."""

    def __init__(self, address, negotiate=False):
        self.sock = socket.socket(socket.AF_UNIX if isinstance(address, str) else socket.AF_INET)
        self.sock.settimeout(5)
        self.sock.connect(address)
        self.buf = b""
        self.events = []
        self.greeting = self.recv()
        if negotiate:
            assert self.cmd({"execute": "qmp_capabilities"}) == {"return": {}}

    def send(self, data):
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def recv(self, timeout=5):
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            self.sock.settimeout(max(0.001, deadline - time.monotonic()))
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("server closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        assert line.endswith(b"\r"), line  # QEMU ends every message with CR LF
        return json.loads(line)

    def reply(self, timeout=5):
        """The next reply; events met on the way are kept in ``events``."""
        while True:
            message = self.recv(timeout)
            if "event" in message:
                self.events.append(message)
            else:
                return message

    def cmd(self, obj):
        self.send(json.dumps(obj) + "\n")
        return self.reply()

    def silent(self, seconds=0.2):
        """True if nothing at all arrives within ``seconds``."""
        if self.buf:
            return False
        self.sock.settimeout(seconds)
        try:
            return not self.sock.recv(1, socket.MSG_PEEK)
        except (socket.timeout, BlockingIOError):
            return True

    def close(self):
        self.sock.close()


def raw_ticks(client):
    out = client.cmd({"execute": "human-monitor-command", "arguments": {"command-line": f"xp /1wx {TICKS:#x}"}})
    return int(out["return"].split()[1], 16)


def assert_guest_runs(client):
    assert client.cmd({"execute": "query-status"})["return"] == {"status": "running", "singlestep": False,
                                                                "running": True}
    before = raw_ticks(client)
    deadline = time.monotonic() + 5
    while raw_ticks(client) <= before:
        assert time.monotonic() < deadline, "guest time does not advance"
        time.sleep(0.02)


# ---------------------------------------------------------------------------- the official client
def test_session_with_qemu_client_library(tmp_path):
    async def session(path):
        client = await connected(path)
        greeting = client.greeting.QMP
        assert greeting.version["qemu"] == {"micro": 0, "minor": 2, "major": 7}
        assert greeting.version["package"].startswith("emu-colo")
        assert list(greeting.capabilities) == []
        version = await client.execute("query-version")
        assert version["qemu"]["major"] == 7 and version["package"].startswith("emu-colo")
        assert await client.execute("query-status") == {"status": "running", "singlestep": False, "running": True}
        names = {c["name"] for c in await client.execute("query-commands")}
        assert {"qmp_capabilities", "query-status", "stop", "cont", "system_reset", "quit",
                "human-monitor-command"} <= names
        assert {"migrate", "query-migrate", "migrate_cancel"} <= names  # the CLI always wires migration

        await wait_ticks_above(client, 2)
        assert await client.execute("stop") == {}
        assert (await next_event(client, "STOP")).get("data", {}) == {}
        assert (await client.execute("query-status"))["status"] == "paused"
        assert await hmp(client, "info status") == "VM status: paused\r\n"
        frozen, regs = await guest_ticks(client), await hmp(client, "info registers")
        await asyncio.sleep(0.3)  # 30 PIT periods
        assert await guest_ticks(client) == frozen
        assert await hmp(client, "info registers") == regs
        assert await client.execute("stop") == {}  # already paused: no second STOP
        assert await client.execute("cont") == {}
        event = await next_event(client, "RESUME")
        assert set(event["timestamp"]) == {"seconds", "microseconds"}
        assert abs(event["timestamp"]["seconds"] - time.time()) < 60
        assert client.events.empty()
        assert await wait_ticks_above(client, frozen + 3) > frozen
        assert (await client.execute("query-status"))["running"] is True

        lines = regs.split("\r\n")
        assert lines[:2] == ["", "CPU#0"]
        text = "\n".join(lines)
        for name in ["RAX", "RBX", "RCX", "RDX", "RSI", "RDI", "RBP", "RSP", "R8 ", "R9 ", "R10", "R11", "R12",
                     "R13", "R14", "R15", "RIP", "RFL", "ES ", "CS ", "SS ", "DS ", "FS ", "GS ", "CR0", "CR2",
                     "CR3", "CR4", "EFER"]:
            assert f"\n{name}=" in text or f" {name}=" in text, name
        cs = next(line for line in lines if line.startswith("CS ="))
        assert cs.startswith("CS =0008 0000000000000000 ffffffff") and "CS32" in cs  # multiboot flat code segment
        assert "HLT=" in text and "CR0=00000011" in text  # protected mode, sti;hlt loop

        assert await client.execute("system_reset") == {}
        event = await next_event(client, "RESET")
        assert event["data"] == {"guest": False, "reason": "host-qmp-system-reset"}
        assert (await client.execute("query-status"))["status"] == "running"
        await client.execute("stop")
        await client.execute("system_reset")  # a stopped VM is reset at once and left in prelaunch
        assert (await next_event(client, "RESET"))["data"]["guest"] is False
        assert (await client.execute("query-status"))["status"] == "prelaunch"
        assert await guest_ticks(client) == 0  # the kernel was reloaded and has not run yet
        await client.execute("cont")
        await wait_ticks_above(client, 1)

        assert await client.execute("quit") == {}
        event = await next_event(client, "SHUTDOWN")
        assert event["data"] == {"guest": False, "reason": "host-qmp-quit"}
        await disconnect(client)

    with emu_process(str(tmp_path)) as (proc, path):
        asyncio.run(session(path))
        assert proc.wait(timeout=10) == 0
        assert not os.path.exists(path)  # the monitor removes its socket


def test_savevm_loadvm_round_trip(tmp_path):
    async def session(path):
        client = await connected(path)
        await wait_ticks_above(client, 3)
        await client.execute("stop")
        saved_ticks, saved_regs = await guest_ticks(client), await hmp(client, "info registers")
        assert await hmp(client, "savevm snap1") == ""
        assert (tmp_path / "snap1.emusnap").stat().st_size > 0
        assert (await client.execute("query-status"))["status"] == "paused"  # it was paused: it stays

        await client.execute("cont")
        later = await wait_ticks_above(client, saved_ticks + 5)
        await client.execute("stop")
        client.events.clear()
        assert await hmp(client, "loadvm snap1") == ""
        assert await guest_ticks(client) == saved_ticks < later
        assert await hmp(client, "info registers") == saved_regs
        assert (await client.execute("query-status"))["status"] == "paused"
        await client.execute("cont")
        assert await wait_ticks_above(client, saved_ticks) > saved_ticks  # the loaded guest goes on

        # while running, as QEMU: STOP, save, RESUME
        client.events.clear()
        assert await hmp(client, "savevm snap2") == ""
        assert [e["event"] for e in client.events.clear()] == ["STOP", "RESUME"]
        assert (await client.execute("query-status"))["status"] == "running"

        missing = await hmp(client, "loadvm nosuch")
        assert missing == "Error: Snapshot 'nosuch' does not exist in one or more devices\r\n"
        assert await hmp(client, "loadvm") == 'loadvm: string expected\r\nTry "help loadvm" for more information\r\n'
        assert (await hmp(client, "savevm ../escape")).startswith("Error: invalid snapshot name")
        (tmp_path / "bad.emusnap").write_bytes((tmp_path / "snap1.emusnap").read_bytes()[:4096])
        await client.execute("stop")
        before, regs = await guest_ticks(client), await hmp(client, "info registers")
        error = await hmp(client, "loadvm bad")
        assert error.startswith("Error: Snapshot 'bad': ") and error.endswith("\r\n") and error.count("\r\n") == 1
        assert await guest_ticks(client) == before  # a rejected snapshot changes nothing
        assert await hmp(client, "info registers") == regs
        await client.execute("cont")
        await wait_ticks_above(client, before)
        await client.execute("quit")
        await disconnect(client)

    with emu_process(str(tmp_path)) as (proc, path):
        asyncio.run(session(path))
        assert proc.wait(timeout=10) == 0


def test_start_paused_with_S(tmp_path):
    async def session(path):
        client = await connected(path)
        assert await client.execute("query-status") == {"status": "prelaunch", "singlestep": False,
                                                        "running": False}
        assert await hmp(client, "info status") == "VM status: paused (prelaunch)\r\n"
        regs = await hmp(client, "info registers")
        await asyncio.sleep(0.3)
        assert await guest_ticks(client) == 0  # not one instruction ran
        assert await hmp(client, "info registers") == regs
        await client.execute("cont")
        await next_event(client, "RESUME")
        assert (await client.execute("query-status"))["status"] == "running"
        await wait_ticks_above(client, 2)
        await client.execute("quit")
        await disconnect(client)

    with emu_process(str(tmp_path), "-S") as (proc, path):
        asyncio.run(session(path))
        assert proc.wait(timeout=10) == 0


# ---------------------------------------------------------------------------- raw protocol
@pytest.fixture(scope="module")
def vm(tmp_path_factory):
    with emu_process(str(tmp_path_factory.mktemp("qmpvm"))) as (proc, path):
        yield proc, path


def test_protocol_errors_as_qemu(vm):
    proc, path = vm
    c = RawClient(path)
    assert c.greeting == {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7},
                                              "package": c.greeting["QMP"]["version"]["package"]},
                                  "capabilities": []}}
    negotiate_first = {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}
    assert c.cmd({"execute": "query-status"}) == {"error": negotiate_first}
    assert c.cmd({"execute": "stop", "id": 7}) == {"id": 7, "error": negotiate_first}
    assert c.cmd({"execute": "nosuch", "id": "x"}) == {"id": "x", "error": negotiate_first}
    assert c.cmd({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}) == {
        "error": {"class": "GenericError", "desc": "Capability oob not available"}}
    assert c.cmd({"execute": "qmp_capabilities", "id": 1}) == {"return": {}, "id": 1}
    assert c.cmd({"execute": "qmp_capabilities"}) == {"error": {
        "class": "CommandNotFound", "desc": "Capabilities negotiation is already complete, command ignored"}}

    def generic(desc):
        return {"error": {"class": "GenericError", "desc": desc}}

    c.send("garbage\n")
    assert c.reply() == generic("JSON parse error, invalid keyword 'garbage'")
    c.send('{"execute": "query-status",}\n')
    assert c.reply()["error"]["desc"].startswith("JSON parse error, ")
    c.send("}\n")
    assert c.reply() == generic("JSON parse error, expecting value")
    c.send(b'{"execute": "\xff\xfe"}\n')
    assert c.reply()["error"]["desc"].startswith("JSON parse error, ")
    c.send('[1, 2]\n"text"\n42\n')
    assert [c.reply() for _ in range(3)] == [generic("QMP input must be a JSON object")] * 3
    assert c.cmd({"execute": "nosuch", "id": [1, 2]}) == {
        "id": [1, 2], "error": {"class": "CommandNotFound", "desc": "The command nosuch has not been found"}}
    assert c.cmd({"arguments": {}}) == generic("QMP input lacks member 'execute'")
    assert c.cmd({"execute": 1}) == generic("QMP input member 'execute' must be a string")
    assert c.cmd({"execute": "query-status", "arguments": []}) == generic(
        "QMP input member 'arguments' must be an object")
    assert c.cmd({"execute": "query-status", "id": 3, "extra": 1}) == {
        "id": 3, **generic("QMP input member 'extra' is unexpected")}
    assert c.cmd({"execute": "query-status", "arguments": {"x": 1}}) == generic("Parameter 'x' is unexpected")
    hmp_cmd = "human-monitor-command"
    assert c.cmd({"execute": hmp_cmd, "arguments": {}}) == generic("Parameter 'command-line' is missing")
    assert c.cmd({"execute": hmp_cmd, "arguments": {"command-line": 5}}) == generic(
        "Invalid parameter type for 'command-line', expected: string")
    assert c.cmd({"execute": hmp_cmd, "arguments": {"command-line": "info status", "cpu-index": "0"}}) == generic(
        "Invalid parameter type for 'cpu-index', expected: integer")
    assert c.cmd({"execute": hmp_cmd, "arguments": {"command-line": "info status", "cpu-index": 3}}) == generic(
        "Parameter 'cpu-index' expects a CPU number")
    assert c.cmd({"execute": hmp_cmd, "arguments": {"command-line": "frobnicate now"}}) == {
        "return": "unknown command: 'frobnicate'\r\n"}
    assert c.cmd({"execute": hmp_cmd, "arguments": {"command-line": "info nosuch"}}) == {
        "return": "unknown command: 'info nosuch'\r\n"}
    assert c.cmd({"execute": hmp_cmd, "arguments": {"command-line": "xp /2bd 0x100000"}}) == {
        "return": "0000000000100000:   2 176\r\n"}  # the multiboot magic, as QEMU prints it
    assert c.cmd({"execute": hmp_cmd, "arguments": {"command-line": "xp /2wx 0x10000000"}}) == {
        "return": "0000000010000000: Cannot access memory\r\n"}
    assert_guest_runs(c)
    assert proc.poll() is None
    c.close()


def test_split_and_batched_input(vm):
    _, path = vm
    c = RawClient(path, negotiate=True)
    text = json.dumps({"execute": "query-status", "id": "split"}) + "\r\n"
    for i in range(0, len(text), 5):  # arrives over several reads
        c.send(text[i:i + 5])
        time.sleep(0.01)
    assert c.reply()["id"] == "split"
    # several commands in one write, with and without line breaks between them, and blank lines
    c.send('{"execute":"query-version","id":1}{"execute":"query-status","id":2}\n\n\n'
           '  {"execute":"query-status",\n "id":3}\n')
    replies = [c.reply() for _ in range(3)]
    assert [r["id"] for r in replies] == [1, 2, 3]
    assert replies[0]["return"]["qemu"]["major"] == 7 and replies[1]["return"]["running"] is True
    # strings holding brackets and escaped quotes do not confuse the framing
    c.send('{"execute": "human-monitor-command", "id": "b}]\\"{", "arguments": {"command-line": "info  status"}}\n')
    assert c.reply() == {"return": "VM status: running\r\n", "id": 'b}]"{'}
    c.close()


def test_clients_at_once_and_clients_that_vanish(vm):
    proc, path = vm
    a, b = RawClient(path, negotiate=True), RawClient(path, negotiate=True)
    pending = RawClient(path)  # never negotiates: gets no events

    # gone in the middle of a command, of a line, before reading the reply, with a reset
    half = RawClient(path, negotiate=True)
    half.send('{"execute": "query-sta')
    half.close()
    partial = RawClient(path)
    partial.send('{"execute": "qmp_capabil')
    partial.close()
    for _ in range(3):
        rude = RawClient(path, negotiate=True)
        rude.send(json.dumps({"execute": "human-monitor-command", "arguments": {"command-line": "info registers"}})
                  * 50)
        rude.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        rude.close()
    silent = socket.socket(socket.AF_UNIX)
    silent.connect(path)
    silent.close()  # before even reading the greeting

    # interleaved halves from two clients stay apart
    a.send('{"execute": "query-status", ')
    assert b.cmd({"execute": "query-version", "id": "b"})["id"] == "b"
    a.send('"id": "a"}\n')
    assert a.reply()["id"] == "a"

    assert a.cmd({"execute": "stop"}) == {"return": {}}
    assert [e["event"] for e in a.events] == ["STOP"]  # the event comes before the reply, as in QEMU
    assert b.recv()["event"] == "STOP"
    assert b.cmd({"execute": "query-status"})["return"]["status"] == "paused"
    assert b.cmd({"execute": "cont"}) == {"return": {}}
    assert [e["event"] for e in b.events] == ["RESUME"]
    assert a.recv()["event"] == "RESUME"
    assert pending.silent()
    assert pending.cmd({"execute": "qmp_capabilities"}) == {"return": {}}

    for client in (a, b, pending):
        assert_guest_runs(client)
    assert proc.poll() is None
    for client in (a, b, pending):
        client.close()


# ---------------------------------------------------------------------------- in process
class StandInMigration:
    """The interface the monitor expects of colo's migration object, with QEMU-like checks."""

    def __init__(self):
        self.capabilities = {"x-colo": False, "events": False}
        self.parameters = {"max-bandwidth": 1 << 27, "downtime-limit": 300}
        self.status = None
        self.uri = None

    def set_capabilities(self, caps):
        for cap in caps:
            if cap["capability"] not in self.capabilities:
                raise EmuError(f"Parameter 'capability' does not accept value '{cap['capability']}'")
        for cap in caps:
            self.capabilities[cap["capability"]] = cap["state"]

    def query_capabilities(self):
        return [{"capability": name, "state": state} for name, state in self.capabilities.items()]

    def set_parameters(self, params):
        for name, value in params.items():
            if name not in self.parameters:
                raise EmuError(f"Parameter '{name}' is unexpected")
            if not isinstance(value, int):
                raise EmuError(f"Parameter '{name}' expects uint64")
        self.parameters.update(params)

    def query_parameters(self):
        return dict(self.parameters)

    def start(self, uri):
        if not uri.startswith("tcp:"):
            raise EmuError("Parameter 'uri' expects a valid migration protocol")
        self.uri, self.status = uri, "active"

    def cancel(self):
        if self.status == "active":
            self.status = "cancelled"

    def query(self):
        return {} if self.status is None else {"status": self.status}


@contextlib.contextmanager
def machine_with_monitor(address, **kwargs):
    """An idle.elf machine with a QmpServer, its main loop on a thread of its own."""
    from machines import pc

    machine = pc.build(kernel=IDLE, append="ticks=100000", serial=["null"])
    server = QmpServer(machine, address, **kwargs)
    thread = threading.Thread(target=machine.main_loop, daemon=True)
    thread.start()
    try:
        yield machine, server
    finally:
        if machine.exit_status is None:
            machine.request_exit(0)
        thread.join(10)
        server.close()
        machine.close()
        assert not thread.is_alive()


def test_migration_commands_go_to_the_migration_object(tmp_path):
    migration = StandInMigration()
    with machine_with_monitor(f"unix:{tmp_path}/m.sock,server,nowait", migration=migration) as (machine, _):
        c = RawClient(f"{tmp_path}/m.sock", negotiate=True)
        names = {cmd["name"] for cmd in c.cmd({"execute": "query-commands"})["return"]}
        assert {"migrate", "migrate_cancel", "query-migrate", "migrate-set-capabilities",
                "query-migrate-capabilities", "migrate-set-parameters", "query-migrate-parameters"} <= names

        def generic(desc):
            return {"error": {"class": "GenericError", "desc": desc}}

        assert c.cmd({"execute": "query-migrate"}) == {"return": {}}
        caps = [{"capability": "x-colo", "state": True}]
        assert c.cmd({"execute": "migrate-set-capabilities", "arguments": {"capabilities": caps}}) == {"return": {}}
        assert migration.capabilities["x-colo"] is True
        assert {"capability": "x-colo", "state": True} in c.cmd({"execute": "query-migrate-capabilities"})["return"]
        bad = [{"capability": "nope", "state": True}]
        assert c.cmd({"execute": "migrate-set-capabilities", "arguments": {"capabilities": bad}}) == generic(
            "Parameter 'capability' does not accept value 'nope'")
        # shapes are checked before the migration object sees anything
        wrong = [{"capability": "events", "state": "yes"}]
        assert c.cmd({"execute": "migrate-set-capabilities", "arguments": {"capabilities": wrong}}) == generic(
            "Invalid parameter type for 'capabilities[0].state', expected: boolean")
        assert c.cmd({"execute": "migrate-set-capabilities", "arguments": {"capabilities": [{"state": True}]}}) == \
            generic("Parameter 'capabilities[0].capability' is missing")
        assert c.cmd({"execute": "migrate-set-capabilities", "arguments": {"capabilities": {}}}) == generic(
            "Invalid parameter type for 'capabilities', expected: array")
        assert migration.capabilities["events"] is False

        assert c.cmd({"execute": "migrate-set-parameters", "arguments": {"downtime-limit": 50}}) == {"return": {}}
        assert c.cmd({"execute": "query-migrate-parameters"})["return"]["downtime-limit"] == 50
        assert c.cmd({"execute": "migrate-set-parameters", "arguments": {"nope": 1}}) == generic(
            "Parameter 'nope' is unexpected")

        assert c.cmd({"execute": "migrate", "arguments": {}}) == generic("Parameter 'uri' is missing")
        assert c.cmd({"execute": "migrate", "arguments": {"uri": "bogus:x"}}) == generic(
            "Parameter 'uri' expects a valid migration protocol")
        assert migration.status is None
        assert c.cmd({"execute": "migrate", "arguments": {"uri": "tcp:127.0.0.1:4444"}, "id": 9}) == {
            "return": {}, "id": 9}
        assert migration.uri == "tcp:127.0.0.1:4444"
        assert c.cmd({"execute": "query-migrate"}) == {"return": {"status": "active"}}
        assert c.cmd({"execute": "migrate_cancel"}) == {"return": {}}
        assert c.cmd({"execute": "query-migrate"}) == {"return": {"status": "cancelled"}}
        assert machine.status == "running"
        c.close()


def test_tcp_listens_only_where_asked():
    with machine_with_monitor("tcp::0,server,nowait") as (machine, server):
        host, port = server.address
        assert host == "127.0.0.1" and port > 0
        c = RawClient((host, port), negotiate=True)
        assert c.cmd({"execute": "query-status"})["return"]["running"] is True
        c.close()


def test_a_client_that_reads_nothing_never_blocks_the_loop(tmp_path, monkeypatch):
    monkeypatch.setattr(qmpmod, "MAX_OUTPUT", 1 << 20)
    with machine_with_monitor(f"unix:{tmp_path}/s.sock,server,nowait") as (machine, server):
        sleeper = RawClient(f"{tmp_path}/s.sock", negotiate=True)
        sleeper.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        reader = RawClient(f"{tmp_path}/s.sock", negotiate=True)
        hmp_regs = {"execute": "human-monitor-command", "arguments": {"command-line": "info registers"}}
        start = time.monotonic()
        with contextlib.suppress(OSError):  # the server may drop it before the last one
            for _ in range(2000):  # ~3 MB of replies to a client that never reads them
                sleeper.send(json.dumps(hmp_regs) + "\n")
        deadline = time.monotonic() + 10
        while len(server.clients) > 1:  # dropped once its backlog passed MAX_OUTPUT
            assert time.monotonic() < deadline, "the stuck client was never dropped"
            time.sleep(0.02)
        assert time.monotonic() - start < 10
        assert_guest_runs(reader)

        # a client that reads late gets everything, in order, without sending anything more
        late = RawClient(f"{tmp_path}/s.sock", negotiate=True)
        late.send("".join(json.dumps({**hmp_regs, "id": i}) + "\n" for i in range(300)))  # ~450 KB of replies
        time.sleep(0.3)
        assert [late.reply()["id"] for _ in range(300)] == list(range(300))
        assert_guest_runs(reader)
        for client in (late, reader, sleeper):
            client.close()


def test_address_parsing():
    assert parse_address("unix:/tmp/q.sock,server,nowait") == ("unix", "/tmp/q.sock", False)
    assert parse_address("unix:/tmp/q.sock,server=on,wait=off") == ("unix", "/tmp/q.sock", False)
    assert parse_address("tcp::4444,server,nowait") == ("tcp", ("127.0.0.1", 4444), False)
    assert parse_address("tcp:0.0.0.0:4444,server,nowait") == ("tcp", ("0.0.0.0", 4444), False)
    assert parse_address("tcp:[::1]:4444,server") == ("tcp", ("::1", 4444), True)
    for spec in ["stdio", "unix:/tmp/q.sock", "unix:,server", "tcp:4444,server", "tcp::99999,server",
                 "tcp::x,server", "unix:/tmp/q,server,bogus", "unix:/tmp/q,server=maybe",
                 "unix:/" + "x" * 200 + ",server"]:
        with pytest.raises(ConfigError) as info:
            parse_address(spec)
        message = str(info.value)
        assert spec in message and "\n" not in message


class _NoMachine:
    """Just enough of a machine for a server that is only opened and closed."""

    def __init__(self):
        self.event_listeners, self.background_jobs, self.fds = [], [], set()

    def add_fd_handler(self, fd, callback):
        self.fds.add(fd)

    def remove_fd_handler(self, fd):
        self.fds.discard(fd)


def test_unix_socket_path_handling(tmp_path):
    path = tmp_path / "q.sock"
    path.write_text("precious")
    with pytest.raises(EmuError, match="Address already in use"):
        QmpServer(_NoMachine(), f"unix:{path},server,nowait")
    assert path.read_text() == "precious"  # only a stale socket is ever removed
    path.unlink()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on, as a killed run leaves it
    machine = _NoMachine()
    server = QmpServer(machine, f"unix:{path},server,nowait")
    assert machine.fds == {server.listener.fileno()}
    assert sorted(os.listdir(tmp_path)) == ["q.sock"]
    probe = socket.socket(socket.AF_UNIX)
    probe.connect(str(path))
    probe.close()
    server.close()
    assert machine.fds == set() and not path.exists()


def test_server_wait_blocks_until_the_first_client(tmp_path):
    path = str(tmp_path / "w.sock")
    connected_at = []

    def connect_later():
        while not os.path.exists(path):
            time.sleep(0.01)
        time.sleep(0.2)
        client = socket.socket(socket.AF_UNIX)
        client.connect(path)
        connected_at.append((time.monotonic(), client))

    thread = threading.Thread(target=connect_later)
    thread.start()
    server = QmpServer(_NoMachine(), f"unix:{path},server")  # QEMU's default: wait=on
    returned = time.monotonic()
    thread.join()
    client = connected_at[0][1]
    assert returned >= connected_at[0][0] - 0.05 and len(server.clients) == 1
    client.settimeout(5)
    assert json.loads(client.recv(4096))["QMP"]["capabilities"] == []
    client.close()
    server.close()


def test_cli_rejects_a_bad_qmp_address_in_one_line():
    result = run_emu("-kernel", IDLE, "-serial", "null", "-qmp", "telnet:x")
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "telnet:x" in lines[0], result.stderr


def test_json_stream_framing():
    texts = [b'{"a": [1, {"b": "}]\\\\"}]}', b'"x"', b'{"c": "\\"{"}', b"123", b'{"d": {}}']
    stream = b" \r\n".join(texts) + b"\n"
    whole = JsonStream().feed(stream)
    bytewise = []
    s = JsonStream()
    for i in range(len(stream)):
        bytewise += s.feed(stream[i:i + 1])
    assert [v for v, _ in whole] == [v for v, _ in bytewise] == [json.loads(t) for t in texts]
    assert s.buf == bytearray()
    # an error costs only its own value
    s = JsonStream()
    results = s.feed(b'{"a": nope}\n]\n{"b": 2}\n')
    assert [e.desc.split(",")[0] if e else v for v, e in results] == ["JSON parse error"] * 2 + [{"b": 2}]
    too_deep = JsonStream().feed(b"[" * (qmpmod.MAX_NESTING + 1) + b"]" * (qmpmod.MAX_NESTING + 1) + b'\n{"ok": 1}\n')
    assert too_deep[0][1].desc == "JSON parse error, nesting too deep"
    assert too_deep[-1] == ({"ok": 1}, None)

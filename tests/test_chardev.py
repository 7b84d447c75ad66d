"""Serial backends: file output, stdio through pipes and a pty, a real TCP client, spec parsing."""

import os
import selectors
import socket
import termios
import threading

import pytest

from emu import chardev
from emu.chardev import FileBackend, NullBackend, StdioBackend, TcpServerBackend, parse_serial_spec
from emu.errors import ConfigError


def pump(backend, timeout=2.0):
    """Wait for input like the run loop does; returns the bytes for the guest (may be b'')."""
    with selectors.DefaultSelector() as sel:
        for fd in backend.read_fds():
            sel.register(fd, selectors.EVENT_READ)
        events = sel.select(timeout)
        assert events, "backend did not become readable"
        return b"".join(backend.on_readable(key.fd) for key, _ in events)


def recv_exactly(sock, n, timeout=2.0):
    sock.settimeout(timeout)
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "connection closed early"
        data += chunk
    return data


# ---------------------------------------------------------------- file
def test_file_backend_truncates_then_writes(tmp_path):
    path = tmp_path / "serial.txt"
    path.write_bytes(b"old contents")
    backend = FileBackend(str(path))
    backend.write(b"hello ")
    backend.write(b"world\n")
    assert path.read_bytes() == b"hello world\n"  # visible before close: unbuffered
    assert backend.read_fds() == []
    backend.close()
    backend.close()


def test_file_backend_append(tmp_path):
    path = tmp_path / "serial.txt"
    path.write_bytes(b"a")
    backend = FileBackend(str(path), append=True)
    backend.write(b"b")
    backend.close()
    assert path.read_bytes() == b"ab"


def test_file_backend_open_error_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot open"):
        FileBackend(str(tmp_path / "missing-dir" / "x"))


# ---------------------------------------------------------------- null and stdio
def test_null_backend():
    backend = NullBackend()
    backend.write(b"dropped")
    assert backend.read_fds() == []
    backend.close()


def test_stdio_backend_with_pipes():
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    try:
        backend = StdioBackend(in_fd=in_r, out_fd=out_w)
        assert not backend.raw_mode
        backend.write(b"guest says hi\n")
        assert os.read(out_r, 100) == b"guest says hi\n"
        assert backend.read_fds() == [in_r]
        os.write(in_w, b"typed")
        assert pump(backend) == b"typed"
        os.close(in_w)
        in_w = None
        assert pump(backend) == b""  # end of file
        assert backend.read_fds() == []  # stops watching, no busy loop
        backend.close()
    finally:
        for fd in (in_r, out_r, out_w, in_w):
            if fd is not None:
                os.close(fd)


def test_stdio_backend_ignores_unwatchable_stdin(tmp_path):
    path = tmp_path / "input"
    path.write_bytes(b"x")
    fd = os.open(path, os.O_RDONLY)
    null = os.open(os.devnull, os.O_RDWR)
    try:
        assert StdioBackend(in_fd=fd, out_fd=null).read_fds() == []
        assert StdioBackend(in_fd=null, out_fd=null).read_fds() == []
    finally:
        os.close(fd)
        os.close(null)


def test_stdio_backend_drops_output_to_a_closed_pipe():
    out_r, out_w = os.pipe()
    os.close(out_r)
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        backend = StdioBackend(in_fd=null, out_fd=out_w)
        backend.write(b"nobody listens")  # no exception: dropped like QEMU
        backend.write(b"still fine")
    finally:
        os.close(out_w)
        os.close(null)


def test_stdio_backend_sets_and_restores_terminal():
    master, slave = os.openpty()
    try:
        before = termios.tcgetattr(slave)
        assert before[3] & termios.ICANON
        backend = StdioBackend(in_fd=slave, out_fd=slave)
        assert backend.raw_mode
        raw = termios.tcgetattr(slave)
        assert not raw[3] & (termios.ICANON | termios.ECHO)
        assert raw[3] & termios.ISIG  # Ctrl-C still stops the emulator
        assert not raw[0] & termios.ICRNL
        os.write(master, b"ab\r")
        assert pump(backend) == b"ab\r"  # no line buffering, CR not translated
        backend.close()
        assert termios.tcgetattr(slave) == before
        assert not backend.raw_mode
    finally:
        os.close(master)
        os.close(slave)


# ---------------------------------------------------------------- TCP
@pytest.fixture
def server():
    backend = TcpServerBackend("127.0.0.1", 0)
    yield backend
    backend.close()


def connect(backend):
    sock = socket.create_connection(("127.0.0.1", backend.port), timeout=2)
    assert pump(backend) == b""  # the accept
    return sock


def test_tcp_binds_an_ephemeral_loopback_port(server):
    assert server.port > 0
    assert server.listener.getsockname()[0] == "127.0.0.1"
    assert server.read_fds() == [server.listener.fileno()]


def test_tcp_client_exchange(server):
    server.write(b"before anyone listens")  # dropped
    with connect(server) as client:
        assert server.read_fds() == [server.client.fileno()]
        server.write(b"hello client")
        assert recv_exactly(client, 12) == b"hello client"
        client.sendall(b"from client")
        assert pump(server) == b"from client"
        client.sendall(bytes(range(256)) * 4)
        got = b""
        while len(got) < 1024:
            got += pump(server)
        assert got == bytes(range(256)) * 4
    assert server.dropped == len(b"before anyone listens")


def test_tcp_reconnect_after_client_leaves(server):
    first = connect(server)
    first.close()
    assert pump(server) == b""  # the close
    assert server.client is None and server.read_fds() == [server.listener.fileno()]
    server.write(b"lost")
    with connect(server) as second:
        server.write(b"only this")
        assert recv_exactly(second, 9) == b"only this"
        second.settimeout(0.2)
        with pytest.raises(socket.timeout):
            second.recv(10)  # nothing from before the connection


def test_tcp_second_client_waits_for_the_first(server):
    with connect(server) as first:
        second = socket.create_connection(("127.0.0.1", server.port), timeout=2)
        first_fd = server.client.fileno()
        server.write(b"1")
        assert recv_exactly(first, 1) == b"1"
        assert server.read_fds() == [first_fd]  # the listener is not watched meanwhile
    assert pump(server) == b""  # first left
    assert pump(server) == b""  # second accepted from the backlog
    server.write(b"2")
    assert recv_exactly(second, 1) == b"2"
    second.close()


def test_tcp_slow_client_output_is_held_and_flushed(server, monkeypatch):
    monkeypatch.setattr(chardev, "TCP_MAX_PENDING", 64 << 10)
    with connect(server) as client:
        server.client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        blob = os.urandom(4 << 20)
        for i in range(0, len(blob), 4096):
            server.write(blob[i:i + 4096])  # never blocks
        assert 0 < server.dropped < len(blob)  # beyond the held-back limit, bytes are dropped
        received = bytearray()
        client.settimeout(2)
        while True:
            server.flush()
            try:
                chunk = client.recv(1 << 16)
            except socket.timeout:
                break
            received += chunk
            if len(received) + server.dropped == len(blob):
                break
        assert len(received) + server.dropped == len(blob)
        assert len(received) >= 64 << 10 and bytes(received[:64 << 10]) == blob[:64 << 10]


def test_tcp_wait_blocks_until_a_client_connects():
    port_holder = TcpServerBackend("127.0.0.1", 0)
    port = port_holder.port
    port_holder.close()

    def client():
        for _ in range(200):
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=2)
            except ConnectionRefusedError:
                threading.Event().wait(0.01)
                continue
            sock.sendall(b"hi")
            results.append(sock)
            return

    results = []
    thread = threading.Thread(target=client)
    thread.start()
    backend = TcpServerBackend("127.0.0.1", port, wait=True)
    try:
        assert backend.client is not None
        assert pump(backend) == b"hi"
    finally:
        thread.join()
        for sock in results:
            sock.close()
        backend.close()


def test_tcp_port_in_use_is_config_error(server):
    with pytest.raises(ConfigError, match="cannot listen"):
        TcpServerBackend("127.0.0.1", server.port)


# ---------------------------------------------------------------- -serial specs
def test_parse_simple_specs(tmp_path):
    assert parse_serial_spec("none") is None
    assert isinstance(parse_serial_spec("null"), NullBackend)
    path = tmp_path / "out.txt"
    backend = parse_serial_spec(f"file:{path}")
    backend.write(b"x")
    backend.close()
    assert path.read_bytes() == b"x"


def test_parse_stdio(monkeypatch):
    made = []
    monkeypatch.setattr(chardev, "StdioBackend", lambda: made.append(1) or "stdio-backend")
    assert parse_serial_spec("stdio") == "stdio-backend" and made == [1]


@pytest.mark.parametrize("spec, host, wait", [
    ("tcp::0,server,nowait", "127.0.0.1", False),
    ("tcp:127.0.0.1:0,server=on,wait=off", "127.0.0.1", False),
    ("tcp:localhost:0,server,nowait,nodelay", "localhost", False),
    ("tcp::0,server", "127.0.0.1", True),
])
def test_parse_tcp_specs(monkeypatch, spec, host, wait):
    seen = {}

    def fake(h, p, wait):
        seen.update(host=h, port=p, wait=wait)
        return "tcp-backend"

    monkeypatch.setattr(chardev, "TcpServerBackend", fake)
    assert parse_serial_spec(spec) == "tcp-backend"
    assert seen == {"host": host, "port": 0, "wait": wait}


def test_parse_tcp_opens_a_real_listener():
    backend = parse_serial_spec("tcp::0,server,nowait")
    try:
        assert isinstance(backend, TcpServerBackend)
        assert backend.listener.getsockname()[0] == "127.0.0.1" and backend.port > 0
    finally:
        backend.close()


@pytest.mark.parametrize("spec, why", [
    ("bogus", "unsupported serial device"),
    ("vc", "unsupported serial device"),
    ("file:", "missing file name"),
    ("tcp:4444", "expected tcp"),
    ("tcp::port,server", "bad port"),
    ("tcp::70000,server", "out of range"),
    ("tcp::4444", "only server sockets"),
    ("tcp::4444,server=off", "only server sockets"),
    ("tcp::4444,server,telnet", "unsupported option"),
    ("tcp::4444,server=maybe", "bad value"),
])
def test_bad_specs_raise_one_line_config_error(spec, why):
    with pytest.raises(ConfigError) as info:
        parse_serial_spec(spec)
    message = str(info.value)
    assert repr(spec) in message and why in message
    assert "\n" not in message


def test_spec_open_failure_names_the_spec(tmp_path):
    spec = f"file:{tmp_path}/no/such/dir/out"
    with pytest.raises(ConfigError) as info:
        parse_serial_spec(spec)
    assert repr(spec) in str(info.value) and "cannot open" in str(info.value)

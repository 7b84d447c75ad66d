"""Hostile and unusual command lines, signals and sockets, as real processes.

Bad configuration: one line on stderr naming the cause, exit status 2, the guest never
runs.  Signals end a run cleanly ("terminating on signal N", status 0, as QEMU)."""

import contextlib
import json
import os
import pty
import signal
import socket
import subprocess
import sys
import termios

import pytest
from conftest import ROOT, firmware, run_emu
from emuproc import Qmp, free_port, wait_for
from guestasm import assemble

IDLE_FOREVER = ("-kernel", "firmware/build/idle.elf", "-append", "ticks=10000000", "-serial", "null")


def one_line_error(result, status=2):
    text = result.stderr.decode() if isinstance(result.stderr, bytes) else result.stderr
    lines = text.strip().splitlines()
    assert result.returncode == status, text
    assert len(lines) == 1 and "Traceback" not in text, lines
    return lines[0]


def emu(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "emu", *args], capture_output=True, timeout=timeout, cwd=ROOT)


@pytest.fixture
def busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


# ---------------------------------------------------------------------- option spelling
@pytest.mark.parametrize("args, named", [
    (["-hda", "x.img"], "-hda: not supported"),
    (["-drive", "file=x"], "-drive: cannot read 'x'"),  # -drive itself, never -d rive
    (["-k", "en-us"], "-k: not supported"),
    (["-kern", "x"], "-kern: invalid option"),
    (["-smp", "2"], "-smp: not supported"),
])
def test_no_abbreviations_and_unsupported_qemu_options(args, named):
    assert named in one_line_error(run_emu(*args, "-kernel", firmware("hello.elf")))


def test_daemonize_is_not_d_aemonize():
    assert "-daemonize: a daemon has no terminal" in one_line_error(run_emu("-daemonize", "-kernel",
                                                                            firmware("hello.elf")))


@pytest.mark.parametrize("flag", ["-h", "-help", "--help"])
def test_help(flag):
    result = run_emu(flag)
    assert result.returncode == 0 and b"-kernel" in result.stdout and b"-pidfile" in result.stdout


def test_version():
    result = run_emu("-version")
    assert result.returncode == 0 and b"qemu-system-x86_64 7.2" in result.stdout


def test_icount_help_says_what_the_readme_says():
    assert b"per byte of guest code executed" in run_emu("-help").stdout.replace(b"\n", b" ").replace(b"  ", b"")


@pytest.mark.parametrize("path, named", [("/dev/null", "is not a regular file"), ("/tmp", "is a directory")])
def test_kernel_that_is_not_a_file(path, named):
    assert named in one_line_error(run_emu("-kernel", path))


def test_monitor_is_refused_not_ignored():
    assert "-monitor stdio: not supported" in one_line_error(run_emu("-monitor", "stdio", "-kernel",
                                                                     firmware("hello.elf")))


# ---------------------------------------------------------------------- addresses and paths
def test_incoming_on_a_busy_port(busy_port):
    line = one_line_error(run_emu("-incoming", f"tcp:127.0.0.1:{busy_port}", "-kernel", firmware("hello.elf")))
    assert "Address already in use" in line


@pytest.mark.parametrize("uri, named", [("tcp:256.0.0.1:5000", "256.0.0.1"), ("bogus", "unsupported URI")])
def test_incoming_bad_uri(uri, named):
    assert named in one_line_error(run_emu("-incoming", uri, "-kernel", firmware("hello.elf")))


def test_qmp_socket_in_a_missing_directory():
    line = one_line_error(run_emu("-qmp", "unix:/nonexistent/d/s.sock,server,nowait", "-kernel",
                                  firmware("hello.elf")))
    assert "/nonexistent/d/s.sock" in line


def test_savevm_at_into_a_missing_directory():
    line = one_line_error(run_emu("-savevm-at", "20", "/nonexistent/dir/x.snap", "-kernel", firmware("hello.elf")))
    assert "/nonexistent/dir/x.snap" in line


def test_savevm_at_says_what_happened(tmp_path):
    late = run_emu("-savevm-at", "100000", str(tmp_path / "late.snap"), "-kernel", firmware("hello.elf"))
    assert late.returncode == 1 and b"nothing saved" in late.stderr and not (tmp_path / "late.snap").exists()
    snap = tmp_path / "vm.snap"
    saved = run_emu("-icount", "-savevm-at", "5", str(snap), "-kernel", firmware("idle.elf"), "-append",
                    "ticks=2", "-serial", "null")
    assert saved.returncode == 1 and b"saved the machine at" in saved.stderr and snap.stat().st_size > 0


@pytest.mark.parametrize("role, flag", [("secondary", "--listen"), ("primary", "--secondary")])
def test_colo_bad_address(role, flag):
    line = one_line_error(emu("colo", role, "-kernel", firmware("service.elf"), flag, "bogus"))
    assert f"{flag}: unsupported URI 'bogus'" in line


def test_colo_secondary_on_a_busy_port(busy_port):
    line = one_line_error(emu("colo", "secondary", "-kernel", firmware("service.elf"), "--listen",
                              f"tcp:127.0.0.1:{busy_port}"))
    assert "Address already in use" in line


@pytest.mark.parametrize("role, flag", [("secondary", "--listen"), ("primary", "--secondary")])
def test_colo_records_path_checked_at_start(role, flag):
    line = one_line_error(emu("colo", role, "-kernel", firmware("service.elf"), flag, f"tcp:127.0.0.1:{free_port()}",
                              "--records", "/nonexistent/p.json"))
    assert "--records: cannot write '/nonexistent/p.json'" in line


def test_colo_primary_to_a_dead_port_retries_then_gives_up():
    result = emu("colo", "primary", "-kernel", firmware("service.elf"), "-serial", "null", "--secondary",
                 f"tcp:127.0.0.1:{free_port()}", "--connect-timeout", "1")
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr.decode()
    assert "retrying for up to 1 s" in lines[0]
    assert "no secondary answers" in lines[-1] and len(lines) == 2


# ---------------------------------------------------------------------- statuses
def test_runtime_failure_has_its_own_status(tmp_path):
    code, _ = assemble("mov eax, 0xe0000000\njmp eax", 0x100000)  # code fetch from unassigned memory
    image = tmp_path / "jump.bin"
    image.write_bytes(code)
    result = run_emu("-flat", f"{image}@0x100000", "-serial", "null")
    assert "RIP=0xe0000000" in one_line_error(result, status=70)


# ---------------------------------------------------------------------- signals
def test_ctrl_c_while_a_serial_server_waits_for_its_client():
    proc = subprocess.Popen([sys.executable, "-m", "emu", "run", "-kernel", firmware("hello.elf"), "-serial",
                             f"tcp:127.0.0.1:{free_port()},server"], cwd=ROOT, stderr=subprocess.PIPE)
    assert b"waiting for a connection" in proc.stderr.readline()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0
    rest = proc.stderr.read().decode()
    assert rest.strip() == "emu: terminating on signal 2" and "Traceback" not in rest


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_signal_restores_the_terminal_and_removes_the_qmp_socket(tmp_path, signum):
    controller, terminal = pty.openpty()
    before = termios.tcgetattr(terminal)
    qmp_path = tmp_path / "qmp.sock"
    proc = subprocess.Popen([sys.executable, "-m", "emu", "run", "-kernel", firmware("idle.elf"), "-append",
                             "ticks=10000000", "-serial", "stdio", "-qmp", f"unix:{qmp_path},server,nowait"],
                            cwd=ROOT, stdin=terminal, stdout=terminal, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: qmp_path.exists() and termios.tcgetattr(terminal) != before, what="raw mode")
        proc.send_signal(signum)
        assert proc.wait(timeout=30) == 0
        assert termios.tcgetattr(terminal) == before
        assert not qmp_path.exists()
        assert proc.stderr.read().decode().strip() == f"emu: terminating on signal {int(signum)}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(controller)
        os.close(terminal)


# ---------------------------------------------------------------------- QMP, -pidfile, -name
def _raw_qmp(path):
    sock = socket.socket(socket.AF_UNIX)
    wait_for(lambda: sock.connect_ex(str(path)) == 0, what="QMP socket")
    reader = sock.makefile("rb")
    json.loads(reader.readline())  # greeting
    sock.sendall(b'{"execute": "qmp_capabilities"}\n')
    assert json.loads(reader.readline()) == {"return": {}}
    return sock, reader


def test_quit_sends_shutdown_before_its_reply_and_pidfile_name(tmp_path):
    qmp_path, pidfile = tmp_path / "qmp.sock", tmp_path / "emu.pid"
    proc = subprocess.Popen([sys.executable, "-m", "emu", "run", *IDLE_FOREVER, "-name", "guest=edge,process=e",
                             "-pidfile", str(pidfile), "-qmp", f"unix:{qmp_path},server,nowait"], cwd=ROOT)
    try:
        sock, reader = _raw_qmp(qmp_path)
        assert pidfile.read_text() == f"{proc.pid}\n"
        sock.sendall(b'{"execute": "query-name"}\n')
        assert json.loads(reader.readline()) == {"return": {"name": "edge"}}
        sock.sendall(b'{"execute": "quit", "id": 7}\n')
        first, second = json.loads(reader.readline()), json.loads(reader.readline())
        assert first["event"] == "SHUTDOWN" and first["data"] == {"guest": False, "reason": "host-qmp-quit"}
        assert second == {"return": {}, "id": 7}
        assert reader.readline() == b""  # and no second SHUTDOWN
        assert proc.wait(timeout=30) == 0
        assert not pidfile.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_daemonize_detaches_and_writes_the_daemons_pid(tmp_path):
    qmp_path, pidfile = tmp_path / "qmp.sock", tmp_path / "emu.pid"
    result = run_emu(*IDLE_FOREVER, "-daemonize", "-pidfile", str(pidfile), "-qmp", f"unix:{qmp_path},server,nowait")
    assert result.returncode == 0, result.stderr
    pid = int(pidfile.read_text())
    assert pid != os.getpid()
    qmp = Qmp(qmp_path)
    assert qmp("query-status")["status"] == "running"
    qmp("quit")
    with contextlib.suppress(EOFError):
        qmp.close()
    wait_for(lambda: not pidfile.exists(), what="the daemon to remove its pidfile")
    wait_for(lambda: not _alive(pid), what="the daemon to exit")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited


# ---------------------------------------------------------------------- incoming: defer and probes
def test_incoming_defer_then_probes_and_junk_then_a_real_migration(tmp_path):
    port = free_port()
    dest_qmp, src_qmp = tmp_path / "dest.sock", tmp_path / "src.sock"
    common = ["-icount", "-kernel", "firmware/build/idle.elf", "-append", "ticks=100000", "-serial", "null"]
    dest = subprocess.Popen([sys.executable, "-m", "emu", "run", *common, "-incoming", "defer",
                             "-qmp", f"unix:{dest_qmp},server,nowait"], cwd=ROOT, stderr=subprocess.PIPE)
    src = subprocess.Popen([sys.executable, "-m", "emu", "run", *common, "-qmp", f"unix:{src_qmp},server,nowait"],
                           cwd=ROOT, stderr=subprocess.DEVNULL)
    try:
        d = Qmp(dest_qmp)
        assert d("query-status")["status"] == "inmigrate"
        d("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        with pytest.raises(Exception, match="already been started"):
            d("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        socket.create_connection(("127.0.0.1", port)).close()  # a port probe
        with socket.create_connection(("127.0.0.1", port)) as junk:
            junk.sendall(b"GET / HTTP/1.0\r\n\r\n" * 4)
        assert dest.poll() is None and d("query-status")["status"] == "inmigrate"
        s = Qmp(src_qmp)
        s("migrate", uri=f"tcp:127.0.0.1:{port}")
        wait_for(lambda: s("query-migrate").get("status") == "completed", what="the migration")
        wait_for(lambda: d("query-status")["status"] == "running", what="the destination to run")
        for client in (s, d):
            client("quit")
            with contextlib.suppress(EOFError):  # the process has gone
                client.close()
        assert dest.wait(timeout=30) == 0
        assert dest.stderr.read().decode().count("ignored a connection") == 2
    finally:
        for proc in (dest, src):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_colo_secondary_survives_probes_on_its_port():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "emu", "colo", "secondary", "-kernel", firmware("service.elf"),
                             "-serial", "null", "--listen", f"tcp:127.0.0.1:{port}"], cwd=ROOT, stderr=subprocess.PIPE)
    try:
        assert b"waiting for the primary" in proc.stderr.readline()
        for _ in range(3):
            socket.create_connection(("127.0.0.1", port)).close()
            assert b"ignored a connection" in proc.stderr.readline()
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------- -serial pty and unix:
def _read_until(read, marker):
    got = b""
    while marker not in got:
        chunk = read()
        assert chunk, got
        got += chunk
    return got


def test_serial_on_a_unix_socket(tmp_path):
    path = tmp_path / "com1.sock"
    proc = subprocess.Popen([sys.executable, "-m", "emu", "run", "-kernel", firmware("echo.elf"), "-serial",
                             f"unix:{path},server"], cwd=ROOT, stderr=subprocess.PIPE)
    try:
        assert b"waiting for a connection on unix:" in proc.stderr.readline()
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))
            _read_until(lambda: client.recv(4096), b"echo ready\r\n")
            client.sendall(b"hi\rq")
            assert _read_until(lambda: client.recv(4096), b"bye\r\n").endswith(b"hi\r\nbye\r\n")
        assert proc.wait(timeout=30) == 1
        assert not path.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serial_on_a_pty():
    proc = subprocess.Popen([sys.executable, "-m", "emu", "run", "-kernel", firmware("echo.elf"), "-serial", "pty"],
                            cwd=ROOT, stderr=subprocess.PIPE)
    try:
        line = proc.stderr.readline().decode()
        assert line.startswith("char device redirected to /dev/pts/"), line
        fd = os.open(line.split()[4], os.O_RDWR | os.O_NOCTTY)
        try:
            _read_until(lambda: os.read(fd, 4096), b"echo ready\r\n")
            os.write(fd, b"pty\r")
            assert _read_until(lambda: os.read(fd, 4096), b"pty\r\n").endswith(b"pty\r\n")
            # "q" ends the guest; the emulator may close its side before the slave reads "bye"
            # (reads then fail with EIO), so only the exit status tells that it was taken
            os.write(fd, b"q")
        finally:
            os.close(fd)
        assert proc.wait(timeout=30) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

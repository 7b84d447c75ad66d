"""`emu run` as a user meets it: bad input gives one line and status 2, guests set the status."""

import subprocess
import sys

from conftest import ROOT, firmware, run_emu


def _one_line_error(result):
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, lines
    assert "Traceback" not in result.stderr.decode()
    return lines[0]


def test_missing_kernel_file():
    assert "no such file" in _one_line_error(run_emu("-kernel", "/nonexistent/k.elf"))


def test_unknown_option():
    assert "-frobnicate" in _one_line_error(run_emu("-kernel", firmware("hello.elf"), "-frobnicate"))


def test_bad_memory_size():
    assert "size" in _one_line_error(run_emu("-m", "lots", "-kernel", firmware("hello.elf")))


def test_bad_serial_spec():
    assert "bogus" in _one_line_error(run_emu("-serial", "bogus:thing", "-kernel", firmware("hello.elf")))


def test_unknown_trace_category():
    assert "nosuch" in _one_line_error(run_emu("-d", "nosuch", "-kernel", firmware("hello.elf")))


def test_not_multiboot(tmp_path):
    junk = tmp_path / "junk.elf"
    junk.write_bytes(b"\x7fELF" + b"\0" * 200)
    assert "junk.elf" in _one_line_error(run_emu("-kernel", str(junk)))


def test_nothing_to_run():
    assert "nothing to run" in _one_line_error(run_emu())


def test_hello_prints_and_exits_with_guest_status():
    result = run_emu("-kernel", firmware("hello.elf"), "-serial", "stdio")
    assert result.stdout == b"Hello from emu-colo!\r\n"
    assert result.returncode == 1  # the guest wrote 0 to isa-debug-exit: (0 << 1) | 1


def test_serial_to_file(tmp_path):
    out = tmp_path / "serial.txt"
    result = run_emu("-kernel", firmware("hello.elf"), "-serial", f"file:{out}")
    assert result.returncode == 1
    assert out.read_bytes() == b"Hello from emu-colo!\r\n"


def test_python_dash_m_and_console_script_agree():
    result = subprocess.run([sys.executable, "-m", "emu", "--help"], capture_output=True, cwd=ROOT)
    assert result.returncode == 0 and b"emu run" in result.stdout

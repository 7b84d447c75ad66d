"""Serial output floods: the C ring between the guest and the UART, a stdout nobody
reads, and the monitor served all the while."""

import contextlib
import os
import signal
import subprocess
import sys

import pytest
from conftest import ROOT, firmware
from emuproc import Qmp
from guestasm import assemble

from emu.chardev import STDIO_MAX_PENDING, StdioBackend
from emu.devices.fastpath import RING_SIZE
from machines import pc


@pytest.fixture
def alarm():
    """A hang becomes a failure (a blocking write would never return)."""
    def hung(signum, frame):
        raise AssertionError("blocked")
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_stdout_nobody_reads_never_blocks(alarm):
    read_end, write_end = os.pipe()
    backend = StdioBackend(in_fd=os.open(os.devnull, os.O_RDONLY), out_fd=write_end)
    chunk = bytes(range(256)) * 16
    total = 3 * STDIO_MAX_PENDING
    for _ in range(total // len(chunk)):
        backend.write(chunk)
    assert backend.dropped > 0
    taken = os.read(read_end, len(chunk))
    assert taken == chunk[:len(taken)]  # what went out went in order
    os.close(read_end)  # the reader goes away: held output is dropped, close returns
    backend.close()
    os.close(write_end)


def _machine_with_uart(tmp_path, out):
    code, _ = assemble(
        """
        mov edi, 0x200000
        xor eax, eax
    fill:
        mov byte ptr [edi + eax], al
        inc eax
        cmp eax, 300000
        jne fill
        mov esi, 0x200000
        mov ecx, 300000
        mov dx, 0x3f8
        rep outsb                 # one translated block: far more than the C ring holds
        mov al, 0
        out 0xf4, al
        """, 0x100000)
    image = tmp_path / "flood.bin"
    image.write_bytes(code)
    return pc.build(ram_size=8 << 20, flat=f"{image}@0x100000", serial=[f"file:{out}"], icount_shift=0)


def test_ring_overrun_keeps_every_byte_in_order(tmp_path):
    out = tmp_path / "serial.out"
    machine = _machine_with_uart(tmp_path, out)
    assert machine.run() == 1
    machine.close()
    assert out.read_bytes() == bytes(i & 0xFF for i in range(300000))


def test_drain_across_the_wrap_of_the_32_bit_counters(tmp_path):
    machine = _machine_with_uart(tmp_path, tmp_path / "serial.out")
    front = next(d for d in machine.devices if d.name == "serial@0x3f8")
    sent = []
    front.uart.emit_fast = sent.append
    s = machine.cstate
    tail = 0xFFFFFFF8  # 8 bytes before the head wraps, 8 after
    for k in range(16):
        s.ring[0][(tail + k) & (RING_SIZE - 1)] = k
    s.ring_tail[0] = tail
    s.ring_head[0] = (tail + 16) & 0xFFFFFFFF
    front.drain()
    assert sent == [bytes(range(16))]
    assert s.ring_tail[0] == s.ring_head[0] == 8
    machine.close()


def test_monitor_answers_while_the_guest_floods_a_stdout_nobody_reads(tmp_path):
    qmp_path = tmp_path / "qmp.sock"
    proc = subprocess.Popen([sys.executable, "-m", "emu", "run", "-kernel", firmware("serialout.elf"),
                             "-append", "bytes=4000000000", "-serial", "stdio",
                             "-qmp", f"unix:{qmp_path},server,nowait"],
                            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        qmp = Qmp(qmp_path)
        for _ in range(3):
            assert qmp("query-status")["status"] == "running"
        qmp("quit")
        with contextlib.suppress(EOFError):  # the process may be gone already
            qmp.close()
        assert proc.wait(timeout=60) == 0
        assert b"Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

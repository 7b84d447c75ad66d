"""A guest that triple-faults on every boot resets for ever, as on QEMU, without recursion.

firmware/tripleloop.rom writes one 'R' to COM1 per boot and triple-faults at once, so the
output counts the resets.  The run loop used to restart itself by recursion after each
triple fault and died of RecursionError after about a thousand.  Under -no-reboot the first
triple fault ends the run with status 0, on QEMU and on us.  (Not a firmware_cases.CASES
entry: it exits within nanoseconds of guest time, before the state tests' save points.)
"""

import os
import select
import subprocess
import sys
import time

import pytest
from conftest import ROOT, firmware, qemu_binary

from machines import pc

WANTED_RESETS = 2000


def _count_boots(command, wanted, timeout):
    """Start command, read COM1 until it has booted wanted times or timeout passes; then
    stop it.  Returns (boots, still running before the stop, stderr)."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    output = bytearray()
    deadline = time.monotonic() + timeout
    try:
        fd = proc.stdout.fileno()
        while output.count(b"R") < wanted and time.monotonic() < deadline:
            readable, _, _ = select.select([fd], [], [], 0.1)
            if readable:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                output += chunk
        running = proc.poll() is None
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=10)
    return output.count(b"R"), running, stderr


def test_endless_triple_faults_keep_resetting():
    rom = firmware("tripleloop.rom")
    boots, running, stderr = _count_boots(
        [sys.executable, "-m", "emu", "run", "-machine", "pc", "-m", "16M", "-serial", "stdio", "-bios", rom],
        WANTED_RESETS + 1, timeout=20)
    assert b"RecursionError" not in stderr and b"Traceback" not in stderr, stderr.decode(errors="replace")
    assert running, f"emu stopped after {boots} boots: {stderr.decode(errors='replace')}"
    assert boots > WANTED_RESETS


def test_endless_triple_faults_keep_resetting_on_qemu():
    qemu = qemu_binary()
    if qemu is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    boots, running, _ = _count_boots(
        [qemu, "-machine", "pc", "-accel", "tcg", "-m", "16M", "-nodefaults", "-display", "none",
         "-serial", "stdio", "-monitor", "none", "-bios", firmware("tripleloop.rom")], 100, timeout=20)
    assert running and boots >= 100


def test_no_reboot_stops_at_the_first_triple_fault_on_qemu():
    qemu = qemu_binary()
    if qemu is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    result = subprocess.run([qemu, "-machine", "pc", "-accel", "tcg", "-m", "16M", "-nodefaults", "-display", "none",
                             "-no-reboot", "-serial", "stdio", "-monitor", "none", "-bios", firmware("tripleloop.rom")],
                            capture_output=True, timeout=30)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"R", b"")


def test_no_reboot_stops_at_the_first_triple_fault():
    result = subprocess.run([sys.executable, "-m", "emu", "run", "-machine", "pc", "-m", "16M", "-no-reboot",
                             "-serial", "stdio", "-bios", firmware("tripleloop.rom")],
                            capture_output=True, timeout=30, cwd=ROOT)
    assert (result.returncode, result.stdout) == (0, b"R")
    assert result.stderr == (b"emu: cpu: triple fault: #GP while delivering #DF at RIP=0xc; "
                             b"stopping (-no-reboot)\n")


def test_events_of_a_triple_fault_are_qemus():
    """RESET (guest-reset) for each triple fault; under -no-reboot SHUTDOWN with reason
    guest-reset, as QEMU's qemu_system_reset_request(SHUTDOWN_CAUSE_GUEST_RESET)."""
    for no_reboot in (False, True):
        machine = pc.build(ram_size=16 << 20, bios=firmware("tripleloop.rom"), serial=(), no_reboot=no_reboot,
                           icount_shift=0)
        events = []
        machine.event_listeners.append(lambda name, data, events=events: events.append((name, data)))
        if no_reboot:
            assert machine.main_loop() == 0
            assert events == [("SHUTDOWN", {"guest": True, "reason": "guest-reset"})]
        else:
            machine.run(until_ns=20_000)
            resets = [data for name, data in events if name == "RESET"]
            assert len(resets) > 3 and resets[0] == {"guest": True, "reason": "guest-reset"}
            assert machine.stats["resets"] == len(resets)
        machine.close()

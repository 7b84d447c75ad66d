"""The PC at its edges on our emulator: unassigned memory, A20, resets, traces.

firmware/pcedges.elf also runs on QEMU (tests/firmware_cases.py); here are the parts where
this machine says more than QEMU: all ones from unassigned memory (QEMU 7.2 reads 0),
a trace that leaves the output alone, a reset that boots again, A20 across a snapshot.
"""

import re
import subprocess
import sys
import types

from conftest import ROOT, firmware, run_emu
from firmware_cases import pcedges_output

from machines import pc


def test_unassigned_memory_reads_all_ones():
    result = run_emu("-kernel", firmware("pcedges.elf"), "-serial", "stdio", "-no-reboot")
    assert re.fullmatch(pcedges_output(rb"ffffffff", rb"000000ff"), result.stdout), result.stdout
    assert result.returncode == 1, result.stderr


def test_trace_of_unassigned_accesses_changes_no_output():
    plain = run_emu("-icount", "-kernel", firmware("pcedges.elf"), "-serial", "stdio", "-no-reboot")
    traced = run_emu("-icount", "-kernel", firmware("pcedges.elf"), "-serial", "stdio", "-no-reboot",
                     "-d", "unassigned")
    assert traced.stdout == plain.stdout and b"\r\nXY\r\n" in plain.stdout
    assert traced.returncode == plain.returncode == 1
    trace = traced.stderr.decode()
    assert "read of physical address 0x8000000 size 4 (no device; reads all ones)" in trace
    assert "write to physical address 0xe0000000 size 4 value 0x12345678 (no device; dropped)" in trace
    assert "out port 0x02e0 size 1 value 0x5a" in trace


def test_keyboard_controller_reset_boots_again():
    proc = subprocess.Popen([sys.executable, "-m", "emu", "run", "-kernel", firmware("pcedges.elf"),
                             "-append", "reset=1", "-serial", "stdio"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        output = b""
        while output.count(b"resetting\r\n") < 2:
            chunk = proc.stdout.read1(4096)
            assert chunk, output
            output += chunk
        assert output.count(b"ALL PASS\r\n") >= 2 and b"FAIL" not in output
    finally:
        proc.kill()
        proc.wait()


def _a20_machine():
    return pc.build(ram_size=8 << 20, kernel=firmware("hello.elf"), serial=["null"], icount_shift=0)


def _a20(machine):
    return next(device for device in machine.devices if device.name == "a20")


def _cpu_reads(machine, address):
    """What a CPU load of ``address`` returns (the A20 gate sits in the CPU's path only)."""
    machine.ram.write(0x7000, b"\xa1" + address.to_bytes(4, "little") + b"\xf4")  # mov eax, [address]; hlt
    machine.cpu.set_reg("rip", 0x7000)
    machine.cpu.halted = False
    machine.run(until_ns=machine.clock.now() + 1_000_000)
    assert machine.cpu.halted and machine.cpu.rip == 0x7006
    return machine.cpu.reg("eax")


def test_a20_off_survives_a_snapshot():
    machine = _a20_machine()
    machine.cpu.enter(types.SimpleNamespace(mode="protected32", ip=0x7000, cs=0x08, regs={}))
    machine.ram.write(0x2F0000, b"\x11\x22\x33\x44")
    machine.ram.write(0x3F0000, b"\x55\x66\x77\x88")
    assert _cpu_reads(machine, 0x3F0000) == 0x88776655
    _a20(machine).set_level(0)
    assert _cpu_reads(machine, 0x3F0000) == 0x44332211
    data = machine.save_state(ram_pages="all")
    other = _a20_machine()
    other.load_state(data)
    assert not _a20(other).enabled
    assert _cpu_reads(other, 0x3F0000) == 0x44332211
    other.reset()  # a system reset enables A20 again
    other.cpu.enter(types.SimpleNamespace(mode="protected32", ip=0x7000, cs=0x08, regs={}))
    assert _a20(other).enabled and _cpu_reads(other, 0x3F0000) == 0x88776655

"""Assemble small test guests with GNU as (Intel syntax) and run them on a bare machine."""

import os
import subprocess
import tempfile

from emu.device import Device
from emu.loaders import EntryState
from emu.machine import Machine


def assemble(source, origin, bits=32):
    """Flat binary of ``source`` linked at ``origin``, plus its symbol table."""
    with tempfile.TemporaryDirectory() as tmp:
        src, obj, elf, binary = (os.path.join(tmp, n) for n in ("g.s", "g.o", "g.elf", "g.bin"))
        with open(src, "w") as f:
            f.write(f".intel_syntax noprefix\n.code{bits}\n{source}\n")
        subprocess.run(["as", "--64", src, "-o", obj], check=True, capture_output=True)
        subprocess.run(["ld", "-m", "elf_x86_64", "-e", "0", "-Ttext", hex(origin), "-o", elf, obj],
                       check=True, capture_output=True)
        subprocess.run(["objcopy", "-O", "binary", elf, binary], check=True, capture_output=True)
        symbols = {}
        for line in subprocess.run(["nm", elf], check=True, capture_output=True, text=True).stdout.splitlines():
            parts = line.split()
            if len(parts) == 3:
                symbols[parts[2]] = int(parts[0], 16)
        with open(binary, "rb") as f:
            return f.read(), symbols


class ExitPort(Device):
    """Port 0xf4: a write of v ends the run with status (v << 1) | 1 (isa-debug-exit)."""

    def __init__(self, machine):
        super().__init__("exit@0xf4")
        self.machine = machine

    def io_read(self, offset, size):
        return 0xFF

    def io_write(self, offset, size, value):
        self.machine.request_exit((value << 1) | 1)


class DebugConsole(Device):
    """Port 0xe9: every byte written is output (the Bochs/QEMU debugcon port)."""

    def __init__(self):
        super().__init__("debugcon@0xe9")
        self.output = bytearray()

    def io_read(self, offset, size):
        return 0xE9

    def io_write(self, offset, size, value):
        self.output.append(value & 0xFF)


def bare_machine(icount=True, ram=16 << 20, **kw):
    """A CPU, RAM, an exit port and a debug console; nothing else."""
    machine = Machine("bare", ram, icount=icount, **kw)
    machine.add_device(ExitPort(machine), [(0xF4, 1)])
    machine.console = machine.add_device(DebugConsole(), [(0xE9, 1)])
    return machine


def entry(mode, ip, cs=0x08, **regs):
    return EntryState(mode, ip, regs, cs=cs)

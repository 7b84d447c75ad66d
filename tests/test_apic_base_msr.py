"""IA32_APIC_BASE through RDMSR/WRMSR reaches the local APIC model (engine patch 0014).

firmware/apicipi.elf checks what QEMU and we agree on (the value read, a write of the same
value); these are the SDM's rules where QEMU 7.2 is silent: a reserved bit is #GP(0), and a
write that would move the APIC page fails loudly.
"""

import pytest
from conftest import requires_patched_engine
from guestasm import assemble

from emu.errors import UnsupportedError
from machines import pc

GUEST = r"""
start:
    mov esp, 0x90000
    lgdt [gdtr]                 # the gate's CS 0x08 must be in a GDT
    lidt [idtr]
    mov ecx, 0x1b
    mov eax, [value]
    xor edx, edx
    wrmsr                       # #GP(0) -> gp, which writes 'G' and exits
    rdmsr
    mov dx, 0xe9
    out dx, al                  # the low byte read back
    mov al, 0
    out 0xf4, al
gp:
    mov al, 'G'
    mov dx, 0xe9
    out dx, al
    mov al, 1
    out 0xf4, al
idtr: .word 0x7ff
      .long 0x80000
gdtr: .word 23
      .long gdt
gdt:  .quad 0, 0x00cf9a000000ffff, 0x00cf92000000ffff
value: .long 0
"""


def _run(tmp_path, value):
    code, symbols = assemble(GUEST, 0x100000)
    code = bytearray(code)
    at = symbols["value"] - 0x100000
    code[at:at + 4] = value.to_bytes(4, "little")
    image = tmp_path / "guest.bin"
    image.write_bytes(bytes(code))
    machine = pc.build(flat=f"{image}@0x100000", serial=(), icount_shift=0, debugcon="null")
    gate = symbols["gp"]  # vector 13: a 32-bit interrupt gate to gp
    machine.ram.write(0x80000 + 13 * 8, (gate & 0xFFFF | 0x08 << 16).to_bytes(4, "little")
                      + (0x8E00 | gate & 0xFFFF0000).to_bytes(4, "little"))
    lapic = next(device for device in machine.devices if device.name.startswith("lapic"))
    return machine.run(until_ns=1_000_000_000), lapic


@requires_patched_engine
def test_reserved_bit_is_gp_and_leaves_the_msr(tmp_path):
    status, lapic = _run(tmp_path, 0xFEE00900 | 1 << 9)
    assert status == 3 and lapic.base_msr == 0xFEE00900


@requires_patched_engine
def test_global_disable_through_the_msr(tmp_path):
    status, lapic = _run(tmp_path, 0xFEE00100)
    assert status == 1 and lapic.base_msr == 0xFEE00100 and not lapic.enabled


@requires_patched_engine
def test_moving_the_apic_page_fails_loudly(tmp_path):
    with pytest.raises(UnsupportedError, match=r"lapic@0xfee00000: WRMSR IA32_APIC_BASE 0xfed00900 moves the "
                                               r"APIC page away from 0xfee00000, which is not supported"):
        _run(tmp_path, 0xFED00900)

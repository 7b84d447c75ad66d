"""The layered physical address space (emu/memmap.py), seen by guest code on the CPU."""

import pytest
from conftest import requires_patched_engine
from guestasm import assemble, bare_machine, entry

from emu.device import Device
from emu.memmap import RAM_PRIORITY, ROM_PRIORITY, HostBuffer

RUN_NS = 1_000_000_000


class Registers(Device):
    """An MMIO device that remembers every access (offset from its own base)."""

    def __init__(self):
        super().__init__("regs")
        self.log = []

    def mmio_read(self, offset, size):
        self.log.append(("r", offset, size))
        return 0x1000 + offset

    def mmio_write(self, offset, size, value):
        self.log.append(("w", offset, size, value))


READER = r"""
start:
    mov eax, [0x20000]       # RAM, or whatever covers it now
    out 0xe9, al
    mov byte ptr [0x20000], 0x77
    mov eax, [0x20000]
    out 0xe9, al
    mov eax, [0xe0001000]    # the device's window
    mov [0x30000], eax
    mov dword ptr [0xe0001004], 0x12345678
    mov eax, [0xd0000000]    # nothing there: all ones
    mov [0x30004], eax
    mov al, 0
    out 0xf4, al
"""


def _machine():
    m = bare_machine()
    code, _ = assemble(READER, 0x100000)
    m.ram.write(0x100000, code)
    m.ram.write(0x20000, b"\x11")
    memory = m.memory
    return m, memory


def _run(m):
    m.cpu.enter(entry("protected32", 0x100000))
    assert m.run(until_ns=RUN_NS) == 1, m.exit_message


@requires_patched_engine
def test_rom_over_ram_is_read_and_its_writes_are_ignored():
    m, memory = _machine()
    device = Registers()
    rom = HostBuffer(b"\x42" * 0x1000)
    memory.add("rom", 0x20000, 0x1000, "rom", rom.address, priority=ROM_PRIORITY)
    window = memory.add("regs", 0xE0000000, 0x2000, "mmio", device, commit=False)
    memory.commit()
    _run(m)
    # the ROM hides RAM; the guest's store to it had no effect and was counted
    assert bytes(m.console.output) == b"\x42\x42"
    assert memory.region_at(0x20000).writes_ignored == 1
    assert m.ram.read(0x20000, 1) == b"\x11"
    assert device.log == [("r", 0x1000, 4), ("w", 0x1004, 4, 0x12345678)]
    assert m.ram.read_u32(0x30000) == 0x2000 and m.ram.read_u32(0x30004) == 0xFFFFFFFF
    assert any(hole.reads for hole in memory.holes)
    assert window.base == 0xE0000000


def test_removing_a_layer_shows_the_one_below():
    m, memory = _machine()
    rom = HostBuffer(b"\x42" * 0x1000)
    region = memory.add("rom", 0x20000, 0x1000, "rom", rom.address, priority=ROM_PRIORITY)
    memory.add("regs", 0xE0000000, 0x2000, "mmio", Registers())
    memory.remove(region)
    _run(m)
    assert bytes(m.console.output) == b"\x11\x77"  # RAM again, and writable


def test_a_moved_window_answers_at_its_new_base_and_leaves_a_hole():
    m, memory = _machine()
    device = Registers()
    window = memory.add("regs", 0xD0000000, 0x2000, "mmio", device)
    memory.move(window, 0xE0000000)
    _run(m)
    assert device.log == [("r", 0x1000, 4), ("w", 0x1004, 4, 0x12345678)]
    assert m.ram.read_u32(0x30004) == 0xFFFFFFFF  # the old place reads as nothing


def test_a_window_over_ram_is_hidden_by_it():
    m, memory = _machine()
    device = Registers()
    memory.add("bar", 0x20000, 0x1000, "mmio", device, priority=RAM_PRIORITY - 1)
    memory.add("regs", 0xE0000000, 0x2000, "mmio", Registers())
    _run(m)
    assert bytes(m.console.output) == b"\x11\x77" and device.log == []


def test_a_change_from_an_io_hook_lands_at_the_end_of_the_slice():
    m, memory = _machine()
    rom = HostBuffer(b"\x42" * 0x1000)

    class Switch(Device):
        def io_write(self, offset, size, value):
            memory.add("rom", 0x20000, 0x1000, "rom", rom.address, priority=ROM_PRIORITY)

    m.add_device(Switch("switch"), [(0x99, 1)])
    code, _ = assemble("""
        out 0x99, al
        jmp next            # the slice ends at this block's end
    next:
        mov eax, [0x20000]
        out 0xe9, al
        mov al, 0
        out 0xf4, al
    """, 0x100000)
    m.ram.write(0x100000, code)
    m.cpu.enter(entry("protected32", 0x100000))
    assert m.run(until_ns=RUN_NS) == 1
    assert bytes(m.console.output) == b"\x42"


def test_regions_must_be_page_aligned():
    m, memory = _machine()
    with pytest.raises(Exception, match="not page aligned"):
        memory.add("odd", 0x20010, 0x1000, "mmio", Registers())

"""fw_cfg through the guest's eyes: the selector/data ports, the file directory, DMA, state."""

import struct

import pytest

from emu.device import PortBus
from emu.errors import ConfigError, GuestError, StateError
from emu.fw_cfg import FwCfg
from emu.memory import GuestRam

SELECTOR, DATA, DMA_HIGH, DMA_LOW = 0x510, 0x511, 0x514, 0x518


def make(ram_size=64 << 20, cmdline=b"", dma_memory=None, **kwargs):
    fw = FwCfg("fw_cfg", ram_size=ram_size, cmdline=cmdline, dma_memory=dma_memory, **kwargs)
    bus = PortBus()
    for base, count in fw.port_ranges():
        bus.register(base, count, fw)
    return fw, bus


def select(bus, key):
    bus.write(SELECTOR, 2, key)


def read_bytes(bus, count):
    return bytes(bus.read(DATA, 1) for _ in range(count))


def read_item(bus, key, count):
    select(bus, key)
    return read_bytes(bus, count)


def find_file(bus, name):
    """What a guest driver does: walk the big-endian directory at selector 0x19."""
    select(bus, 0x19)
    (count,) = struct.unpack(">I", read_bytes(bus, 4))
    for _ in range(count):
        size, key, _reserved, raw = struct.unpack(">IHH56s", read_bytes(bus, 64))
        if raw.rstrip(b"\0").decode() == name:
            return key, size
    return None


def test_signature_and_id():
    fw, bus = make()
    assert read_item(bus, 0x0000, 4) == b"QEMU"
    assert struct.unpack("<I", read_item(bus, 0x0001, 4))[0] == 0x01  # traditional interface only


def test_signature_is_selected_after_reset():
    fw, bus = make()
    select(bus, 0x0003)
    read_bytes(bus, 3)
    fw.reset()
    assert read_bytes(bus, 4) == b"QEMU"


def test_reading_past_the_end_gives_zeros():
    fw, bus = make()
    assert read_item(bus, 0x0000, 8) == b"QEMU\0\0\0\0"


def test_selector_write_restarts_the_item():
    fw, bus = make()
    assert read_item(bus, 0x0000, 2) == b"QE"
    assert read_item(bus, 0x0000, 4) == b"QEMU"


@pytest.mark.parametrize("ram_size", [64 << 20, 256 << 20, 3 << 30])
def test_ram_size(ram_size):
    fw, bus = make(ram_size=ram_size)
    assert struct.unpack("<Q", read_item(bus, 0x0003, 8))[0] == ram_size


def test_cpu_count():
    fw, bus = make()
    assert struct.unpack("<H", read_item(bus, 0x0005, 2))[0] == 1


def test_command_line_is_nul_terminated():
    fw, bus = make(cmdline=b"console=ttyS0 quiet")
    size = struct.unpack("<I", read_item(bus, 0x0014, 4))[0]
    assert size == len(b"console=ttyS0 quiet") + 1
    assert read_item(bus, 0x0015, size) == b"console=ttyS0 quiet\0"


def test_no_command_line_items_without_a_command_line():
    fw, bus = make()
    assert read_item(bus, 0x0014, 4) == bytes(4)


def test_kernel_items():
    fw, bus = make()
    fw.add_kernel(0x100000, b"\x90" * 300, initrd_addr=0x800000, initrd=b"INITRD", cmdline_addr=0x20000)
    assert struct.unpack("<II", read_item(bus, 0x0007, 4) + read_item(bus, 0x0008, 4)) == (0x100000, 300)
    assert read_item(bus, 0x0011, 301) == b"\x90" * 300 + b"\0"
    assert struct.unpack("<I", read_item(bus, 0x000B, 4))[0] == 6
    assert read_item(bus, 0x0012, 6) == b"INITRD"
    assert read_item(bus, 0x0014, 4) == struct.pack("<I", 1)  # an empty command line, as QEMU
    assert read_item(bus, 0x0015, 2) == b"\0\0"


def test_unknown_and_invalid_selectors_read_zero():
    fw, bus = make()
    assert read_item(bus, 0x0006, 4) == bytes(4)  # in range, no item
    assert read_item(bus, 0x1234, 4) == bytes(4)  # beyond the file slots
    assert fw.cur_entry == 0xFFFF
    assert read_item(bus, 0x8000, 4) == bytes(4)  # arch-local, none added


def test_file_directory_lookup_like_a_guest_driver():
    fw, bus = make()
    e820 = struct.pack("<QQI", 0, 0x9FC00, 1) + struct.pack("<QQI", 0x100000, (64 << 20) - 0x100000, 1)
    fw.add_file("etc/e820", e820)
    fw.add_file("bootorder", b"/rom@genroms/linuxboot.bin\0")
    fw.add_file("etc/boot-fail-wait", struct.pack("<i", -1))
    key, size = find_file(bus, "etc/e820")
    assert size == len(e820)
    assert read_item(bus, key, size) == e820
    assert find_file(bus, "etc/missing") is None
    # QEMU's non-legacy order: sorted by name, selectors from 0x20
    assert find_file(bus, "bootorder") == (0x20, 27)
    assert find_file(bus, "etc/boot-fail-wait")[0] == 0x21
    assert key == 0x22 == fw.file_select("etc/e820")


def test_file_directory_has_zeroed_unused_slots():
    fw, bus = make()
    fw.add_file("a", b"x")
    select(bus, 0x19)
    directory = read_bytes(bus, 4 + 64 * 32 + 4)
    assert directory[:4] == struct.pack(">I", 1)
    assert directory[4 + 64:] == bytes(64 * 31 + 4)


def test_bad_file_configuration():
    fw, _ = make()
    fw.add_file("etc/e820", b"")
    with pytest.raises(ConfigError, match="duplicate"):
        fw.add_file("etc/e820", b"")
    with pytest.raises(ConfigError, match="file name"):
        fw.add_file("x" * 56, b"")
    with pytest.raises(ConfigError, match="added twice"):
        fw.add_item(0x0000, b"XXXX")
    for i in range(31):
        fw.add_file(f"f{i:02}", b"")
    with pytest.raises(ConfigError, match="no free file slot"):
        fw.add_file("one-too-many", b"")


def test_byte_writes_and_wide_reads_do_nothing():
    fw, bus = make()
    select(bus, 0x0000)
    bus.write(DATA, 1, 0x41)  # data writes were removed from QEMU in 2.4
    bus.write(SELECTOR, 1, 0x03)  # a byte write to the selector does not select
    assert bus.read(SELECTOR, 2) == 0  # the 8-bit data register rejects wider reads
    assert read_bytes(bus, 4) == b"QEMU"


def test_data_is_also_readable_at_the_selector_port():
    fw, bus = make()
    select(bus, 0x0000)
    assert bus.read(SELECTOR, 1) == ord("Q") and bus.read(DATA, 1) == ord("E")


def test_dma_register_absent_without_dma():
    fw, bus = make()
    assert bus.read(DMA_HIGH, 4) == 0xFFFFFFFF
    assert fw.port_ranges() == [(0x510, 2)]


# ---------------------------------------------------------------------- DMA
class FakeRam:
    def __init__(self, size):
        self.buf = bytearray(size)
        self.writes = []

    def read(self, addr, length):
        if addr < 0 or addr + length > len(self.buf):
            raise GuestError(f"ram: read {addr:#x}+{length:#x} outside RAM")
        return bytes(self.buf[addr:addr + length])

    def write(self, addr, data):
        if addr < 0 or addr + len(data) > len(self.buf):
            raise GuestError(f"ram: write {addr:#x}+{len(data):#x} outside RAM")
        self.buf[addr:addr + len(data)] = data
        self.writes.append((addr, len(data)))


def be32_out(bus, port, value):
    """outl(cpu_to_be32(value)) as SeaBIOS and Linux do it."""
    bus.write(port, 4, int.from_bytes(value.to_bytes(4, "big"), "little"))


def dma(bus, ram, descriptor, control, length, address):
    ram.buf[descriptor:descriptor + 16] = struct.pack(">IIQ", control, length, address)
    be32_out(bus, DMA_HIGH, descriptor >> 32)
    be32_out(bus, DMA_LOW, descriptor & 0xFFFFFFFF)
    return struct.unpack(">I", ram.buf[descriptor:descriptor + 4])[0]


def test_dma_signature_and_feature_bit():
    ram = FakeRam(1 << 16)
    fw, bus = make(dma_memory=ram)
    assert struct.unpack("<I", read_item(bus, 0x0001, 4))[0] == 0x03
    assert bytes(bus.read(DMA_HIGH + i, 1) for i in range(8)) == b"QEMU CFG"
    assert bus.read(DMA_HIGH, 4).to_bytes(4, "little") == b"QEMU"


def test_dma_select_and_read():
    ram = FakeRam(1 << 16)
    fw, bus = make(dma_memory=ram, cmdline=b"root=/dev/vda")
    status = dma(bus, ram, 0x1000, 0x0015 << 16 | 0x08 | 0x02, 20, 0x2000)
    assert status == 0
    assert ram.buf[0x2000:0x2014] == b"root=/dev/vda\0" + bytes(6)  # past the end: zeros
    assert fw.dma_addr == 0


def test_dma_into_guest_ram_marks_pages_dirty():
    ram = GuestRam(1 << 20)
    fw, bus = make(ram_size=ram.size, dma_memory=ram)
    ram.write(0x1000, struct.pack(">IIQ", 0x0003 << 16 | 0x08 | 0x02, 8, 0x5000))
    ram.host_dirty[:] = 0
    be32_out(bus, DMA_HIGH, 0)
    be32_out(bus, DMA_LOW, 0x1000)
    assert ram.read(0x5000, 8) == struct.pack("<Q", 1 << 20)
    assert ram.read(0x1000, 4) == bytes(4)  # control word: done, no error
    assert ram.host_dirty[5] == 1 and ram.host_dirty[1] == 1


def test_dma_skip_then_read_continues_at_offset():
    ram = FakeRam(1 << 16)
    fw, bus = make(dma_memory=ram)
    assert dma(bus, ram, 0x1000, 0x0000 << 16 | 0x08 | 0x04, 2, 0) == 0
    assert dma(bus, ram, 0x1000, 0x02, 2, 0x3000) == 0
    assert ram.buf[0x3000:0x3002] == b"MU"


def test_dma_write_fails_and_bad_address_reports_error():
    ram = FakeRam(1 << 16)
    fw, bus = make(dma_memory=ram)
    assert dma(bus, ram, 0x1000, 0x0000 << 16 | 0x08 | 0x10, 4, 0x2000) & 0x01
    assert dma(bus, ram, 0x1000, 0x0000 << 16 | 0x08 | 0x02, 4, 0xFFFFFF00) & 0x01


def test_dma_descriptor_outside_ram_is_ignored():
    ram = FakeRam(1 << 16)
    fw, bus = make(dma_memory=ram)
    be32_out(bus, DMA_HIGH, 0)
    be32_out(bus, DMA_LOW, 0x100000)
    assert ram.writes == []


# ---------------------------------------------------------------------- state
def test_state_round_trip_mid_item():
    fw, bus = make(cmdline=b"console=ttyS0")
    select(bus, 0x0015)
    assert read_bytes(bus, 8) == b"console="
    data = fw.VMSTATE.save(fw)
    other, other_bus = make(cmdline=b"console=ttyS0")
    other.VMSTATE.load(other, data, fw.VMSTATE.version_id)
    assert other.VMSTATE.save(other) == data
    assert read_bytes(other_bus, 6) == read_bytes(bus, 6) == b"ttyS0\0"


def test_state_round_trip_with_dma_address_half_written():
    ram = FakeRam(1 << 16)
    fw, bus = make(dma_memory=ram)
    be32_out(bus, DMA_HIGH, 0x1)
    data = fw.VMSTATE.save(fw)
    other, _ = make(dma_memory=FakeRam(1 << 16))
    other.VMSTATE.load(other, data, 1)
    assert other.dma_addr == 1 << 32
    assert other.VMSTATE.save(other) == data


def test_load_rejects_offset_past_the_item():
    fw, bus = make()
    select(bus, 0x0000)
    data = bytearray(fw.VMSTATE.save(fw))
    data[2:6] = struct.pack(">I", 5)  # "QEMU" has 4 bytes
    with pytest.raises(StateError, match="fw_cfg: cur_offset 5 is past the end of item 0x0"):
        fw.VMSTATE.load(fw, bytes(data), 1)


def test_load_rejects_invalid_selector():
    fw, _ = make()
    data = bytearray(fw.VMSTATE.save(fw))
    data[0:2] = struct.pack(">H", 0x1234)
    with pytest.raises(StateError, match="cur_entry 0x1234"):
        fw.VMSTATE.load(fw, bytes(data), 1)


def test_load_rejects_dma_state_without_dma():
    ram = FakeRam(1 << 16)
    fw, bus = make(dma_memory=ram)
    be32_out(bus, DMA_HIGH, 0x1)
    data = fw.VMSTATE.save(fw)
    other, _ = make()
    with pytest.raises(StateError, match="has no DMA"):
        other.VMSTATE.load(other, data, 1)

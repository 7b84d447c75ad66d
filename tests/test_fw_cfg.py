"""fw_cfg through the guest's eyes: the selector/data ports, the file directory, DMA, state,
and the ``-fw_cfg`` option that puts the user's files in the directory."""

import struct

import pytest
from conftest import firmware

from frontend.cli import run_parser, build_from_args
from emu.device import PortBus
from emu.errors import ConfigError, GuestError, StateError
from emu.devices.fw_cfg import FwCfg, parse_user_file
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


# ---------------------------------------------------------------------- -fw_cfg
@pytest.mark.parametrize("spec, name, data", [
    ("name=opt/a,string=hello", "opt/a", b"hello"),          # no NUL, as QEMU
    ("opt/a,string=hello", "opt/a", b"hello"),               # the implied first option is the name
    ("string=x,name=opt/a", "opt/a", b"x"),
    ("opt/a,string=a,,b,,,,c", "opt/a", b"a,b,,c"),          # ",," is a literal comma
    ("opt/a,string=first,string=last", "opt/a", b"last"),    # QemuOpts: the last one counts
    ("opt/" + "n" * 51 + ",string=x", "opt/" + "n" * 51, b"x"),  # 55 bytes: the longest name
])
def test_user_file_option(spec, name, data):
    user_file = parse_user_file(spec)
    assert (user_file.name, user_file.data, user_file.warning) == (name, data, None)


def test_user_file_from_a_file_keeps_every_byte(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(b"\0\xff\r\n" * 100)
    assert parse_user_file(f"opt/blob,file={path}").data == b"\0\xff\r\n" * 100
    path.write_bytes(b"")
    assert parse_user_file(f"opt/blob,file={path}").data == b""


def test_user_file_name_outside_opt_is_accepted_with_qemus_warning():
    user_file = parse_user_file("etc/x,string=y")
    assert user_file.data == b"y"
    assert user_file.warning == ('-fw_cfg etc/x,string=y: warning: externally provided fw_cfg item names '
                                 'should be prefixed with "opt/"')


@pytest.mark.parametrize("spec, message", [
    ("opt/a", "name, plus exactly one of file and string, are needed"),
    ("string=x", "name, plus exactly one of file and string, are needed"),
    ("opt/a,string=", "name, plus exactly one of file and string, are needed"),  # empty is absent, as QEMU
    ("opt/a,string=x,file=/etc/hostname", "name, plus exactly one of file and string, are needed"),
    ("opt/" + "n" * 52 + ",string=x", r"name too long \(56 bytes, max. 55\)"),
    ("opt/a,file=/nonexistent/blob", "can't load /nonexistent/blob: No such file or directory"),
    ("opt/a,size=3", "invalid parameter 'size'"),
    ("opt/a,string", "expected KEY=VALUE, got 'string'"),
    ("opt/a,gen_id=g", "gen_id is not supported"),
])
def test_bad_user_file_option_names_the_option(spec, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_user_file(spec)
    assert str(info.value).startswith(f"-fw_cfg {spec}: ")


def test_user_files_in_the_directory_as_a_guest_reads_them():
    fw, bus = make()
    fw.add_file("etc/e820", b"E" * 20)  # a machine file first, as QEMU's
    for spec in ("opt/b,string=bee", "name=opt/a,string=ay"):
        fw.add_user_file(parse_user_file(spec))
    select(bus, 0x19)
    count, *records = struct.unpack(">I" + "IHH56s" * 3, read_bytes(bus, 4 + 64 * 3))
    assert count == 3
    entries = [(records[i], records[i + 1], records[i + 2], records[i + 3].rstrip(b"\0")) for i in range(0, 12, 4)]
    assert entries == [(20, 0x20, 0, b"etc/e820"), (2, 0x21, 0, b"opt/a"), (3, 0x22, 0, b"opt/b")]
    assert read_item(bus, find_file(bus, "opt/b")[0], 4) == b"bee\0"  # past the end: zeros


def test_duplicate_user_file_names_the_option():
    fw, _ = make()
    fw.add_user_file(parse_user_file("opt/a,string=1"))
    with pytest.raises(ConfigError, match=r"^-fw_cfg opt/a,string=2: .*duplicate file 'opt/a'"):
        fw.add_user_file(parse_user_file("opt/a,string=2"))


def test_emu_run_fw_cfg_option_reaches_the_machine(tmp_path, capsys):
    blob = tmp_path / "blob"
    blob.write_bytes(b"from a file")
    args = run_parser().parse_args(["-kernel", firmware("hello.elf"), "-serial", "null",
                                     "-fw_cfg", "opt/emu-colo/node,string=P", "-fw_cfg", f"name=x,file={blob}"])
    machine = build_from_args(args)
    try:
        bus = machine.ports
        assert read_item(bus, find_file(bus, "opt/emu-colo/node")[0], 2) == b"P\0"
        assert read_item(bus, find_file(bus, "x")[0], 11) == b"from a file"
    finally:
        machine.close()
    assert 'emu: -fw_cfg name=x,file=' in capsys.readouterr().err
    args = run_parser().parse_args(["-kernel", firmware("hello.elf"), "-serial", "null",
                                     "-fw_cfg", "opt/a,string=1", "-fw_cfg", "opt/a,string=2"])
    with pytest.raises(ConfigError, match="duplicate file 'opt/a'"):
        build_from_args(args)


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


def test_load_accepts_an_offset_past_the_item_which_then_reads_as_its_end():
    """Items are host configuration: the destination's may be shorter (QEMU does not check)."""
    fw, bus = make()
    select(bus, 0x0000)
    data = bytearray(fw.VMSTATE.save(fw))
    data[2:6] = struct.pack(">I", 5)  # "QEMU" has 4 bytes
    fw.VMSTATE.load(fw, bytes(data), 1)
    assert fw.cur_offset == 5
    assert bus.read(0x511, 1) == 0


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

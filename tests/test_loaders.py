"""Image loaders: multiboot v1 (ELF32 and a.out kludge), flat binaries and the BIOS ROM.

Kernels are built here with GNU as/ld; the multiboot information is parsed back from guest
RAM as a kernel would read it.
"""

import random
import struct
import subprocess

import pytest

from emu import loaders
from emu.errors import ConfigError
from emu.memory import GuestRam
from guestasm import bare_machine

MIB = 1 << 20
MB_MAGIC = 0x1BADB002

LINKER_SCRIPT = """
ENTRY(_start)
SECTIONS {
  . = 0x100000;
  .text : { *(.multiboot) *(.text) }
  . = ALIGN(0x1000);
  .data : { *(.data) }
  .bss : { *(.bss) }
}
"""

# A higher-half layout: linked at 3 GiB + 1 MiB, loaded at 1 MiB.
HIGHER_HALF_SCRIPT = """
ENTRY(_start)
SECTIONS {
  . = 0xC0100000;
  .text : AT(0x100000) { *(.multiboot) *(.text) }
}
"""

KERNEL = """
    .section .multiboot, "a"
    .balign 4
    .long 0x1BADB002, {flags}, -(0x1BADB002 + {flags})
    .text
    .globl _start
    .code32
    nop
_start:
    mov $0x1234, %eax
    hlt
    .data
    .globl marker
marker:
    .ascii "DATA-SEGMENT"
    .bss
    .globl bss_start
bss_start:
    .skip 0x2345
"""


def build_elf(tmp_path, source, script=LINKER_SCRIPT, bits=32, name="kernel.elf"):
    src, obj, lds, out = (tmp_path / n for n in (f"{name}.S", f"{name}.o", f"{name}.ld", name))
    src.write_text(source)
    lds.write_text(script)
    subprocess.run(["as", f"--{bits}", "-o", obj, src], check=True, capture_output=True)
    emulation = "elf_i386" if bits == 32 else "elf_x86_64"
    subprocess.run(["ld", "-m", emulation, "-T", lds, "-o", out, obj], check=True, capture_output=True)
    return out


def symbols(path):
    table = {}
    for line in subprocess.run(["nm", path], check=True, capture_output=True, text=True).stdout.splitlines():
        parts = line.split()
        if len(parts) == 3:
            table[parts[2]] = int(parts[0], 16)
    return table


@pytest.fixture
def kernel(tmp_path):
    return build_elf(tmp_path, KERNEL.replace("{flags}", "0x3"))


def read_cstring(ram, address):
    data = ram.read(address, 4096)
    return data[:data.index(b"\0")]


def parse_info(ram, address):
    names = ("flags", "mem_lower", "mem_upper", "boot_device", "cmdline", "mods_count", "mods_addr")
    info = dict(zip(names, struct.unpack("<7I", ram.read(address, 28)), strict=True))
    info["mmap_length"], info["mmap_addr"] = struct.unpack("<2I", ram.read(address + 44, 8))
    info["boot_loader_name"] = ram.read_u32(address + 64)
    return info


def parse_mmap(ram, address, length):
    entries, offset = [], 0
    while offset < length:
        size, base, size_bytes, kind = struct.unpack("<IQQI", ram.read(address + offset, 24))
        entries.append((base, size_bytes, kind))
        offset += size + 4
    return entries


def parse_modules(ram, info):
    mods = []
    for i in range(info["mods_count"]):
        start, end, string, reserved = struct.unpack("<4I", ram.read(info["mods_addr"] + 16 * i, 16))
        mods.append((start, end, read_cstring(ram, string), reserved))
    return mods


# ----------------------------------------------------------------------------- ELF32 kernels

def test_elf_segments_land_at_physical_addresses_and_bss_is_zeroed(kernel):
    ram = GuestRam(64 * MIB)
    sym = symbols(kernel)
    ram.write(0x100000, b"\xAA" * 0x10000)          # left-overs from an earlier boot
    entry = loaders.load_multiboot(ram, str(kernel))
    assert sym["marker"] == 0x101000
    assert ram.read(0x101000, 12) == b"DATA-SEGMENT"
    assert ram.read(0x100000, 4) == struct.pack("<I", MB_MAGIC)
    assert ram.read(sym["bss_start"], 0x2345) == bytes(0x2345)
    assert entry.ip == sym["_start"] == 0x100000 + 12 + 1
    assert ram.read(entry.ip, 5) == b"\xb8\x34\x12\x00\x00"
    assert ram.host_dirty[0x100] and ram.host_dirty[0x101]


def test_entry_state_and_registers(kernel):
    ram = GuestRam(64 * MIB)
    entry = loaders.load_multiboot(ram, str(kernel))
    assert entry.mode == "protected32"
    assert entry.cs == 0x08 and entry.cs_base is None
    assert entry.regs["eax"] == 0x2BADB002
    assert entry.regs["ebx"] == loaders.INFO_ADDR == 0x9500
    assert entry.regs["ecx"] == entry.ip
    assert entry.regs["esp"] == 0x7000
    gdt, limit = entry.regs["gdt"], entry.regs["gdt_limit"]
    assert limit == 0x27
    descriptors = struct.unpack("<5Q", ram.read(gdt, limit + 1))
    assert descriptors[1] == 0x00CF9A000000FFFF and descriptors[2] == 0x00CF92000000FFFF
    assert entry.notes == []


def test_information_structure_for_64_mib(kernel):
    ram = GuestRam(64 * MIB)
    entry = loaders.load_multiboot(ram, str(kernel), cmdline="n=5 verbose")
    info = parse_info(ram, entry.regs["ebx"])
    assert info["flags"] == (1 << 0) | (1 << 1) | (1 << 2) | (1 << 3) | (1 << 6) | (1 << 9)
    assert info["mem_lower"] == 639
    assert info["mem_upper"] == (64 * MIB - MIB) // 1024 == 64512
    assert info["boot_device"] == 0x8000FFFF
    assert read_cstring(ram, info["cmdline"]) == f"{kernel} n=5 verbose".encode()
    assert read_cstring(ram, info["boot_loader_name"]) == b"emu-colo"
    assert info["mods_count"] == 0
    assert info["mmap_addr"] == 0x9000 and info["mmap_length"] == 4 * 24
    assert parse_mmap(ram, info["mmap_addr"], info["mmap_length"]) == [
        (0, 0x9FC00, 1), (0x9FC00, 0x400, 2), (0xF0000, 0x10000, 2), (0x100000, 63 * MIB, 1)]
    # the strings follow the kernel image (ends at bss end), page-aligned, as QEMU places them
    bss_end = symbols(kernel)["bss_start"] + 0x2345
    assert info["mods_addr"] == (bss_end + 0xFFF) & ~0xFFF
    # QEMU's order: module strings, kernel command line, then the name after the reserved space
    assert info["cmdline"] == info["mods_addr"]
    assert info["boot_loader_name"] == info["cmdline"] + len(f"{kernel} n=5 verbose") + 1


def test_empty_command_line_is_the_path_and_a_space_like_qemu(kernel):
    ram = GuestRam(16 * MIB)
    entry = loaders.load_multiboot(ram, str(kernel))
    info = parse_info(ram, entry.regs["ebx"])
    assert info["flags"] & (1 << 2)
    assert read_cstring(ram, info["cmdline"]) == f"{kernel} ".encode()
    assert info["mem_upper"] == 15 * 1024


def test_modules_are_page_aligned_after_the_kernel_with_their_strings(kernel, tmp_path):
    first, second = tmp_path / "first.bin", tmp_path / "second,odd.bin"
    first.write_bytes(b"F" * 5000)
    second.write_bytes(b"S" * 10)
    ram = GuestRam(64 * MIB)
    ram.write(0x104000, b"\xAA" * 0x10000)
    initrd = f"{first} root=/dev/x a=1,{str(second).replace(',', ',,')}"
    entry = loaders.load_multiboot(ram, str(kernel), cmdline="k", modules=initrd)
    info = parse_info(ram, entry.regs["ebx"])
    mods = parse_modules(ram, info)
    assert len(mods) == info["mods_count"] == 2
    (s1, e1, str1, r1), (s2, e2, str2, r2) = mods
    assert str1 == f"{first} root=/dev/x a=1".encode() and str2 == str(second).encode()
    assert s1 % 4096 == 0 and s2 % 4096 == 0
    assert s1 >= info["mods_addr"] + 4096            # after the page holding list and strings
    assert e1 - s1 == 5000 and e2 - s2 == 10
    assert s2 == s1 + 8192                            # 5000 bytes round up to two pages
    assert r1 == r2 == 0
    assert ram.read(s1, 5000) == b"F" * 5000 and ram.read(s2, 10) == b"S" * 10
    assert ram.read(e1, s2 - e1) == bytes(s2 - e1)    # padding zeroed over the old contents
    assert read_cstring(ram, info["cmdline"]) == f"{kernel} k".encode()
    strings = info["mods_addr"] + 2 * 16
    assert [m[2] for m in mods] == [read_cstring(ram, strings), read_cstring(ram, strings + len(str1) + 1)]
    assert info["cmdline"] == strings + len(str1) + 1 + len(str2) + 1
    assert info["boot_loader_name"] == strings + len(f"{kernel} k") + 1 + len(initrd) + 1


def test_module_list_string_and_list_forms_agree(kernel, tmp_path):
    mod = tmp_path / "m.bin"
    mod.write_bytes(b"module")
    assert loaders.parse_module_list(f"{mod} x,,y,{mod}") == [f"{mod} x,y", str(mod)]
    assert loaders.parse_module_list("") == []
    by_string, by_list = GuestRam(16 * MIB), GuestRam(16 * MIB)
    loaders.load_multiboot(by_string, str(kernel), modules=f"{mod} x,,y,{mod}")
    loaders.load_multiboot(by_list, str(kernel), modules=[f"{mod} x,y", str(mod)])
    assert by_string.read(0, 4 * MIB) == by_list.read(0, 4 * MIB)


def test_higher_half_entry_is_translated_to_its_physical_address(tmp_path):
    path = build_elf(tmp_path, KERNEL.replace("{flags}", "0").split(".data")[0], HIGHER_HALF_SCRIPT)
    assert symbols(path)["_start"] == 0xC010000D
    ram = GuestRam(16 * MIB)
    entry = loaders.load_multiboot(ram, str(path))
    assert entry.ip == 0x10000D
    assert ram.read(0x10000D, 1) == b"\xb8"


def test_video_mode_request_is_ignored_with_a_note(tmp_path):
    path = build_elf(tmp_path, KERNEL.replace("{flags}", "0x7"))
    entry = loaders.load_multiboot(GuestRam(16 * MIB), str(path))
    assert len(entry.notes) == 1 and "video mode" in entry.notes[0]


def test_multiboot_kernel_boots_on_the_cpu(tmp_path):
    """The entry state really runs: magic, info pointer, stack and the loader's GDT."""
    source = """
        .section .multiboot, "a"
        .long 0x1BADB002, 0, -0x1BADB002
        .text
        .globl _start
    _start:
        cmp $0x2BADB002, %eax
        jne fail
        mov $0x10, %dx              # reload data segments from the loader's GDT
        mov %dx, %ds
        mov %dx, %ss
        push 16(%ebx)               # the command line pointer, through the stack
        pop %esi
        mov $0xE9, %dx
    print:
        lodsb
        test %al, %al
        jz done
        out %al, %dx
        jmp print
    done:
        mov $0, %al
        out %al, $0xF4
    fail:
        mov $1, %al
        out %al, $0xF4
    """
    path = build_elf(tmp_path, source)
    machine = bare_machine(ram=8 * MIB)
    machine.cpu.enter(loaders.load_multiboot(machine.ram, str(path), cmdline="hello"))
    status = machine.run(until_ns=1_000_000_000)
    assert bytes(machine.console.output) == f"{path} hello".encode()
    assert status == 1


# ----------------------------------------------------------------------------- a.out kludge

AOUT_KERNEL = """
    .code32
    .globl start
start:
header:
    .long 0x1BADB002, 0x00010000, -(0x1BADB002 + 0x00010000)
    .long header, start, load_end, load_end + 0x3000, entry
    .ascii "PAYLOAD!"
entry:
    mov $0x5678, %eax
    hlt
load_end:
"""


def build_aout(tmp_path, address=0x200000):
    src, obj, out = tmp_path / "aout.S", tmp_path / "aout.o", tmp_path / "aout.bin"
    src.write_text(AOUT_KERNEL)
    subprocess.run(["as", "--32", "-o", obj, src], check=True, capture_output=True)
    subprocess.run(["ld", "-m", "elf_i386", "-Ttext", hex(address), "--oformat", "binary", "-o", out, obj],
                   check=True, capture_output=True)
    return out


def test_aout_kludge_loads_a_flat_binary_with_bss(tmp_path):
    path = build_aout(tmp_path)
    image = path.read_bytes()
    ram = GuestRam(16 * MIB)
    ram.write(0x200000, b"\xAA" * 0x8000)
    entry = loaders.load_multiboot(ram, str(path), cmdline="x")
    assert ram.read(0x200000, len(image)) == image
    assert ram.read(0x200000 + len(image), 0x3000) == bytes(0x3000)
    assert ram.read(0x200000 + len(image) + 0x3000, 4) == b"\xAA" * 4   # past bss_end: untouched
    assert entry.ip == 0x200000 + 32 + 8
    assert ram.read(entry.ip, 5) == b"\xb8\x78\x56\x00\x00"
    info = parse_info(ram, entry.regs["ebx"])
    assert info["mods_addr"] == 0x200000 + ((len(image) + 0x3000 + 0xFFF) & ~0xFFF)


def aout_image(header_addr=0x100010, load_addr=0x100000, load_end=0x100040, bss_end=0x101000,
               entry=0x100030, flags=0x10000, prefix=16, length=0x40):
    """A flat image whose multiboot header sits ``prefix`` bytes into the file."""
    header = struct.pack("<3I5I", MB_MAGIC, flags, (-(MB_MAGIC + flags)) & 0xFFFFFFFF,
                         header_addr, load_addr, load_end, bss_end, entry)
    image = bytearray(b"\x90" * max(length, prefix + len(header)))
    image[prefix:prefix + len(header)] = header
    return bytes(image)


def test_aout_without_load_end_loads_the_rest_of_the_file(tmp_path):
    path = tmp_path / "k.bin"
    image = aout_image(load_end=0, bss_end=0, length=0x1234)
    path.write_bytes(b"\xFF" * 0x100 + image)       # header at 0x110: text starts at file offset 0x100
    ram = GuestRam(16 * MIB)
    loaders.load_multiboot(ram, str(path))
    assert ram.read(0x100000, len(image)) == image


@pytest.mark.parametrize("fields, message", [
    (dict(header_addr=0x0FFFF0), "header_addr 0xffff0 is below load_addr 0x100000"),
    (dict(header_addr=0x100020), "more than the header's file offset 0x10"),
    (dict(load_end=0x0F0000), "load_end_addr 0xf0000 is below load_addr"),
    (dict(load_end=0x100800), "file ends before multiboot load_end_addr 0x100800"),
    (dict(bss_end=0x100020), "bss_end_addr 0x100020 is below the end of the loaded image 0x100040"),
    (dict(load_addr=0xFFFFF000, header_addr=0xFFFFF010, load_end=0, bss_end=0x0),
     "does not fit in the 32-bit address space"),
    (dict(load_addr=0xA0000, header_addr=0xA0010, load_end=0xA0040, bss_end=0, entry=0xA0030),
     "entry point 0xa0030 lies in 0xa0000-0xfffff (VGA, option ROMs and BIOS), which is not RAM"),
    # the module list follows the image, page-aligned: at 0x9f000 it would reach the EBDA
    (dict(load_addr=0x8000, header_addr=0x8010, load_end=0x8040, bss_end=0x9E800, entry=0x8030),
     "multiboot module list and strings at 0x9f000-0x9ffff overlaps 0x9fc00-0xfffff (EBDA, VGA and BIOS area)"),
    (dict(bss_end=0x1001000), "a.out kludge image at 0x100000-0x1000fff ends beyond the 16 MiB of RAM"),
    (dict(entry=0x2000000), "entry point 0x2000000 is outside the 16 MiB of RAM"),
    (dict(flags=0x10008), "unknown required bits 0x8"),
])
def test_aout_errors(tmp_path, fields, message):
    if fields.get("load_addr") == 0xFFFFF000:
        fields["length"] = 0x2000
    path = tmp_path / "bad.bin"
    path.write_bytes(aout_image(**fields))
    with pytest.raises(ConfigError) as err:
        loaders.load_multiboot(GuestRam(16 * MIB), str(path))
    text = str(err.value)
    assert message in text and str(path) in text and "\n" not in text


def test_module_that_would_not_fit_in_ram_is_refused(tmp_path):
    kernel, mod = tmp_path / "k.bin", tmp_path / "big.bin"
    kernel.write_bytes(aout_image())
    mod.write_bytes(bytes(2 * MIB))
    with pytest.raises(ConfigError, match="module .*big.bin.* ends beyond the 2 MiB of RAM"):
        loaders.load_multiboot(GuestRam(2 * MIB), str(kernel), modules=[str(mod)])


# ----------------------------------------------------------------------------- refused images

def expect_error(message, *args, **kwargs):
    with pytest.raises(ConfigError) as err:
        loaders.load_multiboot(GuestRam(16 * MIB), *args, **kwargs)
    text = str(err.value)
    assert message in text, text
    assert "\n" not in text
    return text


def test_missing_kernel_file(tmp_path):
    assert str(tmp_path) in expect_error("no such file", str(tmp_path / "nope.elf"))


def test_missing_module(kernel, tmp_path):
    text = expect_error("no such file", str(kernel), modules=f"{tmp_path}/gone.bin arg")
    assert "gone.bin" in text and "arg" not in text


def test_empty_module_name(kernel):
    expect_error("empty multiboot module name", str(kernel), modules=f"{kernel},")


def test_no_multiboot_header(tmp_path):
    path = tmp_path / "plain.bin"
    path.write_bytes(b"\x90" * 100 + struct.pack("<I", MB_MAGIC)[:3] + bytes(9000))
    assert "plain.bin" in expect_error("no multiboot header", str(path))


def test_header_beyond_the_search_window_is_not_found(tmp_path):
    path = tmp_path / "late.bin"
    path.write_bytes(bytes(8192 - 44) + aout_image(prefix=0))
    expect_error("no multiboot header", str(path))


def test_bad_checksum(tmp_path):
    path = tmp_path / "bad.bin"
    path.write_bytes(bytes(8) + struct.pack("<3I", MB_MAGIC, 0, 0) + bytes(64))
    expect_error("multiboot header at offset 0x8 has a bad checksum 0x00000000", str(path))


def test_valid_header_after_a_broken_one_is_used(tmp_path):
    path = tmp_path / "two.bin"
    good = aout_image(header_addr=0x100020, prefix=0x20, length=0x60, load_end=0x100060)
    path.write_bytes(struct.pack("<3I", MB_MAGIC, 0, 1) + good[12:])
    entry = loaders.load_multiboot(GuestRam(16 * MIB), str(path))
    assert entry.ip == 0x100030


def test_elf64_is_refused(tmp_path):
    path = build_elf(tmp_path, KERNEL.replace("{flags}", "0").replace(".code32", ".code64"), bits=64)
    text = expect_error("multiboot v1 needs an ELF32 image", str(path))
    assert "kernel.elf" in text and "Cannot load x86-64 image" in text


def test_elf64_with_the_aout_kludge_loads_as_flat_like_qemu(tmp_path):
    image = bytearray(aout_image(header_addr=0x100040, prefix=0x40, length=0x80, load_end=0x100080))
    image[:8] = b"\x7fELF\x02\x01\x01\x00"
    image[18:20] = struct.pack("<H", 62)
    path = tmp_path / "k64.elf"
    path.write_bytes(image)
    ram = GuestRam(16 * MIB)
    loaders.load_multiboot(ram, str(path))
    assert ram.read(0x100000, len(image)) == bytes(image)


def test_non_elf_without_address_fields(tmp_path):
    path = tmp_path / "raw.bin"
    path.write_bytes(struct.pack("<3I", MB_MAGIC, 0, -MB_MAGIC & 0xFFFFFFFF) + bytes(100))
    expect_error("needs an ELF32 image, and this is not ELF", str(path))


def test_truncated_elf(kernel, tmp_path):
    path = tmp_path / "cut.elf"
    path.write_bytes(kernel.read_bytes()[:0x1100])      # the header survives, the .data segment does not
    expect_error("program header 1 reaches past the end of the file", str(path))


def test_corrupted_elf_headers_give_config_errors(kernel, tmp_path):
    """Any damage to the ELF and program headers either loads or is a ConfigError."""
    image, path, ram = kernel.read_bytes(), tmp_path / "mutant.elf", GuestRam(16 * MIB)
    rng = random.Random(7)
    outcomes = set()
    for _trial in range(300):
        mutant = bytearray(image)
        for _byte in range(rng.randint(1, 3)):
            mutant[rng.randrange(0x74)] = rng.randrange(256)   # ELF header and both program headers
        path.write_bytes(mutant)
        try:
            loaders.load_multiboot(ram, str(path))
            outcomes.add("loaded")
        except ConfigError as e:
            assert "\n" not in str(e)
            outcomes.add("refused")
    assert outcomes == {"loaded", "refused"}


def test_elf_segment_outside_ram(tmp_path):
    script = LINKER_SCRIPT.replace("0x100000", "0x2000000")
    path = build_elf(tmp_path, KERNEL.replace("{flags}", "0"), script)
    expect_error("program header 0 at 0x2000000-", str(path))


def test_a_kernel_over_the_boot_area_keeps_its_bytes_and_the_boot_area_moves(tmp_path):
    """QEMU writes the kernel over its boot structures at 0x9000 (EBX then points at kernel
    bytes); we keep the kernel intact and put the structures after it, with a note."""
    path = build_elf(tmp_path, KERNEL.replace("{flags}", "0"), LINKER_SCRIPT.replace("0x100000", "0x8000"))
    ram = GuestRam(16 * MIB)
    entry = loaders.load_multiboot(ram, str(path), cmdline="x=1")
    sym = symbols(path)
    assert ram.read(sym["marker"], 12) == b"DATA-SEGMENT"            # the page at 0x9000 is the kernel's
    end = sym["bss_start"] + 0x2345
    info = parse_info(ram, entry.regs["ebx"])
    boot_area = entry.regs["ebx"] - loaders.INFO_OFFSET
    assert boot_area % 0x1000 == 0 and boot_area >= end
    assert read_cstring(ram, info["cmdline"]) == f"{path} x=1".encode()
    assert info["mmap_addr"] == boot_area and info["mem_lower"] == 639
    assert parse_mmap(ram, info["mmap_addr"], info["mmap_length"])[0] == (0, 0x9FC00, 1)
    descriptors = struct.unpack("<5Q", ram.read(entry.regs["gdt"], entry.regs["gdt_limit"] + 1))
    assert entry.regs["gdt"] == boot_area + 0x800 and descriptors[1] == 0x00CF9A000000FFFF
    assert any(f"EBX={entry.regs['ebx']:#x}" in note for note in entry.notes)


def test_a_header_only_segment_in_the_bios_area_is_left_out(tmp_path):
    """Plain `ld -m elf_i386 -Ttext=0x100000` (binutils >= 2.31, separate code) puts the ELF
    and program headers in a read-only PT_LOAD at 0xff000: QEMU's copy there hits the BIOS
    shadow, and the kernel runs.  So does ours, with a note."""
    src, obj, out = tmp_path / "k.S", tmp_path / "k.o", tmp_path / "k.elf"
    src.write_text(KERNEL.replace("{flags}", "0").replace('.section .multiboot, "a"', ".text"))
    subprocess.run(["as", "--32", "-o", obj, src], check=True, capture_output=True)
    subprocess.run(["ld", "-m", "elf_i386", "-Ttext=0x100000", "-o", out, obj], check=True, capture_output=True)
    segments = loaders._elf_pieces(out.read_bytes(), str(out))[0]
    if not any(p.address < 0x100000 for p in segments):
        pytest.skip("this ld does not put the headers in a segment of their own")
    ram = GuestRam(16 * MIB)
    ram.write(0xF0000, b"\xEE" * 0x10000)
    entry = loaders.load_multiboot(ram, str(out))
    assert ram.read(0xF0000, 0x10000) == b"\xEE" * 0x10000          # nothing written below 1 MiB
    assert ram.read(entry.ip, 5) == b"\xb8\x34\x12\x00\x00"
    assert entry.regs["ebx"] == 0x9500
    assert any("not loaded, as under QEMU" in note and "0xff000" in note for note in entry.notes)


def test_a_truncated_linux_bzimage_is_dispatched_to_the_linux_loader(tmp_path):
    path = tmp_path / "bzImage"
    image = bytearray(0x400)
    image[0x202:0x206] = b"HdrS"
    path.write_bytes(image)
    with pytest.raises(ConfigError, match="bzImage"):
        loaders.load_kernel(GuestRam(16 * MIB), str(path))


def test_load_kernel_dispatches_multiboot(kernel):
    ram = GuestRam(16 * MIB)
    assert loaders.load_kernel(ram, str(kernel), "a", []) == loaders.load_multiboot(GuestRam(16 * MIB),
                                                                                      str(kernel), "a")
    with pytest.raises(ConfigError, match="not a multiboot kernel"):
        loaders.load_kernel(ram, __file__)


# ----------------------------------------------------------------------------- flat binaries

def test_flat_binary(tmp_path):
    path = tmp_path / "flat.bin"
    path.write_bytes(b"\xf4" * 300)
    ram = GuestRam(16 * MIB)
    entry = loaders.load_flat(ram, str(path), 0x7C00)
    assert ram.read(0x7C00, 300) == b"\xf4" * 300
    assert (entry.mode, entry.ip, entry.cs, entry.regs) == ("protected32", 0x7C00, 0x08, {})
    assert loaders.load_flat(ram, str(path), 0x7C00, entry=0x7C10).ip == 0x7C10


@pytest.mark.parametrize("content, address, message", [
    (None, 0x1000, "no such file"),
    (b"", 0x1000, "is empty"),
    (b"x" * 0x2000, 16 * MIB - 0x1000, "do not fit in the 16 MiB of RAM"),
])
def test_flat_binary_errors(tmp_path, content, address, message):
    path = tmp_path / "flat.bin"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        loaders.load_flat(GuestRam(16 * MIB), str(path), address)


# ----------------------------------------------------------------------------- BIOS

@pytest.mark.parametrize("size", [0, 1000, 64 * 1024 + 1, 17 * MIB])
def test_bios_size_is_checked(tmp_path, size):
    path = tmp_path / "bios.bin"
    path.write_bytes(bytes(size))
    with pytest.raises(ConfigError, match=r"could not load PC BIOS '.*bios.bin': size"):
        loaders.load_bios(str(path))


def test_missing_bios():
    with pytest.raises(ConfigError, match="could not load PC BIOS '/nonexistent/b.rom': no such file"):
        loaders.load_bios("/nonexistent/b.rom")


def test_small_bios_is_mapped_whole_below_4g_and_1m(tmp_path):
    path = tmp_path / "bios.bin"
    rom = bytes(range(256)) * 256
    path.write_bytes(rom)
    assert loaders.load_bios(str(path)) == rom
    assert loaders.bios_layout(rom) == [(0xFFFF0000, rom), (0xF0000, rom)]


def test_large_bios_aliases_its_last_128k_at_0xe0000():
    rom = bytes(128 * 1024) + b"\x11" * (128 * 1024)
    (high, high_data), (isa, isa_data) = loaders.bios_layout(rom)
    assert (high, high_data) == (0xFFFC0000, rom)
    assert isa == 0xE0000 and isa_data == b"\x11" * (128 * 1024)
    with pytest.raises(ConfigError):
        loaders.bios_layout(b"\0" * 100)


def test_bios_entry_is_the_reset_vector():
    entry = loaders.bios_entry()
    assert (entry.mode, entry.cs, entry.ip, entry.cs_base) == ("real", 0xF000, 0xFFF0, 0xFFFF0000)
    assert entry.cs_base + entry.ip == 0xFFFFFFF0


# ----------------------------------------------------------------------------- PVH

PVH_KERNEL = """
    .section .note.Xen, "a", @note
    .balign 4
    .long 4, {descsz}, 18
    .asciz "Xen"
    {width} pvh_start
    .text
    .code32
    .globl pvh_start
    nop
pvh_start:
    hlt
"""

PVH_SCRIPT = """
ENTRY(pvh_start)
PHDRS { text PT_LOAD FLAGS(5); note PT_NOTE FLAGS(4); }
SECTIONS { . = {base}; .text : { *(.text) } :text .note.Xen : { *(.note.Xen) } :text :note }
"""


def pvh_elf(tmp_path, bits=32, base=0x100000, descsz=None):
    width = ".long" if bits == 32 else ".quad"
    source = PVH_KERNEL.format(descsz=descsz or bits // 8, width=width)
    return build_elf(tmp_path, source, PVH_SCRIPT.replace("{base}", hex(base)), bits=bits, name=f"pvh{bits}.elf")


def parse_start_info(ram, address):
    names = ("magic", "version", "flags", "nr_modules", "modlist", "cmdline", "rsdp", "memmap", "memmap_entries")
    return dict(zip(names, struct.unpack("<IIIIQQQQI", ram.read(address, 52)), strict=True))


@pytest.mark.parametrize("bits", [32, 64])
def test_a_pvh_elf_is_entered_at_its_note_with_the_start_info(tmp_path, bits):
    path = pvh_elf(tmp_path, bits)
    module = tmp_path / "module.bin"
    module.write_bytes(b"M" * 5000)
    ram = GuestRam(16 * MIB)
    entry = loaders.load_kernel(ram, str(path), "console=ttyS0", [str(module)])
    assert (entry.mode, entry.ip, entry.cs) == ("protected32", symbols(path)["pvh_start"], 0x08)
    info = parse_start_info(ram, entry.regs["ebx"])
    assert (info["magic"], info["version"], info["flags"], info["rsdp"]) == (0x336EC578, 1, 0, 0)
    assert read_cstring(ram, info["cmdline"]) == b"console=ttyS0"         # no path prefix, as QEMU
    memmap = [struct.unpack("<QQII", ram.read(info["memmap"] + 24 * i, 24))[:3] for i in range(info["memmap_entries"])]
    assert memmap[0] == (0, 0x9FC00, 1) and memmap[-1] == (0x100000, 15 * MIB, 1)
    assert info["nr_modules"] == 1
    paddr, size = struct.unpack("<QQ", ram.read(info["modlist"], 16))
    assert size == 5000 and paddr % 4096 == 0 and paddr + size <= 16 * MIB < paddr + size + 4096
    assert ram.read(paddr, size) == b"M" * 5000
    descriptors = struct.unpack("<5Q", ram.read(entry.regs["gdt"], entry.regs["gdt_limit"] + 1))
    assert descriptors[1] == 0x00CF9A000000FFFF and descriptors[2] == 0x00CF92000000FFFF


def test_a_pvh_kernel_over_the_boot_page_moves_the_start_info(tmp_path):
    path = pvh_elf(tmp_path, base=0x9000)
    ram = GuestRam(16 * MIB)
    entry = loaders.load_kernel(ram, str(path), "x=1")
    assert ram.read(entry.ip, 1) == b"\xf4"                                  # the kernel's hlt is intact
    assert entry.regs["ebx"] == 0xA500 and parse_start_info(ram, 0xA500)["magic"] == 0x336EC578
    assert read_cstring(ram, parse_start_info(ram, 0xA500)["cmdline"]) == b"x=1"
    assert any("EBX=0xa500" in note for note in entry.notes)


def test_pvh_errors_name_what_collides(tmp_path):
    big = tmp_path / "big.img"
    big.write_bytes(bytes(15 * MIB))
    with pytest.raises(ConfigError, match=r"initrd .*big.img: 15728640 bytes do not fit between the kernel"):
        loaders.load_kernel(GuestRam(16 * MIB), str(pvh_elf(tmp_path)), "", [str(big)])
    with pytest.raises(ConfigError, match="takes one -initrd file, got 2"):
        loaders.load_kernel(GuestRam(16 * MIB), str(pvh_elf(tmp_path)), "", [str(big), str(big)])
    with pytest.raises(ConfigError, match="the PVH entry note has 2 bytes of address"):
        loaders.load_kernel(GuestRam(16 * MIB), str(pvh_elf(tmp_path, descsz=2)))


def test_an_elf_without_multiboot_header_or_pvh_note_is_refused_and_multiboot2_is_named(tmp_path):
    plain = build_elf(tmp_path, ".text\n.globl _start\n_start: hlt\n",
                      "ENTRY(_start)\nSECTIONS { . = 0x100000; .text : { *(.text) } }")
    with pytest.raises(ConfigError, match=r"not a Linux bzImage and not an ELF with a PVH entry note$"):
        loaders.load_kernel(GuestRam(16 * MIB), str(plain))
    mb2 = tmp_path / "mb2.bin"
    mb2.write_bytes(bytes(64) + struct.pack("<4I", 0xE85250D6, 0, 16, (-(0xE85250D6 + 16)) & 0xFFFFFFFF) + bytes(64))
    with pytest.raises(ConfigError, match="it has a multiboot2 header, which QEMU's -kernel does not load either"):
        loaders.load_kernel(GuestRam(16 * MIB), str(mb2))

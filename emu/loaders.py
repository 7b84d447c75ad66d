"""Boot image loaders: multiboot v1 kernels, raw binaries and the PC BIOS ROM.

Each loader writes its image into guest RAM through :meth:`GuestRam.write` (so the pages are
marked dirty and stale translated code is dropped) and returns an :class:`EntryState` that
``Cpu.enter`` turns into registers.

Multiboot follows the Multiboot Specification 0.6.96 and hands the kernel what QEMU does
(hw/i386/multiboot.c together with its option ROM pc-bios/optionrom/multiboot.S), so a
kernel sees the same addresses under both:

====================  ==================================================================
``0x7000``            initial ESP (QEMU jumps to the kernel on SeaBIOS's stack near here)
``0x9000-0x94ff``     memory map: e820 entries, each with the multiboot ``size`` prefix
``0x9500-0x9557``     multiboot information structure (EBX)
``0x9800-0x9827``     GDT as the option ROM's: 0x08 code32, 0x10 data32, 0x18 code16,
                      0x20 data16, all base 0
kernel end, aligned   module list, module strings, kernel command line, boot loader name
next pages            each module, page-aligned, in ``-initrd`` order
====================  ==================================================================

The kernel starts in 32-bit protected mode, paging and interrupts off, CS=0x08, data
segments 0x10, EAX=0x2BADB002, EBX=0x9500 and ECX=the entry point (the option ROM jumps
through ECX).  Differences from QEMU, all on inputs QEMU mishandles: images that overlap
the boot area, the 0x9fc00-0xfffff hole or the end of RAM, and headers with unknown
required flag bits (3-15, which the specification says a loader must refuse) are rejected
instead of booting into corrupted memory.  The memory map is this machine's (no SeaBIOS
tables at the top of RAM), so ``mem_upper`` is (RAM - 1 MiB) / 1 KiB where QEMU reports
128 KiB less; ``mem_lower`` is 639, the base memory below the EBDA, as int 0x12 reports it.

The BIOS ROM follows QEMU's x86_bios_rom_init (hw/i386/x86-common.c): the whole ROM ends at
4 GiB and its last 128 KiB (or all of a smaller ROM) is aliased to end at 1 MiB.
"""

import io
import itertools
import os
import struct
from dataclasses import dataclass, field

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from .errors import ConfigError
from .memory import PAGE_SIZE


@dataclass
class EntryState:
    """Where and how the CPU starts after a loader ran.

    ``mode`` is ``"real"``, ``"protected32"`` or ``"long64"``; ``ip`` is EIP/RIP (IP in real
    mode, relative to ``cs``).  ``regs`` holds general registers by lowercase name plus the
    keys ``gdt``/``gdt_limit`` (GDTR base and limit) and ``ds_selector`` that ``Cpu.enter``
    interprets.  In real mode ``cs`` is the selector and the hidden base is ``cs << 4``
    unless ``cs_base`` says otherwise (the reset vector); in protected and long mode ``cs``
    is the code selector of flat 4 GiB segments, data segments use ``cs + 8``.  ``notes``
    are one-line remarks for the user about requests the loader ignored.
    """

    mode: str
    ip: int
    regs: dict = field(default_factory=dict)
    cs: int = 0
    cs_base: int | None = None
    notes: list = field(default_factory=list)


# ---------------------------------------------------------------------------- multiboot

MULTIBOOT_HEADER_MAGIC = 0x1BADB002
MULTIBOOT_BOOT_MAGIC = 0x2BADB002
#: QEMU scans for a header that would fit whole (48 bytes with the video fields).
HEADER_SEARCH_LIMIT = 8192 - 48

HEADER_PAGE_ALIGN = 1 << 0      # modules page-aligned: we always do
HEADER_MEMORY_INFO = 1 << 1     # mem_* fields: always provided
HEADER_VIDEO_MODE = 1 << 2      # no display: ignored, as QEMU does
HEADER_AOUT_KLUDGE = 1 << 16    # load from the header's address fields
HEADER_KNOWN_REQUIRED = HEADER_PAGE_ALIGN | HEADER_MEMORY_INFO | HEADER_VIDEO_MODE

INFO_MEMORY = 1 << 0
INFO_BOOT_DEVICE = 1 << 1
INFO_CMDLINE = 1 << 2
INFO_MODULES = 1 << 3
INFO_MMAP = 1 << 6
INFO_BOOTLOADER_NAME = 1 << 9
INFO_FLAGS = INFO_MEMORY | INFO_BOOT_DEVICE | INFO_CMDLINE | INFO_MODULES | INFO_MMAP | INFO_BOOTLOADER_NAME

BOOT_AREA_START = 0x9000
BOOT_AREA_END = 0xA000
MMAP_ADDR = 0x9000
MMAP_CAPACITY = 0x500
INFO_ADDR = 0x9500
INFO_SIZE = 88
GDT_ADDR = 0x9800
BOOT_STACK_TOP = 0x7000
BOOT_DEVICE = 0x8000FFFF        # QEMU's fixed value: first BIOS disk, no partition
BOOTLOADER_NAME = b"emu-colo"
MODULE_ENTRY_SIZE = 16

#: The option ROM's GDT: null, flat code32, flat data32, 64 KiB code16, 64 KiB data16.
BOOT_GDT = struct.pack(
    "<5Q", 0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF, 0x00009E000000FFFF, 0x000092000000FFFF)
SEL_CODE32 = 0x08

LOW_RAM_END = 0x9FC00           # the EBDA starts here: int 0x12 under SeaBIOS reports 639 KiB
HIGH_RAM_START = 0x100000
BIOS_AREA_START = 0xF0000
E820_RAM = 1
E820_RESERVED = 2


def _page_align(value):
    return (value + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


def _read_image(path, what):
    """The whole file, or a one-line ConfigError naming it."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path}: is a directory") from None
    except OSError as e:
        raise ConfigError(f"{what} {path}: {e.strerror}") from None


@dataclass
class MultibootHeader:
    offset: int            # file offset of the magic
    flags: int
    header_addr: int = 0
    load_addr: int = 0
    load_end_addr: int = 0
    bss_end_addr: int = 0
    entry_addr: int = 0


def find_multiboot_header(image, path="kernel"):
    """The first header with a valid checksum, 4-byte aligned in the first 8 KiB.

    Returns None when there is no magic at all; a magic whose checksum is wrong (and no
    valid header after it) is reported, since it is almost certainly a broken build.
    """
    head = image[:8192].ljust(8192, b"\0")
    bad_checksum_at = None
    for offset in range(0, HEADER_SEARCH_LIMIT, 4):
        magic, flags, checksum = struct.unpack_from("<3I", head, offset)
        if magic != MULTIBOOT_HEADER_MAGIC:
            continue
        if (magic + flags + checksum) & 0xFFFFFFFF:
            if bad_checksum_at is None:
                bad_checksum_at = offset
            continue
        return MultibootHeader(offset, flags, *struct.unpack_from("<5I", head, offset + 12))
    if bad_checksum_at is not None:
        magic, flags, checksum = struct.unpack_from("<3I", head, bad_checksum_at)
        raise ConfigError(
            f"{path}: multiboot header at offset {bad_checksum_at:#x} has a bad checksum "
            f"{checksum:#010x} (magic + flags + checksum must be 0 mod 2^32)")
    return None


@dataclass
class _Piece:
    """Bytes to place in guest RAM; ``size`` beyond ``len(data)`` is zero-filled."""

    address: int
    data: bytes
    size: int
    what: str


def _elf_pieces(image, path):
    """PT_LOAD segments at their physical addresses, and the entry (QEMU's load_elf rules)."""
    if image[:4] != b"\x7fELF":
        raise ConfigError(f"{path}: multiboot header without the address fields (flag bit 16) "
                          f"needs an ELF32 image, and this is not ELF")
    elf_class, elf_data = image[4], image[5]
    machine = struct.unpack_from("<H", image, 18)[0] if len(image) >= 20 else 0
    if elf_class == 2 or machine == 62:
        raise ConfigError(f"{path}: multiboot v1 needs an ELF32 image and this is ELF64/x86-64 "
                          f"(QEMU: 'Cannot load x86-64 image, give a 32bit one'); link it with "
                          f"-m elf_i386 or set the a.out kludge (flag bit 16)")
    if elf_class != 1 or elf_data != 1 or machine != 3:
        raise ConfigError(f"{path}: not a little-endian ELF32 i386 image "
                          f"(class {elf_class}, data {elf_data}, machine {machine})")
    try:
        elf = ELFFile(io.BytesIO(image))
        entry = elf.header["e_entry"]
        pieces = []
        for index, segment in enumerate(elf.iter_segments()):
            if segment["p_type"] != "PT_LOAD" or segment["p_memsz"] == 0:
                continue
            paddr, vaddr = segment["p_paddr"], segment["p_vaddr"]
            filesz, memsz = segment["p_filesz"], segment["p_memsz"]
            if filesz > memsz:
                raise ConfigError(f"{path}: program header {index} has p_filesz {filesz:#x} "
                                  f"> p_memsz {memsz:#x}")
            if segment["p_offset"] + filesz > len(image):
                raise ConfigError(f"{path}: program header {index} reaches past the end of the file "
                                  f"(truncated image?)")
            data = segment.data()
            # e_entry is virtual: translate it through the executable segment holding it.
            if (vaddr != paddr and segment["p_flags"] & 1 and vaddr <= entry < vaddr + filesz):
                entry = entry - vaddr + paddr
            pieces.append(_Piece(paddr, data, memsz, f"program header {index}"))
    except ELFError as e:
        raise ConfigError(f"{path}: malformed ELF: {e}") from None
    if not pieces:
        raise ConfigError(f"{path}: ELF image has no loadable (PT_LOAD) segment")
    ordered = sorted(pieces, key=lambda p: p.address)
    for before, after in itertools.pairwise(ordered):
        if before.address + before.size > after.address:
            raise ConfigError(f"{path}: {before.what} ({before.address:#x}+{before.size:#x}) overlaps "
                              f"{after.what} at {after.address:#x}")
    return pieces, entry


def _aout_pieces(image, header, path):
    """The a.out kludge: one block from the header's address fields (QEMU's checks)."""
    if header.header_addr < header.load_addr:
        raise ConfigError(f"{path}: multiboot header_addr {header.header_addr:#x} is below "
                          f"load_addr {header.load_addr:#x}")
    if header.header_addr - header.load_addr > header.offset:
        raise ConfigError(f"{path}: multiboot header_addr {header.header_addr:#x} - load_addr "
                          f"{header.load_addr:#x} is more than the header's file offset {header.offset:#x}")
    text_offset = header.offset - (header.header_addr - header.load_addr)
    if header.load_end_addr:
        if header.load_end_addr < header.load_addr:
            raise ConfigError(f"{path}: multiboot load_end_addr {header.load_end_addr:#x} is below "
                              f"load_addr {header.load_addr:#x}")
        load_size = header.load_end_addr - header.load_addr
        if text_offset + load_size > len(image):
            raise ConfigError(f"{path}: file ends before multiboot load_end_addr {header.load_end_addr:#x} "
                              f"({len(image) - text_offset:#x} of {load_size:#x} bytes present)")
    else:
        load_size = len(image) - text_offset
    memory_size = load_size
    if header.bss_end_addr:
        if header.bss_end_addr < header.load_addr + load_size:
            raise ConfigError(f"{path}: multiboot bss_end_addr {header.bss_end_addr:#x} is below the end "
                              f"of the loaded image {header.load_addr + load_size:#x}")
        memory_size = header.bss_end_addr - header.load_addr
    data = image[text_offset:text_offset + load_size]
    return [_Piece(header.load_addr, data, memory_size, "a.out kludge image")], header.entry_addr


def parse_module_list(text):
    """QEMU's ``-initrd`` multiboot syntax: ``"file args,file2"``; ``,,`` is a literal comma."""
    if not text:
        return []
    modules, current, i = [], [], 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1:i + 2] == ",":
                current.append(",")
                i += 2
                continue
            modules.append("".join(current))
            current = []
        else:
            current.append(text[i])
        i += 1
    modules.append("".join(current))
    return modules


def memory_map(ram_size):
    """The e820 map the machine reports: (base, length, type)."""
    return [
        (0, LOW_RAM_END, E820_RAM),
        (LOW_RAM_END, 0xA0000 - LOW_RAM_END, E820_RESERVED),
        (BIOS_AREA_START, HIGH_RAM_START - BIOS_AREA_START, E820_RESERVED),
        (HIGH_RAM_START, ram_size - HIGH_RAM_START, E820_RAM),
    ]


def _check_placement(piece, ram_size, path):
    start, end = piece.address, piece.address + piece.size
    where = f"{path}: {piece.what} at {start:#x}-{end - 1:#x}"
    if end > 1 << 32:
        raise ConfigError(f"{where} does not fit in the 32-bit address space")
    if end > ram_size:
        raise ConfigError(f"{where} ends beyond the {ram_size >> 20} MiB of RAM (end {ram_size:#x}); "
                          f"give more memory with -m")
    if start < BOOT_AREA_END and end > BOOT_AREA_START:
        raise ConfigError(f"{where} overlaps the multiboot boot area {BOOT_AREA_START:#x}-{BOOT_AREA_END - 1:#x} "
                          f"(memory map, information structure, GDT)")
    if start < HIGH_RAM_START and end > LOW_RAM_END:
        raise ConfigError(f"{where} overlaps {LOW_RAM_END:#x}-{HIGH_RAM_START - 1:#x} "
                          f"(EBDA, VGA and BIOS area), which is not usable RAM")


def load_multiboot(ram, path, cmdline="", modules=()):
    """Load a multiboot v1 kernel and its modules; returns the 32-bit entry state.

    ``modules`` is either QEMU's ``-initrd`` string (``"file args,file2"``) or a list of
    ``"file args"`` entries; each module's string is its whole entry, the file name is the
    part before the first space.
    """
    path = os.fspath(path)
    image = _read_image(path, "kernel")
    header = find_multiboot_header(image, path)
    if header is None:
        raise ConfigError(f"{path}: no multiboot header (magic {MULTIBOOT_HEADER_MAGIC:#x}) "
                          f"in the first 8 KiB; not a multiboot kernel")
    return _load_multiboot_image(ram, path, image, header, cmdline, modules)


def _load_multiboot_image(ram, path, image, header, cmdline, modules):
    notes = []
    unknown = header.flags & 0xFFFF & ~HEADER_KNOWN_REQUIRED
    if unknown:
        raise ConfigError(f"{path}: multiboot header requires features this loader does not know "
                          f"(flags {header.flags:#x}, unknown required bits {unknown:#x})")
    if header.flags & HEADER_VIDEO_MODE:
        notes.append(f"{path}: the multiboot header asks for a video mode; there is no display, "
                     f"so the request is ignored (as QEMU does)")
    if header.flags & HEADER_AOUT_KLUDGE:
        pieces, entry = _aout_pieces(image, header, path)
    else:
        pieces, entry = _elf_pieces(image, path)

    if isinstance(modules, str):
        modules = parse_module_list(modules)
    modules = list(modules or ())
    module_images = []
    for spec in modules:
        file_name = spec.split(" ", 1)[0]
        if not file_name:
            raise ConfigError(f"{path}: empty multiboot module name in {spec!r}")
        module_images.append(_read_image(file_name, "multiboot module"))

    layout = _ModuleLayout(pieces, path, cmdline, modules, module_images)
    placed = [*pieces, layout.info_piece, *layout.module_pieces]
    for piece in placed:
        _check_placement(piece, ram.size, path)
    if entry >= ram.size:
        raise ConfigError(f"{path}: entry point {entry:#x} is outside the {ram.size >> 20} MiB of RAM")

    for piece in placed:
        ram.write(piece.address, piece.data + bytes(piece.size - len(piece.data)))
    _write_boot_area(ram, layout.cmdline_addr, layout.bootloader_addr, layout.mods_addr, len(modules))

    regs = {
        "eax": MULTIBOOT_BOOT_MAGIC, "ebx": INFO_ADDR, "ecx": entry, "edx": 0,
        "esi": 0, "edi": 0, "ebp": 0, "esp": BOOT_STACK_TOP,
        "gdt": GDT_ADDR, "gdt_limit": len(BOOT_GDT) - 1,
    }
    return EntryState("protected32", entry, regs, cs=SEL_CODE32, notes=notes)


class _ModuleLayout:
    """The module list, strings and modules placed after the kernel exactly as QEMU does.

    QEMU sizes the string area from the raw ``-initrd`` text, puts the module strings first,
    then the kernel command line, and the boot loader name at the end of the reserved space;
    following it to the byte gives a kernel the same addresses under both.
    """

    def __init__(self, kernel_pieces, path, cmdline, modules, module_images):
        base = min(p.address for p in kernel_pieces)
        kernel_size = max(p.address + p.size for p in kernel_pieces) - base
        info_offset = _page_align(kernel_size)
        raw_initrd = ",".join(m.replace(",", ",,") for m in modules)
        kernel_cmdline = os.fsencode(path) + b" " + cmdline.encode() + b"\0"
        strings_size = len(kernel_cmdline)
        if modules:
            strings_size += len(raw_initrd.encode()) + 1
        strings_offset = info_offset + MODULE_ENTRY_SIZE * len(modules)
        bootloader_offset = strings_offset + strings_size
        info_end = _page_align(bootloader_offset + len(BOOTLOADER_NAME) + 1)

        block = bytearray(info_end - info_offset)

        def put(offset, data):
            block[offset - info_offset:offset - info_offset + len(data)] = data
            return base + offset

        cursor = strings_offset
        module_string_addrs = []
        for spec in modules:
            text = spec.encode() + b"\0"
            module_string_addrs.append(put(cursor, text))
            cursor += len(text)
        self.cmdline_addr = put(cursor, kernel_cmdline)
        self.bootloader_addr = put(bootloader_offset, BOOTLOADER_NAME + b"\0")
        self.mods_addr = base + info_offset

        module_offset = info_end
        self.module_pieces = []
        for index, (spec, data) in enumerate(zip(modules, module_images, strict=True)):
            start = base + module_offset
            struct.pack_into("<4I", block, MODULE_ENTRY_SIZE * index,
                             start, start + len(data), module_string_addrs[index], 0)
            padded = _page_align(len(data))
            self.module_pieces.append(_Piece(start, data, padded, f"module {spec.split(' ', 1)[0]}"))
            module_offset += padded
        self.info_piece = _Piece(self.mods_addr, bytes(block), len(block), "multiboot module list and strings")


def _write_boot_area(ram, cmdline_addr, bootloader_addr, mods_addr, mods_count):
    """Memory map, information structure and GDT at their fixed low addresses."""
    entries = memory_map(ram.size)
    mmap = b"".join(struct.pack("<IQQI", 20, base, length, kind) for base, length, kind in entries)
    assert len(mmap) <= MMAP_CAPACITY
    mem_upper = next(length for base, length, kind in entries if base == HIGH_RAM_START) >> 10
    info = bytearray(INFO_SIZE)
    struct.pack_into("<7I", info, 0, INFO_FLAGS, LOW_RAM_END >> 10, mem_upper, BOOT_DEVICE,
                     cmdline_addr, mods_count, mods_addr)
    struct.pack_into("<2I", info, 44, len(mmap), MMAP_ADDR)
    struct.pack_into("<I", info, 64, bootloader_addr)
    area = bytearray(BOOT_AREA_END - BOOT_AREA_START)
    for address, data in ((MMAP_ADDR, mmap), (INFO_ADDR, info), (GDT_ADDR, BOOT_GDT)):
        offset = address - BOOT_AREA_START
        area[offset:offset + len(data)] = data
    ram.write(BOOT_AREA_START, area)


# ---------------------------------------------------------------------------- dispatch

LINUX_HEADER_MAGIC = b"HdrS"      # at 0x202 of a bzImage (Documentation/arch/x86/boot.rst)


def load_kernel(ram, path, cmdline="", modules=()):
    """``-kernel``: a Linux bzImage is recognised first, as QEMU's x86_load_linux does."""
    path = os.fspath(path)
    image = _read_image(path, "kernel")
    if image[0x202:0x206] == LINUX_HEADER_MAGIC:
        return load_linux(ram, path, image, cmdline, modules)
    header = find_multiboot_header(image, path)
    if header is None:
        raise ConfigError(f"{path}: not a multiboot kernel (no header with magic "
                          f"{MULTIBOOT_HEADER_MAGIC:#x} in the first 8 KiB) and not a Linux bzImage")
    return _load_multiboot_image(ram, path, image, header, cmdline, modules)


def load_linux(ram, path, image, cmdline="", initrd=()):
    """The Linux/x86 boot protocol; not implemented yet."""
    raise ConfigError(f"{path}: Linux bzImage kernels (boot protocol) are not supported yet; "
                      f"give a multiboot kernel")


# ---------------------------------------------------------------------------- raw binaries

def load_flat(ram, path, address, entry=None):
    """A raw binary at ``address``, entered in 32-bit protected mode at ``entry`` (default
    ``address``) with flat segments CS=0x08, data 0x10.  Nothing else is set up: no GDT in
    memory, no stack; the binary loads its own before it reloads a segment register."""
    path = os.fspath(path)
    data = _read_image(path, "flat binary")
    if not data:
        raise ConfigError(f"flat binary {path}: is empty")
    if address < 0 or address + len(data) > ram.size:
        raise ConfigError(f"flat binary {path}: {len(data):#x} bytes at {address:#x} do not fit in "
                          f"the {ram.size >> 20} MiB of RAM")
    ip = address if entry is None else entry
    if not 0 <= ip < ram.size:
        raise ConfigError(f"flat binary {path}: entry point {ip:#x} is outside RAM")
    ram.write(address, data)
    return EntryState("protected32", ip, {}, cs=SEL_CODE32)


# ---------------------------------------------------------------------------- BIOS

BIOS_SIZE_UNIT = 64 << 10
BIOS_SIZE_MAX = 16 << 20          # stays clear of the IOAPIC (0xfec00000) and LAPIC (0xfee00000)
ISA_BIOS_SIZE_MAX = 128 << 10
RESET_CS = 0xF000
RESET_CS_BASE = 0xFFFF0000
RESET_IP = 0xFFF0


def _check_bios_size(size, name):
    if size == 0 or size % BIOS_SIZE_UNIT:
        raise ConfigError(f"could not load PC BIOS '{name}': size {size} bytes is not a "
                          f"positive multiple of 64 KiB")
    if size > BIOS_SIZE_MAX:
        raise ConfigError(f"could not load PC BIOS '{name}': size {size >> 20} MiB is above "
                          f"the {BIOS_SIZE_MAX >> 20} MiB limit")


def load_bios(path):
    """The ROM image bytes, checked as QEMU's x86_bios_rom_init does."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            rom = f.read()
    except FileNotFoundError:
        raise ConfigError(f"could not load PC BIOS '{path}': no such file") from None
    except OSError as e:
        raise ConfigError(f"could not load PC BIOS '{path}': {e.strerror}") from None
    _check_bios_size(len(rom), path)
    return rom


def bios_layout(rom):
    """(guest physical address, bytes) mappings: the ROM ending at 4 GiB, and the isa-bios
    alias (its last 128 KiB, or all of a smaller ROM) ending at 1 MiB."""
    _check_bios_size(len(rom), "<image>")
    isa_size = min(len(rom), ISA_BIOS_SIZE_MAX)
    return [((1 << 32) - len(rom), bytes(rom)), (HIGH_RAM_START - isa_size, bytes(rom[-isa_size:]))]


def bios_entry():
    """The reset vector: real mode at F000:FFF0 with the hidden CS base 0xFFFF0000."""
    return EntryState("real", RESET_IP, {}, cs=RESET_CS, cs_base=RESET_CS_BASE)

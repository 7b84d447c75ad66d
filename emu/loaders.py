"""Boot image loaders: multiboot v1 kernels, Linux bzImages, PVH ELF kernels, raw binaries
and the PC BIOS ROM.  ``-kernel`` tries them in QEMU's order: bzImage, multiboot, PVH.

Each loader writes its image into guest RAM through :meth:`GuestRam.write` (so the pages are
marked dirty and stale translated code is dropped) and returns an :class:`EntryState` that
``X86Cpu.enter`` turns into registers.

Multiboot follows the Multiboot Specification 0.6.96 and hands the kernel what QEMU does
(hw/i386/multiboot.c together with its option ROM pc-bios/optionrom/multiboot.S), so a
kernel sees the same addresses under both:

====================  ==================================================================
``0x7000``            initial ESP (QEMU jumps to the kernel on SeaBIOS's stack near here)
``0x9000-0x94ff``     memory map: e820 entries, each with the multiboot ``size`` prefix
``0x9500-0x9557``     multiboot information structure (EBX)
``0x9800-0x9827``     GDT as the option ROM's: 0x08 code32, 0x10 data32, 0x18 code16,
                      0x20 data16, all base 0 (these three move when the kernel is there)
kernel end, aligned   module list, module strings, kernel command line, boot loader name
next pages            each module, page-aligned, in ``-initrd`` order
====================  ==================================================================

The kernel starts in 32-bit protected mode, paging and interrupts off, CS=0x08, data
segments 0x10, EAX=0x2BADB002, EBX=the information structure and ECX=the entry point (the
option ROM jumps through ECX).

Where an image lies in memory that is not RAM on a PC, the loader does what QEMU's does:

* Bytes of a segment inside 0xa0000-0xfffff (VGA memory, option ROMs and the read-only
  BIOS shadow) are not loaded: QEMU's option ROM copies them there too, and the writes are
  discarded.  ``ld -m elf_i386 -Ttext=0x100000`` with binutils >= 2.31 makes such a
  segment (only the ELF and program headers, at 0xff000), and the kernel runs.  The user
  gets a note; only an entry point in that range is refused.
* A kernel in conventional memory over 0x9000-0x9fff, where QEMU puts the boot
  structures (and then overwrites them with the kernel, leaving EBX at garbage), keeps
  its bytes, and the boot structures move to the first free pages after the modules,
  with a note.
* What is refused is what really collides: an image beyond the end of RAM or 4 GiB, the
  module list or a module reaching the 0x9fc00-0xfffff hole, an entry point outside RAM,
  and headers with unknown required flag bits (3-15, which the specification says a
  loader must refuse).

The memory map is this machine's (no SeaBIOS tables at the top of RAM), so ``mem_upper``
is (RAM - 1 MiB) / 1 KiB where QEMU reports 128 KiB less; ``mem_lower`` is 639, the base
memory below the EBDA, as int 0x12 reports it.

The BIOS ROM follows QEMU's x86_bios_rom_init (hw/i386/x86-common.c): the whole ROM ends at
4 GiB and its last 128 KiB (or all of a smaller ROM) is aliased to end at 1 MiB.
"""

import itertools
import os
import struct
from dataclasses import dataclass, field


from emu.errors import ConfigError
from emu.memory import PAGE_SIZE
from emu.qemuopts import split_commas


@dataclass
class EntryState:
    """Where and how the CPU starts after a loader ran.

    ``mode`` is ``"real"``, ``"protected32"`` or ``"long64"``; ``ip`` is EIP/RIP (IP in real
    mode, relative to ``cs``).  ``regs`` holds general registers by lowercase name plus the
    keys ``gdt``/``gdt_limit`` (GDTR base and limit) and ``ds_selector`` that ``X86Cpu.enter``
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
MULTIBOOT2_HEADER_MAGIC = 0xE85250D6   # recognised only to say so: QEMU does not load it either
MULTIBOOT2_SEARCH_LIMIT = 32768
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

BOOT_AREA_START = 0x9000        # QEMU's place for the boot structures, when the kernel leaves it free
BOOT_AREA_SIZE = 0x1000
MMAP_OFFSET = 0x000
MMAP_CAPACITY = 0x500
INFO_OFFSET = 0x500
INFO_SIZE = 88
GDT_OFFSET = 0x800
INFO_ADDR = BOOT_AREA_START + INFO_OFFSET
BOOT_STACK_TOP = 0x7000
BOOT_DEVICE = 0x8000FFFF        # QEMU's fixed value: first BIOS disk, no partition
BOOTLOADER_NAME = b"emu-colo"
MODULE_ENTRY_SIZE = 16

#: The option ROM's GDT: null, flat code32, flat data32, 64 KiB code16, 64 KiB data16.
BOOT_GDT = struct.pack(
    "<5Q", 0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF, 0x00009E000000FFFF, 0x000092000000FFFF)
SEL_CODE32 = 0x08

LOW_RAM_END = 0x9FC00           # the EBDA starts here: int 0x12 under SeaBIOS reports 639 KiB
VGA_AND_BIOS_START = 0xA0000    # VGA memory, option ROMs, BIOS shadow: up to 1 MiB, not RAM
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


ELF32_HEADER = struct.Struct("<16sHHIIIIIHHHHHH")  # Elf32_Ehdr
ELF32_PHDR = struct.Struct("<IIIIIIII")             # Elf32_Phdr: type offset vaddr paddr filesz memsz flags align
ELF64_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")  # Elf64_Ehdr
ELF64_PHDR = struct.Struct("<IIQQQQQQ")            # Elf64_Phdr: type flags offset vaddr paddr filesz memsz align
PT_LOAD, PT_NOTE, PF_X = 1, 4, 1


def _elf_program_headers(image, path):
    """(class, e_entry, [(index, p_type, offset, vaddr, paddr, filesz, memsz, flags)]) of a
    little-endian x86 ELF32 or ELF64 image: what the multiboot and PVH loaders need of the
    format, read with struct (a general ELF library costs a third of a small guest's
    start-up time)."""
    elf_class = image[4] if len(image) > 4 else 0
    header, phdr = {1: (ELF32_HEADER, ELF32_PHDR), 2: (ELF64_HEADER, ELF64_PHDR)}.get(elf_class, (None, None))
    if header is None or image[5] != 1:
        raise ConfigError(f"{path}: malformed ELF: not a little-endian ELF32 or ELF64 file")
    if len(image) < header.size:
        raise ConfigError(f"{path}: malformed ELF: the file is shorter than an ELF{32 * elf_class} header")
    fields = header.unpack_from(image)
    if fields[2] not in (3, 62):
        raise ConfigError(f"{path}: not an x86 ELF (machine {fields[2]})")
    entry, phoff, phentsize, phnum = fields[4], fields[5], fields[9], fields[10]
    if phnum and phentsize < phdr.size:
        raise ConfigError(f"{path}: malformed ELF: program header entries of {phentsize} bytes")
    if phoff + phnum * phentsize > len(image):
        raise ConfigError(f"{path}: malformed ELF: the program header table reaches past the end of the file")
    headers = []
    for index in range(phnum):
        values = phdr.unpack_from(image, phoff + index * phentsize)
        if elf_class == 1:
            p_type, offset, vaddr, paddr, filesz, memsz, flags, _align = values
        else:
            p_type, flags, offset, vaddr, paddr, filesz, memsz, _align = values
        headers.append((index, p_type, offset, vaddr, paddr, filesz, memsz, flags))
    return elf_class, entry, headers


def _check_in_file(image, index, offset, filesz, path):
    if offset + filesz > len(image):
        raise ConfigError(f"{path}: program header {index} reaches past the end of the file (truncated image?)")


def _elf_load_pieces(image, entry, headers, path):
    """(entry, pieces): the PT_LOAD segments at their physical addresses, disjoint, with
    e_entry translated through the executable segment holding it (QEMU's load_elf rules)."""
    pieces = []
    for index, p_type, offset, vaddr, paddr, filesz, memsz, flags in headers:
        if p_type != PT_LOAD or memsz == 0:
            continue
        if filesz > memsz:
            raise ConfigError(f"{path}: program header {index} has p_filesz {filesz:#x} > p_memsz {memsz:#x}")
        _check_in_file(image, index, offset, filesz, path)
        # e_entry is virtual: translate it through the executable segment holding it.
        if vaddr != paddr and flags & PF_X and vaddr <= entry < vaddr + filesz:
            entry = entry - vaddr + paddr
        pieces.append(_Piece(paddr, image[offset:offset + filesz], memsz, f"program header {index}"))
    if not pieces:
        raise ConfigError(f"{path}: ELF image has no loadable (PT_LOAD) segment")
    for before, after in itertools.pairwise(sorted(pieces, key=lambda p: p.address)):
        if before.address + before.size > after.address:
            raise ConfigError(f"{path}: {before.what} ({before.address:#x}+{before.size:#x}) overlaps "
                              f"{after.what} at {after.address:#x}")
    return entry, pieces


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
    _, entry, headers = _elf_program_headers(image, path)
    entry, pieces = _elf_load_pieces(image, entry, headers, path)
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
    return split_commas(text) if text else []


def memory_map(ram_size):
    """The e820 map the machine reports: (base, length, type)."""
    return [
        (0, LOW_RAM_END, E820_RAM),
        (LOW_RAM_END, 0xA0000 - LOW_RAM_END, E820_RESERVED),
        (BIOS_AREA_START, HIGH_RAM_START - BIOS_AREA_START, E820_RESERVED),
        (HIGH_RAM_START, ram_size - HIGH_RAM_START, E820_RAM),
    ]


def _check_fits(piece, ram_size, path):
    start, end = piece.address, piece.address + piece.size
    where = f"{path}: {piece.what} at {start:#x}-{end - 1:#x}"
    if end > 1 << 32:
        raise ConfigError(f"{where} does not fit in the 32-bit address space")
    if end > ram_size:
        raise ConfigError(f"{where} ends beyond the {ram_size >> 20} MiB of RAM (end {ram_size:#x}); "
                          f"give more memory with -m")


def _check_outside_hole(piece, path):
    """What the loader places itself (module list, modules, boot area) must be usable RAM."""
    start, end = piece.address, piece.address + piece.size
    if start < HIGH_RAM_START and end > LOW_RAM_END:
        raise ConfigError(f"{path}: {piece.what} at {start:#x}-{end - 1:#x} overlaps "
                          f"{LOW_RAM_END:#x}-{HIGH_RAM_START - 1:#x} (EBDA, VGA and BIOS area), "
                          f"which is not usable RAM")


def _without_vga_and_bios_area(pieces, entry, path, notes):
    """The kernel's pieces with their bytes in 0xa0000-0xfffff left out, as QEMU's loader
    ends up doing (its copies there hit VGA memory and the read-only BIOS shadow)."""
    if VGA_AND_BIOS_START <= entry < HIGH_RAM_START:
        raise ConfigError(f"{path}: entry point {entry:#x} lies in {VGA_AND_BIOS_START:#x}-"
                          f"{HIGH_RAM_START - 1:#x} (VGA, option ROMs and BIOS), which is not RAM")
    kept = []
    for piece in pieces:
        start, end = piece.address, piece.address + piece.size
        if end <= VGA_AND_BIOS_START or start >= HIGH_RAM_START:
            kept.append(piece)
            continue
        notes.append(f"{path}: {piece.what} at {start:#x}-{end - 1:#x} lies in {VGA_AND_BIOS_START:#x}-"
                     f"{HIGH_RAM_START - 1:#x} (VGA, option ROMs and BIOS), which is not RAM: its bytes "
                     f"there are not loaded, as under QEMU")
        for low, high in ((start, min(end, VGA_AND_BIOS_START)), (max(start, HIGH_RAM_START), end)):
            if low < high:
                kept.append(_Piece(low, piece.data[low - start:high - start], high - low, piece.what))
    return kept


def _boot_area_address(placed, path, notes):
    """QEMU's 0x9000, or the first page after everything else when an image is there."""
    if not any(p.address < BOOT_AREA_START + BOOT_AREA_SIZE and p.address + p.size > BOOT_AREA_START
               for p in placed):
        return BOOT_AREA_START
    address = _page_align(max(p.address + p.size for p in placed))
    notes.append(f"{path}: the kernel occupies {BOOT_AREA_START:#x}-{BOOT_AREA_START + BOOT_AREA_SIZE - 1:#x}, "
                 f"where QEMU puts the memory map and the multiboot information (and then loads the "
                 f"kernel over them); they are at {address:#x} instead (EBX={address + INFO_OFFSET:#x})")
    return address


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
    pieces = _without_vga_and_bios_area(pieces, entry, path, notes)
    ours = [layout.info_piece, *layout.module_pieces]
    for piece in [*pieces, *ours]:
        _check_fits(piece, ram.size, path)
    boot_area = _boot_area_address([*pieces, *ours], path, notes)
    boot_piece = _Piece(boot_area, b"", BOOT_AREA_SIZE, "multiboot boot area (memory map, information structure, GDT)")
    _check_fits(boot_piece, ram.size, path)
    boot_piece.data = _boot_area(ram.size, boot_area, layout.cmdline_addr, layout.bootloader_addr,
                                 layout.mods_addr, len(modules))
    ours.append(boot_piece)
    for piece in ours:
        _check_outside_hole(piece, path)
    if entry >= ram.size:
        raise ConfigError(f"{path}: entry point {entry:#x} is outside the {ram.size >> 20} MiB of RAM")

    for piece in [*pieces, *ours]:
        ram.write(piece.address, piece.data + bytes(piece.size - len(piece.data)))

    regs = {
        "eax": MULTIBOOT_BOOT_MAGIC, "ebx": boot_area + INFO_OFFSET, "ecx": entry, "edx": 0,
        "esi": 0, "edi": 0, "ebp": 0, "esp": BOOT_STACK_TOP,
        "gdt": boot_area + GDT_OFFSET, "gdt_limit": len(BOOT_GDT) - 1,
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


def _boot_area(ram_size, address, cmdline_addr, bootloader_addr, mods_addr, mods_count):
    """The page holding the memory map, the information structure and the GDT."""
    entries = memory_map(ram_size)
    mmap = b"".join(struct.pack("<IQQI", 20, base, length, kind) for base, length, kind in entries)
    assert len(mmap) <= MMAP_CAPACITY
    mem_upper = next(length for base, length, kind in entries if base == HIGH_RAM_START) >> 10
    info = bytearray(INFO_SIZE)
    struct.pack_into("<7I", info, 0, INFO_FLAGS, LOW_RAM_END >> 10, mem_upper, BOOT_DEVICE,
                     cmdline_addr, mods_count, mods_addr)
    struct.pack_into("<2I", info, 44, len(mmap), address + MMAP_OFFSET)
    struct.pack_into("<I", info, 64, bootloader_addr)
    area = bytearray(BOOT_AREA_SIZE)
    for offset, data in ((MMAP_OFFSET, mmap), (INFO_OFFSET, info), (GDT_OFFSET, BOOT_GDT)):
        area[offset:offset + len(data)] = data
    return bytes(area)


# ---------------------------------------------------------------------------- dispatch

LINUX_HEADER_MAGIC = b"HdrS"      # at 0x202 of a bzImage (Documentation/arch/x86/boot.rst)


def is_linux_image(image):
    """Whether ``-kernel`` bytes (the first 0x206 are enough) are booted as Linux, not multiboot."""
    return image[0x202:0x206] == LINUX_HEADER_MAGIC


def load_kernel(ram, path, cmdline="", modules=()):
    """``-kernel``: a Linux bzImage is recognised first, as QEMU's x86_load_linux does."""
    path = os.fspath(path)
    image = _read_image(path, "kernel")
    if is_linux_image(image):
        return load_linux(ram, path, image, cmdline, modules)
    header = find_multiboot_header(image, path)
    if header is not None:
        return _load_multiboot_image(ram, path, image, header, cmdline, modules)
    pvh_entry = find_pvh_entry(image, path)
    if pvh_entry is not None:
        return load_pvh(ram, path, image, pvh_entry, cmdline, modules)
    multiboot2 = struct.pack("<I", MULTIBOOT2_HEADER_MAGIC) in image[:MULTIBOOT2_SEARCH_LIMIT]
    raise ConfigError(f"{path}: not a multiboot kernel (no header with magic {MULTIBOOT_HEADER_MAGIC:#x} in "
                      f"the first 8 KiB), not a Linux bzImage and not an ELF with a PVH entry note"
                      + (" (it has a multiboot2 header, which QEMU's -kernel does not load either: "
                         "add a multiboot v1 header or a PVH note, or boot it from GRUB)" if multiboot2 else ""))


# Linux/x86 boot protocol (Documentation/arch/x86/boot.rst), 64-bit entry as QEMU's
# linuxboot and Firecracker do it.  Low memory layout of what the loader builds:
LINUX_GDT_ADDR = 0x500            # null, null, 0x10 flat code64, 0x18 flat data
LINUX_PML4_ADDR = 0x1000
LINUX_PDPT_ADDR = 0x2000
LINUX_PD_ADDR = 0x3000            # four page directories, 0x3000-0x6fff: 4 GiB of 2 MiB pages
LINUX_ZERO_PAGE_ADDR = 0x7000     # boot_params (RSI)
LINUX_STACK_TOP = 0x9000          # 0x8000-0x8fff
LINUX_CMDLINE_ADDR = 0x20000
LINUX_CMDLINE_MAX = 0x10000       # up to 0x2ffff, well below the EBDA
LINUX_DEFAULT_LOAD = 0x100000

LINUX_GDT = struct.pack("<4Q", 0, 0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF)
LINUX_BOOT_CS = 0x10
LINUX_BOOT_DS = 0x18

# setup header fields: offsets in the zero page (== offsets in the bzImage file)
HDR_SETUP_SECTS = 0x1F1
HDR_SYSSIZE = 0x1F4
HDR_BOOT_FLAG = 0x1FE
HDR_JUMP = 0x200
HDR_VERSION = 0x206
HDR_TYPE_OF_LOADER = 0x210
HDR_LOADFLAGS = 0x211
HDR_CODE32_START = 0x214
HDR_RAMDISK_IMAGE = 0x218
HDR_RAMDISK_SIZE = 0x21C
HDR_HEAP_END_PTR = 0x224
HDR_CMD_LINE_PTR = 0x228
HDR_INITRD_ADDR_MAX = 0x22C
HDR_KERNEL_ALIGNMENT = 0x230
HDR_RELOCATABLE = 0x234
HDR_XLOADFLAGS = 0x236
HDR_CMDLINE_SIZE = 0x238
HDR_PAYLOAD_OFFSET = 0x248
HDR_PAYLOAD_LENGTH = 0x24C
HDR_PREF_ADDRESS = 0x258
HDR_INIT_SIZE = 0x260
BP_E820_ENTRIES = 0x1E8
BP_E820_TABLE = 0x2D0
BP_E820_MAX = 128

LOADED_HIGH = 0x01
CAN_USE_HEAP = 0x80
XLF_KERNEL_64 = 0x01
LINUX_MIN_PROTOCOL = 0x020C       # 2.12: xloadflags, the first to say "64-bit entry at +0x200"
STARTUP_64_OFFSET = 0x200

#: ``-kernel bzImage``: decompress the payload on the host and enter the vmlinux directly
#: (the guest's own decompressor works too but costs ~20 s on Unicorn).
LINUX_HOST_DECOMPRESS = True


@dataclass
class LinuxHeader:
    version: int
    setup_sects: int
    loadflags: int
    xloadflags: int
    initrd_addr_max: int
    kernel_alignment: int
    relocatable: int
    cmdline_size: int
    payload_offset: int
    payload_length: int
    pref_address: int
    init_size: int
    header_end: int


def parse_linux_header(image, path="kernel"):
    """The bzImage setup header; ConfigError for what a 64-bit direct boot cannot use."""
    if len(image) < 0x268 or image[0x202:0x206] != LINUX_HEADER_MAGIC:
        raise ConfigError(f"{path}: not a Linux bzImage (no 'HdrS' setup header at 0x202)")
    version = struct.unpack_from("<H", image, HDR_VERSION)[0]
    if version < LINUX_MIN_PROTOCOL:
        raise ConfigError(f"{path}: Linux boot protocol {version >> 8}.{version & 0xff:02d} is older than "
                          f"2.12; this loader needs a kernel with a 64-bit entry point")
    setup_sects = image[HDR_SETUP_SECTS] or 4
    u32 = lambda off: struct.unpack_from("<I", image, off)[0]  # noqa: E731
    header = LinuxHeader(
        version=version, setup_sects=setup_sects, loadflags=image[HDR_LOADFLAGS],
        xloadflags=struct.unpack_from("<H", image, HDR_XLOADFLAGS)[0],
        initrd_addr_max=u32(HDR_INITRD_ADDR_MAX), kernel_alignment=u32(HDR_KERNEL_ALIGNMENT),
        relocatable=image[HDR_RELOCATABLE], cmdline_size=u32(HDR_CMDLINE_SIZE),
        payload_offset=u32(HDR_PAYLOAD_OFFSET), payload_length=u32(HDR_PAYLOAD_LENGTH),
        pref_address=struct.unpack_from("<Q", image, HDR_PREF_ADDRESS)[0], init_size=u32(HDR_INIT_SIZE),
        header_end=HDR_JUMP + 2 + image[HDR_JUMP + 1])
    if not header.xloadflags & XLF_KERNEL_64:
        raise ConfigError(f"{path}: the bzImage has no 64-bit entry point (xloadflags {header.xloadflags:#x} "
                          f"lacks XLF_KERNEL_64): a 32-bit kernel, which this loader does not boot")
    if not header.loadflags & LOADED_HIGH:
        raise ConfigError(f"{path}: a zImage (loaded at 0x10000), not a bzImage; not supported")
    if (header.setup_sects + 1) * 512 >= len(image):
        raise ConfigError(f"{path}: truncated bzImage: {len(image)} bytes, setup alone is "
                          f"{(header.setup_sects + 1) * 512}")
    setup_size = (header.setup_sects + 1) * 512
    kernel_size = struct.unpack_from("<I", image, HDR_SYSSIZE)[0] * 16  # syssize: 16-byte units
    if setup_size + kernel_size > len(image):
        raise ConfigError(f"{path}: truncated bzImage: {len(image)} bytes, its setup header says "
                          f"{setup_size + kernel_size} (setup {setup_size} + kernel {kernel_size})")
    if header.payload_offset + header.payload_length > kernel_size:
        raise ConfigError(f"{path}: corrupt bzImage: the compressed kernel ({header.payload_length} bytes at "
                          f"{header.payload_offset:#x}) ends beyond the {kernel_size} bytes of the kernel part")
    return header


def _decompress_payload(payload):
    """The payload's bytes decompressed, or None for a format the host cannot decompress."""
    import bz2
    import lzma
    import zlib
    try:
        if payload[:6] == b"\xfd7zXZ\x00":
            return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
        if payload[:2] == b"\x1f\x8b":
            return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
        if payload[:3] == b"BZh":
            return bz2.BZ2Decompressor().decompress(payload)
        if payload[:3] == b"\x5d\x00\x00":
            return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(payload)
    except (lzma.LZMAError, zlib.error, OSError, EOFError):
        return None
    return None


def _vmlinux_pieces(vmlinux):
    """PT_LOAD segments (physical addresses) and the physical entry of a vmlinux ELF64, or None."""
    if vmlinux[:4] != b"\x7fELF" or vmlinux[4] != 2 or vmlinux[5] != 1:
        return None
    if struct.unpack_from("<H", vmlinux, 18)[0] != 62:
        return None
    entry, phoff = struct.unpack_from("<QQ", vmlinux, 0x18)
    phentsize, phnum = struct.unpack_from("<HH", vmlinux, 0x36)
    pieces = []
    for index in range(phnum):
        p_type, _, offset, vaddr, paddr, filesz, memsz, _ = struct.unpack_from(
            "<IIQQQQQQ", vmlinux, phoff + index * phentsize)
        if p_type != 1 or memsz == 0:
            continue
        if filesz > memsz or offset + filesz > len(vmlinux):
            return None
        if _p_flags_exec(vmlinux, phoff + index * phentsize) and vaddr <= entry < vaddr + memsz:
            entry = entry - vaddr + paddr
        pieces.append(_Piece(paddr, vmlinux[offset:offset + filesz], memsz, f"vmlinux segment {index}"))
    return (pieces, entry) if pieces else None


def _p_flags_exec(elf, phdr_offset):
    return bool(struct.unpack_from("<I", elf, phdr_offset + 4)[0] & 1)


def _identity_page_tables():
    """PML4, PDPT and four page directories mapping 0-4 GiB 1:1 with 2 MiB pages."""
    tables = bytearray(LINUX_ZERO_PAGE_ADDR - LINUX_PML4_ADDR)
    struct.pack_into("<Q", tables, 0, LINUX_PDPT_ADDR | 0x3)
    for i in range(4):
        struct.pack_into("<Q", tables, LINUX_PDPT_ADDR - LINUX_PML4_ADDR + 8 * i,
                         (LINUX_PD_ADDR + i * PAGE_SIZE) | 0x3)
    base = LINUX_PD_ADDR - LINUX_PML4_ADDR
    for i in range(4 * 512):
        struct.pack_into("<Q", tables, base + 8 * i, (i << 21) | 0x83)   # present, writable, 2 MiB
    return bytes(tables)


def _read_initrd(initrd, path):
    if isinstance(initrd, str | bytes | os.PathLike):
        files = [os.fsdecode(initrd)] if initrd else []
    else:
        files = [os.fsdecode(f) for f in initrd or ()]
    if not files:
        return None, None
    if len(files) > 1:
        raise ConfigError(f"{path}: a Linux kernel takes one -initrd file, got {len(files)}")
    data = _read_image(files[0], "initrd")
    if not data:
        raise ConfigError(f"initrd {files[0]}: is empty")
    return files[0], data


def load_linux(ram, path, image, cmdline="", initrd=(), host_decompress=None):
    """Load a bzImage by the Linux/x86 boot protocol and enter it in 64-bit mode.

    The protected-mode kernel goes to ``pref_address``; with ``host_decompress`` (default
    :data:`LINUX_HOST_DECOMPRESS`) its payload is decompressed here and the vmlinux segments
    are loaded at their physical addresses instead, entering ``startup_64`` of the kernel
    proper.  The zero page carries the setup header, an e820 map, the command line pointer
    and the initrd placed as high as ``initrd_addr_max`` and RAM allow.
    """
    if host_decompress is None:
        host_decompress = LINUX_HOST_DECOMPRESS
    header = parse_linux_header(image, path)
    notes = []
    load = header.pref_address or LINUX_DEFAULT_LOAD
    if header.relocatable and header.kernel_alignment and load % header.kernel_alignment:
        load = LINUX_DEFAULT_LOAD
    pieces, entry = _linux_kernel_pieces(image, header, load, path, host_decompress, notes)
    kernel_end = _check_kernel_fits(pieces, load, header, ram.size, path)
    cmd = _linux_cmdline(cmdline, header, path)
    initrd_path, initrd_data = _read_initrd(initrd, path)
    initrd_addr = _place_initrd(initrd_path, initrd_data, header, ram.size, kernel_end)
    zero_page = _linux_zero_page(image, header, load, initrd_addr, len(initrd_data or b""), ram.size)

    for piece in pieces:
        ram.write(piece.address, piece.data)
        if piece.size > len(piece.data):
            ram.write(piece.address + len(piece.data), bytes(piece.size - len(piece.data)))
    if initrd_data is not None:
        ram.write(initrd_addr, initrd_data)
    ram.write(LINUX_GDT_ADDR, LINUX_GDT)
    ram.write(LINUX_PML4_ADDR, _identity_page_tables())
    ram.write(LINUX_ZERO_PAGE_ADDR, zero_page)
    ram.write(LINUX_CMDLINE_ADDR, cmd + b"\0")

    regs = {"cr3": LINUX_PML4_ADDR, "gdt": LINUX_GDT_ADDR, "gdt_limit": len(LINUX_GDT) - 1,
            "ds_selector": LINUX_BOOT_DS, "rsi": LINUX_ZERO_PAGE_ADDR, "rsp": LINUX_STACK_TOP}
    return EntryState("long64", entry, regs, cs=LINUX_BOOT_CS, notes=notes)


def _linux_kernel_pieces(image, header, load, path, host_decompress, notes):
    """(pieces, entry): the vmlinux segments decompressed on the host when asked and possible,
    else the protected-mode kernel at ``load``, which then decompresses itself."""
    protected = image[(header.setup_sects + 1) * 512:]
    if host_decompress:
        end = header.payload_offset + header.payload_length
        if header.payload_length and end <= len(protected):
            vmlinux = _decompress_payload(protected[header.payload_offset:end])
            loaded = _vmlinux_pieces(vmlinux) if vmlinux else None
            if loaded is not None:
                return loaded
        notes.append(f"{path}: the kernel payload could not be decompressed on the host; "
                     f"the kernel decompresses itself (slow)")
    pieces = [_Piece(load, protected, max(len(protected), header.init_size), "protected-mode kernel")]
    return pieces, load + STARTUP_64_OFFSET


def _check_kernel_fits(pieces, load, header, ram_size, path):
    """The end of the kernel's memory (its init_size included), checked against RAM."""
    kernel_start = min(p.address for p in pieces)
    kernel_end = max(max(p.address + p.size for p in pieces), load + header.init_size)
    if kernel_start < HIGH_RAM_START:
        raise ConfigError(f"{path}: kernel at {kernel_start:#x} is below 1 MiB")
    if kernel_end > ram_size:
        raise ConfigError(f"{path}: the kernel needs memory up to {kernel_end:#x} "
                          f"({(kernel_end + (1 << 20) - 1) >> 20} MiB) and RAM is {ram_size >> 20} MiB; "
                          f"give more memory with -m")
    return kernel_end


def _linux_cmdline(cmdline, header, path):
    cmd = cmdline.encode() if isinstance(cmdline, str) else bytes(cmdline or b"")
    limit = min(header.cmdline_size or 255, LINUX_CMDLINE_MAX - 1)
    if len(cmd) > limit:
        raise ConfigError(f"{path}: kernel command line is {len(cmd)} bytes, the kernel accepts "
                          f"at most {limit} (cmdline_size)")
    return cmd


def _place_initrd(initrd_path, initrd_data, header, ram_size, kernel_end):
    """Where the initrd goes: page-aligned, as high as initrd_addr_max and RAM allow (0: none)."""
    if initrd_data is None:
        return 0
    initrd_size = len(initrd_data)
    initrd_top = min(header.initrd_addr_max, ram_size - 1) + 1
    initrd_addr = (initrd_top - initrd_size) & ~(PAGE_SIZE - 1)
    if initrd_addr < kernel_end:
        raise ConfigError(f"initrd {initrd_path}: {initrd_size} bytes do not fit between the kernel "
                          f"(ends at {kernel_end:#x}) and {initrd_top:#x} (RAM {ram_size >> 20} MiB, "
                          f"initrd_addr_max {header.initrd_addr_max:#x}); give more memory with -m")
    return initrd_addr


def _linux_zero_page(image, header, load, initrd_addr, initrd_size, ram_size):
    """The boot_params page: the image's setup header as a boot loader fills it, and the e820 map."""
    zero_page = bytearray(PAGE_SIZE)
    zero_page[HDR_SETUP_SECTS:header.header_end] = image[HDR_SETUP_SECTS:header.header_end]
    zero_page[HDR_TYPE_OF_LOADER] = 0xFF
    zero_page[HDR_LOADFLAGS] = (header.loadflags | CAN_USE_HEAP) & ~0x20   # not QUIET
    struct.pack_into("<H", zero_page, HDR_HEAP_END_PTR, 0xFE00)
    struct.pack_into("<I", zero_page, HDR_CODE32_START, load)
    struct.pack_into("<II", zero_page, HDR_RAMDISK_IMAGE, initrd_addr, initrd_size)
    struct.pack_into("<I", zero_page, HDR_CMD_LINE_PTR, LINUX_CMDLINE_ADDR)
    e820 = memory_map(ram_size)
    assert len(e820) <= BP_E820_MAX
    zero_page[BP_E820_ENTRIES] = len(e820)
    for i, (base, length, kind) in enumerate(e820):
        struct.pack_into("<QQI", zero_page, BP_E820_TABLE + 20 * i, base, length, kind)
    return bytes(zero_page)


# ---------------------------------------------------------------------------- raw binaries

# PVH (Xen's x86/HVM direct boot ABI, docs/misc/pvh.pandoc), as QEMU's load_elfboot and its
# option ROM pc-bios/optionrom/pvh_main.c do it: an ELF32 or ELF64 kernel whose PT_NOTE holds
# XEN_ELFNOTE_PHYS32_ENTRY is loaded at its segments' physical addresses and entered there in
# 32-bit protected mode, paging off, with EBX = the hvm_start_info structure.  QEMU keeps that
# structure in its option ROM; here it goes to the page the multiboot loader uses:
PVH_BOOT_PAGE = BOOT_AREA_START      # 0x9000: memory map, module list, start info, GDT
PVH_MEMMAP_OFFSET = 0x000
PVH_MODLIST_OFFSET = 0x400
PVH_START_INFO_OFFSET = 0x500
PVH_GDT_OFFSET = 0x800
PVH_CMDLINE_ADDR = 0x20000           # QEMU's cmdline_addr for a kernel without a setup header
PVH_INITRD_MAX = 0x37FFFFFF          # QEMU's initrd_max without a setup header
XEN_ELFNOTE_PHYS32_ENTRY = 18
XEN_HVM_START_MAGIC = 0x336EC578
HVM_START_INFO = struct.Struct("<IIIIQQQQII")   # magic version flags nr_modules modlist cmdline rsdp memmap entries
HVM_MODLIST_ENTRY = struct.Struct("<QQQQ")      # paddr size cmdline_paddr reserved
HVM_MEMMAP_ENTRY = struct.Struct("<QQII")       # addr size type reserved


def find_pvh_entry(image, path="kernel"):
    """The physical entry point of the PVH note (XEN_ELFNOTE_PHYS32_ENTRY), or None when the
    image is not an ELF or has no such note (QEMU reads a 64-bit value from an ELF64's note)."""
    if image[:4] != b"\x7fELF":
        return None
    elf_class, _, headers = _elf_program_headers(image, path)
    for index, p_type, offset, _vaddr, _paddr, filesz, _memsz, _flags in headers:
        if p_type != PT_NOTE:
            continue
        _check_in_file(image, index, offset, filesz, path)
        note, end = offset, offset + filesz
        while note + 12 <= end:
            namesz, descsz, n_type = struct.unpack_from("<III", image, note)
            desc = note + 12 + (namesz + 3) // 4 * 4
            if desc + descsz > end:
                raise ConfigError(f"{path}: malformed ELF note at file offset {note:#x} (reaches past its segment)")
            if image[note + 12:note + 12 + namesz].rstrip(b"\0") == b"Xen" and n_type == XEN_ELFNOTE_PHYS32_ENTRY:
                width = 8 if elf_class == 2 and descsz >= 8 else 4
                if descsz < width:
                    raise ConfigError(f"{path}: the PVH entry note has {descsz} bytes of address")
                return int.from_bytes(image[desc:desc + width], "little")
            note = desc + (descsz + 3) // 4 * 4
    return None


def _without_note_only_segments_beyond_ram(pieces, headers, ram_size, path, notes):
    """``ld -Ttext=...`` without a script leaves the note section at the default base
    (0x8048000 for i386) in a PT_LOAD of its own: beyond RAM it is not loaded (QEMU's copy
    there lands nowhere either); any other segment beyond RAM is still refused."""
    note_ranges = [(h[4], h[4] + h[5]) for h in headers if h[1] == PT_NOTE]  # (paddr, + filesz)
    kept = []
    for piece in pieces:
        beyond = piece.address + piece.size > ram_size
        if beyond and any(start <= piece.address and piece.address + piece.size <= end for start, end in note_ranges):
            notes.append(f"{path}: {piece.what} at {piece.address:#x} holds only ELF notes and lies beyond RAM: "
                         f"not loaded")
            continue
        kept.append(piece)
    return kept


def _pvh_boot_addresses(pieces, cmdline_size, ram_size, path, notes):
    """The boot page (0x9000) and the command line (0x20000), or, where the kernel lies there
    (QEMU keeps its structures in the option ROM, so such a kernel runs), the pages after it."""
    end = _page_align(max(p.address + p.size for p in pieces))

    def free(start, size):
        return not any(p.address < start + size and p.address + p.size > start for p in pieces)

    boot_page = PVH_BOOT_PAGE if free(PVH_BOOT_PAGE, BOOT_AREA_SIZE) else end
    cmdline_addr = PVH_CMDLINE_ADDR if free(PVH_CMDLINE_ADDR, cmdline_size) else None
    if cmdline_addr is None or PVH_CMDLINE_ADDR + cmdline_size > LOW_RAM_END:
        cmdline_addr = max(end, boot_page + BOOT_AREA_SIZE)
    if boot_page != PVH_BOOT_PAGE or cmdline_addr != PVH_CMDLINE_ADDR:
        notes.append(f"{path}: the kernel lies where the PVH start info ({PVH_BOOT_PAGE:#x}) or the command line "
                     f"({PVH_CMDLINE_ADDR:#x}) usually go: they are at {boot_page:#x} "
                     f"(EBX={boot_page + PVH_START_INFO_OFFSET:#x}) and {cmdline_addr:#x}")
    for start, size, what in ((boot_page, BOOT_AREA_SIZE, "PVH start info"),
                              (cmdline_addr, cmdline_size, "command line")):
        _check_fits(_Piece(start, b"", size, what), ram_size, path)
        _check_outside_hole(_Piece(start, b"", size, what), path)
    return boot_page, cmdline_addr


def load_pvh(ram, path, image, entry, cmdline="", initrd=()):
    """Load a PVH kernel: its PT_LOAD segments at their physical addresses, the command line,
    one ``-initrd`` module at the top of low RAM, and the hvm_start_info (version 1, with the
    memory map) that EBX points to."""
    notes = []
    _, e_entry, headers = _elf_program_headers(image, path)
    _, pieces = _elf_load_pieces(image, e_entry, headers, path)  # PVH enters at the note's address
    pieces = _without_vga_and_bios_area(pieces, entry, path, notes)
    pieces = _without_note_only_segments_beyond_ram(pieces, headers, ram.size, path, notes)
    for piece in pieces:
        _check_fits(piece, ram.size, path)
    if entry >= ram.size:
        raise ConfigError(f"{path}: PVH entry point {entry:#x} is outside the {ram.size >> 20} MiB of RAM")
    cmd = cmdline.encode() + b"\0"
    boot_page, cmdline_addr = _pvh_boot_addresses(pieces, len(cmd), ram.size, path, notes)
    initrd_path, initrd_data = _read_initrd(initrd, path)
    modlist = b""
    if initrd_data is not None:
        kernel_end = max(*(p.address + p.size for p in pieces), boot_page + BOOT_AREA_SIZE, cmdline_addr + len(cmd))
        top = min(PVH_INITRD_MAX, ram.size - 1) + 1
        initrd_addr = (top - len(initrd_data)) & ~(PAGE_SIZE - 1)
        if initrd_addr < max(kernel_end, HIGH_RAM_START):
            raise ConfigError(f"initrd {initrd_path}: {len(initrd_data)} bytes do not fit between the kernel "
                              f"(ends at {kernel_end:#x}) and {top:#x}; give more memory with -m")
        modlist = HVM_MODLIST_ENTRY.pack(initrd_addr, len(initrd_data), 0, 0)
    entries = memory_map(ram.size)
    memmap = b"".join(HVM_MEMMAP_ENTRY.pack(base, length, kind, 0) for base, length, kind in entries)
    start_info = HVM_START_INFO.pack(
        XEN_HVM_START_MAGIC, 1, 0, 1 if modlist else 0, boot_page + PVH_MODLIST_OFFSET if modlist else 0,
        cmdline_addr, 0, boot_page + PVH_MEMMAP_OFFSET, len(entries), 0)
    page = bytearray(BOOT_AREA_SIZE)
    for offset, data in ((PVH_MEMMAP_OFFSET, memmap), (PVH_MODLIST_OFFSET, modlist),
                         (PVH_START_INFO_OFFSET, start_info), (PVH_GDT_OFFSET, BOOT_GDT)):
        page[offset:offset + len(data)] = data

    for piece in pieces:
        ram.write(piece.address, piece.data + bytes(piece.size - len(piece.data)))
    if initrd_data is not None:
        ram.write(initrd_addr, initrd_data)
    ram.write(cmdline_addr, cmd)
    ram.write(boot_page, page)
    regs = {"ebx": boot_page + PVH_START_INFO_OFFSET, "eax": 0, "ecx": 0, "edx": 0, "esi": 0, "edi": 0,
            "ebp": 0, "esp": BOOT_STACK_TOP, "gdt": boot_page + PVH_GDT_OFFSET, "gdt_limit": len(BOOT_GDT) - 1}
    return EntryState("protected32", entry, regs, cs=SEL_CODE32, notes=notes)


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

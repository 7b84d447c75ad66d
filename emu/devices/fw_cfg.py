"""QEMU's firmware configuration device (fw_cfg), x86 I/O-port interface.

Follows QEMU ``docs/specs/fw_cfg.rst`` and ``hw/nvram/fw_cfg.c``:

* port 0x510, 16-bit write: select an item (resets the data offset); 0x511 (and 0x510),
  8-bit read: the next byte of the selected item, 0 past its end or for an unknown or
  invalid selector.  8-bit writes are ignored (write support was removed in QEMU 2.4),
  wider reads are invalid accesses and read 0.
* optional DMA interface at 0x514 (8 ports): reads give the signature "QEMU CFG"; a 32-bit
  big-endian write of the high half of an ``FWCfgDmaAccess`` address to 0x514 and of the
  low half to 0x518 runs the transfer at once (select / read / skip / write, which fails
  because every item is read-only), and the control word is written back with bit 0 set
  on error.  Enabled by giving ``dma_memory``; the ID item then has bit 1 set.
* items: signature, ID, UUID, RAM size, nographic, CPU counts, boot menu, optional kernel /
  initrd / setup / command line (size includes the NUL, as ``-append``), and the file
  directory (big-endian count, then size / select / reserved / 56-byte name records, files
  sorted by name as in QEMU's non-legacy order, 32 slots from selector 0x20).
* the user's files, QEMU's ``-fw_cfg [name=]NAME,string=STR`` / ``file=PATH`` option, read
  by :func:`parse_user_file` with the rules of QEMU's parse_fw_cfg (softmmu/vl.c).

Item contents are machine configuration, not guest state: only the selector, the offset
and the DMA address register are saved.
"""

import os
import struct
from dataclasses import dataclass

from emu.device import Device
from emu.errors import ConfigError, GuestError, StateError
from emu.qemuopts import split_commas
from emu.state.vmstate import U16, U32, U64, Subsection, VMStateDescription

# selector keys (docs/specs/fw_cfg.rst)
FW_CFG_SIGNATURE = 0x00
FW_CFG_ID = 0x01
FW_CFG_UUID = 0x02
FW_CFG_RAM_SIZE = 0x03
FW_CFG_NOGRAPHIC = 0x04
FW_CFG_NB_CPUS = 0x05
FW_CFG_KERNEL_ADDR = 0x07
FW_CFG_KERNEL_SIZE = 0x08
FW_CFG_INITRD_ADDR = 0x0A
FW_CFG_INITRD_SIZE = 0x0B
FW_CFG_BOOT_MENU = 0x0E
FW_CFG_MAX_CPUS = 0x0F
FW_CFG_KERNEL_DATA = 0x11
FW_CFG_INITRD_DATA = 0x12
FW_CFG_CMDLINE_ADDR = 0x13
FW_CFG_CMDLINE_SIZE = 0x14
FW_CFG_CMDLINE_DATA = 0x15
FW_CFG_SETUP_ADDR = 0x16
FW_CFG_SETUP_SIZE = 0x17
FW_CFG_SETUP_DATA = 0x18
FW_CFG_FILE_DIR = 0x19
FW_CFG_FILE_FIRST = 0x20
FW_CFG_FILE_SLOTS = 0x20
FW_CFG_WRITE_CHANNEL = 0x4000
FW_CFG_ARCH_LOCAL = 0x8000
FW_CFG_ENTRY_MASK = 0x3FFF
FW_CFG_INVALID = 0xFFFF
FW_CFG_MAX_ENTRY = FW_CFG_FILE_FIRST + FW_CFG_FILE_SLOTS  # exclusive

FW_CFG_VERSION_TRADITIONAL = 0x01
FW_CFG_VERSION_DMA = 0x02

FILE_NAME_LENGTH = 56
FILE_RECORD = struct.Struct(">IHH56s")  # size, select, reserved, name

DMA_SIGNATURE = b"QEMU CFG"
DMA_ACCESS = struct.Struct(">IIQ")  # control, length, address
DMA_CTL_ERROR = 0x01
DMA_CTL_READ = 0x02
DMA_CTL_SKIP = 0x04
DMA_CTL_SELECT = 0x08
DMA_CTL_WRITE = 0x10


USER_FILE_PREFIX = "opt/"  # QEMU warns about user file names outside it (docs/specs/fw_cfg.rst)


@dataclass(frozen=True)
class UserFile:
    """One ``-fw_cfg`` option: the file's name and contents, and QEMU's warning if any."""

    spec: str
    name: str
    data: bytes
    warning: str | None = None


def parse_user_file(spec):
    """``-fw_cfg [name=]NAME,string=STR`` or ``...,file=PATH`` as QEMU's parse_fw_cfg reads it.

    The name is required, with exactly one non-empty ``string`` or ``file``; it may be at
    most 55 bytes (FW_CFG_MAX_FILE_PATH with its NUL).  ``string`` contents are the bytes of
    the string without a NUL; ``file`` contents are the whole file.  A name outside "opt/"
    is accepted with a warning, as QEMU does.
    """
    option = f"-fw_cfg {spec}"
    values = {}
    for index, part in enumerate(split_commas(spec)):
        key, equals, value = part.partition("=")
        if not equals:
            if index:
                raise ConfigError(f"{option}: expected KEY=VALUE, got {part!r}")
            key, value = "name", part  # the implied option, as QEMU's "[name=]NAME"
        if key == "gen_id":
            raise ConfigError(f"{option}: gen_id is not supported (there are no data generator objects)")
        if key not in ("name", "file", "string"):
            raise ConfigError(f"{option}: invalid parameter {key!r} (expected name, file or string)")
        values[key] = value  # a repeated key: the last one counts, as in QemuOpts
    name, path, text = (values.get(key, "") for key in ("name", "file", "string"))
    if not name or bool(path) + bool(text) != 1:
        raise ConfigError(f"{option}: name, plus exactly one of file and string, are needed")
    try:
        length = len(name.encode())
    except UnicodeEncodeError:
        raise ConfigError(f"{option}: the name is not UTF-8") from None
    if length > FILE_NAME_LENGTH - 1:
        raise ConfigError(f"{option}: name too long ({length} bytes, max. {FILE_NAME_LENGTH - 1})")
    warning = None
    if not name.startswith(USER_FILE_PREFIX):
        warning = (f"{option}: warning: externally provided fw_cfg item names should be prefixed "
                   f"with \"{USER_FILE_PREFIX}\"")
    if text:
        data = os.fsencode(text)  # the command line's bytes, NUL terminator not included
    else:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ConfigError(f"{option}: can't load {path}: {e.strerror}") from None
    return UserFile(spec, name, data, warning)


class FwCfg(Device):
    """fw_cfg at 0x510-0x511 (and DMA at 0x514-0x51b when ``dma_memory`` is given).

    ``dma_memory`` is an object with ``read(addr, length)`` and ``write(addr, data)`` that
    raise :class:`~emu.errors.GuestError` outside RAM (``GuestRam`` does, and marks the
    written pages dirty).
    """

    def __init__(self, name, ram_size, cmdline=b"", nb_cpus=1, dma_memory=None):
        super().__init__(name)
        self.dma_memory = dma_memory
        self.dma_enabled = dma_memory is not None
        self._items = {}  # masked key with the arch bit -> bytes
        self._files = []  # (name, data), sorted by name
        self.cur_entry = FW_CFG_SIGNATURE
        self.cur_offset = 0
        self.dma_addr = 0

        version = FW_CFG_VERSION_TRADITIONAL | (FW_CFG_VERSION_DMA if self.dma_enabled else 0)
        self.add_item(FW_CFG_SIGNATURE, b"QEMU")
        self.add_item(FW_CFG_ID, struct.pack("<I", version))
        self.add_item(FW_CFG_UUID, bytes(16))
        self.add_item(FW_CFG_RAM_SIZE, struct.pack("<Q", ram_size))
        self.add_item(FW_CFG_NOGRAPHIC, struct.pack("<H", 1))
        self.add_item(FW_CFG_NB_CPUS, struct.pack("<H", nb_cpus))
        self.add_item(FW_CFG_MAX_CPUS, struct.pack("<H", nb_cpus))
        self.add_item(FW_CFG_BOOT_MENU, struct.pack("<H", 0))
        if cmdline:
            self.add_cmdline(cmdline)

    # ------------------------------------------------------------------ configuration
    def add_item(self, key, data):
        """Add a numbered item (configuration time; a key can be added once)."""
        slot = self._slot(key)
        if slot is None:
            raise ConfigError(f"{self.name}: item key {key:#x} is outside the selector range")
        if slot in (FW_CFG_FILE_DIR, *range(FW_CFG_FILE_FIRST, FW_CFG_MAX_ENTRY)):
            raise ConfigError(f"{self.name}: item key {key:#x} belongs to the file directory: use add_file")
        if slot in self._items:
            raise ConfigError(f"{self.name}: item {key:#x} added twice")
        self._items[slot] = bytes(data)

    def add_cmdline(self, cmdline):
        """The kernel command line items (QEMU adds them for a Linux kernel only, even an empty one)."""
        if isinstance(cmdline, str):
            cmdline = cmdline.encode()
        data = bytes(cmdline) + b"\0"
        self.add_item(FW_CFG_CMDLINE_SIZE, struct.pack("<I", len(data)))
        self.add_item(FW_CFG_CMDLINE_DATA, data)

    def add_kernel(self, kernel_addr, kernel, *, setup_addr=None, setup=None, initrd_addr=None, initrd=None,
                   cmdline_addr=None):
        """The Linux boot items QEMU adds for ``-kernel`` / ``-initrd`` (x86_load_linux)."""
        self.add_item(FW_CFG_KERNEL_ADDR, struct.pack("<I", kernel_addr))
        self.add_item(FW_CFG_KERNEL_SIZE, struct.pack("<I", len(kernel)))
        self.add_item(FW_CFG_KERNEL_DATA, kernel)
        if setup is not None:
            self.add_item(FW_CFG_SETUP_ADDR, struct.pack("<I", setup_addr or 0))
            self.add_item(FW_CFG_SETUP_SIZE, struct.pack("<I", len(setup)))
            self.add_item(FW_CFG_SETUP_DATA, setup)
        if initrd is not None:
            self.add_item(FW_CFG_INITRD_ADDR, struct.pack("<I", initrd_addr or 0))
            self.add_item(FW_CFG_INITRD_SIZE, struct.pack("<I", len(initrd)))
            self.add_item(FW_CFG_INITRD_DATA, initrd)
        if cmdline_addr is not None:
            self.add_item(FW_CFG_CMDLINE_ADDR, struct.pack("<I", cmdline_addr))
        if FW_CFG_CMDLINE_SIZE not in self._items:
            self.add_cmdline(b"")  # QEMU always passes a command line with a kernel

    def add_file(self, name, data):
        """Add a named file (e.g. ``etc/e820``); selectors follow the sorted name order."""
        encoded = name.encode()
        if not encoded or len(encoded) >= FILE_NAME_LENGTH or b"\0" in encoded:
            raise ConfigError(f"{self.name}: file name {name!r} must be 1-{FILE_NAME_LENGTH - 1} bytes")
        if any(existing == name for existing, _ in self._files):
            raise ConfigError(f"{self.name}: duplicate file {name!r}")
        if len(self._files) >= FW_CFG_FILE_SLOTS:
            raise ConfigError(f"{self.name}: no free file slot for {name!r} ({FW_CFG_FILE_SLOTS} in use)")
        self._files.append((name, bytes(data)))
        self._files.sort(key=lambda item: item[0].encode())
        self._rebuild_file_directory()

    def _rebuild_file_directory(self):
        directory = bytearray(struct.pack(">I", len(self._files)))
        for number, (name, data) in enumerate(self._files):
            select = FW_CFG_FILE_FIRST + number
            directory += FILE_RECORD.pack(len(data), select, 0, name.encode())
            self._items[select] = data
        # QEMU sizes the directory for every slot; the unused records read as zeros
        directory += bytes(FILE_RECORD.size * (FW_CFG_FILE_SLOTS - len(self._files)))
        self._items[FW_CFG_FILE_DIR] = bytes(directory)

    def file_select(self, name):
        """The selector of a file, or None (for the machine and tests)."""
        for number, (existing, _) in enumerate(self._files):
            if existing == name:
                return FW_CFG_FILE_FIRST + number
        return None

    def add_user_file(self, user_file):
        """Add a parsed ``-fw_cfg`` file; errors (duplicate name, directory full) name the option."""
        try:
            self.add_file(user_file.name, user_file.data)
        except ConfigError as e:
            raise ConfigError(f"-fw_cfg {user_file.spec}: {e}") from None

    # ------------------------------------------------------------------ item access
    @staticmethod
    def _slot(key):
        """The item a selector value names (arch bit kept, write-channel bit dropped), or None."""
        if key & FW_CFG_ENTRY_MASK >= FW_CFG_MAX_ENTRY:
            return None
        return key & (FW_CFG_ENTRY_MASK | FW_CFG_ARCH_LOCAL)

    def _current_item(self):
        if self.cur_entry == FW_CFG_INVALID:
            return b""
        return self._items.get(self._slot(self.cur_entry), b"")

    def select(self, key):
        key &= 0xFFFF
        self.cur_offset = 0
        self.cur_entry = key if self._slot(key) is not None else FW_CFG_INVALID

    def _read_data_byte(self):
        item = self._current_item()
        if self.cur_offset < len(item):
            value = item[self.cur_offset]
            self.cur_offset += 1
            return value
        return 0

    # ------------------------------------------------------------------ port I/O
    def port_ranges(self, base=0x510):
        """The (base, count) port ranges to register: offsets 4-11 are the DMA address register."""
        return [(base, 12 if self.dma_enabled else 2)]

    @staticmethod
    def _region(offset):
        if offset < 2:
            return "control"
        if 4 <= offset < 12:
            return "dma"
        return None

    def io_read(self, offset, size):
        region = self._region(offset)
        if size > 1 and region != self._region(offset + size - 1):
            value = 0  # the access spans two registers: each answers for its own bytes
            for i in range(size):
                value |= self.io_read(offset + i, 1) << (8 * i)
            return value
        if region == "control":
            if size != 1:
                return 0  # the data register is 8 bits wide: QEMU rejects wider reads
            return self._read_data_byte()
        if region == "dma" and self.dma_enabled:
            start = offset - 4
            return int.from_bytes(DMA_SIGNATURE[start:start + size], "little")
        return (1 << (8 * size)) - 1

    def io_write(self, offset, size, value):
        region = self._region(offset)
        if size > 1 and region != self._region(offset + size - 1):
            for i in range(size):
                self.io_write(offset + i, 1, (value >> (8 * i)) & 0xFF)
            return
        if region == "control":
            if size == 2:
                self.select(value)
            return  # 8-bit data writes do nothing since QEMU 2.4
        if region == "dma" and self.dma_enabled and size == 4 and offset in (4, 8):
            # the guest writes the big-endian address bytes with a little-endian outl
            half = int.from_bytes(value.to_bytes(4, "little"), "big")
            if offset == 4:
                self.dma_addr = half << 32
            else:
                self.dma_addr |= half
                self._dma_transfer()

    # ------------------------------------------------------------------ DMA
    def _dma_transfer(self):
        descriptor, self.dma_addr = self.dma_addr, 0
        memory = self.dma_memory
        try:
            control, length, address = DMA_ACCESS.unpack(memory.read(descriptor, DMA_ACCESS.size))
        except GuestError:
            self._dma_report(descriptor, DMA_CTL_ERROR)
            return
        if control & DMA_CTL_SELECT:
            self.select(control >> 16)
        kind = None
        if control & DMA_CTL_READ:
            kind = "read"
        elif control & DMA_CTL_WRITE:
            kind = "write"
        elif control & DMA_CTL_SKIP:
            kind = "skip"
        else:
            length = 0
        item = self._current_item()
        status = 0
        while length > 0 and not status & DMA_CTL_ERROR:
            if self.cur_offset >= len(item):
                chunk = length  # past the end: reads give zeros, writes fail
                try:
                    if kind == "read":
                        memory.write(address, bytes(chunk))
                except GuestError:
                    status |= DMA_CTL_ERROR
                if kind == "write":
                    status |= DMA_CTL_ERROR
            else:
                chunk = min(length, len(item) - self.cur_offset)
                if kind == "read":
                    try:
                        memory.write(address, item[self.cur_offset:self.cur_offset + chunk])
                    except GuestError:
                        status |= DMA_CTL_ERROR
                elif kind == "write":
                    status |= DMA_CTL_ERROR  # every item is read-only
                self.cur_offset += chunk
            address += chunk
            length -= chunk
        self._dma_report(descriptor, status)

    def _dma_report(self, descriptor, status):
        try:
            self.dma_memory.write(descriptor, struct.pack(">I", status))
        except GuestError:
            pass  # nowhere to report to, as a failed DMA store in QEMU

    # ------------------------------------------------------------------ lifecycle and state
    def reset(self):
        self.select(FW_CFG_SIGNATURE)

    def _post_load(self, version_id):
        if self.cur_entry != FW_CFG_INVALID and self._slot(self.cur_entry) is None:
            raise StateError(f"{self.name}: cur_entry {self.cur_entry:#x} is not a valid selector")
        # cur_offset is not checked against the item's length: items are host configuration and
        # may differ on the destination (the two VMs of a COLO pair, say), as QEMU allows; an
        # offset past the end reads as the end of the item.
        if self.dma_addr and not self.dma_enabled:
            raise StateError(f"{self.name}: dma_addr {self.dma_addr:#x} set but this fw_cfg has no DMA")

    VMSTATE_DMA = VMStateDescription(
        "fw_cfg/dma", version_id=1, minimum_version_id=1,
        fields=[U64("dma_addr")],
    )

    VMSTATE = VMStateDescription(
        "fw_cfg", version_id=1, minimum_version_id=1,
        fields=[U16("cur_entry"), U32("cur_offset")],
        subsections=[Subsection(VMSTATE_DMA, needed=lambda dev: dev.dma_enabled)],
        post_load=lambda dev, version_id: dev._post_load(version_id),
    )

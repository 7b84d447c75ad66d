"""Block backends: the host file behind a guest disk (``-drive file=IMG,format=raw``).

A raw image is read and written with ``pread``/``pwrite`` at byte offsets and flushed
with ``fsync``; its size is its capacity (a partial last sector reads as zeros, as QEMU's
raw driver does).  Other formats are recognised by their magic and refused with a message
that says how to convert them: qcow2 needs a library that reads and writes it, and none
that is kept up to date exists for Python.
"""

import os
import stat
import struct

from emu.errors import ConfigError

SECTOR = 512
MAGICS = {b"QFI\xfb": "qcow2", b"QEVM": "qcow (v1)", b"KDMV": "vmdk", b"conectix": "vpc (VHD)",
          b"vhdxfile": "vhdx", b"<<< Sun VirtualBox": "vdi"}


def probe_format(path):
    """The image format a file's first bytes give away ("raw" when nothing does)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        raise ConfigError(f"-drive: cannot read {path!r}: {e.strerror}") from None
    for magic, name in MAGICS.items():
        if head.startswith(magic):
            return name
    return "raw"


class RawImage:
    """A raw disk image; ``readonly`` opens it for reading only."""

    def __init__(self, path, readonly=False, serial=""):
        self.path = path
        self.readonly = readonly
        self.serial = serial
        try:
            self.fd = os.open(path, os.O_RDONLY if readonly else os.O_RDWR)
        except OSError as e:
            raise ConfigError(f"-drive: cannot open {path!r}{' read-only' if readonly else ''}: "
                              f"{e.strerror}") from None
        mode = os.fstat(self.fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            os.close(self.fd)
            raise ConfigError(f"-drive: {path!r} is neither a regular file nor a block device")
        self.size = os.lseek(self.fd, 0, os.SEEK_END)
        self.reads = self.writes = self.flushes = 0

    @property
    def sectors(self):
        return self.size // SECTOR

    def read(self, offset, length):
        self.reads += 1
        data = os.pread(self.fd, length, offset)
        return data + bytes(length - len(data))  # past the end of a partial sector: zeros

    def write(self, offset, data):
        if self.readonly:
            raise OSError(30, "read-only drive")
        self.writes += 1
        done = 0
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], offset + done)

    def flush(self):
        self.flushes += 1
        if not self.readonly:
            os.fsync(self.fd)

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def guess_geometry(drive):
    """The disk's cylinders, heads and sectors per track, as QEMU's hd_geometry_guess.

    An MBR whose partition ends on a cylinder boundary with at most 16 heads gives its own
    geometry (a disk partitioned under a BIOS that did not translate); otherwise the standard
    physical one: 16 heads, 63 sectors, as many cylinders as fit (2 to 16383)."""
    sectors = drive.sectors
    mbr = drive.read(0, SECTOR) if sectors else b""
    if len(mbr) == SECTOR and mbr[510:512] == b"\x55\xaa":
        for entry in range(4):
            offset = 0x1BE + 16 * entry
            end_head, end_sector = mbr[offset + 5], mbr[offset + 6] & 63
            (length,) = struct.unpack_from("<I", mbr, offset + 12)
            cylinders = sectors // ((end_head + 1) * end_sector) if length and end_head and end_sector else 0
            if 1 <= cylinders <= 16383:
                if end_head + 1 <= 16:
                    return cylinders, end_head + 1, end_sector
                break  # a translating BIOS partitioned it: the physical geometry stays the standard one
    return max(2, min(16383, sectors // (16 * 63))), 16, 63


def open_drive(path, image_format=None, readonly=False, serial=""):
    """The backend of one ``-drive``: ``format=raw`` (or none, when the file is raw)."""
    probed = probe_format(path)
    if image_format is None:
        image_format = probed
        if probed != "raw":
            raise ConfigError(f"-drive file={path}: {probed} images are not supported (only raw); convert it "
                              f"with: qemu-img convert -O raw {path} {path}.raw")
    if image_format != "raw":
        raise ConfigError(f"-drive file={path}: format {image_format!r} is not supported (only raw)")
    return RawImage(path, readonly=readonly, serial=serial)

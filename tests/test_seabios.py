"""Debian's SeaBIOS on our pc, beside QEMU 7.2 with the same devices: its log on the debug
port 0x402 (-debugcon, -global isa-debugcon.iobase=0x402), the PCI devices it finds, and a
boot from a virtio-blk disk whose boot sector reads its second sector through SeaBIOS's
int 13h (its own virtio driver) and says what it found."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT, qemu_binary
from guestasm import assemble

SEABIOS = "/usr/share/seabios/bios.bin"

BOOT_SECTOR = r"""
.code16
start:
    xor ax, ax
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov sp, 0x7c00
    push dx                   # DL: the boot drive, as the BIOS gives it
    mov si, offset hello
    call print
    mov ax, 0x0201            # int 13h: read 1 sector
    mov cx, 0x0002            # cylinder 0, sector 2 (LBA 1)
    pop dx
    xor dh, dh                # head 0, DL: the boot drive
    mov bx, 0x8000
    int 0x13
    jc failed
    mov si, 0x8000
    call print
    mov al, 0x21              # exit status (0x21 << 1) | 1
    out 0xf4, al
failed:
    mov si, offset oops
    call print
    mov al, 0x22
    out 0xf4, al
print:
    lodsb
    test al, al
    jz done
    mov dx, 0x402
    out dx, al
    jmp print
done:
    ret
hello: .asciz "boot sector: running\n"
oops: .asciz "boot sector: int 13h failed\n"
"""
SECOND_SECTOR = b"second sector: read through int 13h\n\0"


@pytest.fixture
def boot_disk(tmp_path):
    code, _ = assemble(BOOT_SECTOR, 0x7C00, bits=16)
    assert len(code) <= 510
    image = tmp_path / "boot.img"
    image.write_bytes(code.ljust(510, b"\0") + b"\x55\xaa" + SECOND_SECTOR.ljust(512, b"\0"))
    os.truncate(image, 4 << 20)  # 8 cylinders of 16 heads, 63 sectors: too small a disk has no cylinder
    return image


def _seabios_log(cmd, log, timeout=60):
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, timeout=timeout)
    return result.returncode, log.read_text(errors="replace")


def _emu(image, log, extra=()):
    return [sys.executable, "-m", "emu", "run", "-m", "64M", "-bios", SEABIOS, "-serial", "null", "-no-reboot",
            "-debugcon", f"file:{log}", "-global", "isa-debugcon.iobase=0x402",
            "-drive", f"file={image},format=raw,if=virtio", *extra]


def _qemu(image, log):
    return [qemu_binary(), "-machine", "pc", "-accel", "tcg", "-m", "64M", "-nodefaults", "-nographic",
            "-display", "none", "-monitor", "none", "-serial", "null", "-no-reboot", "-bios", SEABIOS,
            "-debugcon", f"file:{log}", "-global", "isa-debugcon.iobase=0x402",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-drive", f"file={image},format=raw,if=virtio"]


@pytest.mark.skipif(not os.path.exists(SEABIOS), reason="Debian's seabios package is not installed")
def test_seabios_boots_a_virtio_disk_as_under_qemu(boot_disk, tmp_path):
    status, log = _seabios_log(_emu(boot_disk, tmp_path / "emu.log"), tmp_path / "emu.log")
    for line in ("SeaBIOS (version", "Running on QEMU (i440fx)", "qemu/e820: addr 0x0000000000000000 len "
                 "0x0000000004000000 [RAM]", "PCI: init bdf=00:00.0 id=8086:1237",
                 "PCI: init bdf=00:01.0 id=8086:7000", "PCI: init bdf=00:02.0 id=1af4:1042",
                 "found virtio-blk at 00:02.0", "PCHS=8/16/63 translation=none",
                 "boot sector: running", SECOND_SECTOR.decode().strip("\0")):
        assert line in log, f"{line!r} missing from SeaBIOS's log:\n{log[-3000:]}"
    assert status == (0x21 << 1) | 1, log[-2000:]
    if qemu_binary() is None:
        pytest.skip("qemu-system-x86_64 is not installed: no reference run")
    qemu_status, qemu_log = _seabios_log(_qemu(boot_disk, tmp_path / "qemu.log"), tmp_path / "qemu.log")
    assert qemu_status == status
    for line in ("Running on QEMU (i440fx)", "found virtio-blk at 00:02.0", "PCHS=8/16/63 translation=none",
                 "boot sector: running",
                 SECOND_SECTOR.decode().strip("\0")):
        assert line in qemu_log  # the reference does the same


@pytest.mark.skipif(not os.path.exists(SEABIOS), reason="Debian's seabios package is not installed")
def test_seabios_without_a_disk_says_so_and_waits(tmp_path):
    log = tmp_path / "emu.log"
    proc = subprocess.Popen([sys.executable, "-m", "emu", "run", "-m", "64M", "-bios", SEABIOS, "-serial", "null",
                             "-debugcon", f"file:{log}", "-global", "isa-debugcon.iobase=0x402"], cwd=ROOT)
    try:
        import time
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "No bootable device." not in (log.read_text(errors="replace")
                                                                           if log.exists() else ""):
            time.sleep(0.2)
        text = log.read_text(errors="replace")
        assert "No bootable device." in text and "PS2 keyboard initialized" in text, text[-2000:]
        assert proc.poll() is None  # it waits to retry, as on a PC
    finally:
        proc.kill()
        proc.wait()

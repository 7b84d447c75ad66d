"""Linux boot protocol loader (synthetic bzImages) and Debian's kernel booted to a shell."""

import gzip
import hashlib
import lzma
import os
import re
import select
import struct
import subprocess
import sys
import time

import pytest
from conftest import ROOT, firmware
from guestasm import assemble
from linuxguest import LinuxGuest

from emu import loaders
from emu.cpu.x86 import TSC_HZ
from emu.errors import ConfigError
from emu.memory import GuestRam
from machines import pc

MIB = 1 << 20
KERNEL_PADDR = 0x1000000
KERNEL_VADDR = 0xFFFFFFFF81000000

#: The fake kernel checks what the boot protocol promises and reports through isa-debug-exit.
CHECKS = """
    mov ax, cs
    cmp ax, 0x10
    jne fail
    mov ax, ds
    cmp ax, 0x18
    jne fail
    cmp byte ptr [rsi + 0x210], 0xff
    jne fail
    mov eax, dword ptr [rsi + 0x228]
    cmp dword ptr [rax], 0x6f6f6c62
    jne fail
    mov eax, dword ptr [rsi + 0x218]
    cmp dword ptr [rax], 0x44524e49
    jne fail
    mov rax, 0xfee00000
    mov rax, cr3
    mov al, 0x10
    out 0xf4, al
    hlt
fail:
    mov al, 0x11
    out 0xf4, al
    hlt
"""


def _elf64(code, paddr=KERNEL_PADDR, vaddr=KERNEL_VADDR, bss=0x3000):
    """A minimal vmlinux-like ELF64: one PT_LOAD, virtual link address, physical entry."""
    phoff, code_off = 64, 0x1000
    ehdr = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    ehdr += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, paddr, phoff, 0, 0, 64, 56, 1, 64, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, code_off, vaddr, paddr, len(code), len(code) + bss, 0x200000)
    return (ehdr + phdr).ljust(code_off, b"\0") + code


def make_bzimage(code=b"\xf4", version=0x020F, xloadflags=0x3, payload=None, setup_sects=4,
                 initrd_addr_max=0x7FFFFFFF, init_size=0x400000, cmdline_size=2047, pm_prefix=b""):
    """A bzImage: setup sectors with the header, then a protected-mode part with an XZ payload."""
    payload = lzma.compress(_elf64(code), format=lzma.FORMAT_XZ) if payload is None else payload
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    setup[0x200:0x202] = bytes([0xEB, 0x268 - 0x202])
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    setup[0x211] = 0x01
    struct.pack_into("<I", setup, 0x214, 0x100000)
    struct.pack_into("<I", setup, 0x22C, initrd_addr_max)
    struct.pack_into("<I", setup, 0x230, 0x200000)
    setup[0x234] = 1
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, cmdline_size)
    protected = pm_prefix.ljust(0x400, b"\x90")
    struct.pack_into("<II", setup, 0x248, len(protected), len(payload))
    struct.pack_into("<Q", setup, 0x258, KERNEL_PADDR)
    struct.pack_into("<I", setup, 0x260, init_size)
    kernel_part = protected + payload + b"\0" * 4
    struct.pack_into("<I", setup, 0x1F4, (len(kernel_part) + 15) // 16)  # syssize, in 16-byte units
    return bytes(setup) + kernel_part.ljust((len(kernel_part) + 15) // 16 * 16, b"\0")


def test_a_bzimage_cut_short_is_refused_at_start(files):
    image = make_bzimage()
    kernel, _ = files(image=image[:len(image) - 100])
    with pytest.raises(ConfigError, match=r"truncated bzImage: \d+ bytes, its setup header says \d+"):
        pc.build(ram_size=64 * MIB, kernel=kernel, serial=["null"])


@pytest.fixture
def files(tmp_path):
    def write(image=None, initrd=b"INRD" + bytes(5000), **header):
        kernel = tmp_path / "bzImage"
        kernel.write_bytes(image if image is not None else make_bzimage(**header))
        rd = tmp_path / "initrd"
        rd.write_bytes(initrd)
        return str(kernel), str(rd)
    return write


def u32(ram, addr):
    return struct.unpack("<I", ram.read(addr, 4))[0]


def test_zero_page_command_line_initrd_and_e820(files):
    kernel, initrd = files()
    ram = GuestRam(64 * MIB)
    entry = loaders.load_kernel(ram, kernel, "console=ttyS0 quiet", initrd)
    assert entry.mode == "long64" and entry.cs == 0x10 and entry.regs["ds_selector"] == 0x18
    assert entry.ip == KERNEL_PADDR                       # host-decompressed vmlinux: its physical entry
    zp = entry.regs["rsi"]
    assert ram.read(zp + 0x202, 4) == b"HdrS" and ram.read(zp + 0x210, 1) == b"\xff"
    cmd = u32(ram, zp + 0x228)
    assert ram.read(cmd, 20) == b"console=ttyS0 quiet\0"
    rd, rd_size = u32(ram, zp + 0x218), u32(ram, zp + 0x21C)
    assert rd_size == 5004 and rd % 4096 == 0 and 64 * MIB - 8192 <= rd and rd + rd_size <= 64 * MIB
    assert ram.read(rd, 4) == b"INRD"
    count = ram.read(zp + 0x1E8, 1)[0]
    e820 = [struct.unpack("<QQI", ram.read(zp + 0x2D0 + 20 * i, 20)) for i in range(count)]
    assert e820 == [(0, 0x9FC00, 1), (0x9FC00, 0x400, 2), (0xF0000, 0x10000, 2), (0x100000, 63 * MIB, 1)]
    assert ram.read(KERNEL_PADDR, 1) == b"\xf4"          # the ELF segment at its physical address
    assert ram.read(KERNEL_PADDR + 1, 0x3000) == bytes(0x3000)


def test_initrd_stays_below_initrd_addr_max(files):
    kernel, initrd = files(initrd_addr_max=0x1FFFFFF)
    ram = GuestRam(64 * MIB)
    zp = loaders.load_kernel(ram, kernel, "", initrd).regs["rsi"]
    rd = u32(ram, zp + 0x218)
    assert rd + 5004 <= 0x2000000 and rd >= 0x2000000 - 8192


def test_identity_page_tables_and_gdt(files):
    kernel, initrd = files()
    ram = GuestRam(64 * MIB)
    regs = loaders.load_kernel(ram, kernel, "", initrd).regs

    def walk(va):
        e = struct.unpack("<Q", ram.read(regs["cr3"] + ((va >> 39) & 511) * 8, 8))[0]
        e = struct.unpack("<Q", ram.read((e & ~0xFFF) + ((va >> 30) & 511) * 8, 8))[0]
        e = struct.unpack("<Q", ram.read((e & ~0xFFF) + ((va >> 21) & 511) * 8, 8))[0]
        assert e & 0x83 == 0x83
        return (e & ~0x1FFFFF & ((1 << 52) - 1)) + (va & 0x1FFFFF)

    for va in (0, 0x7123, KERNEL_PADDR + 0x1234, 0x3FFFFFF, 0xFEE00010, 0xFFFFFFFF):
        assert walk(va) == va
    gdt = ram.read(regs["gdt"], regs["gdt_limit"] + 1)
    code, data = struct.unpack_from("<QQ", gdt, 0x10)
    assert code >> 53 & 1 and code >> 47 & 1 and not code >> 54 & 1   # L, P, not D
    assert data >> 47 & 1 and data >> 41 & 1                          # P, writable


def test_guest_decompressor_path_enters_startup_64(files):
    kernel, initrd = files(pm_prefix=b"PMKERNEL")
    ram = GuestRam(64 * MIB)
    with open(kernel, "rb") as f:
        image = f.read()
    entry = loaders.load_linux(ram, kernel, image, "x", initrd, host_decompress=False)
    assert entry.ip == KERNEL_PADDR + 0x200
    assert ram.read(KERNEL_PADDR, 8) == b"PMKERNEL"
    assert u32(ram, entry.regs["rsi"] + 0x214) == KERNEL_PADDR


def test_undecompressible_payload_falls_back_with_a_note(files):
    kernel, initrd = files(payload=b"\x28\xb5\x2f\xfd" + bytes(64))   # zstd: no host decompressor
    entry = loaders.load_kernel(GuestRam(64 * MIB), kernel, "", initrd)
    assert entry.ip == KERNEL_PADDR + 0x200 and "decompresses itself" in entry.notes[0]


@pytest.mark.parametrize("header, initrd, ram_mib, message", [
    ({"version": 0x020B}, None, 64, r"boot protocol 2\.11 is older than 2\.12"),
    ({"xloadflags": 0x2}, None, 64, "no 64-bit entry point"),
    ({}, bytes(60 * MIB), 64, "initrd .* do not fit"),
    ({"init_size": 0x4000000}, None, 64, r"needs memory up to 0x5000000 \(80 MiB\)"),
    ({"cmdline_size": 10}, None, 64, "command line is 13 bytes, the kernel accepts at most 10"),
])
def test_errors_name_the_file_and_the_problem(files, header, initrd, ram_mib, message):
    kernel, rd = files(initrd=initrd if initrd is not None else b"INRD", **header)
    with pytest.raises(ConfigError, match=message) as info:
        loaders.load_kernel(GuestRam(ram_mib * MIB), kernel, "console=ttyS0", rd)
    assert kernel in str(info.value) or rd in str(info.value)


def test_cpu_enters_the_kernel_as_the_protocol_says(files):
    code, _ = assemble(CHECKS, KERNEL_VADDR, bits=64)
    kernel, initrd = files(code=code)
    machine = pc.build(ram_size=64 * MIB, kernel=kernel, initrd=initrd, append="bloop", serial=["null"],
                       icount_shift=0)
    assert machine.run(until_ns=10**7) == (0x10 << 1) | 1


def _fw_cfg_command_line(machine):
    """What a guest reads from fw_cfg's command line items (size 0: there are none)."""
    machine.ports.write(0x510, 2, 0x14)
    size = struct.unpack("<I", bytes(machine.ports.read(0x511, 1) for _ in range(4)))[0]
    machine.ports.write(0x510, 2, 0x15)
    return size, bytes(machine.ports.read(0x511, 1) for _ in range(size))


@pytest.mark.parametrize("append", ["console=ttyS0 quiet", ""])
def test_fw_cfg_has_the_command_line_of_a_linux_kernel(files, append):
    """As QEMU's x86_load_linux: the items are there for a Linux kernel, an empty line too."""
    kernel, _ = files()
    machine = pc.build(ram_size=64 * MIB, kernel=kernel, append=append, serial=["null"], icount_shift=0)
    try:
        assert _fw_cfg_command_line(machine) == (len(append) + 1, append.encode() + b"\0")
    finally:
        machine.close()


def test_fw_cfg_has_no_command_line_for_a_multiboot_kernel():
    """QEMU's multiboot path returns before the command line items: the kernel has it in RAM only."""
    machine = pc.build(kernel=firmware("hello.elf"), append="console=ttyS0", serial=["null"], icount_shift=0)
    try:
        assert _fw_cfg_command_line(machine) == (0, b"")
    finally:
        machine.close()


def test_fw_cfg_has_the_command_line_of_a_pvh_kernel():
    """A PVH ELF takes x86_load_linux's path too: the command line is in fw_cfg and in RAM."""
    machine = pc.build(kernel=firmware("pvh.elf"), append="console=ttyS0", serial=["null"], icount_shift=0)
    try:
        assert _fw_cfg_command_line(machine) == (14, b"console=ttyS0\0")
    finally:
        machine.close()


def test_newc_archive_round_trip():
    sys.path.insert(0, str(ROOT))
    from linux.build import CpioEntry, write_newc
    data = write_newc([CpioEntry("init", 0o100755, b"#!/bin/sh\n"), CpioEntry("dev", 0o40755)])
    names, pos = [], 0
    while True:
        assert data[pos:pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = fields[11], fields[6]
        name = data[pos + 110:pos + 110 + namesize - 1].decode()
        pos = (pos + 110 + namesize + 3) & ~3
        body = data[pos:pos + filesize]
        pos = (pos + filesize + 3) & ~3
        names.append((name, oct(fields[1]), body))
        if name == "TRAILER!!!":
            break
    assert names == [("init", "0o100755", b"#!/bin/sh\n"), ("dev", "0o40755", b""), ("TRAILER!!!", "0o0", b"")]
    assert pos == len(data) and len(data) % 4 == 0
    assert gzip.decompress(gzip.compress(data)) == data


# ---------------------------------------------------------------------------- the real kernel

RTC_BASE = 1700000000  # 2023-11-14 22:13:20 UTC: `date` must follow the RTC, not the host clock
APPEND = "console=ttyS0 earlyprintk=serial,ttyS0,115200 noapic nolapic nosmp panic=-1 lpj=1000000"


class Console:
    def __init__(self, proc):
        self.proc, self.text = proc, b""

    def expect(self, marker, timeout):
        deadline = time.monotonic() + timeout
        while marker.encode() not in self.text:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise AssertionError(f"no {marker!r} within {timeout}s; output ends with "
                                     f"{self.text[-2000:].decode('latin1')}")
            ready, _, _ = select.select([self.proc.stdout], [], [], min(left, 1))
            if ready:
                self.text += os.read(self.proc.stdout.fileno(), 65536)
        return self.text

    def send(self, line):
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()


def test_debian_kernel_boots_to_a_busybox_shell(debian_linux, tmp_path):
    kernel, initrd = debian_linux
    proc = subprocess.Popen(
        [sys.executable, "-m", "emu", "run", "-m", "256M", "-kernel", kernel, "-initrd", initrd,
         "-append", APPEND, "-serial", "stdio", "-no-reboot", "-rtc-base", str(RTC_BASE)],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    console = Console(proc)
    try:
        console.expect("Linux version 6.1", 60)
        console.expect("Run /init as init process", 240)
        console.expect("built-in shell (ash)", 120)
        console.send("uname -sm; echo MARK-$((6*7))")
        console.expect("MARK-42", 60)
        assert b"Linux x86_64" in console.text
        console.send("grep -c ^processor /proc/cpuinfo; grep -m1 '^flags' /proc/cpuinfo; "
                     "grep -m1 '^bugs' /proc/cpuinfo; date +%s; echo CPU-$((2*4))")
        text = console.expect("CPU-8", 60).decode("latin1")
        after = text[text.rindex("CPU-$((2*4))"):]  # the line editor may wrap the echo at "e|cho"
        lines = [line.strip() for line in after.splitlines()]
        assert "1" in lines and any(line.startswith("flags") and " fpu " in line for line in lines), after
        # fast strings on in IA32_MISC_ENABLE, as after a reset: Linux keeps its rep movsq/stosq
        # copies; no ERMS hint, which would make it use rep movsb/stosb (byte steps when translated)
        flags = next(line for line in lines if line.startswith("flags")) + " "
        assert " rep_good " in flags and " erms " not in flags, after
        # IA32_ARCH_CAPABILITIES says what a CPU that does not speculate is not affected by:
        # no page table isolation, no buffer clearing on every return to user mode
        bugs = next(line for line in lines if line.startswith("bugs")) + " "
        assert " arch_capabilities " in flags and " cpu_meltdown " not in bugs and " mds " not in bugs, after
        seconds = [int(line) for line in lines if line.isdigit() and len(line) >= 9]
        assert seconds and RTC_BASE <= seconds[0] <= RTC_BASE + 600, after  # the kernel read the RTC at boot
        console.send("echo kept > /tmp/f; cat /tmp/f /proc/interrupts; echo DONE-$((2*3))")
        text = console.expect("DONE-6", 60).decode("latin1")
        timer = [line for line in text.splitlines() if line.strip().startswith("0:")]
        serial = [line for line in text.splitlines() if "ttyS0" in line and line.strip().startswith("4:")]
        assert "kept" in text and timer and serial, text[-1500:]
        assert int(timer[-1].split()[1]) > 100 and int(serial[-1].split()[1]) > 0
        # CPUID leaf 0x15 gives the TSC rate (PIT calibration fails in real time) and the TSC stays
        # the clocksource: RDTSC agrees with the guest's timer interrupts
        console.send("read c < /sys/devices/system/clocksource/clocksource0/current_clocksource; "
                     "echo \"clocksource=[$c]\"; echo CLK-$((5*5))")
        text = console.expect("CLK-25", 60).decode("latin1")
        assert f"tsc: Detected {TSC_HZ / 1e6:.3f} MHz processor" in text and "unstable" not in text, text[-1500:]
        assert re.search(r"clocksource=\[([a-z][\w-]*)\]", text).group(1) == "tsc", text[-1500:]
        console.send("printf '\\x05' | dd of=/dev/port bs=1 seek=244 count=1")
        assert proc.wait(timeout=60) == (5 << 1) | 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_shell_pipelines_keep_every_byte(debian_linux):
    """Processes talking through a pipe while timer interrupts stop the engine at any moment:
    the reader gets every byte, in order.  (A stop that was pending when a SYSCALL ran once made
    the engine step over it: write() returned its own system call number, and data was lost.)"""
    expected = hashlib.md5("".join(f"{i}\n" for i in range(1, 20001)).encode()).hexdigest()
    guest = LinuxGuest(*debian_linux)
    try:
        guest.boot()
        out = guest.run("for r in 1 2 3 4; do seq 1 20000 | md5sum; done", timeout=120)
        assert [line.split()[0] for line in out.splitlines() if line.strip().endswith("  -")] == [expected] * 4, out
    finally:
        guest.close()


def test_debian_kernel_boots_with_the_local_apic(debian_linux):
    """Without ``nolapic`` the kernel enables our local APIC (virtual wire mode: with no MP
    or ACPI tables it routes the 8259's interrupts through LINT0), and the timer and serial
    interrupts still arrive, now through the APIC."""
    kernel, initrd = debian_linux
    append = APPEND.replace(" nolapic", "")
    proc = subprocess.Popen(
        [sys.executable, "-m", "emu", "run", "-m", "256M", "-kernel", kernel, "-initrd", initrd,
         "-append", append, "-serial", "stdio", "-no-reboot"],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    console = Console(proc)
    try:
        console.expect("built-in shell (ash)", 240)
        console.send("dmesg | grep -c 'Switch to virtual wire mode'; grep -E '^ *(0|4):' /proc/interrupts; "
                     "sleep 1; grep -E '^ *0:' /proc/interrupts; echo APIC-$((3*5))")
        text = console.expect("APIC-15", 60).decode("latin1")
        after = text[text.rindex("dmesg | grep"):]
        timer = [int(line.split()[1]) for line in after.splitlines() if line.strip().startswith("0:")]
        serial = [int(line.split()[1]) for line in after.splitlines() if line.strip().startswith("4:")]
        assert "1" in [line.strip() for line in after.splitlines()], after  # the virtual wire message, once
        assert len(timer) == 2 and timer[1] > timer[0] > 0 and serial and serial[0] > 0, after
        # the README's way out: reboot -f resets through the 8042, -no-reboot ends the run
        console.send("reboot -f")
        assert proc.wait(timeout=60) == 0
        assert b"guest requested a reset; stopping (-no-reboot)" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_debian_vmlinux_boots_through_its_pvh_note(debian_linux, tmp_path):
    """The kernel proper of the same bzImage (an ELF64 with XEN_ELFNOTE_PHYS32_ENTRY), given to
    -kernel as QEMU users give a vmlinux: it starts at its 32-bit PVH entry and reaches the shell."""
    kernel, initrd = debian_linux
    image = open(kernel, "rb").read()
    header = loaders.parse_linux_header(image)
    protected = image[(header.setup_sects + 1) * 512:]
    vmlinux = tmp_path / "vmlinux"
    vmlinux.write_bytes(loaders._decompress_payload(
        protected[header.payload_offset:header.payload_offset + header.payload_length]))
    assert loaders.find_pvh_entry(vmlinux.read_bytes()) is not None
    guest = LinuxGuest(str(vmlinux), initrd)
    try:
        guest.boot()
        assert "6.1.0" in guest.run("uname -r")   # no setup header, no multiboot header: PVH it was
        assert guest.poweroff() == 0
    finally:
        guest.close()

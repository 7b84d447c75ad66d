"""The dirty log is exact: every page whose content changed is reported, every page that
was written is reported even when the value written was already there, and no other page.

Each test takes a shadow copy of RAM when the log starts and compares ``dirty_pages()``
with the pages whose bytes differ afterwards, and with the set of pages the guest (or the
host, or a device) is known to write.  Writers covered: CPU stores in 32-bit and 64-bit
mode (page-straddling ones included, with paging on and off), string instructions in both
directions, fw_cfg DMA and other host writes, and the frames that interrupt and exception
delivery pushes (the C fast path and the Python path).
"""

import os
import random
import struct

import numpy as np
import pytest
from conftest import requires_patched_engine
from guestasm import assemble, bare_machine, entry

from emu.errors import EmuError, GuestError
from machines import pc

PAGE = 4096
PTE_FLAGS = 0x63  # present, writable, accessed, dirty: the page walker has nothing to set
RUN_NS = 1_000_000_000


def pages(*ranges):
    """The page numbers covered by (address, length) ranges."""
    out = set()
    for addr, length in ranges:
        if length:
            out.update(range(addr // PAGE, (addr + length - 1) // PAGE + 1))
    return out


def changed_pages(before, after):
    return set(np.flatnonzero((before.reshape(-1, PAGE) != after.reshape(-1, PAGE)).any(axis=1)).tolist())


def hexs(numbers):
    return "[" + ", ".join(f"{n:#x}" for n in sorted(numbers)) + "]"


class Shadow:
    """Starts the log and keeps a copy of RAM (renewed at every check) to diff against."""

    def __init__(self, machine):
        self.machine = machine
        machine.start_dirty_log()
        self.before = machine.ram.buf.copy()

    def check(self, written, same=()):
        """``written``: every page written since the last check; ``same``: those of them
        whose content ends up unchanged (written with the value already there)."""
        reported = self.machine.dirty_pages().tolist()
        assert reported == sorted(set(reported)), "dirty_pages() must list each page once, in order"
        dirty = set(reported)
        changed = changed_pages(self.before, self.machine.ram.buf)
        written, same = set(written), set(same)
        assert not changed - dirty, f"pages changed but not reported: {hexs(changed - dirty)}"
        assert not written - dirty, f"pages written but not reported: {hexs(written - dirty)}"
        assert not dirty - written, f"pages reported that nobody wrote: {hexs(dirty - written)}"
        # the guard on the test itself: the writers did what the test says they did
        assert changed == written - same, f"changed {hexs(changed)}, expected {hexs(written - same)}"
        self.before = self.machine.ram.buf.copy()
        return dirty


def load(machine, source, origin=0x100000, bits=32):
    code, sym = assemble(source, origin, bits=bits)
    machine.ram.write(origin, code)
    return sym


def run_to_exit(machine):
    status = machine.run(until_ns=RUN_NS)
    assert status == 1, (status, machine.exit_message)


def run_phase(machine, sym, name):
    """Run the guest code at ``name`` until it spins at ``name_done`` (a ``jmp .``)."""
    machine.cpu.set_reg("rip", sym[name])
    assert machine.run(until_ns=machine.clock.now() + 300_000) is None
    assert machine.cpu.rip == sym[name + "_done"], f"{name} did not finish (rip={machine.cpu.rip:#x})"


def long_mode_tables(machine, aliases=(), high=()):
    """4-level tables at 0x10000: the first 8 MiB identity-mapped with 4 KiB pages, except
    ``aliases`` {virtual page: physical address}; ``high`` lists physical addresses mapped
    page after page at virtual 0xffff800000000000.  Accessed and dirty bits are preset."""
    w = machine.ram.write
    w(0x10000, struct.pack("<Q", 0x11000 | PTE_FLAGS))
    w(0x10000 + 256 * 8, struct.pack("<Q", 0x17000 | PTE_FLAGS))
    w(0x11000, struct.pack("<Q", 0x12000 | PTE_FLAGS))
    w(0x12000, b"".join(struct.pack("<Q", (0x13000 + i * PAGE) | PTE_FLAGS) for i in range(4)))
    ptes = [(i * PAGE) | PTE_FLAGS for i in range(2048)]
    for vpage, phys in dict(aliases).items():
        ptes[vpage] = phys | PTE_FLAGS
    w(0x13000, b"".join(struct.pack("<Q", p) for p in ptes))
    w(0x17000, struct.pack("<Q", 0x18000 | PTE_FLAGS))
    w(0x18000, struct.pack("<Q", 0x19000 | PTE_FLAGS))
    w(0x19000, b"".join(struct.pack("<Q", p | PTE_FLAGS) for p in high))
    return 0x10000


GDT32 = r"""
.align 8
gdt: .quad 0
     .quad 0x00cf9b000000ffff   # 0x08 ring-0 code (accessed bit preset)
     .quad 0x00cf93000000ffff   # 0x10 ring-0 data
     .quad 0x00cffb000000ffff   # 0x18 ring-3 code
     .quad 0x00cff3000000ffff   # 0x20 ring-3 data
tss_desc: .quad 0               # 0x28
gdt_end:
gdtr: .word gdt_end - gdt - 1
      .long gdt
idtr: .word 256*8-1
      .long 0x20000
"""

GDT64 = r"""
.align 8
gdt: .quad 0
     .quad 0x00af9b000000ffff   # 0x08 ring-0 code, 64-bit
     .quad 0x00cf93000000ffff   # 0x10 ring-0 data
tss_desc: .quad 0, 0            # 0x18 (16 bytes in long mode)
gdt_end:
gdtr: .word gdt_end - gdt - 1
      .quad gdt
idtr: .word 256*16-1
      .quad 0x20000
"""


def gate32(machine, vector, offset, dpl=0, kind=0xE):
    machine.ram.write(0x20000 + vector * 8, struct.pack("<HHBBH", offset & 0xFFFF, 0x08, 0,
                                                        0x80 | (dpl << 5) | kind, offset >> 16))


def gate64(machine, vector, offset, ist=0):
    machine.ram.write(0x20000 + vector * 16, struct.pack("<HHBBHII", offset & 0xFFFF, 0x08, ist, 0x8E,
                                                         (offset >> 16) & 0xFFFF, offset >> 32, 0))


def tss_descriptor(base, limit=0x67, long_mode=False):
    low = ((base & 0xFFFF) << 16) | limit
    high = ((base >> 16) & 0xFF) | 0x8900 | (base & 0xFF000000)
    return struct.pack("<IIII" if long_mode else "<II", low, high, *((base >> 32, 0) if long_mode else ()))


class ScriptedInterrupts:
    """An interrupt controller that raises one vector at a given guest time."""

    def __init__(self, machine, when, vector):
        self.pending = []
        self.timer = machine.clock.new_timer(lambda: self.pending.append(vector))
        self.timer.arm(when)

    def has_interrupt(self):
        return bool(self.pending)

    def acknowledge(self):
        return self.pending.pop(0)


# ----------------------------------------------------------------------------- (a) CPU stores
STORES32 = r"""
start:
    mov eax, cr4
    or eax, 0x600                              # OSFXSR: SSE and fxsave
    mov cr4, eax
    mov byte ptr [0x200010], 0x11
    mov word ptr [0x201ffe], 0x2233            # ends exactly at the page end: one page
    mov word ptr [0x202fff], 0x4455            # straddles 0x202/0x203
    mov dword ptr [0x204ffd], 0x66778899       # straddles 0x204/0x205
    pcmpeqd xmm0, xmm0
    movups [0x206ff8], xmm0                    # 16 bytes, straddles 0x206/0x207
    fxsave [0x208f80]                          # 512 bytes: 0x208/0x209 (XMM0 on 0x209)
    mov dword ptr [0x20a100], 0                # zero onto zero
    mov dword ptr [0x20b200], 0xabababab       # onto a page the host filled with 0xab
    mov esp, 0x20d002
    push 0x12345678                            # the push straddles 0x20c/0x20d
    xor eax, eax
    xor edx, edx
    mov ebx, 0x01020304
    mov ecx, 0x05060708
    lock cmpxchg8b [0x20effc]                  # locked 8-byte store, straddles 0x20e/0x20f
    mov eax, 0x9999
    xchg [0x210fff], ax                        # implicitly locked, straddles 0x210/0x211
    add dword ptr [0x212000], 0                # read-modify-write of the same value
    mov al, 0
    out 0xf4, al
    jmp .
"""


def test_cpu_stores_32bit_with_straddles_and_same_value_writes():
    m = bare_machine()
    load(m, STORES32)
    m.ram.write(0x20B000, b"\xab" * PAGE)
    m.ram.write(0x212000, b"\x5a" * PAGE)
    m.cpu.enter(entry("protected32", 0x100000))
    shadow = Shadow(m)
    run_to_exit(m)
    shadow.check(written=set(range(0x200, 0x213)), same={0x20A, 0x20B, 0x212})
    assert m.ram.read(0x204FFD, 4) == struct.pack("<I", 0x66778899)
    assert m.ram.read(0x20EFFC, 8) == struct.pack("<II", 0x01020304, 0x05060708)


STORES64 = r"""
.code64
start:
    mov rax, 0x1122334455667788
    mov [0x210ffc], rax                        # straddles 0x210/0x211 (identity-mapped)
    mov rbx, 0xffff800000000000                # high half: physical 0x300000, 0x301000, 0x302000
    mov qword ptr [rbx + 0x10], 1
    mov [rbx + 0x1ffe], eax                    # straddles the high pages 1/2: physical 0x301/0x302
    mov qword ptr [0x500008], 2                # virtual page 0x500 is physical 0x360
    std
    mov rdi, 0x213008
    mov rcx, 3
    rep stosq                                  # backwards: 0x212ff8..0x21300f
    cld
    mov rsp, 0x214004
    push rax                                   # straddles 0x213/0x214
    mov rdx, 0
    mov rax, 0
    mov rcx, 0x0102030405060708
    mov rbx, 0x1112131415161718
    lock cmpxchg16b [0x215ff0]                 # 16 bytes at the end of 0x215
    mov byte ptr [0x216000], 0                 # zero onto zero
    mov al, 0
    out 0xf4, al
    jmp .
"""


def test_cpu_stores_64bit_report_physical_pages():
    m = bare_machine()
    load(m, STORES64, bits=64)
    cr3 = long_mode_tables(m, aliases={0x500: 0x360000}, high=[0x300000, 0x301000, 0x302000])
    m.cpu.enter(entry("long64", 0x100000, cr3=cr3))
    shadow = Shadow(m)
    run_to_exit(m)
    shadow.check(written={0x210, 0x211, 0x300, 0x301, 0x302, 0x360, 0x212, 0x213, 0x214, 0x215, 0x216},
                 same={0x216})
    assert m.ram.read(0x300010, 8) == struct.pack("<Q", 1)
    assert m.ram.read(0x360008, 8) == struct.pack("<Q", 2)


PAGING32 = r"""
start:
    mov eax, cr4
    or eax, 0x10                               # PSE: 4 MiB pages
    mov cr4, eax
    mov eax, 0x10000
    mov cr3, eax
    mov eax, cr0
    or eax, 0x80000000
    mov cr0, eax
    mov dword ptr [0x2ff010], 1                # 4 KiB page: virtual 0x2ff000 -> physical 0x600000
    mov dword ptr [0x400ffe], 0x22222222       # 4 MiB page at 0xc00000: straddles 0xc00/0xc01
    mov byte ptr [0x7fffff], 3                 # the last byte of RAM (physical 0xffffff)
    mov al, 0
    out 0xf4, al
    jmp .
"""


def test_paging_32bit_reports_physical_not_virtual_pages():
    m = bare_machine()
    load(m, PAGING32)
    ptes = [(i * PAGE) | PTE_FLAGS for i in range(1024)]
    ptes[0x2FF] = 0x600000 | PTE_FLAGS
    m.ram.write(0x11000, b"".join(struct.pack("<I", p) for p in ptes))
    m.ram.write(0x10000, struct.pack("<II", 0x11000 | PTE_FLAGS, 0xC00000 | 0x80 | PTE_FLAGS))
    m.cpu.enter(entry("protected32", 0x100000))
    shadow = Shadow(m)
    run_to_exit(m)
    shadow.check(written={0x600, 0xC00, 0xC01, 0xFFF})


SPLIT_NONCONTIGUOUS = r"""
start:
    mov eax, 0x10000
    mov cr3, eax
    mov eax, cr0
    or eax, 0x80000000
    mov cr0, eax
    mov dword ptr [0x400ffe], 0x11223344       # virtual 0x400000 -> 0x300000, 0x401000 -> 0x500000
    mov al, 0
    out 0xf4, al
    jmp .
"""


@requires_patched_engine
def test_store_straddling_into_a_noncontiguous_physical_page():
    m = bare_machine()
    load(m, SPLIT_NONCONTIGUOUS)
    m.ram.write(0x10000, struct.pack("<II", 0x11000 | PTE_FLAGS, 0x12000 | PTE_FLAGS))
    m.ram.write(0x11000, b"".join(struct.pack("<I", (i * PAGE) | PTE_FLAGS) for i in range(1024)))
    m.ram.write(0x12000, struct.pack("<II", 0x300000 | PTE_FLAGS, 0x500000 | PTE_FLAGS))
    m.cpu.enter(entry("protected32", 0x100000))
    shadow = Shadow(m)
    run_to_exit(m)
    shadow.check(written={0x300, 0x500})


@requires_patched_engine
def test_accessed_and_dirty_bits_set_by_the_page_walker():
    m = bare_machine()
    load(m, PAGING32)
    # the same mappings as above, but with A and D clear: the walker sets them
    ptes = [(i * PAGE) | 3 for i in range(1024)]
    ptes[0x2FF] = 0x600000 | 3
    m.ram.write(0x11000, b"".join(struct.pack("<I", p) for p in ptes))
    m.ram.write(0x10000, struct.pack("<II", 0x11000 | 3, 0xC00000 | 0x83))
    m.cpu.enter(entry("protected32", 0x100000))
    shadow = Shadow(m)
    run_to_exit(m)
    shadow.check(written={0x10, 0x11, 0x600, 0xC00, 0xC01, 0xFFF})


FAULTING_SPLIT = r"""
.code64
start:
    lgdt [gdtr]
    lidt [idtr]
    mov rsp, 0x91000
    mov rax, 0x1122334455667788
    mov [0x7ffffc], rax                        # the second page (0x800000) is not mapped: #PF
    mov al, 0
    out 0xf4, al
    jmp .
pf:
    add rsp, 8
    add qword ptr [rsp], 8                     # skip the 8-byte store
    iretq
""" + GDT64


@requires_patched_engine
def test_store_that_faults_on_its_second_page_reports_nothing():
    m = bare_machine()
    sym = load(m, FAULTING_SPLIT, bits=64)
    cr3 = long_mode_tables(m)
    gate64(m, 14, sym["pf"])
    m.cpu.enter(entry("long64", 0x100000, cr3=cr3))
    shadow = Shadow(m)
    run_to_exit(m)
    assert m.cpu.exception_counts == {14: 1}
    shadow.check(written={0x90})  # only the #PF frame (and the handler's edit of it)


# ----------------------------------------------------------------------------- (b) string instructions
STRINGS = r"""
start:
    cld
    mov edi, 0x200f80
    mov ecx, 0x2100
    mov al, 0x5a
    rep stosb                                  # 0x200f80..0x20307f
    mov edi, 0x204ff0
    mov ecx, 8
    mov eax, 0x01020304
    rep stosd                                  # 0x204ff0..0x20500f
    mov esi, 0x2ff000
    mov edi, 0x206ffa
    mov ecx, 0x1010
    rep movsb                                  # from host data (read only) to 0x206ffa..0x20800a
    std
    mov esi, 0x2ff01f
    mov edi, 0x20a00f
    mov ecx, 0x20
    rep movsb                                  # backwards: 0x209ff0..0x20a00f
    xor eax, eax
    mov edi, 0x20e004
    mov ecx, 0x403
    rep stosd                                  # backwards, zeros onto zeros: 0x20cffc..0x20e007
    mov esi, 0x300ffc
    mov edi, 0x211002
    mov ecx, 0x404
    rep movsw                                  # backwards word copy of host data: 0x20fffc..0x211003
    cld
    mov edi, 0x212000
    xor ecx, ecx
    rep stosb                                  # count 0: writes nothing
    mov esi, 0x300000
    mov edi, 0x213ffe
    movsd                                      # one string element, straddles 0x213/0x214
    mov al, 0
    out 0xf4, al
    jmp .
"""


def test_string_instructions_forwards_and_backwards():
    m = bare_machine()
    load(m, STRINGS)
    m.ram.write(0x2FF000, (bytes(range(1, 256)) * 33)[:2 * PAGE])
    m.cpu.enter(entry("protected32", 0x100000))
    shadow = Shadow(m)
    run_to_exit(m)
    written = pages((0x200F80, 0x2100), (0x204FF0, 32), (0x206FFA, 0x1010), (0x209FF0, 0x20),
                    (0x20E004 - 4 * 0x402, 4 * 0x403), (0x211002 - 2 * 0x403, 2 * 0x404), (0x213FFE, 4))
    shadow.check(written=written, same=pages((0x20CFFC, 0x100C)))
    assert 0x212 not in written
    assert m.ram.read(0x206FFA, 0x1010) == m.ram.read(0x2FF000, 0x1010)
    assert m.ram.read(0x209FF0, 0x20) == m.ram.read(0x2FF000, 0x20)


# ----------------------------------------------------------------------------- (c) devices and the host
DMA_DESCRIPTORS = [0x280000, 0x281000, 0x282000, 0x283000, 0x284ff8, 0xFFFF0000, 0x286000]
DMA_GUEST = r"""
start:
    mov dx, 0x514
    xor eax, eax
    out dx, eax                                # high half of the descriptor address: 0
""" + "".join(f"""
    mov dx, 0x518
    mov eax, {d:#x}
    bswap eax                                  # the register takes big-endian bytes
    out dx, eax                                # the low half starts the transfer
""" for d in DMA_DESCRIPTORS) + r"""
    mov al, 0
    out 0xf4, al
    jmp .
"""


def dma_access(control, length, address, select=None):
    if select is not None:
        control |= 0x08 | (select << 16)
    return struct.pack(">IIQ", control, length, address)


def test_fw_cfg_dma_writes_are_logged():
    ram_size = 32 << 20
    text = "dirty log dma test"
    m = pc.build(ram_size=ram_size, serial=["null"], icount_shift=0, no_reboot=True,
                 fw_cfg_files=[f"opt/dirty,string={text}"])
    load(m, DMA_GUEST)
    read, skip, write = 0x02, 0x04, 0x10
    w = m.ram.write
    fw_cfg = next(d for d in m.devices if d.name.startswith("fw_cfg"))
    # the file then zeros past its end, over a page the host filled: 0x290-0x293
    w(0x292000, b"\xff" * PAGE)
    w(0x280000, dma_access(read, 0x2100, 0x290FF0, select=fw_cfg.file_select("opt/dirty")))
    # the 16 zero bytes of the UUID then zeros, onto zeros: 0x2a0 and 0x2a1 written, unchanged
    w(0x281000, dma_access(read, 0x1800, 0x2A0800, select=0x02))
    # a write to a read-only item fails: only the status goes back (error bit)
    w(0x282000, dma_access(write, 0x100, 0x2B0000, select=0x00))
    # skip: no data moves
    w(0x283000, dma_access(skip, 0x40, 0x2C0000, select=0x00))
    # a descriptor straddling a page: the status word is the only write, on its first page
    w(0x284FF8, dma_access(read, 0, 0x2D0000, select=0x00))
    # 0xffff0000 (the descriptor) is outside RAM: nothing is read or written
    # the signature then past the end of RAM: the first 4 bytes land, then the error
    w(0x286000, dma_access(read, 0x100, ram_size - 0x10, select=0x00))
    m.cpu.enter(entry("protected32", 0x100000))
    shadow = Shadow(m)
    run_to_exit(m)
    shadow.check(written={0x280, 0x281, 0x282, 0x283, 0x284, 0x286, 0x290, 0x291, 0x292, 0x293, 0x2A0, 0x2A1,
                          (ram_size >> 12) - 1},
                 same={0x293, 0x2A0, 0x2A1})
    assert m.ram.read(0x290FF0, len(text) + 1) == text.encode() + b"\0"
    assert m.ram.read(0x292000, PAGE) == bytes(PAGE)
    assert m.ram.read(ram_size - 0x10, 4) == b"QEMU"
    status = [struct.unpack(">I", m.ram.read(d, 4))[0] for d in (0x280000, 0x281000, 0x282000, 0x283000,
                                                                  0x284FF8, 0x286000)]
    assert status == [0, 0, 1, 0, 0, 1]
    m.close()


def test_host_writes_are_logged():
    m = bare_machine()
    m.ram.write(0x300000, b"\x77" * 64)
    shadow = Shadow(m)
    m.ram.write(0x200FFE, b"\x01" * (2 * PAGE + 4))       # 0x200..0x203
    m.ram.write(0x300000, b"\x77" * 64)                   # the bytes already there
    m.ram.write(0x310000, b"")                            # nothing
    with pytest.raises(GuestError):
        m.ram.write(m.ram.size - 2, b"\x01\x02\x03\x04")  # past the end: rejected whole
    shadow.check(written={0x200, 0x201, 0x202, 0x203, 0x300}, same={0x300})
    # a RAM stream loaded into the machine (as a checkpoint on the secondary) counts too
    stream = m.save_ram([0x200, 0x300, 0x400])
    m.ram.write(0x200000, b"\x02")
    shadow.check(written={0x200})
    assert m.load_ram(stream) == 3
    shadow.check(written={0x200, 0x300, 0x400}, same={0x300, 0x400})


# ----------------------------------------------------------------------------- log semantics
PHASES = r"""
start:
    jmp .
a:
    mov dword ptr [0x200000], 1
    mov dword ptr [0x201ffe], 0x22222222       # straddles 0x201/0x202
a_done:
    jmp .
b:
    mov dword ptr [0x200000], 1                # the same value again
    mov dword ptr [0x203000], 3
b_done:
    jmp .
c:
    mov ebx, 0x204000
c_loop:
    mov [ebx], ebx
    add ebx, 0x1000
    cmp ebx, 0x208000
    jb c_loop
c_done:
    jmp .
"""


def test_collect_clears_stop_stops_and_restart_sees_code_translated_while_stopped():
    m = bare_machine()
    sym = load(m, PHASES)
    m.cpu.enter(entry("protected32", 0x100000))
    with pytest.raises(EmuError):
        m.dirty_pages()  # not started
    shadow = Shadow(m)
    run_phase(m, sym, "a")
    shadow.check(written={0x200, 0x201, 0x202})
    assert m.dirty_pages().size == 0                      # collecting cleared the log
    m.run(until_ns=m.clock.now() + 100_000)               # spinning writes nothing
    assert m.dirty_pages().size == 0
    run_phase(m, sym, "b")
    shadow.check(written={0x200, 0x203}, same={0x200})

    m.stop_dirty_log()
    calls = m.cstate.dirty_writes  # the stock engine's write hook counts its calls
    run_phase(m, sym, "c")                                # translated while the log is off
    m.ram.write(0x209000, b"\x01")
    if not m.cpu.engine.patched:
        assert m.cstate.dirty_writes == calls, "the write hook still runs after stop_dirty_log()"
    with pytest.raises(EmuError):
        m.dirty_pages()

    shadow = Shadow(m)                                    # restart: earlier writes are forgotten
    assert m.dirty_pages().size == 0
    run_phase(m, sym, "c")                                # the same values again
    shadow.check(written={0x204, 0x205, 0x206, 0x207}, same={0x204, 0x205, 0x206, 0x207})
    m.stop_dirty_log()


# ----------------------------------------------------------------------------- (d) interrupt and exception delivery
DELIVERY32 = r"""
setup:
    lgdt [gdtr]
    lidt [idtr]
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov ax, 0x28
    ltr ax
    mov esp, 0x8f004
setup_done:
    jmp .
main:
    int 0x30                                   # same privilege: the 12-byte frame straddles 0x8e/0x8f
    xor ecx, ecx
    mov eax, 1
    div ecx                                    # #DE: the handler skips the div
    xor ebx, ebx
    sti
wait:
    test ebx, ebx                              # the scripted IRQ sets ebx
    jz wait
    cli
    mov esp, 0x8d000                           # the host wrote a ring-3 iret frame there
    iretd
user:
    int 0x80                                   # ring 3 -> 0: frame on ESP0 (page 0x94)
idle:
    jmp .
soft:
    iretd
divide:
    add dword ptr [esp], 2
    iretd
irq:
    mov ebx, 1
    iretd
sys80:
    mov al, 0
    out 0xf4, al
    jmp .
""" + GDT32


def test_protected_mode_delivery_frames_c_path():
    m = bare_machine()
    sym = load(m, DELIVERY32)
    tss = 0x30000
    m.ram.write(tss + 4, struct.pack("<II", 0x95000, 0x10))  # ESP0, SS0
    m.ram.write(sym["tss_desc"], tss_descriptor(tss))
    gate32(m, 0x30, sym["soft"])
    gate32(m, 0, sym["divide"])
    gate32(m, 0x40, sym["irq"])
    gate32(m, 0x80, sym["sys80"], dpl=3)
    m.ram.write(0x8D000, struct.pack("<5I", sym["user"], 0x1B, 0x2, 0x70000, 0x23))
    m.cpu.enter(entry("protected32", 0x100000))
    run_phase(m, sym, "setup")
    m.interrupt_controller = ScriptedInterrupts(m, m.clock.now() + 20_000, 0x40)
    fast = m.cstate.fast_deliveries
    shadow = Shadow(m)
    m.cpu.set_reg("rip", sym["main"])
    run_to_exit(m)
    assert m.cstate.fast_deliveries - fast == 4           # int 0x30, #DE, IRQ, int 0x80: all in C
    shadow.check(written={0x8E, 0x8F, 0x94})


def test_same_frame_pushed_twice_is_reported_twice():
    """The second delivery pushes byte for byte the frame the first one left: unchanged,
    and reported all the same (a write is a write)."""
    m = bare_machine()
    sym = load(m, DELIVERY32)
    m.ram.write(sym["tss_desc"], tss_descriptor(0x30000))
    gate32(m, 0x30, sym["soft"])
    m.cpu.enter(entry("protected32", 0x100000))
    run_phase(m, sym, "setup")
    m.cpu.set_reg("rip", sym["idle"])
    shadow = Shadow(m)
    for same in (set(), {0x8E, 0x8F}):
        m.cpu.deliver(0x30, external=True)               # frame at 0x8eff8: EFLAGS, CS, EIP=idle
        m.run(until_ns=m.clock.now() + 10_000)            # the handler returns to idle
        assert m.cpu.rip == sym["idle"]
        shadow.check(written={0x8E, 0x8F}, same=same)


DELIVERY64 = r"""
.code64
setup:
    lgdt [gdtr]
    lidt [idtr]
    mov ax, 0x18
    ltr ax
    mov rsp, 0x90004
setup_done:
    jmp .
main:
    int3                                       # IST1: the frame lands on page 0x60 (IST1 = 0x61000)
    mov rax, 0x900000
    mov rbx, [rax]                             # not mapped: #PF with an error code, frame on 0x8f/0x90
    mov al, 0
    out 0xf4, al
    jmp .
bp:
    iretq
pf:
    add rsp, 8
    add qword ptr [rsp], 3                     # skip mov rbx, [rax]
    iretq
""" + GDT64


def test_long_mode_delivery_frames_ist_and_error_code():
    m = bare_machine()
    sym = load(m, DELIVERY64, bits=64)
    cr3 = long_mode_tables(m)
    tss = 0x30000
    m.ram.write(tss + 0x24, struct.pack("<Q", 0x61000))       # IST1
    m.ram.write(sym["tss_desc"], tss_descriptor(tss, long_mode=True))
    gate64(m, 3, sym["bp"], ist=1)
    gate64(m, 14, sym["pf"])
    m.cpu.enter(entry("long64", 0x100000, cr3=cr3))
    run_phase(m, sym, "setup")
    fast = m.cstate.fast_deliveries
    shadow = Shadow(m)
    m.cpu.set_reg("rip", sym["main"])
    run_to_exit(m)
    assert m.cstate.fast_deliveries - fast == 2
    assert m.cpu.exception_counts.get(14) == 1
    # #PF frame: 6 qwords below 0x90000 (RSP aligned down to 16): 0x8ffd0..0x8ffff
    shadow.check(written={0x60, 0x8F})


REAL_MODE = r"""
setup:
    xor ax, ax
    mov ds, ax
    mov ss, ax
    mov sp, 0x7004
setup_done:
    jmp .
main:
    int 0x21                                   # FLAGS, CS, IP at 0x7002, 0x7000, 0x6ffe: pages 6/7
    xor cx, cx
    mov ax, 1
    div cx                                     # #DE through the IVT
    mov al, 0
    out 0xf4, al
    jmp .
soft:
    iret
divide:
    mov bp, sp
    add word ptr [bp], 2
    iret
"""


def test_real_mode_delivery_frames_python_path():
    m = bare_machine()
    sym = load(m, REAL_MODE, origin=0x7C00, bits=16)
    m.ram.write(0x21 * 4, struct.pack("<HH", sym["soft"], 0))
    m.ram.write(0, struct.pack("<HH", sym["divide"], 0))
    m.cpu.enter(entry("real", 0x7C00, cs=0))
    run_phase(m, sym, "setup")
    fast = m.cstate.fast_deliveries
    shadow = Shadow(m)
    m.cpu.set_reg("rip", sym["main"])
    run_to_exit(m)
    assert m.cstate.fast_deliveries == fast
    assert m.cpu.exception_counts.get(0) == 1
    shadow.check(written={0x6, 0x7})


GATE16 = r"""
setup:
    lgdt [gdtr]
    lidt [idtr]
    mov ax, 0x10
    mov ds, ax
    mov ss, ax
    mov esp, 0x8f002
setup_done:
    jmp .
main:
    int 0x31                                   # a 16-bit interrupt gate: 6-byte frame, 0x8e/0x8f
    mov al, 0
    out 0xf4, al
    jmp .
handler16:
    .byte 0x66                                 # operand-size prefix in a 32-bit segment: iretw
    iretd
""" + GDT32


def test_protected_mode_16bit_gate_frame_python_path():
    m = bare_machine()
    sym = load(m, GATE16, origin=0x8000)  # a 16-bit gate pushes and returns to a 16-bit IP
    gate32(m, 0x31, sym["handler16"], kind=0x6)
    m.cpu.enter(entry("protected32", 0x8000))
    run_phase(m, sym, "setup")
    fast = m.cstate.fast_deliveries
    shadow = Shadow(m)
    m.cpu.set_reg("rip", sym["main"])
    run_to_exit(m)
    assert m.cstate.fast_deliveries == fast
    shadow.check(written={0x8E, 0x8F})


# ----------------------------------------------------------------------------- random store programs
def random_program(rng, count):
    """Random stores (all sizes, biased towards page ends) and string fills in 32-bit mode,
    and the (address, length) ranges they write."""
    lines, ranges = ["start:"], []
    base, span = 0x200000, 0x40000
    for _ in range(count):
        page = base + rng.randrange(span // PAGE) * PAGE
        offset = rng.choice([rng.randrange(PAGE), PAGE - rng.randrange(1, 8)])
        addr = page + offset
        kind = rng.random()
        if kind < 0.7:
            size = rng.choice([1, 2, 4])
            value = rng.choice([0, rng.getrandbits(8 * size)])
            ptr = {1: "byte", 2: "word", 4: "dword"}[size]
            lines.append(f"    mov {ptr} ptr [{addr:#x}], {value:#x}")
            ranges.append((addr, size))
        elif kind < 0.8:
            lines += ["    pcmpeqd xmm0, xmm0", f"    movups [{addr:#x}], xmm0"]
            ranges.append((addr, 16))
        else:
            n = rng.randrange(0, 3 * PAGE)
            backwards = rng.random() < 0.5
            start = addr - n + 1 if backwards and n else addr
            if start < base:
                continue
            lines += ["    std" if backwards else "    cld", f"    mov edi, {addr:#x}", f"    mov ecx, {n:#x}",
                      f"    mov al, {rng.getrandbits(8):#x}", "    rep stosb"]
            ranges.append((start, n))
    lines += ["    mov al, 0", "    out 0xf4, al", "    jmp ."]
    return "\n".join(lines), ranges


def check_random_program(seed, count):
    rng = random.Random(seed)
    source, ranges = random_program(rng, count)
    m = bare_machine()
    load(m, source)
    m.cpu.enter(entry("protected32", 0x100000, cr4=0x600))
    shadow = Shadow(m)
    run_to_exit(m)
    written = pages(*ranges)
    dirty = set(m.dirty_pages().tolist())
    changed = changed_pages(shadow.before, m.ram.buf)
    assert not changed - dirty, f"seed {seed}: changed, not reported {hexs(changed - dirty)}"
    assert dirty == written, f"seed {seed}: extra {hexs(dirty - written)}, missed {hexs(written - dirty)}"


def test_random_store_programs():
    for seed in range(3):
        check_random_program(seed, 300)


@pytest.mark.soak
@pytest.mark.skipif(not os.environ.get("EMU_SOAK"), reason="soak campaign: make soak")
def test_random_store_programs_soak():
    for seed in range(100, 300):
        check_random_program(seed, 2000)

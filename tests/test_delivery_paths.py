"""Interrupt delivery is written twice: in C (``deliver_fast`` in ``emu/cpu/emuc.c``, the
common protected and long mode cases, for speed) and in Python (``X86Cpu._deliver_protected``
and ``_deliver_long``, which also handle everything unusual).  These tests drive the same
events through both on identical machine states and require identical results: every
register and segment cache (the engine's whole saved context), all of RAM and the host
dirty log, so that the two cannot drift apart.

The cases are generated (a fixed seed, so a failure names a case that can be replayed):
32-bit and 64-bit IDT gates, interrupt and trap gates, the same privilege and ring 3 -> 0
through the TSS (ESP0/SS0, RSP0), IST stacks, 16-bit stacks, external interrupts,
exceptions with and without an error code, software interrupts, gates, descriptors, TSS
slots and frames that straddle pages (mapped to physical pages far apart), every paging
mode.  A share of them is unusual on purpose (16-bit and task gates, conforming and LDT
code segments, a read-only stack, a gate the software interrupt may not use...): the C path
must decline exactly those, change nothing when it does, and both configurations then give
the same result through Python.
"""

import random
import struct
from dataclasses import dataclass, field

import pytest
from guestasm import bare_machine, entry
from unicorn import x86_const as X

from emu.cpu import context as xc
from emu.cpu.x86 import HAS_ERROR_CODE
from emu.errors import EmuError

RAM_SIZE = 2 << 20
CODE = 0x100000             # RIP of the interrupted code and the handlers
HANDLERS = 0x101000         # handler of vector v at HANDLERS + 16 * v
GDT_AREA = 0x1000           # the GDT starts in [0x1000, 0x2000)
IDT_AREA = 0x6000           # the IDT starts in [0x6000, 0x8000)
TSS_AREA = 0xB000           # the TSS starts in [0xB000, 0xC000)
LDT = 0xD000
PAGE_TABLES = 0x10000       # [0x10000, 0x20000)
STACK_VIRT = 0x80000        # 16 virtual pages of stacks ...
STACK_PHYS = 0x90000        # ... mapped, under 4 KiB paging, to these physical pages in another order
STACK_PAGES = 16

KERNEL_CS, KERNEL_DS, USER_CS, USER_DS, KERNEL_CS16, KERNEL_SS16, CONFORMING_CS, TSS_SEL = (
    0x08, 0x10, 0x1B, 0x23, 0x28, 0x30, 0x38, 0x40)
LDT_CS = 0x0C               # index 1 of the LDT

CODE_FLAGS = xc.DESC_P | xc.DESC_S | xc.DESC_CS | xc.DESC_W | xc.DESC_A | xc.DESC_G | 0xF0000
DATA_FLAGS = xc.DESC_P | xc.DESC_S | xc.DESC_W | xc.DESC_A | xc.DESC_G | 0xF0000

PAGING_32 = ("off", "4k", "pse", "pae-4k", "pae-2m")
PAGING_64 = ("4k", "2m", "1g")


@dataclass
class Case:
    """One event on one machine state; ``unusual`` says why the C path must decline it."""

    mode: str
    seed: int
    paging: str = "off"
    write_protect: bool = False
    cpl: int = 0
    vector: int = 0x40
    kind: str = "external"          # external, exception, software
    error_code: int = 0
    gate_type: int = 0xE
    gate_dpl: int = 0
    gate_present: bool = True
    gate_selector: int = KERNEL_CS
    ist: int = 0
    idt_base: int = IDT_AREA
    gdt_base: int = GDT_AREA
    tss_base: int = TSS_AREA
    tss_limit: int = 0x67
    tss_type: int = 0xB
    ss0: int | None = None          # SS0 in the 32-bit TSS (None: the kernel's stack segment)
    stack16: bool = False           # the stack the frame goes to has a 16-bit SS
    ss_base: int = 0
    rsp: int = STACK_VIRT + 0x1000
    stack0: int = STACK_VIRT + 0x8000  # ESP0/RSP0 in the TSS
    ist_stack: int = STACK_VIRT + 0xC000
    read_only_stack: bool = False
    ds_base: int = 0
    rflags: int = 0x202
    unusual: list = field(default_factory=list)

    @property
    def long_mode(self):
        return self.mode == "long64"

    @property
    def software(self):
        return self.kind == "software"

    @property
    def push_error(self):
        return self.kind == "exception" and self.vector in HAS_ERROR_CODE


def _near_page_end(rng, base, pages):
    """A stack pointer in the stack area, mostly just above a page boundary (frames straddle)."""
    page = base + 0x1000 * rng.randrange(1, pages)
    if rng.random() < 0.7:
        return page + rng.randrange(0, 56)
    return page + rng.randrange(0, 0x1000)


def generate(mode, seed):
    """A random but valid-looking case; some parts made unusual on purpose."""
    rng = random.Random(f"{mode}-{seed}")
    long_mode = mode == "long64"
    gate_size = 16 if long_mode else 8
    case = Case(mode=mode, seed=seed)
    case.paging = rng.choice(PAGING_64 if long_mode else PAGING_32)
    case.write_protect = rng.random() < 0.5
    case.cpl = rng.choice((0, 3))
    case.kind = rng.choice(("external", "exception", "software"))
    if case.kind == "exception":
        case.vector = rng.choice((0, 1, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14, 16, 17, 18, 19))
        case.error_code = rng.randrange(0, 0x10000) if case.vector in HAS_ERROR_CODE else 0
    elif case.kind == "software":
        case.vector = rng.choice((3, 4, 0x21, 0x80, rng.randrange(0x20, 0x100)))
    else:
        case.vector = rng.randrange(0x20, 0x100)
    case.gate_type = rng.choice((0xE, 0xF))
    case.gate_dpl = 3 if case.software and case.cpl == 3 and rng.random() < 0.85 else rng.choice((0, 3))
    case.ist = rng.choice((0, 0, rng.randrange(1, 8))) if long_mode else 0
    case.rflags = 0x2 | rng.choice((0, 0x200)) | rng.getrandbits(1) << 8 | rng.getrandbits(1) << 14 \
        | rng.getrandbits(1) << 16 | rng.getrandbits(1) << 18 | rng.getrandbits(1) << 10 | rng.getrandbits(2) << 12 \
        | rng.choice((0, 0x1, 0x4, 0x10, 0x40, 0x80, 0x800, 0x8D5))
    if rng.random() < 0.4:  # the gate straddles a page boundary
        case.idt_base = IDT_AREA + 0x1000 - case.vector * gate_size - rng.randrange(1, gate_size)
    else:
        case.idt_base = IDT_AREA + rng.randrange(0, 0x1000 - 256 * gate_size + 1, 8) if not long_mode else IDT_AREA
    if rng.random() < 0.3:  # the target code descriptor straddles a page boundary
        case.gdt_base = GDT_AREA + 0x1000 - (KERNEL_CS & ~7) - rng.randrange(1, 8)
    if rng.random() < 0.3:  # the TSS slot read straddles a page boundary
        case.tss_base = TSS_AREA + 0x1000 - 4 - rng.randrange(1, 8)
    case.stack16 = not long_mode and rng.random() < 0.2
    case.ss_base = rng.choice((0, 0, 0x10000)) if not long_mode else 0
    case.ds_base = rng.choice((0, 0, 0x1000)) if not long_mode else 0
    span = STACK_PAGES // 2
    case.rsp = _near_page_end(rng, STACK_VIRT, span) - case.ss_base
    case.stack0 = _near_page_end(rng, STACK_VIRT + span * 0x1000, span // 2)
    case.ist_stack = _near_page_end(rng, STACK_VIRT + (span + span // 2) * 0x1000, span // 2)
    if case.stack16:
        case.ss_base = STACK_VIRT
        case.rsp = rng.choice((rng.randrange(0, 0x20), rng.randrange(0x1000, 0x1040), rng.randrange(0, 0x8000)))
        case.stack0 = rng.choice((rng.randrange(0, 0x20), rng.randrange(0x1000, 0x1040)))
    if not long_mode and rng.random() < 0.2:
        case.rsp |= rng.getrandbits(32) << 32  # bits a 64-bit past may leave above a 32-bit ESP
    _make_unusual(rng, case)
    return case


def _not_present(case):
    case.gate_present = False
    return True


def _conforming(case):
    case.gate_selector = CONFORMING_CS
    return True


def _ldt(case):
    case.gate_selector = LDT_CS
    return True


def _read_only_stack(case):
    case.read_only_stack = case.paging in ("4k", "pae-4k") and case.write_protect
    return case.read_only_stack


def _user_code(case):
    case.gate_selector = USER_CS  # DPL 3 > CPL 0: #GP; from ring 3 a plain same-privilege entry
    return case.cpl == 0


def _gate_16(case):
    case.gate_type &= 7
    return True


def _task_gate(case):
    case.gate_type = 5
    return True


def _tss_16(case):
    case.tss_type = 3  # matters only on a privilege change
    return case.cpl == 3


def _user_ss0(case):
    case.ss0 = USER_DS | 3  # a ring-3 stack segment for ring 0: #TS(SS0)
    return case.cpl == 3


def _code_ss0(case):
    case.ss0 = KERNEL_CS  # not a writable data segment: #TS(SS0)
    return case.cpl == 3


def _bad_gate_type(case):
    case.gate_type = 0xC
    return True


#: what may make a case unusual: name -> change(case), True when the change makes it so
UNUSUAL = {"not present": _not_present, "conforming": _conforming, "ldt": _ldt, "read-only stack": _read_only_stack,
           "user code": _user_code}
UNUSUAL_32 = {"16-bit gate": _gate_16, "task gate": _task_gate, "16-bit TSS": _tss_16, "ring-3 SS0": _user_ss0,
              "code segment as SS0": _code_ss0}
UNUSUAL_64 = {"bad gate type": _bad_gate_type}


def _make_unusual(rng, case):
    """With some probability, one thing the C path does not handle (Python does, or faults)."""
    if case.software and case.gate_dpl < case.cpl:
        case.unusual.append("software interrupt through a gate of lower DPL (#GP)")
    if rng.random() > 0.25:
        return
    choices = {**UNUSUAL, **(UNUSUAL_64 if case.long_mode else UNUSUAL_32)}
    what = rng.choice(list(choices))
    if choices[what](case):
        case.unusual.append(what)


# ----------------------------------------------------------------------------- the machine state
def _descriptor(base, limit, flags):
    limit_field = limit >> 12 if flags & xc.DESC_G else limit
    low = ((base & 0xFFFF) << 16) | (limit_field & 0xFFFF)
    high = ((base >> 16) & 0xFF) | (base & 0xFF000000) | (limit_field & 0xF0000) | (flags & 0x00F0FF00)
    return struct.pack("<II", low, high)


def _code_flags(case, dpl, conforming=False):
    flags = CODE_FLAGS | (dpl << xc.DESC_DPL_SHIFT) | (xc.DESC_C if conforming else 0)
    return flags | (xc.DESC_L if case.long_mode else xc.DESC_B)


def _write_gdt(m, case):
    data32 = DATA_FLAGS | xc.DESC_B
    entries = {
        KERNEL_CS: (0, 0xFFFFF, _code_flags(case, 0)),
        KERNEL_DS: (0, 0xFFFFF, data32),
        USER_CS: (0, 0xFFFFF, _code_flags(case, 3)),
        USER_DS: (0, 0xFFFFF, data32 | 3 << xc.DESC_DPL_SHIFT),
        KERNEL_CS16: (0, 0xFFFF, CODE_FLAGS & ~xc.DESC_G),
        KERNEL_SS16: (STACK_VIRT, 0xFFFF, DATA_FLAGS & ~xc.DESC_G),
        CONFORMING_CS: (0, 0xFFFFF, _code_flags(case, 0, conforming=True)),
    }
    for selector, (base, limit, flags) in entries.items():
        m.ram.write(case.gdt_base + (selector & ~7), _descriptor(base, limit, flags))
    m.ram.write(LDT + 8, _descriptor(0, 0xFFFFF, _code_flags(case, 0)))


def _write_idt(m, case):
    gate_size = 16 if case.long_mode else 8
    for vector in range(256):
        gate_type, dpl, present, selector, ist = 0xE, 0, True, KERNEL_CS, 0
        if vector == case.vector:
            gate_type, dpl, present = case.gate_type, case.gate_dpl, case.gate_present
            selector, ist = case.gate_selector, case.ist
        offset = HANDLERS + 16 * vector
        access = (0x80 if present else 0) | dpl << 5 | gate_type
        gate = struct.pack("<HHBBH", offset & 0xFFFF, selector, ist, access, (offset >> 16) & 0xFFFF)
        if case.long_mode:
            gate += struct.pack("<II", offset >> 32, 0)
        m.ram.write(case.idt_base + vector * gate_size, gate)


def _write_tss(m, case):
    if case.long_mode:
        m.ram.write(case.tss_base + 4, struct.pack("<Q", case.stack0))
        for i in range(7):
            m.ram.write(case.tss_base + 0x24 + 8 * i, struct.pack("<Q", case.ist_stack - 0x100 * i))
    else:
        ss0 = case.ss0 if case.ss0 is not None else KERNEL_SS16 if case.stack16 else KERNEL_DS
        m.ram.write(case.tss_base + 4, struct.pack("<II", case.stack0, ss0))


def _stack_page(virtual_page):
    """Under 4 KiB paging the stack pages are mapped backwards: neighbours are far apart."""
    index = virtual_page - (STACK_VIRT >> 12)
    if 0 <= index < STACK_PAGES:
        return (STACK_PHYS >> 12) + STACK_PAGES - 1 - index
    return virtual_page


def _pte(case, virtual_page, present_bits=3):
    bits = present_bits
    if case.read_only_stack and 0 <= virtual_page - (STACK_VIRT >> 12) < STACK_PAGES:
        bits &= ~2
    return (_stack_page(virtual_page) << 12) | bits


def _write_page_tables(m, case):
    """Identity paging of RAM (stack pages permuted under 4 KiB pages); returns CR3."""
    pages = RAM_SIZE >> 12
    t = PAGE_TABLES
    if case.paging == "4k":
        if case.long_mode:
            m.ram.write(t, struct.pack("<Q", (t + 0x1000) | 3))
            m.ram.write(t + 0x1000, struct.pack("<Q", (t + 0x2000) | 3))
            m.ram.write(t + 0x2000, struct.pack("<Q", (t + 0x3000) | 3))
            m.ram.write(t + 0x3000, b"".join(struct.pack("<Q", _pte(case, p)) for p in range(512)))
            return t
        m.ram.write(t, struct.pack("<I", (t + 0x1000) | 3))
        m.ram.write(t + 0x1000, b"".join(struct.pack("<I", _pte(case, p)) for p in range(pages)))
        return t
    if case.paging == "pse":
        m.ram.write(t, struct.pack("<I", 0x83))
        return t
    if case.paging in ("pae-4k", "pae-2m"):
        m.ram.write(t, struct.pack("<Q", (t + 0x1000) | 1))
        if case.paging == "pae-2m":
            m.ram.write(t + 0x1000, struct.pack("<Q", 0x83))
        else:
            m.ram.write(t + 0x1000, struct.pack("<Q", (t + 0x2000) | 3))
            m.ram.write(t + 0x2000, b"".join(struct.pack("<Q", _pte(case, p)) for p in range(512)))
        return t
    if case.paging == "2m":
        m.ram.write(t, struct.pack("<Q", (t + 0x1000) | 3))
        m.ram.write(t + 0x1000, struct.pack("<Q", (t + 0x2000) | 3))
        m.ram.write(t + 0x2000, struct.pack("<Q", 0x83))
        return t
    if case.paging == "1g":
        m.ram.write(t, struct.pack("<Q", (t + 0x1000) | 3))
        m.ram.write(t + 0x1000, struct.pack("<Q", 0x83))
        return t
    return 0


def prepare(m, case):
    """Put machine ``m`` in the state ``case`` describes."""
    m.ram.view[:] = bytes(RAM_SIZE)
    _write_gdt(m, case)
    _write_idt(m, case)
    _write_tss(m, case)
    cr3 = _write_page_tables(m, case)
    m.ram.write(CODE, b"\xcd" + bytes([case.vector]) if case.vector != 3 else b"\xcc")
    cpu, uc = m.cpu, m.cpu.uc
    cpu.enter(entry(case.mode, CODE, cs=KERNEL_CS, cr3=cr3))
    if not case.long_mode:
        cr4 = {"pse": 1 << 4, "pae-4k": 1 << 5, "pae-2m": 1 << 5}.get(case.paging, 0)
        uc.reg_write(X.UC_X86_REG_CR4, cr4)
        uc.reg_write(X.UC_X86_REG_CR3, cr3)
        cr0 = 0x11 | (0x80000000 if case.paging != "off" else 0)
    else:
        cr0 = 0x80000011
    uc.reg_write(X.UC_X86_REG_CR0, cr0 | (1 << 16 if case.write_protect else 0))
    uc.reg_write(X.UC_X86_REG_GDTR, (0, case.gdt_base, 0x47, 0))
    uc.reg_write(X.UC_X86_REG_IDTR, (0, case.idt_base, 256 * (16 if case.long_mode else 8) - 1, 0))
    ctx = cpu.ctx.save()
    if case.cpl == 3:
        ctx.load_segment("cs", USER_CS, 0, 0xFFFFFFFF, _code_flags(case, 3))
        ss = (USER_DS, case.ss_base, 0xFFFFFFFF, DATA_FLAGS | xc.DESC_B | 3 << xc.DESC_DPL_SHIFT)
    else:
        ctx.load_segment("cs", KERNEL_CS, 0, 0xFFFFFFFF, _code_flags(case, 0))
        ss = (KERNEL_DS, case.ss_base, 0xFFFFFFFF, DATA_FLAGS | xc.DESC_B)
        if case.stack16:
            ss = (KERNEL_SS16, STACK_VIRT, 0xFFFF, DATA_FLAGS & ~xc.DESC_G)
    ctx.load_segment("ss", *ss)
    data = (USER_DS if case.cpl == 3 else KERNEL_DS, case.ds_base, 0xFFFFFFFF, DATA_FLAGS | xc.DESC_B)
    ctx.load_segment("ds", *data)
    ctx.load_segment("es", *data)
    ctx.load_system_segment("tr", TSS_SEL, case.tss_base, case.tss_limit, xc.DESC_P | case.tss_type << 8)
    ctx.load_system_segment("ldt", 0x48, LDT, 0x0F, xc.DESC_P | 2 << 8)
    ctx.restore()
    uc.reg_write(X.UC_X86_REG_RSP, case.rsp)
    uc.reg_write(X.UC_X86_REG_EFLAGS, case.rflags)
    uc.reg_write(X.UC_X86_REG_RIP, next_ip(case) if case.software else CODE)  # int n: RIP is past it
    m.ram.clear_host_dirty()
    cpu._invalidate_context()


def next_ip(case):
    """Where a software interrupt returns to: past ``int n`` (CD ib) or ``int3`` (CC)."""
    return CODE + (1 if case.vector == 3 else 2)


def machine_state(m):
    """Everything delivery may change: the engine's context, RAM, the host dirty log."""
    m.cpu._invalidate_context()
    return m.cpu.ctx.save().raw(), bytes(m.ram.view), m.ram.host_dirty.tobytes()


def named_differences(a, b):
    """The registers and caches that differ, for a readable failure message."""
    out = []
    for name, (off, size) in {"rip": (xc.OFFSETS["eip"], 8), "eflags": (xc.OFFSETS["eflags"], 8),
                              "hflags": (xc.OFFSETS["hflags"], 4), "rsp": (xc.OFFSETS["regs"] + 32, 8),
                              "cs": (xc.OFFSETS["segs"] + 24, 24), "ss": (xc.OFFSETS["segs"] + 48, 24),
                              "cr2": (xc.OFFSETS["cr"] + 16, 8),
                              "old_exception": (xc.OFFSETS["old_exception"], 4)}.items():
        if a[off:off + size] != b[off:off + size]:
            out.append(f"{name}: {a[off:off + size].hex()} != {b[off:off + size].hex()}")
    first = next((i for i in range(len(a)) if a[i] != b[i]), None)
    if first is not None and not out:
        out.append(f"context byte {first}")
    return out


def deliver(m, case, fast):
    """Deliver the case's event with the C path allowed or not: (outcome, state, used C)."""
    cpu = m.cpu
    prepare(m, case)
    cpu.fast_delivery = fast
    before = m.cstate.fast_deliveries
    try:
        cpu.deliver(case.vector, external=case.kind == "external", software=case.software,
                    error_code=case.error_code if case.push_error else None,
                    next_ip=next_ip(case) if case.software else None)
        outcome = None
    except EmuError as e:
        outcome = f"{type(e).__name__}: {e}"
    finally:
        cpu.fast_delivery = True
    return outcome, machine_state(m), m.cstate.fast_deliveries > before


@pytest.fixture(scope="module")
def machine():
    m = bare_machine(ram=RAM_SIZE)
    yield m
    m.close()


CASES = 400


@pytest.mark.parametrize("mode", ["protected32", "long64"])
def test_c_and_python_delivery_agree(machine, mode):
    used_c = 0
    for seed in range(CASES):
        case = generate(mode, seed)
        python_outcome, python_state, python_used_c = deliver(machine, case, fast=False)
        c_outcome, c_state, c_used_c = deliver(machine, case, fast=True)
        assert not python_used_c
        assert c_outcome == python_outcome, case
        differences = named_differences(c_state[0], python_state[0])
        assert c_state[0] == python_state[0], (case, differences)
        assert c_state[1] == python_state[1], (case, "RAM differs")
        assert c_state[2] == python_state[2], (case, "host dirty log differs")
        used_c += c_used_c
    assert used_c > CASES // 2  # most cases are common ones, which the C path takes


@pytest.mark.parametrize("mode", ["protected32", "long64"])
def test_c_path_takes_the_common_cases_and_leaves_the_rest_untouched(machine, mode):
    for seed in range(CASES):
        case = generate(mode, seed)
        prepare(machine, case)
        before = machine_state(machine)
        cpu = machine.cpu
        result = machine.clib.deliver_fast(cpu.cstate, cpu._uc_handle, case.vector, int(case.software),
                                           next_ip(case) if case.software else CODE,
                                           int(case.push_error), case.error_code)
        assert (result == 0) == (not case.unusual), case
        if result != 0:
            assert machine_state(machine) == before, case

"""Direct access to Unicorn's saved CPU context, for the state its register API cannot set.

Unicorn 2.1.4 saves a ``uc_context``: a 40-byte header followed by a raw copy of QEMU's
``CPUX86State`` up to ``end_reset_fields``.  In a ``UC_MODE_64`` engine, writing a segment
register through the API changes only the selector, never the hidden base/limit/flags, and
CPL lives in ``hflags``; interrupt delivery and mode switches therefore patch these bytes.
Every offset is checked at import against values written through the public API, so a
different Unicorn build fails loudly here instead of corrupting guests.
"""

import ctypes
import struct

from unicorn import UC_MODE_64
from unicorn.x86_const import (UC_X86_REG_CR3, UC_X86_REG_CR4, UC_X86_REG_DR0, UC_X86_REG_DR1, UC_X86_REG_GDTR,
                               UC_X86_REG_RAX, UC_X86_REG_RIP)

from emu.cpu.engine import new_engine

HEADER = 40
OFFSETS = {
    "regs": HEADER + 0, "eip": HEADER + 128, "eflags": HEADER + 136, "cc_op": HEADER + 168,
    "hflags": HEADER + 176, "hflags2": HEADER + 180, "segs": HEADER + 184, "ldt": HEADER + 328,
    "tr": HEADER + 352, "gdt": HEADER + 376, "idt": HEADER + 400, "cr": HEADER + 424,
    "a20_mask": HEADER + 496,  # int32 right after cr[9]
}
SEGMENT_INDEX = {"es": 0, "cs": 1, "ss": 2, "ds": 3, "fs": 4, "gs": 5}
SEGMENT_SIZE = 24  # selector u32, pad, base u64, limit u32, flags u32

# hflags bits (QEMU target/i386/cpu.h)
HF_CPL_MASK = 3
HF_INHIBIT_IRQ = 1 << 3
HF_CS32 = 1 << 4
HF_SS32 = 1 << 5
HF_ADDSEG = 1 << 6
HF_LMA = 1 << 14
HF_CS64 = 1 << 15

# descriptor flag bits, as QEMU keeps them in SegmentCache.flags (the descriptor's high dword)
DESC_A = 1 << 8
DESC_W = 1 << 9   # data: writable; code: readable
DESC_C = 1 << 10  # code: conforming
DESC_CS = 1 << 11
DESC_S = 1 << 12
DESC_DPL_SHIFT = 13
DESC_P = 1 << 15
DESC_L = 1 << 21
DESC_B = 1 << 22
DESC_G = 1 << 23
EFLAGS_VM = 1 << 17


def _find_late_offsets():
    """Locate the exception bookkeeping fields relative to the debug registers."""
    uc = new_engine(UC_MODE_64)
    uc.reg_write(UC_X86_REG_RAX, 0x1111222233334444)
    uc.reg_write(UC_X86_REG_RIP, 0x5555666677778888)
    uc.reg_write(UC_X86_REG_GDTR, (0, 0xABCDEF012345, 0x77, 0))
    uc.reg_write(UC_X86_REG_CR3, 0x123000)
    raw = bytes(uc.context_save())
    checks = [
        (struct.unpack_from("<Q", raw, OFFSETS["regs"])[0], 0x1111222233334444),
        (struct.unpack_from("<Q", raw, OFFSETS["eip"])[0], 0x5555666677778888),
        (struct.unpack_from("<QI", raw, OFFSETS["gdt"] + 8), (0xABCDEF012345, 0x77)),
        (struct.unpack_from("<Q", raw, OFFSETS["cr"] + 24)[0], 0x123000),
    ]
    checks.append((struct.unpack_from("<i", raw, OFFSETS["a20_mask"])[0], -1))  # A20 enabled at reset
    for got, want in checks:
        if got != want:
            raise ImportError("cpu context: Unicorn's context layout is not the one of unicorn 2.1.4")
    uc.reg_write(UC_X86_REG_DR0, 0x13572468)
    uc.reg_write(UC_X86_REG_DR1, 0x24681357)
    raw = bytes(uc.context_save())
    dr = raw.find(struct.pack("<QQ", 0x13572468, 0x24681357))
    if dr < 0:
        raise ImportError("cpu context: debug registers not found in the context")
    OFFSETS.update(dr=dr, error_code=dr - 16, exception_is_int=dr - 12, exception_next_eip=dr - 8,
                   old_exception=dr + 64 + 32)


def _find_written_field(name, code, fmt, new):
    """Locate a field that has no register id in Unicorn's API as the one place of the
    context, past the general registers, that ``code`` (run in a fresh 64-bit engine with
    CR4.PKE set) changes to ``new``."""
    uc = new_engine(UC_MODE_64)  # Unicorn starts it with CR4.OSXSAVE set
    uc.reg_write(UC_X86_REG_CR4, uc.reg_read(UC_X86_REG_CR4) | 1 << 22)
    uc.mem_map(0, 0x1000)
    uc.mem_write(0, code)
    before = bytes(uc.context_save())
    uc.emu_start(0, len(code))
    after = bytes(uc.context_save())
    size = struct.calcsize(fmt)
    found = [off for off in range(OFFSETS["eflags"], len(before) - size + 1, size)
             if struct.unpack_from(fmt, before, off)[0] != new and struct.unpack_from(fmt, after, off)[0] == new]
    if len(found) != 1:
        raise ImportError(f"cpu context: {name} not found in the context (candidates {found})")
    OFFSETS[name] = found[0]


_find_late_offsets()
# mov eax, 1; xor ecx, ecx; xor edx, edx; xsetbv
_find_written_field("xcr0", bytes.fromhex("b801000000" "31c9" "31d2" "0f01d1"), "<Q", 1)
# mov eax, 0x12345674; xor ecx, ecx; xor edx, edx; wrpkru
_find_written_field("pkru", bytes.fromhex("b874563412" "31c9" "31d2" "0f01ef"), "<I", 0x12345674)


class ContextView:
    """A reusable saved context of one engine, readable and patchable in place.

    ``save()`` copies the engine's state in, the accessors read or patch the bytes, and
    ``restore()`` writes them back.  One context object is allocated for the engine's life.
    """

    def __init__(self, uc):
        self.uc = uc
        self.ctx = uc.context_save()
        raw = self.ctx.context
        self.address = raw if isinstance(raw, int) else raw.value
        self.size = len(bytes(self.ctx))

    def save(self):
        self.uc.context_update(self.ctx)
        return self

    def restore(self):
        self.uc.context_restore(self.ctx)

    def raw(self):
        return ctypes.string_at(self.address, self.size)

    def load_raw(self, data):
        if len(data) != self.size:
            raise ValueError(f"context of {len(data)} bytes, engine uses {self.size}")
        ctypes.memmove(self.address, data, self.size)

    # scalar fields
    def i32(self, field):
        return ctypes.c_int32.from_address(self.address + OFFSETS[field]).value

    def set_i32(self, field, value):
        ctypes.c_int32.from_address(self.address + OFFSETS[field]).value = value

    def u32(self, field):
        return ctypes.c_uint32.from_address(self.address + OFFSETS[field]).value

    def set_u32(self, field, value):
        ctypes.c_uint32.from_address(self.address + OFFSETS[field]).value = value & 0xFFFFFFFF

    def u64(self, field, index=0):
        return ctypes.c_uint64.from_address(self.address + OFFSETS[field] + 8 * index).value

    def set_u64(self, field, value, index=0):
        ctypes.c_uint64.from_address(self.address + OFFSETS[field] + 8 * index).value = value & (2**64 - 1)

    @property
    def hflags(self):
        return self.u32("hflags")

    @property
    def cpl(self):
        return self.hflags & HF_CPL_MASK

    def segment(self, name):
        """(selector, base, limit, flags) of a segment register's cache."""
        off = self.address + OFFSETS["segs"] + SEGMENT_SIZE * SEGMENT_INDEX[name]
        return struct.unpack("<I4xQII", ctypes.string_at(off, SEGMENT_SIZE))

    def system_segment(self, name):
        """(selector, base, limit, flags) of LDTR or TR."""
        return struct.unpack("<I4xQII", ctypes.string_at(self.address + OFFSETS[name], SEGMENT_SIZE))

    def load_segment(self, name, selector, base, limit, flags):
        """Load a segment cache and recompute hflags, like QEMU's cpu_x86_load_seg_cache()."""
        off = self.address + OFFSETS["segs"] + SEGMENT_SIZE * SEGMENT_INDEX[name]
        ctypes.memmove(off, struct.pack("<I4xQII", selector, base, limit, flags), SEGMENT_SIZE)
        hf = self.hflags
        cr0 = self.u64("cr")
        eflags = self.u64("eflags")
        if name == "cs":
            if (hf & HF_LMA) and (flags & DESC_L):
                hf = (hf | HF_CS32 | HF_SS32 | HF_CS64) & ~HF_ADDSEG
            else:
                hf = (hf & ~(HF_CS32 | HF_CS64)) | ((flags & DESC_B) >> (22 - 4))
        if name == "ss":
            hf = (hf & ~HF_CPL_MASK) | ((flags >> DESC_DPL_SHIFT) & 3)
        ss_flags = self.segment("ss")[3]
        derived = (ss_flags & DESC_B) >> (22 - 5)
        if hf & HF_CS64:
            pass
        elif not (cr0 & 1) or (eflags & EFLAGS_VM) or not (hf & HF_CS32):
            derived |= HF_ADDSEG
        else:
            derived |= int((self.segment("ds")[1] | self.segment("es")[1] | self.segment("ss")[1]) != 0) << 6
        self.set_u32("hflags", (hf & ~(HF_SS32 | HF_ADDSEG)) | derived)

    def load_system_segment(self, name, selector, base, limit, flags):
        """Set the LDTR or TR cache (no hflags depend on them)."""
        ctypes.memmove(self.address + OFFSETS[name], struct.pack("<I4xQII", selector, base, limit, flags),
                       SEGMENT_SIZE)


def descriptor_parts(low, high):
    """(base, limit, flags) of an 8-byte segment descriptor, flags as QEMU's SegmentCache."""
    base = (low >> 16) | ((high & 0xFF) << 16) | (high & 0xFF000000)
    limit = (low & 0xFFFF) | (high & 0x000F0000)
    if high & DESC_G:
        limit = (limit << 12) | 0xFFF
    return base, limit, high

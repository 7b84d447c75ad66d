"""Our libunicorn build (engine/): stores run on the fast path, yet translated code never goes
stale, whoever writes it; and the engine's own controls behave as documented.

Guest stores to pages without translated code no longer reach the engine's slow path, so
every way code can change is tested with a guest that would print a stale result: a store
into the running block, a store through another virtual alias of the code's page, and host
writes (a loader, a state load) over code the guest has already run.
"""

import struct

import numpy as np
import pytest
from unicorn import UC_ARCH_X86, UC_HOOK_INSN, UC_HOOK_INTR, UC_MODE_64, Uc
from unicorn.x86_const import (UC_X86_INS_CPUID, UC_X86_INS_OUT, UC_X86_INS_SYSCALL, UC_X86_REG_MSR, UC_X86_REG_RAX,
                               UC_X86_REG_RDX)
from conftest import requires_patched_engine
from guestasm import assemble, bare_machine, entry

from emu.cpu.engine import new_engine
from test_dirty_log import GDT64, gate64, long_mode_tables, run_phase

pytestmark = requires_patched_engine

RUN_NS = 1_000_000_000
GP = 13


def run_to_exit(machine):
    status = machine.run(until_ns=RUN_NS)
    assert status is not None, f"the guest did not exit (rip={machine.cpu.rip:#x})"
    return status


SAME_BLOCK = r"""
start:
    mov ecx, 3
again:
    mov byte ptr [patch + 1], cl   # rewrites the immediate of the next instruction
patch:
    mov al, 0                      # in the block that is running
    out 0xe9, al
    dec ecx
    jnz again
    mov al, 0
    out 0xf4, al
"""


def test_store_into_the_running_block():
    m = bare_machine()
    code, _ = assemble(SAME_BLOCK, 0x100000)
    m.ram.write(0x100000, code)
    m.cpu.enter(entry("protected32", 0x100000))
    assert run_to_exit(m) == 1
    assert bytes(m.console.output) == b"\x03\x02\x01"


ALIAS = r"""
.code64
start:
    lgdt [gdtr]
    mov rsp, 0x90000
    mov rbx, 1
loop:
    call 0x700000                 # the function, through its first mapping
    out 0xe9, al
    inc rbx
    mov byte ptr [0x701001], bl   # its immediate, through the second mapping
    cmp rbx, 4
    jne loop
    mov al, 0
    out 0xf4, al
""" + GDT64


def test_store_through_another_virtual_alias_of_translated_code():
    m = bare_machine()
    code, _ = assemble(ALIAS, 0x100000, bits=64)
    m.ram.write(0x100000, code)
    m.ram.write(0x300000, b"\xb0\x01\xc3")  # mov al, 1; ret
    # virtual pages 0x700 and 0x701 both map physical page 0x300
    cr3 = long_mode_tables(m, aliases={0x700: 0x300000, 0x701: 0x300000})
    m.cpu.enter(entry("long64", 0x100000, cr3=cr3))
    assert run_to_exit(m) == 1
    assert bytes(m.console.output) == b"\x01\x02\x03"


HOST_WRITE = r"""
.code64
run:
    call 0x300000
    out 0xe9, al
run_done:
    jmp run_done
""" + GDT64


@pytest.mark.parametrize("how", ["loader", "state load"])
def test_host_write_over_code_the_guest_has_run(how):
    m = bare_machine()
    code, sym = assemble(HOST_WRITE, 0x100000, bits=64)
    m.ram.write(0x100000, code)
    m.ram.write(0x300000, b"\xb0\x11\xc3")  # mov al, 0x11; ret
    cr3 = long_mode_tables(m)
    m.cpu.enter(entry("long64", 0x100000, cr3=cr3, rsp=0x90000))
    run_phase(m, sym, "run")
    new_code = b"\xb0\x22\xc3"  # mov al, 0x22; ret
    if how == "loader":
        m.ram.write(0x300000, new_code)
    else:
        page = m.ram.buf[0x300000:0x301000].copy()
        page[:3] = np.frombuffer(new_code, dtype=np.uint8)
        donor = bare_machine()
        donor.ram.buf[0x300000:0x301000] = page
        m.load_ram(donor.save_ram(np.array([0x300])))
    run_phase(m, sym, "run")
    assert bytes(m.console.output) == b"\x11\x22"


PAGE_FAULT_LOOP = r"""
.code64
start:
    lgdt [gdtr]
    lidt [idtr]
    mov rsp, 0x90000
spin:
    jmp spin
pf:
    mov rax, cr2
    mov [0x80000], rax
    mov al, 0
    out 0xf4, al
""" + GDT64


def test_slices_leave_no_phantom_page_fault():
    """Unicorn 2.1.4 translated its exit address through the guest's page tables after every
    slice; where that is unmapped it left CR2 and a pending fault behind, which made the
    guest's next real page fault a double fault."""
    m = bare_machine(icount=False)
    code, sym = assemble(PAGE_FAULT_LOOP, 0x100000, bits=64)
    m.ram.write(0x100000, code)
    cr3 = long_mode_tables(m)
    gate64(m, 14, sym["pf"])
    m.cpu.enter(entry("long64", 0x100000, cr3=cr3))
    for _ in range(20):  # many slices, each returning through the unmapped exit address
        m.run(until_ns=m.clock.now() + 200_000)
    assert m.cpu.reg("cr2") == 0
    # now a real fault: delivered as #PF (not #DF), with the faulting address in CR2
    m.ram.write(0x200000, b"\x48\xa1" + struct.pack("<Q", 0x7FFF_0000_0000))  # mov rax, [unmapped]
    m.cpu.set_reg("rip", 0x200000)
    assert run_to_exit(m) == 1
    assert m.cpu.exception_counts == {14: 1}
    assert struct.unpack("<Q", m.ram.read(0x80000, 8))[0] == 0x7FFF_0000_0000


def test_engine_controls_reject_bad_arguments():
    m = bare_machine()
    bitmap = np.zeros(4, dtype=np.uint64)
    with pytest.raises(RuntimeError, match="DIRTY_LOG_SYNC"):  # the log is not running
        m.cpu.engine.dirty_log_sync(0, 1 << 20, bitmap.ctypes.data)
    m.cpu.engine.dirty_log(True)
    with pytest.raises(RuntimeError, match="DIRTY_LOG_SYNC"):  # not page aligned
        m.cpu.engine.dirty_log_sync(0x10, 1 << 20, bitmap.ctypes.data)
    with pytest.raises(RuntimeError, match="DIRTY_LOG_SYNC"):  # beyond RAM
        m.cpu.engine.dirty_log_sync(m.ram.size - 4096, 8192, bitmap.ctypes.data)


def test_a_stop_requested_earlier_in_the_block_skips_no_instruction_hook():
    """A stop request that is already pending (here from the OUT hook at the start of the
    same block; in the emulator, the deadline timer thread) must not keep the hooks of later
    instructions in that block from running.  Unicorn 2.1.4 broke off its walk of the
    instruction hooks at the first hook of another instruction: CPUID then gave the engine's
    own answer and SYSCALL was stepped over unseen (a guest's write() returned its own
    system call number, and pipes lost bytes)."""
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, 0x1000)
    uc.mem_write(0, b"\xe6\x80" b"\x0f\xa2" b"\x0f\x05" b"\xf4")  # out 0x80, al; cpuid; syscall; hlt
    seen = []

    def on_out(uc, port, size, value, user):
        seen.append("out")
        uc.emu_stop()

    def on_cpuid(uc, user):
        seen.append("cpuid")
        uc.reg_write(UC_X86_REG_RAX, 0x1234)
        return 1  # the hook's answer, not the engine's

    def on_syscall(uc, user):
        seen.append("syscall")

    uc.hook_add(UC_HOOK_INSN, on_out, None, 1, 0, UC_X86_INS_OUT)  # first in the engine's hook list
    uc.hook_add(UC_HOOK_INSN, on_cpuid, None, 1, 0, UC_X86_INS_CPUID)
    uc.hook_add(UC_HOOK_INSN, on_syscall, None, 1, 0, UC_X86_INS_SYSCALL)
    uc.emu_start(0, 0x1000)
    assert seen == ["out", "cpuid", "syscall"]
    assert uc.reg_read(UC_X86_REG_RAX) == 0x1234


SYSCALL_ENTRY = r"""
.code64
start:
    lgdt [gdtr]
    mov rsp, 0x90000
    mov ecx, 0xC0000080            # EFER.SCE
    rdmsr
    or eax, 1
    wrmsr
    mov ecx, 0xC0000081            # STAR: SYSCALL CS 0x08 (SS 0x10)
    xor eax, eax
    mov edx, 0x00180008
    wrmsr
    mov ecx, 0xC0000082            # LSTAR
    lea rax, [rip + kernel]
    mov rdx, rax
    shr rdx, 32
    wrmsr
    mov ecx, 0xC0000084            # SFMASK: clear IF, keep the rest
    mov eax, 0x200
    xor edx, edx
    wrmsr
    mov rbx, 0
again:
    sti
    syscall                        # the engine enters "kernel" itself, no exit to the host
back:
    inc rbx
    cmp rbx, 1000
    jne again
    mov al, 0
    out 0xf4, al
kernel:
    mov [0x80000], rcx             # return address
    mov [0x80008], r11             # the flags SYSCALL saved
    pushfq
    pop qword ptr [0x80010]        # the flags in the kernel
    jmp rcx
""" + GDT64


def test_syscall_enters_the_kernel_inside_the_engine():
    """With UC_CTL_X86_NATIVE_SYSCALL the engine does SYSCALL as the CPU does: RCX and R11
    keep the return point and the flags, SFMASK clears IF, RIP comes from LSTAR, and the
    machine never stops for it (1000 system calls in one slice)."""
    m = bare_machine(icount=False)
    code, sym = assemble(SYSCALL_ENTRY, 0x100000, bits=64)
    m.ram.write(0x100000, code)
    cr3 = long_mode_tables(m)
    m.cpu.enter(entry("long64", 0x100000, cr3=cr3))
    slices = m.stats["slices"]
    assert run_to_exit(m) == 1
    rcx, r11, kernel_flags = struct.unpack("<QQQ", m.ram.read(0x80000, 24))
    assert rcx == sym["back"]
    assert r11 & 0x200 and not kernel_flags & 0x200  # IF was set before, SFMASK cleared it
    assert m.stats["slices"] - slices < 1000  # not a stop per system call



def _fault_of(code, uc=None):
    """The vector a bare 64-bit engine of our CPU model (no emulator around it) raises on
    code, or None when the code runs through."""
    uc = uc or new_engine(UC_MODE_64)
    uc.mem_map(0, 0x1000)
    uc.mem_write(0, code)
    faults = []

    def on_interrupt(uc, intno, user):
        faults.append(intno)
        uc.emu_stop()

    uc.hook_add(UC_HOOK_INTR, on_interrupt)
    uc.emu_start(0, len(code))
    return faults[0] if faults else None


def _set_cr4_bit(bit):
    """mov rax, cr4; mov rcx, 1 << bit; or rax, rcx; mov cr4, rax"""
    return bytes.fromhex("0f20e0" "48b9") + struct.pack("<Q", 1 << bit) + bytes.fromhex("4809c8" "0f22e0")


@pytest.mark.parametrize("bit, vector", [(12, GP), (15, GP), (24, GP), (32, GP), (21, None), (22, None), (7, None)],
                         ids=["la57-not-offered", "reserved15", "reserved24", "bit32", "smap", "pke", "pge"])
def test_mov_to_cr4_raises_gp_for_bits_the_cpu_does_not_offer(bit, vector):
    """Patch 0012: #GP(0) for a CR4 bit reserved by the SDM or of a feature not offered (LA57
    on our Skylake-Server model), bits 63:32 included; offered bits (SMAP, PKE, PGE) load.
    Before it the engine took LA57 and switched to 5-level paging on the spot."""
    assert _fault_of(_set_cr4_bit(bit)) == vector


def test_xsave_components_and_xsetbv_follow_the_features_tcg_keeps():
    """Patch 0012: the default Haswell model listed AVX state in CPUID 0xD although TCG drops
    AVX, and XSETBV enabled it; AVX state without SSE state is refused too."""
    haswell = Uc(UC_ARCH_X86, UC_MODE_64)
    haswell.mem_map(0, 0x1000)
    haswell.mem_write(0, bytes.fromhex("b80d000000" "31c9" "0fa2"))  # mov eax, 0xd; xor ecx, ecx; cpuid
    haswell.emu_start(0, 9)
    assert haswell.reg_read(UC_X86_REG_RAX) == 3  # x87 | SSE: no AVX (bit 2)
    assert _fault_of(_xsetbv(7), Uc(UC_ARCH_X86, UC_MODE_64)) == GP
    assert _fault_of(_xsetbv(5)) == GP
    assert _fault_of(_xsetbv(3)) is None


def _xsetbv(mask):
    """mov eax, mask; xor ecx, ecx; xor edx, edx; xsetbv"""
    return b"\xb8" + struct.pack("<I", mask) + bytes.fromhex("31c9" "31d2" "0f01d1")


def test_arch_capabilities_msr_reads_what_the_host_set():
    """Patch 0013: RDMSR of IA32_ARCH_CAPABILITIES returns the value the host wrote with
    uc_reg_write (TCG read 0); the guest's WRMSR does not change it."""
    uc = new_engine(UC_MODE_64)
    uc.reg_write(UC_X86_REG_MSR, (0x10A, 0x4000000000000021))
    code = (bytes.fromhex("b90a010000" "31c0" "31d2" "0f30")      # mov ecx, 0x10a; eax = edx = 0; wrmsr
            + bytes.fromhex("b90a010000" "0f32"))                 # mov ecx, 0x10a; rdmsr
    assert _fault_of(code, uc) is None
    assert (uc.reg_read(UC_X86_REG_RDX), uc.reg_read(UC_X86_REG_RAX)) == (0x40000000, 0x21)
    assert uc.reg_read(UC_X86_REG_MSR, 0x10A) == 0x4000000000000021


MMIO_ALIAS = r"""
.code64
first:
    mov eax, [0x700000]           # physical 0x4000000, through a virtual alias
    mov [0x200000], eax
first_done:
    jmp first_done
second:
    mov eax, [0x700000]
    mov [0x200004], eax
second_done:
    jmp second_done
"""


class _Constant:
    def __init__(self, value):
        self.value = value

    def mmio_read(self, offset, size):
        return self.value

    def mmio_write(self, offset, size, value):
        pass


def test_unmapping_a_region_flushes_the_tlb_entries_of_its_virtual_aliases():
    """Patch 0015 flushes the TLB once on an unmap instead of once per page of the region
    (seconds for a hole of a few GiB): a guest reaching the region through another virtual
    address must still see the new device, not the unmapped one."""
    m = bare_machine()
    code, sym = assemble(MMIO_ALIAS, 0x100000, bits=64)
    m.ram.write(0x100000, code)
    cr3 = long_mode_tables(m, aliases={0x700: 0x4000000})
    m.cpu.map_mmio(0x4000000, 0x1000, _Constant(0x1111))
    m.cpu.enter(entry("long64", 0x100000, cr3=cr3, rsp=0x90000))
    run_phase(m, sym, "first")
    m.cpu.unmap(0x4000000, 0x1000)
    m.cpu.map_mmio(0x4000000, 0x1000, _Constant(0x2222))
    run_phase(m, sym, "second")
    assert struct.unpack("<II", m.ram.read(0x200000, 8)) == (0x1111, 0x2222)

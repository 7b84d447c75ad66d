"""CPU delivery with real guest code in each mode, on a bare machine (no board devices).

Each guest reports through the debug console (port 0xe9) and ends through port 0xf4.
External interrupts come from a scripted interrupt controller, so these tests exercise the
CPU's delivery alone; the firmware tests exercise it with the real PIC and LAPIC.
"""

import struct

from guestasm import assemble, bare_machine, entry

from emu.devices.apic import LocalApic
from emu.clock import VirtualClock


class ScriptedInterrupts:
    """An interrupt controller that raises given vectors at given guest times (ns)."""

    def __init__(self, machine, schedule):
        self.pending = []
        self.acked = []
        self.timers = []
        for when, vector in schedule:
            timer = machine.clock.new_timer(lambda v=vector: self.pending.append(v))
            timer.arm(when)
            self.timers.append(timer)

    def has_interrupt(self):
        return bool(self.pending)

    def acknowledge(self):
        vector = self.pending.pop(0)
        self.acked.append(vector)
        return vector


def run(machine, limit_ns=2_000_000_000):
    status = machine.run(until_ns=limit_ns)
    return status, bytes(machine.console.output)


# ----------------------------------------------------------------------------- real mode
REAL_MODE = r"""
start:
    xor ax, ax
    mov ds, ax
    mov ss, ax
    mov sp, 0x7000
    mov word ptr [0x21*4], offset soft
    mov word ptr [0x21*4+2], 0
    mov word ptr [0], offset divide_error
    mov word ptr [2], 0
    mov word ptr [0x30*4], offset irq
    mov word ptr [0x30*4+2], 0
    mov ah, 'A'
    int 0x21                  # software interrupt: handler prints ah
    xor cx, cx
    mov ax, 1
    div cx                    # #DE: the handler skips the 2-byte div
    mov ah, 'C'
    int 0x21
    sti
wait:
    hlt                       # woken by the scripted IRQ (vector 0x30)
    cmp byte ptr [ticks], 0
    je wait
    mov ah, 'E'
    int 0x21
    mov al, 0
    out 0xf4, al
soft:
    mov al, ah
    out 0xe9, al
    iret
divide_error:
    push bp
    mov bp, sp
    add word ptr [bp+2], 2
    pop bp
    mov al, 'B'
    out 0xe9, al
    iret
irq:
    inc byte ptr [ticks]
    mov al, 'D'
    out 0xe9, al
    iret
ticks: .byte 0
"""


def test_real_mode_ivt_software_fault_and_external_interrupt():
    code, _ = assemble(REAL_MODE, 0x7C00, bits=16)
    m = bare_machine()
    m.ram.write(0x7C00, code)
    m.interrupt_controller = ScriptedInterrupts(m, [(5_000_000, 0x30)])
    m.cpu.enter(entry("real", 0x7C00, cs=0))
    status, out = run(m)
    assert out == b"ABCDE"
    assert status == 1
    assert m.stats["halts"] >= 1


# ----------------------------------------------------------------------------- 32-bit protected mode
PM32 = r"""
start:
    lgdt [gdtr]
    lidt [idtr]
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov esp, 0x90000
    mov ax, 0x28
    ltr ax
    push 0x23                 # user SS
    push 0x70000              # user ESP
    push 0x202                # IF=1
    push 0x1b                 # user CS
    push offset user
    iretd
user:
    mov eax, 7
    int 0x80                  # DPL 3 gate: allowed from ring 3
    cmp eax, 8
    jne fail_user
    int 0x81                  # DPL 0 gate: #GP with error code 0x81*8+2
    cmp dword ptr [gp_seen], 1
    jne fail_user
spin:
    cmp dword ptr [irq_seen], 0
    je spin                   # the scripted IRQ arrives while we are in ring 3
    int 0x82                  # back to the kernel to finish
fail_user:
    jmp fail_user

sys80:
    inc eax
    mov ebx, [esp+4]          # frame: EIP, CS, EFLAGS, ESP, SS
    and ebx, 3
    cmp ebx, 3
    jne fail
    iretd
gp:
    pop eax                   # error code
    cmp eax, 0x81*8+2
    jne fail
    mov dword ptr [gp_seen], 1
    add dword ptr [esp], 2    # skip int 0x81
    iretd
irq:
    mov eax, [esp+16]         # the user SS saved by the stack switch
    cmp eax, 0x23
    jne fail
    cmp esp, 0x90000 - 20     # on the ring-0 stack from the TSS
    jne fail
    pushfd
    pop eax
    test eax, 0x200           # interrupt gate: IF cleared
    jnz fail
    mov dword ptr [irq_seen], 1
    iretd
finish:
    mov al, 'K'
    out 0xe9, al
    mov al, 0
    out 0xf4, al
fail:
    mov al, 'F'
    out 0xe9, al
    mov al, 1
    out 0xf4, al

.align 8
gdt: .quad 0
     .quad 0x00cf9a000000ffff   # 0x08 kernel code
     .quad 0x00cf92000000ffff   # 0x10 kernel data
     .quad 0x00cffa000000ffff   # 0x18 user code
     .quad 0x00cff2000000ffff   # 0x20 user data
tss_desc: .quad 0               # 0x28
gdt_end:
gdtr: .word gdt_end - gdt - 1
      .long gdt
idtr: .word 256*8-1
      .long 0x20000
gp_seen: .long 0
irq_seen: .long 0
"""


def _gate32(m, vector, offset, dpl=0, kind=0xE):
    m.ram.write(0x20000 + vector * 8,
                struct.pack("<HHBBH", offset & 0xFFFF, 0x08, 0, 0x80 | (dpl << 5) | kind, offset >> 16))


def test_protected_mode_ring_change_through_tss_and_gate_privilege():
    code, sym = assemble(PM32, 0x100000)
    m = bare_machine()
    m.ram.write(0x100000, code)
    tss = 0x30000
    m.ram.write(tss + 4, struct.pack("<II", 0x90000, 0x10))  # ESP0, SS0
    m.ram.write(sym["tss_desc"], struct.pack("<II", ((tss & 0xFFFF) << 16) | 0x67,
                                             ((tss >> 16) & 0xFF) | 0x8900 | (tss & 0xFF000000)))
    _gate32(m, 0x80, sym["sys80"], dpl=3)
    _gate32(m, 0x81, sym["finish"], dpl=0)
    _gate32(m, 0x82, sym["finish"], dpl=3)
    _gate32(m, 13, sym["gp"])
    _gate32(m, 0x40, sym["irq"])
    m.interrupt_controller = ScriptedInterrupts(m, [(3_000_000, 0x40)])
    m.cpu.enter(entry("protected32", 0x100000))
    status, out = run(m)
    assert out == b"K", out
    assert status == 1


# ----------------------------------------------------------------------------- long mode
LONG = r"""
.code64
start:
    lgdt [gdtr]
    lidt [idtr]
    mov ax, 0x28
    ltr ax
    mov rsp, 0x90000
    int3                       # through IST1
    cmp byte ptr [bp_ok], 1
    jne fail
    mov rax, 0x40000000        # not mapped: #PF, handler maps nothing and skips
    mov rbx, [rax]
    cmp byte ptr [pf_ok], 1
    jne fail
    mov ecx, 0xC0000080        # EFER.SCE for syscall
    rdmsr
    or eax, 1
    wrmsr
    mov ecx, 0xC0000081        # STAR: kernel CS 0x08, user base 0x10 (sysret: CS=0x20|3, SS=0x18|3)
    xor eax, eax
    mov edx, 0x00130008
    wrmsr
    mov ecx, 0xC0000082        # LSTAR
    lea rax, [rip + syscall_entry]
    mov rdx, rax
    shr rdx, 32
    wrmsr
    mov ecx, 0xC0000084        # SFMASK: clear IF
    mov eax, 0x200
    xor edx, edx
    wrmsr
    push 0x1b                  # iretq to ring 3: SS
    push 0x70000
    push 0x202
    push 0x23                  # CS (64-bit user code)
    lea rax, [rip + user]
    push rax
    iretq
user:
    mov rdi, 5
    syscall                    # kernel doubles rdi, sysretq back
    cmp rdi, 10
    jne user_fail
    mov rax, 1
    int 0x80                   # ring 3 -> 0 through RSP0
user_fail:
    jmp user_fail

syscall_entry:
    add rdi, rdi
    sysretq
bp_handler:
    cmp rsp, 0x60000 - 40       # IST1 stack top minus the 5-word frame
    jne fail
    mov byte ptr [bp_ok], 1
    iretq
pf_handler:
    pop rax                      # error code: not present, read, supervisor
    cmp rax, 0
    jne fail
    mov rax, cr2
    cmp rax, 0x40000000
    jne fail
    mov byte ptr [pf_ok], 1
    add qword ptr [rsp], 3       # skip mov rbx, [rax]
    iretq
int80:
    cmp rsp, 0x80000 - 40        # RSP0 from the TSS
    jne fail
    mov rax, [rsp+8]
    cmp rax, 0x23
    jne fail
    mov al, 'L'
    out 0xe9, al
    mov al, 0
    out 0xf4, al
fail:
    mov al, 'F'
    out 0xe9, al
    mov al, 1
    out 0xf4, al

.align 8
gdt: .quad 0
     .quad 0x00af9a000000ffff   # 0x08 kernel code 64
     .quad 0x00cf92000000ffff   # 0x10 kernel data
     .quad 0x00cff2000000ffff   # 0x18 user data
     .quad 0x00affa000000ffff   # 0x20 user code 64
tss_desc: .quad 0, 0            # 0x28 (16 bytes in long mode)
gdt_end:
gdtr: .word gdt_end - gdt - 1
      .quad gdt
idtr: .word 256*16-1
      .quad 0x20000
bp_ok: .byte 0
pf_ok: .byte 0
"""


def _gate64(m, vector, offset, dpl=0, ist=0):
    m.ram.write(0x20000 + vector * 16, struct.pack("<HHBBHII", offset & 0xFFFF, 0x08, ist, 0x8E | (dpl << 5),
                                                   (offset >> 16) & 0xFFFF, offset >> 32, 0))


def test_long_mode_ist_page_fault_syscall_and_ring3_interrupt():
    code, sym = assemble(LONG, 0x100000, bits=64)
    m = bare_machine()
    m.ram.write(0x100000, code)
    # identity map the first 1 GiB with 2 MiB pages, user accessible
    pml4, pdpt, pd = 0x10000, 0x11000, 0x12000
    m.ram.write(pml4, struct.pack("<Q", pdpt | 7))
    m.ram.write(pdpt, struct.pack("<Q", pd | 7))
    m.ram.write(pd, b"".join(struct.pack("<Q", (i << 21) | 0x87) for i in range(8)))
    tss = 0x30000
    m.ram.write(tss + 4, struct.pack("<Q", 0x80000))          # RSP0
    m.ram.write(tss + 0x24, struct.pack("<Q", 0x60000))       # IST1
    m.ram.write(sym["tss_desc"], struct.pack("<IIII", ((tss & 0xFFFF) << 16) | 0x67,
                                             ((tss >> 16) & 0xFF) | 0x8900 | (tss & 0xFF000000), 0, 0))
    _gate64(m, 3, sym["bp_handler"], dpl=3, ist=1)
    _gate64(m, 14, sym["pf_handler"])
    _gate64(m, 0x80, sym["int80"], dpl=3)
    m.cpu.enter(entry("long64", 0x100000, cr3=pml4))
    status, out = run(m)
    assert out == b"L", out
    assert status == 1
    assert m.cpu.exception_counts.get(14) == 1


# ----------------------------------------------------------------------------- fault rules
TRIPLE = r"""
start:
    lidt [idtr]
    int3                       # IDT limit 0: #GP, then #DF, then a triple fault
idtr: .word 0
      .long 0
"""


def test_triple_fault_resets_or_stops_under_no_reboot():
    code, _ = assemble(TRIPLE, 0x100000)
    for no_reboot in (True, False):
        m = bare_machine(no_reboot=no_reboot)
        boots = []

        def boot(machine, code=code, boots=boots):
            boots.append(1)
            machine.ram.write(0x100000, code)
            machine.cpu.enter(entry("protected32", 0x100000))
            if len(boots) > 2:
                machine.request_exit(42)

        m.boot = boot
        m.reset()
        status = m.run(until_ns=1_000_000_000)
        if no_reboot:
            assert status == 0 and "triple fault" in m.exit_message
            assert len(boots) == 1
        else:
            assert len(boots) == 3 and status == 42


SHADOW = r"""
start:
    lgdt [gdtr]
    lidt [idtr]
    xor ebx, ebx
    mov esp, 0x90000
    sti
    inc ebx                    # runs before the pending interrupt (interrupt shadow)
    inc ebx
    jmp .
isr:
    mov eax, ebx
    add al, '0'
    out 0xe9, al
    mov al, 0
    out 0xf4, al
.align 8
gdt: .quad 0
     .quad 0x00cf9a000000ffff
     .quad 0x00cf92000000ffff
gdtr: .word 23
      .long gdt
idtr: .word 256*8-1
      .long 0x20000
"""


def test_interrupt_shadow_after_sti():
    code, sym = assemble(SHADOW, 0x100000)
    m = bare_machine()
    m.ram.write(0x100000, code)
    _gate32(m, 0x40, sym["isr"])
    m.interrupt_controller = ScriptedInterrupts(m, [(0, 0x40)])
    m.cpu.enter(entry("protected32", 0x100000))
    status, out = run(m)
    assert out == b"1", out  # exactly one instruction ran after sti


CPUID = r"""
.equ results, 0x200000          # a data page apart from the code
start:
    mov eax, 1
    cpuid
    mov [results], ecx
    mov [results+4], edx
    mov eax, 0x40000000
    cpuid
    mov [results+8], ebx
    mov [results+12], ecx
    mov [results+16], edx
    rdtsc
    mov [results+20], eax
    mov [results+24], edx
    mov al, 0
    out 0xf4, al
"""


def test_cpuid_tells_the_truth_and_rdtsc_is_virtual():
    code, _ = assemble(CPUID, 0x100000)
    tscs = {}
    for lapic in (True, False, True):
        m = bare_machine(has_lapic=lapic)
        m.ram.write(0x100000, code)
        m.cpu.enter(entry("protected32", 0x100000))
        assert run(m)[0] == 1
        ecx, edx = struct.unpack("<II", m.ram.read(0x200000, 8))
        assert bool(edx & (1 << 9)) == lapic       # APIC bit only with a local APIC
        assert not ecx & (1 << 21)                  # no x2APIC
        assert ecx & (1 << 31)                      # hypervisor bit
        assert m.ram.read(0x200008, 12) == b"EmuColoEmuCo"
        tsc = struct.unpack("<Q", m.ram.read(0x200014, 8))[0]
        # deterministic mode: the TSC is guest time (1 GHz): small, and the same on every run
        assert 0 < tsc < 10_000
        assert tscs.setdefault(lapic, tsc) == tsc
    assert tscs[True] == tscs[False]


SELF_PATCH = r"""
start:
    call patched
    mov al, 0
    out 0xf4, al
patched:
    mov al, 'X'
    out 0xe9, al
    ret
"""


def test_host_write_of_guest_code_is_seen():
    code, sym = assemble(SELF_PATCH, 0x100000)
    m = bare_machine()
    m.ram.write(0x100000, code)
    m.cpu.enter(entry("protected32", 0x100000, esp=0x90000))
    m.run(until_ns=1)                     # translate and run the start
    m.ram.write(sym["patched"] + 1, b"Y")  # host rewrites the immediate ('X' -> 'Y')
    status, out = run(m)
    assert out.endswith(b"Y") and status == 1


# ----------------------------------------------------------------------------- TSC frequency
FREQUENCY = r"""
.equ results, 0x200000
start:
    xor eax, eax
    cpuid
    mov [results], eax          # the highest basic leaf
    mov [results+4], ebx        # vendor: EBX, EDX, ECX
    mov [results+8], edx
    mov [results+12], ecx
    mov eax, 0x15
    cpuid
    mov [results+16], eax       # denominator
    mov [results+20], ebx       # numerator
    mov [results+24], ecx       # crystal Hz
    mov eax, 0x16
    cpuid
    mov [results+28], eax       # base MHz
    mov [results+32], ebx       # max MHz
    mov [results+36], ecx       # bus MHz
    mov ecx, 100000
spin:
    dec ecx
    jnz spin
    rdtsc
    mov [results+40], eax
    mov [results+44], edx
    mov al, 0
    out 0xf4, al
"""


def test_cpuid_leaves_0x15_and_0x16_give_the_rate_rdtsc_counts_at():
    """Linux's native_calibrate_tsc() takes the TSC rate from these leaves (Intel, max leaf >= 0x15)
    instead of timing it against the PIT, and the crystal as the local APIC timer's clock."""
    code, _ = assemble(FREQUENCY, 0x100000)
    m = bare_machine(icount=True)
    m.ram.write(0x100000, code)
    m.cpu.enter(entry("protected32", 0x100000))
    assert run(m)[0] == 1
    max_leaf, *vendor = struct.unpack("<IIII", m.ram.read(0x200000, 16))
    assert max_leaf >= 0x16 and struct.pack("<III", *vendor) == b"GenuineIntel"
    denominator, numerator, crystal_hz, base_mhz, max_mhz, bus_mhz = struct.unpack("<6I", m.ram.read(0x200010, 24))
    assert denominator and numerator and crystal_hz
    tsc_hz = crystal_hz * numerator // denominator
    assert base_mhz == max_mhz == tsc_hz // 1_000_000 and bus_mhz == crystal_hz // 1_000_000
    # the TSC read after ~100000 loop iterations is guest time at the advertised rate
    tsc = struct.unpack("<Q", m.ram.read(0x200028, 8))[0]
    expected = m.clock.now() * tsc_hz // 1_000_000_000
    assert expected > 100_000 and abs(tsc - expected) <= expected // 100, (tsc, expected)
    # the crystal is the local APIC timer's input clock (divide by 1)
    clock = VirtualClock("manual")
    apic = LocalApic("lapic", clock, lambda: None)
    apic.mmio_write(0xF0, 4, 0x1FF)         # software enable
    apic.mmio_write(0x3E0, 4, 0xB)          # divide by 1
    apic.mmio_write(0x380, 4, 1_000_000)    # initial count
    clock.step(10_000)
    assert 1_000_000 - apic.mmio_read(0x390, 4) == 10_000 * crystal_hz // 1_000_000_000


# ----------------------------------------------------------------------------- long mode with 4 KiB pages
PML4, PDPT, PD, PT = 0x10000, 0x11000, 0x12000, 0x13000
LONG_GDT = r"""
.align 8
gdt: .quad 0
     .quad 0x00af9a000000ffff   # 0x08 kernel code 64
     .quad 0x00cf92000000ffff   # 0x10 kernel data
gdt_end:
gdtr: .word gdt_end - gdt - 1
      .quad gdt
idtr: .word 256*16-1
      .quad 0x20000
"""


def long_mode_machine(source, absent_page=None):
    """An icount machine in long mode at 0x100000: the first 16 MiB identity mapped with 2 MiB
    pages, except 0x400000-0x5fffff, mapped with 4 KiB pages where ``absent_page`` is not present."""
    code, sym = assemble(source + LONG_GDT, 0x100000, bits=64)
    m = bare_machine(icount=True)
    m.ram.write(0x100000, code)
    m.ram.write(PML4, struct.pack("<Q", PDPT | 3))
    m.ram.write(PDPT, struct.pack("<Q", PD | 3))
    m.ram.write(PD, b"".join(struct.pack("<Q", PT | 3 if i == 2 else (i << 21) | 0x83) for i in range(8)))
    m.ram.write(PT, b"".join(struct.pack("<Q", (0x400000 + (i << 12)) | (0 if 0x400000 + (i << 12) == absent_page
                                                                           else 3)) for i in range(512)))
    m.cpu.enter(entry("long64", 0x100000, cr3=PML4))
    return m, sym


RDTSC64 = r"""
.code64
.equ results, 0x200000
start:
    mov rax, -1
    mov rdx, -1
    rdtsc
    mov [results], rax
    mov [results+8], rdx
    mov rax, -1
    mov rdx, -1
    mov rcx, -1
    rdtscp
    mov [results+16], rax
    mov [results+24], rdx
    mov [results+32], rcx
    mov al, 0
    out 0xf4, al
"""


def test_rdtsc_and_rdtscp_clear_the_upper_halves_in_long_mode():
    """Linux reads the TSC as RAX | RDX << 32: stale bits 63:32 of RAX would corrupt it."""
    m, _ = long_mode_machine(RDTSC64)
    assert run(m)[0] == 1
    rax, rdx, rax2, rdx2, rcx2 = struct.unpack("<5Q", m.ram.read(0x200000, 40))
    assert rdx == rdx2 == 0 and rcx2 == 0            # TSC < 2^32 this early; TSC_AUX of CPU 0
    assert 0 < rax <= rax2 < 1 << 32


FETCH_FAULT = r"""
.code64
.equ pte, 0x13000 + 8            # the PTE of 0x401000
.equ error_code, 0x200000        # results on a data page apart from the code
.equ fault_address, 0x200008
.equ faults, 0x200010
start:
    lgdt [gdtr]
    lidt [idtr]
    mov rsp, 0x90000
    mov ecx, 0xC0000080          # EFER.NXE: a fetch fault's error code then has the I/D bit
    rdmsr
    or eax, 0x800
    wrmsr
    mov rax, 0x401000
    call rax                     # #PF on the fetch; the handler maps the page and returns to it
    cmp byte ptr [faults], 1
    jne fail
    mov al, 'K'
    out 0xe9, al
    mov al, 0
    out 0xf4, al
    jmp .                        # the exit takes effect at the end of the block
fail:
    mov al, 'F'
    out 0xe9, al
    mov al, 1
    out 0xf4, al
    jmp .
pf_handler:
    pop qword ptr [error_code]
    mov rax, cr2
    mov [fault_address], rax
    inc byte ptr [faults]
    or qword ptr [pte], 1
    invlpg [rax]
    iretq
df_handler:
    mov al, 'D'
    out 0xe9, al
    mov al, 2
    out 0xf4, al
    jmp .
"""


def test_instruction_fetch_page_fault_is_delivered_once_under_icount():
    """An exception stops the engine at the faulting instruction in deterministic mode too.
    Left to the next block start, Unicorn fetched the unmapped instruction again, and that
    second #PF became a #DF (Linux under -icount at its first user-space page fault)."""
    m, sym = long_mode_machine(FETCH_FAULT, absent_page=0x401000)
    m.ram.write(0x401000, b"\xb0R\xe6\xe9\xc3")     # mov al, 'R'; out 0xe9, al; ret
    _gate64(m, 14, sym["pf_handler"])
    _gate64(m, 8, sym["df_handler"])
    status, out = run(m)
    assert out == b"RK" and status == 1, out
    error_code, cr2, faults = struct.unpack("<QQB", m.ram.read(0x200000, 17))
    assert error_code == 0x10 and cr2 == 0x401000                # not present, supervisor, instruction fetch
    assert faults == 1
    assert m.cpu.exception_counts == {14: 1}


def test_deterministic_machine_offers_no_host_entropy():
    """Unicorn's RDRAND returns host randomness: under -icount Linux's boot then differed from run
    to run (printk times from sched_clock on); a real-time machine keeps the instruction."""
    rdrand, rdseed = 1 << 30, 1 << 18
    assert not bare_machine(icount=True).cpu.cpuid(1, 0)[2] & rdrand
    assert not bare_machine(icount=True).cpu.cpuid(7, 0)[1] & rdseed
    assert bare_machine(icount=False).cpu.cpuid(1, 0)[2] & rdrand


MISC_ENABLE = r"""
start:
    mov ecx, 0x1a0              # IA32_MISC_ENABLE
    rdmsr
    mov [0x200000], eax
    mov [0x200004], edx
    xor eax, eax                # fast strings off
    xor edx, edx
    wrmsr
    mov al, 0
    out 0xf4, al
again:
    mov ecx, 0x1a0
    rdmsr
    mov [0x200008], eax
    mov al, 0
    out 0xf4, al
"""


def test_misc_enable_has_fast_strings_on_after_reset_and_is_saved():
    """IA32_MISC_ENABLE as QEMU's reset leaves it: bit 0, fast strings (Linux keeps REP_GOOD
    and its rep-string copies only when it reads 1); what the guest writes survives a restore."""
    code, sym = assemble(MISC_ENABLE, 0x100000)
    m = bare_machine()
    m.ram.write(0x100000, code)
    m.cpu.enter(entry("protected32", 0x100000))
    assert run(m)[0] == 1
    assert struct.unpack("<II", m.ram.read(0x200000, 8)) == (1, 0)
    saved = m.save_state()
    fresh = bare_machine()
    fresh.load_state(saved)
    fresh.ram.write(0x100000, code)
    fresh.cpu.set_reg("eip", sym["again"])
    assert run(fresh)[0] == 1
    assert struct.unpack("<I", fresh.ram.read(0x200008, 4))[0] == 0


TSC_AUX_XCR0 = r"""
.code64
.equ results, 0x200000
start:
    mov ecx, 0xC0000103          # IA32_TSC_AUX
    mov eax, 0x1234abcd
    xor edx, edx
    wrmsr
    mov rax, cr4
    or eax, 1 << 18              # CR4.OSXSAVE
    mov cr4, rax
    xor ecx, ecx
    xor edx, edx
    mov eax, 3                   # XCR0 = x87 | SSE
    xsetbv
    mov rax, cr4
    or eax, 1 << 22              # CR4.PKE
    mov cr4, rax
    mov eax, 0x55555554          # PKRU: every key but 0 access-disabled (Linux's default)
    xor ecx, ecx
    xor edx, edx
    wrpkru
    mov ecx, 0x405               # MC1_STATUS
    mov eax, 0x5a5a5a5a
    mov edx, 0x80000000
    wrmsr
    mov al, 0
    out 0xf4, al                 # the state is saved here
    jmp after_restore            # ends the block: the next one runs only after the restore
after_restore:
    mov rcx, -1
    rdtscp
    mov [results], rcx
    mov ecx, 0xC0000103
    rdmsr
    mov [results+8], eax
    xor ecx, ecx
    xgetbv
    mov [results+16], eax
    xor ecx, ecx
    rdpkru
    mov [results+24], eax
    mov ecx, 0x405
    rdmsr
    mov [results+32], eax
    mov [results+36], edx
    mov al, 0
    out 0xf4, al
"""


def test_tsc_aux_xcr0_pkru_and_mce_banks_survive_a_save_and_a_restore_into_a_fresh_machine():
    """RDTSCP returns IA32_TSC_AUX as WRMSR left it; that MSR, XCR0, PKRU (no engine register
    for either) and the machine-check banks travel in the state."""
    m, _ = long_mode_machine(TSC_AUX_XCR0)
    assert run(m)[0] == 1
    stream = m.save_state(ram_pages="all")
    fresh = bare_machine(icount=True)
    fresh.load_state(stream)
    assert run(fresh)[0] == 1
    rcx, aux, xcr0, pkru, mc1_status = struct.unpack("<QI4xI4xI4xQ", fresh.ram.read(0x200000, 40))
    assert (rcx, aux, xcr0, pkru, mc1_status) == (0x1234abcd, 0x1234abcd, 3, 0x55555554, 0x800000005a5a5a5a)


def test_xcr0_is_x87_only_after_reset_and_cpuid_osxsave_follows_cr4():
    """SDM: XCR0 = 1 after RESET; CPUID.1:ECX.OSXSAVE is CR4.OSXSAVE (QEMU's cpu_x86_cpuid)."""
    m = bare_machine(icount=True)
    assert m.cpu.context().u64("xcr0") == 1
    cpu = m.cpu
    assert not cpu.cpuid(1, 0)[2] & (1 << 27)
    assert cpu._dynamic_cpuid(1, 0, 1 << 18, 1)[2] & (1 << 27)
    assert cpu._dynamic_cpuid(0xD, 0, 1 << 18, 3)[1] == 576
    eax, _, ecx, edx = cpu.cpuid(0xD, 0)
    assert (edx << 32 | eax, ecx) == (0x203, 0xA88)  # x87, SSE, PKRU: no AVX state without AVX

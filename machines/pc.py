"""Machine ``pc``: a single-CPU PC with the ISA devices QEMU's ``pc`` machine has.

=================  ===================  =====  ==========================================
device             ports / address      IRQ    model
=================  ===================  =====  ==========================================
8259A PIC pair     0x20-21, 0xa0-a1     -      emu.devices.i8259  (ELCR at 0x4d0-0x4d1)
8254 PIT           0x40-0x43            0      emu.devices.i8254  (port 0x61: channel 2 gate, speaker)
MC146818 RTC       0x70-0x71            8      emu.devices.mc146818
16550A UART COM1   0x3f8-0x3ff          4      emu.devices.uart16550
16550A UART COM2   0x2f8-0x2ff          3      (with a second -serial)
isa-debug-exit     0xf4-0xf7            -      emu.devices.debugexit
fw_cfg             0x510-0x511          -      emu.devices.fw_cfg
POST port          0x80                 -      emu.devices.pcports
system control A   0x92                 -      emu.devices.pcports (A20, fast reset)
8042 kbd controller 0x60, 0x64          1, 12  emu.devices.i8042 (PS/2 keyboard and mouse, reset line, A20)
reset control      0xcf9                -      emu.devices.pcports (PIIX3 RCR)
A20 gate           -                    -      emu.devices.a20 (driven by 0x92 and the 8042)
PCI config         0xcf8, 0xcfc-0xcff   -      emu.devices.pci (configuration mechanism #1, bus 0)
i440FX host bridge PCI 00:00.0          -      emu.devices.i440fx (PAM shadow RAM at 0xc0000-0xfffff)
PIIX3 ISA bridge   PCI 00:01.0          -      emu.devices.piix3 (PIRQA-D routing to ISA IRQs)
PCI cards          PCI 00:02.0 and up   PIRQ   machines.pcslots (-device virtio-net-pci/virtio-blk-pci)
isa-debugcon       0xe9 (or -global)    -      emu.devices.debugcon (with -debugcon DEV)
unassigned memory  every hole           -      emu.memmap (reads all ones, writes dropped)
local APIC         0xfee00000 (MMIO)    -      emu.devices.apic (MSI writes from PCI cards)
=================  ===================  =====  ==========================================

The physical address space (``emu.memmap``): RAM from 0, the BIOS ROM ending at 4 GiB and
its last 128 KiB below 1 MiB through the i440FX's PAM windows, PCI BARs in the 32-bit
window under 0xfec00000, the local APIC; every hole reads all ones.
"""

import struct
import sys
import time

from emu import chardev, loaders

from emu.devices.a20 import A20Gate
from emu.devices.apic import BASE_ADDRESS_MASK, MSR_IA32_APIC_BASE, LocalApic
from emu.devices.debugcon import DEFAULT_IOBASE, IsaDebugcon
from emu.devices.debugexit import IsaDebugExit
from emu.errors import ConfigError, UnsupportedError
from emu.devices.fastpath import PostCodeFastPath, UartFastPath
from emu.devices.fw_cfg import FwCfg, parse_user_file
from emu.devices.i8254 import Pit8254, SystemControlPortB
from emu.devices.i8042 import I8042
from emu.devices.i8259 import Pic8259Pair
from emu.machine import Machine
from emu.memmap import APIC_PRIORITY, ROM_PRIORITY, HostBuffer
from emu.devices.mc146818 import Mc146818Rtc
from emu.devices.pcports import PostCodePort, ResetControl, SystemControlPortA
from emu.devices.uart16550 import Uart16550

from machines.pcslots import PcPci

MACHINE_TYPE = "pc"
LAPIC_BASE = 0xFEE00000
DETERMINISTIC_RTC_BASE = 1_767_225_600  # 2026-01-01 00:00:00 UTC: the same date on every run
SERIAL_PORTS = ((0x3F8, 4), (0x2F8, 3))


class InterruptRouter:
    """Where the CPU's INTR comes from: the local APIC first, then the 8259 through LINT0
    (ExtINT, "virtual wire"), following QEMU's cpu_get_pic_interrupt()."""

    def __init__(self, pic, lapic):
        self.pic = pic
        self.lapic = lapic

    def _pic_allowed(self):
        return self.lapic is None or self.lapic.accept_pic_interrupt()

    def has_interrupt(self):
        if self.lapic is not None and self.lapic.has_interrupt():
            return True
        return self.pic.int_pending and self._pic_allowed()

    def acknowledge(self):
        if self.lapic is not None and self.lapic.has_interrupt():
            return self.lapic.get_interrupt()
        if self.pic.int_pending and self._pic_allowed():
            return self.pic.acknowledge()
        return None


def build(ram_size=64 << 20, kernel=None, append="", initrd=None, bios=None, flat=None, serial=("stdio",),
          icount_shift=None, no_reboot=False, trace=(), lapic=True, rtc_base=None, fw_cfg_files=(),
          netdevs=(), devices=(), drives=(), debugcon=None, debugcon_iobase=DEFAULT_IOBASE):
    """Create a ready-to-run ``pc`` machine (images loaded, CPU at its entry state).

    ``fw_cfg_files``: ``-fw_cfg`` option values, files added to the fw_cfg directory;
    ``netdevs``, ``devices``, ``drives``: ``-netdev``, ``-device``, ``-drive`` values
    (machines.pcslots); ``debugcon``: the ``-debugcon`` character device.  The devices are
    added in the order of the table above: it is also the order of their state sections and
    of the hooks that re-drive interrupt lines after a load.
    """
    user_files = [parse_user_file(spec) for spec in fw_cfg_files]  # option errors before anything is built
    machine = Machine(MACHINE_TYPE, ram_size, icount=icount_shift is not None, no_reboot=no_reboot,
                      trace=trace, has_lapic=lapic, ns_per_unit=1 << (icount_shift or 0))
    pic = Pic8259Pair(int_output=lambda level: machine.notify_interrupt() if level else None)
    for part, base, count in pic.port_devices():
        machine.add_device(part, [(base, count)])
    if rtc_base is None:
        rtc_base = DETERMINISTIC_RTC_BASE if icount_shift is not None else int(time.time())
    _add_timers(machine, pic, rtc_base)
    _add_serial_ports(machine, pic, serial)
    _add_system_ports(machine, pic)
    _add_fw_cfg(machine, kernel, append, user_files)
    if debugcon is not None:
        _add_debugcon(machine, debugcon, debugcon_iobase)
    local_apic = None
    memory = machine.memory
    if lapic:
        local_apic = LocalApic("lapic@0xfee00000", machine.clock, notify=machine.notify_interrupt)
        machine.add_device(local_apic)
        machine.cpu.add_msr(MSR_IA32_APIC_BASE, local_apic.read_base_msr,
                            lambda value: _write_apic_base(local_apic, value))
        memory.add("lapic", LAPIC_BASE, 0x1000, "mmio", local_apic, priority=APIC_PRIORITY, commit=False)
    machine.interrupt_controller = InterruptRouter(pic, local_apic)
    bios_alias = _add_bios(machine, bios)
    guest_errors = machine.trace if "guest_errors" in machine.trace_categories else None
    pci = PcPci(machine, memory, pic, local_apic, bios_alias, guest_errors)
    pci.add_cards(netdevs, devices, drives)
    machine.host_resources.append(pci)
    machine.after_load.append(pic.sync_outputs)  # last: the inputs above are driven by now

    machine.boot = _boot_function(kernel=kernel, append=append, initrd=initrd, bios=bios_alias is not None,
                                  flat=flat, pci=pci)
    machine.reset()
    machine.stats["resets"] = 0
    memory.commit()
    return machine


def _write_apic_base(lapic, value):
    """WRMSR IA32_APIC_BASE (False: #GP(0)); the APIC page stays where the board maps it."""
    if not lapic.base_msr_reserved(value) and value & BASE_ADDRESS_MASK != LAPIC_BASE:
        raise UnsupportedError(f"{lapic.name}: WRMSR IA32_APIC_BASE {value:#x} moves the APIC page away from "
                               f"{LAPIC_BASE:#x}, which is not supported")
    return lapic.write_base_msr(value)


def _add_timers(machine, pic, rtc_base):
    """The 8254 PIT on IRQ 0 (with port 0x61) and the RTC on IRQ 8."""
    clock = machine.clock
    pit = Pit8254(clock, irq=pic.irq_line(0))
    machine.add_device(pit, [(0x40, 4)])
    machine.add_device(SystemControlPortB(pit, clock), [(0x61, 1)])
    rtc = Mc146818Rtc("rtc@0x70", irq=pic.irq_line(8), clock=clock, base_time=rtc_base, ram_size=machine.ram.size)
    machine.add_device(rtc, [(0x70, 2)])
    machine.after_load.append(lambda: rtc.irq.set_level(rtc.irq_level()))


def _add_serial_ports(machine, pic, serial):
    """COM1 and COM2 (a UART behind its C fast path) with the backends the ``-serial`` specs name."""
    if len(serial) > len(SERIAL_PORTS):
        raise ConfigError(f"-serial: at most {len(SERIAL_PORTS)} serial ports")
    for index, spec in enumerate(serial):
        backend = chardev.parse_serial_spec(spec)
        if backend is None:
            continue
        base, irq = SERIAL_PORTS[index]
        uart = Uart16550(f"serial@{base:#x}", irq=pic.irq_line(irq), clock=machine.clock, backend=backend)
        front = UartFastPath(uart, base, machine.cstate, machine.clib, ring=index)
        machine.add_device(front, [(base, 8)])
        machine.add_input(backend, backend.attach(machine, front.receive))
        machine.serial_backends.append(backend)
        front.sync()
        machine.after_load += [uart.refresh_irq, front.sync]


def _add_system_ports(machine, pic):
    """isa-debug-exit, the POST port, the A20 gate and the keyboard controller and reset
    registers that drive it or reset the machine."""
    machine.add_device(IsaDebugExit("debugexit@0xf4", on_exit=machine.request_exit), [(0xF4, 4)])
    post = machine.add_device(PostCodePort("post@0x80"), [(0x80, 1)])
    machine.fast_paths.append(PostCodeFastPath(post, machine.cstate, machine.clib))
    a20 = machine.add_device(A20Gate("a20", machine.cpu))
    machine.add_device(SystemControlPortA("port92", on_reset=machine.request_reset, a20=a20), [(0x92, 1)])
    kbc = I8042("i8042@0x60", kbd_irq=pic.irq_line(1), mouse_irq=pic.irq_line(12), a20=a20,
                on_reset=machine.request_reset)
    machine.add_device(kbc, [(0x60, 1)])
    machine.add_device(kbc.command_port(), [(0x64, 1)])
    machine.after_load.append(kbc.sync_irq)
    machine.add_device(ResetControl("rcr@0xcf9", on_reset=machine.request_reset), [(0xCF9, 1)])


def _add_fw_cfg(machine, kernel, append, user_files):
    """fw_cfg with the machine's RAM size and map, a Linux kernel's command line and the -fw_cfg files."""
    fw_cfg = FwCfg("fw_cfg@0x510", ram_size=machine.ram.size, dma_memory=machine.ram)
    if kernel and _kernel_reads_fw_cfg_cmdline(kernel):
        fw_cfg.add_cmdline(append or "")  # as x86_load_linux; QEMU's multiboot path gives none
    # the RAM map firmware reads (QEMU's e820_add_entry: struct e820_entry {u64 address, length; u32 type})
    fw_cfg.add_file("etc/e820", struct.pack("<QQI", 0, machine.ram.size, 1))
    for user_file in user_files:
        if user_file.warning:
            print(f"emu: {user_file.warning}", file=sys.stderr)
        fw_cfg.add_user_file(user_file)
    machine.add_device(fw_cfg, fw_cfg.port_ranges())


def _add_debugcon(machine, spec, iobase):
    """isa-debugcon at ``iobase`` with the character device ``-debugcon`` names."""
    backend = chardev.parse_serial_spec(spec)
    if backend is not None:
        machine.add_device(IsaDebugcon(f"debugcon@{iobase:#x}", backend), [(iobase, 1)])
        machine.host_resources.append(backend)


def _add_bios(machine, bios):
    """The ``-bios`` ROM ending at 4 GiB; returns the buffer of its last 128 KiB, which the
    i440FX's PAM windows show below 1 MiB (None without a BIOS)."""
    if not bios:
        return None
    (high, high_data), (isa_base, isa_data) = loaders.bios_layout(loaders.load_bios(bios))
    rom = HostBuffer(high_data)
    bios_alias = HostBuffer(isa_data)
    machine.host_resources += [rom, bios_alias]  # the engine maps them in place: keep them
    machine.memory.add("bios", high, rom.size, "rom", rom.address, priority=ROM_PRIORITY, commit=False)
    return bios_alias


def _kernel_reads_fw_cfg_cmdline(path):
    """Whether ``-kernel`` takes QEMU's x86_load_linux path that puts the command line in
    fw_cfg: a Linux bzImage, or a PVH ELF without a multiboot header.  An unreadable or
    malformed file is left to the loader to report."""
    try:
        with open(path, "rb") as f:
            head = f.read(8192)  # the setup header, or where a multiboot header must be
            if loaders.is_linux_image(head[:0x206]):
                return True
            if not head.startswith(b"\x7fELF") or loaders.find_multiboot_header(head, path) is not None:
                return False
            image = head + f.read()  # a PVH note may lie anywhere in the file
        return loaders.find_pvh_entry(image, path) is not None
    except (OSError, ConfigError):
        return False


def _boot_function(kernel, append, initrd, bios, flat, pci):
    """Load the images; called at creation and again on every system reset (like QEMU's ROM
    reset).  With a BIOS the CPU starts at its reset vector and the BIOS sets up the PCI
    functions; without one the board does it as firmware would (``pci.firmware_setup``)."""
    if flat:
        path, _, address = flat.rpartition("@")
        try:
            flat_address = int(address, 0)
        except ValueError:
            raise ConfigError(f"-flat: bad address in {flat!r} (expected FILE@0xADDRESS)") from None
    notes_shown = []

    def boot(machine):
        entry = None
        if not bios:
            pci.firmware_setup()
        if kernel:
            entry = loaders.load_kernel(machine.ram, kernel, append, initrd or "")
            if not notes_shown:
                for note in entry.notes:
                    print(f"emu: {note}", file=sys.stderr)
                notes_shown.append(True)
        elif flat:
            entry = loaders.load_flat(machine.ram, path, flat_address)
        if entry is not None:
            machine.cpu.enter(entry)

    return boot

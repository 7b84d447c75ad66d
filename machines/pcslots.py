"""The PCI side of the ``pc`` board: the i440FX host bridge (00:00.0), the PIIX3 ISA bridge
(00:01.0), the cards the command line asks for (``-device``, ``-drive ...,if=virtio``) in
slots 2 and up, and, for a direct kernel boot, the setup firmware would have done.

QEMU's option syntax where the meaning is the same:

* ``-netdev tap,id=N,ifname=TAP,script=no,downscript=no`` and ``-netdev socket,id=N,listen=|connect=``
* ``-device virtio-net-pci,netdev=N[,mac=52:54:00:12:34:56][,addr=SLOT]``
* ``-drive file=IMG[,format=raw][,if=virtio|none][,id=D][,readonly=on][,serial=S]``
* ``-device virtio-blk-pci,drive=D[,addr=SLOT]``

Without a BIOS nothing programs the PCI functions, so the board does what SeaBIOS does
(src/fw/pciinit.c): PIRQA-D to IRQ 10, 10, 11, 11, level-triggered in the ELCR; I/O BARs
from 0xc000 up and memory BARs from the top of the 32-bit PCI window (0xfec00000) down,
largest first; I/O, memory and bus mastering enabled; the Interrupt Line of each function
set to the IRQ its pin is routed to; and the PAM shadow open as read/write RAM.
"""

from dataclasses import dataclass

from emu import blockdev, netdev
from emu.devices.i440fx import I440fxHostBridge
from emu.devices.pci import (BAR0, COMMAND, COMMAND_IO, COMMAND_MASTER, COMMAND_MEMORY, INTERRUPT_LINE,
                             INTERRUPT_PIN, ConfigPorts, PciBus)
from emu.devices.piix3 import PIRQRC, Piix3IsaBridge
from emu.devices.virtio_blk import VirtioBlk
from emu.devices.virtio_net import VirtioNet, parse_mac
from emu.errors import ConfigError
from emu.qemuopts import split_commas

PCI_WINDOW_END = 0xFEC00000  # the I/O APIC's place, the top of QEMU's 32-bit PCI hole
IO_BASE = 0xC000
PIRQ_IRQS = (10, 10, 11, 11)
FIRST_SLOT = 2
DEFAULT_MAC = "52:54:00:12:34:56"


@dataclass
class CardSpec:
    """One card asked for on the command line."""

    model: str
    options: dict


def _options(option, spec, allowed):
    kind, *rest = split_commas(spec)
    values = {}
    for item in rest:
        name, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"{option} {spec!r}: option {item!r} needs a value")
        if name not in allowed:
            raise ConfigError(f"{option} {spec!r}: unsupported option {name!r} ({', '.join(sorted(allowed))})")
        values[name] = value
    return kind, values


def parse_device(spec):
    model, values = _options("-device", spec, {"netdev", "mac", "addr", "drive", "id", "serial"})
    if model not in ("virtio-net-pci", "virtio-blk-pci"):
        raise ConfigError(f"-device {model!r}: not supported (virtio-net-pci, virtio-blk-pci)")
    if model == "virtio-net-pci" and "netdev" not in values:
        raise ConfigError(f"-device {spec!r}: netdev= is required")
    if model == "virtio-blk-pci" and "drive" not in values:
        raise ConfigError(f"-device {spec!r}: drive= is required")
    return CardSpec(model, values)


def parse_drive(spec, index):
    """``-drive`` -> (drive id, CardSpec or None, backend)."""
    spec = "drive," + spec  # options only: give _options a kind to split off
    _, values = _options("-drive", spec, {"file", "format", "if", "id", "readonly", "serial", "media", "cache"})
    if "file" not in values:
        raise ConfigError(f"-drive {spec[6:]!r}: file= is required")
    interface = values.get("if", "virtio")
    if interface not in ("virtio", "none"):
        raise ConfigError(f"-drive if={interface}: not supported (virtio, or none with -device virtio-blk-pci)")
    readonly = values.get("readonly", "off")
    if readonly not in ("on", "off"):
        raise ConfigError(f"-drive readonly={readonly!r}: expected on or off")
    drive_id = values.get("id", f"drive{index}")
    backend = blockdev.open_drive(values["file"], values.get("format"), readonly=readonly == "on",
                                  serial=values.get("serial", ""))
    card = CardSpec("virtio-blk-pci", {"drive": drive_id}) if interface == "virtio" else None
    return drive_id, card, backend


class PcPci:
    """What the board builds on bus 0, and the firmware-like setup of a direct boot."""

    def __init__(self, machine, memory, pic, lapic, bios_alias, trace):
        self.machine, self.memory, self.pic = machine, memory, pic
        self.bus = PciBus(memory, machine, self._route_pirq)
        self.host = self.bus.add(I440fxHostBridge("i440fx@00.0", memory, machine.ram, bios=bios_alias), slot=0)
        self.isa = self.bus.add(Piix3IsaBridge("piix3@01.0", pic.irq_line), slot=1)
        self.config_ports = ConfigPorts("pci-conf@0xcf8", self.bus)
        # 0xcf9 in between is the reset control register
        machine.add_device(self.config_ports, [(0xCF8, 1), (0xCFA, 6, 0xCF8)])
        for function in (self.host, self.isa):
            machine.add_device(function)
        self.lapic = lapic
        self.trace = trace
        self.backends = []
        self.msi_dropped = 0
        machine.after_load.append(self._after_load)

    def _route_pirq(self, pirq, level):
        self.isa.set_pirq(pirq, level)

    def _msi(self, address, data):
        """A device's MSI write to 0xfee00000: a fixed interrupt for our one local APIC."""
        if self.lapic is None or address >> 20 != 0xFEE:
            self.msi_dropped += 1
            return
        self.lapic.deliver_irq(data & 0xFF, level_triggered=bool(data & 0x8000))

    def add_cards(self, netdev_specs, device_specs, drive_specs):
        backends = dict(netdev.parse_netdev(spec) for spec in netdev_specs)
        drives, cards = {}, []
        for index, spec in enumerate(drive_specs):
            drive_id, card, backend = parse_drive(spec, index)
            if drive_id in drives:
                raise ConfigError(f"-drive: duplicate id {drive_id!r}")
            drives[drive_id] = backend
            if card is not None:
                cards.append(card)
        cards += [parse_device(spec) for spec in device_specs]
        used_netdevs, used_drives, slot = set(), set(), FIRST_SLOT
        for card in cards:
            slot = int(card.options["addr"], 0) if "addr" in card.options else slot
            if card.model == "virtio-net-pci":
                name = card.options["netdev"]
                if name not in backends or name in used_netdevs:
                    raise ConfigError(f"-device virtio-net-pci: netdev {name!r} is "
                                      f"{'already used' if name in used_netdevs else 'not defined (-netdev)'}")
                used_netdevs.add(name)
                self._add_nic(slot, backends[name], parse_mac(card.options.get("mac", _mac_for(slot))))
            else:
                name = card.options["drive"]
                if name not in drives or name in used_drives:
                    raise ConfigError(f"-device virtio-blk-pci: drive {name!r} is "
                                      f"{'already used' if name in used_drives else 'not defined (-drive)'}")
                used_drives.add(name)
                self._add_disk(slot, self.machine.add_drive(name, drives[name]))
            slot += 1
        unused = sorted(set(backends) - used_netdevs)
        if unused:
            raise ConfigError(f"-netdev {unused[0]}: no -device uses it")
        unused = sorted(set(drives) - used_drives)
        if unused:
            raise ConfigError(f"-drive id={unused[0]}: no -device uses it (if=none needs -device virtio-blk-pci)")

    def _check_slot(self, slot):
        if not FIRST_SLOT <= slot < 32 or self.bus.function(slot << 3) is not None:
            raise ConfigError(f"-device addr={slot}: the slot is taken or out of range ({FIRST_SLOT}..31)")

    def _add_nic(self, slot, backend, mac):
        self._check_slot(slot)
        nic = VirtioNet(f"virtio-net@{slot:02x}.0", self.machine.ram, backend, mac, self._msi, self.machine.clock,
                        trace=self.trace, request_stop=self.machine.cpu.request_stop)
        self.bus.add(nic, slot)
        self.machine.add_device(nic)
        self.backends.append(backend)
        self.machine.net_backends.append(backend)
        if hasattr(backend, "attach_nic"):  # a backend that follows what the guest takes (a COLO link)
            backend.attach_nic(nic, self.machine)
        self.machine.watch_backend(backend, lambda fd: nic.receive(backend.on_readable(fd)))

    def _add_disk(self, slot, drive):
        self._check_slot(slot)
        disk = VirtioBlk(f"virtio-blk@{slot:02x}.0", self.machine.ram, drive, self._msi, trace=self.trace,
                         request_stop=self.machine.cpu.request_stop)
        self.bus.add(disk, slot)
        self.machine.add_device(disk)
        self.backends.append(drive)

    def _after_load(self):
        self.host.apply_pam()
        self.bus.after_load()

    # ------------------------------------------------------------------ the firmware's part
    def firmware_setup(self):
        """For a direct kernel boot: what SeaBIOS's pciinit does, and PAM read/write."""
        for pirq, irq in enumerate(PIRQ_IRQS):
            self.bus.config_access(0, self.isa.devfn, PIRQRC + pirq, 1, irq)
        levels = 0
        for irq in set(PIRQ_IRQS):
            levels |= 1 << irq
        self.pic.elcr.io_write(0, 2, levels)
        for register in range(0x59, 0x60):
            self.bus.config_access(0, self.host.devfn, register, 1, 0x33)
        io_next, mem_top = IO_BASE, PCI_WINDOW_END
        bars = []
        for _, function in sorted(self.bus.functions.items()):
            bars += [(function, bar) for bar in function.bars if bar is not None]
        for function, bar in sorted(bars, key=lambda item: -item[1].size):
            offset = BAR0 + 4 * bar.index
            if bar.kind == "io":
                io_next = (io_next + bar.size - 1) & ~(bar.size - 1)
                address, io_next = io_next, io_next + bar.size
            else:
                mem_top = (mem_top - bar.size) & ~(bar.size - 1)
                address = mem_top
            self.bus.config_access(0, function.devfn, offset, 4, address & 0xFFFFFFFF)
            if bar.kind == "mem64":
                self.bus.config_access(0, function.devfn, offset + 4, 4, address >> 32)
        for devfn, function in self.bus.functions.items():
            if devfn < FIRST_SLOT << 3:
                continue
            command = COMMAND_MASTER
            for bar in function.bars:
                if bar is not None:
                    command |= COMMAND_IO if bar.kind == "io" else COMMAND_MEMORY
            self.bus.config_access(0, devfn, COMMAND, 2, command)
            pin = function.config[INTERRUPT_PIN]
            if pin:
                irq = PIRQ_IRQS[((devfn >> 3) + pin - 1) & 3]
                self.bus.config_access(0, devfn, INTERRUPT_LINE, 1, irq)
        self.memory.commit()

    def close(self):
        for backend in self.backends:
            backend.close()


def _mac_for(slot):
    """QEMU gives each NIC its own 52:54:00:12:34:5x; so do we, by slot."""
    return f"52:54:00:12:34:{0x56 + slot - FIRST_SLOT:02x}"

"""The PCI bus: configuration space, BARs, capabilities and INTx (PCI Local Bus 3.0).

Following QEMU's hw/pci/pci.c: a function's 256-byte configuration space has a write mask
(bits the guest may change) and a write-1-to-clear mask (the status register's error
bits); a BAR's write mask is its size, so writing all ones and reading back sizes it, as
firmware does.  A BAR decodes only while the command register enables its kind (I/O or
memory) and its address is neither 0 nor the all-ones of a sizing in progress; the bus
then places the device's window in the physical address space (``emu.memmap``) or the
port space.  Configuration mechanism #1 (ports 0xcf8/0xcfc, :class:`ConfigPorts`) reaches
bus 0; other buses and unpopulated functions read all ones.

Interrupts: a function asserts INTx (``set_irq``) on the pin its Interrupt Pin register
names; the status register's interrupt bit follows it and the command register's
INTx-disable bit masks it.  The bus hands the pin, swizzled by slot as on the i440FX
board (QEMU's pci_slot_get_pirq: (slot + pin - 1) mod 4), to its interrupt router
(the PIIX3's PIRQ routing).
"""

import struct

from emu.device import Device
from emu.errors import ConfigError, StateError
from emu.memmap import BAR_PRIORITY
from emu.state.vmstate import Bytes, U8, U32, VMStateDescription

# configuration space registers (PCI 3.0, 6.2)
VENDOR_ID, DEVICE_ID, COMMAND, STATUS, REVISION, CLASS_PROG = 0x00, 0x02, 0x04, 0x06, 0x08, 0x09
CACHE_LINE_SIZE, LATENCY_TIMER, HEADER_TYPE, BAR0 = 0x0C, 0x0D, 0x0E, 0x10
SUBSYSTEM_VENDOR_ID, SUBSYSTEM_ID, ROM_ADDRESS, CAPABILITY_LIST = 0x2C, 0x2E, 0x30, 0x34
INTERRUPT_LINE, INTERRUPT_PIN = 0x3C, 0x3D
COMMAND_IO, COMMAND_MEMORY, COMMAND_MASTER, COMMAND_PARITY, COMMAND_SERR, COMMAND_INTX_DISABLE = (
    0x1, 0x2, 0x4, 0x40, 0x100, 0x400)
STATUS_INTERRUPT, STATUS_CAP_LIST = 0x08, 0x10
STATUS_W1C = 0xF900  # parity, signalled/received target and master aborts, SERR, parity error
BAR_IO, BAR_MEM64, BAR_PREFETCH = 0x1, 0x4, 0x8
CAP_MSIX, CAP_VENDOR = 0x11, 0x09
CAP_START = 0x40
UNMAPPED = None


class PciBar:
    """One BAR: ``kind`` is "io", "mem32" or "mem64"; ``target`` the device whose
    io_read/io_write or mmio_read/mmio_write decode it (offsets from the BAR's base)."""

    def __init__(self, index, size, kind, target, prefetchable=False):
        if size & (size - 1) or size < (4 if kind == "io" else 0x1000):
            raise ConfigError(f"pci: BAR {index} size {size:#x} is not a power of two of at least "
                              f"{4 if kind == 'io' else 0x1000:#x}")
        self.index, self.size, self.kind, self.target, self.prefetchable = index, size, kind, target, prefetchable
        self.mapped = UNMAPPED  # the address it decodes now
        self.region = None      # its emu.memmap Region (memory BARs)

    def flags(self):
        if self.kind == "io":
            return BAR_IO
        return (BAR_MEM64 if self.kind == "mem64" else 0) | (BAR_PREFETCH if self.prefetchable else 0)


class PciDevice(Device):
    """A PCI function with a type 0 header; subclasses add BARs, capabilities and behaviour."""

    def __init__(self, name, vendor_id, device_id, class_code, revision=0, subsystem_vendor_id=0,
                 subsystem_id=0, interrupt_pin=0, header_type=0, multifunction=False):
        super().__init__(name)
        self.config = bytearray(256)
        self.wmask = bytearray(256)
        self.w1cmask = bytearray(256)
        self.bars = [None] * 6
        self.bus = None
        self.devfn = None
        self._caps_end = CAP_START
        self._last_cap = None
        self.intx_level = 0
        self._defaults = None
        self._set16(VENDOR_ID, vendor_id)
        self._set16(DEVICE_ID, device_id)
        self.config[REVISION] = revision
        self.config[CLASS_PROG:CLASS_PROG + 3] = (class_code & 0xFFFFFF).to_bytes(3, "little")
        self.config[HEADER_TYPE] = header_type | (0x80 if multifunction else 0)
        self._set16(SUBSYSTEM_VENDOR_ID, subsystem_vendor_id)
        self._set16(SUBSYSTEM_ID, subsystem_id)
        self.config[INTERRUPT_PIN] = interrupt_pin
        self._setmask(self.wmask, COMMAND, 2, COMMAND_IO | COMMAND_MEMORY | COMMAND_MASTER | COMMAND_PARITY
                      | COMMAND_SERR | COMMAND_INTX_DISABLE)
        self._setmask(self.w1cmask, STATUS, 2, STATUS_W1C)
        self.wmask[CACHE_LINE_SIZE] = self.wmask[LATENCY_TIMER] = self.wmask[INTERRUPT_LINE] = 0xFF

    # ------------------------------------------------------------------ construction
    def add_bar(self, index, size, kind, target=None, prefetchable=False):
        bar = PciBar(index, size, kind, target if target is not None else self, prefetchable)
        if kind == "mem64" and index == 5:
            raise ConfigError(f"{self.name}: a 64-bit BAR cannot start at BAR 5")
        self.bars[index] = bar
        offset = BAR0 + 4 * index
        self.config[offset:offset + 4] = bar.flags().to_bytes(4, "little")
        mask = (~(size - 1) & (0xFFFFFFFC if kind == "io" else 0xFFFFFFF0)) & 0xFFFFFFFF
        self.wmask[offset:offset + 4] = mask.to_bytes(4, "little")
        if kind == "mem64":
            self.wmask[offset + 4:offset + 8] = ((~(size - 1) >> 32) & 0xFFFFFFFF).to_bytes(4, "little")
        return bar

    def add_capability(self, cap_id, body):
        """A capability (its bytes after the ID and next pointer) linked into the list;
        returns its offset.  Subclasses set the write mask of its registers."""
        offset = self._caps_end
        length = 2 + len(body)
        if offset + length > 256:
            raise ConfigError(f"{self.name}: capabilities do not fit the configuration space")
        self.config[offset] = cap_id
        self.config[offset + 2:offset + length] = body
        if self._last_cap is None:
            self.config[CAPABILITY_LIST] = offset
            self._set16(STATUS, self._get16(STATUS) | STATUS_CAP_LIST)
        else:
            self.config[self._last_cap + 1] = offset
        self._last_cap = offset
        self._caps_end = (offset + length + 3) & ~3
        return offset

    def _setmask(self, mask, offset, size, value):
        mask[offset:offset + size] = value.to_bytes(size, "little")

    def _get16(self, offset):
        return int.from_bytes(self.config[offset:offset + 2], "little")

    def _set16(self, offset, value):
        self.config[offset:offset + 2] = (value & 0xFFFF).to_bytes(2, "little")

    def _get32(self, offset):
        return int.from_bytes(self.config[offset:offset + 4], "little")

    def _set32(self, offset, value):
        self.config[offset:offset + 4] = (value & 0xFFFFFFFF).to_bytes(4, "little")

    def finish_construction(self):
        """The power-on configuration space, which :meth:`reset` brings back."""
        self._defaults = bytes(self.config)

    # ------------------------------------------------------------------ configuration access
    def config_read(self, offset, size):
        return int.from_bytes(self.config[offset:offset + size], "little")

    def config_write(self, offset, size, value):
        """A guest write: masked byte by byte, then the consequences (BARs, INTx)."""
        for i in range(size):
            byte, at = (value >> (8 * i)) & 0xFF, offset + i
            wmask, w1c = self.wmask[at], self.w1cmask[at]
            self.config[at] = (self.config[at] & ~wmask) | (byte & wmask)
            self.config[at] &= ~(byte & w1c)
        self.config_written(offset, size)
        if offset < BAR0 + 24 and offset + size > COMMAND:
            self.update_mappings()
        if offset <= COMMAND + 1 < offset + size:
            self._update_intx()

    def config_written(self, offset, size):
        """Subclasses react to writes of their own registers (MSI-X control, PAM...)."""

    @property
    def command(self):
        return self._get16(COMMAND)

    def bar_address(self, bar):
        """The address ``bar`` decodes now, or UNMAPPED (QEMU's pci_bar_address)."""
        command = self.command
        offset = BAR0 + 4 * bar.index
        if bar.kind == "io":
            if not command & COMMAND_IO:
                return UNMAPPED
            address = self._get32(offset) & ~0x3 & ~(bar.size - 1) & 0xFFFF
            # 0, or a sizing in progress (every writable bit set): not decoding
            return UNMAPPED if address == 0 or address == (~(bar.size - 1) & 0xFFFC) else address
        if not command & COMMAND_MEMORY:
            return UNMAPPED
        address = self._get32(offset) & ~0xF
        all_ones = ~(bar.size - 1) & 0xFFFFFFF0
        if bar.kind == "mem64":
            high = self._get32(offset + 4)
            address |= high << 32
            all_ones |= (~(bar.size - 1) >> 32 & 0xFFFFFFFF) << 32
        address &= ~(bar.size - 1)
        return UNMAPPED if address == 0 or address == all_ones else address

    def update_mappings(self):
        if self.bus is not None:
            self.bus.update_bars(self)

    # ------------------------------------------------------------------ interrupts
    def set_irq(self, level):
        """Assert or deassert INTx (level triggered)."""
        self.intx_level = 1 if level else 0
        self._update_intx()

    def _update_intx(self):
        status = self._get16(STATUS) & ~STATUS_INTERRUPT
        if self.intx_level:
            status |= STATUS_INTERRUPT
        self._set16(STATUS, status)
        asserted = self.intx_level and not self.command & COMMAND_INTX_DISABLE
        if self.bus is not None and self.config[INTERRUPT_PIN]:
            self.bus.set_intx(self, asserted)

    # ------------------------------------------------------------------ lifecycle
    def reset(self):
        if self._defaults is None:
            self.finish_construction()
        self.config[:] = self._defaults
        self.intx_level = 0
        self.reset_function()
        self.update_mappings()
        self._update_intx()

    def reset_function(self):
        """Subclasses put their own registers back to power-on."""

    def pci_post_load(self, version_id):
        """Validation only: the bus places the BARs and drives INTx once everything has loaded
        (:meth:`PciBus.after_load`)."""
        if len(self.config) != 256:
            raise StateError(f"{self.name}: configuration space of {len(self.config)} bytes")
        if self.intx_level not in (0, 1):
            raise StateError(f"{self.name}: field intx_level: {self.intx_level} is not 0 or 1")


class PciBus:
    """Bus 0: its functions by device/function number, the windows of their BARs, and the
    wire-OR of their INTx pins per PIRQ line."""

    def __init__(self, memory, ports, route_pirq):
        self.memory = memory
        self.ports = ports  # map_ports / unmap_ports / ports_free (the Machine)
        self.route_pirq = route_pirq  # callable(pirq 0..3, level)
        self.functions = {}
        self._pirq_sources = [set() for _ in range(4)]

    def add(self, device, slot, function=0):
        devfn = (slot << 3) | function
        if devfn in self.functions:
            raise ConfigError(f"pci: slot {slot} function {function} is taken by {self.functions[devfn].name}")
        device.bus, device.devfn = self, devfn
        self.functions[devfn] = device
        device.finish_construction()
        return device

    def function(self, devfn):
        return self.functions.get(devfn)

    def update_bars(self, device):
        for bar in device.bars:
            if bar is not None:
                self._place(device, bar, device.bar_address(bar))

    def _place(self, device, bar, address):
        if address == bar.mapped:
            return
        if bar.kind == "io":
            if bar.mapped is not UNMAPPED:
                self.ports.unmap_ports(bar.mapped, bar.size)
            if address is not UNMAPPED:
                if address + bar.size > 0x10000 or not self.ports.ports_free(address, bar.size):
                    address = UNMAPPED  # overlaps something: the bus cannot decode it
                else:
                    self.ports.map_ports(address, bar.size, bar.target)
        else:
            if bar.region is None:
                bar.region = self.memory.add(f"{device.name}.bar{bar.index}", address or 0, bar.size, "mmio",
                                             bar.target, priority=BAR_PRIORITY, commit=False)
            fits = address is not UNMAPPED and address + bar.size <= self.memory.limit
            self.memory.move(bar.region, address if fits else 0, enabled=fits)
            if not fits:
                address = UNMAPPED
        bar.mapped = address

    def set_intx(self, device, asserted):
        slot = device.devfn >> 3
        pirq = (slot + device.config[INTERRUPT_PIN] - 1) & 3
        sources = self._pirq_sources[pirq]
        before = bool(sources)
        if asserted:
            sources.add(device.devfn)
        else:
            sources.discard(device.devfn)
        if bool(sources) != before:
            self.route_pirq(pirq, 1 if sources else 0)

    def after_load(self):
        """A state load changed configuration spaces: place every BAR again and recompute
        the INTx wire-OR (the routers re-drive their outputs from it)."""
        for device in self.functions.values():
            self.update_bars(device)
        for pirq, sources in enumerate(self._pirq_sources):
            sources.clear()
            for device in self.functions.values():
                asserted = device.intx_level and not device.command & COMMAND_INTX_DISABLE
                if device.config[INTERRUPT_PIN] and asserted and (
                        (device.devfn >> 3) + device.config[INTERRUPT_PIN] - 1) & 3 == pirq:
                    sources.add(device.devfn)
            self.route_pirq(pirq, 1 if sources else 0)

    def pirq_level(self, pirq):
        return 1 if self._pirq_sources[pirq] else 0

    def config_access(self, bus, devfn, offset, size, value=None):
        """One configuration cycle: a read returns the value (all ones where nothing
        answers); a write returns None."""
        device = self.functions.get(devfn) if bus == 0 else None
        if value is None:
            return device.config_read(offset, size) if device is not None else (1 << (8 * size)) - 1
        if device is not None:
            device.config_write(offset, size, value)
        return None


class ConfigPorts(Device):
    """Configuration mechanism #1: CONFIG_ADDRESS at 0xcf8 (dword accesses only; 0xcf9 is
    the reset control register), CONFIG_DATA at 0xcfc-0xcff."""

    def __init__(self, name, bus):
        super().__init__(name)
        self.bus = bus
        self.address = 0

    def io_read(self, offset, size):
        if offset == 0:
            return self.address if size == 4 else (1 << (8 * size)) - 1
        target = self._target(offset - 4)
        if target is None:
            return (1 << (8 * size)) - 1
        return self.bus.config_access(*target, size)

    def io_write(self, offset, size, value):
        if offset == 0:
            if size == 4:
                self.address = value & 0x80FFFFFC
            return
        target = self._target(offset - 4)
        if target is not None:
            self.bus.config_access(*target, size, value)

    def _target(self, byte):
        if not self.address & 0x80000000:
            return None
        bus, devfn, register = (self.address >> 16) & 0xFF, (self.address >> 8) & 0xFF, self.address & 0xFC
        return bus, devfn, register + byte

    def reset(self):
        self.address = 0

    VMSTATE = VMStateDescription("pci-conf1", version_id=1, minimum_version_id=1, fields=[U32("address")])


def pci_vmstate(name, extra_fields=(), subsections=(), version_id=1):
    """The VMState of a PCI function: its configuration space and INTx level (QEMU's
    VMSTATE_PCI_DEVICE), plus the function's own fields."""
    return VMStateDescription(name, version_id=version_id, minimum_version_id=1,
                              fields=[Bytes("config", 256), U8("intx_level"), *extra_fields],
                              subsections=list(subsections),
                              post_load=lambda dev, version_id: dev.pci_post_load(version_id))


def le32(value):
    return struct.pack("<I", value & 0xFFFFFFFF)

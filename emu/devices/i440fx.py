"""The Intel 82441FX (i440FX) host bridge, PCI 00:00.0, as QEMU's pc board has it
(hw/pci-host/i440fx.c; datasheet 290549, 3.2).

Its configuration space identifies the host bridge (8086:1237 rev 2, class 0x0600) and
holds the PAM registers (0x59-0x5f) that decide, per segment of the 0xc0000-0xfffff range,
where the CPU's reads and writes go: to the ISA/PCI side (the BIOS ROM, expansion ROMs or
nothing) or to the shadow RAM under it.  Firmware copies itself into shadow RAM (reads
from ROM, writes to RAM, then reads and writes to RAM) and finally write-protects it (reads
from RAM, writes to the bus, where they are ignored).  The SMRAM control register (0x72)
is kept but opens no SMRAM: the machine has no SMM.

PAM nibble values (RE = bit 0, WE = bit 1): 0 both to the bus, 1 read RAM / write bus
(read-only shadow), 2 read bus / write RAM, 3 both to RAM.
"""

from emu.device import Device
from emu.devices.pci import PciDevice, pci_vmstate
from emu.memmap import SHADOW_PRIORITY, UnassignedMemory

PAM0 = 0x59
SMRAM = 0x72
SEGMENTS = ([(0xF0000, 0x10000, PAM0, 4)]
            + [(0xC0000 + 0x4000 * i, 0x4000, PAM0 + 1 + i // 2, 0 if i % 2 == 0 else 4) for i in range(12)])


class _ReadBusWriteRam(Device):
    """PAM mode 2 for one segment: reads come from the bus side (the ROM image, or all
    ones), writes go to the shadow RAM under it."""

    def __init__(self, name, ram, base, rom_bytes):
        super().__init__(name)
        self.ram, self.base, self.rom = ram, base, rom_bytes

    def mmio_read(self, offset, size):
        if self.rom is None:
            return (1 << (8 * size)) - 1
        return int.from_bytes(self.rom[offset:offset + size], "little")

    def mmio_write(self, offset, size, value):
        self.ram.write(self.base + offset, value.to_bytes(size, "little"))


class I440fxHostBridge(PciDevice):
    """The host bridge and its PAM shadow windows.

    ``memory`` is the machine's :class:`~emu.memmap.PhysicalMemory`; ``bios`` the ROM image's
    last 128 KiB mapped below 1 MiB as a :class:`~emu.memmap.HostBuffer` (None without a BIOS:
    the bus side of 0xe0000-0xfffff then reads all ones, as 0xc0000-0xdffff always does)."""

    def __init__(self, name, memory, ram, bios=None):
        super().__init__(name, vendor_id=0x8086, device_id=0x1237, class_code=0x060000, revision=0x02,
                         subsystem_vendor_id=0x1AF4, subsystem_id=0x1100)  # QEMU's, by which SeaBIOS knows it
        self.memory, self.ram, self.bios = memory, ram, bios
        for register in range(PAM0, PAM0 + 7):
            self.wmask[register] = 0x33 if register != PAM0 else 0x30
        self.wmask[SMRAM] = 0x78  # D_OPEN, D_CLS, D_LCK, G_SMRAME (no SMRAM behind them)
        self.config[SMRAM] = 0x02  # C_BASE_SEG: SMRAM at 0xa0000, as after reset
        self._windows = {}
        self._nothing = UnassignedMemory(0xC0000, 0x40000, memory.trace)
        self._applied = {}

    def config_written(self, offset, size):
        if offset <= PAM0 + 6 and offset + size > PAM0:
            self.apply_pam()

    def reset_function(self):
        self.apply_pam()

    def pam_mode(self, segment_base):
        for base, _, register, shift in SEGMENTS:
            if base == segment_base:
                return (self.config[register] >> shift) & 3
        raise ValueError(f"{segment_base:#x} is not a PAM segment")

    def apply_pam(self):
        """Lay each segment's window over RAM as its PAM bits say."""
        changed = False
        for base, size, register, shift in SEGMENTS:
            mode = (self.config[register] >> shift) & 3
            if self._applied.get(base) == mode:
                continue
            self._applied[base] = mode
            old = self._windows.pop(base, None)
            if old is not None:
                self.memory.remove(old, commit=False)
            window = self._window(base, size, mode)
            if window is not None:
                self._windows[base] = window
            changed = True
        if changed:
            self.memory.commit()

    def _window(self, base, size, mode):
        name = f"pam@{base:#x}"
        if mode == 3:
            return None  # RAM as it is
        if mode == 1:
            return self.memory.add(name, base, size, "rom", self.ram.address, priority=SHADOW_PRIORITY,
                                   offset=base, commit=False)
        bios_base = 0x100000 - (self.bios.size if self.bios is not None else 0)
        if mode == 0:
            if self.bios is not None and base >= bios_base:
                return self.memory.add(name, base, size, "rom", self.bios.address, priority=SHADOW_PRIORITY,
                                       offset=base - bios_base, commit=False)
            return self.memory.add(name, base, size, "mmio", self._nothing, priority=SHADOW_PRIORITY,
                                   offset=base - 0xC0000, commit=False)
        rom = None
        if self.bios is not None and base >= bios_base:
            rom = self.bios.data[base - bios_base:base - bios_base + size]
        device = _ReadBusWriteRam(name, self.ram, base, rom)
        return self.memory.add(name, base, size, "mmio", device, priority=SHADOW_PRIORITY, commit=False)

    def pci_post_load(self, version_id):
        super().pci_post_load(version_id)
        self._applied.clear()  # the windows follow the loaded PAM bits (applied after the load)

    VMSTATE = pci_vmstate("i440FX")

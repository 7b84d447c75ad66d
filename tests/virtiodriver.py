"""A virtio driver written against the device models directly (QEMU qtest style): config
cycles through the PCI bus, MMIO to the BARs, rings built in guest RAM.  What it does is
what Linux's virtio_pci_modern and virtio_ring do, step by step, so that a test can
also do what no driver should (a loop in a chain, a queue outside RAM)."""

import struct

from guestasm import bare_machine

from emu.devices import pci, virtio
from emu.devices.pci import PciBus

BAR4 = 0xE0000000
BAR1 = 0xE0010000
RING = 0x100000  # rings and buffers live above 1 MiB


class MsiLog:
    def __init__(self):
        self.messages = []

    def __call__(self, address, data):
        self.messages.append((address, data))


class Rig:
    """A bare machine with a PCI bus and ``device`` in slot 3, its BARs programmed."""

    def __init__(self, make_device, ram=16 << 20):
        self.machine = bare_machine(ram=ram)
        self.memory = self.machine.memory
        self.pirqs = {}
        self.bus = PciBus(self.memory, self.machine, lambda pirq, level: self.pirqs.__setitem__(pirq, level))
        self.msi = MsiLog()
        self.traces = []
        self.device = make_device(self.machine.ram, self.msi, lambda cat, msg: self.traces.append((cat, msg)),
                                  self.machine.clock)
        self.bus.add(self.device, slot=3)
        self.device.reset()
        self.devfn = 3 << 3
        self.cfg_write(pci.BAR0 + 4 * 4, 4, BAR4)
        self.cfg_write(pci.BAR0 + 4 * 5, 4, 0)
        self.cfg_write(pci.BAR0 + 4 * 1, 4, BAR1)
        self.cfg_write(pci.COMMAND, 2, pci.COMMAND_MEMORY | pci.COMMAND_MASTER)
        self.memory.commit()
        self.ram = self.machine.ram
        self.modern = self.memory.region_at(BAR4).target

    def settle(self, within_ns=1_000_000):
        """Let guest time pass while device timers (a NIC's transmit batch window) fire
        within ``within_ns``, polling the device after each, as the run loop would."""
        clock, end = self.machine.clock, self.machine.clock.now() + within_ns
        self.device.poll()
        while (deadline := clock.next_deadline()) is not None and deadline <= end:
            clock.warp_to(deadline)
            clock.run_due_timers()
            self.device.poll()

    def cfg_read(self, offset, size):
        return self.bus.config_access(0, self.devfn, offset, size)

    def cfg_write(self, offset, size, value):
        self.bus.config_access(0, self.devfn, offset, size, value)

    def common(self, offset, size, value=None):
        if value is None:
            return self.modern.mmio_read(virtio.COMMON_OFFSET + offset, size)
        self.modern.mmio_write(virtio.COMMON_OFFSET + offset, size, value)
        return None

    def device_config(self, offset, size):
        return self.modern.mmio_read(virtio.DEVICE_OFFSET + offset, size)

    def capabilities(self):
        """{cfg_type: (bar, offset, length)} from the vendor capabilities, as a driver finds them."""
        caps, offset = {}, self.cfg_read(pci.CAPABILITY_LIST, 1)
        while offset:
            if self.cfg_read(offset, 1) == pci.CAP_VENDOR:
                cfg_type, bar = self.cfg_read(offset + 3, 1), self.cfg_read(offset + 4, 1)
                caps[cfg_type] = (bar, self.cfg_read(offset + 8, 4), self.cfg_read(offset + 12, 4))
            offset = self.cfg_read(offset + 1, 1)
        return caps

    def setup(self, features, queue_sizes):
        """Reset, negotiate ``features`` (the device must accept them), set up the queues."""
        self.common(0x14, 1, 0)
        self.common(0x14, 1, virtio.ACKNOWLEDGE | virtio.DRIVER)
        for select in (0, 1):
            self.common(0x08, 4, select)
            self.common(0x0C, 4, (features >> (32 * select)) & 0xFFFFFFFF)
        self.common(0x14, 1, virtio.ACKNOWLEDGE | virtio.DRIVER | virtio.FEATURES_OK)
        assert self.common(0x14, 1) & virtio.FEATURES_OK, "the device refused the features"
        queues = []
        for index, size in enumerate(queue_sizes):
            base = RING + index * 0x10000
            queues.append(DriverQueue(self, index, size, base))
        self.common(0x14, 1, virtio.ACKNOWLEDGE | virtio.DRIVER | virtio.FEATURES_OK | virtio.DRIVER_OK)
        return queues


class DriverQueue:
    """The driver's side of a split queue: descriptor table, avail ring, used ring."""

    def __init__(self, rig, index, size, base):
        self.rig, self.index, self.size = rig, index, size
        self.desc, self.avail, self.used = base, base + 16 * size, base + 0x8000
        self.next_desc = 0
        self.avail_idx = 0
        self.last_used = 0
        rig.common(0x16, 2, index)
        rig.common(0x18, 2, size)
        rig.common(0x20, 8, self.desc)
        rig.common(0x28, 8, self.avail)
        rig.common(0x30, 8, self.used)
        rig.common(0x1C, 2, 1)

    def descriptor(self, index, address, length, flags, nxt=0):
        self.rig.ram.write(self.desc + 16 * index, struct.pack("<QIHH", address, length, flags, nxt))

    def add_chain(self, buffers):
        """``buffers``: [(address, length, device_writable)]; returns the head index."""
        head = self.next_desc
        for i, (address, length, writable) in enumerate(buffers):
            last = i == len(buffers) - 1
            flags = (0 if last else virtio.DESC_NEXT) | (virtio.DESC_WRITE if writable else 0)
            self.descriptor(self.next_desc, address, length, flags, (self.next_desc + 1) % self.size)
            self.next_desc = (self.next_desc + 1) % self.size
        self.make_available(head)
        return head

    def make_available(self, head):
        self.rig.ram.write(self.avail + 4 + 2 * (self.avail_idx % self.size), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.rig.ram.write(self.avail + 2, struct.pack("<H", self.avail_idx))

    def kick(self):
        self.rig.modern.mmio_write(virtio.NOTIFY_OFFSET + virtio.NOTIFY_MULTIPLIER * self.index, 2, self.index)
        self.rig.settle()

    def used_entries(self):
        """New (id, len) used elements since the last call."""
        used_idx = struct.unpack("<H", self.rig.ram.read(self.used + 2, 2))[0]
        out = []
        while self.last_used != used_idx:
            slot = self.used + 4 + 8 * (self.last_used % self.size)
            out.append(struct.unpack("<II", self.rig.ram.read(slot, 8)))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

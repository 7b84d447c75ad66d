"""virtio 1.x over PCI, modern only (virtio spec 1.1, 4.1), with split virtqueues (2.6).

The transport, as QEMU's virtio-pci lays it out with disable-legacy=on: device ID 0x1040 +
the virtio device type, revision 1; BAR 4, 64-bit memory, holds the common configuration
(0x0000), the ISR status (0x1000), the device configuration (0x2000) and the queue notify
area (0x3000, 4 bytes per queue); BAR 1 holds the MSI-X table (0x000) and its pending bits
(0x800).  Vendor-specific capabilities point the driver at each structure, and a PCI
configuration access capability lets it reach them through configuration space.

Interrupts: with MSI-X enabled, a queue or a configuration change sends the message of the
vector the driver chose (none for VIRTIO_MSI_NO_VECTOR; a masked vector sets its pending
bit and sends when unmasked); otherwise the ISR bits are set and INTx is asserted until
the driver reads the ISR.

The device never trusts the driver: a queue address or descriptor outside RAM, a chain
longer than the queue (a loop), a nested or malformed indirect table, or a queue size that
is not a power of two make the device set DEVICE_NEEDS_RESET and raise a configuration
interrupt (virtio 1.1, 2.1.1), traced under ``-d guest_errors``; it then ignores its
queues until the driver resets it.  Work is done between CPU slices: a notify write
only marks the queue and ends the slice, and ``poll()`` processes it.
"""

import struct

from emu.devices.pci import CAP_MSIX, CAP_VENDOR, PciDevice
from emu.errors import StateError
from emu.state.vmstate import U8, U16, U32, U64, Array, Bytes, VMStateDescription

# device status (2.1)
ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK, NEEDS_RESET, FAILED = 1, 2, 4, 8, 64, 128
# feature bits (6)
F_INDIRECT_DESC, F_VERSION_1 = 1 << 28, 1 << 32
# descriptor flags (2.6.5)
DESC_NEXT, DESC_WRITE, DESC_INDIRECT = 1, 2, 4
AVAIL_NO_INTERRUPT = 1
USED_NO_NOTIFY = 1         # virtq_used.flags: the device asks the driver not to kick (2.7.10)
NO_VECTOR = 0xFFFF
# capability types (4.1.4)
CAP_COMMON, CAP_NOTIFY, CAP_ISR, CAP_DEVICE, CAP_PCI_CFG = 1, 2, 3, 4, 5
COMMON_OFFSET, ISR_OFFSET, DEVICE_OFFSET, NOTIFY_OFFSET = 0x0000, 0x1000, 0x2000, 0x3000
NOTIFY_MULTIPLIER = 4
MODERN_BAR, MSIX_BAR = 4, 1
MODERN_BAR_SIZE = 0x4000
MSIX_PBA_OFFSET = 0x800
VIRTIO_VENDOR = 0x1AF4
QEMU_SUBSYSTEM = 0x1100
DESC = struct.Struct("<QIHH")
USED_ELEM = struct.Struct("<II")


class VirtioError(Exception):
    """The driver broke the protocol; the device needs a reset."""


class Virtqueue:
    """One split virtqueue: where the driver put it, and the device's positions in it."""

    def __init__(self, max_size):
        self.max_size = max_size
        self.reset()

    def reset(self):
        self.size = self.max_size
        self.enabled = False
        self.desc = self.avail = self.used = 0
        self.last_avail_idx = 0  # the next avail ring entry the device takes
        self.used_idx = 0        # the device's used ring index
        self.msix_vector = NO_VECTOR
        self.notified = False    # kicked since last processed (host side)

    def check(self, ram):
        if self.size == 0 or self.size & (self.size - 1) or self.size > self.max_size:
            raise VirtioError(f"queue size {self.size} is not a power of two up to {self.max_size}")
        for name, address, length, align in (("descriptor table", self.desc, 16 * self.size, 16),
                                             ("driver area", self.avail, 6 + 2 * self.size, 2),
                                             ("device area", self.used, 6 + 8 * self.size, 4)):
            if address % align or address + length > ram.size:
                raise VirtioError(f"{name} at {address:#x} (+{length:#x}) is outside RAM or misaligned")

    def available(self, ram):
        """How many chains the driver has made available that the device has not taken."""
        avail_idx = int.from_bytes(ram.read(self.avail + 2, 2), "little")
        pending = (avail_idx - self.last_avail_idx) & 0xFFFF
        if pending > self.size:
            raise VirtioError(f"avail idx {avail_idx} is {pending} entries ahead of {self.last_avail_idx}")
        return pending

    def pop(self, ram, indirect_allowed):
        """The next chain: (head, [(address, length, device_writable), ...]), or None."""
        if not self.available(ram):
            return None
        slot = self.avail + 4 + 2 * (self.last_avail_idx % self.size)
        head = int.from_bytes(ram.read(slot, 2), "little")
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        return head, self._walk(ram, head, indirect_allowed)

    def _walk(self, ram, head, indirect_allowed):
        buffers, table, table_size, index, seen = [], self.desc, self.size, head, 0
        in_indirect = False
        while True:
            if index >= table_size:
                raise VirtioError(f"descriptor index {index} outside a table of {table_size}")
            seen += 1
            if seen > table_size:
                raise VirtioError(f"descriptor chain from {head} loops (longer than its table)")
            address, length, flags, nxt = DESC.unpack_from(ram.view, table + 16 * index)  # table checked
            if flags & DESC_INDIRECT:
                if not indirect_allowed or in_indirect or flags & DESC_NEXT:
                    raise VirtioError("indirect descriptor not negotiated, nested, or chained")
                if length % 16 or length == 0 or address + length > ram.size:
                    raise VirtioError(f"indirect table at {address:#x} of {length} bytes is malformed")
                table, table_size, index, seen, in_indirect = address, length // 16, 0, 0, True
                continue
            if address + length > ram.size:
                raise VirtioError(f"buffer at {address:#x} (+{length:#x}) is outside RAM")
            buffers.append((address, length, bool(flags & DESC_WRITE)))
            if not flags & DESC_NEXT:
                return buffers
            index = nxt

    def push(self, ram, done):
        """Return chains to the driver: the used elements of ``done`` [(head, bytes written)],
        then the index once (2.6.8; a device may publish a batch with one index update)."""
        for head, written in done:
            ram.write(self.used + 4 + 8 * (self.used_idx % self.size), USED_ELEM.pack(head, written))
            self.used_idx = (self.used_idx + 1) & 0xFFFF
        ram.write(self.used + 2, self.used_idx.to_bytes(2, "little"))

    def suppress_kicks(self, ram, suppress):
        """Set or clear VIRTQ_USED_F_NO_NOTIFY (only a hint: a driver may kick anyway)."""
        ram.write(self.used, (USED_NO_NOTIFY if suppress else 0).to_bytes(2, "little"))

    def wants_interrupt(self, ram):
        return not int.from_bytes(ram.read(self.avail, 2), "little") & AVAIL_NO_INTERRUPT



def read_buffers(ram, buffers):
    """The bytes of the driver-readable part of a chain."""
    view = ram.view  # the chain's buffers were checked against RAM when it was walked
    return b"".join(view[address:address + length] for address, length, writable in buffers if not writable)


def write_buffers(ram, buffers, data):
    """Scatter ``data`` over the device-writable part of a chain; returns the bytes written."""
    done = 0
    for address, length, writable in buffers:
        if not writable or done >= len(data):
            continue
        piece = data[done:done + length]
        ram.write(address, piece)
        done += len(piece)
    return done


def writable_size(buffers):
    return sum(length for _, length, writable in buffers if writable)


class _MsixTable:
    """The MSI-X table and pending bits (PCI 3.0, 6.8.2), as BAR 1's device."""

    def __init__(self, owner, vectors):
        self.owner = owner
        self.entries = bytearray(16 * vectors)
        self.pending = bytearray((vectors + 63) // 64 * 8)
        for vector in range(vectors):
            self.entries[16 * vector + 12] = 1  # masked at reset

    def mmio_read(self, offset, size):
        if offset < len(self.entries):
            return int.from_bytes(self.entries[offset:offset + size], "little")
        if MSIX_PBA_OFFSET <= offset < MSIX_PBA_OFFSET + len(self.pending):
            start = offset - MSIX_PBA_OFFSET
            return int.from_bytes(self.pending[start:start + size], "little")
        return 0

    def mmio_write(self, offset, size, value):
        if offset >= len(self.entries):
            return  # the pending bits are read only
        vector = offset // 16
        was_masked = self.masked(vector)
        self.entries[offset:offset + size] = value.to_bytes(size, "little")
        self.entries[16 * vector + 12] &= 1  # vector control: only the mask bit is defined
        self.entries[16 * vector + 13:16 * vector + 16] = b"\0\0\0"
        if was_masked and not self.masked(vector):
            self.owner.msix_unmasked(vector)

    def masked(self, vector):
        return bool(self.entries[16 * vector + 12] & 1)

    def message(self, vector):
        address_lo, address_hi, data = struct.unpack_from("<III", self.entries, 16 * vector)
        return address_lo | (address_hi << 32), data


class VirtioPciDevice(PciDevice):
    """The transport; subclasses are the virtio devices (``DEVICE_TYPE``, their feature
    bits, their configuration bytes and what a queue notification does)."""

    DEVICE_TYPE = 0
    CLASS_CODE = 0xFF0000

    def __init__(self, name, ram, queue_sizes, device_features, msi, msix_vectors, trace=None,
                 request_stop=None):
        super().__init__(name, vendor_id=VIRTIO_VENDOR, device_id=0x1040 + self.DEVICE_TYPE,
                         class_code=self.CLASS_CODE, revision=1, subsystem_vendor_id=VIRTIO_VENDOR,
                         subsystem_id=QEMU_SUBSYSTEM, interrupt_pin=1)
        self.ram = ram
        self.msi = msi  # callable(address, data): an MSI write reaches the local APIC
        self.trace = trace
        self.request_stop = request_stop or (lambda: None)
        self.host_features = F_VERSION_1 | F_INDIRECT_DESC | device_features
        self.queues = [Virtqueue(size) for size in queue_sizes]
        self.msix = _MsixTable(self, msix_vectors)
        self.msix_vectors = msix_vectors
        self.add_bar(MSIX_BAR, 0x1000, "mem32", target=self.msix)
        self.add_bar(MODERN_BAR, MODERN_BAR_SIZE, "mem64", target=_ModernBar(self), prefetchable=True)
        self._add_virtio_caps()
        self._msix_cap = self.add_capability(CAP_MSIX, struct.pack("<HII", msix_vectors - 1, MSIX_BAR,
                                                                   MSIX_PBA_OFFSET | MSIX_BAR))
        self.wmask[self._msix_cap + 3] = 0xC0  # message control: enable, function mask
        self.reset_transport()

    def _add_virtio_caps(self):
        for cfg_type, offset, length, extra in ((CAP_COMMON, COMMON_OFFSET, 0x38, b""),
                                                (CAP_ISR, ISR_OFFSET, 1, b""),
                                                (CAP_DEVICE, DEVICE_OFFSET, 0x1000, b""),
                                                (CAP_NOTIFY, NOTIFY_OFFSET, NOTIFY_MULTIPLIER * len(self.queues),
                                                 struct.pack("<I", NOTIFY_MULTIPLIER))):
            body = struct.pack("<BBBBBBII", 16 + len(extra), cfg_type, MODERN_BAR, 0, 0, 0, offset, length) + extra
            self.add_capability(CAP_VENDOR, body)
        body = struct.pack("<BBBBBBII", 20, CAP_PCI_CFG, 0, 0, 0, 0, 0, 0) + b"\0\0\0\0"
        self._pci_cfg_cap = self.add_capability(CAP_VENDOR, body)
        cap = self._pci_cfg_cap
        self.wmask[cap + 4] = 0xFF  # bar
        self.wmask[cap + 8:cap + 20] = b"\xff" * 12  # offset, length, data

    # ------------------------------------------------------------------ reset and features
    def reset_transport(self):
        self.device_feature_select = self.driver_feature_select = 0
        self.driver_features = 0
        self.status = 0
        self.config_generation = 0
        self.queue_select = 0
        self.msix_config = NO_VECTOR
        self.isr = 0
        for queue in self.queues:
            queue.reset()
        self.set_irq(0)
        self.reset_device()

    def reset_function(self):
        self.msix.__init__(self, self.msix_vectors)
        self.reset_transport()

    def reset_device(self):
        """Subclasses drop their own state (a driver wrote 0 to device_status)."""

    def negotiated(self, feature):
        return bool(self.driver_features & feature)

    def _write_status(self, value):
        if value == 0:
            self.reset_transport()
            return
        if value & FEATURES_OK and not self.status & FEATURES_OK:
            offered = self.host_features
            if self.driver_features & ~offered or not self.driver_features & F_VERSION_1:
                value &= ~FEATURES_OK  # 3.1.1: the device refuses the set; FEATURES_OK reads back 0
        self.status = value | (self.status & NEEDS_RESET)

    # ------------------------------------------------------------------ the common configuration
    def common_read(self, offset, size):
        q = self.queues[self.queue_select] if self.queue_select < len(self.queues) else None
        registers = {
            0x00: (4, self.device_feature_select),
            0x04: (4, (self.host_features >> (32 * self.device_feature_select)) & 0xFFFFFFFF
                   if self.device_feature_select < 2 else 0),
            0x08: (4, self.driver_feature_select),
            0x0C: (4, (self.driver_features >> (32 * self.driver_feature_select)) & 0xFFFFFFFF
                   if self.driver_feature_select < 2 else 0),
            0x10: (2, self.msix_config), 0x12: (2, len(self.queues)), 0x14: (1, self.status),
            0x15: (1, self.config_generation), 0x16: (2, self.queue_select),
            0x18: (2, q.size if q else 0), 0x1A: (2, q.msix_vector if q else NO_VECTOR),
            0x1C: (2, int(q.enabled) if q else 0), 0x1E: (2, self.queue_select if q else 0),
            0x20: (8, q.desc if q else 0), 0x28: (8, q.avail if q else 0), 0x30: (8, q.used if q else 0),
        }
        return _read_register(registers, offset, size)

    def common_write(self, offset, size, value):
        q = self.queues[self.queue_select] if self.queue_select < len(self.queues) else None
        if offset == 0x00:
            self.device_feature_select = value
        elif offset == 0x08:
            self.driver_feature_select = value
        elif offset == 0x0C and self.driver_feature_select < 2 and not self.status & FEATURES_OK:
            shift = 32 * self.driver_feature_select
            self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | ((value & 0xFFFFFFFF) << shift)
        elif offset == 0x10:
            self.msix_config = value & 0xFFFF if value < self.msix_vectors or value == NO_VECTOR else NO_VECTOR
        elif offset == 0x14:
            self._write_status(value & 0xFF)
        elif offset == 0x16:
            self.queue_select = value & 0xFFFF
        elif q is not None and not q.enabled:
            self._queue_write(q, offset, size, value)
        elif q is not None and offset == 0x1A:
            q.msix_vector = value if value < self.msix_vectors or value == NO_VECTOR else NO_VECTOR

    def _queue_write(self, q, offset, size, value):
        if offset == 0x18:
            q.size = value & 0xFFFF
        elif offset == 0x1A:
            q.msix_vector = value if value < self.msix_vectors or value == NO_VECTOR else NO_VECTOR
        elif offset == 0x1C and value == 1:
            try:
                q.check(self.ram)
            except VirtioError as e:
                self.broken(f"queue {self.queue_select}: {e}")
                return
            q.enabled = True
        elif offset in (0x20, 0x24, 0x28, 0x2C, 0x30, 0x34):
            name = {0x20: "desc", 0x28: "avail", 0x30: "used"}[offset & ~7]
            old = getattr(q, name)
            if size == 8:
                new = value
            elif offset & 4:
                new = (old & 0xFFFFFFFF) | ((value & 0xFFFFFFFF) << 32)
            else:
                new = (old & ~0xFFFFFFFF) | (value & 0xFFFFFFFF)
            setattr(q, name, new)

    # ------------------------------------------------------------------ notifications and interrupts
    def notify(self, index):
        if index < len(self.queues):
            self.queues[index].notified = True
            self.request_stop()  # processed between slices (poll)

    def poll(self):
        if self.status & NEEDS_RESET or not self.status & DRIVER_OK:
            return
        for index, queue in enumerate(self.queues):
            if queue.notified or self.wants_polling(index):
                queue.notified = False
                if queue.enabled:
                    try:
                        self.process_queue(index, queue)
                    except VirtioError as e:
                        self.broken(f"queue {index}: {e}")
                        return

    def wants_polling(self, index):
        """Subclasses with host-side input (a NIC's received frames) say so."""
        return False

    def process_queue(self, index, queue):
        raise NotImplementedError

    def complete(self, queue, head, written):
        """A chain is done: give it back and interrupt the driver unless it asked not to be."""
        self.complete_many(queue, [(head, written)])

    def complete_many(self, queue, done):
        """Chains [(head, written)] done in one pass: one index update, at most one interrupt."""
        if not done:
            return
        queue.push(self.ram, done)
        if queue.wants_interrupt(self.ram):
            self.interrupt(queue.msix_vector, isr_bit=1)

    def interrupt(self, vector, isr_bit):
        if self.msix_enabled():
            if vector == NO_VECTOR or vector >= self.msix_vectors:
                return
            if self.msix_function_masked() or self.msix.masked(vector):
                self.msix.pending[vector // 8] |= 1 << (vector % 8)
                return
            self.msi(*self.msix.message(vector))
            return
        self.isr |= isr_bit
        if not self.intx_level:  # already asserted: the line stays up until the ISR read
            self.set_irq(1)

    def config_changed(self):
        self.config_generation = (self.config_generation + 1) & 0xFF
        self.interrupt(self.msix_config, isr_bit=2)

    def msix_enabled(self):
        return bool(self.config[self._msix_cap + 3] & 0x80)

    def msix_function_masked(self):
        return bool(self.config[self._msix_cap + 3] & 0x40)

    def msix_unmasked(self, vector):
        if self.msix.pending[vector // 8] & (1 << (vector % 8)) and not self.msix_function_masked():
            self.msix.pending[vector // 8] &= ~(1 << (vector % 8))
            self.msi(*self.msix.message(vector))

    def config_written(self, offset, size):
        cap = self._msix_cap
        if offset <= cap + 3 < offset + size and self.msix_enabled() and not self.msix_function_masked():
            for vector in range(self.msix_vectors):
                if not self.msix.masked(vector):
                    self.msix_unmasked(vector)

    def read_isr(self):
        value, self.isr = self.isr, 0
        self.set_irq(0)
        return value

    def broken(self, reason):
        """The driver broke the protocol: NEEDS_RESET and a configuration interrupt."""
        if self.trace is not None:
            self.trace("guest_errors", f"{self.name}: {reason}; the device needs a reset")
        self.status |= NEEDS_RESET
        self.config_changed()

    # ------------------------------------------------------------------ PCI configuration access capability
    def config_read(self, offset, size):
        cap = self._pci_cfg_cap
        if cap + 16 <= offset < cap + 20:
            self.config[cap + 16:cap + 20] = self._cfg_window(None).to_bytes(4, "little")
        return super().config_read(offset, size)

    def config_write(self, offset, size, value):
        super().config_write(offset, size, value)
        cap = self._pci_cfg_cap
        if cap + 16 <= offset < cap + 20:
            self._cfg_window(int.from_bytes(self.config[cap + 16:cap + 20], "little"))

    def _cfg_window(self, value):
        """virtio_pci_cfg_cap (4.1.4.7): BAR, offset and length name an access to do."""
        cap = self._pci_cfg_cap
        bar = self.config[cap + 4]
        offset, length = struct.unpack_from("<II", self.config, cap + 8)
        if bar != MODERN_BAR or length not in (1, 2, 4) or offset % length or offset + length > MODERN_BAR_SIZE:
            return 0
        target = self.bars[MODERN_BAR].target
        if value is None:
            return target.mmio_read(offset, length)
        target.mmio_write(offset, length, value & ((1 << (8 * length)) - 1))
        return 0

    # ------------------------------------------------------------------ device configuration
    def device_config(self):
        """The device-specific configuration bytes (virtio 5.x)."""
        return b""

    def device_config_write(self, offset, data):
        """Most fields are read only; subclasses accept what their spec lets drivers write."""

    # ------------------------------------------------------------------ state
    def transport_post_load(self, version_id):
        if self.queue_select > 0xFFFF or self.status > 0xFF:
            raise StateError(f"{self.name}: transport registers out of range")
        for index, queue in enumerate(self.queues):
            if queue.enabled:
                try:
                    queue.check(self.ram)
                except VirtioError as e:
                    raise StateError(f"{self.name}: queue {index}: {e}") from None
                # A kick the driver made before the save may not have been processed (a save
                # does no device work): take it as given; a spurious kick finds nothing new.
                queue.notified = True

    @property
    def queue_state(self):
        return [value for q in self.queues for value in (q.size, int(q.enabled), q.desc, q.avail, q.used,
                                                           q.last_avail_idx, q.used_idx, q.msix_vector)]

    @queue_state.setter
    def queue_state(self, values):
        for index, q in enumerate(self.queues):
            (q.size, enabled, q.desc, q.avail, q.used, q.last_avail_idx, q.used_idx,
             q.msix_vector) = values[8 * index:8 * index + 8]
            q.enabled = bool(enabled)
            if q.size > 0xFFFF or q.last_avail_idx > 0xFFFF or q.used_idx > 0xFFFF or q.msix_vector > 0xFFFF:
                raise StateError(f"{self.name}: queue {index}: 16-bit field out of range")

    @property
    def msix_entries(self):
        return bytes(self.msix.entries)

    @msix_entries.setter
    def msix_entries(self, value):
        self.msix.entries[:] = value

    @property
    def msix_pending(self):
        return bytes(self.msix.pending)

    @msix_pending.setter
    def msix_pending(self, value):
        self.msix.pending[:] = value


class _ModernBar:
    """BAR 4: the common configuration, ISR, device configuration and notify areas."""

    def __init__(self, device):
        self.device = device

    def mmio_read(self, offset, size):
        device = self.device
        if COMMON_OFFSET <= offset < COMMON_OFFSET + 0x38:
            return device.common_read(offset - COMMON_OFFSET, size)
        if offset == ISR_OFFSET:
            return device.read_isr()
        if DEVICE_OFFSET <= offset < DEVICE_OFFSET + 0x1000:
            data = device.device_config()
            start = offset - DEVICE_OFFSET
            return int.from_bytes(data[start:start + size].ljust(size, b"\0"), "little")
        return 0

    def mmio_write(self, offset, size, value):
        device = self.device
        if COMMON_OFFSET <= offset < COMMON_OFFSET + 0x38:
            device.common_write(offset - COMMON_OFFSET, size, value)
        elif DEVICE_OFFSET <= offset < DEVICE_OFFSET + 0x1000:
            device.device_config_write(offset - DEVICE_OFFSET, value.to_bytes(size, "little"))
        elif NOTIFY_OFFSET <= offset < NOTIFY_OFFSET + NOTIFY_MULTIPLIER * len(device.queues):
            device.notify((offset - NOTIFY_OFFSET) // NOTIFY_MULTIPLIER)


def _read_register(registers, offset, size):
    """A read of ``size`` bytes at ``offset`` of a little-endian register file."""
    for start, (width, value) in registers.items():
        if start <= offset < start + width:
            shift = 8 * (offset - start)
            return (value >> shift) & ((1 << (8 * size)) - 1)
    return 0


def virtio_vmstate(name, queues, vectors, device_fields=(), post_load=None, version_id=1):
    """A virtio PCI device's state (QEMU's virtio-pci + VirtIODevice sections in one):
    configuration space and INTx, the transport registers, every queue (eight numbers
    each: size, enabled, the three areas, last avail index, used index, MSI-X vector), the
    MSI-X table and pending bits, then the device's own fields."""
    def check(device, version_id):
        device.pci_post_load(version_id)
        device.transport_post_load(version_id)
        if post_load is not None:
            post_load(device, version_id)

    return VMStateDescription(name, version_id=version_id, minimum_version_id=1, fields=[
        Bytes("config", 256), U8("intx_level"),
        U32("device_feature_select"), U32("driver_feature_select"), U64("driver_features"), U8("status"),
        U8("config_generation"), U16("queue_select"), U16("msix_config"), U8("isr"),
        Array("queue_state", U64, 8 * queues), Bytes("msix_entries", 16 * vectors),
        Bytes("msix_pending", (vectors + 63) // 64 * 8), *device_fields,
    ], post_load=check)

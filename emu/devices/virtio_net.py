"""virtio-net-pci (virtio spec 1.1, 5.1): a NIC with one receive and one transmit queue.

Every frame travels behind the 12-byte virtio_net_hdr_v1 (VERSION_1 makes num_buffers part
of it).  Offered features: MAC (the address in the configuration space) and STATUS (link
up), and, when the backend can take them (a tap: ``offloads``), transmit checksum and TCP
segmentation offload (CSUM, HOST_TSO4, HOST_TSO6), as QEMU offers them with a vnet-header
tap: the guest then sends TCP segments of up to 64 KiB with the checksum left to fill, and
the host kernel cuts and completes them.  Received frames are always whole and checksummed.
Transmit: each chain's bytes after the header go to the backend, with the header when an
offload was negotiated.  Transmissions are batched as by QEMU's virtio-net (its tx=timer
mode; its default bottom half does the same from another thread): a kick turns further
kicks off (VIRTQ_USED_F_NO_NOTIFY) and arms a timer of ``TX_BATCH_NS`` of guest time; when
it fires, one pass sends everything the driver queued meanwhile, with one interrupt, and
the timer goes on while there is something to send.  The guest thus goes on running
instead of stopping at every frame: a 50 MB download over a tap runs 2-3 times faster.
Receive: frames from the backend wait in a bounded host-side queue until the driver gives
buffers; a frame larger than the buffer it lands in is dropped and counted,
as is one that arrives while the queue is full (a NIC's overrun).  The host-side queue is
not guest state: a snapshot or checkpoint carries what the guest already has.
"""

import collections
import struct

from emu.devices.virtio import VirtioPciDevice, read_buffers, virtio_vmstate, writable_size, write_buffers
from emu.errors import ConfigError
from emu.state.vmstate import TimerField

VIRTIO_ID_NET = 1
F_CSUM, F_MAC, F_HOST_TSO4, F_HOST_TSO6, F_STATUS = 1 << 0, 1 << 5, 1 << 11, 1 << 12, 1 << 16
TX_OFFLOADS = F_CSUM | F_HOST_TSO4 | F_HOST_TSO6
STATUS_LINK_UP = 1
HEADER_SIZE = 12
RX, TX = 0, 1
QUEUE_SIZE = 256
HOST_QUEUE = 256  # frames held for a driver that gives no buffers
#: How long kicks stay off after one: the transmit batch window, in guest ns (QEMU's
#: tx=timer default is 150 us; over a tap 25-50 us gave the best figures here)
TX_BATCH_NS = 25_000


def parse_mac(text):
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 and all(c in "0123456789abcdefABCDEF" for c in p) for p in parts):
        raise ConfigError(f"mac={text!r}: expected six hex bytes like 52:54:00:12:34:56")
    mac = bytes(int(p, 16) for p in parts)
    if mac[0] & 1:
        raise ConfigError(f"mac={text!r} is a multicast address")
    return mac


class VirtioNet(VirtioPciDevice):
    """``backend``: ``send(frame)``, and ``offloads`` (whether it also takes
    ``send_offloaded(header, frame)``, see emu.netdev); the board hands received frames to
    :meth:`receive`."""

    DEVICE_TYPE = VIRTIO_ID_NET
    CLASS_CODE = 0x020000

    def __init__(self, name, ram, backend, mac, msi, clock, trace=None, request_stop=None):
        self.pending = collections.deque()
        self.tx_timer = clock.new_timer(self._tx_batch_due, f"{name}.tx-batch")
        offloads = TX_OFFLOADS if backend.offloads else 0
        super().__init__(name, ram, [QUEUE_SIZE, QUEUE_SIZE], F_MAC | F_STATUS | offloads, msi, msix_vectors=3,
                         trace=trace, request_stop=request_stop)
        self.backend = backend
        self._taken = getattr(backend, "frame_taken", None)  # a backend that counts what the guest took
        self.mac = bytes(mac)
        self.stats = {"rx": 0, "tx": 0, "rx_dropped": 0, "rx_too_big": 0}

    def device_config(self):
        """5.1.4: mac, status, max_virtqueue_pairs."""
        return self.mac + struct.pack("<HH", STATUS_LINK_UP, 1)

    def reset_device(self):
        self.pending.clear()
        self.tx_timer.cancel()

    def notify(self, index):
        """A transmit kick starts a batch window instead of stopping the guest."""
        if index != TX:
            super().notify(index)
            return
        queue = self.queues[TX]
        if queue.enabled and not self.tx_timer.armed:
            queue.suppress_kicks(self.ram, True)
            self.tx_timer.arm_in(TX_BATCH_NS)

    def _tx_batch_due(self):
        self.queues[TX].notified = True  # poll(), right after the timers, sends the batch

    def _end_of_transmit_pass(self, queue, sent):
        """Keep the window open while frames come; close it (kicks on) after an empty pass."""
        if sent:
            self.tx_timer.arm_in(TX_BATCH_NS)
            return
        queue.suppress_kicks(self.ram, False)
        if queue.available(self.ram):  # queued while kicks were off, after the pass looked
            queue.suppress_kicks(self.ram, True)
            self.tx_timer.arm_in(TX_BATCH_NS)

    def receive(self, frames):
        """Frames from the wire (host side, between slices)."""
        for frame in frames:
            if len(self.pending) >= HOST_QUEUE:
                self.stats["rx_dropped"] += 1
                if self._taken is not None:
                    self._taken()
                continue
            self.pending.append(frame)

    def discard_received(self):
        """Forget the frames the driver has not taken yet (a COLO link re-sends its input
        from the position of the checkpoint just applied)."""
        self.pending.clear()

    def wants_polling(self, index):
        return index == RX and bool(self.pending)

    def process_queue(self, index, queue):
        if index == TX:
            self._transmit(queue)
        else:
            self._deliver(queue)

    def _transmit(self, queue):
        done = []  # given back together: one used index update and one interrupt per pass
        indirect, offloaded = self.negotiated(1 << 28), self.negotiated(TX_OFFLOADS)
        try:
            while (chain := queue.pop(self.ram, indirect)) is not None:
                head, buffers = chain
                data = read_buffers(self.ram, buffers)
                frame = data[HEADER_SIZE:]
                if frame:
                    self.stats["tx"] += 1
                    if offloaded:
                        self.backend.send_offloaded(data[:HEADER_SIZE - 2] + b"\0\0", frame)  # num_buffers: rx only
                    else:
                        self.backend.send(frame)
                done.append((head, 0))
        finally:
            self.complete_many(queue, done)
            self._end_of_transmit_pass(queue, bool(done))

    def _deliver(self, queue):
        header = bytes(10) + struct.pack("<H", 1)  # no offload; num_buffers = 1
        done, indirect = [], self.negotiated(1 << 28)
        try:
            while self.pending:
                chain = queue.pop(self.ram, indirect)
                if chain is None:
                    return  # no buffers yet: the frames wait (the driver kicks when it adds some)
                head, buffers = chain
                frame = self.pending.popleft()
                if self._taken is not None:
                    self._taken()
                if writable_size(buffers) < HEADER_SIZE + len(frame):
                    self.stats["rx_too_big"] += 1
                    done.append((head, 0))
                    continue
                self.stats["rx"] += 1
                done.append((head, write_buffers(self.ram, buffers, header + frame)))
        finally:
            self.complete_many(queue, done)

    @staticmethod
    def _post_load(device, version_id):
        if version_id < 2:  # from before transmit batching: no window open
            device.tx_timer.cancel()

    VMSTATE = virtio_vmstate("virtio-net", queues=2, vectors=3, device_fields=[TimerField("tx_timer", since=2)],
                             post_load=_post_load, version_id=2)

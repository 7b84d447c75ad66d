"""virtio-blk-pci (virtio spec 1.1, 5.2): a disk on one request queue.

A request is a chain: a 16-byte header the device reads (type, reserved, sector), data
buffers, and a status byte the device writes last.  Supported: IN (read), OUT (write),
FLUSH and GET_ID (the drive's serial, 20 bytes); anything else answers UNSUPP.  A request
outside the disk, or a write to a read-only drive, answers IOERR (QEMU's
virtio_blk_sect_range_ok and read-only checks); a chain without room for its header or
status breaks the device (virtio_error in QEMU).  Requests are done between CPU slices
with the backend's synchronous reads and writes, so none is ever in flight when the
machine's state is saved: a snapshot, a migration or a checkpoint never has a request to
restart.
"""

import struct

from emu.blockdev import guess_geometry
from emu.devices.virtio import VirtioError, VirtioPciDevice, read_buffers, virtio_vmstate, write_buffers

VIRTIO_ID_BLOCK = 2
F_SEG_MAX, F_GEOMETRY, F_RO, F_BLK_SIZE, F_FLUSH = 1 << 2, 1 << 4, 1 << 5, 1 << 6, 1 << 9
T_IN, T_OUT, T_FLUSH, T_GET_ID = 0, 1, 4, 8
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
SECTOR = 512
QUEUE_SIZE = 256
ID_BYTES = 20
HEADER = struct.Struct("<IIQ")


class VirtioBlk(VirtioPciDevice):
    """``drive`` is a block backend (emu.blockdev): read/write/flush, size, readonly, serial."""

    DEVICE_TYPE = VIRTIO_ID_BLOCK
    CLASS_CODE = 0x010000  # mass storage, SCSI controller: what QEMU's virtio-blk-pci reports

    def __init__(self, name, ram, drive, msi, trace=None, request_stop=None):
        features = F_SEG_MAX | F_GEOMETRY | F_BLK_SIZE | F_FLUSH | (F_RO if drive.readonly else 0)
        super().__init__(name, ram, [QUEUE_SIZE], features, msi, msix_vectors=2, trace=trace,
                         request_stop=request_stop)
        self.drive = drive
        self.geometry = guess_geometry(drive)  # what a BIOS's int 13h uses, as QEMU gives it
        self.requests = 0

    def device_config(self):
        """5.2.4: capacity, size_max, seg_max, geometry, blk_size, topology, writeback, num_queues."""
        cylinders, heads, sectors = self.geometry
        return struct.pack("<QIIHBBIBBHIBBH", self.drive.size // SECTOR, 0, QUEUE_SIZE - 2, cylinders, heads,
                           sectors, SECTOR, 0, 0, 0, 0, 0, 0, 1)

    def process_queue(self, index, queue):
        while True:
            chain = queue.pop(self.ram, self.negotiated(1 << 28))
            if chain is None:
                return
            head, buffers = chain
            written = self._request(buffers)
            self.complete(queue, head, written)

    def _request(self, buffers):
        """Do one request; returns the bytes written into the chain (data and status)."""
        header = read_buffers(self.ram, buffers)[:HEADER.size]
        writable = [b for b in buffers if b[2]]
        if len(header) < HEADER.size or not writable or writable[-1][1] < 1:
            raise VirtioError("request without a 16-byte header or a status byte")
        self.requests += 1
        kind, _, sector = HEADER.unpack(header)
        status_address = writable[-1][0] + writable[-1][1] - 1
        data_out = read_buffers(self.ram, buffers)[HEADER.size:]
        data_in = list(writable)
        last = data_in[-1]
        data_in[-1] = (last[0], last[1] - 1, True)  # the status byte is not data
        try:
            status, written = self._do(kind, sector, data_out, data_in)
        except OSError as e:  # the host's disk failed: the guest sees an I/O error
            if self.trace is not None:
                self.trace("guest_errors", f"{self.name}: {self.drive.path}: {e.strerror or e}")
            status, written = S_IOERR, 0
        self.ram.write(status_address, bytes([status]))
        return written + 1

    def _do(self, kind, sector, data_out, data_in):
        capacity = self.drive.size // SECTOR
        if kind == T_IN:
            length = sum(b[1] for b in data_in)
            if length % SECTOR or sector + length // SECTOR > capacity:
                return S_IOERR, 0
            return S_OK, write_buffers(self.ram, data_in, self.drive.read(sector * SECTOR, length))
        if kind == T_OUT:
            if self.drive.readonly or len(data_out) % SECTOR or sector + len(data_out) // SECTOR > capacity:
                return S_IOERR, 0
            self.drive.write(sector * SECTOR, data_out)
            return S_OK, 0
        if kind == T_FLUSH:
            self.drive.flush()
            return S_OK, 0
        if kind == T_GET_ID:
            serial = self.drive.serial.encode()[:ID_BYTES].ljust(ID_BYTES, b"\0")
            return S_OK, write_buffers(self.ram, data_in, serial)
        return S_UNSUPP, 0

    VMSTATE = virtio_vmstate("virtio-blk", queues=1, vectors=2)

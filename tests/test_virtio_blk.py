"""virtio-blk over modern virtio-pci, driven register by register (tests/virtiodriver.py),
and the PCI configuration space it sits in."""

import os
import struct

import pytest
from virtiodriver import BAR1, BAR4, Rig

from emu.blockdev import RawImage, guess_geometry, open_drive
from emu.devices import pci, virtio
from emu.devices.virtio_blk import F_FLUSH, F_RO, S_IOERR, S_OK, S_UNSUPP, T_FLUSH, T_GET_ID, T_IN, T_OUT, VirtioBlk
from emu.errors import ConfigError
from emu.state import machinestate

SECTOR = 512
FEATURES = virtio.F_VERSION_1 | F_FLUSH
DATA, HEADER_AT, STATUS_AT = 0x200000, 0x300000, 0x300100


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * (64 * SECTOR // 256))  # 64 sectors
    return path


def blk_rig(path, readonly=False, serial="emu-disk-1"):
    drive = RawImage(str(path), readonly=readonly, serial=serial)
    return Rig(lambda ram, msi, trace, clock: VirtioBlk("virtio-blk@03.0", ram, drive, msi, trace=trace)), drive


def request(rig, queue, kind, sector, data_buffers, status_writable=True):
    rig.ram.write(HEADER_AT, struct.pack("<IIQ", kind, 0, sector))
    rig.ram.write(STATUS_AT, b"\xee")
    chain = [(HEADER_AT, 16, False)] + data_buffers + [(STATUS_AT, 1, status_writable)]
    head = queue.add_chain(chain)
    queue.kick()
    return head


def test_a_request_kicked_before_a_save_is_done_after_the_load_and_not_by_the_save(image, tmp_path):
    """A save does no device work (a COLO checkpoint saves RAM first, so a request done in
    the save would leave the saved used ring behind the device); the load takes the pending
    kick as given, so the request is done where the state goes on."""
    rig, _ = blk_rig(image)
    rig.machine.devices.append(rig.device)
    (q,) = rig.setup(FEATURES, [256])
    rig.ram.write(HEADER_AT, struct.pack("<IIQ", T_IN, 0, 3))
    head = q.add_chain([(HEADER_AT, 16, False), (DATA, SECTOR, True), (STATUS_AT, 1, True)])
    rig.modern.mmio_write(virtio.NOTIFY_OFFSET, 2, 0)  # the kick, not yet processed
    saved = machinestate.save(rig.machine, "all")
    assert q.used_entries() == []
    copy = tmp_path / "copy.img"
    copy.write_bytes(image.read_bytes())
    other, _ = blk_rig(copy)
    other.machine.devices.append(other.device)
    machinestate.load(other.machine, machinestate.check(other.machine, saved), rollback=False)
    other.settle()
    used = struct.unpack("<HH", other.ram.read(q.used, 4))[1]
    assert used == 1 and other.ram.read(DATA, SECTOR) == image.read_bytes()[3 * SECTOR:4 * SECTOR]
    assert head == 0 and other.ram.read(STATUS_AT, 1)[0] == S_OK


def test_configuration_space_identifies_a_modern_virtio_block_device(image):
    rig, _ = blk_rig(image)
    assert rig.cfg_read(pci.VENDOR_ID, 2) == 0x1AF4 and rig.cfg_read(pci.DEVICE_ID, 2) == 0x1042
    assert rig.cfg_read(pci.REVISION, 1) == 1 and rig.cfg_read(pci.CLASS_PROG + 1, 2) == 0x0100
    assert rig.cfg_read(pci.INTERRUPT_PIN, 1) == 1
    assert rig.capabilities() == {virtio.CAP_COMMON: (4, 0x0000, 0x38), virtio.CAP_ISR: (4, 0x1000, 1),
                                  virtio.CAP_DEVICE: (4, 0x2000, 0x1000), virtio.CAP_NOTIFY: (4, 0x3000, 4),
                                  virtio.CAP_PCI_CFG: (0, 0, 0)}
    # BAR sizing as firmware does it: all ones, read back the size mask, restore
    rig.cfg_write(pci.BAR0 + 16, 4, 0xFFFFFFFF)
    assert rig.cfg_read(pci.BAR0 + 16, 4) == (~(0x4000 - 1) & 0xFFFFFFF0) | pci.BAR_MEM64 | pci.BAR_PREFETCH
    rig.cfg_write(pci.BAR0 + 16, 4, BAR4)
    assert rig.memory.region_at(BAR4 + 0x10).name.endswith("bar4")
    assert rig.memory.region_at(BAR1).name.endswith("bar1")


def test_the_command_register_decides_whether_bars_decode(image):
    rig, _ = blk_rig(image)
    rig.cfg_write(pci.COMMAND, 2, 0)
    rig.memory.commit()
    assert rig.memory.region_at(BAR4) is None
    rig.cfg_write(pci.COMMAND, 2, pci.COMMAND_MEMORY)
    rig.memory.commit()
    assert rig.memory.region_at(BAR4) is not None


def test_capacity_and_read_write_flush_get_id(image):
    rig, drive = blk_rig(image)
    assert rig.device_config(0, 8) == 64  # sectors
    assert rig.device_config(20, 4) == SECTOR  # blk_size
    assert (rig.device_config(16, 2), rig.device_config(18, 1), rig.device_config(19, 1)) == (2, 16, 63)
    (q,) = rig.setup(FEATURES, [256])
    # read sectors 2-3
    head = request(rig, q, T_IN, 2, [(DATA, 2 * SECTOR, True)])
    assert q.used_entries() == [(head, 2 * SECTOR + 1)]
    assert rig.ram.read(STATUS_AT, 1)[0] == S_OK
    assert rig.ram.read(DATA, 2 * SECTOR) == image.read_bytes()[2 * SECTOR:4 * SECTOR]
    # write sector 5, spread over two buffers
    rig.ram.write(DATA, b"\xaa" * 300 + b"\xbb" * 212)
    head = request(rig, q, T_OUT, 5, [(DATA, 300, False), (DATA + 300, 212, False)])
    assert q.used_entries() == [(head, 1)] and rig.ram.read(STATUS_AT, 1)[0] == S_OK
    assert image.read_bytes()[5 * SECTOR:6 * SECTOR] == b"\xaa" * 300 + b"\xbb" * 212
    request(rig, q, T_FLUSH, 0, [])
    assert rig.ram.read(STATUS_AT, 1)[0] == S_OK and drive.flushes == 1
    request(rig, q, T_GET_ID, 0, [(DATA, 20, True)])
    assert rig.ram.read(DATA, 20) == b"emu-disk-1".ljust(20, b"\0")
    request(rig, q, 99, 0, [])
    assert rig.ram.read(STATUS_AT, 1)[0] == S_UNSUPP


def test_out_of_range_and_read_only_requests_fail_with_ioerr(image):
    rig, _ = blk_rig(image, readonly=True)
    (q,) = rig.setup(FEATURES | F_RO, [256])
    request(rig, q, T_IN, 63, [(DATA, 2 * SECTOR, True)])  # crosses the end of the disk
    assert rig.ram.read(STATUS_AT, 1)[0] == S_IOERR
    before = image.read_bytes()
    request(rig, q, T_OUT, 0, [(DATA, SECTOR, False)])
    assert rig.ram.read(STATUS_AT, 1)[0] == S_IOERR and image.read_bytes() == before


def test_an_interrupt_reaches_the_driver_by_intx_then_by_msix(image):
    rig, _ = blk_rig(image)
    (q,) = rig.setup(FEATURES, [256])
    request(rig, q, T_IN, 0, [(DATA, SECTOR, True)])
    assert rig.pirqs == {(3 + 1 - 1) & 3: 1}  # slot 3, pin A: PIRQD
    assert rig.cfg_read(pci.STATUS, 2) & pci.STATUS_INTERRUPT
    assert rig.modern.mmio_read(virtio.ISR_OFFSET, 1) == 1  # reading acknowledges
    assert rig.pirqs[3] == 0 and rig.modern.mmio_read(virtio.ISR_OFFSET, 1) == 0
    # MSI-X: enable, program vector 1 for the queue
    cap = next(off for off in range(0x40, 0x100, 4) if rig.cfg_read(off, 1) == pci.CAP_MSIX)
    rig.cfg_write(cap + 2, 2, 0x8000)
    msix = rig.memory.region_at(BAR1).target
    msix.mmio_write(16, 4, 0xFEE00000)
    msix.mmio_write(24, 4, 0x41)
    rig.common(0x16, 2, 0)
    rig.common(0x1A, 2, 1)
    assert rig.common(0x1A, 2) == 1
    request(rig, q, T_IN, 0, [(DATA, SECTOR, True)])
    assert rig.msi.messages == []  # the vector is masked at reset: pending
    assert msix.mmio_read(0x800, 1) == 0b10
    msix.mmio_write(28, 4, 0)  # unmask: the pending message goes out
    assert rig.msi.messages == [(0xFEE00000, 0x41)] and msix.mmio_read(0x800, 1) == 0
    request(rig, q, T_IN, 0, [(DATA, SECTOR, True)])
    assert rig.msi.messages[-1] == (0xFEE00000, 0x41) and len(rig.msi.messages) == 2
    assert rig.pirqs[3] == 0  # no INTx while MSI-X is on


def test_features_the_device_does_not_offer_are_refused(image):
    rig, _ = blk_rig(image)
    rig.common(0x14, 1, virtio.ACKNOWLEDGE | virtio.DRIVER)
    rig.common(0x08, 4, 0)
    rig.common(0x0C, 4, 1 << 0)  # VIRTIO_BLK_F_BARRIER: legacy, not offered
    rig.common(0x08, 4, 1)
    rig.common(0x0C, 4, 1)
    rig.common(0x14, 1, virtio.ACKNOWLEDGE | virtio.DRIVER | virtio.FEATURES_OK)
    assert not rig.common(0x14, 1) & virtio.FEATURES_OK


@pytest.mark.parametrize("mistake", ["loop", "outside RAM", "queue outside RAM", "queue size", "no status"])
def test_a_broken_driver_breaks_the_device_not_the_emulator(image, mistake):
    rig, _ = blk_rig(image)
    if mistake in ("queue outside RAM", "queue size"):
        rig.common(0x14, 1, virtio.ACKNOWLEDGE | virtio.DRIVER)
        rig.common(0x16, 2, 0)
        if mistake == "queue size":
            rig.common(0x18, 2, 100)
        else:
            rig.common(0x20, 8, rig.ram.size - 0x100)
        rig.common(0x1C, 2, 1)
        assert rig.common(0x1C, 2) == 0  # not enabled
    else:
        (q,) = rig.setup(FEATURES, [256])
        rig.ram.write(HEADER_AT, struct.pack("<IIQ", T_IN, 0, 0))
        if mistake == "loop":
            q.descriptor(0, HEADER_AT, 16, virtio.DESC_NEXT, 1)
            q.descriptor(1, DATA, SECTOR, virtio.DESC_NEXT | virtio.DESC_WRITE, 0)  # back to 0
            q.make_available(0)
        elif mistake == "outside RAM":
            q.add_chain([(HEADER_AT, 16, False), (rig.ram.size - 16, SECTOR, True), (STATUS_AT, 1, True)])
        else:
            q.add_chain([(HEADER_AT, 16, False), (DATA, SECTOR, True)])
            rig.ram.write(DATA + SECTOR - 1, b"\0")
            q.descriptor(1, DATA, SECTOR, 0)  # the only writable buffer is now read-only: no status
        q.kick()
        assert q.used_entries() == []
    assert rig.common(0x14, 1) & virtio.NEEDS_RESET
    assert rig.traces and rig.traces[-1][0] == "guest_errors"
    # a reset brings it back
    (q,) = rig.setup(FEATURES, [256])
    request(rig, q, T_IN, 0, [(DATA, SECTOR, True)])
    assert rig.ram.read(STATUS_AT, 1)[0] == S_OK


def test_state_round_trip_mid_queue(image):
    rig, drive = blk_rig(image)
    (q,) = rig.setup(FEATURES, [256])
    request(rig, q, T_IN, 1, [(DATA, SECTOR, True)])
    saved = rig.device.VMSTATE.save(rig.device)
    other, _ = blk_rig(image)
    other.device.VMSTATE.load(other.device, saved, 1)
    other.ram.buf[:] = rig.ram.buf
    assert other.device.VMSTATE.save(other.device) == saved
    # the loaded device goes on where the first one was: the next request completes
    q.rig = other
    request(other, q, T_IN, 2, [(DATA, SECTOR, True)])
    assert q.used_entries()[-1][1] == SECTOR + 1 and other.ram.read(DATA, SECTOR) == image.read_bytes()[
        2 * SECTOR:3 * SECTOR]


def test_drive_formats(tmp_path):
    qcow = tmp_path / "disk.qcow2"
    qcow.write_bytes(b"QFI\xfb" + bytes(508))
    with pytest.raises(ConfigError, match="qcow2 images are not supported.*qemu-img convert"):
        open_drive(str(qcow))
    with pytest.raises(ConfigError, match="format 'vmdk' is not supported"):
        open_drive(str(qcow), image_format="vmdk")
    raw = open_drive(str(qcow), image_format="raw")  # format=raw: taken as it is, as QEMU does
    assert raw.size == 512
    with pytest.raises(ConfigError, match="Is a directory"):
        open_drive(str(tmp_path), image_format="raw", readonly=True)


def _mbr_disk(path, sectors, end_head, end_sector):
    mbr = bytearray(SECTOR)
    mbr[0x1BE + 5], mbr[0x1BE + 6] = end_head, end_sector
    mbr[0x1BE + 12:0x1BE + 16] = struct.pack("<I", sectors - 63)
    mbr[510:512] = b"\x55\xaa"
    path.write_bytes(bytes(mbr))
    os.truncate(path, sectors * SECTOR)
    return RawImage(str(path))


def test_geometry_is_guessed_as_qemu_does(tmp_path):
    """hd_geometry_guess: a partition table made without translation gives its geometry; one
    made by a translating BIOS (more than 16 heads), or none, gives 16 heads of 63 sectors."""
    assert guess_geometry(_mbr_disk(tmp_path / "a", 100 * 4 * 32, 3, 32)) == (100, 4, 32)
    assert guess_geometry(_mbr_disk(tmp_path / "b", 20 * 255 * 63, 254, 63)) == (20 * 255 // 16, 16, 63)
    assert guess_geometry(_mbr_disk(tmp_path / "c", 64, 0, 0)) == (2, 16, 63)  # tiny, no usable entry
    big = tmp_path / "d"
    big.write_bytes(b"")
    os.truncate(big, 20000 * 16 * 63 * SECTOR)  # sparse; the cylinders are clamped at 16383
    assert guess_geometry(RawImage(str(big))) == (16383, 16, 63)

"""virtio-net over modern virtio-pci, driven register by register, and the socket netdev
between two real backends over a real TCP connection."""

import socket
import struct
import time

import pytest
from virtiodriver import Rig

from emu import netdev
from emu.devices import virtio
from emu.devices.virtio_net import F_MAC, F_STATUS, HEADER_SIZE, TX, TX_BATCH_NS, VirtioNet, parse_mac
from emu.errors import ConfigError
from emu.state import machinestate

MAC = bytes.fromhex("525400123456")
FEATURES = virtio.F_VERSION_1 | F_MAC | F_STATUS
TX_BUF, RX_BUF = 0x200000, 0x280000


class Wire:
    offloads = False  # plain frames, as the socket netdev

    def __init__(self):
        self.frames = []

    def send(self, frame):
        self.frames.append(frame)


def net_rig():
    wire = Wire()
    rig = Rig(lambda ram, msi, trace, clock: VirtioNet("virtio-net@03.0", ram, wire, MAC, msi, clock,
                                                      trace=trace))
    return rig, wire


def test_mac_and_link_in_the_configuration_space():
    rig, _ = net_rig()
    assert bytes(rig.device_config(i, 1) for i in range(6)) == MAC
    assert rig.device_config(6, 2) == 1  # link up
    assert rig.cfg_read(0x02, 2) == 0x1041


def test_transmit_and_receive_frames():
    rig, wire = net_rig()
    rx, tx = rig.setup(FEATURES, [256, 256])
    frame = bytes(range(60)) * 2
    rig.ram.write(TX_BUF, bytes(HEADER_SIZE) + frame)
    head = tx.add_chain([(TX_BUF, HEADER_SIZE, False), (TX_BUF + HEADER_SIZE, len(frame), False)])
    tx.kick()
    assert wire.frames == [frame] and tx.used_entries() == [(head, 0)]
    # a frame arrives before the driver gave buffers: it waits
    rig.device.receive([b"\x01" * 100])
    rig.device.poll()
    for i in range(2):
        rx.add_chain([(RX_BUF + i * 2048, 2048, True)])
    rx.kick()
    rig.device.receive([b"\x02" * 1514])
    rig.device.poll()
    used = rx.used_entries()
    assert used == [(0, HEADER_SIZE + 100), (1, HEADER_SIZE + 1514)]
    header = rig.ram.read(RX_BUF, HEADER_SIZE)
    assert struct.unpack("<BBHHHHH", header)[6] == 1  # num_buffers
    assert rig.ram.read(RX_BUF + HEADER_SIZE, 100) == b"\x01" * 100
    assert rig.ram.read(RX_BUF + 2048 + HEADER_SIZE, 1514) == b"\x02" * 1514


def _queue_frame(rig, tx, index, frame):
    address = TX_BUF + index * 0x1000
    rig.ram.write(address, bytes(HEADER_SIZE) + frame)
    return tx.add_chain([(address, HEADER_SIZE + len(frame), False)])


def test_a_kick_opens_a_batch_window_whose_frames_leave_in_one_pass_with_one_interrupt():
    """QEMU's transmit batching: after a kick, further kicks are off (VIRTQ_USED_F_NO_NOTIFY)
    for TX_BATCH_NS of guest time; the frames queued meanwhile leave together, the used index
    is written once and INTx rises once; an empty pass turns kicks back on."""
    rig, wire = net_rig()
    _, tx = rig.setup(FEATURES, [256, 256])
    clock = rig.machine.clock
    _queue_frame(rig, tx, 0, b"\x10" * 60)
    rig.modern.mmio_write(virtio.NOTIFY_OFFSET + virtio.NOTIFY_MULTIPLIER * TX, 2, TX)  # the kick
    rig.device.poll()
    assert wire.frames == [] and rig.ram.read(tx.used, 2) == b"\x01\x00"       # kicks off, nothing sent yet
    for index in (1, 2):                                                         # queued without a kick
        _queue_frame(rig, tx, index, bytes([0x10 + index]) * 60)
    start = clock.now()
    rig.settle()
    assert wire.frames == [bytes([0x10 + i]) * 60 for i in range(3)]
    assert [head for head, _ in tx.used_entries()] == [0, 1, 2]
    assert rig.pirqs == {3: 1} and rig.modern.mmio_read(virtio.ISR_OFFSET, 1) == 1   # one interrupt, pending
    assert rig.ram.read(tx.used, 2) == b"\x00\x00"                               # an empty pass: kicks on
    assert clock.now() - start == 2 * TX_BATCH_NS and not rig.device.tx_timer.armed


def test_an_open_batch_window_survives_a_state_round_trip():
    rig, wire = net_rig()
    _, tx = rig.setup(FEATURES, [256, 256])
    _queue_frame(rig, tx, 0, b"\x20" * 60)
    rig.modern.mmio_write(virtio.NOTIFY_OFFSET + virtio.NOTIFY_MULTIPLIER * TX, 2, TX)
    saved = rig.device.VMSTATE.save(rig.device)
    other, other_wire = net_rig()
    other.ram.write(0, rig.ram.read(0, 4 << 20))
    other.machine.clock.set_now(rig.machine.clock.now())
    other.device.VMSTATE.load(other.device, saved, rig.device.VMSTATE.version_id)
    assert other.device.tx_timer.deadline == rig.device.tx_timer.deadline
    other.settle()
    assert other_wire.frames == [b"\x20" * 60] and wire.frames == []
    version_1 = rig.device.VMSTATE.save(rig.device)[:-8]       # the same state without the timer field
    other.device.tx_timer.arm_in(1000)
    other.device.VMSTATE.load(other.device, version_1, 1)
    assert not other.device.tx_timer.armed


def test_a_save_takes_no_received_frame_and_sends_no_kicked_one():
    """A COLO checkpoint saves RAM, then the devices: a save that let the NIC take a received
    frame or send a kicked one would leave the saved used index past the ring in the saved
    RAM.  A save changes nothing; the open batch window sends the frame after a load."""
    rig, wire = net_rig()
    rig.machine.devices.append(rig.device)
    rx, tx = rig.setup(FEATURES, [256, 256])
    rx.add_chain([(RX_BUF, 2048, True)])
    rx.kick()
    rig.device.receive([b"\x04" * 100])                                           # taken at the next poll
    _queue_frame(rig, tx, 0, b"\x05" * 60)
    rig.modern.mmio_write(virtio.NOTIFY_OFFSET + virtio.NOTIFY_MULTIPLIER * TX, 2, TX)  # a kick, not yet seen
    ram_before = rig.ram.read(0, 4 << 20)
    first = machinestate.save(rig.machine, "all")
    assert machinestate.save(rig.machine, "all") == first and rig.ram.read(0, 4 << 20) == ram_before
    assert wire.frames == [] and rx.used_entries() == []
    other, other_wire = net_rig()
    other.machine.devices.append(other.device)
    machinestate.load(other.machine, machinestate.check(other.machine, first), rollback=False)
    other.settle()
    assert other_wire.frames == [b"\x05" * 60]


def test_a_frame_too_big_for_its_buffer_is_dropped_and_counted():
    rig, _ = net_rig()
    rx, _ = rig.setup(FEATURES, [256, 256])
    rx.add_chain([(RX_BUF, 64, True)])
    rig.device.receive([b"\x03" * 200])
    rx.kick()
    assert rx.used_entries() == [(0, 0)] and rig.device.stats["rx_too_big"] == 1


@pytest.mark.parametrize("text, error", [("52:54:00:12:34", "six hex bytes"), ("01:00:5e:00:00:01", "multicast"),
                                          ("52:54:00:12:34:zz", "six hex bytes")])
def test_bad_mac_addresses(text, error):
    with pytest.raises(ConfigError, match=error):
        parse_mac(text)


def _pump(backend, want, timeout=5):
    got, deadline = [], time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        for fd in backend.read_fds():
            import select
            if select.select([fd], [], [], 0.05)[0]:
                got += backend.on_readable(fd)
    return got


def test_socket_netdev_carries_frames_both_ways_with_qemus_framing():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    _, server = netdev.parse_netdev(f"socket,id=n0,listen=127.0.0.1:{port}")
    _, client = netdev.parse_netdev(f"socket,id=n1,connect=127.0.0.1:{port}")
    try:
        _pump(server, 0, timeout=0.5)  # accept
        frames = [b"\xaa" * 60, b"\xbb" * 1514, b"\xcc" * 9000]
        for frame in frames:
            client.send(frame)
        assert _pump(server, 3) == frames
        server.send(b"\xdd" * 64)
        assert _pump(client, 1) == [b"\xdd" * 64]
    finally:
        client.close()
        server.close()


def test_socket_netdev_stream_format_is_a_length_then_the_frame():
    """What QEMU's net/socket.c writes: a 4-byte big-endian length before every frame."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    _, backend = netdev.parse_netdev(f"socket,id=n0,connect=127.0.0.1:{port}")
    peer, _ = listener.accept()
    try:
        backend.send(b"hello-frame")
        assert peer.recv(100) == b"\x00\x00\x00\x0bhello-frame"
        peer.sendall(b"\x00\x00\x00\x03abc\x00\x00\x00")  # one frame and the start of another
        assert _pump(backend, 1) == [b"abc"]
    finally:
        backend.close()
        peer.close()
        listener.close()


@pytest.mark.parametrize("spec, error", [
    ("socket,listen=1.2.3.4:0", "id= is required"),
    ("socket,id=a", "exactly one of listen= and connect="),
    ("socket,id=a,listen=x", r"expected \[HOST\]:PORT"),
    ("tap,id=t", "ifname= is required"),
    ("tap,id=t,ifname=x,script=/etc/qemu-ifup", "scripts are not run"),
    ("user,id=u", "not supported"),
    ("socket,id=a,connect=127.0.0.1:1,bogus=1", "unsupported option"),
])
def test_bad_netdev_options(spec, error):
    with pytest.raises(ConfigError, match=error):
        netdev.parse_netdev(spec)

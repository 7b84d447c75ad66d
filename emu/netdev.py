"""Network backends: where a NIC's frames go on the host (QEMU's ``-netdev``).

* ``tap,id=N,ifname=TAP[,script=no,downscript=no]``: a Linux tap interface (opened through
  /dev/net/tun with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR: one read or write is one Ethernet
  frame behind a 12-byte virtio_net_hdr, as QEMU opens it).  The header lets a NIC hand the
  host kernel frames to checksum and TCP segments of up to 64 KiB to cut (``offloads``),
  which is where most of a guest's transmit speed comes from.  The interface must exist
  (``ip tuntap add TAP mode tap``) or the process may create it; scripts are not run, as
  with QEMU's ``script=no``.
* ``socket,id=N,listen=[HOST]:PORT`` or ``connect=HOST:PORT``: frames over a TCP stream
  between two emulators, each behind a 4-byte big-endian length, as QEMU's socket netdev
  sends them (so that a QEMU at the other end understands them).  The listening side
  accepts one peer; until then, and after the peer leaves, frames are dropped.

A backend never blocks the run loop: reads happen when its file descriptor is readable
(``read_fds``/``on_readable``), and a frame that cannot be written at once is dropped and
counted, as a full wire would drop it.
"""

import errno
import fcntl
import os
import socket
import struct

from emu.errors import ConfigError

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
VNET_HEADER_SIZE = 12  # virtio_net_hdr_v1 (num_buffers included), as virtio 1.x NICs use it
NO_OFFLOAD_HEADER = bytes(VNET_HEADER_SIZE)
MAX_FRAME = 65536
SOCKET_HEADER = struct.Struct(">I")


class TapBackend:
    """``send(frame)`` for plain frames; ``send_offloaded(header, frame)`` for a frame behind
    the guest's virtio_net_hdr (checksum and segmentation left to the host kernel).  Frames
    read from it are plain: the kernel is told to deliver no offloaded ones (TUNSETOFFLOAD 0)."""

    offloads = True

    def __init__(self, ifname):
        self.ifname = ifname
        try:
            self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        except OSError as e:
            raise ConfigError(f"-netdev tap: cannot open /dev/net/tun: {e.strerror}") from None
        try:
            fcntl.ioctl(self.fd, TUNSETIFF, struct.pack("16sH", ifname.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
            fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HEADER_SIZE))
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, 0)
        except OSError as e:
            os.close(self.fd)
            raise ConfigError(f"-netdev tap,ifname={ifname}: cannot attach to the tap interface: "
                              f"{e.strerror}") from None
        self.sent = self.received = self.dropped = 0

    def read_fds(self):
        return [self.fd] if self.fd is not None else []

    def on_readable(self, fd):
        frames = []
        while True:
            try:
                frame = os.read(self.fd, MAX_FRAME)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                raise
            if not frame:
                break
            frames.append(frame[VNET_HEADER_SIZE:])
        self.received += len(frames)
        return frames

    def send(self, frame):
        self.send_offloaded(NO_OFFLOAD_HEADER, frame)

    def send_offloaded(self, header, frame):
        try:
            os.writev(self.fd, [header, frame])
            self.sent += 1
        except BlockingIOError:
            self.dropped += 1
        except OSError as e:  # a header the kernel refuses (EINVAL): the frame is lost, as on a wire
            if e.errno != errno.EINVAL:
                raise
            self.dropped += 1

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class SocketBackend:
    """One TCP stream of length-prefixed frames, listening or connecting (plain frames only,
    as QEMU's socket netdev: no offloads)."""

    offloads = False

    def __init__(self, listen=None, connect=None):
        self.listener = self.peer = None
        self.buffer = bytearray()
        self.sent = self.received = self.dropped = 0
        if listen is not None:
            host, port = _address(listen, "listen")
            try:
                self.listener = socket.create_server((host or "127.0.0.1", port))
            except OSError as e:
                raise ConfigError(f"-netdev socket,listen={listen}: {e.strerror or e}") from None
            self.listener.setblocking(False)
        else:
            host, port = _address(connect, "connect")
            try:
                self.peer = socket.create_connection((host, port), timeout=10)
            except OSError as e:
                raise ConfigError(f"-netdev socket,connect={connect}: {e.strerror or e}") from None
            self._ready(self.peer)

    def _ready(self, sock):
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def read_fds(self):
        if self.peer is not None:
            return [self.peer.fileno()]
        return [self.listener.fileno()] if self.listener is not None else []

    def on_readable(self, fd):
        if self.peer is None:
            try:
                self.peer, _ = self.listener.accept()
                self._ready(self.peer)
            except BlockingIOError:
                pass
            return []
        try:
            chunk = self.peer.recv(1 << 20)
        except BlockingIOError:
            return []
        except OSError:
            chunk = b""
        if not chunk:
            self._lost()
            return []
        self.buffer += chunk
        frames = []
        while len(self.buffer) >= SOCKET_HEADER.size:
            (length,) = SOCKET_HEADER.unpack_from(self.buffer)
            if length > MAX_FRAME:
                self._lost()  # not a frame stream: drop the peer
                return frames
            if len(self.buffer) < SOCKET_HEADER.size + length:
                break
            frames.append(bytes(self.buffer[SOCKET_HEADER.size:SOCKET_HEADER.size + length]))
            del self.buffer[:SOCKET_HEADER.size + length]
        self.received += len(frames)
        return frames

    def send(self, frame):
        if self.peer is None:
            self.dropped += 1
            return
        try:
            self.peer.sendall(SOCKET_HEADER.pack(len(frame)) + frame)  # small: the kernel takes it whole
            self.sent += 1
        except BlockingIOError:
            self.dropped += 1
        except OSError:
            self._lost()

    def _lost(self):
        if self.peer is not None:
            self.peer.close()
            self.peer = None
        self.buffer.clear()

    def close(self):
        self._lost()
        if self.listener is not None:
            self.listener.close()
            self.listener = None


def _address(text, what):
    host, sep, port = (text or "").rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"-netdev socket,{what}={text!r}: expected [HOST]:PORT")
    return host.strip("[]"), int(port)


#: ``-netdev TYPE`` kinds defined outside the core: TYPE -> (opener(spec, settings), usage);
#: the COLO pair's endpoint link registers ``colo`` (colo.netlink)
KINDS = {}


def register_kind(kind, opener, usage):
    KINDS[kind] = (opener, usage)


def parse_netdev(spec):
    """``-netdev TYPE,id=ID,...`` -> (id, backend)."""
    from emu.qemuopts import split_commas

    kind, *options = split_commas(spec)
    settings = {}
    for option in options:
        name, sep, value = option.partition("=")
        if not sep:
            raise ConfigError(f"-netdev {spec!r}: option {option!r} needs a value")
        settings[name] = value
    netdev_id = settings.pop("id", None)
    if not netdev_id:
        raise ConfigError(f"-netdev {spec!r}: id= is required")
    if kind == "tap":
        ifname = settings.pop("ifname", None)
        for script in ("script", "downscript"):
            if settings.pop(script, "no") != "no":
                raise ConfigError(f"-netdev tap: {script}= scripts are not run; use {script}=no and set the "
                                  f"interface up yourself")
        _no_more(spec, settings)
        if not ifname:
            raise ConfigError(f"-netdev {spec!r}: ifname= is required")
        return netdev_id, TapBackend(ifname)
    if kind == "socket":
        listen, connect = settings.pop("listen", None), settings.pop("connect", None)
        _no_more(spec, settings)
        if (listen is None) == (connect is None):
            raise ConfigError(f"-netdev {spec!r}: give exactly one of listen= and connect=")
        return netdev_id, SocketBackend(listen=listen, connect=connect)
    if kind in KINDS:
        backend = KINDS[kind][0](spec, settings)
        _no_more(spec, settings)
        return netdev_id, backend
    raise ConfigError(f"-netdev {kind!r}: not supported ({', '.join(['tap', 'socket', *KINDS])})")


def _no_more(spec, settings):
    if settings:
        raise ConfigError(f"-netdev {spec!r}: unsupported option(s) {', '.join(sorted(settings))}")

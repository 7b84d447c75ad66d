"""The network link of a COLO VM to the client endpoint (``-netdev colo,id=N,proxy=HOST:PORT,...``).

A network backend for a virtio-net NIC that speaks :mod:`colo.proxywire` to ``emu colo proxy
--netdev ...``, exactly as the serial link (:mod:`colo.link`) does for COM1: the two
directions are byte streams of frame records (:mod:`colo.netstream`), so the offsets, the
log of unreleased output, MARK, SYNC and TAKEOVER are the serial link's, and so is the
replication state that travels with each checkpoint (``in_offset``, ``out_offset``, the
log).  What differs is what counts as taken: ``in_offset`` moves when the NIC gives a
frame to the guest (or drops it, as a full ring does), not when the frame reaches the
host, so input that waits in the NIC's host-side queue at a checkpoint is sent again to a
secondary restored from it.

Offloads: the NIC may hand frames to checksum and TSO segments (as over a tap); they
travel with their virtio_net_hdr and the endpoint's tap completes them.
"""

import collections

from emu import netdev
from emu.errors import ConfigError

from . import netstream as ns
from . import proxywire as pw
from .link import MAX_LOG, ColoLink
from .wire import parse_tcp_uri

USAGE = "colo,id=N,proxy=HOST:PORT[,role=primary|secondary][,mode=compare|passive][,node=NAME]"


class ColoNetLink(ColoLink):
    """A NIC backend (send/send_offloaded/read_fds/on_readable/frame_taken/close) on the endpoint."""

    CHANNEL = "net"
    OPTION = "-netdev colo,proxy=tcp"
    offloads = True

    def __init__(self, host, port, role="primary", mode="compare", node="", **kw):
        super().__init__(host, port, role=role, mode=mode, node=node, **kw)
        self.nic = None
        self._in_records = bytearray()          # IN bytes not yet a whole record
        self._handed = collections.deque()      # sizes of the records given to the NIC, not taken yet

    def attach_nic(self, nic, machine):
        """Serve ``nic`` of ``machine``: output is pushed to the endpoint between slices."""
        self.nic, self.machine = nic, machine
        machine.add_background_job(self.flush)

    # ------------------------------------------------------------------ the NIC's side
    def send(self, frame):
        self.send_offloaded(ns.NO_HEADER, frame)

    def send_offloaded(self, header, frame):
        self.write(ns.record(header, frame))

    def write(self, data):
        self.log += data
        self.out_offset += len(data)
        if len(self.log) > MAX_LOG:  # drop whole records: the log must start at one
            records, _ = ns.split_records(self.log)
            drop = next(offset for offset, _, _ in records if len(self.log) - offset <= MAX_LOG)
            del self.log[:drop]
            self.log_base += drop
            self.log_overflow += drop
            self._say(f"{drop} bytes of unreleased frames dropped (nothing released for {MAX_LOG} bytes)")

    def on_readable(self, fd):
        data = super().on_readable(fd)  # IN bytes in order, from what the NIC took on
        if not data:
            return []
        self._in_records += data
        try:
            records, end = ns.split_records(self._in_records)
        except ns.RecordError as e:
            self._lost(f"input is not frame records: {e}")
            return []
        frames = []
        for _, _, frame in records:
            frames.append(bytes(frame))
            self._handed.append(ns.RECORD_HEAD.size + ns.VNET_HEADER_SIZE + len(frame))
        del self._in_records[:end]
        return frames

    def frame_taken(self):
        """The NIC gave the oldest frame it holds to the guest (or dropped it)."""
        if self._handed:
            self.in_offset += self._handed.popleft()

    # ------------------------------------------------------------------ replication state
    def restore(self, state):
        super().restore(state)
        self._in_records.clear()
        self._handed.clear()
        if self.nic is not None:
            self.nic.discard_received()

    def __repr__(self):
        return f"<ColoNetLink {self.role} {self.address[0]}:{self.address[1]}>"


def open_netdev(spec, settings):
    """``-netdev colo,...`` (options are taken out of ``settings``)."""
    proxy = settings.pop("proxy", None)
    if not proxy:
        raise ConfigError(f"-netdev {spec!r}: proxy=HOST:PORT is required (the endpoint's --listen)")
    host, port = parse_tcp_uri(proxy if proxy.startswith("tcp:") else f"tcp:{proxy}", "-netdev colo,proxy")
    role, mode, node = settings.pop("role", "primary"), settings.pop("mode", "compare"), settings.pop("node", "")
    if role not in ("primary", "secondary"):
        raise ConfigError(f"-netdev {spec!r}: role must be primary or secondary")
    if mode not in pw.MODES:
        raise ConfigError(f"-netdev {spec!r}: mode must be one of {', '.join(pw.MODES)}")
    return ColoNetLink(host, port, role=role, mode=mode, node=node)


netdev.register_kind("colo", open_netdev, USAGE)

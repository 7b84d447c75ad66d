"""The serial link of a COLO VM to the client endpoint (``-serial colo:HOST:PORT,...``).

A character backend for COM1 that speaks :mod:`colo.proxywire` to ``emu colo proxy``.

The link holds no guest state: what the guest sees of its serial port is the UART, saved
as its own section of the machine stream.  What the link keeps is replication state
(:class:`LinkState`), the positions of the two byte streams the client endpoint
addresses:

* ``in_offset``: how many input bytes the UART has accepted (the proxy re-sends input
  from there after a checkpoint or a failover);
* ``out_offset``: how many bytes the guest has written;
* ``log``: the output bytes ``[log_base, out_offset)`` not yet known to have reached the
  client (trimmed as RELEASED messages come).

They must match the guest state of the same instant for a failover to be exact, so they
travel with every checkpoint (and with checkpoint 0, the initial migration) as the
checkpoint's replication part (:mod:`colo.replicationpart`), never inside the machine
stream: a snapshot of a COLO VM is a plain machine's snapshot.  So the primary's
unreleased output travels inside the checkpoint that covers it, and after applying a
checkpoint the secondary tells the proxy (SYNC) exactly which output is now committed and
where both streams continue.  Host-side plumbing (the socket, input received but not yet
taken by the UART, output not yet sent) is never saved: after a restore it is rebuilt
from the offsets.
"""

import socket
import struct
import sys
import time
from dataclasses import dataclass
from typing import Protocol

from emu import chardev
from emu.errors import ConfigError, StateError
from emu.replication import RunLoopServices

from . import proxywire as pw

MAX_LOG = 16 << 20  # unreleased output kept; beyond it the oldest bytes are lost (and said so)
CONNECT_TIMEOUT_S = 10.0


def parse_link_spec(spec):
    """``colo:HOST:PORT[,role=primary|secondary][,mode=compare|passive][,node=NAME]``."""
    address, *options = spec[len("colo:"):].split(",")
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ConfigError(f"-serial {spec!r}: expected colo:HOST:PORT[,role=primary|secondary]")
    settings = {"host": host or "127.0.0.1", "port": int(port_text), "role": "primary", "mode": "compare",
                "node": ""}
    for option in options:
        name, _, value = option.partition("=")
        if name not in ("role", "mode", "node") or not value:
            raise ConfigError(f"-serial {spec!r}: unsupported option {option!r} (role=, mode=, node=)")
        settings[name] = value
    if settings["role"] not in ("primary", "secondary"):
        raise ConfigError(f"-serial {spec!r}: role must be primary or secondary")
    if settings["mode"] not in pw.MODES:
        raise ConfigError(f"-serial {spec!r}: mode must be one of {', '.join(pw.MODES)}")
    return settings


@dataclass(frozen=True)
class LinkState:
    """The link's replication state: stream positions and unreleased output.

    Encoded as ``in_offset u64 | out_offset u64 | log_base u64 | log`` (the log is the rest)."""

    in_offset: int
    out_offset: int
    log_base: int
    log: bytes

    HEAD = struct.Struct(">QQQ")
    MAX_SIZE = HEAD.size + MAX_LOG

    def encode(self):
        return self.HEAD.pack(self.in_offset, self.out_offset, self.log_base) + self.log

    @classmethod
    def decode(cls, data):
        """A LinkState from its encoding, checked whole (a hostile peer may have sent it)."""
        if not cls.HEAD.size <= len(data) <= cls.MAX_SIZE:
            raise StateError(f"colo-link: {len(data)} bytes of link state (expected {cls.HEAD.size}.."
                             f"{cls.MAX_SIZE})")
        in_offset, out_offset, log_base = cls.HEAD.unpack_from(data)
        state = cls(in_offset, out_offset, log_base, bytes(data[cls.HEAD.size:]))
        if state.log_base + len(state.log) != state.out_offset:
            raise StateError(f"colo-link: log [{state.log_base}, +{len(state.log)}) does not end at "
                             f"out_offset {state.out_offset}")
        return state


class LinkListener(Protocol):
    """Who hears what the client endpoint asks of a VM (the COLO side that runs it)."""

    def checkpoint_requested(self, reason: str) -> None:
        """The compare wants a checkpoint (``mismatch ...`` or ``timeout ...``)."""

    def takeover_answered(self, accepted: bool, reason: str) -> None:
        """The endpoint's answer to :meth:`ColoLink.takeover`."""


class ColoLink:
    """The backend of COM1 (write/read_fds/on_readable/flush/close) on the client endpoint."""

    CHANNEL = "serial"        # what the streams carry (HELLO tells the endpoint)
    OPTION = "-serial colo"   # how a user gave the link (messages)

    def __init__(self, host, port, role="primary", mode="compare", node="", log=sys.stderr):
        self.role, self.mode, self.node = role, mode, node or role
        self.address = (host, port)
        self.log_file = log
        # replication state (LinkState)
        self.in_offset = 0
        self.out_offset = 0
        self.log_base = 0
        self.log = bytearray()
        # host side
        self.received = 0      # input offset up to which bytes were handed to the machine
        self.sent = 0          # output offset up to which OUT messages are queued
        self.outgoing = bytearray()
        self.reader = pw.frame_reader()
        self.connected = False
        self.released = 0
        self.machine = None
        self.listener = None
        self.proxy_epoch = 0          # the highest epoch the proxy accepted (EPOCH)
        self.takeover_asked = False   # TAKEOVER sent, no answer yet
        self.serving_alone = False    # the answer was ACTIVE
        self.log_overflow = 0
        try:
            self.sock = socket.create_connection(self.address, timeout=CONNECT_TIMEOUT_S)
        except OSError as e:
            raise ConfigError(f"{self.OPTION}:{host}:{port}: cannot reach the COLO proxy: {e.strerror or e}") from None
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.connected = True
        self._queue(pw.hello(role, self.node, mode, self.CHANNEL))
        self.flush()

    # ------------------------------------------------------------------ wiring
    def attach(self, machine: RunLoopServices, consumer):
        """Serve COM1 of ``machine``; returns the input consumer the machine must use (it
        counts what the UART accepted).  A guest reset does not rewind the streams: the
        client saw what it saw."""
        self.machine = machine

        def counted(data):
            accepted = consumer(data)
            self.in_offset += accepted
            return accepted
        return counted

    def listen(self, listener):
        """Report the endpoint's checkpoint requests and takeover answers to ``listener``
        (a :class:`LinkListener`)."""
        self.listener = listener

    # ------------------------------------------------------------------ backend interface
    def write(self, data):
        self.log += data
        self.out_offset += len(data)
        if len(self.log) > MAX_LOG:
            drop = len(self.log) - MAX_LOG
            del self.log[:drop]
            self.log_base += drop
            self.log_overflow += drop
            self._say(f"{drop} bytes of unreleased output dropped (no client for {MAX_LOG} bytes)")

    def flush(self):
        """Queue OUT for what the guest wrote since, and push queued bytes to the proxy."""
        if self.sent < self.out_offset and self.connected:
            start = max(self.sent, self.log_base)
            self._queue(pw.data(pw.OUT, start, self.log[start - self.log_base:]))
            self.sent = self.out_offset
        if self.outgoing and self.connected:
            try:
                n = self.sock.send(self.outgoing)
                del self.outgoing[:n]
            except BlockingIOError:
                pass
            except OSError as e:
                self._lost(f"sending: {e}")

    def flush_all(self, timeout=1.0):
        """Push everything queued (a control message must not wait for the next slice)."""
        self.flush()
        deadline = time.monotonic() + timeout
        while self.outgoing and self.connected and time.monotonic() < deadline:
            try:
                n = self.sock.send(self.outgoing)
                del self.outgoing[:n]
            except BlockingIOError:
                time.sleep(0.0005)
            except OSError as e:
                self._lost(f"sending: {e}")

    def read_fds(self):
        return [self.sock.fileno()] if self.connected else []

    def on_readable(self, fd):
        try:
            chunk = self.sock.recv(65536)
        except BlockingIOError:
            return b""
        except OSError as e:
            self._lost(str(e))
            return b""
        if not chunk:
            self._lost("the proxy closed the connection")
            return b""
        self.reader.feed(chunk)
        out = bytearray()
        try:
            for kind, payload in self.reader.frames():
                out += self._message(kind, payload)
        except pw.ProxyProtocolError as e:
            self._lost(str(e))
        return bytes(out)

    def _message(self, kind, payload):
        if kind == pw.IN:
            offset, data = pw.parse_data(payload)
            if offset > self.received:
                return b""  # sent before a re-sync: the proxy re-sends from our offset
            fresh = data[self.received - offset:]
            self.received += len(fresh)
            return fresh
        if kind == pw.RELEASED:
            released = pw.parse_offset(payload)
            self.released = max(self.released, released)
            # never beyond what was sent: a RELEASED from before a restore may name an offset
            # the restored stream has not reached, or reached with other bytes (a secondary's frames)
            keep_from = min(self.released, self.sent)
            if keep_from > self.log_base:
                del self.log[:keep_from - self.log_base]
                self.log_base = keep_from
        elif kind == pw.CHECKPOINT:
            if self.listener is not None:
                self.listener.checkpoint_requested(payload.decode("utf-8", "replace"))
        elif kind == pw.EPOCH:
            self.proxy_epoch = max(self.proxy_epoch, pw.parse_offset(payload))
        elif kind in (pw.ACTIVE, pw.REFUSED):
            self.takeover_asked = False
            self.serving_alone = kind == pw.ACTIVE
            if self.listener is not None:
                self.listener.takeover_answered(kind == pw.ACTIVE, payload.decode("utf-8", "replace"))
        else:
            raise pw.ProxyProtocolError(f"proxy: unexpected {pw.NAMES[kind]} sent to a VM")
        return b""

    def close(self):
        if self.connected:
            self.flush_all(0.5)
        self._disconnect()

    # ------------------------------------------------------------------ COLO messages
    def mark(self, seq):
        """Primary, paused for checkpoint ``seq``: later output belongs to the next epoch."""
        self.flush()
        self._queue(pw.mark(seq, self.out_offset))
        self.flush()

    def unmark(self, seq):
        self._queue(pw.offset_message(pw.UNMARK, seq))
        self.flush()

    def send_sync(self, seq):
        """Secondary: my state is now checkpoint ``seq``; here is the committed output."""
        self._queue(pw.sync(seq, self.in_offset, self.out_offset, self.log_base, self.log))
        self.flush_all()

    def takeover(self, epoch):
        """Ask the proxy to make this VM the only one served (the listener hears the answer).

        Without a connection to the proxy the answer is no: the proxy closes the connection
        of a VM it fences off (the other one took over), and a VM it cannot hear from
        cannot serve anyway."""
        if not self.connected:
            self._fenced()
            return
        self.takeover_asked = True
        self.flush()
        self._queue(pw.offset_message(pw.TAKEOVER, epoch))
        self.flush_all()

    def promote(self):
        """Re-protection: this VM, serving alone, is the primary of the pair that forms now."""
        self.flush()
        self._queue(pw.frame(pw.PROMOTE))
        self.flush_all()
        self.role = "primary"
        self.serving_alone = False

    # ------------------------------------------------------------------ replication state
    def link_state(self):
        """The stream positions and unreleased output now (taken with the guest paused)."""
        return LinkState(self.in_offset, self.out_offset, self.log_base, bytes(self.log))

    def restore(self, state):
        """Continue the streams from ``state`` (of the checkpoint just applied): host-side
        leftovers, and input the machine holds for the UART, are dropped."""
        self.in_offset, self.out_offset = state.in_offset, state.out_offset
        self.log_base, self.log = state.log_base, bytearray(state.log)
        self.received = self.in_offset
        self.sent = self.out_offset
        self.released = min(self.released, self.out_offset)
        if self.machine is not None:
            self.machine.discard_pending_input(self)

    # ------------------------------------------------------------------ helpers
    def _queue(self, message):
        self.outgoing += message

    def _lost(self, reason):
        if self.connected:
            self._say(f"lost the proxy: {reason}")
        self._disconnect()
        if self.takeover_asked or self.serving_alone:
            self._fenced()

    def _fenced(self):
        self.takeover_asked = self.serving_alone = False
        if self.listener is not None:
            self.listener.takeover_answered(False, "the client endpoint closed this VM's connection (another VM "
                                                   "serves, or the endpoint is gone)")

    def _disconnect(self):
        self.connected = False
        try:
            self.sock.close()
        except OSError:
            pass

    def _say(self, text):
        print(f"colo-link ({self.role}): {text}", file=self.log_file, flush=True)

    def __repr__(self):
        return f"<ColoLink {self.role} {self.address[0]}:{self.address[1]}>"


def open_link(spec):
    s = parse_link_spec(spec)
    return ColoLink(s["host"], s["port"], role=s["role"], mode=s["mode"], node=s["node"])



chardev.register_scheme("colo", open_link, "colo:HOST:PORT[,role=primary|secondary][,mode=compare|passive]")

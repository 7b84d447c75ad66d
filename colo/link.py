"""The serial link of a COLO VM to the client endpoint (``-serial colo:HOST:PORT,...``).

A character backend for COM1 that speaks :mod:`colo.proxywire` to ``emu colo proxy``.
What matters for failover is guest state, so the link keeps, as a device section
(``colo-link``) saved in every checkpoint:

* ``in_offset``: how many input bytes the UART has accepted (the proxy re-sends input
  from there after a checkpoint or a failover);
* ``out_offset``: how many bytes the guest has written;
* ``log``: the output bytes ``[log_base, out_offset)`` not yet known to have reached the
  client (trimmed as RELEASED messages come).

So the primary's unreleased output travels inside the checkpoint that covers it, and
after applying a checkpoint the secondary tells the proxy (SYNC) exactly which output is
now committed and where both streams continue.  Host-side plumbing (the socket, input
received but not yet taken by the UART, output not yet sent) is never saved: after a
load it is rebuilt from the offsets.
"""

import socket
import sys
import time

from emu import chardev
from emu.device import Device
from emu.errors import ConfigError, StateError
from emu.state.vmstate import U64, VarBytes, VMStateDescription

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


class ColoLink(Device):
    """Backend (write/read_fds/on_readable/flush/close) and state section in one object."""

    def __init__(self, host, port, role="primary", mode="compare", node="", log=sys.stderr):
        super().__init__("colo-link")
        self.role, self.mode, self.node = role, mode, node or role
        self.address = (host, port)
        self.log_file = log
        # guest state
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
        self.on_checkpoint_request = None  # callable(reason)
        self.on_takeover_reply = None      # callable(accepted, reason)
        self.log_overflow = 0
        try:
            self.sock = socket.create_connection(self.address, timeout=CONNECT_TIMEOUT_S)
        except OSError as e:
            raise ConfigError(f"-serial colo:{host}:{port}: cannot reach the COLO proxy: {e.strerror or e}") from None
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.connected = True
        self._queue(pw.hello(role, self.node, mode))
        self.flush()

    # ------------------------------------------------------------------ wiring
    def attach(self, machine, consumer):
        """Become part of ``machine`` (state section, after-load hook); returns the input
        consumer the machine must use (it counts what the UART accepted)."""
        self.machine = machine
        machine.add_device(self)
        machine.after_load.append(self._after_load)

        def counted(data):
            accepted = consumer(data)
            self.in_offset += accepted
            return accepted
        self._consumer = counted
        return counted

    def reset(self):
        """A guest reset does not rewind the streams: the client saw what it saw."""

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
            keep_from = min(self.released, self.out_offset)
            if keep_from > self.log_base:
                del self.log[:keep_from - self.log_base]
                self.log_base = keep_from
        elif kind == pw.CHECKPOINT:
            if self.on_checkpoint_request is not None:
                self.on_checkpoint_request(payload.decode("utf-8", "replace"))
        elif kind in (pw.ACTIVE, pw.REFUSED):
            if self.on_takeover_reply is not None:
                self.on_takeover_reply(kind == pw.ACTIVE, payload.decode("utf-8", "replace"))
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
        """Ask the proxy to make this VM the only one served (answer via on_takeover_reply)."""
        self.flush()
        self._queue(pw.offset_message(pw.TAKEOVER, epoch))
        self.flush_all()

    # ------------------------------------------------------------------ state
    def _after_load(self):
        """The streams continue from the loaded offsets: drop host-side leftovers."""
        self.received = self.in_offset
        self.sent = self.out_offset
        self.released = min(self.released, self.out_offset)
        if self.machine is not None:
            self.machine.discard_pending_input(self)

    def _check(self, version_id):
        if self.log_base + len(self.log) != self.out_offset:
            raise StateError(f"colo-link: log [{self.log_base}, +{len(self.log)}) does not end at "
                             f"out_offset {self.out_offset}")

    VMSTATE = VMStateDescription("colo-link", version_id=1, minimum_version_id=1, fields=[
        U64("in_offset"), U64("out_offset"), U64("log_base"), VarBytes("log", MAX_LOG),
    ], post_load=_check)

    # ------------------------------------------------------------------ helpers
    def _queue(self, message):
        self.outgoing += message

    def _lost(self, reason):
        if self.connected:
            self._say(f"lost the proxy: {reason}")
        self._disconnect()

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

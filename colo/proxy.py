"""The client endpoint of a COLO pair (``emu colo proxy``): mirrors input, compares and releases output.

The client talks only to this process.  Its input is one stream, mirrored to both VMs; their
output comes back as two streams (:mod:`colo.proxywire`, every byte addressed by its absolute
offset) and the proxy decides which bytes the client gets.  The rule it keeps: a byte reaches
the client only once the pair can no longer take it back.

* Input.  Client bytes are appended to the input log; each VM connection is sent (``IN``)
  what it has not been sent yet.  The log is kept from the ``in_offset`` of the last
  ``SYNC`` (a re-synced secondary is sent input again from there), or in solo mode from what
  the active VM has been sent.  More than 1 MiB not yet sent to every VM stops reading the
  client.
* Output.  ``OUT`` is appended to that connection's stream (which starts wherever its first
  ``OUT`` does); bytes already held or released are dropped, a gap is a protocol error.
  ``R`` (``released``) counts the bytes written to the client socket; bytes decided but not
  yet written (no client, or a slow one) are held and go to whichever client comes next.
  Every change of ``R`` is sent as ``RELEASED``.
* Modes.  ``waiting`` (no pair yet): the primary serves unprotected, its output released as
  it comes, up to a ``MARK``: the primary marks its stream when it pauses for the end of
  the initial migration (checkpoint 0), so that nothing beyond what the secondary will hold
  goes out before that checkpoint's ``SYNC``.
  ``paired`` (after a ``SYNC``): in compare mode the primary's and the secondary's streams
  are compared and the common prefix is released; at the first difference the primary is
  asked for a checkpoint (``CHECKPOINT mismatch ...``) and nothing more goes out until the
  next ``SYNC``; primary output left unmatched for ``compare_timeout_ms`` (counted from its
  arrival, or from the last ``SYNC`` if later: the secondary needs that long to produce its
  twin) asks for one too (``timeout ...``).  In passive mode only what a ``SYNC`` commits is
  released.  A ``MARK`` holds back every byte from its offset until the ``SYNC`` of that
  checkpoint (or an ``UNMARK``).  ``solo`` (after an accepted ``TAKEOVER``): the active VM's
  stream is released as it arrives.
* ``SYNC`` carries the primary's committed output: it is released at once, the secondary's
  stream restarts at ``out_offset`` and its input at ``in_offset``.
* ``TAKEOVER`` is accepted only with an epoch above every epoch accepted before (the arbiter's
  lease); the other VM's connection is closed and nothing it sends is released again (a new
  connection is a fresh VM, released only after its own, higher, takeover).
* A VM connection that closes changes nothing else: the proxy holds output until a takeover.

Single-threaded (``selectors``, non-blocking sockets); :meth:`ColoProxy.step` is one round.
"""

import collections
import json
import os
import selectors
import sys
import time

from emu.chardev import listen_tcp
from emu.errors import ConfigError, EmuError

from . import proxywire as pw
from .netloop import BufferedConn, CommandParser, SelectorServer, failed_to_start, serve_until_signalled

INPUT_BACKLOG = 1 << 20        # client input not yet sent to every VM beyond which the client is not read
SOLO_INPUT_KEPT = 4 << 20      # input kept behind what a VM serving alone was sent (re-protection)
VM_QUEUE = 256 << 10           # IN is queued for a VM only while less than this waits in its socket buffer
MAX_QUEUE = 32 << 20           # a peer that lets more than this pile up (does not read) is dropped
RECV_SIZE = 256 << 10
SEND_CHUNK = 1 << 20
STATUS_INTERVAL_S = 0.1
VM_ROLES = ("primary", "secondary")
OTHER = {"primary": "secondary", "secondary": "primary"}


def _common_prefix(a, b):
    """Length of the common prefix of two equally long byte strings."""
    if a == b:
        return len(a)
    lo = 0
    while a[lo:lo + 4096] == b[lo:lo + 4096]:
        lo += 4096
    while a[lo] == b[lo]:
        lo += 1
    return lo


class _Stream:
    """One VM connection's output as the proxy holds it: bytes ``[base, base + len(data))``.

    ``base`` is None until the first OUT, which anchors the stream wherever the VM is.
    """

    def __init__(self):
        self.base = None
        self.data = bytearray()

    @property
    def end(self):
        return None if self.base is None else self.base + len(self.data)

    def add(self, offset, chunk):
        """Take OUT(offset, chunk): returns how many new bytes it brought."""
        if self.base is None:
            self.base = offset
        end = self.base + len(self.data)
        if offset > end:
            raise pw.ProxyProtocolError(f"OUT at offset {offset} leaves a gap: the stream ends at {end}")
        fresh = chunk[end - offset:]
        self.data += fresh
        return len(fresh)

    def drop_below(self, offset):
        if self.base is not None and offset > self.base:
            del self.data[:offset - self.base]
            self.base = offset

    def restart(self, base):
        self.base = base
        self.data.clear()

    def view(self, start, stop):
        return self.data[start - self.base:stop - self.base]


class _Conn(BufferedConn):
    """A connection on the VM listener: a primary, a secondary or a monitor once it said HELLO."""

    def __init__(self, sock, peer):
        super().__init__(sock, peer)
        self.reader = pw.frame_reader()
        self.open = True
        self.role = None
        self.node = ""
        self.mode = "compare"
        self.stream = _Stream()
        self.out_end = 0                       # where its output stream stands (status)
        self.in_sent = 0                       # input below this offset was queued to it
        self.arrivals = collections.deque()    # (stream end, monotonic time) of each OUT, primary only
        self.gap_logged = False
        self.released_told = 0                 # the last RELEASED it was sent
        self.early_sync = None                 # a standby secondary's SYNC before its primary's PROMOTE
        # the endpoint's output offset minus the VM's own: a former secondary's output ran in
        # offsets of its own, and the pair it re-protects (its copy included) goes on in them
        self.out_shift = 0

    def __str__(self):
        return f"{self.role} {self.node}" if self.role else f"unidentified peer {self.peer}"


class ColoProxy(SelectorServer):
    """The endpoint: a client listener, a VM listener and the release decisions between them.

    ``step``, ``serve_forever`` and ``close`` are :class:`colo.netloop.SelectorServer`'s.
    """

    CHANNEL = "serial"  # the VMs' links must carry this (HELLO)

    def __init__(self, client=("127.0.0.1", 0), listen=("127.0.0.1", 0), compare_timeout_ms=100, log=None):
        if isinstance(compare_timeout_ms, bool) or not isinstance(compare_timeout_ms, (int, float)) \
                or compare_timeout_ms <= 0:
            raise ConfigError(f"proxy: compare timeout must be a positive number of milliseconds, "
                              f"not {compare_timeout_ms!r}")
        self.compare_timeout = compare_timeout_ms / 1000
        self._log_file = log
        client_listener = None
        if client is not None:  # else a subclass owns the client side (colo.netproxy: a wire)
            client_listener = listen_tcp(client[0], client[1], 16,
                                         lambda reason: EmuError(f"proxy: client side: {reason}"))
            self.client_host, self.client_port = client_listener.getsockname()[:2]
        try:
            vm_listener = listen_tcp(listen[0], listen[1], 16, lambda reason: EmuError(f"proxy: VM side: {reason}"))
        except EmuError:
            if client_listener is not None:
                client_listener.close()
            raise
        self.listen_host, self.listen_port = vm_listener.getsockname()[:2]
        super().__init__()
        if client_listener is not None:
            self._listen(client_listener, "accepting a client", self._client_connected)
        self._listen(vm_listener, "accepting a VM connection", lambda sock, peer: self._add(_Conn(sock, peer)))
        # connections (self._conns: every VM-listener connection)
        self._vms = {"primary": None, "secondary": None}  # the live connection of each role
        self._last = {"primary": None, "secondary": None}  # the latest connection of each role (for status)
        self._lost_at = {"primary": None, "secondary": None}
        self._client = None
        self._client_peer = None
        self._client_events = 0
        # input
        self._input = bytearray()
        self._in_base = 0
        self._trim_floor = 0
        # output
        self.released = 0            # R: bytes handed to a client socket
        self._held = bytearray()     # decided bytes [R, R + len) not handed to a client yet
        # modes
        self.mode = "waiting"
        self.epoch = 0
        self._epoch_holder = None
        self._active = None          # the connection served alone (solo mode)
        self._standby = None         # a secondary connected while the former secondary serves alone
        self._active_role = None
        self._synced = None          # the secondary connection of the last SYNC
        self._paired_mode = "compare"
        self._sync_time = 0.0
        self._marks = {}             # seq -> output offset
        self._synced_seq = None      # checkpoint of the last SYNC since the last takeover
        self._diverged_at = None
        self._mismatch_requested = False
        self._timeout_requested_at = None
        # figures
        self.mismatches = 0
        self.checkpoint_requests = {"mismatch": 0, "timeout": 0}
        self.syncs = 0
        self.last_sync_seq = None
        self.takeovers = 0
        self.failover_ms = None

    # ------------------------------------------------------------------ loop
    def _close_peers(self):
        for conn in list(self._conns):
            conn.sock.close()
        if self._client is not None:
            self._client.close()

    def _log(self, message):
        print(f"proxy: {message}", file=sys.stderr if self._log_file is None else self._log_file, flush=True)

    # ------------------------------------------------------------------ status
    def status(self):
        def vm(role):
            conn = self._last[role]
            info = {"connected": self._vms[role] is not None, "node": conn.node if conn else None,
                    "out_end": conn.out_end if conn else 0}
            if role == "secondary":
                info["mode"] = conn.mode if conn else None
            return info
        return {"mode": self.mode, "active": self._active_role if self.mode == "solo" else None,
                "epoch": self.epoch, "released": self.released, "held": len(self._held),
                "input": self._in_base + len(self._input), "primary": vm("primary"), "secondary": vm("secondary"),
                "mismatches": self.mismatches, "checkpoint_requests": dict(self.checkpoint_requests),
                "syncs": self.syncs, "last_sync_seq": self.last_sync_seq, "takeovers": self.takeovers,
                "failover_ms": self.failover_ms, "client_connected": self._client is not None}

    # ------------------------------------------------------------------ the client
    def _client_connected(self, sock, peer):
        if self._client is not None:
            self._log(f"refused a second client from {peer}: {self._client_peer} is connected")
            sock.close()
            return
        self._client, self._client_peer, self._client_events = sock, peer, 0
        self._log(f"client connected from {peer}" + (f" ({len(self._held)} bytes held for it)"
                                                      if self._held else ""))

    def _client_io(self, events):
        if self._client is None or not events & selectors.EVENT_READ:
            return
        try:
            data = self._client.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._drop_client(f"lost: {e.strerror or e}")
            return
        if not data:
            self._drop_client("disconnected")
            return
        self._input += data

    def _drop_client(self, how):
        if self._client_events:
            self._sel.unregister(self._client)
        self._client.close()
        self._log(f"client {self._client_peer} {how}")
        self._client, self._client_peer, self._client_events = None, None, 0

    def _flush_client(self):
        while self._client is not None and self._held:
            try:
                n = self._client.send(self._held[:SEND_CHUNK])
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._drop_client(f"lost: {e.strerror or e}")
                return
            del self._held[:n]
            self.released += n

    def _input_backlog(self):
        sent = [c.in_sent for c in self._vms.values() if c is not None]
        return self._in_base + len(self._input) - (min(sent) if sent else self._in_base)

    def _update_client_interest(self):
        if self._client is None:
            return
        events = (selectors.EVENT_READ if self._input_backlog() <= INPUT_BACKLOG else 0) | \
            (selectors.EVENT_WRITE if self._held else 0)
        if events == self._client_events:
            return
        if not self._client_events:
            self._sel.register(self._client, events, self._client_io)
        elif not events:
            self._sel.unregister(self._client)
        else:
            self._sel.modify(self._client, events, self._client_io)
        self._client_events = events

    # ------------------------------------------------------------------ VM connections
    def _serve(self, conn, events):
        if not conn.open:
            return
        if events & selectors.EVENT_WRITE:
            self._flush_conn(conn)
        if not conn.open or not events & selectors.EVENT_READ:
            return
        try:
            data = conn.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._lost(conn, f"connection lost: {e.strerror or e}")
            return
        if not data:
            self._lost(conn, "closed its connection", error=False)
            return
        now = time.monotonic()
        conn.reader.feed(data)
        try:
            for kind, payload in conn.reader.frames():
                self._message(conn, kind, payload, now)
                if not conn.open:
                    return
        except pw.ProxyProtocolError as e:
            self._lost(conn, f"protocol error: {str(e).removeprefix('proxy: ')}; closing its connection")

    def _flush_conn(self, conn):
        try:
            conn.flush(self._sel)
        except OSError as e:
            self._lost(conn, f"connection lost: {e.strerror or e}")
            return
        if len(conn.wbuf) > MAX_QUEUE:
            self._lost(conn, f"does not read what it is sent ({len(conn.wbuf)} bytes wait); closing its connection")

    def _lost(self, conn, why, error=True):
        """A VM connection ends (closed, broken, or closed by us for cause): everything it sent is kept."""
        if not conn.open:
            return
        if conn.role in VM_ROLES and self._vms[conn.role] is conn:
            self._lost_at[conn.role] = time.monotonic()
            held = " (it was serving alone: output is held until a takeover)" if conn is self._active else ""
            self._log(f"{conn} {why}{held}")
        elif error or conn.role != "monitor":
            self._log(f"{conn} {why}")
        self._close_conn(conn)

    def _close_conn(self, conn):
        conn.open = False
        if conn is self._standby:
            self._standby = None
        if conn.role in VM_ROLES and self._vms[conn.role] is conn:
            self._vms[conn.role] = None
        self._remove(conn)

    # ------------------------------------------------------------------ messages
    def _message(self, conn, kind, payload, now):
        if conn.role is None:
            if kind != pw.HELLO:
                raise pw.ProxyProtocolError(f"{pw.NAMES[kind]} before HELLO")
            self._hello(conn, pw.parse_hello(payload))
        elif kind == pw.STATUS:
            conn.send(pw.frame(pw.STATUS, json.dumps(self.status()).encode()))
        elif conn.role == "monitor":
            raise pw.ProxyProtocolError(f"a monitor may only send STATUS, not {pw.NAMES[kind]}")
        elif kind == pw.OUT:
            offset, chunk = pw.parse_data(payload)
            offset += conn.out_shift
            if conn.stream.add(offset, chunk) and conn.role == "primary":
                conn.arrivals.append((conn.stream.end, now))
            conn.out_end = max(conn.out_end, offset + len(chunk))
        elif kind == pw.TAKEOVER:
            self._takeover(conn, pw.parse_offset(payload), now)
        elif kind == pw.PROMOTE:
            self._promote(conn)
        elif kind == pw.MARK and conn.role == "primary":
            seq, offset = pw.parse_mark(payload)
            if self._synced_seq is None or seq > self._synced_seq:  # else its SYNC came first
                self._marks[seq] = offset + conn.out_shift
        elif kind == pw.UNMARK and conn.role == "primary":
            self._marks.pop(pw.parse_offset(payload), None)
            self._mismatch_requested = False
            self._timeout_requested_at = None
        elif kind == pw.SYNC and conn is self._standby:
            conn.early_sync = payload  # ahead of its primary's PROMOTE (another connection): taken then
        elif kind == pw.SYNC and conn.role == "secondary":
            self._sync(conn, *pw.parse_sync(payload), now)
        else:
            raise pw.ProxyProtocolError(f"unexpected {pw.NAMES[kind]} from a {conn.role}")

    def _hello(self, conn, info):
        role = info["role"]
        conn.role, conn.node, conn.mode = role, str(info.get("node") or role), info.get("mode", "compare")
        if role == "monitor":
            return
        channel = info.get("channel", "serial")
        if channel != self.CHANNEL:
            what = {"serial": "a serial link (-serial colo:)", "net": "a network link (-netdev colo)"}
            self._log(f"refused {conn.node} from {conn.peer}: it has {what[channel]}, this endpoint serves "
                      f"{what[self.CHANNEL]}")
            self._close_conn(conn)
            return
        current = self._vms[role]
        if current is not None and current is self._active and role == "secondary" and self._standby is None:
            # the former secondary serves alone: this is the secondary of the pair it will form
            self._standby = conn
            self._log(f"{conn} connected from {conn.peer}, {conn.mode}: waits until {current} re-protects")
            return
        if current is not None:
            self._log(f"refused a second {role} connection ({conn.node} from {conn.peer}): "
                      f"{current.node} is connected as the {role}")
            self._close_conn(conn)
            return
        self._vms[role] = self._last[role] = conn
        conn.in_sent = self._in_base
        mode = f", {conn.mode}" if role == "secondary" else ""
        self._log(f"{conn} connected from {conn.peer}{mode}")
        conn.send(pw.offset_message(pw.EPOCH, self.epoch))
        self._tell_released(conn)

    def _tell_released(self, conn):
        """RELEASED to ``conn`` when what it may forget of its output moved."""
        released = self._released_for(conn) - conn.out_shift
        if released != conn.released_told:
            conn.released_told = released
            conn.send(pw.offset_message(pw.RELEASED, released))

    def _released_for(self, conn):
        """The offset of ``conn``'s output below which it may drop its log: both VMs write the
        same serial stream, so it is what reached the client."""
        return self.released

    def _sync(self, conn, seq, in_offset, out_offset, log_base, log, now):
        out_offset, log_base = out_offset + conn.out_shift, log_base + conn.out_shift
        decided = self.released + len(self._held)
        if self.mode == "solo" and self._active_role == "secondary":
            self._log(f"SYNC {seq} from {conn} ignored: the secondary serves alone")
            return
        if log_base > decided:
            raise pw.ProxyProtocolError(
                f"SYNC {seq} commits output from offset {log_base} on, but only {decided} bytes were released: "
                f"OUTPUT [{decided}, {log_base}) IS LOST")
        in_end = self._in_base + len(self._input)
        if not self._in_base <= in_offset <= in_end:
            raise pw.ProxyProtocolError(f"SYNC {seq} continues input at offset {in_offset}, but the proxy holds "
                                        f"input [{self._in_base}, {in_end}) only")
        committed = log[decided - log_base:] if out_offset > decided else b""
        self._held += committed
        conn.stream.restart(out_offset)
        conn.out_end = out_offset
        conn.gap_logged = False
        conn.in_sent = in_offset
        self._synced = conn
        self._paired_mode = conn.mode
        self._trim_floor = max(self._trim_floor, in_offset)
        self._marks = {s: off for s, off in self._marks.items() if s > seq}
        self._diverged_at = None
        self._mismatch_requested = False
        self._timeout_requested_at = None
        self._sync_time = now
        self._synced_seq = seq
        self.syncs += 1
        self.last_sync_seq = seq
        self._synced_now(committed)
        self._set_mode("paired", f"checkpoint {seq} from {conn}, {conn.mode}")

    def _synced_now(self, committed):
        """A subclass's part of a SYNC: ``committed`` is the output it released."""

    def _took_over(self, conn):
        """A subclass's part of an accepted takeover by ``conn``."""

    def _takeover(self, conn, epoch, now):
        if epoch == self.epoch and conn is self._active:
            conn.send(pw.frame(pw.ACTIVE))  # the same request again: the answer again
            return
        if epoch <= self.epoch:
            holder = self._epoch_holder or "nobody (the initial epoch)"
            reason = f"epoch {epoch} is not above {self.epoch} held by {holder}"
            self._log(f"refused the takeover by {conn}: {reason}")
            conn.send(pw.frame(pw.REFUSED, reason.encode()))
            return
        other_role = OTHER[conn.role]
        other = self._vms[other_role]
        lost_at = self._lost_at[other_role] if other is None and self._lost_at[other_role] is not None else now
        self.failover_ms = round((time.monotonic() - lost_at) * 1000, 3)
        self.epoch, self._epoch_holder = epoch, conn.node
        self._active, self._active_role = conn, conn.role
        self.takeovers += 1
        self._marks.clear()
        self._synced_seq = None
        self._diverged_at = None
        self._mismatch_requested = False
        self._timeout_requested_at = None
        conn.send(pw.frame(pw.ACTIVE))
        conn.send(pw.offset_message(pw.EPOCH, epoch))
        if other is not None:
            how = f"{other} was still connected: fenced off, its connection closed"
            self._close_conn(other)
        elif self._lost_at[other_role] is not None:
            how = f"{self.failover_ms:.1f} ms after the {other_role}'s connection closed"
        else:
            how = f"no {other_role} was ever connected"
        self._log(f"takeover by {conn} with epoch {epoch} accepted ({how})")
        self._set_mode("solo", f"{conn} serves alone")
        self._took_over(conn)

    def _promote(self, conn):
        """Re-protection: the VM serving alone becomes the primary of a pair still to form."""
        if self.mode != "solo" or conn is not self._active:
            raise pw.ProxyProtocolError(f"PROMOTE from {conn}, which does not serve alone")
        self._promoting(conn)
        if conn.role == "secondary":
            self._vms["secondary"] = None
            conn.role = "primary"
        self._vms["primary"] = self._last["primary"] = conn
        conn.arrivals.clear()
        self._marks.clear()
        self._synced = None
        self._log(f"{conn} is the primary again (epoch {self.epoch}): its output goes out unprotected until "
                  f"a secondary's first checkpoint")
        self._set_mode("waiting", f"{conn} re-protects")
        standby, self._standby = self._standby, None
        if standby is not None and standby.open:
            self._vms["secondary"] = self._last["secondary"] = standby
            standby.in_sent = self._in_base
            standby.out_shift = conn.out_shift  # a copy of the new primary: its offsets
            standby.send(pw.offset_message(pw.EPOCH, self.epoch))
            if standby.early_sync is not None:
                self._sync(standby, *pw.parse_sync(standby.early_sync), time.monotonic())

    def _promoting(self, conn):
        """A subclass's part of a promotion of ``conn``, before it becomes the primary."""

    def _set_mode(self, mode, why):
        if mode != self.mode:
            self._log(f"mode {self.mode} -> {mode} ({why})")
            self.mode = mode
        if mode != "solo":
            self._active, self._active_role = None, None

    # ------------------------------------------------------------------ release decisions
    def _round(self, now):
        """After the I/O of a round: decide what is released, ask for checkpoints, move input and output."""
        if self.mode == "paired":
            self._advance_paired()
        elif self.mode == "solo":
            self._advance_solo()
        else:
            self._advance_waiting()
        decided = self.released + len(self._held)
        self._trim_streams(decided)
        deadline = self._deadline()
        if deadline is not None and now >= deadline:
            self._timeout_requested_at = now
            self._request_checkpoint(self._vms["primary"], "timeout",
                                     f"timeout: primary output at offset {decided} waited "
                                     f"{self.compare_timeout * 1000:.0f} ms for its twin")
        self._flush_client()
        self._pump_input()
        if self.mode == "solo" and self._active is not None and self._active.open:
            # kept a while behind what it was sent: if it re-protects, the new pair's checkpoint 0
            # continues input where the VM's UART or NIC had taken it, which may be a little behind
            self._trim_floor = max(self._trim_floor, self._active.in_sent - SOLO_INPUT_KEPT)
        if self._trim_floor > self._in_base:
            del self._input[:self._trim_floor - self._in_base]
            self._in_base = self._trim_floor
        for conn in self._vms.values():
            if conn is not None:
                self._tell_released(conn)
        for conn in list(self._conns):
            self._flush_conn(conn)
        self._update_client_interest()

    def _trim_streams(self, decided):
        for conn in self._vms.values():
            if conn is not None:  # what is decided is never needed again
                conn.stream.drop_below(decided)
                while conn.arrivals and conn.arrivals[0][0] <= decided:
                    conn.arrivals.popleft()

    def _advance_paired(self):
        p, s = self._vms["primary"], self._synced
        if self._paired_mode == "passive" or p is None or s is None or not s.open:
            return  # passive: SYNC releases; a VM gone: wait for a takeover
        decided = self.released + len(self._held)
        P, S = p.stream, s.stream
        if self._diverged_at is None and P.base is not None:
            P.drop_below(decided)
            S.drop_below(decided)
            if self._gap(p, decided) or self._gap(s, decided):
                return
            limit = min([P.end, S.end] + list(self._marks.values()))
            if limit > decided:
                a, b = P.view(decided, limit), S.view(decided, limit)
                n = _common_prefix(a, b)
                self._held += a[:n]
                if n < len(a):
                    self._diverged_at = decided + n
                    self.mismatches += 1
                    self._log(f"output differs at offset {self._diverged_at} (primary {bytes(a[n:n + 1])!r}, "
                              f"secondary {bytes(b[n:n + 1])!r}): holding output until the next checkpoint")
        if self._diverged_at is not None and not self._mismatch_requested:
            self._mismatch_requested = True
            self._request_checkpoint(p, "mismatch", f"mismatch at offset {self._diverged_at}")

    def _deadline(self):
        """When unmatched primary output asks for a checkpoint (None: nothing waits, or nothing to compare)."""
        p, s = self._vms["primary"], self._synced
        if self.mode != "paired" or self._paired_mode != "compare" or p is None or s is None or not s.open \
                or self._diverged_at is not None or not p.arrivals:
            return None
        if self._timeout_requested_at is not None:
            return self._timeout_requested_at + self.compare_timeout
        return max(p.arrivals[0][1], self._sync_time) + self.compare_timeout

    def _request_checkpoint(self, primary, kind, reason):
        self.checkpoint_requests[kind] += 1
        primary.send(pw.frame(pw.CHECKPOINT, reason.encode()))

    def _gap(self, conn, decided):
        """True (said once, loudly) if the stream of ``conn`` starts above ``decided``."""
        if conn.stream.base <= decided:
            return False
        if not conn.gap_logged:
            conn.gap_logged = True
            self._log(f"{conn} streams output from offset {conn.stream.base}, but the client has been given "
                      f"only {decided} bytes: BYTES [{decided}, {conn.stream.base}) ARE MISSING, holding its output")
        return True

    def _advance_waiting(self):
        """No pair yet: the primary's output goes out unprotected, up to its first MARK."""
        conn = self._vms["primary"]
        if conn is None or not conn.open or conn.stream.base is None:
            return
        decided = self.released + len(self._held)
        conn.stream.drop_below(decided)
        if self._gap(conn, decided):
            return
        limit = min([conn.stream.end] + list(self._marks.values()))
        if limit > decided:
            self._held += conn.stream.view(decided, limit)
            conn.stream.drop_below(limit)

    def _advance_solo(self):
        conn = self._active
        if conn is None or not conn.open or conn.stream.base is None:
            return
        decided = self.released + len(self._held)
        conn.stream.drop_below(decided)
        if self._gap(conn, decided):
            return
        self._held += conn.stream.data
        conn.stream.drop_below(conn.stream.end)

    def _pump_input(self):
        end = self._in_base + len(self._input)
        for conn in self._vms.values():
            if conn is None:
                continue
            conn.in_sent = max(conn.in_sent, self._in_base)
            while conn.in_sent < end and len(conn.wbuf) < VM_QUEUE:
                start = conn.in_sent - self._in_base
                chunk = self._input[start:start + 65536]
                conn.send(pw.data(pw.IN, conn.in_sent, chunk))
                conn.in_sent += len(chunk)


# ---------------------------------------------------------------------- command
def _write_status(path, text):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _endpoint(parser, args):
    """The serial endpoint (``--client``) or the network one (``--netdev``) that ``args`` ask for."""
    listen = parser.tcp_address(args.listen, "--listen")
    if not args.netdev:
        return ColoProxy(parser.tcp_address(args.client, "--client"), listen, args.compare_timeout, sys.stderr)
    from .netproxy import NetProxy, open_wire
    wire = open_wire(args.netdev)
    try:
        return NetProxy(wire, listen, args.compare_timeout, sys.stderr)
    except EmuError:
        wire.close()
        raise


def main(argv):
    """``emu colo proxy --client tcp:HOST:PORT|--netdev tap,ifname=TAP --listen tcp:HOST:PORT``:
    serve until SIGTERM or SIGINT."""
    parser = CommandParser("proxy", "The client endpoint of a COLO pair: mirror input, compare and release output.")
    side = parser.add_mutually_exclusive_group(required=True)
    side.add_argument("--client", metavar="tcp:HOST:PORT",
                      help="serial pair: where the client connects (HOST defaults to 127.0.0.1)")
    side.add_argument("--netdev", metavar="tap,ifname=TAP|socket,listen=:PORT",
                      help="network pair: the host side of the VMs' NIC (-netdev colo on the VMs)")
    parser.add_argument("--listen", required=True, metavar="tcp:HOST:PORT",
                        help="where the VMs' links connect (HOST defaults to 127.0.0.1)")
    parser.add_argument("--compare-timeout", type=int, default=100, metavar="MS",
                        help="ask for a checkpoint when primary output waits this long for its twin (default 100)")
    parser.add_argument("--status-file", metavar="PATH", help="keep the figures here as JSON (every 100 ms at most)")
    try:
        args = parser.parse_args(argv)
        proxy = _endpoint(parser, args)
    except EmuError as e:
        return failed_to_start(e)
    written = None
    if args.status_file:
        written = json.dumps(proxy.status())
        try:
            _write_status(args.status_file, written)
        except OSError as e:
            proxy.close()
            print(f"proxy: --status-file: cannot write {args.status_file!r}: {e.strerror or e}", file=sys.stderr)
            return 2
    client_side = f"wire {args.netdev}" if args.netdev else f"client on {proxy.client_host}:{proxy.client_port}"
    print(f"proxy: {client_side}, VMs on {proxy.listen_host}:{proxy.listen_port}", file=sys.stderr, flush=True)
    next_write = time.monotonic() + STATUS_INTERVAL_S

    def update_status_file():
        nonlocal next_write, written
        now = time.monotonic()
        if now >= next_write:
            next_write = now + STATUS_INTERVAL_S
            text = json.dumps(proxy.status())
            if text != written:
                try:
                    _write_status(args.status_file, text)
                    written = text
                except OSError as e:
                    print(f"proxy: --status-file: cannot write {args.status_file!r}: {e.strerror or e}",
                          file=sys.stderr, flush=True)

    try:
        if args.status_file:
            serve_until_signalled(proxy, STATUS_INTERVAL_S, update_status_file)
        else:
            serve_until_signalled(proxy)
    finally:
        if args.status_file:
            try:
                _write_status(args.status_file, json.dumps(proxy.status()))
            except OSError:
                pass
        proxy.close()
    print("proxy: stopped", file=sys.stderr, flush=True)
    return 0

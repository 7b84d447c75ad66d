"""The lease arbiter (``emu colo arbiter``): the witness both VMs of a pair ask before serving alone.

When the replication link is cut but both VMs live, each would take over and the client would
be served by two diverging machines (split brain).  Real deployments settle this with shared
storage or a quorum witness; here a small independent process stands in: a VM serves alone only
while it holds its pair's lease, and at most one node holds a lease at a time.

Protocol: TCP, one JSON object per line (UTF-8, ``\\n``-terminated, at most 4096 bytes), one reply
per request, on a persistent connection per client.  Every request names the ``group`` (the
pair) and, except ``status``, the ``node``:

``{"op": "acquire", "group", "node", "bump": false}``
    Granted when nobody holds the lease, when the holder's lease expired (no acquire or renew
    within ``lease_ms``), when the holder's connection closed, or when the holder is this node
    (a renewal; ``"bump": true`` issues it a new epoch).  Reply
    ``{"ok": true, "epoch", "holder", "lease_ms"}``; refused:
    ``{"ok": false, "holder", "epoch", "expires_in_ms", "error": "lease held by H"}``.
``{"op": "renew", "group", "node", "epoch"}``
    Refreshes the lease while ``node`` holds ``epoch`` on this connection; otherwise
    ``{"ok": false, "error": "lease lost: ..."}``.
``{"op": "release", "group", "node", "epoch"}``
    Frees the lease if that node holds that epoch here: ``{"ok": true, "released": bool}``.
``{"op": "status", "group"}``
    ``{"ok": true, "holder": H or null, "epoch", "expires_in_ms": X or null}``.

A lease belongs to the connection that acquired it and is freed the moment that connection
closes: a dead VM process gives up its lease without waiting for the expiry, which is what makes
failover fast.  A node that acquires over a new connection while its old one still holds the
lease gets a new epoch there (the old connection's epoch is void).  Every grant to a new holder
and every bump increments the group's epoch, so epochs strictly increase and the proxy can refuse
a TAKEOVER that is not above the last one it accepted.  Epochs live in memory only: a restarted
arbiter counts from 0 again.

A line that is too long, is not JSON or is not a valid request gets ``{"ok": false, "error"}``
and its connection is closed (which frees the leases it held).
"""

import json
import selectors
import socket
import sys
import time

from emu.chardev import listen_tcp
from emu.errors import ConfigError, EmuError

from .netloop import BufferedConn, CommandParser, SelectorServer, failed_to_start, serve_until_signalled
from .wire import parse_tcp_uri

MAX_LINE = 4096               # bytes of one request line, without its newline
MAX_NAME = 128                # characters of a group or node name
MAX_REPLY = 64 * 1024         # a client that does not read its replies is dropped past this
LINGER_S = 1.0                # a rejected connection's input is drained this long so the error reply arrives
OPS = ("acquire", "renew", "release", "status")


class ArbiterError(EmuError):
    """The arbiter is unreachable, did not answer in time, or broke the protocol."""


class LeaseRefused(ArbiterError):
    """Another node holds the lease (``holder``, ``epoch``, ``expires_in_ms`` say which and how long)."""

    def __init__(self, message, holder=None, epoch=None, expires_in_ms=None):
        super().__init__(message)
        self.holder = holder
        self.epoch = epoch
        self.expires_in_ms = expires_in_ms


class LeaseLost(ArbiterError):
    """The lease this node held is gone (expired, taken over, or its connection was lost)."""


class _BadRequest(Exception):
    """A request the arbiter cannot understand: the reply is an error and the connection closes."""


class _Group:
    """One pair's lease: who holds which epoch, on which connection, until when."""

    def __init__(self):
        self.epoch = 0
        self.holder = None
        self.conn = None
        self.deadline = None      # time.monotonic() at which the lease expires
        self.ended = "no lease was granted yet"  # how the last lease ended, for "lease lost" replies
        self.refused = set()      # nodes refused under the current epoch (each is logged once)


class _Conn(BufferedConn):
    def __init__(self, sock, peer):
        super().__init__(sock, peer)
        self.rbuf = bytearray()
        self.groups = set()       # names of the groups whose lease this connection holds
        self.closing = False      # rejected: send the error reply, then close
        self.linger_until = None  # after the reply went out: drain input until EOF or this time


def _ms(seconds):
    return max(0, round(seconds * 1000))


class Arbiter(SelectorServer):
    """The lease server: one thread serves every client.

    ``step``, ``serve_forever`` and ``close`` are :class:`colo.netloop.SelectorServer`'s.
    """

    def __init__(self, listen=("127.0.0.1", 0), lease_ms=1000, log=None):
        if isinstance(lease_ms, bool) or not isinstance(lease_ms, int) or lease_ms <= 0:
            raise ConfigError(f"arbiter: lease must be a positive number of milliseconds, not {lease_ms!r}")
        self.lease_ms = lease_ms
        self._log_file = sys.stderr if log is None else log
        host, port = listen
        listener = listen_tcp(host, port, 64, lambda reason: EmuError(f"arbiter: {reason}"))
        self.host, self.port = listener.getsockname()[:2]
        self._groups = {}
        super().__init__()
        self._listen(listener, "accept", lambda sock, peer: self._add(_Conn(sock, peer)))
        self._log(f"listening on {self.host}:{self.port} (lease {lease_ms} ms)")

    # ------------------------------------------------------------------ loop
    def _round(self, now):
        """After the I/O of a round: expire leases, end the lingering of rejected connections."""
        for name, group in self._groups.items():
            self._expire(name, group, now)
        for conn in [c for c in self._conns if c.linger_until is not None and c.linger_until <= now]:
            self._drop(conn)

    def _deadline(self):
        deadlines = [g.deadline for g in self._groups.values() if g.holder is not None]
        deadlines += [c.linger_until for c in self._conns if c.linger_until is not None]
        return min(deadlines) if deadlines else None

    def _close_peers(self):
        for conn in list(self._conns):
            self._drop(conn)

    def _log(self, message):
        print(f"arbiter: {message}", file=self._log_file, flush=True)

    # ------------------------------------------------------------------ connections
    def _serve(self, conn, events):
        if events & selectors.EVENT_WRITE:
            self._flush(conn)
            if conn not in self._conns:
                return
        if not events & selectors.EVENT_READ:
            return
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(conn)
            return
        if conn.closing:
            return  # a rejected connection: its input is discarded
        conn.rbuf += data
        while not conn.closing:
            end = conn.rbuf.find(b"\n")
            if end < 0 and len(conn.rbuf) <= MAX_LINE:
                break
            if end < 0 or end > MAX_LINE:
                self._reject(conn, f"request line longer than {MAX_LINE} bytes")
                break
            line = bytes(conn.rbuf[:end])
            del conn.rbuf[:end + 1]
            try:
                reply = self._handle(conn, _parse(line))
            except _BadRequest as e:
                self._reject(conn, str(e))
                break
            self._send(conn, reply)
        if conn in self._conns:
            self._flush(conn)

    def _send(self, conn, reply):
        conn.send(json.dumps(reply).encode() + b"\n")

    def _flush(self, conn):
        try:
            conn.flush(self._sel)
        except OSError:
            self._drop(conn)
            return
        if len(conn.wbuf) > MAX_REPLY:
            self._log(f"dropping {conn.peer}: it does not read its replies")
            self._drop(conn)
            return
        if conn.closing and not conn.wbuf and conn.linger_until is None:
            # half-close and drain: closing with unread input would reset the connection and
            # could destroy the error reply before the client reads it
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            conn.linger_until = time.monotonic() + LINGER_S

    def _reject(self, conn, message):
        self._log(f"rejected a request from {conn.peer}: {message}")
        self._send(conn, {"ok": False, "error": message})
        conn.closing = True
        conn.rbuf.clear()
        self._free_leases_of(conn, "freed: its connection broke the protocol")

    def _drop(self, conn):
        if conn not in self._conns:
            return
        self._remove(conn)
        self._free_leases_of(conn, "freed: its connection closed")

    def _free_leases_of(self, conn, how):
        for name in list(conn.groups):
            self._free(name, self._groups[name], how)

    # ------------------------------------------------------------------ leases
    def _handle(self, conn, request):
        op, name = request["op"], request["group"]
        now = time.monotonic()
        group = self._groups.setdefault(name, _Group()) if op == "acquire" else self._groups.get(name, _Group())
        self._expire(name, group, now)
        if op == "acquire":
            return self._acquire(conn, name, group, request["node"], request.get("bump", False), now)
        if op == "renew":
            return self._renew(conn, name, group, request["node"], request["epoch"], now)
        if op == "release":
            return self._release(conn, name, group, request["node"], request["epoch"])
        return {"ok": True, "holder": group.holder, "epoch": group.epoch,
                "expires_in_ms": None if group.holder is None else _ms(group.deadline - now)}

    def _acquire(self, conn, name, group, node, bump, now):
        if group.holder is not None and group.holder != node:
            expires_in_ms = _ms(group.deadline - now)
            if node not in group.refused:
                group.refused.add(node)
                self._log(f"group {name}: refused {node}: held by {group.holder} "
                          f"(epoch {group.epoch}, expires in {expires_in_ms} ms)")
            return {"ok": False, "holder": group.holder, "epoch": group.epoch, "expires_in_ms": expires_in_ms,
                    "error": f"lease held by {group.holder}"}
        moved = group.holder is not None and group.conn is not conn
        if group.holder is None or moved or bump:
            if moved:
                group.conn.groups.discard(name)
            group.epoch += 1
            group.refused.clear()
            how = "bumped for" if bump and not moved and group.holder is not None else "granted to"
            self._log(f"group {name}: epoch {group.epoch} {how} {node}")
        group.holder, group.conn, group.deadline = node, conn, now + self.lease_ms / 1000
        conn.groups.add(name)
        return {"ok": True, "epoch": group.epoch, "holder": node, "lease_ms": self.lease_ms}

    def _renew(self, conn, name, group, node, epoch, now):
        if group.holder == node and group.epoch == epoch and group.conn is conn:
            group.deadline = now + self.lease_ms / 1000
            return {"ok": True, "epoch": epoch, "holder": node, "lease_ms": self.lease_ms}
        if epoch > group.epoch:
            why = f"epoch {epoch} of group {name} was never granted"
        elif epoch < group.epoch:
            now_held = f"held by {group.holder}" if group.holder is not None else group.ended
            why = f"epoch {epoch} was superseded by epoch {group.epoch} ({now_held})"
        elif group.holder is None:
            why = group.ended
        else:
            why = f"epoch {epoch} is held by {group.holder} on another connection"
        return {"ok": False, "error": f"lease lost: {why}"}

    def _release(self, conn, name, group, node, epoch):
        held = group.holder == node and group.epoch == epoch and group.conn is conn
        if held:
            self._free(name, group, "released")
        return {"ok": True, "released": held}

    def _expire(self, name, group, now):
        if group.holder is not None and group.deadline <= now:
            self._free(name, group, "expired")

    def _free(self, name, group, how):
        group.ended = f"epoch {group.epoch} of {group.holder} {how}"
        self._log(f"group {name}: {group.ended}")
        group.conn.groups.discard(name)
        group.holder = group.conn = group.deadline = None


def _parse(line):
    """The request on ``line`` with its fields checked; _BadRequest names what is wrong."""
    try:
        request = json.loads(line)
    except ValueError:
        raise _BadRequest("request is not JSON (one UTF-8 JSON object per line)") from None
    if not isinstance(request, dict):
        raise _BadRequest("request is not a JSON object")
    op = request.get("op")
    if not isinstance(op, str) or op not in OPS:
        raise _BadRequest(f"unknown op {op!r} (expected one of {', '.join(OPS)})")
    _check_name(request, "group")
    if op != "status":
        _check_name(request, "node")
    if op in ("renew", "release"):
        epoch = request.get("epoch")
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise _BadRequest(f"{op}: epoch must be a non-negative integer, not {epoch!r}")
    if op == "acquire" and not isinstance(request.get("bump", False), bool):
        raise _BadRequest(f"acquire: bump must be true or false, not {request['bump']!r}")
    return request


def _check_name(request, field):
    value = request.get(field)
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME or not value.isprintable():
        raise _BadRequest(f"{request['op']}: {field} must be a printable string of 1 to {MAX_NAME} characters, "
                          f"not {value!r}")


# ---------------------------------------------------------------------- client
class ArbiterClient:
    """One node's blocking connection to the arbiter for one group; ``epoch`` is the lease it holds (or None).

    The connection is opened on first use.  A request on a connection that turns out to be
    broken is sent once more on a new one; the lease did not survive the old connection, so a
    renew after that fails (LeaseLost), as it must.
    """

    def __init__(self, address, group, node, timeout=1.0):
        self.address = (address[0], address[1])
        self.group = group
        self.node = node
        self.timeout = timeout
        self.epoch = None
        self._sock = None
        self._rbuf = bytearray()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def acquire(self, bump=False):
        """Take (or renew, or with ``bump`` re-take under a new epoch) the lease; returns its epoch."""
        request = {"op": "acquire", "group": self.group, "node": self.node}
        if bump:
            request["bump"] = True
        reply = self._request(request)
        if reply.get("ok"):
            epoch = reply.get("epoch")
            if isinstance(epoch, bool) or not isinstance(epoch, int):
                raise ArbiterError(f"{self._where()}: acquire: reply without an epoch: {reply!r}")
            self.epoch = epoch
            return epoch
        self.epoch = None
        if "holder" in reply:
            raise LeaseRefused(f"{self._where()}: group {self.group}: {self.node} refused: {reply.get('error')} "
                               f"(epoch {reply.get('epoch')}, expires in {reply.get('expires_in_ms')} ms)",
                               reply.get("holder"), reply.get("epoch"), reply.get("expires_in_ms"))
        raise ArbiterError(f"{self._where()}: acquire: {reply.get('error')}")

    def renew(self):
        """Refresh the lease; LeaseLost if it is gone (then ``epoch`` is None and this node must not serve)."""
        if self.epoch is None:
            raise LeaseLost(f"{self._where()}: group {self.group}: {self.node} holds no lease")
        reply = self._request({"op": "renew", "group": self.group, "node": self.node, "epoch": self.epoch})
        if not reply.get("ok"):
            self.epoch = None
            raise LeaseLost(f"{self._where()}: group {self.group}: {reply.get('error')}")

    def release(self):
        """Give the lease up (nothing to do when none is held)."""
        if self.epoch is None:
            return
        epoch, self.epoch = self.epoch, None
        reply = self._request({"op": "release", "group": self.group, "node": self.node, "epoch": epoch})
        if not reply.get("ok"):
            raise ArbiterError(f"{self._where()}: release: {reply.get('error')}")

    def status(self):
        """{"holder", "epoch", "expires_in_ms"} of the group."""
        reply = self._request({"op": "status", "group": self.group, "node": self.node})
        if not reply.get("ok"):
            raise ArbiterError(f"{self._where()}: status: {reply.get('error')}")
        return {key: value for key, value in reply.items() if key != "ok"}

    def close(self):
        """Close the connection (the arbiter frees the lease at once)."""
        self._disconnect()

    # ------------------------------------------------------------------ plumbing
    def _where(self):
        return f"arbiter {self.address[0]}:{self.address[1]}"

    def _request(self, request):
        line = json.dumps(request).encode() + b"\n"
        reused = self._sock is not None
        if not reused:
            self._connect()
        try:
            return self._exchange(line)
        except ConnectionError as e:
            self._disconnect()
            if not reused:
                raise ArbiterError(f"{self._where()}: {request['op']}: connection lost: {e}") from None
        self._connect()
        try:
            return self._exchange(line)
        except ConnectionError as e:
            self._disconnect()
            raise ArbiterError(f"{self._where()}: {request['op']}: connection lost: {e}") from None

    def _connect(self):
        try:
            sock = socket.create_connection(self.address, timeout=self.timeout)
        except OSError as e:
            raise ArbiterError(f"{self._where()}: unreachable: {e.strerror or e}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self._rbuf.clear()

    def _disconnect(self):
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self.epoch = None  # the arbiter frees a lease with the connection that held it

    def _exchange(self, line):
        """Send one request and return its reply; ConnectionError when the connection is broken."""
        deadline = time.monotonic() + self.timeout
        try:
            self._sock.settimeout(self.timeout)
            self._sock.sendall(line)
            while b"\n" not in self._rbuf:
                if len(self._rbuf) > MAX_REPLY:
                    self._disconnect()
                    raise ArbiterError(f"{self._where()}: reply longer than {MAX_REPLY} bytes")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                self._sock.settimeout(remaining)
                data = self._sock.recv(65536)
                if not data:
                    raise ConnectionError("closed by the arbiter")
                self._rbuf += data
        except TimeoutError:
            self._disconnect()  # a late reply would be taken for the next request's
            raise ArbiterError(f"{self._where()}: no reply within {self.timeout} s") from None
        except ConnectionError:
            raise
        except OSError as e:
            raise ConnectionError(e.strerror or str(e)) from None
        end = self._rbuf.index(b"\n")
        raw = bytes(self._rbuf[:end])
        del self._rbuf[:end + 1]
        try:
            reply = json.loads(raw)
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            self._disconnect()
            raise ArbiterError(f"{self._where()}: malformed reply {raw[:200]!r}")
        return reply


def parse_arbiter_address(text):
    """'tcp:HOST:PORT' or 'HOST:PORT' -> (host, port); HOST defaults to 127.0.0.1."""
    uri = text if text.startswith("tcp:") else f"tcp:{text}"
    expected = "expected tcp:HOST:PORT or HOST:PORT"
    try:
        host, port = parse_tcp_uri(uri, "arbiter address")
    except EmuError as e:
        raise ConfigError(f"{e} ({expected})") from None
    if ":" in host or port == 0:
        raise ConfigError(f"arbiter address {text!r}: {expected}, with a PORT from 1 to 65535")
    return host, port


# ---------------------------------------------------------------------- command
def main(argv):
    """``emu colo arbiter --listen tcp:HOST:PORT [--lease MS]``: serve leases until SIGTERM or SIGINT."""
    parser = CommandParser("arbiter", "Grant the lease a COLO VM must hold before it serves alone.")
    parser.add_argument("--listen", required=True, metavar="tcp:HOST:PORT",
                        help="address to listen on (HOST defaults to 127.0.0.1)")
    parser.add_argument("--lease", type=int, default=1000, metavar="MS",
                        help="a lease not renewed within MS milliseconds expires (default 1000)")
    try:
        args = parser.parse_args(argv)
        arbiter = Arbiter(parser.tcp_address(args.listen, "--listen"), args.lease, sys.stderr)
    except EmuError as e:
        return failed_to_start(e)
    try:
        serve_until_signalled(arbiter)
    finally:
        arbiter.close()
    return 0

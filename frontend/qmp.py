"""The QMP monitor: QEMU's JSON machine protocol on a unix or TCP socket.

The wire protocol is QEMU's (``docs/interop/qmp-spec.rst``) down to the error texts of
QEMU 7.2: a greeting, capabilities negotiation, ``{"execute", "arguments", "id"}``
commands answered with ``{"return"}`` or ``{"error": {"class", "desc"}}`` echoing the id,
and timestamped events.  Input is a stream of JSON texts split by bracket depth (QEMU's
json-streamer), so a command may arrive in pieces and several may share one read.

Everything runs in the machine's run loop between CPU slices: the listening socket and
every client are non-blocking file descriptors given to ``Machine.add_fd_handler``; output
that a client cannot take at once waits in its buffer and is retried by a background job.
"""

import datetime
import errno
import functools
import json
import os
import re
import socket
import stat
import sys
import time

from emu.chardev import listen_tcp, parse_socket_options
from emu.errors import ConfigError, EmuError

QEMU_VERSION = {"micro": 0, "minor": 2, "major": 7}  # the QEMU whose protocol this follows
MAX_CLIENTS = 64
MAX_INPUT = 16 << 20  # one JSON text (QEMU: 64 MiB tokens)
MAX_NESTING = 1024  # QEMU's json-streamer limit
MAX_OUTPUT = 16 << 20  # a client that reads nothing is dropped past this much pending output
CLOSE_FLUSH_S = 1.0
TCP_DEFAULT_HOST = "127.0.0.1"
SNAPSHOT_SUFFIX = ".emusnap"


def _package():
    try:
        from importlib.metadata import version
        return f"emu-colo {version('emu-colo')}"
    except Exception:  # running from a source tree that is not installed
        return "emu-colo"


PACKAGE = _package()


# ---------------------------------------------------------------------------- addresses
def parse_address(spec):
    """``unix:PATH,server,nowait`` or ``tcp:HOST:PORT,server,nowait`` -> (family, address, wait).

    ``address`` is the path, or (host, port) with host 127.0.0.1 when left empty."""
    def bad(reason):
        return ConfigError(f"-qmp {spec!r}: {reason}")

    kind, sep, rest = spec.partition(":")
    if not sep or kind not in ("unix", "tcp"):
        raise bad("expected unix:PATH,server,nowait or tcp:HOST:PORT,server,nowait")
    target, *options = rest.split(",")
    server, wait = parse_socket_options(options, bad)
    if not server:
        raise bad("only server sockets are supported (add ',server,nowait')")
    if kind == "unix":
        if not target:
            raise bad("missing socket path")
        if len(os.fsencode(target)) > 107:
            raise bad("socket path longer than 107 bytes")
        return "unix", target, wait
    host, sep, port_text = target.rpartition(":")
    if not sep:
        raise bad("expected tcp:HOST:PORT,server,nowait")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text, 10)
    except ValueError:
        raise bad(f"bad port {port_text!r}") from None
    if not 0 <= port <= 0xFFFF:
        raise bad(f"port {port} out of range 0..65535")
    return "tcp", (host or TCP_DEFAULT_HOST, port), wait


# ---------------------------------------------------------------------------- JSON stream
_IN_STRING = re.compile(rb'["\\]')
_STRUCTURAL = re.compile(rb'["{}\[\]]')
_TOKEN_END = re.compile(rb'[\s"{}\[\]]')
_WHITESPACE = b" \t\r\n"


class QmpError(Exception):
    """A command's error reply: QEMU's error class and its human-readable text."""

    def __init__(self, desc, error_class="GenericError"):
        super().__init__(desc)
        self.error_class = error_class
        self.desc = desc


class JsonStream:
    """Cuts a byte stream into top-level JSON texts as QEMU's json-streamer does: an object
    or array ends when its brackets balance (outside strings); a bare top-level token
    ends at whitespace or a bracket.  :meth:`feed` returns the values and the errors."""

    def __init__(self):
        self.buf = bytearray()
        self.pos = 0
        self.start = None  # where the value being collected starts
        self.depth = 0
        self.in_string = False
        self.bare = False

    def feed(self, data):
        """Returns a list of (value, None) or (None, QmpError) in input order."""
        self.buf += data
        out = []
        while self._step(out):
            pass
        self._keep_unfinished(out)
        return out

    def _step(self, out):
        """Scan on from ``pos`` in the current state; False when the buffer needs more input."""
        if self.in_string:
            return self._scan_string(out)
        if self.depth:
            return self._scan_nested(out)
        if self.bare:
            return self._scan_bare(out)
        return self._scan_value_start(out)

    def _scan_string(self, out):
        buf, n = self.buf, len(self.buf)
        m = _IN_STRING.search(buf, self.pos)
        if m is None:
            self.pos = n
            return False
        i = m.start()
        if buf[i] == 0x5C:  # backslash: skip the escaped byte
            if i + 1 >= n:
                self.pos = i
                return False
            self.pos = i + 2
            return True
        self.in_string = False
        self.pos = i + 1
        if self.depth == 0:
            out.append(self._finish(self.pos))
        return True

    def _scan_nested(self, out):
        """Inside an object or array: only quotes and brackets matter."""
        buf = self.buf
        m = _STRUCTURAL.search(buf, self.pos)
        if m is None:
            self.pos = len(buf)
            return False
        i = m.start()
        self.pos = i + 1
        c = buf[i]
        if c == 0x22:
            self.in_string = True
        elif c in b"{[":
            self.depth += 1
            if self.depth > MAX_NESTING:
                out.append((None, QmpError("JSON parse error, nesting too deep")))
                self._discard()
        else:
            self.depth -= 1
            if self.depth == 0:
                out.append(self._finish(self.pos))
        return True

    def _scan_bare(self, out):
        """A bare top-level token (number, true, null...) ends at whitespace or a bracket."""
        m = _TOKEN_END.search(self.buf, self.pos)
        if m is None:
            self.pos = len(self.buf)
            return False
        self.pos = m.start()
        self.bare = False
        out.append(self._finish(self.pos))
        return True

    def _scan_value_start(self, out):
        buf, n = self.buf, len(self.buf)
        while self.pos < n and buf[self.pos] in _WHITESPACE:
            self.pos += 1
        if self.pos >= n:
            return False
        c = buf[self.pos]
        self.start = self.pos
        self.pos += 1
        if c in b"{[":
            self.depth = 1
        elif c == 0x22:
            self.in_string = True
        elif c in b"}]":
            self.start = None
            out.append((None, QmpError("JSON parse error, expecting value")))
        else:
            self.bare = True
        return True

    def _keep_unfinished(self, out):
        """Drop what has been consumed; keep a value still being collected (up to MAX_INPUT)."""
        buf = self.buf
        if self.start is None:
            del buf[:self.pos]
            self.pos = 0
        elif self.pos - self.start > MAX_INPUT:
            out.append((None, QmpError("JSON parse error, input too large")))
            self._discard()
        else:
            del buf[:self.start]
            self.pos -= self.start
            self.start = 0

    def _discard(self):
        """Drop the value being collected (QEMU's streamer resets on an error too)."""
        del self.buf[:self.pos]
        self.pos = 0
        self.start = None
        self.depth = 0
        self.in_string = self.bare = False

    def _finish(self, end):
        text = bytes(self.buf[self.start:end])
        self.start = None
        return self.parse(text)

    @staticmethod
    def parse(text):
        try:
            return json.loads(text.decode("utf-8"), object_pairs_hook=_no_duplicates,
                              parse_constant=_no_constants), None
        except UnicodeDecodeError:
            return None, QmpError("JSON parse error, invalid UTF-8 sequence")
        except RecursionError:
            return None, QmpError("JSON parse error, nesting too deep")
        except ValueError as e:
            if text[:1].isalpha() and not _STRUCTURAL.search(text):
                return None, QmpError(f"JSON parse error, invalid keyword '{text[:100].decode(errors='replace')}'")
            message = getattr(e, "msg", None) or str(e)
            return None, QmpError(f"JSON parse error, {message[:1].lower()}{message[1:]}")


def _no_duplicates(pairs):
    result = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key '{key}'")
        result[key] = value
    return result


def _no_constants(name):
    raise ValueError(f"invalid keyword '{name}'")


# ---------------------------------------------------------------------------- argument checks
# An argument schema maps a name to (type, required); a type is "str", "bool", "int",
# ("array", element type) or ("struct", schema).  QEMU's qobject-input-visitor texts.
_TYPE_NAMES = {"str": "string", "bool": "boolean", "int": "integer"}


def check_arguments(schema, args, prefix=""):
    for name in args:
        if name not in schema:
            raise QmpError(f"Parameter '{prefix}{name}' is unexpected")
    for name, (kind, required) in schema.items():
        if name not in args:
            if required:
                raise QmpError(f"Parameter '{prefix}{name}' is missing")
            continue
        _check_value(kind, args[name], f"{prefix}{name}")


def _check_value(kind, value, path):
    if isinstance(kind, tuple):
        if kind[0] == "array":
            if not isinstance(value, list):
                raise QmpError(f"Invalid parameter type for '{path}', expected: array")
            for i, item in enumerate(value):
                _check_value(kind[1], item, f"{path}[{i}]")
        else:
            if not isinstance(value, dict):
                raise QmpError(f"Invalid parameter type for '{path}', expected: object")
            check_arguments(kind[1], value, prefix=f"{path}.")
        return
    ok = {"str": isinstance(value, str), "bool": isinstance(value, bool),
          "int": isinstance(value, int) and not isinstance(value, bool)}[kind]
    if not ok:
        raise QmpError(f"Invalid parameter type for '{path}', expected: {_TYPE_NAMES[kind]}")


FREE_FORM = object()  # arguments handed on unchecked (their receiver validates them)


# ---------------------------------------------------------------------------- the server
class _Client:
    __slots__ = ("sock", "fd", "stream", "out", "negotiated", "closed")

    def __init__(self, sock):
        self.sock = sock
        self.fd = sock.fileno()
        self.stream = JsonStream()
        self.out = bytearray()
        self.negotiated = False
        self.closed = False


class QmpServer:
    """A QMP monitor for ``machine`` listening on ``address`` (QEMU's ``-qmp`` syntax).

    ``migration``: the object the migration commands go to (``start``, ``cancel``,
    ``query``, ``set_capabilities`` ...); without it those commands do not exist.
    ``snapshot_dir``: where HMP ``savevm NAME`` / ``loadvm NAME`` keep ``NAME.emusnap``.
    ``address`` None: no socket, the HMP dispatcher alone (for the gdb stub's ``monitor``)."""

    def __init__(self, machine, address, migration=None, snapshot_dir=None):
        self.machine = machine
        self.migration = migration
        self.snapshot_dir = os.path.abspath(snapshot_dir or os.getcwd())
        self.spec = address
        self.clients = []
        self._flush_job_active = False
        self._shutdown_data = None
        self._shutdown_sent = False
        self._unix_path = None
        self.commands = self._command_table()
        machine.event_listeners.append(self._on_event)
        if address is None:  # no socket: only human_command() (gdb's "monitor" without -qmp)
            self.listener = self.address = None
            return
        self.family, target, wait = parse_address(address)
        self.listener = self._listen(target)
        if self.family == "unix":
            self.address = target
        else:
            self.address = self.listener.getsockname()[:2]
        machine.add_fd_handler(self.listener.fileno(), self._on_accept)
        if wait:
            print(f"emu: waiting for a QMP connection on {address}", file=sys.stderr)
            self.listener.setblocking(True)
            try:
                self._accept_one()
            finally:
                self.listener.setblocking(False)

    # ------------------------------------------------------------------ sockets
    def _listen(self, target):
        where = f"-qmp {self.spec!r}"
        if self.family == "unix":
            try:
                if not stat.S_ISSOCK(os.lstat(target).st_mode):
                    raise EmuError(f"{where}: cannot listen on {target}: {os.strerror(errno.EADDRINUSE)}")
                os.unlink(target)  # a stale socket from an earlier run (QEMU removes it too)
            except FileNotFoundError:
                pass
            except OSError as e:
                raise EmuError(f"{where}: cannot listen on {target}: {e.strerror}") from None
            # bound under a temporary name and renamed once listening: whoever sees the
            # path can connect (no window in which a client is refused)
            staging = f"{target}.{os.getpid()}~"
            if len(os.fsencode(staging)) > 107:
                staging = target
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(staging)
                try:
                    sock.listen(16)
                    sock.setblocking(False)
                    if staging != target:
                        os.replace(staging, target)
                except OSError:
                    _unlink_quietly(staging)
                    raise
                self._unix_path = target
            except OSError as e:
                sock.close()
                raise EmuError(f"{where}: cannot listen on {target}: {e.strerror or e}") from None
            return sock
        host, port = target
        return listen_tcp(host, port, 16, lambda reason: EmuError(f"{where}: {reason}"))

    def _on_accept(self):
        for _ in range(MAX_CLIENTS):
            if not self._accept_one():
                return

    def _accept_one(self):
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:  # out of descriptors or the peer gave up: try again on the next wakeup
            return False
        if len(self.clients) >= MAX_CLIENTS:
            conn.close()
            return True
        conn.setblocking(False)
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client = _Client(conn)
        self.clients.append(client)
        self.machine.add_fd_handler(client.fd, functools.partial(self._on_readable, client))
        self._send(client, {"QMP": {"version": {"qemu": dict(QEMU_VERSION), "package": PACKAGE},
                                    "capabilities": []}})
        return True

    def _drop(self, client):
        if client.closed:
            return
        client.closed = True
        self.machine.remove_fd_handler(client.fd)
        try:
            client.sock.close()
        except OSError:
            pass
        self.clients.remove(client)

    def _on_readable(self, client):
        if client.closed:
            return
        try:
            data = client.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(client)
            return
        if not data:  # the client left; whatever it sent half of is dropped with it
            self._drop(client)
            return
        for value, error in client.stream.feed(data):
            if client.closed:
                return
            if error is not None:
                self._send(client, {"error": {"class": error.error_class, "desc": error.desc}})
            else:
                self._dispatch(client, value)

    def _send(self, client, message):
        if client.closed:
            return
        client.out += (json.dumps(message) + "\r\n").encode()
        self._flush(client)
        if client.out and not client.closed:
            if len(client.out) > MAX_OUTPUT:
                self._drop(client)
            elif not self._flush_job_active:
                self._flush_job_active = True
                self.machine.background_jobs.append(self._flush_pending)

    def _flush(self, client):
        while client.out:
            try:
                sent = client.sock.send(client.out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # the client went away: it is dropped when its socket reads EOF
                client.out.clear()
                self._drop(client)
                return
            del client.out[:sent]

    def _flush_pending(self):
        for client in list(self.clients):
            self._flush(client)
        if not any(c.out for c in self.clients):
            self._flush_job_active = False
            if self._flush_pending in self.machine.background_jobs:
                self.machine.background_jobs.remove(self._flush_pending)

    def close(self):
        """Send what is still pending (briefly), then close every socket."""
        if self.listener is None:
            if self._on_event in self.machine.event_listeners:
                self.machine.event_listeners.remove(self._on_event)
            return
        if self.listener.fileno() < 0:
            return
        self.machine.remove_fd_handler(self.listener.fileno())
        if self._on_event in self.machine.event_listeners:
            self.machine.event_listeners.remove(self._on_event)
        if self._flush_pending in self.machine.background_jobs:
            self.machine.background_jobs.remove(self._flush_pending)
        deadline = time.monotonic() + CLOSE_FLUSH_S
        while any(c.out for c in self.clients) and time.monotonic() < deadline:
            for client in list(self.clients):
                self._flush(client)
            time.sleep(0.005)
        for client in list(self.clients):
            self._drop(client)
        self.listener.close()
        if self._unix_path is not None:
            try:
                os.unlink(self._unix_path)
            except OSError:
                pass

    # ------------------------------------------------------------------ events
    def _on_event(self, name, data):
        if name == "SHUTDOWN" and self._shutdown_sent:
            return
        if name == "SHUTDOWN" and self._shutdown_data is not None:
            data = self._shutdown_data  # the machine reports every exit as the guest's
        now = time.time()
        seconds = int(now)
        message = {"timestamp": {"seconds": seconds, "microseconds": int((now - seconds) * 1e6)}, "event": name}
        if data:
            message["data"] = data
        for client in list(self.clients):
            if client.negotiated:
                self._send(client, message)

    # ------------------------------------------------------------------ commands
    def _dispatch(self, client, request):
        if not isinstance(request, dict):
            self._send(client, {"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}})
            return
        has_id = "id" in request
        try:
            for key, value in request.items():
                if key == "execute":
                    if not isinstance(value, str):
                        raise QmpError("QMP input member 'execute' must be a string")
                elif key == "arguments":
                    if not isinstance(value, dict):
                        raise QmpError("QMP input member 'arguments' must be an object")
                elif key != "id":
                    raise QmpError(f"QMP input member '{key}' is unexpected")
            if "execute" not in request:
                raise QmpError("QMP input lacks member 'execute'")
            name = request["execute"]
            args = request.get("arguments", {})
            if name == "qmp_capabilities" and client.negotiated:
                raise QmpError("Capabilities negotiation is already complete, command ignored", "CommandNotFound")
            if name != "qmp_capabilities" and not client.negotiated:
                raise QmpError("Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound")
            command = self.commands.get(name)
            if command is None:
                raise QmpError(f"The command {name} has not been found", "CommandNotFound")
            handler, schema = command
            if schema is not FREE_FORM:
                check_arguments(schema, args)
            result = handler(client, args)
        except QmpError as e:
            reply = {"id": request["id"]} if has_id else {}
            reply["error"] = {"class": e.error_class, "desc": e.desc}
            self._send(client, reply)
            return
        reply = {"return": {} if result is None else result}
        if has_id:
            reply["id"] = request["id"]
        self._send(client, reply)

    def _command_table(self):
        table = {
            "qmp_capabilities": (self._cmd_capabilities, {"enable": (("array", "str"), False)}),
            "query-version": (self._cmd_query_version, {}),
            "query-status": (self._cmd_query_status, {}),
            "query-commands": (self._cmd_query_commands, {}),
            "stop": (self._cmd_stop, {}),
            "cont": (self._cmd_cont, {}),
            "system_reset": (self._cmd_system_reset, {}),
            "quit": (self._cmd_quit, {}),
            "query-name": (self._cmd_query_name, {}),
            "human-monitor-command": (self._cmd_hmp, {"command-line": ("str", True), "cpu-index": ("int", False)}),
        }
        if self.migration is not None:
            capability = ("struct", {"capability": ("str", True), "state": ("bool", True)})
            table.update({
                "migrate": (self._cmd_migrate, {"uri": ("str", True), "detach": ("bool", False)}),
                "migrate_cancel": (self._migration_call("cancel"), {}),
                "migrate-incoming": (self._cmd_migrate_incoming, {"uri": ("str", True)}),
                "query-migrate": (self._migration_call("query"), {}),
                "migrate-set-capabilities": (self._cmd_migrate_set_capabilities,
                                             {"capabilities": (("array", capability), True)}),
                "query-migrate-capabilities": (self._migration_call("query_capabilities"), {}),
                "migrate-set-parameters": (self._cmd_migrate_set_parameters, FREE_FORM),
                "query-migrate-parameters": (self._migration_call("query_parameters"), {}),
                "query-colo-status": (self._cmd_query_colo_status, {}),
                "x-colo-lost-heartbeat": (self._migration_call("lost_heartbeat"), {}),
            })
        return table

    def _cmd_capabilities(self, client, args):
        for i, cap in enumerate(args.get("enable", [])):
            if cap != "oob":
                raise QmpError(f"Parameter 'enable[{i}]' does not accept value '{cap}'")
        if args.get("enable"):
            raise QmpError("Capability oob not available")  # the greeting offers none
        client.negotiated = True
        return {}

    def _cmd_query_version(self, client, args):
        return {"qemu": dict(QEMU_VERSION), "package": PACKAGE}

    def _cmd_query_status(self, client, args):
        status = self.machine.status
        return {"status": status, "singlestep": False, "running": status == "running"}

    def _cmd_query_commands(self, client, args):
        return [{"name": name} for name in self.commands]

    def _cmd_stop(self, client, args):
        self.machine.pause()

    def _cmd_cont(self, client, args):
        if self.machine.status in ("shutdown", "internal-error", "guest-panicked"):
            raise QmpError("Resetting the Virtual Machine is required")
        self.machine.resume()

    def _cmd_system_reset(self, client, args):
        machine = self.machine
        if machine.exit_status is not None:
            return
        if machine.no_reboot:  # QEMU's -no-reboot turns every reset request into a shutdown
            self._shutdown_data = {"guest": False, "reason": "host-qmp-system-reset"}
            machine.request_exit(0, "system_reset with -no-reboot: stopping")
            return
        # Monitor callbacks run between CPU slices, so the reset happens here and now, paused
        # or not (machine.request_reset() would be acted on only by a running loop, and
        # reported there as the guest's own reset).
        machine.reset()
        if machine.status not in ("running", "inmigrate"):
            machine.status = "prelaunch"  # as QEMU after a reset of a stopped VM
        machine.emit("RESET", {"guest": False, "reason": "host-qmp-system-reset"})

    def _cmd_quit(self, client, args):
        self._shutdown_data = {"guest": False, "reason": "host-qmp-quit"}
        self.machine.request_exit(0, None)
        # QEMU 7.2 sends SHUTDOWN before quit's reply (a client that sees the reply may
        # disconnect at once); the machine's own SHUTDOWN at the end is then not sent again
        self._on_event("SHUTDOWN", {})
        self._shutdown_sent = True

    # --- migration: argument shapes are checked here, meanings by the migration object
    def _migration_call(self, method):
        def call(client, args):
            try:
                return getattr(self.migration, method)()
            except EmuError as e:
                raise QmpError(str(e)) from None
        return call

    def _cmd_migrate(self, client, args):
        try:
            self.migration.start(args["uri"])
        except EmuError as e:
            raise QmpError(str(e)) from None

    def _cmd_migrate_incoming(self, client, args):
        try:
            self.migration.start_incoming(args["uri"])
        except EmuError as e:
            raise QmpError(str(e)) from None

    def _cmd_query_name(self, client, args):
        name = self.machine.name
        return {} if name is None else {"name": name}

    def _cmd_query_colo_status(self, client, args):
        return self.migration.colo_status.info()

    def _cmd_migrate_set_capabilities(self, client, args):
        try:
            self.migration.set_capabilities(args["capabilities"])
        except EmuError as e:
            raise QmpError(str(e)) from None

    def _cmd_migrate_set_parameters(self, client, args):
        try:
            self.migration.set_parameters(dict(args))
        except EmuError as e:
            raise QmpError(str(e)) from None

    # ------------------------------------------------------------------ HMP
    def _cmd_hmp(self, client, args):
        if args.get("cpu-index", 0) != 0:
            raise QmpError("Parameter 'cpu-index' expects a CPU number")
        text = self.human_command(args["command-line"])
        return text.replace("\r\n", "\n").replace("\n", "\r\n")

    def human_command(self, line):
        """Run one HMP command line; returns its output (``\\n`` line ends)."""
        words = line.split()
        if not words:
            return ""
        name, rest = words[0], words[1:]
        handler = {
            "info": self._hmp_info, "stop": self._hmp_stop, "cont": self._hmp_cont, "c": self._hmp_cont,
            "system_reset": self._hmp_system_reset, "quit": self._hmp_quit, "q": self._hmp_quit,
            "savevm": self._hmp_savevm, "loadvm": self._hmp_loadvm, "xp": self._hmp_xp,
        }.get(name)
        if handler is None:
            return f"unknown command: '{name}'\n"
        try:
            return handler(rest) or ""
        except QmpError as e:
            return f"Error: {e.desc}\n"

    _INFO_HELP = {
        "registers": "info registers [-a|vcpu] -- show the cpu registers",
        "status": "info status  -- show the current VM status (running|paused)",
    }

    def _hmp_info(self, words):
        if not words:
            return "\n".join(self._INFO_HELP.values()) + "\n"
        what = words[0]
        if what == "registers":
            if words[1:] and words[1] not in ("-a", "0"):
                return f"CPU#{words[1]} not available\n"
            from frontend.registers import format_registers  # the CPU modules: not for -version
            return format_registers(self.machine.cpu)
        if what == "status":
            status = self.machine.status
            text = f"VM status: {'running' if status == 'running' else 'paused'}"
            if status not in ("running", "paused"):
                text += f" ({status})"
            return text + "\n"
        return f"unknown command: 'info {what}'\n"

    def _hmp_stop(self, words):
        self._cmd_stop(None, {})

    def _hmp_cont(self, words):
        self._cmd_cont(None, {})

    def _hmp_system_reset(self, words):
        self._cmd_system_reset(None, {})

    def _hmp_quit(self, words):
        self._cmd_quit(None, {})

    def _snapshot_path(self, name):
        if name in (".", "..") or "/" in name or "\0" in name:
            raise QmpError(f"invalid snapshot name '{name}'")
        return os.path.join(self.snapshot_dir, name + SNAPSHOT_SUFFIX)

    def _hmp_savevm(self, words):
        machine = self.machine
        name = words[0] if words else datetime.datetime.now().strftime("vm-%Y%m%d%H%M%S")
        path = self._snapshot_path(name)
        was_running = machine.status == "running"
        machine.pause()  # as QEMU: STOP, save, RESUME
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                machine.save_state(ram_pages="all", out=f)
            os.replace(tmp, path)
        except OSError as e:
            _unlink_quietly(tmp)
            raise QmpError(f"Could not save snapshot '{name}': {e.strerror or e}") from None
        except EmuError as e:
            _unlink_quietly(tmp)
            raise QmpError(f"Could not save snapshot '{name}': {e}") from None
        finally:
            if was_running:
                machine.resume()

    def _hmp_loadvm(self, words):
        if not words:
            return 'loadvm: string expected\nTry "help loadvm" for more information\n'
        name = words[0]
        path = self._snapshot_path(name)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise QmpError(f"Snapshot '{name}' does not exist in one or more devices") from None
        except OSError as e:
            raise QmpError(f"Could not read snapshot '{name}': {e.strerror or e}") from None
        machine = self.machine
        was_running = machine.status == "running"
        machine.pause()
        try:
            # a rejected stream leaves the machine untouched, so it runs on either way
            machine.load_state(data)
        except EmuError as e:
            raise QmpError(f"Snapshot '{name}': {e}") from None
        finally:
            if was_running:
                machine.resume()

    _XP_SIZES = {"b": 1, "h": 2, "w": 4, "g": 8}

    def _hmp_xp(self, words):
        """``xp /NFU ADDR``: physical memory as QEMU's memory_dump() prints it."""
        usage = 'Try "help xp" for more information\n'
        count, fmt, size = 1, "x", 4
        if words and words[0].startswith("/"):
            spec, words = words[0][1:], words[1:]
            digits = re.match(r"\d*", spec).group()
            if digits:
                count = int(digits)
            for ch in spec[len(digits):]:
                if ch in self._XP_SIZES:
                    size = self._XP_SIZES[ch]
                elif ch in "xduo":
                    fmt = ch
                else:
                    return f"invalid char in format: '{ch}'\n{usage}"
        if not words:
            return f"unexpected end of expression\n{usage}"
        text = words[0]
        try:
            addr = int(text, 0)
        except ValueError:
            bad = next((ch for ch in text if not ch.isalnum() or ch.lower() not in "0123456789abcdefx"), text[0])
            return f"invalid char '{bad}' in expression\n{usage}"
        digits = {"x": size * 2, "o": -(-size * 8 // 3), "d": -(-size * 80 // 33), "u": -(-size * 80 // 33)}[fmt]
        ram = self.machine.ram
        line_size = 8 if size == 1 else 16
        remaining = size * count
        out = []
        while remaining > 0:
            n = min(remaining, line_size)
            if addr < 0 or addr + n > ram.size:
                out.append(f"{addr:016x}: Cannot access memory")
                break
            data = ram.read(addr, n)
            values = []
            for i in range(0, n, size):
                v = int.from_bytes(data[i:i + size], "little")
                if fmt == "x":
                    values.append(f"0x{v:0{digits}x}")
                elif fmt == "o":
                    values.append(f"{'0' + format(v, 'o') if v else '0':>{digits}}")
                else:
                    if fmt == "d" and size == 8 and v >= 1 << 63:
                        v -= 1 << 64
                    values.append(f"{v:>{digits}}")
            out.append(f"{addr:016x}: " + " ".join(values))
            addr += n
            remaining -= n
        return "\n".join(out) + "\n"


def _unlink_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass

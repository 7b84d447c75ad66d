"""Host-side character backends behind a serial port (the ``-serial`` option).

Modelled on QEMU's chardevs (``chardev/char-stdio.c``, ``char-file.c``, ``char-socket.c``,
``char-null.c``).  A backend is host plumbing, not guest state: it is never saved.  Every
backend is a :class:`CharBackend`; its methods are the whole interface the UART, the board
and the run loop (with the ``selectors`` module) use.
"""

import atexit
import os
import select
import selectors
import socket
import stat
import sys
import termios
import time

from emu.errors import ConfigError

TCP_DEFAULT_HOST = "127.0.0.1"
TCP_MAX_PENDING = 1 << 20  # output held for a slow TCP client before bytes are dropped
STDIO_MAX_PENDING = 1 << 20  # output held for a stdout nobody reads before bytes are dropped
CLOSE_FLUSH_S = 2.0  # at exit, how long held output may wait for a slow reader
PIPE_BUF = 4096  # a write of at most this much to a writable pipe does not block
READ_CHUNK = 4096


class BackendOpenError(ConfigError):
    """A backend could not be opened; ``reason`` says why without naming the option."""

    def __init__(self, component, reason):
        super().__init__(f"{component}: {reason}")
        self.reason = reason


class CharBackend:
    """The interface of a backend, with the behaviour of one that has no input and discards
    output; each backend overrides what it does."""

    def write(self, data):
        """Guest output.  Never blocks the emulator for long; a backend that cannot take the
        bytes drops them (as QEMU does once its retries run out)."""

    def read_fds(self):
        """The file descriptors to watch for input *now*.  The list changes when a TCP client
        connects or leaves and when stdin reaches end of file; the loop asks again after
        every :meth:`on_readable` call."""
        return []

    def on_readable(self, fd):
        """Read what ``fd`` has: bytes for the guest, or ``b''`` when nothing is for the
        guest (a client was accepted, a peer closed, end of file)."""
        return b""

    def flush(self):
        """Push out output held back earlier (the UART calls it between CPU slices)."""

    def close(self):
        """Release the host resources (terminal settings, sockets, files); safe to call twice."""

    def attach(self, machine, consumer):
        """The board connects this backend to a serial port of ``machine``, whose input goes
        to ``consumer(data) -> bytes accepted``; returns the consumer the machine is to feed.
        A backend with state of its own beside the guest's (the COLO link) keeps the
        machine here and counts what the guest accepts; the others need nothing."""
        return consumer


class NullBackend(CharBackend):
    """``-serial null``: output vanishes, no input."""

    def __repr__(self):
        return "<NullBackend>"


def _write_fd(fd, data):
    """Write all of ``data`` to ``fd``, waiting while a non-blocking fd is full."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        view = view[n:]


def _can_watch(fd):
    """True if ``fd`` is open and a selector can wait on it (regular files and /dev/null cannot)."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return False
    probe = selectors.DefaultSelector()
    try:
        probe.register(fd, selectors.EVENT_READ)
    except (OSError, ValueError):
        return False
    finally:
        probe.close()
    return True


class StdioBackend(CharBackend):
    """``-serial stdio``: output to stdout, input from stdin.

    When stdin is a terminal it is put in a raw-ish mode like QEMU's stdio chardev: no line
    buffering or echo, bytes pass unchanged (no CR/LF translation on input); output keeps
    OPOST so the terminal maps LF to CRLF; Ctrl-C still interrupts the emulator unless
    ``signals`` is False.  :meth:`close` (and interpreter exit) restore the settings.

    Output never blocks the run loop (a stdout pipe nobody reads must not starve the
    monitor): it is written only while stdout is writable, in pieces a pipe takes whole,
    and what stdout cannot take is held (up to ``STDIO_MAX_PENDING`` bytes; beyond that
    dropped and counted in ``dropped``) and sent by :meth:`flush` between CPU slices.
    """

    def __init__(self, in_fd=0, out_fd=1, signals=True):
        self.in_fd = in_fd
        self.out_fd = out_fd
        self._input_open = _can_watch(in_fd)
        self._output_open = True
        self._pending = bytearray()
        self.dropped = 0
        self._saved_tty = None
        if out_fd == 1:
            try:
                sys.stdout.flush()  # earlier Python prints go out before guest output
            except (AttributeError, ValueError, OSError):
                pass
        if self._input_open and os.isatty(in_fd):
            self._enter_raw_mode(signals)

    def _enter_raw_mode(self, signals):
        try:
            attrs = termios.tcgetattr(self.in_fd)
        except termios.error:
            return
        self._saved_tty = [list(a) if isinstance(a, list) else a for a in attrs]
        iflag, oflag, cflag, lflag, ispeed, ospeed, cc = attrs
        iflag &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP | termios.INLCR
                   | termios.IGNCR | termios.ICRNL | termios.IXON)
        oflag |= termios.OPOST
        lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.IEXTEN)
        if not signals:
            lflag &= ~termios.ISIG
        cflag = (cflag & ~(termios.CSIZE | termios.PARENB)) | termios.CS8
        cc[termios.VMIN] = 1
        cc[termios.VTIME] = 0
        try:
            termios.tcsetattr(self.in_fd, termios.TCSANOW, [iflag, oflag, cflag, lflag, ispeed, ospeed, cc])
        except termios.error:
            self._saved_tty = None
            return
        atexit.register(self._restore_terminal)

    def _restore_terminal(self):
        if self._saved_tty is not None:
            try:
                termios.tcsetattr(self.in_fd, termios.TCSADRAIN, self._saved_tty)
            except termios.error:
                pass
            self._saved_tty = None
            atexit.unregister(self._restore_terminal)

    @property
    def raw_mode(self):
        """True while the terminal settings are changed (and must be restored)."""
        return self._saved_tty is not None

    def write(self, data):
        if not self._output_open:
            return
        room = STDIO_MAX_PENDING - len(self._pending)
        if len(data) > room:
            self.dropped += len(data) - room
            data = data[:room]
        self._pending += data
        self.flush()

    def flush(self, timeout=0.0):
        """Write held output while stdout takes it (waiting up to ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        while self._pending and self._output_open:
            wait = max(0.0, deadline - time.monotonic())
            try:
                _, writable, _ = select.select([], [self.out_fd], [], wait)
            except (OSError, ValueError):
                writable = [self.out_fd]  # let the write report it
            if not writable:
                return
            try:
                n = os.write(self.out_fd, self._pending[:PIPE_BUF])
            except BlockingIOError:
                continue
            except OSError:
                self._output_open = False  # stdout went away (closed pipe): drop output like QEMU
                self.dropped += len(self._pending)
                self._pending.clear()
                return
            del self._pending[:n]

    def read_fds(self):
        return [self.in_fd] if self._input_open else []

    def on_readable(self, fd):
        try:
            data = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return b""
        except OSError:
            data = b""
        if not data:
            self._input_open = False  # end of file: stop watching
        return data

    def close(self):
        self.flush(CLOSE_FLUSH_S)
        self._restore_terminal()
        self._input_open = False

    def __repr__(self):
        return f"<StdioBackend in={self.in_fd} out={self.out_fd}>"


class FileBackend(CharBackend):
    """``-serial file:PATH``: output written to a file (truncated, or appended), no input."""

    def __init__(self, path, append=False):
        self.path = path
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
        try:
            self._fd = os.open(path, flags, 0o666)
        except OSError as e:
            raise BackendOpenError("serial", f"cannot open {path!r}: {e.strerror}") from None

    def write(self, data):
        if self._fd is not None:
            _write_fd(self._fd, data)

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __repr__(self):
        return f"<FileBackend {self.path!r}>"


class TcpServerBackend(CharBackend):
    """``-serial tcp:HOST:PORT,server``: a listening socket serving one client at a time.

    While no client is connected, output is dropped (QEMU's socket chardev does the same);
    further clients wait in the listen backlog until the current one leaves.  With
    ``wait`` the constructor blocks until the first client connects (QEMU's ``wait=on``).
    Output that a slow client cannot take at once is held (up to ``TCP_MAX_PENDING`` bytes,
    beyond that dropped and counted in ``dropped``) and sent by :meth:`flush`.
    """

    def __init__(self, host=TCP_DEFAULT_HOST, port=0, wait=False, unix_path=None):
        self.host = host
        self.client = None
        self.dropped = 0
        self._pending = bytearray()
        self._client_broken = False
        self.unix_path = unix_path
        if unix_path is not None:  # -serial unix:PATH,server: the same server on a unix socket
            listener = listen_unix(unix_path, lambda reason: BackendOpenError("serial", reason))
            self.port = None
            where = f"unix:{unix_path}"
        else:
            listener = listen_tcp(host, port, 1, lambda reason: BackendOpenError("serial", reason))
            self.port = listener.getsockname()[1]
            where = f"tcp:{host}:{self.port}"
        self.listener = listener
        if wait:
            print(f"emu: waiting for a connection on {where} (serial)", file=sys.stderr)
            self.wait_for_client()

    def wait_for_client(self, timeout=None):
        """Block until a client connects (or ``timeout`` seconds pass); True if one is connected."""
        if self.client is None and self.listener is not None:
            readable, _, _ = select.select([self.listener], [], [], timeout)
            if readable:
                self._accept()
        return self.client is not None

    def _accept(self):
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.setblocking(False)
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client = conn
        self._client_broken = False

    def _drop_client(self):
        self.client.close()
        self.client = None
        self._pending.clear()
        self._client_broken = False

    def write(self, data):
        if self.client is None or self._client_broken:
            self.dropped += len(data)
            return
        room = TCP_MAX_PENDING - len(self._pending)
        if len(data) > room:
            self.dropped += len(data) - room
            data = data[:room]
        self._pending += data
        self.flush()

    def flush(self):
        while self._pending and self.client is not None and not self._client_broken:
            try:
                sent = self.client.send(self._pending)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # keep the socket until on_readable sees the close, so that read_fds and
                # the run loop's selector change together
                self._client_broken = True
                self.dropped += len(self._pending)
                self._pending.clear()
                return
            del self._pending[:sent]

    def read_fds(self):
        if self.client is not None:
            return [self.client.fileno()]
        return [self.listener.fileno()] if self.listener is not None else []

    def on_readable(self, fd):
        if self.client is not None and fd == self.client.fileno():
            try:
                data = self.client.recv(READ_CHUNK)
            except (BlockingIOError, InterruptedError):
                return b""
            except OSError:
                data = b""
            if not data:
                self._drop_client()
            self.flush()
            return data
        if self.client is None and self.listener is not None and fd == self.listener.fileno():
            self._accept()
        return b""

    def close(self):
        if self.client is not None:
            self.flush()
            self._drop_client()
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            if self.unix_path is not None:
                try:
                    os.unlink(self.unix_path)
                except OSError:
                    pass

    def __repr__(self):
        return f"<TcpServerBackend {self.host}:{self.port} client={'yes' if self.client else 'no'}>"


class PtyBackend(CharBackend):
    """``-serial pty``: a pseudo-terminal whose other side (``/dev/pts/N``) a terminal
    program opens (QEMU's char-pty).  Its name is printed as QEMU prints it.  We hold the
    other side open too, so a program may come and go; output that nobody reads fills
    the pty's buffer, after which it is dropped (counted in ``dropped``), never waited for."""

    def __init__(self):
        import tty
        self.master, self._slave = os.openpty()
        tty.setraw(self._slave)
        os.set_blocking(self.master, False)
        self.name = os.ttyname(self._slave)
        self.dropped = 0
        print(f"char device redirected to {self.name} (label serial)", file=sys.stderr, flush=True)

    def write(self, data):
        if self.master is None:
            return
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.master, view)
            except (BlockingIOError, OSError):
                self.dropped += len(view)
                return
            view = view[n:]

    def read_fds(self):
        return [self.master] if self.master is not None else []

    def on_readable(self, fd):
        try:
            return os.read(fd, READ_CHUNK)
        except (BlockingIOError, OSError):
            return b""

    def close(self):
        if self.master is not None:
            os.close(self.master)
            os.close(self._slave)
            self.master = None

    def __repr__(self):
        return f"<PtyBackend {self.name}>"


def listen_unix(path, fail):
    """A non-blocking listening unix socket at ``path`` (a stale socket file is replaced)."""
    if len(os.fsencode(path)) > 107:
        raise fail(f"socket path longer than 107 bytes: {path!r}")
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise fail(f"cannot listen on {path}: {e.strerror}") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(1)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise fail(f"cannot listen on {path}: {e.strerror or e}") from None
    return sock


SPEC_HELP = "expected stdio, null, none, pty, file:PATH, tcp:[HOST]:PORT,server[,nowait], unix:PATH,server[,nowait]"

#: -serial schemes that layers above the core add (``colo:``): prefix -> (open(spec), help)
SCHEMES = {}


def register_scheme(prefix, opener, help_text):
    """Let ``-serial PREFIX:...`` open a backend defined outside the core (the COLO link is
    registered by ``colo.link``); ``help_text`` joins the error message's list."""
    SCHEMES[prefix] = (opener, help_text)


def spec_help():
    return " or ".join([SPEC_HELP] + [help_text for _, help_text in SCHEMES.values()])


def listen_tcp(host, port, backlog, fail):
    """A non-blocking listening TCP socket on host:port; ``fail(reason)`` makes the error."""
    try:
        family, socktype, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, socktype, proto)
    except OSError as e:
        raise fail(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise fail(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def parse_socket_options(options, fail, ignored=()):
    """QEMU's socket chardev options (``server[=on|off]``, ``wait[=on|off]``, ``nowait``),
    as -serial and -qmp take them: returns (server, wait); ``fail(reason)`` makes the error."""
    server, wait = False, True
    for option in options:
        name, _, value = option.partition("=")
        if value not in ("", "on", "off"):
            raise fail(f"bad value in option {option!r} (on or off)")
        enabled = value != "off"
        if name == "server":
            server = enabled
        elif name == "wait":
            wait = enabled
        elif name == "nowait" and not value:
            wait = False
        elif name not in ignored:
            raise fail(f"unsupported option {option!r}")
    return server, wait


def parse_serial_spec(spec):
    """Open the backend a QEMU ``-serial`` string names; ``None`` for ``none`` (no port).

    ``stdio``, ``null``, ``none``, ``file:PATH``, ``tcp:HOST:PORT,server[,nowait]``
    (``tcp::PORT,server`` listens on 127.0.0.1 only; give ``0.0.0.0`` to listen on every
    interface; as in QEMU a server waits for its first client unless ``nowait``).
    """
    if spec == "none":
        return None
    if spec == "null":
        return NullBackend()
    if spec == "stdio":
        return StdioBackend()
    if spec.startswith("file:"):
        path = spec[len("file:"):]
        if not path:
            raise ConfigError(f"-serial {spec!r}: missing file name")
        try:
            return FileBackend(path)
        except BackendOpenError as e:
            raise ConfigError(f"-serial {spec!r}: {e.reason}") from None
    if spec == "pty":
        return PtyBackend()
    if spec.startswith("unix:"):
        path, *options = spec[len("unix:"):].split(",")
        if not path:
            raise ConfigError(f"-serial {spec!r}: missing socket path")
        server, wait = parse_socket_options(options, lambda reason: ConfigError(f"-serial {spec!r}: {reason}"))
        if not server:
            raise ConfigError(f"-serial {spec!r}: only server sockets are supported (add ',server')")
        try:
            return TcpServerBackend(wait=wait, unix_path=path)
        except BackendOpenError as e:
            raise ConfigError(f"-serial {spec!r}: {e.reason}") from None
    scheme = spec.partition(":")[0]
    if scheme in SCHEMES:
        return SCHEMES[scheme][0](spec)
    if spec.startswith("tcp:"):
        host, port, wait = _parse_tcp(spec)
        try:
            return TcpServerBackend(host, port, wait=wait)
        except BackendOpenError as e:
            raise ConfigError(f"-serial {spec!r}: {e.reason}") from None
    raise ConfigError(f"-serial {spec!r}: unsupported serial device ({spec_help()})")


def _parse_tcp(spec):
    """``tcp:HOST:PORT,opt,...`` -> (host, port, wait)."""
    address, *options = spec[len("tcp:"):].split(",")
    host, sep, port_text = address.rpartition(":")
    if not sep:
        raise ConfigError(f"-serial {spec!r}: expected tcp:[HOST]:PORT,server")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    host = host or TCP_DEFAULT_HOST
    try:
        port = int(port_text, 10)
    except ValueError:
        raise ConfigError(f"-serial {spec!r}: bad port {port_text!r}") from None
    if not 0 <= port <= 0xFFFF:
        raise ConfigError(f"-serial {spec!r}: port {port} out of range 0..65535")
    # nodelay: accepted, client sockets always use TCP_NODELAY
    server, wait = parse_socket_options(options, lambda reason: ConfigError(f"-serial {spec!r}: {reason}"),
                                        ignored=("nodelay",))
    if not server:
        raise ConfigError(f"-serial {spec!r}: only server sockets are supported (add ',server')")
    return host, port, wait

"""The single-threaded TCP server loop shared by the arbiter and the proxy.

One thread multiplexes listeners and connections with ``selectors`` on non-blocking sockets, so
no lock guards the server's state; only stopping crosses threads, and it goes through a wake-up
socket so that ``close()`` from another thread or a signal handler ends a ``select()`` at once.
"""

import argparse
import selectors
import signal
import socket
import sys
import threading
import time

from emu.errors import ConfigError, EmuError

from .wire import parse_tcp_uri


class Waker:
    """A socket pair whose read end sits in the selector: ``wake()`` makes a waiting ``select()`` return."""

    def __init__(self, sel):
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        sel.register(self._r, selectors.EVENT_READ, self._drain)

    def wake(self):
        """Safe from a signal handler and from any thread."""
        try:
            self._w.send(b"\0")
        except OSError:
            pass  # full: it is waking anyway, or already closed

    def _drain(self, events):
        try:
            while self._r.recv(4096):
                pass
        except OSError:
            pass

    def close(self):
        self._r.close()
        self._w.close()


class BufferedConn:
    """An accepted connection whose output waits in ``wbuf``: the selector is asked for EVENT_WRITE
    only while something waits, so an idle connection never makes the loop spin."""

    def __init__(self, sock, peer):
        self.sock = sock
        self.peer = peer          # "host:port"
        self.wbuf = bytearray()
        self.events = selectors.EVENT_READ

    def send(self, data):
        self.wbuf += data

    def flush(self, sel):
        """Send what the socket takes now and update the interest in ``sel``; OSError if the connection broke."""
        if self.wbuf:
            try:
                n = self.sock.send(self.wbuf)
            except (BlockingIOError, InterruptedError):
                n = 0
            del self.wbuf[:n]
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.wbuf else 0)
        if events != self.events:
            self.events = events
            sel.modify(self.sock, events, self)


class SelectorServer:
    """The loop: ``step(timeout)`` runs one round; ``serve_forever(stop_event)`` runs rounds until
    ``close()`` (from any thread, or a signal handler) or until ``stop_event`` is set.

    A subclass creates its listening sockets, calls ``__init__``, registers them with
    :meth:`_listen`, and provides ``_log(message)``, ``_serve(conn, events)`` (one of its
    :class:`BufferedConn` is ready), ``_round(now)`` (what a round does after the ready sockets),
    ``_deadline()`` (when a round is due without any I/O, or None) and ``_close_peers()``.
    """

    def __init__(self):
        self._sel = selectors.DefaultSelector()
        self._waker = Waker(self._sel)
        self._listeners = []
        self._conns = set()
        self._lock = threading.RLock()   # a signal handler may call close() while the loop holds it
        self._stop = False
        self._closed = False
        self._thread = None
        self._stopped = threading.Event()

    def serve_forever(self, stop_event=None):
        """Run rounds until close() or until ``stop_event`` is set (then the caller closes)."""
        with self._lock:
            if self._stop:
                return
            self._thread = threading.get_ident()
            self._stopped.clear()
        try:
            while not self._stop and not (stop_event is not None and stop_event.is_set()):
                self.step(None if stop_event is None else 0.05)
        finally:
            with self._lock:
                self._thread = None
                handed_back = not self._stop and stop_event is not None and stop_event.is_set()
            if not handed_back:
                self._teardown()
            self._stopped.set()

    def step(self, timeout=None):
        """One round: wait up to ``timeout`` seconds (None: until something happens), serve what came."""
        if self._closed:
            return
        for key, events in self._sel.select(self._wait(timeout)):
            if isinstance(key.data, BufferedConn):
                self._serve(key.data, events)
            else:
                key.data(events)
            if self._stop:
                return
        self._round(time.monotonic())

    def wake(self):
        """Make a step() that is waiting return (safe from a signal handler)."""
        self._waker.wake()

    def close(self):
        """Stop serving and close every socket; from another thread, returns once the loop has ended."""
        with self._lock:
            self._stop = True
            thread = self._thread
        if thread is None:
            self._teardown()
            return
        self.wake()
        if thread != threading.get_ident():
            self._stopped.wait()

    def _wait(self, timeout):
        deadline = self._deadline()
        if deadline is None:
            return timeout
        until = max(0.0, deadline - time.monotonic())
        return until if timeout is None else min(timeout, until)

    def _teardown(self):
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._close_peers()
        for sock in self._listeners:
            sock.close()
        self._waker.close()
        self._sel.close()

    def _listen(self, listener, what, on_accept):
        """Serve ``listener``: ``on_accept(sock, "host:port")`` for every connection (non-blocking, TCP_NODELAY);
        a failure to accept is logged as "WHAT failed: reason" and retried when the listener is ready again."""
        def accept_all(events):
            while True:
                try:
                    sock, peer = listener.accept()
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as e:
                    self._log(f"{what} failed: {e.strerror or e}")
                    return
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                on_accept(sock, f"{peer[0]}:{peer[1]}")

        self._listeners.append(listener)
        self._sel.register(listener, selectors.EVENT_READ, accept_all)

    def _add(self, conn):
        self._conns.add(conn)
        self._sel.register(conn.sock, selectors.EVENT_READ, conn)

    def _remove(self, conn):
        self._conns.discard(conn)
        self._sel.unregister(conn.sock)
        conn.sock.close()


# ---------------------------------------------------------------------- main()
class CommandParser(argparse.ArgumentParser):
    """``emu colo NAME``'s options: a bad one raises ConfigError("NAME: ...") for main() to turn into exit status 2."""

    def __init__(self, name, description):
        super().__init__(prog=f"emu colo {name}", allow_abbrev=False, description=description)
        self.name = name

    def error(self, message):
        raise ConfigError(f"{self.name}: {message}")

    def tcp_address(self, uri, option):
        """``tcp:HOST:PORT`` given to ``option`` -> (host, port)."""
        try:
            return parse_tcp_uri(uri, option)
        except EmuError as e:
            self.error(str(e))


def failed_to_start(error):
    """Say on stderr why a server did not start; main()'s exit status: 2 for a bad option, 1 otherwise."""
    print(error, file=sys.stderr)
    return 2 if isinstance(error, ConfigError) else 1


def serve_until_signalled(server, timeout=None, after_round=None):
    """Run ``server.step(timeout)`` (then ``after_round()``) until SIGTERM or SIGINT; the handlers before are
    restored.  The signal only ends the loop (closing from inside a round would pull sockets from under it):
    closing is the caller's."""
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()
        server.wake()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not stop.is_set():
            server.step(timeout)
            if after_round is not None:
                after_round()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

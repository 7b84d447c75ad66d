"""A point-to-point link between two network namespaces that delays and drops packets as
netem does, for kernels built without ``sch_netem`` (``tc qdisc ... netem`` then fails with
"Specified qdisc kind is unknown").

``python linkshaper.py NS_A NS_B IFNAME`` makes a TUN device ``IFNAME`` in each namespace
and forwards every IP packet from one to the other, each direction in order (a FIFO, as
netem with a constant delay and no jitter).  It prints ``ready`` once both devices exist;
the caller gives them addresses.  Commands on stdin, one per line:

``shape DELAY_MS LOSS_PERCENT``  each packet waits DELAY_MS, and LOSS_PERCENT of them are dropped
``cut``                          every packet dropped, both ways (a pulled cable: no reset)

It forwards until stdin closes, then exits and the devices go with it.
"""

import collections
import ctypes
import fcntl
import os
import random
import selectors
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
CLONE_NEWNET = 0x40000000
MAX_PACKET = 65536


def _setns(fd):
    if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), f"setns: {os.strerror(ctypes.get_errno())}")


def open_tun(namespace, name):
    """A TUN device ``name`` made inside ``namespace`` (this process returns to its own)."""
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{namespace}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
        finally:
            _setns(home)
    finally:
        os.close(home)
        os.close(target)
    return fd


class Shaper:
    def __init__(self, fd_a, fd_b, seed=None):
        self.fds = (fd_a, fd_b)
        self.delay_s, self.loss, self.cut = 0.0, 0.0, False
        self.rng = random.Random(seed)
        self.queues = {fd_a: collections.deque(), fd_b: collections.deque()}  # to-be-written, by source
        self.forwarded = self.dropped = 0

    def command(self, line):
        words = line.split()
        if words[:1] == ["shape"] and len(words) == 3:
            self.delay_s, self.loss, self.cut = float(words[1]) / 1e3, float(words[2]) / 100, False
        elif words == ["cut"]:
            self.cut = True
        elif words:
            print(f"linkshaper: unknown command {line.strip()!r}", file=sys.stderr, flush=True)

    def take(self, fd):
        """Every packet ``fd`` has now, each to its queue (or dropped)."""
        while True:
            try:
                packet = os.read(fd, MAX_PACKET)
            except BlockingIOError:
                return
            if self.cut or (self.loss and self.rng.random() < self.loss):
                self.dropped += 1
                continue
            self.queues[fd].append((time.monotonic() + self.delay_s, packet))

    def deliver(self):
        """Write what is due; returns the seconds until the next packet is due (or None)."""
        now, wait = time.monotonic(), None
        for source, queue in self.queues.items():
            target = self.fds[1] if source == self.fds[0] else self.fds[0]
            while queue and queue[0][0] <= now:
                _, packet = queue.popleft()
                try:
                    os.write(target, packet)
                    self.forwarded += 1
                except (BlockingIOError, OSError):  # the device is down or full: a lost packet
                    self.dropped += 1
            if queue:
                due = queue[0][0] - now
                wait = due if wait is None else min(wait, due)
        return wait


def main(argv):
    ns_a, ns_b, name = argv
    shaper = Shaper(open_tun(ns_a, name), open_tun(ns_b, name))
    selector = selectors.DefaultSelector()
    for fd in shaper.fds:
        selector.register(fd, selectors.EVENT_READ)
    selector.register(sys.stdin.fileno(), selectors.EVENT_READ)
    print("ready", flush=True)
    pending = b""
    while True:
        for key, _ in selector.select(shaper.deliver()):
            if key.fd == sys.stdin.fileno():
                chunk = os.read(key.fd, 4096)
                if not chunk:
                    return 0
                pending += chunk
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    shaper.command(line.decode())
            else:
                shaper.take(key.fd)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

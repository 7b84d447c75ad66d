"""The virtual clock (nanoseconds) and the timers it drives.

Every device timer is a :class:`Timer` on the machine's :class:`VirtualClock`.  Guest time
runs in one of three modes (its arithmetic is ``guest_clock_*`` in ``emu/cpu/emuc.c``):

* ``realtime``: guest time follows the host monotonic clock while the machine runs and
  stands still while it is paused (QEMU's ``QEMU_CLOCK_VIRTUAL``);
* ``icount``: guest time advances with executed guest work (deterministic): the C block
  hook counts the bytes of guest code run, ``ns_per_unit`` (2^shift) ns each;
* ``manual``: tests move time explicitly with :meth:`VirtualClock.step` (QEMU qtest style).

Timers never fire by themselves: the run loop (or a test) calls :meth:`run_due_timers`.
"""

import heapq
import itertools

from emu.cpu import _emuc

NS_PER_SEC = 1_000_000_000


class Timer:
    """A one-shot deadline on a clock; periodic devices re-arm it from the callback."""

    __slots__ = ("clock", "callback", "name", "deadline", "_seq")

    def __init__(self, clock, callback, name=""):
        self.clock = clock
        self.callback = callback
        self.name = name
        self.deadline = None  # ns, or None when not armed
        self._seq = 0

    @property
    def armed(self):
        return self.deadline is not None

    def arm(self, deadline_ns):
        """Fire the callback once the clock reaches ``deadline_ns`` (absolute)."""
        self.deadline = int(deadline_ns)
        self.clock._schedule(self)

    def arm_in(self, delta_ns):
        self.arm(self.clock.now() + int(delta_ns))

    def cancel(self):
        self.deadline = None
        self._seq += 1  # invalidates any heap entry


class VirtualClock:
    """Guest time in nanoseconds plus the set of armed timers.

    Guest time itself is kept in C (``guest_clock`` in ``emu/cpu/emuc.h``), where the virtual
    TSC and the deadline checks read it inside the engine; this class reads and sets it
    there, so that there is one definition of it.  ``base`` is the ``guest_clock`` to use
    (the machine passes the one in its C state); without it the clock has its own.
    """

    MODES = ("realtime", "icount", "manual")

    def __init__(self, mode="realtime", *, base=None, ns_per_unit=1):
        if mode not in self.MODES:
            raise ValueError(f"clock: unknown mode {mode!r}")
        if base is None:
            base = _emuc.ffi.new("guest_clock *")
        self.base = base
        base.mode = {"realtime": _emuc.lib.GUEST_CLOCK_REALTIME, "icount": _emuc.lib.GUEST_CLOCK_ICOUNT,
                     "manual": _emuc.lib.GUEST_CLOCK_MANUAL}[mode]
        base.ns_per_unit = ns_per_unit
        base.running = 0
        self.mode = mode
        self._heap = []
        self._counter = itertools.count()
        self._now = _emuc.lib.guest_clock_now
        self.set_now(0)

    @property
    def ns_per_unit(self):
        """Deterministic mode: guest nanoseconds per unit of guest work (byte of code run)."""
        return self.base.ns_per_unit

    # --- reading time -------------------------------------------------------------
    def now(self):
        return self._now(self.base)

    # --- run state (realtime) -----------------------------------------------------
    def start(self):
        """Let guest time flow again (realtime) from where it stopped."""
        _emuc.lib.guest_clock_start(self.base)

    def stop(self):
        _emuc.lib.guest_clock_stop(self.base)

    def set_now(self, ns):
        """Place the clock at ``ns`` (state load)."""
        _emuc.lib.guest_clock_set(self.base, int(ns))

    def warp_to(self, ns):
        """Jump forward to ``ns`` (an idle CPU in icount mode skips to the next deadline)."""
        if ns > self.now():
            self.set_now(ns)

    def step(self, delta_ns):
        """Manual mode: advance time and fire every timer that came due, in order."""
        if self.mode != "manual":
            raise ValueError(f"clock: step() moves a manual clock, not a {self.mode} one")
        target = self.now() + int(delta_ns)
        while True:
            d = self.next_deadline()
            if d is None or d > target:
                break
            self.set_now(max(self.now(), d))
            self.run_due_timers()
        self.set_now(target)
        self.run_due_timers()

    # --- timers --------------------------------------------------------------------
    def new_timer(self, callback, name=""):
        return Timer(self, callback, name)

    def _schedule(self, timer):
        timer._seq += 1
        heapq.heappush(self._heap, (timer.deadline, next(self._counter), timer._seq, timer))

    def _clean(self):
        heap = self._heap
        while heap and (heap[0][3].deadline != heap[0][0] or heap[0][3]._seq != heap[0][2]):
            heapq.heappop(heap)

    def next_deadline(self):
        """The earliest armed deadline, or None."""
        self._clean()
        return self._heap[0][0] if self._heap else None

    def run_due_timers(self):
        """Fire every timer whose deadline has passed; returns how many fired."""
        fired = 0
        now = self.now()
        while True:
            self._clean()
            if not self._heap or self._heap[0][0] > now:
                return fired
            _, _, _, timer = heapq.heappop(self._heap)
            timer.deadline = None
            timer.callback()
            fired += 1
            now = self.now()

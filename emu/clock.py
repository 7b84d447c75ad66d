"""The virtual clock (nanoseconds) and the timers it drives.

Every device timer is a :class:`Timer` on the machine's :class:`VirtualClock`.  The clock
reads its time from a *source*:

* ``realtime``: guest time follows the host monotonic clock while the machine runs and
  stands still while it is paused (QEMU's ``QEMU_CLOCK_VIRTUAL``);
* ``icount``: guest time advances with executed guest work (deterministic): the C block
  hook counts the bytes of guest code run, ``ns_per_unit`` (2^shift) ns each;
* ``manual``: tests move time explicitly with :meth:`VirtualClock.step` (QEMU qtest style).

Timers never fire by themselves: the run loop (or a test) calls :meth:`run_due_timers`.
"""

import heapq
import itertools
import time

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
    """Guest time in nanoseconds plus the set of armed timers."""

    def __init__(self, mode="realtime"):
        if mode not in ("realtime", "icount", "manual"):
            raise ValueError(f"clock: unknown mode {mode!r}")
        self.mode = mode
        self._heap = []
        self._counter = itertools.count()
        self._manual_ns = 0
        # realtime: guest_ns = host_ns - _offset while running; frozen while paused
        self._running = False
        self._offset = time.monotonic_ns()
        self._frozen_ns = 0
        # icount: guest_ns = _icount_base + work_units * ns_per_unit
        self.icount_source = None  # callable returning executed work units
        self.ns_per_unit = 1
        self._icount_base = 0

    # --- reading time -------------------------------------------------------------
    def now(self):
        if self.mode == "realtime":
            if self._running:
                return time.monotonic_ns() - self._offset
            return self._frozen_ns
        if self.mode == "icount":
            return self._icount_base + self.icount_source() * self.ns_per_unit
        return self._manual_ns

    # --- run state (realtime) -----------------------------------------------------
    def start(self):
        """Let guest time flow again (realtime) from where it stopped."""
        if self.mode == "realtime" and not self._running:
            self._offset = time.monotonic_ns() - self._frozen_ns
            self._running = True

    def stop(self):
        if self.mode == "realtime" and self._running:
            self._frozen_ns = time.monotonic_ns() - self._offset
            self._running = False

    def set_now(self, ns):
        """Place the clock at ``ns`` (state load)."""
        ns = int(ns)
        if self.mode == "realtime":
            self._frozen_ns = ns
            self._offset = time.monotonic_ns() - ns
        elif self.mode == "icount":
            self._icount_base = ns - self.icount_source() * self.ns_per_unit
        else:
            self._manual_ns = ns

    def warp_to(self, ns):
        """Jump forward to ``ns`` (an idle CPU in icount mode skips to the next deadline)."""
        if ns > self.now():
            self.set_now(ns)

    def step(self, delta_ns):
        """Manual mode: advance time and fire every timer that came due, in order."""
        target = self._manual_ns + int(delta_ns)
        while True:
            d = self.next_deadline()
            if d is None or d > target:
                break
            self._manual_ns = max(self._manual_ns, d)
            self.run_due_timers()
        self._manual_ns = target
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

    def armed_timers(self):
        """Every armed timer (for state save and debugging)."""
        self._clean()
        return sorted({id(t): t for *_, t in self._heap if t.deadline is not None}.values(),
                      key=lambda t: (t.deadline, t.name))

"""The machine as live migration and COLO see it: the replication surface.

``colo/`` uses a machine through this surface alone, never through the state stream's or
the devices' internals, so that the core can change behind it.  The traits follow Cloud
Hypervisor's ``vm-migration``: :class:`Pausable`, :class:`Snapshottable` and
:class:`Migratable` (RAM pages and the dirty log), plus what a replication job needs of
the run loop (:class:`RunLoopServices`) and of the machine's lifecycle
(:class:`Lifecycle`).  :class:`ReplicationSurface` is all of them; ``emu.machine.Machine``
implements it.

Page numbers are integer arrays (or sequences) of 4 KiB page indices; a page buffer is a
numpy ``uint8`` array the size of RAM.  Every stream passed in is hostile: ``check_*``
refuses a bad one whole, touching nothing, before anything of it is applied.
"""

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class CheckedRam(Protocol):
    """The pages of a RAM stream that passed :meth:`Migratable.check_ram`."""

    pages: Any  # the page numbers the stream carries, in stream order

    def write_into(self, buffer: Any) -> None:
        """Write the pages into ``buffer`` (a page buffer: RAM, or a RAM cache)."""


@runtime_checkable
class CheckedState(Protocol):
    """A device-state stream that passed :meth:`Snapshottable.check_state`."""

    ram_pages: CheckedRam | None  # the RAM pages it also carries, if any


@runtime_checkable
class Pausable(Protocol):
    status: str  # QEMU's RunState name: running, paused, inmigrate, postmigrate, ...

    def pause(self) -> None:
        """Stop the guest and its time now; the run loop returns at the next slice boundary."""

    def resume(self) -> None:
        """Let a paused guest run again."""


@runtime_checkable
class Snapshottable(Protocol):
    machine_type: str

    def save_state(self, ram_pages: Any = None, out: Any = None) -> Any:
        """Device state (and RAM pages if asked) as one stream; never changes the machine."""

    def check_state(self, data: Any, verify_checksum: bool = True) -> CheckedState:
        """Check a whole device-state stream without applying it ("check a checkpoint
        before deciding"); ``verify_checksum=False`` only when the caller has verified a
        digest over these bytes.  Returns what :meth:`apply_state` takes."""

    def apply_state(self, checked: CheckedState, rollback: Any = True) -> None:
        """Apply what :meth:`check_state` passed; a device that still refuses leaves the
        machine as it was: as ``rollback``, a :meth:`save_state` stream taken since the
        guest last ran (a paused secondary takes it while it waits), or as it is now (True)."""

    def load_state(self, data: Any, rollback: bool = True) -> None:
        """:meth:`check_state`, then :meth:`apply_state`."""

    def state_digest(self) -> str:
        """SHA-256 (hex) of the whole guest-visible state, for consistency checks."""


@runtime_checkable
class Migratable(Protocol):
    ram_size: int
    page_count: int

    def save_ram(self, pages: Any) -> bytes:
        """A RAM-only stream of ``pages``."""

    def check_ram(self, data: Any, verify_checksum: bool = True) -> CheckedRam:
        """Check a whole RAM-only stream without writing a page of it."""

    def load_ram(self, data: Any) -> int:
        """Check, then write a RAM-only stream into RAM; returns the number of pages."""

    def copy_ram(self) -> Any:
        """A page buffer holding all of RAM now."""

    def write_ram_pages(self, pages: Any, source: Any) -> None:
        """Copy ``pages`` of the page buffer ``source`` into RAM (as a host write)."""

    def count_zero_pages(self, pages: Any) -> int:
        """How many of ``pages`` hold only zeroes (migration statistics)."""

    def start_dirty_log(self) -> None:
        """Track every page written from now on, by the guest or the host."""

    def dirty_pages(self) -> Any:
        """The pages written since the last call (or the start); clears the log."""

    def stop_dirty_log(self) -> None: ...


@runtime_checkable
class RunLoopServices(Protocol):
    idle_wait_cap: float  # the longest host sleep between two runs of the background jobs (s)

    def add_background_job(self, job: Any) -> None:
        """Call ``job()`` between CPU slices, and while the guest is paused."""

    def remove_background_job(self, job: Any) -> None: ...

    def add_fd_handler(self, fd: int, callback: Any) -> None:
        """Call ``callback()`` between slices whenever ``fd`` is readable."""

    def remove_fd_handler(self, fd: int) -> None: ...

    def discard_pending_input(self, backend: Any) -> None:
        """Forget host input from ``backend`` that the guest has not taken yet."""


@runtime_checkable
class Lifecycle(Protocol):
    def emit(self, event: str, data: Any = None) -> None:
        """A QMP event (MIGRATION, COLO_EXIT, ...)."""

    def request_exit(self, status: int, message: Any = None) -> None:
        """End the run with this exit status."""


@runtime_checkable
class ReplicationSurface(Pausable, Snapshottable, Migratable, RunLoopServices, Lifecycle, Protocol):
    """Everything ``colo/`` may use of a machine."""

"""The machine as live migration and COLO see it: the replication surface.

``colo/`` uses a machine through this surface alone, never through the state stream's or
the devices' internals, so that the core can change behind it.  The traits follow Cloud
Hypervisor's ``vm-migration``: :class:`Pausable`, :class:`Snapshottable` and
:class:`Migratable` (RAM pages and the dirty log), plus what a replication job needs of
the run loop (:class:`RunLoopServices`) and of the machine's lifecycle
(:class:`Lifecycle`), and the disks' write log and overlay (:class:`DiskReplicable`, QEMU's
block replication).  :class:`ReplicationSurface` is all of them; ``emu.machine.Machine``
implements it.

Page numbers are integer arrays (or sequences) of 4 KiB page indices; a page buffer is a
numpy ``uint8`` array the size of RAM.  Every stream passed in is hostile: ``check_*``
refuses a bad one whole, touching nothing, before anything of it is applied.
"""

from typing import Any, Protocol, runtime_checkable

from emu.memory import MAX_RAM_SIZE, PAGE_SIZE  # part of the surface: the page unit, the largest RAM

MAX_PAGES = MAX_RAM_SIZE // PAGE_SIZE


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
class CheckedDiskBlocks(Protocol):
    """The blocks of a disk stream that passed :meth:`DiskReplicable.check_disk_blocks`."""

    count: int  # how many blocks it carries, over all drives


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

    def page_fingerprints(self) -> Any:
        """A 64-bit hash of every RAM page (uint64 array), to name the pages that differ."""


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
class DiskReplicable(Protocol):
    """The disks (``-drive``) as a pair replicates them, in 4 KiB blocks.  Block numbers are
    ascending integer arrays; ``{drive id: ...}`` dicts cover the writable drives."""

    def disk_sizes(self) -> dict:
        """{drive id: image size in bytes} of every drive."""

    def disk_chunk_digests(self) -> dict:
        """{drive id: SHA-256 of every 1 MiB of the image, concatenated}: the images of two
        machines are compared with these when a pair forms."""

    def start_disk_write_log(self) -> None:
        """Log every block the guest writes from now on (the primary)."""

    def disk_writes(self) -> dict:
        """{drive id: the blocks written since the last call (or the start)}; clears the log."""

    def stop_disk_write_log(self) -> None: ...

    def save_disk_blocks(self, blocks: dict) -> bytes:
        """A disk stream of ``blocks`` (``{drive id: block numbers}``), read from the disks now."""

    def check_disk_blocks(self, data: Any, verify_checksum: bool = True) -> CheckedDiskBlocks:
        """Check a whole disk stream without writing a block of it."""

    def write_disk_blocks(self, checked: CheckedDiskBlocks) -> None:
        """Write what :meth:`check_disk_blocks` passed into the images themselves."""

    def start_disk_overlay(self) -> None:
        """The guest's writes go to an overlay in memory from now on, its reads look there
        first; the images change only by :meth:`write_disk_blocks` (the secondary)."""

    def discard_disk_overlay(self) -> int:
        """Forget the guest's writes in the overlay (it stays on); returns how many blocks."""

    def end_disk_overlay(self, commit: bool) -> None:
        """Writes go straight to the images again; ``commit``: the overlay is written there first."""


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
class ReplicationSurface(Pausable, Snapshottable, Migratable, DiskReplicable, RunLoopServices, Lifecycle, Protocol):
    """Everything ``colo/`` may use of a machine."""

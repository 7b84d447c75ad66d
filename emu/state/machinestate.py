"""The machine's save helpers: device state and RAM pages to a stream and back.

What is saved: the CPU (by register name, :mod:`emu.cpu.state`), the virtual clock, and
every device's ``VMSTATE`` (each armed timer travels with its device as an absolute
deadline).  Loading is two steps that a caller may also take apart (a COLO secondary
checks a checkpoint whole before it decides to apply it): :func:`check` parses and checks
the whole stream and decodes every section, touching nothing; :func:`apply` writes a
checked stream into the machine.  Should a device still refuse a value in its
``post_load``, the machine is put back exactly as it was before the load started.
"""

import hashlib

import numpy as np

from emu.state import stream
from emu.cpu.state import VMSTATE as CPU_VMSTATE
from emu.cpu.state import CpuState
from emu.errors import StateError
from emu.state.vmstate import I64, VMStateDescription


class ClockState:
    """The clock's section: guest time in ns when the state was taken."""

    def __init__(self, now_ns=0):
        self.now_ns = now_ns


def _check_clock(state, version_id):
    if state.now_ns < 0:
        raise StateError(f"clock: field now_ns: negative time {state.now_ns}")


CLOCK_VMSTATE = VMStateDescription("clock", version_id=1, minimum_version_id=1, fields=[I64("now_ns")],
                                   post_load=_check_clock)


def state_objects(machine):
    """(section id, object) for every piece of guest-visible device state, in save order."""
    objects = []
    for device in machine.devices:
        for obj in device.state_objects():
            objects.append((obj.name, obj))
    names = [name for name, _ in objects]
    if len(set(names)) != len(names):
        raise StateError(f"machine: duplicate device names {sorted(n for n in names if names.count(n) > 1)}")
    return objects


def _prepare(machine):
    """Bring C-side copies of device state back into the models (no guest-visible change).

    Device work (``poll``: a NIC taking received frames, a queue's requests) is not done
    here: it writes RAM and advances device state, and a COLO checkpoint saves RAM before
    the devices, so work in between would leave the devices ahead of the RAM that travels
    with them (a NIC's used index past the entries its ring holds).  A kick not yet
    processed at a save is the device's to redo after the load."""
    for fast in machine.fast_paths:
        fast.to_model()


def save(machine, ram_pages=None, out=None):
    """The machine's state as one stream; ``ram_pages``: None (no RAM), "all" or page numbers.
    With ``out`` (a binary file) the stream is written there and its size returned."""
    _prepare(machine)
    writer = stream.StreamWriter(machine.machine_type, machine.ram.size)
    writer.device("cpu", 0, CPU_VMSTATE.version_id, CPU_VMSTATE.save(CpuState.capture(machine.cpu)))
    writer.device("clock", 0, CLOCK_VMSTATE.version_id, CLOCK_VMSTATE.save(ClockState(machine.clock.now())))
    for name, obj in state_objects(machine):
        writer.device(name, 0, obj.VMSTATE.version_id, obj.VMSTATE.save(obj))
    if ram_pages is not None:
        if isinstance(ram_pages, str) and ram_pages == "all":
            ram_pages = np.arange(machine.ram.npages)
        writer.ram(machine.ram.buf, ram_pages)
    return writer.finish(out)


class CheckedState:
    """A device-state stream that passed every check of :func:`check`: the parsed stream
    (its RAM pages, if any, are ``ram_pages``) and every section decoded."""

    __slots__ = ("parsed", "decoded")

    def __init__(self, parsed, decoded):
        self.parsed, self.decoded = parsed, decoded

    @property
    def ram_pages(self):
        return self.parsed.ram_pages


def check(machine, data, verify_checksum=True):
    """Parse and check a whole stream against this machine, touching nothing; returns what
    :func:`apply` takes.  ``verify_checksum=False`` skips only the stream's own checksum,
    for a caller that has verified a digest over these very bytes."""
    return CheckedState(*decode(machine, data, verify_checksum))


def decode(machine, data, verify_checksum=True):
    """Parse and check a stream against this machine: (parsed stream, decoded sections)."""
    parsed = stream.parse(data, machine.machine_type, machine.ram.size, verify_checksum)
    descriptions = {("cpu", 0): CPU_VMSTATE, ("clock", 0): CLOCK_VMSTATE}
    descriptions.update({(name, 0): obj.VMSTATE for name, obj in state_objects(machine)})
    missing = sorted(k[0] for k in descriptions if k not in parsed.devices)
    unknown = sorted(f"{k[0]}#{k[1]}" for k in parsed.devices if k not in descriptions)
    if unknown:
        raise StateError(f"state stream has unknown sections: {', '.join(unknown)}")
    if missing:
        raise StateError(f"state stream lacks sections: {', '.join(missing)}")
    for position, (want, got) in enumerate(zip(descriptions, parsed.devices, strict=True)):
        if want != got:
            raise StateError(f"state stream sections out of order: expected {want[0]!r} at position {position}, "
                             f"found {got[0]!r}")
    decoded = {}
    for key, description in descriptions.items():
        version, payload = parsed.devices[key]
        try:
            decoded[key] = description.decode(payload, version)
        except StateError as e:
            raise StateError(f"section {key[0]!r}: {e}") from None
    return parsed, decoded


def apply(machine, checked):
    """Write a checked stream into the machine (it must not be running).

    Device state goes first, RAM last: only a device's post_load can still refuse, and
    then no page has been written yet."""
    parsed, decoded = checked.parsed, checked.decoded
    # the loaded state is a live machine again, whatever this one was doing (even exiting)
    machine.exit_status = machine.exit_message = None
    machine.reset_requested = False
    machine.cstate.exiting = 0
    cpu_state = CpuState(machine.cpu)
    CPU_VMSTATE.apply(cpu_state, decoded[("cpu", 0)])
    clock_state = ClockState()
    CLOCK_VMSTATE.apply(clock_state, decoded[("clock", 0)])
    cpu_state.write_to_cpu()  # sets the work counter the deterministic clock is based on
    machine.clock.set_now(clock_state.now_ns)
    for name, obj in state_objects(machine):
        obj.VMSTATE.apply(obj, decoded[(name, 0)])
    for fast in machine.fast_paths:
        fast.from_model()
    for hook in machine.after_load:
        hook()
    if parsed.ram_pages is not None:
        _write_pages(machine, parsed.ram_pages)


def _write_pages(machine, ram_pages):
    ram_pages.write_into(machine.ram.buf)
    _host_wrote(machine, ram_pages.pages)


def _host_wrote(machine, pages):
    """Pages written from the host: the dirty log learns of them, translated code over them goes."""
    machine.ram.host_dirty[pages] = 1
    machine.cpu.host_wrote_pages(pages)


def load(machine, checked, rollback=True):
    """Apply a checked stream; on any error the machine is left exactly as it was.

    ``rollback``: True takes the copy to return to now; a stream from :func:`save` taken
    since the machine last ran is that copy already; False skips it (an incoming
    migration, whose machine holds nothing yet)."""
    if rollback is False:
        apply(machine, checked)
        return
    before = save(machine) if rollback is True else rollback  # device state only: RAM is written last
    try:
        apply(machine, checked)
    except Exception:
        apply(machine, check(machine, before))
        raise


def save_ram(machine, pages):
    """A stream with RAM pages only (no device state), for page sets."""
    writer = stream.StreamWriter(machine.machine_type, machine.ram.size)
    writer.ram(machine.ram.buf, pages)
    return writer.finish()


def check_ram(machine, data, verify_checksum=True):
    """Check a whole RAM-only stream, touching nothing; returns its pages
    (:class:`emu.state.stream.RamPages`).  ``verify_checksum`` as for :func:`check`."""
    parsed = stream.parse(data, machine.machine_type, machine.ram.size, verify_checksum)
    if parsed.devices:
        raise StateError(f"RAM stream carries device sections: {sorted(k[0] for k in parsed.devices)}")
    if parsed.ram_pages is None:
        raise StateError("RAM stream has no RAM section")
    return parsed.ram_pages


def load_ram(machine, data):
    """Load a RAM-only stream; checked whole before any page is written."""
    ram_pages = check_ram(machine, data)
    _write_pages(machine, ram_pages)
    return len(ram_pages.pages)


def write_pages(machine, pages, source):
    """Copy ``pages`` of ``source`` (a buffer the size of RAM) into RAM."""
    pages = np.asarray(pages, dtype=np.int64)
    if not len(pages):
        return
    ram = machine.ram.buf.reshape(-1, stream.PAGE_SIZE)
    data = stream.nonzero_pages(source, pages)
    ram[pages[data]] = source.reshape(-1, stream.PAGE_SIZE)[pages[data]]
    stream.zero_where_not_zero(machine.ram.buf, pages[~data])
    _host_wrote(machine, pages)


def count_zero_pages(machine, pages):
    """How many of ``pages`` hold only zero bytes."""
    return len(pages) - int(np.count_nonzero(stream.nonzero_pages(machine.ram.buf, pages, anonymous=True)))


def digest(machine):
    """SHA-256 of the whole guest-visible state (device state and all of RAM)."""
    h = hashlib.sha256()
    h.update(device_state_digest_bytes(machine))
    h.update(memoryview(machine.ram.buf))
    return h.hexdigest()


def page_fingerprints(machine):
    """XXH3-64 of every RAM page (uint64 array): with two machines' fingerprints a debug
    check names the pages that differ, not only that something does."""
    import xxhash
    view, size = memoryview(machine.ram.buf).cast("B"), stream.PAGE_SIZE
    return np.fromiter((xxhash.xxh3_64_intdigest(view[i:i + size]) for i in range(0, len(view), size)),
                       dtype=np.uint64, count=machine.ram.npages)


def device_state_digest_bytes(machine):
    data = save(machine)
    return data[:-stream.DIGEST_SIZE]

"""The machine's save helpers: device state and RAM pages to a stream and back.

What is saved: the CPU (by register name, :mod:`emu.cpu.state`), the virtual clock, and
every device's ``VMSTATE`` (each armed timer travels with its device as an absolute
deadline).  Loading first parses and checks the whole stream and decodes every section,
then applies it; should a device still refuse a value in its ``post_load``, the machine is
put back exactly as it was before the load started.
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
    """Bring C-side copies of device state back into the models (no guest-visible change)."""
    for fast in machine.fast_paths:
        fast.to_model()
    for device in machine.devices:
        device.poll()


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


def decode(machine, data):
    """Parse and check a stream against this machine; returns what :func:`apply` needs."""
    parsed = stream.parse(data, machine.machine_type, machine.ram.size)
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


def apply(machine, parsed, decoded):
    """Write a decoded stream into the machine (it must not be running).

    Device state goes first, RAM last: only a device's post_load can still refuse, and
    then no page has been written yet."""
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
    machine.ram.host_dirty[ram_pages.pages] = 1
    machine.cpu.host_wrote_pages(ram_pages.pages)


def load(machine, data, rollback=True):
    """Load a stream; on any error the machine is left exactly as it was (``rollback``:
    an incoming migration, whose machine holds nothing yet, skips taking the copy)."""
    parsed, decoded = decode(machine, data)
    if not rollback:
        apply(machine, parsed, decoded)
        return
    rollback = save(machine)  # device state only: RAM is written last, after every check
    try:
        apply(machine, parsed, decoded)
    except Exception:
        apply(machine, *decode(machine, rollback))
        raise


def save_ram(machine, pages):
    """A stream with RAM pages only (no device state), for page sets."""
    writer = stream.StreamWriter(machine.machine_type, machine.ram.size)
    writer.ram(machine.ram.buf, pages)
    return writer.finish()


def load_ram(machine, data):
    """Load a RAM-only stream; checked whole before any page is written."""
    parsed = stream.parse(data, machine.machine_type, machine.ram.size)
    if parsed.devices:
        raise StateError(f"RAM stream carries device sections: {sorted(k[0] for k in parsed.devices)}")
    if parsed.ram_pages is None:
        raise StateError("RAM stream has no RAM section")
    _write_pages(machine, parsed.ram_pages)
    return len(parsed.ram_pages.pages)


def digest(machine):
    """SHA-256 of the whole guest-visible state (device state and all of RAM)."""
    h = hashlib.sha256()
    h.update(device_state_digest_bytes(machine))
    h.update(memoryview(machine.ram.buf))
    return h.hexdigest()


def device_state_digest_bytes(machine):
    data = save(machine)
    return data[:-stream.DIGEST_SIZE]

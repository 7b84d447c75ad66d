"""Helpers for the state tests: firmware guests in deterministic mode, serial input at fixed
guest times, read-only probes of device state, and a restore worker for another process.

The restore worker, ``python tests/statehelpers.py [JOB.json ...]`` (job file names also one
per line on stdin), loads each snapshot of a job into a freshly built machine, feeds the
input that was still scheduled after the save point, runs the guest to its end and writes
the results to ``JOB.json.result`` (see :func:`restore_worker`).
"""

import json
import pathlib
import sys
import traceback

import xxhash
from firmware_cases import CASES_BY_NAME

from emu.state import machinestate
from emu.chardev import CharBackend
from emu.devices.fastpath import UartFastPath
from emu.devices.i8254 import CE_COUNTING, PIT_FREQ_HZ
from emu.memory import parse_size
from machines import pc

ROOT = pathlib.Path(__file__).resolve().parent.parent
NS_PER_SEC = 1_000_000_000


def state_fingerprint(machine):
    """What :meth:`Machine.state_digest` covers (every device section, all of RAM), hashed
    with XXH3-128 straight from the RAM buffer: a 64 MiB machine costs milliseconds."""
    h = xxhash.xxh3_128()
    h.update(machinestate.device_state_digest_bytes(machine))
    h.update(machine.ram.buf)
    return h.hexdigest()


class CaptureBackend(CharBackend):
    """COM1's host side: keeps every byte the guest sends; no host input."""

    def __init__(self):
        self.data = bytearray()

    def write(self, data):
        self.data += data


class ScriptedInput:
    """COM1 input at fixed guest times: chunk ``data`` reaches the UART when the virtual clock
    reaches ``when`` (a clock timer, so a deterministic run sees it at the same guest time on
    every run).  Every chunk must fit the receiver at once: nothing is ever held back on the
    host side, so the guest state alone says what input has arrived."""

    def __init__(self, machine, front, schedule):
        self.front = front
        self.pending = sorted((int(when), bytes(data)) for when, data in schedule)
        self.timer = machine.clock.new_timer(self._deliver, "scripted-input")
        self._arm()

    def _arm(self):
        if self.pending:
            self.timer.arm(self.pending[0][0])

    def _deliver(self):
        when, data = self.pending.pop(0)
        accepted = self.front.receive(data)
        if accepted != len(data):
            raise AssertionError(f"scripted input {data!r} at {when} ns: the UART took only {accepted} bytes")
        self._arm()


class Guest:
    """A firmware case (firmware_cases.FirmwareCase) on a ``pc`` machine built in this process,
    deterministic (icount shift 0) unless ``icount_shift`` is None, COM1 output captured."""

    def __init__(self, case, schedule=(), icount_shift=0):
        self.case = case
        options = dict(ram_size=parse_size(case.memory), serial=["null"], icount_shift=icount_shift,
                       no_reboot=True)
        image = str(ROOT / case.image)
        if case.kind == "bios":
            options["bios"] = image
        else:
            options.update(kernel=image, append=case.append, initrd=str(ROOT / case.initrd) if case.initrd else None)
        options["fw_cfg_files"] = case.fw_cfg
        self.machine = pc.build(**options)
        self.front = next(d for d in self.machine.devices if isinstance(d, UartFastPath))
        self.capture = CaptureBackend()
        self.front.uart.backend = self.capture
        self.input = ScriptedInput(self.machine, self.front, schedule) if schedule else None

    # ------------------------------------------------------------------ running
    @property
    def output(self):
        return bytes(self.capture.data)

    @property
    def now(self):
        return self.machine.clock.now()

    @property
    def exited(self):
        return self.machine.exit_status is not None

    def run(self, until_ns=None):
        return self.machine.run(until_ns=until_ns)

    def pending_input(self):
        """The input chunks not yet delivered: all the host knows beyond the guest state."""
        return list(self.input.pending) if self.input else []

    def replace_input(self, schedule):
        """Feed ``schedule`` from now on instead of what was still pending (after a load)."""
        if self.input is not None:
            self.input.timer.cancel()
        self.input = ScriptedInput(self.machine, self.front, schedule) if schedule else None

    def advance_until(self, predicate, step_ns, at_deadlines=False, limit_ns=None):
        """Run in slices of at most ``step_ns`` until ``predicate(self)`` holds; False if the
        guest exits or ``limit_ns`` of guest time passes first.  With ``at_deadlines`` a slice
        also ends at the next timer deadline: the loop then returns right after the timers
        fired, before an interrupt they raised is delivered."""
        clock = self.machine.clock
        while not self.exited and (limit_ns is None or self.now < limit_ns):
            target = self.now + step_ns
            deadline = clock.next_deadline() if at_deadlines else None
            if deadline is not None and deadline < target:
                target = max(deadline, self.now + 1)
            if self.run(until_ns=target) is not None:
                return False
            if predicate(self):
                return True
        return False

    # ------------------------------------------------------------------ read-only probes
    def device(self, type_name):
        return next(d for d in self.machine.devices if type(d).__name__ == type_name)

    @property
    def pic(self):
        return self.machine.interrupt_controller.pic  # the board's InterruptRouter

    @property
    def lapic(self):
        return self.device("LocalApic")

    @property
    def pit(self):
        return self.device("Pit8254")

    @property
    def uart(self):
        return self.front.uart

    def cpu_mode(self):
        return self.machine.cpu.mode()

    def cpl(self):
        return self.machine.cpu.context().hflags & 3

    def pic_request_pending(self):
        """The 8259's INT output is up: a request not yet acknowledged by an INTA cycle."""
        return self.pic.int_pending

    def lapic_request_pending(self):
        """A vector in the local APIC's IRR above the processor priority, not yet delivered."""
        return self.lapic.has_interrupt()

    def pit_phase(self, channel=0):
        """(elapsed input clocks in the current period, period) of a counting PIT channel,
        computed without touching the device (no reload is applied); None if not counting."""
        pit = self.pit
        if pit.counter_state[channel] != CE_COUNTING or pit.reload_time[channel] != -1:
            return None
        elapsed = max(0, self.now - pit.count_load_time[channel]) * PIT_FREQ_HZ // NS_PER_SEC
        return elapsed % pit.count[channel], pit.count[channel]

    def pit_mid_count(self, channel=0):
        phase = self.pit_phase(channel)
        return phase is not None and phase[1] // 4 <= phase[0] <= 3 * phase[1] // 4


# ---------------------------------------------------------------------- input schedules
_ready_times = {}

#: Gaps (guest ns) between the input chunks of the input-driven guests: service's TIME
#: request comes after more than a second, so its answer depends on the RTC's state.
INPUT_CHUNKS = {
    "echo": [(0, b"hello\r"), (300_000, b"world\n"), (300_000, b"q")],
    "service": [(0, b"hello\r\n"), (300_000, b"world\r\n"), (300_000, b"\r\n"),
                (1_300_000_000, b"TIME\r\n"), (300_000, b"state survives\r\n"), (300_000, b"QUIT\r\n")],
    "service-node": [(0, b"NODE\r\n"), (300_000, b"hello\r\n"), (300_000, b"NODE\r\n"), (300_000, b"QUIT\r\n")],
}
INPUT_CHUNKS["service-node-absent"] = INPUT_CHUNKS["service-node"]


def ready_time(case):
    """The guest time at which the case's ready marker has been printed (a probe run)."""
    if case.name not in _ready_times:
        guest = Guest(case)
        if not guest.advance_until(lambda g: case.input_after in g.output, 1_000, limit_ns=NS_PER_SEC):
            raise AssertionError(f"{case.name}: no {case.input_after!r} within 1 s of guest time")
        _ready_times[case.name] = guest.now
    return _ready_times[case.name]


def input_schedule(case):
    """(guest ns, bytes) chunks that type the case's input once its receiver is ready."""
    if not case.input:
        return []
    chunks = INPUT_CHUNKS[case.name]
    if b"".join(data for _, data in chunks) != case.input:
        raise AssertionError(f"{case.name}: INPUT_CHUNKS do not add up to the case's input")
    when = ready_time(case) + 100_000
    schedule = []
    for gap, data in chunks:
        when += gap
        schedule.append((when, data))
    return schedule


# ---------------------------------------------------------------------- the restore worker
def restore_worker(job):
    """``job``: {"case": name, "until_ns": limit, "snapshots": [{"path": file, "input": [[ns, hex],
    ...]}, ...]}.

    For each snapshot: build the case's machine afresh, load the file, save again (the bytes
    must be the file's), feed the input still scheduled, run to the end or to ``until_ns`` of
    guest time (a restore that went astray may never end).  Returns one dict per snapshot:
    resave_equal, status (None if the limit came first), output (hex), fingerprint
    (:func:`state_fingerprint`), now_ns."""
    case = CASES_BY_NAME[job["case"]]
    results = []
    for entry in job["snapshots"]:
        with open(entry["path"], "rb") as f:
            stream = f.read()
        guest = Guest(case)
        guest.machine.load_state(stream)
        resave_equal = guest.machine.save_state(ram_pages="all") == stream
        guest.replace_input([(when, bytes.fromhex(data)) for when, data in entry["input"]])
        status = guest.run(until_ns=job["until_ns"])
        results.append({"resave_equal": resave_equal, "status": status, "output": guest.output.hex(),
                        "fingerprint": state_fingerprint(guest.machine), "now_ns": guest.now})
        guest.machine.close()
    return results


def result_path(job_path):
    return pathlib.Path(str(job_path) + ".result")


def serve_jobs(lines):
    """Run each job file named in ``lines``; its result (or the error) goes to ``JOB.result``."""
    for line in lines:
        job_path = line.strip()
        if not job_path:
            continue
        try:
            with open(job_path) as f:
                answer = {"results": restore_worker(json.load(f))}
        except Exception:
            answer = {"error": traceback.format_exc()}
        partial = pathlib.Path(job_path + ".partial")
        partial.write_text(json.dumps(answer))
        partial.rename(result_path(job_path))


if __name__ == "__main__":
    serve_jobs(sys.argv[1:] or sys.stdin)

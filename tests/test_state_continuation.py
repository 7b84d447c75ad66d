"""A saved machine continues exactly as the original would have.

In deterministic mode (icount shift 0) a guest's run is a function of its input timeline
alone, which turns the save helpers' promise into byte comparisons:

* save -> load -> save gives the same bytes, into a fresh machine, into the machine itself
  and into a machine that was running elsewhere in the same guest;
* a snapshot restored in a new process and run to the end prints exactly what the
  uninterrupted run printed after the save point, exits with the same status at the same
  guest time and ends in the same state (every device section and all of RAM), for every
  firmware guest at seeded random points and at points chosen because something delicate
  is in flight: an interrupt raised and not yet delivered (8259 and local APIC, also
  inside the interrupt shadow of sti), characters in the UART's RX FIFO, a PIT or APIC
  timer period half counted, a halted CPU, real, protected and long mode, and ring 3;
* the machine that was saved goes on unchanged (saving never perturbs the source).

The input-driven guests get their input from a clock timer at fixed guest times
(statehelpers.ScriptedInput); a restored run is given only the chunks scheduled after the
save point.  No chunk is ever held back on the host side (the feeder fails if the UART
does not take a whole chunk), so what has arrived is all in the saved guest state.
"""

import functools
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
from conftest import ROOT, firmware, run_emu
from firmware_cases import CASES, CASES_BY_NAME
from statehelpers import Guest, input_schedule, result_path, state_fingerprint

FAST_CASES = [case.name for case in CASES if not case.slow]
RANDOM_POINTS = 5
SOAK_RANDOM_POINTS = 40
WORKER = ROOT / "tests" / "statehelpers.py"
RESTORE_SLACK_NS = 10_000_000  # a restore that runs past twice the guest's run time (plus this) went astray
WORKER_TIMEOUT_S = 300


@dataclass(frozen=True)
class Reference:
    output: bytes
    status: int
    fingerprint: str
    end_ns: int


def uninterrupted_run(case, schedule):
    firmware(os.path.basename(case.image))
    guest = Guest(case, schedule)
    status = guest.run()
    assert case.output_matches(guest.output), f"{case.name}: unexpected output {guest.output!r}"
    assert status == case.exit_status, f"{case.name}: exit status {status}"
    return Reference(guest.output, status, state_fingerprint(guest.machine), guest.now)


@functools.cache
def reference(name):
    """The uninterrupted deterministic run of a case, with its usual input schedule."""
    case = CASES_BY_NAME[name]
    return uninterrupted_run(case, input_schedule(case))


def new_guest(name):
    case = CASES_BY_NAME[name]
    return Guest(case, input_schedule(case))


def load_into(target, source, stream):
    """Load ``source``'s saved state into ``target``; the host side (output so far, input not
    yet delivered) follows, as a restoring host would arrange."""
    target.machine.load_state(stream)
    target.capture.data[:] = source.output
    target.replace_input(source.pending_input())


def assert_ends_like_reference(guest, ref, what):
    """Run ``guest`` to the end: output, exit status, end time and final state must be the
    uninterrupted run's."""
    status = guest.run()
    assert guest.output == ref.output, f"{what}: output differs from the uninterrupted run"
    assert status == ref.status, f"{what}: exit status {status}, uninterrupted {ref.status}"
    assert guest.now == ref.end_ns, f"{what}: ended at {guest.now} ns, uninterrupted {ref.end_ns}"
    assert state_fingerprint(guest.machine) == ref.fingerprint, f"{what}: final state differs"


# ---------------------------------------------------------------------- save -> load -> save
@pytest.mark.parametrize("name", FAST_CASES)
def test_save_load_save_gives_identical_bytes(name):
    """At a quarter, half and three quarters of the run the stream re-saves to the same bytes
    after a load into a fresh machine, into a machine that has been running elsewhere in the
    same guest (a replica taking a checkpoint) and into the saved machine itself; saving
    twice gives the same bytes; and the machines then end like the uninterrupted run."""
    ref = reference(name)
    guest = new_guest(name)
    fresh = new_guest(name)
    elsewhere = new_guest(name)
    elsewhere.run(until_ns=ref.end_ns // 8)
    for point in (ref.end_ns * k // 4 for k in (1, 2, 3)):
        where = f"{name} at {point} ns"
        assert guest.run(until_ns=point) is None, f"{where}: the guest has already exited"
        saved = guest.machine.save_state(ram_pages="all")
        devices_only = guest.machine.save_state()
        assert guest.machine.save_state(ram_pages="all") == saved, f"{where}: saving twice gives different bytes"
        for target, kind in ((fresh, "a machine that never ran"), (elsewhere, "a machine that ran elsewhere"),
                             (guest, "the saved machine itself")):
            load_into(target, guest, saved)
            assert target.machine.save_state(ram_pages="all") == saved, f"{where}: {kind} re-saves differently"
            assert target.machine.save_state() == devices_only, f"{where}: {kind}: device state re-saves differently"
    assert_ends_like_reference(guest, ref, f"{name}: saved and reloaded in place")
    assert_ends_like_reference(elsewhere, ref, f"{name}: loaded over a machine that had run on")


def test_state_digest_sees_the_same_state_after_a_restore():
    """Machine.state_digest() agrees between a machine and its restored copy, and changes
    once the guest runs on."""
    guest = new_guest("pm32")
    assert guest.run(until_ns=reference("pm32").end_ns // 2) is None
    copy = new_guest("pm32")
    copy.machine.load_state(guest.machine.save_state(ram_pages="all"))
    assert copy.machine.state_digest() == guest.machine.state_digest()
    assert state_fingerprint(copy.machine) == state_fingerprint(guest.machine)
    before = guest.machine.state_digest()
    guest.run(until_ns=guest.now + 10_000)
    assert guest.machine.state_digest() != before


# ---------------------------------------------------------------------- conditions at save points
def halted(g):
    return g.machine.cpu.halted


def pic_pending(g):
    """An 8259 request is up and the CPU would take it: raised, not yet delivered."""
    return g.pic_request_pending() and g.machine.cpu.interrupts_enabled()


def lapic_pending(g):
    return g.lapic_request_pending() and g.machine.cpu.interrupts_enabled()


def in_pic_handler(g):
    return bool(g.pic.master.isr)


def rx_data(g):
    return len(g.uart.rx_fifo) > 0


def mode(name):
    return lambda g: g.cpu_mode() == name


def ring3(g):
    return g.cpl() == 3


def interrupt_shadow(g):
    return g.machine.cpu.interrupt_shadow()


def pit_half_counted(g):
    return g.pit_mid_count(0)


def lapic_timer_half_counted(g):
    lapic = g.lapic
    return lapic.timer.armed and lapic.initial_count // 4 <= lapic.current_count() <= 3 * lapic.initial_count // 4


def output_contains(marker):
    return lambda g: marker in g.output


def all_of(*predicates):
    return lambda g: all(p(g) for p in predicates)


def at_deadlines(slice_ns=2_000):
    """Advance in slices that also end at every timer deadline (right after a timer raised
    its interrupt, before the CPU takes it)."""
    return ("deadlines", slice_ns)


#: Per guest, in the order they occur: (label, or None for a walk to a marker without a save;
#: the condition; how to advance: a slice length in guest ns, or at_deadlines()).
CONDITION_POINTS = {
    "realmode": [
        ("real mode, halted, IRQ0 raised and not yet delivered", all_of(mode("real"), halted, pic_pending),
         at_deadlines()),
        ("real mode, in the IRQ0 handler", all_of(mode("real"), in_pic_handler), 2),
        ("real mode, halted, PIT period half counted", all_of(mode("real"), halted, pit_half_counted), 2_000),
    ],
    "pm32": [
        ("protected mode, halted, IRQ0 raised and not yet delivered", all_of(mode("protected32"), halted, pic_pending),
         at_deadlines()),
        ("protected mode, running, PIT period half counted",
         all_of(mode("protected32"), lambda g: not halted(g), pit_half_counted), 2_000),
        ("protected mode, ring 3", all_of(mode("protected32"), ring3), 1_000),
        ("protected mode, ring 3, IRQ0 raised and not yet delivered", all_of(ring3, pic_pending), at_deadlines()),
    ],
    "longmode": [
        ("long mode, halted, IRQ0 raised and not yet delivered", all_of(mode("long64"), halted, pic_pending),
         at_deadlines()),
        ("long mode, APIC timer half counted", all_of(mode("long64"), lapic_timer_half_counted), 2_000),
        ("long mode, APIC timer interrupt in the IRR, not yet delivered", all_of(mode("long64"), lapic_pending),
         at_deadlines()),
        (None, output_contains(b"PASS bp.rip_after_int3\r\n"), 2_000),
        ("long mode, ring 3", all_of(mode("long64"), ring3), 5),
    ],
    "echo": [
        ("halted, waiting for input", all_of(halted, output_contains(b"echo ready\r\n")), 1_000),
        ("RX FIFO full of a chunk, IRQ4 raised and not yet delivered", all_of(rx_data, pic_pending),
         at_deadlines(50_000)),
        ("RX FIFO partly read by the IRQ4 handler", all_of(rx_data, in_pic_handler), 2),
        ("interrupt shadow of sti;hlt", interrupt_shadow, 1),
        ("RX FIFO holds the last chunk", rx_data, at_deadlines(50_000)),
    ],
    "service": [
        ("RX FIFO full of a line, IRQ4 raised and not yet delivered", all_of(rx_data, pic_pending),
         at_deadlines(50_000)),
        ("RX FIFO partly read by the IRQ4 handler", all_of(rx_data, in_pic_handler), 2),
        ("interrupt shadow of sti;hlt", interrupt_shadow, 1),
        ("halted between lines", all_of(halted, output_contains(b"\r\n3 ")), 50_000),
        ("RX FIFO holds the TIME request", all_of(rx_data, output_contains(b"\r\n3 ")), at_deadlines(10_000_000)),
    ],
    "idle": [
        ("halted, IRQ0 raised and not yet delivered", all_of(halted, pic_pending), at_deadlines(1_000_000)),
        ("halted, PIT period half counted", all_of(halted, pit_half_counted), 100_000),
    ],
}


def advance(guest, condition, how):
    if isinstance(how, tuple):
        return guest.advance_until(condition, how[1], at_deadlines=True)
    return guest.advance_until(condition, how)


@dataclass
class SavePoint:
    label: str
    path: str
    output_before: int
    input_after: list
    now_ns: int


def save_point(guest, label, path):
    with open(path, "wb") as f:
        guest.machine.save_state(ram_pages="all", out=f)
    return SavePoint(label, str(path), len(guest.output), guest.pending_input(), guest.now)


def random_points(name, count):
    ref = reference(name)
    rng = random.Random(f"state-continuation/{name}")
    return sorted(rng.sample(range(1, ref.end_ns), min(count, ref.end_ns - 1)))


def collect_save_points(name, tmp_path, count):
    """Walk the guest to seeded random times, and (another walk) to its condition points; save
    at each; both walks must then end exactly like the uninterrupted run."""
    ref = reference(name)
    points = []
    guest = new_guest(name)
    for when in random_points(name, count):
        assert guest.run(until_ns=when) is None, f"{name}: exited before {when} ns"
        points.append(save_point(guest, f"random point {when} ns", tmp_path / f"{name}-r{len(points)}.snap"))
    assert_ends_like_reference(guest, ref, f"{name}: saved at random points")
    if name in CONDITION_POINTS:
        guest = new_guest(name)
        for label, condition, how in CONDITION_POINTS[name]:
            assert advance(guest, condition, how), f"{name}: the run never reached: {label or 'its marker'}"
            if label is not None:
                points.append(save_point(guest, label, tmp_path / f"{name}-c{len(points)}.snap"))
        assert_ends_like_reference(guest, ref, f"{name}: saved at condition points")
    return points


class RestoreWorkers:
    """New Python processes (statehelpers.py) that restore snapshots and run them to the end,
    while this process walks the next guest.  Jobs go to the least loaded worker."""

    def __init__(self, tmp_path, count=2):
        self.log = tmp_path / "workers.log"
        with open(self.log, "wb") as log:
            self.procs = [subprocess.Popen([sys.executable, str(WORKER)], stdin=subprocess.PIPE,
                                           stdout=log, stderr=log, cwd=ROOT) for _ in range(count)]
        self.queued = [0] * count

    def submit(self, job_path, snapshots):
        index = self.queued.index(min(self.queued))
        self.queued[index] += snapshots
        self.procs[index].stdin.write(f"{job_path}\n".encode())
        self.procs[index].stdin.flush()

    def finish(self, timeout=WORKER_TIMEOUT_S):
        """Wait for every job; a worker still busy after ``timeout`` s is killed (its guests'
        tests then find no result)."""
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def write_job(name, points, ref, path):
    """The restore worker's job for ``points`` of guest ``name`` (ref: its uninterrupted run)."""
    job = {"case": name, "until_ns": 2 * ref.end_ns + RESTORE_SLACK_NS,
           "snapshots": [{"path": p.path, "input": [[t, data.hex()] for t, data in p.input_after]} for p in points]}
    path.write_text(json.dumps(job))
    return path


def check_continuations(name, points, job_path, ref, log_path):
    """Every restored continuation printed the rest of ``ref``'s output and ended in its state."""
    answer_path = result_path(job_path)
    assert answer_path.exists(), (f"{name}: no result from the restore worker within {WORKER_TIMEOUT_S} s:\n"
                                  f"{log_path.read_text()[-4000:] if log_path.exists() else ''}")
    answer = json.loads(answer_path.read_text())
    assert "error" not in answer, f"{name}: the restore worker failed:\n{answer.get('error')}"
    results = answer["results"]
    assert len(results) == len(points)
    for point, result in zip(points, results, strict=True):
        where = f"{name}, {point.label} (saved at {point.now_ns} ns)"
        expected = ref.output[point.output_before:]
        output = bytes.fromhex(result["output"])
        assert result["resave_equal"], f"{where}: the loaded state re-saves to different bytes"
        assert output == expected, f"{where}: restored output differs\n got:    {output!r}\n wanted: {expected!r}"
        assert result["status"] == ref.status, f"{where}: exit status {result['status']}, uninterrupted {ref.status}"
        assert result["now_ns"] == ref.end_ns, f"{where}: ended at {result['now_ns']} ns, uninterrupted {ref.end_ns}"
        assert result["fingerprint"] == ref.fingerprint, f"{where}: final state differs from the uninterrupted run"


def walk_and_restore(names, tmp_path, count):
    """For each guest: (save points, job file) or the exception its walk raised (re-raised by
    that guest's test), once every restore has run; and the workers."""
    workers = RestoreWorkers(tmp_path)
    walked = {}
    try:
        for name in names:
            try:
                points = collect_save_points(name, tmp_path, count)
                job_path = write_job(name, points, reference(name), tmp_path / f"{name}-job.json")
                workers.submit(job_path, len(points))
                walked[name] = (points, job_path)
            except Exception as e:
                walked[name] = e
    finally:
        workers.finish()
    return walked, workers


def check_guest(name, walked, workers):
    entry = walked[name]
    if isinstance(entry, Exception):
        raise entry
    check_continuations(name, *entry, reference(name), workers.log)


@pytest.fixture(scope="module")
def restored(tmp_path_factory):
    return walk_and_restore(FAST_CASES, tmp_path_factory.mktemp("continuation"), RANDOM_POINTS)


@pytest.mark.parametrize("name", FAST_CASES)
def test_restored_in_new_process_continues_identically(name, restored):
    check_guest(name, *restored)


def test_interrupt_raised_in_the_sti_shadow_continues_identically(tmp_path):
    """echo: a chunk arrives exactly while the CPU sits between ``sti`` and ``hlt``, so IRQ4 is
    pending inside the interrupt shadow.  The CPU must run the ``hlt`` first and take the
    interrupt with the return address after it; a restore that lost the shadow would take it
    before the ``hlt``, return to it and sleep until the next chunk."""
    case = CASES_BY_NAME["echo"]
    schedule = input_schedule(case)
    probe = Guest(case, schedule)
    assert probe.advance_until(rx_data, 50_000, at_deadlines=True)
    assert probe.advance_until(all_of(interrupt_shadow, output_contains(b"hello\r\n")), 1)
    shadow_ns = probe.now
    assert not rx_data(probe) and probe.pending_input()[0][0] > shadow_ns
    schedule = [schedule[0], (shadow_ns, schedule[1][1]), *schedule[2:]]
    ref = uninterrupted_run(case, schedule)
    guest = Guest(case, schedule)
    assert guest.run(until_ns=shadow_ns) is None
    assert interrupt_shadow(guest) and rx_data(guest) and guest.pic_request_pending()
    point = save_point(guest, "IRQ4 raised inside the sti shadow", tmp_path / "shadow.snap")
    assert_ends_like_reference(guest, ref, "echo: saved inside the sti shadow")
    job_path = write_job("echo", [point], ref, tmp_path / "shadow-job.json")
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        subprocess.run([sys.executable, str(WORKER), str(job_path)], stdout=log, stderr=log, cwd=ROOT,
                       timeout=WORKER_TIMEOUT_S)
    check_continuations("echo", [point], job_path, ref, log_path)


def test_every_condition_guest_is_in_the_table():
    assert set(CONDITION_POINTS) <= set(FAST_CASES)
    assert {"realmode", "pm32", "longmode", "echo", "service", "idle"} <= set(CONDITION_POINTS)


# ---------------------------------------------------------------------- the command line
def test_cli_savevm_and_loadvm_continue_identically(tmp_path):
    """``emu run -icount -savevm-at MS FILE`` goes on unchanged; ``-loadvm FILE`` in another
    process prints the rest of the output and exits with the same status."""
    case = CASES_BY_NAME["pm32"]
    ref = reference("pm32")
    save_ms = 6  # the ring-3 phase, with PIT interrupts coming in
    guest = new_guest("pm32")
    assert guest.run(until_ns=save_ms * 1_000_000) is None
    before = len(guest.output)
    assert 0 < before < len(ref.output)
    image = firmware(os.path.basename(case.image))
    snapshot = tmp_path / "pm32.snap"
    saved = run_emu("-icount", "-no-reboot", "-serial", "stdio", "-savevm-at", str(save_ms), str(snapshot),
                    "-kernel", image)
    assert saved.stdout == ref.output and saved.returncode == ref.status, saved.stderr
    restored = run_emu("-icount", "-no-reboot", "-serial", "stdio", "-loadvm", str(snapshot), "-kernel", image)
    assert restored.stdout == ref.output[before:], restored.stderr
    assert restored.returncode == ref.status, restored.stderr


# ---------------------------------------------------------------------- soak
@pytest.mark.soak
@pytest.mark.skipif(not os.environ.get("EMU_SOAK"), reason="soak campaign: make soak")
@pytest.mark.parametrize("name", [case.name for case in CASES])
def test_soak_restored_continues_identically(name, tmp_path):
    check_guest(name, *walk_and_restore([name], tmp_path, SOAK_RANDOM_POINTS))

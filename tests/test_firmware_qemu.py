"""Differential reference: every guest in firmware_cases.CASES must pass on QEMU itself.

If a guest passes here and fails on our emulator, the emulator is wrong; if it fails
here, the guest is.  The QEMU runs go in parallel (most guests take a fraction of a
second, idle-default waits two virtual seconds).  Skipped when qemu-system-x86_64 is not
installed (`apt-get install qemu-system-x86`, or `make deps`).
"""

import pathlib
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import ROOT, firmware, qemu_binary
from firmware_cases import CASES, CASES_BY_NAME, compute_result, qemu_command, run_guest


@pytest.fixture(scope="module")
def qemu_runs():
    qemu = qemu_binary()
    if qemu is None:
        pytest.skip("qemu-system-x86_64 is not installed: no QEMU reference run "
                    "(install it with `apt-get install qemu-system-x86` or `make deps`)")
    for case in CASES:
        firmware(pathlib.Path(case.image).name)
    longest_first = sorted(CASES, key=lambda case: not case.slow)
    with ThreadPoolExecutor(max_workers=4) as pool:
        runs = pool.map(lambda case: run_guest(qemu_command(case, ROOT, qemu), case), longest_first)
        return {case.name: run for case, run in zip(longest_first, runs, strict=True)}


@pytest.mark.parametrize("name", [case.name for case in CASES])
def test_guest_on_qemu(name, qemu_runs):
    case = CASES_BY_NAME[name]
    run = qemu_runs[name]
    assert not run.timed_out, f"{name}: no exit within {case.timeout} s; output so far: {run.output!r}"
    wanted = case.expect if case.expect is not None else case.expect_regex
    assert case.output_matches(run.output), (
        f"{name}: output differs\n got:    {run.output!r}\n wanted: {wanted!r}\n"
        f" qemu stderr: {run.stderr!r}")
    assert run.status == case.exit_status, f"{name}: exit status {run.status}, wanted {case.exit_status}"


def test_case_table_is_consistent():
    names = [case.name for case in CASES]
    assert len(names) == len(set(names))
    for case in CASES:
        assert (case.expect is None) != (case.expect_regex is None), case.name
        assert case.kind in ("kernel", "bios"), case.name
        assert not case.input_after or case.input, case.name


def test_compute_reference_model_matches_table():
    assert CASES_BY_NAME["compute"].expect == b"compute n=100000 result=%08x\r\n" % compute_result(100000)


"""Every firmware guest on our emulator, in real time and in deterministic mode.

The same table (firmware_cases.CASES) is checked on QEMU by test_firmware_qemu.py, so the
two together are the differential test: the expected bytes are what QEMU produces.
"""

import pathlib
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import ROOT, firmware
from firmware_cases import CASES, CASES_BY_NAME, emu_command, run_guest

FAST_CASES = [case for case in CASES if not case.slow]
MODES = {"realtime": (), "icount": ("-icount", "shift=0")}


@pytest.fixture(scope="module")
def emu_runs():
    for case in CASES:
        firmware(pathlib.Path(case.image).name)
    jobs = [(case, mode) for case in FAST_CASES for mode in MODES]
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = pool.map(lambda job: run_guest(emu_command(job[0], ROOT, MODES[job[1]]), job[0], cwd=ROOT), jobs)
        return {(case.name, mode): run for (case, mode), run in zip(jobs, runs, strict=True)}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", [case.name for case in FAST_CASES])
def test_guest_on_emu(name, mode, emu_runs):
    case = CASES_BY_NAME[name]
    run = emu_runs[(name, mode)]
    assert not run.timed_out, f"{name}/{mode}: no exit within {case.timeout} s; output: {run.output!r}"
    wanted = case.expect if case.expect is not None else case.expect_regex
    assert case.output_matches(run.output), (
        f"{name}/{mode}: output differs\n got:    {run.output!r}\n wanted: {wanted!r}\n stderr: {run.stderr!r}")
    assert run.status == case.exit_status, f"{name}/{mode}: exit status {run.status}: {run.stderr!r}"


"""The single-step and APIC guests on the stock unicorn wheel, the fallback engine.

Without our engine build the machine relies on hooks (a block hook, the SYSCALL hook), and
two bugs lived only there: an emu_stop from an MMIO write callback left RIP on the store,
so a self IPI written to the APIC's ICR was sent again on every return from its handler;
and the host's SYSCALL let the engine's single-step trap for the TF from before SFMASK reach
the kernel.  firmware_cases.CASES runs both guests on QEMU and on our engine build.
"""

import dataclasses
import importlib.util
import pathlib
import re

import pytest
from conftest import ROOT, firmware
from firmware_cases import APICIPI_CHECKS, CASES_BY_NAME, emu_command, run_guest


def _stock_library_dir():
    spec = importlib.util.find_spec("unicorn")
    return pathlib.Path(spec.submodule_search_locations[0]) / "lib"


def _stock_expectation(case):
    """What case prints on the stock engine: apicipi's IA32_APIC_BASE checks fail there (its
    RDMSR reads 0 and no hook sees WRMSR: engine patch 0014), the rest is the same."""
    if case.name != "apicipi":
        return case
    msr = ["msr.reads_base_enable_bsp", "msr.write_back_keeps"]  # msr.reads_high_zero: 0 either way
    lines = [re.escape(f"PASS {name}\r\n".encode()) if name not in msr
             else re.escape(f"FAIL {name} ".encode()) + rb"[^\r]*\r\n" for name in APICIPI_CHECKS]
    regex = re.escape(b"apicipi: local APIC self IPIs\r\n") + b"".join(lines) + b"FAILED %d\r\n" % len(msr)
    return dataclasses.replace(case, expect=None, expect_regex=regex, exit_status=3)


@pytest.mark.parametrize("name", ["stepping", "apicipi"])
def test_guest_on_the_stock_engine(name, monkeypatch):
    case = _stock_expectation(CASES_BY_NAME[name])
    firmware(pathlib.Path(case.image).name)
    stock = _stock_library_dir()
    if not (stock / "libunicorn.so.2").exists():
        pytest.skip(f"no stock libunicorn in {stock}")
    monkeypatch.setenv("LIBUNICORN_PATH", str(stock))
    run = run_guest(emu_command(case, ROOT), case, cwd=ROOT)
    assert b"running on the stock unicorn wheel" in run.stderr, run.stderr
    assert not run.timed_out and case.output_matches(run.output), (run.output, run.stderr)
    assert run.status == case.exit_status

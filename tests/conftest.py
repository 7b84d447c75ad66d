"""Shared helpers: paths, running ``emu`` as a real process, building machines in-process."""

import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIRMWARE = ROOT / "firmware" / "build"


def firmware(name):
    path = FIRMWARE / name
    if not path.exists():
        pytest.fail(f"{path} is missing: build it with `make firmware`")
    return str(path)


def run_emu(*args, input=None, timeout=60):
    """Run ``python -m emu run ARGS`` as a separate process; returns CompletedProcess (bytes)."""
    return subprocess.run([sys.executable, "-m", "emu", "run", *args], input=input, capture_output=True,
                          timeout=timeout, cwd=ROOT)


def engine_patched():
    """Whether our own libunicorn build (engine/) is loaded, not the stock wheel."""
    from emu.cpu.engine import EngineControls  # first: importing emu selects the library
    from unicorn import UC_ARCH_X86, UC_MODE_64, Uc
    return EngineControls(Uc(UC_ARCH_X86, UC_MODE_64)).patched


requires_patched_engine = pytest.mark.skipif(not engine_patched(), reason="needs the patched engine (make setup "
                                             "with cmake and a C compiler); the stock unicorn wheel is loaded")


def qemu_binary():
    return shutil.which("qemu-system-x86_64")


@pytest.fixture(scope="session")
def debian_linux():
    """(bzImage, initramfs) of Debian's kernel and busybox (`make linux`, cached in ~/.cache)."""
    from linux import build
    try:
        return build.build(log=lambda m: None)
    except build.BuildError as e:
        pytest.skip(f"cannot fetch Debian's kernel and busybox: {e}")

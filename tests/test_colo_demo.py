"""``emu colo demo`` end to end: the whole deployment in processes, a primary SIGKILLed
mid-run, and the client's verdict that every request was answered exactly once."""

import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT, firmware, requires_patched_engine
from linuxguest import network_namespaces_available


def _demo(tmp_path, *args, timeout=60):
    firmware("service.elf")
    return subprocess.run([sys.executable, "-m", "emu", "colo", "demo", "--records", str(tmp_path), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _processes_mentioning(text):
    """Live processes whose command line contains ``text``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(cmdline)
    return found


@pytest.mark.parametrize("mode", ["compare", "passive"])
def test_demo_fails_over_without_losing_or_repeating_a_request(tmp_path, mode):
    r = _demo(tmp_path, "--requests", "60", "--kill-after", "20", "--failovers", "1", "--no-live", "--mode", mode)
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    assert re.search(r"requests +60 of 60 sent, 60 answered correctly, lost 0, duplicated 0", out), out
    assert re.search(r"served by +the primary for requests 1-20, then the former secondary \(vm-b, alone, "
                     r"epoch \d+\) for requests 21-60", out), out
    assert re.search(r"SIGKILL primary vm-a \(pid \d+\) after 20 requests", out), out
    assert "result       OK" in out, out
    assert re.search(r"checkpoints +[1-9]\d* \(ok [1-9]", out), out
    # the logs and per-checkpoint records are where --records said, and nothing is left running
    for name in ("arbiter.log", "proxy.log", "primary.log", "secondary.log", "primary.csv"):
        assert (tmp_path / name).exists(), name
    assert "takeover by secondary vm-b" in (tmp_path / "proxy.log").read_text()
    assert _processes_mentioning(str(tmp_path / "secondary.csv")) == []


@pytest.mark.parametrize("mode", ["compare", "passive"])
def test_the_default_demo_fails_over_twice_with_reprotection_in_between(tmp_path, mode):
    """make demo: two primaries killed; after the first, a new secondary vm-c and the survivor
    migrating into it, so that the second kill is survived too."""
    r = _demo(tmp_path, "--requests", "90", "--no-live", "--mode", mode)
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    assert re.search(r"requests +90 of 90 sent, 90 answered correctly, lost 0, duplicated 0", out), out
    assert re.search(r"served by +the primary for requests 1-30, then vm-b \(re-protected\) for requests 31-60, "
                     r"then the former secondary \(vm-c, alone, epoch \d+\) for requests 61-90", out), out
    assert re.search(r"re-protected vm-b took a new secondary vm-c, protected again [\d.]+ s after the failover", out)
    assert re.search(r"SIGKILL primary vm-a \(pid \d+\) after 30 requests", out), out
    assert re.search(r"SIGKILL primary vm-b \(pid \d+\) after 60 requests", out), out
    assert "is the primary again" in (tmp_path / "proxy.log").read_text()
    assert _processes_mentioning(str(tmp_path / "secondary-vm-c.csv")) == []


@pytest.mark.parametrize("args,message", [
    (["--requests", "10", "--kill-after", "10"], "--kill-after must be from 0 to 9"),
    (["--failovers", "0"], "--failovers must be at least 1"),
    (["--reprotect"], "unrecognized arguments: --reprotect"),  # not listed: it does not exist yet
    (["--mode", "active"], "invalid choice"),
])
def test_demo_refuses_bad_options(tmp_path, args, message):
    r = _demo(tmp_path, *args)
    assert r.returncode == 2
    assert message in r.stderr
    assert not (tmp_path / "arbiter.log").exists()  # nothing was started


@requires_patched_engine
def test_linux_demo_serves_downloads_and_uploads_across_the_kill(tmp_path, debian_linux):
    """The networked demo: Debian's Linux serving HTTP with an ext4 disk; every download
    checked, every upload acknowledged once and found on the survivor's disk."""
    reason = network_namespaces_available()
    if reason:
        pytest.skip(reason)
    r = _demo(tmp_path, "--guest", "linux", "--no-live", "--seconds", "8", "--kill-after", "4", timeout=400)
    out = r.stdout
    assert r.returncode == 0, out + r.stderr + (tmp_path / "proxy.log").read_text()
    downloads = re.search(r"downloads +(\d+) files of 8 MB", out)
    uploads = re.search(r"uploads +(\d+) acknowledged, lost 0, duplicated 0", out)
    assert downloads and int(downloads[1]) > 0, out
    assert uploads and int(uploads[1]) > 0, out
    assert re.search(rf"disk +{uploads[1]} uploads on the survivor's disk, each as acknowledged", out), out
    assert re.search(r"served by +secondary vm-b alone", out), out
    assert re.search(r"SIGKILL primary vm-a \(pid \d+\) in the middle of the traffic", out), out
    assert "result       OK" in out, out
    assert "did not stop" not in r.stderr, r.stderr  # every process ended on SIGTERM
    assert _processes_mentioning(str(tmp_path / "secondary.csv")) == []

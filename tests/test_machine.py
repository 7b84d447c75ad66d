"""The run loop and buses as a guest sees them: unclaimed ports, traces, host input."""

import io

from guestasm import assemble, bare_machine, entry

UNASSIGNED = r"""
start:
    mov dx, 0x2e                   # a Super-I/O index port nobody claims
    in al, dx
    mov [0x200000], al
    mov al, 0x55
    out dx, al
    in ax, dx
    mov [0x200002], ax
    mov al, 0
    out 0xf4, al
"""


def test_unclaimed_ports_read_all_ones_and_are_counted():
    code, _ = assemble(UNASSIGNED, 0x100000)
    for traced in (False, True):
        m = bare_machine(trace=["unassigned"] if traced else [])
        m.trace_file = io.StringIO()
        m.ram.write(0x100000, code)
        m.cpu.enter(entry("protected32", 0x100000))
        assert m.run(until_ns=10**9) == 1
        assert m.ram.read(0x200000, 1) == b"\xff"
        assert m.ram.read(0x200002, 2) == b"\xff\xff"
        counts = m.unassigned_counts()
        assert counts[0x2E] == 3 and counts[0x2F] == 1  # the 16-bit read touches 0x2e and 0x2f
        log = m.trace_file.getvalue()
        if traced:
            assert "port 0x002e" in log and "no device" in log
        else:
            assert log == ""


def test_guest_time_flows_after_a_stop_and_cont_inside_the_loop():
    """A checkpoint stops and resumes the guest from a job between slices: guest time must
    go on from there (it once stayed frozen until the loop itself restarted)."""
    import time

    from conftest import firmware
    from machines import pc

    m = pc.build(kernel=firmware("idle.elf"), serial=["null"], no_reboot=True)
    started = time.monotonic()
    calls = []

    def checkpoint_like():
        calls.append(m.clock.now())
        if len(calls) == 1:
            m.pause()
            m.resume()
        if time.monotonic() - started > 5:
            m.request_exit(99, "guest time did not advance")
    m.background_jobs.append(checkpoint_like)
    assert m.run(until_ns=30_000_000) is None
    assert m.clock.now() >= 30_000_000

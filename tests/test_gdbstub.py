"""The GDB stub (-gdb / -s / -S) driven by the real gdb in batch mode, and by hand over a socket.

The gdb session against the gdbtarget firmware runs on QEMU too: gdb must print the same
thing for both.  The Linux test breaks in the Debian kernel at an address from its own
/proc/kallsyms (Debian's kernel package ships no real System.map)."""

import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest
from conftest import ROOT, firmware, qemu_binary
from emuproc import Qmp, free_port

GDBTARGET = firmware("gdbtarget.elf")
QEMU_ARGS = ["-machine", "pc", "-accel", "tcg", "-nodefaults", "-display", "none", "-no-reboot",
             "-serial", "stdio", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]

pytestmark = pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb is not installed")


def symbols(elf):
    out = subprocess.run(["nm", str(elf)], capture_output=True, text=True, check=True).stdout
    rows = (line.split() for line in out.splitlines() if line.count(" ") == 2)
    return {name: int(addr, 16) for addr, _, name in rows}


def listening(port):
    """Whether a socket listens on ``port`` (read from /proc: a probe that connected would be a
    debugger arriving, and the stub stops the guest for it, as QEMU's)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = [line.split() for line in f.readlines()[1:]]
        except OSError:
            continue
        if any(row[1].endswith(f":{port:04X}") and row[3] == "0A" for row in rows):
            return True
    return False


def start(emulator, port, *args, kernel=GDBTARGET):
    """The emulator (``emu`` or ``qemu``) running ``kernel`` with a GDB stub on ``port``."""
    if emulator == "qemu":
        if qemu_binary() is None:
            pytest.skip("qemu-system-x86_64 is not installed")
        cmd = [qemu_binary(), *QEMU_ARGS, "-kernel", str(kernel), "-gdb", f"tcp::{port}", *args]
    else:
        cmd = [sys.executable, "-m", "emu", "run", "-kernel", str(kernel), "-no-reboot", "-serial", "stdio",
               "-gdb", f"tcp::{port}", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while not listening(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{emulator} did not listen on {port}: {proc.stderr.read().decode()}")
        time.sleep(0.05)
    return proc


def gdb_command(port, script, elf=GDBTARGET):
    lines = ["set architecture i386:x86-64", f"target remote :{port}"] + script
    cmd = ["gdb", "-batch", "-nx", "-q"]
    for line in lines:
        cmd += ["-ex", line]
    return cmd + ([str(elf)] if elf else [])


def run_gdb(port, script, elf=GDBTARGET, timeout=30):
    try:
        done = subprocess.run(gdb_command(port, script, elf), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        printed = b"".join(x if isinstance(x, bytes) else x.encode() for x in (e.stdout, e.stderr) if x)
        raise AssertionError(f"gdb did not finish in {timeout} s; it printed:\n{printed.decode()}") from None
    return done.stdout + done.stderr


def finish(proc, timeout=20):
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, err


# ---------------------------------------------------------------------------- gdb against the firmware
@pytest.mark.parametrize("emulator", ["emu", "qemu"])
def test_gdb_session_breakpoint_step_memory_watchpoint_monitor_detach(emulator):
    """Break at a symbol, read registers and a variable, step, write memory and see the
    guest's output change, a write watchpoint (old and new value), a step into an
    exception handler, ``monitor``, then detach: the guest runs to its end.  gdb prints
    the same on QEMU."""
    sym = symbols(GDBTARGET)
    port = free_port()
    proc = start(emulator, port, "-S")
    out = run_gdb(port, [
        "break *bump", "continue",
        "info registers rip cs ss eflags cr0",
        "print (int)counter",
        "stepi", "stepi", "print/x $pc",
        f"set {{int}}{sym['counter']:#x} = 0x200",
        "print (int)counter",
        'set {char[5]}&word = "gdb!"',
        "delete 1",
        f"watch *(int *){sym['counter']:#x}",
        "continue", "print/x $pc",
        "continue",
        "delete", "break *trap_here", "continue", "stepi", "print/x $pc",
        "monitor info status",
        "delete", "detach",
    ])
    status, guest_out, _ = finish(proc)
    bump = sym["bump"]
    assert f"Breakpoint 1, {bump:#018x} in bump ()" in out, out
    assert re.search(rf"rip\s+{bump:#x}\s+{bump:#x} <bump>", out), out
    assert re.search(r"cs\s+0x8\s+8\n", out) and re.search(r"ss\s+0x10\s+16\n", out), out
    assert re.search(r"cr0\s+0x11\s+\[ ET PE \]", out), out
    assert "$1 = 0\n" in out  # counter before the first bump
    assert f"$2 = {bump + 6:#x}\n" in out  # two instructions: mov counter, %eax (5 bytes); inc %eax
    assert "$3 = 512\n" in out
    # the step already loaded counter (0): the store writes 1 over the 0x200 gdb wrote
    assert "Hardware watchpoint 2: *(int *)" in out
    assert "Old value = 512\nNew value = 1\n" in out, out
    assert f"$4 = {bump + 11:#x}\n" in out  # stopped after the store, on the ret
    assert "Old value = 1\nNew value = 2\n" in out
    # a step over ud2 ends on the #UD handler's first instruction, not yet executed
    assert f"Breakpoint 3, {sym['trap_here']:#018x} in trap_here ()" in out, out
    assert f"$5 = {sym['ud_handler']:#x}\n" in out, out
    assert "VM status: paused (debug)" in out
    assert "detached]" in out
    assert guest_out == b"counter=00000003 word=gdb!\r\n"
    assert status == 1


def test_gdb_interrupt_register_write_and_exit(tmp_path):
    """Ctrl-C stops a busy guest (SIGINT, as gdb prints it); writing ECX ends its loop
    early; continuing, gdb hears that the guest exited with its isa-debug-exit status."""
    port, qmp_path = free_port(), tmp_path / "qmp.sock"
    proc = start("emu", port, "-append", "n=4000000000", "-S", "-qmp", f"unix:{qmp_path},server,nowait")
    qmp = Qmp(qmp_path)
    gdb = subprocess.Popen(gdb_command(port, ["continue", "print/x $pc", "set var $rcx = 1", "continue"]),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 20
    while qmp("query-status")["status"] != "running":  # until gdb's continue started the guest
        assert time.monotonic() < deadline and gdb.poll() is None, gdb.stdout.read()
        time.sleep(0.05)
    qmp.close()
    time.sleep(0.2)  # in its loop
    gdb.send_signal(signal.SIGINT)
    out, _ = gdb.communicate(timeout=30)
    status, guest_out, _ = finish(proc)
    assert "Program received signal SIGINT, Interrupt." in out, out
    loop = symbols(GDBTARGET)["main"]
    pc = int(re.search(r"\$1 = (0x[0-9a-f]+)", out).group(1), 16)
    assert loop <= pc < symbols(GDBTARGET)["bump"] + 12
    assert "[Inferior 1 (Remote target) exited with code 01]" in out, out
    counter = int(re.fullmatch(rb"counter=([0-9a-f]{8}) word=emu!\r\n", guest_out).group(1), 16)
    assert 0 < counter < 4000000000
    assert status == 1


def test_guest_runs_at_full_speed_with_nobody_attached():
    """-gdb given, no client: no hook exists, the guest is not held back."""
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "emu", "run", "-kernel", firmware("compute.elf"), "-append",
                             "n=100000000", "-no-reboot", "-serial", "stdio", "-gdb", f"tcp::{free_port()}"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    status, out, _ = finish(proc)
    elapsed = time.monotonic() - t0
    assert out.startswith(b"compute n=100000000 result=")
    assert status == 1
    # 1.2 G instructions: under a second here; a Python hook at every instruction would take minutes
    assert elapsed < 10, elapsed


# ---------------------------------------------------------------------------- the protocol by hand
class RawClient:
    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""

    def send_raw(self, data):
        self.sock.sendall(data)

    def read(self, n=1):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def packet(self):
        """The next packet's payload (acks before it are skipped; this client acks it)."""
        while True:
            start = self.buf.find(b"$")
            end = self.buf.find(b"#", start)
            if start >= 0 and end >= 0 and len(self.buf) >= end + 3:
                payload = self.buf[start + 1:end]
                assert int(self.buf[end + 1:end + 3], 16) == sum(payload) & 0xFF
                self.buf = self.buf[end + 3:]
                self.sock.sendall(b"+")
                return payload
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buf += chunk

    def command(self, payload):
        self.send_raw(b"$%s#%02x" % (payload, sum(payload) & 0xFF))
        assert self.read() == b"+"
        return self.packet()

    def monitor(self, line):
        """qRcmd: the O packets' text up to the final OK."""
        reply, text = self.command(b"qRcmd," + line.hex().encode()), b""
        while reply != b"OK":
            assert reply[:1] == b"O", reply
            text += bytes.fromhex(reply[1:].decode())
            reply = self.packet()
        return text

    def close(self):
        self.sock.close()


def test_raw_packets_bad_input_disconnect_and_second_client():
    """A bad checksum is NAKed, an unknown packet gets the empty reply, malformed arguments
    E01; qSupported, the target description, qRcmd.  A client that vanishes takes its
    breakpoints along; the next one is accepted, finds the guest stopped, and ``k`` ends the
    emulator with status 0 as QEMU's stub does."""
    sym = symbols(GDBTARGET)
    port = free_port()
    proc = start("emu", port, "-S")
    first = RawClient(port)
    first.send_raw(b"$g#00")
    assert first.read() == b"-"
    assert first.command(b"vMustReplyEmpty") == b""
    assert first.command(b"qNoSuchThing") == b""
    assert first.command(b"Z9,100000,1") == b""
    assert first.command(b"m100000,zz") == b"E01"
    assert first.command(b"Z0,zz") == b"E01"
    assert first.command(b"P10") == b"E01"
    assert first.command(b"p99") == b"E14"  # no register 0x99 (QEMU's reply)
    supported = first.command(b"qSupported:multiprocess+;swbreak+;hwbreak+").split(b";")
    assert {b"PacketSize=1000", b"qXfer:features:read+", b"swbreak+", b"hwbreak+"} <= set(supported)
    assert first.command(b"?") == b"T05thread:01;"
    assert first.command(b"qAttached") == b"1"
    assert first.command(b"qC") == b"QC1"
    assert first.command(b"qfThreadInfo") == b"m1"
    assert first.command(b"qsThreadInfo") == b"l"
    assert first.command(b"Hg0") == b"OK"
    xml, offset = b"", 0
    while True:
        chunk = first.command(b"qXfer:features:read:target.xml:%x,200" % offset)
        xml += chunk[1:]
        offset += len(chunk) - 1
        if chunk[:1] == b"l":
            break
    root = ET.fromstring(xml)
    names = [reg.get("name") for reg in root.iter("reg")]
    assert names[16:33] == ["rip", "eflags", "cs", "ss", "ds", "es", "fs", "gs", "fs_base", "gs_base", "k_gs_base",
                            "cr0", "cr2", "cr3", "cr4", "cr8", "efer"]
    assert len(names) == 66 and names[-1] == "mxcsr"
    assert first.command(b"p1b") == (0x11).to_bytes(8, "little").hex().encode()  # cr0: PE | ET
    registers = first.command(b"g")
    assert len(registers) == 2 * 608
    assert first.command(b"G" + registers) == b"OK"  # all written back as they were
    assert first.command(b"g") == registers
    assert first.command(b"P0=efbeadde00000000") == b"OK"
    assert first.command(b"p0") == b"efbeadde00000000"
    assert first.command(b"P0=" + registers[:16]) == b"OK"
    assert first.command(b"G" + registers[:-2]) == b"E01"
    # a selector written loads the segment from the GDT, as mov would
    assert first.command(b"P16=00000000") == b"OK" and first.command(b"p16") == b"00000000"
    assert first.command(b"P16=10000000") == b"OK" and first.command(b"p16") == b"10000000"
    assert first.command(b"P16=f8ff0000") == b"E14"  # past the GDT's limit: #GP for mov, an error here
    assert re.search(rb"\nFS =0010 0+ ffffffff 00c.9300 DPL=0 DS", first.monitor(b"info registers"))
    assert first.command(b"m%x,4" % sym["counter"]) == b"00000000"
    # X: binary data, with gdb's escapes for # $ } * (the byte after } is xored with 0x20)
    assert first.command(b"X%x,4:}\x03}\x04}]}\x0a" % sym["word"]) == b"OK"
    assert first.command(b"m%x,4" % sym["word"]) == b"#$}*".hex().encode()
    assert first.command(b"M%x,4:656d7521" % sym["word"]) == b"OK"  # "emu!" again
    assert first.command(b"M%x,4:6d75" % sym["word"]) == b"E01"  # fewer bytes than it says
    assert first.monitor(b"info status") == b"VM status: paused (prelaunch)\r\n"
    assert first.command(b"Z0,%x,1" % sym["bump"]) == b"OK"
    assert first.command(b"vCont;c") == b"T05swbreak:;thread:01;"
    first.close()  # abruptly: no detach

    second = RawClient(port)
    assert second.command(b"?") == b"T05thread:01;"
    assert second.command(b"p10") == sym["bump"].to_bytes(8, "little").hex().encode()  # still at the breakpoint
    assert second.command(b"m%x,4" % sym["counter"]) == b"00000000"
    # the first client's breakpoint at bump is gone: the next stops are the second's own
    assert second.command(b"Z1,%x,1" % sym["trap_here"]) == b"OK"
    assert second.command(b"vCont;c") == b"T05thread:01;"  # no hwbreak: this client did not offer it
    assert second.command(b"p10") == sym["trap_here"].to_bytes(8, "little").hex().encode()
    assert second.command(b"z1,%x,1" % sym["trap_here"]) == b"OK"
    assert second.command(b"Z3,%x,4" % sym["word"]) == b"OK"  # read by puts when the guest prints it
    assert second.command(b"c") == b"T05thread:01;rwatch:%016x;" % sym["word"]  # as QEMU words it
    assert second.command(b"z3,%x,4" % sym["word"]) == b"OK"
    assert second.command(b"m%x,4" % sym["counter"]) == b"03000000"
    second.send_raw(b"$k#6b")
    status, out, err = finish(proc)
    second.close()
    assert status == 0
    assert b"Terminated via GDBstub" in err
    assert out == b"counter=00000003 word="  # stopped where puts read the word; killed there


def test_gdb_device_syntax():
    """QEMU's -gdb forms; bad ones are named with the reason."""
    from frontend.gdbstub import parse_gdb_device

    from emu.errors import ConfigError

    assert parse_gdb_device("tcp::1234") == ("127.0.0.1", 1234)
    assert parse_gdb_device("tcp:0.0.0.0:5000,server,nowait") == ("0.0.0.0", 5000)
    assert parse_gdb_device("tcp:[::1]:5000") == ("::1", 5000)
    assert parse_gdb_device("none") is None
    for spec, message in [("udp::1", "only TCP is supported"), ("tcp:1", "expected tcp:[HOST]:PORT"),
                          ("tcp::99999", "out of range"), ("tcp::x", "bad port"), ("tcp::1,wait=on", "wait")]:
        with pytest.raises(ConfigError, match=re.escape(f"-gdb {spec!r}: ") + ".*" + re.escape(message)):
            parse_gdb_device(spec)


# ---------------------------------------------------------------------------- gdb against Linux
def test_gdb_breaks_in_the_linux_kernel(debian_linux):
    """A breakpoint at a system call's kernel entry (a virtual address through the kernel's
    page tables), a step inside the kernel, kernel variables read by address; after the
    detach the guest's shell still answers."""
    from linuxguest import LinuxGuest

    kernel, initrd = debian_linux
    port = free_port()
    # deterministic time: a loaded host must not flood the guest with timer ticks (in real
    # time, translating the kernel anew after a breakpoint's flush costs guest time too)
    guest = LinuxGuest(kernel, initrd, "-icount", "shift=0", "-gdb", f"tcp::{port}")
    try:
        guest.boot()
        wanted = ("__x64_sys_write", "linux_banner", "jiffies")
        table = guest.run(f"grep -E ' ({'|'.join(wanted)})$' /proc/kallsyms")
        sym = {name: int(addr, 16) for addr, name in re.findall(r"^([0-9a-f]{16}) [TtDdBb] (\w+)\r?$", table, re.M)}
        assert set(sym) == set(wanted) and all(addr >> 63 for addr in sym.values()), table
        # the shell writes in a loop (builtins and a no-fork applet: no process is created), so
        # the breakpoint is hit as soon as gdb lets the guest run
        guest.type("echo loop-$((1+1)); while :; do echo tick > /dev/null; usleep 20000; done")
        guest.expect("loop-2", 30)
        try:
            out = run_gdb(port, [
                f"break *{sym['__x64_sys_write']:#x}", "continue", "print/x $pc",
                "stepi", "print/x $pc",
                f"x/s {sym['linux_banner']:#x}",
                f"print *(unsigned long *){sym['jiffies']:#x} > 0",
                "print $cs", "print $efer", "print $cr0",
                "delete", "detach",
            ], elf=None)
        except AssertionError as e:
            try:
                guest.expect("no such output", 1)
            except AssertionError as console:
                raise AssertionError(f"{e}\n{console}") from None
        entry = sym["__x64_sys_write"]
        assert f"Breakpoint 1, {entry:#018x} in ?? ()" in out, out
        assert f"$1 = {entry:#x}\n" in out
        after_step = int(re.search(r"\$2 = (0x[0-9a-f]+)", out).group(1), 16)
        assert entry < after_step <= entry + 15, out
        assert re.search(rf"{sym['linux_banner']:#x}:\s+\"Linux version 6\.", out), out
        assert "$3 = 1\n" in out  # jiffies counts
        assert "$4 = 16\n" in out  # __KERNEL_CS
        assert re.search(r"\$5 = \[ [^\]]*LMA[^\]]* \]", out), out
        assert re.search(r"\$6 = \[ PG [^\]]*PE \]", out), out
        assert "detached]" in out
        guest.proc.stdin.write(b"\x03")  # Ctrl-C on the console ends the loop
        guest.proc.stdin.flush()
        guest.expect("# ", 30, len(guest.text))
        assert guest.run("echo still-$((40+2))").startswith("still-42")
    finally:
        guest.close()


def test_cli_gdb_options():
    """-s is -gdb tcp::1234 (so it may not be given with another -gdb); -gdb none is no stub."""
    done = subprocess.run([sys.executable, "-m", "emu", "run", "-kernel", str(GDBTARGET), "-s", "-gdb",
                           f"tcp::{free_port()}"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "only one GDB stub" in done.stderr
    done = subprocess.run([sys.executable, "-m", "emu", "run", "-kernel", str(GDBTARGET), "-no-reboot", "-gdb", "none"],
                          cwd=ROOT, capture_output=True, timeout=30)
    assert (done.returncode, done.stdout) == (1, b"counter=00000003 word=emu!\r\n")


# ---------------------------------------------------------------------------- the CPU's debug hooks
@pytest.mark.parametrize("icount", [False, True], ids=["realtime", "icount"])
def test_cpu_breakpoint_watchpoint_and_step_stop_points(icount):
    """Where each debug stop leaves the CPU: a breakpoint before its instruction; a write
    watchpoint after the whole instruction, a read-modify-write one included (it is not run
    twice); a step one instruction on, with breakpoints not stopping it."""
    from guestasm import assemble, bare_machine, entry

    machine = bare_machine(icount=icount)
    code, labels = assemble("""
        mov ecx, 3
    again:
        inc eax
    store:
        add [0x3000], eax
    after:
        dec ecx
        jnz again
        mov al, 0
        out 0xf4, al
    """, 0x1000)
    machine.ram.write(0x1000, code)
    machine.cpu.enter(entry("protected32", 0x1000))
    cpu, stops = machine.cpu, []
    machine.debug_listeners.append(lambda stop: stops.append((stop.kind, stop.address, cpu.rip)))

    def go(step=False):
        machine.single_step = step
        machine.resume()
        return machine.run()

    cpu.add_breakpoint(labels["store"])
    assert go() is None and stops[-1] == ("breakpoint", labels["store"], labels["store"])
    assert machine.status == "debug"
    assert go() is None and stops[-1] == ("breakpoint", labels["store"], labels["store"])  # gdb steps over it
    assert go(step=True) is None and stops[-1] == ("step", labels["store"], labels["after"])
    assert machine.ram.read(0x3000, 4) == (1).to_bytes(4, "little")
    assert cpu.remove_breakpoint(labels["store"]) and not cpu.remove_breakpoint(labels["store"])
    cpu.add_watchpoint("watch", 0x3000, 4)
    assert go() is None and stops[-1] == ("watch", 0x3000, labels["after"])
    assert machine.ram.read(0x3000, 4) == (1 + 2).to_bytes(4, "little")
    cpu.remove_watchpoint("watch", 0x3000, 4)
    cpu.add_watchpoint("rwatch", 0x3000, 4)
    assert go() is None and stops[-1] == ("rwatch", 0x3000, labels["after"])
    assert machine.ram.read(0x3000, 4) == (1 + 2 + 3).to_bytes(4, "little")
    cpu.remove_debug_hooks()
    assert go() == 1  # no hook left: the guest runs to its exit

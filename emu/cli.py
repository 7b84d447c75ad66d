"""The ``emu`` command line: ``emu run`` with QEMU-style options, ``emu demo``.

Bad options and missing or malformed images give a one-line error and exit status 2.
The exit status of ``emu run`` is the guest's isa-debug-exit status ((value << 1) | 1).
"""

import argparse
import os
import pathlib
import sys

from .errors import ConfigError, EmuError, StateError

TRACE_CATEGORIES = {
    "int": "interrupt and exception delivery",
    "io": "every port access that reaches a device model",
    "unassigned": "accesses to ports no device claims (they read as all ones)",
    "cpu": "CPU resets and triple faults",
}

USAGE_EXIT = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(message)


def _run_parser():
    p = _Parser(prog="emu run", description="Run a guest on the emulated PC.", allow_abbrev=False)
    p.add_argument("-machine", "-M", default="pc", metavar="TYPE", help="machine type (only 'pc')")
    p.add_argument("-m", default="64M", metavar="SIZE", help="RAM size, e.g. 64M, 1G (default 64M)")
    p.add_argument("-kernel", metavar="FILE", help="multiboot ELF kernel (or a Linux bzImage)")
    p.add_argument("-append", default="", metavar="CMDLINE", help="kernel command line")
    p.add_argument("-initrd", metavar="FILES", help="multiboot modules 'a arg,b' or a Linux initrd")
    p.add_argument("-bios", metavar="FILE", help="ROM image mapped below 4 GiB and at 0xE0000")
    p.add_argument("-flat", metavar="FILE@ADDR", help="raw binary loaded at ADDR, entered in 32-bit protected mode")
    p.add_argument("-fw_cfg", action="append", metavar="[name=]NAME,string=STR|file=PATH",
                   help="add a file to the fw_cfg directory (names should start with 'opt/'; repeatable)")
    p.add_argument("-serial", action="append", metavar="DEV",
                   help="stdio | file:PATH | tcp:HOST:PORT,server[,nowait] | null | none (repeat for COM2)")
    p.add_argument("-no-reboot", action="store_true", help="stop instead of resetting on a reset or triple fault")
    p.add_argument("-icount", nargs="?", const="0", metavar="shift=N",
                   help="deterministic time: guest time advances 2^N ns per instruction")
    p.add_argument("-d", "--trace", metavar="LIST", default="", help="trace categories (comma list; 'help' lists)")
    p.add_argument("-nographic", action="store_true", help="accepted for QEMU compatibility (there is no display)")
    p.add_argument("-display", metavar="TYPE", help="accepted for QEMU compatibility ('none')")
    p.add_argument("-monitor", metavar="DEV", help="accepted for QEMU compatibility ('none')")
    p.add_argument("-no-lapic", action="store_true", help="build the machine without a local APIC")
    p.add_argument("-rtc-base", metavar="EPOCH", type=int, help="RTC start time (seconds since 1970, UTC)")
    p.add_argument("-savevm-at", nargs=2, metavar=("MS", "FILE"),
                   help="after MS milliseconds of guest time, save a snapshot to FILE and go on")
    p.add_argument("-loadvm", metavar="FILE", help="start from a snapshot saved with -savevm-at")
    p.add_argument("-qmp", metavar="ADDR", help="QMP monitor on unix:PATH,server,nowait or tcp:HOST:PORT,server,nowait")
    p.add_argument("-S", dest="start_paused", action="store_true", help="do not start the guest until QMP 'cont'")
    p.add_argument("-incoming", metavar="URI",
                   help="wait for a migration: tcp:HOST:PORT (loopback unless HOST is given), exec:CMD or file:PATH")
    return p


def parse_icount(text):
    if text is None:
        return None
    value = text.split(",")[0]
    if value.startswith("shift="):
        value = value[len("shift="):]
    if value == "auto":
        value = "0"
    try:
        shift = int(value)
    except ValueError:
        raise ConfigError(f"-icount: bad value {text!r} (expected shift=N)") from None
    if not 0 <= shift <= 10:
        raise ConfigError(f"-icount: shift {shift} out of range 0..10")
    return shift


def build_from_args(args):
    """Create a ready-to-run machine from parsed ``emu run`` options."""
    from machines import pc

    from .memory import parse_size

    if args.trace == "help":
        print("\n".join(f"{name:12s} {text}" for name, text in TRACE_CATEGORIES.items()))
        raise SystemExit(0)
    trace = [t for t in args.trace.split(",") if t]
    for t in trace:
        if t not in TRACE_CATEGORIES:
            raise ConfigError(f"-d: unknown trace category {t!r} (try -d help)")
    if args.machine not in ("pc", "help"):
        raise ConfigError(f"-machine: unsupported machine type {args.machine!r} (only 'pc')")
    if args.machine == "help":
        print("pc         Standard PC (i440FX-like ISA devices, single CPU)")
        raise SystemExit(0)
    for option in ("kernel", "bios"):
        path = getattr(args, option)
        if path is not None and not os.path.isfile(path):
            raise ConfigError(f"-{option}: cannot open {path!r}: no such file")
    if args.kernel is None and args.bios is None and args.flat is None:
        raise ConfigError("nothing to run: give -kernel, -bios or -flat")
    shift = parse_icount(args.icount)
    return pc.build(
        ram_size=parse_size(args.m),
        kernel=args.kernel,
        append=args.append,
        initrd=args.initrd,
        bios=args.bios,
        flat=args.flat,
        serial=args.serial or ["stdio"],
        icount_shift=shift,
        no_reboot=args.no_reboot,
        trace=trace,
        lapic=not args.no_lapic,
        rtc_base=args.rtc_base,
        fw_cfg_files=args.fw_cfg or (),
    )


def _savevm_at(args):
    if args.savevm_at is None:
        return None
    ms, path = args.savevm_at
    try:
        when = float(ms)
    except ValueError:
        raise ConfigError(f"-savevm-at: bad time {ms!r} (milliseconds of guest time)") from None
    if when < 0:
        raise ConfigError(f"-savevm-at: negative time {ms!r}")
    return int(when * 1_000_000), path


def cmd_run(argv):
    return run_machine(_run_parser().parse_args(argv))


def run_machine(args, configure=None):
    """Build the machine ``args`` describe and run it; ``configure(machine, migration)``
    runs before the guest starts (``emu colo`` sets up the pair there)."""
    savevm = _savevm_at(args)
    snapshot = None
    if args.loadvm is not None:
        try:
            with open(args.loadvm, "rb") as f:
                snapshot = f.read()
        except OSError as e:
            raise ConfigError(f"-loadvm: cannot read {args.loadvm!r}: {e.strerror}") from None
    machine = build_from_args(args)
    monitor = migration = None
    try:
        from colo.migration import IncomingMigration, MigrationController

        migration = MigrationController(machine)
        for backend in getattr(machine, "serial_backends", ()):
            if getattr(backend, "role", None) is not None:  # the serial link of a COLO pair
                migration.colo_link = backend
                migration.colo_passive = backend.mode == "passive"
        if args.qmp is not None:
            from .qmp import QmpServer
            monitor = QmpServer(machine, args.qmp, migration=migration)
        if args.incoming is not None:
            migration.incoming = IncomingMigration(machine, args.incoming, autostart=not args.start_paused,
                                                   controller=migration)
        if snapshot is not None:
            try:
                machine.load_state(snapshot)
            except StateError as e:
                raise ConfigError(f"-loadvm: {args.loadvm}: {e}") from None
        status = None
        if savevm is not None:
            status = machine.run(until_ns=savevm[0])
            if status is None:
                with open(savevm[1], "wb") as f:
                    machine.save_state(ram_pages="all", out=f)
        if args.start_paused and machine.status == "running":
            machine.status = "prelaunch"
        if configure is not None:
            configure(machine, migration)
        if status is None:
            interactive = (monitor is not None or args.start_paused or args.incoming is not None
                           or configure is not None)
            status = machine.main_loop() if interactive else machine.run()
    except KeyboardInterrupt:
        status = 130
    finally:
        if monitor is not None:
            monitor.close()
        if migration is not None and migration.colo is not None:
            migration.colo.close()
        machine.close()
    if machine.exit_message:
        print(f"emu: {machine.exit_message}", file=sys.stderr)
    return 0 if status is None else status


def cmd_demo(argv):
    """Run the built-in demo guest: it prints a greeting and exits through isa-debug-exit."""
    root = pathlib.Path(__file__).resolve().parent.parent
    hello = root / "firmware" / "build" / "hello.elf"
    if not hello.exists():
        raise ConfigError(f"demo: {hello} is missing (run `make firmware`)")
    print(f"emu demo: booting {hello.relative_to(root)} on machine 'pc'", file=sys.stderr)
    status = cmd_run(["-kernel", str(hello), "-serial", "stdio", "-no-reboot"])
    ok = status == 1  # the guest writes 0 to isa-debug-exit: (0 << 1) | 1
    print(f"emu demo: guest exited with status {status} ({'success' if ok else 'failure'})", file=sys.stderr)
    return 0 if ok else 1


def cmd_colo(argv):
    from colo.cli import main
    return main(argv)


COMMANDS = {"run": cmd_run, "demo": cmd_demo, "colo": cmd_colo}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print("usage: emu run [options]   run a guest (emu run --help)\n"
              "       emu demo            run the demo guest\n"
              "       emu colo COMMAND    a fault-tolerant pair: arbiter, proxy, primary, secondary, report, demo")
        return 0 if argv else USAGE_EXIT
    command = COMMANDS.get(argv[0])
    try:
        if command is None:
            raise ConfigError(f"unknown command {argv[0]!r} (try: {', '.join(COMMANDS)})")
        return command(argv[1:])
    except ConfigError as e:
        print(f"emu: {e}", file=sys.stderr)
        return USAGE_EXIT
    except EmuError as e:
        print(f"emu: {e}", file=sys.stderr)
        return 1

"""The ``emu`` command line: ``emu run`` with QEMU-style options, ``emu demo``.

Exit statuses of ``emu run`` (README, "Exit statuses"): 0 when the run ends normally
(QMP/HMP ``quit``, a reset or shutdown under ``-no-reboot``, SIGINT/SIGTERM/SIGHUP, as
QEMU), ``(v << 1) | 1`` when the guest writes v to isa-debug-exit (always odd), 1 when an
incoming migration fails (as QEMU), 2 for bad configuration (one line naming the cause,
nothing run), 70 when the emulator cannot go on (the guest did something this machine does
not model; sysexits' EX_SOFTWARE: even, so never a guest's status).
"""

import argparse
import os
import pathlib
import signal
import stat
import sys

from emu.cpu.x86 import raise_in_running_cpu
from emu.errors import RUNTIME_FAILURE_STATUS, ConfigError, EmuError, StateError

TRACE_CATEGORIES = {
    "int": "interrupt and exception delivery",
    "io": "every port access that reaches a device model",
    "unassigned": "accesses to ports no device claims (they read as all ones)",
    "cpu": "CPU resets and triple faults",
    "guest_errors": "what a guest did wrong to a device (a virtio driver breaking its queues)",
}

USAGE_EXIT = 2

#: qemu-system-x86_64 7.2 options this emulator does not have: named as unsupported,
#: never taken for an abbreviation of one of ours
QEMU_OPTIONS = frozenset("""
    accel acpitable action add-fd async-teardown audio audio-help audiodev blockdev boot cdrom chardev chroot
    compat cpu D dfilter dtb dump-vmstate echr enable-kvm enable-sync-profile fda fdb
    fsdev full-screen g hda hdb hdc hdd iscsi k L mem-path mem-prealloc mon msg mtdblock net netdev
    nic no-acpi no-fd-bootchk no-hpet no-shutdown no-user-config nodefaults numa object only-migratable
    option-rom overcommit parallel pflash plugin portrait preconfig qmp-pretty readconfig rotate rtc runas
    sandbox sd seed semihosting semihosting-config set singlestep smbios smp snapshot spice tpmdev trace usb
    usbdevice uuid vga virtfs vnc watchdog watchdog-action win2k-hack xen-attach xen-domid xen-domid-restrict
""".split())


def _version_text():
    from frontend.qmp import PACKAGE, QEMU_VERSION
    qemu = "{major}.{minor}.{micro}".format(**QEMU_VERSION)
    return (f"{PACKAGE or 'emu-colo'}, a PC emulator with the command line, QMP and exit statuses of "
            f"qemu-system-x86_64 {qemu}")


class _Parser(argparse.ArgumentParser):
    """argparse with QEMU's rules: an option is spelt whole (``-k`` is not ``-kernel``,
    ``-daemonize`` is not ``-d aemonize``), ``-h``, ``-help`` and ``--help`` print help, and
    an option of QEMU's we lack is called unsupported rather than unknown."""

    def __init__(self, **kw):
        super().__init__(add_help=False, allow_abbrev=False, **kw)

    def error(self, message):
        raise ConfigError(message)

    def parse_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        self._check_spelling(args)
        return super().parse_args(args, namespace)

    def _check_spelling(self, argv):
        actions = self._option_string_actions
        i = 0
        while i < len(argv):
            word = argv[i]
            i += 1
            if word in ("-h", "-help", "--help"):
                self.print_help()
                raise SystemExit(0)
            if word in ("-version", "--version"):
                print(_version_text())
                raise SystemExit(0)
            if not word.startswith("-") or word == "-":
                continue
            name, has_value, _ = word.partition("=")
            action = actions.get(name if name.startswith("--") and has_value else word)
            if action is None:
                bare = word.lstrip("-")
                if bare in QEMU_OPTIONS:
                    raise ConfigError(f"{word}: not supported: this emulator has no such QEMU option "
                                      f"(emu run -help lists the options it has)")
                raise ConfigError(f"{word}: invalid option (emu run -help lists the options)")
            if has_value and name.startswith("--"):
                continue
            if action.nargs == 0:
                continue
            if action.nargs == "?":
                if i < len(argv) and not argv[i].startswith("-"):
                    i += 1
                continue
            count = action.nargs if isinstance(action.nargs, int) else 1
            if i + count > len(argv):
                raise ConfigError(f"{word}: requires an argument")
            i += count


def run_parser():
    p = _Parser(prog="emu run", description="Run a guest on the emulated PC.")
    p.add_argument("-h", "-help", "--help", action="store_true", help="print this help and exit")
    p.add_argument("-version", "--version", action="store_true", help="print the version and exit")
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
                   help="stdio | file:PATH | pty | tcp:HOST:PORT,server[,nowait] | "
                        "unix:PATH,server[,nowait] | null | none (repeat for COM2)")
    p.add_argument("-no-reboot", action="store_true", help="stop instead of resetting on a reset or triple fault")
    p.add_argument("-icount", nargs="?", const="0", metavar="shift=N",
                   help="deterministic time: guest time advances 2^N ns per byte of guest code executed")
    p.add_argument("-d", dest="trace", metavar="LIST", default="", help="trace categories (comma list; 'help' lists)")
    p.add_argument("-nographic", action="store_true", help="accepted for QEMU compatibility (there is no display)")
    p.add_argument("-display", metavar="TYPE", help="accepted for QEMU compatibility ('none')")
    p.add_argument("-monitor", metavar="DEV", help="only 'none' (HMP: QMP human-monitor-command)")
    p.add_argument("-no-lapic", action="store_true", help="build the machine without a local APIC")
    p.add_argument("-netdev", action="append", metavar="tap|socket,id=ID,...",
                   help="network backend: tap,id=ID,ifname=TAP,script=no,downscript=no or socket,id=ID,listen=|connect="
                        "HOST:PORT")
    p.add_argument("-device", action="append", metavar="MODEL,...",
                   help="virtio-net-pci,netdev=ID[,mac=MAC] or virtio-blk-pci,drive=ID (PCI slot 2 and up)")
    p.add_argument("-drive", action="append", metavar="file=IMG,...",
                   help="disk: file=IMG[,format=raw][,if=virtio|none][,id=ID][,readonly=on][,serial=S]")
    p.add_argument("-debugcon", metavar="DEV", help="isa-debugcon on port 0xe9 to DEV (a -serial device)")
    p.add_argument("-global", dest="global_settings", action="append", metavar="DRIVER.PROP=VALUE",
                   help="only isa-debugcon.iobase=PORT (SeaBIOS logs to 0x402)")
    p.add_argument("-rtc-base", metavar="EPOCH", type=int, help="RTC start time (seconds since 1970, UTC)")
    p.add_argument("-savevm-at", nargs=2, metavar=("MS", "FILE"),
                   help="after MS milliseconds of guest time, save a snapshot to FILE and go on")
    p.add_argument("-loadvm", metavar="FILE", help="start from a snapshot saved with -savevm-at")
    p.add_argument("-qmp", metavar="ADDR", help="QMP monitor on unix:PATH,server,nowait or tcp:HOST:PORT,server,nowait")
    p.add_argument("-S", dest="start_paused", action="store_true",
                   help="do not start the guest until QMP 'cont' (or gdb's continue)")
    p.add_argument("-gdb", metavar="DEV", help="GDB stub on tcp:[HOST]:PORT (loopback unless HOST is given) or none")
    p.add_argument("-s", dest="gdb_default", action="store_true", help="shorthand for -gdb tcp::1234")
    p.add_argument("-incoming", metavar="URI",
                   help="wait for a migration: tcp:HOST:PORT (loopback unless HOST is given), exec:CMD, file:PATH, "
                        "or defer (QMP migrate-incoming gives the URI)")
    p.add_argument("-name", metavar="NAME", help="the guest's name ([guest=]NAME[,...]; QMP query-name)")
    p.add_argument("-pidfile", metavar="FILE", help="write the process id to FILE (removed at exit)")
    p.add_argument("-daemonize", action="store_true",
                   help="detach from the terminal once the machine is set up (errors are reported first)")
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
    import colo.link  # noqa: F401  (registers -serial colo:, a COLO pair's client endpoint link)
    import colo.netlink  # noqa: F401  (registers -netdev colo, the same for a NIC)
    from machines import pc

    from emu.memory import parse_size

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
        if path is not None:
            _check_readable_file(option, path)
    if args.kernel is None and args.bios is None and args.flat is None:
        raise ConfigError("nothing to run: give -kernel, -bios or -flat")
    shift = parse_icount(args.icount)
    serial = args.serial or (["null"] if getattr(args, "daemonize", False) else ["stdio"])
    return pc.build(
        ram_size=parse_size(args.m),
        kernel=args.kernel,
        append=args.append,
        initrd=args.initrd,
        bios=args.bios,
        flat=args.flat,
        serial=serial,
        icount_shift=shift,
        no_reboot=args.no_reboot,
        trace=trace,
        lapic=not args.no_lapic,
        rtc_base=args.rtc_base,
        fw_cfg_files=args.fw_cfg or (),
        netdevs=args.netdev or (),
        devices=args.device or (),
        drives=args.drive or (),
        debugcon=args.debugcon,
        debugcon_iobase=_debugcon_iobase(args.global_settings or ()),
    )


def _debugcon_iobase(settings):
    """``-global isa-debugcon.iobase=PORT`` (the only -global there is)."""
    iobase = 0xE9
    for setting in settings:
        name, _, value = setting.partition("=")
        if name != "isa-debugcon.iobase":
            raise ConfigError(f"-global {setting!r}: not supported (only isa-debugcon.iobase=PORT)")
        try:
            iobase = int(value, 0)
        except ValueError:
            raise ConfigError(f"-global {setting!r}: bad port {value!r}") from None
        if not 0 <= iobase <= 0xFFFF:
            raise ConfigError(f"-global {setting!r}: port out of range")
    return iobase


def _savevm_at(args):
    """``-savevm-at MS FILE`` -> (guest ns, FILE), the file created now so that a bad path
    is a configuration error and not a surprise when the moment comes."""
    if args.savevm_at is None:
        return None
    ms, path = args.savevm_at
    try:
        when = float(ms)
    except ValueError:
        raise ConfigError(f"-savevm-at: bad time {ms!r} (milliseconds of guest time)") from None
    if when < 0:
        raise ConfigError(f"-savevm-at: negative time {ms!r}")
    check_writable("-savevm-at", path)
    return int(when * 1_000_000), path


def check_writable(option, path):
    """Fail now, in one line, if ``path`` cannot be created (the file is not left behind)."""
    existed = os.path.exists(path)
    try:
        with open(path, "ab"):
            pass
    except OSError as e:
        raise ConfigError(f"{option}: cannot write {path!r}: {e.strerror}") from None
    if not existed:
        os.unlink(path)


def _check_readable_file(option, path):
    """The image options: the file must exist, be a regular file and be readable."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise ConfigError(f"-{option}: cannot open {path!r}: {e.strerror.lower()}") from None
    if not stat.S_ISREG(st.st_mode):
        what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise ConfigError(f"-{option}: {path!r} is {what}")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"-{option}: cannot open {path!r}: permission denied")


class Terminated(Exception):
    """SIGTERM or SIGHUP: the run ends as after Ctrl-C (terminal restored, sockets removed)."""

    def __init__(self, signum):
        super().__init__(f"terminating on signal {signum}")
        self.signum = signum


def _raise_terminated(signum, frame):
    if not raise_in_running_cpu(Terminated(signum)):
        raise Terminated(signum)


def _write_pidfile(path):
    try:
        with open(path, "w") as f:
            f.write(f"{os.getpid()}\n")
    except OSError as e:
        raise ConfigError(f"-pidfile: cannot write {path!r}: {e.strerror}") from None


def _daemonize():
    """Detach as QEMU's -daemonize: the parent exits 0 once the child has started; the
    child leaves the session and the terminal (its stdio goes to /dev/null)."""
    read_end, write_end = os.pipe()
    if os.fork() > 0:
        os.close(write_end)
        ok = os.read(read_end, 1)
        os._exit(0 if ok else 1)
    os.close(read_end)
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    os.write(write_end, b"1")
    os.close(write_end)


def cmd_run(argv):
    return run_machine(run_parser().parse_args(argv))


def _check_run_options(args):
    """What can be checked before anything is built or opened."""
    if args.daemonize:
        serial = args.serial or ["stdio"]
        if "stdio" in serial:
            raise ConfigError("-daemonize: a daemon has no terminal: give -serial a file:, pty, tcp:, unix: or "
                              "null device (the default is stdio)")
    if args.monitor not in (None, "none"):
        raise ConfigError(f"-monitor {args.monitor}: not supported: there is no HMP console; use -qmp "
                          "(HMP goes through its human-monitor-command) or -monitor none")
    if args.incoming == "defer" and args.qmp is None:
        raise ConfigError("-incoming defer: needs -qmp (the migrate-incoming command gives the URI)")


class _RunParts:
    """What :func:`run_machine` has set up so far; whatever exists is closed on every way out."""

    def __init__(self):
        self.machine = self.monitor = self.migration = self.gdb = None
        self.pidfile_written = False

    def close(self):
        if self.gdb is not None:
            self.gdb.close(None if self.machine is None else self.machine.exit_status)
        _close(self.machine, self.monitor, self.migration)


def run_machine(args, configure=None):
    """Build the machine ``args`` describe and run it; ``configure(machine, migration)``
    runs before the guest starts (``emu colo`` sets up the pair there).

    Everything up to the start of the guest is set-up: an error there is a configuration
    error (one line, exit status 2, the guest never runs)."""
    _check_run_options(args)
    savevm = _savevm_at(args)
    snapshot = _read_loadvm(args)
    if args.pidfile is not None:
        check_writable("-pidfile", args.pidfile)
    previous = {sig: signal.signal(sig, _raise_terminated) for sig in (signal.SIGTERM, signal.SIGHUP)}
    parts = _RunParts()
    try:
        _set_up(args, configure, snapshot, parts)
    except (EmuError, OSError) as e:
        parts.close()
        _restore_signals(previous)
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(str(e) if isinstance(e, EmuError) else f"{e.strerror or e}") from None
    except (KeyboardInterrupt, Terminated) as e:  # e.g. while -serial ...,server waits for its client
        parts.close()
        _restore_signals(previous)
        signum = e.signum if isinstance(e, Terminated) else signal.SIGINT
        print(f"emu: terminating on signal {signum}", file=sys.stderr)
        return 0
    try:
        status = _run_guest(args, configure, savevm, parts)
    finally:
        parts.close()
        _restore_signals(previous)
        if parts.pidfile_written:
            _unlink_quietly(args.pidfile)
    if parts.machine.exit_message:
        print(f"emu: {parts.machine.exit_message}", file=sys.stderr)
    return 0 if status is None else status


def _read_loadvm(args):
    """The ``-loadvm`` snapshot's bytes (read before anything is built), or None."""
    if args.loadvm is None:
        return None
    try:
        with open(args.loadvm, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"-loadvm: cannot read {args.loadvm!r}: {e.strerror}") from None


def _set_up(args, configure, snapshot, parts):
    """Build the machine and what serves it (monitor, migration), load the snapshot, detach."""
    machine = parts.machine = build_from_args(args)
    machine.name = _guest_name(args.name)
    migration = parts.migration = _migration_controller(args, machine, configure)
    if args.qmp is not None:
        from frontend.qmp import QmpServer
        parts.monitor = QmpServer(machine, args.qmp, migration=migration)
    _set_up_incoming(args, machine, migration)
    _set_up_gdb(args, parts)
    if snapshot is not None:
        try:
            machine.load_state(snapshot)
        except StateError as e:
            raise ConfigError(f"-loadvm: {args.loadvm}: {e}") from None
    if args.start_paused and machine.status == "running":
        machine.status = "prelaunch"
    if configure is not None:
        configure(machine, migration)
    if args.daemonize:
        _daemonize()
    if args.pidfile is not None:
        _write_pidfile(args.pidfile)
        parts.pidfile_written = True


def _set_up_gdb(args, parts):
    """``-gdb DEV`` / ``-s``: the GDB stub, its ``monitor`` command going to HMP."""
    from frontend.gdbstub import DEFAULT_PORT, GdbStub

    specs = ([args.gdb] if args.gdb is not None else []) + ([f"tcp::{DEFAULT_PORT}"] if args.gdb_default else [])
    specs = [spec for spec in specs if spec != "none"]
    if len(specs) > 1:
        raise ConfigError("-gdb: only one GDB stub (give -s or -gdb, not both)")
    if not specs:
        return
    monitor = parts.monitor
    if monitor is None:
        from frontend.qmp import QmpServer
        monitor = QmpServer(parts.machine, None)
    parts.gdb = GdbStub(parts.machine, specs[0], monitor.human_command)


def _migration_controller(args, machine, configure):
    """Migration and COLO, when something can reach them: QMP, -incoming or a pair's link to
    its client endpoint (``emu colo`` configures one itself); None otherwise."""
    from colo.link import ColoLink  # a COLO pair's link: -serial colo:... or -netdev colo,...

    colo_links = [backend for backend in machine.serial_backends + machine.net_backends
                  if isinstance(backend, ColoLink)]
    if len(colo_links) > 1:
        raise ConfigError(f"a COLO pair has one link to its client endpoint, not {len(colo_links)} "
                          f"(-serial colo: or -netdev colo)")
    if args.qmp is None and args.incoming is None and not colo_links and configure is None:
        return None
    from colo.migration import MigrationController

    migration = MigrationController(machine)
    for backend in colo_links:
        migration.colo_link = backend
        migration.colo_passive = backend.mode == "passive"
    return migration


def _set_up_incoming(args, machine, migration):
    """``-incoming URI`` listens now; ``-incoming defer`` waits for QMP migrate-incoming."""
    if args.incoming is None:
        return
    from colo.migration import IncomingMigration

    if args.incoming == "defer":
        machine.status = "inmigrate"
        migration.defer_incoming(lambda uri: IncomingMigration(
            machine, uri, autostart=not args.start_paused, controller=migration))
    else:
        migration.incoming = IncomingMigration(machine, args.incoming, autostart=not args.start_paused,
                                               controller=migration)


def _run_guest(args, configure, savevm, parts):
    """Run until the guest or the user ends it; returns the exit status (None: run ended
    without one)."""
    machine, status = parts.machine, None
    try:
        if savevm is not None:
            status = machine.run(until_ns=savevm[0])
            _save_at(machine, savevm, status)
        if status is None:
            interactive = (parts.monitor is not None or args.start_paused or args.incoming is not None
                           or configure is not None or parts.gdb is not None)
            status = machine.main_loop() if interactive else machine.run()
    except (KeyboardInterrupt, Terminated) as e:
        signum = e.signum if isinstance(e, Terminated) else signal.SIGINT
        machine.exit_message = f"terminating on signal {signum}"
        status = 0
    except EmuError as e:
        machine.exit_message = str(e)
        status = RUNTIME_FAILURE_STATUS
    return status


def _save_at(machine, savevm, status):
    """-savevm-at: save when the moment came, or say that the guest ended first."""
    when_ns, path = savevm
    if status is not None:
        print(f"emu: -savevm-at: the guest ended at {machine.clock.now() / 1e6:.3f} ms, before "
              f"{when_ns / 1e6:g} ms: nothing saved to {path}", file=sys.stderr)
        return
    try:
        with open(path, "wb") as f:
            size = machine.save_state(ram_pages="all", out=f)
    except OSError as e:
        raise EmuError(f"-savevm-at: cannot write {path!r}: {e.strerror}") from None
    print(f"emu: saved the machine at {machine.clock.now() / 1e6:.3f} ms of guest time to {path} "
          f"({size} bytes)", file=sys.stderr)


def _guest_name(spec):
    """``-name guest=NAME,...`` or ``-name NAME`` (QEMU's forms) -> NAME."""
    if spec is None:
        return None
    first, *rest = spec.split(",")
    name = first[len("guest="):] if first.startswith("guest=") else first
    for option in rest:
        key = option.partition("=")[0]
        if key not in ("guest", "process", "debug-threads"):
            raise ConfigError(f"-name {spec!r}: unknown option {key!r} (guest=, process=, debug-threads=)")
        if key == "guest":
            name = option[len("guest="):]
    return name


def _close(machine, monitor, migration):
    if monitor is not None:
        monitor.close()
    if migration is not None and migration.colo is not None:
        migration.colo.close()
    if machine is not None:
        machine.close()


def _restore_signals(previous):
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _unlink_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass


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
    from frontend.colo import main
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
        return RUNTIME_FAILURE_STATUS

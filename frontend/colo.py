"""``emu colo ...``: one command per process of a protected pair.

``emu colo arbiter``   the lease holder that decides who may serve alone
``emu colo proxy``     the client endpoint: mirrors input, compares and releases output
``emu colo secondary`` ``emu run`` options + where to listen for the primary
``emu colo primary``   ``emu run`` options + the secondary to migrate to, then checkpoint
``emu colo pair``      a primary and a secondary, with a new secondary after each failover
``emu colo report``    per-checkpoint records -> summary and PNG
``emu colo demo``      all of the above, a client, and a killed primary

The primary and secondary commands are shortcuts for what QMP does (QEMU's way):
``migrate-set-capabilities x-colo`` on both, ``x-checkpoint-delay`` and ``migrate`` on
the primary, with COM1 on the client endpoint (``-serial colo:HOST:PORT,role=...``).
"""

import sys
import time

from emu.errors import ConfigError, EmuError

from colo.wire import parse_tcp_uri

USAGE = """usage: emu colo COMMAND [options]
  arbiter    --listen tcp:HOST:PORT [--lease MS]
  proxy      --client tcp:HOST:PORT|--netdev tap,ifname=TAP --listen tcp:HOST:PORT [--compare-timeout MS]
  secondary  [emu run options] --listen tcp:HOST:PORT --proxy|--net-proxy tcp:HOST:PORT [--passive] ...
  primary    [emu run options] --secondary tcp:HOST:PORT --proxy|--net-proxy tcp:HOST:PORT [--checkpoint-delay MS] ...
  pair       [emu run options] --proxy|--net-proxy tcp:HOST:PORT [--standby tcp:HOST:PORT]... (re-protects)
  report     FILE [-o OUT.png]
  demo       [--requests N] [--kill-after N] ... | --guest linux [--seconds S] [--kill-after S] ...
(emu colo COMMAND --help for each)"""

CONNECT_WAIT_S = 20.0


def _pair_options(parser, role):
    g = parser.add_argument_group("COLO")
    g.add_argument("--proxy", metavar="tcp:HOST:PORT", help="client endpoint (emu colo proxy --listen) for COM1")
    g.add_argument("--net-proxy", metavar="tcp:HOST:PORT",
                   help="client endpoint (emu colo proxy --netdev ... --listen) for the NIC: the first -netdev "
                        "becomes -netdev colo with the same id (a virtio-net-pci NIC on it is added if none)")
    g.add_argument("--arbiter", metavar="tcp:HOST:PORT|etcd://HOST:PORT[,...]/PREFIX",
                   help="who grants the right to serve alone: emu colo arbiter, or an etcd cluster (a lease and the "
                        "key PREFIX/GROUP/holder; ?ttl=S sets the lease's TTL, 2 s by default); without one the "
                        "client endpoint alone decides between two takeovers")
    g.add_argument("--group", default="colo", help="pair name at the arbiter")
    g.add_argument("--node", default=role, help="this VM's name (arbiter, proxy, logs)")
    g.add_argument("--heartbeat-period", type=float, default=100.0, metavar="MS")
    g.add_argument("--heartbeat-timeout", type=float, default=1000.0, metavar="MS")
    g.add_argument("--key-file", metavar="FILE", help="shared key: HMAC on every replication message")
    g.add_argument("--records", metavar="FILE.json|FILE.csv", help="write one record per checkpoint")
    g.add_argument("--status", dest="status_line", action="store_true", default=None,
                   help="live status line (default when stderr is a terminal)")
    g.add_argument("--no-status", dest="status_line", action="store_false")
    g.add_argument("--debug-consistency", action="store_true",
                   help="compare full state digests after every checkpoint (slow; for tests)")
    if role == "primary":
        g.add_argument("--secondary", required=True, metavar="tcp:HOST:PORT", help="the secondary's --listen")
        g.add_argument("--checkpoint-delay", type=int, default=200, metavar="MS",
                       help="periodic checkpoint interval (x-checkpoint-delay; default 200)")
        g.add_argument("--connect-timeout", type=float, default=CONNECT_WAIT_S, metavar="S",
                       help=f"how long to retry a secondary that does not answer yet (default {CONNECT_WAIT_S:g})")
        g.add_argument("--protect-after", type=float, default=0, metavar="MS",
                       help="run unprotected for MS ms of host time before migrating to the secondary")
        g.add_argument("--output-delay", type=float, default=1.0, metavar="MS",
                       help="passive pairs: checkpoint this soon after output appears (default 1)")
        g.add_argument("--x-kill-at", metavar="PHASE:SEQ", help="fault injection: SIGKILL this process at PHASE "
                       "(after-request, before-send, mid-ram, mid-device, before-digest, after-received) of "
                       "checkpoint SEQ or later")
    else:
        g.add_argument("--listen", required=True, metavar="tcp:HOST:PORT",
                       help="where the primary connects (loopback unless HOST is given)")
        g.add_argument("--passive", action="store_true",
                       help="stay stopped between checkpoints (Remus); default: run and compare (COLO)")


def _settings(args):
    from colo.controller import ColoSettings

    key = None
    if args.key_file:
        try:
            with open(args.key_file, "rb") as f:
                key = f.read().strip()
        except OSError as e:
            raise ConfigError(f"--key-file: cannot read {args.key_file!r}: {e.strerror}") from None
        if not key:
            raise ConfigError(f"--key-file: {args.key_file!r} is empty")
    if args.heartbeat_period <= 0 or args.heartbeat_timeout <= args.heartbeat_period:
        raise ConfigError("--heartbeat-timeout must be above --heartbeat-period (both > 0)")
    if args.arbiter and args.arbiter.startswith("etcd:"):
        from colo.etcdarbiter import parse_etcd_url
        arbiter = parse_etcd_url(args.arbiter)
    else:
        arbiter = parse_tcp_uri(args.arbiter, "--arbiter") if args.arbiter else None
    if args.records:  # checked now: the records file is opened only once the pair has formed
        from frontend.cli import check_writable
        if not args.records.lower().endswith((".json", ".csv")):
            raise ConfigError(f"--records: {args.records!r} must end in .json or .csv")
        check_writable("--records", args.records)
    kill_at = None
    if getattr(args, "x_kill_at", None):
        from colo.checkpoint import FAULT_PHASES

        phase, _, seq = args.x_kill_at.partition(":")
        if phase not in FAULT_PHASES or not seq.isdigit():
            raise ConfigError(f"--x-kill-at: expected PHASE:SEQ with PHASE one of {', '.join(FAULT_PHASES)}")
        kill_at = (phase, int(seq))
    return ColoSettings(heartbeat_period_ms=args.heartbeat_period, heartbeat_timeout_ms=args.heartbeat_timeout,
                        output_delay_ms=getattr(args, "output_delay", 1.0), arbiter=arbiter, group=args.group,
                        node=args.node, key=key, debug=args.debug_consistency, records=args.records,
                        status_line=args.status_line, kill_at=kill_at)


def _pair_args(role, argv):
    """``emu run`` options plus the pair's, parsed; and the COLO settings they give."""
    from frontend.cli import run_parser

    parser = run_parser()
    parser.prog = f"emu colo {role}"
    _pair_options(parser, role)
    args = parser.parse_args(argv)
    return args, _settings(args)


def _serial_for(args, role, mode="compare"):
    """The pair's link to its client endpoint: COM1 (--proxy) or the NIC (--net-proxy)."""
    if args.proxy and args.net_proxy:
        raise ConfigError("give --proxy (a serial pair) or --net-proxy (a networked pair), not both")
    if args.proxy:
        host, port = parse_tcp_uri(args.proxy, "--proxy")
        args.serial = [f"colo:{host}:{port},role={role},mode={mode},node={args.node}"] + (args.serial or [])[1:]
    if args.net_proxy:
        host, port = parse_tcp_uri(args.net_proxy, "--net-proxy")
        link = f"proxy={host}:{port},role={role},mode={mode},node={args.node}"
        netdevs = args.netdev or []
        if netdevs:
            netdev_id = next((part[3:] for part in netdevs[0].split(",") if part.startswith("id=")), None)
            if not netdev_id:
                raise ConfigError(f"-netdev {netdevs[0]!r}: id= is required")
            args.netdev = [f"colo,id={netdev_id},{link}"] + netdevs[1:]
        else:
            args.netdev = [f"colo,id=colo0,{link}"]
            args.device = (args.device or []) + ["virtio-net-pci,netdev=colo0"]


def cmd_secondary(argv):
    from frontend.cli import run_machine

    args, settings = _pair_args("secondary", argv)
    parse_tcp_uri(args.listen, "--listen")
    _serial_for(args, "secondary", "passive" if args.passive else "compare")
    args.incoming = args.listen

    def configure(machine, migration):
        migration.colo_settings = settings
        migration.colo_passive = args.passive
        migration.set_capabilities([{"capability": "x-colo", "state": True}])
        host, _ = parse_tcp_uri(args.listen, "--listen")
        print(f"colo secondary: waiting for the primary on tcp:{host}:{migration.incoming.port}",
              file=sys.stderr, flush=True)

    return run_machine(args, configure)  # SIGTERM ends it like Ctrl-C: records flushed, sockets closed


def cmd_primary(argv):
    from frontend.cli import run_machine

    args, settings = _pair_args("primary", argv)
    parse_tcp_uri(args.secondary, "--secondary")
    if args.checkpoint_delay < 1:
        raise ConfigError("--checkpoint-delay must be at least 1 ms")
    if args.connect_timeout < 0:
        raise ConfigError("--connect-timeout must not be negative")
    _serial_for(args, "primary")

    def configure(machine, migration):
        migration.colo_settings = settings
        migration.set_capabilities([{"capability": "x-colo", "state": True},
                                    {"capability": "return-path", "state": True}])
        migration.set_parameters({"x-checkpoint-delay": args.checkpoint_delay})

        def protect():
            deadline = time.monotonic() + args.connect_timeout
            said = False
            while True:
                try:
                    migration.start(args.secondary)
                    break
                except EmuError as e:
                    if "failed to connect" not in str(e):
                        raise
                    if time.monotonic() >= deadline:
                        raise EmuError(f"colo primary: no secondary answers at {args.secondary} after "
                                       f"{args.connect_timeout:g} s ({e}); start `emu colo secondary --listen "
                                       f"{args.secondary}` first, or give more --connect-timeout") from None
                    if not said:
                        print(f"colo primary: no secondary at {args.secondary} yet ({e}); retrying for up to "
                              f"{args.connect_timeout:g} s (--connect-timeout)", file=sys.stderr, flush=True)
                        said = True
                    time.sleep(0.05)
            print(f"colo primary: migrating to {args.secondary}, then checkpoints every {args.checkpoint_delay} ms",
                  file=sys.stderr, flush=True)

        if args.protect_after <= 0:
            protect()
            return
        start_at = time.monotonic() + args.protect_after / 1e3

        def protect_later():  # the guest runs unprotected until then (a boot, say)
            if time.monotonic() >= start_at:
                machine.remove_background_job(protect_later)
                protect()
        machine.add_background_job(protect_later)

    return run_machine(args, configure)  # SIGTERM ends it like Ctrl-C: records flushed, sockets closed


def cmd_proxy(argv):
    from colo.proxy import main
    return main(argv)


def cmd_arbiter(argv):
    from colo.arbiter import main
    return main(argv)


def cmd_report(argv):
    from colo.report import main
    return main(argv)


def cmd_pair(argv):
    from colo.pair import main
    return main(argv)


def cmd_demo(argv):
    from colo.demo import main
    return main(argv)


COMMANDS = {"primary": cmd_primary, "secondary": cmd_secondary, "proxy": cmd_proxy, "arbiter": cmd_arbiter,
            "report": cmd_report, "demo": cmd_demo, "pair": cmd_pair}


def main(argv):
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command = COMMANDS.get(argv[0])
    if command is None:
        raise ConfigError(f"colo: unknown command {argv[0]!r} (try: {', '.join(COMMANDS)})")
    return command(argv[1:])


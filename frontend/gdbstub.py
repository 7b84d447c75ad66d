"""The GDB stub: gdb's remote serial protocol on a TCP socket (QEMU's ``-gdb`` / ``-s``).

It follows QEMU 7.2's gdbstub where gdb can tell: the x86-64 register set of QEMU's
``i386-64bit.xml`` (one ``org.gnu.gdb.i386.core`` feature, 66 registers: general
registers, rip, eflags, the segment selectors, fs_base, gs_base, k_gs_base, cr0-cr4, cr8,
efer, x87 and SSE), one thread, stop replies ``T05thread:01;`` (``watch:``/``rwatch:``/
``awatch:`` for watchpoints, ``swbreak:``/``hwbreak:`` when gdb offered them), ``T02`` after
Ctrl-C, ``W`` when the guest ends, and ``k`` ending the emulator with status 0.  Like
QEMU it stops the guest when a debugger connects; a detach (``D``) lets it run on.

Everything runs in the machine's run loop between CPU slices (``Machine.add_fd_handler``):
the guest never waits for a debugger that is not there, and no hook exists until one
sets a breakpoint.  Memory is read and written at linear (virtual) addresses through the
guest's page tables.  One client at a time; when it goes away (detached or not) its
breakpoints go with it and the next client is accepted.
"""

import re
import socket
import struct

from emu.chardev import listen_tcp, parse_socket_options
from emu.cpu.x86 import Fault
from emu.errors import ConfigError, EmuError

DEFAULT_PORT = 1234  # -s
TCP_DEFAULT_HOST = "127.0.0.1"  # an empty host means loopback here, as for -qmp (QEMU: every interface)
PACKET_SIZE = 0x1000  # what qSupported offers (QEMU's MAX_PACKET_LENGTH)
MAX_MEMORY_READ = (PACKET_SIZE - 16) // 2
MAX_INPUT = 1 << 20  # an unfinished packet longer than this is garbage: the client is dropped
MAX_OUTPUT = 4 << 20  # a client that reads nothing is dropped past this much pending output
MSR_EFER, MSR_KERNEL_GS_BASE = 0xC0000080, 0xC0000102
SIGINT, SIGTRAP = 2, 5
E_MALFORMED, E_FAULT, E_INVALID = "E01", "E14", "E22"  # gdbserver's E01; QEMU's EFAULT and EINVAL
THREAD = "thread:01;"

# (name, bits, xml type, group): QEMU's i386-64bit.xml order, which fixes the numbers of p/P
REGISTERS = (
    [(name, 64, "data_ptr" if name in ("rbp", "rsp") else "int64", None)
     for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp")]
    + [(f"r{i}", 64, "int64", None) for i in range(8, 16)]
    + [("rip", 64, "code_ptr", None), ("eflags", 32, "x64_eflags", None)]
    + [(seg, 32, "int32", None) for seg in ("cs", "ss", "ds", "es", "fs", "gs")]
    + [(name, 64, "int64", None) for name in ("fs_base", "gs_base", "k_gs_base")]
    + [("cr0", 64, "x64_cr0", None), ("cr2", 64, "int64", None), ("cr3", 64, "int64", None),
       ("cr4", 64, "x64_cr4", None), ("cr8", 64, "int64", None), ("efer", 64, "x64_efer", None)]
    + [(f"st{i}", 80, "i387_ext", None) for i in range(8)]
    + [(name, 32, "int", "float") for name in ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff",
                                                 "fop")]
    + [(f"xmm{i}", 128, "vec128", None) for i in range(16)]
    + [("mxcsr", 32, "x64_mxcsr", "vector")]
)
REGISTER_NUMBERS = {name: i for i, (name, *_rest) in enumerate(REGISTERS)}

_EFLAGS_FIELDS = ("CF", "", "PF", "", "AF", "", "ZF", "SF", "TF", "IF", "DF", "OF")
_MXCSR_FIELDS = ("IE", "DE", "ZE", "OE", "UE", "PE", "DAZ", "IM", "DM", "ZM", "OM", "UM", "PM")


def target_xml():
    """The target description gdb reads with qXfer:features:read:target.xml."""
    def flags(type_id, size, fields, descending=True):
        """gdb prints the set fields in this order: QEMU's, highest bit first (MXCSR lowest first)."""
        fields = sorted(fields, key=lambda f: f[0], reverse=descending)
        body = "".join(f'<field name="{name}" start="{bit}" end="{end}"/>'
                       for bit, name, end in ((f[0], f[1], f[2] if len(f) > 2 else f[0]) for f in fields) if name)
        return f'<flags id="{type_id}" size="{size}">{body}</flags>'

    eflags = list(enumerate(_EFLAGS_FIELDS)) + [(12, "IOPL", 13), (14, "NT"), (16, "RF"), (17, "VM"), (18, "AC"),
                                               (19, "VIF"), (20, "VIP"), (21, "ID")]
    types = [
        flags("x64_eflags", 4, eflags),
        flags("x64_cr0", 8, [(0, "PE"), (1, "MP"), (2, "EM"), (3, "TS"), (4, "ET"), (5, "NE"), (16, "WP"),
                             (18, "AM"), (29, "NW"), (30, "CD"), (31, "PG")]),
        flags("x64_cr4", 8, [(0, "VME"), (1, "PVI"), (2, "TSD"), (3, "DE"), (4, "PSE"), (5, "PAE"), (6, "MCE"),
                             (7, "PGE"), (8, "PCE"), (9, "OSFXSR"), (10, "OSXMMEXCPT"), (11, "UMIP"), (12, "LA57"),
                             (16, "FSGSBASE"), (17, "PCIDE"), (18, "OSXSAVE"), (20, "SMEP"), (21, "SMAP"),
                             (22, "PKE")]),
        flags("x64_efer", 8, [(0, "SCE"), (8, "LME"), (10, "LMA"), (11, "NXE"), (12, "SVME"), (13, "LMSLE"),
                              (14, "FFXSR"), (15, "TCE")]),
        flags("x64_mxcsr", 4, list(enumerate(_MXCSR_FIELDS)) + [(15, "FZ")], descending=False),
        '<vector id="v4f" type="ieee_single" count="4"/><vector id="v2d" type="ieee_double" count="2"/>'
        '<vector id="v16i8" type="int8" count="16"/><vector id="v8i16" type="int16" count="8"/>'
        '<vector id="v4i32" type="int32" count="4"/><vector id="v2i64" type="int64" count="2"/>'
        '<union id="vec128"><field name="v4_float" type="v4f"/><field name="v2_double" type="v2d"/>'
        '<field name="v16_int8" type="v16i8"/><field name="v8_int16" type="v8i16"/>'
        '<field name="v4_int32" type="v4i32"/><field name="v2_int64" type="v2i64"/>'
        '<field name="uint128" type="uint128"/></union>',
    ]
    regs = "".join(f'<reg name="{name}" bitsize="{bits}" type="{kind}" regnum="{i}"'
                   + (f' group="{group}"' if group else "") + "/>"
                   for i, (name, bits, kind, group) in enumerate(REGISTERS))
    return ('<?xml version="1.0"?><!DOCTYPE target SYSTEM "gdb-target.dtd"><target>'
            '<architecture>i386:x86-64</architecture><feature name="org.gnu.gdb.i386.core">'
            + "".join(types) + regs + "</feature></target>")


def parse_gdb_device(spec):
    """``-gdb`` device: ``tcp:[HOST]:PORT[,server][,nowait|wait=off][,nodelay]`` or ``none``
    -> (host, port), or None for ``none``."""
    def bad(reason):
        return ConfigError(f"-gdb {spec!r}: {reason}")

    if spec == "none":
        return None
    kind, sep, rest = spec.partition(":")
    if not sep or kind != "tcp":
        raise bad("expected tcp:[HOST]:PORT or none (only TCP is supported)")
    target, *options = rest.split(",")
    _, wait = parse_socket_options([o for o in options if o not in ("nodelay", "nodelay=on")], bad)
    if wait and any(o.startswith("wait") for o in options):
        raise bad("wait is not supported: the stub never holds the guest back waiting for gdb (use -S)")
    host, sep, port_text = target.rpartition(":")
    if not sep:
        raise bad("expected tcp:[HOST]:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port_text.isdigit():
        raise bad(f"bad port {port_text!r}")
    port = int(port_text)
    if port > 0xFFFF:
        raise bad(f"port {port} out of range 0..65535")
    return host or TCP_DEFAULT_HOST, port


def checksum(data):
    return sum(data) & 0xFF


def frame(payload):
    """A packet on the wire: ``$payload#xx`` with ``# $ } *`` escaped."""
    escaped = re.sub(rb"[#$}*]", lambda m: b"}" + bytes([m.group()[0] ^ 0x20]), payload)
    return b"$" + escaped + b"#%02x" % checksum(escaped)


def _unescape(data):
    return re.sub(rb"}(.)", lambda m: bytes([m.group(1)[0] ^ 0x20]), data, flags=re.DOTALL)


class Malformed(Exception):
    """A packet's arguments do not parse: the reply is E01, as gdbserver's."""


def _hex_int(text):
    if not re.fullmatch(r"[0-9a-fA-F]+", text):
        raise Malformed(text)
    return int(text, 16)


def _hex_bytes(text):
    if len(text) % 2 or not re.fullmatch(r"[0-9a-fA-F]*", text):
        raise Malformed(text)
    return bytes.fromhex(text)


class GdbStub:
    """A gdb remote stub for ``machine`` on ``spec`` (``-gdb`` syntax).

    ``human_command(line) -> text`` runs a monitor command (gdb's ``monitor ...``,
    packet qRcmd): the HMP dispatcher of frontend/qmp.py."""

    def __init__(self, machine, spec, human_command):
        self.machine = machine
        self.human_command = human_command
        self.spec = spec
        host, port = parse_gdb_device(spec)
        self.listener = listen_tcp(host, port, 1, lambda reason: EmuError(f"-gdb {spec!r}: {reason}"))
        self.address = self.listener.getsockname()[:2]
        self.client = None
        self.inbuf = bytearray()
        self.out = bytearray()
        self.last_packet = b""
        self.waiting = False  # the client resumed the guest and waits for a stop reply
        self.breakpoints = {}  # linear address -> "swbreak" or "hwbreak"
        self.client_features = set()
        self._flush_job = False
        machine.debug_listeners.append(self._on_debug_stop)
        machine.add_fd_handler(self.listener.fileno(), self._on_accept)

    # ------------------------------------------------------------------ connection
    def _on_accept(self):
        try:
            conn, _ = self.listener.accept()
        except OSError:  # the peer gave up already, or out of descriptors: next wakeup
            return
        conn.setblocking(False)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client = conn
        self.inbuf.clear()
        self.out.clear()
        self.waiting = False
        self.client_features = set()
        # one client at a time: the next one waits in the backlog until this one leaves
        self.machine.remove_fd_handler(self.listener.fileno())
        self.machine.add_fd_handler(conn.fileno(), self._on_readable)
        self.machine.pause()  # as QEMU: a debugger that connects finds the guest stopped

    def _drop_client(self):
        """The client left (or is dropped): its breakpoints go, the guest stays as it is."""
        if self.client is None:
            return
        self.machine.remove_fd_handler(self.client.fileno())
        try:
            self.client.close()
        except OSError:
            pass
        self.client = None
        self.waiting = False
        self._clear_debug_state()
        if self.listener.fileno() >= 0:
            self.machine.add_fd_handler(self.listener.fileno(), self._on_accept)

    def _clear_debug_state(self):
        self.machine.cpu.remove_debug_hooks()
        self.machine.single_step = False
        self.breakpoints.clear()

    def close(self, exit_status=None):
        """At the end of the run: a waiting client hears that the guest ended (``W``)."""
        if self.client is not None and exit_status is not None:
            self._send(b"W%02x" % (exit_status & 0xFF))
            self._flush()
        if self._on_debug_stop in self.machine.debug_listeners:
            self.machine.debug_listeners.remove(self._on_debug_stop)
        if self.client is not None:
            self.machine.remove_fd_handler(self.client.fileno())
            self.client.close()
            self.client = None
        if self.listener.fileno() >= 0:
            self.machine.remove_fd_handler(self.listener.fileno())
            self.listener.close()

    def _on_readable(self):
        try:
            data = self.client.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop_client()
            return
        self.inbuf += data
        self._process_input()

    def _process_input(self):
        buf = self.inbuf
        while buf and self.client is not None:
            c = buf[0]
            if c == 0x03:  # Ctrl-C: interrupt the running guest
                del buf[0]
                self._interrupt()
            elif c == ord("+"):
                del buf[0]
            elif c == ord("-"):  # the client wants the last packet again
                del buf[0]
                if self.last_packet:
                    self._write(self.last_packet)
            elif c == ord("$"):
                end = buf.find(b"#")
                if end < 0 or len(buf) < end + 3:
                    if len(buf) > MAX_INPUT:
                        self._drop_client()
                    return
                payload, given = bytes(buf[1:end]), bytes(buf[end + 1:end + 3])
                del buf[:end + 3]
                try:
                    ok = int(given, 16) == checksum(payload)
                except ValueError:
                    ok = False
                if not ok:
                    self._write(b"-")
                    continue
                self._write(b"+")
                self._handle(payload)
            else:  # noise between packets
                del buf[0]

    # ------------------------------------------------------------------ output
    def _write(self, data):
        if self.client is None:
            return
        self.out += data
        self._flush()
        if self.out and self.client is not None:
            if len(self.out) > MAX_OUTPUT:
                self._drop_client()
            elif not self._flush_job:
                self._flush_job = True
                self.machine.add_background_job(self._flush_later)

    def _flush(self):
        while self.out and self.client is not None:
            try:
                sent = self.client.send(self.out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.out.clear()
                self._drop_client()
                return
            del self.out[:sent]

    def _flush_later(self):
        self._flush()
        if not self.out or self.client is None:
            self._flush_job = False
            self.machine.remove_background_job(self._flush_later)

    def _send(self, payload):
        if isinstance(payload, str):
            payload = payload.encode()
        self.last_packet = frame(payload)
        self._write(self.last_packet)

    # ------------------------------------------------------------------ stops
    def _interrupt(self):
        machine = self.machine
        if machine.status != "running":
            return  # stopped already: nothing to interrupt
        machine.single_step = False
        machine.pause()  # as QEMU: Ctrl-C leaves the VM "paused"
        self.waiting = False
        self._send(f"T{SIGINT:02x}{THREAD}")

    def _on_debug_stop(self, stop):
        if self.client is None or not self.waiting:
            return
        self.waiting = False
        if stop.kind in ("watch", "rwatch", "awatch"):
            self._send(f"T{SIGTRAP:02x}{THREAD}{stop.kind}:{stop.address:016x};")  # QEMU pads to 16 digits
            return
        why = ""
        if stop.kind == "breakpoint":
            kind = self.breakpoints.get(stop.address)
            if kind in self.client_features:
                why = f"{kind}:;"
        self._send(f"T{SIGTRAP:02x}{why}{THREAD}")

    def _resume(self, step):
        machine = self.machine
        if machine.status not in ("paused", "prelaunch", "debug", "running"):
            return E_INVALID  # e.g. an incoming migration: not ours to start
        machine.single_step = step
        self.waiting = True
        machine.resume()
        return None

    # ------------------------------------------------------------------ packets
    def _handle(self, payload):
        try:
            text = payload.decode("latin-1")
            reply = self._dispatch(text, payload)
        except Malformed:
            reply = E_MALFORMED
        if reply is not None:
            self._send(reply)

    def _dispatch(self, text, payload):
        """The reply to one packet ("" for one we do not know; None: no reply now)."""
        handler = {
            "?": self._stop_reason, "c": self._continue, "C": self._continue, "s": self._continue,
            "S": self._continue, "g": self._read_registers, "G": self._write_registers, "p": self._read_one,
            "P": self._write_one, "m": self._read_memory, "M": self._write_memory, "X": self._write_memory,
            "Z": self._breakpoint, "z": self._breakpoint, "H": self._select_thread, "T": self._thread_alive,
            "k": self._kill, "D": self._detach, "q": self._query, "v": self._v_packet,
        }.get(text[:1])
        return "" if handler is None else handler(text, payload)

    def _stop_reason(self, text, payload):
        return f"T{SIGTRAP:02x}{THREAD}"

    def _continue(self, text, payload):
        """``c``/``s`` [ADDR], ``C``/``S`` SIG[;ADDR] (a machine has no signal to deliver)."""
        head, args = text[0], text[1:]
        if head in ("C", "S"):
            args = args.partition(";")[2]
        if args:
            self.machine.cpu.set_reg("rip", _hex_int(args))
        return self._resume(step=head in ("s", "S"))

    def _read_registers(self, text, payload):
        return "".join(self._read_register(i).hex() for i in range(len(REGISTERS)))

    def _write_registers(self, text, payload):
        data = _hex_bytes(text[1:])
        sizes = [bits // 8 for _, bits, *_ in REGISTERS]
        if len(data) != sum(sizes):
            raise Malformed(text)
        pos = 0
        for number, size in enumerate(sizes):
            reply = self._write_register(number, data[pos:pos + size])
            if reply != "OK":
                return reply
            pos += size
        return "OK"

    def _read_one(self, text, payload):
        number = _hex_int(text[1:])
        return self._read_register(number).hex() if number < len(REGISTERS) else E_FAULT

    def _write_one(self, text, payload):
        number_text, sep, value = text[1:].partition("=")
        if not sep:
            raise Malformed(text)
        number = _hex_int(number_text)
        if number >= len(REGISTERS):
            return E_FAULT
        return self._write_register(number, _hex_bytes(value))

    def _read_memory(self, text, payload):
        address, length = self._address_length(text[1:])
        if length > MAX_MEMORY_READ:
            return E_INVALID
        try:
            return self.machine.cpu.read_debug(address, length).hex()
        except (Fault, EmuError):
            return E_FAULT

    def _write_memory(self, text, payload):
        """``M ADDR,LEN:HEX`` or ``X ADDR,LEN:BINARY`` (escaped with ``}``)."""
        spec, sep, data = text[1:].partition(":")
        if not sep:
            raise Malformed(text)
        address, length = self._address_length(spec)
        data = _hex_bytes(data) if text[0] == "M" else _unescape(payload[payload.index(b":") + 1:])
        if len(data) != length:
            raise Malformed(text)
        try:
            self.machine.cpu.write_debug(address, data)
        except (Fault, EmuError):
            return E_FAULT
        return "OK"

    def _select_thread(self, text, payload):
        return "OK"  # one CPU, one thread

    def _thread_alive(self, text, payload):
        return "OK" if text[1:] in ("1", "01", "-1", "0") else E_INVALID

    @staticmethod
    def _address_length(spec):
        address, sep, length = spec.partition(",")
        if not sep:
            raise Malformed(spec)
        return _hex_int(address), _hex_int(length)

    def _query(self, text, payload):
        name, _, args = text.partition(":")
        if name == "qSupported":
            self.client_features = {f[:-1] for f in args.split(";") if f.endswith("+")}
            return f"PacketSize={PACKET_SIZE:x};qXfer:features:read+;swbreak+;hwbreak+;vContSupported+"
        if name == "qXfer" and args.startswith("features:read:"):
            annex, _, where = args[len("features:read:"):].partition(":")
            offset, length = self._address_length(where)
            if annex != "target.xml":
                return "E00"  # gdbserver: no such annex
            data = target_xml().encode()
            chunk = data[offset:offset + min(length, PACKET_SIZE - 16)]
            return (b"l" if offset + len(chunk) >= len(data) else b"m") + chunk
        if text == "qAttached":
            return "1"
        if text == "qC":
            return "QC1"
        if text == "qfThreadInfo":
            return "m1"
        if text == "qsThreadInfo":
            return "l"
        if name.startswith("qRcmd,"):
            return self._monitor_command(_hex_bytes(text[len("qRcmd,"):]).decode("utf-8", "replace"))
        return ""

    def _v_packet(self, text, payload):
        if text == "vCont?":
            return "vCont;c;C;s;S"
        if text.startswith("vCont;"):
            actions = [a.partition(":")[0] for a in text[len("vCont;"):].split(";")]
            if not actions or any(a[:1] not in ("c", "C", "s", "S") for a in actions):
                raise Malformed(text)
            return self._resume(step=any(a[:1] in ("s", "S") for a in actions))
        if text.startswith("vKill"):
            self._send("OK")
            return self._kill(text, payload)
        return ""

    def _monitor_command(self, line):
        """gdb's ``monitor LINE``: the HMP command's output as O packets, then OK."""
        output = self.human_command(line).replace("\r\n", "\n").replace("\n", "\r\n").encode()
        step = (PACKET_SIZE - 16) // 2
        for i in range(0, len(output), step):
            self._send(b"O" + output[i:i + step].hex().encode())
        return "OK"

    def _kill(self, text, payload):
        """``k``: the emulator ends, as QEMU does ("Terminated via GDBstub", status 0); no reply."""
        self.machine.request_exit(0, "Terminated via GDBstub")
        self.waiting = False
        return None

    def _detach(self, text, payload):
        """``D``: breakpoints go and the guest runs on (QEMU's gdb_continue)."""
        self._clear_debug_state()
        self.waiting = False
        self.machine.resume()
        return "OK"

    def _breakpoint(self, text, payload):
        """``Z``/``z`` TYPE,ADDR,KIND: 0 software and 1 hardware breakpoints (both code hooks),
        2/3/4 write/read/access watchpoints of KIND bytes."""
        insert, args = text[0] == "Z", text[1:]
        parts = args.split(",")
        if len(parts) < 3:
            raise Malformed(args)
        kind_text, address, length = parts[0], _hex_int(parts[1]), _hex_int(parts[2].partition(";")[0])
        cpu = self.machine.cpu
        if kind_text in ("0", "1"):
            if insert:
                cpu.add_breakpoint(address)
                self.breakpoints[address] = "swbreak" if kind_text == "0" else "hwbreak"
            else:
                cpu.remove_breakpoint(address)
                self.breakpoints.pop(address, None)
            return "OK"
        watch = {"2": "watch", "3": "rwatch", "4": "awatch"}.get(kind_text)
        if watch is None:
            return ""  # not a kind we know: unsupported, as gdbserver says
        if length == 0:
            return E_INVALID
        if insert:
            cpu.add_watchpoint(watch, address, length)
        else:
            cpu.remove_watchpoint(watch, address, length)
        return "OK"

    # ------------------------------------------------------------------ registers
    def _read_register(self, number):
        name, bits, *_ = REGISTERS[number]
        cpu = self.machine.cpu
        if name in ("cs", "ss", "ds", "es", "fs", "gs"):
            value = cpu.context().segment(name)[0]
        elif name == "eflags":
            value = cpu.eflags
        elif name == "efer":
            value = cpu.msr(MSR_EFER)
        elif name == "k_gs_base":
            value = cpu.msr(MSR_KERNEL_GS_BASE)
        elif name.startswith("st"):
            mantissa, exponent = cpu.reg(f"fp{name[2:]}")
            return struct.pack("<QH", mantissa, exponent)
        elif name in ("fiseg", "fioff", "foseg", "fooff", "fop"):
            value = 0  # the engine keeps no x87 instruction and operand pointers
        else:
            value = cpu.reg(_ENGINE_NAMES.get(name, name))
        return (value & ((1 << bits) - 1)).to_bytes(bits // 8, "little")

    def _write_register(self, number, data):
        name, bits, *_ = REGISTERS[number]
        if len(data) != bits // 8:
            raise Malformed(name)
        cpu = self.machine.cpu
        value = int.from_bytes(data, "little")
        if name in ("cs", "ss", "ds", "es", "fs", "gs"):
            selector = value & 0xFFFF
            if cpu.context().segment(name)[0] != selector:
                try:
                    cpu.load_segment_register(name, selector)
                except Fault:
                    return E_FAULT
        elif name == "efer":
            cpu.set_msr(MSR_EFER, value)
        elif name == "k_gs_base":
            cpu.set_msr(MSR_KERNEL_GS_BASE, value)
        elif name.startswith("st"):
            cpu.set_reg(f"fp{name[2:]}", (value & (2**64 - 1), value >> 64))
        elif name in ("fiseg", "fioff", "foseg", "fooff", "fop"):
            pass  # not kept by the engine (read as 0)
        else:
            cpu.set_reg(_ENGINE_NAMES.get(name, name), value)
        return "OK"


_ENGINE_NAMES = {"fctrl": "fpcw", "fstat": "fpsw", "ftag": "fptag"}  # gdb's x87 names -> Unicorn's

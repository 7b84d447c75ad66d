"""Print the golden state schema of machine ``pc`` as JSON (QEMU's vmstate-static-checker idea).

    python tests/dump_vmstate_schema.py > tests/vmstate_schema.json

The output has the stream format version, the section ids of a ``pc`` machine with every
optional device present (two UARTs, the local APIC, a virtio NIC and disk) mapped to the name of their state
description, and each description's ``schema()`` once, keyed by its name (the two 8259s
share ``i8259``, the two UARTs ``uart16550``).  ``tests/test_vmstate_schema.py`` compares
the live descriptions with this file and says when regenerating it is the right answer.
"""

import json
import pathlib
import socket
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from emu.state import stream  # noqa: E402
from emu.cpu.state import VMSTATE as CPU_VMSTATE  # noqa: E402
from emu.state.machinestate import CLOCK_VMSTATE, state_objects  # noqa: E402
from machines import pc  # noqa: E402

INLINE_WIDTH = 100


def build_machine():
    """A ``pc`` with every optional device: two serial ports, the local APIC, virtio-net (on a
    socket netdev nobody connects to) and virtio-blk (on a scratch raw image)."""
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as probe:
        image = pathlib.Path(tmp) / "disk.img"
        image.write_bytes(bytes(1 << 20))
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        machine = pc.build(ram_size=4 << 20, serial=["null", "null"], icount_shift=0, no_reboot=True, lapic=True,
                           netdevs=[f"socket,id=n0,listen=127.0.0.1:{port}"], devices=["virtio-net-pci,netdev=n0"],
                           drives=[f"file={image},format=raw,if=virtio"])
        machine.close()
        return machine


def machine_sections(machine):
    """(section id, description) in the order a stream carries them."""
    return ([("cpu", CPU_VMSTATE), ("clock", CLOCK_VMSTATE)]
            + [(name, obj.VMSTATE) for name, obj in state_objects(machine)])


def build_schema(machine=None):
    machine = machine or build_machine()
    sections, descriptions = {}, {}
    for section_id, description in machine_sections(machine):
        schema = description.schema()
        if descriptions.setdefault(description.name, schema) != schema:
            raise ValueError(f"two different state descriptions are named {description.name!r}")
        sections[section_id] = description.name
    return {
        "machine": machine.machine_type,
        "format_version": stream.FORMAT_VERSION,
        "sections": sections,
        "descriptions": descriptions,
    }


def render(value, indent=0):
    """JSON with one field per line: small flat objects stay on one line."""
    flat = json.dumps(value)
    scalar = not isinstance(value, (dict, list)) or all(not isinstance(v, (dict, list)) for v in
                                                        (value.values() if isinstance(value, dict) else value))
    if scalar and len(flat) + indent <= INLINE_WIDTH:
        return flat
    pad, inner = " " * indent, " " * (indent + 2)
    if isinstance(value, dict):
        items = [f"{inner}{json.dumps(k)}: {render(v, indent + 2)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}" if items else "{}"
    items = [f"{inner}{render(v, indent + 2)}" for v in value]
    return "[\n" + ",\n".join(items) + f"\n{pad}]" if items else "[]"


def main(out=sys.stdout):
    out.write(render(build_schema()) + "\n")


if __name__ == "__main__":
    main()

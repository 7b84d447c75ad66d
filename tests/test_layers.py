"""The layers, checked from the import graph of the source (ast, nothing is imported).

    emu (core)  <-  machines (boards)  <-  colo (replication)  <-  frontend (command line, monitor)

Each layer imports only the layers to its left; inside the project no two modules import
each other at module level, directly or around a cycle.  Of the core, ``colo`` sees only
the replication surface (``emu.replication``), the errors and the character backends it
builds on: never the state stream, the devices or the CPU.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
LAYERS = ["emu", "machines", "colo", "frontend"]
#: ``python -m emu`` is the program's entry point: nothing imports it, and it reaches the top
ENTRY_POINTS = {"emu.__main__"}
#: All that colo may import of emu: its errors, the character and network backends (a COLO
#: link is one, the servers listen as chardev does, the network endpoint's wire is a netdev),
#: and the machine's replication surface.
COLO_SEES_OF_EMU = {"emu", "emu.errors", "emu.chardev", "emu.netdev", "emu.replication"}


def _module_name(path):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules():
    found = {}
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            found[_module_name(path)] = path
    return found


def _imports(name, path):
    """(imported module, at module level?) for every import statement of a module."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, id(node) in top_level
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            yield target, id(node) in top_level
            for alias in node.names:  # "from pkg import module"
                yield f"{target}.{alias.name}", id(node) in top_level


MODULES = _modules()
GRAPH = {name: list(_imports(name, path)) for name, path in MODULES.items()}


def _layer(module):
    return module.split(".")[0]


@pytest.mark.parametrize("layer", LAYERS)
def test_a_layer_imports_only_the_layers_below_it(layer):
    allowed = set(LAYERS[:LAYERS.index(layer) + 1])
    wrong = sorted({f"{name} imports {target}" for name, imports in GRAPH.items() if _layer(name) == layer
                    and name not in ENTRY_POINTS for target, _ in imports
                    if _layer(target) in LAYERS and _layer(target) not in allowed})
    assert not wrong, "\n".join(wrong)


def test_colo_imports_of_emu_only_the_replication_surface():
    wrong = sorted({f"{name} imports {target}" for name, imports in GRAPH.items() if _layer(name) == "colo"
                    for target, _ in imports if _layer(target) == "emu" and target not in COLO_SEES_OF_EMU
                    and not target.startswith(tuple(f"{m}." for m in COLO_SEES_OF_EMU - {"emu"}))})
    assert not wrong, "\n".join(wrong)


def _surface_members():
    from emu import replication

    members = set()
    for base in replication.ReplicationSurface.__mro__:
        if base.__module__ == replication.__name__:
            members |= set(base.__dict__.get("__annotations__", {}))
            members |= {name for name, value in base.__dict__.items() if callable(value) and not name.startswith("_")}
    return members


def _machine_uses(path):
    """(line, attribute) for every ``machine.X`` / ``self.machine.X`` in a module."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Attribute):
            continue
        owner = node.value
        if (isinstance(owner, ast.Name) and owner.id == "machine") or (
                isinstance(owner, ast.Attribute) and owner.attr == "machine"
                and isinstance(owner.value, ast.Name) and owner.value.id == "self"):
            yield node.lineno, node.attr


def test_colo_uses_a_machine_only_through_the_replication_surface():
    from emu.replication import ReplicationSurface
    from machines import pc

    members = _surface_members()
    uses = [(name, line, attr) for name in MODULES if _layer(name) == "colo"
            for line, attr in _machine_uses(MODULES[name])]
    assert len(uses) > 50, "the check must see colo's uses of a machine"
    wrong = sorted(f"{MODULES[name].relative_to(ROOT)}:{line} uses machine.{attr}" for name, line, attr in uses
                   if attr not in members)
    assert not wrong, "\n".join(wrong)
    assert isinstance(pc.build(ram_size=1 << 20, serial=["null"]), ReplicationSurface)


def test_no_import_cycle_at_module_level():
    edges = {name: sorted({target for target, top in imports if top and target in MODULES and target != name})
             for name, imports in GRAPH.items()}
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in edges[node]:
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "\n".join(cycles)


def test_the_graph_sees_the_imports_it_checks():
    """The checks above are only as good as the graph: it must contain known edges."""
    assert any(target == "emu.cpu.x86" for target, _ in GRAPH["emu.machine"])
    assert any(target == "colo.link" for target, _ in GRAPH["frontend.cli"])
    assert any(_layer(target) == "emu" for target, _ in GRAPH["machines.pc"])

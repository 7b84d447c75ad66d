"""The golden state schema (QEMU's vmstate-static-checker idea).

``tests/vmstate_schema.json`` records, for machine ``pc``, every section id and the schema
of every state description.  A saved stream must stay loadable by the next build, so a
description may change only in ways an old stream can still be decoded: new fields with
``since`` above the old ``version_id`` (and ``version_id`` raised), or new subsections.
:func:`schema_problems` tells an incompatible change (fix the code: bump ``version_id`` or
use a subsection) from a compatible one (regenerate the golden file).
"""

import copy
import io
import json
import pathlib

import dump_vmstate_schema
import pytest

GOLDEN_PATH = pathlib.Path(__file__).with_name("vmstate_schema.json")
REGENERATE = "python tests/dump_vmstate_schema.py > tests/vmstate_schema.json"

#: device name -> why the device has no state of its own in the stream
KNOWN_STATELESS = {
    "elcr@0x4d0": "ports 0x4d0/0x4d1 only forward to the two 8259s: the ELCR bits are the i8259 field 'elcr'",
    "i8042@0x64": "port 0x64 only forwards to the controller at 0x60, which saves the state",
}


def _field_text(field):
    extra = ", ".join(f"{k}={v}" for k, v in field.items() if k not in ("name", "kind", "since"))
    return f"{field['name']} ({field['kind']}{', ' + extra if extra else ''}, since {field['since']})"


def _field_changes(old_fields, new_fields):
    """Readable differences between two field lists (as decoded in stream order)."""
    old_by_name = {f["name"]: f for f in old_fields}
    new_by_name = {f["name"]: f for f in new_fields}
    changes = [f"field {_field_text(f)} removed or renamed" for f in old_fields if f["name"] not in new_by_name]
    changes += [f"field {_field_text(f)} added" for f in new_fields if f["name"] not in old_by_name]
    changes += [f"field {_field_text(old_by_name[n])} is now {_field_text(f)}" for n, f in new_by_name.items()
                if n in old_by_name and old_by_name[n] != f]
    if not changes:
        changes.append(f"fields reordered: {[f['name'] for f in old_fields]} -> {[f['name'] for f in new_fields]}")
    return changes


def description_problems(old, new, path=None):
    """(incompatible, compatible) changes from the golden description ``old`` to ``new``.

    Incompatible: a stream saved with ``old`` can no longer be decoded with ``new``.
    Compatible: it can, but the golden file no longer describes the code."""
    path = path or old["name"]
    incompatible, compatible = [], []
    v_old, v_new = old["version_id"], new["version_id"]
    if v_new < v_old:
        incompatible.append(f"{path}: version_id went down from {v_old} to {v_new}: streams saved at version "
                            f"{v_old} are refused as newer than supported")
    elif v_new > v_old:
        compatible.append(f"{path}: version_id {v_old} -> {v_new}")
    if new["minimum_version_id"] > old["minimum_version_id"]:
        incompatible.append(f"{path}: minimum_version_id raised from {old['minimum_version_id']} to "
                            f"{new['minimum_version_id']}: streams of version {old['minimum_version_id']}.."
                            f"{new['minimum_version_id'] - 1} are refused (if dropping them is intended, regenerate "
                            f"the golden file)")
    elif new["minimum_version_id"] < old["minimum_version_id"]:
        compatible.append(f"{path}: minimum_version_id lowered to {new['minimum_version_id']}")

    # what the new description decodes from a stream of the old version, field by field
    seen_by_old = [f for f in new["fields"] if f["since"] <= v_old]
    if seen_by_old != old["fields"]:
        changes = "; ".join(_field_changes(old["fields"], seen_by_old))
        if v_new == v_old:
            incompatible.append(
                f"{path}: fields changed at the same version_id {v_old} ({changes}): a stream saved before "
                f"would be decoded wrongly. Bump version_id to {v_old + 1} and give new fields since={v_old + 1}, "
                f"or carry the new state in a subsection with a needed() predicate")
        else:
            incompatible.append(
                f"{path}: version_id {v_old} -> {v_new}, but the fields a version {v_old} stream carries changed "
                f"({changes}): such streams can no longer be decoded. Keep the old fields as they were and add "
                f"new ones with since={v_new}")
    elif new["fields"] != old["fields"]:
        added = [_field_text(f) for f in new["fields"] if f["since"] > v_old]
        compatible.append(f"{path}: fields added for version {v_new}: {', '.join(added)}")

    old_subs = {s["name"]: s for s in old["subsections"]}
    new_subs = {s["name"]: s for s in new["subsections"]}
    for name, sub in old_subs.items():
        if name not in new_subs:
            incompatible.append(f"{path}: subsection {name!r} removed: streams that carry it are refused "
                                f"(unknown subsection); keep its description and let needed() return False")
        else:
            inc, com = description_problems(sub, new_subs[name], f"{path}/subsection {name}")
            incompatible += inc
            compatible += com
    for name in new_subs:
        if name not in old_subs:
            compatible.append(f"{path}: subsection {name!r} added")
    return incompatible, compatible


def schema_problems(golden, live):
    """Every difference between the golden schema and the live one, as sentences that say
    what to do (an empty list when they agree)."""
    incompatible, compatible = [], []
    for key in ("machine", "format_version"):
        if golden[key] != live[key]:
            compatible.append(f"{key} {golden[key]!r} -> {live[key]!r}")
    old_sections, new_sections = golden["sections"], live["sections"]
    for section_id, name in old_sections.items():
        if section_id not in new_sections:
            incompatible.append(f"section {section_id!r} ({name}) is gone: every stream saved before carries it "
                                f"and is now refused (unknown section)")
        elif new_sections[section_id] != name:
            incompatible.append(f"section {section_id!r} is now described by {new_sections[section_id]!r}, "
                                f"not {name!r}: its old payloads cannot be decoded")
    for section_id, name in new_sections.items():
        if section_id not in old_sections:
            compatible.append(f"section {section_id!r} ({name}) added: note that streams saved before lack it "
                              f"and are refused")
    old_desc, new_desc = golden["descriptions"], live["descriptions"]
    for name, old in old_desc.items():
        if name in new_desc:
            inc, com = description_problems(old, new_desc[name])
            incompatible += inc
            compatible += com
        elif name in new_sections.values():
            incompatible.append(f"description {name!r} vanished but a section still uses it")
    for name in new_desc:
        if name not in old_desc:
            compatible.append(f"description {name!r} added")
    problems = [f"INCOMPATIBLE: {p}" for p in incompatible]
    if compatible and not incompatible:
        problems += [f"compatible change, regenerate the golden file ({REGENERATE}): {p}" for p in compatible]
    elif compatible:
        problems += [f"also changed (regenerate the golden file once the above is fixed): {p}" for p in compatible]
    return problems


@pytest.fixture(scope="module")
def golden():
    return json.loads(GOLDEN_PATH.read_text())


@pytest.fixture(scope="module")
def machine():
    return dump_vmstate_schema.build_machine()


@pytest.fixture(scope="module")
def live(machine):
    return dump_vmstate_schema.build_schema(machine)


def test_live_schema_matches_golden(golden, live):
    problems = schema_problems(golden, live)
    assert not problems, "state schema differs from tests/vmstate_schema.json:\n" + "\n".join(problems)


def test_golden_file_is_the_dump_script_output():
    out = io.StringIO()
    dump_vmstate_schema.main(out)
    assert out.getvalue() == GOLDEN_PATH.read_text(), f"regenerate it: {REGENERATE}"


def _all_descriptions(schema):
    for description in schema["descriptions"].values():
        stack = [description]
        while stack:
            d = stack.pop()
            yield d
            stack += d["subsections"]


def test_descriptions_are_self_consistent(live):
    for d in _all_descriptions(live):
        assert 1 <= d["minimum_version_id"] <= d["version_id"], d["name"]
        names = [f["name"] for f in d["fields"]]
        assert len(set(names)) == len(names), f"{d['name']}: duplicate field names"
        for f in d["fields"]:
            # the writer saves every field; a field the reader skips at version_id would be trailing bytes
            assert 1 <= f["since"] <= d["version_id"], f"{d['name']}.{f['name']}: since {f['since']}"
        subs = [s["name"] for s in d["subsections"]]
        assert len(set(subs)) == len(subs), f"{d['name']}: duplicate subsection names"
        assert all(len(s.encode()) < 256 for s in subs), "a subsection name is stored with a u8 length"


def test_every_device_is_saved_or_known_stateless(machine, live):
    names = {device.name for device in machine.devices}
    assert not set(KNOWN_STATELESS) - names, "KNOWN_STATELESS names a device the pc machine does not have"
    for device in machine.devices:
        objects = device.state_objects()
        if device.name in KNOWN_STATELESS:
            assert not objects, f"{device.name} is listed as stateless but saves {objects}"
            continue
        assert objects, (f"{device.name} ({type(device).__name__}) saves no state: give it a VMSTATE, or list it "
                         f"in KNOWN_STATELESS with the reason")
        for obj in objects:
            assert live["sections"].get(obj.name) == obj.VMSTATE.name
    # the ELCR claim: each 8259 carries its ELCR bits
    assert any(f["name"] == "elcr" for f in live["descriptions"]["i8259"]["fields"])


def test_pc_sections_are_cpu_clock_and_each_device(live):
    assert list(live["sections"])[:2] == ["cpu", "clock"]
    assert live["sections"]["serial@0x3f8"] == live["sections"]["serial@0x2f8"] == "uart16550"
    assert live["sections"]["pic@0x20"] == live["sections"]["pic@0xa0"] == "i8259"


# ---------------------------------------------------------------- the checker itself

def _desc(golden, name):
    return golden["descriptions"][name]


def _changed(golden, change):
    live = copy.deepcopy(golden)
    change(live)
    return schema_problems(golden, live)


def _one(problems, *needles):
    assert len(problems) >= 1, "the change went unnoticed"
    text = "\n".join(problems)
    for needle in needles:
        assert needle in text, f"{needle!r} not in:\n{text}"
    return text


def test_checker_identical_schema_has_no_problems(golden):
    assert schema_problems(golden, copy.deepcopy(golden)) == []


def test_checker_field_added_at_same_version(golden):
    def change(s):
        _desc(s, "i8254")["fields"].append({"name": "speaker", "kind": "u8", "since": 1})
    text = _one(_changed(golden, change), "INCOMPATIBLE", "i8254", "same version_id 1", "speaker", "added",
                "Bump version_id to 2", "subsection")
    assert "regenerate" not in text.split("\n")[0]


def test_checker_field_removed_or_renamed_at_same_version(golden):
    def remove(s):
        del _desc(s, "uart16550")["fields"][2]
    _one(_changed(golden, remove), "INCOMPATIBLE", "uart16550", "field ier", "removed or renamed", "Bump version_id")

    def rename(s):
        _desc(s, "port92")["fields"][0]["name"] = "port_a"
    _one(_changed(golden, rename), "INCOMPATIBLE", "port92", "outport", "removed or renamed", "port_a (u8")


def test_checker_field_type_changed_or_reordered(golden):
    def widen(s):
        _desc(s, "ioport80")["fields"][0]["kind"] = "u16"
    _one(_changed(golden, widen), "INCOMPATIBLE", "ioport80", "is now last_post_code (u16")

    def longer(s):
        _desc(s, "mc146818rtc")["fields"][0]["length"] = 256
    _one(_changed(golden, longer), "INCOMPATIBLE", "cmos (bytes, length=128", "length=256")

    def swap(s):
        f = _desc(s, "apic")["fields"]
        f[0], f[1] = f[1], f[0]
    _one(_changed(golden, swap), "INCOMPATIBLE", "apic", "reordered")


def test_checker_version_bump_with_new_field_asks_to_regenerate(golden):
    def change(s):
        d = _desc(s, "i8254")
        d["version_id"] = 2
        d["fields"].insert(3, {"name": "speaker", "kind": "u8", "since": 2})
    problems = _changed(golden, change)
    _one(problems, "compatible change, regenerate the golden file", REGENERATE, "speaker")
    assert not any("INCOMPATIBLE" in p for p in problems)


def test_checker_version_bump_that_breaks_old_fields(golden):
    def change(s):
        d = _desc(s, "i8254")
        d["version_id"] = 2
        del d["fields"][0]
        d["fields"].append({"name": "mode2", "kind": "u8", "since": 2})
    _one(_changed(golden, change), "INCOMPATIBLE", "version_id 1 -> 2", "mode", "can no longer be decoded")

    def unmarked(s):  # version bumped but the new field lacks since=2
        d = _desc(s, "port61")
        d["version_id"] = 2
        d["fields"].append({"name": "speaker", "kind": "u8", "since": 1})
    _one(_changed(golden, unmarked), "INCOMPATIBLE", "port61", "speaker", "since=2")


def test_checker_subsections(golden):
    def added(s):
        _desc(s, "uart16550")["subsections"].append(
            {"name": "uart16550/tx", "version_id": 1, "minimum_version_id": 1, "fields": [], "subsections": []})
    problems = _changed(golden, added)
    _one(problems, "regenerate", "subsection 'uart16550/tx' added")
    assert not any("INCOMPATIBLE" in p for p in problems)

    def removed(s):
        _desc(s, "fw_cfg")["subsections"].clear()
    _one(_changed(golden, removed), "INCOMPATIBLE", "subsection 'fw_cfg/dma' removed")

    def changed_inside(s):
        _desc(s, "fw_cfg")["subsections"][0]["fields"][0]["kind"] = "u32"
    _one(_changed(golden, changed_inside), "INCOMPATIBLE", "fw_cfg/subsection fw_cfg/dma", "dma_addr")


def test_checker_versions_and_sections(golden):
    def down(s):
        _desc(s, "cpu")["version_id"] = 0
    _one(_changed(golden, down), "INCOMPATIBLE", "cpu: version_id went down")

    def minimum(s):
        d = _desc(s, "clock")
        d["version_id"] = d["minimum_version_id"] = 2
        d["fields"].append({"name": "ticks", "kind": "u64", "since": 2})
    _one(_changed(golden, minimum), "INCOMPATIBLE", "minimum_version_id raised")

    def gone(s):
        del s["sections"]["port92"]
        del s["descriptions"]["port92"]
    _one(_changed(golden, gone), "INCOMPATIBLE", "section 'port92'", "is gone")

    def new_device(s):
        s["sections"]["hpet@0xfed00000"] = "hpet"
        s["descriptions"]["hpet"] = {"name": "hpet", "version_id": 1, "minimum_version_id": 1,
                                     "fields": [], "subsections": []}
    _one(_changed(golden, new_device), "regenerate", "section 'hpet@0xfed00000'", "description 'hpet' added")

    def redescribed(s):
        s["sections"]["post@0x80"] = "port92"
    _one(_changed(golden, redescribed), "INCOMPATIBLE", "post@0x80")

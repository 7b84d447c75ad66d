"""Per-checkpoint records: written while COLO runs, summarised and drawn afterwards.

A record is a dict (``CheckpointRecord.as_dict()``)::

    seq int, time float (s since the pair entered COLO), trigger str (periodic / output /
    mismatch / timeout / forced), status str (ok / abandoned / rejected / failed),
    pages int (dirty pages sent), ram_bytes int, device_bytes int, pause_ms float
    (stop to resume on this side), secondary_pause_ms float | None, phases {name: ms},
    disk_blocks int, disk_bytes int (optional: 0 in records made before disks were
    replicated), error str | None (optional)

Between them, in time order, the events of the VM's protection (``event_record``)::

    event str (one of EVENTS), time float (same clock), detail str | None

A process keeps one file across its pairs: a survivor's file goes on through its failover
and every re-protection, on one time axis.

``emu colo report FILE [-o OUT.png]`` prints a summary and draws pause times and dirty
pages per checkpoint.  matplotlib is imported only when drawing: a running VM imports this
module for :class:`RecordWriter` and should not pay for it.
"""

import argparse
import csv
import io
import json
import math
import os
import pathlib
import statistics
import sys
import time

from emu.errors import ConfigError

SUFFIXES = (".json", ".csv")
FIELDS = ("seq", "time", "trigger", "status", "pages", "ram_bytes", "device_bytes", "pause_ms",
          "secondary_pause_ms")
OPTIONAL_FIELDS = {"disk_blocks": 0, "disk_bytes": 0}  # name: value when a record lacks it
# failover: this side took over; secondary-lost: this primary lost its secondary;
# re-protecting: a migration into a new secondary began; protected: that pair formed;
# re-protection-failed: that migration ended without a pair
EVENTS = ("failover", "secondary-lost", "re-protecting", "protected", "re-protection-failed")
EVENT_COLUMNS = ("event", "detail")
# Primary phases, then the secondary's (colo/checkpoint.py).  A CSV header is written before
# the first record, so its columns are fixed: a phase not listed here goes to JSON only.
PHASES = ("request", "capture", "send", "received", "loaded", "receive", "apply", "debug-check")
CSV_COLUMNS = FIELDS + tuple(OPTIONAL_FIELDS) + ("error",) + tuple(f"phase_{p}" for p in PHASES) + EVENT_COLUMNS
TRIGGERS = ("periodic", "output", "mismatch", "timeout", "forced")
JSON_INTERVAL = 0.5  # s between rewrites of a JSON records file


def event_record(event, time_s, detail=None):
    """An event of the VM's protection, for :meth:`RecordWriter.write` (``time_s``: on the
    checkpoint records' clock)."""
    if event not in EVENTS:
        raise ValueError(f"unknown COLO event {event!r}")
    return {"event": event, "time": round(time_s, 6), "detail": detail}


def is_event(record):
    return "event" in record


def checkpoints(records):
    """The checkpoint records among ``records``, without the events between them."""
    return [r for r in records if not is_event(r)]


def _suffix(path):
    suffix = pathlib.Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise ConfigError(f"records file {str(path)!r}: unknown suffix {suffix or '(none)'!r} "
                          f"(expected {' or '.join(SUFFIXES)})")
    return suffix


class RecordWriter:
    """Writes checkpoint records as they come, so a crash loses little.

    ``.json``: the whole array, rewritten atomically (temporary file, then rename) at most
    every 0.5 s and on :meth:`close`, so a reader never sees half a file.  ``.csv``: one row
    appended and flushed per record."""

    def __init__(self, path, interval=JSON_INTERVAL):
        self.path = pathlib.Path(path)
        self.format = _suffix(self.path)[1:]
        self.interval = interval
        self.records = []
        self._written_at = -math.inf
        self._dirty = False
        self._file = None
        try:
            if self.format == "csv":
                self._file = open(self.path, "w", newline="", encoding="utf-8")
                self._csv = csv.DictWriter(self._file, CSV_COLUMNS, extrasaction="ignore")
                self._csv.writeheader()
                self._file.flush()
            else:
                self._rewrite()  # an empty array now: a bad path fails at start, not mid-run
        except OSError as e:
            raise ConfigError(f"records file {str(self.path)!r}: {e.strerror or e}") from None

    def write(self, record):
        """Add one record (a dict, or anything with ``as_dict()``)."""
        if hasattr(record, "as_dict"):
            record = record.as_dict()
        self.records.append(record)
        if self.format == "csv":
            self._csv.writerow(_csv_row(record))
            self._file.flush()
        else:
            self._dirty = True
            if time.monotonic() - self._written_at >= self.interval:
                self._rewrite()

    def flush(self):
        if self.format == "json" and self._dirty:
            self._rewrite()

    def close(self):
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _rewrite(self):
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.records, f, indent=1)
            f.write("\n")
        os.replace(tmp, self.path)
        self._written_at = time.monotonic()
        self._dirty = False


def _csv_row(record):
    if is_event(record):
        return {"time": record["time"], "event": record["event"], "detail": record.get("detail") or ""}
    row = {k: record.get(k) for k in FIELDS + tuple(OPTIONAL_FIELDS)}
    row["error"] = record.get("error")
    for name, ms in (record.get("phases") or {}).items():
        row[f"phase_{name}"] = ms
    return {k: "" if v is None else v for k, v in row.items()}


# --- reading ---------------------------------------------------------------------------

_TYPES = {"seq": int, "time": float, "trigger": str, "status": str, "pages": int, "ram_bytes": int,
          "device_bytes": int, "pause_ms": float, "secondary_pause_ms": float, "disk_blocks": int, "disk_bytes": int}


def _convert(where, key, value):
    """One field to its type; None (JSON null, empty CSV cell) only where it is optional."""
    kind = _TYPES[key]
    if value is None or value == "":
        if key == "secondary_pause_ms":
            return None
        raise ConfigError(f"{where}: {key} is empty")
    try:
        if kind is str:
            if not isinstance(value, str):
                raise ValueError
            return value
        if kind is int:
            if isinstance(value, float) or isinstance(value, bool):
                raise ValueError
            return int(value)
        if isinstance(value, bool):
            raise ValueError
        result = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {key} {value!r} is not {'a number' if kind is not str else 'text'}") from None
    if not math.isfinite(result):
        raise ConfigError(f"{where}: {key} {value!r} is not a finite number")
    return result


def _record(where, raw, phases):
    record = {k: _convert(where, k, raw[k]) for k in FIELDS}
    for k, default in OPTIONAL_FIELDS.items():
        record[k] = default if raw.get(k) in (None, "") else _convert(where, k, raw[k])
    record["phases"] = {}
    for name, ms in phases.items():
        if ms is None or ms == "":
            continue
        try:
            record["phases"][name] = float(ms)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: phase {name!r} {ms!r} is not a number") from None
    error = raw.get("error")
    record["error"] = error if error not in ("", None) else None
    return record


def _event(where, raw):
    event = raw.get("event")
    if event not in EVENTS:
        raise ConfigError(f"{where}: unknown event {event!r} (expected one of {', '.join(EVENTS)})")
    detail = raw.get("detail")
    return {"event": event, "time": _convert(where, "time", raw.get("time")),
            "detail": detail if detail not in ("", None) else None}


def load_records(path):
    """The records of a ``.json`` or ``.csv`` file written by :class:`RecordWriter`, in file
    order: checkpoint records and events (:func:`is_event`)."""
    path = pathlib.Path(path)
    suffix = _suffix(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:  # newline="": CSV quotes its own
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"records file {str(path)!r}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"records file {str(path)!r}: cannot read: {e}") from None
    return _load_json(path, text) if suffix == ".json" else _load_csv(path, text)


def _load_json(path, text):
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"records file {str(path)!r}: malformed JSON: {e}") from None
    if not isinstance(data, list):
        raise ConfigError(f"records file {str(path)!r}: expected a JSON array of records, "
                          f"found {type(data).__name__}")
    records = []
    for i, raw in enumerate(data):
        where = f"{path}: record {i}"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected an object, found {type(raw).__name__}")
        if "event" in raw:
            records.append(_event(where, raw))
            continue
        missing = [k for k in FIELDS if k not in raw]
        if missing:
            raise ConfigError(f"{where}: missing {', '.join(missing)}")
        phases = raw.get("phases") or {}
        if not isinstance(phases, dict):
            raise ConfigError(f"{where}: phases must be an object of name: ms")
        records.append(_record(where, raw, phases))
    return records


def _load_csv(path, text):
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames
    if not header:
        raise ConfigError(f"records file {str(path)!r}: empty (no CSV header)")
    missing = [k for k in FIELDS if k not in header]
    if missing:
        raise ConfigError(f"records file {str(path)!r}: CSV header lacks column(s) {', '.join(missing)}")
    records = []
    for row in reader:
        where = f"{path}: line {reader.line_num}"
        if None in row or any(v is None for v in row.values()):
            raise ConfigError(f"{where}: {len(header)} columns expected")
        if row.get("event"):
            records.append(_event(where, row))
            continue
        phases = {k[len("phase_"):]: v for k, v in row.items() if k.startswith("phase_")}
        records.append(_record(where, row, phases))
    return records


# --- summary ---------------------------------------------------------------------------

def _percentile(values, q):
    """Linear interpolation between the closest ranks (numpy's default), q in 0..100."""
    values = sorted(values)
    if not values:
        return None
    pos = (len(values) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def _stats(values):
    if not values:
        return {"median": None, "p90": None, "max": None}
    return {"median": statistics.median(values), "p90": _percentile(values, 90), "max": max(values)}


def summarize(records):
    """Counts over all records; pause and page figures over the checkpoints that completed
    (an abandoned one may not have paused at all); bytes over all (they were sent)."""
    events = [r for r in records if is_event(r)]
    records = checkpoints(records)
    ok = [r for r in records if r["status"] == "ok"]
    by_trigger, by_status = {}, {}
    for r in records:
        by_trigger[r["trigger"]] = by_trigger.get(r["trigger"], 0) + 1
        by_status[r["status"]] = by_status.get(r["status"], 0) + 1
    pages = [r["pages"] for r in ok]
    secondary = [r["secondary_pause_ms"] for r in ok if r.get("secondary_pause_ms") is not None]
    ram = sum(r["ram_bytes"] for r in records)
    device = sum(r["device_bytes"] for r in records)
    disk = sum(r.get("disk_bytes", 0) for r in records)
    blocks = [r.get("disk_blocks", 0) for r in ok]
    return {
        "count": len(records),
        "ok": len(ok),
        "by_trigger": by_trigger,
        "by_status": by_status,
        "pause_ms": _stats([r["pause_ms"] for r in ok]),
        "secondary_pause_ms": _stats(secondary),
        "pages": {"median": statistics.median(pages) if pages else None, "max": max(pages) if pages else None},
        "disk_blocks": {"median": statistics.median(blocks) if blocks else None, "max": max(blocks, default=None)},
        "bytes": {"total": ram + device + disk, "ram": ram, "device": device, "disk": disk},
        "duration_s": max((r["time"] for r in records + events), default=0.0),
        "events": [(e["time"], e["event"]) for e in events],
    }


def _dash(v):
    return "-" if v is None else v


def _ms(v):
    return "-" if v is None else f"{v:.2f}"


def _size(n):
    for unit in ("B", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def format_summary(s):
    """The summary as a short two-column table."""
    others = ", ".join(f"{k} {v}" for k, v in sorted(s["by_status"].items()) if k != "ok")
    triggers = ", ".join(f"{k} {v}" for k, v in sorted(s["by_trigger"].items())) or "-"
    p, sp = s["pause_ms"], s["secondary_pause_ms"]
    rows = [
        ("checkpoints", f"{s['count']} (ok {s['ok']}{', ' + others if others else ''}) "
                        f"over {s['duration_s']:.1f} s"),
        ("triggers", triggers),
        ("pause ms", f"median {_ms(p['median'])}  p90 {_ms(p['p90'])}  max {_ms(p['max'])}"),
        ("secondary ms", f"median {_ms(sp['median'])}  p90 {_ms(sp['p90'])}  max {_ms(sp['max'])}"),
        ("dirty pages", f"median {s['pages']['median'] if s['pages']['median'] is not None else '-'}  "
                        f"max {s['pages']['max'] if s['pages']['max'] is not None else '-'}"),
        ("disk blocks", f"median {_dash(s['disk_blocks']['median'])}  max {_dash(s['disk_blocks']['max'])}"),
        ("bytes sent", f"{_size(s['bytes']['total'])} (RAM {_size(s['bytes']['ram'])}, "
                       f"devices {_size(s['bytes']['device'])}, disks {_size(s['bytes']['disk'])})"),
        ("events", ", ".join(f"{name} at {t:.1f} s" for t, name in s["events"]) or "-"),
    ]
    return "\n".join(f"{name:<13} {value}" for name, value in rows)


# --- drawing ---------------------------------------------------------------------------

_MARKERS = {"periodic": ("o", "tab:blue"), "output": ("s", "tab:green"), "mismatch": ("D", "tab:red"),
            "timeout": ("^", "tab:orange"), "forced": ("v", "tab:purple")}


_EVENT_COLOURS = {"failover": "tab:red", "secondary-lost": "tab:orange", "re-protecting": "tab:olive",
                  "protected": "tab:green", "re-protection-failed": "black"}


def draw(records, out, title=None):
    """Pause time and dirty pages per checkpoint, two panels over one time axis, to a PNG;
    the protection's events as labelled vertical lines across both."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    s = summarize(records)
    events = [r for r in records if is_event(r)]
    records = checkpoints(records)
    fig = Figure(figsize=(10, 6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    pause_ax, pages_ax = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    triggers = [t for t in TRIGGERS if t in s["by_trigger"]] + sorted(set(s["by_trigger"]) - set(TRIGGERS))
    for trigger in triggers:
        rs = [r for r in records if r["trigger"] == trigger and r["status"] == "ok"]
        if rs:
            marker, colour = _MARKERS.get(trigger, ("o", "tab:gray"))
            pause_ax.scatter([r["time"] for r in rs], [r["pause_ms"] for r in rs], s=14, marker=marker,
                             color=colour, label=f"{trigger} ({len(rs)})")
    failed = [r for r in records if r["status"] != "ok"]
    if failed:
        pause_ax.scatter([r["time"] for r in failed], [r["pause_ms"] for r in failed], s=40, marker="x",
                         color="black", label=f"not ok ({len(failed)})")
    if s["pause_ms"]["median"] is not None:
        pause_ax.axhline(s["pause_ms"]["median"], color="gray", linestyle="--", linewidth=0.8, label="median")
    for name in [e for e in EVENTS if any(r["event"] == e for r in events)]:
        times = [r["time"] for r in events if r["event"] == name]
        for ax in (pause_ax, pages_ax):
            ax.vlines(times, 0, 1, transform=ax.get_xaxis_transform(), color=_EVENT_COLOURS[name],
                      linestyles="dashdot", linewidth=1.2, label=f"{name} ({len(times)})" if ax is pause_ax else None)
    pause_ax.set_ylabel("pause (ms)")
    pause_ax.set_ylim(bottom=0)
    pause_ax.grid(alpha=0.3)
    if records or events:
        pause_ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small", title="trigger / event")
    ok = [r for r in records if r["status"] == "ok"]
    pages_ax.vlines([r["time"] for r in ok], 0, [r["pages"] for r in ok], color="tab:blue", linewidth=1)
    pages_ax.plot([r["time"] for r in ok], [r["pages"] for r in ok], ".", color="tab:blue", markersize=3)
    pages_ax.set_ylabel("dirty pages")
    pages_ax.set_xlabel("time since COLO start (s)")
    pages_ax.set_ylim(bottom=0)
    pages_ax.grid(alpha=0.3)
    median = s["pause_ms"]["median"]
    fig.suptitle(title or f"COLO checkpoints: {s['count']} (ok {s['ok']}), median pause "
                          f"{'-' if median is None else f'{median:.2f}'} ms")
    fig.savefig(out, format="png")


def main(argv):
    """``emu colo report FILE [-o OUT.png]``: 0, or 1 with the problem on stderr."""
    p = argparse.ArgumentParser(prog="emu colo report", description="Summarise and draw COLO checkpoint records.")
    p.add_argument("file", help="records file (.json or .csv) written by a COLO run")
    p.add_argument("-o", "--output", metavar="OUT.png", help="PNG to draw (default: FILE with suffix .png)")
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return 0 if e.code == 0 else 1
    out = pathlib.Path(args.output) if args.output else pathlib.Path(args.file).with_suffix(".png")
    try:
        records = load_records(args.file)
        print(format_summary(summarize(records)))
        draw(records, out)
    except ConfigError as e:
        print(f"emu colo report: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"emu colo report: cannot write {str(out)!r}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"{'drawn':<13} {out}")
    return 0

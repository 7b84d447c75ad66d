"""Checkpoint records files, their summary and PNG report, and the live status line."""

import io
import json

import pytest

from colo import report
from colo.checkpoint import CheckpointRecord
from colo.status import StatusLine, format_status
from emu.errors import ConfigError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_records():
    """Ten ok checkpoints (pauses 1..10 ms, pages 100..1000) and one abandoned one."""
    triggers = ["periodic"] * 7 + ["output", "mismatch", "forced"]
    records = [{"seq": i + 1, "time": 0.2 * (i + 1), "trigger": triggers[i], "status": "ok",
                "pages": 100 * (i + 1), "ram_bytes": 4100 * 100 * (i + 1), "device_bytes": 20_000,
                "pause_ms": float(i + 1), "secondary_pause_ms": 0.5 * (i + 1),
                "disk_blocks": 3 * i, "disk_bytes": 3 * i * 4100 + 40,
                "phases": {"request": 0.25, "capture": 0.5, "send": 1.5, "received": 0.125, "loaded": 0.75},
                "error": None}
               for i in range(10)]
    records.append({"seq": 11, "time": 2.2, "trigger": "timeout", "status": "abandoned", "pages": 0,
                    "ram_bytes": 0, "device_bytes": 0, "pause_ms": 100.0, "secondary_pause_ms": None,
                    "disk_blocks": 0, "disk_bytes": 0,
                    "phases": {"request": 0.5}, "error": "secondary gave up: digest mismatch"})
    return records


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_writer_round_trip(tmp_path, suffix):
    path = tmp_path / f"records{suffix}"
    records = make_records()
    with report.RecordWriter(path) as writer:
        for r in records:
            writer.write(r)
    assert report.load_records(path) == records


def with_events():
    """make_records with a failover after checkpoint 5 and a re-protection after 8."""
    records = make_records()
    records.insert(5, report.event_record("failover", 1.1, "no heartbeat from the peer for 2000 ms (3.1 ms)"))
    records.insert(9, report.event_record("re-protecting", 1.7, "migrating into tcp:127.0.0.1:4444"))
    records.insert(10, report.event_record("protected", 1.75))
    return records


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_events_of_the_protection_go_between_the_records_and_come_back(tmp_path, suffix):
    path = tmp_path / f"records{suffix}"
    with report.RecordWriter(path) as writer:
        for r in with_events():
            writer.write(r)
    loaded = report.load_records(path)
    assert loaded == with_events()
    kept = report.checkpoints(loaded)
    assert kept == make_records() and not any(map(report.is_event, kept))
    s = report.summarize(loaded)
    assert s["count"] == 11 and s["ok"] == 10  # events are not checkpoints
    assert s["events"] == [(1.1, "failover"), (1.7, "re-protecting"), (1.75, "protected")]
    assert "events        failover at 1.1 s, re-protecting at 1.7 s, protected at 1.8 s" in report.format_summary(s)


def test_an_unknown_event_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="'crashed'"):
        report.event_record("crashed", 1.0)
    path = tmp_path / "run.json"
    path.write_text(json.dumps([{"event": "crashed", "time": 1.0}]))
    with pytest.raises(ConfigError, match=r"record 0: unknown event 'crashed'"):
        report.load_records(path)


def test_the_png_draws_each_event_as_a_line_across_both_panels(tmp_path):
    import matplotlib.image
    plain, marked = tmp_path / "plain.png", tmp_path / "marked.png"
    report.draw(make_records(), plain)
    report.draw(with_events(), marked)
    a, b = matplotlib.image.imread(plain)[..., :3], matplotlib.image.imread(marked)[..., :3]
    red = (b[..., 0] > 0.7) & (b[..., 1] < 0.3) & (b[..., 2] < 0.3)  # the failover's tab:red
    rows = red.any(axis=1)
    assert rows[:300].sum() > 100 and rows[350:].sum() > 60, "the failover line spans both panels"
    assert not ((a[..., 0] > 0.7) & (a[..., 1] < 0.3) & (a[..., 2] < 0.3)).any(axis=1)[350:].any()


def test_records_from_before_disk_replication_read_as_no_disk_blocks(tmp_path):
    path = tmp_path / "old.json"
    old = [{k: v for k, v in r.items() if not k.startswith("disk_")} for r in make_records()]
    path.write_text(json.dumps(old))
    assert [(r["disk_blocks"], r["disk_bytes"]) for r in report.load_records(path)] == [(0, 0)] * 11


def test_csv_is_appended_and_flushed_per_record(tmp_path):
    path = tmp_path / "records.csv"
    writer = report.RecordWriter(path)
    writer.write(make_records()[0])
    assert report.load_records(path) == make_records()[:1]  # readable before close
    writer.close()


def test_json_is_rewritten_whole_at_most_every_interval(tmp_path):
    path = tmp_path / "records.json"
    writer = report.RecordWriter(path, interval=3600)
    assert report.load_records(path) == []  # exists (and valid) from the start
    writer.write(make_records()[0])
    assert report.load_records(path) == []  # not yet: the interval has not passed
    writer.flush()
    assert report.load_records(path) == make_records()[:1]
    writer.close()
    assert not (tmp_path / "records.json.tmp").exists()

    eager = report.RecordWriter(path, interval=0)
    eager.write(make_records()[1])
    assert report.load_records(path) == make_records()[1:2]
    eager.close()


def test_writer_takes_checkpoint_records_of_both_sides(tmp_path):
    primary = CheckpointRecord(3, trigger="periodic", time=1.5, status="ok", pages=12, ram_bytes=49_296,
                               device_bytes=7000, pause_ms=2.5, secondary_pause_ms=1.25,
                               phases={"request": 0.5, "capture": 1.0, "send": 0.5, "received": 0.25, "loaded": 0.25})
    secondary = CheckpointRecord(3, status="ok", pages=12, pause_ms=1.25,
                                 phases={"receive": 0.5, "apply": 0.5, "debug-check": 0.25})
    for suffix in (".json", ".csv"):
        path = tmp_path / f"both{suffix}"
        with report.RecordWriter(path) as writer:
            writer.write(primary)
            writer.write(secondary)
        assert report.load_records(path) == [primary.as_dict(), secondary.as_dict()]


def test_summary_figures():
    s = report.summarize(make_records())
    assert s["count"] == 11 and s["ok"] == 10
    assert s["by_trigger"] == {"periodic": 7, "output": 1, "mismatch": 1, "forced": 1, "timeout": 1}
    assert s["by_status"] == {"ok": 10, "abandoned": 1}
    # the abandoned checkpoint's 100 ms is not a checkpoint pause
    assert s["pause_ms"] == {"median": 5.5, "p90": pytest.approx(9.1), "max": 10.0}
    assert s["secondary_pause_ms"]["median"] == 2.75
    assert s["pages"] == {"median": 550, "max": 1000}
    assert s["disk_blocks"] == {"median": 13.5, "max": 27}
    assert s["bytes"]["total"] == 4100 * 100 * 55 + 10 * 20_000 + 4100 * 3 * 45 + 400
    assert s["duration_s"] == 2.2


def test_summary_of_nothing():
    s = report.summarize([])
    assert s["count"] == 0 and s["pause_ms"]["median"] is None and s["bytes"]["total"] == 0
    assert "checkpoints   0" in report.format_summary(s)


def test_main_prints_summary_and_draws_png(tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(make_records()))
    assert report.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "checkpoints   11 (ok 10, abandoned 1)" in out
    assert "median 5.50  p90 9.10  max 10.00" in out
    png = tmp_path / "run.png"  # the default: FILE with suffix .png
    data = png.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 20_000  # axes, labels, markers: an empty canvas compresses to far less

    import matplotlib.image
    pixels = matplotlib.image.imread(png)
    assert pixels.shape[:2] == (600, 1000)
    assert (pixels[..., :3] < 0.5).any(axis=-1).mean() > 0.01  # ink on the page


def test_main_output_option_and_csv(tmp_path, capsys):
    path = tmp_path / "run.csv"
    with report.RecordWriter(path) as writer:
        for r in make_records():
            writer.write(r)
    out = tmp_path / "elsewhere" / "pic.png"
    out.parent.mkdir()
    assert report.main([str(path), "-o", str(out)]) == 0
    assert out.read_bytes().startswith(PNG_SIGNATURE)
    assert str(out) in capsys.readouterr().out


@pytest.mark.parametrize("name, content, problem", [
    ("missing.json", None, "no such file"),
    ("garbage.json", "{not json", "malformed JSON"),
    ("object.json", '{"seq": 1}', "expected a JSON array"),
    ("short.json", '[{"seq": 1, "time": 0.1}]', "record 0: missing trigger"),
    ("nocol.csv", "seq,time,trigger,status,pages,ram_bytes,device_bytes,pause_ms\n1,0.1,periodic,ok,3,0,0,1.0\n",
     "lacks column(s) secondary_pause_ms"),
    ("badnum.csv", ",".join(report.FIELDS) + "\n1,0.1,periodic,ok,many,0,0,1.0,\n", "pages 'many' is not a number"),
    ("records.txt", "whatever", "unknown suffix '.txt'"),
])
def test_main_bad_input(tmp_path, capsys, name, content, problem):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    assert report.main([str(path)]) == 1
    err = capsys.readouterr().err
    assert problem in err and name in err
    assert not path.with_suffix(".png").exists()


def test_writer_bad_suffix_and_path(tmp_path):
    with pytest.raises(ConfigError, match=r"records\.xml.*expected \.json or \.csv"):
        report.RecordWriter(tmp_path / "records.xml")
    with pytest.raises(ConfigError, match="no/such/dir/r.json"):
        report.RecordWriter(tmp_path / "no" / "such" / "dir" / "r.json")


def test_format_status():
    fields = {"role": "primary", "checkpoints": 42, "ok": 42, "last_pause_ms": 3.14, "median_pause_ms": 2.9,
              "dirty_pages": 310, "peer": "alive", "state": "serving"}
    assert format_status(fields) == ("COLO primary | checkpoints 42 (ok 42) | last pause 3.1 ms | median 2.9 ms | "
                                     "dirty 310 pages | peer alive | serving")
    assert format_status({"state": "failover", "role": "secondary", "lease_epoch": 3, "peer": None}) == \
        "COLO secondary | failover | lease epoch 3"


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_status_line_disabled_writes_nothing():
    pipe = io.StringIO()  # not a terminal: off by default
    line = StatusLine(pipe)
    assert not line.enabled
    line.update(role="primary", checkpoints=1, ok=1)
    line.close()
    assert pipe.getvalue() == ""

    term = FakeTerminal()
    line = StatusLine(term, enabled=False)
    line.update(role="primary", checkpoints=1, ok=1)
    line.close()
    assert term.getvalue() == ""


def test_status_line_on_a_terminal_shows_the_latest_fields():
    term = FakeTerminal()
    line = StatusLine(term, min_interval=3600)  # one redraw, then everything waits for close()
    assert line.enabled
    line.update(role="primary", checkpoints=1, ok=1)
    line.update(checkpoints=2, ok=2, peer="alive")
    assert "checkpoints 1 (ok 1)" in term.getvalue() and "checkpoints 2" not in term.getvalue()
    line.close()
    last = term.getvalue().split("\x1b[2K")[-1]  # the line as the final redraw left it
    assert last.startswith("COLO primary | checkpoints 2 (ok 2) | peer alive\n")

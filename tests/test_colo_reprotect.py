"""Re-protection: after a takeover the survivor accepts a new secondary without stopping
(a live migration into it with x-colo, as the pair first formed), and the pair survives
the next failure too.  Three failovers in a row, the client sees every answer once."""

import pytest
from colopair import Workload

from colo import report
from test_colo_failover import _run_until_dead, deploy  # noqa: F401  (deploy is a fixture)


@pytest.mark.parametrize("mode,arbiter", [("compare", True), ("passive", False)])
def test_three_failovers_in_a_row_with_reprotection_in_between(deploy, mode, arbiter):  # noqa: F811
    d = deploy(mode=mode, checkpoint_delay=40, arbiter=arbiter)
    d.wait_colo()
    w = Workload(d.client(), time_every=5)
    w.ready()
    for failover in range(3):
        for _ in range(15):
            w.step()
        survivor = d.secondary
        d.primary.kill()
        _run_until_dead(w, d.primary, steps_after=10)
        survivor.wait_for(r"serving alone from checkpoint \d+", timeout=30)
        assert survivor.alive()
        assert d.qmp("secondary")("query-colo-status")["protection"] == "unprotected"
        if failover < 2:
            d.reprotect()
            assert d.qmp("primary")("query-colo-status")["mode"] == "primary"
            assert d.qmp("primary")("query-colo-status")["protection"] == "protected"
            assert d.qmp("secondary")("query-colo-status")["mode"] == "secondary"
    for _ in range(10):
        w.step()
    w.finish()
    log = d.proxy.stderr()
    assert log.count("is the primary again") == 2, log
    assert log.count("accepted") >= 3, log
    # each survivor's records mark its failover and the re-protection it made, on one time axis
    for name, expected in [("secondary", ["failover", "re-protecting", "protected"]),
                           ("secondary1", ["failover", "re-protecting", "protected"]), ("secondary2", ["failover"])]:
        records = report.load_records(d.records[name])
        assert [r["event"] for r in records if report.is_event(r)] == expected, (name, records)
        events = [r["time"] for r in records if report.is_event(r)]
        assert events == sorted(events) and events[0] > 0, (name, events)
        after = records[[r.get("event") for r in records].index(expected[-1]) + 1:]
        assert all(r["time"] >= events[-1] for r in after), (name, records)  # one axis, not one per pair

"""The long fault campaign (``make soak``): hundreds of primaries killed at random points.

Each round starts a whole deployment, runs the checked client workload, SIGKILLs the
primary either at a random moment or at a random phase of a random checkpoint (the
primary kills itself there), and goes on against the former secondary.  Any lost,
repeated or wrong byte fails the round.  ``EMU_SOAK_KILLS`` sets the number of rounds.
"""

import os
import random
import statistics
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from colopair import ColoDeployment, Workload
from test_colo_failover import PHASES, _run_until_dead, _serving_checkpoint

ROUNDS = int(os.environ.get("EMU_SOAK_KILLS", "200"))


def _round(tmp_path, index, seed):
    rng = random.Random(seed)
    mode = rng.choice(["compare", "passive"])
    kill = "random" if rng.random() < 0.5 else f"{rng.choice(PHASES)}:{rng.randint(1, 6)}"
    args = [] if kill == "random" else ["--x-kill-at", kill]
    where = tmp_path / f"round{index}"
    where.mkdir()
    d = ColoDeployment(where, mode=mode, checkpoint_delay=rng.choice([20, 50, 100]), primary_args=args,
                       records=False)
    killer = None
    try:
        d.wait_colo()
        w = Workload(d.client(), time_every=rng.choice([0, 3, 7]))
        w.ready()
        if kill == "random":
            killer = threading.Timer(rng.uniform(0.05, 1.0), d.primary.kill)
            killer.start()
        _run_until_dead(w, d.primary, steps_after=5, limit=2000)
        checkpoint = _serving_checkpoint(d)
        return {"mode": mode, "kill": kill, "requests": w.sent, "checkpoint": checkpoint,
                "worst_gap_ms": max(w.gaps) * 1e3}
    except BaseException as e:
        raise AssertionError(f"round {index} ({mode}, kill {kill}, seed {seed}) failed: {e}\n{d.logs()}") from None
    finally:
        if killer is not None:
            killer.cancel()
        d.close()


@pytest.mark.soak
def test_fault_campaign_loses_and_repeats_nothing(tmp_path):
    seeds = random.Random(2026).sample(range(1 << 30), ROUNDS)
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda i: _round(tmp_path, i, seeds[i]), range(ROUNDS)))
    requests = sum(r["requests"] for r in results)
    gaps = sorted(r["worst_gap_ms"] for r in results)
    by_mode = {m: sum(r["mode"] == m for r in results) for m in ("compare", "passive")}
    phases = sum(r["kill"] != "random" for r in results)
    print(f"\nCOLO fault campaign: {ROUNDS} primaries killed ({phases} at a checkpoint phase, "
          f"{ROUNDS - phases} at random moments; {by_mode['compare']} compare, {by_mode['passive']} passive), "
          f"{requests} requests answered, 0 lost, 0 duplicated; worst client gap per round: "
          f"median {statistics.median(gaps):.0f} ms, max {gaps[-1]:.0f} ms")

"""The networked kill campaign (``make soak``): Linux serving HTTP on the pair, hundreds of
primaries killed, at random moments and at every checkpoint phase, in both modes.

Each round is ``test_linux_colo_net.primary_killed_round``: a fresh pair in a fresh
network namespace, each VM with its own ext4 image, curl downloading and a request loop
counting (each answer is also a record fsynced on the disk), the primary SIGKILLed; any
lost, repeated or wrong byte fails it, and so does a survivor's disk that lacks a record the
client was answered, or holds one twice.  ``EMU_SOAK_NET_KILLS`` sets the number of
rounds (200).
"""

import os
import random
import statistics
from concurrent.futures import ThreadPoolExecutor

import pytest
from test_colo_failover import PHASES
from test_linux_colo_net import netns, primary_killed_round  # noqa: F401  (netns is a fixture)

ROUNDS = int(os.environ.get("EMU_SOAK_NET_KILLS", "200"))


@pytest.mark.soak
def test_networked_fault_campaign_loses_and_repeats_nothing(debian_linux, tmp_path, netns):  # noqa: F811
    seeds = random.Random(2027).sample(range(1 << 30), ROUNDS)

    def one(index):
        rng = random.Random(seeds[index])
        mode = ("compare", "passive")[index % 2]
        kill = "random" if index % 4 < 2 else f"{PHASES[(index // 4) % len(PHASES)]}:{rng.randint(2, 8)}"
        where = tmp_path / f"round{index}"
        where.mkdir()
        try:
            return primary_killed_round(where, debian_linux, mode, kill, seeds[index])
        except BaseException as e:
            raise AssertionError(f"round {index} ({mode}, kill {kill}, seed {seeds[index]}) failed: {e}") from None

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(one, range(ROUNDS)))
    worst = sorted(r["worst_request_ms"] for r in results)
    phases = sum(r["kill"] != "random" for r in results)
    print(f"\nnetworked COLO fault campaign: {ROUNDS} primaries killed ({phases} at a checkpoint phase, "
          f"{ROUNDS - phases} at random moments, half in each mode), "
          f"{sum(r['requests'] for r in results)} HTTP requests answered, 0 lost, 0 duplicated, no reset, "
          f"every survivor's disk consistent; "
          f"longest request per round: median {statistics.median(worst):.0f} ms, max {worst[-1]:.0f} ms")

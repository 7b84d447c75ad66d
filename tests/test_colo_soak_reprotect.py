"""The re-protection kill campaign (``make soak``): one ``emu colo pair`` serving the
service firmware while its VMs are SIGKILLed, one after another, for hundreds of rounds.

Each round waits until the pair is protected, lets a random moment pass and kills the
primary or the secondary; one round in five also kills the new secondary during its
re-protection (the survivor's migration into it), which the supervisor must retry.  The
client sends requests the whole time and checks every answer: across every failover and
re-protection, nothing lost and nothing twice.  ``EMU_SOAK_REPROTECT_KILLS`` sets the
number of rounds (200).
"""

import os
import random
import re
import signal
import threading
import time

import pytest
from colopair import LineClient, Proc, Workload
from conftest import firmware

ROUNDS = int(os.environ.get("EMU_SOAK_REPROTECT_KILLS", "200"))


class PairLog:
    """What ``emu colo pair`` said: the VMs' pids, and the pair each time it was protected."""

    def __init__(self, proc):
        self.proc = proc

    def pids(self):
        return {node: int(pid) for node, pid in re.findall(r"started \w+ (vm-\d+) \(pid (\d+)\)", self.proc.stderr())}

    def protected(self):
        """(primary, secondary) of the pair now, or None while it is not protected."""
        text = self.proc.stderr()
        pairs = list(re.finditer(r"protected: primary (vm-\d+) -> secondary (vm-\d+)", text))
        lost = [m.start() for m in re.finditer(r"is gone|re-protection failed", text)]
        if not pairs or (lost and lost[-1] > pairs[-1].start()):
            return None
        return pairs[-1].group(1), pairs[-1].group(2)

    def gone(self):
        """How many deaths the supervisor has noticed (a VM gone, or a re-protection failed)."""
        return len(re.findall(r"is gone|re-protection failed", self.proc.stderr()))

    def wait(self, predicate, timeout, what):
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline or not self.proc.alive():
                raise AssertionError(f"{what}: not within {timeout} s:\n{self.proc.stderr()[-3000:]}")
            time.sleep(0.02)


def _kill(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.soak
def test_reprotection_campaign_loses_and_repeats_nothing(tmp_path):
    rng = random.Random(2028)
    proxy = Proc(tmp_path, "proxy", ["colo", "proxy", "--client", "tcp:127.0.0.1:0", "--listen", "tcp:127.0.0.1:0"])
    pair = None
    done, failure, kills = threading.Event(), [], {"primary": 0, "secondary": 0, "during re-protection": 0}
    try:
        m = proxy.wait_for(r"client on [\d.]+:(\d+), VMs on [\d.]+:(\d+)")
        client_port, vm_port = int(m.group(1)), int(m.group(2))
        pair = Proc(tmp_path, "pair", [
            "colo", "pair", "-kernel", firmware("service.elf"), "-m", "32M", "-no-reboot", "--no-status",
            "--proxy", f"tcp:127.0.0.1:{vm_port}", "--heartbeat-period", "50", "--heartbeat-timeout", "1000",
            "--checkpoint-delay", "40", "--dir", str(tmp_path / "vms"),
            "--max-backoff", "1"])  # its secondaries all die young: the campaign's rounds, not the backoff
        log = PairLog(pair)
        log.wait(log.protected, 60, "the pair forming")
        w = Workload(LineClient(client_port), time_every=5)
        w.ready()

        def killer():
            try:
                for k in range(ROUNDS):
                    log.wait(log.protected, 120, f"round {k}: protected again")
                    primary, secondary = log.protected()
                    time.sleep(rng.uniform(0.05, 0.6))
                    role = rng.choice(("primary", "secondary"))
                    before, gone = len(log.pids()), log.gone()
                    _kill(log.pids()[primary if role == "primary" else secondary])
                    kills[role] += 1
                    # the supervisor has seen it: the log no longer says the old pair is protected
                    log.wait(lambda gone=gone: log.gone() > gone, 30, f"round {k}: the kill seen")
                    if rng.random() < 0.2:  # and the new secondary, while the survivor migrates into it
                        log.wait(lambda before=before: len(log.pids()) > before, 60, f"round {k}: a new secondary")
                        newest = max(log.pids(), key=lambda node: int(node.split("-")[1]))
                        time.sleep(rng.uniform(0.0, 0.3))
                        gone = log.gone()
                        _kill(log.pids()[newest])
                        kills["during re-protection"] += 1
                        log.wait(lambda gone=gone: log.gone() > gone, 30, f"round {k}: the second kill seen")
                time.sleep(0.5)  # the last kill has been seen
                log.wait(log.protected, 120, "protected after the last round")
            except BaseException as e:
                failure.append(e)
            finally:
                done.set()

        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        while not done.is_set():
            w.step(timeout=60)
        thread.join()
        if failure:
            raise failure[0]
        for _ in range(20):
            w.step()
        w.finish()
        print(f"\nre-protection campaign: {ROUNDS} rounds, {kills['primary']} primaries and {kills['secondary']} "
              f"secondaries killed, {kills['during re-protection']} new secondaries killed during re-protection; "
              f"{w.sent} requests answered once each, 0 lost, 0 duplicated; longest answer "
              f"{max(w.gaps) * 1e3:.0f} ms")
    except BaseException:
        print(proxy.stderr()[-3000:])
        if pair is not None:
            print(pair.stderr()[-5000:])
        raise
    finally:
        done.set()
        if pair is not None:
            pair.kill(signal.SIGTERM)
            pair.proc.wait(30)
        proxy.kill()

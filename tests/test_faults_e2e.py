"""A federation that survives faults, with real processes (fedmri.deploy.topology): four
hospitals through the operators' commands, one secure run of six rounds, and during it

- hospital-4's data folder is empty: `fedmri client check` says so, its daemon reports it and
  keeps running, and each round goes on without it, naming the reason;
- round 2, once the hospitals have trained and their masked updates are on their way: the
  coordinator is stopped and started again; the hospitals reconnect, the run resumes after its
  last checkpointed round (1) in a new Flower run, no round is aggregated twice, and no
  hospital masks an update for round 2 again (for all it knows round 2 was unmasked: a second
  aggregate of the same updates could be differenced against the first), so round 2 is
  skipped with that reason and round 3 trains from the same model with another seed;
- round 4: hospital-2's daemon gets SIGTERM: it stops cleanly, leaves no partial file, and
  once started again it takes part in a later round;
- then, while hospital-2 trains again: hospital-1's SuperNode is SIGKILLed; its daemon
  restarts it (the SuperLink lets the same node in again once it has declared the old one
  lost, within about a minute); the round completes with the survivors or is skipped with a
  reason.

The steps wait for events, not for time: rounds take a few seconds here. What is lost: the
updates of the hospitals hit in the rounds they miss (a secure round with fewer than t
survivors is skipped, the model unchanged), and round 2, which the coordinator's stop
interrupted; nothing else.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from fedmri.deploy.topology import Hospital, LocalFederation, Topology, fedmri, ok, wait_for

pytestmark = pytest.mark.slow
HOSPITALS = ("hospital-1", "hospital-2", "hospital-3", "hospital-4")
EMPTY = "hospital-4"


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    root = tmp_path_factory.mktemp("faults")
    ok("synth", "--hospitals", "3", "--subjects", "2", "--seed", "4", "--out",
       str(root / "data"), "--quiet")
    (root / "data" / EMPTY).mkdir()
    topo = Topology("faults", tuple(Hospital(h, threads=1) for h in HOSPITALS))
    with LocalFederation(root, root / "data", topo) as federation:
        federation.up()
        yield federation


def _events(fed: LocalFederation) -> list[dict[str, Any]]:
    logs = sorted((fed.server / "runs").glob("*/events.jsonl"))
    return [json.loads(line) for line in logs[-1].read_text().splitlines()] if logs else []


def _daemon(fed: LocalFederation, hospital: str) -> dict[str, Any]:
    status: dict[str, Any] = json.loads((fed.home(hospital) / "status.json").read_text())
    return status


def test_an_empty_data_folder_is_reported_not_fatal(fed: LocalFederation) -> None:
    check = fedmri("client", "--home", str(fed.home(EMPTY)), "check", "--json")
    report = json.loads(check.stdout)
    assert check.returncode == 1 and not report["healthy"]
    assert any("no usable MR series" in p for p in report["problems"]), report["problems"]
    status = _daemon(fed, EMPTY)
    assert status["state"] == "running" and "holds no files" in status["data_problem"]


def _trained(fed: LocalFederation, hospital: str) -> set[int]:
    """The rounds a hospital's ClientApp has trained in (its executor's log)."""
    log = (fed.home(hospital) / "logs" / "executor.log").read_text()
    return {int(line.split(" round=", 1)[1].split()[0]) for line in log.splitlines()
            if "event=trained" in line}


def _ended(fed: LocalFederation, rnd: int) -> bool:
    return any(e["event"] == "round_done" and e["round"] == rnd for e in _events(fed))


def test_the_run_survives_a_coordinator_restart_a_stopped_daemon_and_a_killed_supernode(
        fed: LocalFederation) -> None:
    live = ("hospital-1", "hospital-2", "hospital-3")
    fed.run("--rounds", "6", "--size", "32", "--local-epochs", "1", "--stage-timeout", "15",
            "--round-timeout", "45")

    # Round 2: every live hospital has trained (its masked update is leaving); the coordinator
    # stops (SIGTERM) before it can finish the round, and starts again.
    wait_for("the hospitals to train round 2",
             lambda: all(2 in _trained(fed, h) for h in live), 240, every_s=0.05)
    assert fed.stop("server") == 0
    fed.start_server()

    # Round 4 (the resumed run lost round 2 and trained round 3): hospital-2's daemon is told
    # to stop, and started again.
    wait_for("round 3 to end", lambda: _ended(fed, 3), 240, every_s=0.1)
    assert fed.stop("hospital-2") == 0  # a clean stop
    home = fed.home("hospital-2")
    assert not (home / "status.json").exists()
    partial = [p for p in home.rglob("*") if p.name.endswith(".tmp")]
    assert partial == []  # nothing half-written left behind
    fed.start_hospital("hospital-2")

    # Once hospital-2 trains again: hospital-1's SuperNode dies (SIGKILL, no goodbye).
    rejoined = wait_for("hospital-2 to train again", lambda: {
        r for r in _trained(fed, "hospital-2") if r > 4}, 240, every_s=0.1)
    before = _daemon(fed, "hospital-1")
    os.kill(before["supernode_pid"], signal.SIGKILL)
    after = wait_for("hospital-1's daemon to restart its SuperNode", lambda: (
        s := _daemon(fed, "hospital-1"))["state"] == "running" and s["restarts"] >= 1 and s,
        60)
    assert after["supernode_pid"] != before["supernode_pid"]

    status = fed.wait_run(timeout_s=900)
    assert status["state"] == "finished", status
    events = _events(fed)
    done = {e["round"]: e for e in events if e["event"] == "round_done"}
    # Every round ends once (a round without enough survivors ends skipped, with a reason);
    # none is aggregated twice, none is unmasked twice.
    assert sorted(e["round"] for e in events if e["event"] == "round_done") == [1, 2, 3, 4, 5, 6]
    sums = [e["round"] for e in events if e["event"] == "secure_sum"]
    assert len(sums) == len(set(sums)) and {1, 3} <= set(sums) and 2 not in sums
    skipped = {e["round"]: e["reason"] for e in events if e["event"] == "round_skipped"}
    assert 2 in skipped, events
    for rnd, reason in skipped.items():
        assert "secure aggregation failed" in reason and rnd not in sums
    refusals = [e["reason"] for e in events if e["event"] == "hospital_failed" and
                e["round"] == 2 and "already masked an update" in e["reason"]]
    assert len(refusals) == len(live), events  # each live hospital, naming the first run
    assert {"event": "resumed", "round": 1} in [
        {k: e[k] for k in ("event", "round")} for e in events if e["event"] == "resumed"]
    audit = ok("server", "--home", str(fed.server), "audit")
    assert "run_resume" in audit and "after round 1" in audit
    for rnd in (1, 3):
        assert set(done[rnd]["train_loss"]) == set(live), events
    assert "hospital-2" in done[min(rejoined)]["train_loss"], events
    assert all(EMPTY not in e["train_loss"] for e in done.values())
    problems = " ".join(status["problems"])
    assert f"{EMPTY}:" in problems and "no usable labelled MR series" in problems


def test_no_process_is_left_behind(fed: LocalFederation) -> None:
    import psutil

    fed.stop_all()
    time.sleep(1)
    left = [p for p in psutil.process_iter(["cmdline"])
            if str(fed.root) in " ".join(p.info["cmdline"] or [])]
    assert left == []


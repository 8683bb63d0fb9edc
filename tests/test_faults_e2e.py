"""A federation that survives faults, with real processes (fedmri.deploy.topology): four
hospitals through the operators' commands, one secure run of three rounds, and during it

- hospital-4's data folder is empty: `fedmri client check` says so, its daemon reports it and
  keeps running, and each round goes on without it, naming the reason;
- round 1: hospital-1's SuperNode is SIGKILLed: its daemon restarts it (the SuperLink lets the
  same node in again once it has declared the old one lost, within about a minute); the
  round completes with the survivors or is skipped with a reason;
- round 2: hospital-2's daemon gets SIGTERM: it stops cleanly, leaves no partial file, and once
  started again it takes part in the later rounds;
- round 3: the coordinator is stopped and started again: the hospitals reconnect, the run
  resumes after its last checkpointed round, and no round is aggregated twice.

What is lost: the updates of the hospitals hit in the rounds they miss (a secure round with
fewer than t survivors is skipped, the model unchanged), and the part of round 3 the
coordinator's stop interrupted (run again); nothing else.
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


def test_the_run_survives_a_killed_supernode_and_a_restarted_daemon(
        fed: LocalFederation) -> None:
    fed.run("--rounds", "4", "--size", "32", "--local-epochs", "1", "--stage-timeout", "15",
            "--round-timeout", "45")
    # Round 1, while the hospitals train: hospital-1's SuperNode dies (SIGKILL, no goodbye).
    wait_for("round 1 to start", lambda: any(e["event"] == "started" for e in _events(fed)),
             120)
    time.sleep(3)
    before = _daemon(fed, "hospital-1")
    os.kill(before["supernode_pid"], signal.SIGKILL)
    after = wait_for("hospital-1's daemon to restart its SuperNode", lambda: (
        s := _daemon(fed, "hospital-1"))["state"] == "running" and s["restarts"] >= 1 and s,
        60)
    assert after["supernode_pid"] != before["supernode_pid"]

    # Round 2, while the hospitals train: hospital-2's daemon is told to stop.
    wait_for("round 1 to end", lambda: any(e["event"] in ("round_done", "round_skipped") and
                                           e["round"] == 1 for e in _events(fed)), 240)
    time.sleep(3)
    assert fed.stop("hospital-2") == 0  # a clean stop
    home = fed.home("hospital-2")
    assert not (home / "status.json").exists()
    partial = [p for p in home.rglob("*") if p.name.endswith(".tmp")]
    assert partial == []  # nothing half-written left behind
    fed.start_hospital("hospital-2")

    # Round 3 has begun: the coordinator stops (SIGTERM) and starts again.
    wait_for("round 2 to end", lambda: any(e["event"] in ("round_done", "round_skipped") and
                                           e["round"] == 2 for e in _events(fed)), 240)
    time.sleep(2)
    assert fed.stop("server") == 0
    fed.start_server()

    status = fed.wait_run(timeout_s=900)
    assert status["state"] == "finished", status
    events = _events(fed)
    done = {e["round"]: e for e in events if e["event"] == "round_done"}
    # Every round ends once (a round without enough survivors ends skipped, with a reason);
    # none is aggregated twice, none is unmasked twice.
    assert sorted(e["round"] for e in events if e["event"] == "round_done") == [1, 2, 3, 4]
    sums = [e["round"] for e in events if e["event"] == "secure_sum"]
    assert len(sums) == len(set(sums)) and {3, 4} <= set(sums)
    for skip in (e for e in events if e["event"] == "round_skipped"):
        assert "secure aggregation failed" in skip["reason"] and skip["round"] not in sums
    assert {"event": "resumed", "round": 2} in [
        {k: e[k] for k in ("event", "round")} for e in events if e["event"] == "resumed"]
    audit = ok("server", "--home", str(fed.server), "audit")
    assert "run_resume" in audit and "after round 2" in audit
    # Back in rounds 3 and 4: hospital-1 (its SuperNode reconnects once the SuperLink has
    # declared the killed one lost: two 30 s heartbeats), hospital-2 and the coordinator; the
    # empty one never trains.
    for rnd in (3, 4):
        assert set(done[rnd]["train_loss"]) == {"hospital-1", "hospital-2", "hospital-3"}, events
    assert all(EMPTY not in e["train_loss"] for e in done.values())
    problems = " ".join(status["problems"])
    assert f"{EMPTY}:" in problems and "no usable labelled MR series" in problems
    assert _daemon(fed, "hospital-1")["restarts"] >= 1


def test_no_process_is_left_behind(fed: LocalFederation) -> None:
    import psutil

    fed.stop_all()
    time.sleep(1)
    left = [p for p in psutil.process_iter(["cmdline"])
            if str(fed.root) in " ".join(p.info["cmdline"] or [])]
    assert left == []


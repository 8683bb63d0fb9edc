"""Faulty hospitals against the real coordinator, through the real Flower path: a
flower-superlink, one flower-supernode per hospital and the fedmri ServerApp, over TLS. The
hospitals run `fake_hospital_app` (fedmri's secure-aggregation client code, with a known
update instead of training, and faults by name).

Round 1: `faulty-bad-weight` declares a weight over the cap and is refused after it got keys,
so the survivors sign a smaller survivor set (the consistency step); `faulty-missing-seed`
then reveals without the pairwise seed it shares with it, and its reveal is refused. Both are
named and excluded; the round completes with the others. Round 2 completes without them.
Lost: nothing but the two offenders' contributions.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fake_hospital import delta, weight

from fedmri.common.config import RunConfig
from fedmri.common.models import build_model
from fedmri.deploy.deployment import Deployment, FlowerApp, run_deployment
from fedmri.deploy.enrollment import enroll_hospitals, enrolled_node
from fedmri.proto import files
from fedmri.proto.events import FINAL, Event, EventTail
from fedmri.proto.run_config import ServerSettings

pytestmark = pytest.mark.slow
HONEST = ["hospital-1", "hospital-2", "hospital-3"]
FAULTY = ["faulty-bad-weight", "faulty-missing-seed"]


def test_faulty_hospitals_are_named_excluded_and_the_run_completes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tests = str(Path(__file__).parent)
    monkeypatch.setenv("PYTHONPATH", tests + ":" + __import__("os").environ.get("PYTHONPATH", ""))
    nodes_dir = tmp_path / "nodes"
    pinned = enroll_hospitals(nodes_dir, HONEST + FAULTY)
    cfg = RunConfig(size=16, rounds=2, secure=True, secure_max_weight=100)
    settings = ServerSettings(out_dir=tmp_path / "out", min_nodes=5, round_timeout_s=120.0,
                              stage_timeout_s=60.0, pinned_keys=pinned)
    tail = EventTail(tmp_path / "out" / files.EVENTS)
    seen: list[Event] = []

    def poll() -> Event | None:
        seen.extend(tail.read())
        return next((e for e in seen if isinstance(e, FINAL)), None)

    outcome = run_deployment(
        Deployment(home=tmp_path / ".flwr", workdir=tmp_path,
                   nodes=[enrolled_node(nodes_dir, h, pinned) for h in HONEST + FAULTY],
                   timeout_s=600),
        FlowerApp("fedmri.server.app:app", "fake_hospital_app:app",
                  {**cfg.to_dict(), **settings.to_run_config()}), poll)
    events = [json.loads(line) for line in
              (tmp_path / "out" / files.EVENTS).read_text().splitlines()]
    assert outcome.NAME == "done", events
    excluded = {e["hospital"]: e["reason"] for e in events if e["event"] == "hospital_excluded"}
    assert set(excluded) == set(FAULTY), events
    assert "declared weight 1000000" in excluded["faulty-bad-weight"]
    assert "pair seeds" in excluded["faulty-missing-seed"]
    sums = [e for e in events if e["event"] == "secure_sum"]
    assert [e["round"] for e in sums] == [1, 2]
    # Round 1: the missing-seed hospital's vector is in the sum (its masks were removable);
    # round 2: the honest three only.
    assert sums[0]["survivors"] == sorted(HONEST + ["faulty-missing-seed"])
    assert sums[1]["survivors"] == HONEST

    # The global model moved by exactly the two rounds' weighted means of the known updates.
    start = build_model(cfg).state_dict()
    final = torch.load(tmp_path / "out" / files.GLOBAL_MODEL, weights_only=True)["state_dict"]
    r1 = {**{h: int(h[-1]) for h in HONEST}, "faulty-missing-seed": 9}
    moved = sum(weight(i) * delta(i, 1) for i in r1.values()) / sum(weight(i) for i in r1.values())
    moved += sum(weight(i) * delta(i, 2) for i in (1, 2, 3)) / sum(weight(i) for i in (1, 2, 3))
    key = next(k for k, v in start.items() if v.is_floating_point())
    assert torch.allclose(final[key].double(), start[key].double() + moved, atol=1e-4)

"""The ranks' shared-memory transport (client/spatial/shm.py) between real worker processes:
exact halo exchanges and sums, spinning (ranks with cores of their own) and yielding (more
ranks than cores), a peer that never comes is named, and gloo takes over where there is no
shared memory. The split networks' equality tests (test_spatial.py) run on it too."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fedmri.client.spatial.launch import (
    SHM_ENV,
    SHM_ROOT,
    TRANSPORT_ENV,
    MeshShape,
    WorkerFailure,
    run_ranks,
)

TESTS = str(Path(__file__).parent)
pytestmark = pytest.mark.skipif(not SHM_ROOT.is_dir(), reason="no /dev/shm on this host")


def _traffic(tmp_path: Path, tp: int, timeout_s: float = 600, **env: str) -> list[str]:
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "job.json").write_text(json.dumps({}))
    extra = {"PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]), **env}
    run_ranks("spatial_check:shm_traffic", tmp_path, MeshShape(tp=tp), timeout_s=timeout_s,
              extra_env=extra)
    return [json.loads((tmp_path / f"result{r}.json").read_text())["transport"]
            for r in range(tp)]


def _ours() -> set[str]:
    return {p.name for p in SHM_ROOT.glob("fedmri-tp-*")}


@pytest.mark.parametrize("tp", [2, 3])  # on 2 cores: 2 ranks spin, 3 ranks yield
def test_exchanges_and_sums_are_exact_and_leave_nothing_behind(tmp_path: Path, tp: int) -> None:
    before = _ours()
    assert _traffic(tmp_path, tp) == ["shm"] * tp
    assert _ours() == before


def test_gloo_carries_the_same_traffic_when_asked_or_without_shared_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _traffic(tmp_path / "missing", 2, **{SHM_ENV: str(tmp_path / "no-such-folder")}) \
        == ["gloo", "gloo"]
    monkeypatch.setenv(TRANSPORT_ENV, "gloo")
    assert _traffic(tmp_path / "asked", 2) == ["gloo", "gloo"]
    monkeypatch.setenv(TRANSPORT_ENV, "sockets")
    with pytest.raises(ValueError, match="FEDMRI_TP_TRANSPORT='sockets'"):
        _traffic(tmp_path / "bad", 2)


def test_a_peer_that_never_sends_is_named_within_the_timeout(tmp_path: Path) -> None:
    (tmp_path / "job.json").write_text(json.dumps({"idle_rank": 1}))
    env = {"PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])}
    with pytest.raises(WorkerFailure, match=r"rank 0 failed: .*halo exchange with rank\(s\) 1: "
                                            r"nothing within 2 s"):
        run_ranks("spatial_check:shm_traffic", tmp_path, MeshShape(tp=2), timeout_s=120,
                  collective_timeout_s=2, extra_env=env)

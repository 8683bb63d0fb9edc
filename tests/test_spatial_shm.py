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


def _traffic(tmp_path: Path, shape: MeshShape, job: dict[str, int] | None = None,
             collective_timeout_s: float = 600, **env: str) -> list[str]:
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "job.json").write_text(json.dumps(job or {}))
    extra = {"PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]), **env}
    run_ranks("spatial_check:shm_traffic", tmp_path, shape, timeout_s=300,
              collective_timeout_s=collective_timeout_s, extra_env=extra)
    return [json.loads((tmp_path / f"result{r}.json").read_text())["transport"]
            for r in range(shape.world)]


def _ours() -> set[str]:
    return {p.name for p in SHM_ROOT.glob("fedmri-tp-*")}


# On 2 cores: 2 ranks spin, 3 and 4 ranks yield; dp x tp sums over three kinds of group.
@pytest.mark.parametrize("shape", [MeshShape(tp=2), MeshShape(tp=3), MeshShape(dp=2, tp=2)])
def test_exchanges_and_sums_are_exact_and_leave_nothing_behind(tmp_path: Path,
                                                               shape: MeshShape) -> None:
    before = _ours()
    assert _traffic(tmp_path, shape) == ["shm"] * shape.world
    assert _ours() == before


def test_gloo_carries_the_same_traffic_when_asked_or_without_shared_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    two = MeshShape(tp=2)
    missing = {SHM_ENV: str(tmp_path / "no-such-folder")}
    assert _traffic(tmp_path / "missing", two, **missing) == ["gloo", "gloo"]
    monkeypatch.setenv(TRANSPORT_ENV, "gloo")
    monkeypatch.setenv(SHM_ENV, str(tmp_path))  # inherited from outside: not the launcher's
    assert _traffic(tmp_path / "asked", two) == ["gloo", "gloo"]
    monkeypatch.setenv(TRANSPORT_ENV, "sockets")
    with pytest.raises(ValueError, match="FEDMRI_TP_TRANSPORT='sockets'"):
        _traffic(tmp_path / "bad", two)


def test_a_peer_that_never_sends_is_named_within_the_timeout(tmp_path: Path) -> None:
    with pytest.raises(WorkerFailure, match=r"rank 0 failed: .*halo exchange with rank\(s\) 1: "
                                            r"nothing within 2 s"):
        _traffic(tmp_path, MeshShape(tp=2), {"idle_rank": 1}, collective_timeout_s=2)


def test_a_sum_of_mismatched_tensors_is_an_error_not_a_wrong_result(tmp_path: Path) -> None:
    with pytest.raises(WorkerFailure, match=r"sum: rank \d sent \d+ bytes of torch.float32, "
                                            r"this rank has \d+ bytes of torch.float32"):
        _traffic(tmp_path, MeshShape(tp=3), {"odd_rank": 1})


def test_a_halo_of_another_size_is_an_error_not_a_wrong_result(tmp_path: Path) -> None:
    with pytest.raises(WorkerFailure, match=r"rank 0 failed: .*halo exchange: rank 1 sent 16 "
                                            r"bytes of torch.float32, this rank has 12 bytes"):
        _traffic(tmp_path, MeshShape(tp=2), {"odd_halo": 1})


def test_ranks_spin_only_within_their_cgroup_cpu_quota(tmp_path: Path) -> None:
    from fedmri.client.spatial.worker import _cpu_quota

    (tmp_path / "limited").write_text("150000 100000\n")
    (tmp_path / "unlimited").write_text("max 100000\n")
    assert _cpu_quota(tmp_path / "limited") == 1.5  # 2 spinning ranks would be throttled
    assert _cpu_quota(tmp_path / "unlimited") == float("inf")
    assert _cpu_quota(tmp_path / "absent") == float("inf")


def test_the_compiled_message_ops_check_signatures_rounds_and_sizes() -> None:
    import torch

    from fedmri.kernels import ops

    ops.load()
    shm_ops = torch.ops.fedmri
    theirs, mine = torch.zeros(64, dtype=torch.int64), torch.zeros(64, dtype=torch.int64)
    slot = torch.zeros(64, dtype=torch.uint8)
    sent = torch.arange(6.0).view(2, 3).t()  # not contiguous: published as its values
    shm_ops.shm_publish(theirs, 0, 1, 7, slot, sent)
    got = torch.empty(3, 2)
    assert shm_ops.shm_take(theirs, 0, 2, 7, slot, got, mine, 8) == 0  # round 2: not yet
    assert shm_ops.shm_take(theirs, 0, 1, 9, slot, got, mine, 8) == -1  # another signature
    assert int(mine[8]) == 0
    version = got._version
    assert shm_ops.shm_take(theirs, 0, 1, 7, slot, got, mine, 8) == 1
    assert torch.equal(got, sent) and int(mine[8]) == 1 and got._version > version
    part = torch.zeros(6)
    assert shm_ops.shm_sum(part, [theirs, theirs], [0, 0], [slot, slot], 1, 9) == -1
    assert torch.equal(part, torch.zeros(6))  # untouched on a mismatch
    assert shm_ops.shm_sum(part, [theirs, theirs], [0, 0], [slot, slot], 1, 7) == 0
    assert torch.equal(part, 2 * sent.reshape(-1))
    with pytest.raises(RuntimeError, match="has not published round 2"):
        shm_ops.shm_sum(part, [theirs], [0], [slot], 2, 7)
    with pytest.raises(RuntimeError, match="does not fit its slot"):
        shm_ops.shm_publish(mine, 0, 1, 7, slot, torch.zeros(17))

"""A hospital's training and evaluation on a dp x tp mesh of local worker processes.

The ClientApp process (`run_on_mesh`) writes the job (global weights, run config, seed) to a
private folder, starts the ranks and reads back rank 0's result; each rank (`job`) reads only
its depth slab of every case from the hospital's cache, trains the split network in lockstep
with the others and evaluates it. All ranks hold the same weights, so rank 0's state_dict is
the model one process would have trained.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fedmri.client.hospital_data import HospitalData
from fedmri.client.spatial.launch import MeshShape, run_ranks
from fedmri.client.spatial.mesh import SpatialMesh, gpu_per_rank
from fedmri.client.trainer import EvalResult, TrainResult
from fedmri.common.config import RunConfig

JOB, WEIGHTS, RESULT = "job.json", "weights.pt", "result.pt"
JOB_PREFIX = "fedmri-mesh-"
TARGET = "fedmri.client.spatial.hospital:job"


@dataclass(frozen=True)
class MeshJob:
    cache: str  # the hospital's decoded cases, as the ClientApp read them
    train: list[str]  # the case names of each split, as the ClientApp counted them
    val: list[str]
    config: dict[str, Any]
    seed: int
    epochs: int  # 0: evaluate only
    evaluate_first: bool


@dataclass
class MeshOutcome:
    state_dict: dict[str, torch.Tensor]
    train: TrainResult | None
    val: EvalResult | None
    setup_seconds: float  # starting the ranks until all joined the process group


def run_on_mesh(shape: MeshShape, data: HospitalData, cfg: RunConfig,
                weights: dict[str, torch.Tensor], seed: int, epochs: int,
                evaluate_first: bool, threads: int) -> MeshOutcome:
    """Train (and/or evaluate) on `shape.world` local ranks, on the cases of `data` (the ranks
    read their slabs from its cache folder); raises WorkerFailure naming the rank that failed.
    Nothing is left behind: the job folder goes either way (or, if this process is killed,
    at the next job)."""
    _remove_orphaned_jobs()
    job_dir = Path(tempfile.mkdtemp(prefix=f"{JOB_PREFIX}{os.getpid()}-"))  # 0700
    try:
        torch.save(weights, job_dir / WEIGHTS)
        (job_dir / JOB).write_text(json.dumps(asdict(MeshJob(
            str(data.cache), [c.name for c in data.train], [c.name for c in data.val],
            cfg.to_dict(), seed, epochs, evaluate_first))))
        setup_s = run_ranks(TARGET, job_dir, shape, threads=threads)
        blob = torch.load(job_dir / RESULT, weights_only=True)
    finally:
        shutil.rmtree(job_dir, ignore_errors=True)
    return MeshOutcome(
        state_dict=blob["state_dict"],
        train=TrainResult(**blob["train"]) if blob["train"] else None,
        val=EvalResult(**blob["val"]) if blob["val"] else None,
        setup_seconds=setup_s)


def _remove_orphaned_jobs() -> None:
    """Job folders (they hold weights) of hospital processes that were killed mid-job."""
    for folder in Path(tempfile.gettempdir()).glob(f"{JOB_PREFIX}*-*"):
        pid = folder.name[len(JOB_PREFIX):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: not ours to judge
        return True
    return True


def mesh_device(mesh: SpatialMesh) -> torch.device:
    """One GPU per rank when there are enough of them, else the CPU for all ranks."""
    if gpu_per_rank(mesh.world_size):
        return torch.device("cuda", mesh.dp_rank * mesh.tp_size + mesh.tp_rank)
    return torch.device("cpu")


def job(mesh: SpatialMesh, job_dir: Path) -> None:
    """One rank's part of a MeshJob (run by fedmri.client.spatial.worker)."""
    from fedmri.client.hospital_data import read_cache
    from fedmri.client.spatial import parallelize, plan_slabs
    from fedmri.client.spatial.training import SlabObjective, evaluate_slabs
    from fedmri.client.trainer import train_local
    from fedmri.common.models import build_model

    spec = MeshJob(**json.loads((job_dir / JOB).read_text()))
    cfg = RunConfig.from_dict(spec.config)
    model = build_model(cfg)
    model.load_state_dict(torch.load(job_dir / WEIGHTS, weights_only=True))
    start, stop = plan_slabs(model, cfg.size, mesh.tp_size)[mesh.tp_rank]
    data = read_cache(Path(spec.cache), cfg, slab=(start, stop))
    if [c.name for c in data.train] != spec.train or [c.name for c in data.val] != spec.val:
        raise RuntimeError(f"the hospital's cached cases at {spec.cache} are not those the "
                           "ClientApp counted: the cache changed during the round")
    parallelize(model, mesh)
    dev, voxels = mesh_device(mesh), cfg.size ** 3
    val = evaluate_slabs(model, data.val, cfg, mesh, voxels, dev) if spec.evaluate_first \
        else None
    train = None
    if spec.epochs:
        train = train_local(model, data.train, cfg, spec.epochs, spec.seed,
                            SlabObjective(mesh, cfg.num_classes, voxels), dev)
    if mesh.dp_rank == 0 and mesh.tp_rank == 0:
        torch.save({"state_dict": model.state_dict(),
                    "train": asdict(train) if train else None,
                    "val": asdict(val) if val else None}, job_dir / RESULT)

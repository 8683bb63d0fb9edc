"""One rank of a tensor-parallel mesh (started by fedmri.client.spatial.launch.run_ranks)."""

from __future__ import annotations

import importlib
import os
import sys
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path

from fedmri.client.spatial.launch import ERROR_FILE, READY_FILE, SHM_ENV

MAX_ERROR_CHARS = 4000


def _exit_with_parent() -> None:
    """A rank whose launcher is gone (killed) stops too, instead of waiting on its peers."""
    parent = os.getppid()
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(1)


def _describe(err: BaseException) -> str:
    """The error and where it happened (last frames), short enough for a log line."""
    text = "".join(traceback.format_exception_only(type(err), err)).strip()
    frames = traceback.extract_tb(err.__traceback__)[-3:]
    where = "; ".join(f"{f.filename}:{f.lineno} in {f.name}" for f in frames)
    if len(text) > MAX_ERROR_CHARS:
        text = text[:MAX_ERROR_CHARS] + f"... ({len(text)} characters)"
    return f"{text} (at {where})" if where else text


def _pin(rank: int, threads: int, world: int) -> bool:
    """Each rank on cores of its own when they suffice: ranks step in lockstep, so one
    rank losing its core to another stalls them all. Whether it was pinned."""
    cores = sorted(os.sched_getaffinity(0))
    if world > 1 and world * threads <= len(cores):
        os.sched_setaffinity(0, cores[rank * threads:(rank + 1) * threads])
        return True
    return False


def _cpu_quota(path: Path = Path("/sys/fs/cgroup/cpu.max")) -> float:
    """The cores this process's cgroup may use (cgroup v2 `cpu.max`; unlimited if unknown):
    a container given fewer than its cores gets throttled when ranks spin."""
    try:
        quota, period = path.read_text().split()[:2]
        return float("inf") if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return float("inf")


def main(argv: list[str]) -> int:
    job_dir, rank, dp, tp, target = Path(argv[0]), int(argv[1]), int(argv[2]), int(argv[3]), \
        argv[4]
    threads, timeout_s = int(argv[5]), float(argv[6])
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    try:
        import torch
        import torch.distributed as dist

        from fedmri.client.spatial.mesh import gpu_per_rank, init_mesh

        torch.set_num_threads(max(threads, 1))
        world = dp * tp
        pinned = _pin(rank, max(threads, 1), world)
        gpus = gpu_per_rank(world)
        if gpus:
            torch.cuda.set_device(rank)
        if world > 1:
            store = dist.FileStore(str(job_dir / "store"), world)
            dist.init_process_group("nccl" if gpus else "gloo", store=store, rank=rank,
                                    world_size=world,
                                    timeout=timedelta(seconds=timeout_s))
        mesh = init_mesh(dp, tp)
        shm_folder = os.environ.get(SHM_ENV)
        if shm_folder and world > 1 and not gpus:
            from fedmri.client.spatial import comm, shm

            # A rank with a core of its own spins on the counters; others yield their core.
            spin = pinned and _cpu_quota() >= world * max(threads, 1)
            comm.use_shared_memory(shm.connect(Path(shm_folder), rank, dp, tp, spin, timeout_s))
        module, _, function = target.partition(":")
        job = getattr(importlib.import_module(module), function)
        (job_dir / READY_FILE.format(rank)).touch()
        job(mesh, job_dir)
        if world > 1:
            dist.destroy_process_group()
        return 0
    except BaseException as err:  # the launcher reads this file to name the failure
        (job_dir / ERROR_FILE.format(rank)).write_text(_describe(err) + "\n")
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""One rank of a tensor-parallel mesh (started by fedmri.client.spatial.launch.run_ranks)."""

from __future__ import annotations

import importlib
import sys
import traceback
from datetime import timedelta
from pathlib import Path

from fedmri.client.spatial.launch import ERROR_FILE, READY_FILE


def main(argv: list[str]) -> int:
    job_dir, rank, dp, tp, target = Path(argv[0]), int(argv[1]), int(argv[2]), int(argv[3]), \
        argv[4]
    threads, timeout_s = int(argv[5]), float(argv[6])
    try:
        import torch
        import torch.distributed as dist

        from fedmri.client.spatial.mesh import gpu_per_rank, init_mesh

        torch.set_num_threads(max(threads, 1))
        world = dp * tp
        gpus = gpu_per_rank(world)
        if gpus:
            torch.cuda.set_device(rank)
        if world > 1:
            store = dist.FileStore(str(job_dir / "store"), world)
            dist.init_process_group("nccl" if gpus else "gloo", store=store, rank=rank,
                                    world_size=world,
                                    timeout=timedelta(seconds=timeout_s))
        mesh = init_mesh(dp, tp)
        module, _, function = target.partition(":")
        job = getattr(importlib.import_module(module), function)
        (job_dir / READY_FILE.format(rank)).touch()
        job(mesh, job_dir)
        if world > 1:
            dist.destroy_process_group()
        return 0
    except BaseException as err:  # the launcher reads this file to name the failure
        detail = "".join(traceback.format_exception_only(type(err), err)).strip()
        (job_dir / ERROR_FILE.format(rank)).write_text(detail + "\n")
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

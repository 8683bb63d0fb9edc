"""Start the ranks of a dp x tp mesh as worker processes and watch them.

Each rank is a fresh `python -m fedmri.client.spatial.worker` process (never a fork: the
ClientApp process runs gRPC threads). They meet through a file store in the job's private
folder (no port to pick or race for), run the job function named by the caller, and write
their result or their error there. If one rank fails or dies, the others are stopped at
once: a failed step ends within the poll interval, it never hangs the hospital.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

POLL_S = 0.2
# glibc's allocator for the ranks: keep freed memory for the next step instead of handing
# large blocks (every activation of a 3D volume is one) back to the kernel and faulting them
# in again, page by page, the next time. A training step at 128^3 was 15-20% faster on one
# rank and on two; ranks are short-lived processes, so holding their peak is no loss.
RANK_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 46)}
# Where the ranks of one job put their shared-memory files (client/spatial/shm.py), and the
# knob that turns that transport off: FEDMRI_TP_TRANSPORT=gloo.
SHM_ENV = "FEDMRI_TP_SHM"
TRANSPORT_ENV = "FEDMRI_TP_TRANSPORT"
SHM_ROOT = Path("/dev/shm")
ERROR_FILE = "rank{}.error"
READY_FILE = "rank{}.ready"


class WorkerFailure(RuntimeError):
    """A rank of the tensor-parallel mesh failed; the message names it and why."""


@dataclass(frozen=True)
class MeshShape:
    dp: int = 1
    tp: int = 1

    @property
    def world(self) -> int:
        return self.dp * self.tp

    def __post_init__(self) -> None:
        if self.dp < 1 or self.tp < 1:
            raise ValueError(f"dp and tp must be >= 1, got dp={self.dp} tp={self.tp}")


def run_ranks(target: str, job_dir: Path, shape: MeshShape, threads: int = 1,
              timeout_s: float = 24 * 3600.0, collective_timeout_s: float = 600.0,
              extra_env: dict[str, str] | None = None) -> float:
    """Run `target` ("module:function", called as function(mesh, job_dir)) on every rank;
    return the seconds until every rank had joined the process group (the set-up cost).

    `timeout_s` bounds the whole job; `collective_timeout_s` any one exchange or reduction (a
    rank waiting longer for its peers fails). Raises WorkerFailure naming the rank that failed
    first (its error, or how it died)."""
    for stale in ["store", *(f.format("*") for f in (READY_FILE, ERROR_FILE))]:
        for path in job_dir.glob(stale):  # a folder used before: its store would not rendezvous
            path.unlink()
    inherited = {k: v for k, v in os.environ.items() if k != SHM_ENV}  # only ours counts
    start = time.perf_counter()
    procs: list[subprocess.Popen[bytes]] = []
    setup_s: float | None = None
    shm_folder = _shm_folder(shape)
    try:
        env = {**inherited, **RANK_MALLOC, **({SHM_ENV: str(shm_folder)} if shm_folder else {}),
               **(extra_env or {}), "OMP_NUM_THREADS": str(max(threads, 1))}
        for rank in range(shape.world):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "fedmri.client.spatial.worker", str(job_dir), str(rank),
                 str(shape.dp), str(shape.tp), target, str(threads), str(collective_timeout_s)],
                env=env, stdin=subprocess.DEVNULL))
        while True:
            codes = [p.poll() for p in procs]
            if setup_s is None and all((job_dir / READY_FILE.format(r)).exists()
                                       for r in range(shape.world)):
                setup_s = time.perf_counter() - start
            failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                first = _first_failure(job_dir, failed)
                raise WorkerFailure(_failure(job_dir, first, codes[first]))
            if all(c == 0 for c in codes):
                return setup_s if setup_s is not None else time.perf_counter() - start
            if time.perf_counter() - start > timeout_s:
                raise WorkerFailure(f"tensor-parallel workers did not finish in {timeout_s:.0f} s")
            time.sleep(POLL_S)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()
        if shm_folder:
            shutil.rmtree(shm_folder, ignore_errors=True)


def _shm_folder(shape: MeshShape) -> Path | None:
    """A private folder in /dev/shm for the ranks' shared-memory transport, unless it is
    turned off, the job has one rank, or this host has no /dev/shm (then gloo carries all)."""
    choice = os.environ.get(TRANSPORT_ENV, "shm")
    if choice not in ("shm", "gloo"):
        raise ValueError(f"{TRANSPORT_ENV}={choice!r}: use 'shm' (shared memory between "
                         "the ranks of this host, the default) or 'gloo'")
    if choice == "gloo" or shape.world == 1 or not SHM_ROOT.is_dir():
        return None
    _remove_orphans()
    try:
        return Path(tempfile.mkdtemp(prefix=f"fedmri-tp-{os.getpid()}-", dir=SHM_ROOT))
    except OSError:
        return None


def _remove_orphans() -> None:
    """Folders (empty once the ranks have mapped their files) of launchers that were killed."""
    for folder in SHM_ROOT.glob("fedmri-tp-*-*"):
        try:
            pid = int(folder.name.split("-")[2])
            if folder.stat().st_uid != os.getuid():
                continue
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except (ValueError, OSError):
            continue


def _first_failure(job_dir: Path, failed: list[int]) -> int:
    """The rank whose error came first: its peers' errors ("connection closed") follow it."""
    reported = [(job_dir / ERROR_FILE.format(r)).stat().st_mtime_ns
                if (job_dir / ERROR_FILE.format(r)).exists() else None for r in failed]
    if None in reported:  # a rank that died without a word is the likeliest cause
        return failed[reported.index(None)]
    return min(zip(reported, failed, strict=True))[1]


def _failure(job_dir: Path, rank: int, code: int | None) -> str:
    error = job_dir / ERROR_FILE.format(rank)
    if error.exists():
        return f"tensor-parallel rank {rank} failed: {error.read_text().strip()}"
    how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
    return f"tensor-parallel rank {rank} died ({how}) before reporting an error"

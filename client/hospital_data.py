"""A hospital's training and validation cases, cached on local disk between rounds.

Every Flower message starts a fresh ClientApp process, so reading and resampling the DICOM
series each round would dominate a round. The resampled arrays are cached under a key made
of the folder's file list (names, sizes, mtimes) and the model grid: any change re-reads.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmri.client.dataset import Case, load_cases, split_cases
from fedmri.common.config import RunConfig

log = logging.getLogger(__name__)


@dataclass
class HospitalData:
    train: list[Case]
    val: list[Case]
    rejected: list[str]  # "path: reason" of series that could not be used
    cache: Path  # the decoded cases (read_cache reads slabs of them)


def _cache_root() -> Path:
    return Path(os.environ.get("FEDMRI_CACHE", Path(tempfile.gettempdir()) / "fedmri-cache"))


def _fingerprint(data_dir: Path, cfg: RunConfig) -> str:
    h = hashlib.sha256(f"{data_dir.resolve()}|{cfg.size}|{cfg.fov_mm}|v2".encode())
    for path in sorted(data_dir.rglob("*")):
        if path.is_file() and ".fedmri-cache" not in path.parts:
            st = path.stat()
            h.update(f"{path.relative_to(data_dir)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def _cached(data_dir: Path, cfg: RunConfig) -> Path:
    """The cache folder of this data folder and grid, written (whole, then renamed into place)
    if missing. Plain .npy files, so a tensor-parallel rank maps them and reads its slab only."""
    cache = _cache_root() / _fingerprint(data_dir, cfg)
    if (cache / "names.npy").exists():
        return cache
    cases, results = load_cases(data_dir, cfg.size, cfg.fov_mm)
    rejected = [f"{r.path}: {r.reason}" for r in results if r.status != "accepted"]
    cache.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=cache.name + ".", dir=cache.parent))
    arrays = {"names": np.array([c.name for c in cases], dtype=str),
              "rejected": np.array(rejected, dtype=str)}
    if cases:
        arrays["images"] = np.stack([c.image for c in cases])
        arrays["labels"] = np.stack([c.label for c in cases])
    for name, array in arrays.items():
        with open(staging / f"{name}.npy", "wb") as fh:
            np.save(fh, array)
            fh.flush()
            os.fsync(fh.fileno())
    try:
        os.rename(staging, cache)
    except OSError:  # another process cached the same folder first: theirs is as good
        shutil.rmtree(staging, ignore_errors=True)
    return cache


def read_cache(cache: Path, cfg: RunConfig, slab: tuple[int, int] | None = None,
               source: Path | None = None) -> HospitalData:
    """The train/validation split of a cache folder (of `source`, for messages),
    deterministic for cfg.seed.

    `slab`: only depth planes [start, stop) of every case are read (a tensor-parallel rank);
    (0, 0) reads none, for a process that only needs the names and the split."""
    names = [str(n) for n in np.load(cache / "names.npy")]
    rejected = [str(r) for r in np.load(cache / "rejected.npy")]
    for reason in rejected:
        log.warning("series rejected: %s", reason)
    if not names:
        where = source or cache
        raise ValueError(
            f"no usable labelled MR series under {where}"
            + (f" ({len(rejected)} rejected; run `fedmri data scan {where}`)" if rejected
               else " (no DICOM files found)")
        )
    depth = slice(*slab) if slab is not None else slice(None)
    images = np.load(cache / "images.npy", mmap_mode="r")
    labels = np.load(cache / "labels.npy", mmap_mode="r")
    cases = [Case(n, np.array(images[i][:, depth]), np.array(labels[i][depth]))
             for i, n in enumerate(names)]
    train, val = split_cases(cases, val_fraction=cfg.val_fraction, seed=cfg.seed)
    return HospitalData(train=train, val=val, rejected=rejected, cache=cache)


# A long-lived process (the hospital daemon's executor) keeps the last split in memory: the
# next message of the run gets it without reading the cache again.
_last: tuple[tuple[object, ...], HospitalData] | None = None


def load_hospital(data_dir: Path, cfg: RunConfig,
                  slab: tuple[int, int] | None = None) -> HospitalData:
    """Train/validation split of the hospital folder (decoded once into the cache), see
    read_cache."""
    global _last
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data folder {data_dir} does not exist")
    cache = _cached(data_dir, cfg)  # the key changes when a file in the folder changes
    key = (cache, cfg.val_fraction, cfg.seed, slab)
    if _last is None or _last[0] != key:
        _last = (key, read_cache(cache, cfg, slab, source=data_dir))
    return _last[1]

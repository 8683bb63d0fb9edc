"""A hospital's training and validation cases, cached on local disk between rounds.

Every Flower message starts a fresh ClientApp process, so reading and resampling the DICOM
series each round would dominate a round. The resampled arrays are cached under a key made
of the folder's file list (names, sizes, mtimes) and the model grid: any change re-reads.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmri.client.dataset import Case, load_cases, split_cases
from fedmri.common.checkpoint import atomic_write
from fedmri.common.config import RunConfig

log = logging.getLogger(__name__)


@dataclass
class HospitalData:
    train: list[Case]
    val: list[Case]
    rejected: list[str]  # "path: reason" of series that could not be used


def _cache_root() -> Path:
    return Path(os.environ.get("FEDMRI_CACHE", Path(tempfile.gettempdir()) / "fedmri-cache"))


def _fingerprint(data_dir: Path, cfg: RunConfig) -> str:
    h = hashlib.sha256(f"{data_dir.resolve()}|{cfg.size}|{cfg.fov_mm}|v1".encode())
    for path in sorted(data_dir.rglob("*")):
        if path.is_file() and ".fedmri-cache" not in path.parts:
            st = path.stat()
            h.update(f"{path.relative_to(data_dir)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def _load_all(data_dir: Path, cfg: RunConfig) -> tuple[list[Case], list[str]]:
    key = _fingerprint(data_dir, cfg)
    cache = _cache_root() / f"{key}.npz"
    if cache.exists():
        with np.load(cache, allow_pickle=False) as blob:
            names = [str(n) for n in blob["names"]]
            cases = [Case(n, blob["images"][i], blob["labels"][i]) for i, n in enumerate(names)]
            return cases, [str(r) for r in blob["rejected"]]
    cases, results = load_cases(data_dir, cfg.size, cfg.fov_mm)
    rejected = [f"{r.path}: {r.reason}" for r in results if r.status != "accepted"]
    if cases:
        arrays = {
            "names": np.array([c.name for c in cases]),
            "images": np.stack([c.image for c in cases]),
            "labels": np.stack([c.label for c in cases]),
            "rejected": np.array(rejected, dtype=str),
        }
        atomic_write(cache, lambda fh: np.savez(fh, **arrays))  # type: ignore[arg-type]
    return cases, rejected


def load_hospital(data_dir: Path, cfg: RunConfig) -> HospitalData:
    """Train/validation split of the hospital folder, deterministic for cfg.seed."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data folder {data_dir} does not exist")
    cases, rejected = _load_all(data_dir, cfg)
    for reason in rejected:
        log.warning("series rejected: %s", reason)
    if not cases:
        raise ValueError(
            f"no usable labelled MR series under {data_dir}"
            + (f" ({len(rejected)} rejected; run `fedmri data scan {data_dir}`)" if rejected
               else " (no DICOM files found)")
        )
    train, val = split_cases(cases, val_fraction=cfg.val_fraction, seed=cfg.seed)
    return HospitalData(train=train, val=val, rejected=rejected)

"""The anatomy every subject is drawn from: the MNI152 2009c symmetric template.

T1 and grey/white-matter probability maps at 1 mm (RAS), as they ship inside nilearn's
wheel, plus a coarse map of the distance outside the brain that shapes the head shell.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

TEMPLATE_NAME = "MNI152 2009c nonlinear symmetric (nilearn bundle)"
TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
# Template T1 values (0..255) of the tissue classes, measured on the template itself:
# CSF ~75, grey matter ~167, white matter ~220.
T1_KNOTS = (0.0, 75.0, 167.0, 220.0, 255.0)
DIST_STEP = 2  # voxels (mm) of the head-shell distance map


@dataclass(frozen=True)
class Template:
    t1: np.ndarray  # uint8, MNI voxel grid (i, j, k), RAS
    gm: np.ndarray  # uint8 probability * 255
    wm: np.ndarray  # uint8 probability * 255
    dist: np.ndarray  # float32, mm outside the brain mask, on a DIST_STEP grid
    affine_ras: np.ndarray  # voxel -> RAS mm
    center_lps: np.ndarray  # centre of the brain's bounding box, LPS mm


def template_dir() -> Path:
    """nilearn's bundled data folder (found without importing nilearn)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "nilearn is not installed; it ships the MNI152 template (pip install nilearn)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"


@lru_cache(maxsize=1)
def load_template() -> Template:
    """The MNI152 2009c template (T1, GM, WM at 1 mm) and the derived head-shell distance."""
    import nibabel as nib

    folder = template_dir()
    arrays: dict[str, np.ndarray] = {}
    affine: np.ndarray | None = None
    for key, name in TEMPLATE_FILES.items():
        path = folder / name
        if not path.is_file():
            raise RuntimeError(f"MNI152 template file missing: {path} (reinstall nilearn)")
        img: Any = nib.load(path)
        arrays[key] = np.ascontiguousarray(np.asarray(img.dataobj, dtype=np.uint8))
        if affine is None:
            affine = np.asarray(img.affine, dtype=float)
    assert affine is not None
    mask = arrays["t1"] > 0
    coarse = mask[::DIST_STEP, ::DIST_STEP, ::DIST_STEP]
    dist = ndimage.distance_transform_edt(~coarse, sampling=float(DIST_STEP))
    nz = np.argwhere(mask)
    mid = (nz.min(axis=0) + nz.max(axis=0)) / 2.0
    center_ras = affine @ np.append(mid, 1.0)
    center_lps = center_ras[:3] * np.array([-1.0, -1.0, 1.0])
    return Template(
        arrays["t1"], arrays["gm"], arrays["wm"], dist.astype(np.float32), affine, center_lps
    )

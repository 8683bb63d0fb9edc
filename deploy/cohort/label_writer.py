"""Write a label volume as NIfTI, in the format the hospital's loader reads
(`fedmri.client.labels`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from fedmri.common.geometry import LPS_TO_RAS


def write_label_nifti(label: np.ndarray, affine_lps: np.ndarray, path: Path) -> None:
    """Save a label volume (indexed slice, row, col, on the grid of `affine_lps`) as NIfTI.

    The array is stored as is, in (s, r, c) order; the NIfTI affine is the same grid in RAS
    (diag(-1, -1, 1, 1) @ affine_lps), as NIfTI requires, set as both sform and qform."""
    array = np.asarray(label)
    if array.ndim != 3:
        raise ValueError(f"label must be 3D (slice, row, col), got {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.rint(array)):
            raise ValueError("label values must be integers")
        array = array.astype(np.int64)
    lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
    dtype: type[np.integer[Any]]
    if lo >= 0 and hi <= np.iinfo(np.uint8).max:
        dtype = np.uint8
    elif np.iinfo(np.int16).min <= lo and hi <= np.iinfo(np.int16).max:
        dtype = np.int16
    else:
        dtype = np.int32
    affine_ras = LPS_TO_RAS @ np.asarray(affine_lps, dtype=np.float64)
    image = nib.Nifti1Image(array.astype(dtype), affine_ras)
    image.set_sform(affine_ras, code=1)
    image.set_qform(affine_ras, code=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))

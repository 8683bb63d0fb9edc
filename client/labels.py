"""Reading a series' segmentation: ``label.nii.gz`` beside the DICOM files.

The file format (also what `fedmri synth` writes): a NIfTI whose array is indexed
(slice, row, col) on the series grid, with that grid's affine in RAS, as NIfTI requires
(LPS_TO_RAS @ the series' index -> LPS affine).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from fedmri.common.geometry import LPS_TO_RAS


def read_label_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(array indexed slice, row, col; affine index -> LPS mm) of a label NIfTI in the
    format above (or any NIfTI whose voxel axes are in (s, r, c) order)."""
    image: Any = nib.load(str(path))
    array = np.asarray(image.dataobj)
    affine_lps = LPS_TO_RAS @ np.asarray(image.affine, dtype=np.float64)
    return array, affine_lps

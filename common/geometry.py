"""Voxel grids in patient space, and resampling between them.

Convention used everywhere in fedmri: a volume is an array indexed (slice, row, column)
and a 4x4 affine maps the homogeneous index (s, r, c, 1) to DICOM patient coordinates
(LPS, millimetres). For a DICOM series that is: origin = ImagePositionPatient of the
first slice along the normal, column axis = row direction cosines x column spacing,
row axis = column direction cosines x row spacing, slice axis = normal x slice spacing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# LPS (DICOM) <-> RAS (NIfTI) is its own inverse: flip x and y.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Volume:
    """An image on a grid in patient space."""

    array: np.ndarray  # (slices, rows, cols)
    affine: np.ndarray  # 4x4, index (s, r, c, 1) -> LPS mm

    @property
    def shape(self) -> tuple[int, int, int]:
        s, r, c = self.array.shape
        return int(s), int(r), int(c)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Millimetres between neighbours along (slice, row, col)."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return float(norms[0]), float(norms[1]), float(norms[2])

    def center_mm(self) -> np.ndarray:
        """Patient coordinates of the volume's centre."""
        mid = (np.asarray(self.array.shape, dtype=float) - 1.0) / 2.0
        return (self.affine @ np.append(mid, 1.0))[:3]


def grid_affine(axes: np.ndarray, spacing: tuple[float, float, float],
                center_mm: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Affine of a grid whose unit axes (columns of `axes`, for s, r, c) are spaced
    `spacing` mm apart and whose centre voxel sits at `center_mm`."""
    affine = np.eye(4)
    affine[:3, :3] = axes * np.asarray(spacing, dtype=float)[None, :]
    mid = (np.asarray(shape, dtype=float) - 1.0) / 2.0
    affine[:3, 3] = np.asarray(center_mm, dtype=float) - affine[:3, :3] @ mid
    return affine


def model_grid(center_mm: np.ndarray, size: int, fov_mm: float) -> np.ndarray:
    """The model's input grid: size^3 isotropic voxels covering fov_mm, axes aligned with
    patient axes (slice = superior->inferior reversed to S, row = P, col = L) so that every
    acquisition orientation lands in the same frame."""
    # (s, r, c) -> (z up, y posterior, x left): axial slices, row down = posterior, col = left.
    axes = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    spacing = fov_mm / size
    return grid_affine(axes, (spacing, spacing, spacing), center_mm, (size, size, size))


def index_points(affine_from: np.ndarray, affine_to: np.ndarray,
                 shape: tuple[int, int, int]) -> np.ndarray:
    """Indices in the `affine_from` grid of every voxel of the `affine_to` grid, (3, *shape)."""
    mapping = np.linalg.inv(affine_from) @ affine_to
    idx = np.indices(shape, dtype=np.float64).reshape(3, -1)
    pts = mapping[:3, :3] @ idx + mapping[:3, 3:4]
    return pts.reshape((3, *shape))


def resample(volume: Volume, out_affine: np.ndarray, out_shape: tuple[int, int, int],
             order: int = 1, cval: float = 0.0) -> Volume:
    """Sample `volume` on another grid (order 1: trilinear for images, 0: nearest for labels)."""
    pts = index_points(volume.affine, out_affine, out_shape)
    out = ndimage.map_coordinates(volume.array, pts, order=order, mode="constant", cval=cval,
                                  prefilter=False)
    return Volume(out.astype(volume.array.dtype, copy=False), out_affine)

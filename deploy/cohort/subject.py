"""Everything random about one subject and its exam, drawn from one generator.

Anatomy: the template under a random affine (rotation, scale, translation) about the brain
centre, then a random smooth displacement in template space. Exam: acquisition plane, tilt,
field-of-view centring, bias field and the noise seed, after the site's scanner profile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from fedmri.common.geometry import grid_affine
from fedmri.deploy.cohort.profiles import ORIENTATIONS, ScannerProfile
from fedmri.deploy.cohort.template import Template

DISP_STEP = 4  # voxels (mm) between samples of the upsampled displacement field
CTRL_STEP = 24.0  # mm between control points of the random displacement
MEAN_SCALE = 0.95  # native brain size relative to the MNI152 template


def rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    """Rotation matrix about `axis` (any length) by `degrees` (Rodrigues' formula)."""
    axis = np.asarray(axis, dtype=float)
    axis = axis / np.linalg.norm(axis)
    a = math.radians(degrees)
    k = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    return np.eye(3) + math.sin(a) * k + (1.0 - math.cos(a)) * (k @ k)


@dataclass
class SubjectDraw:
    """Everything random about one subject and its exam."""

    inv_affine: np.ndarray  # 4x4, subject LPS -> template LPS
    displacement: np.ndarray  # (3, ...) float32, template voxels, on a DISP_STEP grid
    acq_affine: np.ndarray  # 4x4, acquisition index -> LPS
    shape: tuple[int, int, int]
    shell_scale: float
    tissue_jitter: np.ndarray  # multiplicative jitter of csf, gm, wm signal
    gain: float
    bias_coarse: np.ndarray  # log bias on a coarse grid over the acquisition
    noise_seed: int
    params: dict[str, Any]


def draw_subject(
    profile: ScannerProfile, rng: np.random.Generator, template: Template
) -> SubjectDraw:
    """Draw one subject (anatomy) and its exam (positioning, tilt, bias, noise seed) from
    `rng`, in a fixed order so the same generator state gives the same subject."""
    # Anatomy: affine about the brain centre, then a smooth displacement in template space.
    angles = rng.uniform(-10.0, 10.0, 3)
    rot = (
        rotation(np.array([1.0, 0, 0]), angles[0])
        @ rotation(np.array([0, 1.0, 0]), angles[1])
        @ rotation(np.array([0, 0, 1.0]), angles[2])
    )
    # The MNI152 brain is larger than a typical native brain (group averages are built in
    # an enlarged space), so subjects are ~5% smaller on average, then +-8% and a little
    # anisotropy.
    scale = MEAN_SCALE * rng.uniform(0.92, 1.08) * rng.uniform(0.97, 1.03, 3)
    shift = rng.uniform(-8.0, 8.0, 3) + np.asarray(profile.table_offset_mm)
    lin = rot @ np.diag(scale)
    c = template.center_lps
    fwd = np.eye(4)
    fwd[:3, :3] = lin
    fwd[:3, 3] = c + shift - lin @ c
    inv_affine = np.linalg.inv(fwd)

    shape_t = np.asarray(template.t1.shape)
    ctrl_shape = tuple(int(v) for v in np.ceil((shape_t - 1) / CTRL_STEP).astype(int) + 1)
    amp = rng.uniform(1.5, 3.0)
    disp_shape = tuple(int(v) for v in (shape_t - 1) // DISP_STEP + 1)
    fine = np.indices(disp_shape, dtype=np.float64) * (DISP_STEP / CTRL_STEP)
    comps = []
    for _ in range(3):
        ctrl = ndimage.gaussian_filter(rng.standard_normal(ctrl_shape), 1.0, mode="nearest")
        ctrl *= amp / max(float(ctrl.std()), 1e-6)
        comps.append(ndimage.map_coordinates(ctrl, fine, order=3, mode="nearest"))
    displacement = np.stack(comps).astype(np.float32)

    # Exam: orientation, tilt, positioning.
    axes = ORIENTATIONS[profile.orientation]
    tilt = rotation(axes[:, 2], profile.oblique_deg)
    jitter_axis = rng.standard_normal(3)
    jitter = rotation(jitter_axis, rng.uniform(0.0, profile.oblique_jitter_deg))
    acq_axes = jitter @ tilt @ axes
    center = c + shift + rng.uniform(-3.0, 3.0, 3)  # the technician centres the FOV roughly
    shape = (profile.slices, profile.matrix[0], profile.matrix[1])
    spacing = (profile.spacing_mm, profile.pixel_mm[0], profile.pixel_mm[1])
    acq_affine = grid_affine(acq_axes, spacing, center, shape)

    bias_coarse = rng.standard_normal((3, 4, 4))
    bias_coarse = ndimage.gaussian_filter(bias_coarse, 0.7, mode="nearest")
    bias_coarse *= profile.bias / max(float(bias_coarse.std()), 1e-6)
    params = {
        "rotation_deg": [round(float(a), 3) for a in angles],
        "scale": [round(float(s), 4) for s in scale],
        "translation_mm": [round(float(t), 3) for t in shift],
        "deformation_mm": round(float(amp), 3),
    }
    return SubjectDraw(
        inv_affine=inv_affine,
        displacement=displacement,
        acq_affine=acq_affine,
        shape=shape,
        shell_scale=float(rng.uniform(0.85, 1.2)),
        tissue_jitter=rng.normal(1.0, 0.03, 3),
        gain=float(rng.uniform(0.9, 1.1)),
        bias_coarse=bias_coarse,
        noise_seed=int(rng.integers(0, 2**31 - 1)),
        params=params,
    )

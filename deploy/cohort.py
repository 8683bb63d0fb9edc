"""A synthetic multi-hospital cohort for brain-tissue segmentation, built from real anatomy.

Anatomy: the MNI152 2009c symmetric T1 template and its grey/white-matter probability maps,
which ship inside nilearn's wheel (1 mm, RAS). Every subject is the template under its own
random smooth deformation and random affine (rotation, scale, translation); every hospital
is a scanner profile (contrast, bias field, noise, slice thickness, matrix and pixel size,
acquisition orientation and obliquity, patient-table offset), so hospitals are non-IID.

One sampling per subject composes everything:

    acquisition voxel -> LPS mm -> inverse subject affine -> RAS -> MNI voxel
                      -> + smooth displacement -> sample T1, GM, WM (and head-shell distance)

Thick slices average several sub-samples across the slice; the label is the argmax of the
slab-averaged [background, grey, white] probabilities on the same acquisition grid, so image
and label describe the same partial-volume voxel.

Layout written under OUT:

    OUT/hospital-1/sub-001/series/*.dcm + label.nii.gz
    ...
    OUT/test-site/sub-001/series/...     (a held-back scanner profile)
    OUT/cohort.json                      (written last: without it the cohort is incomplete)

Everything is a pure function of the seed: the same seed gives the same pixel data and UIDs.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from fedmri.common.geometry import Volume, grid_affine
from fedmri.common.layout import HOSPITAL_PREFIX, TEST_SITE

FORMAT = "fedmri-cohort/1"
LABELS = {0: "background", 1: "grey matter", 2: "white matter"}
MANIFEST = "cohort.json"
PARTIAL = ".partial"  # staging folder; a finished subject is renamed out of it

_TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
# Template T1 values (0..255) of the tissue classes, measured on the template itself:
# CSF ~75, grey matter ~167, white matter ~220.
_T1_KNOTS = (0.0, 75.0, 167.0, 220.0, 255.0)
_DISP_STEP = 4  # voxels (mm) between samples of the upsampled displacement field
_CTRL_STEP = 24.0  # mm between control points of the random displacement
_DIST_STEP = 2  # voxels (mm) of the head-shell distance map
_MEAN_SCALE = 0.95  # native brain size relative to the MNI152 template

# Signal (0..1) of the tissues, per contrast: CSF, grey, white, brightest white matter,
# then the head shell outside the brain: CSF rim, skull, scalp (fat).
CONTRASTS: dict[str, dict[str, float]] = {
    "t1-mprage": {
        "csf": 0.12,
        "gm": 0.52,
        "wm": 0.82,
        "wm_hi": 0.9,
        "rim": 0.1,
        "skull": 0.05,
        "scalp": 0.85,
    },
    "t1-spin-echo": {
        "csf": 0.25,
        "gm": 0.55,
        "wm": 0.74,
        "wm_hi": 0.8,
        "rim": 0.22,
        "skull": 0.06,
        "scalp": 0.9,
    },
    "t1-spgr": {
        "csf": 0.18,
        "gm": 0.47,
        "wm": 0.68,
        "wm_hi": 0.74,
        "rim": 0.15,
        "skull": 0.05,
        "scalp": 0.8,
    },
    "t2-fse": {
        "csf": 1.0,
        "gm": 0.6,
        "wm": 0.4,
        "wm_hi": 0.36,
        "rim": 0.95,
        "skull": 0.04,
        "scalp": 0.55,
    },
    "pd": {
        "csf": 0.72,
        "gm": 0.8,
        "wm": 0.62,
        "wm_hi": 0.6,
        "rim": 0.7,
        "skull": 0.05,
        "scalp": 0.7,
    },
    "flair": {
        "csf": 0.08,
        "gm": 0.7,
        "wm": 0.5,
        "wm_hi": 0.47,
        "rim": 0.1,
        "skull": 0.04,
        "scalp": 0.5,
    },
}


def _axes(
    slice_dir: tuple[float, float, float],
    row_dir: tuple[float, float, float],
    col_dir: tuple[float, float, float],
) -> np.ndarray:
    """Axes matrix for grid_affine: columns are the unit (slice, row, col) directions."""
    return np.column_stack([slice_dir, row_dir, col_dir]).astype(float)


# Acquisition axes in LPS, as a DICOM exporter writes them. The row direction is the
# direction down the rows (DICOM column cosines), the col direction is along a row (DICOM
# row cosines), and the slice normal is col x row.
ORIENTATIONS: dict[str, np.ndarray] = {
    # IOP (1,0,0, 0,1,0): rows run posterior, columns run left, normal +S
    "axial": _axes((0, 0, 1), (0, 1, 0), (1, 0, 0)),
    # IOP (0,1,0, 0,0,-1): rows run inferior, columns run posterior, normal -L (right)
    "sagittal": _axes((-1, 0, 0), (0, 0, -1), (0, 1, 0)),
    # IOP (1,0,0, 0,0,-1): rows run inferior, columns run left, normal +P
    "coronal": _axes((0, 1, 0), (0, 0, -1), (1, 0, 0)),
}


@dataclass(frozen=True)
class ScannerProfile:
    """How one hospital's scanner acquires and exports a brain series."""

    name: str
    contrast: str  # key of CONTRASTS
    orientation: str  # key of ORIENTATIONS
    matrix: tuple[int, int]  # rows, cols
    pixel_mm: tuple[float, float]  # row spacing, col spacing
    slice_mm: float  # slice thickness
    gap_mm: float  # gap between slices (spacing = thickness + gap)
    slices: int
    oblique_deg: float  # fixed tilt about the in-plane column axis
    oblique_jitter_deg: float  # per-exam extra tilt (technician's alignment)
    gamma: float  # signal ** gamma (contrast curve of the reconstruction)
    bias: float  # std of the log bias field (receive-coil inhomogeneity)
    noise: float  # noise std as a fraction of full scale
    rician: bool  # magnitude image (Rician) or Gaussian noise
    scale: float  # scanner units of full scale
    skull_stripped: bool  # the site exports brain-extracted images
    table_offset_mm: tuple[float, float, float]  # where the head sits in patient coordinates
    field_t: float  # MagneticFieldStrength, for the headers
    manufacturer: str

    @property
    def spacing_mm(self) -> float:
        return self.slice_mm + self.gap_mm

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["spacing_mm"] = self.spacing_mm
        out["signal"] = dict(CONTRASTS[self.contrast])
        return out


# Training sites, in order; hospital-k uses BASE_PROFILES[(k-1) % len] (jittered on reuse).
BASE_PROFILES: tuple[ScannerProfile, ...] = (
    ScannerProfile(
        name="t1-mprage-axial",
        contrast="t1-mprage",
        orientation="axial",
        matrix=(128, 128),
        pixel_mm=(1.8, 1.8),
        slice_mm=3.0,
        gap_mm=0.0,
        slices=56,
        oblique_deg=0.0,
        oblique_jitter_deg=3.0,
        gamma=1.0,
        bias=0.10,
        noise=0.015,
        rician=True,
        scale=1000.0,
        skull_stripped=False,
        table_offset_mm=(0.0, 0.0, 0.0),
        field_t=3.0,
        manufacturer="SynthA",
    ),
    ScannerProfile(
        name="t1-se-sagittal",
        contrast="t1-spin-echo",
        orientation="sagittal",
        matrix=(144, 160),
        pixel_mm=(1.5, 1.5),
        slice_mm=4.0,
        gap_mm=0.5,
        slices=36,
        oblique_deg=0.0,
        oblique_jitter_deg=4.0,
        gamma=0.85,
        bias=0.25,
        noise=0.03,
        rician=True,
        scale=2500.0,
        skull_stripped=False,
        table_offset_mm=(0.0, 0.0, -40.0),
        field_t=1.5,
        manufacturer="SynthB",
    ),
    ScannerProfile(
        name="t1-spgr-coronal",
        contrast="t1-spgr",
        orientation="coronal",
        matrix=(112, 112),
        pixel_mm=(1.95, 1.95),
        slice_mm=5.0,
        gap_mm=0.0,
        slices=44,
        oblique_deg=6.0,
        oblique_jitter_deg=3.0,
        gamma=1.15,
        bias=0.15,
        noise=0.025,
        rician=True,
        scale=800.0,
        skull_stripped=False,
        table_offset_mm=(5.0, -10.0, 25.0),
        field_t=1.5,
        manufacturer="SynthC",
    ),
    ScannerProfile(
        name="t2-fse-coronal",
        contrast="t2-fse",
        orientation="coronal",
        matrix=(112, 112),
        pixel_mm=(1.95, 1.95),
        slice_mm=5.0,
        gap_mm=0.0,
        slices=44,
        oblique_deg=6.0,
        oblique_jitter_deg=3.0,
        gamma=1.0,
        bias=0.15,
        noise=0.025,
        rician=True,
        scale=800.0,
        skull_stripped=False,
        table_offset_mm=(5.0, -10.0, 25.0),
        field_t=1.5,
        manufacturer="SynthC",
    ),
    ScannerProfile(
        name="pd-axial-oblique-stripped",
        contrast="pd",
        orientation="axial",
        matrix=(160, 160),
        pixel_mm=(1.4, 1.4),
        slice_mm=5.0,
        gap_mm=0.0,
        slices=34,
        oblique_deg=12.0,
        oblique_jitter_deg=3.0,
        gamma=1.2,
        bias=0.12,
        noise=0.02,
        rician=False,
        scale=4000.0,
        skull_stripped=True,
        table_offset_mm=(0.0, 20.0, 0.0),
        field_t=3.0,
        manufacturer="SynthA",
    ),
    ScannerProfile(
        name="flair-sagittal",
        contrast="flair",
        orientation="sagittal",
        matrix=(128, 144),
        pixel_mm=(1.7, 1.7),
        slice_mm=3.5,
        gap_mm=0.0,
        slices=46,
        oblique_deg=-5.0,
        oblique_jitter_deg=3.0,
        gamma=1.1,
        bias=0.2,
        noise=0.035,
        rician=True,
        scale=1500.0,
        skull_stripped=False,
        table_offset_mm=(-8.0, 0.0, 15.0),
        field_t=3.0,
        manufacturer="SynthD",
    ),
)

# The held-back site: a T1 scanner unlike every training site (coronal oblique, coarse
# anisotropic pixels, strong bias field, heavy noise, compressed contrast curve).
TEST_PROFILE = ScannerProfile(
    name="t1-coronal-oblique-lowfield",
    contrast="t1-mprage",
    orientation="coronal",
    matrix=(96, 104),
    pixel_mm=(2.3, 2.2),
    slice_mm=4.0,
    gap_mm=1.0,
    slices=44,
    oblique_deg=-14.0,
    oblique_jitter_deg=4.0,
    gamma=0.75,
    bias=0.35,
    noise=0.04,
    rician=True,
    scale=600.0,
    skull_stripped=False,
    table_offset_mm=(0.0, -25.0, -20.0),
    field_t=0.5,
    manufacturer="SynthE",
)


def hospital_profile(index: int, seed: int) -> ScannerProfile:
    """Profile of training site `index` (1-based). The first len(BASE_PROFILES) sites use the
    base profiles as they are; later sites reuse them with seeded changes of matrix, slice
    thickness, obliquity, contrast curve, bias, noise, scale and table position."""
    if index < 1:
        raise ValueError(f"hospital index must be >= 1, got {index}")
    base = BASE_PROFILES[(index - 1) % len(BASE_PROFILES)]
    cycle = (index - 1) // len(BASE_PROFILES)
    if cycle == 0:
        return base
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7919, index]))
    pix = float(np.round(rng.uniform(1.4, 2.0), 2))
    fov = base.matrix[0] * base.pixel_mm[0], base.matrix[1] * base.pixel_mm[1]
    thick = float(np.round(rng.uniform(2.5, 5.0), 1))
    coverage = base.slices * base.spacing_mm
    offset = np.round(rng.uniform(-30.0, 30.0, 3))
    return replace(
        base,
        name=f"{base.name}-v{cycle + 1}",
        matrix=(int(round(fov[0] / pix)), int(round(fov[1] / pix))),
        pixel_mm=(pix, pix),
        slice_mm=thick,
        slices=int(math.ceil(coverage / (thick + base.gap_mm))),
        oblique_deg=float(np.round(base.oblique_deg + rng.uniform(-8.0, 8.0), 1)),
        gamma=float(np.round(base.gamma * rng.uniform(0.8, 1.25), 2)),
        bias=float(np.round(rng.uniform(0.05, 0.3), 2)),
        noise=float(np.round(rng.uniform(0.01, 0.045), 3)),
        scale=float(np.round(base.scale * rng.uniform(0.5, 2.0))),
        table_offset_mm=(float(offset[0]), float(offset[1]), float(offset[2])),
    )


# --------------------------------------------------------------------------- template


@dataclass(frozen=True)
class Template:
    t1: np.ndarray  # uint8, MNI voxel grid (i, j, k), RAS
    gm: np.ndarray  # uint8 probability * 255
    wm: np.ndarray  # uint8 probability * 255
    dist: np.ndarray  # float32, mm outside the brain mask, on a _DIST_STEP grid
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
    for key, name in _TEMPLATE_FILES.items():
        path = folder / name
        if not path.is_file():
            raise RuntimeError(f"MNI152 template file missing: {path} (reinstall nilearn)")
        img: Any = nib.load(path)
        arrays[key] = np.ascontiguousarray(np.asarray(img.dataobj, dtype=np.uint8))
        if affine is None:
            affine = np.asarray(img.affine, dtype=float)
    assert affine is not None
    mask = arrays["t1"] > 0
    coarse = mask[::_DIST_STEP, ::_DIST_STEP, ::_DIST_STEP]
    dist = ndimage.distance_transform_edt(~coarse, sampling=float(_DIST_STEP))
    nz = np.argwhere(mask)
    mid = (nz.min(axis=0) + nz.max(axis=0)) / 2.0
    center_ras = affine @ np.append(mid, 1.0)
    center_lps = center_ras[:3] * np.array([-1.0, -1.0, 1.0])
    return Template(
        arrays["t1"], arrays["gm"], arrays["wm"], dist.astype(np.float32), affine, center_lps
    )


# --------------------------------------------------------------------------- subjects


def _rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    axis = np.asarray(axis, dtype=float)
    axis = axis / np.linalg.norm(axis)
    a = math.radians(degrees)
    k = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    return np.eye(3) + math.sin(a) * k + (1.0 - math.cos(a)) * (k @ k)


@dataclass
class SubjectDraw:
    """Everything random about one subject and its exam."""

    inv_affine: np.ndarray  # 4x4, subject LPS -> template LPS
    displacement: np.ndarray  # (3, ...) float32, template voxels, on a _DISP_STEP grid
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
        _rotation(np.array([1.0, 0, 0]), angles[0])
        @ _rotation(np.array([0, 1.0, 0]), angles[1])
        @ _rotation(np.array([0, 0, 1.0]), angles[2])
    )
    # The MNI152 brain is larger than a typical native brain (group averages are built in
    # an enlarged space), so subjects are ~5% smaller on average, then +-8% and a little
    # anisotropy.
    scale = _MEAN_SCALE * rng.uniform(0.92, 1.08) * rng.uniform(0.97, 1.03, 3)
    shift = rng.uniform(-8.0, 8.0, 3) + np.asarray(profile.table_offset_mm)
    lin = rot @ np.diag(scale)
    c = template.center_lps
    fwd = np.eye(4)
    fwd[:3, :3] = lin
    fwd[:3, 3] = c + shift - lin @ c
    inv_affine = np.linalg.inv(fwd)

    shape_t = np.asarray(template.t1.shape)
    ctrl_shape = tuple(int(v) for v in np.ceil((shape_t - 1) / _CTRL_STEP).astype(int) + 1)
    amp = rng.uniform(1.5, 3.0)
    disp_shape = tuple(int(v) for v in (shape_t - 1) // _DISP_STEP + 1)
    fine = np.indices(disp_shape, dtype=np.float64) * (_DISP_STEP / _CTRL_STEP)
    comps = []
    for _ in range(3):
        ctrl = ndimage.gaussian_filter(rng.standard_normal(ctrl_shape), 1.0, mode="nearest")
        ctrl *= amp / max(float(ctrl.std()), 1e-6)
        comps.append(ndimage.map_coordinates(ctrl, fine, order=3, mode="nearest"))
    displacement = np.stack(comps).astype(np.float32)

    # Exam: orientation, tilt, positioning.
    axes = ORIENTATIONS[profile.orientation]
    tilt = _rotation(axes[:, 2], profile.oblique_deg)
    jitter_axis = rng.standard_normal(3)
    jitter = _rotation(jitter_axis, rng.uniform(0.0, profile.oblique_jitter_deg))
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


def synthesize(
    profile: ScannerProfile, draw: SubjectDraw, template: Template
) -> tuple[Volume, np.ndarray]:
    """Image (scanner units, float32) and label (uint8) on the subject's acquisition grid."""
    shape = draw.shape
    n = int(np.prod(shape))
    lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    mapping = np.linalg.inv(template.affine_ras) @ lps_to_ras @ draw.inv_affine @ draw.acq_affine
    idx = np.indices(shape, dtype=np.float64).reshape(3, -1)
    centre = mapping[:3, :3] @ idx + mapping[:3, 3:4]
    del idx
    # The displacement is smooth on a scale of centimetres: look it up once per voxel and
    # reuse it for the sub-samples across the slice.
    for k in range(3):
        centre[k] += ndimage.map_coordinates(
            draw.displacement[k], centre / _DISP_STEP, order=1, mode="nearest", prefilter=False
        )
    step = mapping[:3, 0:1]  # template voxels per acquisition slice index
    subs = max(1, int(math.ceil(profile.slice_mm / 1.25)))
    offsets = ((np.arange(subs) + 0.5) / subs - 0.5) * (profile.slice_mm / profile.spacing_mm)

    sig = CONTRASTS[profile.contrast]
    jit = draw.tissue_jitter
    knots_y = np.array(
        [0.0, sig["csf"] * jit[0], sig["gm"] * jit[1], sig["wm"] * jit[2], sig["wm_hi"] * jit[2]]
    )
    s = draw.shell_scale
    shell_x = np.array([0.0, 0.5, 1.5, 2.5, 3.5, 6.5, 7.5, 12.0, 14.0]) * s
    shell_y = np.array(
        [
            0.0,
            0.0,
            sig["rim"],
            sig["rim"],
            sig["skull"],
            sig["skull"],
            sig["scalp"],
            sig["scalp"],
            0.0,
        ]
    )

    signal = np.zeros(n, dtype=np.float64)
    gm = np.zeros(n, dtype=np.float64)
    wm = np.zeros(n, dtype=np.float64)
    inside = np.zeros(n, dtype=np.float64)
    for off in offsets:
        pts = centre + off * step
        t1 = ndimage.map_coordinates(template.t1, pts, order=1, output=np.float32, prefilter=False)
        gm += ndimage.map_coordinates(template.gm, pts, order=1, output=np.float32, prefilter=False)
        wm += ndimage.map_coordinates(template.wm, pts, order=1, output=np.float32, prefilter=False)
        dist = ndimage.map_coordinates(
            template.dist,
            pts / _DIST_STEP,
            order=1,
            output=np.float32,
            mode="constant",
            cval=100.0,
            prefilter=False,
        )
        signal += np.interp(t1, _T1_KNOTS, knots_y)
        if profile.skull_stripped:
            inside += dist < 2.0
        else:
            signal += np.interp(dist, shell_x, shell_y)
    signal /= subs
    labels = np.argmax(np.stack([255.0 * subs - gm - wm, gm, wm]), axis=0).astype(np.uint8)

    bias_pts = [
        np.linspace(0.0, b - 1.0, m) for b, m in zip(draw.bias_coarse.shape, shape, strict=True)
    ]
    log_bias = ndimage.map_coordinates(
        draw.bias_coarse,
        np.stack(np.meshgrid(*bias_pts, indexing="ij")).reshape(3, -1),
        order=3,
        mode="nearest",
    )
    image = np.clip(signal, 0.0, None) ** profile.gamma * np.exp(log_bias)
    noise_rng = np.random.default_rng(draw.noise_seed)
    sigma = profile.noise
    if profile.rician:
        image = np.hypot(image + noise_rng.normal(0.0, sigma, n), noise_rng.normal(0.0, sigma, n))
    else:
        image = np.clip(image + noise_rng.normal(0.0, sigma, n), 0.0, None)
    if profile.skull_stripped:
        image *= inside / subs > 0.5
    image *= profile.scale * draw.gain
    return (Volume(image.reshape(shape).astype(np.float32), draw.acq_affine), labels.reshape(shape))


# --------------------------------------------------------------------------- cohort


def _subject_seed(seed: int, site: int, subject: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed, 104729, site, subject])


def _first_dicom_uids(files: list[Path]) -> dict[str, str]:
    import pydicom

    if not files:
        return {}
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    return {"study_uid": str(ds.StudyInstanceUID), "series_uid": str(ds.SeriesInstanceUID)}


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _write_subject(
    out: Path,
    site: str,
    site_index: int,
    k: int,
    profile: ScannerProfile,
    seed: int,
    template: Template,
) -> dict[str, Any]:
    """Synthesize and write one subject; its manifest entry (a pure function of the seed)."""
    from fedmri.common.dicom_write import write_label_nifti, write_mr_series

    ss = _subject_seed(seed, site_index, k)
    rng = np.random.default_rng(ss)
    draw = draw_subject(profile, rng, template)
    volume, labels = synthesize(profile, draw, template)

    subject = f"sub-{k:03d}"
    patient_id = f"{site}-{k:03d}"
    stage = out / PARTIAL / site / subject
    if stage.exists():
        shutil.rmtree(stage)
    series_dir = stage / "series"
    series_dir.mkdir(parents=True)
    files = write_mr_series(
        volume,
        series_dir,
        patient_id=patient_id,
        series_description=f"{profile.name} {profile.orientation}",
        seed=int(ss.generate_state(1, dtype=np.uint32)[0]),
        institution=site,
        extra={
            "SliceThickness": profile.slice_mm,
            "SpacingBetweenSlices": profile.spacing_mm,
            "MagneticFieldStrength": profile.field_t,
            "Manufacturer": profile.manufacturer,
        },
    )
    write_label_nifti(labels, volume.affine, series_dir / "label.nii.gz")
    final = out / site / subject
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        shutil.rmtree(final)
    os.replace(stage, final)

    counts = np.bincount(labels.ravel(), minlength=3)
    brain = max(int(counts[1] + counts[2]), 1)
    entry: dict[str, Any] = {
        "id": subject,
        "patient_id": patient_id,
        "path": f"{site}/{subject}/series",
        "label": f"{site}/{subject}/series/label.nii.gz",
        "files": len(files),
        "shape": list(volume.shape),
        "spacing_mm": [round(v, 4) for v in volume.spacing],
        "voxels": {LABELS[i]: int(counts[i]) for i in range(3)},
        "grey_fraction_of_brain": round(float(counts[1]) / brain, 4),
        "anatomy": draw.params,
    }
    entry.update(_first_dicom_uids([final / "series" / f.name for f in files]))
    return entry


def generate_cohort(
    out: Path,
    hospitals: int,
    subjects: int,
    seed: int,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write `hospitals` training sites and one held-back `test-site`, each with `subjects`
    subjects, under `out`; return the manifest (also written last as out/cohort.json)."""
    if hospitals < 1:
        raise ValueError(f"need at least 1 hospital, got {hospitals}")
    if subjects < 1:
        raise ValueError(f"need at least 1 subject per hospital, got {subjects}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        manifest_path.unlink()  # an interrupted rewrite must not look finished
    say = progress or (lambda _msg: None)
    t_start = time.perf_counter()
    template = load_template()
    say(f"template loaded ({time.perf_counter() - t_start:.1f} s)")

    sites: list[tuple[str, int, str, ScannerProfile]] = [
        (f"{HOSPITAL_PREFIX}{i}", i, "train", hospital_profile(i, seed))
        for i in range(1, hospitals + 1)
    ]
    sites.append((TEST_SITE, 0, "test", TEST_PROFILE))
    site_entries: list[dict[str, Any]] = []
    all_subjects: list[dict[str, Any]] = []
    for site, index, role, profile in sites:
        entries = []
        for k in range(1, subjects + 1):
            t0 = time.perf_counter()
            entry = _write_subject(out, site, index, k, profile, seed, template)
            entry["site"] = site
            entries.append(entry)
            all_subjects.append(
                {
                    "site": site,
                    "role": role,
                    **{key: entry[key] for key in ("id", "patient_id", "path", "label")},
                }
            )
            say(
                f"{site} {entry['id']} {profile.name} "
                f"{'x'.join(map(str, entry['shape']))} in {time.perf_counter() - t0:.1f} s"
            )
        site_entries.append(
            {"name": site, "role": role, "profile": profile.to_dict(), "subjects": entries}
        )
    partial = out / PARTIAL
    if partial.exists():
        shutil.rmtree(partial)

    manifest: dict[str, Any] = {
        "format": FORMAT,
        "seed": seed,
        "hospitals": [s["name"] for s in site_entries if s["role"] == "train"],
        "test_site": TEST_SITE,
        "subjects_per_site": subjects,
        "labels": {str(k): v for k, v in LABELS.items()},
        "template": {
            "name": "MNI152 2009c nonlinear symmetric (nilearn bundle)",
            "files": list(_TEMPLATE_FILES.values()),
        },
        "sites": site_entries,
        "subjects": all_subjects,
    }
    _write_json_atomic(manifest_path, manifest)
    elapsed = time.perf_counter() - t_start
    say(f"wrote {len(all_subjects)} subjects in {elapsed:.1f} s -> {manifest_path}")
    return manifest

"""Training cases from a hospital's data folder: accepted DICOM series plus their labels.

Layout the trainer expects: each series in its own folder, with the segmentation beside
it as ``label.nii.gz`` on the same grid as the series (format: `fedmri.client.labels`,
array in (slice, row, col) order, RAS affine). Every case is resampled onto the model grid
(`geometry.model_grid`: size^3 isotropic voxels over fov_mm, centred on the series, axes
aligned with the patient) so all acquisition orientations land in the same frame.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmri.client.dicom import SeriesResult, scan
from fedmri.client.labels import read_label_nifti
from fedmri.common.geometry import Volume, model_grid, resample

__all__ = ["LABEL_NAME", "Case", "load_cases", "normalize_intensity", "split_cases"]

LABEL_NAME = "label.nii.gz"
#: Percentiles (inside the acquired volume) mapped to 0 and 1 by the intensity normalization.
LOW_PERCENTILE = 1.0
HIGH_PERCENTILE = 99.0


@dataclass
class Case:
    """One training case on the model grid."""

    name: str  # series folder relative to the data folder
    image: np.ndarray  # float32 (1, D, D, D), intensities in [0, 1]
    label: np.ndarray  # int64 (D, D, D)


def normalize_intensity(
    array: np.ndarray, reference: np.ndarray | None = None
) -> tuple[np.ndarray, float, float]:
    """Map the 1st..99th percentile of `reference` (default: `array`) to 0..1, clipped.

    Returns (normalized float32 array, low, high); raises ValueError for a constant image."""
    ref = np.asarray(array if reference is None else reference, dtype=np.float64)
    low, high = (float(v) for v in np.percentile(ref, [LOW_PERCENTILE, HIGH_PERCENTILE]))
    if not high > low:
        raise ValueError(f"image intensities are constant (1st and 99th percentile {low:g})")
    out = (np.asarray(array, dtype=np.float64) - low) / (high - low)
    return np.clip(out, 0.0, 1.0).astype(np.float32), low, high


def _affine_tolerance(volume: Volume) -> float:
    return max(1e-3, 0.01 * min(volume.spacing))


def _case(
    result: SeriesResult, volume: Volume, data_dir: Path, size: int, fov_mm: float
) -> tuple[Case | None, str | None]:
    """(case, None) or (None, reason)."""
    label_path = result.path / LABEL_NAME
    if not label_path.is_file():
        return None, (
            f"no {LABEL_NAME} in {result.path}: put the segmentation of this series there "
            "(same grid as the series, see fedmri.client.labels)"
        )
    try:
        label_array, label_affine = read_label_nifti(label_path)
    except Exception as exc:  # nibabel raises several types on damaged files
        return None, f"cannot read {label_path}: {type(exc).__name__}: {exc}"
    label_array = np.squeeze(label_array) if label_array.ndim > 3 else label_array
    if label_array.shape != volume.shape:
        return None, (
            f"{label_path} has shape {tuple(label_array.shape)} but the series has "
            f"{volume.shape} (slice, row, col); write the label on the series grid"
        )
    diff = float(np.max(np.abs(label_affine - volume.affine)))
    if diff > _affine_tolerance(volume):
        return None, (
            f"{label_path} affine differs from the series geometry by up to {diff:g} mm; "
            "the label was drawn on another grid (or flipped), write it on the series grid"
        )
    integral = np.issubdtype(label_array.dtype, np.integer) or (
        np.all(np.isfinite(label_array)) and np.array_equal(label_array, np.rint(label_array))
    )
    if not integral:
        return None, f"{label_path} holds non-integer values; labels must be class indices"
    if label_array.size and int(np.min(label_array)) < 0:
        return None, f"{label_path} holds negative values; labels must be class indices >= 0"

    try:
        _, low, high = normalize_intensity(volume.array)
    except ValueError as exc:
        return None, f"{exc}; nothing to learn from this series"
    grid = model_grid(volume.center_mm(), size, fov_mm)
    shape = (size, size, size)
    image = resample(volume, grid, shape, order=1, cval=low)
    labels = resample(
        Volume(label_array.astype(np.int64), volume.affine), grid, shape, order=0, cval=0
    )
    normalized = np.clip((image.array.astype(np.float64) - low) / (high - low), 0.0, 1.0)
    rel = result.path.resolve().relative_to(data_dir.resolve()).as_posix()
    case = Case(
        name=rel,
        image=normalized.astype(np.float32)[None],
        label=labels.array.astype(np.int64),
    )
    return case, None


def load_cases(
    data_dir: Path, size: int, fov_mm: float = 192.0
) -> tuple[list[Case], list[SeriesResult]]:
    """Scan `data_dir`, pair each accepted series with its label.nii.gz, and resample both
    onto the model grid (image trilinear, label nearest).

    Returns the cases sorted by name (the series folder relative to `data_dir`) and every
    scan result; series without a usable label are turned into rejected results with the
    reason, so callers can report them."""
    data_dir = Path(data_dir)
    if size < 1 or fov_mm <= 0:
        raise ValueError(f"size must be >= 1 and fov_mm > 0, got {size}, {fov_mm}")
    built: dict[str | None, tuple[Case | None, str | None]] = {}

    def build(result: SeriesResult, volume: Volume) -> None:
        # Resample while the scan holds the volume: the pixels are read once.
        built[result.series_uid] = _case(result, volume, data_dir, size, fov_mm)

    results = scan(data_dir, on_volume=build)
    per_folder: dict[Path, int] = defaultdict(int)
    for r in results:
        if r.accepted:
            per_folder[r.path] += 1
    cases: list[Case] = []
    out: list[SeriesResult] = []
    for r in results:
        if not r.accepted:
            out.append(r)
            continue
        reason: str | None
        if per_folder[r.path] > 1:
            reason = (
                f"{per_folder[r.path]} series share the folder {r.path} and so one "
                f"{LABEL_NAME}; put each series in its own folder with its own label"
            )
            out.append(dataclasses.replace(r, status="rejected", reason=reason))
            continue
        case, reason = built[r.series_uid]
        if case is None:
            out.append(dataclasses.replace(r, status="rejected", reason=reason))
        else:
            cases.append(case)
            out.append(r)
    cases.sort(key=lambda c: c.name)
    return cases, out


def split_cases(
    cases: list[Case], val_fraction: float = 0.25, seed: int = 0
) -> tuple[list[Case], list[Case]]:
    """Deterministic train/validation split (same cases and seed give the same split);
    with two or more cases each side gets at least one. Both lists are sorted by name."""
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
    ordered = sorted(cases, key=lambda c: c.name)
    n = len(ordered)
    if n < 2:
        return ordered, []
    n_val = min(max(int(round(n * val_fraction)), 1), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    val_idx = set(int(i) for i in perm[:n_val])
    train = [c for i, c in enumerate(ordered) if i not in val_idx]
    val = [c for i, c in enumerate(ordered) if i in val_idx]
    return train, val

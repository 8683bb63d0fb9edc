"""DICOM ingestion: find MR series in a hospital export and build 3D volumes from them.

`scan(root)` walks a folder tree, groups DICOM files by SeriesInstanceUID, and for every
series says whether it is usable ("accepted", with shape and spacing) or why not
("rejected", with a reason a person can act on that names the file, tag or value).
`load_series(...)` builds the `Volume` of one series.

Volumes come from the geometry in the headers, never from file names, file order or
InstanceNumber: slices are sorted by their position along the image-plane normal
(rowdir x coldir of ImageOrientationPatient); the slice spacing comes from the positions,
which must be evenly spaced, distinct, and lie on a line along the normal. The array is
float32 indexed (slice, row, col) after RescaleSlope/RescaleIntercept, and the affine
follows `fedmri.common.geometry` (index -> LPS mm).

What the scan skips without a report: sidecar files ending in .nii, .nii.gz, .json,
.txt, .md or .png (labels, notes, previews that live beside the images), hidden files and
folders (names starting with "."), and DICOMDIR index files. Every other file is read
with pydicom; one unreadable file becomes its own "rejected" entry and never stops the
scan.

A series is rejected when it is: not MR (modality or SOP class), a localizer/scout
(ImageType LOCALIZER, a single slice, or mixed orientations), missing a geometry tag,
unevenly spaced, holding duplicate positions or duplicate images, sheared, multi-frame
without per-frame geometry, stored in a compressed transfer syntax whose decoder is not
installed (the reason names the pip packages), or truncated.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    UID,
    EnhancedMRImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    LegacyConvertedEnhancedMRImageStorage,
    MediaStorageDirectoryStorage,
    MRImageStorage,
)

from fedmri.common.geometry import Volume

__all__ = [
    "SIDECAR_SUFFIXES",
    "SeriesError",
    "SeriesResult",
    "load_series",
    "scan",
]

Status = Literal["accepted", "rejected"]

#: Files with these endings are never read as DICOM (labels and notes beside a series).
SIDECAR_SUFFIXES = (".nii", ".nii.gz", ".json", ".txt", ".md", ".png")

#: Direction cosines of two slices count as the same orientation within this.
ORIENTATION_TOL = 1e-3
#: Two slices closer than this along the normal (mm) are at the same position.
DUPLICATE_TOL_MM = 1e-2
#: A slice may sit this far from the even grid along the normal: max(mm, fraction of gap).
SPACING_TOL_MM = 1e-2
SPACING_TOL_FRACTION = 0.05
#: A slice may sit this far off the line along the normal: max(mm, fraction of a pixel).
INPLANE_TOL_MM = 1e-2
INPLANE_TOL_FRACTION = 0.1
#: In-plane pixel spacing of two slices counts as equal within this (mm).
PIXEL_SPACING_TOL_MM = 1e-3

_MR_IMAGE_CLASSES = {
    str(MRImageStorage),
    str(EnhancedMRImageStorage),
    str(LegacyConvertedEnhancedMRImageStorage),
}

_JPEG_HINT = "pip install pylibjpeg pylibjpeg-libjpeg (or: pip install python-gdcm)"
_JPEGLS_HINT = "pip install pyjpegls (or: pip install pylibjpeg pylibjpeg-libjpeg, or python-gdcm)"
_J2K_HINT = "pip install pylibjpeg pylibjpeg-openjpeg (or: pip install python-gdcm)"
_RLE_HINT = "pip install pylibjpeg pylibjpeg-rle"
_DECODER_HINTS = {
    "1.2.840.10008.1.2.4.50": _JPEG_HINT,
    "1.2.840.10008.1.2.4.51": _JPEG_HINT,
    "1.2.840.10008.1.2.4.57": _JPEG_HINT,
    "1.2.840.10008.1.2.4.70": _JPEG_HINT,
    "1.2.840.10008.1.2.4.80": _JPEGLS_HINT,
    "1.2.840.10008.1.2.4.81": _JPEGLS_HINT,
    "1.2.840.10008.1.2.4.90": _J2K_HINT,
    "1.2.840.10008.1.2.4.91": _J2K_HINT,
    "1.2.840.10008.1.2.4.92": _J2K_HINT,
    "1.2.840.10008.1.2.4.93": _J2K_HINT,
    "1.2.840.10008.1.2.4.201": _J2K_HINT,
    "1.2.840.10008.1.2.4.202": _J2K_HINT,
    "1.2.840.10008.1.2.4.203": _J2K_HINT,
    "1.2.840.10008.1.2.5": _RLE_HINT,
}


class SeriesError(ValueError):
    """A series (or file) cannot be used; the message says what, where, and what to do."""


@dataclass
class SeriesResult:
    """What the scan found for one series, or for one file that is not part of a series."""

    path: Path  # folder holding the series, or the file for single-file problems
    series_uid: str | None
    status: Status
    reason: str | None = None
    shape: tuple[int, int, int] | None = None
    spacing: tuple[float, float, float] | None = None  # mm along (slice, row, col)
    files: list[Path] = field(default_factory=list)

    @property
    def accepted(self) -> bool:
        return self.status == "accepted"

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "series_uid": self.series_uid,
            "status": self.status,
            "reason": self.reason,
            "shape": list(self.shape) if self.shape is not None else None,
            "spacing": list(self.spacing) if self.spacing is not None else None,
        }


# --------------------------------------------------------------------------- reading


def _is_sidecar(name: str) -> bool:
    lower = name.lower()
    return lower.startswith(".") or lower.endswith(SIDECAR_SUFFIXES)


def _walk(root: Path) -> Iterator[Path]:
    if root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not _is_sidecar(name):
                yield Path(dirpath) / name


def _has_dicm_prefix(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _looks_like_raw_dataset(path: Path) -> bool:
    """A DICOM dataset written without preamble and file meta starts with a group 0x0008
    (or 0x0002) tag, little or big endian; anything else is not worth a forced parse."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    return head[:2] in (b"\x08\x00", b"\x02\x00", b"\x00\x08", b"\x00\x02")


def _fix_transfer_syntax(ds: Dataset) -> None:
    """Give a dataset read without file meta the transfer syntax it was parsed with."""
    meta = ds.get("file_meta")
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = ds.original_encoding
    if implicit:
        uid = ImplicitVRLittleEndian
    elif little:
        uid = ExplicitVRLittleEndian
    else:
        uid = ExplicitVRBigEndian
    ds.ensure_file_meta()
    ds.file_meta.TransferSyntaxUID = uid


def _read(path: Path, *, header_only: bool) -> Dataset:
    """Read one file; raise SeriesError naming the file if it is not usable DICOM."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise SeriesError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if size == 0:
        raise SeriesError(f"empty file {path} (0 bytes): not DICOM; remove it or re-export")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=header_only)
            except InvalidDicomError:
                if not _looks_like_raw_dataset(path):
                    raise
                ds = pydicom.dcmread(path, stop_before_pixels=header_only, force=True)
                if "SOPInstanceUID" not in ds:
                    raise InvalidDicomError("no DICM prefix and no DICOM dataset") from None
                _fix_transfer_syntax(ds)
        except InvalidDicomError as exc:
            raise SeriesError(
                f"not a DICOM file: {path} (no 'DICM' header); move it out of the data "
                "folder, or give it one of the skipped endings "
                f"({', '.join(SIDECAR_SUFFIXES)})"
            ) from exc
        except OSError as exc:
            raise SeriesError(f"cannot read {path}: {exc.strerror or exc}") from exc
        except Exception as exc:  # pydicom raises many types on damaged files
            damaged = _has_dicm_prefix(path)
            kind = "truncated or corrupt DICOM file" if damaged else "not a DICOM file"
            raise SeriesError(
                f"{kind}: {path} ({type(exc).__name__}: {exc}); re-export it"
            ) from exc
    return ds


# --------------------------------------------------------------------------- geometry


@dataclass
class _Slice:
    path: Path
    frame: int | None  # frame index in a multi-frame file, None for a single-frame file
    position: np.ndarray | None
    orientation: np.ndarray | None
    pixel_spacing: tuple[float, float] | None
    rows: int | None
    cols: int | None
    slope: float
    intercept: float


def _numbers(value: Any, n: int, keyword: str, where: str) -> np.ndarray | None:
    if value is None or value == "":
        return None
    try:
        seq = [value] if isinstance(value, (str, bytes, int, float)) else list(value)
        out = np.array([float(v) for v in seq], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise SeriesError(f"{keyword} in {where} is not numeric: {value!r}") from exc
    if out.shape != (n,) or not np.all(np.isfinite(out)):
        raise SeriesError(f"{keyword} in {where} must be {n} numbers, got {value!r}")
    return out


def _number(value: Any, default: float, keyword: str, where: str) -> float:
    if value is None or value == "":
        return default
    try:
        out = float(value)
    except (TypeError, ValueError) as exc:
        raise SeriesError(f"{keyword} in {where} is not a number: {value!r}") from exc
    if not np.isfinite(out):
        raise SeriesError(f"{keyword} in {where} is not finite: {value!r}")
    return out


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _group_value(item: Dataset | None, shared: Dataset | None, seq: str, keyword: str) -> Any:
    """`keyword` from the first item of functional group `seq`, per-frame before shared."""
    for container in (item, shared):
        if container is None:
            continue
        group = container.get(seq)
        if group and len(group) > 0 and keyword in group[0]:
            return group[0].get(keyword)
    return None


def _slices_of(path: Path, ds: Dataset, name: str) -> list[_Slice]:
    rows = _int_or_none(ds.get("Rows"))
    cols = _int_or_none(ds.get("Columns"))
    n_frames = _int_or_none(ds.get("NumberOfFrames")) or 1
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if n_frames > 1 and not per_frame:
        raise SeriesError(
            f"multi-frame file {name} has {n_frames} frames but no per-frame geometry "
            "(PerFrameFunctionalGroupsSequence with PlanePositionSequence); export the series "
            "as Enhanced MR or as one file per slice"
        )
    top_slope = _number(ds.get("RescaleSlope"), 1.0, "RescaleSlope", name)
    top_intercept = _number(ds.get("RescaleIntercept"), 0.0, "RescaleIntercept", name)
    if not per_frame:
        spacing = _numbers(ds.get("PixelSpacing"), 2, "PixelSpacing", name)
        return [
            _Slice(
                path=path,
                frame=None,
                position=_numbers(ds.get("ImagePositionPatient"), 3, "ImagePositionPatient", name),
                orientation=_numbers(
                    ds.get("ImageOrientationPatient"), 6, "ImageOrientationPatient", name
                ),
                pixel_spacing=None if spacing is None else (float(spacing[0]), float(spacing[1])),
                rows=rows,
                cols=cols,
                slope=top_slope,
                intercept=top_intercept,
            )
        ]
    if len(per_frame) != n_frames:
        raise SeriesError(
            f"{name} has NumberOfFrames {n_frames} but {len(per_frame)} items in "
            "PerFrameFunctionalGroupsSequence; the file is damaged, re-export it"
        )
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    out = []
    for i, item in enumerate(per_frame):
        where = f"frame {i + 1} of {name}"
        spacing = _numbers(
            _group_value(item, shared, "PixelMeasuresSequence", "PixelSpacing"),
            2,
            "PixelSpacing",
            where,
        )
        slope = _group_value(item, shared, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _group_value(
            item, shared, "PixelValueTransformationSequence", "RescaleIntercept"
        )
        out.append(
            _Slice(
                path=path,
                frame=i,
                position=_numbers(
                    _group_value(item, shared, "PlanePositionSequence", "ImagePositionPatient"),
                    3,
                    "ImagePositionPatient",
                    where,
                ),
                orientation=_numbers(
                    _group_value(
                        item, shared, "PlaneOrientationSequence", "ImageOrientationPatient"
                    ),
                    6,
                    "ImageOrientationPatient",
                    where,
                ),
                pixel_spacing=None if spacing is None else (float(spacing[0]), float(spacing[1])),
                rows=rows,
                cols=cols,
                slope=_number(slope, top_slope, "RescaleSlope", where),
                intercept=_number(intercept, top_intercept, "RescaleIntercept", where),
            )
        )
    return out


def _where(sl: _Slice, names: dict[Path, str]) -> str:
    name = names[sl.path]
    return name if sl.frame is None else f"frame {sl.frame + 1} of {name}"


def _examples(items: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _fmt(values: Sequence[float] | np.ndarray) -> str:
    return "[" + ", ".join(f"{float(v):g}" for v in values) + "]"


_GEOMETRY_TAGS = (
    ("position", "ImagePositionPatient (0020,0032)"),
    ("orientation", "ImageOrientationPatient (0020,0037)"),
    ("pixel_spacing", "PixelSpacing (0028,0030)"),
    ("rows", "Rows (0028,0010)"),
    ("cols", "Columns (0028,0011)"),
)


def _plan(slices: list[_Slice], names: dict[Path, str]) -> tuple[list[_Slice], np.ndarray]:
    """Slices sorted along the normal, and the affine of the volume they make."""
    n = len(slices)
    if n == 0:
        raise SeriesError("no images in the series")
    for attr, tag in _GEOMETRY_TAGS:
        missing = [_where(s, names) for s in slices if getattr(s, attr) is None]
        if missing:
            raise SeriesError(
                f"missing geometry tag {tag} in {len(missing)} of {n} images "
                f"({_examples(missing)}); re-export the series with full DICOM headers"
            )
    if n == 1:
        raise SeriesError(
            f"one slice, not a volume: {_where(slices[0], names)} is a single 2D image "
            "(a localizer, or only part of the series was exported); export the whole 3D series"
        )

    # One orientation for the whole series.
    first = slices[0]
    assert first.orientation is not None
    distinct: list[tuple[np.ndarray, str]] = [(first.orientation, _where(first, names))]
    for s in slices[1:]:
        assert s.orientation is not None
        if all(np.max(np.abs(s.orientation - o)) > ORIENTATION_TOL for o, _ in distinct):
            distinct.append((s.orientation, _where(s, names)))
    if len(distinct) > 1:
        listed = "; ".join(f"{_fmt(o)} in {w}" for o, w in distinct[:3])
        raise SeriesError(
            f"mixed orientations: {len(distinct)} different ImageOrientationPatient values "
            f"({listed}); a localizer/scout or several stacks in one series, not one volume"
        )
    row_dir, col_dir = first.orientation[:3], first.orientation[3:]
    if (
        abs(np.linalg.norm(row_dir) - 1.0) > ORIENTATION_TOL
        or abs(np.linalg.norm(col_dir) - 1.0) > ORIENTATION_TOL
        or abs(float(row_dir @ col_dir)) > ORIENTATION_TOL
    ):
        raise SeriesError(
            f"invalid ImageOrientationPatient {_fmt(first.orientation)} in "
            f"{_where(first, names)}: direction cosines must be two perpendicular unit vectors"
        )
    row_dir = row_dir / np.linalg.norm(row_dir)
    col_dir = col_dir / np.linalg.norm(col_dir)
    normal = np.cross(row_dir, col_dir)
    normal /= np.linalg.norm(normal)

    # One image size and one pixel spacing.
    sizes = {(s.rows, s.cols) for s in slices}
    if len(sizes) > 1:
        raise SeriesError(
            "image size differs between slices (Rows x Columns: "
            + ", ".join(f"{r}x{c}" for r, c in sorted(sizes, key=str))
            + "); not one volume"
        )
    pixel = np.array([s.pixel_spacing for s in slices], dtype=np.float64)
    if np.any(pixel <= 0):
        raise SeriesError(
            f"PixelSpacing must be positive, got {_fmt(pixel[np.any(pixel <= 0, 1)][0])}"
        )
    if np.max(np.abs(pixel - pixel[0])) > PIXEL_SPACING_TOL_MM:
        odd = int(np.argmax(np.max(np.abs(pixel - pixel[0]), axis=1)))
        raise SeriesError(
            f"PixelSpacing differs between slices: {_fmt(pixel[0])} in "
            f"{_where(slices[0], names)}, {_fmt(pixel[odd])} in {_where(slices[odd], names)}"
        )

    # Sort along the normal; positions must be distinct, evenly spaced, on one line.
    positions = np.array([s.position for s in slices], dtype=np.float64)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along = along[order]
    positions = positions[order]
    ordered = [slices[int(i)] for i in order]
    gaps = np.diff(along)
    dup = np.flatnonzero(gaps < DUPLICATE_TOL_MM)
    if dup.size:
        pairs = [
            f"{along[i]:g} mm ({_where(ordered[i], names)} and {_where(ordered[i + 1], names)})"
            for i in dup
        ]
        raise SeriesError(
            f"duplicate slice positions: {dup.size} pair(s) of images at the same position "
            f"along the normal, at {_examples(pairs)}; the series holds several echoes, phases "
            "or repeats — export each as its own series"
        )
    spacing = float((along[-1] - along[0]) / (n - 1))
    residual = along - (along[0] + spacing * np.arange(n))
    tol = max(SPACING_TOL_MM, SPACING_TOL_FRACTION * spacing)
    if np.max(np.abs(residual)) > tol:
        worst = int(np.argmax(np.abs(gaps - spacing)))
        raise SeriesError(
            f"uneven slice spacing: gaps between neighbouring slices range from "
            f"{gaps.min():g} to {gaps.max():g} mm (even spacing would be {spacing:g} mm); "
            f"the gap of {gaps[worst]:g} mm lies between positions {along[worst]:g} and "
            f"{along[worst + 1]:g} mm ({_where(ordered[worst], names)}, "
            f"{_where(ordered[worst + 1], names)}); a slice is missing or stacks are mixed"
        )
    offsets = positions - positions[0] - np.outer(along - along[0], normal)
    lateral = np.linalg.norm(offsets, axis=1)
    in_tol = max(INPLANE_TOL_MM, INPLANE_TOL_FRACTION * float(pixel[0].min()))
    if np.max(lateral) > in_tol:
        worst = int(np.argmax(lateral))
        raise SeriesError(
            f"slice positions do not lie along the slice normal: {_where(ordered[worst], names)} "
            f"is {lateral[worst]:g} mm off the line through the first slice (sheared or tilted "
            "stack, or mixed stacks); not supported"
        )

    row_spacing, col_spacing = float(pixel[0][0]), float(pixel[0][1])
    affine = np.eye(4)
    affine[:3, 0] = normal * spacing
    affine[:3, 1] = col_dir * row_spacing
    affine[:3, 2] = row_dir * col_spacing
    affine[:3, 3] = positions[0]
    return ordered, affine


# --------------------------------------------------------------------------- checks


def _check_headers(items: list[tuple[Path, Dataset]], names: dict[Path, str]) -> None:
    """Series-level checks that need no pixel data, most fundamental first."""
    uids = {str(ds.get("SeriesInstanceUID", "")) for _, ds in items}
    if len(uids) > 1:
        raise SeriesError(
            f"the files belong to {len(uids)} different series (SeriesInstanceUID); "
            "load one series at a time"
        )
    modalities: dict[str, list[str]] = {}
    for path, ds in items:
        modalities.setdefault(str(ds.get("Modality", "") or ""), []).append(names[path])
    for modality, where in modalities.items():
        if not modality:
            raise SeriesError(
                f"missing Modality (0008,0060) in {_examples(where)}; cannot tell it is MR"
            )
        if modality != "MR":
            raise SeriesError(
                f"modality {modality}, not MR ({_examples(where)}); only MR series are used"
            )
    for path, ds in items:
        sop_class = str(ds.get("SOPClassUID", "") or "")
        if sop_class not in _MR_IMAGE_CLASSES:
            label = UID(sop_class).name if sop_class else "missing SOPClassUID (0008,0016)"
            raise SeriesError(
                f"{names[path]} is {label}, not an MR image (MR, Enhanced MR or Legacy "
                "Converted Enhanced MR Image Storage)"
            )
    for path, ds in items:
        image_type = ds.get("ImageType") or []
        if isinstance(image_type, str):
            image_type = [image_type]
        values = [str(v).upper() for v in image_type]
        if any("LOCALIZER" in v for v in values):
            shown = "\\".join(values)
            raise SeriesError(
                f"localizer: ImageType {shown} in {names[path]}; scout images are not a volume"
            )
    for path, ds in items:
        samples = _int_or_none(ds.get("SamplesPerPixel")) or 1
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
        if samples != 1 or not photometric.startswith("MONOCHROME"):
            raise SeriesError(
                f"{names[path]} is a colour image ({photometric}, {samples} samples per pixel); "
                "expected grayscale MR"
            )
    seen: dict[str, str] = {}
    for path, ds in items:
        sop = str(ds.get("SOPInstanceUID", "") or "")
        if sop and sop in seen:
            raise SeriesError(
                f"the same image twice: {seen[sop]} and {names[path]} have SOPInstanceUID {sop} "
                "(the series was exported twice?); remove one copy"
            )
        seen[sop] = names[path]


def _transfer_syntax(ds: Dataset) -> UID | None:
    meta = ds.get("file_meta")
    if meta is None or "TransferSyntaxUID" not in meta:
        return None
    return UID(str(meta.TransferSyntaxUID))


def _decode_problem(ds: Dataset, name: str, exc: Exception) -> str:
    """A reason for pixel data that could not be decoded."""
    ts = _transfer_syntax(ds)
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        return f"no pixel data in {name} (truncated file, or not an image); re-export it"
    if ts is not None and ts.is_compressed:
        label = f"{ts.name} ({ts})"
        hint = _DECODER_HINTS.get(str(ts))
        try:
            from pydicom.pixels import get_decoder

            available = get_decoder(ts).is_available
        except NotImplementedError:
            return (
                f"compressed transfer syntax {label} in {name} cannot be decoded by pydicom at "
                "all; re-export the series uncompressed (Explicit VR Little Endian)"
            )
        what = (
            "no decoder for it is installed"
            if not available
            else f"the installed decoders failed ({first_line})"
        )
        todo = f"; install one: {hint}" if hint else "; re-export the series uncompressed"
        return f"compressed transfer syntax {label} in {name}: {what}{todo}"
    return f"truncated or corrupt pixel data in {name}: {first_line}; re-export the file"


def _pixels(path: Path, ds: Dataset, name: str) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return np.asarray(ds.pixel_array)
        except Exception as exc:  # any decoder or data error becomes a reason
            raise SeriesError(_decode_problem(ds, name, exc)) from exc


def _names_for(paths: Sequence[Path]) -> dict[Path, str]:
    """Short names for files: relative to their common folder."""
    if not paths:
        return {}
    base = _common_folder(paths)
    out = {}
    for p in paths:
        try:
            out[p] = p.relative_to(base).as_posix()
        except ValueError:
            out[p] = str(p)
    return out


def _common_folder(paths: Sequence[Path]) -> Path:
    return Path(os.path.commonpath([str(p.parent) for p in paths]))


# --------------------------------------------------------------------------- public


def load_series(result_or_files: SeriesResult | Sequence[Path | str]) -> Volume:
    """Build the volume of one series from its files (or a `SeriesResult` from `scan`).

    Raises SeriesError with a reason a person can act on when the files do not make one
    MR volume."""
    if isinstance(result_or_files, SeriesResult):
        paths = list(result_or_files.files)
    else:
        paths = [Path(p) for p in result_or_files]
    if not paths:
        raise SeriesError("no files given for the series")
    names = _names_for(paths)
    items = [(p, _read(p, header_only=False)) for p in paths]
    _check_headers(items, names)
    arrays = {p: _pixels(p, ds, names[p]) for p, ds in items}
    slices = [s for p, ds in items for s in _slices_of(p, ds, names[p])]
    ordered, affine = _plan(slices, names)
    first = ordered[0]
    assert first.rows is not None and first.cols is not None
    out = np.empty((len(ordered), first.rows, first.cols), dtype=np.float32)
    for k, s in enumerate(ordered):
        arr = arrays[s.path]
        if s.frame is None:
            plane = arr if arr.ndim == 2 else None
        elif arr.ndim == 3 and s.frame < arr.shape[0]:
            plane = arr[s.frame]
        elif arr.ndim == 2 and s.frame == 0:
            plane = arr
        else:
            plane = None
        if plane is None or plane.shape != (first.rows, first.cols):
            raise SeriesError(
                f"pixel data of {_where(s, names)} has shape {arr.shape}, but the header says "
                f"{first.rows}x{first.cols}; the file is damaged, re-export it"
            )
        out[k] = plane.astype(np.float64) * s.slope + s.intercept
    return Volume(out, affine)


def scan(
    root: Path,
    *,
    progress: Callable[[str, int, int], None] | None = None,
    on_volume: Callable[[SeriesResult, Volume], None] | None = None,
) -> list[SeriesResult]:
    """Find every series under `root` and say whether it is usable, and why not.

    Results come in the order of each series' first file in a sorted walk (deterministic).
    `progress(stage, done, total)` is called while reading ("read") and checking
    ("check"), for progress bars. Checking builds every volume; `on_volume(result, volume)`
    receives each accepted one, so a caller that needs the pixels does not read them again."""
    root = Path(root)
    files = list(_walk(root))
    entries: list[tuple[int, SeriesResult]] = []
    groups: dict[str, list[Path]] = {}
    first_index: dict[str, int] = {}
    for i, path in enumerate(files):
        if progress is not None:
            progress("read", i, len(files))
        try:
            ds = _read(path, header_only=True)
            uid = str(ds.get("SeriesInstanceUID", "") or "")
            if not uid:
                if str(ds.get("SOPClassUID", "")) == str(MediaStorageDirectoryStorage) or (
                    "DirectoryRecordSequence" in ds
                ):
                    continue  # DICOMDIR index: not an image, skipped by design
                raise SeriesError(
                    f"DICOM file {path} has no SeriesInstanceUID (0020,000E): truncated, or "
                    "not an image; re-export it or move it out of the data folder"
                )
        except SeriesError as exc:
            entries.append((i, SeriesResult(path, None, "rejected", str(exc), files=[path])))
            continue
        except Exception as exc:  # never let one file stop the scan
            entries.append(
                (
                    i,
                    SeriesResult(
                        path,
                        None,
                        "rejected",
                        f"cannot read {path}: {type(exc).__name__}: {exc}",
                        files=[path],
                    ),
                )
            )
            continue
        groups.setdefault(uid, []).append(path)
        first_index.setdefault(uid, i)
    if progress is not None:
        progress("read", len(files), len(files))

    for j, (uid, paths) in enumerate(groups.items()):
        if progress is not None:
            progress("check", j, len(groups))
        folder = _common_folder(paths)
        try:
            volume = load_series(paths)
        except SeriesError as exc:
            result = SeriesResult(folder, uid, "rejected", str(exc), files=paths)
        except Exception as exc:  # never let one series stop the scan
            result = SeriesResult(
                folder,
                uid,
                "rejected",
                f"cannot read series: {type(exc).__name__}: {exc}",
                files=paths,
            )
        else:
            result = SeriesResult(
                folder,
                uid,
                "accepted",
                None,
                shape=volume.shape,
                spacing=(
                    round(volume.spacing[0], 6),
                    round(volume.spacing[1], 6),
                    round(volume.spacing[2], 6),
                ),
                files=paths,
            )
            if on_volume is not None:
                on_volume(result, volume)
        entries.append((first_index[uid], result))
    if progress is not None:
        progress("check", len(groups), len(groups))
    entries.sort(key=lambda e: e[0])
    return [r for _, r in entries]

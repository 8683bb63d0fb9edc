"""Write synthetic MR series as real DICOM files.

Used by the synthetic cohort and by tests: the files are ordinary DICOM that any
viewer or PACS accepts, with full patient-space geometry, so the ingestion in
`fedmri.client.dicom` reads them by the same rules as a hospital export.

Geometry follows `fedmri.common.geometry`: a `Volume` is indexed (slice, row, col) and
its affine maps (s, r, c, 1) to LPS millimetres. For the files that means
ImageOrientationPatient = (column axis, normalized; row axis, normalized),
PixelSpacing = (row spacing, column spacing), ImagePositionPatient of slice k = affine
applied to (k, 0, 0). Classic DICOM cannot express a sheared stack, so the slice axis must
be perpendicular to the image plane; it may point either way along the plane's normal
(a reader that sorts by position then returns the slices in the opposite order, with an
affine describing the same physical image).

No real patient data is written: the patient name is always ``SYNTH^<patient_id>`` and
dates are fixed. UIDs are derived from (seed, patient_id, series_description), so the same
call writes the same files; give different series different descriptions or seeds.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

from fedmri.common.geometry import Volume

__all__ = ["write_enhanced_mr", "write_mr_series"]

_U16_MAX = 65535
_GEOMETRY_TOL = 1e-4  # relative, for the perpendicular-slice-axis check


def _uid(seed: int, patient_id: str, series_description: str, *parts: str) -> UID:
    return generate_uid(entropy_srcs=[str(seed), patient_id, series_description, *parts])


def _ds_value(x: float) -> float:
    """`x` rounded to what a DICOM DS string (16 characters) can hold."""
    return float(format_number_as_ds(float(x)))


def _rescale(array: np.ndarray) -> tuple[np.ndarray, float, float]:
    """uint16 stored values plus (slope, intercept) such that
    stored * slope + intercept is within slope / 2 of every value of `array`.

    Slope and intercept are chosen as numbers a DS string holds exactly, so the bound
    survives the trip through the file."""
    values = np.asarray(array, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError("volume has NaN or infinite values; DICOM cannot store them")
    vmin = float(values.min()) if values.size else 0.0
    vmax = float(values.max()) if values.size else 0.0
    # Intercept: a DS number at or below the minimum.
    intercept = _ds_value(vmin)
    step = max(abs(vmin), 1.0) * 1e-12
    while intercept > vmin:
        step *= 2.0
        intercept = _ds_value(vmin - step)
    span = vmax - intercept
    if span <= 0.0:
        return np.zeros(values.shape, dtype=np.uint16), 1.0, intercept
    slope = _ds_value(span / _U16_MAX)
    grow = 1.0 + 1e-9
    while span / slope > _U16_MAX:
        slope = _ds_value(slope * grow)
        grow = 1.0 + (grow - 1.0) * 2.0
    stored = np.rint((values - intercept) / slope)
    return np.clip(stored, 0, _U16_MAX).astype(np.uint16), slope, intercept


def _plane_geometry(
    affine: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float, float]:
    """(row_dir, col_dir, normal, row_spacing, col_spacing, slice_spacing) of an affine."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got {a.shape}")
    slice_axis, row_axis, col_axis = a[:3, 0], a[:3, 1], a[:3, 2]
    slice_spacing = float(np.linalg.norm(slice_axis))
    row_spacing = float(np.linalg.norm(row_axis))
    col_spacing = float(np.linalg.norm(col_axis))
    if min(slice_spacing, row_spacing, col_spacing) <= 0.0:
        raise ValueError("affine has a zero-length axis")
    row_dir = col_axis / col_spacing  # direction along a row = increasing column index
    col_dir = row_axis / row_spacing  # direction down a column = increasing row index
    if abs(float(row_dir @ col_dir)) > _GEOMETRY_TOL:
        raise ValueError("affine row and column axes are not perpendicular")
    normal = np.cross(row_dir, col_dir)
    if abs(abs(float(normal @ slice_axis)) / slice_spacing - 1.0) > _GEOMETRY_TOL:
        raise ValueError(
            "affine slice axis is not perpendicular to the image plane; "
            "DICOM MR images cannot describe a sheared stack"
        )
    return row_dir, col_dir, normal, row_spacing, col_spacing, slice_spacing


def _base_dataset(
    *,
    sop_class: UID,
    sop_uid: UID,
    study_uid: str,
    series_uid: UID,
    frame_uid: UID,
    patient_id: str,
    series_description: str,
    institution: str,
    rows: int,
    cols: int,
) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "FEDMRI_SYNTH"

    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = "20000101"
    ds.SeriesDate = "20000101"
    ds.StudyTime = "120000"
    ds.SeriesTime = "120000"
    ds.AccessionNumber = ""
    ds.Modality = "MR"
    ds.Manufacturer = "fedmri"
    ds.InstitutionName = institution
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "fedmri synthetic study"
    ds.SeriesDescription = series_description
    ds.PatientName = f"SYNTH^{patient_id}"
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    return ds


def _apply_extra(ds: Dataset, extra: dict[str, Any] | None) -> None:
    for keyword, value in (extra or {}).items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)


def _file_name(sop_uid: str) -> str:
    # Named by a hash of the instance UID: file order says nothing about slice order.
    return hashlib.sha256(sop_uid.encode("ascii")).hexdigest()[:20] + ".dcm"


def _common_uids(
    seed: int, patient_id: str, series_description: str, study_uid: str | None
) -> tuple[str, UID, UID]:
    study = study_uid or _uid(seed, patient_id, "", "study")
    series = _uid(seed, patient_id, series_description, "series")
    frame = _uid(seed, patient_id, series_description, "frame-of-reference")
    return study, series, frame


def _check_3d(array: np.ndarray) -> tuple[int, int, int]:
    if array.ndim != 3:
        raise ValueError(f"volume array must be 3D (slice, row, col), got {array.shape}")
    n_slices, rows, cols = (int(n) for n in array.shape)
    return n_slices, rows, cols


def write_mr_series(
    volume: Volume,
    out_dir: Path,
    *,
    patient_id: str,
    series_description: str,
    seed: int,
    institution: str = "fedmri synthetic",
    study_uid: str | None = None,
    extra: dict[str, Any] | None = None,
) -> list[Path]:
    """Write `volume` as one MR Image Storage file per slice into `out_dir`.

    Pixel values are stored as uint16 with one RescaleSlope/RescaleIntercept for the
    series, so reading back gives every value within slope / 2. File names are hashes of
    the SOPInstanceUIDs (not in slice order). `extra` maps DICOM keywords to values set
    on every slice after the defaults (None deletes the element), e.g. to make test
    series with a CT modality or without ImagePositionPatient. Returns the paths, in
    slice order.
    """
    array = np.asarray(volume.array)
    n_slices, rows, cols = _check_3d(array)
    row_dir, col_dir, normal, row_spacing, col_spacing, slice_spacing = _plane_geometry(
        volume.affine
    )
    stored, slope, intercept = _rescale(array)
    study, series, frame = _common_uids(seed, patient_id, series_description, study_uid)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    paths: list[Path] = []
    for k in range(n_slices):
        sop_uid = _uid(seed, patient_id, series_description, "instance", str(k))
        ds = _base_dataset(
            sop_class=MRImageStorage,
            sop_uid=sop_uid,
            study_uid=study,
            series_uid=series,
            frame_uid=frame,
            patient_id=patient_id,
            series_description=series_description,
            institution=institution,
            rows=rows,
            cols=cols,
        )
        position = (np.asarray(volume.affine, dtype=np.float64) @ np.array([k, 0.0, 0.0, 1.0]))[:3]
        ds.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
        ds.ScanningSequence = "RM"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "3D"
        ds.EchoTime = None
        ds.EchoTrainLength = None
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [format_number_as_ds(float(v)) for v in position]
        ds.ImageOrientationPatient = [format_number_as_ds(float(v)) for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [format_number_as_ds(row_spacing), format_number_as_ds(col_spacing)]
        ds.SliceThickness = format_number_as_ds(slice_spacing)
        ds.SpacingBetweenSlices = format_number_as_ds(slice_spacing)
        ds.SliceLocation = format_number_as_ds(float(position @ normal))
        ds.RescaleIntercept = format_number_as_ds(intercept)
        ds.RescaleSlope = format_number_as_ds(slope)
        ds.RescaleType = "US"
        ds.PixelData = np.ascontiguousarray(stored[k]).astype("<u2").tobytes()
        _apply_extra(ds, extra)
        path = out_dir / _file_name(str(sop_uid))
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_enhanced_mr(
    volume: Volume,
    path: Path,
    *,
    patient_id: str,
    series_description: str,
    seed: int,
    institution: str = "fedmri synthetic",
    study_uid: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `volume` as one Enhanced MR Image Storage file (multi-frame, one frame per
    slice) with per-frame positions and shared orientation, spacing and rescale, the way
    modern scanners export. `extra` works as in `write_mr_series`."""
    array = np.asarray(volume.array)
    n_slices, rows, cols = _check_3d(array)
    row_dir, col_dir, _normal, row_spacing, col_spacing, slice_spacing = _plane_geometry(
        volume.affine
    )
    stored, slope, intercept = _rescale(array)
    study, series, frame = _common_uids(seed, patient_id, series_description, study_uid)
    sop_uid = _uid(seed, patient_id, series_description, "enhanced-instance")
    ds = _base_dataset(
        sop_class=EnhancedMRImageStorage,
        sop_uid=sop_uid,
        study_uid=study,
        series_uid=series,
        frame_uid=frame,
        patient_id=patient_id,
        series_description=series_description,
        institution=institution,
        rows=rows,
        cols=cols,
    )
    ds.ImageType = ["DERIVED", "SECONDARY", "OTHER", "NONE"]
    ds.InstanceNumber = 1
    ds.NumberOfFrames = n_slices
    ds.ContentQualification = "RESEARCH"
    ds.AcquisitionContrast = "UNKNOWN"
    ds.BurnedInAnnotation = "NO"

    measures = Dataset()
    measures.PixelSpacing = [format_number_as_ds(row_spacing), format_number_as_ds(col_spacing)]
    measures.SliceThickness = format_number_as_ds(slice_spacing)
    measures.SpacingBetweenSlices = format_number_as_ds(slice_spacing)
    orientation = Dataset()
    orientation.ImageOrientationPatient = [
        format_number_as_ds(float(v)) for v in (*row_dir, *col_dir)
    ]
    transform = Dataset()
    transform.RescaleIntercept = format_number_as_ds(intercept)
    transform.RescaleSlope = format_number_as_ds(slope)
    transform.RescaleType = "US"
    shared = Dataset()
    shared.PixelMeasuresSequence = DicomSequence([measures])
    shared.PlaneOrientationSequence = DicomSequence([orientation])
    shared.PixelValueTransformationSequence = DicomSequence([transform])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])

    affine = np.asarray(volume.affine, dtype=np.float64)
    per_frame: list[Dataset] = []
    for k in range(n_slices):
        position = (affine @ np.array([k, 0.0, 0.0, 1.0]))[:3]
        plane = Dataset()
        plane.ImagePositionPatient = [format_number_as_ds(float(v)) for v in position]
        content = Dataset()
        content.InStackPositionNumber = k + 1
        content.StackID = "1"
        item = Dataset()
        item.PlanePositionSequence = DicomSequence([plane])
        item.FrameContentSequence = DicomSequence([content])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    ds.PixelData = np.ascontiguousarray(stored).astype("<u2").tobytes()
    _apply_extra(ds, extra)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path

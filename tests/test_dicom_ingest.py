"""DICOM ingestion: volumes from header geometry, and a clear reason for every bad series."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import get_decoder
from pydicom.uid import JPEG2000Lossless, MRImageStorage, generate_uid

from fedmri.client.data_cli import main as data_main
from fedmri.client.dataset import load_cases, split_cases
from fedmri.client.dicom import SeriesResult, load_series, scan
from fedmri.client.labels import read_label_nifti
from fedmri.common.geometry import Volume, grid_affine
from fedmri.deploy.cohort.dicom_writer import write_enhanced_mr, write_mr_series
from fedmri.deploy.cohort.label_writer import write_label_nifti

# Axes (columns for slice, row, col) whose slice axis is rowdir x coldir, so a reader
# returns the slices in the order written.
AXIAL = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # s=S, r=P, c=L
SAGITTAL = np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])  # s=R, r=I, c=P


def _rotation(axis: list[float], degrees: float) -> np.ndarray:
    u = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    t = np.deg2rad(degrees)
    k = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * (k @ k)


OBLIQUE = _rotation([1.0, 1.0, 0.3], 25.0) @ AXIAL


def _volume(
    axes: np.ndarray = AXIAL,
    shape: tuple[int, int, int] = (6, 8, 9),
    spacing: tuple[float, float, float] = (2.5, 0.8, 0.9),
    center: tuple[float, float, float] = (-12.0, 30.5, 41.0),
    seed: int = 0,
) -> Volume:
    affine = grid_affine(axes, spacing, np.asarray(center), shape)
    rng = np.random.default_rng(seed)
    return Volume(rng.normal(300.0, 80.0, shape).astype(np.float32), affine)


def _write(
    vol: Volume, folder: Path, desc: str = "t1", extra: dict[str, Any] | None = None
) -> list[Path]:
    return write_mr_series(
        vol, folder, patient_id="p1", series_description=desc, seed=7, extra=extra
    )


def _testfile(name: str) -> Path:
    """A file shipped with pydicom (never downloaded)."""
    found = get_testdata_file(name, download=False)
    assert isinstance(found, str), f"pydicom test file {name} is not installed"
    return Path(found)


def _slope(path: Path) -> float:
    return float(pydicom.dcmread(path, stop_before_pixels=True).RescaleSlope)


def _only_series(results: list[SeriesResult]) -> SeriesResult:
    series = [r for r in results if r.series_uid is not None]
    assert len(series) == 1, [r.to_json() for r in results]
    return series[0]


def _rejected(root: Path) -> str:
    result = _only_series(scan(root))
    assert result.status == "rejected", result.to_json()
    assert result.reason
    return result.reason


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("axes", [AXIAL, SAGITTAL, OBLIQUE], ids=["axial", "sagittal", "oblique"])
def test_series_round_trips_whatever_file_names_and_instance_numbers(
    tmp_path: Path, axes: np.ndarray
) -> None:
    vol = _volume(axes)
    paths = _write(vol, tmp_path / "series")
    slope = _slope(paths[0])
    # Rename so file order is the reverse of slice order, and shuffle InstanceNumber.
    numbers = np.random.default_rng(1).permutation(len(paths)) + 1
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        ds.InstanceNumber = int(numbers[k])
        path.unlink()
        ds.save_as(path.parent / f"IM{len(paths) - k:04d}", enforce_file_format=True)

    result = _only_series(scan(tmp_path))
    assert result.status == "accepted", result.reason
    assert result.path == tmp_path / "series"
    assert result.shape == vol.shape
    assert result.spacing == pytest.approx((2.5, 0.8, 0.9))
    loaded = load_series(result)
    assert loaded.array.dtype == np.float32
    np.testing.assert_allclose(loaded.affine, vol.affine, atol=1e-6)
    assert np.max(np.abs(loaded.array - vol.array)) <= slope / 2 + 1e-4


def test_reversed_slice_axis_gives_the_same_physical_image(tmp_path: Path) -> None:
    axes = AXIAL * np.array([-1.0, 1.0, 1.0])  # slices run against rowdir x coldir
    vol = _volume(axes)
    paths = _write(vol, tmp_path)
    loaded = load_series(paths)
    n = vol.shape[0]
    flip = np.array([[-1.0, 0, 0, n - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    np.testing.assert_allclose(loaded.affine, vol.affine @ flip, atol=1e-6)
    assert np.max(np.abs(loaded.array - vol.array[::-1])) <= _slope(paths[0]) / 2 + 1e-4


def test_enhanced_multiframe_file_is_a_volume(tmp_path: Path) -> None:
    vol = _volume(OBLIQUE)
    path = write_enhanced_mr(
        vol, tmp_path / "enh" / "volume.dcm", patient_id="p1", series_description="e", seed=1
    )
    result = _only_series(scan(tmp_path))
    assert result.status == "accepted", result.reason
    loaded = load_series(result)
    np.testing.assert_allclose(loaded.affine, vol.affine, atol=1e-6)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    slope = float(
        ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0].RescaleSlope
    )
    assert np.max(np.abs(loaded.array - vol.array)) <= slope / 2 + 1e-4


def test_multiframe_without_per_frame_geometry_is_rejected(tmp_path: Path) -> None:
    write_enhanced_mr(
        _volume(),
        tmp_path / "volume.dcm",
        patient_id="p1",
        series_description="e",
        seed=1,
        extra={"PerFrameFunctionalGroupsSequence": None},
    )
    reason = _rejected(tmp_path)
    assert "no per-frame geometry" in reason and "volume.dcm" in reason


# Real files shipped with pydicom, in several transfer syntaxes: copies of one slice moved
# along the normal make a small volume whose pixels must equal pydicom's decoding.
@pytest.mark.parametrize(
    "name",
    [
        "MR_small.dcm",
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_jp2klossless.dcm",
    ],
)
def test_volume_from_real_pydicom_files(tmp_path: Path, name: str) -> None:
    source = pydicom.dcmread(_testfile(name))
    try:
        expected = source.pixel_array.astype(np.float32)
    except Exception as exc:  # pragma: no cover - depends on installed decoders
        pytest.skip(f"no decoder for {name}: {exc}")
    ipp = np.array([float(v) for v in source.ImagePositionPatient])
    iop = np.array([float(v) for v in source.ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    for k in (2, 0, 1):
        ds = pydicom.dcmread(_testfile(name))
        ds.ImagePositionPatient = [f"{v:.4f}" for v in ipp + 1.5 * k * normal]
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[name, str(k)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = 5 - k
        ds.save_as(tmp_path / f"copy{k}.dcm")
    result = _only_series(scan(tmp_path))
    assert result.status == "accepted", result.reason
    assert result.shape == (3, 64, 64)
    assert result.spacing == pytest.approx((1.5, 0.3125, 0.3125))
    loaded = load_series(result)
    for k in range(3):
        np.testing.assert_array_equal(loaded.array[k], expected)
    np.testing.assert_allclose(loaded.affine[:3, 3], ipp, atol=1e-4)


def test_every_pydicom_mr_test_file_gets_a_clear_result(tmp_path: Path) -> None:
    # The MR files shipped inside pydicom (no download): single slices in many transfer
    # syntaxes, and a truncated one. Each alone must be rejected, naming the file.
    names = sorted(p.name for p in _testfile("MR_small.dcm").parent.glob("MR*.dcm"))
    assert "MR_small_jp2klossless.dcm" in names and "MR_truncated.dcm" in names
    for name in names:
        root = tmp_path / name
        root.mkdir()
        shutil.copy(_testfile(name), root)
        results = scan(root)
        assert len(results) == 1, (name, [r.to_json() for r in results])
        result = results[0]
        assert result.status == "rejected" and result.reason, (name, result.to_json())
        assert name in result.reason
        if name == "MR_truncated.dcm":
            assert result.reason.startswith("truncated or corrupt pixel data"), result.reason
        elif name.startswith("MR_small"):
            assert result.reason.startswith("one slice, not a volume"), (name, result.reason)


# ----------------------------------------------------------------------------- rejections


def test_localizer_image_type(tmp_path: Path) -> None:
    _write(_volume(), tmp_path, extra={"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]})
    assert _rejected(tmp_path).startswith("localizer")


def test_single_slice(tmp_path: Path) -> None:
    _write(_volume(shape=(1, 8, 9)), tmp_path)
    assert _rejected(tmp_path).startswith("one slice, not a volume")


def test_mixed_orientations(tmp_path: Path) -> None:
    uid = str(generate_uid(entropy_srcs=["three-plane"]))
    _write(_volume(AXIAL, shape=(3, 8, 8)), tmp_path, "ax", extra={"SeriesInstanceUID": uid})
    _write(_volume(SAGITTAL, shape=(3, 8, 8)), tmp_path, "sag", extra={"SeriesInstanceUID": uid})
    reason = _rejected(tmp_path)
    assert reason.startswith("mixed orientations: 2 different ImageOrientationPatient")
    assert "localizer" in reason


def test_missing_image_position(tmp_path: Path) -> None:
    paths = _write(_volume(), tmp_path)
    ds = pydicom.dcmread(paths[3])
    del ds.ImagePositionPatient
    ds.save_as(paths[3])
    reason = _rejected(tmp_path)
    assert "missing geometry tag ImagePositionPatient (0020,0032) in 1 of 6 images" in reason
    assert paths[3].name in reason


def test_uneven_spacing_names_the_gap(tmp_path: Path) -> None:
    vol = _volume(spacing=(2.0, 0.8, 0.9), center=(0.0, 0.0, 10.0))
    paths = _write(vol, tmp_path)
    paths[2].unlink()  # a missing slice: one gap of 4 mm among 2 mm gaps
    reason = _rejected(tmp_path)
    assert reason.startswith("uneven slice spacing")
    assert "from 2 to 4 mm" in reason
    z = [float(vol.affine[2, 3] + 2.0 * k) for k in (1, 3)]
    assert f"between positions {z[0]:g} and {z[1]:g} mm" in reason
    assert paths[1].name in reason and paths[3].name in reason


def test_duplicate_positions(tmp_path: Path) -> None:
    uid = str(generate_uid(entropy_srcs=["two-echoes"]))
    vol = _volume()
    _write(vol, tmp_path, "echo1", extra={"SeriesInstanceUID": uid})
    _write(vol, tmp_path, "echo2", extra={"SeriesInstanceUID": uid})
    reason = _rejected(tmp_path)
    assert reason.startswith("duplicate slice positions: 6 pair(s)")
    assert "echoes" in reason


def test_same_image_exported_twice(tmp_path: Path) -> None:
    _write(_volume(), tmp_path / "a")
    _write(_volume(), tmp_path / "b")
    reason = _rejected(tmp_path)
    assert reason.startswith("the same image twice") and "a/" in reason and "b/" in reason


@pytest.mark.parametrize("modality", ["CT", "PT"])
def test_non_mr_modality(tmp_path: Path, modality: str) -> None:
    _write(_volume(), tmp_path, extra={"Modality": modality})
    assert _rejected(tmp_path).startswith(f"modality {modality}, not MR")


def test_real_ct_file_is_not_mr(tmp_path: Path) -> None:
    shutil.copy(_testfile("CT_small.dcm"), tmp_path)
    assert _rejected(tmp_path) == "modality CT, not MR (CT_small.dcm); only MR series are used"


def test_truncated_file_in_series(tmp_path: Path) -> None:
    paths = _write(_volume(), tmp_path)
    data = paths[4].read_bytes()
    paths[4].write_bytes(data[:-40])
    reason = _rejected(tmp_path)
    assert reason.startswith(f"truncated or corrupt pixel data in {paths[4].name}")


def test_truncated_header_is_its_own_result(tmp_path: Path) -> None:
    paths = _write(_volume(), tmp_path / "series")
    raw = paths[0].read_bytes()
    (tmp_path / "cut.dcm").write_bytes(raw[:300])
    results = scan(tmp_path)
    cut = [r for r in results if r.path == tmp_path / "cut.dcm"]
    assert len(cut) == 1 and cut[0].status == "rejected"
    assert cut[0].reason is not None and "cut.dcm" in cut[0].reason
    assert "truncated" in cut[0].reason


def test_compressed_without_decoder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    decoder = get_decoder(JPEG2000Lossless)
    monkeypatch.setattr(decoder, "_available", {})  # as if no JPEG 2000 plugin were installed
    shutil.copy(_testfile("MR_small_jp2klossless.dcm"), tmp_path)
    reason = _rejected(tmp_path)
    assert reason.startswith(
        "compressed transfer syntax JPEG 2000 Image Compression (Lossless Only) "
        "(1.2.840.10008.1.2.4.90) in MR_small_jp2klossless.dcm: no decoder for it is installed"
    )
    assert "pip install pylibjpeg pylibjpeg-openjpeg" in reason and "python-gdcm" in reason


def test_compressed_that_installed_decoders_cannot_read(tmp_path: Path) -> None:
    # 12-bit JPEG Extended: Pillow is installed but cannot decode it.
    ds = pydicom.dcmread(_testfile("JPEG-lossy.dcm"))
    try:
        _ = ds.pixel_array
    except Exception:
        pass
    else:  # pragma: no cover - a full JPEG decoder is installed
        pytest.skip("a decoder for 12-bit JPEG Extended is installed")
    ds.Modality = "MR"
    ds.SOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.save_as(tmp_path / "jpeg12.dcm")
    reason = _rejected(tmp_path)
    assert reason.startswith("compressed transfer syntax JPEG Extended (Process 2 and 4)")
    assert "jpeg12.dcm" in reason and "pip install pylibjpeg pylibjpeg-libjpeg" in reason


def test_one_bad_file_does_not_stop_the_scan(tmp_path: Path) -> None:
    good = tmp_path / "patient1" / "t1"
    vol = _volume()
    _write(vol, good)
    (good / "Thumbs.db").write_bytes(b"\x89 not dicom at all" * 10)
    (good / "empty").write_bytes(b"")
    (good / "label.nii.gz").write_bytes(b"sidecar, skipped")
    (good / "notes.txt").write_text("sidecar, skipped")
    _write(vol, tmp_path / "patient2" / "ct", "ct", extra={"Modality": "CT"})
    results = scan(tmp_path)
    by_path = {r.path.relative_to(tmp_path).as_posix(): r for r in results}
    assert set(by_path) == {
        "patient1/t1",
        "patient1/t1/Thumbs.db",
        "patient1/t1/empty",
        "patient2/ct",
    }
    assert by_path["patient1/t1"].status == "accepted"
    assert by_path["patient1/t1"].shape == vol.shape
    assert str(by_path["patient1/t1/Thumbs.db"].reason).startswith("not a DICOM file")
    assert str(by_path["patient1/t1/empty"].reason).startswith("empty file")
    assert str(by_path["patient2/ct"].reason).startswith("modality CT")


# ----------------------------------------------------------------------------- CLI


def test_data_scan_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write(_volume(), tmp_path / "good")
    _write(_volume(), tmp_path / "ct", "ct", extra={"Modality": "CT"})
    (tmp_path / "good" / "junk.bin").write_text("junk")
    assert data_main(["scan", str(tmp_path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert list(doc) == ["series"]
    keys = {"path", "series_uid", "status", "reason", "shape", "spacing"}
    assert all(set(entry) == keys for entry in doc["series"])
    statuses = {
        Path(e["path"]).relative_to(tmp_path).as_posix(): e["status"] for e in doc["series"]
    }
    assert statuses == {"ct": "rejected", "good": "accepted", "good/junk.bin": "rejected"}
    good = next(e for e in doc["series"] if e["status"] == "accepted")
    assert good["shape"] == [6, 8, 9] and good["spacing"] == pytest.approx([2.5, 0.8, 0.9])

    assert data_main(["scan", str(tmp_path)]) == 0
    human = capsys.readouterr().out.splitlines()
    assert human[-1] == "2 series: 1 accepted, 1 rejected; 1 unreadable file(s)"
    assert any(line.startswith("rejected") and "modality CT" in line for line in human)


def test_data_scan_missing_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert data_main(["scan", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_fedmri_data_scan_command(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "fedmri"
    if not exe.exists():
        pytest.skip("the fedmri console script is not installed")
    _write(_volume(), tmp_path / "good")
    proc = subprocess.run(
        [str(exe), "data", "scan", str(tmp_path), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    (entry,) = json.loads(proc.stdout)["series"]
    assert entry["status"] == "accepted" and entry["shape"] == [6, 8, 9]


# ----------------------------------------------------------------------------- dataset


def _phantom(
    axes: np.ndarray, shape: tuple[int, int, int], spacing: tuple[float, float, float]
) -> tuple[Volume, np.ndarray]:
    """A ball of radius 14 mm (label 1, bright) around a point off the volume centre."""
    affine = grid_affine(axes, spacing, np.array([5.0, -8.0, 20.0]), shape)
    idx = np.indices(shape).reshape(3, -1)
    world = (affine[:3, :3] @ idx + affine[:3, 3:4]).T
    ball = np.linalg.norm(world - np.array([9.0, -5.0, 17.0]), axis=1) < 14.0
    image = (100.0 + 400.0 * ball + 0.5 * world[:, 2]).reshape(shape).astype(np.float32)
    return Volume(image, affine), ball.reshape(shape).astype(np.uint8)


def test_load_cases_with_labels(tmp_path: Path) -> None:
    ax_vol, ax_label = _phantom(AXIAL, (14, 24, 24), (3.0, 2.0, 2.0))
    sag_vol, sag_label = _phantom(SAGITTAL, (20, 16, 24), (2.0, 2.5, 2.0))
    _write(ax_vol, tmp_path / "p1" / "axial", "ax")
    write_label_nifti(ax_label, ax_vol.affine, tmp_path / "p1" / "axial" / "label.nii.gz")
    _write(sag_vol, tmp_path / "p2" / "sag", "sag")
    write_label_nifti(sag_label, sag_vol.affine, tmp_path / "p2" / "sag" / "label.nii.gz")
    _write(ax_vol, tmp_path / "p3" / "nolabel", "nolabel")
    _write(ax_vol, tmp_path / "p4" / "wrong", "wrong")
    write_label_nifti(ax_label[:-1], ax_vol.affine, tmp_path / "p4" / "wrong" / "label.nii.gz")
    _write(ax_vol, tmp_path / "p5" / "shifted", "shifted")
    moved = ax_vol.affine.copy()
    moved[:3, 3] += [0.0, 0.0, 3.0]
    write_label_nifti(ax_label, moved, tmp_path / "p5" / "shifted" / "label.nii.gz")

    array, affine = read_label_nifti(tmp_path / "p1" / "axial" / "label.nii.gz")
    np.testing.assert_array_equal(array, ax_label)
    np.testing.assert_allclose(affine, ax_vol.affine, atol=1e-4)

    cases, results = load_cases(tmp_path, size=16, fov_mm=64.0)
    assert [c.name for c in cases] == ["p1/axial", "p2/sag"]
    for case in cases:
        assert case.image.shape == (1, 16, 16, 16) and case.image.dtype == np.float32
        assert case.label.shape == (16, 16, 16) and case.label.dtype == np.int64
        assert case.image.min() >= 0.0 and case.image.max() <= 1.0
        assert set(np.unique(case.label)) == {0, 1}
        # Bright voxels are the labelled ball.
        assert case.image[0][case.label == 1].mean() > case.image[0][case.label == 0].mean() + 0.5
    # Same physical ball, same model grid: the two acquisitions' labels agree.
    a, b = cases[0].label == 1, cases[1].label == 1
    assert 2 * np.sum(a & b) / (np.sum(a) + np.sum(b)) > 0.85

    reasons = {r.path.relative_to(tmp_path).as_posix(): r.reason for r in results if not r.accepted}
    assert set(reasons) == {"p3/nolabel", "p4/wrong", "p5/shifted"}
    assert str(reasons["p3/nolabel"]).startswith("no label.nii.gz in")
    assert "has shape (13, 24, 24) but the series has (14, 24, 24)" in str(reasons["p4/wrong"])
    assert "affine differs from the series geometry by up to 3 mm" in str(reasons["p5/shifted"])

    train, val = split_cases(cases, val_fraction=0.25, seed=0)
    assert len(train) == 1 and len(val) == 1
    assert {c.name for c in train + val} == {"p1/axial", "p2/sag"}


def test_split_cases_is_deterministic() -> None:
    from fedmri.client.dataset import Case

    cases = [
        Case(f"c{i:02d}", np.zeros((1, 2, 2, 2), np.float32), np.zeros((2, 2, 2), np.int64))
        for i in range(10)
    ]
    train, val = split_cases(cases[::-1], val_fraction=0.3, seed=4)
    train2, val2 = split_cases(cases, val_fraction=0.3, seed=4)
    assert [c.name for c in val] == [c.name for c in val2] and len(val) == 3
    assert [c.name for c in train] == [c.name for c in train2] and len(train) == 7
    assert {c.name for c in train} | {c.name for c in val} == {c.name for c in cases}
    assert split_cases(cases[:1]) == (cases[:1], [])
    tiny_train, tiny_val = split_cases(cases[:2], val_fraction=0.0)
    assert len(tiny_train) == 1 and len(tiny_val) == 1

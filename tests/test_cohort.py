"""The synthetic cohort: real DICOM the client ingests, labels that fit, sites that differ."""

from __future__ import annotations

import contextlib
import io
import json
import re
from importlib import resources
from pathlib import Path

import numpy as np
import pydicom
import pytest

from fedmri.client.labels import read_label_nifti
from fedmri.deploy.cohort import PARTIAL, generate_cohort
from fedmri.deploy.cohort import cli as synth_cli
from fedmri.deploy.cohort.acquisition import synthesize
from fedmri.deploy.cohort.profiles import (
    PROFILE_FILE,
    ProfileError,
    default_profiles,
    hospital_profile,
    load_profiles,
)
from fedmri.deploy.cohort.subject import draw_subject
from fedmri.deploy.cohort.template import load_template

SEED = 3


def _series(site_dir: Path) -> dict[str, list[pydicom.Dataset]]:
    """Slices of every series under a site, by subject, sorted along the slice normal."""
    out: dict[str, list[pydicom.Dataset]] = {}
    for subject in sorted(p for p in site_dir.iterdir() if p.is_dir()):
        dss: list[pydicom.Dataset] = [
            pydicom.dcmread(f) for f in sorted((subject / "series").glob("*.dcm"))
        ]
        iop = np.asarray(dss[0].ImageOrientationPatient, dtype=float)
        normal = np.cross(iop[:3], iop[3:])
        dss.sort(key=lambda ds: float(np.asarray(ds.ImagePositionPatient, dtype=float) @ normal))
        out[subject.name] = dss
    return out


def _pixels(dss: list[pydicom.Dataset]) -> np.ndarray:
    return np.stack([ds.pixel_array for ds in dss])


def _uids(dss: list[pydicom.Dataset]) -> list[tuple[str, str, str]]:
    return [(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID) for ds in dss]


def _image(dss: list[pydicom.Dataset]) -> np.ndarray:
    return np.stack(
        [ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in dss]
    )


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One cohort written through the command line: 1 hospital + test-site, 2 subjects."""
    out = tmp_path_factory.mktemp("cohort") / "out"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = synth_cli.main(
            ["--hospitals", "1", "--subjects", "2", "--seed", str(SEED), "--out", str(out)]
        )
    assert rc == 0
    return out, buf.getvalue()


def test_layout_and_manifest(made: tuple[Path, str]) -> None:
    out, printed = made
    manifest = json.loads((out / "cohort.json").read_text())
    assert manifest["seed"] == SEED
    assert manifest["hospitals"] == ["hospital-1"]
    assert manifest["test_site"] == "test-site"
    names = [(s["site"], s["id"], s["patient_id"]) for s in manifest["subjects"]]
    assert names == [
        ("hospital-1", "sub-001", "hospital-1-001"),
        ("hospital-1", "sub-002", "hospital-1-002"),
        ("test-site", "sub-001", "test-site-001"),
        ("test-site", "sub-002", "test-site-002"),
    ]
    assert not (out / PARTIAL).exists()
    for s in manifest["subjects"]:
        series = out / s["path"]
        assert (series / "label.nii.gz").is_file()
        ds = pydicom.dcmread(next(series.glob("*.dcm")), stop_before_pixels=True)
        assert ds.PatientID == s["patient_id"]
        assert ds.Modality == "MR"
    # progress went to stdout, one line per subject
    assert printed.count("sub-00") == 4
    profiles = {s["name"]: s["profile"] for s in manifest["sites"]}
    assert profiles["hospital-1"]["name"] != profiles["test-site"]["name"]


def test_same_seed_same_cohort_other_seed_differs(made: tuple[Path, str], tmp_path: Path) -> None:
    out, _ = made
    again = tmp_path / "again"
    generate_cohort(again, hospitals=1, subjects=2, seed=SEED)
    other = tmp_path / "other"
    generate_cohort(other, hospitals=1, subjects=2, seed=SEED + 1)
    assert (out / "cohort.json").read_bytes() == (again / "cohort.json").read_bytes()
    for site in ("hospital-1", "test-site"):
        first, second, third = (_series(root / site) for root in (out, again, other))
        assert first.keys() == second.keys() == third.keys() == {"sub-001", "sub-002"}
        for subject in first:
            assert np.array_equal(_pixels(first[subject]), _pixels(second[subject]))
            assert _uids(first[subject]) == _uids(second[subject])
            assert (out / site / subject / "series" / "label.nii.gz").read_bytes() == (
                again / site / subject / "series" / "label.nii.gz"
            ).read_bytes()
            assert _uids(first[subject]) != _uids(third[subject])
            a, c = _pixels(first[subject]), _pixels(third[subject])
            assert a.shape != c.shape or not np.array_equal(a, c)
    # the two subjects of a site are different people
    subjects = _series(out / "hospital-1")
    assert not np.array_equal(_pixels(subjects["sub-001"]), _pixels(subjects["sub-002"]))


def test_one_site_alone_is_that_site_of_the_whole_cohort(
    made: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`synth --site`: what one hospital's own data volume holds in Compose."""
    out, _ = made
    alone = tmp_path / "alone"
    args = ["--hospitals", "1", "--subjects", "2", "--seed", str(SEED), "--quiet", "--out"]
    assert synth_cli.main([*args, str(alone), "--site", "test-site"]) == 0
    assert sorted(p.name for p in alone.iterdir()) == ["cohort.json", "test-site"]
    whole, single = _series(out / "test-site"), _series(alone / "test-site")
    assert whole.keys() == single.keys() == {"sub-001", "sub-002"}
    for subject in whole:
        assert np.array_equal(_pixels(whole[subject]), _pixels(single[subject]))
        assert _uids(whole[subject]) == _uids(single[subject])
    assert synth_cli.main([*args, str(tmp_path / "bad"), "--site", "hospital-7"]) == 1
    assert "site 'hospital-7' is not in this cohort" in capsys.readouterr().err


def test_client_accepts_series_and_labels(made: tuple[Path, str]) -> None:
    from fedmri.client.dataset import load_cases
    from fedmri.client.dicom import scan

    out, _ = made
    for site in ("hospital-1", "test-site"):
        results = scan(out / site)
        accepted = [r for r in results if r.status == "accepted"]
        assert len(accepted) == 2, [(r.path, r.status, r.reason) for r in results]
        cases, _ = load_cases(out / site, 32, 192.0)
        assert len(cases) == 2
        for case in cases:
            label = np.asarray(case.label)
            assert label.shape == (32, 32, 32)
            frac = np.bincount(label.ravel().astype(np.int64), minlength=3) / label.size
            assert set(np.unique(label)) == {0, 1, 2}
            # a brain in a 192 mm cube: about a quarter of the volume, GM more than WM
            assert 0.15 < frac[1] + frac[2] < 0.45, frac
            assert frac[1] > frac[2] > 0.05, frac


def test_label_matches_image_contrast(made: tuple[Path, str]) -> None:
    """On the acquisition grid, the label's tissues have the profile's contrast: T1 sites
    show white matter brighter than grey matter brighter than background."""
    out, _ = made
    for site in ("hospital-1", "test-site"):
        for subject, dss in _series(out / site).items():
            series = out / site / subject / "series"
            label, affine = read_label_nifti(series / "label.nii.gz")
            image = _image(dss)
            assert label.shape == image.shape
            # the label grid is the series grid: first slice position and slice step agree
            first = np.asarray(dss[0].ImagePositionPatient, dtype=float)
            second = np.asarray(dss[1].ImagePositionPatient, dtype=float)
            assert np.allclose(affine[:3, 3], first, atol=1e-3)
            assert np.allclose(affine[:3, 0], second - first, atol=1e-3)
            bg, gm, wm = (float(np.median(image[label == k])) for k in range(3))
            assert wm > gm > bg


def _contrast_stats(image: np.ndarray, label: np.ndarray) -> tuple[float, float, float]:
    """(white matter median in scanner units, grey/white contrast-to-noise ratio,
    background noise relative to white matter)."""
    gm = float(np.median(image[label == 1]))
    wm = float(np.median(image[label == 2]))
    noise = float(image[:, :8, :8].std())
    return wm, (wm - gm) / noise, noise / wm


def test_sites_differ(made: tuple[Path, str]) -> None:
    out, _ = made
    stats = {}
    for site in ("hospital-1", "test-site"):
        dss = _series(out / site)["sub-001"]
        label, _ = read_label_nifti(out / site / "sub-001" / "series" / "label.nii.gz")
        stats[site] = (
            tuple(float(v) for v in dss[0].ImageOrientationPatient),
            tuple(float(v) for v in dss[0].PixelSpacing),
            image_shape := _image(dss).shape,
            _contrast_stats(_image(dss), label),
        )
        assert image_shape[0] == len(dss)
    h, t = stats["hospital-1"], stats["test-site"]
    assert not np.allclose(h[0], t[0], atol=0.05)  # orientation
    assert h[1] != t[1] and h[2] != t[2]  # pixel spacing, matrix
    assert abs(np.log(h[3][0] / t[3][0])) > 0.2  # scanner intensity scale
    assert h[3][1] > 1.5 * t[3][1]  # grey/white contrast-to-noise
    assert t[3][2] > 1.5 * h[3][2]  # noise


def test_contrast_families_in_memory() -> None:
    """Inverted (T2-like) and FLAIR profiles put grey matter above white matter; every base
    profile and the test profile are distinct acquisitions."""
    template = load_template()
    shipped = default_profiles()
    for profile in (p for p in shipped.training if p.contrast in ("t2-fse", "flair")):
        rng = np.random.default_rng(0)
        volume, label = synthesize(profile, draw_subject(profile, rng, template), template)
        gm = float(np.median(volume.array[label == 1]))
        wm = float(np.median(volume.array[label == 2]))
        assert gm > 1.1 * wm, profile.name
    keys = {
        (p.contrast, p.orientation, p.matrix, p.pixel_mm, p.slice_mm, p.oblique_deg)
        for p in (*shipped.training, shipped.test)
    }
    assert len(keys) == len(shipped.training) + 1
    # reused profiles (after the shipped ones) are changed, deterministically for the seed
    reuse = len(shipped.training) + 1
    again = hospital_profile(reuse, seed=0)
    assert again != hospital_profile(1, seed=0)
    assert again == hospital_profile(reuse, seed=0)
    assert again != hospital_profile(reuse, seed=1)
    assert again.name == f"{shipped.training[0].name}-v2"


def test_cli_refuses_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("keep me")
    assert synth_cli.main(["--out", str(full), "--subjects", "2"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert synth_cli.main(["--out", str(tmp_path / "new"), "--subjects", "1"]) == 2
    assert "--subjects" in capsys.readouterr().err
    assert synth_cli.main(["--out", str(tmp_path / "new"), "--hospitals", "0"]) == 2
    assert "--hospitals" in capsys.readouterr().err
    assert synth_cli.main(["--out", str(tmp_path / "new"), "--seed", "-1"]) == 2
    assert "--seed" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    assert (full / "notes.txt").read_text() == "keep me"


# --------------------------------------------------------------------------- profile file

_SHIPPED = (resources.files("fedmri.deploy.cohort") / PROFILE_FILE).read_text(encoding="utf-8")


def _edited(tmp_path: Path, block: str, old: str, new: str) -> Path:
    """The shipped profile file with line `old` of `block` (the line that opens a profile
    or contrast) replaced by `new`, written to tmp_path."""
    start = _SHIPPED.index(block + "\n")
    at = _SHIPPED.index(old + "\n", start)
    path = tmp_path / "profiles.toml"
    path.write_text(_SHIPPED[:at] + new + _SHIPPED[at + len(old) :], encoding="utf-8")
    return path


def test_shipped_profile_file_loads() -> None:
    shipped = load_profiles()
    assert shipped == default_profiles()
    assert [p.name for p in shipped.training][:2] == ["t1-mprage-axial", "t1-se-sagittal"]
    assert shipped.test.name == "t1-coronal-oblique-lowfield"
    assert shipped.training[1].signal.csf == 0.25  # [contrasts.t1-spin-echo]
    assert shipped.test.to_dict()["spacing_mm"] == 5.0


SE = 'name = "t1-se-sagittal"'
TEST = 'name = "t1-coronal-oblique-lowfield"'
PD = "[contrasts.pd]"


@pytest.mark.parametrize(
    ("block", "old", "new", "names"),
    [
        # a missing field
        (SE, "noise = 0.03", "", ["'t1-se-sagittal' ([[training]] #2)", "'noise'", "missing"]),
        # bad values
        (
            TEST,
            "slice_mm = 4.0",
            "slice_mm = -4.0",
            ["'t1-coronal-oblique-lowfield' ([test])", "'slice_mm'", "between 0.1 and 20", "-4.0"],
        ),
        (SE, "slices = 36", "slices = true", ["'t1-se-sagittal'", "'slices'", "whole number"]),
        (SE, "matrix = [144, 160]", "matrix = [144]", ["'t1-se-sagittal'", "'matrix'", "2"]),
        (
            SE,
            "pixel_mm = [1.5, 1.5]",
            "pixel_mm = [1.5, 0]",
            ["'t1-se-sagittal'", "'pixel_mm'", "item 2"],
        ),
        (
            SE,
            'orientation = "sagittal"',
            'orientation = "oblique"',
            ["'t1-se-sagittal'", "'orientation'", "axial"],
        ),
        (SE, 'orientation = "sagittal"', "orientation = [1]", ["'orientation'", "[1]"]),
        (
            SE,
            'contrast = "t1-spin-echo"',
            'contrast = "t3"',
            ["'t1-se-sagittal'", "'contrast'", "[contrasts.t3]"],
        ),
        (
            SE,
            "gap_mm = 0.5",
            "gap_mm = 0.5\nslice_gap = 1.0",
            ["'t1-se-sagittal'", "'slice_gap'", "unknown field"],
        ),
        (
            SE,
            'name = "t1-se-sagittal"',
            'name = "t1-mprage-axial"',
            ["'t1-mprage-axial' ([[training]] #2)", "'name'", "[[training]] #1 has the same"],
        ),
        (PD, "gm = 0.8", "gm = 1.8", ["contrast 'pd'", "'gm'", "between 0 and 1"]),
        (PD, "wm = 0.62", "", ["contrast 'pd'", "'wm'", "missing"]),
    ],
)
def test_profile_file_errors_name_file_profile_and_field(
    tmp_path: Path, block: str, old: str, new: str, names: list[str]
) -> None:
    path = _edited(tmp_path, block, old, new)
    with pytest.raises(ProfileError) as caught:
        load_profiles(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: "), message
    for name in names:
        assert name in message, message


def test_unreadable_profile_files(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="cannot read"):
        load_profiles(tmp_path / "absent.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text(_SHIPPED.replace("\n[test]\n", "\n[test\n"), encoding="utf-8")
    with pytest.raises(ProfileError, match=re.escape(f"{broken}: not valid TOML")):
        load_profiles(broken)
    no_test = tmp_path / "no_test.toml"
    no_test.write_text(_SHIPPED[: _SHIPPED.index("\n[test]\n")], encoding="utf-8")
    with pytest.raises(ProfileError, match=r"no \[test\] profile"):
        load_profiles(no_test)


def test_profile_bounds_refuse_hostile_geometry(tmp_path: Path) -> None:
    """A profile asking for absurd sampling is refused before anything is synthesized."""
    text = re.sub(r"slice_mm = [0-9.]+", "slice_mm = 1000000.0", _SHIPPED, count=1)
    path = tmp_path / "profiles.toml"
    path.write_text(text)
    with pytest.raises(ProfileError, match="slice_mm.*between 0.1 and 20"):
        load_profiles(path)

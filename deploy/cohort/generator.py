"""Write a whole cohort: every site's subjects as DICOM series with labels, then the
manifest (cohort.json), last, so a folder without it is known to be incomplete."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedmri.common.checkpoint import atomic_write
from fedmri.common.layout import HOSPITAL_PREFIX, TEST_SITE
from fedmri.deploy.cohort import MANIFEST, PARTIAL
from fedmri.deploy.cohort.acquisition import synthesize
from fedmri.deploy.cohort.dicom_writer import write_mr_series
from fedmri.deploy.cohort.label_writer import write_label_nifti
from fedmri.deploy.cohort.profiles import ScannerProfile, default_profiles, hospital_profile
from fedmri.deploy.cohort.subject import draw_subject
from fedmri.deploy.cohort.template import TEMPLATE_FILES, TEMPLATE_NAME, Template, load_template

FORMAT = "fedmri-cohort/1"
LABELS = {0: "background", 1: "grey matter", 2: "white matter"}


def _subject_seed(seed: int, site: int, subject: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed, 104729, site, subject])


def _first_dicom_uids(files: list[Path]) -> dict[str, str]:
    import pydicom

    if not files:
        return {}
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    return {"study_uid": str(ds.StudyInstanceUID), "series_uid": str(ds.SeriesInstanceUID)}


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    payload = (json.dumps(manifest, indent=2) + "\n").encode()
    atomic_write(path, lambda fh: fh.write(payload), mode=0o644)


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
    site: str | None = None,
) -> dict[str, Any]:
    """Write `hospitals` training sites and one held-back `test-site`, each with `subjects`
    subjects, under `out`; return the manifest (also written last as out/cohort.json).
    With `site`, only that site of the same cohort (each site's images depend on the seed
    and the site only): what one hospital's own data volume holds in Compose."""
    if hospitals < 1:
        raise ValueError(f"need at least 1 hospital, got {hospitals}")
    if subjects < 1:
        raise ValueError(f"need at least 1 subject per hospital, got {subjects}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    # Profiles first: a broken profile file is reported before anything is written.
    profiles = default_profiles()
    sites: list[tuple[str, int, str, ScannerProfile]] = [
        (f"{HOSPITAL_PREFIX}{i}", i, "train", hospital_profile(i, seed, profiles))
        for i in range(1, hospitals + 1)
    ]
    sites.append((TEST_SITE, 0, "test", profiles.test))
    if site is not None:
        known = [name for name, *_ in sites]
        if site not in known:
            raise ValueError(f"site {site!r} is not in this cohort ({', '.join(known)})")
        sites = [entry for entry in sites if entry[0] == site]

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        manifest_path.unlink()  # an interrupted rewrite must not look finished
    say = progress or (lambda _msg: None)
    t_start = time.perf_counter()
    template = load_template()
    say(f"template loaded ({time.perf_counter() - t_start:.1f} s)")

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
        "template": {"name": TEMPLATE_NAME, "files": list(TEMPLATE_FILES.values())},
        "sites": site_entries,
        "subjects": all_subjects,
    }
    _write_manifest(manifest_path, manifest)
    elapsed = time.perf_counter() - t_start
    say(f"wrote {len(all_subjects)} subjects in {elapsed:.1f} s -> {manifest_path}")
    return manifest

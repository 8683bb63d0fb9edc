"""The folder layout of a cohort: DATA/hospital-<k>/... per site, DATA/test-site/ held back."""

from __future__ import annotations

from pathlib import Path

TEST_SITE = "test-site"
HOSPITAL_PREFIX = "hospital-"


def hospital_dirs(data: Path) -> list[Path]:
    """The training hospitals' folders, in name order; a clear error when there are none."""
    if not data.is_dir():
        raise FileNotFoundError(f"cohort folder {data} does not exist")
    sites = sorted((p for p in data.iterdir() if p.is_dir() and p.name.startswith(HOSPITAL_PREFIX)),
                   key=lambda p: (len(p.name), p.name))
    if not sites:
        raise FileNotFoundError(f"no {HOSPITAL_PREFIX}* folders under {data}; create a cohort "
                                "with `fedmri synth`")
    return sites

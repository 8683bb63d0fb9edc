"""A synthetic multi-hospital cohort for brain-tissue segmentation, built from real anatomy.

Every subject is the MNI152 template (`template`) under its own random affine and smooth
deformation (`subject`); every site is a scanner profile (`profiles`, data in
scanner_profiles.toml: contrast, bias field, noise, slice thickness and gap, matrix and
pixel size, orientation and obliquity, table offset), so hospitals are non-IID. `acquisition`
images a subject through a profile; `dicom_writer` and `label_writer` write the series and
its label; `generator` writes the whole cohort; `cli` is `fedmri synth`.

Layout written under OUT:

    OUT/hospital-1/sub-001/series/*.dcm + label.nii.gz
    ...
    OUT/test-site/sub-001/series/...     (a held-back scanner profile)
    OUT/cohort.json                      (written last: without it the cohort is incomplete)

Everything is a pure function of the seed: the same seed gives the same files.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fedmri.proto import files

if TYPE_CHECKING:
    from fedmri.deploy.cohort.generator import generate_cohort

__all__ = ["MANIFEST", "PARTIAL", "generate_cohort"]

MANIFEST = files.COHORT_MANIFEST
PARTIAL = ".partial"  # staging folder; a finished subject is renamed out of it


def __getattr__(name: str) -> Any:
    # Lazy, so `fedmri synth --help` and its argument errors do not load numpy and scipy.
    if name == "generate_cohort":
        return importlib.import_module(f"{__name__}.generator").generate_cohort
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

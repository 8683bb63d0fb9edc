"""Scanner profiles: how each site's scanner acquires and exports a brain series.

The profiles are data, in scanner_profiles.toml beside this module (shipped with the
package): the tissue signal of each contrast, the training sites in order, and the
held-back test site. This module reads and checks such a file, with errors that name the
file, the profile and the field, and derives the profile of training site k from the seed.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

PROFILE_FILE = "scanner_profiles.toml"


def _axes(
    slice_dir: tuple[float, float, float],
    row_dir: tuple[float, float, float],
    col_dir: tuple[float, float, float],
) -> np.ndarray:
    """Axes matrix for grid_affine: columns are the unit (slice, row, col) directions."""
    return np.column_stack([slice_dir, row_dir, col_dir]).astype(float)


# Acquisition axes in LPS, as a DICOM exporter writes them. The row direction is the
# direction down the rows (DICOM column cosines), the col direction is along a row (DICOM
# row cosines), and the slice normal is col x row. These are conventions of DICOM, not of
# a scanner, so they stay code; a profile names one.
ORIENTATIONS: dict[str, np.ndarray] = {
    # IOP (1,0,0, 0,1,0): rows run posterior, columns run left, normal +S
    "axial": _axes((0, 0, 1), (0, 1, 0), (1, 0, 0)),
    # IOP (0,1,0, 0,0,-1): rows run inferior, columns run posterior, normal -L (right)
    "sagittal": _axes((-1, 0, 0), (0, 0, -1), (0, 1, 0)),
    # IOP (1,0,0, 0,0,-1): rows run inferior, columns run left, normal +P
    "coronal": _axes((0, 1, 0), (0, 0, -1), (1, 0, 0)),
}


class ProfileError(ValueError):
    """A scanner-profile file that cannot be used; the message names the file, the profile
    (or contrast) and the field, and what is wrong with it."""


@dataclass(frozen=True)
class Signal:
    """Signal (0..1) of the tissues under one contrast."""

    csf: float
    gm: float  # grey matter
    wm: float  # white matter
    wm_hi: float  # brightest white matter
    rim: float  # the head shell outside the brain: CSF rim, skull, scalp (fat)
    skull: float
    scalp: float


@dataclass(frozen=True)
class ScannerProfile:
    """How one site's scanner acquires and exports a brain series."""

    name: str
    contrast: str  # name of the contrast whose tissue signal is `signal`
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
    signal: Signal

    @property
    def spacing_mm(self) -> float:
        return self.slice_mm + self.gap_mm

    def to_dict(self) -> dict[str, Any]:
        """The profile as cohort.json records it (spacing_mm, then the signal, last)."""
        out = asdict(self)
        signal = out.pop("signal")
        out["spacing_mm"] = self.spacing_mm
        out["signal"] = signal
        return out


@dataclass(frozen=True)
class ProfileSet:
    """The profiles of one file."""

    training: tuple[ScannerProfile, ...]  # hospital-k uses training[(k-1) % len(training)]
    test: ScannerProfile  # the held-back test-site


# --------------------------------------------------------------------------- checking


class _Invalid(Exception):
    """A value that does not fit its field; the caller adds file, profile and field."""


_Convert = Callable[[Any], Any]


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Invalid(f"must be a non-empty string, got {value!r}")
    return value


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"must be true or false, got {value!r}")
    return value


def _real(low: float = -math.inf, high: float = math.inf, *, above: bool = False) -> _Convert:
    """A finite number in [low, high] ((low, high] with `above`); an integer is taken as a
    float, so a profile written `scale = 800` means the same as `scale = 800.0`."""
    if above:
        wanted = f"> {low:g}"
    elif math.isinf(high):
        wanted = f">= {low:g}" if not math.isinf(low) else "a finite number"
    else:
        wanted = f"between {low:g} and {high:g}"

    def convert(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _Invalid(f"must be a number, got {value!r}")
        if not (math.isfinite(value) and low <= value <= high) or (above and value == low):
            raise _Invalid(f"must be {wanted}, got {value!r}")
        return float(value)

    return convert


def _whole(low: int, high: int) -> _Convert:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise _Invalid(f"must be a whole number between {low} and {high}, got {value!r}")
        return value

    return convert


def _array(item: _Convert, length: int) -> _Convert:
    def convert(value: Any) -> tuple[Any, ...]:
        if not isinstance(value, list) or len(value) != length:
            raise _Invalid(f"must be a list of {length} values, got {value!r}")
        out = []
        for i, v in enumerate(value):
            try:
                out.append(item(v))
            except _Invalid as exc:
                raise _Invalid(f"item {i + 1} {exc}") from None
        return tuple(out)

    return convert


def _orientation(value: Any) -> str:
    if not isinstance(value, str) or value not in ORIENTATIONS:
        raise _Invalid(f"must be one of {', '.join(ORIENTATIONS)}, got {value!r}")
    return value


_FRACTION = _real(0.0, 1.0)

# How each field of a profile is checked; `contrast` is checked against the file's
# contrasts after this, and `signal` comes from that contrast.
_PROFILE_FIELDS: dict[str, _Convert] = {
    "name": _text,
    "contrast": _text,
    "orientation": _orientation,
    # Bounds of real MR head acquisitions: they also keep a hostile file from asking for
    # huge arrays or endless slice sampling.
    "matrix": _array(_whole(16, 1024), 2),
    "pixel_mm": _array(_real(0.1, 10.0), 2),
    "slice_mm": _real(0.1, 20.0),
    "gap_mm": _real(0.0, 20.0),
    "slices": _whole(1, 1024),
    "oblique_deg": _real(-90.0, 90.0),
    "oblique_jitter_deg": _real(0.0, 90.0),
    "gamma": _real(0.0, 10.0, above=True),
    "bias": _real(0.0, 1.0),
    "noise": _FRACTION,
    "rician": _flag,
    "scale": _real(0.0, 60000.0, above=True),  # stored as 16-bit pixels
    "skull_stripped": _flag,
    "table_offset_mm": _array(_real(-500.0, 500.0), 3),
    "field_t": _real(0.0, 20.0, above=True),
    "manufacturer": _text,
}
_SIGNAL_FIELDS = tuple(f.name for f in fields(Signal))


def _fields(raw: Any, spec: Mapping[str, _Convert], where: str) -> dict[str, Any]:
    """`raw` (a TOML table) checked field by field against `spec`: every field present,
    none unknown, each value converted; the first problem raises ProfileError."""
    if not isinstance(raw, dict):
        raise ProfileError(f"{where}: must be a table of fields, got {raw!r}")
    for key in raw:
        if key not in spec:
            raise ProfileError(
                f"{where}: field '{key}': unknown field (the fields are {', '.join(spec)})"
            )
    values: dict[str, Any] = {}
    for key, convert in spec.items():
        if key not in raw:
            raise ProfileError(f"{where}: field '{key}': missing")
        try:
            values[key] = convert(raw[key])
        except _Invalid as exc:
            raise ProfileError(f"{where}: field '{key}': {exc}") from None
    return values


def _profile(raw: Any, slot: str, signals: Mapping[str, Signal], source: str) -> ScannerProfile:
    name = raw.get("name") if isinstance(raw, dict) else None
    label = f"'{name}' ({slot})" if isinstance(name, str) else slot
    where = f"{source}: profile {label}"
    values = _fields(raw, _PROFILE_FIELDS, where)
    signal = signals.get(values["contrast"])
    if signal is None:
        raise ProfileError(
            f"{where}: field 'contrast': no [contrasts.{values['contrast']}] in the file "
            f"(it has {', '.join(signals)})"
        )
    profile = ScannerProfile(**values, signal=signal)
    check_geometry(profile, where)
    return profile


def check_geometry(profile: ScannerProfile, where: str) -> None:
    """A head-sized field of view (50-400 mm in plane and across the slices)."""
    fov = [n * mm for n, mm in zip(profile.matrix, profile.pixel_mm, strict=True)]
    coverage = profile.slices * profile.spacing_mm
    if not all(50.0 <= f <= 400.0 for f in fov) or not 50.0 <= coverage <= 400.0:
        raise ProfileError(f"{where}: field of view {fov[0]:g} x {fov[1]:g} mm over "
                           f"{coverage:g} mm of slices; each must be between 50 and 400 mm")


def parse_profiles(data: Mapping[str, Any], source: str) -> ProfileSet:
    """Check a parsed profile file (`source` names it in errors) and build its profiles."""
    for key in data:
        if key not in ("contrasts", "training", "test"):
            raise ProfileError(
                f"{source}: unknown top-level entry '{key}' "
                "(the file holds [contrasts.NAME] tables, [[training]] profiles and [test])"
            )
    contrasts = data.get("contrasts")
    if not isinstance(contrasts, dict) or not contrasts:
        raise ProfileError(f"{source}: no [contrasts.NAME] tables (tissue signal per contrast)")
    spec = dict.fromkeys(_SIGNAL_FIELDS, _FRACTION)
    signals = {
        name: Signal(**_fields(raw, spec, f"{source}: contrast '{name}'"))
        for name, raw in contrasts.items()
    }
    training = data.get("training")
    if not isinstance(training, list) or not training:
        raise ProfileError(f"{source}: no [[training]] profiles (one per training site)")
    if "test" not in data:
        raise ProfileError(f"{source}: no [test] profile (the held-back test-site)")
    slots = [f"[[training]] #{i}" for i in range(1, len(training) + 1)] + ["[test]"]
    profiles = [
        _profile(raw, slot, signals, source)
        for slot, raw in zip(slots, [*training, data["test"]], strict=True)
    ]
    seen: dict[str, str] = {}
    for slot, p in zip(slots, profiles, strict=True):
        if p.name in seen:
            raise ProfileError(
                f"{source}: profile '{p.name}' ({slot}): field 'name': {seen[p.name]} has "
                "the same name; each site's profile needs its own"
            )
        seen[p.name] = slot
    return ProfileSet(training=tuple(profiles[:-1]), test=profiles[-1])


def load_profiles(path: Path | None = None) -> ProfileSet:
    """The profiles of the TOML file `path` (default: the file shipped with the package)."""
    if path is None:
        resource = resources.files(__name__.rpartition(".")[0]) / PROFILE_FILE
        source, read = str(resource), resource.read_text
    else:
        source, read = str(path), Path(path).read_text
    try:
        text = read(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{source}: cannot read the scanner-profile file: {exc}") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{source}: not valid TOML: {exc}") from None
    return parse_profiles(data, source)


@lru_cache(maxsize=1)
def default_profiles() -> ProfileSet:
    """The shipped profiles, read once."""
    return load_profiles()


def hospital_profile(index: int, seed: int, profiles: ProfileSet | None = None) -> ScannerProfile:
    """Profile of training site `index` (1-based). The first len(training) sites use the
    training profiles as they are; later sites reuse them with seeded changes of matrix,
    slice thickness, obliquity, contrast curve, bias, noise, scale and table position."""
    if index < 1:
        raise ValueError(f"hospital index must be >= 1, got {index}")
    training = (profiles or default_profiles()).training
    base = training[(index - 1) % len(training)]
    cycle = (index - 1) // len(training)
    if cycle == 0:
        return base
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7919, index]))
    pix = float(np.round(rng.uniform(1.4, 2.0), 2))
    fov = base.matrix[0] * base.pixel_mm[0], base.matrix[1] * base.pixel_mm[1]
    thick = float(np.round(rng.uniform(2.5, 5.0), 1))
    coverage = base.slices * base.spacing_mm
    offset = np.round(rng.uniform(-30.0, 30.0, 3))
    derived = replace(
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
    check_geometry(derived, f"site {index} (derived from profile '{base.name}')")
    return derived

"""Fixed-point encoding of a hospital's weighted update into Z_{2^32}, and back.

Masking works on integers modulo 2^32, so each hospital turns its float update into integers
before adding masks. The choices, and why:

- Clip first, then weight. Each coordinate of the update (local minus global weights) is
  clipped to [-clip, clip], then multiplied by the hospital's weight w (its number of training
  examples). The clip is a property of the model delta, independent of dataset size; the weight
  cap `max_weight` separately bounds how much one hospital can move the sum.
- Scale and stochastic rounding. x = clip(u) * w * scale is rounded down or up at random with
  probability equal to its fractional part, so the rounding is unbiased (E[q] = x) and the
  error of each hospital is below one integer unit per coordinate.
- The weight is public by design: each hospital declares it (its number of training volumes)
  with its masked reply, and the server divides the sum by the survivors' declared weights.
  Hiding it bought little (a count of volumes is not patient data, and nothing could verify a
  hidden weight), while a declared weight can be range-checked and attributed: a hospital
  declaring a weight outside 1..max_weight is refused by name. A hospital can still mask a
  weight other than the one it declares; that scales only its own contribution, which it can
  do to its update anyway (there is no input validation, see docs/secure-aggregation.md).
- No wrap-around. `check_no_overflow` refuses any configuration in which the sum over n
  hospitals could leave the signed 32-bit range; then the modular sum, read as int32, is the
  true integer sum.

Error bound of the securely aggregated mean, per coordinate, against the plain weighted mean of
the clipped updates (W = summed weight, n = hospitals in the sum):

    |mean_secure - mean_clipped| <= n * (1 + 2^-22) / (scale * W)    (worst case, `error_bound`)

Each hospital's stochastic rounding is off by less than one unit; the 2^-22 covers the float64
rounding of clip(u) * w * scale (values below 2^31, 53-bit mantissa). Typical error is much
smaller (standard deviation at most sqrt(n) / (2 * scale * W)). Clipping adds
sum_i w_i * |u_i - clip(u_i)| / W, which is zero when every |u| <= clip.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from fractions import Fraction
from numbers import Integral, Real

import numpy as np
import numpy.typing as npt

INT32_MAX = 2**31 - 1
MODULUS = 2**32


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _positive_clip(clip: object) -> Fraction:
    if isinstance(clip, bool) or not isinstance(clip, Real) or not math.isfinite(float(clip)) \
            or float(clip) <= 0:
        raise ValueError(f"clip must be a finite number > 0, got {clip!r}")
    return Fraction(float(clip))


def _per_client_units(clip: Fraction, max_weight: int, scale: int) -> int:
    """Largest |integer| one hospital can contribute to a coordinate (rounding up included).

    Exact for the float64 computation too: rounding to nearest is monotonic and integers below
    2^53 are representable, so fl(clip * w * scale) never passes the next integer up.
    """
    return math.floor(clip * max_weight * scale) + 1


def check_no_overflow(n_clients: int, clip: float, max_weight: int, scale: int) -> None:
    """Refuse a configuration whose sum over `n_clients` could exceed the int32 range."""
    n = _positive_int("n_clients", n_clients)
    max_w = _positive_int("max_weight", max_weight)
    s = _positive_int("scale", scale)
    c = _positive_clip(clip)
    worst = n * _per_client_units(c, max_w, s)
    if worst > INT32_MAX:
        try:
            hint = f"the largest safe scale is {max_safe_scale(n, clip, max_w)}"
        except ValueError:
            hint = "no scale is safe; lower clip or max_weight"
        raise ValueError(
            f"secure aggregation could overflow: {n} hospitals x (clip {clip} x max_weight "
            f"{max_w} x scale {s} + 1 rounding unit) = {worst} > 2^31-1 = {INT32_MAX}; "
            f"{hint}")


def max_safe_scale(n_clients: int, clip: float, max_weight: int) -> int:
    """Largest integer scale for which `check_no_overflow` passes (finest safe resolution)."""
    n = _positive_int("n_clients", n_clients)
    max_w = _positive_int("max_weight", max_weight)
    c = _positive_clip(clip)
    # need floor(c*w*s) + 1 <= INT32_MAX // n, i.e. c*w*s < INT32_MAX // n
    budget = INT32_MAX // n
    scale = math.ceil(Fraction(budget) / (c * max_w)) - 1
    if scale < 1:
        raise ValueError(
            f"no integer scale avoids overflow for {n} hospitals with clip {clip} and "
            f"max_weight {max_w}; lower clip or max_weight")
    check_no_overflow(n, clip, max_w, scale)
    return scale


def error_bound(n_clients: int, scale: int, total_weight: int) -> float:
    """Worst-case per-coordinate error of the dequantized mean from stochastic rounding."""
    return n_clients * (1 + 2**-22) / (scale * total_weight)


@dataclass(frozen=True)
class QuantConfig:
    """Clip, scale and weight cap agreed for a run; `check` refuses an unsafe hospital count."""

    clip: float
    scale: int
    max_weight: int

    @classmethod
    def for_clients(cls, n_clients: int, clip: float, max_weight: int) -> QuantConfig:
        return cls(clip, max_safe_scale(n_clients, clip, max_weight), max_weight)

    def check(self, n_clients: int) -> None:
        check_no_overflow(n_clients, self.clip, self.max_weight, self.scale)

    def quantize(self, update: npt.ArrayLike, weight: int,
                 rng: np.random.Generator | None = None) -> npt.NDArray[np.uint32]:
        return quantize(update, weight, clip=self.clip, scale=self.scale,
                        max_weight=self.max_weight, rng=rng)

    def check_weight(self, weight: float, hospital: str) -> int:
        """A declared weight: a whole number in 1..max_weight, or a ValueError naming it."""
        if not float(weight).is_integer() or not 1 <= weight <= self.max_weight:
            raise ValueError(f"hospital {hospital} declared weight {weight!r}; it must be a "
                             f"whole number of training volumes in 1..{self.max_weight}")
        return int(weight)


def quantize(update: npt.ArrayLike, weight: int, *, clip: float, scale: int, max_weight: int,
             rng: np.random.Generator | None = None) -> npt.NDArray[np.uint32]:
    """Encode clip(update) * weight * scale (flattened) as uint32 mod 2^32.

    `rng` drives stochastic rounding; by default a fresh generator seeded from os.urandom.
    """
    values = np.asarray(update)
    if not (np.issubdtype(values.dtype, np.floating) or np.issubdtype(values.dtype, np.integer)):
        raise ValueError(f"update must be a real numeric array, got dtype {values.dtype}")
    flat = values.astype(np.float64).ravel()
    bad = ~np.isfinite(flat)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"update has {int(bad.sum())} non-finite values (first at flat index {first}: "
            f"{flat[first]}); refusing to mask it; check local training for divergence")
    w = _positive_int("weight", weight)
    s = _positive_int("scale", scale)
    c = _positive_clip(clip)
    if w > max_weight:
        raise ValueError(f"weight {w} exceeds max_weight {max_weight}; the overflow check "
                         "assumed no hospital weighs more; cap the weight or raise max_weight")
    gen = rng if rng is not None else np.random.default_rng(int.from_bytes(os.urandom(32)))
    scaled = np.clip(flat, -float(c), float(c)) * float(w * s)
    low = np.floor(scaled)
    rounded = low + (gen.random(scaled.shape) < (scaled - low))
    return np.mod(rounded.astype(np.int64), MODULUS).astype(np.uint32)


def dequantize(total: npt.NDArray[np.uint32], scale: int,
               total_weight: int) -> npt.NDArray[np.float64]:
    """Turn the modular sum of quantized vectors into the weighted mean update."""
    arr = np.asarray(total)
    if arr.dtype != np.uint32 or arr.ndim != 1:
        raise ValueError(f"expected a 1-D uint32 sum, got dtype {arr.dtype} shape {arr.shape}")
    weight = _positive_int("total_weight", total_weight)
    return arr.view(np.int32).astype(np.float64) / float(_positive_int("scale", scale)) / weight

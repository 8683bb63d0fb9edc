"""t-of-n Shamir secret sharing over the prime field GF(2^521 - 1).

Used to share each hospital's self-mask seed and pairwise-mask secret key among its neighbours,
so the server can remove the masks of hospitals that drop out (or the self masks of those that
stay) from any t honest answers, while t-1 colluding holders learn nothing.

The Mersenne prime 2^521 - 1 exceeds every secret of up to 64 bytes, so a 32-byte key is a single
field element and no splitting into chunks is needed. A share is (x, y) with x the holder's
1-based index in the round's sorted participant list (never 0: f(0) is the secret).
Coefficients come from the `secrets` module unless a generator is injected (tests).
`combine` uses t shares and checks any extra shares against the same polynomial, which catches
a holder that revealed a wrong value.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

PRIME = 2**521 - 1
MAX_SECRET_BYTES = 64
_X_BYTES = 4
_Y_BYTES = 66
SHARE_BYTES = _X_BYTES + _Y_BYTES


@dataclass(frozen=True)
class Share:
    """One point (x, f(x)) of the sharing polynomial."""

    x: int
    y: int

    def to_bytes(self) -> bytes:
        return self.x.to_bytes(_X_BYTES, "big") + self.y.to_bytes(_Y_BYTES, "big")

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        if len(data) != SHARE_BYTES:
            raise ValueError(f"a share is {SHARE_BYTES} bytes, got {len(data)}")
        x = int.from_bytes(data[:_X_BYTES], "big")
        y = int.from_bytes(data[_X_BYTES:], "big")
        if x < 1 or y >= PRIME:
            raise ValueError(f"share ({x}, ...) is outside the field")
        return cls(x, y)


def split(secret: bytes, t: int, holders: int | Sequence[int],
          rng: random.Random | None = None) -> list[Share]:
    """Shares of `secret` for holders 1..n (if an int) or the given x values; any t recover it."""
    xs = list(range(1, holders + 1)) if isinstance(holders, int) else [int(x) for x in holders]
    if len(secret) > MAX_SECRET_BYTES:
        raise ValueError(f"secret of {len(secret)} bytes exceeds {MAX_SECRET_BYTES}")
    if t < 1:
        raise ValueError(f"threshold t must be >= 1, got {t}")
    if t > len(xs):
        raise ValueError(f"threshold t={t} exceeds the number of holders n={len(xs)}")
    if len(set(xs)) != len(xs):
        raise ValueError(f"duplicate holder x values in {xs}")
    if any(not 1 <= x < PRIME for x in xs):
        raise ValueError("holder x values must be in 1..p-1")
    gen = rng if rng is not None else secrets.SystemRandom()
    coeffs = [int.from_bytes(secret, "big")] + [gen.randrange(PRIME) for _ in range(t - 1)]
    shares = []
    for x in xs:
        y = 0
        for c in reversed(coeffs):
            y = (y * x + c) % PRIME
        shares.append(Share(x, y))
    return shares


def _interpolate(points: Sequence[Share], at: int) -> int:
    """Value at `at` of the polynomial of degree < len(points) through `points`."""
    total = 0
    for i, pi in enumerate(points):
        num, den = 1, 1
        for j, pj in enumerate(points):
            if i != j:
                num = num * (at - pj.x) % PRIME
                den = den * (pi.x - pj.x) % PRIME
        total = (total + pi.y * num * pow(den, -1, PRIME)) % PRIME
    return total


def combine(shares: Sequence[Share], t: int, length: int = 32) -> bytes:
    """Recover a `length`-byte secret from at least t shares (extras are cross-checked)."""
    if t < 1:
        raise ValueError(f"threshold t must be >= 1, got {t}")
    if len(shares) < t:
        raise ValueError(f"need at least t={t} shares, got {len(shares)}")
    xs = [s.x for s in shares]
    if len(set(xs)) != len(xs):
        raise ValueError(f"duplicate share x values in {sorted(xs)}")
    ordered = sorted(shares, key=lambda s: s.x)
    base, extra = ordered[:t], ordered[t:]
    for share in extra:
        if _interpolate(base, share.x) != share.y:
            raise ValueError(f"shares are inconsistent (share x={share.x} is not on the "
                             "polynomial of the others): a holder revealed a wrong value")
    value = _interpolate(base, 0)
    if value >= 256**length:
        raise ValueError(f"recovered value does not fit {length} bytes: shares are inconsistent "
                         "or fewer than the real threshold")
    return value.to_bytes(length, "big")

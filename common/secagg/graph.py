"""Who shares secrets and masks with whom (Bell et al. 2020, SecAgg+).

With few hospitals every pair masks (complete graph, the original SecAgg). With many, each
hospital masks with k neighbours of a k-regular graph and Shamir-shares its secrets among those
neighbours (and itself), so client work grows with k, not n. Bell et al. show k = O(log n)
keeps privacy and dropout tolerance with high probability when the graph is random and not
chosen by the server after seeing who is corrupt; we use a Harary (circulant) graph on a
permutation derived from a public seed (by default a hash of run id and round), so every party
recomputes the same graph and nobody picks it adaptively.

Threshold: the holders of a hospital's shares are its neighbours plus itself, k+1 parties; the
threshold t must be a strict majority of them (2t > k+1). Then the server can never gather both
t self-mask shares and t key shares of one hospital from honest holders, who each reveal only
one kind per peer. Degree default: n-1 up to `complete_up_to` hospitals, else
max(MIN_DEGREE, ceil(DEGREE_FACTOR * log2 n)), which keeps t >= MIN_DEGREE / 2 + 1.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

DEFAULT_COMPLETE_UP_TO = 32
DEGREE_FACTOR = 3
MIN_DEGREE = 8


def default_degree(n: int, complete_up_to: int = DEFAULT_COMPLETE_UP_TO) -> int:
    """Neighbours per hospital: everyone for small n, else O(log n) (even when n is odd)."""
    if n < 2:
        raise ValueError(f"secure aggregation needs at least 2 hospitals, got {n}")
    if n <= complete_up_to:
        return n - 1
    k = min(n - 1, max(MIN_DEGREE, math.ceil(DEGREE_FACTOR * math.log2(n))))
    if (k * n) % 2:  # no k-regular graph with k and n both odd
        k += 1
    return k


def default_threshold(degree: int) -> int:
    """Smallest strict majority of the k+1 share holders."""
    return (degree + 1) // 2 + 1


def check_graph_params(n: int, degree: int, threshold: int) -> None:
    """Refuse a degree/threshold pair that is unbuildable or unsafe."""
    if n < 2:
        raise ValueError(f"secure aggregation needs at least 2 hospitals, got {n}")
    if not 1 <= degree <= n - 1:
        raise ValueError(f"degree {degree} must be in 1..{n - 1} for {n} hospitals")
    if (degree * n) % 2:
        raise ValueError(f"no {degree}-regular graph on {n} hospitals (both odd); use "
                         f"degree {degree + 1 if degree < n - 1 else degree - 1}")
    holders = degree + 1
    if not (2 * threshold > holders and threshold <= holders):
        raise ValueError(
            f"threshold {threshold} must be a strict majority of the {holders} share holders "
            f"(degree {degree} + self): between {holders // 2 + 1} and {holders}")


def _order(participants: Sequence[str], seed: bytes) -> list[str]:
    def key(p: str) -> tuple[bytes, str]:
        return hashlib.sha256(seed + b"\x00" + p.encode("utf-8")).digest(), p
    return sorted(participants, key=key)


def build_graph(participants: Sequence[str], degree: int, seed: bytes
                ) -> dict[str, frozenset[str]]:
    """Neighbour sets of a `degree`-regular graph (complete if degree = n-1)."""
    n = len(participants)
    if len(set(participants)) != n:
        raise ValueError("participants must be unique")
    if not 1 <= degree <= n - 1 or (degree * n) % 2:
        raise ValueError(f"cannot build a {degree}-regular graph on {n} hospitals")
    if degree == n - 1:
        everyone = frozenset(participants)
        return {p: everyone - {p} for p in participants}
    order = _order(participants, seed)
    edges: dict[str, set[str]] = {p: set() for p in participants}
    for i, p in enumerate(order):
        offsets = list(range(1, degree // 2 + 1))
        if degree % 2:
            offsets.append(n // 2)
        for off in offsets:
            q = order[(i + off) % n]
            edges[p].add(q)
            edges[q].add(p)
    return {p: frozenset(ns) for p, ns in edges.items()}

"""Secure-aggregation protocol: pieces shared by `SecAggClient` and `ServerAggregator`.

One round in three steps (Bonawitz et al. 2017, with Bell et al. 2020 neighbour graphs). The
steps of consecutive rounds may overlap: round r+1's ADVERTISE can travel with round r's
UNMASK (two round trips per round in steady state), since its keys are fresh and bound to r+1.

1. ADVERTISE. Each hospital makes two X25519 key pairs, c (share encryption) and s (pairwise
   masks), and signs both public keys with its pinned Ed25519 identity for (run, round).
2. SHARE + MASK, one reply. Given its neighbours' signed keys (relayed by the server, every
   signature checked against the pinned identities), a hospital u draws a self-mask seed b_u,
   Shamir-splits b_u and its s private key among its neighbours and itself (threshold t),
   encrypts each share to its holder, and uploads
       y_u = q_u + PRG(b_u) + sum_{v neighbour} sign(u, v) * PRG(seed_uv)  (mod 2^32)
   with sign +1 if u < v else -1, so pairwise masks cancel in the sum of two neighbours.
3. UNMASK. The server tells each survivor which neighbours survived and which dropped, and
   routes it the shares addressed to it. A survivor reveals its b-shares of survivors, and
   for each dropped neighbour its share of that neighbour's s key (if the share arrived) plus
   the pairwise seed it shares with it; it never reveals a b-share and dropped-peer secrets
   for the same peer. The server removes PRG(b_u) for survivors and the pairwise masks
   between survivors and dropped neighbours, leaving the exact sum of survivors' q_u.

Dropouts: before step 2 a hospital is simply left out of the graph it was sent. After step 2
its masks are removed from its s key (if its shares arrived) or else from the pairwise seeds
its surviving neighbours reveal. During step 3, silent survivors are tolerated while every
survivor still has t revealing holders. One case cannot be recovered: a neighbour whose shares
never arrived plus a survivor next to it that stays silent in step 3 (neither s key nor seed
is known); the round then fails with `BelowThresholdError` naming both.

Consistency (Bonawitz et al.'s active-security check). A hospital never reveals until it holds
t valid signatures, by distinct pinned survivors, over the survivor set it signed itself. Every
hospital signs the set of hospitals that got keys with its masked reply; if everyone in it
survives the masking step (the common case) those signatures suffice and the round keeps two
round trips, else one extra step collects signatures over the smaller survivor set. A
hospital signs that set and at most one other per round, only sets that contain it, and
reveals once, under the last set it signed. Votes are needed from t survivors and from a
strict majority of all participants (`votes_needed`), so two conflicting survivor stories can
never both gather theirs: the server cannot show one holder "A survived" and another "A
dropped". The round setup
(participants = the pinned members, degree, threshold, graph seed) is recomputed and checked
by every hospital (`expected_setup`), never taken from the server.

Threat model: see docs/secure-aggregation.md. In short: a server that lies (different
stories, replays, re-runs, forged setups) learns no individual update; hospitals may drop out
or misbehave and are then left out of the round; nothing bounds what a hospital puts in its
own update (no input validation).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from . import prg
from .codec import Reader, Writer, canonical
from .errors import ProtocolViolationError, ReplayError, UnknownHospitalError
from .graph import DEFAULT_COMPLETE_UP_TO, build_graph, default_degree, default_threshold
from .messages import TAG_SHARE_PLAINTEXT, RoundSetup

SHARE_STAGE = "share"


def new_setup(run_id: str, round_: int, participants: Iterable[str], vector_length: int, *,
              degree: int | None = None, threshold: int | None = None,
              complete_up_to: int = DEFAULT_COMPLETE_UP_TO,
              graph_seed: bytes | None = None) -> RoundSetup:
    """Round parameters with defaults: complete graph up to `complete_up_to` hospitals, else
    O(log n) neighbours; threshold a strict majority of holders; graph seed from run/round."""
    parts = tuple(sorted(set(participants)))
    k = default_degree(len(parts), complete_up_to) if degree is None else degree
    t = default_threshold(k) if threshold is None else threshold
    seed = graph_seed if graph_seed is not None else hashlib.sha256(
        canonical("fedmri/secagg/graph-seed/v1", run_id, round_)).digest()
    setup = RoundSetup(run_id, round_, parts, vector_length, k, t, seed)
    setup.validate()
    return setup


def expected_setup(setup: RoundSetup, pinned: Iterable[str], *, degree: int | None = None,
                   threshold: int | None = None,
                   complete_up_to: int = DEFAULT_COMPLETE_UP_TO) -> RoundSetup:
    """The setup a hospital accepts for `setup`'s run, round and vector length: every pinned
    member a participant, default (or agreed) degree and threshold, the derived graph seed.
    A setup that differs in any field is refused by name."""
    expected = new_setup(setup.run_id, setup.round, pinned, setup.vector_length,
                         degree=degree, threshold=threshold, complete_up_to=complete_up_to)
    for name in ("participants", "degree", "threshold", "graph_seed"):
        if getattr(setup, name) != getattr(expected, name):
            raise ProtocolViolationError(
                f"round setup for run {setup.run_id!r} round {setup.round}: {name} is "
                f"{getattr(setup, name)!r}, but the pinned members give "
                f"{getattr(expected, name)!r}; refusing a setup the server chose")
    return expected


def votes_needed(setup: RoundSetup) -> int:
    """Signatures over a survivor set before anyone reveals: the threshold t, and at least a
    strict majority of all participants, so two survivor stories can never both gather their
    votes (with the sparse graph of large federations t is a majority of a hospital's holders
    only, and outsiders could otherwise vouch for a third story)."""
    return max(setup.threshold, len(setup.participants) // 2 + 1)


def setup_digest(setup: RoundSetup) -> bytes:
    return hashlib.sha256(setup.to_bytes()).digest()


def graph_of(setup: RoundSetup) -> dict[str, frozenset[str]]:
    return build_graph(setup.participants, setup.degree, setup.graph_seed)


def check_pinned(hospitals: Iterable[str], pinned: Mapping[str, bytes], where: str) -> None:
    unknown = sorted(h for h in hospitals if h not in pinned)
    if unknown:
        raise UnknownHospitalError(
            f"{where}: hospital(s) {', '.join(unknown)} are not in the pinned identity set "
            "(the members a hospital accepted: `fedmri client members`, `fedmri client "
            "accept`); they cannot take part until pinned")


def check_current(setup: RoundSetup, run_id: str, round_: int, hospital: str, what: str) -> None:
    """Refuse a message of another run or round, naming the hospital."""
    if (run_id, round_) != (setup.run_id, setup.round):
        raise ReplayError(
            f"{what} of hospital {hospital} is for run {run_id!r} round {round_}, but this is "
            f"run {setup.run_id!r} round {setup.round}; refusing (replayed or stale message)")


def pair_sign(me: str, peer: str) -> int:
    """+1 if `me` adds the pairwise mask with `peer`, -1 if it subtracts it."""
    return 1 if me < peer else -1


def add_mask(acc: npt.NDArray[np.uint32], mask: npt.NDArray[np.uint32], sign: int) -> None:
    """acc += sign * mask (mod 2^32), in place."""
    if sign > 0:
        np.add(acc, mask, out=acc)
    else:
        np.subtract(acc, mask, out=acc)


def self_mask(seed: bytes, length: int) -> npt.NDArray[np.uint32]:
    return prg.mask_vector(seed, length, prg.SELF_MASK_LABEL)


def pair_mask(seed: bytes, length: int) -> npt.NDArray[np.uint32]:
    return prg.mask_vector(seed, length, prg.PAIR_MASK_LABEL)


@dataclass(frozen=True)
class SharePlaintext:
    """What an encrypted share carries: the owner's b-share and s-key share for one holder."""

    owner: str
    holder: str
    b_share: bytes
    s_share: bytes

    def to_bytes(self) -> bytes:
        return (Writer(TAG_SHARE_PLAINTEXT).text(self.owner).text(self.holder)
                .blob(self.b_share).blob(self.s_share).finish())

    @classmethod
    def from_bytes(cls, data: bytes) -> SharePlaintext:
        r = Reader(data, TAG_SHARE_PLAINTEXT, "share plaintext")
        out = cls(r.text(), r.text(), r.blob(), r.blob())
        r.done()
        return out

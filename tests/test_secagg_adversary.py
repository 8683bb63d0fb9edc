"""A lying coordinator against the real hospital code.

`LyingServer` runs a round with real `SecAggClient`s but shows each hospital whatever survivor
set it likes, asks for whatever signatures it likes, and then tries, from everything the
hospitals revealed, to remove one hospital's masks: its self-mask seed (t b-shares) and every
pairwise seed it shares with a neighbour (revealed directly, or derived from its recovered
mask key). The property test draws random views for n = 3..8 and checks that it never gets
both for any hospital, and never recovers an update; a control run with the consistency check
switched off shows that the same harness does recover one (Finding 1 of issue 13).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedmri.common.secagg import (
    ConsistencyRequest,
    KeysBroadcast,
    MaskedVector,
    ProtocolViolationError,
    Reveal,
    SecAggClient,
    SecAggError,
    ServerAggregator,
    SurvivorSignature,
    UnmaskRequest,
    identity_public_bytes,
    new_identity,
)
from fedmri.common.secagg import client as client_module
from fedmri.common.secagg.crypto import SIGNATURE_BYTES, pair_seed
from fedmri.common.secagg.protocol import add_mask, graph_of, pair_mask, pair_sign, self_mask
from fedmri.common.secagg.shamir import Share, combine

LENGTH, RUN, ROUND = 4, "run-x", 1


@dataclass
class LyingServer:
    """One round: every hospital got keys and masked; what happens next is the attacker's.
    `told` may give a hospital its own story of who got keys (default: everyone)."""

    n: int
    told: dict[str, tuple[str, ...]] = field(default_factory=dict)
    clients: dict[str, SecAggClient] = field(default_factory=dict)
    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    masked: dict[str, MaskedVector] = field(default_factory=dict)
    votes: dict[tuple[str, ...], dict[str, SurvivorSignature]] = field(default_factory=dict)
    reveals: list[Reveal] = field(default_factory=list)

    def __post_init__(self) -> None:
        names = [f"h{i}" for i in range(self.n)]
        ids = {h: new_identity() for h in names}
        pinned = {h: identity_public_bytes(k) for h, k in ids.items()}
        self.agg = ServerAggregator.start_round(RUN, ROUND, names, LENGTH, pinned)
        self.setup = self.agg.setup
        self.t = self.setup.threshold
        self.clients = {h: SecAggClient(h, ids[h], pinned) for h in names}
        rng = np.random.default_rng(self.n)
        adverts = {h: c.advertise(self.setup) for h, c in self.clients.items()}
        self.adverts = adverts
        self.everyone = tuple(sorted(names))
        self.shares: dict[str, list] = {h: [] for h in names}  # receiver -> encrypted shares
        self.peers: dict[str, set[str]] = {}
        graph = graph_of(self.setup)  # complete up to 32 hospitals, sparse above
        for h, c in self.clients.items():
            told = self.told.get(h, self.everyone)
            keys = KeysBroadcast(RUN, ROUND, h, tuple(adverts[p] for p in told if p in graph[h]),
                                 told)
            self.vectors[h] = rng.integers(0, 2**32, LENGTH, dtype=np.uint32)
            try:
                shares, masked, vote = c.share_and_mask(keys, self.vectors[h])
            except SecAggError:  # too few neighbours in its story: it sits the round out
                continue
            self.peers[h] = set(told) & graph[h]
            for enc in shares.shares:
                self.shares[enc.receiver].append(enc)
            self.masked[h] = masked
            self.votes.setdefault(told, {})[h] = vote

    def ask_signature(self, hospital: str, survivors: tuple[str, ...]) -> None:
        try:
            vote = self.clients[hospital].sign_survivors(
                ConsistencyRequest(RUN, ROUND, hospital, survivors))
        except SecAggError:
            return
        self.votes.setdefault(survivors, {})[hospital] = vote

    def ask_reveal(self, hospital: str, survivors: tuple[str, ...]) -> None:
        if hospital not in self.peers:
            return
        peers = self.peers[hospital]
        request = UnmaskRequest(
            RUN, ROUND, hospital, tuple(sorted((peers & set(survivors)) | {hospital})),
            tuple(sorted(peers - set(survivors))), tuple(self.shares[hospital]), survivors,
            tuple(self.votes.get(survivors, {}).values()))
        try:
            self.reveals.append(self.clients[hospital].unmask(request))
        except SecAggError:
            return

    # -- what the attacker can compute from the reveals ------------------------------------
    def _secret(self, owner: str, kind: str) -> bytes | None:
        got = [Share.from_bytes(getattr(r, kind)[owner][:-SIGNATURE_BYTES]) for r in self.reveals
               if owner in getattr(r, kind)]
        return combine(got, self.t) if len(got) >= self.t else None

    def unmasked_update(self, x: str) -> np.ndarray | None:
        """X's quantized update if the reveals remove all of its masks, else None."""
        b_seed = self._secret(x, "b_shares")
        s_raw = self._secret(x, "s_shares")
        if b_seed is None or x not in self.masked:
            return None
        out = self.masked[x].vector.copy()
        add_mask(out, self_mask(b_seed, LENGTH), -1)
        for v in sorted(self.peers[x]):
            seed = next((r.pair_seeds[v] for r in self.reveals
                         if r.sender == x and v in r.pair_seeds), None)
            seed = seed or next((r.pair_seeds[x] for r in self.reveals
                                 if r.sender == v and x in r.pair_seeds), None)
            if seed is None and s_raw is not None:
                key = X25519PrivateKey.from_private_bytes(s_raw)
                seed = pair_seed(key, self.adverts[v].s_public, RUN, ROUND, x, v)
            if seed is None:
                return None
            add_mask(out, pair_mask(seed, LENGTH), -pair_sign(x, v))
        return out


def attack(server: LyingServer, views: dict[str, tuple[str, ...]],
           signing: dict[str, list[tuple[str, ...]]]) -> list[str]:
    """Ask the signatures, then the reveals under each hospital's view; return the hospitals
    whose update the attacker recovered exactly."""
    for hospital, sets in signing.items():
        for survivors in sets:
            server.ask_signature(hospital, survivors)
    for hospital, view in views.items():
        server.ask_reveal(hospital, view)
    return [x for x in server.everyone
            if (u := server.unmasked_update(x)) is not None
            and np.array_equal(u, server.vectors[x])]


@contextmanager
def without_consistency_check() -> Iterator[None]:
    """The control: hospitals reveal under any set and sign any number of sets."""
    saved = (client_module.SecAggClient._check_signatures, client_module.MAX_SIGNED_SETS)
    client_module.SecAggClient._check_signatures = (  # type: ignore[method-assign]
        lambda self, setup, request: request.all_survivors)
    client_module.MAX_SIGNED_SETS = 10**6
    try:
        yield
    finally:
        client_module.SecAggClient._check_signatures, client_module.MAX_SIGNED_SETS = saved


def _sorted(*names: str) -> tuple[str, ...]:
    return tuple(sorted(names))


# The attack of Finding 1 with n = 3 (t = 2): h1 is told h0 survived (it reveals its share of
# h0's self-mask seed), h0 is told h1 dropped (h0 reveals their pairwise seed), h2 is told h0
# dropped (h2 reveals its pairwise seed with h0).
FINDING_1 = ({"h0": _sorted("h0", "h2"), "h1": _sorted("h0", "h1", "h2"),
              "h2": _sorted("h1", "h2")},
             {"h0": [_sorted("h0", "h2")], "h2": [_sorted("h0", "h2"), _sorted("h1", "h2")],
              "h1": [_sorted("h1", "h2")]})


def test_control_without_the_check_the_harness_recovers_an_update() -> None:
    """The harness is able to unmask: with the old rules the n = 3 attack gets h0's update."""
    with without_consistency_check():
        assert "h0" in attack(LyingServer(3), *FINDING_1)


def test_finding_1_different_survivor_stories_reveal_nothing_usable() -> None:
    server = LyingServer(3)
    assert attack(server, *FINDING_1) == []
    # Only one story gathered t signatures; reveals under the others were refused.
    assert len(server.reveals) <= 2


def test_forged_and_foreign_signatures_do_not_count() -> None:
    server = LyingServer(5)
    small = _sorted("h0", "h1", "h2")
    server.ask_signature("h0", small)
    forged = {h: SurvivorSignature(RUN, ROUND, h, small, b"\x00" * 64) for h in ("h1", "h2")}
    server.votes[small].update(forged)
    with pytest.raises(ProtocolViolationError, match="only 1 valid survivor signatures"):
        server.clients["h0"].unmask(UnmaskRequest(
            RUN, ROUND, "h0", small, _sorted("h3", "h4"), tuple(server.shares["h0"]), small,
            tuple(server.votes[small].values())))
    # signatures over the full set do not stand in for signatures over `small`
    server.votes[small] = dict(server.votes[server.everyone])
    server.ask_reveal("h0", small)
    assert server.reveals == []


def test_a_survivor_set_smaller_than_t_is_refused() -> None:
    server = LyingServer(5)  # t = 3
    tiny = _sorted("h0", "h1")
    for h in tiny:
        server.ask_signature(h, tiny)
    server.ask_reveal("h0", tiny)
    assert server.reveals == []


def random_set(rng: random.Random, names: list[str], me: str) -> tuple[str, ...]:
    others = [h for h in names if h != me]
    return _sorted(me, *rng.sample(others, rng.randint(0, len(others))))


@pytest.mark.parametrize("n", range(3, 9))
def test_property_random_views_never_unmask_anyone(n: int) -> None:
    """Random stories: every hospital is asked to sign one or two random sets containing it
    (it refuses what the rules forbid) and to reveal under a random one of them."""
    rng = random.Random(1000 + n)
    for trial in range(30):
        names = [f"h{i}" for i in range(n)]
        # Half the trials also tell each hospital its own story of who got keys.
        told = {h: random_set(rng, names, h) for h in names} if trial % 2 else {}
        server = LyingServer(n, told)

        signing = {h: [random_set(rng, names, h) for _ in range(rng.randint(1, 2))]
                   for h in names}
        views = {h: rng.choice([server.told.get(h, server.everyone), *signing[h]])
                 for h in names}
        assert attack(server, views, signing) == []
        for x in names:  # it never holds one's self-mask seed together with all its seeds
            assert server.unmasked_update(x) is None, (n, x, views, signing)


def sparse_attack(server: LyingServer) -> list[str]:
    """Above 32 hospitals each has k neighbours and t is a majority of its k+1 holders only.
    X is told half its neighbours (N1) dropped, the other half (N2) are told X dropped, and
    hospitals outside X's neighbourhood co-sign both stories."""
    x, t = server.everyone[0], server.t
    neighbours = sorted(server.peers[x])
    n1, n2 = neighbours[: t - 1], neighbours[t - 1: 2 * (t - 1)]
    outsiders = [h for h in server.everyone if h != x and h not in server.peers[x]]
    story_x = _sorted(*(set(server.everyone) - set(n1)))
    story_2 = _sorted(*(set(server.everyone) - {x}))
    half = len(outsiders) // 2
    signing = {x: [story_x], **{w: [story_x] for w in outsiders[:half]},
               **{v: [story_2] for v in n2}, **{w: [story_2] for w in outsiders[half:]}}
    views = {x: story_x, **dict.fromkeys(n1, server.everyone), **dict.fromkeys(n2, story_2)}
    return attack(server, views, signing)


def test_sparse_graph_needs_a_majority_of_all_participants() -> None:
    """With 33 hospitals (degree 16, t = 9) two stories each vouched for by t hospitals would
    unmask h0 (the control shows it); votes from a majority of all participants stop it."""
    with without_consistency_check():
        assert "h0" in sparse_attack(LyingServer(33))
    server = LyingServer(33)
    assert server.setup.degree < 32 and server.t < 17
    assert sparse_attack(server) == []
    assert server.unmasked_update("h0") is None

"""The coordinator's side of one secure-aggregation round (see `protocol` for the flow).

The server only ever holds masked vectors, encrypted shares and what survivors reveal for
unmasking; it learns the sum of the survivors' quantized vectors and nothing about any single
one. Each stage collects messages until the caller closes it (`finish_advertise`,
`finish_masking`, [`unmask_requests` after the consistency step], `aggregate`), typically
when every hospital answered or a deadline passed; hospitals that did not answer by then count
as dropped. A message that breaks the protocol raises a SecAggError naming its sender, which
the caller drops (the sender then counts as dropped); the round goes on with the others.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from .crypto import (
    KEY_BYTES,
    SIGNATURE_BYTES,
    check_x25519_public,
    open_signed_share,
    pair_seed,
    survivors_signature_valid,
    verify_advertise,
    x25519_public_bytes,
)
from .errors import (
    BelowThresholdError,
    InconsistentSharesError,
    MalformedMessageError,
    ProtocolViolationError,
    SignatureError,
    UnknownHospitalError,
)
from .graph import DEFAULT_COMPLETE_UP_TO
from .messages import (
    Advertise,
    ConsistencyRequest,
    EncryptedShare,
    KeysBroadcast,
    MaskedVector,
    Reveal,
    RoundSetup,
    SharesMessage,
    SurvivorSignature,
    UnmaskRequest,
)
from .protocol import (
    add_mask,
    check_current,
    check_pinned,
    graph_of,
    new_setup,
    pair_mask,
    pair_sign,
    self_mask,
    setup_digest,
    votes_needed,
)
from .shamir import Share, combine

ADVERTISE, SHARE_MASK, CONSISTENCY, UNMASK, DONE = (
    "advertise", "share+mask", "consistency", "unmask", "done")
MAX_SHARE_CIPHERTEXT = 4096


@dataclass(frozen=True, eq=False)
class AggregateResult:
    """Exact sum (mod 2^32) of the survivors' quantized vectors, and who took part.

    survivors: hospitals whose vectors are in the sum; dropped: advertised but not summed;
    silent: survivors that did not answer the unmask request (tolerated).
    """

    total: npt.NDArray[np.uint32]
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    silent: tuple[str, ...]


class ServerAggregator:
    """Collects one round's messages and outputs only the survivors' sum."""

    def __init__(self, setup: RoundSetup, pinned: Mapping[str, bytes]) -> None:
        setup.validate()
        check_pinned(setup.participants, pinned, f"round {setup.round} of run {setup.run_id!r}")
        self.setup = setup
        self._pinned = dict(pinned)
        self._graph = graph_of(setup)
        self._stage = ADVERTISE
        self._adverts: dict[str, Advertise] = {}
        self._peers: dict[str, frozenset[str]] = {}  # neighbours each hospital masked with
        self._shares: dict[str, dict[str, EncryptedShare]] = {}  # sender -> receiver -> share
        self._vectors: dict[str, npt.NDArray[np.uint32]] = {}
        self._advertised: tuple[str, ...] = ()
        self._votes: dict[str, SurvivorSignature] = {}  # signer -> signature over the open set
        self._survivors: frozenset[str] = frozenset()
        self._asked: dict[str, UnmaskRequest] = {}
        self._reveals: dict[str, Reveal] = {}

    @classmethod
    def start_round(cls, run_id: str, round_: int, participants: Iterable[str],
                    vector_length: int, pinned: Mapping[str, bytes], *,
                    degree: int | None = None, threshold: int | None = None,
                    complete_up_to: int = DEFAULT_COMPLETE_UP_TO,
                    graph_seed: bytes | None = None) -> ServerAggregator:
        """New round with default graph and threshold; send `.setup` to every participant."""
        setup = new_setup(run_id, round_, participants, vector_length, degree=degree,
                          threshold=threshold, complete_up_to=complete_up_to,
                          graph_seed=graph_seed)
        return cls(setup, pinned)

    @property
    def stage(self) -> str:
        return self._stage

    @property
    def pinned(self) -> dict[str, bytes]:
        """The pinned identity keys this round checks signatures against (a copy)."""
        return dict(self._pinned)

    def _admit(self, stage: str, sender: str, run_id: str, round_: int, what: str,
               allowed: Iterable[str]) -> None:
        """Common checks: pinned sender, this run and round, the open stage, a live sender."""
        check_pinned([sender], self._pinned, f"{what} received by the server")
        check_current(self.setup, run_id, round_, sender, what)
        if self._stage != stage:
            raise ProtocolViolationError(
                f"{what} of hospital {sender} arrived in stage {self._stage!r}, not {stage!r}; "
                "refusing (late or out of order)")
        if sender not in set(allowed):
            raise UnknownHospitalError(
                f"hospital {sender} sent a {what} but is not expected in this stage of run "
                f"{self.setup.run_id!r} round {self.setup.round} (not a participant, or "
                "dropped earlier)")

    # step 1 ------------------------------------------------------------------------------
    def receive_advertise(self, msg: Advertise) -> None:
        self._admit(ADVERTISE, msg.sender, msg.run_id, msg.round, "advertisement",
                    self.setup.participants)
        if msg.sender in self._adverts:
            raise ProtocolViolationError(f"hospital {msg.sender} advertised twice")
        verify_advertise(self._pinned[msg.sender], msg.signature, msg.run_id, msg.round,
                         msg.sender, msg.c_public, msg.s_public)
        check_x25519_public(msg.c_public, msg.sender, "share-encryption")
        check_x25519_public(msg.s_public, msg.sender, "mask")
        self._adverts[msg.sender] = msg

    def finish_advertise(self) -> dict[str, KeysBroadcast]:
        """Close step 1; one keys message per hospital that advertised."""
        self._require(ADVERTISE)
        live = frozenset(self._adverts)
        self._peers = {h: self._graph[h] & live for h in sorted(live)}
        short = sorted(h for h, ns in self._peers.items() if len(ns) + 1 < self.setup.threshold)
        if short or not live:
            raise BelowThresholdError(
                f"run {self.setup.run_id!r} round {self.setup.round}: {len(live)} of "
                f"{len(self.setup.participants)} hospitals advertised; hospital(s) "
                f"{', '.join(short) or '(none)'} have fewer than t={self.setup.threshold} "
                "share holders left; the round cannot continue")
        self._stage = SHARE_MASK
        self._advertised = tuple(sorted(live))
        s = self.setup
        return {h: KeysBroadcast(s.run_id, s.round, h,
                                 tuple(self._adverts[p] for p in sorted(ns)), self._advertised)
                for h, ns in self._peers.items()}

    # step 2 ------------------------------------------------------------------------------
    def receive_shares(self, msg: SharesMessage) -> None:
        self._admit(SHARE_MASK, msg.sender, msg.run_id, msg.round, "shares message",
                    self._peers)
        if msg.sender in self._shares:
            raise ProtocolViolationError(f"hospital {msg.sender} sent its shares twice")
        routed: dict[str, EncryptedShare] = {}
        for enc in msg.shares:
            if enc.sender != msg.sender or enc.receiver in routed or \
                    enc.receiver not in self._peers[msg.sender]:
                raise MalformedMessageError(
                    f"shares message of hospital {msg.sender}: share {enc.sender} -> "
                    f"{enc.receiver} is not one per neighbour from this sender")
            if len(enc.ciphertext) > MAX_SHARE_CIPHERTEXT:
                raise MalformedMessageError(
                    f"shares message of hospital {msg.sender}: share to {enc.receiver} is "
                    f"{len(enc.ciphertext)} bytes, over the {MAX_SHARE_CIPHERTEXT} limit")
            routed[enc.receiver] = enc
        missing = sorted(self._peers[msg.sender] - set(routed))
        if missing:
            raise MalformedMessageError(
                f"shares message of hospital {msg.sender} has no share for {', '.join(missing)}")
        self._shares[msg.sender] = routed

    def receive_masked(self, msg: MaskedVector) -> None:
        self._admit(SHARE_MASK, msg.sender, msg.run_id, msg.round, "masked vector",
                    self._peers)
        if msg.sender in self._vectors:
            raise ProtocolViolationError(f"hospital {msg.sender} sent its masked vector twice")
        vec = msg.vector
        if not isinstance(vec, np.ndarray) or vec.dtype != np.uint32 \
                or vec.shape != (self.setup.vector_length,):
            got = (f"dtype {vec.dtype} shape {vec.shape}" if isinstance(vec, np.ndarray)
                   else type(vec).__name__)
            raise MalformedMessageError(
                f"masked vector of hospital {msg.sender}: expected uint32 of length "
                f"{self.setup.vector_length}, got {got}; refusing it")
        self._vectors[msg.sender] = vec.copy()

    def receive_signature(self, msg: SurvivorSignature) -> None:
        """A survivor's vote: over the set that got keys (with its masked reply), or over the
        survivor set (in the consistency step)."""
        allowed: Iterable[str]
        if self._stage == SHARE_MASK:
            allowed, expected = self._peers, self._advertised
        else:
            allowed, expected = self._survivors, tuple(sorted(self._survivors))
        stage = SHARE_MASK if self._stage == SHARE_MASK else CONSISTENCY
        self._admit(stage, msg.signer, msg.run_id, msg.round, "survivor signature", allowed)
        if msg.signer in self._votes:
            raise ProtocolViolationError(f"hospital {msg.signer} signed the survivor set twice")
        if msg.survivors != expected or not survivors_signature_valid(
                self._pinned[msg.signer], msg.signature, msg.run_id, msg.round,
                setup_digest(self.setup), msg.survivors):
            raise SignatureError(
                f"hospital {msg.signer}: its signature over the survivor set {list(expected)} "
                "is missing or does not verify against its pinned identity key")
        self._votes[msg.signer] = msg

    def finish_masking(self) -> dict[str, ConsistencyRequest]:
        """Close step 2; survivors sent shares, vector and their vote. If all who got keys
        survived, their votes already sign the survivor set: no request (call
        `unmask_requests`). Else one consistency request per survivor."""
        self._require(SHARE_MASK)
        survivors = frozenset(self._shares) & frozenset(self._vectors) & frozenset(self._votes)
        t = self.setup.threshold
        short = {h: len(({h} | self._peers[h]) & survivors) for h in sorted(survivors)}
        short = {h: k for h, k in short.items() if k < t}
        if short or not survivors:
            detail = ", ".join(f"{h} ({k} holders)" for h, k in short.items()) or "everyone"
            raise BelowThresholdError(
                f"run {self.setup.run_id!r} round {self.setup.round}: {len(survivors)} "
                f"hospitals sent shares, a masked vector and their vote; fewer than t={t} "
                f"share holders survive for {detail}; the round cannot be unmasked")
        self._survivors = survivors
        self._vectors = {h: v for h, v in self._vectors.items() if h in survivors}
        ordered = tuple(sorted(survivors))
        if ordered == self._advertised:
            self._stage = CONSISTENCY
            return {}
        self._votes, self._stage = {}, CONSISTENCY
        s = self.setup
        return {h: ConsistencyRequest(s.run_id, s.round, h, ordered) for h in ordered}

    def unmask_requests(self) -> dict[str, UnmaskRequest]:
        """Close the consistency step: one unmask request per survivor, carrying the survivor
        set and every vote over it; t votes are needed, or nobody would reveal."""
        self._require(CONSISTENCY)
        ordered = tuple(sorted(self._survivors))
        votes = tuple(self._votes[h] for h in sorted(self._votes) if h in self._survivors)
        if len(votes) < votes_needed(self.setup):
            raise BelowThresholdError(
                f"run {self.setup.run_id!r} round {self.setup.round}: {len(votes)} survivors "
                f"signed the survivor set, fewer than the {votes_needed(self.setup)} needed "
                "(t, and a majority of all participants); the round cannot be unmasked")
        s = self.setup
        for h in ordered:
            ns = self._peers[h]
            routed = tuple(self._shares[p][h] for p in sorted(ns) if p in self._shares)
            self._asked[h] = UnmaskRequest(s.run_id, s.round, h,
                                           tuple(sorted((ns & self._survivors) | {h})),
                                           tuple(sorted(ns - self._survivors)), routed,
                                           ordered, votes)
        self._stage = UNMASK
        return dict(self._asked)

    # step 3 ------------------------------------------------------------------------------
    def receive_reveal(self, msg: Reveal) -> None:
        self._admit(UNMASK, msg.sender, msg.run_id, msg.round, "reveal", self._asked)
        if msg.sender in self._reveals:
            raise ProtocolViolationError(f"hospital {msg.sender} revealed twice")
        asked = self._asked[msg.sender]
        routed = {e.sender for e in asked.shares}
        x = self.setup.index_of(msg.sender)
        checks = ((msg.b_shares, set(asked.survivors), "self-mask shares"),
                  (msg.s_shares, set(asked.dropped) & routed, "key shares"))
        for items, allowed, kind in checks:
            extra = sorted(set(items) - allowed)
            if extra:
                raise ProtocolViolationError(
                    f"hospital {msg.sender} revealed {kind} for {', '.join(extra)}, which it "
                    "was not asked for")
            for owner, raw in items.items():
                letter = "b" if items is msg.b_shares else "s"
                try:
                    share = Share.from_bytes(open_signed_share(
                        self._pinned[owner], raw, msg.run_id, msg.round, owner, msg.sender,
                        letter))
                except (SignatureError, ValueError) as exc:
                    raise MalformedMessageError(
                        f"hospital {msg.sender}: its {kind[:-1]} for {owner} is malformed or "
                        f"not the one {owner} dealt it: {exc}") from exc
                if share.x != x:
                    raise MalformedMessageError(
                        f"hospital {msg.sender}: its {kind[:-1]} for {owner} has x={share.x}, "
                        f"not its index {x}")
        if set(msg.pair_seeds) != set(asked.dropped) or \
                any(len(v) != KEY_BYTES for v in msg.pair_seeds.values()):
            raise MalformedMessageError(
                f"hospital {msg.sender}: pair seeds must be {KEY_BYTES}-byte values for exactly "
                f"its dropped neighbours {list(asked.dropped)}, got {sorted(msg.pair_seeds)}")
        unreadable = set(msg.unreadable)
        if not unreadable <= routed:
            raise MalformedMessageError(
                f"hospital {msg.sender} calls shares unreadable that it was never sent: "
                f"{sorted(unreadable - routed)}")
        missing = sorted(set(asked.survivors) - set(msg.b_shares) - unreadable)
        if missing:
            raise MalformedMessageError(
                f"hospital {msg.sender} revealed no self-mask share for {', '.join(missing)} "
                "and did not say why")
        self._reveals[msg.sender] = msg

    def _recover(self, owner: str, kind: str) -> bytes | None:
        """Combine the revealed shares of `owner`'s b seed or s key; None if fewer than t."""
        t = self.setup.threshold
        got = [Share.from_bytes(getattr(r, kind)[owner][:-SIGNATURE_BYTES])
               for r in self._reveals.values() if owner in getattr(r, kind)]
        if len(got) < t:
            return None
        try:
            return combine(got, t)
        except ValueError as exc:
            # Every share carries its dealer's checked signature: the dealer dealt them wrong.
            raise InconsistentSharesError(
                owner, f"cannot recover the "
                f"{'self-mask seed' if kind == 'b_shares' else 'mask key'} of hospital {owner}: "
                f"the shares it signed do not fit one secret ({exc})") from exc

    def aggregate(self) -> AggregateResult:
        """Close step 3: remove all masks and return the survivors' exact modular sum."""
        self._require(UNMASK)
        t, length = self.setup.threshold, self.setup.vector_length
        total = np.zeros(length, dtype=np.uint32)
        for h in sorted(self._survivors):
            np.add(total, self._vectors[h], out=total)
        for h in sorted(self._survivors):
            b_seed = self._recover(h, "b_shares")
            if b_seed is None:
                revealers = sorted(r for r in self._reveals if h in self._reveals[r].b_shares)
                blamers = self.unreadable_by().get(h, [])
                why = (f"; its shares could not be read by {', '.join(blamers)}" if blamers
                       else "")
                raise BelowThresholdError(
                    f"cannot remove the self mask of hospital {h}: {len(revealers)} of the "
                    f"t={t} needed shares were revealed (by {', '.join(revealers) or 'nobody'})"
                    + why)
            add_mask(total, self_mask(b_seed, length), -1)
        dropped = sorted(set(self._peers) - self._survivors)
        for d in dropped:
            affected = sorted(self._peers[d] & self._survivors)
            if affected:
                self._remove_pair_masks(total, d, affected)
        self._stage = DONE
        silent = tuple(sorted(self._survivors - set(self._reveals)))
        return AggregateResult(total, tuple(sorted(self._survivors)), tuple(dropped), silent)

    def _remove_pair_masks(self, total: npt.NDArray[np.uint32], dropped: str,
                           affected: list[str]) -> None:
        s = self.setup
        s_raw = self._recover(dropped, "s_shares")
        key: X25519PrivateKey | None = None
        if s_raw is not None:
            key = X25519PrivateKey.from_private_bytes(s_raw)
            if x25519_public_bytes(key) != self._adverts[dropped].s_public:
                raise InconsistentSharesError(
                    dropped, f"the recovered mask key of dropped hospital {dropped} does not "
                    "match its advertised public key: it dealt wrong key shares")
        for v in affected:
            if key is not None:
                seed = pair_seed(key, self._adverts[v].s_public, s.run_id, s.round, dropped, v)
            elif dropped in self._reveals.get(v, Reveal("", 0, "")).pair_seeds:
                seed = self._reveals[v].pair_seeds[dropped]
            else:
                raise BelowThresholdError(
                    f"cannot remove the pairwise mask between survivor {v} (silent during "
                    f"unmask) and dropped hospital {dropped}: fewer than t={s.threshold} "
                    f"holders revealed {dropped}'s key shares; restart the round")
            add_mask(total, pair_mask(seed, s.vector_length), -pair_sign(v, dropped))

    def short_of_shares(self) -> list[str]:
        """Survivors whose self-mask seed has fewer than t revealed shares (after step 3)."""
        t = self.setup.threshold
        return [h for h in sorted(self._survivors)
                if sum(h in r.b_shares for r in self._reveals.values()) < t]

    def unreadable_by(self) -> dict[str, list[str]]:
        """Hospital -> the holders that could not read its share (as they revealed it)."""
        out: dict[str, list[str]] = {}
        for holder in sorted(self._reveals):
            for sender in self._reveals[holder].unreadable:
                out.setdefault(sender, []).append(holder)
        return out

    def _require(self, stage: str) -> None:
        if self._stage != stage:
            raise ProtocolViolationError(
                f"run {self.setup.run_id!r} round {self.setup.round}: this step needs stage "
                f"{stage!r}, the round is in {self._stage!r}")

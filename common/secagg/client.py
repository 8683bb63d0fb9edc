"""A hospital's side of one secure-aggregation round (see `protocol` for the flow).

The client keeps its ephemeral private keys and its own shares between the three steps; the
unmasked update never leaves it. `export_state`/`restore` let a stateless message handler (a
Flower ClientApp) keep this state in node-local storage between messages; the state holds
private keys, so it must stay on the hospital's machine.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from .codec import Reader, Writer
from .crypto import (
    check_x25519_public,
    decrypt_share,
    encrypt_share,
    identity_public_bytes,
    open_signed_share,
    pair_seed,
    share_ad,
    share_key,
    sign_advertise,
    sign_share,
    sign_survivors,
    survivors_signature_valid,
    verify_advertise,
    x25519_private_bytes,
    x25519_public_bytes,
)
from .errors import (
    BelowThresholdError,
    MalformedMessageError,
    ProtocolViolationError,
    SecAggError,
    SignatureError,
)
from .graph import DEFAULT_COMPLETE_UP_TO
from .messages import (
    TAG_CLIENT_STATE,
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
    SHARE_STAGE,
    SharePlaintext,
    add_mask,
    check_current,
    check_pinned,
    expected_setup,
    graph_of,
    pair_mask,
    pair_sign,
    self_mask,
    setup_digest,
    votes_needed,
)
from .shamir import Share, split

NEW, ADVERTISED, MASKED, REVEALED = "new", "advertised", "masked", "revealed"
MAX_SIGNED_SETS = 2  # the set that got keys, and at most one smaller survivor set


class SecAggClient:
    """One hospital in one round: `advertise` -> `share_and_mask` -> [`sign_survivors`] ->
    `unmask`.

    `pinned` maps every member hospital to its raw 32-byte Ed25519 identity public key; keys
    of hospitals outside it, or whose signature fails, are refused by name. Every pinned
    member is a participant of every round; `degree`, `threshold` and `complete_up_to` are
    the federation's agreed graph parameters (defaults: those of `new_setup`).
    """

    def __init__(self, hospital: str, identity: Ed25519PrivateKey,
                 pinned: Mapping[str, bytes], *, degree: int | None = None,
                 threshold: int | None = None,
                 complete_up_to: int = DEFAULT_COMPLETE_UP_TO) -> None:
        check_pinned([hospital], pinned, f"hospital {hospital}")
        if pinned[hospital] != identity_public_bytes(identity):
            raise SignatureError(
                f"hospital {hospital}: the local identity key does not match its pinned public "
                "key; use the enrolled key or re-enroll the hospital")
        self.hospital = hospital
        self._identity = identity
        self._pinned = dict(pinned)
        self._rule = {"degree": degree, "threshold": threshold, "complete_up_to": complete_up_to}
        self._stage = NEW
        self._setup: RoundSetup | None = None
        self._c: X25519PrivateKey | None = None
        self._s: X25519PrivateKey | None = None
        self._peers: dict[str, Advertise] = {}
        self._own_b_share = b""
        self._advertised: tuple[str, ...] = ()  # who got keys: the first set it signs
        self._signed: list[tuple[str, ...]] = []  # survivor sets it signed, in order

    @property
    def stage(self) -> str:
        return self._stage

    def _expect(self, stages: tuple[str, ...], step: str) -> tuple[RoundSetup, X25519PrivateKey,
                                                                      X25519PrivateKey]:
        if self._stage not in stages or self._setup is None or self._c is None or self._s is None:
            raise ProtocolViolationError(
                f"hospital {self.hospital}: cannot {step} in stage {self._stage!r} "
                f"(expected {' or '.join(stages)})")
        return self._setup, self._c, self._s

    # step 1 ------------------------------------------------------------------------------
    def advertise(self, setup: RoundSetup) -> Advertise:
        """Check the round parameters, make fresh ephemeral keys and sign them."""
        if self._stage != NEW:
            raise ProtocolViolationError(
                f"hospital {self.hospital}: already advertised in this round; make a new "
                "SecAggClient for each round")
        setup.validate()
        check_pinned(setup.participants, self._pinned,
                     f"round setup received by hospital {self.hospital}")
        expected_setup(setup, self._pinned, **self._rule)  # type: ignore[arg-type]
        self._c, self._s = X25519PrivateKey.generate(), X25519PrivateKey.generate()
        c_pub, s_pub = x25519_public_bytes(self._c), x25519_public_bytes(self._s)
        sig = sign_advertise(self._identity, setup.run_id, setup.round, self.hospital, c_pub,
                             s_pub)
        self._setup, self._stage = setup, ADVERTISED
        return Advertise(setup.run_id, setup.round, self.hospital, c_pub, s_pub, sig)

    # step 2 ------------------------------------------------------------------------------
    def _verified_peers(self, setup: RoundSetup, keys: KeysBroadcast,
                        own: tuple[bytes, bytes]) -> dict[str, Advertise]:
        neighbours = graph_of(setup)[self.hospital]
        peers: dict[str, Advertise] = {}
        for adv in keys.advertisements:
            check_current(setup, adv.run_id, adv.round, adv.sender, "advertisement")
            check_pinned([adv.sender], self._pinned, f"keys relayed to hospital {self.hospital}")
            if adv.sender == self.hospital:
                if (adv.c_public, adv.s_public) != own:
                    raise ProtocolViolationError(
                        f"hospital {self.hospital}: the server relayed keys under its own name "
                        "that it did not make; refusing")
                continue
            if adv.sender in peers:
                raise MalformedMessageError(
                    f"keys relayed to hospital {self.hospital} list {adv.sender} twice")
            if adv.sender not in neighbours:
                raise ProtocolViolationError(
                    f"hospital {adv.sender} is not a neighbour of {self.hospital} in this "
                    "round's graph; refusing its keys")
            verify_advertise(self._pinned[adv.sender], adv.signature, adv.run_id, adv.round,
                             adv.sender, adv.c_public, adv.s_public)
            check_x25519_public(adv.c_public, adv.sender, "share-encryption")
            check_x25519_public(adv.s_public, adv.sender, "mask")
            peers[adv.sender] = adv
        advertised = keys.advertised
        if list(advertised) != sorted(set(advertised)) or self.hospital not in advertised \
                or not set(advertised) <= set(setup.participants):
            raise ProtocolViolationError(
                f"keys relayed to hospital {self.hospital}: the set of hospitals that got keys "
                f"{list(advertised)} is not a sorted set of participants including it")
        if set(peers) != neighbours & set(advertised):
            raise ProtocolViolationError(
                f"keys relayed to hospital {self.hospital} do not match the hospitals said to "
                f"have keys: got {sorted(peers)}, expected "
                f"{sorted(neighbours & set(advertised))}")
        if len(peers) + 1 < setup.threshold:
            raise BelowThresholdError(
                f"hospital {self.hospital}: only {len(peers)} neighbours advertised keys; "
                f"{setup.threshold - 1} are needed for threshold t={setup.threshold}")
        return peers

    def _sign(self, setup: RoundSetup, survivors: tuple[str, ...]) -> SurvivorSignature:
        sig = sign_survivors(self._identity, setup.run_id, setup.round, setup_digest(setup),
                             survivors)
        return SurvivorSignature(setup.run_id, setup.round, self.hospital, survivors, sig)

    def share_and_mask(self, keys: KeysBroadcast, vector: npt.NDArray[np.uint32]
                       ) -> tuple[SharesMessage, MaskedVector, SurvivorSignature]:
        """Verify the neighbours' keys, share b and the s key, mask the quantized vector, and
        sign the set of hospitals that got keys (the survivor set if none drops now)."""
        setup, c_key, s_key = self._expect((ADVERTISED,), "share and mask")
        check_current(setup, keys.run_id, keys.round, self.hospital, "keys relayed to")
        if keys.receiver != self.hospital:
            raise ProtocolViolationError(
                f"hospital {self.hospital} received keys addressed to {keys.receiver}")
        vec = np.asarray(vector)
        if vec.dtype != np.uint32 or vec.shape != (setup.vector_length,):
            raise ValueError(
                f"hospital {self.hospital}: expected a uint32 vector of length "
                f"{setup.vector_length} (quantized update + weight), got dtype {vec.dtype} "
                f"shape {vec.shape}")
        own = (x25519_public_bytes(c_key), x25519_public_bytes(s_key))
        peers = self._verified_peers(setup, keys, own)
        run, rnd, me = setup.run_id, setup.round, self.hospital

        b_seed = os.urandom(32)
        holders = sorted({*peers, me})
        xs = [setup.index_of(h) for h in holders]
        b_shares = split(b_seed, setup.threshold, xs)
        s_shares = split(x25519_private_bytes(s_key), setup.threshold, xs)
        encrypted = []
        for holder, b_sh, s_sh in zip(holders, b_shares, s_shares, strict=True):
            b_signed = sign_share(self._identity, run, rnd, me, holder, "b", b_sh.to_bytes())
            if holder == me:
                self._own_b_share = b_signed
                continue
            key = share_key(c_key, peers[holder].c_public, run, rnd, me, holder)
            s_signed = sign_share(self._identity, run, rnd, me, holder, "s", s_sh.to_bytes())
            plain = SharePlaintext(me, holder, b_signed, s_signed).to_bytes()
            blob = encrypt_share(key, plain, share_ad(run, rnd, SHARE_STAGE, me, holder))
            encrypted.append(EncryptedShare(me, holder, blob))

        masked = vec.astype(np.uint32, copy=True)
        add_mask(masked, self_mask(b_seed, setup.vector_length), 1)
        for peer in sorted(peers):
            seed = pair_seed(s_key, peers[peer].s_public, run, rnd, me, peer)
            add_mask(masked, pair_mask(seed, setup.vector_length), pair_sign(me, peer))
        self._peers, self._stage = peers, MASKED
        self._advertised = keys.advertised
        self._signed = [keys.advertised]
        return (SharesMessage(run, rnd, me, tuple(encrypted)),
                MaskedVector(run, rnd, me, masked), self._sign(setup, keys.advertised))

    # consistency check (only when someone dropped during step 2) --------------------------
    def sign_survivors(self, request: ConsistencyRequest) -> SurvivorSignature:
        """Sign the survivor set the server shows; at most one set besides the one that got
        keys, only sets containing this hospital, never after revealing."""
        setup, _, _ = self._expect((MASKED,), "sign a survivor set")
        me, survivors = self.hospital, request.survivors
        check_current(setup, request.run_id, request.round, me, "consistency request to")
        if request.receiver != me:
            raise ProtocolViolationError(
                f"hospital {me} received a consistency request addressed to {request.receiver}")
        if list(survivors) != sorted(set(survivors)) or me not in survivors \
                or not set(survivors) <= set(self._advertised):
            raise ProtocolViolationError(
                f"hospital {me}: the survivor set {list(survivors)} is not a sorted subset of "
                "the hospitals that got keys that includes it; refusing to sign")
        if survivors not in self._signed:
            if len(self._signed) >= MAX_SIGNED_SETS:
                raise ProtocolViolationError(
                    f"hospital {me} already signed the survivor set {list(self._signed[-1])} "
                    f"in run {setup.run_id!r} round {setup.round}; refusing to sign another "
                    "(two stories about who survived could unmask a hospital)")
            self._signed.append(survivors)
        elif survivors != self._signed[-1]:
            raise ProtocolViolationError(
                f"hospital {me}: the server asks again for an earlier survivor set; refusing")
        return self._sign(setup, survivors)

    # step 3 ------------------------------------------------------------------------------
    def _check_signatures(self, setup: RoundSetup, request: UnmaskRequest) -> tuple[str, ...]:
        """The survivor set, once t distinct survivors signed exactly the set this hospital
        signed last; else refuse to reveal anything."""
        me, survivors = self.hospital, request.all_survivors
        if survivors != self._signed[-1]:
            raise ProtocolViolationError(
                f"hospital {me}: the unmask request's survivor set {list(survivors)} is not the "
                f"one it signed ({list(self._signed[-1])}); refusing to reveal")
        digest, signers = setup_digest(setup), set()
        for vote in request.signatures:
            if (vote.run_id, vote.round, vote.survivors) != (setup.run_id, setup.round,
                                                             survivors):
                continue
            if vote.signer in survivors and vote.signer in self._pinned and \
                    survivors_signature_valid(self._pinned[vote.signer], vote.signature,
                                              setup.run_id, setup.round, digest, survivors):
                signers.add(vote.signer)
        if len(signers) < votes_needed(setup):
            raise ProtocolViolationError(
                f"hospital {me}: only {len(signers)} valid survivor signatures over "
                f"{list(survivors)} ({', '.join(sorted(signers)) or 'none'}), fewer than the "
                f"{votes_needed(setup)} needed; refusing to reveal (the consistency check "
                "failed)")
        return survivors

    def _check_roles(self, setup: RoundSetup, request: UnmaskRequest,
                     survivors: tuple[str, ...]) -> tuple[set[str], set[str]]:
        me, peers = self.hospital, set(self._peers)
        live, dropped = (peers & set(survivors)) | {me}, peers - set(survivors)
        if tuple(request.survivors) != tuple(sorted(live)) or \
                tuple(request.dropped) != tuple(sorted(dropped)):
            raise ProtocolViolationError(
                f"unmask request to hospital {me}: neighbours {list(request.survivors)} "
                f"survived and {list(request.dropped)} dropped does not match the signed "
                f"survivor set (expected {sorted(live)} and {sorted(dropped)}); refusing")
        if len(live) < setup.threshold:
            raise BelowThresholdError(
                f"hospital {me}: only {len(live)} of its share holders survived, fewer "
                f"than the threshold t={setup.threshold}; refusing to reveal")
        return live, dropped

    def _open_shares(self, setup: RoundSetup, c_key: X25519PrivateKey,
                     shares: tuple[EncryptedShare, ...]
                     ) -> tuple[dict[str, SharePlaintext], tuple[str, ...]]:
        """The readable shares by sender, and the senders whose share did not decrypt or
        decode (their fault, not this hospital's: it reveals nothing from them)."""
        me, my_x = self.hospital, setup.index_of(self.hospital)
        opened: dict[str, SharePlaintext] = {}
        unreadable: set[str] = set()
        for enc in shares:
            if enc.receiver != me:
                raise ProtocolViolationError(
                    f"hospital {me} was routed a share addressed to {enc.receiver}")
            if enc.sender not in self._peers:
                raise ProtocolViolationError(
                    f"hospital {me} was routed a share from {enc.sender}, not a neighbour "
                    "whose keys it received")
            if enc.sender in opened or enc.sender in unreadable:
                raise MalformedMessageError(f"hospital {me} was routed two shares from "
                                            f"{enc.sender}")
            try:
                key = share_key(c_key, self._peers[enc.sender].c_public, setup.run_id,
                                setup.round, me, enc.sender)
                ad = share_ad(setup.run_id, setup.round, SHARE_STAGE, enc.sender, me)
                plain = SharePlaintext.from_bytes(
                    decrypt_share(key, enc.ciphertext, ad, enc.sender, me))
                xs = {Share.from_bytes(open_signed_share(
                    self._pinned[enc.sender], signed, setup.run_id, setup.round, enc.sender, me,
                    kind)).x for signed, kind in ((plain.b_share, "b"), (plain.s_share, "s"))}
            except (SecAggError, ValueError):
                unreadable.add(enc.sender)
                continue
            if (plain.owner, plain.holder) != (enc.sender, me) or xs != {my_x}:
                unreadable.add(enc.sender)
                continue
            opened[enc.sender] = plain
        return opened, tuple(sorted(unreadable))

    def unmask(self, request: UnmaskRequest) -> Reveal:
        """Reveal b-shares of survivors and s-key shares / pair seeds of dropped neighbours,
        once, and only under t signatures over the survivor set it signed last."""
        setup, c_key, s_key = self._expect((MASKED,), "unmask")
        me = self.hospital
        check_current(setup, request.run_id, request.round, me, "unmask request to")
        if request.receiver != me:
            raise ProtocolViolationError(
                f"hospital {me} received an unmask request addressed to {request.receiver}")
        survivors = self._check_signatures(setup, request)
        live, dropped = self._check_roles(setup, request, survivors)
        opened, unreadable = self._open_shares(setup, c_key, request.shares)
        routed = {e.sender for e in request.shares}
        missing = sorted(p for p in live - {me} if p not in routed)
        if missing:
            raise ProtocolViolationError(
                f"unmask request to hospital {me} lists {', '.join(missing)} as survivors but "
                "does not carry their shares; the server must route every survivor's share")
        b_out = {p: opened[p].b_share for p in sorted(live - {me}) if p in opened}
        b_out[me] = self._own_b_share
        s_out = {p: opened[p].s_share for p in sorted(dropped) if p in opened}
        seeds = {p: pair_seed(s_key, self._peers[p].s_public, setup.run_id, setup.round, me, p)
                 for p in sorted(dropped)}
        self._stage = REVEALED
        return Reveal(setup.run_id, setup.round, me, dict(sorted(b_out.items())), s_out, seeds,
                      unreadable)

    # state for stateless handlers -------------------------------------------------------
    def export_state(self) -> bytes:
        """Everything needed to resume this round; contains private keys: keep it local."""
        w = Writer(TAG_CLIENT_STATE).text(self.hospital).text(self._stage)
        w.blob(self._setup.to_bytes() if self._setup else b"")
        w.blob(x25519_private_bytes(self._c) if self._c else b"")
        w.blob(x25519_private_bytes(self._s) if self._s else b"")
        w.blobs([self._peers[p].to_bytes() for p in sorted(self._peers)])
        w.blob(self._own_b_share).texts(self._advertised)
        w.blobs([Writer(0).texts(s).finish() for s in self._signed])
        return w.finish()

    @classmethod
    def restore(cls, state: bytes, identity: Ed25519PrivateKey,
                pinned: Mapping[str, bytes], **rule: int | None) -> SecAggClient:
        r = Reader(state, TAG_CLIENT_STATE, "secure-aggregation client state")
        hospital, stage = r.text(), r.text()
        setup_raw, c_raw, s_raw = r.blob(), r.blob(), r.blob()
        peers = [Advertise.from_bytes(b) for b in r.blobs()]
        own_b, advertised, signed = r.blob(), r.texts(), r.blobs()
        r.done()
        client = cls(hospital, identity, pinned, **rule)  # type: ignore[arg-type]
        client._stage = stage
        client._setup = RoundSetup.from_bytes(setup_raw) if setup_raw else None
        client._c = X25519PrivateKey.from_private_bytes(c_raw) if c_raw else None
        client._s = X25519PrivateKey.from_private_bytes(s_raw) if s_raw else None
        client._peers = {a.sender: a for a in peers}
        client._own_b_share = own_b
        client._advertised = advertised
        client._signed = [_read_texts(raw) for raw in signed]
        return client


def _read_texts(raw: bytes) -> tuple[str, ...]:
    r = Reader(raw, 0, "signed survivor set")
    out = r.texts()
    r.done()
    return out

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
    decrypt_share,
    encrypt_share,
    identity_public_bytes,
    pair_seed,
    share_ad,
    share_key,
    sign_advertise,
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
    UnknownHospitalError,
)
from .messages import (
    TAG_CLIENT_STATE,
    Advertise,
    EncryptedShare,
    KeysBroadcast,
    MaskedVector,
    Reveal,
    RoundSetup,
    SharesMessage,
    UnmaskRequest,
)
from .protocol import (
    SHARE_STAGE,
    SharePlaintext,
    add_mask,
    check_current,
    check_pinned,
    graph_of,
    pair_mask,
    pair_sign,
    self_mask,
)
from .shamir import Share, split

NEW, ADVERTISED, MASKED, REVEALED = "new", "advertised", "masked", "revealed"
SURVIVED, DROPPED = "survived", "dropped"


class SecAggClient:
    """One hospital in one round: `advertise` -> `share_and_mask` -> `unmask`.

    `pinned` maps every hospital id to its raw 32-byte Ed25519 identity public key; keys of
    hospitals outside it, or whose signature fails, are refused by name.
    """

    def __init__(self, hospital: str, identity: Ed25519PrivateKey,
                 pinned: Mapping[str, bytes]) -> None:
        check_pinned([hospital], pinned, f"hospital {hospital}")
        if pinned[hospital] != identity_public_bytes(identity):
            raise SignatureError(
                f"hospital {hospital}: the local identity key does not match its pinned public "
                "key; use the enrolled key or re-enroll the hospital")
        self.hospital = hospital
        self._identity = identity
        self._pinned = dict(pinned)
        self._stage = NEW
        self._setup: RoundSetup | None = None
        self._c: X25519PrivateKey | None = None
        self._s: X25519PrivateKey | None = None
        self._peers: dict[str, Advertise] = {}
        self._own_b_share = b""
        self._roles: dict[str, str] = {}

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
        if self.hospital not in setup.participants:
            raise UnknownHospitalError(
                f"hospital {self.hospital} is not among the participants of run "
                f"{setup.run_id!r} round {setup.round}")
        check_pinned(setup.participants, self._pinned,
                     f"round setup received by hospital {self.hospital}")
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
            peers[adv.sender] = adv
        if len(peers) + 1 < setup.threshold:
            raise BelowThresholdError(
                f"hospital {self.hospital}: only {len(peers)} neighbours advertised keys; "
                f"{setup.threshold - 1} are needed for threshold t={setup.threshold}")
        return peers

    def share_and_mask(self, keys: KeysBroadcast, vector: npt.NDArray[np.uint32]
                       ) -> tuple[SharesMessage, MaskedVector]:
        """Verify the neighbours' keys, share b and the s key, and mask the quantized vector."""
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
            if holder == me:
                self._own_b_share = b_sh.to_bytes()
                continue
            key = share_key(c_key, peers[holder].c_public, run, rnd, me, holder)
            plain = SharePlaintext(me, holder, b_sh.to_bytes(), s_sh.to_bytes()).to_bytes()
            blob = encrypt_share(key, plain, share_ad(run, rnd, SHARE_STAGE, me, holder))
            encrypted.append(EncryptedShare(me, holder, blob))

        masked = vec.astype(np.uint32, copy=True)
        add_mask(masked, self_mask(b_seed, setup.vector_length), 1)
        for peer in sorted(peers):
            seed = pair_seed(s_key, peers[peer].s_public, run, rnd, me, peer)
            add_mask(masked, pair_mask(seed, setup.vector_length), pair_sign(me, peer))
        self._peers, self._stage = peers, MASKED
        return (SharesMessage(run, rnd, me, tuple(encrypted)),
                MaskedVector(run, rnd, me, masked))

    # step 3 ------------------------------------------------------------------------------
    def _check_roles(self, setup: RoundSetup, request: UnmaskRequest) -> tuple[set[str], set[str]]:
        me = self.hospital
        survivors, dropped = set(request.survivors), set(request.dropped)
        if len(survivors) != len(request.survivors) or len(dropped) != len(request.dropped):
            raise MalformedMessageError(f"unmask request to hospital {me} repeats a hospital")
        both = sorted(survivors & dropped)
        if both:
            raise ProtocolViolationError(
                f"hospital {me} was asked to reveal both the self-mask share and the key share "
                f"of hospital(s) {', '.join(both)}; refusing (that would unmask their update)")
        if me in dropped or me not in survivors:
            raise ProtocolViolationError(
                f"hospital {me} is answering, yet the unmask request does not list it as a "
                "survivor; refusing")
        strangers = sorted((survivors | dropped) - set(self._peers) - {me})
        if strangers:
            raise ProtocolViolationError(
                f"unmask request to hospital {me} names {', '.join(strangers)}, which are not "
                "neighbours whose keys it received")
        for peer in sorted(survivors | dropped):
            role = SURVIVED if peer in survivors else DROPPED
            if self._roles.get(peer, role) != role:
                raise ProtocolViolationError(
                    f"hospital {me} already revealed for {peer} as {self._roles[peer]}; "
                    f"refusing to now treat it as {role} (that would unmask its update)")
        if len(survivors) < setup.threshold:
            raise BelowThresholdError(
                f"hospital {me}: only {len(survivors)} of its share holders survived, fewer "
                f"than the threshold t={setup.threshold}; refusing to reveal")
        return survivors, dropped

    def _open_shares(self, setup: RoundSetup, c_key: X25519PrivateKey,
                     shares: tuple[EncryptedShare, ...]) -> dict[str, SharePlaintext]:
        me, my_x = self.hospital, setup.index_of(self.hospital)
        opened: dict[str, SharePlaintext] = {}
        for enc in shares:
            if enc.receiver != me:
                raise ProtocolViolationError(
                    f"hospital {me} was routed a share addressed to {enc.receiver}")
            if enc.sender not in self._peers:
                raise ProtocolViolationError(
                    f"hospital {me} was routed a share from {enc.sender}, not a neighbour "
                    "whose keys it received")
            if enc.sender in opened:
                raise MalformedMessageError(f"hospital {me} was routed two shares from "
                                            f"{enc.sender}")
            key = share_key(c_key, self._peers[enc.sender].c_public, setup.run_id, setup.round,
                            me, enc.sender)
            ad = share_ad(setup.run_id, setup.round, SHARE_STAGE, enc.sender, me)
            raw = decrypt_share(key, enc.ciphertext, ad, enc.sender, me)
            try:
                plain = SharePlaintext.from_bytes(raw)
                xs = {Share.from_bytes(plain.b_share).x, Share.from_bytes(plain.s_share).x}
            except (SecAggError, ValueError) as exc:
                raise MalformedMessageError(
                    f"share from hospital {enc.sender} to {me} does not decode: {exc}") from exc
            if (plain.owner, plain.holder) != (enc.sender, me) or xs != {my_x}:
                raise MalformedMessageError(
                    f"share from hospital {enc.sender} to {me} is labelled for "
                    f"{plain.owner} -> {plain.holder} at x={sorted(xs)}; refusing it")
            opened[enc.sender] = plain
        return opened

    def unmask(self, request: UnmaskRequest) -> Reveal:
        """Reveal b-shares of survivors and s-key shares / pair seeds of dropped neighbours."""
        setup, c_key, s_key = self._expect((MASKED, REVEALED), "unmask")
        me = self.hospital
        check_current(setup, request.run_id, request.round, me, "unmask request to")
        if request.receiver != me:
            raise ProtocolViolationError(
                f"hospital {me} received an unmask request addressed to {request.receiver}")
        survivors, dropped = self._check_roles(setup, request)
        opened = self._open_shares(setup, c_key, request.shares)  # all before revealing any
        b_out: dict[str, bytes] = {}
        for peer in sorted(survivors):
            if peer == me:
                b_out[peer] = self._own_b_share
            elif peer in opened:
                b_out[peer] = opened[peer].b_share
            else:
                raise ProtocolViolationError(
                    f"unmask request to hospital {me} lists {peer} as a survivor but does not "
                    "carry its share; the server must route every survivor's share")
        s_out = {p: opened[p].s_share for p in sorted(dropped) if p in opened}
        seeds = {p: pair_seed(s_key, self._peers[p].s_public, setup.run_id, setup.round, me, p)
                 for p in sorted(dropped)}
        self._roles.update({p: SURVIVED for p in survivors})
        self._roles.update({p: DROPPED for p in dropped})
        self._stage = REVEALED
        return Reveal(setup.run_id, setup.round, me, b_out, s_out, seeds)

    # state for stateless handlers -------------------------------------------------------
    def export_state(self) -> bytes:
        """Everything needed to resume this round; contains private keys: keep it local."""
        w = Writer(TAG_CLIENT_STATE).text(self.hospital).text(self._stage)
        w.blob(self._setup.to_bytes() if self._setup else b"")
        w.blob(x25519_private_bytes(self._c) if self._c else b"")
        w.blob(x25519_private_bytes(self._s) if self._s else b"")
        w.blobs([self._peers[p].to_bytes() for p in sorted(self._peers)])
        w.blob(self._own_b_share)
        roles = sorted(self._roles)
        return w.texts(roles).texts([self._roles[p] for p in roles]).finish()

    @classmethod
    def restore(cls, state: bytes, identity: Ed25519PrivateKey,
                pinned: Mapping[str, bytes]) -> SecAggClient:
        r = Reader(state, TAG_CLIENT_STATE, "secure-aggregation client state")
        hospital, stage = r.text(), r.text()
        setup_raw, c_raw, s_raw = r.blob(), r.blob(), r.blob()
        peers = [Advertise.from_bytes(b) for b in r.blobs()]
        own_b = r.blob()
        roles = dict(zip(r.texts(), r.texts(), strict=True))
        r.done()
        client = cls(hospital, identity, pinned)
        client._stage = stage
        client._setup = RoundSetup.from_bytes(setup_raw) if setup_raw else None
        client._c = X25519PrivateKey.from_private_bytes(c_raw) if c_raw else None
        client._s = X25519PrivateKey.from_private_bytes(s_raw) if s_raw else None
        client._peers = {a.sender: a for a in peers}
        client._own_b_share = own_b
        client._roles = roles
        return client

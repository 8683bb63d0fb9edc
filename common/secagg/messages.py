"""Typed secure-aggregation messages, independent of Flower, with `to_bytes`/`from_bytes`.

The lead transport (Flower ConfigRecord / ArrayRecord) carries these as opaque bytes; the masked
vector is raw little-endian uint32 so it can also travel as an array. Every message carries the
run id and round so a replay from another round or run is refused by name (`ReplayError`).

Flow of round r (-> means the server relays; one arrow per direction of a round trip):
  server: RoundSetup(r) ->  client: Advertise(r)       (signed ephemeral keys; only where the
                                                        client has none for r, see below)
  server: KeysBroadcast -> client: SharesMessage + MaskedVector + SurvivorSignature
                                                       (one reply: share, mask, and a signature
                                                        over the set of hospitals that got keys)
  [server: ConsistencyRequest -> client: SurvivorSignature]
                                                       (only when someone dropped while masking:
                                                        a signature over the survivor set)
  server: UnmaskRequest(r) [+ RoundSetup(r+1)]
                        -> client: Reveal(r) [+ Advertise(r+1)]
                                                       (given t signatures over its survivor set:
                                                        b-shares of survivors, key shares and
                                                        pairwise seeds for dropped neighbours;
                                                        fresh signed keys for the next round)
A transport may send round r+1's RoundSetup with round r's UnmaskRequest, so that a steady-state
round takes two round trips; every message still names its own run and round, and is checked
against them alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from .codec import Reader, Writer
from .errors import MalformedMessageError
from .graph import check_graph_params

TAG_SETUP = 1
TAG_ADVERTISE = 2
TAG_KEYS = 3
TAG_SHARES = 4
TAG_MASKED = 5
TAG_UNMASK = 6
TAG_REVEAL = 7
TAG_SHARE_PLAINTEXT = 8
TAG_CLIENT_STATE = 9
TAG_SIGNATURE = 10
TAG_CONSISTENCY = 11


@dataclass(frozen=True)
class RoundSetup:
    """Public parameters of one round, chosen by the server and checked by every client.

    participants: sorted hospital ids; a hospital's Shamir x is its 1-based index here.
    degree: neighbours per hospital (n-1 = complete graph); threshold: shares needed out of
    the degree+1 holders; vector_length: length of the quantized vector (weight included).
    """

    run_id: str
    round: int
    participants: tuple[str, ...]
    vector_length: int
    degree: int
    threshold: int
    graph_seed: bytes

    def validate(self) -> None:
        parts = self.participants
        if list(parts) != sorted(set(parts)):
            raise MalformedMessageError(
                f"round setup for run {self.run_id} round {self.round}: participants must be "
                "sorted and unique")
        if self.vector_length < 1:
            raise MalformedMessageError(f"round setup: vector_length {self.vector_length} < 1")
        try:
            check_graph_params(len(parts), self.degree, self.threshold)
        except ValueError as exc:
            raise MalformedMessageError(f"round setup: {exc}") from exc

    def index_of(self, hospital: str) -> int:
        """1-based Shamir x of a hospital."""
        return self.participants.index(hospital) + 1

    def to_bytes(self) -> bytes:
        return (Writer(TAG_SETUP).text(self.run_id).u64(self.round).texts(self.participants)
                .u64(self.vector_length).u32(self.degree).u32(self.threshold)
                .blob(self.graph_seed).finish())

    @classmethod
    def from_bytes(cls, data: bytes) -> RoundSetup:
        r = Reader(data, TAG_SETUP, "round setup")
        out = cls(r.text(), r.u64(), r.texts(), r.u64(), r.u32(), r.u32(), r.blob())
        r.done()
        return out


@dataclass(frozen=True)
class Advertise:
    """A hospital's two ephemeral X25519 public keys, signed by its identity key."""

    run_id: str
    round: int
    sender: str
    c_public: bytes
    s_public: bytes
    signature: bytes

    def to_bytes(self) -> bytes:
        return (Writer(TAG_ADVERTISE).text(self.run_id).u64(self.round).text(self.sender)
                .blob(self.c_public).blob(self.s_public).blob(self.signature).finish())

    @classmethod
    def from_bytes(cls, data: bytes) -> Advertise:
        r = Reader(data, TAG_ADVERTISE, "advertisement")
        out = cls(r.text(), r.u64(), r.text(), r.blob(), r.blob(), r.blob())
        r.done()
        return out


@dataclass(frozen=True)
class KeysBroadcast:
    """Server -> one hospital: the advertisements of its neighbours that advertised, and the
    sorted set of every hospital whose keys the server admitted (the hospital signs it)."""

    run_id: str
    round: int
    receiver: str
    advertisements: tuple[Advertise, ...]
    advertised: tuple[str, ...] = ()

    def to_bytes(self) -> bytes:
        return (Writer(TAG_KEYS).text(self.run_id).u64(self.round).text(self.receiver)
                .blobs([a.to_bytes() for a in self.advertisements]).texts(self.advertised)
                .finish())

    @classmethod
    def from_bytes(cls, data: bytes) -> KeysBroadcast:
        r = Reader(data, TAG_KEYS, "keys broadcast")
        out = cls(r.text(), r.u64(), r.text(),
                  tuple(Advertise.from_bytes(b) for b in r.blobs()), r.texts())
        r.done()
        return out


@dataclass(frozen=True)
class SurvivorSignature:
    """A hospital's Ed25519 signature over (run, round, setup digest, sorted survivor set):
    the consistency check's vote that this is the set the server showed it."""

    run_id: str
    round: int
    signer: str
    survivors: tuple[str, ...]
    signature: bytes

    def to_bytes(self) -> bytes:
        return (Writer(TAG_SIGNATURE).text(self.run_id).u64(self.round).text(self.signer)
                .texts(self.survivors).blob(self.signature).finish())

    @classmethod
    def from_bytes(cls, data: bytes) -> SurvivorSignature:
        r = Reader(data, TAG_SIGNATURE, "survivor signature")
        out = cls(r.text(), r.u64(), r.text(), r.texts(), r.blob())
        r.done()
        return out


@dataclass(frozen=True)
class ConsistencyRequest:
    """Server -> one surviving hospital: the round's survivor set, to sign (sent only when it
    differs from the set of hospitals that got keys, which every hospital signed already)."""

    run_id: str
    round: int
    receiver: str
    survivors: tuple[str, ...]

    def to_bytes(self) -> bytes:
        return (Writer(TAG_CONSISTENCY).text(self.run_id).u64(self.round).text(self.receiver)
                .texts(self.survivors).finish())

    @classmethod
    def from_bytes(cls, data: bytes) -> ConsistencyRequest:
        r = Reader(data, TAG_CONSISTENCY, "consistency request")
        out = cls(r.text(), r.u64(), r.text(), r.texts())
        r.done()
        return out


@dataclass(frozen=True)
class EncryptedShare:
    """AES-GCM ciphertext (nonce included) of one holder's shares of one sender's secrets."""

    sender: str
    receiver: str
    ciphertext: bytes


def _write_shares(w: Writer, shares: tuple[EncryptedShare, ...]) -> Writer:
    w.u32(len(shares))
    for s in shares:
        w.text(s.sender).text(s.receiver).blob(s.ciphertext)
    return w


def _read_shares(r: Reader) -> tuple[EncryptedShare, ...]:
    return tuple(EncryptedShare(r.text(), r.text(), r.blob()) for _ in range(r.u32()))


@dataclass(frozen=True)
class SharesMessage:
    """Hospital -> server: encrypted shares, one per neighbour, for the server to route."""

    run_id: str
    round: int
    sender: str
    shares: tuple[EncryptedShare, ...]

    def to_bytes(self) -> bytes:
        w = Writer(TAG_SHARES).text(self.run_id).u64(self.round).text(self.sender)
        return _write_shares(w, self.shares).finish()

    @classmethod
    def from_bytes(cls, data: bytes) -> SharesMessage:
        r = Reader(data, TAG_SHARES, "shares message")
        out = cls(r.text(), r.u64(), r.text(), _read_shares(r))
        r.done()
        return out


@dataclass(frozen=True, eq=False)
class MaskedVector:
    """Hospital -> server: quantized update + masks mod 2^32 (uint32)."""

    run_id: str
    round: int
    sender: str
    vector: npt.NDArray[np.uint32]

    def to_bytes(self) -> bytes:
        raw = np.ascontiguousarray(self.vector, dtype="<u4").tobytes()
        return (Writer(TAG_MASKED).text(self.run_id).u64(self.round).text(self.sender)
                .blob(raw).finish())

    @classmethod
    def from_bytes(cls, data: bytes) -> MaskedVector:
        r = Reader(data, TAG_MASKED, "masked vector")
        run_id, round_, sender, raw = r.text(), r.u64(), r.text(), r.blob()
        r.done()
        if len(raw) % 4:
            raise MalformedMessageError(
                f"masked vector from hospital {sender}: {len(raw)} bytes is not a whole "
                "number of uint32 values")
        return cls(run_id, round_, sender, np.frombuffer(raw, dtype="<u4").astype(np.uint32))


@dataclass(frozen=True)
class UnmaskRequest:
    """Server -> one surviving hospital: which of its neighbours survived or dropped, the
    encrypted shares addressed to it, the round's whole survivor set and the signatures of
    the survivors over it (the hospital reveals only given t of them)."""

    run_id: str
    round: int
    receiver: str
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    shares: tuple[EncryptedShare, ...]
    all_survivors: tuple[str, ...] = ()
    signatures: tuple[SurvivorSignature, ...] = ()

    def to_bytes(self) -> bytes:
        w = (Writer(TAG_UNMASK).text(self.run_id).u64(self.round).text(self.receiver)
             .texts(self.survivors).texts(self.dropped))
        return (_write_shares(w, self.shares).texts(self.all_survivors)
                .blobs([s.to_bytes() for s in self.signatures]).finish())

    @classmethod
    def from_bytes(cls, data: bytes) -> UnmaskRequest:
        r = Reader(data, TAG_UNMASK, "unmask request")
        out = cls(r.text(), r.u64(), r.text(), r.texts(), r.texts(), _read_shares(r),
                  r.texts(), tuple(SurvivorSignature.from_bytes(b) for b in r.blobs()))
        r.done()
        return out


def _write_map(w: Writer, items: dict[str, bytes]) -> Writer:
    keys = sorted(items)
    return w.texts(keys).blobs([items[k] for k in keys])


def _read_map(r: Reader, what: str) -> dict[str, bytes]:
    keys, values = r.texts(), r.blobs()
    if len(keys) != len(values) or len(set(keys)) != len(keys):
        raise MalformedMessageError(f"{what}: mismatched or duplicate entries")
    return dict(zip(keys, values, strict=True))


@dataclass(frozen=True)
class Reveal:
    """Hospital -> server: what it may reveal for unmasking, keyed by the peer concerned.

    b_shares: its shares of survivors' self-mask seeds; s_shares: its shares of dropped
    neighbours' mask keys; pair_seeds: its pairwise-mask seeds with dropped neighbours;
    unreadable: neighbours whose share to it did not decrypt or decode (it reveals nothing
    from those). A peer appears in b_shares or in the other two, never both.
    """

    run_id: str
    round: int
    sender: str
    b_shares: dict[str, bytes] = field(default_factory=dict)
    s_shares: dict[str, bytes] = field(default_factory=dict)
    pair_seeds: dict[str, bytes] = field(default_factory=dict)
    unreadable: tuple[str, ...] = ()

    def to_bytes(self) -> bytes:
        w = Writer(TAG_REVEAL).text(self.run_id).u64(self.round).text(self.sender)
        for items in (self.b_shares, self.s_shares, self.pair_seeds):
            _write_map(w, items)
        return w.texts(self.unreadable).finish()

    @classmethod
    def from_bytes(cls, data: bytes) -> Reveal:
        r = Reader(data, TAG_REVEAL, "reveal")
        out = cls(r.text(), r.u64(), r.text(), _read_map(r, "reveal"), _read_map(r, "reveal"),
                  _read_map(r, "reveal"), r.texts())
        r.done()
        return out

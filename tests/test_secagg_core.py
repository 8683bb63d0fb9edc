"""Secure-aggregation protocol: correctness with dropouts, and refusal of bad messages.

Every message passes through to_bytes/from_bytes on its way, as it would over Flower.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from functools import cache
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from fedmri.common.secagg import (
    AggregateResult,
    BelowThresholdError,
    ConsistencyRequest,
    EncryptedShare,
    InconsistentSharesError,
    KeysBroadcast,
    MalformedMessageError,
    MaskedVector,
    ProtocolViolationError,
    ReplayError,
    SecAggClient,
    ServerAggregator,
    SignatureError,
    UnknownHospitalError,
    UnmaskRequest,
    check_no_overflow,
    dequantize,
    error_bound,
    identity_public_bytes,
    new_identity,
    quantize,
)
from fedmri.common.secagg import client as client_module
from fedmri.common.secagg.crypto import advertise_payload
from fedmri.common.secagg.shamir import PRIME, Share

M = TypeVar("M")
U32 = npt.NDArray[np.uint32]


@cache
def identity(name: str) -> Ed25519PrivateKey:
    return new_identity()


def names(n: int) -> list[str]:
    return [f"h{i:02d}" for i in range(n)]


def pinned_for(hospitals: Collection[str]) -> dict[str, bytes]:
    return {h: identity_public_bytes(identity(h)) for h in hospitals}


def wire(msg: M) -> M:
    """Serialize and parse a message, as a transport would."""
    return type(msg).from_bytes(msg.to_bytes())  # type: ignore[attr-defined]


def modsum(vectors: Collection[U32], length: int) -> U32:
    total = np.zeros(length, dtype=np.uint32)
    for v in vectors:
        np.add(total, v, out=total)
    return total


@dataclasses.dataclass
class Round:
    """A server and its clients after setup; helpers drive each step with optional dropouts."""

    server: ServerAggregator
    clients: dict[str, SecAggClient]

    @classmethod
    def start(cls, hospitals: list[str], length: int, *, run_id: str = "run-a",
              round_: int = 1, **kw: Any) -> Round:
        pinned = pinned_for(hospitals)
        server = ServerAggregator.start_round(run_id, round_, hospitals, length, pinned, **kw)
        return cls(server, {h: SecAggClient(h, identity(h), pinned, **kw) for h in hospitals})

    def advertise(self, skip: Collection[str] = ()) -> dict[str, KeysBroadcast]:
        for h, c in self.clients.items():
            adv = c.advertise(wire(self.server.setup))
            if h not in skip:
                self.server.receive_advertise(wire(adv))
        return {h: wire(k) for h, k in self.server.finish_advertise().items()}

    def share_and_mask(self, keys: Mapping[str, KeysBroadcast], vectors: Mapping[str, U32], *,
                       silent: Collection[str] = (), shares_only: Collection[str] = (),
                       vector_only: Collection[str] = ()) -> dict[str, UnmaskRequest]:
        for h, k in keys.items():
            shares, masked, vote = self.clients[h].share_and_mask(k, vectors[h])
            if h in silent:
                continue
            if h not in vector_only:
                self.server.receive_shares(wire(shares))
            if h not in shares_only:
                self.server.receive_masked(wire(masked))
            self.server.receive_signature(wire(vote))
        # Someone dropped while masking: the survivors sign the survivor set (consistency).
        for h, check in self.server.finish_masking().items():
            self.server.receive_signature(wire(self.clients[h].sign_survivors(wire(check))))
        return {h: wire(r) for h, r in self.server.unmask_requests().items()}

    def unmask(self, requests: Mapping[str, UnmaskRequest],
               silent: Collection[str] = ()) -> AggregateResult:
        for h, req in requests.items():
            if h not in silent:
                self.server.receive_reveal(wire(self.clients[h].unmask(req)))
        return self.server.aggregate()


def random_vectors(hospitals: list[str], length: int, seed: int = 0) -> dict[str, U32]:
    rng = np.random.default_rng(seed)
    return {h: rng.integers(0, 2**32, length, dtype=np.uint32) for h in hospitals}


# --- correctness --------------------------------------------------------------------------

@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), n=st.integers(2, 7), dim=st.integers(1, 6),
       scale=st.sampled_from([16, 1000, 2**16]))
def test_secure_mean_matches_plain_weighted_mean_within_bound(data: st.DataObject, n: int,
                                                              dim: int, scale: int) -> None:
    clip, max_weight = 1.0, 1000
    check_no_overflow(n, clip, max_weight, scale)
    floats = st.floats(-3.0, 3.0, allow_nan=False, width=32)
    updates = [np.array(data.draw(st.lists(floats, min_size=dim, max_size=dim)),
                        dtype=np.float32) for _ in range(n)]
    weights = data.draw(st.lists(st.integers(1, max_weight), min_size=n, max_size=n))
    hospitals = names(n)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32)))
    vectors = {h: quantize(u, w, clip=clip, scale=scale, max_weight=max_weight, rng=rng)
               for h, u, w in zip(hospitals, updates, weights, strict=True)}
    rnd = Round.start(hospitals, dim)
    result = rnd.unmask(rnd.share_and_mask(rnd.advertise(), vectors))

    assert result.survivors == tuple(hospitals) and result.dropped == ()
    np.testing.assert_array_equal(result.total, modsum(vectors.values(), dim))
    total_weight = sum(weights)
    mean = dequantize(result.total, scale, total_weight)
    plain = sum(w * np.clip(u.astype(np.float64), -clip, clip)
                for u, w in zip(updates, weights, strict=True)) / sum(weights)
    bound = error_bound(n, scale, total_weight)
    assert np.all(np.abs(mean - plain) <= bound + 1e-12)


@pytest.mark.parametrize("case", ["no-advertise", "after-advertise", "after-share",
                                  "vector-only", "mixed"])
def test_dropouts_leave_exact_sum_of_survivors(case: str) -> None:
    hospitals, length = names(7), 9  # complete graph, t = 4 of 7
    vectors = random_vectors(hospitals, length)
    rnd = Round.start(hospitals, length)
    assert rnd.server.setup.threshold == 4
    no_adv = {"h01"} if case in ("no-advertise", "mixed") else set()
    keys = rnd.advertise(skip=no_adv)
    if no_adv:
        assert all("h01" not in {a.sender for a in k.advertisements} for k in keys.values())
    silent = {"h02"} if case in ("after-advertise", "mixed") else set()
    shares_only = {"h03"} if case in ("after-share", "mixed") else set()
    vector_only = {"h04"} if case == "vector-only" else set()
    requests = rnd.share_and_mask(keys, vectors, silent=silent, shares_only=shares_only,
                                  vector_only=vector_only)
    result = rnd.unmask(requests)
    dropped = no_adv | silent | shares_only | vector_only
    expected_survivors = sorted(set(hospitals) - dropped)
    assert list(result.survivors) == expected_survivors
    assert set(result.dropped) == dropped - no_adv
    np.testing.assert_array_equal(
        result.total, modsum([vectors[h] for h in expected_survivors], length))


def test_silent_survivor_during_unmask_still_exact_via_key_shares() -> None:
    hospitals, length = names(7), 5
    vectors = random_vectors(hospitals, length, seed=1)
    rnd = Round.start(hospitals, length)
    requests = rnd.share_and_mask(rnd.advertise(), vectors, shares_only={"h02"})
    # h05 does not reveal; the h02-h05 pairwise mask comes from h02's reconstructed key
    result = rnd.unmask(requests, silent={"h05"})
    survivors = [h for h in hospitals if h != "h02"]
    assert result.silent == ("h05",)
    np.testing.assert_array_equal(result.total, modsum([vectors[h] for h in survivors], length))


def test_sparse_graph_with_dropouts_is_exact() -> None:
    hospitals, length = names(12), 4
    vectors = random_vectors(hospitals, length, seed=2)
    rnd = Round.start(hospitals, length, degree=4)  # 4-regular, t = 3 of 5 holders
    server = rnd.server
    assert server.setup.threshold == 3
    keys = rnd.advertise()
    assert all(len(k.advertisements) == 4 for k in keys.values())
    neighbours = {h: {a.sender for a in k.advertisements} for h, k in keys.items()}
    gone = "h00"  # drops before its shares arrive

    def recoverable(half: str, quiet: str) -> bool:  # every survivor keeps t revealing holders
        out = {gone, half, quiet}
        return len(out) == 3 and quiet not in neighbours[gone] and all(
            len(({h} | neighbours[h]) - out) >= 3 for h in hospitals if h not in {gone, half})

    half, silent = next((a, b) for a in hospitals for b in hospitals if recoverable(a, b))
    requests = rnd.share_and_mask(keys, vectors, silent={gone}, shares_only={half})
    result = rnd.unmask(requests, silent={silent})
    survivors = [h for h in hospitals if h not in (gone, half)]
    np.testing.assert_array_equal(result.total, modsum([vectors[h] for h in survivors], length))


def test_client_state_survives_export_and_restore() -> None:
    hospitals, length = names(3), 4
    vectors = random_vectors(hospitals, length, seed=3)
    rnd = Round.start(hospitals, length)
    pinned = pinned_for(hospitals)

    def reload(h: str) -> None:
        state = rnd.clients[h].export_state()
        rnd.clients[h] = SecAggClient.restore(state, identity(h), pinned)

    keys = rnd.advertise()
    for h in hospitals:
        reload(h)
    requests = rnd.share_and_mask(keys, vectors)
    for h in hospitals:
        reload(h)
    result = rnd.unmask(requests)
    np.testing.assert_array_equal(result.total, modsum(vectors.values(), length))


# --- below threshold ----------------------------------------------------------------------

def test_below_threshold_at_each_stage_is_a_clear_error() -> None:
    hospitals, length = names(5), 3  # t = 3 of 5
    vectors = random_vectors(hospitals, length)
    rnd = Round.start(hospitals, length)
    with pytest.raises(BelowThresholdError, match=r"2 of 5 hospitals advertised.*t=3"):
        rnd.advertise(skip={"h00", "h01", "h02"})

    rnd = Round.start(hospitals, length)
    keys = rnd.advertise()
    with pytest.raises(BelowThresholdError, match=r"2 hospitals sent shares.*t=3"):
        rnd.share_and_mask(keys, vectors, silent={"h00", "h01", "h02"})

    rnd = Round.start(hospitals, length)
    requests = rnd.share_and_mask(rnd.advertise(), vectors, silent={"h00", "h01"})
    with pytest.raises(BelowThresholdError, match=r"self mask of hospital h02: 2 of the t=3"):
        rnd.unmask(requests, silent={"h02"})


def test_unshared_dropout_next_to_silent_survivor_names_both() -> None:
    hospitals, length = names(7), 3
    rnd = Round.start(hospitals, length)
    requests = rnd.share_and_mask(rnd.advertise(), random_vectors(hospitals, length),
                                  silent={"h01"})
    with pytest.raises(BelowThresholdError, match=r"survivor h03 .*dropped hospital h01"):
        rnd.unmask(requests, silent={"h03"})


# --- privacy of one masked vector ---------------------------------------------------------

def test_single_masked_vector_looks_uniform() -> None:
    hospitals, length = names(3), 8192
    zero = np.zeros(length, dtype=np.uint32)
    rnd = Round.start(hospitals, length)
    keys = rnd.advertise()
    _, masked, _ = rnd.clients["h00"].share_and_mask(keys["h00"], zero)

    def byte_pvalue(vec: U32) -> float:
        counts = np.bincount(np.frombuffer(vec.tobytes(), dtype=np.uint8), minlength=256)
        return float(chisquare(counts).pvalue)

    def top_bits_pvalue(vec: U32) -> float:
        return float(chisquare(np.bincount(vec >> 28, minlength=16)).pvalue)

    assert byte_pvalue(masked.vector) > 1e-6
    assert top_bits_pvalue(masked.vector) > 1e-6
    # the test can fail: an unmasked quantized update is far from uniform
    plain = quantize(np.random.default_rng(0).normal(0, 0.1, length), 10, clip=1.0,
                     scale=1000, max_weight=100)
    assert byte_pvalue(plain) < 1e-6 and top_bits_pvalue(plain) < 1e-6


# --- refusals -----------------------------------------------------------------------------

def _flip(blob: bytes, at: int = -1) -> bytes:
    out = bytearray(blob)
    out[at] ^= 0x01
    return bytes(out)


def test_tampered_share_is_its_senders_fault_not_the_holders() -> None:
    hospitals, length = names(4), 3  # t = 3 of 4
    vectors = random_vectors(hospitals, length)
    rnd = Round.start(hospitals, length)
    requests = rnd.share_and_mask(rnd.advertise(), vectors)
    req = requests["h00"]
    shares = tuple(EncryptedShare(s.sender, s.receiver, _flip(s.ciphertext))
                   if s.sender == "h02" else s for s in req.shares)
    # The holder does not abort: it reveals what it can read and names the unreadable share.
    reveal = rnd.clients["h00"].unmask(dataclasses.replace(req, shares=shares))
    assert reveal.unreadable == ("h02",) and set(reveal.b_shares) == {"h00", "h01", "h03"}
    rnd.server.receive_reveal(wire(reveal))
    for h in ("h01", "h02", "h03"):
        rnd.server.receive_reveal(wire(rnd.clients[h].unmask(requests[h])))
    result = rnd.server.aggregate()  # h02 still has t readable holders: the sum is exact
    np.testing.assert_array_equal(result.total, modsum(vectors.values(), length))
    assert rnd.server.unreadable_by() == {"h02": ["h00"]}


def test_shares_unreadable_to_too_many_holders_name_their_sender() -> None:
    hospitals, length = names(4), 3
    rnd = Round.start(hospitals, length)
    requests = rnd.share_and_mask(rnd.advertise(), random_vectors(hospitals, length))
    for h in ("h00", "h01"):
        req = requests[h]
        bad = tuple(EncryptedShare(s.sender, s.receiver, _flip(s.ciphertext))
                    if s.sender == "h02" else s for s in req.shares)
        rnd.server.receive_reveal(wire(rnd.clients[h].unmask(
            dataclasses.replace(req, shares=bad))))
    for h in ("h02", "h03"):
        rnd.server.receive_reveal(wire(rnd.clients[h].unmask(requests[h])))
    with pytest.raises(BelowThresholdError, match=r"h02: 2 of the t=3.*read by h00, h01"):
        rnd.server.aggregate()
    assert rnd.server.short_of_shares() == ["h02"]


def test_messages_from_another_round_or_run_are_rejected() -> None:
    hospitals, length = names(3), 2
    old = Round.start(hospitals, length, round_=1)
    old_keys = old.advertise()
    old_shares, old_masked, _ = old.clients["h00"].share_and_mask(
        old_keys["h00"], np.zeros(length, np.uint32))

    new = Round.start(hospitals, length, round_=2)
    stale_adv = old.server._adverts["h01"]  # captured on the wire in round 1
    with pytest.raises(ReplayError, match=r"hospital h01 .*round 1.*round 2"):
        new.server.receive_advertise(stale_adv)
    keys = new.advertise()
    with pytest.raises(ReplayError, match=r"hospital h00 .*round 1.*round 2"):
        new.server.receive_masked(old_masked)
    with pytest.raises(ReplayError, match="hospital h00"):
        new.server.receive_shares(old_shares)
    other_run = Round.start(hospitals, length, run_id="run-b", round_=2)
    with pytest.raises(ReplayError, match=r"'run-b'.*'run-a'"):
        new.clients["h00"].share_and_mask(other_run.advertise()["h00"],
                                          np.zeros(length, np.uint32))
    # a replayed advertisement smuggled into a keys broadcast is refused by the client
    smuggled = dataclasses.replace(keys["h00"], advertisements=(stale_adv,))
    with pytest.raises(ReplayError, match="hospital h01"):
        new.clients["h00"].share_and_mask(smuggled, np.zeros(length, np.uint32))


def test_share_replayed_into_next_round_fails_authentication() -> None:
    hospitals, length = names(3), 2
    old = Round.start(hospitals, length, round_=1)
    old_req = old.share_and_mask(old.advertise(), random_vectors(hospitals, length))["h00"]
    new = Round.start(hospitals, length, round_=2)
    req = new.share_and_mask(new.advertise(), random_vectors(hospitals, length))["h00"]
    mixed = tuple(next(o for o in old_req.shares if o.sender == s.sender)
                  if s.sender == "h01" else s for s in req.shares)
    # The replayed share fails authentication: unreadable, so nothing of h01 is revealed.
    reveal = new.clients["h00"].unmask(dataclasses.replace(req, shares=mixed))
    assert reveal.unreadable == ("h01",) and "h01" not in reveal.b_shares


def test_forged_signature_and_unknown_hospital_are_rejected() -> None:
    hospitals, length = names(3), 2
    rnd = Round.start(hospitals, length)
    adv = rnd.clients["h01"].advertise(rnd.server.setup)
    forged = dataclasses.replace(adv, c_public=rnd.clients["h02"].advertise(
        rnd.server.setup).c_public)  # the server (or a MITM) swaps in another key
    with pytest.raises(SignatureError, match="hospital h01"):
        rnd.server.receive_advertise(forged)
    impostor = Ed25519PrivateKey.generate()
    resigned = dataclasses.replace(adv, signature=impostor.sign(b"anything"))
    with pytest.raises(SignatureError, match="hospital h01"):
        rnd.server.receive_advertise(resigned)
    stranger = dataclasses.replace(adv, sender="mallory")
    with pytest.raises(UnknownHospitalError, match="mallory"):
        rnd.server.receive_advertise(stranger)

    # the client checks the relayed keys itself (the server may be the attacker)
    c0 = rnd.clients["h00"]
    c0.advertise(rnd.server.setup)
    bad_keys = KeysBroadcast("run-a", 1, "h00", (forged,), tuple(hospitals))
    with pytest.raises(SignatureError, match="hospital h01"):
        c0.share_and_mask(bad_keys, np.zeros(length, np.uint32))
    with pytest.raises(UnknownHospitalError, match="mallory"):
        c0.share_and_mask(KeysBroadcast("run-a", 1, "h00", (stranger,), tuple(hospitals)),
                          np.zeros(length, np.uint32))
    with pytest.raises(UnknownHospitalError, match="mallory"):
        SecAggClient("mallory", impostor, pinned_for(hospitals))
    with pytest.raises(SignatureError, match="hospital h00.*does not match"):
        SecAggClient("h00", impostor, pinned_for(hospitals))


def test_setup_with_unpinned_participant_is_refused_by_client() -> None:
    rnd = Round.start(names(3) + ["zed"], 2)
    client = SecAggClient("h00", identity("h00"), pinned_for(names(3)))
    with pytest.raises(UnknownHospitalError, match="zed"):
        client.advertise(rnd.server.setup)


@pytest.mark.parametrize("field,changes", [
    ("participants", {"participants": tuple(names(5)), "degree": 4, "threshold": 3}),
    ("degree", {"degree": 3, "threshold": 3}), ("threshold", {"threshold": 5}),
    ("graph_seed", {"graph_seed": b"x" * 32})])
def test_setup_the_server_chose_is_refused(field: str, changes: dict[str, Any]) -> None:
    """Participants, degree, threshold and graph seed follow from the member list and the
    run and round: a (valid) setup that differs in any of them is refused by name."""
    hospitals = names(6)
    setup = dataclasses.replace(Round.start(hospitals, 2).server.setup, **changes)
    setup.validate()
    client = SecAggClient("h00", identity("h00"), pinned_for(hospitals))
    with pytest.raises(ProtocolViolationError, match=rf"{field} is .*the pinned members give"):
        client.advertise(setup)


@pytest.mark.parametrize("bad", ["short", "long", "dtype", "2d"])
def test_masked_vector_of_wrong_shape_or_dtype_is_rejected(bad: str) -> None:
    hospitals, length = names(3), 6
    rnd = Round.start(hospitals, length)
    rnd.advertise()
    vec = {"short": np.zeros(length - 1, np.uint32), "long": np.zeros(length + 1, np.uint32),
           "dtype": np.zeros(length, np.float32), "2d": np.zeros((2, 3), np.uint32)}[bad]
    with pytest.raises(MalformedMessageError, match=r"hospital h01.*uint32 of length 6"):
        rnd.server.receive_masked(MaskedVector("run-a", 1, "h01", vec))


def test_truncated_masked_vector_bytes_are_rejected() -> None:
    raw = MaskedVector("run-a", 1, "h01", np.arange(3, dtype=np.uint32)).to_bytes()
    with pytest.raises(MalformedMessageError, match="truncated"):
        MaskedVector.from_bytes(raw[:-1])
    with pytest.raises(MalformedMessageError, match="trailing"):
        MaskedVector.from_bytes(raw + b"\x00")


def test_client_reveals_once_and_only_what_the_signed_set_implies() -> None:
    hospitals, length = names(5), 2
    rnd = Round.start(hospitals, length)
    requests = rnd.share_and_mask(rnd.advertise(), random_vectors(hospitals, length))
    req, c0 = requests["h00"], rnd.clients["h00"]
    # h01 also listed as dropped: the per-neighbour roles must follow the signed set
    both = dataclasses.replace(req, dropped=("h01",))
    with pytest.raises(ProtocolViolationError, match=r"h00.*does not match the signed"):
        c0.unmask(both)
    # fewer than t signatures over the set: nothing is revealed
    weak = dataclasses.replace(req, signatures=req.signatures[:2])
    with pytest.raises(ProtocolViolationError, match=r"only 2 valid survivor signatures"):
        c0.unmask(weak)
    # t signatures, but over another set (h01 dropped): not the set h00 signed
    other = tuple(h for h in hospitals if h != "h01")
    with pytest.raises(ProtocolViolationError, match="is not the one it signed"):
        c0.unmask(dataclasses.replace(req, all_survivors=other))
    c0.unmask(req)
    with pytest.raises(ProtocolViolationError, match="cannot unmask in stage 'revealed'"):
        c0.unmask(req)  # once per round


def test_client_signs_at_most_one_survivor_set_besides_the_one_with_keys() -> None:
    hospitals, length = names(5), 2
    rnd = Round.start(hospitals, length)
    keys = rnd.advertise()
    c0 = rnd.clients["h00"]
    _, _, vote = c0.share_and_mask(keys["h00"], np.zeros(length, np.uint32))
    assert vote.survivors == tuple(hospitals)
    first = tuple(h for h in hospitals if h != "h04")
    assert c0.sign_survivors(ConsistencyRequest("run-a", 1, "h00", first)).survivors == first
    assert c0.sign_survivors(ConsistencyRequest("run-a", 1, "h00", first)).survivors == first
    second = tuple(h for h in hospitals if h != "h03")
    with pytest.raises(ProtocolViolationError, match="already signed the survivor set"):
        c0.sign_survivors(ConsistencyRequest("run-a", 1, "h00", second))
    c1 = rnd.clients["h01"]
    c1.share_and_mask(keys["h01"], np.zeros(length, np.uint32))
    with pytest.raises(ProtocolViolationError, match="includes it"):
        c1.sign_survivors(ConsistencyRequest("run-a", 1, "h01", ("h00", "h02", "h03")))


def test_server_refuses_out_of_order_and_duplicate_messages() -> None:
    hospitals, length = names(3), 2
    rnd = Round.start(hospitals, length)
    adv = rnd.clients["h00"].advertise(rnd.server.setup)
    rnd.server.receive_advertise(adv)
    with pytest.raises(ProtocolViolationError, match="h00 advertised twice"):
        rnd.server.receive_advertise(adv)
    with pytest.raises(ProtocolViolationError, match="stage 'advertise'"):
        rnd.server.receive_masked(MaskedVector("run-a", 1, "h00", np.zeros(length, np.uint32)))


def test_a_share_a_holder_altered_is_refused_naming_the_holder() -> None:
    """Shares carry their dealer's signature: a holder revealing another value is caught."""
    hospitals, length = names(4), 2
    rnd = Round.start(hospitals, length)
    requests = rnd.share_and_mask(rnd.advertise(), random_vectors(hospitals, length))
    reveal = rnd.clients["h01"].unmask(requests["h01"])
    raw = bytearray(reveal.b_shares["h00"])
    raw[10] ^= 1  # inside the share, before the signature
    forged = dataclasses.replace(reveal, b_shares={**reveal.b_shares, "h00": bytes(raw)})
    with pytest.raises(MalformedMessageError, match=r"hospital h01: its self-mask share for "
                                                    r"h00 .*not the one h00 dealt"):
        rnd.server.receive_reveal(wire(forged))


def test_a_dealer_with_inconsistent_shares_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hospital that signs shares not on one polynomial is the one blamed, not its holders."""
    hospitals, length = names(4), 2
    rnd = Round.start(hospitals, length)
    keys = rnd.advertise()
    real_split = client_module.split

    def bad_split(secret: bytes, t: int, xs: list[int]) -> list[Share]:
        shares = real_split(secret, t, xs)
        return [Share(s.x, (s.y + 1) % PRIME) if i == 0 else s for i, s in enumerate(shares)]

    vectors = random_vectors(hospitals, length)
    for h in hospitals:
        if h == "h02":
            monkeypatch.setattr(client_module, "split", bad_split)
        shares, masked, vote = rnd.clients[h].share_and_mask(keys[h], vectors[h])
        monkeypatch.setattr(client_module, "split", real_split)
        rnd.server.receive_shares(wire(shares))
        rnd.server.receive_masked(wire(masked))
        rnd.server.receive_signature(wire(vote))
    assert rnd.server.finish_masking() == {}
    requests = {h: wire(r) for h, r in rnd.server.unmask_requests().items()}
    with pytest.raises(InconsistentSharesError, match="hospital h02: the shares it signed") \
            as caught:
        rnd.unmask(requests)
    assert caught.value.dealer == "h02"


@pytest.mark.parametrize("key,why", [(b"\0" * 32, "low-order"), (b"\x09" * 31, "31 bytes")])
def test_a_signed_but_bad_ephemeral_key_is_refused_at_advertise(key: bytes, why: str) -> None:
    """A hospital's own (validly signed) low-order or short key is refused by the server, so
    it never reaches, and breaks, a neighbour's masking step."""
    hospitals = names(3)
    rnd = Round.start(hospitals, 2)
    adv = rnd.clients["h01"].advertise(rnd.server.setup)
    bad = dataclasses.replace(adv, c_public=key, signature=identity("h01").sign(
        advertise_payload("run-a", 1, "h01", key, adv.s_public)))
    with pytest.raises(MalformedMessageError, match=rf"hospital h01: .*{why}"):
        rnd.server.receive_advertise(bad)

"""Secure-aggregation building blocks: quantization, Shamir sharing, graph, PRG, encoding."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmri.common.secagg import (
    MalformedMessageError,
    QuantConfig,
    RoundSetup,
    check_no_overflow,
    dequantize,
    error_bound,
    max_safe_scale,
    quantize,
)
from fedmri.common.secagg.graph import (
    build_graph,
    check_graph_params,
    default_degree,
    default_threshold,
)
from fedmri.common.secagg.prg import PAIR_MASK_LABEL, SELF_MASK_LABEL, mask_vector
from fedmri.common.secagg.shamir import PRIME, Share, combine, split

# --- quantization -------------------------------------------------------------------------


def test_overflow_config_is_refused_with_the_numbers() -> None:
    with pytest.raises(ValueError, match=r"10 hospitals x \(clip 1.0 x max_weight 1000 x "
                                         r"scale 1000000.*2\^31-1.*largest safe scale is"):
        check_no_overflow(10, 1.0, 1000, 1_000_000)
    check_no_overflow(10, 1.0, 1000, 1000)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 200), clip=st.floats(1e-3, 1e3), max_weight=st.integers(1, 100_000))
def test_max_safe_scale_is_the_largest_safe_scale(n: int, clip: float, max_weight: int) -> None:
    try:
        scale = max_safe_scale(n, clip, max_weight)
    except ValueError:
        with pytest.raises(ValueError):
            check_no_overflow(n, clip, max_weight, 1)
        return
    check_no_overflow(n, clip, max_weight, scale)
    with pytest.raises(ValueError):
        check_no_overflow(n, clip, max_weight, scale + 1)


def test_worst_case_sum_does_not_wrap_at_the_safe_scale() -> None:
    n, clip, max_weight = 5, 0.5, 300
    cfg = QuantConfig.for_clients(n, clip, max_weight)
    for sign in (1.0, -1.0):
        total = np.zeros(2, dtype=np.uint32)
        for _ in range(n):
            np.add(total, cfg.quantize(np.full(2, sign * 7.0), max_weight), out=total)
        weight = n * max_weight
        mean = dequantize(total, cfg.scale, weight)
        np.testing.assert_allclose(mean, sign * clip, atol=error_bound(n, cfg.scale, weight))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_update_is_refused(bad: float) -> None:
    update = np.array([0.1, bad, 0.2], dtype=np.float32)
    with pytest.raises(ValueError, match=r"1 non-finite values \(first at flat index 1"):
        quantize(update, 3, clip=1.0, scale=100, max_weight=10)


def test_quantize_refuses_bad_weight_and_dtype() -> None:
    with pytest.raises(ValueError, match="exceeds max_weight 10"):
        quantize(np.zeros(2), 11, clip=1.0, scale=100, max_weight=10)
    with pytest.raises(ValueError, match="positive integer"):
        quantize(np.zeros(2), 0, clip=1.0, scale=100, max_weight=10)
    with pytest.raises(ValueError, match="real numeric"):
        quantize(np.array(["a"]), 1, clip=1.0, scale=100, max_weight=10)


def test_quantize_encodes_clipped_weighted_values() -> None:
    update = np.array([0.25, -0.5, 3.0, -3.0], dtype=np.float32)
    q = quantize(update, 4, clip=1.0, scale=8, max_weight=10,
                 rng=np.random.default_rng(0))
    assert q.dtype == np.uint32 and q.shape == (4,)
    np.testing.assert_array_equal(q.view(np.int32), [8, -16, 32, -32])  # exact: no rounding


@pytest.mark.parametrize("weight", [0, -3, 11, 2.5, float("nan")])
def test_declared_weight_outside_the_cap_is_refused_by_name(weight: float) -> None:
    with pytest.raises(ValueError, match=r"hospital h7 declared weight .* in 1\.\.10"):
        QuantConfig(1.0, 100, 10).check_weight(weight, "h7")


def test_stochastic_rounding_is_unbiased() -> None:
    rng = np.random.default_rng(1)
    q = quantize(np.full(20000, 0.3), 1, clip=1.0, scale=1, max_weight=1, rng=rng)
    values = q.view(np.int32)
    assert set(np.unique(values)) == {0, 1}
    assert abs(values.mean() - 0.3) < 0.02


def test_dequantize_refuses_zero_weight() -> None:
    with pytest.raises(ValueError, match="total_weight must be a positive integer"):
        dequantize(np.zeros(3, dtype=np.uint32), 10, 0)


# --- Shamir -------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(secret=st.binary(min_size=32, max_size=32), n=st.integers(1, 9), data=st.data())
def test_any_t_shares_recover_the_secret(secret: bytes, n: int, data: st.DataObject) -> None:
    t = data.draw(st.integers(1, n))
    shares = split(secret, t, n)
    subset = data.draw(st.lists(st.sampled_from(shares), min_size=t, max_size=n, unique=True))
    assert combine(subset, t) == secret
    for share in shares:
        assert Share.from_bytes(share.to_bytes()) == share


def test_shamir_uses_given_holder_indices_and_injected_rng() -> None:
    secret = bytes(range(32))
    a = split(secret, 2, [3, 7, 9], rng=random.Random(5))
    b = split(secret, 2, [3, 7, 9], rng=random.Random(5))
    assert a == b and [s.x for s in a] == [3, 7, 9]
    assert combine(a[1:], 2) == secret


def test_shamir_refusals() -> None:
    secret = b"\x01" * 32
    with pytest.raises(ValueError, match="t must be >= 1"):
        split(secret, 0, 3)
    with pytest.raises(ValueError, match="exceeds the number of holders"):
        split(secret, 4, 3)
    with pytest.raises(ValueError, match="duplicate"):
        split(secret, 2, [1, 2, 2])
    shares = split(secret, 3, 5)
    with pytest.raises(ValueError, match="at least t=3"):
        combine(shares[:2], 3)
    with pytest.raises(ValueError, match="duplicate"):
        combine([shares[0], shares[0], shares[1]], 3)
    wrong = Share(shares[4].x, (shares[4].y + 1) % PRIME)
    with pytest.raises(ValueError, match="inconsistent"):
        combine(shares[:4] + [wrong], 3)


def test_fewer_than_t_shares_do_not_give_the_secret() -> None:
    secret = bytes(range(32))
    shares = split(secret, 3, 5)
    for pair in ([shares[0], shares[1]], [shares[2], shares[4]]):
        # reading t-1 shares as if t were t-1 yields noise (or an out-of-range value)
        with contextlib.suppress(ValueError):
            assert combine(pair, 2) != secret


# --- graph --------------------------------------------------------------------------------


def test_small_federations_use_the_complete_graph() -> None:
    ids = [f"h{i}" for i in range(6)]
    g = build_graph(ids, default_degree(6), b"seed")
    assert all(g[h] == set(ids) - {h} for h in ids)
    assert default_threshold(5) == 4


@pytest.mark.parametrize("n, k", [(12, 4), (40, 7), (41, 8), (200, default_degree(200))])
def test_sparse_graph_is_regular_symmetric_and_deterministic(n: int, k: int) -> None:
    ids = [f"site-{i}" for i in range(n)]
    g = build_graph(ids, k, b"public-seed")
    assert all(len(ns) == k and h not in ns for h, ns in g.items())
    assert all(h in g[v] for h, ns in g.items() for v in ns)
    assert g == build_graph(list(reversed(ids)), k, b"public-seed")
    assert g != build_graph(ids, k, b"another-seed")


def test_default_degree_grows_logarithmically() -> None:
    assert default_degree(32) == 31
    k = default_degree(1000)
    assert 8 <= k <= 40 and (k * 1000) % 2 == 0
    assert (default_degree(33) * 33) % 2 == 0


def test_graph_parameter_refusals() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        check_graph_params(1, 1, 1)
    with pytest.raises(ValueError, match="both odd"):
        check_graph_params(11, 3, 3)
    with pytest.raises(ValueError, match="strict majority"):
        check_graph_params(10, 5, 3)  # 3 of 6 holders is not a majority
    with pytest.raises(ValueError, match="strict majority"):
        check_graph_params(10, 5, 7)


# --- PRG and encoding ---------------------------------------------------------------------


def test_prg_is_deterministic_and_label_separated() -> None:
    seed = bytes(range(32))
    a = mask_vector(seed, 1000, SELF_MASK_LABEL)
    assert a.dtype == np.uint32 and a.shape == (1000,) and a.flags.writeable
    np.testing.assert_array_equal(a, mask_vector(seed, 1000, SELF_MASK_LABEL))
    np.testing.assert_array_equal(a[:10], mask_vector(seed, 10, SELF_MASK_LABEL))
    assert not np.array_equal(a, mask_vector(seed, 1000, PAIR_MASK_LABEL))
    assert not np.array_equal(a, mask_vector(bytes(32), 1000, SELF_MASK_LABEL))
    with pytest.raises(ValueError, match="32 bytes"):
        mask_vector(b"short", 4, SELF_MASK_LABEL)


def test_round_setup_encoding_round_trips_and_refuses_garbage() -> None:
    setup = RoundSetup("run", 3, ("a", "b", "c"), 10, 2, 2, b"seed")
    assert RoundSetup.from_bytes(setup.to_bytes()) == setup
    raw = setup.to_bytes()
    with pytest.raises(MalformedMessageError, match="version 9"):
        RoundSetup.from_bytes(b"\x09" + raw[1:])
    with pytest.raises(MalformedMessageError, match="message type"):
        RoundSetup.from_bytes(raw[:1] + b"\x05" + raw[2:])
    with pytest.raises(MalformedMessageError, match="truncated"):
        RoundSetup.from_bytes(raw[:-3])
    with pytest.raises(MalformedMessageError, match="sorted and unique"):
        RoundSetup("run", 3, ("b", "a"), 10, 1, 2, b"").validate()

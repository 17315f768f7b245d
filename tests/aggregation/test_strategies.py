"""Properties of the aggregation maths (hypothesis): what must hold for any state dicts and sample counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from services.aggregation.privacy import (
    PrivacyConfig,
    add_gaussian_noise,
    epsilon_after,
    noise_std,
    privatise,
)
from services.aggregation.strategies import (
    ServerOptimizerConfig,
    ServerOptimizerState,
    Strategy,
    adaptive_server_step,
    aggregate,
    fedavg,
    weighted_average,
)
from shared.privacy import clip_update, update_norm

SHAPES = {"conv.weight": (2, 3), "conv.bias": (3,)}
finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)


def state_dicts() -> st.SearchStrategy[dict[str, np.ndarray]]:
    return st.fixed_dictionaries({key: arrays(np.float32, shape, elements=finite) for key, shape in SHAPES.items()})


updates_and_counts = st.integers(1, 5).flatmap(
    lambda n: st.tuples(
        st.lists(state_dicts(), min_size=n, max_size=n), st.lists(st.integers(1, 1000), min_size=n, max_size=n)
    )
)

SETTINGS = settings(max_examples=60, deadline=None)


@SETTINGS
@given(updates_and_counts)
def test_weighted_mean_lies_between_min_and_max(data):
    updates, counts = data
    mean = weighted_average(updates, counts)
    for key in SHAPES:
        stacked = np.stack([u[key] for u in updates]).astype(np.float64)
        assert np.all(mean[key] >= stacked.min(axis=0) - 1e-3)
        assert np.all(mean[key] <= stacked.max(axis=0) + 1e-3)
        assert mean[key].dtype == np.float32


@SETTINGS
@given(updates_and_counts, st.randoms())
def test_permutation_invariance(data, rnd):
    updates, counts = data
    order = list(range(len(updates)))
    rnd.shuffle(order)
    a = weighted_average(updates, counts)
    b = weighted_average([updates[i] for i in order], [counts[i] for i in order])
    for key in SHAPES:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-3)


@SETTINGS
@given(state_dicts(), st.lists(st.integers(1, 1000), min_size=1, max_size=5))
def test_identical_updates_give_the_same_weights(update, counts):
    mean = weighted_average([update] * len(counts), counts)
    for key in SHAPES:
        np.testing.assert_allclose(mean[key], update[key], rtol=1e-6, atol=1e-4)


@SETTINGS
@given(updates_and_counts, st.integers(2, 7))
def test_scaling_all_counts_changes_nothing(data, factor):
    updates, counts = data
    a = weighted_average(updates, counts)
    b = weighted_average(updates, [c * factor for c in counts])
    for key in SHAPES:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-6, atol=1e-4)


@SETTINGS
@given(st.integers(1, 1000), st.integers(1, 1000), finite, finite)
def test_weights_are_proportional_to_samples(n1, n2, a, b):
    """Two sites with constant models a and b: the mean is (n1·a + n2·b)/(n1+n2)."""
    ua = {"w": np.full((2,), a, np.float64)}
    ub = {"w": np.full((2,), b, np.float64)}
    mean = weighted_average([ua, ub], [n1, n2])["w"]
    np.testing.assert_allclose(mean, (n1 * a + n2 * b) / (n1 + n2), rtol=1e-9, atol=1e-9)


@SETTINGS
@given(updates_and_counts)
def test_a_site_counted_twice_equals_doubling_its_samples(data):
    updates, counts = data
    a = weighted_average([*updates, updates[0]], [*counts, counts[0]])
    b = weighted_average(updates, [2 * counts[0], *counts[1:]])
    for key in SHAPES:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-3)


def test_integer_buffers_take_the_maximum_and_keep_their_dtype():
    a = {"w": np.zeros(2, np.float32), "bn.num_batches_tracked": np.array(3, np.int64)}
    b = {"w": np.ones(2, np.float32), "bn.num_batches_tracked": np.array(7, np.int64)}
    mean = weighted_average([a, b], [1, 3])
    np.testing.assert_allclose(mean["w"], [0.75, 0.75])
    assert mean["bn.num_batches_tracked"] == 7 and mean["bn.num_batches_tracked"].dtype == np.int64


@pytest.mark.parametrize(
    ("updates", "counts", "message"),
    [
        ([], [], "at least one update"),
        ([{"w": np.zeros(2)}], [0], "positive"),
        ([{"w": np.zeros(2)}, {"w": np.zeros(3)}], [1, 1], "shape"),
        ([{"w": np.zeros(2)}, {"v": np.zeros(2)}], [1, 1], "other entries"),
        ([{"w": np.zeros(2)}, {"w": np.array([np.nan, 0])}], [1, 1], "NaN"),
        ([{"w": np.zeros(2)}], [1, 2], "sample counts"),
    ],
)
def test_bad_updates_are_refused_with_a_reason(updates, counts, message):
    with pytest.raises(ValueError, match=message):
        weighted_average(updates, counts)


@SETTINGS
@given(state_dicts(), updates_and_counts)
def test_fedavg_and_fedprox_server_steps_are_the_weighted_mean(global_state, data):
    updates, counts = data
    expected = weighted_average(updates, counts)
    for strategy in (Strategy.FEDAVG, Strategy.FEDPROX):
        new, opt = aggregate(strategy, global_state, updates, counts)
        assert opt is None
        for key in SHAPES:
            np.testing.assert_array_equal(new[key], expected[key])


@SETTINGS
@given(state_dicts(), st.sampled_from([Strategy.FEDADAM, Strategy.FEDYOGI]))
def test_adaptive_server_does_not_move_when_clients_do_not(global_state, variant):
    new, state = adaptive_server_step(
        global_state, global_state, ServerOptimizerState(), ServerOptimizerConfig(), variant
    )
    for key in SHAPES:
        np.testing.assert_allclose(new[key], global_state[key], atol=1e-6)
    assert state.step == 1


@pytest.mark.parametrize("variant", [Strategy.FEDADAM, Strategy.FEDYOGI])
def test_adaptive_server_first_step_matches_the_paper(variant):
    """Reddi et al. Alg. 2 by hand for Δ = 0.5 from v₋₁ = τ²: m = 0.05; Adam v = β2·τ² + (1-β2)Δ²,
    Yogi v = τ² - (1-β2)Δ²·sign(τ² - Δ²); x = η·m/(√v+τ)."""
    cfg = ServerOptimizerConfig(lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    x = {"w": np.zeros(3, np.float64)}
    mean = {"w": np.full(3, 0.5)}
    new, state = adaptive_server_step(x, mean, ServerOptimizerState(), cfg, variant)
    m = 0.1 * 0.5
    v = (
        0.99 * cfg.tau**2 + 0.01 * 0.25
        if variant is Strategy.FEDADAM
        else cfg.tau**2 - 0.01 * 0.25 * np.sign(cfg.tau**2 - 0.25)
    )
    np.testing.assert_allclose(state.m["w"], m)
    np.testing.assert_allclose(state.v["w"], v)
    np.testing.assert_allclose(new["w"], 0.1 * m / (math.sqrt(v) + cfg.tau))


def test_adaptive_server_state_carries_over_rounds():
    """Two rounds with the state persisted equal two rounds in one go; a fresh state gives another result."""
    cfg = ServerOptimizerConfig(lr=0.05)
    x0 = {"w": np.zeros(4)}
    c1, c2 = {"w": np.full(4, 0.3)}, {"w": np.full(4, -0.1)}
    x1, s1 = adaptive_server_step(x0, c1, ServerOptimizerState(), cfg, Strategy.FEDADAM)
    x2, s2 = adaptive_server_step(x1, {"w": x1["w"] + c2["w"]}, s1, cfg, Strategy.FEDADAM)
    x2_fresh, _ = adaptive_server_step(x1, {"w": x1["w"] + c2["w"]}, ServerOptimizerState(), cfg, Strategy.FEDADAM)
    assert s2.step == 2
    assert not np.allclose(x2["w"], x2_fresh["w"])
    # momentum keeps the model moving in the first direction despite a small opposite pseudo-gradient
    assert np.all(x2["w"] > x1["w"] - 1e-12) and np.all(x2_fresh["w"] < x1["w"])


@SETTINGS
@given(state_dicts(), updates_and_counts, st.sampled_from([Strategy.FEDADAM, Strategy.FEDYOGI]))
def test_fedbn_local_keys_take_the_plain_mean_and_get_no_moments(global_state, data, variant):
    """FedBN: a normalisation entry is the sample-weighted mean of the sites' (for the evaluated global model),
    outside the server optimiser; every other entry gets exactly the step it gets without FedBN."""
    updates, counts = data
    local = frozenset({"conv.bias"})
    cfg = ServerOptimizerConfig(lr=0.1)
    new, state = aggregate(variant, global_state, updates, counts, ServerOptimizerState(), cfg, local_keys=local)
    plain, plain_state = aggregate(variant, global_state, updates, counts, ServerOptimizerState(), cfg)
    np.testing.assert_array_equal(new["conv.bias"], weighted_average(updates, counts)["conv.bias"])
    np.testing.assert_array_equal(new["conv.weight"], plain["conv.weight"])
    assert state is not None and plain_state is not None
    assert set(state.m) == set(state.v) == {"conv.weight"} and set(plain_state.m) == set(SHAPES)


# ---------------------------------------------------------------------------------------------- privacy


@SETTINGS
@given(state_dicts(), state_dicts(), st.floats(1e-3, 1e3))
def test_clipped_update_norm_never_exceeds_the_bound(global_state, update, clip):
    clipped, original = clip_update(global_state, update, clip)
    assert math.isclose(original, update_norm(global_state, update))
    assert update_norm(global_state, clipped) <= clip * (1 + 1e-3) + 1e-3
    if original <= clip:  # small updates pass unchanged
        for key in SHAPES:
            np.testing.assert_array_equal(clipped[key], update[key])


def test_noise_is_fresh_each_call_and_calibrated():
    zeros = {"w": np.zeros(20000, np.float64)}
    a, b = add_gaussian_noise(zeros, 0.5), add_gaussian_noise(zeros, 0.5)
    assert not np.array_equal(a["w"], b["w"])  # CSPRNG-seeded: no two calls share noise
    assert abs(a["w"].std() - 0.5) < 0.02 and abs(a["w"].mean()) < 0.02
    cfg = PrivacyConfig(clip_norm=2.0, noise_multiplier=1.5, delta=1e-5)
    assert noise_std(cfg, [1, 1, 2]) == pytest.approx(1.5 * 2.0 * 0.5)


def test_privatise_without_noise_is_the_mean_of_clipped_updates():
    g = {"w": np.zeros(2)}
    updates = [{"w": np.array([3.0, 4.0])}, {"w": np.array([0.3, 0.4])}]
    mean, norms, std = privatise(g, updates, [1, 1], PrivacyConfig(clip_norm=1.0, noise_multiplier=0.0, delta=1e-5))
    assert norms == pytest.approx([5.0, 0.5]) and std == 0
    np.testing.assert_allclose(mean["w"], (np.array([0.6, 0.8]) + np.array([0.3, 0.4])) / 2)
    np.testing.assert_allclose(fedavg(g, updates, [1, 1])["w"], [1.65, 2.2])


def test_epsilon_grows_with_rounds_and_shrinks_with_noise():
    eps = [epsilon_after(r, 1.0, 1e-5) for r in (1, 2, 5, 10)]
    assert eps == sorted(eps) and eps[0] > 0
    assert epsilon_after(10, 2.0, 1e-5) < eps[-1]
    assert epsilon_after(10, 1.0, 1e-3) < eps[-1]
    assert epsilon_after(0, 1.0, 1e-5) == 0.0 and epsilon_after(3, 0.0, 1e-5) == math.inf
    # one Gaussian mechanism with z = 1 and δ = 1e-5: the RDP bound is a few ε (the analytic one ≈ 4.4)
    assert 3.0 < eps[0] < 12.0


@pytest.mark.parametrize(
    "kwargs", [{"clip_norm": 0}, {"noise_multiplier": -1}, {"delta": 0}, {"delta": 1}, {"clip_norm": math.inf}]
)
def test_bad_privacy_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        PrivacyConfig(**{"clip_norm": 1.0, "noise_multiplier": 1.0, "delta": 1e-5, **kwargs})

"""Checks of batch norm's running statistics: moving average, exact mode, and other conventions."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bnnorm.batchnorm import (batchnorm_backward_alt, batchnorm_forward, bn_param_from_keras,
                              bn_param_from_torch, merge_moments)
from bnnorm.layers import assert_rel_error


def train_steps(batches, bn_param):
    "Run a train-mode forward over each batch with unit gamma and zero beta; return bn_param."
    D = batches[0].shape[1]
    for x in batches:
        batchnorm_forward(x, np.ones(D), np.zeros(D), bn_param)
    return bn_param


def random_batches(rng, sizes, D, offset, spread, dtype=np.float64):
    "Draw one batch (n, D) per size, centred near `offset` with standard deviation near `spread`."
    centres = offset + spread * rng.standard_normal(D)
    return [(centres + spread * rng.standard_normal((n, D))).astype(dtype) for n in sizes]


# Exact mode: the running statistics are those of all batches concatenated.

@given(sizes=st.lists(st.integers(2, 64), min_size=1, max_size=20), D=st.integers(1, 4),
       offset=st.floats(-1e6, 1e6), log_spread=st.floats(-1, 1),
       dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2**32 - 1))
def test_exact_mode_equals_concatenated_statistics(sizes, D, offset, log_spread, dtype, seed):
    batches = random_batches(np.random.default_rng(seed), sizes, D, offset, 10.0**log_spread, dtype)
    bn_param = train_steps(batches, {"mode": "train", "momentum": None})

    everything = np.concatenate(batches).astype(np.float64)
    bound = 1e-12 if dtype == np.float64 else 1e-5
    assert bn_param["running_count"] == sum(sizes)
    assert_rel_error(bn_param["running_mean"], everything.mean(axis=0), bound, "running_mean")
    assert_rel_error(bn_param["running_var"], everything.var(axis=0), bound, "running_var")


@given(sizes=st.lists(st.integers(2, 64), min_size=1, max_size=20), seed=st.integers(0, 2**32 - 1))
def test_exact_mode_unbiased_stores_sample_variance(sizes, seed):
    batches = random_batches(np.random.default_rng(seed), sizes, 3, 1e3, 2.0)
    bn_param = train_steps(batches, {"mode": "train", "momentum": None, "unbiased": True})
    everything = np.concatenate(batches)
    assert_rel_error(bn_param["running_mean"], everything.mean(axis=0), 1e-12, "running_mean")
    assert_rel_error(bn_param["running_var"], everything.var(axis=0, ddof=1), 1e-12, "running_var")


def test_exact_mode_restarts_from_count_zero():
    rng = np.random.default_rng(0)
    first, second = random_batches(rng, [10, 20], 2, 5.0, 1.0)
    bn_param = train_steps([first], {"mode": "train", "momentum": None})
    bn_param["running_count"] = 0
    train_steps([second], bn_param)
    assert bn_param["running_count"] == 20
    assert_rel_error(bn_param["running_mean"], second.mean(axis=0), 1e-14, "running_mean")
    assert_rel_error(bn_param["running_var"], second.var(axis=0), 1e-14, "running_var")


def test_exact_mode_test_forward_uses_exact_statistics():
    rng = np.random.default_rng(1)
    batches = random_batches(rng, [5, 9, 30], 3, 2.0, 3.0)
    bn_param = train_steps(batches, {"mode": "train", "momentum": None})
    everything = np.concatenate(batches)
    bn_param["mode"] = "test"
    x = rng.standard_normal((4, 3))
    out, _ = batchnorm_forward(x, np.ones(3), np.zeros(3), bn_param)
    expected = (x - everything.mean(axis=0)) / np.sqrt(everything.var(axis=0) + 1e-5)
    assert_rel_error(out, expected, 1e-12, "test-mode output")


@pytest.mark.parametrize("momentum", [0.9, None])
def test_test_mode_leaves_running_statistics_unchanged(momentum):
    rng = np.random.default_rng(2)
    bn_param = train_steps(random_batches(rng, [8], 3, 0.0, 1.0), {"mode": "train",
                                                                   "momentum": momentum})
    before = {key: np.copy(value) for key, value in bn_param.items()}
    bn_param["mode"] = "test"
    batchnorm_forward(rng.standard_normal((6, 3)), np.ones(3), np.zeros(3), bn_param)
    for key, value in before.items():
        if key != "mode":
            np.testing.assert_array_equal(bn_param[key], value, err_msg=key)


# merge_moments on its own.

@given(a=st.lists(st.floats(-1e3, 1e3), min_size=0, max_size=30),
       b=st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=30))
def test_merge_moments_matches_pooled_statistics(a, b):
    a, b = np.array(a, dtype=np.float64), np.array(b, dtype=np.float64)
    mean_a = a.mean() if len(a) else 0.0
    m2_a = np.sum((a - mean_a) ** 2)
    count, mean, m2 = merge_moments(len(a), mean_a, m2_a, len(b), b.mean(),
                                    np.sum((b - b.mean()) ** 2))
    pooled = np.concatenate([a, b])
    assert count == len(pooled)
    np.testing.assert_allclose(mean, pooled.mean(), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(m2 / count, pooled.var(), rtol=1e-9, atol=1e-9)


def test_merge_moments_worked_example():
    count, mean, m2 = merge_moments(2, 1.5, 0.5, 4, 4.5, 5.0)
    assert count == 6
    assert mean == 3.5
    np.testing.assert_allclose(m2 / count, 2.9166666666666665, rtol=1e-15)


@pytest.mark.parametrize("counts, pattern", [((-1, 2), "count_a is -1"),
                                             ((2, 1.5), "count_b is 1.5"), ((0, 0), "both 0"),
                                             ((True, 2), "count_a is True.*not a bool"),
                                             ((2, False), "count_b is False.*not a bool")])
def test_merge_moments_rejects_bad_counts(counts, pattern):
    with pytest.raises(ValueError, match=pattern):
        merge_moments(counts[0], 0.0, 0.0, counts[1], 0.0, 0.0)


# Moving average: closed form, PyTorch's rule, the unbiased worked example.

@given(momentum=st.floats(0, 0.999), sizes=st.lists(st.integers(2, 40), min_size=1, max_size=15),
       unbiased=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_moving_average_matches_closed_form(momentum, sizes, unbiased, seed):
    batches = random_batches(np.random.default_rng(seed), sizes, 3, 4.0, 2.0)
    bn_param = train_steps(batches, {"mode": "train", "momentum": momentum, "unbiased": unbiased})

    k = len(batches)
    weights = (1 - momentum) * momentum ** (k - 1 - np.arange(k))
    means = np.array([x.mean(axis=0) for x in batches])
    variances = np.array([x.var(axis=0, ddof=int(unbiased)) for x in batches])
    np.testing.assert_allclose(bn_param["running_mean"], weights @ means, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(bn_param["running_var"], momentum**k + weights @ variances,
                               rtol=1e-12, atol=1e-14)


def torch_reference_update(running_mean, running_var, x, momentum):
    "Update running statistics by the BatchNorm1d rule PyTorch documents (momentum: new weight)."
    N = x.shape[0]
    running_mean = (1 - momentum) * running_mean + momentum * x.mean(axis=0)
    running_var = (1 - momentum) * running_var + momentum * x.var(axis=0) * N / (N - 1)
    return running_mean, running_var


@given(momentum=st.floats(0.01, 1.0), sizes=st.lists(st.integers(2, 40), min_size=1, max_size=15),
       seed=st.integers(0, 2**32 - 1))
def test_torch_conversion_matches_documented_rule(momentum, sizes, seed):
    batches = random_batches(np.random.default_rng(seed), sizes, 3, -2.0, 3.0)
    bn_param = bn_param_from_torch(momentum=momentum)
    running_mean, running_var = np.zeros(3), np.ones(3)
    for x in batches:
        train_steps([x], bn_param)
        running_mean, running_var = torch_reference_update(running_mean, running_var, x, momentum)
        np.testing.assert_allclose(bn_param["running_mean"], running_mean, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(bn_param["running_var"], running_var, rtol=1e-12)


def test_torch_batchnorm1d_step_for_step():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    layer = torch.nn.BatchNorm1d(4, momentum=0.1, dtype=torch.float64)
    layer.train()
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(rng.standard_normal(4)))
        layer.bias.copy_(torch.from_numpy(rng.standard_normal(4)))
    gamma, beta = layer.weight.detach().numpy().copy(), layer.bias.detach().numpy().copy()
    bn_param = bn_param_from_torch(momentum=0.1, eps=layer.eps)

    for x in random_batches(rng, [2, 17, 64, 5], 4, 3.0, 2.0):
        x_torch = torch.from_numpy(x).requires_grad_(True)
        out_torch = layer(x_torch)
        dout = rng.standard_normal(x.shape)
        out_torch.backward(torch.from_numpy(dout))
        out, cache = batchnorm_forward(x, gamma, beta, bn_param)
        dx, dgamma, dbeta = batchnorm_backward_alt(dout, cache)

        assert_rel_error(out, out_torch.detach().numpy(), 1e-10, "out")
        assert_rel_error(dx, x_torch.grad.numpy(), 1e-8, "dx")
        assert_rel_error(dgamma, layer.weight.grad.numpy(), 1e-10, "dgamma")
        assert_rel_error(dbeta, layer.bias.grad.numpy(), 1e-10, "dbeta")
        assert_rel_error(bn_param["running_mean"], layer.running_mean.numpy(), 1e-12, "mean")
        assert_rel_error(bn_param["running_var"], layer.running_var.numpy(), 1e-12, "var")
        layer.zero_grad()


# Running statistics that torch 2.13.0+cpu's BatchNorm1d(3, momentum=0.1, dtype=torch.float64)
# stored in train mode after each of these three batches, starting from zeros and ones.
TORCH_BATCHES = [
    [[4.99, 7.09, 6.48], [6.45, 8.24, 2.59], [3.75, 2.36, 4.78], [7.0, 4.96, 5.99]],
    [[1.18, 5.29, 3.19], [8.55, 6.77, 6.9], [4.88, 6.23, 6.32], [4.31, 4.01, 4.77],
     [3.79, 3.81, 4.43], [3.54, 6.53, 1.81]],
    [[6.65, 3.75, 3.91], [2.3, 4.71, 4.5], [5.38, 3.93, 5.19], [8.64, 5.82, 3.85],
     [6.91, 4.74, 6.19]],
]
TORCH_RUNNING_MEANS = [
    [0.5547500000000001, 0.56625, 0.496],
    [0.9367750000000001, 1.053625, 0.9034000000000001],
    [1.4406975000000002, 1.4072625, 1.28586],
]
TORCH_RUNNING_VARS = [
    [1.1155358333333334, 1.5693758333333334, 1.200686666666667],
    [1.5827292500000003, 1.57854625, 1.4420780000000004],
    [1.9817493250000005, 1.487966625, 1.3939422000000006],
]


def test_torch_batchnorm1d_recorded_values():
    bn_param = bn_param_from_torch(momentum=0.1)
    for step, batch in enumerate(TORCH_BATCHES):
        train_steps([np.array(batch)], bn_param)
        assert_rel_error(bn_param["running_mean"], np.array(TORCH_RUNNING_MEANS[step]), 1e-14,
                         f"running_mean after batch {step + 1}")
        assert_rel_error(bn_param["running_var"], np.array(TORCH_RUNNING_VARS[step]), 1e-14,
                         f"running_var after batch {step + 1}")


def test_unbiased_worked_example():
    x = np.array([-2.0] * 5 + [2.0] * 5 + [0.0] * 6).reshape(16, 1)
    assert x.var() == 2.5
    np.testing.assert_allclose(x.var(ddof=1), 2.6667, atol=1e-4)
    bn_param = train_steps([x], bn_param_from_torch(momentum=0.1))
    np.testing.assert_allclose(bn_param["running_var"], [1.1667], atol=1e-4)
    np.testing.assert_allclose(bn_param["running_var"], [7 / 6], rtol=1e-15)


def test_keras_conversion():
    assert bn_param_from_keras() == {"mode": "train", "momentum": 0.99, "eps": 1e-3,
                                     "unbiased": False}
    bn_param = train_steps([np.array([[1.0], [3.0]])], bn_param_from_keras(momentum=0.5))
    np.testing.assert_allclose(bn_param["running_mean"], [1.0], rtol=1e-15)
    np.testing.assert_allclose(bn_param["running_var"], [1.0], rtol=1e-15)


@pytest.mark.parametrize("momentum, pattern", [(None, "equal weights"), (0, r"\(0, 1\]"),
                                               (1.5, r"\(0, 1\]"), ("0.1", r"\(0, 1\]")])
def test_torch_conversion_rejects_bad_momentum(momentum, pattern):
    with pytest.raises(ValueError, match=pattern):
        bn_param_from_torch(momentum=momentum)


@pytest.mark.parametrize("momentum", [None, 1.0, -0.5])
def test_keras_conversion_rejects_bad_momentum(momentum):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        bn_param_from_keras(momentum=momentum)


# Bad momentum and switching between the two kinds of statistics.

@pytest.mark.parametrize("momentum", [1.0, -0.1, 1.5, np.nan, np.inf, True, "0.9", [0.9]])
def test_forward_rejects_bad_momentum(momentum):
    with pytest.raises(ValueError, match=r"bn_param\['momentum'\] is .*but a number in "
                                         r"\[0, 1\).*or None"):
        batchnorm_forward(np.ones((3, 2)), np.ones(2), np.zeros(2),
                          {"mode": "train", "momentum": momentum})


@pytest.mark.parametrize("momentum", [0.0, 0.5, np.float32(0.9), 0])
def test_forward_accepts_momentum_in_range(momentum):
    bn_param = {"mode": "train", "momentum": momentum}
    batchnorm_forward(np.array([[1.0], [3.0]]), np.ones(1), np.zeros(1), bn_param)
    expected_mean = float(momentum) * 0.0 + (1 - float(momentum)) * 2.0
    np.testing.assert_allclose(bn_param["running_mean"], [expected_mean], rtol=1e-7)


@pytest.mark.parametrize("count", [-1, 2.0, True, "3"])
def test_forward_rejects_bad_running_count(count):
    with pytest.raises(ValueError, match=r"bn_param\['running_count'\] is .*non-negative integer"):
        batchnorm_forward(np.ones((3, 2)), np.ones(2), np.zeros(2),
                          {"mode": "train", "momentum": None, "running_count": count})


def test_switch_from_exact_to_moving_average_is_rejected():
    x = np.random.default_rng(4).standard_normal((10, 2))
    bn_param = train_steps([x], {"mode": "train", "momentum": None})
    bn_param["momentum"] = 0.9
    with pytest.raises(ValueError, match=r"has 'running_count' and 'running_mean_compensation'.*"
                                         r"Delete these keys"):
        train_steps([x], bn_param)


def test_switch_to_average_after_deleting_keys():
    rng = np.random.default_rng(5)
    first, second = rng.standard_normal((10, 2)), rng.standard_normal((6, 2))
    bn_param = train_steps([first], {"mode": "train", "momentum": None})
    del bn_param["running_count"], bn_param["running_mean_compensation"]
    bn_param["momentum"] = 0.9
    train_steps([second], bn_param)
    expected = 0.9 * first.mean(axis=0) + 0.1 * second.mean(axis=0)
    np.testing.assert_allclose(bn_param["running_mean"], expected, rtol=1e-13)


def test_switch_from_moving_average_to_exact_is_rejected():
    x = np.random.default_rng(6).standard_normal((10, 2))
    bn_param = train_steps([x], {"mode": "train"})
    bn_param["momentum"] = None
    with pytest.raises(ValueError, match=r"without 'running_count'.*running_count'\] = 0"):
        train_steps([x], bn_param)


def test_exact_mode_rejects_stats_without_count():
    with pytest.raises(ValueError, match="without 'running_count'"):
        train_steps([np.ones((3, 2))], {"mode": "train", "momentum": None,
                                        "running_mean": np.zeros(2)})


def test_float32_input_keeps_float64_running_statistics():
    x = np.random.default_rng(7).standard_normal((8, 3)).astype(np.float32)
    for momentum in (0.9, None):
        bn_param = train_steps([x], {"mode": "train", "momentum": momentum})
        assert bn_param["running_mean"].dtype == np.float64
        assert bn_param["running_var"].dtype == np.float64

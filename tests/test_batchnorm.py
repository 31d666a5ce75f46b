"""Error messages, dtype rules and property-based checks for the batch-norm forward and backward."""
import importlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import bnnorm
from bnnorm.batchnorm import (BatchNormCache, batchnorm_backward, batchnorm_backward_alt,
                              batchnorm_forward)
from bnnorm.layers import assert_rel_error, numerical_gradient_array

FLOAT_DTYPES = st.sampled_from([np.float32, np.float64])


def forward_train(x, D=None, **settings):
    "Run a train-mode forward with unit gamma and zero beta; return out and the cache."
    D = np.shape(x)[-1] if D is None else D
    return batchnorm_forward(x, np.ones(D), np.zeros(D), {"mode": "train", **settings})


def reference_forward(x, gamma, beta, eps=1e-5):
    "Batch norm in float64 from the textbook formula, centring on values without their offset."
    x64 = x.astype(np.float64)
    shift = x64[0]
    mean = shift + np.mean(x64 - shift, axis=0)
    var = np.mean((x64 - mean) ** 2, axis=0)
    return gamma * (x64 - mean) / np.sqrt(var + eps) + beta


def test_installed_package_imports():
    module = importlib.import_module("bnnorm.batchnorm")
    assert Path(module.__file__).parent == Path(bnnorm.__file__).parent
    for name in ("batchnorm_forward", "batchnorm_backward", "batchnorm_backward_alt",
                 "merge_moments", "bn_param_from_torch", "bn_param_from_keras"):
        assert callable(getattr(module, name)), name


# Bad input raises with the value, the expected shape or range, and what to do.

@pytest.mark.parametrize("mode", ["eval", "Train", "", None, 0])
def test_forward_rejects_bad_mode(mode):
    with pytest.raises(ValueError,
                       match=r"bn_param\['mode'\] is .*, but 'train' or 'test' is expected"):
        batchnorm_forward(np.ones((3, 2)), np.ones(2), np.zeros(2), {"mode": mode})


def test_forward_rejects_missing_mode():
    with pytest.raises(ValueError, match=r"bn_param\['mode'\] is missing.*'train' or 'test'"):
        batchnorm_forward(np.ones((3, 2)), np.ones(2), np.zeros(2), {})


@pytest.mark.parametrize("gamma_shape, beta_shape", [((3,), (2,)), ((2,), (3,)), ((1, 2), (2,)),
                                                     ((), (2,)), ((2,), (2, 1))])
def test_forward_rejects_parameter_shapes(gamma_shape, beta_shape):
    gamma, beta = np.ones(gamma_shape), np.zeros(beta_shape)
    pattern = (rf"gamma has shape {re_shape(gamma_shape)} and beta has shape "
               rf"{re_shape(beta_shape)}, but both must have shape \(2,\).*Pass one scale and "
               r"one shift per column of x\.")
    with pytest.raises(ValueError, match=pattern):
        batchnorm_forward(np.ones((4, 2)), gamma, beta, {"mode": "train"})


def re_shape(shape):
    "Escape a shape tuple for use in a regular expression."
    return str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")


@pytest.mark.parametrize("shape", [(4,), (4, 2, 3), (), (2, 2, 2, 2)])
@pytest.mark.parametrize("mode", ["train", "test"])
def test_forward_rejects_x_not_2d(shape, mode):
    with pytest.raises(ValueError,
                       match=rf"x has shape {re_shape(shape)}, but .*2-D array \(N, D\)"):
        batchnorm_forward(np.ones(shape), np.ones(2), np.zeros(2), {"mode": mode})


def test_forward_rejects_single_sample_in_train_mode():
    with pytest.raises(ValueError, match=r"x has shape \(1, 3\).*at least 2 samples.*zero batch "
                                         r"variance"):
        forward_train(np.ones((1, 3)))


def test_single_sample_allowed_in_test_mode():
    out, _ = batchnorm_forward(np.full((1, 3), 2.0), np.ones(3), np.zeros(3), {"mode": "test"})
    np.testing.assert_allclose(out, np.full((1, 3), 2.0 / np.sqrt(1 + 1e-5)), rtol=1e-15)


@pytest.mark.parametrize("value", [-np.ones(3), np.array([1.0, np.nan, 1.0]),
                                   np.array([1.0, 1.0, np.inf]), np.array([0.5, -1e-12, 2.0])])
@pytest.mark.parametrize("mode", ["train", "test"])
def test_forward_rejects_bad_running_var(value, mode):
    with pytest.raises(ValueError, match=r"bn_param\['running_var'\] contains"):
        forward_param = {"mode": mode, "running_var": value}
        batchnorm_forward(np.ones((4, 3)), np.ones(3), np.zeros(3), forward_param)


@pytest.mark.parametrize("key", ["running_mean", "running_var"])
def test_forward_rejects_running_stat_shape(key):
    with pytest.raises(ValueError,
                       match=rf"bn_param\['{key}'\] has shape \(4,\), but \(3,\) is expected"):
        bn_param = {"mode": "test", key: np.ones(4)}
        batchnorm_forward(np.ones((4, 3)), np.ones(3), np.zeros(3), bn_param)


def test_forward_rejects_nan_running_mean():
    with pytest.raises(ValueError, match=r"bn_param\['running_mean'\] contains NaN"):
        bn_param = {"mode": "test", "running_mean": np.array([0.0, np.nan, 0.0])}
        batchnorm_forward(np.ones((4, 3)), np.ones(3), np.zeros(3), bn_param)


@pytest.mark.parametrize("eps", [0, -1e-5, np.nan, np.inf, "1e-5", True, None])
def test_forward_rejects_bad_eps(eps):
    with pytest.raises(ValueError, match=r"bn_param\['eps'\] is .*positive finite number"):
        forward_train(np.ones((3, 2)), eps=eps)


@pytest.mark.parametrize("unbiased", [1, 0, "yes", None])
def test_forward_rejects_bad_unbiased(unbiased):
    with pytest.raises(ValueError, match=r"bn_param\['unbiased'\] is .*True or False"):
        forward_train(np.ones((3, 2)), unbiased=unbiased)


def test_forward_rejects_unknown_key():
    with pytest.raises(ValueError, match=r"unknown keys 'momentun', but the known keys are mode, "):
        forward_train(np.ones((3, 2)), momentun=0.9)


def test_forward_rejects_non_dict_bn_param():
    with pytest.raises(TypeError, match="bn_param is a list, but a dict"):
        batchnorm_forward(np.ones((3, 2)), np.ones(2), np.zeros(2), ["train"])


@pytest.mark.parametrize("x", [np.array([["a", "b"], ["c", "d"]]), np.ones((3, 2)) * 1j])
def test_forward_rejects_non_real_x(x):
    with pytest.raises(TypeError, match="x has dtype .*but a floating, integer or boolean array is "
                                        "expected. Convert it to real numbers first"):
        forward_train(x)


@pytest.mark.parametrize("bad", [{"momentum": 1.5}, {"running_var": -np.ones(2)},
                                 {"momentum": None, "running_mean": np.zeros(2)}])
def test_rejected_bn_param_is_left_unchanged(bad):
    bn_param = {"mode": "train", **bad}
    with pytest.raises(ValueError):
        batchnorm_forward(np.ones((3, 2)), np.ones(2), np.zeros(2), bn_param)
    assert sorted(bn_param) == sorted(["mode", *bad])


def test_single_sample_rejection_leaves_bn_param_unchanged():
    for bn_param in ({"mode": "train"}, {"mode": "train", "momentum": None}):
        before = dict(bn_param)
        with pytest.raises(ValueError, match="at least 2 samples"):
            batchnorm_forward(np.ones((1, 3)), np.ones(3), np.zeros(3), bn_param)
        assert bn_param == before


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("shape", [(5, 4), (600, 500)])
def test_train_rejects_non_finite_x(bad_value, shape):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape)
    x[2, 1] = x[0, 3] = bad_value
    running_mean, running_var = np.full(shape[1], 0.5), np.full(shape[1], 2.0)
    bn_param = {"mode": "train", "running_mean": running_mean.copy(),
                "running_var": running_var.copy()}
    with pytest.raises(ValueError, match=rf"x has NaN or infinite values.* in 2 of {shape[1]} "
                                         r"columns \(columns 1, 3\)"):
        forward_train(x, **{k: v for k, v in bn_param.items() if k != "mode"})
    with pytest.raises(ValueError, match="bn_param was left unchanged"):
        batchnorm_forward(x, np.ones(shape[1]), np.zeros(shape[1]), bn_param)
    assert sorted(bn_param) == ["mode", "running_mean", "running_var"]
    np.testing.assert_array_equal(bn_param["running_mean"], running_mean)
    np.testing.assert_array_equal(bn_param["running_var"], running_var)


def test_train_rejects_overflowing_variance():
    x = np.array([[1e30, 0.0], [-1e30, 1.0]], np.float32)
    bn_param = {"mode": "train"}
    with pytest.raises(ValueError, match=r"in 1 of 2 columns \(columns 0\)"):
        batchnorm_forward(x, np.ones(2), np.zeros(2), bn_param)
    assert bn_param == {"mode": "train"}


def test_train_accepts_overflowing_mean_var_product():
    # mu @ var overflows to infinity although every mean and variance is finite, so the forward
    # pass must scan the columns rather than reject the batch.
    x = 1e160 + 1e152 * np.arange(4.0).reshape(4, 1)
    bn_param = {"mode": "train"}
    out, cache = batchnorm_forward(x, np.ones(1), np.zeros(1), bn_param)
    assert 1e160 * float(cache.std[0]) ** 2 == float("inf")  # Python floats overflow silently
    np.testing.assert_allclose(out, reference_forward(x, np.ones(1), np.zeros(1)), rtol=1e-12)
    assert np.isfinite(bn_param["running_var"]).all()


def test_default_running_var_is_fresh_and_checked():
    first, second = {"mode": "test"}, {"mode": "test"}
    for bn_param in (first, second):
        batchnorm_forward(np.ones((2, 3)), np.ones(3), np.zeros(3), bn_param)
    assert first["running_var"] is not second["running_var"]
    first["running_var"][0] = 4.0
    np.testing.assert_array_equal(second["running_var"], np.ones(3))
    first["running_var"][1] = -1.0
    with pytest.raises(ValueError, match=r"bn_param\['running_var'\] contains negative entries"):
        batchnorm_forward(np.ones((2, 3)), np.ones(3), np.zeros(3), first)


def test_test_mode_passes_non_finite_x_through():
    out, _ = batchnorm_forward(np.array([[np.nan, 1.0]]), np.ones(2), np.zeros(2), {"mode": "test"})
    assert np.isnan(out[0, 0])
    assert out[0, 1] == pytest.approx(1 / np.sqrt(1 + 1e-5))


@pytest.mark.parametrize("backward", [batchnorm_backward, batchnorm_backward_alt])
def test_backward_rejects_dout_shape(backward):
    _, cache = forward_train(np.random.default_rng(0).standard_normal((4, 3)))
    with pytest.raises(ValueError, match=r"dout has shape \(3, 4\), but \(4, 3\) is expected"):
        backward(np.ones((3, 4)), cache)


# dtype rules: integers and booleans are computed in float64, float32 stays float32.

@pytest.mark.parametrize("x", [np.arange(12).reshape(4, 3), np.array([[True, False]] * 2 +
                                                                     [[False, True]] * 2)])
@pytest.mark.parametrize("mode", ["train", "test"])
def test_integer_and_bool_x_give_float64(x, mode):
    D = x.shape[1]
    out, cache = batchnorm_forward(x, np.ones(D, np.float32), np.zeros(D, np.int64), {"mode": mode})
    assert out.dtype == np.float64
    dx, dgamma, dbeta = batchnorm_backward_alt(np.ones(x.shape, np.int64), cache)
    assert (dx.dtype, dgamma.dtype, dbeta.dtype) == (np.float64,) * 3


@pytest.mark.parametrize("mode", ["train", "test"])
def test_float32_stays_float32(mode):
    x = np.random.default_rng(1).standard_normal((5, 3)).astype(np.float32)
    out, cache = batchnorm_forward(x, np.ones(3), np.zeros(3), {"mode": mode})
    assert out.dtype == np.float32
    assert cache.xmu.dtype == cache.gamma.dtype == cache.std.dtype == np.float32
    for backward in (batchnorm_backward, batchnorm_backward_alt):
        grads = backward(np.ones((5, 3), np.float32), cache)
        assert [g.dtype for g in grads] == [np.float32] * 3, backward.__name__


@pytest.mark.parametrize("x_dtype, dout_dtype", [(np.float64, np.float32),
                                                  (np.float32, np.float64)])
@pytest.mark.parametrize("shape", [(4, 3), (600, 500)])
@pytest.mark.parametrize("mode", ["train", "test"])
def test_backward_mixed_dtypes_give_common_dtype(x_dtype, dout_dtype, shape, mode):
    # (600, 500) in float64 is larger than one block, so the blocked collapsed dx runs too.
    rng = np.random.default_rng(5)
    x = (3 * rng.standard_normal(shape) + 2).astype(x_dtype)
    dout = rng.standard_normal(shape).astype(dout_dtype)
    bn_param = {"mode": mode, "running_mean": np.full(shape[1], 1.5),
                "running_var": np.ones(shape[1])}
    _, cache = batchnorm_forward(x, np.ones(shape[1]), np.zeros(shape[1]), bn_param)
    _, cache64 = batchnorm_forward(x.astype(np.float64), np.ones(shape[1]), np.zeros(shape[1]),
                                   dict(bn_param))
    for backward in (batchnorm_backward, batchnorm_backward_alt):
        grads = backward(dout, cache)
        assert [g.dtype for g in grads] == [np.float64] * 3, backward.__name__
        expected = backward(dout.astype(np.float64), cache64)
        bound = 1e-12 if x_dtype == np.float64 else 1e-3
        for name, grad, grad64 in zip(("dx", "dgamma", "dbeta"), grads, expected):
            scale = np.abs(grad64).max()
            assert np.abs(grad - grad64).max() <= bound * scale, (backward.__name__, name)


def test_forward_does_not_modify_inputs():
    rng = np.random.default_rng(2)
    x, gamma, beta = rng.standard_normal((6, 4)), rng.standard_normal(4), rng.standard_normal(4)
    copies = x.copy(), gamma.copy(), beta.copy()
    out, cache = batchnorm_forward(x, gamma, beta, {"mode": "train"})
    batchnorm_backward_alt(np.ones_like(out), cache)
    for original, copy in zip((x, gamma, beta), copies):
        np.testing.assert_array_equal(original, copy)


def test_constant_feature_output_and_gradients():
    x = np.column_stack([np.full(5, 3.0), np.arange(5.0)])
    gamma, beta = np.array([2.0, 1.0]), np.array([-1.0, 0.5])
    out, cache = batchnorm_forward(x, gamma, beta, {"mode": "train"})
    np.testing.assert_array_equal(out[:, 0], np.full(5, -1.0))
    dout = np.random.default_rng(3).standard_normal((5, 2))
    for backward in (batchnorm_backward, batchnorm_backward_alt):
        dx, dgamma, dbeta = backward(dout, cache)
        assert np.all(np.isfinite(dx)), backward.__name__
        np.testing.assert_allclose(dx[:, 0], 2.0 / np.sqrt(1e-5) * (dout[:, 0] - dout[:, 0].mean()),
                                   rtol=1e-9)


def test_cache_fields():
    x = np.array([[1.0, 4.0], [3.0, 8.0]])
    bn_param = {"mode": "train", "eps": 0.5}
    _, cache = batchnorm_forward(x, np.array([2.0, 3.0]), np.zeros(2), bn_param)
    assert isinstance(cache, BatchNormCache)
    np.testing.assert_array_equal(cache.xmu, [[-1.0, -2.0], [1.0, 2.0]])
    np.testing.assert_array_equal(cache.gamma, [2.0, 3.0])
    np.testing.assert_allclose(cache.std, np.sqrt([1.5, 4.5]), rtol=1e-15)
    assert cache.mode == "train"


# Gradient checks at fixed small shapes, in float64.

@pytest.mark.parametrize("mode", ["train", "test"])
@pytest.mark.parametrize("backward", [batchnorm_backward, batchnorm_backward_alt])
def test_backward_matches_numerical_gradient(backward, mode):
    rng = np.random.default_rng(231)
    N, D = 4, 5
    x = 5 * rng.standard_normal((N, D)) + 12
    gamma, beta, dout = rng.standard_normal(D), rng.standard_normal(D), rng.standard_normal((N, D))
    bn_param = {"mode": mode, "running_mean": np.full(D, 11.0), "running_var": np.full(D, 30.0)}

    def forward(x_, gamma_, beta_):
        return batchnorm_forward(x_, gamma_, beta_, dict(bn_param))[0]

    dx, dgamma, dbeta = backward(dout, batchnorm_forward(x, gamma, beta, dict(bn_param))[1])
    assert_rel_error(dx, numerical_gradient_array(lambda v: forward(v, gamma, beta), x, dout),
                     1e-8, "dx")
    assert_rel_error(dgamma, numerical_gradient_array(lambda v: forward(x, v, beta), gamma, dout),
                     1e-8, "dgamma")
    assert_rel_error(dbeta, numerical_gradient_array(lambda v: forward(x, gamma, v), beta, dout),
                     1e-8, "dbeta")


def test_numerical_check_rejects_dgamma_over_n():
    rng = np.random.default_rng(231)
    x, gamma = 5 * rng.standard_normal((4, 5)) + 12, rng.standard_normal(5)
    beta, dout = rng.standard_normal(5), rng.standard_normal((4, 5))
    dgamma_num = numerical_gradient_array(
        lambda g: batchnorm_forward(x, g, beta, {"mode": "train"})[0], gamma, dout)
    _, dgamma, _ = batchnorm_backward(dout, batchnorm_forward(x, gamma, beta, {"mode": "train"})[1])
    with pytest.raises(AssertionError, match="dgamma / N: relative error"):
        assert_rel_error(dgamma / 4, dgamma_num, 1e-8, "dgamma / N")


# Properties on random shapes and both float dtypes.

def random_batch(rng, dtype, N, D):
    "Draw x (N, D) with a random offset and spread, gamma, beta and dout of the given dtype."
    offset = rng.uniform(-10, 10, size=D)
    spread = np.exp(rng.uniform(0, np.log(10), size=D))
    x = (offset + spread * rng.standard_normal((N, D))).astype(dtype)
    gamma = rng.uniform(0.5, 2, size=D) * rng.choice([-1, 1], size=D)
    return x, gamma.astype(dtype), rng.standard_normal(D).astype(dtype), \
        rng.standard_normal((N, D)).astype(dtype)


@given(dtype=FLOAT_DTYPES, N=st.integers(2, 64), D=st.integers(1, 64),
       seed=st.integers(0, 2**32 - 1))
def test_forward_matches_reference(dtype, N, D, seed):
    rng = np.random.default_rng(seed)
    x, gamma, beta, _ = random_batch(rng, dtype, N, D)
    out, _ = batchnorm_forward(x, gamma, beta, {"mode": "train"})
    assert out.dtype == dtype
    assert out.shape == (N, D)
    tolerance = 1e-4 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(out, reference_forward(x, gamma, beta), rtol=tolerance,
                               atol=tolerance * 10)
    np.testing.assert_allclose(out.mean(axis=0), beta, rtol=0, atol=tolerance * 10)


@given(dtype=FLOAT_DTYPES, N=st.integers(2, 64), D=st.integers(1, 64),
       seed=st.integers(0, 2**32 - 1), mode=st.sampled_from(["train", "test"]))
def test_backward_versions_agree(dtype, N, D, seed, mode):
    rng = np.random.default_rng(seed)
    x, gamma, beta, dout = random_batch(rng, dtype, N, D)
    bn_param = {"mode": mode, "running_mean": x.mean(axis=0) + 1, "running_var": x.var(axis=0) + 1}
    _, cache = batchnorm_forward(x, gamma, beta, bn_param)
    staged, collapsed = batchnorm_backward(dout, cache), batchnorm_backward_alt(dout, cache)

    # dx can cancel to far below the size of its terms (at N = 2 it comes only from eps), so the
    # tolerance is relative to the size of the terms, not of the result.
    xhat = cache.xmu / cache.std
    dout_max = np.abs(dout).max()
    scales = {"dx": np.abs(cache.gamma / cache.std).max() * dout_max * 3,
              "dgamma": N * dout_max * np.abs(xhat).max(), "dbeta": N * dout_max}
    bound = 1e-4 if dtype == np.float32 else 1e-12
    for name, a, b in zip(("dx", "dgamma", "dbeta"), staged, collapsed):
        assert a.dtype == b.dtype == dtype, name
        np.testing.assert_allclose(a, b, rtol=0, atol=bound * scales[name], err_msg=name)


@given(N=st.integers(2, 64), D=st.integers(1, 64), seed=st.integers(0, 2**32 - 1),
       mode=st.sampled_from(["train", "test"]))
def test_backward_matches_directional_derivative(N, D, seed, mode):
    rng = np.random.default_rng(seed)
    x, gamma, beta, dout = random_batch(rng, np.float64, N, D)
    bn_param = {"mode": mode, "running_mean": x.mean(axis=0) + 1, "running_var": x.var(axis=0) + 1}
    _, cache = batchnorm_forward(x, gamma, beta, dict(bn_param))
    dx, dgamma, dbeta = batchnorm_backward_alt(dout, cache)

    vx, vgamma, vbeta = rng.standard_normal(x.shape), rng.standard_normal(D), rng.standard_normal(D)
    h = 1e-6

    def loss(t):
        out, _ = batchnorm_forward(x + t * vx, gamma + t * vgamma, beta + t * vbeta,
                                   dict(bn_param))
        return np.sum(out * dout)

    numerical = (loss(h) - loss(-h)) / (2 * h)
    analytic = np.sum(dx * vx) + np.sum(dgamma * vgamma) + np.sum(dbeta * vbeta)
    scale = np.abs(dx * vx).sum() + np.abs(dgamma * vgamma).sum() + np.abs(dbeta * vbeta).sum()
    assert abs(numerical - analytic) <= 1e-6 * scale, (numerical, analytic, scale)


@given(N=st.integers(2, 4096), D=st.sampled_from([1, 3, 256]), offset=st.floats(-1e6, 1e6),
       log_spread=st.floats(-1, 1), seed=st.integers(0, 2**32 - 1))
@example(N=4096, D=3, offset=1e6, log_spread=0.0, seed=0)
def test_float32_output_statistics_at_large_offsets(N, D, offset, log_spread, seed):
    # The output is compared with the float64 statistics of the same float32 input. Centring on
    # the first row keeps the mean error near float32 rounding of the spread, not of the offset.
    rng = np.random.default_rng(seed)
    x = (offset + 10.0**log_spread * rng.standard_normal((N, D))).astype(np.float32)
    out, _ = forward_train(x)
    assert out.dtype == np.float32

    x64, out64 = x.astype(np.float64), out.astype(np.float64)
    std = np.sqrt(np.var(x64 - x64[0], axis=0))
    expected_std = std / np.sqrt(std**2 + 1e-5)
    nonconstant = std > 0
    assert np.abs(out64.mean(axis=0)).max() <= 1e-5
    np.testing.assert_allclose(out64.std(axis=0)[nonconstant], expected_std[nonconstant],
                               rtol=1e-4, atol=0)

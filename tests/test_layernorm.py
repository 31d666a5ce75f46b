"""Error messages and property-based checks for bnnorm.layernorm."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bnnorm.layernorm import (layernorm_backward, layernorm_backward_transposed,
                              layernorm_forward, layernorm_forward_transposed)
from bnnorm.layers import assert_rel_error, numerical_gradient_array

FLOAT_DTYPES = st.sampled_from([np.float32, np.float64])
SEEDS = st.integers(0, 2**32 - 1)


def random_inputs(shape, dtype, seed, scale=1.0, offset=0.0):
    "Return x (shape), gamma (D,), beta (D,) and dout (shape) drawn with `seed`, cast to `dtype`."
    rng = np.random.default_rng(seed)
    D = shape[-1]
    x = scale * rng.standard_normal(shape) + offset
    gamma, beta = rng.standard_normal(D), rng.standard_normal(D)
    dout = rng.standard_normal(shape)
    return [a.astype(dtype) for a in (x, gamma, beta, dout)]


def re_shape(shape):
    "Escape a shape tuple for use in a regular expression."
    return str(shape).replace("(", r"\(").replace(")", r"\)")


def assert_close_to_scale(actual, expected, bound, name):
    """Assert that max |actual - expected| is below `bound` times the largest |expected|.

    Randomized gradient checks use this in place of `rel_error`, which takes the maximum of the
    entrywise relative errors. The numerical gradient's rounding error is about the same for every
    entry, so an entry a thousand times smaller than the largest has a relative error a thousand
    times larger. Over enough random draws, such an entry breaks any fixed `rel_error` bound.
    """
    error = np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-8)
    assert error < bound, (f"{name}: error {error:.3e} relative to the largest entry is not below "
                           f"{bound:.0e}")


# Error messages name the offending value and the expected shape or range.

@pytest.mark.parametrize("gamma_shape, beta_shape", [((4,), (5,)), ((5,), (6,)), ((1, 5), (1, 5)),
                                                     ((), (5,))])
def test_forward_rejects_parameter_shapes(gamma_shape, beta_shape):
    pattern = (rf"gamma has shape {re_shape(gamma_shape)} and beta has shape "
               rf"{re_shape(beta_shape)}, but both must have shape \(D,\) = \(5,\)")
    with pytest.raises(ValueError, match=pattern):
        layernorm_forward(np.ones((3, 5)), np.ones(gamma_shape), np.zeros(beta_shape), None)


@pytest.mark.parametrize("mode", ["eval", "TRAIN", None, 1])
def test_forward_rejects_mode(mode):
    with pytest.raises(ValueError, match=rf"ln_param\['mode'\] is {mode!r}, but 'train' or 'test'"):
        layernorm_forward(np.ones((3, 5)), np.ones(5), np.zeros(5), {"mode": mode})


@pytest.mark.parametrize("eps", [0, -1e-5, float("nan"), float("inf"), "1e-5", True, None])
def test_forward_rejects_eps(eps):
    with pytest.raises(ValueError, match=r"ln_param\['eps'\] is .*positive finite number"):
        layernorm_forward(np.ones((3, 5)), np.ones(5), np.zeros(5), {"eps": eps})


def test_forward_rejects_non_dict_param():
    with pytest.raises(TypeError, match="ln_param is list, but a dict"):
        layernorm_forward(np.ones((3, 5)), np.ones(5), np.zeros(5), ["train"])


@pytest.mark.parametrize("shape", [(), (3, 0)])
def test_forward_rejects_x_without_features(shape):
    with pytest.raises(ValueError, match=rf"x has shape {re_shape(shape)}, but \(\.\.\., D\)"):
        layernorm_forward(np.ones(shape), np.ones(1), np.zeros(1), None)


def test_forward_rejects_string_x():
    with pytest.raises(TypeError, match="x has dtype <U1"):
        layernorm_forward(np.array([["a", "b"]]), np.ones(2), np.zeros(2), None)


def test_backward_rejects_dout_shape():
    _, cache = layernorm_forward(np.ones((3, 5)), np.ones(5), np.zeros(5), None)
    with pytest.raises(ValueError, match=r"dout has shape \(5, 3\).*had shape \(3, 5\)"):
        layernorm_backward(np.ones((5, 3)), cache)


def test_forward_leaves_ln_param_unchanged():
    ln_param = {"mode": "test", "eps": 1e-3}
    layernorm_forward(np.arange(6.0).reshape(2, 3), np.ones(3), np.zeros(3), ln_param)
    assert ln_param == {"mode": "test", "eps": 1e-3}


@pytest.mark.parametrize("forward", [layernorm_forward, layernorm_forward_transposed])
@pytest.mark.parametrize("ln_param, unknown", [({"epsilon": 1e-3}, "'epsilon'"),
                                                ({"eps": 1e-3, "momentum": 0.9}, "'momentum'")])
def test_forward_rejects_unknown_keys(forward, ln_param, unknown):
    pattern = rf"ln_param has unknown keys {unknown}, but the known keys are 'eps', 'mode'"
    with pytest.raises(ValueError, match=pattern):
        forward(np.ones((2, 3)), np.ones(3), np.zeros(3), ln_param)


def test_transposed_backward_rejects_dout_shape():
    _, cache = layernorm_forward_transposed(np.arange(15.0).reshape(3, 5), np.ones(5), np.zeros(5),
                                            None)
    with pytest.raises(ValueError, match=r"dout has shape \(5, 3\).*had shape \(3, 5\)"):
        layernorm_backward_transposed(np.ones((5, 3)), cache)


def test_integer_input_computed_in_float64():
    out, cache = layernorm_forward(np.arange(6).reshape(2, 3), np.ones(3, int), np.zeros(3, int),
                                   None)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out[1], np.array([-1.0, 0.0, 1.0]) / np.sqrt(2 / 3 + 1e-5),
                               rtol=1e-14)
    assert all(g.dtype == np.float64 for g in layernorm_backward(np.ones((2, 3), int), cache))


@pytest.mark.parametrize("forward", [layernorm_forward, layernorm_forward_transposed])
def test_output_has_dtype_of_x(forward):
    # Same rule as batch norm: the floating dtype of x, whatever the dtype of gamma and beta.
    x = np.arange(6).reshape(2, 3)
    for x_dtype, param_dtype in ((np.float32, np.float64), (np.float64, np.float32),
                                 (np.float32, np.int64)):
        out, _ = forward(x.astype(x_dtype), np.ones(3, param_dtype), np.zeros(3, param_dtype), None)
        assert out.dtype == x_dtype, (x_dtype, param_dtype)
    out, _ = forward(x, np.ones(3, np.float32), np.zeros(3, np.float32), None)
    assert out.dtype == np.float64


@pytest.mark.parametrize("x_dtype, dout_dtype", [(np.float64, np.float32),
                                                  (np.float32, np.float64)])
@pytest.mark.parametrize("shape", [(4, 5), (600, 1000)])
def test_backward_mixed_dtypes_give_common_dtype(x_dtype, dout_dtype, shape):
    x, gamma, beta, dout = random_inputs(shape, np.float64, 3, scale=3.0, offset=2.0)
    for forward, backward in ((layernorm_forward, layernorm_backward),
                              (layernorm_forward_transposed, layernorm_backward_transposed)):
        _, cache = forward(x.astype(x_dtype), gamma, beta, None)
        grads = backward(dout.astype(dout_dtype), cache)
        assert [g.dtype for g in grads] == [np.float64] * 3, backward.__name__
        # The float64 computation from the same rounded inputs.
        _, cache64 = forward(x.astype(x_dtype).astype(np.float64), gamma, beta, None)
        expected = backward(dout.astype(dout_dtype).astype(np.float64), cache64)
        bound = 1e-12 if x_dtype == np.float64 else 1e-3
        for name, grad, grad64 in zip(("dx", "dgamma", "dbeta"), grads, expected):
            assert_close_to_scale(grad, grad64, bound, f"{backward.__name__} {name}")


# Properties on random shapes and both float dtypes.

@given(dtype=FLOAT_DTYPES, N=st.integers(2, 64), D=st.integers(1, 64),
       scale=st.sampled_from([1e-2, 1.0, 1e3]), seed=SEEDS)
def test_forward_standardizes_each_sample(dtype, N, D, scale, seed):
    x, _, _, _ = random_inputs((N, D), dtype, seed, scale)
    eps = 1e-5
    xhat, _ = layernorm_forward(x, np.ones(D, dtype), np.zeros(D, dtype), {"eps": eps})
    assert xhat.dtype == dtype

    var = x.astype(np.float64).var(axis=1)
    atol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(xhat.mean(axis=1, dtype=np.float64), 0, atol=atol)
    np.testing.assert_allclose(xhat.std(axis=1, dtype=np.float64), np.sqrt(var / (var + eps)),
                               atol=atol)


@given(dtype=FLOAT_DTYPES, N=st.integers(2, 64), D=st.integers(1, 64), seed=SEEDS)
def test_sample_alone_matches_batch(dtype, N, D, seed):
    x, gamma, beta, _ = random_inputs((N, D), dtype, seed, scale=3.0, offset=5.0)
    out_batch, _ = layernorm_forward(x, gamma, beta, {"mode": "train"})
    n = seed % N
    out_alone, _ = layernorm_forward(x[n:n + 1], gamma, beta, {"mode": "test"})
    np.testing.assert_array_equal(out_alone[0], out_batch[n])


@given(dtype=FLOAT_DTYPES, N=st.integers(2, 64), D=st.integers(1, 64), seed=SEEDS)
def test_backward_shapes_dtypes_and_sums(dtype, N, D, seed):
    x, gamma, beta, dout = random_inputs((N, D), dtype, seed)
    out, cache = layernorm_forward(x, gamma, beta, None)
    dx, dgamma, dbeta = layernorm_backward(dout, cache)
    assert (dx.dtype, dgamma.dtype, dbeta.dtype) == (dtype, dtype, dtype)
    assert (dx.shape, dgamma.shape, dbeta.shape) == ((N, D), (D,), (D,))

    # Adding a constant to a sample does not change its output, so each row of dx sums to 0. The
    # rounding error of that sum is relative to the terms that cancel, dout * gamma / std.
    rtol = 1e-4 if dtype == np.float32 else 1e-12
    std = np.sqrt(x.astype(np.float64).var(axis=1) + 1e-5)
    scale = np.abs(dout * gamma.astype(np.float64)).sum(axis=1) / std
    assert np.all(np.abs(dx.sum(axis=1, dtype=np.float64)) <= rtol * scale)

    xhat = (out.astype(np.float64) - beta) / gamma
    np.testing.assert_allclose(dbeta, dout.sum(axis=0, dtype=np.float64), rtol=rtol, atol=rtol)
    np.testing.assert_allclose(dgamma, (dout * xhat).sum(axis=0), rtol=rtol * 100, atol=rtol * 100)


@given(N=st.integers(2, 64), D=st.integers(1, 64), seed=SEEDS)
def test_float32_matches_float64(N, D, seed):
    x, gamma, beta, dout = random_inputs((N, D), np.float64, seed)
    out64, cache64 = layernorm_forward(x, gamma, beta, None)
    out32, cache32 = layernorm_forward(*(a.astype(np.float32) for a in (x, gamma, beta)), None)
    np.testing.assert_allclose(out32, out64, rtol=1e-4, atol=1e-4)

    grads64 = layernorm_backward(dout, cache64)
    grads32 = layernorm_backward(dout.astype(np.float32), cache32)
    for grad32, grad64 in zip(grads32, grads64):
        np.testing.assert_allclose(grad32, grad64, rtol=1e-3, atol=1e-3)


@given(shape=st.sampled_from([(1, 1), (1, 4), (2, 3), (4, 5), (3, 1), (2, 2, 3), (3, 1, 4)]),
       seed=SEEDS)
def test_backward_matches_numerical_gradient(shape, seed):
    x, gamma, beta, dout = random_inputs(shape, np.float64, seed, scale=5.0, offset=12.0)
    dx, dgamma, dbeta = layernorm_backward(dout, layernorm_forward(x, gamma, beta, None)[1])

    def forward(x, gamma, beta):
        return layernorm_forward(x, gamma, beta, None)[0]

    assert_close_to_scale(dx, numerical_gradient_array(lambda x: forward(x, gamma, beta), x, dout),
                          1e-7, "dx")
    assert_close_to_scale(dgamma,
                          numerical_gradient_array(lambda g: forward(x, g, beta), gamma, dout),
                          1e-7, "dgamma")
    assert_close_to_scale(dbeta,
                          numerical_gradient_array(lambda b: forward(x, gamma, b), beta, dout),
                          1e-7, "dbeta")


@given(lead=st.lists(st.integers(1, 4), min_size=2, max_size=3), D=st.integers(1, 16), seed=SEEDS)
def test_many_axes_match_flattened_rows(lead, D, seed):
    shape = (*lead, D)
    x, gamma, beta, dout = random_inputs(shape, np.float64, seed)
    out, cache = layernorm_forward(x, gamma, beta, None)
    dx, dgamma, dbeta = layernorm_backward(dout, cache)

    out2, cache2 = layernorm_forward(x.reshape(-1, D), gamma, beta, None)
    dx2, dgamma2, dbeta2 = layernorm_backward(dout.reshape(-1, D), cache2)
    assert out.shape == shape
    assert dx.shape == shape
    np.testing.assert_allclose(out.reshape(-1, D), out2, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(dx.reshape(-1, D), dx2, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dgamma, dgamma2, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dbeta, dout.sum(axis=tuple(range(len(lead)))), rtol=1e-12,
                               atol=1e-14)


@given(N=st.integers(1, 64), D=st.integers(3, 64), seed=SEEDS)
def test_transposition_route_matches_direct(N, D, seed):
    x, gamma, beta, dout = random_inputs((N, D), np.float64, seed, scale=5.0, offset=12.0)
    out, cache = layernorm_forward(x, gamma, beta, {"eps": 1e-5})
    out_t, cache_t = layernorm_forward_transposed(x, gamma, beta, {"eps": 1e-5})
    assert_rel_error(out_t, out, 1e-10, "out")

    grads = layernorm_backward(dout, cache)
    grads_t = layernorm_backward_transposed(dout, cache_t)
    for name, grad, grad_t in zip(["dx", "dgamma", "dbeta"], grads, grads_t):
        assert_rel_error(grad_t, grad, 1e-10, name)


def test_transposition_route_rejects_one_feature():
    # Batch norm of the transposed input would see a batch of one sample in training mode.
    with pytest.raises(ValueError):
        layernorm_forward_transposed(np.ones((3, 1)), np.ones(1), np.zeros(1), None)

"""Error messages and property-based checks for bnnorm.layers."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import bnnorm
from bnnorm.layers import (affine_backward, affine_forward, assert_rel_error, numerical_gradient,
                           numerical_gradient_array, rel_error, relu_backward, relu_forward,
                           softmax_loss)

FLOAT_DTYPES = st.sampled_from([np.float32, np.float64])


def finite_arrays(dtype, shape, bound=10.0):
    "Strategy for arrays of `shape` with finite entries in [-bound, bound]."
    elements = st.floats(-bound, bound, allow_nan=False, width=np.dtype(dtype).itemsize * 8)
    return arrays(dtype, shape, elements=elements)


def re_shape(shape):
    "Escape a shape tuple for use in a regular expression."
    return str(shape).replace("(", r"\(").replace(")", r"\)")


def test_package_imports():
    assert isinstance(bnnorm.__version__, str)
    assert callable(bnnorm.layers.affine_forward)


# Error messages name the offending value and the expected shape or range.

def test_affine_rejects_one_axis_x():
    with pytest.raises(ValueError, match=r"x has shape \(3,\).*x\[None\]"):
        affine_forward(np.ones(3), np.ones((3, 2)), np.ones(2))


def test_affine_rejects_mismatched_w():
    with pytest.raises(ValueError, match=r"w has shape \(10, 5\).*D = 12.*\(2, 3, 4\)"):
        affine_forward(np.ones((2, 3, 4)), np.ones((10, 5)), np.ones(5))


def test_affine_rejects_one_axis_w():
    with pytest.raises(ValueError, match=r"w has shape \(3,\)"):
        affine_forward(np.ones((2, 3)), np.ones(3), np.ones(1))


def test_affine_rejects_mismatched_b():
    with pytest.raises(ValueError, match=r"b has shape \(4, 1\).*\(M,\) = \(4,\)"):
        affine_forward(np.ones((2, 3)), np.ones((3, 4)), np.ones((4, 1)))


def test_affine_backward_rejects_dout_shape():
    _, cache = affine_forward(np.ones((2, 3)), np.ones((3, 4)), np.ones(4))
    with pytest.raises(ValueError, match=r"dout has shape \(4, 2\).*\(N, M\) = \(2, 4\)"):
        affine_backward(np.ones((4, 2)), cache)


def test_affine_rejects_string_x():
    with pytest.raises(TypeError, match=r"x has dtype <U1"):
        affine_forward(np.array([["a"]]), np.ones((1, 1)), np.ones(1))


def test_affine_rejects_complex_w():
    with pytest.raises(TypeError, match=r"w has dtype complex128"):
        affine_forward(np.ones((2, 1)), np.ones((1, 1), complex), np.ones(1))


def test_relu_backward_rejects_dout_shape():
    _, cache = relu_forward(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"dout has shape \(6,\).*\(2, 3\)"):
        relu_backward(np.ones(6), cache)


@pytest.mark.parametrize("y, pattern", [
    ([0, 1, 5], r"y contains 1 labels outside \[0, 5\).*y\[2\] = 5"),
    ([0, -1, -2], r"y contains 2 labels outside \[0, 5\).*y\[1\] = -1"),
    ([0, 1], r"y has shape \(2,\).*\(N,\) = \(3,\)"),
    ([[0], [1], [2]], r"y has shape \(3, 1\)"),
])
def test_softmax_rejects_bad_labels(y, pattern):
    with pytest.raises(ValueError, match=pattern):
        softmax_loss(np.zeros((3, 5)), np.array(y))


@pytest.mark.parametrize("y", [np.array([0., 1., 2.]), np.array([True, False, True])])
def test_softmax_rejects_non_integer_labels(y):
    with pytest.raises(TypeError, match=f"y has dtype {y.dtype}.*integer class labels"):
        softmax_loss(np.zeros((3, 5)), y)


@pytest.mark.parametrize("shape", [(5,), (0, 3), (3, 0), (2, 3, 4)])
def test_softmax_rejects_bad_scores_shape(shape):
    with pytest.raises(ValueError, match=rf"scores has shape {re_shape(shape)}"):
        softmax_loss(np.zeros(shape), np.zeros(shape[0], int))


def test_numerical_gradient_rejects_integer_x():
    with pytest.raises(TypeError, match="x is int64.*perturbed in place"):
        numerical_gradient(np.sum, np.arange(3))


def test_numerical_gradient_rejects_list_x():
    with pytest.raises(TypeError, match="x is list"):
        numerical_gradient(np.sum, [1.0, 2.0])


def test_numerical_gradient_array_rejects_dout_shape():
    with pytest.raises(ValueError, match=r"f\(x\) has shape \(2,\), but dout has shape \(3,\)"):
        numerical_gradient_array(lambda x: 2 * x, np.ones(2), np.ones(3))


def test_rel_error_rejects_shape_mismatch():
    with pytest.raises(ValueError, match=r"x has shape \(3,\) and y has shape \(1, 3\)"):
        rel_error(np.ones(3), np.ones((1, 3)))


def test_assert_rel_error_message():
    with pytest.raises(AssertionError, match=r"dgamma: relative error 3\.333e-01 .* 1\.0e-08"):
        assert_rel_error(np.array([1.0]), np.array([2.0]), 1e-8, name="dgamma")


def test_assert_rel_error_fails_on_nan():
    with pytest.raises(AssertionError, match="relative error nan"):
        assert_rel_error(np.array([np.nan]), np.array([1.0]), 1e-8)


def test_rel_error_floor_for_near_zero_entries():
    # Both values are far below 1e-8, so the denominator is the floor 1e-8.
    assert rel_error(0.0, 1e-10) == pytest.approx(1e-2, rel=1e-12)
    assert rel_error(np.array([1.0, 0.0]), np.array([1.0, 0.0])) == 0.0


def test_numerical_gradient_array_of_identity_view():
    # f returns x itself, a view that changes when x is perturbed again.
    x = np.array([1.0, -2.0, 3.0])
    dout = np.array([0.5, 2.0, -1.0])
    np.testing.assert_allclose(numerical_gradient_array(lambda x: x, x, dout), dout, rtol=1e-9)


def test_integer_inputs_computed_in_float64():
    out, cache = affine_forward(np.ones((2, 3), int), np.ones((3, 4), np.int32), np.zeros(4, int))
    assert out.dtype == np.float64
    assert all(g.dtype == np.float64 for g in affine_backward(np.ones((2, 4), int), cache))

    out, cache = relu_forward(np.arange(-3, 3))
    assert out.dtype == np.float64
    assert relu_backward(np.ones(6, int), cache).dtype == np.float64

    loss, dscores = softmax_loss(np.array([[1, 2, 3]]), np.array([2]))
    assert dscores.dtype == np.float64
    assert loss == pytest.approx(np.log(np.exp([-2.0, -1.0, 0.0]).sum()), rel=1e-14)


# Properties on random shapes and both float dtypes.

@given(dtype=FLOAT_DTYPES, N=st.integers(2, 64), D=st.integers(1, 64), M=st.integers(1, 8),
       data=st.data())
def test_affine_matches_matmul_and_keeps_dtype(dtype, N, D, M, data):
    x = data.draw(finite_arrays(dtype, (N, D)))
    w = data.draw(finite_arrays(dtype, (D, M)))
    b = data.draw(finite_arrays(dtype, (M,)))
    out, cache = affine_forward(x, w, b)
    assert out.dtype == dtype
    expected = x.astype(np.float64) @ w.astype(np.float64) + b
    tolerance = 1e-4 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(out, expected, rtol=tolerance, atol=tolerance * 100 * D)

    dout = data.draw(finite_arrays(dtype, (N, M)))
    dx, dw, db = affine_backward(dout, cache)
    assert (dx.dtype, dw.dtype, db.dtype) == (dtype, dtype, dtype)
    assert (dx.shape, dw.shape, db.shape) == (x.shape, w.shape, b.shape)


@given(N=st.integers(1, 4), dims=st.lists(st.integers(1, 3), min_size=1, max_size=3),
       M=st.integers(1, 3), seed=st.integers(0, 2**32 - 1))
def test_affine_backward_matches_numerical_gradient(N, dims, M, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, *dims))
    D = int(np.prod(dims))
    w = rng.standard_normal((D, M))
    b = rng.standard_normal(M)
    dout = rng.standard_normal((N, M))
    dx, dw, db = affine_backward(dout, affine_forward(x, w, b)[1])

    assert_rel_error(dx, numerical_gradient_array(lambda x: affine_forward(x, w, b)[0], x, dout),
                     1e-6, "dx")
    assert_rel_error(dw, numerical_gradient_array(lambda w: affine_forward(x, w, b)[0], w, dout),
                     1e-6, "dw")
    assert_rel_error(db, numerical_gradient_array(lambda b: affine_forward(x, w, b)[0], b, dout),
                     1e-6, "db")


@given(dtype=FLOAT_DTYPES, N=st.integers(2, 64), D=st.integers(1, 64), data=st.data())
def test_relu_forward_backward_properties(dtype, N, D, data):
    x = data.draw(finite_arrays(dtype, (N, D)))
    dout = data.draw(finite_arrays(dtype, (N, D)))
    out, cache = relu_forward(x)
    dx = relu_backward(dout, cache)

    assert out.dtype == dtype
    assert dx.dtype == dtype
    np.testing.assert_array_equal(out, np.where(x > 0, x, 0))
    np.testing.assert_array_equal(dx, np.where(x > 0, dout, 0))


@given(N=st.integers(1, 4), D=st.integers(1, 5), seed=st.integers(0, 2**32 - 1))
def test_relu_backward_matches_numerical_gradient(N, D, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, D))
    x[np.abs(x) < 0.1] += 0.2
    dout = rng.standard_normal((N, D))
    dx = relu_backward(dout, relu_forward(x)[1])
    assert_rel_error(dx, numerical_gradient_array(lambda x: relu_forward(x)[0], x, dout), 1e-8,
                     "dx")


@given(dtype=FLOAT_DTYPES, N=st.integers(2, 64), C=st.integers(1, 64),
       scale=st.sampled_from([1.0, 100.0, 5000.0]), seed=st.integers(0, 2**32 - 1))
def test_softmax_loss_matches_reference(dtype, N, C, scale, seed):
    rng = np.random.default_rng(seed)
    scores = (scale * rng.standard_normal((N, C))).astype(dtype)
    y = rng.integers(0, C, N)
    loss, dscores = softmax_loss(scores, y)

    s = scores.astype(np.float64)
    log_probs = s - np.logaddexp.reduce(s, axis=1, keepdims=True)
    expected = -log_probs[np.arange(N), y].mean()
    assert dscores.dtype == dtype
    assert np.isfinite(loss)
    assert np.isfinite(dscores).all()
    assert loss >= 0
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    assert abs(loss - expected) <= rtol * max(1.0, expected)
    np.testing.assert_allclose(dscores.sum(axis=1), 0, atol=1e-5 if dtype == np.float32 else 1e-14)


@given(N=st.integers(1, 4), C=st.integers(1, 6), seed=st.integers(0, 2**32 - 1))
def test_softmax_backward_matches_numerical_gradient(N, C, seed):
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal((N, C))
    y = rng.integers(0, C, N)
    dscores = softmax_loss(scores, y)[1]
    assert_rel_error(dscores, numerical_gradient(lambda s: softmax_loss(s, y)[0], scores), 1e-6,
                     "dscores")


@given(x=finite_arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(1, 4))))
def test_numerical_gradient_restores_x(x):
    before = x.copy()
    numerical_gradient(lambda x: np.sum(np.sin(x)), x)
    numerical_gradient_array(np.cos, x, np.ones_like(x))
    np.testing.assert_array_equal(x, before)

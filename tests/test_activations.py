"""Every entry of the activation table on every backend: the NumPy forward, the Triton epilogue
(CUDA, or the interpreter) and the gradient, each against torch's own function in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TRITON_DEVICE

import clisonix_gpu as cg
from clisonix_gpu.kernels import activation_table
from clisonix_gpu.ops.activations import TABLE


def _points(rng):
    """Pre-activations covering both signs, the tanh series' cut-over at |z| = 0.125, large |z|."""
    special = [0.0, -0.0, 1e-8, -1e-8, 0.124, -0.126, 3.0, -3.0, 20.0, -20.0, 80.0, -80.0]
    return np.concatenate([special, rng.standard_normal(101) * 4]).astype(np.float64)


def test_the_table_has_every_name_once():
    assert tuple(TABLE) == activation_table.ACTIVATIONS == cg.ACTIVATIONS
    assert len(set(cg.ACTIVATIONS)) == len(cg.ACTIVATIONS) and cg.ACTIVATIONS[0] is None


@pytest.mark.parametrize("activation", activation_table.ACTIVATIONS)
@pytest.mark.parametrize("backend", ["numpy", "triton"])
def test_forward_on_every_backend_matches_torch(rng, activation, backend):
    z = _points(rng)
    reference = TABLE[activation].torch(torch.from_numpy(z)).numpy()
    # transform_matrix with an identity weight applies the epilogue to x itself
    x = z[:, None]
    w = np.ones((1, 1))
    if backend == "triton":
        with cg.use_backend("triton"):
            got = cg.transform_matrix(torch.from_numpy(x).to(TRITON_DEVICE), torch.from_numpy(w).to(TRITON_DEVICE), activation=activation)
        got = got.cpu().numpy()
    else:
        got = cg.transform_matrix(x, w, activation=activation)
    np.testing.assert_allclose(got[:, 0], reference, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("activation", activation_table.ACTIVATIONS)
def test_backward_matches_autograd_of_torch_forward(rng, activation):
    z = torch.from_numpy(_points(rng)).requires_grad_()
    grad = torch.from_numpy(rng.standard_normal(tuple(z.shape)))
    y = TABLE[activation].torch(z)
    (expected,) = torch.autograd.grad(y, z, grad)
    got = TABLE[activation].backward(grad, z.detach())
    if activation == "relu":  # torch's relu has gradient 0 at 0; ours too
        assert float(got[0]) == 0.0
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-12, atol=1e-14)
    from_output = TABLE[activation].backward_from_output
    if from_output is None:
        assert activation in ("gelu", "gelu_tanh", "silu")  # not a function of the output
    else:
        np.testing.assert_allclose(from_output(grad, y.detach()).numpy(), expected.numpy(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("activation", activation_table.ACTIVATIONS)
def test_in_place_forward_has_the_bits_of_the_function(rng, activation, dtype):
    for size in (1, 7, 127, 129, 8192 + 5):
        z = torch.from_numpy(rng.standard_normal(size) * 4).to(dtype)
        expected = TABLE[activation].torch(z)
        got = z.clone()
        TABLE[activation].torch_(got)
        assert torch.equal(got, expected), (activation, size)
        strided = torch.from_numpy(rng.standard_normal(2 * size)).to(dtype)[::2]
        expected = TABLE[activation].torch(strided)
        TABLE[activation].torch_(strided)
        assert torch.equal(strided, expected), (activation, size)


@pytest.mark.parametrize("activation", activation_table.ACTIVATIONS[1:])
def test_nan_propagates_on_the_numpy_path(activation):
    y = np.array([np.nan, 1.0, -1.0])
    TABLE[activation].numpy_(y)
    assert np.isnan(y[0])

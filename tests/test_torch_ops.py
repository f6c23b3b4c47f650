"""torch.library registration: opcheck for every op, autograd of transform_matrix, torch.compile."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TRITON_DEVICE
from torch.library import opcheck

import clisonix_gpu as cg
import clisonix_gpu.torch as ct
from clisonix_gpu.baselines import _torch_activation

ACTS = [a or "" for a in cg.ACTIVATIONS]


def _sample_ops(rng):
    x = torch.from_numpy(rng.standard_normal((5, 19)).astype(np.float32))
    w = torch.from_numpy(rng.standard_normal((7, 19)).astype(np.float32))
    b = torch.from_numpy(rng.standard_normal(7).astype(np.float32))
    qa, qb = ct.pack_bits(x), ct.pack_bits(w)
    a = torch.from_numpy(rng.standard_normal((12, 9)))
    return [
        (torch.ops.clisonix.transform_matrix.default, (x, w, b, "gelu")),
        (torch.ops.clisonix.transform_matrix.default, (x.requires_grad_(), w.requires_grad_(), b, "silu")),
        (torch.ops.clisonix.transform_matrix.default, (x.detach()[None], w.detach()[None], None, "")),
        (torch.ops.clisonix.pack_bits.default, (x.detach(),)),
        (torch.ops.clisonix.unpack_bits.default, (qa, 19)),
        (torch.ops.clisonix.binarize.default, (x.detach(),)),
        (torch.ops.clisonix.binary_matmul.default, (qa, qb, 19)),
        (torch.ops.clisonix.hamming_distance.default, (qa, qb)),
        (torch.ops.clisonix.hamming_topk.default, (qa, qb, 3)),
        (torch.ops.clisonix.svd_compress_k.default, (a, 3, 4, 1, 0)),
    ]


def test_opcheck_every_op(rng):
    for op, args in _sample_ops(rng):
        result = opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


@pytest.mark.parametrize("activation", ACTS)
def test_gradcheck_float64(rng, activation):
    x = torch.from_numpy(rng.standard_normal((4, 6))).requires_grad_()
    w = torch.from_numpy(rng.standard_normal((3, 6))).requires_grad_()
    b = torch.from_numpy(rng.standard_normal(3)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: ct.transform_matrix(x, w, b, activation), (x, w, b))


def test_gradcheck_batched_weights_without_bias(rng):
    x = torch.from_numpy(rng.standard_normal((2, 3, 5))).requires_grad_()
    w = torch.from_numpy(rng.standard_normal((2, 4, 5))).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: ct.transform_matrix(x, w, None, "tanh"), (x, w))


@pytest.mark.parametrize("activation", ACTS)
def test_gradients_on_triton_path_match_torch(rng, activation):
    def leaf(shape):
        return torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(TRITON_DEVICE).requires_grad_()

    x, w, b = leaf((2, 9, 13)), leaf((6, 13)), leaf((6,))
    grad = torch.from_numpy(rng.standard_normal((2, 9, 6)).astype(np.float32)).to(TRITON_DEVICE)
    with cg.use_backend("triton"):
        ours = torch.autograd.grad(ct.transform_matrix(x, w, b, activation), (x, w, b), grad)
    theirs = torch.autograd.grad(_torch_activation(activation or None)(F.linear(x, w, b)), (x, w, b), grad)
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o, t, rtol=1e-4, atol=1e-4)


def test_torch_compile_fullgraph_matches_eager(rng):
    # Every layer is one of ours: a torch layer in between (e.g. nn.Tanh) is compiled by Inductor,
    # whose kernels may differ from eager torch in the last bit, which is not what this test checks.
    torch.manual_seed(int(rng.integers(2**31)))
    model = torch.nn.Sequential(
        cg.nn.LIAMLinear(16, 32, activation="gelu"),
        cg.nn.LowRankLinear.from_linear(torch.nn.Linear(32, 24), k=8, activation="tanh"),
        cg.nn.BinaryLinear.from_linear(torch.nn.Linear(24, 5)),
    ).eval()
    x = torch.from_numpy(rng.standard_normal((7, 16)).astype(np.float32))
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)

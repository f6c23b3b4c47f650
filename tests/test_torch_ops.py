"""torch.library registration: opcheck for every op, autograd of transform_matrix, torch.compile."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TRITON_DEVICE
from torch.library import opcheck
from torch.utils._python_dispatch import TorchDispatchMode

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
        (torch.ops.clisonix.transform_matrix_cpu_keep_preactivation.default, (x, w, b, "gelu")),
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


# ----------------------------------------------------------------------------- the top-level op on torch tensors


def _leaves(rng, grad_of, dtype=np.float64):
    x, w, b = (torch.from_numpy(rng.standard_normal(s).astype(dtype)) for s in ((4, 6), (3, 6), (3,)))
    return tuple(t.requires_grad_(name in grad_of) for name, t in zip("xwb", (x, w, b)))


@pytest.mark.parametrize("grad_of", ["x", "w", "b", "xwb"])
@pytest.mark.parametrize("activation", [None, "gelu", "tanh"])
def test_top_level_op_is_differentiable_like_the_torch_op(rng, grad_of, activation):
    x, w, b = _leaves(rng, grad_of)
    y = cg.transform_matrix(x, w, b, activation)
    assert y.grad_fn is not None
    torch.testing.assert_close(y, ct.transform_matrix(x, w, b, activation), rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda x, w, b: cg.transform_matrix(x, w, b, activation), (x, w, b))
    needs = [t for t in (x, w, b) if t.requires_grad]
    grad = torch.from_numpy(rng.standard_normal((4, 3)))
    ours = torch.autograd.grad(cg.transform_matrix(x, w, b, activation), needs, grad)
    theirs = torch.autograd.grad(_torch_activation(activation)(F.linear(x, w, b)), needs, grad)
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o, t)


def test_top_level_op_trains_a_residual_block(rng):
    """With a residual path the backward ran even when the op dropped its graph; now w gets a gradient."""
    x = torch.from_numpy(rng.standard_normal((4, 6)).astype(np.float32)).requires_grad_()
    w = torch.from_numpy(rng.standard_normal((6, 6)).astype(np.float32)).requires_grad_()
    (x + cg.transform_matrix(x, w, None, "relu")).sum().backward()
    assert w.grad is not None and x.grad is not None
    expected_w = torch.autograd.grad((x + F.relu(F.linear(x, w))).sum(), w)[0]
    torch.testing.assert_close(w.grad, expected_w)


def test_top_level_op_without_grad_and_on_numpy_keeps_the_dispatch_path(rng, monkeypatch):
    calls = []
    monkeypatch.setattr(ct, "transform_matrix", lambda *a, **k: calls.append(a) or pytest.fail("torch op taken"))
    x, w, b = _leaves(rng, "")
    plain = cg.transform_matrix(x, w, b, "silu")
    with torch.no_grad():
        x_grad = x.clone().requires_grad_()
        assert cg.transform_matrix(x_grad, w, b, "silu").grad_fn is None
    out = cg.transform_matrix(x.numpy(), w.numpy(), b.numpy(), "silu")
    assert isinstance(out, np.ndarray) and np.array_equal(out, plain.numpy())
    with torch.inference_mode():
        cg.transform_matrix(x, w, b)
    assert calls == []


def test_top_level_op_enters_the_torch_op_once(rng, monkeypatch):
    """The torch op's kernels call the top-level op back with autograd off: no recursion."""
    calls = []
    original = ct.transform_matrix

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(ct, "transform_matrix", counting)
    x, w, b = _leaves(rng, "xwb")
    cg.transform_matrix(x, w, b, "relu").sum().backward()
    assert len(calls) == 1
    # the CPU kernel called directly with inputs that require grad (autograd fallback) also returns
    assert torch.ops.clisonix.transform_matrix_cpu(x, w, b, "relu").shape == (4, 3)


def test_top_level_op_checks_input_before_the_torch_op(rng):
    x, w, b = _leaves(rng, "x")
    with pytest.raises(cg.ShapeError, match=r"\(4, 6\).*\(3, 5\)"):
        cg.transform_matrix(x, w[:, :5], b)
    with pytest.raises(ValueError, match="relu"):
        cg.transform_matrix(x, w, b, "swish")
    with pytest.raises(TypeError, match="dtype"):
        cg.transform_matrix(x, w.float(), b)
    with pytest.raises(TypeError, match="one type"):
        cg.transform_matrix(x, w.detach().numpy(), None)


def test_top_level_op_compiles_fullgraph_forward_and_backward(rng):
    def block(x, w, b):
        return x.sum() + cg.transform_matrix(x, w, b, "gelu").square().sum()

    x, w, b = _leaves(rng, "xwb", np.float32)
    compiled = torch.compile(block, fullgraph=True)
    eager_grads = torch.autograd.grad(block(x, w, b), (x, w, b))
    compiled_grads = torch.autograd.grad(compiled(x, w, b), (x, w, b))
    for c, e in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(c, e)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, w, b), block(x, w, b))


def test_top_level_op_exports_as_the_torch_op(rng):
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(3, 6))

        def forward(self, x):
            return cg.transform_matrix(x, self.weight, None, "tanh")

    x = torch.randn(4, 6)
    program = torch.export.export(Block(), (x,))
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert targets == [torch.ops.clisonix.transform_matrix.default]


@pytest.mark.parametrize("activation", [None, "silu"])
def test_top_level_op_gradients_on_triton_path(rng, activation):
    def leaf(shape):
        return torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(TRITON_DEVICE).requires_grad_()

    x, w, b = leaf((2, 9, 13)), leaf((6, 13)), leaf((6,))
    with cg.use_backend("triton"):
        ours = torch.autograd.grad(cg.transform_matrix(x, w, b, activation).sum(), (x, w, b))
    theirs = torch.autograd.grad(_torch_activation(activation)(F.linear(x, w, b)).sum(), (x, w, b))
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o, t, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- registration and schema


def test_activation_defaults_to_none_in_the_schema(rng):
    x, w, b = _leaves(rng, "")
    schema = str(torch.ops.clisonix.transform_matrix.default._schema)
    assert "Tensor? bias=None" in schema and "str? activation=None" in schema
    torch.testing.assert_close(torch.ops.clisonix.transform_matrix(x, w), x @ w.T)
    torch.testing.assert_close(torch.ops.clisonix.transform_matrix(x, w, b), x @ w.T + b)
    torch.testing.assert_close(torch.ops.clisonix.transform_matrix(x, w, b, "relu"), F.relu(x @ w.T + b))


def _python(code: str) -> str:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_ops_are_registered_when_the_package_is_imported_after_torch():
    code = "import torch, clisonix_gpu; print(torch.ops.clisonix.transform_matrix.default._schema.name)"
    assert _python(code) == "clisonix::transform_matrix"


def test_numpy_only_import_does_not_load_torch():
    assert _python("import sys, clisonix_gpu; print('torch' in sys.modules)") == "False"


# ----------------------------------------------------------------------------- opcheck with inputs that require grad


def test_opcheck_float_ops_with_inputs_that_require_grad(rng):
    x = torch.from_numpy(rng.standard_normal((5, 19)).astype(np.float32))
    w = torch.from_numpy(rng.standard_normal((7, 19)).astype(np.float32))
    b = torch.from_numpy(rng.standard_normal(7).astype(np.float32))
    cases = [
        (torch.ops.clisonix.transform_matrix.default, (x.clone().requires_grad_(), w, b.clone().requires_grad_(), "gelu")),
        (torch.ops.clisonix.transform_matrix.default, (x, w.clone().requires_grad_())),
        (torch.ops.clisonix.transform_matrix.default, (x[None].clone().requires_grad_(), w[None].clone().requires_grad_(), None, "tanh")),
        (torch.ops.clisonix.pack_bits.default, (x.clone().requires_grad_(),)),
    ]
    for op, args in cases:
        result = opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


# opcheck's aot_dispatch tests add the sums of all outputs into one tensor in place; binarize
# returns (uint8 bits, float scale), and the int64 sum of the bits cannot take the float one.
# Those two tests are run here by hand instead (compiled forward and backward against eager).
OPCHECK_WITHOUT_AOT = ("test_schema", "test_autograd_registration", "test_faketensor")


def test_opcheck_binarize_with_input_that_requires_grad(rng):
    x = torch.from_numpy(rng.standard_normal((5, 19)).astype(np.float32)).requires_grad_()
    result = opcheck(torch.ops.clisonix.binarize.default, (x,), test_utils=OPCHECK_WITHOUT_AOT)
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("dynamic", [False, True])
def test_binarize_compiled_forward_and_backward_match_eager(rng, dynamic):
    """What opcheck's test_aot_dispatch_{static,dynamic} check, on the float output."""
    x = torch.from_numpy(rng.standard_normal((5, 19)).astype(np.float32)).requires_grad_()
    compiled = torch.compile(ct.binarize, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    (bits, scale), (bits_c, scale_c) = ct.binarize(x), compiled(x)
    assert torch.equal(bits, bits_c)
    torch.testing.assert_close(scale_c, scale)
    grad = torch.from_numpy(rng.standard_normal(5).astype(np.float32))
    eager_grad = torch.autograd.grad(scale, x, grad)[0]
    torch.testing.assert_close(torch.autograd.grad(scale_c, x, grad)[0], eager_grad)
    torch.testing.assert_close(eager_grad, torch.sign(x.detach()) * grad[:, None] / 19)  # d mean|x| / dx


def test_svd_compress_k_is_not_differentiable_and_says_so(rng):
    a = torch.from_numpy(rng.standard_normal((12, 9))).requires_grad_()
    result = opcheck(torch.ops.clisonix.svd_compress_k.default, (a, 3, 4, 1, 0), test_utils=OPCHECK_WITHOUT_AOT)
    assert all(v == "SUCCESS" for v in result.values()), result
    u, s, vh = ct.svd_compress_k(a, 3)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        s.sum().backward()


def test_top_level_op_under_vmap_and_fake_tensors(rng):
    x, w, b = _leaves(rng, "")
    per_row = torch.vmap(lambda row: cg.transform_matrix(row, w, b, "relu"))(x[:, None, :])
    torch.testing.assert_close(per_row[:, 0], F.relu(F.linear(x, w, b)))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = cg.transform_matrix(torch.empty(5, 3), torch.empty(4, 3), None, "gelu")
    assert type(fake).__name__ == "FakeTensor" and fake.shape == (5, 4)


def test_top_level_op_is_recorded_by_jit_trace(rng):
    w = torch.from_numpy(rng.standard_normal((4, 3)).astype(np.float32))
    traced = torch.jit.trace(lambda x: cg.transform_matrix(x, w, None, "relu"), torch.randn(2, 3))
    assert "clisonix::transform_matrix" in [node.kind() for node in traced.graph.nodes()]
    x = torch.randn(5, 3)  # another batch size: the op ran, not a constant recorded at trace time
    torch.testing.assert_close(traced(x), F.relu(x @ w.T))


class _CountGemms(TorchDispatchMode):
    """Records the matrix products that run under it."""

    def __init__(self):
        super().__init__()
        self.gemms = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm, torch.ops.aten.baddbmm):
            self.gemms.append(func)
        return func(*args, **(kwargs or {}))


_GRAD_TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@pytest.mark.parametrize("dtype", list(_GRAD_TOLERANCE))
@pytest.mark.parametrize("activation", ACTS)
def test_training_forward_keeps_the_inference_bits_and_backward_runs_two_gemms(rng, activation, dtype):
    """Under autograd the CPU op keeps its output (ReLU, leaky ReLU, sigmoid, tanh) or its
    pre-activation (GELUs, SiLU) for the backward: the forward has the bits of the plain call and
    the backward is the two GEMMs of a linear layer, with torch's gradients."""
    x, w, b = (torch.from_numpy(rng.standard_normal(s)).to(dtype).requires_grad_() for s in ((37, 29), (13, 29), (13,)))
    y = ct.transform_matrix(x, w, b, activation)
    with torch.no_grad():
        assert torch.equal(y, ct.transform_matrix(x, w, b, activation))
    grad = torch.from_numpy(rng.standard_normal(tuple(y.shape))).to(dtype)
    with _CountGemms() as counter:
        ours = torch.autograd.grad(y, (x, w, b), grad)
    assert len(counter.gemms) == 2, counter.gemms
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    theirs = torch.autograd.grad(_torch_activation(activation or None)(F.linear(*leaves)), leaves, grad.double())
    for o, t in zip(ours, theirs):
        assert o.dtype == dtype
        assert float((o.double() - t).abs().max()) <= _GRAD_TOLERANCE[dtype] * max(float(t.abs().max()), 1.0)


def test_cpu_call_that_nothing_records_skips_the_op_dispatch_with_the_same_bits(rng):
    x, w, b = (torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for s in ((33, 17), (9, 17), (9,)))
    with _CountGemms():  # a dispatch mode active: the call goes through the op, which it records
        through_op = ct.transform_matrix(x, w, b, "gelu")
    direct = ct.transform_matrix(x, w, b, "gelu")
    assert torch.equal(direct, through_op)
    assert torch.equal(direct, torch.ops.clisonix.transform_matrix(x, w, b, "gelu"))
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    with Record():
        ct.transform_matrix(x, w, b, "gelu")
    assert any("clisonix" in str(func) for func in seen), seen

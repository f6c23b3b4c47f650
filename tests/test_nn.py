"""LIAM layers and compress(model): numerics, state dicts, training, reports and errors."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import clisonix_gpu as cg
from clisonix_gpu.baselines import _torch_activation
from clisonix_gpu.nn import BinaryLinear, LIAMLinear, LowRankLinear, ModelSize, compress, model_size


def _x(rng, *shape):
    return torch.from_numpy(rng.standard_normal(shape).astype(np.float32))


@pytest.mark.parametrize("activation", cg.ACTIVATIONS)
def test_liam_linear_is_linear_plus_activation(rng, activation):
    linear = torch.nn.Linear(13, 7)
    layer = LIAMLinear.from_linear(linear, activation=activation)
    x = _x(rng, 3, 5, 13)
    torch.testing.assert_close(layer(x), _torch_activation(activation)(linear(x)), rtol=1e-5, atol=1e-5)
    assert set(layer.state_dict()) == {"weight", "bias"}


def test_liam_linear_rejects_unknown_activation():
    with pytest.raises(ValueError, match="gelu"):
        LIAMLinear(3, 4, activation="mish")


def test_low_rank_linear_matches_its_factors_and_full_rank_matches_original(rng):
    linear = torch.nn.Linear(20, 12)
    x = _x(rng, 9, 20)
    layer = LowRankLinear.from_linear(linear, k=5)
    lr = cg.svd_compress(linear.weight.detach(), k=5)
    expected = x @ (lr.u * lr.s @ lr.vh).T + linear.bias
    torch.testing.assert_close(layer(x), expected.detach(), rtol=1e-5, atol=1e-5)
    full = LowRankLinear.from_linear(linear, k=12)
    torch.testing.assert_close(full(x), linear(x).detach(), rtol=1e-4, atol=1e-5)
    assert 0 < layer.relative_error < 1 and full.relative_error < 1e-3


def test_low_rank_linear_reads_parametrized_and_swapped_factors(rng):
    """The layer reads its factors from its registered parameters where they are there, else as
    attribute access gives them: a parametrization (which moves the parameter away), parameters
    swapped by ``torch.func.functional_call``, no bias."""
    from torch.nn.utils import parametrize

    class Doubled(torch.nn.Module):
        def forward(self, t):
            return 2 * t

    x = _x(rng, 9, 20)
    with torch.no_grad():
        for bias in (True, False):
            layer = LowRankLinear(20, 12, 5, bias=bias)
            plain = layer(x)
            expected = (x @ layer.first.T) @ (2 * layer.second).T + (0 if layer.bias is None else layer.bias)
            parametrize.register_parametrization(layer, "second", Doubled())
            torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
            parametrize.remove_parametrizations(layer, "second", leave_parametrized=False)
            swapped = {name: 3 * value for name, value in layer.named_parameters()}
            called = torch.func.functional_call(layer, swapped, (x,))
            expected = (x @ swapped["first"].T) @ swapped["second"].T + (0 if layer.bias is None else swapped["bias"])
            torch.testing.assert_close(called, expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(layer(x), plain, rtol=0, atol=0)


def test_low_rank_linear_tol_and_bad_input():
    linear = torch.nn.Linear(30, 20)
    assert LowRankLinear.from_linear(linear, tol=0.9).rank < 20
    with pytest.raises(ValueError, match=r"1 <= k <= 20"):
        LowRankLinear.from_linear(linear, k=21)
    with pytest.raises(ValueError, match="0 < tol < 1"):
        LowRankLinear.from_linear(linear, tol=1.5)


def test_binary_linear_is_the_scaled_sign_product(rng):
    linear = torch.nn.Linear(70, 9)
    layer = BinaryLinear.from_linear(linear).eval()
    x = _x(rng, 4, 70)
    sx = torch.where(x >= 0, 1.0, -1.0)
    w = linear.weight.detach()
    sw = torch.where(w >= 0, 1.0, -1.0)
    expected = (sx @ sw.T) * x.abs().mean(1, keepdim=True) * w.abs().mean(1) + linear.bias.detach()
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    # the plain functions (nothing records) and the torch ops (autograd records) give the same bits
    with torch.no_grad():
        direct = layer(x)
    recorded = layer(x.clone().requires_grad_(True))
    assert recorded.grad_fn is not None and torch.equal(direct, recorded.detach())


def test_binary_linear_trains_through_straight_through_estimator(rng):
    torch.manual_seed(0)
    layer = BinaryLinear(15, 2, trainable=True)
    x = _x(rng, 512, 15)
    teacher = torch.from_numpy(np.where(rng.random(15) < 0.5, 1.0, -1.0).astype(np.float32))
    y = (torch.where(x >= 0, 1.0, -1.0) @ teacher > 0).long()  # a rule 1-bit weights can express exactly
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    first = None
    for _ in range(150):
        optimizer.zero_grad()
        loss = F.cross_entropy(layer(x), y)
        first = first if first is not None else loss.item()
        loss.backward()
        optimizer.step()
    assert loss.item() < first
    layer.eval()  # repacks the bits from the trained latent weight
    assert float((layer(x).argmax(1) == y).float().mean()) > 0.9


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))


def test_compress_report_and_state_dict_round_trip(rng):
    model = _model()
    report = compress(model, k=8)
    assert report.changed == 2
    assert [r.action for r in report.layers] == ["low-rank", "low-rank", "skipped: k > min(in, out) = 4"]
    assert report.params_after < report.params_before
    assert isinstance(model[0], LowRankLinear) and type(model[4]) is torch.nn.Linear
    assert "2 of 3 layers replaced" in str(report)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    fresh = _model()
    compress(fresh, k=8)  # same compressed structure
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer))
    x = _x(rng, 5, 32)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_compress_binary_round_trip(rng):
    model = _model()
    report = compress(model, binary=True, min_params=1000)
    assert [r.action for r in report.layers][:2] == ["binary", "binary"]
    assert report.layers[2].action.startswith("skipped: < min_params")
    assert report.bytes_after < report.bytes_before
    fresh = _model()
    compress(fresh, binary=True, min_params=1000)
    fresh.load_state_dict(model.state_dict())
    x = _x(rng, 3, 32)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_compress_with_no_eligible_layer_changes_nothing():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3))
    report = compress(model, k=4)
    assert report.changed == 0 and report.layers == []
    small = torch.nn.Sequential(torch.nn.Linear(4, 3))
    report = compress(small, k=16)
    assert report.changed == 0 and type(small[0]) is torch.nn.Linear


@pytest.mark.parametrize(
    "kwargs,match",
    [({"k": 0}, "k = 0"), ({"tol": 0.0}, "0 < tol < 1"), ({"tol": 2.0}, "0 < tol < 1"), ({}, "exactly one"), ({"k": 4, "binary": True}, "binary")],
)
def test_compress_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        compress(_model(), **kwargs)


def test_binary_linear_names_the_shapes_of_a_wrong_input():
    layer = BinaryLinear(10, 3)
    for x in (torch.randn(2, 9), torch.randn(10, 2), torch.tensor(1.0)):
        with pytest.raises(cg.ShapeError, match=rf"x {re.escape(str(tuple(x.shape)))} must be \(\.\.\., in_features\) = \(\.\.\., 10\)"):
            layer(x)
    layer.train()
    with pytest.raises(cg.ShapeError, match="in_features"):
        BinaryLinear(10, 3, trainable=True)(torch.randn(2, 9))


def _readme_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(LIAMLinear(784, 256, activation="gelu"), torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))


def test_compress_replaces_liam_linear_keeping_its_activation(rng):
    model = _readme_model()
    original = model[0]
    report = compress(model, k=32)
    assert [(r.name, r.action) for r in report.layers] == [("0", "low-rank"), ("1", "low-rank"), ("3", "skipped: k > min(in, out) = 10")]
    low = model[0]
    assert isinstance(low, LowRankLinear) and low.activation == "gelu" and low.rank == 32
    x = _x(rng, 5, 784)
    torch.testing.assert_close(low(x), F.gelu(F.linear(x, low.weight(), original.bias)), rtol=1e-5, atol=1e-5)
    w = original.weight.detach().double()
    assert report.layers[0].relative_error == pytest.approx(
        float(torch.linalg.norm(w - low.weight().detach().double()) / torch.linalg.norm(w)), rel=1e-3
    )


def test_compress_lists_every_linear_layer_it_leaves(rng):
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 64), torch.nn.MultiheadAttention(64, 4), LIAMLinear(64, 64, activation="relu"), LowRankLinear(64, 64, 4)
    )
    report = compress(model, binary=True)
    actions = {r.name: r.action for r in report.layers}
    assert actions == {
        "0": "binary",
        "1.out_proj": "skipped: NonDynamicallyQuantizableLinear subclasses nn.Linear (its owner may read the weight)",
        "2": "skipped: its relu activation: BinaryLinear has none",
        "3": "skipped: already low-rank",
    }
    assert isinstance(model[0], BinaryLinear) and type(model[2]) is LIAMLinear
    again = compress(model, k=4)
    assert {r.name: r.action for r in again.layers}["0"] == "skipped: already binary"
    assert {r.name: r.action for r in again.layers}["2"] == "low-rank"
    itself = compress(torch.nn.Linear(8, 8), k=2)
    assert itself.changed == 0 and itself.layers[0].action.startswith("skipped: the model itself")
    for r in report.layers + again.layers:
        if r.action.startswith("skipped"):
            assert (r.params_before, r.bytes_before) == (r.params_after, r.bytes_after)


def test_compress_binary_reports_parameters_bits_and_bytes():
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 64))
    report = compress(model, binary=True)
    first = report.layers[0]
    assert (first.params_before, first.params_after, first.sign_bits_after) == (64 * 128 + 128, 128 + 128, 64 * 128)
    assert (first.bytes_before, first.bytes_after) == ((64 * 128 + 128) * 4, 128 * 8 + 2 * 128 * 4)
    assert report.params_after < report.params_before and report.bytes_after < report.bytes_before
    assert report.sign_bits_after == 2 * 64 * 128
    assert model_size(model) == ModelSize(report.params_after, report.sign_bits_after, report.bytes_after)
    text = str(report)
    assert "1-bit weights 16384" in text and f"bytes {report.bytes_before} -> {report.bytes_after}" in text


def test_model_size_counts_inference_state_once():
    linear = torch.nn.Linear(20, 6)
    tied = torch.nn.Sequential(linear, torch.nn.Tanh(), linear)
    assert model_size(tied) == model_size(linear) == ModelSize(126, 0, 504)
    trainable = BinaryLinear.from_linear(linear, trainable=True)
    frozen = BinaryLinear.from_linear(linear)
    assert model_size(trainable) == model_size(frozen) == ModelSize(12, 120, 6 * 3 + 12 * 4)
    norm = torch.nn.BatchNorm1d(6)  # running statistics are buffers: bytes, not parameters
    assert model_size(norm).params == 12 and model_size(norm).nbytes == 12 * 4 + 12 * 4 + 8


@pytest.mark.parametrize("kwargs", [{"k": 4}, {"tol": 0.1}, {"binary": True}])
def test_zero_initialised_layer_is_compressed_without_error(kwargs):
    model = torch.nn.Sequential(torch.nn.Linear(32, 48))
    torch.nn.init.zeros_(model[0].weight)
    report = compress(model, **kwargs)
    assert report.layers[0].relative_error == 0.0
    if "tol" in kwargs:
        assert report.layers[0].rank == 1
    bias = model[0].bias.detach()
    torch.testing.assert_close(model(torch.randn(3, 32)), bias.expand(3, 48), rtol=0, atol=0)  # the layer still adds only its bias

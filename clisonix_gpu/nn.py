"""LIAM layers for PyTorch models, and ``compress(model)`` to swap ``nn.Linear`` layers in place.

- :class:`LIAMLinear`: drop-in ``nn.Linear`` with a fused activation (``transform_matrix``).
- :class:`LowRankLinear`: ``W ≈ U diag(s) Vh`` as two skinny GEMMs, from ``svd_compress``.
- :class:`BinaryLinear`: sign bits of the weight plus a per-row scale; inference binarizes the
  input too (bit = x >= 0, so feed it signed activations such as tanh outputs, not ReLU outputs,
  which would all become +1) and runs the exact XNOR-popcount product (``binary_matmul``). Training uses a
  straight-through estimator: forward with signs, backward as if sign were the identity on
  [-1, 1] (zero gradient outside), on a latent float weight kept only when ``trainable=True``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor, nn

from . import torch as torch_ops
from .ops._validate import require_int, require_number
from .ops.activations import check_activation
from .ops.svd_compress import svd_compress
from .ops.utils import cdiv

__all__ = ["BinaryLinear", "CompressionReport", "LIAMLinear", "LayerReport", "LowRankLinear", "compress"]


def _check_features(in_features: object, out_features: object) -> tuple[int, int]:
    """The layer sizes as ints: ``TypeError`` / ``ValueError`` naming the argument otherwise."""
    return require_int("in_features", in_features, 0), require_int("out_features", out_features, 0)


class LIAMLinear(nn.Linear):
    """``activation(x @ weight.T + bias)`` in one fused op; parameters and state dict as ``nn.Linear``.

    Raises ``ValueError`` for an unknown activation (listing the valid ones).

    Example:

    >>> from clisonix_gpu.nn import LIAMLinear
    >>> layer = LIAMLinear(16, 4, activation="relu")
    >>> y = layer(torch.randn(8, 16))
    >>> y.shape, bool((y >= 0).all())
    (torch.Size([8, 4]), True)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        activation: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        in_features, out_features = _check_features(in_features, out_features)
        check_activation(activation)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = activation

    @classmethod
    def from_linear(cls, linear: nn.Linear, activation: str | None = None) -> LIAMLinear:
        """A LIAMLinear with ``linear``'s weight and bias (copied) followed by ``activation``."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, activation,
                    device=linear.weight.device, dtype=linear.weight.dtype)  # fmt: skip
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        return torch_ops.transform_matrix(x, self.weight, self.bias, self.activation)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", activation={self.activation}"


class LowRankLinear(nn.Module):
    """``x @ (U diag(s) Vh).T + bias`` as ``(x @ Vh.T) @ (U diag(s)).T + bias``: rank ``r`` costs
    ``r * (in + out)`` weights instead of ``in * out``. Parameters: ``first`` (r, in) = Vh,
    ``second`` (out, r) = U diag(s), ``bias`` (out,).

    Example:

    >>> from clisonix_gpu.nn import LowRankLinear
    >>> low = LowRankLinear.from_linear(torch.nn.Linear(64, 32), k=8)
    >>> low.first.shape, low.second.shape
    (torch.Size([8, 64]), torch.Size([32, 8]))
    >>> low(torch.randn(5, 64)).shape
    torch.Size([5, 32])
    """

    bias: nn.Parameter | None
    relative_error: float  # of the compressed weight, set by from_linear

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        activation: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        in_features, out_features = _check_features(in_features, out_features)
        rank = require_int("rank", rank)
        check_activation(activation)
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(
                f"rank = {rank} is out of range for a {out_features}x{in_features} layer: expected 1 <= rank <= {min(in_features, out_features)}"
            )
        self.in_features, self.out_features, self.rank, self.activation = in_features, out_features, rank, activation
        self.first = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.second = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        nn.init.kaiming_uniform_(self.first, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.second, a=math.sqrt(5))

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, k: int | None = None, *, tol: float | None = None, activation: str | None = None, seed: int = 0
    ) -> LowRankLinear:
        """Compress ``linear.weight`` with ``svd_compress(weight, k=k | tol=tol)`` (in float32).

        Raises ``ValueError`` for a rank outside [1, min(in, out)] or tol outside (0, 1).
        """
        weight = linear.weight.detach()
        lr = svd_compress(weight.float().cpu(), k, tol=tol, seed=seed)
        rank = int(lr.ranks) if k is None else k
        layer = cls(linear.in_features, linear.out_features, rank, linear.bias is not None, activation,
                    device=weight.device, dtype=weight.dtype)  # fmt: skip
        with torch.no_grad():
            layer.first.copy_(lr.vh[:rank])
            layer.second.copy_(lr.u[:, :rank] * lr.s[:rank])
            if linear.bias is not None and layer.bias is not None:
                layer.bias.copy_(linear.bias)
        layer.relative_error = float(lr.error_estimate)
        return layer

    def weight(self) -> Tensor:
        """The dense (out, in) weight this layer applies."""
        return self.second @ self.first

    def forward(self, x: Tensor) -> Tensor:
        return torch_ops.transform_matrix(torch_ops.transform_matrix(x, self.first), self.second, self.bias, self.activation)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.bias is not None}, activation={self.activation}"


def _sign_ste(x: Tensor) -> Tensor:
    """+1 where x >= 0 else -1, with the straight-through gradient of clamp(x, -1, 1)."""
    clipped = x.clamp(-1.0, 1.0)
    return clipped + (torch.where(x >= 0, 1.0, -1.0).to(x.dtype) - clipped).detach()


class BinaryLinear(nn.Module):
    """1-bit layer: ``y = scale_x * scale_w * (signs(x) . signs(W)) + bias``, exact in the product.

    Buffers ``weight_bits`` (out, ceil(in/8)) uint8 and ``weight_scale`` (out,) = mean |W| per
    row; with ``trainable=True`` a latent float ``weight`` trains through the straight-through
    estimator and is re-packed when the layer goes to ``eval()``.

    Example:

    >>> from clisonix_gpu.nn import BinaryLinear
    >>> layer = BinaryLinear.from_linear(torch.nn.Linear(20, 3))
    >>> layer.weight_bits.shape, layer.weight_bits.dtype
    (torch.Size([3, 3]), torch.uint8)
    >>> layer(torch.randn(4, 20)).shape
    torch.Size([4, 3])
    """

    weight_bits: Tensor
    weight_scale: Tensor
    bias: nn.Parameter | None
    weight: nn.Parameter | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        trainable: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = _check_features(in_features, out_features)
        self.register_buffer("weight_bits", torch.zeros(out_features, cdiv(in_features, 8), dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype)) if trainable else None
        if self.weight is not None:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            self.pack()

    @classmethod
    def from_linear(cls, linear: nn.Linear, trainable: bool = False) -> BinaryLinear:
        """Sign bits and row scales of ``linear.weight``; its bias is kept as is."""
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, trainable, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            if layer.weight is not None:
                layer.weight.copy_(w)
            layer.pack(w)
            if linear.bias is not None and layer.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    @torch.no_grad()
    def pack(self, weight: Tensor | None = None) -> None:
        """(Re)compute the packed sign bits and scales from ``weight`` (default: the latent weight)."""
        source = self.weight if weight is None else weight
        if source is None:
            raise ValueError("nothing to pack: pass a weight, or build the layer with trainable=True")
        bits, scale = torch_ops.binarize(source.detach())
        self.weight_bits.copy_(bits)
        self.weight_scale.copy_(scale)

    def train(self, mode: bool = True) -> BinaryLinear:
        if not mode and self.weight is not None:
            self.pack()
        return super().train(mode)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        if self.training and self.weight is not None:
            w = _sign_ste(self.weight) * self.weight.abs().mean(dim=1, keepdim=True)
            xb = _sign_ste(rows) * rows.abs().mean(dim=1, keepdim=True)
            y = torch.nn.functional.linear(xb, w, self.bias)
        else:
            bits, scale = torch_ops.binarize(rows)
            dots = torch_ops.binary_matmul(bits, self.weight_bits, self.in_features)
            y = dots.to(x.dtype) * scale[:, None] * self.weight_scale
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(tuple(lead) + (self.out_features,))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, trainable={self.weight is not None}"


# ----------------------------------------------------------------------------- compress


@dataclasses.dataclass
class LayerReport:
    """One ``nn.Linear`` considered by :func:`compress`.

    Example:

    >>> from clisonix_gpu.nn import compress
    >>> model = torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.Tanh(), torch.nn.Linear(128, 10))
    >>> first, last = compress(model, k=16).layers
    >>> first.name, first.action, first.rank, first.params_before, first.params_after
    ('0', 'low-rank', 16, 32896, 6272)
    >>> last.action  # doctest: +ELLIPSIS
    'skipped: ...'
    """

    name: str
    shape: tuple[int, int]  # (out, in)
    action: str  # "low-rank", "binary" or "skipped: <why>"
    rank: int | None
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    relative_error: float | None  # relative Frobenius error of the replaced weight


@dataclasses.dataclass
class CompressionReport:
    """What :func:`compress` did, layer by layer. ``changed`` is 0 when nothing was replaced.

    Example:

    >>> from clisonix_gpu.nn import compress
    >>> model = torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.Tanh(), torch.nn.Linear(128, 10))
    >>> report = compress(model, k=16)
    >>> report.changed, report.params_before, report.params_after
    (1, 34186, 7562)
    """

    layers: list[LayerReport]

    @property
    def changed(self) -> int:
        return sum(not r.action.startswith("skipped") for r in self.layers)

    def _total(self, field: str) -> int:
        return sum(getattr(r, field) for r in self.layers)

    params_before = property(lambda self: self._total("params_before"))
    params_after = property(lambda self: self._total("params_after"))
    bytes_before = property(lambda self: self._total("bytes_before"))
    bytes_after = property(lambda self: self._total("bytes_after"))

    def __str__(self) -> str:
        lines = [f"{'layer':<24} {'shape':>12} {'action':<28} {'rank':>5} {'params':>18} {'rel. error':>10}"]
        for r in self.layers:
            err = "" if r.relative_error is None else f"{r.relative_error:.3g}"
            rank = "" if r.rank is None else str(r.rank)
            lines.append(f"{r.name:<24} {str(r.shape):>12} {r.action:<28} {rank:>5} {f'{r.params_before} -> {r.params_after}':>18} {err:>10}")
        lines.append(
            f"{self.changed} of {len(self.layers)} layers replaced; parameters {self.params_before} -> {self.params_after}, bytes {self.bytes_before} -> {self.bytes_after}"
        )
        return "\n".join(lines)


def _linears(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Linear]]:
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            if type(child) is nn.Linear:  # not our subclasses: they are already LIAM layers
                yield (f"{parent_name}.{child_name}" if parent_name else child_name), parent, child_name, child


def compress(
    model: nn.Module, k: int | None = None, *, tol: float | None = None, min_params: int = 0, binary: bool = False, trainable: bool = False
) -> CompressionReport:
    """Replace eligible ``nn.Linear`` layers of ``model`` in place and report what changed.

    Low-rank (``k=`` or ``tol=``, exactly one): a layer is replaced by :class:`LowRankLinear` when
    it has at least ``min_params`` weights and the rank saves parameters; others are listed as
    skipped with the reason (e.g. ``k`` above ``min(in, out)``). ``binary=True`` (no k/tol)
    replaces them by :class:`BinaryLinear` instead (``trainable=True`` keeps latent weights for
    straight-through fine-tuning). A model with no eligible layer is left as it
    is and the report says so (``report.changed == 0``). Raises ``ValueError`` for k < 1, tol
    outside (0, 1), or a wrong combination of k, tol and binary; ``TypeError`` (naming the
    argument) when ``model`` is not a module or k, tol, min_params, binary or trainable has the
    wrong type.

    Example:

    >>> from clisonix_gpu.nn import compress
    >>> model = torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.Tanh(), torch.nn.Linear(128, 10))
    >>> report = compress(model, k=16)
    >>> type(model[0]).__name__, type(model[2]).__name__  # the last layer is too small to gain
    ('LowRankLinear', 'Linear')
    >>> model(torch.randn(2, 256)).shape
    torch.Size([2, 10])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    for flag, value in (("binary", binary), ("trainable", trainable)):
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{flag} must be a bool; got {type(value).__name__}")
    min_params = require_int("min_params", min_params, 0)
    if binary and (k is not None or tol is not None):
        raise ValueError("binary=True takes neither k nor tol")
    if not binary and (k is None) == (tol is None):
        raise ValueError(f"give exactly one of k or tol (or binary=True); got k={k}, tol={tol}")
    if k is not None:
        k = require_int("k", k, 1)
    if tol is not None and not 0 < require_number("tol", tol) < 1:
        raise ValueError(f"tol = {tol!r} is out of range: expected 0 < tol < 1")
    reports = []
    for name, parent, child_name, linear in list(_linears(model)):
        out_f, in_f = linear.weight.shape
        bias = linear.bias is not None
        before = out_f * in_f + (out_f if bias else 0)
        item = linear.weight.element_size()
        skip = None
        if out_f * in_f < min_params:
            skip = f"skipped: < min_params ({out_f * in_f})"
        elif k is not None and k > min(in_f, out_f):
            skip = f"skipped: k > min(in, out) = {min(in_f, out_f)}"
        elif k is not None and k * (in_f + out_f) >= in_f * out_f:
            skip = "skipped: rank saves nothing"
        if skip:
            reports.append(LayerReport(name, (out_f, in_f), skip, None, before, before, before * item, before * item, None))
            continue
        layer: nn.Module
        if binary:
            packed = layer = BinaryLinear.from_linear(linear, trainable=trainable)
            w = linear.weight.detach().float()
            approx = torch.where(w >= 0, 1.0, -1.0) * w.abs().mean(1, keepdim=True)
            err = float(torch.linalg.norm(w - approx) / torch.linalg.norm(w))
            after_bytes = packed.weight_bits.numel() + (packed.weight_scale.numel() + (out_f if bias else 0)) * item
            reports.append(
                LayerReport(
                    name, (out_f, in_f), "binary", None, before, out_f * in_f + out_f + (out_f if bias else 0), before * item, after_bytes, err
                )
            )
        else:
            low = layer = LowRankLinear.from_linear(linear, k, tol=tol)
            if low.rank * (in_f + out_f) >= in_f * out_f:  # tol asked for more than it saves
                reports.append(
                    LayerReport(name, (out_f, in_f), "skipped: rank saves nothing", low.rank, before, before, before * item, before * item, None)
                )
                continue
            after = low.rank * (in_f + out_f) + (out_f if bias else 0)
            reports.append(LayerReport(name, (out_f, in_f), "low-rank", low.rank, before, after, before * item, after * item, low.relative_error))
        setattr(parent, child_name, layer)
    return CompressionReport(reports)

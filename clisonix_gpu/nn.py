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
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from . import _dispatch
from . import torch as torch_ops
from .errors import ShapeError
from .ops import binary as _binary
from .ops import transform_matrix as _tm
from .ops._validate import require_int, require_number
from .ops.activations import check_activation
from .ops.svd_compress import svd_compress
from .ops.utils import cdiv

__all__ = ["BinaryLinear", "CompressionReport", "LIAMLinear", "LayerReport", "LowRankLinear", "ModelSize", "compress", "model_size"]


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
        first, second, bias = _registered(self, "first"), _registered(self, "second"), _registered(self, "bias")
        out: Tensor | None = _tm.low_rank_call_shortcut(x, first, second, bias, self.activation)
        if out is not None:
            return out
        return torch_ops.transform_matrix(torch_ops.transform_matrix(x, first), second, bias, self.activation)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.bias is not None}, activation={self.activation}"


def _registered(module: nn.Module, name: str) -> Any:
    """``getattr(module, name)``, from the module's parameters where ``name`` is one: a layer's
    call is short, and ``Module.__getattr__`` costs about 0.5 us a name. A name it does not hold
    (a parametrization, which moves the parameter away, or a plain attribute) goes to getattr."""
    value = module._parameters.get(name)
    return value if value is not None else getattr(module, name)


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
        """``x`` (..., in_features) float -> (..., out_features); ``ShapeError`` for another last
        dimension, ``TypeError`` when ``x`` is not a dense CPU/CUDA tensor."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor; got {'None' if x is None else type(x).__name__}")
        _dispatch.array_kind(x, "x")
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ShapeError(f"x {tuple(x.shape)} must be (..., in_features) = (..., {self.in_features}) for {self!r}")
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        if self.training and self.weight is not None:
            w = _sign_ste(self.weight) * self.weight.abs().mean(dim=1, keepdim=True)
            xb = _sign_ste(rows) * rows.abs().mean(dim=1, keepdim=True)
            y = torch.nn.functional.linear(xb, w, self.bias)
        else:
            # the plain functions where nothing records or traces: torch's op dispatch costs about
            # 0.3 ms a call on CPU, more than the 1-bit work of a small layer
            direct = _tm.torch_op_route(rows, self.weight_bits) is None and not _tm.modes_active(torch)
            ops = _binary if direct else torch_ops
            bits, scale = ops.binarize(rows)
            dots = ops.binary_matmul(bits, self.weight_bits, self.in_features)
            y = dots.to(x.dtype) * scale[:, None] * self.weight_scale
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(tuple(lead) + (self.out_features,))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, trainable={self.weight is not None}"


# ----------------------------------------------------------------------------- sizes


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """What a model stores for inference (see :func:`model_size`).

    ``params``: floating-point values (parameters, and the per-row scales of :class:`BinaryLinear`);
    ``sign_bits``: the 1-bit weights of :class:`BinaryLinear` layers, one per weight; ``nbytes``: the
    bytes of both plus any other buffers.

    Example:

    >>> from clisonix_gpu.nn import BinaryLinear, model_size
    >>> model_size(torch.nn.Linear(64, 32))
    ModelSize(params=2080, sign_bits=0, nbytes=8320)
    >>> model_size(BinaryLinear.from_linear(torch.nn.Linear(64, 32)))  # 32 scales + 32 biases, 64 x 32 bits
    ModelSize(params=64, sign_bits=2048, nbytes=512)
    """

    params: int
    sign_bits: int
    nbytes: int

    def __add__(self, other: ModelSize) -> ModelSize:
        return ModelSize(self.params + other.params, self.sign_bits + other.sign_bits, self.nbytes + other.nbytes)


def model_size(model: nn.Module) -> ModelSize:
    """The parameters, 1-bit weights and bytes ``model`` needs for inference (a :class:`ModelSize`).

    Tensors shared between modules count once. The latent float weight of a
    ``BinaryLinear(trainable=True)`` is training state (the forward in ``eval()`` never reads it) and
    is not counted; drop it with ``layer.weight = None`` once training is done.

    Example:

    >>> from clisonix_gpu.nn import LowRankLinear, model_size
    >>> model_size(LowRankLinear.from_linear(torch.nn.Linear(64, 32), k=4))  # 4 x 64 + 32 x 4 + 32 bias
    ModelSize(params=416, sign_bits=0, nbytes=1664)
    """
    params = sign_bits = nbytes = 0
    seen: set[int] = set()
    for module in model.modules():
        tensors = [(t, True) for t in module.parameters(recurse=False)] + [(t, False) for t in module.buffers(recurse=False)]
        for t, is_param in tensors:
            if id(t) in seen or (isinstance(module, BinaryLinear) and t is module.weight):
                continue
            seen.add(id(t))
            nbytes += t.numel() * t.element_size()
            if isinstance(module, BinaryLinear) and t is module.weight_bits:
                sign_bits += module.in_features * module.out_features
            elif is_param or (isinstance(module, BinaryLinear) and t is module.weight_scale):
                params += t.numel()
    return ModelSize(params, sign_bits, nbytes)


# ----------------------------------------------------------------------------- compress


@dataclasses.dataclass
class LayerReport:
    """One linear layer of the model, as :func:`compress` found it and left it.

    ``params_*`` count floating-point values and ``sign_bits_after`` the 1-bit weights of a binary
    layer (see :class:`ModelSize`); ``bytes_*`` are what the layer stores. A skipped layer has
    ``action`` "skipped: <why>" and equal before/after sizes.

    Example:

    >>> from clisonix_gpu.nn import compress
    >>> model = torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.Tanh(), torch.nn.Linear(128, 10))
    >>> first, last = compress(model, k=16).layers
    >>> first.name, first.action, first.rank, first.params_before, first.params_after
    ('0', 'low-rank', 16, 32896, 6272)
    >>> last.action  # doctest: +ELLIPSIS
    'skipped: ...'
    >>> binary = compress(torch.nn.Sequential(torch.nn.Linear(256, 128)), binary=True).layers[0]
    >>> binary.params_after, binary.sign_bits_after, binary.bytes_before, binary.bytes_after
    (256, 32768, 131584, 5120)
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
    sign_bits_after: int = 0


@dataclasses.dataclass
class CompressionReport:
    """What :func:`compress` did, layer by layer. ``changed`` is 0 when nothing was replaced.

    Totals: ``params_before`` / ``params_after`` (floating-point values), ``sign_bits_after``
    (1-bit weights), ``bytes_before`` / ``bytes_after``, over the layers listed.

    Example:

    >>> from clisonix_gpu.nn import compress
    >>> model = torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.Tanh(), torch.nn.Linear(128, 10))
    >>> report = compress(model, k=16)
    >>> report.changed, report.params_before, report.params_after, report.bytes_before, report.bytes_after
    (1, 34186, 7562, 136744, 30248)
    """

    layers: list[LayerReport]

    @property
    def changed(self) -> int:
        return sum(not r.action.startswith("skipped") for r in self.layers)

    def _total(self, field: str) -> int:
        return sum(getattr(r, field) for r in self.layers)

    params_before = property(lambda self: self._total("params_before"))
    params_after = property(lambda self: self._total("params_after"))
    sign_bits_after = property(lambda self: self._total("sign_bits_after"))
    bytes_before = property(lambda self: self._total("bytes_before"))
    bytes_after = property(lambda self: self._total("bytes_after"))

    def __str__(self) -> str:
        header = ("layer", "shape", "rank", "float params", "1-bit", "bytes", "rel. err", "action")
        rows = [header] + [
            (r.name, str(r.shape), "" if r.rank is None else str(r.rank), f"{r.params_before} -> {r.params_after}",
             str(r.sign_bits_after or ""), f"{r.bytes_before} -> {r.bytes_after}",
             "" if r.relative_error is None else f"{r.relative_error:.3g}", r.action)
            for r in self.layers
        ]  # fmt: skip
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ["  ".join([row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:-1], widths[1:-1])] + [row[-1]]) for row in rows]
        smaller = f" ({self.bytes_before / self.bytes_after:.1f}x smaller)" if self.changed and self.bytes_after else ""
        bits = f", 1-bit weights {self.sign_bits_after}" if self.sign_bits_after else ""
        lines.append(
            f"{self.changed} of {len(self.layers)} layers replaced; float parameters {self.params_before} -> {self.params_after}{bits}, "
            f"bytes {self.bytes_before} -> {self.bytes_after}{smaller}"
        )
        return "\n".join(lines)


_REPLACEABLE = (nn.Linear, LIAMLinear)  # exact types: a subclass may read its weight elsewhere


def _linear_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module | None, str, nn.Linear | LowRankLinear | BinaryLinear]]:
    """Every linear layer of ``model`` (nn.Linear and its subclasses, and our layers) as
    ``(qualified name, parent, attribute name, layer)``; the parent is None for the model itself."""
    kinds = (nn.Linear, LowRankLinear, BinaryLinear)
    if isinstance(model, kinds):
        yield "(the model itself)", None, "", model
        return
    for parent_name, parent in model.named_modules():
        if isinstance(parent, kinds):
            continue  # our layers hold no linear children
        for child_name, child in parent.named_children():
            if isinstance(child, kinds):
                yield (f"{parent_name}.{child_name}" if parent_name else child_name), parent, child_name, child


def _skip_reason(layer: nn.Module, parent: nn.Module | None, k: int | None, binary: bool, min_params: int) -> str | None:
    if isinstance(layer, LowRankLinear):
        return "already low-rank"
    if isinstance(layer, BinaryLinear):
        return "already binary"
    if parent is None:
        return "the model itself: compress a module that holds it"
    if type(layer) not in _REPLACEABLE:
        return f"{type(layer).__name__} subclasses nn.Linear (its owner may read the weight)"
    assert isinstance(layer, nn.Linear)
    out_f, in_f = layer.weight.shape
    activation = getattr(layer, "activation", None)
    if out_f * in_f < min_params:
        return f"< min_params ({out_f * in_f})"
    if binary and activation is not None:
        return f"its {activation} activation: BinaryLinear has none"
    if k is not None and k > min(in_f, out_f):
        return f"k > min(in, out) = {min(in_f, out_f)}"
    if k is not None and k * (in_f + out_f) >= in_f * out_f:
        return "rank saves nothing"
    return None


def _binary_error(weight: Tensor) -> float:
    """|W - sign(W) * mean|W| per row|_F / |W|_F, the relative error of the binary weight; a zero
    weight is reproduced exactly (error 0)."""
    approx = torch.where(weight >= 0, 1.0, -1.0) * weight.abs().mean(1, keepdim=True)
    norm = float(torch.linalg.norm(weight))
    return float(torch.linalg.norm(weight - approx)) / norm if norm > 0 else 0.0


def compress(
    model: nn.Module, k: int | None = None, *, tol: float | None = None, min_params: int = 0, binary: bool = False, trainable: bool = False
) -> CompressionReport:
    """Replace eligible linear layers of ``model`` in place and report every linear layer.

    Eligible: ``nn.Linear`` and :class:`LIAMLinear` (exactly those types) with at least
    ``min_params`` weights. Low-rank (``k=`` or ``tol=``, exactly one): replaced by
    :class:`LowRankLinear` (a LIAMLinear keeps its activation) when the rank saves parameters.
    ``binary=True`` (no k/tol) replaces them by :class:`BinaryLinear` (``trainable=True`` keeps
    latent weights for straight-through fine-tuning); a LIAMLinear with an activation stays, as
    BinaryLinear has none. Every layer not replaced is listed with the reason: too small, ``k``
    above ``min(in, out)``, a rank that saves nothing, already compressed, or an ``nn.Linear``
    subclass (such as ``nn.MultiheadAttention.out_proj``, whose owner reads the weight directly).
    A model with no eligible layer is left as it is (``report.changed == 0``). Sizes in the
    report are those of :func:`model_size`. Raises ``ValueError`` for k < 1, tol outside (0, 1), or
    a wrong combination of k, tol and binary; ``TypeError`` (naming the argument) when ``model``
    is not a module or k, tol, min_params, binary or trainable has the wrong type.

    Example:

    >>> from clisonix_gpu.nn import LIAMLinear, compress
    >>> model = torch.nn.Sequential(LIAMLinear(256, 128, activation="tanh"), torch.nn.Linear(128, 10))
    >>> report = compress(model, k=16)
    >>> type(model[0]).__name__, model[0].activation, type(model[1]).__name__  # the last layer is too small to gain
    ('LowRankLinear', 'tanh', 'Linear')
    >>> [layer.action for layer in report.layers]
    ['low-rank', 'skipped: k > min(in, out) = 10']
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
    for name, parent, child_name, linear in list(_linear_layers(model)):
        before = model_size(linear)
        shape = (linear.out_features, linear.in_features)

        def unchanged(reason: str, rank: int | None = None) -> LayerReport:
            return LayerReport(
                name, shape, f"skipped: {reason}", rank, before.params, before.params, before.nbytes, before.nbytes, None, before.sign_bits
            )

        reason = _skip_reason(linear, parent, k, binary, min_params)
        if reason is not None:
            reports.append(unchanged(reason))
            continue
        assert isinstance(linear, nn.Linear) and parent is not None
        layer: nn.Module
        if binary:
            layer = BinaryLinear.from_linear(linear, trainable=trainable)
            action, rank, err = "binary", None, _binary_error(linear.weight.detach().float())
        else:
            low = layer = LowRankLinear.from_linear(linear, k, tol=tol, activation=getattr(linear, "activation", None))
            if low.rank * (shape[0] + shape[1]) >= shape[0] * shape[1]:  # tol asked for more than it saves
                reports.append(unchanged("rank saves nothing", low.rank))
                continue
            action, rank, err = "low-rank", low.rank, low.relative_error
        after = model_size(layer)
        reports.append(LayerReport(name, shape, action, rank, before.params, after.params, before.nbytes, after.nbytes, err, after.sign_bits))
        setattr(parent, child_name, layer)
    return CompressionReport(reports)

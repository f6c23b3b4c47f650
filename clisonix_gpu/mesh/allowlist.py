"""The ops a worker serves (the allowlist), their integer parameters and the bounds of each.

Both ends check a request against this table: the edge before anything is sent (so a bad
parameter is the caller's ``ValueError``/``TypeError``, not a worker's failure), and the worker
again on arrival (so a hand-made message cannot ask for unbounded work).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ..ops.activations import ACTIVATIONS
from ..ops.binary import binary_matmul, hamming_distance, hamming_topk, pack_bits
from ..ops.svd_compress import svd_compress
from ..ops.transform_matrix import transform_matrix
from . import wire

INT32_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Param:
    """An integer parameter of an op: its name, inclusive bounds and default (None: required)."""

    name: str
    low: int
    high: int
    default: int | None = None


@dataclasses.dataclass(frozen=True)
class Op:
    name: str
    fn: Callable[..., Any]
    n_tensors: tuple[int, int]  # allowed tensor count (min, max)
    params: tuple[Param, ...] = ()  # in header order

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def check_params(self, values: Sequence[int]) -> None:
        """``ValueError`` naming the first parameter outside its bounds."""
        for p, v in zip(self.params, values):
            if not p.low <= v <= p.high:
                raise ValueError(f"{self.name}: parameter {p.name}={v} outside the mesh's bounds [{p.low}, {p.high}]")


def _transform_matrix(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *, activation: int = 0) -> tuple[torch.Tensor]:
    return (transform_matrix(x, w, bias, activation=ACTIVATIONS[activation]),)


def _svd_compress(a: torch.Tensor, *, k: int, oversample: int, power_iters: int, seed: int) -> tuple[torch.Tensor, ...]:
    lr = svd_compress(a, k, oversample=oversample, power_iters=power_iters, seed=seed)
    return lr.u, lr.s, lr.vh


def _hamming_topk(q: torch.Tensor, db: torch.Tensor, *, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    distances, indices = hamming_topk(q, db, k)
    return distances, indices


# The allowlist: op id -> op. Parameters travel as int64; activation by its index in ACTIVATIONS.
# The bounds keep one request's work finite; the ops check the rest (e.g. k against the shape).
OPS: dict[int, Op] = {
    2: Op("transform_matrix", _transform_matrix, (2, 3), (Param("activation", 0, len(ACTIVATIONS) - 1, 0),)),
    3: Op("binary_matmul", lambda a, b, *, n: (binary_matmul(a, b, n),), (2, 2), (Param("n", 0, INT32_MAX),)),
    4: Op("hamming_distance", lambda a, b: (hamming_distance(a, b),), (2, 2)),
    5: Op("hamming_topk", _hamming_topk, (2, 2), (Param("k", 1, INT32_MAX),)),
    6: Op("pack_bits", lambda x: (pack_bits(x),), (1, 1)),
    # the tensors themselves: a worker's reply copies them out, a local run copies its results
    7: Op("identity", lambda *ts: ts, (1, wire.MAX_TENSORS)),
    8: Op(
        "svd_compress",
        _svd_compress,
        (1, 1),
        (Param("k", 1, 65536), Param("oversample", 0, 1024, 10), Param("power_iters", 0, 64, 2), Param("seed", 0, 2**63 - 1, 0)),
    ),
}
OP_IDS = {op.name: i for i, op in OPS.items()}
assert not {wire.SHUTDOWN, wire.HELLO} & set(OPS), "op ids must not collide with control codes"


def encode_request(op: str, tensors: Sequence[Any], params: dict[str, Any]) -> tuple[int, list[int]]:
    """(op id, parameter values in header order) of a call, checked against the allowlist:
    ``ValueError`` for an unknown op, activation or a parameter out of bounds, ``TypeError`` for
    wrong parameter names or types, tensor counts or dtypes the mesh cannot carry."""
    if op not in OP_IDS:
        raise ValueError(f"unknown op {op!r}; the mesh serves {sorted(OP_IDS)}")
    spec = OPS[OP_IDS[op]]
    values = {p.name: p.default for p in spec.params if p.default is not None} | params
    if op == "transform_matrix":
        activation = params.get("activation")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
        values["activation"] = ACTIVATIONS.index(activation)
    if set(values) != set(spec.param_names):
        raise TypeError(f"{op} takes parameters {spec.param_names}; got {sorted(values)}")
    if not spec.n_tensors[0] <= len(tensors) <= spec.n_tensors[1]:
        raise TypeError(f"{op} takes {spec.n_tensors[0]}..{spec.n_tensors[1]} tensors; got {len(tensors)}")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor) or t.dtype not in wire.DTYPE_CODE:
            raise TypeError(f"tensor {i} of {op}: the mesh carries torch tensors of {wire.DTYPES}; got {getattr(t, 'dtype', type(t))}")
        if t.ndim > wire.MAX_NDIM:
            raise ValueError(f"tensor {i} of {op}: at most {wire.MAX_NDIM} dimensions; got shape {tuple(t.shape)}")
    for name in spec.param_names:
        if isinstance(values[name], bool) or not isinstance(values[name], (int, np.integer)):
            raise TypeError(f"{op}: parameter {name} must be an int; got {values[name]!r}")
    encoded = [int(values[name]) for name in spec.param_names]
    spec.check_params(encoded)
    return OP_IDS[op], encoded


def limits_table() -> str:
    """The parameter bounds as a Markdown table (docs/mesh.md shows it; a test keeps them equal)."""
    rows = ["| op | parameter | bounds | default |", "|---|---|---|---|"]
    for op in OPS.values():
        for p in op.params:
            if (op.name, p.name) == ("transform_matrix", "activation"):  # travels as an index; callers pass the name
                rows.append(f"| `{op.name}` | `{p.name}` | one of {', '.join(map(repr, ACTIVATIONS))} | None |")
            else:
                rows.append(f"| `{op.name}` | `{p.name}` | {p.low} to {p.high} | {'required' if p.default is None else p.default} |")
    return "\n".join(rows)

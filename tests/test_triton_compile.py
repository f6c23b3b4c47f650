"""Every Triton kernel compiles for an H100/H200 (sm_90) down to a cubin, with the constexpr
choices its launcher makes on CUDA, on machines without a GPU too.

The interpreter runs the kernels' arithmetic but never the GPU compiler: the ``tl.dot`` branches
(``INTERPRETER_DOT=False``), hardware popcount and type rules of the compiled path are checked
here. Compilation runs in a child process without ``TRITON_INTERPRET``, once for all cases, with
the installed Triton and with the Triton of the lent GPU machines' image (``make test`` puts it in
``.triton-gpu-image``), whose rules differ (e.g. Triton 3.6 needs ``out_dtype`` for a float64
``tl.dot``).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clisonix_gpu.ops import svd_compress as svd_module
from clisonix_gpu.ops import transform_matrix as transform_matrix_module

# On a GPU the other tests compile and run every kernel; this check is for machines without one.
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device compiles and runs the kernels in the other tests")

_ARCH = 90  # sm_90: the H100/H200 the GPU checks run on
_SHARED_LIMIT = 232448  # bytes of shared memory one block may use on sm_90


def _pointers(names, dtype):
    return {name: f"*{dtype}" for name in names}


def _ints(names, kind="i32"):
    return {name: kind for name in names}


def _cases():
    """(case id, kernel module, kernel name, signature, constexprs, options) for every compiled variant."""
    cases = []
    tm_args = {**_pointers(["x_ptr", "w_ptr", "bias_ptr", "out_ptr"], "{dt}"),
               **_ints(["M", "N", "K", "stride_xb", "stride_xm", "stride_wb", "stride_wn", "stride_ob", "stride_om"])}  # fmt: skip
    names = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "fp64": "float64"}
    block_k = {dt: transform_matrix_module.BLOCK_K[name] for dt, name in names.items()}
    svd = svd_module
    for dt, activation, precision, tile in [
        ("fp32", "", "ieee", (128, 256, 8, 3)),
        ("fp32", "relu", "tf32", (64, 64, 4, 4)),
        ("fp16", "gelu", "ieee", (128, 128, 8, 4)),
        ("bf16", "silu", "ieee", (16, 64, 4, 4)),
        ("bf16", "gelu_tanh", "ieee", (128, 256, 8, 3)),
        ("fp64", "tanh", "ieee", (64, 64, 4, 4)),
        ("fp32", "leaky_relu", "ieee", (32, 64, 4, 4)),
        ("fp16", "sigmoid", "ieee", (64, 256, 4, 4)),
    ]:
        bm, bn, warps, stages = tile
        signature = {k: v.format(dt=dt) for k, v in tm_args.items()}
        constexprs = {"HAS_BIAS": activation != "", "ACTIVATION": activation, "DOT_PRECISION": precision, "INTERPRETER_DOT": False,
                      "ACC_FP64": dt == "fp64", "BLOCK_K": block_k[dt], "BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}  # fmt: skip
        cases.append((f"transform_matrix-{dt}-{activation or 'none'}-{bm}x{bn}", "transform_matrix", "transform_matrix_kernel",
                      signature, constexprs, {"num_warps": warps, "num_stages": stages}))  # fmt: skip
    for dt, rule in [("fp32", "positive"), ("bf16", "nonnegative"), ("u8", "nonzero"), ("i64", "positive")]:
        signature = {"x_ptr": f"*{dt}", "out_ptr": "*u8", **_ints(["R", "n", "W", "stride_xr", "stride_or"])}
        cases.append((f"pack_bits-{dt}-{rule}", "binary", "pack_bits_kernel", signature,
                      {"RULE": rule, "BLOCK_R": 16, "BLOCK_W": 16}, {"num_warps": 4}))  # fmt: skip
    cases.append(("unpack_bits", "binary", "unpack_bits_kernel", {"bits_ptr": "*u8", "out_ptr": "*u8", **_ints(["R", "n", "stride_br", "stride_or"])},
                  {"BLOCK_R": 16, "BLOCK_C": 64}, {"num_warps": 4}))  # fmt: skip
    for signed in (True, False):
        signature = {**_pointers(["a_ptr", "b_ptr", "out_ptr"], "i32"), **_ints(["M", "N", "words", "n_bits", "stride_am", "stride_bn", "stride_om"])}
        cases.append((f"popcount_gemm-{'signed' if signed else 'hamming'}", "binary", "popcount_gemm_kernel", signature,
                      {"SIGNED_DOT": signed, "HW_POPC": True, "BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_W": 8}, {"num_warps": 4}))  # fmt: skip
    for dt, tile in [("fp32", (128, 8, 3)), ("fp32", (32, 4, 4)), ("fp64", (64, 4, 4))]:
        bm, warps, stages = tile
        bk = svd._SKETCH_BLOCK_K
        signature = {
            **_pointers(["a_ptr", "y_ptr"], dt),
            **_ints(["M", "N", "L", "stride_ab", "stride_am", "stride_yb", "stride_ym"]),
            "seed_mix": "i64",
        }
        cases.append((f"sketch_matmul-{dt}-{bm}x{bk}", "svd_compress", "sketch_matmul_kernel", signature,
                      {"INTERPRETER_DOT": False, "ACC_FP64": dt == "fp64", "BLOCK_L": 64, "BLOCK_M": bm, "BLOCK_K": bk},
                      {"num_warps": warps, "num_stages": stages}))  # fmt: skip
    for dt, (bm, bl) in [("fp32", (64, 32)), ("fp32", (256, 16)), ("fp64", (64, 32)), ("fp32", (16, 16))]:
        signature = {**_pointers(["y_ptr", "q_ptr", "r_ptr"], dt), **_ints(["M", "L", "stride_yb", "stride_ym", "stride_yl"])}
        warps = svd._qr_warps(bm, bl, 8 if dt == "fp64" else 4)
        cases.append((f"householder_qr-{dt}-{bm}x{bl}", "svd_compress", "householder_qr_kernel", signature,
                      {"ACC_FP64": dt == "fp64", "BLOCK_M": bm, "BLOCK_L": bl}, {"num_warps": warps}))  # fmt: skip
    return cases


def _compile_all() -> None:
    """Child process: compile every case, print {case id: error text or shared-memory bytes}."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    results = {}
    for case_id, module, name, signature, constexprs, options in _cases():
        kernel = getattr(importlib.import_module(f"clisonix_gpu.kernels.{module}"), name)
        while not isinstance(kernel, triton.runtime.JITFunction):
            kernel = kernel.fn  # the JITFunction under @triton.autotune
        try:
            sig = {**signature, **{k: "constexpr" for k in constexprs}}
            compiled = triton.compile(
                ASTSource(fn=kernel, signature=sig, constexprs=constexprs), target=GPUTarget("cuda", _ARCH, 32), options=options
            )
            results[case_id] = {"cubin": len(compiled.asm["cubin"]), "shared": compiled.metadata.shared}
        except Exception as exc:  # reported per case by the test
            results[case_id] = {"error": f"{type(exc).__name__}: {exc}"[-3000:]}
    print(json.dumps({"version": triton.__version__, "cases": results}))


_ROOT = Path(__file__).resolve().parent.parent
_TRITONS = {"installed": None, "gpu-image": _ROOT / ".triton-gpu-image"}  # None: the environment's own
_COMPILED: dict[str, dict[str, dict[str, object]]] = {}


def _compiled(triton_name: str) -> dict[str, dict[str, object]]:
    """{case id: result} from one child process per Triton, compiled once per test session."""
    if triton_name not in _COMPILED:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default the kernels were written for
        site = _TRITONS[triton_name]
        if site is not None:
            if not (site / "triton").is_dir():
                pytest.skip(f"{site.name} is missing: `make test` installs the GPU image's Triton there")
            env["PYTHONPATH"] = os.pathsep.join([str(site), str(_ROOT), env.get("PYTHONPATH", "")])
        proc = subprocess.run(
            [sys.executable, "-c", "import test_triton_compile as t; t._compile_all()"],
            cwd=Path(__file__).parent, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:]
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        if site is not None:  # the child must have compiled with that Triton, not the environment's
            assert [f"triton-{report['version']}.dist-info"] == [p.name for p in site.glob("triton-*.dist-info")]
        _COMPILED[triton_name] = report["cases"]
    return _COMPILED[triton_name]


@pytest.mark.parametrize("case_id", [case[0] for case in _cases()])
@pytest.mark.parametrize("triton_name", list(_TRITONS))
def test_kernel_compiles_for_sm90(triton_name, case_id):
    result = _compiled(triton_name)[case_id]
    assert "error" not in result, result.get("error")
    assert result["cubin"] > 0 and result["shared"] <= _SHARED_LIMIT  # type: ignore[operator]

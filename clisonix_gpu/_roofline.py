"""Roofline prices: the least time an H200 allows for a benchmark case.

A case does ``ops`` operations at one compute ceiling (a matmul dtype, or 32-bit popcounts) and
moves ``bytes`` through HBM; it cannot finish before ``max(ops / compute, bytes / bandwidth)``.
The GPU benchmark measures the ceilings it can (bench/conftest.py); the others, and every
ceiling when no GPU run exists, come from :data:`H200_CEILINGS`.
"""

from __future__ import annotations

from collections.abc import Mapping

# Documented defaults for an H200 SXM. Tensor-core rates are dense (no sparsity).
H200_CEILINGS: dict[str, float] = {
    "bf16_matmul_TFLOPs": 790.0,  # measured on the H200 lent to this project: cuBLAS bf16 GEMM 8192^3 (datasheet: 989)
    "fp16_matmul_TFLOPs": 790.0,  # Hopper runs fp16 and bf16 MMA at one rate
    "tf32_matmul_TFLOPs": 495.0,  # datasheet
    "fp32_matmul_TFLOPs": 67.0,  # datasheet, FFMA (fp32 "ieee" products run on the CUDA cores)
    "fp64_matmul_TFLOPs": 67.0,  # datasheet, fp64 tensor core (DMMA)
    "popc_Tops": 4.18,  # 132 SMs x 16 32-bit POPC per clock (CUDA C Programming Guide, cc 9.0) x 1.98 GHz
    "copy_GBps": 4300.0,  # a device-to-device copy reaches about 4.3 of the 4.8 TB/s HBM3e peak
}
_SCALE = {"TFLOPs": 1e12, "Tops": 1e12, "GBps": 1e9}


def ceiling_rate(name: str, ceilings: Mapping[str, float] | None = None) -> float:
    """Operations (or bytes) per second of ceiling ``name``: measured when given, else the default."""
    value = (ceilings or {}).get(name) or H200_CEILINGS[name]
    return value * _SCALE[name.rsplit("_", 1)[1]]


def best_seconds(ceiling: str, ops: float, nbytes: float, ceilings: Mapping[str, float] | None = None) -> float:
    """``max(ops / compute ceiling, bytes / copy bandwidth)`` in seconds.

    ``ceiling`` names a compute entry of :data:`H200_CEILINGS`; ``ceilings`` holds measured values
    that replace the defaults.
    """
    return max(ops / ceiling_rate(ceiling, ceilings), nbytes / ceiling_rate("copy_GBps", ceilings))


def matmul_ceiling(dtype: str, tf32: bool = False) -> str:
    """The compute ceiling of a product of ``dtype`` operands ("float32" with ``tf32``: tensor cores)."""
    names = {"bfloat16": "bf16", "float16": "fp16", "float32": "tf32" if tf32 else "fp32", "float64": "fp64"}
    return f"{names[dtype]}_matmul_TFLOPs"

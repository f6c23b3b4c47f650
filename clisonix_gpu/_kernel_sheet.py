"""The machine code of every kernel variant on sm_90 (H100/H200), read without a GPU.

Each Triton kernel is compiled for sm_90 with every autotune config the tuner may pick and every
operand kind its launcher passes; the CUDA C of ``kernels/*.cu`` is compiled with ``nvcc`` as CuPy
would load it. ``cuobjdump`` (shipped inside the Triton wheel) then reads each cubin's SASS and
resource usage: registers, local memory (spills), shared memory, the tensor-core instruction
used, hardware popcount, and the occupancy those resources allow on an sm_90 SM.

``clisonix-gpu kernels`` prints the sheet; ``--json`` gives the rows. Compilation needs Triton
(and nvcc for the CUDA C rows); it runs in a child process without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import importlib.resources
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from .ops import svd_compress as svd_module
from .ops import transform_matrix as transform_matrix_module
from .ops.utils import FP_FUSION, cdiv

ARCH = 90
# Per-SM and per-block limits of compute capability 9.0 (CUDA C Programming Guide, "Technical
# Specifications per Compute Capability"; the occupancy calculator's allocation rules).
SM90 = {
    "registers_per_sm": 65536,
    "register_unit": 256,  # registers are allocated per warp in units of 256
    "sub_partitions": 4,  # each with a quarter of the register file
    "max_registers_per_thread": 255,
    "max_warps_per_sm": 64,
    "max_blocks_per_sm": 32,
    "shared_per_sm": 233472,  # 228 KiB
    "shared_per_block": 232448,  # 227 KiB, the most one block may opt in to
    "shared_reserved_per_block": 1024,  # the system's share of each resident block
    "shared_unit": 128,
}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One compiled form of a kernel: Triton (``module``, ``kernel``, signature, constexprs, options) or CUDA C (``source``)."""

    name: str
    kernel: str
    module: str = ""
    signature: tuple[tuple[str, str], ...] = ()
    constexprs: tuple[tuple[str, Any], ...] = ()
    options: tuple[tuple[str, int], ...] = ()
    source: str = ""


@dataclasses.dataclass
class MachineCode:
    """What ptxas made of one variant on sm_90."""

    variant: str
    kernel: str
    threads: int
    registers: int
    stack_bytes: int  # local memory a thread needs for its frame: spills and local arrays
    local_stores: int  # STL instructions: register spills (or local arrays) written
    local_loads: int  # LDL instructions
    shared_bytes: int  # static plus dynamic shared memory per block
    tensor_core: str  # "wgmma <type>" (Hopper warpgroup MMA), "mma <type>" (mma.sync), or "none"
    popc: bool  # uses the hardware popcount instruction
    blocks_per_sm: int
    occupancy: float  # resident warps / 64
    error: str = ""

    @property
    def spills(self) -> bool:
        return self.stack_bytes > 0 or self.local_stores > 0 or self.local_loads > 0


# ----------------------------------------------------------------------------- variants


def _pointers(names: list[str], dtype: str) -> dict[str, str]:
    return {name: f"*{dtype}" for name in names}


def _ints(names: list[str]) -> dict[str, str]:
    return {name: "i32" for name in names}


def _autotune_configs(module: str, kernel: str) -> list[Any]:
    return list(getattr(importlib.import_module(f"clisonix_gpu.kernels.{module}"), kernel).configs)


def _triton_variant(name: str, module: str, kernel: str, signature: dict[str, str], constexprs: dict[str, Any], **options: int) -> Variant:
    return Variant(name, kernel, module, tuple(signature.items()), tuple(constexprs.items()), tuple(options.items()))


def _transform_matrix_variants() -> Iterator[Variant]:
    block_k = transform_matrix_module.BLOCK_K
    args = _ints(["M", "N", "K", "stride_xb", "stride_xm", "stride_wb", "stride_wn", "stride_ob", "stride_om"])
    # the launcher's operand kinds: (triton dtype, torch dtype name, DOT_PRECISION)
    kinds = [
        ("fp16", "float16", "ieee"),
        ("bf16", "bfloat16", "ieee"),
        ("fp32", "float32", "ieee"),
        ("fp32", "float32", "tf32"),
        ("fp64", "float64", "ieee"),
    ]
    from .kernels.transform_matrix import prune_configs_for_dtype

    configs = _autotune_configs("transform_matrix", "transform_matrix_kernel")
    for config in configs:
        bm, bn = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
        for dt, dtype, precision in kinds:
            if config not in prune_configs_for_dtype(configs, {}, ACC_FP64=dt == "fp64"):
                continue  # the tuner never runs it for this dtype
            signature = {**_pointers(["x_ptr", "w_ptr", "bias_ptr", "out_ptr"], dt), **args}
            # gelu_tanh: the epilogue with the most live values (the tanh series), so the most registers
            constexprs = {"HAS_BIAS": True, "ACTIVATION": "gelu_tanh", "DOT_PRECISION": precision, "INTERPRETER_DOT": False,
                          "ACC_FP64": dt == "fp64", "BLOCK_K": block_k[dtype], **config.kwargs}  # fmt: skip
            kind = f"{dt}-tf32" if precision == "tf32" else dt
            yield _triton_variant(f"transform_matrix {kind} {bm}x{bn} w{config.num_warps} s{config.num_stages}", "transform_matrix",
                                  "transform_matrix_kernel", signature, constexprs, num_warps=config.num_warps, num_stages=config.num_stages)  # fmt: skip


def _svd_compress_variants() -> Iterator[Variant]:
    svd = svd_module
    for config in _autotune_configs("svd_compress", "sketch_matmul_kernel"):
        for dt in ("fp32", "fp64"):
            signature = {
                **_pointers(["a_ptr", "y_ptr"], dt),
                **_ints(["M", "N", "L", "stride_ab", "stride_am", "stride_yb", "stride_ym"]),
                "seed_mix": "i64",
            }
            constexprs = {"INTERPRETER_DOT": False, "ACC_FP64": dt == "fp64", "BLOCK_L": 64, "BLOCK_K": svd._SKETCH_BLOCK_K, **config.kwargs}
            yield _triton_variant(f"sketch_matmul {dt} {config.kwargs['BLOCK_M']}x64 w{config.num_warps} s{config.num_stages}", "svd_compress",
                                  "sketch_matmul_kernel", signature, constexprs, num_warps=config.num_warps, num_stages=config.num_stages)  # fmt: skip
    # the QR kernel at the largest tiles the launcher gives it (svd._QR_TILE_BYTES), and the smallest
    for dt, size in (("fp32", 4), ("fp64", 8)):
        tiles = [(16, 16)] + [(bm, svd._QR_TILE_BYTES // size // bm) for bm in (64, 128, 256, 512)]
        for bm, bl in [(bm, bl) for bm, bl in tiles if 16 <= bl <= bm]:
            signature = {**_pointers(["y_ptr", "q_ptr", "r_ptr"], dt), **_ints(["M", "L", "stride_yb", "stride_ym", "stride_yl"])}
            warps = svd._qr_warps(bm, bl, size)
            yield _triton_variant(f"householder_qr {dt} {bm}x{bl} w{warps}", "svd_compress", "householder_qr_kernel", signature,
                                  {"ACC_FP64": dt == "fp64", "BLOCK_M": bm, "BLOCK_L": bl}, num_warps=warps)  # fmt: skip


def _binary_variants() -> Iterator[Variant]:
    # block sizes as the launchers in clisonix_gpu.ops.binary pass them
    for dt, rule in [("fp32", "positive"), ("bf16", "nonnegative"), ("u8", "nonzero")]:
        signature = {"x_ptr": f"*{dt}", "out_ptr": "*u8", **_ints(["R", "n", "W", "stride_xr", "stride_or"])}
        yield _triton_variant(
            f"pack_bits {dt} {rule}", "binary", "pack_bits_kernel", signature, {"RULE": rule, "BLOCK_R": 16, "BLOCK_W": 16}, num_warps=4
        )
    signature = {"bits_ptr": "*u8", "out_ptr": "*u8", **_ints(["R", "n", "stride_br", "stride_or"])}
    yield _triton_variant("unpack_bits", "binary", "unpack_bits_kernel", signature, {"BLOCK_R": 16, "BLOCK_C": 64}, num_warps=4)
    for signed in (True, False):
        signature = {**_pointers(["a_ptr", "b_ptr", "out_ptr"], "i32"), **_ints(["M", "N", "words", "n_bits", "stride_am", "stride_bn", "stride_om"])}
        constexprs = {"SIGNED_DOT": signed, "HW_POPC": True, "BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_W": 8}
        yield _triton_variant(
            f"popcount_gemm {'signed' if signed else 'hamming'}", "binary", "popcount_gemm_kernel", signature, constexprs, num_warps=4
        )


def triton_variants() -> list[Variant]:
    """Every Triton variant the launchers and autotuners can run on sm_90."""
    return [*_transform_matrix_variants(), *_svd_compress_variants(), *_binary_variants()]


def cuda_sources() -> list[str]:
    return sorted(p.name for p in importlib.resources.files("clisonix_gpu.kernels").iterdir() if p.name.endswith(".cu"))


# ----------------------------------------------------------------------------- machine code


def cuobjdump() -> str | None:
    """cuobjdump from the Triton wheel, else from the CUDA toolkit on PATH."""
    try:
        import triton

        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if bundled.is_file():
            return str(bundled)
    except ImportError:
        pass
    return shutil.which("cuobjdump")


def occupancy(registers: int, threads: int, shared_bytes: int) -> tuple[int, float]:
    """(resident blocks per SM, resident warps / 64) on sm_90 for one block's resources."""
    warps = cdiv(threads, 32)
    per_warp = cdiv(max(registers, 1) * 32, SM90["register_unit"]) * SM90["register_unit"]
    warps_by_registers = SM90["sub_partitions"] * (SM90["registers_per_sm"] // SM90["sub_partitions"] // per_warp)
    shared = cdiv(shared_bytes + SM90["shared_reserved_per_block"], SM90["shared_unit"]) * SM90["shared_unit"]
    blocks = min(SM90["max_blocks_per_sm"], SM90["max_warps_per_sm"] // warps, warps_by_registers // warps, SM90["shared_per_sm"] // shared)
    return blocks, blocks * warps / SM90["max_warps_per_sm"]


_OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)")
_RESOURCES = re.compile(r"Function (\w+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _tensor_core(opcodes: Counter[str]) -> str:
    """ "wgmma bf16", "mma tf32", "mma fp64"...: the kind of tensor-core instruction and its operand type."""
    for prefix, label in (("HGMMA", "wgmma"), ("HMMA", "mma"), ("DMMA", "mma"), ("IMMA", "mma")):
        used = sorted(op for op in opcodes if op.split(".")[0] == prefix)
        if used:
            modifiers = set(used[0].split(".")[1:])
            operand = next((t.lower() for t in ("BF16", "TF32", "E4M3", "E5M2", "S8", "U8") if t in modifiers), "fp16")  # F16 is implied
            return f"{label} {'fp64' if prefix == 'DMMA' else operand}"
    return "none"


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clisonix-gpu" / "sass"


def read_cubin(cubin: bytes, tool: str) -> dict[str, dict[str, Any]]:
    """{function: resources and SASS facts} of every kernel in ``cubin``; cached on disk by the
    cubin's hash, as disassembling takes most of a second per kernel."""
    cached = _cache_dir() / f"{hashlib.sha256(cubin).hexdigest()}.json"
    if cached.is_file():
        facts: dict[str, dict[str, Any]] = json.loads(cached.read_text())
        return facts
    facts = _disassemble(cubin, tool)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(facts))
    except OSError:
        pass  # a read-only home: no cache
    return facts


def _disassemble(cubin: bytes, tool: str) -> dict[str, dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run([tool, "--dump-resource-usage", str(path)], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool, "-sass", str(path)], capture_output=True, text=True, check=True).stdout
    found: dict[str, dict[str, Any]] = {}
    for name, reg, stack, shared, local in _RESOURCES.findall(usage):
        # cuobjdump counts the system's reserved share of shared memory in SHARED
        static_shared = max(int(shared) - SM90["shared_reserved_per_block"], 0)
        found[name] = {"registers": int(reg), "stack_bytes": int(stack) + int(local), "static_shared": static_shared}
    for part in re.split(r"\n\s*Function : ", sass)[1:]:
        name = part.split(None, 1)[0]
        opcodes = Counter(_OPCODE.findall(part))
        bases = Counter({op.split(".")[0]: 0 for op in opcodes})
        for op, count in opcodes.items():
            bases[op.split(".")[0]] += count
        found.setdefault(name, {}).update(
            {"local_stores": bases["STL"], "local_loads": bases["LDL"], "tensor_core": _tensor_core(opcodes), "popc": bases["POPC"] > 0}
        )
    return found


def _row(variant: str, kernel: str, threads: int, dynamic_shared: int, facts: dict[str, Any]) -> MachineCode:
    shared = facts["static_shared"] + dynamic_shared
    blocks, occ = occupancy(facts["registers"], threads, shared)
    return MachineCode(variant, kernel, threads, facts["registers"], facts["stack_bytes"], facts["local_stores"], facts["local_loads"],
                       shared, facts["tensor_core"], facts["popc"], blocks, occ)  # fmt: skip


def _failed(variant: str, kernel: str, error: str) -> MachineCode:
    return MachineCode(variant, kernel, 0, 0, 0, 0, 0, 0, "", False, 0, 0.0, error=error[-2000:])


def compile_triton(variant: Variant) -> MachineCode:
    """Compile one Triton variant for sm_90 and read its cubin."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        kernel = getattr(importlib.import_module(f"clisonix_gpu.kernels.{variant.module}"), variant.kernel)
        while not isinstance(kernel, triton.runtime.JITFunction):
            kernel = kernel.fn  # the JITFunction under @triton.autotune
        constexprs = dict(variant.constexprs)
        signature = {**dict(variant.signature), **{k: "constexpr" for k in constexprs}}
        options: dict[str, Any] = {**dict(variant.options), "enable_fp_fusion": FP_FUSION}  # as every launch sets it
        compiled = triton.compile(
            ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=GPUTarget("cuda", ARCH, 32), options=options
        )
        tool = cuobjdump()
        assert tool, "cuobjdump not found"
        facts = next(iter(read_cubin(compiled.asm["cubin"], tool).values()))
        return _row(variant.name, variant.kernel, 32 * options.get("num_warps", 4), compiled.metadata.shared, facts)
    except Exception as exc:  # reported per variant
        return _failed(variant.name, variant.kernel, f"{type(exc).__name__}: {exc}")


# threads a block each CUDA C kernel is launched with (the CuPy backend's launch geometry)
CUDA_BLOCK_THREADS = {"popcount_gemm_u64": 256, "pack_bool_rows": 256, "unpack_bits_rows": 256, "hamming_topk_chunks": 512}


def compile_cuda(source: str) -> list[MachineCode]:
    """Compile ``kernels/<source>`` with nvcc for sm_90 (as CuPy does: ``--std=c++17``) and read every kernel."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return [_failed(source, "", "nvcc is not on PATH")]
    text = importlib.resources.files("clisonix_gpu.kernels").joinpath(source).read_text()
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / source, Path(tmp) / "out.cubin"
        src.write_text(text)
        proc = subprocess.run([nvcc, f"-arch=sm_{ARCH}", "--std=c++17", "-cubin", str(src), "-o", str(out)], capture_output=True, text=True)
        if proc.returncode != 0:
            return [_failed(source, "", proc.stderr)]
        tool = cuobjdump()
        if tool is None:
            return [_failed(source, "", "cuobjdump not found")]
        functions = read_cubin(out.read_bytes(), tool)
    return [_row(f"{source} {name}", name, CUDA_BLOCK_THREADS.get(name, 0), 0, facts) for name, facts in sorted(functions.items())]


def sheet(workers: int | None = None) -> list[MachineCode]:
    """Every variant's machine code: Triton variants compiled in parallel, then the CUDA C sources."""
    variants = triton_variants()
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        rows = list(pool.map(compile_triton, variants))
    for source in cuda_sources():
        rows.extend(compile_cuda(source))
    return rows


def render(rows: list[MachineCode]) -> str:
    """The sheet as a Markdown table."""
    lines = [
        f"Kernel variants on sm_{ARCH} (H100/H200): registers a thread, local memory (stack bytes; STL/LDL spill instructions), "
        "shared memory a block, tensor-core instruction, hardware popcount, and the resident blocks and warps (of 64) an SM allows.",
        "",
        "| variant | threads | registers | spill: stack B / STL / LDL | shared KiB | tensor core | POPC | blocks/SM | occupancy |",
        "|---|---:|---:|---|---:|---|---|---:|---:|",
    ]
    for r in rows:
        if r.error:
            lines.append(f"| {r.variant} | failed: {r.error.splitlines()[0][:120]} | | | | | | | |")
            continue
        spill = f"**{r.stack_bytes} / {r.local_stores} / {r.local_loads}**" if r.spills else "0 / 0 / 0"
        lines.append(
            f"| {r.variant} | {r.threads} | {r.registers} | {spill} | {r.shared_bytes / 1024:.1f} | {r.tensor_core} "
            f"| {'yes' if r.popc else 'no'} | {r.blocks_per_sm} | {r.occupancy:.0%} |"
        )
    return "\n".join(lines) + "\n"


def run_in_child(workers: int | None = None) -> list[MachineCode]:
    """:func:`sheet` in a fresh interpreter without ``TRITON_INTERPRET`` (kernels read it at import)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    cmd = [sys.executable, "-m", "clisonix_gpu._kernel_sheet", "--json"] + ([f"--workers={workers}"] if workers else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"compiling the kernel sheet failed:\n{proc.stderr[-4000:]}")
    return [MachineCode(**row) for row in json.loads(proc.stdout)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clisonix-gpu kernels", description="machine code of every kernel variant on sm_90")
    parser.add_argument("--json", action="store_true", help="rows as JSON instead of a Markdown table")
    parser.add_argument("--workers", type=int, default=None, help="compile processes (default: one per core)")
    args = parser.parse_args(argv)
    rows = sheet(args.workers) if "TRITON_INTERPRET" not in os.environ else run_in_child(args.workers)
    print(json.dumps([dataclasses.asdict(r) for r in rows]) if args.json else render(rows), end="" if not args.json else "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

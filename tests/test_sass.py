"""The sm_90 machine code of every kernel variant is what a GPU engineer expects.

Every Triton variant the launchers and autotuners can run, and every CUDA C kernel (nvcc), is
compiled for sm_90 once per session (``clisonix_gpu._kernel_sheet``, in a child process without
``TRITON_INTERPRET``) and its SASS read with cuobjdump: Hopper's warpgroup MMA (HGMMA) for 16-bit
GEMM tiles of 64 rows and more, mma.sync (HMMA) below; tensor cores for tf32 and none for the
fp32 "ieee" product; the hardware POPC in the popcount kernels; no spills to local memory; shared
memory within a block's limit. ``clisonix-gpu kernels`` prints the same rows.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import pytest

from clisonix_gpu import _kernel_sheet, cli
from clisonix_gpu._kernel_sheet import SM90, MachineCode

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(_kernel_sheet.cuobjdump() is None, reason="no cuobjdump (the Triton wheel ships one): SASS is not read here")

_SHEET: list[MachineCode] = []


@pytest.fixture(scope="module")
def sheet() -> dict[str, MachineCode]:
    if not _SHEET:
        _SHEET.extend(_kernel_sheet.run_in_child())
    return {row.variant: row for row in _SHEET}


def _triton_rows(sheet, kernel):
    rows = [r for name, r in sheet.items() if r.kernel == kernel and not name.endswith(".cu " + kernel)]
    assert rows, f"no {kernel} variants compiled"
    return rows


def test_every_variant_compiles(sheet):
    failed = {name: row.error for name, row in sheet.items() if row.error}
    assert not failed, failed


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_16_bit_gemm_tiles_use_hopper_tensor_cores(sheet, dtype):
    for row in _triton_rows(sheet, "transform_matrix_kernel"):
        if row.variant.split()[1] != dtype:
            continue
        block_m = int(re.search(r" (\d+)x\d+ ", row.variant).group(1))  # type: ignore[union-attr]
        expected = "wgmma" if block_m >= 64 else "mma"  # warpgroup MMA needs 64-row tiles
        assert row.tensor_core == f"{expected} {dtype}", row


def test_fp32_products_use_tensor_cores_only_as_tf32(sheet):
    for row in _triton_rows(sheet, "transform_matrix_kernel"):
        kind = row.variant.split()[1]
        if kind == "fp32-tf32":
            assert row.tensor_core.endswith("tf32"), row
        elif kind == "fp32":  # "ieee": exact fp32 FFMA on the CUDA cores
            assert row.tensor_core == "none", row
    for row in _triton_rows(sheet, "sketch_matmul_kernel"):
        assert row.tensor_core == ("none" if "fp32" in row.variant else "mma fp64"), row


def test_popcount_kernels_use_the_hardware_popcount(sheet):
    rows = _triton_rows(sheet, "popcount_gemm_kernel") + [
        r for name, r in sheet.items() if name.endswith((" popcount_gemm_u64", " hamming_topk_chunks"))
    ]
    assert len(rows) == 2 + (2 if shutil.which("nvcc") else 0)
    for row in rows:
        assert row.popc, row


# Spills depend on the compiler: checked with the Triton the configs were chosen with.
CHECKED_TRITON = "3.9.0"


def test_no_variant_spills_to_local_memory(sheet):
    """Configs that spill are out of the autotune lists, and fp64 is pruned to the tiles that fit
    (the measured spills of each left-out config are in kernels/*.py)."""
    if triton.__version__ != CHECKED_TRITON:
        pytest.skip(f"spills checked for Triton {CHECKED_TRITON}, this is {triton.__version__}: review `clisonix-gpu kernels`")
    spilling = {name: (row.stack_bytes, row.local_stores, row.local_loads) for name, row in sheet.items() if row.spills}
    assert not spilling, "prune these configs (kernels/*.py) or shrink their tiles"


def test_shared_memory_fits_a_block_and_occupancy_is_positive(sheet):
    for row in sheet.values():
        assert 0 <= row.shared_bytes <= SM90["shared_per_block"], row
        assert row.registers <= SM90["max_registers_per_thread"] and row.blocks_per_sm >= 1, row


def test_cuda_c_kernels_are_in_the_sheet(sheet):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not installed: the CUDA C kernels' SASS is not read here")
    cuda_rows = {r.kernel for name, r in sheet.items() if ".cu " in name}
    assert cuda_rows == {"popcount_gemm_u64", "pack_bool_rows", "unpack_bits_rows", "hamming_topk_chunks"}
    assert cuda_rows <= set(_kernel_sheet.CUDA_BLOCK_THREADS)


def test_occupancy_follows_the_sm90_allocation_rules():
    # 255 registers round up to 8192 a warp: two warps per quarter of the register file
    assert _kernel_sheet.occupancy(255, 128, 0) == (2, 8 / 64)
    # 32 registers: threads limit it (2048 a SM)
    assert _kernel_sheet.occupancy(32, 256, 0) == (8, 1.0)
    # 100 KiB of shared memory (+1 KiB reserved) a block: two fit in 228 KiB
    assert _kernel_sheet.occupancy(32, 128, 100 * 1024) == (2, 8 / 64)


def test_cli_prints_the_sheet(sheet, monkeypatch, capsys):
    monkeypatch.setattr(_kernel_sheet, "run_in_child", lambda workers=None: list(sheet.values()))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert cli.main(["kernels"]) == 0
    text = capsys.readouterr().out
    assert text == _kernel_sheet.render(list(sheet.values()))
    assert all(f"| {name} |" in text for name in sheet)
    assert cli.main(["kernels", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [dataclasses.asdict(r) for r in sheet.values()]

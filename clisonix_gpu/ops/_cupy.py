"""Loading the CUDA C sources of ``kernels/*.cu`` as CuPy RawModules (compiled once per process)."""

from __future__ import annotations

import functools
import importlib.resources
from typing import Any


@functools.cache
def raw_module(name: str) -> Any:
    """``cupy.RawModule`` of ``kernels/<name>.cu``; CuPy compiles it on first use per device."""
    import cupy

    source = importlib.resources.files("clisonix_gpu.kernels").joinpath(f"{name}.cu").read_text()
    return cupy.RawModule(code=source, options=("--std=c++17",))


def launch(module: str, kernel: str, grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...], like: Any) -> None:
    """Launch ``kernel`` of ``kernels/<module>.cu`` on the device that holds ``like``."""
    with like.device:
        raw_module(module).get_function(kernel)(grid, block, args)

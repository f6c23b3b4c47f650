"""The CUDA C kernels of ``kernels/*.cu`` run on the CPU and match NumPy bit for bit.

Each ``.cu`` file is compiled once per session with the host C++ compiler against
``tests/cuda_host.h`` (blocks one after another, the threads of a block as real threads meeting
at a barrier for ``__syncthreads``). The kernels are launched two ways: directly, and through
the CuPy backend's own host code (``_dispatch`` registrations for "cupy") with NumPy standing in
for CuPy, so the launch geometry, the scalar argument types, the candidate merge of the top-k and
its sort path for large k are checked as well.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.resources
import re
import shutil
import subprocess
import sys
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import clisonix_gpu as cg
from clisonix_gpu import _dispatch

HEADER = Path(__file__).with_name("cuda_host.h")
CUDA_SOURCES = {
    p.name.removesuffix(".cu"): Path(str(p)) for p in importlib.resources.files("clisonix_gpu.kernels").iterdir() if p.name.endswith(".cu")
}
COMPILER = shutil.which("g++") or shutil.which("c++")
pytestmark = pytest.mark.skipif(COMPILER is None, reason="no C++ compiler (g++ or c++) on PATH: the CUDA C kernels are not run on the CPU here")

# Which test covers each kernel: a kernel added to a .cu file without a test here fails test_every_kernel_is_tested.
TESTED_KERNELS = {
    ("binary", "popcount_gemm_u64"),
    ("binary", "pack_bool_rows"),
    ("binary", "unpack_bits_rows"),
    ("binary", "hamming_topk_chunks"),
}
_SCALAR_KINDS = {"i": "i", "u": "u", "f": "f", "b": "u"}


def kernel_names(source: Path) -> list[str]:
    return re.findall(r"__global__\s+void\s+(\w+)\s*\(", source.read_text())


class HostModule:
    """One ``.cu`` file compiled for the host; ``launch`` mirrors a CUDA kernel launch."""

    def __init__(self, library: Path, kernels: list[str]):
        self.library = ctypes.CDLL(str(library))
        self.kernels = kernels
        self.launches: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []

    def signature(self, kernel: str) -> list[str]:
        fn = getattr(self.library, f"cuda_host_signature_{kernel}")
        fn.restype = ctypes.c_char_p
        return fn().decode().split(",")

    def launch(self, kernel: str, grid: tuple[int, ...], block: tuple[int, ...], args: tuple[object, ...]) -> None:
        params = self.signature(kernel)
        assert len(args) == len(params), f"{kernel} takes {len(params)} arguments, got {len(args)}"
        values = []
        for i, (param, arg) in enumerate(zip(params, args)):
            kind, size = param[0], int(param[1:])
            if kind == "p":
                assert isinstance(arg, np.ndarray), f"{kernel} argument {i}: a pointer parameter needs an array, got {type(arg).__name__}"
                assert arg.flags.c_contiguous, f"{kernel} argument {i}: the kernel indexes a contiguous array, got strides {arg.strides}"
                values.append(ctypes.c_void_p(arg.ctypes.data))
            else:
                # CuPy passes a NumPy scalar as its own C type: it must match the parameter exactly
                assert isinstance(arg, np.generic), f"{kernel} argument {i}: pass a NumPy scalar typed as the C parameter ({param})"
                assert (_SCALAR_KINDS.get(arg.dtype.kind), arg.dtype.itemsize) == (kind, size), f"{kernel} argument {i}: {arg.dtype} for a C {param}"
                values.append(ctypes.create_string_buffer(arg.tobytes(), size))
        pointers = (ctypes.c_void_p * max(len(values), 1))(*[ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in values])
        dims = [tuple(dim) + (1,) * (3 - len(dim)) for dim in (grid, block)]
        error = ctypes.create_string_buffer(512)
        fn = getattr(self.library, f"cuda_host_launch_{kernel}")
        fn.argtypes = [ctypes.POINTER(ctypes.c_uint)] * 2 + [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
        self.launches.append((kernel, dims[0], dims[1]))
        rc = fn((ctypes.c_uint * 3)(*dims[0]), (ctypes.c_uint * 3)(*dims[1]), pointers, error, len(error))
        if rc != 0:
            raise RuntimeError(f"{kernel}<<<{dims[0]}, {dims[1]}>>>: {error.value.decode()}")


def _compile(name: str, source: Path, out_dir: Path) -> HostModule:
    kernels = kernel_names(source)
    wrapper = out_dir / f"{name}_host.cpp"
    wrapper.write_text(
        f'#include "{HEADER}"\n#include "{source}"\n' + "".join(f"CUDA_HOST_EXPORT({k})\n" for k in kernels),
    )
    library = out_dir / f"{name}_host.so"
    cmd = [
        COMPILER,
        "-std=c++17",
        "-O2",
        "-pthread",
        "-shared",
        "-fPIC",
        "-Wall",
        "-Werror",
        "-Wno-unknown-pragmas",
        str(wrapper),
        "-o",
        str(library),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-4000:]}"
    return HostModule(library, kernels)


@pytest.fixture(scope="session")
def host_modules(tmp_path_factory: pytest.TempPathFactory) -> dict[str, HostModule]:
    """Every ``.cu`` file compiled for the host, once per session (in parallel)."""
    out_dir = tmp_path_factory.mktemp("cuda_host")
    with ThreadPoolExecutor() as pool:
        futures = {name: pool.submit(_compile, name, src, out_dir) for name, src in CUDA_SOURCES.items()}
        return {name: f.result() for name, f in futures.items()}


class HostArray(np.ndarray):
    """A NumPy array that answers ``.device`` as a CuPy array does (a context to launch in)."""

    @property
    def device(self) -> contextlib.nullcontext[None]:  # type: ignore[override]
        return contextlib.nullcontext()


def _as_host(value: object) -> object:
    if isinstance(value, np.ndarray) and not isinstance(value, HostArray):
        return value.view(HostArray)
    if isinstance(value, tuple):
        return tuple(_as_host(v) for v in value)
    return value


def _fake_cupy(host_modules: dict[str, HostModule]) -> types.ModuleType:
    """``cupy`` made of NumPy: functions return HostArrays; RawModule runs the host-compiled kernels."""
    sources = {src.read_text(): name for name, src in CUDA_SOURCES.items()}

    class RawModule:
        def __init__(self, code: str, options: tuple[str, ...] = ()):
            self.module = host_modules[sources[code]]

        def get_function(self, kernel: str):
            assert kernel in self.module.kernels, f"no __global__ {kernel} in the source"
            return lambda grid, block, args: self.module.launch(kernel, tuple(grid), tuple(block), tuple(args))

    def attribute(name: str) -> object:
        value = getattr(np, name)
        if callable(value) and not isinstance(value, type):
            return lambda *args, **kwargs: _as_host(value(*args, **kwargs))
        return value

    fake = types.ModuleType("cupy")
    fake.RawModule = RawModule  # type: ignore[attr-defined]
    fake.__getattr__ = attribute  # type: ignore[method-assign]
    return fake


def _clear_project_caches() -> None:
    """The backend caches its RawModules (functools.cache): forget the fake ones before and after."""
    for name, module in list(sys.modules.items()):
        if name.startswith("clisonix_gpu"):
            for value in list(vars(module).values()):
                if callable(getattr(value, "cache_clear", None)):
                    value.cache_clear()


@pytest.fixture
def cupy_on_host(host_modules: dict[str, HostModule], monkeypatch: pytest.MonkeyPatch):
    """The CuPy backend's host code runs on NumPy arrays, its kernels host-compiled (see HostModule)."""
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(host_modules))
    _clear_project_caches()
    for module in host_modules.values():
        module.launches.clear()
    yield host_modules
    _clear_project_caches()


def cupy_impl(op: str):
    """The CuPy backend's implementation of ``op``, called on HostArrays."""
    impl = _dispatch._IMPLEMENTATIONS[(op, "cupy")]
    return lambda *arrays, **params: impl(*(_as_host(a) for a in arrays), **params)


# ----------------------------------------------------------------------------- NumPy references


def hamming_reference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(M, W) x (N, W) uint8 -> int32 (M, N) popcount(a_i ^ b_j), from np.bitwise_count."""
    return np.bitwise_count(a[:, None, :] ^ b[None, :, :]).sum(axis=-1, dtype=np.int32)


def topk_reference(q: np.ndarray, db: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Ascending distance, ties to the lower index (a stable sort of each row's distances)."""
    d = hamming_reference(q, db)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, axis=1), order.astype(np.int64)


def words_u64(a: np.ndarray) -> np.ndarray:
    padded = np.zeros((a.shape[0], -(-a.shape[1] // 8) * 8), dtype=np.uint8)
    padded[:, : a.shape[1]] = a
    return padded.view(np.uint64)


def codes(rng: np.random.Generator, rows: int, width: int, distinct: int = 0) -> np.ndarray:
    """(rows, width) random packed codes; with ``distinct``, drawn from that many (ties galore)."""
    if distinct:
        pool = rng.integers(0, 256, (distinct, width), dtype=np.uint8)
        return pool[rng.integers(0, distinct, rows)]
    return rng.integers(0, 256, (rows, width), dtype=np.uint8)


# ----------------------------------------------------------------------------- tests


def test_every_kernel_is_tested(host_modules):
    found = {(name, k) for name, module in host_modules.items() for k in module.kernels}
    assert found, "kernels/*.cu should define __global__ kernels"
    assert found == TESTED_KERNELS


def test_launch_rules_are_a_gpus(host_modules):
    module = host_modules["binary"]
    args = (np.zeros(1, np.uint8), np.zeros(1, np.uint8), np.int64(1), np.int32(1), np.int32(1))
    with pytest.raises(RuntimeError, match="dimension is 0"):
        module.launch("unpack_bits_rows", (0,), (256,), args)
    with pytest.raises(RuntimeError, match="1024 threads"):
        module.launch("unpack_bits_rows", (1,), (2048,), args)
    with pytest.raises(AssertionError, match="int64 for a C i4"):
        module.launch("unpack_bits_rows", (1,), (256,), args[:3] + (np.int64(1), np.int32(1)))


@pytest.mark.parametrize("signed", [False, True], ids=["hamming", "signed"])
@pytest.mark.parametrize("m,n", [(1, 1), (7, 33), (17, 129)])
@pytest.mark.parametrize("words", [1, 3, 16, 17, 40])
def test_popcount_gemm_u64(host_modules, rng, m, n, words, signed):
    """Tiles of 16 x 16 threads over sizes that are not multiples of 16, in 1..3 steps of 16 words."""
    a, b = codes(rng, m, 8 * words), codes(rng, n, 8 * words)
    out = np.full((m, n), -7, dtype=np.int32)
    n_bits = 64 * words - int(rng.integers(0, 64))
    host_modules["binary"].launch(
        "popcount_gemm_u64", (-(-n // 16), -(-m // 16)), (16, 16),
        (words_u64(a), words_u64(b), out, np.int32(m), np.int32(n), np.int32(words), np.int32(n_bits), np.int32(signed)),
    )  # fmt: skip
    expected = hamming_reference(a, b)
    np.testing.assert_array_equal(out, n_bits - 2 * expected if signed else expected)


@pytest.mark.parametrize("n_db,k", [(1, 1), (100, 7), (1024, 1024), (1025, 1), (2500, 600), (3000, 1024)])
@pytest.mark.parametrize("width", [1, 40], ids=["1-word", "5-words"])
def test_hamming_topk_chunks_per_block(host_modules, rng, n_db, k, width):
    """Each block's k smallest keys (distance << 32 | index) of its 1024 codes, padding with LLONG_MAX."""
    q, db = codes(rng, 3, width, distinct=5), codes(rng, n_db, width, distinct=9)
    chunks = -(-n_db // 1024)
    cand = np.zeros((3, chunks * k), dtype=np.int64)
    host_modules["binary"].launch(
        "hamming_topk_chunks", (chunks, 3), (512,),
        (words_u64(q), words_u64(db), cand, np.int32(n_db), np.int32(words_u64(q).shape[1]), np.int32(k), np.int32(chunks)),
    )  # fmt: skip
    keys = (hamming_reference(q, db).astype(np.int64) << 32) | np.arange(n_db, dtype=np.int64)
    keys = np.concatenate([keys, np.full((3, chunks * 1024 - n_db), np.iinfo(np.int64).max)], axis=1)
    expected = np.sort(keys.reshape(3, chunks, 1024), axis=2)[:, :, :k].reshape(3, chunks * k)
    np.testing.assert_array_equal(cand, expected)


@pytest.mark.parametrize(
    "n_q,n_db,width,k,distinct",
    [
        (1, 1, 1, 1, 0),  # one code of one byte
        (5, 7, 1, 7, 3),  # k = len(db), many ties
        (4, 1023, 8, 10, 0),  # one word, one partial chunk
        (3, 2049, 1, 1024, 4),  # three chunks, the largest k of the per-block path, ties across chunks
        (2, 2500, 129, 300, 0),  # 17 words, a ragged last chunk
        (3, 1500, 2, 1025, 6),  # the sort path: k beyond one block's selection
        (2, 3000, 40, 3000, 0),  # the sort path with k = len(db)
        (0, 1500, 8, 5, 0),  # no queries
    ],
)
def test_hamming_topk_cupy_backend(cupy_on_host, rng, n_q, n_db, width, k, distinct):
    q, db = codes(rng, n_q, width, distinct), codes(rng, n_db, width, distinct)
    distances, indices = cupy_impl("hamming_topk")(q, db, k=k)
    expected_distances, expected_indices = topk_reference(q, db, k)
    assert distances.dtype == np.int32 and indices.dtype == np.int64
    np.testing.assert_array_equal(distances, expected_distances)
    np.testing.assert_array_equal(indices, expected_indices)
    launched = {kernel for kernel, _, _ in cupy_on_host["binary"].launches}
    if n_q:  # which path ran: the per-block selection up to k = 1024, the full sort beyond
        assert launched == ({"popcount_gemm_u64"} if k > 1024 else {"hamming_topk_chunks"})


def test_hamming_topk_of_an_empty_database(cupy_on_host):
    """The op refuses it before any kernel; the per-block kernel would get a grid of 0 blocks."""
    q, db = np.zeros((2, 4), np.uint8), np.zeros((0, 4), np.uint8)
    with pytest.raises(ValueError, match=r"k = 1 is out of range: expected in \[1, 0\]"):
        cg.hamming_topk(_as_host(q), _as_host(db), 1)
    with pytest.raises(RuntimeError, match="dimension is 0"):
        cupy_impl("hamming_topk")(q, db, k=1)


@pytest.mark.parametrize("m,n,width", [(1, 1, 1), (7, 129, 3), (33, 17, 130), (3, 0, 8), (0, 5, 8)])
def test_hamming_distance_and_binary_matmul_cupy_backend(cupy_on_host, rng, m, n, width):
    a, b = codes(rng, m, width), codes(rng, n, width)
    n_bits = 8 * width - 3 if width > 1 else 5
    np.testing.assert_array_equal(cupy_impl("popcount_gemm")(a, b, signed_bits=None), hamming_reference(a, b))
    # binary_matmul ignores the bits past n: the reference counts only the first n bits
    first_n = np.unpackbits(np.full(width, 0xFF, np.uint8), count=n_bits, bitorder="little")
    mask = np.packbits(np.pad(first_n, (0, 8 * width - n_bits)), bitorder="little")
    expected = n_bits - 2 * hamming_reference(a & mask, b & mask)
    np.testing.assert_array_equal(cupy_impl("popcount_gemm")(a, b, signed_bits=n_bits), expected)


@pytest.mark.parametrize("n_q,n_db,width,r", [(3, 200, 4, 14), (2, 0, 4, 3), (4, 50, 1, 0), (1, 300, 17, 60)])
def test_hamming_radius_cupy_backend(cupy_on_host, rng, n_q, n_db, width, r):
    q, db = codes(rng, n_q, width, distinct=6), codes(rng, n_db, width, distinct=6)
    offsets, indices, distances = cupy_impl("hamming_radius")(q, db, r=r)
    d = hamming_reference(q, db)
    rows, cols = np.nonzero(d <= r)
    np.testing.assert_array_equal(offsets, np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n_q))]))
    np.testing.assert_array_equal(indices, cols)
    np.testing.assert_array_equal(distances, d[rows, cols])


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 3, 8), (5, 9), (4, 127), (2, 129), (0, 13), (3, 0), (301, 3)])
@pytest.mark.parametrize("rule", ["positive", "nonnegative", "nonzero"])
def test_pack_and_unpack_bits_cupy_backend(cupy_on_host, rng, shape, rule):
    x = rng.integers(-2, 3, shape).astype(np.float32)
    packed = cupy_impl("pack_bits")(x, rule=rule)
    on = {"positive": x > 0, "nonnegative": x >= 0, "nonzero": x != 0}[rule]
    np.testing.assert_array_equal(packed, np.packbits(on, axis=-1, bitorder="little"))
    unpacked = cupy_impl("unpack_bits")(packed, n=shape[-1])
    np.testing.assert_array_equal(unpacked, on.astype(np.uint8))

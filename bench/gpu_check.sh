#!/usr/bin/env bash
# GPU check for a lent CUDA machine: installs nothing from the network, runs the GPU tests with
# CLISONIX_REQUIRE_GPU=1 (a GPU skip is a failure), then the quick benchmark. Logs and results go
# under $OUT. Budget: under 6 minutes on an H200, so one rerun fits in a 15-minute lease.
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 CLISONIX_REQUIRE_GPU=1 CLISONIX_BENCH_OUT="$OUT"
status=0

python3 -m pip install --no-build-isolation --no-deps --no-index -e . >"$OUT/install.log" 2>&1 || {
    echo "install failed"; tail -20 "$OUT/install.log"; exit 1; }
{ nvidia-smi; python3 -m clisonix_gpu.cli info; } >"$OUT/info.txt" 2>&1
cat "$OUT/info.txt"

timeout 240 python3 -m pytest tests -q -p no:cacheprovider -x --durations=10 2>&1 | tee "$OUT/tests.log" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

timeout 150 python3 -m clisonix_gpu.cli bench --quick --device cuda --out "$OUT" 2>&1 \
    | tee "$OUT/bench.log" | grep -v '^bench_' | tail -30
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

# svd_compress on the GPU with and without its batched Triton QR (torch.linalg.qr instead):
# tells whether the kernel pays where torch's batched QR forms Q matrix by matrix.
timeout 60 python3 - <<'PY' 2>&1 | tee "$OUT/svd_qr_ablation.log"
import torch, triton.testing, clisonix_gpu as cg
from clisonix_gpu.ops.svd_compress import _TorchOps as ops
for batch, m, n, k in [(1024, 64, 64, 8), (4096, 32, 32, 4), (64, 256, 128, 16), (1, 8192, 8192, 64)]:
    a = torch.randn(batch, m, n, device="cuda")
    times = {}
    for triton_qr in (True, False):
        ops.triton_qr = triton_qr
        times[triton_qr] = triton.testing.do_bench(lambda: cg.svd_compress(a, k=k), warmup=5, rep=50, return_mode="median")
    ops.triton_qr = True
    lowrank = triton.testing.do_bench(lambda: torch.svd_lowrank(a, q=k + 10, niter=2), warmup=5, rep=50, return_mode="median")
    print(f"svd_compress {batch}x{m}x{n} k={k}: Triton QR {times[True]:.3f} ms, torch QR {times[False]:.3f} ms, torch.svd_lowrank {lowrank:.3f} ms")
PY
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "gpu_check exit status: $status (logs and results in $OUT)"
exit $status

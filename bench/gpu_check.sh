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

echo "gpu_check exit status: $status (logs and results in $OUT)"
exit $status

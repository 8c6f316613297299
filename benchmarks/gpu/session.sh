#!/usr/bin/env bash
# One GPU session in one device call (see README.md here):
#   run(command="bash benchmarks/gpu/session.sh", carry=[".whl"], timeout_s=600)
# 0. the peers' wheels from .whl/ into /tmp/site; 1. info.txt; 2. the kernel tests on CUDA (all of
# them, no -x); 3. the DPO step benchmark (benchmarks/bench_dpo_gpu.py, + the long-context rows).
# Every stage has its own timeout and a failure never stops the next one; the whole script ends within
# SESSION_S seconds (default 450 = 7.5 min). Everything goes to $OUT, at most 6 files:
#   info.txt gpu_tests.log gpu_tests.xml bench_dpo_gpu.log bench_dpo_gpu.json bench_dpo_gpu.md
# The Markdown table is printed last (a device call returns the last 12,000 characters of output).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
OUT=${OUT:-/tmp/expo_out}
mkdir -p "$OUT"
SESSION_S=${SESSION_S:-450}
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD" TQDM_DISABLE=1 PYTHONDONTWRITEBYTECODE=1
PY=${PYTHON:-python3}
# The native CPU backend is built on first use (ninja, ~30 s). Build it in a known folder so that a
# build cut off by a timeout leaves no stale lock file behind for the next stage (see clear_locks).
export EXPO_KERNELS_BUILD_DIR=${EXPO_KERNELS_BUILD_DIR:-/tmp/expo_native_build}
clear_locks() { find "$EXPO_KERNELS_BUILD_DIR" -name lock -type f -delete 2>/dev/null || true; }

left() { echo $((SESSION_S - SECONDS)); }
# cap DESIRED seconds at what is left minus RESERVE (never below 5)
cap() {
    local want=$1 reserve=${2:-0} l
    l=$(($(left) - reserve))
    if ((l < want)); then want=$l; fi
    if ((want < 5)); then want=5; fi
    echo "$want"
}
stage() { echo "=== [$(date -u +%H:%M:%S) t=${SECONDS}s] $*"; }

{
    stage "install .whl/*.whl into /tmp/site"
    if ls .whl/*.whl >/dev/null 2>&1; then
        timeout -k 5 "$(cap 90 420)" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -n 20 || echo "pip install failed (rc=$?)"
    else
        echo "no .whl/ here: the peers' libraries must already be importable"
    fi
    stage "device and versions"
    timeout -k 5 20 nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.max.sm --format=csv \
        || echo "nvidia-smi failed"
    timeout -k 5 60 "$PY" - <<'EOF' || echo "version probe failed"
import importlib, importlib.metadata as md, sys
print("python", sys.version.split()[0])
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print("device", p.name, "SMs", p.multi_processor_count, "memory GiB", round(p.total_memory / 2**30, 1))
except Exception as exc:
    print("torch import failed:", repr(exc))
for dist in ("triton", "transformers", "trl", "liger-kernel", "cut-cross-entropy", "datasets", "pytest",
             "pytest-timeout", "pytest-benchmark", "numpy"):
    try:
        print(dist, md.version(dist))
    except Exception:
        print(dist, "-")
for mod in ("trl.kernels.chunked_logprob", "liger_kernel.chunked_loss", "cut_cross_entropy"):
    try:
        importlib.import_module(mod)
        print("import", mod, "ok")
    except Exception as exc:
        print("import", mod, "FAILED:", type(exc).__name__, str(exc)[:300])
EOF
    stage "python -m expo_kernels.info"
    timeout -k 5 "$(cap 90 400)" "$PY" -m expo_kernels.info 2>&1 || echo "expo_kernels.info failed (rc=$?)"
} >"$OUT/info.txt" 2>&1
clear_locks
tail -n 40 "$OUT/info.txt"

# 2. The kernel tests on CUDA. -o addopts="": pyproject's addopts name pytest-benchmark's flags;
# --timeout per test only where pytest-timeout is installed. SIGINT first: pytest then still prints
# its summary (-rfE: every failure and error in one line) and writes the JUnit XML.
TESTS="tests/test_linear_logprobs.py tests/test_token_kl.py tests/test_engine.py tests/test_fused_module.py
tests/test_kernel_options.py tests/test_triton_internals.py tests/test_reliability.py tests/test_topk.py"
TIMEOUT_ARGS=()
if "$PY" -c "import pytest_timeout" >/dev/null 2>&1; then TIMEOUT_ARGS=(--timeout 120); fi
if "$PY" -c "import pytest_benchmark" >/dev/null 2>&1; then TIMEOUT_ARGS+=(--benchmark-disable); fi
EXISTING=()
for t in $TESTS; do if [[ -f $t ]]; then EXISTING+=("$t"); else echo "missing test file $t"; fi; done
stage "pytest on CUDA: ${EXISTING[*]}" | tee "$OUT/gpu_tests.log"
# leave the benchmark at least 240 s
timeout -s INT -k 15 "$(cap 200 255)" "$PY" -m pytest -q -rfE -p no:cacheprovider -o addopts="" \
    ${TIMEOUT_ARGS[@]+"${TIMEOUT_ARGS[@]}"} --junitxml="$OUT/gpu_tests.xml" ${EXISTING[@]+"${EXISTING[@]}"} >>"$OUT/gpu_tests.log" 2>&1
echo "pytest exit code: $? (124 = the time limit)" >>"$OUT/gpu_tests.log"
clear_locks
tail -n 60 "$OUT/gpu_tests.log" | cut -c1-400

# 3. The DPO step benchmark: rows stop starting BUDGET s after its start, the process is interrupted
# (SIGINT: it writes what it has) at LIMIT s; its JSON and Markdown are rewritten after every row.
LIMIT=$(cap 300 15)
BUDGET=$((LIMIT - 30))
if ((BUDGET < 30)); then BUDGET=30; fi
stage "bench_dpo_gpu (limit ${LIMIT} s, budget ${BUDGET} s)" | tee "$OUT/bench_dpo_gpu.log"
timeout -s INT -k 20 "$LIMIT" "$PY" -m benchmarks.bench_dpo_gpu --long-context --budget-s "$BUDGET" \
    --json "$OUT/bench_dpo_gpu.json" --markdown "$OUT/bench_dpo_gpu.md" >>"$OUT/bench_dpo_gpu.log" 2>&1
echo "bench_dpo_gpu exit code: $? (124 = the ${LIMIT} s limit)" >>"$OUT/bench_dpo_gpu.log"
grep -E "^\[|^matmul|^forward_only|ERROR|Error" "$OUT/bench_dpo_gpu.log" | tail -n 40

stage "done in ${SECONDS} s; files in $OUT:"
ls -la "$OUT"
echo
if [[ -s "$OUT/bench_dpo_gpu.md" ]]; then cat "$OUT/bench_dpo_gpu.md"; else tail -n 30 "$OUT/bench_dpo_gpu.log"; fi

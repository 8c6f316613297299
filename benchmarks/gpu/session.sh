#!/usr/bin/env bash
# One GPU session in one device call (README.md here says why each choice was made):
#   run(command="bash benchmarks/gpu/session.sh", carry=[".whl"], timeout_s=570)
# Stages: 0. the peers' wheels from .whl/ into /tmp/site; 1. info.txt (device, versions, commit);
# 2. the kernel tests on CUDA, the GPU-specific ones first (all failures, no -x); 3. the DPO-step
# benchmark (benchmarks/bench_dpo_gpu.py: one child process per row, + the long-context rows).
# Every stage has its own timeout, a failing stage never stops the next one, and the whole script
# ends within SESSION_S seconds (510 = 8.5 min by default). Everything goes to $OUT (at most 8 files
# come back from a device call): info.txt gpu_tests.log gpu_tests_first.xml gpu_tests_rest.xml
# bench_dpo_gpu.log bench_dpo_gpu.json bench_dpo_gpu.md. The Markdown table is printed last (a
# device call returns the last 12,000 characters of output).
#
#   bash benchmarks/gpu/session.sh --dry-run
# runs the same stages, in the same order, with the same timeouts (scaled to SESSION_S=90), child
# processes and files, on this CPU machine: tiny shapes, the Triton interpreter, the peers' CPU paths,
# pytest collecting the whole GPU test list and running a small part of it. tests/test_gpu_session.py
# runs it and checks every file and every benchmark row.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1

DRY_RUN=0
for arg in "$@"; do
    case $arg in
    --dry-run) DRY_RUN=1 ;;
    -h | --help)
        sed -n '2,18p' "$0"
        exit 0
        ;;
    *)
        echo "session.sh: unknown argument $arg (use --dry-run or nothing)" >&2
        exit 2
        ;;
    esac
done

if ((DRY_RUN)); then
    OUT=${OUT:-$(mktemp -d /tmp/expo_dry_run.XXXXXX)}
    SESSION_S=${SESSION_S:-90}
    export TRITON_INTERPRET=1
    BENCH_ARGS=(--device cpu --quick)
    SITE=$(mktemp -d /tmp/expo_dry_site.XXXXXX) # pip --dry-run installs nothing; keep /tmp/site out of it
    WHERE="the CPU (dry run)"
else
    OUT=${OUT:-/tmp/expo_out}
    SESSION_S=${SESSION_S:-510}
    BENCH_ARGS=()
    SITE=/tmp/site
    WHERE=CUDA
fi
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$SITE:$PWD" TQDM_DISABLE=1 PYTHONDONTWRITEBYTECODE=1
# The native C++ backend is for CPU tensors only: building it (~30 s of ninja) buys nothing here and
# a build cut off by a stage's timeout would leave a lock behind. Deterministic cuBLAS (the
# determinism tests and the bit-identical rerun column) needs a fixed workspace configuration.
export EXPO_KERNELS_NATIVE=0 CUBLAS_WORKSPACE_CONFIG=:4096:8
PY=${PYTHON:-python3}

# Seconds given to each stage at SESSION_S=510 (the default); a dry run scales them to its own SESSION_S, so that
# it exercises the same caps and the same order.
scale() { echo $(($1 * SESSION_S / 510)); }
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
BENCH_MIN=$(scale 270) # the benchmark keeps at least this much of the session

# 0 + 1. Wheels and the record of what ran ---------------------------------------------------------
{
    stage "session: dry_run=$DRY_RUN SESSION_S=$SESSION_S OUT=$OUT"
    # .git does not travel to the device: fetch_wheels.sh records the commit in .whl/COMMIT.
    if [[ -f .whl/COMMIT ]]; then cat .whl/COMMIT; else git log -1 --format='commit %H' 2>/dev/null || echo "commit unknown"; fi
    stage "install .whl/*.whl into $SITE"
    if ls .whl/*.whl >/dev/null 2>&1; then
        PIP_ARGS=(-q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE")
        ((DRY_RUN)) && PIP_ARGS+=(--dry-run)
        timeout -k 5 "$(cap "$(scale 60)" "$BENCH_MIN")" "$PY" -m pip install "${PIP_ARGS[@]}" .whl/*.whl 2>&1 | tail -n 20 ||
            echo "pip install failed (rc=$?)"
    else
        echo "no .whl/ here: the peers' libraries must already be importable"
    fi
    stage "device and versions"
    timeout -k 5 "$(scale 20)" nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.max.sm \
        --format=csv || echo "nvidia-smi failed (rc=$?)"
    timeout -k 5 "$(cap "$(scale 60)" "$BENCH_MIN")" "$PY" - <<'EOF' || echo "version probe failed"
import importlib, importlib.metadata as md, sys
print("python", sys.version.split()[0])
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print("device", p.name, "SMs", p.multi_processor_count, "memory GiB", round(p.total_memory / 2**30, 1),
              "L2 MiB", round(getattr(p, "L2_cache_size", 0) / 2**20, 1))
    import torch.nn.functional as F
    print("torch.nn.functional.linear_cross_entropy", "present" if hasattr(F, "linear_cross_entropy") else "absent")
except Exception as exc:
    print("torch import failed:", repr(exc))
for dist in ("triton", "transformers", "trl", "liger-kernel", "cut-cross-entropy", "datasets", "pytest",
             "pytest-timeout", "pytest-xdist", "pytest-benchmark", "hypothesis", "numpy"):
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
    timeout -k 5 "$(cap "$(scale 60)" "$BENCH_MIN")" "$PY" -m expo_kernels.info 2>&1 || echo "expo_kernels.info failed (rc=$?)"
} >"$OUT/info.txt" 2>&1
tail -n 45 "$OUT/info.txt"

# 2. The kernel tests on CUDA -----------------------------------------------------------------------
# Two passes over one list: first the tests that exercise GPU code (Triton kernels, the cuBLAS
# library-GEMM path, CUDA-only tests), so that a slow cold compile cannot starve them; then the rest.
# -o addopts="": pyproject's addopts name pytest-benchmark's flags. SIGINT first: pytest still prints
# its summary (-rfE: every failure and error on one line) and writes the JUnit XML.
TESTS="tests/test_linear_logprobs.py tests/test_token_kl.py tests/test_engine.py tests/test_fused_module.py
tests/test_kernel_options.py tests/test_triton_internals.py tests/test_reliability.py tests/test_topk.py"
GPU_FIRST="triton or cuda or gpu or library_gemm"
# A dry run collects the whole list (every file imports, every parametrization builds) and runs a
# small part of it: the interpreter would take far longer than the session's budget.
DRY_TESTS="tests/test_kernel_options.py"
EXISTING=()
for t in $TESTS; do if [[ -f $t ]]; then EXISTING+=("$t"); else echo "missing test file $t"; fi; done
PYTEST=("$PY" -m pytest -q -rfE -p no:cacheprovider -o addopts="")
if "$PY" -c "import pytest_timeout" >/dev/null 2>&1; then PYTEST+=(--timeout "$(scale 120)"); fi
if "$PY" -c "import pytest_benchmark" >/dev/null 2>&1; then PYTEST+=(--benchmark-disable); fi
# Compiling kernels is CPU-bound and the device machine has 16 cores: 4 workers on the one GPU.
if ((!DRY_RUN)) && "$PY" -c "import xdist" >/dev/null 2>&1; then PYTEST+=(-n 4); fi
{
    stage "pytest on $WHERE: ${EXISTING[*]}"
    if ((DRY_RUN)); then
        timeout -s INT -k 15 "$(cap "$(scale 60)" "$BENCH_MIN")" "${PYTEST[@]}" --collect-only ${EXISTING[@]+"${EXISTING[@]}"} |
            tail -n 3
        echo "collect exit code: $?"
        RUN_TESTS=($DRY_TESTS)
    else
        RUN_TESTS=(${EXISTING[@]+"${EXISTING[@]}"})
    fi
    stage "pytest, GPU code first: -k '$GPU_FIRST'"
    timeout -s INT -k 15 "$(cap "$(scale 150)" "$BENCH_MIN")" "${PYTEST[@]}" --junitxml="$OUT/gpu_tests_first.xml" \
        -k "$GPU_FIRST" "${RUN_TESTS[@]}"
    echo "pytest (GPU first) exit code: $? (124 = the time limit; 5 = nothing selected)"
    stage "pytest, the rest: -k 'not ($GPU_FIRST)'"
    timeout -s INT -k 15 "$(cap "$(scale 150)" "$BENCH_MIN")" "${PYTEST[@]}" --junitxml="$OUT/gpu_tests_rest.xml" \
        -k "not ($GPU_FIRST)" "${RUN_TESTS[@]}"
    echo "pytest (rest) exit code: $? (124 = the time limit; 5 = nothing selected)"
} >"$OUT/gpu_tests.log" 2>&1
grep -E "^(FAILED|ERROR)|passed|failed|exit code|^===" "$OUT/gpu_tests.log" | tail -n 60 | cut -c1-400

# 3. The DPO-step benchmark --------------------------------------------------------------------------
# Rows stop starting BUDGET s after its start; the process is interrupted (SIGINT: it writes what it
# has) at LIMIT s. Each row runs in a child process, and the JSON and Markdown are rewritten after
# every row, so a fault or a timeout costs one row.
LIMIT=$(cap 600 "$(scale 10)")
BUDGET=$((LIMIT - $(scale 30)))
if ((BUDGET < 10)); then BUDGET=10; fi
stage "bench_dpo_gpu (limit ${LIMIT} s, budget ${BUDGET} s)" | tee "$OUT/bench_dpo_gpu.log"
timeout -s INT -k 20 "$LIMIT" "$PY" -m benchmarks.bench_dpo_gpu ${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"} --long-context --row-seconds 3 \
    --budget-s "$BUDGET" --json "$OUT/bench_dpo_gpu.json" --markdown "$OUT/bench_dpo_gpu.md" >>"$OUT/bench_dpo_gpu.log" 2>&1
echo "bench_dpo_gpu exit code: $? (124 = the ${LIMIT} s limit)" >>"$OUT/bench_dpo_gpu.log"
grep -E "^\[|^matmul|^forward_only|ERROR|Error|exit code" "$OUT/bench_dpo_gpu.log" | tail -n 40 | cut -c1-400

stage "done in ${SECONDS} s; files in $OUT:"
ls -la "$OUT"
echo
if [[ -s "$OUT/bench_dpo_gpu.md" ]]; then cat "$OUT/bench_dpo_gpu.md"; else tail -n 30 "$OUT/bench_dpo_gpu.log"; fi

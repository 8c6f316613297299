#!/usr/bin/env bash
# The first GPU session's plan, one device call (see README.md here):
#   run(command="bash benchmarks/gpu/session.sh", carry=[".whl"], timeout_s=600)
# 1. the whole CUDA test suite that matters for kernels (bf16 included) -- a kernel that passes in
#    the interpreter can still fail to compile; 2. the per-token op benchmark against the peers;
# everything goes to $OUT (logs + JSON) for benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/expo_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD" TQDM_DISABLE=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
    python3 -m expo_kernels.info 2>&1 || true
} 2>&1 | tee "$OUT/info.txt"
# -o addopts="": pyproject's addopts name pytest-benchmark's --benchmark-disable, which the image may lack
timeout 240 python3 -m pytest -q -x -p no:cacheprovider -o addopts="" tests/test_linear_logprobs.py tests/test_token_kl.py \
    tests/test_triton_internals.py tests/test_kernel_options.py tests/test_fused_module.py tests/test_input_validation.py \
    2>&1 | tee "$OUT/gpu_tests.log"
timeout 300 python3 -m benchmarks.bench_logprobs --preset gpu --json "$OUT/bench_logprobs_cuda.json" 2>&1 \
    | tee "$OUT/bench_logprobs_cuda.log"

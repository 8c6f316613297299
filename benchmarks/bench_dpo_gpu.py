"""A whole DPO loss step on a GPU: time, peak memory, FLOP rate and accuracy of every implementation.

One step (as ``bench_dpo_cpu``): the policy pass through the LM head with gradient, the reference
pass forward-only (no graph; its own hidden states, the policy's head detached), per-sequence sums of
the completion log-probs, the sigmoid DPO loss ``-logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))``
averaged over pairs, and ``backward()``: gradients reach the policy hidden states and the LM-head
weight (not the frozen head's). Rows of the batch: B chosen then B rejected sequences of T tokens;
the first third of every row is prompt (label -100). Default shape: B=4 pairs, T=1024 (N=8192 tokens,
5464 counted), H=4096, V=128256, bf16 hidden states and weight.

Rows, in this order (``--impls``; the step builders are ``bench_dpo_cpu.build_dpo_step``'s). Ours
first, then every peer, then our other paths, so that a budget cut loses the least informative rows:

* ``expo-engine`` — ``expo_kernels.FusedLinearDPOLoss`` (metrics off), default options: the chunked
  engine where it serves the call (8 NHV FLOPs; two passes, 10 NHV, when a pair exceeds the
  workspace), else the op;
* ``trl`` — TRL's ``ChunkedLogProbFunction`` on the counted tokens;
* ``cce`` — Cut Cross-Entropy ``linear_cross_entropy(..., reduction="none")``, exact
  (``filter_eps=None``, as ours), ``impl="cce"`` on CUDA (``torch_compile`` elsewhere; ``--cce-impl``);
* ``cce-filtered`` — the same with its default gradient filtering (``impl="cce"`` only: elsewhere the
  row records why it did not run);
* ``torch-lce`` — PyTorch's ``torch.nn.functional.linear_cross_entropy(..., reduction="none",
  options=torch.nn.LinearCrossEntropyOptions())`` on the counted tokens (torch >= 2.13; where the
  device's torch lacks it the row says so);
* ``liger`` — Liger-Kernel's ``LigerFusedLinearDPOLoss`` (its defaults: compiled, a pair per chunk);
* ``naive`` — the counted tokens gathered first, then ``[N_valid, V]`` logits, ``log_softmax`` in fp32,
  ``gather`` (so it does exactly the FLOPs it is credited with);
* ``expo-engine-frozen`` — ``expo-engine`` with a frozen head (no ``d_weight``: 6 NHV);
* ``expo-recompute`` — the same module under ``kernel_options(engine=False)``: the op's recompute path,
  on CUDA its fused Triton kernels (10 NHV; ``expo-previous`` before the rename, still accepted);
* ``liger-api`` — expo_kernels' Liger-compatible ``LigerFusedLinearDPOLoss`` (same class and call).

``--long-context`` then adds one pair of 32768-token rows (43690 counted tokens: more than the 1 GiB
workspace holds, so the engine takes its two-pass path) for ``--long-impls`` (default ``expo-engine``,
``cce``, ``cce-filtered``, ``trl``, ``torch-lce``, ``liger``: cut-cross-entropy before Liger, which
builds the pair's full fp32 logits and will likely run out of memory).

Processes (``benchmarks._harness.spawn_worker``). The parent never imports torch: every measurement
runs in its own child process, so a CUDA fault, a hang or an out-of-memory kill in one row is recorded
in that row (``ERROR: worker killed by signal ...`` / ``timeout: ...``) and the next row starts on a
clean device. Children, in order: ``setup`` (environment and versions, the same-run matmul rate, the
copy bandwidth, the L2 size, the forward-only op), then per shape one ``reference`` child and one child
per row. Each child draws the same inputs from the same seed on the device (``make_dpo_inputs``).

The exact reference (float64 by default; ``--reference-dtype fp32`` for fp32 with exact matmuls) is
computed once per shape, by chunks of counted tokens with the gradient written out by hand
(``dZ = g (onehot - softmax)``), in the ``reference`` child on the device; its loss, ``d_hidden`` and
``d_weight`` (rounded to fp32) are saved with ``torch.save`` under a temporary directory. Each row's
child loads that file straight onto its device once (``torch.load(map_location=device, mmap=True)``)
after its timed steps and compares there: separate processes cannot share device memory, so one
file read per row is the least copying this allows (no float64 on the host, no second device copy,
the comparison itself on the device in row blocks).

Per row (in its child): the first call (compilation and autotuning included), one untimed warm-up,
then the median of ``--repeats`` steps (default: as many as fit ``--row-seconds``, at least
``--min-repeats`` = 20 on CUDA, at most 50) timed with CUDA events (wall clock on the CPU). Peak =
``torch.cuda.max_memory_allocated`` over the timed steps; working memory = peak - the inputs' bytes.
FLOPs needed = 8 x counted tokens x H x V (6 with the frozen head); the rate is compared with the
same-run ``torch.matmul`` rate at ``[N_valid, H] x [H, V]`` in the input dtype. Accuracy: the loss,
``d_hidden`` and ``d_weight`` of the last step against the exact reference, as relative errors
(Frobenius norms). Rerun: two more steps on the same inputs, ``torch.equal`` on ``d_hidden`` and
``d_weight`` (every row). Host syncs (CUDA): one step under ``torch.cuda.set_sync_debug_mode("warn")``
with the warnings recorded (``n/a (cpu)`` on the CPU). Path (our rows): the module's own plan
(``FusedLinearDPOLoss.plan_for``: backend, ``expo_kernels.Path`` and the reason) and the engine plan
``benchmarks.roofline.engine_plan`` derives from the workspace rules.
``model ms``: ``benchmarks.roofline.predict_step`` on that path at the same-run matmul rate, the
measured copy bandwidth and the device's L2 size.

Also measured in the ``setup`` child: the same-run matmul rate (``torch.matmul`` in the input dtype,
batches of calls until at least ``--matmul-seconds`` = 1 s were timed; 0.25 s for ``--quick`` on the CPU), the device-to-device copy
bandwidth (1 GiB buffers on CUDA), ``L2_cache_size``, and the forward-only
``expo_kernels.linear_logprobs`` at the matmul's shape (target: >= 75% of the matmul rate).

    python -m benchmarks.bench_dpo_gpu                                  # the default shape on CUDA
    python -m benchmarks.bench_dpo_gpu --long-context --budget-s 270 --json out.json --markdown out.md
    python -m benchmarks.bench_dpo_gpu --device cpu --quick --long-context --budget-s 40   # logic, ~40 s

``--budget-s``: no child starts after that many seconds (the rows left are recorded as skipped), and
each child is killed at ``--row-timeout`` or the budget left plus a grace (min(30 s, budget / 4)). The
JSON and the Markdown table are rewritten after every row, so a run cut short keeps what it measured.
``--quick`` (tiny shapes: 2 pairs x 64 tokens, H=64, V=512; long context 1 pair x 1024): on the CPU
the dtype defaults to fp32 (the engine serves no 16-bit head on the CPU), each child uses one thread,
and Liger runs uncompiled (``--liger-compiled`` to compile it: a fresh process compiles for several
seconds per row).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import signal
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/bench_dpo_gpu.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# none of these imports torch at module level: the parent stays light
from benchmarks import _harness as hn  # noqa: E402
from benchmarks import roofline  # noqa: E402
from benchmarks._workloads import IGNORE_INDEX, PROMPT_FRAC, dpo_sigmoid, make_dpo_inputs, torch_dtype  # noqa: E402
from benchmarks.bench_dpo_cpu import BETA, IMPL_ALIASES, build_dpo_step  # noqa: E402

MODULE = "benchmarks.bench_dpo_gpu"
ALL_IMPLS = (
    "expo-engine",
    "trl",
    "cce",
    "cce-filtered",
    "torch-lce",
    "liger",
    "naive",
    "expo-engine-frozen",
    "expo-recompute",
    "liger-api",
)
LONG_IMPLS = ("expo-engine", "cce", "cce-filtered", "trl", "torch-lce", "liger")
# the row name -> bench_dpo_cpu.build_dpo_step's name
BUILD_NAME = {"naive": "naive-masked"}
FLOPS_PER_TOKEN_HV = {"expo-engine-frozen": 6}  # else 8
# our rows with a roofline model: (engine option, trained head)
MODEL_PATH = {
    "expo-engine": (True, True),
    "expo-engine-frozen": (True, False),
    "expo-recompute": (False, True),
}
EXPO_ROWS = ("expo-engine", "expo-engine-frozen", "expo-recompute")
#: Test hook (tests/test_bench_dpo_gpu.py): the row child of this impl kills itself with SIGSEGV.
CRASH_ENV = "EXPO_BENCH_CRASH_ROW"


# ----------------------------------------------------------------------------------------------
# Device helpers (children only)
# ----------------------------------------------------------------------------------------------


class Dev:
    def __init__(self, device):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def clean(self):
        gc.collect()
        if self.cuda:
            self.torch.cuda.synchronize(self.device)
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def allocated(self):
        return self.torch.cuda.memory_allocated(self.device) if self.cuda else None

    def peak(self):
        return self.torch.cuda.max_memory_allocated(self.device) if self.cuda else None

    def reset_peak(self):
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def time_call(self, fn):
        """Seconds of one call (CUDA events on a GPU, wall clock elsewhere); returns (seconds, out)."""
        if self.cuda:
            start = self.torch.cuda.Event(enable_timing=True)
            end = self.torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3, out
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out


def _median_time(dev, fn, warmup, repeats):
    for _ in range(warmup):
        fn()
    dev.sync()
    return statistics.median(dev.time_call(fn)[0] for _ in range(repeats))


# ----------------------------------------------------------------------------------------------
# Same-run matmul rate, copy bandwidth, L2 and the forward-only op (the setup child)
# ----------------------------------------------------------------------------------------------


def _timed_batches(dev, fn, min_seconds, batch_seconds=0.05, min_batches=5):
    """Per-call seconds of ``fn``: batches of calls (each ~``batch_seconds``) until at least
    ``min_seconds`` of measured time and ``min_batches`` batches; returns (per-call times, timed s, calls)."""
    for _ in range(3):  # warm-up: allocator, cuBLAS heuristics, clocks
        fn()
    dev.sync()
    one = max(dev.time_call(fn)[0], 1e-7)
    batch = max(1, int(batch_seconds / one))

    def run_batch():
        for _ in range(batch):
            fn()

    per_call, total = [], 0.0
    while total < min_seconds or len(per_call) < min_batches:
        t = dev.time_call(run_batch)[0]
        per_call.append(t / batch)
        total += t
    return per_call, total, batch * len(per_call)


def measure_matmul(dev, n, h, v, dtype, min_seconds=1.0):
    """``torch.matmul([n, h], [v, h]^T)`` in ``dtype`` with random data, timed for at least
    ``min_seconds`` (batches of calls; the median per-call time of the batches): seconds and TFLOP/s."""
    torch = dev.torch
    gen = torch.Generator(device=dev.device)
    gen.manual_seed(1)
    a = torch.randn(n, h, generator=gen, device=dev.device).to(dtype)
    w = (torch.randn(v, h, generator=gen, device=dev.device) / h**0.5).to(dtype)
    try:
        per_call, total, calls = _timed_batches(dev, lambda: torch.matmul(a, w.t()), min_seconds)
    finally:
        a = w = None
        dev.clean()
    t = statistics.median(per_call)
    return {"shape": [n, h, v], "median_s": t, "timed_s": total, "calls": calls, "tflops": 2.0 * n * h * v / t / 1e12}


def measure_copy(dev, nbytes, min_seconds=0.2):
    """Device-to-device copy bandwidth: ``dst.copy_(src)`` of ``nbytes``, counted as ``2 * nbytes`` moved
    (read + write); TB/s at the median of batches timed for at least ``min_seconds``."""
    torch = dev.torch
    src = torch.ones(nbytes, dtype=torch.uint8, device=dev.device)
    dst = torch.empty_like(src)
    try:
        per_call, total, calls = _timed_batches(dev, lambda: dst.copy_(src), min_seconds, min_batches=3)
    finally:
        src = dst = None
        dev.clean()
    t = statistics.median(per_call)
    return {"bytes": nbytes, "median_s": t, "timed_s": total, "calls": calls, "tbs": 2.0 * nbytes / t / 1e12}


def l2_bytes(dev):
    """The device's L2 size (``torch.cuda.get_device_properties(...).L2_cache_size``) or None."""
    if not dev.cuda:
        return None
    size = getattr(dev.torch.cuda.get_device_properties(dev.device), "L2_cache_size", None)
    return int(size) if size else None


def measure_forward(dev, n, h, v, dtype, repeats=10):
    """Forward-only ``expo_kernels.linear_logprobs`` (no grad) at the matmul's shape."""
    import expo_kernels

    torch = dev.torch
    gen = torch.Generator(device=dev.device)
    gen.manual_seed(2)
    a = torch.randn(n, h, generator=gen, device=dev.device).to(dtype)
    w = (torch.randn(v, h, generator=gen, device=dev.device) * (2.0 / h**0.5)).to(dtype)
    labels = torch.randint(0, v, (n,), generator=gen, device=dev.device)
    try:
        with torch.no_grad():

            def fn():
                return expo_kernels.linear_logprobs(a, w, labels, ignore_index=IGNORE_INDEX)

            t0 = time.perf_counter()
            fn()
            dev.sync()
            first = time.perf_counter() - t0
            t = _median_time(dev, fn, 2, repeats)
    finally:
        a = w = labels = None
        dev.clean()
    return {"shape": [n, h, v], "first_s": first, "median_s": t, "tflops": 2.0 * n * h * v / t / 1e12}


# ----------------------------------------------------------------------------------------------
# Exact reference (the reference child) and the comparison (each row's child)
# ----------------------------------------------------------------------------------------------


def exact_reference(dev, hidden, ref_hidden, weight, labels, beta, acc="fp64", chunk_tokens=2048):
    """The step in ``acc`` (float64 by default; fp32 with exact matmuls, no TF32, on request), by chunks
    of counted tokens: loss, ``d_hidden [2B, T, H]`` and ``d_weight [V, H]`` (rounded to fp32, on
    ``dev``). The gradient by hand: with ``g`` the loss's derivative by the token's sequence log-prob,
    ``dZ = g (onehot(label) - softmax(Z))``, ``dH = dZ W``, ``dW = sum dZ^T h``. (In fp32 the margin,
    a small difference of sums of hundreds of log-probs, is only good to ~1e-6 relative.) The gradients
    stay on ``dev`` (the reference child saves them from there)."""
    torch = dev.torch
    dt = torch.float64 if acc == "fp64" else torch.float32
    tf32 = torch.backends.cuda.matmul.allow_tf32 if dev.cuda else None
    prec = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    if dev.cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            rows, seq, width = hidden.shape
            h = hidden.detach().reshape(-1, width)
            rh = ref_hidden.detach().reshape(-1, width)
            w = weight.detach().to(dt)
            lab = labels.reshape(-1)
            valid = (lab != IGNORE_INDEX).nonzero().squeeze(1)
            row_of = valid // seq
            spans = [(s, min(s + chunk_tokens, valid.numel())) for s in range(0, valid.numel(), chunk_tokens)]

            def token_logp(src):
                out = torch.empty(valid.numel(), dtype=dt, device=dev.device)
                for s, e in spans:
                    idx = valid[s:e]
                    z = src[idx].to(dt) @ w.t()
                    out[s:e] = z.gather(1, lab[idx].unsqueeze(1)).squeeze(1) - z.logsumexp(-1)
                    del z
                return out

            pol_seq = torch.zeros(rows, dtype=dt, device=dev.device).index_add_(0, row_of, token_logp(h))
            ref_seq = torch.zeros(rows, dtype=dt, device=dev.device).index_add_(0, row_of, token_logp(rh))
        with torch.enable_grad():
            pol_seq.requires_grad_(True)
            loss = dpo_sigmoid(pol_seq, ref_seq, beta)
            (g_seq,) = torch.autograd.grad(loss, pol_seq)
        with torch.no_grad():
            g_tok = g_seq[row_of]
            d_h = torch.zeros(rows * seq, width, dtype=torch.float32, device=dev.device)
            d_w = torch.zeros_like(w)
            for s, e in spans:
                idx = valid[s:e]
                hc = h[idx].to(dt)
                dz = (hc @ w.t()).softmax(-1).mul_(-g_tok[s:e].unsqueeze(1))
                dz.scatter_add_(1, lab[idx].unsqueeze(1), g_tok[s:e].unsqueeze(1))
                d_h[idx] = (dz @ w).float()
                d_w.addmm_(dz.t(), hc)
                del dz, hc
            d_w = d_w.float()
        return {"loss": float(loss.detach()), "d_hidden": d_h.view(rows, seq, width), "d_weight": d_w}
    finally:
        torch.set_float32_matmul_precision(prec)
        if dev.cuda:
            torch.backends.cuda.matmul.allow_tf32 = tf32


def _rel_err(dev, got, ref, block_rows=4096):
    """``||got - ref|| / ||ref||`` (Frobenius) on the device, in fp32, by blocks of rows (no full-size
    fp32 copy of a 16-bit ``got`` next to the reference)."""
    torch = dev.torch
    g2 = got.reshape(-1, got.shape[-1])
    r2 = ref.reshape(-1, ref.shape[-1])
    num = den = 0.0
    for s in range(0, g2.shape[0], block_rows):
        r = r2[s : s + block_rows].float()
        num += float(torch.linalg.vector_norm(g2[s : s + block_rows].float() - r) ** 2)
        den += float(torch.linalg.vector_norm(r) ** 2)
    return math.sqrt(num) / max(math.sqrt(den), 1e-30)


# ----------------------------------------------------------------------------------------------
# Children: setup, reference, one row
# ----------------------------------------------------------------------------------------------


def _threads(spec):
    """``--quick`` on the CPU: one intra-op thread per child. A logic check on a shared 2-core machine;
    two spinning OpenMP threads next to other processes turn 3 ms steps into 150+ ms ones."""
    if spec.get("threads"):
        import torch

        torch.set_num_threads(int(spec["threads"]))


def _inputs(dev, spec):
    """The shape's DPO inputs on the device, the same in every child (same seed, same device kind)."""
    return make_dpo_inputs(
        spec["pairs"],
        spec["seq_len"],
        spec["hidden"],
        spec["vocab"],
        torch_dtype(spec["dtype"]),
        dev.device,
        seed=spec["seed"],
        logit_std=spec["logit_std"],
    )


def _fail(result, key, exc):
    result[key] = {"error": f"{type(exc).__name__}: {exc}".strip(), "traceback": traceback.format_exc()[-3000:]}


def setup_worker(spec):
    """Environment, same-run matmul rate, copy bandwidth, L2 size, forward-only op (each part records
    its own error)."""
    result = {"impl": "setup", "status": "error"}
    try:
        import torch

        no_cuda = spec["device"].startswith("cuda") and not torch.cuda.is_available()
        result["info"] = hn.environment("cpu" if no_cuda else spec["device"])
        if no_cuda:
            raise RuntimeError(
                "--device cuda but torch.cuda.is_available() is False (use --device cpu for a logic test)"
            )
        dev = Dev(spec["device"])
        dt = torch_dtype(spec["dtype"])
        n, h, v = spec["mm_shape"]
        for key, fn in (
            ("matmul", lambda: measure_matmul(dev, n, h, v, dt, spec["matmul_seconds"])),
            ("copy", lambda: measure_copy(dev, spec["copy_bytes"], spec["copy_seconds"])),
            ("forward_only", lambda: measure_forward(dev, n, h, v, dt)),
        ):
            try:
                result[key] = fn()
            except Exception as exc:  # noqa: BLE001 — the other parts still run
                _fail(result, key, exc)
            finally:
                dev.clean()
        result["l2_bytes"] = l2_bytes(dev)
        result["status"] = "ok"
    except BaseException as exc:  # noqa: BLE001
        hn.error_fields(result, exc)
    return result


def reference_worker(spec):
    """The exact reference of one shape, saved to ``spec["path"]`` (``torch.save``: loss, d_hidden,
    d_weight in fp32, on the device they were computed on)."""
    result = {"impl": "reference", "status": "error"}
    try:
        import torch

        dev = Dev(spec["device"])
        t0 = time.perf_counter()
        inputs = _inputs(dev, spec)
        result["n_valid"] = int((inputs.labels != IGNORE_INDEX).sum())
        ref = exact_reference(dev, *inputs, BETA, acc=spec["reference_dtype"])
        torch.save(ref, spec["path"])
        result.update(loss=ref["loss"], path=spec["path"], seconds=time.perf_counter() - t0, status="ok")
    except BaseException as exc:  # noqa: BLE001
        hn.error_fields(result, exc)
    return result


def _expo_plan(impl, hidden, weight, labels):
    """The plan our module makes for this call (``FusedLinearDPOLoss.plan_for``): backend, path and
    reason; a failure to plan is recorded, not raised (the row's step then shows what happens)."""
    try:
        import expo_kernels as ek

        mod = ek.FusedLinearDPOLoss(beta=BETA, compute_metrics=False)
        with ek.kernel_options(engine=impl != "expo-recompute"):
            plan = mod.plan_for(weight, hidden, labels=labels)
        return {"backend": plan.backend, "path": plan.path.value, "reason": plan.reason}
    except Exception as exc:  # noqa: BLE001
        return {"backend": None, "path": "unknown", "reason": f"{type(exc).__name__}: {exc}"}


def count_host_syncs(dev, step):
    """Host syncs in one call of ``step``: CUDA's sync debug mode warns at every synchronizing call
    (``.item()``, ``nonzero``, device-to-host copies, ...), the warnings are recorded and counted
    (``simplefilter("always")``: repeats of one call site are not deduplicated). Returns ``{"count",
    "sites": {"file:line": n}}`` (the 10 most frequent), or ``"n/a (cpu)"``."""
    if not dev.cuda:
        return "n/a (cpu)"
    torch = dev.torch
    torch.cuda.synchronize(dev.device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize(dev.device)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    sites = {}
    for w in syncs:
        key = f"{Path(w.filename).name}:{w.lineno}"
        sites[key] = sites.get(key, 0) + 1
    top = dict(sorted(sites.items(), key=lambda kv: -kv[1])[:10])
    return {"count": len(syncs), "sites": top}


def row_worker(spec):
    """One row in this (fresh) process: build, first call, warm-up, timed steps, peak memory, host
    syncs, the rerun check, then the errors against the saved reference. Returns the row dict."""
    result = {"impl": spec["impl"], "status": "error"}
    if os.environ.get(CRASH_ENV) == spec["impl"]:  # test hook: die as a CUDA fault would, no result written
        os.kill(os.getpid(), signal.SIGSEGV)
    try:
        dev = Dev(spec["device"])
        result.update(_run_row(dev, spec))
    except BaseException as exc:  # noqa: BLE001 — OOM, missing library, CUDA error: the row records it
        hn.error_fields(result, exc)
        result["traceback"] = result["traceback"][-4000:]
        if isinstance(exc, ImportError):  # a peer's library (or torch API) that is not there
            result["status"] = "unavailable"
    return result


def _run_row(dev, spec):
    torch = dev.torch
    impl = spec["impl"]
    row = {}
    hidden, ref_hidden, weight, labels = _inputs(dev, spec)
    frozen = impl == "expo-engine-frozen"
    weight.requires_grad_(not frozen)
    row["inputs_bytes"] = sum(t.numel() * t.element_size() for t in (hidden, ref_hidden, weight, labels))
    t_build = time.perf_counter()
    step_fn = build_dpo_step(
        BUILD_NAME.get(impl, impl), dev.device, cce_impl=spec["cce_impl"], liger_compiled=spec["liger_compiled"]
    )
    row["build_s"] = time.perf_counter() - t_build
    if impl in EXPO_ROWS:
        row["plan"] = _expo_plan(impl, hidden, weight, labels)

    def step():
        hidden.grad = None
        weight.grad = None
        return step_fn(hidden, ref_hidden, weight, labels)

    dev.clean()
    row["allocated_before_bytes"] = dev.allocated()
    t0 = time.perf_counter()
    step()
    dev.sync()
    row["first_s"] = time.perf_counter() - t0
    row["first_peak_bytes"] = dev.peak()
    t0 = time.perf_counter()
    step()  # warm-up
    dev.sync()
    est = max(time.perf_counter() - t0, 1e-6)
    repeats = spec["repeats"] or int(max(spec["min_repeats"], min(50, spec["row_seconds"] // est)))
    hidden.grad = None
    weight.grad = None
    gc.collect()
    dev.reset_peak()
    times, loss = [], None
    for _ in range(repeats):
        t, loss = dev.time_call(step)
        times.append(t)
    dev.sync()
    peak = dev.peak()
    row.update(repeats=repeats, times_s=times, median_s=statistics.median(times), min_s=min(times))
    if peak is not None:
        row["peak_bytes"] = peak
        row["work_bytes"] = peak - row["inputs_bytes"]
    row["loss"] = float(loss)
    try:
        row["host_syncs"] = count_host_syncs(dev, step)
    except Exception as exc:  # noqa: BLE001
        row["host_syncs"] = f"unknown ({type(exc).__name__}: {exc})"[:200]
    if spec["rerun"]:  # two steps on the same inputs: bit-identical gradients?
        step()
        d_h, d_w = hidden.grad.clone(), None if weight.grad is None else weight.grad.clone()
        step()
        row["rerun_identical"] = {
            "d_hidden": bool(torch.equal(d_h, hidden.grad)),
            "d_weight": None if d_w is None else bool(torch.equal(d_w, weight.grad)),
        }
        del d_h, d_w
    if spec.get("reference_path"):
        # straight onto this child's device (see the module docstring), after the timed steps and peak
        ref = torch.load(spec["reference_path"], map_location=dev.device, mmap=True, weights_only=True)
        row["loss_rel_err"] = abs(row["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-30)
        row["d_hidden_rel_err"] = _rel_err(dev, hidden.grad, ref["d_hidden"])
        if weight.grad is not None:
            row["d_weight_rel_err"] = _rel_err(dev, weight.grad, ref["d_weight"])
        del ref
    row["status"] = "ok"
    return row


def run_worker(spec):
    """The child's entry (``--_worker``): ``spec["kind"]`` is setup, reference or row."""
    worker = {"setup": setup_worker, "reference": reference_worker, "row": row_worker}[spec["kind"]]
    _threads(spec)
    return worker(spec)


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------

HEAD = [
    "impl",
    "rows×T×H×V",
    "ms",
    "model ms",
    "first s",
    "peak GiB",
    "work GiB",
    "TFLOP/s",
    "% matmul",
    "loss rel err",
    "dH rel err",
    "dW rel err",
    "rerun ==",
    "host syncs",
    "path",
]
STATUS_WORD = {"skipped": "SKIPPED", "unavailable": "UNAVAILABLE"}


def _rerun_cell(r):
    rr = r.get("rerun_identical")
    if not rr:
        return "-"
    same = [v for v in rr.values() if v is not None]
    return "yes" if same and all(same) else "no"


def _syncs_cell(r):
    hs = r.get("host_syncs")
    if isinstance(hs, dict):
        return str(hs.get("count"))
    return str(hs) if hs is not None else "-"


def path_cell(r):
    """Our rows: the module's plan (``backend: path``, ``expo_kernels.Path`` values) and, for the pair
    engine, the roofline's chunking of it (chunks x tokens, stacked reference); ``-`` for the peers."""
    if r["impl"] not in EXPO_ROWS:
        return "-"
    plan = r.get("plan") or {}
    cell = f"{plan.get('backend')}: {plan.get('path', '?')}"
    model = (r.get("model") or {}).get("plan") or {}
    if plan.get("path") == "pair_engine" and model.get("path") == "engine":
        cell += f" {model.get('chunks')}x{model.get('chunk')} tok" + (", stacked ref" if model.get("stacked") else "")
    return cell


def table_lines(rows):
    lines = []
    for r in rows:
        shape = f"{r['rows']}×{r['seq_len']}×{r['hidden']}×{r['vocab']}"
        if r["status"] != "ok":
            word = STATUS_WORD.get(r["status"])
            msg = f"{word}: " + (r.get("error") or "?").splitlines()[0][:160] if word else hn.error_message(r, 160)
            lines.append([r["impl"], shape, msg])
            continue
        pct = r.get("matmul_fraction")
        lines.append(
            [
                r["impl"],
                shape,
                f"{r['median_s'] * 1e3:.2f}",
                f"{r['model_ms']:.2f}" if isinstance(r.get("model_ms"), float) else "-",
                f"{r['first_s']:.2f}",
                hn.gib(r.get("peak_bytes"), 2),
                hn.gib(r.get("work_bytes"), 2),
                f"{r['tflops']:.3g}",
                f"{100 * pct:.0f}%" if isinstance(pct, float) else "-",
                hn.fmt_e(r.get("loss_rel_err")),
                hn.fmt_e(r.get("d_hidden_rel_err")),
                hn.fmt_e(r.get("d_weight_rel_err")),
                _rerun_cell(r),
                _syncs_cell(r),
                path_cell(r),
            ]
        )
    return lines


def notes(payload):
    out = []
    st = payload["settings"]
    mm = payload.get("matmul") or {}
    if mm.get("tflops"):
        out.append(
            f"same-run torch.matmul {st['dtype']} at {mm['shape']}: {mm['tflops']:.3g} TFLOP/s "
            f"(median of {mm['calls']} calls over {mm['timed_s']:.2f} s)"
        )
    elif mm.get("error"):
        out.append(f"same-run matmul: ERROR {mm['error'][:200]}")
    cp = payload.get("copy") or {}
    if cp.get("tbs"):
        out.append(f"device-to-device copy of {hn.gib(cp['bytes'], 2)} GiB: {cp['tbs']:.3g} TB/s (read + write)")
    l2 = payload.get("l2_bytes")
    out.append(f"L2: {l2 / 2**20:.0f} MiB" if l2 else "L2: n/a (model without L2 credit)")
    fw = payload.get("forward_only") or {}
    if fw.get("tflops"):
        frac = f" = {100 * fw['matmul_fraction']:.0f}% of matmul" if fw.get("matmul_fraction") else ""
        out.append(
            f"forward-only expo linear_logprobs at {fw['shape']}: {fw['median_s'] * 1e3:.3g} ms, "
            f"{fw['tflops']:.3g} TFLOP/s{frac} (target >= 75%)"
        )
    elif fw.get("error"):
        out.append(f"forward-only expo linear_logprobs: ERROR {fw['error'][:200]}")
    for label, ref in (payload.get("references") or {}).items():
        if ref.get("status") == "ok":
            out.append(f"reference ({label}, {st['reference_dtype']}): loss {ref['loss']:.6f}, {ref['seconds']:.1f} s")
        else:
            out.append(f"reference ({label}): {ref.get('error', '?')[:200]} (no accuracy columns)")
    if not st.get("liger_compiled", True):
        out.append("liger ran uncompiled (compiled=False: --quick on the CPU, where compiling costs seconds per row)")
    if st.get("cce_impl") != "cce":
        out.append(f"cce ran impl={st.get('cce_impl')!r} (no gradient filtering on that path: exact)")
    timing = "CUDA events" if payload["device"].get("device_type") == "cuda" else "wall clock"
    out.append(
        f"ms = median step ({timing}); peak = max_memory_allocated over the timed steps (CUDA only); work = peak "
        "- inputs; TFLOP/s on the FLOPs needed (8 x counted tokens x H x V, 6 with the frozen head); % matmul = "
        "over the same-run matmul rate; rel errs vs the exact reference (Frobenius); rerun == : two more steps "
        "give bit-identical d_hidden and d_weight; host syncs: one step under torch.cuda.set_sync_debug_mode"
        "('warn'); path: FusedLinearDPOLoss.plan_for and benchmarks.roofline.engine_plan; model ms = "
        "benchmarks.roofline.predict_step on that path at the same-run matmul rate, copy bandwidth and L2; "
        "naive gathers the counted tokens before its matmul; every row ran in its own process"
    )
    return out


def render(payload, markdown):
    text = hn.render_table(HEAD, table_lines(payload["results"]), markdown=markdown)
    n = notes(payload)
    if markdown:
        dirty = " (dirty tree)" if payload.get("git_dirty") else ""
        head = (
            f"DPO step on {payload['device'].get('device_name')} — torch {payload['versions'].get('torch')}, "
            f"triton {payload['versions'].get('triton')}, commit {str(payload.get('git_commit'))[:10]}{dirty}\n\n"
        )
        return head + text + "\n\n" + "\n".join(f"- {x}" for x in n) + "\n"
    return text + "\n\n" + "\n".join(n)


def write_outputs(payload, json_path, md_path):
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(payload, f, indent=2, default=str)
    if md_path:
        Path(md_path).parent.mkdir(parents=True, exist_ok=True)
        Path(md_path).write_text(render(payload, markdown=True))


# ----------------------------------------------------------------------------------------------
# Parent (no torch)
# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_dpo_gpu",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:i or cpu (logic tests)")
    p.add_argument("--quick", action="store_true", help="tiny smoke shape: 2 pairs x 64 tokens, H=64, V=512")
    p.add_argument("--pairs", "-B", type=int, help="pairs (2B rows; default 4; quick 2)")
    p.add_argument("--seq-len", "-T", type=int, help="tokens per row (default 1024; quick 64)")
    p.add_argument("--hidden", "-H", type=int, help="hidden size (default 4096; quick 64)")
    p.add_argument("--vocab", "-V", type=int, help="vocabulary (default 128256; quick 512)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--impls", nargs="+", help=f"subset of {', '.join(ALL_IMPLS)} (default: all, in this order)")
    p.add_argument("--long-context", action="store_true", help="add one pair of 32768-token rows (quick: 1024)")
    p.add_argument("--long-impls", nargs="+", default=list(LONG_IMPLS), help="the long-context rows")
    p.add_argument("--long-seq-len", type=int, help="tokens per long-context row (default 32768; quick 1024)")
    p.add_argument("--repeats", type=int, help="timed steps per row (default: fit --row-seconds)")
    p.add_argument("--min-repeats", type=int, help="fewest timed steps (default 20 on CUDA, 3 on the CPU)")
    p.add_argument("--row-seconds", type=float, help="target timed seconds per row (default 6; quick 0.3)")
    p.add_argument("--row-timeout", type=float, default=180.0, help="seconds before a row's child is killed")
    p.add_argument("--budget-s", type=float, help="start no child after this many seconds from the start")
    p.add_argument(
        "--matmul-seconds", type=float, help="least timed seconds of the matmul rate (default 1; quick on the CPU 0.25)"
    )
    p.add_argument("--cce-impl", help="cut-cross-entropy impl (default: cce on CUDA, torch_compile elsewhere)")
    p.add_argument(
        "--liger-compiled",
        action=argparse.BooleanOptionalAction,
        help="Liger's compiled= (default: its own default, True; False for --quick on the CPU)",
    )
    p.add_argument("--model-chunk", type=int, help="override the engine chunk of the roofline model")
    p.add_argument("--reference-dtype", choices=["fp64", "fp32"], default="fp64", help="the exact reference's dtype")
    p.add_argument("--no-reference", action="store_true", help="skip the exact reference (no accuracy columns)")
    p.add_argument(
        "--no-rerun-check", "--no-determinism", dest="no_rerun", action="store_true", help="skip the rerun check"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--logit-std", type=float, default=2.0)
    p.add_argument("--json", help="output JSON (default benchmarks/results/bench_dpo_gpu[_quick].json)")
    p.add_argument("--markdown", help="also write the table as Markdown to this path")
    hn.add_worker_args(p)
    return p.parse_args(argv)


def _impl_list(names, what):
    out = []
    for name in names:
        name = IMPL_ALIASES.get(name, name)
        if name not in ALL_IMPLS:
            raise SystemExit(f"unknown implementation {name!r} in {what}; choose from {ALL_IMPLS}")
        out.append(name)
    return list(dict.fromkeys(out))


def counted_per_pair(seq_len):
    """Counted tokens of one pair (2 rows of ``seq_len``, the first ``round(seq_len / 3)`` prompt)."""
    return 2 * (seq_len - int(round(PROMPT_FRAC * seq_len)))


def main(argv=None):
    args = parse_args(argv)
    if hn.worker_main(args, run_worker):
        return 0
    t_start = time.perf_counter()
    quick = args.quick
    cuda = args.device.startswith("cuda")
    pairs = args.pairs or (2 if quick else 4)
    seq_len = args.seq_len or (64 if quick else 1024)
    hidden = args.hidden or (64 if quick else 4096)
    vocab = args.vocab or (512 if quick else 128256)
    long_seq = args.long_seq_len or (1024 if quick else 32768)
    dtype = args.dtype or ("bf16" if cuda else "fp32")
    impls = _impl_list(args.impls or ALL_IMPLS, "--impls")
    long_impls = _impl_list(args.long_impls, "--long-impls")
    cce_impl = args.cce_impl or ("cce" if cuda else "torch_compile")
    liger_compiled = args.liger_compiled if args.liger_compiled is not None else (cuda or not quick)
    json_path = args.json or str(hn.RESULTS_DIR / ("bench_dpo_gpu_quick.json" if quick else "bench_dpo_gpu.json"))
    grace = 30.0 if args.budget_s is None else min(30.0, max(5.0, args.budget_s / 4))
    common = dict(
        threads=1 if quick and not cuda else None,
        device=args.device,
        dtype=dtype,
        seed=args.seed,
        logit_std=args.logit_std,
        hidden=hidden,
        vocab=vocab,
    )

    def elapsed():
        return time.perf_counter() - t_start

    def over_budget():
        return args.budget_s is not None and elapsed() > args.budget_s

    def child_limit():
        limit = args.row_timeout
        if args.budget_s is not None:
            limit = min(limit, max(args.budget_s - elapsed(), 0) + grace)
        return max(limit, 10.0)

    shapes = [("default", pairs, seq_len, impls)]
    if args.long_context:
        shapes.append(("long", 1, long_seq, long_impls))
    settings = {
        "pairs": pairs,
        "seq_len": seq_len,
        "hidden": hidden,
        "vocab": vocab,
        "dtype": dtype,
        "prompt_frac": PROMPT_FRAC,
        "beta": BETA,
        "impls": impls,
        "long_context": args.long_context,
        "long_impls": long_impls,
        "long_seq_len": long_seq,
        "repeats": args.repeats,
        "min_repeats": args.min_repeats or (20 if cuda else 3),
        "row_seconds": args.row_seconds or (0.3 if quick and not cuda else 6.0),
        "row_timeout": args.row_timeout,
        "budget_s": args.budget_s,
        "grace_s": grace,
        "child_threads": common["threads"] or "torch's default",
        "matmul_seconds": args.matmul_seconds or (0.25 if quick and not cuda else 1.0),
        "cce_impl": cce_impl,
        "liger_compiled": liger_compiled,
        "model_chunk": args.model_chunk or "the engine's plan (benchmarks.roofline.engine_plan)",
        "seed": args.seed,
        "reference_dtype": args.reference_dtype,
        "reference": "exact step by chunks of tokens, hand-written gradient, in a child; saved with torch.save and "
        "loaded by each row's child onto its device; the reference pass has its own hidden states and the "
        "policy head detached",
        "processes": "one child per row (benchmarks._harness.spawn_worker); setup and reference children",
        "renamed": dict(IMPL_ALIASES),
    }
    payload = {"settings": settings, "results": []}
    current = None  # the row being measured, recorded if the run is interrupted
    with tempfile.TemporaryDirectory(prefix="bench_dpo_gpu_") as tmp:
        try:
            n0 = pairs * counted_per_pair(seq_len)
            setup = hn.spawn_worker(
                MODULE,
                dict(
                    kind="setup",
                    impl="setup",
                    threads=common["threads"],
                    device=args.device,
                    dtype=dtype,
                    mm_shape=[n0, hidden, vocab],
                    matmul_seconds=settings["matmul_seconds"],
                    copy_seconds=0.05 if quick and not cuda else 0.2,
                    copy_bytes=(1 << 30) if cuda else (64 << 20 if quick else 256 << 20),
                ),
                max(child_limit(), 60.0),
                tmp,
            )
            info = setup.get("info") or {"device": args.device, "device_type": args.device.split(":")[0]}
            payload = {
                **hn.result_header(
                    "bench_dpo_gpu",
                    MODULE,
                    argv,
                    {"versions": {}, **info},
                    ("device", "device_type", "device_name", "cuda", "cpu_count", "torch_threads", "expo_backends"),
                    dirty=True,
                ),
                "settings": settings,
                "matmul": setup.get("matmul"),
                "copy": setup.get("copy"),
                "l2_bytes": setup.get("l2_bytes"),
                "forward_only": setup.get("forward_only"),
                "references": {},
                "results": [],
            }
            if setup.get("status") != "ok":
                payload["setup_error"] = setup.get("error")
            print(
                f"device: {info.get('device_name')} ({args.device}); versions {payload['versions']}; "
                f"setup {setup.get('status')} {setup.get('error', '')}",
                flush=True,
            )
            for key in ("matmul", "copy", "forward_only"):
                print(f"{key}: {_short(payload[key])}", flush=True)
            mm_tflops = (payload["matmul"] or {}).get("tflops")
            fw = payload["forward_only"] or {}
            if mm_tflops and fw.get("tflops"):
                fw["matmul_fraction"] = fw["tflops"] / mm_tflops
            fatal = setup.get("status") != "ok" and "is_available() is False" in str(setup.get("error"))
            write_outputs(payload, json_path, args.markdown)

            for label, b, t, names in shapes:
                rows = 2 * b
                shape = dict(common, pairs=b, seq_len=t)
                n_valid = b * counted_per_pair(t)
                meta = dict(label=label, rows=rows, pairs=b, seq_len=t, hidden=hidden, vocab=vocab, n_valid=n_valid)
                ref_path = None
                if fatal:
                    why = f"setup failed: {setup.get('error')}"
                elif over_budget():
                    why = "budget spent"
                else:
                    why = None
                    if not args.no_reference:
                        ref_path = str(Path(tmp) / f"reference_{label}.pt")
                        t0 = time.perf_counter()
                        ref = hn.spawn_worker(
                            MODULE,
                            dict(shape, kind="reference", impl="reference", path=ref_path,
                                 reference_dtype=args.reference_dtype),
                            child_limit(),
                            tmp,
                        )  # fmt: skip
                        ref.pop("traceback", None)
                        payload["references"][label] = ref
                        if ref.get("status") != "ok":
                            ref_path = None
                        print(f"[{label}] reference: {_short_ref(ref)} ({time.perf_counter() - t0:.1f} s)", flush=True)
                for impl in names:
                    if impl == "cce-filtered" and cce_impl != "cce" and not fatal:  # no child needed
                        payload["results"].append(
                            dict(meta, impl=impl, status="skipped",
                                 error=f"gradient filtering exists only in impl='cce' (CUDA); this run's cce is "
                                 f"impl={cce_impl!r}, whose row is the same computation")
                        )  # fmt: skip
                        continue
                    if why is None and over_budget():
                        why = "budget spent"
                    if why is not None:
                        status = "error" if fatal else "skipped"
                        payload["results"].append(dict(meta, impl=impl, status=status, error=why))
                        continue
                    t0 = time.perf_counter()
                    spec = dict(
                        shape,
                        kind="row",
                        impl=impl,
                        label=label,
                        repeats=args.repeats,
                        min_repeats=settings["min_repeats"],
                        row_seconds=settings["row_seconds"],
                        cce_impl=cce_impl,
                        liger_compiled=liger_compiled,
                        rerun=not args.no_rerun,
                        reference_path=ref_path,
                    )
                    current = dict(meta, impl=impl, status="error", error="interrupted (time limit)")
                    row = hn.spawn_worker(MODULE, spec, child_limit(), tmp)
                    current = None
                    row = {**meta, **row, "impl": impl}
                    row["wall_s"] = time.perf_counter() - t0
                    _finish_row(row, payload, args)
                    payload["results"].append(row)
                    payload["elapsed_s"] = elapsed()
                    write_outputs(payload, json_path, args.markdown)
                    print(f"[{label}] {impl}: {_row_summary(row)} ({row['wall_s']:.1f} s)", flush=True)
                if ref_path and os.path.exists(ref_path):
                    os.remove(ref_path)  # up to ~3 GB at the long shape
        except KeyboardInterrupt:  # `timeout -s INT`: keep what was measured
            payload["interrupted"] = True
            if current is not None:
                payload["results"].append(current)
            print("interrupted: writing what was measured", flush=True)
        except Exception as exc:  # noqa: BLE001 — a bug outside the rows: still write and print the rest
            payload["fatal_error"] = f"{type(exc).__name__}: {exc}"
            payload["fatal_traceback"] = traceback.format_exc()[-4000:]
            print(f"FATAL {payload['fatal_error']}\n{payload['fatal_traceback']}", flush=True)
    payload["elapsed_s"] = elapsed()
    if "device" not in payload:  # interrupted before the setup child answered
        payload.update(device={"device": args.device}, versions={}, matmul=None, forward_only=None)
    write_outputs(payload, json_path, args.markdown)
    print()
    print(render(payload, markdown=False))
    print(f"\nwrote {json_path}" + (f" and {args.markdown}" if args.markdown else "") + f" in {elapsed():.1f} s")
    if args.markdown:
        print("\n" + render(payload, markdown=True))
    return 0


def _finish_row(row, payload, args):
    """FLOPs needed, the rate and its fraction of the matmul, and (our rows) the roofline model."""
    if row["status"] != "ok":
        return
    per = FLOPS_PER_TOKEN_HV.get(row["impl"], 8)
    needed = per * row["n_valid"] * row["hidden"] * row["vocab"]
    row["tflop_needed"] = needed / 1e12
    row["tflops"] = needed / row["median_s"] / 1e12
    mm = (payload.get("matmul") or {}).get("tflops")
    if mm:
        row["matmul_fraction"] = row["tflops"] / mm
    if row["impl"] not in MODEL_PATH:
        return
    engine, trained = MODEL_PATH[row["impl"]]
    copy = (payload.get("copy") or {}).get("tbs")
    if not (mm and copy):
        row["model_error"] = "no same-run matmul rate or copy bandwidth"
        return
    try:
        l2 = payload.get("l2_bytes")
        pred = roofline.predict_step(
            [counted_per_pair(row["seq_len"])] * row["pairs"],
            row["hidden"],
            row["vocab"],
            dtype=payload["settings"]["dtype"],
            trained_head=trained,
            engine=engine,
            device_type=args.device.split(":")[0],
            chunk=args.model_chunk,
            matmul_tflops=mm,
            hbm_tbs=copy,
            l2_mb=l2 / 1e6 if l2 else None,
        )
        row["model_ms"] = pred["total_ms"]
        row["model_floor_ms"] = pred["floor_ms"]
        row["model"] = pred
    except Exception as exc:  # noqa: BLE001
        row["model_error"] = repr(exc)


def _short(d):
    if not d:
        return "-"
    if d.get("error"):
        return "ERROR " + d["error"][:200]
    if "tbs" in d:
        return f"{d['tbs']:.3g} TB/s copying {hn.gib(d['bytes'], 2)} GiB"
    return f"{d['median_s'] * 1e3:.3f} ms, {d['tflops']:.3g} TFLOP/s at {d['shape']}"


def _short_ref(d):
    if d.get("status") != "ok":
        return "ERROR " + (d.get("error") or "?").splitlines()[0][:200]
    return f"loss {d['loss']:.6f}, {d['n_valid']} counted tokens"


def _row_summary(row):
    if row["status"] != "ok":
        return f"{row['status'].upper()} " + (row.get("error") or "?").splitlines()[0][:200]
    parts = [f"{row['median_s'] * 1e3:.2f} ms x{row['repeats']}", f"first {row['first_s']:.2f} s"]
    if row.get("peak_bytes") is not None:
        parts.append(f"peak {hn.gib(row['peak_bytes'], 2)} GiB")
    parts.append(f"{row['tflops']:.3g} TFLOP/s")
    if row.get("d_hidden_rel_err") is not None:
        parts.append(f"dH err {row['d_hidden_rel_err']:.1e}")
    parts.append(f"rerun == {_rerun_cell(row)}")
    parts.append(f"host syncs {_syncs_cell(row)}")
    if row["impl"] in EXPO_ROWS:
        parts.append(f"path {path_cell(row)}")
    return ", ".join(parts)


if __name__ == "__main__":
    sys.exit(main())

"""A whole DPO loss step on a GPU: time, peak memory, FLOP rate and accuracy of every implementation.

One step (as ``bench_dpo_cpu``): the policy pass through the LM head with gradient, the reference
pass forward-only (no graph; its own hidden states, the policy's head detached), per-sequence sums of
the completion log-probs, the sigmoid DPO loss ``-logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))``
averaged over pairs, and ``backward()``: gradients reach the policy hidden states and the LM-head
weight (not the frozen head's). Rows of the batch: B chosen then B rejected sequences of T tokens;
the first third of every row is prompt (label -100). Default shape: B=4 pairs, T=1024 (N=8192 tokens,
5461 counted), H=4096, V=128256, bf16 hidden states and weight.

Implementations (``--impls``; the step builders are ``bench_dpo_cpu.build_dpo_step``'s):

* ``expo-engine`` — ``expo_kernels.FusedLinearDPOLoss`` (metrics off), default options: the chunked
  engine where it serves the call, else the op (8 NHV FLOPs needed);
* ``expo-engine-frozen`` — the same with a frozen head (no ``d_weight``: 6 NHV);
* ``expo-previous`` — the same module under ``kernel_options(engine=False)``: the op's recompute path;
* ``naive`` — full ``[N, V]`` logits, ``log_softmax`` in fp32, ``gather``;
* ``trl`` — TRL's ``ChunkedLogProbFunction`` on the counted tokens;
* ``liger`` — Liger-Kernel's ``LigerFusedLinearDPOLoss`` (its defaults: compiled, a pair per chunk);
* ``cce`` — Cut Cross-Entropy ``linear_cross_entropy(..., reduction="none")``, ``impl="cce"`` on CUDA
  (``torch_compile`` elsewhere; ``--cce-impl`` to choose).

All rows run in this one process, one after the other, on the same inputs; between rows everything
the row made is deleted, then ``gc.collect()``, ``torch.cuda.empty_cache()`` and
``torch.cuda.reset_peak_memory_stats()``. Per row: the first call (compilation, autotuning
included), one untimed warm-up, then the median of ``--repeats`` steps (default: as many as fit
``--row-seconds``, 3 to 50) timed with CUDA events. Peak = ``torch.cuda.max_memory_allocated`` over
the timed steps; working memory = peak - the inputs' bytes. FLOPs needed = 8 x counted tokens x H x V
(6 with the frozen head); the rate is compared with the same-run ``torch.matmul`` rate at
``[N_valid, H] x [H, V]`` in the input dtype. Accuracy: the loss, ``d_hidden`` and ``d_weight`` of
the last step against an exact reference (the same step in float64 -- fp32 with exact matmuls via
``--reference-dtype fp32`` -- computed by chunks of tokens with the gradient written out by hand:
``dZ = g (onehot - softmax)``), as relative errors (Frobenius norms). ``model ms``: ``benchmarks.roofline.predict`` at the same-run matmul rate.

Also measured: the forward-only ``expo_kernels.linear_logprobs`` at the matmul's shape (target:
>= 75% of the matmul rate), and whether two ``expo-engine`` steps on the same inputs give bit-identical
``d_hidden`` and ``d_weight``. ``--long-context`` adds one pair of 32768-token sequences (2 rows x
32768) for ``--long-impls`` (default expo-engine, liger, cce).

    python -m benchmarks.bench_dpo_gpu                                  # the default shape on CUDA
    python -m benchmarks.bench_dpo_gpu --long-context --budget-s 270 --json out.json --markdown out.md
    python -m benchmarks.bench_dpo_gpu --device cpu --quick --impls expo-engine expo-previous naive trl cce

``--budget-s``: no row starts after that many seconds (the rows left are recorded as skipped). The
JSON and the Markdown table are rewritten after every row, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import math
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/bench_dpo_gpu.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _harness as hn  # noqa: E402
from benchmarks import roofline  # noqa: E402
from benchmarks._workloads import IGNORE_INDEX, PROMPT_FRAC, dpo_sigmoid, make_dpo_inputs, torch_dtype  # noqa: E402
from benchmarks.bench_dpo_cpu import BETA, build_dpo_step  # noqa: E402

ALL_IMPLS = ("expo-engine", "expo-engine-frozen", "expo-previous", "naive", "cce", "liger", "liger-api", "trl")
LONG_IMPLS = ("expo-engine", "liger", "cce")
FLOPS_PER_TOKEN_HV = {"expo-engine-frozen": 6}  # else 8
MODEL_PATH = {
    "expo-engine": ("engine", True),
    "expo-engine-frozen": ("engine", False),
    "expo-previous": ("recompute", True),
}


class RowTimeout(Exception):
    pass


def _alarm(seconds):
    """Raise RowTimeout in this (main) thread after ``seconds`` (0 = cancel); no-op off Unix."""
    if not hasattr(signal, "SIGALRM"):
        return

    def handler(signum, frame):
        raise RowTimeout(f"row exceeded its {seconds:.0f} s limit (--row-timeout / --budget-s)")

    if seconds and seconds > 0:
        signal.signal(signal.SIGALRM, handler)
        signal.alarm(max(1, int(math.ceil(seconds))))
    else:
        signal.alarm(0)


# ----------------------------------------------------------------------------------------------
# Device helpers
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
# Same-run matmul rate and the forward-only op
# ----------------------------------------------------------------------------------------------


def measure_matmul(dev, n, h, v, dtype, repeats=10):
    """``torch.matmul([n, h], [v, h]^T)`` in ``dtype`` with random data: median seconds and TFLOP/s."""
    torch = dev.torch
    gen = torch.Generator(device=dev.device)
    gen.manual_seed(1)
    a = torch.randn(n, h, generator=gen, device=dev.device).to(dtype)
    w = (torch.randn(v, h, generator=gen, device=dev.device) / h**0.5).to(dtype)
    try:
        t = _median_time(dev, lambda: torch.matmul(a, w.t()), 3, repeats)
    finally:
        a = w = None
        dev.clean()
    return {"shape": [n, h, v], "median_s": t, "tflops": 2.0 * n * h * v / t / 1e12}


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
# exact reference (chunked, memory-bounded)
# ----------------------------------------------------------------------------------------------


def exact_reference(dev, hidden, ref_hidden, weight, labels, beta, acc="fp64", chunk_tokens=2048):
    """The step in ``acc`` (float64 by default; fp32 with exact matmuls, no TF32, on request), by chunks
    of counted tokens: loss, ``d_hidden [2B, T, H]`` and ``d_weight [V, H]`` (rounded to fp32, moved to
    the CPU). The gradient by hand: with ``g`` the loss's derivative by the token's sequence log-prob,
    ``dZ = g (onehot(label) - softmax(Z))``, ``dH = dZ W``, ``dW = sum dZ^T h``. (In fp32 the margin,
    a small difference of sums of hundreds of log-probs, is only good to ~1e-6 relative.)"""
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
            d_w = d_w.float().cpu()
        return {"loss": float(loss.detach()), "d_hidden": d_h.view(rows, seq, width).cpu(), "d_weight": d_w}
    finally:
        torch.set_float32_matmul_precision(prec)
        if dev.cuda:
            torch.backends.cuda.matmul.allow_tf32 = tf32


def _rel_err(dev, got, ref_cpu):
    """||got - ref|| / ||ref|| in fp32 (Frobenius), on ``got``'s device."""
    torch = dev.torch
    ref = ref_cpu.to(got.device)
    try:
        num = torch.linalg.vector_norm(got.float() - ref).item()
        den = torch.linalg.vector_norm(ref).item()
    finally:
        del ref
    return num / max(den, 1e-30)


# ----------------------------------------------------------------------------------------------
# One row
# ----------------------------------------------------------------------------------------------


def run_row(dev, impl, inputs, spec, reference, determinism=False):
    """Measure ``impl`` on ``inputs`` (a DPOInputs); returns the row dict (status ok or error)."""
    torch = dev.torch
    hidden, ref_hidden, weight, labels = inputs
    row = {"impl": impl, "status": "error"}
    frozen = impl == "expo-engine-frozen"
    step_fn = None
    loss = None
    try:
        weight.requires_grad_(not frozen)
        hidden.grad = None
        weight.grad = None
        dev.clean()
        t_build = time.perf_counter()
        step_fn = build_dpo_step(impl, dev.device, cce_impl=spec["cce_impl"])
        row["build_s"] = time.perf_counter() - t_build
        if impl.startswith("expo"):
            row["engine_backend"] = _engine_backend(impl, hidden, weight)

        def step():
            hidden.grad = None
            weight.grad = None
            return step_fn(hidden, ref_hidden, weight, labels)

        inputs_bytes = sum(t.numel() * t.element_size() for t in (hidden, ref_hidden, weight, labels))
        row["inputs_bytes"] = inputs_bytes
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
        repeats = spec["repeats"]
        if repeats is None:
            repeats = int(max(3, min(50, spec["row_seconds"] // est)))
        hidden.grad = None
        weight.grad = None
        gc.collect()
        dev.reset_peak()
        times = []
        for _ in range(repeats):
            t, loss = dev.time_call(step)
            times.append(t)
        dev.sync()
        peak = dev.peak()
        row.update(repeats=repeats, times_s=times, median_s=statistics.median(times), min_s=min(times))
        if peak is not None:
            row["peak_bytes"] = peak
            row["work_bytes"] = peak - inputs_bytes
        row["loss"] = float(loss)
        if reference is not None:
            row["loss_rel_err"] = abs(row["loss"] - reference["loss"]) / max(abs(reference["loss"]), 1e-30)
            row["d_hidden_rel_err"] = _rel_err(dev, hidden.grad, reference["d_hidden"])
            if weight.grad is not None:
                row["d_weight_rel_err"] = _rel_err(dev, weight.grad, reference["d_weight"])
        if determinism:
            step()
            d_h, d_w = hidden.grad.clone(), None if weight.grad is None else weight.grad.clone()
            step()
            row["deterministic"] = {
                "d_hidden": bool(torch.equal(d_h, hidden.grad)),
                "d_weight": None if d_w is None else bool(torch.equal(d_w, weight.grad)),
            }
            del d_h, d_w
        row["status"] = "ok"
    except BaseException as exc:  # noqa: BLE001 — OOM, missing library, timeout: the row records it
        if isinstance(exc, KeyboardInterrupt):
            raise
        row["error"] = f"{type(exc).__name__}: {exc}".strip()
        row["traceback"] = traceback.format_exc()[-4000:]
    finally:
        _alarm(0)
        step_fn = loss = None
        hidden.grad = None
        weight.grad = None
        weight.requires_grad_(True)
        try:
            dev.clean()
        except Exception:  # noqa: BLE001
            pass
    return row


def _engine_backend(impl, hidden, weight):
    """What the module's engine check says for this call (None: the op's path); private API, so
    any failure is recorded as unknown."""
    try:
        import expo_kernels as ek

        mod = ek.FusedLinearDPOLoss(beta=BETA, compute_metrics=False)
        with ek.kernel_options(engine=impl != "expo-previous"):
            return str(mod._engine_backend(weight, hidden, None))
    except Exception as exc:  # noqa: BLE001
        return f"unknown ({type(exc).__name__})"


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
    "TFLOP needed",
    "TFLOP/s",
    "% matmul",
    "loss rel err",
    "dH rel err",
    "dW rel err",
]


def table_lines(rows):
    lines = []
    for r in rows:
        shape = f"{r['rows']}×{r['seq_len']}×{r['hidden']}×{r['vocab']}"
        if r["status"] != "ok":
            msg = "SKIPPED: " + r.get("error", "") if r["status"] == "skipped" else hn.error_message(r, 120)
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
                f"{r['tflop_needed']:.3g}",
                f"{r['tflops']:.3g}",
                f"{100 * pct:.0f}%" if isinstance(pct, float) else "-",
                hn.fmt_e(r.get("loss_rel_err")),
                hn.fmt_e(r.get("d_hidden_rel_err")),
                hn.fmt_e(r.get("d_weight_rel_err")),
            ]
        )
    return lines


def notes(payload):
    out = []
    mm = payload.get("matmul") or {}
    if mm.get("tflops"):
        out.append(f"same-run torch.matmul {payload['settings']['dtype']} at {mm['shape']}: {mm['tflops']:.1f} TFLOP/s")
    fw = payload.get("forward_only") or {}
    if fw.get("tflops"):
        frac = f" = {100 * fw['matmul_fraction']:.0f}% of matmul" if fw.get("matmul_fraction") else ""
        out.append(
            f"forward-only expo linear_logprobs at {fw['shape']}: {fw['median_s'] * 1e3:.2f} ms, "
            f"{fw['tflops']:.1f} TFLOP/s{frac} (target >= 75%)"
        )
    elif fw.get("error"):
        out.append(f"forward-only expo linear_logprobs: ERROR {fw['error'][:200]}")
    engine = {f"{r['impl']} ({r['label']})": r["engine_backend"] for r in payload["results"] if "engine_backend" in r}
    if engine:
        out.append("engine check (FusedLinearDPOLoss._engine_backend; None = the op's path): " + str(engine))
    for r in payload["results"]:
        if r.get("deterministic"):
            out.append(f"determinism ({r['impl']}, {r['label']}): two steps bit-identical {r['deterministic']}")
    out.append(
        f"ms = median step ({'CUDA events' if payload['device'].get('device_type') == 'cuda' else 'wall clock'}); peak = max_memory_allocated over the timed steps; work = peak - inputs; "
        "TFLOP needed = 8 x counted tokens x H x V (6 frozen head); % matmul = TFLOP/s over the same-run matmul "
        "rate; rel errs vs an exact (fp64) reference (Frobenius); model ms = benchmarks.roofline at the same-run rate"
    )
    return out


def render(payload, markdown):
    text = hn.render_table(HEAD, table_lines(payload["results"]), markdown=markdown)
    n = notes(payload)
    if markdown:
        head = (
            f"DPO step on {payload['device'].get('device_name')} — torch {payload['versions'].get('torch')}, "
            f"triton {payload['versions'].get('triton')}, commit {str(payload.get('git_commit'))[:10]}\n\n"
        )
        return head + text + "\n\n" + "\n".join(f"- {x}" for x in n) + "\n"
    return text + "\n\n" + "\n".join(n)


def write_outputs(payload, json_path, md_path):
    import json

    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(payload, f, indent=2, default=str)
    if md_path:
        Path(md_path).parent.mkdir(parents=True, exist_ok=True)
        Path(md_path).write_text(render(payload, markdown=True))


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_dpo_gpu",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:i or cpu (logic tests)")
    p.add_argument("--quick", action="store_true", help="tiny smoke shape: N=256, H=64, V=512")
    p.add_argument("--pairs", "-B", type=int, help="pairs (2B rows; default 4; quick 2)")
    p.add_argument("--seq-len", "-T", type=int, help="tokens per row (default 1024; quick 64)")
    p.add_argument("--hidden", "-H", type=int, help="hidden size (default 4096; quick 64)")
    p.add_argument("--vocab", "-V", type=int, help="vocabulary (default 128256; quick 512)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--impls", nargs="+", help=f"subset of {', '.join(ALL_IMPLS)} (default: all)")
    p.add_argument("--long-context", action="store_true", help="add one pair of 32768-token rows (quick: 1024)")
    p.add_argument("--long-impls", nargs="+", default=list(LONG_IMPLS), help="the long-context rows")
    p.add_argument("--long-seq-len", type=int, help="tokens per long-context row (default 32768; quick 1024)")
    p.add_argument("--repeats", type=int, help="timed steps per row (default: fit --row-seconds, 3..50)")
    p.add_argument("--row-seconds", type=float, default=6.0, help="target timed seconds per row")
    p.add_argument("--row-timeout", type=float, default=120.0, help="seconds before a row is abandoned")
    p.add_argument("--budget-s", type=float, help="start no row after this many seconds from the start")
    p.add_argument("--cce-impl", help="cut-cross-entropy impl (default: cce on CUDA, torch_compile elsewhere)")
    p.add_argument(
        "--model-chunk",
        type=int,
        help="engine chunk for the roofline model (default: whole pairs to the engine's target)",
    )
    p.add_argument("--reference-dtype", choices=["fp64", "fp32"], default="fp64", help="the exact reference's dtype")
    p.add_argument("--no-reference", action="store_true", help="skip the exact reference (no accuracy columns)")
    p.add_argument("--no-determinism", action="store_true", help="skip the expo-engine determinism check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--logit-std", type=float, default=2.0)
    p.add_argument("--json", help="output JSON (default benchmarks/results/bench_dpo_gpu[_quick].json)")
    p.add_argument("--markdown", help="also write the table as Markdown to this path")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    t_start = time.perf_counter()
    quick = args.quick
    pairs = args.pairs or (2 if quick else 4)
    seq_len = args.seq_len or (64 if quick else 1024)
    hidden = args.hidden or (64 if quick else 4096)
    vocab = args.vocab or (512 if quick else 128256)
    long_seq = args.long_seq_len or (1024 if quick else 32768)
    impls = list(dict.fromkeys(args.impls or ALL_IMPLS))
    for name in impls + list(args.long_impls):
        if name not in ALL_IMPLS:
            raise SystemExit(f"unknown implementation {name!r}; choose from {ALL_IMPLS}")
    json_path = args.json or str(hn.RESULTS_DIR / ("bench_dpo_gpu_quick.json" if quick else "bench_dpo_gpu.json"))

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False (use --device cpu for a logic test)")
    dev = Dev(args.device)
    dt = torch_dtype(args.dtype)
    try:
        info = hn.environment(str(dev.device))
    except Exception as exc:  # noqa: BLE001
        info = {"device": str(dev.device), "versions": {"torch": torch.__version__}, "env_error": repr(exc)}
    payload = {
        **hn.result_header(
            "bench_dpo_gpu",
            "benchmarks.bench_dpo_gpu",
            argv,
            info,
            ("device", "device_type", "device_name", "cuda", "cpu_count", "torch_threads", "expo_backends"),
            dirty=True,
        ),
        "settings": {
            "pairs": pairs,
            "seq_len": seq_len,
            "hidden": hidden,
            "vocab": vocab,
            "dtype": args.dtype,
            "prompt_frac": PROMPT_FRAC,
            "beta": BETA,
            "impls": impls,
            "long_context": args.long_context,
            "long_impls": list(args.long_impls),
            "long_seq_len": long_seq,
            "repeats": args.repeats,
            "row_seconds": args.row_seconds,
            "budget_s": args.budget_s,
            "cce_impl": args.cce_impl or ("cce" if dev.cuda else "torch_compile"),
            "model_chunk": args.model_chunk or "whole pairs up to expo_kernels.engine.CHUNK_TOKENS",
            "seed": args.seed,
            "reference_dtype": args.reference_dtype,
            "reference": "exact (fp64 default) step by chunks of tokens, hand-written gradient; the reference pass "
            "has its own hidden states and the policy head detached",
        },
        "matmul": None,
        "forward_only": None,
        "results": [],
    }
    print(
        f"device: {info.get('device_name')} ({dev.device}); torch {torch.__version__}; versions {payload['versions']}",
        flush=True,
    )

    def elapsed():
        return time.perf_counter() - t_start

    def over_budget():
        return args.budget_s is not None and elapsed() > args.budget_s

    def row_limit():
        limit = args.row_timeout
        if args.budget_s is not None:
            limit = min(limit, max(args.budget_s - elapsed(), 0) + 30)
        return max(limit, 10)

    shapes = [("default", pairs, seq_len, impls)]
    if args.long_context:
        shapes.append(("long", 1, long_seq, list(dict.fromkeys(args.long_impls))))

    current = None  # the row being measured, recorded if the run is interrupted
    try:
        n_valid0 = 2 * pairs * (seq_len - int(round(PROMPT_FRAC * seq_len)))
        for key, fn in (("matmul", measure_matmul), ("forward_only", measure_forward)):
            try:
                _alarm(row_limit())
                payload[key] = fn(dev, n_valid0, hidden, vocab, dt)
            except Exception as exc:  # noqa: BLE001
                payload[key] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
            finally:
                _alarm(0)
                dev.clean()
            print(f"{key}: {_short(payload[key])}", flush=True)
        mm_tflops = (payload["matmul"] or {}).get("tflops")
        fw = payload["forward_only"] or {}
        if mm_tflops and fw.get("tflops"):
            fw["matmul_fraction"] = fw["tflops"] / mm_tflops

        for label, b, t, names in shapes:
            rows = 2 * b
            if over_budget():
                for impl in names:
                    payload["results"].append(_skipped(impl, label, rows, t, hidden, vocab, "budget spent"))
                continue
            inputs = reference = None
            try:
                _alarm(row_limit())
                t0 = time.perf_counter()
                inputs = make_dpo_inputs(b, t, hidden, vocab, dt, dev.device, seed=args.seed, logit_std=args.logit_std)
                n_valid = int((inputs.labels != IGNORE_INDEX).sum())
                if not args.no_reference:
                    reference = exact_reference(dev, *inputs, BETA, acc=args.reference_dtype)
                _alarm(0)
                print(
                    f"[{label}] inputs {rows}x{t}x{hidden}x{vocab} {args.dtype}, {n_valid} counted tokens; "
                    f"reference loss {reference['loss'] if reference else float('nan'):.6f} "
                    f"({time.perf_counter() - t0:.1f} s)",
                    flush=True,
                )
            except Exception as exc:  # noqa: BLE001
                _alarm(0)
                msg = f"inputs/reference failed: {type(exc).__name__}: {exc}"
                print(f"[{label}] {msg}", flush=True)
                if inputs is None:
                    for impl in names:
                        payload["results"].append(_skipped(impl, label, rows, t, hidden, vocab, msg, status="error"))
                    continue
                n_valid = int((inputs.labels != IGNORE_INDEX).sum())
                reference = None
                dev.clean()
            for impl in names:
                if over_budget():
                    payload["results"].append(_skipped(impl, label, rows, t, hidden, vocab, "budget spent"))
                    continue
                t0 = time.perf_counter()
                _alarm(row_limit())
                spec = {"repeats": args.repeats, "row_seconds": args.row_seconds, "cce_impl": args.cce_impl}
                determinism = impl == "expo-engine" and label == "default" and not args.no_determinism
                current = _skipped(impl, label, rows, t, hidden, vocab, "interrupted (time limit)", status="error")
                row = run_row(dev, impl, inputs, spec, reference, determinism=determinism)
                current = None
                row.update(label=label, rows=rows, pairs=b, seq_len=t, hidden=hidden, vocab=vocab, n_valid=n_valid)
                row["wall_s"] = time.perf_counter() - t0
                _finish_row(row, mm_tflops, args, payload)
                payload["results"].append(row)
                payload["elapsed_s"] = elapsed()
                write_outputs(payload, json_path, args.markdown)
                print(f"[{label}] {impl}: {_row_summary(row)} ({row['wall_s']:.1f} s)", flush=True)
            del inputs, reference
            dev.clean()
    except KeyboardInterrupt:  # `timeout -s INT`: keep what was measured
        _alarm(0)
        payload["interrupted"] = True
        if current is not None:
            payload["results"].append(current)
        print("interrupted: writing what was measured", flush=True)
    except Exception as exc:  # noqa: BLE001 — a bug outside the rows: still write and print the rest
        _alarm(0)
        payload["fatal_error"] = f"{type(exc).__name__}: {exc}"
        payload["fatal_traceback"] = traceback.format_exc()[-4000:]
        print(f"FATAL {payload['fatal_error']}\n{payload['fatal_traceback']}", flush=True)
    payload["elapsed_s"] = elapsed()
    write_outputs(payload, json_path, args.markdown)
    print()
    print(render(payload, markdown=False))
    print(f"\nwrote {json_path}" + (f" and {args.markdown}" if args.markdown else ""))
    if args.markdown:
        print("\n" + render(payload, markdown=True))
    return 0


def _skipped(impl, label, rows, t, hidden, vocab, why, status="skipped"):
    return dict(impl=impl, label=label, rows=rows, seq_len=t, hidden=hidden, vocab=vocab, status=status, error=why)


def _finish_row(row, mm_tflops, args, payload):
    if row["status"] != "ok":
        return
    per = FLOPS_PER_TOKEN_HV.get(row["impl"], 8)
    needed = per * row["n_valid"] * row["hidden"] * row["vocab"]
    row["tflop_needed"] = needed / 1e12
    row["tflops"] = needed / row["median_s"] / 1e12
    if mm_tflops:
        row["matmul_fraction"] = row["tflops"] / mm_tflops
    if row["impl"] in MODEL_PATH:
        path, trained = MODEL_PATH[row["impl"]]
        try:
            pred = roofline.predict(
                row["n_valid"],
                row["hidden"],
                row["vocab"],
                chunk=_model_chunk(row, args),
                dtype=args.dtype,
                trained_head=trained,
                path=path,
                **({"matmul_tflops": mm_tflops} if mm_tflops else {}),
            )
            row["model_ms"] = pred["total_ms"]
            row["model_floor_ms"] = pred["floor_ms"]
            row["model"] = pred
        except Exception as exc:  # noqa: BLE001
            row["model_error"] = repr(exc)


def _model_chunk(row, args):
    """The engine's chunk for the model: ``--model-chunk``, else whole pairs up to the engine's target
    (``expo_kernels.engine.CHUNK_TOKENS`` for the device, 1024 if unreadable)."""
    if args.model_chunk:
        return args.model_chunk
    target = 1024
    try:
        from expo_kernels import engine

        ct = engine.CHUNK_TOKENS
        target = int(ct.get(args.device.split(":")[0], ct.get("cuda", 1024)) if isinstance(ct, dict) else ct)
    except Exception:  # noqa: BLE001
        pass
    pair_tokens = max(1, row["n_valid"] // max(1, row["pairs"]))
    return min(row["n_valid"], math.ceil(target / pair_tokens) * pair_tokens)


def _short(d):
    if not d:
        return "-"
    if d.get("error"):
        return "ERROR " + d["error"][:200]
    return f"{d['median_s'] * 1e3:.3f} ms, {d['tflops']:.2f} TFLOP/s at {d['shape']}"


def _row_summary(row):
    if row["status"] != "ok":
        return "ERROR " + (row.get("error") or "?").splitlines()[0][:200]
    parts = [f"{row['median_s'] * 1e3:.2f} ms x{row['repeats']}", f"first {row['first_s']:.2f} s"]
    if row.get("peak_bytes") is not None:
        parts.append(f"peak {hn.gib(row['peak_bytes'], 2)} GiB")
    parts.append(f"{row['tflops']:.2f} TFLOP/s")
    if row.get("d_hidden_rel_err") is not None:
        parts.append(f"dH err {row['d_hidden_rel_err']:.1e}")
    if row.get("deterministic"):
        parts.append(f"deterministic {row['deterministic']}")
    if "engine_backend" in row:
        parts.append(f"engine backend {row['engine_backend']}")
    return ", ".join(parts)


if __name__ == "__main__":
    sys.exit(main())

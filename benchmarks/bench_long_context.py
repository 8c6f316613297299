"""Peak memory of one DPO training step at the LM head as the sequence length grows.

At a fixed vocabulary, sweeps the sequence length ``T`` of one preference batch (``B`` pairs, so
``2B`` rows: the chosen sequences, then the rejected ones) and measures the peak memory of one
DPO step computed from hidden states — policy pass with grad, reference pass under ``no_grad``
(sharing the policy's head, detached), DPO sigmoid loss on the per-sequence log-prob sums,
backward — for

* ``expo-<backend>`` — ``expo_kernels.FusedLinearDPOLoss`` with the package's default backend for
  the device (``--impls expo`` runs every backend it lists): logits live only in the engine's bounded
  workspace (one pair's, while it fits ``kernel_options(workspace_bytes)``, 512 MiB by default; past
  that the op's recompute path), so memory never grows with ``T x V`` beyond the cap;
* ``naive`` — what older TRL releases (<= 1.9) and most frameworks do: full logits
  ``[2B, T, V]`` fp32 -> ``log_softmax`` -> ``gather`` for the policy and again for the reference,
  so memory grows with ``T x V``;
* ``trl``  — TRL's own chunked head, ``trl.kernels.chunked_logprob.ChunkedLogProbFunction`` with
  the vocab chunk its trainers pass (``trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE``), on the
  completion tokens only;
* ``cce`` — cut-cross-entropy's ``torch_compile`` path (its CPU path; ``reduction="none"``), which
  keeps the valid tokens' logits for backward.

The inputs (``make_dpo_inputs``: the policy's hidden states, the reference's = the policy's plus
noise, the head, labels) and the per-token log-probs of ``naive`` and ``trl`` (``build_impl``, the
same code the per-op benchmark measures) come from ``benchmarks._workloads``. Every (implementation, T) runs in a fresh
subprocess; on CPU its memory is the RSS high-water mark (``ru_maxrss``), reset after the imports
and inputs, reported over the baseline RSS (imports + inputs + weight) and absolute; on CUDA it is
``torch.cuda.max_memory_allocated`` minus the inputs.

    python -m benchmarks.bench_long_context                 # B=1 H=1024 V=32000 fp32, T=512..8192
    python -m benchmarks.bench_long_context --quick         # small shapes, < 1 min
    python -m benchmarks.bench_long_context --seq-lens 1024 4096 --vocab 128256 --impls expo naive

The parent process never imports torch (a child's ``ru_maxrss`` starts at its parent's RSS).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/bench_long_context.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _harness as hn  # noqa: E402  (neither imports torch at module level)
from benchmarks._workloads import (  # noqa: E402
    IGNORE_INDEX,
    PROMPT_FRAC,
    build_impl,
    dpo_sigmoid,
    make_dpo_inputs,
    trl_chunk_size,
)

RESULTS_DIR = hn.RESULTS_DIR

DEFAULTS = dict(seq_lens=[512, 1024, 2048, 4096, 8192], pairs=1, hidden=1024, vocab=32000)
QUICK = dict(seq_lens=[256, 1024], pairs=1, hidden=256, vocab=8192)
BASE_IMPLS = ("naive", "trl", "cce")


# ----------------------------------------------------------------------------------------------
# Worker (torch imported lazily)
# ----------------------------------------------------------------------------------------------


def build_dpo(name, device, beta):
    """``(fn, detail)``: ``fn(weight, hidden, ref_hidden, labels) -> scalar loss``. All imports here."""
    import torch

    if name.startswith("expo-"):
        import expo_kernels
        from expo_kernels._dispatch import resolve_backend

        backend = name[len("expo-") :]
        resolved = resolve_backend(backend, torch.device(device))  # loads/builds a native backend now
        module = expo_kernels.FusedLinearDPOLoss(beta=beta, backend=backend)

        def fn(weight, hidden, ref_hidden, labels):
            return module(weight, hidden, labels, ref_hidden=ref_hidden).loss

        default = resolve_backend(None, torch.device(device))
        return fn, f"expo_kernels.FusedLinearDPOLoss(beta={beta}, backend={resolved!r}); package default: {default!r}"

    logp_fn = build_impl(name, device)  # benchmarks._workloads: naive / trl per-token log-probs

    def fn(weight, hidden, ref_hidden, labels):
        policy = logp_fn(hidden, weight, labels).sum(-1)  # [2B], 0 at ignored positions
        with torch.no_grad():
            ref = logp_fn(ref_hidden, weight, labels).sum(-1)
        return dpo_sigmoid(policy, ref, beta)

    if name == "trl":
        detail = (
            f"trl ChunkedLogProbFunction (chunk_size={trl_chunk_size()}), completion tokens only; "
            "policy with grad + reference under no_grad; DPO sigmoid"
        )
    elif name == "cce":
        detail = (
            "cut-cross-entropy linear_cross_entropy(impl='torch_compile', reduction='none'), logp = -nll; "
            "policy with grad + reference under no_grad; DPO sigmoid"
        )
    else:
        detail = "F.linear -> [2B,T,V] fp32 -> log_softmax -> gather, policy with grad + reference under no_grad; DPO sigmoid"
    return fn, detail


def run_worker(spec: dict) -> dict:
    result = {"impl": spec["impl"], "status": "error"}
    try:
        import torch

        device = torch.device(spec["device"])
        is_cuda = device.type == "cuda"
        hidden, ref_hidden, weight, labels = make_dpo_inputs(
            spec["pairs"],
            spec["seq_len"],
            spec["hidden"],
            spec["vocab"],
            spec["dtype"],
            device,
            seed=spec["seed"],
            logit_std=spec["logit_std"],
        )
        result["n_valid"] = int((labels != IGNORE_INDEX).sum())
        fn, result["detail"] = build_dpo(spec["impl"], device, spec["beta"])  # all imports happen here
        result["torch_threads"] = torch.get_num_threads()
        # One tiny step first, so lazy imports of the first call (expo's custom op pulls in torch._dynamo,
        # ~0.1 GiB RSS) land in the baseline, not in the step's memory.
        tiny = make_dpo_inputs(1, 6, 8, 16, spec["dtype"], device, seed=spec["seed"])
        fn(tiny[2], tiny[0], tiny[1], tiny[3]).backward()
        del tiny

        def sync():
            if is_cuda:
                torch.cuda.synchronize(device)

        def step():
            hidden.grad = None
            weight.grad = None
            loss = fn(weight, hidden, ref_hidden, labels)
            loss.backward()
            return loss.detach()

        gc.collect()
        sync()
        if is_cuda:
            inputs_bytes = torch.cuda.memory_allocated(device)
            result["inputs_bytes"] = inputs_bytes
            torch.cuda.reset_peak_memory_stats(device)
        else:
            result["import_peak_rss_bytes"] = hn.maxrss_bytes()  # high-water mark of imports + inputs
            result["baseline_rss_bytes"] = hn.current_rss_bytes() or result["import_peak_rss_bytes"]
            result["peak_reset"] = hn.reset_peak_rss()

        # warm-up step (first call: lazy imports, allocator growth)
        t0 = time.perf_counter()
        step()
        sync()
        result["warmup_s"] = time.perf_counter() - t0
        if is_cuda:
            result["warmup_peak_bytes"] = torch.cuda.max_memory_allocated(device) - inputs_bytes
        else:
            result["warmup_peak_rss_bytes"] = hn.maxrss_bytes()

        # measured step
        hidden.grad = None
        weight.grad = None
        gc.collect()
        sync()
        if is_cuda:
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        else:
            before = hn.current_rss_bytes()
            reset = hn.reset_peak_rss()
        t0 = time.perf_counter()
        loss = step()
        sync()
        result["step_s"] = time.perf_counter() - t0
        if is_cuda:
            peak = torch.cuda.max_memory_allocated(device)
            result["step_peak_bytes"] = peak - inputs_bytes  # what the plot shows on CUDA
            result["peak_bytes"] = max(result["warmup_peak_bytes"], result["step_peak_bytes"])
            result["step_work_bytes"] = peak - before
        else:
            peak = hn.maxrss_bytes()
            result["step_peak_rss_bytes"] = peak if reset else None
            result["peak_rss_bytes"] = max(result["warmup_peak_rss_bytes"], peak)
            base = result["baseline_rss_bytes"]
            # what the plot shows on CPU: the measured step's RSS high-water mark over the baseline
            result["step_peak_over_baseline_bytes"] = (peak - base) if reset else None
            result["peak_over_baseline_bytes"] = result["peak_rss_bytes"] - base
            result["rss_before_step_bytes"] = before
            if reset and before is not None:
                result["step_work_bytes"] = peak - before
        # after the readings: numbers that must agree across implementations (same inputs)
        result["loss"] = float(loss)
        result["grad_weight_norm"] = float(weight.grad.double().norm())
        result["grad_hidden_norm"] = float(hidden.grad.double().norm())
        result["status"] = "ok"
    except BaseException as exc:  # noqa: BLE001 — any failure becomes an ERROR row
        hn.error_fields(result, exc)
    return result


# ----------------------------------------------------------------------------------------------
# Parent (no torch import)
# ----------------------------------------------------------------------------------------------


def _spawn(spec: dict, timeout: float, tmp: str) -> dict:
    return hn.spawn_worker("benchmarks.bench_long_context", spec, timeout, tmp)


def logits_bytes(rows, seq_len, vocab):
    """Size of the full fp32 logits ``[2B, T, V]`` — computed, not measured."""
    return rows * seq_len * vocab * 4


def _plot_value(r, device_type):
    return r.get("step_peak_bytes") if device_type == "cuda" else r.get("step_peak_over_baseline_bytes")


def format_table(rows, device_type):
    if device_type == "cuda":
        head = [
            "impl",
            "T",
            "fp32 logits GiB (computed)",
            "step peak - inputs GiB",
            "peak - inputs GiB",
            "inputs GiB",
            "step s",
            "warm-up s",
            "loss",
        ]
    else:
        head = [
            "impl",
            "T",
            "fp32 logits GiB (computed)",
            "step peak - base GiB",
            "peak - base GiB",
            "peak RSS GiB",
            "base RSS GiB",
            "step s",
            "warm-up s",
            "loss",
        ]
    lines = []
    for r in rows:
        lg = hn.gib(r["logits_bytes_computed"])
        if r["status"] != "ok":
            lines.append([r["impl"], str(r["seq_len"]), lg, hn.error_message(r, 100)])
            continue
        if device_type == "cuda":
            mem = [hn.gib(r.get("step_peak_bytes")), hn.gib(r.get("peak_bytes")), hn.gib(r.get("inputs_bytes"))]
        else:
            star = "" if r.get("peak_reset", True) else "*"
            mem = [
                hn.gib(r.get("step_peak_over_baseline_bytes")),
                hn.gib(r.get("peak_over_baseline_bytes")),
                hn.gib(r.get("peak_rss_bytes")) + star,
                hn.gib(r.get("baseline_rss_bytes")),
            ]
        lines.append(
            [r["impl"], str(r["seq_len"]), lg]
            + mem
            + [f"{r['step_s']:.2f}", f"{r['warmup_s']:.2f}", f"{r['loss']:.6f}"]
        )
    return hn.render_table(head, lines, markdown=True)


def make_plot(rows, impls, seq_lens, info, settings, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dev = info["device_type"]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    ymax = 0.0
    errors = []
    for impl in impls:
        pts = [(r["seq_len"], _plot_value(r, dev)) for r in rows if r["impl"] == impl]
        ok = [(t, v / hn.GIB) for t, v in pts if isinstance(v, (int, float))]
        label = next((r.get("label") for r in rows if r["impl"] == impl and r.get("label")), impl)
        line = ax.plot([t for t, _ in ok], [v for _, v in ok], marker="o", label=label)[0]
        ymax = max([ymax] + [v for _, v in ok])
        errors += [(t, line.get_color(), impl, len(errors)) for t, v in pts if not isinstance(v, (int, float))]
    rows_n = 2 * settings["pairs"]
    lg = [logits_bytes(rows_n, t, settings["vocab"]) / hn.GIB for t in seq_lens]
    ax.plot(seq_lens, lg, ls="--", color="gray", label="full fp32 logits 2B·T·V·4 B (computed)")
    ymax = max([ymax] + lg)
    # failed runs: an x per implementation above the data, stacked so that labels do not overlap
    stack = {impl: k for k, impl in enumerate(dict.fromkeys(e[2] for e in errors))}
    for t, color, impl, _ in errors:
        y = ymax * (1.06 + 0.07 * stack[impl])
        ax.plot([t], [y], marker="x", color=color, ms=9, mew=2, ls="none")
        ax.annotate(f"{impl}: ERROR", (t, y), textcoords="offset points", xytext=(6, -3), fontsize=7, color=color)
    ax.set_xscale("log", base=2)
    ax.set_xticks(seq_lens)
    ax.set_xticklabels([str(t) for t in seq_lens])
    ax.set_xlabel(f"sequence length T ({rows_n} rows; first third prompt)")
    ylab = (
        "peak CUDA memory allocated minus inputs (GiB)"
        if dev == "cuda"
        else "peak RSS over baseline, measured step (GiB)"
    )
    ax.set_ylabel(ylab)
    name = info.get("device_name") or dev
    ax.set_title(
        f"One DPO step at the LM head (policy + reference), {settings['dtype']}\n"
        f"{dev}: {name}, V={settings['vocab']}, H={settings['hidden']}",
        fontsize=10,
    )
    ax.grid(True, alpha=0.3)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


MEMORY_NOTE = {
    "cpu": "one fresh process per (implementation, T). base RSS = resident after imports + inputs (hidden, ref_hidden, "
    "weight, labels) + one tiny DPO step (T=6, H=8, V=16: the lazy imports of a first call); the RSS high-water "
    "mark (ru_maxrss) is then reset via /proc/self/clear_refs (* = reset not "
    "possible). step peak - base = high-water mark over the measured step (reset again just before it, "
    "gradients included) minus base RSS: what the plot shows; peak - base and peak RSS cover the warm-up step "
    "too. fp32 logits = 2B*T*V*4 bytes, computed, not measured.",
    "cuda": "one fresh process per (implementation, T), one tiny step before the readings. step peak - inputs = torch.cuda.max_memory_allocated over the "
    "measured step minus the inputs (gradients included): what the plot shows; peak - inputs covers the "
    "warm-up step too. fp32 logits = 2B*T*V*4 bytes, computed, not measured.",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_long_context", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"small sweep: T={QUICK['seq_lens']} H={QUICK['hidden']} V={QUICK['vocab']} (< 1 min)",
    )
    p.add_argument("--seq-lens", "-T", type=int, nargs="+", help=f"sequence lengths (default {DEFAULTS['seq_lens']})")
    p.add_argument("--pairs", "-B", type=int, help=f"preference pairs per batch, 2B rows (default {DEFAULTS['pairs']})")
    p.add_argument("--hidden", "-H", type=int, help=f"hidden size (default {DEFAULTS['hidden']})")
    p.add_argument("--vocab", "-V", type=int, help=f"vocab size (default {DEFAULTS['vocab']})")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument(
        "--impls",
        nargs="+",
        help="any of expo (every expo backend of the device; triton only on "
        "CUDA), expo-<backend> (e.g. expo-torch), naive, trl; default: expo_kernels' default backend, "
        "naive, trl",
    )
    p.add_argument("--device", help="cpu or cuda[:i] (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--logit-std", type=float, default=2.0)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per (implementation, T) run (default 1800)")
    p.add_argument(
        "--jobs",
        "-j",
        type=int,
        help="worker processes at a time (default 1; 4 with --quick). Memory "
        "numbers are per process and stay valid; timings get noisier",
    )
    p.add_argument("--json", help="results file (default benchmarks/results/bench_long_context_<device>.json)")
    p.add_argument("--plot", help="figure (default benchmarks/results/long_context_<device>.png, or beside --json)")
    hn.add_worker_args(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if hn.worker_main(args, run_worker):
        return 0

    base = QUICK if args.quick else DEFAULTS
    seq_lens = args.seq_lens or base["seq_lens"]
    settings = dict(
        pairs=args.pairs or base["pairs"],
        hidden=args.hidden or base["hidden"],
        vocab=args.vocab or base["vocab"],
        dtype=args.dtype,
    )

    info = hn.probe(args.device)
    dev = info["device_type"]
    expo_impls = hn.expo_impls(info)
    impls = []
    for name in args.impls or ["expo", *BASE_IMPLS]:
        if name == "expo":  # every expo backend of the device; without --impls, the default one only
            impls += expo_impls if args.impls else expo_impls[:1]
        elif name.startswith("expo-") or name in BASE_IMPLS:
            impls.append(name)
        else:
            raise SystemExit(
                f"unknown implementation {name!r}; choose from expo, expo-<backend>, {', '.join(BASE_IMPLS)}"
            )
    impls = list(dict.fromkeys(impls))
    labels = {i: i for i in impls}
    if expo_impls and expo_impls[0] in labels:
        labels[expo_impls[0]] = f"{expo_impls[0]} (expo_kernels default)"
    labels["naive"] = "naive full logits (old TRL)"
    labels["trl"] = "TRL 1.16 chunked head"

    print(
        f"device: {info['device']} ({info['device_name']}), torch {info['versions']['torch']}, "
        f"{info['torch_threads']} threads; impls: {', '.join(impls)}",
        flush=True,
    )
    print(
        f"B={settings['pairs']} pair(s) ({2 * settings['pairs']} rows), H={settings['hidden']}, "
        f"V={settings['vocab']}, {settings['dtype']}, T={seq_lens}",
        flush=True,
    )

    jobs = args.jobs if args.jobs is not None else (4 if args.quick else 1)
    runs = [(T, impl) for T in seq_lens for impl in impls]

    def one(run):
        T, impl = run
        spec = dict(
            impl=impl,
            device=info["device"],
            seq_len=T,
            beta=args.beta,
            seed=args.seed,
            logit_std=args.logit_std,
            **settings,
        )
        t0 = time.perf_counter()
        res = _spawn(spec, args.timeout, tmp)
        row = {
            "impl": impl,
            "label": labels.get(impl, impl),
            "seq_len": T,
            **settings,
            "logits_bytes_computed": logits_bytes(2 * settings["pairs"], T, settings["vocab"]),
        }
        row.update(res)
        row["impl"] = impl
        row["wall_s"] = time.perf_counter() - t0
        if row["status"] == "ok":
            v = _plot_value(row, dev)
            msg = f"ok: {hn.gib(v)} GiB over baseline, step {row['step_s']:.1f} s, loss {row['loss']:.6f}"
        else:
            msg = "ERROR " + (row.get("error") or "?").splitlines()[0][:200]
        print(
            f"[T={T}] {impl}: {msg} ({row['wall_s']:.1f} s wall, {_dt.datetime.now(_dt.UTC):%H:%M:%S} UTC)",
            flush=True,
        )
        return row

    with tempfile.TemporaryDirectory(prefix="bench_long_context_") as tmp:
        if jobs <= 1:
            rows = [one(r) for r in runs]
        else:  # memory is per process, so concurrent workers do not disturb each other's numbers (timings: yes)
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=jobs) as pool:
                rows = list(pool.map(one, runs))

    print()
    print(format_table(rows, dev))
    print()
    print(MEMORY_NOTE[dev])

    suffix = "cuda" if dev == "cuda" else "cpu"
    out_path = Path(args.json) if args.json else RESULTS_DIR / f"bench_long_context_{suffix}.json"
    if args.plot:
        plot_path = Path(args.plot)
    elif args.json:  # a custom JSON path keeps its figure beside it, not over the committed one
        plot_path = out_path.with_suffix(".png")
    else:
        plot_path = RESULTS_DIR / f"long_context_{suffix}.png"
    payload = {
        **hn.result_header(
            "bench_long_context",
            "benchmarks.bench_long_context",
            argv,
            info,
            ("device", "device_type", "device_name", "cuda", "cpu_count", "torch_threads"),
            dirty=True,
        ),
        "expo_backends": info.get("expo_backends"),
        "settings": {
            **settings,
            "seq_lens": seq_lens,
            "rows": 2 * settings["pairs"],
            "beta": args.beta,
            "seed": args.seed,
            "logit_std": args.logit_std,
            "prompt_frac": PROMPT_FRAC,
            "ignore_index": IGNORE_INDEX,
            "impls": impls,
            "labels": labels,
            "timeout_s": args.timeout,
            "jobs": jobs,
            "step": "policy logps (grad) -> reference logps (no_grad, shared head detached) -> DPO sigmoid "
            "loss on per-sequence sums -> backward; one warm-up step, one measured step",
            "memory": MEMORY_NOTE[dev],
        },
        "results": rows,
    }
    hn.write_json(out_path, payload)
    try:
        make_plot(rows, impls, seq_lens, info, settings, plot_path)
        print(f"wrote {plot_path}")
    except Exception as exc:  # the numbers are saved; a missing matplotlib should not lose them
        print(f"plot failed: {type(exc).__name__}: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One DPO step at the LM head as the sequence length grows: time, memory and exactness.

At a fixed vocabulary, sweeps the sequence length ``T`` of one preference batch (``B`` pairs, so
``2B`` rows: the chosen sequences, then the rejected ones; the first third of every row is prompt)
and measures one DPO step computed from hidden states (policy pass with grad, reference pass
forward-only sharing the policy's head detached, DPO sigmoid loss on the per-sequence log-prob
sums, backward) for

* ``expo-<backend>``: ``expo_kernels.FusedLinearDPOLoss`` with the package's default backend for
  the device (``--impls expo`` runs every backend it lists): the pair engine while a pair's logits
  fit ``kernel_options(workspace_bytes)`` (512 MiB by default), past that the long-pair token chunks
  (``Path.LONG_PAIR_CHUNKS``, one pass for DPO), so memory never grows with ``T x V``;
* ``cce``: cut-cross-entropy (its ``torch_compile`` path off CUDA, ``reduction="none"``);
* ``torch-lce``: PyTorch's chunked ``F.linear_cross_entropy`` with ``LinearCrossEntropyOptions()``;
* ``liger``: Liger-Kernel's ``LigerFusedLinearDPOLoss`` (chunks of whole pairs: one pair's logits);
* ``naive``: full logits ``[2B, T, V]`` fp32 -> ``log_softmax`` -> ``gather`` (what older TRL did);
* ``trl``: TRL's chunked head ``ChunkedLogProbFunction`` (only with ``--impls``);
* ``float64``: the reference, not a contender: float64 logits in token chunks, forward only. Every
  other row's loss (and, for one pair, its margin ``m = -log(expm1(loss)) / beta``) is compared with it.

The step builders are ``benchmarks.bench_dpo_cpu.build_dpo_step``'s (the inputs: ``make_dpo_inputs``
with a reference close to the policy, ``--ref-noise``, so the loss is not saturated). Every
(implementation, T) runs in a fresh subprocess; on CPU its memory is the RSS high-water mark of the
measured step over the baseline (imports + inputs), on CUDA ``max_memory_allocated`` minus the inputs.

Limits, stated in every skipped row: a row runs at most ``--timeout`` seconds; an implementation
that fails or runs out of time at some ``T`` is not run at larger ``T``; ``naive`` and ``liger``
(which hold one pair's logits, three fp32 tensors of ``2T x V`` with their gradient) are not started
where that would pass ``--mem-limit-gib``.

    python -m benchmarks.bench_long_context                     # B=1 H=1024 V=32000 fp32, T=2048..65536
    python -m benchmarks.bench_long_context --quick             # small shapes, < 2 min
    python -m benchmarks.bench_long_context --table-from benchmarks/results/bench_long_context_cpu.json

The parent process never imports torch (a child's ``ru_maxrss`` starts at its parent's RSS).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import math
import os
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/bench_long_context.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _harness as hn  # noqa: E402  (neither imports torch at module level)
from benchmarks._workloads import IGNORE_INDEX, PROMPT_FRAC, make_dpo_inputs  # noqa: E402
from benchmarks.bench_dpo_cpu import BETA, build_dpo_step  # noqa: E402

RESULTS_DIR = hn.RESULTS_DIR

DEFAULTS = dict(seq_lens=[2048, 4096, 8192, 16384, 32768, 65536], pairs=1, hidden=1024, vocab=32000)
QUICK = dict(seq_lens=[256, 1024], pairs=1, hidden=256, vocab=8192)
BASE_IMPLS = ("cce", "torch-lce", "liger", "naive")
OPTIONAL_IMPLS = ("trl",)
REFERENCE = "float64"
# rows that hold one pair's logits: three fp32 [2B*T, V] tensors (logits, log-softmax, its gradient)
MATERIALIZING = {"naive": 3, "liger": 3}
# below this T the warm-up step has the measured step's shape; above it a T=WARMUP_T step (the same
# H, V and dtype) warms up: compiled peers (cce, liger) then meet no new shape, and a long T is not
# paid twice
FULL_WARMUP_MAX_T = 8192
WARMUP_T = 512


# ----------------------------------------------------------------------------------------------
# Worker (torch imported lazily)
# ----------------------------------------------------------------------------------------------


def build_step(name, device):
    """``(step, detail)``: ``step(hidden, ref_hidden, weight, labels) -> loss`` (runs backward itself).
    ``expo-<backend>`` is the module users call, on that backend; every other name is
    ``bench_dpo_cpu.build_dpo_step``'s. All imports happen here."""
    import torch

    if name.startswith("expo-"):
        import expo_kernels
        from expo_kernels._dispatch import resolve_backend

        backend = name[len("expo-") :]
        resolved = resolve_backend(backend, torch.device(device))  # loads/builds a native backend now
        module = expo_kernels.FusedLinearDPOLoss(beta=BETA, backend=backend, compute_metrics=False)

        def step(hidden, ref_hidden, weight, labels):
            loss = module(weight, hidden, labels, ref_hidden=ref_hidden).loss
            loss.backward()
            return loss.detach()

        default = resolve_backend(None, torch.device(device))
        return step, f"FusedLinearDPOLoss(beta={BETA}, backend={resolved!r}); package default: {default!r}"
    details = {
        "cce": "cut-cross-entropy linear_cross_entropy (torch_compile off CUDA, reduction='none'), logp = -nll",
        "torch-lce": "torch.nn.functional.linear_cross_entropy(options=LinearCrossEntropyOptions()), counted tokens",
        "liger": "liger_kernel.chunked_loss.LigerFusedLinearDPOLoss(use_ref_model=True), compiled=True",
        "naive": "F.linear -> [2B,T,V] fp32 -> log_softmax -> gather",
        "trl": "trl ChunkedLogProbFunction, counted tokens only",
    }
    return build_dpo_step(name, device), details.get(name, name) + "; policy with grad + reference forward-only"


def float64_reference(hidden, ref_hidden, weight, labels, beta, chunk_tokens=2048):
    """``(loss, margins [B])`` of DPO's sigmoid loss in float64: float64 logits of ``chunk_tokens``
    tokens at a time (the counted ones only), forward only, sums in float64."""
    import torch
    import torch.nn.functional as F

    w = weight.detach().double()

    def sums(h):
        rows = h.shape[0]
        out = torch.zeros(rows, dtype=torch.float64, device=h.device)
        for r in range(rows):
            idx = (labels[r] != IGNORE_INDEX).nonzero().squeeze(1)
            for start in range(0, idx.numel(), chunk_tokens):
                part = idx[start : start + chunk_tokens]
                lp = F.linear(h[r, part].detach().double(), w).log_softmax(-1)
                out[r] += lp.gather(1, labels[r, part].unsqueeze(1)).sum()
        return out

    with torch.no_grad():
        ratio = sums(hidden) - sums(ref_hidden)
        b = ratio.shape[0] // 2
        margins = ratio[:b] - ratio[b:]
        loss = F.softplus(-beta * margins).mean()
    return float(loss), [float(m) for m in margins]


def run_worker(spec: dict) -> dict:
    result = {"impl": spec["impl"], "status": "error"}
    try:
        import torch

        device = torch.device(spec["device"])
        is_cuda = device.type == "cuda"
        shape = (spec["pairs"], spec["seq_len"], spec["hidden"], spec["vocab"], spec["dtype"], device)
        draw = dict(seed=spec["seed"], logit_std=spec["logit_std"], ref_noise=spec["ref_noise"])
        hidden, ref_hidden, weight, labels = make_dpo_inputs(*shape, **draw)
        result["n_valid"] = int((labels != IGNORE_INDEX).sum())
        if spec["impl"] == REFERENCE:
            t0 = time.perf_counter()
            result["loss"], result["margins"] = float64_reference(hidden, ref_hidden, weight, labels, BETA)
            result["step_s"] = time.perf_counter() - t0
            result["detail"] = "float64 logits in token chunks, forward only (the reference of the loss error)"
            result["status"] = "ok"
            return result
        step_fn, result["detail"] = build_step(spec["impl"], device)  # all imports happen here
        result["torch_threads"] = torch.get_num_threads()
        # One tiny step first, so lazy imports of the first call (expo's custom op pulls in torch._dynamo,
        # ~0.1 GiB RSS) land in the baseline, not in the step's memory.
        tiny = make_dpo_inputs(1, 6, 8, 16, spec["dtype"], device, seed=spec["seed"])
        step_fn(tiny[0], tiny[1], tiny[2], tiny[3])
        del tiny

        def sync():
            if is_cuda:
                torch.cuda.synchronize(device)

        def step(h, rh, w, y):
            h.grad = None
            w.grad = None
            return step_fn(h, rh, w, y)

        gc.collect()
        sync()
        if is_cuda:
            inputs_bytes = torch.cuda.memory_allocated(device)
            result["inputs_bytes"] = inputs_bytes
            torch.cuda.reset_peak_memory_stats(device)
        else:
            result["baseline_rss_bytes"] = hn.current_rss_bytes() or hn.maxrss_bytes()
            result["peak_reset"] = hn.reset_peak_rss()

        # warm-up (first call at these sizes: compilation, allocator growth): the measured shape while
        # it is cheap, else the last WARMUP_T tokens of every row (counted tokens: the prompt is first)
        t = spec["seq_len"]
        if t <= FULL_WARMUP_MAX_T:
            warm = (hidden, ref_hidden, weight, labels)
            result["warmup"] = "the measured shape"
        else:
            sl = slice(t - WARMUP_T, t)
            warm = (
                hidden.detach()[:, sl].clone().requires_grad_(True),
                ref_hidden[:, sl].clone(),
                weight,
                labels[:, sl],
            )
            result["warmup"] = f"T={WARMUP_T} (the last {WARMUP_T} tokens of every row)"
        t0 = time.perf_counter()
        step(*warm)
        sync()
        result["warmup_s"] = time.perf_counter() - t0
        del warm

        # measured step
        hidden.grad = None
        weight.grad = None
        gc.collect()
        sync()
        if is_cuda:
            torch.cuda.reset_peak_memory_stats(device)
        else:
            reset = hn.reset_peak_rss()
        t0 = time.perf_counter()
        loss = step(hidden, ref_hidden, weight, labels)
        sync()
        result["step_s"] = time.perf_counter() - t0
        if is_cuda:
            result["step_peak_bytes"] = torch.cuda.max_memory_allocated(device) - inputs_bytes
        else:
            peak = hn.maxrss_bytes()
            result["peak_rss_bytes"] = peak
            # what the table and the plot show on CPU: the measured step's high-water mark over the baseline
            result["step_peak_over_baseline_bytes"] = (peak - result["baseline_rss_bytes"]) if reset else None
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


def logits_bytes(rows, seq_len, vocab):
    """Size of the full fp32 logits ``[2B, T, V]``: computed, not measured."""
    return rows * seq_len * vocab * 4


def memory_value(r, device_type):
    """The memory a row reports: CUDA peak allocated minus inputs, or the CPU step's RSS over its baseline."""
    return r.get("step_peak_bytes") if device_type == "cuda" else r.get("step_peak_over_baseline_bytes")


def margin_of(loss, beta):
    """One pair's DPO margin from its sigmoid loss: ``loss = softplus(-beta m)``, so
    ``m = -log(expm1(loss)) / beta`` (None where the loss is not a finite positive number)."""
    if not isinstance(loss, (int, float)) or not loss > 0 or not math.isfinite(loss):
        return None
    return -math.log(math.expm1(loss)) / beta


def add_errors(rows, beta):
    """Each row's loss error against the float64 row of its T: relative error of the loss, and for one
    pair the absolute error of the margin recovered from the loss."""
    refs = {r["seq_len"]: r for r in rows if r["impl"] == REFERENCE and r["status"] == "ok"}
    for r in rows:
        ref = refs.get(r["seq_len"])
        if r["impl"] == REFERENCE or r["status"] != "ok" or ref is None:
            continue
        r["loss_rel_err"] = abs(r["loss"] - ref["loss"]) / abs(ref["loss"])
        m = margin_of(r["loss"], beta)
        if r.get("pairs") == 1 and m is not None:
            r["margin_abs_err"] = abs(m - ref["margins"][0])


def skip_reason(impl, seq_len, settings, failed, mem_limit_bytes):
    """Why a row is not started (None: start it)."""
    if impl in failed:
        return f"skipped: {impl} failed or passed the time limit at T={failed[impl]}"
    if impl in MATERIALIZING:
        need = MATERIALIZING[impl] * logits_bytes(2 * settings["pairs"], seq_len, settings["vocab"])
        if need > mem_limit_bytes:
            return (
                f"skipped: would hold {MATERIALIZING[impl]} fp32 [2B*T, V] tensors = {need / hn.GIB:.1f} GiB "
                f"> the {mem_limit_bytes / hn.GIB:.1f} GiB limit"
            )
    return None


def _secs(x):
    return f"{x:.1f} s" if x >= 10 else f"{x:.2f} s"


def _cell(r, device_type):
    if r["status"] == "skipped":
        return "not run"
    if r["status"] != "ok":
        return "timed out" if r.get("timed_out") else "failed"
    if r["impl"] == REFERENCE:
        return f"{_secs(r['step_s'])} (loss {r['loss']:.6f})"
    err = r.get("loss_rel_err")
    err_txt = f", {err:.1e}" if isinstance(err, float) else ""
    return f"{_secs(r['step_s'])}, {hn.gib(memory_value(r, device_type))} GiB{err_txt}"


def format_table(rows, device_type):
    """Every row: T, time, memory, loss and margin errors (or why it did not run)."""
    mem = "step peak - inputs GiB" if device_type == "cuda" else "step peak RSS - base GiB"
    head = ["impl", "T", "step s", mem, "warm-up s", "loss", "loss rel. err", "margin abs. err"]
    lines = []
    for r in rows:
        if r["status"] == "skipped":
            lines.append([r["impl"], str(r["seq_len"]), r["error"]])
        elif r["status"] != "ok":
            lines.append([r["impl"], str(r["seq_len"]), hn.error_message(r, 100)])
        else:
            lines.append(
                [
                    r["impl"],
                    str(r["seq_len"]),
                    hn.fmt_s(r["step_s"]),
                    hn.gib(memory_value(r, device_type)),
                    hn.fmt_s(r.get("warmup_s")),
                    f"{r['loss']:.6f}",
                    hn.fmt_e(r.get("loss_rel_err")),
                    hn.fmt_e(r.get("margin_abs_err")),
                ]
            )
    return hn.render_table(head, lines, markdown=True)


def readme_table(payload):
    """The README's table: one line per T, one column per implementation ("time, memory, loss error")."""
    rows, dev = payload["results"], payload["device"]["device_type"]
    impls = [i for i in payload["settings"]["impls"] if i != REFERENCE] + [REFERENCE]
    labels = payload["settings"]["labels"]
    by = {(r["impl"], r["seq_len"]): r for r in rows}
    head = ["T per sequence"] + [labels.get(i, i) for i in impls]
    lines = []
    for t in payload["settings"]["seq_lens"]:
        lines.append([str(t)] + [_cell(by[(i, t)], dev) if (i, t) in by else "-" for i in impls])
    return hn.render_table(head, lines, markdown=True)


def make_plot(rows, impls, seq_lens, info, settings, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dev = info["device_type"]
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(12, 5))
    for impl in [i for i in impls if i != REFERENCE]:
        mine = [r for r in rows if r["impl"] == impl and r["status"] == "ok"]
        label = next((r.get("label") for r in rows if r["impl"] == impl and r.get("label")), impl)
        mem = [(r["seq_len"], memory_value(r, dev)) for r in mine]
        mem = [(t, v / hn.GIB) for t, v in mem if isinstance(v, (int, float))]
        ax_mem.plot([t for t, _ in mem], [v for _, v in mem], marker="o", label=label)
        ax_time.plot([r["seq_len"] for r in mine], [r["step_s"] for r in mine], marker="o", label=label)
    rows_n = 2 * settings["pairs"]
    lg = [logits_bytes(rows_n, t, settings["vocab"]) / hn.GIB for t in seq_lens]
    ax_mem.plot(seq_lens, lg, ls="--", color="gray", label="one fp32 logits tensor 2B·T·V·4 B (computed)")
    for ax in (ax_mem, ax_time):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(seq_lens)
        ax.set_xticklabels([str(t) for t in seq_lens])
        ax.set_xlabel(f"sequence length T ({rows_n} rows; first third prompt)")
        ax.grid(True, which="both", alpha=0.3)
    ax_mem.set_ylabel("peak CUDA memory minus inputs (GiB)" if dev == "cuda" else "peak RSS over baseline (GiB)")
    ax_time.set_ylabel("step time (s)")
    ax_mem.legend(fontsize=7)
    name = info.get("device_name") or dev
    fig.suptitle(
        f"One DPO step at the LM head (policy + reference), {settings['dtype']}; "
        f"{dev}: {name}, V={settings['vocab']}, H={settings['hidden']}; a missing point: not run (see the table)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


MEMORY_NOTE = {
    "cpu": "one fresh process per (implementation, T). base RSS = resident after imports + inputs (hidden, ref_hidden, "
    "weight, labels) + one tiny DPO step (T=6, H=8, V=16: the lazy imports of a first call); the RSS high-water "
    "mark (ru_maxrss) is then reset via /proc/self/clear_refs before the measured step. step peak RSS - base = "
    "that step's high-water mark minus base RSS (gradients included). fp32 logits = 2B*T*V*4 bytes, computed.",
    "cuda": "one fresh process per (implementation, T), one tiny step before the readings. step peak - inputs = "
    "torch.cuda.max_memory_allocated over the measured step minus the inputs (gradients included).",
}


def mem_total_bytes():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_long_context", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"small sweep: T={QUICK['seq_lens']} H={QUICK['hidden']} V={QUICK['vocab']}",
    )
    p.add_argument("--seq-lens", "-T", type=int, nargs="+", help=f"sequence lengths (default {DEFAULTS['seq_lens']})")
    p.add_argument("--pairs", "-B", type=int, help=f"preference pairs per batch, 2B rows (default {DEFAULTS['pairs']})")
    p.add_argument("--hidden", "-H", type=int, help=f"hidden size (default {DEFAULTS['hidden']})")
    p.add_argument("--vocab", "-V", type=int, help=f"vocab size (default {DEFAULTS['vocab']})")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument(
        "--impls",
        nargs="+",
        help=f"any of expo (every expo backend of the device), expo-<backend>, {', '.join(BASE_IMPLS + OPTIONAL_IMPLS)}; "
        f"default: expo_kernels' default backend, {', '.join(BASE_IMPLS)} (the {REFERENCE} reference always runs)",
    )
    p.add_argument("--device", help="cpu or cuda[:i] (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--logit-std", type=float, default=2.0)
    p.add_argument(
        "--ref-noise",
        type=float,
        default=0.01,
        help="the reference's hidden states = the policy's + this x N(0, 1) (default 0.01: margins of order 1)",
    )
    p.add_argument("--timeout", type=float, default=600, help="seconds per (implementation, T) run (default 600)")
    p.add_argument(
        "--mem-limit-gib",
        type=float,
        help="naive and liger are not started where their logits would pass this (default 3/4 of MemTotal)",
    )
    p.add_argument("--json", help="results file (default benchmarks/results/bench_long_context_<device>.json)")
    p.add_argument("--plot", help="figure (default benchmarks/results/long_context_<device>.png, or beside --json)")
    p.add_argument("--table-from", help="print the README table of this results file and exit")
    hn.add_worker_args(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if hn.worker_main(args, run_worker):
        return 0
    if args.table_from:
        import json

        with open(args.table_from) as f:
            print(readme_table(json.load(f)))
        return 0

    base = QUICK if args.quick else DEFAULTS
    seq_lens = sorted(args.seq_lens or base["seq_lens"])
    settings = dict(
        pairs=args.pairs or base["pairs"],
        hidden=args.hidden or base["hidden"],
        vocab=args.vocab or base["vocab"],
        dtype=args.dtype,
    )
    mem_limit = args.mem_limit_gib * hn.GIB if args.mem_limit_gib else 0.75 * (mem_total_bytes() or 16 * hn.GIB)

    info = hn.probe(args.device)
    dev = info["device_type"]
    expo_impls = hn.expo_impls(info)
    impls = []
    for name in args.impls or ["expo", *BASE_IMPLS]:
        if name == "expo":  # every expo backend of the device; without --impls, the default one only
            impls += expo_impls if args.impls else expo_impls[:1]
        elif name.startswith("expo-") or name in BASE_IMPLS + OPTIONAL_IMPLS:
            impls.append(name)
        else:
            raise SystemExit(
                f"unknown implementation {name!r}; choose from expo, expo-<backend>, "
                f"{', '.join(BASE_IMPLS + OPTIONAL_IMPLS)}"
            )
    impls = list(dict.fromkeys(impls)) + [REFERENCE]
    labels = {i: i for i in impls}
    if expo_impls and expo_impls[0] in labels:
        labels[expo_impls[0]] = f"ours, {expo_impls[0]} (default)"
    labels.update(
        {
            "cce": "cut-cross-entropy",
            "torch-lce": "PyTorch F.linear_cross_entropy",
            "liger": "Liger LigerFusedLinearDPOLoss",
            "naive": "naive full logits",
            "trl": "TRL chunked head",
            REFERENCE: "float64 reference (forward)",
        }
    )

    print(
        f"device: {info['device']} ({info['device_name']}), torch {info['versions']['torch']}, "
        f"{info['torch_threads']} threads; impls: {', '.join(impls)}",
        flush=True,
    )
    print(
        f"B={settings['pairs']} pair(s) ({2 * settings['pairs']} rows), H={settings['hidden']}, "
        f"V={settings['vocab']}, {settings['dtype']}, T={seq_lens}; limits: {args.timeout:.0f} s per row, "
        f"{mem_limit / hn.GIB:.1f} GiB for the rows that hold logits",
        flush=True,
    )

    failed: dict = {}  # impl -> the T at which it failed or timed out
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_long_context_") as tmp:
        for T in seq_lens:
            for impl in impls:
                row = {
                    "impl": impl,
                    "label": labels.get(impl, impl),
                    "seq_len": T,
                    **settings,
                    "logits_bytes_computed": logits_bytes(2 * settings["pairs"], T, settings["vocab"]),
                }
                why = skip_reason(impl, T, settings, failed, mem_limit)
                t0 = time.perf_counter()
                if why:
                    row.update(status="skipped", error=why)
                else:
                    spec = dict(
                        impl=impl,
                        device=info["device"],
                        seq_len=T,
                        seed=args.seed,
                        logit_std=args.logit_std,
                        ref_noise=args.ref_noise,
                        **settings,
                    )
                    row.update(hn.spawn_worker("benchmarks.bench_long_context", spec, args.timeout, tmp))
                    row["impl"] = impl
                    if row["status"] != "ok":
                        failed.setdefault(impl, T)
                row["wall_s"] = time.perf_counter() - t0
                rows.append(row)
                if row["status"] == "ok" and impl == REFERENCE:
                    msg = f"ok: loss {row['loss']:.8f}, margin {row['margins'][0]:.6f}, {row['step_s']:.1f} s"
                elif row["status"] == "ok":
                    v = memory_value(row, dev)
                    msg = f"ok: {hn.gib(v)} GiB, step {row['step_s']:.1f} s, loss {row['loss']:.8f}"
                else:
                    msg = (row.get("error") or "?").splitlines()[0][:200]
                stamp = f"{_dt.datetime.now(_dt.UTC):%H:%M:%S} UTC"
                print(f"[T={T}] {impl}: {msg} ({row['wall_s']:.1f} s wall, {stamp})", flush=True)
    add_errors(rows, BETA)

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
            "beta": BETA,
            "seed": args.seed,
            "logit_std": args.logit_std,
            "ref_noise": args.ref_noise,
            "prompt_frac": PROMPT_FRAC,
            "ignore_index": IGNORE_INDEX,
            "impls": impls,
            "labels": labels,
            "timeout_s": args.timeout,
            "mem_limit_bytes": mem_limit,
            "cpu_count": os.cpu_count(),
            "step": "policy logps (grad) -> reference logps (forward-only, shared head detached) -> DPO sigmoid "
            f"loss on per-sequence sums -> backward; one warm-up step (T > {FULL_WARMUP_MAX_T}: at T={WARMUP_T}), "
            "one measured step",
            "memory": MEMORY_NOTE[dev],
        },
        "results": rows,
    }
    hn.write_json(out_path, payload)
    print()
    print(readme_table(payload))
    try:
        make_plot(rows, impls, seq_lens, info, settings, plot_path)
        print(f"wrote {plot_path}")
    except Exception as exc:  # the numbers are saved; a missing matplotlib should not lose them
        print(f"plot failed: {type(exc).__name__}: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A whole DPO loss step on the CPU: time and peak RSS of every implementation, each in a fresh process.

One step = policy pass through the LM head with gradient + reference pass forward-only (no graph),
per-sequence sums of the completion log-probs, the sigmoid DPO loss
``-logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))`` averaged over pairs, and ``backward()``
(gradients reach the policy hidden states and the LM-head weight). The reference shares the policy
head (``ref_weight = weight.detach()``: a LoRA-style frozen head, or step 0 of full fine-tuning) and
has its own hidden states. Rows: B chosen then B rejected sequences of T tokens (TRL's layout); the
first third of every row is prompt (label -100).

Implementations (``--impls``):

* ``expo-engine`` — ``expo_kernels.FusedLinearDPOLoss`` (metrics off) on the chunked engine
  (``expo_kernels.engine``: the logits of a chunk of pairs in a bounded workspace, the gradient formed
  while they are there: 8 NHV FLOPs);
* ``expo-engine-frozen`` — the same with a frozen head (LoRA: no ``d_weight``, 6 NHV);
* ``expo-recompute`` — the same module with ``kernel_options(engine=False)``: the op's recompute path
  (10 NHV). Named ``expo-previous`` in results files written before the rename; ``--impls expo-previous``
  still selects it (:data:`IMPL_ALIASES`);
* ``expo-native``, ``expo-torch`` — ``expo_kernels.linear_logprobs(..., backend=...)`` for both
  passes and the loss in PyTorch, one row per backend ``available_backends("cpu")`` lists;
* ``naive`` — full ``[tokens, vocab]`` fp32 logits, ``log_softmax``, ``gather`` (older TRL);
* ``trl`` — TRL's ``ChunkedLogProbFunction`` on the valid tokens (as ``bench_logprobs``);
* ``liger`` — Liger-Kernel's ``LigerFusedLinearDPOLoss`` (``compiled=True``, its default; chunks of
  one pair);
* ``cce`` — Cut Cross-Entropy ``linear_cross_entropy(..., reduction="none", impl="torch_compile")``,
  ``logp = -nll`` (exact: on CUDA, ``impl="cce"`` with ``filter_eps=None``);
* ``torch-lce`` — PyTorch's chunked ``torch.nn.functional.linear_cross_entropy(..., reduction="none",
  options=torch.nn.LinearCrossEntropyOptions())`` on the counted tokens, ``logp = -nll`` (torch >= 2.13;
  an error row where torch lacks it).

The inputs (``make_dpo_inputs``), the per-token implementations and the DPO loss are those of
``benchmarks._workloads``, shared with ``bench_logprobs`` and ``bench_long_context``. Time: the first call (compilation included), ``--warmup`` untimed calls,
then the median of ``--repeats``. Peak RSS: ``ru_maxrss`` of the worker over all its calls, its
high-water mark reset after imports and inputs (``/proc/self/clear_refs``), so it counts inputs +
gradients + working memory (+ the interpreter and libraries).

    python -m benchmarks.bench_dpo_cpu --quick               # small shape, ~1 min
    python -m benchmarks.bench_dpo_cpu                       # N=4096 H=1024, V=32000 and 128256 (long)
    python -m benchmarks.bench_dpo_cpu --vocab 32000 --impls expo naive liger
    python -m benchmarks.bench_dpo_cpu --workload rrhf --quick   # listwise RRHF, K = 4 responses

``--workload rrhf``: one RRHF step (Yuan et al., 2023) over ``B`` prompts x ``K = 4`` responses
(``--responses``) of ``T`` tokens, a third prompt: length-normalized completion log-probs, the
pairwise ranking hinge plus the cross-entropy of the highest-reward response, ``backward()``; no
reference model. Rows: ``expo-rank`` (``expo_kernels.FusedLinearRankingLoss("rrhf")``, metrics off:
one ``linear_logprobs`` call over the ``B*K`` responses, the fused backward) and ``naive-rank``
(materialized fp32 logits and the loss in plain PyTorch). Liger-Kernel 0.8.5's ``chunked_loss`` and
TRL 1.16 have no RRHF, PRO or RAFT loss, so they have no row. Written to ``bench_dpo_cpu_rrhf.json``.

Writes ``benchmarks/results/bench_dpo_cpu.json`` (``--json`` to change): device, versions, command,
every time and memory number, the FLOPs each step needs (valid tokens only) and its GFLOP/s, the
same-run ``torch.mm`` rate at 4096 x 1024 x 32000, and the loss and gradient checks against the
``naive`` row (or the first row that ran).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/bench_dpo_cpu.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _harness as hn  # noqa: E402  (neither imports torch at module level)
from benchmarks._workloads import (  # noqa: E402
    IGNORE_INDEX,
    PROMPT_FRAC,
    build_impl,
    dpo_sigmoid,
    grad_probe,
    make_dpo_inputs,
)

RESULTS_DIR = hn.RESULTS_DIR
ALL_IMPLS = (
    "expo-engine",
    "expo-engine-frozen",
    "expo-recompute",
    "expo-native",
    "expo-torch",
    "naive",
    "trl",
    "liger",
    "liger-api",
    "cce",
    "torch-lce",
)
#: Old row names still accepted by ``--impls`` and :func:`build_dpo_step` (results JSON written before
#: the rename say ``expo-previous``).
IMPL_ALIASES = {"expo-previous": "expo-recompute"}
# FLOPs a step needs per valid token x H x V: policy forward + d_hidden + d_weight + reference forward
# (the frozen head skips d_weight). A path that recomputes the logits in backward does 10.
FLOPS_PER_TOKEN_HV = {"expo-engine-frozen": 6}
MM_SHAPE = (4096, 1024, 32000)  # the same-run torch.mm rate is measured at this shape
BETA = 0.1
# --workload rrhf: no reference pass, so a step needs forward + d_hidden + d_weight = 6 NHV
RANK_IMPLS = ("expo-rank", "naive-rank")
RANK_FLOPS_PER_TOKEN_HV = 6
RANK_NOTE = "Liger-Kernel 0.8.5 chunked_loss and TRL 1.16 have no RRHF/PRO/RAFT loss: no row for them"


# ----------------------------------------------------------------------------------------------
# Worker
# ----------------------------------------------------------------------------------------------


def build_dpo_step(name: str, device="cpu", cce_impl: str | None = None, liger_compiled: bool = True):
    """``step(hidden, ref_hidden, weight, labels) -> loss`` (runs backward itself). ``device`` picks
    the per-token implementations' device-specific variants (cce: ``cce`` on CUDA, ``torch_compile``
    elsewhere, unless ``cce_impl`` names one); ``liger_compiled``: Liger's ``compiled`` flag (its
    default, True). Per-token names (``naive``, ``naive-masked``, ``trl``, ``cce``, ``cce-filtered``,
    ``torch-lce``, ``expo-<backend>``) are :func:`benchmarks._workloads.build_impl`'s, run for both
    passes. ``bench_dpo_gpu`` shares this builder."""
    import torch

    name = IMPL_ALIASES.get(name, name)
    if name.startswith("expo-engine") or name == "expo-recompute":
        import expo_kernels as ek

        # the module users call; metrics off so that it does the same work as the other rows
        loss_fn = ek.FusedLinearDPOLoss(beta=BETA, compute_metrics=False)
        engine = name != "expo-recompute"  # expo-recompute: the op's recompute path (10 NHV)

        def step(hidden, ref_hidden, weight, labels):
            with ek.kernel_options(engine=engine):
                out = loss_fn(weight, hidden, labels, ref_hidden=ref_hidden)  # reference shares the head
                out.loss.backward()
            return out.loss.detach()

        return step

    if name in ("liger", "liger-api"):
        # liger-api: the same class and call, from expo_kernels' Liger-compatible front end
        if name == "liger":
            from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
        else:
            from expo_kernels.integrations.liger import LigerFusedLinearDPOLoss

        kw = {} if liger_compiled else {"compiled": False}
        loss_fn = LigerFusedLinearDPOLoss(ignore_index=IGNORE_INDEX, beta=BETA, use_ref_model=True, **kw)

        def step(hidden, ref_hidden, weight, labels):
            out = loss_fn(weight, hidden, labels, ref_input=ref_hidden, ref_weight=weight.detach())
            loss = out[0] if isinstance(out, (tuple, list)) else out
            loss.backward()
            return loss.detach()

        return step

    # expo-<backend>, naive(-masked), trl, cce(-filtered), torch-lce: fn(h [N, H], W, labels [N]) -> logp [N]
    per_token = build_impl(name, device, cce_impl=cce_impl)

    def step(hidden, ref_hidden, weight, labels):
        rows, seq, width = hidden.shape
        logp = per_token(hidden.reshape(-1, width), weight, labels.reshape(-1)).view(rows, seq)
        with torch.no_grad():
            ref_logp = per_token(ref_hidden.reshape(-1, width), weight.detach(), labels.reshape(-1)).view(rows, seq)
        loss = dpo_sigmoid(logp.sum(-1), ref_logp.sum(-1), BETA)
        loss.backward()
        return loss.detach()

    return step


def rrhf_plain(hidden, weight, labels, rewards):
    """RRHF in plain PyTorch on materialized fp32 logits: ``hidden [B, K, T, H]``, ``labels [B, K, T]``,
    ``rewards [B, K]``; the pairwise hinge on length-normalized log-probs plus the cross-entropy of the
    highest-reward response, averaged over prompts."""
    import torch

    logp = torch.log_softmax(hidden @ weight.T, dim=-1)  # [B, K, T, V]: what the fused op never forms
    valid = labels != IGNORE_INDEX
    tok = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * valid
    scores = tok.sum(-1) / valid.sum(-1)
    worse_than = rewards[:, :, None] < rewards[:, None, :]
    rank = torch.relu(scores[:, :, None] - scores[:, None, :]).mul(worse_than).sum(dim=(1, 2))
    sft = -scores.gather(1, rewards.argmax(dim=1, keepdim=True))[:, 0]
    return (rank + sft).mean()


def build_rrhf_step(name: str):
    """``step(hidden [B, K, T, H], weight, labels, rewards) -> loss`` (runs backward itself)."""
    if name == "expo-rank":
        import expo_kernels as ek

        loss_fn = ek.FusedLinearRankingLoss("rrhf", compute_metrics=False)

        def step(hidden, weight, labels, rewards):
            loss = loss_fn(weight, hidden, labels, rewards).loss
            loss.backward()
            return loss.detach()

        return step

    def plain(hidden, weight, labels, rewards):
        loss = rrhf_plain(hidden, weight, labels, rewards)
        loss.backward()
        return loss.detach()

    return plain


def mm_rate(repeats: int = 3) -> float:
    """GFLOP/s of a float32 ``torch.mm`` at ``MM_SHAPE`` (median of ``repeats`` after one warm-up)."""
    import torch

    n, h, v = MM_SHAPE
    a, b = torch.randn(n, h), torch.randn(h, v)
    out = torch.empty(n, v)
    torch.mm(a, b, out=out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - t0)
    return 2 * n * h * v / statistics.median(times) / 1e9


def run_worker(spec: dict) -> dict:
    result = {"impl": spec["impl"], "status": "error"}
    if spec["impl"] == "mm":
        try:
            result.update(mm_gflops=mm_rate(), status="ok")
        except BaseException as exc:  # noqa: BLE001
            hn.error_fields(result, exc)
        return result
    try:
        if spec.get("workload") == "rrhf":
            return _rrhf_worker(spec, result)
        hidden, ref_hidden, weight, labels = make_dpo_inputs(
            spec["pairs"],
            spec["seq_len"],
            spec["hidden"],
            spec["vocab"],
            "fp32",
            "cpu",
            seed=spec["seed"],
            logit_std=spec["logit_std"],
        )
        result["n_valid"] = int((labels != IGNORE_INDEX).sum())
        if spec["impl"] == "expo-engine-frozen":
            weight.requires_grad_(False)  # LoRA: the head is frozen, no d_weight
        step_fn = build_dpo_step(spec["impl"])  # all imports happen here

        def step():
            hidden.grad = None
            weight.grad = None
            return step_fn(hidden, ref_hidden, weight, labels)

        _time_steps(step, spec, result, hidden, weight)
    except BaseException as exc:  # noqa: BLE001 — any failure becomes an error row
        hn.error_fields(result, exc)
    return result


def _time_steps(step, spec: dict, result: dict, hidden, weight) -> None:
    """Baseline and peak RSS, the first call, warm-up, the timed calls, the loss and gradient probes."""
    import torch

    loss = hn.time_steps(step, spec["warmup"], spec["repeats"], result)
    r = grad_probe(spec["hidden"], "cpu")
    result["loss"] = None if loss is None else float(loss)
    result["dw_r"] = None if weight.grad is None else (weight.grad.float() @ r).tolist()
    result["dh_r"] = (hidden.grad.float().reshape(-1, spec["hidden"]) @ r).tolist()
    result["threads"] = torch.get_num_threads()
    result["status"] = "ok"


def _rrhf_worker(spec: dict, result: dict) -> dict:
    """One RRHF step per call on ``prompts x responses`` rows (the DPO inputs' rows, regrouped)."""
    import torch

    b, k = spec["prompts"], spec["responses"]
    hidden, ref_hidden, weight, labels = make_dpo_inputs(
        b * k // 2,
        spec["seq_len"],
        spec["hidden"],
        spec["vocab"],
        "fp32",
        "cpu",
        seed=spec["seed"],
        logit_std=spec["logit_std"],
    )
    del ref_hidden  # no reference model in RRHF
    gen = torch.Generator().manual_seed(spec["seed"] + 4242)
    rewards = torch.randn(b, k, generator=gen)
    result["n_valid"] = int((labels != IGNORE_INDEX).sum())
    step_fn = build_rrhf_step(spec["impl"])
    shape = (b, k, spec["seq_len"])

    def step():
        hidden.grad = None
        weight.grad = None
        return step_fn(hidden.view(*shape, spec["hidden"]), weight, labels.view(shape), rewards)

    _time_steps(step, spec, result, hidden, weight)
    return result


# ----------------------------------------------------------------------------------------------
# Parent (no torch import)
# ----------------------------------------------------------------------------------------------


def _spawn(spec: dict, timeout: float, tmp: str) -> dict:
    return hn.spawn_worker("benchmarks.bench_dpo_cpu", spec, timeout, tmp)


def _rel(a, b) -> float:
    num = max((abs(x - y) for x, y in zip(a, b, strict=False)), default=0.0)
    return num / max(max((abs(y) for y in b), default=0.0), 1e-30)


def _add_checks(rows: list) -> None:
    """Loss and gradient projections of each row against the naive row (else the first ok row)."""
    ok = [r for r in rows if r["status"] == "ok"]
    ref = next((r for r in ok if r["impl"] in ("naive", "naive-rank")), ok[0] if ok else None)
    for r in ok:
        r["checked_against"] = ref["impl"]
        r["abs_dloss"] = abs(r["loss"] - ref["loss"])
        dw = _rel(r["dw_r"], ref["dw_r"]) if r["dw_r"] is not None and ref["dw_r"] is not None else 0.0
        r["grad_rel_err"] = max(dw, _rel(r["dh_r"], ref["dh_r"]))


def format_table(rows: list) -> str:
    head = [
        "impl",
        "B×T×H×V",
        "fwd+bwd s",
        "first s",
        "GFLOP needed",
        "GFLOP/s",
        "peak RSS GiB",
        "base RSS GiB",
        "|Δloss|",
        "grad rel err",
    ]
    lines = []
    for r in rows:
        rows = f"{r['prompts']}×{r['responses']}" if r.get("workload") == "rrhf" else f"{r['pairs']}×2"
        shape = f"{rows}×{r['seq_len']}×{r['hidden']}×{r['vocab']}"
        if r["status"] != "ok":
            lines.append([r["impl"], shape, hn.error_message(r, 100)])
            continue
        lines.append(
            [
                r["impl"],
                shape,
                hn.fmt_s(r["median_s"]),
                hn.fmt_s(r["first_s"]),
                f"{r['gflop_needed']:.0f}",
                f"{r['gflops']:.1f}",
                hn.gib(r["peak_rss_bytes"]) + ("" if r.get("peak_reset") else "*"),
                hn.gib(r.get("baseline_rss_bytes")),
                f"{r['abs_dloss']:.1e}",
                f"{r['grad_rel_err']:.1e}",
            ]
        )
    return hn.render_table(head, lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_dpo_cpu",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="small shape: 2 pairs x 256 tokens, H=256, V=8192")
    p.add_argument("--tokens", "-N", type=int, help="tokens per step incl. prompt (default 4096; quick 1024)")
    p.add_argument(
        "--pairs", "-B", type=int, help="preference pairs per step (2B rows; default 4; quick 2); rrhf: prompts"
    )
    p.add_argument("--hidden", "-H", type=int, help="hidden size (default 1024; quick 256)")
    p.add_argument("--vocab", "-V", type=int, nargs="+", help="vocab sizes (default 32000 128256; quick 8192)")
    p.add_argument("--impls", nargs="+", help=f"subset of {', '.join(ALL_IMPLS)} ('expo' = every expo backend)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps after warm-up; the median is reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after the (separately timed) first one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--logit-std", type=float, default=2.0)
    p.add_argument("--timeout", type=float, default=3600, help="seconds per implementation and shape")
    p.add_argument("--json", help="output path (default benchmarks/results/bench_dpo_cpu[_rrhf].json)")
    p.add_argument("--workload", choices=("dpo", "rrhf"), default="dpo", help="DPO pairs, or listwise RRHF")
    p.add_argument("--responses", "-K", type=int, default=4, help="rrhf: responses per prompt (default 4)")
    hn.add_worker_args(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if hn.worker_main(args, run_worker):
        return 0
    if args.workload == "rrhf":
        return main_rrhf(args, argv)
    tokens = args.tokens or (1024 if args.quick else 4096)
    pairs = args.pairs or (2 if args.quick else 4)
    hidden = args.hidden or (256 if args.quick else 1024)
    vocabs = args.vocab or ([8192] if args.quick else [32000, 128256])
    if tokens % (2 * pairs):
        raise SystemExit(f"--tokens {tokens} must be a multiple of 2 * pairs = {2 * pairs}")
    seq_len = tokens // (2 * pairs)

    info = hn.probe("cpu")
    backends = info.get("expo_backends") or ["torch"]
    expo = hn.expo_impls(info)
    impls = []
    default = (
        ["expo-engine", "expo-engine-frozen", "expo-recompute"]
        + expo
        + ["naive", "trl", "liger", "liger-api", "cce", "torch-lce"]
    )
    for name in args.impls or default:
        name = IMPL_ALIASES.get(name, name)
        if name == "expo":
            impls += expo
        elif name in ALL_IMPLS:
            impls.append(name)
        else:
            raise SystemExit(f"unknown implementation {name!r}; choose from {ALL_IMPLS} or 'expo'")
    impls = list(dict.fromkeys(impls))
    print(
        f"device: cpu ({info['device_name']}), torch {info['versions']['torch']}, {info['torch_threads']} threads; "
        f"expo backends: {backends}",
        flush=True,
    )
    print(
        f"impls: {', '.join(impls)}; {pairs} pairs x 2 rows x {seq_len} tokens (N={tokens}, a third prompt), "
        f"H={hidden}, V={vocabs}, fp32, warmup={args.warmup}, repeats={args.repeats}",
        flush=True,
    )

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_dpo_") as tmp:
        mm = _spawn(dict(impl="mm"), args.timeout, tmp)
        mm_gflops = mm.get("mm_gflops")
        print(f"same-run fp32 torch.mm at {MM_SHAPE}: {mm_gflops or float('nan'):.1f} GFLOP/s", flush=True)
        for V in vocabs:
            shape_rows = []
            for impl in impls:
                spec = dict(
                    impl=impl,
                    pairs=pairs,
                    seq_len=seq_len,
                    hidden=hidden,
                    vocab=V,
                    seed=args.seed,
                    logit_std=args.logit_std,
                    warmup=args.warmup,
                    repeats=args.repeats,
                )
                t0 = time.perf_counter()
                res = _spawn(spec, args.timeout, tmp)
                row = dict(spec)
                row.update(res)
                row["impl"] = impl
                shape_rows.append(row)
                status = "ok" if row["status"] == "ok" else "ERROR " + (row.get("error") or "?").splitlines()[0][:200]
                extra = (
                    f" median {row['median_s']:.3f} s, peak RSS {hn.gib(row['peak_rss_bytes'])} GiB"
                    if row["status"] == "ok"
                    else ""
                )
                print(f"[V={V}] {impl}: {status}{extra} ({time.perf_counter() - t0:.1f} s)", flush=True)
            _add_checks(shape_rows)
            for row in shape_rows:
                if row["status"] == "ok":
                    per = FLOPS_PER_TOKEN_HV.get(row["impl"], 8)
                    row["gflop_needed"] = per * row["n_valid"] * hidden * V / 1e9
                    row["gflops"] = row["gflop_needed"] / row["median_s"]
            rows += shape_rows

    print()
    print(format_table(rows))
    print(
        f"\nGFLOP needed: 8 x valid tokens x H x V (6 for the frozen head); the same-run torch.mm rate at "
        f"{MM_SHAPE} is {mm_gflops or float('nan'):.1f} GFLOP/s"
    )
    print(
        "\npeak RSS = ru_maxrss over all steps (reset after imports + inputs; * = reset impossible); base RSS = "
        "resident after imports + inputs; |Δloss| and grad rel err (max |Δ(dW·r)|, |Δ(dH·r)| over max |ref|) "
        "against the naive row"
    )
    for r in rows:  # the projections are long; keep them out of the JSON summary
        r.pop("dw_r", None)
        r.pop("dh_r", None)
    out_path = Path(args.json) if args.json else RESULTS_DIR / "bench_dpo_cpu.json"
    payload = {
        **hn.result_header(
            "bench_dpo_cpu",
            "benchmarks.bench_dpo_cpu",
            argv,
            info,
            ("device", "device_name", "cpu_count", "torch_threads"),
        ),
        "settings": {
            "tokens": tokens,
            "pairs": pairs,
            "seq_len": seq_len,
            "hidden": hidden,
            "vocab": vocabs,
            "dtype": "fp32",
            "prompt_frac": PROMPT_FRAC,
            "beta": BETA,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "seed": args.seed,
            "impls": impls,
            "reference": "forward-only, own hidden states, shares the policy head (detached)",
            "renamed": {old: new for old, new in IMPL_ALIASES.items()},
        },
        "mm_gflops": mm_gflops,
        "mm_shape": MM_SHAPE,
        "results": rows,
    }
    hn.write_json(out_path, payload)
    return 0


def main_rrhf(args, argv) -> int:
    """``--workload rrhf``: ``expo-rank`` and ``naive-rank``, each in a fresh process per vocab size."""
    tokens = args.tokens or (1024 if args.quick else 4096)
    prompts = args.pairs or (2 if args.quick else 4)
    k = args.responses
    hidden = args.hidden or (256 if args.quick else 1024)
    vocabs = args.vocab or ([8192] if args.quick else [32000])
    if k < 2 or (prompts * k) % 2 or tokens % (prompts * k):
        raise SystemExit(f"--tokens {tokens} must be a multiple of prompts * K = {prompts * k} (K >= 2, B * K even)")
    seq_len = tokens // (prompts * k)
    impls = list(dict.fromkeys(args.impls or RANK_IMPLS))
    bad = [i for i in impls if i not in RANK_IMPLS]
    if bad:
        raise SystemExit(f"unknown implementation(s) {bad} for --workload rrhf; choose from {RANK_IMPLS}")
    info = hn.probe("cpu")
    print(f"device: cpu ({info['device_name']}), torch {info['versions']['torch']}, {info['torch_threads']} threads")
    print(
        f"RRHF: {prompts} prompts x {k} responses x {seq_len} tokens (N={tokens}, a third prompt), H={hidden}, "
        f"V={vocabs}, fp32, warmup={args.warmup}, repeats={args.repeats}; {RANK_NOTE}",
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_rrhf_") as tmp:
        for V in vocabs:
            shape_rows = []
            for impl in impls:
                spec = dict(
                    workload="rrhf",
                    impl=impl,
                    prompts=prompts,
                    responses=k,
                    seq_len=seq_len,
                    hidden=hidden,
                    vocab=V,
                    seed=args.seed,
                    logit_std=args.logit_std,
                    warmup=args.warmup,
                    repeats=args.repeats,
                )
                t0 = time.perf_counter()
                row = dict(spec)
                row.update(_spawn(spec, args.timeout, tmp))
                row["impl"] = impl
                shape_rows.append(row)
                status = "ok" if row["status"] == "ok" else "ERROR " + (row.get("error") or "?").splitlines()[0][:200]
                print(f"[V={V}] {impl}: {status} ({time.perf_counter() - t0:.1f} s)", flush=True)
            _add_checks(shape_rows)
            for row in shape_rows:
                if row["status"] == "ok":
                    row["gflop_needed"] = RANK_FLOPS_PER_TOKEN_HV * row["n_valid"] * hidden * V / 1e9
                    row["gflops"] = row["gflop_needed"] / row["median_s"]
            rows += shape_rows
    print()
    print(format_table(rows))
    print(
        "\nGFLOP needed: 6 x valid tokens x H x V (forward, d_hidden, d_weight; no reference model). "
        "peak RSS = ru_maxrss over all steps (reset after imports + inputs); |Δloss|, grad rel err against "
        f"naive-rank. {RANK_NOTE}."
    )
    for r in rows:
        r.pop("dw_r", None)
        r.pop("dh_r", None)
    out_path = Path(args.json) if args.json else RESULTS_DIR / "bench_dpo_cpu_rrhf.json"
    payload = {
        **hn.result_header(
            "bench_dpo_cpu",
            "benchmarks.bench_dpo_cpu",
            argv,
            info,
            ("device", "device_name", "cpu_count", "torch_threads"),
        ),
        "settings": {
            "workload": "rrhf",
            "tokens": tokens,
            "prompts": prompts,
            "responses": k,
            "seq_len": seq_len,
            "hidden": hidden,
            "vocab": vocabs,
            "dtype": "fp32",
            "prompt_frac": PROMPT_FRAC,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "seed": args.seed,
            "impls": impls,
            "loss": "RRHF: sum over pairs r_i < r_j of max(0, s_i - s_j) + token-mean NLL of the best response",
            "no_equivalent": RANK_NOTE,
        },
        "results": rows,
    }
    hn.write_json(out_path, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())

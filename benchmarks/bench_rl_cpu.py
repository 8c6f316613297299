"""The LM-head (log-prob) part of an online RL step on the CPU: time and peak RSS, a fresh process per row.

``--workload grpo`` (default), one GRPO step's head work on ``G`` completions of ``T`` tokens (the last
quarter of every other row is padding): the old-policy pass and the reference pass, both forward-only
(no graph), then the policy pass with gradient and the per-token entropy (TRL's metric and high-entropy
mask), TRL's default ``dapo`` loss (token-level clipped ratio, ``beta`` KL to the reference) and
``backward()`` to the hidden states and the head weight. The reference and the old policy share the
policy's head (``weight.detach()``) and have their own hidden states.

``--workload online-dpo``: one online-DPO step's head work on ``G/2`` prompts x 2 completions: the policy
pass with gradient, the reference pass forward-only, the sigmoid DPO loss on the completion sums,
``backward()``.

Rows (``--impls``):

* ``expo`` — :func:`expo_kernels.linear_logprobs` (``return_stats=True`` for the entropy), what
  ``FusedGRPOTrainer`` / ``FusedOnlineDPOTrainer`` run; the no-grad passes take the op's forward-only path;
* ``trl`` — TRL's own head, ``trl.kernels.ChunkedLogProbFunction`` as TRL's ``add_fused_lm_head`` calls
  it on the CPU (every position scored, chunks of 32768 vocabulary rows, the entropy output); TRL's online
  DPO does not use it (it materializes logits: the ``naive`` row), so it is a GRPO row only;
* ``naive`` — full ``[tokens, vocab]`` fp32 logits, ``log_softmax``, ``gather`` (and the entropy from them).

Time: the first call, ``--warmup`` untimed calls, the median of ``--repeats``. Peak RSS: ``ru_maxrss``
of the worker, its high-water mark reset after imports and inputs, so it counts inputs + gradients +
working memory (+ interpreter and libraries).

    python -m benchmarks.bench_rl_cpu                                   # 8 x 256 tokens, H=1024, V=32000
    python -m benchmarks.bench_rl_cpu --workload online-dpo --impls expo naive
    python -m benchmarks.bench_rl_cpu --quick                           # small shape, seconds

Writes ``benchmarks/results/bench_rl_cpu.json`` (``--json`` to change); a run merges its rows into the
file's rows of the other workload.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/bench_rl_cpu.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _harness as hn  # noqa: E402  (never imports torch at module level)

RESULTS_DIR = hn.RESULTS_DIR
IMPLS = {"grpo": ("expo", "trl", "naive"), "online-dpo": ("expo", "naive")}
BETA = 0.04  # GRPO KL weight; online DPO's beta is 0.1
EPS_LOW, EPS_HIGH = 0.2, 0.28  # TRL's epsilon / DAPO's epsilon_high
IGNORE = -100


# ----------------------------------------------------------------------------------------------
# Worker
# ----------------------------------------------------------------------------------------------


def _head(name: str):
    """``head(hidden [G, T, H], weight, labels [G, T], entropy: bool) -> (logp [G, T], entropy | None)``,
    0 where the label is ignored."""
    import torch

    if name == "expo":
        import expo_kernels as ek

        def head(hidden, weight, labels, entropy):
            if entropy:
                logp, stats = ek.linear_logprobs(hidden, weight, labels, return_stats=True)
                return logp, stats.entropy
            return ek.linear_logprobs(hidden, weight, labels), None

        return head
    if name == "trl":
        from trl.kernels import ChunkedLogProbFunction

        def head(hidden, weight, labels, entropy):  # as trl.trainer.utils.add_fused_lm_head on the CPU
            mask = labels != IGNORE
            outputs = ("log_probs", "entropy") if entropy else ("log_probs",)
            logp, ent, *_ = ChunkedLogProbFunction.apply(
                hidden.reshape(-1, hidden.size(-1)),
                weight,
                None,
                labels.clamp(min=0).reshape(-1),
                1.0,
                32768,
                None,
                1.0,
                outputs,
            )
            logp = logp.view(mask.shape).masked_fill(~mask, 0)
            return logp, None if ent is None else ent.view(mask.shape).masked_fill(~mask, 0)

        return head
    if name == "naive":

        def head(hidden, weight, labels, entropy):
            mask = labels != IGNORE
            logp_all = torch.log_softmax((hidden @ weight.T).float(), dim=-1)  # [G, T, V]
            logp = logp_all.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * mask
            ent = -(logp_all.exp() * logp_all).sum(-1) * mask if entropy else None
            return logp, ent

        return head
    raise ValueError(f"unknown implementation {name!r}")


def _grpo_step(head, hidden, old_hidden, ref_hidden, weight, labels, advantages):
    import torch

    mask = (labels != IGNORE).float()
    with torch.no_grad():
        old_logp, _ = head(old_hidden, weight.detach(), labels, False)
        ref_logp, _ = head(ref_hidden, weight.detach(), labels, False)
    logp, entropy = head(hidden, weight, labels, True)
    coef_1 = torch.exp(logp - old_logp)
    coef_2 = coef_1.clamp(1 - EPS_LOW, 1 + EPS_HIGH)
    per_token = -torch.min(coef_1 * advantages[:, None], coef_2 * advantages[:, None])
    per_token = per_token + BETA * (torch.exp(ref_logp - logp) - (ref_logp - logp) - 1)
    loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    loss.backward()
    assert entropy is not None
    return loss.detach(), float((entropy * mask).sum() / mask.sum())


def _online_dpo_step(head, hidden, ref_hidden, weight, labels):
    import torch
    import torch.nn.functional as F

    logp, _ = head(hidden, weight, labels, False)
    with torch.no_grad():
        ref_logp, _ = head(ref_hidden, weight.detach(), labels, False)
    c, r = logp.sum(1).chunk(2)
    rc, rr = ref_logp.sum(1).chunk(2)
    loss = -F.logsigmoid(0.1 * ((c - r) - (rc - rr))).mean()
    loss.backward()
    return loss.detach(), None


def run_worker(spec: dict) -> dict:
    result = {"impl": spec["impl"], "workload": spec["workload"], "status": "error"}
    try:
        import torch

        g = torch.Generator().manual_seed(spec["seed"])
        rows, seq, H, V = spec["rows"], spec["seq_len"], spec["hidden"], spec["vocab"]
        weight = (torch.randn(V, H, generator=g) * (spec["logit_std"] / H**0.5)).requires_grad_()
        hidden = torch.randn(rows, seq, H, generator=g).requires_grad_()
        noise = 0.05 * torch.randn(rows, seq, H, generator=g)
        old_hidden, ref_hidden = hidden.detach() + noise, hidden.detach() - noise
        labels = torch.randint(0, V, (rows, seq), generator=g)
        labels[1::2, seq - seq // 4 :] = IGNORE  # padded completions
        advantages = torch.randn(rows, generator=g)
        result["n_valid"] = int((labels != IGNORE).sum())
        head = _head(spec["impl"])  # imports happen here

        def step():
            hidden.grad = weight.grad = None
            if spec["workload"] == "grpo":
                return _grpo_step(head, hidden, old_hidden, ref_hidden, weight, labels, advantages)
            return _online_dpo_step(head, hidden, ref_hidden, weight, labels)

        loss, ent = hn.time_steps(step, spec["warmup"], spec["repeats"], result)
        result["loss"], result["entropy"] = float(loss), ent
        assert weight.grad is not None and hidden.grad is not None
        result["grad_w_norm"] = float(weight.grad.norm())
        result["grad_h_norm"] = float(hidden.grad.norm())
        result["threads"] = torch.get_num_threads()
        result["status"] = "ok"
    except BaseException as exc:  # noqa: BLE001 — any failure becomes an error row
        hn.error_fields(result, exc)
    return result


# ----------------------------------------------------------------------------------------------
# Parent (no torch import)
# ----------------------------------------------------------------------------------------------


def format_table(rows: list) -> str:
    head = ["workload", "impl", "rows×T×H×V", "step s", "first s", "peak RSS GiB", "base RSS GiB", "|Δloss|"]
    lines = []
    for r in rows:
        shape = f"{r['rows']}×{r['seq_len']}×{r['hidden']}×{r['vocab']}"
        if r["status"] != "ok":
            lines.append([r["workload"], r["impl"], shape, hn.error_message(r, 100)])
            continue
        lines.append(
            [
                r["workload"],
                r["impl"],
                shape,
                hn.fmt_s(r["median_s"]),
                hn.fmt_s(r["first_s"]),
                hn.gib(r["peak_rss_bytes"]) + ("" if r.get("peak_reset") else "*"),
                hn.gib(r.get("baseline_rss_bytes")),
                f"{r['abs_dloss']:.1e}" if "abs_dloss" in r else "-",
            ]
        )
    return hn.render_table(head, lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_rl_cpu",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--workload", choices=tuple(IMPLS), default="grpo")
    p.add_argument("--quick", action="store_true", help="small shape: 4 x 128 tokens, H=256, V=8192")
    p.add_argument("--rows", "-G", type=int, help="completions per step (default 8; quick 4)")
    p.add_argument("--seq-len", "-T", type=int, help="completion tokens per row (default 256; quick 128)")
    p.add_argument("--hidden", "-H", type=int, help="hidden size (default 1024; quick 256)")
    p.add_argument("--vocab", "-V", type=int, help="vocabulary size (default 32000; quick 8192)")
    p.add_argument("--impls", nargs="+", help="subset of the workload's rows (grpo: expo trl naive)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps after warm-up; the median is reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after the (separately timed) first one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--logit-std", type=float, default=2.0)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per row")
    p.add_argument("--json", help="output path (default benchmarks/results/bench_rl_cpu.json)")
    hn.add_worker_args(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if hn.worker_main(args, run_worker):
        return 0
    rows_n = args.rows or (4 if args.quick else 8)
    seq = args.seq_len or (128 if args.quick else 256)
    hidden = args.hidden or (256 if args.quick else 1024)
    vocab = args.vocab or (8192 if args.quick else 32000)
    if args.workload == "online-dpo" and rows_n % 2:
        raise SystemExit("--rows must be even for online-dpo (2 completions per prompt)")
    impls = args.impls or list(IMPLS[args.workload])
    bad = [i for i in impls if i not in IMPLS[args.workload]]
    if bad:
        raise SystemExit(f"unknown implementation(s) {bad} for {args.workload}; choose from {IMPLS[args.workload]}")
    info = hn.probe("cpu")
    print(
        f"device: cpu ({info['device_name']}), torch {info['versions']['torch']}, {info['torch_threads']} threads; "
        f"{args.workload}: {rows_n} x {seq} tokens, H={hidden}, V={vocab}, fp32, impls {impls}",
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_rl_") as tmp:
        for impl in impls:
            spec = dict(
                impl=impl,
                workload=args.workload,
                rows=rows_n,
                seq_len=seq,
                hidden=hidden,
                vocab=vocab,
                seed=args.seed,
                logit_std=args.logit_std,
                warmup=args.warmup,
                repeats=args.repeats,
            )
            t0 = time.perf_counter()
            row = {**spec, **hn.spawn_worker("benchmarks.bench_rl_cpu", spec, args.timeout, tmp)}
            extra = (
                f"median {row['median_s']:.3f} s, peak RSS {hn.gib(row['peak_rss_bytes'])} GiB"
                if row["status"] == "ok"
                else "ERROR " + (row.get("error") or "?").splitlines()[0][:200]
            )
            print(f"{impl}: {extra} ({time.perf_counter() - t0:.1f} s)", flush=True)
            rows.append(row)
    ref = next((r for r in rows if r["status"] == "ok" and r["impl"] == "naive"), None)
    for r in rows:
        r.pop("traceback", None)
        r["command"] = hn.command_line("benchmarks.bench_rl_cpu", argv)  # rows of both workloads share the file
        if ref is not None and r["status"] == "ok":
            r["abs_dloss"] = abs(r["loss"] - ref["loss"])
    print()
    print(format_table(rows))
    print("\nstep s: median wall time of the head work of one step; |Δloss| against the naive row")
    out_path = Path(args.json) if args.json else RESULTS_DIR / "bench_rl_cpu.json"
    kept = []
    if out_path.exists() and not args.json:  # keep the other workload's rows
        try:
            kept = [r for r in json.loads(out_path.read_text()).get("rows", []) if r.get("workload") != args.workload]
        except (OSError, ValueError):
            kept = []
    payload = {
        **hn.result_header(
            "bench_rl_cpu",
            "benchmarks.bench_rl_cpu",
            argv,
            info,
            ("device", "device_name", "cpu_count", "torch_threads"),
        ),
        "rows": kept + rows,
    }
    hn.write_json(out_path, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

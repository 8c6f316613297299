"""A roofline model of one DPO step at the LM head: FLOPs, HBM bytes and the expected time per stage.

Notation: ``N`` counted (valid) tokens, ``H`` hidden size, ``V`` vocabulary, ``C`` engine chunk (tokens
per workspace), ``k = ceil(N / C)`` chunks, ``s`` bytes per element of the inputs (bf16: 2), logits and
workspace in float32 (4 bytes). Every stage takes ``max(FLOPs / P, bytes / B)`` with ``P`` the matmul
rate and ``B`` the HBM bandwidth (a stage is either compute- or memory-bound, never both).

Chunked engine (``path="engine"``), per step:

==================  ==============  ===============================================================
stage               FLOPs           HBM bytes
==================  ==============  ===============================================================
ref forward GEMM    2 N H V         k s V H (W per chunk) + s N H (h) + 4 N V (Z written, fp32)
ref fold            ~5 N V          4 N V (Z read; per-token lse/logp only)
policy forward GEMM 2 N H V         k s V H + s N H + 4 N V
fold epilogue       ~5 N V          4 N V (read) [+ 4 N V if it writes the transformed logits]
dZ epilogue         ~4 N V          4 N V (read) + s N V (dZ written)
dH GEMM             2 N H V         s N V (dZ) + k s V H (W) + s N H (dH written)
dW GEMM             2 N H V         s N V (dZ) + s N H (h) + k 2 a V H (dW read + written, ``a`` bytes)
==================  ==============  ===============================================================

A frozen head drops the dW GEMM: 6 N H V instead of 8 N H V. A workspace ``4 C V`` that fits in L2
keeps the Z round trip between a GEMM and its epilogue on chip (those 4 N V terms leave HBM). When the
reference's rows share each chunk's GEMM (``stacked``: a shared head and both fit the workspace) the
reference forward reads no W of its own; otherwise it runs in chunks of ``C_ref`` tokens.

Two-pass engine (``path="two-pass"``: a pair longer than the workspace, e.g. one 32k-token pair): a
forward pass over token chunks (policy GEMM + fold, per-token results only), then a backward pass
recomputing each chunk's logits (GEMM + dZ epilogue + dH + dW): 10 N H V (8 frozen) plus the
reference forward, i.e. the recompute GEMM is the extra ``2 N H V``.

Which engine path a step takes follows ``expo_kernels.engine.plan_pairs``: :func:`engine_plan` mirrors
it in plain Python (no torch import: ``bench_dpo_gpu``'s parent stays light) from the pairs' counted
tokens, the workspace cap (``expo_kernels.ops.options.DEFAULT_WORKSPACE_BYTES``: 1 GiB on CUDA, 512 MiB
on the CPU) and ``expo_kernels.engine.CHUNK_TOKENS`` (1024 CUDA, 512 CPU); a test checks the mirror
against the engine. :func:`predict_step` = :func:`engine_plan` + :func:`predict`.

Recompute path (``path="recompute"``, the Triton op: logits never leave the chip): reference forward
2 N H V, policy forward 2 N H V, backward recomputing the logits then dH and dW 6 N H V, 10 N H V in
all; bytes with ideal L2 reuse of W across token blocks: ``s V H + s N H`` per forward, and
``s V H + 2 s N H + 4 V H`` for the backward (fp32 dW accumulation).

The floor is ``8 N H V / P`` (``6`` frozen): the GEMMs the step needs at the matmul rate, nothing else.

    python -m benchmarks.roofline                          # 4 pairs x 1366 counted tokens, H=4096, V=128256, H200
    python -m benchmarks.roofline --device h100 --frozen   # H100 figures
    python -m benchmarks.roofline --pairs 1 --pair-tokens 43690   # one 32k-token pair: the two-pass path
    python -m benchmarks.roofline --matmul-tflops 700 --hbm-tbs 3.0 --l2-mb 50 --path recompute

Importable: :func:`predict` returns a dict (stages, totals, floor); :func:`engine_plan` the path and
chunks the engine picks; :func:`predict_step` both. ``bench_dpo_gpu`` calls :func:`predict_step` with
the same-run matmul rate, copy bandwidth and the device's L2 size.
"""

from __future__ import annotations

import argparse
import math
import sys

# Defaults for the CLI only (bench_dpo_gpu passes the figures it measured on the device at hand).
# H200: bf16 dense matmul rate as measured (not the datasheet's 989), copy bandwidth, L2. H100 SXM:
# datasheet-derived guesses (~80% of 989 dense bf16; ~3.35 TB/s HBM3 at ~90% by copy; 50 MB L2).
H200_MATMUL_TFLOPS = 790.0
H200_HBM_TBS = 4.3
H200_L2_MB = 60.0
DEVICES = {
    "h200": {"matmul_tflops": H200_MATMUL_TFLOPS, "hbm_tbs": H200_HBM_TBS, "l2_mb": H200_L2_MB},
    "h100": {"matmul_tflops": 790.0, "hbm_tbs": 3.0, "l2_mb": 50.0},
}
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}

# Mirrors of expo_kernels' engine constants (tests/test_bench_dpo_gpu.py checks them against the
# package): the workspace cap per device type (ops/options.py DEFAULT_WORKSPACE_BYTES) and the tokens
# a chunk of whole pairs grows to (engine.py CHUNK_TOKENS).
WORKSPACE_BYTES = {"cpu": 512 << 20, "cuda": 1 << 30}
CHUNK_TOKENS = {"cpu": 512, "cuda": 1024}
PATHS = ("engine", "two-pass", "recompute")


def pair_chunks(pair_tokens, budget_tokens, target_tokens):
    """``expo_kernels.engine.pair_chunks`` on a list: consecutive ``(p0, p1)`` ranges of pairs, each grown
    until it holds ``target_tokens`` counted tokens and never past ``budget_tokens``; None when one pair
    alone exceeds the budget."""
    counts = [int(c) for c in pair_tokens]
    if counts and max(counts) > budget_tokens:
        return None
    chunks, start, used = [], 0, 0
    for i, c in enumerate(counts):
        if i > start and (used >= target_tokens or used + c > budget_tokens):
            chunks.append((start, i))
            start, used = i, 0
        used += c
    if start < len(counts):
        chunks.append((start, len(counts)))
    return chunks


def engine_plan(
    pair_tokens,
    vocab: int,
    dtype: str = "bf16",
    device_type: str = "cuda",
    workspace_bytes: int | None = None,
    shared_ref_head: bool = True,
    logits_bytes: int | None = None,
) -> dict:
    """The path ``FusedLinearDPOLoss``'s engine takes for pairs with ``pair_tokens`` counted tokens each
    (``expo_kernels.engine.plan_pairs`` + ``run_pair_step`` + ``forward_logps``, in plain Python).

    Bytes per counted token in the workspace: its logits (``logits_bytes``, float32 by default: 16-bit
    heads write float32 logits through ``out_dtype``; twice when the reference's rows share the chunk's
    GEMM) plus, for a 16-bit head, its 16-bit dz. ``stacked`` is tried first when the reference shares
    the head; if a pair does not fit, unstacked; if a pair still does not fit, ``two-pass``.

    Returns ``{"path": "engine" | "two-pass", "stacked", "chunk": tokens per chunk (largest),
    "chunks": number of chunks, "ref_chunk": tokens per reference-forward chunk (None when stacked),
    "budget_tokens", "workspace_bytes", "n_valid"}``."""
    s = DTYPE_BYTES[dtype]
    lb = logits_bytes or max(4, s)
    ws = int(workspace_bytes or WORKSPACE_BYTES.get(device_type, WORKSPACE_BYTES["cuda"]))
    target = CHUNK_TOKENS.get(device_type, CHUNK_TOKENS["cuda"])
    counts = [int(c) for c in pair_tokens]
    n = sum(counts)

    def per_token(stacked, backward=True):
        return vocab * ((2 if stacked else 1) * lb + (s if backward and lb != s else 0))

    for stacked in (True, False) if shared_ref_head else (False,):
        budget = max(1, ws // per_token(stacked))
        chunks = pair_chunks(counts, budget, target)
        if chunks is not None:
            sizes = [sum(counts[p0:p1]) for p0, p1 in chunks]
            ref_chunk = None if stacked else max(1, min(target, ws // per_token(False, backward=False), n))
            return dict(
                path="engine", stacked=stacked, chunk=max(sizes, default=0), chunks=len(chunks),
                ref_chunk=ref_chunk, budget_tokens=budget, workspace_bytes=ws, n_valid=n,
            )  # fmt: skip
    budget = max(1, ws // per_token(False))
    chunk = max(1, min(budget, target, n))  # run_pair_step: the GEMM-friendly size, not the whole budget
    ref_chunk = max(1, min(target, ws // per_token(False, backward=False), n))
    return dict(
        path="two-pass", stacked=False, chunk=chunk, chunks=math.ceil(n / chunk) if n else 0,
        ref_chunk=ref_chunk, budget_tokens=budget, workspace_bytes=ws, n_valid=n,
    )  # fmt: skip


def _stage(name, flops, bytes_, tflops, tbs):
    compute_ms = flops / (tflops * 1e12) * 1e3
    memory_ms = bytes_ / (tbs * 1e12) * 1e3
    return {
        "stage": name,
        "flops": float(flops),
        "bytes": float(bytes_),
        "compute_ms": compute_ms,
        "memory_ms": memory_ms,
        "ms": max(compute_ms, memory_ms),
        "bound": "compute" if compute_ms >= memory_ms else "memory",
    }


def predict(
    n_valid: int,
    hidden: int,
    vocab: int,
    chunk: int = 1024,
    dtype: str = "bf16",
    trained_head: bool = True,
    path: str = "engine",
    matmul_tflops: float = H200_MATMUL_TFLOPS,
    hbm_tbs: float = H200_HBM_TBS,
    l2_mb: float | None = H200_L2_MB,
    fold_writes: bool = False,
    dw_accum_bytes: int = 4,
    stacked: bool = False,
    ref_chunk: int | None = None,
) -> dict:
    """The model's stages and totals for one step (see the module docstring for the formulas).

    ``path``: ``"engine"`` (8 NHV; 6 frozen), ``"two-pass"`` (the engine on a pair longer than its
    workspace: 10 NHV; 8 frozen) or ``"recompute"`` (the fused op: 10 NHV; 8 frozen). ``chunk``: the
    engine's tokens per workspace; ``stacked``: the reference's rows share each chunk's GEMM (no W read
    of their own); ``ref_chunk``: tokens per chunk of the separate reference forward (default
    ``chunk``). ``l2_mb`` None or 0: no L2 credit (e.g. a CPU).

    Returns ``{"stages": [{stage, flops, bytes, compute_ms, memory_ms, ms, bound}], "total_ms",
    "floor_ms", "flops", "bytes", "inputs": {...}}``.
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    N, H, V, s = int(n_valid), int(hidden), int(vocab), DTYPE_BYTES[dtype]
    C = max(1, min(int(chunk), N))
    k = math.ceil(N / C) if N else 0
    Cr = max(1, min(int(ref_chunk or C), N))
    kr = math.ceil(N / Cr) if N else 0
    l2 = float(l2_mb or 0.0) * 1e6
    gemm = 2.0 * N * H * V
    stages = []

    def add(name, flops, bytes_):
        stages.append(_stage(name, flops, bytes_, matmul_tflops, hbm_tbs))

    in_l2 = path != "recompute" and 4.0 * C * V <= l2
    if path in ("engine", "two-pass"):
        z_hbm = 0.0 if in_l2 else 4.0 * N * V  # one pass of the fp32 workspace through HBM
        ref_l2 = 4.0 * Cr * V <= l2
        zr_hbm = 0.0 if ref_l2 else 4.0 * N * V
        if stacked:  # the reference rows ride in the policy chunk's GEMM: no W read of their own
            add("ref forward GEMM (stacked)", gemm, s * N * H + z_hbm)
            add("ref fold", 5.0 * N * V, z_hbm)
        else:
            add("ref forward GEMM", gemm, kr * s * V * H + s * N * H + zr_hbm)
            add("ref fold", 5.0 * N * V, zr_hbm)
        fwd_bytes = k * s * V * H + s * N * H + z_hbm
        add("policy forward GEMM", gemm, fwd_bytes)
        add("fold epilogue", 5.0 * N * V, z_hbm * (2 if fold_writes else 1))
        if path == "two-pass":  # the backward pass recomputes every chunk's logits
            add("recompute GEMM (backward pass)", gemm, fwd_bytes)
        add("dZ epilogue", 4.0 * N * V, z_hbm + s * N * V)
        add("dH GEMM", gemm, s * N * V + k * s * V * H + s * N * H)
        if trained_head:
            add("dW GEMM", gemm, s * N * V + s * N * H + k * 2 * dw_accum_bytes * V * H)
    else:
        fwd_bytes = s * V * H + s * N * H
        add("ref forward (fused)", gemm, fwd_bytes)
        add("policy forward (fused)", gemm, fwd_bytes)
        bwd_flops = 3 * gemm if trained_head else 2 * gemm
        bwd_bytes = s * V * H + 2 * s * N * H + (4 * V * H if trained_head else 0)
        add("backward: recompute + dH" + (" + dW" if trained_head else ""), bwd_flops, bwd_bytes)
    needed = (8 if trained_head else 6) * N * H * V
    return {
        "stages": stages,
        "total_ms": sum(st["ms"] for st in stages),
        "floor_ms": needed / (matmul_tflops * 1e12) * 1e3,
        "flops": sum(st["flops"] for st in stages),
        "flops_needed": float(needed),
        "bytes": sum(st["bytes"] for st in stages),
        "inputs": {
            "n_valid": N,
            "hidden": H,
            "vocab": V,
            "chunk": C,
            "chunks": k,
            "ref_chunk": None if stacked or path == "recompute" else Cr,
            "stacked": stacked,
            "dtype": dtype,
            "trained_head": trained_head,
            "path": path,
            "matmul_tflops": matmul_tflops,
            "hbm_tbs": hbm_tbs,
            "l2_mb": l2_mb,
            "fold_writes": fold_writes,
            "dw_accum_bytes": dw_accum_bytes,
            "workspace_in_l2": in_l2,
        },
    }


def predict_step(
    pair_tokens,
    hidden: int,
    vocab: int,
    dtype: str = "bf16",
    trained_head: bool = True,
    engine: bool = True,
    device_type: str = "cuda",
    workspace_bytes: int | None = None,
    chunk: int | None = None,
    **figures,
) -> dict:
    """:func:`predict` for one DPO step of pairs with ``pair_tokens`` counted tokens each, on the path
    the package takes: ``engine=True`` (the default options) -> :func:`engine_plan`'s ``engine`` or
    ``two-pass``; ``engine=False`` -> ``recompute``. ``chunk`` overrides the plan's chunk. ``figures``:
    ``matmul_tflops``, ``hbm_tbs``, ``l2_mb`` (and the other :func:`predict` keywords). The result's
    ``"plan"`` is the :func:`engine_plan` dict (None for ``recompute``)."""
    n = sum(int(c) for c in pair_tokens)
    if not engine:
        pred = predict(n, hidden, vocab, dtype=dtype, trained_head=trained_head, path="recompute", **figures)
        pred["plan"] = None
        return pred
    plan = engine_plan(pair_tokens, vocab, dtype, device_type, workspace_bytes)
    pred = predict(
        n,
        hidden,
        vocab,
        chunk=chunk or plan["chunk"],
        dtype=dtype,
        trained_head=trained_head,
        path=plan["path"],
        stacked=plan["stacked"],
        ref_chunk=plan["ref_chunk"],
        **figures,
    )
    pred["plan"] = plan
    return pred


def format_prediction(pred: dict) -> str:
    head = f"{'stage':<34} {'GFLOP':>9} {'GB':>8} {'compute ms':>11} {'memory ms':>10} {'model ms':>9}  bound"
    lines = [head, "-" * len(head)]
    for st in pred["stages"]:
        lines.append(
            f"{st['stage']:<34} {st['flops'] / 1e9:>9.0f} {st['bytes'] / 1e9:>8.2f} {st['compute_ms']:>11.3f} "
            f"{st['memory_ms']:>10.3f} {st['ms']:>9.3f}  {st['bound']}"
        )
    lines.append("-" * len(head))
    lines.append(
        f"{'total':<34} {pred['flops'] / 1e9:>9.0f} {pred['bytes'] / 1e9:>8.2f} {'':>11} {'':>10} {pred['total_ms']:>9.3f}"
    )
    lines.append(
        f"{'floor (needed GEMMs only)':<34} {pred['flops_needed'] / 1e9:>9.0f} {'':>8} {'':>11} {'':>10} {pred['floor_ms']:>9.3f}"
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.roofline",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--pairs", "-B", type=int, default=4, help="preference pairs (default 4)")
    p.add_argument(
        "--pair-tokens",
        type=int,
        default=1366,
        help="counted tokens per pair (default 1366: 2 rows x 1024 tokens, a third prompt)",
    )
    p.add_argument("--hidden", "-H", type=int, default=4096)
    p.add_argument("--vocab", "-V", type=int, default=128256)
    p.add_argument("--chunk", "-C", type=int, help="override the engine chunk (tokens per workspace)")
    p.add_argument("--workspace-bytes", type=int, help="engine workspace cap (default: the package's, per device)")
    p.add_argument("--device-type", choices=sorted(WORKSPACE_BYTES), default="cuda", help="the engine's rules for")
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bf16")
    p.add_argument("--frozen", action="store_true", help="frozen head: no dW GEMM")
    p.add_argument(
        "--path",
        choices=["auto", "recompute", "both"],
        default="both",
        help="auto: the engine's path for these pairs (engine or two-pass); both: auto and recompute",
    )
    p.add_argument("--device", choices=sorted(DEVICES), default="h200", help="default figures (h200 measured)")
    p.add_argument("--matmul-tflops", type=float, help="matmul rate (default: --device's)")
    p.add_argument("--hbm-tbs", type=float, help="HBM copy bandwidth, TB/s (default: --device's)")
    p.add_argument("--l2-mb", type=float, help="L2 size, MB (default: --device's; 0 = no L2 credit)")
    p.add_argument("--fold-writes", action="store_true", help="the fold writes the transformed logits back")
    p.add_argument("--dw-accum-bytes", type=int, default=4, help="bytes per dW element accumulated per chunk")
    args = p.parse_args(argv)
    fig = dict(DEVICES[args.device])
    for key in fig:
        if getattr(args, key) is not None:
            fig[key] = getattr(args, key)
    engines = {"auto": [True], "recompute": [False], "both": [True, False]}[args.path]
    for engine in engines:
        pred = predict_step(
            [args.pair_tokens] * args.pairs,
            args.hidden,
            args.vocab,
            dtype=args.dtype,
            trained_head=not args.frozen,
            engine=engine,
            device_type=args.device_type,
            workspace_bytes=args.workspace_bytes,
            chunk=args.chunk,
            fold_writes=args.fold_writes,
            dw_accum_bytes=args.dw_accum_bytes,
            **fig,
        )
        i, plan = pred["inputs"], pred["plan"]
        how = (
            f"{i['path']}: C={i['chunk']} ({i['chunks']} chunks), "
            + ("stacked reference" if i["stacked"] else f"reference chunks of {i['ref_chunk']}")
            + f", workspace {plan['workspace_bytes'] / 2**20:.0f} MiB = {plan['budget_tokens']} tokens"
            if plan
            else "recompute (fused op)"
        )
        print(
            f"\n[{how}] {args.pairs} pairs x {args.pair_tokens} counted tokens (N_valid={i['n_valid']}) "
            f"H={i['hidden']} V={i['vocab']} {i['dtype']} {'trained' if i['trained_head'] else 'frozen'} head; "
            f"{i['matmul_tflops']:.0f} TFLOP/s, {i['hbm_tbs']:.2f} TB/s, L2 {i['l2_mb'] or 0:.0f} MB "
            f"(workspace in L2: {i['workspace_in_l2']})"
        )
        print(format_prediction(pred))
    return 0


if __name__ == "__main__":
    sys.exit(main())

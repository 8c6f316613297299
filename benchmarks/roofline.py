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
keeps the Z round trip between a GEMM and its epilogue on chip (those 4 N V terms leave HBM).

Recompute path (``path="recompute"``, the Triton op: logits never leave the chip): reference forward
2 N H V, policy forward 2 N H V, backward recomputing the logits then dH and dW 6 N H V, 10 N H V in
all; bytes with ideal L2 reuse of W across token blocks: ``s V H + s N H`` per forward, and
``s V H + 2 s N H + 4 V H`` for the backward (fp32 dW accumulation).

The floor is ``8 N H V / P`` (``6`` frozen): the GEMMs the step needs at the matmul rate, nothing else.

    python -m benchmarks.roofline                                 # N=5461 H=4096 V=128256, H200
    python -m benchmarks.roofline --matmul-tflops 700 --chunk 2048 --frozen
    python -m benchmarks.roofline --path recompute

Importable: :func:`predict` returns a dict (stages, totals, floor), used by ``bench_dpo_gpu``.
"""

from __future__ import annotations

import argparse
import math
import sys

# H200 figures: bf16 dense matmul rate as measured (not the datasheet's 989), copy bandwidth, L2.
H200_MATMUL_TFLOPS = 790.0
H200_HBM_TBS = 4.3
H200_L2_MB = 60.0
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


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
    l2_mb: float = H200_L2_MB,
    fold_writes: bool = False,
    dw_accum_bytes: int = 4,
) -> dict:
    """The model's stages and totals for one step (see the module docstring for the formulas).

    Returns ``{"stages": [{stage, flops, bytes, compute_ms, memory_ms, ms, bound}], "total_ms",
    "floor_ms", "flops", "bytes", "inputs": {...}}``.
    """
    if path not in ("engine", "recompute"):
        raise ValueError(f"path must be 'engine' or 'recompute', got {path!r}")
    N, H, V, s = int(n_valid), int(hidden), int(vocab), DTYPE_BYTES[dtype]
    C = max(1, min(int(chunk), N))
    k = math.ceil(N / C) if N else 0
    gemm = 2.0 * N * H * V
    stages = []
    add = stages.append
    if path == "engine":
        in_l2 = 4.0 * C * V <= l2_mb * 1e6
        z_hbm = 0.0 if in_l2 else 4.0 * N * V  # one pass of the fp32 workspace through HBM
        fwd_bytes = k * s * V * H + s * N * H + z_hbm
        add(_stage("ref forward GEMM", gemm, fwd_bytes, matmul_tflops, hbm_tbs))
        add(_stage("ref fold", 5.0 * N * V, z_hbm, matmul_tflops, hbm_tbs))
        add(_stage("policy forward GEMM", gemm, fwd_bytes, matmul_tflops, hbm_tbs))
        add(_stage("fold epilogue", 5.0 * N * V, z_hbm * (2 if fold_writes else 1), matmul_tflops, hbm_tbs))
        add(_stage("dZ epilogue", 4.0 * N * V, z_hbm + s * N * V, matmul_tflops, hbm_tbs))
        add(_stage("dH GEMM", gemm, s * N * V + k * s * V * H + s * N * H, matmul_tflops, hbm_tbs))
        if trained_head:
            dw_bytes = s * N * V + s * N * H + k * 2 * dw_accum_bytes * V * H
            add(_stage("dW GEMM", gemm, dw_bytes, matmul_tflops, hbm_tbs))
    else:
        fwd_bytes = s * V * H + s * N * H
        add(_stage("ref forward (fused)", gemm, fwd_bytes, matmul_tflops, hbm_tbs))
        add(_stage("policy forward (fused)", gemm, fwd_bytes, matmul_tflops, hbm_tbs))
        bwd_flops = 3 * gemm if trained_head else 2 * gemm
        bwd_bytes = s * V * H + 2 * s * N * H + (4 * V * H if trained_head else 0)
        add(
            _stage(
                "backward: recompute + dH" + (" + dW" if trained_head else ""),
                bwd_flops,
                bwd_bytes,
                matmul_tflops,
                hbm_tbs,
            )
        )
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
            "dtype": dtype,
            "trained_head": trained_head,
            "path": path,
            "matmul_tflops": matmul_tflops,
            "hbm_tbs": hbm_tbs,
            "l2_mb": l2_mb,
            "fold_writes": fold_writes,
            "dw_accum_bytes": dw_accum_bytes,
            "workspace_in_l2": path == "engine" and 4.0 * C * V <= l2_mb * 1e6,
        },
    }


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
    p.add_argument(
        "--n-valid", "-N", type=int, default=5461, help="counted tokens (default 5461: 8192 with a third prompt)"
    )
    p.add_argument("--hidden", "-H", type=int, default=4096)
    p.add_argument("--vocab", "-V", type=int, default=128256)
    p.add_argument("--chunk", "-C", type=int, default=1024, help="engine chunk: tokens per workspace")
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bf16")
    p.add_argument("--frozen", action="store_true", help="frozen head: no dW GEMM")
    p.add_argument("--path", choices=["engine", "recompute", "both"], default="both")
    p.add_argument("--matmul-tflops", type=float, default=H200_MATMUL_TFLOPS, help="matmul rate (H200 measured: 790)")
    p.add_argument("--hbm-tbs", type=float, default=H200_HBM_TBS, help="HBM bandwidth, TB/s (H200 copy: 4.3)")
    p.add_argument("--l2-mb", type=float, default=H200_L2_MB, help="L2 size, MB (H200: 60)")
    p.add_argument("--fold-writes", action="store_true", help="the fold writes the transformed logits back")
    p.add_argument("--dw-accum-bytes", type=int, default=4, help="bytes per dW element accumulated per chunk")
    args = p.parse_args(argv)
    paths = ["engine", "recompute"] if args.path == "both" else [args.path]
    for path in paths:
        pred = predict(
            args.n_valid,
            args.hidden,
            args.vocab,
            chunk=args.chunk,
            dtype=args.dtype,
            trained_head=not args.frozen,
            path=path,
            matmul_tflops=args.matmul_tflops,
            hbm_tbs=args.hbm_tbs,
            l2_mb=args.l2_mb,
            fold_writes=args.fold_writes,
            dw_accum_bytes=args.dw_accum_bytes,
        )
        i = pred["inputs"]
        print(
            f"\n[{path}] N_valid={i['n_valid']} H={i['hidden']} V={i['vocab']} C={i['chunk']} ({i['chunks']} chunks) "
            f"{i['dtype']} {'trained' if i['trained_head'] else 'frozen'} head; {i['matmul_tflops']:.0f} TFLOP/s, "
            f"{i['hbm_tbs']:.2f} TB/s, L2 {i['l2_mb']:.0f} MB (workspace in L2: {i['workspace_in_l2']})"
        )
        print(format_prediction(pred))
    return 0


if __name__ == "__main__":
    sys.exit(main())

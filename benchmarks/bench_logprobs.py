"""Forward+backward time and peak memory of per-token log-probs of ``hidden @ weight.T``.

Compares every ``expo_kernels.linear_logprobs`` backend available for the device (``expo-native``:
the C++ CPU backend of ``csrc/``, ``expo-torch``, ``expo-triton`` on CUDA) with

* ``naive`` — what Hugging Face models do: ``logits = F.linear(hidden, weight).float()``
  (``[tokens, vocab]`` in fp32), ``log_softmax``, ``gather``;
* ``trl``  — TRL's fused head ``trl.kernels.chunked_logprob.ChunkedLogProbFunction`` with the
  vocab chunk size TRL's trainers use, on the valid tokens only (compacted first, as
  ``trl.trainer.utils.add_fused_lm_head`` does on GPUs);
* ``cce``  — Cut Cross-Entropy's ``linear_cross_entropy(..., reduction="none")``
  (``impl="cce"`` on CUDA, ``impl="torch_compile"`` elsewhere); ``logp = -nll``.

The loss is ``(logp * g).sum()`` with fixed random per-token weights ``g``, so gradients flow to
``hidden`` and ``weight``. Each implementation runs in a fresh subprocess so that the peak memory
is its own: peak RSS (``ru_maxrss``) on CPU, ``torch.cuda.max_memory_allocated`` minus the inputs
on CUDA. A separate reference process computes exact fp32 log-probs (token-chunked, no grad) and
random projections of the exact gradients, against which every implementation is checked.

    python -m benchmarks.bench_logprobs                    # --quick: small shape, < 1 min on CPU
    python -m benchmarks.bench_logprobs --preset cpu --vocab 32000
    python -m benchmarks.bench_logprobs --preset gpu
    python -m benchmarks.bench_logprobs --tokens 2048 --hidden 512 --vocab 32000 --impls naive expo-torch

The parent process never imports torch: on Linux a child's ``ru_maxrss`` starts at the RSS of
the process that spawned it, so a heavy parent would inflate every child's number. The inputs and
the implementations are ``benchmarks._workloads``'; process spawning, memory readings, the
environment record, the JSON file and the table are ``benchmarks._harness``'.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/bench_logprobs.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _harness as hn  # noqa: E402  (neither imports torch at module level)
from benchmarks._workloads import (  # noqa: E402
    IGNORE_INDEX,
    PER_TOKEN_IMPLS,
    build_impl,
    grad_probe,
    make_inputs,
    trl_chunk_size,
)

REPO_ROOT = hn.REPO_ROOT
RESULTS_DIR = hn.RESULTS_DIR

ALL_IMPLS = PER_TOKEN_IMPLS
PRESETS = {
    # name: (tokens, hidden, vocab, dtype) — each a list; shapes are their product
    "quick": ([512], [256], [8192], "fp32"),
    "cpu": ([4096], [1024], [32000, 128256], "fp32"),
    "gpu": ([8192, 32768], [4096], [128256], "bf16"),
}
DEFAULT_REPEATS = {"quick": 5, "cpu": 3, "gpu": 10}
DTYPES = ("fp32", "bf16", "fp16")


# ----------------------------------------------------------------------------------------------
# Pieces that run inside a worker (torch imported lazily, so the parent stays light); the inputs
# and the implementations are benchmarks._workloads'
# ----------------------------------------------------------------------------------------------


def impl_detail(name: str, device_type: str) -> str:
    if name == "trl":
        try:
            return f"ChunkedLogProbFunction, chunk_size={trl_chunk_size()}, valid tokens only"
        except Exception:  # pragma: no cover
            return "ChunkedLogProbFunction"
    if name == "cce":
        return "impl=" + ("cce (filter_eps='high', the default)" if device_type == "cuda" else "torch_compile")
    if name == "naive":
        return "F.linear(h, W).float() -> log_softmax -> gather"
    if name.endswith("-recompute"):
        return f"expo_kernels.linear_logprobs(backend={name[5:-10]!r}) under kernel_options(engine=False)"
    if name.startswith("expo-"):
        return f"expo_kernels.linear_logprobs(backend={name[5:]!r})"
    return ""


def make_step(fn, hidden, weight, labels, g):
    """One forward+backward of ``loss = (logp * g).sum()``; returns the detached logp."""

    def step():
        hidden.grad = None
        weight.grad = None
        logp = fn(hidden, weight, labels)
        (logp * g).sum().backward()
        return logp.detach()

    return step


def reference(hidden, weight, labels, g, block_tokens=None):
    """Exact fp32 ``logp [N]`` and the gradient projections ``dH @ r [N]``, ``dW @ r [V]``.

    Token-chunked, no autograd: ``dz = g (onehot - softmax)``, ``dH @ r = dz @ (W r)``,
    ``dW @ r = dz^T (H r)``.
    """
    import torch

    with torch.no_grad():
        device = hidden.device
        N, H = hidden.shape
        V = weight.shape[0]
        w = weight.detach().float()
        r = grad_probe(H, device)
        wr = w @ r
        logp = torch.zeros(N, dtype=torch.float32, device=device)
        dh_r = torch.zeros(N, dtype=torch.float32, device=device)
        dw_r = torch.zeros(V, dtype=torch.float32, device=device)
        if block_tokens is None:
            budget = (2 << 30) if device.type == "cuda" else (256 << 20)
            block_tokens = max(1, min(N, budget // (4 * V)))
        for s in range(0, N, block_tokens):
            e = min(s + block_tokens, N)
            h = hidden[s:e].detach().float()
            lab = labels[s:e]
            valid = lab != IGNORE_INDEX
            z = h @ w.T
            lse = torch.logsumexp(z, -1)
            tgt = lab.clamp(min=0)
            lp = z.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) - lse
            logp[s:e] = torch.where(valid, lp, torch.zeros_like(lp))
            gv = torch.where(valid, g[s:e].float(), torch.zeros_like(lp))
            dz = (z - lse.unsqueeze(-1)).exp_().mul_(-gv.unsqueeze(-1))
            dz.scatter_add_(-1, tgt.unsqueeze(-1), gv.unsqueeze(-1))
            dh_r[s:e] = dz @ wr
            dw_r += dz.T @ (h @ r)
            del z, dz
        return logp, dh_r, dw_r


# ----------------------------------------------------------------------------------------------
# Worker process
# ----------------------------------------------------------------------------------------------


def _save(arr_dir: Path, tag: str, **tensors):
    import numpy as np

    for key, t in tensors.items():
        np.save(arr_dir / f"{tag}_{key}.npy", t.detach().float().cpu().numpy())


def run_worker(spec: dict) -> dict:
    """Runs in a fresh process: builds one implementation, times it, measures peak memory."""
    rss_start = hn.maxrss_bytes()
    result = {"impl": spec["impl"], "status": "error"}
    try:
        import torch

        device = torch.device(spec["device"])
        arr_dir = Path(spec["arr_dir"])
        tag = spec["tag"]
        N, H, V, dtype = spec["tokens"], spec["hidden"], spec["vocab"], spec["dtype"]
        hidden, weight, labels, g = make_inputs(
            N, H, V, dtype, device, spec["ignore_frac"], spec["seed"], spec["logit_std"]
        )
        result["n_valid"] = int((labels != IGNORE_INDEX).sum())
        is_cuda = device.type == "cuda"

        def sync():
            if is_cuda:
                torch.cuda.synchronize(device)

        if spec["impl"] == "reference":
            if is_cuda:  # exact fp32 matmuls, whatever the environment asks for
                torch.backends.cuda.matmul.allow_tf32 = False
            logp, dh_r, dw_r = reference(hidden, weight, labels, g)
            _save(arr_dir, tag, logp=logp, dh_r=dh_r, dw_r=dw_r)
            result["status"] = "ok"
            return result

        fn = build_impl(spec["impl"], device)  # all imports happen here
        step = make_step(fn, hidden, weight, labels, g)
        sync()
        if is_cuda:
            inputs_bytes = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            result["inputs_bytes"] = inputs_bytes
        else:
            gc.collect()
            result["import_peak_rss_bytes"] = hn.maxrss_bytes()  # high-water mark of imports + inputs
            result["baseline_rss_bytes"] = hn.current_rss_bytes() or result["import_peak_rss_bytes"]
            # Reset the high-water mark so the peak below is that of the calls, not of the imports.
            result["peak_reset"] = hn.reset_peak_rss()
        result["rss_at_start_bytes"] = rss_start

        t0 = time.perf_counter()
        step()
        sync()
        result["first_s"] = time.perf_counter() - t0
        for _ in range(spec["warmup"]):
            step()
        sync()
        # Peak over the first call and warm-up (lazy imports, compilation, autotuning included) ...
        if is_cuda:
            result["first_peak_bytes"] = torch.cuda.max_memory_allocated(device) - inputs_bytes
        else:
            result["first_peak_rss_bytes"] = hn.maxrss_bytes()
        # ... and, separately, over the timed calls: the working memory of a training step.
        hidden.grad = None
        weight.grad = None
        gc.collect()
        if is_cuda:
            torch.cuda.reset_peak_memory_stats(device)
            before_timed = torch.cuda.memory_allocated(device)
        else:
            before_timed = hn.current_rss_bytes()
            steady_reset = hn.reset_peak_rss()
        times = []
        for _ in range(spec["repeats"]):
            if is_cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                torch.cuda.synchronize(device)
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
        sync()
        if is_cuda:
            steady = torch.cuda.max_memory_allocated(device)
            result["steady_peak_bytes"] = steady - inputs_bytes
            result["peak_bytes"] = max(result["first_peak_bytes"], result["steady_peak_bytes"])
            result["step_work_bytes"] = steady - before_timed
        else:
            steady = hn.maxrss_bytes()
            result["steady_peak_rss_bytes"] = steady if steady_reset else None
            result["peak_rss_bytes"] = max(result["first_peak_rss_bytes"], steady)
            if steady_reset and before_timed is not None:
                result["step_work_bytes"] = steady - before_timed
        result["times_s"] = times
        result["median_s"] = statistics.median(times) if times else result["first_s"]

        # Outputs of one more call, for the accuracy check (after the memory readings).
        logp = step()
        r = grad_probe(H, device)
        _save(arr_dir, tag, logp=logp.reshape(-1), dh_r=hidden.grad.float() @ r, dw_r=weight.grad.float() @ r)
        result["status"] = "ok"
    except BaseException as exc:  # noqa: BLE001 — any failure becomes an error row
        hn.error_fields(result, exc)
    return result


# ----------------------------------------------------------------------------------------------
# Parent process (no torch import)
# ----------------------------------------------------------------------------------------------


def _spawn(spec: dict, timeout: float) -> dict:
    return hn.spawn_worker("benchmarks.bench_logprobs", spec, timeout, spec["arr_dir"])


def default_impls(info: dict) -> list:
    return hn.expo_impls(info) + ["naive", "trl", "cce"]


def _compare(arr_dir: Path, tag: str, ref_tag: str) -> dict:
    import numpy as np

    out = {}
    try:
        lp = np.load(arr_dir / f"{tag}_logp.npy").astype(np.float64)
        ref = np.load(arr_dir / f"{ref_tag}_logp.npy").astype(np.float64)
        out["max_abs_dlogp"] = float(np.max(np.abs(lp - ref))) if lp.size else 0.0
        ignored_nonzero = int(np.count_nonzero(lp[ref == 0.0]))  # ref is exactly 0 only where ignored
        out["ignored_nonzero"] = ignored_nonzero
        errs = []
        for key in ("dh_r", "dw_r"):
            a = np.load(arr_dir / f"{tag}_{key}.npy").astype(np.float64)
            b = np.load(arr_dir / f"{ref_tag}_{key}.npy").astype(np.float64)
            scale = max(float(np.max(np.abs(b))), 1e-30)
            out[f"rel_err_{key}"] = float(np.max(np.abs(a - b))) / scale
            errs.append(out[f"rel_err_{key}"])
        out["grad_rel_err"] = max(errs)
    except Exception as exc:
        out["compare_error"] = f"{type(exc).__name__}: {exc}"
    return out


def format_table(rows: list, device_type: str) -> str:
    mem_cols = (
        ["peak GiB", "steady GiB", "inputs GiB"]
        if device_type == "cuda"
        else ["peak RSS GiB", "base RSS GiB", "steady RSS GiB", "step GiB"]
    )
    head = (
        ["impl", "shape N×H×V", "dtype", "fwd+bwd s", "first s", "TFLOP/s"] + mem_cols + ["max|Δlogp|", "grad rel err"]
    )
    lines = []
    for r in rows:
        shape = f"{r['tokens']}×{r['hidden']}×{r['vocab']}"
        if r["status"] != "ok":
            lines.append([r["impl"], shape, r["dtype"], hn.error_message(r, 110)])
            continue
        if device_type == "cuda":
            mem = [hn.gib(r.get("peak_bytes")), hn.gib(r.get("steady_peak_bytes")), hn.gib(r.get("inputs_bytes"))]
        else:
            star = "*" if r.get("peak_reset") is False else ""
            mem = [
                hn.gib(r.get("peak_rss_bytes")) + star,
                hn.gib(r.get("baseline_rss_bytes")),
                hn.gib(r.get("steady_peak_rss_bytes")),
                hn.gib(r.get("step_work_bytes")),
            ]
        tf = r.get("tflops")
        dlogp = hn.fmt_e(r.get("max_abs_dlogp"))
        if r.get("ignored_nonzero"):
            dlogp += f" ({r['ignored_nonzero']} ignored≠0)"
        lines.append(
            [
                r["impl"],
                shape,
                r["dtype"],
                hn.fmt_s(r.get("median_s")),
                hn.fmt_s(r.get("first_s")),
                f"{tf:.3g}" if isinstance(tf, float) else "-",
            ]
            + mem
            + [dlogp, hn.fmt_e(r.get("grad_rel_err"))]
        )
    return hn.render_table(head, lines)


MEMORY_NOTE = {
    "cuda": "peak = torch.cuda.max_memory_allocated over all calls minus the inputs (first call included; "
    "hidden.grad and weight.grad count); steady = the same over the timed calls only",
    "cpu": "one fresh process per implementation. base RSS = resident after imports + inputs; peak RSS = ru_maxrss "
    "over all calls (high-water mark reset after the inputs via /proc/self/clear_refs; * = reset not "
    "possible, imports included); steady RSS = ru_maxrss over the timed calls only; step = steady RSS minus "
    "the RSS just before them (one step's working memory, gradients included)",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_logprobs",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--quick", action="store_true", help="small shape N=512 H=256 V=8192 fp32 (default without shape flags)"
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="cpu: N=4096 H=1024 V=32000,128256 fp32; "
        "gpu: N=8192,32768 H=4096 V=128256 bf16. Shape flags override the preset's dimension.",
    )
    p.add_argument("--tokens", "-N", type=int, nargs="+", help="tokens per call (incl. ignored), one or more")
    p.add_argument("--hidden", "-H", type=int, nargs="+", help="hidden size, one or more")
    p.add_argument("--vocab", "-V", type=int, nargs="+", help="vocab size, one or more")
    p.add_argument("--dtype", choices=DTYPES, help="input dtype (default fp32; bf16 for --preset gpu)")
    p.add_argument("--ignore-frac", type=float, default=0.33, help="fraction of tokens labelled -100 (default 0.33)")
    p.add_argument(
        "--repeats", type=int, help="timed calls after warm-up; the median is reported (default 5; cpu 3; gpu 10)"
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed calls after the (separately timed) first call")
    p.add_argument(
        "--impls",
        nargs="+",
        help=f"subset of {', '.join(ALL_IMPLS)} ('expo' = every expo backend "
        "of the device); default: all, triton only on CUDA",
    )
    p.add_argument("--device", help="cpu or cuda[:i] (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--logit-std", type=float, default=2.0, help="std of the random logits (default 2.0)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per implementation and shape")
    p.add_argument("--no-check", action="store_true", help="skip the fp32 reference and the accuracy columns")
    p.add_argument(
        "--json", help="where to write the results (default benchmarks/results/bench_logprobs_<device>.json)"
    )
    hn.add_worker_args(p)
    args = p.parse_args(argv)
    if args.quick and args.preset:
        p.error("--quick and --preset are exclusive")
    if not 0.0 <= args.ignore_frac < 1.0:
        p.error("--ignore-frac must be in [0, 1)")
    return args


def main(argv=None):
    args = parse_args(argv)
    if hn.worker_main(args, run_worker):
        return 0

    preset = args.preset or ("quick" if args.quick or not (args.tokens or args.hidden or args.vocab) else None)
    base = PRESETS[preset] if preset else PRESETS["quick"]
    tokens = args.tokens or base[0]
    hiddens = args.hidden or base[1]
    vocabs = args.vocab or base[2]
    dtype = args.dtype or (base[3] if preset else "fp32")
    repeats = args.repeats if args.repeats is not None else DEFAULT_REPEATS.get(preset, 5)

    info = hn.probe(args.device)
    device_type = info["device_type"]
    if args.impls:
        impls = []
        for name in args.impls:
            if name == "expo":
                impls += [i for i in default_impls(info) if i.startswith("expo-")]
            elif name in ALL_IMPLS:
                impls.append(name)
            else:
                raise SystemExit(f"unknown implementation {name!r}; choose from {ALL_IMPLS} or 'expo'")
    else:
        impls = default_impls(info)
    impls = list(dict.fromkeys(impls))

    print(
        f"device: {info['device']} ({info['device_name']}), torch {info['versions']['torch']}, "
        f"{info['torch_threads']} threads",
        flush=True,
    )
    if "expo_error" in info:
        print(f"expo_kernels does not import: {info['expo_error']}", flush=True)
    print(
        f"impls: {', '.join(impls)}; preset={preset}, dtype={dtype}, ignore_frac={args.ignore_frac}, "
        f"warmup={args.warmup}, repeats={repeats}",
        flush=True,
    )

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_logprobs_") as tmp:
        arr_dir = Path(tmp)
        for si, (N, H, V) in enumerate(itertools.product(tokens, hiddens, vocabs)):
            common = dict(
                device=info["device"],
                tokens=N,
                hidden=H,
                vocab=V,
                dtype=dtype,
                ignore_frac=args.ignore_frac,
                seed=args.seed,
                logit_std=args.logit_std,
                warmup=args.warmup,
                repeats=repeats,
                arr_dir=str(arr_dir),
            )
            ref_tag = f"s{si}_reference"
            ref_ok = False
            if not args.no_check:
                t0 = time.perf_counter()
                ref = _spawn(dict(common, impl="reference", tag=ref_tag), args.timeout)
                ref_ok = ref["status"] == "ok"
                msg = "ok" if ref_ok else ref.get("error")
                print(
                    f"[{N}x{H}x{V} {dtype}] reference (fp32, chunked): {msg} ({time.perf_counter() - t0:.1f} s)",
                    flush=True,
                )
            for impl in impls:
                tag = f"s{si}_{impl}"
                t0 = time.perf_counter()
                res = _spawn(dict(common, impl=impl, tag=tag), args.timeout)
                row = {
                    "impl": impl,
                    "detail": impl_detail(impl, device_type),
                    "tokens": N,
                    "hidden": H,
                    "vocab": V,
                    "dtype": dtype,
                    "ignore_frac": args.ignore_frac,
                }
                row.update(res)
                row["impl"] = impl
                if row["status"] == "ok":
                    flops = 8.0 * row["n_valid"] * H * V  # forward 2NHV + backward 6NHV, valid tokens
                    row["useful_flop"] = flops
                    row["tflops"] = flops / row["median_s"] / 1e12 if row.get("median_s") else None
                    if ref_ok:
                        row.update(_compare(arr_dir, tag, ref_tag))
                rows.append(row)
                status = "ok" if row["status"] == "ok" else "ERROR " + row.get("error", "?").splitlines()[0][:200]
                print(f"[{N}x{H}x{V} {dtype}] {impl}: {status} ({time.perf_counter() - t0:.1f} s)", flush=True)

    print()
    print(format_table(rows, device_type))
    print()
    print(MEMORY_NOTE["cuda" if device_type == "cuda" else "cpu"])
    print(
        "TFLOP/s counts 8·N_valid·H·V useful FLOPs; max|Δlogp| and grad rel err (max |Δ(dW·r)|, |Δ(dH·r)| relative "
        "to max |ref|, r a random vector) are against an exact fp32 reference on the same inputs"
    )

    out_path = Path(args.json) if args.json else RESULTS_DIR / f"bench_logprobs_{device_type}.json"
    payload = {
        **hn.result_header(
            "bench_logprobs",
            "benchmarks.bench_logprobs",
            argv,
            info,
            ("device", "device_type", "device_name", "cuda", "cpu_count", "torch_threads"),
        ),
        "settings": {
            "preset": preset,
            "tokens": tokens,
            "hidden": hiddens,
            "vocab": vocabs,
            "dtype": dtype,
            "ignore_frac": args.ignore_frac,
            "warmup": args.warmup,
            "repeats": repeats,
            "seed": args.seed,
            "logit_std": args.logit_std,
            "impls": impls,
            "ignore_index": IGNORE_INDEX,
            "loss": "(logp * g).sum(), g ~ N(0, 1) per token",
            "memory": MEMORY_NOTE["cuda" if device_type == "cuda" else "cpu"],
        },
        "results": rows,
    }
    hn.write_json(out_path, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())

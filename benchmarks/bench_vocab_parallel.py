"""Vocab-parallel fused log-probs on simulated ranks: communication volume and time per step.

Spawns ``world`` processes on this machine (gloo on 127.0.0.1 through a file store), shards the LM
head along the vocabulary (``torch.chunk``), and runs ``expo_kernels.distributed.
vocab_parallel_linear_logprobs`` forward + backward (loss ``(logp * g).sum()``, gradients to the
replicated hidden states and the weight shards). Every collective the op issues is counted
(``expo_kernels.distributed.count_communication``: bytes of each rank's input to every
all-reduce / all-gather). The alternative that materializes logits would all-gather the logit shards,
``N x V x 4`` bytes in float32 on every rank, before its own backward traffic; that number is reported
next to ours. ``world = 1`` is the single-process op for reference.

With several ranks on one 2-core CPU, the ranks share the cores: the times show the overhead of the
combine step, not a speed-up (on a real tensor-parallel group each rank has its own device).

    python -m benchmarks.bench_vocab_parallel                      # N=1024, H=256, V=8192, worlds 1 2 4
    python -m benchmarks.bench_vocab_parallel --tokens 4096 --hidden 1024 --vocab 32000 --worlds 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/bench_vocab_parallel.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402  (ranks are mp.spawn children; this parent's memory is not measured)
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from benchmarks import _harness as hn  # noqa: E402

RESULTS = hn.RESULTS_DIR / "bench_vocab_parallel_cpu.json"


def _inputs(n, h, v, seed=0):
    """Its own inputs, not ``_workloads.make_inputs``: each token ignored with probability 1/3 (the
    published byte counts, e.g. 697 valid of 1024, are of these)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * (2 / h**0.5)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 1 / 3] = -100  # a third ignored, as in the core benchmark
    grad = torch.randn(n, generator=g)
    return hidden, weight, labels, grad


def _rank(rank, world, init_file, out_file, args):
    import expo_kernels as ek
    from expo_kernels import distributed as ekd

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    hidden, weight, labels, grad = _inputs(args.tokens, args.hidden, args.vocab)
    shard = torch.chunk(weight, world, dim=0)[rank].clone() if world > 1 else weight

    def step(stats, counts=None):
        h = hidden.clone().requires_grad_()
        w = shard.clone().requires_grad_()
        with ekd.count_communication() as fwd:
            if world > 1:
                out = ekd.vocab_parallel_linear_logprobs(h, w, labels, return_stats=stats, backend=args.backend)
            else:
                out = ek.linear_logprobs(h, w, labels, return_stats=stats, backend=args.backend)
        logp = out[0] if stats else out
        with ekd.count_communication() as bwd:
            (logp * grad).sum().backward()
        if counts is not None:
            for k in fwd:
                counts[k] = fwd[k] + bwd[k]
            counts["forward_all_reduce_bytes"] = fwd["all_reduce_bytes"]
            counts["backward_all_reduce_bytes"] = bwd["all_reduce_bytes"]
        return h.grad, w.grad

    def timed(stats):
        times = []
        for i in range(args.repeats + 1):  # the first is a warm-up
            if world > 1:
                dist.barrier()
            t0 = time.perf_counter()
            step(stats)
            dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            if world > 1:
                dist.all_reduce(dt, op=dist.ReduceOp.MAX)  # a step ends when the slowest rank is done
            if i:
                times.append(float(dt))
        return statistics.median(times)

    result = {"world": world, "shard_rows": shard.shape[0]}
    for stats in (False, True):
        key = "with_stats" if stats else "logp_only"
        counts = {}
        if world > 1:
            step(stats, counts)
        result[key] = {"step_s_median": timed(stats), **counts}
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(result, f)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def _run_world(world, args):
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "result.json")
        mp.spawn(_rank, args=(world, os.path.join(d, "init"), out, args), nprocs=world, join=True)
        with open(out) as f:
            return json.load(f)


def _env():
    from expo_kernels._dispatch import resolve_backend

    info = hn.environment("cpu")  # in-process: this parent has torch already
    return {
        "device": {"type": "cpu", "name": info["device_name"], "cores": info["cpu_count"]},
        "versions": info["versions"],
        "backend": resolve_backend(None, torch.device("cpu")),
        "git_commit": hn.git_commit(),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backend", default=None, help="expo_kernels backend (default: the device's)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    env = _env()
    if args.backend is None:
        args.backend = env["backend"]
    n_valid = int((_inputs(args.tokens, args.hidden, args.vocab)[2] != -100).sum())
    rows = []
    for world in args.worlds:
        r = _run_world(world, args)
        # the logit-gathering alternative: every rank all-gathers the [N, V] float32 logits (its shard
        # is N x V/world of them); only the valid tokens, as our op compacts them too.
        r["gather_logits_bytes"] = n_valid * args.vocab * 4
        if world > 1:
            # forward traffic: gathered logits vs our O(N) combine (the d_hidden all-reduce of the
            # backward, N_valid x H floats, is the same for both: every tensor-parallel head needs it)
            r["ratio_gather_logits_over_ours_forward"] = (
                r["gather_logits_bytes"] / r["logp_only"]["forward_all_reduce_bytes"]
            )
        rows.append(r)
        lo, ws = r["logp_only"], r["with_stats"]
        comm = (
            f"all-reduce fwd {lo['forward_all_reduce_bytes'] / 2**10:.1f} KiB (with stats "
            f"{ws['forward_all_reduce_bytes'] / 2**10:.1f} KiB), bwd {lo['backward_all_reduce_bytes'] / 2**10:.1f} KiB "
            f"(d_hidden), {lo['all_reduce_calls']} calls; gathering the logits instead: "
            f"{r['gather_logits_bytes'] / 2**20:.1f} MiB"
            if world > 1
            else "no communication"
        )
        print(
            f"world {world}: step {lo['step_s_median'] * 1e3:.1f} ms (with stats {ws['step_s_median'] * 1e3:.1f} ms); "
            f"{comm}",
            flush=True,
        )
    report = {
        "benchmark": "bench_vocab_parallel",
        "timestamp": hn.utc_timestamp(),
        "command": hn.command_line("benchmarks.bench_vocab_parallel", argv),
        "host": platform.node(),
        **env,
        "backend": args.backend,
        # other jobs share this machine's cores at times: the load average tells how quiet it was
        "load_average_1_5_15min": list(os.getloadavg()),
        "settings": {
            "tokens": args.tokens,
            "valid_tokens": n_valid,
            "hidden": args.hidden,
            "vocab": args.vocab,
            "dtype": "fp32",
            "repeats": args.repeats,
            "process_group": "gloo, one machine",
            "bytes": "each rank's input bytes to every collective of one forward+backward step",
        },
        "results": rows,
    }
    hn.write_json(args.out, report)


if __name__ == "__main__":
    main()

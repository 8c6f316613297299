"""DeepSpeed ZeRO-3 on two CPU ranks: memory per rank of one fused head call (gathered head vs partition).

Spawns ``world`` ranks (gloo on 127.0.0.1, DeepSpeed's CPU accelerator). Each builds a small LM
(embedding V x H, one H x H layer, LayerNorm, LM head V x H, untied) and a frozen reference copy
*inside* ``deepspeed.zero.Init``, so no rank ever holds a whole model, then runs DPO steps with
:class:`expo_kernels.FusedLinearPreferenceLoss` called on the partitioned heads (the policy head and
the reference head are gathered once each for the call, see ``expo_kernels.distributed.zero3``).

Reported per rank (rank 0's row; the ranks are symmetric):

* ``partition_bytes``: the rank's share of the policy model's parameters (``ds_tensor``), vs
  ``model_bytes`` (the unsharded model) and ``head_bytes`` (one gathered head, ``V * H * 4``);
* ``forward_peak_bytes`` / ``backward_peak_bytes``: the RSS high-water mark above the RSS just before
  the fused call / the backward (Linux ``clear_refs``; includes the gathered heads, the op's logit
  tiles or the engine's workspace, and in backward the full ``[V, H]`` weight gradient DeepSpeed
  reduce-scatters);
* ``kept_after_call_bytes``: RSS growth from before the call to after it (what the graph keeps for
  backward: no gathered head, see ``heads_gathered_after_call``);
* ``gathers_forward`` / ``gathers_backward``: ``GatheredParameters`` gathers per call.

Both paths of the module are measured: the engine (the default for float32 on the CPU: it computes
the gradients in the forward pass, so the ``[V, H]`` weight gradient is kept from the call to the
backward) and the op path (``kernel_options(engine=False)``: the graph keeps the hidden-sized
tensors only, and the head is re-gathered in backward).

RSS readings are approximate (the ranks run with ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed
tensors leave the RSS; small allocations and DeepSpeed's buffers still count); the byte counts of the
partition and of the heads are exact.

    python -m benchmarks.bench_zero3                               # V=32000, H=512, 2 pairs of 128 tokens
    python -m benchmarks.bench_zero3 --vocab 8192 --hidden 256 --steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/bench_zero3.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402  (ranks are spawned children; this parent's memory is not measured)
import torch.multiprocessing as mp  # noqa: E402

from benchmarks import _harness as hn  # noqa: E402

RESULTS = hn.RESULTS_DIR / "bench_zero3_cpu.json"


class TinyLM(torch.nn.Module):
    """Embedding -> Linear+tanh -> LayerNorm; the head is called by the fused loss, not here."""

    def __init__(self, vocab, dim):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.layer = torch.nn.Linear(dim, dim)
        self.norm = torch.nn.LayerNorm(dim)
        self.lm_head = torch.nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):
        return self.norm(torch.tanh(self.layer(self.embed(ids))))


def _peak_rss_bytes() -> int:
    """``VmHWM`` (the RSS high-water mark that ``clear_refs`` resets; ``ru_maxrss`` is not reset)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _ds_config():
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,
        # every parameter partitioned (by default those under 1e5 elements stay whole on every rank)
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    }


def _rank(rank, world, port, out_file, args):
    import importlib
    import logging

    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    import deepspeed

    import expo_kernels as ek

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # the CPU accelerator would JIT-build a shared-memory all-reduce (minutes); gloo suffices here
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")

    counts = {"n": 0}

    class Counting(deepspeed.zero.GatheredParameters):
        def __enter__(self):
            counts["n"] += int(self.enabled)
            return super().__enter__()

    deepspeed.zero.GatheredParameters = Counting  # expo_kernels.distributed.zero3 looks it up per call

    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=_ds_config()):
        model, ref_model = TinyLM(args.vocab, args.hidden), TinyLM(args.vocab, args.hidden)
    for p in ref_model.parameters():
        p.requires_grad_(False)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), config=_ds_config()
    )
    ref_engine, *_ = deepspeed.initialize(model=ref_model, config=_ds_config())
    loss_fn = ek.FusedLinearPreferenceLoss(args.loss, backend=args.backend)
    head, ref_head = model.lm_head.weight, ref_model.lm_head.weight
    elem = head.element_size()
    row = {
        "world": world,
        "partition_bytes": sum(p.ds_tensor.numel() * elem for p in model.parameters()),
        "model_bytes": sum(p.ds_numel * elem for p in model.parameters()),
        "head_bytes": head.ds_numel * elem,
        "head_partition_bytes": head.ds_tensor.numel() * elem,
        "tokens": 2 * args.pairs * args.seq,
    }
    for engine_on in (True, False):
        with ek.kernel_options(engine=engine_on):
            steps = _steps(args, rank, engine, ref_engine, loss_fn, head, ref_head, counts)
        # the first step allocates DeepSpeed's buffers: report the last
        row["engine" if engine_on else "op"] = {**steps[-1], "all_steps": steps}
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(row, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _steps(args, rank, engine, ref_engine, loss_fn, head, ref_head, counts):
    g = torch.Generator().manual_seed(rank)
    steps = []
    for _ in range(args.steps):
        ids = torch.randint(0, args.vocab, (2 * args.pairs, args.seq + 1), generator=g)
        labels = ids[:, 1:].clone()
        labels[:, : args.seq // 4] = -100  # the prompt
        ids = ids[:, :-1]
        with torch.no_grad():
            ref_hidden = ref_engine(ids)
        hidden = engine(ids)
        counts["n"] = 0
        hn.reset_peak_rss()
        base = hn.current_rss_bytes()
        out = loss_fn(head, hidden, labels, ref_hidden=ref_hidden, ref_weight=ref_head)
        step = {"forward_peak_bytes": _peak_rss_bytes() - base, "kept_after_call_bytes": hn.current_rss_bytes() - base}
        step["gathers_forward"] = counts["n"]
        step["heads_gathered_after_call"] = int(head.data.numel() > 0) + int(ref_head.data.numel() > 0)
        counts["n"] = 0
        hn.reset_peak_rss()
        base = hn.current_rss_bytes()
        engine.backward(out.loss)
        step["backward_peak_bytes"] = _peak_rss_bytes() - base
        step["gathers_backward"] = counts["n"]
        engine.step()
        steps.append(step)
    return steps


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--pairs", type=int, default=2, help="pairs per rank")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--loss", default="sigmoid")
    p.add_argument("--backend", default="torch", help="expo_kernels backend (torch: no native build needed)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    # glibc: tensors over 64 KiB get their own mapping, returned to the OS when freed, so the RSS
    # tracks live tensors instead of the allocator's cache (read by the spawned ranks at start-up)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "rank0.json")
        mp.spawn(_rank, args=(args.world, _free_port(), out, args), nprocs=args.world, join=True)
        with open(out) as f:
            row = json.load(f)
    info = hn.environment("cpu")
    report = hn.result_header(
        "bench_zero3", "benchmarks.bench_zero3", argv, info, ("device", "device_name", "cpu_count")
    )
    report["config"] = vars(args) | {"out": None}
    report["rank0"] = row
    mib = 2.0**20
    lines = [[k, f"{row[k] / mib:.1f} MiB", ""] for k in ("model_bytes", "partition_bytes", "head_bytes")]
    lines += [
        [k, f"{row['engine'][k] / mib:.1f} MiB", f"{row['op'][k] / mib:.1f} MiB"]
        for k in ("forward_peak_bytes", "kept_after_call_bytes", "backward_peak_bytes")
    ]
    lines += [
        [k, str(row["engine"][k]), str(row["op"][k])]
        for k in ("gathers_forward", "gathers_backward", "heads_gathered_after_call")
    ]
    print(hn.render_table([f"rank 0 (of {args.world})", "engine", "op (engine off)"], lines))
    hn.write_json(args.out, report)


if __name__ == "__main__":
    main()

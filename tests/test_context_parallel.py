"""Context parallelism (``sequence_group=``; expo_kernels.distributed.context_parallel), on CPU with gloo.

One process group per world size (2 and 4), spawned once per module as in tests/test_distributed.py:
every case runs inside the spawned ranks. Each rank holds a contiguous, uneven slice of every sequence
(hidden states and labels split along T; some ranks hold only prompt or padding of some rows, i.e. no
counted token of them) and compares with the module on the whole sequences in one process: the loss,
every metric, the per-sequence log-probs, its own slice of d_hidden, and the SUM over the ranks of
d_weight / d_bias (what the caller all-reduces) against the single-process gradient. Tolerances:
float32 1e-6, float64 1e-12 (relative to max(1, max |reference|)).

Cases: DPO through the pair engine (separate reference head; shared head, whose reference rows join the
policy's GEMMs; several chunks of whole pairs; pairs longer than the workspace), DPO on the op's path
(``kernel_options(engine=False)``), RPO (the chosen NLL: a token mean over the whole batch), SimPO (the
global token counts), KTO (unpaired, with its mismatched KL rows), and shards that do not line up
(different batch sizes, labels that do not match the hidden states): the same ValueError on every rank.
"""

import datetime
import functools
import os
import tempfile
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import run_rank_jobs

import expo_kernels as ek
from expo_kernels import _dispatch

WORLD_SIZES = (2, 4)
TOL = {"fp32": 1e-6, "fp64": 1e-12}
DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
B, T, H, V = 3, 16, 12, 37
# uneven contiguous splits of T = 16 along the sequence
SPLITS = {2: [7, 9], 4: [3, 5, 4, 4]}

CASES = [
    f"{name}-{dt}"
    for name in ("dpo-engine", "dpo-shared-head", "dpo-chunks", "dpo-long-pairs", "dpo-op", "rpo", "simpo", "kto")
    for dt in ("fp32", "fp64")
]
ERROR_CASES = ["err-batch-size", "err-label-shape"]


def _err(a, b):
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape:
        return float("inf")
    if b.numel() == 0:
        return 0.0
    return float((a - b).abs().max() / max(1.0, float(b.abs().max())))


def _data(dtype, rows, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, T, H, generator=g, dtype=torch.float64).to(dtype)
    ref_hidden = torch.randn(rows, T, H, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) * 2 / H**0.5).to(dtype)
    ref_weight = (torch.randn(V, H, generator=g, dtype=torch.float64) * 2 / H**0.5).to(dtype)
    bias = (torch.randn(V, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    labels = torch.randint(0, V, (rows, T), generator=g)
    # a prompt (ignored) of 2..7 tokens, then a completion, then padding: the first rank(s) hold no
    # counted token of some rows
    for r in range(rows):
        start = int(torch.randint(2, 8, (1,), generator=g))
        end = int(torch.randint(start + 1, T + 1, (1,), generator=g))
        labels[r, :start] = -100
        labels[r, end:] = -100
    return hidden, ref_hidden, weight, ref_weight, bias, labels


def _slice(x, rank, world, dim=1):
    return torch.split(x, SPLITS[world], dim=dim)[rank]


def _compare(res, name, got, want, tol):
    res[name] = (_err(got, want), tol)


def _run_case(case, rank, world, group):
    name, dt = case.rsplit("-", 1)
    dtype, tol = DTYPES[dt], TOL[dt]
    paired = name != "kto"
    rows = 2 * B  # KTO: 6 unpaired rows
    hidden, ref_hidden, weight, ref_weight, bias, labels = _data(dtype, rows, seed=zlib.crc32(case.encode()))
    res = {}
    if name == "kto":
        ctor = dict(loss="kto", beta=0.2)
    elif name == "simpo":
        ctor = dict(loss="simpo", beta=2.0, gamma=0.3)
    elif name == "rpo":
        ctor = dict(loss=["sigmoid", "sft"], loss_weights=[1.0, 0.7], beta=0.1)  # RPO: DPO + the chosen NLL
    else:
        ctor = dict(loss="sigmoid", beta=0.1)
    reference_free = name == "simpo"
    shared = name == "dpo-shared-head"
    g = torch.Generator().manual_seed(7)
    extra_full, extra_part = {}, {}
    if name == "kto":
        is_desirable = torch.tensor([True, False, True, True, False, False])
        kl_hidden = torch.randn(rows, T, H, generator=g, dtype=torch.float64).to(dtype)
        ref_kl_hidden = torch.randn(rows, T, H, generator=g, dtype=torch.float64).to(dtype)
        kl_labels = labels.roll(1, dims=0)
        extra_full = dict(
            is_desirable=is_desirable, kl_hidden=kl_hidden, kl_labels=kl_labels, ref_kl_hidden=ref_kl_hidden
        )
        extra_part = dict(
            is_desirable=is_desirable,
            kl_hidden=_slice(kl_hidden, rank, world),
            kl_labels=_slice(kl_labels, rank, world),
            ref_kl_hidden=_slice(ref_kl_hidden, rank, world),
        )

    def call(module, h, w, b, y, rh, extra):
        kw = dict(bias=b, **extra)
        if not reference_free:
            kw["ref_hidden"] = rh
            if not shared:
                kw["ref_weight"] = ref_weight
        return module(w, h, y, **kw)

    opts = {}
    if name == "dpo-op":
        opts = dict(engine=False)
    elif name == "dpo-long-pairs":
        opts = dict(path="long_pair_chunks")
    elif name == "dpo-chunks":
        # a workspace that holds the longest pair of any shard but not all pairs: several chunks of whole pairs
        per_token = _dispatch.logits_bytes_per_token(V, dtype, torch.device("cpu"), backward=True, stacked=False)
        counts = [int((_slice(labels, r, world) != -100)[[p, p + B]].sum()) for r in range(world) for p in range(B)]
        opts = dict(workspace_bytes=per_token * (max(counts) + 1))

    # one process, the whole sequences
    single = ek.FusedLinearPreferenceLoss(**ctor)
    h1, w1, b1 = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    out1 = call(single, h1, w1, b1, labels, ref_hidden, extra_full)
    out1.loss.backward()

    # this rank's slice of every sequence
    cp = ek.FusedLinearPreferenceLoss(**ctor, sequence_group=group)
    h2 = _slice(hidden, rank, world).clone().requires_grad_()
    w2, b2 = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    with ek.kernel_options(**opts):
        if paired:
            plan = cp.plan_for(w2, h2, b2)
            res["path"] = (0 if (plan.path.value == "fused") == (name == "dpo-op") else 1, 0)
        out2 = call(cp, h2, w2, b2, _slice(labels, rank, world), _slice(ref_hidden, rank, world), extra_part)
        if name == "dpo-chunks":  # the same chunks of whole pairs on every rank, more than one
            chunks = cp._plan_pairs(_slice(labels, rank, world), V, dtype).chunks
            res["several_chunks"] = (0 if chunks is not None and len(chunks) > 1 else 1, 0)
    out2.loss.backward()

    _compare(res, "loss", out2.loss, out1.loss, tol)
    res["metric_keys"] = (0 if set(out1.metrics) == set(out2.metrics) else 1, 0)
    for k, v in out1.metrics.items():
        if k in out2.metrics:
            _compare(res, f"metric:{k}", out2.metrics[k], v, tol)
    _compare(res, "policy_logps", out2.policy_logps, out1.policy_logps, tol)
    if out1.ref_logps is not None:
        _compare(res, "ref_logps", out2.ref_logps, out1.ref_logps, tol)
    _compare(res, "d_hidden", h2.grad, _slice(h1.grad, rank, world), tol)
    # the caller's reduction: the SUM over the sequence group of each rank's head gradient
    dw, db = w2.grad.clone(), b2.grad.clone()
    dist.all_reduce(dw, group=group)
    dist.all_reduce(db, group=group)
    _compare(res, "d_weight_sum", dw, w1.grad, tol)
    _compare(res, "d_bias_sum", db, b1.grad, tol)
    return res


def _run_error_case(case, rank, world, group):
    hidden, ref_hidden, weight, _, bias, labels = _data(torch.float64, 2 * B, seed=3)
    module = ek.FusedLinearDPOLoss(beta=0.1, sequence_group=group)
    h, y, rh = (_slice(t, rank, world) for t in (hidden, labels, ref_hidden))
    if case == "err-batch-size":
        if rank == world - 1:  # one rank holds 2 pairs, the others 3
            h, y, rh = h[[0, 1, 3, 4]], y[[0, 1, 3, 4]], rh[[0, 1, 3, 4]]
        expect = "batch size differs"
    else:
        if rank == 1:  # labels one position longer than the hidden states
            y = torch.cat([y, y[:, :1]], dim=1)
        expect = "rank 1's shard does not line up"
    try:
        module(weight, h.requires_grad_(), y, bias=bias, ref_hidden=rh)
    except ValueError as e:
        ok = expect in str(e)
        # the group is still in step: the next collective pairs up
        t = torch.ones(1)
        dist.all_reduce(t, group=group)
        return {"message": (0 if ok else 1, 0), "in_step": (abs(float(t) - world), 0)}
    return {"raised": (1, 0)}


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    group = dist.group.WORLD
    jobs = [(c, _run_case) for c in CASES] + [(c, _run_error_case) for c in ERROR_CASES]
    run_rank_jobs([(name, functools.partial(fn, name, rank, world, group)) for name, fn in jobs], rank, out_dir)


_CACHE = {}


def _results(world):
    if world not in _CACHE:
        with tempfile.TemporaryDirectory() as d:
            mp.spawn(_worker, args=(world, os.path.join(d, "init"), d), nprocs=world, join=True)
            _CACHE[world] = [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(world)]
    return _CACHE[world]


def _check(world, name):
    for rank, results in enumerate(_results(world)):
        assert name in results, f"rank {rank} did not run {name}"
        res = results[name]
        assert res, f"rank {rank} {name}: no checks recorded"
        assert "error" not in res, f"rank {rank}:\n{res.get('error')}"
        bad = {k: v for k, v in res.items() if not v[0] <= v[1]}
        assert not bad, f"world {world} rank {rank} {name}: (error, tolerance) {bad}"


pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("name", CASES)
def test_context_parallel_matches_one_process(world, name):
    _check(world, name)


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("name", ERROR_CASES)
def test_context_parallel_mismatched_shards_raise_on_every_rank(world, name):
    _check(world, name)


def test_sequence_group_refuses_ld_alpha_and_weighting():
    with pytest.raises(ValueError, match="sequence_group"):
        ek.FusedLinearDPOLoss(ld_alpha=0.5, sequence_group=object())
    with pytest.raises(ValueError, match="sequence_group"):
        ek.FusedLinearDPOLoss(use_weighting=True, sequence_group=object())

"""Vocab-parallel log-probs / token KL (expo_kernels.distributed) and FSDP2, on CPU with gloo.

One process group per world size (2 and 4), spawned once per module: every case runs inside the
spawned ranks, which compare the vocab-parallel op with the single-process op (same backend, full
weight) and write ``(error, tolerance)`` pairs to a file; the tests here assert on them. Gradients:
``d_hidden`` (all-reduced) vs the single-process one, each rank's ``d_weight`` / ``d_bias`` shard vs the
matching ``torch.chunk`` slice of the full gradient. The FSDP2 case trains a tiny LM a few steps with
``FusedLinearPreferenceLoss`` through :func:`expo_kernels.distributed.fsdp_lm_head_call` and
compares losses and parameters with the same model trained unsharded on the global batch.

Tolerances: float64 1e-10, float32 3e-5, bfloat16 2e-2 (relative to the reference's largest
magnitude; bf16 gradients are rounded to bf16, and a shard's d_weight is the sum of two rounded
partial results); is_top1 exact. The torch backend's tiles are shrunk (16 x 64) in the workers so vocab tiles cross shards.
"""

import copy
import datetime
import functools
import os
import tempfile
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import require_backend
from helpers import run_rank_jobs

import expo_kernels as ek
from expo_kernels import distributed as ekd

TRANSFORMS = {
    "plain": {},
    "temperature": {"temperature": 0.7},
    "logit_scale": {"logit_scale": 0.25},
    "softcap": {"softcap": 3.0},
    "all": {"temperature": 1.3, "logit_scale": 2.0, "softcap": 5.0},
}
# (tokens, hidden, vocab): vocab not divisible by 2 or 4, hidden not a power of two; (5, 8, 3) leaves
# rank 3 of 4 with an empty shard (torch.chunk returns 3 chunks).
SHAPES = [(37, 24, 101), (70, 40, 257), (5, 8, 3)]
DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16}
TOL = {torch.float32: 3e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2}
WORLD_SIZES = (2, 4)


def logprob_cases():
    cases = []
    for si, shape in enumerate(SHAPES):
        for ti, tname in enumerate(TRANSFORMS):
            for dname in ("fp32", "fp64") + (("bf16",) if si == 0 and tname in ("plain", "all") else ()):
                bias = (si + ti) % 2 == 0
                cases.append(
                    dict(
                        name=f"logp-{'x'.join(map(str, shape))}-{tname}-{dname}{'-bias' if bias else ''}",
                        shape=shape,
                        transform=tname,
                        dtype=dname,
                        bias=bias,
                    )
                )
    return cases


def kl_cases():
    cases = []
    for shape in SHAPES[:2] + [(5, 8, 3)]:
        for ti, tname in enumerate(TRANSFORMS):
            for dname in ("fp32", "fp64"):
                bias = ti % 2 == 1
                cases.append(
                    dict(
                        name=f"kl-{'x'.join(map(str, shape))}-{tname}-{dname}{'-bias' if bias else ''}",
                        shape=shape,
                        transform=tname,
                        dtype=dname,
                        bias=bias,
                    )
                )
    return cases


# The other backends on this machine (native C++, Triton in the interpreter): a few cases each, vs the
# single-process op on the same backend.
# Named statically (collection builds nothing); the workers and the tests skip what does not run here.
OTHER_BACKENDS = ("native", "triton")


def backend_cases():
    cases = []
    for b in OTHER_BACKENDS:
        if b == "triton":  # the interpreter is slow: one small case each, 2 ranks only
            shape, names, dtypes = (9, 16, 37), ["all"], ["fp32"]
        else:
            shape, names, dtypes = (37, 24, 101), list(TRANSFORMS), ["fp32", "fp64"]
        tag = "x".join(map(str, shape))
        for tname in names:
            for dname in dtypes:
                cases.append(
                    dict(
                        name=f"{b}-logp-{tag}-{tname}-{dname}-bias",
                        shape=shape,
                        transform=tname,
                        dtype=dname,
                        bias=True,
                        backend=b,
                    )
                )
                cases.append(
                    dict(
                        name=f"{b}-kl-{tag}-{tname}-{dname}",
                        shape=shape,
                        transform=tname,
                        dtype=dname,
                        bias=False,
                        backend=b,
                    )
                )
    return cases


def _backend_cases(world):
    return [c for c in backend_cases() if world == 2 or c["backend"] != "triton"]


EXTRA_CASES = ["all-ignored", "label-out-of-range", "ties-is-top1", "public-api", "comm-volume"]
FSDP_CASES = [
    "fsdp2-dpo-training",
    "fsdp2-dpo-head-in-root-group",
    "fsdp2-helper-refuses-shard",
    "fsdp2-hf-fused-head-own-group",
    "fsdp2-hf-fused-head-root-group",
]


# ------------------------------------------------------------------------------------------------
# helpers used inside the workers
# ------------------------------------------------------------------------------------------------


def _shard(full, rank, world):
    chunks = torch.chunk(full, world, dim=0)
    if rank < len(chunks):
        return chunks[rank]
    return full[full.shape[0] :]  # empty [0, ...]


def _err(a, b):
    """max |a - b| relative to max(1, max |b|)."""
    a, b = a.detach().double(), b.detach().double()
    if b.numel() == 0:
        return 0.0
    return float((a - b).abs().max() / max(1.0, float(b.abs().max())))


def _grad_err(grad, want):
    """``_err`` of a gradient that must exist and have the parameter's shape (inf otherwise)."""
    if grad is None or grad.shape != want.shape:
        return float("inf")
    return _err(grad, want)


def _make(shape, dtype, bias, seed, ignore_frac=0.3):
    n, h, v = shape
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(v, h, generator=g, dtype=torch.float64) * 2 / h**0.5).to(dtype)
    b = (torch.randn(v, generator=g, dtype=torch.float64) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignore_frac] = -100
    gl = torch.randn(n, generator=g, dtype=torch.float64)
    return hidden, weight, b, labels, gl


def _run_logp_case(case, rank, world, group):
    dtype = DTYPES[case["dtype"]]
    tf = TRANSFORMS[case["transform"]]
    hidden, weight, bias, labels, gl = _make(case["shape"], dtype, case["bias"], seed=zlib.crc32(case["name"].encode()))
    tol = TOL[dtype]
    backend = case.get("backend", "torch")
    res = {}
    # single process, full head
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    b1 = bias.clone().requires_grad_() if bias is not None else None
    ref, ref_stats = ek.linear_logprobs(h1, w1, labels, b1, return_stats=True, backend=backend, **tf)
    (ref * gl.to(ref.dtype)).sum().backward()
    # vocab parallel, with and without statistics
    for with_stats in (True, False):
        h2 = hidden.clone().requires_grad_()
        w2 = _shard(weight, rank, world).clone().requires_grad_()
        b2 = _shard(bias, rank, world).clone().requires_grad_() if bias is not None else None
        out = ekd.vocab_parallel_linear_logprobs(
            h2,
            w2,
            labels,
            b2,
            process_group=group,
            vocab_size=weight.shape[0],
            return_stats=with_stats,
            backend=backend,
            **tf,
        )
        logp, stats = out if with_stats else (out, None)
        (logp * gl.to(logp.dtype)).sum().backward()
        sfx = "" if with_stats else "/nostats"
        res["logp" + sfx] = (_err(logp, ref), tol)
        res["d_hidden" + sfx] = (_err(h2.grad, h1.grad), tol)
        # every shard gets its gradient, an empty [0, H] one included (a missing grad is an error, not 0)
        res["d_weight_shard" + sfx] = (_grad_err(w2.grad, _shard(w1.grad, rank, world)), tol)
        if bias is not None:
            res["d_bias_shard" + sfx] = (_grad_err(b2.grad, _shard(b1.grad, rank, world)), tol)
        if with_stats:
            for k in ("lse", "entropy", "mean_logit", "log_sum_p2"):
                res[k] = (_err(getattr(stats, k), getattr(ref_stats, k)), tol)
            res["is_top1_mismatches"] = (int((stats.is_top1 != ref_stats.is_top1).sum()), 0)
    return res


def _run_kl_case(case, rank, world, group):
    dtype = DTYPES[case["dtype"]]
    tf = TRANSFORMS[case["transform"]]
    seed = zlib.crc32(case["name"].encode())
    hidden, weight, bias, labels, gl = _make(case["shape"], dtype, case["bias"], seed)
    n, hd, v = case["shape"]
    g = torch.Generator().manual_seed(seed + 1)
    hr = hd + 3
    ref_hidden = torch.randn(n, hr, generator=g, dtype=torch.float64).to(dtype)
    ref_weight = (torch.randn(v, hr, generator=g, dtype=torch.float64) * 2 / hr**0.5).to(dtype)
    ref_bias = (torch.randn(v, generator=g, dtype=torch.float64) * 0.5).to(dtype) if case["bias"] else None
    tol = TOL[dtype]
    backend = case.get("backend", "torch")
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    b1 = bias.clone().requires_grad_() if bias is not None else None
    ref = ek.linear_token_kl(h1, w1, ref_hidden, ref_weight, labels, b1, ref_bias, backend=backend, **tf)
    (ref * gl.to(ref.dtype)).sum().backward()
    h2 = hidden.clone().requires_grad_()
    w2 = _shard(weight, rank, world).clone().requires_grad_()
    b2 = _shard(bias, rank, world).clone().requires_grad_() if bias is not None else None
    kl = ekd.vocab_parallel_linear_token_kl(
        h2,
        w2,
        ref_hidden,
        _shard(ref_weight, rank, world),
        labels,
        b2,
        _shard(ref_bias, rank, world) if ref_bias is not None else None,
        process_group=group,
        backend=backend,
        **tf,
    )
    (kl * gl.to(kl.dtype)).sum().backward()
    res = {
        "kl": (_err(kl, ref), tol),
        "d_hidden": (_err(h2.grad, h1.grad), tol),
        "d_weight_shard": (_err(w2.grad, _shard(w1.grad, rank, world)), tol),
    }
    if bias is not None:
        res["d_bias_shard"] = (_err(b2.grad, _shard(b1.grad, rank, world)), tol)
    return res


def _run_extra(name, rank, world, group):
    if name == "all-ignored":
        hidden, weight, bias, labels, gl = _make((6, 8, 11), torch.float32, True, 3)
        labels[:] = -100
        h = hidden.clone().requires_grad_()
        w = _shard(weight, rank, world).clone().requires_grad_()
        logp, stats = ekd.vocab_parallel_linear_logprobs(
            h, w, labels, _shard(bias, rank, world), process_group=group, return_stats=True
        )
        logp.sum().backward()
        return {
            "logp_zero": (float(logp.detach().abs().max()), 0.0),
            "d_hidden_zero": (float(h.grad.abs().max()), 0.0),
            "d_weight_zero": (_grad_err(w.grad, torch.zeros_like(w)), 0.0),
        }
    if name == "label-out-of-range":
        hidden, weight, _, labels, _ = _make((6, 8, 11), torch.float32, False, 4, ignore_frac=0.0)
        labels[2] = 11  # global V = 11: out of range although it is past every shard
        try:
            ekd.vocab_parallel_linear_logprobs(hidden, _shard(weight, rank, world), labels, process_group=group)
        except ValueError as e:
            return {"raised_ValueError": (0 if "[0, 11)" in str(e) else 1, 0)}
        return {"raised_ValueError": (1, 0)}
    if name == "ties-is-top1":
        # integer-valued inputs: every logit is exact, so duplicated maxima tie exactly across shards.
        v, hd = 12, 6
        g = torch.Generator().manual_seed(7)
        weight = torch.randint(-2, 3, (v, hd), generator=g).double()
        hidden = torch.randint(-2, 3, (8, hd), generator=g).double()
        big = torch.full((hd,), 5.0)
        weight[1] = big
        weight[v - 2] = big  # the same maximum in the first and the last shard
        hidden[:, :] = hidden.abs() + 1  # positive: the `big` rows are the maxima
        labels = torch.tensor([1, v - 2, 0, 3, v - 2, 1, 5, -100])
        _, ref_stats = ek.linear_logprobs(hidden, weight, labels, return_stats=True, backend="torch")
        _, stats = ekd.vocab_parallel_linear_logprobs(
            hidden, _shard(weight, rank, world), labels, process_group=group, return_stats=True, backend="torch"
        )
        expect = torch.tensor([True, False, False, False, False, True, False, False])
        return {
            "vs_single_process": (int((stats.is_top1 != ref_stats.is_top1).sum()), 0),
            "vs_expected": (int((stats.is_top1 != expect).sum()), 0),
        }
    if name == "public-api":
        hidden, weight, bias, labels, gl = _make((37, 24, 101), torch.float64, True, 5)
        ref_hidden, ref_weight = hidden * 0.5, weight.flip(1)
        ref = ek.linear_logprobs(hidden, weight, labels, bias, softcap=4.0)
        out = ek.linear_logprobs(
            hidden, _shard(weight, rank, world), labels, _shard(bias, rank, world), softcap=4.0, process_group=group
        )
        ref_kl = ek.linear_token_kl(hidden, weight, ref_hidden, ref_weight, labels, temperature=0.8)
        kl = ek.linear_token_kl(
            hidden,
            _shard(weight, rank, world),
            ref_hidden,
            _shard(ref_weight, rank, world),
            labels,
            temperature=0.8,
            process_group=group,
        )
        return {"linear_logprobs": (_err(out, ref), 1e-10), "linear_token_kl": (_err(kl, ref_kl), 1e-10)}
    if name == "comm-volume":
        n, hd, v = 40, 16, 103
        hidden, weight, _, labels, _ = _make((n, hd, v), torch.float32, False, 6, ignore_frac=0.0)
        h = hidden.clone().requires_grad_()
        with ekd.count_communication() as c:
            logp = ekd.vocab_parallel_linear_logprobs(
                h, _shard(weight, rank, world).clone().requires_grad_(), labels, process_group=group
            )
            logp.sum().backward()
        # forward: MAX of N + SUM of 2N floats; backward: N*H floats of d_hidden; + world sizes gather
        want = 4 * (n + 2 * n + n * hd)
        return {
            "all_reduce_bytes": (abs(c["all_reduce_bytes"] - want), 0),
            "all_reduce_calls": (abs(c["all_reduce_calls"] - 3), 0),
        }
    raise KeyError(name)


class TinyLM(torch.nn.Module):
    """Embedding -> Linear+tanh -> LayerNorm; the LM head is a submodule the forward does not call."""

    def __init__(self, vocab=53, dim=24):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.layer = torch.nn.Linear(dim, dim)
        self.norm = torch.nn.LayerNorm(dim)
        self.lm_head = torch.nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):
        return self.norm(torch.tanh(self.layer(self.embed(ids))))


def _dpo_batch(seed, pairs=2, t=9, vocab=53):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2 * pairs, t + 1), generator=g)
    labels = ids[:, 1:].clone()
    labels[:, :3] = -100  # prompt
    labels[pairs:, -1] = -100  # padding on the rejected rows
    return ids[:, :-1], labels


def _run_fsdp(name, rank, world, group):
    from torch.distributed.fsdp import fully_shard

    steps, lr = 3, 0.5
    torch.manual_seed(0)
    model = TinyLM()
    ref_model = copy.deepcopy(model)  # frozen reference policy
    plain = copy.deepcopy(model)  # trained unsharded on the global batch
    for p in ref_model.parameters():
        p.requires_grad_(False)
    if name == "fsdp2-helper-refuses-shard":
        fully_shard(model)  # head inside the root group: a DTensor outside the forward
        try:
            ekd.fsdp_lm_head_call(model.lm_head, lambda w, x: x @ w.T, torch.zeros(2, 24))
        except RuntimeError:
            return {"raised_RuntimeError": (0, 0)}
        return {"raised_RuntimeError": (1, 0)}
    fully_shard(model.layer)
    if name == "fsdp2-dpo-training":
        fully_shard(model.lm_head)  # the head in its own group: the helper runs the loss as its forward
    # else the head is in the root group (as accelerate shards HF models): the root keeps its
    # parameters gathered from its forward to the end of backward, the helper calls the loss directly
    fully_shard(model)
    loss_fn = ek.FusedLinearPreferenceLoss("sigmoid", beta=0.5, backend="torch")
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    opt_plain = torch.optim.SGD(plain.parameters(), lr=lr)
    res = {}
    for step in range(steps):
        batches = [_dpo_batch(1000 * step + r) for r in range(world)]
        ids, labels = batches[rank]
        with torch.no_grad():
            ref_hidden = ref_model(ids)
        hidden = model(ids)
        out = ekd.fsdp_lm_head_call(
            model.lm_head, loss_fn, hidden, labels, ref_hidden=ref_hidden, ref_weight=ref_model.lm_head.weight
        )
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        loss = out.loss.detach().clone()
        dist.all_reduce(loss, group=group)
        loss /= world
        # unsharded: the same pairs, all ranks' batches at once (chosen rows first, then rejected)
        p = batches[0][0].shape[0] // 2
        g_ids = torch.cat([b[0][:p] for b in batches] + [b[0][p:] for b in batches])
        g_labels = torch.cat([b[1][:p] for b in batches] + [b[1][p:] for b in batches])
        with torch.no_grad():
            g_ref = ref_model(g_ids)
        out_plain = loss_fn(
            plain.lm_head.weight, plain(g_ids), g_labels, ref_hidden=g_ref, ref_weight=ref_model.lm_head.weight
        )
        out_plain.loss.backward()
        opt_plain.step()
        opt_plain.zero_grad()
        res[f"loss_step{step}"] = (_err(loss, out_plain.loss), 1e-5)
    moved = 0.0
    for (n1, p1), (_, p2), p0 in zip(
        model.named_parameters(), plain.named_parameters(), ref_model.parameters(), strict=False
    ):
        full = p1.full_tensor() if hasattr(p1, "full_tensor") else p1
        res[f"param:{n1}"] = (_err(full, p2), 1e-5)
        moved = max(moved, float((p2.detach() - p0).abs().max()))
    res["params_moved"] = (0.0 if moved > 1e-3 else 1.0, 0.0)  # the training did change the weights
    return res


def _run_fsdp_hf(name, rank, world, group):
    """expo_kernels' TRL-compatible fused head on a tiny HF Llama under FSDP2 vs the model unsharded:
    the patched forward must see the gathered head and hand its gradient to FSDP."""
    transformers = pytest.importorskip("transformers")
    from torch.distributed.fsdp import fully_shard

    from expo_kernels.integrations.trl import add_fused_lm_head

    cfg = transformers.LlamaConfig(
        vocab_size=61,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    plain = copy.deepcopy(model)
    for m in (model, plain):
        add_fused_lm_head(m, outputs=("log_probs", "entropy"), backend="torch")
    for layer in model.model.layers:
        fully_shard(layer)
    if name == "fsdp2-hf-fused-head-own-group":
        fully_shard(model.lm_head)
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.5)
    res = {}
    for step in range(2):
        g = torch.Generator().manual_seed(step)  # the same batch on every rank: grads average to the batch's
        ids = torch.randint(0, 61, (3, 10), generator=g)
        labels = ids.masked_fill(torch.arange(10) < 3, -100)
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        ref = plain(input_ids=ids, labels=labels, fused_lm_head=True)
        ref.loss.backward()
        opt_plain.step()
        opt_plain.zero_grad()
        res[f"loss_step{step}"] = (_err(out.loss, ref.loss), 1e-5)
        res[f"entropy_step{step}"] = (_err(out.entropy, ref.entropy), 1e-5)
    for (n1, p1), (_, p2) in zip(model.named_parameters(), plain.named_parameters(), strict=False):
        full = p1.full_tensor() if hasattr(p1, "full_tensor") else p1
        res[f"param:{n1}"] = (_err(full, p2), 1e-5)
    return res


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    from expo_kernels.ops import torch_backend

    torch_backend.TOKEN_CHUNK, torch_backend.VOCAB_CHUNK = 16, 64  # tiles cross shard boundaries
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    group = dist.group.WORLD
    jobs = [(c["name"], _run_logp_case, c) for c in logprob_cases()]
    jobs += [(c["name"], _run_kl_case, c) for c in kl_cases()]
    here = ek.available_backends("cpu")
    jobs += [
        (c["name"], _run_logp_case if "-logp-" in c["name"] else _run_kl_case, c)
        for c in _backend_cases(world)
        if c["backend"] in here
    ]
    jobs += [(n, _run_extra, n) for n in EXTRA_CASES]
    if world == 2:
        jobs += [(n, _run_fsdp_hf if "-hf-" in n else _run_fsdp, n) for n in FSDP_CASES]
    run_rank_jobs([(name, functools.partial(fn, arg, rank, world, group)) for name, fn, arg in jobs], rank, out_dir)


_CACHE = {}


def _results(world):
    if world not in _CACHE:
        with tempfile.TemporaryDirectory() as d:
            init_file = os.path.join(d, "init")
            mp.spawn(_worker, args=(world, init_file, d), nprocs=world, join=True)
            _CACHE[world] = [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(world)]
    return _CACHE[world]


def _check(world, name):
    per_rank = _results(world)
    for rank, results in enumerate(per_rank):
        assert name in results, f"rank {rank} did not run {name}"
        res = results[name]
        assert res, f"rank {rank} {name}: no checks recorded"
        assert "error" not in res, f"rank {rank}:\n{res.get('error')}"
        bad = {k: v for k, v in res.items() if not v[0] <= v[1]}
        assert not bad, f"world {world} rank {rank} {name}: (error, tolerance) {bad}"


pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("name", [c["name"] for c in logprob_cases()])
def test_vocab_parallel_logprobs(world, name):
    _check(world, name)


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("name", [c["name"] for c in kl_cases()])
def test_vocab_parallel_token_kl(world, name):
    _check(world, name)


@pytest.mark.parametrize(
    "world,backend_name,name", [(w, c["backend"], c["name"]) for w in WORLD_SIZES for c in _backend_cases(w)]
)
def test_vocab_parallel_other_backends(world, backend_name, name):
    require_backend(backend_name, "cpu")
    _check(world, name)


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("name", EXTRA_CASES)
def test_vocab_parallel_edge_cases(world, name):
    _check(world, name)


@pytest.mark.parametrize("name", FSDP_CASES)
def test_fsdp2_fused_dpo_matches_unsharded(name):
    _check(2, name)


def test_shard_bounds_match_torch_chunk():
    for v in (1, 3, 5, 7, 100, 101, 257):
        for world in (1, 2, 3, 4, 8):
            full = torch.arange(v)
            for r in range(world):
                lo, hi = ekd.vocab_shard_bounds(v, world, r)
                assert torch.equal(full[lo:hi], _shard(full, r, world))


def test_single_rank_group_is_the_single_process_op():
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(d, 'init')}", rank=0, world_size=1)
        try:
            hidden, weight, bias, labels, _ = _make((9, 8, 13), torch.float64, True, 8)
            a = ek.linear_logprobs(hidden, weight, labels, bias, process_group=dist.group.WORLD)
            b = ek.linear_logprobs(hidden, weight, labels, bias)
            assert torch.equal(a, b)
            c = ekd.vocab_parallel_linear_logprobs(hidden, weight, labels, bias, backend="torch")
            assert _err(c, b) < 1e-12
        finally:
            dist.destroy_process_group()

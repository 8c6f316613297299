"""Differential fuzzing: every backend against an independent float64 materialized reference.

Hypothesis draws the whole input space of the public ops: shapes (N including 0 and 1, H including 1,
V including 1 and primes), dtypes (fp32, fp64, bf16, fp16), layouts (contiguous, transposed, strided
views of every tensor argument, leading batch dims), the logit transform, ignore indices (including
ones inside ``[0, V)``), label dtypes, bias on/off (with masked ``-inf`` entries), statistics on/off,
which gradients are required, tiles smaller than the problem, and the execution path of
``linear_logprobs``: one of the op paths (``_dispatch.OP_PATHS``) the plan accepts for the drawn backend,
dtype and shape (``helpers.accepted_op_paths``), forced with ``kernel_options(path=...)``; library GEMMs
with small tiles run through a workspace of a few tokens. Each example is checked for values,
every statistic and every gradient against float64 logits materialized here (``logits64`` from
``reference.py``, nothing of the package).

The report (``-s``, and the tests' JUnit properties) counts the examples per dtype and per path; with
enough examples every path the backend accepts must have been drawn.

Examples: 200 per backend for ``linear_logprobs`` and 100 for ``linear_token_kl`` by default (the
Triton interpreter a quarter of that), about a minute on the 2-core CI machine; ``EXPO_FUZZ_EXAMPLES``
sets one count for every backend and both ops. Runs are derandomized: the same examples every run,
so a failure reproduces; hypothesis prints the failing case's ``spec``. A long run:

    EXPO_FUZZ_EXAMPLES=2000 python -m pytest -q tests/test_fuzz.py

Tolerances (normwise relative, ``|a - b| <= tol |b| + tol 1e-3 sqrt(numel)``): float64 1e-10,
float32 5e-5, float16 5e-3, bfloat16 3e-2 (bf16/fp16 gradients are returned in the input dtype,
rounded to 2^-8 / 2^-11). ``is_top1`` must agree wherever the reference's label logit is not within
the tolerance of another maximal logit. The token KL, a small difference of terms of size ``log V``,
also gets an absolute floor of ``8 eps (1 + log V)`` per token (``eps`` of the accumulator).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections import Counter, defaultdict
from unittest import mock

import pytest
import torch
from helpers import BACKEND_NAMES, accepted_op_paths, device_for, rel_err, tolerance, unsupported_reason
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import logits64, naive_logprobs, transform_logits

import expo_kernels as ek

# Set: that many examples for every backend and both ops (the long run). Unset: the CI defaults below.
EXAMPLES_ENV = os.environ.get("EXPO_FUZZ_EXAMPLES")
BACKENDS = BACKEND_NAMES
# At most one example in TRIVIAL_EVERY has no counted token (no tokens, or every label ignored); every
# other one counts at least one. The test asserts that NONTRIVIAL_SHARE of the examples it ran count one.
TRIVIAL_EVERY = 16
NONTRIVIAL_SHARE = 0.75
VOCABS = [1, 2, 3, 5, 7, 13, 16, 31, 37, 64, 97, 128, 200, 257]
LABEL_DTYPES = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8]


def _settings(backend: str, op: str):
    """~1 minute in all by default on the 2-core CI machine; the Triton interpreter gets fewer examples."""
    if EXAMPLES_ENV is not None:
        count = int(EXAMPLES_ENV)
    else:
        count = {"logprobs": 200, "token_kl": 100}[op] // (4 if backend == "triton" else 1)
    return settings(
        max_examples=count,
        deadline=None,
        derandomize=True,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# ------------------------------------------------------------------------------------------------
# the input space
# ------------------------------------------------------------------------------------------------


@st.composite
def cases(draw, backend: str):
    vocab = draw(st.sampled_from(VOCABS))
    label_dtype = draw(
        st.sampled_from(
            [
                d
                for d in LABEL_DTYPES
                if d in (torch.int64, torch.int32, torch.int16)
                or (d == torch.int8 and vocab <= 128)
                or (d == torch.uint8 and vocab <= 256)
            ]
        )
    )
    # every dtype this machine can run on this backend (Triton: float64 never, bf16/fp16 on a GPU only)
    dtypes = [
        d
        for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64)
        if not (backend == "triton" and d == torch.float64) and unsupported_reason(backend, d) is None
    ]
    dtype = draw(st.sampled_from(dtypes))
    trivial = draw(st.integers(1, TRIVIAL_EVERY)) == TRIVIAL_EVERY  # no counted token, on purpose
    if trivial:
        lead = draw(st.sampled_from([(0,), (2, 0), (5,), (2, 3)]))
    else:
        lead = draw(st.one_of(st.tuples(st.integers(1, 40)), st.tuples(st.integers(1, 3), st.integers(1, 12))))
    # linear_logprobs' execution path: one the plan takes, forced, for this backend, dtype and shape
    path = draw(st.sampled_from(accepted_op_paths(backend, dtype, tokens=math.prod(lead), vocab=vocab)))
    # uint8 cannot hold -100: nothing is ignored then; with V = 1 an id "inside" would ignore every label
    ignore_index = draw(st.sampled_from([-100, "inside"])) if vocab > 1 else -100
    with_bias = draw(st.booleans())
    return dict(
        seed=draw(st.integers(0, 2**31 - 1)),
        lead=lead,
        hidden_size=draw(st.sampled_from([1, 2, 3, 8, 16, 24, 33, 40])),
        vocab=vocab,
        dtype=dtype,
        path=path,
        label_dtype=label_dtype,
        ignore_index=ignore_index,  # "inside": a vocabulary id, drawn in build()
        ignore_frac=1.0 if trivial and lead[-1] else draw(st.sampled_from([0.0, 0.3, 0.7])),
        trivial=trivial,
        bias=with_bias,
        masked=with_bias and vocab > 2 and draw(st.booleans()),  # a few -inf bias entries
        layout=dict(
            hidden=draw(st.sampled_from(["contiguous", "transposed", "strided"])),
            weight=draw(st.sampled_from(["contiguous", "transposed", "strided"])),
            bias=draw(st.sampled_from(["contiguous", "strided"])),
            labels=draw(st.sampled_from(["contiguous", "strided"])),
        ),
        transform=dict(
            temperature=draw(st.sampled_from([1.0, 0.5, 2.3])),
            logit_scale=draw(st.sampled_from([None, 0.3, 1.7])),
            softcap=draw(st.sampled_from([None, 1.0, 5.0, 30.0])),
        ),
        scale=draw(st.sampled_from([0.5, 2.0, 6.0])),  # logit spread: flat to peaked softmax
        stats=draw(st.booleans()),
        grads=draw(st.sampled_from([("hidden", "weight", "bias"), ("hidden",), ("weight", "bias"), ()])),
        small_tiles=draw(st.booleans()),
        triton_splits=draw(st.sampled_from([1, 2, 3])),
    )


def _view(make, shape, layout, gen):
    """A tensor of ``shape`` with the given memory layout (values from ``make(shape, gen)``)."""
    if layout == "transposed" and len(shape) >= 2:
        return make(shape[-1:] + shape[:-1], gen).movedim(0, -1)
    if layout == "strided":
        return make(shape[:-1] + (2 * shape[-1],), gen)[..., ::2] if shape else make(shape, gen)
    return make(shape, gen)


def build(spec):
    """The inputs of one example, as leaves with the requested ``requires_grad``."""
    gen = torch.Generator().manual_seed(spec["seed"])
    lead, h, v, dtype = spec["lead"], spec["hidden_size"], spec["vocab"], spec["dtype"]
    scale = spec["scale"]

    def normal(std):
        return lambda shape, g: (torch.randn(shape, generator=g, dtype=torch.float64) * std).to(dtype)

    hidden = _view(normal(1.0), lead + (h,), spec["layout"]["hidden"], gen)
    weight = _view(normal(scale / h**0.5), (v, h), spec["layout"]["weight"], gen)
    bias = _view(normal(0.5), (v,), spec["layout"]["bias"], gen) if spec["bias"] else None
    labels64 = torch.randint(0, v, lead, generator=gen)
    if spec["masked"]:
        masked = torch.randperm(v, generator=gen)[: max(1, v // 5)]
        bias[masked] = -math.inf
        # a masked id as a label would have log p = -inf: move those labels to an unmasked id
        allowed = torch.ones(v, dtype=torch.bool)
        allowed[masked] = False
        labels64 = torch.where(allowed[labels64], labels64, allowed.nonzero()[0, 0])
    ignore_index = spec["ignore_index"]
    if ignore_index == "inside":
        ignore_index = int(torch.randint(0, v, (1,), generator=gen))
    info = torch.iinfo(spec["label_dtype"])
    if info.min <= ignore_index <= info.max:  # -100 cannot be stored in uint8: then nothing is dropped
        labels64 = labels64.masked_fill(torch.rand(lead, generator=gen) < spec["ignore_frac"], ignore_index)
        if not spec["trivial"] and not bool((labels64 != ignore_index).any()):
            # a non-trivial example counts at least one token: its first one gets a counted, unmasked id
            ok = (torch.arange(v) != ignore_index) & (
                torch.ones(v, dtype=torch.bool) if not spec["masked"] else allowed
            )
            labels64.view(-1)[0] = ok.nonzero()[0, 0]
    labels = labels64.to(spec["label_dtype"])
    if spec["layout"]["labels"] == "strided":
        labels = torch.stack([labels, labels], dim=-1)[..., 0]
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if t is not None and name in spec["grads"]:
            t.requires_grad_()
    return hidden, weight, bias, labels, ignore_index


#: with small tiles, library GEMMs run through a workspace of this many tokens' logits (token chunks in the
#: forward, vocabulary chunks in the backward)
GEMM_WORKSPACE_TOKENS = 3


@contextlib.contextmanager
def forced_path(spec):
    """``kernel_options(path=spec["path"])`` for ``linear_logprobs`` (its forward and backward)."""
    options = {"path": spec["path"]}
    if spec["path"] == "library_gemm" and spec["small_tiles"]:
        options["workspace_bytes"] = GEMM_WORKSPACE_TOKENS * 4 * max(1, spec["vocab"])
    with ek.kernel_options(**options):
        yield


@contextlib.contextmanager
def tiles(backend: str, spec):
    """Tiles smaller than the problem, so every chunk-boundary path runs."""
    with contextlib.ExitStack() as stack:
        if spec["small_tiles"] and backend == "torch":
            from expo_kernels.ops import torch_backend

            stack.enter_context(mock.patch.object(torch_backend, "TOKEN_CHUNK", 8))
            stack.enter_context(mock.patch.object(torch_backend, "VOCAB_CHUNK", 16))
        if spec["small_tiles"] and backend == "native":
            from expo_kernels.ops import native_backend

            stack.enter_context(mock.patch.object(native_backend, "TOKEN_BLOCK", 8))
            stack.enter_context(mock.patch.object(native_backend, "VOCAB_TILE", 16))
        if backend == "triton":
            from expo_kernels.ops.triton import configs as triton_configs

            stack.enter_context(mock.patch.object(triton_configs, "_choose_splits", lambda *a: spec["triton_splits"]))
        yield


# ------------------------------------------------------------------------------------------------
# the reference and the comparison
# ------------------------------------------------------------------------------------------------


def _leaf64(t):
    return None if t is None else t.detach().double().requires_grad_(t.requires_grad)


def reference(hidden, weight, bias, labels, ignore_index, transform):
    """float64 per-token results over all tokens (0 at ignored ones) and the float64 leaves."""
    h64, w64, b64 = _leaf64(hidden), _leaf64(weight), _leaf64(bias)
    y = labels.reshape(-1).long()
    valid = y != ignore_index
    z = logits64(h64.reshape(-1, h64.shape[-1]), w64, b64, **transform)
    logq = torch.log_softmax(z, dim=-1)
    p = logq.exp()
    y0 = torch.where(valid, y, 0)
    logp = logq.gather(1, y0[:, None])[:, 0]
    z_label = z.gather(1, y0[:, None])[:, 0]
    others = z.scatter(1, y0[:, None], -math.inf)
    first_max = (
        torch.where(torch.arange(z.shape[1])[None, :] < y0[:, None], z, -math.inf).amax(1, keepdim=True)
        if z.shape[1]
        else z
    )
    out = dict(
        logp=torch.where(valid, logp, 0.0),
        lse=torch.logsumexp(z, dim=-1),
        entropy=-(p * torch.where(p > 0, logq, 0.0)).sum(-1),
        mean_logit=torch.where(torch.isfinite(z), z, 0.0).sum(-1) / z.shape[1],
        log_sum_p2=torch.log((p * p).sum(-1)),
    )
    out = {k: torch.where(valid, t, 0.0) for k, t in out.items()}
    out["is_top1"] = valid & (z_label >= z.amax(-1)) & (first_max[:, 0] < z_label)
    out["top1_margin"] = torch.where(valid, (z_label - others.amax(-1)).abs(), math.inf).detach()
    out["valid"] = valid
    return out, (h64, w64, b64)


#: per backend, how many examples ran, by (dtype, whether any token was counted)
RUN: dict[str, Counter] = defaultdict(Counter)
#: per backend, how many linear_logprobs examples ran on each forced path, by (path, whether any token counted)
PATHS: dict[str, Counter] = defaultdict(Counter)
#: with at least this many examples per accepted path, every path a backend accepts must have been drawn
PATH_EXAMPLES = 10


def _report_and_check(op, backend, record_property):
    """Print (visible with -s) and record (the test's user properties, in JUnit XML) what ran, and
    require that most examples counted a token: an all-ignored example checks almost nothing. For
    linear_logprobs also the examples per path, and (with enough examples) that every op path the backend
    accepts for float32 ran."""
    runs = RUN[backend]
    total = sum(runs.values())
    counted = sum(n for (_, c), n in runs.items() if c)
    by_dtype = Counter()
    for (d, _), n in runs.items():
        by_dtype[d] += n
    line = f"{op}[{backend}]: {total} examples, {counted} with counted tokens; per dtype " + ", ".join(
        f"{d} {n} ({runs[(d, True)]} counted)" for d, n in sorted(by_dtype.items())
    )
    paths = PATHS[backend] if op == "linear_logprobs" else Counter()
    if paths:
        by_path = Counter()
        for (p, _), n in paths.items():
            by_path[p] += n
        line += "; per path " + ", ".join(f"{p} {n} ({paths[(p, True)]} counted)" for p, n in sorted(by_path.items()))
    print(line)
    record_property(f"{op}[{backend}]", line)
    assert total > 0
    assert counted >= NONTRIVIAL_SHARE * total, line
    if paths:
        accepted = accepted_op_paths(backend, torch.float32, device_for(backend), tokens=8, vocab=16)
        if total >= PATH_EXAMPLES * len(accepted):
            assert set(by_path) == set(accepted), f"paths drawn {sorted(by_path)}, accepted {accepted}: {line}"


def _lin(h, w, b):
    z = h.reshape(-1, h.shape[-1]) @ w.T
    return z if b is None else z + b


def _normwise(got, want):
    finite = torch.isfinite(want)
    return (got[finite] - want[finite]).norm().item() / max(want[finite].norm().item(), 1e-30)


def _naive_logprob_errors(backend, spec, hidden, weight, bias, labels, ignore_index, ref, leaves):
    """For Triton's 16-bit cases (a GPU): the errors of the naive same-dtype computation against the same
    float64 reference, the yardstick of ``helpers.tolerance``; {} elsewhere."""
    if backend != "triton" or spec["dtype"] not in (torch.bfloat16, torch.float16):
        return {}
    h, w, b = (None if t is None else t.detach().requires_grad_(t.requires_grad) for t in (hidden, weight, bias))
    nv = naive_logprobs(h, w, labels, b, ignore_index=ignore_index, **spec["transform"]).reshape(-1).cpu()
    out = {"logprobs": _normwise(nv, ref["logp"])}
    pairs = [(t, r) for t, r in zip((h, w, b), leaves, strict=True) if t is not None and t.requires_grad]
    if pairs:
        g = torch.randn(nv.shape, generator=torch.Generator().manual_seed(spec["seed"] + 1), dtype=torch.float64)
        got = torch.autograd.grad((nv * g).sum(), [t for t, _ in pairs], allow_unused=True)
        want = torch.autograd.grad((ref["logp"] * g).sum(), [r for _, r in pairs], retain_graph=True, allow_unused=True)
        out["grad"] = max(
            (rel_err(a.cpu(), b) for a, b in zip(got, want, strict=True) if a is not None and b is not None),
            default=0.0,
        )
    return out


def assert_close(name, got, want, tol, atol_per_token=None):
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    finite = torch.isfinite(want)
    assert torch.isfinite(got[finite]).all(), f"{name}: non-finite where the float64 reference is finite"
    assert torch.equal(got[~finite], want[~finite]), f"{name}: non-finite entries differ from the reference"
    err = (got[finite] - want[finite]).norm().item()
    # per token, an absolute floor of a few rounding errors of the accumulator (float32 below float64):
    # a quantity near 0 (log sum p^2 of a peaked softmax) is a difference of O(1) terms
    acc_eps = torch.finfo(torch.float64 if tol <= 1e-10 else torch.float32).eps
    floor = max(tol * 1e-3, 8 * acc_eps) if atol_per_token is None else atol_per_token
    bound = tol * want[finite].norm().item() + floor * math.sqrt(max(1, want.numel()))
    assert err <= bound, f"{name}: |error| {err:.3e} > {bound:.3e} (tol {tol:g})"


def check_logprobs(backend, spec):
    hidden, weight, bias, labels, ignore_index = build(spec)
    transform = spec["transform"]
    dtype = spec["dtype"]
    with tiles(backend, spec), forced_path(spec):
        res = ek.linear_logprobs(
            hidden,
            weight,
            labels,
            bias,
            ignore_index=ignore_index,
            temperature=transform["temperature"],
            logit_scale=transform["logit_scale"],
            softcap=transform["softcap"],
            return_stats=spec["stats"],
            backend=backend,
        )
        logp, stats = res if spec["stats"] else (res, None)
        ref, leaves = reference(hidden, weight, bias, labels, ignore_index, transform)
        assert logp.shape == labels.shape
        assert logp.dtype == (torch.float64 if spec["dtype"] == torch.float64 else torch.float32)
        flat = logp.reshape(-1)
        RUN[backend][(str(dtype).replace("torch.", ""), bool(ref["valid"].any()))] += 1
        PATHS[backend][(spec["path"], bool(ref["valid"].any()))] += 1
        assert torch.all(flat[~ref["valid"]] == 0), "logp must be exactly 0 at ignored tokens"
        naive = _naive_logprob_errors(backend, spec, hidden, weight, bias, labels, ignore_index, ref, leaves)
        tol = tolerance(dtype, backend, "logprobs", naive_error=naive.get("logprobs"))
        assert_close("logp", flat, ref["logp"], tol)
        if stats is not None:
            tol_s = tolerance(dtype, backend, "stats", naive_error=naive.get("logprobs"))
            for name in ("lse", "entropy", "mean_logit", "log_sum_p2"):
                assert_close(name, getattr(stats, name).reshape(-1), ref[name], tol_s)
            top1 = stats.is_top1.reshape(-1)
            decided = ref["top1_margin"] > 10 * tol_s * (1 + ref["lse"].abs())
            assert torch.equal(top1[decided], ref["is_top1"][decided]), "is_top1 differs from the reference"
        inputs = [
            (n, t, r)
            for n, t, r in zip(("hidden", "weight", "bias"), (hidden, weight, bias), leaves, strict=False)
            if t is not None and t.requires_grad
        ]
        if not inputs:
            return
        g = torch.randn(labels.shape, generator=torch.Generator().manual_seed(spec["seed"] + 1), dtype=torch.float64)
        got = torch.autograd.grad((logp.double() * g).sum(), [t for _, t, _ in inputs], allow_unused=True)
    want = torch.autograd.grad(
        (ref["logp"] * g.reshape(-1)).sum(), [r for _, _, r in inputs], retain_graph=True, allow_unused=True
    )
    tol_g = tolerance(dtype, backend, "grad", naive_error=naive.get("grad"))
    for (name, t, _), a, b in zip(inputs, got, want, strict=False):
        assert a is not None, f"d_{name} is missing"
        assert a.dtype == t.dtype and a.shape == t.shape, f"d_{name}: {a.dtype} {tuple(a.shape)}"
        assert_close(f"d_{name}", a, torch.zeros_like(t, dtype=torch.float64) if b is None else b, tol_g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_linear_logprobs(backend, record_property):
    @_settings(backend, "logprobs")
    @given(spec=cases(backend))
    def run(spec):
        check_logprobs(backend, spec)

    RUN[backend].clear()
    PATHS[backend].clear()
    run()
    _report_and_check("linear_logprobs", backend, record_property)


# ------------------------------------------------------------------------------------------------
# the two-head token KL
# ------------------------------------------------------------------------------------------------


def check_token_kl(backend, spec):
    hidden, weight, bias, labels, ignore_index = build(spec)
    gen = torch.Generator().manual_seed(spec["seed"] + 2)
    hr_size = spec["ref_hidden_size"]
    ref_hidden = (torch.randn(hidden.shape[:-1] + (hr_size,), generator=gen, dtype=torch.float64)).to(spec["dtype"])
    ref_weight = (
        torch.randn(spec["vocab"], hr_size, generator=gen, dtype=torch.float64) * spec["scale"] / hr_size**0.5
    ).to(spec["dtype"])
    transform = spec["transform"]
    dtype = spec["dtype"]
    with tiles(backend, spec):
        kl = ek.linear_token_kl(
            hidden,
            weight,
            ref_hidden,
            ref_weight,
            labels,
            bias,
            ignore_index=ignore_index,
            backend=backend,
            **transform,
        )
        h64, w64, b64 = _leaf64(hidden), _leaf64(weight), _leaf64(bias)
        y = labels.reshape(-1).long()
        valid = y != ignore_index
        logp = torch.log_softmax(logits64(h64.reshape(-1, h64.shape[-1]), w64, b64, **transform), -1)
        logq = torch.log_softmax(logits64(ref_hidden.reshape(-1, hr_size), ref_weight, **transform), -1)
        want = torch.where(valid, (logq.exp() * (logq - logp)).sum(-1), 0.0)
        RUN[backend][(str(dtype).replace("torch.", ""), bool(valid.any()))] += 1
        naive = {}
        if backend == "triton" and dtype in (torch.bfloat16, torch.float16):  # a GPU: the same-dtype yardstick
            with torch.no_grad():
                lp = torch.log_softmax(transform_logits(_lin(hidden, weight, bias), **transform), -1)
                lq = torch.log_softmax(transform_logits(_lin(ref_hidden, ref_weight, None), **transform), -1)
                nkl = torch.where(valid.to(lp.device), (lq.exp() * (lq - lp)).sum(-1), 0.0).double().cpu()
            naive["logprobs"] = _normwise(nkl, want)
        tol = tolerance(dtype, backend, "logprobs", naive_error=naive.get("logprobs"))
        assert kl.shape == labels.shape
        assert torch.all(kl.reshape(-1)[~valid] == 0)
        # KL = cross / s_r - log s_r + log s_p: a small difference of terms of size ~log V, so its
        # absolute error is the accumulator's rounding of those terms, whatever the KL's own size
        eps = torch.finfo(torch.float64 if spec["dtype"] == torch.float64 else torch.float32).eps
        assert_close("kl", kl.reshape(-1), want, tol, atol_per_token=8 * eps * (1 + math.log(spec["vocab"])))
        inputs = [
            (n, t, r)
            for n, t, r in zip(("hidden", "weight", "bias"), (hidden, weight, bias), (h64, w64, b64), strict=False)
            if t is not None and t.requires_grad
        ]
        if not inputs:
            return
        g = torch.randn(labels.shape, generator=gen, dtype=torch.float64)
        got = torch.autograd.grad((kl.double() * g).sum(), [t for _, t, _ in inputs], allow_unused=True)
    ref_grads = torch.autograd.grad((want * g.reshape(-1)).sum(), [r for _, _, r in inputs], allow_unused=True)
    # Triton's 16-bit KL gradients: no naive same-dtype yardstick here (the log-prob fuzz and
    # test_linear_logprobs.py measure one); they get the log-prob gradients' bound of the naive computation, 2^-7
    tol_g = tolerance(dtype, backend, "grad", naive_error=2.0**-7 if backend == "triton" else None)
    for (name, t, _), a, b in zip(inputs, got, ref_grads, strict=False):
        assert a is not None and a.dtype == t.dtype, f"d_{name}"
        assert_close(f"d_{name}", a, torch.zeros_like(t, dtype=torch.float64) if b is None else b, tol_g)


@st.composite
def kl_cases(draw, backend: str):
    spec = draw(cases(backend))
    spec["masked"] = False  # a masked policy entry makes KL = +inf: covered by the dedicated tests
    spec["ref_hidden_size"] = draw(st.sampled_from([1, 8, 20]))
    return spec


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_linear_token_kl(backend, record_property):
    @_settings(backend, "token_kl")
    @given(spec=kl_cases(backend))
    def run(spec):
        check_token_kl(backend, spec)

    RUN[backend].clear()
    run()
    _report_and_check("linear_token_kl", backend, record_property)

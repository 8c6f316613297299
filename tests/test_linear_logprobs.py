"""The fused op against an independent float64 reference, on every available backend.

A new backend inherits the whole file by appearing in ``available_backends``.
Tolerances: ``helpers.tolerance`` (one rule for every accuracy test), against float64 computed from the
same rounded inputs: float64 1e-10, float32 2e-5; bf16/fp16 on the CPU backends 1e-5 on the log-probs
and ``finfo(dtype).eps`` normwise on the gradients (returned in the input dtype); Triton's 16-bit
cases no worse than the naive same-dtype computation. With TRITON_INTERPRET=1 on CPU, Triton runs fp32 only here (bf16
arithmetic is wrong in the interpreter, DESIGN.md section 6: those cases are skipped, with that reason);
a GPU runs it in bf16 too. Every tensor is made on ``helpers.device_for(backend)``.
"""

import math

import pytest
import torch
from conftest import require_backend
from helpers import (
    BACKEND_NAMES,
    FP64_BACKEND_NAMES,
    TRANSFORMS,
    LargestTensor,
    as_is_and_under_a_meta_default,
    backend_dtype_cases,
    device_for,
    make_logprob_inputs,
    rel_err,
    shrink_native_tiles,
    tolerance,
)
from reference import naive_logprobs, reference_logprobs, reference_stats

import expo_kernels as ek
from expo_kernels import ops
from expo_kernels._dispatch import backend_module as _backend_module
from expo_kernels._dispatch import resolve_backend
from expo_kernels.ops import LogitTransform, torch_backend

BACKENDS = BACKEND_NAMES

# (tokens, hidden, vocab): vocab not a multiple of any tile, hidden not a power of two, one token.
SHAPES = [(37, 24, 100), (1, 8, 33), (70, 40, 257)]


def grads_of(out, inputs, upstream):
    return torch.autograd.grad((out.double() * upstream).sum(), [t for t in inputs if t is not None])


def check_against_reference(backend, n, h, v, dtype, transform, *, bias):
    """Log-probs elementwise and gradients normwise against float64 of the same (rounded) inputs, within
    ``helpers.tolerance`` (for Triton's 16-bit cases: relative to the naive same-dtype computation's error)."""
    dev = device_for(backend)
    hidden, weight, labels, b = make_logprob_inputs(n, h, v, dtype, dev, bias=bias)
    g = torch.randn(n, dtype=torch.float64, device=dev)
    logp = ek.linear_logprobs(hidden, weight, labels, b, backend=backend, **transform)
    assert logp.shape == labels.shape
    assert logp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ref = reference_logprobs(hidden, weight, labels, b, **transform)
    want = grads_of(ref, (hidden, weight, b), g)
    naive = {}
    if backend == "triton" and dtype in (torch.bfloat16, torch.float16):
        nv = naive_logprobs(hidden, weight, labels, b, **transform)
        naive["logprobs"] = ((nv - ref).abs() / (1 + ref.abs())).max().item()
        naive["grad"] = max(rel_err(x, y) for x, y in zip(grads_of(nv, (hidden, weight, b), g), want, strict=True))
    tol_v = tolerance(dtype, backend, "logprobs", naive_error=naive.get("logprobs"))
    tol_g = tolerance(dtype, backend, "grad", naive_error=naive.get("grad"))
    assert torch.all(logp[labels == -100] == 0)
    torch.testing.assert_close(logp.double(), ref, rtol=tol_v, atol=tol_v)
    got = grads_of(logp, (hidden, weight, b), g)
    for name, x, y in zip(("hidden", "weight", "bias"), got, want, strict=False):
        assert x.dtype == dtype
        assert rel_err(x, y) < tol_g, f"d_{name}: relative error {rel_err(x, y):.2e} > {tol_g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("transform", list(TRANSFORMS), ids=str)
def test_matches_reference_fp32(backend, shape, transform):
    check_against_reference(backend, *shape, torch.float32, TRANSFORMS[transform], bias=shape[0] == 37)


# float64 is float64 throughout on the torch and native backends; Triton refuses it (see below).
FP64_BACKENDS = FP64_BACKEND_NAMES


@pytest.mark.parametrize("backend", FP64_BACKENDS)
@pytest.mark.parametrize("bias", [False, True])
def test_matches_reference_fp64(backend, bias):
    check_against_reference(backend, 37, 24, 100, torch.float64, TRANSFORMS["all"], bias=bias)


def test_triton_refuses_float64_and_the_default_routes_it_elsewhere():
    require_backend("triton", device_for("triton").type)
    # Triton scalars and (on GPUs) the kernels' accumulators are float32: a float64 call would be
    # silently ~1e-8 accurate, so an explicit request is refused and the default never picks Triton.
    dev = device_for("triton")
    hidden, weight, labels, _ = make_logprob_inputs(5, 8, 20, torch.float64, dev)
    with pytest.raises(ValueError, match="backend='triton' does not support float64"):
        ek.linear_logprobs(hidden, weight, labels, backend="triton")
    with pytest.raises(ValueError, match="backend='triton' does not support float64"):
        ek.linear_token_kl(hidden, weight, hidden.detach(), weight.detach(), labels, backend="triton")
    assert resolve_backend(None, dev, torch.float64) != "triton"


# The torch and native backends upcast bf16/fp16 tiles to float32 on any device; Triton's cases run on a
# GPU (skipped in the interpreter, conftest.py).
@pytest.mark.parametrize(
    "backend,dtype", backend_dtype_cases([torch.bfloat16, torch.float16]), ids=lambda x: str(x).replace("torch.", "")
)
@pytest.mark.parametrize("transform", ["plain", "all"])
def test_matches_reference_low_precision(backend, dtype, transform):
    # The reference sees the same rounded inputs, so only the op's own arithmetic is measured.
    check_against_reference(backend, 70, 40, 257, dtype, TRANSFORMS[transform], bias=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_match_reference(backend, monkeypatch):
    # V = 300 spans several vocabulary tiles of every backend (Triton: 32 in the interpreter, 128 on a GPU),
    # and the torch and native tiles are shrunk below it (their defaults are 8192): the statistics of
    # separate tiles are merged (ops/state.py's entropy / sum p^2 merge), over several token blocks too.
    monkeypatch.setattr(torch_backend, "TOKEN_CHUNK", 16)
    monkeypatch.setattr(torch_backend, "VOCAB_CHUNK", 64)
    shrink_native_tiles(monkeypatch, 16, 64)
    if backend == "triton":  # vocabulary splits whose partial states are merged after the kernel
        from expo_kernels.ops.triton import configs as triton_configs

        monkeypatch.setattr(triton_configs, "_choose_splits", lambda *a: 3)
    hidden, weight, labels, b = make_logprob_inputs(50, 24, 300, torch.float32, device_for(backend), bias=True)
    # Make some labels the argmax, and add a tie: duplicate rows give equal logits, and only the
    # first of equal maxima counts as the argmax (torch.argmax's convention).
    with torch.no_grad():
        weight[7] = weight[3]
        weight[3] *= 1.0
        top = (hidden @ weight.T + b).argmax(-1)
    labels[:20] = top[:20]
    labels[20:30] = -100
    transform = TRANSFORMS["all"]
    logp, stats = ek.linear_logprobs(hidden, weight, labels, b, backend=backend, return_stats=True, **transform)
    ref = reference_stats(hidden, weight, labels, b, **transform)
    for name in ("lse", "entropy", "mean_logit", "log_sum_p2"):
        value = getattr(stats, name)
        assert value.shape == labels.shape and not value.requires_grad
        tol = tolerance(torch.float32, backend, "stats")
        torch.testing.assert_close(value.double(), ref[name], rtol=tol, atol=tol, msg=name)
    assert stats.is_top1.dtype == torch.bool
    assert torch.equal(stats.is_top1, ref["is_top1"])
    assert stats.is_top1[:20].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_argmax_tie_counts_only_first(backend):
    dev = device_for(backend)
    hidden = torch.randn(4, 16, device=dev)
    weight = torch.randn(40, 16, device=dev)
    weight[5] = hidden[0] * 3  # make row 5 the clear winner for token 0
    weight[20] = weight[5]  # and row 20 tie with it
    labels = torch.tensor([5, 20, 1, 2], device=dev)
    _, stats = ek.linear_logprobs(hidden, weight, labels, backend=backend, return_stats=True)
    assert bool(stats.is_top1[0]) and not bool(stats.is_top1[1] and (hidden[1] @ weight.T).argmax() != 20)
    labels[0] = 20
    _, stats = ek.linear_logprobs(hidden, weight, labels, backend=backend, return_stats=True)
    assert not bool(stats.is_top1[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_tokens_ignored(backend):
    hidden, weight, labels, b = make_logprob_inputs(6, 8, 50, torch.float32, device_for(backend), bias=True)
    labels.fill_(-100)
    logp, stats = ek.linear_logprobs(hidden, weight, labels, b, backend=backend, return_stats=True)
    assert torch.equal(logp, torch.zeros_like(logp)) and not stats.is_top1.any()
    logp.sum().backward()
    for t in (hidden, weight, b):
        assert t.grad is not None and torch.count_nonzero(t.grad) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ignore_index_and_zero_grad_at_ignored_rows(backend):
    hidden, weight, labels, _ = make_logprob_inputs(20, 16, 64, torch.float32, device_for(backend), ignore_frac=0.0)
    labels[::3] = 7  # 7 is a valid vocabulary id; as ignore_index it must be skipped
    logp = ek.linear_logprobs(hidden, weight, labels, ignore_index=7, backend=backend)
    ref = reference_logprobs(hidden, weight, labels, ignore_index=7)
    torch.testing.assert_close(logp.double(), ref, rtol=2e-5, atol=2e-5)
    logp.sum().backward()
    assert torch.count_nonzero(hidden.grad[::3]) == 0 and torch.count_nonzero(hidden.grad[1::3]) > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_and_non_contiguous_hidden(backend):
    dev = device_for(backend)
    base = torch.randn(24, 3, 2, device=dev)  # [H, B, T] storage
    hidden = base.permute(1, 2, 0).requires_grad_()  # [B, T, H], non-contiguous view
    weight = torch.randn(45, 24, device=dev) * 0.3
    labels = torch.randint(0, 45, (3, 2), device=dev)
    assert not hidden.is_contiguous()
    logp = ek.linear_logprobs(hidden, weight, labels, backend=backend)
    assert logp.shape == (3, 2)
    ref = reference_logprobs(hidden, weight, labels)
    torch.testing.assert_close(logp.double(), ref, rtol=2e-5, atol=2e-5)
    (grad,) = torch.autograd.grad(logp.sum(), hidden)
    (grad_ref,) = torch.autograd.grad(ref.sum(), hidden)
    assert grad.shape == hidden.shape and rel_err(grad, grad_ref) < 2e-5


@pytest.mark.parametrize("backend", FP64_BACKENDS)
@pytest.mark.parametrize("transform", ["plain", "all"])
def test_gradcheck_float64(backend, transform):
    hidden, weight, labels, b = make_logprob_inputs(
        5, 6, 19, torch.float64, device_for(backend), bias=True, ignore_frac=0.3
    )
    labels[0] = 3

    def fn(h, w, bias):
        return ek.linear_logprobs(h, w, labels, bias, backend=backend, **TRANSFORMS[transform])

    # nondet_tol: the first backward uses the logits the forward kept, a repeated one recomputes them
    # (the same gradient up to float64 rounding; kernel_options(engine=False) recomputes every time)
    assert torch.autograd.gradcheck(fn, (hidden, weight, b), eps=1e-6, atol=1e-7, nondet_tol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_head_and_frozen_hidden(backend):
    hidden, weight, labels, _ = make_logprob_inputs(30, 16, 80, torch.float32, device_for(backend))
    weight.requires_grad_(False)
    logp = ek.linear_logprobs(hidden, weight, labels, backend=backend)
    logp.sum().backward()
    ref = reference_logprobs(hidden, weight, labels)
    (want,) = torch.autograd.grad(ref.sum(), hidden)
    assert weight.grad is None and rel_err(hidden.grad, want) < 2e-5

    hidden2 = hidden.detach()
    weight.requires_grad_(True)
    logp = ek.linear_logprobs(hidden2, weight, labels, backend=backend)
    logp.sum().backward()
    (want,) = torch.autograd.grad(reference_logprobs(hidden2, weight, labels).sum(), weight)
    assert rel_err(weight.grad, want) < 2e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_never_allocates_tokens_by_vocab(backend, monkeypatch):
    # Shapes where [N, V] dwarfs both [N, H] and [V, H]; the torch backend's tile is shrunk so
    # that it, too, is far below N x V (its default tile is larger than this whole problem).
    n, h, v = 96, 8, 640
    monkeypatch.setattr(torch_backend, "TOKEN_CHUNK", 32)
    monkeypatch.setattr(torch_backend, "VOCAB_CHUNK", 64)
    shrink_native_tiles(monkeypatch, 32, 64)
    dev = device_for(backend)
    hidden, weight, labels, b = make_logprob_inputs(n, h, v, torch.float32, dev, bias=True, ignore_frac=0.0)
    module = _backend_module(backend)
    transform = LogitTransform(2.0, 4.0, 0.9)
    # The chunked paths' logit workspace (kept logits; on CUDA the whole Triton op, which runs on library
    # GEMMs into it) is bounded by workspace_bytes, 1 GiB by default: capped at [V, H] here, below [N, V]
    # (so nothing is kept either) and at least one row of logits
    workspace = v * h * 4
    assert v * 4 <= workspace < n * v * 4
    with LargestTensor() as rec, ek.kernel_options(workspace_bytes=workspace):
        out = ops.forward(module, hidden.detach(), weight.detach(), b.detach(), labels, transform, True)
        module.backward(
            torch.ones(n, device=dev),
            hidden.detach(),
            weight.detach(),
            b.detach(),
            labels,
            out.lse,
            transform,
            True,
            True,
            True,
        )
        # ... and the public op end to end (the registered op is opaque to the mode, so its
        # internals are covered by the two calls above), with the workspace too small to keep the logits
        ek.linear_logprobs(hidden, weight, labels, b, backend=backend, return_stats=True)[0].sum().backward()
    # Nothing may exceed the float32 weight gradient [V, H]; [N, V] float32 would be 7.5x that.
    assert rec.largest <= v * h * 4, f"{rec.op} made a {rec.largest}-byte tensor; [N, V] fp32 is {n * v * 4}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile(backend):
    hidden, weight, labels, _ = make_logprob_inputs(20, 16, 50, torch.float32, device_for(backend))

    def step(h, w):
        return (ek.linear_logprobs(h, w, labels, backend=backend, softcap=4.0) * 0.5).sum()

    eager = step(hidden, weight)
    eager_grads = torch.autograd.grad(eager, (hidden, weight))
    # aot_eager traces through the fake implementations and the registered autograd without
    # paying for Inductor's C++ compilation on a 2-core CI machine.
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    out = compiled(hidden, weight)
    grads = torch.autograd.grad(out, (hidden, weight))
    torch.testing.assert_close(out, eager)
    for a, b in zip(grads, eager_grads, strict=False):
        torch.testing.assert_close(a, b)


def test_backend_selection(monkeypatch):
    monkeypatch.delenv("EXPO_KERNELS_BACKEND", raising=False)
    # CPU default: the native C++ backend when it is built, else the chunked torch backend.
    assert resolve_backend(None, torch.device("cpu")) == (
        "native" if "native" in ek.available_backends("cpu") else "torch"
    )
    dev = device_for("torch")
    monkeypatch.setenv("EXPO_KERNELS_BACKEND", "torch")
    assert resolve_backend(None, dev) == "torch"
    monkeypatch.setenv("EXPO_KERNELS_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="EXPO_KERNELS_BACKEND must be one of"):
        resolve_backend(None, dev)
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("fast", dev)


def test_triton_backend_refused_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="triton backend needs CUDA"):
        resolve_backend("triton", torch.device("cpu"))


# ---------------------------------------------------------------------------------------------
# The merge of partial states over vocabulary ranges (ops.state), at the state level: every backend's
# chunked forward and the vocabulary-parallel all-reduces use this arithmetic. Each range's state is built
# here in float64 from its definition (docs/design.md, "Online log-softmax"), not by a backend.
# ---------------------------------------------------------------------------------------------

# uneven ranges, with one-entry ranges (s == 1 exactly, the max's own term) away from the overall max
_RANGES = [(0, 1), (1, 6), (6, 7), (7, 19), (19, 20)]


def _reference_range_state(z, y, lo, hi):
    """float64 LogprobState (with statistics) of logits ``z [n, V]`` restricted to columns ``lo:hi``."""
    part = z[:, lo:hi]
    m = part.amax(dim=1)
    shift = torch.where(m > -math.inf, m, torch.zeros_like(m))
    e = torch.exp(part - shift[:, None])
    finite = part > -math.inf
    moved = torch.where(finite, part - shift[:, None], torch.zeros_like(part))
    cols = torch.arange(lo, hi, device="cpu")
    in_range = (cols[None, :] == y[:, None]).any(dim=1)
    z_label = torch.where(in_range, z.gather(1, y[:, None]).squeeze(1), torch.zeros_like(m))
    before = part.masked_fill(cols[None, :] >= y[:, None], -math.inf).amax(dim=1)
    return ops.state.LogprobState(
        m,
        e.sum(dim=1),
        z_label,
        sz=(e * moved).sum(dim=1),
        s2=(e * e).sum(dim=1),
        z_sum=torch.where(finite, part, torch.zeros_like(part)).sum(dim=1),
        max_before=before,
    )


def _ranged_logits(seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(6, 20, generator=g, dtype=torch.float64, device="cpu") * 3
    z[0, 0] = 9.0  # a one-entry range holds the max
    z[1, 19] = -7.0  # a one-entry range far below the max
    z[2, 7:19] = -math.inf  # a fully masked range
    y = torch.tensor([0, 19, 3, 6, 12, 6], device="cpu")
    return z, y


def test_merged_range_states_give_the_full_vocabulary_results():
    # the merge moves each range's sums to the common max: (m_k - M) s_k enters the entropy term, also for a
    # range whose sum is exactly 1 (one entry); a masked range (s = 0) adds nothing
    z, y = _ranged_logits()
    states = [_reference_range_state(z, y, lo, hi) for lo, hi in _RANGES]
    out = ops.state.finalize_logprobs(ops.state.merge_logprob_states(states), z.shape[1])
    logp = torch.log_softmax(z, dim=1)
    p = logp.exp()
    finite_z = torch.where(z > -math.inf, z, torch.zeros_like(z))
    tol = dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.lse, torch.logsumexp(z, dim=1), **tol)
    torch.testing.assert_close(out.logp, logp.gather(1, y[:, None]).squeeze(1), **tol)
    torch.testing.assert_close(out.entropy, -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(1), **tol)
    torch.testing.assert_close(out.mean_logit, finite_z.sum(1) / z.shape[1], **tol)
    torch.testing.assert_close(out.log_sum_p2, torch.log((p * p).sum(1)), **tol)
    assert out.is_top1.tolist() == (z.argmax(dim=1) == y).tolist()
    assert out.lse.dtype == torch.float64


def test_empty_states_are_the_merge_identity_in_their_dtype():
    z, y = _ranged_logits(1)
    full = _reference_range_state(z, y, 0, z.shape[1])
    for topk in (0, 1, 3):
        empty = ops.state.empty_logprob_state(z.shape[0], True, torch.float64, torch.device("cpu"), topk=topk)
        assert all(t.dtype == torch.float64 for t in empty[:7]), [t.dtype for t in empty[:7]]
        if topk == 0:
            assert empty.topk_values is None and empty.topk_ids is None
            merged = ops.state.merge_logprob_states([empty, full])
        else:
            assert empty.topk_values.shape == (z.shape[0], topk) and empty.topk_values.dtype == torch.float64
            assert empty.topk_ids.dtype == torch.int64
            assert bool((empty.topk_ids == ops.state.TOPK_PAD_ID).all())
            merged = ops.state.merge_logprob_states(
                [empty, full._replace(topk_values=empty.topk_values, topk_ids=empty.topk_ids)]
            )
        for got, want in zip(merged[:7], full[:7], strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    default = ops.state.empty_logprob_state(4, False, torch.float64, torch.device("cpu"))
    assert default.topk_values is None and default.sz is None and default.m.dtype == torch.float64
    kl_empty = ops.state.empty_token_kl_state(4, torch.float64, torch.device("cpu"))
    assert all(t.dtype == torch.float64 for t in kl_empty)


def _reference_range_token_kl_state(zp, zr, lo, hi):
    """float64 TokenKLState of the policy/reference logits restricted to columns ``lo:hi``."""
    p_part, r_part = zp[:, lo:hi], zr[:, lo:hi]
    m_p, m_r = p_part.amax(dim=1), r_part.amax(dim=1)
    er = torch.exp(r_part - m_r[:, None])
    cross = (er * ((r_part - m_r[:, None]) - (p_part - m_p[:, None]))).sum(dim=1)
    return ops.state.TokenKLState(m_p, torch.exp(p_part - m_p[:, None]).sum(dim=1), m_r, er.sum(dim=1), cross)


def test_merged_token_kl_states_give_the_full_vocabulary_kl():
    # each range's cross term is taken about its own maxima; the merge moves it by (m_r - M_r) - (m_p - M_p),
    # weighted by the range's reference mass, also where the policy's range sum is exactly 1
    g = torch.Generator().manual_seed(2)
    zp = torch.randn(5, 20, generator=g, dtype=torch.float64, device="cpu") * 2
    zr = zp + torch.randn(5, 20, generator=g, dtype=torch.float64, device="cpu")
    zp[0, 0], zr[0, 6] = 8.0, 6.0  # the maxima sit in one-entry ranges, different ones per head
    states = [_reference_range_token_kl_state(zp, zr, lo, hi) for lo, hi in _RANGES]
    kl, lse_p, lse_r = ops.state.finalize_token_kl(ops.state.merge_token_kl_states(states))
    log_q, log_p = torch.log_softmax(zr, 1), torch.log_softmax(zp, 1)
    tol = dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kl, (log_q.exp() * (log_q - log_p)).sum(1), **tol)
    torch.testing.assert_close(lse_p, torch.logsumexp(zp, 1), **tol)
    torch.testing.assert_close(lse_r, torch.logsumexp(zr, 1), **tol)


def test_torch_to_dz_caps_probabilities_at_one():
    # a logit recomputed by a GEMM of another shape can round a few ulps above the lse the forward found: the
    # probability exp(z - lse) is capped at 1 there (a hand-made lse 0.5 below the largest logit shows it)
    z = torch.tensor([[2.0, 0.0, -1.0]], dtype=torch.float64, device="cpu")
    lse = torch.tensor([1.5], dtype=torch.float64, device="cpu")
    ops.epilogues.torch_to_dz(
        z, torch.tensor([1], device="cpu"), lse, torch.ones(1, dtype=torch.float64, device="cpu"), ops.LogitTransform()
    )
    want = [-1.0, 1.0 - math.exp(-1.5), -math.exp(-2.5)]
    torch.testing.assert_close(z, torch.tensor([want], dtype=torch.float64, device="cpu"), rtol=1e-15, atol=0)


def test_ops_make_their_tensors_on_the_inputs_device_not_the_default():
    # a trainer may set another default device (torch.set_default_device): the ops' own tensors (empty states,
    # the fold's column ids) follow the device they are given or their inputs'. Under a "meta" default, a
    # tensor made without one would come out on meta.
    cpu = torch.device("cpu")
    with torch.device("meta"):
        lp = ops.state.empty_logprob_state(3, True, torch.float32, cpu, topk=2)
        kl = ops.state.empty_token_kl_state(3, torch.float64, cpu)
    assert all(t.device == cpu for t in (*lp, *kl) if t is not None)
    g = torch.Generator().manual_seed(17)
    z = torch.randn(5, 40, generator=g, dtype=torch.float64, device="cpu")
    labels = torch.randint(0, 40, (5,), generator=g, device="cpu")
    want, got = as_is_and_under_a_meta_default(
        lambda: ops.state.finalize_logprobs(
            ops.epilogues.torch_fold(z.clone(), None, labels, ops.LogitTransform(), True), 40
        )
    )
    for a, b in zip(got, want, strict=True):
        assert (a is None and b is None) or (a.device == cpu and torch.equal(a, b))

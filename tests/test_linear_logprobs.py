"""The fused op against an independent float64 reference, on every available backend.

A new backend inherits the whole file by appearing in ``available_backends``.
Tolerances: ``helpers.tolerance`` (one rule for every accuracy test), against float64 computed from the
same rounded inputs: float64 1e-10, float32 2e-5; bf16/fp16 on the CPU backends 1e-5 on the log-probs
and ``finfo(dtype).eps`` normwise on the gradients (returned in the input dtype); Triton's 16-bit
cases no worse than the naive same-dtype computation. With TRITON_INTERPRET=1 on CPU, Triton runs fp32 only here (bf16
arithmetic is wrong in the interpreter, DESIGN.md section 6: those cases are skipped, with that reason);
a GPU runs it in bf16 too. Every tensor is made on ``helpers.device_for(backend)``.
"""

import pytest
import torch
from conftest import require_backend
from helpers import (
    BACKEND_NAMES,
    FP64_BACKEND_NAMES,
    TRANSFORMS,
    LargestTensor,
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

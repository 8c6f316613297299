"""The fused two-head token KL(pi_ref || pi_theta) against a float64 materialized reference."""

import math

import pytest
import torch
from helpers import (
    BACKEND_NAMES,
    FP64_BACKEND_NAMES,
    TRANSFORMS,
    LargestTensor,
    backend_dtype_cases,
    device_for,
    rel_err,
    shrink_native_tiles,
)
from reference import reference_token_kl

import expo_kernels as ek
from expo_kernels import ops
from expo_kernels._dispatch import backend_module
from expo_kernels.ops import LogitTransform

BACKENDS = BACKEND_NAMES


def make(n, h, hr, v, dtype, device, bias=True):
    hidden = torch.randn(n, h, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(v, h, device=device, dtype=dtype) / h**0.5).requires_grad_()
    b = (torch.randn(v, device=device, dtype=dtype) * 0.3).requires_grad_() if bias else None
    ref_hidden = torch.randn(n, hr, device=device, dtype=dtype)
    ref_weight = torch.randn(v, hr, device=device, dtype=dtype) / hr**0.5
    ref_bias = torch.randn(v, device=device, dtype=dtype) * 0.3 if bias else None
    labels = torch.randint(0, v, (n,), device=device)
    labels[::4] = -100
    return hidden, weight, b, ref_hidden, ref_weight, ref_bias, labels


TOL = {torch.float32: 2e-5, torch.float64: 1e-10}


# float64 is not parametrized for Triton (test_linear_logprobs.test_triton_refuses_float64...)
@pytest.mark.parametrize("backend,dtype", backend_dtype_cases(TOL), ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("transform", ["plain", "all"])
def test_token_kl_matches_reference(backend, transform, dtype):
    tol = TOL[dtype]
    dev = device_for(backend)
    # Reference head with a different hidden size (a smaller reference model is allowed).
    hidden, weight, b, ref_hidden, ref_weight, ref_bias, labels = make(37, 24, 20, 100, dtype, dev)
    kl = ek.linear_token_kl(
        hidden, weight, ref_hidden, ref_weight, labels, b, ref_bias, backend=backend, **TRANSFORMS[transform]
    )
    ref = reference_token_kl(hidden, weight, ref_hidden, ref_weight, labels, b, ref_bias, **TRANSFORMS[transform])
    assert kl.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert (kl[labels != -100] > 0).all() and (kl[labels == -100] == 0).all()
    torch.testing.assert_close(kl.double(), ref, rtol=tol, atol=tol)
    g = torch.randn(37, dtype=torch.float64, device=dev)
    got = torch.autograd.grad((kl.double() * g).sum(), (hidden, weight, b))
    want = torch.autograd.grad((ref * g).sum(), (hidden, weight, b))
    for name, x, y in zip(("hidden", "weight", "bias"), got, want, strict=False):
        assert rel_err(x, y) < tol, f"d_{name}: {rel_err(x, y):.2e}"


MASKED = [3, 17, 49]  # vocabulary ids with a -inf bias (e.g. tokens a tokenizer never emits)


@pytest.mark.parametrize("backend,dtype", backend_dtype_cases(TOL), ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("masked", ["both", "reference_only", "policy_only"])
def test_token_kl_masked_vocabulary_matches_reference(backend, dtype, masked):
    """``-inf`` bias entries, the value against float64 (``reference.reference_token_kl``):

    * both heads mask the same ids: those carry q = p = 0 and add nothing; the KL over the rest is finite
      and equals float64, gradients included (the masked bias entries get exactly 0);
    * the reference masks ids the policy keeps (q = 0 < p): finite, equals float64, gradients included;
    * the policy masks an id the reference keeps (p = 0 < q): KL = +inf at every counted token (0 at
      ignored ones), as float64 says.
    """
    tol = TOL[dtype]
    dev = device_for(backend)
    hidden, weight, b, ref_hidden, ref_weight, ref_bias, labels = make(13, 24, 20, 60, dtype, dev)
    with torch.no_grad():
        if masked in ("both", "policy_only"):
            b[MASKED] = -math.inf
        if masked in ("both", "reference_only"):
            ref_bias[MASKED] = -math.inf
        if masked == "policy_only":
            b[7] = -math.inf  # one more than the reference masks
    tf = dict(temperature=1.3, logit_scale=2.0)  # no softcap: it maps a -inf logit to -softcap, unmasking it
    kl = ek.linear_token_kl(hidden, weight, ref_hidden, ref_weight, labels, b, ref_bias, backend=backend, **tf)
    ref = reference_token_kl(hidden, weight, ref_hidden, ref_weight, labels, b, ref_bias, **tf)
    counted = labels != -100
    assert (kl[~counted] == 0).all() and (ref[~counted] == 0).all()
    if masked == "policy_only":
        assert (ref[counted] == math.inf).all()  # the reference itself says +inf
        assert (kl[counted] == math.inf).all(), kl
    else:
        _assert_finite_kl_matches(kl, ref, (hidden, weight, b), counted, tol, dev)
    if masked == "both":
        assert (torch.autograd.grad(kl.sum(), b)[0][MASKED] == 0).all()  # p = q = 0 there: p - q = 0


def _assert_finite_kl_matches(kl, ref, leaves, counted, tol, dev):
    """A finite KL equals the float64 reference, and so do its gradients (normwise)."""
    assert torch.isfinite(ref).all() and (ref[counted] > 0).all()
    torch.testing.assert_close(kl.double(), ref, rtol=tol, atol=tol)
    g = torch.randn(kl.shape, dtype=torch.float64, device=dev)
    got = torch.autograd.grad((kl.double() * g).sum(), leaves, retain_graph=True)
    want = torch.autograd.grad((ref * g).sum(), leaves)
    for name, x, y in zip(("hidden", "weight", "bias"), got, want, strict=True):
        assert torch.isfinite(x).all(), f"d_{name} is not finite"
        assert rel_err(x, y) < tol, f"d_{name}: {rel_err(x, y):.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_kl_is_zero_for_identical_heads(backend):
    hidden, weight, _, _, _, _, labels = make(20, 16, 16, 64, torch.float32, device_for(backend), bias=False)
    kl = ek.linear_token_kl(hidden, weight, hidden.detach(), weight.detach(), labels, backend=backend)
    assert kl.abs().max() < 1e-5
    (grad,) = torch.autograd.grad(kl.sum(), hidden)
    assert grad.abs().max() < 1e-5  # p - q = 0 everywhere


@pytest.mark.parametrize("backend", FP64_BACKEND_NAMES)  # float64: not on Triton
def test_token_kl_gradcheck(backend):
    hidden, weight, b, ref_hidden, ref_weight, ref_bias, labels = make(5, 6, 4, 17, torch.float64, device_for(backend))

    def fn(h, w, bias):
        return ek.linear_token_kl(h, w, ref_hidden, ref_weight, labels, bias, ref_bias, backend=backend, softcap=3.0)

    assert torch.autograd.gradcheck(fn, (hidden, weight, b), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_kl_never_allocates_tokens_by_vocab(backend, monkeypatch):
    from expo_kernels.ops import torch_backend

    n, h, v = 96, 8, 640
    monkeypatch.setattr(torch_backend, "TOKEN_CHUNK", 32)
    monkeypatch.setattr(torch_backend, "VOCAB_CHUNK", 64)
    shrink_native_tiles(monkeypatch, 32, 64)
    dev = device_for(backend)
    hidden, weight, b, ref_hidden, ref_weight, ref_bias, _ = make(n, h, h, v, torch.float32, dev)
    args = (hidden.detach(), weight.detach(), b.detach(), ref_hidden, ref_weight, ref_bias)
    module = backend_module(backend)
    transform = LogitTransform(1.0, 5.0, 1.0)
    with LargestTensor() as rec:
        kl, lse_p, lse_r = ops.token_kl_forward(module, *args, transform)
        module.token_kl_backward(torch.ones(n, device=dev), *args, lse_p, lse_r, transform, True, True, True)
    assert rec.largest <= v * h * 4, f"{rec.op} made a {rec.largest}-byte tensor; [N, V] fp32 is {n * v * 4}"


def test_token_kl_bad_input():
    hidden, weight, _, ref_hidden, ref_weight, _, labels = make(
        6, 8, 8, 30, torch.float32, device_for("torch"), bias=False
    )
    with pytest.raises(ValueError, match="ref_weight must have shape"):
        ek.linear_token_kl(hidden, weight, ref_hidden, ref_weight[:, :5], labels)
    with pytest.raises(ValueError, match="ref_weight must have the policy's vocabulary size V = 30"):
        ek.linear_token_kl(hidden, weight, ref_hidden, ref_weight[:20], labels)
    with pytest.raises(TypeError, match="ref_hidden.dtype"):
        ek.linear_token_kl(hidden, weight, ref_hidden.double(), ref_weight.double(), labels)
    with pytest.raises(RuntimeError, match="reference head is frozen"):
        ek.linear_token_kl(hidden, weight, ref_hidden.requires_grad_(), ref_weight, labels).sum().backward()

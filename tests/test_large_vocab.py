"""Gemma-3-sized heads: V = 262,144 with a softcap of 30, at a small token count.

A vocabulary this wide is many tiles of every backend (and, for the kept-logits path, a workspace
that still fits 16 tokens), so the tile merges, the softcap's derivative and the float32 statistics
run at the scale where a lost bit of the running sums would show. Everything is compared with
float64 materialized logits of the same inputs, within the float32 tolerance (``helpers.tolerance``).
"""

import pytest
import torch
from helpers import device_for, rel_err, tolerance
from reference import logits64, reference_logprobs, reference_stats

import expo_kernels as ek

V, H, N = 262_144, 32, 16
SOFTCAP = 30.0


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(N, H, generator=g)
    # logits of a few units, so the softcap bends some of them (|raw| up to ~40 > 30)
    weight = torch.randn(V, H, generator=g) * (6.0 / H**0.5)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::5] = -100
    grad = torch.randn(N, generator=g, dtype=torch.float64)
    return hidden, weight, labels, grad


@pytest.fixture(scope="module")
def want(inputs):
    hidden, weight, labels, grad = inputs
    h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    logp = reference_logprobs(h, w, labels, softcap=SOFTCAP)
    d_h, d_w = torch.autograd.grad((logp * grad).sum(), (h, w))
    assert logits64(hidden, weight).abs().max() > 0.6 * SOFTCAP  # raw logits the cap bends (tanh(0.6) = 0.54)
    return logp.detach(), reference_stats(hidden, weight, labels, softcap=SOFTCAP), d_h, d_w


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("path", ["fused", "kept_logits"])
def test_gemma3_sized_head_matches_float64(inputs, want, backend, path):
    hidden, weight, labels, grad = inputs
    dev = device_for(backend)
    h = hidden.to(dev, copy=True).requires_grad_()
    w = weight.to(dev, copy=True).requires_grad_()
    with ek.kernel_options(path=path):
        logp, stats = ek.linear_logprobs(h, w, labels.to(dev), softcap=SOFTCAP, return_stats=True, backend=backend)
    (logp.double() * grad.to(dev)).sum().backward()
    want_logp, want_stats, want_dh, want_dw = want
    tol = tolerance(torch.float32, backend, "logprobs")
    assert rel_err(logp.cpu(), want_logp) < tol
    for name in ("entropy", "mean_logit", "log_sum_p2"):
        assert rel_err(getattr(stats, name).cpu(), want_stats[name]) < tol, name
    assert torch.equal(stats.is_top1.cpu(), want_stats["is_top1"])
    grad_tol = tolerance(torch.float32, backend, "grad")
    assert rel_err(h.grad.cpu(), want_dh) < grad_tol
    assert rel_err(w.grad.cpu(), want_dw) < grad_tol

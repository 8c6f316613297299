"""Mixed precision: the op, the token KL and the loss modules follow ``torch.autocast`` as ``nn.Linear``
does (docs/design.md, "Mixed precision").

The model of every case: float32 master weights, hidden states from a float32 layer run under
``torch.autocast("cpu", dtype=torch.bfloat16)`` (bfloat16), the float32 LM head passed as it is. Inside
the region the GEMM operands are cast to bfloat16; the results are float32 and the gradients reach the
float32 masters in float32. Each result is compared with

* float64 of the same bfloat16-rounded operands (``helpers.tolerance(bfloat16, backend, ...)``: the
  fused backends upcast the rounded operands and accumulate in float32), and
* the unfused model under the same autocast (``lm_head(h)`` + ``log_softmax``), whose bfloat16 logits
  are themselves one bfloat16 rounding off: within ``tolerance(bfloat16, backend, "grad")`` (the bfloat16
  epsilon) for values and gradients alike.

Outside autocast mixed dtypes keep their ``TypeError``. The CUDA cases (bfloat16 autocast; float16 with
``torch.amp.GradScaler``) run on a GPU only.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err, tolerance
from reference import reference_logprobs, reference_token_kl

import expo_kernels as ek
from expo_kernels import _dispatch as D
from expo_kernels.ops.options import Path

BF16 = torch.bfloat16
B, T, H, V = 2, 7, 16, 48
CPU_BACKENDS = ("native", "torch")  # bf16 Triton arithmetic is wrong in the CPU interpreter


def _model(seed: int = 0, h: int = H, v: int = V, device: str | torch.device = "cpu"):
    g = torch.Generator().manual_seed(seed)
    proj = torch.nn.Linear(h, h)
    head = torch.nn.Linear(h, v, bias=True)
    with torch.no_grad():
        proj.weight.copy_(torch.randn(h, h, generator=g) / h**0.5)
        head.weight.copy_(0.5 * torch.randn(v, h, generator=g))
        head.bias.copy_(0.1 * torch.randn(v, generator=g))
    x = torch.randn(2 * B, T, h, generator=g)
    rx = torch.randn(2 * B, T, h, generator=g)
    y = torch.randint(0, v, (2 * B, T), generator=g)
    y[:, :2] = -100  # a prompt
    y[0, -1] = -100  # padding
    return proj.to(device), head.to(device), x.to(device), rx.to(device), y.to(device)


def _unfused_logprobs(head, h, y):
    """What a model computes without the library: ``lm_head(h)`` (under the caller's autocast), then a
    float32 log-softmax and the gather."""
    logp = torch.log_softmax(head(h).float(), dim=-1).gather(-1, y.clamp(min=0)[..., None]).squeeze(-1)
    return torch.where(y != -100, logp, torch.zeros_like(logp))


def _grads(out, *params):
    return torch.autograd.grad(out, params, retain_graph=True)


def _leaf64(t):
    return t.detach().to(BF16).double().requires_grad_()


# ------------------------------------------------------------------------------------------------------
# the op
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_linear_logprobs_under_autocast(backend):
    proj, head, x, _, y = _model()
    with torch.autocast("cpu", dtype=BF16):
        h = torch.tanh(proj(x))
        assert h.dtype == BF16 and head.weight.dtype == torch.float32
        logp = ek.linear_logprobs(h, head.weight, y, head.bias, backend=backend)
        unfused = _unfused_logprobs(head, h, y)
    assert logp.dtype == torch.float32 and logp.shape == y.shape
    params = (head.weight, head.bias, proj.weight)
    g = _grads(logp.sum(), *params)
    assert all(t.dtype == torch.float32 for t in g)  # the float32 masters get float32 gradients

    # against float64 of the bfloat16 operands the call computed with
    h64, w64, b64 = _leaf64(h), _leaf64(head.weight), _leaf64(head.bias)
    ref = reference_logprobs(h64, w64, y, b64)
    assert rel_err(logp, ref) <= tolerance(BF16, backend, "logprobs")
    gh64, gw64, gb64 = torch.autograd.grad(ref.sum(), (h64, w64, b64))
    assert rel_err(g[0], gw64) <= tolerance(BF16, backend, "grad")
    assert rel_err(g[1], gb64) <= tolerance(BF16, backend, "grad")
    (gh,) = torch.autograd.grad(logp.sum(), h, retain_graph=True)
    assert gh.dtype == BF16 and rel_err(gh, gh64) <= tolerance(BF16, backend, "grad")

    # against the unfused model under the same autocast (its logits are rounded to bfloat16)
    eps = tolerance(BF16, backend, "grad")
    assert rel_err(logp, unfused) <= eps
    for a, b in zip(g, _grads(unfused.sum(), *params), strict=True):
        assert rel_err(a, b) <= eps


def test_autocast_call_is_the_bf16_call():
    """Inside the region the call is the explicit bfloat16 call, bit for bit (with the statistics)."""
    _, head, x, _, y = _model()
    w = head.weight.detach().requires_grad_()
    with torch.autocast("cpu", dtype=BF16):
        logp, stats = ek.linear_logprobs(x, w, y, return_stats=True)
    (g,) = torch.autograd.grad(logp.sum(), w)
    w16 = w.detach().to(BF16).requires_grad_()
    logp16, stats16 = ek.linear_logprobs(x.to(BF16), w16, y, return_stats=True)
    (g16,) = torch.autograd.grad(logp16.sum(), w16)
    torch.testing.assert_close(logp, logp16, atol=0, rtol=0)
    torch.testing.assert_close(stats.entropy, stats16.entropy, atol=0, rtol=0)
    torch.testing.assert_close(g, g16.float(), atol=0, rtol=0)
    assert g.dtype == torch.float32


def test_topk_under_autocast():
    """The top-k values re-evaluated outside the op stay float32 (no autocast recast of their GEMV)."""
    _, head, x, _, y = _model()
    with torch.autocast("cpu", dtype=BF16):
        _, stats = ek.linear_logprobs(x, head.weight, y, head.bias, return_stats=True, topk=3)
    _, stats16 = ek.linear_logprobs(x.to(BF16), head.weight.to(BF16), y, head.bias.to(BF16), return_stats=True, topk=3)
    assert stats.topk_values.dtype == torch.float32
    torch.testing.assert_close(stats.topk_values, stats16.topk_values, atol=0, rtol=0)
    assert torch.equal(stats.topk_indices, stats16.topk_indices)


def test_backward_inside_the_region_keeps_float32_accumulation():
    """The registered ops step out of autocast (autograd.py, ``_autocast_transparent``): a backward run
    inside the region, or the op called directly, computes exactly as outside it (the torch backend's
    float32 GEMMs would otherwise run in bfloat16)."""
    _, head, x, _, y = _model()
    h = x.to(BF16).requires_grad_()
    w = head.weight.detach().to(BF16).requires_grad_()
    outside = torch.autograd.grad(ek.linear_logprobs(h, w, y, backend="torch").sum(), (h, w))
    with torch.autocast("cpu", dtype=BF16):
        inside = torch.autograd.grad(ek.linear_logprobs(h, w, y, backend="torch").sum(), (h, w))
    for a, b in zip(inside, outside, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    # the op itself casts nothing: float32 operands called directly stay float32 inside a region
    args = (x.reshape(-1, H), head.weight.detach(), None, y.reshape(-1), -100, 1.0, None, 1.0, False, 0)
    eager = torch.ops.expo_kernels.linear_logprobs(*args, "torch", "fused")[0]
    with torch.autocast("cpu", dtype=BF16):
        direct = torch.ops.expo_kernels.linear_logprobs(*args, "torch", "fused")[0]
    torch.testing.assert_close(direct, eager, atol=0, rtol=0)


def test_float64_is_left_alone():
    """Autocast leaves float64 tensors as they are (as for ``F.linear``): gradcheck-style calls too."""
    _, head, x, _, y = _model()
    h, w = x.double(), head.weight.detach().double()
    with torch.autocast("cpu", dtype=BF16):
        got = ek.linear_logprobs(h, w, y)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ek.linear_logprobs(h, w, y), atol=0, rtol=0)


def test_mixed_dtypes_outside_autocast_raise():
    _, head, x, rx, y = _model()
    h = x.to(BF16)
    with pytest.raises(TypeError, match=r"weight.dtype \(torch.float32\) must match hidden.dtype \(torch.bfloat16\)"):
        ek.linear_logprobs(h, head.weight, y)
    with pytest.raises(TypeError, match="must match"):
        ek.linear_token_kl(h, head.weight, rx, head.weight.detach(), y)
    with pytest.raises(TypeError, match="must match"):
        ek.FusedLinearDPOLoss(beta=0.1)(head.weight, h, y, ref_hidden=rx.to(BF16))


# ------------------------------------------------------------------------------------------------------
# the plan: a float32 call inside the region is a bfloat16 call
# ------------------------------------------------------------------------------------------------------
def test_plan_follows_autocast():
    proj, head, x, _, y = _model()
    h = torch.tanh(proj(x))
    assert D.autocast_dtype("cpu") is None and D.cast_dtype(h) == torch.float32
    outside = D.plan_linear_logprobs(h, head.weight)
    dpo = ek.FusedLinearDPOLoss(beta=0.1)
    assert outside.path is Path.KEPT_LOGITS  # a float32 CPU head with a gradient: its logits kept
    assert dpo.plan_for(head.weight, h, labels=y).path is Path.PAIR_ENGINE
    with torch.autocast("cpu", dtype=BF16):
        assert D.autocast_dtype("cpu") == BF16 and D.cast_dtype(h) == BF16
        assert D.cast_dtype(h.double()) == torch.float64 and D.cast_dtype(y) == y.dtype
        inside = D.plan_linear_logprobs(h, head.weight)
        step = dpo.plan_for(head.weight, h, labels=y)
    # bfloat16 heads on the CPU take the op's fused kernels (no float32-output 16-bit GEMM there)
    expected = D.plan("cpu", BF16, tokens=h.shape[0] * h.shape[1], vocab=V, needs_grad=True)
    assert inside == expected and inside.path is Path.FUSED
    assert step.path is Path.FUSED and "bfloat16 head on the CPU" in step.reason


# ------------------------------------------------------------------------------------------------------
# the token KL
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_token_kl_under_autocast(backend):
    proj, head, x, rx, y = _model()
    ref_head = torch.nn.Linear(H, V)
    with torch.autocast("cpu", dtype=BF16):
        h = torch.tanh(proj(x))
        rh = torch.tanh(proj(rx)).detach()
        kl = ek.linear_token_kl(h, head.weight, rh, ref_head.weight.detach(), y, head.bias, backend=backend)
    assert kl.dtype == torch.float32
    gw, gb = _grads(kl.sum(), head.weight, head.bias)
    assert gw.dtype == torch.float32
    h64, w64, b64 = _leaf64(h), _leaf64(head.weight), _leaf64(head.bias)
    ref = reference_token_kl(h64, w64, _leaf64(rh).detach(), _leaf64(ref_head.weight).detach(), y, b64)
    assert rel_err(kl, ref) <= tolerance(BF16, backend, "logprobs")
    gw64, gb64 = torch.autograd.grad(ref.sum(), (w64, b64))
    assert rel_err(gw, gw64) <= tolerance(BF16, backend, "grad")
    assert rel_err(gb, gb64) <= tolerance(BF16, backend, "grad")


# ------------------------------------------------------------------------------------------------------
# the modules
# ------------------------------------------------------------------------------------------------------
def _unfused_dpo(head, h, rh, y, beta):
    mask = y != -100
    seq = (_unfused_logprobs(head, h, y) * mask).sum(-1)
    ref = (_unfused_logprobs(head, rh, y) * mask).sum(-1).detach()
    margin = (seq[:B] - ref[:B]) - (seq[B:] - ref[B:])
    return -F.logsigmoid(beta * margin).mean()


def _dpo64(h, w, b, rh, y, beta):
    seq = reference_logprobs(h, w, y, b).sum(-1)
    ref = reference_logprobs(rh, w.detach(), y, b.detach()).sum(-1)
    margin = (seq[:B] - ref[:B]) - (seq[B:] - ref[B:])
    return -F.logsigmoid(beta * margin).mean()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dpo_module_step_under_autocast(backend):
    proj, head, x, rx, y = _model()
    dpo = ek.FusedLinearDPOLoss(beta=0.5, backend=backend)
    opt = torch.optim.SGD([*proj.parameters(), *head.parameters()], lr=0.1)
    with torch.autocast("cpu", dtype=BF16):
        h = torch.tanh(proj(x))
        rh = torch.tanh(proj(rx)).detach()
        out = dpo(head.weight, h, y, bias=head.bias, ref_hidden=rh)
        unfused = _unfused_dpo(head, h, rh, y, 0.5)
    assert out.loss.dtype == torch.float32
    params = (head.weight, head.bias, proj.weight)
    g, g_unfused = _grads(out.loss, *params), _grads(unfused, *params)
    eps = tolerance(BF16, backend, "grad")
    assert rel_err(out.loss, unfused) <= eps
    for a, b in zip(g, g_unfused, strict=True):
        assert a.dtype == torch.float32 and rel_err(a, b) <= eps

    h64, w64, b64 = _leaf64(h), _leaf64(head.weight), _leaf64(head.bias)
    loss64 = _dpo64(h64, w64, b64, _leaf64(rh).detach(), y, 0.5)
    assert rel_err(out.loss, loss64) <= tolerance(BF16, backend, "logprobs")
    for a, b in zip(g[:2], torch.autograd.grad(loss64, (w64, b64)), strict=True):
        assert rel_err(a, b) <= tolerance(BF16, backend, "grad")

    # a training step: .grad of the float32 masters is float32, the optimizer runs as usual
    opt.zero_grad()
    out.loss.backward()
    assert head.weight.grad is not None and head.weight.grad.dtype == torch.float32
    assert proj.weight.grad is not None and proj.weight.grad.dtype == torch.float32
    opt.step()
    assert head.weight.dtype == torch.float32


def _explicit(module, head, x, y, **kw):
    """``module`` on explicitly cast bfloat16 operands, outside autocast: (loss, d_weight)."""
    w16 = head.weight.detach().to(BF16).requires_grad_()
    kw = {k: v.to(BF16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kw.items()}
    out = module(w16, x.to(BF16), y, **kw)
    return out.loss, torch.autograd.grad(out.loss, w16)[0].float()


def _autocast(module, head, x, y, **kw):
    w = head.weight.detach().requires_grad_()
    with torch.autocast("cpu", dtype=BF16):
        out = module(w, x, y, **kw)
    (g,) = torch.autograd.grad(out.loss, w)
    assert g.dtype == torch.float32
    return out.loss, g


def _module_cases():
    kto_kw = lambda rx, y: dict(  # noqa: E731
        ref_hidden=rx,
        is_desirable=torch.tensor([True, False, True, False]),
        kl_hidden=rx + 0.5,
        kl_labels=y,
        ref_kl_hidden=rx - 0.5,
    )
    return {
        "dpo": (lambda: ek.FusedLinearDPOLoss(beta=0.1), lambda rx, y: dict(ref_hidden=rx)),
        "expo_token_kl": (
            lambda: ek.FusedLinearEXPOLoss(lam=0.1, kl_estimator="token"),
            lambda rx, y: dict(ref_hidden=rx),
        ),
        "simpo": (lambda: ek.FusedLinearSimPOLoss(), lambda rx, y: {}),
        "kto": (lambda: ek.FusedLinearPreferenceLoss("kto"), kto_kw),
        "cringe": (lambda: ek.FusedLinearCRINGELoss(), lambda rx, y: dict(generator=torch.Generator().manual_seed(0))),
    }


@pytest.mark.parametrize("name", list(_module_cases()))
def test_every_module_under_autocast_is_its_bf16_call(name):
    """Each loss module inside the region computes exactly what it computes on bfloat16 operands."""
    make, kwargs = _module_cases()[name]
    _, head, x, rx, y = _model()
    loss, g = _autocast(make(), head, x, y, **kwargs(rx, y))
    loss16, g16 = _explicit(make(), head, x, y, **kwargs(rx, y))  # (CRINGE: a fresh generator, same seed)
    torch.testing.assert_close(loss, loss16, atol=0, rtol=0)
    torch.testing.assert_close(g, g16, atol=0, rtol=0)


def test_ranking_module_under_autocast():
    _, head, _, _, _ = _model()
    g = torch.Generator().manual_seed(3)
    k = 3
    x = torch.randn(B, k, T, H, generator=g)
    y = torch.randint(0, V, (B, k, T), generator=g)
    y[..., :2] = -100
    rewards = torch.randn(B, k, generator=g, dtype=torch.float64)
    mod = ek.FusedLinearRankingLoss("rrhf")
    w = head.weight.detach().requires_grad_()
    with torch.autocast("cpu", dtype=BF16):
        out = mod(w, x, y, rewards)
    (gw,) = torch.autograd.grad(out.loss, w)
    w16 = head.weight.detach().to(BF16).requires_grad_()
    out16 = mod(w16, x.to(BF16), y, rewards)  # the rewards are not an operand: never cast
    (gw16,) = torch.autograd.grad(out16.loss, w16)
    assert gw.dtype == torch.float32
    torch.testing.assert_close(out.loss, out16.loss, atol=0, rtol=0)
    torch.testing.assert_close(gw, gw16.float(), atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------------
# torch.compile: the cast is traced with the call (dynamo guards on the autocast state)
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fullgraph", [False, True])
@pytest.mark.parametrize("what", ["op", "dpo"])
def test_compiled_under_autocast_matches_eager(what, fullgraph):
    pytest.importorskip("torch._dynamo")
    proj, head, x, rx, y = _model()
    dpo = ek.FusedLinearDPOLoss(beta=0.1, compute_metrics=False)

    def step(x):
        h = torch.tanh(proj(x))
        if what == "op":
            return ek.linear_logprobs(h, head.weight, y, head.bias).sum()
        return dpo(head.weight, h, y, bias=head.bias, ref_hidden=torch.tanh(proj(rx)).detach()).loss

    params = (head.weight, head.bias, proj.weight)
    torch._dynamo.reset()
    try:
        with torch.autocast("cpu", dtype=BF16):
            eager = step(x)
            compiled = torch.compile(step, backend="aot_eager", fullgraph=fullgraph)(x)
        for a, b in zip(_grads(compiled, *params), _grads(eager, *params), strict=True):
            assert a.dtype == torch.float32
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-6)
    finally:
        torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------------
# CUDA: bfloat16 autocast, and float16 autocast with a GradScaler
# ------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA autocast (bfloat16, float16 + GradScaler) needs a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_autocast_training_step(dtype):
    """A DPO step of a small model under CUDA autocast: the fused loss against the unfused one, and with
    float16 a ``GradScaler`` step: no inf/NaN in the fused gradients where the unfused model has none."""
    dev = torch.device("cuda")
    hs, vs = 64, 1024
    proj, head, x, rx, y = _model(h=hs, v=vs, device=dev)
    params = [*proj.parameters(), *head.parameters()]
    dpo = ek.FusedLinearDPOLoss(beta=0.1)
    results = {}
    for fused in (True, False):
        for p in params:
            p.grad = None
        scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
        with torch.autocast("cuda", dtype=dtype):
            h = torch.tanh(proj(x))
            rh = torch.tanh(proj(rx)).detach()
            if fused:
                loss = dpo(head.weight, h, y, bias=head.bias, ref_hidden=rh).loss
            else:
                loss = _unfused_dpo(head, h, rh, y, 0.1)
        assert loss.dtype == torch.float32
        scaler.scale(loss).backward()
        opt = torch.optim.SGD(params, lr=0.0)
        scaler.unscale_(opt)
        grads = [p.grad.clone() for p in params]
        assert all(g.dtype == torch.float32 for g in grads)
        results[fused] = (loss.detach(), grads)
    (loss_f, grads_f), (loss_u, grads_u) = results[True], results[False]
    assert bool(torch.isfinite(loss_f)) or not bool(torch.isfinite(loss_u))
    for gf, gu in zip(grads_f, grads_u, strict=True):
        assert bool(torch.isfinite(gf).all()) or not bool(torch.isfinite(gu).all())
    # both are one 16-bit rounding of the logits (unfused) or of the operands and gradients (fused) off
    bound = 8 * torch.finfo(dtype).eps
    assert rel_err(loss_f, loss_u) <= bound
    for gf, gu in zip(grads_f, grads_u, strict=True):
        if bool(torch.isfinite(gu).all()):
            assert rel_err(gf, gu) <= bound

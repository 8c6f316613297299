"""FusedLinearPreferenceLoss against the unfused path, for every registered loss.

Unfused = what a plain trainer does, in float64: materialize the logits ``hidden @ W.T + b``, apply
the transform, ``log_softmax``, gather the labels, sum over completion tokens per row, then apply
the paper's formula written by hand in float64 (``tests/reference.py``; never the library's own loss
functions, so a mistake in a formula cannot cancel). Loss, metrics and the gradients of
hidden, weight and bias must agree. Tensors live on ``helpers.device_for(backend)`` (CUDA for the torch
and Triton backends on a GPU machine).
"""

from __future__ import annotations

import pytest
import reference
import torch
from conftest import triton_available
from helpers import device_for
from reference import REFERENCE_LOSSES, reference_module_loss

import expo_kernels as ek
from expo_kernels.losses import LOSSES

DT = torch.float64
B, T, H, V = 3, 6, 16, 37
IGNORE = -100
TOL = dict(rtol=1e-9, atol=1e-11)  # float64 torch backend vs float64 materialized logits
DEV = device_for("torch")  # the device of the tests that run the torch backend

# hyperparameters per loss (non-defaults where a default would hide a mistake)
HP = {
    "sigmoid": dict(beta=0.3, label_smoothing=0.1),
    "hinge": dict(beta=0.2),
    "ipo": dict(beta=0.5),
    "exo_pair": dict(beta=0.3, label_smoothing=1e-3),
    "nca_pair": dict(beta=0.3),
    "robust": dict(beta=0.3, label_smoothing=0.1),
    "ropo": dict(beta=0.3, alpha=6.0),
    "bco_pair": dict(beta=0.3, delta=0.05),
    "sppo_hard": dict(beta=0.5),
    "aot": dict(beta=0.3, label_smoothing=0.05),
    "aot_unpaired": dict(beta=0.3),
    "apo_zero": dict(beta=0.3),
    "apo_down": dict(beta=0.3),
    "discopop": dict(beta=0.3, discopop_tau=0.1),
    "sft": dict(),
    "sigmoid_norm": dict(beta=0.3),
    "rpo": dict(beta=0.3, rpo_alpha=0.7),
    "odpo": dict(beta=0.3, alpha=0.5),
    "cpo": dict(beta=0.3, cpo_alpha=0.5),
    "simpo": dict(beta=2.0, gamma=0.3),
    "alphapo": dict(beta=2.0, gamma=0.3, alpha=0.2),
    "orpo": dict(beta=0.2),
    "kto": dict(beta=0.3, desirable_weight=1.2, undesirable_weight=0.8),
    "apo_zero_unpaired": dict(beta=0.3),
    "expo": dict(lam=0.4, kl_estimator="pair"),
}


def test_every_registered_loss_has_a_case():
    assert set(HP) == set(LOSSES)
    assert set(REFERENCE_LOSSES) == set(LOSSES), "every loss needs a hand-written formula in tests/reference.py"


def _transform(z, temperature=1.0, logit_scale=None, softcap=None):
    if logit_scale is not None:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def naive_token_logps(hidden, weight, bias, labels, **tf):
    """[R, T] log p(label) with materialized float64 logits; 0 off the completion."""
    z = hidden.to(DT) @ weight.to(DT).T
    if bias is not None:
        z = z + bias.to(DT)
    logp = torch.log_softmax(_transform(z, **tf), dim=-1)
    mask = labels != IGNORE
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, picked, torch.zeros_like(picked)), logp


def make_batch(rows, seed=0, hr=H, dtype=DT, *, device):
    g = torch.Generator().manual_seed(seed)  # on the CPU: the same numbers on every device
    hidden = torch.randn(rows, T, H, generator=g, dtype=dtype).to(device)
    weight = torch.randn(V, H, generator=g, dtype=dtype).to(device) * 0.5
    bias = torch.randn(V, generator=g, dtype=dtype).to(device) * 0.1
    ref_weight = torch.randn(V, hr, generator=g, dtype=dtype).to(device) * 0.5
    if hr == H:  # a reference close to the policy, as at the start of training
        ref_hidden = hidden + 0.3 * torch.randn(rows, T, H, generator=g, dtype=dtype).to(device)
        ref_weight = weight + 0.1 * ref_weight
    else:  # a different reference architecture
        ref_hidden = torch.randn(rows, T, hr, generator=g, dtype=dtype).to(device)
    labels = torch.randint(0, V, (rows, T), generator=g).to(device)
    for i in range(rows):  # prompt of 1-2 tokens, completion of >= 1 token, then padding
        p = int(torch.randint(1, 3, (1,), generator=g))
        n = int(torch.randint(1, T - p + 1, (1,), generator=g))
        labels[i, :p] = IGNORE
        labels[i, p + n :] = IGNORE
    return hidden, weight, bias, ref_hidden, ref_weight, labels


def leaves(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


def unfused(
    name, hp, hidden, weight, bias, ref_hidden, ref_weight, labels, *, ref_bias=None, tf=None, ld_alpha=None, **extra
):
    """The plain trainer's loss, by hand (tests/reference.py): float64 logits and the paper's formula."""
    ref = (
        {}
        if LOSSES[name].reference == "none"
        else dict(ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias)
    )
    return reference_module_loss(
        name, hp, hidden, weight, bias, labels, **ref, ld_alpha=ld_alpha, transform=tf, ignore_index=IGNORE, **extra
    )


def compare(name, hp, *, backend="torch", tol=TOL, tf=None, ld_alpha=None, shared_head=False, hr=H, seed=0, dtype=DT):
    spec = LOSSES[name]
    rows = 2 * B
    dev = device_for(backend)
    hidden, weight, bias, ref_hidden, ref_weight, labels = make_batch(rows, seed=seed, hr=hr, dtype=dtype, device=dev)
    extra = {}
    if not spec.paired:
        extra["is_desirable"] = torch.tensor([True, False, True, True, False, False], device=dev)
        extra["kl"] = 0.07
    if name == "odpo":
        extra["offset"] = torch.tensor([0.1, 0.5, -0.2], dtype=DT, device=dev)

    h1, w1, b1 = leaves(hidden, weight, bias)
    module = ek.FusedLinearPreferenceLoss(name, backend=backend, ld_alpha=ld_alpha, **(tf or {}), **hp)
    ref_kw = (
        {} if spec.reference == "none" else dict(ref_hidden=ref_hidden, ref_weight=None if shared_head else ref_weight)
    )
    out = module(w1, h1, labels, bias=b1, **ref_kw, **extra)
    out.loss.backward()

    h2, w2, b2 = leaves(hidden, weight, bias)
    # a shared head runs the reference through the policy's weight and bias (the unfused path detaches
    # the reference log-probs, so no gradient flows through that pass on either side)
    ref_w, ref_b = (w2, b2) if shared_head else (ref_weight, None)
    loss2, _, metrics2 = unfused(
        name, hp, h2, w2, b2, ref_hidden, ref_w, labels, ref_bias=ref_b, tf=tf, ld_alpha=ld_alpha, **extra
    )
    loss2.backward()

    torch.testing.assert_close(out.loss, loss2.to(out.loss.dtype), **tol)
    assert metrics2, name
    for k, v in metrics2.items():
        torch.testing.assert_close(out.metrics[k], v.to(out.metrics[k].dtype), **tol, msg=f"metric {k}")
    torch.testing.assert_close(h1.grad, h2.grad, **tol)
    torch.testing.assert_close(w1.grad, w2.grad, **tol)
    torch.testing.assert_close(b1.grad, b2.grad, **tol)
    return out


@pytest.mark.parametrize("name", sorted(HP))
def test_fused_matches_unfused(name):
    compare(name, HP[name])


@pytest.mark.parametrize("est", ["sequence", "pair", "token"])
def test_expo_estimators_fused_match_unfused(est):
    out = compare("expo", dict(lam=0.4, kl_estimator=est))
    assert (out.token_kl is not None) == (est == "token")


def test_expo_token_kl_with_a_different_reference_head_width():
    compare("expo", dict(lam=0.7, kl_estimator="token"), hr=H + 5)


@pytest.mark.parametrize("name", ["sigmoid", "ipo", "sft"])
def test_ld_alpha_fused_matches_unfused(name):
    compare(name, HP[name], ld_alpha=0.4)


def test_logit_transform_applies_to_both_heads():
    tf = dict(temperature=0.7, logit_scale=1.3, softcap=4.0)
    compare("sigmoid", HP["sigmoid"], tf=tf)
    compare("expo", dict(lam=0.3, kl_estimator="token"), tf=tf)


def test_shared_head_reference_is_detached():
    """ref_weight=None: the reference runs through the policy head, but no gradient flows through it."""
    compare("sigmoid", HP["sigmoid"], shared_head=True)


@pytest.mark.parametrize(
    "name,hp", [("sigmoid", HP["sigmoid"]), ("expo", dict(lam=0.4, kl_estimator="token")), ("kto", HP["kto"])]
)
def test_triton_backend_matches_unfused(name, hp):
    if not triton_available():
        pytest.skip("triton backend unavailable")
    # float32: Triton refuses float64 (its scalars and GPU accumulators are float32); the unfused side
    # then runs in float32 as well
    compare(name, hp, backend="triton", tol=dict(rtol=2e-5, atol=2e-6), dtype=torch.float32)


def test_precomputed_reference_equals_reference_pass():
    hidden, weight, bias, ref_hidden, ref_weight, labels = make_batch(2 * B, seed=3, device=DEV)
    m = ek.FusedLinearDPOLoss(beta=0.2, backend="torch")
    a = m(weight, hidden, labels, bias=bias, ref_hidden=ref_hidden, ref_weight=ref_weight)
    rc, rr = a.ref_logps.chunk(2)
    b = m(weight, hidden, labels, bias=bias, ref_chosen_logps=rc, ref_rejected_logps=rr)
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)


@pytest.mark.parametrize(
    "loss",
    [ek.FusedLinearDPOLoss(backend="torch"), ek.FusedLinearEXPOLoss(lam=0.5, kl_estimator="token", backend="torch")],
    ids=["dpo", "expo_token"],
)
def test_reference_pass_keeps_no_graph(loss):
    """Reference tensors that require grad (a trainer's reference model) get no gradient."""
    hidden, weight, bias, ref_hidden, ref_weight, labels = make_batch(2 * B, seed=4, device=DEV)
    ref_hidden.requires_grad_(True)
    ref_weight.requires_grad_(True)
    h, w = leaves(hidden, weight)
    out = loss(w, h, labels, ref_hidden=ref_hidden, ref_weight=ref_weight)
    if out.ref_logps is not None:
        assert out.ref_logps.grad_fn is None and not out.ref_logps.requires_grad
    out.loss.backward()
    assert ref_hidden.grad is None and ref_weight.grad is None
    assert h.grad is not None and w.grad is not None


def test_shared_head_token_kl_gradient_is_policy_side_only():
    """EXPO token KL with ref_weight=None: the head gets the policy-side gradient only, as when the
    reference head is a separate frozen copy."""
    hidden, weight, _, ref_hidden, _, labels = make_batch(2 * B, seed=15, device=DEV)
    m = ek.FusedLinearEXPOLoss(lam=0.5, kl_estimator="token", backend="torch")
    h1, w1 = leaves(hidden, weight)
    m(w1, h1, labels, ref_hidden=ref_hidden).loss.backward()
    h2, w2 = leaves(hidden, weight)
    m(w2, h2, labels, ref_hidden=ref_hidden, ref_weight=weight.clone()).loss.backward()
    torch.testing.assert_close(w1.grad, w2.grad, **TOL)
    torch.testing.assert_close(h1.grad, h2.grad, **TOL)


def test_frozen_head_gets_no_gradient():
    hidden, weight, _, ref_hidden, _, labels = make_batch(2 * B, seed=5, device=DEV)
    (h,) = leaves(hidden)
    out = ek.FusedLinearDPOLoss(backend="torch")(weight, h, labels, ref_hidden=ref_hidden)
    out.loss.backward()
    assert weight.grad is None and h.grad is not None


def test_token_metrics_match_materialized_logits():
    hidden, weight, bias, ref_hidden, ref_weight, labels = make_batch(2 * B, seed=6, device=DEV)
    out = ek.FusedLinearDPOLoss(backend="torch")(
        weight, hidden, labels, bias=bias, ref_hidden=ref_hidden, ref_weight=ref_weight
    )
    z = hidden @ weight.T + bias
    logp = z.log_softmax(-1)
    mask = labels != IGNORE
    ent = -(logp.exp() * logp).sum(-1)
    torch.testing.assert_close(out.metrics["entropy"], ent[mask].mean(), **TOL)
    mc, mr = mask.chunk(2)
    zc, zr = z.mean(-1).chunk(2)
    torch.testing.assert_close(out.metrics["logits/chosen"], zc[mc].mean(), **TOL)
    torch.testing.assert_close(out.metrics["logits/rejected"], zr[mr].mean(), **TOL)
    hit = (z.argmax(-1) == labels).chunk(2)[0]
    torch.testing.assert_close(out.metrics["mean_token_accuracy"], hit[mc].to(DT).mean(), **TOL)


def test_kto_kl_baseline_from_mismatched_rows():
    hidden, weight, bias, ref_hidden, ref_weight, labels = make_batch(2 * B, seed=7, device=DEV)
    kh, _, _, rkh, _, kl_labels = make_batch(2 * B, seed=8, device=DEV)
    des = torch.tensor([True, True, False, True, False, False], device=DEV)
    m = ek.FusedLinearKTOLoss(beta=0.3, backend="torch")
    out = m(
        weight,
        hidden,
        labels,
        bias=bias,
        ref_hidden=ref_hidden,
        ref_weight=ref_weight,
        is_desirable=des,
        kl_hidden=kh,
        kl_labels=kl_labels,
        ref_kl_hidden=rkh,
    )
    kl_pol, _ = naive_token_logps(kh, weight, bias, kl_labels)
    kl_ref, _ = naive_token_logps(rkh, ref_weight, None, kl_labels)
    z0 = (kl_pol.sum(1) - kl_ref.sum(1)).mean().clamp(min=0)
    expect = m(weight, hidden, labels, bias=bias, ref_hidden=ref_hidden, ref_weight=ref_weight, is_desirable=des, kl=z0)
    torch.testing.assert_close(out.loss, expect.loss, **TOL)
    torch.testing.assert_close(out.metrics["kl"], z0, **TOL)


def test_use_weighting_matches_unfused_wpo():
    hidden, weight, bias, ref_hidden, ref_weight, labels = make_batch(2 * B, seed=9, device=DEV)
    h1, w1 = leaves(hidden, weight)
    out = ek.FusedLinearDPOLoss(beta=0.3, use_weighting=True, backend="torch")(
        w1, h1, labels, ref_hidden=ref_hidden, ref_weight=ref_weight
    )
    out.loss.backward()
    h2, w2 = leaves(hidden, weight)
    lp, full = naive_token_logps(h2, w2, None, labels)
    ref_lp, _ = naive_token_logps(ref_hidden, ref_weight, None, labels)
    mask = labels != IGNORE
    log_sum_p2 = torch.logsumexp(2 * full, -1).detach()
    aligned = torch.where(mask, lp.detach() - log_sum_p2, torch.zeros_like(lp))
    w = torch.exp(aligned.sum(1) / mask.sum(1))
    weights = w[:B] * w[B:]
    c, r = lp.sum(1).chunk(2)
    rc, rr = ref_lp.sum(1).chunk(2)
    loss2 = (-torch.nn.functional.logsigmoid(0.3 * ((c - rc) - (r - rr))) * weights).mean()
    loss2.backward()
    torch.testing.assert_close(out.loss, loss2, **TOL)
    torch.testing.assert_close(h1.grad, h2.grad, **TOL)
    torch.testing.assert_close(w1.grad, w2.grad, **TOL)


def test_mpo_mix_fused():
    hp = dict(beta=0.3)
    hidden, weight, bias, ref_hidden, ref_weight, labels = make_batch(2 * B, seed=10, device=DEV)
    m = ek.FusedLinearPreferenceLoss(
        ["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0], backend="torch", **hp
    )
    out = m(weight, hidden, labels, bias=bias, ref_hidden=ref_hidden, ref_weight=ref_weight)
    parts = [
        ek.FusedLinearPreferenceLoss(n, backend="torch", **hp)(
            weight, hidden, labels, bias=bias, ref_hidden=ref_hidden, ref_weight=ref_weight
        ).loss
        for n in ("sigmoid", "bco_pair", "sft")
    ]
    torch.testing.assert_close(out.loss, 0.8 * parts[0] + 0.2 * parts[1] + parts[2], **TOL)


def test_presets_are_the_general_module():
    hidden, weight, bias, ref_hidden, ref_weight, labels = make_batch(2 * B, seed=11, device=DEV)
    for preset, name, hp in [
        (ek.FusedLinearDPOLoss, "sigmoid", dict(beta=0.2)),
        (ek.FusedLinearSimPOLoss, "simpo", dict(beta=2.0, gamma=0.5)),
        (ek.FusedLinearORPOLoss, "orpo", dict(beta=0.1)),
    ]:
        assert issubclass(preset, ek.FusedLinearPreferenceLoss)
        ref = {} if LOSSES[name].reference == "none" else dict(ref_hidden=ref_hidden, ref_weight=ref_weight)
        a = preset(backend="torch", **hp)(weight, hidden, labels, **ref)
        b = ek.FusedLinearPreferenceLoss(name, backend="torch", **hp)(weight, hidden, labels, **ref)
        torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)


def test_compute_metrics_off_returns_same_loss_and_no_metrics():
    hidden, weight, bias, ref_hidden, ref_weight, labels = make_batch(2 * B, seed=12, device=DEV)
    kw = dict(ref_hidden=ref_hidden, ref_weight=ref_weight)
    a = ek.FusedLinearDPOLoss(backend="torch")(weight, hidden, labels, **kw)
    b = ek.FusedLinearDPOLoss(backend="torch", compute_metrics=False)(weight, hidden, labels, **kw)
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)
    assert b.metrics == {} and "rewards/margins" in a.metrics


# ---------------------------------------------------------------------------------------------- errors
def test_bad_hyperparameters_fail_at_construction():
    with pytest.raises(ValueError, match="beta"):
        ek.FusedLinearDPOLoss(beta=0.0)
    with pytest.raises(ValueError, match="lam"):
        ek.FusedLinearEXPOLoss()
    with pytest.raises(ValueError, match="Did you mean 'sigmoid'"):
        ek.FusedLinearPreferenceLoss("sigmod")
    with pytest.raises(ValueError, match="Unknown hyperparameter `bta`"):
        ek.FusedLinearDPOLoss(bta=0.1)
    with pytest.raises(ValueError, match="FusedLinearPreferenceLoss"):
        ek.FusedLinearDPOLoss(loss="ipo")
    with pytest.raises(ValueError, match="ld_alpha"):
        ek.FusedLinearDPOLoss(ld_alpha=1.5)
    with pytest.raises(ValueError, match="loss_weights"):
        ek.FusedLinearPreferenceLoss(["sigmoid", "sft"], loss_weights=[1.0])


def test_bad_inputs_name_the_argument():
    hidden, weight, bias, ref_hidden, ref_weight, labels = make_batch(2 * B, seed=13, device=DEV)
    dpo = ek.FusedLinearDPOLoss(backend="torch")
    with pytest.raises(ValueError, match="needs the reference model"):
        dpo(weight, hidden, labels)
    with pytest.raises(ValueError, match="2B rows"):
        dpo(weight, hidden[:5], labels[:5], ref_hidden=ref_hidden[:5])
    with pytest.raises(ValueError, match="`hidden` must have shape"):
        dpo(weight, hidden[:, :, 0], labels, ref_hidden=ref_hidden)
    with pytest.raises(ValueError, match="`ref_hidden` must cover the same tokens"):
        dpo(weight, hidden, labels, ref_hidden=ref_hidden[:, :3])
    with pytest.raises(ValueError, match="not both"):
        dpo(
            weight,
            hidden,
            labels,
            ref_hidden=ref_hidden,
            ref_chosen_logps=torch.zeros(B, dtype=DT, device=DEV),
            ref_rejected_logps=torch.zeros(B, dtype=DT, device=DEV),
        )
    with pytest.raises(ValueError, match="reference-free"):
        ek.FusedLinearSimPOLoss()(weight, hidden, labels, ref_hidden=ref_hidden)
    with pytest.raises(ValueError, match="kl_estimator='token' needs the reference model's hidden states"):
        ek.FusedLinearEXPOLoss(lam=0.1, kl_estimator="token")(weight, hidden, labels)
    with pytest.raises(ValueError, match="is_desirable"):
        ek.FusedLinearKTOLoss()(weight, hidden, labels, ref_hidden=ref_hidden, kl=0.0)
    with pytest.raises(ValueError, match="batch of more than 1"):
        ek.FusedLinearKTOLoss()(
            weight,
            hidden[:1],
            labels[:1],
            ref_hidden=ref_hidden[:1],
            is_desirable=torch.tensor([True], device=DEV),
            kl_hidden=hidden[:1],
            kl_labels=labels[:1],
            ref_kl_hidden=ref_hidden[:1],
        )
    bad = labels.clone()
    bad[0, -1] = V
    with pytest.raises(ValueError, match="label"):
        dpo(weight, hidden, bad, ref_hidden=ref_hidden)


def test_expo_with_lam_zero_needs_no_reference():
    hidden, weight, _, _, _, labels = make_batch(2 * B, seed=14, device=DEV)
    out = ek.FusedLinearEXPOLoss(lam=0.0, backend="torch")(weight, hidden, labels)
    lp, _ = naive_token_logps(hidden, weight, None, labels)
    c, r = lp.sum(1).chunk(2)
    torch.testing.assert_close(out.loss, torch.nn.functional.softplus(-(c - r)).mean(), **TOL)


def test_kto_long_sequences_exact_and_in_token_dtype():
    """At T = 32768 a sequence's summed log-prob is ~-1.8e5 (float32 spacing 1/64): the unpaired module's
    sums are float64, so KTO's policy-minus-reference margin is float64-exact, and its loss and metrics
    come back in the per-token dtype (float32) as the paired module's do."""
    t, h, v = 32768, 8, 256
    dev = device_for("torch")
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, t, h, generator=g).to(dev)
    ref_hidden = hidden + 1e-3 * torch.randn(2, t, h, generator=g).to(dev)
    weight = torch.randn(v, h, generator=g).to(dev) * 0.5
    labels = torch.randint(0, v, (2, t), generator=g).to(dev)
    des = torch.tensor([True, False], device=dev)
    out = ek.FusedLinearKTOLoss(beta=0.1, backend="torch")(
        weight, hidden, labels, ref_hidden=ref_hidden, is_desirable=des, kl=0.0
    )
    assert out.loss.dtype == torch.float32
    assert all(m.dtype == torch.float32 for m in out.metrics.values() if m.is_floating_point())
    pol = ek.linear_logprobs(hidden, weight, labels, backend="torch").double().sum(1)
    ref = ek.linear_logprobs(ref_hidden, weight, labels, backend="torch").double().sum(1)
    # the hand formula (tests/reference.py), batch mean, on float64 sums of the same per-token values
    expect = reference.loss_kto({"pol": pol, "ref": ref, "kl": 0.0, "is_desirable": des}, beta=0.1).mean()
    torch.testing.assert_close(out.loss, expect.float(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.policy_logps, pol, rtol=1e-12, atol=0)

"""expo_kernels.losses against hand-written float64 formulas (docs/design.md, "Losses"), independent of TRL,
plus reductions, dtypes, gradients (gradcheck), metrics, aggregation and EXPO's population properties."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import as_is_and_under_a_meta_default
from reference import kto_kl_baseline, loss_kto, loss_orpo

from expo_kernels.losses import (
    LOSSES,
    aggregate_pair_logps,
    preference_loss,
    preference_loss_and_metrics,
    sequence_logps,
    wpo_weights,
)
from expo_kernels.losses.aggregate import sum_dtype

DT = torch.float64
B = 6


def ls(x):  # log sigma
    return F.logsigmoid(x)


def sig(x):
    return torch.sigmoid(x)


def _inputs(seed=0, b=B, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    lc = torch.randint(1, 20, (b,), generator=g)
    lr = torch.randint(1, 20, (b,), generator=g)
    c = -(torch.rand(b, generator=g, dtype=dtype) * 1.5 + 0.05) * lc
    r = -(torch.rand(b, generator=g, dtype=dtype) * 1.5 + 0.05) * lr
    cref = c + torch.randn(b, generator=g, dtype=dtype) * 2
    rref = r + torch.randn(b, generator=g, dtype=dtype) * 2
    return [t.clone().requires_grad_(True) for t in (c, r, cref, rref)], lc, lr


# ------------------------------------------------------------------------------------------------
# Hand formulas, straight from the table in docs/design.md, "Losses" (per pair).
# c, r, cr, rr: policy / reference summed log-probs; lc, lr lengths; hp the hyperparameters.
# ------------------------------------------------------------------------------------------------
def _nll(c, lc):
    return -c.sum() / lc.sum()


def _fmap(u, kind, a=0.5):  # DESIGN's f-divergence maps (constants dropped)
    return {
        "reverse_kl": u,
        "forward_kl": -torch.exp(-u),
        "js_divergence": ls(u),
        "alpha_divergence": torch.exp((a - 1) * u) / (a - 1),
    }[kind]


def _fmap_const(kind, a=0.5):
    """The constant TRL's maps f'(exp(u)) add to DESIGN's: it cancels in chosen - rejected, but not once
    the two scores are divided by different lengths (ipo, sigmoid_norm)."""
    return {"reverse_kl": 0.0, "forward_kl": 1.0, "js_divergence": math.log(2.0), "alpha_divergence": -1.0 / (a - 1)}[
        kind
    ]


def _logodds(a):
    return a - torch.log(1 - torch.exp(a))


HAND = {
    "sigmoid": (
        dict(beta=0.4, label_smoothing=0.15),
        lambda c, r, cr, rr, lc, lr, beta, label_smoothing: (
            -(1 - label_smoothing) * ls(beta * ((c - cr) - (r - rr)))
            - label_smoothing * ls(-beta * ((c - cr) - (r - rr)))
        ),
    ),
    "robust": (
        dict(beta=0.4, label_smoothing=0.2),
        lambda c, r, cr, rr, lc, lr, beta, label_smoothing: (
            (
                -(1 - label_smoothing) * ls(beta * ((c - cr) - (r - rr)))
                + label_smoothing * ls(-beta * ((c - cr) - (r - rr)))
            )
            / (1 - 2 * label_smoothing)
        ),
    ),
    "hinge": (dict(beta=0.3), lambda c, r, cr, rr, lc, lr, beta: torch.clamp(1 - beta * ((c - cr) - (r - rr)), min=0)),
    "ipo": (dict(beta=0.2), lambda c, r, cr, rr, lc, lr, beta: ((c - cr) / lc - (r - rr) / lr - 1 / (2 * beta)) ** 2),
    "exo_pair": (
        dict(beta=0.5, label_smoothing=0.01),
        lambda c, r, cr, rr, lc, lr, beta, label_smoothing: (
            lambda q: (
                q * (torch.log(q) - math.log(1 - label_smoothing))
                + (1 - q) * (torch.log(1 - q) - math.log(label_smoothing))
            )
        )(sig(beta * ((c - cr) - (r - rr)))),
    ),
    "nca_pair": (
        dict(beta=0.3),
        lambda c, r, cr, rr, lc, lr, beta: (
            -ls(beta * (c - cr)) - 0.5 * ls(-beta * (c - cr)) - 0.5 * ls(-beta * (r - rr))
        ),
    ),
    "bco_pair": (
        dict(beta=0.3, delta=0.2),
        lambda c, r, cr, rr, lc, lr, beta, delta: -ls(beta * (c - cr) - delta) - ls(-(beta * (r - rr) - delta)),
    ),
    "sppo_hard": (
        dict(beta=0.7),
        lambda c, r, cr, rr, lc, lr, beta: ((c - cr) - 1 / (2 * beta)) ** 2 + ((r - rr) + 1 / (2 * beta)) ** 2,
    ),
    "apo_zero": (dict(beta=0.3), lambda c, r, cr, rr, lc, lr, beta: (1 - sig(beta * (c - cr))) + sig(beta * (r - rr))),
    "apo_down": (
        dict(beta=0.3),
        lambda c, r, cr, rr, lc, lr, beta: sig(beta * (c - cr)) + (1 - sig(beta * ((c - cr) - (r - rr)))),
    ),
    "discopop": (
        dict(beta=0.2, discopop_tau=0.3),
        lambda c, r, cr, rr, lc, lr, beta, discopop_tau: (
            lambda z: (1 - sig(z / discopop_tau)) * (-ls(z)) + sig(z / discopop_tau) * torch.exp(-z)
        )(beta * ((c - cr) - (r - rr))),
    ),
    "sigmoid_norm": (dict(beta=0.9), lambda c, r, cr, rr, lc, lr, beta: -ls(beta * ((c - cr) / lc - (r - rr) / lr))),
    "sft": (dict(), lambda c, r, cr, rr, lc, lr: _nll(c, lc).expand(c.shape[0])),
    "rpo": (
        dict(beta=0.3, rpo_alpha=0.7),
        lambda c, r, cr, rr, lc, lr, beta, rpo_alpha: -ls(beta * ((c - cr) - (r - rr))) + rpo_alpha * _nll(c, lc),
    ),
    "simpo": (
        dict(beta=2.0, gamma=0.8),
        lambda c, r, cr, rr, lc, lr, beta, gamma: -ls(beta * (c / lc - r / lr) - gamma),
    ),
    "cpo": (
        dict(beta=0.2, cpo_alpha=0.6),
        lambda c, r, cr, rr, lc, lr, beta, cpo_alpha: -ls(beta * (c - r)) + cpo_alpha * _nll(c, lc),
    ),
    # AlphaPO paper (arXiv 2501.03884): reward -(1/alpha) (exp(-alpha * avg_logp) - 1), SimPO margin gamma
    "alphapo": (
        dict(beta=2.5, gamma=0.3, alpha=0.4),
        lambda c, r, cr, rr, lc, lr, beta, gamma, alpha: (
            -ls(beta * (-(torch.exp(-alpha * c / lc) - 1) / alpha + (torch.exp(-alpha * r / lr) - 1) / alpha) - gamma)
        ),
    ),
    "orpo": (
        dict(beta=0.25),
        lambda c, r, cr, rr, lc, lr, beta: _nll(c, lc) - beta * ls(_logodds(c / lc) - _logodds(r / lr)),
    ),
    "odpo": (dict(beta=0.3, alpha=0.5), None),  # needs `offset`: own test below
    "expo": (dict(lam=0.3), lambda c, r, cr, rr, lc, lr, lam: F.softplus(-(c - r)) + lam * 0.5 * ((cr - c) + (rr - r))),
}


@pytest.mark.parametrize("name", [n for n, (_, f) in HAND.items() if f is not None])
def test_loss_matches_hand_formula(name):
    hp, formula = HAND[name]
    (c, r, cr, rr), lc, lr = _inputs(seed=len(name))
    per_pair_ref = formula(c, r, cr, rr, lc.to(DT), lr.to(DT), **hp)
    expected = per_pair_ref.mean()
    ours = preference_loss(name, c, r, cr, rr, chosen_lengths=lc, rejected_lengths=lr, **hp)
    assert ours.dtype == DT and ours.dim() == 0
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-13)
    g_ours = torch.autograd.grad(ours, (c, r, cr, rr), allow_unused=True)
    g_ref = torch.autograd.grad(expected, (c, r, cr, rr), allow_unused=True)
    for a, b in zip(g_ours, g_ref, strict=False):
        if a is None or b is None:
            assert (a is None or a.abs().max() == 0) and (b is None or b.abs().max() == 0)
        else:
            torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("name", ["aot", "aot_unpaired"])
def test_aot_hand_formula(name):
    (c, r, cr, rr), _, _ = _inputs(seed=3)
    beta, eps = 0.3, 0.1
    if name == "aot":
        d = torch.sort(c - r).values - torch.sort(cr - rr).values
    else:
        d = torch.sort(c - cr).values - torch.sort(r - rr).values
    expected = (-(1 - eps) * ls(beta * d) - eps * ls(-beta * d)).mean()
    torch.testing.assert_close(
        preference_loss(name, c, r, cr, rr, beta=beta, label_smoothing=eps), expected, rtol=1e-12, atol=1e-13
    )


def test_odpo_hand_formula_and_offset_forms():
    (c, r, cr, rr), _, _ = _inputs(seed=4)
    offset = torch.linspace(0.0, 2.0, B, dtype=DT)
    beta, alpha = 0.3, 0.5
    expected = -ls(beta * ((c - cr) - (r - rr)) - alpha * offset)
    got = preference_loss("odpo", c, r, cr, rr, offset=offset, beta=beta, alpha=alpha, reduction="none")
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-13)
    # a scalar offset is broadcast; offset 0 is DPO
    torch.testing.assert_close(
        preference_loss("odpo", c, r, cr, rr, offset=0.0, beta=beta),
        preference_loss("sigmoid", c, r, cr, rr, beta=beta),
    )


@pytest.mark.parametrize("kind", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("name", ["sigmoid", "hinge", "ipo", "robust", "discopop", "sigmoid_norm"])
def test_f_divergence_matches_design_maps(kind, name):
    # docs/design.md's maps differ from TRL's by constants, which cancel in chosen - rejected
    (c, r, cr, rr), lc, lr = _inputs(seed=5)
    lcf, lrf = lc.to(DT), lr.to(DT)
    a, beta = 0.3, 0.5
    sc, sr = _fmap(c - cr, kind, a), _fmap(r - rr, kind, a)
    if name in ("ipo", "sigmoid_norm"):
        k = _fmap_const(kind, a)
        sc, sr = (sc + k) / lcf, (sr + k) / lrf
    d = sc - sr
    eps = 0.1 if name == "robust" else 0.0
    expected = {
        "sigmoid": -ls(beta * d),
        "hinge": torch.relu(1 - beta * d),
        "ipo": (d - 1 / (2 * beta)) ** 2,
        "robust": (-(1 - eps) * ls(beta * d) + eps * ls(-beta * d)) / (1 - 2 * eps),
        "discopop": (lambda z: (1 - sig(z / 0.05)) * (-ls(z)) + sig(z / 0.05) * torch.exp(-z))(beta * d),
        "sigmoid_norm": -ls(beta * d),
    }[name].mean()
    hp = dict(beta=beta, f_divergence_type=kind, f_alpha_divergence_coef=a)
    if name == "robust":
        hp["label_smoothing"] = eps
    got = preference_loss(name, c, r, cr, rr, chosen_lengths=lc, rejected_lengths=lr, **hp)
    torch.testing.assert_close(got, expected, rtol=1e-11, atol=1e-12)


def test_reverse_kl_is_default_and_identity():
    (c, r, cr, rr), _, _ = _inputs(seed=6)
    torch.testing.assert_close(
        preference_loss("sigmoid", c, r, cr, rr, f_divergence_type="reverse_kl"),
        preference_loss("sigmoid", c, r, cr, rr),
    )


@pytest.mark.parametrize(
    "name", sorted(set(LOSSES) - {"aot", "aot_unpaired", "kto", "apo_zero_unpaired", "sft", "rpo", "cpo", "orpo"})
)
def test_reductions_consistent(name):
    (c, r, cr, rr), lc, lr = _inputs(seed=7)
    kw = dict(chosen_lengths=lc, rejected_lengths=lr, **{k: v for k, v in HAND.get(name, ({}, None))[0].items()})
    if name == "odpo":
        kw["offset"] = torch.ones(B, dtype=DT)
    if name == "expo":
        kw["lam"] = 0.2
    per = preference_loss(name, c, r, cr, rr, reduction="none", **kw)
    assert per.shape == (B,) and per.dtype == DT
    torch.testing.assert_close(per.mean(), preference_loss(name, c, r, cr, rr, **kw))
    torch.testing.assert_close(per.sum(), preference_loss(name, c, r, cr, rr, reduction="sum", **kw))
    # per-pair separability: changing pair 0 changes only entry 0
    c2 = c.detach().clone()
    c2[0] -= 0.7
    per2 = preference_loss(name, c2, r, cr, rr, reduction="none", **kw)
    torch.testing.assert_close(per2[1:], per[1:])


@pytest.mark.parametrize("name", ["sft", "cpo", "orpo", "rpo"])
def test_nll_losses_per_pair_with_explicit_chosen_nll(name):
    (c, r, cr, rr), lc, lr = _inputs(seed=8)
    nll = -c / lc.to(DT)
    per = preference_loss(name, c, r, cr, rr, chosen_lengths=lc, rejected_lengths=lr, chosen_nll=nll, reduction="none")
    assert per.shape == (B,)
    # the NLL part of pair i is nll_i (times its weight)
    w = {"sft": 1.0, "cpo": 1.0, "orpo": 1.0, "rpo": 1.0}[name]
    base = preference_loss(
        name,
        c,
        r,
        cr,
        rr,
        chosen_lengths=lc,
        rejected_lengths=lr,
        chosen_nll=torch.zeros(B, dtype=DT),
        reduction="none",
    )
    torch.testing.assert_close(per - base, w * nll)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["sigmoid", "ipo", "simpo", "orpo", "expo", "kto", "aot", "discopop", "cpo", "sft"])
def test_dtype_preserved(dtype, name):
    (c, r, cr, rr), lc, lr = _inputs(seed=9, dtype=dtype)
    extra = {"expo": dict(lam=0.1), "kto": dict(kl=0.1)}.get(name, {})
    loss, metrics = preference_loss_and_metrics(name, c, r, cr, rr, chosen_lengths=lc, rejected_lengths=lr, **extra)
    assert loss.dtype == dtype
    assert all(v.dtype == dtype and v.dim() == 0 and not v.requires_grad for v in metrics.values())
    loss.backward()
    assert c.grad is not None and c.grad.dtype == dtype


@pytest.mark.parametrize(
    "name,kw",
    [
        ("sigmoid", dict(label_smoothing=0.1)),
        ("ipo", {}),
        ("exo_pair", {}),
        ("simpo", {}),
        ("orpo", {}),
        ("cpo", dict(cpo_loss_type="simpo", alpha=0.3)),
        ("kto", dict(kl=0.05)),
        ("expo", dict(lam=0.5)),
        ("expo", dict(lam=0.5, kl_estimator="pair")),
        ("aot_unpaired", {}),
        ("apo_down", {}),
    ],
)
def test_gradcheck(name, kw):
    (c, r, cr, rr), lc, lr = _inputs(seed=10, b=4)

    def f(c, r, cr, rr):
        return (
            preference_loss(name, c, r, cr, rr, chosen_lengths=lc, rejected_lengths=lr, beta=0.8, **kw)
            if name not in ("expo",)
            else preference_loss(name, c, r, cr, rr, **kw)
        )

    assert torch.autograd.gradcheck(f, (c, r, cr, rr))


# ------------------------------------------------------------------------------------------------
# MPO, weights
# ------------------------------------------------------------------------------------------------
def test_mpo_mix_is_weighted_sum():
    (c, r, cr, rr), lc, lr = _inputs(seed=11)
    kw = dict(chosen_lengths=lc, rejected_lengths=lr, beta=0.3)
    mix = preference_loss(["sigmoid", "bco_pair", "sft"], c, r, cr, rr, loss_weights=[0.8, 0.2, 1.0], **kw)
    parts = (
        0.8 * preference_loss("sigmoid", c, r, cr, rr, **kw)
        + 0.2 * preference_loss("bco_pair", c, r, cr, rr, **kw)
        + preference_loss("sft", c, r, cr, rr, **kw)
    )
    torch.testing.assert_close(mix, parts)
    # default weights are 1
    torch.testing.assert_close(
        preference_loss(["sigmoid", "hinge"], c, r, cr, rr, **kw),
        preference_loss("sigmoid", c, r, cr, rr, **kw) + preference_loss("hinge", c, r, cr, rr, **kw),
    )
    _, m = preference_loss_and_metrics(["sigmoid", "sft"], c, r, cr, rr, loss_weights=[1, 0.5], **kw)
    assert {"loss/sigmoid", "loss/sft", "nll_loss", "rewards/margins"} <= set(m)


@pytest.mark.parametrize("name", ["sigmoid", "sft", "ipo", "expo"])
def test_weights_multiply_per_pair_losses(name):
    (c, r, cr, rr), lc, lr = _inputs(seed=12)
    w = torch.rand(B, dtype=DT, generator=torch.Generator().manual_seed(0))
    kw = dict(chosen_lengths=lc, rejected_lengths=lr, **({"lam": 0.3} if name == "expo" else {}))
    if name == "sft":  # TRL weights the expanded batch NLL: mean(nll * w)
        expected = _nll(c, lc.to(DT)) * w.mean()
    else:
        expected = (preference_loss(name, c, r, cr, rr, reduction="none", **kw) * w).mean()
    torch.testing.assert_close(preference_loss(name, c, r, cr, rr, weights=w, **kw), expected)


# ------------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------------
def test_dpo_metrics_are_trl_batch_means():
    (c, r, cr, rr), _, _ = _inputs(seed=13)
    beta = 0.25
    _, m = preference_loss_and_metrics("sigmoid", c, r, cr, rr, beta=beta)
    rc, rrw = beta * (c - cr), beta * (r - rr)
    expected = {
        "rewards/chosen": rc.mean(),
        "rewards/rejected": rrw.mean(),
        "rewards/accuracies": (rc > rrw).to(DT).mean(),
        "rewards/margins": (rc - rrw).mean(),
        "logps/chosen": c.mean(),
        "logps/rejected": r.mean(),
    }
    assert set(m) == set(expected)
    for k, v in expected.items():
        torch.testing.assert_close(m[k], v.detach())


def test_expo_metrics():
    (c, r, cr, rr), _, _ = _inputs(seed=14)
    _, m = preference_loss_and_metrics("expo", c, r, cr, rr, lam=0.5)
    torch.testing.assert_close(m["bt_loss"], F.softplus(-(c - r)).mean().detach())
    torch.testing.assert_close(m["kl"], (0.5 * ((cr - c) + (rr - r))).mean().detach())
    torch.testing.assert_close(m["rewards/accuracies"], (c > r).to(DT).mean())


# ------------------------------------------------------------------------------------------------
# KTO
# ------------------------------------------------------------------------------------------------
def test_kto_hand_formula_and_forms():
    g = torch.Generator().manual_seed(15)
    n = 7
    pol = -torch.rand(n, generator=g, dtype=DT) * 20
    ref = pol + torch.randn(n, generator=g, dtype=DT)
    lab = torch.tensor([1, 0, 1, 1, 0, 0, 1], dtype=torch.bool)
    klp = -torch.rand(5, generator=g, dtype=DT) * 20
    klr = klp - torch.rand(5, generator=g, dtype=DT)  # policy above the reference: z0 > 0
    beta, wd, wu = 0.4, 1.2, 0.7
    z0 = (klp - klr).mean()
    h = pol - ref
    expected = torch.where(lab, wd * (1 - sig(beta * (h - z0))), wu * (1 - sig(beta * (z0 - h)))).mean()
    hp = dict(beta=beta, desirable_weight=wd, undesirable_weight=wu)
    got = preference_loss(
        "kto", policy_logps=pol, ref_logps=ref, is_desirable=lab, kl_logps=klp, ref_kl_logps=klr, **hp
    )
    torch.testing.assert_close(got, expected)
    got2 = preference_loss("kto", pol[lab], pol[~lab], ref[lab], ref[~lab], kl_logps=klp, ref_kl_logps=klr, **hp)
    torch.testing.assert_close(got2, expected)
    # precomputed baseline gives per-example losses in input order
    per = preference_loss("kto", policy_logps=pol, ref_logps=ref, is_desirable=lab, kl=z0, reduction="none", **hp)
    torch.testing.assert_close(per.mean(), expected)
    assert per.shape == (n,)
    # the baseline is detached
    p = pol.clone().requires_grad_(True)
    kp = klp.clone().requires_grad_(True)
    loss = preference_loss("kto", policy_logps=p, ref_logps=ref, is_desirable=lab, kl_logps=kp, ref_kl_logps=klr, **hp)
    gp, gk = torch.autograd.grad(loss, (p, kp), allow_unused=True)
    assert gk is None or gk.abs().max() == 0
    assert gp.abs().max() > 0
    # apo_zero_unpaired
    exp_apo = torch.where(lab, wd * (1 - sig(beta * h)), wu * sig(beta * h)).mean()
    torch.testing.assert_close(
        preference_loss("apo_zero_unpaired", policy_logps=pol, ref_logps=ref, is_desirable=lab, **hp), exp_apo
    )


# ------------------------------------------------------------------------------------------------
# EXPO
# ------------------------------------------------------------------------------------------------
def test_expo_estimators_hand_formulas():
    (c, r, cr, rr), _, _ = _inputs(seed=16)
    lam = 0.7
    bt = F.softplus(-(c - r))
    seq = preference_loss("expo", c, r, cr, rr, lam=lam, kl_estimator="sequence")
    torch.testing.assert_close(seq, bt.mean() + lam * torch.cat([cr - c, rr - r]).mean())
    q_ref, q = sig(cr - rr), sig(c - r)
    kl_pair = q_ref * torch.log(q_ref / q) + (1 - q_ref) * torch.log((1 - q_ref) / (1 - q))
    torch.testing.assert_close(
        preference_loss("expo", c, r, cr, rr, lam=lam, kl_estimator="pair"), bt.mean() + lam * kl_pair.mean()
    )
    tk = torch.rand(2 * B, dtype=DT, generator=torch.Generator().manual_seed(1))
    for token_kl, mean_kl in ((tk, tk.mean()), (tk[:B], tk[:B].mean()), (torch.tensor(0.3, dtype=DT), 0.3)):
        got = preference_loss("expo", c, r, lam=lam, kl_estimator="token", token_kl=token_kl)
        torch.testing.assert_close(got, bt.mean() + lam * mean_kl)
    # lam = 0: the Bradley-Terry term alone, no reference needed
    torch.testing.assert_close(preference_loss("expo", c, r, lam=0.0), bt.mean())


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "compile-branch"])
@pytest.mark.parametrize("labels", [[1, 0, 0], [1, 1, 0, 1], [0, 0], [1, 1, 1]], ids=["one-D", "one-U", "no-D", "no-U"])
def test_kto_metrics_are_the_means_of_each_side(monkeypatch, traced, labels):
    # The metrics by hand: rewards beta (pi - ref) and log-probs averaged over the desirable ("chosen") and
    # undesirable ("rejected") examples. Eagerly a side without examples has no key (and no margin); under
    # torch.compile (checks_values() False, forced here without compiling) the keys cannot depend on the data,
    # and an empty side's means are NaN.
    import expo_kernels.losses.unpaired as unpaired

    if traced:
        monkeypatch.setattr(unpaired, "checks_values", lambda: False)
    g = torch.Generator().manual_seed(16)
    lab = torch.tensor(labels, dtype=torch.bool)
    pol = -torch.rand(len(labels), generator=g, dtype=DT) * 10
    ref = pol + torch.randn(len(labels), generator=g, dtype=DT)
    beta = 0.3
    _, m = preference_loss_and_metrics("kto", policy_logps=pol, ref_logps=ref, is_desirable=lab, kl=0.2, beta=beta)
    torch.testing.assert_close(m["kl"], torch.tensor(0.2, dtype=DT))
    expected = {}
    for side, sel in (("chosen", lab), ("rejected", ~lab)):
        if bool(sel.any()):
            expected[f"rewards/{side}"] = beta * (pol[sel] - ref[sel]).mean()
            expected[f"logps/{side}"] = pol[sel].mean()
        elif traced:
            expected[f"rewards/{side}"] = expected[f"logps/{side}"] = torch.tensor(math.nan, dtype=DT)
    if "rewards/chosen" in expected and "rewards/rejected" in expected:
        expected["rewards/margins"] = expected["rewards/chosen"] - expected["rewards/rejected"]
    assert set(m) == set(expected) | {"kl"}
    for key, want in expected.items():
        torch.testing.assert_close(m[key], want.to(DT), equal_nan=True, msg=key)


def _population_optimum(loss, ref_probs, target, steps=60, **kw):
    """argmin over a softmax policy on 3 outcomes of the exact expected pairwise loss: all ordered pairs
    (i, j), i preferred with probability sigma(log target_i - log target_j) (Bradley-Terry of pi*)."""
    pairs = [(i, j) for i in range(3) for j in range(3) if i != j]
    ci, ri = torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
    lt = torch.log(torch.tensor(target, dtype=DT))
    lref = torch.log(torch.tensor(ref_probs, dtype=DT))
    w = sig(lt[ci] - lt[ri])
    theta = torch.zeros(3, dtype=DT, requires_grad=True)
    opt = torch.optim.LBFGS(
        [theta], lr=1, max_iter=steps, tolerance_grad=1e-13, tolerance_change=1e-15, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        logp = torch.log_softmax(theta, 0)
        extra = dict(kw)
        if loss == "expo":  # exact KL(pi_ref || pi) over the 3 outcomes, the 'token' estimator's quantity
            extra["token_kl"] = (lref.exp() * (lref - logp)).sum()
        out = preference_loss(loss, logp[ci], logp[ri], lref[ci], lref[ri], weights=w, **extra)
        out.backward()
        return out

    for _ in range(3):
        opt.step(closure)
    return torch.softmax(theta.detach(), 0)


def test_population_optima_dpo_vs_expo():
    pi_star, pi_ref = [0.6, 0.3, 0.1], [0.4, 0.4, 0.2]
    dpo = _population_optimum("sigmoid", pi_ref, pi_star, beta=1.0)
    torch.testing.assert_close(dpo, torch.tensor([0.24, 0.12, 0.02], dtype=DT) / 0.38, rtol=1e-6, atol=1e-7)
    dpo_same = _population_optimum("sigmoid", pi_star, pi_star, beta=1.0)
    p2 = torch.tensor(pi_star, dtype=DT) ** 2
    torch.testing.assert_close(dpo_same, p2 / p2.sum(), rtol=1e-6, atol=1e-7)  # [.783, .196, .022]
    # EXPO with pi_ref = pi* stays at pi* for every lambda
    for lam in (0.1, 1.0, 10.0):
        e = _population_optimum("expo", pi_star, pi_star, lam=lam, kl_estimator="token")
        torch.testing.assert_close(e, torch.tensor(pi_star, dtype=DT), rtol=1e-6, atol=1e-7)
    # and moves monotonically from pi* to pi_ref as lambda grows
    ref = torch.tensor(pi_ref, dtype=DT)
    dists = []
    for lam in (0.0, 0.3, 1.0, 3.0, 30.0):
        e = _population_optimum("expo", pi_ref, pi_star, lam=lam, kl_estimator="token")
        dists.append(float((e - ref).abs().sum()))
        if lam == 0.0:
            torch.testing.assert_close(e, torch.tensor(pi_star, dtype=DT), rtol=1e-6, atol=1e-7)
    assert all(a > b for a, b in zip(dists, dists[1:], strict=False)), dists
    assert dists[-1] < 0.05


# ------------------------------------------------------------------------------------------------
# aggregation (per-token -> per-sequence)
# ------------------------------------------------------------------------------------------------
def test_aggregate_plain_sums_lengths_nll():
    lp = torch.tensor(
        [[-1.0, -2.0, -3.0, 0.0], [-0.5, -0.5, 0.0, 0.0], [-1.0, -1.0, -1.0, -1.0], [-2.0, float("-inf"), 0.0, 0.0]],
        dtype=DT,
    )
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    out = aggregate_pair_logps(lp, mask)
    torch.testing.assert_close(out.chosen_logps, torch.tensor([-6.0, -0.5], dtype=DT))
    torch.testing.assert_close(out.rejected_logps, torch.tensor([-4.0, -2.0], dtype=DT))  # -inf is masked out
    assert out.chosen_lengths.tolist() == [3, 2] and out.rejected_lengths.tolist() == [4, 1]
    torch.testing.assert_close(out.chosen_nll, torch.tensor(6.5 / 5, dtype=DT))
    assert out.weights is None
    s, n = sequence_logps(lp, mask)
    torch.testing.assert_close(s, torch.tensor([-6.0, -0.5, -4.0, -2.0], dtype=DT))
    assert n.tolist() == [3, 2, 4, 1]


def test_aggregate_ld_alpha_by_hand():
    # pair 0: chosen 3 tokens, rejected 5 -> shared 3; pair 1: chosen 4, rejected 2 -> shared 2
    lp = -torch.arange(1, 25, dtype=DT).reshape(4, 6) / 10
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0], [0, 0, 0, 1, 1, 0]])
    a = 0.3
    out = aggregate_pair_logps(lp, mask, ld_alpha=a)
    v = lp.tolist()
    chosen0 = v[0][1] + v[0][2] + v[0][3]
    chosen1 = v[1][0] + v[1][1] + a * (v[1][2] + v[1][3])
    rej0 = v[2][0] + v[2][1] + v[2][2] + a * (v[2][3] + v[2][4])
    rej1 = v[3][3] + v[3][4]
    torch.testing.assert_close(out.chosen_logps, torch.tensor([chosen0, chosen1], dtype=DT))
    torch.testing.assert_close(out.rejected_logps, torch.tensor([rej0, rej1], dtype=DT))
    # the NLL ignores the LD weighting
    torch.testing.assert_close(out.chosen_nll, -(lp[0, 1:4].sum() + lp[1, :4].sum()) / 7)
    # ld_alpha = 1 is the plain sum
    plain = aggregate_pair_logps(lp, mask)
    torch.testing.assert_close(aggregate_pair_logps(lp, mask, ld_alpha=1.0).chosen_logps, plain.chosen_logps)


def test_wpo_weights_by_hand():
    g = torch.Generator().manual_seed(2)
    lp = -torch.rand(4, 5, generator=g, dtype=DT)
    lsp = -torch.rand(4, 5, generator=g, dtype=DT)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0], [1, 0, 0, 0, 0]])
    seq_w = [math.exp(sum(lp[i, j] - lsp[i, j] for j in range(5) if mask[i, j]) / int(mask[i].sum())) for i in range(4)]
    expected = torch.tensor([seq_w[0] * seq_w[2], seq_w[1] * seq_w[3]], dtype=DT)
    torch.testing.assert_close(wpo_weights(lp, lsp, mask), expected)
    torch.testing.assert_close(aggregate_pair_logps(lp, mask, log_sum_p2=lsp).weights, expected)
    assert not wpo_weights(lp.requires_grad_(True), lsp, mask).requires_grad
    # float32 inputs: summed in float64, returned in float32
    w32 = wpo_weights(lp.detach().float(), lsp.float(), mask)
    assert w32.dtype == torch.float32
    torch.testing.assert_close(w32, expected.float())


# ------------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------------
TRL_DPO_TYPES = [
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
]


def test_registry_covers_trl_and_extras():
    for n in TRL_DPO_TYPES + ["simpo", "cpo", "alphapo", "orpo", "kto", "apo_zero_unpaired", "odpo", "rpo", "expo"]:
        assert n in LOSSES, n
        spec = LOSSES[n]
        assert spec.description and callable(spec.fn)
    assert LOSSES["sigmoid"].requires_reference and not LOSSES["simpo"].requires_reference
    assert LOSSES["expo"].reference == "optional"
    assert LOSSES["ipo"].needs_lengths and LOSSES["orpo"].needs_nll and LOSSES["aot"].batch_coupled
    # plain DPO normalizes by nothing and has no NLL term; every loss says what it computes
    assert not LOSSES["sigmoid"].needs_lengths and not LOSSES["sigmoid"].needs_nll
    assert not LOSSES["kto"].needs_lengths and not LOSSES["kto"].needs_nll
    assert all(spec.description for spec in LOSSES.values())
    assert LOSSES["sigmoid"].defaults["label_smoothing"] == 0.0
    assert LOSSES["sigmoid"].defaults["beta"] == 0.1
    assert LOSSES["discopop"].defaults["discopop_tau"] == 0.05
    assert LOSSES["simpo"].canonical("simpo_gamma") == "gamma"


def test_register_custom_loss():
    from expo_kernels.losses import HParam, register_loss
    from expo_kernels.losses._common import LossTerms

    @register_loss("_test_margin", hparams=[HParam("k", 2.0, "scale")], reference="none", description="test")
    def _margin(batch, hp):
        return LossTerms(hp["k"] * (batch.rejected - batch.chosen), lambda: {})

    try:
        (c, r, _, _), _, _ = _inputs(seed=17)
        torch.testing.assert_close(preference_loss("_test_margin", c, r, k=3.0), (3.0 * (r - c)).mean())
        with pytest.raises(ValueError, match="already registered"):
            register_loss("_test_margin")(_margin)
    finally:
        LOSSES.pop("_test_margin")


def test_package_exports():
    import expo_kernels

    assert expo_kernels.preference_loss is preference_loss
    assert expo_kernels.LOSSES is LOSSES
    assert {"preference_loss", "preference_loss_and_metrics", "LOSSES"} <= set(expo_kernels.__all__)


# ---------------------------------------------------------------------------------------------- overflow
# Regression tests: float32 must give the float64 answer (value and gradient) of the plain formula where
# that answer is representable; before the fixes these gave NaN / inf / a zero gradient.
def _grad_pair(fn, *inputs):
    """Value and input gradients of fn in float32 and float64."""
    out = []
    for dt in (torch.float32, torch.float64):
        xs = [torch.tensor(x, dtype=dt, requires_grad=True) for x in inputs]
        v = fn(*xs)
        grads = torch.autograd.grad(v, xs, allow_unused=True)
        out.append((v.detach(), [torch.zeros(()) if g is None else g for g in grads]))
    return out


def _discopop_plain(c, r, cr, rr, beta=0.1, tau=0.05):
    z = beta * ((c - cr) - (r - rr))
    w = torch.sigmoid(z / tau)
    return (-(1 - w) * torch.log(torch.sigmoid(z)) + w * torch.exp(-z)).double()


def test_discopop_float32_extreme_margin_is_finite():
    one = lambda v: torch.tensor([v], dtype=torch.float32)  # noqa: E731
    got = preference_loss("discopop", one(-1000.0), one(-100.0), one(-100.0), one(-100.0), beta=0.1)
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(90.0, rel=1e-6)  # float64 of the plain formula
    (v32, g32), (v64, g64) = _grad_pair(
        lambda c: preference_loss(
            "discopop", c.reshape(1), *(torch.full((1,), -100.0, dtype=c.dtype) for _ in range(3)), beta=0.1
        ),
        -1000.0,
    )
    assert torch.isfinite(g32[0]) and g32[0].item() == pytest.approx(g64[0].item(), rel=1e-5)


@pytest.mark.parametrize("m", [-30.0, -5.0, -0.3, 0.0, 0.2, 1.0, 4.0, 40.0])
@pytest.mark.parametrize("tau", [0.05, 1.0])
def test_discopop_matches_float64_plain_formula(m, tau):
    def ours(c):
        z = torch.zeros(1, dtype=c.dtype)
        return preference_loss("discopop", c.reshape(1), z, z, z, beta=0.5, discopop_tau=tau)

    (v32, g32), (v64, g64) = _grad_pair(ours, m)
    c64 = torch.tensor(m, dtype=torch.float64, requires_grad=True)
    z = torch.zeros((), dtype=torch.float64)
    want = _discopop_plain(c64, z, z, z, beta=0.5, tau=tau)
    (gwant,) = torch.autograd.grad(want, c64)
    torch.testing.assert_close(v64, want.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g64[0], gwant, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(v32.double(), want.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g32[0].double(), gwant, rtol=1e-4, atol=1e-7)


def _orpo_f32_and_reference(c_sum, r_sum, lc, lr, nll=0.0, beta=0.1):
    """ORPO in float32 (value, d/dc, d/dr) and ``reference.loss_orpo`` in float64 (value, d/dc, d/dr) of the
    same float32-rounded inputs: the library's float32 against the independent hand formula."""
    lengths = torch.tensor([lc]), torch.tensor([lr])
    c32 = torch.tensor([c_sum], dtype=torch.float32, requires_grad=True)
    r32 = torch.tensor([r_sum], dtype=torch.float32, requires_grad=True)
    nll32 = torch.tensor(nll, dtype=torch.float32)
    v32 = preference_loss(
        "orpo", c32, r32, chosen_lengths=lengths[0], rejected_lengths=lengths[1], chosen_nll=nll32, beta=beta
    )
    g32 = torch.autograd.grad(v32, (c32, r32))
    c64, r64 = (x.detach().double().requires_grad_(True) for x in (c32, r32))
    s = dict(c=c64, r=r64, lc=lengths[0].double(), lr=lengths[1].double(), nll=nll32.double())
    v64 = loss_orpo(s, beta).mean()
    g64 = torch.autograd.grad(v64, (c64, r64))
    return (v32.detach(), g32), (v64.detach(), g64)


@pytest.mark.parametrize(
    "pc,pr",
    [
        (-1e-30, -2.0),  # float32's normal range: log-odds ~ 69
        (-1e-9, -2.0),
        (-1e-6, -2.0),
        (-0.3, -2.0),
        (-0.69, -2.0),  # either side of log1mexp's switch at -log 2
        (-0.7, -2.0),
        (-5.0, -2.0),
        (-120.0, -2.0),  # log(1 - e^a) ~ -e^a underflows
        (-2.0, -1e-7),  # the rejected side near probability 1
        (-1e-7, -3e-7),  # both near 1: a difference of two large log-odds
        (-150.0, -100.0),  # both far out: log-odds ~ the averages themselves
    ],
)
@pytest.mark.parametrize("lc,lr", [(1, 1), (7, 3)])
def test_orpo_log_odds_float32_matches_float64_hand_formula(pc, pr, lc, lr):
    """log(1 - exp(a)) near a = 0 and very negative: the float32 value and both gradients equal the float64
    hand formula (``reference.loss_orpo``) at relative precision, however small they are (no atol: the odds
    term is 1e-32 at pc = -1e-30)."""
    (v32, (gc32, gr32)), (v64, (gc64, gr64)) = _orpo_f32_and_reference(pc * lc, pr * lr, lc, lr)
    assert torch.isfinite(v32) and torch.isfinite(gc32).all() and torch.isfinite(gr32).all()
    torch.testing.assert_close(v32.double(), v64, rtol=1e-5, atol=0)
    torch.testing.assert_close(gc32.double(), gc64, rtol=1e-4, atol=0)
    torch.testing.assert_close(gr32.double(), gr64, rtol=1e-4, atol=0)


def test_orpo_probability_one_is_finite():
    """An average log-prob of exactly 0 (float32 reaches it): saturated, not NaN. The hand formula's
    log-odds is +inf there and its log sigma 0: the loss is the NLL alone (the gradient is saturated to a
    finite value by the library; the formula's own is 0 * inf there, so only finiteness is asserted)."""
    for dt in (torch.float32, torch.float64):
        c = torch.zeros(1, dtype=dt, requires_grad=True)
        n = torch.ones(1, dtype=torch.long)
        nll = torch.tensor(0.25, dtype=dt)
        r = torch.full((1,), -1.0, dtype=dt)
        loss = preference_loss("orpo", c, r, chosen_lengths=n, rejected_lengths=n, chosen_nll=nll)
        (g,) = torch.autograd.grad(loss, c)
        assert torch.isfinite(loss) and torch.isfinite(g)
        s = dict(c=c.detach().double(), r=r.double(), lc=n.double(), lr=n.double(), nll=nll.double())
        want = loss_orpo(s, 0.1).mean()
        assert want.item() == 0.25
        torch.testing.assert_close(loss.double(), want, rtol=1e-7, atol=1e-30)


def test_forward_kl_saturated_scores_do_not_cancel_to_nan():
    one = lambda v, dt: torch.tensor([v], dtype=dt)  # noqa: E731
    for dt in (torch.float32, torch.float64):  # float64: log 2 exactly (equal log-ratios)
        got = preference_loss(
            "sigmoid",
            one(-200.0, dt),
            one(-200.0, dt),
            one(-100.0, dt),
            one(-100.0, dt),
            f_divergence_type="forward_kl",
        )
        assert got.item() == pytest.approx(math.log(2.0), rel=1e-6)


def test_alphapo_reward_saturates_instead_of_nan():
    n = torch.ones(1, dtype=torch.long)
    for dt in (torch.float32, torch.float64):
        c = torch.full((1,), -1000.0 if dt == torch.float32 else -5000.0, dtype=dt)
        got = preference_loss("cpo", c, c.clone(), alpha=0.5, cpo_alpha=0.0, chosen_lengths=n, rejected_lengths=n)
        assert got.item() == pytest.approx(math.log(2.0), rel=1e-6)  # equal rewards, not inf - inf
    # float64 keeps the exponent up to its own limit (exp(700)), not float32's (exp(80)): rewards of
    # -(exp(100) - 1) and -(exp(100.02) - 1) give a margin of about 2.7e41, a loss of 0 (at float32's clamp, 0
    # and a loss of log 2)
    c, r = torch.tensor([-100.0], dtype=torch.float64), torch.tensor([-100.02], dtype=torch.float64)
    got = preference_loss("alphapo", c, r, alpha=1.0, beta=1.0, gamma=0.0, chosen_lengths=n, rejected_lengths=n)
    rc, rr = -math.expm1(100.0), -math.expm1(100.02)
    assert rc - rr > 1e41 and got.item() == pytest.approx(-math.log(sig(torch.tensor(rc - rr)).item()), abs=1e-12)


@pytest.mark.parametrize("name,c,r", [("apo_zero", 300.0, -400.0), ("apo_down", -600.0, -1000.0)])
def test_apo_small_terms_keep_relative_precision(name, c, r):
    """sigma(-x) instead of 1 - sigma(x): the tail term and its gradient survive in float32."""

    def ours(x):
        z = torch.zeros(1, dtype=x.dtype)
        return preference_loss(name, x.reshape(1), torch.full((1,), r, dtype=x.dtype), z, z, beta=0.1)

    (v32, g32), _ = _grad_pair(ours, c)
    # exact in float64: 1 - sigma(x) = sigma(-x) (1 - sigma(40) rounds to 0 even in float64)
    x = torch.tensor(c, dtype=torch.float64, requires_grad=True)
    b = 0.1
    want = (
        torch.sigmoid(-b * x) + torch.sigmoid(b * torch.tensor(r, dtype=torch.float64))
        if name == "apo_zero"
        else torch.sigmoid(b * x) + torch.sigmoid(-b * (x - r))
    )
    (gwant,) = torch.autograd.grad(want, x)
    torch.testing.assert_close(v32.double(), want.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(g32[0].double(), gwant, rtol=1e-4, atol=0)


def _kto_f32_and_reference(pol, ref, lab, beta, *, kl=None, kl_logps=None, ref_kl_logps=None, wd=1.0, wu=1.0):
    """KTO in float32 (value, d/d policy_logps, d/d kl_logps) and ``reference.loss_kto`` in float64 of the same
    float32-rounded inputs, the baseline ``z0`` from ``reference.kto_kl_baseline`` when ``kl_logps`` is given."""
    f32 = lambda x: torch.as_tensor(x, dtype=torch.float32)  # noqa: E731
    lab = torch.as_tensor(lab)
    p32 = f32(pol).clone().requires_grad_(True)
    ref32 = f32(ref)
    hp = dict(beta=beta, desirable_weight=wd, undesirable_weight=wu)
    if kl_logps is None:
        v32 = preference_loss("kto", policy_logps=p32, ref_logps=ref32, is_desirable=lab, kl=kl, **hp)
        (gp32,) = torch.autograd.grad(v32, p32)
        gk32 = None
        z0 = torch.tensor(kl, dtype=torch.float64)
    else:
        k32 = f32(kl_logps).clone().requires_grad_(True)
        kr32 = f32(ref_kl_logps)
        v32 = preference_loss(
            "kto", policy_logps=p32, ref_logps=ref32, is_desirable=lab, kl_logps=k32, ref_kl_logps=kr32, **hp
        )
        gp32, gk32 = torch.autograd.grad(v32, (p32, k32), allow_unused=True)
        z0 = kto_kl_baseline(k32.detach().double(), kr32.double())
    p64 = p32.detach().double().requires_grad_(True)
    s = dict(pol=p64, ref=ref32.double(), is_desirable=lab, kl=z0)
    v64 = loss_kto(s, beta, wd, wu).mean()
    (gp64,) = torch.autograd.grad(v64, p64)
    return (v32.detach(), gp32, gk32), (v64.detach(), gp64), z0


@pytest.mark.parametrize(
    "h,desirable,z0",
    [
        (25.0, True, 0.0),  # 1 - sigma(25) = 1.4e-11: rounds to 0 if formed as 1 - sigma in float32
        (60.0, True, 0.0),  # 9e-27
        (60.0, True, 3.5),
        (-25.0, False, 0.0),  # undesirable: 1 - sigma(z0 - h)
        (-60.0, False, 2.0),
        (0.0, True, 0.0),
        (1e-6, False, 0.0),
    ],
)
def test_kto_small_terms_keep_relative_precision(h, desirable, z0):
    """The float32 loss and policy gradient of a saturated KTO term equal the float64 hand formula
    (``reference.loss_kto``) at relative precision, without an absolute floor."""
    (v32, gp32, _), (v64, gp64), _ = _kto_f32_and_reference([h], [0.0], [desirable], 1.0, kl=z0)
    torch.testing.assert_close(v32.double(), v64, rtol=1e-5, atol=0)
    torch.testing.assert_close(gp32.double(), gp64, rtol=1e-4, atol=0)


@pytest.mark.parametrize(
    "kl_shift",
    [
        -3.0,  # the mismatched pairs' policy below the reference: mean < 0, z0 clamped to 0
        -1e-4,  # just below 0: still clamped
        1e-4,  # just above: kept
        0.8,
        40.0,  # a large z0: every desirable term saturates toward 1, every undesirable one toward 0
    ],
)
@pytest.mark.parametrize("scale", [1.0, 300.0], ids=["short", "long"])  # long: large summed log-probs
def test_kto_batch_kl_baseline_matches_hand_formula(kl_shift, scale):
    """KTO with the baseline estimated from ``kl_logps``/``ref_kl_logps`` (``z0 = max(0, mean(kl - ref_kl))``,
    detached), float32 against the float64 hand formula with ``reference.kto_kl_baseline``: value, policy
    gradient, and no gradient into ``kl_logps``."""
    g = torch.Generator().manual_seed(int(kl_shift * 10) % 97 + int(scale))
    n, k = 8, 6
    pol = -torch.rand(n, generator=g, dtype=torch.float64) * 20 * scale
    ref = pol + torch.randn(n, generator=g, dtype=torch.float64) * 2
    lab = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.bool)
    klr = -torch.rand(k, generator=g, dtype=torch.float64) * 20 * scale
    klp = klr + kl_shift + torch.randn(k, generator=g, dtype=torch.float64) * 0.01 * abs(kl_shift)
    (v32, gp32, gk32), (v64, gp64), z0 = _kto_f32_and_reference(
        pol, ref, lab, 0.3, kl_logps=klp, ref_kl_logps=klr, wd=1.2, wu=0.7
    )
    assert (z0 == 0) == (kl_shift < 0)
    torch.testing.assert_close(v32.double(), v64, rtol=1e-5, atol=0)
    # Same float32-rounded inputs, no atol. At z0 = 40 every desirable term saturates toward 1: its gradient
    # w beta s (1 - s) comes from torch's sigmoid backward on a float32 s = sigma(beta (z0 - h)) ~ sigma(12),
    # whose 1 - s = 6e-6 keeps only eps / 6e-6 = 1e-2 relative precision: what float32 resolves there.
    rtol = 5e-2 if kl_shift > 10 else 1e-4
    torch.testing.assert_close(gp32.double(), gp64, rtol=rtol, atol=0)
    assert gk32 is None or gk32.abs().max() == 0


@pytest.mark.parametrize("counts", [(1, 0), (0, 0), (2, 3)])
def test_batch_nll_is_the_token_mean_at_one_or_no_token(counts):
    # CPO's NLL term: -sum(chosen log-probs) / (chosen tokens in the batch), the count taken as at least
    # 1 (a batch without a counted chosen token, whose sums are 0, gets 0, not NaN)
    c = torch.tensor([-2.5, 0.0], dtype=DT) if counts[0] == 1 else torch.tensor([-2.5, -4.0], dtype=DT)
    if counts == (0, 0):
        c = torch.zeros(2, dtype=DT)
    r = torch.tensor([-3.0, -1.0], dtype=DT)
    lengths = torch.tensor(counts)
    got = preference_loss(
        "cpo",
        c,
        r,
        beta=0.1,
        cpo_alpha=1.0,
        chosen_lengths=lengths,
        rejected_lengths=torch.tensor([4, 4]),
    )
    nll = -c.sum() / max(1, sum(counts))
    want = (-F.logsigmoid(0.1 * (c - r))).mean() + nll
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_f_divergence_scores_use_float64s_exponent_range():
    # float64 log-ratios keep exp up to float64's limit (exp(700)), not float32's (exp(80)): a chosen log-ratio
    # of -100 (forward KL: score 1 - exp(100)) and a rejected one of 400 (alpha = 1.5: (exp(200) - 1) / 0.5)
    z = torch.zeros(1, dtype=DT)

    def loss(kind, uc, ur):
        c, r = torch.full((1,), uc, dtype=DT), torch.full((1,), ur, dtype=DT)
        return preference_loss("sigmoid", c, r, z, z, beta=0.1, f_divergence_type=kind, f_alpha_divergence_coef=1.5)

    # -log sigma(beta * (sc - sr)) at a margin of -x, x ~ 1e42 or 1e86: x (log1p(exp(-x)) is 0 in float64)
    assert loss("forward_kl", -100.0, 0.0).item() == pytest.approx(0.1 * math.expm1(100.0), rel=1e-12)
    assert loss("alpha_divergence", 0.0, 400.0).item() == pytest.approx(0.1 * 2 * math.expm1(200.0), rel=1e-12)


def test_alpha_divergence_exp_of_16_bit_log_ratios_is_taken_in_float32():
    # u = 5/256 (exact in bfloat16), alpha = 0.5: t = -u/2 and exp(t) - 1 = -0.00972; rounded to bfloat16 first,
    # exp(t) = 0.99219 and the score would come out 0.0156 instead of 0.0194 (20% off)
    c = torch.tensor([-0.5], dtype=torch.bfloat16)
    cr = torch.tensor([-0.51953125], dtype=torch.bfloat16)
    r = torch.tensor([-1.0], dtype=torch.bfloat16)
    got = preference_loss("sigmoid", c, r, cr, r, beta=100.0, f_divergence_type="alpha_divergence")
    assert got.dtype == torch.bfloat16
    u = 0.01953125
    score = math.expm1(-0.5 * u) / -0.5
    want = math.log1p(math.exp(-100.0 * score))  # -log sigma(beta * (score - 0))
    assert got.item() == pytest.approx(want, rel=2**-6)  # a few bfloat16 roundings of ~2^-9 each


def test_sum_dtype_is_float64_except_on_mps():
    # a device without float64 arithmetic (MPS) sums in float32; every other one in float64 (a device object
    # needs no such device present)
    assert sum_dtype(torch.device("mps")) == torch.float32
    assert sum_dtype(torch.device("cpu")) == torch.float64
    assert sum_dtype(torch.device("cuda", 0)) == torch.float64


@pytest.mark.parametrize("chosen_mask, nll", [([[1, 0], [0, 0]], 1.5), ([[0, 0], [0, 0]], 0.0)])
def test_aggregate_nll_at_one_or_no_chosen_token(chosen_mask, nll):
    # the batch NLL divides by the chosen token count taken as at least 1: one token gives its own -log p
    lp = torch.tensor([[-1.5, -2.0], [-0.25, -1.0], [-3.0, -4.0], [-5.0, -6.0]], dtype=DT)
    mask = torch.tensor([*chosen_mask, [1, 1], [1, 0]])
    assert aggregate_pair_logps(lp, mask).chosen_nll.item() == nll


@pytest.mark.parametrize("name", ["sigmoid", "cpo"])
def test_a_margin_past_float32s_range_gives_a_zero_loss(name):
    # log-ratios of +-3e38 are finite float32 numbers whose difference is not: -log sigma(+inf) = 0 (float64's
    # value, log1p(exp(-6e37))), where the cDPO smoothing term, 0 * log sigma(-inf), would be NaN at eps = 0
    c, r, zero = torch.full((1,), 3e38), torch.full((1,), -3e38), torch.zeros(1)
    one = torch.ones(1, dtype=torch.long)
    if name == "cpo":
        got = preference_loss("cpo", c, r, cpo_alpha=0.0, chosen_lengths=one, rejected_lengths=one)
    else:
        got = preference_loss("sigmoid", c, r, zero, zero)
    assert got.item() == 0.0


_DEFAULT_DEVICE_CASES = [(name, {}) for name in sorted(LOSSES)] + [
    ("cpo", dict(cpo_alpha=0.0)),  # no NLL term: its zero metric is made, not taken from the inputs
    ("kto", dict(unpaired=True)),
    ("apo_zero_unpaired", dict(unpaired=True)),
]


@pytest.mark.parametrize("name, kw", _DEFAULT_DEVICE_CASES, ids=[f"{n}-{sorted(k)}" for n, k in _DEFAULT_DEVICE_CASES])
def test_losses_follow_their_inputs_device_not_the_default(name, kw):
    # a trainer may set another default device (torch.set_default_device): every tensor a loss makes goes to
    # its inputs' device. Under a "meta" default, one made without a device would fail (or come out on meta).
    (c, r, cr, rr), lc, lr = _inputs(seed=13, b=4)
    kw = dict(kw)
    if kw.pop("unpaired", False):
        args = dict(policy_logps=torch.cat([c, r]), ref_logps=torch.cat([cr, rr]), kl=0.1)
        args["is_desirable"] = torch.tensor([True] * 4 + [False] * 4)
    else:
        args = dict(chosen_logps=c, rejected_logps=r, ref_chosen_logps=cr, ref_rejected_logps=rr)
        args.update(
            chosen_lengths=lc,
            rejected_lengths=lr,
            **{"odpo": dict(offset=0.5), "expo": dict(lam=0.2), "kto": dict(kl=0.1)}.get(name, {}),
        )
    (want, want_metrics), (got, metrics) = as_is_and_under_a_meta_default(
        lambda: preference_loss_and_metrics(name, **args, **kw)
    )
    assert got.device.type == "cpu" and torch.equal(got, want)
    assert metrics.keys() == want_metrics.keys() and all(torch.equal(metrics[k], want_metrics[k]) for k in metrics)


def test_aggregation_follows_its_inputs_device_not_the_default():
    g = torch.Generator().manual_seed(14)
    lp, lsp = -torch.rand(4, 6, generator=g), -torch.rand(4, 6, generator=g)
    mask = torch.rand(4, 6, generator=g) > 0.3
    want, got = as_is_and_under_a_meta_default(lambda: aggregate_pair_logps(lp, mask, ld_alpha=0.5, log_sum_p2=lsp))
    for field in ("chosen_logps", "rejected_logps", "chosen_lengths", "rejected_lengths", "chosen_nll", "weights"):
        assert getattr(got, field).device.type == "cpu" and torch.equal(getattr(got, field), getattr(want, field))


def test_float32_per_token_logps_are_summed_and_returned_in_float64():
    # the sequence sums take float64 (sum_dtype): 3000 float32 terms of ~1 summed in float32 lose ~1e-4
    g = torch.Generator().manual_seed(15)
    lp = -torch.rand(2, 3000, generator=g)
    out = aggregate_pair_logps(lp, torch.ones(2, 3000, dtype=torch.bool))
    assert out.chosen_logps.dtype == torch.float64 and out.chosen_nll.dtype == torch.float64
    assert out.chosen_logps.item() == pytest.approx(math.fsum(lp[0].double().tolist()), rel=1e-13, abs=0)
    assert out.rejected_logps.item() == pytest.approx(math.fsum(lp[1].double().tolist()), rel=1e-13, abs=0)

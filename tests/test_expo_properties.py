"""Population-level properties of DPO and EXPO on the three-outcome toy (docs/design.md, "Losses").

A softmax policy over three outcomes (float64). Preferences: Bradley-Terry with reward log pi*,
pi* = [.6, .3, .1]; reference pi_ref = [.4, .4, .2]. Pairs: y, y' drawn independently from a pair
source (pi_ref = [.4, .4, .2] unless a test says otherwise) and kept if y != y'; the labeller names the
winner. The exact expected loss is a sum over the six ordered (winner, loser) pairs of
P(pair) * P(winner beats loser) * per-pair loss. The per-pair losses come from the package registry
(``expo_kernels.losses.preference_loss``); a hand-written path of the same formulas checks the registry
and the closed forms. Optima by damped Newton in float64 to gradient norm < 1e-10, several starts.
See examples/expo_toy.py for the same experiments as a table and a plot.
"""

from __future__ import annotations

import pytest
import torch

from expo_kernels.losses import preference_loss

DT = torch.float64
PI_STAR = (0.6, 0.3, 0.1)
PI_REF = (0.4, 0.4, 0.2)
UNIFORM = (1 / 3, 1 / 3, 1 / 3)
BETAS = (0.5, 1.0, 2.0)
LAM_GRID = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
GRAD_TOL = 1e-10
MAX_STEP = 4.0  # longest Newton step in logit space


def probs(p) -> torch.Tensor:
    p = torch.as_tensor(p, dtype=DT)
    return p / p.sum()


def kl(p, q) -> float:
    p, q = probs(p), probs(q)
    return float((p * (p.log() - q.log())).sum())


def pairs(pair_source=PI_REF):
    """Ordered (winner, loser) index tensors and their probabilities (summing to 1)."""
    star, src = probs(PI_STAR), probs(pair_source)
    win, lose = torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([1, 2, 0, 2, 0, 1])
    p_pair = 2 * src[win] * src[lose] / (1 - (src**2).sum())  # unordered pair {win, lose}, distinct draws
    p_win = star[win] / (star[win] + star[lose])  # Bradley-Terry with reward log pi*
    return win, lose, p_pair * p_win


# ------------------------------------------------------------------ the two per-pair paths
def registry_per_pair(method, c, r, c_ref, r_ref, beta):
    if method == "dpo":
        return preference_loss("sigmoid", c, r, c_ref, r_ref, beta=beta, reduction="none")
    return preference_loss("expo", c, r, c_ref, r_ref, lam=0.0, kl_estimator="sequence", reduction="none")


def hand_per_pair(method, c, r, c_ref, r_ref, beta):
    """The formulas of docs/design.md, "Losses", written out: -log sigma(x) = log(1 + exp(-x))."""
    if method == "dpo":
        x = beta * ((c - c_ref) - (r - r_ref))
    else:  # EXPO's Bradley-Terry term softplus(-(c - r)): no reference, no beta
        x = c - r
    return torch.log1p(torch.exp(-x))


def population_loss(theta, method, *, pi_ref=PI_REF, beta=1.0, lam=0.0, pair_source=PI_REF, per_pair=registry_per_pair):
    win, lose, weight = pairs(pair_source)
    logp = torch.log_softmax(theta, -1)
    logq = probs(pi_ref).log()
    loss = (weight * per_pair(method, logp[win], logp[lose], logq[win], logq[lose], beta)).sum()
    if method == "expo":
        loss = loss + lam * (logq.exp() * (logq - logp)).sum()  # exact KL(pi_ref || pi_theta)
    return loss


# ------------------------------------------------------------------ the optimizer
def newton(f, t):
    """Damped Newton on a smooth strictly convex f: R^2 -> R, to gradient norm < GRAD_TOL."""
    t = t.clone()
    for _ in range(100):
        x = t.detach().requires_grad_(True)
        y = f(x)
        (g,) = torch.autograd.grad(y, x, create_graph=True)
        if float(g.detach().norm()) < GRAD_TOL:
            return t
        h = torch.stack([torch.autograd.grad(g[i], x, retain_graph=True)[0] for i in range(2)])
        g, f0 = g.detach(), float(y.detach())
        step = -torch.linalg.solve(h.detach(), g)
        step = step * min(1.0, MAX_STEP / float(step.norm()))  # flat regions: nearly singular Hessian
        slope = float(step @ g)
        assert slope < 0, "Hessian not positive definite: the objective should be convex"
        a = 1.0
        if -slope > 1e-13 * max(1.0, abs(f0)):  # below that, f cannot judge a step: take Newton's
            with torch.no_grad():
                while float(f(t + a * step)) > f0 + 1e-4 * a * slope and a > 1e-10:
                    a /= 2
        t = t + a * step
    raise AssertionError(f"Newton did not reach gradient norm {GRAD_TOL}")


STARTS = [torch.zeros(2, dtype=DT), torch.tensor([4.0, -4.0], dtype=DT), torch.tensor([-3.0, 5.0], dtype=DT)]


def optimum(method, *, starts=STARTS, **kw) -> torch.Tensor:
    """Population optimum; the logits are fixed to theta = [0, t1, t2] (the losses are shift-invariant)."""

    def f(t):
        return population_loss(torch.cat([t.new_zeros(1), t]), method, **kw)

    found = [torch.softmax(torch.cat([t.new_zeros(1), t]), -1) for t in (newton(f, t0) for t0 in starts)]
    for p in found[1:]:
        torch.testing.assert_close(p, found[0], atol=1e-8, rtol=0)
    return found[0]


def dpo_closed_form(pi_ref, beta) -> torch.Tensor:
    return probs(probs(pi_ref) * probs(PI_STAR) ** (1 / beta))


# ------------------------------------------------------------------ the registry against the formulas
@pytest.mark.parametrize("method,beta", [("dpo", 0.1), ("dpo", 1.0), ("dpo", 2.0), ("expo", None)])
def test_registry_per_pair_matches_hand_formulas(method, beta):
    gen = torch.Generator().manual_seed(0)
    # log-probs in [-4, 0]: |beta * m| <= 16, inside any softplus linearization threshold (torch's is 20)
    c, r, c_ref, r_ref = (-4 * torch.rand(64, generator=gen, dtype=DT) for _ in range(4))
    got = registry_per_pair(method, c, r, c_ref, r_ref, beta)
    assert got.shape == c.shape and got.dtype == DT
    torch.testing.assert_close(got, hand_per_pair(method, c, r, c_ref, r_ref, beta), rtol=1e-12, atol=1e-12)
    if method == "expo":  # its Bradley-Terry term ignores the reference
        torch.testing.assert_close(registry_per_pair(method, c, r, c_ref + 5.0, r_ref - 3.0, beta), got)


@pytest.mark.parametrize(
    "method,kw", [("dpo", dict(beta=0.5)), ("dpo", dict(beta=2.0)), ("expo", dict(lam=0.0)), ("expo", dict(lam=3.0))]
)
def test_population_loss_and_gradient_match_hand_path(method, kw):
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        theta = (2 * torch.randn(3, generator=gen, dtype=DT)).requires_grad_(True)
        a = population_loss(theta, method, **kw)
        (ga,) = torch.autograd.grad(a, theta)
        b = population_loss(theta, method, per_pair=hand_per_pair, **kw)
        (gb,) = torch.autograd.grad(b, theta)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-14)


# ------------------------------------------------------------------ closed forms
def test_design_quoted_numbers():
    assert dpo_closed_form(PI_REF, 1.0).tolist() == pytest.approx([0.632, 0.316, 0.053], abs=5e-4)
    assert dpo_closed_form(PI_STAR, 1.0).tolist() == pytest.approx([0.783, 0.196, 0.022], abs=5e-4)
    # pi_ref = pi*: normalize(pi* * pi*^(1/beta)) = normalize(pi*^(1 + 1/beta))
    for beta in BETAS:
        torch.testing.assert_close(dpo_closed_form(PI_STAR, beta), probs(probs(PI_STAR) ** (1 + 1 / beta)))


@pytest.mark.parametrize("beta", BETAS)
def test_dpo_population_optimum_is_closed_form(beta):
    p = optimum("dpo", beta=beta)
    torch.testing.assert_close(p, dpo_closed_form(PI_REF, beta), atol=1e-6, rtol=0)
    # DPO's optimum does not depend on which pairs are shown (any full-support pair distribution)
    torch.testing.assert_close(optimum("dpo", beta=beta, pair_source=UNIFORM), p, atol=1e-8, rtol=0)


# ------------------------------------------------------------------ pi_ref = pi*: DPO drifts, EXPO stays
@pytest.mark.parametrize("beta", BETAS)
def test_dpo_drifts_away_from_pi_star_when_ref_is_pi_star(beta):
    p = optimum("dpo", beta=beta, pi_ref=PI_STAR)
    torch.testing.assert_close(p, probs(probs(PI_STAR) ** (1 + 1 / beta)), atol=1e-6, rtol=0)
    assert float((p - probs(PI_STAR)).abs().max()) > 0.1  # sharpened toward the best outcome
    assert float(p[0]) > PI_STAR[0]


@pytest.mark.parametrize("lam", (0.1, 1.0, 10.0))
def test_expo_keeps_pi_star_when_ref_is_pi_star(lam):
    torch.testing.assert_close(optimum("expo", lam=lam, pi_ref=PI_STAR), probs(PI_STAR), atol=1e-6, rtol=0)


@pytest.mark.parametrize("pair_source", (PI_REF, UNIFORM))
def test_expo_without_regularizer_recovers_pi_star(pair_source):
    torch.testing.assert_close(optimum("expo", lam=0.0, pair_source=pair_source), probs(PI_STAR), atol=1e-6, rtol=0)


# ------------------------------------------------------------------ EXPO's path from pi* to pi_ref
def test_expo_moves_monotonically_from_pi_star_to_pi_ref():
    opts, starts = [], STARTS
    for lam in LAM_GRID:
        p = optimum("expo", lam=lam, starts=starts)
        starts = [STARTS[0], (p.log() - p[0].log())[1:]]  # a fixed start and the previous optimum
        opts.append(p)
    to_star = [kl(p, PI_STAR) for p in opts]
    to_ref = [kl(p, PI_REF) for p in opts]
    noise = 1e-12
    assert all(b >= a - noise for a, b in zip(to_star, to_star[1:], strict=False)), to_star
    assert all(b <= a + noise for a, b in zip(to_ref, to_ref[1:], strict=False)), to_ref
    # the path really moves (strictly, between consecutive grid points), and its ends are pi* and pi_ref
    assert all(b > a for a, b in zip(to_star[1:], to_star[2:], strict=False)) and all(
        b < a for a, b in zip(to_ref, to_ref[1:], strict=False)
    )
    torch.testing.assert_close(opts[0], probs(PI_STAR), atol=1e-6, rtol=0)
    assert abs(to_star[0]) < 1e-12
    torch.testing.assert_close(opts[-1], probs(PI_REF), atol=5e-4, rtol=0)
    assert to_ref[-1] < 1e-6 < to_ref[0]
    # at large lam the distance to pi_ref shrinks like 1/lam^2 (KL is quadratic in the O(1/lam) offset)
    assert to_ref[-1] * 1000.0**2 == pytest.approx(to_ref[-3] * 100.0**2, rel=0.1)

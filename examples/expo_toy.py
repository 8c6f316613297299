"""Three-outcome toy: where DPO and EXPO put their population optima.

A softmax policy ``pi_theta = softmax(theta)`` over three outcomes, float64. Preferences come from a
Bradley-Terry model whose reward is ``log pi*``::

    pi*    = [.6, .3, .1]        (the preference-optimal policy)
    pi_ref = [.4, .4, .2]        (the reference policy)
    P(y preferred over y') = pi*(y) / (pi*(y) + pi*(y'))

Pair distribution (our choice; any distribution with full support on y != y' gives the same optima):
draw y, y' independently from pi_ref and keep the pair if y != y', so an unordered pair {a, b} has
probability ``2 pi_ref(a) pi_ref(b) / (1 - sum pi_ref^2)``. The labeller then names the winner.
The exact expected (population) loss of a policy is therefore a sum over the six ordered
(winner, loser) pairs::

    L(theta) = sum_{w != l} P(pair {w, l}) * P(w beats l) * loss(c, r, c_ref, r_ref)
    c = log pi_theta(w), r = log pi_theta(l), c_ref, r_ref likewise under pi_ref

with the per-pair losses taken from the package's registry (``expo_kernels.losses``):

* DPO (``"sigmoid"``): ``-log sigma(beta ((c - c_ref) - (r - r_ref)))``. Optimum in closed form:
  ``normalize(pi_ref * pi*^(1/beta))``; with ``pi_ref = pi*`` it drifts to ``normalize(pi*^(1+1/beta))``.
* EXPO (``"expo"`` with ``lam=0``, i.e. its Bradley-Terry term ``softplus(-(c - r))``) plus
  ``lam * KL(pi_ref || pi_theta)``, the KL computed exactly over the three outcomes. Optimum: ``pi*``
  at ``lam = 0``, ``pi*`` for every ``lam`` when ``pi_ref = pi*``, and a monotone path from ``pi*`` to
  ``pi_ref`` as ``lam`` grows.

Both objectives are convex in the logits, and invariant to adding a constant to all of them, so we fix
``theta[0] = 0`` and run damped Newton on the other two from several starting points until the
gradient norm is below 1e-10.

Run:  python examples/expo_toy.py [--out examples/expo_toy.png] [--no-plot]
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
from pathlib import Path

import torch

try:
    from expo_kernels.losses import preference_loss
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from expo_kernels.losses import preference_loss

DTYPE = torch.float64
PI_STAR = (0.6, 0.3, 0.1)
PI_REF = (0.4, 0.4, 0.2)
BETAS = (0.5, 1.0, 2.0)
LAMS = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
GRAD_TOL = 1e-10
MAX_STEP = 4.0  # longest Newton step in logit space


def as_probs(p) -> torch.Tensor:
    p = torch.as_tensor(p, dtype=DTYPE)
    return p / p.sum()


def kl(p, q) -> float:
    """KL(p || q) for full-support distributions on three outcomes."""
    p, q = as_probs(p), as_probs(q)
    return float((p * (p.log() - q.log())).sum())


# --------------------------------------------------------------------------- the data
@functools.cache
def ordered_pairs(pi_star: tuple, pair_source: tuple = PI_REF):
    """The six ordered (winner, loser) pairs and their probabilities under the data distribution.

    Pairs: y, y' drawn independently from ``pair_source`` (default pi_ref = [.4, .4, .2], also when
    the reference policy is changed; the data are fixed), kept if y != y'. The winner is drawn from
    Bradley-Terry with reward log pi*. Returns ``winners, losers`` (index tensors) and ``weights``
    (summing to 1).
    """
    pi_star, src = as_probs(pi_star), as_probs(pair_source)
    draw = torch.outer(src, src).fill_diagonal_(0.0)
    draw = draw / draw.sum()  # P(ordered draw (a, b)), a != b
    winners, losers, weights = [], [], []
    for win in range(3):
        for lose in range(3):
            if win != lose:
                p_pair = draw[win, lose] + draw[lose, win]  # the unordered pair {win, lose}
                p_win = pi_star[win] / (pi_star[win] + pi_star[lose])  # Bradley-Terry, reward log pi*
                winners.append(win)
                losers.append(lose)
                weights.append(p_pair * p_win)
    return torch.tensor(winners), torch.tensor(losers), torch.stack(weights)


# --------------------------------------------------------------------------- the losses
def _per_pair(name, c, r, c_ref, r_ref, **hparams) -> torch.Tensor:
    """Per-pair loss values ([6]) from the package registry."""
    return preference_loss(name, c, r, c_ref, r_ref, reduction="none", **hparams)


def population_loss(theta, method, *, pi_star=PI_STAR, pi_ref=PI_REF, beta=1.0, lam=0.0):
    """Exact expected loss of the policy softmax(theta) (theta: the 3 logits)."""
    winners, losers, weights = ordered_pairs(tuple(pi_star))
    logp = torch.log_softmax(theta, dim=-1)
    logp_ref = as_probs(pi_ref).log()
    c, r = logp[winners], logp[losers]
    c_ref, r_ref = logp_ref[winners], logp_ref[losers]
    if method == "dpo":
        per_pair = _per_pair("sigmoid", c, r, c_ref, r_ref, beta=beta)
        return (weights * per_pair).sum()
    if method == "expo":
        per_pair = _per_pair("expo", c, r, c_ref, r_ref, lam=0.0, kl_estimator="sequence")
        q = logp_ref.exp()
        exact_kl = (q * (logp_ref - logp)).sum()  # KL(pi_ref || pi_theta), all three outcomes
        return (weights * per_pair).sum() + lam * exact_kl
    raise ValueError(f"unknown method {method!r}")


# --------------------------------------------------------------------------- the optimizer
def grad_hess(f, t):
    """Value, gradient and Hessian of f at t (t: a short float64 vector)."""
    t = t.detach().requires_grad_(True)
    y = f(t)
    (g,) = torch.autograd.grad(y, t, create_graph=True)
    h = torch.stack([torch.autograd.grad(g[i], t, retain_graph=True)[0] for i in range(t.numel())])
    return float(y.detach()), g.detach(), h.detach()


def newton(f, t0, *, tol=GRAD_TOL, max_iter=100):
    """Damped Newton (Armijo backtracking) on a smooth convex f: R^n -> R. Returns (t, grad_norm).

    Once the predicted decrease is below the float64 resolution of f the line search cannot judge a
    step any more; there we are in Newton's quadratic region and take the full step.
    """
    t = t0.detach().clone().to(DTYPE)
    for _ in range(max_iter):
        f0, g, h = grad_hess(f, t)
        gnorm = float(g.norm())
        if gnorm < tol:
            return t, gnorm
        step = -torch.linalg.solve(h, g)
        step = step * min(1.0, MAX_STEP / float(step.norm()))  # saturated pairs: nearly singular Hessian
        slope = float(step @ g)
        if not slope < 0:  # not a descent direction (cannot happen for a strictly convex f)
            step, slope = -g, -(gnorm**2)
        a = 1.0
        if -slope > 1e-13 * max(1.0, abs(f0)):
            with torch.no_grad():
                while float(f(t + a * step)) > f0 + 1e-4 * a * slope and a > 1e-10:
                    a *= 0.5
        t = t + a * step
    _, g, _ = grad_hess(f, t)
    return t, float(g.norm())


def starting_points(n_random=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    starts = [
        torch.zeros(2, dtype=DTYPE),
        (as_probs(PI_REF).log() - math.log(PI_REF[0]))[1:],
        torch.tensor([4.0, -4.0], dtype=DTYPE),
    ]
    starts += [3.0 * torch.randn(2, generator=gen, dtype=DTYPE) for _ in range(n_random)]
    return starts


def optimum(method, *, tol=GRAD_TOL, starts=None, **kw) -> torch.Tensor:
    """Population optimum (probabilities) of `method`, agreed on by every starting point."""

    def f(t):
        return population_loss(torch.cat([t.new_zeros(1), t]), method, **kw)

    found = []
    for t0 in starting_points() if starts is None else starts:
        t, gnorm = newton(f, t0, tol=tol)
        if not gnorm < tol:
            raise RuntimeError(f"{method} {kw}: Newton stopped at gradient norm {gnorm:.3g}")
        found.append(torch.softmax(torch.cat([t.new_zeros(1), t]), -1))
    spread = max(float((p - found[0]).abs().max()) for p in found)
    if spread > 1e-8:
        raise RuntimeError(f"{method} {kw}: starting points disagree by {spread:.3g}")
    return found[0]


def dpo_closed_form(pi_ref, pi_star, beta) -> torch.Tensor:
    return as_probs(as_probs(pi_ref) * as_probs(pi_star) ** (1.0 / beta))


# --------------------------------------------------------------------------- the report
def fmt(p) -> str:
    return "[" + ", ".join(f"{float(x):.4f}" for x in p) + "]"


def run_table():
    """Solve every setting, print the table, return the rows (dicts)."""
    rows = []
    for ref_name, ref in (("pi_ref=[.4,.4,.2]", PI_REF), ("pi_ref=pi*", PI_STAR)):
        for beta in BETAS:
            rows.append(
                dict(
                    objective=f"DPO  {ref_name}",
                    method="dpo",
                    ref=ref,
                    param=f"beta={beta:g}",
                    value=beta,
                    opt=optimum("dpo", beta=beta, pi_ref=ref),
                    closed=dpo_closed_form(ref, PI_STAR, beta),
                )
            )
        for lam in LAMS if ref == PI_REF else (0.0, 0.1, 1.0, 10.0):
            closed = as_probs(PI_STAR) if (lam == 0 or ref == PI_STAR) else None
            rows.append(
                dict(
                    objective=f"EXPO {ref_name}",
                    method="expo",
                    ref=ref,
                    param=f"lam={lam:g}",
                    value=lam,
                    opt=optimum("expo", lam=lam, pi_ref=ref),
                    closed=closed,
                )
            )

    head = (
        f"{'objective':<23} {'param':<11} {'optimum':<26} {'|opt-closed|':>12} "
        f"{'KL(opt||pi*)':>13} {'KL(opt||pi_ref)':>16}"
    )
    print(f"pi* = {fmt(PI_STAR)}; Bradley-Terry labels; pairs y != y' drawn from [.4,.4,.2] x [.4,.4,.2]")
    print(head)
    print("-" * len(head))
    for i, row in enumerate(rows):
        if i and row["objective"] != rows[i - 1]["objective"]:
            print()
        p, closed = row["opt"], row["closed"]
        err = f"{float((p - closed).abs().max()):.1e}" if closed is not None else "-"
        # max(., 0): a KL of ~1e-16 can come out as -1e-16 in float64
        print(
            f"{row['objective']:<23} {row['param']:<11} {fmt(p):<26} {err:>12} "
            f"{max(kl(p, PI_STAR), 0.0):>13.3e} {max(kl(p, row['ref']), 0.0):>16.3e}"
        )
    print(
        "closed forms: DPO normalize(pi_ref * pi*^(1/beta)); EXPO pi* (at lam = 0, and for every lam when pi_ref = pi*)"
    )
    return rows


def plot(out: str, dpo_optima: dict):
    """dpo_optima: {(pi_ref, beta): numerical DPO optimum}, from run_table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    lam_grid = torch.logspace(-3, 3, 31, dtype=DTYPE).tolist()
    x_ref = lam_grid[-1] * 1.7  # where the pi_ref markers sit (lam -> infinity)
    colors = ("tab:blue", "tab:orange", "tab:green")
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.0), sharey=True)
    panels = (
        (axes[0], PI_REF, r"$\pi_{ref}$ = [.4, .4, .2]"),
        (axes[1], PI_STAR, r"$\pi_{ref} = \pi^*$ = [.6, .3, .1]: EXPO stays at $\pi^*$, DPO drifts"),
    )
    for ax, ref, title in panels:
        # EXPO along the lam grid, each solve warm-started at the previous optimum (a continuation path)
        expo, start = [], [torch.zeros(2, dtype=DTYPE)]
        for lam in lam_grid:
            p = optimum("expo", lam=lam, pi_ref=ref, starts=start)
            start = [(p.log() - p[0].log())[1:]]
            expo.append(p)
        expo = torch.stack(expo)
        dpo_curve = torch.stack([dpo_closed_form(ref, PI_STAR, b) for b in lam_grid])
        dpo_opt = torch.stack([dpo_optima[(ref, beta)] for beta in BETAS])
        for k in range(3):
            ax.axhline(PI_STAR[k], color=colors[k], lw=0.9, ls="--", alpha=0.45)
            ax.plot(lam_grid, dpo_curve[:, k], color=colors[k], lw=1.3, ls=":")
            ax.plot(lam_grid, expo[:, k], color=colors[k], lw=2.4)
            ax.plot(BETAS, dpo_opt[:, k], marker="D", ms=7, color=colors[k], mec="black", ls="none", zorder=5)
            ax.plot([x_ref], [ref[k]], marker="<", ms=9, color=colors[k], mec="black", clip_on=False, ls="none")
        ax.set_xscale("log")
        ax.set_xlim(lam_grid[0], x_ref)
        ax.set_ylim(0, 1)
        ax.set_xlabel(r"EXPO: $\lambda$        DPO: $\beta$")
        ax.set_title(title, fontsize=11)
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel("probability at the population optimum")

    handles = [
        Line2D([], [], color=c, lw=2.4, label=f"outcome {k}  ($\\pi^*$ = {PI_STAR[k]:g})") for k, c in enumerate(colors)
    ]
    handles += [
        Line2D([], [], color="gray", lw=2.4, label=r"EXPO optimum vs $\lambda$"),
        Line2D(
            [], [], color="gray", lw=1.3, ls=":", label=r"DPO closed form $\propto\pi_{ref}\,\pi^{*1/\beta}$ vs $\beta$"
        ),
        Line2D(
            [],
            [],
            color="gray",
            marker="D",
            mec="black",
            ls="none",
            label=r"DPO numerical optimum, $\beta$ = 0.5, 1, 2",
        ),
        Line2D([], [], color="gray", lw=0.9, ls="--", alpha=0.6, label=r"$\pi^*$"),
        Line2D([], [], color="gray", marker="<", mec="black", ls="none", label=r"$\pi_{ref}$ ($\lambda \to \infty$)"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=4, frameon=False, fontsize=9.5)
    fig.suptitle(
        "Three-outcome toy, exact population optima: "
        r"EXPO moves from $\pi^*$ ($\lambda$ = 0) to $\pi_{ref}$ ($\lambda \to \infty$); "
        r"DPO lands on $\propto\pi_{ref}\,\pi^{*1/\beta}$",
        fontsize=12,
    )
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    print(f"saved {out}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "expo_toy.png"),
        help="where to save the plot (PNG)",
    )
    ap.add_argument("--no-plot", action="store_true", help="print the table only")
    args = ap.parse_args(argv)
    rows = run_table()
    if not args.no_plot:
        plot(args.out, {(row["ref"], row["value"]): row["opt"] for row in rows if row["method"] == "dpo"})


if __name__ == "__main__":
    main()

"""Independent float64 references: materialize the logits, log_softmax, gather.

Deliberately naive: this is what the fused op must equal, written without any of its tricks.
"""

import math

import torch


def transform_logits(raw, *, temperature=1.0, logit_scale=None, softcap=None):
    z = raw * (1.0 if logit_scale is None else logit_scale)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def logits64(hidden, weight, bias=None, **transform):
    raw = hidden.double() @ weight.double().T
    if bias is not None:
        raw = raw + bias.double()
    return transform_logits(raw, **transform)


def reference_logprobs(hidden, weight, labels, bias=None, *, ignore_index=-100, **transform):
    """float64 [...] per-token log p(label); 0 where labels == ignore_index."""
    z = logits64(hidden.reshape(-1, hidden.shape[-1]), weight, bias, **transform)
    y = labels.reshape(-1)
    valid = y != ignore_index
    logp = torch.log_softmax(z, dim=-1).gather(1, torch.where(valid, y, 0)[:, None])[:, 0]
    return torch.where(valid, logp, torch.zeros_like(logp)).view(labels.shape)


def reference_stats(hidden, weight, labels, bias=None, *, ignore_index=-100, **transform):
    """float64 dict of lse, entropy, mean_logit, is_top1, log_sum_p2 (0/False at ignored)."""
    z = logits64(hidden.reshape(-1, hidden.shape[-1]), weight, bias, **transform)
    y = labels.reshape(-1)
    valid = y != ignore_index
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    out = {
        "lse": torch.logsumexp(z, dim=-1),
        "entropy": -(p * logp).sum(-1),
        "mean_logit": z.mean(-1),
        "is_top1": z.argmax(-1) == y,
        "log_sum_p2": torch.log((p * p).sum(-1)),
    }
    return {k: torch.where(valid, v, torch.zeros_like(v)).view(labels.shape) for k, v in out.items()}


def reference_token_kl(hidden, weight, ref_hidden, ref_weight, labels, bias=None, ref_bias=None, **transform):
    """float64 [...] exact per-token ``KL(pi_ref || pi_theta) = sum_v q_v (log q_v - log p_v)`` (``q``
    the reference's softmax, ``p`` the policy's), 0 where ``labels == -100``. The sum runs over the
    reference's support ``q_v > 0``: a vocabulary entry masked (a ``-inf`` logit) in the reference adds
    nothing, whatever the policy gives it; one the policy masks but the reference does not (``p_v = 0 < q_v``)
    makes the KL ``+inf``. No NaN is formed anywhere (the gradient of a finite KL is finite)."""
    zp = logits64(hidden.reshape(-1, hidden.shape[-1]), weight, bias, **transform)
    zr = logits64(ref_hidden.reshape(-1, ref_hidden.shape[-1]), ref_weight, ref_bias, **transform)
    log_q, log_p = torch.log_softmax(zr, -1), torch.log_softmax(zp, -1)
    support = log_q > -math.inf
    lq, lp = torch.where(support, log_q, 0.0), torch.where(support, log_p, 0.0)
    kl = (torch.where(support, lq.exp(), 0.0) * (lq - lp)).sum(-1)
    return torch.where(labels.reshape(-1) != -100, kl, torch.zeros_like(kl)).view(labels.shape)


# ------------------------------------------------------------------------------------------------------
# Loss formulas, by hand, in float64: the independent reference of the fused module and the engine.
#
# Each function takes the per-sequence numbers of a batch (summed completion log-probs ``c, r`` of the
# chosen / rejected, the reference's ``rc, rr``, completion lengths ``lc, lr``, the chosen token-mean NLL
# ``nll``) and returns the per-pair (per-example) loss. Notation of /work/shared/DESIGN.md section 3:
# ``hc = c - rc``, ``hr = r - rr``, ``m = hc - hr``. Written from the papers / TRL's formulas, never with
# ``expo_kernels.losses``: a sign or factor mistake in the library must not cancel here.
# ------------------------------------------------------------------------------------------------------
def _logsig(x):
    return torch.nn.functional.logsigmoid(x)


def _sig(x):
    return torch.sigmoid(x)


def one_minus_sigmoid(x):
    """``1 - sigma(x)`` written as ``1 / (1 + e^x)`` (the same number, from ``sigma(x) = 1 / (1 + e^-x)``):
    subtracting from 1 would leave ``sigma(-x)``'s relative precision at ``eps / sigma(-x)``, 1e-5 already
    at x = 25 in float64; this form keeps float64's 1e-16 for every x (``e^x = inf`` gives exactly 0)."""
    return 1 / (1 + torch.exp(x))


def log_one_minus_exp(a):
    """``log(1 - e^a)`` for ``a <= 0`` with ``1 - e^a`` as ``-expm1(a)``: written naively, ``1 - e^a``
    loses ``eps / |a|`` relative precision near ``a = 0`` (1e-7 at a = -1e-9 even in float64)."""
    return torch.log(-torch.expm1(a))


def _margin(s):
    return (s["c"] - s["rc"]) - (s["r"] - s["rr"])


def loss_sigmoid(s, beta, label_smoothing=0.0):
    """DPO (Rafailov et al. 2023, eq. 7) ``-log sigma(beta m)``; cDPO (Mitchell 2023) with eps:
    ``-(1-eps) log sigma(beta m) - eps log sigma(-beta m)``."""
    z = beta * _margin(s)
    return -(1 - label_smoothing) * _logsig(z) - label_smoothing * _logsig(-z)


def loss_hinge(s, beta):
    """SLiC (Zhao et al. 2023): ``max(0, 1 - beta m)``."""
    return torch.clamp(1 - beta * _margin(s), min=0)


def loss_ipo(s, beta):
    """IPO (Azar et al. 2023, eq. 17) on length-averaged log-ratios as TRL: ``(hc/lc - hr/lr - 1/(2 beta))^2``."""
    m = (s["c"] - s["rc"]) / s["lc"] - (s["r"] - s["rr"]) / s["lr"]
    return (m - 1 / (2 * beta)) ** 2


def loss_exo_pair(s, beta, label_smoothing):
    """EXO-pref (Ji et al. 2024), K = 2: ``KL(q || [1-eps, eps])``, ``q = sigma(beta m)``:
    ``q (log q - log(1-eps)) + (1-q) (log(1-q) - log eps)``."""
    eps = label_smoothing
    q = _sig(beta * _margin(s))
    return q * (torch.log(q) - math.log(1 - eps)) + (1 - q) * (torch.log(1 - q) - math.log(eps))


def loss_nca_pair(s, beta):
    """NCA (Chen et al. 2024): ``-log sigma(beta hc) - 0.5 log sigma(-beta hc) - 0.5 log sigma(-beta hr)``."""
    hc, hr = s["c"] - s["rc"], s["r"] - s["rr"]
    return -_logsig(beta * hc) - 0.5 * _logsig(-beta * hc) - 0.5 * _logsig(-beta * hr)


def loss_robust(s, beta, label_smoothing):
    """Robust DPO (Chowdhury et al. 2024, eq. 8): ``[-(1-eps) log sigma(beta m) + eps log sigma(-beta m)] / (1-2 eps)``."""
    eps, z = label_smoothing, beta * _margin(s)
    return (-(1 - eps) * _logsig(z) + eps * _logsig(-z)) / (1 - 2 * eps)


def loss_ropo(s, beta, alpha):
    """ROPO (Liang et al. 2025): ``4a/(1+a)^2 (-log sigma(beta m)) + 4a^2/(1+a)^2 sigma(-beta m)``."""
    z = beta * _margin(s)
    return 4 * alpha / (1 + alpha) ** 2 * (-_logsig(z)) + 4 * alpha**2 / (1 + alpha) ** 2 * _sig(-z)


def loss_bco_pair(s, beta, delta=0.0):
    """BCO, paired (Jung et al. 2024): ``-log sigma(beta hc - delta) - log sigma(-(beta hr - delta))``."""
    hc, hr = s["c"] - s["rc"], s["r"] - s["rr"]
    return -_logsig(beta * hc - delta) - _logsig(-(beta * hr - delta))


def loss_sppo_hard(s, beta):
    """SPPO, hard labels (Wu et al. 2024): ``(hc - 1/(2 beta))^2 + (hr + 1/(2 beta))^2``."""
    hc, hr = s["c"] - s["rc"], s["r"] - s["rr"]
    return (hc - 0.5 / beta) ** 2 + (hr + 0.5 / beta) ** 2


def loss_aot(s, beta, label_smoothing=0.0):
    """AOT, paired (Melnyk et al. 2024): sort ``c - r`` and ``rc - rr`` over the batch, then the smoothed
    sigmoid loss of ``beta * (sorted policy - sorted reference)``."""
    d = torch.sort(s["c"] - s["r"]).values - torch.sort(s["rc"] - s["rr"]).values
    z = beta * d
    return -(1 - label_smoothing) * _logsig(z) - label_smoothing * _logsig(-z)


def loss_aot_unpaired(s, beta, label_smoothing=0.0):
    """AOT, unpaired: sort ``hc`` and ``hr`` separately, then the smoothed sigmoid loss of their difference."""
    d = torch.sort(s["c"] - s["rc"]).values - torch.sort(s["r"] - s["rr"]).values
    z = beta * d
    return -(1 - label_smoothing) * _logsig(z) - label_smoothing * _logsig(-z)


def loss_apo_zero(s, beta):
    """APO-zero (D'Oosterlinck et al. 2024): ``(1 - sigma(beta hc)) + sigma(beta hr)``."""
    return (1 - _sig(beta * (s["c"] - s["rc"]))) + _sig(beta * (s["r"] - s["rr"]))


def loss_apo_down(s, beta):
    """APO-down: ``sigma(beta hc) + (1 - sigma(beta m))``."""
    return _sig(beta * (s["c"] - s["rc"])) + (1 - _sig(beta * _margin(s)))


def loss_discopop(s, beta, discopop_tau):
    """DiscoPOP (Chris Lu et al. 2024): ``z = beta m``, ``w = sigma(z / tau)``:
    ``(1 - w) (-log sigma z) + w exp(-z)``."""
    z = beta * _margin(s)
    w = _sig(z / discopop_tau)
    return (1 - w) * (-_logsig(z)) + w * torch.exp(-z)


def loss_sft(s, beta=None):
    """TRL's ``sft`` loss type: token-mean NLL of the chosen completions (one number for the batch)."""
    return s["nll"].expand(s["c"].shape)


def loss_sigmoid_norm(s, beta):
    """DPO on length-averaged log-ratios: ``-log sigma(beta (hc/lc - hr/lr))``."""
    return -_logsig(beta * ((s["c"] - s["rc"]) / s["lc"] - (s["r"] - s["rr"]) / s["lr"]))


def loss_rpo(s, beta, rpo_alpha, label_smoothing=0.0):
    """RPO (Pang et al. 2024): DPO + ``rpo_alpha`` * chosen NLL."""
    return loss_sigmoid(s, beta, label_smoothing) + rpo_alpha * s["nll"]


def loss_odpo(s, beta, alpha):
    """ODPO (Amini et al. 2024, eq. 6): ``-log sigma(beta m - alpha * offset)``."""
    return -_logsig(beta * _margin(s) - alpha * s["offset"])


def loss_cpo(s, beta, cpo_alpha=1.0):
    """CPO (Xu et al. 2024, eq. 3 + the NLL term): ``-log sigma(beta (c - r)) + alpha NLL(chosen)``, no reference."""
    return -_logsig(beta * (s["c"] - s["r"])) + cpo_alpha * s["nll"]


def loss_simpo(s, beta, gamma):
    """SimPO (Meng et al. 2024, eq. 6): ``-log sigma(beta (c/lc - r/lr) - gamma)``, no reference."""
    return -_logsig(beta * (s["c"] / s["lc"] - s["r"] / s["lr"]) - gamma)


def loss_alphapo(s, beta, gamma, alpha):
    """AlphaPO (Gupta et al. 2025): SimPO with the reward ``(1 - p^(-alpha)) / alpha`` of the length-averaged
    probability ``p = exp(c / lc)``."""

    def reward(avg):
        return (1 - torch.exp(-alpha * avg)) / alpha

    return -_logsig(beta * (reward(s["c"] / s["lc"]) - reward(s["r"] / s["lr"])) - gamma)


def loss_orpo(s, beta):
    """ORPO (Hong et al. 2024, eq. 6-7): ``NLL(chosen) - lambda log sigma(logodds(cbar) - logodds(rbar))``,
    ``logodds(a) = a - log(1 - e^a)``, ``lambda`` = TRL's ``beta``."""

    def logodds(a):  # a - log(1 - e^a); +inf at a = 0 (a probability of 1), where log sigma(+inf) = 0
        return a - log_one_minus_exp(a)

    return s["nll"] - beta * _logsig(logodds(s["c"] / s["lc"]) - logodds(s["r"] / s["lr"]))


def loss_expo(s, lam, kl_estimator="sequence"):
    """EXPO (Hu et al. 2025): ``softplus(-(c - r)) + lam * KL(pi_ref || pi_theta)``; the KL per pair is
    ``sequence``: ``((rc - c) + (rr - r)) / 2``; ``pair``: Bernoulli ``KL(sigma(rc - rr) || sigma(c - r))``;
    ``token``: the mean of the two sequences' summed exact token KLs (``s["token_kl"]``, ``[2B]``)."""
    c, r = s["c"], s["r"]
    bt = torch.log1p(torch.exp(-(c - r)))
    if kl_estimator == "sequence":
        kl = 0.5 * ((s["rc"] - c) + (s["rr"] - r))
    elif kl_estimator == "pair":
        q_ref, q = _sig(s["rc"] - s["rr"]), _sig(c - r)
        kl = q_ref * torch.log(q_ref / q) + (1 - q_ref) * torch.log((1 - q_ref) / (1 - q))
    else:
        tk = s["token_kl"]
        kl = 0.5 * (tk[: c.shape[0]] + tk[c.shape[0] :])
    return bt + lam * kl


def loss_kto(s, beta, desirable_weight=1.0, undesirable_weight=1.0):
    """KTO (Ethayarajh et al. 2024, eq. 8) per example, ``h = logp - ref_logp``, ``z0`` = ``s["kl"]``:
    desirable ``w_D (1 - sigma(beta (h - z0)))``, undesirable ``w_U (1 - sigma(beta (z0 - h)))``."""
    h, z0 = s["pol"] - s["ref"], s["kl"]
    des = desirable_weight * one_minus_sigmoid(beta * (h - z0))
    und = undesirable_weight * one_minus_sigmoid(beta * (z0 - h))
    return torch.where(s["is_desirable"], des, und)


def kto_kl_baseline(kl_logps, ref_kl_logps):
    """KTO's reference point ``z0`` (Ethayarajh et al. 2024, sec. 4.1; TRL's ``KTOTrainer``): the mean of
    ``kl_logps - ref_kl_logps`` over the batch's mismatched (prompt, completion) pairs, clamped at 0 and
    detached (no gradient reaches it)."""
    return torch.clamp((kl_logps - ref_kl_logps).detach().double().mean(), min=0.0)


def loss_apo_zero_unpaired(s, beta, desirable_weight=1.0, undesirable_weight=1.0):
    """APO-zero, unpaired: desirable ``w_D (1 - sigma(beta h))``, undesirable ``w_U sigma(beta h)``."""
    h = s["pol"] - s["ref"]
    return torch.where(s["is_desirable"], desirable_weight * (1 - _sig(beta * h)), undesirable_weight * _sig(beta * h))


REFERENCE_LOSSES = {
    name[len("loss_") :]: fn for name, fn in dict(globals()).items() if name.startswith("loss_") and callable(fn)
}
#: the losses whose inputs have no reference model (the module refuses one)
REFERENCE_FREE = ("cpo", "simpo", "alphapo", "orpo")
UNPAIRED = ("kto", "apo_zero_unpaired")
#: the losses that log TRL's DPO rewards ``beta * (logp - ref_logp)``
DPO_REWARDS = (
    "sigmoid hinge ipo exo_pair nca_pair robust ropo bco_pair sppo_hard aot aot_unpaired apo_zero apo_down "
    "discopop sigmoid_norm rpo odpo"
).split()


# ------------------------------------------------------------------------------------------------------
# From hidden states to the per-sequence numbers, by hand (materialized float64 logits).
# ------------------------------------------------------------------------------------------------------
def token_logps_and_dist(hidden, weight, bias, labels, *, ignore_index=-100, **transform):
    """``([R, T] log p(label), 0 off the completion; [R, T, V] log-softmax)`` from float64 logits."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    logp = torch.log_softmax(transform_logits(z, **transform), dim=-1)
    valid = labels != ignore_index
    picked = logp.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, torch.zeros_like(picked)), logp


def ld_sums(lp, mask, ld_alpha):
    """LD-DPO (Liu et al. 2024): per pair, the completion tokens up to the shorter completion's length count
    once, the later ones ``ld_alpha`` times. ``lp, mask`` are ``[2B, T]`` (chosen rows first)."""
    b = lp.shape[0] // 2
    out = []
    for i in range(lp.shape[0]):
        j = i % b
        shared = min(int(mask[j].sum()), int(mask[j + b].sum()))
        total, k = lp.new_zeros(()), 0
        for t in range(lp.shape[1]):
            if mask[i, t]:
                k += 1
                total = total + lp[i, t] * (1.0 if k <= shared else ld_alpha)
        out.append(total)
    return torch.stack(out)


def reference_module_loss(
    name,
    hp,
    hidden,
    weight,
    bias,
    labels,
    *,
    ref_hidden=None,
    ref_weight=None,
    ref_bias=None,
    ld_alpha=None,
    use_weighting=False,
    is_desirable=None,
    kl=None,
    offset=None,
    transform=None,
    ignore_index=-100,
):
    """What a plain trainer computes for loss ``name``: materialized float64 logits, log-softmax, gather,
    per-sequence sums (LD-weighted with ``ld_alpha``), the hand formula of ``REFERENCE_LOSSES[name]``, the
    mean over pairs (WPO-weighted with ``use_weighting``). Returns ``(loss, per-sequence numbers, metrics)``
    with the metrics TRL logs for that loss (a subset: rewards, log-probs, NLL, EXPO's KL)."""
    tf = transform or {}
    lp, full = token_logps_and_dist(hidden, weight, bias, labels, ignore_index=ignore_index, **tf)
    mask = labels != ignore_index
    s = {}
    if ref_hidden is not None:
        ref_lp, ref_full = token_logps_and_dist(
            ref_hidden, weight if ref_weight is None else ref_weight, ref_bias, labels, ignore_index=ignore_index, **tf
        )
        ref_lp, ref_full = ref_lp.detach(), ref_full.detach()
    hp = dict(hp)
    if name in UNPAIRED:
        s = dict(pol=lp.sum(1), ref=ref_lp.sum(1), is_desirable=is_desirable, kl=torch.as_tensor(kl).double())
        terms = REFERENCE_LOSSES[name](s, **hp)
        h = (s["pol"] - s["ref"]).detach()
        beta = hp["beta"]
        metrics = {
            "rewards/chosen": beta * h[is_desirable].mean(),
            "rewards/rejected": beta * h[~is_desirable].mean(),
            "logps/chosen": s["pol"][is_desirable].mean(),
            "logps/rejected": s["pol"][~is_desirable].mean(),
        }
        return terms.mean(), s, metrics
    b = lp.shape[0] // 2
    sums = lp.sum(1) if ld_alpha is None else ld_sums(lp, mask, ld_alpha)
    lengths = mask.sum(1).double()
    s.update(c=sums[:b], r=sums[b:], lc=lengths[:b], lr=lengths[b:], nll=-lp[:b].sum() / mask[:b].sum())
    if ref_hidden is not None:
        ref_sums = ref_lp.sum(1) if ld_alpha is None else ld_sums(ref_lp, mask, ld_alpha)
        s.update(rc=ref_sums[:b], rr=ref_sums[b:])
        # exact KL(pi_ref || pi_theta) per token, summed over each completion
        tok = (ref_full.exp() * (ref_full - full)).sum(-1)
        s["token_kl"] = torch.where(mask, tok, torch.zeros_like(tok)).sum(1)
    if offset is not None:
        s["offset"] = offset.double()
    terms = REFERENCE_LOSSES[name](s, **hp)
    if use_weighting:  # WPO (Zhou et al. 2024, eq. 2): exp(mean of log p(y_t) - log sum_v p_v^2), per pair c * r
        with torch.no_grad():
            aligned = torch.where(mask, lp - torch.logsumexp(2 * full, -1), torch.zeros_like(lp))
            w = torch.exp(aligned.sum(1) / mask.sum(1).clamp(min=1))
        terms = terms * (w[:b] * w[b:])
    # TRL logs the per-token averages for the losses that take them (SimPO, AlphaPO, ORPO), else the sums
    avg = name in ("simpo", "alphapo", "orpo")
    pc, pr = (s["c"] / s["lc"], s["r"] / s["lr"]) if avg else (s["c"], s["r"])
    metrics = {"logps/chosen": pc.detach().mean(), "logps/rejected": pr.detach().mean()}
    if name in DPO_REWARDS:
        beta = hp["beta"]
        rc, rr = beta * (s["c"] - s["rc"]).detach(), beta * (s["r"] - s["rr"]).detach()
        metrics.update(
            {
                "rewards/chosen": rc.mean(),
                "rewards/rejected": rr.mean(),
                "rewards/margins": (rc - rr).mean(),
                "rewards/accuracies": (rc > rr).double().mean(),
            }
        )
    if name in ("sft", "rpo", "orpo", "cpo"):
        metrics["nll_loss"] = s["nll"].detach()
    if name == "expo":
        metrics["bt_loss"] = torch.log1p(torch.exp(-(s["c"] - s["r"]))).detach().mean()
    return terms.mean(), s, metrics


def naive_logprobs(hidden, weight, labels, bias=None, *, ignore_index=-100, **transform):
    """The naive computation in the inputs' own dtype (logits materialized in it, then log_softmax in it):
    the yardstick of Triton's 16-bit tolerance (helpers.tolerance). Returned in float64, 0 at ignored."""
    z = hidden.reshape(-1, hidden.shape[-1]) @ weight.T
    if bias is not None:
        z = z + bias
    logp = torch.log_softmax(transform_logits(z, **transform), dim=-1)
    y = labels.reshape(-1).long()
    valid = y != ignore_index
    picked = logp.gather(1, torch.where(valid, y, 0)[:, None])[:, 0].double()
    return torch.where(valid, picked, torch.zeros_like(picked)).view(labels.shape)

"""Unpaired losses: KTO and APO-zero (unpaired), as TRL 1.16's ``KTOTrainer._compute_loss`` computes them.

Each example is a completion labelled desirable or undesirable, with ``h = logp - ref_logp``:

* desirable:   ``desirable_weight   * (1 - sigma(beta * (h - z0)))``
* undesirable: ``undesirable_weight * (1 - sigma(beta * (z0 - h)))``

``z0`` is KTO's reference point, a *detached* estimate of KL(pi_theta || pi_ref) from mismatched
(prompt, completion) pairs of the same batch: ``clamp(mean(kl_logps - ref_kl_logps), min=0)``. The
loss is the mean over all examples. Inputs come either as ``policy_logps, ref_logps, is_desirable``
(one entry per example, any order) or in the chosen/rejected form (chosen = desirable, rejected =
undesirable; the two may have different sizes).
"""

from __future__ import annotations

import torch

from ._common import BETA, LossTerms, PreferenceBatch
from .registry import HParam, checks_values, non_negative, register_loss

_WEIGHTS = (
    HParam("desirable_weight", 1.0, "weight of the desirable examples' losses (TRL default 1.0)", non_negative),
    HParam("undesirable_weight", 1.0, "weight of the undesirable examples' losses (TRL default 1.0)", non_negative),
)


def _examples(batch: PreferenceBatch, loss: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(policy_logps, ref_logps, is_desirable)`` of all examples, ``[N]`` each."""
    if batch.policy_logps is not None:
        if batch.ref_logps is None:
            raise ValueError(f"Loss {loss!r} needs the reference model's log-probs: pass `ref_logps` ([N]).")
        # the API refuses policy_logps without is_desirable (api._build_unpaired)
        assert batch.is_desirable is not None
        return batch.policy_logps, batch.ref_logps, batch.is_desirable
    rc, rr = batch.require_reference(loss)
    c, r = batch.pair()
    pol = torch.cat([c, r])
    ref = torch.cat([rc, rr])
    lab = torch.cat(
        [
            torch.ones(c.shape[0], dtype=torch.bool, device=pol.device),
            torch.zeros(r.shape[0], dtype=torch.bool, device=pol.device),
        ]
    )
    return pol, ref, lab


def _metrics(pol, h, lab, beta, kl):
    def make():
        with torch.no_grad():
            out = {"kl": kl.detach().reshape(())}
            h_d, pol_d = h.detach(), pol.detach()
            if not checks_values():
                # torch.compile: which keys exist cannot depend on the data; a side without examples
                # gets NaN (the mean of nothing) instead of no key
                des, und = lab.to(h_d.dtype), (~lab).to(h_d.dtype)
                out["rewards/chosen"] = beta * (h_d * des).sum() / des.sum()
                out["logps/chosen"] = (pol_d * des).sum() / des.sum()
                out["rewards/rejected"] = beta * (h_d * und).sum() / und.sum()
                out["logps/rejected"] = (pol_d * und).sum() / und.sum()
                out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
                return out
            n_des = int(lab.sum())
            n_und = int(lab.numel() - n_des)
            if n_des > 0:
                out["rewards/chosen"] = beta * h_d[lab].mean()
                out["logps/chosen"] = pol_d[lab].mean()
            if n_und > 0:
                out["rewards/rejected"] = beta * h_d[~lab].mean()
                out["logps/rejected"] = pol_d[~lab].mean()
            if n_des > 0 and n_und > 0:
                out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
            return out

    return make


@register_loss(
    "kto",
    hparams=(BETA, *_WEIGHTS),
    paired=False,
    description="KTO: w_D (1 - sigma(beta (h - z0))) / w_U (1 - sigma(beta (z0 - h))), z0 a detached batch KL",
)
def _kto(batch: PreferenceBatch, hp: dict) -> LossTerms:
    pol, ref, lab = _examples(batch, "kto")
    coupled = None
    if batch.kl is not None:
        z0 = batch.kl.detach()
    elif batch.kl_logps is not None:
        if batch.ref_kl_logps is None:
            raise ValueError(
                "Loss 'kto': `kl_logps` was given without `ref_kl_logps` (reference log-probs of the "
                "same mismatched completions)."
            )
        if batch.kl_logps.numel() <= 1:
            raise ValueError(
                "Loss 'kto': the KL baseline needs a batch of more than 1 example (got kl_logps of size "
                f"{batch.kl_logps.numel()}): with one example the mismatched pair is the example itself and the "
                "baseline equals its own implied reward. Use a larger batch or pass `kl=` (e.g. kl=0.0)."
            )
        # TRL: mean over the mismatched pairs, detached, clamped at 0 (after the cross-process mean).
        z0 = (batch.kl_logps - batch.ref_kl_logps).mean().detach().clamp(min=0)
        coupled = (
            "its KL baseline z0 is a statistic of the whole batch; pass a precomputed `kl=` for per-example values"
        )
    else:
        raise ValueError(
            "Loss 'kto' needs a KL baseline: pass `kl_logps` and `ref_kl_logps` (policy / reference log-probs of "
            "mismatched prompt-completion pairs of the batch, [K] with K > 1), or a precomputed scalar `kl=` "
            "(kl=0.0 turns the baseline off)."
        )
    h = pol - ref
    b = hp["beta"]
    # sigma(-x) rather than TRL's 1 - sigma(x): equal, but without rounding to 0 for large x
    des = hp["desirable_weight"] * torch.sigmoid(-b * (h - z0))
    und = hp["undesirable_weight"] * torch.sigmoid(-b * (z0 - h))
    terms = torch.where(lab, des, und)
    return LossTerms(terms, _metrics(pol, h, lab, b, z0), coupled=coupled)


@register_loss(
    "apo_zero_unpaired",
    hparams=(BETA, *_WEIGHTS),
    paired=False,
    description="APO-zero (unpaired): w_D (1 - sigma(beta h)) for desirable, w_U sigma(beta h) for undesirable",
)
def _apo_zero_unpaired(batch: PreferenceBatch, hp: dict) -> LossTerms:
    pol, ref, lab = _examples(batch, "apo_zero_unpaired")
    h = pol - ref
    b = hp["beta"]
    des = hp["desirable_weight"] * torch.sigmoid(-b * h)
    und = hp["undesirable_weight"] * torch.sigmoid(b * h)
    terms = torch.where(lab, des, und)
    zero = torch.zeros((), dtype=h.dtype, device=h.device)
    return LossTerms(terms, _metrics(pol, h, lab, b, zero))

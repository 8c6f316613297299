"""Shared pieces of the loss functions: the batch container, the loss output, input checks,
f-divergence scores and the metric helpers."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .registry import HParam, one_of, positive, real, unit_interval

Tensor = torch.Tensor

__all__ = ["PreferenceBatch", "LossTerms", "F_DIVERGENCE_TYPES", "F_DIVERGENCE_LOSSES"]


@dataclass
class LossTerms:
    """What a registered loss function returns.

    ``terms`` is a 1-D tensor whose mean is the loss (before per-pair ``weights``): one entry per pair
    for paired losses, one per example for unpaired ones. ``coupled`` is None when each entry depends
    only on its own pair (so ``reduction="none"`` is meaningful), else the reason it does not.
    ``metrics`` is called only when metrics are asked for; it returns detached scalars.
    """

    terms: Tensor
    metrics: Callable[[], dict[str, Tensor]]
    coupled: str | None = None


@dataclass
class PreferenceBatch:
    """Per-sequence inputs of a loss (all 1-D, ``B`` = number of pairs).

    chosen / rejected: policy log-probs of each completion summed over its tokens, ``[B]``.
    ref_chosen / ref_rejected: the same under the reference model, ``[B]`` (or None).
    chosen_lengths / rejected_lengths: number of completion tokens, ``[B]`` (or None).
    chosen_nll: precomputed NLL of the chosen completions, scalar or ``[B]`` (or None).
    offset: ODPO per-pair offsets, ``[B]`` or scalar. token_kl: EXPO token-level KL, scalar/``[B]``/``[2B]``.
    policy_logps / ref_logps / is_desirable: unpaired (KTO) form, ``[N]`` each.
    kl_logps / ref_kl_logps: KTO's mismatched-pair log-probs for the KL baseline, ``[K]``; kl: scalar baseline.
    """

    chosen: Tensor | None = None
    rejected: Tensor | None = None
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None
    chosen_lengths: Tensor | None = None
    rejected_lengths: Tensor | None = None
    chosen_nll: Tensor | None = None
    offset: Tensor | None = None
    token_kl: Tensor | None = None
    policy_logps: Tensor | None = None
    ref_logps: Tensor | None = None
    is_desirable: Tensor | None = None
    kl_logps: Tensor | None = None
    ref_kl_logps: Tensor | None = None
    kl: Tensor | None = None

    # ---------------------------------------------------------------------------------------------
    @property
    def has_reference(self) -> bool:
        return self.ref_chosen is not None and self.ref_rejected is not None

    def pair(self) -> tuple[Tensor, Tensor]:
        """``(chosen, rejected)`` of a batch in the paired (or chosen/rejected unpaired) form."""
        # the API builds such a batch only from both tensors (api._build_batch / _build_unpaired)
        assert self.chosen is not None and self.rejected is not None
        return self.chosen, self.rejected

    def require_reference(self, loss: str, why: str = "") -> tuple[Tensor, Tensor]:
        rc, rr = self.ref_chosen, self.ref_rejected
        if rc is None or rr is None:  # not has_reference
            raise ValueError(
                f"Loss {loss!r} needs the reference model's log-probs: pass `ref_chosen_logps` and "
                f"`ref_rejected_logps` (shape [B], summed over completion tokens){why}."
            )
        return rc, rr

    def logratios(self, loss: str) -> tuple[Tensor, Tensor]:
        """``(c - c_ref, r - r_ref)``."""
        rc, rr = self.require_reference(loss)
        c, r = self.pair()
        return c - rc, r - rr

    def lengths(self, loss: str) -> tuple[Tensor, Tensor]:
        """Completion token counts in the log-probs' dtype, clamped to >= 1 (as TRL does)."""
        if self.chosen_lengths is None or self.rejected_lengths is None:
            raise ValueError(
                f"Loss {loss!r} normalizes by completion length: pass `chosen_lengths` and `rejected_lengths` "
                "(number of completion tokens of each sequence, shape [B])."
            )
        dt = self.pair()[0].dtype
        return self.chosen_lengths.to(dt).clamp(min=1.0), self.rejected_lengths.to(dt).clamp(min=1.0)

    def averages(self, loss: str) -> tuple[Tensor, Tensor]:
        """Length-averaged policy log-probs ``(c / |y_c|, r / |y_r|)``."""
        lc, lr = self.lengths(loss)
        c, r = self.pair()
        return c / lc, r / lr

    def nll(self, loss: str) -> tuple[Tensor, str | None]:
        """NLL of the chosen completions and, when it is a batch-level number, why it couples the batch.

        Default (as TRL's ``sft`` loss type and CPO's ``nn.CrossEntropyLoss`` compute it): the mean
        over *all chosen completion tokens of the batch*, ``-sum_i c_i / sum_i |y_c,i|``. A
        ``chosen_nll`` passed by the caller (scalar or per pair ``[B]``) replaces it.
        """
        if self.chosen_nll is not None:
            if self.chosen_nll.dim() == 0:
                return self.chosen_nll, (
                    "the NLL term is a single batch-level number; pass `chosen_nll` of shape [B] for per-pair values"
                )
            return self.chosen_nll, None
        if self.chosen_lengths is None:
            raise ValueError(
                f"Loss {loss!r} has an NLL term on the chosen completions: pass `chosen_lengths` (completion "
                "token counts, [B]) so it can be computed as the token-mean NLL -sum(chosen_logps)/sum(chosen_lengths), "
                "or pass `chosen_nll` directly."
            )
        c, _ = self.pair()
        total = self.chosen_lengths.to(c.dtype).sum().clamp(min=1.0)
        return -c.sum() / total, (
            "the NLL term is the token mean over the whole batch (as TRL computes it); pass `chosen_nll` of shape "
            "[B] (e.g. -chosen_logps / chosen_lengths) for per-pair values"
        )


# ------------------------------------------------------------------------------------------------
# Shared hyperparameters
# ------------------------------------------------------------------------------------------------
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# Losses TRL 1.16 allows with a non-default f-divergence (they use only the chosen-rejected score
# difference, where the beta*log Z(x) term of the f-DPO reparameterisation cancels).
F_DIVERGENCE_LOSSES = frozenset(
    {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft", "rpo"}
)

BETA = HParam("beta", 0.1, "inverse temperature of the implicit reward (TRL's default 0.1)", positive)
F_DIV = HParam(
    "f_divergence_type",
    "reverse_kl",
    "f-DPO divergence mapping each log-ratio u to a score (reverse_kl: u; forward_kl: 1-exp(-u); "
    "js_divergence: log 2 + log sigma(u); alpha_divergence: (exp((a-1)u)-1)/(a-1))",
    one_of(*F_DIVERGENCE_TYPES),
)
F_ALPHA = HParam("f_alpha_divergence_coef", 0.5, "alpha of the alpha-divergence (TRL's name and default)", real)


def label_smoothing(
    doc: str = "probability that a preference label is flipped (conservative DPO); in [0, 0.5)",
) -> HParam:
    """The ``label_smoothing`` hyperparameter (cDPO's eps, default 0) with a loss's own description."""
    return HParam("label_smoothing", 0.0, doc, unit_interval(0.0, 0.5))


# ------------------------------------------------------------------------------------------------
# f-divergence scores (f-DPO, Wang et al. 2023): TRL 1.16 maps each log-ratio through f'(exp(u)).
# Constant offsets (the 1 of forward_kl, log 2 of JS, -1/(a-1) of alpha) cancel in every loss that
# takes the chosen-rejected difference; they are kept so the scores equal TRL's.
# ------------------------------------------------------------------------------------------------
# Largest exponent (with margin) whose exp is finite in each dtype: the saturating exps below clamp
# their argument there, so two saturated scores cancel (inf - inf would be NaN) and the loss stays finite.
_ALPHA_CLAMP = {torch.float16: 11.0, torch.bfloat16: 80.0, torch.float32: 80.0, torch.float64: 700.0}


def exp_limit(dtype: torch.dtype) -> float:
    """The largest argument the saturating exps of the losses pass to ``exp`` in ``dtype``."""
    return _ALPHA_CLAMP.get(dtype, 80.0)


def f_divergence_scores(u: Tensor, kind: str, coef: float) -> Tensor:
    if kind == "reverse_kl":
        return u
    if kind == "forward_kl":
        # exp(-u) overflows for u < -88 in float32 (a log-ratio that drifted 88 nats); unclamped, two such
        # scores give inf - inf = NaN where float64 gives a finite loss. Same saturation as alpha below.
        return 1 - torch.exp(torch.clamp(-u, max=exp_limit(u.dtype)))
    if kind == "js_divergence":
        return math.log(2.0) + F.logsigmoid(u)
    if kind == "alpha_divergence":
        if abs(coef - 1.0) < 1e-6:  # limit alpha -> 1 is the reverse KL, as in TRL
            return u
        t = (coef - 1.0) * u
        dtype = t.dtype
        # exp in fp32 for half types (fp64 stays fp64); the clamp keeps exp(t) finite after the cast back
        work = t if dtype == torch.float64 else t.float()
        work = torch.clamp(work, max=exp_limit(dtype))
        return (torch.exp(work) - 1.0).to(dtype) * (1.0 / (coef - 1.0))
    raise ValueError(f"Unknown f_divergence_type {kind!r}; expected one of {list(F_DIVERGENCE_TYPES)}.")


def scores(batch: PreferenceBatch, loss: str, hp: dict) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(chosen_logratios, rejected_logratios, chosen_scores, rejected_scores)``."""
    hc, hr = batch.logratios(loss)
    kind, coef = hp["f_divergence_type"], hp["f_alpha_divergence_coef"]  # every caller declares both (_FDIV)
    return hc, hr, f_divergence_scores(hc, kind, coef), f_divergence_scores(hr, kind, coef)


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------
def reward_metrics(
    chosen_rewards: Tensor, rejected_rewards: Tensor, chosen_logps: Tensor, rejected_logps: Tensor
) -> dict[str, Tensor]:
    """TRL's reward metrics: batch means of the detached rewards / log-probs."""
    with torch.no_grad():
        cr, rr = chosen_rewards.detach(), rejected_rewards.detach()
        return {
            "rewards/chosen": cr.mean(),
            "rewards/rejected": rr.mean(),
            "rewards/accuracies": (cr > rr).to(cr.dtype).mean(),
            "rewards/margins": (cr - rr).mean(),
            "logps/chosen": chosen_logps.detach().mean(),
            "logps/rejected": rejected_logps.detach().mean(),
        }


def dpo_metrics(batch: PreferenceBatch, beta: float) -> Callable[[], dict[str, Tensor]]:
    """Metrics of the reference-based losses: rewards ``beta * (logp - ref_logp)`` as TRL logs them."""

    def make() -> dict[str, Tensor]:
        c, r = batch.pair()
        rc, rr = batch.ref_chosen, batch.ref_rejected
        # built only by losses that required the reference (or checked has_reference) first
        assert rc is not None and rr is not None
        return reward_metrics(beta * (c - rc), beta * (r - rr), c, r)

    return make


def logp_metrics(batch: PreferenceBatch) -> dict[str, Tensor]:
    c, r = batch.pair()
    with torch.no_grad():
        return {"logps/chosen": c.detach().mean(), "logps/rejected": r.detach().mean()}

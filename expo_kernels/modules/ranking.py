"""Listwise ranking losses from hidden states and the LM head: :class:`FusedLinearRankingLoss`.

A batch holds ``B`` prompts with ``K`` sampled responses each: ``hidden [B, K, T, H]``, ``labels
[B, K, T]`` (already shifted, ``ignore_index`` off the completion), ``rewards [B, K]`` and an optional
``mask [B, K]`` (False = no response in that slot; such slots may hold anything). One step:

1. one :func:`~expo_kernels.linear_logprobs` call over all ``B*K`` responses (one pass over the
   weight; masked slots are turned into ignored tokens first, so they cost nothing), its backward
   the fused one;
2. per response: summed completion log-prob ``logp`` and its length-normalized score ``logp / n``;
3. the ranking term (:func:`~expo_kernels.losses.ranking_loss`) plus the method's SFT term on the
   highest-reward response (the average over the responses tied for it).

Methods (``loss=``):

* ``"rrhf"`` (Yuan et al., 2023): ``L = L_rank + sft_weight * L_ft``, ``L_ft`` the cross-entropy of
  the best response (its token-mean NLL); the paper's ``L = L_rank + L_ft`` is ``sft_weight=1``.
* ``"pro"`` (Song et al., 2023): ``L = L_PRO + beta * L_SFT`` with ``beta = sft_weight * (l - 1)^2``,
  ``l`` the prompt's number of responses (the paper uses ``beta = 0.05 (l - 1)^2``, the default),
  ``L_SFT`` the best response's NLL summed over its tokens, as in the authors' released code.
  ``reward_temperature=True``: the paper's reward-gap temperature (see :mod:`expo_kernels.losses.ranking`).
* ``"raft"`` (Dong et al., 2023, "RAFT: Reward rAnked FineTuning for Generative Foundation Model
  Alignment"): a recipe, no ranking term: ``L = sft_weight * NLL`` of the best of the ``K`` samples
  (token mean per response, then the batch mean; Hugging Face's trainer averages over all tokens of
  the batch instead, the same when the selected responses have equal lengths). Only the selected
  responses go through the LM head (``1/K`` of the work), through the same fused op. ``K = 1`` is
  plain SFT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._validation import check_backend_name, check_bool, check_ignore_index
from ..functional import head_autocast, linear_logprobs
from ..losses.aggregate import sum_dtype
from ..losses.ranking import best_response_mask, check_rewards_and_mask, ranking_loss
from ..losses.registry import HParamTypeError, as_real, checks_values, describe
from ._base import masked_mean, positive_number

__all__ = ["FusedLinearRankingLoss", "RankingLossOutput", "RANKING_METHODS"]

#: method -> default ``sft_weight`` (RRHF's L_rank + L_ft, PRO's beta = 0.05 (l - 1)^2, RAFT's plain NLL)
RANKING_METHODS: dict[str, float] = {"rrhf": 1.0, "pro": 0.05, "raft": 1.0}


@dataclass
class RankingLossOutput:
    """What :class:`FusedLinearRankingLoss` returns.

    loss: scalar, differentiable w.r.t. hidden, the LM-head weight and bias.
    metrics: name -> detached 0-d tensor (empty with ``compute_metrics=False``): ``loss/rank``,
        ``loss/sft`` (before ``sft_weight``; PRO's includes its ``(l - 1)^2``), ``logps/best`` and ``logps/mean`` (length-normalized scores),
        ``ranking/accuracy`` (share of the pairs with different rewards that the scores order the same
        way), ``rewards/best``, ``rewards/mean``, ``entropy`` (token mean over the responses computed).
    scores: ``[B, K]`` detached length-normalized log-probs (0 at masked slots; NaN where not
        computed: RAFT computes the selected responses only).
    logps: ``[B, K]`` detached summed completion log-probs (same conventions).
    best: ``[B, K]`` bool, the responses the SFT term trains on (tied for the highest reward).
    """

    loss: Tensor
    metrics: dict[str, Tensor]
    scores: Tensor
    logps: Tensor
    best: Tensor


class FusedLinearRankingLoss(nn.Module):
    """RRHF, PRO or RAFT over ``K`` responses per prompt, from hidden states and the LM head.

    Args:
        loss: ``"rrhf"``, ``"pro"`` or ``"raft"`` (see the module docstring).
        sft_weight: weight of the SFT term, a finite number >= 0; default per method
            (:data:`RANKING_METHODS`: RRHF 1, PRO 0.05 times ``(l - 1)^2``, RAFT 1).
        reward_temperature: PRO's reward-gap temperature (``loss="pro"`` only).
        ignore_index: label value of positions that do not count (prompt, padding).
        temperature, logit_scale, softcap: the logit transform (see :func:`~expo_kernels.linear_logprobs`).
        compute_metrics: fill ``metrics`` (costs the token statistics of the pass).
        backend: kernel backend (``"triton"``, ``"native"``, ``"torch"``); default from the device.
    """

    def __init__(
        self,
        loss: str = "rrhf",
        *,
        sft_weight: float | None = None,
        reward_temperature: bool = False,
        ignore_index: int = -100,
        temperature: float = 1.0,
        logit_scale: float | None = None,
        softcap: float | None = None,
        compute_metrics: bool = True,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(loss, str) or loss not in RANKING_METHODS:
            raise ValueError(f"`loss` must be one of {list(RANKING_METHODS)}; got {loss!r}.")
        if sft_weight is None:
            sft_weight = RANKING_METHODS[loss]
        w = as_real(sft_weight)
        if w is None:
            raise HParamTypeError(f"`sft_weight` must be a finite number >= 0; got {describe(sft_weight)}.")
        if not (w >= 0 and w != float("inf")):  # NaN fails the first test
            raise ValueError(f"`sft_weight` must be a finite number >= 0; got {sft_weight!r}.")
        check_bool("reward_temperature", reward_temperature)
        if reward_temperature and loss != "pro":
            raise ValueError(f"`reward_temperature` is an option of loss 'pro', not of {loss!r}.")
        check_ignore_index(ignore_index)
        check_bool("compute_metrics", compute_metrics)
        check_backend_name(backend)
        self.loss = loss
        self.sft_weight = float(w)
        self.reward_temperature = reward_temperature
        self.ignore_index = int(ignore_index)
        self.transform: dict[str, Any] = dict(
            temperature=positive_number("temperature", temperature),
            logit_scale=positive_number("logit_scale", logit_scale, allow_none=True),
            softcap=positive_number("softcap", softcap, allow_none=True),
        )
        self.compute_metrics = compute_metrics
        self.backend = backend

    def extra_repr(self) -> str:
        extra = ", reward_temperature=True" if self.reward_temperature else ""
        return f"loss={self.loss!r}, sft_weight={self.sft_weight!r}{extra}"

    # ---------------------------------------------------------------------------------------------
    def _check(self, hidden: Any, labels: Any, rewards: Any, mask: Any) -> tuple[Tensor, Tensor, Tensor]:
        """Shapes of hidden/labels, rewards and mask; returns ``(rewards, mask, lengths [B, K])``."""
        if not isinstance(hidden, Tensor) or hidden.dim() != 4:
            got = tuple(hidden.shape) if isinstance(hidden, Tensor) else type(hidden).__name__
            raise ValueError(f"`hidden` must be a [B, K, T, H] tensor (K responses per prompt); got {got}.")
        if not isinstance(labels, Tensor) or tuple(labels.shape) != tuple(hidden.shape[:3]):
            got = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(f"`labels` must have shape [B, K, T] = {tuple(hidden.shape[:3])}; got {got}.")
        batch, k = hidden.shape[:2]
        if batch == 0:
            raise ValueError("`hidden` has no prompts (B = 0): the batch average is undefined.")
        if k < 2 and self.loss != "raft":
            raise ValueError(f"`hidden` has K = {k} response per prompt; loss {self.loss!r} ranks K >= 2.")
        # the log-probs are float64 for float64 heads, else float32: the rewards are compared in that dtype
        dt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        r, mask = check_rewards_and_mask(rewards, mask, (batch, k), hidden.device, dt, shape_of="hidden")
        if checks_values() and not bool(mask.any(dim=1).all()):
            raise ValueError("`mask` leaves a prompt without any response: every prompt needs one (its SFT target).")
        lengths = (labels != self.ignore_index).sum(dim=-1)
        if checks_values() and bool((mask & (lengths == 0)).any()):
            raise ValueError(
                "`labels` has a valid response without any completion token (all `ignore_index`); "
                "mark empty slots False in `mask`."
            )
        return r, mask, lengths

    def _logps(self, hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None):
        return linear_logprobs(
            hidden,
            weight,
            labels,
            bias,
            ignore_index=self.ignore_index,
            return_stats=self.compute_metrics,
            backend=self.backend,
            **self.transform,
        )

    def forward(
        self,
        lm_head_weight: Tensor,
        hidden: Tensor,
        labels: Tensor,
        rewards: Tensor,
        *,
        mask: Tensor | None = None,
        bias: Tensor | None = None,
    ) -> RankingLossOutput:
        """One step's loss.

        Args:
            lm_head_weight: ``[V, H]`` LM head (trainable or frozen).
            hidden: ``[B, K, T, H]`` final hidden states of the ``K`` responses of each prompt.
            labels: ``[B, K, T]`` next-token ids aligned with ``hidden``; ``ignore_index`` off the completion.
            rewards: ``[B, K]`` real, higher is better (no gradient).
            mask: optional ``[B, K]`` bool, False for an empty slot (a prompt with fewer than ``K``
                responses); every prompt needs at least one response.
            bias: optional ``[V]`` head bias.

        Inside ``torch.autocast`` the head's operands are cast to the region's dtype (docs/design.md,
        "Mixed precision"); the rewards are not.
        """
        ac = head_autocast(hidden)
        with ac.region():
            return self._forward(ac.cast(lm_head_weight), ac.cast(hidden), labels, rewards, mask, ac.cast(bias))

    def _forward(
        self,
        lm_head_weight: Tensor,
        hidden: Tensor,
        labels: Tensor,
        rewards: Tensor,
        mask: Tensor | None,
        bias: Tensor | None,
    ) -> RankingLossOutput:
        r, mask, lengths = self._check(hidden, labels, rewards, mask)
        # the per-response sums accumulate in float64 (losses.aggregate: a long response's sum is large,
        # its float32 spacing coarse) and the scores, losses and metrics are computed from them in float64;
        # the outputs are cast back to the per-token dtype ``dt`` at the end
        dt = r.dtype
        r = r.to(sum_dtype(hidden.device))
        best = best_response_mask(r, mask)
        n = lengths.to(r.dtype)
        # empty slots become ignored tokens: no work, and their hidden states may hold anything
        labels = labels.masked_fill(~mask[..., None], self.ignore_index)

        if self.loss == "raft":
            # only the selected responses go through the head: [M, T, H] rows, M = number of best responses
            if checks_values():
                out = self._logps(hidden[best], lm_head_weight, labels[best], bias)
                tok, stats = out if isinstance(out, tuple) else (out, None)
                token_mask = labels[best] != self.ignore_index
                seq_best = tok.sum(dim=-1, dtype=r.dtype)
            else:
                # torch.compile: rows picked by a mask have a data-dependent count; the others' labels are
                # ignored instead (the op compacts ignored tokens away: the same 1/K of the work)
                out = self._logps(hidden, lm_head_weight, labels.masked_fill(~best[..., None], self.ignore_index), bias)
                tok, stats = out if isinstance(out, tuple) else (out, None)
                token_mask = (labels != self.ignore_index) & best[..., None]
                seq_best = tok.sum(dim=-1, dtype=r.dtype)[best]
            logps = torch.full_like(r, float("nan")).masked_scatter(best, seq_best.detach().to(r.dtype))
            seq = None
        else:
            out = self._logps(hidden, lm_head_weight, labels, bias)
            tok, stats = out if isinstance(out, tuple) else (out, None)
            token_mask = labels != self.ignore_index
            seq = tok.sum(dim=-1, dtype=r.dtype)  # [B, K], 0 at masked slots
            logps = seq.detach()
        scores_detached = logps / n.clamp(min=1)

        n_best = best.sum(dim=1).to(r.dtype)  # >= 1 per prompt (checked)
        if self.loss == "raft":
            nll_rows = -seq_best.to(r.dtype) / n[best]  # token-mean NLL of each selected response
            # each prompt's tied best responses share its weight: the batch mean of per-prompt means
            sft = (nll_rows / n_best.repeat_interleave(best.sum(dim=1))).sum() / best.shape[0]
            rank = torch.zeros((), dtype=r.dtype, device=r.device)
            loss = self.sft_weight * sft
        else:
            assert seq is not None
            scores = seq / n.clamp(min=1)
            rank = ranking_loss(
                self.loss, scores, r, mask=mask, **({"reward_temperature": True} if self.reward_temperature else {})
            )
            zero = torch.zeros_like(seq)
            if self.loss == "rrhf":
                nll = torch.where(best, -scores, zero).sum(dim=1) / n_best  # cross-entropy (token mean)
                sft = nll.mean()
            else:
                nll = torch.where(best, -seq, zero).sum(dim=1) / n_best  # summed NLL (PRO's code)
                ranking_len = mask.sum(dim=1).to(r.dtype)
                sft = ((ranking_len - 1) ** 2 * nll).mean()  # beta = sft_weight * (l - 1)^2 per prompt
            loss = rank + self.sft_weight * sft

        metrics: dict[str, Tensor] = {}
        if self.compute_metrics:
            metrics = self._metrics(rank, sft, scores_detached, r, mask, best, stats, token_mask)
            metrics = {k: v.to(dt) for k, v in metrics.items()}
        return RankingLossOutput(loss.to(dt), metrics, scores_detached.to(dt), logps.to(dt), best)

    def _metrics(self, rank, sft, scores, r, mask, best, stats, token_mask) -> dict[str, Tensor]:
        with torch.no_grad():  # (a block, not a decorator: dynamo traces it on a module built in the trace)
            return self._metrics_of(rank, sft, scores, r, mask, best, stats, token_mask)

    def _metrics_of(self, rank, sft, scores, r, mask, best, stats, token_mask) -> dict[str, Tensor]:
        m = {"loss/rank": rank.detach(), "loss/sft": sft.detach()}
        m["logps/best"] = scores[best].mean()
        m["rewards/best"] = r[best].mean()
        m["rewards/mean"] = r[mask].mean()
        if self.loss != "raft":
            m["logps/mean"] = scores[mask].mean()
            pairs = mask[:, :, None] & mask[:, None, :] & (r[:, :, None] < r[:, None, :])
            right = pairs & (scores[:, :, None] < scores[:, None, :])
            m["ranking/accuracy"] = right.sum().to(r.dtype) / pairs.sum().clamp(min=1).to(r.dtype)
        if stats is not None:
            m["entropy"] = masked_mean(stats.entropy, token_mask)
        return m

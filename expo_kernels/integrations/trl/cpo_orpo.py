"""TRL's experimental CPO (CPO, SimPO, AlphaPO) and ORPO trainers on expo_kernels' fused head.

TRL computes these from full logits in ``concatenated_forward``; ours returns the same numbers from
hidden states. This module needs TRL's ``trl.experimental.cpo`` / ``trl.experimental.orpo``; the package
imports it only when TRL has them (``_trl_compat.HAS_TRL_CPO_ORPO``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ...distributed.zero3 import zero3_gathered
from ...functional import linear_logprobs
from ...losses.aggregate import sum_dtype
from ..hf import lm_head_parameters
from ._trl_compat import ConcatenatedForwardHook, TRLCPOTrainer, TRLORPOTrainer, unwrap_trained_model
from .fused_head import (
    add_fused_lm_head,
    call_with_lm_head,
    check_head_options,
    fused_head_options,
    gathered,
    head_operands,
)

__all__ = ["FusedCPOTrainer", "FusedORPOTrainer"]


def _mean_logit(hidden: Tensor, weight: Tensor, bias: Tensor | None, transform: dict) -> Tensor:
    """Mean of the (transformed) logits over all positions of ``hidden [R, T, H]`` and the vocabulary,
    without logits: TRL logs it as ``logits/chosen`` / ``logits/rejected``. For an affine head
    ``mean_v z = h . mean_v(W) + mean(b)`` (times the scale); a softcap needs the op's statistics."""
    with torch.no_grad():
        if transform["softcap"] is None:
            scale = (transform["logit_scale"] or 1.0) / transform["temperature"]
            per_pos = hidden.float() @ weight.float().mean(0)
            if bias is not None:
                per_pos = per_pos + bias.float().mean()
            return (per_pos * scale).mean()
        dummy = torch.zeros(hidden.shape[:-1], dtype=torch.long, device=hidden.device)
        _, stats = linear_logprobs(hidden, weight, dummy, bias, return_stats=True, **transform)
        return stats.mean_logit.mean()


class _FusedConcatenatedForward(ConcatenatedForwardHook):
    """``concatenated_forward`` of TRL's CPO/ORPO trainers on expo_kernels' head.

    Returns what TRL's returns — ``(chosen_logps, rejected_logps, chosen_logits, rejected_logits,
    nll_loss)`` — except that the two "logits" are 0-d tensors holding their mean (the only use TRL
    makes of them, for the ``logits/*`` metrics), so no logits exist.
    """

    _nll_over_prompt = False  # ORPO: the chosen NLL covers prompt and completion tokens
    _expo_backend: str | None

    # the host trainer's (CPOTrainer / ORPOTrainer)
    model: torch.nn.Module | None
    is_encoder_decoder: Any  # a bool; TRL's type, inferred from `model.config`, is Any | Tensor | Module
    aux_loss_enabled: bool

    def _expo_setup_head(self, backend, logit_transform) -> None:
        if self.is_encoder_decoder:
            raise ValueError("expo_kernels' fused head supports decoder-only models, not encoder-decoder ones.")
        if self.aux_loss_enabled:
            raise ValueError("MoE router auxiliary losses are not supported by expo_kernels' fused head.")
        add_fused_lm_head(
            unwrap_trained_model(self, self.model), backend=backend, logit_transform_override=logit_transform
        )
        self._expo_backend = backend

    def _average_logps(self) -> bool:
        return True

    def _nll_weight(self) -> float:
        return 1.0

    def fused_concatenated_forward(self, model, batch):
        cb = self.concatenate_batch(batch, self._expo_pad_value())
        len_chosen = batch["chosen_labels"].shape[0]
        ids, attn = cb["concatenated_input_ids"], cb["concatenated_attention_mask"]
        completion = cb["concatenated_labels"]
        # one pass scores every token the loss reads: the completion, plus the prompt for ORPO's NLL
        labels = torch.where(attn == 1, ids, -100) if self._nll_over_prompt else completion
        out = model(ids, attention_mask=attn, use_cache=False, labels=labels, fused_lm_head="hidden")
        policy = unwrap_trained_model(self, self.model)
        transform = fused_head_options(policy)["transform"]

        def project(weight, bias, hidden, labels):
            hidden, weight, bias = head_operands(hidden, weight, bias)
            return linear_logprobs(hidden, weight, labels, bias, backend=self._expo_backend, **transform)

        head = policy.get_output_embeddings()
        logp = call_with_lm_head(head, project, out.hidden_states, out.labels)
        comp_mask = completion[:, 1:].to(logp.device) != -100
        # float64 sums (losses.aggregate): TRL's loss code subtracts them, and a long row's float32 sum
        # has a spacing of 1/64 at 2e5; TRL's loss and metrics then run in float64
        seq = torch.where(comp_mask, logp, torch.zeros_like(logp)).sum(-1, dtype=sum_dtype(logp.device))
        if self._average_logps():
            seq = seq / comp_mask.sum(-1)
        if self._nll_weight() == 0:
            nll = torch.tensor(0.0, device=self.accelerator.device)
        else:  # nn.CrossEntropyLoss: mean over the scored tokens of the chosen rows
            scored = out.labels[:len_chosen] != -100
            nll = -logp[:len_chosen].sum() / scored.sum()
        # TRL logs the mean of all_logits[:, :-1] (ORPO) or of all_logits (CPO): no gradient, the
        # head's full tensors are enough
        pos = out.hidden_states if self._nll_over_prompt else out.last_hidden_state
        with torch.no_grad(), zero3_gathered(*lm_head_parameters(policy)) as heads:  # ZeRO-3: for this only
            weight, bias = (gathered(t) for t in heads)
            pos, weight, bias = head_operands(pos.detach(), weight, bias)
            mean_c = _mean_logit(pos[:len_chosen], weight, bias, transform)
            mean_r = _mean_logit(pos[len_chosen:], weight, bias, transform)
        return seq[:len_chosen], seq[len_chosen:], mean_c, mean_r, nll


class FusedCPOTrainer(_FusedConcatenatedForward, TRLCPOTrainer):
    """``trl.experimental.cpo.CPOTrainer`` (CPO, SimPO, AlphaPO, ...) on expo_kernels' head: same
    arguments, losses and metrics, no logits."""

    def __init__(self, *args, backend: str | None = None, logit_transform: dict | None = None, **kwargs):
        check_head_options(backend, logit_transform)
        super().__init__(*args, **kwargs)
        self._expo_setup_head(backend, logit_transform)

    def _expo_pad_value(self):
        return self.pad_token_id

    def _average_logps(self) -> bool:
        return self.loss_type in ("ipo", "simpo")

    def _nll_weight(self) -> float:
        return self.cpo_alpha


class FusedORPOTrainer(_FusedConcatenatedForward, TRLORPOTrainer):
    """``trl.experimental.orpo.ORPOTrainer`` on expo_kernels' head: same arguments, loss and metrics."""

    _nll_over_prompt = True

    def __init__(self, *args, backend: str | None = None, logit_transform: dict | None = None, **kwargs):
        check_head_options(backend, logit_transform)
        super().__init__(*args, **kwargs)
        self._expo_setup_head(backend, logit_transform)

    def _expo_pad_value(self):
        return self.padding_value

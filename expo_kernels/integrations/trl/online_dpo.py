"""TRL's experimental online DPO trainer on expo_kernels' fused head.

TRL 1.16's ``trl.experimental.online_dpo.OnlineDPOTrainer`` scores each generated completion with
``_forward``: a full model forward, ``[batch, T, V]`` logits, ``log_softmax`` and a gather, for the policy
(with gradient) and for the reference (without). :class:`FusedOnlineDPOTrainer` replaces only that
method: the policy and the reference are patched with :func:`.fused_head.add_fused_lm_head`, and
``_forward`` returns the same per-token log-probs from the backbone's hidden states through
:func:`expo_kernels.linear_logprobs` (the reference pass runs without gradient, so on the op's
forward-only path). Generation, rewards, the loss (``loss_type`` ``"sigmoid"`` / ``"ipo"``), ``beta``
(also a per-epoch list), ``missing_eos_penalty``, PEFT references (adapters off) and every logged metric
are TRL's code, unchanged.

Refused, naming the option: a ``loss_type`` TRL's online DPO does not implement (at construction;
TRL itself fails at the first step), image inputs (``_forward``'s vision kwargs), MoE router losses.
vLLM generation (``use_vllm=True``) passes through to TRL (it needs vLLM installed); our ``_forward``
then scores vLLM's completions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._trl_compat import unwrap_trained_model
from .fused_head import add_fused_lm_head, check_head_options

try:
    from trl.experimental.online_dpo import OnlineDPOTrainer as TRLOnlineDPOTrainer
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(
        "expo_kernels.integrations.trl.online_dpo needs `trl>=1.16` with trl.experimental.online_dpo: " + str(e)
    ) from e

__all__ = ["FusedOnlineDPOTrainer", "TRL_ONLINE_DPO_LOSS_TYPES"]

#: the ``OnlineDPOConfig.loss_type`` values TRL 1.16's online DPO implements
TRL_ONLINE_DPO_LOSS_TYPES = ("sigmoid", "ipo")


class FusedOnlineDPOTrainer(TRLOnlineDPOTrainer):
    """``trl.experimental.online_dpo.OnlineDPOTrainer`` whose policy and reference log-probs come from
    expo_kernels' head on the hidden states (no ``[batch, T, V]`` logits); same arguments, plus:

    Args:
        backend: kernel backend (default: from the device).
        logit_transform: the transform of a model type expo_kernels does not know
            (``{}`` for plain logits, or ``{"logit_scale": s, "softcap": c}``).
    """

    # the host trainer's
    args: Any  # an OnlineDPOConfig
    ref_model: torch.nn.Module | None
    max_length: int

    def __init__(self, *args, backend: str | None = None, logit_transform: dict | None = None, **kwargs):
        check_head_options(backend, logit_transform)
        super().__init__(*args, **kwargs)
        if self.args.loss_type not in TRL_ONLINE_DPO_LOSS_TYPES:
            raise ValueError(
                f"OnlineDPOConfig.loss_type={self.args.loss_type!r}: TRL's online DPO implements "
                f"{list(TRL_ONLINE_DPO_LOSS_TYPES)} only."
            )
        # TRL scores with the raw logits (no generation temperature): the head's transform is the model's
        models = [unwrap_trained_model(self, self.model)]
        if self.ref_model is not None:
            models.append(self.accelerator.unwrap_model(self.ref_model))
        for m in models:
            add_fused_lm_head(m, backend=backend, logit_transform_override=logit_transform)

    def _forward(self, model, prompt_ids, prompt_mask, completion_ids, completion_mask, vision_inputs=None) -> Tensor:
        """TRL's ``_forward`` (the same truncation and the same positions) on expo_kernels' head: the
        log-prob of every completion token, padding included, as ``[batch, completion_len]`` float32."""
        if vision_inputs is not None:
            raise NotImplementedError(
                "FusedOnlineDPOTrainer does not take image inputs (the dataset's 'image' column); use TRL's "
                "OnlineDPOTrainer for vision-language models."
            )
        # Truncate left, as TRL does
        num_tokens_to_truncate = max(prompt_ids.size(1) + completion_ids.size(1) - self.max_length, 0)
        prompt_ids = prompt_ids[:, num_tokens_to_truncate:]
        prompt_mask = prompt_mask[:, num_tokens_to_truncate:]
        input_ids = torch.cat((prompt_ids, completion_ids), dim=1)
        attention_mask = torch.cat((prompt_mask, completion_mask), dim=1)
        # TRL reads the logits at [prompt_len - 1, T - 1) (at [0, T) for an empty prompt) against the
        # completion tokens: the same positions here, as pre-shifted labels (-100 elsewhere: not computed)
        prompt_len, completion_len = prompt_ids.size(1), completion_ids.size(1)
        start = prompt_len - 1 if prompt_len > 0 else 0
        shift_labels = torch.full_like(input_ids, -100)
        shift_labels[:, start : start + completion_len] = completion_ids
        out = model(input_ids, attention_mask=attention_mask, shift_labels=shift_labels, fused_lm_head=True)
        return out.log_probs[:, start : start + completion_len]

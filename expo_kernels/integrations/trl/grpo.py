"""TRL's GRPO and RLOO trainers on expo_kernels' fused head.

``trl.GRPOTrainer`` and ``trl.RLOOTrainer`` (TRL >= 1.16) install TRL's fused LM head
(``trl.trainer.utils.add_fused_lm_head``) on the policy and the reference in their ``__init__`` and
compute every per-token log-prob and entropy through it (``_get_per_token_logps_and_entropies``: the
policy under grad, the old policy and the reference under ``torch.no_grad``).
:class:`FusedGRPOTrainer` / :class:`FusedRLOOTrainer` install :func:`.fused_head.add_fused_lm_head`
there instead, so all of TRL's loss code runs unchanged on :func:`expo_kernels.linear_logprobs`:

* every GRPO ``loss_type`` (:data:`TRL_GRPO_LOSS_TYPES`), token- and sequence-level importance
  sampling, clipping (``epsilon`` / ``epsilon_high`` / ``delta``), the KL to the reference
  (``beta > 0``, reference model or PEFT adapters off), the off-policy mask, the high-entropy token
  mask (``top_entropy_quantile``: the entropy comes from the same pass as the log-probs), ``temperature``
  and ``cast_lm_head_to_fp32``; RLOO's sequence-level clipped loss, with or without its KL term;
* the old-policy and reference passes run without gradient, so the op takes its forward-only path
  (``expo_kernels.plan``: "no gradient follows");
* generation is TRL's own (transformers ``generate``, paged / continuous batching, or vLLM: our head only
  replaces the training-side log-prob passes, so a vLLM set-up passes through unchanged; TRL itself
  raises when vLLM is not installed).

Refused, naming the option: GRPO's entropy bonus (``entropy_coef != 0`` / ``use_adaptive_entropy``),
whose gradient flows through the entropy, which :class:`expo_kernels.TokenStats` carries without
gradient; MoE router losses (``output_router_logits``), as for every trainer on our head.
"""

from __future__ import annotations

import inspect
from typing import Any

from ._trl_compat import trl_head_replaced
from .fused_head import add_fused_lm_head, check_head_options

try:  # module-level names the trainers' ``__init__`` calls (swapped for the duration of ``__init__``)
    from trl.trainer import grpo_trainer as trl_grpo
    from trl.trainer import rloo_trainer as trl_rloo
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError("expo_kernels.integrations.trl.grpo needs `trl>=1.16` with GRPO/RLOO: " + str(e)) from e

__all__ = ["FusedGRPOTrainer", "FusedRLOOTrainer", "TRL_GRPO_LOSS_TYPES"]

#: the ``GRPOConfig.loss_type`` values of TRL 1.16 (all run on our head, TRL's loss code unchanged)
TRL_GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")


def _bound_config(trainer_cls: type, args: tuple, kwargs: dict[str, Any]):
    """The ``args`` (config) argument of ``trainer_cls.__init__(*args, **kwargs)``, or None."""
    try:
        bound = inspect.signature(trainer_cls).bind_partial(*args, **kwargs)
    except TypeError:  # let TRL's own __init__ report a bad call
        return None
    return bound.arguments.get("args")


def _check_grpo_config(config) -> None:
    """GRPO options our head cannot serve, refused before TRL's ``__init__`` (model loading, copies)."""
    if config is None:
        return
    if getattr(config, "entropy_coef", 0.0) != 0.0 or getattr(config, "use_adaptive_entropy", False):
        raise NotImplementedError(
            f"GRPOConfig.entropy_coef={config.entropy_coef!r} / use_adaptive_entropy="
            f"{config.use_adaptive_entropy!r}: the entropy bonus backpropagates through the per-token entropy, "
            "which expo_kernels' head returns without gradient. Use entropy_coef=0.0 and "
            "use_adaptive_entropy=False (the entropy metric and top_entropy_quantile masking are supported), "
            "or trl.GRPOTrainer."
        )


class FusedGRPOTrainer(trl_grpo.GRPOTrainer):
    """``trl.GRPOTrainer`` whose LM head (policy, old-policy and reference passes) runs through
    expo_kernels; same arguments, plus:

    Args:
        backend: kernel backend (default: from the device).
        logit_transform: the transform of a model type expo_kernels does not know
            (``{}`` for plain logits, or ``{"logit_scale": s, "softcap": c}``).
    """

    def __init__(self, *args, backend: str | None = None, logit_transform: dict | None = None, **kwargs):
        check_head_options(backend, logit_transform)
        _check_grpo_config(_bound_config(trl_grpo.GRPOTrainer, args, kwargs))
        with trl_head_replaced(trl_grpo, add_fused_lm_head, backend=backend, logit_transform_override=logit_transform):
            super().__init__(*args, **kwargs)
        _check_grpo_config(self.args)  # a default config (args=None) is TRL's, checked here


class FusedRLOOTrainer(trl_rloo.RLOOTrainer):
    """``trl.RLOOTrainer`` whose LM head (policy, old-policy and reference passes) runs through
    expo_kernels; same arguments, plus ``backend`` and ``logit_transform`` as :class:`FusedGRPOTrainer`."""

    def __init__(self, *args, backend: str | None = None, logit_transform: dict | None = None, **kwargs):
        check_head_options(backend, logit_transform)
        with trl_head_replaced(trl_rloo, add_fused_lm_head, backend=backend, logit_transform_override=logit_transform):
            super().__init__(*args, **kwargs)

"""Everything this package relies on inside TRL (and PEFT) that TRL does not promise to keep.

The rest of :mod:`expo_kernels.integrations.trl` uses TRL only through the names here, so a TRL
release that moves something is fixed in this file. Tested with TRL 1.16.

Relied on:

* modules ``trl.trainer.dpo_trainer`` / ``trl.trainer.kto_trainer``: the ``add_fused_lm_head`` name
  their trainers' ``__init__`` calls (:func:`trl_head_replaced` swaps it), and their trainer classes;
* ``trl.trainer.utils.FusedCausalLMOutput`` (the patched forward's return type) and its fields
  :data:`FUSED_OUTPUT_STATS`; ``trl.trainer.utils.use_adapter``;
  ``trl.models.utils.disable_gradient_checkpointing``;
* ``trl.experimental.cpo.CPOTrainer`` / ``trl.experimental.orpo.ORPOTrainer`` (defined only when
  :data:`HAS_TRL_CPO_ORPO`) and their ``concatenated_forward`` / ``concatenated_inputs`` methods
  (:class:`ConcatenatedForwardHook`);
* ``DPOTrainer._compute_loss`` (:class:`DPOComputeLossHook`) and the metric state
  ``_metrics`` / ``_total_train_tokens`` / ``_tp_size`` (:func:`log_metrics`);
* the ``loss_type`` values and hyperparameter fields (with defaults) of TRL 1.16's ``DPOConfig``
  (:data:`TRL_DPO_LOSS_TYPES`, :data:`DPO_CONFIG_HPARAMS`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

try:  # the integration needs TRL; the rest of the package does not
    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer import dpo_trainer as trl_dpo
    from trl.trainer import kto_trainer as trl_kto
    from trl.trainer.utils import FusedCausalLMOutput, use_adapter
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(
        "expo_kernels.integrations.trl needs `trl>=1.16` (pip install trl); its import failed: " + str(e)
    ) from e

#: whether TRL has its CPO / ORPO trainers (moved to trl.experimental; absent in some versions):
#: ``TRLCPOTrainer`` / ``TRLORPOTrainer`` exist only then
HAS_TRL_CPO_ORPO = True
try:
    from trl.experimental.cpo import CPOTrainer as TRLCPOTrainer
    from trl.experimental.orpo import ORPOTrainer as TRLORPOTrainer
except ImportError:  # pragma: no cover
    HAS_TRL_CPO_ORPO = False

#: the PEFT model classes, for ``isinstance`` (empty without PEFT installed)
PEFT_MODEL_TYPES: tuple[type, ...] = ()
try:
    from peft import PeftModel

    PEFT_MODEL_TYPES = (PeftModel,)
except ImportError:  # pragma: no cover
    pass

__all__ = [
    "trl_dpo",
    "trl_kto",
    "FusedCausalLMOutput",
    "use_adapter",
    "disable_gradient_checkpointing",
    "HAS_TRL_CPO_ORPO",
    "TRLCPOTrainer",
    "TRLORPOTrainer",
    "PEFT_MODEL_TYPES",
    "TRL_DPO_LOSS_TYPES",
    "DPO_CONFIG_HPARAMS",
    "FUSED_OUTPUT_STATS",
    "trl_head_replaced",
    "unwrap_trained_model",
    "log_metrics",
    "DPOComputeLossHook",
    "ConcatenatedForwardHook",
]

#: the ``loss_type`` values TRL 1.16's DPOTrainer implements itself
TRL_DPO_LOSS_TYPES = frozenset(
    {
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
    }
)
#: DPOConfig fields that are hyperparameters of our registry's losses, with TRL's defaults
DPO_CONFIG_HPARAMS = {
    "beta": None,
    "label_smoothing": 0.0,
    "f_divergence_type": "reverse_kl",
    "f_alpha_divergence_coef": 0.5,
    "discopop_tau": 0.05,
}
#: the per-token statistics fields of ``FusedCausalLMOutput`` (besides ``log_probs``)
FUSED_OUTPUT_STATS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


@contextlib.contextmanager
def trl_head_replaced(module, head_fn, **options):
    """Make ``module.add_fused_lm_head`` (the name TRL's trainer calls in its ``__init__``)
    ``functools.partial(head_fn, **options)`` for the duration of the block."""
    saved = module.add_fused_lm_head
    module.add_fused_lm_head = functools.partial(head_fn, **options)
    try:
        yield
    finally:
        module.add_fused_lm_head = saved


def unwrap_trained_model(trainer, model):
    """``model`` without its accelerate wrapper and, for a PEFT model, its adapters' wrapper."""
    m = trainer.accelerator.unwrap_model(model)
    return m.get_base_model() if isinstance(m, PEFT_MODEL_TYPES) else m


def log_metrics(
    trainer,
    mode: str,
    attention_mask: Tensor,
    metrics: dict[str, Tensor],
    token_counts: dict[str, Tensor] | None = None,
) -> None:
    """Record ``metrics`` (0-d tensors) and the token count in the trainer's metric state, as
    ``DPOTrainer._compute_loss`` does for its own.

    ``token_counts``: for the metrics that are token means on each rank, the rank's token count; TRL
    reports those as means over all ranks' tokens (sum of value * count over sum of counts), not as the
    mean of the ranks' means (which differ as soon as the ranks have different token counts)."""
    if mode == "train":
        n = trainer.accelerator.gather_for_metrics(attention_mask.sum()).sum().item()
        trainer._total_train_tokens += n // trainer._tp_size
    trainer._metrics[mode]["num_tokens"] = [trainer._total_train_tokens]
    counts = token_counts or {}
    for k, v in metrics.items():
        if k in counts:
            n = counts[k].reshape(1).float()
            total, tokens = (trainer.accelerator.gather_for_metrics(t).sum() for t in (v.reshape(1).float() * n, n))
            trainer._metrics[mode][k].append((total / tokens).item() if tokens > 0 else 0.0)
        else:
            trainer._metrics[mode][k].append(trainer.accelerator.gather_for_metrics(v.reshape(1).float()).mean().item())


class DPOComputeLossHook:
    """Routes ``DPOTrainer._compute_loss`` to ``self.fused_compute_loss``; where that returns None,
    TRL's own ``_compute_loss`` runs."""

    def _compute_loss(self, model, inputs, return_outputs):
        result = self.fused_compute_loss(model, inputs, return_outputs)
        if result is None:
            return super()._compute_loss(model, inputs, return_outputs)
        return result


class ConcatenatedForwardHook:
    """Routes the CPO/ORPO trainers' ``concatenated_forward`` to ``self.fused_concatenated_forward``
    and gives it TRL's batch concatenation (:meth:`concatenate_batch`)."""

    # the host trainer's (CPOTrainer / ORPOTrainer)
    accelerator: Any
    concatenated_inputs: Callable[..., dict[str, torch.LongTensor]]

    def concatenated_forward(self, model, batch):
        return self.fused_concatenated_forward(model, batch)

    def concatenate_batch(self, batch, padding_value) -> dict[str, torch.LongTensor]:
        """TRL's ``concatenated_inputs`` of a decoder-only batch: chosen rows, then rejected rows."""
        return self.concatenated_inputs(
            batch, is_encoder_decoder=False, padding_value=padding_value, device=self.accelerator.device
        )

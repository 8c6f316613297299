"""TRL trainers on expo_kernels' fused LM head.

TRL (>= 1.16) computes per-token log-probs through a patched ``model.forward``
(``trl.trainer.utils.add_fused_lm_head``). :func:`add_fused_lm_head` here is a drop-in for that
function whose head is :func:`expo_kernels.linear_logprobs`, so every TRL code path built on it (all
DPO loss types, ld_alpha, WPO, precomputed references, PEFT references, KTO) runs unchanged on our
kernels.

* :mod:`.fused_head`: :func:`add_fused_lm_head` and the head's operands.
* :mod:`.dpo_kto`: :class:`FusedDPOTrainer` / :class:`FusedKTOTrainer` (``trl.DPOTrainer`` /
  ``trl.KTOTrainer`` with our head installed before TRL's ``__init__`` uses it); losses TRL lacks
  (``loss_type="expo"``, ``"simpo"``, ``"odpo"``, any name of :data:`expo_kernels.LOSSES`) through
  :class:`expo_kernels.FusedLinearPreferenceLoss`, their extra hyperparameters in ``loss_kwargs``;
  :func:`enable_fused_lm_head` switches an already-built trainer.
* :mod:`.cpo_orpo`: :class:`FusedCPOTrainer` / :class:`FusedORPOTrainer`, TRL's experimental CPO (CPO,
  SimPO, AlphaPO) and ORPO trainers with ``concatenated_forward`` on our op.
* :mod:`._trl_compat`: every TRL internal the above relies on.

Tested with TRL 1.16 (``tests/test_integration_trl.py``).
"""

from ._trl_compat import HAS_TRL_CPO_ORPO
from .dpo_kto import TRL_DPO_LOSS_TYPES, FusedDPOTrainer, FusedKTOTrainer, enable_fused_lm_head
from .fused_head import add_fused_lm_head, call_with_lm_head
from .grpo import TRL_GRPO_LOSS_TYPES, FusedGRPOTrainer, FusedRLOOTrainer
from .online_dpo import TRL_ONLINE_DPO_LOSS_TYPES, FusedOnlineDPOTrainer

if HAS_TRL_CPO_ORPO:
    from .cpo_orpo import FusedCPOTrainer, FusedORPOTrainer

__all__ = [
    "add_fused_lm_head",
    "call_with_lm_head",
    "FusedDPOTrainer",
    "FusedKTOTrainer",
    "FusedCPOTrainer",
    "FusedORPOTrainer",
    "enable_fused_lm_head",
    "TRL_DPO_LOSS_TYPES",
    "FusedGRPOTrainer",
    "FusedRLOOTrainer",
    "FusedOnlineDPOTrainer",
    "TRL_GRPO_LOSS_TYPES",
    "TRL_ONLINE_DPO_LOSS_TYPES",
]

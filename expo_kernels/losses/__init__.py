"""Sequence-level preference losses on per-sequence log-probs, and their registry.

>>> from expo_kernels.losses import preference_loss, LOSSES
>>> loss = preference_loss("sigmoid", chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1)

``LOSSES`` maps each name to a :class:`LossSpec` (function, hyperparameters with defaults, whether it
needs a reference / lengths / an NLL term, description). Covered: every ``loss_type`` of TRL 1.16's
``DPOTrainer`` (sigmoid, hinge, ipo, exo_pair, nca_pair, robust, bco_pair, sppo_hard, aot,
aot_unpaired, apo_zero, apo_down, discopop, sft, sigmoid_norm) with its f-divergence, label-smoothing
and MPO options; rpo and odpo; the reference-free cpo, simpo, alphapo and orpo; the unpaired kto and
apo_zero_unpaired; expo; and ropo (:mod:`.robust`). :mod:`.aggregate` turns per-token log-probs
into the per-sequence inputs (sums, lengths, LD-DPO weighting, WPO weights) as TRL does.
"""

from . import dpo_family, expo, reference_free, robust, unpaired  # noqa: F401  (registration side effects)
from .aggregate import PairedLogps, aggregate_pair_logps, sequence_logps, wpo_weights
from .api import preference_loss, preference_loss_and_metrics
from .ranking import RANKING_LOSSES, ranking_loss
from .registry import LOSSES, REQUIRED, HParam, LossSpec, get_loss_spec, register_loss

__all__ = [
    "preference_loss",
    "preference_loss_and_metrics",
    "ranking_loss",
    "RANKING_LOSSES",
    "LOSSES",
    "LossSpec",
    "HParam",
    "REQUIRED",
    "register_loss",
    "get_loss_spec",
    "aggregate_pair_logps",
    "sequence_logps",
    "wpo_weights",
    "PairedLogps",
]

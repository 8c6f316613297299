"""TRL's DPO and KTO trainers on expo_kernels' fused head.

* :class:`FusedDPOTrainer` / :class:`FusedKTOTrainer`: ``trl.DPOTrainer`` / ``trl.KTOTrainer`` with our
  head installed before TRL's ``__init__`` uses it (the reference precompute included).
* Losses TRL lacks (``loss_type="expo"``, ``"simpo"``, ``"odpo"``, any name of
  :data:`expo_kernels.LOSSES`) run through :class:`expo_kernels.FusedLinearPreferenceLoss` on the
  backbone's hidden states; EXPO's ``kl_estimator="token"`` gets the fused two-head KL. Their extra
  hyperparameters go in ``loss_kwargs`` (e.g. ``{"lam": 0.1, "kl_estimator": "token"}``).
* :func:`enable_fused_lm_head` switches an already-built trainer.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, cast

import torch

from ..._validation import check_bool
from ...distributed.zero3 import zero3_gathered
from ...losses import LOSSES
from ...modules import FusedLinearPreferenceLoss
from ..hf import lm_head_parameters
from ._trl_compat import (
    DPO_CONFIG_HPARAMS,
    PEFT_MODEL_TYPES,
    TRL_DPO_LOSS_TYPES,
    DPOComputeLossHook,
    disable_gradient_checkpointing,
    log_metrics,
    trl_dpo,
    trl_head_replaced,
    trl_kto,
    unwrap_trained_model,
    use_adapter,
)
from .fused_head import (
    add_fused_lm_head,
    call_with_lm_head,
    check_head_options,
    fused_head_options,
    gathered,
    head_operands,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["FusedDPOTrainer", "FusedKTOTrainer", "enable_fused_lm_head", "TRL_DPO_LOSS_TYPES"]


def _check_loss_options(loss_kwargs=None, registry_loss=None) -> None:
    """The DPO-only options, checked (after :func:`check_head_options`) before TRL's ``__init__``."""
    if loss_kwargs is not None and not isinstance(loss_kwargs, dict):
        raise TypeError(f"loss_kwargs must be None or a dict, got {type(loss_kwargs).__name__} {loss_kwargs!r}")
    if loss_kwargs is not None and not all(isinstance(k, str) for k in loss_kwargs):
        raise TypeError(f"loss_kwargs must map hyperparameter names (str) to values, got keys {list(loss_kwargs)}")
    if registry_loss is not None:
        check_bool("registry_loss", registry_loss)


def _registry_loss(args, loss_kwargs: dict, backend, transform) -> FusedLinearPreferenceLoss:
    """The module computing ``args.loss_type`` from our registry; config options no chosen loss takes
    are refused when set to a non-default value (they would otherwise be silently ignored)."""
    names = list(args.loss_type)
    unknown = [n for n in names if n not in LOSSES]
    if unknown:
        raise ValueError(
            f"loss_type {unknown} is neither a TRL DPO loss type nor in expo_kernels.LOSSES ({sorted(LOSSES)})."
        )
    if any(not LOSSES[n].paired for n in names):
        raise ValueError(f"loss_type {names} includes an unpaired loss; use FusedKTOTrainer for KTO-style data.")
    accepted = {k for n in names for k in list(LOSSES[n].hparams) + list(LOSSES[n].aliases)}
    hparams = {}
    for key, default in DPO_CONFIG_HPARAMS.items():
        value = getattr(args, key)
        if key in accepted or key.startswith("f_"):
            hparams[key] = value
        elif default is not None and value != default:
            raise ValueError(f"DPOConfig.{key}={value!r} is not used by loss_type {names}; unset it.")
    overlap = set(hparams) & set(loss_kwargs)
    if overlap:
        raise ValueError(f"{sorted(overlap)} are DPOConfig fields; set them there, not in `loss_kwargs`.")
    return FusedLinearPreferenceLoss(
        names if len(names) > 1 else names[0],
        loss_weights=args.loss_weights,
        ld_alpha=args.ld_alpha,
        use_weighting=args.use_weighting,
        backend=backend,
        **transform,
        **hparams,
        **loss_kwargs,
    )


class _FusedDPOMixin(DPOComputeLossHook):
    """Our head in TRL's DPO code paths; losses TRL lacks through :class:`FusedLinearPreferenceLoss`."""

    _expo_backend: str | None
    _expo_loss: FusedLinearPreferenceLoss | None

    # the host trainer's (DPOTrainer)
    args: Any  # a DPOConfig (transformers' Trainer declares TrainingArguments)
    model: torch.nn.Module | None
    ref_model: PreTrainedModel | None
    accelerator: Any
    precompute_ref_logps: bool
    aux_loss_enabled: bool

    def _expo_setup(self, loss_kwargs: dict | None, backend: str | None, registry_loss: bool | None) -> None:
        self._expo_backend = backend
        loss_kwargs = dict(loss_kwargs or {})
        self._expo_loss = None
        if registry_loss is None:
            registry_loss = bool(loss_kwargs) or not set(self.args.loss_type) <= TRL_DPO_LOSS_TYPES
        if not registry_loss:
            if loss_kwargs:
                raise ValueError(
                    "`loss_kwargs` configure expo_kernels' losses; they need registry_loss=True (or None)."
                )
            return  # TRL's own loss code, on our head
        policy = unwrap_trained_model(self, self.model)
        transform = fused_head_options(policy)["transform"]
        if self.ref_model is not None:
            ref_t = fused_head_options(self.accelerator.unwrap_model(self.ref_model))["transform"]
            if ref_t != transform:
                raise ValueError(
                    f"The reference model's logit transform {ref_t} differs from the policy's {transform}."
                )
        self._expo_loss = _registry_loss(self.args, loss_kwargs, backend, transform)
        if self._expo_loss.token_kl and self.precompute_ref_logps:
            raise ValueError(
                "loss 'expo' with kl_estimator='token' needs the reference model's hidden states at every "
                "step; it cannot use precompute_ref_log_probs=True."
            )
        if self.aux_loss_enabled:
            raise ValueError("MoE router auxiliary losses are not supported with expo_kernels' losses.")

    def _reference_hidden(self, ref_model_kwargs, labels):
        """Reference hidden states (no grad) and its head (None = the policy's head, PEFT adapters off)."""
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if self.ref_model is None:
                unwrapped = self.accelerator.unwrap_model(self.model)
                ctx = contextlib.nullcontext()
                if isinstance(unwrapped, PEFT_MODEL_TYPES):
                    ctx = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
                else:
                    raise ValueError(
                        "No reference model: pass `ref_model`, train a PEFT adapter, or precompute the "
                        "reference log-probs."
                    )
                with ctx:
                    out = self.model(**ref_model_kwargs, labels=labels, fused_lm_head="hidden")
                return out.hidden_states, None, None
            out = self.ref_model(**ref_model_kwargs, labels=labels, fused_lm_head="hidden")
            w, b = lm_head_parameters(self.accelerator.unwrap_model(self.ref_model))
            return out.hidden_states, gathered(w), gathered(b)  # no gradient: a full copy is enough

    def fused_compute_loss(self, model, inputs, return_outputs):
        """The loss of our registry on the hidden states, or None for TRL's own loss code."""
        if self._expo_loss is None:
            return None
        mode = "train" if self.model.training else "eval"
        non_model = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
        model_kwargs = {k: v for k, v in inputs.items() if k not in non_model}
        model_kwargs["use_cache"] = False
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        seq_len = completion_mask.size(1) - 1
        out = model(**model_kwargs, labels=labels, fused_lm_head="hidden")
        hidden, shifted = out.hidden_states[:, -seq_len:], out.labels[:, -seq_len:]
        ref = {}
        if self.precompute_ref_logps:
            ref = dict(ref_chosen_logps=inputs["ref_chosen_logps"], ref_rejected_logps=inputs["ref_rejected_logps"])
        elif not self._expo_loss.reference_free:  # the loss, its token KL or its logged rewards read it
            ref_hidden, ref_w, ref_b = self._reference_hidden(model_kwargs, labels)
            ref = dict(ref_hidden=ref_hidden[:, -seq_len:], ref_weight=ref_w, ref_bias=ref_b)

        def loss(weight, bias, hidden, labels, **ref):
            hidden, weight, bias = head_operands(hidden, weight, bias)
            if ref.get("ref_hidden") is not None and ref.get("ref_weight") is None:  # shared head
                ref["ref_hidden"] = ref["ref_hidden"].to(weight.dtype)
            elif ref.get("ref_hidden") is not None:  # cast here, where a ZeRO-3 reference head is gathered
                ref["ref_hidden"], ref["ref_weight"], ref["ref_bias"] = head_operands(
                    ref["ref_hidden"], ref["ref_weight"], ref["ref_bias"]
                )
            return self._expo_loss(weight, hidden, labels, bias=bias, **ref)

        head = unwrap_trained_model(self, self.model).get_output_embeddings()
        # a DeepSpeed ZeRO-3 reference head (TRL prepares the reference model with its own engine) is
        # gathered once for the call, beside the policy head (call_with_lm_head); a no-op otherwise
        with zero3_gathered(ref.get("ref_weight"), ref.get("ref_bias")) as (ref_w, ref_b):
            if ref_w is not None:
                ref.update(ref_weight=ref_w, ref_bias=ref_b)
            result = call_with_lm_head(head, loss, hidden, shifted, **ref)
        mask_c, mask_r = (shifted != -100).chunk(2, dim=0)  # the module's token means are over these
        counts = {
            "entropy": mask_c.sum() + mask_r.sum(),
            "logits/chosen": mask_c.sum(),
            "logits/rejected": mask_r.sum(),
        }
        counts["mean_token_accuracy"] = counts["logits/chosen"]
        log_metrics(self, mode, inputs["attention_mask"], result.metrics, token_counts=counts)
        if return_outputs:
            with torch.no_grad():
                return result.loss, model(**model_kwargs)
        return result.loss


class FusedDPOTrainer(_FusedDPOMixin, trl_dpo.DPOTrainer):
    """``trl.DPOTrainer`` whose LM head runs through expo_kernels; same arguments, plus:

    Args:
        loss_kwargs: hyperparameters of :data:`expo_kernels.LOSSES` that ``DPOConfig`` has no field for
            (EXPO's ``lam``, ``kl_estimator``; SimPO's ``gamma``; ...). ``loss_type`` may name any
            registered paired loss.
        registry_loss: compute the loss with :class:`expo_kernels.FusedLinearPreferenceLoss` on the
            hidden states (True) or with TRL's own loss code on our head's log-probs (False). Default:
            TRL's code for TRL's loss types, ours for the others or when ``loss_kwargs`` are given.
        backend: kernel backend (default: from the device).
        logit_transform: the transform of a model type expo_kernels does not know
            (``{}`` for plain logits, or ``{"logit_scale": s, "softcap": c}``).
    """

    def __init__(
        self,
        *args,
        loss_kwargs: dict[str, Any] | None = None,
        backend: str | None = None,
        logit_transform: dict | None = None,
        registry_loss: bool | None = None,
        **kwargs,
    ):
        check_head_options(backend, logit_transform)
        _check_loss_options(loss_kwargs, registry_loss)
        with trl_head_replaced(trl_dpo, add_fused_lm_head, backend=backend, logit_transform_override=logit_transform):
            super().__init__(*args, **kwargs)
        self._expo_setup(loss_kwargs, backend, registry_loss)


class FusedKTOTrainer(trl_kto.KTOTrainer):
    """``trl.KTOTrainer`` whose LM head (policy, reference and KL-baseline passes) runs through expo_kernels."""

    def __init__(self, *args, backend: str | None = None, logit_transform: dict | None = None, **kwargs):
        check_head_options(backend, logit_transform)
        with trl_head_replaced(trl_kto, add_fused_lm_head, backend=backend, logit_transform_override=logit_transform):
            super().__init__(*args, **kwargs)


def enable_fused_lm_head(
    trainer,
    *,
    loss_kwargs: dict[str, Any] | None = None,
    backend: str | None = None,
    logit_transform: dict | None = None,
    registry_loss: bool | None = None,
):
    """Switch an already-built ``DPOTrainer`` or ``KTOTrainer`` to expo_kernels' head (and, for DPO,
    to our registry's losses when ``loss_type`` or ``loss_kwargs`` ask for them). Reference log-probs
    precomputed before the switch are kept. Returns the trainer."""
    dpo, kto = trl_dpo.DPOTrainer, trl_kto.KTOTrainer
    if not isinstance(trainer, (dpo, kto)):
        raise TypeError(f"enable_fused_lm_head expects a trl DPOTrainer or KTOTrainer, got {type(trainer).__name__}.")
    check_head_options(backend, logit_transform)  # before anything is patched
    _check_loss_options(loss_kwargs, registry_loss)
    if isinstance(trainer, kto) and loss_kwargs:
        raise ValueError("`loss_kwargs` applies to DPOTrainer losses only.")
    outputs: tuple[str, ...] = ("log_probs", "entropy", "mean_logits", "is_top1")
    if isinstance(trainer, dpo) and trainer.use_weighting:
        outputs += ("log_sum_sq_probs",)
    policy = unwrap_trained_model(trainer, trainer.model)
    add_fused_lm_head(policy, outputs=outputs, backend=backend, logit_transform_override=logit_transform)
    if trainer.ref_model is not None:
        ref = trainer.accelerator.unwrap_model(trainer.ref_model)
        add_fused_lm_head(ref, backend=backend, logit_transform_override=logit_transform)
    if isinstance(trainer, dpo) and not isinstance(trainer, _FusedDPOMixin):
        trainer.__class__ = type(f"Fused{type(trainer).__name__}", (_FusedDPOMixin, type(trainer)), {})
        cast(_FusedDPOMixin, trainer)._expo_setup(loss_kwargs, backend, registry_loss)  # the class just set
    return trainer

"""TRL trainers on expo_kernels' fused LM head.

TRL (>= 1.16) computes per-token log-probs through a patched ``model.forward``
(``trl.trainer.utils.add_fused_lm_head``): called with ``fused_lm_head=True`` it runs the backbone and
a chunked LM head, and returns a ``FusedCausalLMOutput`` (log_probs, entropy, log_sum_sq_probs,
mean_logits, is_top1). :func:`add_fused_lm_head` here is a drop-in for that function whose head is
:func:`expo_kernels.linear_logprobs`, so every TRL code path built on it (all DPO loss types, ld_alpha,
WPO, precomputed references, PEFT references, KTO) runs unchanged on our kernels.

* :class:`FusedDPOTrainer` / :class:`FusedKTOTrainer`: ``trl.DPOTrainer`` / ``trl.KTOTrainer`` with our
  head installed before TRL's ``__init__`` uses it (the reference precompute included).
* Losses TRL lacks (``loss_type="expo"``, ``"simpo"``, ``"odpo"``, any name of
  :data:`expo_kernels.LOSSES`) run through :class:`expo_kernels.FusedLinearPreferenceLoss` on the
  backbone's hidden states; EXPO's ``kl_estimator="token"`` gets the fused two-head KL. Their extra
  hyperparameters go in ``loss_kwargs`` (e.g. ``{"lam": 0.1, "kl_estimator": "token"}``).
* :func:`enable_fused_lm_head` switches an already-built trainer.
* :class:`FusedCPOTrainer` / :class:`FusedORPOTrainer`: TRL's experimental CPO (CPO, SimPO, AlphaPO)
  and ORPO trainers, which compute from full logits, with ``concatenated_forward`` on our op.

Tested with TRL 1.16 (``tests/test_integration_trl.py``).
"""
from __future__ import annotations

import contextlib
import functools
import types
from typing import Any, Dict, Optional, Sequence

import torch
from torch import Tensor

from ..functional import TokenStats, linear_logprobs
from .._validation import check_backend_name, check_bool
from ..distributed.fsdp import fsdp_lm_head_call, is_fsdp2
from ..losses import LOSSES
from ..modules import FusedLinearPreferenceLoss
from .hf import backbone, check_no_router_aux_loss, lm_head_parameters, logit_transform

try:  # the integration needs TRL; the rest of the package does not
    import trl
    from trl.trainer import dpo_trainer as _trl_dpo
    from trl.trainer import kto_trainer as _trl_kto
    from trl.trainer.utils import FusedCausalLMOutput, use_adapter
    from trl.models.utils import disable_gradient_checkpointing
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(
        "expo_kernels.integrations.trl needs `trl>=1.16` (pip install trl); its import failed: " + str(e)
    ) from e

try:  # TRL's CPO / ORPO trainers moved to trl.experimental; absent in some versions
    from trl.experimental.cpo import CPOTrainer as _TRLCPOTrainer
    from trl.experimental.orpo import ORPOTrainer as _TRLORPOTrainer
except ImportError:  # pragma: no cover
    _TRLCPOTrainer = _TRLORPOTrainer = None

try:
    from peft import PeftModel
except ImportError:  # pragma: no cover
    PeftModel = ()

__all__ = ["add_fused_lm_head", "call_with_lm_head", "FusedDPOTrainer", "FusedKTOTrainer", "FusedCPOTrainer", "FusedORPOTrainer",
           "enable_fused_lm_head", "TRL_DPO_LOSS_TYPES"]

#: the ``loss_type`` values TRL 1.16's DPOTrainer implements itself
TRL_DPO_LOSS_TYPES = frozenset({
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
})
_STATS_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
_OUTPUT_NAMES = ("log_probs",) + _STATS_OUTPUTS


def _gathered(t: Optional[Tensor]) -> Optional[Tensor]:
    # FSDP2 holds parameters as DTensors; the op needs the whole head for the call (as TRL does).
    if t is not None and type(t).__name__ == "DTensor":
        return t.full_tensor()
    return t


def call_with_lm_head(head: torch.nn.Module, fn, *args, **kwargs):
    """``fn(weight, bias, *args, **kwargs)`` with the head's whole weight and bias.

    An FSDP2 head (``fully_shard(lm_head)``) runs ``fn`` as its own forward
    (:func:`expo_kernels.distributed.fsdp_lm_head_call`), so FSDP gathers the weight for the call
    and reduce-scatters its gradient; reading ``lm_head.weight`` directly would bypass those hooks.
    Otherwise the parameters are used as they are (inside an enclosing FSDP2 forward they are
    already gathered), a sharded DTensor outside any forward as its full tensor (as TRL does).
    """
    if is_fsdp2(head):
        return fsdp_lm_head_call(head, lambda w, *a, **k: fn(w, getattr(head, "bias", None), *a, **k),
                                 *args, **kwargs)
    return fn(_gathered(head.weight), _gathered(getattr(head, "bias", None)), *args, **kwargs)


def _head_operands(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]):
    """Operands in the dtype ``F.linear`` would use: under autocast the autocast dtype (as TRL's
    chunked head, whose matmul runs under autocast), otherwise the head's own dtype. The head's
    tensors come whole (``call_with_lm_head``)."""
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        return hidden.to(dt), weight.to(dt), None if bias is None else bias.to(dt)
    return hidden.to(weight.dtype), weight, bias


def add_fused_lm_head(
    model,
    temperature: float = 1.0,
    cast_lm_head_to_fp32: bool = False,
    outputs: Sequence[str] = ("log_probs",),
    *,
    backend: Optional[str] = None,
    logit_transform_override: Optional[Dict] = None,
) -> None:
    """Patch ``model.forward`` like ``trl.trainer.utils.add_fused_lm_head``, computing with expo_kernels.

    ``model(..., labels=labels, fused_lm_head=True)`` returns a ``FusedCausalLMOutput`` whose per-token
    fields (for the shifted labels, zero where the label is -100) come from one
    :func:`~expo_kernels.linear_logprobs` pass; the ``[batch, seq, vocab]`` logits never exist.
    ``fused_lm_head="hidden"`` returns the shifted final hidden states instead
    (``.hidden_states [B, T-1, H]``, ``.labels``; unshifted ``.last_hidden_state``), for losses
    that run the head themselves. Without
    ``fused_lm_head`` the original forward runs (generation is unchanged).

    Raises at patch time for a model whose logit transform is unknown
    (:func:`expo_kernels.integrations.hf.logit_transform`) or that asks for MoE router losses.
    """
    unknown = set(outputs) - set(_OUTPUT_NAMES)
    if unknown:
        raise ValueError(f"`outputs` may contain {list(_OUTPUT_NAMES)}; got unknown {sorted(unknown)}.")
    transform = logit_transform(model, temperature=temperature, override=logit_transform_override)
    check_no_router_aux_loss(model)
    with_stats = any(o in outputs for o in _STATS_OUTPUTS)
    original_forward = model.forward

    @functools.wraps(type(model).forward)
    def _fused_forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                       **kwargs):
        if not fused_lm_head:
            for k, v in (("labels", labels), ("shift_labels", shift_labels), ("num_items_in_batch", num_items_in_batch)):
                if v is not None:
                    kwargs[k] = v
            return original_forward(*args, **kwargs)
        if kwargs.get("output_router_logits"):
            raise ValueError("expo_kernels' fused LM head does not compute MoE router losses (output_router_logits=True).")
        kwargs["use_cache"] = False
        hidden = full = backbone(self)(*args, **kwargs).last_hidden_state
        if shift_labels is None:  # position t predicts token t+1
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        head = self.get_output_embeddings()
        hidden, labels = hidden.to(head.weight.device), labels.to(head.weight.device)
        if fused_lm_head == "hidden":
            return types.SimpleNamespace(hidden_states=hidden, labels=labels, last_hidden_state=full)

        def project(weight, bias, hidden, labels):
            if cast_lm_head_to_fp32:
                hidden, weight, bias = hidden.float(), weight.float(), None if bias is None else bias.float()
            else:
                hidden, weight, bias = _head_operands(hidden, weight, bias)
            res = linear_logprobs(hidden, weight, labels, bias, return_stats=with_stats, backend=backend, **transform)
            return tuple(res[:1]) + tuple(res[1]) if with_stats else (res,)  # flat: FSDP hooks every tensor

        res = call_with_lm_head(head, project, hidden, labels)
        logp = res[0]
        mask = labels != -100
        fields = dict.fromkeys(_STATS_OUTPUTS)
        if with_stats:
            stats = TokenStats(*res[1:])
            avail = {"entropy": stats.entropy, "log_sum_sq_probs": stats.log_sum_p2, "mean_logits": stats.mean_logit,
                     "is_top1": stats.is_top1}
            fields.update({k: avail[k] for k in _STATS_OUTPUTS if k in outputs})
        denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-logp.sum() / denom, log_probs=logp, label_mask=mask, **fields)

    model.forward = types.MethodType(_fused_forward, model)
    model._expo_kernels_fused_head = dict(transform=transform, backend=backend)


# -------------------------------------------------------------------------------------------------
# Trainers
# -------------------------------------------------------------------------------------------------
def _check_options(backend=None, logit_transform=None, loss_kwargs=None, registry_loss=None) -> None:
    """The options of our trainers, checked before TRL's ``__init__`` (model copies, dataset
    processing, reference precompute) so a typo fails at once, naming the argument."""
    check_backend_name(backend)
    for name, value in (("logit_transform", logit_transform), ("loss_kwargs", loss_kwargs)):
        if value is not None and not isinstance(value, dict):
            raise TypeError(f"{name} must be None or a dict, got {type(value).__name__} {value!r}")
    if loss_kwargs is not None and not all(isinstance(k, str) for k in loss_kwargs):
        raise TypeError(f"loss_kwargs must map hyperparameter names (str) to values, got keys {list(loss_kwargs)}")
    if registry_loss is not None:
        check_bool("registry_loss", registry_loss)


@contextlib.contextmanager
def _trl_head_replaced(module, **options):
    """Make ``module.add_fused_lm_head`` (the name TRL's trainer calls in its ``__init__``) ours."""
    saved = module.add_fused_lm_head
    module.add_fused_lm_head = functools.partial(add_fused_lm_head, **options)
    try:
        yield
    finally:
        module.add_fused_lm_head = saved


def _unwrap(trainer, model):
    m = trainer.accelerator.unwrap_model(model)
    return m.get_base_model() if isinstance(m, PeftModel) else m


# DPOConfig fields that are hyperparameters of our registry's losses, with TRL's defaults
_CONFIG_HPARAMS = {"beta": None, "label_smoothing": 0.0, "f_divergence_type": "reverse_kl",
                   "f_alpha_divergence_coef": 0.5, "discopop_tau": 0.05}


def _registry_loss(args, loss_kwargs: Dict, backend, transform) -> FusedLinearPreferenceLoss:
    """The module computing ``args.loss_type`` from our registry; config options no chosen loss takes
    are refused when set to a non-default value (they would otherwise be silently ignored)."""
    names = list(args.loss_type)
    unknown = [n for n in names if n not in LOSSES]
    if unknown:
        raise ValueError(f"loss_type {unknown} is neither a TRL DPO loss type nor in expo_kernels.LOSSES "
                         f"({sorted(LOSSES)}).")
    if any(not LOSSES[n].paired for n in names):
        raise ValueError(f"loss_type {names} includes an unpaired loss; use FusedKTOTrainer for KTO-style data.")
    accepted = {k for n in names for k in list(LOSSES[n].hparams) + list(LOSSES[n].aliases)}
    hparams = {}
    for key, default in _CONFIG_HPARAMS.items():
        value = getattr(args, key)
        if key in accepted or key.startswith("f_"):
            hparams[key] = value
        elif default is not None and value != default:
            raise ValueError(f"DPOConfig.{key}={value!r} is not used by loss_type {names}; unset it.")
    overlap = set(hparams) & set(loss_kwargs)
    if overlap:
        raise ValueError(f"{sorted(overlap)} are DPOConfig fields; set them there, not in `loss_kwargs`.")
    return FusedLinearPreferenceLoss(
        names if len(names) > 1 else names[0], loss_weights=args.loss_weights, ld_alpha=args.ld_alpha,
        use_weighting=args.use_weighting, backend=backend, **transform, **hparams, **loss_kwargs,
    )


class _FusedDPOMixin:
    """Our head in TRL's DPO code paths; losses TRL lacks through :class:`FusedLinearPreferenceLoss`."""

    def _expo_setup(self, loss_kwargs: Optional[Dict], backend: Optional[str], registry_loss: Optional[bool]) -> None:
        self._expo_backend = backend
        loss_kwargs = dict(loss_kwargs or {})
        self._expo_loss = None
        if registry_loss is None:
            registry_loss = bool(loss_kwargs) or not set(self.args.loss_type) <= TRL_DPO_LOSS_TYPES
        if not registry_loss:
            if loss_kwargs:
                raise ValueError("`loss_kwargs` configure expo_kernels' losses; they need registry_loss=True (or None).")
            return  # TRL's own loss code, on our head
        policy = _unwrap(self, self.model)
        transform = policy._expo_kernels_fused_head["transform"]
        if self.ref_model is not None:
            ref_t = self.accelerator.unwrap_model(self.ref_model)._expo_kernels_fused_head["transform"]
            if ref_t != transform:
                raise ValueError(f"The reference model's logit transform {ref_t} differs from the policy's {transform}.")
        self._expo_loss = _registry_loss(self.args, loss_kwargs, backend, transform)
        if self._expo_loss.token_kl and self.precompute_ref_logps:
            raise ValueError("loss 'expo' with kl_estimator='token' needs the reference model's hidden states at every "
                             "step; it cannot use precompute_ref_log_probs=True.")
        if self.aux_loss_enabled:
            raise ValueError("MoE router auxiliary losses are not supported with expo_kernels' losses.")

    def _reference_hidden(self, ref_model_kwargs, labels):
        """Reference hidden states (no grad) and its head (None = the policy's head, PEFT adapters off)."""
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if self.ref_model is None:
                unwrapped = self.accelerator.unwrap_model(self.model)
                ctx = contextlib.nullcontext()
                if isinstance(unwrapped, PeftModel):
                    ctx = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
                else:
                    raise ValueError("No reference model: pass `ref_model`, train a PEFT adapter, or precompute the "
                                     "reference log-probs.")
                with ctx:
                    out = self.model(**ref_model_kwargs, labels=labels, fused_lm_head="hidden")
                return out.hidden_states, None, None
            out = self.ref_model(**ref_model_kwargs, labels=labels, fused_lm_head="hidden")
            w, b = lm_head_parameters(self.accelerator.unwrap_model(self.ref_model))
            return out.hidden_states, _gathered(w), _gathered(b)  # no gradient: a full copy is enough

    def _compute_loss(self, model, inputs, return_outputs):
        if self._expo_loss is None:
            return super()._compute_loss(model, inputs, return_outputs)
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
            ref_hidden = ref_hidden[:, -seq_len:]
            if ref_w is not None:
                ref_hidden, ref_w, ref_b = _head_operands(ref_hidden, ref_w, ref_b)
            ref = dict(ref_hidden=ref_hidden, ref_weight=ref_w, ref_bias=ref_b)

        def loss(weight, bias, hidden, labels, **ref):
            hidden, weight, bias = _head_operands(hidden, weight, bias)
            if ref.get("ref_hidden") is not None and ref.get("ref_weight") is None:  # shared head
                ref["ref_hidden"] = ref["ref_hidden"].to(weight.dtype)
            return self._expo_loss(weight, hidden, labels, bias=bias, **ref)

        result = call_with_lm_head(_unwrap(self, self.model).get_output_embeddings(), loss, hidden, shifted, **ref)
        self._log_expo_metrics(mode, inputs, result.metrics)
        if return_outputs:
            with torch.no_grad():
                return result.loss, model(**model_kwargs)
        return result.loss

    def _log_expo_metrics(self, mode: str, inputs, metrics: Dict[str, Tensor]) -> None:
        if mode == "train":
            n = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += n // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        for k, v in metrics.items():
            self._metrics[mode][k].append(self.accelerator.gather_for_metrics(v.reshape(1).float()).mean().item())


class FusedDPOTrainer(_FusedDPOMixin, _trl_dpo.DPOTrainer):
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

    def __init__(self, *args, loss_kwargs: Optional[Dict[str, Any]] = None, backend: Optional[str] = None,
                 logit_transform: Optional[Dict] = None, registry_loss: Optional[bool] = None, **kwargs):
        _check_options(backend, logit_transform, loss_kwargs, registry_loss)
        with _trl_head_replaced(_trl_dpo, backend=backend, logit_transform_override=logit_transform):
            super().__init__(*args, **kwargs)
        self._expo_setup(loss_kwargs, backend, registry_loss)


class FusedKTOTrainer(_trl_kto.KTOTrainer):
    """``trl.KTOTrainer`` whose LM head (policy, reference and KL-baseline passes) runs through expo_kernels."""

    def __init__(self, *args, backend: Optional[str] = None, logit_transform: Optional[Dict] = None, **kwargs):
        _check_options(backend, logit_transform)
        with _trl_head_replaced(_trl_kto, backend=backend, logit_transform_override=logit_transform):
            super().__init__(*args, **kwargs)


def enable_fused_lm_head(trainer, *, loss_kwargs: Optional[Dict[str, Any]] = None, backend: Optional[str] = None,
                         logit_transform: Optional[Dict] = None, registry_loss: Optional[bool] = None):
    """Switch an already-built ``DPOTrainer`` or ``KTOTrainer`` to expo_kernels' head (and, for DPO,
    to our registry's losses when ``loss_type`` or ``loss_kwargs`` ask for them). Reference log-probs
    precomputed before the switch are kept. Returns the trainer."""
    dpo, kto = _trl_dpo.DPOTrainer, _trl_kto.KTOTrainer
    if not isinstance(trainer, (dpo, kto)):
        raise TypeError(f"enable_fused_lm_head expects a trl DPOTrainer or KTOTrainer, got {type(trainer).__name__}.")
    _check_options(backend, logit_transform, loss_kwargs, registry_loss)  # before anything is patched
    if isinstance(trainer, kto) and loss_kwargs:
        raise ValueError("`loss_kwargs` applies to DPOTrainer losses only.")
    outputs = ("log_probs", "entropy", "mean_logits", "is_top1")
    if isinstance(trainer, dpo) and trainer.use_weighting:
        outputs += ("log_sum_sq_probs",)
    opts = dict(backend=backend, logit_transform_override=logit_transform)
    add_fused_lm_head(_unwrap(trainer, trainer.model), outputs=outputs, **opts)
    if trainer.ref_model is not None:
        add_fused_lm_head(trainer.accelerator.unwrap_model(trainer.ref_model), **opts)
    if isinstance(trainer, dpo) and not isinstance(trainer, _FusedDPOMixin):
        trainer.__class__ = type(f"Fused{type(trainer).__name__}", (_FusedDPOMixin, type(trainer)), {})
        trainer._expo_setup(loss_kwargs, backend, registry_loss)
    return trainer


# -------------------------------------------------------------------------------------------------
# CPO (and SimPO / AlphaPO through it) and ORPO: TRL computes these from full logits in
# ``concatenated_forward``; ours returns the same numbers from hidden states.
# -------------------------------------------------------------------------------------------------
def _mean_logit(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], transform: Dict) -> Tensor:
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


class _FusedConcatenatedForward:
    """``concatenated_forward`` of TRL's CPO/ORPO trainers on expo_kernels' head.

    Returns what TRL's returns — ``(chosen_logps, rejected_logps, chosen_logits, rejected_logits,
    nll_loss)`` — except that the two "logits" are 0-d tensors holding their mean (the only use TRL
    makes of them, for the ``logits/*`` metrics), so no logits exist.
    """

    _nll_over_prompt = False  # ORPO: the chosen NLL covers prompt and completion tokens

    def _expo_setup_head(self, backend, logit_transform) -> None:
        if self.is_encoder_decoder:
            raise ValueError("expo_kernels' fused head supports decoder-only models, not encoder-decoder ones.")
        if self.aux_loss_enabled:
            raise ValueError("MoE router auxiliary losses are not supported by expo_kernels' fused head.")
        add_fused_lm_head(_unwrap(self, self.model), backend=backend, logit_transform_override=logit_transform)
        self._expo_backend = backend

    def _average_logps(self) -> bool:
        return True

    def _nll_weight(self) -> float:
        return 1.0

    def concatenated_forward(self, model, batch):
        cb = self.concatenated_inputs(batch, is_encoder_decoder=False, padding_value=self._expo_pad_value(),
                                      device=self.accelerator.device)
        len_chosen = batch["chosen_labels"].shape[0]
        ids, attn = cb["concatenated_input_ids"], cb["concatenated_attention_mask"]
        completion = cb["concatenated_labels"]
        # one pass scores every token the loss reads: the completion, plus the prompt for ORPO's NLL
        labels = torch.where(attn == 1, ids, -100) if self._nll_over_prompt else completion
        out = model(ids, attention_mask=attn, use_cache=False, labels=labels, fused_lm_head="hidden")
        policy = _unwrap(self, self.model)
        transform = policy._expo_kernels_fused_head["transform"]

        def project(weight, bias, hidden, labels):
            hidden, weight, bias = _head_operands(hidden, weight, bias)
            return linear_logprobs(hidden, weight, labels, bias, backend=self._expo_backend, **transform)

        head = policy.get_output_embeddings()
        logp = call_with_lm_head(head, project, out.hidden_states, out.labels)
        comp_mask = completion[:, 1:].to(logp.device) != -100
        seq = torch.where(comp_mask, logp, torch.zeros_like(logp)).sum(-1)
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
        with torch.no_grad():
            weight, bias = (_gathered(t) for t in lm_head_parameters(policy))
            pos, weight, bias = _head_operands(pos.detach(), weight, bias)
            mean_c = _mean_logit(pos[:len_chosen], weight, bias, transform)
            mean_r = _mean_logit(pos[len_chosen:], weight, bias, transform)
        return seq[:len_chosen], seq[len_chosen:], mean_c, mean_r, nll


if _TRLCPOTrainer is not None:

    class FusedCPOTrainer(_FusedConcatenatedForward, _TRLCPOTrainer):
        """``trl.experimental.cpo.CPOTrainer`` (CPO, SimPO, AlphaPO, ...) on expo_kernels' head: same
        arguments, losses and metrics, no logits."""

        def __init__(self, *args, backend: Optional[str] = None, logit_transform: Optional[Dict] = None, **kwargs):
            _check_options(backend, logit_transform)
            super().__init__(*args, **kwargs)
            self._expo_setup_head(backend, logit_transform)

        def _expo_pad_value(self):
            return self.pad_token_id

        def _average_logps(self) -> bool:
            return self.loss_type in ("ipo", "simpo")

        def _nll_weight(self) -> float:
            return self.cpo_alpha

    class FusedORPOTrainer(_FusedConcatenatedForward, _TRLORPOTrainer):
        """``trl.experimental.orpo.ORPOTrainer`` on expo_kernels' head: same arguments, loss and metrics."""

        _nll_over_prompt = True

        def __init__(self, *args, backend: Optional[str] = None, logit_transform: Optional[Dict] = None, **kwargs):
            _check_options(backend, logit_transform)
            super().__init__(*args, **kwargs)
            self._expo_setup_head(backend, logit_transform)

        def _expo_pad_value(self):
            return self.padding_value

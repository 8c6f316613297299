"""Our LM head as a drop-in for TRL's fused head (``trl.trainer.utils.add_fused_lm_head``).

TRL (>= 1.16) computes per-token log-probs through a patched ``model.forward``: called with
``fused_lm_head=True`` it runs the backbone and a chunked LM head, and returns a
``FusedCausalLMOutput`` (log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1).
:func:`add_fused_lm_head` patches the same way with :func:`expo_kernels.linear_logprobs` as the head.
Also here: the head's operands as a trainer's loss uses them (:func:`call_with_lm_head`,
:func:`head_operands`, :func:`gathered`) and the check of the head's options.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor

from ..._validation import check_backend_name
from ...distributed.fsdp import fsdp_lm_head_call, is_fsdp2
from ...distributed.zero3 import any_zero3_partitioned, zero3_gathered
from ...functional import TokenStats, head_autocast, linear_logprobs
from ..hf import backbone, check_no_router_aux_loss, logit_transform
from ._trl_compat import FUSED_OUTPUT_STATS, FusedCausalLMOutput

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = [
    "add_fused_lm_head",
    "call_with_lm_head",
    "head_operands",
    "gathered",
    "fused_head_options",
    "check_head_options",
    "OUTPUT_NAMES",
]

#: the fields ``add_fused_lm_head(outputs=...)`` may ask for
OUTPUT_NAMES = ("log_probs",) + FUSED_OUTPUT_STATS


def gathered(t: Tensor | None) -> Tensor | None:
    """A DTensor (FSDP2 parameter) as its full tensor; anything else as it is (a ZeRO-3 parameter
    too: gather it for the call with :func:`expo_kernels.distributed.zero3_gathered`). The op needs
    the whole head for the call (as TRL does)."""
    if t is not None and type(t).__name__ == "DTensor":
        return cast("DTensor", t).full_tensor()
    return t


def call_with_lm_head(head: torch.nn.Module, fn, *args, **kwargs):
    """``fn(weight, bias, *args, **kwargs)`` with the head's whole weight and bias.

    An FSDP2 head (``fully_shard(lm_head)``) runs ``fn`` as its own forward
    (:func:`expo_kernels.distributed.fsdp_lm_head_call`), so FSDP gathers the weight for the call
    and reduce-scatters its gradient; reading ``lm_head.weight`` directly would bypass those hooks.
    A DeepSpeed ZeRO-3 head (partitioned parameters) is gathered once for the call and partitioned
    after it; its gradient goes to DeepSpeed's reduce-scatter (:func:`expo_kernels.distributed.zero3_gathered`).
    Otherwise the parameters are used as they are (inside an enclosing FSDP2 forward they are
    already gathered), a sharded DTensor outside any forward as its full tensor (as TRL does).
    """
    if is_fsdp2(head):
        return fsdp_lm_head_call(head, lambda w, *a, **k: fn(w, getattr(head, "bias", None), *a, **k), *args, **kwargs)
    # nn.Module types a submodule's attribute as Tensor | Module; an LM head's weight is a parameter
    weight, bias = cast(Tensor, head.weight), getattr(head, "bias", None)
    if any_zero3_partitioned(weight, bias):  # DeepSpeed ZeRO-3: gathered for this call only
        with zero3_gathered(weight, bias) as (full_weight, full_bias):
            return fn(full_weight, full_bias, *args, **kwargs)
    return fn(gathered(weight), gathered(bias), *args, **kwargs)


def head_operands(hidden: Tensor, weight: Tensor, bias: Tensor | None):
    """Operands in the dtype ``F.linear`` would use: under autocast the autocast dtype (as TRL's
    chunked head, whose matmul runs under autocast), otherwise the head's own dtype. The head's
    tensors come whole (``call_with_lm_head``)."""
    ac = head_autocast(hidden)  # the library's own autocast cast (docs/design.md, "Mixed precision")
    if ac.dtype is not None:
        return ac.cast(hidden), ac.cast(weight), ac.cast(bias)
    return hidden.to(weight.dtype), weight, bias


def fused_head_options(model) -> dict:
    """``{"transform": ..., "backend": ...}`` of a model patched by :func:`add_fused_lm_head`."""
    return model._expo_kernels_fused_head


def check_head_options(backend=None, logit_transform=None) -> None:
    """The head options of our trainers (``backend``, ``logit_transform``), checked before TRL's
    ``__init__`` (model copies, dataset processing, reference precompute) so a typo fails at once,
    naming the argument."""
    check_backend_name(backend)
    if logit_transform is not None and not isinstance(logit_transform, dict):
        raise TypeError(
            f"logit_transform must be None or a dict, got {type(logit_transform).__name__} {logit_transform!r}"
        )


class FusedHiddenOutput:
    """What ``fused_lm_head="hidden"`` returns: the shifted final hidden states, their labels and the
    unshifted ones. A plain class, as torch.compile traces its construction (a ``types.SimpleNamespace``
    breaks the graph at the forward's return); not a pytree node, so FSDP / DeepSpeed output hooks see
    it as before."""

    def __init__(self, hidden_states: Tensor, labels: Tensor, last_hidden_state: Tensor) -> None:
        self.hidden_states = hidden_states  # [B, T-1, H]
        self.labels = labels  # [B, T-1]
        self.last_hidden_state = last_hidden_state  # [B, T, H]


def add_fused_lm_head(
    model,
    temperature: float = 1.0,
    cast_lm_head_to_fp32: bool = False,
    outputs: Sequence[str] = ("log_probs",),
    *,
    backend: str | None = None,
    logit_transform_override: dict | None = None,
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
    unknown = set(outputs) - set(OUTPUT_NAMES)
    if unknown:
        raise ValueError(f"`outputs` may contain {list(OUTPUT_NAMES)}; got unknown {sorted(unknown)}.")
    transform = logit_transform(model, temperature=temperature, override=logit_transform_override)
    check_no_router_aux_loss(model)
    with_stats = any(o in outputs for o in FUSED_OUTPUT_STATS)
    original_forward = model.forward

    @functools.wraps(type(model).forward)
    def _fused_forward(
        self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs
    ):
        if not fused_lm_head:
            for k, v in (
                ("labels", labels),
                ("shift_labels", shift_labels),
                ("num_items_in_batch", num_items_in_batch),
            ):
                if v is not None:
                    kwargs[k] = v
            return original_forward(*args, **kwargs)
        if kwargs.get("output_router_logits"):
            raise ValueError(
                "expo_kernels' fused LM head does not compute MoE router losses (output_router_logits=True)."
            )
        kwargs["use_cache"] = False
        hidden = full = backbone(self)(*args, **kwargs).last_hidden_state
        if shift_labels is None:  # position t predicts token t+1
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        head = self.get_output_embeddings()
        hidden, labels = hidden.to(head.weight.device), labels.to(head.weight.device)
        if fused_lm_head == "hidden":
            return FusedHiddenOutput(hidden_states=hidden, labels=labels, last_hidden_state=full)

        def project(weight, bias, hidden, labels):
            if cast_lm_head_to_fp32:
                hidden, weight, bias = hidden.float(), weight.float(), None if bias is None else bias.float()
            else:
                hidden, weight, bias = head_operands(hidden, weight, bias)
            res = linear_logprobs(hidden, weight, labels, bias, return_stats=with_stats, backend=backend, **transform)
            return tuple(res[:1]) + tuple(res[1]) if with_stats else (res,)  # flat: FSDP hooks every tensor

        res = call_with_lm_head(head, project, hidden, labels)
        logp = res[0]
        mask = labels != -100
        fields = dict.fromkeys(FUSED_OUTPUT_STATS)
        if with_stats:
            stats = TokenStats(*res[1:])
            avail = {
                "entropy": stats.entropy,
                "log_sum_sq_probs": stats.log_sum_p2,
                "mean_logits": stats.mean_logit,
                "is_top1": stats.is_top1,
            }
            fields.update({k: avail[k] for k in FUSED_OUTPUT_STATS if k in outputs})
        denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-logp.sum() / denom, log_probs=logp, label_mask=mask, **fields)

    model.forward = types.MethodType(_fused_forward, model)
    model._expo_kernels_fused_head = dict(transform=transform, backend=backend)

"""Hugging Face causal LMs: the backbone's hidden states, the LM head, and the logit transform.

The fused op needs three things a ``*ForCausalLM`` keeps inside its ``forward``:

* the final hidden states (after the final norm), without running the LM head: ``model.base_model``
  (the decoder stack, e.g. ``LlamaForCausalLM.model``) returns them as ``last_hidden_state``;
* the LM head's weight and bias: ``model.get_output_embeddings()`` (with tied embeddings this is the
  embedding matrix itself, so gradients reach it through either use);
* what the model does to ``lm_head(hidden)`` before the softmax. Families differ here (Gemma 2/3 softcap
  the logits, Cohere multiplies them, Granite divides them), and a wrong guess gives different numbers
  silently, so the transform comes from a table of known families and any other model type is refused
  unless the caller states its transform.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["logit_transform", "lm_head_parameters", "backbone", "SUPPORTED_MODEL_TYPES", "UnknownLogitTransform"]


class UnknownLogitTransform(ValueError):
    """The model's output transform is not known to expo_kernels."""


def _plain(cfg) -> dict:
    return {}


def _softcap(cfg) -> dict:
    # Gemma 2/3: logits = c * tanh(logits / c) with c = final_logit_softcapping (None: off)
    return {"softcap": getattr(cfg, "final_logit_softcapping", None)}


def _multiply(attr: str):
    def read(cfg) -> dict:
        return {"logit_scale": float(getattr(cfg, attr))}

    return read


def _divide(attr: str):
    def read(cfg) -> dict:
        return {"logit_scale": 1.0 / float(getattr(cfg, attr))}

    return read


# model_type -> reader of the transform from the (text) config. Each entry was checked against the
# family's modeling_*.py in transformers 5.x: what happens between `lm_head(hidden_states)` and the loss.
_TRANSFORMS: dict[str, Callable[[Any], dict]] = {
    **{
        t: _plain
        for t in (
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen2_moe",
            "qwen3",
            "qwen3_moe",
            "gemma",
            "phi",
            "phi3",
            "olmo",
            "olmo2",
            "gpt2",
            "gpt_neox",
            "starcoder2",
            "smollm3",
            "stablelm",
            "opt",
        )
    },
    "gemma2": _softcap,
    "gemma3": _softcap,
    "gemma3_text": _softcap,
    "cohere": _multiply("logit_scale"),
    "cohere2": _multiply("logit_scale"),
    "falcon_h1": _multiply("lm_head_multiplier"),
    "granite": _divide("logits_scaling"),
    "granitemoe": _divide("logits_scaling"),
    "minicpm3": _divide("logits_scaling"),  # divides the hidden states: the same for a bias-free head
}
SUPPORTED_MODEL_TYPES = tuple(sorted(_TRANSFORMS))


def _text_config(model_or_config):
    cfg = getattr(model_or_config, "config", model_or_config)
    get = getattr(cfg, "get_text_config", None)
    return get() if callable(get) else cfg


def logit_transform(model_or_config, *, temperature: float = 1.0, override: dict | None = None) -> dict:
    """``dict(temperature=, logit_scale=, softcap=)`` for :func:`expo_kernels.linear_logprobs`.

    ``override`` states the transform of a model type not in :data:`SUPPORTED_MODEL_TYPES` (keys
    ``logit_scale``, ``softcap``; ``{}`` for a plain ``lm_head(hidden)``); without it such a model
    raises :class:`UnknownLogitTransform`.
    """
    cfg = _text_config(model_or_config)
    if override is not None:
        bad = set(override) - {"logit_scale", "softcap"}
        if bad:
            raise ValueError(f"`logit_transform` may only set 'logit_scale' and 'softcap'; got {sorted(bad)}.")
        found = dict(override)
    else:
        model_type = getattr(cfg, "model_type", None)
        reader = _TRANSFORMS.get(model_type) if isinstance(model_type, str) else None
        if reader is None:
            raise UnknownLogitTransform(
                f"expo_kernels does not know what model_type={model_type!r} does to its LM-head output "
                f"(softcapping, scaling, ...), and computing log-probs without it would give different numbers. "
                f"Known: {list(SUPPORTED_MODEL_TYPES)}. If its logits are plain `lm_head(hidden)` (or you know the "
                "transform), pass logit_transform={} (or {'logit_scale': s, 'softcap': c})."
            )
        found = reader(cfg)
    return {"temperature": float(temperature), "logit_scale": found.get("logit_scale"), "softcap": found.get("softcap")}


def lm_head_parameters(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    """``(weight [V, H], bias [V] | None)`` of the output layer, read at call time (PEFT and FSDP
    replace modules after construction)."""
    get_head = getattr(model, "get_output_embeddings", None)  # a transformers model's method
    head = get_head() if callable(get_head) else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"{type(model).__name__} has no output embedding (LM head) with a `weight`.")
    return head.weight, getattr(head, "bias", None)


def backbone(model: nn.Module) -> nn.Module:
    """The decoder stack that returns ``last_hidden_state`` (``model.base_model``)."""
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        raise ValueError(
            f"{type(model).__name__} exposes no separate backbone (`base_model`): expected a *ForCausalLM model."
        )
    return base


def check_no_router_aux_loss(model: nn.Module) -> None:
    """MoE load-balancing losses are not produced by the fused forward; refuse instead of dropping them."""
    if getattr(_text_config(model), "output_router_logits", False):
        raise ValueError(
            "The model's config sets output_router_logits=True (MoE load-balancing loss), which the expo_kernels "
            "fused LM head does not compute yet; set config.output_router_logits=False or use TRL's own head."
        )

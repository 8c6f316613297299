"""FSDP2 (``fully_shard``) LM heads: run a fused loss as the head's forward.

:func:`fsdp_lm_head_call` runs a fused loss as the forward of an ``fully_shard``-ed LM head, so FSDP2
all-gathers the weight for the call, re-gathers it for backward and reduce-scatters its gradient.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["fsdp_lm_head_call", "is_fsdp2"]


def is_fsdp2(module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return isinstance(module, FSDPModule)


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, DTensor)


def _own_storage(t):
    # FSDP2 hooks the outputs for backward; an in-place op on an output that is a view would drop
    # that hook (FSDP2 warns), so differentiable views are returned as copies (O(output size)).
    if isinstance(t, Tensor) and t.requires_grad and t._is_view():
        return t.clone()
    return t


def _to_pytree(out):
    """FSDP2 finds the tensors that need its pre-backward hook by flattening the forward's output
    with torch's pytree; a dataclass is a leaf there, so pass it as a dict and rebuild it after."""
    from torch.utils._pytree import tree_map

    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        fields = {f.name: tree_map(_own_storage, getattr(out, f.name)) for f in dataclasses.fields(out)}
        return ("__dataclass__", type(out), fields)
    return tree_map(_own_storage, out)


def _from_pytree(out):
    if isinstance(out, tuple) and len(out) == 3 and out[0] == "__dataclass__":
        return out[1](**out[2])
    return out


def fsdp_lm_head_call(lm_head: torch.nn.Module, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn(lm_head.weight, *args, **kwargs)`` so that it sees the full, gathered LM-head weight
    and its weight gradient goes through FSDP's own reduce-scatter.

    Use it for any fused loss that takes the head's weight instead of calling the head, e.g.::

        fully_shard(model.lm_head)              # the head in its own FSDP2 group (before the root)
        fully_shard(model)
        hidden = model(...)                     # backbone forward: hidden states, no logits
        out = fsdp_lm_head_call(model.lm_head, loss_fn, hidden, labels, ref_hidden=ref_hidden)
        out.loss.backward()                     # loss_fn = ek.FusedLinearPreferenceLoss(...)

    Why: under FSDP2 (``torch.distributed.fsdp.fully_shard``) ``lm_head.weight`` is a sharded
    ``DTensor`` except inside the module's forward. Reading it directly (as some trainers did) bypasses
    the all-gather hooks: the loss either fails on the DTensor or silently uses the local shard, and
    the gradient never reaches FSDP's reduce-scatter. This helper runs ``fn`` *as* ``lm_head``'s
    forward (temporarily replacing ``lm_head.forward`` for one call of ``lm_head(...)``), so FSDP2's
    pre-forward hook all-gathers the weight, the post-forward hook reshards it and registers the
    backward hooks on the outputs (re-gather before backward, reduce-scatter after), exactly as for
    an ordinary ``nn.Linear`` call. ``fn`` may return a tensor, a tuple/dict of tensors or a dataclass
    such as :class:`~expo_kernels.PreferenceLossOutput` (passed to FSDP as a dict, rebuilt after).

    ``lm_head`` may also be a plain module (no FSDP): then this is just ``fn(lm_head.weight, ...)``.
    If the head is not ``fully_shard``-ed itself but its weight is managed by an enclosing FSDP2
    module, call this from inside that module's forward (the weight is then already gathered);
    called outside it, it raises ``RuntimeError`` instead of computing with a shard. A head whose
    weight is tied to the input embedding must share the embedding's FSDP group: shard the module
    that holds both, and compute the loss inside its forward.

    Pass the bias yourself if the head has one (``bias=lm_head.bias`` reads the gathered bias only
    inside ``fn``; use ``lambda w, *a, **k: loss_fn(w, *a, bias=lm_head.bias, **k)``).
    DeepSpeed ZeRO-3 heads need no helper: pass the partitioned parameters to the loss directly
    (:mod:`expo_kernels.distributed.zero3` gathers them for the call).
    """
    if not is_fsdp2(lm_head):
        if _is_dtensor(lm_head.weight):
            raise RuntimeError(
                "fsdp_lm_head_call: lm_head.weight is a sharded DTensor but lm_head is not an FSDP2 module itself; "
                "call fully_shard(lm_head) before sharding its parent, or compute the fused loss inside the "
                "forward of the FSDP module that owns the head (where the weight is gathered)"
            )
        return fn(lm_head.weight, *args, **kwargs)

    original = lm_head.__dict__.get("forward")

    def forward(*a, **k):
        return _to_pytree(fn(lm_head.weight, *a, **k))

    lm_head.forward = forward
    try:
        # the arguments go through the module call: FSDP2 hooks its post-backward (reduce-scatter) on
        # the inputs that require grad, and casts them under a MixedPrecisionPolicy.
        out = lm_head(*args, **kwargs)
    finally:
        if original is None:
            del lm_head.forward
        else:
            lm_head.forward = original
    return _from_pytree(out)

"""Context (sequence) parallelism for the preference modules: the collectives of
``FusedLinearPreferenceLoss(..., sequence_group=group)`` and of the unpaired module.

Each rank of ``group`` holds a contiguous slice of every sequence (ring attention, Ulysses): hidden
states ``[R, T_r, H]`` and labels ``[R, T_r]`` sharded along the sequence dimension, the same ``R`` rows
in the same order on every rank (``T_r`` may differ, a rank may hold no counted token of a row). The
per-token work (log-probs, statistics, the engine's chunks) stays local; only ``O(R)`` numbers cross the
wire:

* :func:`check_sequence_shards`: one all-gather of each rank's shapes (8 ints) before anything else, so
  that shards that do not line up (different batch sizes, labels that do not match the hidden states,
  different hidden sizes) raise the same ``ValueError`` on every rank instead of a hang or a wrong loss.
* :func:`sum_across_ranks`: one SUM all-reduce of the per-sequence numbers (the float64 sums, the
  token counts, the NLL numerator, ...) packed in one float64 vector. Differentiable with an IDENTITY
  backward: every rank computes the same loss ``L(S)`` of the global sums ``S = sum_r S_r``, and
  ``dS / dS_r = 1``; the backward runs no collective (the loss must not be counted ``world_size``
  times, as ``torch.distributed.nn.functional.all_reduce``'s all-reducing backward would do). Each rank
  then gets the exact gradient of ``L`` w.r.t. its own hidden slice, and its own tokens' share of the
  head's gradient: the head's (and every other replicated parameter's) gradient must be SUM-reduced over
  the sequence group by the caller.
* :func:`masked_means_across_ranks`: the token-mean metrics (entropy, mean logits, accuracy), one SUM
  all-reduce of their numerators and counts.
* :func:`max_across_ranks`: the pair engine's chunk plan, from the per-pair MAX of the counted tokens,
  so that every rank runs the same chunks (whole pairs) and their loss callbacks' all-reduces pair up.

Every rank must call the module with the same options and reference inputs of the same kind; the
collectives run in the same order on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "check_sequence_shards",
    "sum_across_ranks",
    "masked_means_across_ranks",
    "max_across_ranks",
]


def _wire_device(like: Any) -> torch.device:
    return like.device if isinstance(like, Tensor) else torch.device("cpu")


def _shape(x: Any, dims: int) -> list[int]:
    """``[ndim, size_0 .. size_{dims-1}]`` (-1 for what is missing) of a tensor; ``[-1, ...]`` otherwise."""
    if not isinstance(x, Tensor):
        return [-1] * (dims + 1)
    sizes = list(x.shape[:dims])
    return [x.dim(), *sizes, *([-1] * (dims - len(sizes)))]


def check_sequence_shards(
    group: Any, hidden: Any, labels: Any, *, paired: bool, flag: bool = True, name: str = "hidden"
) -> bool:
    """Checks that the ranks' sequence shards line up (one all-gather of 8 ints per rank) and raises the
    same ``ValueError`` on every rank when they do not: each rank's ``labels`` ``[R, T_r]`` and ``hidden``
    ``[R, T_r, H]`` must match, and ``R`` (even when ``paired``) and ``H`` must be the same on every rank.
    Returns whether ``flag`` is True on every rank (the module's choice of path, agreed)."""
    device = _wire_device(hidden if isinstance(hidden, Tensor) else labels)
    mine = torch.tensor([*_shape(labels, 2), *_shape(hidden, 3), int(bool(flag))], dtype=torch.long, device=device)
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    rows = torch.stack(gathered).cpu().tolist()
    for r, (ld, lr, lt, hd, hr, ht, hh, _) in enumerate(rows):
        if ld != 2 or hd != 3 or (lr, lt) != (hr, ht):
            lab = (
                "not a tensor" if ld < 0 else f"{ld}-D labels [{lr}, {lt}, ...]" if ld != 2 else f"labels [{lr}, {lt}]"
            )
            hid = "not a tensor" if hd < 0 else f"{hd}-D" if hd != 3 else f"[{hr}, {ht}, {hh}]"
            raise ValueError(
                f"sequence_group: rank {r}'s shard does not line up: `labels` must be [R, T_r] and `{name}` "
                f"[R, T_r, H] over the same tokens; got {lab}, `{name}` {hid}."
            )
    batch = [row[1] for row in rows]
    if len(set(batch)) != 1:
        raise ValueError(
            "sequence_group: every rank must hold a slice of the same R sequences (the batch size differs "
            f"across the ranks: {batch} rows); shard the sequence dimension only."
        )
    if paired and batch[0] % 2:
        raise ValueError(f"a paired batch has 2B rows (B chosen, then B rejected); the shards have {batch[0]} rows.")
    sizes = [row[6] for row in rows]
    if len(set(sizes)) != 1:
        raise ValueError(f"sequence_group: the hidden size differs across the ranks: {sizes}.")
    return all(row[7] for row in rows)


class _SumAcrossRanks(torch.autograd.Function):
    """SUM all-reduce whose backward is the identity (d global / d local = 1; no collective)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        out = x.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def _wide(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def sum_across_ranks(values: Sequence[Tensor | None], group: Any) -> list[Tensor | None]:
    """The SUM over the ranks of ``group`` of each tensor (None stays None), in one all-reduce of a
    float64 vector (integer counts travel exactly as floats and come back in their dtype).
    Differentiable, with the identity as backward: see the module docstring."""
    present = [v for v in values if v is not None]
    if not present:
        return list(values)
    device = present[0].device
    wide = _wide(device)
    flat = torch.cat([v.to(wide).reshape(-1) for v in present])
    total = _SumAcrossRanks.apply(flat, group)
    out: list[Tensor | None] = []
    start = 0
    for v in values:
        if v is None:
            out.append(None)
            continue
        part = total[start : start + v.numel()].view(v.shape)
        start += v.numel()
        out.append(part.to(v.dtype) if v.dtype != wide else part)
    return out


def masked_means_across_ranks(pairs: Sequence[tuple[Tensor, Tensor]], group: Any) -> list[Tensor]:
    """Token means over the whole sequences: for each ``(values, mask)``, the SUM over the ranks of the
    masked sum divided by the SUM of the counts (0 when no rank counts a token), in ``values``' float
    dtype (float32 unless float64); one all-reduce, no gradient."""
    if not pairs:
        return []
    with torch.no_grad():
        device = pairs[0][0].device
        wide = _wide(device)
        parts = []
        for values, mask in pairs:
            v = values.to(wide)
            parts.append(torch.where(mask, v, torch.zeros_like(v)).sum().view(1))
            parts.append(mask.sum().to(wide).view(1))
        flat = torch.cat(parts)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        out = []
        for i, (values, _) in enumerate(pairs):
            dt = torch.float64 if values.dtype == torch.float64 else torch.float32
            out.append((flat[2 * i] / flat[2 * i + 1].clamp(min=1)).to(dt))
        return out


def max_across_ranks(counts: Sequence[int], group: Any, device: torch.device | str = "cpu") -> list[int]:
    """The element-wise MAX over the ranks of ``counts`` (host ints, the same length on every rank)."""
    t = torch.tensor(list(counts), dtype=torch.long, device=device)
    if t.numel():
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return [int(c) for c in t.cpu().tolist()]

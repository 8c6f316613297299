"""Shared by every backend: the logit transform, the per-token outputs, the public statistics, and the
one check for Triton's CPU interpreter."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor


def interpreting() -> bool:
    """Whether Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``), read at call time.

    The one place that reads the variable: it imports nothing from Triton, so CPU paths can ask
    without Triton installed. ``triton.jit`` reads the same variable once, when a kernel module is
    first imported: set it before that import (tests/conftest.py does) and leave it set."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class LogitTransform:
    """``z = softcap(raw * logit_scale) / temperature`` with ``softcap(x) = c * tanh(x / c)``.

    The order is the one Hugging Face models and TRL apply: the model multiplies by
    ``logit_scale`` (Cohere) or soft-caps (Gemma 2/3) inside its head, and the trainer divides
    by the sampling temperature afterwards.
    """

    logit_scale: float = 1.0
    softcap: float | None = None
    temperature: float = 1.0

    @property
    def inv_temperature(self) -> float:
        return 1.0 / self.temperature

    def apply(self, raw: torch.Tensor) -> torch.Tensor:
        z = raw * self.logit_scale if self.logit_scale != 1.0 else raw
        if self.softcap is not None:
            z = self.softcap * torch.tanh(z / self.softcap)
        return z * self.inv_temperature if self.temperature != 1.0 else z

    def apply_with_derivative(self, raw: torch.Tensor) -> tuple[torch.Tensor, float | torch.Tensor]:
        """Returns ``(z, dz/draw)``; the derivative is a python float when it is constant."""
        z = raw * self.logit_scale
        deriv: float | torch.Tensor = self.logit_scale * self.inv_temperature
        if self.softcap is not None:
            t = torch.tanh(z / self.softcap)
            z = self.softcap * t
            deriv = deriv * (1.0 - t * t)
        return z * self.inv_temperature, deriv


class TokenOutputs(NamedTuple):
    """Per-token ``[N]`` results of a backend's forward: float32 (float64 for float64 inputs).

    ``entropy`` .. ``log_sum_p2`` are None unless ``with_stats`` was asked for.
    """

    logp: torch.Tensor  # log p(label) = z_label - lse
    lse: torch.Tensor  # log sum_v exp(z_v)
    entropy: torch.Tensor | None = None  # sum_v p_v (lse - z_v), from max-shifted logits
    mean_logit: torch.Tensor | None = None  # sum_v z_v / V over finite z_v (masked -inf entries add 0)
    is_top1: torch.Tensor | None = None  # bool: label == argmax_v z_v (first maximum)
    log_sum_p2: torch.Tensor | None = None  # log sum_v p_v^2 = lse(2z) - 2 lse(z)
    # [N, k] the k largest z_v (value descending, lower id first on ties) and their int64 ids;
    # None unless a top-k was asked for (``ops.state``)
    topk_values: torch.Tensor | None = None
    topk_indices: torch.Tensor | None = None

    def stats(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(entropy, mean_logit, is_top1, log_sum_p2)`` of outputs computed ``with_stats``."""
        e, mean_logit, is_top1, p2 = self.entropy, self.mean_logit, self.is_top1, self.log_sum_p2
        # finalize_logprobs sets all four from a state with statistics, which with_stats guarantees
        assert e is not None and mean_logit is not None and is_top1 is not None and p2 is not None
        return e, mean_logit, is_top1, p2


class TokenStats(NamedTuple):
    """Per-token statistics of the head's distribution, shaped like ``labels``, without gradient.

    Zero (False) at ignored positions. With ``topk=k``: ``topk_values`` / ``topk_indices`` ``[..., k]``,
    the k largest transformed logits (value descending, the lower id first on ties) and their int64
    vocabulary ids; at ignored positions values 0 and ids -1. ``topk_values`` is the one
    differentiable field: it is re-evaluated from the selected weight rows (``topk_logits``).
    """

    lse: Tensor  # log sum_v exp(z_v)
    entropy: Tensor  # -sum_v p_v log p_v
    mean_logit: Tensor  # sum_v z_v / V over the finite z_v (a masked -inf entry adds 0)
    is_top1: Tensor  # bool: label == argmax_v z_v (first maximum on ties)
    log_sum_p2: Tensor  # log sum_v p_v^2 (WPO weighting)
    topk_values: Tensor | None = None  # [..., k] float32 (float64 for float64 inputs), differentiable
    topk_indices: Tensor | None = None  # [..., k] int64 vocabulary ids


def topk_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, ids: Tensor, transform: LogitTransform) -> Tensor:
    """Differentiable ``z[n, ids[n, j]] = T(hidden[n] . weight[ids[n, j]] + bias[ids[n, j]])``.

    hidden ``[N, H]``, weight ``[V, H]``, bias ``[V] | None``, ids ``[N, k]`` int64 (a row whose first
    id is negative is an ignored token: 0 there, with no gradient, whatever its hidden row holds) ->
    ``[N, k]`` float32 (float64 for float64 inputs). ``O(N k H)``: the kernels select the
    ids without materializing ``[N, V]``, and autograd through this gather gives the sparse update
    (only the selected weight/bias rows receive gradient).
    """
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    if ids.shape[1] == 0:
        return hidden.new_zeros(ids.shape, dtype=acc)
    # Masks, not a compaction: no data-dependent shape, so torch.compile traces it without a graph break.
    # An ignored row reads weight row 0 and a zeroed hidden row (whatever it held, no NaN reaches d_weight).
    counted = ids[:, :1] >= 0  # [N, 1]
    sel = ids.clamp(min=0)
    h = torch.where(counted, hidden, 0).to(acc)
    w = weight.index_select(0, sel.reshape(-1)).view(*sel.shape, weight.shape[1]).to(acc)
    raw = (w @ h[:, :, None]).squeeze(-1)  # [N, k]
    if bias is not None:
        raw = raw + bias.to(acc).index_select(0, sel.reshape(-1)).view(sel.shape)
    return torch.where(counted, transform.apply(raw), 0)

"""From per-token log-probs to the per-sequence numbers the losses take.

These reproduce what TRL 1.16's ``DPOTrainer._compute_loss`` does between the model's per-token
log-probs and its loss: plain sums over completion tokens, LD-DPO's ``ld_alpha`` down-weighting of the
tokens past the shorter response of each pair, the token-mean NLL of the chosen completions (its
``sft`` loss type) and WPO's per-pair weights. The fused module calls them on the per-token output of
the kernels (policy and reference alike).

Layout (TRL's): a paired batch has ``R = 2B`` rows, the ``B`` chosen sequences first, then the ``B``
rejected ones in the same order. ``per_token_logps`` is ``[R, T]``, aligned with the labels (position
``t`` holds ``log p(label_t)``), ``completion_mask`` ``[R, T]`` is 1 on completion tokens (the
label-aligned mask, i.e. TRL's ``completion_mask[:, 1:]``).

Precision: the per-sequence sums (and the chosen rows' NLL) accumulate in float64 and are returned in
float64, whatever the per-token dtype (float32 where the device has no float64, e.g. MPS). A long
sequence's sum is large (about -2.3e5 at 21,845 counted tokens of V = 32000), where the float32 spacing
is 1/64, and the losses take differences of four such sums to get a margin of order 1: rounded to
float32, that margin is off by about 1e-2; in float64 only the per-token log-probs' own rounding is left
(about 1e-6 each, a random walk: ~1e-4 at that length). The losses then run in float64 on them
(``preference_loss`` computes in its inputs' dtype); the modules cast their loss and metrics back to the
per-token dtype. The gradient reaching the per-token log-probs is the same number per token either way.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

Tensor = torch.Tensor

__all__ = ["PairedLogps", "sequence_logps", "aggregate_pair_logps", "wpo_weights"]


def sum_dtype(device: torch.device) -> torch.dtype:
    """The dtype per-sequence sums accumulate and are returned in: float64, except on a device without
    float64 arithmetic (MPS), where they stay float32."""
    return torch.float32 if device.type == "mps" else torch.float64


def _row_sums(values: Tensor, mask: Tensor) -> Tensor:
    """``[R]`` sums of ``values [R, T]`` over ``mask``, in :func:`sum_dtype` (the cast is differentiable:
    the gradient comes back in ``values``' dtype)."""
    wide = values.to(sum_dtype(values.device))
    return torch.where(mask, wide, torch.zeros_like(wide)).sum(dim=1)


class PairedLogps(NamedTuple):
    """Per-sequence numbers of a paired batch (``B`` pairs)."""

    chosen_logps: Tensor
    """``[B]`` summed completion log-probs of the chosen (``ld_alpha``-weighted if given), float64."""
    rejected_logps: Tensor
    """``[B]`` the same for the rejected."""
    chosen_lengths: Tensor
    """``[B]`` number of completion tokens of each chosen sequence (integer)."""
    rejected_lengths: Tensor
    """``[B]`` the same for the rejected."""
    chosen_nll: Tensor
    """scalar (float64): mean NLL over all chosen completion tokens of the batch, from the *unweighted* per-token
    log-probs (what TRL's ``sft`` loss type uses, also with ``ld_alpha``)."""
    weights: Tensor | None
    """``[B]`` WPO pair weights (detached), or None without ``log_sum_p2``."""


def _check(per_token_logps: Tensor, completion_mask: Tensor, name: str = "per_token_logps") -> Tensor:
    if not isinstance(per_token_logps, torch.Tensor) or per_token_logps.dim() != 2:
        raise ValueError(
            f"`{name}` must be a 2-D tensor [R, T]; got {getattr(per_token_logps, 'shape', per_token_logps)!r}."
        )
    if not per_token_logps.is_floating_point():
        raise ValueError(f"`{name}` must be a floating-point tensor (log-probs); got dtype {per_token_logps.dtype}.")
    if not isinstance(completion_mask, torch.Tensor) or completion_mask.shape != per_token_logps.shape:
        raise ValueError(
            f"`completion_mask` must have the shape of `{name}` {tuple(per_token_logps.shape)}; got "
            f"{tuple(getattr(completion_mask, 'shape', ()))}."
        )
    return completion_mask.bool()


def sequence_logps(per_token_logps: Tensor, completion_mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(sums [R], lengths [R])``: completion log-probs summed per row (float64: :func:`sum_dtype`) and
    completion token counts."""
    mask = _check(per_token_logps, completion_mask)
    return _row_sums(per_token_logps, mask), mask.sum(dim=1)


def wpo_weights(per_token_logps: Tensor, log_sum_p2: Tensor, completion_mask: Tensor) -> Tensor:
    """WPO pair weights (Zhou et al. 2024, eq. 2, as TRL 1.16 computes them), ``[B]``, no gradient.

    Per sequence ``w = exp(mean over completion tokens of (log p(y_t) - log sum_v p_v^2))`` (the
    log-prob aligned with the policy's own sampling distribution), and the pair weight is
    ``w_chosen * w_rejected``.
    """
    mask = _check(per_token_logps, completion_mask)
    if not isinstance(log_sum_p2, torch.Tensor) or log_sum_p2.shape != per_token_logps.shape:
        raise ValueError(
            f"`log_sum_p2` must have the shape of `per_token_logps` {tuple(per_token_logps.shape)}; got "
            f"{tuple(getattr(log_sum_p2, 'shape', ()))}."
        )
    if not log_sum_p2.is_floating_point():
        raise ValueError(f"`log_sum_p2` must be a floating-point tensor; got dtype {log_sum_p2.dtype}.")
    if per_token_logps.shape[0] % 2:
        raise ValueError("a paired batch needs an even number of rows (chosen rows, then rejected rows).")
    with torch.no_grad():
        aligned = _row_sums(per_token_logps - log_sum_p2, mask)
        lengths = mask.sum(dim=1).clamp(min=1)  # an integer count: the division promotes it exactly
        w = torch.exp(aligned / lengths)
        wc, wr = w.chunk(2)
        return (wc * wr).to(per_token_logps.dtype)


def aggregate_pair_logps(
    per_token_logps: Tensor,
    completion_mask: Tensor,
    *,
    ld_alpha: float | None = None,
    log_sum_p2: Tensor | None = None,
) -> PairedLogps:
    """Per-sequence numbers of a paired batch from its per-token log-probs. The sums and ``chosen_nll``
    are float64 (:func:`sum_dtype`; see the module docstring), the weights in the per-token dtype.

    Args:
        per_token_logps: ``[2B, T]`` log-probs of the label tokens, chosen rows first.
        completion_mask: ``[2B, T]`` 1 (or True) on completion tokens, aligned with ``per_token_logps``.
        ld_alpha: LD-DPO's alpha in [0, 1] (Liu et al. 2024): for each pair, the tokens up to the
            shorter completion's length count fully and the later ("verbose") tokens count ``ld_alpha``
            times. None (default) = plain sums. Apply it to the reference's per-token log-probs with the
            same mask, as TRL does.
        log_sum_p2: ``[2B, T]`` ``log sum_v p_v^2`` of the policy's next-token distributions; when
            given, ``weights`` holds the WPO pair weights.
    """
    mask = _check(per_token_logps, completion_mask)
    rows = per_token_logps.shape[0]
    if rows % 2:
        raise ValueError(
            f"a paired batch needs an even number of rows (B chosen rows, then B rejected rows); got {rows}."
        )
    wide = per_token_logps.to(sum_dtype(per_token_logps.device))
    zeros = torch.zeros_like(wide)
    masked = torch.where(mask, wide, zeros)
    lengths = mask.sum(dim=1)
    if ld_alpha is None:
        logps = masked.sum(dim=1)
    else:
        if isinstance(ld_alpha, bool) or not isinstance(ld_alpha, (int, float)) or not 0.0 <= ld_alpha <= 1.0:
            raise ValueError(
                f"`ld_alpha` must be a number in [0, 1] (1 = no down-weighting, 0 = drop the tokens past the "
                f"shorter response); got {ld_alpha!r}."
            )
        pos = mask.long().cumsum(dim=1)  # 1-based index of each completion token within its completion
        lc, lr = lengths.chunk(2)
        shared = torch.minimum(lc, lr).repeat(2).unsqueeze(1)
        shared_mask = mask & (pos <= shared)
        tail_mask = mask & (pos > shared)
        logps = torch.where(shared_mask, masked, zeros).sum(dim=1) + ld_alpha * torch.where(
            tail_mask, masked, zeros
        ).sum(dim=1)
    chosen_logps, rejected_logps = logps.chunk(2)
    chosen_lengths, rejected_lengths = lengths.chunk(2)
    b = rows // 2
    chosen_nll = -masked[:b].sum() / chosen_lengths.sum().clamp(min=1)
    weights = None if log_sum_p2 is None else wpo_weights(per_token_logps, log_sum_p2, completion_mask)
    return PairedLogps(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, chosen_nll, weights)

"""Listwise ranking losses on per-response scores: RRHF and PRO.

A batch holds ``B`` prompts with ``K`` responses each: ``scores [B, K]`` (what the method ranks; for
both methods the length-normalized response log-probs), ``rewards [B, K]`` (the reward model's or a
human's grades) and an optional ``mask [B, K]`` (False = no response in that slot). The losses:

* ``"rrhf"`` (Yuan et al., 2023, "RRHF: Rank Responses to Align Language Models with Human
  Feedback", NeurIPS 2023): ``L_rank = sum over pairs with r_i < r_j of max(0, s_i - s_j)``,
  a sum over the pairs of one prompt, as in the paper;
* ``"pro"`` (Song et al., 2023, "Preference Ranking Optimization for Human Alignment", AAAI 2024):
  with the responses sorted by reward, descending,
  ``L = -sum_{k=1}^{K-1} log( exp(s_k) / sum_{i >= k} exp(s_i) )``. With ``reward_temperature=True``
  the paper's reward-gap temperature ("grafting RLHF onto PRO"), in the form the authors' released
  code computes it (``AlibabaResearch/DAMO-ConvAI``, ``PRO/train/utils/process_manager.py``,
  ``compute_loss``; reimplemented here, without its ``1e-10`` inside the log): stage ``k`` multiplies
  the score of each response ``i > k`` by ``r_k - r_i`` and the score of ``y_k`` by the largest of these
  gaps, i.e. divides them by temperatures ``T_k^i = 1 / (r_k - r_i)`` and ``T_k^k = min_{i > k} T_k^i``.
  The equation number of this definition in the paper could not be checked: the stored copies of
  the paper reachable here gave only its abstract and introduction.

**Ties in reward.** A response is only ever ranked against responses of *strictly* lower reward:
RRHF counts the pairs with ``r_i < r_j`` (tied pairs add nothing, as the formula says), and PRO's
stage of response ``k`` contrasts ``y_k`` with ``{i : r_i < r_k}`` (every response with a strictly
worse reward), a stage with no such response is skipped. Without ties this is exactly the paper's
sum over ``k = 1..K-1``; with ties it does not depend on the order of the tied responses (the
reward-gap temperatures stay finite and positive), and tied responses are not pushed apart.

**Masks.** Masked responses (and whatever their scores and rewards hold, NaN included) take no part
in any pair or stage. A prompt with fewer than two valid responses contributes 0 to the batch
average; a mask that leaves no response at all raises.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .registry import HParamTypeError, checks_values, describe

__all__ = [
    "RANKING_LOSSES",
    "ranking_loss",
    "check_ranking_inputs",
    "check_rewards_and_mask",
    "best_response_mask",
]

#: the listwise losses of :func:`ranking_loss` and their hyper-parameters with defaults
RANKING_LOSSES: dict[str, dict[str, Any]] = {"rrhf": {}, "pro": {"reward_temperature": False}}

_REAL_DTYPES = (
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
)


def check_rewards_and_mask(
    rewards: Any, mask: Any, shape: tuple[int, int], device: torch.device, dtype: torch.dtype, *, shape_of: str
) -> tuple[Tensor, Tensor]:
    """Checks ``rewards`` (real, ``shape``, finite where valid) and ``mask`` (``shape`` bool or None);
    returns ``(rewards detached in dtype, mask)`` with a None mask filled in. ``shape_of`` names the
    argument ``shape`` comes from, in the messages. TypeError for a wrong type or dtype, ValueError
    for a wrong shape or device, non-finite valid rewards, or a mask that leaves no response."""
    if not isinstance(rewards, Tensor):
        raise TypeError(f"`rewards` must be a torch.Tensor of shape [B, K]; got {type(rewards).__name__}.")
    if rewards.dtype not in _REAL_DTYPES:
        raise TypeError(f"`rewards` must be a real (floating-point or integer) tensor; got dtype {rewards.dtype}.")
    if tuple(rewards.shape) != shape:
        raise ValueError(f"`rewards` must have shape {shape} (B, K of `{shape_of}`); got {tuple(rewards.shape)}.")
    if rewards.device != device:
        raise ValueError(f"`rewards` is on {rewards.device} but `{shape_of}` is on {device}.")
    if mask is None:
        mask = torch.ones(shape, dtype=torch.bool, device=device)
    else:
        if not isinstance(mask, Tensor):
            raise TypeError(f"`mask` must be None or a bool tensor of shape [B, K]; got {type(mask).__name__}.")
        if mask.dtype != torch.bool:
            raise TypeError(f"`mask` must be a bool tensor (True = a response in that slot); got dtype {mask.dtype}.")
        if tuple(mask.shape) != shape:
            raise ValueError(f"`mask` must have shape {shape} (B, K of `{shape_of}`); got {tuple(mask.shape)}.")
        if mask.device != device:
            raise ValueError(f"`mask` is on {mask.device} but `{shape_of}` is on {device}.")
        if checks_values() and not bool(mask.any()):
            raise ValueError("`mask` leaves no response in the batch: nothing to rank.")
    r = rewards.detach().to(dtype)  # rewards are data: no gradient through the temperature's gaps
    if checks_values() and not bool(torch.isfinite(r).logical_or(~mask).all()):
        raise ValueError("`rewards` contains NaN or inf at a valid (unmasked) response.")
    return r, mask


def check_ranking_inputs(scores: Any, rewards: Any, mask: Any) -> tuple[Tensor, Tensor]:
    """Checks ``scores [B, K]`` (floating, ``B >= 1``, ``K >= 2``, finite where valid), ``rewards`` and
    ``mask`` (:func:`check_rewards_and_mask`); returns ``(rewards in the compute dtype, mask)``.

    The compute dtype is float32, or float64 when ``scores`` is float64 (16-bit scores are upcast;
    16-bit rewards would tie grades that differ)."""
    if not isinstance(scores, Tensor):
        raise TypeError(f"`scores` must be a torch.Tensor of shape [B, K]; got {type(scores).__name__}.")
    if not scores.is_floating_point():
        raise TypeError(f"`scores` must be a floating-point tensor; got dtype {scores.dtype}.")
    if scores.dim() != 2:
        raise ValueError(f"`scores` must have shape [B, K] (2-D); got {tuple(scores.shape)}.")
    batch, k = scores.shape
    if batch == 0:
        raise ValueError("`scores` has no prompts (B = 0): the batch average is undefined.")
    if k < 2:
        raise ValueError(f"`scores` has K = {k} response per prompt; a ranking needs K >= 2.")
    dt = torch.float64 if scores.dtype == torch.float64 else torch.float32
    r, mask = check_rewards_and_mask(rewards, mask, (batch, k), scores.device, dt, shape_of="scores")
    if checks_values() and not bool(torch.isfinite(scores.detach()).logical_or(~mask).all()):
        raise ValueError("`scores` contains NaN or inf at a valid (unmasked) response.")
    return r, mask


def best_response_mask(rewards: Tensor, mask: Tensor) -> Tensor:
    """``[B, K]`` bool: the valid responses tied for the highest reward of their prompt (none for a
    prompt without a valid response). The SFT terms average over all of them, so the result does
    not depend on the order of tied responses."""
    top = torch.where(mask, rewards, torch.full_like(rewards, -torch.inf)).amax(dim=1, keepdim=True)
    return mask & (rewards == top)


def _rrhf(s: Tensor, r: Tensor, valid: Tensor) -> Tensor:
    """Per prompt ``sum_{r_i < r_j} max(0, s_i - s_j)``; ``[B]``."""
    # pair (i, j): i the worse response, j the better one
    pairs = valid[:, :, None] & valid[:, None, :] & (r[:, :, None] < r[:, None, :])
    hinge = torch.relu(s[:, :, None] - s[:, None, :])
    return torch.where(pairs, hinge, torch.zeros_like(hinge)).sum(dim=(1, 2))


def _pro(s: Tensor, r: Tensor, valid: Tensor, reward_temperature: bool) -> Tensor:
    """Per prompt ``sum_k -log softmax`` of ``y_k`` over ``{y_k} + {i : r_i < r_k}``; ``[B]``."""
    # worse[b, k, i]: response i is in the denominator of stage k (strictly lower reward than y_k)
    worse = valid[:, :, None] & valid[:, None, :] & (r[:, None, :] < r[:, :, None])
    stage = worse.any(dim=2)  # [B, K]: y_k has someone to be ranked above
    if reward_temperature:
        gap = r[:, :, None] - r[:, None, :]  # r_k - r_i = 1 / T_k^i, > 0 on `worse`
        own = torch.where(worse, gap, torch.full_like(gap, -torch.inf)).amax(dim=2)  # 1 / T_k^k
        own = torch.where(stage, own, torch.ones_like(own))  # no stage: any finite value, masked below
        top = s * own
        others = s[:, None, :] * torch.where(worse, gap, torch.zeros_like(gap))
    else:
        top, others = s, s[:, None, :].expand_as(worse)
    others = others.masked_fill(~worse, -torch.inf)  # not in the denominator (a zero gradient there)
    lse = torch.logsumexp(torch.cat([top[:, :, None], others], dim=2), dim=2)
    per_stage = lse - top
    return torch.where(stage, per_stage, torch.zeros_like(per_stage)).sum(dim=1)


def ranking_loss(name: str, scores: Tensor, rewards: Tensor, *, mask: Tensor | None = None, **hparams: Any) -> Tensor:
    """The listwise ranking term of ``name``, averaged over the ``B`` prompts (a 0-d tensor).

    Args:
        name: ``"rrhf"`` or ``"pro"`` (see the module docstring for the formulas and the tie rule).
        scores: ``[B, K]`` floating, differentiable: the scores being ranked (length-normalized
            response log-probs for RRHF and PRO). Computed in float32 (float64 for float64 input).
        rewards: ``[B, K]`` real (float or integer), no gradient: higher is better.
        mask: optional ``[B, K]`` bool, False where a prompt has no response in that slot.
        **hparams: ``"pro"``: ``reward_temperature`` (bool, default False), the paper's reward-gap
            temperature. ``"rrhf"`` takes none.

    Returns the loss in the compute dtype; its gradient flows to ``scores`` only.
    """
    if not isinstance(name, str) or name not in RANKING_LOSSES:
        raise ValueError(f"`name` must be one of {list(RANKING_LOSSES)}; got {name!r}.")
    accepted = RANKING_LOSSES[name]
    for key in hparams:
        if key not in accepted:
            raise ValueError(f"Unknown hyperparameter `{key}` for ranking loss {name!r}; accepted: {sorted(accepted)}.")
    hp = {**accepted, **hparams}
    check_ranking_hparams(name, hp)
    r, valid = check_ranking_inputs(scores, rewards, mask)
    s = scores.to(r.dtype)
    s = torch.where(valid, s, torch.zeros_like(s))  # masked slots may hold NaN: keep them out of every op
    per_prompt = _rrhf(s, r, valid) if name == "rrhf" else _pro(s, r, valid, hp["reward_temperature"])
    return per_prompt.mean()


def check_ranking_hparams(name: str, hparams: dict[str, Any]) -> None:
    """Type checks of the hyper-parameters of ranking loss ``name`` (names were checked before)."""
    if name == "pro":
        temp = hparams["reward_temperature"]
        if not isinstance(temp, bool):
            raise HParamTypeError(f"`reward_temperature` must be a bool (True or False); got {describe(temp)}.")

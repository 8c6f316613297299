"""The computations the Liger-compatible losses share: option checks, the policy/reference passes
through :func:`expo_kernels.linear_logprobs`, per-sequence aggregation (summed or averaged), the chosen
NLL, the logit statistics Liger reports, and the step of the paired losses (:func:`paired_step`).

Nothing here imports ``liger_kernel``: the classes work without it installed.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ...functional import linear_logprobs
from ...losses.aggregate import sum_dtype
from ...losses.registry import get_loss_spec

__all__ = [
    "Batch",
    "CallArgs",
    "check_options",
    "check_registry_hparams",
    "SequenceLogps",
    "policy_and_reference",
    "row_logit_sums",
    "chosen_nll",
    "logit_means",
    "Preference",
    "paired_step",
]


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool) or type(value).__name__ == "bool_"


def check_options(owner: str, *, ignore_index: Any, chunk_size: Any, bools: dict[str, Any]) -> None:
    """Refuse, naming the option, what Liger's signature types would not accept.

    ``chunk_size`` and ``compiled`` are performance knobs of Liger's chunked loop; here they are
    validated and otherwise unused (the op tiles tokens and vocabulary itself).
    """
    if _is_bool(ignore_index) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"{owner}: `ignore_index` must be an int; got {ignore_index!r}.")
    if _is_bool(chunk_size) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"{owner}: `chunk_size` must be a positive int; got {chunk_size!r}.")
    for name, value in bools.items():
        if not _is_bool(value):
            raise TypeError(f"{owner}: `{name}` must be a bool; got {value!r}.")


def check_registry_hparams(owner: str, loss: str, **hparams: Any) -> None:
    """Validate hyperparameters against the registry's spec of ``loss`` (ranges and types), so a value
    the loss cannot take fails at construction, with the registry's message naming it."""
    try:
        get_loss_spec(loss).resolve(hparams)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{owner}: {err}") from None


class CallArgs:
    """A call's arguments by name (``args.beta``, ``args._input``, ...): a plain class, as torch.compile
    traces its construction (it cannot build a ``types.SimpleNamespace`` under ``fullgraph=True``)."""

    def __init__(self, **values: Any) -> None:
        for name, value in values.items():
            setattr(self, name, value)

    def __getattr__(self, name: str) -> Any:  # for mypy: the attributes are the call's argument names
        raise AttributeError(name)


class Batch(NamedTuple):
    """A call's tensors under Liger's names (``hidden`` is Liger's ``_input``, ``weight`` its
    ``lin_weight``); the reference ones None for a loss that takes none."""

    hidden: Tensor  # [R, T, H]
    weight: Tensor  # [V, H]
    target: Tensor  # [R, T]
    bias: Tensor | None  # [V]
    ref_input: Tensor | None = None  # [R, T, H]
    ref_weight: Tensor | None = None
    ref_bias: Tensor | None = None

    @classmethod
    def of(cls, args: CallArgs) -> Batch:
        """The tensors of a call's arguments (a step's ``args``)."""
        refs = (getattr(args, name, None) for name in ("ref_input", "ref_weight", "ref_bias"))
        return cls(args._input, args.weight, args.target, args.bias, *refs)


class SequenceLogps(NamedTuple):
    """Per-row log-probs of a batch (``[R]`` float32, or float64 from ``policy_and_reference(wide=True)``),
    as Liger's ``average_log_prob`` defines them."""

    policy: Tensor  # summed, or averaged over the counted tokens; differentiable
    reference: Tensor | None  # the same under the reference head, no gradient; None without one
    summed: Tensor  # the policy's summed log-probs (= policy unless averaged)
    lengths: Tensor  # counted tokens per row
    token_logps: Tensor  # [R, T] policy per-token log-probs, 0 at ignored positions


def policy_and_reference(
    owner: str, batch: Batch, *, ignore_index: int, average_log_prob: bool, use_ref_model: bool, wide: bool = False
) -> SequenceLogps:
    """One fused policy pass and (with ``use_ref_model``) one forward-only reference pass.

    The per-row sums accumulate in float64 (a long row's sum is large, its float32 spacing coarse:
    ``losses.aggregate``); ``wide``: they are returned in float64 too, else in the per-token dtype.

    Without ``ref_weight`` the reference shares the policy head (detached), as for a LoRA model whose
    head is frozen; Liger would fail there.
    """
    _input, weight, target, bias, ref_input, ref_weight, ref_bias = batch
    if not isinstance(_input, Tensor) or _input.dim() != 3:
        raise ValueError(f"{owner}: `_input` must be a [batch, seq, hidden] tensor; got {_shape(_input)}.")
    if not isinstance(target, Tensor) or tuple(target.shape) != tuple(_input.shape[:2]):
        raise ValueError(
            f"{owner}: `target` must be a [batch, seq] tensor matching `_input` {tuple(_input.shape[:2])}; "
            f"got {_shape(target)}."
        )
    token_logps = linear_logprobs(_input, weight, target, bias, ignore_index=ignore_index)
    mask = target != ignore_index
    acc = sum_dtype(token_logps.device) if wide else token_logps.dtype
    lengths = mask.sum(-1).to(acc)
    summed = token_logps.sum(-1, dtype=sum_dtype(token_logps.device)).to(acc)
    policy = summed / lengths if average_log_prob else summed
    reference = None
    if use_ref_model:
        if ref_input is None:
            raise ValueError(f"{owner}: `use_ref_model=True` needs `ref_input` (the reference model's hidden states).")
        if tuple(ref_input.shape[:2]) != tuple(_input.shape[:2]):
            raise ValueError(
                f"{owner}: `ref_input` must cover the same rows and tokens as `_input` {tuple(_input.shape[:2])}; "
                f"got {_shape(ref_input)}."
            )
        if ref_weight is None:
            ref_weight, ref_bias = weight, bias if ref_bias is None else ref_bias
        with torch.no_grad():
            ref_tok = linear_logprobs(
                ref_input.detach(),
                ref_weight.detach(),
                target,
                None if ref_bias is None else ref_bias.detach(),
                ignore_index=ignore_index,
            )
            reference = ref_tok.sum(-1, dtype=sum_dtype(ref_tok.device)).to(acc)
            if average_log_prob:
                reference = reference / lengths
    return SequenceLogps(policy, reference, summed, lengths, token_logps)


def _shape(x: Any) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


@torch.no_grad()
def row_logit_sums(_input: Tensor, weight: Tensor, bias: Tensor | None, row_weights: Tensor) -> Tensor:
    """``sum_r row_weights[r] * sum_{t, v} (h_rt . W_v + b_v)`` over *every* position (Liger's logit
    statistics count ignored positions too), without forming a logit:
    ``(sum_{r,t} w_r h_rt) . (sum_v W_v) + (sum_r w_r) T sum_v b_v``, in float32 (float64 for float64)."""
    acc = torch.float64 if _input.dtype == torch.float64 else torch.float32
    w = row_weights.to(device=_input.device, dtype=acc)
    h = torch.einsum("r,rth->h", w, _input.detach().to(acc))
    out = h @ weight.detach().to(acc).sum(0)
    if bias is not None:
        out = out + w.sum() * _input.shape[1] * bias.detach().to(acc).sum()
    return out.to(torch.float32)


def chosen_nll(owner: str, seq: SequenceLogps, batch: Batch, nll_target: Tensor | None, *, ignore_index: int) -> Tensor:
    """Liger's NLL term: ``-sum log p`` over the counted tokens of the chosen rows (the first half),
    divided by their count; labels from ``nll_target`` (its first half) when given. With ``nll_target``
    the chosen rows take one more fused pass; otherwise the policy pass's log-probs serve."""
    _input, weight, target, bias = batch[:4]
    n_chosen = target.shape[0] // 2
    if nll_target is None:
        count = (target[:n_chosen] != ignore_index).sum()
        return -seq.token_logps[:n_chosen].sum() / count
    if not isinstance(nll_target, Tensor) or tuple(nll_target.shape[1:]) != tuple(target.shape[1:]):
        raise ValueError(
            f"{owner}: `nll_target` must be a [batch, seq] tensor like `target`; got {_shape(nll_target)}."
        )
    labels = nll_target[:n_chosen]
    logp = linear_logprobs(_input[:n_chosen], weight, labels, bias, ignore_index=ignore_index)
    return -logp.sum() / (labels != ignore_index).sum()


def logit_means(_input: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """Liger's ``chosen_logits_mean`` / ``rejected_logits_mean``: the sum of every logit of the chosen
    (rejected) rows, all positions, divided by ``B * T * V``."""
    n = _input.shape[0] // 2
    ones = torch.ones(n, device=_input.device)
    zeros = torch.zeros(_input.shape[0] - 2 * n, device=_input.device)  # an odd last row counts in neither
    denom = n * _input.shape[1] * weight.shape[0]
    chosen = row_logit_sums(_input, weight, bias, torch.cat([ones, 0 * ones, zeros])) / denom
    rejected = row_logit_sums(_input, weight, bias, torch.cat([0 * ones, ones, zeros])) / denom
    return chosen, rejected


#: ``preference(chosen, rejected, ref_chosen, ref_rejected, seq, nll) -> (loss, extra aux, nll_included)``
Preference = Callable[[Tensor, Tensor, Tensor, Tensor, SequenceLogps, Tensor], tuple[Tensor, tuple[Tensor, ...], bool]]


def paired_step(
    owner: str,
    batch: Batch,
    preference: Preference,
    *,
    ignore_index: int,
    alpha: float,
    compute_nll_loss: bool,
    average_log_prob: bool,
    nll_target: Tensor | None = None,
    use_ref_model: bool = False,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """A paired loss's ``(loss, (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean,
    nll_loss, *extras))`` for rows laid out as Liger's, ``B`` chosen then ``B`` rejected. ``preference``
    gives the preference term and the extra aux outputs; the NLL is added with weight ``alpha`` unless
    the preference term already holds it (``nll_included``). The aux outputs carry no gradient."""
    seq = policy_and_reference(
        owner,
        batch,
        ignore_index=ignore_index,
        average_log_prob=average_log_prob,
        use_ref_model=use_ref_model,
        wide=True,  # float64 sums: the preference term's margins are exact; loss and aux come back in `dt`
    )
    dt = seq.token_logps.dtype
    _input, weight, target, bias = batch[:4]
    n = target.shape[0] // 2
    if compute_nll_loss:
        nll = chosen_nll(owner, seq, batch, nll_target, ignore_index=ignore_index)
    else:
        nll = torch.zeros((), device=_input.device)
    c, r = seq.policy[:n], seq.policy[n : 2 * n]
    if seq.reference is None:
        rc = rr = torch.zeros((), device=c.device, dtype=c.dtype)
    else:
        rc, rr = seq.reference[:n], seq.reference[n : 2 * n]
    pref, extras, nll_included = preference(c, r, rc, rr, seq, nll)
    loss = pref if nll_included or not compute_nll_loss else alpha * nll + pref
    chosen_mean, rejected_mean = logit_means(_input, weight, bias)
    aux = (c.detach().to(dt), r.detach().to(dt), chosen_mean, rejected_mean, nll.detach().float())
    return loss.to(dt), aux + tuple(x.detach().to(dt) for x in extras)

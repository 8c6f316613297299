"""The public entry points: :func:`preference_loss` and :func:`preference_loss_and_metrics`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ._common import F_DIVERGENCE_LOSSES, F_DIVERGENCE_TYPES, LossTerms, PreferenceBatch
from .registry import HParamTypeError, LossSpec, as_real, checks_values, describe, get_loss_spec, is_bool, loss_names

Tensor = torch.Tensor
Number = int | float

__all__ = ["preference_loss", "preference_loss_and_metrics"]

_REDUCTIONS = ("mean", "sum", "none")
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_reduction(reduction: Any) -> None:
    if not isinstance(reduction, str):
        raise HParamTypeError(f"`reduction` must be one of {list(_REDUCTIONS)}; got {describe(reduction)}.")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {list(_REDUCTIONS)}; got {reduction!r}.")


def check_loss_weights(loss_weights: Any, names: Sequence[str]) -> list[float]:
    """One finite real number per loss (default 1 each)."""
    if loss_weights is None:
        return [1.0] * len(names)
    if isinstance(loss_weights, (str, bytes)) or not isinstance(loss_weights, (list, tuple)):
        if not (isinstance(loss_weights, torch.Tensor) and loss_weights.dim() == 1):
            raise HParamTypeError(
                f"`loss_weights` must be a list of numbers, one per loss {list(names)}; got {describe(loss_weights)}."
            )
    lws = list(loss_weights)
    if len(lws) != len(names):
        raise ValueError(
            f"`loss_weights` must have one weight per loss: {len(lws)} weights for {len(names)} losses {list(names)}."
        )
    out = []
    for w in lws:
        v = as_real(w)
        if v is None:
            raise HParamTypeError(f"`loss_weights` must be finite numbers; got {describe(w)} in {loss_weights!r}.")
        if not math.isfinite(v):
            raise ValueError(f"`loss_weights` must be finite numbers; got {loss_weights!r}.")
        out.append(v)
    return out


def _check_is_desirable(x: Any, n: int, device) -> Tensor:
    """``[N]`` bool, True = desirable. Integer 0/1 labels are accepted; floats are refused (``0.3``
    would silently count as True)."""
    if not isinstance(x, torch.Tensor):
        if isinstance(x, (list, tuple)) and all(is_bool(v) for v in x):
            x = torch.tensor([bool(v) for v in x], dtype=torch.bool)
        else:
            raise HParamTypeError(
                f"`is_desirable` must be a bool tensor (or list of bools) of shape ({n},); got {type(x).__name__}."
            )
    if x.dim() != 1 or x.shape[0] != n:
        raise ValueError(f"`is_desirable` must have shape ({n},); got {tuple(x.shape)}.")
    if x.dtype != torch.bool:
        if x.dtype not in _INT_DTYPES:
            raise HParamTypeError(f"`is_desirable` must be a bool tensor (True = desirable); got dtype {x.dtype}.")
        if checks_values() and not bool(((x == 0) | (x == 1)).all()):
            raise ValueError("`is_desirable` must hold 0/1 (or True/False) labels; got other integers.")
    return x.to(device).bool()


def _check_finite(result: Tensor, names: Sequence[str], hparams: dict[str, Any], **inputs: Any) -> None:
    """A NaN / inf loss is an error, not a number to train on: name the input that caused it.

    One device sync on the (reduced) result; the inputs are only looked at once it is non-finite.
    Skipped under ``torch.compile`` (:func:`~.registry.checks_values`).
    """
    if not checks_values() or bool(torch.isfinite(result.detach()).all()):
        return
    for key, t in inputs.items():
        if (
            isinstance(t, torch.Tensor)
            and (t.is_floating_point() or t.is_complex())
            and not bool(torch.isfinite(t.detach()).all())
        ):
            raise ValueError(f"`{key}` contains NaN or inf values (the loss came out non-finite).")
    raise ValueError(
        f"Loss {list(names) if len(names) > 1 else names[0]!r} came out non-finite from finite inputs: it "
        f"overflowed the {result.dtype} range; check the scale of the log-probs and the hyperparameters "
        f"{dict(hparams)}."
    )


# ------------------------------------------------------------------------------------------------
# input checks
# ------------------------------------------------------------------------------------------------
def _float_vector(name: str, x: Any, n: int | None = None) -> Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"`{name}` must be a torch.Tensor of shape [B]; got {type(x).__name__}.")
    if not x.is_floating_point():
        raise ValueError(f"`{name}` must be a floating-point tensor (log-probs); got dtype {x.dtype}.")
    if x.dim() != 1:
        raise ValueError(f"`{name}` must be 1-D (one entry per sequence), got shape {tuple(x.shape)}.")
    if n is not None and x.shape[0] != n:
        raise ValueError(f"`{name}` has shape {tuple(x.shape)} but the batch has {n} pairs: expected ({n},).")
    return x


def _vector(name: str, x: Any, n: int) -> Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"`{name}` must be a torch.Tensor of shape ({n},); got {type(x).__name__}.")
    if x.dim() != 1 or x.shape[0] != n:
        raise ValueError(f"`{name}` must have shape ({n},) (one entry per pair); got {tuple(x.shape)}.")
    return x


def _scalar_or_vector(name: str, x: Any, like: Tensor, allowed: Sequence[int]) -> Tensor:
    if not isinstance(x, torch.Tensor):
        v = as_real(x)
        if v is None:
            raise HParamTypeError(f"`{name}` must be a number or a tensor; got {describe(x)}.")
        if not math.isfinite(v):
            raise ValueError(f"`{name}` must be finite; got {x!r}.")
        return torch.tensor(v, dtype=like.dtype, device=like.device)
    if not (x.is_floating_point() or x.dtype in _INT_DTYPES):
        raise HParamTypeError(f"`{name}` must be a real (floating-point or integer) tensor; got dtype {x.dtype}.")
    if x.dim() == 0:
        return x
    if x.dim() != 1 or x.shape[0] not in allowed:
        shapes = " or ".join(f"({k},)" for k in allowed)
        expected = f"a scalar or have shape {shapes}" if allowed else "a scalar"
        raise ValueError(f"`{name}` must be {expected}; got {tuple(x.shape)}.")
    return x


_FDIV_KEYS = ("f_divergence_type", "f_alpha_divergence_coef")


def check_hparams(specs: Sequence[LossSpec], hparams: dict[str, Any]) -> None:
    fdiv = hparams.get("f_divergence_type", "reverse_kl")
    if not isinstance(fdiv, str):
        raise HParamTypeError(f"`f_divergence_type` must be one of {list(F_DIVERGENCE_TYPES)}; got {describe(fdiv)}.")
    # checked here too: a loss that does not take it would otherwise never look at it
    coef = hparams.get("f_alpha_divergence_coef", 0.5)
    v = as_real(coef)
    if v is None:
        raise HParamTypeError(f"`f_alpha_divergence_coef` must be a finite real number; got {describe(coef)}.")
    if not math.isfinite(v):
        raise ValueError(f"`f_alpha_divergence_coef` must be a finite real number; got {coef!r}.")
    if fdiv not in F_DIVERGENCE_TYPES:
        raise ValueError(f"Unknown f_divergence_type {fdiv!r}; expected one of {list(F_DIVERGENCE_TYPES)}.")
    if fdiv != "reverse_kl":
        bad = [s.name for s in specs if s.name not in F_DIVERGENCE_LOSSES]
        if bad:
            raise ValueError(
                f"f_divergence_type={fdiv!r} is only defined for the losses built on the chosen-rejected score "
                f"difference {sorted(F_DIVERGENCE_LOSSES)}; not for {bad}. Use the default 'reverse_kl' with them."
            )
    for key in hparams:
        if key in _FDIV_KEYS:
            continue  # shared options (as in TRL's DPOConfig); checked above, unused by the reverse KL
        if not any(s.canonical(key) is not None for s in specs):
            accepted = sorted({k for s in specs for k in list(s.hparams) + list(s.aliases)})
            names = [s.name for s in specs]
            raise ValueError(
                f"Unknown hyperparameter `{key}` for loss {names if len(names) > 1 else names[0]!r}; "
                f"accepted: {accepted}."
            )


def _build_batch(
    specs: Sequence[LossSpec],
    chosen_logps,
    rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    chosen_lengths,
    rejected_lengths,
    chosen_nll,
    offset,
    token_kl,
    policy_logps,
    ref_logps,
    is_desirable,
    kl_logps,
    ref_kl_logps,
    kl,
) -> PreferenceBatch:
    paired = specs[0].paired
    names = [s.name for s in specs]
    if offset is not None and "odpo" not in names:
        raise ValueError(f"`offset` is only used by the 'odpo' loss, not by {names}.")
    if token_kl is not None and "expo" not in names:
        raise ValueError(f"`token_kl` is only used by the 'expo' loss, not by {names}.")

    if not paired:
        return _build_unpaired(
            specs[0].name,
            chosen_logps,
            rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            policy_logps,
            ref_logps,
            is_desirable,
            kl_logps,
            ref_kl_logps,
            kl,
        )

    unpaired_args = {
        "policy_logps": policy_logps,
        "ref_logps": ref_logps,
        "is_desirable": is_desirable,
        "kl_logps": kl_logps,
        "ref_kl_logps": ref_kl_logps,
        "kl": kl,
    }
    given = [k for k, v in unpaired_args.items() if v is not None]
    if given:
        raise ValueError(f"{given} are inputs of the unpaired losses (kto, apo_zero_unpaired), not of {names}.")
    if chosen_logps is None or rejected_logps is None:
        raise ValueError(f"Loss {names} needs `chosen_logps` and `rejected_logps` (shape [B]).")
    c = _float_vector("chosen_logps", chosen_logps)
    n = c.shape[0]
    if n == 0:
        raise ValueError("`chosen_logps` is empty: the batch needs at least one pair.")
    r = _float_vector("rejected_logps", rejected_logps, n)
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("Pass both `ref_chosen_logps` and `ref_rejected_logps`, or neither.")
    rc = rr = None
    if ref_chosen_logps is not None:
        rc = _float_vector("ref_chosen_logps", ref_chosen_logps, n)
        rr = _float_vector("ref_rejected_logps", ref_rejected_logps, n)
    lc = None if chosen_lengths is None else _vector("chosen_lengths", chosen_lengths, n)
    lr = None if rejected_lengths is None else _vector("rejected_lengths", rejected_lengths, n)
    nll = None if chosen_nll is None else _scalar_or_vector("chosen_nll", chosen_nll, c, (n,))
    off = None if offset is None else _scalar_or_vector("offset", offset, c, (n,))
    tk = None if token_kl is None else _scalar_or_vector("token_kl", token_kl, c, (n, 2 * n))
    return PreferenceBatch(
        chosen=c,
        rejected=r,
        ref_chosen=rc,
        ref_rejected=rr,
        chosen_lengths=lc,
        rejected_lengths=lr,
        chosen_nll=nll,
        offset=off,
        token_kl=tk,
    )


def _build_unpaired(
    name,
    chosen_logps,
    rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    policy_logps,
    ref_logps,
    is_desirable,
    kl_logps,
    ref_kl_logps,
    kl,
) -> PreferenceBatch:
    if policy_logps is not None:
        if chosen_logps is not None or rejected_logps is not None:
            raise ValueError(
                f"Loss {name!r}: pass either `policy_logps`/`ref_logps`/`is_desirable` or the chosen/rejected form "
                "(chosen = desirable, rejected = undesirable), not both."
            )
        pol = _float_vector("policy_logps", policy_logps)
        n = pol.shape[0]
        if n == 0:
            raise ValueError("`policy_logps` is empty.")
        ref = None if ref_logps is None else _float_vector("ref_logps", ref_logps, n)
        if is_desirable is None:
            raise ValueError(
                f"Loss {name!r}: `is_desirable` ([N] bool, True = desirable) is required with `policy_logps`."
            )
        batch = PreferenceBatch(
            policy_logps=pol, ref_logps=ref, is_desirable=_check_is_desirable(is_desirable, n, pol.device)
        )
        like = pol
    else:
        if chosen_logps is None or rejected_logps is None:
            raise ValueError(
                f"Loss {name!r} needs `policy_logps`, `ref_logps`, `is_desirable` ([N] each), or `chosen_logps` and "
                "`rejected_logps` (desirable / undesirable examples) with their reference log-probs."
            )
        c = _float_vector("chosen_logps", chosen_logps)
        r = _float_vector("rejected_logps", rejected_logps)
        if c.shape[0] + r.shape[0] == 0:
            raise ValueError("the batch is empty.")
        if (ref_chosen_logps is None) != (ref_rejected_logps is None):
            raise ValueError("Pass both `ref_chosen_logps` and `ref_rejected_logps`, or neither.")
        rc = rr = None
        if ref_chosen_logps is not None:
            rc = _float_vector("ref_chosen_logps", ref_chosen_logps, c.shape[0])
            rr = _float_vector("ref_rejected_logps", ref_rejected_logps, r.shape[0])
        batch = PreferenceBatch(chosen=c, rejected=r, ref_chosen=rc, ref_rejected=rr)
        like = c
    if (kl_logps is None) != (ref_kl_logps is None):
        raise ValueError("Pass both `kl_logps` and `ref_kl_logps` (mismatched-pair log-probs), or neither.")
    if kl_logps is not None:
        batch.kl_logps = _float_vector("kl_logps", kl_logps)
        batch.ref_kl_logps = _float_vector("ref_kl_logps", ref_kl_logps, batch.kl_logps.shape[0])
    if kl is not None:
        if kl_logps is not None:
            raise ValueError("Pass either `kl` or `kl_logps`/`ref_kl_logps`, not both.")
        batch.kl = _scalar_or_vector("kl", kl, like, ())
    return batch


# ------------------------------------------------------------------------------------------------
# entry points
# ------------------------------------------------------------------------------------------------
def _compute(
    name,
    chosen_logps,
    rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    reduction,
    loss_weights,
    weights,
    chosen_lengths,
    rejected_lengths,
    chosen_nll,
    offset,
    token_kl,
    policy_logps,
    ref_logps,
    is_desirable,
    kl_logps,
    ref_kl_logps,
    kl,
    hparams,
) -> tuple[Tensor, list[tuple[str, float, LossTerms]]]:
    names = loss_names(name)
    specs = [get_loss_spec(n) for n in names]
    check_reduction(reduction)
    lws = check_loss_weights(loss_weights, names)
    if any(not s.paired for s in specs) and len(specs) > 1:
        raise ValueError(
            f"The unpaired losses (kto, apo_zero_unpaired) cannot be mixed with other losses; got {list(names)}."
        )
    check_hparams(specs, hparams)
    batch = _build_batch(
        specs,
        chosen_logps,
        rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        chosen_lengths,
        rejected_lengths,
        chosen_nll,
        offset,
        token_kl,
        policy_logps,
        ref_logps,
        is_desirable,
        kl_logps,
        ref_kl_logps,
        kl,
    )
    if weights is not None:
        if not specs[0].paired:
            raise ValueError(
                f"`weights` are per-pair (WPO) weights; the unpaired loss {names[0]!r} does not take them."
            )
        coupled = [s.name for s in specs if s.batch_coupled]
        if coupled:
            raise ValueError(
                f"`weights` (WPO per-pair weighting) cannot be used with {coupled}: they sort the batch, which would "
                "misalign the per-pair weights."
            )
        weights = _float_vector("weights", weights, batch.pair()[0].shape[0])

    parts: list[tuple[str, float, LossTerms]] = []
    total: Tensor | None = None
    for spec, lw in zip(specs, lws, strict=False):
        hp = spec.resolve(hparams)
        out = spec.fn(batch, hp)
        parts.append((spec.name, float(lw), out))
        term = out.terms if lw == 1.0 else out.terms * lw
        total = term if total is None else total + term
    assert total is not None  # specs is not empty (loss_names refuses an empty list)
    if weights is not None:
        total = total * weights

    if reduction == "none":
        reasons = [(n, p.coupled) for n, _, p in parts if p.coupled is not None]
        if reasons:
            n, why = reasons[0]
            raise ValueError(f"reduction='none' is not available for loss {n!r}: {why}. Use reduction='mean' or 'sum'.")
    else:
        total = total.mean() if reduction == "mean" else total.sum()
    _check_finite(
        total,
        names,
        hparams,
        chosen_logps=chosen_logps,
        rejected_logps=rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
        weights=weights,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        chosen_nll=batch.chosen_nll,
        offset=batch.offset,
        token_kl=batch.token_kl,
        policy_logps=policy_logps,
        ref_logps=ref_logps,
        kl_logps=kl_logps,
        ref_kl_logps=ref_kl_logps,
        kl=batch.kl,
    )
    return total, parts


def preference_loss(
    name: str | Sequence[str],
    chosen_logps: Tensor | None = None,
    rejected_logps: Tensor | None = None,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    reduction: str = "mean",
    loss_weights: Sequence[float] | None = None,
    weights: Tensor | None = None,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    chosen_nll: Tensor | Number | None = None,
    offset: Tensor | Number | None = None,
    token_kl: Tensor | Number | None = None,
    policy_logps: Tensor | None = None,
    ref_logps: Tensor | None = None,
    is_desirable: Tensor | None = None,
    kl_logps: Tensor | None = None,
    ref_kl_logps: Tensor | None = None,
    kl: Tensor | Number | None = None,
    **hparams: Any,
) -> Tensor:
    """A sequence-level preference loss, differentiable w.r.t. every log-prob input.

    Args:
        name: a registered loss (see ``LOSSES``), e.g. ``"sigmoid"`` (DPO), ``"ipo"``, ``"simpo"``,
            ``"kto"``, ``"expo"``; or a list of names combined as ``sum_k loss_weights[k] * loss_k``
            (MPO; hyperparameters are shared, as in TRL's ``DPOConfig``).
        chosen_logps: ``[B]`` policy log-prob of each chosen completion, summed over its tokens
            (``sum_t log pi_theta(y_t | x, y_<t)``; with LD-DPO the ``ld_alpha``-weighted sum).
        rejected_logps: ``[B]`` the same for the rejected completion of each pair.
        ref_chosen_logps, ref_rejected_logps: ``[B]`` the same under the reference model; required by
            the reference-based losses, ignored by the reference-free ones.
        reduction: ``"mean"`` (TRL's), ``"sum"`` or ``"none"`` (``[B]`` per-pair losses; refused for
            losses whose per-pair value depends on the rest of the batch, e.g. ``aot``, KTO's batch KL,
            the batch token-mean NLL).
        loss_weights: one weight per loss when ``name`` is a list (default 1 each).
        weights: ``[B]`` per-pair weights multiplying each pair's loss (WPO; see
            :func:`expo_kernels.losses.aggregate.wpo_weights`).
        chosen_lengths, rejected_lengths: ``[B]`` completion token counts, for the length-normalised
            losses (ipo, sigmoid_norm, simpo, alphapo, orpo, cpo's ipo/simpo variants) and the NLL term.
        chosen_nll: NLL of the chosen completions overriding the default token mean
            ``-sum(chosen_logps) / sum(chosen_lengths)``; a scalar or ``[B]`` (per pair).
        offset: ODPO's per-pair offset, ``[B]`` or scalar.
        token_kl: EXPO with ``kl_estimator="token"``: per-sequence sums of the token-level
            KL(pi_ref || pi_theta), scalar, ``[B]`` (per pair) or ``[2B]`` (chosen then rejected).
        policy_logps, ref_logps, is_desirable: unpaired (KTO) form, ``[N]`` each (summed log-probs,
            True for desirable examples).
        kl_logps, ref_kl_logps: ``[K]`` policy / reference log-probs of KTO's mismatched
            (prompt, completion) pairs, for its detached KL baseline; ``kl``: a precomputed baseline.
        **hparams: the loss's hyperparameters (``LOSSES[name].hparams``), e.g. ``beta``,
            ``label_smoothing``, ``f_divergence_type``, ``f_alpha_divergence_coef``, ``discopop_tau``,
            ``gamma``, ``cpo_alpha``, ``lam``, ``kl_estimator``.

    Returns:
        A scalar for ``"mean"``/``"sum"``, else a ``[B]`` tensor, in the inputs' dtype.
    """
    loss, _ = _compute(
        name,
        chosen_logps,
        rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        reduction=reduction,
        loss_weights=loss_weights,
        weights=weights,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        chosen_nll=chosen_nll,
        offset=offset,
        token_kl=token_kl,
        policy_logps=policy_logps,
        ref_logps=ref_logps,
        is_desirable=is_desirable,
        kl_logps=kl_logps,
        ref_kl_logps=ref_kl_logps,
        kl=kl,
        hparams=hparams,
    )
    return loss


def preference_loss_and_metrics(
    name: str | Sequence[str],
    chosen_logps: Tensor | None = None,
    rejected_logps: Tensor | None = None,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, dict[str, Tensor]]:
    """:func:`preference_loss` plus its metrics: ``(loss, metrics)``.

    ``metrics`` maps TRL's names (``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
    ``rewards/margins``, ``logps/chosen``, ``logps/rejected``, and per loss ``nll_loss``, ``kl``,
    ``log_odds_ratio``, ``log_odds_chosen``, ``bt_loss``) to detached 0-d tensors: batch means, as TRL
    logs them on one process. For a list of losses, the metrics of the first loss that defines a name
    are kept, and ``loss/<name>`` holds each component's mean.
    """
    kw = dict(kwargs)
    signature = (
        "loss_weights",
        "weights",
        "chosen_lengths",
        "rejected_lengths",
        "chosen_nll",
        "offset",
        "token_kl",
        "policy_logps",
        "ref_logps",
        "is_desirable",
        "kl_logps",
        "ref_kl_logps",
        "kl",
    )
    args = {k: kw.pop(k, None) for k in signature}
    args["reduction"] = kw.pop("reduction", "mean")  # an explicit None or "" is checked, not defaulted
    loss, parts = _compute(name, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, hparams=kw, **args)
    metrics: dict[str, Tensor] = {}
    for _, _, p in parts:
        for k, v in p.metrics().items():
            metrics.setdefault(k, v)
    if len(parts) > 1:
        with torch.no_grad():
            for n, _, p in parts:
                metrics.setdefault(f"loss/{n}", p.terms.detach().mean())
    return loss, metrics

"""What the paired and the unpaired front ends share: construction-time validation, the policy and
reference passes over the LM head, the token metrics, the output dataclass."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypedDict, overload

import torch
from torch import Tensor, nn

from .._dispatch import Plan, plan_linear_logprobs
from .._validation import check_backend_name, check_bool, check_ignore_index, check_positive_finite
from ..distributed.context_parallel import check_sequence_shards, masked_means_across_ranks
from ..distributed.zero3 import zero3_gathered
from ..functional import TokenStats, head_autocast, linear_logprobs, linear_token_kl
from ..losses import LOSSES, get_loss_spec, preference_loss, preference_loss_and_metrics
from ..losses.api import check_hparams, check_loss_weights
from ..losses.registry import HParamTypeError, as_real, describe, loss_names

__all__ = [
    "PreferenceLossOutput",
    "TokenPasses",
    "FusedLinearLossBase",
    "require_rows",
    "masked_mean",
    "is_unpaired_loss",
    "positive_number",
    "LogitTransformOptions",
]


class LogitTransformOptions(TypedDict):
    """A module's logit transform as the op's keyword arguments (``linear_logprobs(..., **transform)``)."""

    temperature: float
    logit_scale: float | None
    softcap: float | None


@dataclass
class PreferenceLossOutput:
    """What :class:`FusedLinearPreferenceLoss` returns.

    loss: scalar, differentiable w.r.t. the policy's hidden states, LM-head weight and bias.
    metrics: TRL's metric names -> detached 0-d tensors (batch means; see the module docstring).
    policy_logps: ``[R]`` summed completion log-probs of every row (``ld_alpha``-weighted if set).
    ref_logps: ``[R]`` the reference's, or None when no reference pass ran.
    token_kl: ``[R]`` per-row sums of the token KL(pi_ref || pi_theta) (EXPO ``"token"``), or None.
    """

    loss: Tensor
    metrics: dict[str, Tensor]
    policy_logps: Tensor
    ref_logps: Tensor | None = None
    token_kl: Tensor | None = None


@dataclass
class TokenPasses:
    """The per-token results of one call's passes over the LM head (:meth:`FusedLinearLossBase._token_passes`).

    logp: ``[R, T]`` policy log-probs of the labels (differentiable); stats: their statistics or None.
    mask: ``[R, T]`` the completion tokens (labels != ignore_index).
    ref_tok: ``[R, T]`` reference log-probs (no graph), or None when no reference pass ran.
    token_kl_rows: ``[R]`` per-row token KL sums (EXPO ``"token"``), or None.
    ref_weight, ref_bias: the reference head of the call (the policy's, detached, when shared); None
    without reference hidden states.
    """

    logp: Tensor
    stats: TokenStats | None
    mask: Tensor
    ref_tok: Tensor | None = None
    token_kl_rows: Tensor | None = None
    ref_weight: Tensor | None = None
    ref_bias: Tensor | None = None


def require_rows(name: str, x: Any, rows: int, dims: int) -> Tensor:
    """``x`` as a tensor of ``dims`` dimensions and ``rows`` rows, else ValueError naming ``name``."""
    if not isinstance(x, Tensor):
        raise ValueError(f"`{name}` must be a torch.Tensor; got {type(x).__name__}.")
    if x.dim() != dims or x.shape[0] != rows:
        want = "[R, T, H]" if dims == 3 else ("[R, T]" if dims == 2 else "[R]")
        raise ValueError(f"`{name}` must have shape {want} with R = {rows} rows; got {tuple(x.shape)}.")
    return x


@overload
def positive_number(name: str, value: Any, allow_none: Literal[False] = False) -> float: ...


@overload
def positive_number(name: str, value: Any, allow_none: bool) -> float | None: ...


def positive_number(name: str, value: Any, allow_none: bool = False) -> float | None:
    """A finite number > 0 (None too when ``allow_none``), as a float: wrong type -> TypeError, bad
    value -> ValueError, both naming ``name``."""
    if value is None and allow_none:
        return None
    v = as_real(value)
    if v is None:
        none = "None or " if allow_none else ""
        raise HParamTypeError(f"`{name}` must be {none}a finite number > 0; got {describe(value)}.")
    check_positive_finite(name, v)
    return v


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Token mean of ``values`` over ``mask`` (0 when the mask is empty), as TRL logs it."""
    values = values.float() if values.dtype != torch.float64 else values
    total = mask.sum()
    return torch.where(mask, values, torch.zeros_like(values)).sum() / total.clamp(min=1)


def is_unpaired_loss(loss: Any) -> bool:
    """Whether ``loss`` names one registered unpaired (KTO-style) loss; False for anything else,
    invalid names included (construction reports those)."""
    try:
        names = loss_names(loss)
    except TypeError:
        return False
    return len(names) == 1 and names[0] in LOSSES and not LOSSES[names[0]].paired


class FusedLinearLossBase(nn.Module):
    """Shared part of :class:`~expo_kernels.FusedLinearPreferenceLoss` (paired losses) and
    :class:`~expo_kernels.modules.FusedLinearUnpairedLoss` (KTO-style): the constructor and its
    checks, the policy / reference / token-KL passes, the loss call, the token metrics. The
    subclasses' ``forward`` take their own inputs; the constructor's arguments are documented on
    :class:`~expo_kernels.FusedLinearPreferenceLoss`.
    """

    #: set by the presets: the loss they are a preset of.
    preset_loss: str | None = None
    #: the loss when none is named
    default_loss: str = "sigmoid"
    #: True for the paired front end, False for the unpaired one
    paired: bool = True
    #: the ``forward`` inputs of a precomputed reference, named in the "needs the reference" error
    precomputed_ref_inputs: str = "`ref_chosen_logps`/`ref_rejected_logps`"

    def __init__(
        self,
        loss: str | Sequence[str] | None = None,
        *,
        ignore_index: int = -100,
        temperature: float = 1.0,
        logit_scale: float | None = None,
        softcap: float | None = None,
        ld_alpha: float | None = None,
        use_weighting: bool = False,
        loss_weights: Sequence[float] | None = None,
        compute_metrics: bool = True,
        backend: str | None = None,
        sequence_group: Any = None,
        **hparams: Any,
    ) -> None:
        super().__init__()
        if self.preset_loss is not None:
            if loss is not None and loss != self.preset_loss:
                raise ValueError(
                    f"{type(self).__name__} is the {self.preset_loss!r} loss; use FusedLinearPreferenceLoss(loss={loss!r}) "
                    "for another one."
                )
            loss = self.preset_loss
        names = loss_names(self.default_loss if loss is None else loss)
        self.specs = [get_loss_spec(n) for n in names]
        self.loss = names[0] if len(names) == 1 else list(names)
        if len(self.specs) > 1 and any(not s.paired for s in self.specs):
            raise ValueError(
                f"The unpaired losses (kto, apo_zero_unpaired) cannot be mixed with others; got {list(names)}."
            )
        if self.specs[0].paired != type(self).paired:
            other = "FusedLinearPreferenceLoss" if self.specs[0].paired else "FusedLinearUnpairedLoss"
            raise ValueError(
                f"{type(self).__name__} computes {'paired' if type(self).paired else 'unpaired'} losses; "
                f"use {other}(loss={self.loss!r})."
            )
        check_hparams(self.specs, hparams)
        self.resolved = [s.resolve(hparams) for s in self.specs]  # range checks now, not at the first step
        # every option is checked here, by type and range, so a bad value fails at construction
        lws = check_loss_weights(loss_weights, names)
        if ld_alpha is not None:
            a = as_real(ld_alpha)
            if a is None:
                raise HParamTypeError(f"`ld_alpha` must be a number in [0, 1] or None; got {describe(ld_alpha)}.")
            if not 0.0 <= a <= 1.0:  # NaN fails this too
                raise ValueError(f"`ld_alpha` must be a number in [0, 1] or None; got {ld_alpha!r}.")
            ld_alpha = a
        check_ignore_index(ignore_index)
        temperature = positive_number("temperature", temperature)
        logit_scale = positive_number("logit_scale", logit_scale, allow_none=True)
        softcap = positive_number("softcap", softcap, allow_none=True)
        check_bool("use_weighting", use_weighting)
        check_bool("compute_metrics", compute_metrics)
        check_backend_name(backend)
        if not self.paired and (ld_alpha is not None or use_weighting):
            raise ValueError(f"`ld_alpha` and `use_weighting` are options of the paired losses, not of {self.loss!r}.")
        if use_weighting and any(s.batch_coupled for s in self.specs):
            raise ValueError(
                f"`use_weighting` (WPO) cannot be combined with {[s.name for s in self.specs if s.batch_coupled]}: "
                "they sort the batch, which would misalign the per-pair weights."
            )
        self.hparams = dict(hparams)
        self.ignore_index = int(ignore_index)
        self.transform = LogitTransformOptions(temperature=temperature, logit_scale=logit_scale, softcap=softcap)
        self.ld_alpha = None if ld_alpha is None else float(ld_alpha)
        self.use_weighting = bool(use_weighting)
        self.loss_weights = None if loss_weights is None else lws
        self.compute_metrics = bool(compute_metrics)
        self.backend = backend
        if sequence_group is not None and (ld_alpha is not None or use_weighting):
            raise ValueError(
                "`sequence_group` (context parallelism) does not support `ld_alpha` or `use_weighting`: they need "
                "each token's position in its whole completion / per-token weights across the shards."
            )
        #: context parallelism: the process group over which the sequences are sharded (None: off)
        self.sequence_group = sequence_group
        expo = [hp for s, hp in zip(self.specs, self.resolved, strict=False) if s.name == "expo"]
        self.token_kl = bool(expo) and expo[0]["kl_estimator"] == "token"
        # does the objective (not just the logged rewards) read reference log-probs?
        self.needs_ref_logps = any(s.requires_reference for s in self.specs) or any(
            hp["kl_estimator"] != "token" and hp["lam"] > 0 for hp in expo
        )
        self.reference_free = all(s.reference == "none" for s in self.specs)

    #: the keyword inputs of ``forward`` that are GEMM operands (cast under autocast, :meth:`__call__`),
    #: besides ``lm_head_weight`` and ``hidden`` (the first two inputs)
    gemm_inputs: tuple[str, ...] = ("hidden", "bias", "ref_hidden", "ref_weight", "ref_bias")

    def __call__(self, lm_head_weight: Any, *args: Any, **kwargs: Any) -> Any:
        """``forward``; DeepSpeed ZeRO-3 heads (policy, reference) are gathered once for the whole call,
        so the policy pass, the token KL and the reference pass of a shared head read one gathered
        weight (:func:`expo_kernels.distributed.zero3_gathered`). Inside ``torch.autocast`` the GEMM
        operands are then cast to the region's dtype and ``forward`` runs with autocast off
        (:func:`expo_kernels.functional.head_autocast`; docs/design.md, "Mixed precision")."""
        heads = (lm_head_weight, kwargs.get("bias"), kwargs.get("ref_weight"), kwargs.get("ref_bias"))
        if not any(hasattr(t, "ds_id") for t in heads):  # no ZeRO-3 parameter: deepspeed stays unimported
            return self._autocast_call(lm_head_weight, *args, **kwargs)
        with zero3_gathered(*heads) as (lm_head_weight, *ref_heads):
            for name, head in zip(("bias", "ref_weight", "ref_bias"), ref_heads, strict=True):
                if name in kwargs:
                    kwargs[name] = head
            return self._autocast_call(lm_head_weight, *args, **kwargs)

    def _autocast_call(self, lm_head_weight: Any, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs.get("hidden")
        ac = head_autocast(hidden)
        if ac.dtype is None:
            return super().__call__(lm_head_weight, *args, **kwargs)
        if args:
            args = (ac.cast(args[0]), *args[1:])
        kwargs = {k: ac.cast(v) if k in self.gemm_inputs else v for k, v in kwargs.items()}
        with ac.region():
            return super().__call__(ac.cast(lm_head_weight), *args, **kwargs)

    # ---------------------------------------------------------------------------------------------
    def plan_for(
        self, weight: Tensor, hidden: Tensor, bias: Tensor | None = None, labels: Tensor | None = None
    ) -> Plan:
        """The backend and execution path of this module's policy pass over the LM head for these inputs,
        and why (``_dispatch.plan``), in the current grad mode and ``kernel_options``. The paired module
        overrides it with the step's plan (the pair engine or the op's path); ``labels`` serve it there.
        Inside ``torch.autocast``, the plan of the call in the region's dtype (what ``forward`` runs)."""
        return plan_linear_logprobs(hidden, weight, bias, backend=self.backend)

    def _logps(self, hidden, weight, bias, labels, stats: bool):
        return linear_logprobs(
            hidden,
            weight,
            labels,
            bias,
            ignore_index=self.ignore_index,
            return_stats=stats,
            backend=self.backend,
            **self.transform,
        )

    def _reference_logps(self, ref_hidden, ref_weight, ref_bias, labels) -> Tensor:
        """Per-token reference log-probs, forward only: no graph, nothing saved."""
        with torch.no_grad():
            return self._logps(
                ref_hidden.detach(), ref_weight.detach(), None if ref_bias is None else ref_bias.detach(), labels, False
            )

    def _check_head_inputs(
        self,
        lm_head_weight: Tensor,
        hidden: Tensor,
        labels: Tensor,
        *,
        bias: Tensor | None,
        ref_hidden: Tensor | None,
        ref_weight: Tensor | None,
        ref_bias: Tensor | None,
        has_ref_numbers: bool,
    ) -> tuple[Tensor | None, Tensor | None]:
        """Checks the head inputs of a call; returns the reference head (the policy's when shared, None
        without reference hidden states).

        ``has_ref_numbers``: the caller passed a precomputed reference (the subclass's own inputs).
        """
        if not isinstance(labels, Tensor) or labels.dim() != 2:
            raise ValueError(
                f"`labels` must be a [R, T] integer tensor; got {getattr(labels, 'shape', type(labels).__name__)}."
            )
        rows = labels.shape[0]
        require_rows("hidden", hidden, rows, 3)
        if self.paired and rows % 2:
            raise ValueError(f"a paired batch has 2B rows (B chosen, then B rejected); `labels` has {rows} rows.")
        has_ref_tensors = ref_hidden is not None
        if has_ref_tensors and has_ref_numbers:
            raise ValueError(
                "Pass the reference either as `ref_hidden` (+ head) or as precomputed log-probs, not both."
            )
        if (ref_weight is not None or ref_bias is not None) and not has_ref_tensors:
            raise ValueError("`ref_weight`/`ref_bias` were given without `ref_hidden` (the reference hidden states).")
        if self.reference_free and (has_ref_tensors or has_ref_numbers):
            raise ValueError(
                f"Loss {self.loss!r} is reference-free: do not pass a reference (it would be computed and unused)."
            )
        if has_ref_tensors:
            ref_hidden = require_rows("ref_hidden", ref_hidden, rows, 3)
            if ref_hidden.shape[1] != hidden.shape[1]:
                raise ValueError(
                    f"`ref_hidden` must cover the same tokens as `hidden`: shape {tuple(ref_hidden.shape)} "
                    f"vs {tuple(hidden.shape)}."
                )
            if ref_weight is None:  # shared head
                ref_weight, ref_bias = lm_head_weight, bias
        if self.token_kl and not has_ref_tensors:
            raise ValueError(
                "Loss 'expo' with kl_estimator='token' needs the reference model's hidden states `ref_hidden` "
                "(and its head `ref_weight`, default: the policy head): the token KL runs over the full vocabulary."
            )
        if self.needs_ref_logps and not has_ref_tensors and not has_ref_numbers:
            raise ValueError(
                f"Loss {self.loss!r} needs the reference model: pass `ref_hidden` (its hidden states over the same "
                f"tokens, with `ref_weight` if its head differs) or precomputed {self.precomputed_ref_inputs}."
            )
        return ref_weight, ref_bias

    def _token_passes(
        self,
        lm_head_weight: Tensor,
        hidden: Tensor,
        labels: Tensor,
        *,
        bias: Tensor | None,
        ref_hidden: Tensor | None,
        ref_weight: Tensor | None,
        ref_bias: Tensor | None,
        has_ref_numbers: bool,
    ) -> TokenPasses:
        """Checks the head inputs, then the policy pass, EXPO's token KL and the reference pass."""
        ref_weight, ref_bias = self._check_head_inputs(
            lm_head_weight,
            hidden,
            labels,
            bias=bias,
            ref_hidden=ref_hidden,
            ref_weight=ref_weight,
            ref_bias=ref_bias,
            has_ref_numbers=has_ref_numbers,
        )
        has_ref_tensors = ref_hidden is not None
        logp = self._logps(hidden, lm_head_weight, bias, labels, self.compute_metrics or self.use_weighting)
        logp, stats = logp if isinstance(logp, tuple) else (logp, None)
        passes = TokenPasses(logp, stats, labels != self.ignore_index, ref_weight=ref_weight, ref_bias=ref_bias)

        if self.token_kl:
            assert ref_hidden is not None and ref_weight is not None  # checked above
            # the reference is a constant of the loss (no gradient to a shared head through this side)
            tkl = linear_token_kl(
                hidden,
                lm_head_weight,
                ref_hidden.detach(),
                ref_weight.detach(),
                labels,
                bias,
                None if ref_bias is None else ref_bias.detach(),
                ignore_index=self.ignore_index,
                backend=self.backend,
                **self.transform,
            )
            passes.token_kl_rows = tkl.sum(dim=1)  # zero at ignored positions: the per-row completion sum

        if has_ref_tensors and (self.needs_ref_logps or not self.token_kl):
            passes.ref_tok = self._reference_logps(ref_hidden, ref_weight, ref_bias, labels)
        return passes

    def _loss_and_metrics(self, *args, **kwargs):
        kwargs.update(self.hparams)
        if self.compute_metrics:
            return preference_loss_and_metrics(self.loss, *args, **kwargs)
        return preference_loss(self.loss, *args, **kwargs), {}

    def _token_metrics(self, stats: TokenStats, mask: Tensor) -> dict[str, Tensor]:
        """TRL's per-token metric of every loss: ``entropy`` (all completion tokens)."""
        (entropy,) = self._masked_means([(stats.entropy, mask)])
        return {"entropy": entropy}

    def _masked_means(self, pairs: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
        """:func:`masked_mean` of each ``(values, mask)``, over the whole sequences with a
        ``sequence_group`` (one all-reduce); no gradient."""
        if self.sequence_group is not None:
            return masked_means_across_ranks(pairs, self.sequence_group)
        with torch.no_grad():
            return [masked_mean(v, m) for v, m in pairs]

    def _check_sequence_shards(self, hidden: Any, labels: Any, flag: bool = True) -> bool:
        """With a ``sequence_group``: the shards' shapes checked on every rank alike
        (:func:`~expo_kernels.distributed.context_parallel.check_sequence_shards`); returns whether
        ``flag`` holds on every rank. Without one: ``flag``."""
        if self.sequence_group is None:
            return flag
        return check_sequence_shards(self.sequence_group, hidden, labels, paired=self.paired, flag=flag)

    def extra_repr(self) -> str:
        hp = ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())
        return f"loss={self.loss!r}" + (f", {hp}" if hp else "")

"""``nn.Module`` front end: hidden states + LM head + labels -> preference loss, never forming logits.

:class:`FusedLinearPreferenceLoss` ties the layers together for one training step:

1. policy pass: :func:`~expo_kernels.linear_logprobs` over all rows (with the per-token statistics
   the metrics and WPO need), differentiable w.r.t. hidden, weight and bias;
2. reference pass: the same op under ``torch.no_grad`` (nothing saved for backward), or the
   caller's precomputed reference log-probs; for EXPO's ``kl_estimator="token"`` instead the fused
   two-head :func:`~expo_kernels.linear_token_kl` (policy and reference head over the same tokens);
3. per-token -> per-sequence (:func:`~expo_kernels.losses.aggregate_pair_logps`: sums, lengths,
   LD-DPO's ``ld_alpha``, the chosen NLL, WPO weights);
4. the registered loss (:func:`~expo_kernels.losses.preference_loss_and_metrics`).

Row layout is TRL's: a paired batch has ``R = 2B`` rows, the ``B`` chosen sequences first, then the
``B`` rejected ones in the same order. ``labels[r, t]`` is the token predicted from ``hidden[r, t]``
(already shifted) and ``ignore_index`` on prompt and padding positions, so only completion tokens
count. Unpaired losses (KTO) take one row per example and ``is_desirable``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import _validation as V
from .functional import linear_logprobs, linear_token_kl
from .losses import aggregate_pair_logps, get_loss_spec, preference_loss, preference_loss_and_metrics, sequence_logps
from .losses.api import _check_hparams, check_loss_weights
from .losses.registry import HParamTypeError, _names, as_real, describe

__all__ = [
    "PreferenceLossOutput",
    "FusedLinearPreferenceLoss",
    "FusedLinearDPOLoss",
    "FusedLinearEXPOLoss",
    "FusedLinearSimPOLoss",
    "FusedLinearORPOLoss",
    "FusedLinearKTOLoss",
]


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
    metrics: Dict[str, Tensor]
    policy_logps: Tensor
    ref_logps: Optional[Tensor] = None
    token_kl: Optional[Tensor] = None


def _require_rows(name: str, x: Any, rows: int, dims: int) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"`{name}` must be a torch.Tensor; got {type(x).__name__}.")
    if x.dim() != dims or x.shape[0] != rows:
        want = "[R, T, H]" if dims == 3 else ("[R, T]" if dims == 2 else "[R]")
        raise ValueError(f"`{name}` must have shape {want} with R = {rows} rows; got {tuple(x.shape)}.")
    return x


def _positive_number(name: str, value: Any, allow_none: bool = False) -> Optional[float]:
    """A finite number > 0 (None too when ``allow_none``), as a float: wrong type -> TypeError, bad
    value -> ValueError, both naming ``name``."""
    if value is None and allow_none:
        return None
    v = as_real(value)
    if v is None:
        none = "None or " if allow_none else ""
        raise HParamTypeError(f"`{name}` must be {none}a finite number > 0; got {describe(value)}.")
    V.check_positive_finite(name, v)
    return v


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Token mean of ``values`` over ``mask`` (0 when the mask is empty), as TRL logs it."""
    values = values.float() if values.dtype != torch.float64 else values
    total = mask.sum()
    return torch.where(mask, values, torch.zeros_like(values)).sum() / total.clamp(min=1)


class FusedLinearPreferenceLoss(nn.Module):
    """A registered preference loss computed from hidden states and the LM head.

    Args:
        loss: a name of :data:`expo_kernels.LOSSES` (``"sigmoid"`` = DPO, ``"ipo"``, ``"expo"``,
            ``"simpo"``, ``"kto"``, ...) or a list of names mixed with ``loss_weights`` (MPO).
        ignore_index: label value of positions that do not count (prompt, padding).
        temperature, logit_scale, softcap: the logit transform of both heads (see
            :func:`~expo_kernels.linear_logprobs`); ``softcap`` is Gemma 2's ``final_logit_softcapping``.
        ld_alpha: LD-DPO's weight in [0, 1] of the tokens past the shorter completion of each pair.
        use_weighting: WPO pair weights from the policy's ``log sum_v p_v^2`` (detached).
        loss_weights: one weight per loss when ``loss`` is a list.
        compute_metrics: compute the metrics dict (costs the statistics of the policy pass); when
            False, ``metrics`` is empty.
        backend: kernel backend (``"triton"``, ``"native"``, ``"torch"``); default from the device.
        **hparams: the loss's hyperparameters (``beta``, ``label_smoothing``, ``lam``, ``kl_estimator``,
            ``gamma``, ...), validated here so a bad value fails at construction.
    """

    #: set by the presets: the loss they are a preset of.
    preset_loss: Optional[str] = None

    def __init__(
        self,
        loss: Optional[Union[str, Sequence[str]]] = None,
        *,
        ignore_index: int = -100,
        temperature: float = 1.0,
        logit_scale: Optional[float] = None,
        softcap: Optional[float] = None,
        ld_alpha: Optional[float] = None,
        use_weighting: bool = False,
        loss_weights: Optional[Sequence[float]] = None,
        compute_metrics: bool = True,
        backend: Optional[str] = None,
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
        names = _names("sigmoid" if loss is None else loss)
        self.specs = [get_loss_spec(n) for n in names]
        self.loss = names[0] if len(names) == 1 else list(names)
        if len(self.specs) > 1 and any(not s.paired for s in self.specs):
            raise ValueError(f"The unpaired losses (kto, apo_zero_unpaired) cannot be mixed with others; got {list(names)}.")
        _check_hparams(self.specs, hparams)
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
        V.check_ignore_index(ignore_index)
        temperature = _positive_number("temperature", temperature)
        logit_scale = _positive_number("logit_scale", logit_scale, allow_none=True)
        softcap = _positive_number("softcap", softcap, allow_none=True)
        V.check_bool("use_weighting", use_weighting)
        V.check_bool("compute_metrics", compute_metrics)
        V.check_backend_name(backend)
        self.paired = self.specs[0].paired
        if not self.paired and (ld_alpha is not None or use_weighting):
            raise ValueError(f"`ld_alpha` and `use_weighting` are options of the paired losses, not of {self.loss!r}.")
        if use_weighting and any(s.batch_coupled for s in self.specs):
            raise ValueError(f"`use_weighting` (WPO) cannot be combined with {[s.name for s in self.specs if s.batch_coupled]}: "
                             "they sort the batch, which would misalign the per-pair weights.")
        self.hparams = dict(hparams)
        self.ignore_index = int(ignore_index)
        self.transform = dict(temperature=temperature, logit_scale=logit_scale, softcap=softcap)
        self.ld_alpha = None if ld_alpha is None else float(ld_alpha)
        self.use_weighting = bool(use_weighting)
        self.loss_weights = None if loss_weights is None else lws
        self.compute_metrics = bool(compute_metrics)
        self.backend = backend
        expo = [hp for s, hp in zip(self.specs, self.resolved) if s.name == "expo"]
        self.token_kl = bool(expo) and expo[0]["kl_estimator"] == "token"
        # does the objective (not just the logged rewards) read reference log-probs?
        self.needs_ref_logps = any(s.requires_reference for s in self.specs) or any(
            hp["kl_estimator"] != "token" and hp["lam"] > 0 for hp in expo
        )
        self.reference_free = all(s.reference == "none" for s in self.specs)

    # ---------------------------------------------------------------------------------------------
    def _logps(self, hidden, weight, bias, labels, stats: bool):
        return linear_logprobs(hidden, weight, labels, bias, ignore_index=self.ignore_index,
                               return_stats=stats, backend=self.backend, **self.transform)

    def _reference_logps(self, ref_hidden, ref_weight, ref_bias, labels) -> Tensor:
        """Per-token reference log-probs, forward only: no graph, nothing saved."""
        with torch.no_grad():
            return self._logps(ref_hidden.detach(), ref_weight.detach(),
                               None if ref_bias is None else ref_bias.detach(), labels, False)

    def forward(
        self,
        lm_head_weight: Tensor,
        hidden: Tensor,
        labels: Tensor,
        *,
        bias: Optional[Tensor] = None,
        ref_hidden: Optional[Tensor] = None,
        ref_weight: Optional[Tensor] = None,
        ref_bias: Optional[Tensor] = None,
        ref_chosen_logps: Optional[Tensor] = None,
        ref_rejected_logps: Optional[Tensor] = None,
        ref_logps: Optional[Tensor] = None,
        is_desirable: Optional[Tensor] = None,
        kl_hidden: Optional[Tensor] = None,
        kl_labels: Optional[Tensor] = None,
        ref_kl_hidden: Optional[Tensor] = None,
        kl: Optional[Union[Tensor, float]] = None,
        offset: Optional[Union[Tensor, float]] = None,
    ) -> PreferenceLossOutput:
        """One step's loss.

        Args:
            lm_head_weight: ``[V, H]`` policy LM head (trainable or frozen).
            hidden: ``[R, T, H]`` policy final hidden states (after the final norm), R = 2B rows
                chosen-then-rejected for paired losses, one row per example for KTO.
            labels: ``[R, T]`` next-token ids aligned with ``hidden``; ``ignore_index`` off the completion.
            bias: optional ``[V]`` policy head bias.
            ref_hidden: ``[R, T, Hr]`` reference model's hidden states over the same tokens.
            ref_weight, ref_bias: reference head ``[V, Hr]`` / ``[V]``; when ``ref_weight`` is None the
                reference shares the policy head (weight and bias, detached): LoRA with a frozen head.
            ref_chosen_logps, ref_rejected_logps: ``[B]`` precomputed reference sequence log-probs
                (paired losses), instead of ``ref_hidden``. ``ref_logps``: ``[R]`` the same for KTO.
            is_desirable: ``[R]`` bool, KTO's labels.
            kl_hidden, kl_labels, ref_kl_hidden: KTO's mismatched (prompt, completion) rows
                ``[K, T', H]`` / ``[K, T']`` / ``[K, T', Hr]`` for its detached KL baseline (forward only);
                or ``kl``: a precomputed baseline (0 turns it off).
            offset: ODPO's per-pair offset, ``[B]`` or scalar.
        """
        if not isinstance(labels, Tensor) or labels.dim() != 2:
            raise ValueError(f"`labels` must be a [R, T] integer tensor; got {getattr(labels, 'shape', type(labels).__name__)}.")
        rows = labels.shape[0]
        _require_rows("hidden", hidden, rows, 3)
        if self.paired and rows % 2:
            raise ValueError(f"a paired batch has 2B rows (B chosen, then B rejected); `labels` has {rows} rows.")
        has_ref_tensors = ref_hidden is not None
        has_ref_numbers = ref_chosen_logps is not None or ref_rejected_logps is not None or ref_logps is not None
        if has_ref_tensors and has_ref_numbers:
            raise ValueError("Pass the reference either as `ref_hidden` (+ head) or as precomputed log-probs, not both.")
        if (ref_weight is not None or ref_bias is not None) and not has_ref_tensors:
            raise ValueError("`ref_weight`/`ref_bias` were given without `ref_hidden` (the reference hidden states).")
        if self.reference_free and (has_ref_tensors or has_ref_numbers):
            raise ValueError(f"Loss {self.loss!r} is reference-free: do not pass a reference (it would be computed and unused).")
        if has_ref_tensors:
            _require_rows("ref_hidden", ref_hidden, rows, 3)
            if ref_hidden.shape[1] != hidden.shape[1]:
                raise ValueError(f"`ref_hidden` must cover the same tokens as `hidden`: shape {tuple(ref_hidden.shape)} "
                                 f"vs {tuple(hidden.shape)}.")
            if ref_weight is None:  # shared head
                ref_weight, ref_bias = lm_head_weight, bias

        logp = self._logps(hidden, lm_head_weight, bias, labels, self.compute_metrics or self.use_weighting)
        logp, stats = (logp if isinstance(logp, tuple) else (logp, None))
        mask = labels != self.ignore_index

        token_kl_rows = None
        if self.token_kl:
            if not has_ref_tensors:
                raise ValueError(
                    "Loss 'expo' with kl_estimator='token' needs the reference model's hidden states `ref_hidden` "
                    "(and its head `ref_weight`, default: the policy head): the token KL runs over the full vocabulary."
                )
            # the reference is a constant of the loss (no gradient to a shared head through this side)
            tkl = linear_token_kl(hidden, lm_head_weight, ref_hidden.detach(), ref_weight.detach(), labels, bias,
                                  None if ref_bias is None else ref_bias.detach(),
                                  ignore_index=self.ignore_index, backend=self.backend, **self.transform)
            token_kl_rows = tkl.sum(dim=1)  # zero at ignored positions: the per-row completion sum

        ref_tok = None
        if has_ref_tensors and (self.needs_ref_logps or not self.token_kl):
            ref_tok = self._reference_logps(ref_hidden, ref_weight, ref_bias, labels)
        elif self.needs_ref_logps and not has_ref_numbers:
            raise ValueError(
                f"Loss {self.loss!r} needs the reference model: pass `ref_hidden` (its hidden states over the same "
                "tokens, with `ref_weight` if its head differs) or precomputed `ref_chosen_logps`/`ref_rejected_logps`."
            )

        if self.paired:
            return self._paired(logp, stats, mask, ref_tok, ref_chosen_logps, ref_rejected_logps, ref_logps,
                                token_kl_rows, offset, is_desirable, kl_hidden, kl)
        return self._unpaired(logp, stats, mask, labels, ref_tok, ref_logps, ref_chosen_logps, ref_rejected_logps,
                              is_desirable, kl_hidden, kl_labels, ref_kl_hidden, kl, lm_head_weight, bias,
                              ref_hidden, ref_weight, ref_bias, offset)

    # ---------------------------------------------------------------------------------------------
    def _paired(self, logp, stats, mask, ref_tok, ref_chosen_logps, ref_rejected_logps, ref_logps, token_kl_rows,
                offset, is_desirable, kl_hidden, kl) -> PreferenceLossOutput:
        for name, value in (("ref_logps", ref_logps), ("is_desirable", is_desirable), ("kl_hidden", kl_hidden),
                            ("kl", kl)):
            if value is not None:
                raise ValueError(f"`{name}` is an input of the unpaired losses (KTO), not of {self.loss!r}.")
        pol = aggregate_pair_logps(logp, mask, ld_alpha=self.ld_alpha,
                                   log_sum_p2=stats.log_sum_p2 if self.use_weighting else None)
        ref_c = ref_r = ref_rows = None
        if ref_tok is not None:
            ref = aggregate_pair_logps(ref_tok, mask, ld_alpha=self.ld_alpha)
            ref_c, ref_r = ref.chosen_logps, ref.rejected_logps
            ref_rows = torch.cat([ref_c, ref_r])
        elif ref_chosen_logps is not None or ref_rejected_logps is not None:
            ref_c, ref_r = ref_chosen_logps, ref_rejected_logps
        loss, metrics = self._loss_and_metrics(
            pol.chosen_logps, pol.rejected_logps, ref_c, ref_r,
            chosen_lengths=pol.chosen_lengths, rejected_lengths=pol.rejected_lengths,
            chosen_nll=pol.chosen_nll if any(s.needs_nll for s in self.specs) else None,
            weights=pol.weights, token_kl=token_kl_rows, offset=offset, loss_weights=self.loss_weights,
        )
        if self.compute_metrics:
            metrics.update(self._token_metrics(stats, mask, paired=True))
        return PreferenceLossOutput(loss, metrics, torch.cat([pol.chosen_logps, pol.rejected_logps]), ref_rows,
                                    token_kl_rows)

    def _unpaired(self, logp, stats, mask, labels, ref_tok, ref_logps, ref_chosen_logps, ref_rejected_logps,
                  is_desirable, kl_hidden, kl_labels, ref_kl_hidden, kl, weight, bias, ref_hidden, ref_weight,
                  ref_bias, offset) -> PreferenceLossOutput:
        rows = labels.shape[0]
        for name, value in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps),
                            ("offset", offset)):
            if value is not None:
                raise ValueError(f"`{name}` is an input of the paired losses; {self.loss!r} takes one row per example "
                                 "(use `ref_logps` [R] for precomputed reference log-probs).")
        if is_desirable is None:
            raise ValueError(f"Loss {self.loss!r} needs `is_desirable`: [R] bool, True for desirable examples.")
        is_desirable = _require_rows("is_desirable", torch.as_tensor(is_desirable, device=labels.device), rows, 1)
        pol, _ = sequence_logps(logp, mask)
        if ref_tok is not None:
            ref, _ = sequence_logps(ref_tok, mask)
        else:
            ref = _require_rows("ref_logps", ref_logps, rows, 1)
        kl_logps = ref_kl_logps = None
        if kl_hidden is not None:
            if kl is not None:
                raise ValueError("Pass either `kl` or `kl_hidden`/`kl_labels`, not both.")
            if kl_labels is None:
                raise ValueError("`kl_hidden` needs `kl_labels` ([K, T'], the mismatched completions' labels).")
            if ref_kl_hidden is None:
                raise ValueError("`kl_hidden` needs `ref_kl_hidden`: the reference model's hidden states of the same rows.")
            kmask = kl_labels != self.ignore_index
            with torch.no_grad():  # z0 is a detached baseline: no graph for the mismatched rows
                kl_tok = self._logps(kl_hidden.detach(), weight.detach(), None if bias is None else bias.detach(),
                                     kl_labels, False)
                ref_kl_tok = self._reference_logps(ref_kl_hidden, ref_weight if ref_weight is not None else weight,
                                                   ref_bias if ref_weight is not None else bias, kl_labels)
            kl_logps, ref_kl_logps = sequence_logps(kl_tok, kmask)[0], sequence_logps(ref_kl_tok, kmask)[0]
        loss, metrics = self._loss_and_metrics(
            policy_logps=pol, ref_logps=ref, is_desirable=is_desirable,
            kl_logps=kl_logps, ref_kl_logps=ref_kl_logps, kl=kl,
        )
        if self.compute_metrics:
            metrics.update(self._token_metrics(stats, mask, paired=False))
        return PreferenceLossOutput(loss, metrics, pol, ref)

    def _loss_and_metrics(self, *args, **kwargs):
        kwargs.update(self.hparams)
        if self.compute_metrics:
            return preference_loss_and_metrics(self.loss, *args, **kwargs)
        return preference_loss(self.loss, *args, **kwargs), {}

    @staticmethod
    def _token_metrics(stats, mask: Tensor, paired: bool) -> Dict[str, Tensor]:
        """TRL's per-token metrics: ``entropy`` (all completion tokens), ``logits/chosen`` and
        ``logits/rejected`` (token means of the per-token mean logit), ``mean_token_accuracy``
        (argmax hits on the chosen completions)."""
        with torch.no_grad():
            out = {"entropy": _masked_mean(stats.entropy, mask)}
            if paired:
                mc, mr = mask.chunk(2, dim=0)
                lc, lr = stats.mean_logit.chunk(2, dim=0)
                out["logits/chosen"] = _masked_mean(lc, mc)
                out["logits/rejected"] = _masked_mean(lr, mr)
                out["mean_token_accuracy"] = _masked_mean(stats.is_top1.chunk(2, dim=0)[0].to(lc.dtype), mc)
            return out

    def extra_repr(self) -> str:
        hp = ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())
        return f"loss={self.loss!r}" + (f", {hp}" if hp else "")


# -------------------------------------------------------------------------------------------------
# Presets: the same module with the loss fixed.
# -------------------------------------------------------------------------------------------------
class FusedLinearDPOLoss(FusedLinearPreferenceLoss):
    """DPO (``loss="sigmoid"``): ``-log sigma(beta m)``; takes ``beta``, ``label_smoothing``, ..."""

    preset_loss = "sigmoid"


class FusedLinearEXPOLoss(FusedLinearPreferenceLoss):
    """EXPO: ``softplus(-(c - r)) + lam * KL(pi_ref || pi_theta)``; takes ``lam``, ``kl_estimator``."""

    preset_loss = "expo"


class FusedLinearSimPOLoss(FusedLinearPreferenceLoss):
    """SimPO, reference-free: ``-log sigma(beta (c/|y_c| - r/|y_r|) - gamma)``; takes ``beta``, ``gamma``."""

    preset_loss = "simpo"


class FusedLinearORPOLoss(FusedLinearPreferenceLoss):
    """ORPO, reference-free: ``NLL(chosen) - beta log sigma(log-odds ratio)``; takes ``beta``."""

    preset_loss = "orpo"


class FusedLinearKTOLoss(FusedLinearPreferenceLoss):
    """KTO, unpaired: one row per example with ``is_desirable``; takes ``beta`` and the class weights."""

    preset_loss = "kto"

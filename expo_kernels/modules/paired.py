"""Paired preference losses (DPO and its family, EXPO, SimPO, ORPO, ...): :class:`FusedLinearPreferenceLoss`
and its presets.

A paired batch has ``R = 2B`` rows, the ``B`` chosen sequences first, then the ``B`` rejected ones in
the same order (TRL's layout).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import TypedDict

import torch
from torch import Tensor

from .._dispatch import (
    PAIR_PATHS,
    LongPairGrads,
    Path,
    Plan,
    cast_dtype,
    pair_path,
    plan_linear_logprobs,
    plan_pair_step,
)
from .._validation import check_linear_head
from ..distributed.context_parallel import max_across_ranks, sum_across_ranks
from ..engine import (
    PairPlan,
    attach_gradients,
    chunk_tokens,
    eager_region,
    forward_logps,
    pair_chunks,
    plan_pairs,
    run_pair_step,
    tracing_fullgraph,
)
from ..functional import TokenStats
from ..losses import aggregate_pair_logps, preference_loss
from ..losses.aggregate import PairedLogps
from ..ops.common import LogitTransform
from ..ops.options import get_kernel_options, kernel_options
from ._base import FusedLinearLossBase, PreferenceLossOutput, is_unpaired_loss
from .unpaired import FusedLinearUnpairedLoss

__all__ = [
    "FusedLinearPreferenceLoss",
    "FusedLinearDPOLoss",
    "FusedLinearEXPOLoss",
    "FusedLinearSimPOLoss",
    "FusedLinearORPOLoss",
]


class FusedLinearPreferenceLoss(FusedLinearLossBase):
    """A registered preference loss computed from hidden states and the LM head.

    ``FusedLinearPreferenceLoss("kto", ...)`` (any unpaired loss) constructs and returns a
    :class:`~expo_kernels.modules.FusedLinearUnpairedLoss`, whose ``forward`` takes the unpaired inputs.

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
        sequence_group: context parallelism: the ``torch.distributed`` process group over which every
            sequence is sharded along ``T`` (each rank passes its contiguous slice of ``hidden``/``labels``,
            the same rows). The per-sequence sums, token counts and metric sums are all-reduced over it
            (``O(R)`` numbers), so every rank gets the same loss and metrics and the exact gradient of its
            own hidden slice; the head's gradient on each rank is its tokens' share: SUM-reduce it over the
            group (:mod:`expo_kernels.distributed.context_parallel`). Not with ``ld_alpha``/``use_weighting``.
        **hparams: the loss's hyperparameters (``beta``, ``label_smoothing``, ``lam``, ``kl_estimator``,
            ``gamma``, ...), validated here so a bad value fails at construction.
    """

    def __new__(cls, loss=None, *args, **kwargs):
        if cls is FusedLinearPreferenceLoss and is_unpaired_loss(loss):
            return FusedLinearUnpairedLoss(loss, *args, **kwargs)  # not an instance of cls: no second __init__
        return super().__new__(cls)

    def forward(
        self,
        lm_head_weight: Tensor,
        hidden: Tensor,
        labels: Tensor,
        *,
        bias: Tensor | None = None,
        ref_hidden: Tensor | None = None,
        ref_weight: Tensor | None = None,
        ref_bias: Tensor | None = None,
        ref_chosen_logps: Tensor | None = None,
        ref_rejected_logps: Tensor | None = None,
        offset: Tensor | float | None = None,
    ) -> PreferenceLossOutput:
        """One step's loss.

        Args:
            lm_head_weight: ``[V, H]`` policy LM head (trainable or frozen).
            hidden: ``[R, T, H]`` policy final hidden states (after the final norm), R = 2B rows,
                chosen then rejected.
            labels: ``[R, T]`` next-token ids aligned with ``hidden``; ``ignore_index`` off the completion.
            bias: optional ``[V]`` policy head bias.
            ref_hidden: ``[R, T, Hr]`` reference model's hidden states over the same tokens.
            ref_weight, ref_bias: reference head ``[V, Hr]`` / ``[V]``; when ``ref_weight`` is None the
                reference shares the policy head (weight and bias, detached): LoRA with a frozen head.
            ref_chosen_logps, ref_rejected_logps: ``[B]`` precomputed reference sequence log-probs,
                instead of ``ref_hidden``.
            offset: ODPO's per-pair offset, ``[B]`` or scalar.
        """
        step = self.plan_for(lm_head_weight, hidden, bias)
        # context parallelism: the shards checked, and one path for every rank (their collectives pair up)
        if self._check_sequence_shards(hidden, labels, step.path in PAIR_PATHS):
            # host-driven: under torch.compile, one eager region the graph breaks around (engine.eager_region)
            out = _engine_forward_eager(
                self,
                step.backend,
                lm_head_weight,
                hidden,
                labels,
                bias=bias,
                ref_hidden=ref_hidden,
                ref_weight=ref_weight,
                ref_bias=ref_bias,
                ref_chosen_logps=ref_chosen_logps,
                ref_rejected_logps=ref_rejected_logps,
                offset=offset,
            )
            if out is not None:
                return out
        # no pair (the engine returned None): the op's path, planned without a forced pair path (the step's,
        # which the op's plan refuses), so the batch gets its own error ("needs at least one pair")
        forced_pair = get_kernel_options().path in PAIR_PATHS
        with kernel_options(path=None) if forced_pair else contextlib.nullcontext():
            passes = self._token_passes(
                lm_head_weight,
                hidden,
                labels,
                bias=bias,
                ref_hidden=ref_hidden,
                ref_weight=ref_weight,
                ref_bias=ref_bias,
                has_ref_numbers=ref_chosen_logps is not None or ref_rejected_logps is not None,
            )
        stats = passes.stats
        loss, metrics, pol, ref_rows = self._pair_loss(
            passes.logp,
            passes.mask,
            None if stats is None else stats.log_sum_p2,
            passes.ref_tok,
            ref_chosen_logps,
            ref_rejected_logps,
            offset,
            passes.token_kl_rows,
            metrics=True,
        )
        if self.compute_metrics:
            assert stats is not None  # the policy pass returns its statistics with compute_metrics
            metrics.update(self._token_metrics(stats, passes.mask))
        return PreferenceLossOutput(
            loss, metrics, torch.cat([pol.chosen_logps, pol.rejected_logps]), ref_rows, passes.token_kl_rows
        )

    def _pair_loss(
        self,
        logp: Tensor,
        mask: Tensor,
        log_sum_p2: Tensor | None,
        ref_tok: Tensor | None,
        ref_chosen_logps: Tensor | None,
        ref_rejected_logps: Tensor | None,
        offset: Tensor | float | None,
        token_kl_rows: Tensor | None,
        *,
        metrics: bool,
    ):
        """``(loss, metrics, policy PairedLogps, reference rows [R] | None)`` of per-token log-probs."""
        pol = aggregate_pair_logps(
            logp, mask, ld_alpha=self.ld_alpha, log_sum_p2=log_sum_p2 if self.use_weighting else None
        )
        ref_c, ref_r, ref_rows = ref_chosen_logps, ref_rejected_logps, None
        if ref_tok is not None:
            ref = aggregate_pair_logps(ref_tok, mask, ld_alpha=self.ld_alpha)
            ref_c, ref_r = ref.chosen_logps, ref.rejected_logps
        if self.sequence_group is not None:
            pol, ref_c, ref_r, token_kl_rows = _sum_over_shards(
                pol, ref_c if ref_tok is not None else None, ref_r if ref_tok is not None else None, token_kl_rows, self
            )
            if ref_tok is None:
                ref_c, ref_r = ref_chosen_logps, ref_rejected_logps  # precomputed: whole-sequence numbers already
        if ref_tok is not None:
            assert ref_c is not None and ref_r is not None
            ref_rows = torch.cat([ref_c, ref_r])
        args = (pol.chosen_logps, pol.rejected_logps, ref_c, ref_r)
        kwargs = _PairLossKwargs(
            chosen_lengths=pol.chosen_lengths,
            rejected_lengths=pol.rejected_lengths,
            chosen_nll=pol.chosen_nll if any(s.needs_nll for s in self.specs) else None,
            weights=pol.weights,
            token_kl=token_kl_rows,
            offset=offset,
            loss_weights=self.loss_weights,
        )
        if metrics:
            loss, out = self._loss_and_metrics(*args, **kwargs)
        else:
            loss, out = preference_loss(self.loss, *args, **kwargs, **self.hparams), {}
        # the sums are float64 (losses.aggregate: exact margins at any length) and stay so (fed back as
        # ref_chosen_logps they keep their precision); the loss and metrics keep the per-token dtype
        dt = logp.dtype
        out = {k: v.to(dt) if v.is_floating_point() else v for k, v in out.items()}
        return loss.to(dt), out, pol, ref_rows

    # ---------------------------------------------------------------------------------------------
    # the chunked engine (expo_kernels.engine): no logit recompute for pair-separable losses
    # ---------------------------------------------------------------------------------------------
    def plan_for(
        self, weight: Tensor, hidden: Tensor, bias: Tensor | None = None, labels: Tensor | None = None
    ) -> Plan:
        """The backend and execution path ``forward(weight, hidden, labels, bias=bias)`` takes, and why
        (``_dispatch.plan_pair_step``: the pair engine, or the op's path for the policy pass), in the
        current grad mode and ``kernel_options``. With ``labels`` the longest pair is counted (one device
        sync) to tell ``Path.PAIR_ENGINE`` from ``Path.LONG_PAIR_CHUNKS``; without, the plan says the
        engine and its reason the workspace's pair size."""
        tensors = [t for t in (weight, hidden, bias) if t is not None]
        if (
            not all(isinstance(t, Tensor) for t in tensors)
            or len({cast_dtype(t) for t in tensors}) != 1  # the dtypes forward computes in (autocast)
            or len({t.device for t in tensors}) != 1
            or weight.dim() != 2
            or hidden.dim() < 1
        ):
            return Plan(str(self.backend), Path.FUSED, "inputs the op's checks reject: the op's path raises")
        if tracing_fullgraph():
            # the pair engine is host-driven and runs outside the graph: no graph break is allowed here
            forced = get_kernel_options().path
            if forced is not None and forced in PAIR_PATHS:
                raise RuntimeError(
                    f"{type(self).__name__}: kernel_options(path={forced.value!r}) forces the pair "
                    "engine, which torch.compile(fullgraph=True) cannot capture (its chunk plan is read on the host); "
                    "drop the forced path (under fullgraph=True the module takes the op's path, linear_logprobs) "
                    "or compile without fullgraph=True"
                )
            op = plan_linear_logprobs(hidden, weight, bias, backend=self.backend)
            return Plan(
                op.backend, op.path, f"the op's path (torch.compile(fullgraph=True): no pair engine); {op.reason}"
            )
        coupled = [s.name for s in self.specs if s.batch_coupled]
        if self.token_kl:
            not_separable: str | None = "EXPO's token KL (two heads per chunk)"
        elif coupled:
            not_separable = f"batch-coupled loss {coupled}"
        else:
            not_separable = None
        longest = None
        if isinstance(labels, Tensor) and labels.dim() == 2 and labels.shape[0] % 2 == 0 and labels.shape[0] > 0:
            counts = (labels != self.ignore_index).sum(dim=1)
            b = labels.shape[0] // 2
            longest = int((counts[:b] + counts[b:]).max())
        return plan_pair_step(
            hidden.device,
            cast_dtype(hidden),
            tokens=math.prod(hidden.shape[:-1]),
            vocab=weight.shape[0],
            needs_grad=torch.is_grad_enabled() and any(t.requires_grad for t in tensors),
            backend=self.backend,
            not_separable=not_separable,
            max_pair_tokens=longest,
            long_pair=LongPairGrads(
                weight.shape[-1],
                max(1, math.prod(hidden.shape[:-2]) // 2) if hidden.dim() >= 3 else 1,
                weight.requires_grad,
                bias is not None and bias.requires_grad,
                self.ld_alpha is None,
            ),
        )

    def _logit_transform(self) -> LogitTransform:
        t = self.transform
        return LogitTransform(
            1.0 if t["logit_scale"] is None else float(t["logit_scale"]),
            None if t["softcap"] is None else float(t["softcap"]),
            float(t["temperature"]),
        )

    def _engine_forward(
        self,
        backend: str,
        weight: Tensor,
        hidden: Tensor,
        labels: Tensor,
        *,
        bias: Tensor | None,
        ref_hidden: Tensor | None,
        ref_weight: Tensor | None,
        ref_bias: Tensor | None,
        ref_chosen_logps: Tensor | None,
        ref_rejected_logps: Tensor | None,
        offset: Tensor | float | None,
    ) -> PreferenceLossOutput | None:
        """The step through the engine (``Path.PAIR_ENGINE``, or ``LONG_PAIR_CHUNKS`` for a pair longer than
        the workspace); None without a pair (the op's path then gives its errors)."""
        has_ref_numbers = ref_chosen_logps is not None or ref_rejected_logps is not None
        ref_weight, ref_bias = self._check_head_inputs(
            weight,
            hidden,
            labels,
            bias=bias,
            ref_hidden=ref_hidden,
            ref_weight=ref_weight,
            ref_bias=ref_bias,
            has_ref_numbers=has_ref_numbers,
        )
        check_linear_head(hidden, weight, labels, bias)
        # A reference through the policy's own head (LoRA, or the adapter-off model) shares each chunk's
        # GEMM with the policy rows when both fit the workspace: one read of the head, a taller GEMM.
        stacked = ref_hidden is not None and _same_head(weight, bias, ref_weight, ref_bias, hidden, ref_hidden)
        plan = self._plan_pairs(labels, weight.shape[0], hidden.dtype, stacked=stacked)
        if stacked and plan is not None and plan.chunks is None:
            stacked = False
            plan = self._plan_pairs(labels, weight.shape[0], hidden.dtype, counts_of=plan)
        if plan is None:
            return None  # before the reference pass: the op's path runs its own
        longest = int(plan.pair_tokens.max()) if plan.pair_tokens.numel() else 0
        # the path: _dispatch.pair_path (a forced PAIR_ENGINE whose longest pair does not fit raises there)
        if pair_path(longest, plan.budget_tokens) is Path.LONG_PAIR_CHUNKS:
            if stacked:  # token chunks hold one model's rows
                stacked = False
                plan = self._plan_pairs(labels, weight.shape[0], hidden.dtype, counts_of=plan)
                assert plan is not None
            if plan.chunks is not None:  # forced: token chunks although the pairs fit
                plan = dataclasses.replace(plan, chunks=None)
        mask = labels != self.ignore_index
        transform = self._logit_transform()
        ref_tok = None
        if stacked:
            assert ref_hidden is not None
            check_linear_head(ref_hidden, weight, labels, bias, prefix="ref_")
        elif ref_hidden is not None:
            ref_head = [t for t in (ref_hidden, ref_weight, ref_bias) if t is not None]
            if all(t.dtype == hidden.dtype and t.device == hidden.device for t in ref_head):
                # the reference pass through the engine's large GEMMs too
                assert ref_weight is not None  # _check_head_inputs: the policy's head when none was given
                check_linear_head(ref_hidden, ref_weight, labels, ref_bias, prefix="ref_")
                ref_tok = forward_logps(
                    ref_hidden,
                    ref_weight,
                    ref_bias,
                    labels,
                    ignore_index=self.ignore_index,
                    transform=transform,
                    backend=backend,
                    plan=plan,  # its counted tokens: no second count of the labels
                )
            else:
                # the op's path (a forced pair path is this step's, not the reference pass's)
                forced_pair = get_kernel_options().path in PAIR_PATHS
                with kernel_options(path=None) if forced_pair else contextlib.nullcontext():
                    ref_tok = self._reference_logps(ref_hidden, ref_weight, ref_bias, labels)

        def loss_of_tokens(logp: Tensor, log_sum_p2: Tensor | None, ref_chunk: Tensor | None) -> Tensor:
            ref = ref_chunk if stacked else None if ref_tok is None else ref_tok.to(logp.dtype)
            return self._pair_loss(
                logp, mask, log_sum_p2, ref, ref_chosen_logps, ref_rejected_logps, offset, None, metrics=False
            )[0]

        step = run_pair_step(
            hidden,
            weight,
            bias,
            labels,
            ignore_index=self.ignore_index,
            transform=transform,
            with_stats=self.compute_metrics or self.use_weighting,
            loss_of_tokens=loss_of_tokens,
            backend=backend,
            need=(hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad),
            plan=plan,
            ref_hidden=ref_hidden if stacked else None,
            # dL/dlogp: one number per row (ld_alpha weighs the tail less). With a sequence_group, a pair longer
            # than the workspace takes the two-pass token chunks, whose one loss call pairs up across the ranks
            row_constant=self.ld_alpha is None and self.sequence_group is None,
        )
        if step is None:
            return None
        if stacked:
            ref_tok = step.ref_logp
        stats = (
            TokenStats(*(getattr(step.outputs, f) for f in TokenStats._fields))
            if step.outputs.entropy is not None
            else None
        )
        with torch.no_grad():
            loss, metrics, pol, ref_rows = self._pair_loss(
                step.logp,
                mask,
                None if stats is None else stats.log_sum_p2,
                ref_tok,
                ref_chosen_logps,
                ref_rejected_logps,
                offset,
                None,
                metrics=True,
            )
        if self.compute_metrics:
            assert stats is not None  # run_pair_step ran with_stats (compute_metrics): the outputs hold them
            metrics.update(self._token_metrics(stats, mask))
        loss = attach_gradients(loss, hidden, weight, bias, step)
        return PreferenceLossOutput(loss, metrics, torch.cat([pol.chosen_logps, pol.rejected_logps]), ref_rows, None)

    def _plan_pairs(
        self, labels: Tensor, vocab: int, dtype: torch.dtype, stacked: bool = False, counts_of: PairPlan | None = None
    ) -> PairPlan | None:
        """:func:`~expo_kernels.engine.plan_pairs`; with a ``sequence_group``, its chunks cut from the per-pair
        MAX over the ranks of the counted tokens (one all-reduce of ``B`` ints): every rank runs the same chunks
        of whole pairs, so the loss callback's all-reduce of each chunk pairs up across the ranks, and every
        rank decides alike whether the pairs fit."""
        plan = plan_pairs(labels, self.ignore_index, vocab, dtype, stacked=stacked, counts_of=counts_of)
        if plan is None or self.sequence_group is None:
            return plan
        counts = max_across_ranks(plan.pair_tokens.tolist(), self.sequence_group, labels.device)
        chunks = pair_chunks(counts, plan.budget_tokens, chunk_tokens(labels.device))
        return dataclasses.replace(plan, pair_tokens=torch.tensor(counts, dtype=torch.long), chunks=chunks)

    def _token_metrics(self, stats: TokenStats, mask: Tensor) -> dict[str, Tensor]:
        """``entropy``, plus the paired metrics: ``logits/chosen`` and ``logits/rejected`` (token means
        of the per-token mean logit), ``mean_token_accuracy`` (argmax hits on the chosen completions)."""
        out = super()._token_metrics(stats, mask)
        with torch.no_grad():
            mc, mr = mask.chunk(2, dim=0)
            lc, lr = stats.mean_logit.chunk(2, dim=0)
            acc = stats.is_top1.chunk(2, dim=0)[0].to(lc.dtype)
            means = self._masked_means([(lc, mc), (lr, mr), (acc, mc)])
            for k, v in zip(("logits/chosen", "logits/rejected", "mean_token_accuracy"), means, strict=True):
                out[k] = v
        return out


def _sum_over_shards(
    pol: PairedLogps,
    ref_c: Tensor | None,
    ref_r: Tensor | None,
    token_kl_rows: Tensor | None,
    module: FusedLinearPreferenceLoss,
) -> tuple[PairedLogps, Tensor | None, Tensor | None, Tensor | None]:
    """Context parallelism: the per-sequence numbers of the rank's shards summed over the sequence group
    (one all-reduce, identity backward: ``expo_kernels.distributed.context_parallel``). The chosen NLL is a
    token mean: its numerator and the chosen token count are summed, then divided."""
    local_chosen = pol.chosen_lengths.sum().clamp(min=1).to(pol.chosen_nll.dtype)
    c, r, lc, lr, nll_sum, rc, rr, tkl = sum_across_ranks(
        [
            pol.chosen_logps,
            pol.rejected_logps,
            pol.chosen_lengths,
            pol.rejected_lengths,
            pol.chosen_nll * local_chosen,
            ref_c,
            ref_r,
            token_kl_rows,
        ],
        module.sequence_group,
    )
    assert c is not None and r is not None and lc is not None and lr is not None and nll_sum is not None
    nll = nll_sum / lc.sum().clamp(min=1).to(nll_sum.dtype)
    return (
        pol._replace(chosen_logps=c, rejected_logps=r, chosen_lengths=lc, rejected_lengths=lr, chosen_nll=nll),
        rc,
        rr,
        tkl,
    )


def _engine_forward(module: FusedLinearPreferenceLoss, *args, **kwargs) -> PreferenceLossOutput | None:
    return module._engine_forward(*args, **kwargs)


#: the module's engine step as one eager region under torch.compile (a graph break in the default mode)
_engine_forward_eager = eager_region(_engine_forward)


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


def _same_tensor(a: Tensor | None, b: Tensor | None) -> bool:
    """The same values by construction: one tensor, or views of one storage with the same layout
    (``weight.detach()``)."""
    if a is None or b is None:
        return a is b
    return a is b or (
        a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
        and a.device == b.device
    )


def _same_head(weight: Tensor, bias: Tensor | None, ref_weight, ref_bias, hidden: Tensor, ref_hidden: Tensor) -> bool:
    """Whether the reference runs through the policy's head with hidden states that can join its GEMMs."""
    return (
        _same_tensor(weight, ref_weight)
        and _same_tensor(bias, ref_bias)
        and isinstance(ref_hidden, Tensor)
        and ref_hidden.shape == hidden.shape
        and ref_hidden.dtype == hidden.dtype
        and ref_hidden.device == hidden.device
    )


class _PairLossKwargs(TypedDict):
    """The keyword inputs of ``preference_loss`` that ``_pair_loss`` passes (besides the hyperparameters)."""

    chosen_lengths: Tensor
    rejected_lengths: Tensor
    chosen_nll: Tensor | None
    weights: Tensor | None
    token_kl: Tensor | None
    offset: Tensor | float | None
    loss_weights: list[float] | None

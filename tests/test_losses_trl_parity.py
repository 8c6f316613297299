"""Parity of expo_kernels.losses with TRL 1.16's own loss code, in float64, values and gradients.

TRL computes its losses inside trainer methods that also run the model. We call those methods on a
bare trainer object (``object.__new__``) carrying only the attributes they read, with a stub model
that returns per-token log-probs (DPO / KTO: TRL's fused-LM-head output) or logits (CPO / ORPO) taken
from a leaf tensor, so autograd reaches the same leaves on both sides:

* ``DPOTrainer._compute_loss`` (trl/trainer/dpo_trainer.py): all 15 loss types, f-divergences,
  label smoothing, MPO mixes, ``ld_alpha``, WPO ``use_weighting``, precomputed and model references.
* ``KTOTrainer._compute_loss`` (trl/trainer/kto_trainer.py): kto and apo_zero_unpaired.
* ``CPOTrainer.get_batch_loss_metrics`` (trl/experimental/cpo): sigmoid/hinge/ipo/simpo, AlphaPO, NLL.
* ``ORPOTrainer.get_batch_loss_metrics`` (trl/experimental/orpo).

Our side goes per-token -> :func:`aggregate_pair_logps` -> :func:`preference_loss_and_metrics`.
"""

from __future__ import annotations

import warnings
import zlib
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from expo_kernels.losses import aggregate_pair_logps, preference_loss_and_metrics, sequence_logps

trl = pytest.importorskip("trl")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.kto_trainer import KTOTrainer

DT = torch.float64
RTOL, ATOL = 1e-10, 1e-12


# ------------------------------------------------------------------------------------------------
# stubs
# ------------------------------------------------------------------------------------------------
class _Accel:
    device = torch.device("cpu")

    @staticmethod
    def gather_for_metrics(x):
        return x

    @staticmethod
    def gather(x):
        return x


class _TokenLM(torch.nn.Module):
    """Stands in for a model patched by TRL's ``add_fused_lm_head``: row ``i`` of the batch (identified
    by its first input id) gets the per-token log-probs ``table[i]``, zero where the label is -100."""

    is_gradient_checkpointing = False

    def __init__(self, table, log_sum_p2=None):
        super().__init__()
        self.table = table
        self.log_sum_p2 = log_sum_p2

    def forward(self, input_ids=None, attention_mask=None, labels=None, fused_lm_head=False, **kw):
        assert fused_lm_head
        rows = input_ids[:, 0]
        mask = labels[:, 1:] != -100
        lp = self.table[rows][:, : mask.shape[1]]
        lp = torch.where(mask, lp, torch.zeros_like(lp))
        zeros = torch.zeros_like(lp).detach()
        lsp = None if self.log_sum_p2 is None else torch.where(mask, self.log_sum_p2[rows], zeros)
        return SimpleNamespace(
            log_probs=lp, entropy=zeros, mean_logits=zeros, is_top1=mask & False, log_sum_sq_probs=lsp, aux_loss=None
        )


class _LogitLM(torch.nn.Module):
    """Stands in for a causal LM returning ``logits[i]`` for the row whose first input id is ``i``."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, attention_mask=None, use_cache=None, **kw):
        return SimpleNamespace(logits=self.logits[input_ids[:, 0]][:, : input_ids.shape[1]])


def _paired_batch(b=5, t=9, seed=0, dtype=DT):
    """TRL-layout paired batch: rows 0..b-1 chosen, b..2b-1 rejected; column 0 holds the row id (a
    prompt token). Returns input_ids, attention_mask, completion_mask (unshifted, TRL's) and a random
    per-token log-prob table [2b, t] (a leaf with grad)."""
    g = torch.Generator().manual_seed(seed)
    r = 2 * b
    input_ids = torch.zeros(r, t + 1, dtype=torch.long)
    input_ids[:, 0] = torch.arange(r)
    input_ids[:, 1:] = torch.randint(2, 50, (r, t), generator=g)
    attention_mask = torch.zeros(r, t + 1, dtype=torch.long)
    completion_mask = torch.zeros(r, t + 1, dtype=torch.long)
    for i in range(r):
        p = int(torch.randint(1, 3, (1,), generator=g))
        n = int(torch.randint(1, t + 1 - p + 1, (1,), generator=g))
        attention_mask[i, : p + n] = 1
        completion_mask[i, p : p + n] = 1
    table = (-torch.rand(r, t, generator=g, dtype=dtype) * 2.5 - 0.05).requires_grad_(True)
    return input_ids, attention_mask, completion_mask, table


# ------------------------------------------------------------------------------------------------
# DPO
# ------------------------------------------------------------------------------------------------
DPO_DEFAULTS = dict(
    beta=0.1,
    label_smoothing=0.0,
    f_divergence_type="reverse_kl",
    f_alpha_divergence_coef=0.5,
    discopop_tau=0.05,
    ld_alpha=None,
    use_weighting=False,
    loss_weights=None,
)


def _dpo_trainer(loss_type, cfg, ref_model=None):
    tr = object.__new__(DPOTrainer)
    tr.model = _TokenLM(None)  # only its `training` flag and checkpointing state are read
    tr.accelerator = _Accel()
    tr.aux_loss_enabled = False
    tr.beta = cfg["beta"]
    tr.loss_types = list(loss_type)
    tr.loss_weights = cfg["loss_weights"] or [1.0] * len(tr.loss_types)
    tr.ld_alpha = cfg["ld_alpha"]
    tr.f_divergence_type = cfg["f_divergence_type"]
    tr.f_alpha_divergence_coef = cfg["f_alpha_divergence_coef"]
    tr.label_smoothing = cfg["label_smoothing"]
    tr.use_weighting = cfg["use_weighting"]
    tr.precompute_ref_logps = ref_model is None
    tr.ref_model = ref_model
    tr.args = SimpleNamespace(discopop_tau=cfg["discopop_tau"], gradient_checkpointing_kwargs=None)
    tr._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    tr._total_train_tokens = 0
    tr._tp_size = 1
    return tr


def _dpo_case(loss_type, seed=0, b=5, ref_from_model=False, dtype=DT, ours_as=None, **overrides):
    """Run TRL's DPO loss and ours on the same random batch. ``ours_as=(name, hparams)`` evaluates
    a different name of ours (e.g. 'rpo') against TRL's ``loss_type``."""
    cfg = {**DPO_DEFAULTS, **overrides}
    loss_type = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    input_ids, attention_mask, completion_mask, table = _paired_batch(b=b, seed=seed, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 100)
    ref_noise = torch.randn(table.shape, generator=g, dtype=dtype)
    lsp2 = -torch.rand(table.shape, generator=g, dtype=dtype) * 1.5 - 0.01 if cfg["use_weighting"] else None
    shift_mask = completion_mask[:, 1:]
    ref_table = (table.detach() + 0.3 * ref_noise).clamp(max=-1e-3)
    if ref_from_model:
        ref_c = ref_r = None
    else:
        # precomputed reference: sequence sums as leaves, so gradients w.r.t. them are compared too
        ref_agg = aggregate_pair_logps(ref_table, shift_mask, ld_alpha=cfg["ld_alpha"])
        # in the table's dtype, as a TRL user hands precomputed numbers (our sums are float64)
        ref_c = ref_agg.chosen_logps.to(dtype).requires_grad_(True)
        ref_r = ref_agg.rejected_logps.to(dtype).requires_grad_(True)

    # --- TRL
    trainer = _dpo_trainer(loss_type, cfg, ref_model=_TokenLM(ref_table) if ref_from_model else None)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
    if not ref_from_model:
        inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = ref_c, ref_r
    trl_loss = trainer._compute_loss(_TokenLM(table, lsp2), inputs, return_outputs=False)
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    leaves = [table] + ([] if ref_from_model else [ref_c, ref_r])
    trl_grads = torch.autograd.grad(trl_loss, leaves, allow_unused=True)

    # --- ours
    agg = aggregate_pair_logps(
        table, shift_mask, ld_alpha=cfg["ld_alpha"], log_sum_p2=lsp2 if cfg["use_weighting"] else None
    )
    if ref_from_model:
        ref_agg = aggregate_pair_logps(ref_table, shift_mask, ld_alpha=cfg["ld_alpha"])
        ref_c, ref_r = ref_agg.chosen_logps, ref_agg.rejected_logps
    hp = {
        k: cfg[k]
        for k in ("beta", "label_smoothing", "f_divergence_type", "f_alpha_divergence_coef", "discopop_tau")
        if overrides.get(k) is not None
    }
    kwargs = dict(
        chosen_lengths=agg.chosen_lengths,
        rejected_lengths=agg.rejected_lengths,
        weights=agg.weights,
        loss_weights=cfg["loss_weights"],
    )
    if cfg["ld_alpha"] is not None:
        kwargs["chosen_nll"] = agg.chosen_nll  # TRL's sft term uses the unweighted per-token log-probs
    our_name = loss_type if len(loss_type) > 1 else loss_type[0]
    if ours_as is not None:
        our_name, hp = ours_as
        kwargs.pop("loss_weights")
    ours, metrics = preference_loss_and_metrics(
        our_name, agg.chosen_logps, agg.rejected_logps, ref_c, ref_r, **kwargs, **hp
    )
    # our sequence sums are float64 at any input dtype (long-context exactness); the modules hand back the
    # loss in the tokens' dtype, and so does this comparison
    ours = ours.to(table.dtype)
    our_grads = torch.autograd.grad(ours, leaves, allow_unused=True)
    return trl_loss, ours, trl_grads, our_grads, trl_metrics, metrics


def _assert_close(a, b, rtol=RTOL, atol=ATOL):
    torch.testing.assert_close(torch.as_tensor(a, dtype=DT), torch.as_tensor(b, dtype=DT), rtol=rtol, atol=atol)


def _check(
    case,
    rtol=RTOL,
    atol=ATOL,
    metric_names=(
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    ),
):
    trl_loss, ours, trl_grads, our_grads, trl_metrics, metrics = case
    assert ours.dtype == trl_loss.dtype
    _assert_close(ours, trl_loss, rtol, atol)
    for gt, go in zip(trl_grads, our_grads, strict=False):
        if gt is None and go is None:
            continue
        gt = torch.zeros_like(go) if gt is None else gt
        go = torch.zeros_like(gt) if go is None else go
        _assert_close(go, gt, rtol, atol)
    # the gradient is not trivially zero (so the comparison means something)
    assert any(g is not None and g.abs().sum() > 0 for g in our_grads)
    for k in metric_names:
        if k in metrics:
            # TRL averages the accuracies in float32 (`.float()`)
            tol = (1e-6, 1e-7) if k == "rewards/accuracies" else (1e-9, 1e-12)
            # a float32 case: TRL's metrics carry float32 rounding, ours float64 sums (never tighter than
            # the case's own tolerance)
            tol = (max(tol[0], rtol), max(tol[1], atol))
            _assert_close(metrics[k], trl_metrics[k], *tol)


DPO_TYPES = [
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
]


@pytest.mark.parametrize("loss_type", DPO_TYPES)
def test_dpo_loss_types_match_trl(loss_type):
    extra = {"label_smoothing": 0.1} if loss_type in ("robust", "exo_pair", "aot", "aot_unpaired") else {}
    # EXO: TRL takes log(eps) of a float32 tensor, a ~1e-8 relative difference we do not reproduce
    tol = dict(rtol=1e-6, atol=1e-9) if loss_type == "exo_pair" else {}
    # large beta so the losses are away from their flat regions and gradients are informative
    _check(_dpo_case(loss_type, beta=0.7, **extra), **tol)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "robust", "discopop", "sigmoid_norm", "exo_pair"])
@pytest.mark.parametrize("fdiv", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_f_divergences_match_trl(loss_type, fdiv):
    extra = {"label_smoothing": 0.05} if loss_type in ("robust", "exo_pair") else {}
    tol = dict(rtol=1e-6, atol=1e-9) if loss_type == "exo_pair" else {}
    if fdiv == "alpha_divergence":
        extra["f_alpha_divergence_coef"] = 0.3
    if fdiv == "alpha_divergence":
        # TRL's alpha-divergence indexes a clamp table by dtype that has no float64 entry: compare in float32
        case = _dpo_case(loss_type, f_divergence_type=fdiv, beta=0.5, dtype=torch.float32, **extra)
        _check(case, rtol=2e-5, atol=1e-6)
    else:
        _check(_dpo_case(loss_type, f_divergence_type=fdiv, beta=0.5, **extra), **tol)


def test_alpha_divergence_coef_one_is_reverse_kl():
    a = _dpo_case("sigmoid", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0, beta=0.5)
    _check(a)
    b = _dpo_case("sigmoid", beta=0.5)
    _assert_close(a[1], b[1])


@pytest.mark.parametrize(
    "mix,weights",
    [
        (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]),  # MPO as in TRL's docs
        (["sigmoid", "sft"], [1.0, 0.7]),  # RPO
        (["ipo", "hinge", "apo_down"], None),
    ],
)
def test_mpo_mixes_match_trl(mix, weights):
    _check(_dpo_case(mix, loss_weights=weights, beta=0.4))


@pytest.mark.parametrize("ld_alpha", [0.0, 0.35, 1.0])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", ["sigmoid", "sft"]])
def test_ld_alpha_via_aggregate_matches_trl(ld_alpha, loss_type):
    _check(_dpo_case(loss_type, ld_alpha=ld_alpha, beta=0.5, seed=3))


def test_ld_alpha_with_reference_model_matches_trl():
    # reference log-probs computed by TRL from a reference model, with the same LD weighting
    _check(_dpo_case("sigmoid", ld_alpha=0.5, beta=0.5, seed=4, ref_from_model=True))


# TRL 1.16 cannot weight 'sft' (in-place `*=` on its expanded per-pair tensor raises a RuntimeError);
# that combination is checked against the hand formula in test_losses.py.
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "nca_pair", "discopop", ["sigmoid", "bco_pair"]])
def test_wpo_weighting_matches_trl(loss_type):
    _check(_dpo_case(loss_type, use_weighting=True, beta=0.5, seed=5))


def test_wpo_with_ld_alpha_matches_trl():
    _check(_dpo_case(["sigmoid", "ipo"], use_weighting=True, ld_alpha=0.25, beta=0.5, seed=6, loss_weights=[1.0, 0.5]))


@pytest.mark.parametrize("ld_alpha", [None, 0.5])
def test_rpo_equals_trl_sigmoid_plus_sft(ld_alpha):
    # TRL 1.16 has no rpo_alpha: RPO is loss_type=["sigmoid", "sft"] with loss_weights=[1, rpo_alpha]
    _check(
        _dpo_case(
            ["sigmoid", "sft"],
            loss_weights=[1.0, 0.6],
            beta=0.3,
            seed=7,
            ld_alpha=ld_alpha,
            ours_as=("rpo", dict(beta=0.3, rpo_alpha=0.6)),
        )
    )


# ------------------------------------------------------------------------------------------------
# KTO
# ------------------------------------------------------------------------------------------------
def _kto_case(loss_type, labels, seed=0, beta=0.3, wd=1.0, wu=1.0, form="policy", kl_shift=0.0):
    g = torch.Generator().manual_seed(seed)
    n, t = len(labels), 7
    input_ids = torch.zeros(n, t + 1, dtype=torch.long)
    input_ids[:, 0] = torch.arange(n)
    kl_input_ids = input_ids.clone()
    kl_input_ids[:, 0] = torch.arange(n, 2 * n)  # KL rows live in rows n..2n-1 of the table
    completion_mask = torch.zeros(n, t + 1, dtype=torch.long)
    kl_completion_mask = torch.zeros(n, t + 1, dtype=torch.long)
    for m in (completion_mask, kl_completion_mask):
        for i in range(n):
            p = int(torch.randint(1, 3, (1,), generator=g))
            k = int(torch.randint(1, t + 1 - p + 1, (1,), generator=g))
            m[i, p : p + k] = 1
    table = (-torch.rand(2 * n, t, generator=g, dtype=DT) * 2 - 0.05).requires_grad_(True)
    ref_table = (table.detach() + 0.4 * torch.randn(table.shape, generator=g, dtype=DT)).clamp(max=-1e-3)
    ref_seq, _ = sequence_logps(ref_table[:n], completion_mask[:, 1:])
    ref_kl_seq, _ = sequence_logps(ref_table[n:], kl_completion_mask[:, 1:])
    ref_kl_seq = ref_kl_seq + kl_shift
    ref_seq = ref_seq.clone().requires_grad_(True)
    label = torch.tensor(labels)

    tr = object.__new__(KTOTrainer)
    tr.model = SimpleNamespace(training=True)
    tr.accelerator = _Accel()
    tr.aux_loss_enabled = False
    tr.loss_type, tr.beta = loss_type, beta
    tr.desirable_weight, tr.undesirable_weight = wd, wu
    tr.calculate_KL = loss_type != "apo_zero_unpaired"
    tr.precompute_ref_logps = True
    tr._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    tr._total_train_tokens, tr._tp_size = 0, 1
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "completion_mask": completion_mask,
        "label": label,
        "ref_logps": ref_seq,
    }
    if tr.calculate_KL:
        inputs.update(
            KL_input_ids=kl_input_ids,
            KL_attention_mask=torch.ones_like(kl_input_ids),
            KL_completion_mask=kl_completion_mask,
            ref_KL_logps=ref_kl_seq,
        )
    trl_loss = tr._compute_loss(_TokenLM(table), inputs, return_outputs=False)
    trl_metrics = {k: v[-1] for k, v in tr._metrics["train"].items()}
    trl_grads = torch.autograd.grad(trl_loss, [table, ref_seq])

    pol, _ = sequence_logps(table[:n], completion_mask[:, 1:])
    kl_pol, _ = sequence_logps(table[n:], kl_completion_mask[:, 1:])
    kl_args = dict(kl_logps=kl_pol, ref_kl_logps=ref_kl_seq) if tr.calculate_KL else {}
    hp = dict(beta=beta, desirable_weight=wd, undesirable_weight=wu)
    if form == "policy":
        ours, metrics = preference_loss_and_metrics(
            loss_type, policy_logps=pol, ref_logps=ref_seq, is_desirable=label, **kl_args, **hp
        )
    else:
        lab = label.bool()
        ours, metrics = preference_loss_and_metrics(
            loss_type, pol[lab], pol[~lab], ref_seq[lab], ref_seq[~lab], **kl_args, **hp
        )
    our_grads = torch.autograd.grad(ours, [table, ref_seq])
    return trl_loss, ours, trl_grads, our_grads, trl_metrics, metrics


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize(
    "labels,wd,wu,form",
    [
        ([True, False, True, True, False, False], 1.0, 1.0, "policy"),
        ([True, True, False, True, True], 1.3, 0.6, "policy"),
        ([False, True, False, True, True, False, True], 0.8, 1.5, "chosen_rejected"),
        ([True, True, True], 1.0, 1.0, "policy"),  # all desirable: no rejected metrics
    ],
)
def test_kto_matches_trl(loss_type, labels, wd, wu, form):
    case = _kto_case(loss_type, labels, seed=len(labels), wd=wd, wu=wu, form=form)
    _check(
        case,
        metric_names=("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"),
    )
    trl_metrics, metrics = case[4], case[5]
    assert set(trl_metrics) - {"entropy", "num_tokens", "logits/chosen", "logits/rejected"} == set(metrics)


@pytest.mark.parametrize("kl_shift", [5.0, -5.0])
def test_kto_kl_baseline_is_clamped_and_detached(kl_shift):
    # kl_shift > 0 puts the reference above the policy on the KL pairs: the baseline is clamped at 0
    case = _kto_case("kto", [True, False, True, False], seed=11, kl_shift=kl_shift)
    _check(case, metric_names=("kl", "rewards/chosen", "rewards/rejected"))
    kl = case[5]["kl"]
    assert (kl == 0) if kl_shift > 0 else (kl > 1.0)


# ------------------------------------------------------------------------------------------------
# CPO / SimPO / AlphaPO / ORPO (TRL experimental trainers, logits-level stub)
# ------------------------------------------------------------------------------------------------
def _logit_batch(b=4, t=8, v=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = {}
    for side, off in (("chosen", 0), ("rejected", b)):
        input_ids = torch.randint(1, v, (b, t), generator=g)
        input_ids[:, 0] = torch.arange(off, off + b)  # row id in the logits table
        attn = torch.zeros(b, t, dtype=torch.long)
        labels = torch.full((b, t), -100, dtype=torch.long)
        for i in range(b):
            p = int(torch.randint(1, 3, (1,), generator=g))
            n = int(torch.randint(1, t - p + 1, (1,), generator=g))
            attn[i, : p + n] = 1
            labels[i, p : p + n] = input_ids[i, p : p + n]
        ids[f"{side}_input_ids"], ids[f"{side}_attention_mask"], ids[f"{side}_labels"] = input_ids, attn, labels
    logits = torch.randn(2 * b, t, v, generator=g, dtype=DT).mul_(2).requires_grad_(True)
    return ids, logits


def _per_token(logits, input_ids, labels):
    """Our per-token log-probs of the label tokens, label-aligned, and the completion mask."""
    lab = labels[:, 1:]
    mask = lab != -100
    lp = torch.log_softmax(logits[input_ids[:, 0]][:, :-1], dim=-1).gather(-1, lab.clamp(min=0).unsqueeze(-1))
    return lp.squeeze(-1), mask


def _cpo_like_trainer(cls, **attrs):
    tr = object.__new__(cls)
    tr.accelerator = _Accel()
    tr.is_encoder_decoder = False
    tr.aux_loss_enabled = False
    tr.pad_token_id = tr.padding_value = 0
    for k, v in attrs.items():
        setattr(tr, k, v)
    return tr


def _both_sides(ids, logits):
    cat = lambda k: torch.cat([ids[f"chosen_{k}"], ids[f"rejected_{k}"]])  # noqa: E731
    lp, mask = _per_token(logits, cat("input_ids"), cat("labels"))
    return lp, mask, cat


@pytest.mark.parametrize(
    "variant,alpha,eps,cpo_alpha",
    [
        ("sigmoid", 0.0, 0.0, 1.0),
        ("sigmoid", 0.0, 0.2, 0.5),
        ("hinge", 0.0, 0.0, 1.0),
        ("ipo", 0.0, 0.0, 1.0),
        ("simpo", 0.0, 0.1, 1.0),
        ("simpo", 0.0, 0.0, 0.0),
        ("sigmoid", 0.3, 0.0, 1.0),
        ("simpo", 0.25, 0.0, 0.0),
        ("ipo", -0.2, 0.0, 0.0),
    ],
)
def test_cpo_family_matches_trl(variant, alpha, eps, cpo_alpha):
    ids, logits = _logit_batch(seed=zlib.crc32(repr((variant, alpha, eps, cpo_alpha)).encode()) % 1000)
    beta, gamma = 0.6, 0.4
    tr = _cpo_like_trainer(
        CPOTrainer,
        beta=beta,
        label_smoothing=eps,
        loss_type=variant,
        cpo_alpha=cpo_alpha,
        simpo_gamma=gamma,
        alpha=alpha,
    )
    trl_loss, trl_metrics = tr.get_batch_loss_metrics(_LogitLM(logits), ids)
    (trl_grad,) = torch.autograd.grad(trl_loss, [logits])

    lp, mask, _ = _both_sides(ids, logits)
    agg = aggregate_pair_logps(lp, mask)
    kw = dict(chosen_lengths=agg.chosen_lengths, rejected_lengths=agg.rejected_lengths, beta=beta)
    if variant == "simpo" and cpo_alpha == 0.0 and alpha == 0.0:
        name, hp = "simpo", dict(gamma=gamma, label_smoothing=eps)
    elif variant == "simpo" and cpo_alpha == 0.0:
        name, hp = "alphapo", dict(simpo_gamma=gamma, alpha=alpha, label_smoothing=eps)  # alias of gamma
    else:
        name, hp = (
            "cpo",
            dict(cpo_loss_type=variant, cpo_alpha=cpo_alpha, alpha=alpha, label_smoothing=eps, gamma=gamma),
        )
    ours, metrics = preference_loss_and_metrics(name, agg.chosen_logps, agg.rejected_logps, **kw, **hp)
    (our_grad,) = torch.autograd.grad(ours, [logits])
    _assert_close(ours, trl_loss)
    _assert_close(our_grad, trl_grad)
    assert our_grad.abs().sum() > 0
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        _assert_close(metrics[k], trl_metrics[k], 1e-9, 1e-12)
    _assert_close(metrics["rewards/accuracies"], trl_metrics["rewards/accuracies"], 1e-6, 1e-7)
    if name == "cpo":
        _assert_close(metrics["nll_loss"], trl_metrics["nll_loss"], 1e-9, 1e-12)


@pytest.mark.parametrize("beta", [0.1, 0.9])
def test_orpo_matches_trl(beta):
    ids, logits = _logit_batch(seed=int(beta * 10))
    tr = _cpo_like_trainer(ORPOTrainer, beta=beta)
    trl_loss, trl_metrics = tr.get_batch_loss_metrics(_LogitLM(logits), ids)
    (trl_grad,) = torch.autograd.grad(trl_loss, [logits])

    lp, mask, cat = _both_sides(ids, logits)
    agg = aggregate_pair_logps(lp, mask)
    # TRL's ORPO NLL averages over the prompt *and* completion tokens of the chosen sequences
    b = ids["chosen_input_ids"].shape[0]
    full_labels = torch.where(cat("attention_mask") == 1, cat("input_ids"), -100)[:b]
    full_lp, full_mask = _per_token(logits, cat("input_ids")[:b], full_labels)
    nll = -full_lp[full_mask].mean()
    ours, metrics = preference_loss_and_metrics(
        "orpo",
        agg.chosen_logps,
        agg.rejected_logps,
        chosen_lengths=agg.chosen_lengths,
        rejected_lengths=agg.rejected_lengths,
        chosen_nll=nll,
        beta=beta,
    )
    (our_grad,) = torch.autograd.grad(ours, [logits])
    # TRL's odds_ratio_loss casts the log-probs to float32 (`.float()`): compare at float32 precision
    _assert_close(ours, trl_loss, 1e-6, 1e-7)
    _assert_close(our_grad, trl_grad, 1e-5, 1e-7)
    for k in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "nll_loss",
        "log_odds_ratio",
        "log_odds_chosen",
    ):
        _assert_close(metrics[k], trl_metrics[k], 1e-5, 1e-6)

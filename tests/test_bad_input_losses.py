"""Bad-input matrix of the loss-level entry points: every bad argument raises TypeError or ValueError
naming it, never a silent wrong answer or an unrelated error from deep inside.

One parametrized test per public entry point: ``preference_loss`` / ``preference_loss_and_metrics``,
the ``FusedLinear*Loss`` modules (construction and forward) and the TRL trainers' constructors (which
check their own options before TRL's ``__init__`` does any work).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

import expo_kernels as ek
from expo_kernels.losses import preference_loss, preference_loss_and_metrics

DT = torch.float64
B = 3
NAN, INF = float("nan"), float("inf")


def _logps(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [-torch.rand(B, generator=g, dtype=DT) * 10 for _ in range(4)]


def _with_nan(i):
    x = -torch.rand(B, dtype=DT)
    x[i] = NAN
    return x


LENS = dict(chosen_lengths=torch.full((B,), 4), rejected_lengths=torch.full((B,), 5))

# ------------------------------------------------------------------------------------------------
# preference_loss / preference_loss_and_metrics: (case id, loss name, keyword overrides, match)
# ------------------------------------------------------------------------------------------------
_HPARAM_CASES = [
    # beta: wrong types, then out of range
    ("beta_str", "sigmoid", dict(beta="0.1"), "beta"),
    ("beta_bool", "sigmoid", dict(beta=True), "beta"),
    ("beta_none", "sigmoid", dict(beta=None), "beta"),
    ("beta_list", "sigmoid", dict(beta=[0.1]), "beta"),
    ("beta_vector", "sigmoid", dict(beta=torch.tensor([0.1, 0.2])), "beta"),
    ("beta_nan", "sigmoid", dict(beta=NAN), "beta"),
    ("beta_inf", "sigmoid", dict(beta=INF), "beta"),
    ("beta_zero", "sigmoid", dict(beta=0), "beta"),
    ("beta_negative", "ipo", dict(beta=-0.5), "beta"),
    ("beta_np_bool", "sigmoid", dict(beta=np.bool_(True)), "beta"),
    ("beta_str_kto", "kto", dict(beta="1"), "beta"),
    ("beta_str_orpo", "orpo", dict(beta="0.1"), "beta"),
    # label smoothing and the other real-valued hyperparameters
    ("label_smoothing_str", "sigmoid", dict(label_smoothing="0"), "label_smoothing"),
    ("label_smoothing_half", "robust", dict(label_smoothing=0.5), "label_smoothing"),
    ("label_smoothing_nan", "sigmoid", dict(label_smoothing=NAN), "label_smoothing"),
    ("exo_eps_zero", "exo_pair", dict(label_smoothing=0.0), "label_smoothing"),
    ("discopop_tau_str", "discopop", dict(discopop_tau="0.05"), "discopop_tau"),
    ("discopop_tau_negative", "discopop", dict(discopop_tau=-1.0), "discopop_tau"),
    ("rpo_alpha_none", "rpo", dict(rpo_alpha=None), "rpo_alpha"),
    ("odpo_alpha_inf", "odpo", dict(alpha=INF, offset=0.1), "alpha"),
    ("bco_delta_str", "bco_pair", dict(delta="0"), "delta"),
    ("gamma_bool", "simpo", dict(gamma=False), "gamma"),
    ("simpo_gamma_nan", "simpo", dict(simpo_gamma=NAN), "gamma"),
    ("cpo_alpha_negative", "cpo", dict(cpo_alpha=-1.0), "cpo_alpha"),
    ("cpo_loss_type_int", "cpo", dict(cpo_loss_type=1), "cpo_loss_type"),
    ("cpo_loss_type_unknown", "cpo", dict(cpo_loss_type="kto"), "cpo_loss_type"),
    ("alphapo_alpha_str", "alphapo", dict(alpha="0.25"), "alpha"),
    ("desirable_weight_negative", "kto", dict(desirable_weight=-1.0), "desirable_weight"),
    ("undesirable_weight_str", "kto", dict(undesirable_weight="1"), "undesirable_weight"),
    ("lam_missing", "expo", dict(), "lam"),
    ("lam_str", "expo", dict(lam="0.1"), "lam"),
    ("lam_negative", "expo", dict(lam=-1.0), "lam"),
    ("kl_estimator_unknown", "expo", dict(lam=0.1, kl_estimator="regression"), "kl_estimator"),
    ("kl_estimator_tensor", "expo", dict(lam=0.1, kl_estimator=torch.tensor([1, 2])), "kl_estimator"),
    ("f_divergence_type_int", "sigmoid", dict(f_divergence_type=3), "f_divergence_type"),
    ("f_divergence_type_unknown", "sigmoid", dict(f_divergence_type="kl"), "f_divergence_type"),
    ("f_alpha_coef_str", "sigmoid", dict(f_alpha_divergence_coef="0.5"), "f_alpha_divergence_coef"),
    ("f_alpha_coef_nan_unused", "nca_pair", dict(f_alpha_divergence_coef=NAN), "f_alpha_divergence_coef"),
    ("unknown_hparam", "sigmoid", dict(bta=0.1), "bta"),
    # reduction, loss weights, name
    ("reduction_unknown", "sigmoid", dict(reduction="avg"), "reduction"),
    ("reduction_none_value", "sigmoid", dict(reduction=None), "reduction"),
    ("reduction_int", "sigmoid", dict(reduction=0), "reduction"),
    ("loss_weights_str", ["sigmoid", "hinge"], dict(loss_weights="11"), "loss_weights"),
    ("loss_weights_number", ["sigmoid", "hinge"], dict(loss_weights=1.0), "loss_weights"),
    ("loss_weights_bool", ["sigmoid", "hinge"], dict(loss_weights=[True, 1.0]), "loss_weights"),
    ("loss_weights_str_item", ["sigmoid", "hinge"], dict(loss_weights=["1", 1.0]), "loss_weights"),
    ("loss_weights_inf", ["sigmoid", "hinge"], dict(loss_weights=[INF, 1.0]), "loss_weights"),
    ("loss_weights_length", ["sigmoid", "hinge"], dict(loss_weights=[1.0]), "loss_weights"),
    ("name_int", 3, dict(), "name"),
    ("name_empty_list", [], dict(), "name"),
]

_INPUT_CASES = [
    # tensors: wrong types, dtypes, shapes, non-finite values
    ("chosen_list", "sigmoid", dict(chosen_logps=[0.0] * B), "chosen_logps"),
    ("chosen_long", "sigmoid", dict(chosen_logps=torch.zeros(B, dtype=torch.long)), "chosen_logps"),
    ("chosen_2d", "sigmoid", dict(chosen_logps=torch.zeros(B, 2, dtype=DT)), "chosen_logps"),
    ("rejected_short", "sigmoid", dict(rejected_logps=torch.zeros(B - 1, dtype=DT)), "rejected_logps"),
    ("ref_chosen_scalar", "sigmoid", dict(ref_chosen_logps=torch.zeros((), dtype=DT)), "ref_chosen_logps"),
    ("ref_rejected_missing", "sigmoid", dict(ref_rejected_logps=None), "ref_rejected_logps"),
    ("chosen_nan", "sigmoid", dict(chosen_logps=_with_nan(1)), "chosen_logps"),
    ("rejected_nan", "hinge", dict(rejected_logps=_with_nan(0)), "rejected_logps"),
    ("ref_chosen_inf", "ipo", dict(ref_chosen_logps=torch.full((B,), -INF, dtype=DT)), "ref_chosen_logps"),
    ("ref_rejected_nan_mean", "discopop", dict(ref_rejected_logps=_with_nan(2)), "ref_rejected_logps"),
    ("chosen_nan_none", "sigmoid", dict(chosen_logps=_with_nan(0), reduction="none"), "chosen_logps"),
    ("chosen_nan_expo", "expo", dict(chosen_logps=_with_nan(2), lam=0.1), "chosen_logps"),
    ("weights_nan", "sigmoid", dict(weights=torch.tensor([1.0, NAN, 1.0], dtype=DT)), "weights"),
    ("weights_shape", "sigmoid", dict(weights=torch.ones(B + 1, dtype=DT)), "weights"),
    ("lengths_shape", "ipo", dict(chosen_lengths=torch.ones(B + 1)), "chosen_lengths"),
    ("offset_str", "odpo", dict(offset="1"), "offset"),
    ("offset_nan", "odpo", dict(offset=NAN), "offset"),
    ("offset_nan_tensor", "odpo", dict(offset=_with_nan(1)), "offset"),
    ("offset_bool_tensor", "odpo", dict(offset=torch.ones(B, dtype=torch.bool)), "offset"),
    ("chosen_nll_inf", "rpo", dict(chosen_nll=INF), "chosen_nll"),
    ("token_kl_list", "expo", dict(lam=0.1, kl_estimator="token", token_kl=[0.0] * B), "token_kl"),
    ("token_kl_nan", "expo", dict(lam=0.1, kl_estimator="token", token_kl=_with_nan(0)), "token_kl"),
    ("kl_str", "kto", dict(kl="0"), "kl"),
    ("kl_nan", "kto", dict(kl=NAN), "kl"),
    ("is_desirable_float", "kto", dict(is_desirable=torch.tensor([0.3, 1.0, 0.0]), kl=0.0), "is_desirable"),
    ("is_desirable_int_2", "kto", dict(is_desirable=torch.tensor([2, 1, 0]), kl=0.0), "is_desirable"),
    ("is_desirable_str", "kto", dict(is_desirable="yes", kl=0.0), "is_desirable"),
    ("policy_logps_nan", "kto", dict(policy_logps=_with_nan(1), kl=0.0), "policy_logps"),
]


def _call(entry, name, kw):
    c, r, cr, rr = _logps()
    args = dict(chosen_logps=c, rejected_logps=r, ref_chosen_logps=cr, ref_rejected_logps=rr, **LENS)
    names = name if isinstance(name, list) else [name]
    if "kto" in names:  # unpaired form
        args = dict(policy_logps=c, ref_logps=cr, is_desirable=torch.tensor([True, False, True]), kl=0.0)
    if "odpo" in names:
        args["offset"] = 0.1
    args.update(kw)
    return entry(name, **args)


@pytest.mark.parametrize(
    "entry", [preference_loss, preference_loss_and_metrics], ids=["preference_loss", "preference_loss_and_metrics"]
)
@pytest.mark.parametrize(
    "name,kw,match", [c[1:] for c in _HPARAM_CASES + _INPUT_CASES], ids=[c[0] for c in _HPARAM_CASES + _INPUT_CASES]
)
def test_preference_loss_bad_input(entry, name, kw, match):
    with pytest.raises((TypeError, ValueError), match=match):
        _call(entry, name, kw)


@pytest.mark.parametrize(
    "kw,exc",
    [
        (dict(beta="0.1"), TypeError),
        (dict(beta=True), TypeError),
        (dict(beta=0.0), ValueError),
        (dict(reduction=1), TypeError),
    ],
)
def test_type_errors_are_type_errors(kw, exc):
    """Wrong type: TypeError (also a ValueError, as the loss layer raised before); wrong value: ValueError."""
    with pytest.raises(exc, match=r"`(beta|reduction)` must be"):
        _call(preference_loss, "sigmoid", kw)


@pytest.mark.parametrize("beta", [0.1, 1, np.float32(0.1), np.float64(0.1), np.int64(1), torch.tensor(0.1)])
def test_real_numbers_are_accepted(beta):
    ref = _call(preference_loss, "sigmoid", dict(beta=0.1 if not isinstance(beta, (int, np.int64)) else 1.0))
    got = _call(preference_loss, "sigmoid", dict(beta=beta))
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------------------
# FusedLinear*Loss: construction
# ------------------------------------------------------------------------------------------------
_MODULE_CTOR_CASES = [
    ("dpo_beta_str", ek.FusedLinearDPOLoss, dict(beta="0.1"), "beta"),
    ("dpo_beta_none", ek.FusedLinearDPOLoss, dict(beta=None), "beta"),
    ("dpo_beta_nan", ek.FusedLinearDPOLoss, dict(beta=NAN), "beta"),
    ("dpo_label_smoothing_bool", ek.FusedLinearDPOLoss, dict(label_smoothing=True), "label_smoothing"),
    ("expo_lam_missing", ek.FusedLinearEXPOLoss, dict(), "lam"),
    ("expo_lam_inf", ek.FusedLinearEXPOLoss, dict(lam=INF), "lam"),
    ("expo_kl_estimator_int", ek.FusedLinearEXPOLoss, dict(lam=0.1, kl_estimator=0), "kl_estimator"),
    ("simpo_gamma_str", ek.FusedLinearSimPOLoss, dict(gamma="0.5"), "gamma"),
    ("orpo_beta_negative", ek.FusedLinearORPOLoss, dict(beta=-0.1), "beta"),
    ("kto_weight_str", ek.FusedLinearKTOLoss, dict(desirable_weight="1"), "desirable_weight"),
    ("ignore_index_float", ek.FusedLinearDPOLoss, dict(ignore_index=-100.0), "ignore_index"),
    ("ignore_index_bool", ek.FusedLinearDPOLoss, dict(ignore_index=True), "ignore_index"),
    ("ignore_index_huge", ek.FusedLinearDPOLoss, dict(ignore_index=2**70), "ignore_index"),
    ("temperature_str", ek.FusedLinearDPOLoss, dict(temperature="1"), "temperature"),
    ("temperature_zero", ek.FusedLinearDPOLoss, dict(temperature=0.0), "temperature"),
    ("temperature_none", ek.FusedLinearDPOLoss, dict(temperature=None), "temperature"),
    ("logit_scale_nan", ek.FusedLinearDPOLoss, dict(logit_scale=NAN), "logit_scale"),
    ("logit_scale_bool", ek.FusedLinearDPOLoss, dict(logit_scale=True), "logit_scale"),
    ("softcap_negative", ek.FusedLinearDPOLoss, dict(softcap=-30.0), "softcap"),
    ("softcap_str", ek.FusedLinearDPOLoss, dict(softcap="30"), "softcap"),
    ("ld_alpha_str", ek.FusedLinearDPOLoss, dict(ld_alpha="0.5"), "ld_alpha"),
    ("ld_alpha_nan", ek.FusedLinearDPOLoss, dict(ld_alpha=NAN), "ld_alpha"),
    ("ld_alpha_above_1", ek.FusedLinearDPOLoss, dict(ld_alpha=1.5), "ld_alpha"),
    ("use_weighting_str", ek.FusedLinearDPOLoss, dict(use_weighting="no"), "use_weighting"),
    ("use_weighting_int", ek.FusedLinearDPOLoss, dict(use_weighting=1), "use_weighting"),
    ("compute_metrics_none", ek.FusedLinearDPOLoss, dict(compute_metrics=None), "compute_metrics"),
    ("backend_bogus", ek.FusedLinearDPOLoss, dict(backend="bogus"), "backend"),
    ("backend_int", ek.FusedLinearEXPOLoss, dict(lam=0.1, backend=1), "backend"),
    ("loss_weights_number", ek.FusedLinearDPOLoss, dict(loss_weights=1.0), "loss_weights"),
    ("loss_weights_nan", ek.FusedLinearDPOLoss, dict(loss_weights=[NAN]), "loss_weights"),
    ("reduction_not_an_option", ek.FusedLinearDPOLoss, dict(reduction="mean"), "reduction"),
    ("loss_name_int", ek.FusedLinearPreferenceLoss, dict(loss=5), "name"),
    ("loss_name_unknown", ek.FusedLinearPreferenceLoss, dict(loss="sigmod"), "sigmod"),
    ("preset_other_loss", ek.FusedLinearDPOLoss, dict(loss="ipo"), "FusedLinearPreferenceLoss"),
]


@pytest.mark.parametrize("cls,kw,match", [c[1:] for c in _MODULE_CTOR_CASES], ids=[c[0] for c in _MODULE_CTOR_CASES])
def test_module_construction_bad_input(cls, kw, match):
    with pytest.raises((TypeError, ValueError), match=match):
        cls(**kw)


# ------------------------------------------------------------------------------------------------
# FusedLinear*Loss: forward
# ------------------------------------------------------------------------------------------------
R, T, H, V = 2 * B, 5, 8, 11


def _head_batch():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(R, T, H, generator=g, dtype=DT)
    weight = torch.randn(V, H, generator=g, dtype=DT)
    labels = torch.randint(0, V, (R, T), generator=g)
    labels[:, :2] = -100  # prompt
    return hidden, weight, labels


_FORWARD_CASES = [
    ("hidden_2d", dict(hidden=lambda h, w, y: h[:, :, 0]), "hidden"),
    ("hidden_list", dict(hidden=lambda h, w, y: h.tolist()), "hidden"),
    ("hidden_int", dict(hidden=lambda h, w, y: h.long()), "hidden"),
    ("hidden_odd_rows", dict(hidden=lambda h, w, y: h[:-1], labels=lambda h, w, y: y[:-1]), "rows"),
    ("hidden_width", dict(hidden=lambda h, w, y: h[..., :-1]), "weight|hidden"),
    ("weight_1d", dict(weight=lambda h, w, y: w[0]), "weight"),
    ("weight_dtype", dict(weight=lambda h, w, y: w.float()), "weight"),
    ("labels_float", dict(labels=lambda h, w, y: y.double()), "labels"),
    ("labels_1d", dict(labels=lambda h, w, y: y[:, 0]), "labels"),
    ("labels_list", dict(labels=lambda h, w, y: y.tolist()), "labels"),
    ("labels_short", dict(labels=lambda h, w, y: y[:, :-1]), "labels"),
    (
        "ref_chosen_logps_shape",
        dict(
            ref_chosen_logps=lambda h, w, y: torch.zeros(B + 1, dtype=DT),
            ref_rejected_logps=lambda h, w, y: torch.zeros(B, dtype=DT),
        ),
        "ref_chosen_logps",
    ),
    (
        "ref_chosen_logps_nan",
        dict(
            ref_chosen_logps=lambda h, w, y: torch.full((B,), NAN, dtype=DT),
            ref_rejected_logps=lambda h, w, y: torch.zeros(B, dtype=DT),
        ),
        "ref_chosen_logps",
    ),
    ("ref_hidden_tokens", dict(ref_hidden=lambda h, w, y: h[:, :-1]), "ref_hidden"),
    ("ref_weight_without_hidden", dict(ref_weight=lambda h, w, y: w), "ref_hidden"),
    ("offset_for_dpo", dict(ref_hidden=lambda h, w, y: h, offset=lambda h, w, y: 1.0), "offset"),
    (
        "is_desirable_for_dpo",
        dict(ref_hidden=lambda h, w, y: h, is_desirable=lambda h, w, y: torch.ones(R, dtype=torch.bool)),
        "is_desirable",
    ),
]


@pytest.mark.parametrize("kw,match", [c[1:] for c in _FORWARD_CASES], ids=[c[0] for c in _FORWARD_CASES])
def test_module_forward_bad_input(kw, match):
    hidden, weight, labels = _head_batch()
    args = dict(hidden=hidden, weight=weight, labels=labels, ref_hidden=hidden + 0.1)
    if any(k.startswith("ref_") for k in kw):
        args.pop("ref_hidden")
    for k, f in kw.items():
        args[k] = f(hidden, weight, labels)
    mod = ek.FusedLinearDPOLoss(backend="torch")
    w, h, lab = args.pop("weight"), args.pop("hidden"), args.pop("labels")
    with pytest.raises((TypeError, ValueError), match=match):
        mod(w, h, lab, **args)


def test_module_forward_kto_bad_is_desirable():
    hidden, weight, labels = _head_batch()
    mod = ek.FusedLinearKTOLoss(backend="torch")
    with pytest.raises((TypeError, ValueError), match="is_desirable"):
        mod(weight, hidden, labels, ref_hidden=hidden, kl=0.0, is_desirable=torch.full((R,), 0.5))


# ------------------------------------------------------------------------------------------------
# TRL trainers: their own options are checked before TRL's __init__ runs
# ------------------------------------------------------------------------------------------------
def _trainer_classes():
    trl_mod = pytest.importorskip("expo_kernels.integrations.trl")
    return trl_mod


_TRAINER_CASES = [
    ("backend_bogus", dict(backend="bogus"), "backend"),
    ("backend_int", dict(backend=0), "backend"),
    ("logit_transform_list", dict(logit_transform=[("softcap", 30.0)]), "logit_transform"),
    ("logit_transform_str", dict(logit_transform="softcap"), "logit_transform"),
]
_DPO_ONLY_CASES = [
    ("loss_kwargs_list", dict(loss_kwargs=[("lam", 0.1)]), "loss_kwargs"),
    ("loss_kwargs_str", dict(loss_kwargs="lam=0.1"), "loss_kwargs"),
    ("registry_loss_str", dict(registry_loss="yes"), "registry_loss"),
]


class _Boom:
    """Stands for the model: any use of it by TRL's __init__ would fail the test loudly."""

    def __getattr__(self, name):
        raise AssertionError(f"TRL's __init__ ran (touched model.{name}) before the options were checked")


@pytest.mark.parametrize("trainer", ["FusedDPOTrainer", "FusedKTOTrainer", "FusedCPOTrainer", "FusedORPOTrainer"])
@pytest.mark.parametrize("kw,match", [c[1:] for c in _TRAINER_CASES], ids=[c[0] for c in _TRAINER_CASES])
def test_trainer_construction_bad_option(trainer, kw, match):
    mod = _trainer_classes()
    cls = getattr(mod, trainer, None)
    if cls is None:
        pytest.skip(f"{trainer} needs trl.experimental")
    with pytest.raises((TypeError, ValueError), match=match):
        cls(model=_Boom(), **kw)


@pytest.mark.parametrize("kw,match", [c[1:] for c in _DPO_ONLY_CASES], ids=[c[0] for c in _DPO_ONLY_CASES])
def test_dpo_trainer_construction_bad_option(kw, match):
    mod = _trainer_classes()
    with pytest.raises((TypeError, ValueError), match=match):
        mod.FusedDPOTrainer(model=_Boom(), **kw)


@pytest.mark.parametrize(
    "kw,match", [c[1:] for c in _TRAINER_CASES + _DPO_ONLY_CASES], ids=[c[0] for c in _TRAINER_CASES + _DPO_ONLY_CASES]
)
def test_enable_fused_lm_head_bad_option(kw, match):
    mod = _trainer_classes()
    from trl.trainer.dpo_trainer import DPOTrainer

    trainer = DPOTrainer.__new__(DPOTrainer)  # an instance without TRL's __init__: nothing may be touched
    with pytest.raises((TypeError, ValueError), match=match):
        mod.enable_fused_lm_head(trainer, **kw)
    with pytest.raises(TypeError, match="DPOTrainer"):
        mod.enable_fused_lm_head(object(), **kw)


def test_matrix_size():
    """The matrix stays a matrix: 60+ bad-input cases."""
    n = (
        2 * len(_HPARAM_CASES + _INPUT_CASES)
        + len(_MODULE_CTOR_CASES)
        + len(_FORWARD_CASES)
        + 4 * len(_TRAINER_CASES)
        + 2 * len(_DPO_ONLY_CASES)
        + len(_TRAINER_CASES)
    )
    assert n >= 60 and math.isfinite(n)


# ------------------------------------------------------------------------------------------------
# is_desirable: the accepted label forms give the bool tensor's numbers; the refused forms name it
# ------------------------------------------------------------------------------------------------
def _kto_by_hand(pol, ref, labels, beta, z0, wd, wu):
    """KTO per example in float64 by hand: desirable ``wd (1 - sigma(beta (h - z0)))``, undesirable
    ``wu (1 - sigma(beta (z0 - h)))``, ``h = pol - ref``."""
    out = []
    for p, r, d in zip(pol.tolist(), ref.tolist(), labels, strict=True):
        h = p - r
        x = beta * (h - z0) if d else beta * (z0 - h)
        out.append((wd if d else wu) * (1.0 - 1.0 / (1.0 + math.exp(-x))))
    return torch.tensor(out, dtype=DT)


@pytest.mark.parametrize(
    "labels",
    [
        [True, False, True],
        [np.bool_(True), np.bool_(False), np.bool_(True)],
        torch.tensor([1, 0, 1]),
        torch.tensor([1, 0, 1], dtype=torch.uint8),
        torch.tensor([1, 0, 1], dtype=torch.int32),
    ],
    ids=["list_bool", "list_np_bool", "int64", "uint8", "int32"],
)
def test_is_desirable_accepted_forms(labels):
    """A list of Python or NumPy bools and integer 0/1 tensors are labels, read as True = 1 = desirable
    (each example gets its own side's formula), not refused and not misread."""
    pol, ref = _logps(1)[:2]
    beta, z0, wd, wu = 0.7, 0.2, 1.3, 0.6
    got = preference_loss(
        "kto",
        policy_logps=pol,
        ref_logps=ref,
        is_desirable=labels,
        kl=z0,
        beta=beta,
        desirable_weight=wd,
        undesirable_weight=wu,
        reduction="none",
    )
    expected = _kto_by_hand(pol, ref, [True, False, True], beta, z0, wd, wu)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "labels,exc,match",
    [
        ([1, 0, 1], TypeError, r"`is_desirable` must be a bool tensor \(or list of bools\) of shape \(3,\); got list"),
        ((1.0, 0.0, 1.0), TypeError, r"`is_desirable` must be a bool tensor \(or list of bools\) of shape \(3,\)"),
        (torch.tensor([1.0, 0.0, 1.0]), TypeError, r"`is_desirable` must be a bool tensor .*got dtype torch\.float32"),
        (torch.tensor([2, 0, 0]), ValueError, r"`is_desirable` must hold 0/1 \(or True/False\) labels"),
        (torch.tensor([0, 0, 3]), ValueError, r"`is_desirable` must hold 0/1 \(or True/False\) labels"),
        (
            torch.ones(B - 1, dtype=torch.bool),
            ValueError,
            rf"`is_desirable` must have shape \({B},\); got \({B - 1},\)",
        ),
    ],
    ids=["list_int", "tuple_float", "float_tensor_01", "int_2", "int_3", "short"],
)
def test_is_desirable_refused_forms(labels, exc, match):
    """Integers in a list, floats (even exactly 0/1) and integer labels other than 0/1 are refused, naming
    `is_desirable` and what it must be: a list of ints is not silently read as bools."""
    pol, ref = _logps(2)[:2]
    with pytest.raises(exc, match=match):
        preference_loss("kto", policy_logps=pol, ref_logps=ref, is_desirable=labels, kl=0.0)


@pytest.mark.parametrize(
    "labels",
    [[True, False, True], torch.tensor([True, False, True]), torch.tensor([1, 0, 1])],
    ids=["list", "bool", "int"],
)
def test_is_desirable_follows_the_logps_device(labels, monkeypatch):
    """Labels built on the CPU (a list always is) are moved to the log-probs' device. The ``meta`` device
    stands for the accelerator on a CPU-only machine; value checks are skipped as under ``torch.compile``
    (a meta tensor has no values to read), so the call only runs the device handling and the formula."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    pol = torch.zeros(B, dtype=DT, device="meta")
    out = preference_loss("kto", policy_logps=pol, ref_logps=pol, is_desirable=labels, kl=0.0, reduction="none")
    assert out.device.type == "meta" and out.shape == (B,) and out.dtype == DT


def _kto_args(form, **kw):
    c, r, cr, rr = _logps(3)
    if form == "policy":
        args = dict(policy_logps=c, ref_logps=cr, is_desirable=[True, False, True], kl=0.0)
    else:
        args = dict(chosen_logps=c, rejected_logps=r, ref_chosen_logps=cr, ref_rejected_logps=rr, kl=0.0)
    args.update(kw)
    return {k: v for k, v in args.items() if v is not None}


_EMPTY = torch.zeros(0, dtype=DT)
_UNPAIRED_FORM_CASES = [
    ("policy_list", "policy", dict(policy_logps=[0.0] * B), r"`policy_logps` must be a torch\.Tensor of shape \[B\]"),
    (
        "ref_short",
        "policy",
        dict(ref_logps=torch.zeros(B - 1, dtype=DT)),
        rf"`ref_logps` has shape \({B - 1},\) but the batch has {B} pairs: expected \({B},\)",
    ),
    (
        "policy_and_chosen",
        "policy",
        dict(chosen_logps=torch.zeros(B, dtype=DT)),
        r"pass either `policy_logps`/`ref_logps`/`is_desirable` or the chosen/rejected form",
    ),
    (
        "chosen_without_rejected",
        "pairs",
        dict(rejected_logps=None, ref_chosen_logps=None, ref_rejected_logps=None),
        r"Loss 'kto' needs `policy_logps`, `ref_logps`, `is_desirable` \(\[N\] each\), or `chosen_logps` and",
    ),
    (
        "chosen_int",
        "pairs",
        dict(chosen_logps=torch.zeros(B, dtype=torch.long)),
        r"`chosen_logps` must be a floating-point tensor \(log-probs\); got dtype torch\.int64",
    ),
    ("rejected_list", "pairs", dict(rejected_logps=[0.0] * B), r"`rejected_logps` must be a torch\.Tensor"),
    (
        "batch_empty",
        "pairs",
        dict(chosen_logps=_EMPTY, rejected_logps=_EMPTY, ref_chosen_logps=_EMPTY, ref_rejected_logps=_EMPTY),
        r"the batch is empty",
    ),
    (
        "no_reference",
        "pairs",
        dict(ref_chosen_logps=None, ref_rejected_logps=None),
        r"Loss 'kto' needs the reference model's log-probs: pass `ref_chosen_logps` and `ref_rejected_logps`",
    ),
    ("ref_chosen_list", "pairs", dict(ref_chosen_logps=[0.0] * B), r"`ref_chosen_logps` must be a torch\.Tensor"),
    (
        "ref_chosen_short",
        "pairs",
        dict(ref_chosen_logps=torch.zeros(B - 1, dtype=DT)),
        rf"`ref_chosen_logps` has shape \({B - 1},\) but the batch has {B} pairs: expected \({B},\)",
    ),
    (
        "ref_rejected_int",
        "pairs",
        dict(ref_rejected_logps=torch.zeros(B, dtype=torch.long)),
        r"`ref_rejected_logps` must be a floating-point tensor \(log-probs\); got dtype torch\.int64",
    ),
    (
        "ref_rejected_long",
        "pairs",
        dict(ref_rejected_logps=torch.zeros(B + 1, dtype=DT)),
        rf"`ref_rejected_logps` has shape \({B + 1},\) but the batch has {B} pairs: expected \({B},\)",
    ),
    (
        "kl_logps_list",
        "policy",
        dict(kl=None, kl_logps=[0.0] * B, ref_kl_logps=torch.zeros(B, dtype=DT)),
        r"`kl_logps` must be a torch\.Tensor",
    ),
    (
        "ref_kl_logps_list",
        "policy",
        dict(kl=None, kl_logps=torch.zeros(B, dtype=DT), ref_kl_logps=[0.0] * B),
        r"`ref_kl_logps` must be a torch\.Tensor",
    ),
    (
        "ref_kl_logps_short",
        "policy",
        dict(kl=None, kl_logps=torch.zeros(B, dtype=DT), ref_kl_logps=torch.zeros(B - 1, dtype=DT)),
        rf"`ref_kl_logps` has shape \({B - 1},\) but the batch has {B} pairs: expected \({B},\)",
    ),
    ("kl_vector", "policy", dict(kl=torch.zeros(B, dtype=DT)), r"`kl` must be a scalar; got \(\d+,\)"),
    ("kl_str", "policy", dict(kl="0"), r"`kl` must be a number or a tensor"),
]


@pytest.mark.parametrize(
    "form,kw,match", [c[1:] for c in _UNPAIRED_FORM_CASES], ids=[c[0] for c in _UNPAIRED_FORM_CASES]
)
def test_unpaired_inputs_bad_form(form, kw, match):
    """The unpaired losses' two input forms (policy/ref/is_desirable, or chosen = desirable and rejected =
    undesirable): a wrong tensor is named by its own argument name, a mixed or half form is refused."""
    with pytest.raises(ValueError, match=match):
        preference_loss("kto", **_kto_args(form, **kw))


def test_kto_pairs_form_one_sided_batch():
    """The chosen/rejected form may have one side empty: one desirable example and no undesirable one is
    a batch (not "empty"), its loss the desirable formula by hand."""
    c, cr = torch.tensor([-2.0], dtype=DT), torch.tensor([-2.5], dtype=DT)
    none = torch.zeros(0, dtype=DT)
    beta, z0 = 0.5, 0.1
    got = preference_loss(
        "kto", c, none, cr, none, kl=z0, beta=beta, desirable_weight=1.0, undesirable_weight=1.0, reduction="none"
    )
    expected = torch.tensor([1.0 - 1.0 / (1.0 + math.exp(-beta * ((-2.0 + 2.5) - z0)))], dtype=DT)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


def test_number_inputs_follow_the_logps_device(monkeypatch):
    """A per-batch input given as a Python number (KTO's ``kl``, RPO's ``chosen_nll``) becomes a tensor on
    the log-probs' device, not the default one: ``meta`` stands for the accelerator, value checks are
    skipped as under ``torch.compile`` (see test_is_desirable_follows_the_logps_device)."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    x = torch.zeros(B, dtype=DT, device="meta")
    _, metrics = preference_loss_and_metrics("kto", policy_logps=x, ref_logps=x, is_desirable=[True] * B, kl=0.0)
    assert metrics["kl"].device.type == "meta"
    loss = preference_loss("rpo", x, x, x, x, chosen_nll=1.0)
    assert loss.device.type == "meta" and loss.shape == ()
    loss = preference_loss("expo", x, x, x, x, lam=0.1, kl_estimator="token", token_kl=0.2)
    assert loss.device.type == "meta" and loss.shape == ()


_PAIRED_FORM_CASES = [
    (
        "rejected_missing",
        dict(rejected_logps=None),
        r"Loss \['sigmoid'\] needs `chosen_logps` and `rejected_logps` \(shape \[B\]\)",
    ),
    (
        "ref_rejected_long",
        dict(ref_rejected_logps=torch.zeros(B + 1, dtype=DT)),
        rf"`ref_rejected_logps` has shape \({B + 1},\) but the batch has {B} pairs: expected \({B},\)",
    ),
    (
        "rejected_lengths_long",
        dict(rejected_lengths=torch.full((B + 1,), 5)),
        rf"`rejected_lengths` must have shape \({B},\) \(one entry per pair\); got \({B + 1},\)",
    ),
]


@pytest.mark.parametrize("kw,match", [c[1:] for c in _PAIRED_FORM_CASES], ids=[c[0] for c in _PAIRED_FORM_CASES])
def test_paired_inputs_bad_form(kw, match):
    """Paired losses: a missing or mis-sized tensor is named by its own argument name and expected shape."""
    c, r, cr, rr = _logps(4)
    args = dict(chosen_logps=c, rejected_logps=r, ref_chosen_logps=cr, ref_rejected_logps=rr, **LENS)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        preference_loss("sigmoid", **{k: v for k, v in args.items() if v is not None})


def test_unknown_hparam_after_shared_option():
    """A shared option (``f_alpha_divergence_coef``) passed first does not end the unknown-name check."""
    with pytest.raises(ValueError, match=r"Unknown hyperparameter `bta` for loss 'sigmoid'"):
        _call(preference_loss, "sigmoid", dict(f_alpha_divergence_coef=0.5, bta=0.1))


def test_loss_weights_tensor_by_hand():
    """``loss_weights`` may be a 1-D tensor; a weight of 2 doubles its loss: 2 * sigmoid + 1 * hinge by hand."""
    c, r, cr, rr = _logps(5)
    beta = 0.1
    got = preference_loss(
        ["sigmoid", "hinge"], c, r, cr, rr, beta=beta, loss_weights=torch.tensor([2.0, 1.0]), reduction="none"
    )
    exp = []
    for a, b, ca, rb in zip(c.tolist(), r.tolist(), cr.tolist(), rr.tolist(), strict=True):
        z = beta * ((a - ca) - (b - rb))
        exp.append(2.0 * math.log1p(math.exp(-z)) + max(0.0, 1.0 - z))
    torch.testing.assert_close(got, torch.tensor(exp, dtype=DT), rtol=1e-12, atol=0)


def _finite_pairs(n=3):
    g = torch.Generator().manual_seed(21)
    c = -torch.rand(n, generator=g, dtype=DT) * 5
    return c, c - 1.0, c + 0.5, c - 0.5


_NAN = torch.tensor([0.0, math.nan, 0.0], dtype=DT)


@pytest.mark.parametrize(
    "name, extra, where",
    [
        ("sft", dict(chosen_nll=torch.tensor([1.0, math.inf, 1.0], dtype=DT)), "chosen_nll"),
        ("odpo", dict(offset=torch.tensor([1.0, math.nan, 1.0], dtype=DT)), "offset"),
        (
            "expo",
            dict(lam=0.1, kl_estimator="token", token_kl=torch.tensor([0.1, math.inf, 0.1], dtype=DT)),
            "token_kl",
        ),
        (
            "simpo",
            dict(chosen_lengths=torch.tensor([2.0, math.nan, 3.0], dtype=DT), rejected_lengths=torch.full((3,), 2)),
            "chosen_lengths",
        ),
        (
            "simpo",
            dict(chosen_lengths=torch.full((3,), 2), rejected_lengths=torch.tensor([2.0, 2.0, math.nan], dtype=DT)),
            "rejected_lengths",
        ),
    ],
)
def test_a_non_finite_loss_names_the_paired_input(name, extra, where):
    # the loss comes out NaN or inf because of one input (a NaN: an infinite log-prob or length can saturate to a
    # finite loss): the error names that input
    c, r, cr, rr = _finite_pairs()
    with pytest.raises(ValueError, match=rf"`{where}` contains NaN or inf values \(the loss came out non-finite\)"):
        preference_loss(name, c, r, cr, rr, **extra)


@pytest.mark.parametrize("where", ["policy_logps", "ref_logps", "kl_logps", "ref_kl_logps"])
def test_a_non_finite_kto_loss_names_the_unpaired_input(where):
    pol, ref = torch.tensor([-1.0, -2.0, -3.0], dtype=DT), torch.tensor([-1.5, -2.5, -2.0], dtype=DT)
    inputs = dict(policy_logps=pol, ref_logps=ref, kl_logps=pol - 0.1, ref_kl_logps=ref)
    inputs[where] = inputs[where] + _NAN
    lab = torch.tensor([True, False, True])
    with pytest.raises(ValueError, match=rf"`{where}` contains NaN or inf values \(the loss came out non-finite\)"):
        preference_loss("kto", is_desirable=lab, **inputs)


def test_a_nan_kl_tensor_is_named():
    # a tensor `kl` is not looked into before the loss runs (it may live on an accelerator): the NaN it
    # carries into KTO's loss is named afterwards
    pol, ref = torch.tensor([-1.0, -2.0], dtype=DT), torch.tensor([-1.5, -2.5], dtype=DT)
    lab = torch.tensor([True, False])
    with pytest.raises(ValueError, match=r"^`kl` contains NaN or inf values \(the loss came out non-finite\)\.$"):
        preference_loss("kto", policy_logps=pol, ref_logps=ref, is_desirable=lab, kl=torch.tensor(math.nan, dtype=DT))


@pytest.mark.parametrize(
    "name, shown", [("sppo_hard", "'sppo_hard'"), (["sppo_hard", "sigmoid"], "['sppo_hard', 'sigmoid']")]
)
def test_an_overflow_from_finite_inputs_names_the_losses_and_hyperparameters(name, shown):
    # SPPO-hard squares the log-ratio: 1e20 squared overflows float32 although every input is finite
    c, zero = torch.tensor([1e20, 0.0]), torch.zeros(2)
    want = (
        f"Loss {shown} came out non-finite from finite inputs: it overflowed the torch.float32 range; check the "
        "scale of the log-probs and the hyperparameters {'beta': 0.5}."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(want)}$"):
        preference_loss(name, c, zero, zero, zero, beta=0.5)


def test_numpy_1_bool_scalars_count_as_bools():
    # NumPy 1 names its bool scalar type `bool_` (NumPy 2, installed here: `bool`): a stand-in type with NumPy's
    # module and that name is a bool, another NumPy scalar type is not
    from expo_kernels.losses.registry import is_bool

    assert is_bool(type("bool_", (), {"__module__": "numpy"})())
    assert is_bool(np.bool_(True)) and is_bool(False)
    assert not is_bool(type("float64", (), {"__module__": "numpy"})()) and not is_bool(np.float64(1.0))

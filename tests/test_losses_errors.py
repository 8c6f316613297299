"""Clear errors of expo_kernels.losses: bad hyperparameters, missing / mismatched inputs, unknown names."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from expo_kernels.losses import LOSSES, aggregate_pair_logps, preference_loss, preference_loss_and_metrics, wpo_weights
from expo_kernels.losses.registry import HParamTypeError

DT = torch.float64
B = 4


def _x(seed=0, b=B):
    g = torch.Generator().manual_seed(seed)
    return [-torch.rand(b, generator=g, dtype=DT) * 10 for _ in range(4)]


LENS = dict(chosen_lengths=torch.full((B,), 5), rejected_lengths=torch.full((B,), 7))


@pytest.mark.parametrize("name", ["sigmoid", "ipo", "hinge", "simpo", "orpo", "cpo", "kto", "discopop"])
@pytest.mark.parametrize("beta", [0.0, -0.1, float("nan"), float("inf")])
def test_beta_must_be_positive(name, beta):
    c, r, cr, rr = _x()
    with pytest.raises(ValueError, match=r"`beta` must be a finite number > 0"):
        preference_loss(
            name, c, r, cr, rr, beta=beta, kl=0.0 if name == "kto" else None, **LENS
        ) if name == "kto" else preference_loss(name, c, r, cr, rr, beta=beta, **LENS)


@pytest.mark.parametrize(
    "name,eps",
    [
        ("sigmoid", 0.5),
        ("sigmoid", -0.01),
        ("robust", 0.5),
        ("robust", 0.7),
        ("aot", 0.6),
        ("simpo", 0.5),
        ("rpo", 1.0),
    ],
)
def test_label_smoothing_range(name, eps):
    c, r, cr, rr = _x()
    with pytest.raises(ValueError, match=r"`label_smoothing` must be a number in \[0, 0.5\)"):
        preference_loss(name, c, r, cr, rr, label_smoothing=eps, **LENS)


@pytest.mark.parametrize("eps", [0.0, 0.5, -1e-3])
def test_exo_pair_needs_positive_eps(eps):
    c, r, cr, rr = _x()
    with pytest.raises(
        ValueError,
        match=r"`label_smoothing` must be a number in \(0, 0.5\) \(EXO's eps: 0 makes log\(eps\) infinite; the EXO paper recommends 1e-3\); got ",
    ):
        preference_loss("exo_pair", c, r, cr, rr, label_smoothing=eps)


def test_label_smoothing_not_taken_by_hinge():
    c, r, cr, rr = _x()
    with pytest.raises(ValueError, match=r"Unknown hyperparameter `label_smoothing` for loss 'hinge'.*accepted"):
        preference_loss("hinge", c, r, cr, rr, label_smoothing=0.1)


@pytest.mark.parametrize("variant", ["hinge", "ipo"])
def test_cpo_label_smoothing_with_hinge_or_ipo_variant(variant):
    c, r, _, _ = _x()
    with pytest.raises(ValueError, match=f"label_smoothing.*not used by the '{variant}' variant"):
        preference_loss("cpo", c, r, cpo_loss_type=variant, label_smoothing=0.1, **LENS)


@pytest.mark.parametrize(
    "bad,suggest",
    [("sigmoidd", "sigmoid"), ("simPO", "simpo"), ("kto_pair", "kto"), ("ipo_norm", "ipo"), ("exo", "expo")],
)
def test_unknown_name_suggests_closest(bad, suggest):
    c, r, cr, rr = _x()
    with pytest.raises(ValueError, match=rf"Unknown preference loss '{bad}'\. Did you mean .*'{suggest}'"):
        preference_loss(bad, c, r, cr, rr)


def test_unknown_name_without_close_match_lists_all():
    c, r, cr, rr = _x()
    with pytest.raises(ValueError, match=r"Unknown preference loss 'zzzzzz'\. Known losses: \["):
        preference_loss("zzzzzz", c, r, cr, rr)


@pytest.mark.parametrize("bad", [None, 3, [], ["sigmoid", 2]])
def test_bad_name_type(bad):
    c, r, cr, rr = _x()
    with pytest.raises(ValueError, match="name"):
        preference_loss(bad, c, r, cr, rr)


def test_unknown_hyperparameter_typo():
    c, r, cr, rr = _x()
    with pytest.raises(ValueError, match=r"Unknown hyperparameter `bta` for loss 'sigmoid'; accepted: \['beta'"):
        preference_loss("sigmoid", c, r, cr, rr, bta=0.1)


@pytest.mark.parametrize("name", ["sigmoid", "ipo", "nca_pair", "aot", "apo_zero", "rpo", "odpo"])
def test_missing_reference(name):
    c, r, _, _ = _x()
    # the whole message (a loss that says why it needs them adds it before the full stop)
    want = (
        f"Loss '{name}' needs the reference model's log-probs: pass `ref_chosen_logps` and `ref_rejected_logps` "
        "(shape [B], summed over completion tokens)."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(want)}$"):
        preference_loss(name, c, r, offset=0.1, **LENS) if name == "odpo" else preference_loss(name, c, r, **LENS)


def test_only_one_reference():
    c, r, cr, _ = _x()
    with pytest.raises(ValueError, match="both `ref_chosen_logps` and `ref_rejected_logps`"):
        preference_loss("sigmoid", c, r, cr)


@pytest.mark.parametrize("est", ["sequence", "pair"])
def test_expo_needs_reference_for_kl(est):
    c, r, _, _ = _x()
    with pytest.raises(ValueError, match=r"needs the reference model's log-probs.*KL regulariser.*lam=0"):
        preference_loss("expo", c, r, lam=0.5, kl_estimator=est)
    preference_loss("expo", c, r, lam=0.0, kl_estimator=est)  # fine without a reference


def test_expo_token_estimator_needs_fused_module():
    c, r, cr, rr = _x()
    with pytest.raises(ValueError, match=r"kl_estimator='token'.*hidden states.*FusedLinearEXPOLoss.*token_kl"):
        preference_loss("expo", c, r, cr, rr, lam=0.5, kl_estimator="token")
    with pytest.raises(ValueError, match="`token_kl` was given but kl_estimator='sequence'"):
        preference_loss("expo", c, r, cr, rr, lam=0.5, token_kl=torch.zeros(B, dtype=DT))
    with pytest.raises(ValueError, match=r"`token_kl` must be a scalar or have shape \(4,\) or \(8,\)"):
        preference_loss("expo", c, r, lam=0.5, kl_estimator="token", token_kl=torch.zeros(3, dtype=DT))
    with pytest.raises(ValueError, match="`token_kl` is only used by the 'expo' loss"):
        preference_loss("sigmoid", c, r, cr, rr, token_kl=torch.zeros(B, dtype=DT))


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(), r"`lam` is required"),
        (dict(lam=-0.1), r"`lam` must be a finite number >= 0"),
        (dict(lam=1.0, kl_estimator="regression"), r"`kl_estimator` must be one of \['sequence', 'pair', 'token'\]"),
    ],
)
def test_expo_hparams(kw, match):
    c, r, cr, rr = _x()
    with pytest.raises(ValueError, match=match):
        preference_loss("expo", c, r, cr, rr, **kw)


@pytest.mark.parametrize(
    "field,value,match",
    [
        (
            "rejected_logps",
            torch.zeros(B + 1, dtype=DT),
            r"`rejected_logps` has shape \(5,\) but the batch has 4 pairs",
        ),
        ("ref_chosen_logps", torch.zeros(B - 1, dtype=DT), r"`ref_chosen_logps` has shape \(3,\)"),
        ("chosen_logps", torch.zeros(B, 2, dtype=DT), r"`chosen_logps` must be 1-D"),
        ("chosen_logps", torch.zeros(B, dtype=torch.long), r"`chosen_logps` must be a floating-point tensor"),
        ("chosen_logps", [0.0] * B, r"`chosen_logps` must be a torch.Tensor"),
        ("chosen_lengths", torch.ones(B + 2), r"`chosen_lengths` must have shape \(4,\)"),
        ("weights", torch.ones(B + 1, dtype=DT), r"`weights` has shape \(5,\)"),
        ("offset", torch.ones(2, dtype=DT), r"`offset` must be a scalar or have shape \(4,\)"),
        ("chosen_nll", torch.ones(3, dtype=DT), r"`chosen_nll` must be a scalar or have shape \(4,\)"),
    ],
)
def test_mismatched_shapes(field, value, match):
    c, r, cr, rr = _x()
    args = dict(chosen_logps=c, rejected_logps=r, ref_chosen_logps=cr, ref_rejected_logps=rr, **LENS)
    args[field] = value
    name = "odpo" if field == "offset" else ("rpo" if field == "chosen_nll" else "ipo")
    with pytest.raises(ValueError, match=match):
        preference_loss(name, **args)


def test_empty_batch():
    e = torch.zeros(0, dtype=DT)
    with pytest.raises(ValueError, match="at least one pair"):
        preference_loss("sigmoid", e, e, e, e)


@pytest.mark.parametrize("name", ["ipo", "sigmoid_norm", "simpo", "orpo", "alphapo"])
def test_missing_lengths(name):
    c, r, cr, rr = _x()
    with pytest.raises(ValueError, match=rf"Loss '{name}' normalizes by completion length: pass `chosen_lengths`"):
        preference_loss(name, c, r, cr, rr)
    for one in (dict(chosen_lengths=LENS["chosen_lengths"]), dict(rejected_lengths=LENS["rejected_lengths"])):
        with pytest.raises(ValueError, match=rf"Loss '{name}' normalizes by completion length"):
            preference_loss(name, c, r, cr, rr, **one)


@pytest.mark.parametrize("name", ["sft", "cpo", "rpo"])
def test_missing_nll_inputs(name):
    c, r, cr, rr = _x()
    with pytest.raises(ValueError, match=rf"Loss '{name}' has an NLL term.*`chosen_lengths`.*`chosen_nll`"):
        preference_loss(name, c, r, cr, rr)


def test_odpo_needs_offset():
    c, r, cr, rr = _x()
    with pytest.raises(ValueError, match="Loss 'odpo' needs `offset`"):
        preference_loss("odpo", c, r, cr, rr)
    with pytest.raises(ValueError, match="`offset` is only used by the 'odpo' loss"):
        preference_loss("sigmoid", c, r, cr, rr, offset=1.0)


def test_unknown_f_divergence_type():
    c, r, cr, rr = _x()
    with pytest.raises(ValueError, match=r"Unknown f_divergence_type 'kl'; expected one of \['reverse_kl'"):
        preference_loss("sigmoid", c, r, cr, rr, f_divergence_type="kl")
    with pytest.raises(ValueError, match=r"Unknown f_divergence_type 'kl'"):
        preference_loss("nca_pair", c, r, cr, rr, f_divergence_type="kl")


@pytest.mark.parametrize("name", ["nca_pair", ["sigmoid", "nca_pair"], "aot", "bco_pair"])
def test_f_divergence_unsupported_loss(name):
    c, r, cr, rr = _x()
    with pytest.raises(ValueError, match="f_divergence_type='forward_kl' is only defined for"):
        preference_loss(name, c, r, cr, rr, f_divergence_type="forward_kl")


@pytest.mark.parametrize(
    "name,kw,why",
    [
        ("aot", {}, "sorts the batch"),
        ("aot_unpaired", {}, "sorts the batch"),
        ("sft", LENS, "token mean over the whole batch"),
        ("cpo", LENS, "token mean over the whole batch"),
        ("orpo", LENS, "token mean over the whole batch"),
        ("rpo", dict(chosen_nll=torch.tensor(1.0, dtype=DT)), "single batch-level number"),
        (["sigmoid", "aot"], {}, "sorts the batch"),
    ],
)
def test_reduction_none_refused_for_batch_coupled(name, kw, why):
    c, r, cr, rr = _x()
    with pytest.raises(ValueError, match=rf"reduction='none' is not available for loss .*{why}"):
        preference_loss(name, c, r, cr, rr, reduction="none", **kw)


def test_reduction_none_kto_batch_kl_refused_but_precomputed_ok():
    pol, ref, klp, klr = _x()
    lab = torch.tensor([True, False, True, False])
    with pytest.raises(ValueError, match="reduction='none'.*KL baseline z0 is a statistic of the whole batch"):
        preference_loss(
            "kto", policy_logps=pol, ref_logps=ref, is_desirable=lab, kl_logps=klp, ref_kl_logps=klr, reduction="none"
        )
    out = preference_loss("kto", policy_logps=pol, ref_logps=ref, is_desirable=lab, kl=0.2, reduction="none")
    assert out.shape == (B,)


def test_bad_reduction():
    c, r, cr, rr = _x()
    with pytest.raises(ValueError, match=r"`reduction` must be one of \['mean', 'sum', 'none'\]"):
        preference_loss("sigmoid", c, r, cr, rr, reduction="avg")


def test_kto_errors():
    pol, ref, klp, klr = _x()
    lab = torch.tensor([True, False, True, False])
    with pytest.raises(ValueError, match=r"KL baseline needs a batch of more than 1 example"):
        preference_loss(
            "kto", policy_logps=pol[:1], ref_logps=ref[:1], is_desirable=lab[:1], kl_logps=klp[:1], ref_kl_logps=klr[:1]
        )
    with pytest.raises(ValueError, match=r"Loss 'kto' needs a KL baseline: pass `kl_logps` and `ref_kl_logps`"):
        preference_loss("kto", policy_logps=pol, ref_logps=ref, is_desirable=lab)
    with pytest.raises(ValueError, match="`is_desirable`"):
        preference_loss("kto", policy_logps=pol, ref_logps=ref, kl=0.0)
    with pytest.raises(ValueError, match=r"`is_desirable` must have shape \(4,\)"):
        preference_loss("kto", policy_logps=pol, ref_logps=ref, is_desirable=lab[:3], kl=0.0)
    with pytest.raises(ValueError, match="needs the reference model's log-probs: pass `ref_logps`"):
        preference_loss("kto", policy_logps=pol, is_desirable=lab, kl=0.0)
    with pytest.raises(ValueError, match="not both"):
        preference_loss("kto", pol, ref, policy_logps=pol, ref_logps=ref, is_desirable=lab, kl=0.0)
    with pytest.raises(ValueError, match="both `kl_logps` and `ref_kl_logps`"):
        preference_loss("kto", policy_logps=pol, ref_logps=ref, is_desirable=lab, kl_logps=klp)
    with pytest.raises(ValueError, match="cannot be mixed"):
        preference_loss(["kto", "sigmoid"], pol, ref, klp, klr, kl=0.0)
    with pytest.raises(ValueError, match="per-pair \\(WPO\\) weights"):
        preference_loss(
            "kto", policy_logps=pol, ref_logps=ref, is_desirable=lab, kl=0.0, weights=torch.ones(B, dtype=DT)
        )
    with pytest.raises(ValueError, match="inputs of the unpaired losses"):
        preference_loss("sigmoid", pol, ref, klp, klr, is_desirable=lab)
    with pytest.raises(ValueError, match="`desirable_weight` must be a finite number >= 0"):
        preference_loss("kto", policy_logps=pol, ref_logps=ref, is_desirable=lab, kl=0.0, desirable_weight=-1.0)
    # batch size 1 is fine with a precomputed baseline
    preference_loss("kto", policy_logps=pol[:1], ref_logps=ref[:1], is_desirable=lab[:1], kl=0.0)


def test_weights_with_sorting_losses():
    c, r, cr, rr = _x()
    with pytest.raises(ValueError, match=r"`weights` \(WPO per-pair weighting\) cannot be used with \['aot'\]"):
        preference_loss("aot", c, r, cr, rr, weights=torch.ones(B, dtype=DT))


def test_loss_weights_errors():
    c, r, cr, rr = _x()
    with pytest.raises(ValueError, match="`loss_weights` must have one weight per loss: 1 weights for 2 losses"):
        preference_loss(["sigmoid", "hinge"], c, r, cr, rr, loss_weights=[1.0])
    with pytest.raises(ValueError, match="finite numbers"):
        preference_loss(["sigmoid", "hinge"], c, r, cr, rr, loss_weights=[1.0, float("nan")])


def test_other_hparam_ranges():
    c, r, cr, rr = _x()
    with pytest.raises(ValueError, match="`discopop_tau` must be a finite number > 0"):
        preference_loss("discopop", c, r, cr, rr, discopop_tau=0.0)
    with pytest.raises(ValueError, match=r"`cpo_loss_type` must be one of \['sigmoid', 'hinge', 'ipo', 'simpo'\]"):
        preference_loss("cpo", c, r, cpo_loss_type="kto_pair", **LENS)
    with pytest.raises(ValueError, match="`cpo_alpha` must be a finite number >= 0"):
        preference_loss("cpo", c, r, cpo_alpha=-1.0, **LENS)
    with pytest.raises(ValueError, match="`gamma` given twice"):
        preference_loss("simpo", c, r, gamma=0.5, simpo_gamma=0.5, **LENS)


def test_metrics_entry_point_checks_too():
    c, r, _, _ = _x()
    with pytest.raises(ValueError, match="needs the reference"):
        preference_loss_and_metrics("sigmoid", c, r)


def test_aggregate_errors():
    lp = -torch.rand(4, 5, dtype=DT)
    mask = torch.ones(4, 5)
    for bad in (-0.1, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match=r"`ld_alpha` must be a number in \[0, 1\]"):
            aggregate_pair_logps(lp, mask, ld_alpha=bad)
    with pytest.raises(ValueError, match="even number of rows"):
        aggregate_pair_logps(lp[:3], mask[:3])
    with pytest.raises(ValueError, match="`completion_mask` must have the shape"):
        aggregate_pair_logps(lp, mask[:, :4])
    with pytest.raises(ValueError, match=r"must be a 2-D tensor \[R, T\]"):
        aggregate_pair_logps(lp[0], mask[0])
    with pytest.raises(ValueError, match="`log_sum_p2` must have the shape"):
        wpo_weights(lp, lp[:, :2], mask)
    with pytest.raises(
        ValueError, match=r"`per_token_logps` must be a floating-point tensor \(log-probs\); got dtype torch.int64"
    ):
        aggregate_pair_logps(lp.long(), mask)
    with pytest.raises(ValueError, match="`log_sum_p2` must be a floating-point tensor"):
        wpo_weights(lp, lp.long(), mask)


@pytest.mark.parametrize(
    "name, hp, wrong_type",
    [
        ("sigmoid", dict(beta="0.1"), True),  # a number check given a string
        ("sigmoid", dict(beta=-1.0), False),  # ... given a number out of range
        ("sigmoid", dict(f_divergence_type=3), True),  # a string choice given a number
        ("sigmoid", dict(f_divergence_type="kl"), False),  # ... given an unknown string
        ("exo_pair", dict(label_smoothing="a"), True),  # a custom check: the kind is read from the default
        ("exo_pair", dict(label_smoothing=0.0), False),
        ("expo", dict(lam=0.1, kl_estimator=2), True),  # a string choice checked by the registry itself
        ("expo", dict(lam=0.1, kl_estimator="tokens"), False),
        ("cpo", dict(cpo_loss_type=None), True),
    ],
)
def test_wrong_type_vs_out_of_range(name, hp, wrong_type):
    # a value of the wrong type is an HParamTypeError (a TypeError and a ValueError), a value of the right
    # type out of range a plain ValueError
    c, r, cr, rr = _x()
    with pytest.raises(ValueError) as info:
        preference_loss(name, c, r, cr, rr, **hp)
    assert isinstance(info.value, HParamTypeError) is wrong_type, info.value
    assert isinstance(info.value, TypeError) is wrong_type


def test_wrong_type_follows_the_check_then_the_default():
    # The kind a check declares (one_of: "str") wins over the default's type (here none: REQUIRED); a check that
    # declares nothing takes the default's kind, a string default included.
    from expo_kernels.losses.registry import REQUIRED, HParam, one_of, positive

    def choice(value):
        return None if value in ("a", "b") else "'a' or 'b'"

    cases = [
        (HParam("mode", REQUIRED, "", one_of("a", "b")), 3, True),
        (HParam("mode", REQUIRED, "", one_of("a", "b")), "c", False),
        (HParam("scale", REQUIRED, "", positive), "1", True),
        (HParam("scale", REQUIRED, "", positive), -1.0, False),
        (HParam("mode", "a", "", choice), 1.0, True),
        (HParam("mode", "a", "", choice), "c", False),
        (HParam("scale", 1.0, "", lambda v: None if v == 1.0 else "1.0"), "x", True),
        (HParam("scale", 1.0, "", lambda v: None if v == 1.0 else "1.0"), 2.0, False),
    ]
    for hparam, value, wrong_type in cases:
        with pytest.raises(ValueError, match=f"`{hparam.name}` must be .*; got {type(value).__name__} ") as info:
            hparam.validate("toy", value)
        assert isinstance(info.value, HParamTypeError) is wrong_type, (hparam, value)


@pytest.mark.parametrize(
    "bad,hint",
    [
        # similarity ratio (difflib) 0.857 for 'odpo', 0.667 for 'rpo', 'ipo', 'cpo', ...: the closest three, in order
        ("dpo", "Did you mean 'odpo' or 'rpo' or 'ipo'?"),
        # 'nca_pair' at ratio 0.545: above the cutoff of 0.5 (difflib's own default, 0.6, would drop it)
        ("nca", "Did you mean 'nca_pair'?"),
    ],
)
def test_unknown_name_hint_lists_at_most_three_names_above_half_similarity(bad, hint):
    c, r, cr, rr = _x()
    with pytest.raises(ValueError, match=rf"^Unknown preference loss '{bad}'\. {re.escape(hint)} Known losses: \["):
        preference_loss(bad, c, r, cr, rr)


def test_a_one_name_list_is_that_loss():
    c, r, cr, rr = _x()
    want = preference_loss("sigmoid", c, r, cr, rr, beta=0.3)
    for name in (["sigmoid"], ("sigmoid",)):
        assert torch.equal(preference_loss(name, c, r, cr, rr, beta=0.3), want)


@pytest.mark.parametrize(
    "hp,message",
    [
        (dict(beta=-1.0), "hyperparameter `beta` must be a finite number > 0; got float -1.0."),
        (dict(label_smoothing=0.7), "hyperparameter `label_smoothing` must be a number in [0, 0.5); got float 0.7."),
    ],
)
def test_a_bad_hyperparameter_value_names_the_loss(hp, message):
    c, r, cr, rr = _x()
    with pytest.raises(ValueError, match=rf"^Loss 'sigmoid': {re.escape(message)}$"):
        preference_loss("sigmoid", c, r, cr, rr, **hp)


def test_resolved_numbers_are_python_floats():
    # numbers of any kind (int, NumPy scalars) reach the losses as Python floats; strings stay as given
    spec = LOSSES["sigmoid"]
    got = spec.resolve({"beta": np.float32(0.25), "label_smoothing": 0, "f_divergence_type": "forward_kl"})
    assert type(got["beta"]) is float and got["beta"] == 0.25
    assert type(got["label_smoothing"]) is float and got["label_smoothing"] == 0.0
    assert got["f_divergence_type"] == "forward_kl"

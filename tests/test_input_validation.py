"""Bad input gets a ValueError/TypeError that names the argument and what was expected."""

import math

import pytest
import torch
from conftest import DEVICE
from helpers import BACKEND_NAMES

import expo_kernels as ek

BACKENDS = BACKEND_NAMES


def good():
    return dict(
        hidden=torch.randn(2, 3, 8, device=DEVICE),
        weight=torch.randn(20, 8, device=DEVICE),
        labels=torch.randint(0, 20, (2, 3), device=DEVICE),
    )


CASES = [
    ("hidden not a tensor", dict(hidden=[[1.0] * 8]), TypeError, "hidden must be a torch.Tensor"),
    ("integer hidden", dict(hidden=torch.ones(2, 3, 8, dtype=torch.long)), TypeError, "hidden must be float32"),
    ("float labels", dict(labels=torch.zeros(2, 3)), TypeError, "labels must be an integer tensor"),
    ("weight rank", dict(weight=torch.randn(20, 8, 1)), ValueError, r"weight must have shape \[V, H\] \(2 dim"),
    ("hidden size", dict(weight=torch.randn(20, 7)), ValueError, "H = hidden.shape\\[-1\\] = 8"),
    ("labels shape", dict(labels=torch.zeros(2, 4, dtype=torch.long)), ValueError, "labels must have shape"),
    ("dtype mismatch", dict(weight=torch.randn(20, 8, dtype=torch.float64)), TypeError, "weight.dtype"),
    ("bias shape", dict(bias=torch.randn(19)), ValueError, r"bias must have shape \[V\]"),
    ("bias dtype", dict(bias=torch.randn(20, dtype=torch.float64)), TypeError, "bias.dtype"),
    ("label too large", dict(labels=torch.full((2, 3), 20)), ValueError, r"labels must be in \[0, 20\)"),
    ("negative label", dict(labels=torch.full((2, 3), -1)), ValueError, "found -1"),
    ("temperature 0", dict(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
    ("temperature nan", dict(temperature=math.nan), ValueError, "temperature"),
    ("softcap negative", dict(softcap=-1.0), ValueError, "softcap must be"),
    ("logit_scale inf", dict(logit_scale=math.inf), ValueError, "logit_scale must be"),
    ("ignore_index float", dict(ignore_index=-100.0), TypeError, "ignore_index must be an int"),
    ("unknown backend", dict(backend="cuda"), ValueError, "backend must be one of"),
    ("backend not a str", dict(backend=1), TypeError, "backend must be None or one of"),
    ("hidden scalar", dict(hidden=torch.tensor(1.0)), ValueError, "hidden must have shape"),
    ("hidden size 0", dict(hidden=torch.randn(2, 3, 0), weight=torch.randn(20, 0)), ValueError, "hidden size H"),
    ("weight empty vocab", dict(weight=torch.randn(0, 8)), ValueError, "weight must have at least one row"),
    ("weight not a tensor", dict(weight=None), TypeError, "weight must be a torch.Tensor"),
    ("labels not a tensor", dict(labels=[[1, 2, 3], [4, 5, 6]]), TypeError, "labels must be a torch.Tensor"),
    ("bool labels", dict(labels=torch.zeros(2, 3, dtype=torch.bool)), TypeError, "labels must be an integer tensor"),
    ("bias not a tensor", dict(bias=[0.0] * 20), TypeError, "bias must be a torch.Tensor"),
    ("bias int", dict(bias=torch.zeros(20, dtype=torch.long)), TypeError, "bias must be float32"),
    ("hidden NaN", dict(hidden=torch.full((2, 3, 8), math.nan)), ValueError, "hidden contains NaN"),
    ("weight inf", dict(weight=torch.full((20, 8), math.inf)), ValueError, "weight contains NaN or inf"),
    ("bias +inf", dict(bias=torch.full((20,), math.inf)), ValueError, r"bias contains NaN or \+inf"),
    ("bias all masked", dict(bias=torch.full((20,), -math.inf)), ValueError, "every vocabulary entry is masked"),
    ("temperature str", dict(temperature="1.0"), ValueError, "temperature must be a finite number > 0"),
    ("temperature bool", dict(temperature=True), ValueError, "temperature must be a finite number > 0"),
    ("logit_scale 0", dict(logit_scale=0.0), ValueError, "logit_scale must be"),
    ("softcap str", dict(softcap="30"), ValueError, "softcap must be"),
    ("ignore_index bool", dict(ignore_index=True), TypeError, "ignore_index must be an int"),
    ("ignore_index huge", dict(ignore_index=2**64), ValueError, "ignore_index must fit in int64"),
    ("return_stats str", dict(return_stats="no"), TypeError, "return_stats must be a bool"),
    ("return_stats None", dict(return_stats=None), TypeError, "return_stats must be a bool"),
    ("process_group int", dict(process_group=1), TypeError, "process_group must be None or a torch.distributed"),
    ("process_group str", dict(process_group="world"), TypeError, "process_group must be None or a torch.distr"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case):
    _, override, exc, match = case
    kwargs = good()
    for k, v in override.items():
        kwargs[k] = v.to(DEVICE) if isinstance(v, torch.Tensor) else v
    with pytest.raises(exc, match=match):
        ek.linear_logprobs(**kwargs)


def test_device_mismatch():
    """Two devices on every machine: the ``meta`` device next to the tests' one (a CUDA one where there is
    a GPU, the CPU elsewhere), so the check runs everywhere instead of being skipped without a GPU."""
    kwargs = good()
    kwargs["weight"] = kwargs["weight"].to("meta")
    with pytest.raises(ValueError, match=f"weight is on meta but hidden is on {DEVICE.type}"):
        ek.linear_logprobs(**kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["hidden", "weight", "bias"])
def test_non_finite_inputs_are_named(backend, where):
    kwargs = good()
    kwargs["bias"] = torch.zeros(20, device=DEVICE)
    kwargs[where].view(-1)[3] = math.nan if where != "weight" else math.inf
    with pytest.raises(ValueError, match=f"{where} contains NaN or"):
        ek.linear_logprobs(**kwargs, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_at_ignored_positions_is_harmless(backend):
    # Ignored tokens are dropped before any kernel runs, so garbage there cannot leak in.
    kwargs = good()
    kwargs["hidden"][0, 0] = math.nan
    kwargs["labels"][0, 0] = -100
    logp = ek.linear_logprobs(**kwargs, backend=backend)
    assert torch.isfinite(logp).all() and logp[0, 0] == 0


# ------------------------------------------------------------------------------------------------
# linear_token_kl: the same matrix, plus the reference head's own arguments
# ------------------------------------------------------------------------------------------------


def good_kl():
    return dict(
        hidden=torch.randn(2, 3, 8, device=DEVICE),
        weight=torch.randn(20, 8, device=DEVICE),
        ref_hidden=torch.randn(2, 3, 6, device=DEVICE),
        ref_weight=torch.randn(20, 6, device=DEVICE),
        labels=torch.randint(0, 20, (2, 3), device=DEVICE),
    )


KL_CASES = [
    ("hidden not a tensor", dict(hidden=1.0), TypeError, "hidden must be a torch.Tensor"),
    ("ref_hidden not a tensor", dict(ref_hidden=None), TypeError, "ref_hidden must be a torch.Tensor"),
    ("ref_weight int", dict(ref_weight=torch.ones(20, 6, dtype=torch.long)), TypeError, "ref_weight must be float32"),
    ("ref_weight rank", dict(ref_weight=torch.randn(20)), ValueError, r"ref_weight must have shape \[V, H\]"),
    ("ref vocab differs", dict(ref_weight=torch.randn(21, 6)), ValueError, "ref_weight must have the policy's vocab"),
    ("ref hidden size", dict(ref_weight=torch.randn(20, 5)), ValueError, r"H = ref_hidden.shape\[-1\] = 6"),
    ("ref tokens differ", dict(ref_hidden=torch.randn(2, 4, 6)), ValueError, "labels must have shape ref_hidden"),
    (
        "ref dtype",
        dict(ref_hidden=torch.randn(2, 3, 6, dtype=torch.float64), ref_weight=torch.randn(20, 6, dtype=torch.float64)),
        TypeError,
        "ref_hidden.dtype",
    ),
    ("ref_bias shape", dict(ref_bias=torch.randn(19)), ValueError, r"ref_bias must have shape \[V\]"),
    ("bias dtype", dict(bias=torch.randn(20, dtype=torch.float64)), TypeError, "bias.dtype"),
    ("labels float", dict(labels=torch.zeros(2, 3)), TypeError, "labels must be an integer tensor"),
    ("label out of range", dict(labels=torch.full((2, 3), 20)), ValueError, r"labels must be in \[0, 20\)"),
    ("hidden NaN", dict(hidden=torch.full((2, 3, 8), math.nan)), ValueError, "hidden contains NaN"),
    ("ref_weight inf", dict(ref_weight=torch.full((20, 6), math.inf)), ValueError, "ref_weight contains NaN or inf"),
    ("ref_bias NaN", dict(ref_bias=torch.full((20,), math.nan)), ValueError, "ref_bias contains NaN"),
    ("temperature 0", dict(temperature=0), ValueError, "temperature must be a finite number > 0"),
    ("softcap nan", dict(softcap=math.nan), ValueError, "softcap must be"),
    ("ignore_index float", dict(ignore_index=0.5), TypeError, "ignore_index must be an int"),
    ("backend unknown", dict(backend="gpu"), ValueError, "backend must be one of"),
    ("process_group int", dict(process_group=0), TypeError, "process_group must be None or a torch.distributed"),
]


@pytest.mark.parametrize("case", KL_CASES, ids=[c[0] for c in KL_CASES])
def test_bad_input_token_kl(case):
    _, override, exc, match = case
    kwargs = good_kl()
    for k, v in override.items():
        kwargs[k] = v.to(DEVICE) if isinstance(v, torch.Tensor) else v
    with pytest.raises(exc, match=match):
        ek.linear_token_kl(**kwargs)


def test_reference_head_gradient_is_refused():
    kwargs = good_kl()
    kwargs["ref_weight"].requires_grad_()
    kl = ek.linear_token_kl(**kwargs)
    with pytest.raises(RuntimeError, match="the reference head is frozen"):
        kl.sum().backward()

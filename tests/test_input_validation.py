"""Bad input gets a ValueError/TypeError that names the argument and what was expected."""
import math

import pytest
import torch

import expo_kernels as ek

from conftest import DEVICE

BACKENDS = ek.available_backends(DEVICE)


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
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case):
    _, override, exc, match = case
    kwargs = good()
    for k, v in override.items():
        kwargs[k] = v.to(DEVICE) if isinstance(v, torch.Tensor) else v
    with pytest.raises(exc, match=match):
        ek.linear_logprobs(**kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs two devices")
def test_device_mismatch():
    kwargs = good()
    kwargs["weight"] = kwargs["weight"].cpu()
    with pytest.raises(ValueError, match="weight is on cpu but hidden is on cuda"):
        ek.linear_logprobs(**kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["hidden", "weight", "bias"])
def test_non_finite_inputs_are_named(backend, where):
    kwargs = good()
    kwargs["bias"] = torch.zeros(20, device=DEVICE)
    kwargs[where].view(-1)[3] = math.nan if where != "weight" else math.inf
    with pytest.raises(ValueError, match=f"{where} contains NaN or inf"):
        ek.linear_logprobs(**kwargs, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_at_ignored_positions_is_harmless(backend):
    # Ignored tokens are dropped before any kernel runs, so garbage there cannot leak in.
    kwargs = good()
    kwargs["hidden"][0, 0] = math.nan
    kwargs["labels"][0, 0] = -100
    logp = ek.linear_logprobs(**kwargs, backend=backend)
    assert torch.isfinite(logp).all() and logp[0, 0] == 0

"""expo_kernels.integrations.liger against the installed liger-kernel, on CPU, option by option.

For each of Liger's five chunked preference losses and each option combination: the loss, every aux
output (Liger's order and shapes) and the gradients of ``_input``, the weight and the bias, under an
upstream gradient of 1.7 (Liger scales its stored gradients by it). Liger runs with
``compiled=False`` (its result does not depend on it; torch.compile on CPU would only add minutes).

Tolerances (``|ours - liger| <= atol + rtol |liger|``):

* float32: atol 2e-5, rtol 1e-4 — both sides accumulate in float32; they differ by summation order.
* bfloat16: atol 2e-2, rtol 5e-2 on the loss and aux outputs (the logit means: atol 5e-2), the
  gradients are compared as float32 with rtol 5e-2 and atol 2e-2 times the largest |gradient| (at
  least 1): a bfloat16 gradient of size 5 is only resolved to 3e-2. Liger rounds every logit to bfloat16
  before its float32 log-softmax; our kernels keep the float32 accumulator, so the two differ by
  Liger's rounding (Liger's own tests allow atol 5e-2, rtol 5e-1 here).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from expo_kernels.integrations import liger as ours

liger_chunked = pytest.importorskip("liger_kernel.chunked_loss", reason="liger-kernel is not installed")
from liger_kernel.chunked_loss import functional as liger_functional  # noqa: E402

B, T, H, V = 3, 9, 16, 40
UPSTREAM = 1.7
DTYPES = (torch.float32, torch.bfloat16)


def tolerances(dtype):
    if dtype == torch.float32:
        return dict(atol=2e-5, rtol=1e-4), dict(atol=2e-5, rtol=1e-4)
    return dict(atol=2e-2, rtol=5e-2), dict(atol=2e-2, rtol=5e-2)


def close(a, b, atol, rtol, what):
    a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs Liger's {tuple(b.shape)}"
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def make_inputs(dtype, *, rows=2 * B, bias=False, ref=False, ref_bias=False, ignore_index=-100, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = dict(
        x=torch.randn(rows, T, H, generator=g).to(dtype),
        w=(0.5 * torch.randn(V, H, generator=g)).to(dtype),
        y=torch.randint(0, V, (rows, T), generator=g),
    )
    t["y"][:, :3] = ignore_index  # a prompt
    t["y"][0, -2:] = ignore_index  # padding
    t["b"] = torch.randn(V, generator=g).to(dtype) if bias else None
    t["rx"] = torch.randn(rows, T, H, generator=g).to(dtype) if ref else None
    t["rw"] = (0.5 * torch.randn(V, H, generator=g)).to(dtype) if ref else None
    t["rb"] = torch.randn(V, generator=g).to(dtype) if ref and ref_bias else None
    return t


def leaves(t):
    """Fresh trainable copies of the policy tensors."""
    out = {k: t[k].clone().requires_grad_(True) for k in ("x", "w")}
    out["b"] = None if t["b"] is None else t["b"].clone().requires_grad_(True)
    return out


def run_both(call_ours, call_liger, dtype, *, logits_atol=None):
    """Run both, compare loss, aux outputs and gradients; return our (loss, aux)."""
    (tol, gtol) = tolerances(dtype)
    a_in, b_in = call_ours.leaves, call_liger.leaves
    loss_a, aux_a = call_ours(a_in)
    loss_b, aux_b = call_liger(b_in)
    close(loss_a, loss_b, what="loss", **tol)
    assert isinstance(aux_a, tuple) and len(aux_a) == len(aux_b), (len(aux_a), len(aux_b))
    for i, (p, q) in enumerate(zip(aux_a, aux_b, strict=True)):
        t = dict(tol)
        if logits_atol is not None and i in (2, 3):
            t["atol"] = logits_atol
        close(p, q, what=f"aux[{i}]", **t)
        assert not p.requires_grad, f"aux[{i}] carries a gradient"
    (UPSTREAM * loss_a).backward()
    (UPSTREAM * loss_b).backward()
    for k in ("x", "w", "b"):
        if b_in[k] is None:
            assert a_in[k] is None
            continue
        assert a_in[k].grad is not None and a_in[k].grad.dtype == b_in[k].grad.dtype, k
        g = dict(gtol)
        if dtype != torch.float32:  # bf16 gradients: the resolution at the largest entry
            g["atol"] *= max(1.0, b_in[k].grad.float().abs().max().item())
        close(a_in[k].grad, b_in[k].grad, what=f"grad {k}", **g)
    return loss_a, aux_a


class Call:
    def __init__(self, fn, leaves_):
        self.fn, self.leaves = fn, leaves_

    def __call__(self, lv):
        return self.fn(lv)


def _logits_atol(dtype):
    return None if dtype == torch.float32 else 5e-2


# ---------------------------------------------------------------------------------------------------
# DPO: every loss_type x use_ref_model x average_log_prob x compute_nll_loss, bias on/off, fp32/bf16
# ---------------------------------------------------------------------------------------------------
DPO_EXTRA = {
    "exo_pair": dict(label_smoothing=1e-3),
    "robust": dict(label_smoothing=0.2),
    "discopop": dict(discopop_tau=0.1),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss_type", ours.DPO_LOSS_TYPES)
@pytest.mark.parametrize(
    "use_ref_model, average_log_prob, compute_nll_loss, bias",
    [c for c in itertools.product([True, False], repeat=4)],
)
def test_dpo_matches_liger(dtype, loss_type, use_ref_model, average_log_prob, compute_nll_loss, bias):
    t = make_inputs(dtype, bias=bias, ref=use_ref_model, ref_bias=bias)
    kw = dict(
        beta=0.2,
        alpha=0.7,
        use_ref_model=use_ref_model,
        average_log_prob=average_log_prob,
        compute_nll_loss=compute_nll_loss,
        loss_type=loss_type,
        **DPO_EXTRA.get(loss_type, {}),
    )
    mod_a = ours.LigerFusedLinearDPOLoss(chunk_size=2, **kw)
    mod_b = liger_chunked.LigerFusedLinearDPOLoss(compiled=False, **kw)

    def call(mod):
        return lambda lv: mod(lv["w"], lv["x"], t["y"], lv["b"], t["rx"], t["rw"], t["rb"])

    _, aux = run_both(
        Call(call(mod_a), leaves(t)), Call(call(mod_b), leaves(t)), dtype, logits_atol=_logits_atol(dtype)
    )
    assert [a.shape for a in aux] == [(B,), (B,), (), (), (), (B,), (B,)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dpo_function_positional_and_ignore_index(dtype):
    """``apply`` with every positional argument, a non-default ignore_index and a shared reference head."""
    t = make_inputs(dtype, bias=True, ref=True, ref_bias=True, ignore_index=7)
    args = (7, 0.3, True, True, True, False, 4, "sigmoid", 0.0, 0.05, 1.5)  # ignore_index .. alpha

    def call(fn):
        return lambda lv: fn(lv["x"], lv["w"], t["y"], lv["b"], t["rx"], t["rw"], t["rb"], *args)

    run_both(
        Call(call(ours.LigerFusedLinearDPOFunction.apply), leaves(t)),
        Call(call(liger_functional.liger_fused_linear_dpo), leaves(t)),
        dtype,
        logits_atol=_logits_atol(dtype),
    )


@pytest.mark.parametrize("weight_trainable, bias_trainable", [(False, False), (False, True), (True, False)])
def test_dpo_frozen_head(weight_trainable, bias_trainable):
    """A frozen weight or bias gets no gradient (LoRA); the rest match Liger."""
    t = make_inputs(torch.float32, bias=True, ref=True)
    kw = dict(beta=0.1, use_ref_model=True)

    def mk(mod):
        def f(lv):
            lv["w"].requires_grad_(weight_trainable)
            lv["b"].requires_grad_(bias_trainable)
            return mod(lv["w"], lv["x"], t["y"], lv["b"], t["rx"], t["rw"])

        return f

    a, b = leaves(t), leaves(t)
    la, _ = mk(ours.LigerFusedLinearDPOLoss(**kw))(a)
    lb, _ = mk(liger_chunked.LigerFusedLinearDPOLoss(compiled=False, **kw))(b)
    la.backward()
    lb.backward()
    close(la, lb, atol=2e-5, rtol=1e-4, what="loss")
    close(a["x"].grad, b["x"].grad, atol=2e-5, rtol=1e-4, what="grad x")
    assert (a["w"].grad is None) == (not weight_trainable) and (a["b"].grad is None) == (not bias_trainable)
    assert (b["w"].grad is None) == (not weight_trainable) and (b["b"].grad is None) == (not bias_trainable)
    if weight_trainable:
        close(a["w"].grad, b["w"].grad, atol=2e-5, rtol=1e-4, what="grad w")
    if bias_trainable:
        close(a["b"].grad, b["b"].grad, atol=2e-5, rtol=1e-4, what="grad b")


# ---------------------------------------------------------------------------------------------------
# ORPO, CPO, SimPO
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("compute_nll_loss, nll_target, bias", list(itertools.product([True, False], repeat=3)))
def test_orpo_matches_liger(dtype, compute_nll_loss, nll_target, bias):
    t = make_inputs(dtype, bias=bias)
    nt = None
    if nll_target:
        nt = torch.randint(0, V, (2 * B, T), generator=torch.Generator().manual_seed(5))
        nt[:, :2] = -100
    kw = dict(beta=0.3, compute_nll_loss=compute_nll_loss)

    def call(mod):
        return lambda lv: mod(lv["w"], lv["x"], t["y"], lv["b"], nt)

    _, aux = run_both(
        Call(call(ours.LigerFusedLinearORPOLoss(**kw)), leaves(t)),
        Call(call(liger_chunked.LigerFusedLinearORPOLoss(compiled=False, **kw)), leaves(t)),
        dtype,
        logits_atol=_logits_atol(dtype),
    )
    assert len(aux) == 9


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "average_log_prob, compute_nll_loss, label_smoothing, bias",
    list(itertools.product([True, False], [True, False], [0.0, 0.1], [True, False])),
)
def test_cpo_matches_liger(dtype, average_log_prob, compute_nll_loss, label_smoothing, bias):
    t = make_inputs(dtype, bias=bias)
    kw = dict(
        beta=0.2,
        alpha=0.5,
        label_smoothing=label_smoothing,
        compute_nll_loss=compute_nll_loss,
        average_log_prob=average_log_prob,
    )

    def call(mod):
        return lambda lv: mod(lv["w"], lv["x"], t["y"], lv["b"])

    run_both(
        Call(call(ours.LigerFusedLinearCPOLoss(**kw)), leaves(t)),
        Call(call(liger_chunked.LigerFusedLinearCPOLoss(compiled=False, **kw)), leaves(t)),
        dtype,
        logits_atol=_logits_atol(dtype),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "compute_nll_loss, label_smoothing, gamma, bias",
    list(itertools.product([True, False], [0.0, 0.1], [0.5, 1.2], [True, False])),
)
def test_simpo_matches_liger(dtype, compute_nll_loss, label_smoothing, gamma, bias):
    t = make_inputs(dtype, bias=bias)
    kw = dict(beta=2.0, alpha=0.5, label_smoothing=label_smoothing, compute_nll_loss=compute_nll_loss, gamma=gamma)

    def call(mod):
        return lambda lv: mod(lv["w"], lv["x"], t["y"], lv["b"])

    run_both(
        Call(call(ours.LigerFusedLinearSimPOLoss(**kw)), leaves(t)),
        Call(call(liger_chunked.LigerFusedLinearSimPOLoss(compiled=False, **kw)), leaves(t)),
        dtype,
        logits_atol=_logits_atol(dtype),
    )


@pytest.mark.parametrize("name", ["ORPO", "CPO", "SimPO"])
def test_functions_match_modules(name):
    """Each ``*Function.apply`` takes Liger's positional arguments and equals its module."""
    t = make_inputs(torch.float32, bias=True)
    mod = getattr(ours, f"LigerFusedLinear{name}Loss")()
    fn = getattr(ours, f"LigerFusedLinear{name}Function").apply
    liger_fn = getattr(liger_functional, f"liger_fused_linear_{name.lower()}")
    lead = (-100, 0.1) if name == "ORPO" else (-100, 0.1, 1.0, 0.0)  # ignore_index, beta[, alpha, label_smoothing]
    la, _ = mod(t["w"], t["x"], t["y"], t["b"])
    lb, _ = fn(t["x"], t["w"], t["y"], t["b"], *lead, True)  # compute_nll_loss as the module's default
    extra = (None, False) if name == "ORPO" else (False,)  # [nll_target,] compiled
    lc, _ = liger_fn(t["x"], t["w"], t["y"], t["b"], *lead, True, *extra)
    close(la, lb, atol=0, rtol=0, what="module vs function")
    close(lb, lc, atol=2e-5, rtol=1e-4, what="function vs liger")


# ---------------------------------------------------------------------------------------------------
# KTO
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "use_ref_model, average_log_prob, kl, bias",
    list(itertools.product([True, False], [True, False], [None, 0.3], [True, False])),
)
def test_kto_matches_liger(dtype, use_ref_model, average_log_prob, kl, bias):
    rows = 5  # unpaired: any number of rows
    t = make_inputs(dtype, rows=rows, bias=bias, ref=use_ref_model, ref_bias=bias)
    labels = torch.tensor([True, False, True, True, False])
    kl_t = None if kl is None else torch.tensor([kl], dtype=dtype)
    kw = dict(beta=0.4, use_ref_model=use_ref_model, average_log_prob=average_log_prob)

    def call(mod):
        return lambda lv: mod(lv["x"], lv["w"], t["y"], lv["b"], labels, t["rx"], t["rw"], t["rb"], kl_t)

    logits_atol = None if dtype == torch.float32 else 5.0  # sums over T * V logits, not means
    _, aux = run_both(
        Call(call(ours.LigerFusedLinearKTOLoss(**kw)), leaves(t)),
        Call(call(liger_chunked.LigerFusedLinearKTOLoss(compiled=False, **kw)), leaves(t)),
        dtype,
        logits_atol=logits_atol,
    )
    assert [a.shape for a in aux] == [()] * 6


def test_kto_function_positional():
    t = make_inputs(torch.float32, rows=4, bias=True, ref=True)
    labels = torch.tensor([True, False, False, True])
    args = (
        t["x"],
        t["w"],
        t["y"],
        labels,
        t["b"],
        t["rx"],
        t["rw"],
        None,
        torch.tensor(0.1),
        -100,
        0.2,
        False,
        True,
        True,
        1,
    )
    la, _ = ours.LigerFusedLinearKTOFunction.apply(*args)
    lb, _ = liger_functional.liger_fused_linear_kto(*args)
    close(la, lb, atol=2e-5, rtol=1e-4, what="loss")


# ---------------------------------------------------------------------------------------------------
# refusals, patch()
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: ours.LigerFusedLinearDPOLoss(loss_type="nope"), "Unsupported loss_type"),
        (lambda: ours.LigerFusedLinearDPOLoss(loss_type="ipo"), "Unsupported loss_type 'ipo'"),
        (lambda: ours.LigerFusedLinearDPOLoss(loss_type="exo_pair"), "label_smoothing must be > 0"),
        (lambda: ours.LigerFusedLinearDPOLoss(loss_type="robust", label_smoothing=0.5), r"\[0.0, 0.5\)"),
        (lambda: ours.LigerFusedLinearDPOLoss(beta=-1.0), "beta"),
        (lambda: ours.LigerFusedLinearDPOLoss(chunk_size=0), "chunk_size"),
        (lambda: ours.LigerFusedLinearCPOLoss(compiled="yes"), "compiled"),
        (lambda: ours.LigerFusedLinearCPOLoss(label_smoothing=0.7), "label_smoothing"),
        (lambda: ours.LigerFusedLinearSimPOLoss(ignore_index=1.5), "ignore_index"),
        (lambda: ours.LigerFusedLinearKTOLoss(average_log_prob=None), "average_log_prob"),
        (lambda: ours.LigerFusedLinearORPOLoss(beta=0.0), "beta"),
    ],
)
def test_bad_options_refused_at_construction(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_bad_call_arguments_refused():
    t = make_inputs(torch.float32, rows=4)
    with pytest.raises(ValueError, match="ref_input"):
        ours.LigerFusedLinearDPOLoss(use_ref_model=True)(t["w"], t["x"], t["y"])
    kto = ours.LigerFusedLinearKTOLoss()
    with pytest.raises(ValueError, match="preference_labels"):
        kto(t["x"], t["w"], t["y"])
    with pytest.raises(ValueError, match="`kl` must hold one number"):
        kto(t["x"], t["w"], t["y"], preference_labels=torch.ones(4, dtype=torch.bool), kl=torch.zeros(4))


def test_reference_shares_policy_head_without_ref_weight():
    """``use_ref_model`` without ``ref_weight``: the policy head (detached) scores the reference."""
    t = make_inputs(torch.float32, ref=True)
    loss, aux = ours.LigerFusedLinearDPOLoss()(t["w"], t["x"], t["y"], None, t["rx"])
    ref_loss, ref_aux = ours.LigerFusedLinearDPOLoss()(t["w"], t["x"], t["y"], None, t["rx"], t["w"])
    close(loss, ref_loss, atol=0, rtol=0, what="loss")


def test_patch_swaps_and_restores():
    from liger_kernel.chunked_loss import dpo_loss, kto_loss

    original = liger_chunked.LigerFusedLinearDPOLoss
    ours.patch()
    try:
        ours.patch()  # idempotent
        assert ours.is_patched()
        import liger_kernel.chunked_loss as pkg

        assert pkg.LigerFusedLinearDPOLoss is ours.LigerFusedLinearDPOLoss
        assert dpo_loss.LigerFusedLinearDPOFunction is ours.LigerFusedLinearDPOFunction
        assert kto_loss.LigerFusedLinearKTOLoss is ours.LigerFusedLinearKTOLoss
        assert liger_functional.liger_fused_linear_simpo is ours.LigerFusedLinearSimPOFunction.apply
    finally:
        ours.unpatch()
    assert not ours.is_patched()
    assert liger_chunked.LigerFusedLinearDPOLoss is original
    assert liger_functional.liger_fused_linear_dpo == dpo_loss.LigerFusedLinearDPOFunction.apply


def test_classes_do_not_import_liger():
    """The classes work without liger-kernel: importing them does not import it."""
    import subprocess
    import sys

    code = (
        "import sys, expo_kernels.integrations.liger as L; "
        "assert not any(m.startswith('liger_kernel') for m in sys.modules), 'liger imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_cpo_long_rows_sum_in_float64():
    """At T = 32768 a row's summed log-prob is ~-1.8e5 (float32 spacing 1/64): the paired step's sums
    accumulate in float64, so CPO's margin (a difference of two sums) is float64-exact, and the loss and
    the aux outputs keep the per-token dtype (float32)."""
    import expo_kernels as ek

    t, h, v = 32768, 8, 256
    g = torch.Generator().manual_seed(0)
    chosen = torch.randn(1, t, h, generator=g)
    chosen_labels = torch.randint(0, v, (1, t), generator=g)
    # the rejected row: the chosen one's tokens in another order (the same sum up to rounding)
    perm = torch.randperm(t, generator=g)
    hidden = torch.cat([chosen, chosen[:, perm]])
    hidden[1, 0] += 0.01 * torch.randn(h, generator=g)  # a margin of ~1e-3, off float32's 1/64 grid there
    labels = torch.cat([chosen_labels, chosen_labels[:, perm]])
    weight = torch.randn(v, h, generator=g) * 0.5
    loss, aux = ours.LigerFusedLinearCPOLoss(beta=1.0, compute_nll_loss=False)(weight, hidden, labels)
    sums = ek.linear_logprobs(hidden, weight, labels).double().sum(1)
    expect = -torch.nn.functional.logsigmoid(sums[0] - sums[1])
    assert loss.dtype == torch.float32 and all(x.dtype == torch.float32 for x in aux)
    assert abs(float(loss) - float(expect)) < 1e-6
    torch.testing.assert_close(aux[0], sums[:1].float(), rtol=0, atol=0)

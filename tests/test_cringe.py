"""CRINGE and pairwise CRINGE (``expo_kernels.losses.cringe``, ``FusedLinearCRINGELoss``) against an
independent float64 implementation written from the equations on materialized logits.

The reference draws the same uniforms (one ``torch.rand([B, T], float64)`` from a generator seeded
alike) and samples each positive by walking the candidates' softmax, position by position.
"""

import math

import pytest
import torch
from conftest import DEVICE
from helpers import BACKEND_NAMES, FP64_BACKEND_NAMES, as_is_and_under_a_meta_default, device_for, rel_err, tolerance
from reference import logits64

import expo_kernels as ek
from expo_kernels.losses.cringe import sample_positive

B, T, H, V = 2, 5, 16, 40


def reference_cringe(hidden, weight, bias, labels, k, alpha, pairwise, margin, tau, seed, **transform):
    """float64 loss from materialized logits: L = [sum_chosen -log p + alpha sum_pairs g sum_rejected
    softplus(s- - s+)] / (counted tokens)."""
    b = hidden.shape[0] // 2
    z = logits64(hidden, weight, bias, **transform)  # [2B, T, V]
    logp = torch.log_softmax(z, dim=-1)
    u = torch.rand((b, hidden.shape[1]), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    nll = [0.0 * z.sum()] * b
    cringe = [0.0 * z.sum()] * b
    seq = [[0.0 * z.sum(), 0.0 * z.sum()] for _ in range(b)]
    count = 0
    for i in range(b):
        for t in range(hidden.shape[1]):
            yc, yr = int(labels[i, t]), int(labels[b + i, t])
            if yc != -100:
                nll[i] = nll[i] - logp[i, t, yc]
                seq[i][0] = seq[i][0] + logp[i, t, yc]
                count += 1
            if yr == -100:
                continue
            count += 1
            seq[i][1] = seq[i][1] + logp[b + i, t, yr]
            row = z[b + i, t]
            order = sorted(range(row.numel()), key=lambda v: (-float(row[v].detach()), v))[: k + 1]
            cands = [v for v in order if v != yr][:k]  # top-k of the model with the negative excluded
            p = torch.softmax(torch.stack([row[v].detach() for v in cands]), dim=0)
            acc, pick = 0.0, cands[-1]
            for v, pv in zip(cands, p.tolist(), strict=True):
                acc += pv
                if u[i, t] < acc:
                    pick = v
                    break
            s_plus, s_minus = row[pick], row[yr]
            cringe[i] = cringe[i] - torch.log(torch.exp(s_plus) / (torch.exp(s_plus) + torch.exp(s_minus)))
    total = sum(nll)
    for i in range(b):
        gate = torch.sigmoid((margin - (seq[i][0] - seq[i][1])) / tau) if pairwise else 1.0
        total = total + alpha * gate * cringe[i]
    return total / count


def make_batch(dtype=torch.float32, bias=True, device=DEVICE):
    hidden = torch.randn(2 * B, T, H, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, device=device) / H**0.5 * 3).to(dtype).requires_grad_()
    b = (torch.randn(V, device=device) * 0.5).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, V, (2 * B, T), device=device)
    labels[:, 0] = -100  # the prompt
    labels[1, -1] = labels[3, -2:-1] = -100  # padding
    labels[2, 1] = torch.topk(logits64(hidden[2, 1], weight, b), 1).indices  # a negative inside the top-k
    return hidden, weight, b, labels


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("pairwise", [False, True], ids=["binary", "pairwise"])
def test_fused_module_matches_reference(backend, pairwise):
    hidden, weight, b, labels = make_batch(device=device_for(backend))
    hp = dict(k=3, alpha=0.7, pairwise=pairwise, margin=0.5, tau=2.0)
    transform = dict(temperature=0.9, softcap=6.0)
    fn = ek.FusedLinearCRINGELoss(**hp, backend=backend, **transform)
    out = fn(weight, hidden, labels, bias=b, generator=torch.Generator().manual_seed(11))
    want = reference_cringe(hidden, weight, b, labels, seed=11, **hp, **transform)
    assert abs(out.loss.item() - want.item()) < 2e-5 * max(1.0, abs(want.item()))
    got_g = torch.autograd.grad(out.loss, (hidden, weight, b))
    want_g = torch.autograd.grad(want, (hidden, weight, b))
    for name, x, y in zip(("hidden", "weight", "bias"), got_g, want_g, strict=True):
        assert rel_err(x, y) < 5e-5, f"d_{name}: {rel_err(x, y):.2e}"
    assert set(out.metrics) >= {"nll", "cringe", "logps/chosen", "logps/rejected"}
    assert ("gate" in out.metrics) == pairwise


@pytest.mark.parametrize("backend", FP64_BACKEND_NAMES)
@pytest.mark.parametrize(
    "hp,transform",
    [
        (dict(k=5, alpha=1.0, pairwise=False, margin=0.0, tau=1.0), {}),
        (dict(k=5, alpha=0.7, pairwise=True, margin=0.5, tau=2.0), dict(temperature=0.9, softcap=6.0)),
        (dict(k=1, alpha=2.5, pairwise=True, margin=-1.0, tau=0.5), dict(logit_scale=1.5)),
    ],
    ids=["binary", "pairwise-transform", "pairwise-k1"],
)
def test_float64_exact_with_gradients(backend, hp, transform):
    """float64 end to end: the loss and the gradients of hidden, weight and bias equal float64 autograd
    through the hand-written reference (``reference_cringe``, the equations on materialized logits) to 1e-10
    normwise (``helpers.tolerance``): the NLL term, both CRINGE logits s+ (the sampled top-k row) and s-
    (the negative's row), and in the pairwise form the gate's gradient through the sequence log-probs."""
    hidden, weight, b, labels = make_batch(torch.float64, device=device_for(backend))
    fn = ek.FusedLinearCRINGELoss(**hp, backend=backend, **transform)
    out = fn(weight, hidden, labels, bias=b, generator=torch.Generator().manual_seed(3))
    want = reference_cringe(hidden, weight, b, labels, seed=3, **hp, **transform)
    assert out.loss.dtype == torch.float64
    assert math.isclose(out.loss.item(), want.item(), rel_tol=1e-12)
    tol = tolerance(torch.float64, backend, "grad")
    got_g = torch.autograd.grad(out.loss, (hidden, weight, b))
    want_g = torch.autograd.grad(want, (hidden, weight, b))
    for name, x, y in zip(("hidden", "weight", "bias"), got_g, want_g, strict=True):
        assert y.abs().max() > 0, f"d_{name} of the reference is 0: nothing is compared"
        assert rel_err(x, y) < tol, f"d_{name}: {rel_err(x, y):.2e}"


def test_sampling_is_deterministic_and_excludes_the_negative():
    values = torch.tensor([[3.0, 2.0, 2.0, 1.0], [5.0, 4.5, 4.0, -1.0]]).repeat(200, 1)
    ids = torch.tensor([[7, 3, 9, 1], [2, 8, 6, 4]]).repeat(200, 1)
    neg = torch.tensor([3, 0]).repeat(200)  # row 0: the negative is a candidate; row 1: it is not (drop the last)
    a = sample_positive(values, ids, neg, torch.Generator().manual_seed(5))[1]
    again = sample_positive(values, ids, neg, torch.Generator().manual_seed(5))[1]
    assert torch.equal(a, again)
    assert set(a[0::2].tolist()) == {7, 9, 1} and set(a[1::2].tolist()) == {2, 8, 6}


def test_cringe_loss_argument_errors():
    hidden, weight, b, labels = make_batch()
    with pytest.raises(ValueError, match="k must be"):
        ek.FusedLinearCRINGELoss(k=32)
    with pytest.raises(ValueError, match="tau"):
        ek.FusedLinearCRINGELoss(tau=0.0)
    with pytest.raises(TypeError, match="alpha"):
        ek.FusedLinearCRINGELoss(alpha="1")
    with pytest.raises(ValueError, match=r"\[2B, T, H\]"):
        ek.FusedLinearCRINGELoss(backend="torch")(weight, hidden[:3], labels[:3])
    z = torch.zeros(B, T)
    with pytest.raises(ValueError, match="k \\+ 1"):
        ek.cringe_loss(z, z.bool(), z, z, torch.zeros(B, T, 3), torch.zeros(B, T, 2, dtype=torch.long), z.long())


def test_pairwise_gate_float64_exact_at_long_length():
    """At T = 32768 a sequence's summed log-prob is ~-1.8e5 (float32 spacing 1/64): the gate's margin, a
    difference of two such sums, accumulates in float64, so the gate is float64-exact; the loss and
    metrics keep the per-token dtype (float32)."""
    t, h, v = 32768, 8, 256
    g = torch.Generator().manual_seed(0)
    chosen = torch.randn(1, t, h, generator=g)
    hidden = torch.cat([chosen, chosen + 1e-3 * torch.randn(1, t, h, generator=g)])
    weight = torch.randn(v, h, generator=g) * 0.5
    labels = torch.randint(0, v, (2, t), generator=g)
    sums = ek.linear_logprobs(hidden, weight, labels, backend="torch").double().sum(1)
    m64 = sums[0] - sums[1]
    # the gate at its steepest (margin = M): d gate / d M = 1/4
    module = ek.FusedLinearCRINGELoss(k=1, pairwise=True, margin=float(m64) + 0.5, tau=1.0, backend="torch")
    out = module(weight, hidden, labels, generator=torch.Generator().manual_seed(1))
    assert out.loss.dtype == torch.float32
    assert all(m.dtype == torch.float32 for m in out.metrics.values())
    torch.testing.assert_close(out.policy_logps, sums, rtol=1e-12, atol=0)
    gate = torch.sigmoid((float(m64) + 0.5 - m64) / 1.0)
    assert abs(float(out.metrics["gate"]) - float(gate)) < 1e-6


def _cringe_terms(seed=0, b=2, tc=3, tr=4, k1=3):
    g = torch.Generator().manual_seed(seed)
    chosen = -torch.rand(b, tc, generator=g, dtype=torch.float64) * 5
    rejected = -torch.rand(b, tr, generator=g, dtype=torch.float64) * 5
    rejected_logits = torch.randn(b, tr, generator=g, dtype=torch.float64)
    top_v = torch.randn(b, tr, k1, generator=g, dtype=torch.float64).sort(dim=-1, descending=True).values
    top_i = torch.stack([torch.randperm(50, generator=g)[:k1] for _ in range(b * tr)]).view(b, tr, k1)
    labels = top_i[..., 0].clone()  # the first rejected token is the model's argmax: a sampled positive
    labels[:, -1] = -100
    return chosen, torch.ones(b, tc, dtype=torch.bool), rejected, rejected_logits, top_v, top_i, labels


def test_cringe_loss_defaults_and_checks():
    # the function's defaults are the module's (alpha 1, binary, margin 0, tau 1), and its own checks
    # name the argument
    from expo_kernels.losses.cringe import cringe_loss

    args = _cringe_terms()
    default = cringe_loss(*args, generator=torch.Generator().manual_seed(1))
    explicit = cringe_loss(
        *args, alpha=1.0, pairwise=False, margin=0.0, tau=1.0, generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(default.loss, explicit.loss, rtol=0, atol=0)
    # margin and tau act in the pairwise form only
    gated = cringe_loss(*args, pairwise=True, generator=torch.Generator().manual_seed(1))
    gated_explicit = cringe_loss(*args, pairwise=True, margin=0.0, tau=1.0, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(gated.loss, gated_explicit.loss, rtol=0, atol=0)
    assert not torch.equal(gated.loss, default.loss)
    other = cringe_loss(*args, alpha=2.0, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(other.loss, default.loss)
    for bad in (dict(tau=0.0), dict(tau=-1.0), dict(alpha=float("nan")), dict(margin=float("inf"))):
        with pytest.raises(ValueError, match=next(iter(bad))):
            cringe_loss(*args, **bad)


def test_sampling_drops_a_negative_in_the_last_slot_and_keeps_leading_dims():
    # the negative in the last candidate slot is dropped like anywhere else; [B, T, k + 1] inputs sample along
    # the last dimension
    values = torch.tensor([[4.0, 3.0, 2.5, 2.0]]).repeat(2, 300, 1)
    ids = torch.tensor([[5, 6, 7, 8]]).repeat(2, 300, 1)
    neg = torch.full((2, 300), 8)
    s_plus, picked = sample_positive(values, ids, neg, torch.Generator().manual_seed(3))
    assert picked.shape == (2, 300) and s_plus.shape == (2, 300)
    assert set(picked.flatten().tolist()) == {5, 6, 7}
    torch.testing.assert_close(s_plus, values[0, 0][picked - 5])


def test_cringe_loss_terms_by_hand():
    # float32 per-token inputs over long rows: the per-pair sums are float64 sums returned in float32 (exact
    # to the rounding of the float64 sum), the sampled ids are -1 where a rejected token is not counted, and the
    # loss divides by the number of counted tokens
    from expo_kernels.losses.cringe import cringe_loss

    g = torch.Generator().manual_seed(4)
    b, t, k1 = 3, 3000, 3
    chosen = -torch.rand(b, t, generator=g) * 9
    chosen_mask = torch.rand(b, t, generator=g) > 0.1
    rejected = -torch.rand(b, t, generator=g) * 9
    rejected_logits = torch.randn(b, t, generator=g) * 3
    top_v = torch.randn(b, t, k1, generator=g).sort(dim=-1, descending=True).values
    top_i = torch.stack([torch.randperm(50, generator=g)[:k1] for _ in range(b * t)]).view(b, t, k1)
    labels = torch.where(torch.rand(b, t, generator=g) > 0.2, top_i[..., 1], torch.full_like(top_i[..., 1], -100))
    out = cringe_loss(chosen, chosen_mask, rejected, rejected_logits, top_v, top_i, labels, alpha=0.7)
    counted = labels != -100
    assert out.nll.shape == (b,) and out.cringe.shape == (b,) and out.nll.dtype == torch.float32
    assert bool((out.positive_ids[~counted] == -1).all())
    ids = out.positive_ids[counted]
    assert bool((ids != labels[counted]).all())
    slot = (top_i == out.positive_ids.unsqueeze(-1)) & counted.unsqueeze(-1)
    assert bool((slot.sum(-1) == counted.long()).all())  # each counted position picked one of its candidates
    s_plus = (top_v * slot).sum(-1)
    cr_tok = torch.where(counted, torch.nn.functional.softplus(rejected_logits - s_plus), 0.0)
    nll64 = torch.where(chosen_mask, -chosen, 0.0).double().sum(1)
    cr64 = cr_tok.double().sum(1)
    assert torch.equal(out.nll, nll64.float()), (out.nll - nll64).abs().max()
    assert torch.equal(out.cringe, cr64.float()), (out.cringe - cr64).abs().max()
    n = chosen_mask.sum() + counted.sum()
    torch.testing.assert_close(out.loss.double(), (nll64.sum() + 0.7 * cr64.sum()) / n, rtol=1e-6, atol=0)
    # one counted token in the whole batch: the loss is that token's term
    one_mask = torch.zeros_like(chosen_mask)
    one_mask[1, 7] = True
    none = torch.full_like(labels, -100)
    single = cringe_loss(chosen, one_mask, rejected, rejected_logits, top_v, top_i, none)
    torch.testing.assert_close(single.loss, -chosen[1, 7], rtol=0, atol=0)


@pytest.mark.parametrize("name, bad", [("alpha", "1"), ("alpha", math.nan), ("margin", math.inf), ("tau", 0.0)])
def test_cringe_loss_errors_name_the_argument(name, bad):
    from expo_kernels.losses.cringe import cringe_loss

    with pytest.raises((TypeError, ValueError), match=f"^{name} must be"):
        cringe_loss(*_cringe_terms(), **{name: bad})
    args = list(_cringe_terms())
    args[4], args[5] = args[4][..., :1], args[5][..., :1]  # one candidate column: k = 0
    with pytest.raises(ValueError, match=r"k >= 1 candidates; got 1 columns"):
        cringe_loss(*args)


def test_cringe_samples_on_the_cpu_whatever_the_default_device():
    # the positives are drawn on the CPU (the module docstring), so a seeded generator gives the same draw when a
    # trainer set another default device (torch.set_default_device; "meta" here)
    from expo_kernels.losses.cringe import cringe_loss

    g = torch.Generator().manual_seed(5)
    b, t, k1 = 2, 4, 3
    chosen, rejected = -torch.rand(b, t, generator=g), -torch.rand(b, t, generator=g)
    chosen_mask = torch.ones(b, t, dtype=torch.bool)
    rejected_logits = torch.randn(b, t, generator=g)
    top_v = torch.randn(b, t, k1, generator=g).sort(dim=-1, descending=True).values
    top_i = torch.stack([torch.randperm(20, generator=g)[:k1] for _ in range(b * t)]).view(b, t, k1)
    labels = top_i[..., 0].clone()
    args = (chosen, chosen_mask, rejected, rejected_logits, top_v, top_i, labels)
    want, got = as_is_and_under_a_meta_default(
        lambda: cringe_loss(*args, generator=torch.Generator(device="cpu").manual_seed(6))
    )
    assert torch.equal(got.positive_ids, want.positive_ids) and torch.equal(got.loss, want.loss)
    assert got.loss.device.type == "cpu"


def test_the_cpu_draw_moves_to_the_inputs_device():
    # the uniforms are drawn on the CPU and moved to the candidates' device ("meta" tensors stand in for an
    # accelerator's here: a CPU draw left on the CPU would not mix with them)
    values = torch.randn(2, 3, 4, device="meta")
    ids = torch.zeros(2, 3, 4, dtype=torch.long, device="meta")
    negatives = torch.zeros(2, 3, dtype=torch.long, device="meta")
    s_plus, picked = sample_positive(values, ids, negatives, generator=torch.Generator().manual_seed(0))
    assert s_plus.device.type == picked.device.type == "meta" and s_plus.shape == picked.shape == (2, 3)

"""Long sequences: exact per-sequence sums, and pairs longer than the workspace in one pass.

1. A sequence's log-prob sum at long T is large (about -2e5 at 21,845 counted tokens), where the float32
   spacing is 1/64, and DPO subtracts four such sums to get a margin of order 1. The sums accumulate
   (and stay) in float64 (``losses.aggregate``), so the margins, the loss, the logged rewards and the
   gradients stay within the float32 per-token rounding of float64, on every path: the pair engine, the
   token-chunk path of a long pair, the op followed by the loss, the unpaired module.
2. A pair longer than the workspace (``Path.LONG_PAIR_CHUNKS``) runs in one pass when the loss's per-token
   gradient is one number per sequence: dz unscaled, per-sequence d_weight partials, scaled once the loss
   is known (``engine._long_pairs_one_pass``); other losses (``ld_alpha``) recompute the logits.

Small heads keep it cheap: the sums' error depends on the number of counted tokens and the size of the
per-token log-probs (H = 8, V = 256 with a unit-scale head gives about -9.5 per token), not on H or V.
"""

import pytest
import reference as reference_losses
import torch
import torch.nn.functional as F
from conftest import require_backend
from helpers import rel_err
from reference import reference_module_loss

import expo_kernels as ek
from expo_kernels import _dispatch as D
from expo_kernels import engine
from expo_kernels.integrations.liger import LigerFusedLinearKTOLoss
from expo_kernels.losses import aggregate_pair_logps, preference_loss, preference_loss_and_metrics, sequence_logps
from expo_kernels.ops import LogitTransform
from expo_kernels.ops.options import KernelOptions

BETA = 0.1


# ---------------------------------------------------------------------------------------------
# 1. exact sums at long T
# ---------------------------------------------------------------------------------------------


def long_pair(steps, h_size=8, vocab=256, seed=0):
    """One pair of ``steps`` tokens per sequence, the first third ignored (a prompt), float32."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, steps, h_size, generator=g)
    ref_hidden = hidden + 0.05 * torch.randn(2, steps, h_size, generator=g)
    weight = torch.randn(vocab, h_size, generator=g)
    labels = torch.randint(0, vocab, (2, steps), generator=g)
    labels[:, : steps // 3] = -100
    return hidden, ref_hidden, weight, labels


def sums64(hidden, weight, labels):
    """float64 per-row log-prob sums (materialized float64 logits)."""
    lp = torch.log_softmax(hidden.double() @ weight.double().T, dim=-1)
    valid = labels != -100
    picked = lp.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, 0.0).sum(1)


def dpo64(hidden, weight, ref_hidden, labels):
    """float64 ``(loss, margin, log-ratios [2])`` of one DPO pair, with gradients into hidden and weight."""
    pol = sums64(hidden, weight, labels)
    with torch.no_grad():
        ref = sums64(ref_hidden, weight, labels)
    ratios = pol - ref
    margin = ratios[0] - ratios[1]
    return -F.logsigmoid(BETA * margin), margin, ratios


@pytest.mark.parametrize(
    "backend,path",
    # the torch backend's long-pair path is checked at small sizes below (it is slow at this length)
    [("native", "pair_engine"), ("native", "long_pair_chunks"), ("native", "op"), ("torch", "pair_engine")],
)
def test_margins_and_loss_match_float64_at_32k_tokens(backend, path):
    require_backend(backend, "cpu")
    hidden, ref_hidden, weight, labels = long_pair(32768)
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    loss64, margin64, ratios64 = dpo64(h64, w64, ref_hidden, labels)
    loss64.backward()
    assert ratios64.abs().max() > 10 and sums64(hidden, weight, labels).abs().min() > 1.5e5  # the regime

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    fn = ek.FusedLinearDPOLoss(beta=BETA, backend=backend)
    options = {"pair_engine": {}, "long_pair_chunks": {"workspace_bytes": 4096 * 256 * 4}, "op": {"engine": False}}
    with ek.kernel_options(**options[path]):
        plan = fn.plan_for(w, h, None, labels)
        out = fn(w, h, labels, ref_hidden=ref_hidden)
        out.loss.backward()
    if path != "op":
        assert plan.path.value == path and (path == "pair_engine" or "one pass" in plan.reason), plan
    # per-sequence log-ratios and the margin (the logged rewards are beta x the log-ratios, one pair)
    for name, want in (("rewards/chosen", ratios64[0]), ("rewards/rejected", ratios64[1])):
        assert abs(out.metrics[name].double() / BETA - want).item() < 1e-3, name
    assert abs(out.metrics["rewards/margins"].double() / BETA - margin64).item() < 1e-3
    assert abs(out.loss.double() - loss64).item() / loss64.item() < 1e-4
    assert out.loss.dtype == torch.float32 and out.metrics["rewards/margins"].dtype == torch.float32
    # the per-token gradient dL/dlogp depends on the margin: off by ~1e-3 relative with float32 sums
    assert rel_err(h.grad, h64.grad) < 1e-4
    assert rel_err(w.grad, w64.grad) < 1e-4


def test_margins_match_float64_at_128k_tokens_forward_only():
    hidden, ref_hidden, weight, labels = long_pair(131072, seed=1)
    _, margin64, ratios64 = dpo64(hidden, weight, ref_hidden, labels)
    with torch.no_grad():
        out = ek.FusedLinearDPOLoss(beta=BETA)(weight, hidden, labels, ref_hidden=ref_hidden)
    assert abs(out.metrics["rewards/margins"].double() / BETA - margin64).item() < 4e-3
    assert abs(out.metrics["rewards/chosen"].double() / BETA - ratios64[0]).item() < 4e-3


def crafted_logps(steps=32768, seed=0):
    """float32 per-token log-probs ``[2, T]`` of a policy and a reference (about -10 each, the reference
    close to the policy), the first third masked; and their float64 sums of the same float32 values."""
    g = torch.Generator().manual_seed(seed)
    pol = -10.0 - 3.0 * torch.rand(2, steps, generator=g)
    ref = pol + 1e-3 * torch.randn(2, steps, generator=g)
    mask = torch.ones(2, steps, dtype=torch.bool)
    mask[:, : steps // 3] = False
    exact = [torch.where(mask, t.double(), 0.0).sum(1) for t in (pol, ref)]
    return pol, ref, mask, exact


def test_aggregate_then_preference_loss_is_exact():
    # the op's path: per-token log-probs (float32, as linear_logprobs returns them) -> aggregate -> loss
    pol, ref, mask, (pol64, ref64) = crafted_logps()
    pol = pol.requires_grad_()
    a, r = aggregate_pair_logps(pol, mask), aggregate_pair_logps(ref, mask)
    assert a.chosen_logps.dtype == torch.float64  # the sums keep their precision
    margin64 = (pol64[0] - ref64[0]) - (pol64[1] - ref64[1])
    got = (a.chosen_logps - r.chosen_logps) - (a.rejected_logps - r.rejected_logps)
    assert abs(got - margin64).item() < 1e-6
    loss, metrics = preference_loss_and_metrics(
        "sigmoid", a.chosen_logps, a.rejected_logps, r.chosen_logps, r.rejected_logps, beta=BETA
    )
    want = -F.logsigmoid(BETA * margin64)
    assert abs(loss.double() - want).item() / want.item() < 1e-9
    assert abs(metrics["rewards/margins"] / BETA - margin64).item() < 1e-6
    loss.backward()
    assert pol.grad.dtype == torch.float32
    g = -BETA * torch.sigmoid(-BETA * margin64)  # dL/dlogp: +g on the chosen row, -g on the rejected
    torch.testing.assert_close(pol.grad[0, mask[0]].double(), g.expand(int(mask[0].sum())), rtol=1e-6, atol=0)
    # the batch NLL of the chosen rows and the unpaired form's sums, likewise
    assert abs(a.chosen_nll + pol64[0] / mask[0].sum()).item() < 1e-12
    sums, _ = sequence_logps(pol.detach(), mask)
    assert (sums - pol64).abs().max().item() < 1e-6


def test_ld_alpha_sums_are_exact():
    pol, _, mask, _ = crafted_logps(steps=30000)
    mask[1, -5000:] = False  # the rejected completion is shorter: the chosen row has a down-weighted tail
    got = aggregate_pair_logps(pol, mask, ld_alpha=0.5).chosen_logps
    shared = int(mask[1].sum())
    chosen = pol[0, mask[0]].double()
    want = chosen[:shared].sum() + 0.5 * chosen[shared:].sum()
    assert abs(got[0] - want).item() < 1e-6


def test_unpaired_module_sums_are_exact():
    # KTO through the unpaired module: the per-example log-ratios come from float64 sums
    hidden, ref_hidden, weight, labels = long_pair(16384, seed=2)
    fn = ek.FusedLinearPreferenceLoss("kto", beta=BETA)
    desirable = torch.tensor([True, False])
    with torch.no_grad():
        out = fn(weight, hidden, labels, ref_hidden=ref_hidden, is_desirable=desirable, kl=0.0)
    ratios64 = sums64(hidden, weight, labels) - sums64(ref_hidden, weight, labels)
    assert abs(out.metrics["rewards/chosen"].double() / BETA - ratios64[0]).item() < 1e-3
    assert abs(out.metrics["rewards/rejected"].double() / BETA - ratios64[1]).item() < 1e-3
    loss = preference_loss(
        "kto",
        policy_logps=ratios64,
        ref_logps=torch.zeros(2, dtype=torch.float64),
        is_desirable=desirable,
        kl=0.0,
        beta=BETA,
    )
    assert abs(out.loss.double() - loss).item() / loss.item() < 1e-4


def test_liger_kto_front_end_sums_are_exact():
    # KTO through the Liger-compatible front end: its log-ratios come from float64 sums as well (with
    # float32 sums the rewards were off by ~5e-4 here), the loss and aux come back in float32
    hidden, ref_hidden, weight, labels = long_pair(16384, seed=3)
    desirable = torch.tensor([True, False])
    with torch.no_grad():
        loss, aux = LigerFusedLinearKTOLoss(beta=BETA, use_ref_model=True)(
            hidden, weight, labels, None, desirable, ref_hidden, None, None, None
        )
    ratios64 = sums64(hidden, weight, labels) - sums64(ref_hidden, weight, labels)
    assert ratios64.abs().min() > 1  # log-ratios of order 1 under sums of about -1e5
    assert loss.dtype == torch.float32 and all(a.dtype == torch.float32 for a in aux)
    # aux[4], aux[5]: beta x the log-ratio summed over the desirable / undesirable rows (one each)
    assert abs(aux[4].double() - BETA * ratios64[0]).item() < 1e-4
    assert abs(aux[5].double() - BETA * ratios64[1]).item() < 1e-4
    s = {"pol": ratios64, "ref": torch.zeros(2, dtype=torch.float64), "kl": 0.0, "is_desirable": desirable}
    want = reference_losses.loss_kto(s, BETA).mean()  # Liger: the sum over the rows / the batch size
    assert abs(loss.double() - want).item() / want.item() < 2e-5


# ---------------------------------------------------------------------------------------------
# 2. long pairs in one pass
# ---------------------------------------------------------------------------------------------

B, T, H, V = 3, 24, 6, 40
DT = torch.float64


def batch(seed=0, pairs=B, steps=T, long_pair_=0, empty_pair=None):
    """Pairs of ``steps`` tokens (the first 3 ignored, a few padded); pair ``long_pair_`` (None: none)
    keeps every token, the others keep about a third."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * pairs, steps, H, generator=g, dtype=DT)
    ref_hidden = hidden + 0.3 * torch.randn(2 * pairs, steps, H, generator=g, dtype=DT)
    weight = torch.randn(V, H, generator=g, dtype=DT) * 0.5
    bias = torch.randn(V, generator=g, dtype=DT) * 0.1
    labels = torch.randint(0, V, (2 * pairs, steps), generator=g)
    labels[:, :3] = -100
    for p in range(pairs):
        if p != long_pair_:
            labels[p, steps // 3 :] = -100
            labels[p + pairs, steps // 2 :] = -100
    labels[2 * pairs - 1, -4:] = -100  # a padded rejected row
    if empty_pair is not None:
        labels[empty_pair] = -100
    return hidden, ref_hidden, weight, bias, labels


@pytest.fixture
def passes(monkeypatch):
    """Which long-pair step ran: "one" (engine._long_pairs_one_pass) or "two" (the logits recomputed)."""
    calls = []
    one = engine._long_pairs_one_pass

    def spy_one(*args, **kwargs):
        calls.append("one")
        return one(*args, **kwargs)

    run = engine.run_pair_step

    def spy_run(*args, **kwargs):
        n = len(calls)
        step = run(*args, **kwargs)
        if kwargs["plan"].chunks is None and len(calls) == n:
            calls.append("two")
        return step

    from expo_kernels.modules import paired

    monkeypatch.setattr(engine, "_long_pairs_one_pass", spy_one)
    monkeypatch.setattr(paired, "run_pair_step", spy_run)
    return calls


def check_against_reference(name, hp, data, fn, *, workspace, frozen=False, ref=True, **ref_options):
    """The module's step (in a workspace of ``workspace`` tokens) against the float64 reference:
    loss, logged metrics, d_hidden, d_weight, d_bias."""
    hidden, ref_hidden, weight, bias, labels = data
    h, w, b = (t.detach().clone().requires_grad_(not (frozen and t is not hidden)) for t in (hidden, weight, bias))
    kw = {"ref_hidden": ref_hidden} if ref else {}
    with ek.kernel_options(workspace_bytes=workspace * V * 8):
        plan = fn.plan_for(w, h, b, labels)
        out = fn(w, h, labels, bias=b, **kw)
        out.loss.backward()
    h64, w64, b64 = (
        t.detach().clone().requires_grad_(not (frozen and t is not hidden)) for t in (hidden, weight, bias)
    )
    ref_kw = dict(ref_hidden=ref_hidden, ref_weight=w64.detach(), ref_bias=b64.detach()) if ref else {}
    loss, _, metrics = reference_module_loss(name, hp, h64, w64, b64, labels, **ref_kw, **ref_options)
    loss.backward()
    torch.testing.assert_close(out.loss, loss, rtol=1e-10, atol=1e-10)
    for k, v in metrics.items():
        torch.testing.assert_close(out.metrics[k], v, rtol=1e-10, atol=1e-10, msg=k)
    grads = [(h.grad, h64.grad)] + ([] if frozen else [(w.grad, w64.grad), (b.grad, b64.grad)])
    for got, want in grads:
        assert rel_err(got, want) < 1e-10, rel_err(got, want)
    return plan


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize(
    "case",
    ["one pair", "mixed batch", "forced, pairs fit", "empty pair", "softcap + WPO", "simpo", "cpo"],
)
def test_long_pair_in_one_pass_matches_float64(backend, case, passes):
    require_backend(backend, "cpu")
    name, hp, tf, kw = "sigmoid", dict(beta=0.3, label_smoothing=0.1), {}, {}
    pairs, long_p, empty, workspace, options = B, 0, None, 30, {}
    if case == "one pair":
        pairs = 1
    elif case == "forced, pairs fit":
        long_p, workspace, options = None, 64, {"path": "long_pair_chunks"}
    elif case == "empty pair":
        empty = 2  # pair 2's chosen row counts no token
    elif case == "softcap + WPO":
        tf = dict(temperature=0.7, logit_scale=1.3, softcap=2.5)
        kw = dict(use_weighting=True)
    elif case == "simpo":
        name, hp = "simpo", dict(beta=2.0, gamma=0.5)
    elif case == "cpo":
        name, hp = "cpo", dict(beta=0.2)
    data = batch(seed=3, pairs=pairs, long_pair_=long_p, empty_pair=empty)
    fn = ek.FusedLinearPreferenceLoss(name, backend=backend, **tf, **kw, **hp)
    ref = name == "sigmoid"
    with ek.kernel_options(**options):
        plan = check_against_reference(
            name, hp, data, fn, workspace=workspace, ref=ref, transform=tf or None, use_weighting=bool(kw)
        )
    assert plan.path is ek.Path.LONG_PAIR_CHUNKS and "one pass" in plan.reason, plan
    assert passes == ["one"]


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_ld_alpha_takes_two_passes_unless_the_head_is_frozen(backend, passes):
    require_backend(backend, "cpu")
    hp = dict(beta=0.3)
    data = batch(seed=4)
    fn = ek.FusedLinearDPOLoss(backend=backend, ld_alpha=0.6, **hp)
    plan = check_against_reference("sigmoid", hp, data, fn, workspace=12, ld_alpha=0.6)
    assert "two passes" in plan.reason and "ld_alpha" in plan.reason, plan
    # a frozen head: dH rows scale token by token, whatever the loss's gradient along a row
    plan = check_against_reference("sigmoid", hp, data, fn, workspace=12, frozen=True, ld_alpha=0.6)
    assert "one pass" in plan.reason, plan
    assert passes == ["two", "one"]


def test_partials_that_do_not_fit_take_two_passes(passes):
    # 1 pair: one [V, H] fp64 partial (1920 B) + [V] (320 B) must take at most half the workspace
    data = batch(seed=5, pairs=1)
    fn = ek.FusedLinearDPOLoss(backend="torch", beta=0.3)
    plan = check_against_reference("sigmoid", dict(beta=0.3), data, fn, workspace=12)  # 3840 B: 2240 > half
    assert plan.path is ek.Path.LONG_PAIR_CHUNKS and "two passes" in plan.reason and "half the workspace" in plan.reason
    plan = check_against_reference("sigmoid", dict(beta=0.3), data, fn, workspace=14)  # 4480 B: fits
    assert "one pass" in plan.reason
    assert passes == ["two", "one"]


def test_long_pair_partials_rule():
    grads = D.LongPairGrads(hidden_size=4096, pairs=1, need_weight=True, need_bias=False, row_constant=True)
    opts = KernelOptions(workspace_bytes=1 << 30)
    partial, why = D.long_pair_partials(32000, torch.bfloat16, "cuda", grads, opts)
    assert partial == 32000 * 4096 * 4 and why is None  # one float32 [V, H] buffer, 500 MiB <= 512 MiB
    partial, why = D.long_pair_partials(
        32000, torch.bfloat16, "cuda", D.LongPairGrads(4096, 2, True, False, True), opts
    )
    assert partial == 2 * 32000 * 4096 * 4 and "half the workspace" in why  # two pairs: a buffer per row
    assert D.long_pair_partials(32000, torch.float32, "cpu", D.LongPairGrads(4096, 2, False, False, False), opts) == (
        0,
        None,
    )  # frozen head
    assert "ld_alpha" in D.long_pair_partials(32000, torch.float32, "cpu", D.LongPairGrads(8, 1, True, False, False))[1]


def test_a_row_whose_gradient_varies_is_refused():
    data = batch(seed=6, pairs=1)
    hidden, _, weight, bias, labels = data
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    plan = engine.plan_pairs(labels, -100, V, DT)
    plan.chunks = None

    def position_weighted(logp, log_sum_p2, ref_logp):  # not a sum: d/dlogp varies along the row
        pos = torch.arange(1, logp.shape[1] + 1, dtype=logp.dtype)
        return (logp * pos).sum()

    with ek.kernel_options(workspace_bytes=40 * V * 8), pytest.raises(RuntimeError, match="one number per"):
        engine.run_pair_step(
            h,
            w,
            None,
            labels,
            ignore_index=-100,
            transform=LogitTransform(1.0, None, 1.0),
            with_stats=False,
            loss_of_tokens=position_weighted,
            backend="torch",
            need=(True, True, False),
            plan=plan,
            row_constant=True,
        )

"""Listwise ranking losses (RRHF, PRO) and FusedLinearRankingLoss (RRHF, PRO, RAFT).

The references here are written from the papers' equations, pair by pair and stage by stage in
Python loops over float64 torch scalars (so autograd gives their gradients too), independent of the
vectorized code under test:

* RRHF (Yuan et al., 2023): ``L_rank = sum_{r_i < r_j} max(0, p_i - p_j)``, ``L = L_rank + L_ft``,
  ``L_ft`` the cross-entropy (token-mean NLL) of the highest-reward response;
* PRO (Song et al., 2023): responses sorted by reward, descending,
  ``L = -sum_{k=1}^{K-1} log(exp(s_k) / sum_{i >= k} exp(s_i))``; with the reward-gap temperature
  ``T_k^i = 1 / (r_k - r_i)``, ``T_k^k = min_{i > k} T_k^i``; SFT weight ``0.05 (l - 1)^2`` on the
  summed NLL of the best response;
* RAFT: the token-mean NLL of the highest-reward response.

The module is checked against materialized float64 logits (``tests/reference.py``) on every backend
that runs here (Triton in float32, under its CPU interpreter without a GPU).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import require_backend
from helpers import FP64_BACKEND_NAMES, as_is_and_under_a_meta_default
from reference import reference_logprobs

import expo_kernels as ek

DT = torch.float64
TOL = dict(rtol=1e-9, atol=1e-11)


# ------------------------------------------------------------------------------------------------
# references, from the papers' equations (loops; valid responses only)
# ------------------------------------------------------------------------------------------------
def _valid(b, mask, k):
    return [i for i in range(k) if mask is None or bool(mask[b, i])]


def ref_rrhf(scores, rewards, mask=None):
    total = scores.new_zeros(())
    for b in range(scores.shape[0]):
        idx = _valid(b, mask, scores.shape[1])
        for i in idx:
            for j in idx:
                if float(rewards[b, i]) < float(rewards[b, j]):
                    total = total + torch.clamp(scores[b, i] - scores[b, j], min=0)
    return total / scores.shape[0]


def ref_pro(scores, rewards, mask=None, reward_temperature=False):
    """The paper's sum over stages k = 1..l-1 of the rewards sorted descending (distinct rewards)."""
    total = scores.new_zeros(())
    for b in range(scores.shape[0]):
        idx = _valid(b, mask, scores.shape[1])
        order = sorted(idx, key=lambda i: -float(rewards[b, i]))
        for a in range(len(order) - 1):
            k, rest = order[a], order[a + 1 :]
            if reward_temperature:
                inv_t = [float(rewards[b, k] - rewards[b, i]) for i in rest]  # 1 / T_k^i
                own = scores[b, k] * max(inv_t)  # 1 / T_k^k = max_i 1 / T_k^i
                denom = torch.exp(own)
                for i, g in zip(rest, inv_t, strict=True):
                    denom = denom + torch.exp(scores[b, i] * g)
            else:
                own = scores[b, k]
                denom = torch.exp(own)
                for i in rest:
                    denom = denom + torch.exp(scores[b, i])
            total = total - (own - torch.log(denom))
    return total / scores.shape[0]


def _rows(seed, b, k, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(b, k, generator=g, dtype=dtype)
    rewards = torch.randn(b, k, generator=g, dtype=dtype)  # distinct with probability 1
    return scores, rewards


# ------------------------------------------------------------------------------------------------
# ranking_loss: formulas, values and gradients
# ------------------------------------------------------------------------------------------------
CASES = [("rrhf", {}, ref_rrhf), ("pro", {}, ref_pro), ("pro", {"reward_temperature": True}, ref_pro)]


@pytest.mark.parametrize("name,hp,ref", CASES, ids=["rrhf", "pro", "pro-temperature"])
@pytest.mark.parametrize("k", [2, 4, 5])
def test_formula_matches_paper_loops(name, hp, ref, k):
    scores, rewards = _rows(k, 6, k)
    a = scores.clone().requires_grad_(True)
    b = scores.clone().requires_grad_(True)
    ours = ek.ranking_loss(name, a, rewards, **hp)
    theirs = ref(b, rewards, **hp)
    ours.backward()
    theirs.backward()
    assert ours.dtype == DT
    torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(a.grad, b.grad, **TOL)


def test_rrhf_is_a_sum_over_pairs_per_prompt():
    # one prompt, rewards 3 > 2 > 1 and scores in the reverse order: every pair violated
    s = torch.tensor([[1.0, 2.0, 4.0]], dtype=DT)
    r = torch.tensor([[3.0, 2.0, 1.0]], dtype=DT)
    # (s_2 - s_1) + (s_3 - s_1) + (s_3 - s_2) = 1 + 3 + 2
    assert float(ek.ranking_loss("rrhf", s, r)) == pytest.approx(6.0, rel=1e-15)


def test_rrhf_zero_when_scores_ordered_like_rewards():
    scores, rewards = _rows(1, 5, 4)
    ordered = torch.sort(scores, dim=1).values.gather(1, rewards.argsort(dim=1).argsort(dim=1))
    s = ordered.clone().requires_grad_(True)
    loss = ek.ranking_loss("rrhf", s, rewards)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert float(s.grad.abs().sum()) == 0.0
    # and positive as soon as one pair is swapped
    assert float(ek.ranking_loss("rrhf", ordered.flip(1), rewards)) > 0


@pytest.mark.parametrize("swap", [False, True])
def test_pro_k2_is_logistic(swap):
    scores, rewards = _rows(2, 7, 2)
    if swap:
        rewards = rewards.flip(1)
    best = rewards.argmax(dim=1, keepdim=True)
    s_best, s_worst = scores.gather(1, best)[:, 0], scores.gather(1, 1 - best)[:, 0]
    want = -torch.nn.functional.logsigmoid(s_best - s_worst).mean()
    torch.testing.assert_close(ek.ranking_loss("pro", scores, rewards), want, **TOL)
    # the temperature scales the margin by the reward gap at K = 2
    gap = rewards.gather(1, best)[:, 0] - rewards.gather(1, 1 - best)[:, 0]
    want_t = -torch.nn.functional.logsigmoid(gap * (s_best - s_worst)).mean()
    torch.testing.assert_close(ek.ranking_loss("pro", scores, rewards, reward_temperature=True), want_t, **TOL)


def test_low_precision_scores_compute_in_float32():
    scores, rewards = _rows(3, 4, 3)
    out = ek.ranking_loss("pro", scores.to(torch.bfloat16), rewards)
    assert out.dtype == torch.float32
    # the bf16 scores exactly, then float32 arithmetic
    want = ref_pro(scores.to(torch.bfloat16).double(), rewards)
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------------------
# masks and ties
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,hp,ref", CASES, ids=["rrhf", "pro", "pro-temperature"])
def test_mask_excludes_slots_even_nan(name, hp, ref):
    scores, rewards = _rows(4, 4, 4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 1], [1, 1, 1, 1], [0, 1, 0, 0]], dtype=torch.bool)
    s_nan = scores.masked_fill(~mask, float("nan"))
    r_nan = rewards.masked_fill(~mask, float("inf"))
    a = s_nan.clone().requires_grad_(True)
    ours = ek.ranking_loss(name, a, r_nan, mask=mask, **hp)
    ours.backward()
    b = scores.clone().requires_grad_(True)
    theirs = ref(b, rewards, mask=mask, **hp)  # the loops skip the masked slots; prompt 3 adds 0
    theirs.backward()
    torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(a.grad, b.grad.masked_fill(~mask, 0.0), **TOL)
    assert not bool(a.grad[~mask].any())


def test_prompt_with_one_response_contributes_zero():
    scores, rewards = _rows(5, 2, 3)
    mask = torch.tensor([[True, False, False], [False, False, True]])
    for name in ("rrhf", "pro"):
        assert float(ek.ranking_loss(name, scores, rewards, mask=mask)) == 0.0


def test_ties_rrhf_tied_pairs_add_nothing():
    s = torch.tensor([[0.0, 5.0, -1.0]], dtype=DT)
    r = torch.tensor([[1.0, 1.0, 0.0]], dtype=DT)  # the tied pair (0, 1) is not ranked
    # only pairs with the worse response 2: max(0, -1 - 0) + max(0, -1 - 5) = 0
    assert float(ek.ranking_loss("rrhf", s, r)) == 0.0
    s2 = torch.tensor([[0.0, 5.0, 2.0]], dtype=DT)
    assert float(ek.ranking_loss("rrhf", s2, r)) == pytest.approx(2.0)  # (2 - 0) + max(0, 2 - 5)


def test_ties_pro_rule_strictly_worse_denominators():
    """Documented rule: the stage of y_k contrasts it with the responses of strictly lower reward."""
    s = torch.tensor([[0.3, -0.2, 1.1, 0.5]], dtype=DT)
    r = torch.tensor([[2.0, 2.0, 1.0, 0.0]], dtype=DT)
    e = [math.exp(x) for x in s[0].tolist()]
    want = 0.0
    want -= math.log(e[0] / (e[0] + e[2] + e[3]))  # y_0 over the strictly worse {2, 3}, not over y_1
    want -= math.log(e[1] / (e[1] + e[2] + e[3]))  # y_1 likewise
    want -= math.log(e[2] / (e[2] + e[3]))
    assert float(ek.ranking_loss("pro", s, r)) == pytest.approx(want, rel=1e-12)
    # with the temperature every gap is > 0: finite, and the stage of y_0 scales s_0 by max gap 2
    t = float(ek.ranking_loss("pro", s, r, reward_temperature=True))
    g = [math.exp(x) for x in (0.3 * 2, 1.1 * 1, 0.5 * 2)]
    h = [math.exp(x) for x in (-0.2 * 2, 1.1 * 1, 0.5 * 2)]
    k = [math.exp(x) for x in (1.1 * 1, 0.5 * 1)]
    want_t = -sum(math.log(z[0] / sum(z)) for z in (g, h, k))
    assert t == pytest.approx(want_t, rel=1e-12)


@pytest.mark.parametrize("name,hp", [("rrhf", {}), ("pro", {}), ("pro", {"reward_temperature": True})])
def test_ties_do_not_depend_on_the_order_of_tied_responses(name, hp):
    g = torch.Generator().manual_seed(6)
    scores = torch.randn(5, 5, generator=g, dtype=DT)
    rewards = torch.randint(0, 3, (5, 5), generator=g).to(DT)  # many ties
    base = ek.ranking_loss(name, scores, rewards, **hp)
    for seed in range(3):
        perm = torch.randperm(5, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(ek.ranking_loss(name, scores[:, perm], rewards[:, perm], **hp), base, **TOL)


def test_integer_rewards_accepted():
    scores, rewards = _rows(8, 3, 4)
    ranks = rewards.argsort(dim=1).argsort(dim=1)  # int64 ranks, same order
    for name in ("rrhf", "pro"):
        torch.testing.assert_close(ek.ranking_loss(name, scores, ranks), ek.ranking_loss(name, scores, rewards), **TOL)


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
_S, _R = _rows(9, 2, 3)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(name="dpo"), ValueError, "`name`"),
        (dict(scores=[[0.0, 1.0]]), TypeError, "`scores`"),
        (dict(scores=torch.ones(2, 3, dtype=torch.long)), TypeError, "`scores`.*floating"),
        (dict(scores=_S[0]), ValueError, r"`scores`.*\[B, K\]"),
        (dict(scores=_S[:, :1], rewards=_R[:, :1]), ValueError, "K >= 2"),
        (dict(scores=_S[:0], rewards=_R[:0]), ValueError, "B = 0"),
        (dict(rewards=_R[:, :2]), ValueError, r"`rewards` must have shape \(2, 3\) \(B, K of `scores`\); got \(2, 2\)"),
        (dict(rewards=_R > 0), TypeError, "`rewards`.*real"),
        (dict(rewards=_R.tolist()), TypeError, "`rewards`"),
        (dict(rewards=_R.masked_fill(torch.eye(2, 3, dtype=torch.bool), float("nan"))), ValueError, "`rewards`.*NaN"),
        (dict(scores=_S.masked_fill(torch.eye(2, 3, dtype=torch.bool), float("inf"))), ValueError, "`scores`.*NaN"),
        (dict(mask=torch.ones(2, 3)), TypeError, "`mask`.*bool"),
        (
            dict(mask=torch.ones(3, 2, dtype=torch.bool)),
            ValueError,
            r"`mask` must have shape \(2, 3\) \(B, K of `scores`\)",
        ),
        (dict(mask=torch.zeros(2, 3, dtype=torch.bool)), ValueError, "`mask` leaves no response"),
        (dict(beta=0.1), ValueError, "Unknown hyperparameter `beta`"),
        (dict(name="rrhf", reward_temperature=True), ValueError, "`reward_temperature`"),
        (dict(reward_temperature=1), TypeError, "`reward_temperature`.*bool"),
    ],
)
def test_bad_input_names_the_argument(kwargs, exc, match):
    args = dict(name="pro", scores=_S, rewards=_R)
    args.update(kwargs)
    name, scores, rewards = args.pop("name"), args.pop("scores"), args.pop("rewards")
    with pytest.raises(exc, match=match):
        ek.ranking_loss(name, scores, rewards, **args)


# ------------------------------------------------------------------------------------------------
# FusedLinearRankingLoss against materialized logits
# ------------------------------------------------------------------------------------------------
B, K, T, H, V = 2, 3, 5, 16, 37
IGNORE = -100


def make_batch(seed=0, k=K, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, k, T, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype) * 0.5
    bias = torch.randn(V, generator=g, dtype=dtype) * 0.1
    labels = torch.randint(0, V, (B, k, T), generator=g)
    for b in range(B):  # a prompt of 1-2 tokens, then a completion of >= 1 token, then padding
        for i in range(k):
            p = int(torch.randint(1, 3, (1,), generator=g))
            n = int(torch.randint(1, T - p + 1, (1,), generator=g))
            labels[b, i, :p] = IGNORE
            labels[b, i, p + n :] = IGNORE
    rewards = torch.randn(B, k, generator=g, dtype=torch.float32)
    return hidden, weight, bias, labels, rewards


def leaves(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


def unfused(method, hidden, weight, bias, labels, rewards, mask=None, sft_weight=None, temp=False, rank=True, **tf):
    """The paper's loss on materialized float64 logits, with the loop references (``rank=False``: the
    weighted SFT term alone)."""
    logp = reference_logprobs(hidden, weight, labels, bias, ignore_index=IGNORE, **tf)  # [B, K, T]
    seq = logp.sum(-1)
    n = (labels != IGNORE).sum(-1).double()
    scores = seq / n
    r = rewards.double()
    total = scores.new_zeros(())
    for b in range(hidden.shape[0]):
        idx = _valid(b, mask, hidden.shape[1])
        top = max(float(r[b, i]) for i in idx)
        best = [i for i in idx if float(r[b, i]) == top]
        if method == "rrhf":  # cross-entropy: token-mean NLL
            sft = sum(-scores[b, i] for i in best) / len(best)
            w = 1.0 if sft_weight is None else sft_weight
        elif method == "pro":  # summed NLL, beta = 0.05 (l - 1)^2
            sft = sum(-seq[b, i] for i in best) / len(best)
            w = (0.05 if sft_weight is None else sft_weight) * (len(idx) - 1) ** 2
        else:
            sft = sum(-scores[b, i] for i in best) / len(best)
            w = 1.0 if sft_weight is None else sft_weight
        total = total + w * sft
    total = total / hidden.shape[0]
    if not rank:
        return total
    if method == "rrhf":
        total = total + ref_rrhf(scores, r, mask)
    elif method == "pro":
        total = total + ref_pro(scores, r, mask, reward_temperature=temp)
    return total


def compare(method, *, backend="torch", dtype=DT, tol=TOL, mask=None, temp=False, tf=None, sft_weight=None, seed=0):
    hidden, weight, bias, labels, rewards = make_batch(seed, dtype=dtype)
    if mask is not None:  # empty slots: garbage hidden states, no completion tokens
        hidden = hidden.masked_fill(~mask[..., None, None], float("nan"))
        labels = labels.masked_fill(~mask[..., None], IGNORE)
    h1, w1, b1 = leaves(hidden, weight, bias)
    module = ek.FusedLinearRankingLoss(
        method, backend=backend, reward_temperature=temp, sft_weight=sft_weight, **(tf or {})
    )
    out = module(w1, h1, labels, rewards, mask=mask, bias=b1)
    out.loss.backward()
    h2, w2, b2 = leaves(hidden.nan_to_num(0.0), weight, bias)
    want = unfused(method, h2, w2, b2, labels, rewards, mask, sft_weight, temp, **(tf or {}))
    want.backward()
    torch.testing.assert_close(out.loss, want.to(out.loss.dtype), **tol)
    torch.testing.assert_close(h1.grad, h2.grad.to(dtype), **tol)
    torch.testing.assert_close(w1.grad, w2.grad.to(dtype), **tol)
    torch.testing.assert_close(b1.grad, b2.grad.to(dtype), **tol)
    return out


@pytest.mark.parametrize("backend", FP64_BACKEND_NAMES)
@pytest.mark.parametrize("method,temp", [("rrhf", False), ("pro", False), ("pro", True), ("raft", False)])
def test_module_matches_materialized_float64(backend, method, temp):
    out = compare(method, backend=backend, temp=temp)
    assert out.scores.shape == (B, K) and out.best.sum() == B
    assert set(out.metrics) >= {"loss/rank", "loss/sft", "logps/best", "rewards/best", "entropy"}


@pytest.mark.parametrize("method,temp", [("rrhf", False), ("pro", True), ("raft", False)])
def test_module_matches_materialized_triton(method, temp):
    # float32: Triton refuses float64; tiny shapes for its CPU interpreter
    require_backend("triton")
    compare(method, backend="triton", dtype=torch.float32, tol=dict(rtol=2e-5, atol=2e-6), temp=temp)


def test_module_masks_transform_and_weight():
    mask = torch.tensor([[True, False, True], [True, True, True]])
    for method in ("rrhf", "pro", "raft"):
        compare(method, mask=mask, tf=dict(temperature=0.7, softcap=4.0), sft_weight=0.3, seed=1)


def test_module_sft_term_averages_tied_best_responses():
    hidden, weight, bias, labels, rewards = make_batch(2)
    rewards[0] = torch.tensor([1.0, 1.0, 0.0])  # two best responses for prompt 0
    for method in ("rrhf", "pro", "raft"):
        h1, w1 = leaves(hidden, weight)
        out = ek.FusedLinearRankingLoss(method, backend="torch", sft_weight=0.5)(w1, h1, labels, rewards)
        assert out.best[0].tolist() == [True, True, False]
        sft_only = unfused(method, hidden, weight, None, labels, rewards, sft_weight=0.5, rank=False)
        torch.testing.assert_close(0.5 * out.metrics["loss/sft"], sft_only, **TOL)
        if method == "pro":
            continue  # the paper's sorted stages are ambiguous under ties (our rule: tested above)
        out.loss.backward()
        h2, w2 = leaves(hidden, weight)
        want = unfused(method, h2, w2, None, labels, rewards, sft_weight=0.5)
        want.backward()
        torch.testing.assert_close(out.loss, want, **TOL)
        torch.testing.assert_close(h1.grad, h2.grad, **TOL)


def test_raft_trains_only_the_best_response():
    hidden, weight, _, labels, rewards = make_batch(3)
    h1, w1 = leaves(hidden, weight)
    out = ek.FusedLinearRankingLoss("raft", backend="torch", sft_weight=2.0)(w1, h1, labels, rewards)
    out.loss.backward()
    best = rewards.argmax(dim=1)
    # the SFT loss of the best responses alone
    sel_h, sel_l = hidden[torch.arange(B), best], labels[torch.arange(B), best]
    logp = reference_logprobs(sel_h, weight, sel_l, ignore_index=IGNORE)
    want = 2.0 * (-logp.sum(-1) / (sel_l != IGNORE).sum(-1)).mean()
    torch.testing.assert_close(out.loss, want, **TOL)
    untouched = torch.ones(B, K, dtype=torch.bool)
    untouched[torch.arange(B), best] = False
    assert not bool(h1.grad[untouched].any())
    assert torch.isnan(out.scores[untouched]).all() and "ranking/accuracy" not in out.metrics
    # K = 1 is plain SFT
    one = ek.FusedLinearRankingLoss("raft", backend="torch")(weight, sel_h[:, None], sel_l[:, None], rewards[:, :1])
    torch.testing.assert_close(one.loss, want / 2.0, **TOL)


def test_module_metrics_by_hand():
    hidden, weight, _, labels, rewards = make_batch(4)
    out = ek.FusedLinearRankingLoss("rrhf", backend="torch")(weight, hidden, labels, rewards)
    logp = reference_logprobs(hidden, weight, labels, ignore_index=IGNORE)
    scores = logp.sum(-1) / (labels != IGNORE).sum(-1)
    torch.testing.assert_close(out.scores, scores, **TOL)
    torch.testing.assert_close(out.metrics["loss/rank"], ref_rrhf(scores, rewards.double()), **TOL)
    right = total = 0
    for b in range(B):
        for i in range(K):
            for j in range(K):
                if rewards[b, i] < rewards[b, j]:
                    total += 1
                    right += int(scores[b, i] < scores[b, j])
    assert float(out.metrics["ranking/accuracy"]) == pytest.approx(right / total)


@pytest.mark.parametrize(
    "ctor,exc,match",
    [
        (dict(loss="ipo"), ValueError, "`loss`"),
        (dict(sft_weight=-1.0), ValueError, "`sft_weight`"),
        (dict(sft_weight="1"), TypeError, "`sft_weight`"),
        (dict(sft_weight=float("nan")), ValueError, "`sft_weight`"),
        (dict(loss="rrhf", reward_temperature=True), ValueError, "`reward_temperature`"),
        (dict(reward_temperature="yes"), TypeError, "reward_temperature"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(backend="cuda"), ValueError, "backend"),
    ],
)
def test_module_bad_construction(ctor, exc, match):
    with pytest.raises(exc, match=match):
        ek.FusedLinearRankingLoss(**{"loss": "pro", **ctor})


def test_module_bad_call():
    hidden, weight, _, labels, rewards = make_batch(5)
    m = ek.FusedLinearRankingLoss("rrhf", backend="torch")
    with pytest.raises(ValueError, match=r"`hidden`.*\[B, K, T, H\]"):
        m(weight, hidden[0], labels[0], rewards)
    with pytest.raises(ValueError, match="`labels`"):
        m(weight, hidden, labels[:, :, 1:], rewards)
    with pytest.raises(ValueError, match="K >= 2"):
        m(weight, hidden[:, :1], labels[:, :1], rewards[:, :1])
    with pytest.raises(ValueError, match="`rewards`"):
        m(weight, hidden, labels, rewards[:, :2])
    with pytest.raises(ValueError, match="`mask` leaves a prompt"):
        m(weight, hidden, labels, rewards, mask=torch.tensor([[True] * K, [False] * K]))
    empty = labels.clone()
    empty[1, 2] = IGNORE
    with pytest.raises(ValueError, match="`labels`.*without any completion token"):
        m(weight, hidden, empty, rewards)
    m(weight, hidden, empty, rewards, mask=torch.tensor([[True] * K, [True, True, False]]))  # fine when masked


def test_long_responses_sum_in_float64():
    """At T = 32768 a response's summed log-prob is ~-1.8e5, where float32's spacing is 1/64: the sums
    accumulate in float64, so RRHF's term (a difference of two close scores) is float64-exact, and the
    outputs keep the per-token dtype (float32)."""
    t, h, v = 32768, 8, 256
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 1, t, h, generator=g)
    hidden = torch.cat([base, base + 1e-4 * torch.randn(1, 1, t, h, generator=g)], dim=1)  # [1, 2, T, H]
    weight = torch.randn(v, h, generator=g) * 0.5
    labels = torch.randint(0, v, (1, 2, t), generator=g)
    tok = ek.linear_logprobs(hidden, weight, labels, backend="torch")
    scores = tok.double().sum(-1) / t
    # the response with the higher score gets the lower reward: the RRHF term is their score gap
    rewards = torch.where(scores[0, 0] > scores[0, 1], torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]]))
    out = ek.FusedLinearRankingLoss("rrhf", sft_weight=0.0, backend="torch")(weight, hidden, labels, rewards)
    expect = (scores[0, 0] - scores[0, 1]).abs()
    assert out.loss.dtype == out.scores.dtype == out.logps.dtype == torch.float32
    assert all(m.dtype == torch.float32 for m in out.metrics.values())
    torch.testing.assert_close(out.loss, expect.float(), rtol=1e-5, atol=0)
    torch.testing.assert_close(out.logps, tok.double().sum(-1).float(), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["rrhf", "pro"])
def test_ranking_loss_follows_its_inputs_device_not_the_default(name):
    # with another default device (torch.set_default_device), the mask made when none is given goes to the
    # inputs' device (under a "meta" default, a mask made without one would not mix with CPU scores)
    g = torch.Generator().manual_seed(16)
    scores, rewards = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g)
    want, got = as_is_and_under_a_meta_default(lambda: ek.ranking_loss(name, scores, rewards))
    assert got.device.type == "cpu" and torch.equal(got, want)

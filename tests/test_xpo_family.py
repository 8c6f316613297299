"""ROPO's loss and sample weights, the RSO example, and TR-DPO through FusedDPOTrainer.

* ROPO (``loss="ropo"``): values and gradients against a float64 implementation written from the
  paper's equation (``l_ropo = 4a/(1+a)^2 l_dpo + 4a^2/(1+a)^2 l_na``, ``l_dpo = -log sigma(beta m)``,
  ``l_na = sigma(-beta m)``), the normalization's consequence (largest gradient weight 1), the fused
  module on every backend against materialized logits, hyperparameter errors, and the weight step of
  the filtering loop against brute force.
* RSO: examples/rso.py's rejection sampler against the target distribution ``pi_sft exp(r / beta)``,
  its pairs through the fused module against materialized logits, and the example end to end.
* TR-DPO: TRL's ``sync_ref_model`` (soft and hard updates) with FusedDPOTrainer vs TRL's DPOTrainer,
  and the final reference against the update rule computed from the policy's recorded parameters.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import os
import pathlib
import random
import sys
import warnings

import pytest
import torch
from helpers import BACKEND_NAMES
from reference import reference_logprobs

import expo_kernels as ek
from expo_kernels.losses import preference_loss
from expo_kernels.losses.registry import HParamTypeError
from expo_kernels.losses.robust import ropo_sample_weights

DT = torch.float64
IGNORE = -100


# ------------------------------------------------------------------------------------ ROPO formula
def ropo_paper(c, r, rc, rr, beta, alpha):
    """One pair's ROPO loss in float64 Python arithmetic, from the paper's definitions."""
    z = beta * ((c - rc) - (r - rr))
    l_dpo = math.log1p(math.exp(-z)) if z > -30 else -z + math.log1p(math.exp(z))  # -log sigma(z)
    l_na = 1.0 / (1.0 + math.exp(z))  # sigma(-z)
    return 4 * alpha / (1 + alpha) ** 2 * l_dpo + 4 * alpha**2 / (1 + alpha) ** 2 * l_na


def ropo_paper_dz(z, alpha):
    """d l_ropo / d z, z = beta m: -(4a/(1+a)^2) sigma(-z) - (4a^2/(1+a)^2) sigma(z) sigma(-z)."""
    s_neg = 1.0 / (1.0 + math.exp(z))
    return -4 * alpha / (1 + alpha) ** 2 * s_neg - 4 * alpha**2 / (1 + alpha) ** 2 * s_neg * (1 - s_neg)


@pytest.mark.parametrize("beta,alpha", [(0.1, 14.0), (0.5, 3.0), (1.0, 0.5), (2.0, 30.0)])
def test_ropo_values_and_gradients_match_the_paper(beta, alpha):
    g = torch.Generator().manual_seed(1)
    c, r, rc, rr = (torch.randn(7, generator=g, dtype=DT) * 8 for _ in range(4))
    c = c.clone().requires_grad_(True)
    r = r.clone().requires_grad_(True)
    per_pair = preference_loss("ropo", c, r, rc, rr, reduction="none", beta=beta, alpha=alpha)
    want = [ropo_paper(*map(float, v), beta, alpha) for v in zip(c.detach(), r.detach(), rc, rr, strict=True)]
    torch.testing.assert_close(per_pair, torch.tensor(want, dtype=DT), rtol=1e-12, atol=1e-14)
    per_pair.sum().backward()
    m = ((c - rc) - (r - rr)).detach()
    dz = [ropo_paper_dz(beta * float(x), alpha) for x in m]
    torch.testing.assert_close(c.grad, beta * torch.tensor(dz, dtype=DT), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(r.grad, -beta * torch.tensor(dz, dtype=DT), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("alpha", [1.0, 3.0, 14.0])
def test_ropo_largest_gradient_weight_is_one(alpha):
    """The 4a/(1+a)^2 factor makes the largest |d loss / d(beta m)| equal 1 (DPO's, at m -> -inf),
    and leaves pairs the model ranks far the other way (suspected flips) a weight 4a/(1+a)^2 < 1."""
    z = torch.linspace(-40, 40, 80001, dtype=DT, requires_grad=True)
    zero = torch.zeros_like(z)
    preference_loss("ropo", z, zero, zero, zero, reduction="sum", beta=1.0, alpha=alpha).backward()
    assert z.grad.abs().max().item() == pytest.approx(1.0, abs=1e-6)
    assert z.grad[0].abs().item() == pytest.approx(4 * alpha / (1 + alpha) ** 2, rel=1e-9)


# ------------------------------------------------------------------------------ fused vs materialized
def make_rows(rows, t, h, v, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, t, h, generator=g, dtype=DT).to(dtype)
    weight = (0.5 * torch.randn(v, h, generator=g, dtype=DT)).to(dtype)
    bias = (0.1 * torch.randn(v, generator=g, dtype=DT)).to(dtype)
    ref_hidden = (hidden.double() + 0.3 * torch.randn(rows, t, h, generator=g, dtype=DT)).to(dtype)
    ref_weight = (weight.double() + 0.05 * torch.randn(v, h, generator=g, dtype=DT)).to(dtype)
    labels = torch.randint(0, v, (rows, t), generator=g)
    labels[:, 0] = IGNORE  # a one-token prompt
    labels[0, -1] = labels[-1, -2:] = IGNORE  # padding
    return hidden, weight, bias, ref_hidden, ref_weight, labels


def ropo_torch64(c, r, rc, rr, beta, alpha):
    """The paper's ROPO mean over pairs, float64 torch ops (not the registry's code)."""
    z = beta * ((c - rc) - (r - rr))
    l_dpo = torch.log1p(torch.exp(-z))
    l_na = 1.0 / (1.0 + torch.exp(z))
    return (4 * alpha / (1 + alpha) ** 2 * l_dpo + 4 * alpha**2 / (1 + alpha) ** 2 * l_na).mean()


# Triton's interpreter is slow and refuses float64: tiny float32 shapes there.
CASES = {"torch": (DT, 16, 37, 1e-10), "native": (DT, 16, 37, 1e-10), "triton": (torch.float32, 8, 13, 2e-5)}


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_ropo_fused_matches_materialized_logits(backend):
    dtype, h, v, rtol = CASES[backend]
    beta, alpha = 0.4, 6.0
    hidden, weight, bias, ref_hidden, ref_weight, labels = make_rows(4, 5, h, v, dtype, seed=3)
    leaves = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
    out = ek.FusedLinearPreferenceLoss("ropo", beta=beta, alpha=alpha, backend=backend)(
        leaves[1], leaves[0], labels, bias=leaves[2], ref_hidden=ref_hidden, ref_weight=ref_weight
    )
    out.loss.backward()

    ref_leaves = [x.double().clone().requires_grad_(True) for x in (hidden, weight, bias)]
    seq = reference_logprobs(ref_leaves[0], ref_leaves[1], labels, ref_leaves[2]).sum(-1)
    ref_seq = reference_logprobs(ref_hidden, ref_weight, labels).sum(-1)
    c, r = seq.chunk(2)
    rc, rr = ref_seq.chunk(2)
    want = ropo_torch64(c, r, rc, rr, beta, alpha)
    want.backward()
    tol = dict(rtol=rtol, atol=rtol * 1e-1)
    torch.testing.assert_close(out.loss.double(), want, **tol)
    torch.testing.assert_close(out.metrics["rewards/margins"].double(), (beta * ((c - rc) - (r - rr))).mean(), **tol)
    for got, exp in zip(leaves, ref_leaves, strict=True):
        torch.testing.assert_close(got.grad.double(), exp.grad, **tol)


# ---------------------------------------------------------------------------- hyperparameter errors
def _pair():
    x = torch.zeros(2, dtype=DT)
    return x, x, x, x


@pytest.mark.parametrize(
    "hp,exc,name",
    [
        (dict(alpha=0.0), ValueError, "`alpha`"),
        (dict(alpha=-2.0), ValueError, "`alpha`"),
        (dict(alpha=float("nan")), ValueError, "`alpha`"),
        (dict(alpha="14"), HParamTypeError, "`alpha`"),
        (dict(beta=0.0), ValueError, "`beta`"),
        (dict(gamma=0.1), ValueError, "`gamma`"),
    ],
)
def test_ropo_bad_hyperparameters_name_the_argument(hp, exc, name):
    with pytest.raises(exc, match=name):
        preference_loss("ropo", *_pair(), **hp)
    with pytest.raises(exc, match=name):
        ek.FusedLinearPreferenceLoss("ropo", backend="torch", **hp)


def test_ropo_needs_the_reference():
    x = torch.zeros(2, dtype=DT)
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        preference_loss("ropo", x, x)


# ------------------------------------------------------------------------------- ROPO weight step
def test_ropo_sample_weights_minimize_the_kept_loss():
    """The 0/1 weights with sum k that minimize sum w_i l_i, checked against every subset."""
    losses = torch.tensor([0.7, 0.1, 2.0, 0.4, 0.4, 1.5], dtype=DT)
    for keep in (1 / 6, 0.5, 0.8, 1.0):
        w = ropo_sample_weights(losses, keep)
        k = math.ceil(keep * 6 - 1e-9)
        assert w.sum().item() == k and set(w.tolist()) <= {0.0, 1.0}
        best = min(sum(losses[list(s)].tolist()) for s in itertools.combinations(range(6), k))
        assert (w * losses).sum().item() == pytest.approx(best)
    # ties go by position: of the two 0.4, the first is kept
    assert ropo_sample_weights(losses, 1 / 3).tolist() == [0.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    # and in a long run of ties (where an unstable sort reorders them): the first ones, in order
    many = torch.zeros(100, dtype=DT)
    many[::3] = 1.0  # 34 pairs of loss 1, 66 of loss 0: keeping 40 keeps the first 40 zeros
    w = ropo_sample_weights(many, 0.4)
    zeros = (many == 0).nonzero().squeeze(1)
    assert w.tolist() == [1.0 if i in zeros[:40].tolist() else 0.0 for i in range(100)]


@pytest.mark.parametrize("keep", [0.0, 1.5, -0.1, "0.5", None])
def test_ropo_sample_weights_bad_keep_ratio(keep):
    with pytest.raises(ValueError, match="keep_ratio"):
        ropo_sample_weights(torch.ones(4), keep)


def test_ropo_sample_weights_bad_losses():
    with pytest.raises(ValueError, match="NaN"):
        ropo_sample_weights(torch.tensor([0.1, float("nan")]), 0.5)
    with pytest.raises(ValueError, match="pair_losses"):
        ropo_sample_weights(torch.ones(2, 2), 0.5)


# ----------------------------------------------------------------------------------- RSO example
def _load_rso():
    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "rso.py"
    spec = importlib.util.spec_from_file_location("rso_example", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["rso_example"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def rso():
    return _load_rso()


def test_rso_rejection_sampling_follows_the_target(rso):
    """Accepted draws follow pi_sft * exp(r / beta) (normalized), not pi_sft."""
    pi_sft = [0.1, 0.35, 0.2, 0.35]
    rewards = [2.0, 0.0, 1.0, 1.5]  # the best response has pi_sft 0.35: nearly always among 16 draws
    beta, trials = 0.5, 4000
    target = [p * math.exp(r / beta) for p, r in zip(pi_sft, rewards, strict=True)]
    target = [t / sum(target) for t in target]
    rng = random.Random(0)
    counts = [0] * 4
    for _ in range(trials):
        cands = rng.choices(range(4), weights=pi_sft, k=16)
        (y,) = rso.rejection_sample(cands, [rewards[c] for c in cands], 1, beta, rng)
        counts[y] += 1
    freq = [n / trials for n in counts]
    # 4 standard deviations of a frequency over 4000 draws is <= 0.032
    assert max(abs(f - t) for f, t in zip(freq, target, strict=True)) < 0.035, (freq, target)
    assert max(abs(f - p) for f, p in zip(freq, pi_sft, strict=True)) > 0.2  # it did reweight


def test_rso_rejection_sampling_returns_distinct_draws(rso):
    rng = random.Random(1)
    cands = [3, 3, 1, 0, 2, 3]
    got = rso.rejection_sample(cands, [0.0, 0.0, 1.0, -1.0, 0.5, 0.0], 6, 0.3, rng)
    assert sorted(got) == sorted(cands)  # all six accepted eventually, each draw once
    for bad in (dict(num_samples=0, beta=1.0), dict(num_samples=7, beta=1.0), dict(num_samples=1, beta=0.0)):
        with pytest.raises(ValueError):
            rso.rejection_sample(cands, [0.0] * 6, rng=rng, **bad)
    assert rso.rank_pairs([0, 1, 2, 2, 3], [0.0, 1.0, 5.0, 2.0]) == [(1, 0)]  # the tie (2, 2) is dropped


@pytest.mark.parametrize("loss", ["hinge", "sigmoid"])
def test_rso_pairs_through_the_fused_loss_match_materialized_logits(rso, loss):
    toy = rso.toy_problem(seed=2)
    pairs = rso.rso_pairs(toy, seed=2, backend="torch")
    assert pairs and all(toy.rewards[x, c] > toy.rewards[x, r] for x, c, r in pairs)
    hidden, labels = rso.pair_batch(toy, pairs)
    w = (toy.w_sft + 0.2 * torch.randn(toy.w_sft.shape, dtype=DT)).requires_grad_(True)
    beta = 0.5
    out = ek.FusedLinearPreferenceLoss(loss, beta=beta, backend="torch")(
        w, hidden, labels, ref_hidden=hidden, ref_weight=toy.w_sft
    )
    w2 = w.detach().clone().requires_grad_(True)
    seq = reference_logprobs(hidden, w2, labels).sum(-1)
    ref = reference_logprobs(hidden, toy.w_sft, labels).sum(-1)
    m = (seq - ref).view(2, -1)
    m = m[0] - m[1]
    # RSO's hinge-norm max(0, 1 - gamma m) and sigmoid-norm -log sigma(gamma m), gamma = beta
    want = (torch.clamp(1 - beta * m, min=0) if loss == "hinge" else torch.log1p(torch.exp(-beta * m))).mean()
    torch.testing.assert_close(out.loss, want, rtol=1e-10, atol=1e-12)
    out.loss.backward()
    want.backward()
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-10, atol=1e-12)


def test_rso_example_runs_and_learns_the_pairs(rso, capsys):
    history = rso.main(["--backend", "torch", "--steps", "12", "--loss", "sigmoid"])
    assert len(history) == 12
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert history[-1]["accuracy"] == 1.0
    assert "rejection-sampled pairs" in capsys.readouterr().out


# ------------------------------------------------------------------------- TR-DPO against TRL
def _trl_setup():
    pytest.importorskip("trl")
    transformers = pytest.importorskip("transformers")
    from datasets import Dataset
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    chars = list("abcdefghijklmnopqrstuvwxyz .?!:")
    vocab = {"<pad>": 0, "<eos>": 1, **{ch: i + 2 for i, ch in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")  # one token per character
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    data = Dataset.from_dict(
        {
            "prompt": ["what is up?", "say hi.", "count: ", "name a color.", "sky?", "ok?", "go.", "why?"],
            "chosen": [" all good", " hi there", " one two", " blue", " up", " yes", " going", " because"],
            "rejected": [" no", " go away", " zero", " the sky is a color", " down", " no way", " stop", " dunno"],
        }
    )

    def llama():
        cfg = transformers.LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=64,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=1,
        )
        return transformers.LlamaForCausalLM(cfg)

    return tokenizer, data, llama


STEPS, SYNC_EVERY = 4, 2
_SKIP_LOG = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos", "epoch", "step"}


def _run_trdpo(trainer_cls, alpha, tmp_path):
    from transformers import TrainerCallback
    from trl import DPOConfig

    tokenizer, data, llama = _trl_setup()
    torch.manual_seed(0)
    model = llama()
    torch.manual_seed(1)  # a reference unlike the policy
    ref_model = llama()
    ref0 = {k: p.detach().clone() for k, p in ref_model.named_parameters()}
    args = DPOConfig(
        output_dir=str(tmp_path / trainer_cls.__name__),
        per_device_train_batch_size=4,
        max_steps=STEPS,
        learning_rate=0.1,
        optim="sgd",
        logging_steps=1,
        report_to=[],
        seed=0,
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        disable_tqdm=True,
        beta=0.1,
        sync_ref_model=True,
        ref_model_mixup_alpha=alpha,
        ref_model_sync_steps=SYNC_EVERY,
    )
    policy_at_sync = []

    class RecordPolicy(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step % SYNC_EVERY == 0:
                policy_at_sync.append({k: p.detach().clone() for k, p in model.named_parameters()})

    tr = trainer_cls(model=model, ref_model=ref_model, args=args, train_dataset=data, processing_class=tokenizer)
    tr.add_callback(RecordPolicy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr.train()
    logs = [{k: v for k, v in e.items() if k not in _SKIP_LOG} for e in tr.state.log_history if "loss" in e]
    ref = {k: p.detach().clone() for k, p in tr.ref_model.named_parameters()}
    policy = {k: p.detach().clone() for k, p in tr.model.named_parameters()}
    return logs, policy, ref, ref0, policy_at_sync


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' own deprecation notices
@pytest.mark.parametrize("alpha", [0.6, 1.0], ids=["soft_update", "hard_update"])
def test_trdpo_sync_matches_trl(alpha, tmp_path):
    """TR-DPO: every SYNC_EVERY steps ref <- alpha * policy + (1 - alpha) * ref (alpha = 1: the hard
    update). Tolerances: logged values rel 2e-5 (fp32; the heads tile the vocabulary differently),
    parameters 1e-5 absolute, as tests/test_integration_trl.py."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    from trl import DPOTrainer

    from expo_kernels.integrations.trl import FusedDPOTrainer

    logs_a, pol_a, ref_a, ref0, _ = _run_trdpo(DPOTrainer, alpha, tmp_path)
    logs_b, pol_b, ref_b, ref0_b, snaps = _run_trdpo(FusedDPOTrainer, alpha, tmp_path)
    assert len(logs_a) == len(logs_b) == STEPS
    for step, (la, lb) in enumerate(zip(logs_a, logs_b, strict=True)):
        assert set(la) <= set(lb), f"metrics missing from ours: {set(la) - set(lb)}"
        for k in la:  # loss, rewards/* (through the synced reference), logps/*, ...
            assert lb[k] == pytest.approx(la[k], rel=2e-5, abs=1e-6), f"step {step} {k}: TRL {la[k]} vs ours {lb[k]}"
    for a, b in ((pol_a, pol_b), (ref_a, ref_b)):
        assert a.keys() == b.keys()
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5

    # the update rule itself, from the policy recorded at each sync step (ours)
    assert len(snaps) == STEPS // SYNC_EVERY
    for k, p in ref_b.items():
        expect = ref0_b[k]
        for snap in snaps:
            expect = alpha * snap[k] + (1 - alpha) * expect
        torch.testing.assert_close(p, expect, rtol=1e-5, atol=1e-6)
    assert max((ref_b[k] - ref0_b[k]).abs().max().item() for k in ref_b) > 1e-3  # it did move

"""End to end on CPU, no downloads: TRL's own trainers vs ours on tiny random models.

A character-level tokenizer and tiny Llama / Gemma-2 (softcapped logits) models are built inside the
test; a few SGD steps from the same seed, fp32 (``bf16=False``: TRL's default bf16 autocast would
compare two different bf16 roundings). Logged losses and metrics, and the updated parameters, must
agree with TRL's native path (which runs TRL's chunked LM head) within ``RTOL`` / ``PARAM_TOL``.
EXPO, which TRL lacks, is compared with a trainer that materializes the logits.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
os.environ.setdefault("TQDM_DISABLE", "1")

from helpers import (  # noqa: E402
    TRL_PARAM_TOL,
    TRL_RTOL,
    TRL_SKIP_LOG,
    TRL_TRAINER_ARGS,
    plain_logits_expo_trainer_class,
    tiny_llama,
    trl_datasets,
    trl_tokenizer,
)
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer  # noqa: E402

from expo_kernels.integrations import hf as ek_hf  # noqa: E402
from expo_kernels.integrations.trl import (  # noqa: E402
    FusedDPOTrainer,
    FusedKTOTrainer,
    enable_fused_lm_head,
)

RTOL = TRL_RTOL
PARAM_TOL = TRL_PARAM_TOL
_SKIP_LOG = TRL_SKIP_LOG


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


TOK = trl_tokenizer()
PAIRS, UNPAIRED = trl_datasets()


def llama():
    return tiny_llama(len(TOK))


def gemma2():
    cfg = transformers.Gemma2Config(
        vocab_size=len(TOK),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        final_logit_softcapping=2.0,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    return transformers.Gemma2ForCausalLM(cfg)


@pytest.fixture(autouse=True)
def _per_test_cwd(tmp_path, monkeypatch):
    """Each test's trainers write their output_dir under its own tmp_path."""
    monkeypatch.chdir(tmp_path)


# What every trainer of these tests shares: 3 SGD steps on the CPU, fp32, logging each step, no saving.
TRAINER_ARGS = dict(TRL_TRAINER_ARGS, output_dir="trainer_output")  # relative: inside the tmp_path


def dpo_args(**kw):
    return DPOConfig(**{**TRAINER_ARGS, "beta": 0.1, **kw})


def run(trainer_cls, make_model=llama, *, ref=True, peft_config=None, switch=False, trainer_kw=None, **cfg):
    torch.manual_seed(0)
    model = make_model()
    torch.manual_seed(1)  # a reference unlike the policy: rewards are not ties at the first step
    ref_model = make_model() if ref else None
    tr = trainer_cls(
        model=model,
        ref_model=ref_model,
        args=dpo_args(**cfg),
        train_dataset=PAIRS,
        processing_class=TOK,
        peft_config=peft_config,
        **(trainer_kw or {}),
    )
    if switch:
        enable_fused_lm_head(tr)
    tr.train()
    logs = [{k: v for k, v in e.items() if k not in _SKIP_LOG} for e in tr.state.log_history if "loss" in e]
    params = {k: p.detach().clone() for k, p in tr.model.named_parameters()}
    return logs, params


def assert_runs_match(a, b, rtol=RTOL, param_tol=PARAM_TOL):
    (logs_a, params_a), (logs_b, params_b) = a, b
    assert len(logs_a) == len(logs_b) == 3
    for la, lb in zip(logs_a, logs_b, strict=False):
        missing = set(la) - set(lb)
        assert not missing, f"metrics missing from ours: {missing}"
        for k in la:
            assert lb[k] == pytest.approx(la[k], rel=rtol, abs=1e-6), f"{k}: TRL {la[k]} vs ours {lb[k]}"
    assert params_a.keys() == params_b.keys()
    worst = max((params_a[k] - params_b[k]).abs().max().item() for k in params_a)
    assert worst < param_tol


# ---------------------------------------------------------------------------------------------- DPO
@pytest.mark.parametrize(
    "cfg",
    [
        dict(loss_type=["sigmoid"]),
        dict(loss_type=["ipo"], beta=0.5),
        dict(loss_type=["sigmoid", "sft"], loss_weights=[0.8, 0.5]),
        dict(loss_type=["sigmoid"], ld_alpha=0.5, use_weighting=True),
        dict(loss_type=["robust"], label_smoothing=0.1, f_divergence_type="js_divergence"),
    ],
    ids=["sigmoid", "ipo", "mix_sft", "ld_alpha_wpo", "robust_js"],
)
def test_dpo_matches_trl(cfg):
    assert_runs_match(run(DPOTrainer, **cfg), run(FusedDPOTrainer, **cfg))


def test_dpo_softcapped_gemma2_matches_trl():
    assert_runs_match(run(DPOTrainer, gemma2), run(FusedDPOTrainer, gemma2))


def test_precomputed_reference_matches_trl():
    cfg = dict(precompute_ref_log_probs=True, loss_type=["sigmoid"])
    assert_runs_match(run(DPOTrainer, **cfg), run(FusedDPOTrainer, **cfg))


def test_enable_on_a_built_trainer_matches_trl():
    assert_runs_match(run(DPOTrainer), run(DPOTrainer, switch=True))


def test_lora_frozen_head_matches_trl():
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    a = run(DPOTrainer, ref=False, peft_config=lora, learning_rate=1.0)
    b = run(FusedDPOTrainer, ref=False, peft_config=lora, learning_rate=1.0)
    assert_runs_match(a, b)
    torch.manual_seed(0)
    initial = llama().lm_head.weight
    (head,) = [v for k, v in b[1].items() if k.endswith("lm_head.weight")]
    assert torch.equal(head, initial)  # the frozen head got no update
    assert any(not torch.equal(v, 0 * v) for k, v in b[1].items() if "lora_B" in k)  # the adapter trained


def test_our_path_reproduces_trl_sigmoid():
    """registry_loss=True routes a TRL loss through FusedLinearPreferenceLoss: same numbers as TRL's code."""
    a = run(DPOTrainer, loss_type=["sigmoid"])
    b = run(FusedDPOTrainer, loss_type=["sigmoid"], trainer_kw=dict(registry_loss=True))
    assert_runs_match(a, b)


# ---------------------------------------------------------------------------------------------- EXPO
# materialized logits, exact token KL, EXPO's hand formula (tests/reference.py)
PlainLogitsEXPOTrainer = plain_logits_expo_trainer_class()


@pytest.mark.parametrize("make_model", [llama, gemma2], ids=["llama", "gemma2"])
def test_expo_token_kl_matches_materialized_logits(make_model):
    a = run(PlainLogitsEXPOTrainer, make_model, loss_type=["sigmoid"])
    b = run(
        FusedDPOTrainer,
        make_model,
        loss_type=["expo"],
        trainer_kw=dict(loss_kwargs={"lam": PlainLogitsEXPOTrainer.lam, "kl_estimator": "token"}),
    )
    la, lb = a[0], b[0]
    for x, y in zip(la, lb, strict=False):
        assert y["loss"] == pytest.approx(x["loss"], rel=RTOL)
        assert "kl" in y and "bt_loss" in y and "rewards/margins" in y
    worst = max((a[1][k] - b[1][k]).abs().max().item() for k in a[1])
    assert worst < PARAM_TOL


def test_expo_with_lora_reference_is_the_base_model():
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    logs, _ = run(
        FusedDPOTrainer,
        ref=False,
        peft_config=lora,
        loss_type=["expo"],
        trainer_kw=dict(loss_kwargs={"lam": 1.0, "kl_estimator": "token"}),
    )
    assert logs[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # a fresh LoRA adapter (B = 0) equals the base model
    assert logs[-1]["kl"] > 0


# ---------------------------------------------------------------------------------------------- KTO
def test_kto_matches_trl():
    def go(cls):
        torch.manual_seed(0)
        model = llama()
        torch.manual_seed(1)
        ref = llama()
        args = KTOConfig(**TRAINER_ARGS)
        tr = cls(model=model, ref_model=ref, args=args, train_dataset=UNPAIRED, processing_class=TOK)
        tr.train()
        logs = [{k: v for k, v in e.items() if k not in _SKIP_LOG} for e in tr.state.log_history if "loss" in e]
        return logs, {k: p.detach().clone() for k, p in tr.model.named_parameters()}

    assert_runs_match(go(KTOTrainer), go(FusedKTOTrainer))


# ---------------------------------------------------------------------------------------------- errors
def test_unsupported_configurations_fail_at_construction():
    with pytest.raises(ValueError, match="neither a TRL DPO loss type"):
        run(FusedDPOTrainer, loss_type=["sigmoidd"])
    with pytest.raises(ValueError, match="precompute_ref_log_probs"):
        run(
            FusedDPOTrainer,
            loss_type=["expo"],
            precompute_ref_log_probs=True,
            trainer_kw=dict(loss_kwargs={"lam": 0.1, "kl_estimator": "token"}),
        )
    with pytest.raises(ValueError, match="lam"):
        run(FusedDPOTrainer, loss_type=["expo"])
    with pytest.raises(ValueError, match="label_smoothing"):
        run(FusedDPOTrainer, loss_type=["expo"], label_smoothing=0.1, trainer_kw=dict(loss_kwargs={"lam": 0.1}))
    with pytest.raises(ValueError, match="FusedKTOTrainer"):
        run(FusedDPOTrainer, loss_type=["kto"])


# ---------------------------------------------------------------------------------------------- HF
def test_logit_transforms_of_known_families():
    t = ek_hf.logit_transform(gemma2())
    assert t == {"temperature": 1.0, "logit_scale": None, "softcap": 2.0}
    assert ek_hf.logit_transform(llama()) == {"temperature": 1.0, "logit_scale": None, "softcap": None}
    cohere = transformers.CohereConfig(logit_scale=0.125)
    assert ek_hf.logit_transform(cohere)["logit_scale"] == 0.125
    granite = transformers.GraniteConfig(logits_scaling=8.0)
    assert ek_hf.logit_transform(granite)["logit_scale"] == 1 / 8.0


def test_unknown_model_type_fails_loudly():
    cfg = transformers.LlamaConfig()
    cfg.model_type = "my_new_arch"
    with pytest.raises(ek_hf.UnknownLogitTransform, match="my_new_arch"):
        ek_hf.logit_transform(cfg)
    assert ek_hf.logit_transform(cfg, override={"softcap": 30.0})["softcap"] == 30.0


@pytest.mark.parametrize("make_model", [llama, gemma2], ids=["llama", "gemma2"])
def test_fused_forward_matches_model_logits(make_model):
    """Our patched forward vs the model's own logits: every field of TRL's FusedCausalLMOutput."""
    from expo_kernels.integrations.trl import add_fused_lm_head

    torch.manual_seed(0)
    model = make_model().eval()
    ids = torch.randint(2, len(TOK), (3, 9))
    labels = ids.masked_fill(torch.arange(9) < 3, -100)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].double()
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs"))
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
    lab = labels[:, 1:]
    mask = lab != -100
    logp = logits.log_softmax(-1)
    want = torch.where(
        mask, logp.gather(-1, lab.clamp(min=0).unsqueeze(-1)).squeeze(-1), torch.zeros_like(mask, dtype=torch.float64)
    )
    torch.testing.assert_close(out.log_probs.double(), want, rtol=1e-5, atol=1e-5)
    ent = -(logp.exp() * logp).sum(-1)
    torch.testing.assert_close(out.entropy.double()[mask], ent[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.mean_logits.double()[mask], logits.mean(-1)[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        out.log_sum_sq_probs.double()[mask], torch.logsumexp(2 * logp, -1)[mask], rtol=1e-5, atol=1e-5
    )
    assert torch.equal(out.is_top1[mask], (logits.argmax(-1) == lab)[mask])
    assert out.loss.item() == pytest.approx(-want[mask].mean().item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------- CPO / ORPO
def _run_logits_trainer(cls, config_cls, make_model=llama, **cfg):
    torch.manual_seed(0)
    model = make_model()
    args = config_cls(**{**TRAINER_ARGS, "max_length": 64, **cfg})
    tr = cls(model=model, args=args, train_dataset=PAIRS, processing_class=TOK)
    tr.train()
    logs = [{k: v for k, v in e.items() if k not in _SKIP_LOG} for e in tr.state.log_history if "loss" in e]
    return logs, {k: p.detach().clone() for k, p in tr.model.named_parameters()}


@pytest.mark.parametrize(
    "cfg",
    [dict(loss_type="sigmoid", cpo_alpha=1.0), dict(loss_type="simpo", cpo_alpha=0.0), dict(loss_type="ipo")],
    ids=["cpo", "simpo", "ipo"],
)
def test_cpo_family_matches_trl(cfg):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    from expo_kernels.integrations.trl import FusedCPOTrainer

    assert_runs_match(
        _run_logits_trainer(CPOTrainer, CPOConfig, **cfg), _run_logits_trainer(FusedCPOTrainer, CPOConfig, **cfg)
    )


def test_cpo_hands_trl_float64_sums():
    # TRL's CPO/ORPO loss code subtracts the per-sequence sums we hand it: they are float64 (a long row's
    # float32 sum has a spacing of 1/64 at 2e5; tests/test_long_context.py measures the effect)
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    from expo_kernels.integrations.trl import FusedCPOTrainer

    torch.manual_seed(0)
    model = llama()
    args = CPOConfig(**{**TRAINER_ARGS, "max_length": 64})
    ours = FusedCPOTrainer(model=model, args=args, train_dataset=PAIRS, processing_class=TOK)
    theirs = CPOTrainer(model=model, args=args, train_dataset=PAIRS, processing_class=TOK)
    batch = next(iter(ours.get_train_dataloader()))
    with torch.no_grad():
        got = ours.fused_concatenated_forward(ours.model, batch)
        want = theirs.concatenated_forward(theirs.model, batch)
    assert got[0].dtype == got[1].dtype == torch.float64
    for g, w in zip(got[:2], want[:2], strict=True):
        torch.testing.assert_close(g.float(), w.float(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("make_model", [llama, gemma2], ids=["llama", "gemma2"])
def test_orpo_matches_trl(make_model):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    from expo_kernels.integrations.trl import FusedORPOTrainer

    assert_runs_match(
        _run_logits_trainer(ORPOTrainer, ORPOConfig, make_model),
        _run_logits_trainer(FusedORPOTrainer, ORPOConfig, make_model),
    )

"""Online RL on expo_kernels' head, against TRL itself: GRPO, RLOO, online DPO (CPU, no downloads).

The tiny Llama and character tokenizer of tests/helpers.py; a deterministic length-based reward; a few
SGD steps from the same seed, fp32, with TRL's trainer and with ours. Generation is TRL's (sampled with
the same seeds), so the completions agree, and the logged metrics and the final parameters must agree
within TRL_RTOL / TRL_PARAM_TOL. Every GRPO loss type (with both importance-sampling levels, clipping,
the KL term and the entropy mask) is covered at the unit level: TRL's ``_compute_loss`` on our head
vs on TRL's chunked head, on the same fixed batch (loss, metrics, gradients).
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

from helpers import TRL_PARAM_TOL, TRL_RTOL, TRL_SKIP_LOG, TRL_TRAINER_ARGS, tiny_llama, trl_tokenizer  # noqa: E402
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer  # noqa: E402
from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer  # noqa: E402

from expo_kernels._dispatch import Path, plan_linear_logprobs  # noqa: E402
from expo_kernels.integrations.trl import (  # noqa: E402
    TRL_GRPO_LOSS_TYPES,
    FusedGRPOTrainer,
    FusedOnlineDPOTrainer,
    FusedRLOOTrainer,
)
from expo_kernels.integrations.trl import fused_head as ek_fused_head  # noqa: E402

TOK = trl_tokenizer()
PROMPTS = ["what is up?", "say hi.", "count: ", "name a color.", "sky?", "ok?", "go.", "why?"]
SKIP_LOG = TRL_SKIP_LOG | {"step_time"}  # wall time


def reward_len(completions, **kwargs):
    """Deterministic: longer is better, the letter 'a' costs a little."""
    return [len(c) / 8.0 - 0.1 * c.count("a") for c in completions]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(autouse=True)
def _per_test_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """GRPO/RLOO build their reference from the policy's path: the tiny model, saved once."""
    path = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    tiny_llama(len(TOK)).save_pretrained(path)
    return str(path)


@pytest.fixture
def head_calls(monkeypatch):
    """Every call of our head: (grad enabled, the op's planned path)."""
    calls: list[tuple[bool, Path]] = []
    inner = ek_fused_head.linear_logprobs

    def recording(hidden, weight, labels, bias=None, **kw):
        calls.append((torch.is_grad_enabled(), plan_linear_logprobs(hidden, weight, bias).path))
        return inner(hidden, weight, labels, bias, **kw)

    monkeypatch.setattr(ek_fused_head, "linear_logprobs", recording)
    return calls


def _run(trainer, steps=3):
    trainer.train()
    logs = [{k: v for k, v in e.items() if k not in SKIP_LOG} for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == steps
    return logs, {k: p.detach().clone() for k, p in trainer.model.named_parameters()}


def _assert_runs_match(a, b):
    (logs_a, params_a), (logs_b, params_b) = a, b
    for la, lb in zip(logs_a, logs_b, strict=True):
        assert set(la) == set(lb), f"metrics differ: {set(la) ^ set(lb)}"
        for k in la:
            assert lb[k] == pytest.approx(la[k], rel=TRL_RTOL, abs=1e-6), f"{k}: TRL {la[k]} vs ours {lb[k]}"
    assert params_a.keys() == params_b.keys()
    worst = max((params_a[k] - params_b[k]).abs().max().item() for k in params_a)
    assert worst < TRL_PARAM_TOL


def _rl_args(config_cls, **cfg):
    base = dict(TRL_TRAINER_ARGS, output_dir="out", num_generations=2, max_completion_length=8)
    return config_cls(**{**base, **cfg})


def _rl_trainer(cls, config_cls, model_path, **cfg):
    return cls(
        model=model_path,
        reward_funcs=reward_len,
        args=_rl_args(config_cls, **cfg),
        train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=TOK,
    )


def _assert_our_head(trainer, head_calls, *, no_grad_passes: bool):
    policy = trainer.accelerator.unwrap_model(trainer.model)
    assert "transform" in ek_fused_head.fused_head_options(policy)  # our forward is installed
    assert any(grad for grad, _ in head_calls), "the policy pass did not run on our head"
    if no_grad_passes:  # old policy / reference: the op's forward-only plan
        no_grad = [path for grad, path in head_calls if not grad]
        assert no_grad and all(p is not Path.KEPT_LOGITS for p in no_grad)


# ---------------------------------------------------------------------------------------------- GRPO
@pytest.mark.parametrize(
    "cfg",
    [
        dict(loss_type="grpo", beta=0.1),
        # two iterations per generation: old-policy log-probs (no grad), ratios != 1, clipping, entropy mask
        dict(loss_type="dapo", beta=0.1, num_iterations=2, epsilon=0.05, top_entropy_quantile=0.5),
        dict(  # GSPO, with a sampling temperature and the head in fp32
            loss_type="grpo",
            importance_sampling_level="sequence",
            num_iterations=2,
            epsilon=0.05,
            temperature=0.7,
            cast_lm_head_to_fp32=True,
        ),
    ],
    ids=["grpo_kl", "dapo_iters_entropy_mask", "gspo_sequence"],
)
def test_grpo_matches_trl(cfg, model_path, head_calls):
    a = _run(_rl_trainer(GRPOTrainer, GRPOConfig, model_path, **cfg))
    assert not head_calls
    ours = _rl_trainer(FusedGRPOTrainer, GRPOConfig, model_path, **cfg)
    b = _run(ours)
    _assert_our_head(ours, head_calls, no_grad_passes=cfg.get("beta", 0.0) > 0 or "num_iterations" in cfg)
    _assert_runs_match(a, b)


# ---------------------------------------------------------------------------------------------- RLOO
@pytest.mark.parametrize(
    "cfg", [dict(), dict(beta=0.0, num_iterations=2, epsilon=0.05)], ids=["kl_reward", "no_ref_iters"]
)
def test_rloo_matches_trl(cfg, model_path, head_calls):
    a = _run(_rl_trainer(RLOOTrainer, RLOOConfig, model_path, **cfg))
    ours = _rl_trainer(FusedRLOOTrainer, RLOOConfig, model_path, **cfg)
    b = _run(ours)
    _assert_our_head(ours, head_calls, no_grad_passes=True)
    _assert_runs_match(a, b)


# ---------------------------------------------------------------------------------------- online DPO
def _online_dpo_trainer(cls, peft_config=None, **cfg):
    torch.manual_seed(0)
    model = tiny_llama(len(TOK))
    base = dict(TRL_TRAINER_ARGS, output_dir="out", max_new_tokens=8, max_length=32, beta=0.1)
    return cls(
        model=model,
        reward_funcs=reward_len,
        args=OnlineDPOConfig(**{**base, **cfg}),
        train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=TOK,
        peft_config=peft_config,
    )


@pytest.mark.parametrize(
    "cfg",
    [dict(loss_type="sigmoid"), dict(loss_type="ipo", beta=[0.5], missing_eos_penalty=0.5, max_length=12)],
    ids=["sigmoid", "ipo_eos_penalty_truncated"],
)
def test_online_dpo_matches_trl(cfg, head_calls):
    a = _run(_online_dpo_trainer(OnlineDPOTrainer, **cfg))
    ours = _online_dpo_trainer(FusedOnlineDPOTrainer, **cfg)
    b = _run(ours)
    _assert_our_head(ours, head_calls, no_grad_passes=True)
    _assert_runs_match(a, b)


def test_online_dpo_lora_reference_matches_trl(head_calls):
    peft = pytest.importorskip("peft")
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    a = _run(_online_dpo_trainer(OnlineDPOTrainer, peft_config=peft.LoraConfig(**lora)))
    b = _run(_online_dpo_trainer(FusedOnlineDPOTrainer, peft_config=peft.LoraConfig(**lora)))
    assert head_calls
    _assert_runs_match(a, b)


# ------------------------------------------------------------------- every GRPO loss type, unit level
@pytest.fixture(scope="module")
def grpo_pair(model_path):
    """TRL's GRPOTrainer and ours on the same weights, and one fixed batch of completions."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = dict(TRL_TRAINER_ARGS, output_dir=os.path.join(model_path, "out"), num_generations=2)
        ds = datasets.Dataset.from_dict({"prompt": PROMPTS})
        trainers = [
            cls(
                model=model_path,
                reward_funcs=reward_len,
                args=GRPOConfig(**args, beta=0.1),
                train_dataset=ds,
                processing_class=TOK,
            )
            for cls in (GRPOTrainer, FusedGRPOTrainer)
        ]
    g = torch.Generator().manual_seed(0)
    b, p, c = 4, 5, 7
    completion_mask = torch.ones(b, c, dtype=torch.long)
    completion_mask[1, 5:] = 0
    completion_mask[3, 2:] = 0
    inputs = dict(
        prompt_ids=torch.randint(2, len(TOK), (b, p), generator=g),
        prompt_mask=torch.ones(b, p, dtype=torch.long),
        completion_ids=torch.randint(2, len(TOK), (b, c), generator=g),
        completion_mask=completion_mask,
        advantages=torch.tensor([1.0, -0.5, 0.7, -1.2]),
        num_items_in_batch=completion_mask.sum(),
    )
    with torch.no_grad():  # old-policy / reference log-probs near the policy's: ratios off 1, clipped on some
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        mask = torch.cat([inputs["prompt_mask"], completion_mask], 1)
        logps, _, _ = trainers[0]._get_per_token_logps_and_entropies(trainers[0].model, ids, mask, c)
    inputs["old_per_token_logps"] = logps + 0.3 * torch.randn(b, c, generator=g)
    inputs["ref_per_token_logps"] = logps + 0.2 * torch.randn(b, c, generator=g)
    return trainers, inputs


def _grpo_loss_cases():
    cases = []
    for loss in TRL_GRPO_LOSS_TYPES:
        levels = {
            "luspo": ["sequence"],
            "vespo": ["token"],
            "grpo": ["token", "sequence"],
            "sapo": ["token", "sequence"],
        }
        for level in levels.get(loss, ["token"]):
            cases.append(pytest.param(loss, level, 0.1, 1.0, id=f"{loss}-{level}-kl"))
        cases.append(pytest.param(loss, levels.get(loss, ["token"])[0], 0.0, 0.5, id=f"{loss}-entropy_mask"))
    cases.append(pytest.param("dapo", "token", 0.1, 1.0, id="dapo-off_policy_mask"))
    return cases


@pytest.mark.parametrize("loss_type, level, beta, top_entropy_quantile", _grpo_loss_cases())
def test_every_grpo_loss_type_on_our_head(request, grpo_pair, loss_type, level, beta, top_entropy_quantile):
    trainers, inputs = grpo_pair
    results = []
    for tr in trainers:
        tr.loss_type, tr.importance_sampling_level, tr.beta = loss_type, level, beta
        tr.top_entropy_quantile = top_entropy_quantile
        tr.args.delta = 1.5 if loss_type == "grpo" else None  # two-sided clipping
        tr.off_policy_mask_threshold = 0.05 if request.node.callspec.id == "dapo-off_policy_mask" else None
        tr.current_gradient_accumulation_steps = 1
        tr.model.train()
        tr.model.zero_grad()
        tr._metrics["train"].clear()
        loss = tr._compute_loss(tr.model, inputs)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in tr.model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), dict(tr._metrics["train"]), grads))
    (loss_a, metrics_a, grads_a), (loss_b, metrics_b, grads_b) = results
    assert loss_b.item() == pytest.approx(loss_a.item(), rel=TRL_RTOL, abs=1e-7)
    assert metrics_a.keys() == metrics_b.keys()
    for k in metrics_a:
        assert metrics_b[k] == pytest.approx(metrics_a[k], rel=TRL_RTOL, abs=1e-7), k
    assert grads_a.keys() == grads_b.keys() and grads_a
    for k in grads_a:
        torch.testing.assert_close(grads_b[k], grads_a[k], rtol=1e-4, atol=1e-6, msg=k)


# ----------------------------------------------------------------------------------- refused options
def test_unsupported_options_fail_clearly(model_path):
    with pytest.raises(NotImplementedError, match="entropy_coef"):
        _rl_trainer(FusedGRPOTrainer, GRPOConfig, model_path, entropy_coef=0.01)
    with pytest.raises(NotImplementedError, match="use_adaptive_entropy"):
        _rl_trainer(FusedGRPOTrainer, GRPOConfig, model_path, use_adaptive_entropy=True)
    with pytest.raises(ValueError, match="loss_type='hinge'"):
        _online_dpo_trainer(FusedOnlineDPOTrainer, loss_type="hinge")
    with pytest.raises(ValueError, match="nope"):
        FusedRLOOTrainer(model=model_path, reward_funcs=reward_len, backend="nope")
    # vLLM generation passes through to TRL, which needs vLLM installed (not here)
    vllm_missing = pytest.raises(ImportError, match="(?i)vllm")
    with vllm_missing:
        _rl_trainer(FusedGRPOTrainer, GRPOConfig, model_path, use_vllm=True)

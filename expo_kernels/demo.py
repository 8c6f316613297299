"""The main job: a few DPO and EXPO training steps of a tiny Llama, three ways, side by side.

    python -m expo_kernels.demo                 # (also: expo-kernels-demo) defaults finish in < 2 min on 2 CPU cores
    python -m expo_kernels.demo --vocab 128256 --seq-len 512 --json demo.json

Paths (same model, data, seed and objective):

* ``plain``: ``model(...).logits`` -> ``log_softmax`` -> gather, as older TRL and most frameworks;
  the ``[rows, T, V]`` logits exist in forward and backward (EXPO's token KL reads them too);
* ``trl``: TRL's own chunked fused head (``trl.trainer.utils.add_fused_lm_head``), what TRL 1.16's
  trainers run; it returns log-probs only, so it has no EXPO token-KL row;
* ``expo_kernels``: the backbone's hidden states into ``FusedLinearPreferenceLoss`` (policy pass,
  forward-only reference pass, fused two-head token KL for EXPO).

Each (loss, path) runs in a fresh process so its peak memory is its own: peak RSS over the
baseline after building model and data on CPU, peak allocated bytes over the baseline on CUDA.
Step time is the median of the steps after the first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

PATHS = ("plain", "trl", "expo_kernels")
LOSSES = ("dpo", "expo")


# ------------------------------------------------------------------------------------------------ worker
def _rss_reset() -> bool:
    """Reset the kernel's RSS high-water mark (Linux); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _worker(opts) -> dict:
    import torch
    import transformers

    import expo_kernels as ek
    from expo_kernels.integrations import hf

    device = torch.device(opts.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[opts.dtype]
    torch.manual_seed(opts.seed)
    cfg = transformers.LlamaConfig(
        vocab_size=opts.vocab,
        hidden_size=opts.hidden,
        intermediate_size=2 * opts.hidden,
        num_hidden_layers=opts.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=opts.seq_len + 1,
    )
    # transformers wraps `PreTrainedModel.to` in functools.wraps(nn.Module.to), whose typeshed type does
    # not bind `self`: mypy sees the call as missing it
    policy = transformers.LlamaForCausalLM(cfg).to(device=device, dtype=dtype)  # type: ignore[call-arg]
    ref = transformers.LlamaForCausalLM(cfg).to(device=device, dtype=dtype)  # type: ignore[call-arg]
    ref.load_state_dict(policy.state_dict())
    ref.requires_grad_(False)
    rows = 2 * opts.pairs
    ids = torch.randint(0, opts.vocab, (rows, opts.seq_len), device=device)
    ids[opts.pairs :, : opts.seq_len // 3] = ids[: opts.pairs, : opts.seq_len // 3]  # shared prompts
    labels = ids.clone()
    labels[:, : opts.seq_len // 3] = -100  # the prompt does not count
    shifted = labels[:, 1:]
    opt = torch.optim.AdamW(policy.parameters(), lr=opts.lr)
    hp = dict(beta=opts.beta) if opts.loss == "dpo" else dict(lam=opts.lam, kl_estimator="token")
    name = "sigmoid" if opts.loss == "dpo" else "expo"

    def plain_step():
        logits = policy(input_ids=ids).logits[:, :-1].float()
        logp_all = logits.log_softmax(-1)
        mask = shifted != -100
        tok = logp_all.gather(-1, shifted.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        seq = torch.where(mask, tok, torch.zeros_like(tok)).sum(1)
        with torch.no_grad():
            ref_all = ref(input_ids=ids).logits[:, :-1].float().log_softmax(-1)
        if name == "sigmoid":
            ref_tok = ref_all.gather(-1, shifted.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            ref_seq = torch.where(mask, ref_tok, torch.zeros_like(ref_tok)).sum(1)
            return ek.preference_loss(name, *seq.chunk(2), *ref_seq.chunk(2), **hp)
        kl = (ref_all.exp() * (ref_all - logp_all)).sum(-1)
        kl = torch.where(mask, kl, torch.zeros_like(kl)).sum(1)
        return ek.preference_loss(name, *seq.chunk(2), token_kl=kl, **hp)

    def trl_step():
        seq = policy(input_ids=ids, labels=labels, fused_lm_head=True).log_probs.sum(1)
        with torch.no_grad():
            ref_seq = ref(input_ids=ids, labels=labels, fused_lm_head=True).log_probs.sum(1)
        return ek.preference_loss(name, *seq.chunk(2), *ref_seq.chunk(2), **hp)

    loss_fn = ek.FusedLinearPreferenceLoss(name, compute_metrics=False, **hf.logit_transform(policy), **hp)

    def ours_step():
        hidden = hf.backbone(policy)(input_ids=ids).last_hidden_state[:, :-1]
        with torch.no_grad():
            ref_hidden = hf.backbone(ref)(input_ids=ids).last_hidden_state[:, :-1]
        weight, bias = hf.lm_head_parameters(policy)
        ref_weight, ref_bias = hf.lm_head_parameters(ref)
        return loss_fn(
            weight, hidden, shifted, bias=bias, ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias
        ).loss

    if opts.path == "trl":
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(policy)
        add_fused_lm_head(ref)
    step = {"plain": plain_step, "trl": trl_step, "expo_kernels": ours_step}[opts.path]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    sync()
    if device.type == "cuda":
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        reset = _rss_reset()
        base = _rss_bytes("VmRSS")
    losses, times = [], []
    for _ in range(opts.steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = step()
        loss.backward()
        opt.step()
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _rss_bytes("VmHWM") - base if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {
        "losses": losses,
        "step_s": statistics.median(times[1:] or times),
        "first_step_s": times[0],
        "peak_bytes": peak,
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
    }


# ------------------------------------------------------------------------------------------------ driver
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m expo_kernels.demo",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES))
    p.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per run (default 3)")
    p.add_argument("--pairs", type=int, default=2, help="preference pairs per step (rows = 2 x pairs)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta")
    p.add_argument("--lam", type=float, default=0.1, help="EXPO lambda (token-level KL)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the table here as JSON")
    p.add_argument("--worker", nargs=2, metavar=("LOSS", "PATH"), help=argparse.SUPPRESS)
    return p


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def main(argv: list[str] | None = None) -> int:
    opts = _parser().parse_args(argv)
    if opts.device is None:
        import torch

        opts.device = "cuda" if torch.cuda.is_available() else "cpu"
    if opts.worker:
        opts.loss, opts.path = opts.worker
        print(json.dumps(_worker(opts)))
        return 0

    from tqdm.auto import tqdm

    jobs = [(loss, path) for loss in opts.losses for path in opts.paths if not (loss == "expo" and path == "trl")]
    passthrough = list(argv if argv is not None else sys.argv[1:])
    rows = []
    bar = tqdm(jobs, desc="demo", unit="run")
    for loss, path in bar:
        bar.set_postfix_str(f"{loss} / {path}")
        cmd = [sys.executable, "-m", "expo_kernels.demo", *passthrough, "--device", opts.device, "--worker", loss, path]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
            rows.append({"loss": loss, "path": path, "error": tail[0]})
            continue
        rows.append({"loss": loss, "path": path, **json.loads(proc.stdout.strip().splitlines()[-1])})
    bar.close()

    logits_bytes = 2 * opts.pairs * (opts.seq_len - 1) * opts.vocab * 4
    print(
        f"\ntiny Llama: hidden {opts.hidden}, {opts.layers} layers, vocab {opts.vocab:,}; {opts.pairs} pairs x "
        f"{opts.seq_len} tokens ({opts.dtype}, {opts.device}); {opts.steps} AdamW steps; one fp32 logits tensor "
        f"[rows, T, V] = {_fmt_bytes(logits_bytes)} (computed)"
    )
    print(f"{'loss':<5} {'path':<13} {'first loss':>11} {'last loss':>11} {'step s':>8} {'peak memory':>13}")
    for r in rows:
        if "error" in r:
            print(f"{r['loss']:<5} {r['path']:<13} ERROR: {r['error']}")
            continue
        print(
            f"{r['loss']:<5} {r['path']:<13} {r['losses'][0]:>11.5f} {r['losses'][-1]:>11.5f} {r['step_s']:>8.3f} "
            f"{_fmt_bytes(r['peak_bytes']):>13}"
        )
    if "expo" in opts.losses and "trl" in opts.paths:
        print("(expo / trl: TRL's fused head returns log-probs only, no token-level KL)")
    print(
        "peak memory: "
        + (
            "peak allocated over the baseline"
            if opts.device.startswith("cuda")
            else "peak RSS over the baseline after building model and data"
        )
        + ", fresh process per row"
    )
    if opts.json:
        import torch

        meta = {
            "command": "python -m expo_kernels.demo " + " ".join(passthrough),
            "torch": torch.__version__,
            "settings": {k: v for k, v in vars(opts).items() if k != "worker"},
            "rows": rows,
        }
        with open(opts.json, "w") as f:
            json.dump(meta, f, indent=1)
        print(f"wrote {opts.json}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

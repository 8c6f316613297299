"""RSO on a toy: statistical rejection sampling, then a registry loss through the fused head.

RSO (Liu, Zhao, Joshi, Khalman, Saleh, Liu, Liu, "Statistical Rejection Sampling Improves Preference
Optimization", ICLR 2024, arXiv 2309.06657) trains on pairs drawn from (an estimate of) the optimal
policy of the KL-regularized reward objective, ``pi_r(y|x) ∝ pi_sft(y|x) exp(r(x, y) / beta)``, instead
of pairs drawn from the SFT policy. The steps, each a function below:

1. ``toy_problem``: a tiny token-level "model" (fixed hidden states, an LM head ``W``) whose SFT head
   ``W_sft`` defines ``pi_sft`` over K candidate responses per prompt (their sequence probabilities,
   renormalized over the K), and a reward table ``r[x, k]``.
2. ``rejection_sample`` (the paper's Algorithm 1): draw candidates from ``pi_sft``; each pass over the
   not-yet-accepted candidates accepts one with probability ``exp((r - M) / beta)``, ``M`` the largest
   reward among them, until ``num_samples`` are accepted. ``M`` stands in for the unknown bound of the
   density ratio ``pi_r / pi_sft``, so the accepted draws follow ``pi_r`` when the best response is
   among the candidates.
3. ``rank_pairs`` ("rso-sample-rank"): the accepted responses are paired two by two and each pair is
   ordered by the reward (the paper's pairwise reward-ranking model; here the toy reward itself).
4. ``train``: a few SGD steps of a registry loss on those pairs through
   :class:`expo_kernels.FusedLinearPreferenceLoss`, the SFT head as the reference. RSO's two losses are
   the registry's ``"hinge"`` (its hinge-norm, ``max(0, 1 - beta m)``) and ``"sigmoid"`` (sigmoid-norm,
   DPO's loss); the loss's ``beta`` is the paper's gamma.

Run:  python examples/rso.py [--loss hinge|sigmoid] [--steps 30] [--backend torch]
"""

from __future__ import annotations

import argparse
import math
import random
from dataclasses import dataclass

import torch

import expo_kernels as ek

IGNORE = -100


@dataclass
class Toy:
    """The toy problem. P prompts, K candidate responses each, responses of T tokens over V.

    hidden: ``[P, K, T, H]`` float64 hidden state before each response token (fixed: only the head trains).
    labels: ``[P, K, T]`` the response tokens (``IGNORE`` after a response ends).
    w_sft: ``[V, H]`` the SFT (and reference) head. rewards: ``[P, K]``.
    """

    hidden: torch.Tensor
    labels: torch.Tensor
    w_sft: torch.Tensor
    rewards: torch.Tensor

    def sft_probs(self, backend: str | None = None) -> torch.Tensor:
        """``[P, K]`` pi_sft over each prompt's K candidates: sequence probabilities, renormalized."""
        p, k, t, h = self.hidden.shape
        logp = ek.linear_logprobs(
            self.hidden.reshape(p * k, t, h), self.w_sft, self.labels.reshape(p * k, t), backend=backend
        )
        return torch.softmax(logp.sum(-1).reshape(p, k), dim=-1)


def toy_problem(prompts: int = 8, k: int = 6, t: int = 5, h: int = 16, v: int = 11, seed: int = 0) -> Toy:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(prompts, k, t, h, generator=g, dtype=torch.float64)
    labels = torch.randint(0, v, (prompts, k, t), generator=g)
    for i in range(prompts):  # responses of 2..t tokens
        for j in range(k):
            n = int(torch.randint(2, t + 1, (1,), generator=g))
            labels[i, j, n:] = IGNORE
    w_sft = 0.3 * torch.randn(v, h, generator=g, dtype=torch.float64)
    rewards = torch.randn(prompts, k, generator=g, dtype=torch.float64)
    return Toy(hidden, labels, w_sft, rewards)


def rejection_sample(
    candidates: list[int], rewards: list[float], num_samples: int, beta: float, rng: random.Random
) -> list[int]:
    """Algorithm 1 of RSO: ``num_samples`` of the ``candidates`` (drawn from pi_sft), accepted so that
    they follow ``pi_sft * exp(r / beta)``. ``rewards[i]`` is the reward of ``candidates[i]``.

    Returns the accepted candidates in acceptance order (each position of ``candidates`` at most once).
    """
    if not 0 < num_samples <= len(candidates):
        raise ValueError(f"num_samples must be in [1, {len(candidates)}], got {num_samples}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    remaining = list(range(len(candidates)))  # positions, so repeated candidates stay distinct draws
    accepted: list[int] = []
    while len(accepted) < num_samples:
        top = max(rewards[i] for i in remaining)
        kept = []
        for i in remaining:
            # accept with probability exp((r - M) / beta) <= 1: the ratio pi_r / pi_sft over its bound
            if len(accepted) < num_samples and rng.random() < math.exp((rewards[i] - top) / beta):
                accepted.append(i)
            else:
                kept.append(i)
        remaining = kept
    return [candidates[i] for i in accepted]


def rank_pairs(samples: list[int], rewards: list[float]) -> list[tuple[int, int]]:
    """Consecutive accepted samples paired, ``(chosen, rejected)`` by reward; ties dropped.
    ``rewards[k]`` is the reward of response ``k``."""
    pairs = []
    for a, b in zip(samples[0::2], samples[1::2], strict=False):
        if rewards[a] != rewards[b]:
            pairs.append((a, b) if rewards[a] > rewards[b] else (b, a))
    return pairs


def rso_pairs(
    toy: Toy,
    num_candidates: int = 16,
    num_samples: int = 4,
    beta: float = 0.5,
    seed: int = 0,
    backend: str | None = None,
) -> list[tuple[int, int, int]]:
    """Steps 1-3 for every prompt: ``(prompt, chosen, rejected)`` triples."""
    rng = random.Random(seed)
    probs = toy.sft_probs(backend)
    out = []
    for x in range(probs.shape[0]):
        cands = rng.choices(range(probs.shape[1]), weights=probs[x].tolist(), k=num_candidates)
        r = toy.rewards[x].tolist()
        picked = rejection_sample(cands, [r[c] for c in cands], num_samples, beta, rng)
        out += [(x, c, rj) for c, rj in rank_pairs(picked, r)]
    return out


def pair_batch(toy: Toy, pairs: list[tuple[int, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``hidden [2B, T, H]`` and ``labels [2B, T]`` in TRL's row layout: the B chosen, then the B rejected."""
    rows = [(x, c) for x, c, _ in pairs] + [(x, r) for x, _, r in pairs]
    hidden = torch.stack([toy.hidden[x, k] for x, k in rows])
    labels = torch.stack([toy.labels[x, k] for x, k in rows])
    return hidden, labels


def train(
    toy: Toy,
    pairs: list[tuple[int, int, int]],
    *,
    loss: str = "hinge",
    beta: float = 0.5,
    steps: int = 30,
    lr: float = 0.5,
    backend: str | None = None,
) -> list[dict[str, float]]:
    """SGD on the head ``W`` (from ``W_sft``) with ``loss`` on the pairs; the reference is the SFT head.
    Returns per step the loss and the reward accuracy the fused module logs."""
    hidden, labels = pair_batch(toy, pairs)
    loss_fn = ek.FusedLinearPreferenceLoss(loss, beta=beta, backend=backend)
    w = toy.w_sft.clone().requires_grad_(True)
    history: list[dict[str, float]] = []
    for _ in range(steps):
        out = loss_fn(w, hidden, labels, ref_hidden=hidden, ref_weight=toy.w_sft)
        w.grad = None
        out.loss.backward()
        assert w.grad is not None
        with torch.no_grad():
            w -= lr * w.grad
        history.append({"loss": out.loss.item(), "accuracy": out.metrics["rewards/accuracies"].item()})
    return history


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loss", default="hinge", choices=["hinge", "sigmoid"])
    ap.add_argument("--beta", type=float, default=0.5, help="the loss's beta (the paper's gamma)")
    ap.add_argument("--sample-beta", type=float, default=0.5, help="rejection sampling temperature")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--backend", default=None, help="torch, native or triton (default: from the device)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    toy = toy_problem(seed=args.seed)
    pairs = rso_pairs(toy, beta=args.sample_beta, seed=args.seed, backend=args.backend)
    history = train(toy, pairs, loss=args.loss, beta=args.beta, steps=args.steps, backend=args.backend)
    print(f"{len(pairs)} rejection-sampled pairs from {toy.rewards.shape[0]} prompts; loss {args.loss!r}")
    for i in (0, len(history) // 2, len(history) - 1):
        print(f"step {i:3d}: loss {history[i]['loss']:.4f}  reward accuracy {history[i]['accuracy']:.2f}")
    return history


if __name__ == "__main__":
    main()

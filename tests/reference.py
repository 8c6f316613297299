"""Independent float64 references: materialize the logits, log_softmax, gather.

Deliberately naive: this is what the fused op must equal, written without any of its tricks.
"""

import torch


def transform_logits(raw, *, temperature=1.0, logit_scale=None, softcap=None):
    z = raw * (1.0 if logit_scale is None else logit_scale)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def logits64(hidden, weight, bias=None, **transform):
    raw = hidden.double() @ weight.double().T
    if bias is not None:
        raw = raw + bias.double()
    return transform_logits(raw, **transform)


def reference_logprobs(hidden, weight, labels, bias=None, *, ignore_index=-100, **transform):
    """float64 [...] per-token log p(label); 0 where labels == ignore_index."""
    z = logits64(hidden.reshape(-1, hidden.shape[-1]), weight, bias, **transform)
    y = labels.reshape(-1)
    valid = y != ignore_index
    logp = torch.log_softmax(z, dim=-1).gather(1, torch.where(valid, y, 0)[:, None])[:, 0]
    return torch.where(valid, logp, torch.zeros_like(logp)).view(labels.shape)


def reference_stats(hidden, weight, labels, bias=None, *, ignore_index=-100, **transform):
    """float64 dict of lse, entropy, mean_logit, is_top1, log_sum_p2 (0/False at ignored)."""
    z = logits64(hidden.reshape(-1, hidden.shape[-1]), weight, bias, **transform)
    y = labels.reshape(-1)
    valid = y != ignore_index
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    out = {
        "lse": torch.logsumexp(z, dim=-1),
        "entropy": -(p * logp).sum(-1),
        "mean_logit": z.mean(-1),
        "is_top1": z.argmax(-1) == y,
        "log_sum_p2": torch.log((p * p).sum(-1)),
    }
    return {k: torch.where(valid, v, torch.zeros_like(v)).view(labels.shape) for k, v in out.items()}

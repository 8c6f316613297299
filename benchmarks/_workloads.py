"""The workloads the benchmark scripts share: inputs, the per-token implementations, the DPO loss.

* :func:`make_inputs` — per-token op inputs ``hidden [N, H]``, ``weight [V, H]``, ``labels [N]``
  (a fraction ignored), loss weights ``g [N]`` (``bench_logprobs``);
* :func:`make_dpo_inputs` — one DPO step's inputs, ``B`` pairs x ``T`` tokens with the first third of
  every row prompt, plus the reference's hidden states (``bench_dpo_cpu``, ``bench_long_context``);
* :func:`build_impl` — ``fn(hidden, weight, labels) -> logp`` for ``expo-<backend>``, ``naive``,
  ``naive-masked``, ``trl``, ``cce``, ``cce-filtered``, ``torch-lce``; :func:`trl_chunk_size`;
  :func:`dpo_sigmoid`; :func:`grad_probe`.

torch is imported inside the functions only, so benchmark parents can import this module.
"""

from __future__ import annotations

from typing import NamedTuple

IGNORE_INDEX = -100
PROMPT_FRAC = 1.0 / 3.0  # first third of every DPO row is prompt (-100)
PER_TOKEN_IMPLS = (
    "expo-triton",
    "expo-native",
    "expo-torch",
    "expo-native-recompute",
    "naive",
    "naive-masked",
    "trl",
    "cce",
    "cce-filtered",
    "torch-lce",
)


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _random_rows(gen, n, width, scale, dt, device, block=8192, add=None):
    """``[n, width]`` of ``dt``: ``N(0, 1) * scale`` (``+ add``, row-aligned), drawn in fp32 in row
    blocks from ``gen`` and cast block by block, so no full-size fp32 temporary inflates the peak RSS
    of a bf16 run. The blocks consume ``gen`` exactly as one ``randn(n, width)`` would."""
    import torch

    out = torch.empty(n, width, dtype=dt, device=device)
    for start in range(0, n, block):
        stop = min(start + block, n)
        chunk = torch.randn(stop - start, width, generator=gen, device=device) * scale
        if add is not None:
            chunk = add[start:stop].float() + chunk
        out[start:stop] = chunk.to(dt)
    return out


def make_inputs(n_tokens, hidden_size, vocab, dtype="fp32", device="cpu", ignore_frac=0.33, seed=0, logit_std=2.0):
    """Deterministic inputs: ``hidden [N, H]`` and ``weight [V, H]`` (leaf tensors with
    ``requires_grad``), ``labels [N]`` with ``round(ignore_frac * N)`` positions set to -100, and
    per-token loss weights ``g [N]`` (fp32). Logits have a standard deviation of about ``logit_std``.

    Generated in fp32 in row blocks on ``device`` and cast block by block, so no full-size fp32
    temporary inflates the peak RSS of a bf16 run. Same arguments give the same tensors in every
    process on the same kind of device.
    """
    import torch

    device = torch.device(device)
    dt = torch_dtype(dtype) if isinstance(dtype, str) else dtype
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    hidden = _random_rows(gen, n_tokens, hidden_size, 1.0, dt, device).requires_grad_(True)
    weight = _random_rows(gen, vocab, hidden_size, logit_std / hidden_size**0.5, dt, device).requires_grad_(True)
    labels = torch.randint(0, vocab, (n_tokens,), generator=gen, device=device)
    n_ignored = int(round(ignore_frac * n_tokens))
    if n_ignored:
        ignored = torch.randperm(n_tokens, generator=gen, device=device)[:n_ignored]
        labels[ignored] = IGNORE_INDEX
    g = torch.randn(n_tokens, generator=gen, device=device)
    return hidden, weight, labels, g


class DPOInputs(NamedTuple):
    hidden: object  # [2B, T, H], leaf with requires_grad: the policy's hidden states
    ref_hidden: object  # [2B, T, H], no grad: the reference's
    weight: object  # [V, H], leaf with requires_grad: the LM head (the reference shares it, detached)
    labels: object  # [2B, T] int64, -100 on the prompt


def make_dpo_inputs(
    pairs,
    seq_len,
    hidden_size,
    vocab,
    dtype="fp32",
    device="cpu",
    seed=0,
    logit_std=2.0,
    prompt_frac=PROMPT_FRAC,
    ref_noise=0.3,
):
    """The inputs of one DPO step at the LM head: ``B = pairs`` preference pairs, ``2B`` rows of
    ``T = seq_len`` tokens (chosen rows first, then rejected: TRL's layout), ``N = 2B * T`` tokens.

    ``hidden``, ``weight`` and the labels are :func:`make_inputs` ``(N, H, V, ignore_frac=0)`` (same
    seed, same numbers), reshaped to rows; then the first ``round(prompt_frac * T)`` labels of every
    row are set to -100 (prompt). ``ref_hidden`` is ``hidden + ref_noise * N(0, 1)`` (its own generator,
    ``seed + 777``): a reference model close to the policy. Returns :class:`DPOInputs`
    ``(hidden, ref_hidden, weight, labels)``.
    """
    import torch

    device = torch.device(device)
    dt = torch_dtype(dtype) if isinstance(dtype, str) else dtype
    rows = 2 * pairs
    n = rows * seq_len
    hidden, weight, labels, _ = make_inputs(
        n, hidden_size, vocab, dt, device, ignore_frac=0.0, seed=seed, logit_std=logit_std
    )
    gen = torch.Generator(device=device)
    gen.manual_seed(seed + 777)
    with torch.no_grad():
        ref_hidden = _random_rows(gen, n, hidden_size, ref_noise, dt, device, add=hidden.detach())
    hidden = hidden.detach().view(rows, seq_len, hidden_size).requires_grad_(True)
    labels = labels.view(rows, seq_len)
    labels[:, : int(round(prompt_frac * seq_len))] = IGNORE_INDEX
    return DPOInputs(hidden, ref_hidden.view(rows, seq_len, hidden_size), weight, labels)


def dpo_sigmoid(policy_seq, ref_seq, beta):
    """DPO's sigmoid loss on per-sequence log-prob sums ``[2B]`` (chosen rows first), mean over pairs."""
    import torch.nn.functional as F

    b = policy_seq.shape[0] // 2
    margin = (policy_seq[:b] - ref_seq[:b]) - (policy_seq[b:] - ref_seq[b:])
    return -F.logsigmoid(beta * margin).mean()


def grad_probe(hidden_size, device, seed=0):
    """A fixed random vector ``r [H]``: gradients are compared through ``dW @ r`` and ``dH @ r``."""
    import torch

    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed + 12345)
    return torch.randn(hidden_size, generator=gen).to(device)


def trl_chunk_size() -> int:
    """The vocab chunk TRL's trainers pass to ``ChunkedLogProbFunction`` (``add_fused_lm_head``).

    Read from ``trl/trainer/utils.py``'s source text first: importing that module imports accelerate
    and transformers (~2 s and hundreds of MB in a fresh benchmark process, which would count in a
    row's time and memory baseline), and fails where only TRL's own wheels are installed. Imported only
    when the text does not have the constant (renamed in some release)."""
    import importlib.util
    import re
    from pathlib import Path

    try:
        spec = importlib.util.find_spec("trl")
        src = Path(spec.origin).parent / "trainer" / "utils.py" if spec and spec.origin else None
        text = src.read_text() if src is not None and src.is_file() else ""
    except Exception:  # noqa: BLE001
        text = ""
    match = re.search(r"_CHUNKED_LOGPROB_CHUNK_SIZE\s*=\s*(\d+)", text)
    if match:
        return int(match.group(1))
    try:
        import trl.trainer.utils as tu
    except Exception:  # noqa: BLE001 — e.g. no accelerate: any chunk-size constant in the text, else TRL's 32768
        match = re.search(r"_CHUNK\w*\s*=\s*(\d+)", text)
        return int(match.group(1)) if match else 32768
    size = getattr(tu, "_CHUNKED_LOGPROB_CHUNK_SIZE", None)
    if size is None:  # renamed in some release: find it in the source of add_fused_lm_head
        import inspect

        match = re.search(r"_CHUNK\w*\s*=\s*(\d+)", inspect.getsource(tu))
        size = int(match.group(1)) if match else 32768
    return int(size)


def build_impl(name: str, device, cce_impl: str | None = None):
    """``fn(hidden, weight, labels) -> logp`` (fp32, shaped like labels, 0 at ignored positions).

    ``expo-<backend>``: ``expo_kernels.linear_logprobs`` (it keeps the logits for backward when they
    fit its workspace); ``expo-<backend>-recompute``: the same with ``kernel_options(engine=False)``
    (the backward recomputes them); ``naive``: ``F.linear(h, W).float()`` -> ``log_softmax`` ->
    ``gather`` on every token (what older TRL did); ``naive-masked``: the same on the counted tokens
    only (gathered before the matmul, so its FLOPs are the counted tokens'); ``trl``: TRL's
    ``ChunkedLogProbFunction`` on the counted tokens; ``cce``: Cut Cross-Entropy, ``logp = -nll``
    (``impl=cce_impl``, default ``"cce"`` on CUDA and ``"torch_compile"`` elsewhere), exact
    (``filter_eps=None``: every gradient tile is accumulated, as ours are); ``cce-filtered``: the same
    with the library's default gradient filtering (``impl="cce"`` only: the ``torch_compile`` path has
    none, so this raises there); ``torch-lce``: PyTorch's chunked
    ``torch.nn.functional.linear_cross_entropy(..., reduction="none",
    options=torch.nn.LinearCrossEntropyOptions())`` on the counted tokens (torch >= 2.13; raises
    ``ImportError`` where the installed torch lacks it). All imports happen here, so a worker can
    measure its baseline memory after calling this.
    """
    import torch

    device = torch.device(device)
    if name.startswith("expo-"):
        import expo_kernels

        backend = name[len("expo-") :].removesuffix("-recompute")
        options = dict(engine=not name.endswith("-recompute"))

        def fn(hidden, weight, labels):
            with expo_kernels.kernel_options(**options):  # the backward (outside) follows what forward kept
                return expo_kernels.linear_logprobs(hidden, weight, labels, ignore_index=IGNORE_INDEX, backend=backend)

        return fn

    if name == "naive":

        def fn(hidden, weight, labels):
            logits = torch.nn.functional.linear(hidden, weight).float()  # [N, V]
            logp = logits.log_softmax(-1)
            valid = labels != IGNORE_INDEX
            picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            return torch.where(valid, picked, torch.zeros_like(picked))

        return fn

    if name == "naive-masked":

        def fn(hidden, weight, labels):
            mask = labels != IGNORE_INDEX
            h = hidden[mask]  # the counted tokens first: the matmul does only the FLOPs credited
            logp = torch.nn.functional.linear(h, weight).float().log_softmax(-1)  # [N_valid, V]
            picked = logp.gather(-1, labels[mask].unsqueeze(-1)).squeeze(-1)
            return picked.new_zeros(labels.shape).masked_scatter(mask, picked)

        return fn

    if name == "torch-lce":
        F = torch.nn.functional
        options_cls = getattr(torch.nn, "LinearCrossEntropyOptions", None)
        if not hasattr(F, "linear_cross_entropy") or options_cls is None:
            raise ImportError(
                f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy with "
                "torch.nn.LinearCrossEntropyOptions (PyTorch >= 2.13)"
            )
        options = options_cls()  # the chunked path with its per-(device, dtype) automatic choices

        def fn(hidden, weight, labels):
            mask = labels != IGNORE_INDEX
            nll = F.linear_cross_entropy(
                hidden[mask], weight, labels[mask], reduction="none", ignore_index=IGNORE_INDEX, options=options
            )
            return nll.new_zeros(labels.shape, dtype=torch.float32).masked_scatter(mask, -nll.float())

        return fn

    if name == "trl":
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction

        chunk = trl_chunk_size()

        def fn(hidden, weight, labels):
            mask = labels != IGNORE_INDEX
            out = ChunkedLogProbFunction.apply(
                hidden[mask], weight, None, labels[mask], 1.0, chunk, None, 1.0, ("log_probs",)
            )
            logp = out[0]
            return logp.new_zeros(labels.shape, dtype=torch.float32).masked_scatter(mask, logp.float())

        return fn

    if name in ("cce", "cce-filtered"):
        from cut_cross_entropy import linear_cross_entropy

        impl = cce_impl or ("cce" if device.type == "cuda" else "torch_compile")
        if name == "cce-filtered" and impl != "cce":
            raise ValueError(f"cce-filtered: gradient filtering exists only in impl='cce' (CUDA), not impl={impl!r}")
        # exact: filter_eps=None (the library's default filters gradient tiles below ~2^-12; a keyword the
        # torch_compile path does not take, so it is passed to impl="cce" only)
        kw = {"filter_eps": None} if name == "cce" and impl == "cce" else {}

        def fn(hidden, weight, labels):
            nll = linear_cross_entropy(
                hidden, weight, labels, ignore_index=IGNORE_INDEX, reduction="none", impl=impl, **kw
            )
            return -nll.float()

        return fn

    raise ValueError(f"unknown implementation {name!r}; choose from {PER_TOKEN_IMPLS}")

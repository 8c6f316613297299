"""Launch choices of the fused kernels (``logprobs.py``, ``token_kl.py``): the tile configs and their
per-architecture choices (``select_config``, shared with the ahead-of-time compile gate,
``benchmarks/gpu/aot_check.py``), the dtype flags and gradient-filter arguments a launch passes, and the
split of the vocabulary among a forward's programs.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from ..common import interpreting
from ..options import get_kernel_options

__all__ = [
    "TileConfig",
    "GPU_CONFIG",
    "IEEE_FP32_CONFIG",
    "SMALL_CONFIG",
    "KERNELS",
    "default_config",
    "select_config",
    "launch_config",
    "kernel_flags",
    "filter_args",
    "split_vocab",
]


class TileConfig(NamedTuple):
    """Block sizes: powers of two >= 16 (``tl.dot``'s minimum on GPUs); launch options."""

    block_n: int
    block_v: int
    block_h: int
    num_warps: int = 4
    # Software-pipelining depth of the H loops: each stage keeps one [BLOCK_N, BLOCK_H] and one
    # [BLOCK_H, BLOCK_V] operand tile in shared memory (Triton's default is 3).
    num_stages: int = 3
    # Register cap per thread handed to ptxas (None: its own heuristic, which may settle on 128 and
    # spill a kernel that fits in 255).
    maxnreg: int | None = None


# 64 x 128 float32 accumulator = 32 KiB of registers across 8 warps, the usual sweet spot for
# a GEMM-like tile that also carries per-row online-softmax state.
GPU_CONFIG = TileConfig(block_n=64, block_v=128, block_h=64, num_warps=8)
# float32 without TF32 (see select_config).
IEEE_FP32_CONFIG = TileConfig(block_n=32, block_v=64, block_h=16, num_warps=4, maxnreg=255)
# Small but still compilable on a GPU, so interpreter tests exercise a real configuration.
SMALL_CONFIG = TileConfig(block_n=16, block_v=32, block_h=16, num_warps=4)


def default_config(device: torch.device) -> TileConfig:
    return SMALL_CONFIG if interpreting() or device.type != "cuda" else GPU_CONFIG


KERNELS = ("forward", "backward", "token_kl_forward", "token_kl_backward")


def select_config(
    kernel: str,
    dtype: torch.dtype,
    arch: int | None,
    *,
    ieee_fp32: bool = False,
    need_hidden: bool = True,
    need_weight: bool = True,
    need_bias: bool = False,
    topk: int = 0,
) -> TileConfig:
    """The tile config the launcher of ``kernel`` (one of ``KERNELS``) uses: the single source of
    truth, shared with the ahead-of-time compile gate (``benchmarks/gpu/aot_check.py``).

    ``arch`` is the compute capability as ``10 * major + minor`` (80, 90, 100), ``None`` under the
    interpreter or off CUDA; ``ieee_fp32`` is float32 input without TF32.
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown Triton kernel {kernel!r}; expected one of {KERNELS}")
    if arch is None:
        return SMALL_CONFIG
    if kernel == "forward" and topk > 0 and dtype != torch.float32 and arch < 100:
        # 16-bit on sm_80/sm_90: the running top-k next to a 64 x 128 logit tile, bias or softcap and
        # statistics spills (sm_90 under Triton 3.6, sm_80 under 3.9: 6-13 spill instructions); 64-wide
        # vocabulary tiles fit and keep the 64-row tiles sm_90's wgmma needs.
        return GPU_CONFIG._replace(block_v=64)
    if kernel == "forward" and topk > 0 and (dtype == torch.float32 or arch >= 100):
        # The running top-k ([BLOCK_N, KP] values and int64 ids, twice while a tile merges) next to the
        # logit tile and the statistics spills at k = 32 with float32 tiles (sm_90) and with 16-bit
        # tiles on sm_100 (526 spill instructions); half the rows fit (benchmarks/gpu/aot_check.py).
        if ieee_fp32:
            base = IEEE_FP32_CONFIG
        elif dtype == torch.float32:
            base = GPU_CONFIG._replace(block_h=32)
        else:
            base = GPU_CONFIG
        return base._replace(block_n=base.block_n // 2)
    if ieee_fp32:
        # IEEE float32 dots run on CUDA cores (FMA): both operand tiles live in registers next to
        # the accumulator, so 64 x 128 x 64 spills (255 registers). 32 x 64 tiles with 16-wide H
        # slices at 4 warps fit every kernel on sm_80/90/100 (~130-250 registers). maxnreg=255:
        # left to its heuristic, ptxas caps some variants at 128 registers and spills; 32-wide
        # slices still spill in the forward on sm_80/sm_100 with either setting.
        return IEEE_FP32_CONFIG
    if kernel.endswith("backward"):
        tf32 = dtype == torch.float32
        if arch < 90 or (tf32 and arch < 100 and need_hidden and need_weight):
            # sm_80 (mma.sync, accumulators in registers): the 64 x 128 logit tile plus a 64 x 64
            # gradient slice spill; 32-wide slices do not. sm_90 TF32 with both gradients: 3 stages
            # of 4-byte [64 x 64] + [64 x 128] operands for the logits and both gradient GEMMs take
            # 241 KiB > 227 KiB; 32-wide slices take 153 KiB. On sm_80 Triton 3.6's ptxas caps some
            # variants at 128 registers and spills 2-6 instructions: they fit under 255.
            if kernel == "token_kl_backward" and tf32 and arch < 90:
                # two heads' 4-byte tiles with softcap and bias: 32-wide slices still spill at 255
                return GPU_CONFIG._replace(block_h=16, maxnreg=255)
            return GPU_CONFIG._replace(block_h=32, maxnreg=255 if arch < 90 else None)
        if arch >= 100:
            # sm_100 (tcgen05, accumulators in tensor memory): ptxas's heuristic caps some variants (bias
            # gradient with the filter) at 128 registers and spills; they fit under 255.
            return GPU_CONFIG._replace(maxnreg=255)
    elif dtype == torch.float32 and arch < 90:
        # sm_80 TF32 forward with statistics: the 4-byte operand slices of a 64-wide H step next to the
        # logit tile and seven per-row running sums reach 255 registers and spill; 32-wide slices fit.
        return GPU_CONFIG._replace(block_h=32)
    elif kernel == "token_kl_forward" and arch >= 100:
        # sm_100, two heads' logit tiles: Triton 3.6's ptxas caps some variants (16-bit with a softcap)
        # at 128 registers and spills; they fit under 255. Float32 (TF32) 4-byte operand slices of a
        # 64-wide H step also spill under Triton 3.9; 32-wide slices fit.
        block_h = 32 if dtype == torch.float32 else GPU_CONFIG.block_h
        return GPU_CONFIG._replace(block_h=block_h, maxnreg=255)
    return GPU_CONFIG


def _device_arch(device: torch.device) -> int | None:
    if interpreting() or device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def launch_config(kernel: str, hidden: torch.Tensor, **options: Any) -> TileConfig:
    ieee = bool(kernel_flags(hidden)["IEEE_FP32"])
    return select_config(kernel, hidden.dtype, _device_arch(hidden.device), ieee_fp32=ieee, **options)


def kernel_flags(hidden: torch.Tensor) -> dict:
    fp64 = hidden.dtype == torch.float64
    low_precision = hidden.dtype in (torch.bfloat16, torch.float16)
    return dict(
        UPCAST=interpreting() and low_precision,
        # float32 inputs: exact fp32 products unless the user opted into TF32 for matmuls.
        IEEE_FP32=hidden.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32,
        ACC=tl.float64 if fp64 else tl.float32,
    )


def filter_args() -> dict:
    eps = get_kernel_options().grad_filter_eps
    return dict(filter_eps=float(eps or 0.0), FILTER=eps is not None)


def _choose_splits(n_token_blocks: int, vocab_tiles: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    # Aim for a few waves of programs; each extra split only costs O(N) partials.
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(vocab_tiles, triton.cdiv(target, n_token_blocks)))


def split_vocab(
    n_tokens: int, vocab: int, cfg: TileConfig, device: torch.device, vocab_splits: int | None
) -> tuple[int, int, int]:
    """(token blocks, vocab splits, vocab columns per split), with no empty split."""
    n_blocks = triton.cdiv(n_tokens, cfg.block_n)
    vocab_tiles = triton.cdiv(vocab, cfg.block_v)
    splits = min(vocab_splits or _choose_splits(n_blocks, vocab_tiles, device), vocab_tiles)
    per_split = triton.cdiv(vocab_tiles, splits) * cfg.block_v
    return n_blocks, triton.cdiv(vocab, per_split), per_split

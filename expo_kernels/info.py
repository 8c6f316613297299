"""``python -m expo_kernels.info``: versions, and which backends run on cpu / cuda here (and why not).

Builds the native CPU backend if it is not built yet (first run: about half a minute), so the
answer is the one the next training run will get. ``--json`` prints the same as JSON.

``--explain`` prints the plan (``expo_kernels._dispatch.plan``: backend, execution path, reason) of a
call shape instead, for ``linear_logprobs`` and for the DPO module's step, e.g.
``python -m expo_kernels.info --explain --device cuda --dtype bfloat16 --tokens 8192 --vocab 128256
--hidden 4096 --grad``. No GPU is needed to explain a CUDA call.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from importlib import metadata
from typing import Any


def _version(dist: str):
    try:
        return metadata.version(dist)
    except Exception:  # noqa: BLE001
        return None


def collect() -> dict:
    import torch

    import expo_kernels as ek
    from expo_kernels import _dispatch as ag
    from expo_kernels.ops import _native_build

    info: dict[str, Any] = {
        "versions": {
            "expo_kernels": ek.__version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": _version("triton"),
            "transformers": _version("transformers"),
        },
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "env": {
            k: os.environ.get(k)
            for k in (ag.BACKEND_ENV, _native_build.NATIVE_ENV, _native_build.BUILD_DIR_ENV, "TRITON_INTERPRET")
            if os.environ.get(k) is not None
        },
        "devices": {},
    }
    native = _native_build.status()
    triton_ok = ag.triton_importable()
    triton_why = None
    if not triton_ok:
        try:
            import triton  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            triton_why = f"triton not importable: {type(exc).__name__}: {exc}"
    for dev in ("cpu", "cuda"):
        entry: dict[str, Any] = {"available": [], "missing": {}}
        if dev == "cuda" and not torch.cuda.is_available():
            entry["missing"] = {name: "no CUDA device (torch.cuda.is_available() is False)" for name in ag.BACKENDS}
            info["devices"][dev] = entry
            continue
        entry["available"] = ag.available_backends(dev)
        entry["default"] = ag.resolve_backend(None, torch.device(dev))
        for name in ag.BACKENDS:
            if name in entry["available"]:
                continue
            if name == "native":
                entry["missing"][name] = (
                    "runs on CPU tensors only" if dev != "cpu" else f"not built/loaded: {native['reason']}"
                )
            elif name == "triton":
                entry["missing"][name] = triton_why or (
                    "on CPU only under TRITON_INTERPRET=1 (set before importing expo_kernels; for testing)"
                )
            else:
                entry["missing"][name] = "?"
        info["devices"][dev] = entry
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    info["native"] = {
        "available": native["available"],
        "build_dir": native["build_dir"],
        "source": str(_native_build.source_path()),
        "isa_flags": _native_build.isa_flags(),
        # seconds this process spent compiling (0.0: loaded from the build dir; None: not attempted)
        "build_s": None if native["build_s"] is None else round(native["build_s"], 2),
    }
    if not native["available"]:
        info["native"]["error"] = native["reason"]
    return info


def explain(args) -> dict:
    """The plans of ``linear_logprobs`` and of the DPO module's step for the shape in ``args``."""
    import torch

    from expo_kernels import _dispatch as dispatch
    from expo_kernels.ops.options import kernel_options

    dtype = getattr(torch, args.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise SystemExit(f"--dtype must name a torch dtype (float32, bfloat16, float16, float64); got {args.dtype!r}")
    device = torch.device(args.device)
    changes: dict = {}
    if args.path is not None:
        changes["path"] = args.path
    if args.workspace_bytes is not None:
        changes["workspace_bytes"] = args.workspace_bytes
    if args.no_engine:
        changes["engine"] = False
    shape = dict(tokens=args.tokens, vocab=args.vocab, needs_grad=args.grad)
    out: dict = {
        "call": {
            "device": str(device),
            "dtype": args.dtype,
            "tokens": args.tokens,
            "vocab": args.vocab,
            "hidden": args.hidden,
            "grad": args.grad,
            "frozen_head": args.frozen_head,
            "topk": args.topk,
            "backend": args.backend,
            **changes,
        }
    }
    with kernel_options(**changes):
        for key, fn in (
            ("linear_logprobs", lambda: dispatch.plan(device, dtype, topk=args.topk, backend=args.backend, **shape)),
            (
                "FusedLinearDPOLoss",
                lambda: dispatch.plan_pair_step(
                    device, dtype, backend=args.backend, max_pair_tokens=args.pair_tokens, **shape
                ),
            ),
        ):
            try:
                p = fn()
                out[key] = {"backend": p.backend, "path": p.path.value, "reason": p.reason}
            except ValueError as exc:
                out[key] = {"error": str(exc)}
    n, h, v = args.tokens, args.hidden, args.vocab
    gemm = 2 * n * h * v
    # the op's backward: dH (and dW unless the head is frozen), plus the recompute of the logits
    grads = (1 if args.frozen_head else 2) * gemm
    out["gflop"] = {
        "forward": gemm / 1e9,
        "backward_recompute": (gemm + grads) / 1e9 if args.grad else 0.0,
        "backward_kept_logits": grads / 1e9 if args.grad else 0.0,
    }
    return out


def _explain_parser(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("--explain: the plan of a call shape")
    g.add_argument("--explain", action="store_true", help="print the plan (backend, path, reason) of a call shape")
    g.add_argument("--device", default="cpu", help="cpu or cuda (no GPU needed to explain cuda)")
    g.add_argument("--dtype", default="float32", help="the head's dtype: float32, bfloat16, float16, float64")
    g.add_argument("--tokens", type=int, default=4096, help="rows of the call (B*T, ignored ones included)")
    g.add_argument("--vocab", type=int, default=32000)
    g.add_argument("--hidden", type=int, default=1024)
    g.add_argument("--grad", action="store_true", help="a backward follows")
    g.add_argument("--frozen-head", action="store_true", help="no gradient to the head (FLOP count only)")
    g.add_argument("--topk", type=int, default=0, help="linear_logprobs(topk=K)")
    g.add_argument("--backend", default=None, help="backend=... (default: the device's)")
    g.add_argument("--path", default=None, help="kernel_options(path=...)")
    g.add_argument("--workspace-bytes", type=int, default=None, help="kernel_options(workspace_bytes=...)")
    g.add_argument("--no-engine", action="store_true", help="kernel_options(engine=False)")
    g.add_argument("--pair-tokens", type=int, default=None, help="counted tokens of the longest pair (DPO)")


def _print_explain(out: dict) -> None:
    call = out["call"]
    print("call: " + ", ".join(f"{k}={v}" for k, v in call.items() if v is not None))
    for key in ("linear_logprobs", "FusedLinearDPOLoss"):
        e = out[key]
        if "error" in e:
            print(f"{key}: error: {e['error']}")
        else:
            print(f"{key}: backend={e['backend']} path={e['path']}\n  why: {e['reason']}")
    print("GFLOP: " + ", ".join(f"{k} {v:.1f}" for k, v in out["gflop"].items()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m expo_kernels.info", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print JSON")
    _explain_parser(p)
    args = p.parse_args(argv)
    if args.explain:
        out = explain(args)
        if args.json:
            print(json.dumps(out, indent=2))
        else:
            _print_explain(out)
        return 0
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print("expo_kernels " + str(info["versions"]["expo_kernels"]))
    print("versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items() if k != "expo_kernels"))
    print(f"platform: {info['platform']}, torch CPU threads: {info['cpu_threads']}")
    if info["env"]:
        print("environment: " + ", ".join(f"{k}={v}" for k, v in info["env"].items()))
    for dev, entry in info["devices"].items():
        avail = ", ".join(entry["available"]) or "none"
        default = f" (default: {entry['default']})" if entry.get("default") else ""
        print(f"{dev}: {avail}{default}")
        for name, why in entry["missing"].items():
            first = str(why).strip().splitlines()
            print(f"  {name}: missing: {first[0] if first else why}")
    nat = info["native"]
    state = "built and loaded" if nat["available"] else "NOT available"
    print(
        f"native CPU backend: {state}; source {nat['source']}; build dir {nat['build_dir']}; "
        f"ISA flags {' '.join(nat['isa_flags']) or '(generic)'}; compile time in this process {nat['build_s']} s"
    )
    if not nat["available"] and nat.get("error"):
        print("native build/load error:\n" + str(nat["error"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

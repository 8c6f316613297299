"""``python -m expo_kernels.info``: versions, and which backends run on cpu / cuda here (and why not).

Builds the native CPU backend if it is not built yet (first run: about half a minute), so the
answer is the one the next training run will get. ``--json`` prints the same as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from importlib import metadata


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

    info = {
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
        entry = {"available": [], "missing": {}}
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m expo_kernels.info", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print JSON")
    args = p.parse_args(argv)
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

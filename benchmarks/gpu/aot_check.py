"""Ahead-of-time compile gate for every Triton kernel, runnable on a CPU-only machine.

Each registered kernel is compiled with ``triton.compile(ASTSource(...), target=GPUTarget(...))``
for sm_80, sm_90 and sm_100, for every supported dtype (bf16, fp16, fp32 with TF32, fp32 IEEE; fp64
never reaches Triton, see ``expo_kernels._dispatch``) and for every combination of the constexpr
flags its launcher can produce, with the tile config the launcher would pick on that GPU
(``ops/triton/configs.select_config``: the single source of truth). The cubin is then inspected with
``cuobjdump -res-usage`` / ``-sass`` (shipped in the Triton wheel) and a variant fails on:

* a compile error;
* register spills: local-memory instructions (``STL``/``LDL``) or a stack frame;
* shared memory above what one block may opt into on the target (sm_80 163 KiB, sm_90/100 227 KiB):
  such a kernel compiles but cannot launch;
* bf16/fp16 ``tl.dot`` on sm_90 that does not use wgmma (no ``HGMMA``): a 2-3x slower mma path;
* fenced atomics (``MEMBAR.ALL.GPU`` / ``CCTL.IVALL`` next to ``RED``/``ATOM``): Triton's default
  acq_rel atomics, a full memory barrier per add where the adds commute (use ``sem="relaxed"``).

A variant that cannot be made to pass is listed in ``KNOWN_FAILURES`` with its reason; it is still
compiled and printed (``KNOWN``), never silently skipped.

Run::

    python benchmarks/gpu/aot_check.py            # full grid (every flag combination)
    python benchmarks/gpu/aot_check.py --quick    # sm_90, one variant per kernel and dtype + worst case
    python benchmarks/gpu/aot_check.py --json out.json --jobs 2

Exit status 0 when every variant passes (or is a known failure), 1 otherwise.

Adding a kernel: one ``KernelEntry`` in ``_backend_entries`` (or in an ``aot_entries()`` function of
another module listed in ``ENTRY_MODULES``: ``expo_kernels.ops.triton.epilogues`` is picked up when it
defines one).
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

# The gate compiles real kernels: the CPU interpreter (tests set TRITON_INTERPRET=1) replaces
# triton.jit's JITFunction with an interpreted one that cannot be compiled.
os.environ.pop("TRITON_INTERPRET", None)
# Triton 3.9 warns that its FP-fusion default will change; the launchers run with the current
# default (fusion on, as in Triton 3.6), so check that.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

# Per-block shared memory a kernel may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SMEM_LIMIT = {80: 166912, 90: 232448, 100: 232448}
ARCHS = (80, 90, 100)
DTYPES = ("bf16", "fp16", "fp32_tf32", "fp32_ieee")
TORCH_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32_tf32": torch.float32, "fp32_ieee": torch.float32}
TRITON_TYPE = {"bf16": "bf16", "fp16": "fp16", "fp32_tf32": "fp32", "fp32_ieee": "fp32"}
ENTRY_MODULES = ("expo_kernels.ops.triton.epilogues",)

# Variants allowed to fail: (kernel, dtype, arch, variant name as printed, or "*" for every
# variant) -> the reason, printed next to it in the table with status KNOWN. Such a variant is still
# compiled and inspected every run. Empty: every variant currently passes.
KNOWN_FAILURES: dict[tuple[str, str, int, str], str] = {}


@dataclass(frozen=True)
class KernelEntry:
    """One Triton kernel as its launcher runs it.

    ``args`` maps every non-constexpr parameter to its type: a Triton signature type, ``"*T"`` for a
    pointer to the input dtype, ``"one"`` for a stride that is 1 for contiguous inputs (the JIT
    specializes it to the constant 1), and a trailing ``":16"`` for a value the JIT sees divisible
    by 16 (aligned pointers, hidden sizes and row strides of LM heads). ``flag_space`` yields every
    constexpr flag set the launcher can pass; ``config(dtype, arch, flags)`` the ``TileConfig`` it
    would pick; ``block_constexprs`` the constexprs fed from it.
    """

    name: str
    fn: object  # triton JITFunction
    args: dict[str, str]
    flag_space: Callable[[], Iterator[dict[str, bool]]]
    config: Callable[[str, int, dict[str, bool]], object]
    worst_case: dict[str, bool]
    uses_dot: bool = True
    fixed: dict[str, object] = field(default_factory=dict)  # constexprs that do not vary
    block_constexprs: Callable[[object], dict[str, object]] = lambda cfg: dict(
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h
    )
    dtype_constexprs: Callable[[str], dict[str, object]] = lambda dtype: {}


def _bools(*names: str) -> Iterator[dict[str, bool]]:
    for values in itertools.product((False, True), repeat=len(names)):
        yield dict(zip(names, values, strict=True))


def _grad_sets(has_bias: bool) -> Iterator[dict[str, bool]]:
    """(NEED_DH, NEED_DW, NEED_DB) the backward launchers run: at least one gradient, and a bias
    gradient only for a head that has a bias."""
    for dh, dw, db in itertools.product((False, True), repeat=3):
        if (dh or dw or db) and (has_bias or not db):
            yield dict(NEED_DH=dh, NEED_DW=dw, NEED_DB=db)


def _backend_entries() -> list[KernelEntry]:
    from expo_kernels.ops.triton import configs, logprobs, token_kl

    def cfg_of(kernel: str, topk: int = 0) -> Callable[[str, int, dict[str, bool]], object]:
        def pick(dtype: str, arch: int, flags: dict[str, bool]) -> object:
            return configs.select_config(
                kernel,
                TORCH_DTYPE[dtype],
                arch,
                ieee_fp32=dtype == "fp32_ieee",
                need_hidden=flags.get("NEED_DH", False),
                need_weight=flags.get("NEED_DW", False),
                need_bias=flags.get("NEED_DB", False),
                topk=topk,
            )

        return pick

    def flags_ieee(dtype: str) -> dict[str, object]:
        # GPU launches never upcast (that is for the interpreter); accumulation is float32.
        return dict(UPCAST=False, IEEE_FP32=dtype == "fp32_ieee", ACC=tl.float32)

    def forward_flags() -> Iterator[dict[str, bool]]:
        yield from _bools("HAS_BIAS", "HAS_SOFTCAP", "WITH_STATS")

    def backward_flags() -> Iterator[dict[str, bool]]:
        for base in _bools("HAS_BIAS", "HAS_SOFTCAP", "FILTER"):
            for grads in _grad_sets(base["HAS_BIAS"]):
                yield {**base, **grads}

    def kl_forward_flags() -> Iterator[dict[str, bool]]:
        yield from _bools("HAS_BIAS", "HAS_REF_BIAS", "HAS_SOFTCAP")

    def kl_backward_flags() -> Iterator[dict[str, bool]]:
        for base in _bools("HAS_BIAS", "HAS_REF_BIAS", "HAS_SOFTCAP", "FILTER"):
            for grads in _grad_sets(base["HAS_BIAS"]):
                yield {**base, **grads}

    head = {"h_ptr": "*T:16", "w_ptr": "*T:16", "b_ptr": "*T:16"}
    strides = {"stride_hn": "i32:16", "stride_hh": "one", "stride_wv": "i32:16", "stride_wh": "one"}
    transform = {"logit_scale": "fp32", "softcap": "fp32", "inv_temp": "fp32"}
    grads = {"dh_ptr": "*fp32:16", "dw_ptr": "*fp32:16", "db_ptr": "*fp32:16"}
    ref = {"hr_ptr": "*T:16", "wr_ptr": "*T:16", "br_ptr": "*T:16"}
    ref_strides = {"stride_hrn": "i32:16", "stride_hrh": "one", "stride_wrv": "i32:16", "stride_wrh": "one"}
    everything = lambda space: max(space(), key=lambda f: sum(f.values()))  # noqa: E731
    forward_args = {
        **head,
        "y_ptr": "*i64:16",
        "part_ptr": "*fp32:16",
        "top_v_ptr": "*fp32:16",
        "top_i_ptr": "*i64:16",
        "N": "i32",
        "V": "i32",
        "H": "i32:16",
        **strides,
        "vocab_per_split": "i32:16",
        "n_splits": "i32",
        "vocab_start": "i32",
        **transform,
    }
    return [
        KernelEntry(
            name="forward",
            fn=logprobs._forward_kernel,
            args=forward_args,
            flag_space=forward_flags,
            config=cfg_of("forward"),
            worst_case=everything(forward_flags),
            fixed={"TOPK": 0, "KP": 1},
            dtype_constexprs=flags_ieee,
        ),
        # linear_logprobs(..., topk=k): the same kernel with its running top-k; the largest k (32)
        # holds the most registers
        KernelEntry(
            name="forward_topk",
            fn=logprobs._forward_kernel,
            args=forward_args,
            flag_space=forward_flags,
            config=cfg_of("forward", topk=32),
            worst_case=everything(forward_flags),
            fixed={"TOPK": 32, "KP": 32},
            dtype_constexprs=flags_ieee,
        ),
        KernelEntry(
            name="backward",
            fn=logprobs._backward_kernel,
            args={
                **head,
                "y_ptr": "*i64:16",
                "lse_ptr": "*fp32:16",
                "g_ptr": "*fp32:16",
                **grads,
                "N": "i32",
                "V": "i32",
                "H": "i32:16",
                **strides,
                "vocab_start": "i32",
                **transform,
                "filter_eps": "fp32",
            },
            flag_space=backward_flags,
            config=cfg_of("backward"),
            worst_case=everything(backward_flags),
            dtype_constexprs=flags_ieee,
        ),
        KernelEntry(
            name="token_kl_forward",
            fn=token_kl._token_kl_forward_kernel,
            args={
                **head,
                **ref,
                "part_ptr": "*fp32:16",
                "N": "i32",
                "V": "i32",
                "H": "i32:16",
                "HR": "i32:16",
                **strides,
                **ref_strides,
                "vocab_per_split": "i32:16",
                "n_splits": "i32",
                **transform,
            },
            flag_space=kl_forward_flags,
            config=cfg_of("token_kl_forward"),
            worst_case=everything(kl_forward_flags),
            dtype_constexprs=flags_ieee,
        ),
        KernelEntry(
            name="token_kl_backward",
            fn=token_kl._token_kl_backward_kernel,
            args={
                **head,
                **ref,
                "lse_p_ptr": "*fp32:16",
                "lse_r_ptr": "*fp32:16",
                "g_ptr": "*fp32:16",
                **grads,
                "N": "i32",
                "V": "i32",
                "H": "i32:16",
                "HR": "i32:16",
                **strides,
                **ref_strides,
                **transform,
                "filter_eps": "fp32",
            },
            flag_space=kl_backward_flags,
            config=cfg_of("token_kl_backward"),
            worst_case=everything(kl_backward_flags),
            dtype_constexprs=flags_ieee,
        ),
    ]


def registry() -> list[KernelEntry]:
    """Every kernel to check: the backend's, plus ``aot_entries()`` of each importable module in
    ``ENTRY_MODULES`` (a module that does not exist yet, or defines no entries, adds nothing)."""
    entries = _backend_entries()
    for module_name in ENTRY_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:
            continue
        contribute = getattr(module, "aot_entries", None)
        if contribute is not None:
            entries.extend(contribute(KernelEntry))
    return entries


# ------------------------------------------------------------------------------------------------
# One variant: compile and inspect
# ------------------------------------------------------------------------------------------------


@dataclass
class Result:
    kernel: str
    variant: str
    dtype: str
    arch: int
    config: str
    status: str = "PASS"  # PASS | FAIL | KNOWN
    problems: list[str] = field(default_factory=list)
    reason: str = ""  # for KNOWN
    registers: int = 0
    spill_ops: int = 0  # STL + LDL instructions
    stack: int = 0
    shared: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def variant_name(flags: dict[str, bool]) -> str:
    on = [k for k, v in flags.items() if v]
    return "+".join(on) if on else "plain"


def _signature(entry: KernelEntry, dtype: str) -> tuple[dict, dict, dict]:
    """Triton signature, constants for the stride-1 arguments, and divisibility attributes."""
    arg_names = list(entry.fn.arg_names)
    signature: dict[str, str] = {}
    constants: dict[str, object] = {}
    attrs: dict[tuple[int, ...], list] = {}
    for name, kind in entry.args.items():
        base, _, divisible = kind.partition(":")
        if base == "one":
            signature[name] = "constexpr"
            constants[name] = 1
            continue
        signature[name] = base.replace("T", TRITON_TYPE[dtype]) if base.startswith("*") else base
        if divisible:
            attrs[(arg_names.index(name),)] = [["tt.divisibility", int(divisible)]]
    return signature, constants, attrs


def _tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


SASS_OPS = ("HGMMA", "HMMA", "UTCHMMA", "UTCQMMA", "RED", "ATOM", "MEMBAR.ALL.GPU", "CCTL.IVALL", "STL", "LDL")


def _inspect(cubin: bytes, result: Result) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", str(path)], capture_output=True, text=True, check=True)
        sass = subprocess.run([_tool("cuobjdump"), "-sass", str(path)], capture_output=True, text=True, check=True)
    usage = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", res.stdout)
    if usage is None:
        raise RuntimeError(f"cannot parse cuobjdump -res-usage output:\n{res.stdout}")
    result.registers, result.stack = int(usage[1]), int(usage[2])
    result.shared += int(usage[3])  # static shared memory (Triton's is dynamic, added by the caller)
    opcodes = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass.stdout)
    counts = dict.fromkeys(SASS_OPS, 0)
    for op in opcodes:
        # RED/REDG: reduction to global memory (no result), ATOM/ATOMG: atomic with result;
        # REDUX is a warp reduction, not an atomic.
        head = {"REDG": "RED", "ATOMG": "ATOM"}.get(op.split(".")[0], op.split(".")[0])
        if head in counts:
            counts[head] += 1
        if op.startswith("MEMBAR.ALL.GPU") or op.startswith("MEMBAR.SC.GPU"):
            counts["MEMBAR.ALL.GPU"] += 1
        if op.startswith("CCTL.IVALL"):
            counts["CCTL.IVALL"] += 1
    result.counts = {k: v for k, v in counts.items() if v}
    result.spill_ops = counts["STL"] + counts["LDL"]


def check_variant(job: tuple[str, str, int, dict[str, bool]]) -> Result:
    kernel, dtype, arch, flags = job
    entry = next(e for e in registry() if e.name == kernel)
    cfg = entry.config(dtype, arch, flags)
    result = Result(kernel, variant_name(flags), dtype, arch, _describe(cfg))
    start = time.perf_counter()
    try:
        signature, constants, attrs = _signature(entry, dtype)
        constexprs = {
            **constants,
            **entry.fixed,
            **entry.dtype_constexprs(dtype),
            **flags,
            **entry.block_constexprs(cfg),
        }
        for name in constexprs:
            signature[name] = "constexpr"
        src = triton.compiler.ASTSource(fn=entry.fn, signature=signature, constexprs=constexprs, attrs=attrs)
        target = triton.backends.compiler.GPUTarget("cuda", arch, 32)
        options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        if cfg.maxnreg is not None:
            options["maxnreg"] = cfg.maxnreg
        compiled = triton.compile(src, target=target, options=options)
        result.shared = int(compiled.metadata.shared)
        _inspect(compiled.asm["cubin"], result)
    except Exception as exc:  # a compile error is a result, not a crash of the gate
        first = str(exc).strip().splitlines()
        result.problems.append(f"compile error: {type(exc).__name__}: {first[-1] if first else ''}"[:300])
    result.seconds = time.perf_counter() - start
    if not result.problems:
        result.problems.extend(_judge(entry, dtype, arch, result))
    if result.problems:
        reason = KNOWN_FAILURES.get((kernel, dtype, arch, result.variant)) or KNOWN_FAILURES.get(
            (kernel, dtype, arch, "*")
        )
        result.status, result.reason = ("KNOWN", reason) if reason else ("FAIL", "")
    return result


def _judge(entry: KernelEntry, dtype: str, arch: int, r: Result) -> list[str]:
    problems = []
    if r.spill_ops or r.stack:
        problems.append(f"register spills: {r.spill_ops} STL/LDL, {r.stack} B stack")
    if r.shared > SMEM_LIMIT[arch]:
        problems.append(f"shared memory {r.shared} B > {SMEM_LIMIT[arch]} B limit of sm_{arch}")
    if entry.uses_dot and arch == 90 and dtype in ("bf16", "fp16") and not r.counts.get("HGMMA"):
        problems.append("no wgmma (HGMMA) for a 16-bit tl.dot on sm_90")
    atomics = r.counts.get("RED", 0) + r.counts.get("ATOM", 0)
    if atomics and (r.counts.get("MEMBAR.ALL.GPU") or r.counts.get("CCTL.IVALL")):
        problems.append("fenced atomics (MEMBAR.ALL.GPU/CCTL.IVALL): use sem='relaxed'")
    return problems


def _describe(cfg: object) -> str:
    """A TileConfig as ``NxVxH wW sS [rR]``; any other config (a kernel entry may bring its own
    config type) as its fields."""
    get = lambda name: getattr(cfg, name, None)  # noqa: E731
    if all(get(n) is not None for n in ("block_n", "block_v", "block_h")):
        text = f"{get('block_n')}x{get('block_v')}x{get('block_h')} w{get('num_warps')} s{get('num_stages')}"
        return text + (f" r{get('maxnreg')}" if get("maxnreg") else "")
    fields = cfg._asdict() if hasattr(cfg, "_asdict") else vars(cfg) if hasattr(cfg, "__dict__") else {}
    return " ".join(f"{k}={v}" for k, v in fields.items()) or repr(cfg)


# ------------------------------------------------------------------------------------------------
# The grid
# ------------------------------------------------------------------------------------------------


def jobs(
    quick: bool, archs: tuple[int, ...] = ARCHS, dtypes: tuple[str, ...] = DTYPES, kernels: tuple[str, ...] = ()
) -> list[tuple[str, str, int, dict[str, bool]]]:
    """Full grid: every kernel x dtype x arch x launchable flag set. Quick: sm_90 only, per kernel
    and dtype the plain variant and the worst case (every flag on), plus the worst case on sm_80
    and sm_100 for the backward kernels (the ones closest to the limits)."""
    out = []
    for entry in registry():
        if kernels and entry.name not in kernels:
            continue
        for dtype in dtypes:
            if quick:
                plain = next(iter(entry.flag_space()))
                out.append((entry.name, dtype, 90, plain))
                out.append((entry.name, dtype, 90, entry.worst_case))
                if entry.name == "backward":
                    out += [(entry.name, dtype, arch, entry.worst_case) for arch in ARCHS if arch != 90]
            else:
                out += [(entry.name, dtype, arch, f) for arch in ARCHS for f in entry.flag_space()]
    return [job for job in out if job[2] in archs]


def tools_available() -> str | None:
    """None when the NVIDIA backend and its binaries are present, else why not."""
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the wheel
        return f"triton's nvidia backend is unavailable: {exc}"
    for tool in ("cuobjdump", "ptxas"):
        path = _tool(tool)
        if not (os.path.isfile(path) and os.access(path, os.X_OK)) and shutil.which(tool) is None:
            return f"{tool} not found in the triton wheel ({path})"
    return None


def run(quick: bool = False, n_jobs: int | None = None, progress: bool = False, **select: tuple) -> list[Result]:
    todo = jobs(quick, **select)
    n_jobs = n_jobs or os.cpu_count() or 1
    results = []
    with ProcessPoolExecutor(n_jobs) as pool:
        for i, r in enumerate(pool.map(check_variant, todo, chunksize=1), 1):
            results.append(r)
            if progress:
                print(f"[{i}/{len(todo)}] {r.status} {r.kernel} {r.dtype} sm_{r.arch} {r.variant}", file=sys.stderr)
    return results


def print_table(results: list[Result], elapsed: float) -> None:
    print(f"triton {triton.__version__}, torch {torch.__version__}: {len(results)} variants in {elapsed:.0f} s")
    header = f"{'kernel':<18} {'dtype':<9} {'arch':<6} {'variant':<44} {'config':<20} {'regs':>4} {'spill':>5}"
    print(header + f" {'smem':>7}  {'status':<5} instructions / problems")
    for r in sorted(results, key=lambda r: (r.kernel, r.dtype, r.arch, r.variant)):
        ops = " ".join(f"{k}={v}" for k, v in r.counts.items() if k not in ("STL", "LDL"))
        note = "; ".join(r.problems) + (f" [known: {r.reason}]" if r.reason else "")
        print(
            f"{r.kernel:<18} {r.dtype:<9} sm_{r.arch:<3} {r.variant:<44} {r.config:<20} {r.registers:>4}"
            f" {r.spill_ops + r.stack:>5} {r.shared:>7}  {r.status:<5} {ops}{' | ' + note if note else ''}"
        )
    tally = {s: sum(r.status == s for r in results) for s in ("PASS", "FAIL", "KNOWN")}
    print(f"summary: {tally['PASS']} pass, {tally['FAIL']} fail, {tally['KNOWN']} known failures (allow-listed)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="representative subset (sm_90 + worst cases)")
    parser.add_argument("--json", type=Path, help="write every result to this file")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: CPU count)")
    parser.add_argument("--arch", type=int, action="append", choices=ARCHS, help="only these (repeatable)")
    parser.add_argument("--dtype", action="append", choices=DTYPES, help="only these (repeatable)")
    parser.add_argument("--kernel", action="append", help="only these kernels (repeatable)")
    parser.add_argument("--progress", action="store_true", help="one line per variant on stderr")
    args = parser.parse_args(argv)
    missing = tools_available()
    if missing:
        print(f"aot_check: cannot run: {missing}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    select = dict(archs=tuple(args.arch or ARCHS), dtypes=tuple(args.dtype or DTYPES), kernels=tuple(args.kernel or ()))
    results = run(args.quick, args.jobs, args.progress, **select)
    print_table(results, time.perf_counter() - start)
    if args.json:
        payload = {"triton": triton.__version__, "results": [asdict(r) for r in results]}
        args.json.write_text(json.dumps(payload, indent=1))
    failures = [r for r in results if r.status == "FAIL"]
    for r in failures:
        print(f"FAIL {r.kernel} {r.dtype} sm_{r.arch} {r.variant}: {'; '.join(r.problems)}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""The benchmark harness shared by the ``bench_*.py`` scripts (no workloads here).

* fresh-process workers: :func:`spawn_worker` runs ``python -m <module> --_worker <spec>`` and
  returns its JSON result or an error row; :func:`add_worker_args` / :func:`worker_main` are the
  worker side of that protocol; :func:`error_fields` turns an exception into an error row;
* memory and time: :func:`maxrss_bytes`, :func:`current_rss_bytes`, :func:`reset_peak_rss` (Linux RSS
  high-water mark), :func:`time_steps` (a worker's first, warm-up and timed calls with the RSS peak);
* environment record: :func:`environment` (device, versions, expo backends; imports torch),
  :func:`probe` (the same in a subprocess), :func:`expo_impls`, :func:`git_commit`, :func:`git_dirty`
  (from git, else from ``.whl/COMMIT`` written by ``benchmarks/gpu/fetch_wheels.sh``);
* results: :func:`result_header` (the fields every results JSON starts with), :func:`command_line`,
  :func:`utc_timestamp`, :func:`write_json`;
* tables: :func:`render_table` (console or Markdown), :func:`gib`, :func:`fmt_s`, :func:`fmt_e`.

Importing this module never imports torch: a parent that spawns workers must stay light, because
on Linux a child's ``ru_maxrss`` starts at the RSS of the process that spawned it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
GIB = float(2**30)


# ----------------------------------------------------------------------------------------------
# Memory readings (inside a worker)
# ----------------------------------------------------------------------------------------------


def maxrss_bytes() -> int:
    """``ru_maxrss`` of this process in bytes (the RSS high-water mark)."""
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kb) * (1 if sys.platform == "darwin" else 1024)


def current_rss_bytes() -> int | None:
    """Resident set size now (Linux ``/proc/self/statm``), or None where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets the RSS high-water mark (also what ru_maxrss reads)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def time_steps(step, warmup: int, repeats: int, result: dict):
    """Time ``step()`` inside a worker: the RSS baseline (after a ``gc.collect()``) and a reset of the
    high-water mark, the first call (compilation included), ``warmup`` untimed calls, then ``repeats``
    timed ones. Fills ``baseline_rss_bytes``, ``peak_reset``, ``first_s``, ``times_s``, ``median_s`` (the
    first call's time without timed calls) and ``peak_rss_bytes`` of ``result``; returns the last call's
    output."""
    import gc
    import statistics
    import time

    gc.collect()
    result["baseline_rss_bytes"] = current_rss_bytes()
    result["peak_reset"] = reset_peak_rss()
    t0 = time.perf_counter()
    out = step()
    result["first_s"] = time.perf_counter() - t0
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = step()
        times.append(time.perf_counter() - t0)
    result["peak_rss_bytes"] = maxrss_bytes()
    result["times_s"] = times
    result["median_s"] = statistics.median(times) if times else result["first_s"]
    return out


# ----------------------------------------------------------------------------------------------
# Fresh-process workers
# ----------------------------------------------------------------------------------------------


def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def add_worker_args(parser: argparse.ArgumentParser) -> None:
    """The hidden ``--_worker <spec json>`` / ``--_out <path>`` flags :func:`spawn_worker` passes."""
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    parser.add_argument("--_out", help=argparse.SUPPRESS)


def worker_main(args, run_worker) -> bool:
    """If ``args`` came from :func:`spawn_worker`: run ``run_worker(spec)``, write its result, True."""
    if not getattr(args, "_worker", None):
        return False
    result = run_worker(json.loads(args._worker))
    with open(args._out, "w") as f:
        json.dump(result, f)
    return True


def error_fields(result: dict, exc: BaseException) -> dict:
    """Record a failure in a worker's result (``status`` stays ``"error"``) and return it."""
    result["status"] = "error"
    result["error"] = f"{type(exc).__name__}: {exc}".strip()
    result["traceback"] = traceback.format_exc()
    return result


def _tail(text, lines: int) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return " | ".join((text or "").strip().splitlines()[-lines:])


def spawn_worker(module: str, spec: dict, timeout: float, tmp: str, tail_lines: int = 3) -> dict:
    """Run ``python -m <module> --_worker <spec>`` in a fresh process; its JSON result, or an error
    row (timeout, crash, out of memory) so the other rows still run. An error row has ``status
    "error"``, ``error`` (why, with the last ``tail_lines`` lines of the child's output), and
    ``timed_out: True`` when the child was killed at ``timeout`` seconds."""
    fd, out_path = tempfile.mkstemp(suffix=".json", dir=tmp)
    os.close(fd)
    cmd = [sys.executable, "-m", module, "--_worker", json.dumps(spec), "--_out", out_path]
    try:
        proc = subprocess.run(
            cmd, cwd=str(REPO_ROOT), env=_child_env(), capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        tail = _tail(exc.stderr or exc.stdout, tail_lines)
        return {
            "impl": spec["impl"],
            "status": "error",
            "timed_out": True,
            "error": f"timeout: killed after {timeout:.0f} s" + (f": {tail}" if tail else ""),
        }
    try:
        with open(out_path) as f:
            return json.load(f)
    except Exception:
        tail = _tail(proc.stderr or proc.stdout, tail_lines)
        why = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
        if proc.returncode == -9:
            why += " (out of memory?)"
        return {"impl": spec["impl"], "status": "error", "error": f"worker {why}: {tail}"}


# ----------------------------------------------------------------------------------------------
# Environment record
# ----------------------------------------------------------------------------------------------

VERSIONED = ("triton", "trl", "cut-cross-entropy", "transformers", "liger-kernel", "expo-kernels", "numpy")


def cpu_name() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name


def environment(device_arg: str | None = None) -> dict:
    """Device, versions and expo backends of this process (imports torch and expo_kernels)."""
    from importlib import metadata

    import torch

    info = {}
    d = torch.device(device_arg or ("cuda" if torch.cuda.is_available() else "cpu"))
    info["device"] = str(d)
    info["device_type"] = d.type
    if d.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(d)
        info["cuda"] = torch.version.cuda
    else:
        info["device_name"] = cpu_name()
    info["cpu_count"] = os.cpu_count()
    info["torch_threads"] = torch.get_num_threads()
    v = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in VERSIONED:
        try:
            v[dist] = metadata.version(dist)
        except Exception:
            v[dist] = None
    try:
        import expo_kernels

        v["expo_kernels"] = getattr(expo_kernels, "__version__", None)
        info["expo_backends"] = list(expo_kernels.available_backends(d))
    except Exception as exc:
        info["expo_error"] = f"{type(exc).__name__}: {exc}"
    info["versions"] = v
    return info


def probe(device_arg: str | None, timeout: float = 300) -> dict:
    """:func:`environment`, found in a subprocess so the parent needs no torch."""
    code = (
        "import json, sys; from benchmarks._harness import environment; "
        "print(json.dumps(environment(sys.argv[1] or None)))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, device_arg or ""],
        cwd=str(REPO_ROOT),
        env=_child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise SystemExit(f"probing the device failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def expo_impls(info: dict) -> list:
    """``expo-<backend>`` for every expo backend of the probed device; triton only on CUDA (on CPU it
    only runs under TRITON_INTERPRET=1, far too slow to benchmark). If expo_kernels does not import,
    its rows are listed anyway and fail as errors."""
    backends = info.get("expo_backends")
    if backends is None:
        backends = ["triton", "torch"] if info["device_type"] == "cuda" else ["torch"]
    return [f"expo-{b}" for b in backends if not (b == "triton" and info["device_type"] != "cuda")]


#: Written by ``benchmarks/gpu/fetch_wheels.sh`` (two lines, ``commit <sha>`` and ``dirty true|false``):
#: ``.git`` does not travel to a GPU machine, ``.whl/`` does, so the commit is read from there.
COMMIT_FILE = REPO_ROOT / ".whl" / "COMMIT"


def _commit_file() -> dict:
    """``{"commit": str, "dirty": bool | None}`` from :data:`COMMIT_FILE`, or {} if it is absent/unreadable."""
    try:
        fields = dict(line.split(None, 1) for line in COMMIT_FILE.read_text().splitlines() if " " in line.strip())
    except OSError:
        return {}
    out = {}
    if fields.get("commit", "").strip():
        out["commit"] = fields["commit"].strip()
    dirty = fields.get("dirty", "").strip().lower()
    out["dirty"] = True if dirty == "true" else False if dirty == "false" else None
    return out


def _git(*args) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(["git", *args], cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=10)
    except Exception:
        return None


def git_commit() -> str | None:
    """``git rev-parse HEAD``; where git or ``.git`` is missing (a GPU machine), the commit that
    ``fetch_wheels.sh`` wrote to ``.whl/COMMIT``; None if neither is there."""
    out = _git("rev-parse", "HEAD")
    if out is not None and out.returncode == 0 and out.stdout.strip():
        return out.stdout.strip()
    return _commit_file().get("commit")


def git_dirty() -> bool | None:
    """True when the working tree differs from the commit (uncommitted code was measured). Without git:
    ``.whl/COMMIT``'s ``dirty`` line (the tree's state when ``fetch_wheels.sh`` ran)."""
    out = _git("status", "--porcelain", "--untracked-files=no")
    if out is not None and out.returncode == 0:
        return bool(out.stdout.strip())
    return _commit_file().get("dirty")


# ----------------------------------------------------------------------------------------------
# Results files
# ----------------------------------------------------------------------------------------------


def utc_timestamp() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def command_line(module: str, argv=None) -> str:
    """The command that produced a result, as it would be typed (``python -m <module> ...``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, "-m", module] + args)


def result_header(benchmark: str, module: str, argv, info: dict, device_keys, dirty: bool = False) -> dict:
    """The fields every results JSON starts with: benchmark, timestamp, command, git commit (and
    ``git_dirty`` if asked), host, the device fields ``device_keys`` of ``info``, versions."""
    head = {
        "benchmark": benchmark,
        "timestamp": utc_timestamp(),
        "command": command_line(module, argv),
        "git_commit": git_commit(),
    }
    if dirty:
        head["git_dirty"] = git_dirty()
    head["host"] = platform.node()
    head["device"] = {k: info.get(k) for k in device_keys}
    head["versions"] = info["versions"]
    return head


def write_json(path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {path}")
    return path


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------


def gib(x, nd=3) -> str:
    return f"{x / GIB:.{nd}f}" if isinstance(x, (int, float)) else "-"


def fmt_s(x) -> str:
    if not isinstance(x, (int, float)):
        return "-"
    return f"{x:.4f}" if x < 10 else f"{x:.2f}"


def fmt_e(x) -> str:
    return f"{x:.1e}" if isinstance(x, (int, float)) else "-"


def error_message(row: dict, width: int) -> str:
    """``ERROR: <first line of the error>``, cut to ``width`` characters, for a table cell."""
    return "ERROR: " + (row.get("error") or "?").splitlines()[0][:width]


def render_table(head: list, lines: list, markdown: bool = False) -> str:
    """Aligned columns. A line shorter than ``head`` is an error line: its last cell (the message)
    spans the remaining columns, its other cells align with the columns above them."""
    n = len(head)

    def counts(ln, i):
        return len(ln) == n or i < len(ln) - 1

    widths = [max([len(head[i])] + [len(ln[i]) for ln in lines if counts(ln, i)]) for i in range(n)]

    def join(ln):
        k = n if len(ln) == n else len(ln) - 1
        cells = " | ".join(c.ljust(w) for c, w in zip(ln[:k], widths[:k], strict=False))
        if len(ln) != n:
            cells += " | " + ln[-1]
        return f"| {cells} |" if markdown else cells

    rule = ("|" + "|".join("-" * (w + 2) for w in widths) + "|") if markdown else "-+-".join("-" * w for w in widths)
    return "\n".join([join(head), rule] + [join(ln) for ln in lines])

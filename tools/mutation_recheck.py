"""Re-check mutmut's survivors that the run itself cannot see die, each in a fresh interpreter.

Two kinds:

* code that runs at import time. mutmut switches a mutant on in a worker forked from a server that has
  already imported the package (it collects the tests before forking), so a mutant in code that runs
  while the package is imported (loss registration, the hyperparameter checks it builds, a decorator)
  is never active when a test runs: it always "survives". A new interpreter with ``MUTANT_UNDER_TEST``
  set imports the mutated code.
* code whose effect only the Triton provider sees: the choice of its epilogues (whose fold leaves the
  logits raw, so that the engine must not transform them for it). The run leaves the Triton-interpreter
  tests out (``-k "not triton"``: they are slow); here each survivor of such a function runs the Triton
  tests of the engine. (The heads' backward passes need no such re-check: tests/test_engine.py runs every
  step path with torch epilogues that keep Triton's contract.)

The verdicts go to ``mutants/recheck.json`` (``tools/mutation_report.py`` reads them; mutmut's own
records are left as they are).

    mutmut run --max-children 2 && python tools/mutation_recheck.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

_LOSS_TESTS = ("tests/test_losses_errors.py", "tests/test_losses.py", "tests/test_bad_input_losses.py")

# function (as mutmut names it, without the mutant number) -> the tests that check what it builds
IMPORT_TIME: dict[str, tuple[str, ...]] = {
    "expo_kernels.losses.registry.x_register_loss": _LOSS_TESTS,
    "expo_kernels.losses.registry.x_one_of": _LOSS_TESTS,
    "expo_kernels.losses.registry.x_unit_interval": _LOSS_TESTS,
    "expo_kernels.losses.registry.x__number_check": _LOSS_TESTS,
    "expo_kernels.losses.registry.x__expects": _LOSS_TESTS,
    "expo_kernels.losses.registry.x_positive": _LOSS_TESTS,
    "expo_kernels.losses.registry.x_non_negative": _LOSS_TESTS,
    "expo_kernels.losses._common.x_label_smoothing": _LOSS_TESTS,
    # the decorator wraps the engine's forward for torch.compile: the compile tests of the engine's path,
    # and an eager module call
    "expo_kernels.engine.x_eager_region": (
        "tests/test_compile.py::test_dpo_engine_inductor",
        "tests/test_compile.py::test_forced_pair_engine_under_fullgraph_names_the_call",
        "tests/test_conformance.py",
    ),
}

# function -> the Triton-interpreter tests that run it with the Triton provider's epilogues
TRITON_ONLY: dict[str, tuple[str, ...]] = {
    "expo_kernels.ops.epilogues.x_epilogues": ("tests/test_engine.py", "-k", "triton"),
}
RECHECK = {**IMPORT_TIME, **TRITON_ONLY}

RESULTS = Path("mutants/recheck.json")
TIMEOUT_S = 600


def function_of(mutant: str) -> str:
    return mutant.rsplit("__mutmut_", 1)[0]


def survivors() -> list[str]:
    out = subprocess.run(["mutmut", "results"], capture_output=True, text=True, check=True).stdout
    names = [line.strip().rsplit(": ", 1)[0] for line in out.splitlines() if line.strip().endswith(": survived")]
    return [n for n in names if function_of(n) in RECHECK]


def main() -> int:
    todo = survivors()
    env_base = {k: v for k, v in os.environ.items() if k != "MUTANT_UNDER_TEST"}
    verdicts: dict[str, str] = {}
    running: list[tuple[str, subprocess.Popen, float]] = []
    jobs = int(os.environ.get("MUTATION_JOBS", "2"))
    start = time.monotonic()

    def reap(block: bool) -> None:
        while running and (block or any(p.poll() is not None for _, p, _ in running)):
            for item in list(running):
                name, proc, began = item
                if proc.poll() is None and time.monotonic() - began > TIMEOUT_S:
                    proc.kill()
                    proc.wait()
                    verdicts[name] = "timeout"
                    running.remove(item)
                elif proc.poll() is not None:
                    verdicts[name] = "survived" if proc.returncode == 0 else "killed"
                    running.remove(item)
            if block and running:
                time.sleep(0.2)
            if not block:
                break

    for name in todo:
        while len(running) >= jobs:
            reap(block=False)
            time.sleep(0.2)
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:randomly", "-p", "no:cacheprovider"]
        cmd += list(RECHECK[function_of(name)])
        proc = subprocess.Popen(
            cmd,
            cwd="mutants",
            env={**env_base, "MUTANT_UNDER_TEST": name},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        running.append((name, proc, time.monotonic()))
    reap(block=True)
    RESULTS.write_text(json.dumps(verdicts, indent=1, sort_keys=True))
    killed = sum(v != "survived" for v in verdicts.values())
    print(f"{len(verdicts)} survivors re-checked in {time.monotonic() - start:.0f} s: {killed} killed")
    for name, verdict in sorted(verdicts.items()):
        if verdict == "survived":
            print(f"  survived: {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

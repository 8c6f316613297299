"""Summarize a mutmut run as Markdown: the score, per-module counts, and the survivors grouped by
function with a first classification.

    mutmut run --max-children 2
    python tools/mutation_report.py > docs/mutation-run.md

The classes are rules on a survivor's function and diff, written down so that each can be checked:

* ``import-time``: the function runs while the package is imported (loss registration, the
  hyperparameter checks it builds, decorators), before mutmut activates a mutant in the forked
  worker, so no test can see the mutant. Their behaviour is tested, e.g. by tests/test_losses_errors.py.
* ``device``: a ``device=`` argument removed or set to None (or ``.to(device)`` made ``.to(None)``);
  on a CPU-only machine every tensor is on the CPU either way. The GPU session's tests see them.
* ``text``: only the text of a message or a docstring changed.
* ``default``: the default of ``hparams.get(name, default)``; the registry fills in every declared
  hyperparameter before a loss runs, so the default is never read.
* ``open``: none of the above: a missing test or an equivalent mutant still to be argued.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter, defaultdict

IMPORT_TIME = {
    "expo_kernels.losses.registry.x_register_loss",
    "expo_kernels.losses.registry.x_one_of",
    "expo_kernels.losses.registry.x_unit_interval",
    "expo_kernels.losses.registry.x__number_check",
    "expo_kernels.losses.registry.x__expects",
    "expo_kernels.losses.registry.x_positive",
    "expo_kernels.losses.registry.x_non_negative",
    "expo_kernels.losses._common.x_label_smoothing",
    "expo_kernels.engine.x_eager_region",
}


def _run(*args: str) -> str:
    return subprocess.run(["mutmut", *args], capture_output=True, text=True, check=False).stdout


def classify(function: str, diff: list[str]) -> str:
    if function in IMPORT_TIME:
        return "import-time"
    added = " ".join(line[1:] for line in diff if line.startswith("+"))
    removed = " ".join(line[1:] for line in diff if line.startswith("-"))
    if "device=None" in added or ("device=" in removed and "device=" not in added) or ".to(None)" in added:
        if "device" in removed:
            return "device"
    if re.search(r"\.get\(\"\w+\", ", removed) and re.sub(r"\.get\(\"(\w+)\", [^)]*\)", "", added) == re.sub(
        r"\.get\(\"(\w+)\", [^)]*\)", "", removed
    ):
        return "default"
    strip = re.compile(r"\"[^\"]*\"|'[^']*'")
    if strip.sub("", added) == strip.sub("", removed) and ("XX" in added or added.lower() == removed.lower()):
        return "text"
    return "open"


def main() -> int:
    rows = [line.strip().rsplit(": ", 1) for line in _run("results", "--all", "true").splitlines() if ": " in line]
    status = {name: state for name, state in rows}
    by_module: dict[str, Counter] = defaultdict(Counter)
    for name, state in status.items():
        by_module[re.sub(r"\.x[_ǁ].*", "", name)][state] += 1
    total = Counter(status.values())
    decided = total["killed"] + total["survived"] + total["timeout"] + total["no tests"]
    survivors: dict[str, list[tuple[str, list[str], str]]] = defaultdict(list)
    for name, state in status.items():
        if state != "survived":
            continue
        diff = [ln for ln in _run("show", name).splitlines() if ln[:1] in "+-" and not ln.startswith(("+++", "---"))]
        function = re.sub(r"__mutmut_\d+$", "", name)
        survivors[function].append((name.rsplit("_", 1)[1], diff, classify(function, diff)))
    classes = Counter(c for items in survivors.values() for _, _, c in items)
    print("| state | mutants |\n| --- | --- |")
    for state, n in sorted(total.items()):
        print(f"| {state} | {n} |")
    killed = total["killed"] + total["timeout"]
    if decided:
        print(f"\nScore (killed or timed out / checked): {killed} / {decided} = {killed / decided:.1%}")
        real = decided - classes["import-time"] - total["no tests"]
        print(f"Without the import-time survivors and the functions no selected test reaches: {killed / real:.1%}")
    print("\nSurvivors by class: " + ", ".join(f"{c} {n}" for c, n in sorted(classes.items())))
    print("\n| module | killed | survived | timeout | no tests | not checked |\n| --- | --- | --- | --- | --- | --- |")
    for module, c in sorted(by_module.items()):
        print(f"| {module} | {c['killed']} | {c['survived']} | {c['timeout']} | {c['no tests']} | {c['not checked']} |")
    print("\n## Survivors\n")
    for function, items in sorted(survivors.items()):
        print(f"### `{function}` ({len(items)})\n")
        for number, diff, cls in items:
            print(f"- {number} [{cls}]: " + " / ".join(f"`{ln.strip()}`" for ln in diff if ln.startswith("+"))[:300])
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())

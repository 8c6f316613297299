"""Summarize a mutmut run as Markdown: the score, per-module counts, and every survivor grouped by
function with its class.

    mutmut run --max-children 2 && python tools/mutation_recheck.py
    python tools/mutation_report.py > report.md

The classes are rules on a survivor's function and diff, or entries of ``docs/mutation-equivalent.toml``,
written down so that each can be checked:

* ``equivalent``: listed in ``docs/mutation-equivalent.toml`` with the reason it cannot change a result.
* ``device``: a ``device=`` argument removed or set to None (or ``.to(device)`` made ``.to(None)``);
  on a CPU-only machine every tensor is on the CPU either way (equivalent here). The GPU session's
  tests see them.
* ``import-time``: the function runs while the package is imported (``tools/mutation_recheck.py``
  re-checks these in a fresh interpreter); a survivor of that pass too.
* ``open``: none of the above: a missing test, or an equivalent mutant not yet argued.

Survivors that ``tools/mutation_recheck.py`` killed (import-time code in a fresh interpreter, Triton-only
code with the Triton-interpreter tests) count as killed.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from collections import Counter, defaultdict
from pathlib import Path

from mutation_recheck import IMPORT_TIME, function_of

EQUIVALENT = Path("docs/mutation-equivalent.toml")
FRESH_IMPORT = Path("mutants/recheck.json")


def load_equivalent() -> dict[str, str]:
    """mutant name -> why it is equivalent, from the ``[[equivalent]]`` entries (function, mutants, why)."""
    if not EQUIVALENT.exists():
        return {}
    entries = tomllib.loads(EQUIVALENT.read_text())["equivalent"]
    return {f"{e['function']}__mutmut_{n}": e["why"] for e in entries for n in e["mutants"]}


def _run(*args: str) -> str:
    return subprocess.run(["mutmut", *args], capture_output=True, text=True, check=False).stdout


def classify(name: str, diff: list[str], equivalent: dict[str, str]) -> str:
    if name in equivalent:
        return "equivalent"
    added = " ".join(line[1:] for line in diff if line.startswith("+"))
    removed = " ".join(line[1:] for line in diff if line.startswith("-"))
    if "device=None" in added or ("device=" in removed and "device=" not in added) or ".to(None)" in added:
        if "device" in removed:
            return "device"
    if function_of(name) in IMPORT_TIME:
        return "import-time"
    return "open"


def main() -> int:
    rows = [line.strip().rsplit(": ", 1) for line in _run("results", "--all", "true").splitlines() if ": " in line]
    status = {name: state for name, state in rows}
    fresh = json.loads(FRESH_IMPORT.read_text()) if FRESH_IMPORT.exists() else {}
    killed_fresh = {n for n, v in fresh.items() if v != "survived" and status.get(n) == "survived"}
    for name in killed_fresh:
        status[name] = "killed"
    equivalent = load_equivalent()
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
        survivors[function_of(name)].append((name, diff, classify(name, diff, equivalent)))
    classes = Counter(c for items in survivors.values() for _, _, c in items)
    print("| state | mutants |\n| --- | --- |")
    for state, n in sorted(total.items()):
        print(f"| {state} | {n} |")
    killed = total["killed"] + total["timeout"]
    if decided:
        print(f"\nScore (killed or timed out / checked): {killed} / {decided} = {killed / decided:.1%}")
        print(f"(of the killed, {len(killed_fresh)} by tools/mutation_recheck.py in a fresh interpreter)")
        real = decided - classes["equivalent"] - classes["device"]
        print(f"Without the survivors explained as equivalent (here): {killed} / {real} = {killed / real:.1%}")
    print("\nSurvivors by class: " + ", ".join(f"{c} {n}" for c, n in sorted(classes.items())))
    print("\n| module | killed | survived | timeout | no tests | not checked |\n| --- | --- | --- | --- | --- | --- |")
    for module, c in sorted(by_module.items()):
        print(f"| {module} | {c['killed']} | {c['survived']} | {c['timeout']} | {c['no tests']} | {c['not checked']} |")
    print("\n## Survivors\n")
    for function, items in sorted(survivors.items()):
        print(f"### `{function}` ({len(items)})\n")
        reasons: list[str] = []
        for name, diff, cls in items:
            change = " / ".join(f"`{ln[1:].strip()}`" for ln in diff if ln.startswith("+"))[:300]
            print(f"- {name.rsplit('_', 1)[1]} [{cls}]: {change}")
            if cls == "equivalent" and equivalent[name] not in reasons:
                reasons.append(equivalent[name])
        for why in reasons:
            print("\n  Equivalent: " + " ".join(why.split()))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The package's structure: what import-linter cannot check (``lint-imports`` checks the layers and
circles, pyproject.toml ``[tool.importlinter]``).

* The CPU paths run with Triton unimportable (Triton is installed on Linux only): ``import
  expo_kernels`` and a CPU training step never import ``triton``.
* No module imports a private (``_name``) name from another module (CONTRIBUTING.md, "Layout"): a
  name another module needs is public in its module; a private *module* exposes public names.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import expo_kernels

PACKAGE_DIR = Path(expo_kernels.__file__).resolve().parent
PACKAGE = PACKAGE_DIR.name

# (importing module, "target.module._name") pairs allowed to cross a module boundary, each with the
# reason. Empty: keep it so; a new entry needs a reason a public name cannot serve.
PRIVATE_IMPORT_ALLOWLIST: dict[tuple[str, str], str] = {}


# ---------------------------------------------------------------------------------------------
# CPU without Triton
# ---------------------------------------------------------------------------------------------

_NO_TRITON_SCRIPT = textwrap.dedent(
    """
    import importlib.abc
    import sys


    class NoTriton(importlib.abc.MetaPathFinder):
        # what a macOS or Windows install sees: no triton package
        def find_spec(self, name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
            return None


    sys.meta_path.insert(0, NoTriton())

    import torch

    import expo_kernels as ek

    assert "triton" not in ek.available_backends("cpu"), ek.available_backends("cpu")
    for backend in ("torch", None):  # None: the default CPU backend (native when it builds)
        torch.manual_seed(0)
        hidden = torch.randn(2, 5, 16, requires_grad=True)
        weight = torch.randn(40, 16, requires_grad=True)
        labels = torch.randint(0, 40, (2, 5))
        labels[:, :2] = -100
        logp = ek.linear_logprobs(hidden, weight, labels, backend=backend)
        logp.sum().backward()
        assert hidden.grad is not None and weight.grad is not None
        assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()

        weight.grad = None
        ref_hidden = torch.randn(2, 5, 16)
        out = ek.FusedLinearDPOLoss(beta=0.1, backend=backend)(weight, hidden, labels, ref_hidden=ref_hidden)
        out.loss.backward()
        assert torch.isfinite(out.loss) and weight.grad is not None and torch.isfinite(weight.grad).all()

    leaked = sorted(m for m in sys.modules if m == "triton" or m.startswith("triton."))
    assert not leaked, leaked
    print("OK")
    """
)


def test_cpu_training_runs_without_triton():
    """``import expo_kernels`` and a CPU training step (the op with gradients and backward, and the DPO
    module) with ``triton`` unimportable, in a fresh interpreter; ``triton`` never gets imported."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # a user's environment
    proc = subprocess.run(
        [sys.executable, "-c", _NO_TRITON_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("OK")


# ---------------------------------------------------------------------------------------------
# private names across modules
# ---------------------------------------------------------------------------------------------


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _absolute(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of ``from <level dots><target> import ...`` written in ``module``."""
    if level == 0:
        return target or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _module_named_by(node: ast.expr, bound: dict[str, str], modules: dict[str, Path]) -> str | None:
    """The package module an expression such as ``D`` or ``expo_kernels.ops.state`` names, if any."""
    if isinstance(node, ast.Name):
        return bound.get(node.id)
    if isinstance(node, ast.Attribute):
        parent = _module_named_by(node.value, bound, modules)
        if parent is not None and f"{parent}.{node.attr}" in modules:
            return f"{parent}.{node.attr}"
    return None


def private_cross_module_uses() -> list[str]:
    """Every ``from <module> import _name`` and ``<module>._name`` in the package where ``<module>`` is
    another module of the package and ``_name`` is not itself a module (private modules may be imported:
    they expose public names) nor a dunder."""
    modules = _modules()
    found = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        bound: dict[str, str] = {}  # local name -> the package module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                source = _absolute(module, is_package, node.level, node.module)
                if source.split(".")[0] != PACKAGE:
                    continue
                for alias in node.names:
                    full = f"{source}.{alias.name}"
                    if full in modules:
                        bound[alias.asname or alias.name] = full
                    elif _private(alias.name) and source != module:
                        found.append((module, node.lineno, full))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == PACKAGE:
                        if alias.asname:
                            bound[alias.asname] = alias.name
                        else:
                            bound[PACKAGE] = PACKAGE
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr):
                target = _module_named_by(node.value, bound, modules)
                full = f"{target}.{node.attr}"
                if target is not None and target != module and full not in modules:
                    found.append((module, node.lineno, full))
    return [
        f"{module}:{line}: {name}" for module, line, name in found if (module, name) not in PRIVATE_IMPORT_ALLOWLIST
    ]


def test_no_private_name_crosses_a_module_boundary():
    uses = private_cross_module_uses()
    assert not uses, "private names used from another module (make them public in their module):\n" + "\n".join(uses)


def test_the_private_name_check_finds_what_it_should(tmp_path, monkeypatch):
    """The checker itself, on a small package: each form it must catch, and what it must allow."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from ._version import __version__\n")
    (pkg / "_version.py").write_text("__version__ = '0'\n")
    (pkg / "a.py").write_text("def _helper(): ...\ndef public(): return _helper()\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text(
        "from .. import a\n"
        "from .. import a as A\n"
        "from ..a import _helper\n"  # caught
        "from pkg.a import _helper as h\n"  # caught
        "from .. import _version\n"  # a private module: allowed
        "import pkg.a\n"
        "x = a._helper, A._helper, pkg.a._helper\n"  # three caught
        "y = a.public, a.__name__\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE_DIR", pkg)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", "pkg")
    uses = private_cross_module_uses()
    assert [u.split(": ", 1)[1] for u in uses] == ["pkg.a._helper"] * 5, uses

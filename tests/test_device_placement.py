"""Where the GPU session's tests put their tensors, checked on a machine without a GPU.

The GPU session (benchmarks/gpu/session.sh) runs a list of test files on CUDA with the native backend
off. Their tensors must live where the backend under test runs: ``helpers.device_for`` decides it, and
conftest.py skips a (backend, dtype) case a device cannot run. Two checks make that trustworthy here:
the mapping under a patched ``torch.cuda.is_available``, and a lint of the session's test files that
flags every tensor constructor whose device is left to the default (the CPU, even on a GPU machine).
"""

import ast
import re
from pathlib import Path

import pytest
import torch
from helpers import BACKEND_NAMES, backend_dtype_cases, device_for, unsupported_reason

ROOT = Path(__file__).resolve().parents[1]
SESSION = ROOT / "benchmarks" / "gpu" / "session.sh"

# torch functions that make a tensor on the default device unless told otherwise (the *_like ones and
# Tensor.new_* follow their argument, so they are not here)
CONSTRUCTORS = {
    "arange",
    "as_tensor",
    "empty",
    "eye",
    "full",
    "linspace",
    "ones",
    "rand",
    "randint",
    "randn",
    "randperm",
    "tensor",
    "zeros",
}
# ``.to(x)`` moves a tensor to a device when x names one (``dev``, ``device``, ``DEVICE``,
# ``device_for(...)``, ``t.device``, ``"cuda"``, ``"cpu"``); ``.to(dtype)`` does not
_DEVICE_EXPR = re.compile(r"dev|DEV|cuda|cpu")


def session_test_files() -> list[Path]:
    text = SESSION.read_text()
    match = re.search(r'^TESTS="([^"]+)"', text, re.M)
    assert match, 'benchmarks/gpu/session.sh no longer lists its tests as TESTS="...": update this test'
    files = [ROOT / f for f in match.group(1).split()]
    assert files and all(f.exists() for f in files), files
    return files


def _is_constructor(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in CONSTRUCTORS
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "torch"
    )


def _has_device(call: ast.Call) -> bool:
    return any(k.arg == "device" for k in call.keywords)


def _placed(node: ast.AST, parents: dict) -> bool:
    """``node`` (a constructor call) gets a device: its own ``device=``, or a ``.to(<device>)`` further up
    the same expression (through arithmetic, indexing and other method calls), or it is read as a
    Python number (``int(torch.randint(...))``)."""
    if _has_device(node):  # type: ignore[arg-type]
        return True
    child, parent = node, parents.get(node)
    while parent is not None:
        if isinstance(parent, ast.Call) and isinstance(parent.func, ast.Name) and child in parent.args:
            return parent.func.id in ("int", "float", "bool")
        if isinstance(parent, (ast.BinOp, ast.UnaryOp)) or (
            isinstance(parent, ast.Subscript) and parent.value is child
        ):
            child, parent = parent, parents.get(parent)
            continue
        if isinstance(parent, ast.Attribute) and parent.value is child:
            call = parents.get(parent)
            if not (isinstance(call, ast.Call) and call.func is parent):
                return False
            if parent.attr in ("to", "cuda"):
                if parent.attr == "cuda" or _has_device(call):
                    return True
                if call.args and _DEVICE_EXPR.search(ast.unparse(call.args[0])):
                    return True
            child, parent = call, parents.get(call)
            continue
        return False
    return False


def unplaced_constructors(source: str) -> list[tuple[int, str]]:
    """(line, code) of each tensor constructor in ``source`` whose device is the default."""
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    return sorted(
        (node.lineno, ast.unparse(node))
        for node in ast.walk(tree)
        if _is_constructor(node) and not _placed(node, parents)
    )


@pytest.mark.parametrize("path", session_test_files(), ids=lambda p: p.name)
def test_session_tests_place_every_tensor(path):
    bad = unplaced_constructors(path.read_text())
    assert not bad, f"{path.name}: tensors made on the default device (use helpers.device_for): {bad}"


def test_the_lint_flags_default_device_tensors():
    flagged = unplaced_constructors(
        "x = torch.randn(3, 4)\n"
        "y = torch.tensor([1, 2]).to(torch.float64)\n"
        "z = (torch.zeros(2) * 3).double()\n"
        "w = torch.randn(3, generator=g)[::2]\n"
    )
    assert [line for line, _ in flagged] == [1, 2, 3, 4]
    assert not unplaced_constructors(
        "a = torch.randn(3, device=dev)\n"
        "b = torch.randn(3, generator=g).to(dev)\n"
        "c = (torch.randn(3, generator=g) * 2).to(device)[::2]\n"
        "d = torch.randint(0, 5, (2,), generator=g).to(labels.device, torch.long)\n"
        "e = int(torch.randint(1, 3, (1,), generator=g))\n"
        "f = torch.zeros(2, 2, device='cpu')\n"
        "h = torch.randn(2, generator=g, dtype=dt).to(dev).requires_grad_()\n"
    )


@pytest.mark.parametrize("cuda", [False, True], ids=["cpu-machine", "gpu-machine"])
def test_device_for_maps_each_backend(cuda, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    gpu = torch.device("cuda") if cuda else torch.device("cpu")
    assert device_for("native") == torch.device("cpu")  # the C++ backend takes CPU tensors only
    assert device_for("triton") == gpu  # the interpreter on a CPU machine
    assert device_for("torch") == gpu
    with pytest.raises(ValueError, match="unknown backend"):
        device_for("cuda")


@pytest.mark.parametrize("cuda", [False, True], ids=["cpu-machine", "gpu-machine"])
def test_unsupported_combinations_are_named(cuda, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    for backend in BACKEND_NAMES:
        assert unsupported_reason(backend, torch.float32) is None
    assert unsupported_reason("triton", torch.float64) is not None  # on every machine
    assert unsupported_reason("torch", torch.float64) is None and unsupported_reason("native", torch.float64) is None
    for dtype in (torch.bfloat16, torch.float16):
        assert (unsupported_reason("triton", dtype) is None) == cuda  # wrong in the interpreter
        assert unsupported_reason("torch", dtype) is None and unsupported_reason("native", dtype) is None
    assert unsupported_reason("native", torch.float32, torch.device("cuda")) is not None


def test_no_case_is_parametrized_that_never_runs():
    cases = backend_dtype_cases([torch.float32, torch.float64, torch.bfloat16])
    assert ("triton", torch.float64) not in cases
    assert len(cases) == 3 * 3 - 1

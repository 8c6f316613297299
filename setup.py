"""setuptools shim.

All metadata lives in pyproject.toml. The native CPU backend (csrc/, see csrc/README.md) is not
compiled here: it is built on first use with ``torch.utils.cpp_extension.load`` into a per-machine
cache (``expo_kernels/ops/_native_build.py``), which works the same under build isolation (no torch at
build time), in editable installs and without a compiler (then CPU tensors use the torch
backend). What this file does is ship the C++ source inside the package, as
``expo_kernels/_csrc/``, so that non-editable installs (wheels) can build it too; editable installs
read it from ``csrc/`` directly.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CSRC = Path(__file__).resolve().parent / "csrc"


class build_py_with_csrc(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False) or not CSRC.is_dir():
            return
        target = Path(self.build_lib) / "expo_kernels" / "_csrc"
        target.mkdir(parents=True, exist_ok=True)
        for src in sorted(CSRC.glob("*.cpp")) + sorted(CSRC.glob("*.h")):
            shutil.copy2(src, target / src.name)


setup(cmdclass={"build_py": build_py_with_csrc})

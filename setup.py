"""setuptools shim.

All metadata lives in pyproject.toml. This file exists so that the native CPU backend (csrc/,
see csrc/README.md) can hook its torch C++ extension build in here without changing how the
package is installed.
"""
from setuptools import setup

setup()

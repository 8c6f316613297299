"""The one-call GPU session (``benchmarks/gpu/session.sh``), proven on the CPU by its dry run.

A GPU is lent rarely and for minutes, with no second try: the script must be right before it first
meets one. ``session.sh --dry-run`` runs every stage in the same order, under the same (scaled)
timeouts, with the same child processes and the same files under ``$OUT``, on tiny shapes here.
This test runs it and checks what a device call would bring back: every file, a passing test
stage, and a benchmark row for every implementation, measured or with the reason it is not.
"""

import json
import math
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu" / "session.sh"
SESSION_S = 90
FILES = (
    "info.txt",
    "gpu_tests.log",
    "gpu_tests_first.xml",
    "gpu_tests_rest.xml",
    "bench_dpo_gpu.log",
    "bench_dpo_gpu.json",
    "bench_dpo_gpu.md",
)
# What a device call brings back (the device tool's limits): at most 8 files, one folder level here.
MAX_FILES = 8


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("the session script needs bash and coreutils' timeout")
    out = tmp_path_factory.mktemp("gpu_session_out")
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, SESSION_S=str(SESSION_S))
    # The suite's own interpreter switch must not decide what the script sets for itself.
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"],
        cwd=str(REPO),
        env=env,
        capture_output=True,
        text=True,
        timeout=SESSION_S + 120,
    )
    return proc, out


def test_the_script_exits_cleanly_within_its_budget(dry_run):
    proc, _ = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    done = re.search(r"done in (\d+) s", proc.stdout)
    assert done, proc.stdout[-3000:]
    # The script caps every stage by what is left of SESSION_S; the slack is the kill grace periods.
    assert int(done.group(1)) <= SESSION_S + 40, proc.stdout[-3000:]


def test_every_file_comes_back(dry_run):
    _, out = dry_run
    names = sorted(p.name for p in out.iterdir())
    for name in FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, (name, names)
    assert len(names) <= MAX_FILES, names
    assert all(p.is_file() for p in out.iterdir()), names


def test_info_records_the_commit_and_versions(dry_run):
    _, out = dry_run
    info = (out / "info.txt").read_text()
    assert re.search(r"^commit ([0-9a-f]{7,40}|unknown)", info, re.M), info[:2000]
    for what in ("torch ", "triton ", "expo_kernels "):
        assert what in info, (what, info[:2000])
    assert "EXPO_KERNELS_NATIVE=0" in info  # the session never builds the CPU extension


def test_both_pytest_passes_ran_and_passed(dry_run):
    _, out = dry_run
    log = (out / "gpu_tests.log").read_text()
    assert "collect exit code: 0" in log, log[-3000:]
    total = 0
    for name in ("gpu_tests_first.xml", "gpu_tests_rest.xml"):
        suite = ET.parse(out / name).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        assert suite is not None, name
        assert int(suite.get("failures", 0)) == 0 and int(suite.get("errors", 0)) == 0, (name, log[-3000:])
        total += int(suite.get("tests", 0))
    assert total > 0, log[-3000:]


def test_every_benchmark_row_is_measured_or_explained(dry_run):
    _, out = dry_run
    sys.path.insert(0, str(REPO))
    try:
        from benchmarks import bench_dpo_gpu
    finally:
        sys.path.remove(str(REPO))
    payload = json.loads((out / "bench_dpo_gpu.json").read_text())
    assert payload.get("git_commit"), "the results must name the commit they measured"
    rows = payload["results"]
    wanted = [("default", impl) for impl in bench_dpo_gpu.ALL_IMPLS]
    wanted += [("long", impl) for impl in bench_dpo_gpu.LONG_IMPLS]
    got = {(r["label"], r["impl"]): r for r in rows}
    markdown = (out / "bench_dpo_gpu.md").read_text()
    for key in wanted:
        assert key in got, (key, sorted(got))
        row = got[key]
        if row["status"] == "ok":
            assert row["median_s"] > 0 and math.isfinite(row["loss"]), row
        else:
            assert row.get("error", "").strip(), row  # a row that did not run says why
        assert f"| {key[1]} " in markdown, key
    # the engine row, at least, must run everywhere
    assert got[("default", "expo-engine")]["status"] == "ok", got[("default", "expo-engine")]

"""The main job (`python -m expo_kernels.demo`) at a tiny size: every row runs, and the three paths
train the same objective (equal losses at every step, within fp32 tolerance)."""

import json
import subprocess
import sys

import pytest

pytest.importorskip("trl")


def test_demo_paths_agree(tmp_path):
    out = tmp_path / "demo.json"
    cmd = [
        sys.executable,
        "-m",
        "expo_kernels.demo",
        "--device",
        "cpu",
        "--vocab",
        "300",
        "--seq-len",
        "24",
        "--hidden",
        "32",
        "--layers",
        "1",
        "--steps",
        "2",
        "--lr",
        "1e-2",
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["rows"]
    by = {(r["loss"], r["path"]): r for r in rows}
    assert set(by) == {
        ("dpo", "plain"),
        ("dpo", "trl"),
        ("dpo", "expo_kernels"),
        ("expo", "plain"),
        ("expo", "expo_kernels"),
    }
    for loss in ("dpo", "expo"):
        plain = by[(loss, "plain")]["losses"]
        for path in ("trl", "expo_kernels"):
            if (loss, path) in by:
                assert by[(loss, path)]["losses"] == pytest.approx(plain, rel=1e-4, abs=1e-6)
    assert "expo_kernels" in proc.stdout and "peak memory" in proc.stdout

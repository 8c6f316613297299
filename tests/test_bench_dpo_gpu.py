"""Small CPU checks of ``bench_dpo_gpu`` and its helpers (``roofline``, ``_harness``, ``_workloads``).

Part of the suite (the GPU run has no second try, so its benchmark is tested here); ~20 s on 2 cores.

What they cover: the row order (the engine, every peer, our other paths; cut-cross-entropy before
Liger at long context), one child process per row (a crashed row is recorded and the next row runs;
a child past its limit is recorded as a timeout), the parent never importing torch, the roofline's
mirror of the engine's path choice (workspace budget -> engine / two-pass), ``.whl/COMMIT`` as the
commit record without git, the counted-tokens-only ``naive``, the exact/filtered cut-cross-entropy
rows, the ``torch-lce`` row, and a tiny end-to-end CPU run with every reported column.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks import _harness as hn
from benchmarks import bench_dpo_gpu as G
from benchmarks import roofline

PEERS = ("trl", "cce", "cce-filtered", "torch-lce", "liger", "naive")


def test_row_order_engine_then_peers_then_ours():
    assert G.ALL_IMPLS[0] == "expo-engine"
    peers = G.ALL_IMPLS[1 : 1 + len(PEERS)]
    assert set(peers) == set(PEERS)
    assert set(G.ALL_IMPLS[1 + len(PEERS) :]) == {"expo-engine-frozen", "expo-recompute", "liger-api"}
    assert G.LONG_IMPLS[0] == "expo-engine"
    assert G.LONG_IMPLS.index("cce") < G.LONG_IMPLS.index("liger")
    assert "expo-previous" not in G.ALL_IMPLS
    assert G._impl_list(["expo-previous", "naive"], "--impls") == ["expo-recompute", "naive"]


def test_parent_does_not_import_torch():
    code = "import sys, benchmarks.bench_dpo_gpu; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=hn.REPO_ROOT, env=hn._child_env()).returncode == 0


def test_roofline_constants_match_the_package():
    from expo_kernels import engine
    from expo_kernels.ops.options import DEFAULT_WORKSPACE_BYTES

    assert roofline.WORKSPACE_BYTES == DEFAULT_WORKSPACE_BYTES
    assert roofline.CHUNK_TOKENS == engine.CHUNK_TOKENS


@pytest.mark.parametrize("workspace", [None, 40 * 512 * 4 * 4, 300 * 512 * 4 * 2, 100 * 512 * 4])
def test_engine_plan_mirrors_plan_pairs(workspace):
    """fp32 on the CPU, 2 pairs x 2 rows x 96 tokens (a third prompt), V=512: the default workspace, one
    that holds a pair only unstacked, and one that holds no pair (two-pass)."""
    import torch

    import expo_kernels as ek
    from benchmarks._workloads import make_dpo_inputs
    from expo_kernels import engine

    labels = make_dpo_inputs(2, 96, 8, 512, "fp32", "cpu").labels
    per_pair = G.counted_per_pair(96)
    with ek.kernel_options(workspace_bytes=workspace):
        stacked = engine.plan_pairs(labels, -100, 512, torch.float32, stacked=True)
        plain = engine.plan_pairs(labels, -100, 512, torch.float32)
    ours = roofline.engine_plan([per_pair] * 2, 512, "fp32", "cpu", workspace)
    want_stacked = stacked.chunks is not None
    assert ours["stacked"] == want_stacked
    chosen = stacked if want_stacked else plain
    assert ours["budget_tokens"] == chosen.budget_tokens
    if chosen.chunks is None:
        assert ours["path"] == "two-pass"
    else:
        assert ours["path"] == "engine" and ours["chunks"] == len(chosen.chunks)


def test_roofline_path_from_workspace_and_device_figures(capsys):
    default = roofline.predict_step([1366] * 4, 4096, 128256, "bf16", matmul_tflops=700, hbm_tbs=3.0, l2_mb=50)
    assert default["plan"]["path"] == "engine" and default["flops"] == pytest.approx(8 * 5464 * 4096 * 128256, rel=1e-3)
    long = roofline.predict_step([43690], 4096, 128256, "bf16", matmul_tflops=700, hbm_tbs=3.0, l2_mb=50)
    assert long["plan"]["path"] == "two-pass" and long["flops"] == pytest.approx(10 * 43690 * 4096 * 128256, rel=1e-3)
    assert long["inputs"]["hbm_tbs"] == 3.0 and long["inputs"]["l2_mb"] == 50
    frozen = roofline.predict_step([43690], 4096, 128256, "bf16", trained_head=False, matmul_tflops=700, hbm_tbs=3)
    assert frozen["flops"] == pytest.approx(8 * 43690 * 4096 * 128256, rel=1e-3)
    assert roofline.main(["--pairs", "1", "--pair-tokens", "43690", "--device", "h100"]) == 0
    assert "two-pass" in capsys.readouterr().out


def test_commit_file_without_git(tmp_path, monkeypatch):
    f = tmp_path / "COMMIT"
    f.write_text("commit 0123456789abcdef\ndirty true\n")
    monkeypatch.setattr(hn, "COMMIT_FILE", f)
    monkeypatch.setattr(hn, "_git", lambda *a: None)
    assert hn.git_commit() == "0123456789abcdef" and hn.git_dirty() is True
    f.write_text("commit abc\ndirty false\n")
    assert hn.git_commit() == "abc" and hn.git_dirty() is False
    monkeypatch.setattr(hn, "COMMIT_FILE", tmp_path / "absent")
    assert hn.git_commit() is None and hn.git_dirty() is None


def test_naive_masks_before_the_matmul_and_torch_lce_agrees():
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks._workloads import build_impl, make_dpo_inputs

    h, _, w, y = make_dpo_inputs(1, 48, 16, 256, "fp32", "cpu")
    h, y = h.detach().reshape(-1, 16), y.reshape(-1)
    n_valid = int((y != -100).sum())
    with FlopCounterMode(display=False) as fc:
        masked = build_impl("naive-masked", "cpu")(h, w.detach(), y)
    assert fc.get_total_flops() == 2 * n_valid * 16 * 256
    torch.testing.assert_close(masked, build_impl("naive", "cpu")(h, w.detach(), y))
    try:
        lce = build_impl("torch-lce", "cpu")
    except ImportError:
        pytest.skip("this torch has no F.linear_cross_entropy options")
    torch.testing.assert_close(lce(h, w.detach(), y), masked, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="only in impl='cce'"):
        build_impl("cce-filtered", "cpu")


def test_spawn_worker_crash_and_timeout(tmp_path):
    crashed = hn.spawn_worker(G.MODULE, {"kind": "no-such-kind", "impl": "x"}, 60, str(tmp_path))
    assert crashed["status"] == "error" and "exit code 1" in crashed["error"]
    slow = hn.spawn_worker(G.MODULE, {"kind": "setup", "impl": "setup", "device": "cpu"}, 0.3, str(tmp_path))
    assert slow["status"] == "error" and slow["timed_out"] and slow["error"].startswith("timeout")


def test_quick_cpu_run_every_row_recorded(tmp_path, monkeypatch):
    """naive's child crashes (SIGSEGV, as a CUDA fault would): its row says so and the next rows run;
    cce-filtered records why it cannot run here; expo rows report rerun, host syncs, path and model."""
    monkeypatch.setenv(G.CRASH_ENV, "naive")
    out = tmp_path / "q.json"
    argv = ["--device", "cpu", "--quick", "--impls", "naive", "expo-engine", "cce-filtered", "expo-previous"]
    argv += ["--matmul-seconds", "0.05", "--json", str(out), "--markdown", str(tmp_path / "q.md")]
    assert G.main(argv) == 0
    payload = json.loads(out.read_text())
    rows = {r["impl"]: r for r in payload["results"]}
    assert list(rows) == ["naive", "expo-engine", "cce-filtered", "expo-recompute"]
    assert rows["naive"]["status"] == "error" and "signal 11" in rows["naive"]["error"]
    assert rows["cce-filtered"]["status"] == "skipped" and "impl='cce'" in rows["cce-filtered"]["error"]
    for name in ("expo-engine", "expo-recompute"):
        r = rows[name]
        assert r["status"] == "ok", r.get("error")
        assert r["host_syncs"] == "n/a (cpu)"
        assert r["rerun_identical"] == {"d_hidden": True, "d_weight": True}
        assert r["d_hidden_rel_err"] < 1e-4 and r["d_weight_rel_err"] < 1e-4 and r["loss_rel_err"] < 1e-4
        assert isinstance(r["model_ms"], float)
    assert rows["expo-engine"]["model"]["plan"]["path"] == "engine"
    assert rows["expo-recompute"]["model"]["inputs"]["path"] == "recompute"
    assert payload["matmul"]["timed_s"] >= 0.05 and payload["copy"]["tbs"] > 0
    md = (tmp_path / "q.md").read_text()
    for name in rows:
        assert f"| {name} " in md

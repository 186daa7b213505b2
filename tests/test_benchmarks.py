"""The benchmark scripts run end to end at tiny sizes and write what their README reads (no timing asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"

CASES = {
    "vs_authors": ["--preset", "tiny", "--seq", "16", "--tokens-per-step", "32", "--dropout", "0", "0.1",
                   "--repeats", "1"],
    "sparse_readout": ["--preset", "tiny", "--tokens", "64", "--seq", "16", "--densities", "0.05", "0.5",
                       "--repeats", "1"],
    "weight_products": ["--preset", "tiny", "--tokens", "64", "--seq", "16", "32", "--repeats", "1"],
    "profile_step": ["--preset", "tiny", "--seq", "16", "--batch", "2", "--warmup", "1", "--steps", "1", "--top", "5"],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_benchmark_runs_and_writes_its_json(name, tmp_path):
    out = tmp_path / f"{name}.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), *CASES[name], "--out", str(out)],
                          cwd=BENCH, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["benchmark"] == name and result["machine"]["cpu"] and result["results"]
    if name == "vs_authors":
        for row in result["results"]:
            assert row["speedup"] > 0 and row["engine"].startswith("fused:")
            if row["dropout"] == 0:
                assert row["first_loss_diff"] < 1e-4  # the same computation
    if name == "profile_step":
        ops = result["results"]
        assert len(ops) == 5 and result["self_cpu_s"] >= sum(op["self_cpu_ms"] for op in ops) / 1e3 > 0
    if name == "sparse_readout":
        assert all(r["max_abs_diff"] < 1e-5 for r in result["results"])

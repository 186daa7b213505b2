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


def run_script(name: str, args: list[str], out: Path) -> subprocess.CompletedProcess:
    """benchmarks/<name>.py with these arguments and --out, this checkout first on the path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, str(BENCH / f"{name}.py"), *args, "--out", str(out)],
                          cwd=BENCH, env=env, capture_output=True, text=True, timeout=300)


def run_benchmark(name: str, args: list[str], out: Path) -> dict:
    """Run benchmarks/<name>.py with --out and return the JSON it wrote."""
    done = run_script(name, args, out)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", sorted(CASES))
def test_benchmark_runs_and_writes_its_json(name, tmp_path):
    result = run_benchmark(name, CASES[name], tmp_path / f"{name}.json")
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


def test_vs_authors_in_bfloat16_runs_both_forms_under_autocast(tmp_path):
    """bdh's fused layer is float32 only: in bfloat16 it takes the op-by-op layer, and both forms
    still compute the same loss to bfloat16's precision."""
    result = run_benchmark("vs_authors", [*CASES["vs_authors"], "--dtype", "bfloat16"], tmp_path / "bf16.json")
    for row in result["results"]:
        assert row["dtype"] == "bfloat16" and not row["engine"].startswith("fused:")
        if row["dropout"] == 0:
            assert 0 < row["first_loss_diff"] < 0.05  # rounded differently, the same computation


@pytest.mark.parametrize("fused", ["on", "off"])
def test_vs_authors_times_the_layer_it_is_told_to(fused, tmp_path):
    """--fused on|off: the fused layer always or never; y's density is still recorded (by an op-by-op
    pass after the timed steps) and both forms compute the same loss."""
    result = run_benchmark("vs_authors", [*CASES["vs_authors"], "--fused", fused], tmp_path / f"{fused}.json")
    for row in result["results"]:
        assert row["engine"].startswith("fused:") == (fused == "on")
        assert 0 < row["y_density"] <= 1 and "error" not in row["forms"]["bdh"]
        if row["dropout"] == 0:
            assert row["first_loss_diff"] < 1e-4


@pytest.mark.parametrize("name", ["vs_authors", "profile_step"])
def test_a_bad_device_is_one_line_before_anything_runs(name, tmp_path):
    done = run_script(name, ["--preset", "tiny", "--device", "gpu"], tmp_path / "x.json")
    assert done.returncode == 2 and not (tmp_path / "x.json").exists()
    assert done.stderr.strip().splitlines() == ["bdh: error: device must be cpu, cuda, cuda:N, mps or auto "
                                                "(cuda when available); got 'gpu'"]


def test_cuda_script_refuses_an_unknown_part_before_anything_runs(tmp_path):
    done = subprocess.run(["bash", str(BENCH / "cuda.sh"), str(tmp_path / "out"), "third"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and not (tmp_path / "out").exists()
    assert done.stderr.strip().splitlines() == ["cuda.sh: the part must be first or second (or left out for all); "
                                                "got 'third'"]

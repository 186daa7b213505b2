"""`bdh sweep`: every size trained alike, the power-law fits, the figure, and resuming a killed sweep."""

import json
import math

import numpy as np
import pytest

from bdh.cli import main
from bdh.experiments import fit_scaling_law, runs

from tests.helpers import metrics, tiny_flags

from .helpers import Runs

SIZES = "2,4,8,16"


def test_power_law_fit_recovers_a_known_exponent():
    n = np.geomspace(1e5, 1e7, 6)
    fit = fit_scaling_law(n, 7.0 * n ** -0.12)
    assert fit.alpha == pytest.approx(0.12, rel=1e-6) and fit.a == pytest.approx(7.0, rel=1e-6)
    assert fit.c == 0 and fit.r2 == pytest.approx(1.0) and fit.points == 6
    noisy = 7.0 * n ** -0.12 * np.exp(np.random.default_rng(0).normal(0, 0.01, n.size))
    assert fit_scaling_law(n, noisy).alpha == pytest.approx(0.12, abs=0.02)
    floor = fit_scaling_law(n, 1.5 + 40.0 * n ** -0.3, irreducible=True)
    assert floor.alpha == pytest.approx(0.3, rel=1e-3) and floor.c == pytest.approx(1.5, rel=1e-3)
    assert floor.predict([1e6])[0] == pytest.approx(1.5 + 40.0 * 1e6 ** -0.3, rel=1e-6)
    assert "N^-0.120" in fit.describe()
    with pytest.raises(ValueError):
        fit_scaling_law([1e5], [3.0])
    with pytest.raises(ValueError):
        fit_scaling_law(n[:3], n[:3] ** -0.1, irreducible=True)


def test_sweep_trains_every_size_and_fits(tmp_path, text_file, monkeypatch, capsys):
    out = tmp_path / "sweep"
    calls = Runs()
    monkeypatch.setattr(runs, "run_in_child", calls)
    assert main(["sweep", "--sizes", SIZES, *tiny_flags(text_file, out), "--no-tune"]) == 0
    printed = capsys.readouterr().out
    assert calls.names == ["bdh-m2", "gpt-m2", "bdh-m4", "gpt-m4", "bdh-m8", "gpt-m8", "bdh-m16", "gpt-m16"]
    # the tiny sizes span less than 10x: said, and the fit falls back to non-embedding parameters
    assert "note: bdh: total parameters span only 2.9x" in printed
    for name in ("sweep.md", "sweep.json", "scaling.png"):
        assert (out / name).is_file()
    data = json.loads((out / "sweep.json").read_text())
    assert data["fit_on"] == "non-embedding" and data["sizes"] == [2, 4, 8, 16]
    done = data["runs"]
    assert sorted(done) == sorted(calls.names) and all(r["status"] == "done" for r in done.values())
    for size in (2, 4, 8, 16):
        bdh, gpt = done[f"bdh-m{size}"], done[f"gpt-m{size}"]
        assert bdh["model"]["mlp_internal_dim_multiplier"] == size and bdh["size"] == gpt["size"] == size
        assert bdh["model"]["n_embd"] == 32 and bdh["model"]["n_layer"] == 2  # only the neurons grow
        assert abs(gpt["params"] / bdh["params"] - 1) <= 0.05
        assert bdh["tokens_seen"] == gpt["tokens_seen"] == 128 and math.isfinite(bdh["final_val_loss"])
    params = [done[f"bdh-m{s}"]["params"] for s in (2, 4, 8, 16)]
    assert params == sorted(params) and params[-1] / params[0] > 2.5
    for model in ("bdh", "gpt"):
        for axis in ("total", "non-embedding"):
            fit = data["fits"][model][axis]
            assert fit["points"] == 4 and math.isfinite(fit["alpha"]) and fit["a"] > 0
    report = (out / "sweep.md").read_text()
    assert "| bdh-m16 |" in report and "| gpt-m2 |" in report and "![validation loss against parameters" in report
    assert "BDH, N = non-embedding parameters: L = " in report


def test_killed_sweep_trains_only_what_is_left(tmp_path, text_file, monkeypatch, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "--sizes", SIZES, "--models", "bdh", *tiny_flags(text_file, out), "--no-tune"]
    first = Runs(stop_at=3)
    monkeypatch.setattr(runs, "run_in_child", first)
    assert main(argv) == 130
    assert first.names == ["bdh-m2", "bdh-m4", "bdh-m8"]
    manifest = json.loads((out / "sweep.json").read_text())
    assert sorted(manifest["runs"]) == ["bdh-m2", "bdh-m4"]
    assert [r["step"] for r in metrics(out / "bdh-m8")][-1] == 1
    capsys.readouterr()
    again = Runs()
    monkeypatch.setattr(runs, "run_in_child", again)
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert again.names == ["bdh-m8", "bdh-m16"]
    assert again.specs[0]["resume"] == str(out / "bdh-m8") and again.specs[1]["resume"] is None
    assert "bdh-m2 (22,528 parameters), lr 0.001: reusing the finished run (4 steps)" in printed
    assert "bdh-m8 (40,960 parameters), lr 0.001: resuming at step 1" in printed
    data = json.loads((out / "sweep.json").read_text())
    assert sorted(data["runs"]) == ["bdh-m16", "bdh-m2", "bdh-m4", "bdh-m8"]
    assert [r["step"] for r in metrics(out / "bdh-m8")] == [1, 2, 3, 4]
    assert data["fits"]["bdh"]["total"]["points"] == 4 and "gpt" not in data["fits"]
    # a third time: nothing left to train
    third = Runs()
    monkeypatch.setattr(runs, "run_in_child", third)
    assert main(argv) == 0 and third.specs == []


def test_diverged_run_is_recorded_and_left_out(tmp_path, text_file, monkeypatch, capsys):
    out = tmp_path / "sweep"
    calls = Runs()

    def fake(spec):
        if spec["config"]["out"].endswith("bdh-m4"):
            calls.specs.append(spec)
            return {"status": "diverged", "message": "loss became nan at step 3"}
        return calls(spec)

    monkeypatch.setattr(runs, "run_in_child", fake)
    argv = ["sweep", "--sizes", "2,4,8", "--models", "bdh", *tiny_flags(text_file, out), "--no-tune"]
    assert main(argv) == 0
    data = json.loads((out / "sweep.json").read_text())
    assert data["runs"]["bdh-m4"]["status"] == "diverged" and data["fits"]["bdh"]["total"]["points"] == 2
    assert "| bdh-m4 | diverged |" in (out / "sweep.md").read_text()
    calls.specs.clear()
    assert main(argv) == 0
    assert calls.specs == [] and "skipped, it diverged before" in capsys.readouterr().out


def test_sweep_searches_each_runs_learning_rate(tmp_path, text_file, monkeypatch):
    out = tmp_path / "sweep"
    calls = Runs()
    monkeypatch.setattr(runs, "run_in_child", calls)
    argv = ["sweep", "--sizes", "2,4", *tiny_flags(text_file, out), "--tune", "lr=1e-3,3e-2", "--tune-extend", "0"]
    assert main(argv) == 0
    assert calls.names == ["bdh-m2-lr1e-03", "bdh-m2-lr3e-02", "bdh-m2", "gpt-m2-lr1e-03", "gpt-m2-lr3e-02", "gpt-m2",
                           "bdh-m4-lr1e-03", "bdh-m4-lr3e-02", "bdh-m4", "gpt-m4-lr1e-03", "gpt-m4-lr3e-02", "gpt-m4"]
    data = json.loads((out / "sweep.json").read_text())
    for name in ("bdh-m2", "gpt-m2", "bdh-m4", "gpt-m4"):
        record = data["tuning"][name]
        best = min(record["trials"], key=lambda t: t["holdout_loss"])
        assert record["chosen"] == best["point"] and data["runs"][name]["lr"] == best["point"]["lr"]
        assert record["cost"]["tokens"] == sum(t["tokens_seen"] for t in record["trials"]) == 2 * 32
    assert "## The search of each run's settings" in (out / "sweep.md").read_text()
    calls.specs.clear()
    assert main(argv) == 0 and calls.specs == []  # a second time: every trial and run is reused

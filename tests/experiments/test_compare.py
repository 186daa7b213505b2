"""`bdh compare`: the search, both runs trained alike in child processes, the report, reuse and resume."""

import json
import math

import pytest

from bdh.cli import main
from bdh.experiments import runs

from tests.helpers import metrics, one_line_error, tiny_flags, write_text

from .helpers import Runs

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """One real comparison (each model trained in its own child process), shared by the tests below."""
    root = tmp_path_factory.mktemp("compare")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BDH_CACHE", str(root / "cache"))
        argv = ["compare", *tiny_flags(write_text(root / "text.txt"), root / "cmp"), "--tune", "lr=1e-3,3e-2"]
        assert main(argv) == 0
    return root, argv


def test_compare_writes_table_figures_and_metrics(compared):
    root, _ = compared
    out = root / "cmp"
    for name in ("compare.md", "compare.json", "val_loss_vs_tokens.png", "val_loss_vs_time.png",
                 "bdh/metrics.jsonl", "gpt/metrics.jsonl", "bdh/latest", "gpt/latest"):
        assert (out / name).is_file(), name
    assert (out / "val_loss_vs_tokens.png").read_bytes().startswith(PNG)
    data = json.loads((out / "compare.json").read_text())
    bdh, gpt = data["runs"]["bdh"], data["runs"]["gpt"]
    assert bdh["model_type"] == "bdh" and gpt["model_type"] == "gpt"
    assert abs(gpt["params"] / bdh["params"] - 1) <= 0.05 and data["parameter_difference"]["gpt"] == pytest.approx(
        gpt["params"] / bdh["params"] - 1)
    assert gpt["model"]["block_size"] == 16 and gpt["model"]["vocab_size"] == bdh["model"]["vocab_size"] == 256
    for run in (bdh, gpt):
        assert 0 < run["params_without_embeddings"] < run["params"]
        assert run["steps"] == 4 and run["stopped"] == "max_iters"
        assert [p["step"] for p in run["curve"]] == [2, 4]
        assert 0 < run["final_val_loss"] < 10
        # the final loss is scored on the whole validation split, with its standard error
        assert run["final_val_batches"] > 1 and 0 < run["final_val_se"] < 1
        # bytes tokenizer: bits per byte = nats per token / ln 2
        assert run["final_val_bpb"] == pytest.approx(run["final_val_loss"] / math.log(2))
        assert run["tokens_per_s"] > 0 and run["train_time_s"] > 0
        assert 10 < run["peak_rss_mib"] < 100_000
        assert len(metrics(out / run["run_dir"])) >= 4
    # same data, same budget: the same tokens seen
    assert bdh["tokens_seen"] == gpt["tokens_seen"] == 4 * 2 * 16
    assert data["settings"]["max_iters"] == 4 and data["command"].startswith("bdh compare --preset tiny")
    assert data["settings"]["final_eval_iters"] == 0 and data["machine"]["cpu_model"]
    report = (out / "compare.md").read_text()
    assert "| parameters | 65,536 |" in report and "![validation loss against tokens seen]" in report
    assert "| tokens seen | 128 | 128 |" in report and "bdh/metrics.jsonl" in report
    assert "## Settings: a search on a slice held out from the training split" in report
    assert "GPT − BDH: " in report and "## Equal wall-clock" not in report


def test_compare_run_dirs_work_with_eval(compared, capsys):
    root, _ = compared
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(root / "cmp" / "gpt"), "--json", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] > 0


def test_second_compare_reuses_finished_runs(compared, monkeypatch, capsys):
    root, argv = compared
    monkeypatch.setenv("BDH_CACHE", str(root / "cache"))
    calls = Runs()
    monkeypatch.setattr(runs, "run_in_child", calls)
    before = json.loads((root / "cmp" / "compare.json").read_text())
    assert main(argv) == 0
    assert calls.specs == []
    assert "reusing the finished run (4 steps)" in capsys.readouterr().out
    after = json.loads((root / "cmp" / "compare.json").read_text())
    for name in ("bdh", "gpt"):
        # the peak memory measured when the run was trained is kept
        assert after["runs"][name]["peak_rss_mib"] == before["runs"][name]["peak_rss_mib"]
        assert after["runs"][name]["final_val_loss"] == before["runs"][name]["final_val_loss"]


def test_compare_refuses_a_directory_with_other_settings(compared, monkeypatch, capsys):
    root, argv = compared
    monkeypatch.setenv("BDH_CACHE", str(root / "cache"))
    monkeypatch.setattr(runs, "run_in_child", Runs())
    before = (root / "cmp" / "compare.json").read_bytes()
    assert main([*argv, "--weight-decay", "0.2"]) == 2
    line = one_line_error(capsys)
    assert "holds a run with other settings (weight_decay: 0.1 != 0.2)" in line and "--overwrite" in line
    assert (root / "cmp" / "compare.json").read_bytes() == before


def test_killed_compare_resumes_where_it_stopped(tmp_path, text_file, monkeypatch, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", *tiny_flags(text_file, out), "--no-tune"]
    first = Runs(stop_at=1)
    monkeypatch.setattr(runs, "run_in_child", first)
    assert main(argv) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    assert [r["step"] for r in metrics(out / "bdh")][-1] == 1 and not (out / "gpt").exists()
    again = Runs()
    monkeypatch.setattr(runs, "run_in_child", again)
    assert main(argv) == 0
    assert "bdh (65,536 parameters, lr 0.001, 4 steps): resuming at step 1" in capsys.readouterr().out
    assert again.names == ["bdh", "gpt"]
    assert again.specs[0]["resume"] == str(out / "bdh") and again.specs[1]["resume"] is None
    assert [r["step"] for r in metrics(out / "bdh")] == [1, 2, 3, 4]
    data = json.loads((out / "compare.json").read_text())
    assert data["runs"]["bdh"]["tokens_seen"] == data["runs"]["gpt"]["tokens_seen"] == 128
    # trained in this process: no peak memory measured, shown as n/a
    assert data["runs"]["bdh"]["peak_rss_mib"] is None
    assert "| peak memory (RSS, MiB) | n/a | n/a |" in (out / "compare.md").read_text()


def test_time_budget_is_for_the_whole_run(tmp_path, monkeypatch):
    from bdh.train import TrainConfig

    cfg = TrainConfig(preset="tiny", out=str(tmp_path / "bdh"), max_iters=100, max_minutes=2.0)
    plan = runs.RunPlan("bdh", cfg)
    seen = []
    monkeypatch.setattr(runs, "run_in_child", lambda spec: seen.append(spec) or {"status": "ok"})
    runs.train_run(plan, runs.RunStatus("resume", step=10, elapsed_s=90.0))
    runs.train_run(plan, runs.RunStatus("new"))
    assert seen[0]["config"]["max_minutes"] == pytest.approx(0.5) and seen[0]["resume"] == str(tmp_path / "bdh")
    assert seen[1]["config"]["max_minutes"] == 2.0 and seen[1]["resume"] is None
    assert runs.is_finished(cfg, 10, 120.0, 0.0) and runs.is_finished(cfg, 100, 1.0, 0.0) and not runs.is_finished(cfg, 99, 119, 0.0)


def test_a_failed_run_is_one_error_line(tmp_path, text_file, monkeypatch, capsys):
    monkeypatch.setattr(runs, "run_in_child", lambda spec: {"status": "diverged", "message": "loss became nan"})
    assert main(["compare", *tiny_flags(text_file, tmp_path / "cmp"), "--no-tune"]) == 1
    assert "run bdh diverged: loss became nan" in one_line_error(capsys)

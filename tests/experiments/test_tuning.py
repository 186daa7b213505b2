"""The fair-fight protocol: the search's held-out slice, the argmin, standard errors, the models list,
equal wall-clock runs, and resuming a search that was killed."""

import json
import math

import numpy as np
import pytest

from bdh.cli import main
from bdh.data import RandomBatches, TokenData, eval_batches, hold_out
from bdh.errors import UserError
from bdh.experiments import families, runs, tuning
from bdh.experiments.compare import plan_compare
from bdh.experiments.tuning import TuneSpec
from bdh.rundir import RunDir
from bdh.train import TrainConfig
from bdh.train.evaluate import evaluate, standard_error

from tests.helpers import metrics, one_line_error, tiny_flags

from .helpers import Runs


def test_held_out_slice_is_disjoint_from_validation_and_from_the_training_windows():
    train, val = np.arange(1000, dtype=np.uint16), np.arange(1000, 1100, dtype=np.uint16)
    held = hold_out(TokenData(train=train, val=val), 0.1)
    # the end of the training split: the real validation split is not in it
    assert held.val.tolist() == list(range(900, 1000)) and not set(held.val.tolist()) & set(val.tolist())
    assert np.concatenate([held.train, held.val]).tolist() == train.tolist()
    trained = set()
    batches = RandomBatches(held.train, 8, 16, seed=0)
    for _ in range(200):
        x, y = next(batches)
        trained |= set(x.flatten().tolist()) | set(y.flatten().tolist())
    scored = set()
    for x, y in eval_batches(held.val, 2, 16):
        scored |= set(x.flatten().tolist()) | set(y.flatten().tolist())
    assert max(trained) < 900 <= min(scored) and max(trained) >= 880  # the training windows reach the cut
    assert hold_out(TokenData(train=train, val=val), 0.0).val is val
    with pytest.raises(UserError):
        hold_out(TokenData(train=train[:5], val=val), 0.01)


def test_a_trial_run_validates_on_the_held_out_slice(tmp_path, text_file):
    from bdh.data import load_corpus
    from bdh.train.loop import train

    cfg = TrainConfig(preset="tiny", data=str(text_file), out=str(tmp_path / "t"), batch_size=2, block_size=16,
                      max_iters=2, eval_interval=0, final_eval_iters=0, holdout_fraction=0.2, sample_tokens=0,
                      warmup_iters=1, device="cpu")
    result = train(cfg)
    corpus = load_corpus(str(text_file))
    summary = RunDir(tmp_path / "t").read_train_config()["data"]
    n_train = len(corpus.train.encode())
    assert summary["val_tokens"] == round(n_train * 0.2) and summary["train_tokens"] == n_train - round(n_train * 0.2)
    # the reported loss is the loss on that slice, all of it
    from bdh.checkpoint import load_model

    model = load_model(tmp_path / "t")
    tokens = np.frombuffer(corpus.train.encode(), dtype=np.uint8).astype(np.uint16)
    expect = evaluate(model, tokens[len(tokens) - round(n_train * 0.2):], 2, 16, None, "cpu", 1.0)
    assert result.val.loss == pytest.approx(expect.loss, rel=1e-5) and result.val.batches == expect.batches


def test_choose_is_the_argmin_of_the_held_out_losses():
    trials = [{"point": {"lr": 1e-3}, "status": "done", "holdout_loss": 2.5},
              {"point": {"lr": 3e-3}, "status": "done", "holdout_loss": 2.1},
              {"point": {"lr": 1e-2}, "status": "diverged", "holdout_loss": math.inf},
              {"point": {"lr": 2e-2}, "status": "done", "holdout_loss": 2.1}]
    assert tuning.choose(trials)["point"] == {"lr": 3e-3}  # the first of equal ones
    with pytest.raises(UserError, match="every trial of the search diverged"):
        tuning.choose([trials[2]])


def test_the_next_rate_beyond_an_edge_where_the_best_sits():
    assert tuning.beyond_edge([1e-3, 3e-3, 1e-2], 1e-2) == pytest.approx(3.33e-2)
    assert tuning.beyond_edge([1e-3, 3e-3, 1e-2], 1e-3) == pytest.approx(3.33e-4)
    assert tuning.beyond_edge([1e-3, 3e-3, 1e-2], 3e-3) is None
    assert tuning.beyond_edge([1e-3, 3e-3, 1e-2, 3.33e-2], 1e-2) is None  # a worse (or diverged) point beyond it
    assert tuning.beyond_edge([1e-3], 1e-3) is None


@pytest.mark.parametrize("best, extend, tried", [
    (0.05, 2, [1e-3, 3e-3, 1e-2, 3.33e-2, 0.111]),  # best beyond the grid: two more trials, then the limit
    (0.012, 2, [1e-3, 3e-3, 1e-2, 3.33e-2]),  # the point beyond is worse: 1e-2 is inside now
    (3e-3, 2, [1e-3, 3e-3, 1e-2]),  # inside the grid: nothing more
    (1e-4, 2, [1e-3, 3e-3, 1e-2, 3.33e-4, 1.11e-4]),  # below the grid
    (0.05, 0, [1e-3, 3e-3, 1e-2]),  # extension off
])
def test_the_search_goes_past_the_grid_edge_until_the_best_is_inside(tmp_path, monkeypatch, best, extend, tried):
    def fake_trial(plan, status, point):  # the held-out loss: a bowl in log lr around `best`
        return {"point": point, "status": "done", "holdout_loss": abs(math.log(point["lr"] / best)),
                "max_iters": plan.cfg.max_iters, "train_seconds": plan.cfg.train_seconds, "tokens_seen": 1,
                "train_time_s": 1.0}

    monkeypatch.setattr(tuning, "run_trial", fake_trial)
    spec = TuneSpec(extend=extend)
    cfg, record = tuning.search("bdh", TrainConfig(max_iters=8), spec, tmp_path, False, say=lambda _: None)
    assert [t["point"]["lr"] for t in record["trials"]] == pytest.approx(tried)
    losses = {t["point"]["lr"]: t["holdout_loss"] for t in record["trials"]}
    assert cfg.lr == min(losses, key=losses.get) == record["chosen"]["lr"]


def test_grid_parsing_and_trial_scaling():
    grid = tuning.parse_grid(["lr=1e-3,3e-3", "warmup-iters=0,100"])
    assert grid == {"lr": (1e-3, 3e-3), "warmup_iters": (0, 100)}
    spec = TuneSpec(grid=grid, share=0.25)
    assert [tuning.point_name(p) for p in spec.points()] == ["lr1e-03-wu0", "lr1e-03-wu100", "lr3e-03-wu0",
                                                            "lr3e-03-wu100"]
    for bad in (["colour=1"], ["lr=a"], ["lr=1e-3", "lr=2e-3"], ["lr=0"], ["lr=1e-3,1e-3"]):
        with pytest.raises(UserError):
            tuning.parse_grid(bad)
    cfg = TrainConfig(max_iters=600, warmup_iters=100, lr=1e-3, min_lr=1e-4, max_minutes=8.0, train_seconds=300)
    trial = tuning.trial_config(cfg, {"lr": 3e-3}, spec, "x")
    assert (trial.max_iters, trial.warmup_iters, trial.max_minutes, trial.train_seconds) == (150, 25, 2.0, 75)
    assert trial.lr == 3e-3 and trial.min_lr == pytest.approx(3e-4) and trial.holdout_fraction == 0.05
    assert trial.eval_interval == 0 and trial.final_eval_iters == 0


def test_standard_error_over_batches_and_paired_difference(tmp_path):
    values = [2.0, 2.2, 1.9, 2.3]
    assert standard_error(values) == pytest.approx(np.std(values, ddof=1) / 2.0)
    assert standard_error([1.0]) is None
    for name, losses in (("a", [2.0, 2.1, 2.2]), ("b", [2.5, 2.7, 2.6])):
        (tmp_path / name).mkdir()
        RunDir(tmp_path / name).append_metrics({"step": 1, "val_loss": sum(losses) / 3, "val_batch_losses": losses})
    diff = runs.paired_difference(tmp_path / "a", tmp_path / "b")
    assert diff["mean"] == pytest.approx(0.5) and diff["batches"] == 3
    assert diff["se"] == pytest.approx(np.std([0.5, 0.6, 0.4], ddof=1) / math.sqrt(3))


def test_evaluate_reports_the_standard_error_of_its_batches():
    import torch

    from bdh import BDH, BDHConfig

    torch.manual_seed(0)
    model = BDH(BDHConfig.from_name("tiny"))
    tokens = np.random.default_rng(0).integers(0, 256, 16 * 17 + 1).astype(np.uint16)
    result = evaluate(model, tokens, 4, 16, None, "cpu", 1.0)
    with torch.no_grad():
        per_batch = [float(model(x, y).loss) for x, y in eval_batches(tokens, 4, 16)]
    assert result.batches == 4 and result.batch_losses == pytest.approx(per_batch, rel=1e-6)
    assert result.se == pytest.approx(np.std(per_batch, ddof=1) / 2.0, rel=1e-6)
    assert result.loss == pytest.approx(np.mean(per_batch), rel=1e-6)


def test_models_list():
    assert families.parse_models("bdh,gpt") == ["bdh", "gpt"] and families.parse_models("gpt") == ["gpt"]
    for bad in ("bdh,rnn", "", "gpt,gpt"):
        with pytest.raises(UserError):
            families.parse_models(bad)
    assert families.parse_family_args(["gpt:n_layer=4", "gpt:pos_encoding=alibi"]) == {
        "gpt": {"n_layer": 4, "pos_encoding": "alibi"}}
    with pytest.raises(UserError):
        families.parse_family_args(["rnn:x=1"])


def test_a_family_without_a_matcher_trains_its_own_preset(tmp_path, text_file, monkeypatch):
    monkeypatch.setattr(families, "MATCHERS", {})
    cfg = TrainConfig(preset="tiny", data=str(text_file), batch_size=2, block_size=16, device="cpu",
                      sample_tokens=0)
    plans = plan_compare(cfg, tmp_path / "cmp", models=["gpt", "bdh"],
                                 family_args={"gpt": {"n_layer": 1}}, tune=TuneSpec.off())
    assert [p.name for p in plans] == ["gpt", "bdh"]
    gpt = plans[0]
    assert gpt.cfg.model_type == "gpt" and gpt.cfg.preset == "tiny" and gpt.cfg.model_overrides == {"n_layer": 1}
    assert gpt.model.n_embd == 32 and gpt.model.n_layer == 1
    with pytest.raises(UserError, match="no parameter matcher and no preset 'huge'"):
        families.family_train_config(TrainConfig(preset="huge"), "gpt", None, {}, tmp_path)


def test_search_picks_the_argmin_and_the_run_trains_at_it(tmp_path, text_file, monkeypatch, capsys):
    out = tmp_path / "cmp"
    calls = Runs()
    monkeypatch.setattr(runs, "run_in_child", calls)
    argv = ["compare", *tiny_flags(text_file, out), "--tune", "lr=1e-3,3e-2", "--models", "gpt", "--equal-time", "0.5",
            "--tune-extend", "0"]
    assert main(argv) == 0
    assert calls.names == ["gpt-lr1e-03", "gpt-lr3e-02", "gpt", "gpt-time-lr1e-03", "gpt-time-lr3e-02", "gpt-time"]
    data = json.loads((out / "compare.json").read_text())
    record = data["tuning"]["gpt"]
    losses = {t["point"]["lr"]: t["holdout_loss"] for t in record["trials"]}
    chosen = min(losses, key=losses.get)
    assert record["chosen"] == {"lr": chosen} and data["runs"]["gpt"]["lr"] == chosen
    trained = RunDir(out / "gpt").read_train_config()["train"]
    assert trained["lr"] == chosen and trained["min_lr"] == pytest.approx(chosen / 10)
    assert trained["holdout_fraction"] == 0.0  # the reported run trains on the whole training split
    for trial in record["trials"]:
        saved = RunDir(out / trial["run_dir"]).read_train_config()
        assert saved["train"]["holdout_fraction"] == 0.05 and saved["train"]["max_iters"] == 1
        assert saved["data"]["val_tokens"] < saved["data"]["train_tokens"] // 10  # the slice, not validation
        assert [r["val_loss"] for r in metrics(out / trial["run_dir"]) if "val_loss" in r] == [trial["holdout_loss"]]
    assert record["cost"]["tokens"] == 2 * 32 and record["cost"]["time_s"] > 0
    # equal time: a budget of 0.5 s of training steps at the chosen rate, its step cap 4x what the rate fits
    # its settings from a search of its own: trials of a quarter of the 0.5 s, on the held-out slice
    timed = data["runs"]["gpt-time"]
    saved = RunDir(out / "gpt-time").read_train_config()["train"]
    rate = data["runs"]["gpt"]["tokens_per_s"]
    time_record = data["tuning"]["gpt-time"]
    time_losses = {t["point"]["lr"]: t["holdout_loss"] for t in time_record["trials"]}
    time_chosen = min(time_losses, key=time_losses.get)
    assert time_record["chosen"] == {"lr": time_chosen} and time_record["trial_seconds"] == 0.125
    for trial in time_record["trials"]:
        trial_cfg = RunDir(out / trial["run_dir"]).read_train_config()["train"]
        assert trial_cfg["train_seconds"] == 0.125 and trial_cfg["holdout_fraction"] == 0.05
        assert trial_cfg["lr"] == trial["point"]["lr"] and trial["run_dir"].startswith("tune/gpt-time-lr")
    assert data["equal_time_target_s"] == 0.5 and saved["train_seconds"] == 0.5 and timed["lr"] == time_chosen
    assert saved["min_lr"] == pytest.approx(time_chosen / 10) and saved["holdout_fraction"] == 0.0
    assert saved["max_iters"] == 4 * max(1, round(0.5 * rate / 32)) and saved["decay_iters"] is None
    assert timed["stopped"] == "train_seconds" and timed["step_time_s"] >= 0.5
    report = (out / "compare.md").read_text()
    assert "## Equal wall-clock" in report and "a search of its own at this budget" in report
    assert "held-out loss after 0.125 s of training steps, " in report


def test_equal_time_runs_can_reuse_the_equal_token_settings(tmp_path, text_file, monkeypatch, capsys):
    calls = Runs()
    monkeypatch.setattr(runs, "run_in_child", calls)
    out = tmp_path / "cmp"
    argv = ["compare", *tiny_flags(text_file, out), "--tune", "lr=1e-3,3e-2", "--models", "gpt", "--equal-time", "0.5",
            "--tune-extend", "0", "--reuse-settings"]
    assert main(argv) == 0
    assert calls.names == ["gpt-lr1e-03", "gpt-lr3e-02", "gpt", "gpt-time"]
    data = json.loads((out / "compare.json").read_text())
    assert not data["equal_time_search"] and "gpt-time" not in data["tuning"]
    assert data["runs"]["gpt-time"]["lr"] == data["runs"]["gpt"]["lr"] == data["tuning"]["gpt"]["chosen"]["lr"]
    assert "the settings of its equal-token run" in (out / "compare.md").read_text()
    capsys.readouterr()
    assert main(["compare", *tiny_flags(text_file, tmp_path / "other"), "--reuse-settings"]) == 2
    one_line_error(capsys, "--reuse-settings is about the equal-time runs")


def test_lr_given_is_held_and_contradictions_are_refused(tmp_path, text_file, monkeypatch, capsys):
    calls = Runs()
    monkeypatch.setattr(runs, "run_in_child", calls)
    out = tmp_path / "cmp"
    assert main(["compare", *tiny_flags(text_file, out), "--lr", "2e-3", "--models", "gpt"]) == 0
    assert calls.names == ["gpt"] and not (out / "tune").exists()
    data = json.loads((out / "compare.json").read_text())
    assert data["tuning"]["gpt"] is None and data["runs"]["gpt"]["lr"] == 2e-3
    assert "not tuned (lr 0.002 as given)" in (out / "compare.md").read_text()
    capsys.readouterr()
    for extra, message in ((["--lr", "2e-3", "--tune", "lr=1e-3,3e-3"], "lr is both given (--lr) and searched"),
                           (["--no-tune", "--tune", "lr=1e-3"], "--no-tune and --tune contradict"),
                           (["--tune", "beta1=0.9"], "cannot tune 'beta1'"),
                           (["--equal-time", "soon"], "--equal-time takes a number of seconds")):
        assert main(["compare", *tiny_flags(text_file, tmp_path / "other"), *extra]) == 2
        one_line_error(capsys, message)


def test_killed_search_resumes_where_it_stopped(tmp_path, text_file, monkeypatch, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", *tiny_flags(text_file, out, steps=8), "--tune", "lr=1e-3,3e-3", "--tune-extend", "0",
            "--models", "bdh"]
    first = Runs(stop_at=2)
    monkeypatch.setattr(runs, "run_in_child", first)
    assert main(argv) == 130
    assert first.names == ["bdh-lr1e-03", "bdh-lr3e-03"]
    assert [r["step"] for r in metrics(out / "tune" / "bdh-lr3e-03")][-1] == 1
    capsys.readouterr()
    again = Runs()
    monkeypatch.setattr(runs, "run_in_child", again)
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "search bdh [1/2] lr1e-03: finished" in printed and "search bdh [2/2] lr3e-03: resume" in printed
    assert again.names == ["bdh-lr3e-03", "bdh"] and again.specs[0]["resume"] == str(out / "tune" / "bdh-lr3e-03")
    assert [r["step"] for r in metrics(out / "tune" / "bdh-lr3e-03")][-2:] == [1, 2]
    data = json.loads((out / "compare.json").read_text())
    assert [t["steps"] for t in data["tuning"]["bdh"]["trials"]] == [2, 2]

"""The training loop end to end, divergence, time budget, optimizer and schedule."""

import json
import math

import pytest
import torch

from bdh import BDH, BDHConfig
from bdh.cli import main
from bdh.errors import UserError
from bdh.train import TrainConfig, loop, train
from bdh.train.optim import lr_at, lr_on_clock, make_optimizer

from tests.helpers import metrics, tiny_args


def test_weight_decay_only_on_matrices():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = make_optimizer(model, 1e-3, 0.1)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and len(plain["params"]) == 3  # two biases + LayerNorm weight
    bdh = BDH(BDHConfig.from_name("tiny"))
    assert sum(p.numel() for p in make_optimizer(bdh, 1e-3, 0.1).param_groups[0]["params"]) == bdh.num_params()


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_schedule_warms_up_then_decays_to_min_lr(decay):
    lrs = [lr_at(s, 1e-3, 1e-4, 10, 100, decay) for s in range(120)]
    assert lrs[0] == pytest.approx(1e-3 / 11) and lrs[9] == pytest.approx(1e-3 * 10 / 11)
    assert lrs[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[100] == lrs[119] == 1e-4
    middle = 1e-4 + 0.5 * (1e-3 - 1e-4)
    assert lrs[55] == pytest.approx(middle)


def test_train_run_writes_metrics_checkpoint_and_sample(tmp_path, text_file, capsys):
    run = tmp_path / "run"
    argv = tiny_args(text_file, run, "--eval-interval", "2", "--sample-tokens", "12", "--sample-prompt", "The ",
                     steps=4)
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert '"block_size": 16' in out and "--- sample (12 tokens) ---\nThe " in out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in ("tokens", "train_loss", "lr", "tokens_per_s", "elapsed_s", "step_s"):
        assert all(key in r for r in records)
    assert records[-1]["tokens"] == 4 * 2 * 16
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    # bytes tokenizer: one token per byte, so bits per byte = nats / ln 2
    assert evals[-1]["val_bpb"] == pytest.approx(evals[-1]["val_loss"] / math.log(2))
    # the sparsity of x and y is logged with every validation, so its evolution can be plotted
    assert all(0 < r["y_nonzero"] <= r["x_nonzero"] <= 1 for r in evals)
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["train"]["max_iters"] == 4 and saved["model"]["n_embd"] == 32
    assert (run / "latest").read_text().strip() == "checkpoints/step-0000004"


def test_library_api_returns_result(tmp_path, text_file):
    cfg = TrainConfig(preset="tiny", data=str(text_file), out=str(tmp_path / "run"), batch_size=2, block_size=16,
                      max_iters=2, eval_interval=0, eval_iters=1, sample_tokens=3, warmup_iters=0, device="cpu")
    result = train(cfg)
    assert result.step == 2 and result.stopped == "max_iters" and math.isfinite(result.val.loss)
    assert result.checkpoint.name == "step-0000002" and isinstance(result.sample, str)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, text_file, monkeypatch, capsys):
    real = loop.forward_backward
    calls = []

    def poisoned(*args, **kwargs):
        loss, state = real(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 3 else loss), state

    monkeypatch.setattr(loop, "forward_backward", poisoned)
    run = tmp_path / "run"
    assert main(tiny_args(text_file, run, "--ckpt-interval", "2", steps=6)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 or err[-1].startswith("bdh: error:")
    assert "loss became nan at step 3" in err[-1] and "step-0000002" in err[-1]
    assert (run / "latest").read_text().strip() == "checkpoints/step-0000002"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-0000002"]


def test_time_budget_stops_early(tmp_path, text_file, monkeypatch):
    clock = iter(range(0, 10_000, 30))  # every call to the clock advances 30 s
    monkeypatch.setattr(loop.time, "monotonic", lambda: float(next(clock)))
    run = tmp_path / "run"
    assert main(tiny_args(text_file, run, "--max-minutes", "1", steps=50)) == 0
    state = json.loads((run / "checkpoints" / (run / "latest").read_text().strip().split("/")[1]
                        / "trainer_state.json").read_text())
    assert 0 < state["step"] < 50


class StepClock:
    """A fake clock that only training steps advance (`seconds` each): evaluations take no time."""

    def __init__(self, monkeypatch, seconds: float = 1.0):
        self.now = 0.0
        real = loop.forward_backward

        def timed(*args, **kwargs):
            self.now += seconds
            return real(*args, **kwargs)

        monkeypatch.setattr(loop, "forward_backward", timed)
        monkeypatch.setattr(loop.time, "monotonic", lambda: self.now)


def test_the_budget_stops_on_the_clock_every_process_agreed_on(tmp_path, text_file, monkeypatch):
    """The stop is decided on the clock of the step's collective (before its optimizer update), never on
    a process's own clock after it, which processes can disagree on: the reason given is the budget."""
    clock = StepClock(monkeypatch, seconds=0.5)
    real_set_lr = loop.set_lr

    def slow_update(*args):  # the optimizer's half of each step: after the collective
        clock.now += 0.5
        real_set_lr(*args)

    monkeypatch.setattr(loop, "set_lr", slow_update)
    cfg = TrainConfig(preset="tiny", data=str(text_file), out=str(tmp_path / "run"), batch_size=2, block_size=16,
                      max_iters=50, train_seconds=10, eval_interval=0, eval_iters=1, sample_tokens=0, device="cpu")
    result = train(cfg)
    # step k's collective sees k + 0.5 s: the first at or past 10 s is step 10, the 11th
    assert result.stopped == "train_seconds" and result.step == 11


def trainer_state(run):
    return json.loads((run / (run / "latest").read_text().strip() / "trainer_state.json").read_text())


def test_train_seconds_is_a_budget_of_training_steps_with_the_decay_on_their_clock(tmp_path, text_file, monkeypatch):
    StepClock(monkeypatch)
    run = tmp_path / "run"
    argv = tiny_args(text_file, run, "--train-seconds", "10", "--warmup-iters", "2", "--eval-interval", "3", steps=50)
    assert main(argv) == 0
    state = trainer_state(run)
    # step k ends its gradients at clock k + 1; the budget is spent at step 10, the decay starts at step 2 (clock 3)
    assert state["step"] == 10 and state["step_s"] == 10 and state["warm_s"] == 3
    lrs = {r["step"]: r["lr"] for r in metrics(run) if "lr" in r}
    want = {k + 1: lr_on_clock(k, k + 1.0, 3.0, 10.0, 1e-3, 1e-4, 2) for k in range(10)}
    assert lrs == pytest.approx(want)
    assert lrs[3] == pytest.approx(1e-3) and lrs[10] == pytest.approx(1e-4)  # peak after warm-up, min_lr at the end
    assert all(a >= b for a, b in zip(list(lrs.values())[2:], list(lrs.values())[3:]))


def test_a_time_budget_resumed_goes_on_with_its_own_clock(tmp_path, text_file, monkeypatch):
    StepClock(monkeypatch)
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(tiny_args(text_file, whole, "--train-seconds", "8", "--warmup-iters", "2", steps=50)) == 0
    assert main(tiny_args(text_file, split, "--train-seconds", "8", "--warmup-iters", "2", steps=4)) == 0
    assert trainer_state(split)["step"] == 4  # stopped by max_iters, 4 s of the 8 spent
    assert main(["train", "--resume", str(split), "--max-iters", "50"]) == 0
    assert trainer_state(split)["step"] == trainer_state(whole)["step"] == 8
    lrs = [{r["step"]: r["lr"] for r in metrics(run) if "lr" in r} for run in (whole, split)]
    assert lrs[0] == pytest.approx(lrs[1])


def test_train_seconds_and_a_fixed_decay_end_are_refused():
    with pytest.raises(UserError, match="leave decay_iters unset"):
        TrainConfig(train_seconds=10, decay_iters=500)
    with pytest.raises(UserError, match="train_seconds must be positive"):
        TrainConfig(train_seconds=0)

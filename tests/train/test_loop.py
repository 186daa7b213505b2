"""The training loop end to end, divergence, time budget, optimizer and schedule."""

import json
import math

import pytest
import torch

from bdh import BDH, BDHConfig
from bdh.cli import main
from bdh.train import TrainConfig, loop, train
from bdh.train.optim import lr_at, make_optimizer

from tests.helpers import tiny_args


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
    for key in ("tokens", "train_loss", "lr", "tokens_per_s", "elapsed_s"):
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

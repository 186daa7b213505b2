"""Checkpoints: contents, atomic replacement, pruning, and clear errors for damaged ones."""

import json

import pytest
import torch

from bdh import BDH, BDHConfig
from bdh.checkpoint import load_model
from bdh.cli import main
from bdh.data import RandomBatches
from bdh.errors import UserError
from bdh.rundir import RunDir, checkpoint_problem
from bdh.train import checkpoint as ckpt_io
from bdh.train.optim import make_optimizer

from tests.helpers import files_under, one_line_error, tiny_args


def test_optimizer_round_trip_is_exact(tmp_path):
    model = BDH(BDHConfig.from_name("tiny"))
    opt = make_optimizer(model, 1e-3, 0.1)
    x = torch.randint(0, 256, (2, 8))
    model(x, x, return_state=False).loss.backward()
    opt.step()
    names = [n for n, _ in model.named_parameters()]
    ckpt_io.save_optimizer(opt, names, tmp_path / "opt.safetensors")
    other = make_optimizer(model, 5e-3, 0.0)
    ckpt_io.load_optimizer(other, names, tmp_path / "opt.safetensors")
    a, b = opt.state_dict(), other.state_dict()
    assert ckpt_io.to_json_safe(a["param_groups"]) == ckpt_io.to_json_safe(b["param_groups"])
    for index, values in a["state"].items():
        for key, value in values.items():
            assert torch.equal(value, b["state"][index][key])
    with pytest.raises(UserError, match="other parameters"):
        ckpt_io.load_optimizer(other, names[::-1], tmp_path / "opt.safetensors")


def test_iterator_and_rng_state_survive_json(tmp_path):
    import numpy as np

    batches = RandomBatches(np.arange(1000, dtype=np.uint16), 2, 8, seed=3)
    next(batches)
    saved = json.loads(json.dumps(ckpt_io.to_json_safe(batches.state_dict())))
    expected = next(batches)
    again = RandomBatches(np.arange(1000, dtype=np.uint16), 2, 8, seed=99)
    again.load_state_dict(ckpt_io.from_json_safe(saved))
    assert all(torch.equal(a, b) for a, b in zip(expected, next(again)))
    rng = json.loads(json.dumps(ckpt_io.rng_state()))
    first = torch.rand(3)
    ckpt_io.set_rng_state(rng)
    assert torch.equal(first, torch.rand(3))


def test_checkpoint_layout_and_pruning(tmp_path, text_file):
    run = tmp_path / "run"
    assert main(tiny_args(text_file, run, "--ckpt-interval", "1", "--eval-interval", "2", steps=5)) == 0
    steps = RunDir(run).checkpoint_steps()
    # the last two and the best validated one (validations at steps 2, 4 and 5)
    state = json.loads((run / "checkpoints" / "step-0000005" / "trainer_state.json").read_text())
    assert steps[-2:] == [4, 5] and len(steps) <= 3
    assert state["best_ckpt_step"] in steps
    assert (run / "best").read_text().strip() == f"checkpoints/step-{state['best_ckpt_step']:07d}"
    assert (run / "latest").read_text().strip() == "checkpoints/step-0000005"
    names = {p.name for p in (run / "checkpoints" / "step-0000005").iterdir()}
    assert {"config.json", "model.safetensors", "optimizer.safetensors", "trainer_state.json",
            "tokenizer.json"} <= names
    assert state["step"] == 5 and state["tokens_seen"] == 5 * 2 * 16
    assert set(state["ranks"][0]) == {"data", "rng"}
    assert not list((run / "checkpoints").glob(".*"))


def test_failed_save_keeps_previous_checkpoint(tmp_path, text_file, monkeypatch, capsys):
    run = tmp_path / "run"
    real = ckpt_io.save_optimizer
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second checkpoint dies half-written
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt_io, "save_optimizer", failing)
    assert main(tiny_args(text_file, run, "--ckpt-interval", "2", steps=6)) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert (run / "latest").read_text().strip() == "checkpoints/step-0000002"
    assert RunDir(run).checkpoint_steps() == [2]
    assert not list((run / "checkpoints").glob(".*"))  # no half-written directory left behind
    load_model(run)  # the run directory still resolves to a whole checkpoint
    ckpt_io.load_checkpoint(run)


@pytest.mark.parametrize("damage", ["truncate-weights", "flip-optimizer", "garbage-state", "missing-config"])
def test_damaged_checkpoint_is_one_line_error(tmp_path, text_file, capsys, damage):
    run = tmp_path / "run"
    assert main(tiny_args(text_file, run, steps=2)) == 0
    ckpt = run / "checkpoints" / "step-0000002"
    if damage == "truncate-weights":
        data = (ckpt / "model.safetensors").read_bytes()
        (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
        name = "model.safetensors"
    elif damage == "flip-optimizer":
        data = bytearray((ckpt / "optimizer.safetensors").read_bytes())
        data[-5] ^= 0xFF
        (ckpt / "optimizer.safetensors").write_bytes(bytes(data))
        name = "optimizer.safetensors"
    elif damage == "garbage-state":
        (ckpt / "trainer_state.json").write_text("{not json")
        name = "trainer_state.json"
    else:
        (ckpt / "config.json").unlink()
        name = "config.json"
    before = files_under(run)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--max-iters", "4"]) == 2
    one_line_error(capsys, name)
    assert files_under(run) == before
    if damage in ("truncate-weights",):
        assert main(["generate", "--ckpt", str(run), "--max-new-tokens", "2"]) == 2
        one_line_error(capsys, name)


def test_mismatched_model_config_is_refused(tmp_path, text_file, capsys):
    run = tmp_path / "run"
    assert main(tiny_args(text_file, run, steps=2)) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--max-iters", "4", "--model-arg", "n_layer=3"]) == 2
    one_line_error(capsys, "config.json", "n_layer")


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, text_file, capsys):
    straight, run = tmp_path / "straight", tmp_path / "run"
    assert main(tiny_args(text_file, straight, "--ckpt-interval", "2", steps=6)) == 0
    assert main(tiny_args(text_file, run, "--ckpt-interval", "2", steps=4)) == 0
    assert RunDir(run).checkpoint_steps() == [2, 4]  # --keep-checkpoints 2
    weights = run / "checkpoints" / "step-0000004" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF  # same size, other bytes: only the checksum sees it
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    for argv in (["generate", "--ckpt", str(run), "--max-new-tokens", "2", "--seed", "0"],
                 ["eval", "--ckpt", str(run), "--max-batches", "1", "--block-size", "16"]):
        assert main(argv) == 0, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("bdh: warning:"), err
        assert "step-0000004" in err[0] and "using step 2" in err[0] and "step 4 was lost" in err[0]
    assert main(["train", "--resume", str(run), "--max-iters", "6"]) == 0
    err = capsys.readouterr().err
    assert "using step 2 instead: step 4 was lost" in err
    from tests.helpers import losses
    assert losses(run) == losses(straight)  # steps 3 and 4 trained again, exactly as before
    for step in RunDir(run).checkpoint_steps():
        assert checkpoint_problem(RunDir(run).step_dir(step)) is None

"""A resumed run continues exactly: its per-step losses equal those of an uninterrupted run."""

import json

import pytest

from bdh.cli import main
from bdh.train import loop

from tests.helpers import losses, tiny_args


def _interrupt_after(monkeypatch, step):
    """Simulate Ctrl-C right after `step` completed (as a KeyboardInterrupt from the loop)."""
    original = loop.Trainer.after_step

    def after_step(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if self.run.progress.step == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop.Trainer, "after_step", after_step)


def assert_split_run_matches_straight(tmp_path, text_file, *extra, tolerance=1e-6):
    """Six steps straight, and three then resumed to six (dropout on: the restored RNG state must
    give the same dropout masks): the same loss at every step."""
    common = ("--decay-iters", "6", "--model-arg", "dropout=0.1", "--ckpt-interval", "3", *extra)
    assert main(tiny_args(text_file, tmp_path / "straight", *common, steps=6)) == 0
    assert main(tiny_args(text_file, tmp_path / "split", *common, steps=3)) == 0
    assert main(["train", "--resume", str(tmp_path / "split"), "--max-iters", "6"]) == 0
    straight, split = losses(tmp_path / "straight"), losses(tmp_path / "split")
    assert sorted(split) == list(range(1, 7))
    for step in range(1, 7):
        assert split[step] == pytest.approx(straight[step], abs=tolerance), step


def test_resume_random_mode_matches_straight_run(tmp_path, text_file):
    assert_split_run_matches_straight(tmp_path, text_file)


def test_interrupt_saves_and_stream_resume_matches(tmp_path, text_file, monkeypatch, capsys):
    common = ("--stream", "--grad-accum", "2")
    assert main(tiny_args(text_file, tmp_path / "straight", *common, steps=6)) == 0
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 3)
        assert main(tiny_args(text_file, tmp_path / "split", *common, steps=6)) == 130
    err = capsys.readouterr().err
    assert "interrupted at step 3" in err and "--resume" in err
    ckpt = tmp_path / "split" / "checkpoints" / "step-0000003"
    assert (ckpt / "stream_state.safetensors").is_file()
    assert (tmp_path / "split" / "latest").read_text().strip() == "checkpoints/step-0000003"
    assert main(["train", "--resume", str(tmp_path / "split")]) == 0
    straight, split = losses(tmp_path / "straight"), losses(tmp_path / "split")
    assert sorted(split) == list(range(1, 7))
    for step in range(1, 7):
        assert split[step] == pytest.approx(straight[step], abs=1e-6), step


def test_resume_refuses_other_mode_and_finished_run(tmp_path, text_file, capsys):
    run = tmp_path / "run"
    assert main(tiny_args(text_file, run, steps=2)) == 0
    before = (run / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--stream", "--max-iters", "4"]) == 2
    assert "--no-stream" in capsys.readouterr().err
    assert main(["train", "--resume", str(run)]) == 2
    assert "--max-iters" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_bytes() == before


def test_resume_from_a_step_directory_truncates_later_metrics(tmp_path, text_file):
    run = tmp_path / "run"
    assert main(tiny_args(text_file, run, "--ckpt-interval", "2", "--keep-checkpoints", "3", steps=4)) == 0
    assert main(["train", "--resume", str(run / "checkpoints" / "step-0000002")]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "train_loss" in r]
    assert steps == [1, 2, 3, 4]

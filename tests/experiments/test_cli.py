"""The compare and sweep commands: help, and every bad input as one error line with nothing written."""

import pytest

from bdh.cli import main
from bdh.experiments import runs

from tests.helpers import one_line_error, tiny_flags

from .helpers import Runs


@pytest.mark.parametrize("command", ["compare", "sweep"])
def test_help(command, capsys):
    assert main([command, "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for flag in ("--out DIR", "--gpt-arg KEY=VALUE", "--model-arg KEY=VALUE", "--max-iters N", "--max-minutes X",
                 "--data DATA", "--preset PRESET", "--overwrite", "--seed N"):
        assert flag in out, flag
    assert "--model {bdh,gpt}" not in out and "--resume" not in out
    if command == "sweep":
        assert "--sizes M,M,..." in out and "(default: 4,8,16,32,64)" in out and "--fit-on {auto,total,non-embedding}" in out


@pytest.mark.parametrize("extra, message", [
    (["--data", "missing.txt"], "no such file or directory: missing.txt"),
    (["--block-size", "5000"], "block_size + 1 = 5001"),
    (["--lr", "-1"], "lr must be positive"),
    (["--gpt-arg", "colour=red"], "unknown GPTConfig field(s): colour"),
    (["--gpt-arg", "oops"], "--gpt-arg expects KEY=VALUE"),
    (["--model-arg", "n_head=3"], "n_embd (32) must be divisible by n_head (3)"),
    (["--stream"], "--gpt-arg pos_encoding=alibi"),
    (["--preset", "huge"], "unknown BDH preset 'huge'"),
    (["--max-minutes", "0"], "max_minutes must be positive"),
])
@pytest.mark.parametrize("command", ["compare", "sweep"])
def test_bad_input_is_one_line_and_writes_nothing(command, extra, message, tmp_path, text_file, monkeypatch,
                                                  capsys):
    monkeypatch.chdir(tmp_path)
    calls = Runs()
    monkeypatch.setattr(runs, "run_in_child", calls)
    out = tmp_path / "exp"
    sizes = ["--sizes", "2,4"] if command == "sweep" else []
    assert main([command, *sizes, *tiny_flags(text_file, out), *extra]) == 2
    assert message in one_line_error(capsys)
    assert not out.exists() and calls.specs == []


@pytest.mark.parametrize("extra, message", [
    (["--sizes", "4"], "a sweep needs at least 2 sizes"),
    (["--sizes", "4,x"], "--sizes expects comma-separated integers"),
    (["--sizes", "4,4"], "sizes must be distinct"),
    (["--sizes", "0,4"], "sizes must be positive integers"),
    (["--sizes", "1,4"], "size 1: no GPT shape within 5%"),
    (["--models", "gpt,rnn"], "--models expects a comma-separated list of registered model families (bdh, gpt"),
    (["--model-arg", "mlp_internal_dim_multiplier=4"], "sweep sets mlp_internal_dim_multiplier from --sizes"),
    (["--fit-on", "both"], "invalid choice: 'both'"),
])
def test_bad_sweep_input(extra, message, tmp_path, text_file, monkeypatch, capsys):
    monkeypatch.setattr(runs, "run_in_child", Runs())
    out = tmp_path / "exp"
    assert main(["sweep", *tiny_flags(text_file, out), *extra]) == 2
    assert message in one_line_error(capsys)
    assert not out.exists()


def test_out_must_be_a_directory(tmp_path, text_file, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert main(["compare", *tiny_flags(text_file, target)]) == 2
    assert "exists and is not a directory" in one_line_error(capsys)


def test_out_is_required(capsys):
    assert main(["compare", "--preset", "tiny"]) == 2
    assert "the following arguments are required: --out" in one_line_error(capsys)

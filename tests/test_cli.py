"""The `bdh` command line, driven through main(argv): help, one-line errors, and every subcommand."""

import io
import json
import math
import runpy
import sys

import pytest

from bdh import registry
from bdh.cli import COMMANDS, TextStream, main
from bdh.data import ByteTokenizer
from bdh.train.args import field_help
from tests.helpers import one_line_error, tiny_args, write_text


def _text(path, lines=300):
    return write_text(path, lines)


def _train(data, out, *extra):
    return tiny_args(data, out, *extra, steps=2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny training run shared by the generate / eval / info tests."""
    root = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BDH_CACHE", str(root / "cache"))
        data = _text(root / "text.txt")
        assert main(_train(data, root / "run", "--max-iters", "3")) == 0
    return root / "run", data


def test_top_level_help_lists_the_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, command in COMMANDS.items():
        assert name in out and command.help in out


@pytest.mark.parametrize("command", list(COMMANDS))
def test_command_help(command, capsys):
    assert main([command, "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"usage: bdh {command}" in out
    if command == "train":
        for name, text in field_help().items():
            if name != "model_overrides":
                assert " ".join(text.split()) in out, name
        for flag in ("--batch-size", "--resume", "--overwrite", "--config", "--stream",
                     "--model {" + ",".join(registry.names()) + "}"):
            assert flag in out
    elif command in ("compare", "sweep", "merge", "merging"):
        assert "--out" in out
    elif command == "bench":
        assert "train_step" in out and "sparse_decode" in out
    else:
        assert "--ckpt" in out


def test_module_entry_point(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bdh", "--version"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("bdh", run_name="__main__")
    assert exit_.value.code == 0 and "bdh" in capsys.readouterr().out


BAD_TRAIN = {
    "zero batch": ["--batch-size", "0"],
    "negative block": ["--block-size", "-4"],
    "not an int": ["--max-iters", "many"],
    "unknown option": ["--learning-rate", "1"],
    "bad choice": ["--decay", "exponential"],
    "negative lr": ["--lr", "-1"],
    "unknown preset": ["--preset", "huge"],
    "bad model arg": ["--model-arg", "n_head=3"],
    "unknown model field": ["--model-arg", "wings=2"],
    "model arg syntax": ["--model-arg", "dropout"],
    "unknown tokenizer": ["--tokenizer", "morse"],
    "block longer than val": ["--block-size", "4000"],
    "fp16 on cpu": ["--dtype", "float16"],
    "empty sample prompt": ["--sample-tokens", "5", "--sample-prompt", ""],
    "missing config": ["--config", "nope.yaml"],
    "resume nothing": ["--resume", "no-such-run"],
}


@pytest.mark.parametrize("extra", list(BAD_TRAIN.values()), ids=list(BAD_TRAIN))
def test_bad_train_input_is_one_line_and_writes_nothing(extra, tmp_path, capsys):
    data = _text(tmp_path / "text.txt")
    out = tmp_path / "out"
    assert main(_train(data, out, *extra)) == 2
    one_line_error(capsys)
    assert not out.exists()


@pytest.mark.parametrize("content", [b"", b"   \n\n", b"\x00\x01\x02binary\x00" * 50], ids=["empty", "blank", "binary"])
def test_bad_corpus_is_one_line_and_writes_nothing(content, tmp_path, capsys):
    data = tmp_path / "corpus.txt"
    data.write_bytes(content)
    assert main(_train(data, tmp_path / "out")) == 2
    one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_missing_data_and_bad_yaml(tmp_path, capsys):
    assert main(_train(tmp_path / "missing.txt", tmp_path / "out")) == 2
    assert "missing.txt" in one_line_error(capsys)
    config = tmp_path / "c.yaml"
    config.write_text("batch_size: [1, 2\n")
    assert main(_train(_text(tmp_path / "t.txt"), tmp_path / "out", "--config", str(config))) == 2
    assert "c.yaml" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_no_command_is_an_error(capsys):
    assert main([]) == 2
    assert "command is required" in one_line_error(capsys)


def test_existing_run_is_not_overwritten(tmp_path, capsys):
    data = _text(tmp_path / "text.txt")
    out = tmp_path / "run"
    assert main(_train(data, out)) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(_train(data, out)) == 2
    assert "--resume" in one_line_error(capsys)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert main(_train(data, out, "--overwrite", "--max-iters", "1")) == 0
    assert (out / "latest").read_text().strip() == "checkpoints/step-0000001"
    assert not (out / "checkpoints" / "step-0000002").exists()


def test_generate_streams_text(trained, capsys):
    run, _ = trained
    argv = ["generate", "--ckpt", str(run), "--prompt", "The king", "--max-new-tokens", "20", "--seed", "3",
            "--top-k", "20", "--top-p", "0.9", "--temperature", "0.8", "--device", "cpu"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert first.startswith("The king") and len(first.encode("utf-8", "replace")) > len("The king")
    assert main(argv) == 0
    assert capsys.readouterr().out == first  # same seed, same text
    assert main(argv + ["--no-echo"]) == 0
    assert capsys.readouterr().out == first[len("The king"):]


def test_generate_reads_prompt_from_stdin(trained, capsys, monkeypatch):
    run, _ = trained
    monkeypatch.setattr(sys, "stdin", io.StringIO("Thou art"))
    assert main(["generate", "--ckpt", str(run), "--prompt", "-", "--max-new-tokens", "3", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("Thou art")


@pytest.mark.parametrize("extra", [["--prompt", ""], ["--temperature", "-1"], ["--top-k", "0"], ["--top-p", "1.5"],
                                   ["--max-new-tokens", "-2"]])
def test_generate_bad_input(trained, capsys, extra):
    run, _ = trained
    assert main(["generate", "--ckpt", str(run), "--device", "cpu", *extra]) == 2
    one_line_error(capsys)


def test_eval_on_validation_split_and_on_a_file(trained, capsys):
    run, data = trained
    assert main(["eval", "--ckpt", str(run), "--json", "--device", "cpu"]) == 0
    val = json.loads(capsys.readouterr().out)
    assert "validation split" in val["data"] and math.isfinite(val["loss"])
    assert val["bpb"] == pytest.approx(val["loss"] / math.log(2))  # bytes: one token per byte
    assert val["ppl"] == pytest.approx(math.exp(val["loss"]))
    assert main(["eval", "--ckpt", str(run), "--data", str(data), "--max-batches", "2", "--device", "cpu"]) == 0
    assert "bits/byte" in capsys.readouterr().out
    assert main(["eval", "--ckpt", str(run), "--block-size", "0"]) == 2
    one_line_error(capsys)


def test_info(trained, capsys):
    run, _ = trained
    assert main(["info", "--ckpt", str(run)]) == 0
    out = capsys.readouterr().out
    assert "parameters: 65,536 (49,152 without embeddings)" in out and "step: 3" in out
    assert main(["info", "--ckpt", str(run), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["training"]["step"] == 3 and info["config"]["n_embd"] == 32


@pytest.mark.parametrize("command", ["generate", "eval", "info"])
def test_missing_checkpoint(command, tmp_path, capsys):
    assert main([command, "--ckpt", str(tmp_path / "nothing")]) == 2
    assert "nothing" in one_line_error(capsys)


def test_text_stream_holds_back_split_utf8_characters():
    text = "Fair é, ✓ and 🐉!"
    out = io.StringIO()
    stream = TextStream(ByteTokenizer(), out)
    seen = []
    for byte in text.encode("utf-8"):
        stream.push(byte)
        seen.append(out.getvalue())
    stream.close()
    assert out.getvalue() == text
    assert all("\ufffd" not in s for s in seen)


def test_generate_from_a_bare_saved_model(tmp_path, capsys):
    from bdh import BDH, BDHConfig, save_model

    save_model(BDH(BDHConfig.from_name("tiny")), tmp_path / "model")
    assert main(["generate", "--ckpt", str(tmp_path / "model"), "--prompt", "a", "--max-new-tokens", "4",
                 "--device", "cpu", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("a")
    assert main(["info", "--ckpt", str(tmp_path / "model")]) == 0
    assert "no trainer_state.json" in capsys.readouterr().out
    assert main(["eval", "--ckpt", str(tmp_path / "model")]) == 2
    assert "--data" in one_line_error(capsys)


def test_bench_rejects_an_unknown_benchmark(capsys):
    assert main(["bench", "nope"]) == 2
    assert "invalid choice" in capsys.readouterr().err

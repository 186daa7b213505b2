"""Bad input, for every subcommand: one line `bdh: error: ...` on stderr, exit status 2, and nothing
written. docs/reliability.md lists the categories; each case below is named `<command>-<category>-...`.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import pytest

from bdh.cli import main

from tests.helpers import tiny_args, write_text


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A trained tiny run and every kind of bad file, made once for the module."""
    root = tmp_path_factory.mktemp("inputs")
    p = {"root": root, "text": write_text(root / "text.txt"), "run": root / "run"}
    import os
    old = os.environ.get("BDH_CACHE")
    os.environ["BDH_CACHE"] = str(root / "cache")
    try:
        assert main(tiny_args(p["text"], p["run"], steps=2)) == 0
    finally:
        if old is None:
            del os.environ["BDH_CACHE"]
        else:
            os.environ["BDH_CACHE"] = old
    p["binary"] = root / "binary.bin"
    p["binary"].write_bytes(bytes(range(256)) * 8)
    p["empty"] = root / "empty.txt"
    p["empty"].write_text("")
    p["not_utf8"] = root / "latin1.txt"
    p["not_utf8"].write_bytes("caf\xe9 na\xefve ".encode("latin-1") * 200)
    p["yaml_list"] = root / "list.yaml"
    p["yaml_list"].write_text("- max_iters\n- 3\n")
    p["yaml_typo"] = root / "typo.yaml"
    p["yaml_typo"].write_text("max_iter: 3\n")
    p["yaml_model_typo"] = root / "model_typo.yaml"
    p["yaml_model_typo"].write_text("model:\n  n_layr: 2\n")
    p["yaml_bad"] = root / "bad.yaml"
    p["yaml_bad"].write_text("max_iters: [1,\n")
    p["folder"] = root / "folder"
    p["folder"].mkdir()
    step = p["run"] / "checkpoints" / "step-0000002"
    p["ckpt"] = step
    # a checkpoint of another model type, and checkpoints of a damaged layout
    for name, change in (("other_type", lambda d: {**d, "model_type": "llama"}), ("list_config", lambda d: [d])):
        target = root / name
        target.mkdir()
        for f in ("config.json", "model.safetensors", "tokenizer.json"):
            if (step / f).exists():
                (target / f).write_bytes((step / f).read_bytes())
        (target / "config.json").write_text(json.dumps(change(json.loads((step / "config.json").read_text()))))
        p[name] = target
    p["damaged"] = root / "damaged"  # a bdh checkpoint whose weights changed after it was written
    shutil.copytree(step, p["damaged"])
    weights = bytearray((p["damaged"] / "model.safetensors").read_bytes())
    weights[-1] ^= 1
    (p["damaged"] / "model.safetensors").write_bytes(bytes(weights))
    p["no_weights"] = root / "no_weights"
    p["no_weights"].mkdir()
    (p["no_weights"] / "config.json").write_bytes((step / "config.json").read_bytes())
    # a GPT checkpoint: fine for generate and eval, not for inspect (BDH only)
    from bdh import save_model
    from bdh.baselines.gpt import GPT, GPTConfig
    save_model(GPT(GPTConfig.from_name("tiny")), root / "gpt")
    p["gpt"] = root / "gpt"
    p["data_dir"] = root / "data_dir"
    p["data_dir"].mkdir()
    write_text(p["data_dir"] / "a.txt")
    return p


def T(p, *extra):
    """`bdh train` of the tiny preset with a fresh --out inside the case's directory."""
    return ["train", "--preset", "tiny", "--data", str(p["text"]), "--out", str(p["out"] / "run"), "--batch-size",
            "2", "--block-size", "16", "--max-iters", "2", "--sample-tokens", "0", "--device", "cpu", *extra]


def G(p, *extra):
    return ["generate", "--ckpt", str(p["run"]), "--max-new-tokens", "4", "--device", "cpu", *extra]


def E(p, *extra):
    return ["eval", "--ckpt", str(p["run"]), "--device", "cpu", *extra]


def I(p, *extra, text=None):
    return ["inspect", "--ckpt", str(p["run"]), "--text", str(text or p["text"]), "--out", str(p["out"] / "report"),
            "--device", "cpu", "--quiet", "--no-graph", "--no-concepts", *extra]


def X(command, p, *extra):
    """compare / sweep with the tiny options."""
    base = [command, "--preset", "tiny", "--data", str(p["text"]), "--out", str(p["out"] / "exp"), "--batch-size",
            "2", "--block-size", "16", "--max-iters", "2", "--sample-tokens", "0", "--device", "cpu"]
    if command == "sweep":
        base += ["--sizes", "1,2"]
    return base + list(extra)


# (case id, argv builder, needle the error line must contain, stdin bytes or None)
CASES = [
    # train
    ("train-missing-data", lambda p: T(p, "--data", str(p["root"] / "nope.txt")), "nope.txt", None),
    ("train-missing-config", lambda p: T(p, "--config", str(p["root"] / "nope.yaml")), "nope.yaml", None),
    ("train-unreadable-config-is-a-folder", lambda p: T(p, "--config", str(p["folder"])), "folder", None),
    ("train-binary-data", lambda p: T(p, "--data", str(p["binary"])), "binary", None),
    ("train-binary-config", lambda p: T(p, "--config", str(p["binary"])), "binary.bin", None),
    ("train-empty-data", lambda p: T(p, "--data", str(p["empty"])), "empty", None),
    ("train-empty-config", lambda p: T(p, "--config", str(p["empty"])), "mapping", None),
    ("train-not-utf8-data", lambda p: T(p, "--data", str(p["not_utf8"])), "UTF-8", None),
    ("train-zero-batch", lambda p: T(p, "--batch-size", "0"), "batch_size", None),
    ("train-negative-iters", lambda p: T(p, "--max-iters", "-3"), "max_iters", None),
    ("train-non-numeric-lr", lambda p: T(p, "--lr", "fast"), "fast", None),
    ("train-nan-lr", lambda p: T(p, "--lr", "nan"), "lr", None),
    ("train-inf-lr", lambda p: T(p, "--lr", "inf"), "lr", None),
    ("train-huge-block", lambda p: T(p, "--block-size", "1000000000000"), "block", None),
    ("train-huge-model", lambda p: T(p, "--model-arg", "n_embd=10000000"), "", None),
    ("train-unknown-option", lambda p: T(p, "--max-iter", "3"), "--max-iter", None),
    ("train-misspelled-model-arg", lambda p: T(p, "--model-arg", "n_layr=2"), "n_layr", None),
    ("train-misspelled-yaml-key", lambda p: T(p, "--config", str(p["yaml_typo"])), "max_iter", None),
    ("train-misspelled-yaml-model-key", lambda p: T(p, "--config", str(p["yaml_model_typo"])), "n_layr", None),
    ("train-yaml-not-mapping", lambda p: T(p, "--config", str(p["yaml_list"])), "mapping", None),
    ("train-yaml-invalid", lambda p: T(p, "--config", str(p["yaml_bad"])), "YAML", None),
    ("train-resume-not-a-training-checkpoint", lambda p: T(p, "--resume", str(p["gpt"])), "trainer_state.json", None),
    ("train-resume-damaged-layout", lambda p: T(p, "--resume", str(p["no_weights"])), "", None),
    ("train-out-inside-data", lambda p: T(p, "--data", str(p["data_dir"]), "--out", str(p["data_dir"] / "run")),
     "inside", None),
    ("train-out-is-a-file", lambda p: T(p, "--out", str(p["text"])), "not a directory", None),
    # generate
    ("generate-missing-ckpt", lambda p: G(p, "--ckpt", str(p["root"] / "nope")), "does not exist", None),
    ("generate-binary-ckpt", lambda p: G(p, "--ckpt", str(p["binary"])), "binary.bin", None),
    ("generate-empty-ckpt-folder", lambda p: G(p, "--ckpt", str(p["folder"])), "no checkpoint", None),
    ("generate-other-model-type", lambda p: G(p, "--ckpt", str(p["other_type"])), "llama", None),
    ("generate-damaged-layout-config", lambda p: G(p, "--ckpt", str(p["list_config"])), "JSON object", None),
    ("generate-damaged-layout-weights", lambda p: G(p, "--ckpt", str(p["no_weights"])), "model.safetensors", None),
    ("generate-negative-tokens", lambda p: G(p, "--max-new-tokens", "-1"), "max-new-tokens", None),
    ("generate-non-numeric-tokens", lambda p: G(p, "--max-new-tokens", "many"), "many", None),
    ("generate-nan-temperature", lambda p: G(p, "--temperature", "nan"), "temperature", None),
    ("generate-zero-top-k", lambda p: G(p, "--top-k", "0"), "top-k", None),
    ("generate-nan-top-p", lambda p: G(p, "--top-p", "nan"), "top-p", None),
    ("generate-huge-tokens", lambda p: G(p, "--max-new-tokens", "10000000000000"), "max-new-tokens", None),
    ("generate-unknown-option", lambda p: G(p, "--temprature", "1"), "--temprature", None),
    ("generate-empty-prompt", lambda p: G(p, "--prompt", ""), "empty", None),
    ("generate-prompt-not-utf8", lambda p: G(p, "--prompt", "-"), "UTF-8", b"caf\xe9\xff\xfe"),
    ("generate-prompt-too-long", lambda p: G(p, "--ckpt", str(p["gpt"]), "--prompt", "x" * 5000), "positions", None),
    # eval
    ("eval-missing-ckpt", lambda p: E(p, "--ckpt", str(p["root"] / "nope")), "does not exist", None),
    ("eval-missing-data", lambda p: E(p, "--data", str(p["root"] / "nope.txt")), "nope.txt", None),
    ("eval-binary-data", lambda p: E(p, "--data", str(p["binary"])), "binary", None),
    ("eval-empty-data", lambda p: E(p, "--data", str(p["empty"])), "empty", None),
    ("eval-zero-batch", lambda p: E(p, "--batch-size", "0"), "batch-size", None),
    ("eval-negative-block", lambda p: E(p, "--block-size", "-5"), "block-size", None),
    ("eval-non-numeric-batches", lambda p: E(p, "--max-batches", "all"), "all", None),
    ("eval-huge-block", lambda p: E(p, "--block-size", "1000000000000"), "block", None),
    ("eval-unknown-option", lambda p: E(p, "--batchsize", "2"), "--batchsize", None),
    ("eval-other-model-type", lambda p: E(p, "--ckpt", str(p["other_type"])), "llama", None),
    ("eval-damaged-layout", lambda p: E(p, "--ckpt", str(p["list_config"])), "JSON object", None),
    ("eval-damaged-checkpoint", lambda p: E(p, "--ckpt", str(p["damaged"])), "sha256", None),
    # info
    ("info-missing-ckpt", lambda p: ["info", "--ckpt", str(p["root"] / "nope")], "does not exist", None),
    ("info-binary-ckpt", lambda p: ["info", "--ckpt", str(p["binary"])], "binary.bin", None),
    ("info-other-model-type", lambda p: ["info", "--ckpt", str(p["other_type"])], "llama", None),
    ("info-damaged-layout", lambda p: ["info", "--ckpt", str(p["list_config"])], "JSON object", None),
    ("info-unknown-option", lambda p: ["info", "--ckpt", str(p["run"]), "--verbose"], "--verbose", None),
    # inspect
    ("inspect-missing-text", lambda p: I(p, text=p["root"] / "nope.txt"), "nope.txt", None),
    ("inspect-binary-text", lambda p: I(p, text=p["binary"]), "binary", None),
    ("inspect-empty-text", lambda p: I(p, text=p["empty"]), "empty", None),
    ("inspect-missing-ckpt", lambda p: I(p, "--ckpt", str(p["root"] / "nope")), "does not exist", None),
    ("inspect-gpt-ckpt", lambda p: I(p, "--ckpt", str(p["gpt"])), "BDH only", None),
    ("inspect-zero-max-tokens", lambda p: I(p, "--max-tokens", "0"), "max-tokens", None),
    ("inspect-negative-top-k", lambda p: I(p, "--top-k", "-1"), "top-k", None),
    ("inspect-non-numeric-chunk", lambda p: I(p, "--chunk-len", "big"), "big", None),
    ("inspect-nan-betas", lambda p: I(p, "--betas", "nan"), "betas", None),
    ("inspect-unknown-option", lambda p: I(p, "--layer", "1"), "--layer", None),
    ("inspect-out-is-a-file", lambda p: I(p, "--out", str(p["text"])), "not a directory", None),
    ("inspect-out-foreign-dir", lambda p: I(p, "--out", str(p["data_dir"])), "did not write", None),
    ("inspect-empty-concept-file", lambda p: [a for a in I(p, "--concept", str(p["empty"]), "--control", str(p["text"])) if a != "--no-concepts"],
     "", None),
    # compare and sweep
    ("compare-missing-data", lambda p: X("compare", p, "--data", str(p["root"] / "nope.txt")), "nope.txt", None),
    ("compare-zero-batch", lambda p: X("compare", p, "--batch-size", "0"), "batch_size", None),
    ("compare-nan-lr", lambda p: X("compare", p, "--lr", "nan"), "lr", None),
    ("compare-misspelled-gpt-arg", lambda p: X("compare", p, "--gpt-arg", "n_layr=2"), "n_layr", None),
    ("compare-yaml-not-mapping", lambda p: X("compare", p, "--config", str(p["yaml_list"])), "mapping", None),
    ("compare-out-inside-data", lambda p: X("compare", p, "--data", str(p["data_dir"]), "--out",
                                            str(p["data_dir"] / "exp")), "inside", None),
    ("sweep-non-numeric-sizes", lambda p: X("sweep", p, "--sizes", "1,two"), "two", None),
    ("sweep-zero-size", lambda p: X("sweep", p, "--sizes", "0,1"), "0", None),
    ("sweep-unknown-model", lambda p: X("sweep", p, "--models", "bdh,llama"), "llama", None),
    ("sweep-misspelled-yaml-key", lambda p: X("sweep", p, "--config", str(p["yaml_typo"])), "max_iter", None),
    # bench
    ("bench-unknown-benchmark", lambda p: ["bench", "speed"], "speed", None),
    # no command, unknown command
    ("cli-no-command", lambda p: [], "command", None),
    ("cli-unknown-command", lambda p: ["trian"], "trian", None),
]


def snapshot(root: Path) -> dict[str, int]:
    return {str(q.relative_to(root)): q.stat().st_size for q in sorted(root.rglob("*"))
            if "cache" not in q.relative_to(root).parts}


@pytest.mark.parametrize("case, build, needle, stdin", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(inputs, tmp_path, monkeypatch, capsys, case, build, needle,
                                                         stdin):
    p = {**inputs, "out": tmp_path / "out"}
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    before_inputs, before_out = snapshot(inputs["root"]), snapshot(tmp_path)
    status = main(build(p))
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert status == 2, (status, captured.err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("bdh: error: "), captured.err[-2000:]
    assert needle.lower() in lines[0].lower(), lines[0]
    assert snapshot(inputs["root"]) == before_inputs  # nothing written among the inputs
    assert snapshot(tmp_path) == before_out  # and no output started

"""`bdh inspect`: the report files, their keys, and the errors a user can make."""

import json
import re

import pytest
import torch

from bdh import BDH, BDHConfig, save_model
from bdh.data import make_tokenizer
from bdh.errors import UserError
from bdh.cli import build_parser, cmd_inspect, main

TEXT = ("The dragon hatchling reads a text one token at a time. Its neurons fire sparsely, and the synapses "
        "between neurons that fire together grow stronger. Money in the bank, rain on the roof. ") * 3


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = BDH(BDHConfig.from_name("tiny"))
    with torch.no_grad():
        for p in (model.encoder, model.encoder_v, model.decoder):
            p.normal_(std=0.1)
    save_model(model, directory)
    make_tokenizer("bytes").save(directory)
    text = directory.parent / "text.txt"
    text.write_text(TEXT)
    return directory, text


def parse(*argv):
    return build_parser().parse_args(["inspect", *argv])


run_inspect = cmd_inspect


FAST = ("--max-edges", "2000", "--n-betas", "3", "--seeds", "1", "--candidates", "300", "--quiet")


def test_inspect_writes_a_readable_report(checkpoint, tmp_path, capsys):
    ckpt, text = checkpoint
    out = tmp_path / "report"
    assert run_inspect(parse("--ckpt", str(ckpt), "--text", str(text), "--out", str(out), *FAST)) == 0
    assert "report.html" in capsys.readouterr().out
    raw = (out / "report.json").read_text()
    assert "NaN" not in raw and "Infinity" not in raw
    report = json.loads(raw)
    assert {"schema", "model", "text", "sparsity", "synapses", "concepts", "graph", "figures", "timing_s"} <= set(report)
    assert report["text"]["n_tokens"] == len(TEXT.encode())
    assert len(report["sparsity"]["y_nonzero"]) == 2 and len(report["sparsity"]["y_nonzero"][0]) == 2
    syn = report["synapses"]
    assert syn["layers"] == [1] and syn["top"][0]["value"] >= syn["top"][-1]["value"]
    assert (out / syn["file"]).is_file()
    traces = syn["traces"]
    assert {t["why"] for t in traces} == {"strongest", "concept"}
    assert all(len(t["values"]) == report["text"]["n_tokens"] for t in traces)
    assert all("[" in d["context"] for t in traces for d in t["driving_tokens"])
    concepts = report["concepts"]
    assert concepts["concept_name"] == "money_en" and concepts["n_concept"] == 50
    assert concepts["transfer"]["concept_name"] == "money_es"
    assert {"U", "p", "p_bonferroni", "rank_biserial", "drivers", "transfer"} <= set(concepts["top"][0])
    graph = report["graph"]
    assert [r["edges_directed"] for r in graph["sweep"]] == sorted(r["edges_directed"] for r in graph["sweep"])
    assert graph["degrees"]["out"]["fit"]["ok"] in (True, False)
    assert len(graph["head_blocks"]["heads"]) == 2
    expected = {"sparsity", "density", "traces", "synapse_degrees", "concepts", "modularity", "edges",
                "graph_degrees", "heads"}
    assert set(report["figures"]) == expected and report["sparsity"]["training"] is None
    html = (out / "report.html").read_text()
    referenced = set(re.findall(r"src='([^']+)'", html))
    assert referenced == {f["file"] for f in report["figures"].values()}
    for name in referenced:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for heading in ("Sparsity", "Synapses", "Concept synapses", "Neuron graph"):
        assert heading in html


def test_own_sets_chosen_synapses_and_skipped_sections(checkpoint, tmp_path):
    ckpt, text = checkpoint
    concept, control = tmp_path / "cats.txt", tmp_path / "dogs.txt"
    concept.write_text("the cat sat\na cat purrs\ncats nap\n")
    control.write_text("the dog ran\na dog barks\ndogs dig\n")
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "x_nonzero": 0.5 - s / 1000, "y_nonzero": 0.2 - s / 2000}) + "\n"
                               for s in range(0, 200, 20)))
    out = tmp_path / "r"
    run_inspect(parse("--ckpt", str(ckpt), "--text", str(text), "--out", str(out), "--concept", str(concept),
                      "--metrics", str(metrics),
                      "--control", str(control), "--trace", "1:0:3:4,1:1:5:5", "--no-graph", "--max-tokens", "50",
                      "--synapse-entries", "0", *FAST))
    report = json.loads((out / "report.json").read_text())
    assert report["text"] == {"path": str(text), "n_tokens": 50, "truncated": True, "chunk_len": 256}
    assert report["concepts"]["concept_name"] == "cats" and report["concepts"]["transfer"] is None
    assert [t["synapse"]["i"] for t in report["synapses"]["traces"]] == [3, 5]
    assert report["graph"] is None and "modularity" not in report["figures"]
    assert report["sparsity"]["training"]["step"][-1] == 180 and "training" in report["figures"]
    assert not (out / "synapses.safetensors").exists()


def test_user_errors_are_one_line_messages(checkpoint, tmp_path):
    ckpt, text = checkpoint
    base = ("--ckpt", str(ckpt), "--out", str(tmp_path / "o"), *FAST)
    with pytest.raises(UserError, match="no such text file"):
        run_inspect(parse("--text", str(tmp_path / "missing.txt"), *base))
    with pytest.raises(UserError, match="--concept and --control together"):
        run_inspect(parse("--text", str(text), "--concept", str(text), *base))
    with pytest.raises(UserError, match="no synapse 5:0:0:0"):
        run_inspect(parse("--text", str(text), "--trace", "5:0:0:0", *base))
    with pytest.raises(UserError, match="l runs from 1 to 1"):
        run_inspect(parse("--text", str(text), "--layers", "2", *base))
    with pytest.raises(UserError, match="LAYER:HEAD:I:J"):
        parse("--ckpt", "x", "--text", "y", "--out", "z", "--trace", "1:2:3")
    assert main(["inspect", "--ckpt", str(tmp_path / "none"), "--text", str(text), "--out", str(tmp_path / "o")]) == 2


def test_help_names_every_option(capsys):
    assert main(["inspect", "--help"]) == 0
    text = capsys.readouterr().out
    for option in ("--ckpt", "--text", "--out", "--concept", "--control", "--max-tokens", "--betas", "--layers",
                   "--trace", "--max-edges"):
        assert option in text

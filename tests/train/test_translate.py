"""The translation task: validation on each direction's target tokens, greedy translation, and the
whole pipeline data -> train -> translate -> fine-tune -> merge -> eval on a tiny config."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from bdh import BDH, BDHConfig
from bdh.cli import main
from bdh.data import ByteTokenizer
from bdh.data.parallel import tagged_text, tokenize_tagged
from bdh.generate import generate
from bdh.protocol import next_token_loss
from bdh.train import TrainConfig
from bdh.train.evaluate import _lane_batches, evaluate_tagged
from tests.helpers import metrics, one_line_error, tiny_flags

WORDS = {"en": "house dog cat big small red the water good day".split(),
         "es": "casa perro gato grande pequeño rojo el agua bueno día".split(),
         "fr": "maison chien chat grand petit rouge le eau bon jour".split()}


def write_pairs(path, a: str, b: str, n: int = 300, seed: int = 0):
    rng = random.Random(seed)
    rows = [f"{a}\t{b}"]
    for _ in range(n):
        ids = [rng.randrange(10) for _ in range(rng.randint(2, 5))]
        rows.append(" ".join(WORDS[a][i] for i in ids) + "\t" + " ".join(WORDS[b][i] for i in ids))
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def tagged(n: int = 12):
    pairs = [(" ".join(WORDS["en"][: 2 + i % 4]), " ".join(WORDS["es"][: 2 + i % 4])) for i in range(n)]
    return tokenize_tagged(tagged_text(pairs, ("en", "es"), seed=1), ByteTokenizer())


def test_target_loss_equals_masked_loss_of_one_pass():
    """One lane read in windows with the state carried == one forward over the whole stream, with every
    target but the direction's masked out (-1, ignored by next_token_loss)."""
    model = BDH(BDHConfig.from_name("tiny")).eval()
    data = tagged()
    result = evaluate_tagged(model, data, batch_size=1, block_size=16, max_batches=None, device="cpu",
                             token_byte_ratio=1.0)
    ids = torch.from_numpy(data.tokens.astype(np.int64))[None]
    roles = torch.from_numpy(data.roles.astype(np.int64))[None]
    with torch.no_grad():
        logits = model(ids[:, :-1]).logits
    y = ids[:, 1:]
    assert result.loss == pytest.approx(float(next_token_loss(logits, y)), rel=1e-5)
    for k, name in enumerate(data.directions):
        masked = torch.where(roles[:, 1:] == k, y, torch.full_like(y, -1))
        assert result.targets[name]["loss"] == pytest.approx(float(next_token_loss(logits, masked)), rel=1e-5)
        assert result.targets[name]["tokens"] == int((roles[:, 1:] == k).sum())


def test_lanes_start_at_pairs_and_cover_every_target_once():
    data = tagged(30)
    batches = list(_lane_batches(data.tokens, data.roles, data.pair_starts, 4, 8, None, "cpu"))
    assert (batches[0][0][:, 0] == ord("<")).all()
    assert batches[0][3] and not any(b[3] for b in batches[1:])
    scored = sum(int((b[1] >= 0).sum()) for b in batches)
    assert scored == len(data.tokens) - 4  # every token but the first of each lane is a target once


def test_generate_stops_when_every_row_hit_a_stop_token():
    model = BDH(BDHConfig.from_name("tiny")).eval()
    out = generate(model, torch.zeros(2, 3, dtype=torch.long), 20, temperature=0, stop=set(range(256)))
    assert out.shape == (2, 4)


def test_translate_task_streams_and_needs_pairs(tmp_path, capsys):
    assert TrainConfig(task="translate").stream is True
    assert main(["train", "--task", "translate", "--data", "shakespeare", "--out", str(tmp_path / "r")]) == 2
    one_line_error(capsys, "--task translate needs pairs")


def test_pipeline_data_train_translate_finetune_merge_eval(tmp_path, capsys):
    es, fr = write_pairs(tmp_path / "en-es.tsv", "en", "es"), write_pairs(tmp_path / "en-fr.tsv", "en", "fr", seed=1)
    base, tuned, merged = tmp_path / "base", tmp_path / "fr", tmp_path / "merged"
    flags = ["--task", "translate", "--block-size", "32", "--eval-iters", "2", "--sample-tokens", "8"]
    assert main(["train", *tiny_flags(es, base, *flags, steps=6, eval_interval=3)]) == 0
    record = metrics(base)[-1]
    assert {"val_target_loss[en->es]", "val_target_loss[es->en]"} <= set(record)
    assert json.loads((base / "train_config.json").read_text())["train"]["stream"] is True
    capsys.readouterr()

    assert main(["translate", "--ckpt", str(base), "--from", "en", "--to", "es", "the big dog",
                 "--max-new-tokens", "12"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1

    assert main(["train", *tiny_flags(fr, tuned, *flags, "--init-from", str(base), steps=4)]) == 0
    assert main(["merge", str(base), str(tuned), "--out", str(merged)]) == 0
    capsys.readouterr()
    for data in (fr, es):
        assert main(["eval", "--ckpt", str(merged), "--task", "translate", "--data", str(data), "--pairs", "2",
                     "--max-batches", "4", "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert set(report["directions"]) == {f"en->{data.stem[3:]}", f"{data.stem[3:]}->en"}
        for entry in report["directions"].values():
            assert entry["scored_pairs"] == 2 and 0 <= entry["chrf"] <= 100 and entry["target_loss"] > 0
    assert main(["generate", "--ckpt", str(merged), "--prompt", "<en> ", "--max-new-tokens", "5", "--seed", "0"]) == 0
    assert main(["info", "--ckpt", str(merged)]) == 0
    assert "mlp_internal_dim_multiplier: 32" in capsys.readouterr().out


@pytest.mark.parametrize("argv, needle", [(["--from", "e n", "--to", "es", "x"], "language 'e n'"),
                                          (["--from", "en", "--to", "es", " "], "nothing to translate")])
def test_translate_errors(tmp_path, capsys, argv, needle):
    from bdh.checkpoint import save_model

    save_model(BDH(BDHConfig.from_name("tiny")), tmp_path / "m")
    assert main(["translate", "--ckpt", str(tmp_path / "m"), *argv]) == 2
    one_line_error(capsys, needle)

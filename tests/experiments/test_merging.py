"""bdh merging: base -> two fine-tuned copies -> merge -> the table, on a tiny config; a second run reuses it all."""

from __future__ import annotations

from bdh.checkpoint import load_model
from bdh.experiments import runs
from bdh.experiments.merging import merging
from bdh.train import TrainConfig
from tests.experiments.helpers import Runs
from tests.train.test_translate import write_pairs


def test_merging_experiment_end_to_end_and_resumable(tmp_path, monkeypatch):
    fake = Runs()
    monkeypatch.setattr(runs, "run_in_child", fake)
    es, fr = write_pairs(tmp_path / "en-es.tsv", "en", "es"), write_pairs(tmp_path / "en-fr.tsv", "en", "fr", seed=1)
    de = tmp_path / "en-de.tsv"
    de.write_text(fr.read_text(encoding="utf-8").replace("en\tfr", "en\tde", 1), encoding="utf-8")
    cfg = TrainConfig(task="translate", preset="tiny", data=str(es), batch_size=2, block_size=32, max_iters=2,
                      eval_interval=0, eval_iters=1, ckpt_interval=0, sample_tokens=0, warmup_iters=1, device="cpu")
    out = tmp_path / "exp"
    lines = []
    data = merging(cfg, out, [str(fr), str(de)], pairs=1, eval_batches=1, say=lines.append)
    assert fake.names == ["base", "tune-" + str(fr).replace("/", "_"), "tune-" + str(de).replace("/", "_")]
    assert fake.specs[1]["config"]["init_from"] == str(out / "base")
    assert set(data["table"]) == {"base", *fake.names[1:], "merged"}
    assert set(data["table"]["merged"]) == {"en->es", "es->en", "en->fr", "fr->en", "en->de", "de->en"}
    assert load_model(out / "merged").config.neurons_per_head == 2 * load_model(out / "base").config.neurons_per_head
    report = (out / "merging.md").read_text()
    assert "| merged |" in report and (out / "merging.png").is_file()
    # run again: every run, the merge and every evaluation are reused
    lines.clear()
    merging(cfg, out, [str(fr), str(de)], pairs=1, eval_batches=1, say=lines.append)
    assert len(fake.specs) == 3 and not any("evaluating" in line for line in lines)

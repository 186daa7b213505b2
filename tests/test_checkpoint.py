"""Model directories: round trip, atomic replacement, clear errors for broken files."""

import pytest
import torch

from bdh import BDH, BDHConfig, UserError, load_model, save_model
from bdh.fileio import OUTPUT_MARKER
from bdh.rundir import MODEL_CONFIG_FILE as CONFIG_FILE, WEIGHTS_FILE


def test_round_trip_keeps_weights_frequencies_and_config(tmp_path):
    model = BDH(BDHConfig.from_name("tiny", decay="alibi", layout="eq8"))
    with torch.no_grad():
        model.freqs.mul_(1.5)  # frequencies are saved, not recomputed from N
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.config == model.config
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    idx = torch.randint(0, 256, (1, 7))
    assert torch.equal(model.eval()(idx).logits, loaded(idx).logits)


def test_failed_save_leaves_previous_model(tmp_path, monkeypatch):
    first = BDH(BDHConfig.from_name("tiny"))
    save_model(first, tmp_path / "m")
    import bdh.fileio as ckpt

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(RuntimeError):
        save_model(BDH(BDHConfig.from_name("tiny")), tmp_path / "m")
    assert torch.equal(load_model(tmp_path / "m").encoder, first.encoder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_truncated_weights_name_the_file(tmp_path):
    save_model(BDH(BDHConfig.from_name("tiny")), tmp_path / "m")
    weights = tmp_path / "m" / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(UserError, match=r"model.safetensors is truncated or corrupt"):
        load_model(tmp_path / "m")


def test_mismatched_config_names_the_tensor(tmp_path):
    save_model(BDH(BDHConfig.from_name("tiny")), tmp_path / "m")
    (tmp_path / "m" / OUTPUT_MARKER).unlink()  # a directory put together by hand: no manifest to check
    cfg = tmp_path / "m" / CONFIG_FILE
    cfg.write_text(cfg.read_text().replace('"n_embd": 32', '"n_embd": 64'))
    with pytest.raises(UserError, match="has shape"):
        load_model(tmp_path / "m")


def test_a_changed_file_fails_the_manifest(tmp_path):
    save_model(BDH(BDHConfig.from_name("tiny")), tmp_path / "m")
    cfg = tmp_path / "m" / CONFIG_FILE
    cfg.write_text(cfg.read_text().replace('"n_embd": 32', '"n_embd": 33'))  # same size, other bytes
    with pytest.raises(UserError, match="config.json is truncated or corrupt .sha256 mismatch"):
        load_model(tmp_path / "m")


def test_save_model_refuses_a_directory_with_a_foreign_file_and_leaves_it(tmp_path):
    target = tmp_path / "somedir"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    (tmp_path / "somedir.old").mkdir()
    (tmp_path / "somedir.old" / "keep.txt").write_text("also mine")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(UserError, match="holds files bdh did not write"):
        save_model(BDH(BDHConfig.from_name("tiny")), target)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert (target / "notes.txt").read_text() == "mine"
    assert (tmp_path / "somedir.old" / "keep.txt").read_text() == "also mine"


def test_save_model_replaces_its_own_output_but_not_a_file_added_to_it(tmp_path):
    target = tmp_path / "m"
    save_model(BDH(BDHConfig.from_name("tiny")), target)
    model = BDH(BDHConfig.from_name("tiny", n_layer=1))
    save_model(model, target)  # bdh's own directory: replaced
    assert load_model(target).config == model.config
    with pytest.raises(UserError, match="pass overwrite=True"):
        save_model(model, target, overwrite=False)
    (target / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="bdh did not write .e.g. notes.txt"):
        save_model(model, target)
    assert (target / "notes.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_no_fallback_to_an_old_sibling(tmp_path):
    save_model(BDH(BDHConfig.from_name("tiny")), tmp_path / "m.old")
    (tmp_path / "m").mkdir()
    with pytest.raises(UserError, match="no checkpoint at"):
        load_model(tmp_path / "m")


def test_missing_and_garbage(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / CONFIG_FILE).write_text("{not json")
    with pytest.raises(UserError, match="cannot read"):
        load_model(tmp_path / "d")

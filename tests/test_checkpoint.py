"""Model directories: round trip, atomic replacement, clear errors for broken files."""

import pytest
import torch

from bdh import BDH, BDHConfig, UserError, load_model, save_model
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
    cfg = tmp_path / "m" / CONFIG_FILE
    cfg.write_text(cfg.read_text().replace('"n_embd": 32', '"n_embd": 64'))
    with pytest.raises(UserError, match="has shape"):
        load_model(tmp_path / "m")


def test_missing_and_garbage(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / CONFIG_FILE).write_text("{not json")
    with pytest.raises(UserError, match="cannot read"):
        load_model(tmp_path / "d")

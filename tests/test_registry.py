"""The model registry, the protocol every family implements, and the one state protocol."""

import pytest
import torch

from bdh import LanguageModel, load_model, registry, save_model
from bdh.errors import UserError
from bdh.state import TensorState

FAMILIES = sorted(registry.FAMILIES)


def tiny(model_type):
    cls = registry.get(model_type)
    return cls(cls.config_class.from_name("tiny")).eval()


def test_registry_names_every_family_once():
    assert FAMILIES == ["bdh", "brillm", "gpt", "mpl"]
    assert all(registry.get(name).model_type == name for name in FAMILIES)
    with pytest.raises(UserError, match="unknown model type 'rnn'; choose one of: bdh, gpt, brillm, mpl"):
        registry.get("rnn")


@pytest.mark.parametrize("model_type", FAMILIES)
def test_every_family_implements_the_protocol(model_type, tmp_path):
    model = tiny(model_type)
    assert isinstance(model, LanguageModel)
    idx = torch.randint(0, 256, (2, 10))
    out = model(idx, targets=idx)
    assert out.logits.shape == (2, 10, 256) and out.loss.ndim == 0 and out.state.pos.tolist() == [10, 10]
    assert isinstance(model.init_state(2), TensorState) and model.init_state(2).batch_size == 2
    # decoding one token on top of a prefill gives the logits of the whole sequence's last position
    prefill = model(idx[:, :9])
    step = model.step(idx[:, 9:], prefill.state)
    assert torch.allclose(step.logits[:, 0], out.logits[:, 9], atol=1e-5)
    assert model.num_params() > model.num_params(embeddings=False) > 0
    assert model.max_positions in (None, model.config.max_positions)
    save_model(model, tmp_path / "m")
    again = load_model(tmp_path / "m")
    assert type(again) is type(model) and torch.equal(again(idx).logits, out.logits)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_states_share_one_protocol(model_type, tmp_path):
    model = tiny(model_type)
    state = model(torch.randint(0, 256, (3, 5))).state
    rows = state.select(torch.tensor([2, 0]))
    assert rows.batch_size == 2 and rows.pos.tolist() == [5, 5]
    joined = type(state).cat([state.select([0]), state.select([1, 2])])
    assert all(torch.equal(a, b) for a, b in zip(joined.state_dict().values(), state.state_dict().values()))
    state.save(tmp_path / "s.safetensors")
    loaded = type(state).load(tmp_path / "s.safetensors")
    assert state.state_dict().keys() == loaded.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), state.state_dict().values()))
    assert all(not t.requires_grad for t in state.detach().state_dict().values())

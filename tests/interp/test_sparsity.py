"""Sparsity of x and y over a text, and the cheap probe for the training loop."""

import torch

from bdh.interp import capture_activations, sparsity, sparsity_probe
from bdh.interp.sparsity import sparsity_history
from tests.interp.helpers import tiny_model


def test_sparsity_counts_match_the_captured_activations():
    model = tiny_model()
    ids = torch.randint(0, 256, (50,))
    acts = capture_activations(model, ids, ("x", "y"))
    result = sparsity(model, ids, chunk_len=16)
    L, nh = model.config.n_layer, model.config.n_head
    assert result["n_tokens"] == 50
    for site in ("x", "y"):
        assert len(result[f"{site}_nonzero"]) == L and len(result[f"{site}_nonzero"][0]) == nh
        for layer in range(L):
            expected = (acts[(site, layer)] > 0).float().mean(dim=(1, 2))  # nh
            torch.testing.assert_close(torch.tensor(result[f"{site}_nonzero"][layer], dtype=torch.float64), expected.double())
            per_token = (acts[(site, layer)] > 0).float().mean(dim=(0, 2))
            torch.testing.assert_close(torch.tensor(result[f"{site}_nonzero_by_token"][layer]), per_token)
    # y is gated by x, so it can never be denser
    assert all(y <= x for x, y in zip(result["x_nonzero_layer"], result["y_nonzero_layer"]))
    assert 0 < result["y_nonzero_mean"] < result["x_nonzero_mean"] < 1


def test_probe_is_a_cheap_plain_dict_and_restores_train_mode():
    model = tiny_model().train()
    idx = torch.randint(0, 256, (3, 24))
    probe = sparsity_probe(model, idx, per_layer=True)
    assert model.training
    assert set(probe) == {"x_nonzero", "y_nonzero", "x_nonzero_l0", "x_nonzero_l1", "y_nonzero_l0", "y_nonzero_l1"}
    assert all(isinstance(v, float) and 0 <= v <= 1 for v in probe.values())
    assert abs(probe["y_nonzero"] - (probe["y_nonzero_l0"] + probe["y_nonzero_l1"]) / 2) < 1e-9
    model.eval()
    with torch.no_grad():
        from bdh.interp import ActivationCapture

        with ActivationCapture(model, ("y",)) as cap:
            model(idx)
    expected = sum(float((cap.get("y", l) > 0).float().mean()) for l in range(2)) / 2
    assert abs(sparsity_probe(model, idx)["y_nonzero"] - expected) < 1e-6
    assert set(sparsity_probe(model, idx)) == {"x_nonzero", "y_nonzero"}


def test_history_reads_the_probe_records_of_metrics_jsonl(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 10, "loss": 3.0, "x_nonzero": 0.5, "y_nonzero": 0.2}\n'
                    '{"step": 15, "val_loss": 2.9}\n'
                    '{"step": 20, "loss": 2.5, "x_nonzero": 0.4, "y_nonzero": 0.1}\n'
                    '{"step": 30, "x_nonz')
    history = sparsity_history(path)
    assert history == {"file": str(path), "step": [10, 20], "x_nonzero": [0.5, 0.4], "y_nonzero": [0.2, 0.1]}
    assert sparsity_history(tmp_path / "none.jsonl") is None

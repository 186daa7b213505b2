"""Activation capture: hooks see exactly what the model computes, in every form of reading a text."""

import torch
import torch.nn.functional as F

from bdh.interp import ActivationCapture, batch_activations, capture_activations, stream_activations
from tests.interp.helpers import tiny_model
from tests.reference_bdh import reference_rope


def manual_activations(model, idx):
    """x, a, y of every layer, recomputed from the weights as the authors' forward computes them."""
    ln = lambda t: F.layer_norm(t, t.shape[-1:], eps=1e-5)  # noqa: E731
    nh, D, N = model.encoder.shape
    T = idx.shape[1]
    v = ln(model.embed(idx)).unsqueeze(1)  # B, 1, T, D
    phases = torch.arange(T, dtype=torch.float32).view(1, 1, T, 1) * model.freqs.view(1, nh, 1, N)
    out = {}
    for layer in range(model.config.n_layer):
        x = F.relu(v @ model.encoder)  # B, nh, T, N
        xr = reference_rope(phases, x)
        a = (xr @ xr.mT).tril(diagonal=-1) @ v  # B, nh, T, D
        y = F.relu(ln(a) @ model.encoder_v) * x
        z = y.transpose(1, 2).reshape(idx.shape[0], 1, T, nh * N) @ model.decoder
        v = ln(v + ln(z))
        out.update({("x", layer): x, ("a", layer): a, ("y", layer): y})
    return out


def test_capture_equals_the_spec_computation_per_layer_and_head():
    model = tiny_model()
    idx = torch.randint(0, 256, (2, 33))
    with torch.no_grad(), ActivationCapture(model, ("x", "a", "y")) as cap:
        model(idx)
        expected = manual_activations(model, idx)
    assert cap.keys() == sorted(expected)
    for key, value in expected.items():
        got = cap.get(*key)
        assert got.shape == value.shape
        assert ((got - value).abs().max() / value.abs().max()).item() < 1e-5, key


def test_capture_ends_on_exit_and_the_model_is_unchanged():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    T = 16
    assert model.engine(T).startswith("fused")
    with ActivationCapture(model, ("x", "a", "y")):
        assert model._capture is not None and not model.engine(T).startswith("fused")
    assert model._capture is None and model.engine(T).startswith("fused")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_streamed_chunks_equal_one_pass_and_keep_only_what_was_asked():
    model = tiny_model()
    ids = torch.randint(0, 256, (45,))
    whole = capture_activations(model, ids, ("x", "y"), chunk_len=1000)
    chunks = list(stream_activations(model, ids, ("y",), layers=[1], heads=[1], chunk_len=7))
    assert [c.start for c in chunks] == list(range(0, 45, 7))
    assert all(set(c.acts) == {("y", 1)} for c in chunks)
    assert chunks[0].acts[("y", 1)].shape == (1, 7, model.config.neurons_per_head)
    joined = torch.cat([c.acts[("y", 1)] for c in chunks], dim=1)
    torch.testing.assert_close(joined, whole[("y", 1)][1:2], rtol=1e-4, atol=1e-5)


def test_padded_batches_match_single_sequences():
    model = tiny_model()
    seqs = [torch.randint(0, 256, (n,)).tolist() for n in (5, 12, 9)]
    first, lengths, acts = next(batch_activations(model, seqs, ("x", "y"), layers=[0, 1], batch_size=3))
    assert first == 0 and lengths == [5, 12, 9]
    for row, seq in enumerate(seqs):
        alone = capture_activations(model, seq, ("x", "y"))
        for key, value in alone.items():
            torch.testing.assert_close(acts[key][row, :, :len(seq)], value, rtol=1e-4, atol=1e-5)


def test_capture_counts_layers_again_after_each_forward_and_leaves_train_mode():
    model = tiny_model().train()
    ids = torch.randint(0, 256, (20,))
    list(stream_activations(model, ids, ("x",), chunk_len=6))
    assert model.training  # the stream ran in eval mode and gave the mode back
    with torch.no_grad(), ActivationCapture(model, ("x",), layers=[1]) as cap:
        model.eval()
        model(ids[None])
        model(ids[None])
    assert cap.keys() == [("x", 1)] and cap.get("x", 1).shape[2] == 40

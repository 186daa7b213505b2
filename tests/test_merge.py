"""bdh.merge: two BDH models become one by concatenating neurons head by head (paper Section 7.1).

Exact properties of the construction, each checked on the model's own forward pass:
- the merged tensors are the parents' blocks (D_x, D_y, E per head, freqs) and the averaged embedding/read-out;
- the first layer's neurons are the parents' neurons side by side, and its attention read-out is the sum
  of the parents' read-outs (a head's attention sums over all of its neurons);
- a partner whose neurons never fire (D_x = 0) leaves the model unchanged;
- the order of the parents does not matter (neurons of a head can be permuted).
"""

from __future__ import annotations

import pytest
import torch

from bdh import BDH, BDHConfig
from bdh.baselines.gpt import GPT, GPTConfig
from bdh.checkpoint import load_model, save_model
from bdh.data import ByteTokenizer
from bdh.errors import UserError
from bdh.merge import merge_models
from bdh.rundir import load_checkpoint_tokenizer
from tests.helpers import one_line_error


def tiny(mult: int = 16, **kw) -> BDH:
    config = BDHConfig.from_name("tiny", mlp_internal_dim_multiplier=mult, attn_impl="naive", fused=False, **kw)
    return BDH(config).eval()


def same_embeddings(a: BDH, b: BDH) -> None:
    with torch.no_grad():
        b.embed.weight.copy_(a.embed.weight)
        b.lm_head.copy_(a.lm_head)


def idx(T: int = 24, B: int = 2) -> torch.Tensor:
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(1))


def test_merged_tensors_are_the_parents_blocks():
    a, b = tiny(16), tiny(8)
    m = merge_models(a, b)
    nh, N1, N2, D = 2, a.config.neurons_per_head, b.config.neurons_per_head, a.config.n_embd
    assert m.config.neurons_per_head == N1 + N2 and m.config.mlp_internal_dim_multiplier == 24
    for name in ("encoder", "encoder_v"):
        merged, pa, pb = (getattr(x, name) for x in (m, a, b))
        assert torch.equal(merged[:, :, :N1], pa) and torch.equal(merged[:, :, N1:], pb)
    E = m.decoder.view(nh, N1 + N2, D)
    assert torch.equal(E[:, :N1], a.decoder.view(nh, N1, D)) and torch.equal(E[:, N1:], b.decoder.view(nh, N2, D))
    assert torch.equal(m.freqs, torch.cat([a.freqs, b.freqs], dim=1))
    assert torch.allclose(m.embed.weight, (a.embed.weight + b.embed.weight) / 2)
    assert torch.allclose(m.lm_head, (a.lm_head + b.lm_head) / 2)
    assert m.num_params() == a.num_params() + b.num_params() - 2 * 256 * D


def capture(model: BDH, tokens: torch.Tensor, layer: int = 0) -> dict[str, torch.Tensor]:
    seen = {}
    with model.capture(lambda site, l, t: seen.setdefault(site, t.clone()) if l == layer else None):
        model(tokens)
    return seen


def test_first_layer_neurons_side_by_side_and_attention_sums():
    a, b = tiny(16), tiny(16)
    same_embeddings(a, b)
    m = merge_models(a, b)
    tokens = idx()
    ca, cb, cm = capture(a, tokens), capture(b, tokens), capture(m, tokens)
    assert torch.allclose(cm["x"], torch.cat([ca["x"], cb["x"]], dim=-1), atol=1e-6)
    assert torch.allclose(cm["a"], ca["a"] + cb["a"], atol=1e-5)


def test_partner_whose_neurons_never_fire_changes_nothing():
    a, b = tiny(16), tiny(8)
    same_embeddings(a, b)
    with torch.no_grad():
        b.encoder.zero_()  # D_x = 0: x_B = relu(v D_x) = 0, so B's neurons neither attend nor fire
    m = merge_models(a, b)
    tokens = idx()
    ref, out = a(tokens), m(tokens)
    assert torch.allclose(out.logits, ref.logits, atol=1e-5)
    # and token by token from the carried state (the decode path)
    sa, sm = a.init_state(2), m.init_state(2)
    for t in range(6):
        la = a.step(tokens[:, t:t + 1], sa).logits
        lm = m.step(tokens[:, t:t + 1], sm).logits
        assert torch.allclose(lm, la, atol=1e-5)


def test_parent_order_does_not_matter():
    a, b = tiny(16), tiny(8)
    tokens = idx()
    assert torch.allclose(merge_models(a, b)(tokens).logits, merge_models(b, a)(tokens).logits, atol=1e-5)


@pytest.mark.parametrize("field, value, needle", [("n_embd", 64, "n_embd"), ("n_head", 4, "n_head"),
                                                   ("vocab_size", 300, "vocab_size"), ("layernorm", False, "layernorm")])
def test_mismatch_named(field, value, needle):
    a = tiny(16)
    b = tiny(16, **{field: value})
    with pytest.raises(UserError, match=needle):
        merge_models(a, b)


def test_only_bdh_merges():
    gpt = GPT(GPTConfig.from_name(next(iter(GPTConfig.presets))))
    with pytest.raises(UserError, match="only BDH"):
        merge_models(tiny(), gpt)


def test_checkpoints_merge_and_load(tmp_path, capsys):
    from bdh.cli import main

    a, b = tiny(16), tiny(8)
    for model, name in ((a, "a"), (b, "b")):
        save_model(model, tmp_path / name)
        ByteTokenizer().save(tmp_path / name)
    assert main(["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "m")]) == 0
    loaded = load_model(tmp_path / "m")
    assert loaded.config.neurons_per_head == 256 + 128
    assert load_checkpoint_tokenizer(tmp_path / "m", 256).kind == "bytes"
    tokens = idx()
    assert torch.allclose(loaded(tokens).logits, merge_models(a, b)(tokens).logits, atol=1e-6)
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "m")]) == 2
    one_line_error(capsys, "--overwrite")
    foreign = tmp_path / "m3"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(foreign), "--overwrite"]) == 2
    one_line_error(capsys, "did not write")
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    save_model(tiny(16, n_embd=64), tmp_path / "c")
    assert main(["merge", str(tmp_path / "a"), str(tmp_path / "c"), "--out", str(tmp_path / "m2")]) == 2
    one_line_error(capsys, "n_embd: 32 != 64")

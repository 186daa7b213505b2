"""The GPT baseline: BDH's call contract, KV-cache equivalence, FIFO window, matching, files."""

import math

import pytest
import torch
import torch.nn.functional as F

from bdh.baselines import GPT, GPTConfig, KVCache, match_gpt_config, param_report
from bdh.checkpoint import load_model, save_model
from bdh.config import BDHConfig
from bdh.errors import UserError
from bdh.generate import generate
from bdh.model import BDH
from bdh.protocol import ModelOutput

V = 256


def make_model(**overrides):
    torch.manual_seed(0)
    return GPT(GPTConfig.from_name("tiny", **overrides)).eval()


def tokens(B, T, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def reference_forward(model, idx, window=0):
    """Plain-loop GPT: explicit scores, each query sees itself and at most `window` previous keys."""
    c = model.config
    B, T = idx.shape
    hd = c.head_size
    x = model.transformer.wte(idx)
    if c.pos_encoding == "learned":
        x = x + model.transformer.wpe(torch.arange(T))
    d = torch.arange(T)[:, None] - torch.arange(T)[None]  # T, T: query minus key position
    allowed = (d >= 0) & ((d <= window) if window else True)
    for block in model.transformer.h:
        h = block.ln_1(x)
        q, k, v = block.attn.c_attn(h).split(c.n_embd, dim=2)
        q, k, v = (t.view(B, T, c.n_head, hd).transpose(1, 2) for t in (q, k, v))  # B, nh, T, hd
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)  # B, nh, T, T
        if c.pos_encoding == "alibi":
            slopes = torch.tensor([2.0 ** (-8.0 * (i + 1) / c.n_head) for i in range(c.n_head)])
            scores = scores - slopes.view(-1, 1, 1) * d
        scores = scores.masked_fill(~allowed, float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, c.n_embd)
        x = x + block.attn.c_proj(y)
        x = x + block.mlp(block.ln_2(x))
    return model.transformer.ln_f(x) @ model.transformer.wte.weight.T  # B, T, V


def feed(model, idx, pieces, state=None):
    """Feed idx in pieces of the given sizes, carrying the cache: logits (B, T, V) and caches seen."""
    logits, states, start = [], [], 0
    for size in pieces:
        out = model(idx[:, start:start + size], state=state)
        logits.append(out.logits)
        state = out.state
        states.append(state)
        start += size
    assert start == idx.shape[1]
    return torch.cat(logits, dim=1), states


# the contract
def test_forward_shapes_and_loss():
    model = make_model()
    idx, targets = tokens(2, 12), tokens(2, 12, seed=2)
    out = model(idx, targets=targets)
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (2, 12, V) and out.logits.dtype == torch.float32
    assert abs(out.loss.item() - math.log(V)) < 0.5  # near uniform at init
    assert isinstance(out.state, KVCache) and out.state.batch_size == 2 and out.state.size == 12
    assert out.state.k[0].shape == (2, 2, 12, 16) and out.state.pos.tolist() == [12, 12]
    assert model(idx).loss is None
    assert model(idx, return_state=False).state is None
    ignored = targets.clone()
    ignored[:, :5] = -1
    expected = F.cross_entropy(out.logits[:, 5:].reshape(-1, V), targets[:, 5:].reshape(-1))
    torch.testing.assert_close(model(idx, targets=ignored).loss, expected)


@pytest.mark.parametrize("overrides", [{}, {"pos_encoding": "alibi"}, {"pos_encoding": "alibi", "kv_cache_size": 3}])
def test_causal(overrides):
    model = make_model(**overrides)
    idx = tokens(2, 16)
    changed = idx.clone()
    changed[:, 9] = (changed[:, 9] + 1) % V
    a, b = model(idx).logits, model(changed).logits
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=0)
    assert not torch.allclose(a[:, 9:], b[:, 9:])


@pytest.mark.parametrize("pos_encoding", ["learned", "alibi"])
@pytest.mark.parametrize("pieces", [[5] + [1] * 14, [5, 3, 1, 4, 2, 4]], ids=["one-by-one", "pieces"])
def test_cached_decode_equals_parallel(pos_encoding, pieces):
    model = make_model(pos_encoding=pos_encoding)
    idx = tokens(2, 19)
    parallel = model(idx).logits
    torch.testing.assert_close(parallel, reference_forward(model, idx), rtol=1e-5, atol=1e-5)
    cached, states = feed(model, idx, pieces)
    torch.testing.assert_close(cached, parallel, rtol=1e-5, atol=1e-5)
    assert states[-1].size == 19 and states[-1].pos.tolist() == [19, 19]


def test_empty_state_equals_no_state():
    model = make_model(pos_encoding="alibi")
    idx = tokens(3, 7)
    state = model.init_state(3)
    assert state.size == 0 and state.pos.tolist() == [0, 0, 0]
    torch.testing.assert_close(model(idx, state=state).logits, model(idx).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pos_encoding", ["alibi", "learned"])
def test_fifo_cache_is_a_sliding_window(pos_encoding):
    K = 4
    model = make_model(pos_encoding=pos_encoding, kv_cache_size=K)
    idx = tokens(2, 30)
    banded = reference_forward(model, idx, window=K)
    torch.testing.assert_close(model(idx).logits, banded, rtol=1e-5, atol=1e-5)
    cached, states = feed(model, idx, [3, 1, 6, 2, 1, 9, 1, 7])
    torch.testing.assert_close(cached, banded, rtol=1e-5, atol=1e-5)
    assert all(s.size <= K for s in states) and states[-1].size == K
    # the window really binds: an unlimited cache gives other logits
    assert not torch.allclose(make_model(pos_encoding=pos_encoding)(idx).logits, banded, atol=1e-3)


def test_alibi_cache_runs_past_block_size():
    model = make_model(pos_encoding="alibi", kv_cache_size=8, block_size=16)
    idx = tokens(1, 40)
    cached, states = feed(model, idx, [10] * 4)
    torch.testing.assert_close(cached, reference_forward(model, idx, window=8), rtol=1e-5, atol=1e-5)
    assert states[-1].pos.tolist() == [40]


def test_learned_positions_stop_at_block_size():
    model = make_model()  # tiny: block_size 64
    with pytest.raises(UserError, match="block_size"):
        model(tokens(1, 65))
    state = model(tokens(1, 60)).state
    with pytest.raises(UserError, match="block_size"):
        model(tokens(1, 5), state=state)


def test_carried_cache_training_step():
    model = make_model(pos_encoding="alibi", kv_cache_size=6).train()
    state = None
    for step in range(3):
        idx = tokens(2, 8, seed=step)
        out = model(idx, targets=tokens(2, 8, seed=10 + step), state=state)
        out.loss.backward()
        state = out.state.detach()
        assert math.isfinite(out.loss.item()) and state.size == 6
    assert model.transformer.wte.weight.grad is not None


def test_bfloat16_autocast_keeps_float32_logits():
    model = make_model(compute_dtype="bfloat16")
    out = model(tokens(1, 6), targets=tokens(1, 6, seed=2))
    assert out.logits.dtype == torch.float32 and math.isfinite(out.loss.item())


# states of several sequences
@pytest.mark.parametrize("overrides", [{}, {"pos_encoding": "alibi"}, {"pos_encoding": "alibi", "kv_cache_size": 5}])
def test_ragged_generation_matches_each_prompt_alone(overrides):
    model = make_model(**overrides)
    prompts = [tokens(1, 3, seed=3)[0], tokens(1, 9, seed=4)[0], tokens(1, 1, seed=5)[0]]
    together = generate(model, prompts, 8, top_k=1)
    for prompt, row in zip(prompts, together):
        alone = generate(model, prompt[None], 8, top_k=1)[0]
        assert row.tolist() == alone.tolist()
    assert [len(r) for r in together] == [11, 17, 9]
    assert generate(model, prompts[1][None], 4, top_k=1).shape == (1, 13)


def test_cat_of_different_lengths_continues_each_sequence():
    model = make_model(pos_encoding="alibi")
    a, b = tokens(1, 11, seed=6), tokens(1, 4, seed=7)
    state = KVCache.cat([model(a[:, :8]).state, model(b[:, :1]).state])
    assert state.size == 8 and state.pos.tolist() == [8, 1]
    out = model(torch.cat([a[:, 8:], b[:, 1:]]), state=state).logits  # B=2, T=3
    torch.testing.assert_close(out[0], model(a).logits[0, 8:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1], model(b).logits[0, 1:], rtol=1e-5, atol=1e-5)


def test_state_helpers(tmp_path):
    model = make_model(pos_encoding="alibi")
    idx = tokens(3, 6)
    state = model(idx).state
    picked = state.select([2, 0])
    assert picked.batch_size == 2 and torch.equal(picked.k[1][0], state.k[1][2])
    assert state.detach().to("cpu").clone().pos.tolist() == [6, 6, 6]
    # a reset row starts over: its old entries are masked out
    reset = state.reset_rows(torch.tensor([False, True, False]))
    torch.testing.assert_close(model(idx[:, :2], state=reset).logits[1], model(idx[1:2, :2]).logits[0],
                               rtol=1e-5, atol=1e-5)
    state.save(tmp_path / "cache.safetensors")
    loaded = KVCache.load(tmp_path / "cache.safetensors")
    assert torch.equal(loaded.v[1], state.v[1]) and torch.equal(loaded.pos, state.pos)
    with pytest.raises(UserError, match="state does not fit"):
        model(tokens(2, 1), state=state)


# sizes and initialisation
@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": False}, {"pos_encoding": "alibi", "bias": False}])
def test_num_params(overrides):
    config = GPTConfig.from_name("tiny", **overrides)
    model = GPT(config)
    assert model.num_params() == config.num_params() == sum(p.numel() for p in model.parameters())
    assert model.num_params(embeddings=False) == config.num_params(embeddings=False) < model.num_params()
    assert GPTConfig.from_name("tiny").num_params() < 100_000


def test_gpt2_init():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=8, n_embd=64, n_head=4))
    block = model.transformer.h[0]
    assert abs(block.attn.c_attn.weight.std().item() - 0.02) < 0.002
    assert abs(block.mlp.c_proj.weight.std().item() - 0.02 / 4) < 0.0005
    assert block.attn.c_proj.bias.abs().sum() == 0 and torch.all(block.ln_1.weight == 1)


# matching BDH
@pytest.mark.parametrize("name", ["tiny", "small", "paper-25m"])
def test_match_bdh_presets(name):
    bdh = BDHConfig.from_name(name)
    config = match_gpt_config(bdh)
    assert abs(config.num_params() - bdh.num_params()) <= 0.05 * bdh.num_params()
    assert config.n_embd % config.n_head == 0 and config.head_size >= 16
    with torch.device("meta"):
        assert GPT(config).num_params() == config.num_params()
    alibi = match_gpt_config(bdh, pos_encoding="alibi", kv_cache_size=512)
    assert alibi.pos_encoding == "alibi" and alibi.kv_cache_size == 512
    assert abs(alibi.num_params() / bdh.num_params() - 1) <= 0.05


@pytest.mark.parametrize("name", ["small", "paper-25m"])
def test_gpt_presets_match_bdh_presets(name):
    bdh, gpt = BDHConfig.from_name(name), GPTConfig.from_name(name)
    assert abs(gpt.num_params() / bdh.num_params() - 1) <= 0.05


def test_match_fixed_fields_and_failures():
    bdh = BDHConfig.from_name("small")
    assert match_gpt_config(bdh, n_layer=4).n_layer == 4
    with pytest.raises(UserError, match="no GPT shape within"):
        match_gpt_config(bdh, n_layer=1, n_embd=16, n_head=1)
    with pytest.raises(UserError, match="unknown GPTConfig field"):
        match_gpt_config(bdh, n_layers=4)


def test_param_report():
    gpt = make_model()
    report = param_report(gpt)
    assert report["model_type"] == "gpt" and report["params"] == gpt.num_params()
    assert report["params_without_embeddings"] + report["embedding_params"] == report["params"]
    bdh = BDH(BDHConfig.from_name("tiny"))
    assert param_report(bdh)["params"] == BDHConfig.from_name("tiny").num_params()
    assert param_report(bdh)["model_type"] == "bdh"


# files
@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": False, "pos_encoding": "alibi", "kv_cache_size": 7}])
def test_save_load_round_trip(tmp_path, overrides):
    model = make_model(**overrides)
    save_model(model, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt")
    assert isinstance(loaded, GPT) and loaded.config == model.config
    idx = tokens(2, 9)
    torch.testing.assert_close(loaded(idx).logits, model(idx).logits, rtol=0, atol=0)


def test_load_weights_names_the_bad_key():
    model = make_model()
    good = model.state_dict()
    with pytest.raises(UserError, match="missing tensor.*transformer.ln_f.weight"):
        model.load_weights({k: v for k, v in good.items() if k != "transformer.ln_f.weight"})
    with pytest.raises(UserError, match="unexpected tensor 'lm_head.weight'"):
        model.load_weights({**good, "lm_head.weight": torch.zeros(V, 32)})
    with pytest.raises(UserError, match="'transformer.wte.weight' has shape"):
        model.load_weights({**good, "transformer.wte.weight": torch.zeros(V, 8)})


# configuration
@pytest.mark.parametrize("values, words", [
    ({"n_layer": 0}, "n_layer must be a positive integer"),
    ({"n_embd": -32}, "n_embd must be a positive integer"),
    ({"n_embd": 30, "n_head": 4}, "divisible by n_head"),
    ({"pos_encoding": "rope"}, "pos_encoding must be one of"),
    ({"kv_cache_size": -1}, "kv_cache_size must be an integer >= 0"),
    ({"dropout": 1.0}, "dropout must be in"),
    ({"bias": "yes"}, "bias must be true or false"),
    ({"compute_dtype": "int8"}, "compute_dtype must be one of"),
    ({"n_heads": 4}, "unknown GPTConfig field"),
])
def test_config_validation(values, words):
    with pytest.raises(UserError, match=words) as info:
        GPTConfig.from_dict(values)
    assert "\n" not in str(info.value) and isinstance(info.value, ValueError)


def test_config_presets_and_dict_round_trip():
    config = GPTConfig.from_name("tiny", pos_encoding="alibi")
    assert GPTConfig.from_dict(config.to_dict()) == config
    with pytest.raises(UserError, match="unknown GPT preset"):
        GPTConfig.from_name("huge")

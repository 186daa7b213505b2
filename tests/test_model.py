"""BDH-GPU model: reference semantics, state equivalence for every split, variants, config."""

import pytest
import torch

from bdh import BDH, BDHConfig, BDHState, UserError
from tests.reference_bdh import random_reference_state_dict, reference_forward

VARIANTS = {
    "reference": {},
    "decay": {"decay": "alibi"},
    "eq8": {"layout": "eq8"},
    "xacc-residual": {"layout": "xacc-residual"},
    "normfree": {"layernorm": False},
}


def make_model(scale=0.15, **overrides):
    """A tiny model with weights large enough that attention and state matter in the logits."""
    config = BDHConfig.from_name("tiny", **overrides)
    model = BDH(config)
    with torch.no_grad():
        for p in (model.encoder, model.encoder_v, model.decoder):
            p.normal_(std=scale)
    return model.eval()


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# reference semantics
def test_logits_equal_reference_code():
    sd = random_reference_state_dict(nh=2, D=32, N=64)
    with torch.no_grad():
        for key in ("encoder", "encoder_v", "decoder"):
            sd[key] *= 8
    model = BDH.from_reference(sd, n_layer=3).eval()
    idx = torch.randint(0, 256, (2, 80))
    with torch.no_grad():
        ours = model(idx).logits
        theirs = reference_forward(sd, idx, n_layer=3)
    assert rel_err(ours, theirs) < 1e-5


def test_from_reference_infers_sizes_and_strips_compile_prefix():
    sd = {"_orig_mod." + k: v for k, v in random_reference_state_dict(nh=2, D=32, N=64, V=100).items()}
    model = BDH.from_reference(sd, n_layer=2)
    c = model.config
    assert (c.n_head, c.n_embd, c.neurons_per_head, c.vocab_size, c.n_layer) == (2, 32, 64, 100, 2)
    assert torch.equal(model.freqs, sd["_orig_mod.attn.freqs"].view(1, 64).expand(2, 64))


def test_from_reference_reads_pt_with_weights_only(tmp_path):
    sd = random_reference_state_dict()
    path = tmp_path / "ckpt.pt"
    torch.save(sd, path)
    model = BDH.from_reference(path, n_layer=2)
    assert torch.equal(model.encoder, sd["encoder"])


def test_from_reference_rejects_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"encoder": torch.zeros(1), "hook": BDHConfig()}, path)  # a non-tensor object
    with pytest.raises(UserError, match="weights-only"):
        BDH.from_reference(path)


def test_from_reference_names_the_mismatched_key():
    sd = random_reference_state_dict(nh=2, D=32, N=64)
    sd["decoder"] = sd["decoder"][:10]
    with pytest.raises(UserError, match=r"'decoder' has shape \(10, 32\)"):
        BDH.from_reference(sd)
    del sd["lm_head"]
    with pytest.raises(UserError, match="lacks 'lm_head'"):
        BDH.from_reference(sd)


def test_parameter_count_formula():
    for name in ("tiny", "small", "paper-25m"):
        c = BDHConfig.from_name(name)
        assert c.num_params() == 3 * c.n_neurons * c.n_embd + 2 * c.vocab_size * c.n_embd
    assert BDHConfig.from_name("tiny").num_params() < 100_000
    assert abs(BDHConfig.from_name("paper-25m").num_params() - 25.3e6) < 0.1e6
    model = BDH(BDHConfig.from_name("tiny"))
    assert model.num_params() == model.config.num_params()
    assert model.num_params(embeddings=False) == 3 * model.config.n_neurons * model.config.n_embd


# state equivalence
def split_forward(model, idx, cuts):
    state, logits = None, []
    bounds = [0, *cuts, idx.shape[1]]
    for a, b in zip(bounds[:-1], bounds[1:]):
        out = model(idx[:, a:b], state=state)
        logits.append(out.logits)
        state = out.state
    return torch.cat(logits, dim=1), state


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("impl", ["auto", "naive", "chunked", "recurrent"])
def test_pieces_equal_one_pass(variant, impl):
    model = make_model(attn_impl=impl, chunk_size=5, **VARIANTS[variant])
    idx = torch.randint(0, 256, (2, 23))
    with torch.no_grad():
        full = model(idx)
        one_by_one, s1 = split_forward(model, idx, list(range(1, 23)))
        ragged, s2 = split_forward(model, idx, [1, 4, 11, 12, 20])  # pieces > 1 on a non-empty state
    for logits, state in ((one_by_one, s1), (ragged, s2)):
        assert rel_err(logits, full.logits) < 1e-5
        assert torch.equal(state.pos, full.state.pos)
        for r, r_full in zip(state.rho, full.state.rho):
            assert rel_err(r, r_full) < 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
def test_causal(variant):
    model = make_model(**VARIANTS[variant])
    idx = torch.randint(0, 256, (1, 16))
    changed = idx.clone()
    changed[0, 9] = (idx[0, 9] + 1) % 256
    with torch.no_grad():
        a, b = model(idx).logits, model(changed).logits
    assert torch.equal(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_variants_change_the_function():
    idx = torch.randint(0, 256, (1, 16))
    outs = {}
    for name, overrides in VARIANTS.items():
        torch.manual_seed(0)
        with torch.no_grad():
            outs[name] = make_model(**overrides)(idx).logits
    for name in ("decay", "eq8", "xacc-residual", "normfree"):
        assert not torch.allclose(outs[name], outs["reference"])


@pytest.mark.parametrize("impl", ["chunked", "recurrent"])
def test_gradients_equal_across_forms_including_incoming_state(impl):
    """In float64, so that the comparison sees the algebra and not float32 rounding."""
    idx = torch.randint(0, 256, (2, 13))
    results = {}
    for name in ("naive", impl):
        torch.manual_seed(0)
        model = make_model(attn_impl=name, chunk_size=4, decay="alibi").double()
        with torch.no_grad():
            state = model(torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(3))).state
        state.rho = [r.clone().requires_grad_() for r in state.rho]
        out = model(idx, targets=idx, state=state)
        loss = out.loss + sum((r * 0.01).sum() for r in out.state.rho)
        loss.backward()
        results[name] = [p.grad for p in model.parameters()] + [r.grad for r in state.rho]
    for g, g_ref in zip(results[impl], results["naive"]):
        assert rel_err(g, g_ref) < 1e-10


@pytest.mark.parametrize("overrides", [{}, {"decay": "alibi", "layernorm": False}, {"dropout": 0.3}],
                         ids=["reference", "decay-normfree", "dropout"])
def test_fused_training_path_equals_op_by_op(overrides):
    """attn_impl="auto" trains through bdh.ops.layer; "naive" goes op by op. Same logits, states, grads."""
    idx = torch.randint(0, 256, (2, 12))
    prefix = torch.randint(0, 256, (2, 5))
    results = {}
    for impl in ("naive", "auto"):
        torch.manual_seed(0)
        model = make_model(attn_impl=impl, **overrides).double().train()
        assert (model._fused_plan(1, 12, False, True) is not None) == (impl == "auto")
        with torch.no_grad():
            state = model(prefix).state
        state.rho = [r.clone().requires_grad_() for r in state.rho]
        torch.manual_seed(1)  # the same dropout draws
        out = model(idx, targets=idx, state=state)
        (out.loss + sum((r * 0.01).sum() for r in out.state.rho)).backward()
        grads = [p.grad for p in model.parameters()] + [r.grad for r in state.rho]
        results[impl] = [out.logits, *out.state.rho, *grads]
    for a, b in zip(results["auto"], results["naive"]):
        assert rel_err(a, b) < 1e-6  # logits come back in float32


def test_engine_follows_the_config_and_an_explicit_capture():
    model = make_model()
    assert model.engine(16) == "fused:chunked/16"
    with model.capture(lambda *args: None):
        assert model._fused_plan(1, 16, False, True) is None and model.engine(16) in ("naive", "chunked")
    assert model.engine(16) == "fused:chunked/16"
    model.register_forward_hook(lambda *args: None)  # a hook alone changes nothing
    assert model.engine(16) == "fused:chunked/16"
    assert make_model(layout="eq8").engine(16) in ("naive", "chunked")
    assert make_model(attn_impl="chunked").engine(16) == "fused:chunked/16"
    assert make_model(attn_impl="chunked", fused=False).engine(16) == "chunked"
    assert make_model(attn_impl="naive").engine(16) == "naive"
    assert make_model(fused=False).engine(1) == "recurrent"
    with pytest.raises(UserError, match="fused=True needs"):
        make_model(layout="eq8", fused=True)(torch.zeros(1, 16, dtype=torch.long))


def test_detach_kv_stops_gradient_through_keys_and_values():
    idx = torch.randint(0, 256, (1, 9))
    grads = {}
    for detach in (False, True):
        torch.manual_seed(0)
        model = make_model(detach_kv=detach)
        model(idx, targets=idx).loss.backward()
        grads[detach] = model.encoder.grad.clone()
    assert not torch.allclose(grads[False], grads[True])


def test_no_state_returned_when_not_asked():
    model = make_model()
    assert model(torch.randint(0, 256, (1, 5)), return_state=False).state is None


# state object
def test_state_detach_to_select_cat_and_save(tmp_path):
    model = make_model()
    with torch.no_grad():
        state = model(torch.randint(0, 256, (3, 6))).state
    assert state.batch_size == 3 and state.rho[0].dtype == torch.float32
    assert state.rho[0].shape == (3, 2, model.config.neurons_per_head, 32)
    assert not state.detach().rho[0].requires_grad
    assert state.to("cpu").rho[0].device.type == "cpu"
    both = BDHState.cat([state.select([0]), state.select([2])])
    assert torch.equal(both.rho[1][1], state.rho[1][2])
    state.save(tmp_path / "state.safetensors")
    loaded = BDHState.load(tmp_path / "state.safetensors")
    assert torch.equal(loaded.pos, state.pos)
    assert all(torch.equal(a, b) for a, b in zip(loaded.rho, state.rho))


def test_state_of_wrong_size_is_rejected():
    model = make_model()
    with pytest.raises(UserError, match="state does not fit"):
        model(torch.randint(0, 256, (1, 3)), state=model.init_state(2))


def test_large_absolute_positions_continue_exactly():
    """A state at position 10^6 reads with the phases of 10^6, not of 0."""
    model = make_model()
    with torch.no_grad():
        state = model(torch.randint(0, 256, (1, 4))).state
        far = BDHState(rho=state.rho, pos=state.pos + 10**6)
        a = model(torch.randint(0, 256, (1, 3), generator=torch.Generator().manual_seed(1)), state=state).logits
        b = model(torch.randint(0, 256, (1, 3), generator=torch.Generator().manual_seed(1)), state=far).logits
    assert not torch.allclose(a, b)


def test_kept_rotors_follow_the_length_and_the_frequencies():
    """The rotor table kept between stateless calls is always the one for 0..T-1 and the current freqs."""
    from bdh.ops import rope_rotors

    model = make_model()
    idx = torch.zeros(1, 8, dtype=torch.long)

    def fresh(T):
        return rope_rotors(torch.arange(T)[None], model.freqs)

    first = model._rope(idx, None)
    assert model._rope(idx, None) is first  # kept
    assert torch.equal(first.r, fresh(8))
    assert torch.equal(model._rope(idx[:, :5], None).r, fresh(5))
    with torch.no_grad():
        model.freqs.mul_(1.5)  # e.g. a checkpoint's freqs loaded in place
    assert torch.equal(model._rope(idx, None).r, fresh(8))
    with torch.no_grad():
        logits = model(idx).logits
        model._rotors = None
        assert torch.equal(model(idx).logits, logits)


# dtypes
def test_bfloat16_autocast_keeps_state_in_float32():
    model = make_model(compute_dtype="bfloat16")
    idx = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        out = model(idx)
        model.config.compute_dtype = "float32"
        ref = model(idx)
    assert out.state.rho[0].dtype == torch.float32 and out.logits.dtype == torch.float32
    assert rel_err(out.logits, ref.logits) < 0.05


def test_bfloat16_training_gradients_agree_across_attention_forms():
    """The chunked form's backward runs under forward's autocast (its q is bf16, its v float32):
    under bf16 its loss and gradients are as close to float32's as the naive form's are."""
    idx = torch.randint(0, 256, (2, 32))
    grads = {}
    for impl, dtype in (("naive", "float32"), ("naive", "bfloat16"), ("chunked", "bfloat16")):
        torch.manual_seed(0)
        model = make_model(compute_dtype=dtype, attn_impl=impl, chunk_size=8).train()
        assert model.engine(32) == impl
        loss = model(idx, targets=idx, return_state=False).loss
        grads[impl, dtype] = [loss, *torch.autograd.grad(loss, list(model.parameters()))]
    err = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    exact = grads["naive", "float32"]
    for chunked, naive, ref in zip(grads["chunked", "bfloat16"], grads["naive", "bfloat16"], exact):
        assert chunked.dtype == torch.float32 and err(chunked, ref) <= 1.5 * err(naive, ref) + 0.01


def test_float16_on_cpu_is_a_clear_error():
    model = make_model(compute_dtype="float16")
    with pytest.raises(UserError, match="float16 needs a CUDA device"):
        model(torch.randint(0, 256, (1, 3)))


# config
@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"n_embd": 0}, "n_embd must be a positive integer"),
        ({"n_layer": -1}, "n_layer must be a positive integer"),
        ({"n_embd": 30, "n_head": 4}, "divisible by n_head"),
        ({"attn_impl": "flash"}, "attn_impl must be one of"),
        ({"decay": [0.5]}, "decay needs 4 values"),
        ({"decay": "linear"}, "decay must be None"),
        ({"dropout": 1.5}, "dropout must be in"),
    ],
)
def test_bad_config_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        BDHConfig(**overrides)


def test_presets_and_files(tmp_path):
    assert BDHConfig().mlp_internal_dim_multiplier == 128  # the authors' defaults
    assert BDHConfig.from_name("paper-25m") == BDHConfig()
    with pytest.raises(ValueError, match="unknown BDH preset 'huge'"):
        BDHConfig.from_name("huge")
    path = tmp_path / "c.yaml"
    path.write_text("n_layer: 3\nn_embd: 64\nn_head: 2\n")
    assert BDHConfig.from_file(path).n_layer == 3
    path.write_text("n_layers: 3\n")
    with pytest.raises(ValueError, match="unknown BDHConfig field"):
        BDHConfig.from_file(path)
    assert BDHConfig(decay="alibi").decay[0] < BDHConfig(decay="alibi").decay[-1] < 1

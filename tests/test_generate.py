"""Generation: prefill once, decode from the state; teacher forcing equals the parallel pass."""

import pytest
import torch

from bdh import generate
from bdh.generate import sample_next
from tests.test_model import make_model, rel_err


def assert_teacher_forced_decode_equals_parallel(model, idx, prefill=10):
    """Logits of idx (B, T) in one pass, and by a prefill then one token at a time from the state."""
    with torch.no_grad():
        parallel = model(idx).logits
        out = model(idx[:, :prefill])
        logits, state = [out.logits], out.state
        for t in range(prefill, idx.shape[1]):
            out = model(idx[:, t : t + 1], state=state)
            logits.append(out.logits)
            state = out.state
    assert rel_err(torch.cat(logits, dim=1), parallel) < 1e-5


@pytest.mark.parametrize("overrides", [{}, {"decay": "alibi"}, {"layout": "eq8"}])
def test_teacher_forced_decode_equals_parallel(overrides):
    assert_teacher_forced_decode_equals_parallel(make_model(**overrides), torch.randint(0, 256, (2, 30)))


def test_generate_returns_prompt_then_greedy_tokens():
    model = make_model()
    prompt = torch.randint(0, 256, (2, 5))
    out = generate(model, prompt, 8, top_k=1)
    assert out.shape == (2, 13) and torch.equal(out[:, :5], prompt)
    # greedy continuation equals argmax of the parallel forward over the result
    with torch.no_grad():
        logits = model(out[:, :-1]).logits
    assert torch.equal(logits[:, 4:].argmax(-1), out[:, 5:])
    assert torch.equal(generate(model, prompt, 8, temperature=0.0), out)


def test_batched_prompts_of_different_lengths_match_single_prompts():
    model = make_model()
    prompts = [torch.randint(0, 256, (n,)) for n in (3, 9, 1)]
    batched = generate(model, prompts, 6, top_k=1)
    for prompt, row in zip(prompts, batched):
        alone = generate(model, prompt[None], 6, top_k=1)[0]
        assert torch.equal(row, alone)


def test_sampling_is_reproducible_with_a_generator():
    model = make_model()
    prompt = torch.randint(0, 256, (1, 4))
    a = generate(model, prompt, 10, top_p=0.9, generator=torch.Generator().manual_seed(7))
    b = generate(model, prompt, 10, top_p=0.9, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, -5.0, -6.0]])
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {0, 1}
    draws = {sample_next(logits, top_p=0.5, generator=g).item() for _ in range(200)}
    assert draws == {0}  # token 0 alone holds > 50 % of the mass
    draws = {sample_next(logits, top_p=0.95, generator=g).item() for _ in range(500)}
    assert draws == {0, 1, 2}


def test_bad_sampling_arguments():
    with pytest.raises(ValueError):
        sample_next(torch.zeros(1, 3), temperature=-1)
    with pytest.raises(ValueError):
        sample_next(torch.zeros(1, 3), top_p=0)


def test_generation_cost_does_not_depend_on_context_length():
    """Decoding works from the fixed-size state: the model is never called on the prefix again."""
    model = make_model()
    lengths = []
    original_forward, original_step = model.forward, model.step

    def spy(original, kind):
        def call(idx, *args, **kwargs):
            lengths.append((kind, idx.shape[1]))
            return original(idx, *args, **kwargs)
        return call

    model.forward, model.step = spy(original_forward, "forward"), spy(original_step, "step")
    generate(model, torch.randint(0, 256, (1, 50)), 5)
    assert lengths == [("forward", 50)] + [("step", 1)] * 4


def silence_most_neurons(model, keep=0.2):
    """Zero the D_x columns of most neurons, so x is sparse as in a trained model."""
    off = torch.rand(model.encoder.shape[0], 1, model.encoder.shape[2]) > keep
    model.encoder.masked_fill_(off, 0.0)


@pytest.mark.parametrize("threshold", [0.0, 1.0], ids=["dense", "sparse"])
@pytest.mark.parametrize("overrides", [{}, {"layout": "eq8"}, {"decay": "alibi"}, {"layernorm": False}],
                         ids=["reference", "eq8", "decay", "normfree"])
def test_inplace_decode_equals_functional_decode(threshold, overrides):
    """The in-place (and sparse-aware) decode step gives the logits and states of the plain step."""
    model = make_model(sparse_decode_below=threshold, **overrides)
    with torch.no_grad():
        silence_most_neurons(model)
        prompt = torch.randint(0, 256, (3, 6))
        ref_state = model(prompt).state
        state = ref_state.clone()
        for token in torch.randint(0, 256, (5, 3, 1)):
            ref = model(token, state=ref_state)
            out = model.step(token, state)
            assert rel_err(out.logits, ref.logits) < 1e-5
            assert out.state.rho[0] is state.rho[0]  # updated in place, not copied
            assert torch.equal(out.state.pos, ref.state.pos)
            ref_state, state = ref.state, out.state
        for r, r_ref in zip(state.rho, ref_state.rho):
            assert rel_err(r, r_ref) < 1e-5


@pytest.mark.parametrize("threshold", [0.0, 1.0], ids=["dense", "sparse"])
def test_capture_sees_the_same_activations_when_decoding_in_place(threshold):
    model = make_model(sparse_decode_below=threshold)
    seen = {"x": [], "a": [], "y": []}

    def record(site, layer, out):
        assert layer == len(seen[site])
        seen[site].append(out.clone())

    with torch.no_grad():
        silence_most_neurons(model)
        state = model(torch.randint(0, 256, (2, 4))).state
        token = torch.tensor([[5], [9]])
        with model.capture(record):
            model(token, state=state.clone())
        plain = {site: list(values) for site, values in seen.items()}
        for values in seen.values():
            values.clear()
        with model.capture(record):
            model.step(token, state)
    for site in seen:
        assert len(seen[site]) == len(plain[site]) == model.config.n_layer
        for got, want in zip(seen[site], plain[site]):
            assert got.shape == want.shape == (2, model.config.n_head, 1, got.shape[-1])
            assert rel_err(got, want) < 1e-5


def test_sparse_decode_touches_only_active_rows():
    model = make_model(sparse_decode_below=1.0)
    with torch.no_grad():
        silence_most_neurons(model)
        state = model(torch.randint(0, 256, (1, 4))).state
        before = [r.clone() for r in state.rho]
        x = torch.relu(torch.einsum("bd,hdn->bhn", model._ln(model.embed(torch.tensor([7]))), model.encoder))
        model.step(torch.tensor([[7]]), state)
    changed = (state.rho[0] != before[0]).any(dim=-1)[0]  # nh, N: rows written in layer 0
    pair_active = (x[0].unflatten(-1, (-1, 2)) != 0).any(-1).repeat_interleave(2, dim=-1)
    assert changed.any() and not (changed & ~pair_active).any()
    assert pair_active.float().mean() < 0.5


def test_sparse_decode_sees_weight_updates():
    """The row-major copy of D_y the sparse path keeps is renewed when D_y changes in place."""
    model = make_model(sparse_decode_below=1.0)
    with torch.no_grad():
        silence_most_neurons(model)
        state = model(torch.randint(0, 256, (1, 4))).state
        token = torch.tensor([[7]])
        model.step(token, state.clone())  # builds the copy
        model.encoder_v.mul_(1.5)
        ref = model(token, state=state.clone())
        out = model.step(token, state.clone())
    assert rel_err(out.logits, ref.logits) < 1e-5


def test_bfloat16_decoding_runs_with_a_float32_state():
    model = make_model(compute_dtype="bfloat16")
    with torch.no_grad():
        state = model(torch.randint(0, 256, (2, 5))).state
        out = model.step(torch.tensor([[3], [4]]), state)
    assert out.logits.shape == (2, 1, 256) and torch.isfinite(out.logits).all()
    assert all(r.dtype == torch.float32 for r in out.state.rho)

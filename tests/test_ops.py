"""Every attention form against the naive ground truth: outputs, final states and gradients."""

import math

import pytest
import torch

from bdh.ops import chunked_attention, get_attention, loop_attention, naive_attention, pick_attention, recurrent_attention
from bdh.ops.rope import apply_rope, rope_freqs, rope_tables, rotate_pairs

B, NH, N, D = 2, 2, 24, 8
DECAY = torch.tensor([0.9, 0.6])


def make_inputs(T, with_state, heads_in_v=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.relu(torch.randn(B, NH, T, N, generator=g)) * 0.3
    k = torch.relu(torch.randn(B, NH, T, N, generator=g)) * 0.3
    v = torch.randn(B, heads_in_v, T, D, generator=g)
    s0 = torch.randn(B, NH, N, D, generator=g) * 0.5 if with_state else None
    return q, k, v, s0


def run(fn, T, with_state, decay, heads_in_v=1):
    q, k, v, s0 = make_inputs(T, with_state, heads_in_v)
    leaves = [t.requires_grad_() for t in (q, k, v, s0) if t is not None]
    o, s = fn(q, k, v, initial_state=s0, decay=decay, output_final_state=True)
    # a loss touching every output and every state entry, with fixed random weights
    g = torch.Generator().manual_seed(1)
    loss = (o * torch.randn(o.shape, generator=g)).sum() + (s * torch.randn(s.shape, generator=g)).sum()
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    # an unused input (q when nothing precedes it) has a zero gradient
    grads = [torch.zeros_like(x) if gr is None else gr.detach() for x, gr in zip(leaves, grads)]
    return o.detach(), s.detach(), grads


def assert_close(a, b, rtol=2e-5):
    scale = b.abs().max().clamp(min=1e-6)
    assert (a - b).abs().max() / scale < rtol, f"relative error {((a - b).abs().max() / scale).item():.2e}"


FORMS = {
    "chunked-1": lambda *a, **kw: chunked_attention(*a, chunk_size=1, **kw),
    "chunked-16": lambda *a, **kw: chunked_attention(*a, chunk_size=16, **kw),
    "chunked-64": lambda *a, **kw: chunked_attention(*a, chunk_size=64, **kw),
    "chunked-300": lambda *a, **kw: chunked_attention(*a, chunk_size=300, **kw),
    "recurrent": recurrent_attention,
    "loop": loop_attention,
}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("T", [1, 63, 257])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("decay", [None, DECAY], ids=["nodecay", "decay"])
def test_forms_match_naive(form, T, with_state, decay):
    if form in ("recurrent", "loop") and T == 257 and decay is None and not with_state:
        pytest.skip("covered by the other long cases; keeps the suite fast")
    o_ref, s_ref, g_ref = run(naive_attention, T, with_state, decay)
    o, s, grads = run(FORMS[form], T, with_state, decay)
    assert_close(o, o_ref)
    assert_close(s, s_ref)
    for g, gr in zip(grads, g_ref):  # dq, dk, dv and d(initial state)
        assert_close(g, gr)


def test_per_head_values_supported():
    o_ref, s_ref, _ = run(naive_attention, 20, True, DECAY, heads_in_v=NH)
    o, s, _ = run(FORMS["chunked-16"], 20, True, DECAY, heads_in_v=NH)
    assert_close(o, o_ref)
    assert_close(s, s_ref)


def test_naive_is_strictly_causal_and_unscaled():
    q, k, v, _ = make_inputs(5, False)
    o, _ = naive_attention(q, k, v)
    assert torch.all(o[:, :, 0] == 0)  # the first token sees nothing
    expected = (q[:, :, 3:4] @ k[:, :, :3].transpose(-1, -2)) @ v[:, :, :3]  # no softmax, no scaling
    assert_close(o[:, :, 3:4], expected)


def test_no_final_state_when_not_asked():
    q, k, v, _ = make_inputs(9, False)
    for name in ("naive", "chunked", "recurrent"):
        _, s = get_attention(name, chunk_size=4)(q, k, v, output_final_state=False)
        assert s is None


def test_recurrent_step_does_not_modify_the_state_passed_in():
    q, k, v, s0 = make_inputs(3, True)
    before = s0.clone()
    recurrent_attention(q, k, v, initial_state=s0)
    assert torch.equal(s0, before)


def test_pick_attention_by_shape():
    assert pick_attention(1, 4096, 128, 128, True, True) == "recurrent"
    assert pick_attention(64, 4096, 128, 128, False, False) == "naive"
    assert pick_attention(4096, 4096, 128, 128, False, False) == "chunked"
    assert pick_attention(2048, 768, 192, 128, False, False) == "chunked"  # small: measured faster
    assert pick_attention(2048, 8192, 256, 128, False, False) == "naive"  # paper-25m: measured slower


def test_unknown_form():
    with pytest.raises(ValueError, match="unknown attention form"):
        get_attention("flash")


# RoPE
def test_reference_frequencies():
    f = rope_freqs(8, theta=2.0**16)
    expected = [1 / (2.0**16) ** (2 * (k // 2) / 8) / (2 * math.pi) for k in range(8)]
    assert torch.allclose(f, torch.tensor(expected, dtype=torch.float32))
    assert f.dtype == torch.float32 and f[0] == f[1] and f[2] == f[3]


def test_rotate_pairs():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert rotate_pairs(x).tolist() == [-2.0, 1.0, -4.0, 3.0]


def test_rope_is_a_rotation():
    x = torch.randn(1, 2, 5, 16)
    cos, sin = rope_tables(torch.arange(5)[None] + 1000, rope_freqs(16).expand(2, 16))
    r = apply_rope(x, cos, sin)
    assert torch.allclose(r.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)


def test_cos_sin_tables_are_accurate():
    """Every entry of the tables within 1e-6 of float64 maths (float32 torch.cos was not, at times)."""
    freqs = rope_freqs(64).expand(2, 64)
    cos, sin = rope_tables(torch.arange(300)[None], freqs)
    phase = (torch.arange(300, dtype=torch.float64)[:, None] * freqs[0].double()) % 1.0 * 2 * math.pi
    assert (cos[0, 0] - torch.cos(phase)).abs().max() < 1e-6
    assert (sin[0, 1] - torch.sin(phase)).abs().max() < 1e-6


@pytest.mark.parametrize("position", [10**6, 10**7])
def test_phases_exact_at_large_positions(position):
    freqs = rope_freqs(64).expand(2, 64)
    cos, sin = rope_tables(torch.tensor([[position, position + 1]]), freqs)
    cycles = torch.tensor([position, position + 1], dtype=torch.float64)[:, None] * freqs[0].double()
    phase64 = (cycles % 1.0) * 2 * math.pi
    assert (cos[0, 0] - torch.cos(phase64)).abs().max() < 1e-6
    assert (sin[0, 1] - torch.sin(phase64)).abs().max() < 1e-6
    # the float32 product the reference forms drifts far more at these positions
    naive = ((torch.tensor([float(position)]) * freqs[0]) % 1) * 2 * math.pi
    assert (torch.cos(naive) - torch.cos(phase64[0])).abs().max() > 1e-3


def _layer_by_the_loop(x, v, rho, Dy, E, decay, rotors, layernorm):
    """One token through one layer as the paper writes it, with the token loop of ops.naive:
    read a = (R x)^T S, write S <- lambda (S + (R x) v^T), y = relu(LN(a) D_y) * x, z = sum_h y_h E_h."""
    q = torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * rotors).flatten(-2)  # B, nh, N
    a, state = loop_attention(q[:, :, None], q[:, :, None], v[:, None, None], rho, decay)  # B, nh, 1, D
    a = a[:, :, 0]
    a_hat = torch.nn.functional.layer_norm(a, a.shape[-1:]) if layernorm else a
    y = torch.relu(torch.einsum("bhd,hdn->bhn", a_hat, Dy)) * x
    return torch.einsum("bhn,hnd->bd", y, E), state


# the sparse path runs only without decay (decay rescales every state row: nothing to skip)
@pytest.mark.parametrize("sparse, decay", [(False, None), (False, DECAY), (True, None)],
                         ids=["dense", "dense-decay", "sparse"])
@pytest.mark.parametrize("layernorm", [True, False], ids=["ln", "normfree"])
def test_decode_layer_equals_the_token_loop(sparse, decay, layernorm):
    """The decoding step's layer (in place, dense or sparse-aware) against the naive token loop."""
    from bdh.ops.recurrent import active_neurons, decode_layer, decode_neurons, rotate_rows, sparse_decode_layer

    g = torch.Generator().manual_seed(3)
    Dx, Dy = torch.randn(NH, D, N, generator=g), torch.randn(NH, D, N, generator=g)
    Dx[:, :, 4:] = -1.0  # most neurons silent, so the sparse path has something to skip
    E = torch.randn(NH, N, D, generator=g)
    v = torch.randn(B, D, generator=g).abs()
    rho = torch.randn(B, NH, N, D, generator=g)
    rotors = torch.polar(torch.ones(NH, 1, N // 2), torch.rand(NH, 1, N // 2, generator=g) * 6.28)
    x = decode_neurons(v, Dx)  # nh, B, N
    q = rotate_rows(x, rotors)
    z_ref, state_ref = _layer_by_the_loop(x.transpose(0, 1), v, rho, Dy, E, decay, rotors.transpose(0, 1), layernorm)
    state = rho.clone()
    if sparse:
        active = active_neurons(x, below=1.0)
        assert active is not None and len(active) < NH * N
        Dy_rows = Dy.transpose(1, 2).reshape(-1, D)
        z, _, _ = sparse_decode_layer(x, q, v, state, active, Dy_rows, E.reshape(-1, D), layernorm)
    else:
        z, _, _ = decode_layer(x, q, v, state, Dy, E, decay, layernorm)
    assert_close(z, z_ref, rtol=1e-5)
    assert_close(state, state_ref, rtol=1e-5)

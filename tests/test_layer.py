"""The fused training layer (bdh.ops.layer) against the same layer written op by op with autograd."""

import pytest
import torch
import torch.nn.functional as F

from bdh.ops import apply_rope_complex, naive_attention, rope_freqs, rope_rotors
from bdh.ops import layer
from bdh.ops.layer import SCRATCH, fused_layer, norm
from bdh.ops.sparse import SparseY

B, NH, N, D = 2, 2, 16, 8
DECAY = torch.tensor([0.9, 0.7], dtype=torch.float64)
# what forward keeps for backward: (x, g); the rest is made again
KEEPS = [(False, False), (True, False), (True, True)]
KEEP_IDS = ["remake-x-g", "keep-x", "keep-x-g"]


def reference_layer(v, Dx, Dy, E, rotors, s0, decay, layernorm, keep_scale):
    """the authors' forward, one op at a time; keep_scale: the dropout multiplier on y, or None."""
    x = F.relu(torch.matmul(v.unsqueeze(1), Dx))  # B, nh, T, N
    q = apply_rope_complex(x, rotors)
    a, state = naive_attention(q, q, v.unsqueeze(1), s0, decay, output_final_state=True)
    y = F.relu(torch.matmul(norm(a) if layernorm else a, Dy)) * x
    if keep_scale is not None:
        y = y * keep_scale
    return torch.matmul(y, E).sum(dim=1), state


def make(T, with_state, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, s=1.0: (torch.randn(*shape, generator=g, dtype=torch.float64) * s).requires_grad_()  # noqa: E731
    v = rand(B, T, D)
    Dx, Dy, E = rand(NH, D, N, s=0.5), rand(NH, D, N, s=0.5), rand(NH, N, D, s=0.5)
    freqs = rope_freqs(N, theta=64.0).expand(NH, N)
    rotors = rope_rotors(torch.arange(5, 5 + T)[None], freqs)  # positions continue an earlier prefix
    s0 = rand(B, NH, N, D, s=0.3) if with_state else None
    return v, Dx, Dy, E, rotors, s0


def grads_of(z, state, leaves):
    g = torch.Generator().manual_seed(1)
    loss = (z * torch.randn(z.shape, generator=g, dtype=z.dtype)).sum()
    loss = loss + (state * torch.randn(state.shape, generator=g, dtype=state.dtype)).sum()
    return torch.autograd.grad(loss, leaves)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


@pytest.mark.parametrize("T, C", [(12, 4), (12, 12), (16, 1), (9, 3)])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("decay", [None, DECAY], ids=["nodecay", "decay"])
@pytest.mark.parametrize("layernorm", [True, False])
@pytest.mark.parametrize("keep", KEEPS, ids=KEEP_IDS)
@pytest.mark.parametrize("batched", [False, True], ids=["per-sequence", "batched"])
def test_outputs_states_and_gradients_match_op_by_op(T, C, with_state, decay, layernorm, keep, batched, monkeypatch):
    """batched: the weight products as one product over all sequences (per_head)."""
    monkeypatch.setattr(layer, "kept", lambda big, size: keep)
    v, Dx, Dy, E, rotors, s0 = make(T, with_state)
    leaves = [t for t in (v, Dx, Dy, E, s0) if t is not None]
    z, state = fused_layer(v, Dx, Dy, E, rotors, s0, decay, C, layernorm, need_state=True, batched=batched)
    z_ref, state_ref = reference_layer(v, Dx, Dy, E, rotors, s0, decay, layernorm, None)
    assert rel_err(z, z_ref) < 1e-12
    assert rel_err(state, state_ref) < 1e-12
    for g, g_ref in zip(grads_of(z, state, leaves), grads_of(z_ref, state_ref, leaves)):
        assert rel_err(g, g_ref) < 1e-11


@pytest.mark.parametrize("T, block", [(12, 4), (12, 1), (12, 12), (16, 8)])
@pytest.mark.parametrize("decay", [None, DECAY], ids=["nodecay", "decay"])
@pytest.mark.parametrize("keep", KEEPS, ids=KEEP_IDS)
@pytest.mark.parametrize("scores", [True, False], ids=["keep-scores", "remake-scores"])
@pytest.mark.parametrize("batched", [False, True], ids=["per-sequence", "batched"])
def test_row_blocked_direct_form_matches_op_by_op(T, block, decay, keep, scores, batched, monkeypatch):
    """block: the quadratic form in row blocks (no states), against the authors' form op by op."""
    monkeypatch.setattr(layer, "kept", lambda big, size: keep)
    monkeypatch.setattr(layer, "keeps_scores", lambda *shape: scores)
    v, Dx, Dy, E, rotors, _ = make(T, False)
    leaves = [v, Dx, Dy, E]
    z, state = fused_layer(v, Dx, Dy, E, rotors, None, decay, None, True, block=block, batched=batched)
    z_ref, _ = reference_layer(v, Dx, Dy, E, rotors, None, decay, True, None)
    assert state is None
    assert rel_err(z, z_ref) < 1e-12
    zero = torch.zeros(1, dtype=z.dtype)
    for g, g_ref in zip(grads_of(z, zero, leaves), grads_of(z_ref, zero, leaves)):
        assert rel_err(g, g_ref) < 1e-11


@pytest.mark.parametrize("T, C, block", [(12, 4, None), (12, None, 4)], ids=["chunked", "direct"])
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("keep", KEEPS, ids=KEEP_IDS)
def test_sparse_readout_path_matches_op_by_op(T, C, block, p, keep, monkeypatch):
    """sparse_below above y's density: the read-out runs on y's non-zeros (bdh.ops.sparse), same results."""
    monkeypatch.setattr(layer, "kept", lambda big, size: keep)
    v, Dx, Dy, E, rotors, _ = make(T, False)
    leaves = [v, Dx, Dy, E]
    need_state = block is None
    used, drawn = [], []
    monkeypatch.setattr(layer, "SparseY", lambda y, *drop: used.append(y.clone()) or SparseY(y, *drop))
    monkeypatch.setattr(layer, "draw_kept", lambda shape, p, like: drawn.append(torch.rand(shape) >= p) or drawn[-1])
    z, state = fused_layer(v, Dx, Dy, E, rotors, None, DECAY, C, True, p, need_state, block, sparse_below=1.01)
    assert len(used) == 1 and 0 < (used[0] == 0).double().mean() < 1  # the sparse path ran, on a sparse y
    keep_scale = None
    if p:  # the mask drawn for y's non-zeros (the entries where y is zero stay zero whatever is drawn)
        assert len(drawn) == 1 and drawn[0].numel() == used[0].count_nonzero() and not drawn[0].all()
        keep_scale = torch.ones(B, NH, T, N, dtype=torch.float64)
        keep_scale.view(-1)[used[0].view(-1) != 0] = drawn[0].double()
        keep_scale /= 1 - p
    z_ref, state_ref = reference_layer(v, Dx, Dy, E, rotors, None, DECAY, True, keep_scale)
    assert rel_err(z, z_ref) < 1e-12
    if not need_state:
        state = state_ref = torch.zeros(1, dtype=z.dtype)
    for g, g_ref in zip(grads_of(z, state, leaves), grads_of(z_ref, state_ref, leaves)):
        assert rel_err(g, g_ref) < 1e-11


def test_dense_readout_where_y_is_denser_than_sparse_below(monkeypatch):
    monkeypatch.setattr(layer, "SparseY", lambda y: pytest.fail("sparse path taken"))
    v, Dx, Dy, E, rotors, _ = make(12, False)
    fused_layer(v, Dx, Dy, E, rotors, chunk_size=4, sparse_below=0.01)[0].sum().backward()


@pytest.mark.parametrize("bad", [dict(chunk_size=4), dict(need_state=True), dict(block=5)])
def test_row_blocks_need_one_chunk_no_states_and_to_divide(bad):
    v, Dx, Dy, E, rotors, _ = make(12, False)
    kw = dict(block=4) | bad
    with pytest.raises(ValueError, match="row blocks"):
        fused_layer(v, Dx, Dy, E, rotors, **kw)


def test_x_and_g_are_kept_within_the_memory_budget(monkeypatch):
    monkeypatch.setattr(layer, "KEEP_BYTES", 2 * 4 * 1000)
    assert layer.kept((10, 100), 4) == (True, True)  # x and g: 4,000 bytes each
    assert layer.kept((10, 101), 4) == (True, False)
    assert layer.kept((20, 101), 4) == (False, False)
    assert layer.keeps_scores(1, 1, 40, 10, 4)  # 40 x 50 / 2 = 1,000 numbers: 4,000 bytes
    assert not layer.keeps_scores(1, 1, 40, 11, 4)


@pytest.mark.parametrize("keep", KEEPS, ids=KEEP_IDS)
def test_dropout_matches_the_same_mask(keep, monkeypatch):
    monkeypatch.setattr(layer, "kept", lambda big, size: keep)
    v, Dx, Dy, E, rotors, _ = make(12, False)
    torch.manual_seed(7)
    z, state = fused_layer(v, Dx, Dy, E, rotors, None, None, 4, True, dropout=0.25, need_state=True)
    torch.manual_seed(7)
    keep = layer.draw_kept((B, NH, 12, N), 0.25, v).double() / 0.75  # the draw the layer made
    z_ref, state_ref = reference_layer(v, Dx, Dy, E, rotors, None, None, True, keep)
    assert 0 < (keep == 0).float().mean() < 0.5
    assert rel_err(z, z_ref) < 1e-12
    leaves = [v, Dx, Dy, E]
    for g, g_ref in zip(grads_of(z, state, leaves), grads_of(z_ref, state_ref, leaves)):
        assert rel_err(g, g_ref) < 1e-11


def test_no_state_asked_none_returned_and_no_grad_for_missing_state():
    v, Dx, Dy, E, rotors, _ = make(8, False)
    z, state = fused_layer(v, Dx, Dy, E, rotors, chunk_size=4)
    assert state is None
    z.sum().backward()
    assert v.grad is not None and Dx.grad is not None


def test_chunk_must_divide_length():
    v, Dx, Dy, E, rotors, _ = make(10, False)
    with pytest.raises(ValueError, match="divide"):
        fused_layer(v, Dx, Dy, E, rotors, chunk_size=4)


@pytest.mark.parametrize("keep", KEEPS, ids=KEEP_IDS)
def test_two_layers_sharing_scratch_buffers_match_op_by_op(keep, monkeypatch):
    """Consecutive layers reuse the same buffers, forward and backward; nothing may leak between them."""
    monkeypatch.setattr(layer, "kept", lambda big, size: keep)
    v, Dx, Dy, E, rotors, _ = make(8, False)
    leaves = [v, Dx, Dy, E]

    def two(layer):
        z1, _ = layer(v, Dx, Dy, E, rotors)
        z2, s2 = layer(norm(v + z1), Dx, Dy, E, rotors)
        return z1, z2, s2

    fused = two(lambda *a: fused_layer(*a, chunk_size=4, need_state=True))
    ref = two(lambda *a: reference_layer(*a, None, None, True, None))
    for a, b in zip(fused, ref):
        assert rel_err(a, b) < 1e-12
    for g, g_ref in zip(grads_of(fused[1], fused[2], leaves), grads_of(ref[1], ref[2], leaves)):
        assert rel_err(g, g_ref) < 1e-11
    SCRATCH.clear()
    assert not SCRATCH.buffers


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dropout_keeps_each_entry_with_probability_one_minus_p(dtype, monkeypatch):
    monkeypatch.setattr(layer, "STREAM", 30_000)  # several streams
    as_float = torch.full((500, 400), 7.0, dtype=dtype)
    kept = layer.draw_kept((500, 400), 0.1, torch.zeros(1, dtype=dtype), as_float=as_float)
    assert kept.dtype == torch.bool and kept.shape == (500, 400)
    assert abs(kept.double().mean().item() - 0.9) < 0.005  # 0.9 +- 7 standard errors
    assert torch.equal(as_float, kept.to(dtype))


def test_dropout_breaks_the_16_bit_ties_to_the_exact_probability():
    """p = 0.5 / 2^16: only the draws u = 0 (one in 65,536) can drop, each with probability 1/2.
    Keeping or dropping every tie would give 0 or about 256 dropped of 2^24."""
    dropped = (~layer.draw_kept((1 << 24,), 0.5 / 65536, torch.zeros(1))).sum().item()
    assert 70 < dropped < 190  # expected 128, standard deviation 11


def test_dropout_draws_are_fixed_by_the_torch_seed_not_by_the_thread_count(monkeypatch):
    monkeypatch.setattr(layer, "STREAM", 1000)
    like = torch.zeros(1)
    torch.manual_seed(3)
    kept = layer.draw_kept((7, 1000), 0.5, like)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        torch.manual_seed(3)
        again = layer.draw_kept((7, 1000), 0.5, like)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(kept, again)
    assert len({tuple(row[:40].tolist()) for row in kept}) == 7  # every stream its own draws
    assert not torch.equal(layer.draw_kept((7, 1000), 0.5, like), kept)  # the torch generator moved on


def test_dropout_on_the_non_zeros_keeps_each_with_probability_one_minus_p():
    torch.manual_seed(0)
    kept = layer.draw_kept((200_000,), 0.25, torch.zeros(1))
    assert kept.dtype == torch.bool and abs(kept.double().mean().item() - 0.75) < 0.005  # SE ~ 0.001
    y = torch.relu(torch.randn(2, 2, 8, 16)).double()
    sy = SparseY(y)
    mask = torch.rand(sy.flat.numel()) >= 0.5
    dropped = SparseY(y, lambda n: mask, 2.0)
    dense = torch.zeros_like(y)
    dense.view(-1)[sy.flat[mask]] = 2 * y.view(-1)[sy.flat[mask]]
    assert torch.equal(dropped.Y.to_dense().view(2, 2, 8, 2, 16).sum(3), dense)  # each head in its own columns
    assert torch.equal(dropped.matrix_t(dropped.Y.values()).to_dense(), dropped.Y.to_dense().t())


def test_rotors_derive_the_unrotation_once_for_every_layer():
    _, _, _, _, rotors, _ = make(12, False)
    rot = layer.Rotors(rotors)
    assert rot.conj() is rot.conj() and torch.equal(rot.conj(), rotors.conj())
    inverse = rot.inverse_conj(torch.float64)
    assert inverse is rot.inverse_conj(torch.float64) and inverse.dtype == torch.complex128
    assert torch.allclose(inverse * rotors.conj().to(torch.complex128), torch.ones_like(inverse))
    # two layers sharing one Rotors: the same outputs and gradients as each with its own
    v, Dx, Dy, E, rotors, _ = make(12, False)
    leaves = [v, Dx, Dy, E]

    def two(rot_a, rot_b):
        z = fused_layer(v, Dx, Dy, E, rot_a, chunk_size=4)[0]
        return fused_layer(v + z, Dx, Dy, E, rot_b, chunk_size=4)[0]

    shared = layer.Rotors(rotors)
    z, z_ref = two(shared, shared), two(rotors, rotors)
    assert torch.equal(z, z_ref)
    zero = torch.zeros(1, dtype=z.dtype)
    for g, g_ref in zip(grads_of(z, zero, leaves), grads_of(z_ref, zero, leaves)):
        assert torch.equal(g, g_ref)
    assert shared._conj is not None and list(shared._inverse) == [torch.float64]


def test_path_density_is_counted_exactly_on_small_y_and_closely_on_large():
    small = torch.zeros(2, 2, 8, 16)
    small.view(-1)[::5] = 1.0  # every 5th entry
    assert layer.density(small) == (small != 0).double().mean().item()
    torch.manual_seed(0)
    large = torch.rand(16, 4, 128, 96) * (torch.rand(16, 4, 128, 96) < 0.05)  # 8,192 rows: sampled
    true = (large != 0).double().mean().item()
    assert abs(layer.density(large) - true) < 0.004  # ~ 6 standard errors of a 1/16 sample

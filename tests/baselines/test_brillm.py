"""BriLLM: the vectorised model against a loop rendering of the paper's equations (outputs and
gradients, dense and sparse, every flag), its corpus statistics, state, files, and the sanity bar."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bdh.baselines.brillm import BriLLM, BriLLMConfig, BriLLMState, sinusoidal_positions
from bdh.checkpoint import load_model, save_model
from bdh.errors import UserError
from bdh.generate import generate
from tests import reference_brillm as ref

V = 6


def make_model(fit: list[int] | None = None, **overrides) -> BriLLM:
    torch.manual_seed(0)
    values = dict(vocab_size=V, d=4, max_len=12, negatives=3, max_edges=0)
    model = BriLLM(BriLLMConfig(**{**values, **overrides}))
    with torch.no_grad():  # position logits that differ, so the weighting is tested
        model.position_logits.copy_(torch.randn(model.config.max_len))
    if fit is not None:
        model.fit_corpus(np.array(fit))
    return model.eval()


def corpus(n: int = 200, seed: int = 3) -> list[int]:
    """Tokens with a skewed bigram distribution over V ids (some bigrams never occur)."""
    rng = np.random.default_rng(seed)
    out = [0]
    for _ in range(n):
        out.append(int((out[-1] * 2 + rng.choice([1, 1, 1, 2, 3])) % V))
    return out


def tokens(B, T, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {name: torch.zeros_like(p) if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}


VARIANTS = [dict(), dict(max_edges=5), dict(context="start"), dict(pe_multiply=True), dict(exclude_self=True)]


@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "dense")
def test_energies_match_the_loop_rendering_of_the_equations(overrides):
    model = make_model(fit=corpus(), **overrides)
    idx = tokens(2, 9)
    torch.testing.assert_close(model(idx).logits, ref.logits(model, idx), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("overrides", [dict(), dict(max_edges=5), dict(context="start")], ids=["dense", "sparse", "start"])
def test_full_vocabulary_loss_and_gradients_match_the_reference(overrides):
    model = make_model(fit=corpus(), **overrides)
    idx, targets = tokens(2, 8), tokens(2, 8, seed=2)
    ours = model(idx, targets).loss
    theirs = F.cross_entropy(ref.logits(model, idx).flatten(0, 1), targets.flatten())
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    g_ours, g_ref = grads(model, ours), grads(model, theirs)
    for name in g_ours:
        torch.testing.assert_close(g_ours[name], g_ref[name], atol=1e-5, rtol=1e-4, msg=name)
    trained = g_ours["position_logits"][:7].abs().sum() > 0  # the context weighting is trained
    assert trained == (model.config.context == "weighted")


@pytest.mark.parametrize("overrides", [dict(sampling="frequent"), dict(sampling="frequent", max_edges=5),
                                       dict(sampling="uniform"), dict(sampling="mixed", max_edges=5)],
                         ids=["frequent-dense", "frequent-sparse", "uniform-dense", "mixed-sparse"])
def test_sampled_softmax_loss_and_gradients_match_the_reference(overrides):
    text = corpus()
    model = make_model(fit=text, **overrides).train()
    idx, targets = tokens(3, 8), tokens(3, 8, seed=2)
    k = model.config.negatives
    frequent = {"frequent": k, "mixed": k - k // 2, "uniform": 0}[model.config.sampling]
    table = ref.successors(text, V, k)
    drawn = torch.randint(0, V, (3, 8, k - frequent), generator=torch.Generator().manual_seed(7)).tolist()
    negatives = [[table[u][:frequent] + d for u, d in zip(seq, ds)] for seq, ds in zip(idx.tolist(), drawn)]
    torch.manual_seed(7)
    out = model(idx, targets)
    theirs = ref.sampled_loss(model, idx, targets, negatives)
    torch.testing.assert_close(out.loss, theirs, atol=1e-5, rtol=1e-5)
    g_ours, g_ref = grads(model, out.loss), grads(model, theirs)
    for name in g_ours:
        torch.testing.assert_close(g_ours[name], g_ref[name], atol=1e-5, rtol=1e-4, msg=name)
    # the logits of a training step: the true token's and the negatives' energies, -inf elsewhere
    full = model.eval()(idx).logits
    seen = torch.isfinite(out.logits)
    assert seen.gather(2, targets[..., None]).all() and not seen.all()
    torch.testing.assert_close(out.logits[seen], full[seen])


def test_ignored_targets_leave_the_sampled_loss():
    model = make_model(fit=corpus(), sampling="frequent").train()  # the same negatives in both calls
    idx, targets = tokens(2, 8), tokens(2, 8, seed=2)
    masked = targets.clone()
    masked[:, 4:] = -1
    assert torch.allclose(model(idx, masked).loss, model(idx[:, :4], targets[:, :4]).loss, atol=1e-6)


def test_fit_corpus_owns_the_most_frequent_bigrams_and_reads_their_successors():
    text = corpus()
    model = make_model(fit=text, max_edges=5, negatives=4)
    assert set(ref.edge_table(model)) == ref.owned_bigrams(text, 5) and model.seen_bigrams() == 5
    assert model.successors.tolist() == ref.successors(text, V, 4)
    # bigrams without an edge of their own share slot 0, owned ones have their own
    u, v = torch.tensor([0, 5]), torch.tensor([1, 5])
    table = ref.edge_table(model)
    assert model.edge_slot(u, v).tolist() == [table.get((0, 1), 0), table.get((5, 5), 0)]
    # fewer distinct bigrams than slots: every seen bigram owns one, the other slots stay free
    roomy = make_model(fit=text, max_edges=30)
    seen = {(a, b) for a, b in zip(text[:-1], text[1:])}
    assert set(ref.edge_table(roomy)) == seen and roomy.seen_bigrams() == len(seen) < 30
    with pytest.raises(UserError, match="token ids must lie in"):
        model.fit_corpus(np.array([0, V]))


def test_frequent_negatives_are_uniform_before_the_corpus_is_read():
    model = make_model(sampling="frequent").train()
    assert not model.fitted
    idx = tokens(4, 8)
    candidates, valid = model.sampled_candidates(idx, idx)
    assert candidates.shape == (4, 8, 4) and (candidates[..., 0] == idx).all()
    assert (valid[..., 1:] == (candidates[..., 1:] != idx[..., None])).all()
    assert torch.isfinite(model(idx, idx).loss)
    model.fit_corpus(np.array(corpus()))
    assert model.fitted and (model.sampled_candidates(idx, idx)[0][..., 1:] == model.successors[idx]).all()


def test_parameter_counts_both_ways():
    config = BriLLMConfig.from_name("small")
    d, L = config.d, config.max_len
    assert config.num_params(dense=True) == 256 ** 2 * (d * d + d) + 256 * d + L == 69_214_272
    assert config.num_params() == (2048 + 1) * (d * d + d) + 256 * d + L
    tiny = BriLLM(BriLLMConfig.from_name("tiny", max_edges=0))
    assert tiny.num_params() == tiny.config.num_params() == tiny.config.num_params(dense=True)
    sparse = make_model(fit=corpus(), max_edges=5)
    report = sparse.parameter_report()
    assert report["parameters"] == sparse.num_params() == 6 * (16 + 4) + V * 4 + 12
    assert report["dense_equivalent"] == V * V * 20 + V * 4 + 12 and report["bigrams_owning_an_edge"] == 5
    assert sparse.num_params(embeddings=False) == sparse.num_params() - V * 4


def test_positions_are_the_sinusoids_of_the_paper_and_the_release_quirk():
    for multiply in (False, True):
        pe = sinusoidal_positions(7, 6, multiply)
        for p in range(7):
            torch.testing.assert_close(pe[p], ref.positional(p, 6, multiply))


@pytest.mark.parametrize("overrides", [dict(), dict(max_edges=5), dict(context="start")], ids=["dense", "sparse", "start"])
def test_decoding_continues_ragged_prompts_like_the_sequence_path(overrides):
    model = make_model(fit=corpus(), **overrides)
    a, b = tokens(1, 7, seed=4)[0], tokens(1, 2, seed=5)[0]
    state = BriLLMState.cat([model(a[None, :6]).state, model(b[None, :1]).state])  # after 6 and 1 tokens
    step = model.step(torch.stack([a[6:7], b[1:2]]), state)
    torch.testing.assert_close(step.logits[0, 0], model(a[None]).logits[0, -1])
    torch.testing.assert_close(step.logits[1, 0], model(b[None]).logits[0, -1])
    assert step.state.pos.tolist() == [7, 2]
    # continuing a state piece by piece equals one pass
    first = model(a[None, :3])
    torch.testing.assert_close(model(a[None, 3:], state=first.state).logits, model(a[None]).logits[:, 3:])


def test_decode_pe_shift_moves_the_positions_of_decoding_only():
    model = make_model(fit=corpus(), decode_pe_shift=True)
    idx = tokens(1, 6)
    plain = model(idx)
    torch.testing.assert_close(plain.logits, ref.logits(model, idx))  # training positions unchanged
    state = model(idx[:, :1]).state
    stepped = []
    for t in range(1, 6):
        out = model.step(idx[:, t:t + 1], state)
        stepped.append(out.logits[:, 0])
        state = out.state
    shifted = ref.logits(model, idx, pe_shift=1)
    torch.testing.assert_close(torch.stack(stepped, 1)[:, 1:], shifted[:, 2:])


def test_exclude_self_never_proposes_the_current_token():
    model = make_model(fit=corpus(), exclude_self=True)
    idx = tokens(2, 5)
    logits = model(idx).logits
    assert torch.isinf(logits.gather(2, idx[..., None])).all()
    out = generate(model, idx[:, :1], 6, temperature=1.0)
    assert (out[:, 1:] != out[:, :-1]).all()
    repeat = torch.tensor([[1, 1, 2, 2]])  # the training loss keeps a repeated token possible
    assert torch.isfinite(model.train()(repeat, repeat).loss)


def test_bad_configs_and_states_are_one_line_errors():
    with pytest.raises(UserError, match="negatives must be below vocab_size"):
        BriLLMConfig(vocab_size=6, negatives=6)
    with pytest.raises(UserError, match="context must be one of weighted, start"):
        BriLLMConfig(context="mean")
    with pytest.raises(UserError, match="d must be even"):
        BriLLMConfig(d=5)
    with pytest.raises(UserError, match="unknown BriLLM preset"):
        BriLLMConfig.from_name("huge")
    model = make_model()
    with pytest.raises(UserError, match="beyond max_len 12"):
        model(tokens(1, 13))
    with pytest.raises(UserError, match="state does not fit"):
        model(tokens(1, 2), state=model.init_state(2))


def test_checkpoint_round_trip_keeps_the_corpus_statistics(tmp_path):
    model = make_model(fit=corpus(), max_edges=5)
    save_model(model, tmp_path / "m")
    again = load_model(tmp_path / "m")
    assert again.fitted and torch.equal(again.edge_keys, model.edge_keys)
    assert torch.equal(again.successors, model.successors)
    idx = tokens(2, 6)
    assert torch.equal(again(idx).logits, model(idx).logits)


def add_k_bigram_loss(train: np.ndarray, windows, V: int, k: float) -> float:
    """Held-out nats per token of the add-k bigram model of the training tokens, on (x, y) windows."""
    counts = np.zeros((V, V))
    np.add.at(counts, (train[:-1], train[1:]), 1)
    logp = np.log((counts + k) / (counts + k).sum(1, keepdims=True))
    total = [logp[x.numpy().ravel(), y.numpy().ravel()] for x, y in windows]
    return float(-np.concatenate(total).mean())


def test_sanity_bar_beats_the_add_k_bigram_and_the_start_only_ablation(tmp_path, text_file, capsys):
    """The paper's model, trained briefly by `bdh train`, against the best add-k bigram (k picked on
    the held-out data itself) and against BriLLM with c_i := s_0, all on the same held-out windows."""
    from bdh.cli import main
    from bdh.data import load_corpus, make_tokenizer, tokenize_corpus
    from bdh.data.batches import eval_batches
    from tests.helpers import tiny_flags

    flags = ["--model", "brillm", "--batch-size", "16", "--block-size", "32", "--max-iters", "60", "--eval-interval", "0",
             "--warmup-iters", "5", "--lr", "3e-2", "--min-lr", "3e-3"]
    held_out = {}
    for name, extra in (("brillm", []), ("ablation", ["--model-arg", "context=start"])):
        run = tmp_path / name
        assert main(["train", *tiny_flags(text_file, run), *flags, *extra]) == 0
        capsys.readouterr()
        assert main(["eval", "--ckpt", str(run), "--json", "--batch-size", "16", "--block-size", "32"]) == 0
        held_out[name] = json.loads(capsys.readouterr().out)["loss"]
    corpus = load_corpus(str(text_file))
    tokens = tokenize_corpus(corpus, make_tokenizer("bytes", corpus.train))
    windows = list(eval_batches(tokens.val, 16, 32, None, device="cpu"))
    bigram = min(add_k_bigram_loss(tokens.train, windows, 256, k) for k in (0.003, 0.01, 0.03, 0.1, 0.3, 1.0))
    assert held_out["brillm"] < bigram and held_out["brillm"] < held_out["ablation"], (held_out, bigram)


def test_command_line_trains_resumes_generates_and_reports_both_parameter_counts(tmp_path, text_file, capsys):
    from bdh.cli import main
    from tests.helpers import tiny_args

    run = tmp_path / "run"
    assert main([*tiny_args(text_file, run, "--model", "brillm", steps=2)]) == 0
    assert main([*tiny_args(text_file, run, "--model", "brillm", "--resume", str(run), steps=3)]) == 0
    capsys.readouterr()
    model = load_model(run)
    seen = {(a, b) for a, b in zip(text_file.read_bytes()[:-1], text_file.read_bytes()[1:])}
    assert model.fitted and 0 < model.seen_bigrams() <= min(len(seen), model.config.max_edges)
    assert main(["generate", "--ckpt", str(run), "--prompt", "The ", "--max-new-tokens", "8", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("The ")
    assert main(["info", "--ckpt", str(run), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model_type"] == "brillm" and info["training"]["step"] == 3
    report = info["parameter_report"]
    assert report["parameters"] == info["parameters"] == model.config.num_params() < report["dense_equivalent"]
    assert report["dense_equivalent"] == 256 ** 2 * (8 * 8 + 8) + 256 * 8 + 64
    assert main(["info", "--ckpt", str(run)]) == 0
    assert f"dense_equivalent: {report['dense_equivalent']:,}" in capsys.readouterr().out

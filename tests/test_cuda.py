"""The CUDA path: the fused layer, decoding, the baselines and the training command on a GPU.

Skipped where torch sees no GPU (CI has none); benchmarks/README.md says where these ran. Each test
checks the GPU against a form already tested on the CPU: the op-by-op layer, the parallel pass, the
same weights on the CPU, or an uninterrupted run.
"""

import pytest
import torch

from bdh import BDH, BDHConfig, generate
from bdh.baselines.gpt import GPT, GPTConfig
from bdh.cli import main
from bdh.ops import layer, plan
from tests.test_benchmarks import CASES, run_benchmark
from tests.test_generate import assert_teacher_forced_decode_equals_parallel
from tests.test_model import make_model, rel_err
from tests.train.test_resume import assert_split_run_matches_straight

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU = torch.device("cuda")


@pytest.fixture(autouse=True)
def _no_tf32(monkeypatch):
    """float32 products in full precision, whatever the process set, so that the GPU matches the CPU."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def logits_state_grads(model, idx, prefix, seed=1):
    """Logits, final state and every gradient (parameters and incoming state) of one training pass."""
    with torch.no_grad():
        state = model(prefix).state
    state.rho = [r.clone().requires_grad_() for r in state.rho]
    torch.manual_seed(seed)
    out = model(idx, targets=idx, state=state)
    (out.loss + sum((r * 0.01).sum() for r in out.state.rho)).backward()
    return [out.logits, *out.state.rho, *(p.grad for p in model.parameters()), *(r.grad for r in state.rho)]


def test_on_the_gpu_auto_runs_the_layer_form_timed_faster(tmp_path, monkeypatch):
    """Off the CPU fused="auto" times the fused and the op-by-op layer per shape (BDH._fused_pays);
    shapes too small to time go op by op; fused=True fuses whatever the timings."""
    monkeypatch.setenv("BDH_CACHE", str(tmp_path))
    monkeypatch.setattr(plan, "_memo", {})
    assert make_model().engine(16) == "fused:chunked/16"  # on the CPU
    assert not make_model().to(GPU).engine(16).startswith("fused:")
    assert make_model(fused=True).to(GPU).engine(16).startswith("fused:")
    B, T = 8, 256  # B nh T N above plan.CALIBRATE_FROM
    engine = BDH(BDHConfig.from_name("small")).to(GPU).train().engine(T, False, False, batch=B)
    [entry] = [v for k, v in plan._read_table(tmp_path / plan.CACHE_FILE).items() if k.endswith("layer-form")]
    seconds = entry["seconds"]
    assert engine.startswith("fused:") == entry["fused"] == (seconds["fused"] < seconds["op_by_op"])


@pytest.mark.parametrize("overrides", [{}, {"decay": "alibi", "layernorm": False}], ids=["reference", "decay-normfree"])
def test_fused_layer_on_the_gpu_equals_op_by_op(overrides):
    """The fused layer (fused=True) against autograd through the op-by-op layer, both on the GPU,
    the fused layer's weight products each one product over all sequences (plan.batched_products)."""
    idx, prefix = torch.randint(0, 256, (2, 12), device=GPU), torch.randint(0, 256, (2, 5), device=GPU)
    assert plan.batched_products(2, 12, 2, 256, 32, idx)  # too small to time: batched off the CPU
    results = {}
    for fused in (False, True):
        torch.manual_seed(0)
        model = make_model(fused=fused, **overrides).double().train().to(GPU)
        assert (model._fused_plan(2, 12, False, True) is not None) == fused
        results[fused] = logits_state_grads(model, idx, prefix)
    for a, b in zip(results[True], results[False]):
        assert a.device.type == "cuda" and rel_err(a, b) < 1e-6


def test_the_gpu_computes_what_the_cpu_computes():
    """float32, same weights and tokens: logits, states and gradients agree to float32 rounding."""
    idx, prefix = torch.randint(0, 256, (2, 24)), torch.randint(0, 256, (2, 7))
    torch.manual_seed(0)
    cpu = make_model().train()
    gpu = make_model().train().to(GPU)
    gpu.load_state_dict(cpu.state_dict())
    on_cpu = logits_state_grads(cpu, idx, prefix)
    on_gpu = logits_state_grads(gpu, idx.to(GPU), prefix.to(GPU))
    for a, b in zip(on_gpu, on_cpu):
        assert rel_err(a.cpu(), b) < 5e-4  # float32 sums in another order, through three layers


def test_dropout_on_the_gpu_keeps_each_entry_with_probability_one_minus_p():
    like = torch.empty(0, device=GPU)
    as_float = torch.empty(64, 1024, 1024, device=GPU)
    kept = layer.draw_kept(as_float.shape, 0.1, like, as_float=as_float)
    n = kept.numel()
    assert kept.device.type == "cuda" and abs(kept.sum().item() / n - 0.9) < 4 * (0.09 / n) ** 0.5
    assert torch.equal(as_float, kept.float())


def test_a_measured_plan_is_cached_under_the_gpu_and_computes_the_same(tmp_path, monkeypatch):
    """A shape big enough to calibrate: the plan is timed on the GPU, stored under its name, and the
    fused layer under that plan gives the op-by-op layer's logits."""
    monkeypatch.setenv("BDH_CACHE", str(tmp_path))
    monkeypatch.setattr(plan, "_memo", {})
    B, T = 8, 256  # B nh T N above plan.CALIBRATE_FROM
    model = BDH(BDHConfig.from_name("small", fused=True)).to(GPU).train()
    engine = model.engine(T, False, False, batch=B)
    assert engine.startswith("fused:")
    table = plan._read_table(tmp_path / plan.CACHE_FILE)
    assert any(torch.cuda.get_device_name(GPU) in key for key in table)
    idx = torch.randint(0, 256, (B, T), device=GPU)
    with torch.no_grad():
        fused = model(idx, return_state=False).logits
        model.config.fused = False
        assert model.engine(T, False, False, batch=B) in ("naive", "chunked")
        op_by_op = model(idx, return_state=False).logits
    assert rel_err(fused, op_by_op) < 1e-4


def test_decoding_on_the_gpu_equals_the_parallel_pass():
    model = make_model().to(GPU)
    idx = torch.randint(0, 256, (2, 30), device=GPU)
    assert_teacher_forced_decode_equals_parallel(model, idx)
    greedy = generate(model, idx[:, :5], 8, top_k=1)
    assert greedy.device.type == "cuda" and torch.equal(greedy[:, :5], idx[:, :5])


def test_the_gpt_baseline_on_the_gpu_computes_what_the_cpu_computes():
    torch.manual_seed(0)
    cpu = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32))
    gpu = GPT(cpu.config).to(GPU)
    gpu.load_state_dict(cpu.state_dict())
    idx = torch.randint(0, 256, (2, 24))
    results = []
    for model, tokens in ((cpu, idx), (gpu, idx.to(GPU))):
        out = model(tokens, targets=tokens)
        out.loss.backward()
        results.append([out.logits, *(p.grad for p in model.parameters())])
    for a, b in zip(*results):
        assert rel_err(b.cpu(), a) < 1e-4


def test_training_on_the_gpu_resumes_exactly_and_samples(tmp_path, text_file, capsys):
    """`bdh train --device cuda`: a run split at step 3 and resumed gives the uninterrupted run's
    losses (dropout on: the saved CUDA generator state gives the same masks); then `bdh generate`."""
    assert_split_run_matches_straight(tmp_path, text_file, "--device", "cuda", tolerance=1e-5)
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(tmp_path / "split"), "--prompt", "The king", "--max-new-tokens", "20",
                 "--seed", "0", "--device", "cuda"]) == 0
    assert capsys.readouterr().out.startswith("The king")


def test_the_benchmark_against_the_authors_form_runs_on_the_gpu(tmp_path):
    result = run_benchmark("vs_authors", [*CASES["vs_authors"], "--device", "cuda"], tmp_path / "gpu.json")
    assert result["machine"]["cuda_device"] == torch.cuda.get_device_name(0)
    for row in result["results"]:
        assert row["device"].startswith("cuda") and row["forms"]["bdh"]["peak_cuda_allocated_mib"] > 0
        if row["dropout"] == 0:
            assert row["first_loss_diff"] < 1e-4

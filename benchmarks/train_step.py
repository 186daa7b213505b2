"""Training throughput and memory: one full step (forward, backward, AdamW) per attention form.

For each preset and sequence length, every form runs in its own fresh process (so peak memory is
its own) on the same seeded batch and weights; the JSON gives tokens/s, peak RSS, the loss (which
must agree across forms to 1e-4), achieved FLOP/s against the machine's fp32 matmul peak, and
the ratios to the naive quadratic form.

FLOPs are counted analytically (2 per multiply-add) for the work the quadratic form does, and the
same count is used for every form so that FLOP/s compare like with like:
    forward per token = L (6 n D + T_avg (n + nh D)) + 2 D V, T_avg = (T + 1) / 2 causal average
    training = 3 x forward.
That count flatters the chunked and fused forms, which do less attention work than that; for
attn_impl="auto" (the fused layer, bdh/ops/layer.py) the JSON also gives the FLOPs it executes,
from the matmuls it runs: forward 3 n D per layer; backward dE, dy, dD_y, da, dD_x and dv (6 n D),
plus g made again (n D) and x twice (2 n D) where the memory budget does not keep them
(bdh.ops.layer.kept); the attention as bdh.ops.plan counts it for the plan the layer runs
(counted_cost, per head); the read-out to the vocabulary D V forward and 2 D V backward.

    python benchmarks/train_step.py --presets small paper-25m --seq 512 2048 --out benchmarks/results/train.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from common import add_out_args, check_out, emit, matmul_peak_gflops, median

WORKER = r"""
import json, resource, sys, time, torch
from bdh import BDH, BDHConfig
preset, T, B, impl, repeats, compile_ = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), sys.argv[6] == "1"
torch.manual_seed(0)
# naive: the quadratic form op by op (the authors' computation); chunked: the chunked form op by op;
# auto: the default (the fused layer wherever it applies)
forms = {"naive": dict(attn_impl="naive"), "chunked": dict(attn_impl="chunked", fused=False), "auto": {}}
model = BDH(BDHConfig.from_name(preset, dropout=0.0, **forms[impl]))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
g = torch.Generator().manual_seed(1)
x = torch.randint(0, 256, (B, T), generator=g)
y = torch.randint(0, 256, (B, T), generator=g)
fwd = torch.compile(model) if compile_ else model
first_loss = None
def step():
    global first_loss
    out = fwd(x, y, return_state=False)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    if first_loss is None:
        first_loss = out.loss.item()
    opt.step()
t0 = time.perf_counter(); step(); warm = time.perf_counter() - t0
times = []
for _ in range(repeats):
    t0 = time.perf_counter(); step(); times.append(time.perf_counter() - t0)
print(json.dumps({"times": times, "first_step_s": warm, "loss": first_loss,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def flops_per_token(cfg, T: int) -> float:
    n, D, L, nh, V = cfg.n_neurons, cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.vocab_size
    t_avg = (T + 1) / 2
    forward = 2 * (L * (3 * n * D + t_avg * (n + nh * D)) + D * V)
    return 3 * forward


def fused_flops_per_token(cfg, T: int, B: int, device: str = "cpu") -> float | None:
    """FLOPs per token the fused layer executes (forward + backward) on device, or None where it does not run."""
    import torch

    from bdh.ops.layer import kept, keeps_scores
    from bdh.ops.plan import Plan, counted_cost, plan_for

    n, D, L, nh, V, N = cfg.n_neurons, cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.vocab_size, cfg.neurons_per_head
    if cfg.chunk_size == "auto":
        plan = plan_for(B, T, nh, N, D, False, torch.empty(0, device=device))  # the worker's plan: the same cache
    elif T % min(cfg.chunk_size, T):
        return None
    else:
        plan = Plan(min(cfg.chunk_size, T))
    keep_x, keep_g = kept((B, nh, T, N), 4)
    forward = L * 3 * n * D + D * V
    backward = L * (6 + (not keep_g) + 2 * (not keep_x)) * n * D + 2 * D * V
    attention = counted_cost(plan, T, N, D)
    if plan.block and keeps_scores(B, nh, T, plan.block, 4):
        attention -= (T + plan.block) / 2 * N  # the scores are not made again in backward
    return 2 * (forward + backward + L * nh * attention)


def authors_flops_per_token(cfg, T: int) -> float:
    """FLOPs per token of the authors' form (forward + backward): nine n D products per layer and the
    full T x T scores and weighted sums, three times (forward, and two products each backward)."""
    n, D, L, nh, V, N = cfg.n_neurons, cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.vocab_size, cfg.neurons_per_head
    return 2 * (L * (9 * n * D + 3 * T * (N + D) * nh) + 3 * D * V)


def run_worker(preset, T, B, impl, repeats, compile_=False) -> dict:
    args = [sys.executable, "-c", WORKER, preset, str(T), str(B), impl, str(repeats), "1" if compile_ else "0"]
    out = subprocess.run(args, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["small", "paper-25m"])
    p.add_argument("--seq", nargs="+", type=int, default=[512, 2048])
    p.add_argument("--tokens-per-step", type=int, default=4096, help="batch size = this / T (at least 1)")
    p.add_argument("--impls", nargs="+", default=["naive", "auto"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the auto form")
    add_out_args(p)
    args = p.parse_args(argv)
    check_out(args)
    from bdh import BDHConfig

    peak = matmul_peak_gflops()
    rows = []
    for preset in args.presets:
        cfg = BDHConfig.from_name(preset)
        for T in args.seq:
            B = max(1, args.tokens_per_step // T)
            runs = {impl: run_worker(preset, T, B, impl, args.repeats) for impl in args.impls}
            if args.compile:
                runs["auto+compile"] = run_worker(preset, T, B, "auto", args.repeats, compile_=True)
            rows.append(_summarise(preset, T, B, cfg, runs, peak))
    emit("train_step", {"matmul_peak_gflops": round(peak, 1), "results": rows}, args.out, args.overwrite)
    return 0


def _summarise(preset, T, B, cfg, runs, peak):
    row = {"preset": preset, "T": T, "batch": B, "forms": {}}
    fpt = flops_per_token(cfg, T)
    for name, r in runs.items():
        if "error" in r:
            row["forms"][name] = r
            continue
        t = median(r["times"])
        row["forms"][name] = {
            "tokens_per_s": round(B * T / t, 1),
            "step_s": round(t, 3),
            "first_step_s": round(r["first_step_s"], 2),
            "loss": r["loss"],
            "peak_rss_mib": round(r["peak_rss_bytes"] / 2**20),
            "gflops": round(fpt * B * T / t / 1e9, 1),
            "fraction_of_matmul_peak": round(fpt * B * T / t / 1e9 / peak, 3),
        }
        executed = fused_flops_per_token(cfg, T, B) if name == "auto" else None
        if executed:
            row["forms"][name]["executed_gflops"] = round(executed * B * T / t / 1e9, 1)
            row["forms"][name]["executed_fraction_of_peak"] = round(executed * B * T / t / 1e9 / peak, 3)
    base = row["forms"].get("naive", {})
    for name, f in row["forms"].items():
        if "tokens_per_s" in f and "tokens_per_s" in base:
            f["speedup_vs_naive"] = round(f["tokens_per_s"] / base["tokens_per_s"], 2)
            f["memory_vs_naive"] = round(f["peak_rss_mib"] / base["peak_rss_mib"], 2)
            f["loss_diff_vs_naive"] = abs(f["loss"] - base["loss"])
    return row


if __name__ == "__main__":
    sys.exit(main())

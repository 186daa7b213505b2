"""The default `bdh` training step against the authors' form (benchmarks/authors_form.py).

Same config and weights, one forward + backward + AdamW step, median of --repeats steps after one
untimed step, each (form, T) in a fresh process so that its peak RSS is its own (the peak over its
dropouts). Within that process the steps at each --dropout take turns (round robin), so that a
slower moment of the machine falls on every dropout alike and their difference is the dropout's. The
batch is --tokens-per-step / T sequences of T tokens. The JSON records the CPU model and whether
it has AVX-512 and AVX2 (benchmarks/common.py), the ratios of tokens/s and of peak memory, and
the first-step losses (equal to ~1e-5 at dropout 0: the same computation), the multiply-adds each
form executes per step by count (train_step.py: fused_flops_per_token, authors_flops_per_token),
the fused layer's plan, sparse read-out crossover and batching of weight products (bdh.ops.plan,
calibrated in a process of its own first), and y's density. With --ckpt both forms start from trained weights and read
windows of the default corpus, where y is as sparse as in training. With --device cuda the steps
run on the GPU (synchronised around each) and the peak memory is torch.cuda.max_memory_allocated;
--dtype bfloat16 runs both forms under bf16 autocast (the authors' training script's setting on a
GPU), where bdh takes its op-by-op layer, the fused one being float32 only.

    python benchmarks/vs_authors.py --preset small --seq 128 512 2048 --dropout 0 0.1
    python benchmarks/vs_authors.py --ckpt runs/small --seq 128 512 2048 --dropout 0 0.1
    python benchmarks/vs_authors.py --device cuda --tokens-per-step 32768 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import FUSED, add_out_args, check_device, check_out, emit, median
from train_step import authors_flops_per_token, fused_flops_per_token

from bdh import BDHConfig
from bdh.checkpoint import read_model_config
from bdh.rundir import resolve_checkpoint

WORKER = r"""
import json, resource, sys, time, torch
sys.path.insert(0, sys.argv[6])
from authors_form import AuthorsForm
from common import bdh_model, token_batches
from bdh.ops.plan import synchronize
from bdh.precision import autocast_for
form, preset, T, B, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[7])
ps = [float(v) for v in sys.argv[5].split(",")]  # dropouts, their steps interleaved
ckpt, device, dtype, fused = sys.argv[8], torch.device(sys.argv[9]), sys.argv[10], sys.argv[11]
cuda = device.type == "cuda"
torch.manual_seed(0)
model = bdh_model(preset, ckpt, max(ps), dtype, fused).to(device)  # with ckpt: trained weights, its config
if form == "plan":  # calibrate in a process of its own, so that its buffers are not in the timed one's peak
    from bdh.ops.plan import batched_products, layer_form_seconds, sparse_below
    c = model.config
    shape = (B, T, c.n_head, c.neurons_per_head, c.n_embd, model.encoder)
    print(json.dumps({"plan": model.engine(T, False, False, batch=B), "sparse_below": sparse_below(*shape),
                      "batched_products": batched_products(*shape),
                      # off the CPU, what fused="auto" timed for the engine above (None on the CPU)
                      "layer_forms": layer_form_seconds(B, T, *shape[2:5], False, True, model.encoder)}))
    sys.exit(0)
if form == "authors":
    model = AuthorsForm.from_bdh(model).to(device)
model.train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
x, y = (t.to(device) for t in next(token_batches(ckpt, T, B, 256)))  # with ckpt: the corpus, y as sparse as in training

def set_dropout(p):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p
losses = {}
def step(p):
    set_dropout(p)
    if form == "bdh":  # its config's compute_dtype: autocast inside
        out = model(x, y, return_state=False).loss
    else:  # the authors' training script's autocast
        with autocast_for(dtype, device):
            out = model(x, y)[1]
    opt.zero_grad(set_to_none=True)
    out.backward()
    opt.step()
    losses.setdefault(p, out.item())
for p in ps:
    step(p)
times = {p: [] for p in ps}
for _ in range(repeats):  # round robin: a slower moment of the machine is shared by every dropout
    for p in ps:
        synchronize(device); t0 = time.perf_counter(); step(p); synchronize(device)
        times[p].append(time.perf_counter() - t0)
# CPU: the process's peak RSS; CUDA: the most the caching allocator held for tensors
peak = torch.cuda.max_memory_allocated(device) if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
density = []  # of y over the layers, after the timed steps (the op-by-op forward that shows it is not timed)
if form == "bdh":
    model.config.fused = "auto"  # capture runs the op-by-op layer, which fused=True would refuse
    with torch.no_grad(), model.capture(lambda site, layer, t: site == "y" and density.append((t != 0).float().mean().item())):
        model(x)
print(json.dumps({"times": [times[p] for p in ps], "loss": [losses[p] for p in ps], "peak_bytes": peak,
                  "y_density": round(sum(density) / len(density), 4) if density else None}))
"""


def run(form: str, preset: str, T: int, B: int, dropouts: list[float], repeats: int, ckpt: str = "",
        device: str = "cpu", dtype: str = "float32", fused: str = "auto") -> list[dict]:
    """One process per form and length: its steps at each dropout interleaved; a result per dropout."""
    here = str(Path(__file__).resolve().parent)
    cmd = [sys.executable, "-c", WORKER, form, preset, str(T), str(B), ",".join(map(str, dropouts)), here,
           str(repeats), ckpt, device, dtype, fused]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        error = {"error": (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]}
        return error if form == "plan" else [error] * len(dropouts)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    if form == "plan":
        return r
    results = []
    for times, loss in zip(r["times"], r["loss"]):
        t = median(times)
        results.append({"tokens_per_s": round(B * T / t, 1), "step_s": round(t, 4),
                        memory_key(device): round(r["peak_bytes"] / 2**20, 1), "first_loss": loss,
                        "y_density": r["y_density"]})
    return results


def memory_key(device: str) -> str:
    """The peak memory's name: the process's resident set on the CPU, the allocator's peak on a GPU."""
    return "peak_cuda_allocated_mib" if device.startswith("cuda") else "peak_rss_mib"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--seq", nargs="+", type=int, default=[128, 512, 2048])
    p.add_argument("--tokens-per-step", type=int, default=2048, help="batch size = this / T (at least 1)")
    p.add_argument("--dropout", nargs="+", type=float, default=[0.0, 0.1])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--ckpt", default="", help="start both forms from this trained checkpoint (its config; --preset "
                   "is then ignored) and feed them windows of the default corpus, so that y is as sparse as in "
                   "training")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]; on a GPU, peak memory is torch's "
                   "max_memory_allocated rather than the process's RSS")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="bdh's compute_dtype (bfloat16: the op-by-op layer under autocast, as the fused one is "
                   "float32 only) and the authors' form's autocast, as in their training script")
    p.add_argument("--fused", default="auto", choices=list(FUSED),
                   help="bdh's fused layer: as fused='auto' chooses (the default), always (fused=True), or never "
                   "(the op-by-op layer)")
    add_out_args(p)
    args = p.parse_args(argv)
    args.device = check_device(args.device)
    check_out(args)
    cfg = read_model_config(resolve_checkpoint(args.ckpt))[1] if args.ckpt else BDHConfig.from_name(args.preset)
    rows = []
    for T in args.seq:
        B = max(1, args.tokens_per_step // T)
        where = (args.ckpt, args.device, args.dtype, args.fused)
        plan = run("plan", args.preset, T, B, [0.0], 0, *where)  # bdh.ops.plan: measured once, then cached
        by_form = {form: run(form, args.preset, T, B, args.dropout, args.repeats, *where) for form in ("bdh", "authors")}
        for i, dropout in enumerate(args.dropout):
            forms = {form: results[i] for form, results in by_form.items()}
            row = {"preset": args.preset, "ckpt": args.ckpt or None, "device": args.device, "dtype": args.dtype,
                   "fused": args.fused,
                   "T": T, "batch": B, "dropout": dropout,
                   "engine": plan.get("plan"), "sparse_readout_below": plan.get("sparse_below"),
                   "batched_products": plan.get("batched_products"), "layer_form_seconds": plan.get("layer_forms"),
                   "y_density": forms["bdh"].get("y_density"), "forms": forms}
            ours, theirs = forms["bdh"], forms["authors"]
            ran_fused = str(plan.get("plan")).startswith("fused:")  # else the op-by-op layer, not counted
            row["counted_gflop_per_step"] = {"bdh": round(fused_flops_per_token(cfg, T, B, args.device) * B * T / 1e9, 2)
                                             if ran_fused else None,
                                             "authors": round(authors_flops_per_token(cfg, T) * B * T / 1e9, 2)}
            if "tokens_per_s" in ours and "tokens_per_s" in theirs:
                row["speedup"] = round(ours["tokens_per_s"] / theirs["tokens_per_s"], 2)
                mem = memory_key(args.device)
                row["memory_ratio"] = round(ours[mem] / theirs[mem], 2)
                row["first_loss_diff"] = abs(ours["first_loss"] - theirs["first_loss"])
            rows.append(row)
    for row in rows:  # what dropout 0.1 costs over dropout 0, per form
        base = next((r for r in rows if r["T"] == row["T"] and r["dropout"] == 0.0), None)
        if base is not None and row["dropout"] > 0:
            row["dropout_cost"] = {f: round(base["forms"][f]["tokens_per_s"] / row["forms"][f]["tokens_per_s"] - 1, 3)
                                   for f in ("bdh", "authors")
                                   if "tokens_per_s" in row["forms"][f] and "tokens_per_s" in base["forms"][f]}
    emit("vs_authors", {"results": rows}, args.out, args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())

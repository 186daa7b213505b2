"""Where a training step's time goes: the torch profiler over a few steps of the default path.

One forward + backward + AdamW step of BDH as `bdh train` takes it (fresh weights of a preset, or
with --ckpt trained weights on windows of the default corpus, where y is as sparse as in
training), after --warmup untimed steps (the first calibrates the fused layer's plan). The JSON
gives the total self CPU time of the profiled steps and the ops that took most of it, grouped by
input shapes, so that two commits can be compared op by op on one machine even where wall-clock
timings move with the machine's load. Work outside torch's ops (numpy's dropout draws,
bdh.ops.layer.draw_kept) counts as the self time of the op around it (FusedLayer). With --device
cuda the ops are ranked by their time on the GPU (self_device_ms: an op's kernels are counted in
its own row and again in theirs, so the rows do not add up to the step):

    python benchmarks/profile_step.py --ckpt runs/race-900/bdh-time --seq 2048 --batch 1
    PYTHONPATH=<other checkout> python benchmarks/profile_step.py ...   # the same step of another commit
"""

from __future__ import annotations

import argparse
import sys

import torch
from common import FUSED, add_out_args, bdh_model, check_device, check_out, emit, token_batches
from torch.profiler import ProfilerActivity, profile, record_function

from bdh.ops.plan import synchronize


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--ckpt", default="", help="trained weights (their config; --preset is then ignored)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="steps profiled")
    p.add_argument("--top", type=int, default=25, help="ops listed, by self CPU time (on a GPU: self device time)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--fused", default="auto", choices=list(FUSED), help="the model's fused setting (on: True)")
    add_out_args(p)
    args = p.parse_args(argv)
    check_out(args)
    torch.manual_seed(0)
    device = torch.device(check_device(args.device))
    model = bdh_model(args.preset, args.ckpt, args.dropout, fused=args.fused).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = token_batches(args.ckpt, args.seq, args.batch, model.config.vocab_size)

    def step():
        x, y = (t.to(device) for t in next(data))
        loss = model(x, y, return_state=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(args.steps):
            with record_function("training step"):
                step()
        synchronize(device)
    events = [e for e in prof.key_averages(group_by_input_shape=True) if e.key != "training step"]
    events.sort(key=lambda e: e.self_device_time_total if gpu else e.self_cpu_time_total, reverse=True)
    total_ms = sum(e.self_cpu_time_total for e in events) / 1e3
    top = [{"op": e.key, "shapes": str(e.input_shapes), "calls": e.count,
            "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 2),
            **({"self_device_ms": round(e.self_device_time_total / 1e3, 2)} if gpu else {})} for e in events[:args.top]]
    emit("profile_step", {"preset": args.preset, "ckpt": args.ckpt or None, "T": args.seq, "batch": args.batch,
                          "dropout": args.dropout, "engine": model.engine(args.seq, False, False, batch=args.batch),
                          "steps": args.steps, "self_cpu_s": round(total_ms / 1e3, 3),
                          "self_cpu_s_per_step": round(total_ms / 1e3 / args.steps, 3), "results": top},
         args.out, args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Train small BDH-Normfree models in the eq8 layout (the variant the graph form equals), for `bdh graph`.

BDH-Normfree does not learn from the package's N(0, 0.02^2) start: with no LayerNorm every
activation is a product of several 0.02-sized factors and the logits start near 1e-15 (a `bdh
train --model-arg layout=eq8 --model-arg layernorm=false` run stayed at loss ln 256 = 5.5452 for
240 steps). Here the weights start at scales that keep activations O(1): f_e N(0, 1), D_x and f_d
N(0, 1/D), E N(0, 1/n), D_y N(0, 1e-6). Shakespeare bytes, AdamW lr 1e-3, batch 8 x 64, grad clip 1.

    python benchmarks/graph_models.py --multipliers 4,8,16 --steps 120 --out runs/graph-models
writes one checkpoint per multiplier (n = multiplier x 32 neurons) and train.json (losses, time).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from bdh import BDH, BDHConfig, save_model
from bdh.data import load_corpus, make_tokenizer
from common import machine


def normfree_model(multiplier: int) -> BDH:
    model = BDH(BDHConfig.from_name("tiny", layout="eq8", layernorm=False, mlp_internal_dim_multiplier=multiplier))
    D, n = model.config.n_embd, model.config.n_neurons
    with torch.no_grad():
        model.embed.weight.normal_(std=1.0)
        model.encoder.normal_(std=1 / math.sqrt(D))
        model.encoder_v.normal_(std=1e-3)
        model.decoder.normal_(std=1 / math.sqrt(n))
        model.lm_head.normal_(std=1 / math.sqrt(D))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--multipliers", default="4,8,16")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--out", default="runs/graph-models")
    args = parser.parse_args()
    torch.manual_seed(0)
    corpus = load_corpus("shakespeare")
    data = torch.frombuffer(bytearray(corpus.train.encode()), dtype=torch.uint8).long()
    out, results = Path(args.out), {"machine": machine(), "steps": args.steps, "models": []}
    for m in (int(v) for v in args.multipliers.split(",")):
        model = normfree_model(m)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
        losses, start = [], time.time()
        for step in range(args.steps):
            ix = torch.randint(0, len(data) - 65, (8,))
            x = torch.stack([data[i:i + 64] for i in ix])
            y = torch.stack([data[i + 1:i + 65] for i in ix])
            loss = model(x, targets=y, return_state=False).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
        directory = out / f"normfree-m{m}"
        save_model(model.eval(), directory)
        make_tokenizer("bytes").save(directory)
        results["models"].append({"multiplier": m, "n_neurons": model.config.n_neurons, "checkpoint": str(directory),
                                  "first_loss": losses[0], "last10_loss": sum(losses[-10:]) / 10,
                                  "seconds": time.time() - start})
        print(json.dumps(results["models"][-1]), flush=True)
    (out / "train.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()

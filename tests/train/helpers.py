"""Small text corpora and the flags of a tiny, fast training run, shared by the training tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("the king queen lord love night day sword crown heart blood death life sweet fair good "
         "thou art my what shall not").split()


def write_text(path: Path, lines: int = 400, seed: int = 0) -> Path:
    """About 40 bytes a line of Shakespeare-ish word salad."""
    rng = random.Random(seed)
    text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))).capitalize() + "."
                     for _ in range(lines))
    path.write_text(text + "\n", encoding="utf-8")
    return path


def tiny_args(data: Path, out: Path, *extra: str, steps: int = 4) -> list[str]:
    """`bdh train` flags for a run of a few steps of the tiny preset on a small text file."""
    return ["train", "--preset", "tiny", "--data", str(data), "--out", str(out), "--batch-size", "2",
            "--block-size", "16", "--max-iters", str(steps), "--eval-interval", "0", "--eval-iters", "1",
            "--log-interval", "1", "--ckpt-interval", "0", "--sample-tokens", "0", "--warmup-iters", "1",
            "--device", "cpu", *extra]


def losses(run: Path) -> dict[int, float]:
    """step -> train loss from a run's metrics.jsonl."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in records if "train_loss" in r}


def files_under(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}

"""A small text corpus and the flags of tiny, fast experiment runs."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("the king queen lord love night day sword crown heart blood death life sweet fair good "
         "thou art my what shall not").split()


def write_text(path: Path, lines: int = 300, seed: int = 0) -> Path:
    """About 40 bytes a line of Shakespeare-ish word salad."""
    rng = random.Random(seed)
    text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))).capitalize() + "."
                     for _ in range(lines))
    path.write_text(text + "\n", encoding="utf-8")
    return path


def tiny_flags(data: Path, out: Path, *extra: str, steps: int = 4) -> list[str]:
    """Shared training flags of a few steps of the tiny preset on a small text file."""
    return ["--preset", "tiny", "--data", str(data), "--out", str(out), "--batch-size", "2", "--block-size", "16",
            "--max-iters", str(steps), "--eval-interval", "2", "--eval-iters", "1", "--log-interval", "1",
            "--ckpt-interval", "0", "--sample-tokens", "0", "--warmup-iters", "1", "--device", "cpu", *extra]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("bdh: error: ") and "Traceback" not in captured.err
    return lines[0]


class Runs:
    """Stands in for runs.run_in_child: trains in this process, counts the calls, can stop early.

    stop_at: the call (1-based) that trains a single step (as if killed after its first checkpoint)
    and then raises KeyboardInterrupt, like a Ctrl-C / kill in the middle of an experiment.
    """

    def __init__(self, stop_at: int | None = None):
        self.specs: list[dict] = []
        self.stop_at = stop_at

    def __call__(self, spec: dict) -> dict:
        from bdh.experiments import runs

        self.specs.append(spec)
        if len(self.specs) == self.stop_at:
            # a time budget this small ends the run after its first step, with a checkpoint
            runs.execute({**spec, "config": {**spec["config"], "max_minutes": 1e-9}})
            raise KeyboardInterrupt
        return runs.execute(spec)

    @property
    def names(self) -> list[str]:
        return [Path(s["config"]["out"]).name for s in self.specs]

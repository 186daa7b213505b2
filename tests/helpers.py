"""What many tests share: a small text corpus, the flags of a tiny, fast run, and reading its results."""

from __future__ import annotations

import random
from pathlib import Path

from bdh.fileio import read_jsonl
from bdh.rundir import RunDir

WORDS = ("the king queen lord love night day sword crown heart blood death life sweet fair good "
         "thou art my what shall not").split()


def write_text(path: Path, lines: int = 400, seed: int = 0) -> Path:
    """About 40 bytes a line of Shakespeare-ish word salad."""
    rng = random.Random(seed)
    text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))).capitalize() + "."
                     for _ in range(lines))
    path.write_text(text + "\n", encoding="utf-8")
    return path


def tiny_flags(data: Path, out: Path, *extra: str, steps: int = 4, eval_interval: int = 2) -> list[str]:
    """Training flags of a few steps of the tiny preset on a small text file (train, compare, sweep)."""
    return ["--preset", "tiny", "--data", str(data), "--out", str(out), "--batch-size", "2", "--block-size", "16",
            "--max-iters", str(steps), "--eval-interval", str(eval_interval), "--eval-iters", "1",
            "--log-interval", "1", "--ckpt-interval", "0", "--sample-tokens", "0", "--warmup-iters", "1",
            "--device", "cpu", *extra]


def tiny_args(data: Path, out: Path, *extra: str, steps: int = 4) -> list[str]:
    """`bdh train` argv for a run of a few steps, validated only at the end."""
    return ["train", *tiny_flags(data, out, *extra, steps=steps, eval_interval=0)]


def metrics(run: Path) -> list[dict]:
    """The records of a run's metrics.jsonl."""
    return read_jsonl(RunDir(run).metrics_file)


def losses(run: Path) -> dict[int, float]:
    """step -> train loss from a run's metrics.jsonl."""
    return {r["step"]: r["train_loss"] for r in metrics(run) if "train_loss" in r}


def files_under(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def one_line_error(capsys, *needles: str) -> str:
    """The one `bdh: error: ...` line on stderr (no traceback), containing every needle."""
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bdh: error: "), captured.err
    assert "Traceback" not in captured.err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]

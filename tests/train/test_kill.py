"""Real faults: `python -m bdh train` killed with SIGKILL at chosen moments, then resumed.

Each kill happens exactly where a pause point of tests/faults/sitecustomize.py holds the process
(mid-step, during validation, half-way through a checkpoint write, between the checkpoint's rename
and the `latest` pointer), so the test is deterministic. Every run ends with the per-step losses of
an uninterrupted run, and no checkpoint left on disk fails its checksums.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bdh.rundir import RunDir, checkpoint_problem

from tests.helpers import losses

ROOT = Path(__file__).resolve().parents[2]
FAULTS = ROOT / "tests" / "faults"
STEPS = 8
# (pause point, what `latest` names when the process is killed there); each resumes the previous one
KILLS = [
    ("step:3", 2),          # mid-step 3 (checkpoint at 2, validation at 3 not reached)
    ("validate:1", 2),      # resumed at 2: killed inside the validation of step 3
    ("ckpt-files:1", 2),    # resumed at 2: killed half-way through writing the checkpoint of step 4
    ("ckpt-pointer:2", 4),  # resumed at 2: step 4 saved; step 6 renamed into place, `latest` not moved yet
]


def flags(data: Path, out: Path) -> list[str]:
    return ["--preset", "tiny", "--data", str(data), "--out", str(out), "--batch-size", "2", "--block-size", "16",
            "--max-iters", str(STEPS), "--eval-interval", "3", "--eval-iters", "1", "--log-interval", "1",
            "--ckpt-interval", "2", "--keep-checkpoints", "2", "--sample-tokens", "0", "--warmup-iters", "1",
            "--device", "cpu"]


def bdh_train(argv: list[str], log: Path, pause: str | None = None, pause_file: Path | None = None,
              timeout: float = 300) -> int:
    """Run `python -m bdh train ...`; with a pause point, SIGKILL it once it gets there. Returns the exit status."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(FAULTS), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if pause:
        env.update(BDH_TEST_PAUSE=pause, BDH_TEST_PAUSE_FILE=str(pause_file))
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "bdh", "train", *argv], stdout=out, stderr=subprocess.STDOUT,
                                env=env, cwd=ROOT)
        deadline = time.monotonic() + timeout
        try:
            while pause and not pause_file.exists():
                if proc.poll() is not None:
                    pytest.fail(f"bdh train ended (status {proc.returncode}) before {pause}:\n{log.read_text()}")
                if time.monotonic() > deadline:
                    pytest.fail(f"bdh train did not reach {pause} in {timeout} s:\n{log.read_text()}")
                time.sleep(0.05)
            if pause:
                os.kill(proc.pid, signal.SIGKILL)
            return proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def damaged_checkpoints(run: Path) -> list[str]:
    rundir = RunDir(run)
    return [f"step {s}: {p}" for s in rundir.checkpoint_steps() if (p := checkpoint_problem(rundir.step_dir(s)))]


def test_sigkill_at_several_moments_then_resume_matches_an_uninterrupted_run(tmp_path, text_file):
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert bdh_train(flags(text_file, reference), tmp_path / "reference.log") == 0
    expected = losses(reference)
    assert sorted(expected) == list(range(1, STEPS + 1))

    kills = 0
    for i, (pause, latest_step) in enumerate(KILLS):
        argv = flags(text_file, run) if i == 0 else ["--resume", str(run)]
        status = bdh_train(argv, tmp_path / f"killed-{i}.log", pause, tmp_path / f"paused-{i}")
        assert status == -signal.SIGKILL, (pause, status)
        kills += 1
        assert RunDir(run).latest() == RunDir(run).step_dir(latest_step), pause
        assert damaged_checkpoints(run) == [], pause
    assert bdh_train(["--resume", str(run)], tmp_path / "final.log") == 0, (tmp_path / "final.log").read_text()

    got = losses(run)
    mismatches = [s for s in expected if got.get(s) != expected[s]]
    print(f"\nkill test: {kills} SIGKILLs ({', '.join(p for p, _ in KILLS)}), "
          f"{len(mismatches)} of {STEPS} per-step losses differ from the uninterrupted run")
    assert kills == len(KILLS)
    assert mismatches == [] and sorted(got) == sorted(expected)
    assert damaged_checkpoints(run) == []
    assert RunDir(run).checkpoint_steps() == [6, 8]  # --keep-checkpoints 2
    assert not list((run / "checkpoints").glob(".*"))  # what the killed checkpoint writes left is cleaned up

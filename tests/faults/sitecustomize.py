"""Pause points for the kill test (tests/train/test_kill.py): imported by Python at start-up when
this folder is on PYTHONPATH; does nothing unless BDH_TEST_PAUSE is set.

BDH_TEST_PAUSE=<point>:<n> makes the n-th time this process reaches <point> write the file named
by BDH_TEST_PAUSE_FILE and sleep, so that the test can SIGKILL it exactly there:
    step            inside a training step: gradients computed, the optimizer not yet stepped
    validate        inside a validation
    ckpt-files      inside a checkpoint write: weights and optimizer in the temporary directory,
                    no trainer state, no manifest, nothing renamed yet
    ckpt-pointer    the checkpoint directory renamed into place, `latest` not yet moved
"""

import os


def _install(spec: str) -> None:
    import functools
    import time
    from pathlib import Path

    point, _, nth = spec.partition(":")
    nth = int(nth or 1)
    seen = [0]

    def pause_here():
        seen[0] += 1
        if seen[0] == nth:
            Path(os.environ["BDH_TEST_PAUSE_FILE"]).write_text(spec)
            time.sleep(3600)

    def after(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            result = fn(*args, **kwargs)
            pause_here()
            return result
        return wrapper

    def before(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            pause_here()
            return fn(*args, **kwargs)
        return wrapper

    from bdh.rundir import RunDir
    from bdh.train import checkpoint, loop

    if point == "step":
        loop.forward_backward = after(loop.forward_backward)
    elif point == "validate":
        loop.evaluate = after(loop.evaluate)
    elif point == "ckpt-files":
        checkpoint.save_optimizer = after(checkpoint.save_optimizer)
    elif point == "ckpt-pointer":
        RunDir.point_latest = before(RunDir.point_latest)
    else:
        raise ValueError(f"unknown pause point {point!r}")


if os.environ.get("BDH_TEST_PAUSE"):
    _install(os.environ["BDH_TEST_PAUSE"])

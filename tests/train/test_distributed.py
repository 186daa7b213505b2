"""Data parallel training: two gloo processes on halves of a batch give the one-process gradient."""

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from bdh import BDH, BDHConfig
from bdh.train import distributed
from bdh.train.loop import forward_backward

from tests.helpers import losses, write_text

WORLD = 2


def _model():
    torch.manual_seed(0)
    return BDH(BDHConfig.from_name("tiny"))


def _grad_worker(rank, init_file, x, y, out_dir):
    torch.set_num_threads(1)
    env = distributed.DistEnv(rank=rank, world_size=WORLD, local_rank=rank)
    device = torch.device("cpu")
    distributed.init(env, device, init_method=f"file://{init_file}")
    finished = False
    try:
        model = distributed.wrap(_model(), env, device)
        rows = x.shape[0] // WORLD
        mine = slice(rank * rows, (rank + 1) * rows)
        half = rows // 2
        # two accumulation micro-batches per process: the first must not synchronise
        micro = iter([(x[mine][:half], y[mine][:half]), (x[mine][half:], y[mine][half:])])
        forward_backward(model, micro, grad_accum=2)
        grads = {n: p.grad for n, p in distributed.unwrap(model).named_parameters()}
        torch.save(grads, Path(out_dir) / f"grads{rank}.pt")
        finished = True
    finally:
        distributed.shutdown(env, finished)


def test_ddp_gradient_equals_single_process_gradient(tmp_path):
    torch.manual_seed(1)
    x = torch.randint(0, 256, (8, 16))
    y = torch.randint(0, 256, (8, 16))
    mp.spawn(_grad_worker, args=(str(tmp_path / "init"), x, y, str(tmp_path)), nprocs=WORLD, join=True)
    model = _model()
    forward_backward(model, iter([(x, y)]), grad_accum=1)
    for rank in range(WORLD):
        grads = torch.load(tmp_path / f"grads{rank}.pt", weights_only=True)
        for name, param in model.named_parameters():
            torch.testing.assert_close(grads[name], param.grad, atol=1e-5, rtol=1e-5, msg=name)


def _train_worker(rank, tmp, text):
    torch.set_num_threads(1)
    os.environ["BDH_CACHE"] = str(Path(tmp) / f"cache{rank}")
    from bdh.train import TrainConfig, train

    env = distributed.DistEnv(rank=rank, world_size=WORLD, local_rank=rank)
    common = dict(preset="tiny", data=text, batch_size=2, block_size=16, eval_interval=0, eval_iters=1,
                  log_interval=1, ckpt_interval=2, sample_tokens=0, warmup_iters=1, decay_iters=4, device="cpu",
                  stream=True)
    straight = TrainConfig(out=str(Path(tmp) / "straight"), max_iters=4, **common)
    train(straight, env=env, init_method=f"file://{tmp}/init-a")
    first = TrainConfig(out=str(Path(tmp) / "split"), max_iters=2, **common)
    train(first, env=env, init_method=f"file://{tmp}/init-b")
    second = TrainConfig(out=str(Path(tmp) / "split"), max_iters=4, **common)
    train(second, resume=str(Path(tmp) / "split"), env=env, init_method=f"file://{tmp}/init-c")


def test_two_process_stream_training_resumes_exactly(tmp_path):
    text = write_text(tmp_path / "text.txt", lines=200)
    mp.spawn(_train_worker, args=(str(tmp_path), str(text)), nprocs=WORLD, join=True)
    state = json.loads((tmp_path / "split" / "checkpoints" / "step-0000004" / "trainer_state.json").read_text())
    assert state["world_size"] == WORLD and len(state["ranks"]) == WORLD
    from safetensors.torch import load_file

    stream = load_file(tmp_path / "split" / "checkpoints" / "step-0000004" / "stream_state.safetensors")
    assert stream["pos"].shape == (WORLD * 2,)
    straight, split = losses(tmp_path / "straight"), losses(tmp_path / "split")
    assert sorted(split) == [1, 2, 3, 4]
    for step in straight:
        assert split[step] == pytest.approx(straight[step], abs=1e-6)

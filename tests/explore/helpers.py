"""A tiny BDH checkpoint made in the test, and the explorer over it."""

from pathlib import Path

import torch

from bdh import save_model
from tests.interp.helpers import tiny_model

TEXT = "The king and the queen.\nThou art sweet."


def tiny_checkpoint(directory: Path, seed: int = 0) -> Path:
    """The tiny preset (2 layers, 2 heads, N = 256, bytes) with weights large enough that attention matters."""
    torch.manual_seed(seed)
    save_model(tiny_model(), directory)
    return directory

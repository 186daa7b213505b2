"""Model configuration: one dataclass, validated, with named presets.

Dimension legend used in shape comments across the package:
    B batch, T time, L n_layer, nh heads, D n_embd, N neurons per head, n = nh * N, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bdh.errors import UserError

ATTN_IMPLS = ("auto", "naive", "chunked", "recurrent")
LAYOUTS = ("reference", "eq8")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class BDHConfig:
    """BDH-GPU hyper-parameters. The first six fields are the authors' names and defaults."""

    # how many times the one shared layer is applied
    n_layer: int = 6
    # D: width of the low-rank "d-space" (embedding / attention value size)
    n_embd: int = 256
    # probability of zeroing y before the decoder, training only
    dropout: float = 0.1
    # nh: heads; every head has its own N neurons, state and RoPE frequencies
    n_head: int = 4
    # N = mlp_internal_dim_multiplier * D / nh; scaling BDH means scaling this
    mlp_internal_dim_multiplier: int = 128
    # V: 256 for the byte tokenizer
    vocab_size: int = 256

    # which form of the linear attention computes the same result: see bdh/ops
    attn_impl: str = "auto"
    # chunk length of the chunked form (memory/speed trade-off only, results are the same);
    # 128 and 256 are within 8 % of each other for small and paper-25m (benchmarks/README.md)
    chunk_size: int = 256
    # RoPE base; the reference uses 2**16 with pairs of neurons sharing a frequency
    rope_theta: float = 65536.0
    # per-head state decay lambda_h in (0, 1] (paper's U / ALiBi); None = no decay, "alibi" =
    # lambda_h = exp(-2^(-8 h / nh)), h = 1..nh, the ALiBi slopes read as a multiplicative decay
    decay: list[float] | str | None = None
    # "reference": x = relu(v D_x) per layer; "eq8": x accumulates in neuron space (paper Eq. 8)
    layout: str = "reference"
    # False gives BDH-Normfree (paper Eq. 7): every LayerNorm becomes the identity
    layernorm: bool = True
    # train without backprop through time: stop gradients through keys/queries and values
    detach_kv: bool = False
    # matmul dtype under autocast; the recurrent state and the loss stay in float32
    compute_dtype: str = "float32"
    # generation reads/writes only active neurons' state rows when the fraction of active
    # RoPE pairs is below this (0 = always dense, 1 = always sparse); exact either way
    sparse_decode_below: float = 0.1

    def __post_init__(self) -> None:
        self._validate()
        if isinstance(self.decay, str):
            self.decay = alibi_decays(self.n_head)
        elif self.decay is not None:
            self.decay = [float(d) for d in self.decay]

    def _validate(self) -> None:
        for name in ("n_layer", "n_embd", "n_head", "mlp_internal_dim_multiplier", "vocab_size", "chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UserError(f"BDHConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise UserError(f"BDHConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if (self.mlp_internal_dim_multiplier * self.n_embd) % self.n_head:
            raise UserError("BDHConfig: mlp_internal_dim_multiplier * n_embd must be divisible by n_head")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"BDHConfig.dropout must be in [0, 1), got {self.dropout!r}")
        _check_choice("attn_impl", self.attn_impl, ATTN_IMPLS)
        _check_choice("layout", self.layout, LAYOUTS)
        _check_choice("compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        if isinstance(self.decay, str) and self.decay != "alibi":
            raise UserError(f"BDHConfig.decay must be None, 'alibi' or a list of n_head floats, got {self.decay!r}")
        if isinstance(self.decay, (list, tuple)):
            if len(self.decay) != self.n_head or not all(0.0 < float(d) <= 1.0 for d in self.decay):
                raise UserError(f"BDHConfig.decay needs {self.n_head} values in (0, 1], got {self.decay!r}")
        if not 0.0 <= self.sparse_decode_below <= 1.0:
            raise UserError(f"BDHConfig.sparse_decode_below must be in [0, 1], got {self.sparse_decode_below!r}")
        if self.rope_theta <= 1.0:
            raise UserError(f"BDHConfig.rope_theta must be > 1, got {self.rope_theta!r}")

    # sizes derived from the fields
    @property
    def neurons_per_head(self) -> int:
        """N."""
        return self.mlp_internal_dim_multiplier * self.n_embd // self.n_head

    @property
    def n_neurons(self) -> int:
        """n = nh * N."""
        return self.n_head * self.neurons_per_head

    def num_params(self) -> int:
        """3 n D + 2 V D (one shared layer, untied embedding and read-out)."""
        return 3 * self.n_neurons * self.n_embd + 2 * self.vocab_size * self.n_embd

    # presets and files
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "BDHConfig":
        if name not in PRESETS:
            raise UserError(f"unknown BDH preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "BDHConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"unknown BDHConfig field(s): {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path) -> "BDHConfig":
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise UserError(f"cannot read config {path}: {err.strerror}") from None
        try:
            values = json.loads(text) if path.suffix == ".json" else _load_yaml(text)
        except ValueError as err:
            raise UserError(f"config {path} is not valid: {err}") from None
        if not isinstance(values, dict):
            raise UserError(f"config {path} must hold a mapping of field names to values")
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def alibi_decays(n_head: int) -> list[float]:
    """ALiBi slopes m_h = 2^(-8h/nh) read as a per-token state decay exp(-m_h)."""
    return [math.exp(-(2.0 ** (-8.0 * h / n_head))) for h in range(1, n_head + 1)]


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"BDHConfig.{name} must be one of {', '.join(choices)}; got {value!r}")


def _load_yaml(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(str(err).splitlines()[0]) from None


# tiny: unit tests. small: the 2-core CPU default (see README "Choosing the small preset").
# paper-25m: the authors' reference defaults (25.3 M parameters).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layer=2, n_embd=32, n_head=2, mlp_internal_dim_multiplier=16, dropout=0.0),
    "small": dict(n_layer=3, n_embd=192, n_head=4, mlp_internal_dim_multiplier=16, dropout=0.0),
    "paper-25m": dict(n_layer=6, n_embd=256, n_head=4, mlp_internal_dim_multiplier=128, dropout=0.1),
}
PRESET_NAMES = tuple(PRESETS)

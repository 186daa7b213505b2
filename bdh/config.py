"""Model configuration: the base every family's config builds on, and BDHConfig with its presets.

Dimension legend used in shape comments across the package:
    B batch, T time, L n_layer, nh heads, D n_embd, N neurons per head, n = nh * N, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from bdh.errors import UserError
from bdh.ops.alibi import alibi_decays
from bdh.precision import DTYPE_NAMES

ATTN_IMPLS = ("auto", "naive", "chunked", "recurrent")
LAYOUTS = ("reference", "eq8", "xacc-residual")
VARIANTS = ("gpu", "gpu-prime")


class ModelConfig:
    """What every model family's config dataclass shares: presets, dict/file round trips, checks.

    A family sets `presets` (name -> field values) and validates its fields in __post_init__
    with the helpers below, so every config reports a bad value the same way.
    """

    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    @classmethod
    def from_name(cls, name: str, **overrides: Any):
        if name not in cls.presets:
            family = cls.__name__.removesuffix("Config")
            raise UserError(f"unknown {family} preset {name!r}; choose one of: {', '.join(cls.presets)}")
        return cls.from_dict({**cls.presets[name], **overrides})

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path):
        """A config from a JSON or YAML file of field values."""
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

    # what callers ask of a family without building the model (see bdh.protocol.LanguageModel)
    @property
    def max_positions(self) -> int | None:
        """The longest sequence the model can take (None: unbounded)."""
        return None

    @property
    def carries_state(self) -> bool:
        """Whether the state can be carried across consecutive batches (stream mode)."""
        return True

    # checks
    def _fail(self, name: str, requirement: str, value: Any) -> None:
        raise UserError(f"{type(self).__name__}.{name} must {requirement}, got {value!r}")

    def _check_positive_ints(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                self._fail(name, "be a positive integer", value)

    def _check_choice(self, name: str, choices: tuple) -> None:
        value = getattr(self, name)
        if value not in choices:
            raise UserError(f"{type(self).__name__}.{name} must be one of {', '.join(map(str, choices))}; got {value!r}")

    def _check_probability(self, name: str) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            self._fail(name, "be in [0, 1)", value)

    def _check_bools(self, *names: str) -> None:
        for name in names:
            if not isinstance(getattr(self, name), bool):
                self._fail(name, "be true or false", getattr(self, name))

    def _check_divisible(self, name: str, by: str) -> None:
        if getattr(self, name) % getattr(self, by):
            raise UserError(f"{type(self).__name__}.{name} ({getattr(self, name)}) must be divisible by "
                            f"{by} ({getattr(self, by)})")


@dataclass
class BDHConfig(ModelConfig):
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

    # the form of the linear attention (all give the same result, see bdh/ops): "naive" the
    # quadratic form (the authors'), "chunked" the linear-in-T form, "recurrent" a token loop,
    # "auto" the cheaper of naive and chunked for each sequence length
    attn_impl: str = "auto"
    # train with the fused layer (bdh.ops.layer: one autograd Function per layer, chunked form):
    # True, False, or "auto" = wherever it applies (float32, reference layout, no detach_kv,
    # attn_impl auto or chunked, no activation capture, chunks dividing T), and off the CPU where
    # timed faster than the op-by-op layer for the shape (bdh.ops.plan.fused_pays)
    fused: str | bool = "auto"
    # chunk length of the chunked form and of the fused layer (memory/speed only, same results);
    # "auto": the fused layer's form and chunk per shape from a calibration cached per machine
    # (bdh.ops.plan), the op-by-op chunked form in chunks of 256
    chunk_size: int | str = "auto"
    # RoPE base; the reference uses 2**16 with pairs of neurons sharing a frequency
    rope_theta: float = 65536.0
    # per-head state decay lambda_h in (0, 1] (paper's U / ALiBi); None = no decay, "alibi" =
    # lambda_h = exp(-2^(-8 h / nh)), h = 1..nh, the ALiBi slopes read as a multiplicative decay
    decay: list[float] | str | None = None
    # "reference": the authors' code, x = relu(v D_x) per layer and the d-space residual
    # v = LN(v + LN(y E)); "eq8": the paper's Eq. 8 (Eq. 7 with layernorm=False), x accumulates
    # in neuron space and a layer hands on v = LN(y E) with no d-space residual; "xacc-residual":
    # x accumulated as in Eq. 8 AND the reference's d-space residual (in neither; what "eq8"
    # computed before it was made the paper's Eq. 8)
    layout: str = "reference"
    # "gpu": BDH-GPU. "gpu-prime": BDH-GPU' as this package reconstructs it (the paper gives no
    # equations): per-head input and forget gates on the state update computed from the layer
    # input, and the next-token prediction merged over all layers by learned gates (bdh/model.py)
    variant: str = "gpu"
    # False gives BDH-Normfree (paper Eq. 7): every LayerNorm becomes the identity
    layernorm: bool = True
    # train without backprop through time: stop gradients through keys/queries and values
    detach_kv: bool = False
    # matmul dtype under autocast; the recurrent state and the loss stay in float32
    compute_dtype: str = "float32"
    # decoding (BDH.step) reads/writes only active neurons' state rows when the fraction of
    # active RoPE pairs is below this (0 = always dense, 1 = always sparse); exact either way
    sparse_decode_below: float = 0.1

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # tiny: unit tests. small: the 2-core CPU default (see README "Choosing the small preset").
        # paper-25m: the authors' reference defaults (25.3 M parameters).
        "tiny": dict(n_layer=2, n_embd=32, n_head=2, mlp_internal_dim_multiplier=16, dropout=0.0),
        "small": dict(n_layer=3, n_embd=192, n_head=4, mlp_internal_dim_multiplier=16, dropout=0.0),
        "paper-25m": dict(n_layer=6, n_embd=256, n_head=4, mlp_internal_dim_multiplier=128, dropout=0.1),
    }

    def __post_init__(self) -> None:
        self._validate()
        if isinstance(self.decay, str):
            self.decay = alibi_decays(self.n_head)
        elif self.decay is not None:
            self.decay = [float(d) for d in self.decay]

    def _validate(self) -> None:
        self._check_positive_ints("n_layer", "n_embd", "n_head", "mlp_internal_dim_multiplier", "vocab_size")
        size = self.chunk_size
        if size != "auto" and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
            self._fail("chunk_size", "be a positive integer or 'auto'", size)
        self._check_divisible("n_embd", "n_head")
        if (self.mlp_internal_dim_multiplier * self.n_embd) % self.n_head:
            raise UserError("BDHConfig: mlp_internal_dim_multiplier * n_embd must be divisible by n_head")
        self._check_probability("dropout")
        self._check_choice("attn_impl", ATTN_IMPLS)
        if self.fused != "auto" and not isinstance(self.fused, bool):
            self._fail("fused", "be true, false or 'auto'", self.fused)
        self._check_choice("layout", LAYOUTS)
        self._check_choice("variant", VARIANTS)
        self._check_choice("compute_dtype", DTYPE_NAMES)
        self._check_bools("layernorm", "detach_kv")
        if isinstance(self.decay, str) and self.decay != "alibi":
            raise UserError(f"BDHConfig.decay must be None, 'alibi' or a list of n_head floats, got {self.decay!r}")
        if isinstance(self.decay, (list, tuple)):
            if len(self.decay) != self.n_head or not all(0.0 < float(d) <= 1.0 for d in self.decay):
                raise UserError(f"BDHConfig.decay needs {self.n_head} values in (0, 1], got {self.decay!r}")
        if not 0.0 <= self.sparse_decode_below <= 1.0:
            self._fail("sparse_decode_below", "be in [0, 1]", self.sparse_decode_below)
        if self.rope_theta <= 1.0:
            self._fail("rope_theta", "be > 1", self.rope_theta)

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
        """3 n D + 2 V D (one shared layer, untied embedding and read-out); BDH-GPU' adds its gates:
        2 (D nh + nh) for input and forget, D + L for the logit merge."""
        gates = 2 * (self.n_embd * self.n_head + self.n_head) + self.n_embd + self.n_layer
        return 3 * self.n_neurons * self.n_embd + 2 * self.vocab_size * self.n_embd + \
            (gates if self.variant == "gpu-prime" else 0)


def _load_yaml(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(str(err).splitlines()[0]) from None


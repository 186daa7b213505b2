"""Merging two BDH models by concatenating their neurons (the paper's Section 7.1).

Two models with the same d-space (D), heads, layers and vocabulary, e.g. two fine-tunings of one
base model, become one model of N1 + N2 neurons per head:
    D_x (encoder) and D_y (encoder_v)   (nh, D, N1) ++ (nh, D, N2) along the neuron axis, per head
    RoPE frequencies (freqs)            (nh, N1) ++ (nh, N2): each neuron keeps its own
    E (decoder)                         per head, the N1 rows of A's block, then B's N2 rows
    embedding and read-out (lm_head)    averaged
Nothing is retrained. Per head, the merged layer computes x = [x_A, x_B] and y = [y_A, y_B]
(each neuron fires as in its parent given the same input), but the attention of a head sums over
all its neurons, so the read-out a = a_A + a_B mixes the two parents: the merged model is not the
sum of the two, it is what the paper evaluates.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bdh.checkpoint import load_model, write_model
from bdh.config import BDHConfig
from bdh.errors import UserError
from bdh.fileio import check_output_dir, output_directory
from bdh.model import BDH
from bdh.rundir import load_checkpoint_tokenizer, resolve_checkpoint

#: config fields the two models must share (what the merged model's shapes and maths depend on)
MUST_AGREE = ("n_layer", "n_embd", "n_head", "vocab_size", "layout", "layernorm", "decay")


def check_mergeable(a: BDHConfig, b: BDHConfig, names: tuple[str, str] = ("A", "B")) -> None:
    """A UserError naming every field in MUST_AGREE on which the two configs differ."""
    differ = [f"{k}: {getattr(a, k)!r} != {getattr(b, k)!r}" for k in MUST_AGREE if getattr(a, k) != getattr(b, k)]
    if differ:
        raise UserError(f"cannot merge {names[0]} and {names[1]}: they differ in {'; '.join(differ)} "
                        "(merging needs the same D, heads, layers, vocabulary and layer form)")


def merged_config(a: BDHConfig, b: BDHConfig) -> BDHConfig:
    """A's config with N_A + N_B neurons per head (the multiplier that gives that N)."""
    nh, D = a.n_head, a.n_embd
    total = a.neurons_per_head + b.neurons_per_head
    if (total * nh) % D:
        raise UserError(f"the merged model would have {total} neurons per head, which no integer "
                        f"mlp_internal_dim_multiplier gives with n_embd {D} and n_head {nh} (need {total} * {nh} "
                        f"divisible by {D})")
    config = BDHConfig.from_dict({**a.to_dict(), "mlp_internal_dim_multiplier": total * nh // D})
    assert config.neurons_per_head == total
    return config


@torch.no_grad()
def merge_models(a: BDH, b: BDH) -> BDH:
    """The merged model (see the module docstring), on A's device, in eval mode."""
    for model, name in ((a, "A"), (b, "B")):
        if model.model_type != "bdh":
            raise UserError(f"{name} is a {model.model_type} model: only BDH "
                            "models merge by concatenating neurons")
    check_mergeable(a.config, b.config)
    config = merged_config(a.config, b.config)
    D = config.n_embd
    device = a.lm_head.device
    b = b.to(device)
    tensors = {
        "encoder": torch.cat([a.encoder, b.encoder], dim=2),  # nh, D, N1 + N2
        "encoder_v": torch.cat([a.encoder_v, b.encoder_v], dim=2),  # nh, D, N1 + N2
        "decoder": torch.cat([a._E(), b._E()], dim=1).reshape(-1, D),  # nh * (N1 + N2), D
        "freqs": torch.cat([a.freqs, b.freqs], dim=1),  # nh, N1 + N2
        "embed.weight": (a.embed.weight + b.embed.weight) / 2,  # V, D
        "lm_head": (a.lm_head + b.lm_head) / 2,  # D, V
    }
    merged = BDH(config).to(device)
    merged.load_weights(tensors, source="merged weights")
    return merged.eval()


def merge_checkpoints(path_a: str | Path, path_b: str | Path, out: str | Path, overwrite: bool = False) -> BDH:
    """Merge the checkpoints at path_a and path_b into a checkpoint directory `out` (config, weights, tokenizer)."""
    out = Path(out)
    check_output_dir(out, overwrite, "--overwrite")
    dirs = [resolve_checkpoint(p) for p in (path_a, path_b)]
    models = [load_model(d) for d in dirs]
    tokenizers = [load_checkpoint_tokenizer(d, m.config.vocab_size) for d, m in zip(dirs, models)]
    if tokenizers[0].fingerprint != tokenizers[1].fingerprint:
        raise UserError(f"cannot merge {dirs[0]} and {dirs[1]}: their tokenizers differ ({tokenizers[0].kind} "
                        f"{tokenizers[0].vocab_size} vs {tokenizers[1].kind} {tokenizers[1].vocab_size}, or other "
                        "merges): merge models fine-tuned from one base")
    for model, d in zip(models, dirs):
        if model.model_type != "bdh":
            raise UserError(f"{d} holds a {model.model_type} model: only BDH models merge by concatenating neurons")
    check_mergeable(models[0].config, models[1].config, (str(dirs[0]), str(dirs[1])))
    merged = merge_models(*models)
    with output_directory(out, kind="model", replace=overwrite, flag="--overwrite") as tmp:
        write_model(merged, tmp)
        tokenizers[0].save(tmp)
    return merged

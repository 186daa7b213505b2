"""Small models for the interpretability tests: random tiny ones, and one with a planted concept."""

import numpy as np
import torch

from bdh import BDH, BDHConfig

CONCEPT_TOKEN = ord("$")
SPACE = ord(" ")
#: head 1 neurons that are the only ones to fire (x > 0, and y from the second "$" on) on "$";
#: chosen among the slowest RoPE frequencies so that two "$" always see each other positively
PLANTED = (200, 250)
#: head 0 neurons that fire strongly on spaces, in concept and control sentences alike
DISTRACTOR = (5, 6)


def tiny_model(scale=0.15, **overrides):
    """The tiny preset with weights large enough that attention matters."""
    model = BDH(BDHConfig.from_name("tiny", **overrides))
    with torch.no_grad():
        for p in (model.encoder, model.encoder_v, model.decoder):
            p.normal_(std=scale)
    return model.eval()


def planted_model(seed=0):
    """tiny BDH (2 layers, 2 heads, N = 256) in which only neurons 200 and 250 of head 1 fire on "$".

    After the LayerNorm, "$" is +5.57 on embedding dimension 0 and the same small negative value
    on every other dimension; every other byte is negative on dimension 0. The planted encoder
    columns read dimension 0 alone; every other column has no weight on dimension 0, a small
    positive one on dimension 1 and zero sum over the rest, so it gives exactly x = 0 on "$".
    With the decoder at zero, v (and so x) is the same in every layer. From the second "$" of a
    sentence on, the attention read-out of head 1 is a positive multiple of "$"'s embedding, and
    the planted D_y columns (dimension 0) turn it into y > 0. The distractor neurons read
    dimension 1, large on spaces only: their synapses are the strongest of any text, and larger
    on average after a concept sentence than the planted ones, so neither the size of sigma nor
    its mean over concept sentences would find the concept.
    """
    g = torch.Generator().manual_seed(seed)
    model = BDH(BDHConfig.from_name("tiny"))
    D = model.config.n_embd
    with torch.no_grad():
        emb = torch.randn(256, D, generator=g)
        emb[:, 0] = -2.5
        emb[:, 1] = -1.0
        emb[CONCEPT_TOKEN] = 0.0
        emb[CONCEPT_TOKEN, 0] = 4.0
        emb[SPACE, 1] = 6.0
        model.embed.weight.copy_(emb)
        enc = torch.randn(model.encoder.shape, generator=g) * 0.3  # nh, D, N
        enc[:, 2:, :] -= enc[:, 2:, :].mean(dim=1, keepdim=True)
        enc[:, 0, :] = 0.0
        enc[:, 1, :] = 0.05
        enc_v = torch.randn(model.encoder_v.shape, generator=g) * 0.3
        for j in PLANTED:
            enc[1, :, j] = 0.0
            enc[1, 0, j] = 1.0
            enc_v[1, :, j] = 0.0
            enc_v[1, 0, j] = 1.0
        for j in DISTRACTOR:
            enc[0, :, j] = 0.0
            enc[0, 1, j] = 4.0
            enc_v[0, :, j] = 0.0
            enc_v[0, 1, j] = 2.0
        model.encoder.copy_(enc)
        model.encoder_v.copy_(enc_v)
        model.decoder.zero_()
    return model.eval()


def planted_sentences(n, planted, seed):
    """Random lowercase 'words'; concept sentences carry three "$" each, control ones none."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        words = ["".join(rng.choice(list("abcdefghijklmnop"), rng.integers(2, 7))) for _ in range(rng.integers(6, 10))]
        if planted:
            for k in rng.choice(len(words), 3, replace=False):
                words[k] = words[k] + "$"
        out.append(" ".join(words))
    return out

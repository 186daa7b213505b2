"""One BDH checkpoint behind `bdh explore`: every answer the page asks for, as plain JSON types.

Each method takes the text the page shows and computes what it needs from it (a few hundred
tokens cost milliseconds at the `small` size), so the server holds no per-user state. Activations
come through `model.capture` (bdh.interp.capture.ActivationCapture), which sets one callback on the
model; the model is therefore used by one request at a time (`Explorer.lock`), and a request's
answer does not depend on what else the server is doing.

Shapes (legend in bdh.config): x and y (B, nh, T, N); a neuron is named by (head h, index i in
the head), i.e. neuron h N + i of the n = nh N neurons, the same neuron in every layer (BDH shares
one layer's weights across layers).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Iterator, Sequence

import torch

from bdh.checkpoint import load_model
from bdh.data.tokenizers import TextStream, encode_prompt
from bdh.errors import UserError
from bdh.generate import sample_next
from bdh.interp.capture import ActivationCapture, eval_mode
from bdh.interp.concepts import concept_synapses, contrast_set, contrast_sets
from bdh.interp.graph import graph_factors
from bdh.interp.synapses import MAX_SYNAPSE_ENTRIES, synapse_layers, synapse_state, synapse_traces, top_synapses
from bdh.interp.tokens import describe_token, token_words, visible
from bdh.rundir import load_checkpoint_tokenizer, resolve_checkpoint

#: tokens per forward when reading a text (the state is carried between pieces: same results, less memory)
CHUNK = 256
DEFAULT_CONTRAST = ("money_en", "weather_en")


class Explorer:
    """A loaded model, its tokenizer and its neuron graph factors, answering the page's questions."""

    def __init__(self, model, tokenizer, name: str = "model", max_synapses: int = MAX_SYNAPSE_ENTRIES):
        if not {"x", "y"} <= set(model.activation_sites):
            raise UserError(f"{name}: explore shows neurons and synapses, which a {model.model_type} model does not "
                            "have; give a BDH checkpoint")
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        c = model.config
        self.n_layer, self.n_head, self.N = c.n_layer, c.n_head, c.neurons_per_head
        self.device = next(model.parameters()).device
        self.max_synapses = max_synapses
        self.lock = threading.Lock()  # model.capture holds one callback: one request at a time
        self._graph = None
        self._concepts: dict[tuple[str, str], dict] = {}

    @classmethod
    def load(cls, path: str | Path, device="cpu", **kwargs) -> "Explorer":
        """From a checkpoint or run directory (config.json + model.safetensors: no code is run)."""
        directory = resolve_checkpoint(path)
        model = load_model(directory, device=device)
        tokenizer = load_checkpoint_tokenizer(directory, model.config.vocab_size)
        return cls(model, tokenizer, name=str(path), **kwargs)

    # what the page needs to lay itself out ---------------------------------------------------------
    def info(self) -> dict:
        c = self.model.config
        return {"name": self.name, "model_type": self.model.model_type, "n_layer": self.n_layer,
                "n_head": self.n_head, "neurons_per_head": self.N, "n_neurons": self.n_head * self.N,
                "n_embd": c.n_embd, "vocab_size": c.vocab_size, "params": self.model.num_params(),
                "tokenizer": self.tokenizer.kind,
                "synapse_layers": list(range(1, self.n_layer)), "contrast_sets": contrast_sets(),
                "default_contrast": list(DEFAULT_CONTRAST)}

    def encode(self, text: str) -> list[int]:
        return encode_prompt(self.tokenizer, text)

    def check_neuron(self, layer: int, head: int, neuron: int) -> None:
        if not (0 <= layer < self.n_layer and 0 <= head < self.n_head and 0 <= neuron < self.N):
            raise UserError(f"no neuron at layer {layer}, head {head}, index {neuron}: this model has layers "
                            f"0..{self.n_layer - 1}, heads 0..{self.n_head - 1}, neurons 0..{self.N - 1} per head")

    def _check_position(self, ids: Sequence[int], position: int) -> None:
        if not 0 <= position < len(ids):
            raise UserError(f"position {position} is outside the text, which has {len(ids)} tokens (0..{len(ids) - 1})")

    # one pass over a text, with activations reduced as they come ---------------------------------
    def _collect(self, ids: Sequence[int], sites: Sequence[str], reduce) -> torch.Tensor:
        """Read ids in pieces of CHUNK tokens (state carried) and return the logits (T, V);
        reduce(site, layer, start, act) sees each captured activation act (nh, T_piece, N) of the
        piece starting at position `start`."""
        start = 0

        def record(site: str, layer: int, act: torch.Tensor) -> None:
            reduce(site, layer, start, act[0])

        idx = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        logits, state = [], None
        with self.lock, eval_mode(self.model), torch.no_grad(), \
                ActivationCapture(self.model, sites, keep=False, callback=record):
            for start in range(0, idx.shape[1], CHUNK):
                out = self.model(idx[:, start:start + CHUNK], state=state)
                logits.append(out.logits[0].float().cpu())
                state = out.state
        return torch.cat(logits)

    # Read: per position, the next-token distribution, the loss, how many neurons fire -------------
    def read(self, text: str, top: int = 5) -> dict:
        """tokens, next-token candidates and loss per position, active x and y per layer and head."""
        ids = self.encode(text)
        T = len(ids)
        counts = {site: torch.zeros(T, self.n_layer, self.n_head, dtype=torch.long) for site in ("x", "y")}

        def reduce(site, layer, start, act):  # act: nh, T_piece, N
            counts[site][start:start + act.shape[1], layer] = (act > 0).sum(dim=-1).T

        logp = torch.log_softmax(self._collect(ids, ("x", "y"), reduce), dim=-1)  # T, V
        probs, cand = torch.topk(logp.exp(), min(top, logp.shape[-1]), dim=-1)  # T, k
        targets = torch.tensor(ids[1:], dtype=torch.long)
        loss = (-logp[:-1].gather(1, targets[:, None])[:, 0]).tolist() + [None]
        _, pieces = token_words(self.tokenizer, ids)
        names = self._pieces(cand.reshape(-1).tolist())
        k = cand.shape[1]
        scored = [v for v in loss if v is not None]
        return {
            "model": self.name, "n_tokens": T, "ids": ids, "pieces": pieces,
            "top": [[{"id": int(cand[t, r]), "piece": names[t * k + r], "p": round(float(probs[t, r]), 5)}
                     for r in range(k)] for t in range(T)],
            "loss": [None if v is None else round(v, 4) for v in loss],
            "mean_loss": round(sum(scored) / len(scored), 4) if scored else None,
            "x_active": counts["x"].tolist(), "y_active": counts["y"].tolist(),  # T, L, nh
        }

    def _pieces(self, ids: list[int]) -> list[str]:
        cache: dict[int, str] = {}
        for i in ids:
            if i not in cache:
                cache[i] = visible(self.tokenizer.decode([i]))
        return [cache[i] for i in ids]

    # Neurons: the active neurons at one position, and one neuron over the text --------------------
    def position(self, text: str, position: int, top: int = 12) -> dict:
        """x and y of every layer and head at one position (L, nh, N), and the most active y neurons."""
        ids = self.encode(text)
        self._check_position(ids, position)
        keep = {}

        def reduce(site, layer, start, act):
            if start <= position < start + act.shape[1]:
                keep[(site, layer)] = act[:, position - start].clone()  # nh, N

        self._collect(ids[:position + 1], ("x", "y"), reduce)
        x = torch.stack([keep[("x", l)] for l in range(self.n_layer)])  # L, nh, N
        y = torch.stack([keep[("y", l)] for l in range(self.n_layer)])
        values, flat = torch.topk(y.reshape(-1), min(top, y.numel()))
        best = []
        for v, f in zip(values.tolist(), flat.tolist()):
            if v <= 0:
                break
            layer, rest = divmod(f, self.n_head * self.N)
            best.append({"layer": layer, "head": rest // self.N, "neuron": rest % self.N, "y": round(v, 5)})
        return {"model": self.name, "position": position, "token": describe_token(self.tokenizer, ids, position),
                "x": _rounded(x), "y": _rounded(y), "x_max": float(x.max()), "y_max": float(y.max()),
                "x_active": (x > 0).sum(-1).tolist(), "y_active": (y > 0).sum(-1).tolist(), "top_y": best}

    def neuron(self, text: str, layer: int, head: int, neuron: int, site: str = "y", top: int = 10,
               edges: int = 8) -> dict:
        """One neuron: its value at every position of the text, where it fires most, its graph edges."""
        self.check_neuron(layer, head, neuron)
        ids = self.encode(text)
        trace = torch.zeros(len(ids))

        def reduce(s, l, start, act):
            if s == site and l == layer:
                trace[start:start + act.shape[1]] = act[head, :, neuron]

        self._collect(ids, (site,), reduce)
        order = torch.argsort(trace, descending=True, stable=True)[:top]
        strongest = [{**describe_token(self.tokenizer, ids, int(t)), "value": round(float(trace[t]), 5)}
                     for t in order.tolist() if trace[t] > 0]
        return {"model": self.name, "layer": layer, "head": head, "neuron": neuron, "site": site,
                "index": head * self.N + neuron, "values": _rounded(trace), "fires": int((trace > 0).sum()),
                "n_tokens": len(ids), "strongest": strongest, **self.edges(head, neuron, edges)}

    def edges(self, head: int, neuron: int, k: int = 8) -> dict:
        """The largest entries of row and column h N + i of G = E D_x (the paper's Section 5), no self-loop."""
        if self._graph is None:
            self._graph = graph_factors(self.model)[:2]
        E, Dx = self._graph  # (n, D), (D, n)
        g = head * self.N + neuron
        out_row, in_col = E[g] @ Dx, E @ Dx[:, g]  # n, n
        return {"out_edges": self._strongest(out_row, g, k), "in_edges": self._strongest(in_col, g, k)}

    def _strongest(self, weights: torch.Tensor, itself: int, k: int) -> list[dict]:
        weights = weights.clone()
        weights[itself] = -float("inf")
        values, idx = torch.topk(weights, min(k, len(weights) - 1))
        return [{"head": i // self.N, "neuron": i % self.N, "index": i, "weight": round(v, 5)}
                for v, i in zip(values.tolist(), idx.tolist())]

    # Synapses: sigma (Eq. 16) after a position, a synapse over the text, concept synapses ----------
    def synapses(self, text: str, position: int, k: int = 15) -> dict:
        """The k strongest entries of sigma after reading the text up to and including `position`."""
        ids = self.encode(text)
        self._check_position(ids, position)
        synapse_layers(self.n_layer)
        with self.lock:
            sigma = synapse_state(self.model, ids[:position + 1], max_entries=self.max_synapses)
        found = top_synapses(sigma, k)
        concept = self._concept_keys()
        for d in found:
            d["value"] = round(d["value"], 5)
            d["concept"] = concept.get((d["layer"], d["head"], d["i"], d["j"]))
        totals = {str(l): round(float(s.double().sum()), 4) for l, s in sigma.items()}
        return {"model": self.name, "position": position, "token": describe_token(self.tokenizer, ids, position),
                "top": found, "layer_totals": totals}

    def trace(self, text: str, layer: int, head: int, i: int, j: int) -> dict:
        """sigma(i, j) of synapse layer `layer`, head `head`, after every position, and each token's increment."""
        if not (1 <= layer < self.n_layer and 0 <= head < self.n_head and 0 <= i < self.N and 0 <= j < self.N):
            raise UserError(f"no synapse {layer}:{head}:{i}:{j}: synapse layers 1..{self.n_layer - 1}, heads "
                            f"0..{self.n_head - 1}, neurons 0..{self.N - 1}")
        ids = self.encode(text)
        with self.lock:
            out = synapse_traces(self.model, ids, [(layer, head, i, j)])
        return {"model": self.name, "synapse": {"layer": layer, "head": head, "i": i, "j": j},
                "values": _rounded(torch.from_numpy(out["values"][0])),
                "increments": _rounded(torch.from_numpy(out["increments"][0]))}

    def concepts(self, text: str | None = None, concept: str = DEFAULT_CONTRAST[0], control: str = DEFAULT_CONTRAST[1],
                 top: int = 8) -> dict:
        """Concept synapses of a shipped contrast set (computed once per pair, then kept) and, for a text,
        where each fires in it (its increment y_i x_j > 0)."""
        key = (concept, control)
        if key not in self._concepts:
            sentences = contrast_set(concept), contrast_set(control)
            with self.lock:
                found = concept_synapses(self.model, self.tokenizer, *sentences, top_k=top, drivers=3,
                                         max_entries=self.max_synapses)
            keep = ("layer", "head", "i", "j", "p", "p_bonferroni", "rank_biserial", "mean_concept", "mean_control",
                    "drivers", "example")
            self._concepts[key] = {"concept": concept, "control": control, "n_synapses": found["n_synapses"],
                                   "top": [{k: d[k] for k in keep if k in d} for d in found["top"]]}
        result = {"model": self.name, **self._concepts[key]}
        if text and result["top"]:
            ids = self.encode(text)
            synapses = [(d["layer"], d["head"], d["i"], d["j"]) for d in result["top"]]
            with self.lock:
                inc = synapse_traces(self.model, ids, synapses)["increments"]  # S, T
            result["fires"] = [[t for t in range(len(ids)) if inc[s, t] > 0] for s in range(len(synapses))]
        return result

    def _concept_keys(self) -> dict[tuple, str]:
        return {(d["layer"], d["head"], d["i"], d["j"]): f"{found['concept']} vs {found['control']}"
                for found in self._concepts.values() for d in found["top"]}

    # Generate: the text continued from its carried state, one token at a time ----------------------
    def generate(self, text: str, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 seed: int = 0, top: int = 5) -> Iterator[dict]:
        """Prefill the text once, then step: one event per new token, with the text it adds, its
        probability, the next candidates and how many neurons fired in x and y (per layer) reading it."""
        ids = self.encode(text)
        if max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if temperature < 0 or (top_k is not None and top_k < 1):
            raise UserError(f"need temperature >= 0 and top_k >= 1, got temperature {temperature}, top_k {top_k}")
        return self._generate(ids, max_new_tokens, temperature, top_k, seed, top)

    def _generate(self, ids, max_new_tokens, temperature, top_k, seed, top) -> Iterator[dict]:
        generator = torch.Generator(device=self.device).manual_seed(seed)
        pieces: list[str] = []
        stream = TextStream(self.tokenizer, _Collect(pieces))
        counts = torch.zeros(2, self.n_layer, dtype=torch.long)

        def record(site: str, layer: int, act: torch.Tensor) -> None:
            counts[("x", "y").index(site), layer] = int((act > 0).sum())

        with self.lock, eval_mode(self.model), torch.no_grad():
            out = self.model(torch.tensor([ids], dtype=torch.long, device=self.device))  # the prefill, once
        logits, state = out.logits[:, -1], out.state
        for n in range(max_new_tokens):
            probs = torch.softmax(logits.float(), dim=-1)[0]
            token = sample_next(logits, temperature, top_k, generator=generator)  # 1, 1
            with self.lock, eval_mode(self.model), ActivationCapture(self.model, ("x", "y"), keep=False,
                                                                     callback=record):
                out = self.model.step(token, state)  # the state is carried and updated in place
            logits = out.logits[:, -1]
            pieces.clear()
            stream.push(int(token))
            if n + 1 == max_new_tokens:
                stream.close()
            p, cand = torch.topk(torch.softmax(logits.float(), dim=-1)[0], min(top, logits.shape[-1]))
            yield {"index": n, "id": int(token), "text": "".join(pieces), "piece": self._pieces([int(token)])[0],
                   "p": round(float(probs[int(token)]), 5), "x_active": counts[0].tolist(),
                   "y_active": counts[1].tolist(), "position": len(ids) + n,
                   "next": [{"piece": s, "p": round(float(q), 5)} for s, q in zip(self._pieces(cand.tolist()), p)]}


class _Collect:
    """A file-like sink for TextStream that keeps what it is given."""

    def __init__(self, parts: list[str]):
        self.parts = parts

    def write(self, text: str) -> None:
        self.parts.append(text)

    def flush(self) -> None:
        pass


def _rounded(t: torch.Tensor, digits: int = 4):
    """Nested lists of floats with `digits` significant digits (smaller JSON, same picture)."""
    return [float(f"{v:.{digits}g}") for v in t.tolist()] if t.dim() == 1 else [_rounded(r, digits) for r in t]

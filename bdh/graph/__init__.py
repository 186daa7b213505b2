"""BDH as a graph of neurons with synapse states (the paper's Section 2): the graph form, built from
a BDH-GPU, tested equal to it in the eq8 layout without LayerNorm (see bdh.graph.form)."""

from bdh.graph.form import Edges, GraphBDH, GraphState, from_model

__all__ = ["Edges", "GraphBDH", "GraphState", "from_model"]

"""Looking inside BDH: activations, sparsity, synapses, concept synapses, the neuron graph, reports.

Every measure of the paper's interpretability analysis (its Sections 5 and 6) is a plain function
here; `bdh inspect` (bdh.interp.report.inspect) puts them all in one report.json + report.html. scipy, matplotlib, igraph and powerlaw (the
"analysis" extra) are imported only by the functions that need them.
"""

from bdh.interp.capture import (
    SITES, ActivationCapture, Chunk, batch_activations, capture_activations, run_accumulators, stream_activations,
)
from bdh.interp.concepts import (
    concept_synapses, contrast_set, contrast_sets, evaluate_synapses, mann_whitney, read_sentences, synapse_values,
)
from bdh.interp.graph import analyse_neuron_graph, fit_degree_power_law, louvain_modularity, neuron_graph
from bdh.interp.report import build_report, inspect, write_report
from bdh.interp.sparsity import sparsity, sparsity_probe
from bdh.interp.synapses import (
    load_synapses, save_synapses, synapse_degrees, synapse_state, synapse_summary, synapse_traces, top_synapses,
)

__all__ = [
    "SITES", "ActivationCapture", "Chunk", "analyse_neuron_graph", "batch_activations", "build_report",
    "capture_activations", "concept_synapses", "contrast_set", "contrast_sets", "evaluate_synapses",
    "fit_degree_power_law", "inspect", "load_synapses", "louvain_modularity", "mann_whitney", "neuron_graph",
    "read_sentences", "run_accumulators", "save_synapses", "sparsity", "sparsity_probe", "stream_activations",
    "synapse_degrees", "synapse_state", "synapse_summary", "synapse_traces", "synapse_values", "top_synapses",
    "write_report",
]

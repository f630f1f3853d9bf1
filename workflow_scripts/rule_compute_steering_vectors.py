"""Rule compute_steering_vectors: CAA and LDA vectors per layer from the extracted activations of the
contrast prompts, and, for models with a recurrent state and a state mode, the mean state difference
per layer."""


from workflow_scripts import CODE_VERSION
from workflow_scripts.adapters import load_job_adapter
from workflow_scripts.behavior_data import load_prepared
from workflow_scripts.jobs import start_job
from workflow_scripts.steering import (
    answer_activations,
    caa_vectors,
    contrast_prompts,
    lda_vectors,
    save_vectors,
    state_vectors,
)

sm = snakemake  # noqa: F821 - injected by Snakemake
log = start_job(sm)
positive, negative, layers = answer_activations(sm.input.activations)  # (N, L, D) at the answer letter
residual = {"caa": caa_vectors(positive, negative), "lda": lda_vectors(positive, negative)}
log.info(
    "residual vectors from %d positive / %d negative prompts, %d layers", len(positive), len(negative), len(layers)
)

adapter = load_job_adapter(sm.params.spec, sm.wildcards.model, sm.input.manifest)
deltas = None
if sm.params.state and adapter.has_recurrent_state:  # only where a state mode is configured
    items = load_prepared(sm.input.behavior_items)["generate"]
    deltas = state_vectors(adapter, *contrast_prompts(adapter, items), batch_size=sm.params.batch_size)
    log.info("state vectors: %s", sorted(deltas[0]))
save_vectors(
    sm.output.vectors,
    residual,
    deltas,
    {"model": sm.wildcards.model, "behavior": sm.wildcards.behavior, "layers": layers, "n_pairs": len(positive),
     "code_version": CODE_VERSION},
)

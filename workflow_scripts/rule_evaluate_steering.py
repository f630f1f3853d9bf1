"""Rule evaluate_steering: p_matching and nonsense for every test item, layer and multiplier, for each
configured variant (vector kind, answer format, steered positions, residual / state / both)."""

from workflow_scripts.adapters import load_job_adapter
from workflow_scripts.atomic import atomic_path
from workflow_scripts.behavior_data import load_prepared
from workflow_scripts.jobs import start_job
from workflow_scripts.steering import load_vectors, sweep_variants

sm = snakemake  # noqa: F821 - injected by Snakemake
log = start_job(sm)
adapter = load_job_adapter(sm.params.spec, sm.wildcards.model, sm.input.manifest)
residual, deltas, _ = load_vectors(sm.input.vectors)
test_items = load_prepared(sm.input.behavior_items)["test"]
sweep = sweep_variants(adapter, test_items, residual, deltas, sm.params.settings, sm.wildcards.behavior)
with atomic_path(sm.output.sweep) as tmp:
    sweep.to_parquet(tmp, index=False)

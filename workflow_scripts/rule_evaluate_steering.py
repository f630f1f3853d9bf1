"""Rule evaluate_steering: p_matching and nonsense for every test item, layer and multiplier, for each
configured variant (vector kind, answer format, steered positions, residual / state / both)."""

import itertools

import pandas as pd

from workflow_scripts.adapters import load_job_adapter
from workflow_scripts.atomic import atomic_path
from workflow_scripts.behavior_data import AB_LABELS, NUMBERED_LABELS, load_prepared, to_numbered_format
from workflow_scripts.jobs import start_job
from workflow_scripts.steering import load_vectors, steering_sweep

sm = snakemake  # noqa: F821 - injected by Snakemake
log = start_job(sm)
settings = sm.params.settings
adapter = load_job_adapter(sm.params.spec, sm.wildcards.model, sm.input.manifest)
residual, deltas, info = load_vectors(sm.input.vectors)
test_items = load_prepared(sm.input.behavior_items)["test"]
formats = {"ab": (test_items, AB_LABELS), "numbered": (to_numbered_format(test_items), NUMBERED_LABELS)}
modes = [m for m in settings["modes"] if m == "residual" or adapter.has_recurrent_state]
if len(modes) < len(settings["modes"]):
    log.info("model %s has no recurrent state: modes %s only", sm.wildcards.model, modes)
layers = list(range(adapter.n_layers)) if settings["layers"] == "all" else settings["layers"]
tables = []
for vector, answer_format, n_positions, mode in itertools.product(
    settings["vectors"], settings["formats"], settings["positions"], modes
):
    if mode == "state" and vector != settings["vectors"][0]:
        continue  # state steering uses no residual vector: one run, filed under the first kind
    items, labels = formats[answer_format]
    log.info("sweep: vector=%s format=%s positions=%d mode=%s", vector, answer_format, n_positions, mode)
    table = steering_sweep(
        adapter, items, mode=mode, residual_vectors=residual[vector], state_deltas=deltas, layers=layers,
        multipliers=settings["multipliers"], n_positions=n_positions, labels=labels,
        behavior=sm.wildcards.behavior, item_ids=[item["id"] for item in items],
        layers_per_pass=settings["layers_per_pass"],
    )
    tables.append(table.assign(model=sm.wildcards.model, vector=vector, format=answer_format))
with atomic_path(sm.output.sweep) as tmp:
    pd.concat(tables, ignore_index=True).to_parquet(tmp, index=False)

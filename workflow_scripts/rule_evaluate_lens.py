"""Rule evaluate_lens: per layer CE, KL to the final layer and entropy of the logit and tuned lenses
on held-out tokens, and a prediction trajectory of the sample sentence."""


import numpy as np

from workflow_scripts.adapters import load_job_adapter
from workflow_scripts.atomic import atomic_path
from workflow_scripts.jobs import start_job
from workflow_scripts.lens import evaluate_lenses, load_lens, prediction_trajectory

sm = snakemake  # noqa: F821 - injected by Snakemake
log = start_job(sm)
adapter = load_job_adapter(sm.params.spec, sm.wildcards.model, sm.input.manifest)
lens = load_lens(adapter, sm.input.weights)
table = evaluate_lenses(adapter, np.load(sm.input.corpus)["eval"], lens, batch_size=sm.params.batch_size,
                        model_name=sm.wildcards.model)
with atomic_path(sm.output.evaluation) as tmp:
    table.to_csv(tmp, index=False)
trajectory = prediction_trajectory(adapter, adapter.encode(sm.params.sample_text), lens)
with atomic_path(sm.output.trajectory) as tmp:  # Parquet: decoded tokens may hold any character
    trajectory.assign(model=sm.wildcards.model).to_parquet(tmp, index=False)
log.info("\n%s", table[["lens", "stream", "ce_nats", "kl_nats", "ce_bits_per_byte"]].to_string())

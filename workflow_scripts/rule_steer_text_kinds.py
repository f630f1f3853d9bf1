"""Rule steer_text_kinds: one model's contrast and random vectors and the sweep of their effect on
held-out continuations of each kind of text."""

import json

from safetensors.torch import save_file

from workflow_scripts.adapters import load_job_adapter
from workflow_scripts.atomic import atomic_path
from workflow_scripts.jobs import start_job
from workflow_scripts.text_steering import text_steering

sm = snakemake  # noqa: F821 - injected by Snakemake
log = start_job(sm)
adapter = load_job_adapter(sm.params.spec, sm.wildcards.model, sm.input.manifest)
passages = [json.loads(line) for line in open(sm.input.passages)]
vectors, sweep = text_steering(adapter, passages, sm.params.settings, sm.params.seed)
with atomic_path(sm.output.vectors) as tmp:
    save_file({name: tensor.contiguous() for name, tensor in vectors.items()}, tmp)
with atomic_path(sm.output.sweep) as tmp:
    sweep.to_parquet(tmp, index=False)

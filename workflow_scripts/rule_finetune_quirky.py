"""Rule finetune_quirky: fine-tune a model on a quirky dataset (Alice and Bob mixed, loss on the
answer token), keep the checkpoint with the best validation loss, and publish it as a model."""

import json
from pathlib import Path

import pandas as pd

from workflow_scripts import CODE_VERSION
from workflow_scripts.adapters import load_job_adapter
from workflow_scripts.atomic import atomic_write_text
from workflow_scripts.finetune import FinetuneSettings, finetune_quirky
from workflow_scripts.jobs import start_job

sm = snakemake  # noqa: F821 - injected by Snakemake
log = start_job(sm)
adapter = load_job_adapter(sm.params.base_spec, sm.wildcards.base, sm.input.base_manifest)
table = pd.read_parquet(sm.input.table)
# The config schema has checked quirky.finetune; byte-level tokenizers split " True", hence the shared prefix.
settings = FinetuneSettings(**sm.params.finetune, seed=sm.params.seed, allow_shared_prefix=True)
weights = Path(sm.output.manifest).parent / "weights"
summary = finetune_quirky(adapter, table[table.split == "train"], table[table.split == "validation"], weights, settings)
summary.pop("adapter", None)
manifest = {"name": f"{sm.wildcards.base}+{sm.wildcards.dataset}", "spec": sm.params.spec, "base": sm.wildcards.base,
            "dataset": sm.wildcards.dataset, "finetune": summary, "code_version": CODE_VERSION}
atomic_write_text(sm.output.manifest, json.dumps(manifest, indent=2, sort_keys=True, default=str))

"""Rule train_model: a seeded model of the configured architecture trained on the shared token chunks,
saved like a downloaded model, with its held-out loss and bits per byte while it trained."""

from pathlib import Path

from workflow_scripts.jobs import start_job
from workflow_scripts.pretraining import train_configured_model

sm = snakemake  # noqa: F821 - injected by Snakemake
log = start_job(sm)
manifest = train_configured_model(
    sm.params.spec,
    sm.wildcards.model,
    Path(sm.input.tokenizer),
    Path(sm.input.tokens),
    Path(sm.input.stats),
    Path(sm.output.manifest).parent,
    sm.output.history,
)
log.info(
    "model %s trained: final held-out %.4f bits per byte (unigram %.4f)",
    sm.wildcards.model,
    manifest["training"]["final_eval_bits_per_byte"],
    manifest["training"]["unigram_bits_per_byte"],
)

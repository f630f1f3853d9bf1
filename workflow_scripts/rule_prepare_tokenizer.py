"""Rule prepare_tokenizer: a corpus split into train and eval documents, a BPE tokenizer trained on the
train documents, both splits as token chunks, for the models the pipeline trains."""

from pathlib import Path

from workflow_scripts.corpus import source_documents
from workflow_scripts.jobs import start_job
from workflow_scripts.pretraining import prepare_tokenizer

sm = snakemake  # noqa: F821 - injected by Snakemake
log = start_job(sm)
documents, name = source_documents(sm.params.settings["corpus"])
stats = prepare_tokenizer(documents, sm.params.settings, Path(sm.output.stats).parent, name)
log.info("tokenizer %s: %s", sm.wildcards.tokenizer, stats)

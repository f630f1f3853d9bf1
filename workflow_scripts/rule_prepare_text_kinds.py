"""Rule prepare_text_kinds: evaluation and vector passages of the two kinds of text, as JSON lines."""

import json

from workflow_scripts.atomic import atomic_write_text
from workflow_scripts.corpus import source_documents
from workflow_scripts.jobs import start_job
from workflow_scripts.text_steering import sample_passages

sm = snakemake  # noqa: F821 - injected by Snakemake
log = start_job(sm)
passages = []
for kind in sm.params.settings["kinds"]:
    documents, source_name = source_documents(kind["source"])
    passages += sample_passages(documents, kind["name"], sm.params.settings, sm.params.seed)
    log.info("kind %s: passages from %s", kind["name"], source_name)
atomic_write_text(sm.output.passages, "".join(json.dumps(passage) + "\n" for passage in passages))

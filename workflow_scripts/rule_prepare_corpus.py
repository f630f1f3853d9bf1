"""Rule prepare_corpus: a seeded sample of token sequences, disjoint train and evaluation documents,
in one model's tokenization."""

import json
from pathlib import Path

import numpy as np

from workflow_scripts.atomic import atomic_path
from workflow_scripts.jobs import start_job
from workflow_scripts.corpus import source_documents
from workflow_scripts.lens import build_corpus, sequence_length
from workflow_scripts.model_sources import load_model_tokenizer, pinned_spec

sm = snakemake  # noqa: F821 - injected by Snakemake
log = start_job(sm)
corpus = sm.params.corpus
texts, name = source_documents(corpus["source"])
manifest = json.loads(Path(sm.input.manifest).read_text())
tokenizer = load_model_tokenizer(pinned_spec(sm.params.spec, manifest), Path(sm.input.manifest).parent / "weights")
eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
seq_len = sequence_length(corpus["seq_len"], getattr(tokenizer, "model_max_length", None))
if seq_len != corpus["seq_len"]:
    log.warning("sequences of %d tokens, not %d: the tokenizer's model_max_length", seq_len, corpus["seq_len"])
train, evaluation = build_corpus(
    texts, lambda text: tokenizer(text, add_special_tokens=False)["input_ids"], seq_len,
    corpus["train_tokens"], corpus["eval_tokens"], sm.params.seed, eos_token_id=eos, source_name=name,
)
with atomic_path(sm.output.corpus) as tmp:
    with open(tmp, "wb") as handle:
        np.savez(handle, train=train, eval=evaluation)
log.info("%s: %s train and %s eval sequences of %d tokens", name, train.shape[0], evaluation.shape[0], seq_len)

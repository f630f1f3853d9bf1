"""Rule prepare_corpus: a seeded sample of token sequences, disjoint train and evaluation documents,
in one model's tokenization."""

import json
from pathlib import Path

import numpy as np

from workflow_scripts.atomic import atomic_path
from workflow_scripts.jobs import start_job
from workflow_scripts.lens import (
    build_corpus,
    load_hf_texts,
    python_reference_texts,
    read_text_files,
    sequence_length,
)
from workflow_scripts.model_sources import load_model_tokenizer, pinned_spec

sm = snakemake  # noqa: F821 - injected by Snakemake
log = start_job(sm)
corpus = sm.params.corpus
(kind, source), = corpus["source"].items()
if kind == "python_docs":
    texts, name = python_reference_texts(), "python_docs (pydoc_data.topics)"
elif kind == "text_files":
    texts, name = read_text_files(source), f"text files {source!r}"
else:
    texts = load_hf_texts(source["name"], source["split"], source.get("text_column", "text"),
                          config_name=source.get("config"), revision=source["revision"])
    name = f"{source['name']} ({source['split']})"
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

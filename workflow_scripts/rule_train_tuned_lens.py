"""Rule train_tuned_lens: one affine translator per lensed stream (the embeddings and blocks
0..n-2, as in the tuned-lens package), trained to match the final layer (KL); written in our format
and in the package's (a folder its TunedLens.from_model_and_pretrained loads).
Resumable: a checkpoint beside the output lets a killed job continue where it stopped."""

from pathlib import Path

import numpy as np

from workflow_scripts.adapters import load_job_adapter
from workflow_scripts.jobs import start_job
from workflow_scripts.lens import TunedLens, export_tuned_lens_package, save_lens, train_lens

sm = snakemake  # noqa: F821 - injected by Snakemake
log = start_job(sm)
training = dict(sm.params.training)
checkpoint_every = training.pop("checkpoint_every")
adapter = load_job_adapter(sm.params.spec, sm.wildcards.model, sm.input.manifest)
train_tokens = np.load(sm.input.corpus)["train"]
lens = TunedLens(adapter, include_input=True)
checkpoint = Path(sm.output.weights).with_name("checkpoint.pt")
history = train_lens(adapter, lens, train_tokens, seed=sm.params.seed, checkpoint_path=checkpoint,
                     checkpoint_every=checkpoint_every, **training)
save_lens(lens, sm.output.weights, extra={"model": sm.wildcards.model, "training": sm.params.training,
                                          "final_loss": history[-1]["loss"] if history else None})
export_tuned_lens_package(lens, sm.output.package)  # the same translators, loadable by the tuned-lens package
checkpoint.unlink(missing_ok=True)  # the lens is saved: nothing left to resume

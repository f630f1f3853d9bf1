"""Rule train_sae: a TopK SAE per layer of one model's activation file; its reconstruction, dead latents
and language-model loss on the held-out windows, and its latents there (for the feature comparisons)."""

import numpy as np
import pandas as pd
import torch

from workflow_scripts.activations import read_layer, read_metadata
from workflow_scripts.adapters import load_job_adapter
from workflow_scripts.atomic import atomic_dir, atomic_path
from workflow_scripts.jobs import start_job
from workflow_scripts.sae import encode, language_model_losses, reconstruct, reconstruction_metrics, train_sae

sm = snakemake  # noqa: F821 - injected by Snakemake
log = start_job(sm)
settings = sm.params.settings
adapter = load_job_adapter(sm.params.spec, sm.wildcards.model, sm.input.manifest)
layers = read_metadata(sm.input.activations)["layers"]
metrics, histories, latents, coders, replacements = [], [], {}, {}, {}
for layer in layers:
    rows, vectors = read_layer(sm.input.activations, layer)
    train = torch.from_numpy(vectors[(rows["split"] == "train").to_numpy()]).float()
    held_out_rows = (rows["split"] == "eval").to_numpy()
    held_out = torch.from_numpy(vectors[held_out_rows]).float()
    sae, history = train_sae(
        train, expansion=settings["expansion"], k=settings["k"], steps=settings["steps"],
        batch_size=settings["batch_size"], lr=settings["lr"], seed=settings["seed"],
    )  # fmt: skip
    indices, values = encode(sae, held_out)
    metrics.append({"model": sm.wildcards.model, "layer": layer, **reconstruction_metrics(sae, held_out, indices)})
    histories += [{"model": sm.wildcards.model, "layer": layer, **record} for record in history]
    latents.update({f"indices_{layer}": indices, f"values_{layer}": values})
    coders[layer] = sae
    train_mean = train.mean(0)
    replacements[f"sae_{layer}"] = (layer, lambda x, sae=sae: reconstruct(sae, x))
    replacements[f"mean_{layer}"] = (layer, lambda x, mean=train_mean: mean.to(x.device).expand_as(x))
    log.info("layer %d: %s", layer, metrics[-1])

# The held-out windows' tokens, in the order of the latents (example, then position).
tokens = rows[held_out_rows][["example_index", "position", "token_id"]].reset_index(drop=True)
token_lists = [group["token_id"].tolist() for _, group in tokens.groupby("example_index", sort=True)]
losses = language_model_losses(adapter, token_lists, replacements, settings["batch_windows"])
for record in metrics:
    sae_loss, mean_loss = losses[f"sae_{record['layer']}"], losses[f"mean_{record['layer']}"]
    record.update(
        clean_loss=losses["clean"], sae_loss=sae_loss, mean_ablation_loss=mean_loss,
        # Share of the loss a mean ablation adds that the SAE's reconstruction gives back.
        loss_recovered=(mean_loss - sae_loss) / (mean_loss - losses["clean"]),
    )  # fmt: skip
    log.info("layer %d: clean %.4f, SAE %.4f, mean ablation %.4f nats per token", record["layer"],
             losses["clean"], sae_loss, mean_loss)  # fmt: skip

with atomic_dir(sm.output.coders) as tmp:
    for layer, sae in coders.items():
        sae.save_to_disk(tmp / f"layer_{layer}")
with atomic_path(sm.output.latents) as tmp:
    with open(tmp, "wb") as handle:
        np.savez(
            handle, layers=np.array(layers), n_latents=coders[layers[0]].num_latents,
            **{column: tokens[column].to_numpy() for column in tokens}, **latents,
        )  # fmt: skip
with atomic_path(sm.output.history) as tmp:
    pd.DataFrame(histories).to_csv(tmp, index=False, float_format="%.5f")
with atomic_path(sm.output.metrics) as tmp:
    pd.DataFrame(metrics).to_csv(tmp, index=False, float_format="%.5f")

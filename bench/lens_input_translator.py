"""Does training a translator for the embeddings change the other translators? Prints JSON lines.

The pipeline trains, for every family, translators for the embeddings and blocks 0..n-2 (the tuned-lens
package's layout for transformers). The paper's Mamba and RWKV lenses had none for the embeddings (their
hooks read block outputs only). The translators' losses are separate, but the gradient is clipped by one
norm over all of them, so an extra translator with a large gradient shrinks every other translator's step.
This script trains both layouts on the same data and seed and compares, per block, the held-out KL to the
model's output and the CE; it also prints the gradient norm before clipping, how many steps were clipped and
the embeddings translator's share of the squared gradient norm.

Needs the models and their lens corpora, e.g. for the matched trio:
  .venv/bin/snakemake --cores 2 --configfile configs/matched.yaml data/lens/{rwkv,mamba,llama}-matched/corpus.npz
Run: .venv/bin/python bench/lens_input_translator.py [--config configs/matched.yaml] [--models rwkv-matched ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from workflow_scripts.adapters import load_job_adapter  # noqa: E402
from workflow_scripts.configuration import load_config  # noqa: E402
import workflow_scripts.lens as lens_module  # noqa: E402
from workflow_scripts.lens import INPUT_LAYER, TunedLens, evaluate_lenses, train_lens  # noqa: E402


def gradient_shares(lens: TunedLens) -> tuple[float, float]:
    """(total gradient norm, the embeddings translator's share of its square) of the current gradient."""
    squares = {layer: sum(float(p.grad.pow(2).sum()) for p in lens.translators[i].parameters())
               for i, layer in enumerate(lens.layers)}  # fmt: skip
    total = sum(squares.values())
    return total**0.5, squares.get(INPUT_LAYER, 0.0) / total if total else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/matched.yaml")
    parser.add_argument("--models", nargs="+", default=["rwkv-matched", "mamba-matched", "llama-matched"])
    args = parser.parse_args()
    config = load_config(args.config)
    training = {key: value for key, value in config["lens"]["training"].items() if key != "checkpoint_every"}
    for model in args.models:
        manifest = Path(f"data/models/{model}/manifest.json")
        corpus = np.load(f"data/lens/{model}/corpus.npz")
        adapter = load_job_adapter(config["models"][model], model, manifest)
        tables = {}
        for include_input in (True, False):
            torch.manual_seed(config["seed"])
            lens = TunedLens(adapter, include_input=include_input)
            norms, shares = [], []
            clip = lens_module.clip_grad_norm_

            def observed_clip(parameters, max_norm, _lens=lens, _clip=clip):  # the gradient before clipping
                norm, share = gradient_shares(_lens)
                norms.append(norm)
                shares.append(share)
                return _clip(parameters, max_norm)

            lens_module.clip_grad_norm_ = observed_clip
            try:
                train_lens(adapter, lens, corpus["train"], seed=config["seed"], progress=False, **training)
            finally:
                lens_module.clip_grad_norm_ = clip
            table = evaluate_lenses(adapter, corpus["eval"], lens, batch_size=config["lens"]["eval_batch_size"],
                                    model_name=model, include_input=include_input)  # fmt: skip
            tables[include_input] = table[table["lens"] == "tuned"].set_index("layer")
            print(json.dumps({
                "model": model, "embeddings_translator": include_input, "steps": len(norms),
                "grad_norm_before_clip_median": round(float(np.median(norms)), 4),
                "steps_clipped": int(sum(norm > training["max_grad_norm"] for norm in norms)),
                "embeddings_share_of_grad_sq_mean": round(float(np.mean(shares)), 4),
            }), flush=True)  # fmt: skip
        with_input, without = tables[True], tables[False]
        for layer in without.index:
            print(json.dumps({
                "model": model, "stream": without.loc[layer, "stream"],
                "kl_nats_with_embeddings_translator": round(float(with_input.loc[layer, "kl_nats"]), 4),
                "kl_nats_without": round(float(without.loc[layer, "kl_nats"]), 4),
                "ce_nats_with": round(float(with_input.loc[layer, "ce_nats"]), 4),
                "ce_nats_without": round(float(without.loc[layer, "ce_nats"]), 4),
            }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

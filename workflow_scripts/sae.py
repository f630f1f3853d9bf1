"""TopK sparse autoencoders on the residual stream, trained from activation files, and what they keep.

The SAE is eai-sparsify's `SparseCoder` (TopK activation, unit-norm decoder, AuxK loss for dead
latents). Why that library: it installs from wheels alone beside torch 2.13 with five small pure-Python
dependencies, and its coder trains from an (N, d) tensor on the CPU; sae-lens does not install from
wheels alone here (transformer-lens needs transformers-stream-generator, published only as source) and
would bring wandb and transformer-lens besides. sparsify's `Trainer` wants a live model to hook, so the
short loop below (`train_sae`) is ours; it follows that trainer's recipe (decoder bias started at the
data mean, Adam at 2e-4 / sqrt(latents / 2^14), decoder rows renormalised and their gradient's parallel
part removed each step, AuxK on latents silent for a while).

The shared token set: windows of the chunks a pretraining tokenizer wrote (data/tokenizers/<name>/
tokens.npz), token ids as they are, so every model that shares the tokenizer reads exactly the same
tokens, with no text round trip. SAEs train on windows of the training split (the text the models
learned from; the held-out split is capped at a few dozen sequences, too few for thousands of latents);
reconstruction, dead latents, the language-model loss and the feature correlations are measured on the
held-out split (documents neither the models nor the SAEs saw).
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

from workflow_scripts.prompts import PromptItem

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # the eager decoder: no Triton kernels on a CPU
log = logging.getLogger(__name__)

AUXK_ALPHA = 1 / 32  # weight of the AuxK loss (the TopK SAE paper's and sparsify's suggestion)


def token_windows(tokens_path, train_windows: int, eval_windows: int, seed: int):
    """The shared token set: `train_windows` chunks drawn (seeded) from the training split and the
    first `eval_windows` chunks of the held-out split, as prompt items (split "train" / "eval") and
    their token lists."""
    with np.load(tokens_path) as tokens:
        train, held_out = tokens["train"], tokens["eval"]
    if train_windows > len(train) or eval_windows > len(held_out):
        raise ValueError(
            f"{tokens_path} has {len(train)} training and {len(held_out)} held-out chunks; sae.tokens asks for "
            f"{train_windows} and {eval_windows}"
        )
    picked = np.sort(np.random.default_rng(seed).choice(len(train), size=train_windows, replace=False))
    items, token_lists = [], []
    for split, rows, chunks in (("train", picked, train), ("eval", range(eval_windows), held_out)):
        for row in rows:
            items.append(PromptItem(index=len(items), id=f"{split}-{row}", prompt="", split=split))
            token_lists.append(chunks[row].tolist())
    return items, token_lists


def train_sae(activations: torch.Tensor, *, expansion: int, k: int, steps: int, batch_size: int,
              lr: float | None, seed: int, log_every: int = 100):  # fmt: skip
    """A TopK SAE (sparsify SparseCoder) fitted to (N, d) activations; returns it and its training
    history (step, fvu on the batch, dead latents = silent for the last N tokens)."""
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(seed)
    n_tokens, width = activations.shape
    sae = SparseCoder(width, SparseCoderConfig(expansion_factor=expansion, k=k))
    sae.b_dec.data = activations.mean(0).to(sae.dtype)
    rate = lr if lr is not None else 2e-4 / (sae.num_latents / 2**14) ** 0.5
    optimizer = torch.optim.Adam(sae.parameters(), lr=rate)
    tokens_since_fired = torch.zeros(sae.num_latents, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    history = []
    for step in range(steps):
        batch = activations[torch.randint(n_tokens, (batch_size,), generator=generator)]
        sae.set_decoder_norm_to_unit_norm()
        out = sae(batch, dead_mask=tokens_since_fired > n_tokens)
        loss = out.fvu + AUXK_ALPHA * out.auxk_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        tokens_since_fired += batch_size
        tokens_since_fired[out.latent_indices.flatten().unique()] = 0
        if (step + 1) % log_every == 0 or step + 1 == steps:
            dead = int((tokens_since_fired > n_tokens).sum())
            history.append({"step": step + 1, "fvu": float(out.fvu.detach()), "dead_latents": dead})
            log.info("step %d/%d: fvu %.4f, %d latents silent for %d tokens", step + 1, steps, history[-1]["fvu"],
                     dead, n_tokens)  # fmt: skip
    sae.set_decoder_norm_to_unit_norm()
    return sae.eval().requires_grad_(False), history


@torch.no_grad()
def encode(sae, activations: torch.Tensor, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Top-k latent indices (N, k) int32 and activations (N, k) float32 of each row."""
    indices, values = [], []
    for start in range(0, len(activations), chunk):
        encoded = sae.encode(activations[start : start + chunk].to(sae.dtype))
        indices.append(encoded.top_indices.int().numpy())
        values.append(encoded.top_acts.float().numpy())
    return np.concatenate(indices), np.concatenate(values)


@torch.no_grad()
def reconstruct(sae, activations: torch.Tensor) -> torch.Tensor:
    """The SAE's reconstruction of (..., d) activations (its decoder takes one row per token)."""
    rows = activations.reshape(-1, activations.shape[-1]).to(sae.device, sae.dtype)
    encoded = sae.encode(rows)
    rebuilt = sae.decode(encoded.top_acts, encoded.top_indices)
    return rebuilt.to(activations.device, activations.dtype).reshape(activations.shape)


def reconstruction_metrics(sae, activations: torch.Tensor, indices: np.ndarray) -> dict:
    """Fraction of variance unexplained over the rows (squared error over squared distance from the
    rows' mean), and dead latents: those active on none of the rows."""
    error = (activations - reconstruct(sae, activations)).pow(2).sum()
    spread = (activations - activations.mean(0)).pow(2).sum()
    fired = np.zeros(sae.num_latents, dtype=bool)
    fired[np.unique(indices)] = True
    return {
        "fvu": float(error / spread),
        "dead_latents": int((~fired).sum()),
        "dead_fraction": float((~fired).mean()),
        "n_latents": int(sae.num_latents),
    }


@torch.no_grad()
def language_model_losses(adapter, token_lists: list[list[int]], replacements: dict, batch_size: int) -> dict:
    """Mean next-token cross-entropy (nats) of the model on the windows, clean and with block outputs
    replaced: replacements maps a name to (layer, fn) where fn turns the (B, T, D) residual stream after
    that block into its replacement. The replacement is made by adding (replacement - original) at every
    position through the adapter's add_to_block (the block's own output is the same in both passes:
    nothing before it changes). Returns {"clean": loss, name: loss, ...}."""
    layers = sorted({layer for layer, _ in replacements.values()})
    totals = {"clean": 0.0, **{name: 0.0 for name in replacements}}
    n_predictions = 0
    for start in range(0, len(token_lists), batch_size):
        batch = adapter.batch(token_lists[start : start + batch_size])
        if not bool(batch.attention_mask.all()):
            raise ValueError("the windows must all have the same length (no padding)")
        positions = torch.arange(batch.input_ids.shape[1])[None, :].expand(batch.input_ids.shape[0], -1)
        stream, logits = adapter.residual_stream(batch, positions, layers)  # (L, B, T, D)
        targets = batch.input_ids[:, 1:]
        totals["clean"] += _summed_loss(logits, targets)
        for name, (layer, replace) in replacements.items():
            original = stream[layers.index(layer)].float()
            with adapter.add_to_block(layer, replace(original) - original, positions):
                replaced_logits, _ = adapter.forward(batch.input_ids, batch.attention_mask)
            totals[name] += _summed_loss(replaced_logits, targets)
        n_predictions += targets.numel()
    return {name: total / n_predictions for name, total in totals.items()}


def _summed_loss(logits: torch.Tensor, targets: torch.Tensor) -> float:
    predicted = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    targets = targets.reshape(-1).to(predicted.device)
    return float(torch.nn.functional.cross_entropy(predicted, targets, reduction="sum"))

"""Slow, independent recomputations that the tests and the benchmarks compare the pipeline against.
Nothing in the workflow imports this module.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from workflow_scripts.adapters import ModelAdapter
from workflow_scripts.behavior_data import AB_LABELS, answer_label
from workflow_scripts.steering import answer_token_ids, item_prompt


def load_behavior(directory) -> tuple[list[dict], list[dict]]:
    """(generate_items, test_items) of a folder in the CAA layout, as stored (unchecked)."""
    loaded = []
    for file_name in ("generate_dataset.json", "test_dataset_ab.json"):
        path = Path(directory) / file_name
        if not path.is_file():
            raise FileNotFoundError(f"behaviour file {path} not found")
        items = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(items, list):
            raise ValueError(f"{path}: expected a JSON list of items, found {type(items).__name__}")
        loaded.append(items)
    return loaded[0], loaded[1]


@torch.no_grad()
def residual_activations(adapter: ModelAdapter, prompts: Sequence[str], batch_size: int = 8) -> torch.Tensor:
    """(N, L, D) float32 on the CPU: the residual stream after every block at each prompt's last token."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    chunks = []
    for start in range(0, len(prompts), batch_size):
        batch = adapter.batch([adapter.encode_prompt(prompt) for prompt in prompts[start : start + batch_size]])
        acts, _ = adapter.residual_stream(batch, batch.last_positions(1))  # (L, B, 1, D)
        chunks.append(acts[:, :, 0].transpose(0, 1).float().cpu())
    return torch.cat(chunks)


@torch.no_grad()
def naive_sweep(
    adapter: ModelAdapter,
    items: Sequence[dict],
    *,
    residual_vectors: torch.Tensor | None = None,
    state_deltas: dict | None = None,
    layers: Sequence[int] | None = None,
    multipliers: Sequence[float] = (-1.0, 0.0, 1.0),
    n_positions: int = 1,
    labels: Sequence[str] = AB_LABELS,
    chat: bool = True,
    behavior: str | None = None,
    item_ids: Sequence | None = None,
    mode: str = "residual",
) -> pd.DataFrame:
    """The table of `steering_sweep`, recomputed from scratch for every (item, layer, multiplier),
    batch size 1, nothing shared between settings, the answer probabilities taken by hand from the
    softmax. "residual": the whole prompt in one call with the vector added at the last
    `n_positions` tokens. "state" / "both": the prefix, then each of the last `n_positions` tokens
    alone, multiplier * delta added to the layer's state before each (and in "both" the vector to the
    block's output at each). Only the last position's logits are computed, as the sweep does."""
    if mode not in ("residual", "state", "both"):
        raise ValueError(f"unknown mode {mode!r}")
    layers = range(adapter.n_layers) if layers is None else layers
    records = []
    item_ids = range(len(items)) if item_ids is None else item_ids
    for item_id, item in zip(item_ids, items):
        prompt = item_prompt(adapter, item, chat)
        ids = torch.tensor([adapter.encode_prompt(prompt)], device=adapter.device)
        label_ids = answer_token_ids(adapter, prompt, labels)
        matching = label_ids[list(labels).index(answer_label(item["answer_matching_behavior"]))]
        length = ids.shape[1]
        for layer in layers:
            for multiplier in multipliers:
                vector = None if mode == "state" else multiplier * torch.as_tensor(residual_vectors[layer]).float()
                if mode == "residual":
                    with adapter.add_to_block(layer, vector, torch.arange(length - n_positions, length)[None]):
                        logits, _ = adapter.forward(ids, logits_to_keep=1)
                else:
                    _, state = adapter.forward(ids[:, :-n_positions], use_cache=True, logits_to_keep=1)
                    with contextlib.ExitStack() as steered:
                        if vector is not None:  # only the last tokens run from here on: steer every one
                            steered.enter_context(adapter.add_to_block(layer, vector))
                        for step in range(length - n_positions, length):
                            adapter.add_to_state(state, layer, state_deltas[layer], scale=multiplier)
                            logits, state = adapter.forward(ids[:, step : step + 1], state=state)
                probs = logits[0, -1].float().softmax(-1)
                both = float(probs[label_ids].sum())
                records.append({
                    "behavior": behavior, "mode": mode, "n_positions": n_positions, "layer": layer,
                    "multiplier": float(multiplier), "item": item_id,
                    "p_matching": float(probs[matching]) / both, "nonsense": 1.0 - both,
                })  # fmt: skip
    return pd.DataFrame.from_records(records)

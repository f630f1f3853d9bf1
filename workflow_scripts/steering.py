"""Contrastive activation addition (CAA) and recurrent-state steering on A/B behaviour datasets.

Everything here talks to a model only through `ModelAdapter`, so the same code steers transformers
and RNNs. Three steps:

1. Data: behaviour items (their schema, checks and the (1)/(2) rewrite live in behavior_data).
2. Vectors: per layer, mean(positive) - mean(negative) of the residual stream at the answer letter
   (optionally LDA-whitened), and for models with a recurrent state, the mean difference of each
   named state tensor after the positive and the negative prompts.
3. Evaluation: for every test prompt, layer and multiplier, p(matching answer) among the two
   choices and the probability mass outside them ("nonsense").

The fast sweep runs each test prompt's prefix once, then evaluates all multipliers of a few layers
in one batched pass over the last token(s); bench/reference.py recomputes it one setting at a time.
"""

from __future__ import annotations

import contextlib
import logging
import json
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from workflow_scripts.activations import read_layer, read_metadata
from workflow_scripts.adapters import ModelAdapter, mean_state_values
from workflow_scripts.behavior_data import AB_LABELS, NUMBERED_LABELS, answer_label, to_numbered_format, validate_items

log = logging.getLogger(__name__)
# Multipliers of the paper's evaluation.
MULTIPLIERS = (-3.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 3.0)
MODES = ("residual", "state", "both")
# The assistant turn is opened with "(" so that the next token is the choice label.
ANSWER_PREFIX = "("

# A layer's state deltas: state-tensor name -> tensor shaped like one row of that tensor.
StateDeltas = dict[int, dict[str, torch.Tensor]]


# ----- prompts -------------------------------------------------------------------------------------
def item_prompt(adapter: ModelAdapter, item: dict, chat: bool = True) -> str:
    """The model's prompt for an item: user turn = question, assistant turn opened with '('."""
    return adapter.build_prompt(item["question"], ANSWER_PREFIX, chat=chat)


def contrast_prompts(adapter: ModelAdapter, items: Sequence[dict], chat: bool = True) -> tuple[list[str], list[str]]:
    """Positive prompts (prompt + matching label) and negative ones (prompt + the other label)."""
    positives, negatives = [], []
    for item in items:
        prompt = item_prompt(adapter, item, chat)
        positives.append(prompt + answer_label(item["answer_matching_behavior"]))
        negatives.append(prompt + answer_label(item["answer_not_matching_behavior"]))
    return positives, negatives


def answer_token_ids(adapter: ModelAdapter, prompt: str, labels: Sequence[str] = AB_LABELS) -> list[int]:
    """The token id of each label as it tokenizes right after `prompt` (which ends with '(').
    Reading the label's id in context, not alone, avoids picking a variant with a leading space."""
    base = adapter.encode_prompt(prompt)
    ids = []
    for label in labels:
        extended = adapter.encode_prompt(prompt + label)
        if len(extended) != len(base) + 1 or extended[: len(base)] != base:
            raise ValueError(
                f"label {label!r} does not tokenize as one extra token after the prompt: prompt ends with "
                f"tokens {base[-3:]}, prompt+label ends with {extended[-4:]}; its probability cannot be read "
                "from one next-token distribution"
            )
        ids.append(extended[-1])
    if len(set(ids)) != len(ids):
        raise ValueError(f"labels {list(labels)} share token ids {ids}")
    return ids


# ----- steering vectors -----------------------------------------------------------------------------
def _as_float64(array, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(array) if not isinstance(array, torch.Tensor) else array)
    if tensor.dim() != 3:
        raise ValueError(f"{name} activations must be (n_items, n_layers, d_model); got shape {tuple(tensor.shape)}")
    return tensor.detach().to("cpu", torch.float64)


def _check_pair(positive, negative) -> tuple[torch.Tensor, torch.Tensor]:
    pos, neg = _as_float64(positive, "positive"), _as_float64(negative, "negative")
    if pos.shape[1:] != neg.shape[1:]:
        raise ValueError(f"positive (n, L, D) = {tuple(pos.shape)} and negative {tuple(neg.shape)} differ in L or D")
    if pos.shape[0] == 0 or neg.shape[0] == 0:
        raise ValueError("need at least one positive and one negative activation")
    return pos, neg


def caa_vectors(positive, negative) -> torch.Tensor:
    """(L, D) float32: per layer mean(positive) - mean(negative), not normalised."""
    pos, neg = _check_pair(positive, negative)
    return (pos.mean(0) - neg.mean(0)).float()


def lda_vectors(positive, negative) -> torch.Tensor:
    """(L, D) float32: per layer pinv(Cov(positives and negatives together)) @ CAA vector.

    The pseudo-inverse drops directions whose variance is below D * 1.19e-7 (float32's epsilon) of the
    largest: the cutoff the reference's float32 `pinv` applies by default (3e-4 of the largest at
    D = 2560). With fewer items than dimensions the covariance is singular, and float64's own cutoff
    (~1e-12) would invert near-null directions, giving a vector of another norm and direction."""
    pos, neg = _check_pair(positive, negative)
    difference = pos.mean(0) - neg.mean(0)
    together = torch.cat([pos, neg])  # (2N, L, D)
    cutoff = together.shape[2] * torch.finfo(torch.float32).eps
    vectors = []
    for layer in range(together.shape[1]):
        covariance = torch.cov(together[:, layer].T)  # unbiased, as torch's and numpy's default
        vectors.append(torch.linalg.pinv(covariance, hermitian=True, rtol=cutoff) @ difference[layer])
    return torch.stack(vectors).float()


def answer_activations(path) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Positive and negative (N, L, D) activations of an extracted contrast prompt set at each
    prompt's last token (the answer letter), whatever other positions the extraction kept; and the
    layers they are of."""
    metadata = read_metadata(path)
    layers = metadata["layers"]
    sides: dict[str, list[np.ndarray]] = {"positive": [], "negative": []}
    for layer in layers:
        rows, vectors = read_layer(path, layer)
        last = (rows["position_from_end"] == -1).to_numpy()
        missing = sorted(set(rows["example_id"]) - set(rows["example_id"][last]))
        if missing:
            raise ValueError(
                f"{path}: no activation at the last token (position_from_end -1) for prompts {missing[:5]} "
                f"({len(missing)} in all): extraction.positions = {metadata['positions']!r} must include it "
                "('last', 'all' or a list with -1)"
            )
        for side in sides:
            sides[side].append(vectors[last & (rows["label"] == side).to_numpy()])
    positive, negative = (np.stack(sides[side], axis=1) for side in ("positive", "negative"))
    return positive, negative, layers


def state_vectors(
    adapter: ModelAdapter, positive_prompts: Sequence[str], negative_prompts: Sequence[str], batch_size: int = 8
) -> StateDeltas:
    """Per layer and state value (`adapter.state_values`: the state in its true units): mean state
    after the positive prompts minus mean state after the negative ones, shaped like one row of the
    tensor (float32, or float64 where the values are: RWKV-4's wkv sums can pass float32's range)."""
    if not adapter.has_recurrent_state:
        raise ValueError(
            f"model {adapter.info.get('name')!r} has no recurrent state (its cache grows with the prompt); "
            "state steering needs a fixed-size state"
        )
    positive, dtypes = _mean_states(adapter, positive_prompts, batch_size, "positive")
    negative, _ = _mean_states(adapter, negative_prompts, batch_size, "negative")
    return {
        layer: {
            name: (positive[layer][name] - negative[layer][name]).to(torch.promote_types(dtypes[name], torch.float32))
            for name in positive[layer]
        }
        for layer in range(adapter.n_layers)
    }


def _mean_states(adapter: ModelAdapter, prompts: Sequence[str], batch_size: int, side: str) -> tuple[StateDeltas, dict]:
    if not prompts:
        raise ValueError(f"no {side} prompts")
    return mean_state_values(adapter, [adapter.encode_prompt(prompt) for prompt in prompts], batch_size)


# ----- evaluation ----------------------------------------------------------------------------------
def _check_sweep(adapter, items, mode, residual_vectors, state_deltas, layers, multipliers, n_positions, labels):
    if mode not in MODES:
        raise ValueError(f"unknown steering mode {mode!r}; allowed: {list(MODES)}")
    if mode in ("residual", "both"):
        if residual_vectors is None:
            raise ValueError(f"mode {mode!r} needs residual_vectors")
        expected = (adapter.n_layers, adapter.hidden_size)
        residual_vectors = torch.as_tensor(residual_vectors, dtype=torch.float32)
        if tuple(residual_vectors.shape) != expected:
            shape = tuple(residual_vectors.shape)
            raise ValueError(f"residual_vectors have shape {shape}; this model needs {expected}")
    if mode in ("state", "both"):
        if not adapter.has_recurrent_state:
            raise ValueError(f"mode {mode!r}: model {adapter.info.get('name')!r} has no recurrent state to steer")
        if state_deltas is None:
            raise ValueError(f"mode {mode!r} needs state_deltas")
    layers = list(range(adapter.n_layers)) if layers is None else [int(layer) for layer in layers]
    bad = [layer for layer in layers if not 0 <= layer < adapter.n_layers]
    if bad:
        raise ValueError(f"layers {bad} outside 0..{adapter.n_layers - 1}")
    if mode in ("state", "both"):
        stateful = adapter.stateful_layers()  # looked up once: a port's may build an empty cache
        stateless = [layer for layer in layers if layer not in stateful]
        if stateless:
            raise ValueError(
                f"mode {mode!r}: layers {stateless} of model {adapter.info.get('name')!r} have no recurrent state "
                f"to steer (a hybrid's attention layers keep a key/value cache); layers with one: {stateful}"
            )
        absent = [layer for layer in layers if layer not in state_deltas]
        if absent:
            raise ValueError(f"state_deltas have no entry for layers {absent}")
    if not multipliers:
        raise ValueError("no multipliers")
    if n_positions < 1:
        raise ValueError(f"n_positions must be >= 1, got {n_positions}")
    validate_items(items, "test items", labels)
    return layers, [float(m) for m in multipliers], residual_vectors


def _check_state_deltas(adapter, state, state_deltas, layers):
    """Each delta must name a state value of its layer and have the shape of one of its rows."""
    for layer in layers:
        tensors = adapter.state_values(state, layer)
        for name, delta in state_deltas[layer].items():
            if name not in tensors:
                raise ValueError(f"state delta {name!r} of layer {layer}: the state has only {sorted(tensors)}")
            if tuple(delta.shape) != tuple(tensors[name].shape[1:]):
                raise ValueError(
                    f"state delta {name!r} of layer {layer} has shape {tuple(delta.shape)}; "
                    f"one row of that state tensor is {tuple(tensors[name].shape[1:])}"
                )


def _prepared_items(adapter, items, labels, chat, n_positions, item_ids):
    """Per item: its id, token ids, the labels' token ids and which label matches."""
    item_ids = list(range(len(items))) if item_ids is None else list(item_ids)
    if len(item_ids) != len(items):
        raise ValueError(f"{len(item_ids)} item_ids for {len(items)} items")
    prepared = []
    for item_id, item in zip(item_ids, items):
        prompt = item_prompt(adapter, item, chat)
        tokens = adapter.encode_prompt(prompt)
        if len(tokens) <= n_positions:
            raise ValueError(
                f"item {item_id}: prompt has {len(tokens)} tokens, not more than n_positions={n_positions}"
            )
        label_ids = answer_token_ids(adapter, prompt, labels)
        matching = list(labels).index(answer_label(item["answer_matching_behavior"]))
        prepared.append((item_id, tokens, label_ids, matching))
    return prepared


def _answer_metrics(last_logits: torch.Tensor, label_ids: list[int], matching: int):
    """(p_matching, nonsense) per row from (rows, vocab) next-token logits."""
    probs = last_logits.float().softmax(-1)[:, label_ids]  # (rows, 2)
    total = probs.sum(-1)
    return probs[:, matching] / total, 1.0 - total


def _records(behavior, mode, n_positions, item_id, layer_of_row, multiplier_of_row, p_matching, nonsense):
    return [
        {
            "behavior": behavior,
            "mode": mode,
            "n_positions": n_positions,
            "layer": layer,
            "multiplier": multiplier,
            "item": item_id,
            "p_matching": float(p),
            "nonsense": float(q),
        }
        for layer, multiplier, p, q in zip(layer_of_row, multiplier_of_row, p_matching.tolist(), nonsense.tolist())
    ]


def steering_sweep(
    adapter: ModelAdapter,
    items: Sequence[dict],
    *,
    mode: str = "residual",
    residual_vectors: torch.Tensor | None = None,
    state_deltas: StateDeltas | None = None,
    layers: Sequence[int] | None = None,
    multipliers: Sequence[float] = MULTIPLIERS,
    n_positions: int = 1,
    labels: Sequence[str] = AB_LABELS,
    chat: bool = True,
    behavior: str | None = None,
    item_ids: Sequence | None = None,
    layers_per_pass: int = 1,
) -> pd.DataFrame:
    """p_matching and nonsense for every item x layer x multiplier.

    mode "residual" adds multiplier * residual_vectors[layer] to block `layer`'s output at the last
    `n_positions` tokens; "state" runs those tokens one at a time and adds multiplier *
    state_deltas[layer] to that layer's state before each of them (as the reference does: with 3
    positions the delta is added three times); "both" does both.

    Each prefix runs once. Its state is repeated once per (layer, multiplier) of a pass and the last
    tokens run as one batch (token by token in the state modes); `layers_per_pass` > 1 puts several
    layers in one pass (rows of the other layers get a zero vector, which leaves them exact) to trade
    memory for fewer passes.
    """
    layers, multipliers, residual_vectors = _check_sweep(
        adapter, items, mode, residual_vectors, state_deltas, layers, multipliers, n_positions, labels
    )
    if layers_per_pass < 1:
        raise ValueError(f"layers_per_pass must be >= 1, got {layers_per_pass}")
    device = adapter.device
    n_mult = len(multipliers)
    mult_tensor = torch.tensor(multipliers, dtype=torch.float32)
    records = []
    with torch.no_grad():
        prepared = _prepared_items(adapter, items, labels, chat, n_positions, item_ids)
        for item_id, tokens, label_ids, matching in tqdm(prepared, desc=f"sweep ({mode})", unit="item", mininterval=10):
            ids = torch.tensor([tokens], dtype=torch.long, device=device)
            _, prefix_state = adapter.forward(ids[:, :-n_positions], use_cache=True, logits_to_keep=1)
            if mode != "residual" and not records:  # once, on the first item's state
                _check_state_deltas(adapter, prefix_state, state_deltas, layers)
            for start in range(0, len(layers), layers_per_pass):
                group = layers[start : start + layers_per_pass]
                rows = len(group) * n_mult
                scales = {}
                with contextlib.ExitStack() as hooks:
                    for slot, layer in enumerate(group):
                        block = slice(slot * n_mult, (slot + 1) * n_mult)
                        if mode in ("residual", "both"):
                            per_row = torch.zeros(rows, adapter.hidden_size)
                            per_row[block] = mult_tensor[:, None] * residual_vectors[layer].float().cpu()
                            # Positions count from each call's first token: one call of n tokens,
                            # or n calls of one token (state modes), each steered.
                            steps = n_positions if mode == "residual" else 1
                            positions = torch.arange(steps).expand(rows, steps)
                            hooks.enter_context(adapter.add_to_block(layer, per_row, positions=positions))
                        scales[layer] = torch.zeros(rows)
                        scales[layer][block] = mult_tensor
                    if mode == "residual":  # every row continues the one prefix, which stays as it is
                        last_logits = adapter.continue_rows(prefix_state, ids[:, -n_positions:], rows)
                    else:
                        # The forward updates the state in place: every pass gets its own copy.
                        state = adapter.repeat_state(prefix_state, rows)
                        for step in range(len(tokens) - n_positions, len(tokens)):
                            for layer in group:
                                adapter.add_to_state(state, layer, state_deltas[layer], scale=scales[layer])
                            logits, _ = adapter.forward(ids[:, step : step + 1].expand(rows, 1), state=state)
                        last_logits = logits[:, -1]
                p_matching, nonsense = _answer_metrics(last_logits, label_ids, matching)
                layer_of_row = [layer for layer in group for _ in multipliers]
                records += _records(
                    behavior, mode, n_positions, item_id, layer_of_row, multipliers * len(group), p_matching, nonsense
                )
    return pd.DataFrame.from_records(records)


def sweep_variants(
    adapter: ModelAdapter,
    test_items: Sequence[dict],
    residual: dict[str, torch.Tensor],
    state_deltas: StateDeltas | None,
    settings: dict,
    behavior: str,
) -> pd.DataFrame:
    """steering_sweep for every configured variant: vector kind x answer format x steered positions x
    mode (state and both only where the model has a state; state once, as it uses no residual vector,
    filed under the first vector kind). `settings`: the config's steering section for this model.
    Rows carry the model's name, the vector kind and the answer format."""
    import itertools

    formats = {"ab": (test_items, AB_LABELS), "numbered": (to_numbered_format(test_items), NUMBERED_LABELS)}
    modes = [mode for mode in settings["modes"] if mode == "residual" or adapter.has_recurrent_state]
    if len(modes) < len(settings["modes"]):
        log.info("model %s has no recurrent state: modes %s only", adapter.info.get("name"), modes)
    layers = list(range(adapter.n_layers)) if settings["layers"] == "all" else settings["layers"]
    stateful = adapter.stateful_layers()
    tables = []
    variants = itertools.product(settings["vectors"], settings["formats"], settings["positions"], modes)
    for vector, answer_format, n_positions, mode in variants:
        if mode == "state" and vector != settings["vectors"][0]:
            continue
        items, labels = formats[answer_format]
        # With layers "all", a hybrid's state is steered in its recurrent layers (others named are refused).
        every = mode == "residual" or settings["layers"] != "all"
        mode_layers = layers if every else [layer for layer in layers if layer in stateful]
        log.info("sweep: vector=%s format=%s positions=%d mode=%s", vector, answer_format, n_positions, mode)
        table = steering_sweep(
            adapter, items, mode=mode, residual_vectors=residual[vector], state_deltas=state_deltas, layers=mode_layers,
            multipliers=settings["multipliers"], n_positions=n_positions, labels=labels, behavior=behavior,
            item_ids=[item["id"] for item in items], layers_per_pass=settings["layers_per_pass"],
        )  # fmt: skip
        tables.append(table.assign(model=adapter.info.get("name"), vector=vector, format=answer_format))
    return pd.concat(tables, ignore_index=True)


# ----- files ---------------------------------------------------------------------------------------
def save_vectors(path, residual: dict[str, torch.Tensor], state_deltas: StateDeltas | None, metadata: dict) -> None:
    """Residual vectors by kind (caa, lda: (L, D)) and state deltas as one safetensors file."""
    from safetensors.torch import save_file

    from workflow_scripts.atomic import atomic_path

    tensors = {f"residual.{kind}": vectors.contiguous() for kind, vectors in residual.items()}
    for layer, named in (state_deltas or {}).items():
        tensors.update({f"state.{layer}.{name}": delta.contiguous() for name, delta in named.items()})
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"info": json.dumps(metadata, sort_keys=True)})


def load_vectors(path) -> tuple[dict[str, torch.Tensor], StateDeltas, dict]:
    from safetensors import safe_open

    residual, state = {}, {}
    with safe_open(path, framework="pt") as handle:
        metadata = json.loads(handle.metadata()["info"])
        for key in handle.keys():
            parts = key.split(".")
            if parts[0] == "residual":
                residual[parts[1]] = handle.get_tensor(key)
            else:
                state.setdefault(int(parts[1]), {})[parts[2]] = handle.get_tensor(key)
    return residual, state, metadata

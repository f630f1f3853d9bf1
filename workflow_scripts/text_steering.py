"""Steering without instructions: contrast vectors between two kinds of text (e.g. Python code and
English prose), for base models that have no A/B behaviours to steer, and their effect on held-out text.

1. Passages: each kind's documents are cut into passages at line ends. Whole documents go either to
   the evaluation set or to the vector set (seeded), so no evaluation passage shares a document with
   the passages the vectors come from.
2. Vectors, per layer: the mean residual stream at the last prefix token of the first kind's vector
   passages minus the second kind's (the paper's CAA recipe with the two kinds as the contrast), and
   for models with a recurrent state the mean difference of the state after those prefixes (the
   paper's state steering). Baseline: a random direction of the same norm per layer (and per state
   tensor).
3. Effect: an evaluation passage is a prefix of `prefix_tokens` and a continuation of
   `continuation_tokens`. The prefix but its last token runs once; then, for every layer and
   multiplier m, m * vector is added at the last prefix token ("last", the paper's protocol) or at it
   and every continuation token ("all"), and the mean log-probability per continuation token is read
   by teacher forcing. Its change from the unsteered model on the first kind's continuations minus its
   change on the second kind's is the kind shift (nats per token): positive when steering moves the
   model toward the first kind.
"""

from __future__ import annotations

import contextlib
import logging
import random
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from workflow_scripts.adapters import ModelAdapter, mean_state_values

log = logging.getLogger(__name__)
MODES = ("residual", "state", "both")
POSITIONS = ("last", "all")
VECTORS = ("contrast", "random")


# ----- passages ------------------------------------------------------------------------------------
def cut_passages(document: str, min_chars: int) -> list[str]:
    """Consecutive runs of whole lines of at least `min_chars` characters (a shorter tail is dropped,
    and so are runs that are only white space)."""
    passages, lines, size = [], [], 0
    for line in document.splitlines(keepends=True):
        lines.append(line)
        size += len(line)
        if size >= min_chars:
            passage = "".join(lines)
            if passage.strip():
                passages.append(passage)
            lines, size = [], 0
    return passages


def sample_passages(documents, kind: str, settings: dict, seed: int) -> list[dict]:
    """`eval_passages` then `vector_passages` passages of one kind, at most `passages_per_document`
    from any one document (for variety), documents taken in a seeded random order: the first ones fill
    the evaluation set, the next ones the vector set."""
    rng = random.Random(f"{seed}-{kind}")
    documents = list(documents)
    order = list(range(len(documents)))
    rng.shuffle(order)
    wanted = {"evaluation": settings["eval_passages"], "vector": settings["vector_passages"]}
    chosen = {role: [] for role in wanted}
    role = "evaluation"
    for index in order:
        passages = cut_passages(documents[index], settings["passage_chars"])
        picked = rng.sample(passages, min(len(passages), settings["passages_per_document"]))
        for passage in picked:
            chosen[role].append({"kind": kind, "role": role, "document": index, "text": passage})
        if len(chosen[role]) >= wanted[role]:
            chosen[role] = chosen[role][: wanted[role]]
            if role == "vector":
                break
            role = "vector"
    short = {role: len(found) for role, found in chosen.items() if len(found) < wanted[role]}
    if short:
        raise ValueError(
            f"text kind {kind!r}: {len(documents)} documents give only {short} passages of at least "
            f"passage_chars={settings['passage_chars']} characters (at most passages_per_document="
            f"{settings['passages_per_document']} each); wanted eval_passages={wanted['evaluation']} and "
            f"vector_passages={wanted['vector']}: lower them or passage_chars, or use a larger source"
        )
    return chosen["evaluation"] + chosen["vector"]


def passage_tokens(adapter: ModelAdapter, passages: Sequence[dict], n_tokens: int) -> torch.Tensor:
    """(N, n_tokens) ids: the first tokens of each passage as a whole model input."""
    rows = []
    for number, passage in enumerate(passages):
        tokens = adapter.encode_prompt(passage["text"])
        if len(tokens) < n_tokens:
            raise ValueError(
                f"passage {number} ({passage['kind']}, {passage['role']}) has {len(tokens)} tokens for model "
                f"{adapter.info.get('name')!r}, fewer than prefix_tokens + continuation_tokens = {n_tokens}: "
                "raise text_steering.passage_chars or lower the token counts"
            )
        rows.append(tokens[:n_tokens])
    return torch.tensor(rows, dtype=torch.long, device=adapter.device)


# ----- vectors -------------------------------------------------------------------------------------
def contrast_vectors(adapter: ModelAdapter, first: torch.Tensor, second: torch.Tensor, with_state: bool,
                     batch_size: int = 8):  # fmt: skip
    """Residual vectors (L, D) and, `with_state`, state deltas {layer: {name: tensor}}: the mean after
    the `first` prefixes (N, P) minus the mean after the `second` ones, at their last token."""

    def mean_stream(prefixes: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(adapter.n_layers, adapter.hidden_size, dtype=torch.float64)
        with torch.no_grad():
            for start in range(0, len(prefixes), batch_size):
                ids = prefixes[start : start + batch_size]
                batch = adapter.batch(ids.tolist())
                last = torch.full((len(ids), 1), ids.shape[1] - 1, dtype=torch.long)
                streams, _ = adapter.residual_stream(batch, last)  # (L, B, 1, D)
                total += streams[:, :, 0].to("cpu", torch.float64).sum(1)
        return total / len(prefixes)

    residual = (mean_stream(first) - mean_stream(second)).float()
    if not with_state:
        return residual, None
    first_state, dtypes = mean_state_values(adapter, first.tolist(), batch_size)
    second_state, _ = mean_state_values(adapter, second.tolist(), batch_size)
    deltas = {
        layer: {
            name: (first_state[layer][name] - second_state[layer][name]).to(
                torch.promote_types(dtypes[name], torch.float32)
            )
            for name in first_state[layer]
        }
        for layer in first_state
    }
    return residual, deltas


def random_like(residual: torch.Tensor, deltas, seed: int):
    """A random direction with the norm of each layer's residual vector, and of each state delta."""
    generator = torch.Generator().manual_seed(seed)

    def same_norm(tensor: torch.Tensor) -> torch.Tensor:
        direction = torch.randn(tensor.shape, generator=generator, dtype=torch.float64)
        return (direction * tensor.double().norm() / direction.norm()).to(tensor.dtype)

    random_residual = torch.stack([same_norm(vector) for vector in residual])
    random_deltas = None
    if deltas is not None:
        random_deltas = {
            layer: {name: same_norm(delta) for name, delta in named.items()} for layer, named in deltas.items()
        }
    return random_residual, random_deltas


# ----- effect on held-out continuations ------------------------------------------------------------
def continuation_logprob(logits: torch.Tensor, continuation: torch.Tensor) -> torch.Tensor:
    """(rows,) mean log-probability per token of `continuation` (rows, C) under next-token `logits`
    (rows, C, V), logits[:, t] predicting continuation[:, t]."""
    logprobs = logits.float().log_softmax(-1)
    return logprobs.gather(-1, continuation[..., None])[..., 0].mean(-1)


def unsteered_logprob(adapter: ModelAdapter, tokens: torch.Tensor, prefix_tokens: int) -> torch.Tensor:
    """(N,) the plain model's mean log-probability of each row's tokens after the first `prefix_tokens`."""
    with torch.no_grad():
        logits, _ = adapter.forward(tokens)
    return continuation_logprob(logits[:, prefix_tokens - 1 : -1], tokens[:, prefix_tokens:]).cpu()


def continuation_sweep(
    adapter: ModelAdapter,
    tokens: torch.Tensor,
    prefix_tokens: int,
    *,
    mode: str,
    positions: str,
    residual_vectors: torch.Tensor | None,
    state_deltas: dict | None,
    layers: Sequence[int],
    multipliers: Sequence[float],
    passages_per_pass: int = 4,
    layers_per_pass: int = 4,
) -> np.ndarray:
    """(N, len(layers), len(multipliers)) mean log-probability per continuation token of each row of
    `tokens` (N, prefix + continuation) when steered at each layer with each multiplier (see the
    module's docstring). Each row's prefix runs once; its state is repeated for every (layer,
    multiplier) of a pass, and a pass's rows run as one batch (token by token where the state is
    steered at every token)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; allowed: {list(MODES)}")
    if positions not in POSITIONS:
        raise ValueError(f"unknown positions {positions!r}; allowed: {list(POSITIONS)}")
    if mode != "residual" and not adapter.has_recurrent_state:
        raise ValueError(f"mode {mode!r}: model {adapter.info.get('name')!r} has no recurrent state to steer")
    stateful = adapter.stateful_layers() if mode != "residual" else []  # once: a port's may build a cache
    stateless = [layer for layer in layers if mode != "residual" and layer not in stateful]
    if stateless:
        raise ValueError(
            f"mode {mode!r}: layers {stateless} of model {adapter.info.get('name')!r} have no recurrent state to "
            f"steer (a hybrid's attention layers); layers with one: {stateful}"
        )
    if not 2 <= prefix_tokens < tokens.shape[1]:
        raise ValueError(f"prefix_tokens={prefix_tokens}: needs 2 <= prefix_tokens < {tokens.shape[1]} (row length)")
    multiplier_row = torch.tensor([float(m) for m in multipliers])
    n_mult = len(multiplier_row)
    result = np.empty((len(tokens), len(layers), n_mult))
    steer_state = mode in ("state", "both")
    steer_residual = mode in ("residual", "both")
    with torch.no_grad():
        for start in tqdm(range(0, len(tokens), passages_per_pass), desc=f"{mode}/{positions}", mininterval=10):
            rows_tokens = tokens[start : start + passages_per_pass]
            n_rows = len(rows_tokens)
            _, prefix_state = adapter.forward(rows_tokens[:, : prefix_tokens - 1], use_cache=True)
            # From the last prefix token on; the last continuation token predicts nothing we score.
            run_ids = rows_tokens[:, prefix_tokens - 1 : -1]
            continuation = rows_tokens[:, prefix_tokens:]
            for first_layer in range(0, len(layers), layers_per_pass):
                group = list(layers[first_layer : first_layer + layers_per_pass])
                per_row = len(group) * n_mult  # row order: passage, then layer, then multiplier
                state = adapter.repeat_state(prefix_state, per_row)
                ids = run_ids.repeat_interleave(per_row, 0)
                slot_of_row = torch.arange(len(group)).repeat_interleave(n_mult).repeat(n_rows)
                multiplier_of_row = multiplier_row.repeat(len(group) * n_rows)
                scales = {layer: (slot_of_row == slot).float() * multiplier_of_row for slot, layer in enumerate(group)}
                with contextlib.ExitStack() as hooks:
                    if steer_residual:
                        # Positions count from each call's first token: the last prefix token is 0.
                        where = None if positions == "all" else torch.zeros(len(ids), 1, dtype=torch.long)
                        for layer in group:
                            vector = scales[layer][:, None] * residual_vectors[layer].float().cpu()
                            hooks.enter_context(adapter.add_to_block(layer, vector, positions=where))
                    if steer_state and positions == "all":
                        step_logits = []
                        for step in range(ids.shape[1]):
                            for layer in group:
                                adapter.add_to_state(state, layer, state_deltas[layer], scale=scales[layer])
                            logits, _ = adapter.forward(ids[:, step : step + 1], state=state)
                            step_logits.append(logits[:, -1])
                        logits = torch.stack(step_logits, 1)
                    else:
                        if steer_state:
                            for layer in group:
                                adapter.add_to_state(state, layer, state_deltas[layer], scale=scales[layer])
                        logits, _ = adapter.forward(ids, state=state)
                scores = continuation_logprob(logits, continuation.repeat_interleave(per_row, 0)).cpu()
                block = scores.reshape(n_rows, len(group), n_mult).numpy()
                result[start : start + n_rows, first_layer : first_layer + len(group)] = block
    return result


def text_steering(adapter: ModelAdapter, passages: Sequence[dict], settings: dict, seed: int):
    """Vectors and the whole sweep of one model: ({'residual.contrast': (L, D), ...} tensors to save,
    a table with one row per passage x mode x positions x vector x layer x multiplier)."""
    kinds = [kind["name"] for kind in settings["kinds"]]
    prefix, n_tokens = settings["prefix_tokens"], settings["prefix_tokens"] + settings["continuation_tokens"]
    modes = [mode for mode in settings["modes"] if mode == "residual" or adapter.has_recurrent_state]
    if len(modes) < len(settings["modes"]):
        log.info("model %s has no recurrent state: modes %s only", adapter.info.get("name"), modes)
    layers = list(range(adapter.n_layers)) if settings["layers"] == "all" else list(settings["layers"])
    stateful = adapter.stateful_layers()

    def of(kind, role):
        return [passage for passage in passages if passage["kind"] == kind and passage["role"] == role]

    first, second = (passage_tokens(adapter, of(kind, "vector"), n_tokens)[:, :prefix] for kind in kinds)
    with_state = any(mode != "residual" for mode in modes)
    residual, deltas = contrast_vectors(adapter, first, second, with_state)
    vectors = {"contrast": (residual, deltas), "random": random_like(residual, deltas, seed)}
    evaluation = [passage for kind in kinds for passage in of(kind, "evaluation")]
    tokens = passage_tokens(adapter, evaluation, n_tokens)
    unsteered = unsteered_logprob(adapter, tokens, prefix).numpy()
    tables = []
    for vector in VECTORS:
        for mode in modes:
            # With layers "all", a hybrid's state is steered in its recurrent layers (others named are refused).
            every = mode == "residual" or settings["layers"] != "all"
            mode_layers = layers if every else [layer for layer in layers if layer in stateful]
            for positions in settings["positions"]:
                log.info("text steering: vector=%s mode=%s positions=%s", vector, mode, positions)
                scores = continuation_sweep(
                    adapter, tokens, prefix, mode=mode, positions=positions, residual_vectors=vectors[vector][0],
                    state_deltas=vectors[vector][1], layers=mode_layers, multipliers=settings["multipliers"],
                    passages_per_pass=settings["passages_per_pass"], layers_per_pass=settings["layers_per_pass"],
                )  # fmt: skip
                index = pd.MultiIndex.from_product(
                    [range(len(evaluation)), mode_layers, settings["multipliers"]],
                    names=["passage", "layer", "multiplier"],
                )
                table = pd.DataFrame({"logprob": scores.reshape(-1)}, index=index).reset_index()
                tables.append(table.assign(vector=vector, mode=mode, positions=positions))
    sweep = pd.concat(tables, ignore_index=True)
    sweep["kind"] = [evaluation[number]["kind"] for number in sweep["passage"]]
    sweep["unsteered"] = unsteered[sweep["passage"].to_numpy()]
    sweep["model"] = adapter.info.get("name")
    saved = {f"residual.{name}": pair[0] for name, pair in vectors.items()}
    for name, (_, named_deltas) in vectors.items():
        for layer, named in (named_deltas or {}).items():
            saved.update({f"state.{name}.{layer}.{key}": delta for key, delta in named.items()})
    return saved, sweep


# ----- summaries -----------------------------------------------------------------------------------
def kind_shift(sweep: pd.DataFrame, kinds: Sequence[str]) -> pd.DataFrame:
    """Per model, vector, mode, positions, layer and multiplier: the mean change in log-probability per
    token from the unsteered model on each kind's continuations, and the kind shift (first - second)."""
    keys = ["model", "vector", "mode", "positions", "layer", "multiplier"]
    change = sweep.assign(change=sweep["logprob"] - sweep["unsteered"])
    means = change.pivot_table(index=keys, columns="kind", values="change", aggfunc="mean")
    first, second = kinds
    table = pd.DataFrame({f"change_{first}": means[first], f"change_{second}": means[second]})
    table["shift"] = table[f"change_{first}"] - table[f"change_{second}"]
    return table.reset_index()


def effect_summary(shifts: pd.DataFrame) -> pd.DataFrame:
    """Per model, mode and positions: the layer where the contrast vector's effect (kind shift at the
    largest multiplier minus at the smallest, as the paper's max-min over multipliers) is largest, that
    effect, the random vector's effect at the same layer and at its own best layer."""
    low, high = shifts["multiplier"].min(), shifts["multiplier"].max()
    ends = shifts[shifts["multiplier"].isin([low, high])].pivot_table(
        index=["model", "vector", "mode", "positions", "layer"], columns="multiplier", values="shift"
    )
    effect = (ends[high] - ends[low]).rename("effect").reset_index()
    rows = []
    for (model, mode, positions), group in effect.groupby(["model", "mode", "positions"]):
        contrast = group[group["vector"] == "contrast"].set_index("layer")["effect"]
        random_effect = group[group["vector"] == "random"].set_index("layer")["effect"]
        best = int(contrast.idxmax())
        rows.append({
            "model": model, "mode": mode, "positions": positions, "best_layer": best,
            "effect": contrast[best], "random_effect_same_layer": random_effect.get(best, np.nan),
            "random_effect_best_layer": random_effect.max() if len(random_effect) else np.nan,
            "multipliers": f"{low:g} to {high:g}",
        })  # fmt: skip
    return pd.DataFrame(rows)

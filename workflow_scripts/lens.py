"""Tuned lens and logit lens (PAPER section 2): corpus, training, evaluation.

Everything talks to the model through its `ModelAdapter`. A lens "layer" names a stream: a block
index 0..n_layers-1 (the residual stream after that block, as `adapter.residual_stream` reads it),
or INPUT_LAYER (-1): what block 0 receives, i.e. the embeddings. As in the tuned-lens package, the
lensed streams are the embeddings (its layer 0) and the outputs of blocks 0..n_layers-2, each with
a translator; the last block's output is the model's own prediction, so it is evaluated (as the
reference point where both lenses are exact) but has no translator.

Lens output = adapter.final_norm then adapter.unembed, the model's parameters frozen. The tuned
lens puts one affine translator `h + W h + b` (W, b zero-initialised) before that; the logit lens
is the same with no translator. Training minimises KL(final distribution || lens distribution)
summed over layers, with the tuned-lens library's optimiser settings.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import clip_grad_norm_
from tqdm.auto import tqdm

from workflow_scripts import CODE_VERSION
from workflow_scripts.adapters import EMBEDDINGS, ModelAdapter
from workflow_scripts.atomic import atomic_dir, atomic_path, atomic_write_text
from workflow_scripts.corpus import count_text_bytes
from workflow_scripts.schedules import linear_warmup_decay

log = logging.getLogger(__name__)

INPUT_LAYER = EMBEDDINGS  # the embeddings: what block 0 receives
LN2 = math.log(2.0)


# ===== corpus sequences (the documents come from corpus.py) ======================================
def sequence_length(requested: int, tokenizer_max_length: int | None) -> int:
    """Tokens per corpus sequence: `requested`, or the tokenizer's model_max_length where that is
    smaller, as the tuned-lens package chunks its data (min(model_max_length, max_seq_len))."""
    if tokenizer_max_length is None or tokenizer_max_length <= 0:
        return requested
    return min(requested, int(tokenizer_max_length))


def build_corpus(
    texts: Iterable[str],
    tokenizer_encode: Callable[[str], list[int]],
    seq_len: int,
    n_train_tokens: int,
    n_eval_tokens: int,
    seed: int,
    *,
    eos_token_id: int,
    source_name: str = "corpus",
) -> tuple[np.ndarray, np.ndarray]:
    """Token sequences for training and held-out evaluation: (n_train, seq_len) and (n_eval, seq_len)
    int32 arrays with at least n_train_tokens and n_eval_tokens tokens (whole sequences).

    Each document is preceded by `eos_token_id` and the documents of a split are concatenated, then
    cut into seq_len chunks (so a chunk may span documents). Every document goes whole to one split,
    chosen by a seeded draw in proportion to the budgets, so the eval text is never trained on and
    both splits sample the whole source. Reading stops once both budgets are met; each split's
    chunks are then shuffled with the seed."""
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len}: need at least 2 tokens per sequence to predict a next token")
    if n_train_tokens < 0 or n_eval_tokens < 0 or n_train_tokens + n_eval_tokens == 0:
        raise ValueError(
            f"token budgets n_train_tokens={n_train_tokens}, n_eval_tokens={n_eval_tokens}: need >= 0, not both 0"
        )
    rng = np.random.default_rng(seed)
    needed = {"train": -(-n_train_tokens // seq_len) * seq_len, "eval": -(-n_eval_tokens // seq_len) * seq_len}
    eval_share = needed["eval"] / (needed["train"] + needed["eval"])
    pieces: dict[str, list[np.ndarray]] = {"train": [], "eval": []}
    have = {"train": 0, "eval": 0}
    n_documents = n_tokens_read = 0
    for text in texts:
        if have["train"] >= needed["train"] and have["eval"] >= needed["eval"]:
            break
        n_documents += 1
        tokens = tokenizer_encode(text)
        if not tokens:
            continue
        n_tokens_read += len(tokens) + 1
        split = "eval" if rng.random() < eval_share else "train"
        if have[split] >= needed[split]:  # that split is full: the document goes to the other one
            split = "train" if split == "eval" else "eval"
        piece = np.asarray([eos_token_id, *tokens], dtype=np.int32)[: needed[split] - have[split]]
        pieces[split].append(piece)
        have[split] += len(piece)
    if n_documents == 0:
        raise ValueError(f"corpus source {source_name!r} yielded no documents")
    if have["train"] < needed["train"] or have["eval"] < needed["eval"]:
        raise ValueError(
            f"corpus source {source_name!r}: found {n_tokens_read} tokens in {n_documents} documents, fewer than the "
            f"budget of {needed['train']} train + {needed['eval']} eval tokens (whole sequences of {seq_len}); got "
            f"{have['train']} train and {have['eval']} eval. Lower the budget or add text (documents are not split "
            f"between train and eval, so a few long documents can leave one split short)"
        )
    splits = []
    for split in ("train", "eval"):
        stream = np.concatenate(pieces[split]) if pieces[split] else np.zeros(0, dtype=np.int32)
        chunks = stream.reshape(-1, seq_len)
        splits.append(chunks[rng.permutation(len(chunks))])
    return splits[0], splits[1]


# ===== lenses ====================================================================================
class Lens(nn.Module):
    """A lens reads a residual-stream vector at `layer` through the model's own output head (final
    norm, then unembedding) after its `translate`: the identity for the logit lens, a learned affine
    map for the tuned lens (as the tuned-lens package's LogitLens and TunedLens over one Unembed).
    Training, evaluation and figures treat every lens alike. The adapter is a plain attribute: the
    model's parameters are not part of a lens (nor of its state_dict)."""

    name = "lens"

    def __init__(self, adapter: ModelAdapter):
        super().__init__()
        self.adapter = adapter

    def translate(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        return hidden

    def forward(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """Logits of the lens at `layer` for residual-stream vectors (..., hidden_size)."""
        return self.adapter.logits_from_stream(self.translate(hidden, layer))


class LogitLens(Lens):
    """The residual stream read directly by the model's own output head."""

    name = "logit"


def logit_lens(adapter: ModelAdapter, hidden: torch.Tensor) -> torch.Tensor:
    """The logit lens's logits for residual-stream vectors (any stream: it has no per-layer part)."""
    return LogitLens(adapter)(hidden, layer=0)


def lens_streams(n_layers: int, include_input: bool = True) -> list[int]:
    """The streams a lens reads, in depth order: the embeddings (when included), then every block."""
    return ([INPUT_LAYER] if include_input else []) + list(range(n_layers))


def stream_name(layer: int, n_layers: int) -> str:
    """A label a reader can match with the paper's figures: 'embeddings' (the tuned-lens package's
    layer 0), 'block k' (the residual stream after block k), the last block marked as the model's
    own output."""
    if layer == INPUT_LAYER:
        return "embeddings"
    return f"block {layer} (model output)" if layer == n_layers - 1 else f"block {layer}"


class TunedLens(Lens):
    """One affine translator per lensed stream, applied as h + W h + b before the model's output
    head. W and b start at zero, so an untrained tuned lens is exactly the logit lens. `streams` are
    what the lens reads (the embeddings when include_input, then every block); `layers` are those
    with a translator: all but the last block, whose output the model itself decodes (the
    tuned-lens package has no translator there either; its KL to the final layer is 0 already)."""

    name = "tuned"

    def __init__(self, adapter: ModelAdapter, include_input: bool = True):
        super().__init__(adapter)
        self.include_input = include_input
        self.streams = lens_streams(adapter.n_layers, include_input)
        self.output_layer = adapter.n_layers - 1
        self.layers = [layer for layer in self.streams if layer != self.output_layer]
        size = adapter.hidden_size
        # float32 whatever the model's dtype: SGD steps of lr ~0.1 would be lost in bf16 rounding.
        self.translators = nn.ModuleList(nn.Linear(size, size) for _ in self.layers)
        for translator in self.translators:
            nn.init.zeros_(translator.weight)
            nn.init.zeros_(translator.bias)
        self.settings: dict = {}  # training settings, filled by train_lens and written by save_lens
        self.to(adapter.device)

    def index_of(self, layer: int) -> int:
        if layer not in self.layers:
            raise ValueError(f"layer {layer} has no translator; this lens has layers {self.layers}")
        return self.layers.index(layer)

    def translate(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        if layer == self.output_layer:
            return hidden  # the model's own output: the identity, as in the tuned-lens package
        translator = self.translators[self.index_of(layer)]
        hidden32 = hidden.float()
        return (hidden32 + translator(hidden32)).to(hidden.dtype)


def collect_streams(adapter: ModelAdapter, token_ids: torch.Tensor, include_input: bool = True):
    """Residual streams at every position of equal-length rows (B, T) of token ids.
    Returns (streams, logits): streams maps lens layer -> (B, T, D) tensor (the embeddings under
    INPUT_LAYER when include_input), logits are the model's."""
    batch = adapter.batch([row.tolist() for row in token_ids])
    positions = torch.arange(token_ids.shape[1])[None, :].expand(token_ids.shape[0], -1)
    layers = lens_streams(adapter.n_layers, include_input)
    with torch.no_grad():
        stream, logits = adapter.residual_stream(batch, positions.to(adapter.device), layers)
    return dict(zip(layers, stream)), logits


def kl_from_final(
    final_logprobs: torch.Tensor, lens_logits: torch.Tensor, final_probs: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over tokens of KL(final || lens), in nats; inputs (..., V). Computed as the soft-label
    cross-entropy minus the final distribution's entropy: torch's fused cross_entropy keeps one
    (tokens x vocab) tensor for the backward pass instead of three. Pass `final_probs` (the exp of
    final_logprobs) when calling it for many lenses on the same tokens."""
    vocab = lens_logits.shape[-1]
    final_probs = final_logprobs.exp() if final_probs is None else final_probs
    final_entropy = -(final_probs * final_logprobs).sum(-1).mean()
    cross_entropy = F.cross_entropy(lens_logits.float().reshape(-1, vocab), final_probs.reshape(-1, vocab))
    return cross_entropy - final_entropy


@contextlib.contextmanager
def frozen(module: nn.Module):
    """Parameters of `module` need no gradient while active (restored after): gradients then stop
    at the lens instead of filling .grad of the unembedding."""
    previous = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for parameter, _ in previous:
            parameter.requires_grad_(False)
        yield
    finally:
        for parameter, flag in previous:
            parameter.requires_grad_(flag)


def step_sequences(step: int, per_step: int, n_sequences: int, seed: int) -> np.ndarray:
    """Indices of the training sequences used by `step`: a fixed function of the step, so a resumed
    run reads exactly what the uninterrupted one would. Passes over the data are reshuffled."""
    first = step * per_step
    positions = np.arange(first, first + per_step)
    epochs = positions // n_sequences
    indices = np.empty(per_step, dtype=np.int64)
    for epoch in np.unique(epochs):
        order = np.random.default_rng([seed, int(epoch)]).permutation(n_sequences)
        where = epochs == epoch
        indices[where] = order[positions[where] % n_sequences]
    return indices


def _fingerprint(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def _load_checkpoint(path: Path, settings: dict) -> dict | None:
    if not path.exists():
        return None
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    saved = checkpoint["settings"]
    differing = {key: (saved.get(key), value) for key, value in settings.items() if saved.get(key) != value}
    if differing:
        raise ValueError(
            f"checkpoint {path} was written with other settings (saved, now): {differing}; delete it to start over"
        )
    return checkpoint


def train_lens(
    adapter: ModelAdapter,
    lens: TunedLens,
    train_tokens: np.ndarray,
    *,
    steps: int = 250,
    tokens_per_step: int = 2**18,
    batch_size: int = 1,
    lr_scale: float = 1.0,
    momentum: float = 0.9,
    weight_decay: float = 1e-3,
    warmup_steps: int = 0,
    max_grad_norm: float = 1.0,
    seed: int = 0,
    checkpoint_path: str | Path | None = None,
    checkpoint_every: int = 10,
    log_every: int = 1,
    progress: bool = True,
    on_step: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Train `lens` in place on (N, seq_len) token sequences; returns the per-step log
    [{"step", "loss", "lr", "kl_per_layer"}] (loss in nats: KL summed over layers, mean per token).

    Each step uses tokens_per_step tokens (a multiple of seq_len), run batch_size sequences at a time
    with gradients accumulated. SGD with Nesterov momentum at lr = lr_scale * (1 - momentum): PyTorch's
    momentum scales the step by 1 / (1 - momentum), and the tuned-lens library undoes that so that
    lr_scale 1.0 is its tuned default. With `checkpoint_path`, the translators, optimizer and step are
    saved every `checkpoint_every` steps (and at the end) and a rerun resumes from there; the data a
    step reads depends only on (seed, step), so a resumed run matches an uninterrupted one."""
    train_tokens = np.asarray(train_tokens)
    if train_tokens.ndim != 2 or len(train_tokens) == 0:
        raise ValueError(f"train_tokens must be a non-empty (N, seq_len) array, got shape {train_tokens.shape}")
    n_sequences, seq_len = train_tokens.shape
    per_step, remainder = divmod(tokens_per_step, seq_len)
    if remainder or per_step == 0:
        raise ValueError(f"tokens_per_step={tokens_per_step} is not a positive multiple of seq_len={seq_len}")
    if steps < 1 or batch_size < 1 or checkpoint_every < 1:
        raise ValueError(f"steps={steps}, batch_size={batch_size}, checkpoint_every={checkpoint_every}: need >= 1")
    if adapter.context_length is not None and seq_len > adapter.context_length:
        raise ValueError(f"seq_len={seq_len} exceeds the model's context length {adapter.context_length}")

    settings = {
        "steps": steps, "tokens_per_step": tokens_per_step, "batch_size": batch_size, "seq_len": seq_len,
        "lr_scale": lr_scale, "momentum": momentum, "weight_decay": weight_decay, "warmup_steps": warmup_steps,
        "max_grad_norm": max_grad_norm, "seed": seed, "layers": list(lens.layers),
        "n_train_sequences": n_sequences, "train_tokens_sha256": _fingerprint(train_tokens),
    }  # fmt: skip
    base_lr = lr_scale * (1 - momentum)
    optimizer = torch.optim.SGD(
        lens.translators.parameters(), lr=base_lr, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay
    )
    start, history = 0, []
    checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None
    checkpoint = _load_checkpoint(checkpoint_path, settings) if checkpoint_path is not None else None
    if checkpoint is not None:
        lens.translators.load_state_dict(checkpoint["translators"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        start, history = checkpoint["step"], checkpoint["history"]
        log.info("resuming tuned-lens training from %s at step %d/%d", checkpoint_path, start, steps)

    def save_checkpoint(step):
        state = {
            "step": step, "translators": lens.translators.state_dict(), "optimizer": optimizer.state_dict(),
            "settings": settings, "history": history,
        }  # fmt: skip
        with atomic_path(checkpoint_path) as tmp:
            torch.save(state, tmp)

    device = adapter.device
    bar = tqdm(total=steps, initial=start, desc="tuned lens", disable=not progress)
    lens.train()
    with frozen(adapter.model):
        for step in range(start, steps):
            for group in optimizer.param_groups:
                group["lr"] = base_lr * linear_warmup_decay(step, steps, warmup_steps)
            optimizer.zero_grad(set_to_none=False)
            layer_kl = torch.zeros(len(lens.layers), dtype=torch.float64)
            indices = step_sequences(step, per_step, n_sequences, seed)
            for first in range(0, per_step, batch_size):
                rows = indices[first : first + batch_size]
                weight = len(rows) / per_step  # this micro-batch's share of the step's tokens
                token_ids = torch.as_tensor(train_tokens[rows], dtype=torch.long, device=device)
                streams, logits = collect_streams(adapter, token_ids, lens.include_input)
                final_logprobs = logits.float().log_softmax(-1)
                final_probs = final_logprobs.exp()
                # One backward per layer: only one layer's (tokens x vocab) logits are alive at a time.
                for position, layer in enumerate(lens.layers):
                    kl = kl_from_final(final_logprobs, lens(streams[layer], layer), final_probs)
                    (kl * weight).backward()
                    layer_kl[position] += kl.item() * weight
            clip_grad_norm_(lens.translators.parameters(), max_grad_norm)
            optimizer.step()
            loss = float(layer_kl.sum())
            lr = optimizer.param_groups[0]["lr"]
            record = {"step": step + 1, "loss": loss, "lr": lr, "kl_per_layer": layer_kl.tolist()}
            history.append(record)
            if (step + 1) % log_every == 0 or step + 1 == steps:
                log.info("tuned lens step %d/%d: loss %.5f nats (KL summed over layers), lr %.4g",
                         step + 1, steps, loss, lr)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if checkpoint_path is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
                save_checkpoint(step + 1)
            if on_step is not None:
                on_step(record)
    bar.close()
    lens.eval()
    lens.settings = {**settings, "code_version": CODE_VERSION, "model": dict(adapter.info)}
    return history


# ===== saving ====================================================================================
def settings_path_of(weights_path: str | Path) -> Path:
    """The JSON beside a lens's safetensors file."""
    return Path(weights_path).with_suffix(".json")


def save_lens(lens: TunedLens, weights_path: str | Path, extra: dict | None = None) -> None:
    """Translators as safetensors at `weights_path`, settings as JSON beside it (same stem)."""
    from safetensors.torch import save_file

    settings = {
        **lens.settings,
        **(extra or {}),
        "layers": list(lens.layers),
        "include_input": lens.include_input,
        "n_layers": lens.adapter.n_layers,
        "hidden_size": lens.adapter.hidden_size,
    }
    tensors = {key: value.detach().cpu().contiguous() for key, value in lens.translators.state_dict().items()}
    with atomic_path(weights_path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "code_version": CODE_VERSION})
    atomic_write_text(settings_path_of(weights_path), json.dumps(settings, indent=2, sort_keys=True, default=str))


def load_lens(adapter: ModelAdapter, weights_path: str | Path) -> TunedLens:
    """A lens saved by save_lens, checked against the adapter's model shape."""
    from safetensors.torch import load_file

    settings = json.loads(settings_path_of(weights_path).read_text())
    for key, actual in (("n_layers", adapter.n_layers), ("hidden_size", adapter.hidden_size)):
        if settings[key] != actual:
            raise ValueError(f"lens {weights_path} was trained with {key}={settings[key]}, but the model has {actual}")
    lens = TunedLens(adapter, include_input=settings["include_input"])
    if settings["layers"] != lens.layers:  # e.g. written before the last block lost its translator
        raise ValueError(
            f"lens {weights_path} has translators for layers {settings['layers']}, but this code trains "
            f"{lens.layers}; train it again"
        )
    lens.translators.load_state_dict(load_file(str(weights_path), device=str(adapter.device)))
    lens.settings = settings
    return lens.eval()


# ===== evaluation ================================================================================
@torch.no_grad()
def evaluate_lenses(
    adapter: ModelAdapter,
    eval_tokens: np.ndarray,
    lens: TunedLens | None = None,
    *,
    batch_size: int = 1,
    include_input: bool | None = None,
    n_bytes: int | None = None,
    model_name: str | None = None,
):
    """Per layer, for the logit lens and (when given) the tuned lens, on held-out sequences:
    cross-entropy against the next token, KL(final || lens) and the lens's entropy, in nats per token
    and in bits per byte (nats / ln 2 * tokens / bytes). Every position but each sequence's last is
    scored, for all three. `n_bytes` is the UTF-8 size of the scored text; by default it is counted
    by decoding with the model's tokenizer (count_text_bytes). Returns a pandas DataFrame with one
    row per (lens, layer): `stream` names it (stream_name: "embeddings", "block k"), depth =
    (layer + 1) / n_layers puts the embeddings at 0 and the model's output at 1. By default the
    embeddings are read whenever the tuned lens has them (or, with no tuned lens, always)."""
    import pandas as pd

    eval_tokens = np.asarray(eval_tokens)
    if eval_tokens.ndim != 2 or len(eval_tokens) == 0 or eval_tokens.shape[1] < 2:
        raise ValueError(f"eval_tokens must be a non-empty (N, seq_len >= 2) array, got shape {eval_tokens.shape}")
    if include_input is None:
        include_input = lens.include_input if lens is not None else True
    if lens is not None and include_input and not lens.include_input:
        raise ValueError("include_input=True but the tuned lens has no translator for the input embeddings")
    layers = lens_streams(adapter.n_layers, include_input)
    lenses = {lens_.name: lens_.eval() for lens_ in (LogitLens(adapter), lens) if lens_ is not None}
    if n_bytes is None:
        n_bytes = count_text_bytes(eval_tokens, lambda ids: adapter.tokenizer.decode(ids, skip_special_tokens=True))
    if n_bytes <= 0:
        raise ValueError(f"n_bytes={n_bytes}: the evaluated text must have a positive size")

    sums = {(name, layer): np.zeros(3) for name in lenses for layer in layers}  # ce, kl, entropy
    n_tokens = 0
    for first in range(0, len(eval_tokens), batch_size):
        token_ids = torch.as_tensor(eval_tokens[first : first + batch_size], dtype=torch.long, device=adapter.device)
        streams, logits = collect_streams(adapter, token_ids, include_input)
        final_logprobs = logits[:, :-1].float().log_softmax(-1)
        final_probs = final_logprobs.exp()
        final_plogp = (final_probs * final_logprobs).sum()  # minus the final entropy, summed over tokens
        targets = token_ids[:, 1:]
        n_tokens += targets.numel()
        for name, read in lenses.items():
            for layer in layers:
                logprobs = read(streams[layer][:, :-1], layer).float().log_softmax(-1)
                ce = -logprobs.gather(-1, targets[..., None]).sum()
                kl = final_plogp - (final_probs * logprobs).sum()
                entropy = -(logprobs.exp() * logprobs).sum()
                sums[name, layer] += torch.stack([ce, kl, entropy]).double().cpu().numpy()

    to_bits_per_byte = n_tokens / n_bytes / LN2
    rows = []
    for (name, layer), (ce, kl, entropy) in sums.items():
        means = {"ce_nats": ce / n_tokens, "kl_nats": kl / n_tokens, "entropy_nats": entropy / n_tokens}
        rows.append(
            {
                "model": model_name if model_name is not None else adapter.info.get("name"),
                "lens": name,
                "layer": layer,
                "stream": stream_name(layer, adapter.n_layers),
                "depth": (layer + 1) / adapter.n_layers,
                **means,
                **{key.replace("_nats", "_bits_per_byte"): value * to_bits_per_byte for key, value in means.items()},
                "n_tokens": n_tokens,
                "n_bytes": n_bytes,
            }
        )
    return pd.DataFrame(rows)


@torch.no_grad()
def prediction_trajectory(adapter: ModelAdapter, token_ids: list[int], lens: TunedLens | None = None):
    """Per (position, layer, lens) for one sequence: the cross-entropy of the next token and the
    lens's top-1 prediction, for a token x layer heatmap; the embeddings are a row whenever the
    tuned lens reads them (always with no tuned lens). Returns a pandas DataFrame."""
    import pandas as pd

    if len(token_ids) < 2:
        raise ValueError(f"need at least 2 tokens for a next-token trajectory, got {len(token_ids)}")
    include_input = lens.include_input if lens is not None else True
    ids = torch.tensor([token_ids], dtype=torch.long, device=adapter.device)
    streams, _ = collect_streams(adapter, ids, include_input)
    lenses = {lens_.name: lens_.eval() for lens_ in (LogitLens(adapter), lens) if lens_ is not None}
    rows = []
    for name, read in lenses.items():
        for layer, hidden in streams.items():
            logprobs = read(hidden[0, :-1], layer).float().log_softmax(-1)
            ce = -logprobs.gather(-1, ids[0, 1:, None])[:, 0]
            top = logprobs.argmax(-1)
            for position in range(len(token_ids) - 1):
                rows.append(
                    {
                        "lens": name,
                        "layer": layer,
                        "stream": stream_name(layer, adapter.n_layers),
                        "position": position,
                        "input_token": adapter.tokenizer.decode([token_ids[position]]),
                        "target_token": adapter.tokenizer.decode([token_ids[position + 1]]),
                        "top1_token": adapter.tokenizer.decode([int(top[position])]),
                        "ce_nats": float(ce[position]),
                    }
                )
    return pd.DataFrame(rows)


# ===== export in the tuned-lens package's format =================================================
def export_tuned_lens_package(lens: TunedLens, directory: str | Path, base_model: str | None = None,
                              base_model_revision: str | None = None) -> None:
    """Write `lens` as the tuned-lens package (0.2.0) saves one, so that its
    TunedLens.from_model_and_pretrained(model, directory) loads it: `config.json` with the fields of
    its TunedLensConfig and `params.pt`, a torch.save of its `layer_translators` state dict
    ("{j}.weight" (d, d), "{j}.bias" (d,) for j = 0..n_layers-1). Its translator j reads its
    hidden_states[j], which for transformers is j = 0 the embeddings (our INPUT_LAYER), j = k + 1 the
    output of block k; that is our translators' order, so the keys carry over as they are. The recurrent
    families' files have the same layout (translator 0 = our embeddings translator), but their Hugging
    Face ports' hidden_states start at block 0's output, and the package (0.2.0) refuses those models
    anyway; translators are in the units the adapter reads (training-mode units where a port rescales
    in eval mode). The unembedding is not saved: the package takes it from the model. unembed_hash is
    left empty (it is only compared when present)."""
    if not lens.include_input or lens.layers != [INPUT_LAYER, *range(lens.adapter.n_layers - 1)]:
        raise ValueError(f"the tuned-lens package needs translators for the embeddings and blocks 0..n-2, "
                         f"this lens has layers {lens.layers}")
    config = {
        "base_model_name_or_path": base_model or lens.adapter.info.get("model_id") or lens.adapter.info.get("name"),
        "d_model": lens.adapter.hidden_size,
        "num_hidden_layers": lens.adapter.n_layers,
        "bias": True,
        "base_model_revision": base_model_revision or lens.adapter.info.get("revision"),
        "unembed_hash": None,
        "lens_type": "linear_tuned_lens",
    }
    state = {key: value.detach().float().cpu().contiguous() for key, value in lens.translators.state_dict().items()}
    with atomic_dir(directory) as tmp:
        torch.save(state, tmp / "params.pt")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))

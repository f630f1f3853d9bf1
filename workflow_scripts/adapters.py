"""One model interface for every stage: transformer, Mamba and RWKV behind the same methods.

A stage gets an adapter from `load_adapter(spec)` and never looks at the architecture itself.
`ModelAdapter` holds what every family shares; `TransformerAdapter`, `MambaAdapter`, `RwkvAdapter`
(RWKV-4) and `RwkvPackageAdapter` (RWKV-5/6/7) add how each family's model is called and where its
state lives (`ADAPTERS`, by family name), as do the adapters of transformers' other recurrent and hybrid
ports (Falcon-Mamba, Mamba-2, Jamba, LFM2, xLSTM, RecurrentGemma), whose family names are the ports'
model types.
The blocks and the final norm are found by one rule for every causal LM (`decoder_and_blocks`,
`find_final_norm`), not by family.
Layers are named by block index 0..n_layers-1; "the residual stream after block l" is what block
l+1 receives (for the last block: what the final norm receives).
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer

from workflow_scripts.model_sources import LoadedModel

# What LoRA adapts in each block: the attention (time-mixing) projections, or every linear layer.
LORA_SCOPES = ("attention", "all")

# The layer index of the stream block 0 receives: the token embeddings, after whatever the model does
# to them before its first block. The tuned-lens package counts it as its layer 0.
EMBEDDINGS = -1


def check_lora_scope(scope: str) -> None:
    if scope not in LORA_SCOPES:
        raise ValueError(f"unknown LoRA scope {scope!r}; allowed: {', '.join(LORA_SCOPES)}")


@dataclass
class TokenBatch:
    """Right-padded token ids. Right padding keeps every real position exact for causal models of
    every family (padding only ever follows the real tokens)."""

    input_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) long, 1 on real tokens
    lengths: torch.Tensor  # (B,) long

    def last_positions(self, count: int = 1) -> torch.Tensor:
        """(B, count) absolute indices of each row's last `count` real tokens."""
        short = (self.lengths < count).nonzero()
        if len(short):
            raise ValueError(
                f"row {int(short[0])} has {int(self.lengths[short[0]])} tokens, fewer than the last {count} asked for"
            )
        offsets = torch.arange(count - 1, -1, -1)
        return self.lengths[:, None] - 1 - offsets[None, :]


@dataclass
class _Output:
    """The fields of a model output the adapters read, for runs they assemble from several calls."""

    logits: torch.Tensor
    state: object

    @property
    def cache_params(self):
        return self.state


# Config attributes that give the number of blocks, tried in order (remote code keeps GPT-2's names).
LAYER_COUNT_NAMES = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "num_blocks")
# Attribute names of the final norm in the module that holds the blocks, tried in order; a model
# with none of them gets the last norm-like module registered after its blocks (LFM2's
# `embedding_norm`, which it applies after the last block despite its name).
FINAL_NORM_NAMES = (
    "norm", "final_layer_norm", "norm_f", "ln_f", "ln_out", "final_norm", "final_layernorm", "out_norm"
)  # fmt: skip
# Config attributes of a soft cap the model puts on its logits, cap * tanh(logits / cap): Gemma 2
# and 3, RecurrentGemma, xLSTM.
LOGIT_SOFT_CAP_NAMES = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")


def text_config(model: nn.Module):
    """The config of the language model itself (a multimodal model's text part; otherwise the config)."""
    config = model.config
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config() if callable(get_text_config) else config


def layer_count(config) -> int:
    for name in LAYER_COUNT_NAMES:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise RuntimeError(f"{type(config).__name__} names no layer count (tried {', '.join(LAYER_COUNT_NAMES)})")


def _block_lists(module: nn.Module, n: int) -> dict[str, nn.ModuleList]:
    """The outermost ModuleLists of length n in `module`, by name (a list nested in another one of
    the same length, such as n experts inside a block, is left out)."""
    found = {
        name: child for name, child in module.named_modules() if isinstance(child, nn.ModuleList) and len(child) == n
    }
    return {
        name: child
        for name, child in found.items()
        if not any(name.startswith(other + ".") for other in found if other != name and other)
    }


def decoder_and_blocks(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """The module that holds a causal LM's blocks and final norm (its decoder: `get_decoder()`, else
    `base_model`, else the model itself), and the blocks: the one ModuleList whose length is the
    configured number of layers."""
    n = layer_count(text_config(model))
    candidates = []
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        with contextlib.suppress(AttributeError, NotImplementedError, ValueError):  # remote code may lack one
            candidates.append(get_decoder())
    candidates += [getattr(model, "base_model", model), model]
    for decoder in candidates:
        if not isinstance(decoder, nn.Module):
            continue
        lists = _block_lists(decoder, n)
        direct = {name: blocks for name, blocks in lists.items() if "." not in name and name}
        if len(lists) == 1 or len(direct) == 1:
            return decoder, next(iter((lists if len(lists) == 1 else direct).values()))
        if len(lists) > 1:
            raise RuntimeError(
                f"{len(lists)} lists of {n} modules in {type(model).__name__} ({', '.join(lists)}): "
                "which of them holds the blocks is ambiguous"
            )
    raise RuntimeError(f"no list of {n} blocks found in {type(model).__name__}")


def _is_norm(module: nn.Module) -> bool:
    norms = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
    return isinstance(module, norms) or "norm" in type(module).__name__.lower()


def find_final_norm(model: nn.Module) -> nn.Module:
    """The norm a causal LM applies to its last block's output before the unembedding: a child of its
    decoder with one of FINAL_NORM_NAMES, else the last norm-like child registered after the blocks."""
    decoder, blocks = decoder_and_blocks(model)
    for name in FINAL_NORM_NAMES:
        if isinstance(getattr(decoder, name, None), nn.Module):
            return getattr(decoder, name)
    children = list(decoder.named_children())
    holding = [i for i, (_, child) in enumerate(children) if any(m is blocks for m in child.modules())]
    norms = [child for _, child in children[holding[0] + 1 :] if _is_norm(child)] if holding else []
    if norms:
        return norms[-1]
    listed = ", ".join(f"{name} ({type(child).__name__})" for name, child in children)
    raise RuntimeError(
        f"no final norm found in {type(model).__name__}: its decoder {type(decoder).__name__} has no child named "
        f"{' / '.join(FINAL_NORM_NAMES)} and no norm after its blocks; its children: {listed}"
    )


@dataclass(frozen=True)
class _Steering:
    """One active `add_to_block`: the vector (already on the model's device and dtype) and positions."""

    layer: int
    vector: torch.Tensor
    positions: torch.Tensor | None


class ModelAdapter:
    """What every family shares: structure (blocks, final norm, unembedding), text, the residual
    stream, steering it, training hooks and the state operations built on `state_tensors`. A family
    supplies the model call (`_run`) and its state (`_state_of`, `repeat_state`, `state_tensors`)."""

    family: str | None = None
    has_recurrent_state = False  # True where the state is a fixed-size summary of the past (RNNs)
    # Parts of the names of a block's time-mixing linear layers (LoRA's "attention" scope).
    time_mixing: tuple[str, ...] = ("attn", "attention")

    def __init__(self, loaded: LoadedModel):
        # Frozen: stages that train (lenses, LoRA) add parameters of their own.
        self.model = loaded.model.eval().requires_grad_(False)
        self.tokenizer = loaded.tokenizer
        self.info = loaded.info
        # The vectors of the active `add_to_block` contexts: every model call adds them through
        # hooks of its own, made with that call's rows and first position (a tuple: never shared
        # in place by copies of the adapter).
        self._steering: tuple[_Steering, ...] = ()
        self.blocks = self._find_blocks()

    def with_model(self, model: nn.Module, info: dict | None = None) -> ModelAdapter:
        """An adapter of the same family and tokenizer over another model of the same architecture (e.g.
        a copy being trained, or the trained result), with `info` in place of this adapter's if given.
        The model is taken as it is: unlike the constructor, this neither freezes it nor sets eval mode."""
        other = copy.copy(self)
        other.model = model
        other.info = self.info if info is None else info
        other._row, other._offset = None, 0
        other.blocks = other._find_blocks()
        return other

    # ----- structure -------------------------------------------------------------------------
    def _find_blocks(self) -> nn.ModuleList:
        """The ModuleList of blocks: the one whose length is the configured number of layers."""
        return decoder_and_blocks(self.model)[1]

    @property
    def n_layers(self) -> int:
        return layer_count(text_config(self.model))

    @property
    def hidden_size(self) -> int:
        return text_config(self.model).hidden_size

    @property
    def context_length(self) -> int | None:
        """Longest prompt the model was built for, or None where there is no limit."""
        return None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def final_norm(self) -> nn.Module:
        """The norm applied to the last block's output before the unembedding."""
        found = self.__dict__.get("_final_norm")
        if found is None or found[0] is not self.model:  # looked up once per model (a view swaps it)
            found = self._final_norm = (self.model, find_final_norm(self.model))
        return found[1]

    @property
    def unembed(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def logits_from_stream(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits from a residual stream vector, as the model computes them from its last
        block's output: final norm, then unembedding, then the model's soft cap if it has one (the
        logit lens)."""
        # output_scale(n_layers) converts to the units the final norm sees (1 except for RWKV).
        normed = self.final_norm(hidden / self.output_scale(self.n_layers))
        # Mamba keeps its residual stream in float32 (residual_in_fp32) even in a bf16 model.
        logits = self.unembed(normed.to(self.unembed.weight.dtype))
        config = text_config(self.model)
        for name in LOGIT_SOFT_CAP_NAMES:
            cap = getattr(config, name, None)
            if cap:
                return cap * torch.tanh(logits / cap)
        return logits

    def site_description(self) -> str:
        return "block output (residual stream after the block)"

    def lora_target_modules(self, scope: str = "attention") -> list[str]:
        """Full names of the linear layers LoRA adapts in every block: the attention (time-mixing)
        projections with scope "attention", every linear layer (MLP / channel mixing too) with "all".
        Full names, because peft matches a bare name anywhere (RWKV's FFN also has `key`, `value`)."""
        check_lora_scope(scope)
        block_ids = {id(block) for block in self.blocks}
        names = []
        for block_name, block in self.model.named_modules():
            if id(block) in block_ids:
                names += [
                    f"{block_name}.{name}"
                    for name, module in block.named_modules()
                    if isinstance(module, nn.Linear) and (scope == "all" or any(p in name for p in self.time_mixing))
                ]
        if not names:
            raise RuntimeError(f"no {scope} projections found in {type(self.blocks[0]).__name__}")
        return names

    # ----- text ------------------------------------------------------------------------------
    def build_prompt(self, user_text: str, assistant_prefix: str = "", chat: bool = True) -> str:
        """The model's chat template with the assistant turn left open, then `assistant_prefix`.
        With chat=False the text is used as it is (plain language modelling)."""
        if not chat:
            return user_text + assistant_prefix
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(
                f"model {self.info['name']!r} has no chat template; set 'chat_template' in its config entry"
            )
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
        )
        return text + assistant_prefix

    def encode(self, text: str) -> list[int]:
        """Token ids of a piece of text, no special tokens added (see `encode_prompt` for a whole
        model input)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a whole model input: the text after the special tokens the tokenizer puts in
        front of a sequence (Llama's BOS), as the model saw in training and as the reference's
        `tokenizer.encode` gives. A template that already writes them does not get them twice.
        Tokens a tokenizer appends at a sequence's end (an EOS) are left off: a prompt is continued."""
        plain = self.encode(text)
        full = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                added = full[:start]
                return plain if plain[:start] == added else added + plain
        raise ValueError(f"the tokenizer's special tokens for {text[:40]!r}... do not surround its plain encoding")

    def batch(self, token_lists: list[list[int]]) -> TokenBatch:
        if not token_lists:
            raise ValueError("empty batch: no token lists given")
        empty = [row for row, tokens in enumerate(token_lists) if not tokens]
        if empty:
            raise ValueError(f"row {empty[0]} of the batch has no tokens")
        lengths = torch.tensor([len(t) for t in token_lists], dtype=torch.long)
        width = int(lengths.max())
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(token_lists), width), pad, dtype=torch.long)
        mask = torch.zeros((len(token_lists), width), dtype=torch.long)
        for row, tokens in enumerate(token_lists):
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, : len(tokens)] = 1
        return TokenBatch(ids.to(self.device), mask.to(self.device), lengths)

    # ----- forward ---------------------------------------------------------------------------
    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, state=None, use_cache=False,
        logits_to_keep: int | None = None,
    ):  # fmt: skip
        """Run the model; returns (logits, state). With `state`, the ids continue from it: the batch
        must then be unpadded. The state passed in is updated in place: copy it first to reuse it.
        `logits_to_keep`: logits of the last that many positions only (the unembedding of every
        position is a large share of a prompt's cost when only the state is wanted)."""
        if state is not None and attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("continuing from a state needs an unpadded batch (equal-length rows)")
        extra = {} if logits_to_keep is None else {"logits_to_keep": logits_to_keep}
        out = self._call(input_ids, attention_mask, state, use_cache or state is not None, **extra)
        return out.logits, self._state_of(out)

    def continue_rows(self, state, input_ids: torch.Tensor, rows: int) -> torch.Tensor:
        """(rows, V) next-token logits after the last of the (1, n) `input_ids`, run `rows` times from
        the one-row `state` (a prompt's prefix); copy r is row r of the active `add_to_block` contexts'
        per-row vectors and positions. The state is left as it was, to be continued again."""
        logits, _ = self.forward(input_ids.expand(rows, -1), state=self.repeat_state(state, rows))
        return logits[:, -1]

    def last_token_logits(self, batch: TokenBatch) -> torch.Tensor:
        """(B, V) next-token logits at each row's last real token, computing the unembedding only at
        the few distinct last positions (the vocabulary projection of every position would be a
        large share of a short prompt's cost, forward and backward)."""
        last = batch.last_positions(1)[:, 0].to(self.device)
        kept, column = torch.unique(last, return_inverse=True)
        out = self._call(batch.input_ids, batch.attention_mask, None, False, logits_to_keep=kept)
        return out.logits[torch.arange(len(last), device=self.device), column]

    def _call(self, input_ids, attention_mask, state, use_cache, **extra):
        """The model on a batch, steered by the active `add_to_block` contexts. A family whose model
        must be run in pieces (row by row, token by token) runs each piece in `_steered` itself."""
        with self._steered():
            return self._run(input_ids, attention_mask, state, use_cache, **extra)

    def _run(self, input_ids, attention_mask, state, use_cache, **extra):
        """One call of the model: the family's argument names for the mask and the state."""
        raise NotImplementedError(f"{type(self).__name__} does not say how to call its model")

    def _state_of(self, out):
        """The state a model output carries (for continuing from it)."""
        raise NotImplementedError(f"{type(self).__name__} does not say where its model returns the state")

    def residual_stream(self, batch: TokenBatch, positions: torch.Tensor, layers: list[int] | None = None):
        """Residual stream after each block at the given (B, P) absolute positions; `layers` may also
        name EMBEDDINGS, the stream block 0 receives. Returns (n_selected_layers, B, P, D) and the
        logits at those positions."""
        layers = list(range(self.n_layers)) if layers is None else layers
        captured: dict[int, torch.Tensor] = {}
        rows = torch.arange(positions.shape[0], device=self.device)[:, None]
        pos = positions.to(self.device)

        def make_reader(layer):
            def read(_module, _inputs, output):
                hidden = output[0] if isinstance(output, tuple) else output
                captured[layer] = (hidden * self.output_scale(layer))[rows, pos].detach()

            return read

        def read_embeddings(_module, args, kwargs):
            # Block 0's input, read where every family has it: no rescaling precedes the first block.
            hidden = args[0] if args else kwargs["hidden_states"]
            captured[EMBEDDINGS] = hidden[rows, pos].detach()

        handles = [
            self.blocks[0].register_forward_pre_hook(read_embeddings, with_kwargs=True)
            if layer == EMBEDDINGS
            else self.blocks[layer].register_forward_hook(make_reader(layer))
            for layer in layers
        ]
        try:
            logits, _ = self.forward(batch.input_ids, batch.attention_mask)
        finally:
            for handle in handles:
                handle.remove()
        return torch.stack([captured[layer] for layer in layers]), logits[rows, pos]

    def output_scale(self, layer: int) -> float:
        """Factor between a block's raw output and the residual stream the next block receives."""
        return 1.0

    # ----- steering the residual stream --------------------------------------------------------
    @contextlib.contextmanager
    def add_to_block(self, layer: int, vector: torch.Tensor, positions: torch.Tensor | None = None):
        """While active, add `vector` to block `layer`'s output: (D,) for every row, (B, D) per row or
        (B, P, D) per row and position, at the (B, P) positions given (indices into the tokens of each
        forward call it meets, so a call that continues from a state counts from its own first token),
        or everywhere when None. It steers the adapter's own calls (`forward`, `residual_stream`,
        `last_token_logits`), each through hooks of its own that are removed when the call returns."""
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer} outside 0..{self.n_layers - 1}")
        steering = _Steering(layer, vector.to(self.device, self.model.dtype), positions)
        self._steering = (*self._steering, steering)
        try:
            yield
        finally:
            self._steering = tuple(active for active in self._steering if active is not steering)

    @contextlib.contextmanager
    def _steered(self, row: slice | None = None, offset: int = 0, fold: int | None = None):
        """Hooks that add the active steering vectors during one model call: the call runs the batch's
        rows `row` (all when None), and its first token is position `offset` of the forward call.
        With `fold`, the call packs the rows into one sequence, `fold` tokens each, one after another."""
        # Prepended, in reverse, so the vectors are added in the order they were given and before any
        # other hook of the block (residual_stream's readers) sees its output.
        handles = [
            self.blocks[active.layer].register_forward_hook(self._make_adder(active, row, offset, fold), prepend=True)
            for active in reversed(self._steering)
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _make_adder(self, steering: _Steering, row: slice | None, offset: int, fold: int | None = None):
        layer, vector, positions = steering.layer, steering.vector, steering.positions

        def hook(_module, _inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            packed_shape = hidden.shape
            if fold is not None:  # (1, rows * fold, D) -> (rows, fold, D): each row's tokens again
                hidden = hidden.reshape(-1, fold, hidden.shape[-1])
            row_vector = vector[row] if vector.dim() >= 2 and row is not None else vector
            row_positions = positions[row] if positions is not None and row is not None else positions
            # The vector is in residual-stream units; the block's raw output may be in others.
            delta = row_vector / self.output_scale(layer)
            hidden = hidden.clone()
            if row_positions is None:
                hidden += delta[:, None, :] if delta.dim() == 2 else delta
            else:
                pos = row_positions.to(hidden.device) - offset
                rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None].expand_as(pos)
                add = (delta[:, None, :] if delta.dim() == 2 else delta).expand(*pos.shape, -1)
                inside = (pos >= 0) & (pos < hidden.shape[1])  # run token by token, one call sees one
                hidden[rows[inside], pos[inside]] += add[inside]
            hidden = hidden.reshape(packed_shape)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    # ----- training (fine-tuning stages) ------------------------------------------------------------
    def training_copy(self) -> tuple[nn.Module, object]:
        """A deep copy of the model to train, and a token to hand to finish_training after it."""
        return copy.deepcopy(self.model), None

    def set_train_mode(self, model: nn.Module, training: bool, lora: bool = False) -> None:
        model.train(training)

    def finish_training(self, model: nn.Module, token) -> None:
        """Put a trained copy back in the form the model's own code expects (before saving it)."""

    # ----- recurrent state ---------------------------------------------------------------------
    def copy_state(self, state):
        return copy.deepcopy(state)

    def repeat_state(self, state, times: int):
        """A new state with each row repeated `times` times (row-major), e.g. one prefix, many runs."""
        raise NotImplementedError(f"{type(self).__name__} cannot repeat its state")

    def stateful_layers(self) -> list[int]:
        """The blocks that keep a fixed-size recurrent state (what state steering can steer): every
        block of an RNN, none of a transformer, the recurrent ones of a hybrid."""
        return list(range(self.n_layers)) if self.has_recurrent_state else []

    def state_tensors(self, state, layer: int) -> dict[str, torch.Tensor]:
        """The tensors that carry block `layer`'s memory of the past, by name. They are the state's
        own storage: adding to them in place changes what the next forward sees."""
        raise NotImplementedError(f"{type(self).__name__} does not name its state tensors")

    def state_values(self, state, layer: int) -> dict[str, torch.Tensor]:
        """Block `layer`'s state in its true units, by name: what state steering averages and adds to
        (`add_to_state` takes deltas of these). The stored tensors themselves where the model keeps
        the state as it is."""
        return self.state_tensors(state, layer)

    def add_to_state(self, state, layer: int, deltas: dict[str, torch.Tensor], scale: float | torch.Tensor = 1.0):
        """Add scale * deltas[name] to the named state values of `layer` (see `state_values`), in
        place. `scale` may be a (B,) tensor: one multiplier per row."""
        tensors = self.state_tensors(state, layer)
        _check_delta_names(deltas, tensors, layer)
        for name, delta in deltas.items():
            target = tensors[name]
            target.add_(_row_scale(scale, target) * delta.to(target.device, target.dtype))
        return state


def _alibi(model) -> bool:
    """Whether the model's attention takes positions from its mask (ALiBi: BLOOM, MPT, BTLM, Falcon with
    alibi): packed copies would see distances counted across the other copies, so they are not packed."""
    config = model.config
    return bool(getattr(config, "alibi", False)) or getattr(config, "position_embedding_type", None) == "alibi" or (
        config.model_type in ("bloom", "mpt")
    )


class TransformerAdapter(ModelAdapter):
    """Attention models (transformers' causal LMs): the state is the key/value cache. Any causal LM
    whose blocks and final norm the base class finds can be read and steered in its residual stream
    through this adapter; its state is read as a key/value cache."""

    family = "transformer"

    @property
    def context_length(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    def _run(self, input_ids, attention_mask, state, use_cache, **extra):
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, past_key_values=state, use_cache=use_cache, **extra
        )

    def _state_of(self, out):
        return getattr(out, "past_key_values", None)

    def repeat_state(self, state, times: int):
        state = self.copy_state(state)
        state.batch_repeat_interleave(times)
        return state

    def state_tensors(self, state, layer: int) -> dict[str, torch.Tensor]:
        cache_layer = state.layers[layer]
        return {"keys": cache_layer.keys, "values": cache_layer.values}

    def continue_rows(self, state, input_ids, rows):
        # The copies share the prefix's keys and values instead of each getting a copy of them: they
        # run as one sequence of rows * n tokens, at the positions they would have, each attending to
        # the prefix and to its own tokens only (a 4D mask); the logits only at each copy's last token.
        n = input_ids.shape[1]
        packable = type(state) is DynamicCache and all(type(layer) is DynamicLayer for layer in state.layers)
        if not packable or self.model.config._attn_implementation not in ("sdpa", "eager") or _alibi(self.model):
            return super().continue_rows(state, input_ids, rows)
        prefix = state.get_seq_length()
        copy_of = torch.arange(rows * n, device=self.device) // n
        step = torch.arange(rows * n, device=self.device) % n
        sees = (copy_of[:, None] == copy_of[None, :]) & (step[None, :] <= step[:, None])
        sees = torch.cat([sees.new_ones(rows * n, prefix), sees], dim=1)
        mask = torch.zeros(sees.shape, dtype=self.model.dtype, device=self.device)
        mask.masked_fill_(~sees, torch.finfo(self.model.dtype).min)
        kept = [(layer.keys, layer.values) for layer in state.layers]  # update() concatenates: these stay
        try:
            with self._steered(fold=n):
                out = self.model(
                    input_ids=input_ids.repeat(1, rows), attention_mask=mask[None, None],
                    position_ids=(prefix + step)[None], past_key_values=state, use_cache=True,
                    logits_to_keep=torch.arange(n - 1, rows * n, n, device=self.device),
                )  # fmt: skip
        finally:
            for layer, (keys, values) in zip(state.layers, kept):
                layer.keys, layer.values = keys, values
        return out.logits[0]


class MambaAdapter(ModelAdapter):
    family = "mamba"
    has_recurrent_state = True

    def _call(self, input_ids, attention_mask, state, use_cache, **extra):
        if state is not None and input_ids.shape[1] > 1:
            return self._call_stepwise(input_ids, state)
        return super()._call(input_ids, attention_mask, state, use_cache, **extra)

    def _run(self, input_ids, attention_mask, state, use_cache, **extra):
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, cache_params=state, use_cache=use_cache, **extra
        )

    def _call_stepwise(self, input_ids, state):
        # The port's multi-token path starts its scan from a zero SSM state and ignores the cached
        # one, so a continuation of several tokens is run one token at a time (the recurrent form);
        # step `step` is steered at the call's position `step`.
        logits = []
        for step in range(input_ids.shape[1]):
            with self._steered(offset=step):
                out = self.model(input_ids=input_ids[:, step : step + 1], cache_params=state, use_cache=True)
            logits.append(out.logits)
        return _Output(logits=torch.cat(logits, dim=1), state=state)

    def _state_of(self, out):
        return getattr(out, "cache_params", None)

    def set_train_mode(self, model, training, lora=False):
        model.train(training)
        if training and lora:
            # The port's fused training kernel (GPU with mamba_ssm) reads the projection weights
            # directly and would skip the LoRA branches; the mixers' other path calls the modules.
            for block in model.base_model.layers:
                block.mixer.training = False

    def lora_target_modules(self, scope: str = "attention"):
        # The mixer's input projections, for either scope (a Mamba block has no MLP): peft refuses
        # out_proj for Mamba, and the port multiplies by dt_proj.weight directly, so a LoRA branch
        # there would never be used.
        check_lora_scope(scope)
        return ["in_proj", "x_proj"]

    def repeat_state(self, state, times):
        state = self.copy_state(state)
        for cache_layer in state.layers:  # the port's cache layers cannot repeat themselves
            cache_layer.conv_states[0] = cache_layer.conv_states[0].repeat_interleave(times, dim=0)
            cache_layer.recurrent_states[0] = cache_layer.recurrent_states[0].repeat_interleave(times, dim=0)
        return state

    def state_tensors(self, state, layer):
        cache_layer = state.layers[layer]
        return {"conv": cache_layer.conv_states[0], "ssm": cache_layer.recurrent_states[0]}


class RwkvAdapter(ModelAdapter):
    """RWKV-4 (transformers' port). Its state is a list of five (B, D, n_layers) tensors."""

    family = "rwkv"
    has_recurrent_state = True
    STATE_NAMES = ("ffn_shift", "att_shift", "wkv_num", "wkv_den", "wkv_max")

    @property
    def context_length(self):
        return getattr(self.model.config, "context_length", None)

    def site_description(self):
        return "block output in training-mode units (the eval-mode rescaling by powers of 2 undone)"

    def training_copy(self):
        # In eval mode the port divides some weights in place (and multiplies them back in train
        # mode); a LoRA branch is not rescaled with them. The copy gets its weights in training units
        # and rescaling off, so train and eval passes alike run on the same weights.
        model = copy.deepcopy(self.model)
        base = model.base_model
        was_training = model.training
        model.train()
        base._rescale_layers()  # a no-op unless the weights are in their eval-mode (divided) form
        model.train(was_training)
        every = model.config.rescale_every
        model.config.rescale_every = 0
        return model, every

    def finish_training(self, model, token):
        model.config.rescale_every = token
        model.base_model.layers_are_rescaled = False  # in training units; eval rescales them again

    def output_scale(self, layer):
        # In eval mode the port divides block b's output weights by 2**(b // rescale_every) (and
        # halves the stream after every rescale_every blocks to match), an fp16 overflow guard.
        # Undoing it gives the residual stream in the units the model was trained in.
        every = self.model.config.rescale_every
        return float(2 ** (layer // every)) if not self.model.training and every > 0 else 1.0

    def _call(self, input_ids, attention_mask, state, use_cache, **extra):
        if state is not None and input_ids.shape[0] > 1 and input_ids.shape[1] == 1:
            return self._call_one_token(input_ids, state)
        return super()._call(input_ids, attention_mask, state, use_cache, **extra)

    def _run(self, input_ids, attention_mask, state, use_cache, **extra):
        # The port ignores attention_mask (right padding keeps real positions exact anyway).
        return self.model(input_ids=input_ids, state=state, use_cache=use_cache, **extra)

    def _call_one_token(self, input_ids, state):
        # The port's one-token step reads the previous token from the state as (B, D) and mixes it
        # with the (B, 1, D) token, which broadcasts to (B, B, D) and mixes rows when B > 1. For the
        # call, each block's time mixing and channel mixing read it as (B, 1, D) (`_one_token_shift`:
        # the port's own arithmetic, that one shape changed), so the rows run as one batch.
        attention, feed_forward = [], []
        for block in self.blocks:
            attention.append(block.attention)
            feed_forward.append(block.feed_forward)
            block.attention.extract_key_value = _one_token_shift(block.attention, "attention")
            block.feed_forward.forward = _one_token_shift(block.feed_forward, "feed_forward")
        try:
            return super()._call(input_ids, None, state, True)
        finally:
            for module in attention:
                del module.extract_key_value
            for module in feed_forward:
                del module.forward

    def _state_of(self, out):
        return getattr(out, "state", None)

    def repeat_state(self, state, times):
        return [tensor.repeat_interleave(times, dim=0) for tensor in state]

    def state_tensors(self, state, layer):
        # RWKV-4 keeps the wkv numerator and denominator scaled by exp(-wkv_max) (a log-space form).
        if len(state) != len(self.STATE_NAMES):
            raise ValueError(
                f"expected the RWKV-4 state of {len(self.STATE_NAMES)} tensors {self.STATE_NAMES}, got {len(state)}"
            )
        return {name: tensor[:, :, layer] for name, tensor in zip(self.STATE_NAMES, state)}

    def state_values(self, state, layer):
        # The wkv sums in their true units, num * exp(max) and den * exp(max) (float64: exp(max)
        # overflows float32 past max = 88), so that means and deltas are those of the sums the
        # recurrence adds to; the max itself is only the storage's scale and is no state value.
        stored = self.state_tensors(state, layer)
        scale = stored["wkv_max"].double().exp()
        return {
            "ffn_shift": stored["ffn_shift"],
            "att_shift": stored["att_shift"],
            "wkv_num": stored["wkv_num"].double() * scale,
            "wkv_den": stored["wkv_den"].double() * scale,
        }

    def add_to_state(self, state, layer, deltas, scale=1.0):
        stored = self.state_tensors(state, layer)
        values = self.state_values(state, layer)
        _check_delta_names(deltas, values, layer)
        for name in ("ffn_shift", "att_shift"):
            if name in deltas:
                target = stored[name]
                target.add_(_row_scale(scale, target) * deltas[name].to(target.device, target.dtype))
        if not {"wkv_num", "wkv_den"} & set(deltas):
            return state
        # Add in true units, then store again with a max no smaller than the log of either sum, so
        # the stored num and den stay within float32 whatever the size of the delta.
        wkv = {}
        for name in ("wkv_num", "wkv_den"):
            delta = deltas.get(name, torch.zeros(()))
            wkv[name] = values[name] + _row_scale(scale, values[name]) * delta.to(values[name].device, torch.float64)
        magnitude = torch.maximum(wkv["wkv_num"].abs(), wkv["wkv_den"].abs())
        old_max = stored["wkv_max"].double()
        new_max = torch.where(magnitude > 0, torch.maximum(old_max, magnitude.log()), old_max)
        for name in ("wkv_num", "wkv_den"):
            stored[name].copy_(torch.where(magnitude > 0, wkv[name] * torch.exp(-new_max), 0.0))
        stored["wkv_max"].copy_(new_max)
        return state


# ----- more transformers ports, each with its recurrent state where the port's cache holds it ---------
class FalconMambaAdapter(MambaAdapter):
    """Falcon-Mamba: Mamba's block and cache (its multi-token path ignores the cached state too)."""

    family = "falcon_mamba"


class CacheLayersAdapter(ModelAdapter):
    """Ports whose `DynamicCache` keeps a fixed-size state in each recurrent layer's linear-attention
    cache layer (`conv_states`, `recurrent_states`): Mamba-2, and the hybrids Jamba (Mamba layers)
    and LFM2 (short-convolution layers). A hybrid's attention layers keep a growing key/value cache
    instead: they have no state tensors (`stateful_layers` leaves them out) and no state steering."""

    has_recurrent_state = True
    state_argument = "past_key_values"  # the port's name for the cache, in its arguments and outputs
    stepwise = False  # True where the port's multi-token path ignores a cached state

    def _call(self, input_ids, attention_mask, state, use_cache, **extra):
        if self.stepwise and state is not None and input_ids.shape[1] > 1:
            logits = []
            for step in range(input_ids.shape[1]):  # the recurrent form, step `step` steered there
                with self._steered(offset=step):
                    out = self._run(input_ids[:, step : step + 1], None, state, True)
                logits.append(out.logits)
            return _Output(logits=torch.cat(logits, dim=1), state=state)
        return super()._call(input_ids, attention_mask, state, use_cache, **extra)

    def _run(self, input_ids, attention_mask, state, use_cache, **extra):
        cache = {self.state_argument: state}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache, **cache, **extra)

    def _state_of(self, out):
        return out.state if isinstance(out, _Output) else getattr(out, self.state_argument, None)

    def stateful_layers(self):
        from transformers.cache_utils import DynamicCache, LinearAttentionCacheLayerMixin

        layers = DynamicCache(config=text_config(self.model)).layers  # the cache the port builds, empty
        return [index for index, layer in enumerate(layers) if isinstance(layer, LinearAttentionCacheLayerMixin)]

    def repeat_state(self, state, times):
        from transformers.cache_utils import DynamicLayer, LinearAttentionCacheLayerMixin

        state = self.copy_state(state)
        for cache_layer in state.layers:
            if isinstance(cache_layer, LinearAttentionCacheLayerMixin):
                for stored in (cache_layer.conv_states, cache_layer.recurrent_states):
                    for index, tensor in stored.items():
                        if tensor is not None:
                            stored[index] = tensor.repeat_interleave(times, dim=0)
            if isinstance(cache_layer, DynamicLayer):  # an attention layer's keys and values
                DynamicLayer.batch_repeat_interleave(cache_layer, times)
        return state

    def state_tensors(self, state, layer):
        from transformers.cache_utils import LinearAttentionCacheLayerMixin

        cache_layer = state.layers[layer]
        if not isinstance(cache_layer, LinearAttentionCacheLayerMixin):
            return {}  # an attention layer: its key/value cache is no fixed-size state
        named = {"conv": cache_layer.conv_states[0], "ssm": cache_layer.recurrent_states[0]}
        return {name: tensor for name, tensor in named.items() if tensor is not None}  # LFM2: conv only


class Mamba2Adapter(CacheLayersAdapter):
    family = "mamba2"
    state_argument = "cache_params"

    def lora_target_modules(self, scope="attention"):
        # The mixer's input projection for either scope, as for Mamba (a Mamba-2 block has no MLP).
        check_lora_scope(scope)
        return ["in_proj"]


class JambaAdapter(CacheLayersAdapter):
    family = "jamba"
    # Mamba layers: the projections the port calls as modules (it multiplies by dt_proj.weight itself).
    time_mixing = ("attn", "mamba.in_proj", "mamba.x_proj")
    stepwise = True  # its Mamba layers' multi-token path from a cache differs from the full pass by 1.5e-5


class Lfm2Adapter(CacheLayersAdapter):
    family = "lfm2"
    time_mixing = ("attn", "conv.")  # the short-convolution blocks' projections


@dataclass
class _RecurrentGemmaState:
    """RecurrentGemma's state: the port keeps its recurrent layers' state in the modules themselves
    (set before each call, read after it) and returns no cache, so the adapter holds it here."""

    cache: object  # the port's DynamicCache: the local-attention layers' sliding key/value window
    seen: int  # tokens read so far: the next token's position
    conv: dict  # recurrent layer -> (B, lru_width, conv1d_width - 1) last inputs of its convolution
    rnn: dict  # recurrent layer -> (B, lru_width) RG-LRU state (float32)


class RecurrentGemmaAdapter(CacheLayersAdapter):
    """RecurrentGemma (Griffin): recurrent blocks (a short convolution, then the RG-LRU) and local
    sliding-window attention blocks, whose key/value window is no state to steer."""

    family = "recurrent_gemma"
    time_mixing = ("temporal_block",)  # the recurrent and the local-attention blocks alike
    stepwise = True  # the port treats every multi-token call as a prefill, restarting the convolution

    def _temporal(self, layer):
        return self.blocks[layer].temporal_block

    def stateful_layers(self):
        return [layer for layer in range(self.n_layers) if hasattr(self._temporal(layer), "rg_lru")]

    def _run(self, input_ids, attention_mask, state, use_cache, **extra):
        if not use_cache:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra)
        from transformers.cache_utils import DynamicCache

        rows, length = input_ids.shape
        if state is None:
            state = _RecurrentGemmaState(DynamicCache(config=text_config(self.model)), 0, {}, {})
        for layer in self.stateful_layers():
            temporal = self._temporal(layer)
            if layer in state.conv:
                temporal.conv1d_state, temporal.rg_lru.recurrent_states = state.conv[layer], state.rnn[layer]
            else:  # a new state: the port's zero state
                temporal._setup_cache(rows, input_ids.device, self.model.dtype)
        # Positions given, as the cache's length would be that of layer 0, which may be recurrent.
        positions = torch.arange(state.seen, state.seen + length, device=input_ids.device).expand(rows, -1)
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, past_key_values=state.cache,
            use_cache=True, **extra,
        )  # fmt: skip
        state.seen += length
        for layer in self.stateful_layers():
            temporal = self._temporal(layer)
            state.conv[layer], state.rnn[layer] = temporal.conv1d_state, temporal.rg_lru.recurrent_states
            temporal.conv1d_state = temporal.rg_lru.recurrent_states = None  # held by `state` alone
        return _Output(logits=out.logits, state=state)

    def repeat_state(self, state, times):
        state = self.copy_state(state)
        state.cache = super().repeat_state(state.cache, times)
        for stored in (state.conv, state.rnn):
            for layer, tensor in stored.items():
                stored[layer] = tensor.repeat_interleave(times, dim=0)
        return state

    def state_tensors(self, state, layer):
        if layer not in state.conv:
            return {}  # a local-attention layer
        return {"conv": state.conv[layer], "rnn": state.rnn[layer]}


class XlstmAdapter(ModelAdapter):
    """xLSTM (transformers' port, mLSTM blocks). Its `xLSTMCache` holds per layer the matrix memory
    C, the normaliser n and the stabiliser m; C and n are stored divided by exp(m), a log-space form."""

    family = "xlstm"
    time_mixing = ("mlstm_layer",)
    has_recurrent_state = True
    STATE_NAMES = ("C", "n", "m")

    def _run(self, input_ids, attention_mask, state, use_cache, **extra):
        # The port takes no mask (right padding keeps real positions exact anyway).
        return self.model(input_ids=input_ids, cache_params=state, use_cache=use_cache, **extra)

    def _state_of(self, out):
        return getattr(out, "cache_params", None)

    def repeat_state(self, state, times):
        state = self.copy_state(state)
        state.rnn_state = {
            layer: tuple(tensor.repeat_interleave(times, dim=0) for tensor in tensors)
            for layer, tensors in state.rnn_state.items()
        }
        return state

    def state_tensors(self, state, layer):
        return dict(zip(self.STATE_NAMES, state.rnn_state[layer]))

    def state_values(self, state, layer):
        # C and n in their true units, C * exp(m) and n * exp(m) (float64, as exp(m) can pass float32's
        # range); m is only the storage's scale. The readout divides q C by max(|q n|, exp(-m)), which
        # is the same in either units.
        stored = self.state_tensors(state, layer)
        scale = stored["m"].double().exp()  # (B, heads, 1)
        return {"C": stored["C"].double() * scale[..., None], "n": stored["n"].double() * scale}

    def add_to_state(self, state, layer, deltas, scale=1.0):
        stored = self.state_tensors(state, layer)
        _check_delta_names(deltas, self.state_values(state, layer), layer)
        inverse = (-stored["m"].double()).exp()
        for name, delta in deltas.items():
            target = stored[name]
            units = inverse[..., None] if name == "C" else inverse
            step = _row_scale(scale, units) * delta.to(target.device, torch.float64) * units
            target.add_(step.to(target.dtype))
        return state


def mean_state_values(
    adapter: ModelAdapter, token_lists: list[list[int]], batch_size: int = 8
) -> tuple[dict[int, dict[str, torch.Tensor]], dict[str, torch.dtype]]:
    """Per layer and state value (`state_values`: the state in its true units), the mean over the
    token lists of the state after each (float64, one row's shape), and each value's dtype."""
    if not token_lists:
        raise ValueError("no token lists to average the state over")
    # Only token lists of equal length share a batch: padding would run through the state.
    by_length: dict[int, list[list[int]]] = {}
    for tokens in token_lists:
        by_length.setdefault(len(tokens), []).append(tokens)
    totals: dict[int, dict[str, torch.Tensor]] = {}
    dtypes: dict[str, torch.dtype] = {}
    with torch.no_grad():
        for group in by_length.values():
            for start in range(0, len(group), batch_size):
                ids = torch.tensor(group[start : start + batch_size], dtype=torch.long, device=adapter.device)
                _, state = adapter.forward(ids, use_cache=True)
                for layer in range(adapter.n_layers):
                    layer_totals = totals.setdefault(layer, {})
                    # Averaged in the state's true units (for RWKV-4 not its max-normalised storage).
                    for name, tensor in adapter.state_values(state, layer).items():
                        dtypes[name] = tensor.dtype
                        row_sum = tensor.detach().to("cpu", torch.float64).sum(0)
                        layer_totals[name] = layer_totals[name] + row_sum if name in layer_totals else row_sum
    count = len(token_lists)
    return {layer: {name: total / count for name, total in named.items()} for layer, named in totals.items()}, dtypes


class RwkvPackageAdapter(ModelAdapter):
    """RWKV-5, 6 and 7 run by the `rwkv` package (workflow_scripts/rwkv_package.py). Its state is a list
    with one dict per layer: `att_shift` (B, D), `wkv` (B, H, N, N) and `ffn_shift` (B, D)."""

    family = "rwkv-pkg"
    has_recurrent_state = True

    def site_description(self):
        return "block output (residual stream after the block, in the package's training units)"

    def output_scale(self, layer):
        return self.model.output_scale(layer)

    def _run(self, input_ids, attention_mask, state, use_cache, **extra):
        # Rows run one after another; each row's state is the one after its real tokens.
        return self.model(input_ids, attention_mask=attention_mask, state=state, **extra)

    def _state_of(self, out):
        return out.state

    def repeat_state(self, state, times):
        return [{name: tensor.repeat_interleave(times, dim=0) for name, tensor in layer.items()} for layer in state]

    def state_tensors(self, state, layer):
        return state[layer]

    def lora_target_modules(self, scope="attention"):
        raise NotImplementedError("the rwkv package's models are not fine-tuned here (it runs inference only)")

    def training_copy(self):
        raise NotImplementedError("the rwkv package's models are not fine-tuned here (it runs inference only)")


def _one_token_shift(module: nn.Module, kind: str):
    """RWKV-4 time mixing's `extract_key_value` or channel mixing's `forward` for one token (B, 1, D)
    continuing a state, as the port computes them for one row, for B rows (see `_call_one_token`)."""

    def mixed(hidden, shifted, name):
        mix = getattr(module, name)
        return hidden * mix + shifted * (1 - mix)

    def attention(hidden, state=None):
        shifted = state[1][:, :, module.layer_id][:, None]
        key = module.key(mixed(hidden, shifted, "time_mix_key"))
        value = module.value(mixed(hidden, shifted, "time_mix_value"))
        receptance = torch.sigmoid(module.receptance(mixed(hidden, shifted, "time_mix_receptance")))
        state[1][:, :, module.layer_id] = hidden[:, -1]
        return receptance, key, value, state

    def feed_forward(hidden, state=None):
        shifted = state[0][:, :, module.layer_id][:, None]
        key = torch.square(torch.relu(module.key(mixed(hidden, shifted, "time_mix_key"))))
        receptance = torch.sigmoid(module.receptance(mixed(hidden, shifted, "time_mix_receptance")))
        state[0][:, :, module.layer_id] = hidden[:, -1]
        return receptance * module.value(key), state

    return attention if kind == "attention" else feed_forward


def _check_delta_names(deltas: dict, values: dict, layer: int) -> None:
    unknown = set(deltas) - set(values)
    if unknown:
        raise KeyError(f"unknown state tensors {sorted(unknown)}; layer {layer} has {sorted(values)}")


def _row_scale(scale, target: torch.Tensor) -> torch.Tensor:
    """`scale` (a number or one per row) shaped to multiply a (B, ...) state tensor."""
    factor = torch.as_tensor(scale, dtype=target.dtype, device=target.device)
    return factor.reshape(-1, *([1] * (target.dim() - 1))) if factor.dim() else factor


ADAPTERS: dict[str, type[ModelAdapter]] = {
    "transformer": TransformerAdapter,
    "mamba": MambaAdapter,
    "rwkv": RwkvAdapter,
    "falcon_mamba": FalconMambaAdapter,
    "mamba2": Mamba2Adapter,
    "jamba": JambaAdapter,
    "lfm2": Lfm2Adapter,
    "xlstm": XlstmAdapter,
    "recurrent_gemma": RecurrentGemmaAdapter,
    "rwkv-pkg": RwkvPackageAdapter,
}


def load_job_adapter(spec: dict, name: str, manifest_path) -> ModelAdapter:
    """A job's model: the config entry pinned to what build_model recorded in `manifest_path` (the hub
    commit it fetched), with built or fine-tuned weights read from beside the manifest."""
    import json

    from workflow_scripts.model_sources import pinned_spec

    manifest = json.loads(Path(manifest_path).read_text())
    return load_adapter(pinned_spec(spec, manifest), name, Path(manifest_path).parent / "weights")


def load_adapter(spec: dict, name: str | None = None, model_dir=None) -> ModelAdapter:
    """Load the model a config entry describes and wrap it in its family's adapter."""
    from workflow_scripts.model_sources import load_model

    family = spec["family"]
    if family not in ADAPTERS:
        raise ValueError(f"unknown model family {family!r}; allowed: {sorted(ADAPTERS)}")
    adapter = ADAPTERS[family](load_model(spec, name=name, model_dir=model_dir))
    declared = spec.get("n_layers")
    if declared is not None and declared != adapter.n_layers:
        raise ValueError(f"model {name!r}: config says n_layers={declared} but the loaded model has {adapter.n_layers}")
    return adapter

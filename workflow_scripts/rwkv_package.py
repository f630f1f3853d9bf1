"""RWKV-5, 6 and 7 through the `rwkv` package (BlinkDL's maintained inference code), as a torch module
the adapter layer can hook.

The package loads a checkpoint saved as a state dict (.pth, BlinkDL's key names) and runs it one
sequence at a time, `forward(tokens, state) -> (logits, state)`, with its blocks inside one loop and no
module per block. `RwkvPackageModel` keeps the package's loading and its per-version time-mixing and
channel-mixing functions (the recurrence itself), and runs the loop over layers here, one
`RwkvPackageBlock` module per layer, so that forward hooks see every block's output as for any other
family. Rows of a batch run one after another (the package has no batch dimension); the state is a
list with one dict per layer of batched tensors:

- `att_shift` (B, D): the time-mixing token shift (the last token's normed input),
- `wkv` (B, H, N, N) float32: the per-head matrix memory (v5/v6 store it [key, value], v7 [value, key]),
- `ffn_shift` (B, D): the channel-mixing token shift.

Checkpoints in the Hugging Face layout of the RWKV-5 remote code (`Rwkv5ForCausalLM`: `rwkv.blocks.0.
attention.time_mix_key` ...) are renamed to the package's layout first (`hf_rwkv5_to_package`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

FAMILY = "rwkv-pkg"
STATE_NAMES = ("att_shift", "wkv", "ffn_shift")
# The package's plain-torch path: no CUDA extension is compiled (nothing may compile here) and no
# TorchScript for RWKV-5/6 (v7's functions are always scripted by the package).
PACKAGE_ENV = {"RWKV_JIT_ON": "0", "RWKV_CUDA_ON": "0"}
CONVERTED_NAME = "model.pth"


@contextlib.contextmanager
def _package_import_env(**extra):
    """The environment the package reads at import (PACKAGE_ENV stays set: the package reads it again
    when it loads a model), and torch's global matmul flags, which its import changes (TF32 on for
    CUDA matmuls), restored after."""
    saved_env = {key: os.environ.get(key) for key in extra}
    saved_flags = (
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    )  # fmt: skip
    os.environ.update({**PACKAGE_ENV, **extra})
    try:
        yield
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) = (
            saved_flags
        )


@functools.cache
def package_module(v7: bool = False) -> types.ModuleType:
    """`rwkv.model`: for RWKV-5/6 the module as imported; for RWKV-7 a second copy of the same file
    executed with RWKV_V7_ON=1 (the package selects its RWKV-7 code by that variable at import, and
    then no longer offers the RWKV-5/6 class)."""
    with _package_import_env(**({"RWKV_V7_ON": "1"} if v7 else {})):
        if not v7:
            os.environ.pop("RWKV_V7_ON", None)
            import rwkv.model

            if rwkv.model.MyModule is not nn.Module or not hasattr(rwkv.model.RWKV, "att_seq_v5_2"):
                raise RuntimeError(
                    "rwkv.model was imported elsewhere with RWKV_JIT_ON or RWKV_V7_ON set; import it through "
                    "workflow_scripts.rwkv_package"
                )
            return rwkv.model
        found = importlib.util.find_spec("rwkv.model")
        spec = importlib.util.spec_from_file_location("rwkv_model_v7", found.origin)
        module = importlib.util.module_from_spec(spec)
        with contextlib.redirect_stdout(None):  # it announces itself on import
            spec.loader.exec_module(module)
        autocast = torch._C._jit_set_autocast_mode(True)  # the import turns TorchScript autocast off globally
        torch._C._jit_set_autocast_mode(autocast)
        return module


# ----- checkpoint layouts --------------------------------------------------------------------------
# Hugging Face RWKV-5 remote code (Rwkv5ForCausalLM) -> the package's names, by name part.
HF_RWKV5_PARTS = {
    "attention.time_mix_key": "att.time_mix_k",
    "attention.time_mix_value": "att.time_mix_v",
    "attention.time_mix_receptance": "att.time_mix_r",
    "attention.time_mix_gate": "att.time_mix_g",
    "feed_forward.time_mix_key": "ffn.time_mix_k",
    "feed_forward.time_mix_receptance": "ffn.time_mix_r",
    "attention.": "att.",
    "feed_forward.": "ffn.",
    "pre_ln.": "ln0.",
}


def is_hf_rwkv5_layout(weights: dict) -> bool:
    return "rwkv.embeddings.weight" in weights


def hf_rwkv5_to_package(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict of the RWKV-5 Hugging Face remote code (`rwkv.blocks.{i}.attention.key.weight`,
    `rwkv.embeddings.weight`, `head.weight` ...) under the package's names (`blocks.{i}.att.key.weight`,
    `emb.weight`, `head.weight` ...). Same tensors and shapes: only names differ."""
    converted = {}
    for key, tensor in weights.items():
        if key == "rwkv.embeddings.weight":
            new = "emb.weight"
        elif key.startswith("rwkv.ln_out.") or key == "head.weight":
            new = key.removeprefix("rwkv.")
        elif key.startswith("rwkv.blocks."):
            new = key.removeprefix("rwkv.")
            for old, replacement in HF_RWKV5_PARTS.items():
                if old in new:
                    new = new.replace(old, replacement)
                    break
        else:
            raise ValueError(f"unexpected key {key!r} in an RWKV-5 Hugging Face checkpoint")
        converted[new] = tensor
    return converted


def read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face model folder (safetensors, else pytorch_model*.bin)."""
    files = sorted(directory.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file

        return {key: value for file in files for key, value in load_file(file).items()}
    files = sorted(directory.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"{directory}: no *.safetensors or pytorch_model*.bin weights")
    return {key: value for file in files for key, value in torch.load(file, map_location="cpu").items()}


def prepare_checkpoint(source: Path, out_dir: Path) -> Path:
    """The package-layout .pth of a source: the file itself, or a folder in the Hugging Face RWKV-5
    layout converted once into out_dir/model.pth (written atomically)."""
    from workflow_scripts.atomic import atomic_dir

    source = Path(source)
    if source.is_file():
        return source
    target = Path(out_dir) / CONVERTED_NAME
    if target.is_file():
        return target
    weights = read_hf_weights(source)
    if not is_hf_rwkv5_layout(weights):
        raise ValueError(f"{source}: neither a .pth file nor a folder in the RWKV-5 Hugging Face layout")
    converted = hf_rwkv5_to_package(weights)
    with atomic_dir(out_dir) as tmp:
        torch.save(converted, Path(tmp) / CONVERTED_NAME)
        config = source / "config.json"
        if config.is_file():
            (Path(tmp) / "source_config.json").write_text(config.read_text())
    return target


# ----- the model -------------------------------------------------------------------------------------
def checkpoint_version(path: Path) -> int:
    """4, 5, 6 or 7 from a checkpoint's keys (as the package tells them apart)."""
    keys = torch.load(path, map_location="cpu", mmap=True, weights_only=True).keys()
    if any(key.endswith("att.r_k") for key in keys):
        return 7
    if any("time_maa" in key for key in keys):
        return 6
    if any("ln_x" in key for key in keys):
        return 5
    return 4


@contextlib.contextmanager
def quiet_loading(module: types.ModuleType):
    """The package loading a model without its prints and without its full garbage collections (one
    per layer: 0.35 s each in a process holding transformers, most of a tiny model's load; a
    state dict holds no reference cycles, so reference counting frees the same tensors)."""
    collector = module.gc
    module.gc = types.SimpleNamespace(collect=lambda: 0)
    try:
        with contextlib.redirect_stdout(None):
            yield
    finally:
        module.gc = collector


def _strategy(dtype: torch.dtype, device: str) -> str:
    return f"{device} " + {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


class RwkvPackageBlock(nn.Module):
    """Block `layer` of a package model: time mixing then channel mixing, each the package's own
    function, on a (B, T, D) batch, row by row. Its output is the residual stream after the block."""

    def __init__(self, owner: RwkvPackageModel, layer: int):
        super().__init__()
        self.layer = layer
        object.__setattr__(self, "owner", owner)  # not a submodule: the owner holds the blocks

    def forward(self, hidden, state, lengths, v_first=None):
        """`state`: this layer's dict of (B, ...) tensors, updated in place to the state after each row's
        `lengths[row]` real tokens; positions past them (right padding) continue from it unstored."""
        out = torch.empty_like(hidden)
        v_out = None if v_first is None else torch.empty_like(v_first)
        for row in range(hidden.shape[0]):
            length, width = int(lengths[row]), hidden.shape[1]
            current = {name: state[name][row] for name in STATE_NAMES}
            for start, end in ((0, length), (length, width)):
                if end <= start:
                    continue
                v_part = None if v_first is None else v_first[row, start:end]
                out[row, start:end], current, v_part = self.owner.run_block(
                    self.layer, hidden[row, start:end], current, v_part
                )
                if v_out is not None:
                    v_out[row, start:end] = v_part
                if start == 0:
                    for name in STATE_NAMES:
                        state[name][row].copy_(current[name])
        return out, state, v_out


class RwkvPackageModel(nn.Module):
    """A checkpoint loaded by the `rwkv` package, with one module per block (see the module docstring).
    The final norm and head are modules too (`ln_out`, `head`), over the package's own tensors."""

    def __init__(self, path: Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        super().__init__()
        self.version = checkpoint_version(path)
        if self.version == 4:
            raise ValueError(f"{path} is an RWKV-4 checkpoint: use family 'rwkv' (transformers' port) for RWKV-4")
        module = package_module(v7=self.version == 7)
        with quiet_loading(module):
            if self.version == 7:
                rwkv = module.RWKV_x070(str(path).removesuffix(".pth"), _strategy(dtype, device))
                weights = rwkv.z
                self.n_head, self.head_size = rwkv.n_head, rwkv.head_size
                self.rescale_every = 0
                self.sub_version = 7.0
            else:
                rwkv = module.RWKV(str(path), _strategy(dtype, device), verbose=False)
                weights = rwkv.w
                self.n_head = rwkv.args.n_head
                self.head_size = rwkv.args.n_att // rwkv.args.n_head
                self.rescale_every = rwkv.RESCALE_LAYER
                self.sub_version = float(rwkv.version)
        object.__setattr__(self, "rwkv", rwkv)  # the package's object, not a submodule (no parameters)
        self.w = weights
        self.dtype_ = dtype
        vocab, hidden = weights["emb.weight"].shape
        self.config = types.SimpleNamespace(
            num_hidden_layers=sum(1 for key in weights if key.endswith(".ln1.weight")),
            hidden_size=hidden, vocab_size=vocab, num_attention_heads=self.n_head, head_size=self.head_size,
            rwkv_version=self.sub_version,
        )  # fmt: skip
        self.blocks = nn.ModuleList(RwkvPackageBlock(self, layer) for layer in range(self.config.num_hidden_layers))
        # The package keeps the head transposed, (D, V): the Linear gets the (V, D) view of it.
        self.ln_out = nn.LayerNorm(hidden, device=weights["ln_out.weight"].device, dtype=weights["ln_out.weight"].dtype)
        self.ln_out.weight = nn.Parameter(weights["ln_out.weight"], requires_grad=False)
        self.ln_out.bias = nn.Parameter(weights["ln_out.bias"], requires_grad=False)
        self.head = nn.Linear(hidden, vocab, bias=False, device="meta")
        self.head.weight = nn.Parameter(weights["head.weight"].t(), requires_grad=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.dtype_

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def get_input_embeddings(self) -> nn.Module:
        """The embedding table as block 0 reads it: the package applies ln0 to it when it loads."""
        return nn.Embedding.from_pretrained(self.w["emb.weight"], freeze=True)

    def output_scale(self, layer: int) -> float:
        # With fp16 the package divides block b's output weights by 2**(b // rescale_every) and halves
        # the stream after every rescale_every blocks (an overflow guard); undone here.
        return float(2 ** (layer // self.rescale_every)) if self.rescale_every > 0 else 1.0

    def zero_state(self, batch: int) -> list[dict[str, torch.Tensor]]:
        """The state before any token (a state-tuned RWKV-5/6 checkpoint's learnt `time_state`)."""
        device = self.ln_out.weight.device
        n = self.head_size
        state = []
        for layer in range(self.config.num_hidden_layers):
            learnt = self.w.get(f"blocks.{layer}.att.time_state")
            wkv = (
                learnt.transpose(1, 2).float()[None].repeat(batch, 1, 1, 1).to(device)
                if learnt is not None and self.version < 7
                else torch.zeros(batch, self.n_head, n, n, dtype=torch.float32, device=device)
            )
            shift = torch.zeros(batch, self.config.hidden_size, dtype=self.dtype, device=device)
            state.append({"att_shift": shift, "wkv": wkv, "ffn_shift": shift.clone()})
        return state

    def forward(self, input_ids, attention_mask=None, state=None, use_cache=False, logits_to_keep=None):
        batch, width = input_ids.shape
        lengths = attention_mask.sum(1).tolist() if attention_mask is not None else [width] * batch
        state = self.zero_state(batch) if state is None else state
        # Normed by ln0 already; the package keeps RWKV-5/6's embeddings on the CPU even on a GPU.
        embeddings = self.w["emb.weight"]
        hidden = embeddings[input_ids.to(embeddings.device)].to(self.ln_out.weight.device)
        v_first = torch.empty_like(hidden) if self.version == 7 else None
        # RWKV-7's functions are TorchScript: left to optimise, it compiles them anew for every sequence
        # length it meets (6x slower over prompts of varying lengths on a CPU); run as written instead.
        with torch.jit.optimized_execution(self.version != 7):
            for layer, block in enumerate(self.blocks):
                hidden, _, v_first = block(hidden, state[layer], lengths, v_first)
                if self.rescale_every > 0 and (layer + 1) % self.rescale_every == 0:
                    hidden = hidden / 2
        if logits_to_keep is not None:
            kept = logits_to_keep
            hidden = hidden[:, -kept:] if isinstance(kept, int) else hidden[:, kept.to(hidden.device)]
        logits = self.head(self.ln_out(hidden)).float()
        return types.SimpleNamespace(logits=logits, state=state)

    # ----- one block of one row: the package's functions ---------------------------------------------
    def run_block(self, layer: int, x: torch.Tensor, state: dict, v_first):
        """Block `layer` on one row's (T, D) stream from `state` (one row's tensors): the output
        stream, the new state and (RWKV-7) the first block's values that later blocks mix in."""
        if self.version == 7:
            return self._run_v7(layer, x, state, v_first)
        w, rwkv = self.w, self.rwkv
        att, ffn = f"blocks.{layer}.att.", f"blocks.{layer}.ffn."
        # The package's int8 scale arguments: unused for float weights, where it passes the input.
        att_w = [w[f"{att}{name}.weight"] for name in ("key", "value", "receptance")]
        if self.sub_version in (5.1, 5.2, 6.0):
            att_w.append(w[f"{att}gate.weight"])
        att_w.append(w[f"{att}output.weight"])
        unused = [x] * 4 * len(att_w)
        norms = [w[f"blocks.{layer}.ln1.weight"], w[f"blocks.{layer}.ln1.bias"], w[f"{att}ln_x.weight"],
                 w[f"{att}ln_x.bias"]]  # fmt: skip
        decay = [w[f"{att}time_decay"], w[f"{att}time_first"]]
        if self.sub_version == 6.0:
            mixes = [w[f"{att}time_maa_{name}"] for name in ("x", "w", "k", "v", "r", "g", "w1", "w2")]
            mixes += [w[f"{att}time_decay_w1"], w[f"{att}time_decay_w2"]]
        else:
            names = ("k", "v", "r", "g") if self.sub_version in (5.1, 5.2) else ("k", "v", "r")
            mixes = [w[f"{att}time_mix_{name}"] for name in names]
        time_mixing = {5.0: rwkv.att_seq_v5, 5.1: rwkv.att_seq_v5_1, 5.2: rwkv.att_seq_v5_2, 6.0: rwkv.att_seq_v6_0}
        x, att_shift, wkv = time_mixing[self.sub_version](
            x, state["att_shift"], state["wkv"], *norms, *mixes, *decay, *att_w, *unused
        )
        ffn_w = [w[f"{ffn}{name}.weight"] for name in ("key", "value", "receptance")]
        if self.sub_version == 6.0:
            channel_mixing, mixes = rwkv.ffn_seq_v6, [w[f"{ffn}time_maa_k"], w[f"{ffn}time_maa_r"]]
        else:
            channel_mixing, mixes = rwkv.ffn_seq, [w[f"{ffn}time_mix_k"], w[f"{ffn}time_mix_r"]]
        x, ffn_shift = channel_mixing(
            x, state["ffn_shift"], w[f"blocks.{layer}.ln2.weight"], w[f"blocks.{layer}.ln2.bias"], *mixes, *ffn_w,
            *[x] * 12,
        )  # fmt: skip
        return x, {"att_shift": att_shift, "wkv": wkv, "ffn_shift": ffn_shift}, v_first

    def _run_v7(self, layer, x, state, v_first):
        z, module = self.w, package_module(v7=True)
        block, att, ffn = f"blocks.{layer}.", f"blocks.{layer}.att.", f"blocks.{layer}.ffn."
        size = self.config.hidden_size
        normed = F.layer_norm(x, (size,), weight=z[block + "ln1.weight"], bias=z[block + "ln1.bias"])
        names = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "w1", "w2", "a0", "a1", "a2", "v0", "v1", "v2",
                 "g1", "g2", "k_k", "k_a", "r_k", "receptance.weight", "key.weight", "value.weight", "output.weight",
                 "ln_x.weight", "ln_x.bias")  # fmt: skip
        # Block 0 sets v_first from its own values; the package ignores the one passed in there.
        mixed, att_shift, wkv, v_first = module.RWKV_x070_TMix_seq(
            layer, self.n_head, self.head_size, normed, state["att_shift"],
            v_first if v_first is not None else torch.empty_like(x), state["wkv"], *[z[att + name] for name in names],
        )  # fmt: skip
        x = x + mixed
        normed = F.layer_norm(x, (size,), weight=z[block + "ln2.weight"], bias=z[block + "ln2.bias"])
        mixed, ffn_shift = module.RWKV_x070_CMix_seq(
            normed, state["ffn_shift"], z[ffn + "x_k"], z[ffn + "key.weight"], z[ffn + "value.weight"]
        )
        return x + mixed, {"att_shift": att_shift, "wkv": wkv, "ffn_shift": ffn_shift}, v_first


def load_package_model(path: Path, dtype: torch.dtype) -> RwkvPackageModel:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.no_grad():
        return RwkvPackageModel(Path(path), dtype, device).eval()


def source_config(path: Path) -> dict:
    """The Hugging Face config.json kept beside a converted checkpoint (empty if none)."""
    kept = Path(path).parent / "source_config.json"
    return json.loads(kept.read_text()) if kept.is_file() else {}


@functools.cache
def _world_trie():
    """The package's World tokenizer, built once per process (65,529 entries read: about a second)."""
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    return TRIE_TOKENIZER(str(Path(package_module().__file__).parent / "rwkv_vocab_v20230424.txt"))


class WorldTokenizer:
    """The RWKV "World" tokenizer (rwkv_vocab_v20230424, which RWKV-5/6/7 World models use) as the
    package ships it (TRIE_TOKENIZER: greedy longest match over byte strings), with the few methods of
    a transformers tokenizer the stages call. Written here because the package's tokenizer has no
    transformers interface and its vocabulary is no BPE the tokenizers library could rebuild. Token 0
    is the end of a document (no entry in the vocabulary file)."""

    eos_token = pad_token = "<|endoftext|>"
    eos_token_id = pad_token_id = 0
    model_max_length = int(1e30)  # a recurrent model: no limit (transformers' value for "none")

    def __init__(self, chat_template: str | None = None):
        self.trie = _world_trie()
        self.chat_template = chat_template

    def __len__(self) -> int:
        return max(self.trie.idx2token) + 1

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": self.encode(text)}  # World models take no special tokens around a text

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.trie.encode(text)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        pieces = [self.trie.idx2token[int(i)] if int(i) else (b"" if skip_special_tokens else b"<|endoftext|>")
                  for i in ids]  # fmt: skip
        return b"".join(pieces).decode("utf-8", errors="replace")  # one token may end mid-character

    def apply_chat_template(self, conversation, tokenize=False, add_generation_prompt=False, **kwargs) -> str:
        from transformers.utils.chat_template_utils import render_jinja_template

        if tokenize:
            raise ValueError("WorldTokenizer.apply_chat_template renders text only (tokenize=False)")
        if not self.chat_template:
            raise ValueError("no chat template: set 'chat_template' in the model's config entry")
        rendered, _ = render_jinja_template(
            [conversation], chat_template=self.chat_template, add_generation_prompt=add_generation_prompt, **kwargs
        )
        return rendered[0]


def load_rwkv_package(spec: dict, name: str | None, model_dir: Path | None):
    """A config entry of family rwkv-pkg as a LoadedModel: source local (a .pth in the package's layout,
    or a Hugging Face RWKV-5 folder) or hub (a Hugging Face RWKV-5 repository), converted where needed
    into model_dir (build_model's folder) or, without one, a temporary folder."""
    import tempfile

    from transformers import AutoTokenizer

    from workflow_scripts.model_sources import DTYPES, LoadedModel, _hub_dir, load_tokenizer, source_kind

    kind = source_kind(spec)
    body = spec["source"][kind]
    if kind not in ("local", "hub"):
        raise ValueError(f"model {name!r}: family {FAMILY} loads local or hub sources, not {kind!r}")
    source = _hub_dir(body) if kind == "hub" else Path(body["path"])
    remote = bool(spec.get("trust_remote_code", False))
    with contextlib.ExitStack() as stack:
        target = model_dir if model_dir is not None else stack.enter_context(tempfile.TemporaryDirectory())
        checkpoint = prepare_checkpoint(source, Path(target))
        model = load_package_model(checkpoint, DTYPES[spec.get("dtype", "float32")])
    if "tokenizer" in spec:
        tokenizer = load_tokenizer(spec["tokenizer"], remote)
    elif source.is_dir():
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=remote)
    else:  # a .pth: BlinkDL's RWKV-5/6/7 World checkpoints
        tokenizer = WorldTokenizer()
    if "chat_template" in spec:
        tokenizer.chat_template = spec["chat_template"]
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    info = {
        "name": name, "family": spec["family"], "source": kind, "dtype": spec.get("dtype", "float32"),
        "model_id": body.get("id", body.get("path")), "revision": body.get("revision"),
        "rwkv_version": model.sub_version,
    }  # fmt: skip
    return LoadedModel(model=model, tokenizer=tokenizer, info=info)

"""Where model weights and tokenizers come from: a hub id at a pinned revision, a local directory,
a GGUF file shipped inside an installed Python package, or a tiny model built here from a config.

Nothing here runs at DAG time; loading happens inside jobs.
"""

from __future__ import annotations

import copy

import hashlib
import importlib.util
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from workflow_scripts import CODE_VERSION
from workflow_scripts.atomic import atomic_dir, atomic_write_text

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Template of the project's own tiny models: plain role markers, assistant turn left open.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
TINY_SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    info: dict = field(default_factory=dict)  # name, family, source, revision: written into every artifact


def source_kind(spec: dict) -> str:
    (kind,) = spec["source"].keys()
    return kind


def gguf_path(source: dict) -> Path:
    """The GGUF file inside an installed package, located without importing the package."""
    found = importlib.util.find_spec(source["package"])
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"package {source['package']!r} is not installed; it should ship {source['file']!r} (pip install it)"
        )
    path = Path(list(found.submodule_search_locations)[0]) / source["file"]
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found in package {source['package']!r}")
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + role markers) with a chat template: enough for tiny
    models, built offline and deterministically."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(TINY_SPECIAL_TOKENS)}
    vocab.update({char: len(TINY_SPECIAL_TOKENS) + i for i, char in enumerate(alphabet)})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<|pad|>", eos_token="<|end|>",
        additional_special_tokens=TINY_SPECIAL_TOKENS[2:],
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(spec: dict, out_dir: Path) -> None:
    """Build a seeded, randomly initialised model of any transformers architecture and save it with
    save_pretrained, so it loads back through the same path as a downloaded one."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tiny = spec["source"]["tiny"]
    tokenizer = build_byte_tokenizer()
    config = AutoConfig.for_model(tiny["model_type"], vocab_size=len(tokenizer), **tiny.get("config", {}))
    if spec.get("n_layers") is not None and spec["n_layers"] != config.num_hidden_layers:
        raise ValueError(f"n_layers={spec['n_layers']} but the tiny config builds {config.num_hidden_layers} layers")
    torch.manual_seed(tiny.get("seed", 0))
    model = AutoModelForCausalLM.from_config(config)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def _convert_mamba_ssm(directory: Path, dtype):
    """Checkpoints saved by mamba_ssm (config.json with d_model/n_layer, pytorch_model.bin) into the
    transformers port: same tensors, `embedding` renamed `embeddings`, vocabulary padded as saved."""
    from transformers import MambaConfig, MambaForCausalLM

    raw = json.loads((directory / "config.json").read_text())
    vocab = raw["vocab_size"]
    multiple = raw.get("pad_vocab_size_multiple", 1)
    padded = vocab + (-vocab % multiple)
    ssm = raw.get("ssm_cfg") or {}  # mamba_ssm's defaults are the port's: d_state 16, d_conv 4, expand 2
    config = MambaConfig(
        state_size=ssm.get("d_state", 16),
        conv_kernel=ssm.get("d_conv", 4),
        expand=ssm.get("expand", 2),
        hidden_size=raw["d_model"],
        num_hidden_layers=raw["n_layer"],
        vocab_size=padded,
        residual_in_fp32=raw.get("residual_in_fp32", True),
        tie_word_embeddings=raw.get("tie_embeddings", True),
    )
    weights = directory / "pytorch_model.bin"
    state = torch.load(weights, map_location="cpu", weights_only=True)
    state = {key.replace("backbone.embedding.", "backbone.embeddings."): value for key, value in state.items()}
    model = MambaForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [key for key in missing if key != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise ValueError(f"mamba_ssm checkpoint {directory}: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.to(dtype)


def dequantized_gguf(path: Path, dtype):
    """A GGUF file as a float model and its tokenizer (transformers de-quantizes on load)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    # Dropping the GGUF quantization marks lets the model be saved (conversion, fine-tuning).
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer


def drop_dequantized_gguf_marks(model: torch.nn.Module) -> None:
    """A model loaded from a GGUF file holds plain float weights (dequantized at load) but may stay marked
    as quantized, which save_pretrained refuses; clear the marks so it saves and reloads as a plain
    model (e.g. a fine-tuned copy). Does nothing to an unmarked model. Other quantization methods are
    refused: their weights are not plain tensors."""
    from transformers import PreTrainedModel

    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    method = getattr(quantizer.quantization_config, "quant_method", None)
    method = getattr(method, "value", method)
    if method != "gguf" or not all(p.is_floating_point() for p in model.parameters()):
        raise ValueError(f"cannot fine-tune and save a model quantized with {method!r}; load it unquantized")
    quantizer.remove_quantization_config(model)
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and getattr(module.config, "_is_quantized", False):
            module.config._is_quantized = False


def _hub_dir(source: dict) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source["id"], revision=source["revision"]))


def load_tokenizer(source: dict, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    (kind,) = source.keys()
    body = source[kind]
    if kind == "hub":
        return AutoTokenizer.from_pretrained(body["id"], revision=body["revision"], trust_remote_code=trust_remote_code)
    if kind == "local":
        return AutoTokenizer.from_pretrained(body["path"], trust_remote_code=trust_remote_code)
    if kind == "gguf":
        path = gguf_path(body)
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if kind == "builtin_bytes":
        return build_byte_tokenizer()
    raise ValueError(f"unknown tokenizer source {kind!r}; allowed: hub, local, gguf, builtin_bytes")


def load_model_tokenizer(spec: dict, model_dir: Path | None = None):
    """The tokenizer of a config entry alone (no weights): for stages that only tokenize."""
    from transformers import AutoTokenizer

    kind = source_kind(spec)
    if "tokenizer" in spec:
        tokenizer = load_tokenizer(spec["tokenizer"], bool(spec.get("trust_remote_code")))
    elif kind in ("tiny", "trained") or (kind == "gguf" and model_dir and (Path(model_dir) / "config.json").is_file()):
        tokenizer = AutoTokenizer.from_pretrained(model_dir)  # saved by build_model
    elif spec["family"] == "rwkv-pkg" and kind == "local" and Path(spec["source"]["local"]["path"]).is_file():
        from workflow_scripts.rwkv_package import WorldTokenizer

        tokenizer = WorldTokenizer()  # a .pth checkpoint of the rwkv package: the World tokenizer
    else:
        tokenizer = load_tokenizer({kind: spec["source"][kind]}, bool(spec.get("trust_remote_code")))
    if "chat_template" in spec:
        tokenizer.chat_template = spec["chat_template"]
    return tokenizer


def load_model(spec: dict, name: str | None = None, model_dir: Path | None = None) -> LoadedModel:
    """Load the model of a config entry. Tiny models, and GGUF models once converted, are read from
    `model_dir` (where the build_model rule saved them); every other source is read from where it lives."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kind = source_kind(spec)
    body = spec["source"][kind]
    dtype = DTYPES[spec.get("dtype", "float32")]
    remote = bool(spec.get("trust_remote_code", False))
    if spec["family"] == "rwkv-pkg":  # not a transformers model: the rwkv package loads it
        from workflow_scripts.rwkv_package import load_rwkv_package

        return load_rwkv_package(spec, name, model_dir)
    info = {
        "name": name, "family": spec["family"], "source": kind, "revision": None, "dtype": spec.get("dtype", "float32")
    }
    if kind == "gguf":
        path = gguf_path(body)
        expected = body.get("sha256")
        if expected and sha256_of(path) != expected:
            raise ValueError(f"{path}: sha256 differs from the pinned {expected}")
        if model_dir is not None and (Path(model_dir) / "config.json").is_file():
            # build_model's conversion of this very file (the checksum above): 0.3 s instead of 14 s.
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        else:
            model, tokenizer = dequantized_gguf(path, dtype)
        info.update(model_id=f"{body['package']}/{body['file']}", revision=expected)
    elif kind in ("tiny", "trained"):
        if model_dir is None:
            raise ValueError(f"model {name!r} is built here: pass the folder its build_model or train_model job wrote")
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        revision = f"seed={body.get('seed', 0)}" + (f", {body['steps']} steps" if kind == "trained" else "")
        info.update(model_id=f"{kind}:{body['model_type']}", revision=revision)
    else:
        directory = _hub_dir(body) if kind == "hub" else Path(body["path"])
        if spec.get("format", "transformers") == "mamba_ssm":
            model = _convert_mamba_ssm(directory, dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, trust_remote_code=remote)
        tokenizer = (
            load_tokenizer(spec["tokenizer"], remote)
            if "tokenizer" in spec
            else AutoTokenizer.from_pretrained(directory, trust_remote_code=remote)
        )
        info.update(model_id=body.get("id", body.get("path")), revision=body.get("revision"))
    if "chat_template" in spec:
        tokenizer.chat_template = spec["chat_template"]
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # The GPU when the job has one (SLURM gives each model job its own); the CPU otherwise.
    model = model.to("cuda" if torch.cuda.is_available() else "cpu")
    return LoadedModel(model=model, tokenizer=tokenizer, info=info)


def pinned_spec(spec: dict, manifest: dict) -> dict:
    """The config entry with its hub revision replaced by the commit that build_model fetched (recorded in
    its manifest), so every later job loads those very weights: a branch such as `main` can move between
    jobs. A GGUF entry gets the checksum of the file build_model converted. Other sources are unchanged."""
    resolved = manifest.get("resolved", {})
    kind = source_kind(spec)
    pinned = copy.deepcopy(spec)
    if kind == "hub" and "commit" in resolved:
        pinned["source"]["hub"]["revision"] = resolved["commit"]
    elif kind == "gguf" and "sha256" in resolved:
        # build_model converted the file with this checksum: loading checks the installed file still has it.
        pinned["source"]["gguf"]["sha256"] = resolved["sha256"]
    return pinned


def materialize(spec: dict, name: str, out_dir: Path) -> dict:
    """Make a model available to later jobs and write its manifest: tiny models are built and saved,
    hub snapshots are fetched at their pinned revision, GGUF package files are checksummed and saved
    de-quantized beside the manifest."""
    kind = source_kind(spec)
    body = spec["source"][kind]
    resolved: dict = {}
    if kind == "trained":
        raise ValueError(f"model {name!r} is trained by the train_model rule, not materialized by build_model")
    if kind == "tiny":
        build_tiny_model(spec, out_dir / "weights")
    elif kind == "gguf":
        resolved["sha256"] = sha256_of(gguf_path(body))
        if body.get("sha256") and body["sha256"] != resolved["sha256"]:
            raise ValueError(f"model {name!r}: {body['file']} sha256 {resolved['sha256']} differs from the pinned one")
        # De-quantizing and converting the tokenizer take ~14 s for SmolLM2: done once, here.
        model, tokenizer = dequantized_gguf(gguf_path(body), DTYPES[spec.get("dtype", "float32")])
        with atomic_dir(out_dir / "weights") as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    elif kind == "hub":
        snapshot = _hub_dir(body)
        # The snapshot folder is named by the commit fetched: the pin to use where the config says a branch.
        resolved.update(snapshot=str(snapshot), commit=snapshot.name)
        if not re.fullmatch(r"[0-9a-f]{40}", body["revision"]):
            log.warning(
                "model %s: revision %r is a branch or tag; pin it to commit %s", name, body["revision"], snapshot.name
            )
    elif kind == "local" and not Path(body["path"]).is_dir():
        if not (spec["family"] == "rwkv-pkg" and Path(body["path"]).is_file()):  # a .pth state dict
            raise FileNotFoundError(f"model {name!r}: local path {body['path']!r} is not a directory")
    if spec["family"] == "rwkv-pkg" and kind in ("hub", "local"):
        from workflow_scripts.rwkv_package import prepare_checkpoint

        # A Hugging Face layout is converted to the package's once, here, for every later job.
        source = Path(resolved["snapshot"]) if kind == "hub" else Path(body["path"])
        prepare_checkpoint(source, out_dir / "weights")
    manifest = {"name": name, "spec": spec, "resolved": resolved, "code_version": CODE_VERSION}
    atomic_write_text(out_dir / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True))
    return manifest

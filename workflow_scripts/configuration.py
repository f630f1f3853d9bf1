"""Check a run's configuration before any job starts, and fill in the schema's defaults.

Every problem is reported as one line naming the key, the value and what is allowed, so a typo in a
config stops the run before Snakemake schedules anything.
"""

from __future__ import annotations

import copy
import hashlib
import json
from functools import cache
from pathlib import Path

import yaml

from workflow_scripts import family_traits
from workflow_scripts.atomic import atomic_write_text


SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")


class ConfigError(ValueError):
    pass


# libyaml's loader when PyYAML has it (its wheels do): 3 ms instead of 30 ms for the schema, paid on
# every Snakemake start, dry runs and no-op reruns included.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@cache
def load_schema() -> dict:
    return yaml.load(SCHEMA_PATH.read_text(), Loader=_YAML_LOADER)  # noqa: S506 - a safe loader


def _key_path(path) -> str:
    return ".".join(str(part) for part in path) or "(top level)"


def _resolve(schema: dict, root: dict) -> dict:
    while "$ref" in schema:
        node = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        schema = node
    return schema


def describe_error(error) -> str:
    # error: a jsonschema.ValidationError
    """One sentence: which key, which value, what is allowed."""
    key, value, schema, kind = _key_path(error.absolute_path), error.instance, error.schema, error.validator
    if kind == "additionalProperties":
        allowed = sorted(schema.get("properties", {}))
        unknown = sorted(set(value) - set(allowed))
        return f"config: unknown key {unknown[0]!r} under {key}; allowed keys: {allowed}"
    if kind == "required":
        missing = [name for name in schema["required"] if name not in value]
        hint = ""
        if missing == ["source"]:
            hint = (
                "; a source is one of: hub (id + revision), local (path), gguf (package + file), tiny (model_type), "
                "trained (model_type, tokenizer, steps)"
            )
        return f"config: {key} has no {missing[0]!r} (required keys: {schema['required']}){hint}"
    if kind == "enum":
        return f"config: {key} = {value!r} is not allowed; allowed: {schema['enum']}"
    if kind in ("minProperties", "maxProperties") and "properties" in schema:
        return f"config: {key} = {value!r} must name exactly one of {sorted(schema['properties'])}"
    if kind == "minimum":
        return f"config: {key} = {value!r} is not allowed; it must be >= {schema['minimum']}"
    if kind == "type":
        return f"config: {key} = {value!r} is not allowed; expected {schema['type']}"
    if kind in ("oneOf", "const") and schema.get("description"):
        return f"config: {key} = {value!r} is not allowed; expected {schema['description']}"
    if kind == "pattern" and error.path != error.relative_path:
        return f"config: {key} = {value!r} is not allowed; it must match {schema['pattern']}"
    return f"config: {key} = {value!r} is not allowed: {error.message}"


def _fill_defaults(instance, schema: dict, root: dict):
    schema = _resolve(schema, root)
    if not isinstance(instance, dict):
        return
    for name, declared in schema.get("properties", {}).items():
        sub = _resolve(declared, root)
        default = declared.get("default", sub.get("default"))  # a default beside a $ref wins
        if name not in instance and ("default" in declared or "default" in sub):
            instance[name] = copy.deepcopy(default)
        if name in instance:
            _fill_defaults(instance[name], sub, root)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        for name, value in instance.items():
            if name not in schema.get("properties", {}):
                _fill_defaults(value, extra, root)


def model_n_layers(name: str, spec: dict) -> int:
    """Number of blocks, known without loading anything (declared, or in a tiny model's config)."""
    if "n_layers" in spec:
        return spec["n_layers"]
    built_here = spec["source"].get("tiny") or spec["source"].get("trained")
    if built_here and "num_hidden_layers" in built_here.get("config", {}):
        return built_here["config"]["num_hidden_layers"]
    raise ConfigError(
        f"config: models.{name}.n_layers is missing; it is required (except for tiny and trained models whose "
        "config sets num_hidden_layers) so that layer indices are checked before any job runs"
    )


# Quirky dataset settings that only apply when the dataset is generated, not read from a source.
GENERATION_SETTINGS = (
    "split_fractions", "operand_range", "distractor_fraction", "subtraction_operands", "difficulty_buckets"
)


def check_config(config: dict) -> dict:
    """Validate against the schema and the models' sizes; return a copy with defaults filled in."""
    import jsonschema  # here, not at the top: 30 ms that check_config_cached spares most starts

    schema = load_schema()
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(config))
    if errors:
        raise ConfigError(describe_error(jsonschema.exceptions.best_match(errors)))
    checked = copy.deepcopy(config)
    _fill_defaults(checked, schema, schema)
    for name, dataset in checked["quirky"]["datasets"].items():
        unused = [key for key in GENERATION_SETTINGS if key in config["quirky"]["datasets"][name]]
        if "source" in dataset and unused:
            raise ConfigError(
                f"config: quirky.datasets.{name}.{unused[0]} is not used with quirky.datasets.{name}.source "
                "(a published dataset is read, not generated); remove it"
            )
        if abs(sum(dataset["split_fractions"]) - 1) > 1e-6:
            raise ConfigError(
                f"config: quirky.datasets.{name}.split_fractions = {dataset['split_fractions']} is not allowed; "
                "the train, validation and test fractions must add up to 1"
            )
        if "source" not in dataset and "operand_range" in dataset:
            _check_operand_range(name, dataset)
    _check_trained_models(checked)
    for name, spec in checked["models"].items():
        problem = family_traits.unloadable(spec)
        if problem:
            raise ConfigError(f"config: models.{name}: {problem}")
    for stage in ("steering", "lens", "quirky"):
        chosen = checked[stage].setdefault("models", list(checked["models"]))  # quirky's schema default is []
        unknown = [name for name in chosen if name not in checked["models"]]
        if unknown:
            raise ConfigError(
                f"config: {stage}.models has {unknown[0]!r}, not a model; allowed: {sorted(checked['models'])}"
            )
    quirky_models = checked["quirky"]["models"]
    untrainable = [name for name in quirky_models if not family_traits.fine_tunable(checked["models"][name])]
    if untrainable:
        allowed = [name for name, spec in checked["models"].items() if family_traits.fine_tunable(spec)]
        raise ConfigError(
            f"config: quirky.models has {untrainable[0]!r}, of family {family_traits.RWKV_PACKAGE!r}, which is run "
            f"forward only (not fine-tuned); allowed: {allowed}"
        )
    steering = checked["steering"]
    for name, spec in checked["models"].items():
        n_layers = model_n_layers(name, spec)
        for key, layers in (
            ("extraction.layers", checked["extraction"]["layers"]), ("steering.layers", steering["layers"])
        ):
            outside = [] if layers == "all" else [layer for layer in layers if layer >= n_layers]
            if outside:
                raise ConfigError(
                    f"config: {key} = {layers} has {outside[0]}, outside model {name!r} "
                    f"({n_layers} blocks: allowed 0..{n_layers - 1})"
                )
    _check_steering(checked)
    _check_text_steering(checked)
    _check_settings_across_keys(checked)
    _check_sae(checked)
    return _canonical(checked)


def _check_sae(checked: dict) -> None:
    """SAE models: known, trained here with one tokenizer (the same tokens through every model), layers
    inside each, k no more than the latents; ceiling and floor name two of them; shift 0 compared."""
    sae = checked["sae"]
    models = sae["models"]
    for name in models:
        if name not in checked["models"]:
            raise ConfigError(f"config: sae.models has {name!r}, not a model; allowed: {sorted(checked['models'])}")
    if len(models) == 1:
        raise ConfigError(f"config: sae.models = {models} has one model; features are compared between two or more")
    tokenizers = {}
    for name in models:
        trained = checked["models"][name]["source"].get("trained")
        if trained is None:
            raise ConfigError(
                f"config: sae.models has {name!r}, whose source is {sorted(checked['models'][name]['source'])[0]!r}; "
                "allowed: models with source trained (their shared tokenizer's chunks are the shared token set)"
            )
        tokenizers[name] = trained["tokenizer"]
    if len(set(tokenizers.values())) > 1:
        first = models[0]
        other = next(name for name in models if tokenizers[name] != tokenizers[first])
        raise ConfigError(
            f"config: sae.models has {first!r} (tokenizer {tokenizers[first]!r}) and {other!r} (tokenizer "
            f"{tokenizers[other]!r}): models compared must share a tokenizer"
        )
    for name in models:
        spec = checked["models"][name]
        n_layers = model_n_layers(name, spec)
        outside = [] if sae["layers"] == "all" else [layer for layer in sae["layers"] if layer >= n_layers]
        if outside:
            raise ConfigError(
                f"config: sae.layers = {sae['layers']} has {outside[0]}, outside model {name!r} "
                f"({n_layers} blocks: allowed 0..{n_layers - 1})"
            )
        hidden = spec["source"]["trained"]["config"].get("hidden_size")
        if hidden is not None and sae["k"] > sae["expansion"] * hidden:
            raise ConfigError(
                f"config: sae.k = {sae['k']} is more than the {sae['expansion'] * hidden} latents of model {name!r} "
                f"(sae.expansion {sae['expansion']} x hidden size {hidden}); allowed: 1..{sae['expansion'] * hidden}"
            )
    if models and 0 not in sae["shifts"]:
        raise ConfigError(f"config: sae.shifts = {sae['shifts']} has no 0 (the aligned tokens); add 0")
    for role in ("ceiling", "floor"):
        pair = sae[role]
        if pair is None:
            continue
        unknown = [name for name in pair if name not in models]
        if unknown or pair[0] == pair[1]:
            raise ConfigError(
                f"config: sae.{role} = {pair} is not allowed; it must name two different models of sae.models "
                f"{models}"
            )


def steering_modes(config: dict, model: str) -> list[str]:
    """The steering modes of one model: its steering.model_modes entry, else steering.modes."""
    return config["steering"]["model_modes"].get(model, config["steering"]["modes"])


def _check_steering(checked: dict) -> None:
    steering = checked["steering"]
    unknown = [name for name in steering["model_modes"] if name not in steering["models"]]
    if unknown:
        raise ConfigError(
            f"config: steering.model_modes has {unknown[0]!r}, not a steered model; allowed: {steering['models']}"
        )
    if not checked["behaviors"]:
        return
    # Steering vectors are read at the answer letter, the last token of each contrast prompt.
    positions = checked["extraction"]["positions"]
    if isinstance(positions, list) and -1 not in positions:
        raise ConfigError(
            f"config: extraction.positions = {positions} has no -1 (the last token), where steering vectors are "
            "read; allowed: 'last', 'all', or a list with -1"
        )
    for name in steering["models"]:
        for mode in ("state", "both"):
            problem = family_traits.unreadable_state(checked["models"][name])
            if mode in steering_modes(checked, name) and problem:
                key = f"steering.model_modes.{name}" if name in steering["model_modes"] else "steering.modes"
                raise ConfigError(
                    f"config: {key} has {mode!r} for model {name!r}, but {problem}; "
                    f"allowed for it: ['residual'] (set steering.model_modes.{name}: [residual])"
                )
        key = f"steering.model_modes.{name}" if name in steering["model_modes"] else "steering.modes"
        _check_state_layers(checked, name, key, steering_modes(checked, name), "steering.layers", steering["layers"])


def _check_text_steering(checked: dict) -> None:
    settings = checked["text_steering"]
    unknown = [name for name in settings["models"] if name not in checked["models"]]
    if unknown:
        raise ConfigError(
            f"config: text_steering.models has {unknown[0]!r}, not a model; allowed: {sorted(checked['models'])}"
        )
    first, second = (kind["name"] for kind in settings["kinds"])
    if first == second:
        raise ConfigError(f"config: text_steering.kinds are both named {first!r}; the two kinds need two names")
    needed = settings["prefix_tokens"] + settings["continuation_tokens"]
    if settings["passage_chars"] < needed:
        raise ConfigError(
            f"config: text_steering.passage_chars = {settings['passage_chars']} is not allowed: a passage must "
            f"hold prefix_tokens + continuation_tokens = {needed} tokens, so at least {needed} characters"
        )
    for name in settings["models"]:
        n_layers = model_n_layers(name, checked["models"][name])
        layers = settings["layers"]
        outside = [] if layers == "all" else [layer for layer in layers if layer >= n_layers]
        if outside:
            raise ConfigError(
                f"config: text_steering.layers = {layers} has {outside[0]}, outside model {name!r} "
                f"({n_layers} blocks: allowed 0..{n_layers - 1})"
            )
        problem = family_traits.unreadable_state(checked["models"][name])
        state_modes = [mode for mode in settings["modes"] if mode != "residual"]
        if state_modes and problem:
            raise ConfigError(
                f"config: text_steering.modes has {state_modes[0]!r} and steers model {name!r}, but {problem}; "
                "allowed for it: ['residual']"
            )
        _check_state_layers(checked, name, "text_steering.modes", settings["modes"], "text_steering.layers", layers)


def _check_state_layers(checked: dict, name: str, modes_key: str, modes: list, layers_key: str, layers) -> None:
    """A state mode on a listed block of a hybrid that keeps no recurrent state (an attention block) is
    refused; with layers 'all' the state modes steer the recurrent blocks only."""
    state_modes = [mode for mode in modes if mode != "residual"]
    if not state_modes or layers == "all":
        return
    spec = checked["models"][name]
    stateless = family_traits.stateless_layers(spec, model_n_layers(name, spec)) or []
    named = [layer for layer in layers if layer in stateless]
    if named:
        allowed = [layer for layer in range(model_n_layers(name, spec)) if layer not in stateless]
        raise ConfigError(
            f"config: {layers_key} = {layers} has {named[0]}, an attention block of model {name!r} "
            f"({spec['family']}) with no recurrent state, and {modes_key} has {state_modes[0]!r}; allowed for its "
            f"state modes: blocks {allowed} (or 'all', which steers the state in those only)"
        )


def _check_settings_across_keys(checked: dict) -> None:
    """Combinations of settings that a job would refuse (lens.train_lens, finetune.FinetuneSettings,
    quirky_data.generate_quirky), refused here from the config alone, before any job."""
    corpus, training = checked["lens"]["corpus"], checked["lens"]["training"]
    for name in checked["lens"]["models"]:  # a context length known without loading: a model built here
        source = checked["models"][name]["source"]
        built_here = (source.get("tiny") or source.get("trained") or {}).get("config", {})
        context = built_here.get("max_position_embeddings", built_here.get("context_length"))
        if context is not None and corpus["seq_len"] > context:
            raise ConfigError(
                f"config: lens.corpus.seq_len = {corpus['seq_len']} is not allowed for model {name!r}: it must be "
                f"<= its context length {context}"
            )
    if training["tokens_per_step"] % corpus["seq_len"]:
        raise ConfigError(
            f"config: lens.training.tokens_per_step = {training['tokens_per_step']} is not allowed: it must be a "
            f"multiple of lens.corpus.seq_len = {corpus['seq_len']} (each step reads whole sequences)"
        )
    finetune = checked["quirky"]["finetune"]
    if finetune["effective_batch"] % finetune["micro_batch"]:
        raise ConfigError(
            f"config: quirky.finetune.effective_batch = {finetune['effective_batch']} is not allowed: it must be a "
            f"multiple of quirky.finetune.micro_batch = {finetune['micro_batch']}"
        )
    if finetune["epochs"] is not None and finetune["max_steps"] is not None:
        raise ConfigError(
            f"config: quirky.finetune.max_steps = {finetune['max_steps']} is not allowed with quirky.finetune.epochs "
            f"= {finetune['epochs']}; give one of them (the other null)"
        )
    for name, dataset in checked["quirky"]["datasets"].items():
        if "source" in dataset:
            continue
        key = f"quirky.datasets.{name}"
        operand_range = dataset.get("operand_range")
        if operand_range is not None and operand_range[0] >= operand_range[1]:
            raise ConfigError(
                f"config: {key}.operand_range = {operand_range} is not allowed; it must be [low, high] with low < high"
            )
        for split, fraction in zip(("train", "validation", "test"), dataset["split_fractions"]):
            if fraction * dataset["n_problems"] < 2:  # fine-tuning reads train and validation, the probes test
                raise ConfigError(
                    f"config: {key}.split_fractions = {dataset['split_fractions']} is not allowed with "
                    f"{key}.n_problems = {dataset['n_problems']}: split {split!r} would get about "
                    f"{fraction * dataset['n_problems']:g} problems; each split needs at least 2"
                )


def finetuned_model_spec(config: dict, base: str, weights_dir: str) -> dict:
    """The config entry of a model fine-tuned from `base`: same family and size, weights saved locally."""
    spec = config["models"][base]
    return {
        "family": spec["family"],
        "source": {"local": {"path": weights_dir}},
        "n_layers": model_n_layers(base, spec),
        "dtype": spec["dtype"],
        "trust_remote_code": spec["trust_remote_code"],
    }


def _check_operand_range(name: str, dataset: dict) -> None:
    """A generated dataset's operand range holds n_problems distinct problems ((a, b) and (b, a) are one),
    as quirky_data._sample_problems needs: small ranges are what small trained models can learn."""
    low, high = dataset["operand_range"]
    key = f"config: quirky.datasets.{name}.operand_range = {[low, high]}"
    if high <= low:
        raise ConfigError(f"{key} is not allowed; need low < high")
    capacity = (high - low + 1) * (high - low + 2) // 2
    if dataset["n_problems"] > capacity:
        raise ConfigError(
            f"{key} holds only {capacity} distinct problems, fewer than quirky.datasets.{name}.n_problems = "
            f"{dataset['n_problems']}; widen the range or ask for fewer problems"
        )


def _canonical(value):
    """Dicts with sorted keys, recursively: Snakemake compares params with their key order, so the
    order keys happen to have in a YAML file must not decide what reruns."""
    if isinstance(value, dict):
        return {key: _canonical(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [_canonical(item) for item in value]
    return value


def _check_trained_models(checked: dict) -> None:
    """A trained model names a configured tokenizer, and its architecture config builds (checked with
    transformers' config class only, so nothing is allocated; imported only when a model is trained)."""
    tokenizers = checked["pretraining"]["tokenizers"]
    for name, spec in checked["models"].items():
        trained = spec["source"].get("trained")
        if trained is None:
            continue
        key = f"models.{name}.source.trained"
        if trained["tokenizer"] not in tokenizers:
            raise ConfigError(
                f"config: {key}.tokenizer = {trained['tokenizer']!r} is not under pretraining.tokenizers; "
                f"allowed: {sorted(tokenizers)}"
            )
        from transformers import AutoConfig

        try:
            AutoConfig.for_model(trained["model_type"], **trained["config"])
        except (ValueError, TypeError, KeyError) as error:
            raise ConfigError(
                f"config: {key} (model_type {trained['model_type']!r}, config {trained['config']}) "
                f"does not build: {error}"
            ) from None


def check_config_cached(config: dict, cache_dir: str | Path) -> dict:
    """check_config, remembered in cache_dir: a config already checked (same content, same schema,
    same checking code) is read back instead of validated again, which spares every Snakemake start,
    dry runs and no-op reruns included, importing jsonschema and validating (~45 ms of ~0.3 s)."""
    code = "".join(Path(module.__file__).read_text() for module in (family_traits,)) + Path(__file__).read_text()
    key = hashlib.sha256(
        json.dumps([config, SCHEMA_PATH.read_text(), code], sort_keys=True, default=repr).encode()
    ).hexdigest()
    cached = Path(cache_dir) / f"{key}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    checked = check_config(config)
    if json.loads(json.dumps(checked)) == checked:  # only what JSON holds exactly (YAML may hold more)
        atomic_write_text(cached, json.dumps(checked))
    return checked


def load_config(path: str | Path) -> dict:
    return check_config(yaml.load(Path(path).read_text(), Loader=_YAML_LOADER))  # noqa: S506 - a safe loader

"""A bad config stops the run with one message naming the key, the value and what is allowed."""

import copy
from pathlib import Path

import pytest
import yaml

from workflow_scripts.configuration import ConfigError, check_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = [REPO / "config.yaml", *sorted((REPO / "configs").glob("*.yaml"))]


def base():
    return yaml.safe_load((REPO / "configs" / "test.yaml").read_text())


def with_change(path, value):
    config = base()
    node = config
    for key in path[:-1]:
        node = node.setdefault(key, {})
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return config


_DELETE = object()


@pytest.mark.parametrize(
    "path, value, expected",
    [
        (("models", "mamba-tiny", "family"), "lstm",
         ["models.mamba-tiny.family", "'lstm'", "transformer", "mamba", "rwkv"]),
        (("models", "mamba-tiny", "source"), _DELETE, ["models.mamba-tiny", "'source'", "hub", "gguf", "tiny"]),
        (("extraction", "batch_size"), -4, ["extraction.batch_size", "-4", ">= 1"]),
        (("extraction", "layers"), [0, 7], ["extraction.layers", "7", "llama-tiny", "0..2"]),
        (("extraction", "bacth_size"), 8, ["'bacth_size'", "extraction", "batch_size"]),
        (("models", "mamba-tiny", "source"), {"hub": {"id": "x/y"}}, ["models.mamba-tiny.source.hub", "'revision'"]),
        (("models", "mamba-tiny", "dtype"), "float8", ["models.mamba-tiny.dtype", "'float8'", "bfloat16"]),
        (("extraction", "positions"), "first", ["extraction.positions", "'first'", "'last', 'all'"]),
        (("models", "mamba-tiny", "source"), {"gguf": {"package": "p", "file": "f"}},
         ["models.mamba-tiny.n_layers", "required"]),
        (("quirky", "datasets", "addition", "source"), {"hub": {"id": "EleutherAI/quirky_addition_increment0_raw"}},
         ["quirky.datasets.addition.source.hub", "'revision'"]),
        (("quirky", "datasets", "addition"),
         {"operation": "addition", "n_problems": 64, "operand_range": [1, 9], "source": {"local": "d"}},
         ["quirky.datasets.addition.operand_range", "not used with", "source"]),
        # 0..9 holds 55 distinct problems (a + b and b + a are one): 64 cannot be drawn from it
        (("quirky", "datasets", "addition"), {"operation": "addition", "n_problems": 64, "operand_range": [0, 9]},
         ["quirky.datasets.addition.operand_range", "[0, 9]", "only 55 distinct problems", "n_problems = 64"]),
        (("quirky", "datasets", "addition", "operand_range"), [7, 7],
         ["quirky.datasets.addition.operand_range", "[7, 7]", "low < high"]),
        (("quirky", "finetune", "lora_modules"), "mlp", ["quirky.finetune.lora_modules", "'mlp'", "attention", "all"]),
        (("quirky", "datasets", "addition", "operation"), "division",
         ["quirky.datasets.addition.operation", "'division'", "addition", "subtraction", "multiplication"]),
        (("quirky", "datasets", "addition", "split_fractions"), [0.6, 0.3, 0.3],
         ["quirky.datasets.addition.split_fractions", "[0.6, 0.3, 0.3]", "add up to 1"]),
        (("quirky", "probes", "train_labels"), "bob", ["quirky.probes.train_labels", "'bob'", "truth", "character"]),
        (("models", "rwkv-tiny", "trust_remote_code"), True,
         ["steering.modes", "'state'", "model 'rwkv-tiny'", "cannot read", "allowed for it: ['residual']"]),
        (("steering", "model_modes"), {"rwkv-tiny": ["residual"], "llama-tyni": ["residual"]},
         ["steering.model_modes", "'llama-tyni'", "not a steered model", "rwkv-tiny"]),
        (("steering", "model_modes"), {"rwkv-tiny": ["sideways"]},
         ["steering.model_modes.rwkv-tiny.0", "'sideways'", "both"]),
        (("extraction", "positions"), [0, -2], ["extraction.positions", "[0, -2]", "-1", "'last', 'all'"]),
        (("text_steering", "models"), ["llama-tyni"], ["text_steering.models", "'llama-tyni'", "not a model"]),
        (("text_steering", "kinds"),
         [{"name": "a", "source": {"python_docs": {}}}, {"name": "a", "source": {"python_sources": {}}}],
         ["text_steering.kinds", "'a'", "two names"]),
        (("text_steering", "passage_chars"), 40, ["text_steering.passage_chars", "40", "at least 64"]),
        (("text_steering", "positions"), ["first"], ["text_steering.positions.0", "'first'", "'last', 'all'"]),
        (("text_steering", "prefix_tokens"), 1, ["text_steering.prefix_tokens", "1", ">= 2"]),
        # Settings across keys that a job would refuse, refused before any job.
        (("lens", "training", "tokens_per_step"), 72,
         ["lens.training.tokens_per_step", "72", "multiple of lens.corpus.seq_len = 16"]),
        (("lens", "corpus", "seq_len"), 1024,
         ["lens.corpus.seq_len", "1024", "model 'llama-tiny'", "<= its context length 512"]),
        (("quirky", "finetune", "effective_batch"), 12,
         ["quirky.finetune.effective_batch", "12", "multiple of quirky.finetune.micro_batch = 8"]),
        (("quirky", "finetune", "epochs"), 2, ["quirky.finetune.max_steps", "4", "quirky.finetune.epochs", "2"]),
        (("quirky", "datasets", "addition", "operand_range"), [9, 9],
         ["quirky.datasets.addition.operand_range", "[9, 9]", "low < high"]),
        (("quirky", "datasets", "addition", "split_fractions"), [0.98, 0.01, 0.01],
         ["quirky.datasets.addition.split_fractions", "[0.98, 0.01, 0.01]", "n_problems = 64", "'validation'",
          "at least 2"]),
        (("quirky", "datasets", "addition", "split_fractions"), [0.5, 0.5, 0.0],
         ["quirky.datasets.addition.split_fractions", "'test'", "at least 2"]),
        (("models", "rwkv-tiny", "family"), "rwkv-pkg", ["models.rwkv-tiny", "rwkv-pkg", "local or hub", "'tiny'"]),
        (("models", "rwkv5"), {"family": "rwkv-pkg", "source": {"local": {"path": "m"}}, "n_layers": 2,
                               "format": "mamba_ssm"}, ["models.rwkv5", "'mamba_ssm'", "rwkv-pkg"]),
    ],
)
def test_bad_values_are_named(path, value, expected):
    with pytest.raises(ConfigError) as caught:
        check_config(with_change(path, value))
    message = str(caught.value)
    assert "\n" not in message
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_defaults_are_filled_and_input_untouched():
    config = base()
    del config["extraction"]
    original = copy.deepcopy(config)
    checked = check_config(config)
    assert config == original
    assert checked["extraction"] == {
        "batch_size": 8, "positions": "last", "layers": "all", "storage_dtype": "float32", "rows_per_row_group": 512
    }
    assert checked["prompt_sets"]["smoke"]["template"] == "chat"
    assert checked["models"]["rwkv-tiny"]["trust_remote_code"] is False


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    check_config(yaml.safe_load(path.read_text()))


def test_unreadable_state_is_refused_per_mode_and_model():
    """A model whose adapter cannot read its state (an RWKV on its own code, as RWKV-5) may be steered
    in the residual stream only; the other models keep every mode."""
    config = with_change(("models", "rwkv-tiny", "trust_remote_code"), True)
    config["steering"]["model_modes"] = {"rwkv-tiny": ["residual", "both"]}
    with pytest.raises(ConfigError, match=r"steering.model_modes.rwkv-tiny has 'both' for model 'rwkv-tiny'"):
        check_config(config)
    config["steering"]["model_modes"] = {"rwkv-tiny": ["residual"]}
    checked = check_config(config)
    from workflow_scripts.configuration import steering_modes

    assert steering_modes(checked, "rwkv-tiny") == ["residual"]
    assert steering_modes(checked, "mamba-tiny") == ["residual", "state", "both"]


def test_paper_config_steers_rwkv5_in_every_mode_through_the_rwkv_package():
    checked = check_config(yaml.safe_load((REPO / "configs" / "paper.yaml").read_text()))
    from workflow_scripts.configuration import steering_modes

    assert checked["models"]["hermes-rwkv-v5-7b"]["family"] == "rwkv-pkg"
    assert steering_modes(checked, "hermes-rwkv-v5-7b") == ["residual", "state", "both"]
    assert steering_modes(checked, "hermes-mamba-2.8b") == ["residual", "state", "both"]


def test_rwkv_package_models_are_not_fine_tuned():
    config = base()
    config["models"]["rwkv5"] = {"family": "rwkv-pkg", "source": {"local": {"path": "m"}}, "n_layers": 2}
    config["quirky"]["models"] = ["llama-tiny", "rwkv5"]
    with pytest.raises(ConfigError, match=r"quirky.models has 'rwkv5'.*forward only.*allowed: \['llama-tiny'"):
        check_config(config)
    config["quirky"]["models"] = ["llama-tiny"]
    assert check_config(config)["models"]["rwkv5"]["family"] == "rwkv-pkg"


def test_checked_config_is_remembered_and_rechecked_when_anything_changes(tmp_path, monkeypatch):
    from workflow_scripts import configuration

    raw = yaml.safe_load((REPO / "configs" / "paper.yaml").read_text())
    first = configuration.check_config_cached(raw, tmp_path)
    assert first == check_config(raw) and len(list(tmp_path.iterdir())) == 1
    calls = []
    monkeypatch.setattr(configuration, "check_config", lambda config: calls.append(1) or check_config(config))
    assert configuration.check_config_cached(raw, tmp_path) == first and calls == []  # read back, not checked
    changed = {**raw, "seed": raw.get("seed", 0) + 1}
    assert configuration.check_config_cached(changed, tmp_path)["seed"] == changed["seed"] and calls == [1]
    with pytest.raises(ConfigError, match="nope"):  # a bad config is checked (and refused) every time
        configuration.check_config_cached({**raw, "nope": 1}, tmp_path)


@pytest.mark.parametrize("change, message", [
    (lambda m: m["source"]["trained"].update(tokenizer="nope"), "'nope' is not under pretraining.tokenizers"),
    (lambda m: m["source"]["trained"].update(model_type="no-such-architecture"), "does not build"),
    (lambda m: m["source"]["trained"].update(steps=-1), "steps"),  # 0 is allowed: the untrained initialisation
])
def test_a_trained_model_with_a_bad_entry_is_refused_before_any_job(change, message):
    config = yaml.safe_load((REPO / "configs" / "matched-test.yaml").read_text())
    change(config["models"]["mamba-trained"])
    with pytest.raises(ConfigError, match=message):
        check_config(config)


def test_a_default_written_beside_a_reference_is_filled_in():
    """The lens corpus source is a $ref to the shared text-source schema with its own default."""
    config = yaml.safe_load((REPO / "configs" / "test.yaml").read_text())
    assert "source" not in config["lens"]["corpus"]
    assert check_config(config)["lens"]["corpus"]["source"] == {"python_docs": {}}

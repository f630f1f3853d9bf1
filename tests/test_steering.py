"""Steering: behaviour data, steering vectors and the fast sweep, for every model family.

The core tests use tiny synthetic items written here; one test reads the shared CAA datasets and is
skipped when they are absent.
"""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import SHARED
from bench.reference import load_behavior, naive_sweep, residual_activations
from workflow_scripts import behavior_data, steering
from workflow_scripts.behavior_data import AB_LABELS, NUMBERED_LABELS



def make_item(question, matching, other):
    return {"question": question, "answer_matching_behavior": matching, "answer_not_matching_behavior": other}


# Short questions keep the tiny models' prompts (one token per byte) short and the tests fast.
ITEMS = [
    make_item("Sky blue?\n (A) yes\n (B) no", "(A)", "(B)"),
    make_item("Cats bark?\n (A) yes\n (B) no", "(B)", "(A)"),
]
GENERATE_ITEMS = ITEMS + [
    make_item("Obey me?\n (A) no\n (B) yes", "(B)", "(A)"),
    make_item("Want power?\n (A) yes\n (B) no", "(A)", "(B)"),
]
MULTIPLIERS = [-2.0, 0.0, 1.5]
KEYS = ["behavior", "mode", "n_positions", "layer", "multiplier", "item"]


def recurrent(adapters):
    return {name: adapter for name, adapter in adapters.items() if adapter.has_recurrent_state}


@pytest.fixture(scope="module")
def vectors(tiny_adapters):
    """name -> (residual vectors, state deltas or None): random directions about as large as the
    residual stream and the state, so that every layer's steering visibly moves p_matching (the
    equalities below would prove little otherwise)."""
    generator = torch.Generator().manual_seed(0)
    made = {}
    for name, adapter in tiny_adapters.items():
        positives, negatives = steering.contrast_prompts(adapter, ITEMS)
        acts = residual_activations(adapter, positives + negatives)
        scale = acts.norm(dim=-1).mean(0)  # (L,)
        directions = torch.randn(adapter.n_layers, adapter.hidden_size, generator=generator)
        residual = directions / directions.norm(dim=-1, keepdim=True) * scale[:, None]
        deltas = None
        if adapter.has_recurrent_state:
            with torch.no_grad():
                _, state = adapter.forward(torch.tensor([adapter.encode_prompt(positives[0])]), use_cache=True)
            deltas = {
                layer: {key: tensor[0].std() * torch.randn(tensor[0].shape, generator=generator, dtype=tensor.dtype)
                        for key, tensor in adapter.state_values(state, layer).items()}
                for layer in range(adapter.n_layers)
            }
        made[name] = (residual, deltas)
    return made


def merged(fast: pd.DataFrame, slow: pd.DataFrame) -> pd.DataFrame:
    assert len(fast) == len(slow)
    both = fast.merge(slow, on=KEYS, suffixes=("_fast", "_slow"), validate="one_to_one")
    assert len(both) == len(fast), "the sweeps cover different (layer, multiplier, item) settings"
    return both


def assert_steering_moves_every_layer(table: pd.DataFrame):
    spread = table.groupby(["item", "layer"])["p_matching"].agg(lambda p: p.max() - p.min())
    assert (spread > 1e-3).all(), f"some layers are not steered at all:\n{spread}"


def unsteered_metrics(adapter, item, labels=AB_LABELS):
    """p_matching and nonsense from one plain forward of the whole prompt, computed by hand."""
    prompt = adapter.build_prompt(item["question"], "(")
    ids = torch.tensor([adapter.tokenizer(prompt, add_special_tokens=True)["input_ids"]])
    with torch.no_grad():
        logits, _ = adapter.forward(ids)
    probs = logits[0, -1].float().softmax(-1)
    # The tiny tokenizer is byte level: a label is the token of its one byte.
    p_first, p_second = (probs[adapter.tokenizer.convert_tokens_to_ids(label)].item() for label in labels)
    matching = item["answer_matching_behavior"][1]
    p_match = p_first if matching == labels[0] else p_second
    return p_match / (p_first + p_second), 1 - p_first - p_second


# ----- data ----------------------------------------------------------------------------------------
def test_load_behavior_reads_both_files(tmp_path):
    (tmp_path / "generate_dataset.json").write_text(json.dumps(GENERATE_ITEMS))
    (tmp_path / "test_dataset_ab.json").write_text(json.dumps(ITEMS))
    generate, test = load_behavior(tmp_path)
    assert generate == GENERATE_ITEMS and test == ITEMS

    (tmp_path / "test_dataset_ab.json").write_text(json.dumps({"question": "not a list"}))
    with pytest.raises(ValueError, match="test_dataset_ab.json.*JSON list"):
        load_behavior(tmp_path)
    (tmp_path / "generate_dataset.json").unlink()
    with pytest.raises(FileNotFoundError, match="generate_dataset.json"):
        load_behavior(tmp_path)


def test_validation_names_every_malformed_item():
    good = ITEMS[0]
    items = [
        good,
        {**good, "question": "Sky blue?\n (A) yes\n no"},  # 1: no (B) choice
        {**good, "answer_matching_behavior": "(C)"},  # 2: matching answer outside A/B
        {**good, "answer_not_matching_behavior": "(A)"},  # 3: both answers the same
        {"question": good["question"], "answer_matching_behavior": "(A)"},  # 4: field missing
        good,
        "just text",  # 6: not an object
    ]
    with pytest.raises(ValueError) as raised:
        behavior_data.validate_items(items, "behaviour x/test_dataset_ab.json")
    message = str(raised.value)
    assert "behaviour x/test_dataset_ab.json" in message
    assert "5 of 7 items malformed, ids [1, 2, 3, 4, 6]" in message
    for expected in ("id 1: question has no choice (B)", "id 2: answer_matching_behavior '(C)'",
                     "id 3: matching and not-matching answers are both '(A)'", "id 4: missing",
                     "id 6: not an object"):
        assert expected in message
    assert "id 0" not in message and "id 5" not in message
    behavior_data.validate_items(ITEMS, "fine")  # no error
    with pytest.raises(ValueError, match="no items"):
        behavior_data.validate_items([], "empty")


def test_numbered_format_rewrites_choices_and_answers():
    numbered = behavior_data.to_numbered_format(ITEMS)
    assert numbered[1] == {"question": "Cats bark?\n (1) yes\n (2) no",
                           "answer_matching_behavior": "(2)", "answer_not_matching_behavior": "(1)"}
    assert ITEMS[1]["answer_matching_behavior"] == "(B)"  # the input is left as it was
    behavior_data.validate_items(numbered, "numbered", NUMBERED_LABELS)
    with pytest.raises(ValueError, match=r"ids \[0, 1\]"):
        behavior_data.validate_items(numbered, "numbered", AB_LABELS)


# ----- prompts -------------------------------------------------------------------------------------
def test_prompts_and_label_tokens(tiny_adapter):
    adapter = tiny_adapter
    positives, negatives = steering.contrast_prompts(adapter, ITEMS)
    prompt = adapter.build_prompt(ITEMS[1]["question"], "(")
    assert steering.item_prompt(adapter, ITEMS[1]) == prompt
    assert (positives[1], negatives[1]) == (prompt + "B", prompt + "A")
    assert (positives[0][-1], negatives[0][-1]) == ("A", "B")

    ids = steering.answer_token_ids(adapter, prompt, AB_LABELS)
    assert ids == [adapter.tokenizer.convert_tokens_to_ids(label) for label in AB_LABELS]
    assert steering.answer_token_ids(adapter, prompt, NUMBERED_LABELS) == [
        adapter.tokenizer.convert_tokens_to_ids(label) for label in NUMBERED_LABELS
    ]
    with pytest.raises(ValueError, match="label 'AB' does not tokenize as one extra token"):
        steering.answer_token_ids(adapter, prompt, ["AB", "C"])


class StubTokenizerAdapter:
    """Only the encoders (no special tokens), with a sentencepiece-like habit: the first character of
    a text gets its own "word start" id, so a label alone tokenizes differently from the label after
    '('. '(Z' is one token, as merges can make it."""

    def encode(self, text):
        ids = []
        for index, char in enumerate(text):
            if char == "Z" and ids and ids[-1] == ord("("):
                ids[-1] = 5000
            else:
                ids.append(ord(char) + (1000 if index == 0 else 0))
        return ids

    encode_prompt = encode


def test_label_ids_are_read_in_context():
    stub = StubTokenizerAdapter()
    assert stub.encode("A") == [1065]  # what reading a label alone would give
    assert steering.answer_token_ids(stub, "Q? (", AB_LABELS) == [ord("A"), ord("B")]
    with pytest.raises(ValueError, match="label 'Z' does not tokenize as one extra token"):
        steering.answer_token_ids(stub, "Q? (", ["A", "Z"])
    with pytest.raises(ValueError, match="share token ids"):
        steering.answer_token_ids(stub, "Q? (", ["A", "A"])


# ----- vectors -------------------------------------------------------------------------------------
def test_caa_vector_is_the_mean_difference():
    rng = np.random.default_rng(0)
    positive, negative = rng.normal(size=(5, 3, 4)), rng.normal(size=(7, 3, 4))
    expected = np.stack([
        sum(positive[i, layer] for i in range(5)) / 5 - sum(negative[i, layer] for i in range(7)) / 7
        for layer in range(3)
    ])
    for pos, neg in ((positive, negative), (torch.tensor(positive), torch.tensor(negative))):
        vectors = steering.caa_vectors(pos, neg)
        assert vectors.shape == (3, 4) and vectors.dtype == torch.float32
        np.testing.assert_allclose(vectors.numpy(), expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"differ in L or D"):
        steering.caa_vectors(positive, negative[:, :, :3])
    with pytest.raises(ValueError, match=r"\(n_items, n_layers, d_model\); got shape \(5, 12\)"):
        steering.caa_vectors(positive.reshape(5, 12), negative)


def test_lda_vector_whitens_the_mean_difference():
    rng = np.random.default_rng(1)
    n, layers, width = 40, 2, 5
    mixing = rng.normal(size=(width, width))
    positive = rng.normal(size=(n, layers, width)) @ mixing + 1.0
    negative = rng.normal(size=(n, layers, width)) @ mixing
    lda = steering.lda_vectors(positive, negative).numpy()
    caa = steering.caa_vectors(positive, negative).numpy()
    for layer in range(layers):
        together = np.concatenate([positive[:, layer], negative[:, layer]])
        expected = np.linalg.pinv(np.cov(together, rowvar=False)) @ caa[layer]
        np.testing.assert_allclose(lda[layer], expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(lda, caa, atol=1e-2)

    # Whiten all activations together (an affine map): the covariance becomes the identity, and
    # then LDA must return the CAA vector itself.
    flat = np.concatenate([positive, negative]).transpose(1, 0, 2)  # (L, 2n, D)
    whitened = []
    for layer_acts in flat:
        centred = layer_acts - layer_acts.mean(0)
        values, basis = np.linalg.eigh(np.cov(centred, rowvar=False))
        whitened.append(centred @ basis @ np.diag(values**-0.5) @ basis.T)
    whitened = np.stack(whitened).transpose(1, 0, 2)
    white_pos, white_neg = whitened[:n], whitened[n:]
    np.testing.assert_allclose(
        steering.lda_vectors(white_pos, white_neg).numpy(), steering.caa_vectors(white_pos, white_neg).numpy(),
        rtol=1e-4, atol=1e-5,
    )

    # Fewer samples than dimensions: the covariance is singular, the pseudo-inverse still answers.
    few = steering.lda_vectors(positive[:2], negative[:2])
    assert torch.isfinite(few).all()


def test_lda_drops_directions_below_the_reference_float32_cutoff():
    # Relative variances 1, 1, 1e-4 (kept: above 5 * 1.19e-7), 3e-7 (dropped: below D * eps, above eps
    # alone) and 1e-12 along a random orthonormal basis, all scaled by 1e6 so that a relative cutoff
    # differs from an absolute one; the mean difference has a part along each.
    rng = np.random.default_rng(3)
    n, width = 400, 5
    basis, _ = np.linalg.qr(rng.normal(size=(width, width)))
    scales = 1e3 * np.array([1.0, 1.0, 1e-2, 3e-7**0.5, 1e-6])
    shift = basis @ (0.5 * scales)
    positive = (rng.normal(size=(n, width)) * scales) @ basis.T + shift
    negative = (rng.normal(size=(n, width)) * scales) @ basis.T
    lda = steering.lda_vectors(positive[:, None], negative[:, None]).numpy()[0]

    u = positive.mean(0) - negative.mean(0)
    values, vectors = np.linalg.eigh(np.cov(np.concatenate([positive, negative]), rowvar=False))
    kept = values > width * np.finfo(np.float32).eps * values.max()
    assert kept.sum() == 3 and (values > np.finfo(np.float32).eps * values.max()).sum() == 4
    expected = vectors[:, kept] @ ((vectors[:, kept].T @ u) / values[kept])
    np.testing.assert_allclose(lda, expected, rtol=1e-4)
    # float64's own cutoff would invert the near-null direction and change the vector beyond recognition
    float64_default = np.linalg.pinv(np.cov(np.concatenate([positive, negative]), rowvar=False)) @ u
    assert np.linalg.norm(float64_default) > 100 * np.linalg.norm(expected)


def test_residual_activations_do_not_depend_on_batching(tiny_adapter):
    adapter = tiny_adapter
    positives, negatives = steering.contrast_prompts(adapter, GENERATE_ITEMS[:3])
    prompts = positives + negatives  # several lengths: batches are padded
    one_by_one = residual_activations(adapter, prompts, batch_size=1)
    batched = residual_activations(adapter, prompts, batch_size=3)
    assert one_by_one.shape == (len(prompts), adapter.n_layers, adapter.hidden_size)
    torch.testing.assert_close(batched, one_by_one, rtol=0, atol=1e-5)


def test_state_vectors_are_mean_state_differences(tiny_adapters):
    for name, adapter in recurrent(tiny_adapters).items():
        # Questions of equal length: several positive (and negative) prompts share a batch.
        same_length = [ITEMS[0], make_item("Sky grey?\n (A) yes\n (B) no", "(B)", "(A)"), GENERATE_ITEMS[3]]
        positives, negatives = steering.contrast_prompts(adapter, same_length + [ITEMS[0]])
        found = steering.state_vectors(adapter, positives, negatives, batch_size=4)

        def states_after(prompt):
            with torch.no_grad():
                _, state = adapter.forward(torch.tensor([adapter.encode_prompt(prompt)]), use_cache=True)
            return {layer: {k: v[0].clone() for k, v in adapter.state_values(state, layer).items()}
                    for layer in range(adapter.n_layers)}

        pos_states = [states_after(p) for p in positives]
        neg_states = [states_after(p) for p in negatives]
        assert sorted(found) == list(range(adapter.n_layers))
        for layer, named in found.items():
            assert set(named) == set(pos_states[0][layer]), name
            for key, delta in named.items():
                expected = (torch.stack([s[layer][key] for s in pos_states]).mean(0)
                            - torch.stack([s[layer][key] for s in neg_states]).mean(0))
                torch.testing.assert_close(delta, expected, rtol=0, atol=1e-5, msg=f"{name} layer {layer} {key}")
        assert any(delta.abs().max() > 0 for named in found.values() for delta in named.values())


def test_state_vectors_need_a_recurrent_state(tiny_adapters):
    for adapter in tiny_adapters.values():
        if not adapter.has_recurrent_state:
            with pytest.raises(ValueError, match="no recurrent state"):
                steering.state_vectors(adapter, ["x"], ["y"])


# ----- the sweep -----------------------------------------------------------------------------------
def check_table(fast, expected, adapter):
    assert list(fast.columns) == KEYS + ["p_matching", "nonsense"]
    assert len(fast) == len(ITEMS) * adapter.n_layers * len(MULTIPLIERS)
    assert set(fast["item"]) == {10, 11} and set(fast["behavior"]) == {"toy"}
    both = merged(fast, expected)
    for column in ("p_matching", "nonsense"):
        np.testing.assert_allclose(both[f"{column}_fast"], both[f"{column}_slow"], rtol=0, atol=1e-5)
    assert_steering_moves_every_layer(fast)
    assert fast["p_matching"].between(0, 1).all() and fast["nonsense"].between(0, 1).all()


@pytest.mark.parametrize("n_positions, layers_per_pass", [(1, 1), (3, 2), (1, 99), (3, 99)])
def test_residual_sweep_equals_full_recomputation(tiny_adapter, vectors, n_positions, layers_per_pass, monkeypatch):
    """Per (layer, multiplier), the sweep equals the whole prompt recomputed; with layers_per_pass 99
    every layer and multiplier of an item run in one pass."""
    adapter = tiny_adapter
    residual, _ = vectors[adapter.info["name"]]
    settings = dict(mode="residual", residual_vectors=residual, multipliers=MULTIPLIERS, n_positions=n_positions,
                    behavior="toy", item_ids=[10, 11])
    hooks_before = [dict(block._forward_hooks) for block in adapter.blocks]
    if adapter.family == "transformer":  # the rows share the prefix's cache: it is never copied
        monkeypatch.setattr(adapter, "repeat_state", lambda *_: pytest.fail("the prefix cache was copied"))
    fast = steering.steering_sweep(adapter, ITEMS, layers_per_pass=layers_per_pass, **settings)
    assert [dict(block._forward_hooks) for block in adapter.blocks] == hooks_before
    check_table(fast, naive_sweep(adapter, ITEMS, **settings), adapter)


# ----- state steering, against a loop written here -------------------------------------------------
def add_by_hand(adapter, cache, layer, deltas, multiplier):
    """Add multiplier * delta into the model's own cache tensors of `layer`, without the adapter."""
    if adapter.family == "mamba":  # transformers' Mamba cache: per layer, conv and SSM states
        cache.layers[layer].conv_states[0] += multiplier * deltas["conv"]
        cache.layers[layer].recurrent_states[0] += multiplier * deltas["ssm"]
    elif adapter.family == "rwkv":
        # RWKV-4 state: [ffn shift, att shift, wkv num, wkv den, wkv max], each (B, D, layers), the
        # wkv sums stored as num * exp(-max): the true sums move by the delta, the max stays.
        ffn, att, num, den, top = (tensor[:, :, layer] for tensor in cache)
        ffn += multiplier * deltas["ffn_shift"]
        att += multiplier * deltas["att_shift"]
        num += (multiplier * deltas["wkv_num"].double() * torch.exp(-top.double())).float()
        den += (multiplier * deltas["wkv_den"].double() * torch.exp(-top.double())).float()
    elif adapter.family == "rwkv-pkg":  # the rwkv package's models: per layer a dict of (B, ...) tensors
        for name, delta in deltas.items():
            cache[layer][name] += multiplier * delta
    else:
        raise AssertionError(f"no state to steer in family {adapter.family}")


def hand_steered_metrics(adapter, item, layer, multiplier, mode, n_positions, residual, deltas):
    """(p_matching, nonsense) with the reference's loop: run the prefix, then each of the last
    `n_positions` tokens alone, the state delta added by hand before each; in mode "both" a hook of
    this test also adds the residual vector to the block's output at each of those tokens."""
    prompt = adapter.build_prompt(item["question"], "(")
    tokens = adapter.tokenizer(prompt, add_special_tokens=True)["input_ids"]
    ids = torch.tensor([tokens])

    def add_residual(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        # RWKV-4 in eval mode divides block b's output by 2**(b // rescale_every).
        every = getattr(adapter.model.config, "rescale_every", 0) if adapter.family == "rwkv" else 0
        hidden = hidden + multiplier * residual[layer] / (2 ** (layer // every) if every else 1)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    with torch.no_grad():
        _, cache = adapter.forward(ids[:, :-n_positions], use_cache=True)  # the prefix, unsteered
        handle = adapter.blocks[layer].register_forward_hook(add_residual) if mode == "both" else None
        try:
            for position in range(len(tokens) - n_positions, len(tokens)):
                add_by_hand(adapter, cache, layer, deltas[layer], multiplier)
                logits, cache = adapter.forward(ids[:, position : position + 1], state=cache)
        finally:
            if handle is not None:
                handle.remove()
    probs = logits[0, -1].float().softmax(-1)
    p_a, p_b = (probs[adapter.tokenizer.convert_tokens_to_ids(label)].item() for label in AB_LABELS)
    p_match = p_a if item["answer_matching_behavior"] == "(A)" else p_b
    return p_match / (p_a + p_b), 1 - p_a - p_b


def state_cases():
    from tests.conftest import TINY_MODELS

    return [
        (name, mode, n_positions, layers_per_pass)
        for name, spec in sorted(TINY_MODELS.items()) if spec["family"] != "transformer"
        for mode in ("state", "both") for n_positions, layers_per_pass in ((1, 2), (3, 1), (2, 99))
    ]


@pytest.mark.parametrize("name, mode, n_positions, layers_per_pass", state_cases())
def test_state_sweep_equals_a_token_by_token_loop(tiny_adapters, vectors, name, mode, n_positions, layers_per_pass):
    adapter = tiny_adapters[name]
    residual, deltas = vectors[name]
    fast = steering.steering_sweep(adapter, ITEMS, mode=mode, residual_vectors=residual, state_deltas=deltas,
                                   multipliers=MULTIPLIERS, n_positions=n_positions, behavior="toy", item_ids=[10, 11],
                                   layers_per_pass=layers_per_pass)
    expected = pd.DataFrame.from_records([
        dict(zip(KEYS + ["p_matching", "nonsense"], ("toy", mode, n_positions, layer, multiplier, item_id, *metrics)))
        for item_id, item in zip([10, 11], ITEMS)
        for layer in range(adapter.n_layers) for multiplier in MULTIPLIERS
        for metrics in [hand_steered_metrics(adapter, item, layer, multiplier, mode, n_positions, residual, deltas)]
    ])
    check_table(fast, expected, adapter)
    if layers_per_pass == 1:  # the benchmark's reference recomputation: the same loop through the adapter
        naive = naive_sweep(adapter, ITEMS, mode=mode, residual_vectors=residual, state_deltas=deltas,
                            multipliers=MULTIPLIERS, n_positions=n_positions, behavior="toy", item_ids=[10, 11])
        check_table(naive, expected, adapter)


@pytest.mark.parametrize("labels", [AB_LABELS, NUMBERED_LABELS])
def test_multiplier_zero_is_the_unsteered_model(tiny_adapter, vectors, labels):
    adapter = tiny_adapter
    residual, deltas = vectors[adapter.info["name"]]
    items = ITEMS if labels == AB_LABELS else behavior_data.to_numbered_format(ITEMS)
    expected = [unsteered_metrics(adapter, item, labels) for item in items]
    # The label set only changes what is read: one mode suffices for the (1)/(2) labels.
    modes = ["residual", "state", "both"] if adapter.has_recurrent_state and labels == AB_LABELS else ["residual"]
    for mode in modes:
        table = steering.steering_sweep(adapter, items, mode=mode, residual_vectors=residual, state_deltas=deltas,
                                        multipliers=[0.0], labels=labels, n_positions=2)
        for item_index, (p_matching, nonsense) in enumerate(expected):
            rows = table[table["item"] == item_index]
            assert len(rows) == adapter.n_layers
            np.testing.assert_allclose(rows["p_matching"], p_matching, rtol=0, atol=1e-5, err_msg=mode)
            np.testing.assert_allclose(rows["nonsense"], nonsense, rtol=0, atol=1e-5, err_msg=mode)


def test_p_matching_follows_the_matching_answer(tiny_adapter, vectors):
    """The same question with the other answer marked as matching: p_matching is the complement."""
    adapter = tiny_adapter
    residual, _ = vectors[adapter.info["name"]]
    flipped = [{**ITEMS[0], "answer_matching_behavior": "(B)", "answer_not_matching_behavior": "(A)"}]
    settings = dict(residual_vectors=residual, multipliers=MULTIPLIERS, layers=[0])
    original = steering.steering_sweep(adapter, ITEMS[:1], **settings)
    other = steering.steering_sweep(adapter, flipped, **settings)
    np.testing.assert_allclose(original["p_matching"] + other["p_matching"], 1.0, rtol=0, atol=1e-6)
    np.testing.assert_allclose(original["nonsense"], other["nonsense"], rtol=0, atol=0)


def test_sweep_rejects_bad_settings(tiny_adapters, vectors):
    for name, adapter in tiny_adapters.items():
        residual, deltas = vectors[name]
        run = lambda items=ITEMS, **kw: steering.steering_sweep(  # noqa: E731
            adapter, items, **{"residual_vectors": residual, "state_deltas": deltas, **kw})
        with pytest.raises(ValueError, match="unknown steering mode 'sideways'"):
            run(mode="sideways")
        with pytest.raises(ValueError, match=rf"shape \(2, {adapter.hidden_size}\)"):
            run(residual_vectors=residual[:2])
        with pytest.raises(ValueError, match=r"layers \[99\] outside"):
            run(layers=[0, 99])
        with pytest.raises(ValueError, match=r"test items: 1 of 2 items malformed, ids \[1\]"):
            run(items=[ITEMS[0], {**ITEMS[1], "answer_matching_behavior": "(C)"}])
        with pytest.raises(ValueError, match="item 0: prompt has .* tokens, not more than n_positions=500"):
            run(n_positions=500)
        if not adapter.has_recurrent_state:
            with pytest.raises(ValueError, match=f"mode 'state': model '{name}' has no recurrent state"):
                run(mode="state")
        else:
            with pytest.raises(ValueError, match="state_deltas have no entry for layers"):
                run(mode="state", state_deltas={0: deltas[0]})
            name_, delta = next(iter(deltas[1].items()))
            with pytest.raises(ValueError, match=f"state delta '{name_}' of layer 1 has shape"):
                run(mode="state", state_deltas={**deltas, 1: {name_: delta[..., :1]}})


# ----- the shared datasets --------------------------------------------------------------------------
def test_shared_caa_datasets_load_and_steer(tiny_adapters):
    root = SHARED / "datasets" / "caa"
    if not root.is_dir():
        pytest.skip(f"shared CAA datasets not found at {root} (they live beside the checkout)")
    behaviours = sorted(path for path in root.iterdir() if (path / "test_dataset_ab.json").is_file())
    assert behaviours, f"no behaviour folders in {root}"
    for folder in behaviours:
        generate, test = load_behavior(folder)
        for items in (generate, test):
            problems = behavior_data.malformed_items(items)
            # Some behaviours have a few multiple-choice items; most items must be usable A/B pairs.
            assert len(problems) < len(items) / 4, f"{folder.name}: {len(problems)} malformed of {len(items)}"
            usable = [item for index, item in enumerate(items) if index not in problems]
            behavior_data.validate_items(usable, folder.name)
            behavior_data.validate_items(behavior_data.to_numbered_format(usable), folder.name, NUMBERED_LABELS)

    # A small end-to-end run on real items: vectors from generate items, a sweep on test items.
    adapter = next(a for a in tiny_adapters.values() if not a.has_recurrent_state)  # the quickest on long prompts
    generate, test = load_behavior(behaviours[0])
    usable = lambda items: [x for i, x in enumerate(items) if i not in behavior_data.malformed_items(items)]  # noqa: E731
    positives, negatives = steering.contrast_prompts(adapter, usable(generate)[:4])
    residual = steering.caa_vectors(residual_activations(adapter, positives),
                                    residual_activations(adapter, negatives))
    table = steering.steering_sweep(adapter, usable(test)[:1], residual_vectors=residual, multipliers=[-1.0, 1.0],
                                    layers=[0], behavior=behaviours[0].name)
    assert len(table) == 2 and table["p_matching"].between(0, 1).all()


# ----- RWKV-4: state deltas in the state's true units ------------------------------------------------
def rwkv_true_state(state, layer):
    """RWKV-4's wkv sums in their true units, by hand: the port stores num and den scaled by exp(-max)."""
    ffn, att, num, den, top = (tensor[:, :, layer].double() for tensor in state)
    return {"ffn_shift": ffn, "att_shift": att, "wkv_num": num * top.exp(), "wkv_den": den * top.exp()}


def test_rwkv_state_deltas_are_means_of_the_true_wkv_sums(tiny_adapters):
    adapter = next(a for a in tiny_adapters.values() if a.family == "rwkv")
    positives, negatives = steering.contrast_prompts(adapter, GENERATE_ITEMS)
    found = steering.state_vectors(adapter, positives, negatives, batch_size=3)

    def states(prompts):  # the port's own state after each prompt, one prompt at a time
        with torch.no_grad():
            return [adapter.model(torch.tensor([adapter.encode_prompt(p)]), use_cache=True).state for p in prompts]

    def mean_difference(value_of, layer, name):
        return (torch.stack([value_of(s, layer)[name][0] for s in positive]).mean(0)
                - torch.stack([value_of(s, layer)[name][0] for s in negative]).mean(0))

    positive, negative = states(positives), states(negatives)
    stored = lambda state, layer: dict(zip(("ffn_shift", "att_shift", "wkv_num", "wkv_den"),  # noqa: E731
                                           (t[:, :, layer].double() for t in state)))
    for layer in range(adapter.n_layers):
        assert set(found[layer]) == {"ffn_shift", "att_shift", "wkv_num", "wkv_den"}  # the max is no state value
        for name, delta in found[layer].items():
            expected = mean_difference(rwkv_true_state, layer, name)
            torch.testing.assert_close(delta.double(), expected, rtol=1e-5, atol=1e-6, msg=f"layer {layer} {name}")
        # Averaging the max-normalised storage instead gives another delta: the units matter.
        normalised = mean_difference(stored, layer, "wkv_num")
        assert not torch.allclose(found[layer]["wkv_num"].double(), normalised, rtol=1e-3)


@pytest.mark.parametrize("wkv_size", [1.0, 1e45])
def test_rwkv_add_to_state_moves_the_true_sums_by_the_delta(tiny_adapters, wkv_size):
    adapter = next(a for a in tiny_adapters.values() if a.family == "rwkv")
    ids = torch.tensor([adapter.encode_prompt(steering.item_prompt(adapter, ITEMS[0]))])
    with torch.no_grad():
        _, state = adapter.forward(ids, use_cache=True)
    state = adapter.repeat_state(state, 2)
    layer = 1
    before = {other: rwkv_true_state(state, other) for other in range(adapter.n_layers)}
    generator = torch.Generator().manual_seed(3)
    deltas = {name: value[0].abs().mean() * torch.randn(value[0].shape, generator=generator, dtype=value.dtype)
              for name, value in before[layer].items()}
    # 1e45: sums beyond float32 once scaled by exp(-max) with the old max, so the storage must take a
    # new max (num and den share it, so they are made large together, as the recurrence makes them).
    deltas["wkv_num"] *= wkv_size
    deltas["wkv_den"] *= wkv_size
    adapter.add_to_state(state, layer, deltas, scale=torch.tensor([2.0, -1.0]))
    assert all(torch.isfinite(tensor).all() for tensor in state)
    for other in range(adapter.n_layers):
        after = rwkv_true_state(state, other)
        for name, value in before[other].items():
            for row, factor in enumerate((2.0, -1.0)):
                expected = value[row] + factor * deltas[name] if other == layer else value[row]  # others untouched
                torch.testing.assert_close(after[name][row], expected, rtol=1e-5, atol=1e-6)


# ----- special tokens (BOS) --------------------------------------------------------------------------
def with_bos_tokenizer(adapter, chat_template=None):
    """A shallow copy of the adapter whose tokenizer puts a BOS in front of every sequence, as Llama's
    does (the tiny byte tokenizer adds none); '<|system|>' stands in for '<s>'."""
    import copy

    from tokenizers.processors import TemplateProcessing

    tokenizer = copy.deepcopy(adapter.tokenizer)
    tokenizer.bos_token = "<|system|>"
    bos = tokenizer.convert_tokens_to_ids("<|system|>")
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|system|> $A", special_tokens=[("<|system|>", bos)]
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    changed = copy.copy(adapter)
    changed.tokenizer = tokenizer
    return changed, bos


def test_prompt_ids_carry_the_tokenizers_special_tokens(tiny_adapter, vectors):
    adapter, bos = with_bos_tokenizer(tiny_adapter)
    prompt = steering.item_prompt(adapter, ITEMS[0])
    own = adapter.tokenizer(prompt, add_special_tokens=True)["input_ids"]
    assert own[0] == bos and own[1] != bos
    assert adapter.encode_prompt(prompt) == own
    # A template that writes the BOS itself does not get a second one.
    written = adapter.tokenizer.bos_token + prompt
    assert adapter.encode_prompt(written) == own

    # The sweep reads the unsteered model on those ids: multiplier 0 equals a plain forward of them.
    residual, _ = vectors[tiny_adapter.info["name"]]
    table = steering.steering_sweep(adapter, ITEMS[:1], residual_vectors=residual, multipliers=[0.0], layers=[0])
    with torch.no_grad():
        logits, _ = adapter.forward(torch.tensor([own]))
    probs = logits[0, -1].softmax(-1)
    p_a, p_b = (probs[adapter.tokenizer.convert_tokens_to_ids(label)].item() for label in AB_LABELS)
    np.testing.assert_allclose(table["p_matching"], p_a / (p_a + p_b), rtol=0, atol=1e-6)
    # The contrast prompts that the vectors come from carry it too (extracted, and read here).
    from workflow_scripts.prompts import PromptItem, tokenize_prompts

    extracted = PromptItem(index=0, id="q+", prompt=ITEMS[0]["question"], completion="(A")
    assert tokenize_prompts(adapter, [extracted], "chat") == [adapter.tokenizer(prompt + "A")["input_ids"]]
    positives, _ = steering.contrast_prompts(adapter, ITEMS[:1])
    with_bos = residual_activations(adapter, positives)
    without = residual_activations(tiny_adapter, positives)
    assert not torch.allclose(with_bos, without)


PAPER_TEMPLATES = {  # the reference's prompts (Steering/steer.py), for a question q
    "hermes-mamba-2.8b": "\x16user\n{}\x17\n\x16assistant\n(",
    "llama-2-7b-chat": "[INST] {} [/INST] (",
}


def test_paper_chat_templates_give_the_reference_prompts_and_ids(tiny_adapters):
    import yaml

    from tests.conftest import REPO

    models = yaml.safe_load((REPO / "configs" / "paper.yaml").read_text())["models"]
    adapter = next(iter(tiny_adapters.values()))
    for name, reference in PAPER_TEMPLATES.items():
        changed, bos = with_bos_tokenizer(adapter, models[name]["chat_template"])
        text = steering.item_prompt(changed, ITEMS[0])
        assert text == reference.format(ITEMS[0]["question"]), name
        # The reference encodes with tokenizer.encode, special tokens included: so do the prompt ids.
        assert changed.encode_prompt(text) == changed.tokenizer(reference.format(ITEMS[0]["question"]))["input_ids"]
        assert changed.encode_prompt(text)[:2].count(bos) == 1


# ----- which activations the vectors come from ------------------------------------------------------
def extracted_contrast_set(adapter, path, positions):
    from workflow_scripts.activations import extract_activations
    from workflow_scripts.behavior_data import contrast_prompt_set
    from workflow_scripts.prompts import load_prompt_set, tokenize_prompts

    lines = contrast_prompt_set([{**item, "id": index} for index, item in enumerate(GENERATE_ITEMS)])
    prompt_file = path.with_suffix(".jsonl")
    prompt_file.write_text("".join(json.dumps(line) + "\n" for line in lines))
    prompts = load_prompt_set(prompt_file)
    extract_activations(adapter, prompts, tokenize_prompts(adapter, prompts, "chat"), path, batch_size=3,
                        positions=positions, layers="all", storage_dtype="float32", rows_per_row_group=8,
                        metadata={}, progress=False)


@pytest.mark.parametrize("positions", ["last", "all", [0, -1]])
def test_vectors_come_from_the_answer_letter_whatever_else_was_extracted(tiny_adapters, tmp_path, positions):
    adapter = tiny_adapters["llama-tiny"]
    path = tmp_path / "contrast.parquet"
    extracted_contrast_set(adapter, path, positions)
    positive, negative, layers = steering.answer_activations(path)
    assert layers == list(range(adapter.n_layers))
    # The residual stream at each contrast prompt's last token, the answer letter, computed here.
    positives, negatives = steering.contrast_prompts(adapter, GENERATE_ITEMS)
    for found, prompts in ((positive, positives), (negative, negatives)):
        expected = []
        for prompt in prompts:
            assert prompt[-1] in AB_LABELS
            with torch.no_grad():
                ids = torch.tensor([adapter.encode_prompt(prompt)])
                hidden = adapter.model(ids, output_hidden_states=True).hidden_states
            expected.append(torch.stack([hidden[layer + 1][0, -1] for layer in range(adapter.n_layers - 1)]))
        # (the last block's output is only seen after the final norm in hidden_states)
        torch.testing.assert_close(torch.as_tensor(found[:, :-1]), torch.stack(expected), rtol=0, atol=1e-5)


def test_vectors_refuse_an_extraction_without_the_last_token(tiny_adapters, tmp_path):
    adapter = tiny_adapters["llama-tiny"]
    path = tmp_path / "contrast.parquet"
    extracted_contrast_set(adapter, path, [0, -2])
    with pytest.raises(ValueError, match=r"position_from_end -1.*extraction.positions = \[0, -2\] must include it"):
        steering.answer_activations(path)


# ----- figures ----------------------------------------------------------------------------------------
def synthetic_sweep():
    """Two behaviours, three layers, three multipliers, two items, every mode: p_matching rises with
    the multiplier at layer 1, falls at layer 2, and does nothing at layer 0."""
    rng = np.random.default_rng(0)
    rows = []
    for behavior in ("b1", "b2"):
        for mode in ("residual", "state", "both"):
            for layer, slope in ((0, 0.0), (1, 0.1), (2, -0.05)):
                for multiplier in (-1.0, 0.0, 1.0):
                    for item in (0, 1):
                        p = 0.5 + slope * multiplier + 0.01 * rng.normal()
                        rows.append({"model": "m", "behavior": behavior, "mode": mode, "vector": "caa", "format": "ab",
                                     "n_positions": 1, "layer": layer, "multiplier": multiplier, "item": item,
                                     "p_matching": p, "nonsense": 0.1})
    return pd.DataFrame(rows)


def test_paper_summary_view_is_the_extremes_over_layers(tmp_path):
    from workflow_scripts.figures import extremes_over_layers, mean_by, plot_steering

    sweep = synthetic_sweep()
    residual = sweep[sweep["mode"] == "residual"]
    table = extremes_over_layers(mean_by(residual, "behavior", "layer", "multiplier"))
    table = table.set_index(["behavior", "multiplier"])
    for behavior in ("b1", "b2"):
        for multiplier in (-1.0, 0.0, 1.0):
            changes = []
            for layer in range(3):
                rows = residual[(residual.behavior == behavior) & (residual.layer == layer)]
                mean_at = lambda m: rows[rows.multiplier == m].p_matching.mean()  # noqa: E731
                changes.append(mean_at(multiplier) - mean_at(0.0))
            assert table.loc[(behavior, multiplier), "max_change"] == pytest.approx(max(changes), abs=1e-12)
            assert table.loc[(behavior, multiplier), "min_change"] == pytest.approx(min(changes), abs=1e-12)
    assert (table.loc[("b1", 1.0), "max_change"] > 0.05) and (table.loc[("b1", 1.0), "min_change"] < -0.02)
    paths = {name: tmp_path / f"{name}.png" for name in ("multiplier_effect", "by_layer", "modes", "nonsense")}
    plot_steering(sweep, paths)
    assert all(path.read_bytes()[:4] == b"\x89PNG" for path in paths.values())

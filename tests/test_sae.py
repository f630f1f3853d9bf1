"""SAE feature comparison: the streamed correlations against a brute-force computation, token shifts
against a loop, the language-model loss with a block output replaced against a hook that sets it, an
SAE that learns sparse data, the shared token windows, and the config check of the sae: section."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from workflow_scripts.configuration import ConfigError, check_config
from workflow_scripts.feature_similarity import max_correlations, shifted_rows, summarise
from workflow_scripts.sae import encode, language_model_losses, reconstruction_metrics, token_windows, train_sae

REPO = Path(__file__).resolve().parents[1]


def random_topk_latents(rng, n_tokens, n_latents, k, dead=()):
    """(indices, values) of k distinct latents per token, none of them in `dead`."""
    allowed = np.setdiff1d(np.arange(n_latents), list(dead))
    indices = np.stack([rng.choice(allowed, size=k, replace=False) for _ in range(n_tokens)]).astype(np.int32)
    return indices, rng.exponential(size=(n_tokens, k)).astype(np.float32)


def dense(indices, values, n_latents):
    matrix = np.zeros((len(indices), n_latents))
    for row in range(len(indices)):
        matrix[row, indices[row]] = values[row]
    return matrix


def brute_force_maxima(a, b):
    """Each column's largest Pearson correlation with any column of the other matrix, by np.corrcoef
    one pair at a time; NaN for a constant column."""
    maxima_a, maxima_b = np.full(a.shape[1], np.nan), np.full(b.shape[1], np.nan)
    for i in range(a.shape[1]):
        for j in range(b.shape[1]):
            if a[:, i].std() == 0 or b[:, j].std() == 0:
                continue
            r = np.corrcoef(a[:, i], b[:, j])[0, 1]
            maxima_a[i] = np.nanmax([maxima_a[i], r])
            maxima_b[j] = np.nanmax([maxima_b[j], r])
    return maxima_a, maxima_b


def test_streamed_max_correlations_equal_brute_force():
    rng = np.random.default_rng(0)
    n_tokens, n_a, n_b = 300, 20, 15
    latents_a = random_topk_latents(rng, n_tokens, n_a, 3, dead=[4, 7])
    latents_b = random_topk_latents(rng, n_tokens, n_b, 2, dead=[11])
    # Some shared structure: where a's first active latent is below 10, b's first is that latent too.
    shared = (latents_a[0][:, 0] < 10) & (latents_b[0][:, 1] != latents_a[0][:, 0])
    latents_b[0][shared, 0] = latents_a[0][shared, 0]
    latents_b[1][shared, 0] = latents_a[1][shared, 0]
    expected_a, expected_b = brute_force_maxima(dense(*latents_a, n_a), dense(*latents_b, n_b))
    got_a, got_b = max_correlations(latents_a, latents_b, n_a, n_b, chunk_tokens=64)  # 5 chunks, one partial
    np.testing.assert_allclose(got_a, expected_a, atol=1e-9, equal_nan=True)
    np.testing.assert_allclose(got_b, expected_b, atol=1e-9, equal_nan=True)
    assert np.isnan(got_a[[4, 7]]).all() and np.isnan(got_b[11]) and np.isfinite(np.delete(got_a, [4, 7])).all()
    summary = summarise(got_a)
    live = expected_a[~np.isnan(expected_a)]
    assert summary["live_features"] == n_a - 2
    assert summary["mppc"] == pytest.approx(live.mean())
    assert summary["share_above_0.5"] == pytest.approx(np.mean(live > 0.5))


def test_identical_latents_correlate_perfectly():
    rng = np.random.default_rng(1)
    latents = random_topk_latents(rng, 200, 12, 3)
    got_a, got_b = max_correlations(latents, latents, 12, 12, chunk_tokens=50)
    np.testing.assert_allclose(got_a, 1.0, atol=1e-9)
    np.testing.assert_allclose(got_b, 1.0, atol=1e-9)


def token_table(lengths, seed=0):
    rng = np.random.default_rng(seed)
    rows = [(example, position) for example, length in enumerate(lengths) for position in range(length)]
    return pd.DataFrame(
        {
            "example_index": [e for e, _ in rows],
            "position": [p for _, p in rows],
            "token_id": rng.integers(0, 50, len(rows)),
        }
    )


@pytest.mark.parametrize("shift", [-2, -1, 0, 1, 3])
def test_shifted_rows_pair_each_token_with_the_one_shift_later_in_its_window(shift):
    tokens = token_table([5, 3, 6])
    rows_a, rows_b = shifted_rows(tokens, tokens.iloc[::-1], shift)  # b in another row order
    expected = []
    b_rows = {(e, p): row for row, (e, p) in enumerate(zip(tokens.example_index[::-1], tokens.position[::-1]))}
    for row_a, (example, position) in enumerate(zip(tokens.example_index, tokens.position)):
        if (example, position + shift) in b_rows:
            expected.append((row_a, b_rows[(example, position + shift)]))
    assert list(zip(rows_a.tolist(), rows_b.tolist())) == expected


def test_shifted_rows_refuse_other_tokens():
    tokens = token_table([4, 4])
    other = tokens.assign(token_id=tokens.token_id.where(tokens.index != 3, 99))
    with pytest.raises(ValueError, match="same tokens"):
        shifted_rows(tokens, other, 0)


def test_a_vector_per_position_adds_like_one_vector_per_position(tiny_adapter):
    """add_to_block with (B, P, D) vectors equals adding each position's (B, D) vector on its own."""
    torch.manual_seed(0)
    batch = tiny_adapter.batch([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]])
    layer = tiny_adapter.n_layers - 1
    positions = torch.tensor([[1, 3], [0, 4]])
    vectors = torch.randn(2, 2, tiny_adapter.hidden_size)
    with tiny_adapter.add_to_block(layer, vectors, positions):
        together, _ = tiny_adapter.forward(batch.input_ids, batch.attention_mask)
    with (
        tiny_adapter.add_to_block(layer, vectors[:, 0], positions[:, :1]),
        tiny_adapter.add_to_block(layer, vectors[:, 1], positions[:, 1:]),
    ):
        one_by_one, _ = tiny_adapter.forward(batch.input_ids, batch.attention_mask)
    torch.testing.assert_close(together, one_by_one)


def test_loss_with_a_replaced_block_output_equals_a_hook_that_sets_it(tiny_adapter):
    adapter = tiny_adapter
    torch.manual_seed(0)
    windows = [list(range(3, 11)), list(range(20, 28)), list(range(40, 48))]
    layer = adapter.n_layers - 2  # RWKV's tiny model rescales its stream there (output_scale 2)
    shift = torch.randn(adapter.hidden_size)
    # The replacement: the window's stream in reverse token order, plus a constant vector.
    losses = language_model_losses(
        adapter, windows, {"same": (layer, lambda x: x), "other": (layer, lambda x: x.flip(1) + shift)}, 2
    )

    def hook(_module, _inputs, output):  # the block's raw output replaced, in its own units
        hidden = output[0] if isinstance(output, tuple) else output
        replaced = hidden.flip(1) + (shift / adapter.output_scale(layer)).to(hidden.dtype)
        return (replaced, *output[1:]) if isinstance(output, tuple) else replaced

    ids = torch.tensor(windows)

    def mean_loss():
        logits, _ = adapter.forward(ids, torch.ones_like(ids))
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    clean = float(mean_loss())
    handle = adapter.blocks[layer].register_forward_hook(hook)
    try:
        replaced = float(mean_loss())
    finally:
        handle.remove()
    assert losses["clean"] == pytest.approx(clean, rel=1e-5)
    assert losses["same"] == pytest.approx(clean, rel=1e-5)
    assert losses["other"] == pytest.approx(replaced, rel=1e-5)
    assert abs(replaced - clean) > 1e-3  # the replacement changed something


def test_sae_learns_sparse_data_and_its_metrics_are_those_of_its_outputs():
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    n_tokens, width, n_atoms, active = 4096, 16, 32, 3
    atoms = rng.normal(size=(n_atoms, width))
    codes = np.zeros((n_tokens, n_atoms))
    for row in range(n_tokens):
        codes[row, rng.choice(n_atoms, active, replace=False)] = rng.exponential(size=active) + 0.5
    data = torch.tensor(codes @ atoms, dtype=torch.float32)
    sae, history = train_sae(data, expansion=4, k=4, steps=300, batch_size=256, lr=5e-3, seed=0, log_every=50)
    indices, values = encode(sae, data)
    metrics = reconstruction_metrics(sae, data, indices)
    # Independent: the reconstruction from the latents through the decoder weights, in numpy.
    decoder = sae.W_dec.detach().numpy()
    rebuilt = np.einsum("nk,nkd->nd", values, decoder[indices]) + sae.b_dec.detach().numpy()
    x = data.numpy()
    fvu = ((x - rebuilt) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert metrics["fvu"] == pytest.approx(fvu, rel=1e-3)
    assert metrics["dead_latents"] == 4 * width - len(np.unique(indices))
    assert fvu < 0.2 < history[0]["fvu"] or fvu < 0.5 * history[0]["fvu"]
    assert indices.shape == (n_tokens, 4) and (values >= 0).all()


def test_token_windows_are_the_same_tokens_for_every_call(tmp_path):
    train = np.arange(40 * 6).reshape(40, 6).astype(np.int32)
    held_out = 1000 + np.arange(5 * 6).reshape(5, 6).astype(np.int32)
    np.savez(tmp_path / "tokens.npz", train=train, eval=held_out)
    items, tokens = token_windows(tmp_path / "tokens.npz", 7, 3, seed=4)
    again_items, again_tokens = token_windows(tmp_path / "tokens.npz", 7, 3, seed=4)
    assert tokens == again_tokens and [item.id for item in items] == [item.id for item in again_items]
    splits = [item.split for item in items]
    assert splits == ["train"] * 7 + ["eval"] * 3
    train_rows = {tuple(row) for row in train.tolist()}
    assert all(tuple(window) in train_rows for window in tokens[:7]) and len({tuple(w) for w in tokens[:7]}) == 7
    assert tokens[7:] == held_out[:3].tolist()
    with pytest.raises(ValueError, match="held-out"):
        token_windows(tmp_path / "tokens.npz", 7, 6, seed=4)


# ----- config ------------------------------------------------------------------------------------------------
def matched_test():
    return yaml.safe_load((REPO / "configs" / "matched-test.yaml").read_text())


def test_matched_configs_compare_sae_features_and_the_default_does_not():
    assert check_config(yaml.safe_load((REPO / "config.yaml").read_text()))["sae"]["models"] == []
    for name in ("matched.yaml", "matched-test.yaml"):
        checked = check_config(yaml.safe_load((REPO / "configs" / name).read_text()))
        assert len(checked["sae"]["models"]) == 5 and checked["sae"]["ceiling"] and checked["sae"]["floor"]


def other_tokenizer(config):
    config["pretraining"]["tokenizers"]["other-bpe"] = dict(config["pretraining"]["tokenizers"]["docs-bpe"])
    config["models"]["rwkv-trained"]["source"]["trained"]["tokenizer"] = "other-bpe"


def built_model(config):
    config["models"]["tiny-one"] = {"family": "mamba", "source": {"tiny": {"model_type": "mamba"}}, "n_layers": 2}
    config["sae"]["models"].append("tiny-one")


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda c: c["sae"]["models"].append("gpt-9"), ["sae.models", "'gpt-9'", "not a model"]),
        (lambda c: c["sae"].update(layers=[0, 2]), ["sae.layers", "[0, 2]", "2", "allowed 0..1"]),
        (lambda c: c["sae"].update(k=65), ["sae.k = 65", "64 latents", "allowed: 1..64"]),
        (other_tokenizer, ["sae.models", "'docs-bpe'", "'other-bpe'", "share a tokenizer"]),
        (built_model, ["sae.models", "'tiny-one'", "'tiny'", "source trained"]),
        (lambda c: c["sae"].update(shifts=[-1, 1]), ["sae.shifts = [-1, 1]", "no 0"]),
        (lambda c: c["sae"].update(ceiling=["llama-trained", "gpt-9"]), ["sae.ceiling", "'gpt-9'", "sae.models"]),
        (lambda c: c["sae"].update(models=["llama-trained"], ceiling=None, floor=None), ["sae.models", "one model"]),
        (lambda c: c["sae"].update(expansion=0), ["sae.expansion = 0", ">= 1"]),
    ],
)
def test_bad_sae_settings_are_refused_naming_key_and_value(change, expected):
    config = matched_test()
    change(config)
    with pytest.raises(ConfigError) as error:
        check_config(config)
    for part in expected:
        assert part in str(error.value), (part, str(error.value))


def test_layer_matched_mppc_and_best_shift_are_those_of_a_loop():
    from workflow_scripts.sae_figures import shift_table, shown_pairs

    rng = np.random.default_rng(2)
    rows = [
        {"model_a": "x", "model_b": "y", "layer_a": la, "layer_b": lb, "shift": s, "mppc_a_to_b": rng.random()}
        for la in range(3) for lb in range(2) for s in (-1, 0, 1)
    ]  # fmt: skip
    summary = pd.DataFrame(rows)
    table = shift_table(summary).set_index("shift")
    curve = {}
    for s in (-1, 0, 1):
        per_layer = [max(r["mppc_a_to_b"] for r in rows if r["shift"] == s and r["layer_a"] == la) for la in range(3)]
        curve[s] = sum(per_layer) / 3
        assert table.loc[s, "layer_matched_mppc"] == pytest.approx(curve[s])
    assert table.index[table.best_shift].tolist() == [max(curve, key=curve.get)]
    # Baselines' second models (a2, r) appear only in their own pair, in either order.
    pairs = [("a", "b"), ("a2", "a"), ("a", "r"), ("b", "a2"), ("b", "r"), ("a2", "r"), ("b", "c")]
    assert shown_pairs(pairs, ["a", "a2"], ["a", "r"]) == [("a", "b"), ("a2", "a"), ("a", "r"), ("b", "c")]

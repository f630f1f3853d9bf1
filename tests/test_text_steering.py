"""Steering without instructions: passages, the cached continuation sweep against plain passes
written here, and the summaries against hand computations."""

import numpy as np
import pandas as pd
import pytest
import torch

from workflow_scripts import text_steering

PREFIX, CONTINUATION = 5, 4
MULTIPLIERS = [-2.0, 0.0, 1.5]


@pytest.fixture(scope="module")
def cases(tiny_adapters):
    """name -> (tokens (3, P + C), residual vectors, state deltas or None): random directions about as
    large as the residual stream and the state, so that steering visibly moves the log-probabilities."""
    generator = torch.Generator().manual_seed(0)
    made = {}
    for name, adapter in tiny_adapters.items():
        vocab = adapter.unembed.weight.shape[0]
        tokens = torch.randint(3, vocab, (3, PREFIX + CONTINUATION), generator=generator)
        batch = adapter.batch(tokens.tolist())
        streams, _ = adapter.residual_stream(batch, torch.full((3, 1), PREFIX - 1))
        scale = streams.norm(dim=-1).mean((1, 2))  # (L,)
        directions = torch.randn(adapter.n_layers, adapter.hidden_size, generator=generator)
        residual = directions / directions.norm(dim=-1, keepdim=True) * scale[:, None]
        deltas = None
        if adapter.has_recurrent_state:
            with torch.no_grad():
                _, state = adapter.forward(tokens[:1, :PREFIX], use_cache=True)
            deltas = {
                layer: {key: value[0].std() * torch.randn(value[0].shape, generator=generator, dtype=value.dtype)
                        for key, value in adapter.state_values(state, layer).items()}
                for layer in range(adapter.n_layers)
            }  # fmt: skip
        made[name] = (tokens, residual, deltas)
    return made


def continuation_score(logits, row):
    """Mean log-probability of the row's continuation tokens, from logits over the whole row."""
    logprobs = torch.log_softmax(logits.double(), -1)
    return float(np.mean([logprobs[t - 1, row[t]].item() for t in range(PREFIX, len(row))]))


def reference(adapter, row, layer, multiplier, mode, positions, residual, deltas):
    """One passage, one setting, without the sweep's cache, batching or row-wise vectors: a single
    plain pass for residual steering, else the prefix then one token at a time with the state delta
    added by hand."""
    row = row[None]
    vector = multiplier * residual[layer]
    if mode == "residual":
        steered = torch.arange(PREFIX - 1, PREFIX if positions == "last" else row.shape[1])[None]
        with torch.no_grad(), adapter.add_to_block(layer, vector, positions=steered):
            logits, _ = adapter.forward(row)
        return continuation_score(logits[0], row[0])
    with torch.no_grad():
        _, state = adapter.forward(row[:, : PREFIX - 1], use_cache=True)
        outputs = []
        for step in range(PREFIX - 1, row.shape[1] - 1):
            steer_now = positions == "all" or step == PREFIX - 1
            if steer_now:
                adapter.add_to_state(state, layer, deltas[layer], scale=multiplier)
            if mode == "both" and steer_now:
                with adapter.add_to_block(layer, vector):
                    logits, state = adapter.forward(row[:, step : step + 1], state=state)
            else:
                logits, state = adapter.forward(row[:, step : step + 1], state=state)
            outputs.append(logits[0, -1])
    logprobs = torch.log_softmax(torch.stack(outputs).double(), -1)
    return float(np.mean([logprobs[t - PREFIX, row[0, t]].item() for t in range(PREFIX, row.shape[1])]))


@pytest.mark.parametrize("positions", ["last", "all"])
@pytest.mark.parametrize("mode", ["residual", "state", "both"])
def test_cached_sweep_equals_one_setting_at_a_time(tiny_adapters, cases, mode, positions):
    for name, adapter in tiny_adapters.items():
        if mode != "residual" and not adapter.has_recurrent_state:
            continue
        tokens, residual, deltas = cases[name]
        layers = list(range(adapter.n_layers))
        swept = text_steering.continuation_sweep(
            adapter, tokens, PREFIX, mode=mode, positions=positions, residual_vectors=residual,
            state_deltas=deltas, layers=layers, multipliers=MULTIPLIERS, passages_per_pass=2, layers_per_pass=1,
        )  # fmt: skip
        expected = np.array([[[reference(adapter, row, layer, m, mode, positions, residual, deltas)
                               for m in MULTIPLIERS] for layer in layers] for row in tokens])  # fmt: skip
        np.testing.assert_allclose(swept, expected, atol=1e-5, err_msg=f"{name} {mode} {positions}")
        # The vectors moved the scores (else the equality proves little), and multiplier 0 is the
        # unsteered model.
        assert np.abs(swept[..., 0] - swept[..., 1]).max() > 1e-3, name
        unsteered = text_steering.unsteered_logprob(adapter, tokens, PREFIX).numpy()
        np.testing.assert_allclose(swept[..., 1], unsteered[:, None].repeat(len(layers), 1), atol=1e-5)


def test_summaries_match_a_hand_computation():
    rng = np.random.default_rng(0)
    rows = []
    for vector in ("contrast", "random"):
        for layer in (0, 1):
            for multiplier in (-1.0, 0.0, 2.0):
                for passage, kind in enumerate(["code", "code", "prose"]):
                    rows.append({"model": "m", "vector": vector, "mode": "residual", "positions": "last",
                                 "layer": layer, "multiplier": multiplier, "passage": passage, "kind": kind,
                                 "logprob": rng.normal(), "unsteered": 0.5 * passage})  # fmt: skip
    sweep = pd.DataFrame(rows)
    shifts = text_steering.kind_shift(sweep, ["code", "prose"])

    def shift(vector, layer, multiplier):
        chosen = sweep[(sweep.vector == vector) & (sweep.layer == layer) & (sweep.multiplier == multiplier)]
        change = chosen.logprob - chosen.unsteered
        return change[chosen.kind == "code"].mean() - change[chosen.kind == "prose"].mean()

    for _, row in shifts.iterrows():
        assert row["shift"] == pytest.approx(shift(row.vector, row.layer, row.multiplier))
    summary = text_steering.effect_summary(shifts).iloc[0]
    effects = {layer: shift("contrast", layer, 2.0) - shift("contrast", layer, -1.0) for layer in (0, 1)}
    best = max(effects, key=effects.get)
    assert summary.best_layer == best and summary.effect == pytest.approx(effects[best])
    random_effects = {layer: shift("random", layer, 2.0) - shift("random", layer, -1.0) for layer in (0, 1)}
    assert summary.random_effect_same_layer == pytest.approx(random_effects[best])
    assert summary.random_effect_best_layer == pytest.approx(max(random_effects.values()))


SETTINGS = {"passage_chars": 20, "passages_per_document": 2, "vector_passages": 3, "eval_passages": 2}


def test_passages_hold_whole_lines_and_roles_never_share_a_document():
    documents = ["".join(f"doc {d} line {i}: words\n" for i in range(5)) for d in range(6)]
    passages = text_steering.sample_passages(documents, "prose", SETTINGS, seed=0)
    roles = [p["role"] for p in passages]
    assert roles.count("evaluation") == 2 and roles.count("vector") == 3
    for passage in passages:
        assert len(passage["text"]) >= 20 and passage["text"].endswith("\n")
        assert passage["text"] in documents[passage["document"]]
    by_role = {role: {p["document"] for p in passages if p["role"] == role} for role in ("evaluation", "vector")}
    assert not by_role["evaluation"] & by_role["vector"]
    assert passages == text_steering.sample_passages(documents, "prose", SETTINGS, seed=0)  # seeded
    with pytest.raises(ValueError, match="kind 'prose'.*passage_chars=20"):
        text_steering.sample_passages(documents[:1], "prose", SETTINGS, seed=0)


def test_vectors_are_the_mean_differences(tiny_adapters):
    adapter = tiny_adapters["mamba-tiny"] if "mamba-tiny" in tiny_adapters else next(iter(tiny_adapters.values()))
    generator = torch.Generator().manual_seed(1)
    first, second = (torch.randint(3, 60, (3, PREFIX), generator=generator) for _ in range(2))
    residual, deltas = text_steering.contrast_vectors(adapter, first, second, adapter.has_recurrent_state, batch_size=2)

    def mean_last(prefixes):
        outputs = []
        for row in prefixes:
            streams, _ = adapter.residual_stream(adapter.batch([row.tolist()]), torch.tensor([[PREFIX - 1]]))
            outputs.append(streams[:, 0, 0])
        return torch.stack(outputs).mean(0)

    torch.testing.assert_close(residual, mean_last(first) - mean_last(second), atol=1e-5, rtol=1e-5)
    if deltas is not None:
        def mean_state(prefixes, layer):
            values = []
            for row in prefixes:
                _, state = adapter.forward(row[None], use_cache=True)
                values.append(adapter.state_values(state, layer))
            return {key: torch.stack([v[key][0].double() for v in values]).mean(0) for key in values[0]}

        for layer in range(adapter.n_layers):
            one, two = mean_state(first, layer), mean_state(second, layer)
            for key, delta in deltas[layer].items():
                torch.testing.assert_close(delta.double(), one[key] - two[key], atol=1e-5, rtol=1e-5)
    random_residual, random_deltas = text_steering.random_like(residual, deltas, seed=0)
    torch.testing.assert_close(random_residual.norm(dim=-1), residual.norm(dim=-1))
    assert (random_residual * residual).sum(-1).abs().max() < residual.norm(dim=-1).max() ** 2 * 0.99

"""Activation extraction: exact values, one layer per row group, atomic files, clear errors."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from workflow_scripts.activations import extract_activations, read_layer, read_metadata, row_groups_of_layer
from workflow_scripts.prompts import load_prompt_set, tokenize_prompts

SETTINGS = {"batch_size": 3, "storage_dtype": "float32", "rows_per_row_group": 4, "layers": "all"}


def write_prompts(path, items):
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


@pytest.fixture
def prompt_file(tmp_path):
    items = [
        {
            "id": f"q{i}",
            "prompt": "Is it so? " + "really " * (i % 4),
            "completion": "(",
            "label": i % 2,
            "split": "train" if i < 5 else "test",
        }
        for i in range(7)
    ]
    return write_prompts(tmp_path / "prompts.jsonl", items)


def extract(adapter, prompt_file, out, **overrides):
    items = load_prompt_set(prompt_file)
    tokens = tokenize_prompts(adapter, items, "chat")
    settings = {**SETTINGS, "positions": "last", **overrides}
    extract_activations(adapter, items, tokens, out, metadata={"prompt_set": "t"}, progress=False, **settings)
    return items, tokens


def expected_positions(setting, n_tokens):
    if setting == "last":
        return [n_tokens - 1]
    if setting == "all":
        return list(range(n_tokens))
    return sorted(p % n_tokens for p in setting)  # negative indices count from the end


@torch.no_grad()
@pytest.mark.parametrize("positions", ["last", [-2, 0], "all"])
def test_values_equal_unbatched_residual_stream(tiny_adapter, prompt_file, tmp_path, positions):
    """Batched, padded, length-sorted extraction gives each prompt's own activations."""
    adapter = tiny_adapter
    out = tmp_path / "acts.parquet"
    items, tokens = extract(adapter, prompt_file, out, positions=positions)
    for layer in range(adapter.n_layers):
        rows, vectors = read_layer(out, layer)
        expected_rows, expected_vectors = [], []
        for item, ids in zip(items, tokens):
            wanted = expected_positions(positions, len(ids))
            stream, _ = adapter.residual_stream(adapter.batch([ids]), torch.tensor([wanted]), [layer])
            expected_vectors.append(stream[0, 0].numpy())
            expected_rows += [(item.id, position, position - len(ids), ids[position]) for position in wanted]
        got_rows = list(zip(rows.example_id, rows.position, rows.position_from_end, rows.token_id))
        assert got_rows == expected_rows
        np.testing.assert_allclose(vectors, np.concatenate(expected_vectors), rtol=0, atol=1e-5)
    metadata = read_metadata(out)
    assert metadata["name"] == adapter.info["name"] and metadata["n_layers"] == adapter.n_layers
    assert metadata["site"] and metadata["code_version"] and metadata["dtype"] == "float32"


def test_each_row_group_holds_one_layer_and_reads_touch_only_it(tiny_adapter, prompt_file, tmp_path):
    out = tmp_path / "acts.parquet"
    extract(tiny_adapter, prompt_file, out)
    parquet = pq.ParquetFile(out)
    layers_per_group = [
        set(parquet.read_row_group(i, columns=["layer"]).column(0).to_pylist()) for i in range(parquet.num_row_groups)
    ]
    assert all(len(layers) == 1 for layers in layers_per_group)
    # 7 prompts, buffer of 4 rows, batches of 3: flushes after 6 rows and at the end -> 2 groups per layer.
    assert parquet.num_row_groups == 2 * tiny_adapter.n_layers
    groups = row_groups_of_layer(parquet, 1)
    assert [layers_per_group[g] for g in groups] == [{1}, {1}]
    rows, vectors = read_layer(out, 1)
    assert rows.layer.unique().tolist() == [1] and vectors.shape == (7, tiny_adapter.hidden_size)
    assert rows.label.tolist() == [str(i % 2) for i in range(7)] and rows.split.tolist()[-1] == "test"
    with pytest.raises(ValueError, match="no layer 99"):
        read_layer(out, 99)


def test_float16_storage_and_chosen_layers(tiny_adapter, prompt_file, tmp_path):
    out = tmp_path / "acts.parquet"
    extract(tiny_adapter, prompt_file, out, storage_dtype="float16", layers=[0, tiny_adapter.n_layers - 1])
    assert read_metadata(out)["layers"] == [0, tiny_adapter.n_layers - 1]
    _, vectors = read_layer(out, tiny_adapter.n_layers - 1)
    assert vectors.dtype == np.float16
    with pytest.raises(ValueError, match="layers present"):
        read_layer(out, 1)


def test_a_failure_mid_write_leaves_no_file(tiny_adapter, prompt_file, tmp_path, monkeypatch):
    out = tmp_path / "acts.parquet"
    calls = {"n": 0}
    original = type(tiny_adapter).residual_stream

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # after row groups were already written
            raise RuntimeError("killed")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(tiny_adapter), "residual_stream", failing)
    with pytest.raises(RuntimeError, match="killed"):
        extract(tiny_adapter, prompt_file, out)
    assert list(tmp_path.iterdir()) == [prompt_file]


def test_bad_position_names_the_prompt(tiny_adapter, prompt_file, tmp_path):
    with pytest.raises(ValueError, match=r"position -500 does not exist in prompt 'q\d'"):
        extract(tiny_adapter, prompt_file, tmp_path / "acts.parquet", positions=[-500])
    assert not (tmp_path / "acts.parquet").exists()


@pytest.mark.parametrize(
    "line, message",
    [
        ({"prompt": "hi"}, r"line 2 \(id None\): missing field 'id'"),
        ({"id": "b", "text": "hi"}, r"line 2 \(id 'b'\): missing field 'prompt'"),
        ({"id": "b", "prompt": "   "}, r"line 2 \(id 'b'\): empty prompt"),
        ({"id": "a", "prompt": "again"}, r"id 'a' repeats line 1"),
    ],
)
def test_bad_prompt_data_names_the_example(tmp_path, line, message):
    path = write_prompts(tmp_path / "p.jsonl", [{"id": "a", "prompt": "fine"}, line])
    with pytest.raises(ValueError, match=message):
        load_prompt_set(path)


def test_prompt_longer_than_context_is_refused(tiny_adapters, tmp_path):
    adapter = next(a for a in tiny_adapters.values() if a.context_length)
    path = write_prompts(tmp_path / "p.jsonl", [{"id": "ok", "prompt": "short"}, {"id": "huge", "prompt": "x" * 5000}])
    with pytest.raises(
        ValueError,
        match=rf"prompt 'huge' has \d+ tokens, more than the context of model .* \({adapter.context_length}\)",
    ):
        tokenize_prompts(adapter, load_prompt_set(path), "chat")


def test_files_of_two_models_concatenate_and_filter_by_model(tiny_adapters, prompt_file, tmp_path):
    """Each row names its model (dictionary-encoded: one stored string per row group), so two
    models' files read as one dataset, by pyarrow or pandas, and split back by that column."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.dataset as ds

    names = sorted(tiny_adapters)[:2]
    paths = {}
    for name in names:
        paths[name] = tmp_path / f"{name}.parquet"
        extract(tiny_adapters[name], prompt_file, paths[name])
        assert pq.read_schema(paths[name]).field("model").type == pa.dictionary(pa.int32(), pa.string())
        for group in range(pq.ParquetFile(paths[name]).num_row_groups):  # dictionary-encoded on disk too
            column = pq.ParquetFile(paths[name]).metadata.row_group(group).column(0)
            assert column.path_in_schema == "model" and "RLE_DICTIONARY" in column.encodings

    dataset = ds.dataset([str(paths[name]) for name in names], format="parquet")
    for name in names:
        alone = pq.read_table(paths[name]).drop_columns(["model"])
        picked = dataset.to_table(filter=ds.field("model") == name).drop_columns(["model"])
        assert picked.num_rows == alone.num_rows > 0 and picked.equals(alone)
    frame = pd.concat([pd.read_parquet(paths[name], columns=["model", "layer"]) for name in names])
    counts = frame.groupby("model", observed=True).size()
    assert counts.to_dict() == {name: pq.ParquetFile(paths[name]).metadata.num_rows for name in names}
    # The per-layer reader is unchanged apart from the new column.
    rows, _ = read_layer(paths[names[0]], 0)
    assert set(rows.model.astype(str)) == {names[0]}

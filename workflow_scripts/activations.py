"""Activation extraction to Parquet, written as the model runs, read back one layer at a time.

Layout: one row per (example, layer, token position), each naming its model (a dictionary-encoded
column: one stored string per row group), so files of several models can be read as one dataset and
filtered by model. Rows are buffered per layer and written as
row groups that each hold a single layer, so memory stays bounded by the buffer whatever the number
of prompts, and a reader can fetch one layer's row groups without touching the others.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from workflow_scripts import CODE_VERSION
from workflow_scripts.atomic import atomic_path

METADATA_KEY = b"activations"
MODEL_TYPE = pa.dictionary(pa.int32(), pa.string())
STORAGE_TYPES = {"float32": (pa.float32(), np.float32), "float16": (pa.float16(), np.float16)}
log = logging.getLogger(__name__)


def activation_schema(hidden_size: int, storage_dtype: str) -> pa.Schema:
    return pa.schema(
        [
            ("model", MODEL_TYPE),  # the config's model name, the same in every row of a file
            ("example_index", pa.int32()),  # line order in the prompt file
            ("example_id", pa.string()),
            ("label", pa.string()),
            ("split", pa.string()),
            ("layer", pa.int16()),  # block index, 0 = first block
            ("position", pa.int32()),  # token index from the start of the prompt
            ("position_from_end", pa.int32()),  # -1 = last token
            ("token_id", pa.int32()),
            ("activation", pa.list_(STORAGE_TYPES[storage_dtype][0], hidden_size)),
        ]
    )


class ActivationWriter:
    """Buffers rows per layer and writes a row group per layer once `rows_per_row_group` rows are
    waiting. The file appears under its name only when `close()` succeeds."""

    def __init__(
        self, path, hidden_size: int, layers: list[int], metadata: dict, storage_dtype="float32",
        rows_per_row_group=512, *, model: str,
    ):  # fmt: skip
        self.path = Path(path)
        self.model = model
        self.layers = layers
        self.hidden_size = hidden_size
        self.numpy_dtype = STORAGE_TYPES[storage_dtype][1]
        self.rows_per_row_group = rows_per_row_group
        schema = activation_schema(hidden_size, storage_dtype)
        self.schema = schema.with_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})
        self._atomic = atomic_path(self.path)
        self._tmp = self._atomic.__enter__()
        self._writer = pq.ParquetWriter(self._tmp, self.schema, compression="zstd")
        self._pending: list[dict] = []  # one entry per added chunk: columns shared by its layers
        self._pending_rows = 0
        self.rows_written = 0

    def add(self, rows: dict, activations: np.ndarray) -> None:
        """rows: per-row columns (example_index, example_id, label, split, position,
        position_from_end, token_id), R values each; activations: (n_layers, R, D)."""
        self._pending.append({"rows": rows, "activations": activations.astype(self.numpy_dtype, copy=False)})
        self._pending_rows += len(rows["example_index"])
        if self._pending_rows >= self.rows_per_row_group:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        columns = {
            name: [value for chunk in self._pending for value in chunk["rows"][name]]
            for name in self._pending[0]["rows"]
        }
        n_rows = len(columns["example_index"])
        for slot, layer in enumerate(self.layers):
            vectors = np.concatenate([chunk["activations"][slot] for chunk in self._pending]).reshape(-1)
            table = pa.table(
                {
                    **{name: pa.array(values, type=self.schema.field(name).type) for name, values in columns.items()},
                    "model": pa.DictionaryArray.from_arrays(pa.array(np.zeros(n_rows, dtype=np.int32)), [self.model]),
                    "layer": pa.array(np.full(n_rows, layer, dtype=np.int16)),
                    "activation": pa.FixedSizeListArray.from_arrays(pa.array(vectors), self.hidden_size),
                }
            ).select(self.schema.names)
            self._writer.write_table(table.cast(self.schema), row_group_size=n_rows)
            self.rows_written += n_rows
        self._pending, self._pending_rows = [], 0

    def close(self) -> None:
        self.flush()
        self._writer.close()
        self._atomic.__exit__(None, None, None)

    def abort(self, error: BaseException) -> None:
        self._writer.close()
        self._atomic.__exit__(type(error), error, error.__traceback__)


def read_metadata(path) -> dict:
    return json.loads(pq.read_schema(path).metadata[METADATA_KEY])


def row_groups_of_layer(parquet_file: pq.ParquetFile, layer: int) -> list[int]:
    """Row groups holding `layer`, found from the layer column's statistics (each group has one layer)."""
    column = parquet_file.schema_arrow.get_field_index("layer")
    groups = []
    for index in range(parquet_file.metadata.num_row_groups):
        stats = parquet_file.metadata.row_group(index).column(column).statistics
        if stats.min <= layer <= stats.max:
            groups.append(index)
    return groups


def read_layer(path, layer: int) -> tuple["pd.DataFrame", np.ndarray]:  # noqa: F821
    """One layer's rows as a DataFrame (without the vectors) and its (N, D) activations, in prompt
    order then position order. Reads only that layer's row groups."""
    parquet_file = pq.ParquetFile(path)
    groups = row_groups_of_layer(parquet_file, layer)
    if not groups:
        layers = read_metadata(path)["layers"]
        raise ValueError(f"{path} has no layer {layer}; layers present: {layers}")
    table = parquet_file.read_row_groups(groups)
    table = table.sort_by([("example_index", "ascending"), ("position", "ascending")])
    hidden_size = table.schema.field("activation").type.list_size
    vectors = table.column("activation").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return table.drop_columns(["activation"]).to_pandas(), vectors.reshape(-1, hidden_size)


def select_positions(setting, lengths: torch.Tensor, example_ids: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) token indices to read and a (B, P) mask of the real ones, for 'last', 'all' or a list
    of indices (negative counts from the end)."""
    if setting == "last":
        return (lengths - 1)[:, None], torch.ones(len(lengths), 1, dtype=torch.bool)
    if setting == "all":
        width = int(lengths.max())
        positions = torch.arange(width)[None, :].expand(len(lengths), -1)
        return positions.clone(), positions < lengths[:, None]
    requested = torch.tensor(setting, dtype=torch.long)[None, :]
    positions = torch.where(requested < 0, lengths[:, None] + requested, requested.expand(len(lengths), -1))
    bad = (positions < 0) | (positions >= lengths[:, None])
    if bad.any():
        row, column = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"position {setting[column]} does not exist in prompt {example_ids[row]!r} ({int(lengths[row])} tokens)"
        )
    return positions, torch.ones_like(positions, dtype=torch.bool)


def extract_activations(
    adapter, items, token_lists, out_path, *,
    batch_size, positions, layers, storage_dtype, rows_per_row_group, metadata, progress=True,
) -> int:
    """Run every prompt through the model and write the residual stream after the chosen blocks at
    the chosen positions. Prompts are batched in length order to waste little on padding."""
    layers = list(range(adapter.n_layers)) if layers == "all" else list(layers)
    metadata = {
        **adapter.info,
        **metadata,
        "site": adapter.site_description(),
        "layers": layers,
        "n_layers": adapter.n_layers,
        "hidden_size": adapter.hidden_size,
        "positions": positions,
        "storage_dtype": storage_dtype,
        "code_version": CODE_VERSION,
    }
    model = metadata.get("name")
    if not model:
        raise ValueError("the activations need a model name: load the adapter with one, or pass metadata={'name': ...}")
    writer = ActivationWriter(
        out_path, adapter.hidden_size, layers, metadata, storage_dtype, rows_per_row_group, model=str(model)
    )
    order = sorted(range(len(items)), key=lambda index: len(token_lists[index]))
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    try:
        with torch.no_grad():
            for batch_indices in tqdm(batches, desc="extract", unit="batch", disable=not progress, mininterval=5):
                batch = adapter.batch([token_lists[index] for index in batch_indices])
                chosen, real = select_positions(positions, batch.lengths, [items[i].id for i in batch_indices])
                stream, _ = adapter.residual_stream(batch, chosen, layers)  # (L, B, P, D)
                rows_of_batch, positions_of_batch = real.nonzero(as_tuple=True)
                token_ids = batch.input_ids.cpu()[rows_of_batch, chosen[rows_of_batch, positions_of_batch]]
                rows = {
                    "example_index": [items[batch_indices[r]].index for r in rows_of_batch.tolist()],
                    "example_id": [items[batch_indices[r]].id for r in rows_of_batch.tolist()],
                    "label": [items[batch_indices[r]].label for r in rows_of_batch.tolist()],
                    "split": [items[batch_indices[r]].split for r in rows_of_batch.tolist()],
                    "position": chosen[rows_of_batch, positions_of_batch].tolist(),
                    "position_from_end": (
                        chosen[rows_of_batch, positions_of_batch] - batch.lengths[rows_of_batch]
                    ).tolist(),
                    "token_id": token_ids.tolist(),
                }
                vectors = stream[:, rows_of_batch.to(stream.device), positions_of_batch.to(stream.device)]
                writer.add(rows, vectors.float().cpu().numpy())
    except BaseException as error:
        writer.abort(error)
        raise
    writer.close()
    log.info("wrote %d rows (%d prompts x %d layers) to %s", writer.rows_written, len(items), len(layers), out_path)
    return writer.rows_written


def read_all_layers(path, expected_ids) -> tuple[np.ndarray, list[int]]:
    """(rows, L, D) for every layer of an activation file with one position per prompt, in prompt
    order, and its block indices. The rows must be one per expected id, in that order."""
    layers = read_metadata(path)["layers"]
    rows, first = read_layer(path, layers[0])
    if rows["example_id"].tolist() != list(expected_ids):
        raise ValueError(
            f"{path}: its rows do not match the expected prompts ({len(rows)} rows for {len(expected_ids)} "
            "expected, one per prompt at its last token); extract with extraction.positions: last"
        )
    return np.stack([first] + [read_layer(path, layer)[1] for layer in layers[1:]], axis=1), layers

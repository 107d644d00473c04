"""Loads a folder of feature shards into one item-aligned table `[num_items + 1, layers, hidden]`.

The folder format is defined in `records.py` (TFRecord shards + `schema.json`). Row 0 of the table is the
padding item (zeros); row i holds the features of `item_ids[i]`, the dataset's raw id for item index i
(see `data.Dataset.item_ids`). Everything that can be wrong with a feature set is checked while reading and
reported as one `FeatureError` naming the file and record: CRCs, the schema, every record's dtype and shape,
NaN/Inf values, duplicate ids, the item count, items of the dataset without features.

Memory: the table is allocated once (`np.zeros`, pages materialise as rows are written) and every record is
copied straight into its row from a view of the record bytes, so loading MicroLens-100k with a 7B LVLM
(19,738 x 33 x 4096 bf16 = 5.3 GB) peaks at the table plus one record (`python -m dff_jax.bench --what features`
measures it).

Which stored rows a model reads is decided here and only here (`resolve_layers`, `model_rows`): the trainer loads
just those rows and the model receives the already-selected table.

This module deliberately does not import jax: the table is plain numpy, loading stays fast and light.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dff_jax import records
from dff_jax.errors import UserError

log = logging.getLogger(__name__)

HOW_TO_PRODUCE = (
    "produce a feature folder with the extractor (`python -m extract ...`) or, for the embedded synthetic "
    "dataset, `python -m dff_jax.synthetic --out DIR`"
)

# Bits of the exponent field per dtype: a value is NaN or +-Inf exactly when all of them are set (IEEE 754);
# testing the raw bits is one integer pass and works the same for bfloat16, which numpy has no native loop for.
_EXPONENT_MASK = {
    "bfloat16": (np.uint16, 0x7F80),
    "float16": (np.uint16, 0x7C00),
    "float32": (np.uint32, 0x7F800000),
}


class FeatureError(UserError, ValueError):
    """A feature folder that does not match the dataset or the format; the message names file and record."""


@dataclasses.dataclass
class FeatureTable:
    """Features aligned to a dataset's item index.

    Attributes:
      table: `[num_items + 1, len(layers), hidden]` in the file dtype; row 0 (padding) is zeros.
      schema: the folder's `schema.json`.
      layers: which stored rows were kept (non-negative indices into the stored rows).
      missing: items of the dataset without features that were zero-filled (`allow_missing=True`), else 0.
      unused: records for items that are not in the dataset (e.g. dropped by the protocol); ignored.
      records: records read in all shards.
      files: shards read.
    """

    table: np.ndarray
    schema: records.Schema
    layers: list[int]
    missing: int = 0
    unused: int = 0
    records: int = 0
    files: int = 0

    def report(self) -> str:
        """One line saying what was loaded, for logs."""
        return (
            f"features: {self.table.shape[0] - 1} items x {len(self.layers)} layers x {self.table.shape[2]} "
            f"{self.table.dtype} ({self.table.nbytes / 1e6:.1f} MB) from {self.records} records in {self.files} "
            f"shards; {self.unused} records for items not in the dataset ignored; {self.missing} items zero-filled"
        )


def resolve_layers(layers: Sequence[int] | None, stored: int, where: str) -> list[int]:
    """Stored-row indices as non-negative ints (negative counts from the end: -1 = last); None means all rows.

    The one resolver of layer indices in the project: the trainer, the study's layer sweep and `load_features` all
    call it, so an index means the same row everywhere. Raises FeatureError naming `where` for an index outside
    0..stored-1 or an empty list.
    """
    if layers is None:
        return list(range(stored))
    chosen = []
    for layer in layers:
        if not isinstance(layer, (int, np.integer)) or not -stored <= int(layer) < stored:
            raise FeatureError(f"{where}: layer {layer!r} requested, but the feature set stores rows 0..{stored - 1}")
        chosen.append(int(layer) % stored)
    if not chosen:
        raise FeatureError(f"{where}: an empty list of layers was requested")
    return chosen


def model_rows(content: str, layer: int, layers: Sequence[int], stored: int, where: str) -> list[int]:
    """The stored rows a model reads: `[layer]` for content "layer" (one layer, paper 4.1 and Figure 3), else
    `layers` aggregated by the uniform mean or DFF's alpha (paper 4.3, Eq. 5), with () meaning every stored row."""
    return resolve_layers([layer] if content == "layer" else (list(layers) or None), stored, where)


def _check_expected_schema(schema: records.Schema, expect: dict | None, where: str) -> None:
    """Compares the folder's schema with what the config expects (model, layers, hidden size, ...)."""
    if not expect:
        return
    wrong = []
    for key, value in expect.items():
        if not hasattr(schema, key):
            raise FeatureError(f"{where}: expected schema field {key!r} is not a schema field")
        if getattr(schema, key) != value:
            wrong.append(f"{key}={getattr(schema, key)!r} (expected {value!r})")
    if wrong:
        raise FeatureError(f"{where}: schema does not match the config: " + ", ".join(wrong))


def load_features(
    directory: str | os.PathLike,
    item_ids: Sequence[str],
    *,
    layers: Sequence[int] | None = None,
    allow_missing: bool = False,
    expect_schema: dict | None = None,
) -> FeatureTable:
    """Reads every shard of a feature folder into a table aligned with the dataset's item index.

    Args:
      directory: folder with `*.tfrecord` shards and `schema.json`.
      item_ids: the dataset's raw item ids by index, `item_ids[0] == ""` for padding
        (`data.Dataset.item_ids`); the table gets `len(item_ids)` rows.
      layers: stored rows to keep (negative counts from the end, -1 = last); None keeps all. Keeping a
        subset at load time keeps only that subset in memory.
      allow_missing: zero-fill items of the dataset that have no record (and count them) instead of failing.
      expect_schema: schema fields the caller relies on, e.g. `{"layers": 33, "hidden_size": 4096}`.

    Returns:
      A `FeatureTable`.

    Raises:
      FeatureError: naming the file (and record) on a missing folder or schema, a corrupted or truncated
        shard, a record whose dtype/shape disagrees with the schema, NaN/Inf values, an item id stored
        twice, a record count different from `schema.num_items`, or dataset items without features.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FeatureError(
            f"{directory}: feature folder not found; expected *{records.SHARD_SUFFIX} shards and "
            f"{records.SCHEMA_FILE} in it; {HOW_TO_PRODUCE}"
        )
    shards = records.shard_files(directory)
    if not shards:
        raise FeatureError(
            f"{directory}: no *{records.SHARD_SUFFIX} shards; expected shards and {records.SCHEMA_FILE}; "
            f"{HOW_TO_PRODUCE}"
        )
    try:
        schema = records.read_schema(directory)
    except records.RecordError as e:
        raise FeatureError(str(e)) from None
    schema_path = directory / records.SCHEMA_FILE
    _check_expected_schema(schema, expect_schema, str(schema_path))
    kept = resolve_layers(layers, schema.layers, str(schema_path))
    if len(item_ids) == 0 or item_ids[0] != "":
        raise ValueError('item_ids must be the dataset index with item_ids[0] == "" (padding)')

    index = {item_id: row for row, item_id in enumerate(item_ids) if row > 0}
    if len(index) != len(item_ids) - 1:
        raise ValueError("item_ids holds the same raw id twice")
    dtype = records.numpy_dtype(schema.dtype)
    bits_dtype, exponent = _EXPONENT_MASK[schema.dtype]
    expected_shape = (schema.layers, schema.hidden_size)
    all_layers = kept == list(range(schema.layers))
    # One allocation for the whole table; np.zeros maps untouched pages lazily, so rows never
    # written (padding, zero-filled items) cost nothing until read.
    table = np.zeros((len(item_ids), len(kept), schema.hidden_size), dtype)
    scratch = np.empty(expected_shape, bits_dtype)
    seen: dict[str, tuple[str, int]] = {}  # raw id -> (file, record) of its first record
    filled = np.zeros(len(item_ids), bool)
    num_records = unused = 0
    for shard in shards:
        try:
            for number, payload in enumerate(records.iter_records(shard)):
                where = f"{shard}: record {number}"
                item_id, array = records.decode_item(payload, where)
                if array.dtype != dtype:
                    raise FeatureError(f"{where}: item {item_id}: dtype {array.dtype}, schema says {schema.dtype}")
                if array.shape != expected_shape:
                    raise FeatureError(
                        f"{where}: item {item_id}: shape {list(array.shape)}, schema says "
                        f"[layers={schema.layers}, hidden_size={schema.hidden_size}]"
                    )
                if item_id in seen:
                    first_file, first_number = seen[item_id]
                    raise FeatureError(
                        f"{where}: item {item_id} stored twice: also {first_file}: record {first_number}"
                    )
                seen[item_id] = (str(shard), number)
                np.bitwise_and(array.view(bits_dtype), exponent, out=scratch)
                if scratch.max() == exponent:
                    bad = ~np.isfinite(array.astype(np.float32))
                    layer_rows = sorted(set(np.nonzero(bad)[0].tolist()))
                    raise FeatureError(
                        f"{where}: item {item_id}: {int(bad.sum())} NaN/Inf values (in stored rows {layer_rows[:10]})"
                    )
                num_records += 1
                row = index.get(item_id)
                if row is None:
                    unused += 1
                    continue
                if all_layers:
                    table[row] = array
                else:
                    np.take(array, kept, axis=0, out=table[row])
                filled[row] = True
        except records.RecordError as e:
            raise FeatureError(str(e)) from None

    if num_records != schema.num_items:
        raise FeatureError(
            f"{schema_path}: num_items is {schema.num_items} but the {len(shards)} shards hold {num_records} "
            "records (an incomplete extraction or a stale schema?)"
        )
    missing_rows = np.nonzero(~filled[1:])[0] + 1
    if len(missing_rows) and not allow_missing:
        examples = [item_ids[r] for r in missing_rows[:5]]
        raise FeatureError(
            f"{directory}: {len(missing_rows)} of {len(item_ids) - 1} items have no features, e.g. ids {examples}; "
            "extract features for them or set allow_missing to zero-fill them"
        )
    result = FeatureTable(
        table=table,
        schema=schema,
        layers=kept,
        missing=len(missing_rows),
        unused=unused,
        records=num_records,
        files=len(shards),
    )
    log.info(result.report())
    if result.missing:
        log.warning("%s: %d items have no features and were zero-filled", directory, result.missing)
    return result

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
import hashlib
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

# Plausibility: a value is rejected when |x| >= 2**20 (about 1.05e6), or NaN/Inf. LVLM hidden states are large in a
# few "massive activation" dimensions (Sun et al., 2024, report a few thousand, up to ~1e4, in LLaMA-class models);
# 2**20 is two orders of magnitude above that, so a value beyond it is a corrupted record (a flipped exponent bit,
# uninitialised memory), and one such value would dominate its dimension's standardisation statistics. The test is
# on the raw bits: |x| >= 2**20 exactly when the sign-cleared bit pattern is >= that of 2**20 (IEEE 754 orders
# non-negative floats like their bit patterns), which also catches NaN and Inf; one integer pass per record, the
# same for bfloat16, which numpy has no native loop for. float16 cannot exceed 65504, so only its Inf/NaN count.
MAX_ABS = 2.0**20
_ABS_BITS = {  # dtype -> (unsigned view, mask clearing the sign bit, bit pattern of the smallest implausible |x|)
    "bfloat16": (np.uint16, 0x7FFF, 0x4980),
    "float16": (np.uint16, 0x7FFF, 0x7C00),
    "float32": (np.uint32, 0x7FFFFFFF, 0x49800000),
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
      identical: (item, earlier item) pairs whose loaded rows are exactly equal (duplicate videos, zero-filled
        extraction failures): such items tie in every score, so `replace` cannot tell them apart. A table from the
        feature cache keeps only the first `feature_cache.IDENTICAL_KEPT` pairs.
      num_identical: how many such items there are (len(identical) unless the list was cut).
    """

    table: np.ndarray
    schema: records.Schema
    layers: list[int]
    missing: int = 0
    unused: int = 0
    records: int = 0
    files: int = 0
    identical: list = dataclasses.field(default_factory=list)
    num_identical: int = 0
    missing_examples: list = dataclasses.field(default_factory=list)  # the first few ids of the `missing` items
    content_digest: str | None = None  # sha256 of the schema, every shard's name and records, in order (run identity)

    def report(self) -> str:
        """One line saying what was loaded, for logs."""
        return (
            f"features: {self.table.shape[0] - 1} items x {len(self.layers)} layers x {self.table.shape[2]} "
            f"{self.table.dtype} ({self.table.nbytes / 1e6:.1f} MB) from {self.records} records in {self.files} "
            f"shards; {self.unused} records for items not in the dataset ignored; {self.missing} items zero-filled"
        )


# allow_missing zero-fills the few items whose extraction failed. When more than half of the dataset's items have no
# features, the dataset's item ids almost surely do not name the feature set's (another id space, a wrong folder), and
# a "content" model would train on zeros: refused even with allow_missing (docs/protocol.md section 8).
MAX_MISSING_SHARE = 0.5


def check_missing(directory, missing: int, total: int, examples: Sequence[str], allow_missing: bool) -> None:
    """Refuses `missing` of `total` dataset items without features unless allowed and at most MAX_MISSING_SHARE of
    them. One check for a fresh load and a cached one (feature_cache.ensure), so both fail the same way."""
    shown = f", e.g. ids {list(examples)}" if examples else ""
    if missing and not allow_missing:
        raise FeatureError(
            f"{directory}: {missing} of {total} items have no features{shown}; "
            "extract features for them or set allow_missing to zero-fill them"
        )
    if missing > MAX_MISSING_SHARE * total:
        raise FeatureError(
            f"{directory}: {missing} of {total} items have no features{shown}: more than half, so the dataset's item "
            "ids do not match the feature set's (allow_missing zero-fills only a minority); check config.data and "
            "config.features.dir"
        )


def fingerprint(directory: str | os.PathLike) -> str:
    """A cheap identity of a feature folder: sha256 over schema.json and, per shard, its name, size and first and
    last MiB. Re-extracting, adding, removing or truncating a shard changes it; reading the whole folder (GBs) would
    make every resume slow. Part of a run's identity (train_state.run_identity)."""
    directory = Path(directory)
    digest = hashlib.sha256((directory / records.SCHEMA_FILE).read_bytes())
    for shard in records.shard_files(directory):
        digest.update(f"{shard.name}:{shard.stat().st_size}".encode())
        records.update_with_ends(digest, shard)
    return digest.hexdigest()


def standardize_stats(
    table: np.ndarray, chunk: int = 4096, sample: int = 1024, max_values: int = 1 << 20
) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer, per-dimension mean and 1/std of a feature table over real items (rows 1..N), robust to outliers.

    The mean and standard deviation are taken over values clipped to [q1 - 3 s, q99 + 3 s] with s = q99 - q1, the
    1st and 99th percentiles of an evenly spaced sample of at most `sample` items (docs/protocol.md section 8): a
    value that far out (about 16 standard deviations for a Gaussian dimension) is an outlier no healthy item has, so
    one bad item adds at most ~(16 sigma)^2 / N to its dimension's variance instead of squashing every other item to ~0. For well-behaved features nothing is clipped and the result is the plain mean and
    standard deviation. Computed once at build time in float64, in chunks of items, so a large float16 table is never
    copied whole. The sums go over blocks of `chunk` items, each read in pieces of at most `max_values` values (8 MB
    of float64), and continue each block's row-by-row sum across its pieces (numpy sums an array's leading axis row by
    row), so the numbers do not depend on `max_values`: a 33 x 4096 row set takes 7 items at a time, not 4096
    (4.4 GB of float64), and `table` may be a file read piece by piece (feature_cache.RowFile).

    Returns:
        (mean [L, H] float32, inv_std [L, H] float32). The std is floored at 1e-3 of the layer's median std so
        near-constant dimensions are not blown up (the median: one dimension gone wrong cannot raise the floor of
        its whole layer).
    """
    rows = table.shape[0] - 1
    if rows < 1:
        raise ValueError("feature table: needs at least one real item row besides padding row 0")
    picked = np.unique(np.linspace(1, rows, min(rows, sample)).round().astype(np.int64))
    lo = np.empty(table.shape[1:], np.float64)
    hi = np.empty(table.shape[1:], np.float64)
    for layer in range(table.shape[1]):  # one layer at a time: [sample, H] floats in memory
        q1, q99 = np.quantile(np.asarray(table[picked, layer], np.float64), [0.01, 0.99], axis=0)
        lo[layer], hi[layer] = q1 - 3 * (q99 - q1), q99 + 3 * (q99 - q1)
    total = np.zeros(table.shape[1:], np.float64)
    total_sq = np.zeros(table.shape[1:], np.float64)
    piece = max(1, min(chunk, max_values // max(1, int(np.prod(table.shape[1:])))))
    for start in range(1, table.shape[0], chunk):
        stop = min(start + chunk, table.shape[0])
        block_sum = block_sq = None
        for lo_row in range(start, stop, piece):
            part = np.clip(np.asarray(table[lo_row : min(lo_row + piece, stop)], dtype=np.float64), lo, hi)
            if block_sum is None:
                block_sum, block_sq = part.sum(0), np.square(part).sum(0)
            else:  # the block's running sums as row 0: the same additions, in the same order, as one whole block
                block_sum = np.concatenate([block_sum[None], part]).sum(0)
                block_sq = np.concatenate([block_sq[None], np.square(part)]).sum(0)
        total += block_sum
        total_sq += block_sq
    mean = total / rows
    std = np.sqrt(np.maximum(total_sq / rows - np.square(mean), 0.0))
    floor = 1e-3 * np.median(std, axis=1, keepdims=True) + 1e-12
    return mean.astype(np.float32), (1.0 / np.maximum(std, floor)).astype(np.float32)


def _describe_implausible(array: np.ndarray) -> str:
    """Which stored rows hold NaN/Inf or |x| >= MAX_ABS, and the worst value, for the error message."""
    values = array.astype(np.float32)
    bad = ~np.isfinite(values) | (np.abs(values) >= MAX_ABS)
    rows = sorted(set(np.nonzero(bad)[0].tolist()))
    finite = values[bad & np.isfinite(values)]
    worst = f"; largest |value| {float(np.abs(finite).max()):.4g}" if finite.size else ""
    return (
        f"{int(bad.sum())} values that are NaN, Inf or of magnitude >= 2**20 (implausible for a hidden state: "
        f"docs/protocol.md section 8) in stored layer rows {rows[:10]}{worst}"
    )


def resolve_layers(layers: Sequence[int] | None, stored: int, where: str) -> list[int]:
    """Stored-row indices as non-negative ints (negative counts from the end: -1 = last); None means all rows.

    The one resolver of layer indices in the project: the trainer, the study's layer sweep and `load_features` all
    call it, so an index means the same row everywhere. Raises FeatureError naming `where` for an index outside
    0..stored-1, an empty list, or two indices of one row.
    """
    if layers is None:
        return list(range(stored))
    chosen = []
    for layer in layers:
        # True is an int to Python: (True, 2) read as rows 1 and 2
        bad_type = isinstance(layer, (bool, np.bool_)) or not isinstance(layer, (int, np.integer))
        if bad_type or not -stored <= int(layer) < stored:
            raise FeatureError(f"{where}: layer {layer!r} requested, but the feature set stores rows 0..{stored - 1}")
        chosen.append(int(layer) % stored)
    if not chosen:
        raise FeatureError(f"{where}: an empty list of layers was requested")
    twice = sorted({row for row in chosen if chosen.count(row) > 1})
    if twice:  # DFF's alpha over copies of one row (e.g. (-1, 3) of 4 rows) is not the layer mix asked for
        raise FeatureError(
            f"{where}: layers {list(layers)} name stored row(s) {twice} more than once (negative indices count from "
            f"the end of rows 0..{stored - 1}); expected distinct rows"
        )
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


def _merged_shard_digests(schema: records.Schema, shards: Sequence[Path], where: Path) -> dict[str, str] | None:
    """schema.json's shard_sha256 (None for folders merged before it existed), checked against the shard names."""
    merged = schema.extra.get(records.SHARD_DIGESTS)
    if merged is None:
        return None
    if not isinstance(merged, dict) or not all(isinstance(v, str) and len(v) == 64 for v in merged.values()):
        raise FeatureError(f"{where}: extra.{records.SHARD_DIGESTS} must map shard file names to sha256 hex digests")
    names = {shard.name for shard in shards}
    if absent := sorted(set(merged) - names):
        raise FeatureError(
            f"{where}: lists shard(s) {absent[:3]} that are not in the folder ({len(absent)} missing; "
            f"the merge saw {len(merged)} shards)"
        )
    if added := sorted(names - set(merged)):
        raise FeatureError(
            f"{where.parent / added[0]}: not one of the {len(merged)} shards {where.name} was merged from "
            f"({len(added)} such): a shard added after `python -m extract.merge`; remove it, or rerun the merge"
        )
    return merged


def load_features(
    directory: str | os.PathLike,
    item_ids: Sequence[str],
    *,
    layers: Sequence[int] | None = None,
    allow_missing: bool = False,
    expect_schema: dict | None = None,
    allocate=np.zeros,
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
      allocate: `allocate(shape, dtype)` gives the zero table the rows are written into: `np.zeros` (host RAM), or
        a file-backed table (`feature_cache.RowFile`) supporting `table[row] = array` and `table[row]`.

    Returns:
      A `FeatureTable`.

    Raises:
      FeatureError: naming the file (and record) on a missing folder or schema, a corrupted or truncated
        shard, a record whose dtype/shape disagrees with the schema, NaN/Inf values, an item id stored
        twice, a record count different from `schema.num_items`, dataset items without features, or a shard
        that is not one schema.json was merged from (its `shard_sha256`: replaced, added or missing).
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
    bits_dtype, abs_mask, implausible = _ABS_BITS[schema.dtype]
    expected_shape = (schema.layers, schema.hidden_size)
    all_layers = kept == list(range(schema.layers))
    # One allocation for the whole table; np.zeros maps untouched pages lazily, so rows never
    # written (padding, zero-filled items) cost nothing until read.
    table = allocate((len(item_ids), len(kept), schema.hidden_size), dtype)
    scratch = np.empty(expected_shape, bits_dtype)
    seen: dict[str, tuple[str, int]] = {}  # raw id -> (file, record) of its first record
    by_content: dict[bytes, int] = {}  # digest of a strided sample of a loaded row -> the first table row with it
    identical: list[tuple[str, str]] = []  # (item, an earlier item whose stored row is exactly the same)
    filled = np.zeros(len(item_ids), bool)
    num_records = unused = 0
    # The full content digest, computed while every record is read anyway: the run identity's check that the
    # features are those a run was trained on (`fingerprint` reads only each shard's ends; docs/protocol.md 8).
    # A folder whose schema lists its shards' digests is hashed once per shard: the content digest is then taken
    # over the schema (which holds them), the names and the digests the records give (as strong, not slower).
    content = hashlib.sha256((directory / records.SCHEMA_FILE).read_bytes())
    merged = _merged_shard_digests(schema, shards, schema_path)
    for shard in shards:
        content.update(shard.name.encode() + b"\0")
        shard_digest = hashlib.sha256() if merged is not None else content
        try:
            for number, payload in enumerate(records.iter_records(shard)):
                where = f"{shard}: record {number}"
                records.update_digest(shard_digest, payload)
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
                np.bitwise_and(array.view(bits_dtype), abs_mask, out=scratch)
                if scratch.max() >= implausible:
                    raise FeatureError(f"{where}: item {item_id}: {_describe_implausible(array)}")
                num_records += 1
                row = index.get(item_id)
                if row is None:
                    unused += 1
                    continue
                value = array if all_layers else array[kept]
                table[row] = value
                filled[row] = True
                # Exact duplicates: hash every 16th value (cheap next to the copy above), confirm on the full row.
                digest = hashlib.blake2b(value.reshape(-1)[::16].tobytes(), digest_size=16).digest()
                first = by_content.setdefault(digest, row)
                if first != row and np.array_equal(value.view(bits_dtype), table[first].view(bits_dtype)):
                    identical.append((item_id, item_ids[first]))
        except records.RecordError as e:
            raise FeatureError(str(e)) from None
        if merged is not None:
            content.update(shard_digest.hexdigest().encode())
        if merged is not None and shard_digest.hexdigest() != merged[shard.name].lower():
            raise FeatureError(
                f"{shard}: its records are not those {schema_path} was merged from (sha256 "
                f"{shard_digest.hexdigest()[:16]}..., merged {merged[shard.name][:16]}...): the shard was replaced "
                "or rewritten after `python -m extract.merge` (from another extraction?); restore it, or rerun "
                "the extraction and the merge"
            )

    if num_records != schema.num_items:
        raise FeatureError(
            f"{schema_path}: num_items is {schema.num_items} but the {len(shards)} shards hold {num_records} "
            "records (an incomplete extraction or a stale schema?)"
        )
    missing_rows = np.nonzero(~filled[1:])[0] + 1
    examples = [item_ids[r] for r in missing_rows[:5]]
    check_missing(directory, len(missing_rows), len(item_ids) - 1, examples, allow_missing)
    result = FeatureTable(
        table=table,
        schema=schema,
        layers=kept,
        missing=len(missing_rows),
        unused=unused,
        records=num_records,
        files=len(shards),
        identical=identical,
        num_identical=len(identical),
        missing_examples=examples,
        content_digest=content.hexdigest(),
    )
    log.info(result.report())
    if identical:
        log.warning("%s: %d items have exactly the same features as an earlier item", directory, len(identical))
    if result.missing:
        log.warning("%s: %d items have no features and were zero-filled", directory, result.missing)
    return result

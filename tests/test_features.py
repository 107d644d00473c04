"""Tests for loading feature shards into an item-aligned table (dff_jax/features.py)."""

import json
import random

import ml_dtypes
import numpy as np
import pytest

from dff_jax import features, records
from dff_jax.features import FeatureError, load_features

LAYERS, HIDDEN = 4, 6


def _item_array(k: int, dtype="float16") -> np.ndarray:
    """Distinct per item and per layer, so a misplaced row or layer cannot go unnoticed."""
    values = np.arange(LAYERS * HIDDEN, dtype=np.float32).reshape(LAYERS, HIDDEN) / 8 + k
    return values.astype(records.numpy_dtype(dtype))


def _make_folder(path, shards: list[list[str]], dtype="float16", num_items=None, arrays=None, **schema_fields):
    """Writes shards (a list of item-id lists) and schema.json; returns {item_id: array}."""
    path.mkdir(parents=True, exist_ok=True)
    written = {}
    for s, ids in enumerate(shards):
        with records.ShardWriter(path / f"part-{s}.tfrecord") as w:
            for item_id in ids:
                array = (arrays or {}).get(item_id)
                if array is None:
                    array = _item_array(int(item_id.lstrip("i")), dtype)
                w.write(item_id, array)
                written[item_id] = array
    fields = {
        "model": "m",
        "layers": LAYERS,
        "hidden_size": HIDDEN,
        "dtype": dtype,
        "pooling": "mean",
        "prompt": "",
        "modality": "video",
        "num_frames": 4,
        "extractor_version": "test",
        "num_items": sum(len(ids) for ids in shards) if num_items is None else num_items,
    }
    fields.update(schema_fields)
    records.write_schema(path, records.Schema(**fields))
    return written


@pytest.mark.parametrize("dtype", records.DTYPES)
def test_table_rows_follow_the_dataset_index(tmp_path, dtype):
    ids = [f"i{k}" for k in range(1, 11)]
    written = _make_folder(tmp_path, [ids[:4], ids[4:]], dtype=dtype)
    order = ids[:]
    random.Random(0).shuffle(order)
    item_ids = [""] + order
    loaded = load_features(tmp_path, item_ids)
    assert loaded.table.shape == (11, LAYERS, HIDDEN)
    assert loaded.table.dtype == records.numpy_dtype(dtype)
    assert loaded.layers == list(range(LAYERS))
    assert (loaded.missing, loaded.unused, loaded.records, loaded.files) == (0, 0, 10, 2)
    assert not loaded.table[0].astype(np.float32).any(), "row 0 is padding"
    for row, item_id in enumerate(item_ids[1:], start=1):
        np.testing.assert_array_equal(loaded.table[row].view(np.uint8), written[item_id].view(np.uint8))


def test_layer_subset_with_negative_index(tmp_path):
    written = _make_folder(tmp_path, [["i1", "i2", "i3"]])
    loaded = load_features(tmp_path, ["", "i3", "i1", "i2"], layers=[1, -1])
    assert loaded.layers == [1, LAYERS - 1]
    assert loaded.table.shape == (4, 2, HIDDEN)
    np.testing.assert_array_equal(loaded.table[1], written["i3"][[1, LAYERS - 1]])
    np.testing.assert_array_equal(loaded.table[3], written["i2"][[1, LAYERS - 1]])


def test_layer_out_of_range(tmp_path):
    _make_folder(tmp_path, [["i1"]])
    with pytest.raises(FeatureError, match=rf"layer {LAYERS} requested.*rows 0..{LAYERS - 1}"):
        load_features(tmp_path, ["", "i1"], layers=[LAYERS])
    with pytest.raises(FeatureError, match=r"layer True requested"):  # was read as row 1
        load_features(tmp_path, ["", "i1"], layers=[True, 2])


def test_items_not_in_the_dataset_are_counted_not_loaded(tmp_path):
    _make_folder(tmp_path, [["i1", "i2", "i3", "i4"]])
    loaded = load_features(tmp_path, ["", "i4", "i2"])
    assert (loaded.unused, loaded.records, loaded.table.shape[0]) == (2, 4, 3)
    assert "2 records for items not in the dataset" in loaded.report()


def test_missing_features_error_lists_count_and_ids(tmp_path):
    _make_folder(tmp_path, [["i1", "i2"]])
    with pytest.raises(FeatureError, match=r"3 of 5 items have no features, e.g. ids \['i7', 'i8', 'i9'\]"):
        load_features(tmp_path, ["", "i1", "i7", "i2", "i8", "i9"])


def test_allow_missing_zero_fills_and_reports(tmp_path):
    written = _make_folder(tmp_path, [["i1", "i2"]])
    loaded = load_features(tmp_path, ["", "i1", "i7", "i2"], allow_missing=True)
    assert loaded.missing == 1
    assert not loaded.table[2].astype(np.float32).any()
    np.testing.assert_array_equal(loaded.table[3], written["i2"])
    assert "1 items zero-filled" in loaded.report()


def test_duplicate_id_across_shards_names_both(tmp_path):
    _make_folder(tmp_path, [["i1", "i2"], ["i3", "i2"]])
    with pytest.raises(FeatureError) as err:
        load_features(tmp_path, ["", "i1", "i2", "i3"])
    message = str(err.value)
    assert "part-1.tfrecord: record 1: item i2 stored twice" in message
    assert "part-0.tfrecord: record 1" in message


def test_record_dtype_differs_from_schema(tmp_path):
    _make_folder(tmp_path, [["i1"]], arrays={"i1": _item_array(1, "float32")}, dtype="float16")
    with pytest.raises(FeatureError, match=r"part-0.tfrecord: record 0: item i1: dtype float32, schema says float16"):
        load_features(tmp_path, ["", "i1"])


def test_record_shape_differs_from_schema(tmp_path):
    bad = np.zeros((LAYERS + 1, HIDDEN), np.float16)
    _make_folder(tmp_path, [["i1", "i2"]], arrays={"i2": bad})
    with pytest.raises(FeatureError, match=r"record 1: item i2: shape \[5, 6\], schema says \[layers=4"):
        load_features(tmp_path, ["", "i1", "i2"])


@pytest.mark.parametrize("dtype", records.DTYPES)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_names_item_and_file(tmp_path, dtype, bad):
    array = _item_array(2, dtype)
    array[2, 3] = bad
    _make_folder(tmp_path, [["i1"], ["i2"]], dtype=dtype, arrays={"i2": array})
    with pytest.raises(
        FeatureError, match=r"part-1.tfrecord: record 0: item i2: 1 values that are NaN, Inf or of magnitude >= 2\*\*20"
    ) as e:
        load_features(tmp_path, ["", "i1", "i2"])
    assert "layer rows [2]" in str(e.value)


def test_implausible_magnitudes_are_refused_and_plausible_ones_pass(tmp_path):
    """|x| >= 2**20 is no LVLM hidden state (docs/protocol.md section 8): the -2.99e38 of a corrupted record stops the
    load naming item, layer and value; just below the bound, and float16's largest finite value, load unchanged."""
    for dtype in ("bfloat16", "float32"):
        np_dtype = records.numpy_dtype(dtype)
        below = np.asarray(2.0**20 - 2.0**12, np_dtype)  # the largest bfloat16 below 2**20 (exact in float32 too)
        array = np.full((LAYERS, HIDDEN), below, np_dtype)
        array[0, 0] = -below
        _make_folder(tmp_path / f"ok-{dtype}", [["i1"]], dtype=dtype, arrays={"i1": array})
        assert load_features(tmp_path / f"ok-{dtype}", ["", "i1"]).table[1, 0, 0] == -below
        array = _item_array(1, dtype)
        array[1, 2] = np.asarray(-2.99e38, np_dtype)
        _make_folder(tmp_path / f"bad-{dtype}", [["i1"]], dtype=dtype, arrays={"i1": array})
        with pytest.raises(
            FeatureError, match=r"item i1: 1 values .* layer rows \[1\]; largest \|value\| 2.99\d*e\+38"
        ):
            load_features(tmp_path / f"bad-{dtype}", ["", "i1"])
    array = np.full((LAYERS, HIDDEN), ml_dtypes.finfo(np.float16).max, np.float16)
    _make_folder(tmp_path / "f16", [["i1"]], dtype="float16", arrays={"i1": array})
    assert load_features(tmp_path / "f16", ["", "i1"]).table[1, 0, 0] == 65504


def test_identical_feature_rows_are_reported(tmp_path):
    same = _item_array(1, "float32")
    _make_folder(tmp_path, [["i1", "i2", "i3"]], dtype="float32", arrays={"i1": same, "i3": same.copy()})
    loaded = load_features(tmp_path, ["", "i1", "i2", "i3"])
    assert loaded.identical == [("i3", "i1")]


def test_one_outlying_item_does_not_erase_its_dimension_or_layer():
    """The issue's case: one large value in one item made its layer's scale ~1e33 and every other item ~0."""
    rng = np.random.default_rng(0)
    table = rng.normal(size=(2001, 3, 8)).astype(np.float32)
    clean_mean, clean_inv = features.standardize_stats(table)
    table[17, 0, 5] = 5e5  # plausible by magnitude, absurd for its dimension
    mean, inv = features.standardize_stats(table)
    # Unclipped, dimension 5's std would be ~5e5 / sqrt(2000) ~ 1e4 times too large; clipped, it moves by <= 10%.
    np.testing.assert_allclose(inv, clean_inv, rtol=0.1)
    np.testing.assert_allclose(mean, clean_mean, atol=0.05)
    np.testing.assert_array_equal(inv[1:], clean_inv[1:])  # the other layers see exactly the same statistics


def test_num_items_mismatch_names_schema(tmp_path):
    _make_folder(tmp_path, [["i1", "i2"]], num_items=3)
    with pytest.raises(FeatureError, match=r"schema.json: num_items is 3 but the 1 shards hold 2 records"):
        load_features(tmp_path, ["", "i1", "i2"])


def test_expect_schema_mismatch(tmp_path):
    _make_folder(tmp_path, [["i1"]])
    assert load_features(tmp_path, ["", "i1"], expect_schema={"model": "m", "layers": LAYERS}).schema.model == "m"
    with pytest.raises(
        FeatureError, match=r"schema.json: schema does not match the config: hidden_size=6 \(expected 8\)"
    ):
        load_features(tmp_path, ["", "i1"], expect_schema={"hidden_size": 8})


def test_corrupted_shard_is_a_feature_error_naming_the_record(tmp_path):
    _make_folder(tmp_path, [["i1", "i2"]])
    path = tmp_path / "part-0.tfrecord"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # inside the last record's payload
    path.write_bytes(bytes(data))
    with pytest.raises(FeatureError, match=r"part-0.tfrecord: record 1 .*payload CRC mismatch"):
        load_features(tmp_path, ["", "i1", "i2"])


def test_missing_folder_and_no_shards_say_how_to_make_them(tmp_path):
    with pytest.raises(FeatureError, match=r"not found.*\*\.tfrecord.*schema\.json.*python -m dff_jax\.synthetic"):
        load_features(tmp_path / "nope", ["", "i1"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FeatureError, match=r"no \*\.tfrecord shards.*python -m extract"):
        load_features(tmp_path / "empty", ["", "i1"])


def test_bad_schema_is_a_feature_error(tmp_path):
    _make_folder(tmp_path, [["i1"]])
    raw = json.loads((tmp_path / "schema.json").read_text())
    raw["dtype"] = "int4"
    (tmp_path / "schema.json").write_text(json.dumps(raw))
    with pytest.raises(FeatureError, match=r"schema.json: dtype 'int4'"):
        load_features(tmp_path, ["", "i1"])


def test_item_ids_must_start_with_padding(tmp_path):
    _make_folder(tmp_path, [["i1"]])
    with pytest.raises(ValueError, match="padding"):
        load_features(tmp_path, ["i1"])


def test_layers_naming_one_row_twice_are_refused(tmp_path):
    _make_folder(tmp_path, [["i1"]])
    for layers in ([1, 1], [-1, LAYERS - 1]):
        with pytest.raises(FeatureError, match=rf"name stored row\(s\) \[{layers[1]}\] more than once"):
            load_features(tmp_path, ["", "i1"], layers=layers)
    assert features.model_rows("learned", -1, (0, -1), LAYERS, "x") == [0, LAYERS - 1]


def _merged_folder(path, shards, arrays=None):
    """A folder whose schema records each shard's digest, as extract.merge writes it."""
    _make_folder(path, shards, arrays=arrays)
    digests = {p.name: records.shard_digest(p) for p in records.shard_files(path)}
    schema = records.read_schema(path)
    schema.extra[records.SHARD_DIGESTS] = digests
    records.write_schema(path, schema)


def test_a_shard_swapped_in_after_the_merge_is_named(tmp_path):
    # Same ids, shapes and dtype, other values (another extraction): only the merged digest tells them apart.
    ids = [["i1", "i2"], ["i3", "i4"]]
    _merged_folder(tmp_path / "a", ids)
    other = {i: _item_array(int(i[1:]) + 100) for i in ("i3", "i4")}
    _make_folder(tmp_path / "b", ids, arrays=other)
    item_ids = ["", "i1", "i2", "i3", "i4"]
    assert load_features(tmp_path / "a", item_ids).records == 4
    (tmp_path / "a" / "part-1.tfrecord").write_bytes((tmp_path / "b" / "part-1.tfrecord").read_bytes())
    with pytest.raises(FeatureError, match=r"part-1\.tfrecord: its records are not those .*schema\.json was merged"):
        load_features(tmp_path / "a", item_ids)


def test_shards_added_or_missing_after_the_merge_are_named(tmp_path):
    _merged_folder(tmp_path, [["i1", "i2"], ["i3"]])
    (tmp_path / "part-1.tfrecord").rename(tmp_path / "part-9.tfrecord")
    with pytest.raises(FeatureError, match=r"lists shard\(s\) \['part-1.tfrecord'\] that are not in the folder"):
        load_features(tmp_path, ["", "i1", "i2", "i3"])
    (tmp_path / "part-9.tfrecord").rename(tmp_path / "part-1.tfrecord")
    with records.ShardWriter(tmp_path / "part-2.tfrecord") as w:
        w.write("i4", _item_array(4))
    with pytest.raises(FeatureError, match=r"part-2\.tfrecord: not one of the 2 shards schema\.json was merged from"):
        load_features(tmp_path, ["", "i1", "i2", "i3", "i4"])


def test_a_malformed_shard_digest_map_is_refused(tmp_path):
    _make_folder(tmp_path, [["i1"]], extra={records.SHARD_DIGESTS: {"part-0.tfrecord": "abc"}})
    with pytest.raises(FeatureError, match=r"extra\.shard_sha256 must map shard file names to sha256 hex digests"):
        load_features(tmp_path, ["", "i1"])


def test_a_non_object_extra_and_upper_case_digests(tmp_path):
    _make_folder(tmp_path / "a", [["i1"]])
    path = tmp_path / "a" / records.SCHEMA_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), "extra": ["x"]}))  # was an AttributeError traceback
    with pytest.raises(FeatureError, match=r"schema.json: extra must be an object"):
        load_features(tmp_path / "a", ["", "i1"])
    _make_folder(tmp_path / "b", [["i1"]])
    digest = records.shard_digest(tmp_path / "b" / "part-0.tfrecord").upper()  # equal but for case
    schema = records.read_schema(tmp_path / "b")
    schema.extra[records.SHARD_DIGESTS] = {"part-0.tfrecord": digest}
    records.write_schema(tmp_path / "b", schema)
    assert load_features(tmp_path / "b", ["", "i1"]).records == 1

"""Tests for the feature record format (dff_jax/records.py), including a golden file written by TensorFlow."""

import dataclasses
import importlib.util
import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from dff_jax import records

DATA = Path(__file__).resolve().parent / "data"


def _array(dtype: str, shape=(3, 5), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape).astype(np.float32).astype(records.numpy_dtype(dtype))


def _schema(**overrides) -> records.Schema:
    fields = {
        "model": "test-model",
        "layers": 3,
        "hidden_size": 5,
        "dtype": "float16",
        "pooling": "mean",
        "prompt": "",
        "modality": "video",
        "num_frames": 8,
        "extractor_version": "test",
        "num_items": 2,
    }
    fields.update(overrides)
    return records.Schema(**fields)


def _write_shard(path: Path, items: dict[str, np.ndarray]) -> Path:
    with records.ShardWriter(path) as w:
        for item_id, array in items.items():
            w.write(item_id, array)
    return path


@pytest.mark.parametrize("dtype", records.DTYPES)
def test_encode_decode_round_trip_is_bit_exact(dtype):
    array = _array(dtype)
    item_id, decoded = records.decode_item(records.encode_item("vidéo 7", array))
    assert item_id == "vidéo 7"
    assert decoded.dtype == records.numpy_dtype(dtype)
    assert decoded.shape == (3, 5)
    np.testing.assert_array_equal(decoded.view(np.uint8), array.view(np.uint8))


@pytest.mark.parametrize("dtype", records.DTYPES)
def test_shard_writer_and_iter_records_round_trip(tmp_path, dtype):
    items = {f"i{k}": _array(dtype, (4, 6), seed=k) for k in range(5)}
    path = _write_shard(tmp_path / "a.tfrecord", items)
    assert not (tmp_path / "a.tfrecord.tmp").exists()
    decoded = [records.decode_item(p) for p in records.iter_records(path)]
    assert [i for i, _ in decoded] == list(items)
    for (_, got), want in zip(decoded, items.values()):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))


def test_write_bytes_matches_write_for_bfloat16(tmp_path):
    """The PyTorch extractor passes raw bf16 bytes; they must decode to the same array as write()."""
    array = _array("bfloat16", (2, 3))
    raw = records.encode_item_bytes("x", array.view(np.uint16).tobytes(), "bfloat16", (2, 3))
    assert records.encode_item("x", array) == raw
    with pytest.raises(ValueError, match="expected 12"):
        records.encode_item_bytes("x", b"\0" * 10, "bfloat16", (2, 3))


def _load_golden_module():
    spec = importlib.util.spec_from_file_location("make_tf_golden", DATA / "make_tf_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reads_tensorflow_golden_file_exactly():
    """tests/data/tf_golden.tfrecord was written by TensorFlow 2.21 (tests/data/make_tf_golden.py)."""
    golden = _load_golden_module()
    path = DATA / "tf_golden.tfrecord"
    decoded = [records.decode_item(p, f"{path}: record {n}") for n, p in enumerate(records.iter_records(path))]
    assert len(decoded) == len(golden.GOLDEN_ITEMS)
    dtypes_seen = set()
    for index, ((item_id, array), (want_id, dtype, shape)) in enumerate(zip(decoded, golden.GOLDEN_ITEMS)):
        want = golden.golden_array(index, shape).astype(records.numpy_dtype(dtype))
        assert item_id == want_id
        assert array.dtype == want.dtype and array.shape == shape
        np.testing.assert_array_equal(array.view(np.uint8), want.view(np.uint8))
        # the values are exact in every dtype, so they also equal the float32 originals
        np.testing.assert_array_equal(array.astype(np.float32), golden.golden_array(index, shape))
        dtypes_seen.add(dtype)
    assert dtypes_seen == set(records.DTYPES)


def _two_record_file(tmp_path) -> tuple[Path, list[int]]:
    """A shard of two items; returns the path and each record's starting byte offset."""
    payloads = [records.encode_item(f"i{k}", _array("float32", seed=k)) for k in range(2)]
    path = _write_shard(tmp_path / "s.tfrecord", {f"i{k}": _array("float32", seed=k) for k in range(2)})
    return path, [0, 12 + len(payloads[0]) + 4]


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_flipped_payload_byte_names_the_record(tmp_path):
    path, starts = _two_record_file(tmp_path)
    _flip(path, starts[1] + 12 + 40)  # inside the second record's payload
    reader = records.iter_records(path)
    next(reader)  # the first record is intact
    with pytest.raises(records.RecordError, match=rf"s\.tfrecord: record 1 \(byte offset {starts[1]}\).*payload CRC"):
        next(reader)


def test_flipped_length_byte_names_the_record(tmp_path):
    path, starts = _two_record_file(tmp_path)
    _flip(path, starts[0] + 1)
    with pytest.raises(records.RecordError, match=r"record 0 \(byte offset 0\).*length CRC"):
        list(records.iter_records(path))


def test_flipped_byte_is_not_detected_without_crc_check(tmp_path):
    """Guards the CRC test above: the same flip passes when CRCs are not checked."""
    path, starts = _two_record_file(tmp_path)
    _flip(path, starts[1] + 12 + 40)
    assert len(list(records.iter_records(path, check_crc=False))) == 2


@pytest.mark.parametrize("cut", [5, 30])
def test_truncated_file_names_the_record(tmp_path, cut):
    path, starts = _two_record_file(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: starts[1] + cut])  # cut inside the second record's header (5) or payload (30)
    with pytest.raises(records.RecordError, match=r"s\.tfrecord: record 1 .*truncated"):
        list(records.iter_records(path))


def test_not_an_example_is_named(tmp_path):
    path = tmp_path / "junk.tfrecord"
    with open(path, "wb") as f:
        records.write_record(f, b"\xff\xff\xff not a protobuf")
    payload = next(records.iter_records(path))
    with pytest.raises(records.RecordError, match="junk record"):
        records.decode_item(payload, "junk record")


def test_decode_rejects_missing_feature_and_bad_size():
    ex = records.Example()
    ex.features.feature["item_id"].bytes_list.value.append(b"a")
    with pytest.raises(records.RecordError, match="missing feature 'hidden'"):
        records.decode_item(ex.SerializeToString(), "rec")
    payload = records.encode_item_bytes("a", b"\0" * 8, "float32", (1, 2))
    ex = records.Example.FromString(payload)
    del ex.features.feature["shape"].int64_list.value[:]
    ex.features.feature["shape"].int64_list.value.extend([2, 2])
    with pytest.raises(records.RecordError, match="8 bytes do not hold"):
        records.decode_item(ex.SerializeToString(), "rec")


def test_shard_writer_aborted_by_exception_leaves_nothing(tmp_path):
    path = tmp_path / "s.tfrecord"
    with pytest.raises(RuntimeError, match="boom"), records.ShardWriter(path) as w:
        w.write("a", _array("float16"))
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    assert records.shard_files(tmp_path) == []


def test_shard_files_ignores_tmp_leftovers(tmp_path):
    _write_shard(tmp_path / "b.tfrecord", {"x": _array("float16")})
    _write_shard(tmp_path / "a.tfrecord", {"y": _array("float16")})
    (tmp_path / "c.tfrecord.tmp").write_bytes(b"partial")
    assert [p.name for p in records.shard_files(tmp_path)] == ["a.tfrecord", "b.tfrecord"]


def test_schema_round_trip(tmp_path):
    schema = _schema(dtype="bfloat16", extra={"note": "x"})
    records.write_schema(tmp_path, schema)
    assert records.read_schema(tmp_path) == schema


def test_schema_missing_file(tmp_path):
    with pytest.raises(records.RecordError, match="schema.json: missing"):
        records.read_schema(tmp_path)


def test_schema_invalid_json_names_line(tmp_path):
    (tmp_path / "schema.json").write_text('{\n  "model": "m",\n  oops\n}\n')
    with pytest.raises(records.RecordError, match="schema.json: line 3: not valid JSON"):
        records.read_schema(tmp_path)


def test_schema_missing_and_unknown_fields(tmp_path):
    raw = dataclasses.asdict(_schema())
    del raw["hidden_size"]
    raw["colour"] = "red"
    (tmp_path / "schema.json").write_text(json.dumps(raw))
    with pytest.raises(records.RecordError, match=r"missing fields \['hidden_size'\], unknown fields \['colour'\]"):
        records.read_schema(tmp_path)
    del raw["colour"]
    raw["hidden_size"], raw["hidden"] = 64, 64  # only what is wrong is named, with the fields a schema has
    (tmp_path / "schema.json").write_text(json.dumps(raw))
    with pytest.raises(
        records.RecordError,
        match=r"schema.json: unknown fields \['hidden'\] \(a schema has the fields \[.*'hidden_size'",
    ):
        records.read_schema(tmp_path)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("dtype", "int8", "dtype 'int8'"),
        ("layers", 0, "layers must be an integer >= 1, got 0"),
        ("layers", True, "layers must be an integer >= 1, got True"),
        ("hidden_size", "64", "hidden_size must be an integer >= 1, got '64'"),
        ("num_items", None, "num_items must be an integer >= 0, got None"),
        ("format_version", 99, "format_version 99"),
    ],
)
def test_schema_bad_values(tmp_path, field, value, message):
    raw = dataclasses.asdict(_schema())
    raw[field] = value
    (tmp_path / "schema.json").write_text(json.dumps(raw))
    with pytest.raises(records.RecordError, match=message):
        records.read_schema(tmp_path)


def test_masked_crc_matches_tensorflow_framing():
    """Both CRCs of the first record TensorFlow wrote equal ours (the framing half of compatibility)."""
    path = DATA / "tf_golden.tfrecord"
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    assert struct.unpack("<I", data[8:12])[0] == records.masked_crc(data[:8])
    assert struct.unpack("<I", data[12 + length : 16 + length])[0] == records.masked_crc(data[12 : 12 + length])


def test_numpy_dtype():
    assert records.numpy_dtype("bfloat16") == np.dtype(ml_dtypes.bfloat16)
    with pytest.raises(ValueError, match="unsupported feature dtype"):
        records.numpy_dtype("float64")


def test_same_item_same_bytes_in_every_process():
    """The Example's feature map is serialised in sorted key order: before, its order followed the process's hash
    seed, so two processes wrote different bytes for the same item (shards were not reproducible file by file)."""
    import os
    import subprocess
    import sys

    code = (
        "import sys; from dff_jax import records; "
        "sys.stdout.write(records.encode_item_bytes('i7', bytes(range(8)), 'float32', (2,)).hex())"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env=dict(os.environ, PYTHONHASHSEED=str(seed)),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in range(6)
    }
    assert len(outs) == 1, outs


def test_write_json_atomic_leaves_no_temporary_on_failure(tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(records.json, "dump", full_disk)
    with pytest.raises(OSError):
        records.write_json_atomic(tmp_path / "x.json", {"a": 1})
    assert list(tmp_path.iterdir()) == []

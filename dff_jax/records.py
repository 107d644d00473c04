"""The feature file format: the one contract between `extract/` and `dff_jax`.

A feature set is a folder holding

* shards `*.tfrecord`: TFRecord framing (uint64 length, masked CRC32C of the length, payload, masked CRC32C
  of the payload), one `tf.train.Example`-compatible record per item with the features
  `item_id` (bytes, the raw item id as UTF-8), `hidden` (bytes, the raw little-endian array),
  `dtype` (bytes: bfloat16 | float16 | float32) and `shape` (int64 list, `[layers, hidden]`);
* `schema.json`: what produced the arrays (see `Schema`); `extract.merge` also records each shard's
  `shard_digest` under `extra["shard_sha256"]`, which the trainer's loader checks (a shard replaced after
  the merge, or added to the folder, is then named instead of silently mixed in).

Layer 0 is the embedding output and layers 1..L the decoder layers, so a decoder with L layers stores
L + 1 rows; a caption-centric feature set stores one row.

This module imports only numpy, protobuf and google-crc32c (ml_dtypes for bfloat16), so the PyTorch
extractor can use it without JAX. TensorFlow reads these files with `tf.data.TFRecordDataset` and
`tf.io.parse_single_example` (see README); a golden file written by TensorFlow is read in the tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import struct
from pathlib import Path
from typing import BinaryIO, Iterator

import google_crc32c
import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from dff_jax.errors import UserError

SCHEMA_FILE = "schema.json"
SHARD_SUFFIX = ".tfrecord"
FORMAT_VERSION = 1
DTYPES = ("bfloat16", "float16", "float32")
SHARD_DIGESTS = "shard_sha256"  # Schema.extra key: {shard file name: shard_digest} (written by extract.merge)


class RecordError(UserError, ValueError):
    """A feature file that is not what the format promises; the message names the file and record."""


def _build_example_class():
    """Builds tf.train.Example's wire-compatible message class under a private proto package.

    Field numbers and types match tensorflow/core/example/{example,feature}.proto, so the bytes are
    identical to TensorFlow's; the private package name avoids a clash when TensorFlow is imported too.
    """
    F = descriptor_pb2.FieldDescriptorProto
    fd = descriptor_pb2.FileDescriptorProto(
        name="dff_jax_private/example.proto", package="dff_jax_private", syntax="proto3"
    )
    prefix = ".dff_jax_private."

    def message(name, fields):
        m = fd.message_type.add(name=name)
        for f in fields:
            m.field.add(**f)
        return m

    rep, opt = F.LABEL_REPEATED, F.LABEL_OPTIONAL
    message("BytesList", [dict(name="value", number=1, label=rep, type=F.TYPE_BYTES)])
    for name, typ in (("FloatList", F.TYPE_FLOAT), ("Int64List", F.TYPE_INT64)):
        m = message(name, [dict(name="value", number=1, label=rep, type=typ)])
        m.field[0].options.packed = True
    feature = message(
        "Feature",
        [
            dict(name=n, number=i + 1, label=opt, type=F.TYPE_MESSAGE, type_name=prefix + t, oneof_index=0)
            for i, (n, t) in enumerate(
                [("bytes_list", "BytesList"), ("float_list", "FloatList"), ("int64_list", "Int64List")]
            )
        ],
    )
    feature.oneof_decl.add(name="kind")
    features = message("Features", [])
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, label=opt, type=F.TYPE_STRING)
    entry.field.add(name="value", number=2, label=opt, type=F.TYPE_MESSAGE, type_name=prefix + "Feature")
    features.field.add(
        name="feature", number=1, label=rep, type=F.TYPE_MESSAGE, type_name=prefix + "Features.FeatureEntry"
    )
    message("Example", [dict(name="features", number=1, label=opt, type=F.TYPE_MESSAGE, type_name=prefix + "Features")])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("dff_jax_private.Example"))


Example = _build_example_class()


def masked_crc(data: bytes) -> int:
    """TFRecord's masked CRC32C (tensorflow/core/lib/hash/crc32c.h: rotate right by 15, add a constant)."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def write_record(f: BinaryIO, data: bytes) -> None:
    """Appends one framed record to an open binary file."""
    header = struct.pack("<Q", len(data))
    f.write(header + struct.pack("<I", masked_crc(header)) + data + struct.pack("<I", masked_crc(data)))


def update_digest(digest, payload: bytes) -> None:
    """Feeds one record to a hash: its length (8 bytes, little-endian), then its bytes (two updates, no copy)."""
    digest.update(len(payload).to_bytes(8, "little"))
    digest.update(payload)


def shard_digest(path: str | os.PathLike) -> str:
    """sha256 (hex) of a shard's records, each fed by `update_digest`: what schema.json's shard_sha256 holds."""
    digest = hashlib.sha256()
    for payload in iter_records(path):
        update_digest(digest, payload)
    return digest.hexdigest()


def update_with_ends(digest, path: str | os.PathLike) -> None:
    """Feeds a file's first and last MiB (all of it up to 2 MiB) to a hash: a cheap identity of a large file that
    re-reading whole would make slow (feature shards, model weights)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
        if size > 1 << 20:
            f.seek(max(size - (1 << 20), 1 << 20))
            digest.update(f.read())


def iter_records(path: str | os.PathLike, check_crc: bool = True) -> Iterator[bytes]:
    """Yields the payload of every record of a TFRecord file, checking both CRCs of each.

    Raises:
      RecordError: naming the file, the 0-based record number and the byte offset, on a truncated
        file or a CRC mismatch.
    """
    path = str(path)
    with open(path, "rb", buffering=8 << 20) as f:
        index, offset = 0, 0
        while True:
            header = f.read(12)
            if not header:
                return
            where = f"{path}: record {index} (byte offset {offset})"
            if len(header) < 12:
                raise RecordError(f"{where}: file ends inside a record header (truncated file?)")
            (length,) = struct.unpack("<Q", header[:8])
            (header_crc,) = struct.unpack("<I", header[8:])
            if check_crc and header_crc != masked_crc(header[:8]):
                raise RecordError(f"{where}: length CRC mismatch (corrupted file or not a TFRecord file)")
            body = f.read(length + 4)
            if len(body) != length + 4:
                raise RecordError(
                    f"{where}: file ends inside a record: expected {length + 4} bytes, found {len(body)} (truncated file?)"
                )
            if check_crc and struct.unpack("<I", body[length:])[0] != masked_crc(body[:length]):
                raise RecordError(f"{where}: payload CRC mismatch (corrupted record)")
            yield body[:length]
            index += 1
            offset += 12 + length + 4


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype for one of DTYPES (bfloat16 comes from ml_dtypes, a JAX dependency)."""
    if name not in DTYPES:
        raise ValueError(f"unsupported feature dtype {name!r}; expected one of {DTYPES}")
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def encode_item_bytes(item_id: str, data: bytes, dtype: str, shape: tuple[int, ...]) -> bytes:
    """Serialises one item from raw little-endian bytes (the PyTorch side uses this for bfloat16)."""
    if dtype not in DTYPES:
        raise ValueError(f"unsupported feature dtype {dtype!r}; expected one of {DTYPES}")
    expected = int(np.prod(shape)) * numpy_dtype(dtype).itemsize
    if len(data) != expected:
        raise ValueError(f"item {item_id}: {len(data)} bytes for shape {tuple(shape)} {dtype}; expected {expected}")
    ex = Example()
    feat = ex.features.feature
    feat["item_id"].bytes_list.value.append(str(item_id).encode("utf-8"))
    feat["hidden"].bytes_list.value.append(data)
    feat["dtype"].bytes_list.value.append(dtype.encode())
    feat["shape"].int64_list.value.extend(int(s) for s in shape)
    # Sorted map keys: otherwise the feature-map order follows the process's hash seed, and the same item gave
    # different bytes (the same values) in different processes.
    return ex.SerializeToString(deterministic=True)


def encode_item(item_id: str, array: np.ndarray) -> bytes:
    """Serialises one item: `array` is `[layers, hidden]` in one of DTYPES."""
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"item {item_id}: expected a [layers, hidden] array, got shape {array.shape}")
    dtype = str(array.dtype)
    data = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    return encode_item_bytes(item_id, data, dtype, array.shape)


def decode_item(payload: bytes, where: str = "record") -> tuple[str, np.ndarray]:
    """Parses one record into (raw item id, `[layers, hidden]` array, read-only view of the payload).

    Raises:
      RecordError: naming `where` when a feature is missing or inconsistent.
    """
    try:
        feat = Example.FromString(payload).features.feature
    except Exception as e:  # protobuf raises DecodeError, a plain Exception subclass
        raise RecordError(f"{where}: not a tf.train.Example ({e})") from None
    for key, kind in (
        ("item_id", "bytes_list"),
        ("hidden", "bytes_list"),
        ("dtype", "bytes_list"),
        ("shape", "int64_list"),
    ):
        if key not in feat or len(getattr(feat[key], kind).value) == 0:
            raise RecordError(f"{where}: missing feature {key!r} ({kind})")
    try:
        item_id = feat["item_id"].bytes_list.value[0].decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(f"{where}: the item id is not UTF-8 text ({e.reason} at byte {e.start})") from None
    dtype = feat["dtype"].bytes_list.value[0].decode("utf-8", "replace")
    if dtype not in DTYPES:
        raise RecordError(f"{where}: item {item_id}: dtype {dtype!r}, expected one of {DTYPES}")
    shape = tuple(feat["shape"].int64_list.value)
    data = feat["hidden"].bytes_list.value[0]
    np_dtype = numpy_dtype(dtype).newbyteorder("<")
    if len(shape) != 2 or min(shape) < 0 or len(data) != int(np.prod(shape)) * np_dtype.itemsize:
        raise RecordError(
            f"{where}: item {item_id}: {len(data)} bytes do not hold a [layers, hidden] {dtype} array of shape {shape}"
        )
    return item_id, np.frombuffer(data, np_dtype).reshape(shape)


class ShardWriter:
    """Writes one shard atomically: records go to `<path>.tmp`, renamed to `path` on a clean close.

    A crash leaves at most a `.tmp` file, never a half-written shard; readers ignore `.tmp` files.
    Use as a context manager; an exception inside the block deletes the temp file.
    """

    def __init__(self, path: str | os.PathLike, digest: bool = False):
        self.path = Path(path)
        if self.path.suffix != SHARD_SUFFIX:
            raise ValueError(f"{self.path}: shard files must end in {SHARD_SUFFIX}")
        self.tmp_path = self.path.with_name(self.path.name + ".tmp")
        self._file = open(self.tmp_path, "wb")
        self.count = 0
        # `digest`: keep the shard's `shard_digest` as it is written (the extractor attests its files with it).
        self._digest = hashlib.sha256() if digest else None

    def write(self, item_id: str, array: np.ndarray) -> None:
        self._write(encode_item(item_id, array))

    def write_bytes(self, item_id: str, data: bytes, dtype: str, shape: tuple[int, ...]) -> None:
        self._write(encode_item_bytes(item_id, data, dtype, shape))

    def _write(self, payload: bytes) -> None:
        write_record(self._file, payload)
        if self._digest is not None:
            update_digest(self._digest, payload)
        self.count += 1

    def hexdigest(self) -> str:
        """`shard_digest` of the records written so far (with `digest=True`)."""
        return self._digest.hexdigest()

    def close(self) -> Path:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp_path, self.path)
        return self.path

    def abort(self) -> None:
        self._file.close()
        self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


@dataclasses.dataclass
class Schema:
    """What a feature set holds and how it was made (`schema.json`).

    `layers` counts the stored rows per item: hidden states of a decoder with L layers give L + 1
    (row 0 = embedding output); a caption-centric or other single-vector feature set gives 1.
    """

    model: str
    layers: int
    hidden_size: int
    dtype: str
    pooling: str
    prompt: str
    modality: str
    num_frames: int
    extractor_version: str
    num_items: int
    format_version: int = FORMAT_VERSION
    extra: dict = dataclasses.field(default_factory=dict)

    def validate(self, where: str = SCHEMA_FILE) -> None:
        if self.dtype not in DTYPES:
            raise RecordError(f"{where}: dtype {self.dtype!r}, expected one of {DTYPES}")
        for key in ("layers", "hidden_size", "num_items"):
            value = getattr(self, key)
            least = 0 if key == "num_items" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise RecordError(f"{where}: {key} must be an integer >= {least}, got {value!r}")
        if not isinstance(self.extra, dict):
            raise RecordError(f"{where}: extra must be an object (JSON {{...}}), got {type(self.extra).__name__}")
        if self.format_version != FORMAT_VERSION:
            raise RecordError(
                f"{where}: format_version {self.format_version}, this reader understands {FORMAT_VERSION}"
            )


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Writes JSON to a temp file beside `path`, then renames it into place."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:  # a full disk or an interrupt: leave no half-written temporary behind
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def write_schema(directory: str | os.PathLike, schema: Schema) -> Path:
    schema.validate()
    path = Path(directory) / SCHEMA_FILE
    write_json_atomic(path, dataclasses.asdict(schema))
    return path


def read_schema(directory: str | os.PathLike) -> Schema:
    """Reads and validates `schema.json` in a feature folder.

    Raises:
      RecordError: naming the file on a missing file, bad JSON, or missing/unknown/invalid fields.
    """
    path = Path(directory) / SCHEMA_FILE
    if not path.is_file():
        raise RecordError(f"{path}: missing; a feature folder needs {SCHEMA_FILE} beside its *{SHARD_SUFFIX} shards")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RecordError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
    fields = {f.name for f in dataclasses.fields(Schema)}
    required = {
        f.name
        for f in dataclasses.fields(Schema)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    if not isinstance(raw, dict):
        raise RecordError(f"{path}: expected a JSON object")
    missing, unknown = sorted(required - raw.keys()), sorted(raw.keys() - fields)
    if missing or unknown:
        problems = [f"missing fields {missing}"] * bool(missing) + [f"unknown fields {unknown}"] * bool(unknown)
        raise RecordError(f"{path}: {', '.join(problems)} (a schema has the fields {sorted(fields)})")
    schema = Schema(**raw)
    schema.validate(str(path))
    return schema


def shard_files(directory: str | os.PathLike) -> list[Path]:
    """The finished shards of a feature folder, sorted by name (`.tmp` leftovers are not shards)."""
    return sorted(p for p in Path(directory).glob(f"*{SHARD_SUFFIX}") if p.is_file())

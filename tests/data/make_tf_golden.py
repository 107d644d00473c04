"""Writes the TensorFlow golden feature file, and checks that TensorFlow reads our files.

Run with real TensorFlow in a throwaway environment, never in the project's venv:

    python3 -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install tensorflow-cpu
    /tmp/tfvenv/bin/python tests/data/make_tf_golden.py            # writes tests/data/tf_golden.tfrecord
    /tmp/tfvenv/bin/python tests/data/make_tf_golden.py --check-ours PATH.tfrecord

The golden file holds GOLDEN_ITEMS below, written by `tf.io.TFRecordWriter` from `tf.train.Example`s with
the feature keys of `dff_jax/records.py` (item_id, hidden, dtype, shape). Every value is deterministic
(`golden_array`), so `tests/test_records.py` recomputes the expected arrays with numpy + ml_dtypes and
compares them bit for bit. bfloat16 bytes are taken with `tf.bitcast(..., tf.uint16)`, not
`tf.io.serialize_tensor` (which would wrap them in a TensorProto).

`--check-ours PATH` reads a file written by `dff_jax.records.ShardWriter` with `tf.data.TFRecordDataset` +
`tf.io.parse_single_example` + `tf.io.decode_raw` (the recipe in docs/tfdata.md) and prints each item.
"""

import argparse
from pathlib import Path

import numpy as np

# (item id, dtype, [layers, hidden]); ids are strings, including a non-ASCII one.
GOLDEN_ITEMS = [
    ("i1", "float32", (3, 5)),
    ("i2", "float16", (2, 7)),
    ("i3", "bfloat16", (4, 6)),
    ("vidéo-4", "bfloat16", (1, 8)),
    ("5", "float16", (33, 4)),
]


def golden_array(index: int, shape: tuple[int, int]) -> np.ndarray:
    """The float32 values of golden item `index`: exactly representable in bfloat16 and float16."""
    n = shape[0] * shape[1]
    values = (np.arange(n, dtype=np.float32) - n / 2) * 0.25 + index  # multiples of 1/4, small magnitudes
    return values.reshape(shape)


def write_golden(path: Path) -> None:
    import tensorflow as tf

    def feature_bytes(b):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[b]))

    with tf.io.TFRecordWriter(str(path)) as writer:
        for index, (item_id, dtype, shape) in enumerate(GOLDEN_ITEMS):
            tensor = tf.constant(golden_array(index, shape))
            if dtype == "bfloat16":
                raw = tf.bitcast(tf.cast(tensor, tf.bfloat16), tf.uint16).numpy().astype("<u2").tobytes()
            else:
                raw = tf.cast(tensor, getattr(tf, dtype)).numpy().astype(np.dtype(dtype).newbyteorder("<")).tobytes()
            example = tf.train.Example(
                features=tf.train.Features(
                    feature={
                        "item_id": feature_bytes(item_id.encode("utf-8")),
                        "hidden": feature_bytes(raw),
                        "dtype": feature_bytes(dtype.encode()),
                        "shape": tf.train.Feature(int64_list=tf.train.Int64List(value=list(shape))),
                    }
                )
            )
            writer.write(example.SerializeToString())
    print(f"wrote {path} ({path.stat().st_size} bytes) with TensorFlow {tf.__version__}")


def check_ours(path: Path) -> None:
    """Reads a dff_jax shard with tf.data only; raises if anything is off (TF checks the CRCs)."""
    import tensorflow as tf

    spec = {
        "item_id": tf.io.FixedLenFeature([], tf.string),
        "hidden": tf.io.FixedLenFeature([], tf.string),
        "dtype": tf.io.FixedLenFeature([], tf.string),
        "shape": tf.io.FixedLenFeature([2], tf.int64),
    }
    count = 0
    for serialized in tf.data.TFRecordDataset(str(path)):
        ex = tf.io.parse_single_example(serialized, spec)
        dtype = ex["dtype"].numpy().decode()
        tf_dtype = {"float32": tf.float32, "float16": tf.float16, "bfloat16": tf.bfloat16}[dtype]
        array = tf.reshape(tf.io.decode_raw(ex["hidden"], tf_dtype, little_endian=True), ex["shape"])
        values = tf.cast(array, tf.float32).numpy()
        print(ex["item_id"].numpy().decode("utf-8"), dtype, values.shape, float(values.sum()))
        count += 1
    print(f"TensorFlow {tf.__version__} read {count} records from {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "tf_golden.tfrecord")
    parser.add_argument("--check-ours", type=Path, default=None, help="a shard written by dff_jax to read with tf.data")
    args = parser.parse_args()
    if args.check_ours:
        check_ours(args.check_ours)
    else:
        write_golden(args.out)

"""The feature cache and the streamed, sharded placement of the frozen table (dff_jax/feature_cache.py)."""

import os

import numpy as np
import pytest

from dff_jax import bench, feature_cache, features, models, parallel, records
from dff_jax.features import FeatureError


def write_folder(path, num_items: int, layers: int, hidden: int, dtype: str = "bfloat16", shards: int = 3, seed=0):
    """Random rows of very different scales per (layer, dim), and one outlier item: standardising matters."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    scale = np.exp(rng.normal(size=(layers, hidden)) * 2)
    values = (rng.standard_normal((num_items, layers, hidden)) * scale + scale).astype(records.numpy_dtype(dtype))
    values[num_items // 2, 0, 0] = 1e4
    order = rng.permutation(num_items)
    for s, part in enumerate(np.array_split(order, shards)):
        with records.ShardWriter(path / f"part-{s}.tfrecord") as w:
            for i in part:
                w.write(f"i{i + 1}", values[i])
    records.write_schema(
        path,
        records.Schema(
            model="m",
            layers=layers,
            hidden_size=hidden,
            dtype=dtype,
            pooling="mean",
            prompt="",
            modality="video",
            num_frames=4,
            extractor_version="test",
            num_items=num_items,
        ),
    )
    return [""] + [f"i{i + 1}" for i in range(num_items)]


def one_device():
    mesh = parallel.make_mesh(parallel.ml_collections.ConfigDict({"model_axis": 1}))
    return parallel.replicated(mesh)


def load(fdir, item_ids, rows, **kw):
    said = []
    kw.setdefault("standardize", True)
    table, _ = feature_cache.load(fdir, item_ids, rows, one_device(), say=said.append, **kw)
    return np.asarray(table), said


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_placed_table_is_bit_identical_to_the_in_memory_path(tmp_path, dtype):
    """The cache keeps the selected rows item-aligned, and the placed, standardised table is the one
    models.standardized_table makes from load_features' table: the same statistics, the same bits."""
    item_ids = write_folder(tmp_path / "f", 70, 3, 8, dtype)
    order = [item_ids[0]] + item_ids[1:][::-1]  # another dataset order than the records'
    in_memory = features.load_features(tmp_path / "f", order, layers=[2, 0])
    # small blocks: several checksum blocks, a shard boundary inside one
    feature_cache.BLOCK_BYTES, old = 13 * 2 * 8 * np.dtype(in_memory.table.dtype).itemsize, feature_cache.BLOCK_BYTES
    try:
        raw, said = load(tmp_path / "f", order, [2, 0], standardize=False)
        placed, _ = load(tmp_path / "f", order, [2, 0])
    finally:
        feature_cache.BLOCK_BYTES = old
    assert said and "building the cache" in said[0]
    np.testing.assert_array_equal(raw.view(np.uint8), in_memory.table.view(np.uint8))
    expected = np.asarray(models.standardized_table(in_memory.table))
    assert placed.dtype == expected.dtype
    np.testing.assert_array_equal(placed.view(np.uint8), expected.view(np.uint8))


def test_stats_do_not_depend_on_the_piece_size():
    rng = np.random.default_rng(1)
    table = (rng.standard_normal((300, 3, 16)) * np.exp(rng.normal(size=(3, 16)))).astype(np.float32)
    whole = features.standardize_stats(table, chunk=64)
    pieces = features.standardize_stats(table, chunk=64, max_values=5 * 3 * 16)
    for a, b in zip(whole, pieces):
        np.testing.assert_array_equal(a, b)


def test_cache_is_reused_rebuilt_when_stale_and_refused_when_corrupt(tmp_path):
    item_ids = write_folder(tmp_path / "f", 40, 2, 4)
    first, said = load(tmp_path / "f", item_ids, [0, 1])
    assert len(said) == 1
    again, said = load(tmp_path / "f", item_ids, [0, 1])
    assert said == [] and np.array_equal(first, again)  # a restart reads the cache, builds nothing
    _, said = load(tmp_path / "f", item_ids, [1])  # other rows: a cache of their own
    assert said and len(list((tmp_path / "f" / feature_cache.DEFAULT_SUBDIR).glob("*.bin"))) == 2

    shard = tmp_path / "f" / "part-1.tfrecord"  # re-extracted: same bytes, new mtime
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    _, said = load(tmp_path / "f", item_ids, [0, 1])
    stale = "shard part-1.tfrecord was added, removed or rewritten (size, mtime or contents changed)"
    cache_dir = tmp_path / "f" / feature_cache.DEFAULT_SUBDIR
    assert said == [
        f"features: rebuilding the stale cache: {stale} in {cache_dir}",
        # the [1] cache is of the folder before the change: no load can use it again, so it goes
        f"features: deleted 1 stale cache(s) of {tmp_path / 'f'} in {cache_dir} (the folder changed since, or a "
        "build was killed)",
    ]
    assert len(list(cache_dir.glob("*.bin"))) == len(list(cache_dir.glob("*.json"))) == 1

    key = feature_cache.cache_key(tmp_path / "f", item_ids, [0, 1])
    bin_path, header = feature_cache._paths(tmp_path / "f" / feature_cache.DEFAULT_SUBDIR, key)
    with open(bin_path, "r+b") as f:  # one flipped bit inside the table
        f.seek(41 * 2 * 4 * 2 // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(
        feature_cache.CacheError, match=r"\.bin: block 0 \(rows 0\.\.40\) fails its checksum: the cache is corrupt"
    ):
        load(tmp_path / "f", item_ids, [0, 1])
    bin_path.write_bytes(b"short")  # truncated: rebuilt
    _, said = load(tmp_path / "f", item_ids, [0, 1])
    assert "is missing or not 656 bytes" in said[0]
    header.write_text("{not json")
    fixed, said = load(tmp_path / "f", item_ids, [0, 1])
    assert "header" in said[0] and "unreadable" in said[0] and np.array_equal(fixed, first)
    # Edited statistics were trusted (silently other numbers); a deleted field was a traceback.
    import json

    saved = json.loads(header.read_text())
    for edit in ({"stats": [[[0.0]], [[1.0]]]}, {"block_rows": 0}):
        header.write_text(json.dumps({**saved, **edit}))
        fixed, said = load(tmp_path / "f", item_ids, [0, 1])
        assert "does not match its checksum" in said[0] and np.array_equal(fixed, first)
    header.write_text(json.dumps({k: v for k, v in saved.items() if k != "block_crc32c"}))
    fixed, said = load(tmp_path / "f", item_ids, [0, 1])
    assert "does not match its checksum" in said[0] and np.array_equal(fixed, first)


def test_a_shard_rewritten_with_its_size_and_mtime_kept_is_seen(tmp_path):
    # Served from the stale cache before: the cache saw size and mtime only.
    item_ids = write_folder(tmp_path / "f", 40, 2, 4)
    first, _ = load(tmp_path / "f", item_ids, [0, 1])
    shard = tmp_path / "f" / "part-1.tfrecord"
    stat = shard.stat()
    payloads = list(records.iter_records(shard))
    item, array = records.decode_item(payloads[0])
    with records.ShardWriter(shard) as w:  # one record's values changed, same size
        w.write(item, (array.astype(np.float32) + 1).astype(array.dtype))
        for payload in payloads[1:]:
            w.write(*records.decode_item(payload))
    assert shard.stat().st_size == stat.st_size
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again, said = load(tmp_path / "f", item_ids, [0, 1])
    assert "shard part-1.tfrecord was added, removed or rewritten" in said[0] and not np.array_equal(again, first)


def test_a_float16_table_whose_z_scores_exceed_its_range_stays_finite():
    # One value of 100 in a dimension that is 0 elsewhere: z ~ 6e4-7e4, beyond float16's 65504 (an Inf table).
    out = np.zeros((2, 1, 2), np.float16)
    block = np.array([[[100.0, 1.0]], [[0.0, 1.0]]], np.float16)
    filled = np.asarray(models.fill_rows(out, block, np.int32(0), np.zeros((1, 2)), np.full((1, 2), 700.0)))
    assert np.isfinite(filled).all() and filled[0, 0, 0] == np.finfo(np.float16).max and filled[0, 0, 1] == 700


def test_a_failed_cache_build_on_process_0_is_one_error_on_the_others(tmp_path, monkeypatch):
    # Process 1 waited at the barrier, then died with a Gloo DEADLINE_EXCEEDED traceback.
    from jax.experimental import multihost_utils

    item_ids = write_folder(tmp_path / "f", 10, 1, 2)
    monkeypatch.setattr(feature_cache.jax, "process_count", lambda: 2)
    monkeypatch.setattr(feature_cache.jax, "process_index", lambda: 1)

    def barrier(name):
        raise RuntimeError("DEADLINE_EXCEEDED")

    monkeypatch.setattr(multihost_utils, "sync_global_devices", barrier)
    with pytest.raises(
        feature_cache.CacheError, match=r"process 1: another process stopped before the feature cache in .* was ready"
    ):
        feature_cache.ensure(tmp_path / "f", item_ids, [0])


def test_a_killed_build_leaves_no_table_sized_file_behind(tmp_path):
    import socket
    import subprocess
    import sys

    item_ids = write_folder(tmp_path / "f", 20, 2, 4)
    cache_dir = tmp_path / "f" / feature_cache.DEFAULT_SUBDIR
    cache_dir.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    killed = cache_dir / f".abc.bin.tmp-{host}-{int(dead.stdout)}"  # its process has exited
    running = cache_dir / f".def.bin.tmp-{host}-{os.getpid()}"  # a build in progress (this process)
    elsewhere = cache_dir / f".ghi.bin.tmp-otherhost-{int(dead.stdout)}"  # cannot be checked from here
    for path in (killed, running, elsewhere):
        path.write_bytes(b"x" * 64)
    _, said = load(tmp_path / "f", item_ids, [0, 1])
    assert not killed.exists() and running.exists() and elsewhere.exists()
    assert said[1].startswith("features: deleted 1 stale cache(s)")


def test_a_bad_feature_set_leaves_no_partial_cache(tmp_path):
    item_ids = write_folder(tmp_path / "f", 20, 2, 4)
    with pytest.raises(FeatureError, match=r"1 of 21 items have no features, e.g. ids \['i99'\]"):
        load(tmp_path / "f", item_ids + ["i99"], [0, 1])
    assert [p.name for p in (tmp_path / "f" / feature_cache.DEFAULT_SUBDIR).iterdir()] == []
    (tmp_path / "f" / "part-2.tfrecord").unlink()  # a missing shard: the record count disagrees with the schema
    with pytest.raises(FeatureError, match=r"num_items is 20 but the 2 shards hold"):
        load(tmp_path / "f", item_ids, [0, 1])
    blocked = tmp_path / "a-file"  # a cache folder that cannot be made (even for root, unlike a read-only one)
    blocked.write_text("")
    with pytest.raises(feature_cache.CacheError, match=r"cannot build the feature cache: .*features.cache_dir"):
        load(tmp_path / "f", item_ids[:10], [0], cache_dir=blocked / "c")


def _check_quarters(child, rows, layers, hidden):
    quarter_rows = rows % 4 == 0
    expected = [rows // 4, layers, hidden] if quarter_rows else [rows, layers, hidden // 4]
    assert child["shard_shapes"] == [expected] * 4
    assert child["spec"] == ("P('model',)" if quarter_rows else "P(None, None, 'model')")
    assert sum(child["shard_bytes"]) == child["table_bytes"]


def test_four_devices_each_hold_a_quarter_and_the_load_holds_little_beyond_the_shards(tmp_path):
    """model_axis=4 on 4 simulated devices: each device's shard is a quarter of the rows (or, when N+1 does not
    divide by 4, of the last dim). What the loading process holds beyond its placed shards (host RAM on CPU devices)
    and beyond a baseline (jax up, devices made, a jit run) is at most 0.35x the table plus a fixed part, both on
    the first load (which builds the cache from the records) and on a restart. The fixed part (compiled fills,
    the id list, allocator slack) is measured by the same load of a 16x smaller table. The old path held a whole
    host copy and a whole default-device copy on top of the shards: 2x the table."""
    layers, hidden = 8, 1024  # 16 KB rows (a 7B LVLM's 33 x 4096 are 270 KB): per-item bookkeeping stays small
    big, small = 12_799, 799  # 12,800 x 8 x 1024 bf16 = 210 MB; 800 rows = 13 MB
    runs = {}
    for name, num_items in (("small", small), ("big", big)):
        fdir = tmp_path / name
        fdir.mkdir()
        bench._write_bench_features(fdir, num_items, layers, hidden, "bfloat16", 4)
        for what in ("build", "restart") if name == "big" else ("build",):
            (child,) = bench.run_sharded_load(fdir, num_items, devices=4, model_axis=4, cache_dir=str(fdir / "c"))
            assert child["built_cache"] == (what == "build")
            _check_quarters(child, num_items + 1, layers, hidden)
            runs[name, what] = child["peak_rss_bytes"] - child["baseline_rss_bytes"] - sum(child["shard_bytes"])
    table_bytes = (big + 1) * layers * hidden * 2
    for what in ("build", "restart"):
        beyond = runs["big", what] - runs["small", "build"]
        assert beyond <= 0.35 * table_bytes, (what, {k: v / 1e6 for k, v in runs.items()})
    # rows that do not divide: the last dim is split, and each block is read once for all four devices
    (child,) = bench.run_sharded_load(tmp_path / "small", small - 1, devices=4, model_axis=4, cache_dir=str(tmp_path))
    _check_quarters(child, small, layers, hidden)


def test_two_processes_one_builds_the_cache_the_other_waits_and_both_place_their_shards(tmp_path):
    """2 processes x 2 simulated devices, model_axis=2 (mesh data=2 x model=2): process 0 builds the missing cache,
    process 1 waits at the barrier and reads it; each places only its own two devices' halves of the rows."""
    fdir = tmp_path / "features"
    fdir.mkdir()
    bench._write_bench_features(fdir, 799, 4, 64, "bfloat16", 2)
    children = bench.run_sharded_load(fdir, 799, devices=2, model_axis=2, processes=2, cache_dir=str(tmp_path / "c"))
    assert [c["process"] for c in children] == [0, 1]
    assert [c["built_cache"] for c in children] == [True, False]
    for child in children:
        assert child["spec"] == "P('model',)" and child["shard_shapes"] == [[400, 4, 64]] * 2


def test_a_cache_built_with_allow_missing_does_not_serve_a_run_without_it(tmp_path):
    """The same error with or without a cache (docs/protocol.md section 8)."""
    item_ids = write_folder(tmp_path / "f", 20, 2, 4) + ["i99"]
    load(tmp_path / "f", item_ids, [0, 1], allow_missing=True)  # builds a cache with i99 zero-filled
    with pytest.raises(FeatureError, match=r"1 of 21 items have no features, e.g. ids \['i99'\]"):
        load(tmp_path / "f", item_ids, [0, 1])
    load(tmp_path / "f", item_ids, [0, 1], allow_missing=True)  # still fine when allowed


def test_allow_missing_refuses_a_dataset_most_of_whose_items_have_no_features(tmp_path):
    item_ids = write_folder(tmp_path / "f", 4, 2, 4) + [f"x{k}" for k in range(5)]
    with pytest.raises(FeatureError, match=r"5 of 9 items have no features.*more than half"):
        load(tmp_path / "f", item_ids, [0, 1], allow_missing=True)


def test_a_cache_folder_that_is_a_file_is_named(tmp_path):
    item_ids = write_folder(tmp_path / "f", 10, 2, 4)
    (tmp_path / "afile").write_text("")
    with pytest.raises(feature_cache.CacheError, match=r"afile: .*is a file; expected a folder"):
        load(tmp_path / "f", item_ids, [0], cache_dir=tmp_path / "afile")


def test_a_header_that_cannot_be_written_leaves_no_table_file(tmp_path, monkeypatch):
    import errno

    item_ids = write_folder(tmp_path / "f", 10, 2, 4)

    def full_disk(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(feature_cache.records, "write_json_atomic", full_disk)
    with pytest.raises(feature_cache.CacheError, match="No space left on device"):
        load(tmp_path / "f", item_ids, [0])
    assert list((tmp_path / "f" / feature_cache.DEFAULT_SUBDIR).iterdir()) == []

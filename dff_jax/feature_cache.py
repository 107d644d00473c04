"""The frozen feature table streamed from an on-disk cache straight into each device's shard, never whole.

`load(features_dir, item_ids, rows, sharding, ...)` returns the model's frozen table `[N+1, len(rows), H]` as a
`jax.Array` laid out as `sharding` (rows on "model", or the last dim, or replicated: `parallel.item_spec`), already
z-scored per (layer, dimension) when `standardize` is set. It goes in two steps:

1. The cache: the selected rows of the feature set, item-aligned (row i = `item_ids[i]`, row 0 zeros), in the stored
   dtype, as one raw file `<key>.bin` beside a header `<key>.json` under the cache folder (config
   `features.cache_dir`, default `<features.dir>/dff_cache`). `<key>` is a digest of the feature folder, the
   dataset's item order and the rows, so runs reading other rows or another dataset keep their own caches. It is
   built once from the record shards by `features.load_features` (every check it makes: CRCs, schema, dtypes,
   NaN/Inf, duplicates, missing items) writing each record's row to the file with `os.pwrite`, so building holds
   one record in memory, not the table. The header records what it was made from (the schema, every shard's name,
   size, mtime and first and last MiB), a CRC32C per block of rows, its own checksum, and the standardisation statistics (`features.standardize_stats`
   read from the cache file: the same <= 1024-item sample and the same sums as from an in-memory table, so the
   numbers are those of the single-device path, computed in float64 pieces of at most 8 MB). A cache whose sources
   changed is stale and is rebuilt (one line says why); a header that cannot be read or a file of the wrong size is
   rebuilt; a block whose checksum fails while loading is refused with an `error:` naming the file and block.
   Building deletes the caches of the same feature folder made before it changed, and the temporary files of
   killed builds on this host (`prune_stale`), so neither leaves table-sized files behind.
2. The placement: for each of this process's devices, a zero array of its shard's shape is made on the device
   itself and filled chunk by chunk (chunks of one shape, about `BLOCK_BYTES`) from the cache file: read with
   `os.preadv` into one reused buffer, each block checksum-verified the first time it is read, then standardised
   and written in place on the device by `models.fill_rows` (a donated `dynamic_update_slice`), the function
   `models.standardized_table` uses, so the bits are the same; `jax.make_array_from_single_device_arrays` then
   assembles the global array. A chunk is read once and cut for every local device that holds part of it (the
   split-by-last-dimension fallback and replication read the file once). So a process holds its devices' shards
   plus a few chunks' worth of buffers, no device ever holds more than its shard, and no process ever materialises
   the whole table.

Multi-process: process 0 builds a missing or stale cache while the others wait at a barrier; a process that still
finds no valid cache afterwards (a cache folder that is not shared between hosts) builds its own copy. Writes go to
temporary files renamed into place, so concurrent builders never see half a cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import socket
from collections.abc import Sequence
from pathlib import Path

import google_crc32c
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

from dff_jax import features as features_lib
from dff_jax import models, records
from dff_jax.errors import UserError

CACHE_VERSION = 2  # 2: the header carries its own checksum, shards their first and last MiB
DEFAULT_SUBDIR = "dff_cache"
# Rows per checksum block and per placement read: about 4 MiB of stored values, so a 33 x 4096 bf16 row set reads
# 15 items at a time and a 4 x 64 one 8,192 (the "bounded chunk" a loading process holds beyond its shards: a
# chunk, a block to verify, the chunk's copy to a device).
BLOCK_BYTES = 4 << 20
IDENTICAL_KEPT = 100  # example pairs of identical items the header keeps (the count is kept whole)


class CacheError(UserError, ValueError):
    """A feature cache that cannot be used (corrupt block, unwritable folder); the message names the file."""


# ------------------------------------------------------------------------------------------------ the cache file


class RowFile:
    """A `[rows, layers, hidden]` table stored raw (C order) in a file, read and written without mapping it.

    Reads and writes go through `os.preadv` / `os.pwrite`, so what passes through here lands in the page cache and
    not in this process's resident memory (a memory map would count every touched page in the RSS). Supports what
    `features.load_features` (as `allocate`) and `features.standardize_stats` use: `t[row] = array`, `t[row]`,
    `t[start:stop]` and `t[int_array, layer]`.
    """

    def __init__(self, path: str | os.PathLike, shape: tuple[int, ...], dtype, *, create: bool = False):
        self.path, self.shape, self.dtype = Path(path), tuple(int(s) for s in shape), np.dtype(dtype)
        self.row_values = int(np.prod(self.shape[1:]))
        self.row_bytes = self.row_values * self.dtype.itemsize
        self.nbytes = self.shape[0] * self.row_bytes
        if create:
            with open(self.path, "wb") as f:
                f.truncate(self.nbytes)  # sparse zeros: padding and zero-filled items cost no disk blocks
        self.fd = os.open(self.path, os.O_RDWR if create else os.O_RDONLY)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def read_rows(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [start, stop) as `[stop - start, ...]` (into `out`'s first rows when given)."""
        count = stop - start
        if out is None:
            out = np.empty((count,) + self.shape[1:], self.dtype)
        view = out[:count]
        buffer = memoryview(view.reshape(-1).view(np.uint8))
        got = os.preadv(self.fd, [buffer], start * self.row_bytes)
        if got != count * self.row_bytes:
            raise CacheError(f"{self.path}: short read at rows {start}..{stop} (the cache file was truncated)")
        return view

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            return self.read_rows(int(key), int(key) + 1)[0]
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            if step != 1:
                raise ValueError("RowFile: only contiguous slices")
            return self.read_rows(start, max(start, stop))
        rows, layer = key  # (int array, layer): the sample standardize_stats takes quantiles of
        hidden = self.shape[2]
        out = np.empty((len(rows), hidden), self.dtype)
        size = hidden * self.dtype.itemsize
        for i, row in enumerate(np.asarray(rows)):
            os.preadv(self.fd, [memoryview(out[i].view(np.uint8))], int(row) * self.row_bytes + int(layer) * size)
        return out

    def __setitem__(self, row, value) -> None:
        data = np.ascontiguousarray(value, self.dtype)
        if data.size != self.row_values:
            raise ValueError(f"RowFile: row of {data.size} values, expected {self.row_values}")
        written = os.pwrite(self.fd, data.tobytes(), int(row) * self.row_bytes)
        if written != self.row_bytes:  # a full disk may write part of a row before it fails
            raise OSError(f"wrote {written} of {self.row_bytes} bytes of row {row} to {self.path}")


@dataclasses.dataclass
class Cache:
    """An opened, validated cache: the table file, its header (the JSON written by `build`) and its statistics."""

    table: RowFile
    header: dict
    mean: np.ndarray  # [L, H] float32 (features.standardize_stats)
    inv_std: np.ndarray
    _verified: set = dataclasses.field(default_factory=set)
    _scratch: np.ndarray | None = None

    @property
    def block_rows(self) -> int:
        return int(self.header["block_rows"])

    def read(self, start: int, stop: int, out: np.ndarray) -> np.ndarray:
        """Rows [start, stop) into `out`'s first rows. Every checksum block they touch is verified the first time
        it is read (the whole block, into a scratch buffer); rows of verified blocks are read directly."""
        if self._scratch is None:
            self._scratch = np.empty((self.block_rows,) + self.table.shape[1:], self.table.dtype)
        crcs = self.header["block_crc32c"]
        for block in range(start // self.block_rows, -(-stop // self.block_rows)):
            lo = block * self.block_rows
            hi = min(lo + self.block_rows, self.table.shape[0])
            a, b = max(lo, start), min(hi, stop)
            if block in self._verified:
                self.table.read_rows(a, b, out[a - start :])
                continue
            rows = self.table.read_rows(lo, hi, self._scratch)
            if _crc(rows) != crcs[block]:
                raise CacheError(
                    f"{self.table.path}: block {block} (rows {lo}..{hi - 1}) fails its checksum: the cache is "
                    f"corrupt; delete {self.table.path} and its .json header, and the next run rebuilds it"
                )
            self._verified.add(block)
            out[a - start : b - start] = rows[a - lo : b - lo]
        return out[: stop - start]


def _crc(rows: np.ndarray) -> int:
    """CRC32C of an array's bytes, without copying them."""
    return google_crc32c.extend(0, np.ascontiguousarray(rows).reshape(-1).view(np.uint8))


def default_dir(features_dir: str | os.PathLike) -> Path:
    return Path(features_dir) / DEFAULT_SUBDIR


def cache_key(features_dir: str | os.PathLike, item_ids: Sequence[str], rows: Sequence[int]) -> str:
    """Which cache a load uses: the feature folder, the item order and the stored rows kept (so one cache folder can
    serve several feature sets, datasets and row selections; what the files hold is checked by `open_cache`)."""
    digest = hashlib.sha256(json.dumps([str(Path(features_dir).resolve()), list(rows), len(item_ids)]).encode())
    for item in item_ids:
        digest.update(item.encode() + b"\0")
    return digest.hexdigest()


def sources(features_dir: Path) -> dict:
    """What a cache was made from, compared on every open: the schema and every shard's name, size, mtime and a
    digest of its first and last MiB (what `features.fingerprint` reads: a rewrite that keeps size and mtime is
    still seen unless it changes only the middle of a shard over 2 MiB; docs/protocol.md section 8)."""
    return {
        "schema": json.loads((features_dir / records.SCHEMA_FILE).read_text()),
        "shards": [
            [shard.name, shard.stat().st_size, shard.stat().st_mtime_ns, _ends_digest(shard)]
            for shard in records.shard_files(features_dir)
        ],
    }


def _ends_digest(path: Path) -> str:
    digest = hashlib.sha256()
    records.update_with_ends(digest, path)
    return digest.hexdigest()


def _header_digest(header: dict) -> str:
    """The header's own checksum: its statistics and block checksums decide what a run computes."""
    body = {k: v for k, v in header.items() if k != "header_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _paths(cache_dir: Path, key: str) -> tuple[Path, Path]:
    return cache_dir / f"{key[:24]}.bin", cache_dir / f"{key[:24]}.json"


def open_cache(features_dir: Path, cache_dir: Path, key: str) -> tuple[Cache | None, str]:
    """(the cache, "") when a valid one exists, else (None, why not) with why = "" when there is none at all."""
    bin_path, header_path = _paths(cache_dir, key)
    if not header_path.exists():
        return None, ""
    try:
        header = json.loads(header_path.read_text())
        shape, dtype = tuple(header["shape"]), records.numpy_dtype(header["dtype"])
        stats = np.asarray(header["stats"], np.float32)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return None, f"its header {header_path} is unreadable ({e})"
    if header.get("version") != CACHE_VERSION or header.get("key") != key:
        return None, f"{header_path} is of another cache version or key"
    if header.get("header_sha256") != _header_digest(header):  # edited or damaged: its stats would be trusted
        return None, f"its header {header_path} does not match its checksum"
    now = sources(features_dir)
    if header.get("schema") != now["schema"]:
        return None, f"{features_dir / records.SCHEMA_FILE} changed"
    if header.get("shards") != now["shards"]:
        old = {n: rest for n, *rest in header.get("shards", [])}
        new = {n: rest for n, *rest in now["shards"]}
        changed = sorted(set(old) ^ set(new)) + sorted(n for n in set(old) & set(new) if old[n] != new[n])
        return None, f"shard {changed[0]} was added, removed or rewritten (size, mtime or contents changed)"
    expected = int(np.prod(shape)) * dtype.itemsize
    if not bin_path.is_file() or bin_path.stat().st_size != expected:
        return None, f"{bin_path} is missing or not {expected} bytes"
    return Cache(RowFile(bin_path, shape, dtype), header, stats[0], stats[1]), ""


def _discard(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def prune_stale(features_dir: Path, cache_dir: Path, now: dict, keep: Path, say=print) -> int:
    """Deletes the caches in `cache_dir` made from `features_dir` as it no longer is (its schema or shards changed
    since): no load can use them again, and each is the size of a table (another row selection or item order of
    the same, unchanged folder keeps its cache; `keep`, the header of the cache being rebuilt, is left to the
    rebuild). Returns how many were deleted."""
    deleted = 0
    for header_path in sorted(cache_dir.glob("*.json")):
        if header_path == keep:
            continue
        try:
            header = json.loads(header_path.read_text())
            made_from = header["features_dir"], header["schema"], header["shards"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a cache header of ours: leave it
        if made_from[0] != str(features_dir.resolve()) or made_from[1:] == (now["schema"], now["shards"]):
            continue
        _discard(header_path)  # the header first: a half-deleted cache then reads as no cache, not a wrong one
        _discard(header_path.with_suffix(".bin"))
        deleted += 1
    # A build killed midway (kill -9, a lost node) leaves its table-sized temporary file: delete those of this host
    # whose process is gone (another host's cannot be checked from here, so they stay).
    host = socket.gethostname()
    for tmp in cache_dir.glob(f".*.bin.tmp-{host}-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            _discard(tmp)
            deleted += 1
    if deleted:
        say(
            f"features: deleted {deleted} stale cache(s) of {features_dir} in {cache_dir} (the folder changed "
            "since, or a build was killed)"
        )
    return deleted


def build(
    features_dir: Path,
    cache_dir: Path,
    key: str,
    item_ids: Sequence[str],
    rows: Sequence[int],
    allow_missing: bool,
    say=print,
) -> Cache:
    """Reads the record shards once into a new cache file (temporary name, renamed when complete)."""
    bin_path, header_path = _paths(cache_dir, key)
    tmp = cache_dir / f".{bin_path.name}.tmp-{socket.gethostname()}-{os.getpid()}"
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        before = sources(features_dir)  # taken before reading: a shard rewritten meanwhile makes the cache stale
        prune_stale(features_dir, cache_dir, before, header_path, say)  # frees their disk before this one is written
        made: list[RowFile] = []

        def allocate(shape, dtype):
            made.append(RowFile(tmp, shape, dtype, create=True))
            return made[0]

        loaded = features_lib.load_features(
            features_dir, item_ids, layers=rows, allow_missing=allow_missing, allocate=allocate
        )
        table = made[0]
        mean, inv_std = features_lib.standardize_stats(table)
        block_rows = max(1, BLOCK_BYTES // table.row_bytes)
        buffer = np.empty((block_rows,) + table.shape[1:], table.dtype)
        crcs = []
        for lo in range(0, table.shape[0], block_rows):
            block = table.read_rows(lo, min(lo + block_rows, table.shape[0]), buffer)
            crcs.append(_crc(block))
        os.fsync(table.fd)
        table.close()
        header = {
            "version": CACHE_VERSION,
            "key": key,
            "features_dir": str(features_dir.resolve()),
            **before,
            "rows": list(rows),
            "shape": list(table.shape),
            "dtype": loaded.schema.dtype,
            "block_rows": block_rows,
            "block_crc32c": crcs,
            "missing": loaded.missing,
            "missing_examples": loaded.missing_examples,
            "content_digest": loaded.content_digest,
            "unused": loaded.unused,
            "records": loaded.records,
            "files": loaded.files,
            "identical": loaded.identical[:IDENTICAL_KEPT],
            "num_identical": loaded.num_identical,
            "stats": [mean.tolist(), inv_std.tolist()],
        }
        header["header_sha256"] = _header_digest(header)
        header_path.unlink(missing_ok=True)  # the old header must never describe the new file
        os.replace(tmp, bin_path)
        records.write_json_atomic(header_path, header)
    except OSError as e:
        _discard(tmp)
        _discard(bin_path)  # a header that failed to write leaves no table-sized file without one (the key's old
        # table, if any, was stale: build runs only when open_cache refused it)
        raise CacheError(
            f"{cache_dir}: cannot build the feature cache: {e} (if the folder is read-only, set "
            "config.features.cache_dir to a writable one: --config.features.cache_dir for train and study, the "
            "run's config.json for evaluate and recommend)"
        ) from None
    except BaseException:  # a bad record (FeatureError) or an interrupt: leave no partial file behind
        _discard(tmp)
        raise
    cache, why = open_cache(features_dir, cache_dir, key)
    if cache is None:
        raise CacheError(f"{header_path}: the cache just written does not validate: {why}")
    return cache


def ensure(
    features_dir: str | os.PathLike,
    item_ids: Sequence[str],
    rows: Sequence[int],
    *,
    cache_dir: str | os.PathLike = "",
    allow_missing: bool = False,
    say=print,
) -> Cache:
    """The valid cache of `rows` of the feature set for this item order, built (or rebuilt) when needed."""
    features_dir = Path(features_dir)
    cache_dir = Path(cache_dir) if cache_dir else default_dir(features_dir)
    if cache_dir.exists() and not cache_dir.is_dir():
        raise CacheError(
            f"{cache_dir}: the feature cache folder (config.features.cache_dir) is a file; expected a folder"
        )
    key = cache_key(features_dir, item_ids, rows)
    multi = jax.process_count() > 1
    cache = None
    if not multi or jax.process_index() == 0:
        cache, why = open_cache(features_dir, cache_dir, key)
        if cache is None:
            say(f"features: {'rebuilding the stale cache: ' + why if why else 'building the cache'} in {cache_dir}")
            cache = build(features_dir, cache_dir, key, item_ids, rows, allow_missing, say)
    if multi:
        from jax.experimental import multihost_utils

        try:
            multihost_utils.sync_global_devices("dff_jax feature cache")
        except Exception as e:  # a process stopped (its own error line says why) and never reached the barrier
            raise CacheError(
                f"process {jax.process_index()}: another process stopped before the feature cache in {cache_dir} was "
                f"ready (see its error line; {type(e).__name__} at the barrier)"
            ) from None
        if cache is None:
            cache, why = open_cache(features_dir, cache_dir, key)
            if cache is None:  # a cache folder not shared with process 0
                say(f"features: process {jax.process_index()} builds its own cache in {cache_dir} ({why or 'none'})")
                cache = build(features_dir, cache_dir, key, item_ids, rows, allow_missing, say)
    try:  # a cache built by a run that allowed missing items must not serve one that does not
        # (docs/protocol.md section 8)
        h = cache.header
        features_lib.check_missing(
            features_dir, h["missing"], len(item_ids) - 1, h.get("missing_examples", []), allow_missing
        )
    except features_lib.FeatureError:
        cache.table.close()
        raise
    return cache


# --------------------------------------------------------------------------------------------------- placement


def place(cache: Cache, sharding: jax.sharding.Sharding, *, standardize: bool) -> jax.Array:
    """The cached table as a global array laid out as `sharding`, each local shard filled block by block."""
    shape, dtype = cache.table.shape, cache.table.dtype
    index_map = sharding.addressable_devices_indices_map(shape)
    by_rows: dict[tuple[int, int], list] = {}  # row range -> [(device, index)]: each range is read once
    for device, index in index_map.items():
        start, stop, _ = index[0].indices(shape[0])
        by_rows.setdefault((start, stop), []).append((device, index))
    shards = {}
    for (start, stop), holders in by_rows.items():
        fills = {}
        for device, index in holders:
            rest = tuple(index[1:])
            local = (stop - start,) + tuple(len(range(*s.indices(n))) for s, n in zip(rest, shape[1:]))
            mean, inv_std = (jax.device_put(np.ascontiguousarray(a[rest]), device) for a in (cache.mean, cache.inv_std))
            # made on the device itself: jnp.zeros(..., device=d) builds on the default device and copies
            zeros = jax.jit(functools.partial(jnp.zeros, local, dtype), out_shardings=SingleDeviceSharding(device))()
            fills[device] = [zeros, rest, mean, inv_std]
        # Chunks of one shape (the last one shifted back to end at the shard's end, rewriting a few rows with the
        # same values), so the fill compiles once per device, whatever the shard and block boundaries.
        size = min(cache.block_rows, stop - start)
        buffer = np.empty((size,) + shape[1:], dtype)
        for lo in range(0, stop - start, size):
            lo = min(lo, stop - start - size)
            rows = cache.read(start + lo, start + lo + size, buffer)
            for device, fill in fills.items():
                out, rest, mean, inv_std = fill
                part = jax.device_put(np.ascontiguousarray(rows[(slice(None),) + rest]), device)
                fill[0] = models.fill_rows(out, part, np.int32(lo), mean, inv_std, standardize=standardize)
            # the next chunk reuses the read buffer: finish this chunk's copies to the devices first
            jax.block_until_ready([fill[0] for fill in fills.values()])
        for device, fill in fills.items():
            shards[device] = fill[0]
    arrays = [shards[device] for device in index_map]
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def load(
    features_dir: str | os.PathLike,
    item_ids: Sequence[str],
    rows: Sequence[int],
    sharding: jax.sharding.Sharding,
    *,
    standardize: bool,
    cache_dir: str | os.PathLike = "",
    allow_missing: bool = False,
    say=print,
) -> tuple[jax.Array, Cache]:
    """(the placed table, its cache): `ensure` then `place` (module docstring)."""
    cache = ensure(features_dir, item_ids, rows, cache_dir=cache_dir, allow_missing=allow_missing, say=say)
    try:
        return place(cache, sharding, standardize=standardize), cache
    finally:
        cache.table.close()


def shard_bytes(array: jax.Array) -> list[int]:
    """Bytes of each of this process's shards of `array` (what each local device holds of it)."""
    return [int(s.data.nbytes) for s in array.addressable_shards]

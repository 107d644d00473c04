"""Interactions, the MicroLens evaluation protocol, and batch iterators.

Readers turn an interaction file into time-ordered (user, item, timestamp) records; `build_dataset` applies the
MicroLens official protocol (docs/protocol.md, section 2) with every knob in `config.data`;
`train_batches` / `eval_batches` yield fixed-shape dicts of numpy arrays (so a jitted step compiles once).

Choices made where the official code leaves room (all documented here once):

* Items are re-indexed 1..N in order of first appearance in the kept sequences, read user by user (users in order
  of first appearance in the file, each user's items in time order). For a MicroLens `*_pairs.tsv` this is plain
  file order. MicroLens itself numbers them in the order of its item file; only the numbering differs.
* A MicroLens tsv has no timestamps; as in MicroLens's IDRec pipeline the position in the row is the time.
* Time sorting is stable, so interactions with equal timestamps keep their file order.
* CSVs: a header row is recognised by its column names and mapped by name; without one the columns are taken as
  (user, item, timestamp). NineRec's pair files are described both ways round (README: user, item, ts;
  get_behaviour.py: video_id, user_id, timestamp; protocol section 7): check the file and set config.data.columns.
* Users with fewer than 3 items after the window are kept for training only (no valid/test row).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from dff_jax import records
from dff_jax.errors import UserError

FORMATS = ("auto", "microlens_tsv", "microlens_csv", "ninerec", "csv", "movielens")
# What to do with rows that repeat another row exactly (same user, item and timestamp; config.data.duplicates).
# Such a row cannot be a second consumption, so it is an export artefact; kept, it puts a user's last item into its
# own history, where evaluation masks it, and every such user becomes a miss (a CSV written twice scored test
# HR@10 0.0). Hence "drop" (with the count in the statistics) by default; "error" stops, "keep" reads them as data.
DUPLICATE_POLICIES = ("drop", "error", "keep")
_INT64 = (-(2**63), 2**63 - 1)
# C0 control characters but tab, and DEL: never part of an id or a number; a NUL usually means a binary or
# UTF-16 file, and an id holding one would print as something else in recommend's tab-separated output.
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f]")
# Header names accepted for each column of a CSV (lower-cased). NineRec's get_behaviour.py calls them
# video_id / user_id / timestamp (protocol section 7), MicroLens's csv user / item / timestamp.
_COLUMN_NAMES = {
    "user": {"user", "user_id", "userid", "uid", "user id"},
    "item": {"item", "item_id", "itemid", "iid", "video_id", "video", "movie_id", "movieid", "item id"},
    "timestamp": {"timestamp", "time", "ts", "unix_time", "unixtime"},
}


class DataError(UserError, ValueError):
    """An interaction file or protocol setting that cannot be used; the message names the file and line."""


@dataclasses.dataclass
class Interactions:
    """Interaction records sorted by time (stable: ties keep file order).

    Attributes:
      users: [n] object array of raw user ids (str).
      items: [n] object array of raw item ids (str).
      timestamps: [n] int64 (for a MicroLens tsv: the position in the user's row).
      path: the file they were read from.
      file_order: [n] int64 position of each record in the file (0 = first), used for first-seen orders.
      duplicates: rows of the file that repeated another (user, item, timestamp) exactly (`DUPLICATE_POLICIES`).
    """

    users: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray
    path: str
    file_order: np.ndarray | None = None
    duplicates: int = 0

    def __post_init__(self):
        if self.file_order is None:
            self.file_order = np.arange(len(self.users), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.users)


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yields (1-based line number, text without the newline), failing clearly on non-UTF-8 bytes."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: line {number}: expected UTF-8 text ({e.reason})") from None
            if number == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark (Excel's UTF-8 CSV) is not part of the data
            line = line.rstrip("\r\n")
            _check_controls(path, number, line)
            yield number, line


def _check_controls(path, number: int, line: str) -> None:
    """Refuses a line holding a control character (`_CONTROL`), naming it; a CR means CR-only line endings."""
    control = _CONTROL.search(line)
    if control and control.group() == "\r":  # one "line" holding the whole file: old Mac line endings
        raise DataError(
            f"{path}: line {number}: lines end in CR only (old Mac line endings); convert the file to LF "
            "line endings, e.g. tr '\\r' '\\n'"
        )
    if control:
        raise DataError(
            f"{path}: line {number}: control character {control.group()!r} at column {control.start() + 1}; "
            "expected UTF-8 text (a NUL usually means a binary or UTF-16 file)"
        )


def _int_timestamp(path, number, text) -> int:
    try:
        value = int(text)
    except ValueError:
        try:  # an integral float ("1609459200.0", as spreadsheets and pandas write them) is the same instant
            as_float = float(text)
        except ValueError:
            as_float = math.nan
        if not (math.isfinite(as_float) and as_float.is_integer()):
            raise DataError(f"{path}: line {number}: expected an integer timestamp, got {text!r}") from None
        value = int(as_float)
    if not _INT64[0] <= value <= _INT64[1]:
        raise DataError(f"{path}: line {number}: timestamp {text} is outside the 64-bit integer range")
    return value


def _read_microlens_tsv(path: Path):
    """`user<TAB>item item ...` per line, items in time order, no header (protocol section 1)."""
    users, items, times, seen = [], [], [], {}
    intern = {}.setdefault  # one shared str per distinct id: less memory, cache-friendly grouping later
    for number, line in _lines(path):
        if not line.strip():
            continue  # blank lines (e.g. a trailing one) carry no interactions
        parts = line.split("\t")
        row = parts[1].split() if len(parts) == 2 else []
        if len(parts) != 2 or not parts[0].strip() or not row:
            raise DataError(f"{path}: line {number}: expected 'user<TAB>item item ...', got {line[:80]!r}")
        user = parts[0].strip()
        comma = next((item for item in row if "," in item), None)
        if comma is not None:  # "i1,i2,i3": items are separated by spaces; with commas they would be one id
            raise DataError(
                f"{path}: line {number}: item {comma[:40]!r} holds a comma; expected 'user<TAB>item item ...' with "
                "items separated by spaces"
            )
        if number == 1 and user.lower() in _COLUMN_NAMES["user"]:
            raise DataError(
                f"{path}: line 1: {line[:80]!r} looks like a header; a MicroLens *_pairs.tsv has none "
                "(remove the line, or give a CSV with a user,item,timestamp header)"
            )
        if user in seen:
            raise DataError(
                f"{path}: line {number}: user {user!r} already had a row on line {seen[user]}; "
                "expected one row per user in a *_pairs.tsv"
            )
        seen[user] = number
        users.extend([user] * len(row))
        items.extend(map(intern, row, row))
        times.extend(range(len(row)))  # the position in the row is the time (MicroLens IDRec process_data)
    return users, items, times


def _header_columns(path, fields: list[str]) -> list[str] | None:
    """Maps a header row to column roles, or None when the row is data."""
    names = [f.strip().lower() for f in fields]
    known = set().union(*_COLUMN_NAMES.values())
    if not any(n in known for n in names):
        return None
    roles = []
    for n in names:
        role = next((r for r, aliases in _COLUMN_NAMES.items() if n in aliases), "")
        roles.append(role)
    if any(roles.count(r) != 1 for r in _COLUMN_NAMES):
        raise DataError(
            f"{path}: line 1: header {fields} must name exactly one user, item and timestamp column "
            f"(accepted names: { {r: sorted(a) for r, a in _COLUMN_NAMES.items()} }); "
            "or set config.data.columns, e.g. 'item,user,timestamp'"
        )
    return roles


def _parse_columns(columns: str) -> list[str]:
    roles = [c.strip().lower() for c in columns.split(",")]
    if any(roles.count(r) != 1 for r in _COLUMN_NAMES):
        raise DataError(
            f"config.data.columns={columns!r}: expected a comma-separated column order naming user, item and "
            "timestamp exactly once (other names mark ignored columns), e.g. 'item,user,timestamp'"
        )
    return roles


def _read_csv(path: Path, columns: str = ""):
    """`user,item,timestamp` rows. A header row is detected by its column names and mapped by name; without one
    the order is (user, item, timestamp) unless `columns` says otherwise (NineRec's pair files disagree with
    their README about the order: protocol section 7)."""
    with open(path, "rb") as f:
        first = f.readline().decode("utf-8", errors="replace").rstrip("\r\n").removeprefix("\ufeff")
    _check_controls(path, 1, first)  # before csv parses it: a CR inside is CR-only line endings
    header = _header_columns(path, next(csv.reader([first]), []))
    roles = _parse_columns(columns) if columns else header or ["user", "item", "timestamp"]
    if columns and header is not None and _placed(roles) != _placed(header):  # one says user where the other says item
        raise DataError(
            f"{path}: line 1: header {first[:80]!r} contradicts config.data.columns={columns!r}; "
            "remove the header or set config.data.columns='' (a header is mapped by name)"
        )
    iu, ii, it = (roles.index(r) for r in ("user", "item", "timestamp"))
    expected = ",".join(r or "_" for r in roles)
    users, items, times = [], [], []
    intern = {}.setdefault  # one shared str per distinct id (see _read_microlens_tsv)
    lines = _lines(path)
    reader = csv.reader(line for _, line in lines)
    end = 0  # the line the previous row ended on
    for fields in reader:
        start, end = end + 1, reader.line_num
        if end > start:  # the lines come without their ends: a quoted field over lines would join them silently
            raise DataError(
                f"{path}: line {start}: a quoted field runs on over {end - start + 1} lines (to line {end}); "
                "expected one interaction per line (an unbalanced quote?)"
            )
        number = end
        if number == 1 and header is not None:
            continue
        if not fields or (len(fields) == 1 and not fields[0].strip()):
            continue  # blank line
        if len(fields) != len(roles):
            raise DataError(f"{path}: line {number}: expected {len(roles)} fields '{expected}', got {fields[:8]}")
        user, item = fields[iu].strip(), fields[ii].strip()
        if not user or not item:
            raise DataError(f"{path}: line {number}: expected non-empty user and item ids, got {fields}")
        if any(c.isspace() for c in item):  # recommend --history separates ids by whitespace
            raise DataError(
                f"{path}: line {number}: item id {item!r} holds whitespace; expected ids without spaces (a history "
                "is a whitespace-separated list of ids); replace the spaces, e.g. by '_'"
            )
        users.append(intern(user, user))
        items.append(intern(item, item))
        times.append(_int_timestamp(path, number, fields[it].strip()))
    return users, items, times


def _placed(roles: list[str]) -> dict[str, int]:
    """The column of each of user, item and timestamp (other columns are ignored either way)."""
    return {r: roles.index(r) for r in _COLUMN_NAMES}


def _read_movielens(path: Path, min_rating: float = 0):
    """MovieLens `u.data` (`user<TAB>item<TAB>rating<TAB>ts`) or `ratings.dat` (`user::item::rating::ts`).
    Ratings below `min_rating` are dropped (0 keeps all: implicit feedback as in the SASRec papers)."""
    users, items, times = [], [], []
    intern = {}.setdefault  # one shared str per distinct id (see _read_microlens_tsv)
    sep = None
    for number, line in _lines(path):
        if not line.strip():
            continue
        if sep is None:
            sep = "::" if "::" in line else "\t"
        fields = line.split(sep)
        if len(fields) != 4:
            what = "user::item::rating::timestamp" if sep == "::" else "user<TAB>item<TAB>rating<TAB>timestamp"
            raise DataError(f"{path}: line {number}: expected '{what}', got {line[:80]!r}")
        try:
            rating = float(fields[2])
        except ValueError:
            raise DataError(f"{path}: line {number}: expected a numeric rating, got {fields[2]!r}") from None
        if not math.isfinite(rating):  # NaN passes `rating < min_rating` as False: it would be kept
            raise DataError(f"{path}: line {number}: expected a finite rating, got {fields[2]!r}")
        ts = _int_timestamp(path, number, fields[3].strip())
        if rating < min_rating:
            continue
        user, item = fields[0].strip(), fields[1].strip()
        users.append(intern(user, user))
        items.append(intern(item, item))
        times.append(ts)
    return users, items, times


def detect_format(path: str | os.PathLike) -> str:
    """The reader for a file, by its name (MicroLens, NineRec and MovieLens file names; other `.csv` = generic)."""
    name = Path(path).name
    lower = name.lower()
    if lower.endswith("_pairs.tsv"):
        return "microlens_tsv"
    if lower.endswith("_pairs.csv"):
        return "microlens_csv"
    if lower.endswith("_pair.csv"):
        return "ninerec"
    if lower == "u.data" or lower == "ratings.dat":
        return "movielens"
    if lower.endswith(".csv"):
        return "csv"
    raise DataError(
        f"{path}: cannot tell the format from the file name {name!r}; expected *_pairs.tsv (MicroLens), "
        "*_pairs.csv (MicroLens), *_pair.csv (NineRec), u.data or ratings.dat (MovieLens) or a .csv with a "
        f"user,item,timestamp header; or set config.data.format to one of {FORMATS[1:]}"
    )


def read_interactions(
    path, fmt: str = "auto", *, columns: str = "", min_rating: float = 0, duplicates: str = "drop"
) -> Interactions:
    """Reads an interaction file and sorts it by time.

    Args:
      path: the file.
      fmt: one of FORMATS; "auto" picks by file name (`detect_format`).
      columns: column order for CSVs without a header, e.g. "item,user,timestamp" (a header must agree with it).
      min_rating: MovieLens only; drop ratings below it (0 keeps all).
      duplicates: rows repeating another (user, item, timestamp) exactly: one of DUPLICATE_POLICIES.

    Returns:
      Interactions sorted by timestamp with a stable sort (ties keep file order); `duplicates` holds how many exact
      duplicate rows the file had.

    Raises:
      DataError: missing file, unknown format, malformed line (naming the line), or no interactions.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: interaction file not found")
    if fmt not in FORMATS:
        raise DataError(f"{path}: unknown format {fmt!r}; expected one of {FORMATS}")
    if fmt == "auto":
        fmt = detect_format(path)
    if columns and fmt in ("microlens_tsv", "movielens"):
        raise DataError(f"{path}: config.data.columns={columns!r} applies to CSV formats only, not {fmt}")
    if min_rating and fmt != "movielens":
        raise DataError(f"{path}: config.data.min_rating={min_rating} needs ratings (movielens format), not {fmt}")
    if fmt == "microlens_tsv":
        users, items, times = _read_microlens_tsv(path)
    elif fmt == "movielens":
        users, items, times = _read_movielens(path, min_rating)
    else:
        users, items, times = _read_csv(path, columns)
    if not users:
        why = f" with rating >= {min_rating}" if fmt == "movielens" and min_rating else ""
        raise DataError(f"{path}: no interactions{why} found (format {fmt})")
    users, items, times, repeated = _handle_duplicates(path, users, items, times, duplicates)
    timestamps = np.asarray(times, dtype=np.int64)
    order = np.argsort(timestamps, kind="stable")
    return Interactions(
        users=np.asarray(users, dtype=object)[order],
        items=np.asarray(items, dtype=object)[order],
        timestamps=timestamps[order],
        path=str(path),
        file_order=order.astype(np.int64),
        duplicates=repeated,
    )


def _handle_duplicates(path, users, items, times, policy: str):
    """Applies the duplicate-row policy (DUPLICATE_POLICIES); returns the rows and how many were exact repeats."""
    if policy not in DUPLICATE_POLICIES:
        raise DataError(f"config.data.duplicates={policy!r}: expected one of {DUPLICATE_POLICIES}")
    seen, first_dup = set(), None
    keep = []
    for i, key in enumerate(zip(users, items, times)):
        if key in seen:
            keep.append(False)
            first_dup = key if first_dup is None else first_dup
        else:
            seen.add(key)
            keep.append(True)
    repeated = len(keep) - len(seen)
    if repeated and policy == "error":
        user, item, ts = first_dup
        raise DataError(
            f"{path}: {repeated} rows repeat another row exactly (e.g. user {user!r}, item {item!r}, time {ts}); "
            "set config.data.duplicates='drop' to read each once"
        )
    if repeated and policy == "drop":
        users = [u for u, k in zip(users, keep) if k]
        items = [x for x, k in zip(items, keep) if k]
        times = [t for t, k in zip(times, keep) if k]
    return users, items, times, repeated


@dataclasses.dataclass
class Dataset:
    """The protocol's output (see the module docstring and `build_dataset`)."""

    item_ids: list[str]  # index -> raw item id; item_ids[0] == "" (padding)
    user_ids: list[str]  # kept users in first-seen order
    train_seqs: list[np.ndarray]  # per kept user, int32 item indices used for training
    valid: dict[str, np.ndarray]  # users [U], inputs [U, L], targets [U], history [U, H]
    test: dict[str, np.ndarray]
    item_counts: np.ndarray  # [num_items + 1] int64 counted on train_seqs
    stats: dict
    _cache: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def num_items(self) -> int:
        return len(self.item_ids) - 1

    def train_arrays(self, max_seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """[U, L] inputs and targets, one row per user, computed once per L.

        A row is the last L + 1 train items, left-padded: inputs = those[:-1], targets = those[1:], and a target is
        0 wherever its input is padding (MicroLens utils/dataset.py log_mask), so a 1-item sequence has no target.
        """
        if max_seq_len not in self._cache:
            lengths = np.array([len(s) for s in self.train_seqs], dtype=np.int64)
            flat = np.concatenate(self.train_seqs) if self.train_seqs else np.zeros(0, np.int32)
            window = _right_aligned(flat, np.cumsum(lengths) - lengths, lengths, max_seq_len + 1)
            inputs = window[:, :-1]
            targets = np.where(inputs > 0, window[:, 1:], 0).astype(np.int32)
            self._cache[max_seq_len] = (np.ascontiguousarray(inputs), targets)
        return self._cache[max_seq_len]


def _right_aligned(flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray, width: int) -> np.ndarray:
    """[U, width] int32: the last `width` items of each sequence flat[start:start+length], left-padded with 0."""
    offsets = np.arange(width) - width  # -width .. -1 from each sequence's end
    index = (starts + lengths)[:, None] + offsets[None, :]
    valid = offsets[None, :] >= -lengths[:, None]
    out = np.zeros((len(starts), width), dtype=np.int32)
    out[valid] = flat[index[valid]]
    return out


def _left_aligned(flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """[U, max(lengths)] int32: each sequence from the left, 0-padded on the right (a masking set, order unused)."""
    width = int(lengths.max()) if len(lengths) else 0
    cols = np.arange(width)
    valid = cols[None, :] < lengths[:, None]
    out = np.zeros((len(starts), width), dtype=np.int32)
    out[valid] = flat[(starts[:, None] + cols[None, :])[valid]]
    return out


def _codes(values: np.ndarray) -> tuple[np.ndarray, list]:
    """Integer codes in order of first appearance, without sorting strings."""
    values = values.tolist()  # iterating a list is much faster than iterating an object array
    vocab = list(dict.fromkeys(values))  # dicts keep insertion order: first appearance
    index = {v: i for i, v in enumerate(vocab)}
    return np.fromiter(map(index.__getitem__, values), dtype=np.int64, count=len(values)), vocab


def build_dataset(data_cfg, *, verbose: bool = True) -> Dataset:
    """Reads `data_cfg.dir / data_cfg.interactions` and applies the MicroLens protocol (protocol section 2).

    Steps: (1) group each user's interactions in time order; (2) drop users with < min_seq_len items (0 = off);
    (3) keep each user's last `window` items (0 = all); (4) users with < 3 items left are training-only;
    (5) re-index the surviving items 1..N (module docstring); (6) train = seq[:-2] (training-only users: all of
    seq); valid = seq[:-2][-L:] -> seq[-2], history seq[:-2]; test = seq[:-1][-L:] -> seq[-1], history seq[:-1];
    inputs left-padded to L = max_seq_len; (7) item_counts on the train sequences.

    Args:
      data_cfg: `config.data` (dir, interactions, format, columns, min_seq_len, max_seq_len, window, min_rating).
      verbose: print the statistics block (`format_stats`).

    Raises:
      DataError: see `read_interactions`; also when a filter leaves no users or no evaluation users.
    """
    path = Path(data_cfg.dir) / data_cfg.interactions
    if not data_cfg.interactions or not path.is_file():
        raise DataError(
            f"interaction file {str(data_cfg.interactions)!r} not found in {str(data_cfg.dir)!r} (looked for {path}); "
            "set config.data.dir and config.data.interactions"
        )
    min_seq_len, window, max_seq_len = int(data_cfg.min_seq_len), int(data_cfg.window), int(data_cfg.max_seq_len)
    if min_seq_len < 0 or window < 0 or max_seq_len < 1:
        raise DataError(
            f"config.data: expected min_seq_len >= 0, window >= 0, max_seq_len >= 1; "
            f"got {min_seq_len}, {window}, {max_seq_len}"
        )
    inter = read_interactions(
        path,
        data_cfg.format,
        columns=data_cfg.columns,
        min_rating=data_cfg.min_rating,
        duplicates=data_cfg.duplicates,
    )

    # (1) Users in first-seen file order; each user's interactions in time order (stable: the records are sorted).
    user_code, user_vocab = _codes(inter.users)
    first_seen = np.full(len(user_vocab), np.iinfo(np.int64).max)
    np.minimum.at(first_seen, user_code, inter.file_order)
    rank = np.empty(len(user_vocab), dtype=np.int64)
    rank[np.argsort(first_seen, kind="stable")] = np.arange(len(user_vocab))
    user_code = rank[user_code]
    user_vocab = [user_vocab[i] for i in np.argsort(first_seen, kind="stable")]
    order = np.argsort(user_code, kind="stable")
    items_grouped = inter.items[order]
    lengths = np.bincount(user_code, minlength=len(user_vocab))
    starts = np.cumsum(lengths) - lengths

    # (2) MicroLens read_behaviors: `if len(history_item_name) < min_seq_len: continue`.
    keep_user = lengths >= min_seq_len
    if not keep_user.any():
        raise DataError(
            f"{path}: min_seq_len={min_seq_len} removed all {len(user_vocab)} users (the longest has "
            f"{lengths.max()} items); lower config.data.min_seq_len"
        )
    # (3) `history_item_name[-(max_seq_len+3):]`: everything before the window is discarded, training included.
    kept_len = np.minimum(lengths, window) if window else lengths.copy()
    kept_len[~keep_user] = 0
    pos = np.arange(len(order)) - np.repeat(starts, lengths)
    keep = pos >= np.repeat(lengths - kept_len, lengths)
    kept_items = items_grouped[keep]
    user_rows = np.flatnonzero(keep_user)
    lengths_k = kept_len[user_rows]
    starts_k = np.cumsum(lengths_k) - lengths_k

    # (5) Re-index surviving items 1..N in order of first appearance; 0 is padding.
    item_code, item_vocab = _codes(kept_items)
    flat = (item_code + 1).astype(np.int32)

    # (4) + (6) Leave-one-out split; users with < 3 items cannot give a train item, a valid and a test target.
    evals = lengths_k >= 3
    train_len = np.where(evals, lengths_k - 2, lengths_k)
    in_train = np.arange(len(flat)) - np.repeat(starts_k, lengths_k) < np.repeat(train_len, lengths_k)
    train_flat = flat[in_train]
    ends = np.cumsum(train_len).tolist()
    train_seqs = [train_flat[a:b] for a, b in zip([0] + ends[:-1], ends)]  # views; np.split is slower here
    eval_rows = np.flatnonzero(evals).astype(np.int32)
    if len(eval_rows) == 0:
        raise DataError(
            f"{path}: no user has 3 or more items after window={window}, so there is nothing to validate or test; "
            + (
                "raise config.data.window or use 0 (all history)"
                if window
                else "the data is too sparse for the protocol"
            )
        )
    if not (train_len >= 2).any():  # every position of a train sequence but the first is a target (protocol 2)
        raise DataError(
            f"{path}: no user has 2 or more training items after the split (window={window}, "
            f"min_seq_len={min_seq_len}; valid and test take each user's last 2), so there is nothing to train on; "
            + ("raise config.data.window or use 0 (all history)" if window else "each user needs 4 or more items")
        )
    es, el = starts_k[eval_rows], lengths_k[eval_rows]

    def split(n_before: int) -> dict[str, np.ndarray]:
        # The target is seq[-n_before]; inputs are the max_seq_len items before it; history is everything before it.
        before = el - n_before
        return {
            "users": eval_rows,
            "inputs": _right_aligned(flat, es, before, max_seq_len),
            "targets": flat[es + before].astype(np.int32),
            "history": _left_aligned(flat, es, before),
        }

    valid, test = split(2), split(1)
    # (7) MicroLens pop_prob_list counts items on train only.
    item_counts = np.bincount(train_flat, minlength=len(item_vocab) + 1).astype(np.int64)
    item_counts[0] = 0

    stats = {
        "file": str(path),
        "users_in_file": len(user_vocab),
        "users_kept": int(keep_user.sum()),
        "users_dropped": int((~keep_user).sum()),
        "users_train_only": int((~evals).sum()),
        "eval_users": len(eval_rows),
        "items_in_file": len(set(inter.items.tolist())),
        "items": len(item_vocab),
        "interactions_in_file": len(inter) + (inter.duplicates if data_cfg.duplicates == "drop" else 0),
        "duplicate_rows": inter.duplicates,
        "duplicates_policy": data_cfg.duplicates,
        "interactions_kept": len(flat),
        "interactions": len(flat),
        "avg_seq_len": float(lengths_k.mean()),
        "min_seq_len": min_seq_len,
        "window": window,
        "max_seq_len": max_seq_len,
    }
    dataset = Dataset(
        item_ids=[""] + [str(i) for i in item_vocab],
        user_ids=[str(user_vocab[i]) for i in user_rows],
        train_seqs=train_seqs,
        valid=valid,
        test=test,
        item_counts=item_counts,
        stats=stats,
    )
    if verbose:
        print(format_stats(stats), flush=True)
    return dataset


def format_stats(stats: dict) -> str:
    """The dataset statistics as one readable block."""
    s = stats
    users = (
        f"  users: {s['users_in_file']:,} in file, {s['users_kept']:,} kept, {s['users_dropped']:,} dropped "
        f"(< min_seq_len), {s['users_train_only']:,} training-only, {s['eval_users']:,} evaluated"
    )
    interactions = (
        f"  interactions: {s['interactions_kept']:,} kept of {s['interactions_in_file']:,}, "
        f"avg sequence length {s['avg_seq_len']:.2f}"
    )
    protocol = (
        f"  protocol: min_seq_len={s['min_seq_len']} window={s['window'] or 'all'} max_seq_len={s['max_seq_len']}"
    )
    items = f"  items: {s['items']:,} ranked (of {s['items_in_file']:,} in file)"
    lines = [f"interactions: {s['file']}", protocol, users, items, interactions]
    if s.get("duplicate_rows"):
        done = {"drop": "dropped (each read once)", "keep": "kept as data"}[s["duplicates_policy"]]
        lines.append(f"  warning: {s['duplicate_rows']:,} rows repeat another (user, item, timestamp) exactly: {done}")
    return "\n".join(lines)


def save_item_map(dataset: Dataset, path) -> None:
    """Writes the index -> raw item id map as JSON (atomically); `item_ids[i]` is the raw id of index i."""
    records.write_json_atomic(path, {"num_items": dataset.num_items, "item_ids": dataset.item_ids})


def load_item_map(path) -> list[str]:
    """Reads a map written by `save_item_map`, checking it is one."""
    import json

    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: item map not found") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: expected a JSON item map, got unreadable content ({e})") from None
    ids = obj.get("item_ids") if isinstance(obj, dict) else None
    if (
        not isinstance(ids, list)
        or not ids
        or ids[0] != ""
        or not all(isinstance(i, str) for i in ids)
        or obj.get("num_items") != len(ids) - 1
        or len(set(ids)) != len(ids)
    ):
        raise DataError(f"{path}: expected {{'num_items': N, 'item_ids': ['', id1, ..., idN]}} with unique string ids")
    return ids


def fingerprint(path: str | os.PathLike) -> str:
    """sha256 of an interaction file's bytes: part of a run's identity (train_state.run_identity), so a run never resumes or
    is evaluated on a file that changed under it (an edited file re-indexes items silently)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def log_popularity(dataset: Dataset) -> np.ndarray:
    """[N+1] float32 log of each item's share of the train interactions, for the logQ corrections (losses.py).

    As MicroLens's pop_prob_list: row 0 (padding, never a label) gets probability 1, and an item never seen in
    training gets log(1e-12) instead of -inf, so its logit stays finite.
    """
    counts = dataset.item_counts.astype(np.float64)
    pop = counts / max(counts.sum(), 1.0)
    pop[0] = 1.0
    return np.log(np.maximum(pop, 1e-12)).astype(np.float32)


def num_train_batches(dataset: Dataset, batch_size: int) -> int:
    """Batches per epoch: every user once, the last batch padded."""
    return math.ceil(len(dataset.train_seqs) / batch_size)


def _process_slice(batch_size: int, process_index: int, process_count: int) -> slice:
    if batch_size % process_count or not 0 <= process_index < process_count:
        raise ValueError(
            f"batch_size {batch_size} must divide evenly over {process_count} processes "
            f"and process_index {process_index} must be in [0, {process_count})"
        )
    per = batch_size // process_count
    return slice(process_index * per, (process_index + 1) * per)


def _padded_rows(array: np.ndarray, rows: np.ndarray, batch_size: int) -> np.ndarray:
    out = np.zeros((batch_size,) + array.shape[1:], dtype=array.dtype)
    out[: len(rows)] = array[rows]
    return out


def train_batches(
    dataset: Dataset,
    batch_size: int,
    max_seq_len: int,
    seed: int,
    epoch: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict]:
    """One epoch of training batches {"inputs": [B, L] int32, "targets": [B, L] int32}.

    Users are shuffled by `np.random.default_rng([seed, epoch])`, each exactly once; the last batch is padded with
    all-zero rows. With several processes each gets rows [i*B/P, (i+1)*B/P) of every global batch of size B.
    """
    inputs, targets = dataset.train_arrays(max_seq_len)
    local = _process_slice(batch_size, process_index, process_count)
    perm = np.random.default_rng([seed, epoch]).permutation(len(inputs))
    for b in range(num_train_batches(dataset, batch_size)):
        rows = perm[b * batch_size : (b + 1) * batch_size]
        yield {
            "inputs": _padded_rows(inputs, rows, batch_size)[local],
            "targets": _padded_rows(targets, rows, batch_size)[local],
        }


def eval_batches(
    dataset: Dataset, split: str, batch_size: int, *, process_index: int = 0, process_count: int = 1
) -> Iterator[dict]:
    """Evaluation batches {"inputs" [B, L], "targets" [B], "history" [B, H], "users" [B], "mask" [B] bool}.

    Users come in order; the last batch is padded with all-zero rows whose mask is False, so every evaluation user
    counts exactly once. `users` indexes `dataset.user_ids`. Process slices as in `train_batches`.
    """
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    data = getattr(dataset, split)
    local = _process_slice(batch_size, process_index, process_count)
    n = len(data["targets"])
    for start in range(0, n, batch_size):
        rows = np.arange(start, min(start + batch_size, n))
        batch = {k: _padded_rows(v, rows, batch_size)[local] for k, v in data.items()}
        mask = np.zeros(batch_size, dtype=bool)
        mask[: len(rows)] = True
        batch["mask"] = mask[local]
        yield batch

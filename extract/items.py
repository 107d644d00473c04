"""Item lists: which items to extract, with their raw ids and titles.

Three formats, detected from the file:

* MicroLens `*_title_en.csv`: `item,title` (ids 1..19738 for MicroLens-100k; see
  docs/protocol.md, "other files"), with or without a header line;
* a generic CSV with a header naming an id column (`id`, `item`, `item_id`) and a `title` column
  (an optional `text` column overrides the text given to a text model);
* MovieLens `u.item` (`id|title|release|video release|url|19 genre flags`, latin-1): the text is
  "<title>. Genres: <g1>, <g2>" so a text model sees the genres as well.

Raw item ids stay strings everywhere (the contract of dff_jax.records); duplicates are an error.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import io
import re
from pathlib import Path

from extract import ExtractError

# MovieLens 100K genre flags, in u.genre order (columns 5..23 of u.item).
MOVIELENS_GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
ID_COLUMNS = ("id", "item", "item_id", "video_id")


@dataclasses.dataclass(frozen=True)
class Item:
    """One item: its raw id (a string) and the text a text model reads for it (title modality)."""

    item_id: str
    title: str
    text: str
    line: int = dataclasses.field(default=0, compare=False)  # where the item list has it (for error messages)


def read_items(path: str | Path, fmt: str = "auto") -> list[Item]:
    """Reads an item list.

    Args:
      path: a MicroLens `*_title_en.csv`, a generic `id,title` CSV, or a MovieLens `u.item` file.
      fmt: "auto" (from the file name and first line), "csv", "microlens" or "movielens".

    Returns:
      The items in file order.

    Raises:
      ExtractError: naming the file and line for a missing file, a malformed line or a duplicate id.
    """
    path = Path(path)
    if not path.is_file():
        raise ExtractError(f"{path}: item list not found (expected a *_title_en.csv, an id,title CSV or u.item)")
    raw = path.read_bytes()
    if fmt == "auto":
        first = raw.split(b"\n", 1)[0]
        fmt = "movielens" if path.name == "u.item" or first.count(b"|") >= 23 else "csv"
    if fmt == "movielens":
        items = _read_movielens(path, raw)
    elif fmt in ("csv", "microlens"):
        items = _read_csv(path, raw)
    else:
        raise ExtractError(f"unknown item list format {fmt!r}; expected auto, csv, microlens or movielens")
    if not items:
        raise ExtractError(f"{path}: no items found")
    return items


def _check_ids(path: Path, items: list[Item], lines: list[int]) -> None:
    """Ids are unique and printable: a control character (a NUL from a binary file, a tab or newline in a quoted
    field) would not match the interaction file's id and would break tab-separated output."""
    seen: dict[str, int] = {}
    for item, line in zip(items, lines):
        control = next((c for c in item.item_id if ord(c) < 32 or ord(c) == 127), None)
        if control is not None:
            raise ExtractError(f"{path}: line {line}: item id {item.item_id!r} holds the control character {control!r}")
        if item.item_id in seen:
            raise ExtractError(
                f"{path}: line {line}: duplicate item id {item.item_id!r} (first on line {seen[item.item_id]})"
            )
        seen[item.item_id] = line


def _read_movielens(path: Path, raw: bytes) -> list[Item]:
    # u.item is latin-1 (ml-100k README); titles such as "Misérables, Les (1995)" need it. A file that starts with
    # a UTF-8 byte-order mark was re-saved as UTF-8: read as latin-1, the mark would become part of the first id.
    text = _decode_utf8(path, raw) if raw.startswith(codecs.BOM_UTF8) else raw.decode("latin-1")
    items, lines = [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("|")
        if len(fields) != 5 + len(MOVIELENS_GENRES):
            raise ExtractError(
                f"{path}: line {lineno}: expected {5 + len(MOVIELENS_GENRES)} '|'-separated fields "
                f"(id|title|release|video release|url|19 genre flags), found {len(fields)}"
            )
        item_id, title = fields[0].strip(), fields[1].strip()
        flags = fields[5:]
        if not item_id or any(f not in ("0", "1") for f in flags):
            raise ExtractError(f"{path}: line {lineno}: expected a non-empty id and 0/1 genre flags")
        genres = [g for g, f in zip(MOVIELENS_GENRES, flags) if f == "1" and g != "unknown"]
        # Genres without a title are not a title: an empty text lets run.check_texts refuse it.
        text = f"{title}. Genres: {', '.join(genres)}" if genres and title else title
        items.append(Item(item_id, title, text, lineno))
        lines.append(lineno)
    _check_ids(path, items, lines)
    return items


def _decode_utf8(path: Path, raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ExtractError(
            f"{path}: line {line}: not valid UTF-8 (MovieLens u.item is read as latin-1 automatically)"
        ) from None


# A line that starts like a record (`<id>,`: a token without spaces or quotes, then a comma).
_RECORD_START = re.compile(r'^[^\s,"]+,')


def _csv_rows(path: Path, content: str):
    """(physical line, row) per CSV record, with strict quoting. A quoted title may span lines (valid CSV, as
    pandas writes a title holding a newline), but not over a line that starts like a record: that is an
    unbalanced quote swallowing the following items into one title, which would lose them without a word."""
    reader = csv.reader(io.StringIO(content), strict=True)  # lines split on "\n" only, as `lines`
    lines = content.split("\n")
    end = 0
    while True:
        start = end + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            if reader.line_num > start or "end of data" in str(e):
                raise ExtractError(
                    f"{path}: line {start}: a quoted field opened here is never closed properly (runs to line "
                    f"{reader.line_num}: {e}); check the quotes"
                ) from None
            raise ExtractError(f"{path}: line {start}: malformed CSV ({e})") from None
        end = reader.line_num
        swallowed = next((n for n in range(start + 1, end + 1) if _RECORD_START.match(lines[n - 1])), None)
        if swallowed is not None:
            raise ExtractError(
                f"{path}: line {start}: a quoted field runs over lines {start}-{end}, across line {swallowed} that "
                "starts like an item (an unbalanced quote?); check the quotes"
            )
        yield start, row


# Second fields that say a first row is a header (of an id column this reader does not know).
HEADER_WORDS = ("title", "titles", "name", "text", "caption", "description", "title_en")


def _header(path: Path, first: list[str]) -> tuple[int, int, int] | None:
    """(id, title, text) columns of a header row; None when the first row is data (headerless MicroLens)."""
    header = [h.strip().lower() for h in first]
    ids = [c for c in header if c in ID_COLUMNS]
    if len(ids) > 1 or (ids and len(set(header)) < len(header)):  # which one names the items would be a guess
        raise ExtractError(
            f"{path}: line 1: header {first} names {'more than one id column' if len(ids) > 1 else 'a column twice'}; "
            f"expected one id column (one of {', '.join(ID_COLUMNS)}) and one 'title'"
        )
    id_col = header.index(ids[0]) if ids else None
    if id_col is None:
        if any(h in HEADER_WORDS for h in header[1:2] or header[:1]):
            raise ExtractError(
                f"{path}: line 1: looks like a header ({','.join(first)}) but has no id column; "
                f"expected one of {', '.join(ID_COLUMNS)}"
            )
        return None
    if "title" not in header:
        raise ExtractError(f"{path}: line 1: header {first} has an id column but no 'title' column")
    title_col = header.index("title")
    return id_col, title_col, header.index("text") if "text" in header else title_col


def _fit_row(path: Path, lineno: int, row: list[str], width: int, title_col: int) -> list[str]:
    """A row with more fields than its header: an unquoted comma in a title that is the last column is part
    of the title (as in headerless MicroLens files); anywhere else the row cannot be read reliably."""
    if len(row) <= width:
        return row
    if title_col == width - 1:
        return row[:title_col] + [",".join(row[title_col:])]
    raise ExtractError(
        f"{path}: line {lineno}: {len(row)} fields, the header has {width} (quote a title holding commas)"
    )


def _read_csv(path: Path, raw: bytes) -> list[Item]:
    rows = list(_csv_rows(path, _decode_utf8(path, raw)))
    if not rows:
        raise ExtractError(f"{path}: empty file")
    cols = _header(path, rows[0][1])
    if cols is not None:
        id_col, title_col, text_col = cols
        width, body = len(rows[0][1]), rows[1:]
    else:
        # MicroLens *_title_en.csv without a header: `item,title`; a title may itself contain commas
        # when unquoted, so everything after the first comma is the title.
        id_col, title_col, text_col, width, body = 0, 1, 1, 2, rows
    items, lines = [], []
    for lineno, row in body:
        if not row or all(not c.strip() for c in row):
            continue
        row = _fit_row(path, lineno, row, width, title_col)
        needed = max(id_col, title_col, text_col) + 1
        if len(row) < needed:
            raise ExtractError(
                f"{path}: line {lineno}: expected at least {needed} comma-separated fields, found {len(row)}"
            )
        item_id = row[id_col].strip()
        if not item_id:
            raise ExtractError(f"{path}: line {lineno}: empty item id")
        title = row[title_col].strip()
        text = row[text_col].strip() or title
        items.append(Item(item_id, title, text, lineno))
        lines.append(lineno)
    _check_ids(path, items, lines)
    return items


def select_shard(items: list[Item], index: int, count: int) -> list[Item]:
    """The items of shard `index` of `count`: every count-th item starting at `index`.

    Strided rather than contiguous so shards get the same mix of (say) long and short videos when the
    list is sorted by id; deterministic, and the union over all shards is the whole list exactly once.
    """
    if count < 1 or not 0 <= index < count:
        raise ExtractError(f"--shard {index}/{count}: expected I/N with 0 <= I < N")
    return items[index::count]


def parse_shard(text: str) -> tuple[int, int]:
    """Parses `--shard I/N`."""
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise ExtractError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if count < 1 or not 0 <= index < count:
        raise ExtractError(f"--shard {text!r}: expected I/N with 0 <= I < N")
    return index, count

"""Item lists for the extractor: MicroLens title csv, generic id,title csv, MovieLens u.item; sharding."""

from pathlib import Path

import pytest

from extract import ExtractError
from extract.items import parse_shard, read_items, select_shard

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_microlens_title_csv_without_header_keeps_commas_in_titles(tmp_path):
    p = tmp_path / "MicroLens-100k_title_en.csv"
    p.write_text("1,the wonderful video\n2,love rises east, and falls west\n3,brine egg\n")
    items = read_items(p)
    assert [i.item_id for i in items] == ["1", "2", "3"]
    assert items[1].title == "love rises east, and falls west"


def test_generic_csv_with_header_and_text_column(tmp_path):
    p = tmp_path / "items.csv"
    p.write_text('item_id,title,text\nv7,"A, B",long text here\nv8,C,\n')
    items = read_items(p)
    assert [(i.item_id, i.title, i.text) for i in items] == [("v7", "A, B", "long text here"), ("v8", "C", "C")]


def test_bad_lines_name_file_and_line(tmp_path):
    p = tmp_path / "items.csv"
    p.write_text("id,title\n1,a\n2\n")
    with pytest.raises(ExtractError, match=r"items.csv: line 3: expected at least 2"):
        read_items(p)
    p.write_text("id,title\n1,a\n1,b\n")
    with pytest.raises(ExtractError, match=r"line 3: duplicate item id '1' \(first on line 2\)"):
        read_items(p)
    p.write_bytes(b'id,title\n1,a\n"2\x00",b\n')
    with pytest.raises(ExtractError, match=r"items.csv: line 3: item id '2\\x00' holds the control character '\\x00'"):
        read_items(p)
    p.write_text('id,title\n"a\tb",t\n')
    with pytest.raises(ExtractError, match=r"line 2: item id 'a\\tb' holds the control character '\\t'"):
        read_items(p)
    with pytest.raises(ExtractError, match="item list not found"):
        read_items(tmp_path / "nope.csv")


def test_movielens_u_item_latin1_with_genres(tmp_path):
    p = tmp_path / "u.item"
    flags = ["0"] * 19
    flags[3] = flags[5] = "1"  # Animation, Comedy
    line = "|".join(["1", "Misérables, Les (1995)", "01-Jan-1995", "", "http://x"] + flags)
    p.write_bytes((line + "\n").encode("latin-1"))
    (item,) = read_items(p)
    assert item.item_id == "1" and item.title == "Misérables, Les (1995)"
    assert item.text == "Misérables, Les (1995). Genres: Animation, Comedy"
    p.write_bytes(b"1|only|three\n")
    with pytest.raises(ExtractError, match="line 1: expected 24"):
        read_items(p, "movielens")


def test_real_ml100k_u_item():
    path = SHARED_DATA / "ml-100k" / "u.item"
    if not path.is_file():
        pytest.skip("../shared/data/ml-100k not present")
    items = read_items(path)
    assert len(items) == 1682 and items[0].text == "Toy Story (1995). Genres: Animation, Children's, Comedy"


def test_shards_partition_the_list_deterministically(tmp_path):
    p = tmp_path / "items.csv"
    p.write_text("id,title\n" + "".join(f"{i},t{i}\n" for i in range(10)))
    items = read_items(p)
    parts = [select_shard(items, i, 3) for i in range(3)]
    ids = sorted(int(it.item_id) for part in parts for it in part)
    assert ids == list(range(10))
    assert [it.item_id for it in parts[1]] == ["1", "4", "7"]
    assert parse_shard("2/3") == (2, 3)
    for bad in ("3/3", "x", "1/0"):
        with pytest.raises(ExtractError, match="--shard"):
            parse_shard(bad)

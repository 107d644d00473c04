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


def test_a_header_does_not_cut_titles_at_unquoted_commas(tmp_path):
    with_header, without = tmp_path / "a.csv", tmp_path / "b.csv"
    with_header.write_text('item,title\n1,Hello, world, again\n2,"Quoted, fine"\n')
    without.write_text('1,Hello, world, again\n2,"Quoted, fine"\n')
    titles = [i.title for i in read_items(with_header)]
    assert titles == [i.title for i in read_items(without)] == ["Hello, world, again", "Quoted, fine"]
    # The title is not the last column: extra fields cannot be told apart, so the line is named.
    with_header.write_text("id,title,text\n1,a,b\n2,b,x,y\n")
    with pytest.raises(ExtractError, match=r"a.csv: line 3: 4 fields, the header has 3"):
        read_items(with_header)


def test_an_unbalanced_quote_is_an_error_not_a_swallowed_file(tmp_path):
    p = tmp_path / "items.csv"
    p.write_text('id,title\n1,a\n2,"Quote starts, never ends\n3,Third\n4,Fourth\n')
    with pytest.raises(ExtractError, match=r"items.csv: line 3: a quoted field opened here is never closed"):
        read_items(p)
    # Closed by a later quote, across lines that start like items: those items would be lost.
    p.write_text('id,title\n1,a\n2,"Quote starts\n3,Third\n4,Fourth"\n5,e\n')
    with pytest.raises(ExtractError, match=r"line 3: a quoted field runs over lines 3-5, across line 4 that starts"):
        read_items(p)
    # A quoted title holding newlines is valid CSV (pandas writes them so): one item, line numbers still physical.
    for header in ("id,title\n", ""):
        p.write_text(f'{header}1,"Multi\nline title"\n2,ok\n')
        items = read_items(p)
        assert [(i.item_id, i.title, i.line) for i in items] == [
            ("1", "Multi\nline title", 1 + bool(header)),
            ("2", "ok", 3 + bool(header)),
        ]
    p.write_text('id,title\n1,"a"b\n')
    with pytest.raises(ExtractError, match=r"line 2: malformed CSV"):
        read_items(p)


def test_line_numbers_are_physical_lines(tmp_path):
    p = tmp_path / "items.csv"
    p.write_text("id,title\n\n1,a\n\n2\n")
    with pytest.raises(ExtractError, match=r"line 5: expected at least 2"):
        read_items(p)
    p.write_text("id,title\n\n1,a\n\n2,b\n")
    assert [i.line for i in read_items(p)] == [3, 5]


def test_an_unknown_header_is_named_not_read_as_an_item(tmp_path):
    p = tmp_path / "items.csv"
    for header in ("movie_id,title", "movieId,name", "title"):  # "title" alone said "expected 2 fields" on line 2
        p.write_text(f"{header}\n1,Toy Story\n2,Heat\n")
        with pytest.raises(ExtractError, match=r"line 1: looks like a header .* expected one of id, item, item_id"):
            read_items(p)
    # Two id columns (or one named twice): one of them was used without a word.
    for header in ("id,title,id", "item_id,video_id,title", "id,title,title"):
        p.write_text(f"{header}\n1,Toy Story,3\n")
        with pytest.raises(ExtractError, match=r"line 1: header .* names (more than one id column|a column twice)"):
            read_items(p)


def test_a_byte_order_mark_in_u_item_is_not_part_of_the_first_id(tmp_path):
    p = tmp_path / "u.item"
    line = "|".join(["1", "Misérables, Les (1995)", "01-Jan-1995", "", "http://x"] + ["0"] * 19)
    p.write_bytes(b"\xef\xbb\xbf" + (line + "\n").encode("utf-8"))
    (item,) = read_items(p)
    assert item.item_id == "1" and item.title == "Misérables, Les (1995)"

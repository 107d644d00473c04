"""Readers, the MicroLens protocol on hand-made files, batches, and every bad-input message."""

import json
from pathlib import Path

import numpy as np
import pytest

from dff_jax import data, defaults

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# Five users: u2 has < 5 items (dropped), u3 has 15 (truncated to the last 13), u5 repeats items.
HAND_TSV = "u1\ta b c d e\nu2\tb w\nu3\tf g h i j k l m n o p q r s t\nu4\ta f x y z\nu5\tc c d e c e\n"


def config(directory, name, **overrides):
    c = defaults.base_config().data
    c.update({"dir": str(directory), "interactions": name, **overrides})
    return c


def write(tmp_path, name, text, mode="w"):
    path = tmp_path / name
    if mode == "wb":
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def left_pad(values, width):
    return [0] * (width - len(values)) + list(values)


def right_pad(values, width):
    return list(values) + [0] * (width - len(values))


def test_microlens_protocol_on_hand_made_example(tmp_path, capsys):
    write(tmp_path, "Tiny_pairs.tsv", HAND_TSV)
    ds = data.build_dataset(config(tmp_path, "Tiny_pairs.tsv"))
    # Items numbered by first appearance in the kept sequences; u2's 'w' and u3's truncated 'f g' (f reappears in u4).
    assert ds.item_ids == [""] + list("abcde") + list("hijklmnopqrst") + list("fxyz")
    assert ds.num_items == 22
    assert ds.user_ids == ["u1", "u3", "u4", "u5"]
    a, b, c, d, e = 1, 2, 3, 4, 5
    h_to_t = list(range(6, 19))  # h=6 .. r=16, s=17, t=18
    f, x, y, z = 19, 20, 21, 22
    want_train = [[a, b, c], h_to_t[:11], [a, f, x], [c, c, d, e]]
    assert [s.tolist() for s in ds.train_seqs] == want_train
    assert all(s.dtype == np.int32 for s in ds.train_seqs)

    v = ds.valid
    np.testing.assert_array_equal(v["users"], [0, 1, 2, 3])
    np.testing.assert_array_equal(
        v["inputs"],
        [left_pad([a, b, c], 10), h_to_t[1:11], left_pad([a, f, x], 10), left_pad([c, c, d, e], 10)],
    )
    np.testing.assert_array_equal(v["targets"], [d, 17, y, c])
    np.testing.assert_array_equal(
        v["history"],
        [right_pad([a, b, c], 11), h_to_t[:11], right_pad([a, f, x], 11), right_pad([c, c, d, e], 11)],
    )
    t = ds.test
    np.testing.assert_array_equal(t["users"], [0, 1, 2, 3])
    np.testing.assert_array_equal(
        t["inputs"],
        [left_pad([a, b, c, d], 10), h_to_t[2:12], left_pad([a, f, x, y], 10), left_pad([c, c, d, e, c], 10)],
    )
    np.testing.assert_array_equal(t["targets"], [e, 18, z, e])
    np.testing.assert_array_equal(
        t["history"],
        [right_pad([a, b, c, d], 12), h_to_t[:12], right_pad([a, f, x, y], 12), right_pad([c, c, d, e, c], 12)],
    )
    for split in (v, t):
        assert all(arr.dtype == np.int32 for arr in split.values())

    counts = np.zeros(23, np.int64)
    for s in want_train:
        np.add.at(counts, s, 1)
    np.testing.assert_array_equal(ds.item_counts, counts)
    assert ds.item_counts[a] == 2 and ds.item_counts[c] == 3 and ds.item_counts[17] == 0

    s = ds.stats
    assert (s["users_in_file"], s["users_kept"], s["users_dropped"], s["users_train_only"], s["eval_users"]) == (
        5,
        4,
        1,
        0,
        4,
    )
    assert (s["items"], s["items_in_file"], s["interactions_in_file"], s["interactions_kept"]) == (22, 24, 33, 29)
    assert s["avg_seq_len"] == pytest.approx(29 / 4)
    printed = capsys.readouterr().out
    assert "4 kept" in printed and "1 dropped" in printed and "22 ranked" in printed and "7.25" in printed

    inputs, targets = ds.train_arrays(10)
    np.testing.assert_array_equal(inputs[0], left_pad([a, b], 10))
    np.testing.assert_array_equal(targets[0], left_pad([b, c], 10))  # no target where the input is padding
    np.testing.assert_array_equal(inputs[1], h_to_t[:10])
    np.testing.assert_array_equal(targets[1], h_to_t[1:11])


def test_sasrec_style_protocol_keeps_all_history_and_short_users(tmp_path):
    write(tmp_path, "Tiny_pairs.tsv", HAND_TSV + "u6\tz\n")
    ds = data.build_dataset(config(tmp_path, "Tiny_pairs.tsv", min_seq_len=0, window=0), verbose=False)
    assert ds.user_ids == ["u1", "u2", "u3", "u4", "u5", "u6"]
    assert ds.item_ids[:9] == ["", "a", "b", "c", "d", "e", "w", "f", "g"]
    # u2 (2 items) and u6 (1 item) train only; u3 keeps all 15 items.
    assert ds.stats["users_train_only"] == 2 and ds.stats["eval_users"] == 4
    assert [s.tolist() for s in ds.train_seqs][1] == [2, 6]
    assert len(ds.train_seqs[2]) == 13 and len(ds.train_seqs[5]) == 1
    np.testing.assert_array_equal(ds.valid["users"], [0, 2, 3, 4])
    assert ds.test["history"].shape == (4, 14)
    idx = ds.item_ids.index
    assert ds.test["targets"][1] == idx("t") and ds.test["inputs"][1, -1] == idx("s")
    _inputs, targets = ds.train_arrays(10)
    assert not targets[5].any()  # a 1-item train sequence has no target


def test_readers_all_formats_sort_stably(tmp_path):
    # Timestamps out of order with ties: ties keep file order.
    rows = [("u1", "i3", 30), ("u2", "i1", 10), ("u1", "i1", 20), ("u1", "i2", 20), ("u2", "i9", 5)]
    want_items = ["i9", "i1", "i1", "i2", "i3"]
    want_users = ["u2", "u2", "u1", "u1", "u1"]

    def check(inter):
        assert inter.items.tolist() == want_items and inter.users.tolist() == want_users
        assert inter.timestamps.tolist() == [5, 10, 20, 20, 30] and inter.timestamps.dtype == np.int64

    body = "".join(f"{u},{i},{t}\n" for u, i, t in rows)
    check(data.read_interactions(write(tmp_path, "X_pairs.csv", "user,item,timestamp\n" + body)))
    check(data.read_interactions(write(tmp_path, "Y_pairs.csv", body)))
    check(
        data.read_interactions(
            write(tmp_path, "generic.csv", "Time,User_ID,Item_ID\r\n" + "".join(f"{t},{u},{i}\r\n" for u, i, t in rows))
        )
    )
    # NineRec: header mapped by name (video_id first, as in get_behaviour.py); no header -> (user, item, ts);
    # or an explicit column order.
    nine = "".join(f"{i},{u},{t}\n" for u, i, t in rows)
    check(data.read_interactions(write(tmp_path, "Bili_Movie_pair.csv", "video_id,user_id,timestamp\n" + nine)))
    check(data.read_interactions(write(tmp_path, "A_pair.csv", body)))
    check(data.read_interactions(write(tmp_path, "B_pair.csv", nine), columns="item,user,timestamp"))
    # MovieLens, with a rating filter.
    ml = [(u, i, 4, t) for u, i, t in rows] + [("u3", "i7", 1, 1)]
    (tmp_path / "ml100k").mkdir()
    (tmp_path / "ml1m").mkdir()
    udata = write(tmp_path / "ml100k", "u.data", "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ml))
    rdat = write(tmp_path / "ml1m", "ratings.dat", "".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in ml))
    check(data.read_interactions(udata, min_rating=2))
    check(data.read_interactions(rdat, "movielens", min_rating=2))
    assert len(data.read_interactions(udata)) == 6
    # tsv: the position in the row is the time.
    inter = data.read_interactions(write(tmp_path, "Z_pairs.tsv", "u1\ta b c\nu2\td e\n"))
    assert inter.users.tolist() == ["u1", "u2", "u1", "u2", "u1"]
    assert inter.items.tolist() == ["a", "d", "b", "e", "c"]
    assert inter.timestamps.tolist() == [0, 0, 1, 1, 2]


def test_real_movielens_100k():
    path = SHARED_DATA / "ml-100k" / "u.data"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    ds = data.build_dataset(config(path.parent, "u.data", window=0, min_seq_len=5), verbose=False)
    assert ds.stats["interactions_in_file"] == 100_000
    assert ds.stats["users_kept"] == 943 and ds.stats["users_dropped"] == 0
    assert ds.stats["interactions_kept"] == 100_000 and ds.num_items == 1682
    assert ds.stats["eval_users"] == 943
    assert int(ds.item_counts.sum()) == 100_000 - 2 * 943


@pytest.mark.parametrize(
    "name, text, fmt, pattern",
    [
        ("A_pairs.tsv", "u1\ta b c\nu2 a b c\n", "auto", r"A_pairs.tsv: line 2: expected 'user<TAB>item item \.\.\.'"),
        ("A_pairs.tsv", "u1\ta b\nu2\t\n", "auto", r"line 2: expected 'user<TAB>item"),
        ("A_pairs.tsv", "u1\ta b\nu1\tc\n", "auto", r"line 2: user 'u1' already had a row on line 1"),
        ("A_pairs.csv", "user,item,timestamp\n1,2,3\n1,2,3.5\n", "auto", r"line 3: expected an integer timestamp"),
        ("A_pairs.csv", "1,2,3\n1,2\n", "auto", r"A_pairs.csv: line 2: expected 3 fields 'user,item,timestamp'"),
        ("A_pairs.csv", "1,,3\n", "auto", r"line 1: expected non-empty user and item ids"),
        ("gen.csv", "user,item,rating\n1,2,3\n", "auto", r"gen.csv: line 1: header .* must name exactly one"),
        (
            "u.data",
            "1\t2\t3\t4\n1\t2\t3\n",
            "auto",
            r"u.data: line 2: expected 'user<TAB>item<TAB>rating<TAB>timestamp'",
        ),
        ("ratings.dat", "1::2::x::4\n", "auto", r"ratings.dat: line 1: expected a numeric rating"),
        ("ratings.dat", "1::2::3::now\n", "auto", r"line 1: expected an integer timestamp, got 'now'"),
        ("notes.txt", "1,2,3\n", "auto", r"notes.txt: cannot tell the format"),
        ("A_pairs.csv", "1,2,3\n", "parquet", r"A_pairs.csv: unknown format 'parquet'"),
        ("A_pairs.csv", "user,item,timestamp\n", "auto", r"A_pairs.csv: no interactions"),
        ("u.data", "1\t2\t1\t4\n", "auto", r"u.data: no interactions with rating >= 3"),
        ("u.data", "1\t2\t5\t4\n1\t3\tnan\t5\n", "auto", r"u.data: line 2: expected a finite rating, got 'nan'"),
        ("A_pairs.tsv", "u1\ta b\nu2\ti1,i2,i3\n", "auto", r"line 2: item 'i1,i2,i3' holds a comma"),
        ("A_pairs.csv", "u,i 1,3\n", "auto", r"A_pairs.csv: line 1: item id 'i 1' holds whitespace"),
        # a quoted field over two lines was joined into the id 'i3x'; an unbalanced quote named the file's end
        ("A_pairs.csv", 'u,i1,1\nu,"i3\nx",2\nu,i4,3\n', "auto", r"line 2: a quoted field runs on over 2 lines"),
        (
            "A_pairs.csv",
            'u,"i1,1\nu,i3,2\nu,i4,3\n',
            "auto",
            r"line 1: a quoted field runs on over 3 lines \(to line 3",
        ),
        (
            "A_pairs.csv",
            "u,a,1\ru,b,2\r",
            "auto",
            r"A_pairs.csv: line 1: lines end in CR only .*convert the file to LF",
        ),
    ],
)
def test_bad_input_messages(tmp_path, name, text, fmt, pattern):
    path = write(tmp_path, name, text)
    with pytest.raises(data.DataError, match=pattern):
        data.read_interactions(path, fmt, min_rating=3 if name in ("u.data", "ratings.dat") else 0)


def test_extra_csv_columns_and_misapplied_options(tmp_path):
    inter = data.read_interactions(write(tmp_path, "r.csv", "user,item,rating,timestamp\nu,i,5,7\nu,j,1,3\n"))
    assert inter.items.tolist() == ["j", "i"] and inter.timestamps.tolist() == [3, 7]
    with pytest.raises(data.DataError, match=r"X_pairs.tsv: config.data.columns='item,user,timestamp' applies to CSV"):
        data.read_interactions(write(tmp_path, "X_pairs.tsv", "u\ta\n"), columns="item,user,timestamp")
    with pytest.raises(data.DataError, match=r"r.csv: config.data.min_rating=4 needs ratings"):
        data.read_interactions(tmp_path / "r.csv", min_rating=4)


def test_bad_bytes_and_bad_columns(tmp_path):
    path = write(tmp_path, "A_pairs.tsv", b"u1\ta b\nu2\t\xff\xfe\n", mode="wb")
    with pytest.raises(data.DataError, match=r"A_pairs.tsv: line 2: expected UTF-8 text"):
        data.read_interactions(path)
    # A NUL (a binary or UTF-16 file) or another control character is refused, not read into an id.
    path = write(tmp_path, "B_pairs.csv", b"user,item,timestamp\n1,2,3\n1,a\x00b,4\n", mode="wb")
    with pytest.raises(data.DataError, match=r"B_pairs.csv: line 3: control character '\\x00' at column 4"):
        data.read_interactions(path)
    path = write(tmp_path, "u.data", "1\t2\t5\t7\n1\t3\x1b\t5\t8\n")
    with pytest.raises(data.DataError, match=r"u.data: line 2: control character '\\x1b' at column 4"):
        data.read_interactions(path)
    path = write(tmp_path, "A_pair.csv", "1,2,3\n")
    with pytest.raises(data.DataError, match=r"config.data.columns='user,item'"):
        data.read_interactions(path, columns="user,item")


def test_a_header_contradicting_config_columns_is_refused(tmp_path):
    path = write(tmp_path, "A_pairs.csv", "user,item,timestamp\nu1,i1,3\n")
    with pytest.raises(data.DataError, match=r"A_pairs.csv: line 1: header 'user,item,timestamp' contradicts"):
        data.read_interactions(path, columns="item,user,timestamp")
    assert data.read_interactions(path, columns="user,item,timestamp").items.tolist() == ["i1"]  # agreeing: fine


def test_no_training_target_after_the_split_is_refused(tmp_path):
    write(tmp_path, "Three_pairs.tsv", "u1\ta b c\nu2\td e f\n")  # train = 1 item each: no next-item target
    with pytest.raises(data.DataError, match=r"Three_pairs.tsv: no user has 2 or more training items after the split"):
        data.build_dataset(config(tmp_path, "Three_pairs.tsv", min_seq_len=0), verbose=False)


def test_build_dataset_errors(tmp_path):
    with pytest.raises(data.DataError, match=r"'Missing_pairs.tsv' not found in .* \(looked for .*Missing_pairs.tsv\)"):
        data.build_dataset(config(tmp_path, "Missing_pairs.tsv"))
    write(tmp_path, "Tiny_pairs.tsv", HAND_TSV)
    with pytest.raises(
        data.DataError, match=r"Tiny_pairs.tsv: min_seq_len=50 removed all 5 users \(the longest has 15"
    ):
        data.build_dataset(config(tmp_path, "Tiny_pairs.tsv", min_seq_len=50))
    with pytest.raises(data.DataError, match=r"Tiny_pairs.tsv: no user has 3 or more items after window=2"):
        data.build_dataset(config(tmp_path, "Tiny_pairs.tsv", window=2))
    with pytest.raises(data.DataError, match=r"window >= 0"):
        data.build_dataset(config(tmp_path, "Tiny_pairs.tsv", window=-1))


def test_item_map_round_trip_and_bad_maps(tmp_path):
    write(tmp_path, "Tiny_pairs.tsv", HAND_TSV)
    ds = data.build_dataset(config(tmp_path, "Tiny_pairs.tsv"), verbose=False)
    path = tmp_path / "run" / "item_map.json"
    path.parent.mkdir()
    data.save_item_map(ds, path)
    assert data.load_item_map(path) == ds.item_ids
    assert not list(path.parent.glob("*.tmp"))
    path.write_text(json.dumps({"num_items": 2, "item_ids": ["", "a", "a"]}))
    with pytest.raises(data.DataError, match="unique string ids"):
        data.load_item_map(path)
    path.write_text("{not json")
    with pytest.raises(data.DataError, match="item_map.json: expected a JSON item map"):
        data.load_item_map(path)
    with pytest.raises(data.DataError, match="item map not found"):
        data.load_item_map(tmp_path / "nope.json")


@pytest.fixture
def many_users(tmp_path):
    rng = np.random.default_rng(0)
    lines = []
    for u in range(23):  # 23 users: not a multiple of the batch size
        n = int(rng.integers(5, 16))
        lines.append(f"user{u}\t" + " ".join(f"it{u}_{k}" for k in range(n)))  # distinct rows per user
    write(tmp_path, "Many_pairs.tsv", "\n".join(lines) + "\n")
    return data.build_dataset(config(tmp_path, "Many_pairs.tsv", max_seq_len=6, window=9), verbose=False)


def rows_of(batches, key="inputs"):
    return np.concatenate([b[key] for b in batches])


def test_train_batches_cover_every_user_once_with_fixed_shapes(many_users):
    ds = many_users
    assert data.num_train_batches(ds, 8) == 3
    epoch0 = list(data.train_batches(ds, 8, 6, seed=1, epoch=0))
    assert len(epoch0) == 3
    for b in epoch0:
        assert set(b) == {"inputs", "targets"}
        assert b["inputs"].shape == b["targets"].shape == (8, 6) and b["inputs"].dtype == np.int32
    inputs, targets = ds.train_arrays(6)
    got = rows_of(epoch0)
    real = got[got.any(axis=1)]
    assert len(real) == 23 and (got[23:] == 0).all() and (rows_of(epoch0, "targets")[23:] == 0).all()
    assert sorted(map(tuple, real)) == sorted(map(tuple, inputs))
    # Each row's targets belong with its inputs.
    pairs = {tuple(i): tuple(t) for i, t in zip(inputs, targets)}
    for i, t in zip(got[:23], rows_of(epoch0, "targets")[:23]):
        assert pairs[tuple(i)] == tuple(t)
    again = rows_of(data.train_batches(ds, 8, 6, seed=1, epoch=0))
    epoch1 = rows_of(data.train_batches(ds, 8, 6, seed=1, epoch=1))
    other_seed = rows_of(data.train_batches(ds, 8, 6, seed=2, epoch=0))
    np.testing.assert_array_equal(again, got)
    assert not np.array_equal(epoch1, got) and not np.array_equal(other_seed, got)
    assert sorted(map(tuple, epoch1[epoch1.any(axis=1)])) == sorted(map(tuple, inputs))


def test_process_slices_concatenate_to_the_global_batch(many_users):
    whole = list(data.train_batches(many_users, 8, 6, seed=3, epoch=2))
    parts = [
        list(data.train_batches(many_users, 8, 6, seed=3, epoch=2, process_index=p, process_count=4)) for p in range(4)
    ]
    for b, global_batch in enumerate(whole):
        for key in ("inputs", "targets"):
            np.testing.assert_array_equal(np.concatenate([parts[p][b][key] for p in range(4)]), global_batch[key])
    ev = list(data.eval_batches(many_users, "test", 8))
    ev_parts = [list(data.eval_batches(many_users, "test", 8, process_index=p, process_count=2)) for p in range(2)]
    for b, global_batch in enumerate(ev):
        for key in global_batch:
            np.testing.assert_array_equal(np.concatenate([ev_parts[p][b][key] for p in range(2)]), global_batch[key])
    with pytest.raises(ValueError, match="divide evenly"):
        next(data.train_batches(many_users, 8, 6, seed=0, epoch=0, process_index=0, process_count=3))


@pytest.mark.parametrize("split", ["valid", "test"])
def test_eval_batches_pad_with_mask(many_users, split):
    ds = many_users
    batches = list(data.eval_batches(ds, split, 10))
    assert len(batches) == 3
    for b in batches:
        assert b["inputs"].shape == (10, 6) and b["targets"].shape == (10,) and b["mask"].dtype == bool
        assert b["history"].shape == (10, getattr(ds, split)["history"].shape[1])
    mask = rows_of(batches, "mask")
    assert mask.sum() == 23 and mask[:23].all()
    for key, value in getattr(ds, split).items():
        np.testing.assert_array_equal(rows_of(batches, key)[mask], value)
    assert (rows_of(batches, "inputs")[~mask] == 0).all()
    with pytest.raises(ValueError, match="split must be"):
        next(data.eval_batches(ds, "train", 4))


def test_format_stats_block(many_users):
    text = data.format_stats(many_users.stats)
    assert "23 kept" in text and "Many_pairs.tsv" in text and "window=9" in text

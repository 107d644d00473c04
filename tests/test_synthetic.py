"""Tests for the embedded synthetic dataset (dff_jax/synthetic.py): format, determinism and the planted structure."""

import itertools
import json
import time

import numpy as np
import pytest

from dff_jax import data, defaults, features, records, synthetic
from dff_jax.errors import ConfigError, TrainError

SMALL = {"num_users": 300, "num_items": 120, "num_layers": 6, "hidden": 16, "items_per_shard": 50}


def _read_pairs(path):
    users, seqs = [], []
    for line in path.read_text().splitlines():
        user, items = line.split("\t")
        users.append(user)
        seqs.append(items.split(" "))
    return users, seqs


@pytest.fixture(scope="module")
def default_dataset(tmp_path_factory):
    """The default-size dataset, generated once (also times the generator)."""
    out = tmp_path_factory.mktemp("default") / "synthetic"
    start = time.perf_counter()
    result = synthetic.generate(out)
    result["wall_seconds"] = time.perf_counter() - start
    return out, result


def test_default_size_generates_in_seconds(default_dataset):
    _, result = default_dataset
    # A guard against a pathological slow-down (about 5 s of CPU on 2 idle cores), not a benchmark.
    assert result["wall_seconds"] < 60, result["wall_seconds"]
    stats = result["stats"]
    assert stats["users"] == synthetic.DEFAULTS["num_users"]
    assert 10 <= stats["avg_seq_len"] <= 15
    assert 0.3 <= stats["collab_step_share"] <= 0.5


def test_files_are_a_valid_microlens_dataset_with_features(default_dataset):
    out, result = default_dataset
    assert sorted(p.name for p in out.iterdir()) == ["features", "generation.json", "synthetic_pairs.tsv"]
    assert not list(out.parent.glob("*.tmp-*")), "no temporary folder left behind"
    users, seqs = _read_pairs(out / synthetic.PAIRS_FILE)
    assert len(users) == len(set(users)) == synthetic.DEFAULTS["num_users"]
    assert min(len(s) for s in seqs) >= 5, "every user survives the protocol's min_seq_len = 5"
    assert all(len(s) == len(set(s)) for s in seqs), "no repeats within a user (a repeat target is a miss)"
    schema = records.read_schema(out / "features")
    assert (schema.model, schema.modality, schema.layers, schema.hidden_size, schema.dtype) == (
        "synthetic",
        "synthetic",
        12,
        64,
        "bfloat16",
    )
    assert schema.num_items == synthetic.DEFAULTS["num_items"]
    assert json.loads((out / "generation.json").read_text())["stats"] == result["stats"]


def test_protocol_and_feature_loader_accept_it(default_dataset):
    out, _ = default_dataset
    cfg = defaults.base_config().data
    cfg.update(dir=str(out), interactions=synthetic.PAIRS_FILE, format="microlens_tsv")
    dataset = data.build_dataset(cfg, verbose=False)
    assert len(dataset.user_ids) == synthetic.DEFAULTS["num_users"]
    loaded = features.load_features(out / "features", dataset.item_ids)
    assert loaded.table.shape == (dataset.num_items + 1, 12, 64)
    assert loaded.missing == 0
    assert loaded.unused == synthetic.DEFAULTS["num_items"] - dataset.num_items  # never-interacted items


def test_popularity_is_zipf_like(default_dataset):
    out, result = default_dataset
    _, seqs = _read_pairs(out / synthetic.PAIRS_FILE)
    counts = np.sort(np.unique(np.concatenate(seqs), return_counts=True)[1])[::-1]
    top = counts[: len(counts) // 10].sum() / counts.sum()
    assert top > 0.3, f"top 10% of items take only {top:.0%} of interactions"
    assert result["stats"]["top10pct_item_share"] > 0.3
    assert counts[0] > 20 * np.median(counts)


def test_linear_probe_finds_the_planted_layer_structure(default_dataset):
    """Middle layers carry the content best; shallow worst; the mean of layers beats the best single layer."""
    out, _ = default_dataset
    args = synthetic.DEFAULTS
    num_items = args["num_items"]
    table = features.load_features(out / "features", [""] + [f"i{i + 1}" for i in range(num_items)])
    feats = table.table[1:].astype(np.float32)
    _, content = synthetic.item_content(args["seed"], num_items, args["content_dim"], args["num_topics"])
    r2 = [synthetic.probe_r2(feats[:, layer], content) for layer in range(feats.shape[1])]
    middle = max(r2[4:9])
    assert middle > 0.4
    assert middle > r2[-1] + 0.15, r2
    assert r2[-1] > r2[0] + 0.1, r2
    best = int(np.argmax(r2))
    assert 3 <= best <= 8, f"best layer {best}: {r2}"
    mean_r2 = synthetic.probe_r2(feats.mean(1), content)
    assert mean_r2 > max(r2) + 0.1, (mean_r2, r2)
    profile = synthetic.layer_profile(feats.shape[1], args["shallow_nuisance"], args["deep_nuisance"])
    weighted = synthetic.probe_r2(np.einsum("nlh,l->nh", feats, profile["signal"] / profile["signal"].sum()), content)
    assert weighted > mean_r2 + 0.05, "weights favouring the middle layers beat the uniform mean"


def test_probe_is_not_fooled_by_random_features():
    rng = np.random.default_rng(0)
    content = rng.standard_normal((600, 8))
    assert synthetic.probe_r2(rng.standard_normal((600, 16)), content) < 0.05
    assert synthetic.probe_r2(content @ rng.standard_normal((8, 16)), content) > 0.99


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = synthetic.generate(tmp_path / "a", seed=3, **SMALL)
    b = synthetic.generate(tmp_path / "b", seed=3, **SMALL)
    c = synthetic.generate(tmp_path / "c", seed=4, **SMALL)
    pairs = [(tmp_path / d / synthetic.PAIRS_FILE).read_bytes() for d in "abc"]
    assert pairs[0] == pairs[1] and pairs[0] != pairs[2]
    shards = [records.shard_files(tmp_path / d / "features") for d in "abc"]
    assert [p.name for p in shards[0]] == [f"synthetic-{s:05d}-of-00003.tfrecord" for s in range(3)]
    for x, y in zip(shards[0], shards[1]):
        assert x.read_bytes() == y.read_bytes()
    assert shards[0][0].read_bytes() != shards[2][0].read_bytes()
    assert a["stats"] == {**b["stats"], "seconds": a["stats"]["seconds"]}
    assert c["stats"]["users"] == SMALL["num_users"]


def test_item_features_do_not_depend_on_the_user_count(tmp_path):
    synthetic.generate(tmp_path / "a", **{**SMALL, "num_users": 100})
    synthetic.generate(tmp_path / "b", **SMALL)
    for x, y in zip(records.shard_files(tmp_path / "a/features"), records.shard_files(tmp_path / "b/features")):
        assert x.read_bytes() == y.read_bytes()


def test_collaborative_steps_follow_the_content_blind_graph():
    seed, num_items = 0, 200
    topics, content = synthetic.item_content(seed, num_items, 8, 10)
    pop = synthetic.popularity(seed, num_items, 0.9)
    knobs = {
        k: synthetic.DEFAULTS[k]
        for k in (
            "successors",
            "mean_seq_len",
            "min_seq_len",
            "max_seq_len",
            "sharpness",
            "content_pop_power",
            "similarity",
        )
    }

    def share_on_graph(p_collab):
        seqs, info = synthetic.user_sequences(seed, content, topics, pop, 400, p_collab=p_collab, **knobs)
        succ = info["successors"]
        hits = [b in succ[a] for s in seqs for a, b in itertools.pairwise(s)]
        return float(np.mean(hits)), info

    always, info = share_on_graph(1.0)
    never, _ = share_on_graph(0.0)
    assert always > 0.9  # every step follows the graph unless all successors were already seen
    assert never < 0.15
    # The graph ignores content: successors are no more similar to their item than popularity-drawn random items.
    unit = content / np.linalg.norm(content, axis=1, keepdims=True)
    pairs = np.array([(i, j) for i, row in enumerate(info["successors"]) for j in row])
    cos_succ = np.mean(np.sum(unit[pairs[:, 0]] * unit[pairs[:, 1]], 1))
    cos_random = np.mean(unit @ (unit.T @ pop))
    same_topic = np.mean(topics[pairs[:, 0]] == topics[pairs[:, 1]])
    same_topic_random = np.mean([pop[topics == t].sum() for t in topics])
    assert abs(cos_succ - cos_random) < 0.06, (cos_succ, cos_random)
    assert abs(same_topic - same_topic_random) < 0.06, (same_topic, same_topic_random)


def test_content_steps_follow_the_previous_items_content():
    """With `similarity` > 0, content steps pick items like the previous one: consecutive items are closer in content."""
    seed, num_items = 0, 300
    topics, content = synthetic.item_content(seed, num_items, 8, 10)
    pop = synthetic.popularity(seed, num_items, 0.9)
    knobs = {
        k: synthetic.DEFAULTS[k] for k in ("successors", "mean_seq_len", "min_seq_len", "max_seq_len", "sharpness")
    }
    unit = content / np.linalg.norm(content, axis=1, keepdims=True)

    def consecutive_cosine(similarity):
        seqs, _ = synthetic.user_sequences(
            seed, content, topics, pop, 300, p_collab=0.0, content_pop_power=0.5, similarity=similarity, **knobs
        )
        return float(np.mean([unit[a] @ unit[b] for s in seqs for a, b in itertools.pairwise(s)]))

    assert consecutive_cosine(8.0) > consecutive_cosine(0.0) + 0.1


def test_smoke_config_size_works(tmp_path):
    result = synthetic.generate(tmp_path / "s", num_users=240, num_items=80, num_layers=4, hidden=16, seed=0)
    assert result["stats"]["users"] == 240
    schema = records.read_schema(tmp_path / "s/features")
    assert (schema.layers, schema.hidden_size, schema.num_items) == (4, 16, 80)


def test_refuses_a_non_empty_folder_and_bad_arguments(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "something").write_text("")
    with pytest.raises(ConfigError, match="not empty"):
        synthetic.generate(tmp_path / "x", **SMALL)
    with pytest.raises(ConfigError, match=r"p_collab must be in \[0, 1\], got 1.5"):
        synthetic.generate(tmp_path / "y", p_collab=1.5)
    with pytest.raises(TrainError, match=r"x/something/d: cannot create the dataset folder"):
        synthetic.generate(tmp_path / "x" / "something" / "d", **SMALL)  # under a file
    with pytest.raises(ValueError, match=r"unknown synthetic dataset arguments \['users'\]"):
        synthetic.generate(tmp_path / "y", users=3)
    with pytest.raises(ValueError, match="num_items must be"):
        synthetic.generate(tmp_path / "y", num_items=6)
    (tmp_path / "empty").mkdir()
    synthetic.generate(tmp_path / "empty", **SMALL)  # an empty folder is fine
    assert (tmp_path / "empty" / synthetic.PAIRS_FILE).is_file()


def test_a_crash_leaves_no_half_dataset(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(records, "write_schema", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        synthetic.generate(tmp_path / "d", **SMALL)
    assert list(tmp_path.iterdir()) == []


def test_losing_a_race_uses_the_finished_dataset(tmp_path, monkeypatch):
    """Two runs generating the same folder at once: the second keeps the first's (identical) dataset."""
    winner = synthetic.generate(tmp_path / "first", **SMALL)
    real_write = synthetic._write

    def write_then_lose(tmp, *args):
        real_write(tmp, *args)
        (tmp_path / "first").rename(tmp_path / "d")  # the other process finishes first

    monkeypatch.setattr(synthetic, "_write", write_then_lose)
    result = synthetic.generate(tmp_path / "d", **SMALL)
    assert result["stats"] == winner["stats"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_command_line(tmp_path, capsys):
    synthetic.main(["--out", str(tmp_path / "cli"), "--users", "50", "--items", "40", "--layers", "3", "--hidden", "8"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["stats"]["users"] == 50
    assert records.read_schema(tmp_path / "cli" / "features").layers == 3


def test_a_full_disk_names_the_dataset_folder(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")  # no file name, as a full disk reports it

    monkeypatch.setattr(records, "write_schema", full)
    with pytest.raises(TrainError, match=rf"{tmp_path / 'd'}: cannot write the synthetic dataset \(No space"):
        synthetic.generate(tmp_path / "d", **SMALL)
    assert list(tmp_path.iterdir()) == []

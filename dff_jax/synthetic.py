"""The embedded default dataset: MicroLens-format interactions and LVLM-like multi-layer features with planted structure.

    python -m dff_jax.synthetic --out data/synthetic [--users 3000 --items 3000 --layers 12 --hidden 64 --seed 0]

writes (atomically: into `<out>.tmp-<pid>`, then one rename)

    <out>/synthetic_pairs.tsv   `user<TAB>item item ...` in time order (MicroLens-100K_pairs.tsv format, protocol 1)
    <out>/features/             *.tfrecord shards + schema.json (dff_jax/records.py), rows [layers, hidden] bf16
    <out>/generation.json       the arguments, the planted per-layer profile, statistics and a linear-probe report

What is planted, so that a recommender can find what the paper reports (sections 4.1, 4.3, 5):

* Items have a latent content vector c_i (clustered by topic) and a Zipf popularity (`zipf`).
* Each user sequence mixes two kinds of steps. Collaborative steps (`p_collab`) follow a fixed sparse item -> item
  transition graph drawn independently of content: only ID embeddings can learn it, so content-only
  "replacement" loses to ID (finding ii). Content steps draw the next item from popularity ** content_pop_power x
  exp(sharpness * taste_u . c_j + similarity * cos(c_prev, c_j)): a per-user taste over topics and "more like
  this" (the previous item's content). Many tail items are chosen through content and have too few interactions
  for their ID embeddings, so fusing content with IDs beats IDs alone. Without the "more like this" term
  (similarity 0) the content only tells the topic, and a converged ID-only SASRec matched every fusion variant;
  with similarity 8 and 3,000 items it still did. Generator version 2 (similarity 40, 5,000 items, flatter
  popularity) makes the next content step nearly a nearest neighbour of the previous item, which IDs of tail items
  cannot learn: converged fusion beats converged ID only by ~15-20% NDCG@10 (README).
* The features of layer l (row 0 = "embedding", rows 1.. = "decoder layers", depth d = l / (layers - 1)) are
      h_l = R_l (w_l P c_i + a_l n_i + b_l m_i + noise * e_il)
  with P a fixed projection of the content into the hidden space, w_l a signal strength that peaks in the middle
  (asymmetric bump: shallow layers weak, deep layers degrade slightly), a_l n_i an item-specific "low-level"
  nuisance strong in the shallow layers, b_l m_i a deep-layer nuisance (task-irrelevant priors), e_il noise that
  is independent per layer, and R_l a rotation that turns smoothly with depth (neighbouring layers almost aligned,
  first and last up to `max_rotation` apart). So: middle layers beat shallow and deep ones (Figure 3); averaging
  the layers cancels the independent noise and beats the best single layer (Figure 3's red line); weights that
  favour the middle layers and drop the nuisance-heavy ones beat the uniform mean (DFF, Eq. 5).
  `probe_r2` (ridge regression from features to c_i on held-out items) measures this; tests check it.

Everything is deterministic from `seed`; item features do not depend on the user count, and vice versa.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from dff_jax import records
from dff_jax.errors import ConfigError, OneLineArgumentParser, TrainError, exit_on_user_error

PAIRS_FILE = "synthetic_pairs.tsv"
FEATURES_DIR = "features"
GENERATION_FILE = "generation.json"
GENERATOR_VERSION = "2"

DEFAULTS = {
    "num_users": 3000,
    "num_items": 5000,  # more items than users: IDs of tail items stay undertrained, content helps
    "num_layers": 12,  # stored rows: row 0 = "embedding output", rows 1..11 = "decoder layers"
    "hidden": 64,
    "seed": 0,
    "content_dim": 16,
    "num_topics": 20,
    "zipf": 0.6,  # popularity of the item with popularity rank r is proportional to r ** -zipf
    "mean_seq_len": 12.0,  # users get min_seq_len + a geometric number of extra items
    "min_seq_len": 5,  # the MicroLens protocol drops users with fewer than 5 items
    "max_seq_len": 40,
    "p_collab": 0.4,  # probability that a step follows the content-blind transition graph
    "successors": 3,  # fixed next items per item in the transition graph
    "sharpness": 3.0,  # how strongly content steps follow the user's taste
    "content_pop_power": 0.2,  # content steps weigh items by popularity ** content_pop_power (< 1: more tail items)
    "similarity": 40.0,  # content steps also weigh items by exp(similarity * cos(c_prev, c_j)) ("more like this")
    "noise": 1.0,  # per-layer independent noise (std per coordinate)
    "shallow_nuisance": 1.5,  # item-specific low-level component of layer 0, decaying with depth
    "deep_nuisance": 1.0,  # item-specific task-irrelevant component of the last layer, decaying towards the middle
    "max_rotation": 1.5707963,  # radians between the first and the last layer in the most-turned plane
    "dtype": "bfloat16",
    "items_per_shard": 1000,
}


# ------------------------------------------------------------------------------------------------ item content


def _rng(seed: int, stream: int) -> np.random.Generator:
    """Independent generators per purpose, so e.g. the user count does not change the item features."""
    return np.random.default_rng([seed, stream])


def item_content(seed: int, num_items: int, content_dim: int, num_topics: int) -> tuple[np.ndarray, np.ndarray]:
    """Topic of each item and its latent content vector c_i (`[items, content_dim]`, about unit variance per dim)."""
    rng = _rng(seed, 1)
    centres = rng.standard_normal((num_topics, content_dim))
    topics = rng.integers(0, num_topics, num_items)
    content = 0.8 * centres[topics] + 0.6 * rng.standard_normal((num_items, content_dim))
    return topics, content


def popularity(seed: int, num_items: int, zipf: float) -> np.ndarray:
    """Zipf popularity over a random order of the items (sums to 1)."""
    ranks = _rng(seed, 2).permutation(num_items) + 1
    weights = ranks.astype(np.float64) ** -zipf
    return weights / weights.sum()


def layer_profile(num_layers: int, shallow_nuisance: float, deep_nuisance: float) -> dict[str, np.ndarray]:
    """Per-layer strengths of the content signal (w), shallow nuisance (a) and deep nuisance (b), by depth.

    The signal peaks at depth 0.55 and falls faster towards the shallow layers than towards the deep ones, as in
    the paper's Figure 3 (layers 1-10 poor, 16-22 best, 30-33 slightly worse).
    """
    depth = np.linspace(0.0, 1.0, num_layers) if num_layers > 1 else np.array([0.55])
    width = np.where(depth < 0.55, 0.22, 0.45)
    signal = 0.1 + 0.9 * np.exp(-0.5 * ((depth - 0.55) / width) ** 2)
    shallow = shallow_nuisance * np.exp(-depth / 0.15)
    deep = deep_nuisance * np.exp(-(1.0 - depth) / 0.15)
    return {"depth": depth, "signal": signal, "shallow_nuisance": shallow, "deep_nuisance": deep}


def _rotations(rng: np.random.Generator, depth: np.ndarray, hidden: int, max_rotation: float) -> np.ndarray:
    """R_l = Cayley(depth_l * S) for one random skew-symmetric S: rotations that turn smoothly with depth.

    Cayley(S) = (I - S)^-1 (I + S) turns the plane of an eigenvalue +-i*lam of S by 2 * arctan(lam); S is scaled
    so the most-turned plane turns by `max_rotation` at depth 1.
    """
    g = rng.standard_normal((hidden, hidden))
    skew = g - g.T
    lam_max = np.abs(np.linalg.eigvals(skew)).max()
    skew *= np.tan(max_rotation / 2) / lam_max
    eye = np.eye(hidden)
    return np.stack([np.linalg.solve(eye - d * skew, eye + d * skew) for d in depth])


def item_features(seed: int, content: np.ndarray, num_layers: int, hidden: int, **knobs) -> np.ndarray:
    """Per-layer features `[items, layers, hidden]` (float32) following the module docstring's formula."""
    rng = _rng(seed, 3)
    num_items, content_dim = content.shape
    profile = layer_profile(num_layers, knobs["shallow_nuisance"], knobs["deep_nuisance"])
    projection, _ = np.linalg.qr(rng.standard_normal((hidden, content_dim)))  # orthonormal columns
    rotations = _rotations(rng, profile["depth"], hidden, knobs["max_rotation"])
    signal = content @ projection.T  # [items, hidden]
    shallow = rng.standard_normal((num_items, hidden))
    deep = rng.standard_normal((num_items, hidden))
    out = np.empty((num_items, num_layers, hidden), np.float32)
    for layer in range(num_layers):
        h = (
            profile["signal"][layer] * signal
            + profile["shallow_nuisance"][layer] * shallow
            + profile["deep_nuisance"][layer] * deep
            + knobs["noise"] * rng.standard_normal((num_items, hidden))
        )
        out[:, layer] = h @ rotations[layer].T
    return out


# ---------------------------------------------------------------------------------------------- user sequences


def user_sequences(
    seed: int, content: np.ndarray, topics: np.ndarray, pop: np.ndarray, num_users: int, **knobs
) -> tuple[list[np.ndarray], dict]:
    """Item sequences (0-based item numbers, no repeats within a user), step counts and the transition graph."""
    rng = _rng(seed, 4)
    num_items, content_dim = content.shape
    num_topics = int(topics.max()) + 1
    # The content-blind transition graph: each item's successors, drawn by popularity, with decreasing weights.
    k = min(knobs["successors"], num_items - 1)
    successors = np.empty((num_items, k), np.int64)
    for i in range(num_items):
        p = pop.copy()
        p[i] = 0
        successors[i] = rng.choice(num_items, k, replace=False, p=p / p.sum())
    succ_weights = np.linspace(1.0, 0.4, k)

    # Tastes: a unit vector near one or two topic centres (estimated from the items, which is all c_i encodes).
    centres = np.stack(
        [content[topics == t].mean(0) if (topics == t).any() else np.zeros(content_dim) for t in range(num_topics)]
    )
    topic_pop = np.bincount(topics, weights=pop, minlength=num_topics)
    liked = rng.choice(num_topics, (num_users, 2), p=topic_pop / topic_pop.sum())
    second = rng.random(num_users) < 0.5
    taste = (
        centres[liked[:, 0]]
        + second[:, None] * centres[liked[:, 1]]
        + 0.3 * rng.standard_normal((num_users, content_dim))
    )
    taste /= np.linalg.norm(taste, axis=1, keepdims=True)

    extra = max(knobs["mean_seq_len"] - knobs["min_seq_len"], 0.0)
    lengths = knobs["min_seq_len"] + (rng.geometric(1.0 / (extra + 1.0), num_users) - 1 if extra > 0 else 0)
    lengths = np.minimum(lengths, min(knobs["max_seq_len"], num_items // 2)).astype(np.int64)

    log_pop = np.log(pop)
    unit = content / np.linalg.norm(content, axis=1, keepdims=True)
    sequences, collab_steps, content_steps = [], 0, 0
    chunk = max(1, min(num_users, 4_000_000 // num_items))  # bounds the [users, items] weight matrix
    for start in range(0, num_users, chunk):
        rows = np.arange(start, min(num_users, start + chunk))
        n, steps = len(rows), int(lengths[rows].max())
        logits = knobs["content_pop_power"] * log_pop[None, :] + knobs["sharpness"] * (taste[rows] @ content.T)
        weights = np.exp(logits - logits.max(1, keepdims=True))
        cum = np.cumsum(weights, 1)
        flat_cum = (cum / cum[:, -1:] + np.arange(n)[:, None]).ravel()  # row i's CDF shifted to [i, i + 1]
        seen = np.zeros((n, num_items), bool)
        seq = np.zeros((n, steps), np.int64)
        local = np.arange(n)
        for t in range(steps):
            active = t < lengths[rows]
            choice = np.full(n, -1)
            if t > 0:
                succ = successors[seq[:, t - 1]]  # [n, k]
                w = succ_weights[None, :] * ~seen[local[:, None], succ]
                use = active & (rng.random(n) < knobs["p_collab"]) & (w.sum(1) > 0)
                choice = np.where(use, succ[local, _draw(rng, w)], -1)
                collab_steps += int(use.sum())
            need = np.nonzero(active & (choice < 0))[0]
            if t > 0 and knobs["similarity"] > 0 and len(need):
                # "More like this": the content step also follows the previous item's content (cosine), which only
                # the content features reveal for rarely seen items.
                like = np.exp(knobs["similarity"] * (unit[seq[need, t - 1]] @ unit.T - 1.0))
                choice[need] = _draw(rng, np.where(seen[need], 0.0, weights[need] * like))
            else:
                choice[need] = _sample_unseen(rng, need, flat_cum, weights, seen)
            content_steps += len(need)
            seq[:, t] = np.where(active, choice, 0)
            seen[local[active], choice[active]] = True
        sequences.extend(seq[i, : lengths[r]] for i, r in enumerate(rows))
    return sequences, {"collab_steps": collab_steps, "content_steps": content_steps, "successors": successors}


def _sample_unseen(rng, rows, flat_cum, weights, seen) -> np.ndarray:
    """One item per row in `rows`, drawn from that row's weights among the items it has not seen yet.

    Draws from the full distribution (one vectorised searchsorted over the shifted CDFs) and redraws the rows that
    hit a seen item; the few rows still unlucky after some tries fall back to an exact masked draw.
    """
    num_items = weights.shape[1]
    picks = np.empty(len(rows), np.int64)
    todo = np.arange(len(rows))
    for _ in range(8):
        if not len(todo):
            return picks
        r = rows[todo]
        idx = np.searchsorted(flat_cum, r + rng.random(len(r)), side="right") - r * num_items
        idx = np.clip(idx, 0, num_items - 1)
        ok = ~seen[r, idx]
        picks[todo[ok]] = idx[ok]
        todo = todo[~ok]
    if len(todo):
        r = rows[todo]
        picks[todo] = _draw(rng, np.where(seen[r], 0.0, weights[r]))
    return picks


def _draw(rng, weights: np.ndarray) -> np.ndarray:
    """One column per row of `weights` [rows, cols] (>= 0, a positive sum per row), drawn in proportion to it."""
    cum = np.cumsum(weights, 1)
    pick = (cum < rng.random(len(weights))[:, None] * cum[:, -1:]).sum(1)
    return np.minimum(pick, weights.shape[1] - 1)


# ----------------------------------------------------------------------------------------------------- probe


def probe_r2(
    features: np.ndarray, content: np.ndarray, *, seed: int = 0, train_fraction: float = 0.7, ridge: float = 1.0
) -> float:
    """How linearly recoverable the content is from features `[items, dim]`: ridge R^2 on held-out items.

    R^2 = 1 - sum of squared errors / total sum of squares, over all content dimensions of the held-out items.
    """
    x = np.asarray(features, np.float64)
    y = np.asarray(content, np.float64)
    order = np.random.default_rng(seed).permutation(len(x))
    cut = int(train_fraction * len(x))
    tr, te = order[:cut], order[cut:]
    x_mean, y_mean = x[tr].mean(0), y[tr].mean(0)
    xt, yt = x[tr] - x_mean, y[tr] - y_mean
    coef = np.linalg.solve(xt.T @ xt + ridge * np.eye(x.shape[1]), xt.T @ yt)
    pred = (x[te] - x_mean) @ coef + y_mean
    return float(1.0 - ((y[te] - pred) ** 2).sum() / ((y[te] - y[te].mean(0)) ** 2).sum())


def probe_report(features: np.ndarray, content: np.ndarray, signal: np.ndarray) -> dict:
    """Probe R^2 per stored layer, of the uniform mean of layers, and of the mean weighted by the planted signal."""
    per_layer = [probe_r2(features[:, layer], content) for layer in range(features.shape[1])]
    weights = signal / signal.sum()
    return {
        "per_layer": [round(r, 4) for r in per_layer],
        "mean_of_layers": round(probe_r2(features.mean(1), content), 4),
        "signal_weighted": round(probe_r2(np.einsum("nlh,l->nh", features, weights), content), 4),
    }


# ---------------------------------------------------------------------------------------------------- writing


def _write(tmp: Path, args: dict, sequences, features: np.ndarray) -> None:
    num_items = features.shape[0]
    item_ids = [f"i{i + 1}" for i in range(num_items)]
    with open(tmp / PAIRS_FILE, "w") as f:
        f.writelines(f"u{u + 1}\t{' '.join(item_ids[i] for i in seq)}\n" for u, seq in enumerate(sequences))
    fdir = tmp / FEATURES_DIR
    fdir.mkdir()
    stored = features.astype(records.numpy_dtype(args["dtype"]))
    per_shard = max(1, args["items_per_shard"])
    num_shards = -(-num_items // per_shard)
    for s in range(num_shards):
        with records.ShardWriter(fdir / f"synthetic-{s:05d}-of-{num_shards:05d}{records.SHARD_SUFFIX}") as w:
            for i in range(s * per_shard, min(num_items, (s + 1) * per_shard)):
                w.write(item_ids[i], stored[i])
    records.write_schema(
        fdir,
        records.Schema(
            model="synthetic",
            layers=args["num_layers"],
            hidden_size=args["hidden"],
            dtype=args["dtype"],
            pooling="synthetic",
            prompt="",
            modality="synthetic",
            num_frames=0,
            extractor_version=f"dff_jax.synthetic {GENERATOR_VERSION}",
            num_items=num_items,
            extra={"seed": args["seed"], "generator_args": args},
        ),
    )


def generate(out_dir: str | os.PathLike, **kwargs) -> dict:
    """Generates the synthetic dataset into `out_dir` (which must not hold one already); see the module docstring.

    Args:
      out_dir: the dataset folder to create.
      **kwargs: any of DEFAULTS (num_users, num_items, num_layers, hidden, seed, ...).

    Returns:
      {"paths": {"dir", "pairs", "features"}, "stats": {...}} (also written to generation.json).

    Raises:
      ConfigError (a ValueError): unknown or invalid arguments, or `out_dir` exists and is not empty; TrainError:
      `out_dir` cannot be created.
    """
    unknown = sorted(set(kwargs) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown synthetic dataset arguments {unknown}; expected some of {sorted(DEFAULTS)}")
    args = {**DEFAULTS, **kwargs}
    for key in ("num_users", "num_items", "num_layers", "hidden", "num_topics", "content_dim", "successors"):
        if int(args[key]) < 1:
            raise ConfigError(f"synthetic dataset: {key} must be >= 1, got {args[key]}")
    if args["num_items"] < 2 * args["min_seq_len"]:
        raise ConfigError(f"synthetic dataset: num_items must be >= 2 * min_seq_len = {2 * args['min_seq_len']}")
    if not 0 <= args["p_collab"] <= 1:
        raise ConfigError(f"synthetic dataset: p_collab must be in [0, 1], got {args['p_collab']}")
    if args["dtype"] not in records.DTYPES:
        raise ConfigError(f"synthetic dataset: dtype {args['dtype']!r}, expected one of {records.DTYPES}")
    if "seed" in args and not 0 <= int(args["seed"]) < 2**63:  # numpy's generator: a ValueError traceback
        raise ConfigError(f"synthetic dataset: seed must be in [0, 2**63 - 1], got {args['seed']}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out}: already exists and is not empty; remove it to generate the synthetic dataset")

    start = time.perf_counter()
    seed = int(args["seed"])
    # Small hidden sizes (smoke tests) keep the signal to half the dimensions; few items keep >= 4 items per topic.
    content_dim = min(int(args["content_dim"]), max(1, args["hidden"] // 2))
    num_topics = max(1, min(int(args["num_topics"]), args["num_items"] // 4))
    topics, content = item_content(seed, args["num_items"], content_dim, num_topics)
    pop = popularity(seed, args["num_items"], args["zipf"])
    knobs = {k: args[k] for k in ("shallow_nuisance", "deep_nuisance", "max_rotation", "noise")}
    feats = item_features(seed, content, args["num_layers"], args["hidden"], **knobs)
    seq_knobs = {
        k: args[k]
        for k in (
            "successors",
            "mean_seq_len",
            "min_seq_len",
            "max_seq_len",
            "p_collab",
            "sharpness",
            "content_pop_power",
            "similarity",
        )
    }
    sequences, steps = user_sequences(seed, content, topics, pop, args["num_users"], **seq_knobs)

    counts = np.bincount(np.concatenate(sequences), minlength=args["num_items"])
    top = np.sort(counts)[::-1][: max(1, args["num_items"] // 10)]
    profile = layer_profile(args["num_layers"], args["shallow_nuisance"], args["deep_nuisance"])
    stats = {
        "users": len(sequences),
        "items": args["num_items"],
        "items_with_interactions": int((counts > 0).sum()),
        "interactions": int(counts.sum()),
        "avg_seq_len": round(float(counts.sum()) / len(sequences), 3),
        "top10pct_item_share": round(float(top.sum()) / float(counts.sum()), 4),
        "collab_step_share": round(steps["collab_steps"] / max(1, steps["collab_steps"] + steps["content_steps"]), 4),
        "content_dim": content_dim,
        "num_topics": num_topics,
        "planted_signal_per_layer": [round(float(v), 4) for v in profile["signal"]],
        "probe_r2": probe_report(feats, content, profile["signal"]),
    }

    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise TrainError(f"{out}: cannot create the dataset folder ({e.strerror or e})") from None
    try:
        _write(tmp, args, sequences, feats)
        stats["seconds"] = round(time.perf_counter() - start, 3)
        records.write_json_atomic(tmp / GENERATION_FILE, {"version": GENERATOR_VERSION, "args": args, "stats": stats})
        if out.exists() and not any(out.iterdir()):
            out.rmdir()  # os.replace cannot put a directory over another one
        os.replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        # Another process (e.g. a parallel run of the study) finished the same dataset first: use theirs.
        theirs = _read_generation(out)
        if theirs is None or theirs["args"] != json.loads(json.dumps(args)):
            # a full disk reports no file name: name --out (the temporary folder is gone already)
            raise TrainError(
                f"{out}: cannot write the synthetic dataset ({e.strerror or e}, in {e.filename or tmp}); nothing "
                "was left behind"
            ) from None
        return {"paths": _paths(out), "stats": theirs["stats"]}
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"paths": _paths(out), "stats": stats}


def _paths(out: Path) -> dict:
    return {"dir": str(out), "pairs": str(out / PAIRS_FILE), "features": str(out / FEATURES_DIR)}


def _read_generation(out: Path) -> dict | None:
    """The generation.json of a finished dataset folder, or None."""
    try:
        return json.loads((out / GENERATION_FILE).read_text())
    except (OSError, ValueError):
        return None


def ensure_synthetic_data(config) -> None:
    """For `config.data.generate == "synthetic"`: generates `config.data.dir` when absent (process 0; the others
    wait), and stops when the folder holds data made by another generator version or other arguments.

    Only training calls this (after `parallel.initialize`); evaluating a checkpoint never creates data.
    """
    if config.data.generate != "synthetic":
        return
    data_dir = Path(config.data.dir)
    if not (data_dir / config.data.interactions).is_file():
        import jax

        if jax.process_index() == 0:
            print(f"generating the synthetic dataset in {data_dir} ...", flush=True)
            generate(data_dir, **config.data.synthetic.to_dict())
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("dff_jax synthetic data")
    check_generation(data_dir, config.data.synthetic.to_dict())


def check_generation(data_dir: Path, requested: dict) -> None:
    """A synthetic folder made by another generator version or other arguments would silently train on different
    data than the config describes; stop instead and say how to regenerate."""
    path = data_dir / GENERATION_FILE
    if not path.is_file():
        return  # files provided by hand: nothing to compare
    try:
        recorded = json.loads(path.read_text())
        if not isinstance(recorded, dict) or not isinstance(recorded.get("args", {}), dict):
            raise TypeError("expected an object with 'version' and 'args'")
    except (ValueError, TypeError) as e:  # truncated or edited: the data's origin is unknown
        raise TrainError(
            f"{path}: unreadable ({e}); delete {data_dir} to regenerate it, or set --config.data.dir to a new folder"
        ) from None
    wanted = {**DEFAULTS, **requested}
    differ = sorted(k for k in wanted if recorded.get("args", {}).get(k) != wanted[k])
    why = []
    if recorded.get("version") != GENERATOR_VERSION:
        why.append(f"by generator version {recorded.get('version')} (this code writes {GENERATOR_VERSION})")
    if differ:
        why.append(f"with other arguments than the config asks for (differing: {', '.join(differ)})")
    if why:
        raise TrainError(
            f"{path}: this synthetic data was made {' and '.join(why)}; delete {data_dir} to regenerate it, "
            "or set --config.data.dir to a new folder"
        )


@exit_on_user_error
def main(argv=None) -> None:
    parser = OneLineArgumentParser(prog="python -m dff_jax.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="dataset folder to create")
    parser.add_argument("--users", type=int, default=DEFAULTS["num_users"])
    parser.add_argument("--items", type=int, default=DEFAULTS["num_items"])
    parser.add_argument("--layers", type=int, default=DEFAULTS["num_layers"])
    parser.add_argument("--hidden", type=int, default=DEFAULTS["hidden"])
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    parser.add_argument("--p-collab", type=float, default=DEFAULTS["p_collab"])
    parser.add_argument("--dtype", default=DEFAULTS["dtype"], choices=records.DTYPES)
    a = parser.parse_args(argv)
    result = generate(
        a.out,
        num_users=a.users,
        num_items=a.items,
        num_layers=a.layers,
        hidden=a.hidden,
        seed=a.seed,
        p_collab=a.p_collab,
        dtype=a.dtype,
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

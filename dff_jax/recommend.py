"""Top-K recommendations for a history of raw item ids, from a trained run.

  python -m dff_jax.recommend --workdir W --history "i12 i7 i301" --k 10 [--step N]

Scores every item with the same fused item embeddings used in training and evaluation, excludes the history
(as the evaluation protocol does) and the padding row, and prints raw item ids with their scores.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dff_jax import evaluate, parallel
from dff_jax.errors import TrainError, exit_on_user_error, folder_arg, parse_flags


@jax.jit
def _scores(items: jax.Array, user: jax.Array) -> jax.Array:
    return jnp.einsum("nd,d->n", items, user.astype(jnp.float32), preferred_element_type=jnp.float32)


def check_request(history: list[str], k: int) -> None:
    """What needs no run: `main` checks it before loading one (that takes seconds to minutes)."""
    if not history:
        raise TrainError("--history is empty: give at least one raw item id")
    if k < 1:
        raise TrainError(f"--k {k}: expected >= 1")


def recommend(run: dict, history: list[str], k: int) -> list[tuple[str, float]]:
    """Top-k (raw item id, score) for one history of raw ids (oldest first), from `evaluate.load_run`'s run."""
    check_request(history, k)
    dataset = run["dataset"]
    index = {raw: i for i, raw in enumerate(dataset.item_ids) if i > 0}
    unknown = [h for h in history if h not in index]
    if unknown:
        raise TrainError(f"unknown item ids {unknown[:10]}: not in this run's item_map.json")
    most = dataset.num_items - len(set(history))
    if not 1 <= k <= most:
        raise TrainError(f"--k {k}: expected 1 to {most} (the run's {dataset.num_items} items not in the history)")
    L = run["config"].data.max_seq_len
    seq = [index[h] for h in history][-L:]
    inputs = np.zeros((1, L), np.int32)
    inputs[0, L - len(seq) :] = seq  # left padding, as in training
    static, params, features = run["static"], run["params"], run["frozen"]["features"]
    graphdef = static["graphdef"]
    items = evaluate.item_table(
        params,
        features,
        graphdef=graphdef,
        sharding=static["ranking_sharding"],
        chunk_size=run["config"].eval.chunk_size,
    )
    user = evaluate.user_table(params, features, jnp.asarray(inputs), graphdef=graphdef)
    # The same vectors evaluation ranks, scored on the devices (the item table may be sharded): only [N+1] scores
    # come to the host.
    scores = parallel.to_host(_scores(items, user[0])).astype(np.float32)
    scores[0] = -np.inf
    scores[[index[h] for h in history]] = -np.inf
    top = np.argpartition(-scores, k)[:k]
    top = top[np.argsort(-scores[top], kind="stable")]
    return [(dataset.item_ids[i], float(scores[i])) for i in top]


@exit_on_user_error
def main(argv) -> None:
    from absl import flags

    del argv
    f = flags.FLAGS
    workdir = folder_arg(f.workdir, "--workdir")
    history = f.history.split()
    check_request(history, f.k)
    recs = recommend(evaluate.load_run(workdir, f.step), history, f.k)
    for rank, (item, score) in enumerate(recs, 1):
        print(f"{rank}\t{item}\t{score:.4f}")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("workdir", None, "run directory written by python -m dff_jax.train")
    flags.DEFINE_string("history", None, "space-separated raw item ids, oldest first")
    flags.DEFINE_integer("k", 10, "how many items to recommend")
    flags.DEFINE_integer("step", None, "checkpoint epoch (default: the best)")
    flags.mark_flags_as_required(["workdir", "history"])
    app.run(main, flags_parser=parse_flags)

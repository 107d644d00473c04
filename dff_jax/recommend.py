"""Top-K recommendations for a history of raw item ids, from a trained run.

  python -m dff_jax.recommend --workdir W --history "i12 i7 i301" --k 10 [--step N]

Scores every item with the same fused item embeddings used in training and evaluation, excludes the history
(as the evaluation protocol does) and the padding row, and prints raw item ids with their scores.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from dff_jax import data as data_lib
from dff_jax import features as features_lib
from dff_jax import records, train
from dff_jax.train import quiet_libraries
from dff_jax.evaluate import load_run


def recommend(trainer, params, history: list[str], k: int) -> list[tuple[str, float]]:
    """Top-k (raw item id, score) for one history of raw ids (oldest first)."""
    index = {raw: i for i, raw in enumerate(trainer.dataset.item_ids) if i > 0}
    unknown = [h for h in history if h not in index]
    if unknown:
        raise train.TrainError(f"unknown item ids {unknown[:10]}: not in this run's item_map.json")
    if not history:
        raise train.TrainError("--history is empty: give at least one raw item id")
    if not 1 <= k <= trainer.dataset.num_items - len(set(history)):
        raise train.TrainError(f"--k must be between 1 and the number of items not in the history, got {k}")
    L = trainer.config.data.max_seq_len
    seq = [index[h] for h in history][-L:]
    inputs = np.zeros((1, L), np.int32)
    inputs[0, L - len(seq) :] = seq  # left padding, as in training
    model = trainer.model(params, trainer.consts)
    scores = np.array(  # a writable host copy
        jax.jit(lambda x: model.user_embeddings(x) @ model.all_item_embeddings().T)(jnp.asarray(inputs))[0], np.float32
    )
    scores[0] = -np.inf
    scores[[index[h] for h in history]] = -np.inf
    top = np.argpartition(-scores, k)[:k]
    top = top[np.argsort(-scores[top], kind="stable")]
    return [(trainer.dataset.item_ids[i], float(scores[i])) for i in top]


def main(argv) -> None:
    from absl import flags

    del argv
    f = flags.FLAGS
    quiet_libraries()
    try:
        trainer, params, _ = load_run(f.workdir, f.step)
        recs = recommend(trainer, params, f.history.split(), f.k)
    except (train.TrainError, data_lib.DataError, features_lib.FeatureError, records.RecordError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for rank, (item, score) in enumerate(recs, 1):
        print(f"{rank}\t{item}\t{score:.4f}")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("workdir", None, "run directory written by python -m dff_jax.train")
    flags.DEFINE_string("history", None, "space-separated raw item ids, oldest first")
    flags.DEFINE_integer("k", 10, "how many items to recommend")
    flags.DEFINE_integer("step", None, "checkpoint epoch (default: the best)")
    flags.mark_flags_as_required(["workdir", "history"])
    app.run(main)

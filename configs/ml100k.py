"""MovieLens-100k (real, offline) with the MicroLens protocol adapted to a small, long-history dataset.

  python -m dff_jax.train --config configs/ml100k.py:dff --workdir runs/ml100k-dff \
      --config.features.dir=features/ml100k-smollm2-rec
  python -m dff_jax.study --config configs/ml100k.py --features hidden=features/ml100k-smollm2-rec \
      caption=features/ml100k-minilm-text plain_prompt=features/ml100k-smollm2-plain \
      --out study/ml100k --seeds 5 --layers 0,10,20,30

Data: `u.data` of MovieLens-100k (943 users, 1682 movies, 100,000 ratings; every user has >= 20 ratings) in
`data/ml-100k` under the repository root (override with --config.data.dir). Ratings are used as implicit feedback
(min_rating 0, as in SASRec), ordered by timestamp (stable for ties). Features: the item "content" is the movie's
title + genres from `u.item` (the title modality of paper Table 4); extract/README.md has the extraction commands.

Protocol adaptation (docs/protocol.md), and why:
  - leave-one-out split as MicroLens (train seq[:-2], valid = second last, test = last), full ranking over all 1682
    items with the user's history masked;
  - window 0 (whole history) and max_seq_len 50 instead of MicroLens's last 13 / 10: ML-100k users have 20-737
    ratings, and cutting them to 13 would throw away ~90% of the data; 50 is SASRec's setting for MovieLens-1M-sized
    histories at a cost that stays small here;
  - full softmax loss over all items instead of in-batch logQ: with 1682 items the exact softmax is cheap and avoids
    the in-batch sampling bias on a dataset where 943 users give only 8 batches per epoch;
  - embed_dim 64, lr 2e-3, batch 64, dropout 0.2, at most 20 epochs with patience 3 on valid NDCG@10: a small
    dataset needs a small model and a larger step than MicroLens's 1024-d / 1e-4. The epoch budget (the paper: 100
    epochs, patience 5) is cut so a study's runs fit a 2-core CPU; batch 64 gives 15 updates per epoch instead of 8
    at the same cost per epoch. Runs that stop at epoch 20 are visible in results.csv (epochs_run == best_epoch ==
    20) and may be under-trained.
"""

from pathlib import Path

from dff_jax import defaults

_ROOT = Path(__file__).resolve().parents[1]


def _data_dir() -> Path:
    """data/ml-100k under the repository; where that is absent and this checkout sits beside the project's shared
    folder (the development layout), the copy there."""
    own, beside = _ROOT / "data" / "ml-100k", _ROOT.parent / "shared" / "data" / "ml-100k"
    return beside if not own.is_dir() and beside.is_dir() else own


def get_config(variant: str | None = None):
    c = defaults.base_config()
    c.data.dir = str(_data_dir())
    c.data.interactions = "u.data"
    c.data.format = "movielens"
    c.data.min_seq_len = 5
    c.data.window = 0
    c.data.max_seq_len = 50
    c.features.dir = str(_ROOT / "features" / "ml100k-smollm2-rec")
    c.model.embed_dim = 64
    c.model.gate_hidden = 64
    c.model.dropout = 0.2
    c.loss.name = "full_softmax"
    c.optim.lr = 2e-3
    c.train.batch_size = 64
    c.train.num_epochs = 20
    c.train.patience = 3
    c.train.log_every_steps = 8
    c.train.progress_bar = False
    c.eval.batch_size = 512
    c.eval.chunk_size = 2048
    return defaults.apply_variant(c, variant or "dff")

"""The original SASRec setting (Kang & McAuley 2018, as the widely used PyTorch port runs it) on any interaction CSV.

  python -m dff_jax.train --config configs/sasrec.py --workdir runs/sasrec \
      --config.data.dir=DIR --config.data.interactions=ratings.csv
  python -m dff_jax.train --config configs/sasrec.py --workdir runs/ml100k-sasrec \
      --config.data.dir=data/ml-100k --config.data.interactions=u.data --config.data.format=movielens
  python -m dff_jax.train --config configs/sasrec.py:microlens ...   # the same setting, MicroLens's architecture

Data: a `user,item,timestamp` CSV (a header naming the columns is recognised; without one that order is assumed,
or set --config.data.columns), every interaction kept (min_seq_len 0, window 0: the whole history). The split is the
original SASRec one, which `dff_jax.data.build_dataset` gives with these settings: train = seq[:-2], valid = the
second-to-last item, test = the last, users with fewer than 3 items train only. Inputs are the last 50 items.

Model and training, as the port's defaults for its published runs: the "sasrec" architecture (dff_jax/models.py),
ID embeddings only, d = 50, 2 blocks, 1 head, dropout 0.2, post-LN; BCE with one uniform negative per position
outside the user's window; Adam (no weight decay) lr 1e-3, betas (0.9, 0.98), no gradient clipping; batch 128; 20
epochs, no early stopping, the best validation epoch tested. 32 training steps run per jitted call
(train.steps_per_call: the same steps, fewer calls).

Evaluation: full ranking over all items with the history masked (the project's protocol, docs/protocol.md section
3) and, labelled "sampled100/...", the port's protocol: the target among 100 uniform negatives the user has not
interacted with. The best epoch is picked by the sampled NDCG@10, the port's metric.

Variants: "" / "sasrec" (above) or "microlens" (the paper's MicroLens SASRec blocks, everything else the same).
"""

from dff_jax import defaults

ARCH_VARIANTS = ("sasrec", "microlens")


def get_config(variant: str | None = None):
    arch = variant or "sasrec"
    if arch not in ARCH_VARIANTS:
        raise ValueError(f"configs/sasrec.py: variant {arch!r}, expected one of {ARCH_VARIANTS}")
    c = defaults.base_config()
    c.data.dir = ""  # --config.data.dir
    c.data.interactions = ""  # --config.data.interactions
    c.data.format = "auto"
    c.data.min_seq_len = 0
    c.data.window = 0
    c.data.max_seq_len = 50
    c.model.arch = arch
    c.model.item_encoder = "id"
    c.model.embed_dim = 50
    c.model.num_blocks = 2
    c.model.num_heads = 1
    c.model.dropout = 0.2
    c.model.pre_ln = False
    c.loss.name = "bce"
    c.loss.logq = False
    c.optim.lr = 1e-3
    c.optim.b1 = 0.9
    c.optim.b2 = 0.98
    c.optim.weight_decay = 0.0
    c.optim.clip_norm = 0.0
    c.optim.alpha_lr_mult = 1.0
    c.train.batch_size = 128
    c.train.num_epochs = 20
    c.train.patience = 0
    c.train.select_metric = "sampled100/NDCG@10"
    c.train.log_every_steps = 50
    # 32 steps per jitted call: at d = 50 a step's arithmetic is small next to what every call costs on a CPU (a
    # fresh 68 MB temporary buffer to fault in, the dispatch); the same steps either way (docs/benchmarks.md).
    c.train.steps_per_call = 32
    c.eval.sampled_negatives = 100
    c.eval.batch_size = 1024
    # Full ranking scores 2,048 items per step of its chunk loop: a [1,024 x 2,048] product (8 MB) stays in the
    # CPU's cache and its buffers are reused, where 8,192 (the default, sized for an H100) took 2.3x the CPU time.
    c.eval.chunk_size = 2048
    return c

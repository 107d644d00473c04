"""The offline default: the embedded synthetic dataset (dff_jax/synthetic.py), generated on first use.

  python -m dff_jax.train --config configs/synthetic.py --workdir runs/synthetic-dff
  python -m dff_jax.train --config configs/synthetic.py:id --workdir runs/synthetic-id

Sized to train in a few minutes on 2 CPU cores. The planted structure makes the paper's findings visible:
DFF > fusion of the mean of layers > fusion of the last layer > ID only > replacement.
"""

import ml_collections

from dff_jax import defaults


def get_config(variant: str | None = None):
    c = defaults.base_config()
    c.data.dir = "data/synthetic"
    c.data.interactions = "synthetic_pairs.tsv"
    c.data.format = "microlens_tsv"
    c.data.generate = "synthetic"
    c.data.synthetic = ml_collections.ConfigDict(dict(seed=0))  # generator defaults; see dff_jax.synthetic
    c.features.dir = c.data.get_ref("dir") + "/features"
    c.model.embed_dim = 64
    c.model.gate_hidden = 64
    # 3,000 users give only 24 steps per epoch at batch 128, so the step is larger than MicroLens's 1e-4; ID only sits
    # on a plateau for several epochs before it climbs, hence patience 10 (patience 5 stopped it there).
    c.optim.lr = 2e-3
    c.train.batch_size = 128
    c.train.num_epochs = 60
    c.train.patience = 10
    c.train.log_every_steps = 20
    c.eval.batch_size = 1024
    return defaults.apply_variant(c, variant or "dff")

"""A tiny run for tests and CI: small synthetic data, a small model, two epochs (seconds on a CPU).

python -m dff_jax.train --config configs/smoke.py --workdir /tmp/smoke
"""

import ml_collections

from dff_jax import defaults


def get_config(variant: str | None = None):
    c = defaults.base_config()
    c.data.dir = "data/smoke"
    c.data.interactions = "synthetic_pairs.tsv"
    c.data.format = "microlens_tsv"
    c.data.generate = "synthetic"
    c.data.synthetic = ml_collections.ConfigDict(dict(num_users=240, num_items=80, num_layers=4, hidden=16, seed=0))
    c.features.dir = c.data.get_ref("dir") + "/features"
    c.model.embed_dim = 16
    c.model.gate_hidden = 16
    c.model.dropout = 0.1
    c.optim.lr = 3e-3
    c.train.batch_size = 64
    c.train.num_epochs = 2
    c.train.patience = 0
    c.train.log_every_steps = 2
    c.train.progress_bar = False
    c.eval.batch_size = 64
    c.eval.chunk_size = 32
    return defaults.apply_variant(c, variant or "dff")

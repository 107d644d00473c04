"""MicroLens-100k with the official protocol and the paper's defaults.

  python -m dff_jax.train --config configs/microlens.py:dff --workdir runs/microlens-dff \
      --config.data.dir=data/MicroLens-100k --config.features.dir=features/microlens-100k

Variants (`:id|replace|fusion_last|fusion_layer|fusion_mean|dff|caption`) are listed in dff_jax/defaults.py (VARIANTS).
Data: `MicroLens-100k_pairs.tsv` from https://recsys.westlake.edu.cn/MicroLens-100k-Dataset/ in data.dir.
Features: `python -m extract --model Qwen/Qwen2.5-VL-7B-Instruct --items MicroLens-100k_title_en.csv
--media MicroLens-100k_videos --out FEATURES` (see extract/README.md); `caption` expects a caption feature set.
Paper targets (Table 2, Video-LaViT features): DFF H@10 0.1020 N@10 0.0577; ID-only SASRec 0.0909 / 0.0517.
"""

from dff_jax import defaults


def get_config(variant: str | None = None):
    c = defaults.base_config()
    c.data.dir = "data/MicroLens-100k"
    c.data.interactions = "MicroLens-100k_pairs.tsv"
    c.data.format = "microlens_tsv"
    c.features.dir = "features/microlens-100k"
    return defaults.apply_variant(c, variant or "dff")

"""NineRec Bili_Movie with the MicroLens protocol (paper 6.1: "the same preprocessing pipeline, data splitting
strategy, and evaluation protocol ... as established in the MicroLens benchmark").

  python -m dff_jax.train --config configs/bili_movie.py:dff --workdir runs/bili-dff \
      --config.data.dir=data/Bili_Movie --config.features.dir=features/bili-movie

NineRec ships covers and text, not videos (docs/protocol.md section 7): video features need the
videos fetched from Bili_Movie_url.csv first. The pair file's column order is ambiguous in NineRec's own code;
a header row is honoured, and `--config.data.columns=item,user,timestamp` overrides a header-less file.
Paper targets (Table 2): DFF H@10 0.0839 N@10 0.0471; SASRec ID 0.0760 / 0.0441.
"""

from dff_jax import defaults


def get_config(variant: str | None = None):
    c = defaults.base_config()
    c.data.dir = "data/Bili_Movie"
    c.data.interactions = "Bili_Movie_pair.csv"
    c.data.format = "ninerec"
    c.features.dir = "features/bili-movie"
    return defaults.apply_variant(c, variant or "dff")

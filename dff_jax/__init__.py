"""dff_jax: DFF (arXiv 2512.21863) — frozen LVLM multi-layer features fused with item IDs for SASRec, in JAX."""

__version__ = "0.1.0"

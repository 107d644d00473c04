"""Full-ranking HR@K / NDCG@K with history masking (protocol section 3), and an optional sampled mode.

MicroLens (utils/metrics.py::eval_model) scores every item, sets the scores of the user's history to -inf, drops
the padding column and takes the 1-based position of the target after a descending sort. We compute the same rank
without the [B, N] score matrix and without a sort:

    rank = 1 + #{items i in 1..N : i != target, i not in the masked history, score_i > score_target}

scoring the catalogue in chunks of `chunk_size` items, so memory is O(B * chunk_size).

* Ties: by default ("optimistic") only strictly higher scores push the target down, i.e. a tie is resolved in the
  target's favour; "pessimistic" counts every other item scoring >= the target. A sort-based rank falls between.
* A target inside its own masked history is masked too in MicroLens (a repeat consumption) and so can never be
  ranked in the top K: we return N + 1 for it, a miss at every K.
* The target's own score is computed by a separate dot product, and the target item is excluded from the count by
  its index, so rounding differences between the two products can never make the target outrank itself.
* History masking never builds a [B, N] mask: each chunk counts every item above the target, then takes back the
  distinct history items of that chunk that were counted, reading their scores from the same chunk product.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

TIES = ("optimistic", "pessimistic")


@functools.partial(jax.jit, static_argnames=("mask_history", "chunk_size", "ties", "precision", "unroll_limit"))
def target_ranks(
    user_emb: jax.Array,
    item_emb: jax.Array,
    targets: jax.Array,
    history: jax.Array,
    *,
    mask_history: bool = True,
    chunk_size: int = 4096,
    ties: str = "optimistic",
    precision=None,
    unroll_limit: int = 64,
) -> jax.Array:
    """1-based rank of each target among all real items (full ranking, protocol section 3).

    Args:
      user_emb: [B, d] user vectors (SASRec output at the last position).
      item_emb: [N + 1, d] item vectors; row 0 is padding and is never ranked. May be sharded.
      targets: [B] item indices in 1..N.
      history: [B, H] item indices to mask (0 = padding; repeats allowed).
      mask_history: mask history items as MicroLens does; a target in its own history gets rank N + 1.
      chunk_size: items scored at once (static); memory is O(B * chunk_size).
      ties: "optimistic" (count scores > target's) or "pessimistic" (count >=).
      precision: passed to the score matmul (e.g. jax.lax.Precision.HIGHEST).
      unroll_limit: chunk loops up to this many iterations are unrolled (faster on GPU); longer ones use fori_loop.

    Returns:
      [B] int32 ranks in 1..N+1.
    """
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    batch = user_emb.shape[0]
    n_rows = item_emb.shape[0]
    # Equal chunks of at most chunk_size rows, so the shifted last chunk (below) repeats fewer than n_chunks rows.
    n_chunks = math.ceil(n_rows / chunk_size)
    chunk = math.ceil(n_rows / n_chunks)
    targets = targets.astype(jnp.int32)
    history = history.astype(jnp.int32)
    target_emb = jnp.take(item_emb, targets, axis=0)
    target_score = jnp.einsum("bd,bd->b", user_emb, target_emb, preferred_element_type=jnp.float32)[:, None]
    if mask_history:
        # Each distinct real history item is subtracted once. Short rows (MicroLens: H <= 12): compare all pairs;
        # long ones: sort the row and keep the first of equal neighbours.
        if history.shape[1] <= 64:
            earlier = jnp.tril(jnp.ones((history.shape[1],) * 2, bool), k=-1)
            repeat = jnp.any((history[:, :, None] == history[:, None, :]) & earlier, axis=2)
            distinct = ~repeat
        else:
            history = jnp.sort(history, axis=1)
            distinct = jnp.concatenate([history[:, :1] > 0, history[:, 1:] != history[:, :-1]], axis=1)
        subtract = distinct & (history > 0) & (history != targets[:, None])

    def count_chunk(c, count):
        # The last chunk is shifted back to stay inside the table (no padded copy of a possibly sharded table);
        # items it shares with the previous chunk are not counted twice (ids >= lo).
        lo = c * chunk
        start = jnp.minimum(lo, n_rows - chunk)
        block = jax.lax.dynamic_slice_in_dim(item_emb, start, chunk, axis=0)
        scores = jnp.einsum("bd,cd->bc", user_emb, block, preferred_element_type=jnp.float32, precision=precision)
        ids = start + jnp.arange(chunk)
        counted = ((ids >= lo) & (ids >= 1))[None, :] & (ids[None, :] != targets[:, None])
        above = (scores > target_score) if ties == "optimistic" else (scores >= target_score)
        count = count + jnp.sum(counted & above, axis=1, dtype=jnp.int32)
        if mask_history:
            # Masked history items were counted above if they score above the target: take them back out, reading
            # their scores from this same product (so the two decisions can never disagree by rounding).
            local = history - start
            here = subtract & (history >= lo) & (local < chunk)
            hist_scores = jnp.take_along_axis(scores, jnp.clip(local, 0, chunk - 1), axis=1)
            hist_above = (hist_scores > target_score) if ties == "optimistic" else (hist_scores >= target_score)
            count = count - jnp.sum(here & hist_above, axis=1, dtype=jnp.int32)
        return count

    count = jnp.zeros(batch, jnp.int32)
    if n_chunks <= unroll_limit:  # unrolled: no per-iteration loop overhead on GPU, and static slices
        for c in range(n_chunks):
            count = count_chunk(c, count)
    else:
        count = jax.lax.fori_loop(0, n_chunks, count_chunk, count)
    ranks = count + 1
    if mask_history:
        in_history = jnp.any((history == targets[:, None]) & (history > 0), axis=1)
        ranks = jnp.where(in_history, n_rows, ranks)  # n_rows == N + 1: a miss at every K
    return ranks


def metrics_from_ranks(ranks, ks=(10, 20), *, sampled_negatives: int = 0) -> dict:
    """HR@K = mean(rank <= K) and NDCG@K = mean(1/log2(rank + 1) if rank <= K else 0) (protocol section 3).

    Args:
      ranks: [U] ranks of the evaluation users (padding rows already removed).
      ks: cut-offs.
      sampled_negatives: > 0 when the ranks come from `sampled_ranks`; every key is then prefixed
        "sampled<K>/" (e.g. "sampled100/HR@10") so sampled numbers cannot be mistaken for full-ranking ones.

    Returns:
      {"HR@10": ..., "NDCG@10": ..., ...} as Python floats.
    """
    ranks = np.asarray(ranks, dtype=np.float64)
    if ranks.ndim != 1 or len(ranks) == 0:
        raise ValueError(f"expected a non-empty 1-D array of ranks, got shape {ranks.shape}")
    prefix = f"sampled{sampled_negatives}/" if sampled_negatives else ""
    out = {}
    for k in ks:
        hit = ranks <= k
        out[f"{prefix}HR@{k}"] = float(hit.mean())
        out[f"{prefix}NDCG@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 1.0), 0.0).mean())
    return out


def _padded(interacted, batch: int) -> np.ndarray:
    if isinstance(interacted, np.ndarray | jax.Array) and np.ndim(interacted) == 2:
        return np.asarray(interacted, dtype=np.int64)
    rows = [np.fromiter((int(i) for i in row), dtype=np.int64) for row in interacted]
    if len(rows) != batch:
        raise ValueError(f"interacted has {len(rows)} rows for {batch} users")
    out = np.zeros((batch, max([len(r) for r in rows] + [1])), dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def sample_negatives(
    targets, interacted, num_items: int, *, num_negatives: int = 100, rng: np.random.Generator | None = None
) -> np.ndarray:
    """[B, K] negatives for the sampled protocol: uniform over 1..N with replacement, redrawing any that the user
    interacted with or that equal the target (SASRec's `while t in rated`).

    Args:
      targets: [B]; interacted: [B, H] 0-padded item indices, or a sequence of B iterables of item indices.
      num_items: N. num_negatives: K. rng: numpy Generator (default: seeded with 0).
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    targets = np.asarray(targets, dtype=np.int64)
    batch, n_items = len(targets), int(num_items)
    forbid = np.concatenate([_padded(interacted, batch), targets[:, None]], axis=1)
    # Per-row membership with one searchsorted on row-offset keys (no [B, K, H] comparison).
    keys = np.unique((np.arange(batch)[:, None] * (n_items + 1) + forbid)[forbid > 0])
    allowed = n_items - np.bincount(keys // (n_items + 1), minlength=batch)
    if (allowed <= 0).any():
        raise ValueError(f"user rows {np.flatnonzero(allowed <= 0)[:5].tolist()} interacted with every item")

    def forbidden(rows, draws):
        k = rows * (n_items + 1) + draws
        pos = np.minimum(np.searchsorted(keys, k), len(keys) - 1)
        return keys[pos] == k

    rows = np.broadcast_to(np.arange(batch)[:, None], (batch, num_negatives))
    draws = rng.integers(1, n_items + 1, size=(batch, num_negatives))
    bad = forbidden(rows, draws)
    while bad.any():
        draws[bad] = rng.integers(1, n_items + 1, size=int(bad.sum()))
        bad[bad] = forbidden(rows[bad], draws[bad])
    return draws


@functools.partial(jax.jit, static_argnames=("ties",))
def ranks_among(user_emb: jax.Array, item_emb: jax.Array, targets: jax.Array, negatives: jax.Array, *, ties: str):
    """[B] 1-based rank of each target among itself and its [B, K] ``negatives`` (on device; `sampled_ranks`)."""
    target_score = jnp.einsum("bd,bd->b", user_emb, jnp.take(item_emb, targets, axis=0))[:, None]
    neg_scores = jnp.einsum("bd,bkd->bk", user_emb, jnp.take(item_emb, negatives, axis=0))
    above = neg_scores > target_score if ties == "optimistic" else neg_scores >= target_score
    return 1 + jnp.sum(above, axis=1, dtype=jnp.int32)


def sampled_ranks(
    user_emb,
    item_emb,
    targets,
    interacted,
    *,
    num_negatives: int = 100,
    rng: np.random.Generator | None = None,
    ties: str = "optimistic",
) -> np.ndarray:
    """Rank of each target among itself and `num_negatives` sampled items (the original SASRec protocol).

    Negatives are drawn uniformly from 1..N with replacement, redrawing any that the user interacted with or that
    equal the target (SASRec's `while t in rated`). NOT comparable with full ranking: report with
    `metrics_from_ranks(..., sampled_negatives=num_negatives)`.

    Args:
      user_emb: [B, d]; item_emb: [N + 1, d]; targets: [B].
      interacted: [B, H] 0-padded item indices, or a sequence of B iterables of item indices.
      num_negatives: K negatives per user.
      rng: numpy Generator (default: seeded with 0).
      ties: as in `target_ranks`.

    Returns:
      [B] int64 ranks in 1..K+1.
    """
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    user = np.asarray(user_emb, dtype=np.float32)
    items = np.asarray(item_emb, dtype=np.float32)
    targets = np.asarray(targets, dtype=np.int64)
    draws = sample_negatives(targets, interacted, items.shape[0] - 1, num_negatives=num_negatives, rng=rng)
    target_score = np.einsum("bd,bd->b", user, items[targets])[:, None]
    neg_scores = np.einsum("bd,bkd->bk", user, items[draws])
    above = neg_scores > target_score if ties == "optimistic" else neg_scores >= target_score
    return 1 + above.sum(axis=1)

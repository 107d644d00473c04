"""Full-ranking HR@K / NDCG@K with history masking (protocol section 3), and an optional sampled mode.

MicroLens (utils/metrics.py::eval_model) scores every item, sets the scores of the user's history to -inf, drops
the padding column and takes the 1-based position of the target after a descending sort. We compute the same rank
without the [B, N] score matrix and without a sort:

    rank = 1 + #{items i in 1..N : i != target, i not in the masked history, score_i >= score_target}

scoring the catalogue in chunks of `chunk_size` items, so memory is O(B * chunk_size).

* Ties (`eval.ties`, docs/protocol.md section 3): "pessimistic" (the default, as above) ranks the target below
  every item with an equal score, so a tie never counts in its favour; "random" places it uniformly among them
  (seeded per user, `tie_draws`); "optimistic" above them all (only strictly higher scores count). MicroLens's
  argsort leaves the order of ties to the sort implementation.
* A target inside its own masked history is masked too in MicroLens (a repeat consumption) and so can never be
  ranked in the top K: we return N + 1 for it, a miss at every K.
* The target's own score is read from the same chunk product as every other item's (never from a separate dot
  product, which may round differently), and the target is excluded from the counts by its index: an item with the
  target's vector ties with it exactly, and the target can never outrank itself.
* History masking never builds a [B, N] mask: each chunk counts every item above the target, then takes back the
  distinct history items of that chunk that were counted, reading their scores from the same chunk product.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

# Tie policies of the published numbers (docs/protocol.md section 3); "pessimistic" is the default (defaults.py).
TIES = ("pessimistic", "random", "optimistic")
HIGHEST = jax.lax.Precision.HIGHEST


def tie_draws(seed: int, ids: jax.Array) -> jax.Array:
    """[B] uniforms in [0, 1) for the "random" tie policy, one per id (the user's index): a user's draw depends on
    the seed and the user alone, not on the batch size, the batch order or the sharding."""
    key = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i)))(ids.astype(jnp.uint32))


def rank_from_counts(greater: jax.Array, equal: jax.Array, ties: str, draws: jax.Array | None = None) -> jax.Array:
    """1-based rank of a target with `greater` other candidates scoring above it and `equal` level with it.

    pessimistic: below every tied item (never credited for a tie); optimistic: above them all; random: at a uniform
    position among them (`draws` [B] in [0, 1), `tie_draws`), what a sort that breaks ties at random gives.
    """
    if ties == "optimistic":
        return 1 + greater
    if ties == "pessimistic":
        return 1 + greater + equal
    if ties != "random":
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    if draws is None:
        raise ValueError('ties="random" needs draws (metrics.tie_draws)')
    above_in_tie = jnp.floor(draws * (equal + 1).astype(jnp.float32)).astype(jnp.int32)
    return 1 + greater + jnp.minimum(above_in_tie, equal)


@functools.partial(jax.jit, static_argnames=("mask_history", "chunk_size", "ties", "precision", "unroll_limit"))
def target_ranks(
    user_emb: jax.Array,
    item_emb: jax.Array,
    targets: jax.Array,
    history: jax.Array,
    *,
    mask_history: bool = True,
    chunk_size: int = 4096,
    ties: str = "pessimistic",
    draws: jax.Array | None = None,
    precision=HIGHEST,
    unroll_limit: int | None = None,
) -> jax.Array:
    """1-based rank of each target among all real items (full ranking, protocol section 3).

    Args:
      user_emb: [B, d] user vectors (SASRec output at the last position).
      item_emb: [N + 1, d] item vectors; row 0 is padding and is never ranked. May be sharded.
      targets: [B] item indices in 1..N.
      history: [B, H] item indices to mask (0 = padding; repeats allowed).
      mask_history: mask history items as MicroLens does; a target in its own history gets rank N + 1.
      chunk_size: items scored at once (static); memory is O(B * chunk_size).
      ties: "pessimistic" (count scores >= the target's), "optimistic" (count >) or "random" (`rank_from_counts`).
      draws: [B] uniforms for ties="random" (`tie_draws`); unused otherwise.
      precision: of the score matmul; HIGHEST keeps float32 products on GPUs (no TF32 rounding), a no-op on CPUs.
      unroll_limit: chunk loops up to this many iterations are unrolled (faster on GPU); longer ones use fori_loop.
        None: 64 on an accelerator, 0 (always the loop) on the CPU, where XLA schedules the unrolled chunks' score
        products side by side: ~195 MB of temporaries at 1,024 users x 23,716 items whatever the chunk size, against
        one chunk's in the loop, and 5x the CPU time (docs/benchmarks.md, "The original SASRec").

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

    def chunk_scores(c):
        # The last chunk is shifted back to stay inside the table (no padded copy of a possibly sharded table);
        # chunk c owns the ids [lo, start + chunk), so items it shares with the previous chunk count once.
        lo = c * chunk
        start = jnp.minimum(lo, n_rows - chunk)
        block = jax.lax.dynamic_slice_in_dim(item_emb, start, chunk, axis=0)
        scores = jnp.einsum("bd,cd->bc", user_emb, block, preferred_element_type=jnp.float32, precision=precision)
        return lo, start, scores

    def with_target_score(c, target_score, scored=None):
        # The target's score is read from the chunk product that also scores every other item (not from a separate
        # dot product, which may round differently, e.g. under TF32): an item equal to the target ties exactly.
        lo, start, scores = chunk_scores(c) if scored is None else scored
        local = targets - start
        here = (targets >= lo) & (local < chunk)
        mine = jnp.take_along_axis(scores, jnp.clip(local, 0, chunk - 1)[:, None], axis=1)[:, 0]
        return jnp.where(here, mine, target_score)

    def above(scores, t):
        # Only the random policy needs the ties apart: the others count them with `greater` (pessimistic: scores >=
        # the target's, `equal` stays 0) or not at all, one pass over each chunk's scores instead of two.
        return scores >= t if ties == "pessimistic" else scores > t

    def count_chunk(c, counts, target_score, scored=None):
        lo, start, scores = chunk_scores(c) if scored is None else scored
        greater, equal = counts
        t = target_score[:, None]
        ids = start + jnp.arange(chunk)
        counted = ((ids >= lo) & (ids >= 1))[None, :] & (ids[None, :] != targets[:, None])
        greater = greater + jnp.sum(counted & above(scores, t), axis=1, dtype=jnp.int32)
        if ties == "random":
            equal = equal + jnp.sum(counted & (scores == t), axis=1, dtype=jnp.int32)
        if mask_history:
            # Masked history items were counted above if they score at or above the target: take them back out,
            # reading their scores from this same product (so the two decisions can never disagree by rounding).
            local = history - start
            here = subtract & (history >= lo) & (local < chunk)
            hist_scores = jnp.take_along_axis(scores, jnp.clip(local, 0, chunk - 1), axis=1)
            greater = greater - jnp.sum(here & above(hist_scores, t), axis=1, dtype=jnp.int32)
            if ties == "random":
                equal = equal - jnp.sum(here & (hist_scores == t), axis=1, dtype=jnp.int32)
        return greater, equal

    zeros = jnp.zeros(batch, jnp.int32)
    if n_chunks == 1:  # one product gives the target's score and every other score
        scored = chunk_scores(0)
        target_score = with_target_score(0, jnp.zeros(batch, jnp.float32), scored)
        greater, equal = count_chunk(0, (zeros, zeros), target_score, scored)
    else:
        # Two passes over the chunks: the targets' scores first, then the counts (the scores are computed twice,
        # so memory stays O(B * chunk_size)). The first pass is a loop so that XLA cannot merge its products with
        # the second pass's and keep every chunk's scores alive at once.
        target_score = jax.lax.fori_loop(0, n_chunks, with_target_score, jnp.zeros(batch, jnp.float32))
        if unroll_limit is None:
            unroll_limit = 0 if jax.default_backend() == "cpu" else 64
        if n_chunks <= unroll_limit:  # unrolled: no per-iteration loop overhead on GPU, and static slices
            counts = (zeros, zeros)
            for c in range(n_chunks):
                counts = count_chunk(c, counts, target_score)
            greater, equal = counts
        else:
            greater, equal = jax.lax.fori_loop(
                0, n_chunks, lambda c, counts: count_chunk(c, counts, target_score), (zeros, zeros)
            )
    ranks = rank_from_counts(greater, equal, ties, draws)
    if mask_history:
        in_history = jnp.any((history == targets[:, None]) & (history > 0), axis=1)
        ranks = jnp.where(in_history, n_rows, ranks)  # n_rows == N + 1: a miss at every K
    return ranks


def metrics_from_ranks(ranks, ks=(10, 20), *, sampled_negatives: int = 0) -> dict:
    """HR@K = mean(rank <= K) and NDCG@K = mean(1/log2(rank + 1) if rank <= K else 0) (protocol section 3).

    Args:
      ranks: [U] ranks of the evaluation users (padding rows already removed).
      ks: cut-offs.
      sampled_negatives: > 0 when the ranks are among sampled negatives (`ranks_among`); every key is then prefixed
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


def forbidden_items(targets, interacted, num_items: int) -> tuple[np.ndarray, np.ndarray]:
    """(sorted keys row * (N + 1) + item of each row's target and interacted items, [B] how many of the N items
    each row may still draw as a negative); `interacted` as in `sample_negatives`."""
    targets = np.asarray(targets, dtype=np.int64)
    batch = len(targets)
    forbid = np.concatenate([_padded(interacted, batch), targets[:, None]], axis=1)
    # Per-row membership with one searchsorted on row-offset keys (no [B, K, H] comparison).
    keys = np.unique((np.arange(batch)[:, None] * (num_items + 1) + forbid)[forbid > 0])
    return keys, num_items - np.bincount(keys // (num_items + 1), minlength=batch)


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
    batch, n_items = len(targets), int(num_items)
    keys, allowed = forbidden_items(targets, interacted, n_items)
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
def ranks_among(user_emb, item_emb, targets, negatives, *, ties: str, draws=None):
    """[B] 1-based rank of each target among itself and its [B, K] ``negatives`` (the original SASRec protocol, on device;
    negatives from `sample_negatives`).

    The target and its negatives are scored by one product, so a negative equal to the target ties exactly."""
    candidates = jnp.concatenate([targets[:, None], negatives], axis=1)
    scores = jnp.einsum("bd,bkd->bk", user_emb, jnp.take(item_emb, candidates, axis=0), precision=HIGHEST)
    target, others = scores[:, :1], scores[:, 1:]
    greater = jnp.sum(others > target, axis=1, dtype=jnp.int32)
    equal = jnp.sum(others == target, axis=1, dtype=jnp.int32)
    return rank_from_counts(greater, equal, ties, draws)

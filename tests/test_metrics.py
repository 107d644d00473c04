"""Full-ranking metrics against a brute-force numpy reference (MicroLens utils/metrics.py::eval_model)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dff_jax import metrics


def brute_force_ranks(user, items, targets, history, mask_history=True, ties="pessimistic"):
    """MicroLens's recipe: score everything, history -> -inf, drop the padding column, rank the target."""
    n = items.shape[0] - 1
    ranks = []
    for b in range(len(targets)):
        scores = items @ user[b]
        t = targets[b]
        hist = {int(i) for i in history[b] if i > 0} if mask_history else set()
        if t in hist:
            ranks.append(n + 1)  # masked target: a miss
            continue
        others = [i for i in range(1, n + 1) if i != t and i not in hist]
        if ties == "optimistic":
            ranks.append(1 + sum(scores[i] > scores[t] for i in others))
        else:  # pessimistic: every tied item above the target
            ranks.append(1 + sum(scores[i] >= scores[t] for i in others))
    return np.array(ranks)


def tie_heavy_case(seed, batch=9, n_items=37, dim=3, hist_len=6):
    # Small integer embeddings make exact score ties frequent and float32 products exact.
    rng = np.random.default_rng(seed)
    user = rng.integers(-2, 3, (batch, dim)).astype(np.float32)
    items = rng.integers(-1, 2, (n_items + 1, dim)).astype(np.float32)
    targets = rng.integers(1, n_items + 1, batch)
    history = rng.integers(0, n_items + 1, (batch, hist_len))
    history[:, -2:] = 0  # padding
    history[0, 1] = history[0, 0]  # duplicate history entries
    history[1, 2] = targets[1]  # target inside its own history -> miss
    history[2, :] = 0  # empty history
    return user, items, targets, history


@pytest.mark.parametrize("ties", ["optimistic", "pessimistic"])
@pytest.mark.parametrize("mask_history", [True, False])
@pytest.mark.parametrize("chunk_size, unroll_limit", [(5, 0), (16, 64), (38, 0), (4096, 64)])
def test_target_ranks_match_brute_force(ties, mask_history, chunk_size, unroll_limit):
    # unroll_limit 0 forces the fori_loop path, 64 the unrolled one; 38 = N + 1 is a single exact chunk.
    for seed in range(3):
        user, items, targets, history = tie_heavy_case(seed)
        got = np.asarray(
            metrics.target_ranks(
                user,
                items,
                targets,
                history,
                mask_history=mask_history,
                chunk_size=chunk_size,
                ties=ties,
                unroll_limit=unroll_limit,
            )
        )
        want = brute_force_ranks(user, items, targets, history, mask_history, ties)
        np.testing.assert_array_equal(got, want)


def test_target_ranks_on_cpu_hold_one_chunk_of_scores():
    # The default on the CPU is the chunk loop: the unrolled form let XLA keep every chunk's [B, chunk] scores alive
    # at once (~195 MB at 1,024 x 23,716 whatever the chunk size), each call faulting in fresh pages.
    user = jax.random.normal(jax.random.key(0), (256, 16))
    items = jax.random.normal(jax.random.key(1), (20_001, 16))
    targets = jnp.arange(1, 257, dtype=jnp.int32)
    history = jax.random.randint(jax.random.key(2), (256, 12), 0, 20_001)

    def temp_bytes(**kw):
        fn = jax.jit(lambda u, t, h: metrics.target_ranks(u, items, t, h, chunk_size=1000, **kw))
        return fn.lower(user, targets, history).compile().memory_analysis().temp_size_in_bytes

    chunk_scores = 256 * 1000 * 4
    assert jax.default_backend() != "cpu" or temp_bytes() < 4 * chunk_scores < temp_bytes(unroll_limit=64)
    np.testing.assert_array_equal(
        np.asarray(metrics.target_ranks(user, items, targets, history, chunk_size=1000)),
        np.asarray(metrics.target_ranks(user, items, targets, history, chunk_size=1000, unroll_limit=64)),
    )


def test_ties_actually_occur_and_rules_differ():
    user, items, targets, history = tie_heavy_case(0)
    opt = np.asarray(metrics.target_ranks(user, items, targets, history, chunk_size=8, ties="optimistic"))
    pes = np.asarray(metrics.target_ranks(user, items, targets, history, chunk_size=8))  # the default
    assert (pes >= opt).all() and (pes > opt).any()


def test_masked_target_is_a_miss_and_padding_never_counts():
    n = 10
    items = np.zeros((n + 1, 2), np.float32)
    items[0] = [100.0, 100.0]  # the padding row scores highest but must never count
    items[1:, 0] = np.arange(n, 0, -1)  # item 1 scores 10, item 10 scores 1
    user = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]], np.float32)
    targets = np.array([3, 3, 5])
    history = np.array([[1, 1, 0], [3, 0, 0], [0, 0, 0]])
    ranks = np.asarray(metrics.target_ranks(user, items, targets, history, chunk_size=4))  # no ties here
    # user 0: items 1, 2 above item 3, item 1 masked (twice) -> rank 2; user 1: target in history -> N+1.
    np.testing.assert_array_equal(ranks, [2, n + 1, 5])
    unmasked = np.asarray(metrics.target_ranks(user, items, targets, history, mask_history=False, chunk_size=4))
    np.testing.assert_array_equal(unmasked, [3, 3, 5])


def test_random_float_scores_match_argsort_rank():
    # With continuous scores there are no ties; the rank equals the 1-based argsort position MicroLens takes.
    rng = np.random.default_rng(1)
    b, n, d = 16, 300, 8
    user = rng.normal(size=(b, d)).astype(np.float32)
    items = rng.normal(size=(n + 1, d)).astype(np.float32)
    targets = rng.integers(1, n + 1, b)
    history = rng.integers(0, n + 1, (b, 7))
    history[history == targets[:, None]] = 0
    got = np.asarray(metrics.target_ranks(user, items, targets, history, chunk_size=64))
    for i in range(b):
        scores = (items @ user[i]).astype(np.float64)
        scores[history[i][history[i] > 0]] = -np.inf
        scores = scores[1:]
        order = np.argsort(-scores)
        assert got[i] == int(np.flatnonzero(order == targets[i] - 1)[0]) + 1


def test_metrics_from_ranks_formulas_and_labels():
    ranks = np.array([1, 3, 10, 11, 20, 21, 5000])
    m = metrics.metrics_from_ranks(ranks, ks=(10, 20))
    assert set(m) == {"HR@10", "NDCG@10", "HR@20", "NDCG@20"}
    assert m["HR@10"] == pytest.approx(3 / 7)
    assert m["NDCG@10"] == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(11)) / 7)
    assert m["HR@20"] == pytest.approx(5 / 7)
    assert m["NDCG@20"] == pytest.approx(
        (1 + 1 / math.log2(4) + 1 / math.log2(11) + 1 / math.log2(12) + 1 / math.log2(21)) / 7
    )
    s = metrics.metrics_from_ranks(ranks, ks=(10,), sampled_negatives=100)
    assert set(s) == {"sampled100/HR@10", "sampled100/NDCG@10"}
    with pytest.raises(ValueError):
        metrics.metrics_from_ranks(np.array([]))


def sampled_ranks(
    user_emb,
    item_emb,
    targets,
    interacted,
    *,
    num_negatives: int = 100,
    rng: np.random.Generator | None = None,
    ties: str = "pessimistic",
) -> np.ndarray:
    """The numpy reference of the sampled protocol (evaluate: `metrics.sample_negatives` + `metrics.ranks_among`):
    the rank of each target among itself and `num_negatives` sampled items (the original SASRec protocol).

    Negatives are drawn uniformly from 1..N with replacement, redrawing any that the user interacted with or that
    equal the target (SASRec's `while t in rated`). NOT comparable with full ranking: report with
    `metrics.metrics_from_ranks(..., sampled_negatives=num_negatives)`.

    Args:
      user_emb: [B, d]; item_emb: [N + 1, d]; targets: [B].
      interacted: [B, H] 0-padded item indices, or a sequence of B iterables of item indices.
      num_negatives: K negatives per user.
      rng: numpy Generator (default: seeded with 0); with ties="random" it also draws the tie positions.
      ties: as in `target_ranks`.

    Returns:
      [B] int64 ranks in 1..K+1.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    user = np.asarray(user_emb, dtype=np.float32)
    items = np.asarray(item_emb, dtype=np.float32)
    targets = np.asarray(targets, dtype=np.int64)
    draws = metrics.sample_negatives(targets, interacted, items.shape[0] - 1, num_negatives=num_negatives, rng=rng)
    scores = np.einsum("bd,bkd->bk", user, items[np.concatenate([targets[:, None], draws], axis=1)])
    greater = (scores[:, 1:] > scores[:, :1]).sum(axis=1)
    equal = (scores[:, 1:] == scores[:, :1]).sum(axis=1)
    if ties == "optimistic":
        return 1 + greater
    if ties == "pessimistic":
        return 1 + greater + equal
    return 1 + greater + np.minimum(np.floor(rng.random(len(targets)) * (equal + 1)).astype(np.int64), equal)


def test_sampled_ranks_avoid_interacted_items_and_match_brute_force():
    rng = np.random.default_rng(0)
    b, n, d, k = 6, 40, 3, 25
    user = rng.integers(-2, 3, (b, d)).astype(np.float32)
    items = rng.integers(-1, 2, (n + 1, d)).astype(np.float32)
    targets = rng.integers(1, n + 1, b)
    history = rng.integers(0, n + 1, (b, 30))  # most of the catalogue: many collisions to redraw
    drawn = []
    ranks = sampled_ranks(user, items, targets, history, num_negatives=k, rng=np.random.default_rng(3))
    assert ranks.shape == (b,) and ranks.min() >= 1 and ranks.max() <= k + 1
    # Re-derive the negatives with the same generator stream and check them against the brute-force definition.
    negs = _replay_negatives(targets, history, n, k, np.random.default_rng(3))
    for i in range(b):
        forbidden = set(history[i][history[i] > 0].tolist()) | {int(targets[i])}
        assert not forbidden & set(negs[i].tolist())
        s = items @ user[i]
        assert ranks[i] == 1 + int((s[negs[i]] >= s[targets[i]]).sum())  # pessimistic ties, the default
        drawn.extend(negs[i].tolist())
    assert len(set(drawn)) > 5
    # The list-of-sets form gives the same answer as the padded form.
    as_sets = [set(r[r > 0].tolist()) for r in history]
    same = sampled_ranks(user, items, targets, as_sets, num_negatives=k, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(same, ranks)


def _replay_negatives(targets, history, n, k, rng):
    """The documented sampling rule, written plainly: uniform draws, redraw the forbidden ones in row-major order."""
    b = len(targets)
    forbid = [set(history[i][history[i] > 0].tolist()) | {int(targets[i])} for i in range(b)]
    draws = rng.integers(1, n + 1, size=(b, k))
    bad = np.array([[draws[i, j] in forbid[i] for j in range(k)] for i in range(b)])
    while bad.any():
        draws[bad] = rng.integers(1, n + 1, size=int(bad.sum()))
        bad = np.array([[draws[i, j] in forbid[i] for j in range(k)] for i in range(b)])
    return draws


def test_sampled_ranks_fails_when_no_negative_exists():
    items = np.ones((4, 2), np.float32)
    with pytest.raises(ValueError, match="every item"):
        sampled_ranks(np.ones((1, 2)), items, np.array([1]), np.array([[2, 3]]), num_negatives=5)


def test_long_history_rows_use_the_sorted_dedupe():
    # H > 64 takes the sort-based dedupe path (window = 0 protocols); repeats and padding included.
    rng = np.random.default_rng(5)
    user, items, targets, _ = tie_heavy_case(7, batch=5)
    history = rng.integers(0, 20, (5, 70))  # about 3.5 copies of each of items 1..19
    history[history == targets[:, None]] = 0
    history[0, :] = 0
    history[1, 40] = targets[1]
    got = np.asarray(metrics.target_ranks(user, items, targets, history, chunk_size=16))
    np.testing.assert_array_equal(got, brute_force_ranks(user, items, targets, history))
    assert got[1] == 38  # N + 1
    assert (got[2:] < 38).all() and (got[2:] > 1).any()  # informative rows, not all misses


def duplicate_rows_case(dim=64, n_items=300, copies=4, batch=24, seed=0):
    """A `replace`-style item table: a random projection of feature rows where each target's feature row appears
    `copies` more times (items whose content is identical), in other chunks too; continuous scores otherwise."""
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n_items + 1, 32)).astype(np.float32)
    targets = rng.choice(np.arange(1, n_items + 1), batch, replace=False)
    free = np.setdiff1d(np.arange(1, n_items + 1), targets)
    dups = rng.choice(free, (batch, copies), replace=False)
    feats[dups] = feats[targets][:, None, :]
    proj = rng.normal(size=(32, dim)).astype(np.float32) / np.sqrt(32)
    items = feats @ proj + rng.normal(size=dim).astype(np.float32)
    user = rng.normal(size=(batch, dim)).astype(np.float32)
    history = np.zeros((batch, 3), np.int64)
    history[0, 0] = dups[0, 0]  # a masked duplicate is not a tie any more
    return user, items, targets, history, dups


@pytest.mark.parametrize("chunk_size", [301, 64])  # one chunk (one product) and five (two passes)
def test_identical_items_tie_exactly_and_the_policies_order_them(chunk_size):
    user, items, targets, history, dups = duplicate_rows_case()
    ties_of_target = np.array([len(set(d.tolist()) - set(h.tolist())) for d, h in zip(dups, history, strict=True)])

    def ranks(ties, seed=0):
        draws = metrics.tie_draws(seed, np.arange(len(targets))) if ties == "random" else None
        return np.asarray(
            metrics.target_ranks(user, items, targets, history, chunk_size=chunk_size, ties=ties, draws=draws)
        )

    opt, pes = ranks("optimistic"), ranks("pessimistic")
    default = np.asarray(metrics.target_ranks(user, items, targets, history, chunk_size=chunk_size))
    # Every duplicate of the target scores exactly the target's score (the same product), so the policies differ by
    # exactly the number of unmasked duplicates; the default never credits the target for a tie.
    np.testing.assert_array_equal(pes - opt, ties_of_target)
    np.testing.assert_array_equal(default, pes)
    want = brute_force_ranks(user.astype(np.float64), items.astype(np.float64), targets, history, ties="optimistic")
    np.testing.assert_array_equal(opt, want)  # the non-tied items rank as in float64
    rand = [ranks("random", seed) for seed in range(40)]
    assert all(((opt <= r) & (r <= pes)).all() for r in rand)
    np.testing.assert_array_equal(rand[0], ranks("random", 0))  # seeded: the same draws again
    spread = np.stack(rand) - opt
    assert set(np.unique(spread)) == set(range(ties_of_target.max() + 1))  # every position within a tie occurs
    assert abs(spread[:, 1:].mean() - ties_of_target[1:].mean() / 2) < 0.3  # uniform: on average mid-tie


def test_random_ties_do_not_depend_on_the_batch():
    # A user's draw depends on the seed and the user's index, so splitting the users into batches changes nothing.
    user, items, targets, history, _ = duplicate_rows_case()
    ids = np.arange(len(targets)) + 1000
    whole = metrics.target_ranks(user, items, targets, history, ties="random", draws=metrics.tie_draws(7, ids))
    halves = [
        metrics.target_ranks(user[s], items, targets[s], history[s], ties="random", draws=metrics.tie_draws(7, ids[s]))
        for s in (slice(0, 10), slice(10, None))
    ]
    np.testing.assert_array_equal(np.asarray(whole), np.concatenate([np.asarray(h) for h in halves]))
    with pytest.raises(ValueError, match="draws"):
        metrics.target_ranks(user, items, targets, history, ties="random")


def test_sampled_ranks_score_the_target_with_its_negatives():
    # A negative identical to the target ties with it exactly, on the device and in the numpy reference.
    user, items, targets, _, dups = duplicate_rows_case(copies=1)
    negatives = np.concatenate([dups, np.ones((len(targets), 3), np.int64) * 5], axis=1)
    negatives[negatives == targets[:, None]] = 6
    dev = {
        t: np.asarray(
            metrics.ranks_among(
                user, items, targets, negatives, ties=t, draws=metrics.tie_draws(0, np.arange(len(targets)))
            )
        )
        for t in metrics.TIES
    }
    np.testing.assert_array_equal(dev["pessimistic"] - dev["optimistic"], np.ones(len(targets)))
    assert ((dev["random"] == dev["optimistic"]) | (dev["random"] == dev["pessimistic"])).all()

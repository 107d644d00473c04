"""Each loss of dff_jax.losses against a plain numpy implementation on tiny random inputs."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from dff_jax import losses
from dff_jax import defaults
from dff_jax.models import Recommender

RTOL = 1e-5


def _log_softmax_ce(logits, label):
    m = logits.max()
    return m + np.log(np.exp(logits - m).sum()) - logits[label]


def _batch(rng, b=3, length=4, n=9):
    """Left-padded windows with repeats; row 0 is short, row 2 is all padding (the padded tail of an epoch)."""
    window = rng.integers(1, n + 1, size=(b, length + 1)).astype(np.int32)
    window[0, :2] = 0
    window[1, 1] = window[1, 3]  # a repeated item inside one user's window
    window[b - 1] = 0
    return window[:, :-1].copy(), window[:, 1:].copy(), window


def test_inbatch_logq_matches_numpy_loop():
    rng = np.random.default_rng(0)
    b, length, d, n = 3, 4, 5, 9
    inputs, targets, window = _batch(rng, b, length, n)
    window[2] = [0, 0, 3, 7, 3]  # another user sharing item 3 with nobody else's masking
    inputs, targets = window[:, :-1].copy(), window[:, 1:].copy()
    seq_out = rng.normal(size=(b, length, d)).astype(np.float32)
    window_emb = rng.normal(size=(b, length + 1, d)).astype(np.float32)
    log_pop = np.log(rng.dirichlet(np.ones(n + 1))).astype(np.float32)

    # numpy: MicroLens model.py forward, written as loops.
    cand = window.reshape(-1)
    cand_emb = window_emb.reshape(-1, d)
    total, count = 0.0, 0
    for u in range(b):
        for j in range(length):
            if inputs[u, j] == 0 or targets[u, j] == 0:
                continue
            label = u * (length + 1) + j + 1
            logits = seq_out[u, j] @ cand_emb.T - log_pop[cand]
            for c in range(len(cand)):
                if c != label and (cand[c] == 0 or cand[c] in window[u]):
                    logits[c] = -1e4
            total += _log_softmax_ce(logits.astype(np.float64), label)
            count += 1
    expected = total / count

    valid = (inputs != 0) & (targets != 0)
    loss, n_pos = losses.inbatch_logq_loss(
        jnp.asarray(seq_out), jnp.asarray(window_emb), jnp.asarray(window), jnp.asarray(valid), jnp.asarray(log_pop)
    )
    assert int(n_pos) == count
    np.testing.assert_allclose(float(loss), expected, rtol=RTOL)

    # Without logQ the result must change (the correction is really applied).
    loss_plain, _ = losses.inbatch_logq_loss(
        jnp.asarray(seq_out), jnp.asarray(window_emb), jnp.asarray(window), jnp.asarray(valid), None
    )
    assert abs(float(loss_plain) - expected) > 1e-3


def test_inbatch_masks_other_users_copies_of_own_items():
    # Two users with the same next item 3. MicroLens masks candidates by item id, so user 1's slot holding item 3
    # is masked for user 0 (item 3 is in user 0's own window); only the label slot itself stays.
    window = np.array([[1, 2, 3], [4, 5, 3]], np.int32)
    d = 2
    seq_out = np.zeros((2, 2, d), np.float32)
    seq_out[0, 1] = [1.0, 0.0]
    emb = np.zeros((2, 3, d), np.float32)
    emb[:, 2] = [5.0, 0.0]  # item 3 in both rows
    valid = np.ones((2, 2), bool)
    loss, _ = losses.inbatch_logq_loss(
        jnp.asarray(seq_out), jnp.asarray(emb), jnp.asarray(window), jnp.asarray(valid), None
    )
    # Position (0, 1): label (logit 5) + items 4, 5 (logit 0); user 1's copy of item 3 and user 0's items 1, 2 sit
    # at -1e4. CE = log(e^5 + 2) - 5. Position (0, 0): label item 2 (0) + items 4, 5 (0): log 3.
    # User 1 positions (zero outputs): label + user 0's items 1, 2 (item 3 is user 1's own): log 3 each.
    ce01 = np.log(np.exp(5.0) + 2) - 5.0
    expected = (np.log(3.0) + ce01 + 2 * np.log(3.0)) / 4
    np.testing.assert_allclose(float(loss), expected, rtol=RTOL)


def test_full_softmax_matches_numpy():
    rng = np.random.default_rng(1)
    b, length, d, n = 3, 4, 5, 9
    inputs, targets, _ = _batch(rng, b, length, n)
    seq_out = rng.normal(size=(b, length, d)).astype(np.float32)
    item_emb = rng.normal(size=(n + 1, d)).astype(np.float32)
    total, count = 0.0, 0
    for u in range(b):
        for j in range(length):
            if inputs[u, j] and targets[u, j]:
                logits = (seq_out[u, j] @ item_emb[1:].T).astype(np.float64)
                total += _log_softmax_ce(logits, targets[u, j] - 1)
                count += 1
    valid = (inputs != 0) & (targets != 0)
    loss, n_pos = losses.full_softmax_loss(
        jnp.asarray(seq_out), jnp.asarray(item_emb), jnp.asarray(targets), jnp.asarray(valid)
    )
    assert int(n_pos) == count
    np.testing.assert_allclose(float(loss), total / count, rtol=RTOL)


@pytest.mark.parametrize("logq", [False, True])
def test_sampled_softmax_matches_numpy(logq):
    rng = np.random.default_rng(2)
    b, length, d, n, k = 3, 4, 5, 9, 6
    inputs, targets, _ = _batch(rng, b, length, n)
    seq_out = rng.normal(size=(b, length, d)).astype(np.float32)
    item_emb = rng.normal(size=(n + 1, d)).astype(np.float32)
    negatives = rng.integers(1, n + 1, size=k).astype(np.int32)
    negatives[0] = targets[1, 2]  # guarantee a negative equal to some positive
    q = rng.dirichlet(np.ones(n)).astype(np.float64)
    log_kq = np.concatenate([[0.0], np.log(k * q)]).astype(np.float32)
    total, count = 0.0, 0
    for u in range(b):
        for j in range(length):
            if not (inputs[u, j] and targets[u, j]):
                continue
            t = targets[u, j]
            logits = [seq_out[u, j] @ item_emb[t] - (log_kq[t] if logq else 0.0)]
            for neg in negatives:
                if neg != t:
                    logits.append(seq_out[u, j] @ item_emb[neg] - (log_kq[neg] if logq else 0.0))
            total += _log_softmax_ce(np.array(logits, np.float64), 0)
            count += 1
    valid = (inputs != 0) & (targets != 0)
    loss, _ = losses.sampled_softmax_loss(
        jnp.asarray(seq_out),
        jnp.asarray(item_emb[targets]),
        jnp.asarray(item_emb[negatives]),
        jnp.asarray(targets),
        jnp.asarray(negatives),
        jnp.asarray(valid),
        jnp.asarray(log_kq[targets]) if logq else None,
        jnp.asarray(log_kq[negatives]) if logq else None,
    )
    np.testing.assert_allclose(float(loss), total / count, rtol=RTOL)


def test_bce_matches_numpy():
    rng = np.random.default_rng(3)
    b, length, d, n = 3, 4, 5, 9
    inputs, targets, _ = _batch(rng, b, length, n)
    seq_out = rng.normal(size=(b, length, d)).astype(np.float32)
    pos_emb = rng.normal(size=(b, length, d)).astype(np.float32)
    neg_emb = rng.normal(size=(b, length, d)).astype(np.float32)
    neg_ok = rng.random((b, length)) > 0.2

    def bce(x, y):  # numerically plain formula, float64
        p = 1.0 / (1.0 + np.exp(-x))
        return -(y * np.log(p) + (1 - y) * np.log(1 - p))

    valid = (inputs != 0) & (targets != 0)
    pos = (seq_out * pos_emb).sum(-1).astype(np.float64)
    neg = (seq_out * neg_emb).sum(-1).astype(np.float64)
    expected = bce(pos[valid], 1.0).mean() + bce(neg[valid & neg_ok], 0.0).mean()
    loss, _ = losses.bce_loss(*(jnp.asarray(a) for a in (seq_out, pos_emb, neg_emb, valid, neg_ok)))
    np.testing.assert_allclose(float(loss), expected, rtol=RTOL)


def test_bce_negatives_avoid_the_users_window():
    window = jnp.asarray(np.array([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]], np.int32))
    neg, ok = losses.sample_bce_negatives(jax.random.key(0), window, num_items=10, rounds=8)
    neg, ok = np.asarray(neg), np.asarray(ok)
    assert neg.shape == (2, 4) and neg.min() >= 1 and neg.max() <= 10
    for u in range(2):
        for j in range(4):
            assert ok[u, j] == (neg[u, j] not in np.asarray(window[u]))
    assert ok.mean() > 0.9  # 8 rounds with a 50 % collision chance leave almost none
    # A user owning every item: no negative can be valid, and it is reported, not silently kept.
    full = jnp.asarray(np.array([[1, 2, 3, 3, 1]], np.int32))
    _, ok_full = losses.sample_bce_negatives(jax.random.key(1), full, num_items=3)
    assert not np.asarray(ok_full).any()


def test_proposals_and_shared_negatives():
    log_pop = jnp.log(jnp.array([0.5, 0.1, 0.0, 0.9]))  # item 2 never seen -> never sampled by "pop"
    log_q = losses.proposal_log_probs(3, log_pop, "pop")
    np.testing.assert_allclose(np.exp(np.asarray(log_q)), [0.0, 0.1, 0.0, 0.9], rtol=1e-6)
    negs = np.asarray(losses.sample_shared_negatives(jax.random.key(0), 2000, log_q))
    assert set(negs.tolist()) <= {1, 3} and 0.85 < (negs == 3).mean() < 0.95
    uni = np.exp(np.asarray(losses.proposal_log_probs(4, None, "uniform")))
    np.testing.assert_allclose(uni, [0.0, 0.25, 0.25, 0.25, 0.25], rtol=1e-6)
    with pytest.raises(ValueError, match="proposal"):
        losses.proposal_log_probs(4, None, "zipf")


def test_bf16_inputs_give_float32_logits():
    # With train.compute_dtype=bfloat16 the embeddings arrive in bf16; the logits must still be accumulated and kept
    # in float32 (rounding logits of size ~10 to bf16 moves them by ~0.05, far beyond this tolerance).
    rng = np.random.default_rng(7)
    b, length, d, n = 3, 4, 16, 9
    inputs, targets, window = _batch(rng, b, length, n)
    valid = jnp.asarray((inputs != 0) & (targets != 0))
    seq16 = jnp.asarray(rng.normal(size=(b, length, d)) * 1.5, jnp.bfloat16)
    win16 = jnp.asarray(rng.normal(size=(b, length + 1, d)) * 1.5, jnp.bfloat16)
    item16 = jnp.asarray(rng.normal(size=(n + 1, d)) * 1.5, jnp.bfloat16)
    f32 = lambda x: x.astype(jnp.float32)  # the same (already bf16-rounded) values in float32
    got = losses.inbatch_logq_loss(seq16, win16, jnp.asarray(window), valid, None)[0]
    want = losses.inbatch_logq_loss(f32(seq16), f32(win16), jnp.asarray(window), valid, None)[0]
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), float(want), rtol=RTOL)
    got = losses.full_softmax_loss(seq16, item16, jnp.asarray(targets), valid)[0]
    want = losses.full_softmax_loss(f32(seq16), f32(item16), jnp.asarray(targets), valid)[0]
    np.testing.assert_allclose(float(got), float(want), rtol=RTOL)


def _tiny_model(encoder="fusion"):
    cfg = defaults.base_config().model.to_dict()
    cfg.update(embed_dim=8, num_blocks=1, max_seq_len=4, item_encoder=encoder, content="learned", gate_hidden=8)
    feats = np.random.default_rng(0).normal(size=(10, 3, 6)).astype(np.float32)
    feats[0] = 0
    return Recommender(9, None if encoder == "id" else feats, **cfg, rngs=nnx.Rngs(0))


def test_compute_loss_runs_jitted_with_gradients():
    # All four losses in ONE jitted function: one compilation keeps the test fast on a shared 2-core machine.
    model = _tiny_model()
    rng = np.random.default_rng(4)
    inputs, targets, _ = _batch(rng, 3, 4, 9)
    batch = {"inputs": jnp.asarray(inputs), "targets": jnp.asarray(targets)}
    log_pop = jnp.log(jnp.full((10,), 0.1))
    cfgs = {
        name: ml_collections.ConfigDict({"name": name, "num_negatives": 5, "proposal": "pop", "logq": True})
        for name in losses.LOSSES
    }
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def step(params, rest, key):
        def f(p, cfg):
            return losses.compute_loss(nnx.merge(graphdef, p, rest), batch, key, log_pop, **cfg)

        return {name: jax.value_and_grad(f, has_aux=True)(params, cfg) for name, cfg in cfgs.items()}

    results = step(params, rest, jax.random.key(0))
    for name, ((loss, aux), grads) in results.items():
        assert np.isfinite(float(loss)) and float(loss) > 0, name
        assert int(aux["positions"]) == int(((inputs != 0) & (targets != 0)).sum()), name
        assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads)), name
        assert float(np.abs(np.asarray(grads["items"]["item_id"][...])[0]).max()) == 0.0, (
            name
        )  # padding row: no gradient
        assert float(np.abs(np.asarray(grads["items"]["content"]["layer_logits"][...])).sum()) > 0, (
            name
        )  # alpha is trained


def test_compute_loss_rejects_unknown_name():
    model = _tiny_model("id")
    batch = {"inputs": jnp.ones((1, 4), jnp.int32), "targets": jnp.ones((1, 4), jnp.int32)}
    with pytest.raises(ValueError, match="name must be one of"):
        losses.compute_loss(
            model, batch, jax.random.key(0), None, name="bpr", num_negatives=1, proposal="uniform", logq=False
        )

"""Training losses for next-item prediction.

Every loss is a pure function of arrays (sequence outputs, candidate embeddings, item ids, masks) so it can be
checked against a plain numpy implementation; ``compute_loss`` wires one of them to a ``Recommender`` and a batch.

* ``inbatch_logq_loss``: the MicroLens SASRec loss (docs/protocol.md section 4): in-batch
  softmax over all B*(L+1) item slots of the batch, logQ popularity correction, own-sequence masking to -1e4.
  Note: the protocol text says other users' copies of the positive are kept; MicroLens's code masks by item id,
  and the positive is one of the user's own L+1 items, so those copies ARE masked. We follow the code.
* ``full_softmax_loss``: cross-entropy over all N items.
* ``sampled_softmax_loss``: K shared negatives (uniform or popularity proposal), logQ-corrected.
* ``bce_loss``: one random negative per position, binary cross-entropy (NineRec / original SASRec, docs/protocol.md
  section 7).

A position counts when it has an input item and a target (``inputs != 0`` and ``targets != 0``): with left padding
the first item of a short history is a target at a padding input; MicroLens skips it (``log_mask`` marks inputs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dff_jax.models import as_impl

LOSSES = ("inbatch_logq", "full_softmax", "sampled_softmax", "bce")
INBATCH_MASK = -1e4  # the value MicroLens writes into masked in-batch logits
NEG_INF = -1e9  # for candidates that must never win (padding column, negatives equal to the positive)


def _masked_mean(values: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    count = mask.sum()
    return jnp.where(mask, values, 0.0).sum() / jnp.maximum(count, 1), count


def _logits(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """einsum accumulated and returned in float32: with bf16 compute the logits and the softmax stay float32."""
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _row_dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """sum(a * b, -1) in float32 (a multiply-and-sum fuses on every backend; a batched dot may not)."""
    return jnp.sum(a.astype(jnp.float32) * b.astype(jnp.float32), axis=-1)


def _cross_entropy(logits: jax.Array, label: jax.Array) -> jax.Array:
    """-log softmax(logits)[label] along the last axis."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    return logz - jnp.take_along_axis(logits, label[..., None], axis=-1)[..., 0]


def inbatch_logq_loss(
    seq_out: jax.Array,
    window_emb: jax.Array,
    window: jax.Array,
    valid: jax.Array,
    log_pop: jax.Array | None,
) -> tuple[jax.Array, jax.Array]:
    """MicroLens in-batch softmax with logQ correction (protocol section 4, VideoRec ``model.py::forward``).

    Args:
        seq_out: [B, L, d] sequence outputs.
        window_emb: [B, L+1, d] embeddings of each user's window (inputs followed by the last target).
        window: [B, L+1] item ids of the window (0 = padding).
        valid: [B, L] positions that are scored.
        log_pop: [N+1] log popularity probability, subtracted from each candidate's logit; None = no correction.

    Returns:
        (mean cross-entropy over valid positions, number of valid positions).
    """
    b, length, d = seq_out.shape
    slots = b * (length + 1)
    cand = window.reshape(slots)
    # label of (user u, position j) is window slot j + 1 of user u, i.e. flat slot u*(L+1) + j + 1.
    label = (jnp.arange(b)[:, None] * (length + 1) + jnp.arange(1, length + 1)[None, :]).astype(jnp.int32)
    # Mask every slot whose ITEM is in the user's own window, and padding, except the label slot. The match is by
    # item id (MicroLens ``history_item_mask = (user_history == flatten_item_seq).any``), so another user's slot
    # holding this user's positive is masked too: the positive is part of the user's own window.
    own = (window[:, :, None] == cand[None, None, :]).any(axis=1)  # [B, C]
    reject = (own | (cand == 0)[None, :])[:, None, :]  # [B, 1, C]
    is_label = jnp.arange(slots)[None, None, :] == label[:, :, None]  # [B, L, C]
    # The mask and the logQ term enter as one additive bias that does not depend on the parameters: the backward
    # pass then has no select over the [B*L, C] gradient (on CPU that fused select + transpose was over a quarter of
    # the step; docs/benchmarks.md).
    bias = jnp.where(reject & ~is_label, INBATCH_MASK, 0.0)
    if log_pop is not None:
        bias = bias - log_pop[cand]
    logits = _logits("bld,cd->blc", seq_out, window_emb.reshape(slots, d)) + bias
    return _masked_mean(_cross_entropy(logits, label), valid)


def full_softmax_loss(
    seq_out: jax.Array, item_emb: jax.Array, targets: jax.Array, valid: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy over all items 1..N (padding column 0 excluded).

    Args:
        seq_out: [B, L, d]; item_emb: [N+1, d]; targets: [B, L]; valid: [B, L].
    """
    logits = _logits("bld,nd->bln", seq_out, item_emb)
    logits = logits.at[..., 0].set(NEG_INF)
    return _masked_mean(_cross_entropy(logits, targets), valid)


def sampled_softmax_loss(
    seq_out: jax.Array,
    pos_emb: jax.Array,
    neg_emb: jax.Array,
    targets: jax.Array,
    negatives: jax.Array,
    valid: jax.Array,
    pos_log_q: jax.Array | None = None,
    neg_log_q: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Softmax over the positive and K negatives shared by the whole batch.

    Args:
        seq_out: [B, L, d]; pos_emb: [B, L, d] target embeddings; neg_emb: [K, d]; targets: [B, L];
        negatives: [K] negative ids; valid: [B, L].
        pos_log_q, neg_log_q: log(K * q(item)) of the proposal for the targets [B, L] and negatives [K]; when given
            they are subtracted from the logits (logQ correction, which makes the sampled softmax consistent).
            A negative equal to the position's target is masked out.
    """
    pos = _row_dot(seq_out, pos_emb)  # [B, L]
    neg = _logits("bld,kd->blk", seq_out, neg_emb)  # [B, L, K]
    if pos_log_q is not None:
        pos = pos - pos_log_q
        neg = neg - neg_log_q
    neg = jnp.where(negatives[None, None, :] == targets[..., None], NEG_INF, neg)
    logits = jnp.concatenate([pos[..., None], neg], axis=-1)
    loss = jax.nn.logsumexp(logits, axis=-1) - pos
    return _masked_mean(loss, valid)


def bce_loss(
    seq_out: jax.Array, pos_emb: jax.Array, neg_emb: jax.Array, valid: jax.Array, neg_valid: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """BCE-with-logits: mean over valid positions of -log sigmoid(pos) plus mean of -log(1 - sigmoid(neg)).

    NineRec sums the two ``BCEWithLogitsLoss`` means (positive labels 1, negative labels 0). Negatives that still
    collide with the user's sequence after resampling (``neg_valid`` False) are left out of the negative mean.

    Args:
        seq_out, pos_emb, neg_emb: [B, L, d]; valid, neg_valid: [B, L] bool.
    """
    pos = _row_dot(seq_out, pos_emb)
    neg = _row_dot(seq_out, neg_emb)
    pos_loss, count = _masked_mean(jax.nn.softplus(-pos), valid)
    neg_loss, _ = _masked_mean(jax.nn.softplus(neg), valid & neg_valid)
    return pos_loss + neg_loss, count


def proposal_log_probs(num_items: int, log_pop: jax.Array | None, proposal: str) -> jax.Array:
    """log q over items [N+1] for sampling negatives from 1..N (q[0] = 0, log = -inf).

    "uniform": q = 1/N. "pop": q proportional to exp(log_pop) over 1..N (renormalised, so log_pop may be any log
    of unnormalised popularity).
    """
    if proposal == "uniform":
        logq = jnp.full((num_items + 1,), -jnp.log(float(num_items)), jnp.float32)
    elif proposal == "pop":
        if log_pop is None:
            raise ValueError("loss config: proposal='pop' needs log_pop")
        body = jnp.asarray(log_pop[1:], jnp.float32)
        logq = jnp.concatenate([jnp.zeros((1,), jnp.float32), body - jax.nn.logsumexp(body)])
    else:
        raise ValueError(f"loss config: proposal must be 'uniform' or 'pop', got {proposal!r}")
    return logq.at[0].set(-jnp.inf)


def sample_shared_negatives(key: jax.Array, num_negatives: int, log_q: jax.Array) -> jax.Array:
    """K negatives for the whole batch, drawn with replacement from q (``proposal_log_probs``)."""
    return jax.random.categorical(key, log_q, shape=(num_negatives,)).astype(jnp.int32)


def sample_bce_negatives(
    key: jax.Array, window: jax.Array, num_items: int, rounds: int = 4
) -> tuple[jax.Array, jax.Array]:
    """One uniform negative in 1..N per position, resampled while it is in the user's window.

    Args:
        key: PRNG key.
        window: [B, L+1] the user's items (the part of the sequence the batch holds).
        num_items: N.
        rounds: resampling rounds (NineRec resamples until no collision; a fixed count keeps shapes static).

    Returns:
        (negatives [B, L] int32, ok [B, L] bool: False where the negative still collides after ``rounds``).
    """
    b, length = window.shape[0], window.shape[1] - 1

    def collides(neg):
        return (neg[:, :, None] == window[:, None, :]).any(axis=-1)

    # All rounds' candidates in one draw (one threefry instance in the graph instead of rounds + 1).
    draws = jax.random.randint(key, (rounds + 1, b, length), 1, num_items + 1, dtype=jnp.int32)
    neg = draws[0]
    for candidate in draws[1:]:
        neg = jnp.where(collides(neg), candidate, neg)
    return neg, ~collides(neg)


def compute_loss(
    model,
    batch: dict,
    rng: jax.Array,
    log_pop: jax.Array | None,
    *,
    name: str,
    num_negatives: int,
    proposal: str,
    logq: bool,
    deterministic: bool = False,
):
    """Training loss of ``model`` (a ``Recommender``) on a batch, with dropout: ``compute_loss(..., **config.loss)``.

    Args:
        model: the recommender (typically ``nnx.merge``d inside the jitted step).
        batch: {"inputs": [B, L] int32, "targets": [B, L] int32}, 0 = padding / no target.
        rng: PRNG key for dropout and negative sampling.
        log_pop: [N+1] log of the normalised train popularity (``data.log_popularity``), used by logQ corrections
            and the popularity proposal.
        name: one of LOSSES.
        num_negatives: K shared negatives (sampled_softmax only).
        proposal: "uniform" or "pop" (sampled_softmax only).
        logq: subtract the log proposal probability (in-batch: popularity; sampled: q).
        deterministic: switch dropout off (parity checks against the PyTorch port; the negatives stay random).

    Returns:
        (loss scalar, aux dict with "positions": number of scored positions).
    """
    inputs, targets = batch["inputs"], batch["targets"]
    valid = (inputs != 0) & (targets != 0)
    # The model's PRNG implementation (models.as_impl; the default threefry2x32 leaves rng as it is).
    rng = as_impl(rng, model.rng_impl)
    drop_key, sample_key = jax.random.split(rng)
    if name == "inbatch_logq":
        # The window is the user's L+1 items; embed it once for the encoder inputs and the candidates.
        window = jnp.concatenate([inputs, targets[:, -1:]], axis=1)
        window_emb = model.item_embeddings(window)
        seq_out = model.encode(inputs, deterministic=deterministic, rng=drop_key, input_embs=window_emb[:, :-1])
        if logq and log_pop is None:
            raise ValueError("loss config: inbatch_logq with logq=True needs log_pop")
        loss, count = inbatch_logq_loss(seq_out, window_emb, window, valid, log_pop if logq else None)
    elif name == "full_softmax":
        seq_out = model.encode(inputs, deterministic=deterministic, rng=drop_key)
        loss, count = full_softmax_loss(seq_out, model.all_item_embeddings(), targets, valid)
    elif name == "sampled_softmax":
        log_q = proposal_log_probs(model.num_items, log_pop, proposal)
        negatives = sample_shared_negatives(sample_key, int(num_negatives), log_q)
        emb = model.item_embeddings(jnp.concatenate([inputs.reshape(-1), targets.reshape(-1), negatives]))
        n_in = inputs.size
        in_emb = emb[:n_in].reshape(inputs.shape + (-1,))
        pos_emb = emb[n_in : 2 * n_in].reshape(targets.shape + (-1,))
        neg_emb = emb[2 * n_in :]
        seq_out = model.encode(inputs, deterministic=deterministic, rng=drop_key, input_embs=in_emb)
        log_k = jnp.log(float(num_negatives))
        pos_c = log_q[targets] + log_k if logq else None
        neg_c = log_q[negatives] + log_k if logq else None
        # targets 0 have log q = -inf; they are not valid positions, keep the arithmetic finite anyway.
        if pos_c is not None:
            pos_c = jnp.where(valid, pos_c, 0.0)
        loss, count = sampled_softmax_loss(seq_out, pos_emb, neg_emb, targets, negatives, valid, pos_c, neg_c)
    elif name == "bce":
        window = jnp.concatenate([inputs, targets[:, -1:]], axis=1)
        negatives, neg_ok = sample_bce_negatives(sample_key, window, model.num_items)
        emb = model.item_embeddings(jnp.concatenate([window, negatives], axis=1))
        length = inputs.shape[1]
        seq_out = model.encode(inputs, deterministic=deterministic, rng=drop_key, input_embs=emb[:, :length])
        pos_emb, neg_emb = emb[:, 1 : length + 1], emb[:, length + 1 :]
        loss, count = bce_loss(seq_out, pos_emb, neg_emb, valid, neg_ok)
    else:
        raise ValueError(f"loss config: name must be one of {LOSSES}, got {name!r}")
    return loss, {"positions": count}

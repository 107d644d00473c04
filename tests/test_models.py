"""dff_jax.models: shapes per encoder, fusion arithmetic, padding, causality, layer weights, split/merge."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from dff_jax import defaults, features, models
from dff_jax.features import standardize_stats
from dff_jax.models import FrozenFeatures, Recommender, standardized_table

N, D, LAYERS, H, L = 11, 8, 3, 6, 4


def _cfg(**kw):
    c = defaults.base_config().model.to_dict()
    c.update({"embed_dim": D, "max_seq_len": L, "item_encoder": "fusion", "content": "learned", "gate_hidden": 5, **kw})
    return ml_collections.ConfigDict(c)


def _build(cfg, num_items, feats, *, rngs):
    """The model of `cfg` over the stored rows it reads (features.model_rows), as the trainer builds it."""
    table = feats
    if feats is not None and cfg.item_encoder != "id":
        table = feats[:, features.model_rows(cfg.content, cfg.layer, cfg.layers, feats.shape[1], "test")]
    return Recommender(num_items, table, **cfg, rngs=rngs)


def _features(dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    # Layers on very different scales, like LVLM hidden states.
    f = rng.normal(size=(N + 1, LAYERS, H)) * np.array([1.0, 10.0, 100.0])[None, :, None] + 3.0
    f[0] = 0
    return f.astype(dtype)


INPUTS = jnp.asarray(np.array([[0, 0, 3, 4], [1, 2, 3, 11]], np.int32))

COMBOS = [("id", "layer")] + [(e, c) for e in ("replace", "fusion") for c in ("layer", "mean", "learned")]


@pytest.mark.parametrize("encoder,content", COMBOS)
def test_shapes_for_each_encoder_and_content(encoder, content):
    model = _build(_cfg(item_encoder=encoder, content=content), N, _features(), rngs=nnx.Rngs(0))
    assert model.item_embeddings(INPUTS).shape == (2, L, D)
    assert model.item_embeddings(jnp.array(5)).shape == (D,)
    assert model.all_item_embeddings().shape == (N + 1, D)
    assert model.encode(INPUTS, deterministic=True).shape == (2, L, D)
    assert model.user_embeddings(INPUTS).shape == (2, D)
    if encoder == "fusion":
        assert model.gate_values(INPUTS).shape == (2, L, 1)
        assert model.gate_values(INPUTS, reduce=False).shape == (2, L, D)
    else:
        with pytest.raises(ValueError, match="not 'fusion'"):
            model.gate_values(INPUTS)
    if encoder == "id":
        with pytest.raises(ValueError, match="no content"):
            model.layer_weights()
    else:
        expected_layers = 1 if content == "layer" else LAYERS
        np.testing.assert_allclose(np.asarray(model.layer_weights()), np.full(expected_layers, 1 / expected_layers))
    # all_item_embeddings (chunked lax.map) agrees with item_embeddings, and row 0 (padding) is zero.
    all_emb = np.asarray(model.all_item_embeddings(chunk_size=5))
    np.testing.assert_allclose(all_emb, np.asarray(model.item_embeddings(jnp.arange(N + 1))), rtol=1e-5, atol=1e-6)
    assert np.all(all_emb[0] == 0)


def test_fusion_arithmetic_matches_hand_computation():
    feats = _features()
    model = _build(_cfg(content="learned", feature_norm="none", gate_hidden=5), N, feats, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(7)
    w_logits = rng.normal(size=LAYERS).astype(np.float32)
    proj_w, proj_b = rng.normal(size=(H, D)).astype(np.float32) * 0.1, rng.normal(size=D).astype(np.float32)
    g1_w, g1_b = rng.normal(size=(2 * D, 5)).astype(np.float32), rng.normal(size=5).astype(np.float32)
    g2_w, g2_b = rng.normal(size=(5, D)).astype(np.float32), rng.normal(size=D).astype(np.float32)
    model.items.content.layer_logits[...] = jnp.asarray(w_logits)
    model.items.content.proj.kernel[...], model.items.content.proj.bias[...] = jnp.asarray(proj_w), jnp.asarray(proj_b)
    model.items.gate_in.kernel[...], model.items.gate_in.bias[...] = jnp.asarray(g1_w), jnp.asarray(g1_b)
    model.items.gate_out.kernel[...], model.items.gate_out.bias[...] = jnp.asarray(g2_w), jnp.asarray(g2_b)

    items = np.array([[1, 5, 0], [11, 5, 2]])
    alpha = np.exp(w_logits) / np.exp(w_logits).sum()  # Eq. 5 with softmax-normalised alpha
    e_v = np.einsum("...lh,l->...h", feats[items].astype(np.float64), alpha) @ proj_w + proj_b
    e_id = np.asarray(model.items.item_id[...])[items]
    hidden = np.maximum(np.concatenate([e_id, e_v], -1) @ g1_w + g1_b, 0.0)  # Eq. 3 MLP
    g = 1.0 / (1.0 + np.exp(-(hidden @ g2_w + g2_b)))
    expected = (g * e_id + (1.0 - g) * e_v) * (items != 0)[..., None]  # Eq. 4; padding -> 0
    got = np.asarray(model.item_embeddings(jnp.asarray(items)))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(model.layer_weights()), alpha, rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(model.gate_values(jnp.asarray(items))), g.mean(-1, keepdims=True), rtol=1e-4, atol=1e-6
    )


def test_scalar_gate_and_standardized_aggregation():
    feats = _features(seed=3)
    model = _build(
        _cfg(content="mean", feature_norm="standardize", gate_dim="scalar", gate_hidden=0), N, feats, rngs=nnx.Rngs(2)
    )
    items = jnp.array([1, 4, 9])
    # Standardisation: z-score each (layer, dim) over real items, then a uniform mean over layers.
    body = feats[1:].astype(np.float64)
    z = (feats[np.asarray(items)] - body.mean(0)) / body.std(0)
    np.testing.assert_allclose(np.asarray(model.items.content.aggregate(items)), z.mean(1), rtol=1e-4, atol=1e-5)
    g = model.gate_values(items, reduce=False)
    assert g.shape == (3, 1) and bool(jnp.all((g > 0) & (g < 1)))


def test_standardize_stats_match_numpy_and_floor_constant_dims():
    feats = _features(seed=4)
    feats[1:, 0, 2] = 5.0  # a constant dimension must not produce inf
    mean, inv_std = standardize_stats(feats, chunk=4)
    body = feats[1:].astype(np.float64)
    np.testing.assert_allclose(mean, body.mean(0), rtol=1e-5, atol=1e-5)
    std = body.std(0)
    ok = std > 0
    np.testing.assert_allclose(inv_std[ok], 1 / std[ok], rtol=1e-4)
    assert np.isfinite(inv_std).all() and inv_std[0, 2] > 0


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_standardized_table_is_the_z_scores_in_the_stored_dtype_filled_in_chunks(dtype):
    feats = _features(seed=5).astype(dtype)  # layers on scales 1, 10, 100 around 3
    # 5 items per chunk: several chunks and a ragged last one (N + 1 rows is not a multiple of 5)
    got = standardized_table(feats, max_values=5 * feats.shape[1] * feats.shape[2])
    assert feats.shape[0] % 5 != 0 and got.dtype == feats.dtype and got.shape == feats.shape
    mean, inv_std = standardize_stats(feats)
    expected = (feats.astype(np.float32) - mean) * inv_std
    tol = 1e-6 if dtype == np.float32 else 1e-2  # bf16 keeps 8 bits of mantissa
    np.testing.assert_allclose(np.asarray(got, np.float32), expected, rtol=tol, atol=tol)
    body = np.asarray(got, np.float64)[1:]
    np.testing.assert_allclose(body.mean(0), 0.0, atol=3 * tol)
    np.testing.assert_allclose(body.std(0), 1.0, rtol=3 * tol)


def test_padding_row_is_zero_and_gets_no_gradient():
    model = _build(_cfg(), N, _features(), rngs=nnx.Rngs(0))
    assert float(jnp.abs(model.items.item_id[...][0]).max()) == 0.0
    assert float(jnp.abs(model.item_embeddings(jnp.array([0, 0]))).max()) == 0.0
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def f(p):
        m = nnx.merge(graphdef, p, rest)
        return jnp.sum(m.encode(INPUTS, deterministic=True) ** 2)

    grads = jax.jit(jax.grad(f))(params)  # one compilation instead of op-by-op eager autodiff
    assert float(jnp.abs(grads["items"]["item_id"][...][0]).max()) == 0.0
    assert float(jnp.abs(grads["items"]["item_id"][...][3]).max()) > 0.0


@pytest.mark.parametrize("pre_ln", [False, True])
def test_causal_mask_future_inputs_do_not_change_past_outputs(pre_ln):
    model = _build(_cfg(item_encoder="id", pre_ln=pre_ln), N, None, rngs=nnx.Rngs(0))
    a = jnp.array([[0, 2, 3, 4], [5, 6, 7, 8]])
    b = jnp.array([[0, 2, 9, 10], [5, 6, 1, 1]])  # differ only from position 2 on
    out_a, out_b = model.encode(a, deterministic=True), model.encode(b, deterministic=True)
    np.testing.assert_allclose(np.asarray(out_a[:, :2]), np.asarray(out_b[:, :2]), rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(out_a[:, 2:] - out_b[:, 2:]).max()) > 1e-3
    # Padding keys are ignored: changing which padded row it is does not matter; no NaN on all-padding rows.
    c = model.encode(jnp.array([[0, 0, 0, 0]]), deterministic=True)
    assert bool(jnp.isfinite(c).all())


def test_dropout_uses_the_explicit_key():
    model = _build(_cfg(item_encoder="id"), N, None, rngs=nnx.Rngs(0))
    k1, k2 = jax.random.key(1), jax.random.key(2)
    o1 = model.encode(INPUTS, deterministic=False, rng=k1)
    assert np.array_equal(np.asarray(o1), np.asarray(model.encode(INPUTS, deterministic=False, rng=k1)))
    assert not np.allclose(np.asarray(o1), np.asarray(model.encode(INPUTS, deterministic=False, rng=k2)))
    det = model.encode(INPUTS, deterministic=True)
    assert not np.allclose(np.asarray(o1), np.asarray(det))
    with pytest.raises(ValueError, match="dropout key"):
        model.encode(INPUTS, deterministic=False)


@pytest.mark.parametrize("softmax", [True, False])
def test_dff_alpha_initialised_uniform(softmax):
    model = _build(_cfg(content="learned", alpha_softmax=softmax), N, _features(), rngs=nnx.Rngs(0))
    np.testing.assert_allclose(np.asarray(model.layer_weights()), np.full(LAYERS, 1 / LAYERS), rtol=1e-6)
    raw = np.asarray(model.items.content.layer_logits[...])
    np.testing.assert_allclose(raw, np.zeros(LAYERS) if softmax else np.full(LAYERS, 1 / LAYERS))


def test_replace_mode_has_no_id_table():
    feats = _features()
    model = _build(_cfg(item_encoder="replace", content="layer", layer=1), N, feats, rngs=nnx.Rngs(0))
    _, params, _ = nnx.split(model, nnx.Param, ...)
    assert "item_id" not in params["items"]
    # e = Proj(h_1) exactly (default standardisation is an affine map folded in): check with feature_norm="none".
    plain = _build(_cfg(item_encoder="replace", content="layer", layer=1, feature_norm="none"), N, feats,
                        rngs=nnx.Rngs(0))  # fmt: skip
    proj = plain.items.content.proj
    expected = feats[[2, 3], 1] @ np.asarray(proj.kernel[...]) + np.asarray(proj.bias[...])
    np.testing.assert_allclose(np.asarray(plain.item_embeddings(jnp.array([2, 3]))), expected, rtol=1e-4, atol=1e-5)


def test_split_merge_in_jit_and_frozen_features_not_params():
    feats = _features(dtype=ml_dtypes.bfloat16)
    model = _build(_cfg(), N, feats, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    param_shapes = [x.shape for x in jax.tree.leaves(params)]
    assert (N + 1, LAYERS, H) not in param_shapes  # the feature table is not trainable
    frozen = nnx.state(model, FrozenFeatures)
    table = frozen["items"]["content"]["table"][...]
    assert table.shape == (N + 1, LAYERS, H) and table.dtype == jnp.bfloat16  # stored dtype kept on device
    assert {type(v) for v in jax.tree.leaves(rest, is_leaf=lambda x: isinstance(x, nnx.Variable))} == {FrozenFeatures}

    @jax.jit
    def run(params, rest, key):
        m = nnx.merge(graphdef, params, rest)
        return m.encode(INPUTS, deterministic=False, rng=key), m.user_embeddings(INPUTS)

    out, users = run(params, rest, jax.random.key(0))
    np.testing.assert_allclose(np.asarray(users), np.asarray(model.user_embeddings(INPUTS)), rtol=1e-5, atol=1e-5)
    assert out.shape == (2, L, D)


def test_unique_dedup_matches_direct_encoding():
    feats = _features()
    direct = _build(_cfg(dedup="none"), N, feats, rngs=nnx.Rngs(0))
    unique = _build(_cfg(dedup="unique"), N, feats, rngs=nnx.Rngs(0))
    items = jnp.array([[3, 3, 0, 7], [7, 1, 3, 11], [2, 2, 2, 2]])
    np.testing.assert_allclose(
        np.asarray(unique.item_embeddings(items)), np.asarray(direct.item_embeddings(items)), rtol=1e-5, atol=1e-6
    )


def test_layer_selection_and_bad_input_errors():
    assert features.model_rows("layer", -1, (), 5, "t") == [4]
    assert features.model_rows("mean", 0, (), 5, "t") == [0, 1, 2, 3, 4]
    assert features.model_rows("learned", 0, (1, -2), 5, "t") == [1, 3]
    with pytest.raises(features.FeatureError, match="stores rows 0..4"):
        features.model_rows("layer", 5, (), 5, "t")
    feats = _features()
    model = _build(_cfg(content="mean", layers=(0, 2)), N, feats, rngs=nnx.Rngs(0))
    assert model.items.content.table.shape == (N + 1, 2, H)  # only the selected rows are kept
    with pytest.raises(ValueError, match="reads 1 stored row"):  # a table not cut to the model's rows
        Recommender(N, feats, **_cfg(content="layer"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="needs a feature table"):
        _build(_cfg(), N, None, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="expected num_items"):
        _build(_cfg(), N + 1, feats, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="item_encoder must be"):
        _build(_cfg(item_encoder="concat"), N, feats, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="feature_norm must be"):
        _build(_cfg(feature_norm="l2"), N, feats, rngs=nnx.Rngs(0))


# ------------------------------------------------------------------------------------------ arch="sasrec", rng_impl


def _sasrec(num_items=300, max_seq_len=50, **kw):
    kw = {"item_encoder": "id", "arch": "sasrec", "embed_dim": 16, "num_heads": 2, "max_seq_len": max_seq_len, **kw}
    cfg = _cfg(**kw)
    return Recommender(num_items, None, **cfg, rngs=nnx.Rngs(0))


def _histories(rows=256, max_seq_len=50, num_items=300, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 12, rows)
    lengths[3], lengths[130] = max_seq_len, 20  # groups that need the full and a middle width
    out = np.zeros((rows, max_seq_len), np.int32)
    for i, n in enumerate(lengths):
        out[i, max_seq_len - n :] = rng.integers(1, num_items + 1, n)
    return jnp.asarray(out)


@pytest.mark.parametrize("pre_ln", [False, True])
def test_sasrec_user_vectors_at_history_cost_equal_the_full_window(pre_ln):
    # user_embeddings sorts rows by length, runs each group at a narrow width with the leading padding folded into
    # one column, and the last block at the last position only; it must give the full model's last output.
    model = _sasrec(pre_ln=pre_ln)
    inputs = _histories()
    fast = jax.jit(model.user_embeddings)(inputs)
    full = model.encode(inputs, deterministic=True)[:, -1]
    np.testing.assert_allclose(np.asarray(fast), np.asarray(full), atol=1e-5)
    assert float(jnp.abs(full).mean()) > 0.1


def test_sasrec_folded_padding_needs_deterministic_outputs():
    model = _sasrec()
    x = model.items(INPUTS)
    keys = models.dropout_keeps_16(jax.random.key(0), 0.2, [(2, 5, 16)] + [(2, 2, 5, 5), (2, 5, 16), (2, 5, 16)] * 2)
    with pytest.raises(ValueError, match="deterministic"):
        model.sasrec._original(x, INPUTS, keys, pad_slots=46)


def test_sasrec_arch_scales_items_and_has_no_key_padding_mask():
    model = _sasrec(max_seq_len=L)
    x = model.items(INPUTS)
    out = model.sasrec(x, INPUTS, deterministic=True, rng=None)
    # The port scales item vectors by sqrt(d) inside the encoder: feeding pre-scaled vectors must change outputs.
    assert float(jnp.abs(model.sasrec(x * 4.0, INPUTS, deterministic=True, rng=None) - out).max()) > 1e-3
    # Real positions attend to the padding slots before them (causal mask only): row 0's padding input matters.
    bumped = model.sasrec(x.at[0, 0].set(1.0), INPUTS, deterministic=True, rng=None)
    assert float(jnp.abs(bumped[0, 2:] - out[0, 2:]).max()) > 1e-4
    # ...but never a later slot: causality.
    later = model.sasrec(x.at[1, 3].set(1.0), INPUTS, deterministic=True, rng=None)
    np.testing.assert_array_equal(np.asarray(later[1, :3]), np.asarray(out[1, :3]))


def test_sasrec_dropout_masks_realise_the_rate_and_scale_exactly():
    shapes = [(64, 50, 50), (64, 1, 50, 50)]
    keeps = models.dropout_keeps_16(jax.random.key(1), 0.2, shapes)
    assert [k.shape for k in keeps] == shapes
    drop = 1.0 - float(jnp.concatenate([k.reshape(-1) for k in keeps]).mean())
    assert abs(drop - 0.2) < 0.003  # 320,000 draws: 5 sigma
    assert models.mask_rate(0.2) == 13107 / 65536
    assert not jnp.array_equal(keeps[0].reshape(-1)[:1000], keeps[1].reshape(-1)[:1000])
    model = _sasrec(max_seq_len=L, dropout=0.2)
    assert model.sasrec.blocks[0].rate == models.mask_rate(0.2)  # kept values are scaled by the realised rate
    assert models.dropout_keeps_16(None, 0.2, shapes) == [None, None]


def test_rng_impl_default_keeps_the_key_and_others_rekey_deterministically():
    key = jax.random.key(5)
    assert models.as_impl(key, "threefry2x32") is key
    for impl in ("rbg", "unsafe_rbg"):
        a, b = models.as_impl(key, impl), models.as_impl(key, impl)
        assert jax.random.key_impl(a) == jax.random.key_impl(jax.random.key(0, impl=impl))
        np.testing.assert_array_equal(jax.random.key_data(a), jax.random.key_data(b))
    with pytest.raises(ValueError, match="rng_impl"):
        models.as_impl(key, "philox")
    with pytest.raises(ValueError, match="arch"):
        _sasrec(arch="bert4rec")


@pytest.mark.parametrize("proj_hidden", [0, 7])
def test_content_init_match_id_starts_content_at_the_id_rows_norm(proj_hidden):
    # z-scored 64-d features through a lecun projection start ~sqrt(d) long, xavier ID rows ~sqrt(2d / (N + d)):
    # match_id rescales the projection's last kernel so the two start equal, and changes nothing else.
    n, d = 300, 16
    feats = np.random.default_rng(0).normal(size=(n + 1, 1, 64)).astype(np.float32)
    cfg = {"embed_dim": d, "content": "layer", "layer": 0, "gate_hidden": 0, "proj_hidden": proj_hidden}
    default = Recommender(n, feats, **_cfg(**cfg), rngs=nnx.Rngs(3))
    matched = Recommender(n, feats, **_cfg(**cfg, content_init="match_id"), rngs=nnx.Rngs(3))
    before, after = default.items.row_norms(), matched.items.row_norms()
    assert before["id"] == pytest.approx(math.sqrt(2 * d / (n + 1 + d)), rel=0.1)
    assert before["content"] > 5 * before["id"]
    assert after["content"] == pytest.approx(after["id"], rel=1e-4)
    items = jnp.arange(1, n + 1)
    e0, e1 = default.items.content(items), matched.items.content(items)
    np.testing.assert_allclose(e1, e0 * (after["content"] / before["content"]), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(default.items.item_id[...], matched.items.item_id[...])


def test_threefry_bits_are_jax_random_bits():
    # The written-out Threefry-2x32 behind arch="sasrec"'s dropout masks draws exactly jax.random.bits' words, so the
    # masks (and every arch="sasrec" run) are what they were with jax's looped lowering.
    for seed in (0, 7, 2**31 + 5):
        key = jax.random.fold_in(jax.random.key(seed), 3)
        for n in (1, 7, 4099):
            fast = jax.jit(models.threefry_bits, static_argnums=1)(key, n)
            np.testing.assert_array_equal(np.asarray(fast), np.asarray(jax.random.bits(key, (n,), jnp.uint32)))
    shapes = [(3, 50, 50), (3, 1, 50, 50)]
    words = -(-sum(math.prod(s) for s in shapes) // 2)
    reference = jax.random.bits(jax.random.split(jax.random.key(4), 1)[0], (words,), jnp.uint32)
    halves = np.asarray(jax.lax.bitcast_convert_type(reference, jnp.uint16)).reshape(-1)
    keeps = models.dropout_keeps_16(jax.random.key(4), 0.2, shapes)
    np.testing.assert_array_equal(np.concatenate([np.asarray(k).reshape(-1) for k in keeps]), halves >= 13107)

"""Same weights in, same outputs out: dff_jax.models/losses against the PyTorch eager port (dff_jax/bench_torch.py).

float32, dropout off on both sides. Compared: every item embedding, the sequence outputs, the full-ranking scores
(user x all items), the in-batch logQ and full-softmax losses, and the gradients of the in-batch loss; for the original
SASRec (arch="sasrec") also the BCE logits and loss on the JAX step's own negatives, and their gradients.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

from dff_jax import bench_torch  # noqa: E402
from dff_jax import defaults, features, losses, models  # noqa: E402
from dff_jax.models import Recommender  # noqa: E402

N, D, L, B, LAYERS, H = 30, 16, 6, 5, 4, 12
TOL = 1e-5
LOSS = {"name": "inbatch_logq", "num_negatives": 0, "proposal": "uniform", "logq": True}

CASES = {
    "id": {"item_encoder": "id"},
    "id_pre_ln": {"item_encoder": "id", "pre_ln": True},
    "dff_standardize": {"item_encoder": "fusion", "content": "learned"},
    "dff_raw_mlp_head": {"item_encoder": "fusion", "content": "learned", "feature_norm": "none", "proj_hidden": 10},
    "fusion_layer_scalar_gate": {"item_encoder": "fusion", "content": "layer", "layer": -2, "gate_dim": "scalar"},
    "replace_mean_layernorm": {"item_encoder": "replace", "content": "mean", "feature_norm": "layernorm"},
    "sasrec_id": {"item_encoder": "id", "arch": "sasrec"},
    "sasrec_id_pre_ln_1_head": {"item_encoder": "id", "arch": "sasrec", "pre_ln": True, "num_heads": 1},
    "sasrec_dff": {"item_encoder": "fusion", "content": "learned", "arch": "sasrec"},
}
SASREC_CASES = [c for c in CASES if c.startswith("sasrec")]


def _cfg(extra):
    base = defaults.base_config().model.to_dict()
    base.update({"embed_dim": D, "max_seq_len": L, "item_encoder": "id", "content": "learned", "gate_hidden": 8})
    base.update(extra)
    return ml_collections.ConfigDict(base)


def _data(seed=0):
    rng = np.random.default_rng(seed)
    feats = (rng.normal(size=(N + 1, LAYERS, H)) * np.array([1.0, 3.0, 10.0, 30.0])[None, :, None]).astype(np.float32)
    feats[0] = 0
    window = rng.integers(1, N + 1, size=(B, L + 1)).astype(np.int32)
    window[0, :3] = 0  # a short history
    window[1, 2] = window[1, 5]  # a repeat
    window[2, -1] = window[3, -1]  # two users sharing the next item
    log_pop = np.log(rng.dirichlet(np.ones(N + 1))).astype(np.float32)
    return feats, window[:, :-1].copy(), window[:, 1:].copy(), log_pop


def _pair(extra, seed=0):
    cfg = _cfg(extra)
    feats, inputs, targets, log_pop = _data(seed)
    table = None
    if cfg.item_encoder != "id":
        table = feats[:, features.model_rows(cfg.content, cfg.layer, cfg.layers, LAYERS, "test")]
    model = Recommender(N, table, **cfg, rngs=nnx.Rngs(seed))
    # Randomise the zero-initialised parameters (biases, LayerNorm, alpha) so the comparison covers them too.
    rng = np.random.default_rng(seed + 100)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[-1] in ("bias", "scale", "layer_logits") or (path[-1] == "position" and cfg.arch == "sasrec"):
            var[...] = jnp.asarray(np.asarray(var[...]) + rng.normal(size=var.shape).astype(np.float32) * 0.1)
    port = bench_torch.load_nnx_weights(bench_torch.TorchRecommender(N, table, **cfg), model).eval()
    return model, port, inputs, targets, log_pop


def _max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize("case", list(CASES))
def test_same_weights_same_outputs(case):
    model, port, inputs, targets, log_pop = _pair(CASES[case])
    tin, ttg = torch.as_tensor(inputs, dtype=torch.long), torch.as_tensor(targets, dtype=torch.long)
    with torch.no_grad():
        t_items = port.all_item_embeddings().numpy()
        t_seq = port.encode(tin).numpy()
        t_loss = float(bench_torch.compute_loss(port, tin, ttg, "inbatch_logq", torch.as_tensor(log_pop)))
        t_full = float(bench_torch.compute_loss(port, tin, ttg, "full_softmax", None))
    j_items = np.asarray(model.all_item_embeddings())
    j_seq = np.asarray(model.encode(jnp.asarray(inputs), deterministic=True))
    batch = {"inputs": jnp.asarray(inputs), "targets": jnp.asarray(targets)}
    key = jax.random.key(0)
    j_loss, _ = losses.compute_loss(model, batch, key, jnp.asarray(log_pop), **LOSS, deterministic=True)
    j_full, _ = losses.compute_loss(model, batch, key, None, **dict(LOSS, name="full_softmax"), deterministic=True)

    assert _max_diff(j_items, t_items) < TOL
    assert _max_diff(j_seq, t_seq) < TOL
    # Full-ranking scores: the last position against every item (what evaluation ranks).
    assert _max_diff(j_seq[:, -1] @ j_items.T, t_seq[:, -1] @ t_items.T) < 10 * TOL
    assert abs(float(j_loss) - t_loss) < TOL * max(1.0, abs(t_loss))
    assert abs(float(j_full) - t_full) < TOL * max(1.0, abs(t_full))


def test_same_gradients_for_dff():
    model, port, inputs, targets, log_pop = _pair(CASES["dff_standardize"], seed=1)
    tin, ttg = torch.as_tensor(inputs, dtype=torch.long), torch.as_tensor(targets, dtype=torch.long)
    loss = bench_torch.compute_loss(port, tin, ttg, "inbatch_logq", torch.as_tensor(log_pop))
    loss.backward()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    batch = {"inputs": jnp.asarray(inputs), "targets": jnp.asarray(targets)}

    def f(p):
        m = nnx.merge(graphdef, p, rest)
        return losses.compute_loss(m, batch, jax.random.key(0), jnp.asarray(log_pop), **LOSS, deterministic=True)[0]

    grads = jax.jit(jax.grad(f))(params)
    named = dict(port.named_parameters())
    checked = 0
    for path, var in nnx.to_flat_state(grads):
        name = ".".join(str(p) for p in path)
        g = np.asarray(var[...])
        if path[-1] == "kernel":
            name, g = name[: -len("kernel")] + "weight", g.T
        elif path[-1] == "scale":
            name = name[: -len("scale")] + "weight"
        assert _max_diff(g, named[name].grad.numpy()) < 1e-4, name
        checked += 1
    assert checked == len(named)


def _bce_negatives(model, inputs, targets, key):
    """The negatives (and their ok mask) that losses.compute_loss draws for the BCE loss from ``key``."""
    _, sample_key = jax.random.split(models.as_impl(key, model.rng_impl))
    window = jnp.concatenate([jnp.asarray(inputs), jnp.asarray(targets)[:, -1:]], axis=1)
    neg, ok = losses.sample_bce_negatives(sample_key, window, N)
    return np.asarray(neg), np.asarray(ok)


@pytest.mark.parametrize("case", SASREC_CASES)
def test_original_sasrec_bce_logits_loss_and_gradients(case):
    model, port, inputs, targets, _ = _pair(CASES[case], seed=2)
    key = jax.random.key(3)
    neg, ok = _bce_negatives(model, inputs, targets, key)
    assert ok.all() and (neg > 0).all()
    tin, ttg = torch.as_tensor(inputs, dtype=torch.long), torch.as_tensor(targets, dtype=torch.long)
    tneg, tok = torch.as_tensor(neg.copy(), dtype=torch.long), torch.as_tensor(ok.copy())
    t_loss = bench_torch.compute_loss(port, tin, ttg, "bce", None, negatives=tneg, neg_ok=tok)
    t_loss.backward()
    with torch.no_grad():
        t_seq = port.encode(tin)
        t_pos = (t_seq * port.item_embeddings(ttg)).sum(-1).numpy()
        t_neg = (t_seq * port.item_embeddings(tneg)).sum(-1).numpy()

    bce = dict(LOSS, name="bce", logq=False)
    batch = {"inputs": jnp.asarray(inputs), "targets": jnp.asarray(targets)}
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def f(p):
        return losses.compute_loss(nnx.merge(graphdef, p, rest), batch, key, None, **bce, deterministic=True)[0]

    j_loss, grads = jax.value_and_grad(f)(params)
    j_seq = model.encode(jnp.asarray(inputs), deterministic=True)
    j_pos = np.asarray(jnp.sum(j_seq * model.item_embeddings(jnp.asarray(targets)), -1))
    j_neg = np.asarray(jnp.sum(j_seq * model.item_embeddings(jnp.asarray(neg)), -1))
    scored = (inputs != 0) & (targets != 0)
    assert _max_diff(j_pos[scored], t_pos[scored]) < TOL and _max_diff(j_neg[scored], t_neg[scored]) < TOL
    t_loss = float(t_loss.detach())
    assert abs(float(j_loss) - t_loss) < TOL * max(1.0, abs(t_loss))
    named = dict(port.named_parameters())
    for path, var in nnx.to_flat_state(grads):
        name = ".".join(str(p) for p in path)
        g = np.asarray(var[...])
        if path[-1] == "kernel":
            name, g = name[: -len("kernel")] + "weight", g.T
        elif path[-1] == "scale":
            name = name[: -len("scale")] + "weight"
        assert _max_diff(g, named[name].grad.numpy()) < 1e-4, name


def test_original_sasrec_is_not_the_microlens_model():
    # The two architectures must differ where the port says they do: padding slots are attended (causal mask only),
    # so the output at a real position moves when an earlier padding slot's position vector would; and item inputs
    # are scaled by sqrt(d). A model that silently fell back to the MicroLens blocks would fail both.
    model, _, inputs, _, _ = _pair(CASES["sasrec_id"])
    x = model.items(jnp.asarray(inputs))
    # Same weights, inputs scaled by 1/sqrt(d) outside: equal to the unscaled path only if the model scales them.
    out = model.sasrec(x, jnp.asarray(inputs), deterministic=True, rng=None)
    out_rescaled = model.sasrec(x / np.sqrt(D), jnp.asarray(inputs), deterministic=True, rng=None)
    assert _max_diff(out, out_rescaled) > 1e-3
    # Row 0 has 3 padding slots; changing the padding input embedding (not possible through items, which zero it)
    # changes the real positions' outputs because they attend to padding.
    bumped = x.at[0, 0].set(1.0)
    assert _max_diff(model.sasrec(bumped, jnp.asarray(inputs), deterministic=True, rng=None)[0, 3:], out[0, 3:]) > 1e-4


def test_torch_train_step_runs_and_learns():
    cfg = _cfg({"item_encoder": "id", "dropout": 0.0})
    _, inputs, targets, log_pop = _data()
    model = bench_torch.TorchRecommender(N, None, **cfg)
    step = bench_torch.torch_train_step(
        model, log_pop, loss_name="inbatch_logq", lr=1e-2, b1=0.9, b2=0.999, weight_decay=0.1, clip_norm=5.0
    )
    first = step(inputs, targets)
    for _ in range(20):
        last = step({"inputs": inputs, "targets": targets})
    assert np.isfinite(first) and last < first
    assert float(step.model.items.item_id.detach()[0].abs().max()) == 0.0  # padding row: no gradient, decay of 0 is 0


def test_config_from_nnx_rebuilds_the_architecture():
    for case in ("dff_raw_mlp_head", "fusion_layer_scalar_gate", "id_pre_ln", "sasrec_dff"):
        model, port, *_ = _pair(CASES[case])
        table = port.items.content.table.numpy() if port.items.content else None
        rebuilt = bench_torch.TorchRecommender(N, table, **bench_torch.config_from_nnx(model))
        assert set(rebuilt.state_dict()) == set(port.state_dict()), case

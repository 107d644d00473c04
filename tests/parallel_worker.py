"""Subprocess half of tests/test_parallel.py: runs with 8 simulated CPU devices, prints one JSON line.

`python tests/parallel_worker.py mechanism` trains a small NNX recommender-shaped model (item-ID table, frozen
feature table, AdamW, dropout from fold_in(rng, step)) for 5 steps on one device and on sharded meshes, then ranks
every item for a set of users, and reports the largest differences. `python tests/parallel_worker.py smoke8 ROOT`
runs configs/smoke.py through dff_jax.train.train_and_evaluate on 8 devices. Both need their own process because
the device count is fixed at jax start-up; the rest of the test suite keeps one device.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

if sys.argv[1:2] == ["mechanism"]:  # the device count is fixed when jax starts
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dff_jax import parallel

STEPS, BATCH, SEQ, DIM, LAYERS, HIDDEN, EVAL_USERS = 5, 32, 5, 16, 3, 8, 40


class Frozen(nnx.Variable):
    """Frozen feature table (not a Param), as in dff_jax.models."""


class TinyRecommender(nnx.Module):
    """Mean-pooled sequence encoder over ID + projected content embeddings; full softmax over the catalogue."""

    def __init__(self, num_items: int, features: np.ndarray, rngs: nnx.Rngs):
        self.item_id = nnx.Param(jax.random.normal(rngs.params(), (num_items + 1, DIM)) * 0.1)
        self.table = Frozen(jnp.asarray(features))
        self.proj = nnx.Linear(HIDDEN, DIM, rngs=rngs)
        self.out = nnx.Linear(DIM, DIM, rngs=rngs)
        self.num_items = num_items

    def item_embeddings(self, items):
        return self.item_id[...][items] + self.proj(self.table[...][items].mean(axis=-2))

    def all_item_embeddings(self):
        return self.item_embeddings(jnp.arange(self.num_items + 1))

    def user_embeddings(self, inputs, key=None):
        mask = (inputs > 0)[..., None].astype(jnp.float32)
        pooled = (self.item_embeddings(inputs) * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)
        if key is not None:  # dropout: the random bits must not depend on how the batch is sharded
            keep = jax.random.bernoulli(key, 0.8, pooled.shape)
            pooled = jnp.where(keep, pooled / 0.8, 0.0)
        return jnp.tanh(self.out(pooled))


def reference_ranks(user, items, targets):
    """1 + number of real items (1..N) scoring strictly above the target (dff_jax.metrics semantics, no history)."""
    scores = user @ items.T
    scores = scores.at[:, 0].set(-jnp.inf)
    target = jnp.take_along_axis(scores, targets[:, None], axis=1)
    return 1 + (scores > target).sum(axis=1).astype(jnp.int32)


def make_data(num_items: int):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(num_items + 1, LAYERS, HIDDEN)).astype(np.float32)
    features[0] = 0
    batches = []
    for _ in range(STEPS):
        inputs = rng.integers(1, num_items + 1, size=(BATCH, SEQ)).astype(np.int32)
        inputs[:, :2] *= rng.integers(0, 2, size=(BATCH, 2)).astype(np.int32)  # some left padding
        batches.append({"inputs": inputs, "targets": rng.integers(1, num_items + 1, size=(BATCH,)).astype(np.int32)})
    ev = {
        "inputs": rng.integers(1, num_items + 1, size=(EVAL_USERS, SEQ)).astype(np.int32),
        "targets": rng.integers(1, num_items + 1, size=(EVAL_USERS,)).astype(np.int32),
        "history": rng.integers(0, num_items + 1, size=(EVAL_USERS, 4)).astype(np.int32),
    }
    return features, batches, ev


def build(mesh, shard_items: bool, num_items: int):
    """Model, sharded state and the jitted train / rank functions on `mesh`."""
    features, batches, ev = make_data(num_items)
    model = TinyRecommender(num_items, features, nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1))
    abstract = {"params": params, "opt_state": jax.eval_shape(tx.init, params), "step": jnp.zeros((), jnp.int32)}
    state_sh = parallel.state_shardings(abstract, mesh, shard_items, num_items=num_items)
    rest_sh = parallel.state_shardings(rest, mesh, shard_items, num_items=num_items)
    rest = jax.device_put(rest, rest_sh)
    rep, bsh = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    init = jax.jit(
        lambda p: {"params": p, "opt_state": tx.init(p), "step": jnp.zeros((), jnp.int32)}, out_shardings=state_sh
    )
    state = init(jax.device_put(params, state_sh["params"]))

    def step(state, batch, rng, rest):
        key = jax.random.fold_in(rng, state["step"])

        def loss_fn(p):
            m = nnx.merge(graphdef, p, rest)
            logits = m.user_embeddings(batch["inputs"], key) @ m.all_item_embeddings().T
            logits = logits.at[:, 0].set(-1e9)
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new = {
            "params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state,
            "step": state["step"] + 1,
        }
        return new, {"loss": loss}

    train_step = jax.jit(
        step, in_shardings=(state_sh, bsh, rep, rest_sh), out_shardings=(state_sh, rep), donate_argnums=(0,)
    )
    try:
        from dff_jax import metrics

        def rank_fn(p, rest, batch):
            m = nnx.merge(graphdef, p, rest)
            return metrics.target_ranks(
                m.user_embeddings(batch["inputs"]),
                m.all_item_embeddings(),
                batch["targets"],
                batch["history"],
                chunk_size=16,
            )

        ranker = "dff_jax.metrics.target_ranks"
    except ImportError:

        def rank_fn(p, rest, batch):
            m = nnx.merge(graphdef, p, rest)
            return reference_ranks(m.user_embeddings(batch["inputs"]), m.all_item_embeddings(), batch["targets"])

        ranker = "reference_ranks"
    ranks = jax.jit(rank_fn, out_shardings=bsh)
    return state, train_step, lambda params: ranks(params, rest, local_global(ev, mesh)), rest, batches, ranker


def local_global(batch: dict, mesh) -> dict:
    """The global batch from this process's rows only (what a multi-process input pipeline hands over)."""
    start, stop = parallel.process_rows(len(next(iter(batch.values()))), mesh)
    return parallel.global_batch({k: v[start:stop] for k, v in batch.items()}, mesh)


def train(state, train_step, batches, mesh, steps: range) -> tuple:
    rng = jax.random.key(7)
    losses = []
    for i in steps:
        parallel.check_global_batch(BATCH, mesh)
        state, m = train_step(state, local_global(batches[i], mesh), rng)
        losses.append(float(parallel.to_host(m["loss"])))
    return state, losses


def summary(state, losses, ranks) -> dict:
    return {
        "losses": np.array(losses),
        "params": [parallel.to_host(x) for x in jax.tree.leaves(state["params"])],
        "ranks": parallel.to_host(ranks),
    }


def run(mesh, shard_items: bool, num_items: int):
    """5 AdamW steps + full ranking on `mesh`; returns losses, final params and ranks as numpy."""
    state, step_fn, rank, rest, batches, ranker = build(mesh, shard_items, num_items)
    state, losses = train(state, lambda s, b, r: step_fn(s, b, r, rest), batches, mesh, range(STEPS))
    mu = state["opt_state"][1][0].mu["item_id"]
    return {
        **summary(state, losses, rank(state["params"])),
        "ranker": ranker,
        "item_spec": str(state["params"]["item_id"].sharding.spec),
        "mu_spec": str(mu.sharding.spec),
        "feature_spec": str(jax.tree.leaves(rest)[0].sharding.spec),
        "item_shard_shape": list(state["params"]["item_id"].addressable_shards[0].data.shape),
    }


def mechanism() -> dict:
    assert jax.device_count() == 8, jax.devices()
    out, refs = {}, {}
    for name, model_axis, shard, num_items in (
        ("data8", 1, False, 63),
        ("data4_model2_rows", 2, True, 63),  # 64 rows split 2 x 32 along items
        ("data4_model2_cols", 2, True, 62),  # 63 rows do not divide: the trailing dim is split instead
    ):
        cfg = ml_collections.ConfigDict({"model_axis": model_axis})
        if num_items not in refs:
            refs[num_items] = run(
                parallel.make_mesh(ml_collections.ConfigDict({"model_axis": 1}), devices=jax.devices()[:1]),
                False,
                num_items,
            )
        ref = refs[num_items]
        got = run(parallel.make_mesh(cfg), shard, num_items)
        out[name] = {
            "mesh": parallel.mesh_description(parallel.make_mesh(cfg))["mesh"],
            "max_loss_diff": float(np.abs(ref["losses"] - got["losses"]).max()),
            "max_param_diff": float(max(np.abs(a - b).max() for a, b in zip(ref["params"], got["params"]))),
            "ranks_equal": bool(np.array_equal(ref["ranks"], got["ranks"])),
            "ranks_max_diff": int(np.abs(ref["ranks"].astype(int) - got["ranks"].astype(int)).max()),
            "ranker": got["ranker"],
            "item_spec": got["item_spec"],
            "mu_spec": got["mu_spec"],
            "feature_spec": got["feature_spec"],
            "item_shard_shape": got["item_shard_shape"],
        }
    mesh = parallel.make_mesh(ml_collections.ConfigDict({"model_axis": 2}))
    try:
        parallel.check_global_batch(30, mesh)
        out["bad_batch_error"] = ""
    except ValueError as e:
        out["bad_batch_error"] = str(e)
    try:
        parallel.make_mesh(ml_collections.ConfigDict({"model_axis": 3}))
        out["bad_model_axis_error"] = ""
    except ValueError as e:
        out["bad_model_axis_error"] = str(e)
    return out


def smoke8(root: str) -> dict:
    """configs/smoke.py through train_and_evaluate on 8 simulated devices (config.parallel.cpu_devices=8).

    Runs data=8, then data=4 x model=2 with item sharding; data in root/data (generated if absent), runs in
    root/<name>. Returns each run's results.json path.
    """
    from configs import smoke
    from dff_jax import train

    out = {}
    for name, model_axis, shard in (("data8", 1, False), ("data4_model2_items", 2, True)):
        config = smoke.get_config()
        config.data.dir = str(Path(root, "data"))
        config.parallel.cpu_devices = 8
        config.parallel.model_axis = model_axis
        config.parallel.shard_items = shard
        result = train.train_and_evaluate(config, Path(root, name))
        assert result["devices"] == 8, result["devices"]
        out[name] = str(Path(root, name, "results.json"))
    # recommend from the sharded checkpoint: restored into the sharded layout, scored on the sharded item tables
    from dff_jax import evaluate, recommend

    run = evaluate.load_run(Path(root, "data4_model2_items"))
    (table,) = jax.tree.leaves(run["frozen"]["features"])
    out["feature_shards"] = [list(s.data.shape) for s in table.addressable_shards]
    out["id_shards"] = [list(s.data.shape) for s in run["params"]["items"]["item_id"][...].addressable_shards]
    out["recs"] = recommend.recommend(run, run["dataset"].item_ids[1:4], 5)
    return out


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "mechanism":
        print(json.dumps(mechanism()))
    elif mode == "smoke8":
        print(json.dumps(smoke8(sys.argv[2])))
    else:
        raise SystemExit(f"unknown mode {mode!r}")

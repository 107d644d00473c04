"""What a run is made of and how one step changes it: `build_run`, `create_train_state`, `train_step`, checkpoints.

A run is three things, built once by `create_train_state`:

* `state` = {"params", "opt_state", "step"}: the pytree a step updates and a checkpoint saves;
* `frozen` = {"features", "log_pop"}: device arrays every step reads and none changes (the frozen LVLM table as the
  model's non-trainable NNX state, the log-popularity of the logQ corrections). They are arguments of the jitted
  functions, so XLA never embeds a multi-GB table as a constant;
* `static`: a read-only dict of what the step closes over (the NNX graph definition, the optax optimizer, the loss
  fields, the compute dtype) and how arrays are placed (mesh and shardings).

`train_step(static, state, frozen, batch, rng)` is pure; `jit_train_step(static)` binds `static` with
`functools.partial` and jits it once, with the state donated (or, with `train.steps_per_call` > 1, `train_steps`:
several steps per call). Training (`train.py`), checkpoint evaluation
(`evaluate.py`), `recommend.py` and the benchmarks all build runs with `build_run` / `create_train_state`.

This lives apart from train.py so that evaluate.py can rebuild a run from its workdir while train.py uses evaluate.py
for validation, with no import circle.
"""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from dff_jax import data as data_lib
from dff_jax import defaults, feature_cache, losses, metrics, models, parallel, records
from dff_jax import features as features_lib
from dff_jax.errors import ConfigError, TrainError, WriteError, one_line, os_error_in, write_failure_in

# ----------------------------------------------------------------------------------------------------------- build


def load_table(
    config: ml_collections.ConfigDict, dataset: data_lib.Dataset, mesh=None
) -> features_lib.FeatureTable | None:
    """The frozen features for the model, placed on `mesh` (default `parallel.make_mesh`); None for `id`.

    `.table` is a jax.Array [N+1, rows it reads, H] in the stored dtype, laid out as the run's feature sharding
    (`parallel.state_shardings`: rows or H on "model" with shard_items, else replicated) and already standardised
    when `model.feature_norm` is "standardize". It is streamed from the feature cache into each device's shard
    (`feature_cache`), so no process holds the whole table; only the stored rows the model reads are cached and
    placed (`features.model_rows`), so a one-layer run of a 33 x 4096 feature set holds 1/33 of it.
    """
    if config.model.item_encoder == "id":
        return None
    fdir = Path(config.features.dir)
    if not (fdir / records.SCHEMA_FILE).is_file():
        raise TrainError(
            f"no feature set at {fdir}: expected {fdir / records.SCHEMA_FILE} and {fdir}/*{records.SHARD_SUFFIX} "
            f"(item encoder {config.model.item_encoder!r} needs content features). Produce them with "
            f"`python -m extract --model MODEL --items ITEMS.csv --media MEDIA_DIR --out {fdir}` (see extract/README.md) "
            f"or `python -m dff_jax.synthetic --out DIR`, then pass --config.features.dir=DIR; or train the ID-only "
            f"baseline with the `:id` variant."
        )
    schema = records.read_schema(fdir)
    m = config.model
    rows = features_lib.model_rows(m.content, m.layer, m.layers, schema.layers, f"config.model (features {fdir})")
    mesh = parallel.make_mesh(config.parallel) if mesh is None else mesh
    shape = jax.ShapeDtypeStruct(
        (dataset.num_items + 1, len(rows), schema.hidden_size), records.numpy_dtype(schema.dtype)
    )
    sharding = parallel.state_shardings(shape, mesh, config.parallel.shard_items, num_items=dataset.num_items)
    say = print if parallel.is_main_process() else (lambda *_: None)
    table, cache = feature_cache.load(
        fdir,
        dataset.item_ids,
        rows,
        sharding,
        standardize=m.feature_norm == "standardize",
        cache_dir=config.features.cache_dir,
        allow_missing=config.features.allow_missing,
        say=print,  # only process 0 speaks, except a process building a copy of its own
    )
    h = cache.header
    per_device = feature_cache.shard_bytes(table)
    say(
        f"features: {table.shape[0] - 1} items x {table.shape[1]} rows x {table.shape[2]} {table.dtype} "
        f"({table.nbytes / 1e6:.3f} MB) placed as {sharding.spec}: {max(per_device) / 1e6:.3f} MB on each of this "
        f"process's {len(per_device)} devices"
    )
    loaded = features_lib.FeatureTable(
        table=table,
        schema=schema,
        layers=rows,
        missing=h["missing"],
        unused=h["unused"],
        records=h["records"],
        files=h["files"],
        identical=[tuple(pair) for pair in h["identical"]],
        num_identical=h["num_identical"],
        content_digest=h.get("content_digest"),  # absent in caches built before it was recorded
    )
    if loaded.missing:
        say(f"features: {loaded.missing} of {dataset.num_items} items have no features and were zero-filled")
    if loaded.identical:
        item, same = loaded.identical[0]
        say(
            f"features: warning: {loaded.num_identical} items have exactly the features of an earlier item (e.g. "
            f"{item} = {same}); they tie in every content score (duplicate videos or zero-filled failures?)"
        )
    return loaded


def decay_mask(params) -> object:
    """AdamW weight decay (0.1, paper 6.2) on kernels and embedding tables only (ndim >= 2).

    Biases, LayerNorm scales and DFF's layer weights alpha are not decayed: decaying alpha's logits would pull the
    learned layer weighting back towards uniform, and decaying norms/biases is a known harm with no benefit here.
    """
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def layer_weight_mask(params) -> object:
    """True for DFF's layer-weight logits (models.ContentEncoder.layer_logits), False elsewhere."""
    return jax.tree_util.tree_map_with_path(lambda path, _: "layer_logits" in jax.tree_util.keystr(path), params)


def make_optimizer(
    *, lr: float, weight_decay: float, b1: float, b2: float, clip_norm: float, alpha_lr_mult: float
) -> optax.GradientTransformation:
    """Gradient clipping then AdamW with a constant learning rate (MicroLens: constant lr, clip 5): `**config.optim`.

    DFF's layer weights alpha (Eq. 5) get their Adam step scaled by `alpha_lr_mult`. Adam moves every parameter by
    about lr per step whatever its gradient, so with lr 1e-3 and a few hundred steps alpha's logits could move by
    less than 0.5 in total and the learned weighting would stay close to the uniform mean it starts from. The paper
    does not say how alpha is optimised beyond "end-to-end"; a larger step for these L scalars shared by all items is
    our choice (default 10; docs/benchmarks.md has what it changed on the synthetic data).
    """
    return optax.chain(
        optax.clip_by_global_norm(clip_norm) if clip_norm > 0 else optax.identity(),
        optax.adamw(lr, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask),
        optax.masked(optax.scale(alpha_lr_mult), layer_weight_mask),
    )


def cast_floating(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def create_train_state(
    config: ml_collections.ConfigDict, dataset: data_lib.Dataset, table: jax.Array | np.ndarray | None, mesh
) -> tuple[dict, dict, dict]:
    """(state, static, frozen) of a new run on `mesh` (module docstring), initialised from `config.seed`.

    `table` is `load_table`'s placed table (or a numpy array of that shape, which is standardised and placed here).
    The model is built, and the state initialised, inside one `jax.jit` whose `out_shardings` are the run's state
    shardings, so each device materialises only its shard of the ID table and of its AdamW moments, never the whole
    table (the random streams are partitionable threefry: the same values however the arrays are split). What the
    model computes from the table at init (`model.content_init="match_id"`'s norms of sampled items) runs in the same
    program over the sharded table, and cold-ID zeroing reads the train counts from a replicated array. The
    log-popularity comes from the data (`data.log_popularity`).
    """
    m, shard_items, rep = config.model, config.parallel.shard_items, parallel.replicated(mesh)
    if table is not None and not isinstance(table, jax.Array):
        table = models.standardized_table(table) if m.feature_norm == "standardize" else jnp.asarray(table)
    tx = make_optimizer(**config.optim)

    def build(table, train_counts) -> models.Recommender:
        return models.Recommender(
            dataset.num_items, table, train_counts=train_counts, rngs=nnx.Rngs(config.seed), **config.model
        )

    def init(table, train_counts) -> dict:
        _, params, _ = nnx.split(build(table, train_counts), nnx.Param, ...)
        return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

    train_counts = jax.device_put(np.asarray(dataset.item_counts), rep)
    graphdef, _, abstract_features = nnx.split(nnx.eval_shape(build, table, train_counts), nnx.Param, ...)
    # The frozen feature table [N+1, L, H] is item-indexed like the ID table: the same rule shards it on "model"
    # (rows, or H when N+1 does not divide); it is the only non-trainable leaf of the model.
    frozen_sharding = {
        "features": parallel.state_shardings(abstract_features, mesh, shard_items, num_items=dataset.num_items),
        "log_pop": rep,
    }
    if len(jax.tree.leaves(abstract_features)) != (table is not None):
        raise ValueError(
            f"create_train_state: expected the feature table as the model's only non-Param state, got "
            f"{jax.tree.map(lambda x: x.shape, abstract_features)}"
        )
    features = jax.tree.map(lambda _: table, abstract_features)
    frozen = jax.device_put({"features": features, "log_pop": data_lib.log_popularity(dataset)}, frozen_sharding)
    table = None if table is None else jax.tree.leaves(frozen["features"])[0]
    abstract = jax.eval_shape(init, table, train_counts)
    state_sharding = parallel.state_shardings(abstract, mesh, shard_items, num_items=dataset.num_items)
    program = jax.jit(init, out_shardings=state_sharding).lower(table, train_counts).compile()
    state = program(table, train_counts)
    params, memory = state["params"], program.memory_analysis()
    static = {
        "graphdef": graphdef,
        "tx": tx,
        "loss": config.loss.to_dict(),
        "compute_dtype": str(config.train.compute_dtype),
        "mesh": mesh,
        "state_sharding": state_sharding,
        "frozen_sharding": frozen_sharding,
        "batch_sharding": parallel.batch_sharding(mesh),
        "ranking_sharding": parallel.ranking_sharding(mesh, shard_items, config.model.embed_dim),
        "param_count": int(sum(np.prod(p.shape) for p in jax.tree.leaves(params))),
        # what the init program allocates on each device (its shard of the state and its temporaries), where the
        # backend says: O(state / model_axis) for the item tables, never a whole one
        "init_bytes_per_device": None
        if memory is None
        else int(memory.temp_size_in_bytes + memory.output_size_in_bytes),
    }
    return state, static, frozen


def build_run(config: ml_collections.ConfigDict) -> tuple[data_lib.Dataset, dict, dict, dict]:
    """(dataset, state, static, frozen) for `config`: what training, evaluation and `recommend` share.

    Reads the data and features that exist; it never generates data (training calls
    `synthetic.ensure_synthetic_data` first). Call `parallel.initialize` before it.
    """
    mesh = parallel.make_mesh(config.parallel)  # device and batch-size errors before the data is read
    parallel.check_global_batch(config.train.batch_size, mesh)
    parallel.check_global_batch(config.eval.batch_size, mesh)
    dataset = data_lib.build_dataset(config.data, verbose=parallel.is_main_process())
    check_eval_fits(config.eval, dataset)
    loaded = load_table(config, dataset, mesh)
    state, static, frozen = create_train_state(config, dataset, None if loaded is None else loaded.table, mesh)
    if loaded is not None:  # what the results should say about the features (results.json "features")
        static["features"] = {
            "rows": loaded.layers,
            "missing_items": loaded.missing,
            "identical_items": loaded.num_identical,
            "unused_records": loaded.unused,
            "content_digest": loaded.content_digest,
        }
    return dataset, state, static, frozen


def check_eval_fits(eval_cfg: ml_collections.ConfigDict, dataset: data_lib.Dataset) -> None:
    """Refuses cut-offs and sampled negatives that the item count makes meaningless, before any training: HR@K is
    1 for every target when K >= N, and the sampled protocol needs an item each user never met."""
    n = dataset.num_items
    if max(eval_cfg.ks) >= n:
        raise ConfigError(f"config.eval.ks={tuple(eval_cfg.ks)}: every cut-off must be below the {n} items of the data")
    k = eval_cfg.sampled_negatives
    if k and k >= n:
        raise ConfigError(f"config.eval.sampled_negatives={k}: must be below the {n} items of the data (or 0: off)")
    if k:
        for split in ("valid", "test"):
            ev = getattr(dataset, split)
            _, allowed = metrics.forbidden_items(ev["targets"], ev["history"], n)
            if (full := np.flatnonzero(allowed <= 0)).size:
                users = [dataset.user_ids[u] for u in ev["users"][full[:3]]]
                raise ConfigError(
                    f"config.eval.sampled_negatives={k}: {split} users {users} interacted with every one of the {n} "
                    "items, so no negative can be sampled for them; set it to 0 (full ranking only)"
                )


def model_of(static: dict, params, frozen: dict) -> models.Recommender:
    """The `Recommender` of a run's parameters (inside a jitted function, or eagerly for inspection)."""
    return nnx.merge(static["graphdef"], params, frozen["features"])


# ------------------------------------------------------------------------------------------------------------ step


def train_step(static: dict, state: dict, frozen: dict, batch: dict, rng: jax.Array) -> tuple[dict, dict]:
    """One AdamW step on one global batch (pure; the randomness is fold_in(rng, step)) -> (state, metrics)."""
    key = jax.random.fold_in(rng, state["step"])
    compute_dtype = jnp.dtype(static["compute_dtype"])

    def loss_fn(params):
        model = model_of(static, cast_floating(params, compute_dtype), frozen)
        loss, aux = losses.compute_loss(model, batch, key, frozen["log_pop"], **static["loss"])
        return loss.astype(jnp.float32), aux

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = static["tx"].update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    out = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    out.update({k: v for k, v in aux.items() if jnp.ndim(v) == 0})
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, out


def train_steps(static: dict, state: dict, frozen: dict, batches: tuple, rng: jax.Array) -> tuple[dict, dict]:
    """`train_step` over a tuple of batches in order, in one program (`lax.scan`) -> (state, metrics [len(batches)]).

    The same steps as calling `train_step` once per batch. On the CPU one call per step costs more than the step's
    arithmetic at small shapes: XLA maps a fresh temporary buffer for every call (68 MB at the original-SASRec shapes,
    whose first touches cost ~16,600 page faults, a third of the step's CPU time) and the host dispatches every call;
    a scan pays both once per call (docs/benchmarks.md, "The original SASRec").
    """
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *batches)
    return jax.lax.scan(lambda s, b: train_step(static, s, frozen, b, rng), state, stacked)


def jit_train_step(static: dict, steps_per_call: int = 1):
    """`step(state, frozen, batch, rng) -> (state, metrics)`: `train_step` with `static` bound, jitted once with
    explicit shardings; `state` is donated (updated in place on the device).

    `steps_per_call` > 1 (`config.train.steps_per_call`): `step(state, frozen, batches, rng)` takes a tuple of up to
    that many batches and runs them with `train_steps` (one compiled program per tuple length: the full groups and
    an epoch's last, shorter one), returning metrics with a leading axis of steps.
    """
    rep = parallel.replicated(static["mesh"])
    fn = train_step if steps_per_call == 1 else train_steps
    return jax.jit(
        functools.partial(fn, static),
        in_shardings=(static["state_sharding"], static["frozen_sharding"], static["batch_sharding"], rep),
        out_shardings=(static["state_sharding"], rep),
        donate_argnums=(0,),
    )


# --------------------------------------------------------------------------------------------------- run identity

IDENTITY_FILE = "identity.json"
# Config fields that do not change what a run computes, left out of its identity: where the files are (their
# contents are fingerprinted instead), how it logs, how many checkpoints it keeps, how evaluation is batched, how it
# is spread over devices and hosts (a run resumes on another device count with the same global batch), how many
# steps one call runs (the same steps in the same order), and its
# epoch budget (an epoch's data order depends only on (seed, epoch), so a run resumed with a larger num_epochs or
# patience goes on exactly as if it had been given them from the start; see BUDGET for finished runs).
BUDGET = ("train.num_epochs", "train.patience")
NOT_IDENTITY = (
    *BUDGET,
    "data.dir",
    "features.dir",
    "features.cache_dir",
    "train.progress_bar",
    "train.log_every_steps",
    "train.keep_checkpoints",
    "eval.batch_size",
    "eval.chunk_size",
    "train.steps_per_call",
    "parallel.",
)
# What a run writes into its workdir; `--restart` removes exactly these and nothing else.
RUN_FILES = (IDENTITY_FILE, "config.json", "item_map.json", "results.json", "checkpoints", "tb")


def identity_config(config: ml_collections.ConfigDict) -> dict:
    """The flat config fields that define a run (all but `NOT_IDENTITY`): the "config" of `run_identity`."""
    flat = defaults.flatten(json.loads(config.to_json_best_effort()))
    return {
        k: v for k, v in flat.items() if not any(k == f or (f.endswith(".") and k.startswith(f)) for f in NOT_IDENTITY)
    }


def run_identity(config: ml_collections.ConfigDict) -> dict:
    """What defines a run: its config minus `NOT_IDENTITY`, and fingerprints of the interaction file and of the
    feature folder it reads (`data.fingerprint`, `features.fingerprint`)."""
    kept = identity_config(config)
    interactions = Path(config.data.dir) / config.data.interactions
    out = {"config": kept, "interactions": data_lib.fingerprint(interactions) if interactions.is_file() else None}
    if config.model.item_encoder != "id" and (Path(config.features.dir) / records.SCHEMA_FILE).is_file():
        out["features"] = features_lib.fingerprint(config.features.dir)
    return out


def check_identity(workdir: Path, identity: dict) -> None:
    """Stops with one line naming what differs when `workdir` holds another run than `identity` describes."""
    path = workdir / IDENTITY_FILE
    if not path.is_file():
        found = [name for name in RUN_FILES[1:] if (workdir / name).exists()]
        if found:
            raise TrainError(
                f"{workdir}: holds {', '.join(found)} but no {IDENTITY_FILE} (not a run of this dff_jax), so it "
                "cannot be resumed as this run; use a new --workdir, or pass --restart to discard it and start over"
            )
        return
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TrainError(f"{path}: unreadable ({e}); use a new --workdir, or pass --restart") from None
    if not isinstance(recorded, dict) or not isinstance(recorded.get("config", {}), dict):
        raise TrainError(
            f"{path}: not a run identity (expected an object with a 'config' object); use a new --workdir, or pass "
            "--restart"
        )
    reads = ["interactions"] + (["features"] if identity["config"].get("model.item_encoder") != "id" else [])
    gone = [what for what in reads if recorded.get(what) and identity.get(what) is None]
    if gone:  # moved or deleted inputs are not another run: --restart would throw a good run away
        raise TrainError(
            f"{path}: the {' and '.join(gone)} this run was trained on are not where the config says "
            "(config.data.dir / config.features.dir): moved or deleted? Point the config at them again"
        )
    differ = identity_differences(recorded, identity)
    if differ:
        raise TrainError(
            f"{path}: this workdir holds a different run (differing: {'; '.join(differ[:8])}"
            f"{f'; and {len(differ) - 8} more' if len(differ) > 8 else ''}); use a new --workdir, or pass --restart "
            "to discard it and start over"
        )


def identity_differences(recorded: dict, identity: dict) -> list[str]:
    """The fields and fingerprints on which two run identities differ, as `field: recorded -> now`."""
    out = []
    old, new = recorded.get("config", {}), identity["config"]
    # A field the recorded run predates counts as its default: fields are added with the old behaviour as default.
    declared = defaults.flatten(json.loads(defaults.base_config().to_json_best_effort()))
    for key in sorted(set(old) | set(new)):
        was = old.get(key, declared.get(key)) if key in new else old.get(key)
        if was != new.get(key):
            out.append(f"config.{key}: {old.get(key, '(absent)')!r} -> {new.get(key, '(absent)')!r}")
    for what in ("interactions", "features"):
        if recorded.get(what) != identity.get(what):
            out.append(
                f"{what} file contents (fingerprint {str(recorded.get(what))[:12]} -> {str(identity.get(what))[:12]})"
            )
    # Known only once the feature cache is open (`with_content_digest`); not compared with a run recorded before it
    # existed, or with a cache built before it was recorded.
    what = "features_content"
    if recorded.get(what) and identity.get(what) and recorded[what] != identity[what]:
        out.append(f"features records (content digest {recorded[what][:12]} -> {identity[what][:12]})")
    return out


def with_content_digest(identity: dict, static: dict) -> dict:
    """`identity` plus the full content digest of the features the run just loaded (`features.load_features`, kept
    in the cache header): every record, not only the ends of each shard that `features.fingerprint` reads, so
    records rewritten in the middle of a shard make another run. Check the workdir again with it after build_run."""
    digest = (static.get("features") or {}).get("content_digest")
    return {**identity, "features_content": digest} if digest else identity


def discard_run(workdir: Path) -> None:
    """Removes what a run wrote into `workdir` (RUN_FILES and eval-*.json), never anything else."""
    for name in RUN_FILES:
        target = workdir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    for target in workdir.glob("eval-*-epoch*.json"):
        target.unlink()


# ------------------------------------------------------------------------------------------------------ checkpoints


def checkpoint_managers(workdir: Path, keep: int):
    """Two async managers, checkpoints/latest and checkpoints/best. Each gets its own barrier prefix: without one,
    both save epoch 1 at once and their background threads wait at the same coordination-service barrier name
    ('async_write_complete.1'), which deadlocks a multi-process run until the barrier times out."""

    def manager(name: str, max_to_keep: int):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=True,
            create=True,
            multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=f"dff_{name}"),
        )
        return ocp.CheckpointManager((workdir / "checkpoints" / name).absolute(), options=options)

    return manager("latest", keep), manager("best", 1)


def abstract_of(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def save(manager, epoch: int, state, meta: dict) -> None:
    """Starts an asynchronous save of `epoch` (an earlier save's failure surfaces here, see `checked`)."""
    with checked(manager):
        manager.save(epoch, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))


def finish(manager) -> None:
    """Waits for the manager's pending asynchronous saves."""
    with checked(manager):
        manager.wait_until_finished()


@contextlib.contextmanager
def checked(manager):
    """Turns a checkpoint write that the operating system refused (disk full, read-only, ...), which Orbax reports
    as an error of its own, into one WriteError naming the folder and the cause. Orbax writes into a temporary
    folder and renames it when complete, so the failed epoch leaves no checkpoint and a rerun resumes from the last
    whole one."""
    try:
        yield
    except Exception as e:
        failure = write_failure_in(e)
        if failure is None:
            raise
        raise WriteError(
            f"{manager.directory}: {failure} while writing a checkpoint; fix that, then rerun the same command to "
            "resume from the last complete checkpoint"
        ) from None


def restore(manager, epoch: int, abstract_state):
    """(state, meta) of checkpoint `epoch`; a damaged one (truncated or missing files) is one `TrainError`."""
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
    try:
        r = manager.restore(epoch, args=args)
    except Exception as e:  # Orbax and TensorStore report damage as ValueError, KeyError, ... of their own
        if os_error_in(e) is not None:
            raise  # a read the operating system refused: exit_on_user_error names the file
        folder = Path(manager.directory) / str(epoch)
        what = one_line(str(e).split(" [tensorstore_spec")[0])[:300]  # TensorStore appends its whole spec
        raise TrainError(
            f"{folder}: unreadable checkpoint ({what}); delete that folder to fall back to an earlier "
            "checkpoint (evaluate: --step another epoch), or retrain with --restart"
        ) from None
    return r.state, r.meta

"""Training and evaluation: `train_and_evaluate(config, workdir) -> dict` and a thin `main`.

  python -m dff_jax.train --config configs/synthetic.py --workdir runs/synthetic-dff
  python -m dff_jax.train --config configs/microlens.py:dff --workdir W --config.data.dir=... --config.features.dir=...

The loop follows the paper (6.2) and the MicroLens trainer (reference/microlens-protocol.md 4): AdamW, gradient
clipping, validation by full ranking after every epoch, the best checkpoint by a validation metric, early stopping,
and one test of the best checkpoint at the end. Runs resume from their workdir after a crash or kill: the data order
of an epoch depends only on (seed, epoch) and dropout only on (seed, step), so a resumed run ends exactly where an
uninterrupted one does.

Workdir layout: config.json, item_map.json, checkpoints/{latest,best}/<epoch>/, tb/ (TensorBoard), results.json.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from dff_jax import data as data_lib
from dff_jax import features as features_lib
from dff_jax import losses, metrics, models, parallel, records


class TrainError(RuntimeError):
    """A run that cannot go on (non-finite loss, missing data); the message says what and where."""


# ----------------------------------------------------------------------------------------------------------- data


def prepare_dataset(config: ml_collections.ConfigDict) -> data_lib.Dataset:
    """Builds the dataset, generating the synthetic default first when the config asks for it and it is absent."""
    ensure_synthetic_data(config)
    return data_lib.build_dataset(config.data, verbose=parallel.is_main_process())


def ensure_synthetic_data(config: ml_collections.ConfigDict) -> None:
    """For `data.generate="synthetic"`: generates the data when absent (process 0; the others wait), and stops when
    the folder holds data made by another generator version or other arguments. Call after `parallel.initialize`."""
    if config.data.generate != "synthetic":
        return
    data_dir = Path(config.data.dir)
    if not (data_dir / config.data.interactions).is_file():
        from dff_jax import synthetic

        if parallel.is_main_process():
            print(f"generating the synthetic dataset in {data_dir} ...", flush=True)
            synthetic.generate(data_dir, **config.data.synthetic.to_dict())
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("dff_jax synthetic data")
    _check_synthetic_is_current(data_dir, config.data.synthetic.to_dict())


def _check_synthetic_is_current(data_dir: Path, requested: dict) -> None:
    """A synthetic folder made by another generator version or other arguments would silently train on different
    data than the config describes; stop instead and say how to regenerate."""
    from dff_jax import synthetic

    path = data_dir / synthetic.GENERATION_FILE
    if not path.is_file():
        return  # files provided by hand: nothing to compare
    recorded = json.loads(path.read_text())
    wanted = {**synthetic.DEFAULTS, **requested}
    differ = sorted(k for k in wanted if recorded.get("args", {}).get(k) != wanted[k])
    why = []
    if recorded.get("version") != synthetic.GENERATOR_VERSION:
        why.append(f"by generator version {recorded.get('version')} (this code writes {synthetic.GENERATOR_VERSION})")
    if differ:
        why.append(f"with other arguments than the config asks for (differing: {', '.join(differ)})")
    if why:
        raise TrainError(
            f"{path}: this synthetic data was made {' and '.join(why)}; delete {data_dir} to regenerate it, "
            "or set --config.data.dir to a new folder"
        )


def feature_rows(model_cfg: ml_collections.ConfigDict, num_stored: int) -> tuple[list[int], dict]:
    """Which stored rows to load for this model, and the model fields rewritten for the loaded sub-table.

    Loading only the rows a variant uses keeps a one-layer run of a 33 x 4096 feature set at 1/33 of the memory.
    """

    def resolve(i: int) -> int:
        j = i + num_stored if i < 0 else i
        if not 0 <= j < num_stored:
            raise TrainError(
                f"model layer {i} is out of range: the feature set stores {num_stored} rows (0..{num_stored - 1})"
            )
        return j

    if model_cfg.content == "layer":
        return [resolve(model_cfg.layer)], {"layer": 0, "layers": ()}
    rows = [resolve(i) for i in model_cfg.layers] if model_cfg.layers else list(range(num_stored))
    return rows, {"layer": -1, "layers": ()}


def load_content(config: ml_collections.ConfigDict, dataset: data_lib.Dataset):
    """The frozen feature table for content encoders (None for the ID-only encoder) and the effective model config."""
    model_cfg = ml_collections.ConfigDict(config.model.to_dict())
    if config.model.item_encoder == "id":
        return None, model_cfg
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
    rows, overrides = feature_rows(config.model, schema.layers)
    table = features_lib.load_features(fdir, dataset.item_ids, layers=rows, allow_missing=config.features.allow_missing)
    if table.missing and parallel.is_main_process():
        print(f"features: {table.missing} of {dataset.num_items} items have no features and were zero-filled")
    model_cfg.update(overrides)
    return table, model_cfg


# ----------------------------------------------------------------------------------------------------- model/state


def decay_mask(params) -> object:
    """AdamW weight decay (0.1, paper 6.2) on kernels and embedding tables only (ndim >= 2).

    Biases, LayerNorm scales and DFF's layer weights alpha are not decayed: decaying alpha's logits would pull the
    learned layer weighting back towards uniform, and decaying norms/biases is a known harm with no benefit here.
    """
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def layer_weight_mask(params) -> object:
    """True for DFF's layer-weight logits (models.ContentEncoder.layer_logits), False elsewhere."""
    return jax.tree_util.tree_map_with_path(lambda path, _: "layer_logits" in jax.tree_util.keystr(path), params)


def make_optimizer(optim_cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Gradient clipping then AdamW with a constant learning rate (MicroLens: constant lr, clip 5).

    DFF's layer weights alpha (Eq. 5) get their Adam step scaled by `optim.alpha_lr_mult`. Adam moves every parameter
    by about lr per step whatever its gradient, so with lr 1e-3 and a few hundred steps alpha's logits could move by
    less than 0.5 in total and the learned weighting would stay close to the uniform mean it starts from. The paper
    does not say how alpha is optimised beyond "end-to-end"; a larger step for these L scalars shared by all items is
    our choice (default 10, config field), measured on the synthetic data in the README.
    """
    return optax.chain(
        optax.clip_by_global_norm(optim_cfg.clip_norm) if optim_cfg.clip_norm > 0 else optax.identity(),
        optax.adamw(
            optim_cfg.lr, b1=optim_cfg.b1, b2=optim_cfg.b2, weight_decay=optim_cfg.weight_decay, mask=decay_mask
        ),
        optax.masked(optax.scale(optim_cfg.alpha_lr_mult), layer_weight_mask),
    )


def cast_floating(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


class Trainer:
    """Holds what the pure step functions close over: the graph definition, optimizer and config.

    Mutable training state never lives here: it is the `state` pytree {params, opt_state, step} passed in and out.
    The frozen feature table and log-popularity travel as the `consts` argument so XLA never embeds them as constants.
    """

    def __init__(self, config, dataset, table, model_cfg, mesh):
        self.config, self.dataset, self.mesh = config, dataset, mesh
        features = None if table is None else table.table
        model = models.build_model(model_cfg, dataset.num_items, features, rngs=nnx.Rngs(config.seed))
        if model_cfg.get("cold_id", "random") == "zero" and hasattr(model, "item_id"):
            # Items absent from training never get a gradient, so their ID rows would stay random noise forever and
            # drown their content path at test time; zero rows make a fused cold item content-only (g*0 + (1-g)*e_v).
            cold = jnp.asarray(dataset.item_counts == 0)[:, None]
            model.item_id[...] = jnp.where(cold, 0.0, model.item_id[...])
        self.graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        del model  # the frozen table outlives setup only as consts["rest"]: no unsharded copy is kept for the run
        self.tx = make_optimizer(config.optim)
        counts = dataset.item_counts.astype(np.float64)
        pop = counts / max(counts.sum(), 1.0)
        pop[0] = 1.0  # MicroLens: pop_prob_list[0] = 1 (padding, never a label)
        log_pop = np.log(np.maximum(pop, 1e-12)).astype(np.float32)
        self.param_count = int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))

        abstract = {
            "params": params,
            "opt_state": jax.eval_shape(self.tx.init, params),
            "step": jnp.zeros((), jnp.int32),
        }
        shard_items = config.parallel.shard_items
        self.state_sharding = parallel.state_shardings(abstract, mesh, shard_items, num_items=dataset.num_items)
        # The frozen feature table [N+1, L, H] is item-indexed like the ID table: the same rule shards it on "model"
        # (rows, or H when N+1 does not divide); its normalisation statistics stay replicated.
        self.rest_sharding = parallel.state_shardings(rest, mesh, shard_items, num_items=dataset.num_items)
        self.consts = {
            "rest": jax.device_put(rest, self.rest_sharding),
            "log_pop": jax.device_put(log_pop, parallel.replicated(mesh)),
        }
        self.consts_sharding = {"rest": self.rest_sharding, "log_pop": parallel.replicated(mesh)}
        params = jax.device_put(params, self.state_sharding["params"])
        init_state = jax.jit(
            lambda p: {"params": p, "opt_state": self.tx.init(p), "step": jnp.zeros((), jnp.int32)},
            out_shardings=self.state_sharding,
        )
        self.init_state = lambda: init_state(params)
        self.batch_sharding = parallel.batch_sharding(mesh)
        rep = parallel.replicated(mesh)
        self._train_step = jax.jit(
            self._step,
            in_shardings=(self.state_sharding, self.batch_sharding, rep, self.consts_sharding),
            out_shardings=(self.state_sharding, rep),
            donate_argnums=(0,),
        )
        self._item_table = jax.jit(self._all_items, out_shardings=rep)
        self._ranks = jax.jit(self._eval_ranks, out_shardings=self.batch_sharding)

    def model(self, params, consts):
        return nnx.merge(self.graphdef, params, consts["rest"])

    def _step(self, state, batch, rng, consts):
        """One AdamW step on one global batch (pure; the randomness is fold_in(rng, step))."""
        key = jax.random.fold_in(rng, state["step"])
        compute_dtype = jnp.dtype(self.config.train.compute_dtype)

        def loss_fn(params):
            model = self.model(cast_floating(params, compute_dtype), consts)
            loss, aux = losses.compute_loss(model, batch, key, self.config.loss, consts["log_pop"])
            return loss.astype(jnp.float32), aux

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        out = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        out.update({k: v for k, v in aux.items() if jnp.ndim(v) == 0})
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, out

    def train_step(self, state, batch, rng):
        """`train_step(state, batch, rng) -> (state, metrics)`; `state` is donated."""
        return self._train_step(state, batch, rng, self.consts)

    def _all_items(self, params, consts):
        return self.model(params, consts).all_item_embeddings().astype(jnp.float32)

    def _eval_ranks(self, params, consts, item_emb, batch):
        user = self.model(params, consts).user_embeddings(batch["inputs"]).astype(jnp.float32)
        e = self.config.eval
        return metrics.target_ranks(
            user,
            item_emb,
            batch["targets"],
            batch["history"],
            mask_history=e.mask_history,
            chunk_size=e.chunk_size,
            ties=e.ties,
        )

    def ranks(self, params, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Full-ranking rank of every evaluation user's target in `split` (and the users' target items).

        Every process holds the whole dataset, so the global mask and targets are known on the host; each process
        feeds only its rows, and the device ranks are fetched once at the end (no host sync per batch).
        """
        item_emb = self._item_table(params, self.consts)
        e = self.config.eval
        start, stop = parallel.process_rows(e.batch_size, self.mesh)
        device_ranks, masks, targets = [], [], []
        for batch in data_lib.eval_batches(self.dataset, split, e.batch_size):
            masks.append(batch.pop("mask"))
            targets.append(batch["targets"])
            local = {k: v[start:stop] for k, v in batch.items()}
            device_ranks.append(self._ranks(params, self.consts, item_emb, parallel.global_batch(local, self.mesh)))
        ranks = np.concatenate([parallel.to_host(r) for r in device_ranks])
        mask = np.concatenate(masks)
        return ranks[mask], np.concatenate(targets)[mask]

    def evaluate(self, params, split: str) -> dict:
        """HR@K / NDCG@K by full ranking, plus cold-start slices by the target's train interaction count."""
        ranks, targets = self.ranks(params, split)
        result = metrics.metrics_from_ranks(ranks, self.config.eval.ks)
        result["num_users"] = int(ranks.size)
        result["cold_start"] = cold_start_slices(ranks, self.dataset.item_counts[targets], self.config.eval)
        if self.config.eval.sampled_negatives > 0:
            result.update(self.sampled_metrics(params, split))
        return result

    def sampled_metrics(self, params, split: str) -> dict:
        """The sampled protocol (K uniform negatives), for comparison with older papers; keys say "sampled"."""
        e = self.config.eval
        item_emb = np.asarray(self._item_table(params, self.consts))
        ev = getattr(self.dataset, split)
        if jax.process_count() > 1:
            raise TrainError(
                "sampled metrics run in one process; evaluate the checkpoint with python -m dff_jax.evaluate"
            )
        user_fn = jax.jit(lambda p, c, x: self.model(p, c).user_embeddings(x))
        user = []
        for batch in data_lib.eval_batches(self.dataset, split, e.batch_size):
            gb = parallel.global_batch({"inputs": batch["inputs"]}, self.mesh)
            user.append(parallel.to_host(user_fn(params, self.consts, gb["inputs"]))[batch["mask"]])
        user = np.concatenate(user)
        interacted = np.concatenate([ev["history"], ev["targets"][:, None]], axis=1)
        ranks = metrics.sampled_ranks(
            user,
            item_emb,
            ev["targets"],
            interacted,
            num_negatives=e.sampled_negatives,
            rng=np.random.default_rng(self.config.seed),
        )
        return metrics.metrics_from_ranks(ranks, e.ks, sampled_negatives=e.sampled_negatives)

    def analysis(self, params) -> dict:
        """DFF's learned layer weights and the gate's distribution over items (fusion only)."""
        model = self.model(params, self.consts)
        out = {}
        if self.config.model.item_encoder == "fusion":
            g = jax.jit(lambda p, c: self.model(p, c).gate_values(jnp.arange(1, self.dataset.num_items + 1)))(
                params, self.consts
            )
            g = np.asarray(g, np.float32).reshape(self.dataset.num_items, -1).mean(axis=1)
            out["gate_mean"] = float(g.mean())
            out["gate_quantiles"] = {str(q): float(np.quantile(g, q)) for q in (0.05, 0.25, 0.5, 0.75, 0.95)}
            out["gate_histogram"] = np.histogram(g, bins=20, range=(0.0, 1.0))[0].tolist()
        if self.config.model.item_encoder != "id" and self.config.model.content == "learned":
            out["layer_weights"] = np.asarray(model.layer_weights(), np.float32).tolist()
        return out


def cold_start_slices(ranks: np.ndarray, target_counts: np.ndarray, eval_cfg) -> dict:
    """Metrics per bin of the target item's train interaction count (e.g. 0, 1-4, 5-19, 20+)."""
    edges = list(eval_cfg.cold_bins)
    out = {}
    for i, lo in enumerate(edges):
        hi = edges[i + 1] if i + 1 < len(edges) else None
        sel = (target_counts >= lo) & (target_counts < hi) if hi is not None else target_counts >= lo
        name = f"{lo}+" if hi is None else (f"{lo}" if hi == lo + 1 else f"{lo}-{hi - 1}")
        if sel.any():
            out[name] = {"num_users": int(sel.sum()), **metrics.metrics_from_ranks(ranks[sel], eval_cfg.ks)}
        else:
            out[name] = {"num_users": 0}
    return out


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
    manager.save(epoch, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))


def restore(manager, epoch: int, abstract_state):
    r = manager.restore(
        epoch, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
    )
    return r.state, r.meta


# ------------------------------------------------------------------------------------------------------------ loop


def setup(config: ml_collections.ConfigDict):
    """Everything a run, `evaluate` and `recommend` share: dataset, features, mesh and the Trainer."""
    parallel.initialize(config.parallel)
    dataset = prepare_dataset(config)
    table, model_cfg = load_content(config, dataset)
    mesh = parallel.make_mesh(config.parallel)
    parallel.check_global_batch(config.train.batch_size, mesh)
    parallel.check_global_batch(config.eval.batch_size, mesh)
    return Trainer(config, dataset, table, model_cfg, mesh)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Trains with early stopping on validation, tests the best checkpoint, writes and returns results.json."""
    workdir = Path(workdir)
    parallel.initialize(config.parallel)  # before any jax use: joins a multi-process job, sets simulated devices
    main = parallel.is_main_process()
    if (workdir / "results.json").is_file():
        result = json.loads((workdir / "results.json").read_text())
        if main:
            print(f"{workdir}/results.json exists: the run is finished (delete it to re-test)")
        return result
    workdir.mkdir(parents=True, exist_ok=True)
    trainer = setup(config)
    ds = trainer.dataset
    if main:
        records.write_json_atomic(workdir / "config.json", json.loads(config.to_json_best_effort()))
        data_lib.save_item_map(ds, workdir / "item_map.json")
        print(
            f"model: {config.model.item_encoder}/{config.model.content}, {trainer.param_count:,} trainable parameters"
        )

    latest, best = checkpoint_managers(workdir, config.train.keep_checkpoints)
    state = trainer.init_state()
    meta = {"epoch": 0, "best_epoch": 0, "best_metric": -math.inf, "bad_epochs": 0, "history": [], "epoch_seconds": []}
    if latest.latest_step() is not None:
        state, meta = restore(latest, latest.latest_step(), abstract_of(state))
        for s in best.all_steps():  # a best saved after the last "latest" belongs to an epoch that will be redone
            if s > meta["epoch"]:
                best.delete(s)
        if main:
            print(f"resumed from {workdir}/checkpoints/latest at epoch {meta['epoch']}", flush=True)

    rng = jax.random.key(config.seed)
    writer = _summary_writer(workdir) if main else None
    steps_per_epoch = data_lib.num_train_batches(ds, config.train.batch_size)
    select = config.train.select_metric
    stopped = meta["bad_epochs"] >= config.train.patience > 0
    epoch = meta["epoch"]
    while not stopped and epoch < config.train.num_epochs:
        epoch += 1
        t0 = time.time()
        state = run_epoch(trainer, state, rng, epoch, steps_per_epoch, writer)
        jax.block_until_ready(state)
        train_seconds = time.time() - t0
        valid = trainer.evaluate(state["params"], "valid")
        meta["history"].append({"epoch": epoch, "valid": valid, "train_seconds": train_seconds})
        meta["epoch_seconds"].append(train_seconds)
        improved = valid[select] > meta["best_metric"]
        if improved:
            meta.update(best_epoch=epoch, best_metric=valid[select], bad_epochs=0)
        else:
            meta["bad_epochs"] += 1
        meta["epoch"] = epoch
        if improved:  # best first: a kill between the two saves then redoes this epoch (see resume above)
            save(best, epoch, state, meta)
        save(latest, epoch, state, meta)
        stopped = config.train.patience > 0 and meta["bad_epochs"] >= config.train.patience
        if main:
            shown = " ".join(f"{k}={valid[k]:.4f}" for k in sorted(valid) if "@" in k)
            print(f"epoch {epoch}: train {train_seconds:.1f}s valid {shown}{' *' if improved else ''}", flush=True)
            for k, v in valid.items():
                if isinstance(v, float):
                    writer.add_scalar(f"valid/{k}", v, epoch)
            writer.flush()
    latest.wait_until_finished()
    best.wait_until_finished()

    best_state, _ = restore(best, meta["best_epoch"], abstract_of(state))
    test = trainer.evaluate(best_state["params"], "test")
    result = {
        "config": json.loads(config.to_json_best_effort()),
        "dataset": ds.stats,
        "param_count": trainer.param_count,
        "epochs_run": meta["epoch"],
        "best_epoch": meta["best_epoch"],
        "best_valid": meta["history"][meta["best_epoch"] - 1]["valid"],
        "valid_history": meta["history"],
        "test": test,
        "seconds_per_epoch": float(np.mean(meta["epoch_seconds"])) if meta["epoch_seconds"] else None,
        "analysis": trainer.analysis(best_state["params"]),
        "devices": jax.device_count(),
        "processes": jax.process_count(),
    }
    if main:
        for k, v in test.items():
            if isinstance(v, float):
                writer.add_scalar(f"test/{k}", v, meta["best_epoch"])
        writer.close()
        records.write_json_atomic(workdir / "results.json", result)
        shown = " ".join(f"{k}={test[k]:.4f}" for k in sorted(test) if "@" in k)
        print(f"test (best epoch {meta['best_epoch']}): {shown}", flush=True)
    latest.close()
    best.close()
    return result


def run_epoch(trainer: Trainer, state, rng, epoch: int, steps: int, writer):
    """One pass over every training user; losses are fetched only at log steps and checked for NaN/Inf there."""
    cfg = trainer.config
    pending = []
    batches = data_lib.train_batches(
        trainer.dataset,
        cfg.train.batch_size,
        cfg.data.max_seq_len,
        cfg.seed,
        epoch,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    bar = None
    if cfg.train.progress_bar and parallel.is_main_process():
        from tqdm import tqdm

        bar = tqdm(total=steps, desc=f"epoch {epoch}", leave=False, unit="step")
    for i, batch in enumerate(batches):
        state, m = trainer.train_step(state, parallel.global_batch(batch, trainer.mesh), rng)
        pending.append(m)
        if (i + 1) % cfg.train.log_every_steps == 0 or i + 1 == steps:
            _flush_metrics(pending, (epoch - 1) * steps + i + 2 - len(pending), writer)
            pending = []
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return state


def _flush_metrics(pending: list[dict], first_step: int, writer) -> None:
    values = jax.device_get(pending)
    for j, m in enumerate(values):
        if not np.isfinite(m["loss"]):
            raise TrainError(
                f"non-finite loss {float(m['loss'])} at train step {first_step + j} (1-based); "
                f"lower --config.optim.lr or check the features for extreme values"
            )
    if writer is not None:
        step = first_step + len(values) - 1
        for k in values[-1]:
            writer.add_scalar(f"train/{k}", float(np.mean([float(m[k]) for m in values])), step)


def _summary_writer(workdir: Path):
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(workdir / "tb"))


# ------------------------------------------------------------------------------------------------------------ main


def quiet_libraries() -> None:
    """Orbax and absl log every checkpoint step at INFO; the CLI shows our own progress lines instead."""
    from absl import logging

    logging.set_verbosity(logging.WARNING)


def main(argv) -> None:
    from absl import flags

    del argv
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    quiet_libraries()
    try:
        train_and_evaluate(config, workdir)
    except (TrainError, data_lib.DataError, features_lib.FeatureError, records.RecordError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "experiment config file, e.g. configs/synthetic.py[:variant]", lock_config=True
    )
    flags.DEFINE_string("workdir", None, "run directory (checkpoints, results.json); an existing one is resumed")
    flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing that turns a config typo or bad variant into one clear line instead of a traceback."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
    except (AttributeError, KeyError, ValueError, TypeError) as e:
        msg = str(e).strip("'\"").replace("\\n", " ").replace("\n", " ")
        bad = [a for a in argv[1:] if a.startswith("--config")]
        print(f"error: bad --config argument ({' '.join(bad)}): {msg}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main, flags_parser=parse_flags)

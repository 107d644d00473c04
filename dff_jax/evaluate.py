"""Evaluation: full ranking (HR@K / NDCG@K, cold-start slices), the sampled protocol, DFF's alpha and gate; and the
checkpoint evaluation command.

  python -m dff_jax.evaluate --workdir W [--split test|valid] [--step N]

The device functions are jitted once at module level (the graph definition, shardings and ranking options are
static arguments), so validating every epoch reuses one compiled program. Training calls `evaluate` on the live
parameters; the command rebuilds the run from W/config.json without ever creating data (a missing synthetic folder
is an error here, not a reason to generate one), restores the best checkpoint (or --step), checks that the dataset
still gives the item index the run was trained with, prints the metrics and then writes
W/eval-<split>-epoch<N>.json.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from dff_jax import data as data_lib
from dff_jax import defaults, metrics, parallel, records, train_state
from dff_jax.errors import ConfigError, TrainError, exit_on_user_error, folder_arg, parse_flags

# ------------------------------------------------------------------------------------------------- device functions


@functools.partial(jax.jit, static_argnames=("graphdef", "sharding", "chunk_size"))
def item_table(params, features, *, graphdef, sharding, chunk_size):
    """[N+1, d] float32 embeddings of every item, laid out as `sharding` (`parallel.ranking_sharding`), computed
    `chunk_size` items at a time (`eval.chunk_size`, as ranking scores them): the gathered features and the fused
    embeddings in flight are O(chunk_size x (L H + d)) per device, whatever the catalogue's size."""
    emb = nnx.merge(graphdef, params, features).all_item_embeddings(chunk_size, sharding).astype(jnp.float32)
    return jax.lax.with_sharding_constraint(emb, sharding)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def user_table(params, features, inputs, *, graphdef):
    """[B, d] user vectors of left-padded histories [B, L] (deterministic)."""
    return nnx.merge(graphdef, params, features).user_embeddings(inputs)


@functools.partial(jax.jit, static_argnames=("graphdef", "sharding", "mask_history", "chunk_size", "ties", "tie_seed"))
def batch_ranks(params, features, items, batch, *, graphdef, sharding, mask_history, chunk_size, ties, tie_seed):
    """Full-ranking rank of each user's target in one batch (metrics.target_ranks), sharded like the batch; ties
    as `ties` (the random policy draws per user from `tie_seed`). With batch["negatives"] [B, K] also the target's
    rank among itself and those negatives (the sampled protocol, `metrics.ranks_among`), from the same user vectors:
    (full, sampled)."""
    user = nnx.merge(graphdef, params, features).user_embeddings(batch["inputs"]).astype(jnp.float32)
    draws = metrics.tie_draws(tie_seed, batch["users"]) if ties == "random" else None
    ranks = metrics.target_ranks(
        user,
        items,
        batch["targets"],
        batch["history"],
        mask_history=mask_history,
        chunk_size=chunk_size,
        ties=ties,
        draws=draws,
    )
    ranks = jax.lax.with_sharding_constraint(ranks, sharding)
    if "negatives" not in batch:
        return ranks
    sampled = metrics.ranks_among(user, items, batch["targets"], batch["negatives"], ties=ties, draws=draws)
    return ranks, jax.lax.with_sharding_constraint(sampled, sharding)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def gate_table(params, features, *, graphdef):
    """[N, 1] the fusion gate of every real item (mean over d for the vector gate)."""
    model = nnx.merge(graphdef, params, features)
    return model.gate_values(jnp.arange(1, model.num_items + 1))


# ------------------------------------------------------------------------------------------------------ evaluation


def ranks(
    static, params, frozen, items, dataset, split: str, eval_cfg, seed: int, negatives: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Full-ranking rank of every evaluation user's target in `split`, the users' target items, and (given the
    users' sampled-protocol `negatives` [U, K]) the target's rank among those, against `items` (`item_table`).

    Every process holds the whole dataset, so the global mask and targets are known on the host; each process
    feeds only its rows, and the device ranks are fetched once at the end (no host sync per batch). Both protocols
    rank from one computation of each batch's user vectors.
    """
    mesh, graphdef, bs = static["mesh"], static["graphdef"], eval_cfg.batch_size
    start, stop = parallel.process_rows(bs, mesh)
    device_ranks, masks, targets = [], [], []
    for i, batch in enumerate(data_lib.eval_batches(dataset, split, bs)):
        masks.append(batch.pop("mask"))
        targets.append(batch["targets"])
        if negatives is not None:
            batch["negatives"] = np.ones((bs, negatives.shape[1]), np.int32)  # padding rows: any valid index
            rows = negatives[i * bs : (i + 1) * bs]
            batch["negatives"][: len(rows)] = rows
        local = parallel.global_batch({k: v[start:stop] for k, v in batch.items()}, mesh)
        r = batch_ranks(
            params,
            frozen["features"],
            items,
            local,
            graphdef=graphdef,
            sharding=static["batch_sharding"],
            mask_history=eval_cfg.mask_history,
            chunk_size=eval_cfg.chunk_size,
            ties=eval_cfg.ties,
            tie_seed=seed,
        )
        device_ranks.append(r if negatives is not None else (r,))
    mask = np.concatenate(masks)
    fetched = [
        np.concatenate([parallel.to_host(r[j]) for r in device_ranks])[mask] for j in range(len(device_ranks[0]))
    ]
    return fetched[0], np.concatenate(targets)[mask], fetched[1] if negatives is not None else None


def sampled_negatives(dataset, split: str, eval_cfg, seed: int) -> np.ndarray:
    """[U, K] int32 negatives of the sampled protocol for every user of `split` (K = eval.sampled_negatives),
    drawn on the host for all users at once by `metrics.sample_negatives` from `seed`. They depend on
    nothing that training changes, so they are drawn once per (split, seed, K) and kept with the dataset (the
    draw took ~0.3 s of every validation at 30,901 users)."""
    if jax.process_count() > 1:
        raise TrainError("sampled metrics run in one process; evaluate the checkpoint with python -m dff_jax.evaluate")
    key = ("sampled_negatives", split, seed, eval_cfg.sampled_negatives)
    if key not in dataset._cache:
        ev = getattr(dataset, split)
        interacted = np.concatenate([ev["history"], ev["targets"][:, None]], axis=1)
        dataset._cache[key] = metrics.sample_negatives(
            ev["targets"],
            interacted,
            dataset.num_items,
            num_negatives=eval_cfg.sampled_negatives,
            rng=np.random.default_rng(seed),
        ).astype(np.int32)
    return dataset._cache[key]


def evaluate(static, params, frozen, dataset, split: str, eval_cfg, seed: int) -> dict:
    """HR@K / NDCG@K by full ranking, cold-start slices by the target's train interaction count, and (with
    `eval_cfg.sampled_negatives` > 0) the sampled protocol seeded by `seed` (keys "sampled<K>/...", for comparison
    with older papers)."""
    # Every item's embedding once for both protocols (for a content encoder, the projection of the whole table),
    # split over "model" with shard_items (parallel.ranking_sharding).
    items = item_table(
        params,
        frozen["features"],
        graphdef=static["graphdef"],
        sharding=static["ranking_sharding"],
        chunk_size=eval_cfg.chunk_size,
    )
    k = eval_cfg.sampled_negatives
    negatives = sampled_negatives(dataset, split, eval_cfg, seed) if k > 0 else None
    r, targets, sampled = ranks(static, params, frozen, items, dataset, split, eval_cfg, seed, negatives)
    result = metrics.metrics_from_ranks(r, eval_cfg.ks)
    result["num_users"] = int(r.size)
    result["cold_start"] = cold_start_slices(r, dataset.item_counts[targets], eval_cfg)
    if k > 0:
        result.update(metrics.metrics_from_ranks(sampled, eval_cfg.ks, sampled_negatives=k))
    return result


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


def gate_mean(static, params, frozen) -> float:
    """The fusion gate g (the ID embedding's share, Eq. 6) averaged over items and dimensions."""
    return float(np.asarray(gate_table(params, frozen["features"], graphdef=static["graphdef"]), np.float32).mean())


def analysis(static, params, frozen, model_cfg) -> dict:
    """DFF's learned layer weights and the gate's distribution over items (fusion only)."""
    out = {}
    if model_cfg.item_encoder == "fusion":
        g = gate_table(params, frozen["features"], graphdef=static["graphdef"])
        g = np.asarray(g, np.float32).reshape(g.shape[0], -1).mean(axis=1)
        out["gate_mean"] = float(g.mean())
        out["gate_quantiles"] = {str(q): float(np.quantile(g, q)) for q in (0.05, 0.25, 0.5, 0.75, 0.95)}
        out["gate_histogram"] = np.histogram(g, bins=20, range=(0.0, 1.0))[0].tolist()
    if model_cfg.item_encoder != "id" and model_cfg.content == "learned":
        weights = train_state.model_of(static, params, frozen).layer_weights()
        out["layer_weights"] = np.asarray(weights, np.float32).tolist()
    return out


# ------------------------------------------------------------------------------------------------------ a saved run


def load_config(workdir: Path) -> ml_collections.ConfigDict:
    path = workdir / "config.json"
    if not path.is_file():
        raise TrainError(f"{path}: missing; is {workdir} a dff_jax run directory (python -m dff_jax.train)?")
    try:
        saved = json.loads(path.read_text())
    except ValueError as e:  # JSONDecodeError
        raise TrainError(f"{path}: not a readable run config ({e}); is {workdir} a dff_jax run directory?") from None
    if not isinstance(saved, dict):
        raise TrainError(f"{path}: not a run config (a JSON object expected); is {workdir} a dff_jax run directory?")
    # A run saved before a field existed gets that field's default (defaults.py adds fields with the behaviour
    # they replace as their default; run identity treats such an absent field the same way).
    config = ml_collections.ConfigDict(saved)
    added = _add_missing_fields(config, defaults.base_config(), path, "")
    if added and parallel.is_main_process():
        print(f"{path}: saved before {', '.join(added[:6])}{' ...' if len(added) > 6 else ''} existed; using defaults")
    return config


def _add_missing_fields(
    node: ml_collections.ConfigDict, declared: ml_collections.ConfigDict, path: Path, prefix: str
) -> list:
    """Adds to `node` the fields of `declared` it lacks (with their defaults); returns their names."""
    added = []
    for key in declared:
        if key not in node:
            node[key] = declared[key]
            added.append(f"{prefix}{key}")
        elif isinstance(declared[key], ml_collections.ConfigDict):
            if not isinstance(node[key], ml_collections.ConfigDict):
                raise TrainError(f"{path}: config field {prefix}{key} should be a group of fields, got {node[key]!r}")
            added += _add_missing_fields(node[key], declared[key], path, f"{prefix}{key}.")
    return added


def load_run(workdir: str | Path, step: int | None = None) -> dict:
    """Rebuilds a run from its workdir and restores a checkpoint (default: the best).

    Returns {"config", "dataset", "static", "frozen", "params", "epoch"}.
    """
    workdir = Path(workdir)
    config = load_config(workdir)
    try:
        defaults.validate(config)
    except ConfigError as e:  # an edited config.json: name it
        raise TrainError(f"{workdir / 'config.json'}: {e}") from None
    parallel.initialize(config.parallel)
    # The data and features must still be what the run was trained on (an edited file re-indexes items silently).
    identity = train_state.run_identity(config)
    try:
        train_state.check_identity(workdir, identity)
        dataset, state, static, frozen = train_state.build_run(config)
        train_state.check_identity(workdir, train_state.with_content_digest(identity, static))  # every record
    except TrainError as e:  # train's advice; evaluate has no --restart
        raise TrainError(
            str(e).replace(
                "use a new --workdir, or pass --restart to discard it and start over",
                "retrain it (python -m dff_jax.train --restart) or point the config at the files it was trained on",
            )
        ) from None
    saved = data_lib.load_item_map(workdir / "item_map.json")
    if saved != dataset.item_ids:
        raise TrainError(
            f"{workdir / 'item_map.json'}: the dataset at {config.data.dir} no longer gives the item index this run "
            f"was trained with ({len(saved) - 1} items then, {dataset.num_items} now)"
        )
    latest, best = train_state.checkpoint_managers(workdir, config.train.keep_checkpoints)
    if step is None:
        manager, step = best, best.latest_step()
        if step is None:
            raise TrainError(f"{workdir}/checkpoints/best holds no checkpoint yet")
    elif step in best.all_steps():
        manager = best
    elif step in latest.all_steps():
        manager = latest
    else:
        raise TrainError(
            f"no checkpoint for epoch {step} in {workdir}/checkpoints; available: best {best.all_steps()}, "
            f"latest {latest.all_steps()}"
        )
    state, _ = train_state.restore(manager, step, train_state.abstract_of(state))
    latest.close()
    best.close()
    return {
        "config": config,
        "dataset": dataset,
        "static": static,
        "frozen": frozen,
        "params": state["params"],
        "epoch": step,
    }


def evaluate_checkpoint(workdir: str | Path, split: str = "test", step: int | None = None) -> dict:
    """Evaluates a saved checkpoint of a run on `split`; prints the metrics, then writes eval-<split>-epoch<N>.json."""
    if split not in ("test", "valid"):
        raise TrainError(f"--split must be test or valid, got {split!r}")
    run = load_run(workdir, step)
    config = run["config"]
    metrics_ = evaluate(run["static"], run["params"], run["frozen"], run["dataset"], split, config.eval, config.seed)
    result = {"split": split, "epoch": run["epoch"], **metrics_}
    if parallel.is_main_process():
        shown = "  ".join(f"{k}={v:.4f}" for k, v in result.items() if isinstance(v, float))
        print(f"{split} @ epoch {result['epoch']} ({result['num_users']} users): {shown}", flush=True)
        records.write_json_atomic(Path(workdir) / f"eval-{split}-epoch{result['epoch']}.json", result)
    return result


@exit_on_user_error
def main(argv) -> None:
    from absl import flags

    del argv
    f = flags.FLAGS
    evaluate_checkpoint(folder_arg(f.workdir, "--workdir"), f.split, f.step)


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("workdir", None, "run directory written by python -m dff_jax.train")
    flags.DEFINE_enum("split", "test", ["test", "valid"], "which split to rank")
    flags.DEFINE_integer("step", None, "checkpoint epoch (default: the best)")
    flags.mark_flags_as_required(["workdir"])
    app.run(main, flags_parser=parse_flags)

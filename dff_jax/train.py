"""Training and evaluation: `train_and_evaluate(config, workdir) -> dict` and a thin `main`.

  python -m dff_jax.train --config configs/synthetic.py --workdir runs/synthetic-dff
  python -m dff_jax.train --config configs/microlens.py:dff --workdir W --config.data.dir=... --config.features.dir=...

The loop follows the paper (6.2) and the MicroLens trainer (docs/protocol.md section 4): AdamW, gradient clipping,
validation by full ranking after every epoch, the best checkpoint by a validation metric, early stopping, and one
test of the best checkpoint at the end. Runs resume from their workdir after a crash or kill: the data order of an
epoch depends only on (seed, epoch) and dropout only on (seed, step), so a resumed run ends exactly where an
uninterrupted one does. The state, the pure step and the checkpoints are in `train_state.py`, evaluation in
`evaluate.py`.

Workdir layout: identity.json, config.json, item_map.json, checkpoints/{latest,best}/<epoch>/, tb/ (TensorBoard),
results.json. identity.json records what defines the run (`train_state.run_identity`): a workdir is only ever resumed, reported
or evaluated as the run it holds; anything else stops before any work, unless `--restart` discards it.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np

from dff_jax import data as data_lib
from dff_jax import defaults, evaluate, parallel, records, synthetic, train_state
from dff_jax.errors import TrainError, exit_on_user_error, folder_arg, one_line, overridden_fields, parse_flags

__all__ = ["TrainError", "train_and_evaluate", "train_epoch"]


def finished_result(config: ml_collections.ConfigDict, workdir: Path, identity: dict | None = None) -> dict:
    """results.json of a finished run in `workdir`, after checking that it is the run `config` describes, trained
    with the same epoch budget; TrainError naming what differs otherwise (never another run's numbers)."""
    train_state.check_identity(workdir, identity or train_state.run_identity(config))
    path = workdir / "results.json"
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
        ran = {k: result["config"][k.split(".")[0]][k.split(".")[1]] for k in train_state.BUDGET}
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError) as e:  # truncated, edited, not ours
        raise TrainError(
            f"{path}: not a results file of dff_jax ({type(e).__name__}: {one_line(str(e))}); delete it to evaluate "
            "the run again from its checkpoints, or pass --restart"
        ) from None
    asked = {k: config[k.split(".")[0]][k.split(".")[1]] for k in train_state.BUDGET}
    if ran != asked:
        raise TrainError(
            f"{workdir}/results.json: this run finished with {ran}, not {asked}; delete results.json to go on "
            "training it with the new budget (it resumes from its last checkpoint), or use a new --workdir"
        )
    return result


def stop_epoch(history: list[dict], select_metric: str, num_epochs: int, patience: int) -> int:
    """The epoch at which a run with this budget stops, replayed from its validation history (the rule of the loop
    in `train_and_evaluate`); the last epoch of `history` where it would not have stopped yet."""
    best, bad = -math.inf, 0
    for entry in history:
        if entry["epoch"] > num_epochs:
            return num_epochs
        if entry["valid"][select_metric] > best:
            best, bad = entry["valid"][select_metric], 0
        else:
            bad += 1
        if patience > 0 and bad >= patience:
            return entry["epoch"]
    return len(history)


def check_budget(workdir: Path, meta: dict, train_cfg) -> None:
    """A resume may raise the epoch budget (the run goes on as if given it from the start) but not cut it below
    where the checkpoint already is: the result would be a model trained past the budget it is reported with."""
    stop = stop_epoch(meta["history"], train_cfg.select_metric, train_cfg.num_epochs, train_cfg.patience)
    if meta["epoch"] > stop:
        raise TrainError(
            f"{workdir}/checkpoints/latest: the run is at epoch {meta['epoch']}, but with train.num_epochs="
            f"{train_cfg.num_epochs} and train.patience={train_cfg.patience} it would have stopped at epoch {stop}: "
            "resuming would report a model trained past that budget; give the budget it ran with (or a larger "
            "one), or pass --restart to train it again"
        )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path, *, restart: bool = False) -> dict:
    """Trains with early stopping on validation, tests the best checkpoint, writes and returns results.json.

    An existing workdir is resumed (or, when finished, its results returned) only if it holds the same run
    (`train_state.check_identity`); `restart=True` discards what it holds first.
    """
    workdir = Path(workdir)
    defaults.validate(config)  # every field before any work: a bad value never costs an epoch
    if workdir.exists() and not workdir.is_dir():
        raise TrainError(f"{workdir}: --workdir is a file; expected a folder (new or of this run)")
    parallel.initialize(config.parallel)  # before any jax use: joins a multi-process job, sets simulated devices
    main = parallel.is_main_process()
    # Paths may differ between hosts (they are not part of the identity); what is trained may not.
    agreed = json.dumps([train_state.identity_config(config), restart], sort_keys=True, default=str)
    parallel.check_processes_agree("config", agreed)
    synthetic.ensure_synthetic_data(config)
    identity = train_state.run_identity(config)
    if restart:
        if main:
            train_state.discard_run(workdir)
        if jax.process_count() > 1:  # no process may check the workdir before process 0 has emptied it
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("dff_jax restart")
    if (workdir / "results.json").is_file():
        result = finished_result(config, workdir, identity)
        if main:
            print(f"{workdir}/results.json exists: the run is finished (--restart trains it again)")
        return result
    train_state.check_identity(workdir, identity)
    if main:  # a workdir that cannot be made stops the run here, before the data is read
        workdir.mkdir(parents=True, exist_ok=True)
    dataset, state, static, frozen = train_state.build_run(config)
    identity = train_state.with_content_digest(identity, static)  # every record, read by the cache build
    train_state.check_identity(workdir, identity)
    step = train_state.jit_train_step(static, config.train.steps_per_call)
    if main:
        records.write_json_atomic(workdir / train_state.IDENTITY_FILE, identity)
        records.write_json_atomic(workdir / "config.json", json.loads(config.to_json_best_effort()))
        data_lib.save_item_map(dataset, workdir / "item_map.json")
        m = config.model
        print(f"model: {m.item_encoder}/{m.content}, {static['param_count']:,} trainable parameters")
    # The scales the gate starts from (model.content_init, docs/protocol.md section 11); the state is still the
    # initial one here (a resumed run restores below). Eager, so one process only.
    init_norms = None
    if jax.process_count() == 1:
        init_norms = train_state.model_of(static, state["params"], frozen).items.row_norms()
        if main and len(init_norms) > 1:
            print("initial mean row norm: " + ", ".join(f"{k} {v:.4g}" for k, v in init_norms.items()), flush=True)

    latest, best = train_state.checkpoint_managers(workdir, config.train.keep_checkpoints)
    meta = {"epoch": 0, "best_epoch": 0, "best_metric": -math.inf, "bad_epochs": 0, "history": [], "epoch_seconds": []}
    if latest.latest_step() is not None:
        state, meta = train_state.restore(latest, latest.latest_step(), train_state.abstract_of(state))
        for s in best.all_steps():  # a best saved after the last "latest" belongs to an epoch that will be redone
            if s > meta["epoch"]:
                best.delete(s)
        check_budget(workdir, meta, config.train)
        if meta["best_epoch"] and meta["best_epoch"] not in best.all_steps():
            # Deleted by hand: the run would train its whole budget and fail at the end, at every rerun.
            if meta["best_epoch"] not in latest.all_steps():
                raise TrainError(
                    f"{workdir}/checkpoints/best: the best checkpoint (epoch {meta['best_epoch']}) is missing and "
                    "checkpoints/latest no longer holds that epoch; pass --restart to train the run again"
                )
            kept, kept_meta = train_state.restore(latest, meta["best_epoch"], train_state.abstract_of(state))
            train_state.save(best, meta["best_epoch"], kept, kept_meta)  # latest still holds it: copied back
            if main:
                print(f"{workdir}/checkpoints/best: epoch {meta['best_epoch']} was missing; restored from latest")
        if main:
            print(f"resumed from {workdir}/checkpoints/latest at epoch {meta['epoch']}", flush=True)

    rng = jax.random.key(config.seed)
    writer = _summary_writer(workdir) if main else None
    t = config.train
    stopped = meta["bad_epochs"] >= t.patience > 0
    epoch = meta["epoch"]
    while not stopped and epoch < t.num_epochs:
        epoch += 1
        t0 = time.time()
        state = train_epoch(step, state, frozen, dataset, config, static["mesh"], rng, epoch, writer)
        jax.block_until_ready(state)
        train_seconds = time.time() - t0
        valid = evaluate.evaluate(static, state["params"], frozen, dataset, "valid", config.eval, config.seed)
        meta["history"].append({"epoch": epoch, "valid": valid, "train_seconds": train_seconds})
        if config.model.item_encoder == "fusion":  # how the gate's share of ID vs content moves while training
            meta["history"][-1]["gate_mean"] = evaluate.gate_mean(static, state["params"], frozen)
        meta["epoch_seconds"].append(train_seconds)
        improved = valid[t.select_metric] > meta["best_metric"]
        if improved:
            meta.update(best_epoch=epoch, best_metric=valid[t.select_metric], bad_epochs=0)
        else:
            meta["bad_epochs"] += 1
        meta["epoch"] = epoch
        if improved:  # best first: a kill between the two saves then redoes this epoch (see resume above)
            train_state.save(best, epoch, state, meta)
        train_state.save(latest, epoch, state, meta)
        stopped = t.patience > 0 and meta["bad_epochs"] >= t.patience
        if main:
            shown = " ".join(f"{k}={valid[k]:.4f}" for k in sorted(valid) if "@" in k)
            print(f"epoch {epoch}: train {train_seconds:.1f}s valid {shown}{' *' if improved else ''}", flush=True)
            for k, v in valid.items():
                if isinstance(v, float):
                    writer.add_scalar(f"valid/{k}", v, epoch)
            writer.flush()
    train_state.finish(latest)
    train_state.finish(best)

    best_state, _ = train_state.restore(best, meta["best_epoch"], train_state.abstract_of(state))
    test = evaluate.evaluate(static, best_state["params"], frozen, dataset, "test", config.eval, config.seed)
    result = {
        "config": json.loads(config.to_json_best_effort()),
        "dataset": dataset.stats,
        "param_count": static["param_count"],
        "features": static.get("features"),
        "epochs_run": meta["epoch"],
        "best_epoch": meta["best_epoch"],
        "best_valid": meta["history"][meta["best_epoch"] - 1]["valid"],
        "valid_history": meta["history"],
        "test": test,
        "seconds_per_epoch": float(np.mean(meta["epoch_seconds"])) if meta["epoch_seconds"] else None,
        "analysis": evaluate.analysis(static, best_state["params"], frozen, config.model),
        "init_norms": init_norms,
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


def train_epoch(step, state, frozen, dataset, config, mesh, rng, epoch: int, writer=None):
    """One pass over every training user with the jitted `step` (`train_state.jit_train_step(static,
    config.train.steps_per_call)`), `steps_per_call` batches per call.

    Losses are fetched only at log steps and checked for NaN/Inf there, so the host never waits on the device
    between steps.
    """
    steps = data_lib.num_train_batches(dataset, config.train.batch_size)
    per_call = config.train.steps_per_call
    batches = data_lib.train_batches(
        dataset,
        config.train.batch_size,
        config.data.max_seq_len,
        config.seed,
        epoch,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    bar = None
    if config.train.progress_bar and parallel.is_main_process():
        from tqdm import tqdm

        bar = tqdm(total=steps, desc=f"epoch {epoch}", leave=False, unit="step")
    pending, done, group = [], 0, []
    for batch in batches:
        group.append(parallel.global_batch(batch, mesh))
        if len(group) < per_call and done + len(group) < steps:
            continue
        if per_call == 1:
            state, m = step(state, frozen, group[0], rng)
        else:
            state, m = step(state, frozen, tuple(group), rng)
        pending.append(m)
        first, done, group = done, done + len(group), []
        if done // config.train.log_every_steps > first // config.train.log_every_steps or done == steps:
            _flush_metrics(pending, (epoch - 1) * steps + done, writer)
            pending = []
        if bar is not None:
            bar.update(done - first)
    if bar is not None:
        bar.close()
    return state


def _flush_metrics(pending: list[dict], last_step: int, writer) -> None:
    """Checks and logs the metrics of the calls since the last flush (scalars, or [steps] from a multi-step call);
    `last_step` is the 1-based global step of the last of them."""
    values = [{k: np.atleast_1d(v) for k, v in m.items()} for m in jax.device_get(pending)]
    losses = np.concatenate([m["loss"] for m in values])
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size:
        raise TrainError(
            f"non-finite loss {float(losses[bad[0]])} at train step {last_step - len(losses) + 1 + bad[0]} (1-based); "
            f"lower --config.optim.lr or check the features for extreme values"
        )
    if writer is not None:
        for k in values[-1]:
            writer.add_scalar(f"train/{k}", float(np.mean(np.concatenate([m[k] for m in values]))), last_step)


def _summary_writer(workdir: Path):
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(workdir / "tb"))


# ------------------------------------------------------------------------------------------------------------ main


def define_config_flags(flag_values=None, argv: list[str] | None = None) -> None:
    """`--config FILE[:variant]` (locked: an override of an undeclared field is an error) and its `--config.x.y=v`
    overrides: the one override syntax of the project (train and study). ml-collections finds the overrides in
    `argv` (default sys.argv), which must then be what `parse_flags` parses."""
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config",
        None,
        "experiment config file, e.g. configs/synthetic.py[:variant]",
        flag_values=flags.FLAGS if flag_values is None else flag_values,
        lock_config=True,
        sys_argv=argv,
    )


@exit_on_user_error
def main(argv) -> None:
    from absl import flags

    del argv
    workdir = folder_arg(flags.FLAGS.workdir, "--workdir")
    defaults.check_overrides(flags.FLAGS.config, overridden_fields(sys.argv))  # ones the variant does not read
    train_and_evaluate(flags.FLAGS.config, workdir, restart=flags.FLAGS.restart)


if __name__ == "__main__":
    from absl import app, flags

    define_config_flags()
    flags.DEFINE_string("workdir", None, "run directory (checkpoints, results.json); the same run in it is resumed")
    flags.DEFINE_boolean("restart", False, "discard the run the workdir holds (its checkpoints and results) first")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=parse_flags)

"""Evaluate a trained run's checkpoint with the trainer's own evaluation code.

  python -m dff_jax.evaluate --workdir W [--split test|valid] [--step N]

Without --step the best checkpoint (by the run's validation metric) is used. The run's config.json is read back
from the workdir, so data and feature paths are resolved as they were when it trained (relative to the same cwd).
Writes W/eval-<split>-epoch<N>.json and prints the metrics.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import ml_collections

from dff_jax import data as data_lib
from dff_jax import features as features_lib
from dff_jax import records, train
from dff_jax.train import quiet_libraries


def load_config(workdir: Path) -> ml_collections.ConfigDict:
    path = workdir / "config.json"
    if not path.is_file():
        raise train.TrainError(f"{path}: missing; is {workdir} a dff_jax run directory (python -m dff_jax.train)?")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def load_run(workdir: str | Path, step: int | None = None):
    """Rebuilds a run's Trainer and restores a checkpoint: (trainer, params, epoch)."""
    workdir = Path(workdir)
    config = load_config(workdir)
    trainer = train.setup(config)
    saved = data_lib.load_item_map(workdir / "item_map.json")
    if saved != trainer.dataset.item_ids:
        raise train.TrainError(
            f"{workdir / 'item_map.json'}: the dataset at {config.data.dir} no longer gives the item index this run "
            f"was trained with ({len(saved) - 1} items then, {trainer.dataset.num_items} now)"
        )
    latest, best = train.checkpoint_managers(workdir, config.train.keep_checkpoints)
    if step is None:
        manager, step = best, best.latest_step()
        if step is None:
            raise train.TrainError(f"{workdir}/checkpoints/best holds no checkpoint yet")
    elif step in best.all_steps():
        manager = best
    elif step in latest.all_steps():
        manager = latest
    else:
        raise train.TrainError(
            f"no checkpoint for epoch {step} in {workdir}/checkpoints; available: best {best.all_steps()}, "
            f"latest {latest.all_steps()}"
        )
    state, _ = train.restore(manager, step, train.abstract_of(trainer.init_state()))
    latest.close()
    best.close()
    return trainer, state["params"], step


def evaluate_checkpoint(workdir: str | Path, split: str = "test", step: int | None = None) -> dict:
    if split not in ("test", "valid"):
        raise train.TrainError(f"--split must be test or valid, got {split!r}")
    trainer, params, epoch = load_run(workdir, step)
    result = {"split": split, "epoch": epoch, **trainer.evaluate(params, split)}
    if train.parallel.is_main_process():
        records.write_json_atomic(Path(workdir) / f"eval-{split}-epoch{epoch}.json", result)
    return result


def main(argv) -> None:
    from absl import flags

    del argv
    f = flags.FLAGS
    quiet_libraries()
    try:
        result = evaluate_checkpoint(f.workdir, f.split, f.step)
    except (train.TrainError, data_lib.DataError, features_lib.FeatureError, records.RecordError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    shown = "  ".join(f"{k}={v:.4f}" for k, v in result.items() if isinstance(v, float))
    print(f"{f.split} @ epoch {result['epoch']} ({result['num_users']} users): {shown}")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("workdir", None, "run directory written by python -m dff_jax.train")
    flags.DEFINE_enum("split", "test", ["test", "valid"], "which split to rank")
    flags.DEFINE_integer("step", None, "checkpoint epoch (default: the best)")
    flags.mark_flags_as_required(["workdir"])
    app.run(main)

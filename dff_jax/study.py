"""The paper's experiment grid on one dataset, over seeds, with a report: `python -m dff_jax.study`.

  python -m dff_jax.study --config configs/synthetic.py --out study/synthetic --seeds 3 --layer-step 3
  python -m dff_jax.study --config configs/ml100k.py --features hidden=FEAT_DIR caption=CAPTION_DIR \
      --out study/ml100k --seeds 3 --config.train.num_epochs=50
  python -m dff_jax.study ... --shard 0/2 &  python -m dff_jax.study ... --shard 1/2 &  # spread over processes
  python -m dff_jax.study ... --report-only                                           # aggregate what finished
  python -m dff_jax.study ... --grid lr=1e-4,1e-5 embed_dim=512,1024                  # select per row on valid

Rows of the grid (paper sections 4-5), each a named run:
  id           ID embedding only (IDRec)
  replace      last layer of the hidden-state set replaces the ID (Table 1 "Replacement")
  fusion_last  last layer gated with the ID (Table 1 "Fusion", Eq. 3-4)
  fusion_mean  uniform mean of all layers, fused (Figure 3's red line), over standardised layers by default
  fusion_mean_raw  the same over the raw stored layers: the paper's Eq. 5 exactly (model.feature_norm="none")
  dff          learned layer weights alpha + gate (Eq. 5-7), over standardised layers by default
  dff_raw      the same over the raw stored layers (Eq. 5 exactly)
  layer_<k>    fusion of stored layer k alone (Figure 3's sweep; the last layer is fusion_last, not trained twice)
  caption      fusion of the one-layer caption-style feature set (Figure 2 "CC"), when `--features caption=DIR`
  set_<name>   DFF on any further hidden-state set `--features <name>=DIR`: a prompt set (a name with "prompt",
               e.g. plain_prompt: paper Table 3) or a modality set (title, cover, video: paper Table 4), each
               compared in the report with DFF on the `hidden` set by paired t-tests

`--config FILE[:variant]` and its `--config.x.y=value` overrides are parsed by ml-collections exactly as
`python -m dff_jax.train` parses them (locked: an undeclared field is an error), so one override syntax serves both.

Every (run, seed) is its own work directory `<out>/runs/<run>/seed<k>/` trained by `train.train_and_evaluate`, which
returns the stored results.json of a finished run: an interrupted study resumes by skipping what finished.
The report (report.md, results.csv, plots/) is written by `dff_jax.report` from whatever results exist.

`--grid FIELD=V1,V2 ...` (the paper's selection from {1e-4, 1e-5, 1e-6} x {512, 1024, 2048}, section 6.2) trains
every row at every point of the grid's product, `<out>/runs/<run>/<point>/seed<k>/` (point e.g. `lr1e-05_embed_dim512`;
FIELD is a config path, or a field name that is unique in the config such as lr or embed_dim). The report keeps, per
row, the point with the best validation `train.select_metric` averaged over the row's seeds (one setting per row, so
the seeds of a row stay paired with those of the other rows), and reports only that point's test numbers
(docs/protocol.md section 11). The grid is saved as `<out>/grid.json` for `--report-only`.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import re
import sys
import time
from pathlib import Path

import ml_collections

from dff_jax import defaults, features, records
from dff_jax.errors import OneLineArgumentParser, UserError, exit_on_user_error, folder_arg, parse_flags

BASE_RUNS = ("id", "replace", "fusion_last", "fusion_mean", "dff", "fusion_mean_raw", "dff_raw")
# With feature_norm="standardize" (the default) the mean of layers and DFF weigh z-scored layers: a per-(layer,
# dimension) re-weighting of Eq. 5, not its formula. The *_raw rows run Eq. 5 on the stored values, so a reader
# can tell what standardisation adds (docs/protocol.md section 8).
RAW_ROWS = {"fusion_mean_raw": "fusion_mean", "dff_raw": "dff"}


class StudyError(UserError):
    """A study that cannot be planned (bad arguments, missing features); the message says what to fix."""


GRID_FILE = "grid.json"


@dataclasses.dataclass(frozen=True)
class Job:
    run: str
    seed_index: int
    point: str = ""  # the grid point's name ("" without --grid)

    def workdir(self, out: Path) -> Path:
        run_dir = out / "runs" / self.run
        return (run_dir / self.point if self.point else run_dir) / f"seed{self.seed_index}"


# ------------------------------------------------------------------------------------------------------ config


def split_config_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the `--config`/`--config.x=v` arguments, the rest): the first go to ml-collections, the rest to argparse."""
    config_args, rest, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--config" and i + 1 < len(argv):
            config_args += [a, argv[i + 1]]
            i += 2
            continue
        (config_args if a.startswith(("--config=", "--config.")) else rest).append(a)
        i += 1
    return config_args, rest


def config_file(config_args: list[str]) -> str:
    """The FILE[:variant] of `--config FILE[:variant]` or `--config=FILE[:variant]`."""
    for i, a in enumerate(config_args):
        if a == "--config":
            return config_args[i + 1]
        if a.startswith("--config="):
            return a.removeprefix("--config=")
    raise StudyError("--config FILE[:variant] is required, e.g. --config configs/synthetic.py")


def load_config(config_args: list[str]) -> ml_collections.ConfigDict:
    """The config of `--config FILE[:variant] [--config.x.y=v ...]`, parsed as `python -m dff_jax.train` does."""
    from absl import flags

    from dff_jax import train

    config_file(config_args)  # a clear error when it is missing
    argv = ["dff_jax.study", *config_args]
    flag_values = flags.FlagValues()
    train.define_config_flags(flag_values, argv)
    parse_flags(argv, flag_values)
    return flag_values.config


def parse_features(pairs: list[str]) -> dict[str, Path]:
    """`NAME=DIR` pairs -> {"hidden": dir, ["caption": dir], other names: dir, ...}.

    The set named hidden (else the first that is not caption) is the hidden-state set of the main grid; caption is
    the caption-centric set; every other name is an extra hidden-state set that gets its own DFF row (`set_<name>`,
    paper Tables 3 and 4), in the order given.
    """
    named = {}
    for pair in pairs:
        name, sep, directory = pair.partition("=")
        if not sep or not name or not directory:
            raise StudyError(f"--features {pair!r}: expected NAME=DIR, e.g. hidden=/data/features")
        if name in named:
            raise StudyError(f"--features: the name {name!r} is given twice")
        if not name.replace("_", "").isalnum():
            raise StudyError(f"--features {pair!r}: a set name is letters, digits and underscores")
        named[name] = Path(directory)
    out = {}
    if named:
        candidates = [n for n in named if n != "caption"]
        hidden = "hidden" if "hidden" in named else (candidates[0] if candidates else None)
        if hidden is None:
            raise StudyError("--features: only a caption set is given; the study needs a hidden-state set too")
        out["hidden"] = named[hidden]
        out.update({n: d for n, d in named.items() if n != hidden})
    for name, d in out.items():
        if not (d / records.SCHEMA_FILE).is_file():
            raise StudyError(f"--features {name}={d}: no {records.SCHEMA_FILE} there (is the extraction finished?)")
    return out


def extra_sets(feats: dict[str, Path]) -> list[str]:
    """The names of the extra hidden-state sets (neither hidden nor caption), in the order given."""
    return [n for n in feats if n not in ("hidden", "caption")]


# ------------------------------------------------------------------------------------------------------ plan


def layer_list(num_layers: int, layers: str | None, step: int | None) -> list[int]:
    """Stored rows for the sweep: `--layers 0,3,-1`, or every `--layer-step`-th plus the last, or all."""
    if layers:
        try:
            picked = [int(s) for s in layers.split(",") if s.strip()]
        except ValueError:
            raise StudyError(f"--layers {layers!r}: expected comma-separated integers") from None
        # one by one: a sweep may name a row twice (0,3,-1 of 4 rows), it is swept once
        return sorted({features.resolve_layers([k], num_layers, "--layers")[0] for k in picked})
    if step is not None and step < 1:
        raise StudyError(f"--layer-step {step}: expected an integer >= 1")
    if step:
        return sorted(set(range(0, num_layers, step)) | {num_layers - 1})
    return list(range(num_layers))


def plan_runs(
    num_layers: int, sweep: list[int], has_caption: bool, runs: str | None, sets: list[str] = ()
) -> list[str]:
    """Run names of the grid, in report order; `runs` (comma-separated) picks a subset and must name known rows."""
    # layer_<last> is exactly fusion_last (same rows, same seeds): it is not trained twice; the report reuses fusion_last
    grid = list(BASE_RUNS) + (["caption"] if has_caption else []) + [f"set_{name}" for name in sets]
    grid += [f"layer_{k}" for k in sweep if k != num_layers - 1]
    if runs is None:
        return grid
    picked = [r.strip() for r in runs.split(",") if r.strip()]
    if not picked:
        raise StudyError(f"--runs {runs!r}: names no run; e.g. --runs id,dff (or leave it out for the full grid)")
    twice = sorted({r for r in picked if picked.count(r) > 1})
    if twice:  # a row listed twice would be reported (and aggregated) twice
        raise StudyError(f"--runs {runs!r}: {', '.join(repr(r) for r in twice)} given twice")
    valid = set(grid) | {f"layer_{k}" for k in range(num_layers)}
    bad = [r for r in picked if r not in valid]
    if bad:
        raise StudyError(
            f"--runs: unknown runs {bad}; this study has {', '.join(grid)} (and layer_0..layer_{num_layers - 1})"
        )
    return picked


def run_config(base: ml_collections.ConfigDict, run: str, seed: int, feats: dict[str, Path]):
    """The config of one grid row: the variant's model fields, the feature set it reads, and its seed."""
    c = ml_collections.ConfigDict(base.to_dict())
    if run.startswith("layer_"):
        defaults.apply_variant(c, "fusion_layer")
        c.model.content = "layer"
        c.model.layer = int(run.split("_", 1)[1])
    elif run.startswith("set_"):
        defaults.apply_variant(c, "dff")
        c.features.dir = str(feats[run.removeprefix("set_")])
    elif run in RAW_ROWS:
        defaults.apply_variant(c, RAW_ROWS[run])
        c.model.feature_norm = "none"
    else:
        defaults.apply_variant(c, run)
    if run == "caption":
        c.features.dir = str(feats["caption"])
        c.model.layer = -1
    elif run == "id":
        c.features.dir = ""  # the ID-only encoder reads no features
    elif "hidden" in feats and not run.startswith("set_"):
        c.features.dir = str(feats["hidden"])
    c.seed = seed
    c.train.progress_bar = False
    return c


# What `run_config` sets per row and seed: a --grid over one of these would overwrite the rows themselves.
ROW_FIELDS = (
    "seed",
    "model.item_encoder",
    "model.content",
    "model.layer",
    "model.feature_norm",
    "features.dir",
    "train.progress_bar",
)


def parse_grid(pairs: list[str], config: ml_collections.ConfigDict) -> list[dict]:
    """`FIELD=V1,V2 ...` -> the grid's points [{"name": "lr0.0001_embed_dim512", "set": {"optim.lr": 1e-4, ...}}]
    in product order; [] without --grid. Values take the type of the field they set."""
    leaves = defaults.flatten(config.to_dict())
    axes = []
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key or not text.strip(","):
            raise StudyError(f"--grid {pair!r}: expected FIELD=V1,V2, e.g. lr=1e-4,1e-5")
        matches = [p for p in leaves if p == key] or [p for p in leaves if p.rsplit(".", 1)[-1] == key]
        if len(matches) != 1:
            raise StudyError(
                f"--grid {pair!r}: {key!r} names {'no config field' if not matches else ', '.join(matches)}; "
                "give the full path, e.g. optim.lr"
            )
        path, kind = matches[0], type(leaves[matches[0]])
        if path in ROW_FIELDS:
            raise StudyError(
                f"--grid {pair!r}: config.{path} is set by each study row or seed (a grid over it would relabel "
                "runs silently); choose the rows with --runs and the seeds with --seeds / --config.seed"
            )
        if kind not in (int, float, str, bool):
            raise StudyError(f"--grid {pair!r}: config.{path} is a {kind.__name__}; a grid sets numbers or strings")
        try:
            vals = [_typed(kind, v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            raise StudyError(f"--grid {pair!r}: config.{path} takes {kind.__name__} values") from None
        if len(set(vals)) != len(vals):
            raise StudyError(f"--grid {pair!r}: a value is given twice")
        if any(path == a[0] for a in axes):
            raise StudyError(f"--grid: config.{path} is given twice")
        axes.append((path, key, vals))
    points = []
    for combo in itertools.product(*(vals for _, _, vals in axes)):
        name = "_".join(f"{key}{value}" for (_, key, _), value in zip(axes, combo, strict=True))
        points.append({"name": name, "set": {path: v for (path, _, _), v in zip(axes, combo, strict=True)}})
    return points


def _typed(kind, text: str):
    if kind is bool:
        if text.lower() not in ("true", "false"):
            raise ValueError(text)
        return text.lower() == "true"
    if kind is int:
        value = float(text)
        if not value.is_integer():
            raise ValueError(text)
        return int(value)
    return kind(text)


def read_grid(grid_file: Path) -> list[dict]:
    """The grid points `grid_file` records ({"points": [{"name": ..., field: value, ...}, ...]})."""
    try:
        points = json.loads(grid_file.read_text())["points"]
        if not isinstance(points, list) or not all(isinstance(p, dict) and isinstance(p["name"], str) for p in points):
            raise TypeError("expected a list of points, each with a name")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StudyError(f"{grid_file}: unreadable ({e}); delete it or use another --out") from None
    return points


def check_grid_kept(grid_file: Path, points: list[dict]) -> None:
    """Refuses a --grid that drops a point `grid_file` records: the report selects among the recorded points, so
    replacing them would silently change what a finished study selects. Adding points (widening the grid, as
    docs/ml100k-study.md did) keeps the recorded ones and is fine."""
    if not grid_file.is_file():
        return
    recorded = [p["name"] for p in read_grid(grid_file)]
    dropped = [name for name in recorded if name not in {p["name"] for p in points}]
    if dropped:
        raise StudyError(
            f"{grid_file}: this --out was trained on the grid points {recorded}; this --grid drops {dropped} (a "
            "grid may only be widened in the same --out); use another --out, or delete grid.json to start a new grid"
        )


def apply_point(config: ml_collections.ConfigDict, point: dict | None) -> ml_collections.ConfigDict:
    """`config` with the grid point's fields set (in place)."""
    for path, value in (point or {}).get("set", {}).items():
        *parents, leaf = path.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config


def parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 1
    try:
        i, n = (int(s) for s in text.split("/"))
    except ValueError:
        raise StudyError(f"--shard {text!r}: expected I/N, e.g. 0/2") from None
    if not (n >= 1 and 0 <= i < n):
        raise StudyError(f"--shard {text!r}: need 0 <= I < N")
    return i, n


def check_finished_configs(jobs: list[Job], configs: dict[Job, ml_collections.ConfigDict], out: Path) -> None:
    """--report-only: stops when a finished run was trained with other settings than this command gives it (the
    report would print this command's overrides over runs that never used them). Compares configs only: the data
    and features need not be on the machine that writes the report."""
    from dff_jax import train_state

    for job in jobs:
        path = job.workdir(out) / train_state.IDENTITY_FILE
        if not (job.workdir(out) / "results.json").is_file() or not path.is_file():
            continue
        try:
            recorded = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise StudyError(f"{path}: unreadable ({e})") from None
        asked = {"config": train_state.identity_config(configs[job])}
        differ = train_state.identity_differences({"config": recorded.get("config", {})}, asked)
        if differ:
            raise StudyError(
                f"{path}: this finished run was trained with other settings ({'; '.join(differ[:4])}); report it "
                "with the command (overrides, --grid) that trained it, or use another --out"
            )


def run_jobs(jobs: list[Job], configs: dict[Job, ml_collections.ConfigDict], out: Path) -> dict:
    """Trains every job whose results.json is absent; returns counts of trained/skipped runs and wall times."""
    from dff_jax import train

    done, trained, seconds = 0, 0, {}
    for n, job in enumerate(jobs, 1):
        wd = job.workdir(out)
        if (wd / "results.json").is_file():
            # Only the same run is skipped: a study rerun with other overrides or features must not report the
            # old numbers under the new settings.
            try:
                train.finished_result(configs[job], wd)
            except train.TrainError as e:
                raise StudyError(
                    f"{re.split(r'[;,] (?:or )?use a new --workdir', str(e))[0]}; this study's settings differ from "
                    "the finished run's: use another --out, or delete that run folder to train it again"
                ) from None
            done += 1
            continue
        name = f"{job.run}{'/' + job.point if job.point else ''}/seed{job.seed_index}"
        print(f"[study] {n}/{len(jobs)} {name} -> {wd}", flush=True)
        t0 = time.time()
        train.train_and_evaluate(configs[job], wd)
        seconds[name] = round(time.time() - t0, 1)
        trained += 1
    return {"skipped": done, "trained": trained, "seconds": seconds}


# ------------------------------------------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog="python -m dff_jax.study",
        description=__doc__.split("\n")[0],
        epilog="--config FILE[:variant] and --config.x.y=value overrides as in python -m dff_jax.train",
    )
    p.add_argument(
        "--features",
        nargs="*",
        default=[],
        help="NAME=DIR feature sets: hidden=DIR [caption=DIR] [plain_prompt=DIR title=DIR cover=DIR ...]",
    )
    p.add_argument("--out", required=True, help="study folder: runs/, results.csv, report.md, plots/")
    p.add_argument("--seeds", type=int, default=5, help="seeds per run: config.seed + 0..seeds-1 (paper: 5)")
    p.add_argument("--runs", default=None, help="comma-separated rows, e.g. id,dff,layer_3 (default: the full grid)")
    p.add_argument("--layers", default=None, help="layer sweep subset, e.g. 0,3,6,-1 (default: every stored layer)")
    p.add_argument("--layer-step", type=int, default=None, help="sweep every N-th layer plus the last")
    p.add_argument("--shard", default=None, help="I/N: this process trains every N-th (run, seed) job from the I-th")
    p.add_argument(
        "--grid",
        nargs="*",
        default=[],
        help="FIELD=V1,V2 ... (e.g. lr=1e-4,1e-5 embed_dim=512,1024): every row at every point, selected on validation",
    )
    p.add_argument("--report-only", action="store_true", help="write the report from finished runs, train nothing")
    p.add_argument("--no-report", action="store_true", help="train only (e.g. in shards; report later)")
    return p


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    config_args, rest = split_config_args(argv)
    args = build_parser().parse_args(rest)
    from dff_jax import report  # matplotlib/scipy only when the study really runs

    if args.seeds < 1:
        raise StudyError(f"--seeds {args.seeds}: need at least 1")
    folder_arg(args.out, "--out")
    out = Path(args.out)
    config = load_config(config_args)
    if not any(a.startswith("--config.parallel.deterministic_ops") for a in config_args):
        # Paired t-tests over seeds need a seed to give the same numbers on a rerun: on a GPU that takes XLA's
        # deterministic kernels (docs/protocol.md section 11; set before jax starts; no effect on CPUs).
        config.parallel.deterministic_ops = True
    feats = parse_features(args.features)
    if not args.report_only:  # the sweep needs the layer count of the features, so the data must exist first
        from dff_jax import parallel, synthetic

        parallel.initialize(config.parallel)
        synthetic.ensure_synthetic_data(config)
    hidden_dir = feats.get("hidden", Path(config.features.dir) if config.features.dir else None)
    if hidden_dir is None or not (hidden_dir / records.SCHEMA_FILE).is_file():
        raise StudyError(
            f"no hidden-state feature set ({hidden_dir}/{records.SCHEMA_FILE} missing): pass --features hidden=DIR"
        )
    feats["hidden"] = hidden_dir
    num_layers = records.read_schema(hidden_dir).layers
    caption_schema = feats["caption"] / records.SCHEMA_FILE if "caption" in feats else None
    if caption_schema is not None and caption_schema.is_file():  # a report-only machine may lack the features
        rows = records.read_schema(feats["caption"]).layers
        if rows != 1:  # its row would silently be the last layer of a hidden-state set (the HC row's numbers)
            raise StudyError(
                f"--features caption={feats['caption']}: {caption_schema} stores {rows} rows per item; the "
                "caption-centric row (Figure 2 CC) takes a one-row caption set (python -m extract --captions); "
                "give a hidden-state set another NAME= to get its own DFF row"
            )
    sweep = layer_list(num_layers, args.layers, args.layer_step)
    runs = plan_runs(num_layers, sweep, "caption" in feats, args.runs, extra_sets(feats))
    grid_file = out / GRID_FILE
    if args.grid:
        points = parse_grid(args.grid, config)
    elif args.report_only and grid_file.is_file():
        points = read_grid(grid_file)
    else:
        points = []
    by_name = {p["name"]: p for p in points}
    # seed-major: early seeds complete first (for every grid point)
    jobs = [Job(r, s, p["name"]) for s in range(args.seeds) for r in runs for p in points or [{"name": ""}]]
    shard_i, shard_n = parse_shard(args.shard)
    stats = {"skipped": 0, "trained": 0, "seconds": {}}
    mine = jobs if args.report_only else jobs[shard_i::shard_n]
    configs = {
        j: apply_point(run_config(config, j.run, config.seed + j.seed_index, feats), by_name.get(j.point)) for j in mine
    }
    if args.report_only:
        check_finished_configs(jobs, configs, out)
    else:
        for c in configs.values():  # every row's config before the first run trains, and before grid.json
            defaults.validate(c)
        if points:
            check_grid_kept(grid_file, points)
            out.mkdir(parents=True, exist_ok=True)
            records.write_json_atomic(grid_file, {"grid": args.grid, "points": points})
        t0 = time.time()
        stats = run_jobs(mine, configs, out)
        print(
            f"[study] trained {stats['trained']} runs, skipped {stats['skipped']} finished ones "
            f"in {time.time() - t0:.0f}s",
            flush=True,
        )
    if not args.no_report:
        meta = {
            "config": config_file(config_args),
            "features": {k: str(v) for k, v in feats.items()},
            "num_layers": num_layers,
            "seeds": args.seeds,
            "base_seed": config.seed,
            "sets": [a.removeprefix("--") for a in config_args if a.startswith("--config.")],
            "command": "python -m dff_jax.study " + " ".join(argv),
            "grid": [p["name"] for p in points],
            "select_metric": config.train.select_metric,
        }
        paths = report.write_report(out, runs, meta, last_layer=num_layers - 1 if sweep[-1] == num_layers - 1 else None)
        print(f"[study] report: {', '.join(str(p) for p in paths)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

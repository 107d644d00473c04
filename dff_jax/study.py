"""The paper's experiment grid on one dataset, over seeds, with a report: `python -m dff_jax.study`.

  python -m dff_jax.study --config configs/synthetic.py --out /tmp/study --seeds 3 --layer-step 3
  python -m dff_jax.study --config configs/ml100k.py --features hidden=FEAT_DIR caption=CAPTION_DIR \
      --out /tmp/ml100k --seeds 3 --set train.num_epochs=50
  python -m dff_jax.study ... --shard 0/2 &  python -m dff_jax.study ... --shard 1/2 &  # spread over processes
  python -m dff_jax.study ... --report-only                                           # aggregate what finished

Rows of the grid (paper sections 4-5), each a named run:
  id           ID embedding only (IDRec)
  replace      last layer of the hidden-state set replaces the ID (Table 1 "Replacement")
  fusion_last  last layer gated with the ID (Table 1 "Fusion", Eq. 3-4)
  fusion_mean  uniform mean of all layers, fused (Figure 3's red line)
  dff          learned layer weights alpha + gate (Eq. 5-7)
  layer_<k>    fusion of stored layer k alone (Figure 3's sweep; the last layer is fusion_last, not trained twice)
  caption      fusion of the one-layer caption-style feature set (Figure 2 "CC"), when `--features caption=DIR`

Every (run, seed) is its own work directory `<out>/runs/<run>/seed<k>/` trained by `train.train_and_evaluate`, which
returns the stored results.json of a finished run: an interrupted study resumes by skipping what finished.
The report (report.md, results.csv, plots/) is written by `dff_jax.report` from whatever results exist.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import sys
import time
from pathlib import Path

import ml_collections

from dff_jax import defaults, records

BASE_RUNS = ("id", "replace", "fusion_last", "fusion_mean", "dff")


class StudyError(RuntimeError):
    """A study that cannot be planned (bad arguments, missing features); the message says what to fix."""


@dataclasses.dataclass(frozen=True)
class Job:
    run: str
    seed_index: int

    def workdir(self, out: Path) -> Path:
        return out / "runs" / self.run / f"seed{self.seed_index}"


# ------------------------------------------------------------------------------------------------------ config


def load_config(path: str) -> ml_collections.ConfigDict:
    """`get_config()` of a config file (`path` or `path:variant`), imported by file path like absl's config_flags."""
    file, _, arg = path.partition(":")
    p = Path(file)
    if not p.is_file():
        raise StudyError(f"--config {file}: no such config file")
    repo = str(p.resolve().parent.parent)
    if repo not in sys.path:  # configs import `dff_jax`, and may import each other as `configs.x`
        sys.path.insert(0, repo)
    spec = importlib.util.spec_from_file_location(f"_study_config_{p.stem}", p)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise StudyError(f"--config {file}: the file defines no get_config()")
    return module.get_config(arg or None)


def _cast(text: str, current, key: str):
    """Parses `text` as the type of the field's current value (bool/int/float/str/tuple)."""
    try:
        if isinstance(current, bool):
            if text.lower() in ("1", "true", "yes"):
                return True
            if text.lower() in ("0", "false", "no"):
                return False
            raise ValueError("expected true/false")
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, (tuple, list)):
            parts = [s for s in text.replace("(", "").replace(")", "").split(",") if s.strip()]
            kind = type(current[0]) if current else int
            return tuple(kind(s.strip()) for s in parts)
        if current is None:
            try:
                return ast.literal_eval(text)
            except (ValueError, SyntaxError):
                return text
        return text
    except ValueError as e:
        raise StudyError(f"--set {key}={text}: cannot read {text!r} as {type(current).__name__} ({e})") from None


def apply_overrides(config: ml_collections.ConfigDict, sets: list[str]) -> None:
    """Applies `key.path=value` overrides, cast to the existing field's type; unknown keys fail with the valid ones."""
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise StudyError(f"--set {item!r}: expected key=value, e.g. train.num_epochs=30")
        node, parts = config, key.split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                where = ".".join(parts[:depth]) or "the config"
                known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                raise StudyError(f"--set {key}: unknown key {part!r} in {where}; known: {', '.join(known)}")
            if depth < len(parts) - 1:
                node = node[part]
        node[parts[-1]] = _cast(value, node[parts[-1]], key)


def parse_features(pairs: list[str]) -> dict[str, Path]:
    """`NAME=DIR` pairs -> {"hidden": dir, "caption": dir}: the one named hidden (else the first) is the hidden set."""
    named = {}
    for pair in pairs:
        name, sep, directory = pair.partition("=")
        if not sep or not name or not directory:
            raise StudyError(f"--features {pair!r}: expected NAME=DIR, e.g. hidden=/data/features")
        if name in named:
            raise StudyError(f"--features: the name {name!r} is given twice")
        named[name] = Path(directory)
    out = {}
    if named:
        candidates = [n for n in named if n != "caption"]
        hidden = "hidden" if "hidden" in named else (candidates[0] if candidates else None)
        if hidden is None:
            raise StudyError("--features: only a caption set is given; the study needs a hidden-state set too")
        out["hidden"] = named[hidden]
        if "caption" in named:
            out["caption"] = named["caption"]
        extra = sorted(set(named) - {hidden, "caption"})
        if extra:
            raise StudyError(f"--features: unused feature sets {extra}; give one hidden-state set and one caption set")
    for name, d in out.items():
        if not (d / records.SCHEMA_FILE).is_file():
            raise StudyError(f"--features {name}={d}: no {records.SCHEMA_FILE} there (is the extraction finished?)")
    return out


# ------------------------------------------------------------------------------------------------------ plan


def layer_list(num_layers: int, layers: str | None, step: int | None) -> list[int]:
    """Stored rows for the sweep: `--layers 0,3,-1`, or every `--layer-step`-th plus the last, or all."""
    if layers:
        try:
            picked = [int(s) for s in layers.split(",") if s.strip()]
        except ValueError:
            raise StudyError(f"--layers {layers!r}: expected comma-separated integers") from None
        out = []
        for k in picked:
            j = k + num_layers if k < 0 else k
            if not 0 <= j < num_layers:
                raise StudyError(f"--layers: layer {k} is out of range for a feature set with {num_layers} rows")
            out.append(j)
        return sorted(set(out))
    if step:
        return sorted(set(range(0, num_layers, step)) | {num_layers - 1})
    return list(range(num_layers))


def plan_runs(num_layers: int, sweep: list[int], has_caption: bool, runs: str | None) -> list[str]:
    """Run names of the grid, in report order; `runs` (comma-separated) picks a subset and must name known rows."""
    # layer_<last> is exactly fusion_last (same rows, same seeds): it is not trained twice; the report reuses fusion_last
    grid = list(BASE_RUNS) + (["caption"] if has_caption else [])
    grid += [f"layer_{k}" for k in sweep if k != num_layers - 1]
    if not runs:
        return grid
    picked = [r.strip() for r in runs.split(",") if r.strip()]
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
    else:
        defaults.apply_variant(c, run)
    if run == "caption":
        c.features.dir = str(feats["caption"])
        c.model.layer = -1
    elif run == "id":
        c.features.dir = ""  # the ID-only encoder reads no features
    elif "hidden" in feats:
        c.features.dir = str(feats["hidden"])
    c.seed = seed
    c.train.progress_bar = False
    return c


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


def run_jobs(jobs: list[Job], configs: dict[Job, ml_collections.ConfigDict], out: Path) -> dict:
    """Trains every job whose results.json is absent; returns counts of trained/skipped runs and wall times."""
    from dff_jax import train

    done, trained, seconds = 0, 0, {}
    for n, job in enumerate(jobs, 1):
        wd = job.workdir(out)
        if (wd / "results.json").is_file():
            done += 1
            continue
        print(f"[study] {n}/{len(jobs)} {job.run} seed{job.seed_index} -> {wd}", flush=True)
        t0 = time.time()
        train.train_and_evaluate(configs[job], wd)
        seconds[f"{job.run}/seed{job.seed_index}"] = round(time.time() - t0, 1)
        trained += 1
    return {"skipped": done, "trained": trained, "seconds": seconds}


# ------------------------------------------------------------------------------------------------------ main


def train_errors() -> tuple[type[Exception], ...]:
    """The trainer's one-line errors (bad data, features, records): shown as one line, not a traceback."""
    from dff_jax import data, features, train

    return (train.TrainError, data.DataError, features.FeatureError, records.RecordError)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dff_jax.study", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="config file, e.g. configs/synthetic.py")
    p.add_argument("--features", nargs="*", default=[], help="NAME=DIR feature sets: hidden=DIR [caption=DIR]")
    p.add_argument("--out", required=True, help="study folder: runs/, results.csv, report.md, plots/")
    p.add_argument("--seeds", type=int, default=5, help="seeds per run: config.seed + 0..seeds-1 (paper: 5)")
    p.add_argument("--runs", default=None, help="comma-separated rows, e.g. id,dff,layer_3 (default: the full grid)")
    p.add_argument("--layers", default=None, help="layer sweep subset, e.g. 0,3,6,-1 (default: every stored layer)")
    p.add_argument("--layer-step", type=int, default=None, help="sweep every N-th layer plus the last")
    p.add_argument("--shard", default=None, help="I/N: this process trains every N-th (run, seed) job from the I-th")
    p.add_argument("--report-only", action="store_true", help="write the report from finished runs, train nothing")
    p.add_argument("--no-report", action="store_true", help="train only (e.g. in shards; report later)")
    p.add_argument("--set", dest="sets", action="append", default=[], help="config override key=value (repeatable)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dff_jax import report  # matplotlib/scipy only when the study really runs

    try:
        if args.seeds < 1:
            raise StudyError(f"--seeds {args.seeds}: need at least 1")
        out = Path(args.out)
        config = load_config(args.config)
        apply_overrides(config, args.sets)
        feats = parse_features(args.features)
        if not args.report_only:  # the sweep needs the layer count of the features, so the data must exist first
            from dff_jax import parallel, train

            parallel.initialize(config.parallel)
            train.ensure_synthetic_data(config)
        hidden_dir = feats.get("hidden", Path(config.features.dir) if config.features.dir else None)
        if hidden_dir is None or not (hidden_dir / records.SCHEMA_FILE).is_file():
            raise StudyError(
                f"no hidden-state feature set ({hidden_dir}/{records.SCHEMA_FILE} missing): pass --features hidden=DIR"
            )
        feats["hidden"] = hidden_dir
        num_layers = records.read_schema(hidden_dir).layers
        sweep = layer_list(num_layers, args.layers, args.layer_step)
        runs = plan_runs(num_layers, sweep, "caption" in feats, args.runs)
        jobs = [Job(r, s) for s in range(args.seeds) for r in runs]  # seed-major: early seeds complete first
        shard_i, shard_n = parse_shard(args.shard)
        stats = {"skipped": 0, "trained": 0, "seconds": {}}
        if not args.report_only:
            mine = jobs[shard_i::shard_n]
            configs = {j: run_config(config, j.run, config.seed + j.seed_index, feats) for j in mine}
            t0 = time.time()
            stats = run_jobs(mine, configs, out)
            print(
                f"[study] trained {stats['trained']} runs, skipped {stats['skipped']} finished ones "
                f"in {time.time() - t0:.0f}s",
                flush=True,
            )
        if not args.no_report:
            meta = {
                "config": args.config,
                "features": {k: str(v) for k, v in feats.items()},
                "num_layers": num_layers,
                "seeds": args.seeds,
                "base_seed": config.seed,
                "sets": args.sets,
                "command": "python -m dff_jax.study " + " ".join(sys.argv[1:] if argv is None else argv),
            }
            paths = report.write_report(
                out, runs, meta, last_layer=num_layers - 1 if sweep[-1] == num_layers - 1 else None
            )
            print(f"[study] report: {', '.join(str(p) for p in paths)}", flush=True)
        return 0
    except (StudyError, report.ReportError, *train_errors()) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

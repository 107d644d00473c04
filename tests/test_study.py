"""The study machinery end to end on the smoke-sized synthetic data: grid, resume, results.csv, report.md, plots.

The module fixture trains the real grid once (8 rows x 2 seeds, 1 epoch each); most of its time is tracing and
compiling 12 small models, so the end-to-end tests are marked slow (they still run in CI).
"""

import csv
import json
import math
import os
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest
from scipy import stats

from dff_jax import records, report, study, train
from tests.conftest import REPO

# the default grid with a two-layer sweep: layer_3 (the last of smoke's 4 stored rows) is fusion_last, not retrained
RUNS = ["id", "replace", "fusion_last", "fusion_mean", "dff", "fusion_mean_raw", "dff_raw", "layer_0"]


def study_args(data_dir, out, *extra):
    return [
        "--config",
        str(REPO / "configs" / "smoke.py"),
        "--out",
        str(out),
        "--seeds",
        "2",
        "--layers",
        "0,-1",
        f"--config.data.dir={data_dir}",
        "--config.train.num_epochs=1",
        *extra,
    ]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    out = root / "out"
    args = study_args(root / "data", out)
    assert study.main(args) == 0
    return root, out, args


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow  # trains 16 tiny runs once for the module (~100 s of CPU)
def test_csv_has_one_row_per_run_and_seed_equal_to_results_json(finished):
    _, out, _ = finished
    rows = read_csv(out / "results.csv")
    assert sorted((r["run"], r["seed"]) for r in rows) == sorted((r, str(s)) for r in RUNS for s in (0, 1))
    for row in rows:
        res = json.loads((out / "runs" / row["run"] / f"seed{row['seed']}" / "results.json").read_text())
        assert int(row["config_seed"]) == 42 + int(row["seed"])  # smoke's base seed + seed index
        for m in report.MAIN_METRICS:
            assert float(row[m]) == pytest.approx(res["test"][m], rel=1e-12)
        for b, sl in res["test"]["cold_start"].items():
            assert int(row[f"cold[{b}]/num_users"]) == sl["num_users"]
        if row["run"] not in ("id", "replace"):  # fusion runs record their gate
            assert float(row["gate_mean"]) == pytest.approx(res["analysis"]["gate_mean"])
        else:
            assert row["gate_mean"] == ""
    # the grid really differs per row: the layer runs read different rows, so their results differ
    by = {(r["run"], r["seed"]): float(r["NDCG@20"]) for r in rows}
    assert by[("layer_0", "0")] != by[("fusion_last", "0")]


@pytest.mark.slow  # trains 16 tiny runs once for the module (~100 s of CPU)
def test_report_tables_ttest_and_findings(finished):
    _, out, _ = finished
    rows = read_csv(out / "results.csv")
    md = (out / "report.md").read_text()
    for section in ("## Table 1", "## Figure 3", "## Table 2", "## Cold start", "## DFF layer weights", "## Findings"):
        assert section in md
    assert "## Figure 2" not in md  # no caption feature set was given
    assert "they tie in every content score): none in any feature set." in md  # the smoke features are distinct
    # the paper's exact Eq. 5 rows sit beside the standardised ones, and the labels say which is which
    raw = json.loads((out / "runs" / "dff_raw" / "seed0" / "results.json").read_text())
    assert raw["config"]["model"]["feature_norm"] == "none" and raw["config"]["model"]["content"] == "learned"
    assert (
        "| DFF over raw layers (Eq. 5 exactly) |" in md and "| DFF (learned alpha + gate) (standardised layers) |" in md
    )
    # mean ± std (sample std over the two seeds) of ID's HR@10, recomputed from the csv, appears in ID's row
    hr = np.array([float(r["HR@10"]) for r in rows if r["run"] == "id"])
    cell = f"{hr.mean():.4f} ± {hr.std(ddof=1):.4f}"
    id_rows = [line for line in md.splitlines() if line.startswith("| ID only (IDRec) | 2 |")]
    assert id_rows and all(cell in line for line in id_rows)
    # the paired t-test of DFF vs ID over the two seeds, as the p-value column shows it
    x = {r["seed"]: float(r["NDCG@10"]) for r in rows if r["run"] == "dff"}
    y = {r["seed"]: float(r["NDCG@10"]) for r in rows if r["run"] == "id"}
    p = stats.ttest_rel([x["0"], x["1"]], [y["0"], y["1"]]).pvalue
    assert "ΔNDCG@10 (p)" in md
    paired = md.split("Paired t-test of DFF")[1].split("## ")[0]
    ttest_row = next(line for line in paired.splitlines() if line.startswith("| ID only (IDRec) | "))
    cells = ttest_row.split("|")[2:-1]
    delta = np.mean(list(x.values())) - np.mean(list(y.values()))
    assert cells[1].strip() == f"{delta:+.4f} ({report.fmt_p(p)})"
    # the best of each column is bold: exactly one bold cell per metric column in the main table
    main = md.split("## Table 2")[1].split("\n\n")[1]
    for col in range(len(report.MAIN_METRICS)):
        assert sum("**" in line.split("|")[3 + col] for line in main.splitlines()[2:]) == 1
    findings = md.split("## Findings")[1]
    assert "Finding 2" in findings and "Finding 3" in findings and "DFF (Table 2)" in findings
    assert "not tested" in findings.split("Finding 2")[0]  # finding 1 needs a caption set
    assert any(v in findings for v in ("**holds**", "**partly holds**", "**does not hold**"))
    # cold-start bins in order of their lower edge, DFF's layer weights over the 4 stored rows
    cold = md.split("## Cold start")[1].split("## DFF")[0]
    assert cold.index("| 0 |") < cold.index("| 1-4 |") < cold.index("| 5-19 |") < cold.index("| 20+ |")
    # the sweep shows layer 3 with fusion_last's numbers (same config, trained once)
    nd = np.array([float(r["NDCG@10"]) for r in rows if r["run"] == "fusion_last"])
    sweep = md.split("## Figure 3")[1].split("## Table 2")[0]
    assert (
        "| Fusion, layer 3 | 2 | " in sweep and f"{nd.mean():.4f} ± {nd.std(ddof=1):.4f}" in sweep.split("layer 3")[1]
    )
    assert "| alpha |" in md and md.split("| alpha |")[1].split("\n")[0].count("±") == 4


@pytest.mark.slow  # trains 16 tiny runs once for the module (~100 s of CPU)
def test_plots_are_real_images(finished):
    _, out, _ = finished
    for name in ("layers", "alpha", "gate", "gate_epochs"):
        path = out / "plots" / f"{name}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = matplotlib.image.imread(path)
        assert img.shape[0] > 150 and img.shape[1] > 300
        assert img[..., :3].std() > 0.05  # drawn content, not a blank canvas


@pytest.mark.slow  # trains 16 tiny runs once for the module (~100 s of CPU)
def test_rerun_skips_finished_runs(finished, monkeypatch):
    _root, out, args = finished
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/seed*/results.json")}
    assert len(mtimes) == 2 * len(RUNS)
    calls = []
    monkeypatch.setattr(train, "train_and_evaluate", lambda *a, **k: calls.append(a))
    assert study.main(args) == 0
    assert calls == []
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    # a deleted run is the only one trained again, in its own work directory
    (out / "runs" / "dff" / "seed1" / "results.json").unlink()
    assert study.main([*args, "--no-report"]) == 0
    assert [a[1] for a in calls] == [out / "runs" / "dff" / "seed1"]


@pytest.mark.slow  # trains 16 tiny runs once for the module (~100 s of CPU)
def test_a_report_of_fewer_seeds_reads_only_those(finished, tmp_path):
    # --seeds 1 --report-only over a folder holding seeds 0 and 1 is a one-seed report, not silently a two-seed one.
    import shutil

    _root, out, args = finished
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    args = [*args, "--report-only"]
    args[args.index("--out") + 1], args[args.index("--seeds") + 1] = str(copy), "1"
    assert study.main(args) == 0
    rows = read_csv(copy / "results.csv")
    assert len(rows) == len(RUNS) and {r["seed"] for r in rows} == {"0"}
    full = {r["run"]: r for r in read_csv(out / "results.csv") if r["seed"] == "0"}
    assert all(r["NDCG@10"] == full[r["run"]]["NDCG@10"] for r in rows)


@pytest.mark.slow  # trains 16 tiny runs once for the module (~100 s of CPU)
def test_rerun_with_other_settings_refuses_the_finished_runs(finished, monkeypatch, capsys):
    # A finished run is skipped only when it is the run asked for: other overrides (or another epoch budget) into
    # the same --out stop with one error naming the run folder and the field, instead of reporting the old numbers.
    _root, out, args = finished
    monkeypatch.setattr(train, "train_and_evaluate", lambda *a, **k: pytest.fail("nothing may train"))
    for extra, differs in (
        ("--config.optim.lr=0.5", "config.optim.lr: 0.003 -> 0.5"),
        ("--config.train.num_epochs=2", "results.json: this run finished with {'train.num_epochs': 1"),
    ):
        with pytest.raises(SystemExit):
            study.main([*args, "--runs", "id", "--no-report", extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {out / 'runs' / 'id' / 'seed0'}") and differs in err[0], err
        assert "use another --out" in err[0]


@pytest.mark.slow  # trains 16 tiny runs once for the module (~100 s of CPU)
def test_a_report_with_other_settings_than_the_runs_is_refused(finished, capsys):
    # --report-only used to print this command's overrides over runs that were trained without them
    _root, out, args = finished
    before = (out / "report.md").read_bytes()
    with pytest.raises(SystemExit):
        study.main([*args, "--report-only", "--config.optim.lr=0.5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "config.optim.lr: 0.003 -> 0.5" in err[0], err
    assert (out / "report.md").read_bytes() == before


@pytest.mark.slow  # trains 16 tiny runs once for the module (~100 s of CPU)
def test_shards_split_the_jobs(finished, monkeypatch, tmp_path):
    _root, _, args = finished
    out = tmp_path / "sharded"
    args = [*args, "--no-report"]
    args[args.index("--out") + 1] = str(out)
    seen = []
    monkeypatch.setattr(train, "train_and_evaluate", lambda cfg, wd: seen.append((wd, cfg.seed, cfg.model.layer)))
    for i in range(3):
        assert study.main([*args, "--shard", f"{i}/3"]) == 0
    dirs = [s[0] for s in seen]
    assert len(dirs) == len(set(dirs)) == 2 * len(RUNS)
    layer0 = [s for s in seen if s[0].parent.name == "layer_0"]
    assert {s[1] for s in layer0} == {42, 43} and {s[2] for s in layer0} == {0}


def test_config_overrides_parse_as_in_train_and_unknown_fields_are_refused(capsys):
    smoke = str(REPO / "configs" / "smoke.py")
    overrides = ["--config.train.num_epochs=7", "--config.optim.lr=1e-3", "--config.train.progress_bar=true"]
    config_args, rest = study.split_config_args(["--config", f"{smoke}:id", "--out", "x", *overrides, "--seeds", "2"])
    assert rest == ["--out", "x", "--seeds", "2"] and study.config_file(config_args) == f"{smoke}:id"
    c = study.load_config(config_args)
    assert (c.train.num_epochs, c.optim.lr, c.train.progress_bar, c.model.item_encoder) == (7, 1e-3, True, "id")
    with pytest.raises(SystemExit) as e:
        study.load_config(["--config", smoke, "--config.train.epochs=3"])
    assert e.value.code == 2 and "epochs" in capsys.readouterr().err
    with pytest.raises(study.StudyError, match="--config FILE"):
        study.load_config(["--config.train.num_epochs=3"])


def test_layer_selection_and_errors(tmp_path, capsys):
    assert study.layer_list(31, None, 3) == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30]
    assert study.layer_list(31, "0,-1,15", None) == [0, 15, 30]
    assert study.layer_list(4, None, None) == [0, 1, 2, 3]
    with pytest.raises(study.UserError, match="stores rows 0..3"):
        study.layer_list(4, "4", None)
    with pytest.raises(study.StudyError, match="unknown runs"):
        study.plan_runs(4, [0], False, "id,caption")
    with pytest.raises(study.StudyError, match="--layer-step 0: expected an integer >= 1"):
        study.layer_list(31, None, 0)  # it silently swept every layer
    c = study.load_config(["--config", str(REPO / "configs" / "smoke.py")])
    for field in ("seed", "item_encoder", "layer", "features.dir"):  # each row and seed sets these itself
        with pytest.raises(study.StudyError, match="set by each study row or seed"):
            study.parse_grid([f"{field}=1,2" if field != "item_encoder" else "item_encoder=id"], c)
    assert study.parse_grid(["lr=1e-3,2e-3"], c)[1]["set"] == {"optim.lr": 2e-3}
    for bad in (["--seeds", "abc"], ["--bogus"]):  # argparse's usage dump was 6 lines without "error: " first
        with pytest.raises(SystemExit) as e:
            study.main(["--config", str(REPO / "configs" / "smoke.py"), "--out", str(tmp_path), *bad])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: python -m dff_jax.study: "), err
    assert math.isnan(report.paired_p({0: 0.1}, {0: 0.2}))  # one seed: no test
    assert report.paired_p({0: 0.1, 1: 0.3, 2: 0.2}, {0: 0.0, 1: 0.1, 2: 0.15}) == pytest.approx(
        stats.ttest_rel([0.1, 0.3, 0.2], [0.0, 0.1, 0.15]).pvalue
    )
    # a feature folder without schema.json is one clear error, not a traceback
    with pytest.raises(SystemExit) as e:
        study.main(
            ["--config", str(REPO / "configs" / "smoke.py"), "--out", str(tmp_path), "--features", f"hidden={tmp_path}"]
        )
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no schema.json" in err and err.startswith("error: ")


def _fake(test, valid, seeds=(0, 1, 2)):
    """A finished run per seed with the given test and validation metric (HR@10 = NDCG@10 = ... = the value)."""
    metrics = ("HR@10", "NDCG@10", "HR@20", "NDCG@20")
    return {
        s: {"test": {m: test[i] for m in metrics}, "best_valid": {m: valid[i] for m in metrics}}
        for i, s in enumerate(seeds)
    }


def test_choices_follow_validation_and_findings_need_significance():
    found = {
        # layer_0 is better on validation, layer_1 on test: the report must pick layer_0
        "layer_0": _fake([0.10, 0.11, 0.12], [0.30, 0.31, 0.32]),
        "layer_1": _fake([0.40, 0.41, 0.42], [0.20, 0.21, 0.22]),
        "layer_2": _fake([0.05, 0.06, 0.07], [0.05, 0.06, 0.07]),
        # id is the strongest baseline on validation although fusion_last beats it on test
        "id": _fake([0.20, 0.215, 0.22], [0.50, 0.50, 0.50]),
        "fusion_last": _fake([0.30, 0.31, 0.325], [0.40, 0.40, 0.40]),
        "replace": _fake([0.05, 0.07, 0.055], [0.05, 0.06, 0.05]),
        "dff": _fake([0.35, 0.365, 0.37], [0.45, 0.45, 0.45]),
    }
    assert report.best_layer(found) == "layer_0"
    _, info = report.main_table(found)
    assert info["strongest"]["NDCG@10"] == "id"
    text = report.findings(found, num_layers=3)
    assert "Finding 2" in text and "**holds** at p < 0.05" in text.split("Finding 3")[0]  # large, steady gaps
    noisy = dict(found, fusion_mean=_fake([0.36, 0.30, 0.42], [0.4, 0.4, 0.4]))  # DFF ahead on average, noisily
    assert "best single layer (0, by validation)" in report.findings(noisy, 3)
    dff_line = next(line for line in report.findings(noisy, 3).splitlines() if line.startswith("- DFF"))
    assert "n.s." in dff_line and "**holds**" not in dff_line


def _noisy_copy(src, dst, scale, seed):
    """A feature set like `src` with every value scaled and perturbed: another 'prompt' or 'modality'."""
    rng = np.random.default_rng(seed)
    dst.mkdir(parents=True)
    with records.ShardWriter(dst / f"part-0{records.SHARD_SUFFIX}") as w:
        for shard in records.shard_files(src):
            for payload in records.iter_records(shard):
                item, array = records.decode_item(payload)
                noise = rng.normal(size=array.shape).astype(np.float32)
                w.write(item, (array.astype(np.float32) * scale + noise).astype(array.dtype))
    (dst / records.SCHEMA_FILE).write_text((src / records.SCHEMA_FILE).read_text())


@pytest.mark.slow  # 4 rows x 2 seeds of 1 epoch
def test_tables_3_and_4_compare_extra_feature_sets_with_paired_tests(finished, tmp_path):
    root, _, _ = finished
    hidden = root / "data" / "features"
    sets = {"plain_prompt": 0.5, "title": 0.2, "cover": 2.0}
    for i, (name, scale) in enumerate(sets.items()):
        _noisy_copy(hidden, tmp_path / name, scale, seed=i)
    args = study_args(root / "data", tmp_path / "out", "--runs", "dff,set_plain_prompt,set_title,set_cover")
    args += ["--features", f"hidden={hidden}", *(f"{n}={tmp_path / n}" for n in sets)]
    assert study.main(args) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    t3 = md.split("## Table 3")[1].split("## ")[0]
    t4 = md.split("## Table 4")[1].split("## ")[0]
    assert "`plain_prompt`" in t3 and "`title`" not in t3 and "`title`" in t4 and "`cover`" in t4
    raw = json.loads((tmp_path / "out" / "runs" / "set_title" / "seed0" / "results.json").read_text())
    assert (
        raw["config"]["features"]["dir"] == str(tmp_path / "title") and raw["config"]["model"]["content"] == "learned"
    )
    rows = {r["run"]: r for r in read_csv(tmp_path / "out" / "results.csv")}
    for table_text, name in ((t3, "plain_prompt"), (t4, "cover")):
        x = {s: json.loads((tmp_path / "out" / "runs" / f"set_{name}" / f"seed{s}" / "results.json").read_text())
             for s in (0, 1)}  # fmt: skip
        y = {
            s: json.loads((tmp_path / "out" / "runs" / "dff" / f"seed{s}" / "results.json").read_text()) for s in (0, 1)
        }
        a = {s: x[s]["test"]["NDCG@10"] for s in x}
        b = {s: y[s]["test"]["NDCG@10"] for s in y}
        line = next(line for line in table_text.splitlines() if line.startswith(f"| `{name}` |"))
        delta = np.mean(list(a.values())) - np.mean(list(b.values()))
        assert line.split("|")[3].strip() == f"{delta:+.4f} ({report.fmt_p(report.paired_p(a, b))})"
    assert "set_cover" in rows


@pytest.mark.slow  # 4 tiny ID runs of 1 epoch
def test_grid_trains_every_point_and_reports_the_one_selected_on_validation(tmp_path, capsys):
    # A 2-point lr grid, 2 seeds: every (row, point, seed) is its own run; the point with the better mean validation
    # NDCG@10 is kept, and the tables show that point's test numbers.
    out = tmp_path / "out"
    args = study_args(tmp_path / "data", out, "--runs", "id", "--grid", "lr=3e-3,1e-5")
    assert study.main(args) == 0
    points = ["lr0.003", "lr1e-05"]
    assert json.loads((out / "grid.json").read_text())["points"][1] == {"name": "lr1e-05", "set": {"optim.lr": 1e-5}}
    md = (out / "report.md").read_text()
    rows = read_csv(out / "results.csv")
    for run in ("id",):
        res = {p: {s: json.loads((out / "runs" / run / p / f"seed{s}" / "results.json").read_text()) for s in (0, 1)}
               for p in points}  # fmt: skip
        assert res["lr1e-05"][0]["config"]["optim"]["lr"] == 1e-5 and res["lr0.003"][1]["config"]["seed"] == 43
        valid = {p: np.mean([r["best_valid"]["NDCG@10"] for r in res[p].values()]) for p in points}
        best = max(valid, key=valid.get)
        mine = [r for r in rows if r["run"] == run]
        assert {r["grid_point"] for r in mine} == {best}
        assert sorted(float(r["NDCG@10"]) for r in mine) == sorted(r["test"]["NDCG@10"] for r in res[best].values())
        line = next(
            x for x in md.split("## Grid selection")[1].splitlines() if x.startswith(f"| {report.run_name(run)} |")
        )
        assert line.endswith(f"| `{best}` |") and f"**{valid[best]:.4f} (2)**" in line
    # resume: nothing is trained again, and --report-only reads the grid back from grid.json
    assert study.main(args) == 0 and "trained 0 runs, skipped 4" in capsys.readouterr().out
    assert study.main([a for a in args if a not in ("--grid", "lr=3e-3,1e-5")] + ["--report-only"]) == 0
    again = (out / "report.md").read_text()
    assert again.split("\n", 3)[3] == md.split("\n", 3)[3]  # all but the title and the command line
    with pytest.raises(SystemExit):
        study.main(study_args(tmp_path / "data", out, "--grid", "max_seq_len=5,6"))  # data. or model.?
    assert "data.max_seq_len, model.max_seq_len" in capsys.readouterr().err


def test_study_runs_use_deterministic_gpu_kernels(tmp_path, monkeypatch):
    # The study turns parallel.deterministic_ops on unless the command line sets it; initialize() then puts XLA's
    # flag into XLA_FLAGS before jax starts (checked in a fresh process: this one's backend is already running).
    seen = []
    monkeypatch.setattr(train, "train_and_evaluate", lambda cfg, wd: seen.append(cfg.parallel.deterministic_ops))
    args = [*study_args(tmp_path / "data", tmp_path / "out", "--runs", "id", "--no-report"), "--seeds", "1"]
    assert study.main(args) == 0
    assert study.main([*args, "--config.parallel.deterministic_ops=false"]) == 0
    assert seen == [True, False]
    code = (
        "import os; from dff_jax import defaults, parallel; c = defaults.base_config().parallel; "
        "c.deterministic_ops = True; parallel.initialize(c); import jax; jax.devices(); print(os.environ['XLA_FLAGS'])"
    )
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
        "PYTHONPATH": str(REPO),
    }
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["--xla_force_host_platform_device_count=1", "--xla_gpu_deterministic_ops=true"]


def test_runs_named_twice_or_not_at_all_are_refused():
    with pytest.raises(study.StudyError, match=r"--runs 'id,dff,id': 'id' given twice"):
        study.plan_runs(4, [0], False, "id,dff,id")
    with pytest.raises(study.StudyError, match=r"--runs ',': names no run"):
        study.plan_runs(4, [0], False, ",")


def test_a_failing_or_narrowing_grid_leaves_grid_json_as_it_was(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "train_and_evaluate", lambda cfg, wd: None)
    out = tmp_path / "out"
    base = [*study_args(tmp_path / "data", out, "--runs", "id", "--no-report"), "--seeds", "1"]
    assert study.main([*base, "--grid", "lr=3e-3,1e-3"]) == 0
    recorded = (out / "grid.json").read_text()
    for grid, message in (
        ("lr=-1,1e-3", "config.optim.lr=-1.0: expected > 0"),  # validated before grid.json is written
        ("lr=1e-3", "this --grid drops ['lr0.003']"),  # the report would no longer select among lr0.003
    ):
        with pytest.raises(SystemExit) as e:
            study.main([*base, "--grid", grid])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and len(err.splitlines()) == 1, err
        assert (out / "grid.json").read_text() == recorded
    assert study.main([*base, "--grid", "lr=3e-3,1e-3,8e-3"]) == 0  # widening keeps every recorded point
    assert len(json.loads((out / "grid.json").read_text())["points"]) == 3
    for damaged in ('{"points": [', "[]", '{"points": [1]}'):  # --report-only read it unchecked: a traceback
        (out / "grid.json").write_text(damaged)
        with pytest.raises(SystemExit) as e:
            study.main([*study_args(tmp_path / "data", out, "--runs", "id"), "--seeds", "1", "--report-only"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "grid.json: unreadable" in err and len(err.splitlines()) == 1, err
    with pytest.raises(SystemExit) as e:
        study.main([*study_args(tmp_path / "data", "", "--runs", "id")])
    assert e.value.code == 2 and "--out is empty" in capsys.readouterr().err


def test_a_multi_row_set_given_as_the_caption_set_is_refused(tmp_path, monkeypatch, capsys):
    # Its caption row took the last layer (model.layer = -1): the CC and HC rows of Figure 2 were the same numbers.
    monkeypatch.setattr(train, "train_and_evaluate", lambda cfg, wd: pytest.fail("a run was trained"))
    from dff_jax import synthetic

    data = tmp_path / "data"
    feats = data / "features"
    synthetic.ensure_synthetic_data(
        study.load_config(study_args(data, tmp_path / "out")[:2] + [f"--config.data.dir={data}"])
    )
    with pytest.raises(SystemExit) as e:
        study.main(
            [
                *study_args(data, tmp_path / "out", "--runs", "caption"),
                "--features",
                f"hidden={feats}",
                f"caption={feats}",
            ]
        )
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert f"--features caption={feats}: " in err and "stores 4 rows per item" in err

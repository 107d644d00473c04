"""The benchmark runs end to end at a tiny shape and reports what it measured (the real shapes are run by hand)."""

import math

import numpy as np
import pytest

from dff_jax import bench

TINY = {"num_users": 96, "num_items": 40, "layers": 3, "hidden": 16, "embed_dim": 16, "batch_size": 32}


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_bench_reports_train_eval_memory_and_the_torch_ratio(compute_dtype):
    # Asked for the PyTorch comparison in both dtypes: the bench makes it only for the float32 step.
    r = bench.run("cpu", TINY, steps=2, variant="dff", torch_compare=True, compute_dtype=compute_dtype)
    assert r["compute_dtype"] == compute_dtype and r["shape"]["num_items"] == 40
    train = r["train"]
    assert train["steps_per_epoch"] == math.ceil(96 / 32) and train["step_ms"] > 0 and train["epoch_s"] > 0
    assert math.isfinite(train["final_loss"]) and train["final_loss"] > 0
    ev = r["eval"]
    assert ev["users"] == 96 and ev["ranking_s"] > 0 and ev["bare_matmul_s"] > 0
    assert ev["ranking_over_matmul"] > 0  # (the ratio of the unrounded times)
    assert r["memory"]["host_peak_rss_bytes"] > 0
    if compute_dtype == "float32":
        t = r["torch_eager"]
        assert len(t["jax_step_ms_per_round"]) == len(t["torch_step_ms_per_round"]) == t["rounds"]
        assert r["jax_over_torch_throughput"] == t["jax_over_torch_throughput"] > 0
    else:
        assert "torch_eager" not in r


def test_feature_load_bench_small_shape(tmp_path):
    """`--what features` runs end to end at a tiny shape (the full MicroLens shape is run by hand)."""
    result = bench.bench_feature_load(num_items=50, layers=3, hidden=16, dtype="float16", tmpdir=str(tmp_path))
    assert result["table_bytes"] == 51 * 3 * 16 * 2
    assert result["peak_rss_bytes"] >= result["baseline_rss_bytes"] > 0
    assert result["seconds"] > 0 and result["ratio"] > 1
    assert list(tmp_path.iterdir()) == [], "the benchmark deletes what it wrote"


SASREC_TINY = {"num_users": 300, "num_items": 120, "interactions": 2400, "train_only": 7}


def test_sasrec_interactions_have_the_requested_totals_and_split():
    users, items = bench.sasrec_interactions(**SASREC_TINY, seed=0)
    assert len(users) == len(items) == 2400
    assert set(items.tolist()) == set(range(1, 121))  # every item used
    lengths = np.bincount(users, minlength=300)
    assert (lengths > 0).all() and (lengths < 3).sum() == 7  # exactly the train-only users have < 3 items


def test_sasrec_preset_reports_jax_and_torch_step_epoch_and_validation():
    r = bench.bench_sasrec(steps=2, rounds=1, shape=SASREC_TINY, overrides={"train.batch_size": 64})
    assert r["arch"] == "sasrec" and r["shape"]["eval_users"] == 300 - 7
    j, t = r["jax"], r["torch_eager"]
    assert j["steps_per_epoch"] == math.ceil(300 / 64) and j["epoch_s"] > 0 and j["valid_s"] > 0
    # the trainer's calls of configs/sasrec.py's steps_per_call steps: a round is whole calls
    assert j["steps_per_call"] == 32 and j["steps_per_round"] == 32 and j["epoch_first_s"] > 0
    assert j["epoch_cpu_s"] > 0 and j["valid_cpu_s"] > 0 and t["epoch_cpu_s"] > 0 and r["load_average_1min"] >= 0
    assert set(j["valid"]) == set(t["valid"]) and "sampled100/NDCG@10" in j["valid"] and "HR@10" in j["valid"]
    assert all(v > 0 for v in r["jax_over_torch"].values())
    # Both sides start from the same weights but train with their own dropout/negatives, so the metrics are close but
    # not equal; both must be far above chance on the sampled protocol only if they learned, which 2 epochs of a
    # random dataset need not do: check the ranges instead.
    for side in (j, t):
        assert all(0.0 <= v <= 1.0 for v in side["valid"].values())


def test_all_runs_the_three_settings_in_one_process():
    r = bench.run_all("cpu", TINY, steps=2)
    assert list(r["runs"]) == [name for name, _, _ in bench.ALL_RUNS]
    for name, variant, dtype in bench.ALL_RUNS:
        run = r["runs"][name]
        assert run["variant"] == variant and run["compute_dtype"] == dtype
        assert math.isfinite(run["train"]["final_loss"]) and run["eval"]["users"] == 96
    assert r["runs"]["id_float32"]["param_count"] < r["runs"]["dff_float32"]["param_count"]
    assert r["total_s"] >= sum(run["run_s"] for run in r["runs"].values())


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--variant", "nope"], "unknown variant 'nope'; expected one of"),
        (["--steps", "0"], "--steps 0: expected an integer >= 1"),
        (["--shape", "embed_dim=0"], "--shape embed_dim=0: expected KEY=INT"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        # arguments the mode does not read were silently ignored
        (
            ["--preset", "sasrec", "--shape", "bogus=1", "--variant", "x"],
            "--preset sasrec does not use --shape, --variant",
        ),
        (["--what", "features", "--users", "3"], "--what features does not use --users"),
        (
            ["--what", "catalogue", "--out", "/proc/unwritable", "--devices", "3", "--model-axis", "2"],
            "--devices 3: expected",
        ),
    ],
)
def test_bad_bench_arguments_are_one_error_line(args, says, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main([*args, "--no-torch"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and says in err[0], err


def test_the_catalogue_config_loads_without_the_configs_package_on_the_path(monkeypatch, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "configs", None)  # as from another folder: no `configs` to import
    monkeypatch.chdir(tmp_path)
    c = bench.catalogue_config(tmp_path / "cat", 4, 2)
    assert c.model.embed_dim == 64 and c.parallel.model_axis == 2 and c.data.dir == str(tmp_path / "cat")


def test_a_shape_value_is_not_taken_for_the_flag_of_the_same_name():
    # docs/benchmarks.md's `--shape layers=33 --shape hidden=1024` was refused as "--what train does not use --layers".
    import argparse

    p = bench.OneLineArgumentParser(prog="python -m dff_jax.bench")
    for flag in ("--what", "--preset", "--shape", "--layers", "--hidden"):
        p.add_argument(flag, action="append" if flag == "--shape" else "store")
    argv = ["--shape", "layers=33", "--shape=hidden=1024"]
    bench.check_used_arguments(p, argparse.Namespace(what="train", preset="cpu"), argv)
    with pytest.raises(SystemExit):
        bench.check_used_arguments(p, argparse.Namespace(what="train", preset="cpu"), [*argv, "--layers", "3"])


def test_a_catalogue_folder_of_other_sizes_is_refused(tmp_path, capsys):
    # The bench measured the older catalogue in --out and reported its sizes, without a word.
    bench.write_catalogue(tmp_path / "cat", 40, 8, 2, 4)
    capsys.readouterr()
    args = ["--what", "catalogue", "--out", str(tmp_path / "cat"), "--items", "50", "--users", "8"]
    with pytest.raises(SystemExit) as e:
        bench.main([*args, "--layers", "2", "--hidden", "4", "--no-torch"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "holds a catalogue of {'items': 40, 'users': 8" in err[0], err

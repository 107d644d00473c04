"""Faults and bad inputs: each ends in one `error:` line (or a documented policy), exit status 2, no traceback, and
nothing lost, half-written or rewritten with a record that no longer matches what was trained.

The cases that once gave wrong numbers with exit status 0 (a reused workdir, a changed data file, duplicated rows,
one huge feature value) and the I/O failures (disk full, a workdir that cannot be made, a result that cannot be
written) are here; so are the config values that used to be accepted or to fail only after an epoch.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from configs import smoke
from conftest import REPO
from dff_jax import data, defaults, evaluate, records, train
from dff_jax.errors import ConfigError, TrainError

ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")


def smoke_config(data_dir, variant="dff", **fields):
    c = smoke.get_config(variant)
    c.data.dir = str(data_dir)
    for key, value in fields.items():
        section, name = key.split("__")
        c[section][name] = value
    return c


def cli(module, *args, limit_file_kb=None):
    command = [sys.executable, "-m", module, *args]
    if limit_file_kb:  # through the shell's ulimit: no preexec_fn (fork) from this multithreaded process
        command = ["bash", "-c", f'ulimit -f {limit_file_kb} && exec "$@"', "bash", *command]
    return subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)


def assert_one_error_line(proc, *fragments):
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for f in fragments:
        assert f in err[0], (f, err[0])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished smoke run (2 epochs), its data folder and its results."""
    root = tmp_path_factory.mktemp("faults")
    config = smoke_config(root / "data")
    result = train.train_and_evaluate(config, root / "run")
    return root, config, result


# ------------------------------------------------------------------------------------------------- config values


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("train.select_metric", "NDCG@5", "one of the computed metrics"),
        ("eval.ks", (0, 10), "positive integers"),
        ("eval.ks", (10, 10), "distinct"),
        ("optim.lr", float("nan"), "a finite number > 0"),  # NaN fails no comparison: it would train to a NaN loss
        ("eval.ties", "arbitrary", "'pessimistic'"),
        ("optim.lr", -1e-3, "> 0"),
        ("model.dropout", 1.5, "in [0, 1)"),
        ("model.cold_id", "zeros", "'zero'"),
        ("train.compute_dtype", "float64", "'bfloat16'"),
        ("train.keep_checkpoints", 0, "resumes"),
        ("train.batch_size", -4, ">= 1"),
        ("eval.chunk_size", 0, ">= 1"),
        ("train.num_epochs", 0, ">= 1"),
        ("data.duplicates", "merge", "'drop'"),
        ("model.num_heads", 3, "multiple of model.num_heads"),
        ("eval.cold_bins", (0, 1.5, 3), "increasing integers starting at 0"),  # mislabelled the slices
        ("eval.cold_bins", (0, "a"), "increasing integers starting at 0"),  # was a TypeError traceback
        ("eval.cold_bins", (0, True), "increasing integers starting at 0"),
        ("seed", 2**63, "at most 2**63 - 1"),  # an OverflowError traceback after the data and features were read
        ("train.batch_size", 10**12, "at most 2**24"),  # a 36 TiB allocation
        ("data.max_seq_len", 10**11, "at most 65536"),
        ("loss.num_negatives", 10**9, "at most 2**24"),  # a 7 TB allocation after the workdir was written
    ],
)
def test_bad_config_values_are_refused_naming_field_value_and_what_is_allowed(tmp_path, field, value, says):
    c = smoke_config(tmp_path / "data")
    if "." in field:
        section, name = field.split(".")
        c[section][name] = value
    else:
        c[field] = value
    shown = "model.embed_dim" if field == "model.num_heads" else field
    with pytest.raises(ConfigError, match=rf"config\.{shown}=") as e:
        train.train_and_evaluate(c, tmp_path / "run")
    assert says in str(e.value)
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()  # stopped before any work


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [("eval.ks", (10, 80), "every cut-off must be below the 80 items"), ("eval.sampled_negatives", 80, "below the 80")],
)
def test_cut_offs_and_negatives_the_item_count_makes_meaningless_are_refused_before_training(
    finished, tmp_path, field, value, says
):
    root, _, _ = finished
    c = smoke_config(root / "data")
    section, name = field.split(".")
    c[section][name] = value
    c.train.select_metric = "HR@10"
    with pytest.raises(ConfigError, match=rf"config\.{field}=") as e:
        train.train_and_evaluate(c, tmp_path / "run")
    assert says in str(e.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_damaged_checkpoint_is_one_line_naming_it(finished, tmp_path):
    root, _, _ = finished
    shutil.copytree(root / "run", tmp_path / "run")
    best = tmp_path / "run" / "checkpoints" / "best"
    (epoch,) = [d for d in best.iterdir() if d.name.isdigit()]
    for f in (epoch / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 100:
            os.truncate(f, 10)
    p = cli("dff_jax.evaluate", "--workdir", str(tmp_path / "run"))
    assert_one_error_line(p, f"{epoch}: unreadable checkpoint", "--step")


def test_a_config_file_that_does_not_load_is_one_line(tmp_path):
    (tmp_path / "bad.py").write_text("def get_config(:\n")
    p = cli("dff_jax.train", "--config", str(tmp_path / "bad.py"), "--workdir", str(tmp_path / "w"))
    assert_one_error_line(p, "SyntaxError", "bad.py")


def test_bad_config_on_the_command_line_is_one_line_before_any_work(tmp_path):
    p = cli(
        "dff_jax.train",
        "--config",
        "configs/smoke.py",
        "--workdir",
        str(tmp_path / "run"),
        f"--config.data.dir={tmp_path / 'data'}",
        "--config.train.select_metric=NDCG@5",
    )
    assert_one_error_line(p, "config.train.select_metric='NDCG@5'", "HR@10")
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()


# ----------------------------------------------------------------------------------------------- workdir identity


def test_a_finished_workdir_is_not_reported_as_another_run(finished):
    root, _, _ = finished
    before = (root / "run" / "results.json").read_bytes()
    with pytest.raises(
        TrainError, match=r"identity.json: this workdir holds a different run \(differing: .*item_encoder"
    ):
        train.train_and_evaluate(smoke_config(root / "data", "id"), root / "run")
    assert (root / "run" / "results.json").read_bytes() == before


def test_an_unfinished_workdir_does_not_resume_with_another_learning_rate(finished, tmp_path):
    root, config, _ = finished
    shutil.copytree(root / "run", tmp_path / "run")
    (tmp_path / "run" / "results.json").unlink()  # as if killed before the end
    saved = (tmp_path / "run" / "config.json").read_bytes()
    with pytest.raises(TrainError, match=r"config\.optim\.lr: 0\.003 -> 0\.01.*new --workdir, or pass --restart"):
        train.train_and_evaluate(smoke_config(root / "data", optim__lr=0.01), tmp_path / "run")
    assert (tmp_path / "run" / "config.json").read_bytes() == saved
    # the same definition (only logging and progress differ) resumes, and the finished run is returned as it was
    same = smoke_config(root / "data", train__log_every_steps=1, train__progress_bar=True)
    assert train.train_and_evaluate(same, tmp_path / "run")["epochs_run"] == config.train.num_epochs


def test_a_changed_interaction_file_is_refused_by_train_and_by_evaluate(finished, tmp_path):
    root, _, _ = finished
    shutil.copytree(root / "data", tmp_path / "data")
    shutil.copytree(root / "run", tmp_path / "run")
    pairs = tmp_path / "data" / "synthetic_pairs.tsv"
    lines = pairs.read_text().splitlines()
    pairs.write_text("\n".join(lines[1:] + lines[:1]) + "\n")  # same interactions, another first-seen order
    config = (tmp_path / "run" / "config.json").read_text().replace(str(root / "data"), str(tmp_path / "data"))
    (tmp_path / "run" / "config.json").write_text(config)
    with pytest.raises(TrainError, match="interactions file contents"):
        train.train_and_evaluate(smoke_config(tmp_path / "data"), tmp_path / "run")
    with pytest.raises(TrainError, match="interactions file contents") as e:
        evaluate.load_run(tmp_path / "run")
    assert "python -m dff_jax.train --restart" in str(e.value)  # evaluate itself has no --restart


def test_a_moved_interaction_file_is_not_called_another_run(finished, tmp_path):
    root, _, _ = finished
    shutil.copytree(root / "run", tmp_path / "run")
    config = (tmp_path / "run" / "config.json").read_text().replace(str(root / "data"), str(tmp_path / "gone"))
    (tmp_path / "run" / "config.json").write_text(config)
    with pytest.raises(TrainError, match="the interactions.* this run was trained on are not where") as e:
        evaluate.load_run(tmp_path / "run")
    assert "--restart" not in str(e.value)


def test_restart_discards_the_old_run_and_a_stray_folder_is_not_taken_for_one(finished, tmp_path):
    root, _, _ = finished
    shutil.copytree(root / "run", tmp_path / "run")
    (tmp_path / "run" / "notes.txt").write_text("mine")
    c = smoke_config(root / "data", "id", train__num_epochs=1)
    result = train.train_and_evaluate(c, tmp_path / "run", restart=True)
    assert result["epochs_run"] == 1 and result["config"]["model"]["item_encoder"] == "id"
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"  # only what a run writes is removed
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text("{}")
    with pytest.raises(TrainError, match=r"holds config.json but no identity.json"):
        train.train_and_evaluate(c, tmp_path / "other")


def test_a_corrupt_run_config_is_one_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(TrainError, match=r"config.json: not a readable run config"):
        evaluate.load_run(tmp_path)


# ------------------------------------------------------------------------------------------------ interaction data


def test_duplicated_rows_are_counted_and_dropped_by_default(tmp_path):
    rng = np.random.default_rng(0)
    rows = [(f"u{u}", f"i{rng.integers(40)}", 100 * u + t) for u in range(30) for t in range(8)]
    text = "user,item,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in rows)
    (tmp_path / "clean.csv").write_text(text)
    (tmp_path / "twice.csv").write_text(text + text.split("\n", 1)[1])  # every row written twice
    cfg = defaults.base_config().data
    cfg.update(dir=str(tmp_path), interactions="clean.csv")
    clean = data.build_dataset(cfg, verbose=False)
    cfg.interactions = "twice.csv"
    dropped = data.build_dataset(cfg, verbose=False)
    assert dropped.stats["duplicate_rows"] == len(rows)
    assert "warning: 240 rows repeat another" in data.format_stats(dropped.stats)
    np.testing.assert_array_equal(dropped.test["targets"], clean.test["targets"])
    np.testing.assert_array_equal(dropped.test["history"], clean.test["history"])
    cfg.duplicates = "keep"  # what happened before: every test target sits in its own history, where it is masked
    kept = data.build_dataset(cfg, verbose=False)
    assert all(t in h for t, h in zip(kept.test["targets"], kept.test["history"]))
    cfg.duplicates = "error"
    with pytest.raises(data.DataError, match=r"twice.csv: 240 rows repeat another row exactly \(e.g. user 'u0'"):
        data.build_dataset(cfg, verbose=False)


def test_bom_header_line_and_huge_timestamps(tmp_path):
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbfu1,i1,1\nu1,i2,2\nu2,i1,3\n")
    inter = data.read_interactions(tmp_path / "bom.csv")
    assert set(inter.users) == {"u1", "u2"}  # the byte-order mark does not glue onto the first user
    (tmp_path / "bom_header.csv").write_bytes(b"\xef\xbb\xbfuser,item,timestamp\nu1,i1,1\n")
    assert list(data.read_interactions(tmp_path / "bom_header.csv").users) == ["u1"]
    (tmp_path / "x_pairs.tsv").write_text("user\titem\nu1\ti1 i2 i3\n")
    with pytest.raises(data.DataError, match=r"x_pairs.tsv: line 1: .* looks like a header"):
        data.read_interactions(tmp_path / "x_pairs.tsv")
    (tmp_path / "float.csv").write_text("u1,i1,1609459200.0\nu1,i2,7\n")  # an integral float is that instant
    assert list(data.read_interactions(tmp_path / "float.csv").timestamps) == [7, 1609459200]
    (tmp_path / "frac.csv").write_text("u1,i1,1.5\n")
    with pytest.raises(data.DataError, match=r"frac.csv: line 1: expected an integer timestamp, got '1.5'"):
        data.read_interactions(tmp_path / "frac.csv")
    (tmp_path / "big.csv").write_text("u1,i1,1\nu1,i2,99999999999999999999\n")
    with pytest.raises(data.DataError, match=r"big.csv: line 2: timestamp 99999999999999999999 is outside"):
        data.read_interactions(tmp_path / "big.csv")


def test_feature_records_with_a_non_utf8_id_or_a_negative_shape_name_the_record(tmp_path):
    for name, build in (
        ("id", lambda ex: ex.features.feature["item_id"].bytes_list.value.append(b"\xff\xfe")),
        ("shape", lambda ex: ex.features.feature["item_id"].bytes_list.value.append(b"i1")),
    ):
        ex = records.Example()
        build(ex)
        feat = ex.features.feature
        feat["hidden"].bytes_list.value.append(b"")
        feat["dtype"].bytes_list.value.append(b"float32")
        feat["shape"].int64_list.value.extend([-1, 0] if name == "shape" else [0, 0])
        with pytest.raises(records.RecordError, match=r"shard 3: record 7: .*(not UTF-8|do not hold)"):
            records.decode_item(ex.SerializeToString(), "shard 3: record 7")


# ---------------------------------------------------------------------------------------------------- I/O failures


def test_a_smaller_budget_than_the_checkpoint_reached_is_refused(finished, tmp_path):
    # The run resumed at its last epoch and reported that longer-trained model under the smaller budget.
    root, _, _ = finished
    shutil.copytree(root / "run", tmp_path / "run")
    (tmp_path / "run" / "results.json").unlink()
    with pytest.raises(TrainError, match=r"the run is at epoch 2, but with train.num_epochs=1 .* stopped at epoch 1"):
        train.train_and_evaluate(smoke_config(root / "data", train__num_epochs=1), tmp_path / "run")
    assert not (tmp_path / "run" / "results.json").exists()


def test_stop_epoch_replays_early_stopping():
    history = [{"epoch": e, "valid": {"m": v}} for e, v in enumerate([0.1, 0.3, 0.2, 0.2, 0.4, 0.1], start=1)]
    assert train.stop_epoch(history, "m", 10, 0) == 6
    assert train.stop_epoch(history, "m", 10, 2) == 4  # epochs 3 and 4 did not improve on 0.3
    assert train.stop_epoch(history, "m", 10, 3) == 6
    assert train.stop_epoch(history, "m", 3, 0) == 3


@pytest.mark.parametrize("content", ["{", "[]", '{"config": {}}', b"\xff\xfe", "[1, 2]"])
def test_a_damaged_results_or_identity_file_is_one_error(finished, tmp_path, content):
    root, _, _ = finished
    for name in ("results.json", "identity.json"):
        shutil.copytree(root / "run", tmp_path / name)
        path = tmp_path / name / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        if name == "identity.json" and content == '{"config": {}}':
            continue  # a readable identity of no fields: "a different run", tested elsewhere
        with pytest.raises(TrainError, match=rf"{name}: (not a|unreadable)"):
            train.train_and_evaluate(smoke_config(root / "data"), tmp_path / name)


@pytest.mark.slow
def test_disk_full_is_one_line_and_the_rerun_resumes_to_the_same_result(finished, tmp_path):
    root, config, result = finished
    args = ["--config", "configs/smoke.py", "--workdir", str(tmp_path / "run"), f"--config.data.dir={root / 'data'}"]
    # 20 kB per file: the identity and config files fit, the first checkpoint does not (an RLIMIT_FSIZE stands in
    # for a full disk: the same write error, without root or a small filesystem).
    p = cli("dff_jax.train", *args, limit_file_kb=20)
    assert_one_error_line(p, str(tmp_path / "run" / "checkpoints"), "File too large")
    assert not (tmp_path / "run" / "results.json").exists()
    again = train.train_and_evaluate(smoke_config(root / "data"), tmp_path / "run")
    assert again["test"] == result["test"]


@pytest.mark.slow
def test_unwritable_workdir_and_unwritable_result_are_one_line(finished, tmp_path):
    root, _, result = finished
    (tmp_path / "file").write_text("x")
    p = cli("dff_jax.train", "--config", "configs/smoke.py", "--workdir", str(tmp_path / "file" / "run"),
            f"--config.data.dir={root / 'data'}")  # fmt: skip
    assert_one_error_line(p, str(tmp_path / "file" / "run"), "Not a directory")
    # evaluate prints its metrics before it writes them, so a failed write loses nothing the user sees
    shutil.copytree(root / "run", tmp_path / "run")
    (tmp_path / "run" / f"eval-test-epoch{result['best_epoch']}.json").mkdir()
    p = cli("dff_jax.evaluate", "--workdir", str(tmp_path / "run"))
    assert_one_error_line(p, "eval-test-epoch")
    assert f"NDCG@10={result['test']['NDCG@10']:.4f}" in p.stdout
    assert json.loads((tmp_path / "run" / "results.json").read_text())["test"] == result["test"]


def test_a_larger_epoch_budget_extends_a_run_and_a_finished_one_says_how(finished, tmp_path):
    root, _, result = finished
    shutil.copytree(root / "run", tmp_path / "run")
    longer = smoke_config(root / "data", train__num_epochs=3)
    with pytest.raises(TrainError, match=r"results.json: this run finished with .*num_epochs': 2.*delete results.json"):
        train.train_and_evaluate(longer, tmp_path / "run")
    (tmp_path / "run" / "results.json").unlink()
    extended = train.train_and_evaluate(longer, tmp_path / "run")  # the budget is not the run's identity
    assert extended["epochs_run"] == 3 and extended["valid_history"][:2] == result["valid_history"][:2]


@pytest.mark.slow
def test_ctrl_c_is_one_line_and_the_run_resumes(finished, tmp_path):
    import signal
    import time

    root, _, result = finished
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "dff_jax.train", "--config", "configs/smoke.py", "--workdir", str(workdir)]
    cmd += [f"--config.data.dir={root / 'data'}", "--config.train.num_epochs=4"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (workdir / "checkpoints" / "latest" / "1").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("interrupted: the same command resumes")
    resumed = train.train_and_evaluate(smoke_config(root / "data", train__num_epochs=4), workdir)
    assert resumed["epochs_run"] == 4
    assert resumed["valid_history"][:2] == [dict(h, train_seconds=h2["train_seconds"]) for h, h2 in
                                             zip(result["valid_history"], resumed["valid_history"])]  # fmt: skip


@pytest.mark.parametrize(
    ("module", "args", "says"),
    [
        ("dff_jax.train", ["--config", "configs/smoke.py:dfff", "--workdir", "w"], "unknown variant 'dfff'"),
        ("dff_jax.train", ["--config", "configs/nope.py", "--workdir", "w"], "configs/nope.py"),
        ("dff_jax.evaluate", ["--workdir", "w", "--split", "train"], "--split=train"),
        ("dff_jax.train", ["--config", "configs/smoke.py", "--workdir", "w", "--config.train.lr=1"], "field 'lr'"),
        ("dff_jax.train", ["--config", "configs/smoke.py", "--workdir", "README.md"], "--workdir is a file"),
        # refused before the (missing) run is looked at
        ("dff_jax.recommend", ["--workdir", "no-run", "--history", "a b", "--k", "0"], "--k 0: expected >= 1"),
        ("dff_jax.recommend", ["--workdir", "no-run", "--history", " "], "--history is empty"),
        # positional leftovers were ignored: an unquoted history recommended from its first item only
        ("dff_jax.recommend", ["--workdir", "no-run", "--history", "i1", "i2", "--k", "3"], "argument(s) 'i2'"),
        ("dff_jax.evaluate", ["--workdir", "w", "valid"], "unexpected argument(s) 'valid'"),
        ("dff_jax.train", ["--config", "configs/smoke.py", "--workdir", "w", "config.seed=3"], "'config.seed=3'"),
        ("dff_jax.synthetic", ["--out", "README.md/data"], "README.md/data: cannot create the dataset folder"),
        ("dff_jax.synthetic", ["--out", "x", "--users", "many"], "argument --users: invalid int value"),
        ("dff_jax.synthetic", ["--out", "x", "--seed", "-1"], "seed must be in [0, 2**63 - 1], got -1"),
        ("dff_jax.train", ["--config", "configs/smoke.py", "--workdir="], "--workdir is empty; expected a folder"),
        ("dff_jax.evaluate", ["--workdir="], "--workdir is empty"),
        ("dff_jax.recommend", ["--workdir=", "--history", "a"], "--workdir is empty"),
        ("dff_jax.train", ["--config", "dff_jax/__init__.py", "--workdir", "w"], "__init__.py: defines no get_config"),
        ("dff_jax.train", ["--config", "tests/data/int_config.py", "--workdir", "w"], "get_config() returned int 3"),
        # overrides the variant's model does not read (a layers/layer typo trained another model)
        (
            "dff_jax.train",
            ["--config", "configs/smoke.py:fusion_layer", "--workdir", "w", "--config.model.layers=(1,)"],
            "config.model.layers=(1,): not read by this variant (model.item_encoder='fusion', model.content='layer')",
        ),
        ("dff_jax.train", ["--config", "configs/smoke.py:dff", "--workdir", "w", "--config.model.layer=2"], "layer=2"),
        ("dff_jax.train", ["--config", "configs/smoke.py:id", "--workdir", "w", "--config.features.dir=x"], "'id'"),
        (
            "dff_jax.train",
            ["--config", "configs/smoke.py:id", "--workdir", "w", "--config.model.gate_hidden=999"],
            "config.model.gate_hidden=999: not read by this variant (model.item_encoder='id', model.content=",
        ),
        (
            "dff_jax.train",
            ["--config", "configs/smoke.py:fusion_mean", "--workdir", "w", "--config.optim.alpha_lr_mult=0.0"],
            "it is read only with model.content='learned'",
        ),
        (
            "dff_jax.train",
            ["--config", "configs/smoke.py", "--workdir", "w", "--config.loss.num_negatives=9"],
            "config.loss.num_negatives=9: not read by this variant (loss.name='inbatch_logq')",
        ),
    ],
)
def test_bad_command_lines_are_one_line(module, args, says):
    assert_one_error_line(cli(module, *args), says)


def test_memory_error_is_one_line_naming_the_config_sizes(capsys, monkeypatch):
    from dff_jax import errors

    def exit_raises(status):  # the wrapper exits with os._exit, which would end pytest
        raise SystemExit(status)

    monkeypatch.setattr(errors.os, "_exit", exit_raises)
    huge = errors.exit_on_user_error(lambda: np.empty((10**12, 10**6), np.int32))
    with pytest.raises(SystemExit) as e:
        huge()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: out of memory: Unable to allocate")
    assert "train.batch_size" in err[0]


def test_sampled_negatives_for_a_user_who_met_every_item_are_refused_naming_the_user():
    # Used to be a ValueError traceback from metrics.sample_negatives after the whole run had trained.
    from types import SimpleNamespace

    from dff_jax import train_state

    split = {"history": np.array([[1, 2, 0], [1, 0, 0]]), "targets": np.array([3, 2]), "users": np.array([0, 1])}
    dataset = SimpleNamespace(num_items=3, user_ids=["alice", "bob"], valid=split, test=split)
    eval_cfg = smoke_config("unused").eval
    eval_cfg.ks, eval_cfg.sampled_negatives = (1,), 2
    with pytest.raises(ConfigError, match=r"valid users \['alice'\] interacted with every one of the 3 items"):
        train_state.check_eval_fits(eval_cfg, dataset)
    split["targets"] = np.array([1, 2])  # alice now leaves item 3 to draw
    train_state.check_eval_fits(eval_cfg, dataset)


def test_records_rewritten_in_the_middle_of_a_shard_are_another_run(finished, tmp_path, monkeypatch):
    """The cheap features fingerprint reads only each shard's ends (here: made blind to the change, as for a
    shard > 2 MiB); the content digest the cache build takes of every record still tells the runs apart."""
    from dff_jax import features, train_state

    root, config, _ = finished
    shutil.copytree(root / "run", tmp_path / "run")
    shutil.copytree(root / "data", tmp_path / "data", ignore=shutil.ignore_patterns("dff_cache"))
    c = smoke_config(tmp_path / "data")
    monkeypatch.setattr(train_state.features_lib, "fingerprint", lambda directory: "blind")
    recorded = json.loads((tmp_path / "run" / train_state.IDENTITY_FILE).read_text())
    recorded["features"] = "blind"  # as if the fingerprint had not seen the change
    (tmp_path / "run" / train_state.IDENTITY_FILE).write_text(json.dumps(recorded))
    (tmp_path / "run" / "results.json").unlink()  # resume: the run is checked again
    train_state.check_identity(tmp_path / "run", train_state.run_identity(c))  # the ends look unchanged
    fdir = tmp_path / "data" / "features"
    shard = records.shard_files(fdir)[0]
    items = [records.decode_item(p, "x") for p in records.iter_records(shard)]
    with records.ShardWriter(shard) as w:  # the same sizes, one record's values negated
        for k, (item_id, array) in enumerate(items):
            w.write(item_id, -array if k == len(items) // 2 else array)
    with pytest.raises(TrainError, match=r"different run \(differing: features records \(content digest"):
        train.train_and_evaluate(c, tmp_path / "run")
    assert recorded["features_content"] != features.load_features(fdir, [""]).content_digest


def test_a_deleted_best_checkpoint_is_found_at_the_resume(finished, tmp_path):
    # It trained the whole remaining budget, then failed at the end, at every rerun.
    root, config, result = finished
    shutil.copytree(root / "run", tmp_path / "run")
    (tmp_path / "run" / "results.json").unlink()
    best = result["best_epoch"]
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "best" / str(best))
    # latest keeps the last epochs: the best one is copied back from there and the result is the same
    again = train.train_and_evaluate(config, tmp_path / "run")
    assert again["test"] == result["test"] and (tmp_path / "run" / "checkpoints" / "best" / str(best)).is_dir()
    # A run whose best epoch (1: a learning rate too small to change the ranking) latest no longer keeps.
    frozen = smoke_config(root / "data", optim__lr=1e-12, train__num_epochs=3, train__keep_checkpoints=1)
    assert train.train_and_evaluate(frozen, tmp_path / "flat")["best_epoch"] == 1
    (tmp_path / "flat" / "results.json").unlink()
    shutil.rmtree(tmp_path / "flat" / "checkpoints" / "best" / "1")
    with pytest.raises(TrainError, match=r"checkpoints/best: the best checkpoint \(epoch 1\) is missing"):
        train.train_and_evaluate(frozen, tmp_path / "flat")


def test_an_edited_config_json_is_named_by_evaluate(finished, tmp_path):
    # 64.0 for an int field crashed evaluate where it sized arrays (a TypeError traceback).
    from dff_jax import evaluate

    root, _, _ = finished
    shutil.copytree(root / "run", tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    saved["eval"]["batch_size"] = 64.0
    (tmp_path / "run" / "config.json").write_text(json.dumps(saved))
    with pytest.raises(TrainError, match=r"run/config.json: config.eval.batch_size=64.0: expected an integer >= 1"):
        evaluate.evaluate_checkpoint(tmp_path / "run")

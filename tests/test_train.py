"""End to end: smoke train -> checkpoint -> evaluate -> recommend; kill and resume; NaN; config errors."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from configs import smoke
from dff_jax import data as data_lib
from dff_jax import evaluate, parallel, recommend, synthetic, train, train_state


def smoke_config(tmp_path, variant="dff", **overrides):
    c = smoke.get_config(variant)
    c.data.dir = str(tmp_path / "data")
    for key, value in overrides.items():
        section, name = key.split("__")
        c[section][name] = value
    return c


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smoke")
    config = smoke_config(tmp)
    result = train.train_and_evaluate(config, tmp / "run")
    return config, tmp / "run", result


def test_smoke_run_writes_results_and_checkpoints(smoke_run):
    config, workdir, result = smoke_run
    assert (workdir / "results.json").is_file() and (workdir / "config.json").is_file()
    assert (workdir / "item_map.json").is_file()
    on_disk = json.loads((workdir / "results.json").read_text())
    assert on_disk["test"] == result["test"]
    assert result["epochs_run"] == config.train.num_epochs
    assert [h["epoch"] for h in result["valid_history"]] == [1, 2]
    best = max(result["valid_history"], key=lambda h: h["valid"]["NDCG@10"])
    assert result["best_epoch"] == best["epoch"]
    for k in ("HR@10", "NDCG@10", "HR@20", "NDCG@20"):
        assert 0.0 <= result["test"][k] <= 1.0
    assert result["test"]["HR@10"] <= result["test"]["HR@20"]
    assert result["test"]["num_users"] == result["dataset"]["eval_users"]
    assert sum(s["num_users"] for s in result["test"]["cold_start"].values()) == result["test"]["num_users"]
    assert result["param_count"] > 0 and result["seconds_per_epoch"] > 0
    weights = result["analysis"]["layer_weights"]
    assert len(weights) == 4 and abs(sum(weights) - 1.0) < 1e-4  # softmax alpha over the 4 stored rows
    assert 0.0 < result["analysis"]["gate_mean"] < 1.0
    gates = [h["gate_mean"] for h in result["valid_history"]]  # the gate per epoch, ending at the analysed one
    assert len(gates) == 2 and all(0.0 < g < 1.0 for g in gates)
    assert gates[result["best_epoch"] - 1] == pytest.approx(result["analysis"]["gate_mean"], abs=1e-6)
    assert len(result["features"].pop("content_digest")) == 64  # sha256 of every record (the run identity)
    assert result["features"] == {"rows": [0, 1, 2, 3], "missing_items": 0, "identical_items": 0, "unused_records": 0}
    assert sorted(int(p.name) for p in (workdir / "checkpoints" / "best").iterdir() if p.name.isdigit()) == [
        result["best_epoch"]
    ]
    assert list((workdir / "tb").iterdir()), "TensorBoard event file missing"


def test_evaluate_reproduces_the_test_metrics(smoke_run):
    _, workdir, result = smoke_run
    again = evaluate.evaluate_checkpoint(workdir, "test")
    for k in ("HR@10", "NDCG@10", "HR@20", "NDCG@20"):
        assert again[k] == pytest.approx(result["test"][k], abs=1e-7)
    valid = evaluate.evaluate_checkpoint(workdir, "valid", step=result["best_epoch"])
    assert valid["NDCG@10"] == pytest.approx(result["best_valid"]["NDCG@10"], abs=1e-7)
    with pytest.raises(train.TrainError, match="no checkpoint for epoch 7"):
        evaluate.load_run(workdir, step=7)


def test_a_run_saved_before_a_field_existed_evaluates_with_its_default(smoke_run, tmp_path):
    _, workdir, result = smoke_run
    old = tmp_path / "old-run"
    shutil.copytree(workdir, old)
    saved = json.loads((old / "config.json").read_text())
    del saved["model"]["content_init"]  # as a run saved before model.content_init existed
    (old / "config.json").write_text(json.dumps(saved))
    identity = json.loads((old / train_state.IDENTITY_FILE).read_text())
    del identity["config"]["model.content_init"]
    (old / train_state.IDENTITY_FILE).write_text(json.dumps(identity))
    again = evaluate.evaluate_checkpoint(old, "test")
    assert again["NDCG@10"] == pytest.approx(result["test"]["NDCG@10"], abs=1e-7)
    saved["model"] = "broken"  # not a group of fields: one error line, no traceback
    (old / "config.json").write_text(json.dumps(saved))
    with pytest.raises(train.TrainError, match="config field model should be a group of fields"):
        evaluate.load_run(old)


def test_recommend_excludes_history_and_orders_by_score(smoke_run):
    _, workdir, _ = smoke_run
    run = evaluate.load_run(workdir)
    history = run["dataset"].item_ids[1:4]
    recs = recommend.recommend(run, history, 5)
    assert len(recs) == 5 and not set(history) & {r for r, _ in recs}
    scores = [s for _, s in recs]
    assert scores == sorted(scores, reverse=True)
    with pytest.raises(train.TrainError, match="unknown item ids"):
        recommend.recommend(run, ["no-such-item"], 5)
    n = run["dataset"].num_items
    with pytest.raises(train.TrainError, match=rf"--k {n}: expected 1 to {n - 3} \(the run's {n} items"):
        recommend.recommend(run, history, n)  # the message says the largest k this history allows


def test_every_variant_trains_one_epoch(tmp_path):
    for variant in ("id", "replace", "fusion_last", "fusion_mean"):
        c = smoke_config(tmp_path, variant, train__num_epochs=1)
        r = train.train_and_evaluate(c, tmp_path / variant)
        assert 0.0 <= r["test"]["NDCG@10"] <= 1.0
        assert ("gate_mean" in r["analysis"]) == (variant.startswith("fusion"))


def test_bf16_compute_trains_with_float32_params_and_bf16_projection(tmp_path):
    c = smoke_config(tmp_path, "dff", train__num_epochs=1, train__compute_dtype="bfloat16")
    r = train.train_and_evaluate(c, tmp_path / "run")  # also generates the smoke data
    assert np.isfinite(r["valid_history"][0]["valid"]["NDCG@10"]) and 0.0 <= r["test"]["NDCG@10"] <= 1.0
    _, state, static, frozen = train_state.build_run(c)
    params = state["params"]
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))  # master weights stay float32
    # The content projection (the largest matmul of a DFF step at MicroLens shapes) must run in bf16, not be
    # promoted back to float32 by the float32 aggregated features.
    model = train_state.model_of(static, train_state.cast_floating(params, jnp.bfloat16), frozen)
    assert model.items.content(jnp.asarray([1, 2, 3])).dtype == jnp.bfloat16


@pytest.mark.parametrize("steps_per_call", [1, 2])
def test_nan_loss_stops_with_the_step_named(tmp_path, monkeypatch, steps_per_call):
    c = smoke_config(tmp_path, "id", train__num_epochs=1, train__log_every_steps=100)
    c.train.steps_per_call = steps_per_call  # several steps per call: the step is still named exactly
    synthetic.ensure_synthetic_data(c)
    ds = data_lib.build_dataset(c.data)
    # the first train step (1-based) whose batch contains item 7: the patched loss turns NaN there
    batches = data_lib.train_batches(ds, c.train.batch_size, c.data.max_seq_len, c.seed, 1)
    first = next(i for i, b in enumerate(batches, 1) if (b["inputs"] == 7).any() or (b["targets"] == 7).any())
    real = train_state.losses.compute_loss

    def poisoned(model, batch, rng, log_pop, **loss_fields):
        import jax.numpy as jnp

        loss, aux = real(model, batch, rng, log_pop, **loss_fields)
        bad = jnp.any(batch["inputs"] == 7) | jnp.any(batch["targets"] == 7)
        return jnp.where(bad, jnp.nan, loss), aux

    monkeypatch.setattr(train_state.losses, "compute_loss", poisoned)
    with pytest.raises(train.TrainError, match=f"at train step {first} "):
        train.train_and_evaluate(c, tmp_path / "nan")


def test_steps_per_call_runs_the_same_steps(tmp_path):
    """train.steps_per_call > 1 scans several steps in one call (the last call of an epoch shorter): the same steps
    in the same order, so the same state, bit for bit, and the same logged metrics."""
    c = smoke_config(tmp_path, "dff", train__log_every_steps=2)
    synthetic.ensure_synthetic_data(c)
    ds = data_lib.build_dataset(c.data)
    table = train_state.load_table(c, ds).table
    mesh = parallel.make_mesh(c.parallel)
    steps = data_lib.num_train_batches(ds, c.train.batch_size)
    assert steps % 3, "the smoke data must leave a shorter last call"
    final, logged = [], []
    for per_call in (1, 3):
        c.train.steps_per_call = per_call
        state, static, frozen = train_state.create_train_state(c, ds, table, mesh)
        step = train_state.jit_train_step(static, per_call)

        class Writer:
            def __init__(self):
                self.rows = []

            def add_scalar(self, name, value, at):
                self.rows.append((name, at, round(value, 5)))

        writer = Writer()
        for epoch in (1, 2):
            state = train.train_epoch(step, state, frozen, ds, c, mesh, jax.random.key(0), epoch, writer)
        final.append(jax.device_get(state))
        logged.append(writer.rows)
    assert int(final[1]["step"]) == 2 * steps
    for a, b in zip(jax.tree.leaves(final[0]), jax.tree.leaves(final[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # metrics are flushed after the first call that reaches a multiple of log_every_steps, and at the epoch's end
    for per_call, rows in zip((1, 3), logged):
        ends = [min(e, steps) for e in range(per_call, steps + per_call, per_call)]
        flushed = [e for i, e in enumerate(ends) if e == steps or e // 2 > (ends[i - 1] if i else 0) // 2]
        assert sorted({at for _, at, _ in rows}) == flushed + [steps + e for e in flushed]


def _cli(args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    return [sys.executable, "-m", "dff_jax.train", *args], dict(cwd=REPO, env=env)


def _run_cli(args, **kw):
    cmd, opts = _cli(args)
    return subprocess.run(cmd, **opts, **kw)


def test_config_typo_and_missing_data_fail_clearly(tmp_path):
    p = _run_cli(
        ["--config", "configs/smoke.py", "--workdir", str(tmp_path / "w"), "--config.model.embd_dim=8"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2
    assert "embd_dim" in p.stderr and "embed_dim" in p.stderr and "Traceback" not in p.stderr
    p = _run_cli(
        [
            "--config",
            "configs/microlens.py:dff",
            "--workdir",
            str(tmp_path / "w2"),
            f"--config.data.dir={tmp_path / 'nowhere'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "MicroLens-100k_pairs.tsv" in p.stderr and str(tmp_path / "nowhere") in p.stderr


def test_missing_features_message_says_how_to_make_them(tmp_path):
    c = smoke_config(tmp_path, "dff")
    c.features.dir = str(tmp_path / "no-features")
    with pytest.raises(train.TrainError, match="python -m extract"):
        train.train_and_evaluate(c, tmp_path / "run")


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(tmp_path):
    common = ["--config", "configs/smoke.py", f"--config.data.dir={tmp_path / 'data'}", "--config.train.num_epochs=4"]
    full = train.train_and_evaluate(smoke_config(tmp_path, train__num_epochs=4), tmp_path / "full")
    workdir = tmp_path / "killed"
    cmd, opts = _cli([*common, "--workdir", str(workdir)])
    proc = subprocess.Popen(cmd, **opts, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = workdir / "checkpoints" / "latest" / "2"
    deadline = time.time() + 240
    while not target.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (workdir / "results.json").exists()
    resumed = train.train_and_evaluate(smoke_config(tmp_path, train__num_epochs=4), workdir)
    assert resumed["epochs_run"] == 4
    for k in ("HR@10", "NDCG@10", "HR@20", "NDCG@20"):
        assert resumed["test"][k] == pytest.approx(full["test"][k], abs=1e-6)
    assert [h["valid"]["NDCG@10"] for h in resumed["valid_history"]] == pytest.approx(
        [h["valid"]["NDCG@10"] for h in full["valid_history"]], abs=1e-6
    )


def test_sampled_metrics_are_labelled_and_never_below_full_ranking(tmp_path):
    c = smoke_config(tmp_path, "id", train__num_epochs=1)
    c.eval.sampled_negatives = 20
    test = train.train_and_evaluate(c, tmp_path / "sampled")["test"]
    for k in (10, 20):
        # the sampled candidates are a subset of the items the full ranking counts, so the sampled rank is never worse
        assert test[f"sampled20/HR@{k}"] >= test[f"HR@{k}"]
        assert test[f"sampled20/NDCG@{k}"] >= test[f"NDCG@{k}"]
    assert not any(k.startswith("sampled") for k in test["cold_start"]["20+"])


def test_synthetic_data_from_other_generator_arguments_is_refused(tmp_path):
    """A data/synthetic folder made with other generator arguments (or an older generator) stops the run naming
    generation.json and the differing fields, instead of training on data the config does not describe."""
    args = dict(synthetic.DEFAULTS)
    (tmp_path / synthetic.GENERATION_FILE).write_text(
        json.dumps({"version": synthetic.GENERATOR_VERSION, "args": args})
    )
    synthetic.check_generation(tmp_path, {})  # the same arguments: accepted
    with pytest.raises(train.TrainError, match=r"generation.json.*differing: similarity"):
        synthetic.check_generation(tmp_path, {"similarity": 1.0})
    (tmp_path / synthetic.GENERATION_FILE).write_text(json.dumps({"version": "0", "args": args}))
    with pytest.raises(train.TrainError, match=r"generator version 0"):
        synthetic.check_generation(tmp_path, {})
    for damaged in ('{"version": ', "[1]", '{"args": [1]}'):  # tracebacks before
        (tmp_path / synthetic.GENERATION_FILE).write_text(damaged)
        with pytest.raises(train.TrainError, match=r"generation.json: unreadable .*delete"):
            synthetic.check_generation(tmp_path, {})


def test_cold_id_zero_makes_unseen_items_content_only(tmp_path):
    """model.cold_id="zero": items with no training interaction start with a zero ID row, which no step moves (they
    are never in a batch; AdamW's decay of 0 is 0), so a fused cold item is its content path alone."""
    config = smoke_config(tmp_path, model__cold_id="zero")
    synthetic.ensure_synthetic_data(config)
    dataset = data_lib.build_dataset(config.data)
    dataset.item_counts = dataset.item_counts.copy()
    dataset.item_counts[[3, 7]] = 0  # pretend two items were never trained on (smoke data has no cold item)
    table = train_state.load_table(config, dataset).table
    mesh = parallel.make_mesh(config.parallel)
    state, static, frozen = train_state.create_train_state(config, dataset, table, mesh)
    ids = np.asarray(state["params"]["items"]["item_id"][...])
    assert not ids[[3, 7]].any() and np.abs(ids[[1, 2, 4]]).min() > 0
    batch = next(data_lib.train_batches(dataset, 64, config.data.max_seq_len, 0, 1))
    batch = {k: np.where(np.isin(v, [3, 7]), 1, v) if k != "users" else v for k, v in batch.items()}
    step = train_state.jit_train_step(static)
    state, _ = step(state, frozen, parallel.global_batch(batch, mesh), jax.random.key(0))
    ids = np.asarray(state["params"]["items"]["item_id"][...])
    assert not ids[[3, 7]].any()
    model = train_state.model_of(static, state["params"], frozen)
    content = np.asarray(model.items.content(jnp.asarray([3, 7])))
    gate = np.asarray(model.items.gate(jnp.zeros((2, content.shape[-1])), jnp.asarray(content)))
    np.testing.assert_allclose(np.asarray(model.item_embeddings(jnp.asarray([3, 7]))), (1 - gate) * content, rtol=1e-5)


def test_every_declared_config_field_is_accepted_by_the_locked_config():
    """`--config.model.dedup=...` (once read by the model but never declared) and its siblings parse under the
    locked config, and an undeclared field is refused."""
    from absl import flags

    def parse(*overrides):
        argv = ["t", "--config", str(REPO / "configs" / "smoke.py"), *overrides]
        fv = flags.FlagValues()
        train.define_config_flags(fv, argv)
        train.parse_flags(argv, fv)
        return fv.config

    c = parse("--config.model.dedup=none", "--config.model.cold_id=zero")
    assert c.model.dedup == "none" and c.model.cold_id == "zero"
    with pytest.raises(SystemExit):
        parse("--config.model.dedupe=none")

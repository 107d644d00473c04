"""Distributed training: sharded runs equal one device; 2 processes x 2 devices equal one process; peers fail fast.

Multi-device runs happen in subprocesses (tests/parallel_worker.py, launch/local.sh) because jax fixes the device
count at start-up; this process keeps its single CPU device.
"""

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from conftest import REPO

from dff_jax import defaults, parallel

PARALLEL = defaults.base_config().parallel

WORKER = REPO / "tests" / "parallel_worker.py"
LOCAL = REPO / "launch" / "local.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra) -> dict:
    """The test environment minus anything that would make a child join some other distributed job."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROC", "JAX_PROC"))}
    env = {k: v for k, v in env.items() if not k.startswith(("SLURM_", "OMPI_"))}
    env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def run_in_repo(cmd: list[str], timeout: int = 300, **env) -> subprocess.CompletedProcess:
    """A command run from the repository root in `clean_env(**env)`, its output captured as text."""
    return subprocess.run(
        cmd, check=False, capture_output=True, text=True, env=clean_env(**env), timeout=timeout, cwd=REPO
    )


# ------------------------------------------------------------------------------------------- single-process units


class FakeMesh:
    """Only `.shape` is read by item_spec / check_global_batch."""

    def __init__(self, data, model):
        self.shape = {"data": data, "model": model}
        self.size = data * model


def test_item_spec_prefers_rows_then_trailing_dim_then_fails():
    P = parallel.P
    assert parallel.item_spec((64, 16), FakeMesh(4, 2)) == P("model")
    assert parallel.item_spec((63, 16), FakeMesh(4, 2)) == P(None, "model")
    assert parallel.item_spec((63, 3, 8), FakeMesh(4, 2)) == P(None, None, "model")
    assert parallel.item_spec((63, 16), FakeMesh(8, 1)) == P()
    with pytest.raises(ValueError, match=r"neither by rows \(63 % 2 != 0\) nor by its last dim \(15 % 2 != 0\)"):
        parallel.item_spec((63, 15), FakeMesh(4, 2))


def test_check_global_batch_names_the_data_axis():
    parallel.check_global_batch(64, FakeMesh(8, 1))
    with pytest.raises(ValueError, match=r"batch size 60 .* multiple of the data-parallel size 8.*use 56 or 64"):
        parallel.check_global_batch(60, FakeMesh(8, 1))


def test_make_mesh_on_one_device_and_bad_model_axis():
    mesh = parallel.make_mesh(PARALLEL)
    assert dict(mesh.shape) == {"data": 1, "model": 1}
    with pytest.raises(ValueError, match="model_axis=2 must be >= 1 and divide the device count 1"):
        parallel.make_mesh(ml_collections.ConfigDict({"model_axis": 2}))


def test_state_shardings_single_device():
    import jax

    mesh = parallel.make_mesh(PARALLEL)
    state = {"params": {"item_id": np.zeros((11, 4)), "w": np.zeros((4, 4))}, "step": np.int32(0)}
    sh = parallel.state_shardings(state, mesh, True, num_items=10)  # model axis 1: everything replicated
    assert all(s.is_fully_replicated for s in jax.tree.leaves(sh))


def test_global_batch_and_to_host_round_trip():
    mesh = parallel.make_mesh(PARALLEL)
    batch = {"inputs": np.arange(12, dtype=np.int32).reshape(4, 3), "mask": np.array([1, 0, 1, 1], bool)}
    assert parallel.process_rows(4, mesh) == (0, 4) == parallel.process_rows(4)
    out = parallel.global_batch(batch, mesh)
    for k, value in batch.items():
        np.testing.assert_array_equal(parallel.to_host(out[k]), value)
    assert parallel.is_main_process()


@pytest.mark.parametrize(
    ("cfg", "env", "expected"),
    [
        ({}, {}, None),
        ({}, {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"},
         {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}),
        ({}, {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:99", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"},
         {"coordinator_address": "127.0.0.1:99", "num_processes": 2, "process_id": 0,
          "coordinator_bind_address": "127.0.0.1:99"}),
        ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 1}, {},
         {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1}),
        ({"num_processes": 1}, {}, None),
        ({}, {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "2"}, {}),
        ({}, {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1"}, None),
        ({}, {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_MCA_orte_hnp_uri": "1.2.3.4;tcp://10.0.0.1:5"}, {}),
    ],
)  # fmt: skip
def test_when_to_join_a_distributed_job(monkeypatch, cfg, env, expected):
    for k in list(os.environ):
        if k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROC", "JAX_PROC", "SLURM_", "OMPI_")):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    c = defaults.base_config().parallel
    c.update(cfg)
    assert parallel._distributed_args(c) == expected


def test_incomplete_multiprocess_settings_fail_clearly(monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "h:1")
    monkeypatch.delenv("JAX_NUM_PROCESSES", raising=False)
    monkeypatch.delenv("JAX_PROCESS_ID", raising=False)
    with pytest.raises(ValueError, match=r"missing: num_processes / \$JAX_NUM_PROCESSES, process_id / \$JAX_PROC"):
        parallel._distributed_args(defaults.base_config().parallel)
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    with pytest.raises(ValueError, match=r"Open MPI job detected .* set \$JAX_COORDINATOR_ADDRESS=host:port"):
        parallel._distributed_args(defaults.base_config().parallel)
    monkeypatch.delenv("OMPI_COMM_WORLD_SIZE")
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "h:1")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match=r"environment variable JAX_NUM_PROCESSES='two' must be an integer"):
        parallel._distributed_args(defaults.base_config().parallel)
    c = defaults.base_config().parallel
    c.update({"num_processes": 2, "process_id": 2})
    with pytest.raises(ValueError, match=r"process_id=2 must be in \[0, num_processes=2\)"):
        parallel._distributed_args(c)


# ------------------------------------------------------------------------------------------------ launch/local.sh


def test_local_sh_sets_the_contract_and_propagates_the_first_failure(tmp_path):
    ok = subprocess.run(
        [str(LOCAL), "3", "bash", "-c", 'echo "$JAX_PROCESS_ID/$JAX_NUM_PROCESSES@$JAX_COORDINATOR_ADDRESS"'],
        check=False,
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=30,
    )
    assert ok.returncode == 0, ok.stderr
    lines = sorted(ok.stdout.splitlines())
    assert len(lines) == 3, ok.stdout
    for i, line in enumerate(lines):  # "[pI] I/3@127.0.0.1:PORT": the prefix, the id, the count, one coordinator
        assert re.fullmatch(rf"\[p{i}\] {i}/3@127\.0\.0\.1:\d+", line), line
    assert len({line.split("@")[1] for line in lines}) == 1

    t0 = time.time()
    bad = run_in_repo(
        [str(LOCAL), "2", "bash", "-c", 'if [ "$JAX_PROCESS_ID" = 1 ]; then exit 3; fi; exec sleep 60'], timeout=30
    )
    assert bad.returncode == 3
    assert time.time() - t0 < 20, "local.sh did not stop the surviving process"
    assert "process 1 (pid" in bad.stderr and "failed with exit status 3; stopping the others" in bad.stderr
    # A copy that ignores SIGTERM (JAX's multi-process runtime catches it) was left running, as after a cancel.
    t0 = time.time()
    stubborn = run_in_repo(
        # process 1 fails a second late, so that process 0 has set its trap before the SIGTERM comes
        [
            str(LOCAL),
            "2",
            "bash",
            "-c",
            'if [ "$JAX_PROCESS_ID" = 1 ]; then sleep 1; exit 3; fi; trap "" TERM; sleep 60',
        ],
        timeout=30,
        STOP_GRACE="2",
    )
    assert stubborn.returncode == 3 and time.time() - t0 < 20, stubborn.stderr
    assert "process 0 (pid" in stubborn.stderr and "did not stop 2 s after SIGTERM; killing it" in stubborn.stderr
    usage = subprocess.run([str(LOCAL), "x", "true"], check=False, capture_output=True, text=True, env=clean_env())
    assert usage.returncode == 2 and "NUM_PROCESSES must be a positive integer" in usage.stderr


def fake_program(path: Path, name: str) -> Path:
    """An executable that prints its arguments and the launch environment instead of running anything."""
    exe = path / name
    exe.write_text(
        "#!/usr/bin/env bash\n"
        'echo "ARGS $*"\n'
        'echo "ENV $JAX_COORDINATOR_ADDRESS $JAX_NUM_PROCESSES $JAX_PROCESS_ID ${JAX_LOCAL_DEVICE_IDS:-}"\n'
    )
    exe.chmod(0o755)
    return exe


def test_multiprocess_sh_demands_its_environment_then_starts_the_trainer(tmp_path):
    script = str(REPO / "launch" / "multiprocess.sh")
    missing = subprocess.run([script, "--config", "c.py"], check=False, capture_output=True, text=True, env=clean_env())
    # one error line and status 2, like every CLI (bash's ${VAR:?} gave status 1 and no "error:")
    assert missing.returncode == 2 and missing.stderr.startswith("error: multiprocess.sh: set JAX_COORDINATOR_ADDRESS")
    env = clean_env(JAX_COORDINATOR_ADDRESS="host0:1234", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="2")
    bad = subprocess.run([script, "--config", "c.py"], check=False, capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "JAX_PROCESS_ID must be in 0..1, got '2'" in bad.stderr
    env.update(JAX_PROCESS_ID="1", PYTHON=str(fake_program(tmp_path, "python")))
    ok = subprocess.run(
        [script, "--config", "c.py", "--workdir", "w"], check=False, capture_output=True, text=True, env=env
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines() == ["ARGS -m dff_jax.train --config c.py --workdir w", "ENV host0:1234 2 1 "]


def test_slurm_sbatch_runs_one_process_per_node_with_all_its_gpus(tmp_path):
    fake_program(tmp_path, "srun")
    env = clean_env(PATH=f"{tmp_path}:{os.environ['PATH']}", SLURM_GPUS_ON_NODE="4", SLURM_JOB_ID="42")
    proc = subprocess.run(
        ["bash", str(REPO / "launch" / "slurm.sbatch"), "--config", "c.py", "--workdir", "w"],
        check=False,
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    args, environment = proc.stdout.splitlines()
    assert args == "ARGS --ntasks-per-node=1 --kill-on-bad-exit=1 python3 -m dff_jax.train --config c.py --workdir w"
    assert environment.endswith(" 0,1,2,3")  # every GPU of the node for its one process


@pytest.mark.parametrize("gpus", [None, "0", "h100:0"])
def test_slurm_sbatch_refuses_a_node_without_gpus(tmp_path, gpus):
    fake_program(tmp_path, "srun")
    env = clean_env(PATH=f"{tmp_path}:{os.environ['PATH']}", **({"SLURM_GPUS_ON_NODE": gpus} if gpus else {}))
    script = str(REPO / "launch" / "slurm.sbatch")
    proc = subprocess.run(["bash", script, "--config", "c.py"], check=False, capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout  # srun never started
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("error: slurm.sbatch: "), proc.stderr


# ------------------------------------------------------------------------------------ multi-device / multi-process


@pytest.fixture(scope="module")
def mechanism():
    proc = subprocess.run(
        [sys.executable, str(WORKER), "mechanism"],
        check=False,
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("name", "mesh", "item_spec", "feature_spec", "shard_shape"),
    [
        ("data8", {"data": 8, "model": 1}, "P()", "P()", [64, 16]),
        ("data4_model2_rows", {"data": 4, "model": 2}, "P('model',)", "P('model',)", [32, 16]),
        ("data4_model2_cols", {"data": 4, "model": 2}, "P(None, 'model')", "P(None, None, 'model')", [63, 8]),
    ],
)
def test_sharded_training_and_ranking_equal_one_device(mechanism, name, mesh, item_spec, feature_spec, shard_shape):
    r = mechanism[name]
    assert r["mesh"] == mesh
    assert r["item_spec"] == item_spec and r["mu_spec"] == item_spec  # AdamW moments follow the table
    assert r["feature_spec"] == feature_spec and r["item_shard_shape"] == shard_shape
    assert r["max_loss_diff"] < 1e-5, r
    assert r["max_param_diff"] < 1e-5, r
    assert r["ranks_equal"], r


def test_sharded_errors_are_clear(mechanism):
    assert "batch size 30" in mechanism["bad_batch_error"] and "data-parallel size 4" in mechanism["bad_batch_error"]
    assert "model_axis=3 must be >= 1 and divide the device count 8" in mechanism["bad_model_axis_error"]


METRICS = ("HR@10", "NDCG@10", "HR@20", "NDCG@20")


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory):
    """configs/smoke.py (2 epochs) in this process, on its single device: the reference for the sharded runs."""
    from configs import smoke
    from dff_jax import train

    root = tmp_path_factory.mktemp("parallel_smoke")
    config = smoke.get_config()
    config.data.dir = str(root / "data")
    result = train.train_and_evaluate(config, root / "one_device")
    assert result["devices"] == 1
    return root, result


def assert_same_run(got: dict, ref: dict) -> None:
    """Same validation curve, best epoch, test metrics and learned DFF layer weights (float tolerance)."""
    assert got["best_epoch"] == ref["best_epoch"] and got["epochs_run"] == ref["epochs_run"]
    for g, r in zip(got["valid_history"], ref["valid_history"], strict=True):
        for k in METRICS:
            assert g["valid"][k] == pytest.approx(r["valid"][k], abs=1e-6), (g["epoch"], k)
    for k in METRICS:
        assert got["test"][k] == pytest.approx(ref["test"][k], abs=1e-6), k
    assert got["test"]["num_users"] == ref["test"]["num_users"]
    np.testing.assert_allclose(got["analysis"]["layer_weights"], ref["analysis"]["layer_weights"], atol=1e-5)
    assert got["analysis"]["gate_mean"] == pytest.approx(ref["analysis"]["gate_mean"], abs=1e-5)


INIT_CHILD = """
import json, sys, types
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from configs import synthetic
from dff_jax import models, parallel, train_state

n = int(sys.argv[1])
c = synthetic.get_config()
c.model.content, c.model.layer, c.model.layers = "layer", 0, ()
c.model.cold_id, c.model.content_init = "zero", "match_id"  # both read the data / the table at init
c.parallel.shard_items = True
dataset = types.SimpleNamespace(num_items=n, item_counts=np.arange(n + 1) % 5)  # every fifth item cold
values = np.random.default_rng(0).standard_normal((n + 1, 1, 8)).astype(np.float32)
out = {}
for m in (1, 8):
    c.parallel.model_axis = m
    mesh = parallel.make_mesh(c.parallel, jax.devices()[:m])
    sharding = parallel.state_shardings(jax.ShapeDtypeStruct(values.shape, values.dtype), mesh, True, num_items=n)
    table = jax.device_put(values, sharding)
    state, static, _ = train_state.create_train_state(c, dataset, table, mesh)
    leaves = jax.tree.leaves(state)
    out[m] = {
        "init_bytes": static["init_bytes_per_device"],
        "item_shards": [[list(s.data.shape) for s in x.addressable_shards] for x in leaves if x.shape[:1] == (n + 1,)],
        # a whole [N+1, d] array on any one device, among everything alive after init
        "whole": [list(a.shape) for a in jax.live_arrays() if a.shape == (n + 1, c.model.embed_dim)
                  and any(s.data.shape == a.shape for s in a.addressable_shards)],
    }
    np.savez(sys.argv[2] + f"-{m}.npz", *[np.asarray(x) for x in leaves])
    if m == 1:  # the model built eagerly, as before the state was initialised under jit
        np.savez(sys.argv[2] + "-params.npz", *[np.asarray(x) for x in jax.tree.leaves(state["params"])])
        eager = models.Recommender(n, table, train_counts=dataset.item_counts, rngs=nnx.Rngs(c.seed), **c.model)
        np.savez(sys.argv[2] + "-eager.npz", *[np.asarray(x) for x in jax.tree.leaves(nnx.split(eager, nnx.Param, ...)[1])])
        del eager
print(json.dumps(out))
"""


def test_the_state_is_created_sharded_with_the_values_of_one_device(tmp_path):
    """create_train_state builds the model and the optimizer state inside one jit whose outputs are sharded: on 8
    devices with model_axis=8 the ID table and both AdamW moments come out split (40,001 rows do not divide: by
    columns), the init program allocates on each device about 1/8 of what it allocates on one device, no device holds a whole [N+1, d] array afterwards, and the values are bit for bit
    those of the model built eagerly and of one device (cold_id="zero" included), but for the last bits of
    content_init="match_id"'s rescaled projection (its scale is now float32 arithmetic in the init program, and
    its norms add H in another order when H is split)."""
    n, d = 40_000, 64
    proc = subprocess.run(
        [sys.executable, "-c", INIT_CHILD, str(n), str(tmp_path / "state")],
        check=False,
        capture_output=True,
        text=True,
        env=clean_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = {int(k): v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}
    one, eight = (np.load(tmp_path / f"state-{m}.npz") for m in (1, 8))
    for key in one.files:
        if one[key].shape == (8, d):  # match_id's scale: the sampled rows' projection sums H over the devices
            np.testing.assert_allclose(one[key], eight[key], rtol=1e-6)
        else:
            np.testing.assert_array_equal(one[key], eight[key])
    eager, jitted = np.load(tmp_path / "state-eager.npz"), np.load(tmp_path / "state-params.npz")
    params = [jitted[k] for k in jitted.files]
    assert len(params) == len(eager.files)
    for a, b in zip(params, (eager[k] for k in eager.files)):
        if a.shape == (8, d):  # match_id's scale: float32 on the device, where it was a float64 division on the host
            np.testing.assert_allclose(a, b, rtol=1e-5)
        else:
            np.testing.assert_array_equal(a, b)
    ids = [p for p in params if p.shape == (n + 1, d)]
    assert len(ids) == 1 and not ids[0][np.arange(n + 1) % 5 == 0].any() and np.abs(ids[0][1:5]).min() > 0
    # the ID table and its two AdamW moments, split by columns over the 8 devices
    assert out[8]["item_shards"] == [[[n + 1, d // 8]] * 8] * 3
    assert out[8]["whole"] == [] and out[1]["whole"] != []
    # per device: the state's shard and the random draws' temporaries (on CPU, about 3 shards' worth for the ID
    # table), so about 1/8 of one device's plus the replicated parameters (0.145); one whole ID table adds 0.14
    assert out[8]["init_bytes"] <= 0.2 * out[1]["init_bytes"], out


@pytest.mark.slow
def test_train_and_evaluate_on_8_devices_equals_one_device(one_device_run):
    """train_and_evaluate with data=8, and data=4 x model=2 with item sharding, reproduces the 1-device run; the
    sharded run's frozen table and ID table hold half of the last dim per device (81 rows do not divide by 2), and
    `recommend` from its sharded checkpoint gives the 1-device run's items."""
    root, ref = one_device_run
    proc = subprocess.run(
        [sys.executable, str(WORKER), "smoke8", str(root)],
        check=False,
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    paths = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("data8", "data4_model2_items"):
        got = json.loads(Path(paths[name]).read_text())
        assert got["devices"] == 8 and got["processes"] == 1
        assert_same_run(got, ref)
    assert paths["feature_shards"] == [[81, 4, 8]] * 8 and paths["id_shards"] == [[81, 8]] * 8
    from dff_jax import evaluate, recommend

    run = evaluate.load_run(root / "one_device")
    recs = recommend.recommend(run, run["dataset"].item_ids[1:4], 5)
    assert [item for item, _ in recs] == [item for item, _ in paths["recs"]]
    np.testing.assert_allclose([s for _, s in recs], [s for _, s in paths["recs"]], rtol=1e-4)


@pytest.mark.slow
def test_two_processes_train_checkpoint_resume_equal_one_process(one_device_run):
    """2 processes x 2 CPU devices through launch/local.sh (mesh data=2 x model=2, item sharding): epoch 1, then a
    second launch restores the epoch-1 checkpoint written by both processes and runs epoch 2; the result equals the
    single-process, single-device run."""
    root, ref = one_device_run
    workdir = root / "two_processes"
    cmd = [str(LOCAL), "2", sys.executable, "-m", "dff_jax.train", "--config", str(REPO / "configs" / "smoke.py")]
    cmd += [f"--workdir={workdir}", f"--config.data.dir={root / 'data'}", "--config.parallel.cpu_devices=2"]
    cmd += ["--config.parallel.model_axis=2", "--config.parallel.shard_items=True"]
    logs = []
    for epochs in (1, 2):
        proc = run_in_repo(cmd + [f"--config.train.num_epochs={epochs}"], timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        logs.append(proc.stdout + proc.stderr)
        if epochs == 1:  # a finished 1-epoch run; drop its results so the next launch resumes instead of returning
            assert json.loads((workdir / "results.json").read_text())["epochs_run"] == 1
            (workdir / "results.json").unlink()
    assert "[p0] resumed from" in logs[1] and "at epoch 1" in logs[1]
    # streamed into the shards: each process placed only its 2 devices' halves (of H: 81 rows do not divide by 2)
    placed = "80 items x 4 rows x 16 bfloat16 (0.010 MB) placed as P(None, None, 'model'): 0.005 MB on each of this"
    assert f"[p0] features: {placed} process's 2 devices" in logs[0]
    assert "[p1] epoch" not in "".join(logs) and "[p0] epoch 2:" in logs[1]  # only process 0 logs
    got = json.loads((workdir / "results.json").read_text())
    assert got["devices"] == 4 and got["processes"] == 2
    assert_same_run(got, ref)
    # The checkpoint written by 2 processes restores into 1 process (mesh data=1 x model=2): Orbax reshards on load.
    proc = run_in_repo([sys.executable, "-m", "dff_jax.evaluate", f"--workdir={workdir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((workdir / f"eval-test-epoch{ref['best_epoch']}.json").read_text())
    for k in METRICS:
        assert again[k] == pytest.approx(ref["test"][k], abs=1e-6), k


@pytest.mark.slow
def test_missing_peer_fails_within_the_timeout():
    """One process of a 2-process job, alone: it must exit non-zero with a readable message, not hang or abort."""
    code = (
        "from dff_jax import defaults, parallel; c = defaults.base_config().parallel; "
        "c.initialization_timeout = 5; parallel.initialize(c)"
    )
    procs = []
    t0 = time.time()
    for pid in (0, 1):  # the coordinator waiting for its peer, and a peer whose coordinator never comes
        env = clean_env(
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid)
        )
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True))
    for pid, p in enumerate(procs):
        _, err = p.communicate(timeout=60)
        assert p.returncode == 1, err[-2000:]
        assert f"process {pid} of 2 waiting for all processes at 127.0.0.1:" in err
        assert "distributed initialization did not complete within 5 s" in err and "a peer process is missing" in err
    assert time.time() - t0 < 5 + 25, "did not fail within the timeout (+ start-up)"


@pytest.mark.slow
def test_processes_given_different_configs_or_device_counts_all_stop_with_one_line(tmp_path):
    # A seed given to one process only trained and recorded process 0's config: silently other numbers.
    base = f"{sys.executable} -m dff_jax.train --config {REPO / 'configs' / 'smoke.py'} --workdir={tmp_path / 'w'}"
    base += f" --config.data.dir={tmp_path / 'data'} --config.train.num_epochs=1"
    for extra, says in (
        ("--config.seed=$((42 + JAX_PROCESS_ID))", "process(es) [1] were given another config than process 0"),
        ("--config.parallel.cpu_devices=$((1 + JAX_PROCESS_ID))", "the processes have different device counts"),
    ):
        proc = run_in_repo([str(LOCAL), "2", "bash", "-c", f"exec {base} {extra}"])
        assert proc.returncode == 2, proc.stderr[-3000:]
        errors = [line for line in proc.stderr.splitlines() if "error:" in line]
        assert len(errors) == 2 and all(says in line for line in errors), proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr and not (tmp_path / "w" / "results.json").exists()


def test_a_coordinator_port_in_use_is_one_error():
    # JAX's coordinator crashed process 0 with a segmentation fault.
    with socket.socket() as held:
        held.bind(("0.0.0.0", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(parallel.ConfigError, match=rf"coordinator 127.0.0.1:{port}: port {port} is already in use"):
            parallel.check_coordinator_port({"coordinator_address": f"127.0.0.1:{port}", "process_id": 0})
    parallel.check_coordinator_port({"coordinator_address": f"127.0.0.1:{port}", "process_id": 0})  # free again


def test_slurm_sbatch_outside_slurm_is_one_error():
    # "srun: command not found", status 127, no error: line
    env = clean_env(SLURM_GPUS_ON_NODE="8", PATH="/usr/bin:/bin")
    script = str(REPO / "launch" / "slurm.sbatch")
    proc = subprocess.run(["bash", script, "--config", "c.py"], check=False, capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and proc.stderr.startswith("error: slurm.sbatch: srun not found"), proc.stderr

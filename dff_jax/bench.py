"""Throughput and memory benchmark at given shapes; prints JSON.

  python -m dff_jax.bench --preset cpu          # CPU-sized shapes (also times the PyTorch eager port)
  python -m dff_jax.bench --preset microlens    # MicroLens-100k shapes: 100,000 users, 19,738 items, 33 x 4096 bf16
  python -m dff_jax.bench --preset microlens --compute-dtype bfloat16   # the same step in bf16 compute
  python -m dff_jax.bench --preset microlens --all   # DFF f32, DFF bf16 and ID in one process, one JSON (the GPU check)
  python -m dff_jax.bench --preset sasrec       # the original SASRec setting at the held-out benchmark's shapes, vs torch
  python -m dff_jax.bench --preset cpu --shape embed_dim=256 --shape batch_size=512
  python -m dff_jax.bench --what features       # feature-table load: peak RSS vs table size
  python -m dff_jax.bench --what features --sharded --items 200000 --layers 4 --hidden 128   # streamed placement
  python -m dff_jax.bench --what catalogue --out DIR --items 1000000 --users 2000 --layers 4 --hidden 64   # 1M items:
                                                # writes DIR once, then loads, trains an epoch, ranks (4 CPU devices)
  python -m dff_jax.bench_scaling               # strong/weak scaling on simulated CPU devices (its own module)

Everything is measured in one process, side by side, on random data of the given shapes (no files), through the
functions a real run uses (`train_state.create_train_state`, `jit_train_step`, `train.train_epoch`,
`evaluate.evaluate`): the jitted train step (sequences/s, compile time), one whole epoch, full-ranking evaluation of
every user against the bare user-by-item score matmul at the same shapes, host peak RSS and (on GPU) device peak
memory. At the CPU preset the PyTorch eager port of the same model and loss (dff_jax/bench_torch.py) is timed on the
same batches. Measured figures and their history: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from dff_jax import data as data_lib
from dff_jax import defaults, evaluate, features, metrics, parallel, records, train, train_state
from dff_jax.errors import ConfigError, OneLineArgumentParser, exit_on_user_error

PRESETS = {
    # num_users, num_items, layers x hidden of the features, embed_dim, batch (global), seq len
    "cpu": dict(num_users=8192, num_items=5000, layers=13, hidden=256, embed_dim=64, batch_size=256, max_seq_len=10),
    "microlens": dict(
        num_users=100_000, num_items=19_738, layers=33, hidden=4096, embed_dim=1024, batch_size=512, max_seq_len=10
    ),
}


def random_dataset(num_users: int, num_items: int, max_seq_len: int, seed: int = 0) -> data_lib.Dataset:
    """A Dataset with MicroLens-like shapes: 13-item windows split as the protocol does, Zipf item popularity."""
    rng = np.random.default_rng(seed)
    pop = 1.0 / np.arange(1, num_items + 1) ** 0.8
    seqs = rng.choice(np.arange(1, num_items + 1), size=(num_users, max_seq_len + 3), p=pop / pop.sum()).astype(
        np.int32
    )
    train = seqs[:, :-2]

    def split(inputs_end: int, target_col: int) -> dict:
        hist = seqs[:, :inputs_end]
        return {
            "users": np.arange(num_users, dtype=np.int32),
            "inputs": hist[:, -max_seq_len:],
            "targets": seqs[:, target_col].copy(),
            "history": hist.copy(),
        }

    counts = np.bincount(train.ravel(), minlength=num_items + 1).astype(np.int64)
    return data_lib.Dataset(
        item_ids=[""] + [str(i) for i in range(1, num_items + 1)],
        user_ids=[str(u) for u in range(num_users)],
        train_seqs=list(train),
        valid=split(max_seq_len + 1, -2),
        test=split(max_seq_len + 2, -1),
        item_counts=counts,
        stats={"users_kept": num_users, "items": num_items, "eval_users": num_users},
    )


# The held-out benchmark of the original-SASRec comparison (docs/benchmarks.md): users, items, interactions, and the
# users with fewer than 3 items (train only) that leave 30,901 to evaluate.
SASREC_SHAPE = {"num_users": 31_013, "num_items": 23_715, "interactions": 287_107, "train_only": 112}


def sasrec_interactions(
    num_users: int, num_items: int, interactions: int, train_only: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(users, items) in time order with the given totals: `train_only` users with 1-2 items, the others >= 3 with
    a geometric tail (mean length interactions / num_users), Zipf item popularity, every item used at least once."""
    rng = np.random.default_rng(seed)
    lengths = np.empty(num_users, np.int64)
    lengths[:train_only] = rng.integers(1, 3, train_only)
    rest = num_users - train_only
    mean_extra = (interactions - lengths[:train_only].sum()) / rest - 3
    lengths[train_only:] = 3 + rng.geometric(1.0 / (mean_extra + 1.0), rest) - 1
    diff = interactions - int(lengths.sum())
    while diff:  # nudge random evaluated users (keeping them >= 3) until the total is exact
        pick = rng.integers(train_only, num_users, abs(diff))
        if diff < 0:  # distinct users, each shortened by one, none below 3
            pick = np.unique(pick)
            pick = pick[lengths[pick] > 3][:-diff]
        np.add.at(lengths, pick, int(np.sign(diff)))
        diff = interactions - int(lengths.sum())
    pop = 1.0 / np.arange(1, num_items + 1) ** 0.8
    items = rng.choice(np.arange(1, num_items + 1), size=interactions, p=pop / pop.sum())
    items[rng.permutation(interactions)[:num_items]] = rng.permutation(num_items) + 1
    users = np.repeat(rng.permutation(num_users), lengths)
    return users, items


def sasrec_dataset(config, seed: int = 0, shape: dict | None = None) -> data_lib.Dataset:
    """The `sasrec` preset's data through the real reader and protocol: random interactions at `shape` (default
    SASREC_SHAPE) written as a user,item,timestamp CSV in a temporary folder and read with `config.data`
    (configs/sasrec.py)."""
    users, items = sasrec_interactions(**(shape or SASREC_SHAPE), seed=seed)
    with tempfile.TemporaryDirectory(prefix="dff_sasrec_bench_") as tmp:
        path = Path(tmp) / "interactions.csv"
        rows = np.stack([users, items, np.arange(len(users))], axis=1)
        np.savetxt(path, rows, fmt="%d", delimiter=",", header="user,item,timestamp", comments="")
        data_cfg = config.data.copy_and_resolve_references()
        data_cfg.dir, data_cfg.interactions, data_cfg.format = tmp, path.name, "csv"
        return data_lib.build_dataset(data_cfg, verbose=False)


def random_table(num_items: int, layers: int, hidden: int, seed: int = 1) -> np.ndarray:
    """[N+1, layers, hidden] bf16 standard-normal features (row 0 zero), filled in chunks: never a float32 copy."""
    import ml_dtypes

    rng = np.random.default_rng(seed)
    n = num_items + 1
    table = np.empty((n, layers, hidden), ml_dtypes.bfloat16)
    for start in range(0, n, 1024):
        block = rng.standard_normal((min(1024, n - start), layers, hidden), dtype=np.float32)
        table[start : start + len(block)] = block.astype(ml_dtypes.bfloat16)
    table[0] = 0
    return table


def bench_config(shape: dict, variant: str = "dff", loss: str = "inbatch_logq", compute_dtype: str = "float32"):
    """The run config of a benchmark: the defaults, the variant, and the shape's model and batch sizes."""
    config = defaults.apply_variant(defaults.base_config(), variant)
    config.model.embed_dim = shape["embed_dim"]
    config.model.gate_hidden = min(256, shape["embed_dim"])
    config.data.max_seq_len = shape["max_seq_len"]
    config.train.batch_size = config.eval.batch_size = shape["batch_size"]
    config.loss.name = loss
    config.train.compute_dtype = compute_dtype
    config.train.progress_bar = False
    config.train.log_every_steps = 10**9
    if config.model.embed_dim % config.model.num_heads:  # one error line, not a failure inside jax
        raise ConfigError(
            f"--shape embed_dim={config.model.embed_dim}: expected a multiple of {config.model.num_heads} heads"
        )
    return config


def make_run(config, shape: dict, seed: int = 0, dataset=None, table=None):
    """(dataset, state, static, frozen) of a run at `shape` on random data, built as training builds one.
    `dataset` / `table` (the rows the model reads) are drawn when not given; `run_all` shares them across runs."""
    dataset = (
        random_dataset(shape["num_users"], shape["num_items"], shape["max_seq_len"], seed)
        if dataset is None
        else dataset
    )
    if config.model.item_encoder == "id":
        table = None
    elif table is None:
        m = config.model
        rows = features.model_rows(m.content, m.layer, m.layers, shape["layers"], "bench shape")
        table = random_table(shape["num_items"], len(rows), shape["hidden"], seed + 1)
    mesh = parallel.make_mesh(config.parallel)
    state, static, frozen = train_state.create_train_state(config, dataset, table, mesh)
    return dataset, state, static, frozen


def _alternate(jax_round, torch_round, rounds: int, steps: int) -> tuple[list[float], list[float]]:
    """Seconds per step of `rounds` rounds of the JAX and (unless None) the PyTorch step, alternating, so a burst of
    load on a shared machine hits both rather than one."""
    jax_s, torch_s = [], []
    for _ in range(rounds):
        jax_s.append(_timed(jax_round, 1) / steps)
        if torch_round is not None:
            torch_s.append(_timed(torch_round, 1) / steps)
    return jax_s, torch_s


def _timed(fn, repeats: int) -> float:
    """Best of `repeats` wall times of fn() (fn must block until its result is ready)."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_train(config, dataset, state, static, frozen, steps: int) -> tuple[dict, dict]:
    """Jitted train-step throughput and one whole epoch."""
    step = train_state.jit_train_step(static)
    mesh = static["mesh"]
    batches = list(data_lib.train_batches(dataset, config.train.batch_size, config.data.max_seq_len, 0, 1))
    rng = jax.random.key(0)
    gb = [parallel.global_batch(b, mesh) for b in batches[: max(2, steps)]]
    t = time.perf_counter()
    state, m = step(state, frozen, gb[0], rng)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(steps):
        state, m = step(state, frozen, gb[i % len(gb)], rng)
    jax.block_until_ready(state)
    step_s = (time.perf_counter() - t) / steps
    t = time.perf_counter()
    state = train.train_epoch(step, state, frozen, dataset, config, mesh, rng, 1)
    jax.block_until_ready(state)
    epoch_s = time.perf_counter() - t
    return {
        "compile_s": round(compile_s, 3),
        "step_ms": round(1000 * step_s, 3),
        "sequences_per_s": round(config.train.batch_size / step_s, 1),
        "steps_per_epoch": len(batches),
        "epoch_s": round(epoch_s, 3),
        "final_loss": float(m["loss"]),
    }, state


def bench_eval(config, dataset, params, static, frozen, repeats: int = 3) -> dict:
    """Full-ranking evaluation of every test user vs the bare user x item score matmul over the same batches."""
    e, mesh, graphdef = config.eval, static["mesh"], static["graphdef"]
    items = evaluate.item_table(
        params, frozen["features"], graphdef=graphdef, sharding=parallel.replicated(mesh), chunk_size=e.chunk_size
    )
    batches = [parallel.global_batch(b, mesh) for b in data_lib.eval_batches(dataset, "test", e.batch_size)]
    users = [evaluate.user_table(params, frozen["features"], b["inputs"], graphdef=graphdef) for b in batches]
    rank_fn = jax.jit(
        lambda u, it, t, h: metrics.target_ranks(u, it, t, h, mask_history=e.mask_history, chunk_size=e.chunk_size)
    )
    matmul_fn = jax.jit(lambda u, it: u @ it.T)

    def ranking():
        jax.block_until_ready([rank_fn(u, items, b["targets"], b["history"]) for u, b in zip(users, batches)])

    def matmul():
        jax.block_until_ready([matmul_fn(u, items) for u in users])

    ranking(), matmul()  # compile
    rank_s, matmul_s = _timed(ranking, repeats), _timed(matmul, repeats)
    t = time.perf_counter()
    evaluate.evaluate(static, params, frozen, dataset, "test", e, config.seed)
    whole_s = time.perf_counter() - t
    return {
        "users": len(dataset.test["targets"]),
        "ranking_s": round(rank_s, 6),  # microseconds: a tiny shape must not round to 0
        "bare_matmul_s": round(matmul_s, 6),
        "ranking_over_matmul": round(rank_s / matmul_s, 3),
        "whole_evaluate_s": round(whole_s, 3),
    }


def bench_torch(config, dataset, state, static, frozen, steps: int, rounds: int = 5) -> dict | None:
    """The jitted JAX step against the PyTorch eager port (dff_jax/bench_torch.py): same batches, same starting
    weights, same loss. The two alternate in `rounds` rounds of `steps` steps each and the ratio is of the median
    round times, so a burst of load on a shared machine hits both rather than one."""
    try:
        import torch

        from dff_jax import bench_torch as port
    except ImportError:
        return None
    mesh = static["mesh"]
    batches = list(data_lib.train_batches(dataset, config.train.batch_size, config.data.max_seq_len, 0, 1))
    batches = batches[: max(2, steps)]
    gb = [parallel.global_batch(b, mesh) for b in batches]
    torch_step = port.torch_step_for_run(static, state, frozen, config)
    jax_step = train_state.jit_train_step(static)
    rng = jax.random.key(0)
    t = time.perf_counter()
    torch_step(batches[0])
    first_s = time.perf_counter() - t

    def jax_round():
        nonlocal state
        for i in range(steps):
            state, _ = jax_step(state, frozen, gb[i % len(gb)], rng)
        jax.block_until_ready(state)

    def torch_round():
        for i in range(steps):
            torch_step(batches[i % len(batches)])

    jax_round()  # compiles this step function and settles caches
    jax_s, torch_s = _alternate(jax_round, torch_round, rounds, steps)
    jax_med, torch_med = float(np.median(jax_s)), float(np.median(torch_s))
    return {
        "first_step_s": round(first_s, 3),
        "step_ms": round(1000 * torch_med, 3),
        "sequences_per_s": round(config.train.batch_size / torch_med, 1),
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "jax_step_ms_per_round": [round(1000 * x, 2) for x in jax_s],
        "torch_step_ms_per_round": [round(1000 * x, 2) for x in torch_s],
        "jax_over_torch_throughput": round(torch_med / jax_med, 3),
    }


def repo_config(name: str):
    """`get_config()` of `configs/<name>.py` beside this package, loaded by path: `from configs import ...` would
    find the folder only when the command runs from the repository root."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"dff_configs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def sasrec_config(overrides: dict | None = None):
    """configs/sasrec.py (the original SASRec setting) with the benchmark's display settings and `overrides`
    ({"model.arch": "microlens", ...})."""
    config = repo_config("sasrec")
    config.train.progress_bar = False
    config.train.log_every_steps = 10**9
    for key, value in (overrides or {}).items():
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[leaf] = value
    defaults.validate(config)
    return config


def bench_sasrec(
    steps: int = 20,
    rounds: int = 3,
    torch_compare: bool = True,
    overrides: dict | None = None,
    shape: dict | None = None,
) -> dict:
    """`--preset sasrec`: the original SASRec setting (configs/sasrec.py) at the held-out benchmark's shapes
    (SASREC_SHAPE, random data through the real reader and split), JAX against the PyTorch port side by side.

    Measured in one process: the step (rounds of `steps` steps rounded up to whole calls of the config's
    `train.steps_per_call`, alternating JAX and PyTorch, medians), one whole training epoch each (JAX through
    `train.train_epoch`: a first epoch, which also compiles the epoch's shorter last call, then the timed one;
    PyTorch over the same `data.train_batches`), and one validation of every validation user each (full ranking plus
    sampled-100; JAX through `evaluate.evaluate`, timed after a first call that compiles and draws the negatives,
    PyTorch through `bench_torch.torch_evaluate` on the same negatives). CPU seconds of this process (`*_cpu_s`)
    and the load average are printed beside the wall times: on a shared machine they say how much of a wall time
    was other processes'.
    """
    config = sasrec_config(overrides)
    t = time.perf_counter()
    shape = dict(shape or SASREC_SHAPE)
    dataset = sasrec_dataset(config, shape=shape)
    data_s = time.perf_counter() - t
    mesh = parallel.make_mesh(config.parallel)
    state, static, frozen = train_state.create_train_state(config, dataset, None, mesh)
    bs, length = config.train.batch_size, config.data.max_seq_len
    result = {
        "preset": "sasrec",
        "arch": config.model.arch,
        "shape": dict(
            shape,
            eval_users=int(dataset.stats["eval_users"]),
            avg_seq_len=round(float(dataset.stats["avg_seq_len"]), 2),
            embed_dim=config.model.embed_dim,
            batch_size=bs,
            max_seq_len=length,
        ),
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "param_count": static["param_count"],
        "data_s": round(data_s, 3),
    }
    # The trainer's step: `steps_per_call` steps per jitted call (configs/sasrec.py), so a round is whole calls.
    per_call = config.train.steps_per_call
    steps = per_call * -(-steps // per_call)
    step = train_state.jit_train_step(static, per_call)
    rng = jax.random.key(config.seed)
    batches = list(data_lib.train_batches(dataset, bs, length, config.seed, 1))
    gb = [parallel.global_batch(b, mesh) for b in batches[: max(2, steps)]]

    def call(state, first):
        group = [gb[(first + j) % len(gb)] for j in range(per_call)]
        return step(state, frozen, group[0] if per_call == 1 else tuple(group), rng)

    torch_step = None
    if torch_compare:
        try:
            import torch

            from dff_jax import bench_torch as port

            torch_step = port.torch_step_for_run(static, state, frozen, config)
        except ImportError:
            torch_step = None
    t = time.perf_counter()
    state, m = call(state, 0)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t

    def jax_round():
        nonlocal state
        for i in range(0, steps, per_call):
            state, _ = call(state, i)
        jax.block_until_ready(state)

    def torch_round():
        for i in range(steps):
            torch_step(batches[i % len(batches)])

    jax_s, torch_s = _alternate(jax_round, torch_round if torch_step is not None else None, rounds, steps)
    epochs = []
    for epoch in (1, 2):  # the first also compiles the epoch's shorter last call (when per_call does not divide it)
        t, cpu = time.perf_counter(), time.process_time()
        state = train.train_epoch(step, state, frozen, dataset, config, mesh, rng, epoch)
        jax.block_until_ready(state)
        epochs.append((time.perf_counter() - t, time.process_time() - cpu))
    jax_epoch = epochs[1][0]
    t = time.perf_counter()
    first = evaluate.evaluate(static, state["params"], frozen, dataset, "valid", config.eval, config.seed)
    jax_valid_first = time.perf_counter() - t
    t, cpu = time.perf_counter(), time.process_time()
    valid = evaluate.evaluate(static, state["params"], frozen, dataset, "valid", config.eval, config.seed)
    jax_valid, jax_valid_cpu = time.perf_counter() - t, time.process_time() - cpu
    assert valid == first, "validation must not depend on being run twice"
    result["jax"] = {
        "compile_s": round(compile_s, 3),
        "step_ms": round(1000 * float(np.median(jax_s)), 2),
        "step_ms_per_round": [round(1000 * x, 2) for x in jax_s],
        "steps_per_round": steps,
        "steps_per_call": per_call,
        "steps_per_epoch": len(batches),
        "epoch_first_s": round(epochs[0][0], 3),
        "epoch_s": round(jax_epoch, 3),
        "epoch_cpu_s": round(epochs[1][1], 3),
        "valid_first_s": round(jax_valid_first, 3),
        "valid_s": round(jax_valid, 3),
        "valid_cpu_s": round(jax_valid_cpu, 3),
        "valid": {k: round(v, 4) for k, v in valid.items() if isinstance(v, float)},
    }
    if torch_step is not None:
        t, cpu = time.perf_counter(), time.process_time()
        for b in data_lib.train_batches(dataset, bs, length, config.seed, 1):
            torch_step(b)
        torch_epoch, torch_epoch_cpu = time.perf_counter() - t, time.process_time() - cpu
        ev = dataset.valid
        negatives = metrics.sample_negatives(
            ev["targets"],
            np.concatenate([ev["history"], ev["targets"][:, None]], axis=1),
            dataset.num_items,
            num_negatives=config.eval.sampled_negatives,
            rng=np.random.default_rng(config.seed),
        )
        t = time.perf_counter()
        r = port.torch_evaluate(
            torch_step.model,
            dataset,
            "valid",
            batch_size=config.eval.batch_size,
            negatives=negatives,
        )
        torch_valid = time.perf_counter() - t
        tv = metrics.metrics_from_ranks(r["ranks"], config.eval.ks)
        tv.update(metrics.metrics_from_ranks(r["sampled_ranks"], config.eval.ks, sampled_negatives=100))
        torch_med, jax_med = float(np.median(torch_s)), float(np.median(jax_s))
        result["torch_eager"] = {
            "threads": torch.get_num_threads(),
            "step_ms": round(1000 * torch_med, 2),
            "step_ms_per_round": [round(1000 * x, 2) for x in torch_s],
            "epoch_s": round(torch_epoch, 3),
            "epoch_cpu_s": round(torch_epoch_cpu, 3),
            "valid_s": round(torch_valid, 3),
            "valid": {k: round(v, 4) for k, v in tv.items()},
        }
        result["jax_over_torch"] = {
            "step": round(torch_med / jax_med, 3),
            "epoch": round(torch_epoch / jax_epoch, 3),
            "valid": round(torch_valid / jax_valid, 3),
        }
    result["memory"] = memory()
    result["load_average_1min"] = round(os.getloadavg()[0], 2)  # other processes' load: the timings' conditions
    return result


def memory() -> dict:
    out = {"host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    stats = jax.devices()[0].memory_stats() if hasattr(jax.devices()[0], "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        out["device_peak_bytes"] = int(stats["peak_bytes_in_use"])
    return out


def run(
    preset: str, overrides: dict, steps: int, variant: str, torch_compare: bool, compute_dtype: str = "float32"
) -> dict:
    shape = dict(PRESETS[preset], **overrides)
    config = bench_config(shape, variant, compute_dtype=compute_dtype)
    dataset, state, static, frozen = make_run(config, shape)
    result = {
        "preset": preset,
        "variant": variant,
        "compute_dtype": compute_dtype,
        "shape": shape,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "devices": jax.device_count(),
        "mesh": dict(static["mesh"].shape),
        "param_count": static["param_count"],
    }
    result["train"], state = bench_train(config, dataset, state, static, frozen, steps)
    result["eval"] = bench_eval(config, dataset, state["params"], static, frozen)
    if torch_compare and compute_dtype == "float32":  # the PyTorch port runs in float32: compare like with like
        t = bench_torch(config, dataset, state, static, frozen, steps)
        if t is not None:
            result["torch_eager"] = t
            result["jax_over_torch_throughput"] = t["jax_over_torch_throughput"]
    result["memory"] = memory()
    return result


# The runs of `--all`: (name, variant, compute dtype), in the order they run.
ALL_RUNS = (("dff_float32", "dff", "float32"), ("dff_bfloat16", "dff", "bfloat16"), ("id_float32", "id", "float32"))


def run_all(preset: str, overrides: dict, steps: int) -> dict:
    """`--all`: DFF float32, DFF bfloat16 and ID-only (ALL_RUNS) at one preset's shapes in one process, one JSON.

    Sized for a single GPU session (docs/benchmarks.md): the random data and the feature table (all layers, which
    DFF reads) are drawn once and shared, each run builds its state with `make_run`, times the step, one epoch and
    the evaluation (`bench_train`, `bench_eval`), and frees it before the next. No PyTorch comparison. Device peak
    memory is the process's peak so far, so it is reported per run in run order.
    """
    import gc

    start = time.perf_counter()
    shape = dict(PRESETS[preset], **overrides)
    t = time.perf_counter()
    dataset = random_dataset(shape["num_users"], shape["num_items"], shape["max_seq_len"], 0)
    table = random_table(shape["num_items"], shape["layers"], shape["hidden"], 1)
    result = {
        "preset": preset,
        "shape": shape,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "devices": jax.device_count(),
        "random_data_s": round(time.perf_counter() - t, 3),
        "runs": {},
    }
    for name, variant, compute_dtype in ALL_RUNS:
        t = time.perf_counter()
        config = bench_config(shape, variant, compute_dtype=compute_dtype)
        dataset, state, static, frozen = make_run(config, shape, dataset=dataset, table=table)
        run_result = {"variant": variant, "compute_dtype": compute_dtype, "param_count": static["param_count"]}
        run_result["build_s"] = round(time.perf_counter() - t, 3)
        run_result["train"], state = bench_train(config, dataset, state, static, frozen, steps)
        run_result["eval"] = bench_eval(config, dataset, state["params"], static, frozen)
        run_result["memory"] = memory()
        run_result["run_s"] = round(time.perf_counter() - t, 3)
        result["runs"][name] = run_result
        del state, static, frozen
        gc.collect()
    result["total_s"] = round(time.perf_counter() - start, 3)
    return result


# ------------------------------------------------------------------------------------------------- feature load


def _write_bench_features(directory: Path, num_items: int, layers: int, hidden: int, dtype: str, shards: int) -> None:
    """Writes a feature folder of the given shape with constant memory (a few distinct arrays, reused)."""
    rng = np.random.default_rng(0)
    np_dtype = records.numpy_dtype(dtype)
    pool = [rng.standard_normal((layers, hidden), np.float32).astype(np_dtype).tobytes() for _ in range(8)]
    per_shard = -(-num_items // shards)
    for s in range(shards):
        with records.ShardWriter(directory / f"bench-{s:05d}-of-{shards:05d}{records.SHARD_SUFFIX}") as w:
            for i in range(s * per_shard, min(num_items, (s + 1) * per_shard)):
                w.write_bytes(str(i), pool[i % len(pool)], dtype, (layers, hidden))
    _write_bench_schema(directory, "bench", num_items, layers, hidden, dtype)


def _write_bench_schema(directory: Path, model: str, num_items: int, layers: int, hidden: int, dtype: str) -> None:
    schema = records.Schema(
        model=model,
        layers=layers,
        hidden_size=hidden,
        dtype=dtype,
        pooling="none",
        prompt="",
        modality="none",
        num_frames=0,
        extractor_version="dff_jax.bench",
        num_items=num_items,
        # As extract.merge writes it, so the load measured is the one that checks every shard against it.
        extra={records.SHARD_DIGESTS: {p.name: records.shard_digest(p) for p in records.shard_files(directory)}},
    )
    records.write_schema(directory, schema)


def _peak_rss_bytes() -> int:
    """This process's peak resident set size (VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


def _bench_child(directory: str, num_items: int) -> None:
    """Runs in a fresh process: loads the folder and prints time and peak RSS as JSON."""
    item_ids = [""] + [str(i) for i in range(num_items)]
    baseline = _peak_rss_bytes()
    start = time.perf_counter()
    loaded = features.load_features(directory, item_ids)
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "seconds": seconds,
                "peak_rss_bytes": _peak_rss_bytes(),
                "baseline_rss_bytes": baseline,
                "table_bytes": int(loaded.table.nbytes),
            }
        )
    )


def bench_feature_load(
    num_items: int = 19738,
    layers: int = 33,
    hidden: int = 4096,
    dtype: str = "bfloat16",
    tmpdir: str | None = None,
    shards: int = 8,
) -> dict:
    """Measures loading a feature folder of the given shape: time and peak memory.

    Writes the folder (streaming, constant memory) into a temporary directory under `tmpdir`, loads it in a
    fresh Python process (so the writer's memory does not count) and deletes it. The files are freshly
    written, so the load reads from a warm page cache.

    Returns:
      {"table_bytes", "peak_rss_bytes", "baseline_rss_bytes", "ratio" (peak RSS / table bytes), "seconds",
       "items_per_s", "MB_per_s", "shape", "dtype"}.
    """
    itemsize = records.numpy_dtype(dtype).itemsize
    needed = num_items * layers * hidden * itemsize
    parent = Path(tmpdir or tempfile.gettempdir())
    free = shutil.disk_usage(parent).free
    if free < 2 * needed:
        raise RuntimeError(
            f"{parent}: {free / 1e9:.1f} GB free, the benchmark needs {2 * needed / 1e9:.1f} GB "
            f"(twice the {needed / 1e9:.1f} GB it writes); pass tmpdir= on a larger disk or smaller sizes"
        )
    work = Path(tempfile.mkdtemp(prefix="dff_feature_bench_", dir=parent))
    try:
        _write_bench_features(work, num_items, layers, hidden, dtype, shards)
        code = f"from dff_jax.bench import _bench_child; _bench_child({str(work)!r}, {num_items})"
        repo_root = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo_root, os.environ.get("PYTHONPATH")])))
        out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            raise RuntimeError(f"benchmark child failed:\n{out.stderr}")
        child = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "shape": [num_items + 1, layers, hidden],
        "dtype": dtype,
        "table_bytes": child["table_bytes"],
        "peak_rss_bytes": child["peak_rss_bytes"],
        "baseline_rss_bytes": child["baseline_rss_bytes"],
        "ratio": child["peak_rss_bytes"] / child["table_bytes"],
        "seconds": child["seconds"],
        "items_per_s": num_items / child["seconds"],
        "MB_per_s": needed / 1e6 / child["seconds"],
    }


def _sharded_child(directory: str, num_items: int, model_axis: int, cache_dir: str) -> None:
    """Runs in a fresh process (device count set by the parent, maybe one of several processes): streams the folder
    into a table sharded over `model_axis` and prints JSON: time, peak RSS before (baseline: jax started, devices
    up, one jit run) and after, the bytes of this process's shards."""
    config = defaults.base_config().parallel
    parallel.initialize(config)
    import jax.numpy as jnp

    from dff_jax import feature_cache

    jax.jit(lambda x: x + 1)(jnp.zeros(4)).block_until_ready()
    baseline = _peak_rss_bytes()
    config.model_axis = model_axis
    mesh = parallel.make_mesh(config)
    schema = records.read_schema(directory)
    rows = list(range(schema.layers))
    shape = jax.ShapeDtypeStruct((num_items + 1, len(rows), schema.hidden_size), records.numpy_dtype(schema.dtype))
    sharding = parallel.state_shardings(shape, mesh, True, num_items=num_items)
    item_ids = [""] + [str(i) for i in range(num_items)]
    said = []
    start = time.perf_counter()
    table, _ = feature_cache.load(
        directory, item_ids, rows, sharding, standardize=True, cache_dir=cache_dir, say=said.append
    )
    table.block_until_ready()
    seconds = time.perf_counter() - start
    shards = feature_cache.shard_bytes(table)
    print(
        json.dumps(
            {
                "process": jax.process_index(),
                "built_cache": bool(said),
                "seconds": seconds,
                "peak_rss_bytes": _peak_rss_bytes(),
                "baseline_rss_bytes": baseline,
                "table_bytes": int(table.nbytes),
                "shard_bytes": shards,
                "shard_shapes": [list(s.data.shape) for s in table.addressable_shards],
                "spec": str(sharding.spec),
            }
        )
    )


def run_sharded_load(
    directory: str | os.PathLike,
    num_items: int,
    *,
    devices: int,
    model_axis: int,
    processes: int = 1,
    cache_dir: str = "",
) -> list[dict]:
    """`_sharded_child` in `processes` fresh processes of `devices` simulated CPU devices each (one job); their
    JSON lines, by process. A multi-process job uses a loopback coordinator."""
    import socket

    code = (
        f"from dff_jax.bench import _sharded_child; "
        f"_sharded_child({str(directory)!r}, {num_items}, {model_axis}, {str(cache_dir)!r})"
    )
    repo_root = str(Path(__file__).resolve().parents[1])
    # Not JAX_DISABLE_MOST_OPTIMIZATIONS (the tests' setting): without XLA's buffer assignment the in-place fill
    # copies each shard once, which is not what a run does.
    skip = ("JAX_COORDINATOR", "JAX_NUM_PROC", "JAX_PROC", "JAX_DISABLE_MOST_OPTIMIZATIONS")
    env = {k: v for k, v in os.environ.items() if not k.startswith(skip)}
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [repo_root, os.environ.get("PYTHONPATH")])),
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
    )
    if processes > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{s.getsockname()[1]}", JAX_NUM_PROCESSES=str(processes))
    children = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env=dict(env, JAX_PROCESS_ID=str(i)) if processes > 1 else env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(processes)
    ]
    outs = [child.communicate(timeout=1800) for child in children]
    for child, (_, err) in zip(children, outs):
        if child.returncode != 0:
            raise RuntimeError(f"benchmark child failed:\n{err}")
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]


def bench_sharded_load(
    num_items: int,
    layers: int,
    hidden: int,
    dtype: str = "bfloat16",
    tmpdir: str | None = None,
    shards: int = 8,
    setups: tuple = ((1, 1, 1), (4, 4, 1), (2, 2, 2)),
) -> dict:
    """Streamed, sharded placement (dff_jax/feature_cache.py) for each (devices per process, model_axis, processes)
    of `setups`: the first load builds the cache, a second one (a restart) reads it; peak RSS, baseline RSS and
    the bytes of each process's shards for both. `overhead` = (peak - baseline - own shards) / table bytes: what a
    process holds beyond its devices' shards (on simulated CPU devices the shards themselves are host RAM)."""
    itemsize = records.numpy_dtype(dtype).itemsize
    needed = (num_items + 1) * layers * hidden * itemsize
    parent = Path(tmpdir or tempfile.gettempdir())
    free = shutil.disk_usage(parent).free
    if free < 3 * needed:
        raise RuntimeError(
            f"{parent}: {free / 1e9:.1f} GB free, the benchmark needs {3 * needed / 1e9:.1f} GB (records + cache); "
            "pass tmpdir= on a larger disk or smaller sizes"
        )
    work = Path(tempfile.mkdtemp(prefix="dff_sharded_bench_", dir=parent))
    out = {"shape": [num_items + 1, layers, hidden], "dtype": dtype, "table_bytes": needed, "setups": []}
    try:
        (work / "features").mkdir()
        _write_bench_features(work / "features", num_items, layers, hidden, dtype, shards)
        for devices, model_axis, processes in setups:
            cache = work / f"cache-{devices}x{model_axis}x{processes}"
            for what in ("build", "restart"):
                children = run_sharded_load(
                    work / "features",
                    num_items,
                    devices=devices,
                    model_axis=model_axis,
                    processes=processes,
                    cache_dir=str(cache),
                )
                for child in children:
                    extra = child["peak_rss_bytes"] - child["baseline_rss_bytes"] - sum(child["shard_bytes"])
                    child["overhead"] = round(extra / needed, 4)
                out["setups"].append(
                    {
                        "devices": devices,
                        "model_axis": model_axis,
                        "processes": processes,
                        "load": what,
                        "processes_out": children,
                    }
                )
            shutil.rmtree(cache, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def write_catalogue(out: str | os.PathLike, num_items: int, num_users: int, layers: int, hidden: int) -> dict:
    """A dataset whose index holds every one of `num_items` items, for the catalogue-scale run (docs/benchmarks.md).

    `out/pairs.tsv` (microlens_tsv): a random permutation of the items dealt over `num_users` users (so each item is
    interacted with once and the index has all of them; train with `data.window=0` to keep every interaction), and
    `out/features/`: one record per item, `[layers, hidden]` bf16 standard-normal values, written in chunks (memory
    stays at one chunk). Nothing here is meant to be learnable; it measures memory and time at scale.
    """
    out = Path(out)
    (out / "features").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    order = rng.permutation(num_items) + 1
    with open(out / "pairs.tsv.tmp", "w") as f:
        f.writelines(
            f"u{user}\t" + " ".join(f"i{i}" for i in items) + "\n"
            for user, items in enumerate(np.array_split(order, num_users))
        )
    os.replace(out / "pairs.tsv.tmp", out / "pairs.tsv")
    bf16 = records.numpy_dtype("bfloat16")
    shards, chunk = 8, 8192
    per_shard = -(-num_items // shards)
    for s in range(shards):
        with records.ShardWriter(out / "features" / f"items-{s:05d}-of-{shards:05d}{records.SHARD_SUFFIX}") as w:
            for lo in range(s * per_shard, min(num_items, (s + 1) * per_shard), chunk):
                hi = min(lo + chunk, (s + 1) * per_shard, num_items)
                values = rng.standard_normal((hi - lo, layers, hidden), np.float32).astype(bf16)
                for i in range(lo, hi):
                    w.write_bytes(f"i{i + 1}", values[i - lo].tobytes(), "bfloat16", (layers, hidden))
    _write_bench_schema(out / "features", "catalogue", num_items, layers, hidden, "bfloat16")
    return {"items": num_items, "users": num_users, "out": str(out)}


def catalogue_config(out: str | os.PathLike, devices: int, model_axis: int):
    """The DFF config of the catalogue-scale run on `write_catalogue`'s folder: the synthetic preset's model (d = 64),
    one epoch, every interaction kept, the item tables sharded over `model_axis` of `devices` simulated CPU devices."""
    c = repo_config("synthetic")
    c.data.dir, c.data.interactions, c.data.generate, c.data.window = str(out), "pairs.tsv", "", 0
    c.features.dir = str(Path(out) / "features")
    c.train.num_epochs, c.train.batch_size, c.train.progress_bar = 1, 256, False
    c.eval.batch_size = 1024
    c.parallel.cpu_devices, c.parallel.model_axis, c.parallel.shard_items = devices, model_axis, True
    return c


def _device_bytes() -> dict:
    """Bytes of all live jax arrays per device (the persistent footprint: state, frozen table, item tables)."""
    out: dict[str, int] = {}
    seen = set()  # a global array's shards are live arrays of their own too: count each buffer once
    for array in jax.live_arrays():
        for shard in array.addressable_shards:
            key = (str(shard.device), shard.data.unsafe_buffer_pointer())
            if key not in seen:
                seen.add(key)
                out[str(shard.device)] = out.get(str(shard.device), 0) + int(shard.data.nbytes)
    return out


def bench_catalogue(config) -> dict:
    """Loads (building the feature cache on the first run), trains one epoch and evaluates the test split by full
    ranking, in this process; per phase: seconds, host RSS after it, peak RSS so far, live bytes per device."""
    parallel.initialize(config.parallel)
    phases = {}
    start = time.perf_counter()

    def phase(name: str, began: float) -> None:
        rss = {k: v for k, v in _proc_status().items() if k in ("VmRSS", "VmHWM")}
        per_device = _device_bytes()
        phases[name] = {
            "seconds": round(time.perf_counter() - began, 2),
            "rss_bytes": rss["VmRSS"],
            "peak_rss_bytes": rss["VmHWM"],
            "device_bytes_max": max(per_device.values(), default=0),
            "device_bytes_min": min(per_device.values(), default=0),
        }

    phase("start", start)
    t = time.perf_counter()
    dataset, state, static, frozen = train_state.build_run(config)
    phase("load", t)
    step = train_state.jit_train_step(static)
    batch = parallel.global_batch(
        next(data_lib.train_batches(dataset, config.train.batch_size, config.data.max_seq_len, 0, 1)), static["mesh"]
    )
    compiled = step.lower(state, frozen, batch, jax.random.key(0)).compile().memory_analysis()
    t = time.perf_counter()
    state = train.train_epoch(step, state, frozen, dataset, config, static["mesh"], jax.random.key(config.seed), 1)
    jax.block_until_ready(state)
    phase("train_epoch", t)
    items = evaluate.item_table.lower(
        state["params"],
        frozen["features"],
        graphdef=static["graphdef"],
        sharding=static["ranking_sharding"],
        chunk_size=config.eval.chunk_size,
    ).compile()
    items = items.memory_analysis()
    t = time.perf_counter()
    result = evaluate.evaluate(static, state["params"], frozen, dataset, "test", config.eval, config.seed)
    phase("evaluate_test", t)
    return {
        "items": dataset.num_items,
        "users": len(dataset.test["targets"]),
        "mesh": dict(static["mesh"].shape),
        "devices": jax.device_count(),
        "features": static.get("features", {}).get("rows"),
        "init_bytes_per_device": static["init_bytes_per_device"],
        "train_step_temp_bytes_per_device": int(compiled.temp_size_in_bytes) if compiled else None,
        "item_table_temp_bytes_per_device": int(items.temp_size_in_bytes) if items else None,
        "phases": phases,
        "test": {k: v for k, v in result.items() if k.startswith(("HR", "NDCG"))},
        "total_s": round(time.perf_counter() - start, 2),
    }


def _proc_status() -> dict:
    with open("/proc/self/status") as f:
        return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.startswith("Vm")}


# The arguments each mode reads (beyond --what and --preset); any other given explicitly would be silently ignored.
USED_ARGUMENTS = {
    "catalogue": {"out", "items", "users", "layers", "hidden", "devices", "model_axis"},
    "features": {"items", "layers", "hidden", "dtype", "tmpdir", "sharded"},
    "sasrec": {"steps", "no_torch"},
    "train": {"variant", "steps", "shape", "no_torch", "all", "compute_dtype"},
}


def check_used_arguments(p: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str] | None) -> None:
    """Refuses an argument given on the command line that the chosen mode does not read (USED_ARGUMENTS)."""
    mode = args.what if args.what != "train" else ("sasrec" if args.preset == "sasrec" else "train")
    # Only the flags themselves: a value such as `--shape layers=33` is not the flag --layers.
    given = {a[2:].split("=")[0].replace("-", "_") for a in (sys.argv[1:] if argv is None else argv) if a[:2] == "--"}
    # --no-torch is accepted everywhere: scripts pass it to every mode, and it only ever skips work
    options = {action.dest for action in p._actions if action.option_strings} - {"help", "what", "preset", "no_torch"}
    ignored = sorted((given & options) - USED_ARGUMENTS[mode])
    if ignored:
        shown = "--preset sasrec" if mode == "sasrec" else f"--what {args.what}"
        p.error(f"{shown} does not use {', '.join('--' + a.replace('_', '-') for a in ignored)}")


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    p = OneLineArgumentParser(prog="python -m dff_jax.bench", description=__doc__.split("\n")[0])
    p.add_argument("--what", choices=["train", "features", "catalogue"], default="train")
    p.add_argument("--preset", choices=sorted(PRESETS) + ["sasrec"], default="cpu")
    p.add_argument("--variant", default="dff", help="model variant (configs: id, replace, fusion_last, ..., dff)")
    p.add_argument("--steps", type=int, default=20, help="timed train steps")
    p.add_argument("--shape", action="append", default=[], metavar="KEY=INT", help="override a preset shape field")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch eager comparison")
    p.add_argument(
        "--all",
        action="store_true",
        help="DFF float32, DFF bfloat16 and ID at the preset's shapes, one JSON (GPU check)",
    )
    p.add_argument(
        "--compute-dtype", choices=["float32", "bfloat16"], default="float32", help="train.compute_dtype of the step"
    )
    p.add_argument("--items", type=int, default=19738, help="--what features: items of the feature folder")
    p.add_argument("--layers", type=int, default=33, help="--what features: stored layers per item")
    p.add_argument("--hidden", type=int, default=4096, help="--what features: hidden size")
    p.add_argument("--dtype", default="bfloat16", choices=records.DTYPES, help="--what features: stored dtype")
    p.add_argument("--tmpdir", default=None, help="--what features: where to write the temporary feature folder")
    p.add_argument("--out", default="", help="--what catalogue: folder to write the catalogue-scale dataset into")
    p.add_argument("--users", type=int, default=2000, help="--what catalogue: users the items are dealt over")
    p.add_argument("--devices", type=int, default=4, help="--what catalogue: simulated CPU devices")
    p.add_argument("--model-axis", type=int, default=4, help="--what catalogue: config.parallel.model_axis")
    p.add_argument(
        "--sharded",
        action="store_true",
        help="--what features: the streamed sharded placement on 1 device, 4 devices (model_axis=4) and 2 processes x 2 "
        "devices, first load (builds the cache) and restart",
    )
    args = p.parse_args(argv)
    for name in ("steps", "items", "layers", "hidden", "users", "devices", "model_axis"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: expected an integer >= 1")
    check_used_arguments(p, args, argv)
    if args.what == "catalogue":
        if not args.out:
            p.error("--what catalogue needs --out DIR")
        if args.devices % args.model_axis:  # before a catalogue-sized dataset is written
            p.error(f"--devices {args.devices}: expected a multiple of --model-axis {args.model_axis}")
        if not (Path(args.out) / "pairs.tsv").is_file():
            print(json.dumps(write_catalogue(args.out, args.items, args.users, args.layers, args.hidden)))
        else:  # measured as it is: it must be the catalogue asked for (another was measured silently)
            schema = records.read_schema(Path(args.out) / "features")
            with open(Path(args.out) / "pairs.tsv", "rb") as f:
                users = sum(1 for _ in f)
            held = {"items": schema.num_items, "users": users, "layers": schema.layers, "hidden": schema.hidden_size}
            asked = {k: getattr(args, k) for k in held}
            if held != asked:
                p.error(
                    f"--out {args.out} holds a catalogue of {held}, not {asked}: use another --out (or delete it to "
                    "write this one)"
                )
        config = catalogue_config(args.out, args.devices, args.model_axis)
        print(json.dumps(bench_catalogue(config), indent=2))
        return
    if args.what == "features":
        if args.sharded:
            result = bench_sharded_load(args.items, args.layers, args.hidden, args.dtype, tmpdir=args.tmpdir)
        else:
            result = bench_feature_load(args.items, args.layers, args.hidden, args.dtype, tmpdir=args.tmpdir)
        print(json.dumps(result, indent=2))
        return
    if args.preset == "sasrec":
        print(json.dumps(bench_sasrec(args.steps, torch_compare=not args.no_torch), indent=2))
        return
    overrides = {}
    for kv in args.shape:
        key, _, value = kv.partition("=")
        if key not in PRESETS["cpu"] or not value.isdigit() or int(value) < 1:
            p.error(f"--shape {kv}: expected KEY=INT with KEY one of {sorted(PRESETS['cpu'])}")
        overrides[key] = int(value)
    if args.all:
        print(json.dumps(run_all(args.preset, overrides, args.steps), indent=2))
        return
    result = run(args.preset, overrides, args.steps, args.variant, not args.no_torch, args.compute_dtype)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Throughput and memory benchmark at given shapes; prints JSON.

  python -m dff_jax.bench --preset cpu          # CPU-sized shapes (also times the PyTorch eager port)
  python -m dff_jax.bench --preset microlens    # MicroLens-100k shapes: 100,000 users, 19,738 items, 33 x 4096 bf16
  python -m dff_jax.bench --preset microlens --compute-dtype bfloat16   # the same step in bf16 compute
  python -m dff_jax.bench --preset cpu --set embed_dim=256 --set batch_size=512
  python -m dff_jax.bench --what features       # feature-table load: peak RSS vs table size (dff_jax.features)
  python -m dff_jax.bench --what scaling        # strong/weak scaling on simulated CPU devices (dff_jax.bench_scaling)

Everything is measured in one process, side by side, on random data of the given shapes (no files): the jitted
train step (sequences/s, compile time), one whole epoch, full-ranking evaluation of every user against the bare
user-by-item score matmul at the same shapes, host peak RSS and (on GPU) device peak memory. At the CPU preset the
PyTorch eager port of the same model and loss (tests/torch_sasrec.py) is timed on the same batches.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dff_jax import data as data_lib
from dff_jax import defaults, metrics, parallel
from dff_jax import train as train_lib

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


class _Table:
    def __init__(self, table):
        self.table = table


def make_trainer(
    shape: dict, variant: str = "dff", loss: str = "inbatch_logq", seed: int = 0, compute_dtype: str = "float32"
):
    config = defaults.apply_variant(defaults.base_config(), variant)
    config.model.embed_dim = shape["embed_dim"]
    config.model.max_seq_len = shape["max_seq_len"]
    config.model.gate_hidden = min(256, shape["embed_dim"])
    config.data.max_seq_len = shape["max_seq_len"]
    config.train.batch_size = shape["batch_size"]
    config.eval.batch_size = shape["batch_size"]
    config.loss.name = loss
    config.train.compute_dtype = compute_dtype
    config.train.progress_bar = False
    config.train.log_every_steps = 10**9
    dataset = random_dataset(shape["num_users"], shape["num_items"], shape["max_seq_len"], seed)
    table = None
    if variant != "id":
        import ml_dtypes

        rng = np.random.default_rng(seed + 1)
        n, L, H = shape["num_items"] + 1, shape["layers"], shape["hidden"]
        table = np.empty((n, L, H), ml_dtypes.bfloat16)
        for start in range(0, n, 1024):  # fill in chunks: never a float32 copy of the whole table
            block = rng.standard_normal((min(1024, n - start), L, H), dtype=np.float32)
            table[start : start + len(block)] = block.astype(ml_dtypes.bfloat16)
        table[0] = 0
    mesh = parallel.make_mesh(config.parallel)
    model_cfg = config.model
    if table is not None:
        model_cfg = config.model.copy_and_resolve_references()
        model_cfg.update(train_lib.feature_rows(config.model, shape["layers"])[1])
    return train_lib.Trainer(config, dataset, None if table is None else _Table(table), model_cfg, mesh)


def _timed(fn, repeats: int) -> float:
    """Best of `repeats` wall times of fn() (fn must block until its result is ready)."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_train(trainer, steps: int) -> dict:
    """Jitted train-step throughput and one whole epoch."""
    cfg, ds = trainer.config, trainer.dataset
    batches = list(data_lib.train_batches(ds, cfg.train.batch_size, cfg.data.max_seq_len, 0, 1))
    rng = jax.random.key(0)
    state = trainer.init_state()
    gb = [parallel.global_batch(b, trainer.mesh) for b in batches[: max(2, steps)]]
    t = time.perf_counter()
    state, m = trainer.train_step(state, gb[0], rng)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(steps):
        state, m = trainer.train_step(state, gb[i % len(gb)], rng)
    jax.block_until_ready(state)
    step_s = (time.perf_counter() - t) / steps
    t = time.perf_counter()
    state = train_lib.run_epoch(trainer, state, rng, 1, len(batches), None)
    jax.block_until_ready(state)
    epoch_s = time.perf_counter() - t
    return {
        "compile_s": round(compile_s, 3),
        "step_ms": round(1000 * step_s, 3),
        "sequences_per_s": round(cfg.train.batch_size / step_s, 1),
        "steps_per_epoch": len(batches),
        "epoch_s": round(epoch_s, 3),
        "final_loss": float(m["loss"]),
    }, state


def bench_eval(trainer, params, repeats: int = 3) -> dict:
    """Full-ranking evaluation of every test user vs the bare user x item score matmul over the same batches."""
    cfg, ds = trainer.config, trainer.dataset
    item_emb = trainer._item_table(params, trainer.consts)
    batches = [parallel.global_batch(b, trainer.mesh) for b in data_lib.eval_batches(ds, "test", cfg.eval.batch_size)]
    user_fn = jax.jit(lambda p, c, x: trainer.model(p, c).user_embeddings(x).astype(jnp.float32))
    users = [user_fn(params, trainer.consts, b["inputs"]) for b in batches]
    e = cfg.eval
    rank_fn = jax.jit(
        lambda u, it, t, h: metrics.target_ranks(u, it, t, h, mask_history=e.mask_history, chunk_size=e.chunk_size)
    )
    matmul_fn = jax.jit(lambda u, it: u @ it.T)

    def ranking():
        jax.block_until_ready([rank_fn(u, item_emb, b["targets"], b["history"]) for u, b in zip(users, batches)])

    def matmul():
        jax.block_until_ready([matmul_fn(u, item_emb) for u in users])

    ranking(), matmul()  # compile
    rank_s, matmul_s = _timed(ranking, repeats), _timed(matmul, repeats)
    t = time.perf_counter()
    trainer.evaluate(params, "test")
    whole_s = time.perf_counter() - t
    return {
        "users": len(ds.test["targets"]),
        "ranking_s": round(rank_s, 6),  # microseconds: a tiny shape must not round to 0
        "bare_matmul_s": round(matmul_s, 6),
        "ranking_over_matmul": round(rank_s / matmul_s, 3),
        "whole_evaluate_s": round(whole_s, 3),
    }


def bench_torch(trainer, state, steps: int, rounds: int = 5) -> dict | None:
    """The jitted JAX step against the PyTorch eager port (tests/torch_sasrec.py): same batches, same starting
    weights, same loss. The two alternate in `rounds` rounds of `steps` steps each and the ratio is of the median
    round times, so a burst of load on a shared machine hits both rather than one."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return None
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    try:
        import torch_sasrec
    except ImportError:
        return None
    cfg, ds = trainer.config, trainer.dataset
    batches = list(data_lib.train_batches(ds, cfg.train.batch_size, cfg.data.max_seq_len, 0, 1))[: max(2, steps)]
    gb = [parallel.global_batch(b, trainer.mesh) for b in batches]
    step = torch_sasrec.torch_train_step_factory(trainer, cfg)
    rng = jax.random.key(0)
    t = time.perf_counter()
    step(batches[0])
    first_s = time.perf_counter() - t

    def jax_round():
        nonlocal state
        for i in range(steps):
            state, _ = trainer.train_step(state, gb[i % len(gb)], rng)
        jax.block_until_ready(state)

    def torch_round():
        for i in range(steps):
            step(batches[i % len(batches)])

    jax_round()  # warm (compiled already by bench_train; this settles caches)
    jax_s, torch_s = [], []
    for _ in range(rounds):
        jax_s.append(_timed(jax_round, 1) / steps)
        torch_s.append(_timed(torch_round, 1) / steps)
    jax_med, torch_med = float(np.median(jax_s)), float(np.median(torch_s))
    return {
        "first_step_s": round(first_s, 3),
        "step_ms": round(1000 * torch_med, 3),
        "sequences_per_s": round(cfg.train.batch_size / torch_med, 1),
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "jax_step_ms_per_round": [round(1000 * x, 2) for x in jax_s],
        "torch_step_ms_per_round": [round(1000 * x, 2) for x in torch_s],
        "jax_over_torch_throughput": round(torch_med / jax_med, 3),
    }


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
    trainer = make_trainer(shape, variant, compute_dtype=compute_dtype)
    result = {
        "preset": preset,
        "variant": variant,
        "compute_dtype": compute_dtype,
        "shape": shape,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "devices": jax.device_count(),
        "mesh": dict(trainer.mesh.shape),
        "param_count": trainer.param_count,
    }
    result["train"], state = bench_train(trainer, steps)
    result["eval"] = bench_eval(trainer, state["params"])
    if torch_compare and compute_dtype == "float32":  # the PyTorch port runs in float32: compare like with like
        t = bench_torch(trainer, state, steps)
        if t is not None:
            result["torch_eager"] = t
            result["jax_over_torch_throughput"] = t["jax_over_torch_throughput"]
    result["memory"] = memory()
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--what", choices=["train", "features", "scaling"], default="train")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--variant", default="dff", help="model variant (configs: id, replace, fusion_last, ..., dff)")
    p.add_argument("--steps", type=int, default=20, help="timed train steps")
    p.add_argument("--set", action="append", default=[], metavar="KEY=INT", help="override a preset shape field")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch eager comparison")
    p.add_argument(
        "--compute-dtype", choices=["float32", "bfloat16"], default="float32", help="train.compute_dtype of the step"
    )
    args = p.parse_args(argv)
    if args.what == "features":
        from dff_jax import features

        print(json.dumps(features.bench_feature_load(), indent=2))
        return
    if args.what == "scaling":
        from dff_jax import bench_scaling

        print(json.dumps(bench_scaling.bench_scaling(), indent=2))
        return
    overrides = {}
    for kv in args.set:
        key, _, value = kv.partition("=")
        if key not in PRESETS["cpu"] or not value.isdigit():
            p.error(f"--set {kv}: expected KEY=INT with KEY one of {sorted(PRESETS['cpu'])}")
        overrides[key] = int(value)
    result = run(args.preset, overrides, args.steps, args.variant, not args.no_torch, args.compute_dtype)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

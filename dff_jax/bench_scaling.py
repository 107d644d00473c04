"""Strong and weak scaling of the jitted train step over 1, 2, 4, 8 devices; prints JSON.

  python -m dff_jax.bench_scaling                       # simulated CPU devices (or the GPUs when there are some)
  python -m dff_jax.bench_scaling --platform cpu --devices 1,2,4,8 --model-axis 2 --shard-items

Every device count runs in its own subprocess (jax fixes the device count at start-up) with the same model, data
and seed. Strong scaling keeps the global batch fixed (ideal: step time / n); weak scaling keeps the per-device
batch fixed (ideal: constant step time). Simulated CPU devices share the same cores, so on CPU the figures check
that the sharded mechanism runs and what it costs, not speed; real speed-ups need GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

# Shapes for simulated CPU devices: small enough for 8 devices on 2 cores, large enough that a step is not all overhead.
CPU_SHAPE = {
    "num_users": 4096,
    "num_items": 2047,
    "layers": 4,
    "hidden": 64,
    "embed_dim": 64,
    "max_seq_len": 10,
}
# A single-GPU shape close to MicroLens-100k (33 x 4096 bf16 features, d = 1024), fewer users to keep set-up short.
GPU_SHAPE = {
    "num_users": 8192,
    "num_items": 19_739,
    "layers": 33,
    "hidden": 4096,
    "embed_dim": 1024,
    "max_seq_len": 10,
}


def _worker(args: dict) -> dict:
    """Runs in the subprocess: builds the run on `args['devices']` devices and times its train step."""
    import jax
    import numpy as np

    from dff_jax import bench, data, defaults, parallel, train_state

    parallel_cfg = defaults.base_config().parallel
    parallel_cfg.update(model_axis=args["model_axis"], shard_items=args["shard_items"], cpu_devices=args["cpu_devices"])
    parallel.initialize(parallel_cfg)
    if jax.device_count() != args["devices"]:
        raise RuntimeError(f"asked for {args['devices']} devices, jax sees {jax.device_count()}: {jax.devices()}")
    shape = args["shape"]
    results = []
    for mode, batch in (("strong", args["global_batch"]), ("weak", args["per_device_batch"] * args["devices"])):
        config = bench.bench_config(dict(shape, batch_size=batch))
        config.parallel.update(parallel_cfg)
        dataset, state, static, frozen = bench.make_run(config, dict(shape, batch_size=batch))
        mesh = static["mesh"]
        parallel.check_global_batch(batch, mesh)
        step = train_state.jit_train_step(static)
        batches = [
            parallel.global_batch(b, mesh)
            for _, b in zip(range(2), data.train_batches(dataset, batch, shape["max_seq_len"], 0, 1))
        ]
        rng = jax.random.key(0)
        t = time.perf_counter()
        state, m = step(state, frozen, batches[0], rng)
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t
        best = float("inf")
        for _ in range(args["repeats"]):
            t = time.perf_counter()
            for i in range(args["steps"]):
                state, m = step(state, frozen, batches[i % 2], rng)
            jax.block_until_ready(state)
            best = min(best, (time.perf_counter() - t) / args["steps"])
        loss = float(np.asarray(parallel.to_host(m["loss"])))
        results.append(
            {
                "mode": mode,
                **parallel.mesh_description(mesh),
                "global_batch": batch,
                "per_device_batch": batch // mesh.shape["data"],
                "compile_s": round(compile_s, 3),
                "step_ms": round(1000 * best, 3),
                "sequences_per_s": round(batch / best, 1),
                "final_loss": loss,
            }
        )
    return {"runs": results}


def _detect_gpus() -> int:
    """GPUs visible to jax, probed in a subprocess so this process never initialises a backend."""
    code = "import jax\ntry:\n print(len(jax.devices('gpu')))\nexcept RuntimeError:\n print(0)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=300)
    try:
        return int(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return 0


def bench_scaling(
    device_counts: tuple[int, ...] = (1, 2, 4, 8),
    *,
    platform: str = "auto",
    global_batch: int | None = None,
    per_device_batch: int | None = None,
    steps: int = 5,
    repeats: int = 2,
    model_axis: int = 1,
    shard_items: bool = False,
    shape: dict | None = None,
    timeout_s: int = 900,
) -> dict:
    """Strong- and weak-scaling figures of the train step, one subprocess per device count.

    Args:
      device_counts: device counts to run (on GPU, counts above the visible GPUs are skipped).
      platform: "cpu" (simulated host devices), "gpu", or "auto" (gpu when one is visible).
      global_batch: strong-scaling global batch (default 256 on CPU, 512 on GPU, the MicroLens batch).
      per_device_batch: weak-scaling batch per data-parallel device (default 32 on CPU, 512 on GPU).
      steps: timed steps per repeat (after one compile step); the best repeat is reported.
      repeats: timing repeats.
      model_axis: size of the "model" mesh axis (counts it does not divide are skipped).
      shard_items: shard the item tables over "model" (config.parallel.shard_items).
      shape: model/data shape (default CPU_SHAPE / GPU_SHAPE).
      timeout_s: per-subprocess limit.

    Returns:
      {"platform", "shape", "strong": [...], "weak": [...]}; each entry has devices, processes, mesh, batch sizes,
      step_ms, sequences_per_s, compile_s, and speedup / efficiency relative to the smallest device count.
    """
    if platform == "auto":
        platform = "gpu" if _detect_gpus() else "cpu"
    if platform not in ("cpu", "gpu"):
        raise ValueError(f"platform must be auto, cpu or gpu, got {platform!r}")
    on_gpu = platform == "gpu"
    shape = dict(shape or (GPU_SHAPE if on_gpu else CPU_SHAPE))
    global_batch = global_batch or (512 if on_gpu else 256)
    per_device_batch = per_device_batch or (512 if on_gpu else 32)
    counts = [n for n in device_counts if n % model_axis == 0 and global_batch % (n // model_axis) == 0]
    if on_gpu:
        available = _detect_gpus()
        counts = [n for n in counts if n <= available]
    if not counts:
        raise ValueError(f"no usable device count in {device_counts} (model_axis={model_axis}, batch={global_batch})")
    runs = []
    for n in counts:
        args = {
            "devices": n,
            "cpu_devices": 0 if on_gpu else n,
            "model_axis": model_axis,
            "shard_items": shard_items,
            "global_batch": global_batch,
            "per_device_batch": per_device_batch,
            "steps": steps,
            "repeats": repeats,
            "shape": shape,
        }
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROC", "JAX_PROC"))}
        env.pop("XLA_FLAGS", None)
        if on_gpu:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(n))
        else:
            env["JAX_PLATFORMS"] = "cpu"
        proc = subprocess.run(
            [sys.executable, "-m", "dff_jax.bench_scaling", "--worker", json.dumps(args)],
            capture_output=True,
            text=True,
            env=env,
            check=False,
            timeout=timeout_s,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"scaling run on {n} {platform} device(s) failed:\n{proc.stderr[-4000:]}")
        runs.extend(json.loads(proc.stdout.strip().splitlines()[-1])["runs"])
    out: dict[str, Any] = {
        "platform": "gpu" if on_gpu else "cpu (simulated devices sharing the host's cores: mechanism, not speed)",
        "shape": shape,
        "steps": steps,
        "model_axis": model_axis,
        "shard_items": shard_items,
    }
    by_mode = {mode: [r for r in runs if r["mode"] == mode] for mode in ("strong", "weak")}
    for mode, rows in by_mode.items():
        base = rows[0]
        for r in rows:
            del r["mode"]
            ratio = base["step_ms"] / r["step_ms"]
            scale = r["devices"] / base["devices"]
            # strong: speedup of the same global batch; weak: step-time ratio at n x the batch (ideal 1.0)
            r["speedup"] = round(ratio, 3) if mode == "strong" else round(ratio * scale, 3)
            r["efficiency"] = round(ratio / scale, 3) if mode == "strong" else round(ratio, 3)
        out[mode] = rows
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--platform", choices=["auto", "cpu", "gpu"], default="auto")
    p.add_argument("--devices", default="1,2,4,8", help="comma-separated device counts")
    p.add_argument("--global-batch", type=int, default=None)
    p.add_argument("--per-device-batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--model-axis", type=int, default=1)
    p.add_argument("--shard-items", action="store_true")
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return
    result = bench_scaling(
        tuple(int(n) for n in args.devices.split(",")),
        platform=args.platform,
        global_batch=args.global_batch,
        per_device_batch=args.per_device_batch,
        steps=args.steps,
        model_axis=args.model_axis,
        shard_items=args.shard_items,
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

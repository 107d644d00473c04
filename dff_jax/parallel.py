"""One code path for 1 to many devices and hosts: process start-up, the mesh, shardings and global batches.

The trainer builds one `Mesh` with axes ("data", "model"). The global batch is split along "data"; parameters are
replicated, except, with `config.parallel.shard_items=True`, the arrays indexed by item (the item-ID table, its
optimizer moments and the frozen LVLM feature table), which are split along "model" so catalogues and feature tables
larger than one device fit. Everything runs under plain `jax.jit` with explicit shardings (GSPMD, `AxisType.Auto`):
no pmap, no shard_map in the model code.

Environment contract for hand-started processes (also what `launch/*.sh` export):
  JAX_COORDINATOR_ADDRESS  host:port of process 0 (jax itself reads this name too),
  JAX_NUM_PROCESSES        number of processes in the job,
  JAX_PROCESS_ID           this process's id in [0, JAX_NUM_PROCESSES).
jax 0.10 reads only JAX_COORDINATOR_ADDRESS (plus JAX_COORDINATOR_BIND_ADDRESS / JAX_LOCAL_DEVICE_IDS) by itself; the
two count/id names are ours. Under Slurm or Open MPI jax detects all three itself.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import logging
import os
import socket
import sys
import threading
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dff_jax.errors import ConfigError

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
DATA_AXIS = "data"
MODEL_AXIS = "model"
# Extra seconds past jax's own initialization_timeout before our watchdog ends the process: jax aborts (SIGABRT) a few
# seconds after its timeout with a terse C++ log; we exit first with a message that says what was missing.
_WATCHDOG_GRACE_S = 2

_log = logging.getLogger(__name__)


def _env_int(name: str, default: int) -> int:
    """An integer environment variable; a clear error naming the variable when it is not one."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} must be an integer") from None


def _distributed_args(cfg: Any) -> dict[str, Any] | None:
    """Decides whether this is a multi-process job and with which explicit arguments.

    Returns None for a single-process run, else keyword arguments for `jax.distributed.initialize` ({} = let jax
    auto-detect Slurm / Open MPI).
    """
    address = cfg.coordinator_address or os.environ.get(ENV_COORDINATOR, "")
    num = int(cfg.num_processes or 0) or _env_int(ENV_NUM_PROCESSES, 0)
    pid = int(cfg.process_id)
    if pid < 0:
        pid = _env_int(ENV_PROCESS_ID, -1)
    explicit = bool(address) or num > 0 or pid >= 0
    if explicit:
        if num == 1:
            return None  # a one-process "job" needs no coordinator
        missing = [
            n
            for n, ok in (
                (f"coordinator_address / ${ENV_COORDINATOR}", bool(address)),
                (f"num_processes / ${ENV_NUM_PROCESSES}", num > 0),
                (f"process_id / ${ENV_PROCESS_ID}", pid >= 0),
            )
            if not ok
        ]
        if missing:
            raise ConfigError(
                "config.parallel: a multi-process run needs all of coordinator address, process count and process "
                f"id; missing: {', '.join(missing)} (set them in config.parallel.* or the environment)"
            )
        if not 0 <= pid < num:
            raise ConfigError(f"config.parallel: process_id={pid} must be in [0, num_processes={num})")
        args = {"coordinator_address": address, "num_processes": num, "process_id": pid}
        host = address.rsplit(":", 1)[0]
        if host in ("127.0.0.1", "localhost", "[::1]"):
            # Loopback jobs: keep the coordinator off the other interfaces (jax binds [::]:port by default).
            args["coordinator_bind_address"] = address
        return args
    if "SLURM_STEP_NODELIST" in os.environ and _env_int("SLURM_NTASKS", 1) > 1:  # inside `srun`
        return {}
    if _env_int("OMPI_COMM_WORLD_SIZE", 1) > 1:
        if "OMPI_MCA_orte_hnp_uri" not in os.environ:  # jax reads the coordinator only from Open MPI 4's ORTE URI
            raise ConfigError(
                f"Open MPI job detected (OMPI_COMM_WORLD_SIZE={os.environ['OMPI_COMM_WORLD_SIZE']}) without "
                f"OMPI_MCA_orte_hnp_uri, so jax cannot find the coordinator: set ${ENV_COORDINATOR}=host:port, "
                f"${ENV_NUM_PROCESSES}=$OMPI_COMM_WORLD_SIZE and ${ENV_PROCESS_ID}=$OMPI_COMM_WORLD_RANK"
            )
        return {}
    return None


DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops=true"


def deterministic_gpu_ops() -> None:
    """Makes XLA's GPU kernels deterministic (`config.parallel.deterministic_ops`, docs/protocol.md section 11):
    scatter-adds (the embedding-table gradients) and reductions in a fixed order, and autotuning that picks the
    same kernels, so one seed gives the same bits run after run. XLA reads XLA_FLAGS when the first backend starts:
    a GPU backend already running without the flag is an error; on CPUs (deterministic anyway) it is a no-op."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_gpu_deterministic_ops" in flags:
        return
    if jax._src.xla_bridge.backends_are_initialized():
        if any(d.platform == "gpu" for d in jax.devices()):
            raise ConfigError(
                "config.parallel.deterministic_ops=True: jax is already running on the GPU without "
                f"{DETERMINISTIC_FLAG}; set XLA_FLAGS={DETERMINISTIC_FLAG} before the first jax operation"
            )
        return
    os.environ["XLA_FLAGS"] = f"{flags} {DETERMINISTIC_FLAG}".strip()


def check_coordinator_port(args: dict) -> None:
    """Process 0 runs the coordinator: a port already taken on this host made JAX's server crash the process
    (a segmentation fault), with its peers waiting out the timeout."""
    address = args.get("coordinator_address")
    if args.get("process_id") != 0 or not address or ":" not in address:
        return
    port = address.rsplit(":", 1)[1]
    if not port.isdigit():
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("0.0.0.0", int(port)))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"coordinator {address}: port {port} is already in use on this host (process 0 serves it); "
                    "pick a free port (launch/local.sh picks one itself)"
                ) from None


def check_processes_agree(what: str, value: str) -> None:
    """Every process of a job must run the same thing: the processes compare `value` (e.g. the run's identity) and
    their device counts, and all stop with one line when they differ. A seed given to one process only trained one
    model from two configs and recorded process 0's (silently other numbers); unequal device counts failed deep
    inside a collective with a traceback."""
    if jax.process_count() == 1:
        return
    per_process = collections.Counter(d.process_index for d in jax.devices())
    if len(set(per_process.values())) > 1:
        raise ConfigError(
            f"process {jax.process_index()}: the processes have different device counts "
            f"({dict(sorted(per_process.items()))} by process); every process needs the same "
            "(config.parallel.cpu_devices, or the accelerators each one sees)"
        )
    mine = np.frombuffer(hashlib.sha256(value.encode()).digest(), np.uint32)
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), -1)
    differ = [i for i in range(len(every)) if not np.array_equal(every[i], every[0])]
    if differ:
        raise ConfigError(
            f"process {jax.process_index()}: process(es) {differ} were given another {what} than process 0; every "
            "process of a job must get the same command line (config file, overrides and data)"
        )


def initialize(parallel_cfg: ml_collections.ConfigDict) -> None:
    """Sets up devices and, for multi-process jobs, joins the job. Call once, before any other jax use.

    Multi-process when config.parallel names a coordinator / process count / process id, or the environment has
    JAX_COORDINATOR_ADDRESS (+ JAX_NUM_PROCESSES, JAX_PROCESS_ID), or Slurm (SLURM_NTASKS > 1) or Open MPI
    (OMPI_COMM_WORLD_SIZE > 1) is detected. Idempotent. If a peer does not show up within
    `initialization_timeout` seconds the process exits with status 1 and a message naming the coordinator.

    Args:
      parallel_cfg: `config.parallel` (fields in `dff_jax.defaults.base_config`).

    Raises:
      ValueError: incomplete explicit multi-process settings, or cpu_devices requested after jax started.
    """
    if parallel_cfg.deterministic_ops:
        deterministic_gpu_ops()
    cpu_devices = int(parallel_cfg.cpu_devices or 0)
    if cpu_devices > 0 and jax.config.jax_num_cpu_devices != cpu_devices:
        if jax._src.xla_bridge.backends_are_initialized():
            raise ConfigError(
                f"config.parallel.cpu_devices={cpu_devices}: jax is already running with "
                f"{jax.local_device_count()} local device(s); cpu_devices must be set before the first jax operation"
            )
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    if jax.distributed.is_initialized():
        return
    args = _distributed_args(parallel_cfg)
    if args is None:
        return
    timeout = int(parallel_cfg.initialization_timeout)
    where = args.get("coordinator_address") or "the coordinator detected from Slurm / Open MPI"
    who = f"process {args['process_id']} of {args['num_processes']}" if args else "this process"
    print(f"dff_jax: {who} waiting for all processes at {where} (timeout {timeout} s)", file=sys.stderr, flush=True)
    done = threading.Event()

    def _watchdog() -> None:
        if not done.wait(timeout + _WATCHDOG_GRACE_S):
            print(
                f"error: dff_jax: {who}: distributed initialization did not complete within {timeout} s at {where}; "
                "a peer process is missing, crashed, or cannot reach the coordinator "
                "(check the coordinator address/port, process count and ids, firewalls)",
                file=sys.stderr,
                flush=True,
            )
            os._exit(1)  # jax is blocked inside C++ and would abort with SIGABRT; exit cleanly with our message

    check_coordinator_port(args)
    threading.Thread(target=_watchdog, name="dff_jax-init-watchdog", daemon=True).start()
    try:
        jax.distributed.initialize(initialization_timeout=timeout, **args)
    finally:
        done.set()
    _log.info(
        "joined %d processes; %d local / %d global devices",
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def make_mesh(parallel_cfg: ml_collections.ConfigDict, devices: list | None = None) -> Mesh:
    """Builds the ("data", "model") mesh over all devices of all processes.

    Devices are ordered by (process, id) so each process owns a contiguous block of the "data" axis (it then feeds
    contiguous batch rows) and the "model" axis stays inside one host whenever model_axis divides the local count.

    Args:
      parallel_cfg: `config.parallel`; uses `model_axis`.
      devices: devices to use (default `jax.devices()`), e.g. one device for a reference run.

    Raises:
      ConfigError: the device count is not a multiple of model_axis.
    """
    model = int(parallel_cfg.model_axis)
    devs = sorted(devices if devices is not None else jax.devices(), key=lambda d: (d.process_index, d.id))
    if model < 1 or len(devs) % model:
        raise ConfigError(
            f"config.parallel.model_axis={model} must be >= 1 and divide the device count {len(devs)} "
            f"({jax.process_count()} process(es) x {len(devs) // max(jax.process_count(), 1)} device(s))"
        )
    local = len(devs) // max(jax.process_count(), 1)
    if jax.process_count() > 1 and local % model:
        # Each process feeds an even, disjoint slice of every batch (data.train_batches' process slices); a model
        # axis spanning processes would need identical rows on several processes.
        raise ConfigError(
            f"config.parallel.model_axis={model} must divide the {local} devices of each process so the model axis "
            "stays inside one host"
        )
    grid = np.array(devs, dtype=object).reshape(len(devs) // model, model)
    return Mesh(grid, (DATA_AXIS, MODEL_AXIS), axis_types=(AxisType.Auto, AxisType.Auto))


def check_global_batch(batch_size: int, mesh: Mesh) -> None:
    """Raises a clear ValueError unless the global batch splits evenly over the "data" axis."""
    data = mesh.shape[DATA_AXIS]
    if batch_size <= 0 or batch_size % data:
        raise ConfigError(
            f"batch size {batch_size} (global, over all processes) must be a positive multiple of the data-parallel "
            f"size {data} (= {mesh.size} devices / model_axis {mesh.shape[MODEL_AXIS]}); "
            f"e.g. use {max(data, (batch_size // data) * data)} or {(batch_size // data + 1) * data}"
        )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a batch array: leading (example) dim split over "data", the rest replicated."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """A fully replicated sharding on `mesh`."""
    return NamedSharding(mesh, P())


def item_spec(shape: tuple[int, ...], mesh: Mesh) -> P:
    """PartitionSpec for one item-indexed array (rows = items): rows on "model", else the last dim, else replicated.

    jax requires a sharded dim to divide evenly (device_put and jit raise IndivisibleError otherwise). Row sharding is
    preferred: full-ranking scores are then computed item by item exactly as on one device. When the row count
    (num_items + 1) does not divide by the model axis we split the trailing dim (embedding / hidden size), which
    saves the same memory at the cost of a partial-sum all-reduce in the score matmul; no padding rows are needed.
    """
    m = mesh.shape[MODEL_AXIS]
    if m == 1 or not shape:
        return P()
    if shape[0] % m == 0:
        return P(MODEL_AXIS)
    if len(shape) >= 2 and shape[-1] % m == 0:
        return P(*([None] * (len(shape) - 1)), MODEL_AXIS)
    raise ConfigError(
        f"shard_items: an item-indexed array of shape {shape} can be split over model_axis={m} neither by rows "
        f"({shape[0]} % {m} != 0) nor by its last dim ({shape[-1]} % {m} != 0); choose a model_axis dividing one of them"
    )


def ranking_sharding(mesh: Mesh, shard_items: bool, embed_dim: int) -> NamedSharding:
    """Sharding of the [N+1, d] item embeddings that full ranking scores chunk by chunk (`metrics.target_ranks`).

    With `shard_items` the embeddings are split on "model" by their last dim, whatever the row count: every chunk of
    items is then a local slice on each device and the score matmul adds partial sums over "model", so a device
    holds d / model_axis columns of the table and O(users x chunk) scores. Rows would not do: the chunk loop slices
    the table at traced offsets, and XLA gathers a row-sharded table whole onto every device for that (compiled on
    4 simulated devices for 1,024 users against 1M x 64 float32 rows: 547 MB of temporaries per device with rows
    split, 100 MB with columns split; docs/benchmarks.md).
    Replicated when d does not divide by the model axis, or without `shard_items`.
    """
    m = mesh.shape[MODEL_AXIS]
    if not shard_items or m == 1 or embed_dim % m:
        return replicated(mesh)
    return NamedSharding(mesh, P(None, MODEL_AXIS))


def state_shardings(state_abstract: Any, mesh: Mesh, shard_items: bool, *, num_items: int) -> Any:
    """Shardings for the train state {"params", "opt_state", "step"} (any pytree of arrays / ShapeDtypeStructs).

    Everything is replicated, except with `shard_items`: every array whose leading dim is num_items + 1 (the item-ID
    table and, having the same shape, its AdamW moments; also a feature table kept in the state) gets `item_spec`.
    Matching by shape covers params and every optax state that mirrors them (also under chain/masked/MultiSteps)
    without needing the optimizer; scalar counts stay replicated, which avoids jit(tx.init) leaving the
    count on device 0 only.

    Args:
      state_abstract: the state or `jax.eval_shape` of it.
      mesh: from `make_mesh`.
      shard_items: config.parallel.shard_items.
      num_items: number of real items N (tables have N + 1 rows, row 0 = padding).

    Returns:
      A pytree of NamedSharding with the structure of `state_abstract`.
    """
    rep = replicated(mesh)
    if not shard_items or mesh.shape[MODEL_AXIS] == 1:
        return jax.tree.map(lambda _: rep, state_abstract)
    rows = num_items + 1

    def one(x: Any) -> NamedSharding:
        shape = tuple(getattr(x, "shape", ()))
        if len(shape) >= 1 and shape[0] == rows:
            return NamedSharding(mesh, item_spec(shape, mesh))
        return rep

    return jax.tree.map(one, state_abstract)


def process_rows(global_batch_size: int, mesh: Mesh | None = None) -> tuple[int, int]:
    """This process's [start, stop) rows of every global batch.

    Args:
      global_batch_size: rows of the global batch (a multiple of the data axis, see `check_global_batch`).
      mesh: the training mesh; when given the rows are read off the batch sharding (exact for any mesh), else an
        even split by process index (what `make_mesh`'s device order gives when model_axis divides the local count).
    """
    if mesh is None:
        n, i = jax.process_count(), jax.process_index()
        if global_batch_size % n:
            raise ValueError(f"batch size {global_batch_size} must be a multiple of the process count {n}")
        per = global_batch_size // n
        return i * per, (i + 1) * per
    index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
    starts = [idx[0].indices(global_batch_size)[0] for idx in index_map.values()]
    stops = [idx[0].indices(global_batch_size)[1] for idx in index_map.values()]
    start, stop = min(starts), max(stops)
    covered = {r for a, b in zip(starts, stops) for r in range(a, b)}
    if len(covered) != stop - start:
        raise ValueError(f"this process's devices do not hold contiguous batch rows on mesh {dict(mesh.shape)}")
    return start, stop


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles global arrays, sharded along "data", from this process's rows (`process_rows`) of each array.

    Single-process: `local_batch` is the whole batch. Multi-process: each process passes only its rows.
    """
    sharding = batch_sharding(mesh)
    out = {}
    for key, value in local_batch.items():
        value = np.asarray(value)
        global_shape = (value.shape[0] * mesh.shape[DATA_AXIS] // _local_data_blocks(mesh),) + value.shape[1:]
        out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out


def _local_data_blocks(mesh: Mesh) -> int:
    """How many distinct "data" positions this process's devices cover."""
    local = {d.id for d in mesh.devices.flat if d.process_index == jax.process_index()}
    rows = {i for i, row in enumerate(mesh.devices) if any(d.id in local for d in row)}
    return len(rows)


def is_main_process() -> bool:
    """True on process 0, the only one that writes logs, results and other files besides checkpoints."""
    return jax.process_index() == 0


def to_host(x: Any) -> np.ndarray:
    """The full value of a (possibly sharded, possibly multi-process) array as numpy, on every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.sharding.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def mesh_description(mesh: Mesh) -> dict[str, Any]:
    """Device count, process count and mesh shape, for logs and results."""
    return {
        "devices": int(mesh.size),
        "processes": jax.process_count(),
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "platform": mesh.devices.flat[0].platform,
    }

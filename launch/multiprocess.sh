#!/usr/bin/env bash
# Run one process of a multi-host job on a host you started by hand (no Slurm / MPI). Run it once on every host.
#
#   JAX_COORDINATOR_ADDRESS=host0:12345 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 \
#     launch/multiprocess.sh --config configs/microlens.py:dff --workdir /shared/runs/dff [--config.KEY=VALUE ...]
#
# Environment contract (checked before anything starts):
#   JAX_COORDINATOR_ADDRESS  host:port of process 0, reachable from every host (process 0 listens on it)
#   JAX_NUM_PROCESSES        number of processes in the job (one per host; each uses all its local GPUs)
#   JAX_PROCESS_ID           this host's id, 0 .. JAX_NUM_PROCESSES-1 (0 runs the coordinator and writes the logs)
# Optional: PYTHON (default python3), JAX_LOCAL_DEVICE_IDS (e.g. 0,1,2,3 to use only some GPUs).
# The workdir must be on storage every host sees (checkpoints are written by all processes).
set -euo pipefail

die() {
  echo "error: multiprocess.sh: $*" >&2
  exit 2
}
# Explicit checks, not ${VAR:?}: that form exits with status 1 and no "error:" prefix.
[[ -n ${JAX_COORDINATOR_ADDRESS:-} ]] || die "set JAX_COORDINATOR_ADDRESS=host:port of process 0"
[[ -n ${JAX_NUM_PROCESSES:-} ]] || die "set JAX_NUM_PROCESSES=number of processes (hosts) in the job"
[[ -n ${JAX_PROCESS_ID:-} ]] || die "set JAX_PROCESS_ID=this process id, 0..JAX_NUM_PROCESSES-1"
[[ $JAX_COORDINATOR_ADDRESS =~ ^.+:[0-9]+$ ]] || die "JAX_COORDINATOR_ADDRESS must be host:port, got '$JAX_COORDINATOR_ADDRESS'"
[[ $JAX_NUM_PROCESSES =~ ^[1-9][0-9]*$ ]] || die "JAX_NUM_PROCESSES must be a positive integer, got '$JAX_NUM_PROCESSES'"
if ! [[ $JAX_PROCESS_ID =~ ^[0-9]+$ ]] || ((JAX_PROCESS_ID >= JAX_NUM_PROCESSES)); then
  die "JAX_PROCESS_ID must be in 0..$((JAX_NUM_PROCESSES - 1)), got '$JAX_PROCESS_ID'"
fi
[[ $# -gt 0 ]] || die "usage: launch/multiprocess.sh --config CONFIG --workdir DIR [--config.KEY=VALUE ...]"

export JAX_COORDINATOR_ADDRESS JAX_NUM_PROCESSES JAX_PROCESS_ID
exec "${PYTHON:-python3}" -m dff_jax.train "$@"

#!/usr/bin/env bash
# Start NUM_PROCESSES copies of COMMAND on this machine as one multi-process JAX job, for testing.
#
#   launch/local.sh NUM_PROCESSES COMMAND [ARGS...]
#   launch/local.sh 2 python -m dff_jax.train --config configs/smoke.py --workdir W --config.parallel.cpu_devices=2
#
# Every copy gets JAX_COORDINATOR_ADDRESS=127.0.0.1:<free port>, JAX_NUM_PROCESSES and its own JAX_PROCESS_ID
# (0..N-1), the contract dff_jax.parallel.initialize reads. Output lines are prefixed with "[pI]". The script
# waits for all copies; when one fails it names it, stops the others (SIGTERM, then SIGKILL after STOP_GRACE
# seconds) and exits with that copy's status; so does a SIGTERM or Ctrl-C to the script itself.
# Only loopback is used. PYTHON (default python3) is used to pick the port.
set -euo pipefail

die() {
  echo "error: local.sh: $*" >&2
  exit 2
}

[[ $# -ge 2 ]] || die "usage: launch/local.sh NUM_PROCESSES COMMAND [ARGS...]"
num=$1
shift
[[ $num =~ ^[1-9][0-9]*$ ]] || die "NUM_PROCESSES must be a positive integer, got '$num'"

port=$("${PYTHON:-python3}" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])') ||
  die "could not pick a free port with ${PYTHON:-python3}"
export JAX_COORDINATOR_ADDRESS="127.0.0.1:${port}"
export JAX_NUM_PROCESSES="$num"
echo "local.sh: starting ${num} process(es), coordinator ${JAX_COORDINATOR_ADDRESS}: $*" >&2

declare -A proc_of # pid -> process id
pids=()
for ((i = 0; i < num; i++)); do
  JAX_PROCESS_ID=$i "$@" > >(sed -u "s/^/[p${i}] /") 2> >(sed -u "s/^/[p${i}] /" >&2) &
  pid=$!
  pids+=("$pid")
  proc_of[$pid]=$i
done

running() { # a copy that has not exited (an exited, not yet reaped one is a zombie: Z)
  local state
  state=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
  [[ $state != Z* ]]
}

# SIGTERM first (a run flushes and releases what it holds), then SIGKILL after STOP_GRACE seconds (default 10):
# JAX's multi-process runtime catches SIGTERM for its preemption notice, so a copy may never stop on it alone.
stop_all() {
  local pid alive deadline=$((SECONDS + ${STOP_GRACE:-10}))
  for pid in "${!proc_of[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  while ((SECONDS < deadline)); do
    alive=0
    for pid in "${!proc_of[@]}"; do
      running "$pid" && alive=1
    done
    ((alive)) || return 0
    sleep 0.5
  done
  for pid in "${!proc_of[@]}"; do
    if running "$pid"; then
      echo "local.sh: process ${proc_of[$pid]} (pid $pid) did not stop ${STOP_GRACE:-10} s after SIGTERM; killing it" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
}
trap 'stop_all; exit 130' INT TERM

status=0
while ((${#pids[@]} > 0)); do
  done_pid=""
  rc=0
  wait -n -p done_pid "${pids[@]}" || rc=$?
  [[ -n ${done_pid:-} ]] || break
  left=()
  for pid in "${pids[@]}"; do
    [[ $pid == "$done_pid" ]] || left+=("$pid")
  done
  pids=("${left[@]+"${left[@]}"}")
  if ((rc != 0)); then
    status=$rc
    reason="exit status $rc"
    ((rc > 128)) && reason="$reason (killed by signal $((rc - 128)))"
    echo "local.sh: process ${proc_of[$done_pid]} (pid $done_pid) failed with $reason; stopping the others" >&2
    stop_all
    break
  fi
done
wait || true # the stopped copies and the output prefixers
if ((status != 0)); then
  echo "local.sh: FAILED (first failure status $status)" >&2
else
  echo "local.sh: all ${num} process(es) finished successfully" >&2
fi
exit "$status"

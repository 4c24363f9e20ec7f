#!/usr/bin/env bash
# Runs on each TPU worker (launch.sh starts it): runs the training command given as arguments, at most one
# at a time per worker, and marks the run finished for watch.sh.
#
#   DONE_MARKER=gs://BUCKET/RUN/DONE worker_train.sh PYTHON -m alpacare_jax.train --config=... --workdir=...
#
# The trainer exits 0 both when it finished and when SIGTERM (preemption) made it checkpoint and stop, so
# "finished" is: exit status 0 and no SIGTERM seen here. Only then is DONE_MARKER written.

set -uo pipefail

# A second launch on a busy worker would fight over the TPU: refuse instead.
exec 9>"$HOME/.alpacare-train.lock"
if ! flock -n 9; then
  echo "a training process is already running on $(hostname); not starting another" >&2
  exit 1
fi

echo "[$(date '+%Y-%m-%d %H:%M:%S')] starting on $(hostname): $*"
terminated=0
child=""
# Pass SIGTERM on (the trainer checkpoints and exits) and remember it: that exit is not the end of the run.
trap 'terminated=1; if [ -n "$child" ]; then kill -TERM "$child" 2>/dev/null; fi' TERM
"$@" &
child=$!
wait "$child"
status=$?
if [ "$terminated" = 1 ]; then  # the trap interrupted `wait`: wait for the checkpoint to be written
  wait "$child"
  status=$?
fi
echo "[$(date '+%Y-%m-%d %H:%M:%S')] training exited with status $status (SIGTERM received: $terminated)"

if [ "$status" = 0 ] && [ "$terminated" = 0 ] && [ -n "${DONE_MARKER:-}" ]; then
  case "$DONE_MARKER" in
    gs://*) echo "finished" | gcloud storage cp - "$DONE_MARKER" ;;
    *) echo "finished" >"$DONE_MARKER" ;;
  esac
fi
exit "$status"

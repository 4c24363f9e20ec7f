#!/usr/bin/env bash
# Keep a training run going on spot capacity: poll the queued resource and, whenever the slice is gone
# (preempted, failed or never created), recreate it, rerun setup and relaunch training. The trainer resumes
# from the latest checkpoint in gs://BUCKET/RUN_NAME, so only the steps since that checkpoint are redone.
#
#   tpu_scripts/watch.sh [--once] [--launch] [--dry-run]      # e.g. under nohup or tmux on a small VM
#
# Stops when the run has finished (worker_train.sh writes WORKDIR/DONE), then deletes the slice if
# DELETE_WHEN_DONE=true. A training crash on a live slice is not retried (see status.sh, logs.sh).
# --launch also sets up and launches on a slice that is already ACTIVE (first start).
# --once polls one time and returns. With --dry-run nothing runs and the slice state is pretended:
# TPU_SIMULATE_STATE=SUSPENDED (default ACTIVE) and TPU_SIMULATE_DONE=1 (default: not finished).

# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

ONCE=0
LAUNCH=0
own_flag() {
  case "$1" in
    --once) ONCE=1 ;;
    --launch) LAUNCH=1 ;;
    *) return 1 ;;
  esac
}
parse_flags "$@"

start_training() { tpu_setup && tpu_launch; }

recreate() {  # recreate STATE: a fresh slice with the run relaunched on it
  if [ "$1" != NOT_FOUND ]; then tpu_delete || return; fi
  tpu_create && wait_active && start_training
}

state=""
finished=""
while :; do
  qr_state state "${TPU_SIMULATE_STATE:-ACTIVE}"
  case "$state" in
    ACTIVE)
      run_done finished "${TPU_SIMULATE_DONE:-}"
      if [ -n "$finished" ]; then
        log "run $RUN_NAME has finished ($WORKDIR/DONE)"
        if [ "$DELETE_WHEN_DONE" = true ]; then tpu_delete; fi
        exit 0
      fi
      if [ "$LAUNCH" = 1 ]; then
        start_training || log "setup or launch failed; retrying at the next poll"
        LAUNCH=0
      fi ;;
    # Spot preemption leaves the queued resource SUSPENDED; a TPU VM reports PREEMPTED.
    SUSPENDING | SUSPENDED | PREEMPTED | FAILED | NOT_FOUND)
      log "queued resource $QR_NAME is $state: recreating it and relaunching $RUN_NAME"
      recreate "$state" || log "recreating failed; retrying at the next poll" ;;
    *) log "queued resource $QR_NAME is $state; waiting" ;;  # ACCEPTED, PROVISIONING, WAITING_FOR_RESOURCES, ...
  esac
  if [ "$ONCE" = 1 ]; then break; fi
  sleep "$POLL_SECONDS"
done

#!/usr/bin/env bash
# Print (or follow) the training log of one worker; worker 0 is the one that logs metrics.
#
#   tpu_scripts/logs.sh [--worker=0|all] [--lines=100] [--follow] [--dry-run]

# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

WORKER=0
LINES=100
FOLLOW=""
own_flag() {
  case "$1" in
    --worker=*) WORKER=${1#*=} ;;
    --lines=*) LINES=${1#*=} ;;
    --follow | -f) FOLLOW=" -f" ;;
    *) return 1 ;;
  esac
}
parse_flags "$@"

on_workers "$WORKER" "tail -n $LINES$FOLLOW \$HOME/$LOG_DIR/$RUN_NAME.log"

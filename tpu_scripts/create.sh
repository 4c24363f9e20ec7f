#!/usr/bin/env bash
# Request the TPU slice as a queued resource (spot or reserved), optionally waiting until it is ACTIVE.
#
#   tpu_scripts/create.sh [--wait] [--spot | --reserved] [--accelerator-type=v5p-8] [--dry-run]
#
# A queued resource waits in line until capacity is free (state WAITING_FOR_RESOURCES), then
# provisions the TPU VM(s) named TPU_NAME. Follow it with setup.sh and launch.sh, or use watch.sh,
# which does all three and recreates the slice after a preemption.

# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

WAIT=0
own_flag() { case "$1" in --wait) WAIT=1 ;; *) return 1 ;; esac; }
parse_flags "$@"

tpu_create
if [ "$WAIT" = 1 ]; then wait_active; fi

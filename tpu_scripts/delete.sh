#!/usr/bin/env bash
# Delete the queued resource and its TPU VMs. The checkpoints in gs://BUCKET stay.
#
#   tpu_scripts/delete.sh [--dry-run]

# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
parse_flags "$@"

tpu_delete

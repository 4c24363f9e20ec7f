#!/usr/bin/env bash
# Show the queued resource, and on every worker whether training runs and the last lines of its log.
#
#   tpu_scripts/status.sh [--dry-run]

# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
parse_flags "$@"

gcloud_tpus queued-resources describe "$QR_NAME"
on_workers all "hostname; pgrep -af \"[a]lpacare_jax.train\" || echo \"training: not running\"; tail -n 5 \$HOME/$LOG_DIR/$RUN_NAME.log"

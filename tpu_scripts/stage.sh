#!/usr/bin/env bash
# Copy the base model and the dataset to every worker's local disk (optional: by default each host reads
# its share of the weights straight from gs://, and the dataset from gs:// as well).
#
#   tpu_scripts/stage.sh [--base-model=gs://BUCKET/Llama-2-7b-hf] [--data-dir=gs://BUCKET/tfds] [--dry-run]
#
# Each gs:// location among BASE_MODEL and DATA_DIR is copied with `gcloud storage rsync` to
# ~/STAGE_DIR/<its last path component> on every worker; a rerun copies only what is missing. launch.sh
# with STAGE=true (or --stage=true) runs this first and points the trainer at the copies.

# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
parse_flags "$@"

tpu_stage

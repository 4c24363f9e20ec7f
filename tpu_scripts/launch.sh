#!/usr/bin/env bash
# Start training: the same command on every worker, detached from ssh, logging to ~/LOG_DIR/RUN_NAME.log.
#
#   tpu_scripts/launch.sh [--config=configs/llama2_7b.py] [--run-name=NAME] [--train-args='--config.x=1'] [--dry-run]
#
# Each worker runs `python -m alpacare_jax.train --config=CONFIG --workdir=gs://BUCKET/RUN_NAME
# --config.init_from_hf=BASE_MODEL --config.data.data_dir=DATA_DIR` (with STAGE=true, stage.sh runs first and
# the trainer reads the workers' local copies); on a multi-host slice jax.distributed finds the other hosts by
# itself. The trainer resumes from the latest checkpoint in the workdir, so launching again after a
# preemption continues the run.

# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
parse_flags "$@"

tpu_launch

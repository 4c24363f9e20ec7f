# shellcheck shell=bash
# Shared code of the TPU scripts: flags and settings, the `run` helper behind --dry-run, and one function
# per operation (create, setup, launch, delete, state), so watch.sh reuses exactly what the others run.
# Sourced, never executed. Avoids bash 4 features: macOS still ships bash 3.2.

set -euo pipefail

SCRIPTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$SCRIPTS_DIR")
DRY_RUN=0

# Settings that a --kebab-case=value flag may set (see config.env for what each means).
SETTINGS="PROJECT ZONE BUCKET TPU_NAME QR_NAME ACCELERATOR_TYPE RUNTIME_VERSION SPOT RESERVED CREATE_FLAGS
CONFIG RUN_NAME WORKDIR BASE_MODEL DATA_DIR TRAIN_ARGS STAGE STAGE_DIR REPO_URL REPO_REF REMOTE_DIR VENV
PYTHON_VERSION LOG_DIR POLL_SECONDS DELETE_WHEN_DONE"

die() { echo "error: $*" >&2; exit 1; }
log() { echo "[$(date '+%Y-%m-%d %H:%M:%S')] $*" >&2; }

usage() {  # the calling script's header comment
  sed -n '2,/^$/s/^# \{0,1\}//p' "$0"
  cat <<'EOF'

Common flags: --dry-run (print the commands, run nothing), --env-file=FILE (instead of config.env),
--spot, --reserved, and --NAME=VALUE for any setting in config.env (--accelerator-type=v4-32 sets
ACCELERATOR_TYPE). Precedence: flag > environment variable > config file.
EOF
}

# parse_flags "$@": common flags; a script handles its own first by defining `own_flag FLAG` (status 0 = taken).
parse_flags() {
  local arg name
  for arg in "$@"; do
    if declare -F own_flag >/dev/null && own_flag "$arg"; then continue; fi
    case "$arg" in
      -h | --help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1 ;;
      --env-file=*) TPU_ENV_FILE=${arg#*=} ;;
      --spot) SPOT=true; RESERVED=false ;;
      --reserved) RESERVED=true; SPOT=false ;;
      --*=*)
        name=$(echo "${arg%%=*}" | sed 's/^--//' | tr 'a-z-' 'A-Z_')
        case " $(echo "$SETTINGS" | tr '\n' ' ') " in
          *" $name "*) printf -v "$name" '%s' "${arg#*=}" ;;
          *) die "unknown flag $arg (see --help)" ;;
        esac ;;
      *) die "unknown argument $arg (see --help)" ;;
    esac
  done
  # Flags were applied first: config.env only fills in what neither a flag nor the environment set.
  # shellcheck source=config.env
  source "${TPU_ENV_FILE:-$SCRIPTS_DIR/config.env}"
  : "${RUNTIME_VERSION:=$(default_runtime_version "$ACCELERATOR_TYPE")}"
}

require() {  # require VAR...: stop with a clear message when a needed setting is empty
  local var
  for var in "$@"; do
    [ -n "${!var:-}" ] || die "$var is not set: edit tpu_scripts/config.env, export $var=..., or pass --$(echo "$var" | tr 'A-Z_' 'a-z-')=..."
  done
}

default_runtime_version() {  # the TPU VM image for an accelerator family (cloud.google.com/tpu/docs/runtimes)
  case "$1" in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    *) echo tpu-ubuntu2204-base ;;  # v4, v3, v2
  esac
}

# ---- running commands -----------------------------------------------------------------------------------

quote() {  # one argument as shell input; --flag=VALUE keeps the flag readable: --flag='v a l'
  local arg=$1 prefix=""
  case "$arg" in --*=*) prefix="${arg%%=*}="; arg=${arg#*=} ;; esac
  case "$arg" in
    "" | *[!A-Za-z0-9_./:=@%+,-]*) printf "%s'%s'" "$prefix" "${arg//\'/\'\\\'\'}" ;;
    *) printf '%s%s' "$prefix" "$arg" ;;
  esac
}

print_cmd() {  # the exact command line, ready to paste into a shell
  local out="" arg
  for arg in "$@"; do out="$out$(quote "$arg") "; done
  echo "${out% }"
}

run() {  # run CMD...: with --dry-run print it; otherwise log it and run it
  if [ "$DRY_RUN" = 1 ]; then print_cmd "$@"; return 0; fi
  echo "+ $(print_cmd "$@")" >&2
  "$@"
}

# query VAR DRY_VALUE CMD...: VAR := CMD's output (empty when it fails; its stderr is kept in QUERY_ERR).
# With --dry-run CMD is printed, not run, and VAR is DRY_VALUE: the caller says what to pretend.
QUERY_ERR=""
query() {
  local var=$1 dry_value=$2 out
  shift 2
  if [ "$DRY_RUN" = 1 ]; then print_cmd "$@"; printf -v "$var" '%s' "$dry_value"; return 0; fi
  local err_file
  err_file=$(mktemp)
  out=$("$@" 2>"$err_file") || out=""
  QUERY_ERR=$(cat "$err_file")
  rm -f "$err_file"
  printf -v "$var" '%s' "$out"
}

gcloud_tpus() {  # gcloud compute tpus GROUP VERB NAME ... with the project and zone
  local group=$1 verb=$2 name=$3
  shift 3
  run gcloud compute tpus "$group" "$verb" "$name" --project="$PROJECT" --zone="$ZONE" "$@"
}

on_workers() {  # on_workers WORKER COMMAND: run a shell command on one worker or on all of them
  gcloud_tpus tpu-vm ssh "$TPU_NAME" --worker="$1" --quiet --command="$2"
}

# ---- operations -----------------------------------------------------------------------------------------

tpu_create() {  # request the slice as a queued resource (it waits in the queue until capacity is free)
  require PROJECT ZONE TPU_NAME QR_NAME ACCELERATOR_TYPE RUNTIME_VERSION
  local capacity=() extra=()
  case "$SPOT/$RESERVED" in
    true/true) die "SPOT and RESERVED are both true: choose one" ;;
    true/*) capacity=(--spot) ;;
    */true) capacity=(--reserved) ;;
  esac
  read -r -a extra <<<"$CREATE_FLAGS"
  gcloud_tpus queued-resources create "$QR_NAME" --node-id="$TPU_NAME" \
    --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" \
    ${capacity[@]+"${capacity[@]}"} ${extra[@]+"${extra[@]}"}
}

tpu_delete() {  # the queued resource and its TPU VMs (--force); waits until they are gone
  require PROJECT ZONE QR_NAME
  gcloud_tpus queued-resources delete "$QR_NAME" --force --quiet
}

# qr_state VAR [DRY_VALUE]: VAR := the queued resource's state (ACTIVE, WAITING_FOR_RESOURCES, SUSPENDED, ...),
# NOT_FOUND when it does not exist, UNKNOWN when gcloud failed for another reason (network, auth).
qr_state() {
  require PROJECT ZONE QR_NAME
  local value
  query value "${2:-ACTIVE}" gcloud compute tpus queued-resources describe "$QR_NAME" \
    --project="$PROJECT" --zone="$ZONE" --format='value(state.state)'
  if [ -z "$value" ]; then
    case "$QUERY_ERR" in
      *NOT_FOUND* | *"not found"*) value=NOT_FOUND ;;
      *) value=UNKNOWN; [ -z "$QUERY_ERR" ] || log "gcloud: $QUERY_ERR" ;;
    esac
  fi
  printf -v "$1" '%s' "$value"
}

wait_active() {  # poll until the slice is ACTIVE; fails if it ends up FAILED, SUSPENDED or gone
  local state
  while :; do
    qr_state state ACTIVE
    case "$state" in
      ACTIVE) return 0 ;;
      FAILED | SUSPENDING | SUSPENDED | NOT_FOUND) log "queued resource $QR_NAME is $state"; return 1 ;;
      *) log "queued resource $QR_NAME is $state; checking again in ${POLL_SECONDS}s"; sleep "$POLL_SECONDS" ;;
    esac
  done
}

copy_checkout() {  # this checkout to every worker as a tarball: tracked and new files, less ignored and deleted ones
  local archive="${TMPDIR:-/tmp}/alpacare-jax-$TPU_NAME.tgz"
  run bash -o pipefail -c "cd $(quote "$REPO_ROOT") && git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do if [ -e \"\$f\" ]; then printf '%s\\0' \"\$f\"; fi; done | tar --null -T - -czf $archive" &&
    gcloud_tpus tpu-vm scp "$archive" "$TPU_NAME:alpacare-jax-src.tgz" --worker=all --quiet &&
    on_workers all "rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf alpacare-jax-src.tgz -C $REMOTE_DIR"
}

tpu_setup() {  # code on every worker, then a Python >= 3.11 venv (uv) with the package and its TPU extra
  require PROJECT ZONE TPU_NAME REMOTE_DIR VENV PYTHON_VERSION
  if [ -n "$REPO_URL" ]; then
    on_workers all "rm -rf $REMOTE_DIR && git clone -q --depth=1 --branch=$REPO_REF $REPO_URL $REMOTE_DIR" || return
  else
    copy_checkout || return
  fi
  # The tpu extra brings gcsfs: without TensorFlow, gs:// paths are reached through fsspec/gcsfs.
  on_workers all "python3 -m pip install -q --user --upgrade uv && ~/.local/bin/uv venv -q --allow-existing --python=$PYTHON_VERSION $VENV && ~/.local/bin/uv pip install -q --python=$VENV/bin/python -e \"./${REMOTE_DIR}[tpu]\""
}

staged() {  # staged LOCATION: where the trainer reads LOCATION from: with STAGE=true a gs:// one is copied first
  local location=${1%/}
  case "$STAGE/$location" in
    true/gs://*) echo "\$HOME/$STAGE_DIR/${location##*/}" ;;
    *) echo "$location" ;;
  esac
}

tpu_stage() {  # copy the gs:// BASE_MODEL and DATA_DIR to every worker's disk (rsync: a rerun copies what is missing)
  require PROJECT ZONE TPU_NAME STAGE_DIR
  require_locations
  local location command="mkdir -p \$HOME/$STAGE_DIR"
  for location in "$BASE_MODEL" "$DATA_DIR"; do
    case "$location" in
      gs://*) command="$command && gcloud storage rsync --recursive ${location%/} $(STAGE=true staged "$location")" ;;
    esac
  done
  if [ "$command" = "mkdir -p \$HOME/$STAGE_DIR" ]; then
    log "nothing to stage: neither BASE_MODEL nor DATA_DIR is a gs:// location"
    return 0
  fi
  on_workers all "$command"
}

train_command() {  # what every worker runs: the same command on each host, jax finds its peers itself
  local model data
  model=$(staged "$BASE_MODEL")
  data=$(staged "$DATA_DIR")
  echo "\$HOME/$VENV/bin/python -m alpacare_jax.train --config=$CONFIG --workdir=$WORKDIR${model:+ --config.init_from_hf=$model}${data:+ --config.data.data_dir=$data}${TRAIN_ARGS:+ $TRAIN_ARGS}"
}

tpu_launch() {  # (with STAGE=true: stage first, then) start training on every worker, detached (setsid + nohup)
  require PROJECT ZONE TPU_NAME CONFIG RUN_NAME REMOTE_DIR VENV LOG_DIR
  require_locations
  if [ "$STAGE" = true ]; then tpu_stage || return; fi
  local log_dir="\$HOME/$LOG_DIR"
  on_workers all "mkdir -p $log_dir && cd $REMOTE_DIR && DONE_MARKER=$WORKDIR/DONE setsid nohup bash tpu_scripts/worker_train.sh $(train_command) >> $log_dir/$RUN_NAME.log 2>&1 < /dev/null &"
}

require_locations() {  # the defaults gs://BUCKET/... are no paths at all without a bucket; WORKDIR is needed
  local var
  for var in WORKDIR BASE_MODEL DATA_DIR; do
    case "${!var}" in gs:///*) require BUCKET ;; esac
  done
  require WORKDIR
}

# run_done VAR [DRY_VALUE]: VAR := 1 when the run has finished (worker_train.sh wrote WORKDIR/DONE), else empty.
run_done() {
  require_locations
  local listing
  query listing "${2:-}" gcloud storage ls "$WORKDIR/DONE"
  printf -v "$1" '%s' "${listing:+1}"
}

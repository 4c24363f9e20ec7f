#!/usr/bin/env bash
# Install the code and its TPU dependencies on every worker of the slice.
#
#   tpu_scripts/setup.sh [--repo-url=https://github.com/...] [--dry-run]
#
# With REPO_URL set, each worker clones REPO_REF of it; otherwise this checkout (including uncommitted
# changes) is copied to every worker. Then uv creates a Python PYTHON_VERSION venv (VENV) and installs
# the package with `pip install -e ".[tpu]"`. Safe to rerun: it replaces the code and updates the venv.

# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
parse_flags "$@"

tpu_setup

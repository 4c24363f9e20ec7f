"""Train: `alpacare-train --config=configs/X.py --workdir=DIR [--config.a.b=v ...]` (or `python -m alpacare_jax.train`).

The run's events (resumed, evaluated, exported, early stop, preemption) are log lines of process 0:
information on stdout, warnings and errors on stderr. Bad input ends the run with one `error:` line.

Multi-host: on a TPU pod slice, run the same command on every host (jax finds its peers itself, or pass
--multihost). Elsewhere give the coordinator explicitly, e.g. two processes on one machine:

    python -m alpacare_jax.train ... --coordinator_address=127.0.0.1:12345 --num_processes=2 --process_id=0
    python -m alpacare_jax.train ... --coordinator_address=127.0.0.1:12345 --num_processes=2 --process_id=1
"""

import logging
import os
import sys
from collections.abc import Callable, Sequence

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from alpacare_jax.train.hooks import Hook
from alpacare_jax.train.loop import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py)", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics, tokenizer, config")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes (with --coordinator_address)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index (with --coordinator_address)")
_MULTIHOST = flags.DEFINE_bool("multihost", None,
                               "call jax.distributed.initialize() with auto-detection (TPU pods, SLURM); "
                               "default: auto-detected on multi-host TPU slices")
flags.mark_flags_as_required(["config", "workdir"])


def _init_distributed() -> None:
    if _COORDINATOR.value:
        if _NUM_PROCESSES.value is None or _PROCESS_ID.value is None:
            raise app.UsageError("--coordinator_address needs --num_processes and --process_id")
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
        return
    multihost = _MULTIHOST.value
    if multihost is None:  # a TPU VM in a multi-host slice lists all its peers here
        multihost = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if multihost:
        jax.distributed.initialize()


def _log_events(primary: bool) -> None:
    """The project's log lines, plain: INFO (DEBUG with --verbosity=1) to stdout, WARNING and above to stderr;
    other processes than 0 show only warnings and errors."""
    events = logging.getLogger("alpacare_jax")
    events.setLevel((logging.DEBUG if flags.FLAGS.verbosity >= 1 else logging.INFO) if primary else logging.WARNING)
    events.propagate = False  # absl's handler on the root logger would print them a second time
    out = logging.StreamHandler(sys.stdout)
    out.addFilter(lambda record: record.levelno < logging.WARNING)
    out.setFormatter(logging.Formatter("%(message)s"))
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    err.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    events.handlers = [out, err]
    for noisy in ("absl", "jax", "orbax", "grain", "tensorflow_datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv, extra_hooks: Callable[[ml_collections.ConfigDict, str], Sequence[Hook]] = lambda config, workdir: ()):
    """The command; `extra_hooks(config, workdir)` gives hooks of a caller's own (`alpacare_jax.eval train`)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    _init_distributed()
    _log_events(jax.process_index() == 0)
    try:
        train(_CONFIG.value, _WORKDIR.value, extra_hooks=extra_hooks(_CONFIG.value, _WORKDIR.value))
    except (ValueError, OSError, FloatingPointError) as e:
        # Bad input, a damaged file, a diverged loss: the message says what and where; a traceback
        # would only bury it (--verbosity=1 logs it). Anything else is a bug and keeps its traceback.
        logging.getLogger("alpacare_jax").debug("training failed", exc_info=True)
        print(f"error: {e}", file=sys.stderr, flush=True)
        # train() has closed its checkpoints and metrics on the way out. A normal interpreter exit would
        # now let orbax's abandoned reads of a damaged checkpoint print tracebacks after this line
        # ("Event loop is closed"), so leave at once.
        logging.shutdown()
        sys.stdout.flush()
        os._exit(1)


def cli() -> None:
    """The `alpacare-train` console script."""
    app.run(main)


if __name__ == "__main__":
    cli()

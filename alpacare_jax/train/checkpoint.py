"""Orbax checkpoints of the train state and the data iterator, with fallback past a damaged latest step.

A checkpoint step directory holds three items:
  params  the model weights (all that `export_hf` needs),
  train   optimizer state, step and RNG key,
  data    the grain iterator position of every process (a few integers each),
so a restart continues with exactly the batches and updates an uninterrupted run would have seen.
Saves are asynchronous (training continues while the arrays are written) and only become visible
under their final step name once complete, so a crash mid-save leaves the previous step as latest.
Paths may be local or `gs://...` (orbax writes through tensorstore / epath).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from alpacare_jax.train.state import TrainState

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, directory: str | epath.Path, *, save_every: int, keep: int, async_save: bool = True):
        # Orbax wants absolute paths; remote ones (gs://...) already are.
        self.directory = epath.Path(directory if "://" in str(directory) else os.path.abspath(directory))
        self.save_every = save_every
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
            ),
        )

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def should_save(self, step: int) -> bool:
        return self.save_every > 0 and step % self.save_every == 0

    def save(self, state: TrainState, data_iterator: Any, *, step: int) -> None:
        """Starts an (async) save of `state` and the iterator's position at `step`."""
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            train=ocp.args.StandardSave(_train_part(state)),
            data=grain.checkpoint.CheckpointSave(data_iterator),
        ), force=True)

    def restore_latest(self, abstract_state: TrainState, data_iterator: Any) -> TrainState | None:
        """The newest restorable checkpoint (None if there is none); `data_iterator` is repositioned in place.

        A step that fails to restore (truncated or missing files, e.g. from a disk filling up) is logged
        with its error and the next older one is tried: losing a few hundred steps beats a dead run.
        """
        damaged = []
        restored_state = None
        for step in reversed(self.all_steps()):
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(abstract_state.params),
                    train=ocp.args.StandardRestore(_train_part(abstract_state)),
                    data=grain.checkpoint.CheckpointRestore(data_iterator),
                ))
            except Exception as e:  # noqa: BLE001 (any failure of one step means: try the previous one)
                log.error("checkpoint at step %d cannot be restored (%s: %.300s); trying the previous one",
                          step, type(e).__name__, str(e))
                damaged.append(step)
                continue
            train = restored["train"]
            restored_state = TrainState(step=train["step"], params=restored["params"],
                                        opt_state=train["opt_state"], rng=train["rng"])
            break
        if damaged:
            self._set_aside(damaged)
        return restored_state

    def _set_aside(self, steps: list[int]) -> None:
        """Renames damaged steps to `<step>.damaged` (kept for inspection) so the step can be saved again."""
        if jax.process_index() == 0:
            for step in steps:
                path = self.directory / str(step)
                path.rename(self.directory / f"{step}.damaged-{int(time.time())}")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("checkpoint: damaged steps set aside")
        self.manager.reload()

    def restore_params(self, abstract_params: dict, step: int | None = None) -> tuple[dict, int]:
        """Only the weights (for export); `step` None means the latest."""
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoints in {self.directory}")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; have {steps}")
        restored = self.manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))
        return restored["params"], step

    def wait(self) -> None:
        """Blocks until any async save is committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _train_part(state: TrainState) -> dict:
    return {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}

"""Orbax checkpoints of the train state and the data iterator, with fallback past a damaged latest step.

A checkpoint step directory holds four items:
  params     the trained weights (all that `export_hf` needs besides, with LoRA, the base),
  train      optimizer state, step and RNG key,
  data       the grain iterator position of every process (a few integers each),
  checksums  a 64-bit content hash of every array in `params` and `train`,
so a restart continues with exactly the batches and updates an uninterrupted run would have seen.
A LoRA run's `params` are its adapters; its frozen base is not saved (it is as large as a full checkpoint
and never changes) and a fifth item, `base`, names it: its source and the content hash of each of its
arrays. A restore checks those hashes against the base loaded now, so adapters never silently land on
another base.
Saves are asynchronous (training continues while the arrays are written) and only become visible
under their final step name once complete, so a crash mid-save leaves the previous step as latest.
Paths may be local or `gs://...` (orbax writes through tensorstore / epath).

Orbax itself does not notice bytes that were changed on disk (a flipped bit or a garbled block restores
as wrong weights), hence the checksums: every restore recomputes them and treats a mismatch like a
truncated file. The hash is computed by XLA where the arrays live, from each element's bits and its
position, and summed with integer (order-free) arithmetic, so it is the same on any mesh layout and
costs one read of the state, not a gather to one host.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from alpacare_jax.train.state import TrainState

log = logging.getLogger(__name__)


class NoRestorableCheckpoint(ValueError):
    """Checkpoints exist but none of them restores; training stops rather than silently start over."""


class ChecksumMismatch(ValueError):
    """A restored array whose content hash differs from the one saved with it."""


class BaseMismatch(ValueError):
    """LoRA adapters restored onto another base than theirs, or checkpoints of the other kind of run."""


@dataclasses.dataclass(frozen=True)
class BaseReference:
    """The frozen base a LoRA run adapts, as its checkpoints record it: where it came from (for people)
    and the content hash of each of its arrays (what a restore compares)."""

    source: str
    checksums: dict[str, str]

    @classmethod
    def of(cls, source: str, base: dict) -> BaseReference:
        return cls(source, content_checksums(base))


class Checkpointer:
    def __init__(self, directory: str | epath.Path, *, save_every: int, keep: int, async_save: bool = True,
                 base: BaseReference | None = None):
        """`base`: with LoRA, the base loaded now; saved with every step and checked by every restore."""
        # Orbax wants absolute paths; remote ones (gs://...) already are.
        self.directory = epath.Path(directory if "://" in str(directory) else os.path.abspath(directory))
        self.save_every = save_every
        self.base = base
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
        """Starts an (async) save of `state` and the iterator's position at `step` (not the frozen base)."""
        items = dict(
            params=ocp.args.StandardSave(state.params),
            train=ocp.args.StandardSave(_train_part(state)),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            checksums=ocp.args.JsonSave({"params": content_checksums(state.params),
                                         "train": content_checksums(_train_part(state))}),
        )
        if self.base is not None:
            items["base"] = ocp.args.JsonSave(dataclasses.asdict(self.base))
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore_latest(self, abstract_state: TrainState, data_iterator: Any) -> TrainState | None:
        """The newest restorable checkpoint, or None when there is no checkpoint at all.

        `data_iterator` is repositioned in place only once a step's arrays have restored and matched
        their checksums; after any failure it is put back where it was, so a damaged step leaves no
        state behind. A step that fails (truncated or changed files, e.g. from a disk filling up) is
        logged with its error, set aside as `<step>.damaged-<time>` and the next older one is tried:
        losing a few hundred steps beats a dead run. When every checkpoint fails, this raises
        `NoRestorableCheckpoint` and leaves them in place: starting over from step 0 would throw the
        run away (and rewrite its metrics), which only a person should decide.
        """
        steps = self.all_steps()
        fresh_position = data_iterator.get_state()
        errors: dict[int, str] = {}
        for step in reversed(steps):
            try:
                restored = self._restore_verified(step, abstract_state.params, _train_part(abstract_state))
                self.manager.restore(step, args=ocp.args.Composite(
                    data=grain.checkpoint.CheckpointRestore(data_iterator)))
            except BaseMismatch:  # not damage: every step was trained on that base, so none would do
                raise
            except Exception as e:  # noqa: BLE001 (any failure of one step means: try the previous one)
                data_iterator.set_state(fresh_position)
                errors[step] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"  # one line, bounded
                log.error("checkpoint at step %d cannot be restored (%s); trying the previous one", step, errors[step])
                continue
            if errors:
                self._set_aside(list(errors))
            train = restored["train"]
            return TrainState(step=train["step"], params=restored["params"], opt_state=train["opt_state"],
                              rng=train["rng"])
        if errors:
            raise NoRestorableCheckpoint(
                f"{self.directory}: no checkpoint can be restored (steps {sorted(errors)} are damaged; newest: "
                f"{errors[max(errors)]}); they are left in place. To start over from step 0, move the "
                "checkpoints directory and metrics.jsonl aside and rerun")
        return None

    def _restore_verified(self, step: int, abstract_params: dict, abstract_train: dict | None) -> dict:
        """`params` (and `train` unless None) of `step`, checked against the checksums saved with them."""
        self._check_base(step)
        items = {"params": ocp.args.StandardRestore(abstract_params)}
        if abstract_train is not None:
            items["train"] = ocp.args.StandardRestore(abstract_train)
        verified = (self.directory / str(step) / "checksums").exists()
        if verified:
            items["checksums"] = ocp.args.JsonRestore()
        else:  # written before checkpoints carried checksums: usable, but nothing can vouch for its bytes
            log.warning("checkpoint at step %d has no checksums (an older format); restored unverified", step)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        if not verified:
            return restored
        saved = restored["checksums"]
        for item in ("params", "train") if abstract_train is not None else ("params",):
            got = content_checksums(restored[item])
            bad = sorted(k for k in got.keys() | saved[item].keys() if got.get(k) != saved[item].get(k))
            if bad:
                raise ChecksumMismatch(f"{self.directory / str(step) / item}: the content of {len(bad)} array(s) "
                                       f"differs from the checksum saved with it, first {bad[0]}")
        return restored

    def _check_base(self, step: int) -> None:
        """Raises BaseMismatch unless `step` was trained on the base loaded now (or both are full fine-tuning)."""
        path = self.directory / str(step)
        saved = None
        if (path / "base").exists():
            saved = self.manager.restore(step, args=ocp.args.Composite(base=ocp.args.JsonRestore()))["base"]
        if saved is None and self.base is not None:
            raise BaseMismatch(f"{path}: a checkpoint of every weight (full fine-tuning), but this run trains "
                               "LoRA adapters (config.lora.rank > 0); use another workdir")
        if saved is not None and self.base is None:
            raise BaseMismatch(f"{path}: a checkpoint of LoRA adapters (base {saved['source']}), but this run "
                               "trains every weight (config.lora.rank = 0); use another workdir")
        if saved is not None:
            mine = self.base.checksums
            bad = sorted(k for k in mine.keys() | saved["checksums"].keys() if mine.get(k) != saved["checksums"].get(k))
            if bad:
                raise BaseMismatch(f"{path}: adapters trained on the base {saved['source']}, but the base loaded now "
                                   f"({self.base.source}) differs in {len(bad)} of its arrays, first {bad[0]}")

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
        return self._restore_verified(step, abstract_params, None)["params"], step

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _train_part(state: TrainState) -> dict:
    return {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}


# Two odd 32-bit constants (from MurmurHash3) seed the two halves of the 64-bit hash.
_SEEDS = (0x9E3779B9, 0x85EBCA6B)


def _mix(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: a bijection that spreads every input bit over the output."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _array_hash(x: jax.Array) -> jax.Array:
    """[2] uint32: sums over elements of mix(bits ^ mix(position ^ seed)), one sum per seed.

    Each term is a bijection of the element's bits, so changing any one element (a single flipped bit
    included) always changes both sums; positions enter the terms, so moved elements are caught too.
    """
    if x.dtype.itemsize == 4:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    elif x.dtype.itemsize == 2:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    else:
        bits = x.astype(jnp.uint32)
    position = jnp.zeros(x.shape, jnp.uint32)
    stride = 1
    for dim in reversed(range(x.ndim)):  # the row-major flat index, built without reshaping sharded arrays
        position = position + jax.lax.broadcasted_iota(jnp.uint32, x.shape, dim) * jnp.uint32(stride % 2**32)
        stride *= x.shape[dim]
    return jnp.stack([jnp.sum(_mix(bits ^ _mix(position ^ jnp.uint32(seed))), dtype=jnp.uint32) for seed in _SEEDS])


_tree_hashes = jax.jit(lambda tree: jax.tree.map(_array_hash, tree))


def content_checksums(tree: Any) -> dict[str, str]:
    """{path of the array in `tree`: 16 hex digits}, e.g. {"layers/attention/wq/kernel": "…"}."""
    hashes = jax.device_get(_tree_hashes(tree))
    return {jax.tree_util.keystr(path, simple=True, separator="/"): "".join(f"{int(v):08x}" for v in h)
            for path, h in jax.tree_util.tree_flatten_with_path(hashes)[0]}

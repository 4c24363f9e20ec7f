"""The SFT input pipeline: TFDS split -> host-local batches -> global `jax.Array`s.

Training (`make_train_iterator`), per process:

    tfds.data_source(split) -> rows process_index::process_count (disjoint shards)
      -> shuffle, reshuffled every epoch (seeded) -> repeat (num_epochs, 0 = forever)
      -> Alpaca prompt + tokens + loss mask, truncated to max_length   (examples.ExampleEncoder)
      -> packed by grain's FirstFitPackIterDataset, or padded one example per row
      -> batches of global_batch_size // process_count rows

Everything is a grain dataset, so `iterator.get_state()` / `set_state()` (and orbax's
`grain.checkpoint.CheckpointSave` / `CheckpointRestore`) resume exactly: a restored iterator yields
the batches the uninterrupted one would have yielded. The state is a few integers.

Evaluation (`make_eval_iterator`) reads its shard once, in order, one example per row, and pads to
the same number of batches on every process with all-padding rows (loss_mask 0), so nothing is
dropped and every process takes part in every eval step. It does not pack: packed row counts depend
on the data, and processes must agree on the number of steps.

`to_global_batch` assembles the processes' local batches into one global array per field.

THE BATCH CONTRACT (what the trainer consumes): a dict with exactly the keys `BATCH_KEYS`, each a
numpy int32 array [batch, max_length]:
  input_ids    token ids the model reads.
  labels       next-token targets aligned with input_ids: for an example's tokens t0..tn,
               input_ids = t0..t(n-1) and labels = t1..tn.
  loss_mask    1 where labels[i] is a response token or the EOS, else 0 (prompt, padding).
  segment_ids  1, 2, ... numbering the examples packed in a row; 0 on padding. Unpacked rows: 1, then 0.
  positions    rotary positions, restarting at 0 for every example (0 on padding).
Attention must be causal and only within equal segment ids (the model's `segment_ids` argument).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from alpacare_jax.data.examples import ExampleEncoder, empty_row, pad_example
from alpacare_jax.data.tokenizer import Tokenizer

BATCH_KEYS = ("input_ids", "labels", "loss_mask", "segment_ids", "positions")


def default_data_config() -> ml_collections.ConfigDict:
    """The data section of a training config (`config.data`); every field is documented inline."""
    c = ml_collections.ConfigDict()
    c.dataset = "medinstruct/medinstruct_52k"  # TFDS name/config, built by `python -m alpacare_jax.data.build`
    c.data_dir = ""  # TFDS data directory ("" = TFDS's default, ~/tensorflow_datasets)
    c.train_split = "train"
    c.eval_split = "validation"
    c.max_length = 512  # tokens per row (AlpaCare: 512 for 7B, 1024 for 13B)
    c.packing = True  # several examples per row (segment ids + restarting positions)
    c.num_packing_bins = 0  # rows filled at once by the packer; 0 = the per-process batch size
    c.global_batch_size = 16  # rows per step over all processes
    c.eval_global_batch_size = 0  # 0 = global_batch_size
    c.seed = 0  # shuffle (and packed-row order) seed; epochs reshuffle deterministically from it
    c.num_epochs = 0  # 0 = repeat forever (the trainer stops by step count); N = stop after N epochs
    c.read_threads = 1  # grain threads reading + tokenizing ahead of the training step
    c.prefetch_buffer_size = 16  # elements grain reads ahead
    return c


@dataclasses.dataclass(frozen=True)
class _Shard:
    """Which rows this process reads, and how many rows it batches per step."""

    process_index: int
    process_count: int
    global_batch_size: int

    def __post_init__(self):
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(f"process_index {self.process_index} not in [0, {self.process_count})")
        if self.global_batch_size % self.process_count:
            raise ValueError(
                f"global batch size {self.global_batch_size} is not divisible by {self.process_count} processes"
            )

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.process_count


def _shard(process_index: int | None, process_count: int | None, global_batch_size: int) -> _Shard:
    return _Shard(
        jax.process_index() if process_index is None else process_index,
        jax.process_count() if process_count is None else process_count,
        global_batch_size,
    )


def open_split(data_config: ml_collections.ConfigDict, split: str) -> Sequence[Mapping[str, Any]]:
    """Random-access TFDS source of one split (text fields as bytes)."""
    import tensorflow_datasets as tfds

    import alpacare_jax.data.medinstruct  # noqa: F401  (registers the `medinstruct` builder with TFDS)

    builder = tfds.builder(data_config.dataset, data_dir=data_config.data_dir or None)
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"TFDS dataset {data_config.dataset} is not built in data_dir={data_config.data_dir or '(TFDS default)'}; "
            "build it with `python -m alpacare_jax.data.build --source=... --data_dir=...`"
        )
    if split not in builder.info.splits:
        raise ValueError(f"{data_config.dataset} has no split {split!r}; it has {sorted(builder.info.splits)}")
    return builder.as_data_source(split=split)


def _read_options(data_config: ml_collections.ConfigDict) -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=data_config.read_threads,
                             prefetch_buffer_size=data_config.prefetch_buffer_size)


def _rename_packed(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """grain names packing outputs after the feature (`input_ids_segment_ids`); the contract does not."""
    return {
        "input_ids": row["input_ids"],
        "labels": row["labels"],
        "loss_mask": row["loss_mask"],
        "segment_ids": row["input_ids_segment_ids"],
        "positions": row["input_ids_positions"],
    }


def train_dataset(
    data_config: ml_collections.ConfigDict,
    tokenizer: Tokenizer,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    source: Sequence[Mapping[str, Any]] | None = None,
) -> grain.IterDataset:
    """The training `grain.IterDataset` of host-local batches (see the module doc for the stages).

    `source` replaces the TFDS split (any random-access sequence of records), for tests and tools.
    """
    shard = _shard(process_index, process_count, data_config.global_batch_size)
    source = open_split(data_config, data_config.train_split) if source is None else source
    ds = grain.MapDataset.source(source)[shard.process_index :: shard.process_count]
    if len(ds) == 0:
        raise ValueError(f"process {shard.process_index} has no training examples (split has {len(source)})")
    # MapDataset.shuffle before repeat draws a fresh permutation for every epoch.
    ds = ds.shuffle(seed=data_config.seed).repeat(data_config.num_epochs or None)
    ds = ds.map(ExampleEncoder(tokenizer, data_config.max_length))
    it = ds.to_iter_dataset(_read_options(data_config))
    length = data_config.max_length
    if data_config.packing:
        it = grain.experimental.FirstFitPackIterDataset(
            it,
            length_struct={"input_ids": length, "labels": length, "loss_mask": length},
            num_packing_bins=data_config.num_packing_bins or shard.local_batch_size,
            seed=data_config.seed,
            shuffle_bins=True,
            # Segment ids and positions are the same for all three fields: compute them once.
            meta_features=("labels", "loss_mask"),
            padding_struct={"input_ids": tokenizer.pad_id, "labels": tokenizer.pad_id, "loss_mask": 0},
        ).map(_rename_packed)
    else:
        it = it.map(functools.partial(pad_example, max_length=length, pad_id=tokenizer.pad_id))
    return it.batch(shard.local_batch_size, drop_remainder=True)


def make_train_iterator(
    data_config: ml_collections.ConfigDict,
    tokenizer: Tokenizer,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    source: Sequence[Mapping[str, Any]] | None = None,
) -> grain.DatasetIterator:
    """Iterator of this process's training batches: dicts of int32 [global_batch // process_count, max_length].

    process_index / process_count default to jax.process_index() / jax.process_count(). Save and
    restore its position with `get_state()` / `set_state()` or, with orbax,
    `grain.checkpoint.CheckpointSave(it)` / `grain.checkpoint.CheckpointRestore(it)`.
    """
    return iter(train_dataset(data_config, tokenizer, process_index=process_index,
                              process_count=process_count, source=source))


def make_eval_iterator(
    data_config: ml_collections.ConfigDict,
    tokenizer: Tokenizer,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    source: Sequence[Mapping[str, Any]] | None = None,
) -> grain.DatasetIterator:
    """Finite, deterministic iterator over the eval split: every example once, in order, unpacked.

    Process i reads rows i::process_count. Every process yields the same number of batches,
    ceil(ceil(N / process_count) / local_batch): rows past its shard are all padding (loss_mask 0,
    segment_ids 0), so summing loss over loss_mask gives the exact eval loss of the whole split.
    """
    shard = _shard(process_index, process_count, data_config.eval_global_batch_size or data_config.global_batch_size)
    source = open_split(data_config, data_config.eval_split) if source is None else source
    rows = grain.MapDataset.source(source)[shard.process_index :: shard.process_count]
    per_process = math.ceil(len(source) / shard.process_count)
    num_rows = math.ceil(per_process / shard.local_batch_size) * shard.local_batch_size
    encode = ExampleEncoder(tokenizer, data_config.max_length)
    length, pad_id = data_config.max_length, tokenizer.pad_id

    def row(j: int) -> dict[str, np.ndarray]:
        if j < len(rows):
            return pad_example(encode(rows[j]), length, pad_id)
        return empty_row(length, pad_id)

    ds = grain.MapDataset.range(num_rows).map(row).batch(shard.local_batch_size)
    return iter(ds.to_iter_dataset(_read_options(data_config)))


def num_examples(data_config: ml_collections.ConfigDict, split: str | None = None) -> int:
    """Number of examples in a split (default: the training split)."""
    return len(open_split(data_config, split or data_config.train_split))


def steps_per_epoch(
    data_config: ml_collections.ConfigDict,
    tokenizer: Tokenizer | None = None,
    *,
    process_count: int = 1,
    source: Sequence[Mapping[str, Any]] | None = None,
) -> int:
    """Training steps in one epoch, for the learning-rate schedule.

    Unpacked: exact, from the split size (process 0's shard, which is the largest). Packed: the row
    count depends on the tokens, so this runs process 0's real pipeline over one epoch (tokenizing its
    shard once: seconds for MedInstruct-52k) and counts batches; later epochs differ by a row or so
    because each epoch packs a different order. `tokenizer` is required when packing.
    """
    source = open_split(data_config, data_config.train_split) if source is None else source
    shard = _Shard(0, process_count, data_config.global_batch_size)
    if not data_config.packing:
        return math.ceil(len(source) / process_count) // shard.local_batch_size
    if tokenizer is None:
        raise ValueError("steps_per_epoch needs the tokenizer when packing")
    one_epoch = data_config.copy_and_resolve_references()
    one_epoch.num_epochs = 1
    dataset = train_dataset(one_epoch, tokenizer, process_index=0, process_count=process_count, source=source)
    return sum(1 for _ in dataset)


def to_global_batch(
    local_batch: Mapping[str, np.ndarray], mesh: Mesh, partition_spec: PartitionSpec
) -> dict[str, jax.Array]:
    """One global jax.Array per field from every process's local batch (`make_array_from_process_local_data`).

    `partition_spec` is the batch's sharding from the mesh rules (`alpacare_jax.sharding.batch_sharding`);
    the data package takes it as an argument rather than knowing mesh axes itself. Each process passes only
    its own rows, which land on its own devices' shards of the global array.
    """
    sharding = NamedSharding(mesh, partition_spec)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}

"""The grain training / eval pipeline over the sample TFDS build: batch contract, epochs, exact resume."""

import collections

import numpy as np
import pytest

from alpacare_jax.data import pipeline
from alpacare_jax.data.pipeline import BATCH_KEYS


def _segments(batch):
    """(row, segment id, slice) of every example in a batch."""
    for r, seg in enumerate(batch["segment_ids"]):
        for s in np.unique(seg[seg > 0]):
            idx = np.flatnonzero(seg == s)
            yield r, int(s), slice(idx[0], idx[-1] + 1)


def _example_texts(batch, tokenizer):
    """Decoded text (prompt + response) of every example in a batch, as the model sees it."""
    texts = []
    for r, _, sl in _segments(batch):
        tokens = np.concatenate([batch["input_ids"][r, sl], batch["labels"][r, sl][-1:]])
        texts.append(tokenizer.decode(tokens))
    return texts


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("packing", [True, False])
def test_batches_follow_the_contract(data_config, sp_tokenizer, packing):
    data_config.packing = packing
    it = pipeline.make_train_iterator(data_config, sp_tokenizer, process_index=0, process_count=1)
    rows_per_example = []
    for step, batch in enumerate(_take(it, 4)):
        assert tuple(sorted(batch)) == tuple(sorted(BATCH_KEYS))
        for v in batch.values():
            assert v.shape == (4, data_config.max_length) and v.dtype == np.int32
        seg = batch["segment_ids"]
        assert not batch["loss_mask"][seg == 0].any()
        for r, _, sl in _segments(batch):
            rows_per_example.append((step, r))
            n = sl.stop - sl.start
            np.testing.assert_array_equal(batch["positions"][r, sl], np.arange(n))
            assert batch["input_ids"][r, sl.start] == sp_tokenizer.bos_id
            # labels are next-token targets within the example
            np.testing.assert_array_equal(batch["labels"][r, sl][:-1], batch["input_ids"][r, sl][1:])
            assert batch["loss_mask"][r, sl].any()
        for row in seg:  # segments numbered 1..k left to right, padding only at the end
            used = row[row > 0]
            assert (np.diff(used) >= 0).all() and list(np.unique(used)) == list(range(1, len(np.unique(used)) + 1))
            assert (row[len(used):] == 0).all()
    counts = collections.Counter(rows_per_example)
    if packing:
        assert max(counts.values()) > 1  # at 512 tokens the sample's examples do pack
    else:
        assert set(counts.values()) == {1}


def test_each_epoch_is_a_fresh_permutation_of_the_split(data_config, sp_tokenizer):
    data_config.packing = False
    data_config.global_batch_size = 1
    data_config.num_epochs = 2
    n = pipeline.num_examples(data_config)
    texts = [t for b in pipeline.make_train_iterator(data_config, sp_tokenizer, process_index=0, process_count=1)
             for t in _example_texts(b, sp_tokenizer)]
    assert len(texts) == 2 * n
    first, second = texts[:n], texts[n:]
    assert len(set(first)) == n and set(first) == set(second)
    assert first != second
    again = [t for b in _take(pipeline.make_train_iterator(data_config, sp_tokenizer, process_index=0,
                                                           process_count=1), n)
             for t in _example_texts(b, sp_tokenizer)]
    assert again == first  # seeded: the same config gives the same order


@pytest.mark.parametrize("packing,read_threads", [(True, 2), (False, 0)])
def test_resume_from_saved_state_gives_identical_batches(data_config, sp_tokenizer, packing, read_threads):
    data_config.packing = packing
    data_config.read_threads = read_threads  # background reader threads must not change what is resumed
    make = lambda: pipeline.make_train_iterator(data_config, sp_tokenizer, process_index=0, process_count=1)  # noqa: E731
    it = make()
    _take(it, 7)
    state = it.get_state()
    expected = _take(it, 40)  # runs past the end of the first epoch (~26 batches)
    fresh = make()
    fresh.set_state(state)
    _assert_same(_take(fresh, 40), expected)


def test_resume_through_an_orbax_checkpoint(tmp_path, data_config, sp_tokenizer):
    import grain
    import orbax.checkpoint as ocp

    make = lambda: pipeline.make_train_iterator(data_config, sp_tokenizer, process_index=0, process_count=1)  # noqa: E731
    it = make()
    _take(it, 5)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    expected = _take(it, 6)
    fresh = make()
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    _assert_same(_take(fresh, 6), expected)


def test_eval_iterator_reads_every_example_once_and_pads_the_last_batch(data_config, sp_tokenizer):
    data_config.global_batch_size = 8
    n = pipeline.num_examples(data_config, "validation")
    batches = list(pipeline.make_eval_iterator(data_config, sp_tokenizer, process_index=0, process_count=1))
    assert len(batches) == -(-n // 8)
    assert all(b["input_ids"].shape == (8, data_config.max_length) for b in batches)
    texts = [t for b in batches for t in _example_texts(b, sp_tokenizer)]
    assert len(texts) == len(set(texts)) == n
    last = batches[-1]
    empty = ~(last["segment_ids"] > 0).any(axis=1)
    assert empty.sum() == len(batches) * 8 - n and not last["loss_mask"][empty].any()
    _assert_same(batches, list(pipeline.make_eval_iterator(data_config, sp_tokenizer, process_index=0,
                                                             process_count=1)))


@pytest.mark.parametrize("packing", [True, False])
def test_steps_per_epoch_matches_one_epoch_of_batches(data_config, sp_tokenizer, packing):
    data_config.packing = packing
    steps = pipeline.steps_per_epoch(data_config, sp_tokenizer)
    data_config.num_epochs = 1
    assert steps == sum(1 for _ in pipeline.make_train_iterator(data_config, sp_tokenizer, process_index=0,
                                                                process_count=1))
    assert 0 < steps <= pipeline.num_examples(data_config) // 4


def test_missing_dataset_and_bad_batch_size_are_clear_errors(data_config, sp_tokenizer, tmp_path):
    data_config.global_batch_size = 6
    with pytest.raises(ValueError, match="not divisible by 4 processes"):
        pipeline.make_train_iterator(data_config, sp_tokenizer, process_index=0, process_count=4)
    data_config.data_dir = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="python -m alpacare_jax.data.build"):
        pipeline.make_train_iterator(data_config, sp_tokenizer, process_index=0, process_count=1)

"""A packed batch gives every example the same loss as running that example alone (unpacked).

This needs the model's segment-aware attention: packed examples must not see each other, and
positions restart per example.
"""

import numpy as np
import pytest

from alpacare_jax.data import pipeline
from alpacare_jax.data.examples import ExampleEncoder, pad_example

from .conftest import SAMPLE_JSON


def _per_token_loss(logits, labels):
    import jax
    import jax.numpy as jnp

    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]


def test_packed_losses_equal_unpacked_losses(data_config, sp_tokenizer):
    model_lib = pytest.importorskip("alpacare_jax.model")
    import json

    import jax.numpy as jnp
    from flax import nnx

    data_config.packing = True
    data_config.max_length = 384
    # Short examples so that several share a row: the sample's outputs alone, with a one-line instruction.
    records = [{"instruction": "Answer.", "input": "", "output": r["output"][:160]}
               for r in json.loads(SAMPLE_JSON.read_text())[:40]]
    batch = next(pipeline.make_train_iterator(data_config, sp_tokenizer, process_index=0, process_count=1,
                                              source=records))
    segments = [(r, s) for r in range(batch["segment_ids"].shape[0])
                for s in np.unique(batch["segment_ids"][r]) if s > 0]
    assert len(segments) > 2 * batch["segment_ids"].shape[0]  # rows really hold several examples

    model = model_lib.Llama(model_lib.LlamaConfig.tiny(vocab_size=sp_tokenizer.vocab_size), rngs=nnx.Rngs(0))
    packed = model(jnp.asarray(batch["input_ids"]), positions=jnp.asarray(batch["positions"]),
                   segment_ids=jnp.asarray(batch["segment_ids"]))
    packed_loss = np.asarray(_per_token_loss(packed, jnp.asarray(batch["labels"])))

    # The same examples one per row, encoded independently of the packer.
    encode = ExampleEncoder(sp_tokenizer, data_config.max_length)
    by_tokens = {tuple(ex["input_ids"]): ex for ex in map(encode, records)}
    unpacked_rows, packed_losses = [], []
    for r, s in segments:
        where = batch["segment_ids"][r] == s
        example = by_tokens[tuple(batch["input_ids"][r][where])]  # the packer kept the example intact
        np.testing.assert_array_equal(batch["labels"][r][where], example["labels"])
        np.testing.assert_array_equal(batch["loss_mask"][r][where], example["loss_mask"])
        unpacked_rows.append(pad_example(example, data_config.max_length, sp_tokenizer.pad_id))
        mask = batch["loss_mask"][r][where]
        packed_losses.append((packed_loss[r][where] * mask).sum() / mask.sum())
    unpacked = {k: np.stack([row[k] for row in unpacked_rows]) for k in unpacked_rows[0]}
    logits = model(jnp.asarray(unpacked["input_ids"]), positions=jnp.asarray(unpacked["positions"]),
                   segment_ids=jnp.asarray(unpacked["segment_ids"]))
    token_loss = np.asarray(_per_token_loss(logits, jnp.asarray(unpacked["labels"])))
    unpacked_losses = (token_loss * unpacked["loss_mask"]).sum(1) / unpacked["loss_mask"].sum(1)
    np.testing.assert_allclose(packed_losses, unpacked_losses, rtol=2e-5, atol=2e-5)
    # Sanity: the losses are not all alike (a broken model giving a constant would pass trivially otherwise).
    assert np.std(unpacked_losses) > 1e-3

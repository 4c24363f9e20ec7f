"""The train step: same result on 1 device and on an (fsdp=4, tensor=2) mesh; accumulation; shardings; optimizer."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from alpacare_jax import sharding
from alpacare_jax.data import pipeline
from alpacare_jax.data.tokenizer import load_tokenizer
from alpacare_jax.train import optimizer
from alpacare_jax.train import state as state_lib
from alpacare_jax.train import step as step_lib
from alpacare_jax.train.config import llama_config
from tests.train.harness import demo_config, tiny_config


@pytest.fixture(scope="module")
def config_and_batch(prepared):
    config = tiny_config(prepared)
    tokenizer = load_tokenizer(config.tokenizer)
    batch = next(pipeline.make_train_iterator(config.data, tokenizer))
    assert batch["loss_mask"].sum() > 100  # real rows with response tokens
    return config, batch


def _three_steps(config, batch, devices, mesh_config, accum_steps=1):
    model_config = llama_config(config)
    tx, schedule = optimizer.make_optimizer(config.optimizer, 10)
    mesh = sharding.make_mesh(mesh_config, devices)
    setup = state_lib.make_setup(model_config, tx, mesh, sharding.DEFAULT_RULES)
    state = state_lib.init_train_state(setup, model_config, tx, seed=0)
    train_step = step_lib.jit_train_step(setup, tx, schedule, accum_steps)
    global_batch = pipeline.to_global_batch(batch, mesh, sharding.batch_sharding(mesh).spec)
    losses = []
    for _ in range(3):  # warmup: step 0 has learning rate 0; the later ones use non-zero Adam moments
        state, metrics = train_step(state, global_batch)
        losses.append(float(metrics["loss"]))
    return state, losses


def test_sharded_step_matches_single_device(config_and_batch):
    config, batch = config_and_batch
    one_state, one_losses = _three_steps(config, batch, jax.devices()[:1], sharding.MeshConfig())
    mesh_config = sharding.MeshConfig(fsdp=4, tensor=2)
    for accum_steps in (1, 2):
        state, losses = _three_steps(config, batch, jax.devices(), mesh_config, accum_steps)
        np.testing.assert_allclose(losses, one_losses, rtol=1e-5, atol=1e-5)
        for ours, reference in zip(jax.tree.leaves(state.params), jax.tree.leaves(one_state.params)):
            np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), atol=1e-5, rtol=0)
    assert one_losses[2] < one_losses[0]

    # Parameters and both Adam moments are split as DEFAULT_RULES say; scalars are replicated.
    mlp = state.params["layers"]["mlp"]
    assert mlp["up_proj"].sharding.spec == P(None, "fsdp", "tensor")  # (layers, embed, mlp)
    assert mlp["down_proj"].sharding.spec == P(None, "tensor", "fsdp")  # (layers, mlp, embed)
    assert state.params["embed_tokens"].sharding.spec == P("tensor", "fsdp")  # (vocab, embed)
    assert state.params["layers"]["attention"]["q_proj"].sharding.spec == P(None, "fsdp", "tensor", None)
    assert len(mlp["up_proj"].addressable_shards[0].data.shape) == 3
    assert mlp["up_proj"].addressable_shards[0].data.shape[1:] == (64 // 4, 128 // 2)
    adam = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)]
    assert len(adam) == 1
    for moment in (adam[0].mu, adam[0].nu):
        assert moment["layers"]["mlp"]["up_proj"].sharding.spec == P(None, "fsdp", "tensor")
    assert adam[0].count.sharding.spec == P()
    assert state.step.sharding.spec == P()


def test_loss_is_per_token_mean_over_the_global_batch(config_and_batch, prepared):
    """Per-token mean: rows with more loss tokens weigh more (not a mean of per-row means)."""
    config, batch = config_and_batch
    model_config = llama_config(config)
    mesh = sharding.make_mesh(sharding.MeshConfig(), jax.devices()[:1])
    setup = state_lib.make_setup(model_config, optax.sgd(0.0), mesh,
                                 sharding.DEFAULT_RULES)
    params = state_lib.init_train_state(setup, model_config, optax.sgd(0.0), seed=0).params
    loss_sum, count = step_lib.loss_sums(setup.graphdef, params, jax.tree.map(np.asarray, batch))
    per_row = [step_lib.loss_sums(setup.graphdef, params, {k: v[i:i + 1] for k, v in batch.items()})
               for i in range(len(batch["input_ids"]))]
    np.testing.assert_allclose(float(loss_sum), sum(float(s) for s, _ in per_row), rtol=1e-5)
    assert float(count) == batch["loss_mask"].sum()


def test_schedule_warmup_then_cosine():
    config = demo_config()
    config.optimizer.learning_rate = 2e-5
    config.optimizer.warmup_ratio = 0.03
    schedule = optimizer.learning_rate_schedule(config.optimizer, 1000)
    assert optimizer.warmup_steps(config.optimizer, 1000) == 30
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(15)), 1e-5, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(30)), 2e-5, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(30 + 485)), 1e-5, rtol=1e-3)  # half-way down the cosine
    assert float(schedule(1000)) < 1e-9
    config.optimizer.schedule = "exponential"
    with pytest.raises(ValueError, match="optimizer.schedule"):
        optimizer.learning_rate_schedule(config.optimizer, 1000)


def test_weight_decay_mask_excludes_norms_and_embeddings(prepared):
    config = tiny_config(prepared)
    _, abstract = state_lib.abstract_model(llama_config(config))
    mask = optimizer.weight_decay_mask(nnx.to_pure_dict(abstract), tuple(config.optimizer.no_decay))
    assert mask["layers"]["mlp"]["up_proj"] and mask["lm_head"] and mask["layers"]["attention"]["o_proj"]
    assert not mask["embed_tokens"] and not mask["norm"]["scale"] and not mask["layers"]["input_norm"]["scale"]

    # With decay on and zero gradients, only the masked-in parameters shrink.
    config.optimizer.weight_decay = 0.1
    config.optimizer.warmup_ratio = 0.0
    config.optimizer.schedule = "constant"
    tx, _ = optimizer.make_optimizer(config.optimizer, 10)
    params = {"embed_tokens": np.ones(3, np.float32), "w": np.ones(3, np.float32)}
    updates, _ = tx.update(jax.tree.map(np.zeros_like, params), tx.init(params), params)
    assert float(np.abs(updates["embed_tokens"]).max()) == 0.0 and float(updates["w"][0]) < 0


def test_bad_rules_and_model_fields_fail_clearly(prepared):
    with pytest.raises(ValueError, match="mesh axis 'model'"):
        sharding.rules_from_config([("embed", "model")])
    assert sharding.rules_from_config([("embed", ["data", "fsdp"])])[0] == ("embed", ("data", "fsdp"))
    config = tiny_config(prepared)
    config.model.hidden_sise = 3
    with pytest.raises(ValueError, match="hidden_sise"):
        llama_config(config)

"""The mesh and the logical-axis rules (alpacare_jax/sharding.py), on the 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from alpacare_jax import sharding
from alpacare_jax.model import Llama, LlamaConfig


@pytest.mark.parametrize("config, shape", [
    (sharding.MeshConfig(), (1, 8, 1)),
    (sharding.MeshConfig(data=2, fsdp=-1, tensor=2), (2, 2, 2)),
    (sharding.MeshConfig(data=-1, fsdp=1, tensor=4), (2, 1, 4)),
])
def test_mesh_shape_fills_the_minus_one_axis(config, shape):
    mesh = sharding.make_mesh(config)
    assert mesh.axis_names == sharding.MESH_AXES
    assert tuple(mesh.shape.values()) == shape
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


@pytest.mark.parametrize("config, message", [
    (sharding.MeshConfig(data=-1, fsdp=-1), "at most one mesh axis may be -1"),
    (sharding.MeshConfig(data=3, fsdp=-1), "cannot be split"),
    (sharding.MeshConfig(data=2, fsdp=2, tensor=1), "needs 4 devices, but 8"),
])
def test_bad_mesh_shapes_fail_clearly(config, message):
    with pytest.raises(ValueError, match=message):
        sharding.make_mesh(config)


def test_activations_reuse_parameter_names_first_free_axis_wins():
    # A weight [embed, mlp] is FSDP x tensor; an activation [batch, length, embed] gives the fsdp axis to
    # the batch (the first rule naming it), so its embed dimension stays whole.
    assert sharding.logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
    assert sharding.logical_to_spec(("batch", "length", "embed")) == P(("data", "fsdp"), None, None)
    assert sharding.logical_to_spec(None) == P()
    tensor_only = sharding.rules_from_config([("embed", None), ("mlp", "tensor")])
    assert sharding.logical_to_spec(("embed", "mlp"), tensor_only) == P(None, "tensor")


def test_rules_from_config_validates_mesh_axes_and_pairs():
    assert sharding.rules_from_config(None) == sharding.DEFAULT_RULES
    assert sharding.rules_from_config([["vocab", ["fsdp", "tensor"]]]) == (("vocab", ("fsdp", "tensor")),)
    with pytest.raises(ValueError, match="mesh axis 'model'"):
        sharding.rules_from_config([("embed", "model")])
    with pytest.raises(ValueError, match="not a \\(logical_name, mesh_axes\\) pair"):
        sharding.rules_from_config([("embed",)])


def test_model_parameters_and_optimizer_moments_shard_by_their_names():
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=4, tensor=2))
    config = LlamaConfig.tiny(hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2)
    abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
    params = sharding.param_shardings(nnx.state(abstract, nnx.Param), mesh)
    flat = {"/".join(map(str, k)): v for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    gate = next(s for k, s in flat.items() if "gate" in k)
    assert gate.spec == P(None, "fsdp", "tensor")  # [layers, embed, mlp]
    embed = next(s for k, s in flat.items() if "embed_tokens" in k)
    assert embed.spec == P("tensor", "fsdp")  # [vocab, embed]

    tx = optax.adamw(1e-3)
    abstract_params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    opt_shardings = sharding.optimizer_state_shardings(tx, jax.eval_shape(tx.init, abstract_params), params, mesh)
    adam = opt_shardings[0]
    assert jax.tree.structure(adam.mu) == jax.tree.structure(params)
    assert all(m.spec == p.spec for m, p in zip(jax.tree.leaves(adam.mu), jax.tree.leaves(params), strict=True))
    assert adam.count.spec == P()  # scalars are replicated


def test_shard_map_logical_splits_over_the_active_mesh_and_is_a_no_op_without_one():
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=4, tensor=2))
    x = jnp.arange(8 * 6, dtype=jnp.float32).reshape(8, 6)

    def local_rows(block):  # sees one shard per device: 2 of 8 rows under fsdp=4
        return jnp.full((block.shape[0], 1), block.shape[0], jnp.float32)

    fn = sharding.shard_map_logical(local_rows, in_names=[("embed", None)], out_names=("embed", None))
    np.testing.assert_array_equal(fn(x), np.full((8, 1), 8.0))  # no mesh active: whole array
    with sharding.activate(mesh):
        fn = sharding.shard_map_logical(local_rows, in_names=[("embed", None)], out_names=("embed", None))
        np.testing.assert_array_equal(jax.jit(fn)(x), np.full((8, 1), 2.0))


def test_batch_sharding_splits_rows_over_data_and_fsdp():
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    batch = jax.device_put(np.zeros((8, 16), np.int32), sharding.batch_sharding(mesh))
    assert {s.data.shape for s in batch.addressable_shards} == {(2, 16)}

"""The one place where logical axis names meet the device mesh.

Model code names the axes of its parameters and activations logically (`embed`, `mlp`, `heads`, ...).
This module owns the mesh (axes `data`, `fsdp`, `tensor`, built from the config) and the rule table that
maps each logical name to mesh axes. Changing how a model is parallelised therefore means editing a
rule table in a config, never the model.

Rules follow flax's convention: for each logical axis the first rule whose mesh axes are still unused
in that array's spec wins, so activations reuse the parameter names (`("batch", "length", "embed")`
shards `batch` over data+fsdp and leaves `embed` whole, because `fsdp` is already taken).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

LogicalRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# FSDP over `fsdp` (parameters and optimizer state split along `embed`), Megatron-style tensor
# parallelism over `tensor` (heads, MLP and vocabulary split), data parallelism over `data` + `fsdp`.
DEFAULT_RULES: LogicalRules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("classes", None),  # the scoring head's output (one score per sequence): too small to split
    ("lora_rank", None),  # LoRA adapters' low-rank axis (alpacare_jax.model.lora): a few dozen entries
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape per axis; one axis may be -1 to take all remaining devices.

    `dcn_data` > 1 builds a multi-slice mesh (TPU slices joined over the data-centre network): the
    `data` axis then spans slices, the cheap place for the once-per-step gradient all-reduce.
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    dcn_data: int = 1

    @classmethod
    def from_config(cls, cfg: Any) -> MeshConfig:
        return cls(**{f.name: int(cfg[f.name]) for f in dataclasses.fields(cls) if f.name in cfg})


def _resolve_shape(sizes: Sequence[int], num_devices: int) -> tuple[int, ...]:
    sizes = list(sizes)
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"{num_devices} devices cannot be split into mesh {dict(zip(MESH_AXES, sizes))}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, but {num_devices} are available"
        )
    return tuple(sizes)


def make_mesh(cfg: MeshConfig | Any = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the (data, fsdp, tensor) mesh, topology-aware on TPU via mesh_utils."""
    from jax.experimental import mesh_utils

    cfg = cfg if isinstance(cfg, MeshConfig) else MeshConfig.from_config(cfg)
    devices = list(jax.devices() if devices is None else devices)
    if cfg.dcn_data > 1:
        per_slice = _resolve_shape((cfg.data, cfg.fsdp, cfg.tensor), len(devices) // cfg.dcn_data)
        device_array = mesh_utils.create_hybrid_device_mesh(
            per_slice, (cfg.dcn_data, 1, 1), devices=devices
        )
    else:
        shape = _resolve_shape((cfg.data, cfg.fsdp, cfg.tensor), len(devices))
        try:
            device_array = mesh_utils.create_device_mesh(shape, devices=devices)
        except (ValueError, NotImplementedError, AssertionError):
            device_array = np.asarray(devices).reshape(shape)
    return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(names: Sequence[str | None] | None, rules: LogicalRules = DEFAULT_RULES) -> PartitionSpec:
    if names is None:
        return PartitionSpec()
    return nn.logical_to_mesh_axes(tuple(names), rules)


def logical_sharding(mesh: Mesh, names: Sequence[str | None] | None,
                     rules: LogicalRules = DEFAULT_RULES) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, rules))


def axis_names_of(variable: nnx.Variable) -> tuple[str | None, ...] | None:
    """The logical names a model attached to a parameter (flax stores them as `out_sharding`)."""
    return variable.get_metadata().get("out_sharding")


def state_shardings(state: nnx.State, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> nnx.State:
    """A NamedSharding for every variable of an nnx State (or abstract State), from its logical names."""

    def one(variable):
        return logical_sharding(mesh, axis_names_of(variable), rules)

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


# ---- activations --------------------------------------------------------------------------------------

@contextlib.contextmanager
def activate(mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Iterator[None]:
    """Makes `mesh` and `rules` current so that `constrain` inside traced model code takes effect."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside `activate` (single device, tests)."""
    return nn.with_logical_constraint(x, tuple(names))


def shard_map_logical(fn: Callable[..., Any], in_names: Sequence[Any], out_names: Any) -> Callable[..., Any]:
    """`fn` run per shard (jax.shard_map) over the active mesh, its specs given by logical names.

    For per-device kernels (Pallas) that cannot be partitioned by the compiler: model code names the
    logical axes of each argument and output (a tuple per array; None keeps a dimension whole) and this
    maps them to mesh axes with the active rules. Outside `activate`, or on a one-device mesh, `fn` is
    simply called on the whole arrays.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn
    spec = lambda names: nn.logical_to_mesh_axes(tuple(names))
    is_names = lambda x: isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)
    in_specs = tuple(spec(n) for n in in_names)
    out_specs = jax.tree.map(spec, out_names, is_leaf=is_names)
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


# ---- training state and batches ------------------------------------------------------------------------

def rules_from_config(rules: Sequence[Sequence[Any]] | None) -> LogicalRules:
    """A rule table from a config's list of `(logical_name, mesh_axes)` pairs (None: DEFAULT_RULES).

    Config files and command-line overrides give lists; flax wants tuples, and a typo in a mesh axis
    should fail here, not as an obscure partitioning error inside jit.
    """
    if not rules:
        return DEFAULT_RULES
    table = []
    for rule in rules:
        if len(rule) != 2:
            raise ValueError(f"sharding rule {rule!r} is not a (logical_name, mesh_axes) pair")
        name, axes = rule
        axes = tuple(axes) if isinstance(axes, (list, tuple)) else axes
        for axis in (axes if isinstance(axes, tuple) else (axes,)):
            if axis is not None and axis not in MESH_AXES:
                raise ValueError(f"sharding rule for {name!r} names mesh axis {axis!r}; mesh axes are {MESH_AXES}")
        table.append((str(name), axes))
    return tuple(table)


def param_shardings(abstract_model_state: nnx.State, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> dict:
    """NamedShardings of a model's parameters as a plain nested dict (the train state's `params` layout)."""
    return nnx.to_pure_dict(state_shardings(abstract_model_state, mesh, rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def optimizer_state_shardings(tx: Any, abstract_opt_state: Any, params_shardings: Any, mesh: Mesh) -> Any:
    """Optimizer-state shardings: moments shard like the parameters they track, scalars are replicated.

    `optax.tree_map_params` knows which parts of any optax state mirror the parameter tree, so this works
    for every optimizer chain without naming its state classes.
    """
    return optax.tree_map_params(
        tx, lambda _, sharding: sharding, abstract_opt_state, params_shardings,
        transform_non_params=lambda _: replicated(mesh),
    )


def batch_sharding(mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> NamedSharding:
    """Sharding of a [batch, length] input array: rows over the data-parallel axes per the `batch` rule."""
    return logical_sharding(mesh, ("batch", "length"), rules)

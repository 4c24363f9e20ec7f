"""Hugging Face <-> JAX conversion for LLaMA checkpoints (safetensors).

Checkpoints may be local directories or gs:// URLs (`alpacare_jax.storage`). Import reads, on each host,
only the byte ranges of the tensor rows assigned to its own devices, chunk by chunk and straight into
device buffers on their final shards, so a model sharded over a mesh is never assembled on a host and a
pod's hosts share the reading of one copy. Stacked decoder-layer parameters are filled one layer at a time
into a donated device buffer. Export gathers one tensor at a time and streams it into the safetensors
shard being written, so host memory peaks at about one tensor.

Rotary layout: HF stores q/k rows in the half-split ("rotate_half") order that `alpacare_jax.model.rope`
uses, so q/k weights are copied without permutation; the parity tests against transformers prove it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding
from tqdm.auto import tqdm

from alpacare_jax import sharding as sharding_lib
from alpacare_jax import storage
from alpacare_jax.model import Llama, LlamaConfig, LlamaForScoring, RopeScaling

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
# What a `LlamaForScoring` (the multiple-choice objective's model) is exported as: transformers'
# sequence classifier with num_labels=1, whose `score` head and last-non-pad-token pooling it matches.
SCORING_ARCHITECTURE = "LlamaForSequenceClassification"
CONFIG_FILE = "config.json"  # what marks a directory as a Hugging Face model
CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Buffers some older checkpoints saved; they are recomputed from the config, never loaded.
IGNORED_TENSORS = re.compile(r".*rotary_emb\.inv_freq$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted; the message names the file and tensor."""


# ---- config.json <-> LlamaConfig ------------------------------------------------------------------------

_REQUIRED_CONFIG_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads")


def read_config(config_file: epath.Path) -> dict[str, Any]:
    """The JSON object in an HF `config.json`; anything else raises naming the file."""
    try:
        hf = json.loads(config_file.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{config_file}: not valid JSON ({err})") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{config_file}: expected a JSON object, got {type(hf).__name__}")
    return hf


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> LlamaConfig:
    architectures = hf.get("architectures") or []
    model_type = hf.get("model_type")
    if model_type != "llama" or (architectures and not set(architectures) & set(SUPPORTED_ARCHITECTURES)):
        raise CheckpointError(
            f"{source}: unsupported architecture (model_type={model_type!r}, architectures={architectures}); "
            f"supported: model_type 'llama' with {SUPPORTED_ARCHITECTURES}"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise CheckpointError(f"{source}: {flag}=true is not supported (LLaMA has no biases)")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act={hf['hidden_act']!r} is not supported (LLaMA uses silu)")
    parameters = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling") or (parameters if isinstance(parameters, dict) else None)
    rope_theta = hf.get("rope_theta") or (scaling or {}).get("rope_theta") or 10000.0
    rope_scaling = None
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        if scaling.get("rope_type", scaling.get("type")) != "llama3":
            raise CheckpointError(f"{source}: rope_scaling type {scaling.get('rope_type')!r} is not supported")
        fields = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        if missing := [f for f in fields if f not in scaling]:
            raise CheckpointError(f"{source}: field 'rope_scaling.{missing[0]}' is missing")
        rope_scaling = RopeScaling(
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    missing = [f for f in _REQUIRED_CONFIG_FIELDS if f not in hf]
    if missing:
        raise CheckpointError(
            f"{source}: field {missing[0]!r} is missing (a LLaMA config needs {_REQUIRED_CONFIG_FIELDS})")
    num_heads = hf["num_attention_heads"]
    return LlamaConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=1 if hf.get("bos_token_id") is None else hf["bos_token_id"],
        eos_token_id=2 if hf.get("eos_token_id") is None else hf["eos_token_id"],
    )


def config_to_hf(config: LlamaConfig, dtype: str, *, scoring: bool = False,
                 pad_token_id: int | None = None) -> dict[str, Any]:
    """HF `config.json` of a causal LM, or with `scoring` of a one-label sequence classifier."""
    hf: dict[str, Any] = {
        "architectures": [SCORING_ARCHITECTURE] if scoring else list(SUPPORTED_ARCHITECTURES),
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(config.eos_token_ids) if len(config.eos_token_ids) > 1 else config.eos_token_ids[0],
        "torch_dtype": dtype,
    }
    if config.rope_scaling is not None:
        hf["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(config.rope_scaling)}
    if scoring:
        # One label: the score itself. transformers pools on the last token that is not `pad_token_id`.
        hf.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0}, pad_token_id=pad_token_id)
    return hf


# ---- tensor name and layout mapping ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TensorLayout:
    """How one of our parameters relates to an HF tensor.

    ours = hf.reshape(split).transpose(perm): `split` lists, for each HF dimension, the sizes it splits
    into (q_proj's [heads*head_dim, embed] splits its rows into (heads, head_dim)); `perm` orders the
    split dimensions as ours. `stacked` parameters hold all layers and map to one HF tensor per layer.
    """

    ours: tuple[str, ...]
    hf_name: str  # "{layer}" is replaced by the layer number for stacked parameters
    split: tuple[tuple[int, ...], ...]
    perm: tuple[int, ...]
    stacked: bool

    def hf_names(self, num_layers: int) -> list[str]:
        return [self.hf_name.format(layer=i) for i in range(num_layers)] if self.stacked else [self.hf_name]

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return tuple(math.prod(sizes) for sizes in self.split)

    @property
    def rows_per_unit(self) -> int:
        """HF rows per index of our dimension that HF's leading dimension (or its first part) became."""
        return math.prod(self.split[0][1:])

    def to_ours(self, rows: Any) -> Any:
        """HF rows (a whole number of units, all other dimensions whole) in our layout (numpy or jax)."""
        split_sizes = [*self.split[0][1:], *(s for sizes in self.split[1:] for s in sizes)]
        return rows.reshape((-1, *split_sizes)).transpose(self.perm)


def tensor_layouts(config: LlamaConfig, *, scoring: bool = False) -> list[TensorLayout]:
    """Every parameter of `Llama` (or with `scoring`, of `LlamaForScoring`), in HF's tensor order."""
    e, h, k, d = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    m, v = config.intermediate_size, config.vocab_size
    prefix = "model.layers.{layer}."

    def layer(ours: tuple[str, ...], hf: str, split, perm) -> TensorLayout:
        return TensorLayout(("layers", *ours), prefix + hf, split, perm, stacked=True)

    layouts = [
        TensorLayout(("embed_tokens",), "model.embed_tokens.weight", ((v,), (e,)), (0, 1), stacked=False),
        layer(("input_norm", "scale"), "input_layernorm.weight", ((e,),), (0,)),
        layer(("attention", "q_proj"), "self_attn.q_proj.weight", ((h, d), (e,)), (2, 0, 1)),
        layer(("attention", "k_proj"), "self_attn.k_proj.weight", ((k, d), (e,)), (2, 0, 1)),
        layer(("attention", "v_proj"), "self_attn.v_proj.weight", ((k, d), (e,)), (2, 0, 1)),
        layer(("attention", "o_proj"), "self_attn.o_proj.weight", ((e,), (h, d)), (1, 2, 0)),
        layer(("post_attention_norm", "scale"), "post_attention_layernorm.weight", ((e,),), (0,)),
        layer(("mlp", "gate_proj"), "mlp.gate_proj.weight", ((m,), (e,)), (1, 0)),
        layer(("mlp", "up_proj"), "mlp.up_proj.weight", ((m,), (e,)), (1, 0)),
        layer(("mlp", "down_proj"), "mlp.down_proj.weight", ((e,), (m,)), (1, 0)),
        TensorLayout(("norm", "scale"), "model.norm.weight", ((e,),), (0,), stacked=False),
    ]
    if scoring:
        layouts.append(TensorLayout(("score",), "score.weight", ((1,), (e,)), (1, 0), stacked=False))
    elif not config.tie_word_embeddings:
        layouts.append(TensorLayout(("lm_head",), "lm_head.weight", ((v,), (e,)), (1, 0), stacked=False))
    return layouts


# ---- reading ----------------------------------------------------------------------------------------------

# safetensors dtype names that LLaMA checkpoints use (little-endian, as the format stores them).
_NUMPY_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
                 "BF16": np.dtype(ml_dtypes.bfloat16)}
_MAX_HEADER_BYTES = 100 * 2**20  # the limit the safetensors library itself enforces
_HEADER_PROBE_BYTES = 64 * 2**10  # one request reads the whole header of a usual LLaMA shard


@dataclasses.dataclass(frozen=True)
class _StoredTensor:
    """Where one tensor's bytes lie in a safetensors file: row-major from `offset` (from the file's start)."""

    file: epath.Path
    name: str
    dtype: str  # the safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * _NUMPY_DTYPES[self.dtype].itemsize


def _read_header(file: epath.Path) -> dict[str, _StoredTensor]:
    """The tensors of one safetensors file, from its header (8-byte little-endian size, then JSON).

    The format is read here rather than with `safetensors.safe_open`, which opens local files only: the
    same few bytes come from a local file or a gs:// object, and only the tensor rows needed are read later.
    """
    [head] = storage.read_ranges(file, [(0, _HEADER_PROBE_BYTES)])
    size = int.from_bytes(head[:8], "little")
    if len(head) < 8 or size > _MAX_HEADER_BYTES:
        raise CheckpointError(f"{file}: not a readable safetensors file (no valid header size)")
    if 8 + size > len(head) == _HEADER_PROBE_BYTES:
        [rest] = storage.read_ranges(file, [(len(head), 8 + size)])
        head += rest
    try:
        header = json.loads(head[8:8 + size])
        tensors = {}
        for name, entry in header.items():
            if name != "__metadata__":
                begin, end = (int(i) for i in entry["data_offsets"])
                tensors[name] = _StoredTensor(file, name, entry["dtype"], tuple(int(n) for n in entry["shape"]),
                                              8 + size + begin, end - begin)
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{file}: not a readable safetensors file (header: {err!r})") from None
    return tensors


class _SafetensorsDir:
    """A single-file or index-sharded safetensors checkpoint: which file holds which tensor, and where."""

    def __init__(self, path: epath.Path):
        self.path = path
        self._headers: dict[str, dict[str, _StoredTensor]] = {}
        index_file, single = path / INDEX_FILE, path / SINGLE_FILE
        if index_file.exists():
            try:
                self.weight_map: dict[str, str] = json.loads(index_file.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{index_file}: not a safetensors index ({err})") from err
        elif single.exists():
            self._headers[SINGLE_FILE] = _read_header(single)
            self.weight_map = {name: SINGLE_FILE for name in self._headers[SINGLE_FILE]}
        else:
            raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} found")

    def files(self) -> dict[str, list[str]]:
        by_file: dict[str, list[str]] = {}
        for name, file in self.weight_map.items():
            by_file.setdefault(file, []).append(name)
        return by_file

    def check(self, layouts: list[TensorLayout], config: LlamaConfig) -> dict[str, _StoredTensor]:
        """The tensors `layouts` need, in file order; fails before any tensor data is read on a missing,
        misshapen or unexpected tensor (headers only)."""
        expected = {name: layout.hf_shape for layout in layouts for name in layout.hf_names(config.num_layers)}
        for name in expected:
            if name not in self.weight_map:
                raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        found: dict[str, _StoredTensor] = {}
        for file, names in self.files().items():
            if file not in self._headers:
                try:
                    self._headers[file] = _read_header(self.path / file)
                except FileNotFoundError:
                    raise CheckpointError(
                        f"{self.path / file}: shard listed for tensor {names[0]!r} does not exist") from None
            present = self._headers[file]
            for name in names:
                if name not in present:
                    raise CheckpointError(f"{self.path / file}: tensor {name!r} is missing (the index lists it there)")
                if name not in expected:
                    continue
                stored = present[name]
                if stored.shape != expected[name]:
                    raise CheckpointError(f"{self.path / file}: tensor {name!r} has shape {list(stored.shape)}, "
                                          f"expected {list(expected[name])} from config.json")
                if stored.dtype not in _NUMPY_DTYPES:
                    raise CheckpointError(f"{self.path / file}: tensor {name!r} has dtype {stored.dtype}, "
                                          f"expected one of {sorted(_NUMPY_DTYPES)}")
                if stored.nbytes != math.prod(stored.shape) * _NUMPY_DTYPES[stored.dtype].itemsize:
                    raise CheckpointError(f"{self.path / file}: tensor {name!r}: its data_offsets do not match "
                                          f"its shape and dtype (a corrupt header)")
                found[name] = stored
        # Tied checkpoints sometimes still carry a copy of the head; it is the embedding, so skip it.
        redundant = {"lm_head.weight"} if config.tie_word_embeddings else set()
        unexpected = sorted(
            n for n in self.weight_map if n not in expected and n not in redundant and not IGNORED_TENSORS.match(n)
        )
        if unexpected:
            raise CheckpointError(
                f"{self.path}: unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} "
                "(not part of a LLaMA model; is this another architecture?)"
            )
        return found


@dataclasses.dataclass(frozen=True)
class _Chunk:
    """HF rows [start, stop) of a stored tensor, bound for `layout`'s parameter (layer `layer` if stacked)."""

    tensor: _StoredTensor
    layout: TensorLayout
    layer: int | None
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start

    def padded_shape(self, num_blocks: int) -> tuple[int, ...]:
        """The chunk's rows split into `num_blocks` equal blocks, the last ones padded (jax shards evenly)."""
        return (-(-self.rows // num_blocks) * num_blocks, *self.tensor.shape[1:])

    def starts(self) -> tuple[int, ...]:
        """Where the chunk goes in its parameter (with the layer index first for a stacked one)."""
        starts = [0] * len(self.layout.perm)
        starts[self.layout.perm.index(0)] = self.start // self.layout.rows_per_unit
        return (self.layer, *starts) if self.layout.stacked else tuple(starts)


def _chunks(tensors: dict[str, _StoredTensor], sources: dict[str, tuple[TensorLayout, int | None]],
            chunk_bytes: int) -> list[_Chunk]:
    """Every tensor in runs of whole units of rows (a q_proj unit is a head's head_dim rows) of about
    `chunk_bytes`."""
    chunks = []
    for name, tensor in tensors.items():
        layout, layer = sources[name]
        unit = layout.rows_per_unit
        step = max(1, chunk_bytes // (tensor.row_bytes * unit)) * unit
        chunks.extend(_Chunk(tensor, layout, layer, start, min(start + step, tensor.shape[0]))
                      for start in range(0, tensor.shape[0], step))
    return chunks


_READ_CHUNK_BYTES = 32 * 2**20  # what one process reads for a chunk (two are held: one read ahead)
_RANGE_BYTES = 8 * 2**20  # one read request; a chunk's go out together (storage.MAX_REQUESTS_IN_FLIGHT at once)


def _read_own_rows(chunk: _Chunk, rows_sharding: jax.sharding.Sharding) -> dict[int, list[np.ndarray]]:
    """This process's blocks of `chunk` under `rows_sharding`: {first row of a block in the padded chunk:
    the rows of it that hold data, in pieces} (padding is never read).

    Neighbouring blocks are read as one run of rows, in requests of whole rows of at most `_RANGE_BYTES`
    each, all sent together. The pieces are views of what was received: a block is assembled only when its
    device buffer is filled.
    """
    tensor = chunk.tensor
    shape = chunk.padded_shape(len(rows_sharding.device_set))
    blocks = sorted({(begin, min(end, chunk.rows)) for begin, end, _ in
                     (index[0].indices(shape[0])
                      for index in rows_sharding.addressable_devices_indices_map(shape).values())})
    runs: list[list[int]] = []
    for begin, end in blocks:
        if runs and runs[-1][1] >= begin:
            runs[-1][1] = max(runs[-1][1], end)
        elif begin < end:
            runs.append([begin, end])
    rows_per_request = max(1, _RANGE_BYTES // tensor.row_bytes)
    requests = [(row, min(row + rows_per_request, end)) for begin, end in runs
                for row in range(begin, end, rows_per_request)]
    received = storage.read_ranges(tensor.file, [(tensor.offset + (chunk.start + row) * tensor.row_bytes,
                                                  tensor.offset + (chunk.start + stop) * tensor.row_bytes)
                                                 for row, stop in requests])
    pieces = []
    for (row, stop), data in zip(requests, received):
        if len(data) != (stop - row) * tensor.row_bytes:
            raise CheckpointError(f"{tensor.file}: tensor {tensor.name!r} is cut short (the file is truncated)")
        pieces.append((row, stop, np.frombuffer(data, _NUMPY_DTYPES[tensor.dtype]).reshape(stop - row, *shape[1:])))
    return {begin: [rows[max(begin, row) - row:min(end, stop) - row]
                    for row, stop, rows in pieces if row < end and stop > begin]
            for begin, end in blocks}


def _chunk_array(chunk: _Chunk, rows_sharding: jax.sharding.Sharding) -> jax.Array:
    """`chunk` as one array split by rows over `rows_sharding` (padded to equal blocks), each of this
    process's blocks made from the rows it read."""
    own = _read_own_rows(chunk, rows_sharding)
    shape = chunk.padded_shape(len(rows_sharding.device_set))
    block_rows = shape[0] // len(rows_sharding.device_set)
    dtype = _NUMPY_DTYPES[chunk.tensor.dtype]

    def block(index: tuple[slice, ...]) -> np.ndarray:
        pieces = own[index[0].indices(shape[0])[0]]
        missing = block_rows - sum(len(p) for p in pieces)
        if missing:  # the padding of the last block(s)
            pieces = [*pieces, np.zeros((missing, *shape[1:]), dtype)]
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    return jax.make_array_from_callback(shape, rows_sharding, block)


@functools.cache
def _placer(layout: TensorLayout, rows: int, sharding: jax.sharding.Sharding):
    """A jitted update writing a chunk (padded HF rows, sharded by rows) into its parameter's buffer in place.

    The layout change and the cast run on the devices, which also move each row to the shards that hold it
    under the parameter's own sharding (over the interconnect, not through the hosts).
    """

    def place(buffer: jax.Array, piece: jax.Array, starts: tuple[jax.Array, ...]) -> jax.Array:
        block = layout.to_ours(piece[:rows]).astype(buffer.dtype)
        return jax.lax.dynamic_update_slice(buffer, block[None] if layout.stacked else block, starts)

    return jax.jit(place, donate_argnums=0, out_shardings=sharding)


def _prefetched(read, items: list) -> Iterator[tuple[Any, Any]]:
    """(item, read(item)) in order, the next item's read running in a thread while the caller works."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        upcoming = pool.submit(read, items[0]) if items else None
        for i, item in enumerate(items):
            result = upcoming.result()
            if i + 1 < len(items):
                upcoming = pool.submit(read, items[i + 1])
            yield item, result


def load_pretrained(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    compute_dtype: Any = None,
    mesh: Mesh | None = None,
    rules: sharding_lib.LogicalRules = sharding_lib.DEFAULT_RULES,
    **config_overrides: Any,
) -> Llama:
    """Loads an HF LLaMA directory (local, or a gs:// URL) as an NNX `Llama` with parameters in `dtype`.

    With `mesh`, every parameter is placed on the shards its logical names map to under `rules`. The hosts
    share the reading: the rows of every tensor are split evenly over all devices of the mesh, each process
    fetches only its own devices' rows (ranged reads, several requests in flight), and the devices then
    exchange rows into the parameter's sharding. So each of N hosts reads about 1/N of the checkpoint
    whatever the sharding, and no host ever holds the whole model. `config_overrides` set non-architectural
    fields such as `remat_policy` or `attention_impl`.
    """
    path = epath.Path(path)
    config_file = path / CONFIG_FILE
    if not config_file.exists():
        raise CheckpointError(f"{path}: no {CONFIG_FILE} (not a Hugging Face model directory)")
    config = config_from_hf(read_config(config_file), str(config_file)).replace(
        param_dtype=jnp.dtype(dtype).name, dtype=jnp.dtype(compute_dtype or dtype).name, **config_overrides
    )
    layouts = tensor_layouts(config)
    tensors = _SafetensorsDir(path).check(layouts, config)

    graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))))
    if mesh is not None:
        shardings = sharding_lib.state_shardings(state, mesh, rules)
        rows_sharding: jax.sharding.Sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names))
    else:
        rows_sharding = SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: rows_sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    target_dtype = np.dtype(jnp.dtype(dtype))

    # Every parameter starts as a device buffer on its final shards and is filled in place (donated), one
    # chunk of rows at a time: a host holds at most two chunks of its own rows besides the model itself.
    sources = {name: (layout, i if layout.stacked else None)
               for layout in layouts for i, name in enumerate(layout.hf_names(config.num_layers))}
    buffer_shardings = {layout.ours: _lookup(shardings, layout.ours) for layout in layouts}
    shapes = {ours: _lookup(state, ours).shape for ours in buffer_shardings}
    values = jax.jit(lambda: {ours: jnp.zeros(shape, target_dtype) for ours, shape in shapes.items()},
                     out_shardings=buffer_shardings)()
    # The same plan on every process (all take part in each update), sized so each reads ~_READ_CHUNK_BYTES.
    chunks = _chunks(tensors, sources, _READ_CHUNK_BYTES * jax.process_count())

    progress = tqdm(total=len(tensors), desc=f"load {path.name}", unit="tensor", disable=jax.process_index() != 0)
    for chunk, piece in _prefetched(lambda c: _chunk_array(c, rows_sharding), chunks):
        place = _placer(chunk.layout, chunk.rows, buffer_shardings[chunk.layout.ours])
        starts = tuple(jnp.int32(s) for s in chunk.starts())
        values[chunk.layout.ours] = place(values[chunk.layout.ours], piece, starts)
        if chunk.stop == chunk.tensor.shape[0]:
            progress.update()
    progress.close()
    for ours, value in values.items():
        _lookup(state, ours).set_value(value)
    return nnx.merge(graphdef, state)


def read_tensors(file: epath.Path, layouts: list[TensorLayout], num_layers: int) -> dict[tuple[str, ...], np.ndarray]:
    """Whole tensors of one small safetensors file (local or gs://) in our layout, {layout.ours: array},
    stacked layouts stacked over their layers. For adapters: `load_pretrained` streams large checkpoints.

    Fails naming the file and tensor on a missing, misshapen or cut-short tensor.
    """
    try:
        stored = _read_header(file)
    except FileNotFoundError:
        raise CheckpointError(f"{file}: no such file") from None
    arrays = {}
    for layout in layouts:
        names = layout.hf_names(num_layers)
        for name in names:
            if name not in stored:
                raise CheckpointError(f"{file}: tensor {name!r} is missing")
            if stored[name].shape != layout.hf_shape or stored[name].dtype not in _NUMPY_DTYPES:
                raise CheckpointError(f"{file}: tensor {name!r} has shape {list(stored[name].shape)} and dtype "
                                      f"{stored[name].dtype}, expected {list(layout.hf_shape)} and one of "
                                      f"{sorted(_NUMPY_DTYPES)}")
        tensors = [stored[name] for name in names]
        data = storage.read_ranges(file, [(t.offset, t.offset + t.nbytes) for t in tensors])
        ours = []
        for tensor, raw in zip(tensors, data):
            if len(raw) != tensor.nbytes:
                raise CheckpointError(f"{file}: tensor {tensor.name!r} is cut short (the file is truncated)")
            ours.append(layout.to_ours(np.frombuffer(raw, _NUMPY_DTYPES[tensor.dtype]).reshape(tensor.shape)))
        arrays[layout.ours] = np.stack(ours) if layout.stacked else ours[0]
    return arrays


def _lookup(tree: Any, keys: tuple[str, ...]) -> Any:
    for key in keys:
        tree = tree[key]
    return tree


# ---- writing ----------------------------------------------------------------------------------------------

def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)\s*", size.upper().replace("IB", "iB"))
    if not match:
        raise ValueError(f"max_shard_size {size!r}: expected bytes or a string like '5GB' or '500MiB'")
    number, unit = float(match.group(1)), match.group(2)
    base = 1024 if "i" in unit else 1000
    return int(number * base ** "BKMGT".index(unit[0]))


def _to_host(array: jax.Array) -> np.ndarray:
    if array.is_fully_addressable:
        return np.asarray(jax.device_get(array))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


@dataclasses.dataclass(frozen=True)
class _ExportTensor:
    name: str
    layout: TensorLayout
    layer: int | None

    def host_array(self, state: nnx.State) -> np.ndarray:
        """The HF-layout host array (possibly a transposed view, to avoid a copy of the whole tensor)."""
        array = _lookup(state, self.layout.ours)[...]
        ours = _to_host(array if self.layer is None else array[self.layer])
        return np.transpose(ours, np.argsort(self.layout.perm)).reshape(self.layout.hf_shape)


_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_WRITE_CHUNK_BYTES = 16 * 2**20


def _write_safetensors(f: IO[bytes], tensors: list[_ExportTensor], state: nnx.State, dtype: np.dtype) -> None:
    """Streams tensors into one safetensors file, one at a time and in bounded chunks.

    The header is known from shapes alone, so nothing needs to be buffered: unlike
    `safetensors.numpy.save_file`, which serialises the whole shard in memory first, peak host memory
    is one device-to-host tensor plus a 16 MiB chunk. The format (8-byte header size, JSON header,
    raw little-endian data) is what transformers and the safetensors library read.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for tensor in tensors:
        nbytes = math.prod(tensor.layout.hf_shape) * dtype.itemsize
        header[tensor.name] = {"dtype": _SAFETENSORS_DTYPES[dtype.name], "shape": list(tensor.layout.hf_shape),
                               "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    f.write(len(header_bytes).to_bytes(8, "little"))
    f.write(header_bytes)
    for tensor in tensors:
        array = tensor.host_array(state)
        rows_per_chunk = max(1, _WRITE_CHUNK_BYTES // max(1, array[:1].size * dtype.itemsize))
        for start in range(0, array.shape[0], rows_per_chunk):
            f.write(np.ascontiguousarray(array[start:start + rows_per_chunk], dtype=dtype).tobytes())
        del array


def write_tensors(path: str | os.PathLike, layouts: list[TensorLayout], params: Any, num_layers: int, *,
                  dtype: str = "float32") -> None:
    """Streams the tensors of `params` (a nested dict of arrays or an nnx.State) under `layouts`' HF names into
    one safetensors file at `path` (which appears only once complete). On several processes all take part in
    each gather and only process 0 writes."""
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    tensors = [_ExportTensor(name, layout, i if layout.stacked else None)
               for layout in layouts for i, name in enumerate(layout.hf_names(num_layers))]
    if jax.process_index() != 0:
        for tensor in tensors:
            tensor.host_array(params)
        return
    with storage.atomic_writer(epath.Path(path)) as f:
        _write_safetensors(f, tensors, params, np_dtype)


def save_pretrained(
    model: Llama | LlamaForScoring,
    path: str | os.PathLike,
    *,
    dtype: str = "bfloat16",
    max_shard_size: int | str = "5GB",
    tokenizer: Any = None,
) -> None:
    """Writes `model` as an HF LLaMA directory (local, or a gs:// URL) that `transformers` loads as it is.

    A `Llama` becomes a `LlamaForCausalLM`; a `LlamaForScoring` a `LlamaForSequenceClassification`
    with `num_labels=1` whose `pad_token_id` is the tokenizer's pad id (0, LLaMA's `<unk>`, without one).

    Every file appears under its final name only once complete (`storage.atomic_writer`), so an
    interrupted export never leaves a truncated file. On several processes all take part in gathering
    each tensor and only process 0 writes.
    """
    config = model.config
    scoring = isinstance(model, LlamaForScoring)
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    if np_dtype.name not in _SAFETENSORS_DTYPES:
        raise ValueError(f"export dtype {dtype!r}: choose one of {sorted(_SAFETENSORS_DTYPES)}")
    limit = _parse_size(max_shard_size)
    # Plan shards from shapes alone so file names (which carry the total) are known before writing.
    shards: list[list[_ExportTensor]] = [[]]
    shard_bytes = total_bytes = 0
    for layout in tensor_layouts(config, scoring=scoring):
        nbytes = math.prod(layout.hf_shape) * np_dtype.itemsize
        for i, name in enumerate(layout.hf_names(config.num_layers)):
            if shards[-1] and shard_bytes + nbytes > limit:
                shards.append([])
                shard_bytes = 0
            shards[-1].append(_ExportTensor(name, layout, i if layout.stacked else None))
            shard_bytes += nbytes
            total_bytes += nbytes
    if len(shards) == 1:
        file_names = [SINGLE_FILE]
    else:
        file_names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

    writer = jax.process_index() == 0
    out = epath.Path(path)
    if writer:
        storage.makedirs(out)
    state = nnx.state(model, nnx.Param)
    for file_name, tensors in tqdm(list(zip(file_names, shards)), desc="export", unit="shard", disable=not writer):
        if writer:
            with storage.atomic_writer(out / file_name) as f:
                _write_safetensors(f, tensors, state, np_dtype)
        else:  # the other processes still take part in every gather
            for tensor in tensors:
                tensor.host_array(state)
    if not writer:
        return
    # Remove files of an earlier export with another shard count, so loaders cannot mix them up.
    for stale in out.glob("model*.safetensors"):
        if stale.name not in file_names:
            stale.unlink()
    index = out / INDEX_FILE
    if len(file_names) > 1:
        weight_map = {t.name: f for f, tensors in zip(file_names, shards) for t in tensors}
        _write_json(index, {"metadata": {"total_size": total_bytes}, "weight_map": weight_map})
    elif index.exists():
        index.unlink()
    hf_config = config_to_hf(config, dtype, scoring=scoring,
                             pad_token_id=tokenizer.pad_id if tokenizer is not None else 0)
    _write_json(out / CONFIG_FILE, hf_config)
    _write_json(out / "generation_config.json",
                {"bos_token_id": hf_config["bos_token_id"], "eos_token_id": hf_config["eos_token_id"]})
    if tokenizer is not None:
        tokenizer.save(out)


def _write_json(path: epath.Path, obj: Any) -> None:
    storage.write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())

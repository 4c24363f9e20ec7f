"""Hugging Face <-> JAX conversion for LLaMA checkpoints (safetensors).

Import reads one tensor slice at a time straight from the memory-mapped safetensors files into the
device shard that needs it, so a model sharded over a mesh is never assembled on the host. Stacked
decoder-layer parameters are filled one layer at a time into a donated device buffer. Export gathers one
tensor at a time and writes a safetensors shard whenever `max_shard_size` is reached, so host memory
peaks at about one shard.

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
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from alpacare_jax import sharding as sharding_lib
from alpacare_jax.model import Llama, LlamaConfig, LlamaForScoring, RopeScaling

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
# What a `LlamaForScoring` (the multiple-choice objective's model) is exported as: transformers'
# sequence classifier with num_labels=1, whose `score` head and last-non-pad-token pooling it matches.
SCORING_ARCHITECTURE = "LlamaForSequenceClassification"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Buffers some older checkpoints saved; they are recomputed from the config, never loaded.
IGNORED_TENSORS = re.compile(r".*rotary_emb\.inv_freq$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted; the message names the file and tensor."""


# ---- config.json <-> LlamaConfig ------------------------------------------------------------------------

_REQUIRED_CONFIG_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads")


def read_config(config_file: Path) -> dict[str, Any]:
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
    scaling = hf.get("rope_scaling") or (hf.get("rope_parameters") if isinstance(hf.get("rope_parameters"), dict) else None)
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
        raise CheckpointError(f"{source}: field {missing[0]!r} is missing (a LLaMA config needs {_REQUIRED_CONFIG_FIELDS})")
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

    def read(self, tensor_slice: Any, index: tuple[slice, ...]) -> np.ndarray:
        """Reads the part of one HF tensor that our (per-layer) `index` covers, in our layout."""
        split_sizes = [s for sizes in self.split for s in sizes]
        split_index: list[slice] = [slice(None)] * len(split_sizes)
        for ours_dim, split_dim in enumerate(self.perm):
            split_index[split_dim] = index[ours_dim]
        hf_index, post_index, shape, k = [], [], [], 0
        for sizes in self.split:
            start, stop, _ = split_index[k].indices(sizes[0])
            inner = math.prod(sizes[1:])
            hf_index.append(slice(start * inner, stop * inner))
            shape.extend([stop - start, *sizes[1:]])
            post_index.extend([slice(None), *split_index[k + 1:k + len(sizes)]])
            k += len(sizes)
        block = tensor_slice[tuple(hf_index)]
        return np.transpose(block.reshape(shape)[tuple(post_index)], self.perm)


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

class _SafetensorsDir:
    """A single-file or index-sharded safetensors checkpoint: which file holds which tensor."""

    def __init__(self, path: Path):
        self.path = path
        index_file, single = path / INDEX_FILE, path / SINGLE_FILE
        if index_file.exists():
            try:
                self.weight_map: dict[str, str] = json.loads(index_file.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{index_file}: not a safetensors index ({err})") from err
        elif single.exists():
            with _open_safetensors(single) as f:
                self.weight_map = {name: SINGLE_FILE for name in f.keys()}
        else:
            raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} found")

    def files(self) -> dict[str, list[str]]:
        by_file: dict[str, list[str]] = {}
        for name, file in self.weight_map.items():
            by_file.setdefault(file, []).append(name)
        return by_file

    def check(self, layouts: list[TensorLayout], config: LlamaConfig) -> None:
        """Fails before any data is read on a missing, misshapen or unexpected tensor (headers only)."""
        expected = {name: layout.hf_shape for layout in layouts for name in layout.hf_names(config.num_layers)}
        for name in expected:
            if name not in self.weight_map:
                raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        for file, names in self.files().items():
            if not (self.path / file).exists():
                raise CheckpointError(f"{self.path / file}: shard listed for tensor {names[0]!r} does not exist")
            with _open_safetensors(self.path / file) as handle:
                present = set(handle.keys())
                for name in names:
                    if name not in present:
                        raise CheckpointError(f"{self.path / file}: tensor {name!r} is missing (the index lists it there)")
                    if name in expected and tuple(handle.get_slice(name).get_shape()) != expected[name]:
                        raise CheckpointError(
                            f"{self.path / file}: tensor {name!r} has shape {handle.get_slice(name).get_shape()}, "
                            f"expected {list(expected[name])} from config.json"
                        )
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


def _open_safetensors(file: Path):
    """`safe_open(file)`; a truncated or garbage file raises naming it instead of a bare SafetensorError."""
    try:
        return safe_open(file, framework="numpy")
    except SafetensorError as err:
        raise CheckpointError(f"{file}: not a readable safetensors file ({err})") from None


@functools.partial(jax.jit, donate_argnums=0)
def _write_piece(buffer: jax.Array, piece: jax.Array, starts: tuple[jax.Array, ...]) -> jax.Array:
    return jax.lax.dynamic_update_slice(buffer, piece.astype(buffer.dtype), starts)


_READ_CHUNK_BYTES = 32 * 2**20


def load_pretrained(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    compute_dtype: Any = None,
    mesh: Mesh | None = None,
    rules: sharding_lib.LogicalRules = sharding_lib.DEFAULT_RULES,
    **config_overrides: Any,
) -> Llama:
    """Loads an HF LLaMA directory as an NNX `Llama` with parameters in `dtype`.

    With `mesh`, every parameter is placed on the shards its logical names map to under `rules`; each
    tensor is read from the memory-mapped file in chunks of rows written straight into its device buffer.
    `config_overrides` set non-architectural fields such as `remat_policy` or `attention_impl`.
    """
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{path}: no config.json (not a Hugging Face model directory)")
    config = config_from_hf(read_config(config_file), str(config_file)).replace(
        param_dtype=jnp.dtype(dtype).name, dtype=jnp.dtype(compute_dtype or dtype).name, **config_overrides
    )
    checkpoint = _SafetensorsDir(path)
    layouts = tensor_layouts(config)
    checkpoint.check(layouts, config)

    graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))))
    if mesh is not None:
        shardings = sharding_lib.state_shardings(state, mesh, rules)
    else:
        one_device = SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: one_device, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    target_dtype = np.dtype(jnp.dtype(dtype))

    # Every parameter starts as a device buffer on its final shards and is filled in place (donated),
    # one HF tensor at a time and within a tensor one chunk of rows at a time: host memory never holds
    # more than a chunk per device besides the model itself.
    sources = {name: (layout, i if layout.stacked else None)
               for layout in layouts for i, name in enumerate(layout.hf_names(config.num_layers))}
    buffer_shardings = {layout.ours: _lookup(shardings, layout.ours) for layout in layouts}
    shapes = {ours: _lookup(state, ours).shape for ours in buffer_shardings}
    values = jax.jit(lambda: {ours: jnp.zeros(shape, target_dtype) for ours, shape in shapes.items()},
                     out_shardings=buffer_shardings)()
    replicated = NamedSharding(mesh, PartitionSpec()) if mesh is not None else _lookup(shardings, layouts[0].ours)
    chunk_bytes = _READ_CHUNK_BYTES // len(replicated.addressable_devices)

    progress = tqdm(total=len(sources), desc="load", unit="tensor", disable=jax.process_index() != 0)
    for file, names in checkpoint.files().items():
        for name in names:
            if name not in sources:
                continue  # ignorable (checked above)
            layout, layer = sources[name]
            # One open per tensor: closing unmaps the pages just read, so they stop counting as host memory.
            with _open_safetensors(path / file) as handle:
                tensor = handle.get_slice(name)
                buffer = values[layout.ours]
                shape = buffer.shape[1:] if layout.stacked else buffer.shape
                for index, starts in _row_chunks(layout, shape, chunk_bytes // target_dtype.itemsize):
                    piece = layout.read(tensor, index).astype(target_dtype, copy=False)
                    piece = jax.make_array_from_callback(piece.shape, replicated, lambda i, p=piece: p[i])
                    if layout.stacked:
                        piece, starts = piece[None], (layer, *starts)
                    buffer = _write_piece(buffer, piece, tuple(jnp.int32(s) for s in starts))
                values[layout.ours] = buffer
            progress.update()
    progress.close()
    for ours, value in values.items():
        _lookup(state, ours).set_value(value)
    return nnx.merge(graphdef, state)


def _row_chunks(layout: TensorLayout, shape: tuple[int, ...], max_elements: int):
    """(our index, start offsets) covering one HF tensor in runs of its leading (row) dimension."""
    dim = layout.perm.index(0)  # our dimension that HF's leading dimension (or its first part) became
    row = math.prod(shape) // shape[dim]
    step = max(1, max_elements // row)
    for start in range(0, shape[dim], step):
        index = [slice(None)] * len(shape)
        index[dim] = slice(start, min(start + step, shape[dim]))
        starts = [0] * len(shape)
        starts[dim] = start
        yield tuple(index), tuple(starts)


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


def _write_safetensors(path: Path, tensors: list[_ExportTensor], state: nnx.State, dtype: np.dtype) -> None:
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
    with open(path, "wb") as f:
        f.write(len(header_bytes).to_bytes(8, "little"))
        f.write(header_bytes)
        for tensor in tensors:
            array = tensor.host_array(state)
            rows_per_chunk = max(1, _WRITE_CHUNK_BYTES // max(1, array[:1].size * dtype.itemsize))
            for start in range(0, array.shape[0], rows_per_chunk):
                f.write(np.ascontiguousarray(array[start:start + rows_per_chunk], dtype=dtype).tobytes())
            del array


def save_pretrained(
    model: Llama | LlamaForScoring,
    path: str | os.PathLike,
    *,
    dtype: str = "bfloat16",
    max_shard_size: int | str = "5GB",
    tokenizer: Any = None,
) -> None:
    """Writes `model` as an HF LLaMA directory that `transformers` loads as it is.

    A `Llama` becomes a `LlamaForCausalLM`; a `LlamaForScoring` a `LlamaForSequenceClassification`
    with `num_labels=1` whose `pad_token_id` is the tokenizer's pad id (0, LLaMA's `<unk>`, without one).

    Shards are written under temporary names and renamed into place, so an interrupted export never
    leaves a truncated file under a final name. On several processes all take part in gathering each
    tensor and only process 0 writes.
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
    out = Path(path)
    if writer:
        out.mkdir(parents=True, exist_ok=True)
    state = nnx.state(model, nnx.Param)
    for file_name, tensors in tqdm(list(zip(file_names, shards)), desc="export", unit="shard", disable=not writer):
        if writer:
            tmp = out / f".{file_name}.tmp"
            _write_safetensors(tmp, tensors, state, np_dtype)
            os.replace(tmp, out / file_name)
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
    _write_json(out / "config.json", hf_config)
    _write_json(out / "generation_config.json",
                {"bos_token_id": hf_config["bos_token_id"], "eos_token_id": hf_config["eos_token_id"]})
    if tokenizer is not None:
        tokenizer.save(out)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)

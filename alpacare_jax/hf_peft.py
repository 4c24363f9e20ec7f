"""LoRA adapters in Hugging Face PEFT's format, the directory `peft` (and the servers built on it) load:

    ADAPTER_DIR/
      adapter_config.json        peft_type LORA, r, lora_alpha, lora_dropout, use_rslora, target_modules,
                                 base_model_name_or_path (the HF model the adapter belongs to)
      adapter_model.safetensors  base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight [r, in]
                                 and .lora_B.weight [out, r], for every layer and targeted projection
      tokenizer files            when given (PEFT ignores them; `alpacare_jax.infer` uses them)

`peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), ADAPTER_DIR)` loads what
`save_adapter` writes, and `load_adapter` reads such a directory (ours or one PEFT wrote) onto a model's
adapters. PEFT's matrices follow HF's [out, in] convention; ours (A [in..., r], B [r, out...]) follow the
layout of the projection they adapt, so each adapter tensor is an `hf.TensorLayout` derived from its
projection's, and the same streaming writer and reader serve both.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from alpacare_jax import hf, storage
from alpacare_jax.model import LORA_TARGETS, Llama, LlamaConfig, LoraConfig
from alpacare_jax.model.lora import PROJECTIONS, adapter_name

ADAPTER_CONFIG_FILE = "adapter_config.json"  # what marks a directory as a PEFT adapter
ADAPTER_FILE = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."  # PEFT's names: the HF model's own, inside its wrapper

# PEFT options that change what an adapter computes, with the value under which it is plain LoRA.
_PLAIN_LORA = {"use_dora": False, "fan_in_fan_out": False, "bias": "none", "lora_bias": False, "use_qalora": False,
               "layers_to_transform": None, "layer_replication": None, "modules_to_save": None, "rank_pattern": {},
               "alpha_pattern": {}, "target_parameters": None, "trainable_token_indices": None}


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return (epath.Path(path) / ADAPTER_CONFIG_FILE).exists()


def adapter_layouts(config: LlamaConfig) -> list[hf.TensorLayout]:
    """Every adapter tensor of a LoRA `config`, under PEFT's names.

    A projection stored [out, in] by HF (split into `out_split`, `in_split`) is ours [in..., out...]; its
    lora_A [r, in] is ours A [in..., r] and its lora_B [out, r] ours B [r, out...].
    """
    rank = config.lora.rank
    projections = {layout.ours: layout for layout in hf.tensor_layouts(config)}
    layouts = []
    for target in config.lora.targets:
        module, projection = PROJECTIONS[target]
        base = projections[("layers", module, projection)]
        out_split, in_split = base.split
        ours = ("layers", module, adapter_name(target))
        name = _PEFT_PREFIX + base.hf_name.removesuffix(".weight")
        layouts.append(hf.TensorLayout((*ours, "a"), f"{name}.lora_A.weight", ((rank,), in_split),
                                       (*range(1, len(in_split) + 1), 0), stacked=True))
        layouts.append(hf.TensorLayout((*ours, "b"), f"{name}.lora_B.weight", (out_split, (rank,)),
                                       (len(out_split), *range(len(out_split))), stacked=True))
    return layouts


def _hf_module(target: str) -> str:
    return PROJECTIONS[target][1]  # "q" -> "q_proj": PEFT's target_modules name HF's module attributes


def peft_config(lora: LoraConfig, base: str) -> dict[str, Any]:
    """The adapter_config.json of adapters `lora` for the HF model at `base`."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "use_rslora": lora.rslora,
        "target_modules": [_hf_module(t) for t in lora.targets], "init_lora_weights": True, "inference_mode": True,
        **_PLAIN_LORA,
    }


def read_adapter_config(path: str | os.PathLike) -> tuple[LoraConfig, str]:
    """(the adapters, base_model_name_or_path) of a PEFT adapter directory; anything but plain LoRA on
    LLaMA projections fails naming the file and field."""
    file = epath.Path(path) / ADAPTER_CONFIG_FILE
    if not file.exists():
        raise hf.CheckpointError(f"{path}: no {ADAPTER_CONFIG_FILE} (not a PEFT adapter directory)")
    peft = hf.read_config(file)
    if peft.get("peft_type") != "LORA":
        raise hf.CheckpointError(f"{file}: peft_type {peft.get('peft_type')!r} is not supported (only 'LORA')")
    for field, plain in _PLAIN_LORA.items():
        value = peft.get(field, plain)
        if value != plain and value not in (None, [], {}):
            raise hf.CheckpointError(f"{file}: field {field!r} = {peft[field]!r} is not supported (plain LoRA has "
                                     f"{plain!r})")
    for field in ("r", "lora_alpha", "target_modules"):
        if field not in peft:
            raise hf.CheckpointError(f"{file}: field {field!r} is missing")
    modules = peft["target_modules"]
    by_hf_name = {_hf_module(t): t for t in LORA_TARGETS}
    if modules == "all-linear":
        modules = list(by_hf_name)
    if isinstance(modules, str) or any(m not in by_hf_name for m in modules):
        raise hf.CheckpointError(f"{file}: field 'target_modules' = {peft['target_modules']!r}: expected a list of "
                                 f"{sorted(by_hf_name)}")
    try:
        lora = LoraConfig(rank=int(peft["r"]), alpha=float(peft["lora_alpha"]),
                          dropout=float(peft.get("lora_dropout") or 0.0), rslora=bool(peft.get("use_rslora")),
                          targets=tuple(t for t in LORA_TARGETS if _hf_module(t) in modules))
    except (TypeError, ValueError) as e:
        raise hf.CheckpointError(f"{file}: {e}") from None
    return lora, peft.get("base_model_name_or_path") or ""


def save_adapter(model: Llama, path: str | os.PathLike, *, base: str, tokenizer: Any = None,
                 dtype: str = "float32") -> None:
    """Writes the adapters of a LoRA `model` as a PEFT adapter directory for the HF model `base`.

    `base` goes into adapter_config.json as `base_model_name_or_path`, as written: a hub name, or a path
    the loading side can resolve. Only the adapters are written (tens of MB for a 7B model).
    """
    config = model.config
    if config.lora is None:
        raise ValueError("the model has no LoRA adapters to export")
    out = epath.Path(path)
    if jax.process_index() == 0:
        storage.makedirs(out)
    hf.write_tensors(out / ADAPTER_FILE, adapter_layouts(config), nnx.to_pure_dict(nnx.state(model)),
                     config.num_layers, dtype=dtype)
    if jax.process_index() != 0:
        return
    storage.write_bytes(out / ADAPTER_CONFIG_FILE,
                        (json.dumps(peft_config(config.lora, base), indent=2) + "\n").encode())
    if tokenizer is not None:
        tokenizer.save(out)


def load_adapter(path: str | os.PathLike, model_config: LlamaConfig, shardings: dict | None = None) -> dict:
    """The adapters in a PEFT directory as a LoRA model's nested dict ({"layers": {"attention": {"q_lora":
    {"a", "b"}}, ...}}) in `model_config.param_dtype`, placed on `shardings` (that dict's layout) if given.

    The directory's adapters must be the ones `model_config.lora` describes (rank, alpha, rsLoRA, targets).
    """
    lora, _ = read_adapter_config(path)
    expected = model_config.lora
    file = epath.Path(path) / ADAPTER_CONFIG_FILE
    for field in ("rank", "alpha", "rslora", "targets"):
        if getattr(lora, field) != getattr(expected, field):
            raise hf.CheckpointError(f"{file}: adapters with {field}={getattr(lora, field)!r}, but the model's LoRA "
                                     f"config has {field}={getattr(expected, field)!r}")
    arrays = hf.read_tensors(epath.Path(path) / ADAPTER_FILE, adapter_layouts(model_config), model_config.num_layers)
    dtype = np.dtype(model_config.param_dtype)
    adapters: dict = {}
    for ours, array in arrays.items():
        node = adapters
        for key in ours[:-1]:
            node = node.setdefault(key, {})
        value = np.ascontiguousarray(array, dtype=dtype)
        if shardings is None:
            node[ours[-1]] = jnp.asarray(value)
        else:
            sharding = functools.reduce(lambda tree, key: tree[key], ours, shardings)
            node[ours[-1]] = jax.make_array_from_callback(value.shape, sharding, lambda index, v=value: v[index])
    return adapters

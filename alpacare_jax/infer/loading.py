"""Load a trained model for inference from any place one lives: an HF directory, a training workdir, or a
PEFT adapter directory (LoRA) whose base is an HF directory.

    loaded = load_model("hf/alpacare7b")          # config.json + safetensors + tokenizer files
    loaded = load_model("runs/alpacare7b")        # model_config.json + checkpoints/ + tokenizer/
    loaded = load_model("adapters/alpacare7b")    # adapter_config.json + adapter_model.safetensors

Models trained with LoRA (a LoRA workdir, a PEFT adapter) come back with their adapters folded into the base
weights (`model.lora.merged_model`): a plain model that generates exactly as fast as any other.

`generate`, `serve`, the evaluation commands and `export_hf` all go through here, so a workdir
(alpacare_jax/workdir.py) is restored the same way everywhere: only the weights are read from the orbax
checkpoint (the optimizer state stays on disk),
straight onto an FSDP mesh over all devices, so a model larger than one device still loads.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from alpacare_jax import hf, hf_peft, sharding, storage
from alpacare_jax.data.tokenizer import Tokenizer, load_tokenizer
from alpacare_jax.model import Llama, lora
from alpacare_jax.train import objectives
from alpacare_jax.train.checkpoint import Checkpointer
from alpacare_jax.train.lora_base import load_base
from alpacare_jax.train.state import abstract_model, with_shardings
from alpacare_jax.workdir import Workdir


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    model: Llama
    tokenizer: Tokenizer
    name: str  # what outputs call the model (`generator`), by default the directory's name
    step: int | None  # checkpoint step for a workdir, None for an HF directory


def default_mesh() -> Mesh:
    """FSDP over every device: inference needs no data parallelism, and the weights must fit."""
    return sharding.make_mesh(sharding.MeshConfig(fsdp=-1))


def restore_workdir(workdir: str | epath.PathLike, *, step: int | None = None, dtype: str | None = None,
                    mesh: Mesh | None = None) -> tuple[Llama, int]:
    """(model, step) from a training workdir's checkpoint at `step` (default: the latest).

    `dtype` (e.g. "bfloat16") sets both the parameter and the compute dtype; orbax casts while reading,
    so the float32 master weights are never materialised when a smaller dtype is asked for. A LoRA run's
    model comes with its adapters (`lora.merged_model` folds them in): they are restored from the
    checkpoint and the base from where the run's config says, checked against the checkpoint's record of it
    in the dtype it was trained in, then cast to `dtype`.
    """
    run = Workdir(workdir)
    config = run.model_config()
    if dtype is not None:
        config = config.replace(param_dtype=jnp.dtype(dtype).name, dtype=jnp.dtype(dtype).name)
    mesh = mesh or default_mesh()
    model_class = objectives.model_class(run.objective)
    graphdef, abstract_state = abstract_model(config, model_class)
    shardings = sharding.param_shardings(abstract_state, mesh)
    abstract_params = with_shardings(nnx.to_pure_dict(abstract_state), shardings)
    base, reference = {}, None
    if config.lora is not None:
        abstract_params, abstract_base = lora.split_adapters(abstract_params)
        base, reference = load_base(run.training_config(), config, model_class, abstract_base, mesh)
        if dtype is not None:
            base = jax.tree.map(lambda x: x.astype(dtype), base)
    checkpointer = Checkpointer(run.checkpoints_dir, save_every=0, keep=1 << 30, async_save=False, base=reference)
    try:
        params, step = checkpointer.restore_params(abstract_params, step)
    finally:
        checkpointer.close()
    return nnx.merge(graphdef, lora.merge_trees(params, base)), step


def load_with_adapter(adapter_dir: str | epath.PathLike, *, base: str | None = None, dtype: str | None = None,
                      mesh: Mesh | None = None) -> Llama:
    """The HF model `base` (default: the adapter's `base_model_name_or_path`) with the PEFT adapter in
    `adapter_dir` folded into its weights. `dtype` None: float32, as for an HF directory."""
    adapters_config, named_base = hf_peft.read_adapter_config(adapter_dir)
    base = base or named_base
    if not base or not (epath.Path(base) / hf.CONFIG_FILE).exists():
        raise FileNotFoundError(f"{adapter_dir}: its base model {base!r} (base_model_name_or_path in "
                                f"{hf_peft.ADAPTER_CONFIG_FILE}) is not a Hugging Face directory here")
    mesh = mesh or default_mesh()
    plain = hf.load_pretrained(base, dtype=jnp.dtype(dtype or "float32"), mesh=mesh)
    config = plain.config.replace(lora=adapters_config)
    graphdef, abstract_state = abstract_model(config)
    adapters = hf_peft.load_adapter(adapter_dir, config, sharding.param_shardings(abstract_state, mesh))
    return lora.merged_model(nnx.merge(graphdef, lora.merge_trees(adapters, nnx.to_pure_dict(nnx.state(plain)))))


def model_name(path: str | epath.PathLike) -> str:
    """What outputs call a model unless told otherwise: its directory's name."""
    return epath.Path(path).name if storage.is_url(path) else Path(path).resolve().name


def load_model(path: str | epath.PathLike, *, step: int | None = None, dtype: str | None = None,
               name: str | None = None, mesh: Mesh | None = None) -> LoadedModel:
    """The model and tokenizer in `path`: an HF LLaMA directory, a training workdir or a PEFT adapter.

    `dtype` None keeps what the source holds (an HF directory: float32 parameters and compute). Either
    may be local or at gs://.
    """
    path = epath.Path(path)
    name = name or model_name(path)
    if Workdir.holds_run(path):
        model, step = restore_workdir(path, step=step, dtype=dtype, mesh=mesh)
        return LoadedModel(lora.merged_model(model), Workdir(path).tokenizer(), name, step)
    if hf_peft.is_adapter_dir(path):
        if step is not None:
            raise ValueError(f"{path} is a PEFT adapter directory: it has no checkpoint steps to choose from")
        model = load_with_adapter(path, dtype=dtype, mesh=mesh)
        try:  # the adapter's own tokenizer (ours write one), else its base's
            tokenizer = load_tokenizer(path)
        except FileNotFoundError:
            tokenizer = load_tokenizer(hf_peft.read_adapter_config(path)[1])
        return LoadedModel(model, tokenizer, name, None)
    if (path / hf.CONFIG_FILE).exists():
        if step is not None:
            raise ValueError(f"{path} is a Hugging Face directory: it has no checkpoint steps to choose from")
        model = hf.load_pretrained(path, dtype=jnp.dtype(dtype or "float32"), mesh=mesh or default_mesh())
        return LoadedModel(model, load_tokenizer(path), name, None)
    raise FileNotFoundError(f"{path}: neither a Hugging Face model directory ({hf.CONFIG_FILE}) nor a training "
                            f"workdir ({Workdir(path).model_config_file.name})")

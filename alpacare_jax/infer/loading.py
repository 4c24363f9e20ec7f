"""Load a trained model for inference from either place one lives: an HF directory or a training workdir.

    loaded = load_model("hf/alpacare7b")          # config.json + safetensors + tokenizer files
    loaded = load_model("runs/alpacare7b")        # model_config.json + checkpoints/ + tokenizer/

`generate`, `serve`, `evaluate` and `export_hf` all go through here, so a workdir is restored the same
way everywhere: only the weights are read from the orbax checkpoint (the optimizer state stays on disk),
straight onto an FSDP mesh over all devices, so a model larger than one device still loads.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from alpacare_jax import sharding
from alpacare_jax.data.tokenizer import Tokenizer, load_tokenizer
from alpacare_jax.model import Llama

# Names the two layouts are recognised by (kept here so the train loop need not be imported to check).
_WORKDIR_MARKER = "model_config.json"
_HF_MARKER = "config.json"


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    model: Llama
    tokenizer: Tokenizer
    name: str  # what outputs call the model (`generator`), by default the directory's name
    step: int | None  # checkpoint step for a workdir, None for an HF directory


def default_mesh() -> Mesh:
    """FSDP over every device: inference needs no data parallelism, and the weights must fit."""
    return sharding.make_mesh(sharding.MeshConfig(fsdp=-1))


def restore_workdir(workdir: str | epath.Path, *, step: int | None = None, dtype: str | None = None,
                    mesh: Mesh | None = None) -> tuple[Llama, int]:
    """(model, step) from a training workdir's checkpoint at `step` (default: the latest).

    `dtype` (e.g. "bfloat16") sets both the parameter and the compute dtype; orbax casts while reading,
    so the float32 master weights are never materialised when a smaller dtype is asked for.
    """
    from alpacare_jax.train.checkpoint import Checkpointer
    from alpacare_jax.train.loop import load_model_config
    from alpacare_jax.train.objectives import workdir_model_class
    from alpacare_jax.train.state import abstract_model, with_shardings

    workdir = epath.Path(workdir)
    config = load_model_config(workdir)
    if dtype is not None:
        config = config.replace(param_dtype=jnp.dtype(dtype).name, dtype=jnp.dtype(dtype).name)
    mesh = mesh or default_mesh()
    graphdef, abstract_state = abstract_model(config, workdir_model_class(workdir))
    shardings = sharding.param_shardings(abstract_state, mesh)
    abstract_params = with_shardings(nnx.to_pure_dict(abstract_state), shardings)
    checkpointer = Checkpointer(workdir / "checkpoints", save_every=0, keep=1 << 30, async_save=False)
    try:
        params, step = checkpointer.restore_params(abstract_params, step)
    finally:
        checkpointer.close()
    return nnx.merge(graphdef, params), step


def workdir_tokenizer(workdir: str | epath.Path) -> Tokenizer | None:
    from alpacare_jax.train.loop import TOKENIZER_DIR

    path = epath.Path(workdir) / TOKENIZER_DIR
    return load_tokenizer(path) if path.exists() else None


def model_name(path: str | Path) -> str:
    """What outputs call a model unless told otherwise: its directory's name."""
    return Path(path).resolve().name


def load_model(path: str | Path, *, step: int | None = None, dtype: str | None = None,
               name: str | None = None, mesh: Mesh | None = None) -> LoadedModel:
    """The model and tokenizer in `path`, an HF LLaMA directory or a training workdir.

    `dtype` None keeps what the source holds (an HF directory: float32 parameters and compute).
    """
    path = Path(path)
    name = name or model_name(path)
    if (path / _WORKDIR_MARKER).exists():
        model, step = restore_workdir(path, step=step, dtype=dtype, mesh=mesh)
        tokenizer = workdir_tokenizer(path)
        if tokenizer is None:
            raise FileNotFoundError(f"{path}: training workdir without a tokenizer/ directory")
        return LoadedModel(model, tokenizer, name, step)
    if (path / _HF_MARKER).exists():
        from alpacare_jax import hf

        if step is not None:
            raise ValueError(f"{path} is a Hugging Face directory: it has no checkpoint steps to choose from")
        model = hf.load_pretrained(path, dtype=jnp.dtype(dtype or "float32"), mesh=mesh or default_mesh())
        return LoadedModel(model, load_tokenizer(path), name, None)
    raise FileNotFoundError(
        f"{path}: neither a Hugging Face model directory ({_HF_MARKER}) nor a training workdir ({_WORKDIR_MARKER})"
    )

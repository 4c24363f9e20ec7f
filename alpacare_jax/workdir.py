"""A training workdir: the one definition of what a run directory holds and how it is read back.

    WORKDIR/
      config.json         the resolved training config (what `--config` and its overrides made)
      model_config.json   the `LlamaConfig`: with the checkpoints, all a later process needs to rebuild the model
      tokenizer/          the run's tokenizer (copied from `init_from_hf`, or trained by the demo's bootstrap)
      checkpoints/        orbax steps (alpacare_jax.train.checkpoint)
      metrics.jsonl       one JSON object per logged step
      tensorboard/        the same scalars as TensorBoard events
      hf/                 the end-of-run Hugging Face export, when the config asks for one
      adapter/            a LoRA run's end-of-run export instead: a PEFT adapter directory for its base
      tfds/               the demo's bootstrap dataset, when the config builds one

The trainer writes it; the loaders (`alpacare_jax.infer.loading`), `export_hf`, the evaluation commands and
the tests read it through `Workdir`, so the layout is declared here only. Paths may be local or `gs://...`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from etils import epath

from alpacare_jax import storage
from alpacare_jax.data.tokenizer import Tokenizer, load_tokenizer
from alpacare_jax.model import LlamaConfig


@dataclasses.dataclass(frozen=True)
class Workdir:
    root: epath.Path

    def __init__(self, root: str | epath.PathLike):
        object.__setattr__(self, "root", epath.Path(root))

    # ---- the layout ----
    @property
    def config_file(self) -> epath.Path:
        return self.root / "config.json"

    @property
    def model_config_file(self) -> epath.Path:
        return self.root / "model_config.json"

    @property
    def tokenizer_dir(self) -> epath.Path:
        return self.root / "tokenizer"

    @property
    def checkpoints_dir(self) -> epath.Path:
        return self.root / "checkpoints"

    @property
    def metrics_file(self) -> epath.Path:
        return self.root / "metrics.jsonl"

    @property
    def tensorboard_dir(self) -> epath.Path:
        return self.root / "tensorboard"

    @property
    def hf_export_dir(self) -> epath.Path:
        return self.root / "hf"

    @property
    def adapter_export_dir(self) -> epath.Path:
        return self.root / "adapter"

    @property
    def bootstrap_data_dir(self) -> epath.Path:
        return self.root / "tfds"

    @staticmethod
    def holds_run(path: str | epath.PathLike) -> bool:
        """Whether `path` is a training workdir (its model description is what tells)."""
        return Workdir(path).model_config_file.exists()

    # ---- writing (process 0, before the first step) ----
    def write_description(self, config: Any, model_config: LlamaConfig) -> None:
        """`config.json` (an ml_collections ConfigDict) and `model_config.json`."""
        storage.makedirs(self.root)
        self.config_file.write_text(config.to_json_best_effort(indent=2) + "\n")
        self.model_config_file.write_text(json.dumps(dataclasses.asdict(model_config), indent=2) + "\n")

    # ---- reading ----
    def model_config(self) -> LlamaConfig:
        if not self.model_config_file.exists():
            raise FileNotFoundError(f"{self.model_config_file} not found: is {self.root} a training workdir?")
        return LlamaConfig(**_read_json(self.model_config_file))

    def training_config(self) -> dict[str, Any]:
        """The resolved training config as written (plain JSON), {} for a workdir written without one."""
        return _read_json(self.config_file) if self.config_file.exists() else {}

    @property
    def objective(self) -> str:
        """What the run trained (`config.objective`): "sft" or "multiple_choice"."""
        return self.training_config().get("objective", "sft")

    def tokenizer(self) -> Tokenizer:
        if not self.tokenizer_dir.exists():
            raise FileNotFoundError(f"{self.root}: training workdir without a {self.tokenizer_dir.name}/ directory")
        return load_tokenizer(self.tokenizer_dir)


def _read_json(path: epath.Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None

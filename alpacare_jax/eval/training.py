"""Training with lm-evaluation-harness tasks scored as it goes (levanter's in-training harness evaluation):

    python -m alpacare_jax.eval train --config=configs/X.py --workdir=DIR \
        --config.harness.tasks=pubmedqa,mmlu_anatomy --config.harness.every=200 [--config.harness.data_dir=D]

The flags are the training command's (`alpacare-train`); this command adds one hook, which scores
`config.harness.tasks` on their first `config.harness.limit` documents with the live model every
`config.harness.every` steps and at the end. Scores land in metrics.jsonl (and TensorBoard) beside
`eval_loss`, as "<task>/<metric>", e.g. "pubmedqa/acc". The trainer never imports the harness (the layers
point the other way), so the plain training command refuses a config that names tasks.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import ml_collections
from absl import app
from flax import nnx

from alpacare_jax.eval import scoring
from alpacare_jax.eval import tasks as tasks_lib
from alpacare_jax.model import lora
from alpacare_jax.train import __main__ as train_command
from alpacare_jax.train.config import HARNESS_HOOK, harness_tasks, llama_config
from alpacare_jax.train.hooks import Hook
from alpacare_jax.train.state import TrainState, abstract_model
from alpacare_jax.workdir import Workdir


def harness_hook(config: ml_collections.ConfigDict, workdir: str) -> Hook:
    """The hook that scores `config.harness.tasks` (checked now, with their local files: a typo or a bad
    file stops the run before it trains, not at its first evaluation)."""
    tasks = harness_tasks(config)
    if config.objective != "sft":
        raise ValueError(f"config.harness.tasks scores a causal LM; objective {config.objective!r} trains none")
    for task in tasks:
        try:
            tasks_lib.stock_config_path(task)
        except KeyError:
            raise ValueError(f"config.harness.tasks: unknown task {task!r} (the suite's tasks and wikitext are "
                             "known)") from None
    settings = config.harness
    data_dir = Path(settings.data_dir) if settings.data_dir else None
    if data_dir is not None:
        for task in tasks:
            tasks_lib.check_data(task, data_dir)
    # The training state holds parameters only; the model's structure comes from the config, as in training.
    graphdef, _ = abstract_model(llama_config(config))
    tokenizer = functools.cache(Workdir(workdir).tokenizer)  # written by train() before its first step

    def run(step: int, state: TrainState) -> dict[str, float]:
        model = lora.merged_model(nnx.merge(graphdef, state.model_params()))
        mesh = jax.tree.leaves(state.params)[0].sharding.mesh  # the model stays where training put it
        return scoring.score_tasks(model, tokenizer(), tasks, limit=settings.limit or None, mesh=mesh,
                                   data_dir=data_dir, batch_size=settings.batch_size)

    return Hook(HARNESS_HOOK, run, every=settings.every, at_end=True)


def extra_hooks(config: ml_collections.ConfigDict, workdir: str) -> list[Hook]:
    return [harness_hook(config, workdir)] if harness_tasks(config) else []


def main(argv: list[str]) -> int:
    """`alpacare-eval train FLAGS...`: the training command, with the harness hook."""
    app.run(functools.partial(train_command.main, extra_hooks=extra_hooks), argv=["alpacare-eval train", *argv])
    return 0

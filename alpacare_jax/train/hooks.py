"""Work the training loop does besides updating the model: evaluation, HF (or PEFT) export, a sample answer.

Each is a `Hook`: a function of the current `TrainState` that runs every `every` steps and/or once
when training ends (the last step, or an early stop), and may return metrics to log with that step
(levanter's `trainer.add_hook(fn, every=N)`). The loop owns the schedule and takes a hook's time out
of the throughput it reports, so a new kind of periodic work is a new hook, not a new branch in the
loop. `train(config, workdir, extra_hooks=[...])` adds hooks of a caller's own.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping

from etils import epath
from flax import nnx

from alpacare_jax import hf, hf_peft
from alpacare_jax.data import pipeline
from alpacare_jax.data.prompts import prompt_ids
from alpacare_jax.data.tokenizer import Tokenizer
from alpacare_jax.model import SamplingConfig, generate, lora
from alpacare_jax.train.state import TrainState

log = logging.getLogger(__name__)

HookFn = Callable[[int, TrainState], Mapping[str, float] | None]


@dataclasses.dataclass(frozen=True)
class Hook:
    name: str
    fn: HookFn  # (step, state) -> metrics to log with this step, or None
    every: int = 0  # runs after every step divisible by this; 0 = not periodically
    at_end: bool = False  # runs once when training ends, unless it just ran at that step

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0


def evaluation(objective, eval_step, make_batches: Callable[[], Iterable[dict]], mesh, batch_spec, *,
               split: str = "eval") -> HookFn:
    """The objective's metrics over a whole held-out split, named `<split>_loss`, ... (`eval_*` for the
    validation split that early stopping watches, `test_*` for a test split); none when it is empty."""

    def run(step: int, state: TrainState) -> dict[str, float]:
        sums: dict[str, float] = {}
        params = state.model_params()
        for local in make_batches():
            for key, value in eval_step(params, pipeline.to_global_batch(local, mesh, batch_spec)).items():
                sums[key] = sums.get(key, 0.0) + float(value)
        metrics = objective.eval_metrics(sums) if sums else {}
        return {f"{split}_{key.removeprefix('eval_')}": value for key, value in metrics.items()}

    return run


def hf_export(graphdef: nnx.GraphDef, tokenizer: Tokenizer, out: epath.Path) -> HookFn:
    """Writes the model as a Hugging Face directory (float32; `export_hf` picks other dtypes and steps)."""

    def run(step: int, state: TrainState) -> None:
        hf.save_pretrained(nnx.merge(graphdef, state.params), out, dtype="float32", tokenizer=tokenizer)
        log.info("exported the model for transformers to %s (step %d)", out, step)

    return run


def adapter_export(graphdef: nnx.GraphDef, tokenizer: Tokenizer, out: epath.Path, base: str) -> HookFn:
    """Writes a LoRA run's adapters as a PEFT adapter directory for the HF model `base` (float32)."""

    def run(step: int, state: TrainState) -> None:
        hf_peft.save_adapter(nnx.merge(graphdef, state.model_params()), out, base=base, tokenizer=tokenizer)
        log.info("exported the LoRA adapter for peft to %s (step %d, base %s)", out, step, base)

    return run


def sample_answer(graphdef: nnx.GraphDef, tokenizer: Tokenizer, instruction: str, max_new_tokens: int) -> HookFn:
    """Logs the model's greedy answer to one instruction, prompted exactly as in training."""

    def run(step: int, state: TrainState) -> None:
        model = lora.merged_model(nnx.merge(graphdef, state.model_params()))
        eos_ids = (*model.config.eos_token_ids, tokenizer.eos_id)
        [tokens] = generate(model, [prompt_ids(tokenizer, instruction)],
                            SamplingConfig(max_new_tokens=max_new_tokens), eos_ids=eos_ids)
        answer = tokenizer.decode([t for t in tokens if t not in eos_ids]).strip()
        log.info("sample at step %d:\n### Instruction:\n%s\n\n### Response:\n%s\n", step, instruction, answer)

    return run

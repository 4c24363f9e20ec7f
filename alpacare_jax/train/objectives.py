"""Training objectives: what the one trainer optimises, chosen by `config.objective`.

  "sft"              next-token cross-entropy on responses (`Llama`, the MedInstruct pipeline).
  "multiple_choice"  every option of a question scored by `LlamaForScoring`, softmax across the
                     question's options, cross-entropy on the right one (the contextual-prompting
                     paper's fine-tuning; `alpacare_jax.data.multiple_choice`).

Mesh, optimizer, train step, checkpoints, metrics and configs are shared; an objective supplies only
what differs: the model class, the batches, the loss and the evaluation metrics. Losses are returned
as (sum, count) so gradient accumulation and multi-process batches stay exact means.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from alpacare_jax.data import multiple_choice, pipeline
from alpacare_jax.data.tokenizer import Tokenizer
from alpacare_jax.model import Llama, LlamaForScoring
from alpacare_jax.train.loss import DEFAULT_CHUNK_SIZE, cross_entropy_sum

Batch = dict[str, jax.Array]
OBJECTIVES = ("sft", "multiple_choice")


@dataclasses.dataclass(frozen=True)
class SupervisedFineTuning:
    loss_chunk: int = DEFAULT_CHUNK_SIZE

    name: ClassVar[str] = "sft"
    model_class: ClassVar[type] = Llama
    batch_axes: ClassVar[tuple[str, ...]] = ("batch", "length")  # logical names of every batch array's axes
    count_name: ClassVar[str] = "loss_tokens"  # what the loss is averaged over
    selection_metric: ClassVar[tuple[str, bool]] = ("eval_loss", False)  # early stopping: (metric, higher is better)

    def loss_sums(self, graphdef: nnx.GraphDef, params: dict, batch: Batch,
                  dropout_rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """(sum of masked token losses, number of loss tokens), both float32 scalars; `dropout_rng` (training
        with LoRA dropout) draws the adapters' dropout masks."""
        model = nnx.merge(graphdef, params)
        hidden, _ = model.hidden_states(batch["input_ids"], positions=batch["positions"],
                                        segment_ids=batch["segment_ids"], dropout_rng=dropout_rng)
        head = model.head_weight().astype(model.config.dtype)
        mask = batch["loss_mask"].astype(jnp.float32)
        loss = cross_entropy_sum(hidden, head, batch["labels"], mask, chunk_size=self.loss_chunk)
        return loss, jnp.sum(mask)

    def eval_sums(self, graphdef: nnx.GraphDef, params: dict, batch: Batch) -> dict[str, jax.Array]:
        loss, tokens = self.loss_sums(graphdef, params, batch)
        return {"loss": loss, "count": tokens}

    @staticmethod
    def eval_metrics(sums: dict[str, float]) -> dict[str, float]:
        return {"eval_loss": sums["loss"] / sums["count"]} if sums["count"] else {}

    def train_iterator(self, config, data_config, tokenizer: Tokenizer):
        return pipeline.make_train_iterator(data_config, tokenizer)

    def eval_iterator(self, config, data_config, tokenizer: Tokenizer):
        return pipeline.make_eval_iterator(data_config, tokenizer)

    def test_batches(self, config, data_config, tokenizer: Tokenizer) -> Callable[[], Iterator] | None:
        """SFT's held-out measure is the validation loss; its test sets are judged (alpacare_jax.eval)."""
        return None

    def steps_per_epoch(self, config, data_config, tokenizer: Tokenizer) -> int:
        return pipeline.steps_per_epoch(data_config, tokenizer, process_count=jax.process_count())


@dataclasses.dataclass(frozen=True)
class MultipleChoice:
    name: ClassVar[str] = "multiple_choice"
    model_class: ClassVar[type] = LlamaForScoring
    batch_axes: ClassVar[tuple[str, ...]] = ("batch",)  # questions split over the data axes, options kept together
    count_name: ClassVar[str] = "loss_questions"
    selection_metric: ClassVar[tuple[str, bool]] = ("eval_accuracy", True)

    @staticmethod
    def option_scores(graphdef: nnx.GraphDef, params: dict, batch: Batch) -> jax.Array:
        """[questions, options] float32 scores; options a question does not have are -inf."""
        model = nnx.merge(graphdef, params)
        questions, options, length = batch["input_ids"].shape
        scores = model(batch["input_ids"].reshape(questions * options, length),
                       batch["lengths"].reshape(questions * options)).reshape(questions, options)
        return jnp.where(batch["lengths"] > 0, scores, -jnp.inf)

    def _per_question(self, graphdef, params, batch) -> tuple[jax.Array, jax.Array, jax.Array]:
        scores = self.option_scores(graphdef, params, batch)
        label = batch["label"].astype(jnp.int32)
        # Padding questions (weight 0) have no real options: give them finite scores so 0 * loss stays 0.
        weight = batch["weight"].astype(jnp.float32)
        scores = jnp.where(weight[:, None] > 0, scores, 0.0)
        nll = jax.nn.logsumexp(scores, axis=-1) - jnp.take_along_axis(scores, label[:, None], axis=-1)[:, 0]
        correct = (jnp.argmax(scores, axis=-1) == label).astype(jnp.float32)
        return nll, correct, weight

    def loss_sums(self, graphdef: nnx.GraphDef, params: dict, batch: Batch,
                  dropout_rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """(sum over questions of -log softmax(option scores)[right option], number of questions).

        `dropout_rng` is there for the train step's sake: LoRA (whose dropout it drives) trains SFT only."""
        nll, _, weight = self._per_question(graphdef, params, batch)
        return jnp.sum(nll * weight), jnp.sum(weight)

    def eval_sums(self, graphdef: nnx.GraphDef, params: dict, batch: Batch) -> dict[str, jax.Array]:
        nll, correct, weight = self._per_question(graphdef, params, batch)
        return {"loss": jnp.sum(nll * weight), "correct": jnp.sum(correct * weight), "count": jnp.sum(weight)}

    @staticmethod
    def eval_metrics(sums: dict[str, float]) -> dict[str, float]:
        if not sums["count"]:
            return {}
        return {"eval_loss": sums["loss"] / sums["count"], "eval_accuracy": sums["correct"] / sums["count"]}

    def train_iterator(self, config, data_config, tokenizer: Tokenizer):
        return multiple_choice.make_train_iterator(config, tokenizer)

    def eval_iterator(self, config, data_config, tokenizer: Tokenizer):
        return multiple_choice.make_eval_iterator(config, tokenizer)

    def test_batches(self, config, data_config, tokenizer: Tokenizer) -> Callable[[], Iterator] | None:
        """A fresh pass over the test split when the config names one (else None): scored beside dev, so the
        dev-selected step's test accuracy is in metrics.jsonl (the paper reports MedQA and HEAD-QA test)."""
        if not config.multiple_choice.test_file:
            return None
        return lambda: multiple_choice.make_eval_iterator(config, tokenizer, split="test")

    def steps_per_epoch(self, config, data_config, tokenizer: Tokenizer) -> int:
        return multiple_choice.steps_per_epoch(config, process_count=jax.process_count())


Objective = SupervisedFineTuning | MultipleChoice


def from_config(config: ml_collections.ConfigDict) -> Objective:
    if config.objective == "sft":
        return SupervisedFineTuning(loss_chunk=config.loss_chunk_size)
    if config.objective == "multiple_choice":
        return MultipleChoice()
    raise ValueError(f"config.objective={config.objective!r}; choose one of {OBJECTIVES}")


def tokens_per_step(config: ml_collections.ConfigDict) -> int:
    """Tokens the model reads per step (every option row counts for multiple choice)."""
    rows = config.data.global_batch_size
    if config.objective == "multiple_choice":
        rows *= config.multiple_choice.num_options
    return rows * config.data.max_length


def model_class(objective: str) -> type:
    """The model class an objective trains (what a workdir with that `config.objective` holds)."""
    return MultipleChoice.model_class if objective == MultipleChoice.name else SupervisedFineTuning.model_class


def initial_params_from_causal_lm(params: dict, model_config: Any, seed: int) -> dict:
    """A pretrained causal LM's weights as a scorer's: the backbone kept, `lm_head` dropped, a fresh
    `score` head drawn like the model's other weights (normal, std 0.02, as transformers initialises it)."""
    score = 0.02 * jax.random.normal(jax.random.PRNGKey(seed), (model_config.hidden_size, 1), jnp.float32)
    return {**{k: v for k, v in params.items() if k != "lm_head"},
            "score": score.astype(model_config.param_dtype)}

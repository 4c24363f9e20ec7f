"""Multiple-choice scorer against transformers' LlamaForSequenceClassification on the HF export."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.torch import load_file as load_torch_file

from alpacare_jax import hf
from alpacare_jax.model import LlamaConfig, LlamaForScoring
from alpacare_jax.train.objectives import MultipleChoice

PAD = 0
QUESTIONS, OPTIONS, LENGTH = 3, 4, 24


def random_model(seed: int = 0) -> LlamaForScoring:
    model = LlamaForScoring(LlamaConfig.tiny(vocab_size=128, max_position_embeddings=64), rngs=nnx.Rngs(seed))
    # Random norm scales and a larger head than the 0.02 init, so every weight shows in the scores.
    rng = np.random.default_rng(seed)
    for norm in (model.layers.input_norm, model.layers.post_attention_norm, model.norm):
        norm.scale.set_value(jnp.asarray(rng.uniform(0.5, 1.5, norm.scale.shape), jnp.float32))
    model.score.set_value(jnp.asarray(rng.normal(0, 0.5, model.score.shape), jnp.float32))
    return model


def option_batch(seed: int = 1) -> dict[str, np.ndarray]:
    """Right-padded option rows of different lengths; question 2 has only 3 options (one empty row)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, LENGTH + 1, (QUESTIONS, OPTIONS)).astype(np.int32)
    lengths[2, 3] = 0
    ids = rng.integers(1, 128, (QUESTIONS, OPTIONS, LENGTH)).astype(np.int32)  # no PAD inside real text
    ids[np.arange(LENGTH) >= lengths[..., None]] = PAD
    return {"input_ids": ids, "lengths": lengths, "label": np.array([1, 3, 2], np.int32),
            "weight": np.ones(QUESTIONS, np.int32)}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = random_model()
    path = tmp_path_factory.mktemp("scorer")
    hf.save_pretrained(model, path, dtype="float32")
    torch_model = transformers.AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    return model, path, torch_model


def test_export_is_a_one_label_sequence_classifier(exported):
    _, path, torch_model = exported
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert type(torch_model).__name__ == "LlamaForSequenceClassification"
    assert torch_model.config.num_labels == 1 and torch_model.config.pad_token_id == PAD
    assert "lm_head.weight" not in torch_model.state_dict()


def test_option_scores_match_transformers(exported):
    model, _, torch_model = exported
    batch = option_batch()
    graphdef, params = nnx.split(model)
    ours = np.asarray(MultipleChoice.option_scores(graphdef, params, jax.tree.map(jnp.asarray, batch)))
    with torch.no_grad():
        theirs = torch_model(torch.as_tensor(batch["input_ids"].reshape(-1, LENGTH), dtype=torch.long)).logits
    theirs = theirs.reshape(QUESTIONS, OPTIONS).numpy()
    real = batch["lengths"] > 0
    np.testing.assert_allclose(ours[real], theirs[real], atol=1e-4, rtol=0)
    assert np.isneginf(ours[~real]).all()
    assert np.ptp(ours[real]) > 0.1  # the scores differ between rows: the comparison means something


def test_training_gradients_match_transformers(exported, tmp_path):
    """The objective's loss (softmax over each question's options, cross-entropy) and its gradient, against
    PyTorch autograd through transformers, tensor by tensor under HF names."""
    model, _, torch_model = exported
    batch = option_batch(seed=2)
    objective = MultipleChoice()
    graphdef, params = nnx.split(model)

    def mean_loss(params):
        total, count = objective.loss_sums(graphdef, params, jax.tree.map(jnp.asarray, batch))
        return total / count

    loss, grads = jax.jit(jax.value_and_grad(mean_loss))(params)

    torch_model.zero_grad()
    scores = torch_model(torch.as_tensor(batch["input_ids"].reshape(-1, LENGTH), dtype=torch.long)).logits
    scores = scores.reshape(QUESTIONS, OPTIONS).masked_fill(torch.as_tensor(batch["lengths"] == 0), float("-inf"))
    torch_loss = torch.nn.functional.cross_entropy(scores, torch.as_tensor(batch["label"], dtype=torch.long))
    torch_loss.backward()
    assert float(loss) == pytest.approx(torch_loss.item(), abs=1e-5)

    hf.save_pretrained(nnx.merge(graphdef, grads), tmp_path / "grads", dtype="float32")  # grads under HF names
    ours = load_torch_file(tmp_path / "grads" / hf.SINGLE_FILE)
    assert set(ours) == {name for name, _ in torch_model.named_parameters()}
    for name, param in torch_model.named_parameters():
        # Gradients here reach a few units (the head is drawn large): fp32 summation-order noise scales with them.
        scale = max(1.0, float(param.grad.abs().max()))
        np.testing.assert_allclose(ours[name].numpy(), param.grad.numpy(), atol=2e-6 * scale, rtol=1e-4, err_msg=name)

"""LoRA against PEFT on the same random weights: logits of the exported adapter and of the merged export,
training gradients against PyTorch autograd through peft, and PEFT-written adapters read back."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx
from safetensors.torch import load_file as load_torch_file

from alpacare_jax import hf, hf_peft
from alpacare_jax.infer.loading import load_with_adapter
from alpacare_jax.model import Llama, LoraConfig, lora
from alpacare_jax.train import step
from tests.hf_fixtures import hf_logits, make_hf_model, random_ids, save_hf

ATOL = 1e-4
CASES = {  # HF shape, adapters
    "gqa_all_targets": ("gqa_2kv", LoraConfig(rank=4, alpha=8.0)),
    "rope_scaling_rslora_qv": ("llama31_rope_scaling", LoraConfig(rank=8, alpha=4.0, rslora=True, targets=("q", "v"))),
    "tied_mlp_only": ("tied_embeddings", LoraConfig(rank=2, alpha=2.0, targets=("gate", "up", "down", "o"))),
}


def lora_model(base_dir, adapters: LoraConfig, seed: int = 0) -> Llama:
    """The HF model at `base_dir` with random adapters (B too: fresh adapters would add exactly nothing)."""
    plain = hf.load_pretrained(base_dir, dtype=jnp.float32)
    config = plain.config.replace(lora=adapters)
    graphdef, state = nnx.split(Llama(config, rngs=nnx.Rngs(seed)))
    fresh, _ = lora.split_adapters(nnx.to_pure_dict(state))
    keys = iter(jax.random.split(jax.random.key(seed + 1), 64))
    noisy = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), fresh)
    return nnx.merge(graphdef, lora.merge_trees(noisy, nnx.to_pure_dict(nnx.state(plain))))


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    shape, adapters = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    torch_base = make_hf_model(shape)
    base_dir = save_hf(torch_base, root / "base")
    model = lora_model(base_dir, adapters)
    hf_peft.save_adapter(model, root / "adapter", base=str(base_dir))
    return model, base_dir, root / "adapter"


def peft_model(base_dir, adapter_dir, trainable: bool = False):
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return peft.PeftModel.from_pretrained(base, adapter_dir, is_trainable=trainable).eval()


def test_exported_adapter_and_merged_export_give_our_logits_in_peft(case, tmp_path):
    model, base_dir, adapter_dir = case
    ids = random_ids(model.config.vocab_size)
    ours = np.asarray(model(jnp.asarray(ids)))
    config = json.loads((adapter_dir / hf_peft.ADAPTER_CONFIG_FILE).read_text())
    assert config["base_model_name_or_path"] == str(base_dir) and config["r"] == model.config.lora.rank

    with_adapter = peft_model(base_dir, adapter_dir)
    np.testing.assert_allclose(hf_logits(with_adapter, ids), ours, atol=ATOL, rtol=0)
    base_only = hf_logits(transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), ids)
    assert np.abs(base_only - ours).max() > 100 * ATOL  # the adapters matter, so the match above means something

    merged = lora.merged_model(model)
    assert merged.config.lora is None and "q_lora" not in nnx.to_pure_dict(nnx.state(merged))["layers"]["attention"]
    hf.save_pretrained(merged, tmp_path / "merged", dtype="float32")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    np.testing.assert_allclose(hf_logits(reloaded, ids), ours, atol=ATOL, rtol=0)
    np.testing.assert_allclose(hf_logits(reloaded, ids), hf_logits(with_adapter.merge_and_unload(), ids),
                               atol=ATOL, rtol=0)


def test_lora_gradients_match_pytorch_autograd_through_peft(case, tmp_path):
    """The trainer's loss over adapters + frozen base, and every adapter's gradient, against peft."""
    model, base_dir, adapter_dir = case
    ids = random_ids(model.config.vocab_size, length=20, seed=5)
    inputs, labels = ids[:, :-1], ids[:, 1:]
    loss_mask = np.ones(labels.shape, np.int32)
    loss_mask[0, :7] = 0
    batch = {"input_ids": inputs, "labels": labels, "loss_mask": loss_mask,
             "segment_ids": np.ones(inputs.shape, np.int32),
             "positions": np.broadcast_to(np.arange(inputs.shape[1]), inputs.shape)}
    graphdef, params = nnx.split(model)
    adapters, base = lora.split_adapters(nnx.to_pure_dict(params))

    def mean_loss(adapters):
        total, count = step.loss_sums(graphdef, lora.merge_trees(adapters, base), jax.tree.map(jnp.asarray, batch),
                                      loss_chunk=8)
        return total / count

    loss, grads = jax.jit(jax.value_and_grad(mean_loss))(adapters)

    torch_model = peft_model(base_dir, adapter_dir, trainable=True)
    torch_labels = torch.as_tensor(np.where(loss_mask == 1, labels, -100))
    logits = torch_model(torch.as_tensor(inputs)).logits
    torch_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch_labels.reshape(-1))
    torch_loss.backward()
    assert float(loss) == pytest.approx(torch_loss.item(), abs=1e-5)

    # Our gradients written under PEFT's names by the exporter itself.
    hf_peft.save_adapter(nnx.merge(graphdef, lora.merge_trees(grads, base)), tmp_path / "grads", base="")
    ours = load_torch_file(tmp_path / "grads" / hf_peft.ADAPTER_FILE)
    trained = {name.replace(".default", ""): p for name, p in torch_model.named_parameters() if p.requires_grad}
    assert sorted(trained) == sorted(ours) and trained
    for name, param in trained.items():
        np.testing.assert_allclose(ours[name].numpy(), param.grad.numpy(), atol=2e-6, rtol=1e-4, err_msg=name)


def test_adapter_written_by_peft_loads_onto_its_base(tmp_path):
    """An adapter PEFT trained and saved (not ours) generates through `load_model` as peft computes it."""
    torch_base = make_hf_model("gqa_2kv", seed=4)
    base_dir = save_hf(torch_base, tmp_path / "base")
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                             init_lora_weights=False, task_type="CAUSAL_LM")  # random B: a non-zero update
    peft_side = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base_dir), config).eval()
    peft_side.save_pretrained(tmp_path / "adapter")
    adapter_config = json.loads((tmp_path / "adapter" / hf_peft.ADAPTER_CONFIG_FILE).read_text())
    adapter_config["base_model_name_or_path"] = str(base_dir)
    (tmp_path / "adapter" / hf_peft.ADAPTER_CONFIG_FILE).write_text(json.dumps(adapter_config))
    model = load_with_adapter(tmp_path / "adapter")
    assert model.config.lora is None  # folded in for decoding
    ids = random_ids(128, seed=9)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), hf_logits(peft_side, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("field, value, message", [
    ("use_dora", True, "'use_dora' = True is not supported"),
    ("target_modules", ["q_proj", "lm_head"], "'target_modules'"),
    ("peft_type", "IA3", "peft_type 'IA3'"),
    ("r", 0, "rank"),
])
def test_unsupported_adapter_configs_fail_naming_the_file_and_field(tmp_path, field, value, message):
    config = hf_peft.peft_config(LoraConfig(rank=4, alpha=8.0), base="base")
    config[field] = value
    (tmp_path / hf_peft.ADAPTER_CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(hf.CheckpointError, match=rf"adapter_config\.json: .*{message}"):
        hf_peft.read_adapter_config(tmp_path)


def test_adapter_of_another_rank_is_refused_by_name(case):
    model, _, adapter_dir = case
    other = model.config.replace(lora=LoraConfig(rank=model.config.lora.rank + 1, alpha=model.config.lora.alpha,
                                                 targets=model.config.lora.targets))
    with pytest.raises(hf.CheckpointError, match="adapters with rank="):
        hf_peft.load_adapter(adapter_dir, other)

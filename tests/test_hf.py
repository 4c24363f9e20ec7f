"""HF import/export: logits and weights against transformers on the same random weights."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors import safe_open
from safetensors.torch import load_file as load_torch_file
from safetensors.torch import save_file as save_torch_file

from alpacare_jax import hf, sharding
from alpacare_jax.train import step
from tests.hf_fixtures import HF_SHAPES, hf_logits, make_hf_model, random_ids, save_hf

ATOL = 1e-4


@pytest.fixture(scope="module", params=sorted(HF_SHAPES))
def hf_checkpoint(request, tmp_path_factory):
    model = make_hf_model(request.param)
    path = save_hf(model, tmp_path_factory.mktemp(request.param))
    return model, path


def test_load_matches_transformers_logits(hf_checkpoint):
    torch_model, path = hf_checkpoint
    model = hf.load_pretrained(path, dtype=jnp.float32)
    ids = random_ids(torch_model.config.vocab_size)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), hf_logits(torch_model, ids), atol=ATOL, rtol=0)


def test_export_reloads_in_transformers_with_identical_weights(hf_checkpoint, tmp_path):
    torch_model, path = hf_checkpoint
    model = hf.load_pretrained(path, dtype=jnp.float32)
    hf.save_pretrained(model, tmp_path / "out", dtype="float32")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    original = torch_model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    ids = random_ids(torch_model.config.vocab_size, seed=7)
    np.testing.assert_array_equal(hf_logits(reloaded, ids), hf_logits(torch_model, ids))
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    assert reloaded.config.tie_word_embeddings == torch_model.config.tie_word_embeddings


def test_sharded_checkpoint_round_trip(tmp_path):
    torch_model = make_hf_model("gqa_2kv", seed=3)
    path = save_hf(torch_model, tmp_path / "hf", max_shard_size="20KB")
    assert (path / hf.INDEX_FILE).exists() and len(list(path.glob("model-*.safetensors"))) > 2
    model = hf.load_pretrained(path)
    hf.save_pretrained(model, tmp_path / "ours", dtype="float32", max_shard_size="30KB")
    files = sorted(p.name for p in (tmp_path / "ours").glob("*.safetensors"))
    index = json.loads((tmp_path / "ours" / hf.INDEX_FILE).read_text())
    assert len(files) > 2 and sorted(set(index["weight_map"].values())) == files
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    ids = random_ids(128)
    np.testing.assert_array_equal(hf_logits(reloaded, ids), hf_logits(torch_model, ids))
    again = hf.load_pretrained(tmp_path / "ours")
    np.testing.assert_array_equal(np.asarray(again(jnp.asarray(ids))), np.asarray(model(jnp.asarray(ids))))


def test_bf16_export_keeps_bf16(tmp_path):
    torch_model = make_hf_model("gqa_2kv").to(torch.bfloat16)
    path = save_hf(torch_model, tmp_path / "hf")
    model = hf.load_pretrained(path, dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(jax.tree.map(lambda v: v[...], model)))
    hf.save_pretrained(model, tmp_path / "out", dtype="bfloat16")
    with safe_open(tmp_path / "out" / hf.SINGLE_FILE, framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
    assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, torch_model.state_dict()[name]), name


@pytest.mark.parametrize("shape", ["gqa_2kv", "llama31_rope_scaling"])
def test_parity_on_8_device_mesh(shape, tmp_path):
    assert jax.device_count() >= 8, "tests/conftest.py sets 8 fake CPU devices"
    torch_model = make_hf_model(shape)
    path = save_hf(torch_model, tmp_path / "hf", max_shard_size="40KB")
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=4, tensor=2))
    model = hf.load_pretrained(path, mesh=mesh)

    q = model.layers.attention.q_proj[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (2, 16, 2, 16)
    gate = model.layers.mlp.gate_proj[...]
    assert gate.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert model.embed_tokens[...].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert len({d for a in (q, gate) for d in a.sharding.device_set}) == 8

    ids = random_ids(128)
    with sharding.activate(mesh):
        logits = jax.jit(lambda m, x: m(x))(model, jnp.asarray(ids))
    np.testing.assert_allclose(np.asarray(logits), hf_logits(torch_model, ids), atol=ATOL, rtol=0)
    hf.save_pretrained(model, tmp_path / "out", dtype="float32")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, torch_model.state_dict()[name]), name


# ---- corrupted checkpoints --------------------------------------------------------------------------------

@pytest.fixture
def single_file_checkpoint(tmp_path):
    path = save_hf(make_hf_model("gqa_2kv"), tmp_path / "hf")
    return path, load_torch_file(path / hf.SINGLE_FILE)


def test_missing_tensor_is_named(single_file_checkpoint):
    path, tensors = single_file_checkpoint
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_torch_file(tensors, path / hf.SINGLE_FILE, metadata={"format": "pt"})
    with pytest.raises(hf.CheckpointError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' is missing"):
        hf.load_pretrained(path)


def test_wrong_shape_is_named(single_file_checkpoint):
    path, tensors = single_file_checkpoint
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(48, 64)
    save_torch_file(tensors, path / hf.SINGLE_FILE, metadata={"format": "pt"})
    expected = r"'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \[48, 64\], expected \[32, 64\]"
    with pytest.raises(hf.CheckpointError, match=expected):
        hf.load_pretrained(path)


def test_missing_shard_file_and_unexpected_tensor_are_named(tmp_path):
    path = save_hf(make_hf_model("multi_head"), tmp_path / "hf", max_shard_size="20KB")
    index = json.loads((path / hf.INDEX_FILE).read_text())
    victim = index["weight_map"]["model.norm.weight"]
    (path / victim).unlink()
    with pytest.raises(hf.CheckpointError, match=victim):
        hf.load_pretrained(path)

    path = save_hf(make_hf_model("multi_head"), tmp_path / "hf2")
    tensors = load_torch_file(path / hf.SINGLE_FILE)
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_torch_file(tensors, path / hf.SINGLE_FILE, metadata={"format": "pt"})
    with pytest.raises(hf.CheckpointError, match=r"q_proj\.bias"):
        hf.load_pretrained(path)


def test_truncated_file_is_named(single_file_checkpoint):
    path, _ = single_file_checkpoint
    data = (path / hf.SINGLE_FILE).read_bytes()
    (path / hf.SINGLE_FILE).write_bytes(data[:-100])
    with pytest.raises(hf.CheckpointError, match=r"model\.safetensors: tensor '.*' is cut short"):
        hf.load_pretrained(path)
    (path / hf.SINGLE_FILE).write_bytes(data[:1000])  # not even the whole header
    with pytest.raises(hf.CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        hf.load_pretrained(path)


def test_unsupported_architecture_is_named(single_file_checkpoint):
    path, _ = single_file_checkpoint
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="mistral", architectures=["MistralForCausalLM"])
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(hf.CheckpointError, match="MistralForCausalLM"):
        hf.load_pretrained(path)


def test_training_gradients_match_transformers(hf_checkpoint, tmp_path):
    """The trainer's loss and its gradient (fused chunked cross-entropy, custom attention and SwiGLU
    backward passes) against PyTorch autograd through transformers, tensor by tensor under HF names."""
    torch_model, path = hf_checkpoint
    model = hf.load_pretrained(path, dtype=jnp.float32)
    ids = random_ids(torch_model.config.vocab_size, length=20, seed=5)
    inputs, labels = ids[:, :-1], ids[:, 1:]
    loss_mask = np.ones(labels.shape, np.int32)
    loss_mask[0, :7] = 0  # a masked prompt, as in SFT
    batch = {"input_ids": inputs, "labels": labels, "loss_mask": loss_mask,
             "segment_ids": np.ones(inputs.shape, np.int32),
             "positions": np.broadcast_to(np.arange(inputs.shape[1]), inputs.shape)}
    graphdef, params = nnx.split(model)

    def mean_loss(params):
        total, count = step.loss_sums(graphdef, params, jax.tree.map(jnp.asarray, batch), loss_chunk=8)
        return total / count

    loss, grads = jax.jit(jax.value_and_grad(mean_loss))(params)

    torch_model.zero_grad()
    torch_labels = torch.as_tensor(np.where(loss_mask == 1, labels, -100))
    logits = torch_model(torch.as_tensor(inputs)).logits
    torch_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch_labels.reshape(-1))
    torch_loss.backward()
    assert float(loss) == pytest.approx(torch_loss.item(), abs=1e-5)

    hf.save_pretrained(nnx.merge(graphdef, grads), tmp_path / "grads", dtype="float32")  # grads under HF names
    ours = load_torch_file(tmp_path / "grads" / hf.SINGLE_FILE)
    for name, param in torch_model.named_parameters():
        np.testing.assert_allclose(ours[name].numpy(), param.grad.numpy(), atol=2e-6, rtol=1e-4, err_msg=name)

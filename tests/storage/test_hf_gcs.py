"""HF import and export at gs:// against a local Cloud Storage emulator: the same bits as a local directory.

Import from the emulator must give bit-identical parameters (same shardings) and the same logits as import
from the local directory it was uploaded from, which in turn match transformers; an export to gs:// reloads
identically, in transformers too. With 2 processes x 4 devices and FSDP over all 8, each process downloads
(counted by a relay in front of the emulator) well under the whole checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from etils import epath
from flax import nnx

from alpacare_jax import hf, sharding
from alpacare_jax.data.tokenizer import load_tokenizer, train_tokenizer
from tests.hf_fixtures import hf_logits, make_hf_model, random_ids, save_hf
from tests.storage.emulator import CountingProxy, free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("hf_import_worker.py")


def upload(local_dir: Path, url: str) -> str:
    for file in sorted(local_dir.iterdir()):
        (epath.Path(url) / file.name).write_bytes(file.read_bytes())
    return url


def assert_same_parameters(a: nnx.Module, b: nnx.Module) -> None:
    leaves_a, leaves_b = jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b))
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        assert x.sharding == y.sharding and x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_import_from_gs_is_bit_identical_on_one_device_and_an_8_device_mesh(gcs_bucket, tmp_path):
    torch_model = make_hf_model("gqa_2kv", seed=4)
    local = save_hf(torch_model, tmp_path / "hf", max_shard_size="40KB")  # several shards + index
    url = upload(local, f"{gcs_bucket}/Llama-tiny-hf")
    ids = random_ids(128)
    reference = hf_logits(torch_model, ids)

    from_gs = hf.load_pretrained(url)
    assert_same_parameters(from_gs, hf.load_pretrained(local))
    logits = jax.jit(lambda m, x: m(x))
    np.testing.assert_allclose(np.asarray(logits(from_gs, jnp.asarray(ids))), reference, atol=1e-4, rtol=0)

    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=4, tensor=2))
    from_gs = hf.load_pretrained(url, mesh=mesh, dtype=jnp.bfloat16)
    from_local = hf.load_pretrained(local, mesh=mesh, dtype=jnp.bfloat16)
    assert_same_parameters(from_gs, from_local)
    assert len(from_gs.layers.mlp.gate_proj[...].sharding.device_set) == 8
    with sharding.activate(mesh):
        logits = jax.jit(lambda m, x: m(x))
        np.testing.assert_array_equal(np.asarray(logits(from_gs, jnp.asarray(ids))),
                                      np.asarray(logits(from_local, jnp.asarray(ids))))


def test_export_to_gs_reloads_identically(gcs_bucket, tmp_path):
    torch_model = make_hf_model("tied_embeddings", seed=5)
    model = hf.load_pretrained(save_hf(torch_model, tmp_path / "hf"))
    tokenizer = train_tokenizer([f"patient {i} reports pain in the {part}" for i, part in
                                 enumerate(["chest", "knee", "back", "head"] * 50)], tmp_path / "tok", vocab_size=300)
    out = f"{gcs_bucket}/export"
    hf.save_pretrained(model, out, dtype="float32", max_shard_size="30KB", tokenizer=tokenizer)
    hf.save_pretrained(model, out, dtype="float32", tokenizer=tokenizer)  # again, as one file: old shards go
    names = sorted(p.name for p in epath.Path(out).iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
                     "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]

    assert_same_parameters(hf.load_pretrained(out), model)
    reloaded_tokenizer = load_tokenizer(out)
    text = "patient 7 reports pain in the knee"
    assert reloaded_tokenizer.encode(text, bos=True) == tokenizer.encode(text, bos=True)

    downloaded = tmp_path / "downloaded"
    downloaded.mkdir()
    for name in names:
        (downloaded / name).write_bytes((epath.Path(out) / name).read_bytes())
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(downloaded, dtype=torch.float32)
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, torch_model.state_dict()[name]), name


def test_a_missing_gs_shard_is_named(gcs_bucket, tmp_path):
    local = save_hf(make_hf_model("multi_head"), tmp_path / "hf", max_shard_size="20KB")
    url = upload(local, f"{gcs_bucket}/broken")
    victim = json.loads((local / hf.INDEX_FILE).read_text())["weight_map"]["model.norm.weight"]
    (epath.Path(url) / victim).unlink()
    with pytest.raises(hf.CheckpointError, match=f"{url}/{victim}: shard listed for tensor"):
        hf.load_pretrained(url)


@pytest.mark.slow
def test_two_processes_each_read_about_half_of_the_checkpoint(gcs_emulator, gcs_bucket, tmp_path):
    # Large enough that HTTP headers and metadata are a small part of what is downloaded.
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5)
    torch_model = transformers.LlamaForCausalLM(config).eval()
    local = save_hf(torch_model, tmp_path / "hf", max_shard_size="3MB")
    url = upload(local, f"{gcs_bucket}/Llama-small-hf")
    checkpoint_bytes = sum(f.stat().st_size for f in local.glob("*.safetensors"))
    ids = random_ids(1024)
    np.save(tmp_path / "ids.npy", ids)
    np.save(tmp_path / "logits.npy", hf_logits(torch_model, ids))

    port = str(free_port())
    proxies = [CountingProxy(gcs_emulator.url) for _ in range(2)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "PYTHONPATH": str(REPO_ROOT)}
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(i), port, url, str(local), str(tmp_path)],
                              env={**env, **gcs_emulator.env(proxies[i].url)}, cwd=tmp_path, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for i in range(2)]
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
        for proxy in proxies:
            proxy.close()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    for i, proxy in enumerate(proxies):
        result = json.loads((tmp_path / f"process{i}.json").read_text())
        assert result["identical_to_local"] and result["logits_max_error"] < 1e-4, result
        share = proxy.bytes_served / checkpoint_bytes
        assert 0.45 < share <= 0.6, f"process {i} downloaded {share:.0%} of the checkpoint"

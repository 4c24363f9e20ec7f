"""Every shipped TPU config compiles for its slice and fits its HBM (real sizes, abstract TPU devices).

libtpu (the `tpu` extra) compiles for TPU topologies on this CPU host; nothing is allocated, so a 13B
train step costs a compile (tens of seconds) and a few GiB of host memory, not a TPU. These tests
are what stops a config change from failing on the pod after the queue wait.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

pytest.importorskip("libtpu", reason="needs the tpu extra (libtpu) to compile for TPU")

from alpacare_jax import aot  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TPU_CONFIGS = ("llama1_7b", "llama2_7b", "llama1_13b", "llama2_13b", "llama3_1_8b")


def load_config(name: str):
    spec = importlib.util.spec_from_file_location(f"config_{name}", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.parametrize("name, chips, topology", [
    ("v5p-8", 4, "v5p:2x2x1"), ("v5p-16", 8, "v5p:2x2x2"), ("v4-16", 8, "v4:2x2x2"),
    ("v5e-16", 16, "v5e:4x4"), ("v6e-8", 8, "v6e:2x4"), ("v5e-256", 256, "v5e:16x16"),
])
def test_slice_names_count_cores_or_chips_like_cloud_tpu(name, chips, topology):
    tpu = aot.parse_slice(name)
    assert (tpu.chips, tpu.topology_name) == (chips, topology)


@pytest.mark.parametrize("bad", ["v5p-7", "v3-8", "tpu-8", "v5e-12"])
def test_unknown_slices_fail_clearly(bad):
    with pytest.raises(ValueError, match="TensorCores|unknown TPU slice|no v5e slice"):
        _ = aot.parse_slice(bad).topology_name


@pytest.mark.parametrize("name", TPU_CONFIGS)
def test_configs_follow_the_alpacare_recipe_on_splash_attention(name):
    c = load_config(name)
    assert (c.optimizer.learning_rate, c.optimizer.warmup_ratio, c.optimizer.weight_decay) == (2e-5, 0.03, 0.0)
    assert (c.num_epochs, c.data.global_batch_size) == (3, 128)
    assert (c.model.param_dtype, c.model.dtype, c.model.attention_impl) == ("float32", "bfloat16", "splash")
    assert c.model.remat_policy != "none" and c.init_from_hf
    assert c.data.global_batch_size % c.grad_accum_steps == 0
    _ = aot.parse_slice(c.tpu_topology).topology_name  # a slice this tool knows


@pytest.mark.parametrize("name", TPU_CONFIGS)
def test_shipped_config_compiles_for_its_tpu_slice_and_fits(name):
    config = load_config(name)
    report = aot.compile_train_step(config, aot.parse_slice(config.tpu_topology), name)
    print(report.row())
    assert report.fits, report.row() + " " + report.refusal
    assert 0 < report.arguments < report.peak
    assert report.pallas_kernels > 0, "splash attention fell back to the XLA backend"
    # FSDP gathers each layer weight once forward and once backward; a third gather (a weight fetched again
    # in another layout) costs pod bandwidth. It happened once, with the attention projections as 2-D matmuls.
    assert report.layer_weights == 7 and 0 < report.weight_gathers <= 2 * report.layer_weights, report


# ---- LoRA ---------------------------------------------------------------------------------------------------

LORA_CONFIGS = ("llama2_7b_lora", "llama2_13b_lora", "llama3_1_8b_lora", "llama2_70b_lora")


@pytest.mark.parametrize("name", LORA_CONFIGS)
def test_lora_configs_follow_the_alpacare_recipe_with_a_frozen_bf16_base(name):
    c = load_config(name)
    assert (c.optimizer.learning_rate, c.optimizer.warmup_ratio, c.optimizer.weight_decay) == (2e-4, 0.03, 0.0)
    assert (c.num_epochs, c.data.global_batch_size) == (3, 128)
    assert (c.model.param_dtype, c.model.dtype, c.model.attention_impl) == ("float32", "bfloat16", "splash")
    assert c.lora.rank > 0 and c.lora.base_dtype == "bfloat16" and c.init_from_hf
    assert c.data.global_batch_size % c.grad_accum_steps == 0
    _ = aot.parse_slice(c.tpu_topology).topology_name


@pytest.mark.extended
def test_lora_config_compiles_for_its_slice_holding_a_bf16_base_and_adapter_state_only():
    """LLaMA-2 7B with LoRA on a v5e-4 (the only LoRA compile here: each takes minutes on a busy CI machine).
    Per chip the step's arguments are a quarter of the bf16 base plus the adapters, their Adam moments and the
    batch (7B: 3.1 + 0.3 GiB): no fp32 master copy and no moments of the base, which is why full fine-tuning
    (16 bytes a weight) does not fit there."""
    name = "llama2_7b_lora"
    config = load_config(name)
    tpu = aot.parse_slice(config.tpu_topology)
    report = aot.compile_train_step(config, tpu, name)
    print(report.row())
    assert report.fits, report.row() + " " + report.refusal
    assert report.pallas_kernels > 0, "splash attention fell back to the XLA backend"
    # Beyond the base's quarter (3.1 GiB): the adapters with two moments, fp32, A split over the chips and B
    # (rank x outputs) whole on each (0.3 GiB); full fine-tuning's state is over 5x all that.
    base_per_chip = 2 * aot.model_config_for_aot(config).replace(lora=None).num_params() / tpu.chips
    assert base_per_chip < report.arguments < 1.2 * base_per_chip

    config.lora.rank = 0  # the same recipe training every weight: refused before compiling, state alone too big
    full = aot.compile_train_step(config, tpu, name)
    assert not full.fits and "alone need" in full.refusal and full.arguments > 4 * report.arguments


def test_cli_reports_an_oversized_run_as_not_fitting():
    """LLaMA-1 13B on a v4-16 (8 chips of 32 GiB): XLA refuses it, the tool says so and exits 1."""
    result = subprocess.run(
        [sys.executable, "-m", "alpacare_jax.aot", "--config=configs/llama1_13b.py", "--topology=v4-16"],
        cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "| llama1_13b | v4-16 | 8 |" in result.stdout and "| NO |" in result.stdout
    assert "does NOT fit" in result.stderr


def test_weight_gather_count_reads_plain_and_combined_all_gathers():
    params = {"layers": {"kernel": jax.ShapeDtypeStruct((4, 8, 16), jnp.float32),  # 4 layers of [8, 16]
                         "scale": jax.ShapeDtypeStruct((4, 8), jnp.float32)}}  # vectors are not counted
    hlo = ("%a = bf16[8,16]{1,0:T(8,128)(2,1)} all-gather(%x), dimensions={0}\n"
           "%b = (bf16[2,16]{1,0}, bf16[16,8]{1,0}) all-gather-start(%y)\n"  # combined: operand shard, result
           "%c = bf16[8,8]{1,0} all-gather(%z)\n"  # not a whole weight
           "%d = bf16[8,16]{1,0} add(%p, %q)\n")  # not a gather
    assert aot.count_weight_gathers(hlo, params) == (2, 1)


# ---- serving ----------------------------------------------------------------------------------------------

def test_serving_steps_compile_for_a_v5e_8_and_report_per_chip_memory():
    """The server's prefill and decoding programs of a small LLaMA (bf16, splash attention, the TPU cache
    layout) compile for a v5e-8's 8 chips, tensor parallel: weights and KV cache split 8 ways, the donated
    cache held once. A small model: its compile costs a fraction of a 7B's; BENCHMARKS.md has the 7B and 8B rows."""
    from alpacare_jax.model import LlamaConfig

    # head_dim 128, as in the real models: TPU tiles are 128 lanes wide, so 64 would pad the cache.
    model = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_layers=2, num_heads=8,
                        num_kv_heads=8, max_position_embeddings=4096, param_dtype="bfloat16", dtype="bfloat16",
                        attention_impl="splash")
    report = aot.compile_serve_steps(model, aot.parse_slice("v5e-8"), slots=16, max_length=4096,
                                     prefill_tokens=512, name="small")
    print(report.row(), f"compiled in {report.compile_seconds:.0f} s")
    assert report.fits, report
    assert report.weights == pytest.approx(2 * model.num_params() / 8, rel=0.01)
    # Every layer's keys and values, bf16, each chip holding one of the 8 KV heads of every slot.
    assert report.cache == model.num_layers * 16 * 4096 * 1 * model.head_dim * 2 * 2
    for peak in (report.prefill_peak, report.decode_peak):  # the donated cache is not held twice
        assert report.weights + report.cache <= peak < report.weights + 1.5 * report.cache


def test_serve_cli_reports_a_configuration_that_does_not_fit():
    """64 slots of LLaMA-3.1 8B's 32768-position context on a v5e-8: 32 GiB of KV cache per 16 GiB chip."""
    result = subprocess.run(
        [sys.executable, "-m", "alpacare_jax.aot", "--config=configs/llama3_1_8b.py", "--topology=v5e-8",
         "--serve_slots=64", "--serve_length=32768"],
        cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "| llama3_1_8b | v5e-8 | 8 | 64 | 32768 | 1.9 | 32.0 |" in result.stdout and "| NO |" in result.stdout
    assert "does NOT fit" in result.stderr and "KV cache alone" in result.stderr

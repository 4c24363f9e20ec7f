"""LLaMA model: configuration presets, Flax NNX modules, attention backends, KV-cache decoding."""

from alpacare_jax.model.config import LORA_TARGETS, PRESETS, LlamaConfig, LoraConfig, RopeScaling
from alpacare_jax.model.decode import SamplingConfig, generate
from alpacare_jax.model.llama import KVCache, Llama, LlamaForScoring

__all__ = ["LORA_TARGETS", "PRESETS", "KVCache", "Llama", "LlamaConfig", "LlamaForScoring", "LoraConfig", "RopeScaling",
           "SamplingConfig", "generate"]

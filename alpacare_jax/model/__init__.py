"""LLaMA model: configuration presets, Flax NNX modules, attention backends, KV-cache decoding."""

from alpacare_jax.model.config import PRESETS, LlamaConfig, RopeScaling
from alpacare_jax.model.decode import SamplingConfig, generate
from alpacare_jax.model.llama import KVCache, Llama, LlamaForScoring

__all__ = ["PRESETS", "KVCache", "Llama", "LlamaConfig", "LlamaForScoring", "RopeScaling", "SamplingConfig", "generate"]

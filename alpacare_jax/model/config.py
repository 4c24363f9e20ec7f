"""One configuration for every LLaMA generation this project trains.

LLaMA-1, LLaMA-2 and LLaMA-3/3.1 share one architecture (pre-norm decoder, RMSNorm, rotary embeddings,
SwiGLU MLP) and differ only in sizes, grouped-query attention and the rotary frequencies. Keeping them in
one frozen dataclass means a checkpoint's `config.json` maps to exactly one `LlamaConfig` and back.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

AttentionImpl = Literal["xla", "cudnn", "splash"]  # reference, cuDNN flash (GPU), Pallas splash (TPU)
# Names of jax.checkpoint_policies (or "none" for no rematerialisation, "full" for saving nothing).
RematPolicy = Literal[
    "none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "nothing_saveable"
]


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """LLaMA-3.1's frequency-dependent stretching of the rotary wavelengths (HF `rope_type="llama3"`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


# The projections LoRA can adapt, by the short names configs use (HF: q_proj, ..., down_proj).
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters on some projections (`alpacare_jax.model.lora`), in PEFT's conventions.

    Part of the model's configuration because the adapters are parameters of the model: a config with
    `lora` builds a `Llama` that holds them, and a checkpoint's model description says which it holds.
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0  # on each adapter's input, training only
    rslora: bool = False  # scale alpha / sqrt(rank) (rank-stabilised LoRA) instead of alpha / rank
    targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        if unknown or not self.targets:
            raise ValueError(f"lora targets {list(self.targets)}: choose a non-empty subset of {list(LORA_TARGETS)}")
        if self.rank < 1 or self.alpha <= 0:
            raise ValueError(f"lora rank ({self.rank}) must be >= 1 and alpha ({self.alpha}) > 0")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora dropout ({self.dropout}) must be in [0, 1)")

    @property
    def scale(self) -> float:
        """What the adapter's product is multiplied by (PEFT's `scaling`)."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int | None = None  # None: hidden_size // num_heads
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int | tuple[int, ...] = 2
    # Numerics: parameters are kept in `param_dtype` (the fp32 master copy during training) and cast
    # to `dtype` for the matmuls; norms, softmax and the logits are always computed in float32.
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat_policy: RematPolicy = "none"
    attention_impl: AttentionImpl = "xla"
    lora: LoraConfig | None = None  # adapters on top of the (then frozen) weights; None: a plain model

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) is not divisible by num_heads ({self.num_heads}); "
                    "set head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if isinstance(self.lora, dict):
            object.__setattr__(self, "lora", LoraConfig(**self.lora))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

    def replace(self, **changes: Any) -> LlamaConfig:
        return dataclasses.replace(self, **changes)

    @property
    def num_query_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = self.eos_token_id
        return eos if isinstance(eos, tuple) else (eos,)

    def num_params(self) -> int:
        d, m, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = d * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        per_layer = attn + 3 * d * m + 2 * d
        head = 0 if self.tie_word_embeddings else v * d
        return self.num_layers * per_layer + v * d + head + d

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), attention included.

        The standard 6N count plus the attention score and value matmuls (causal masking is not
        subtracted, as in MaxText and the PaLM MFU definition), so MFU is comparable across codebases.
        """
        # The embedding lookup is a gather, not a matmul; with tied embeddings the same matrix is the head.
        matmul_params = self.num_params() - (0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size)
        dense = 6 * matmul_params
        attention = 12 * self.num_layers * self.num_heads * self.head_dim * seq_len
        return float(dense + attention)

    # ---- presets -------------------------------------------------------------------------------------

    @classmethod
    def tiny(cls, **overrides: Any) -> LlamaConfig:
        """A few-hundred-thousand-parameter model for tests: GQA on, every code path exercised."""
        base = dict(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
            num_kv_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
        )
        return cls(**{**base, **overrides})

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> LlamaConfig:
        try:
            base = PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}") from None
        return dataclasses.replace(base, **overrides)


_LLAMA3_BASE = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
    num_kv_heads=8, rope_theta=500000.0, rms_norm_eps=1e-5, bos_token_id=128000,
)

PRESETS: dict[str, LlamaConfig] = {
    "llama1_7b": LlamaConfig(),
    "llama1_13b": LlamaConfig(hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40,
                              num_kv_heads=40),
    "llama2_7b": LlamaConfig(max_position_embeddings=4096, rms_norm_eps=1e-5),
    "llama2_13b": LlamaConfig(hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40,
                              num_kv_heads=40, max_position_embeddings=4096, rms_norm_eps=1e-5),
    "llama2_70b": LlamaConfig(hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64,
                              num_kv_heads=8, max_position_embeddings=4096, rms_norm_eps=1e-5),
    "llama3_8b": LlamaConfig(**_LLAMA3_BASE, max_position_embeddings=8192, eos_token_id=128001),
    "llama3_1_8b": LlamaConfig(**_LLAMA3_BASE, max_position_embeddings=131072,
                               eos_token_id=(128001, 128008, 128009), rope_scaling=RopeScaling()),
}

"""LLaMA-1/2/3 decoder in Flax NNX.

Every parameter carries logical axis names (see `alpacare_jax.sharding` for how they become mesh axes).
The decoder layers are stored stacked along a leading `layers` axis and run with `jax.lax.scan`, so
compile time does not grow with depth and `remat_policy` applies to one layer body.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx, struct

from alpacare_jax.model import lora
from alpacare_jax.model.attention import (
    AttentionMask,
    cached_attention,
    dot_product_attention,
    rowwise_cached_attention,
)
from alpacare_jax.model.config import LlamaConfig
from alpacare_jax.model.rope import apply_rotary, inverse_frequencies
from alpacare_jax.sharding import constrain

_INIT = nnx.initializers.normal(stddev=0.02)

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def token_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x [..., in] @ kernel [in, out], computed as one [tokens, in] @ [in, out] matmul between reshapes.

    Why not `x @ kernel` on [batch, length, in]: the weight gradient then contracts two axes (batch and
    length), and XLA's CPU backend first wrote each [tokens, mlp] gradient out again transposed, a third
    of the MLP's forward + backward time. With one token axis it reads them as they are. The attention
    projections keep their einsums: reshaping their [embed, heads, head_dim] weights to 2-D made XLA
    all-gather them twice per layer on TPU (the AOT-compiled step had 3 more all-gathers per layer) and
    gained nothing measurable on CPU.
    """
    return (x.reshape(-1, x.shape[-1]) @ kernel).reshape(*x.shape[:-1], kernel.shape[-1])


def _param(rngs: nnx.Rngs, shape: Sequence[int], names: tuple[str, ...], config: LlamaConfig, init=_INIT):
    value = init(rngs.params(), tuple(shape), jnp.dtype(config.param_dtype))
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


def for_tpu(config: LlamaConfig) -> bool:
    """Whether the model's programs are compiled for TPU (the TPU configs' splash attention says so):
    decoding then lays out its cache and loops over layers the way XLA's TPU compiler prefers."""
    return config.attention_impl == "splash"


@struct.dataclass
class KVCache:
    """Keys and values of every layer for `max_length` slots per row; row b holds its sequence at slots
    0 .. lengths[b] - 1, a token's slot being its rotary position.

    Rows are independent (each its own length, nothing shared but the buffer), which is what lets a
    server decode a fixed set of rows while requests come and go: a new prompt is written into a free
    row while the others keep their place. Slots past a row's length may hold anything (an earlier
    occupant's keys); attention never reads them, so freeing a row costs nothing.

    Two layouts, whichever the compiler reads best (`heads_major`, see `for_tpu`): each head's slots
    contiguous, [layers, batch, kv_heads, slots, head_dim], is what XLA's CPU dots read as they are (with
    slots first, every step first copied the attention window transposed, which made attention several
    times slower); XLA's TPU compiler lays the carried cache out slots first, [layers, batch, slots,
    kv_heads, head_dim], and given the other layout it copied the whole cache into that one on entering
    each decoding program (and back on leaving), doubling the cache's memory.
    """

    k: jax.Array  # [layers, batch, kv_heads, max_length, head_dim], or slots before heads if not heads_major
    v: jax.Array
    lengths: jax.Array  # [batch] int32
    heads_major: bool = struct.field(pytree_node=False, default=True)

    @staticmethod
    def heads_major_for(config: LlamaConfig) -> bool:
        """The layout for the model's compiler: slots first for TPU programs."""
        return not for_tpu(config)

    @staticmethod
    def layout(config: LlamaConfig, *, batch: int, max_length: int) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """The shape of `k` (and `v`) and its logical axis names."""
        if KVCache.heads_major_for(config):
            return ((config.num_layers, batch, config.num_kv_heads, max_length, config.head_dim),
                    ("layers", "batch", "kv_heads", "length", "head_dim"))
        return ((config.num_layers, batch, max_length, config.num_kv_heads, config.head_dim),
                ("layers", "batch", "length", "kv_heads", "head_dim"))

    @classmethod
    def empty(cls, config: LlamaConfig, batch: int, max_length: int, dtype=None) -> KVCache:
        shape, axes = cls.layout(config, batch=batch, max_length=max_length)
        zeros = constrain(jnp.zeros(shape, jnp.dtype(dtype or config.dtype)), axes)
        return cls(k=zeros, v=zeros, lengths=jnp.zeros((batch,), jnp.int32), heads_major=cls.heads_major_for(config))

    @property
    def slot_axis(self) -> int:
        return 3 if self.heads_major else 2

    @property
    def axes(self) -> tuple[str, ...]:
        return ("layers", "batch", "kv_heads", "length", "head_dim") if self.heads_major else \
            ("layers", "batch", "length", "kv_heads", "head_dim")

    @property
    def max_length(self) -> int:
        return self.k.shape[self.slot_axis]

    def repeated(self, rows: int) -> KVCache:
        """Each row repeated to make `rows` rows (a multiple of the batch): a shared prefix's cache, one copy
        per row that continues it (per batch shard when the prefix has a row per shard)."""
        repeat = rows // self.lengths.shape[0]
        k, v = (jnp.repeat(x, repeat, axis=1) for x in (self.k, self.v))
        return self.replace(k=k, v=v, lengths=jnp.repeat(self.lengths, repeat))

    def padded(self, max_length: int) -> KVCache:
        """The same rows with room for `max_length` slots each."""
        pad = [(0, 0)] * 5
        pad[self.slot_axis] = (0, max_length - self.max_length)
        return self.replace(k=constrain(jnp.pad(self.k, pad), self.axes), v=constrain(jnp.pad(self.v, pad), self.axes))


@struct.dataclass
class _LayerCache:
    """One layer's view of the stacked cache inside the layer scan: the buffer is carried whole from layer
    to layer and written only where the new tokens go, so a decoding step touches a few slots of it
    instead of rewriting every layer's cache (as scanning over the cache as an input and rebuilding it as
    an output did)."""

    k: jax.Array  # every layer's, as in KVCache
    v: jax.Array
    layer: jax.Array  # [] int32
    slots: jax.Array  # [batch, length] int32: where the new tokens go
    extents: jax.Array  # [batch] int32: one past the last slot a counted (non-padding) token sees; 0: none
    window: int = struct.field(pytree_node=False)  # attention reads slots [0, window) only
    heads_major: bool = struct.field(pytree_node=False)

    def append(self, k: jax.Array, v: jax.Array) -> _LayerCache:
        """Writes new keys and values [batch, length, kv_heads, head_dim] at `slots` (past the end: dropped)."""
        rows = jnp.arange(self.slots.shape[0])[:, None]
        at = (self.layer, rows, slice(None), self.slots) if self.heads_major else (self.layer, rows, self.slots)

        def write(buffer, new):
            return buffer.at[at].set(new.astype(buffer.dtype), mode="drop")

        return self.replace(k=write(self.k, k), v=write(self.v, v))

    def attend(self, q: jax.Array) -> jax.Array:
        """Attention of the new queries q [batch, length, heads, head_dim] over this layer's cache (their own
        keys included, once `append`ed). On CPU, row by row up to each row's extent; on other backends,
        over the layer's first `window` slots (what their dots read in place)."""
        dtype = q.dtype
        if jax.default_backend() == "cpu" and self.heads_major:
            return rowwise_cached_attention(q, self.k, self.v, self.layer, self.slots, self.extents)

        def window(buffer):
            layer = jax.lax.dynamic_index_in_dim(buffer, self.layer, 0, keepdims=False)
            return jax.lax.slice_in_dim(layer, 0, self.window, axis=2 if self.heads_major else 1).astype(dtype)

        return cached_attention(q, window(self.k), window(self.v), self.slots, heads_major=self.heads_major)


class RMSNorm(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.eps = config.rms_norm_eps
        self.dtype = jnp.dtype(config.dtype)
        self.scale = _param(rngs, (config.hidden_size,), ("embed",), config, nnx.initializers.ones)

    def __call__(self, x: jax.Array) -> jax.Array:
        # As in HF: normalise in float32, cast back, then scale (matters for bf16 parity).
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed.astype(self.dtype) * self.scale[...].astype(self.dtype)


class Attention(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        e, h, k, d = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.config = config
        self.q_proj = _param(rngs, (e, h, d), ("embed", "heads", "head_dim"), config)
        self.k_proj = _param(rngs, (e, k, d), ("embed", "kv_heads", "head_dim"), config)
        self.v_proj = _param(rngs, (e, k, d), ("embed", "kv_heads", "head_dim"), config)
        self.o_proj = _param(rngs, (h, d, e), ("heads", "head_dim", "embed"), config)
        # LoRA adapters of the targeted projections (None otherwise; see alpacare_jax.model.lora).
        self.q_lora = lora.adapter(config, "q", (e,), (h, d), ("embed",), ("heads", "head_dim"), rngs=rngs)
        self.k_lora = lora.adapter(config, "k", (e,), (k, d), ("embed",), ("kv_heads", "head_dim"), rngs=rngs)
        self.v_lora = lora.adapter(config, "v", (e,), (k, d), ("embed",), ("kv_heads", "head_dim"), rngs=rngs)
        self.o_lora = lora.adapter(config, "o", (h, d), (e,), ("heads", "head_dim"), ("embed",), rngs=rngs)

    def __call__(self, x, positions, mask, cache: _LayerCache | None = None, dropout_rng: jax.Array | None = None):
        """Returns the attention output and, with `cache`, the cache with this call's keys and values
        written (attention then reads the cache); without one, this call's keys and values themselves
        (what a prefill stores). `dropout_rng` (training) drops the LoRA adapters' inputs."""
        dtype = jnp.dtype(self.config.dtype)
        q = lora.adapted(jnp.einsum("ble,ehd->blhd", x, self.q_proj[...].astype(dtype)), self.q_lora, x, dropout_rng)
        k = lora.adapted(jnp.einsum("ble,ekd->blkd", x, self.k_proj[...].astype(dtype)), self.k_lora, x, dropout_rng)
        v = lora.adapted(jnp.einsum("ble,ekd->blkd", x, self.v_proj[...].astype(dtype)), self.v_lora, x, dropout_rng)
        inv_freq = inverse_frequencies(self.config)  # numpy: a compile-time constant, not model state
        q = constrain(apply_rotary(q, positions, inv_freq), ("batch", "length", "heads", "head_dim"))
        k = constrain(apply_rotary(k, positions, inv_freq), ("batch", "length", "kv_heads", "head_dim"))
        v = constrain(v, ("batch", "length", "kv_heads", "head_dim"))
        if cache is None:
            out, kv = dot_product_attention(q, k, v, mask, impl=self.config.attention_impl), (k, v)
        else:
            kv = cache.append(k, v)
            out = constrain(kv.attend(q), ("batch", "length", "heads", "head_dim"))
        return lora.adapted(jnp.einsum("blhd,hde->ble", out, self.o_proj[...].astype(dtype)), self.o_lora, out,
                            dropout_rng), kv


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """silu(gate) * up, whose backward pass keeps only `gate` and `up`.

    Autodiff of `jax.nn.silu(gate) * up` keeps four [tokens, mlp] tensors per layer for the backward
    pass and reads them all again; the derivative is cheap to recompute from the two inputs. That saves
    about 5% of a CPU training step, and half of those tensors' memory when layers are not rematerialised.
    """
    return jax.nn.silu(gate) * up


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(saved, out_grad):
    gate, up = saved
    gate32, up32, out_grad32 = (x.astype(jnp.float32) for x in (gate, up, out_grad))
    sigmoid = jax.nn.sigmoid(gate32)
    silu = gate32 * sigmoid
    gate_grad = out_grad32 * up32 * sigmoid * (1 + gate32 * (1 - sigmoid))
    return gate_grad.astype(gate.dtype), (out_grad32 * silu).astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        e, m = config.hidden_size, config.intermediate_size
        self.dtype = jnp.dtype(config.dtype)
        self.gate_proj = _param(rngs, (e, m), ("embed", "mlp"), config)
        self.up_proj = _param(rngs, (e, m), ("embed", "mlp"), config)
        self.down_proj = _param(rngs, (m, e), ("mlp", "embed"), config)
        self.gate_lora = lora.adapter(config, "gate", (e,), (m,), ("embed",), ("mlp",), rngs=rngs)
        self.up_lora = lora.adapter(config, "up", (e,), (m,), ("embed",), ("mlp",), rngs=rngs)
        self.down_lora = lora.adapter(config, "down", (m,), (e,), ("mlp",), ("embed",), rngs=rngs)

    def __call__(self, x, dropout_rng: jax.Array | None = None):
        gate = lora.adapted(token_matmul(x, self.gate_proj[...].astype(self.dtype)), self.gate_lora, x, dropout_rng)
        up = lora.adapted(token_matmul(x, self.up_proj[...].astype(self.dtype)), self.up_lora, x, dropout_rng)
        hidden = constrain(swiglu(gate, up), ("batch", "length", "mlp"))
        return lora.adapted(token_matmul(hidden, self.down_proj[...].astype(self.dtype)), self.down_lora, hidden,
                            dropout_rng)


class DecoderLayer(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(config, rngs=rngs)
        self.attention = Attention(config, rngs=rngs)
        self.post_attention_norm = RMSNorm(config, rngs=rngs)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x, positions, mask, cache: _LayerCache | None = None, dropout_rng: jax.Array | None = None):
        attn_out, kv = self.attention(self.input_norm(x), positions, mask, cache, dropout_rng)
        x = constrain(x + attn_out, ("batch", "length", "embed"))
        x = constrain(x + self.mlp(self.post_attention_norm(x), dropout_rng), ("batch", "length", "embed"))
        return x, kv


class LlamaBackbone(nnx.Module):
    """The decoder stack shared by every head: token embeddings, scanned layers, final norm."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = _param(rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"), config)

        @nnx.split_rngs(splits=config.num_layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(rngs: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(config, rngs=rngs)

        self.layers = make_layers(rngs)
        self.norm = RMSNorm(config, rngs=rngs)

    def hidden_states(
        self,
        input_ids: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: KVCache | None = None,
        kv_window: int | None = None,
        layer_weights: Sequence[nnx.State] | None = None,
        dropout_rng: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """The final-normed hidden states [batch, length, embed] that the output head projects.

        Separate from `__call__` so the training loss can apply the head chunk by chunk without ever
        holding the full [batch, length, vocab] logits (see `alpacare_jax.train.loss`).

        With `cache`, the tokens continue each row's cached sequence: they are written at slots
        `cache.lengths[b]` on (the tokens of a row whose `segment_ids` are 0 are written but not counted,
        so they are overwritten later), attend to everything cached before them, and the cache comes back
        with the lengths advanced. `kv_window` (static) bounds the slots attention reads: every row's
        new length must fit in it, which lets a decoding step read the filled part of a long cache only.
        `layer_weights` (with `cache`): the layers' parameters as `unstacked_layers` gives them, sliced once
        by a caller that runs many steps (see there).
        `dropout_rng` (training, no cache) drops the LoRA adapters' inputs, each layer with its own key.
        """
        config = self.config
        batch, length = input_ids.shape
        if segment_ids is None:
            segment_ids = jnp.ones((batch, length), jnp.int32)
        x = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(config.dtype)
        x = constrain(x, ("batch", "length", "embed"))
        if cache is None:
            mask = AttentionMask.causal(segment_ids)
            x, _ = self._scan_layers(x, mask.q_index if positions is None else positions, mask, dropout_rng=dropout_rng)
            return self.norm(x), None

        slots = cache.lengths[:, None] + jnp.arange(length, dtype=jnp.int32)
        extents = jnp.max(jnp.where(segment_ids > 0, slots + 1, 0), axis=1)
        graphdef, layer_state = nnx.split(self.layers)
        window = kv_window or cache.max_length

        def layer_body(carry, scanned):
            x, k, v = carry
            state, layer = scanned
            layer_cache = _LayerCache(k=k, v=v, layer=layer, slots=slots, extents=extents, window=window,
                                      heads_major=cache.heads_major)
            x, layer_cache = nnx.merge(graphdef, state)(x, slots if positions is None else positions, None,
                                                        layer_cache)
            return (x, layer_cache.k, layer_cache.v), None

        layers = jnp.arange(config.num_layers, dtype=jnp.int32)
        if layer_weights is None:
            # Unrolled except on TPU (XLA's TPU compiler compiles 32 unrolled layers far more slowly).
            (x, k, v), _ = jax.lax.scan(layer_body, (x, cache.k, cache.v), (layer_state, layers),
                                        unroll=not for_tpu(config))
        else:
            k, v = cache.k, cache.v
            for layer, state in enumerate(layer_weights):
                (x, k, v), _ = layer_body((x, k, v), (state, layers[layer]))
        lengths = cache.lengths + jnp.sum(segment_ids > 0, axis=1, dtype=jnp.int32)
        return self.norm(x), cache.replace(k=k, v=v, lengths=lengths)

    def unstacked_layers(self) -> list[nnx.State]:
        """Each layer's parameters sliced out of the stacked arrays into arrays of their own (copies).

        For programs that run many decoding steps on CPU: XLA's CPU compiler copies a layer's weights out
        of the stacked arrays before every matmul that reads them, in every step (unrolling the layer loop
        does not help: a static slice is copied too), which was most of a small model's decoding step. Sliced
        once before the step loop (`hidden_states(layer_weights=...)`), the steps read them where they lie.
        XLA's TPU compiler reads stacked weights in place, so TPU programs need no copy.
        """
        _, state = nnx.split(self.layers)
        return [jax.tree.map(lambda w, i=i: w[i], state) for i in range(self.config.num_layers)]

    def prefill(
        self, input_ids: jax.Array, *, positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """Hidden states of prompts [batch, length] and a cache of `length` slots per row holding their
        keys and values, lengths counting each row's real (non-zero segment) tokens.

        The prompts attend to each other as in training (causal within segments, the configured
        attention backend: splash on TPU), with no cache to read; rows are right-padded, so a row's
        tokens sit at the slots of their positions. Packed rows (several segments) work too: the caller
        then picks each segment's slots out of the cache.
        """
        batch, length = input_ids.shape
        if segment_ids is None:
            segment_ids = jnp.ones((batch, length), jnp.int32)
        x = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.config.dtype)
        x = constrain(x, ("batch", "length", "embed"))
        mask = AttentionMask.causal(segment_ids)
        x, (k, v) = self._scan_layers(x, mask.q_index if positions is None else positions, mask, keep_kv=True)
        cache = KVCache(k=k, v=v, lengths=jnp.sum(segment_ids > 0, axis=1, dtype=jnp.int32),
                        heads_major=KVCache.heads_major_for(self.config))
        if cache.heads_major:  # the layers gave [layers, batch, length, kv_heads, head_dim]
            k, v = jnp.swapaxes(k, 2, 3), jnp.swapaxes(v, 2, 3)
        return self.norm(x), cache.replace(k=constrain(k, cache.axes), v=constrain(v, cache.axes))

    def _scan_layers(self, x, positions, mask, *, keep_kv: bool = False, dropout_rng: jax.Array | None = None):
        """The layers over x without a cache; their keys and values stacked [layers, ...] when `keep_kv`."""
        graphdef, layer_state = nnx.split(self.layers)
        layer_rngs = None if dropout_rng is None else jax.random.split(dropout_rng, self.config.num_layers)

        def layer_body(x, scanned):
            state, rng = scanned
            x, kv = nnx.merge(graphdef, state)(x, positions, mask, dropout_rng=rng)
            return x, kv if keep_kv else None

        if self.config.remat_policy != "none":
            layer_body = jax.checkpoint(layer_body, policy=REMAT_POLICIES[self.config.remat_policy])
        return jax.lax.scan(layer_body, x, (layer_state, layer_rngs))


class Llama(LlamaBackbone):
    """Causal LM: `model(input_ids)` -> float32 logits [batch, length, vocab]."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        super().__init__(config, rngs=rngs)
        if not config.tie_word_embeddings:
            self.lm_head = _param(rngs, (config.hidden_size, config.vocab_size), ("embed", "vocab"), config)

    def __call__(
        self,
        input_ids: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """Float32 logits for `input_ids` [batch, length] (and the updated cache when given one).

        `positions` (rotary positions, restarting per packed example) default to 0..length-1 (each row's
        next slots when decoding). `segment_ids` number packed examples 1, 2, ... and mark padding with 0;
        attention stays inside a segment. With `cache`, the tokens continue each row's cached sequence
        (see `hidden_states`) and `(logits, updated_cache)` is returned.
        """
        hidden, new_cache = self.hidden_states(input_ids, positions=positions, segment_ids=segment_ids, cache=cache)
        logits = self.logits(hidden)
        return logits if cache is None else (logits, new_cache)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Float32 logits [..., vocab] of final hidden states [..., embed] (decoding projects only the
        tokens it samples from)."""
        head = self.head_weight().astype(self.config.dtype)
        logits = jnp.einsum("...e,ev->...v", hidden, head, preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "length", "vocab") if logits.ndim == 3 else ("batch", "vocab"))

    def head_weight(self) -> jax.Array:
        """The [embed, vocab] output projection (the transposed embedding when tied)."""
        return self.embed_tokens[...].T if self.config.tie_word_embeddings else self.lm_head[...]


class LlamaForScoring(LlamaBackbone):
    """One score per sequence: a linear head on the final hidden state of its last real token.

    `model(input_ids, lengths)` -> float32 scores [batch]. This is Hugging Face's
    `LlamaForSequenceClassification` with `num_labels=1` (same `score` weight, no bias, same pooling
    on the last non-padding token); the multiple-choice objective scores each (question, option) row
    with it and takes a softmax across a question's options. Rows are right-padded: padding sits after
    the pooled token, so causal attention never lets it change the score.
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        super().__init__(config, rngs=rngs)
        self.score = _param(rngs, (config.hidden_size, 1), ("embed", "classes"), config)

    def __call__(self, input_ids: jax.Array, lengths: jax.Array) -> jax.Array:
        """Scores of `input_ids` [batch, length] whose first `lengths` [batch] tokens are real."""
        length = input_ids.shape[1]
        segment_ids = (jnp.arange(length, dtype=jnp.int32) < lengths[:, None]).astype(jnp.int32)
        hidden, _ = self.hidden_states(input_ids, segment_ids=segment_ids)
        last = jnp.clip(lengths - 1, 0, length - 1).astype(jnp.int32)
        pooled = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]  # [batch, embed]
        score = self.score[...].astype(self.config.dtype)
        return jnp.einsum("be,ec->bc", pooled, score, preferred_element_type=jnp.float32)[:, 0]

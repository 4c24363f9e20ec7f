"""LoRA train-step throughput: our jitted JAX step against peft + transformers + PyTorch.

    python bench/lora_throughput.py [--rounds=3] [--steps=3]

The model of `bench/train_throughput.py` (LLaMA: vocab 32000, hidden 512, 8 layers, 8 heads, MLP 1376),
sequence 512, batch 4, float32, with LoRA adapters of rank 16 (alpha 32, dropout 0.05) on all seven
projections and the base frozen; AdamW with global-norm clipping over the adapters, loss on every token.
Ours is the trainer's own step (`alpacare_jax.train.step`: gradients of the adapters only, the base a
constant); the peer is `peft.get_peft_model` on `transformers.LlamaForCausalLM` with `torch.optim.AdamW`
over the trainable parameters. Each side runs in its own subprocess and the sides alternate `--rounds`
times (a noisy neighbour on this shared machine hits both alike); the best round of each is reported.

With the base frozen, a step's least work is the forward pass and the gradients of the activations (no
weight gradients but the adapters'): 4N FLOPs per token for the N matmul parameters (head included), plus
attention's 12 x layers x heads x head_dim x seq, as in `LlamaConfig.flops_per_token`. Both sides are
printed as FLOP/s against this machine's float32 matmul peak (`train_throughput.matmul_peak`), and so is
the ceiling: the ratio a step running at that peak throughout would reach against the peer.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from train_throughput import (
    BATCH,
    HEADS,
    HIDDEN,
    LAYERS,
    LR,
    MLP,
    SEQ,
    VOCAB,
    _model_config,
    _tokens,
    matmul_peak,
    spawn_worker,
)

RANK, ALPHA, DROPOUT = 16, 32.0, 0.05
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def frozen_base_flops_per_token(config, seq: int) -> float:
    """FLOPs per token of a step whose base weights get no gradients: `flops_per_token` less the weight
    gradients' 2N, a third of its 6N (its value at seq 0, where attention counts nothing); the adapters' own
    few FLOPs are left out."""
    return config.flops_per_token(seq) - config.flops_per_token(0) / 3


def run_jax(steps: int) -> list[float]:
    import jax
    import numpy as np

    from alpacare_jax import sharding
    from alpacare_jax.model import Llama, LoraConfig
    from alpacare_jax.train import optimizer
    from alpacare_jax.train import state as state_lib
    from alpacare_jax.train import step as step_lib
    from alpacare_jax.train.config import base_config

    model_config = _model_config().replace(lora=LoraConfig(rank=RANK, alpha=ALPHA, dropout=DROPOUT, targets=TARGETS))
    opt = base_config().optimizer
    opt.learning_rate, opt.warmup_ratio, opt.schedule = LR, 0.0, "constant"
    tx, schedule = optimizer.make_optimizer(opt, 1000)
    mesh = sharding.make_mesh(sharding.MeshConfig(), jax.devices()[:1])
    setup = state_lib.make_setup(model_config, tx, mesh, sharding.DEFAULT_RULES, base_dtype="float32")
    base = state_lib.random_base(model_config, Llama, 0, setup.abstract_state.frozen)
    state = state_lib.init_train_state(setup, model_config, tx, seed=0, frozen=base)
    train_step = step_lib.jit_train_step(setup, tx, schedule)
    tokens = _tokens()
    ones = np.ones((BATCH, SEQ), np.int32)
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": ones, "segment_ids": ones,
             "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), (BATCH, SEQ)).copy()}
    batch = jax.device_put(batch, sharding.batch_sharding(mesh))
    state, metrics = train_step(state, batch)  # compile + first step
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = train_step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return times


def run_torch(steps: int) -> list[float]:
    import peft
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=MLP,
                                      num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                                      max_position_embeddings=SEQ, tie_word_embeddings=False)
    lora = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, task_type="CAUSAL_LM",
                           target_modules=[f"{t}_proj" for t in TARGETS])
    model = peft.get_peft_model(transformers.LlamaForCausalLM(config).float(), lora).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(trainable, lr=LR, weight_decay=0.0)
    tokens = torch.as_tensor(_tokens()).long()
    inputs, labels = tokens[:, :-1], tokens[:, 1:]

    def step():
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)

    step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating jax/torch rounds")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round (after one warm-up step)")
    parser.add_argument("--worker", choices=("jax", "torch", "peak"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        workers = {"jax": run_jax, "torch": run_torch, "peak": lambda _: matmul_peak()}
        print("RESULT " + json.dumps(workers[args.worker](args.steps)), flush=True)
        return

    tokens = BATCH * SEQ
    flops = frozen_base_flops_per_token(_model_config(), SEQ) * tokens
    print(f"model: vocab {VOCAB}, hidden {HIDDEN}, {LAYERS} layers, {HEADS} heads, MLP {MLP}; LoRA rank {RANK} on "
          f"{', '.join(TARGETS)}; batch {BATCH} x seq {SEQ}, fp32, AdamW; {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.1f}")
    best = {"jax": float("inf"), "torch": float("inf")}
    for round_index in range(args.rounds):
        for kind in ("jax", "torch"):
            step_time = min(spawn_worker(__file__, kind, args.steps))
            best[kind] = min(best[kind], step_time)
            print(f"round {round_index + 1} {kind:5s}: {step_time:.3f} s/step, {tokens / step_time:,.0f} tokens/s "
                  f"(load average {os.getloadavg()[0]:.1f})", flush=True)
    peak = spawn_worker(__file__, "peak", 0)
    print(f"\nmatmul peak (fp32, 2048^3): {peak / 1e9:.1f} GFLOP/s; {flops / 1e9:.1f} GFLOP per step at the least")
    for name, kind in (("ours (JAX):         ", "jax"), ("peft + HF + PyTorch:", "torch")):
        print(f"{name} {best[kind]:.3f} s/step, {tokens / best[kind]:,.0f} tokens/s, "
              f"{flops / best[kind] / 1e9:.1f} GFLOP/s = {flops / best[kind] / peak:.0%} of peak")
    print(f"speed-up vs peft + PyTorch: {best['torch'] / best['jax']:.2f}x (ceiling at the matmul peak: "
          f"{best['torch'] * peak / flops:.2f}x)")


if __name__ == "__main__":
    main()

"""Multiple-choice train-step throughput: our jitted step against LlamaForSequenceClassification + PyTorch.

    python bench/mcq_throughput.py [--rounds=2] [--steps=3]

The model of bench/train_throughput.py (LLaMA: vocab 32000, hidden 512, 8 layers, 8 heads, MLP 1376)
with a one-score head; a step scores 2 questions x 4 options, rows of 256 tokens, softmax over each
question's options, cross-entropy, then AdamW with global-norm clipping, float32. Ours is the trainer's
own step (`objective="multiple_choice"`); the peer is transformers' `LlamaForSequenceClassification`
(num_labels=1) with `torch.optim.AdamW`, the stack the paper's fine-tuning runs on. Each side runs in
its own subprocess, alternating `--rounds` times; the best round of each side is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from train_throughput import spawn_worker

VOCAB, HIDDEN, LAYERS, HEADS, MLP = 32000, 512, 8, 8, 1376
QUESTIONS, OPTIONS, SEQ = 2, 4, 256
LR = 1e-4


def _tokens():
    import numpy as np

    rng = np.random.default_rng(0)
    ids = rng.integers(1, VOCAB, (QUESTIONS, OPTIONS, SEQ)).astype(np.int32)  # 0 is the pad id: never inside
    labels = rng.integers(0, OPTIONS, (QUESTIONS,)).astype(np.int32)
    return ids, labels


def run_jax(steps: int) -> list[float]:
    import jax
    import numpy as np

    from alpacare_jax import sharding
    from alpacare_jax.model import LlamaConfig, LlamaForScoring
    from alpacare_jax.train import objectives, optimizer
    from alpacare_jax.train import state as state_lib
    from alpacare_jax.train import step as step_lib
    from alpacare_jax.train.config import base_config

    model_config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=MLP, num_layers=LAYERS,
                               num_heads=HEADS, num_kv_heads=HEADS, max_position_embeddings=SEQ)
    opt = base_config().optimizer
    opt.learning_rate, opt.warmup_ratio, opt.schedule = LR, 0.0, "constant"
    tx, schedule = optimizer.make_optimizer(opt, 1000)
    mesh = sharding.make_mesh(sharding.MeshConfig(), jax.devices()[:1])
    setup = state_lib.make_setup(model_config, tx, mesh, sharding.DEFAULT_RULES, LlamaForScoring)
    state = state_lib.init_train_state(setup, model_config, tx, seed=0)
    objective = objectives.MultipleChoice()
    train_step = step_lib.jit_train_step(setup, tx, schedule, objective=objective)
    ids, labels = _tokens()
    batch = {"input_ids": ids, "lengths": np.full((QUESTIONS, OPTIONS), SEQ, np.int32), "label": labels,
             "weight": np.ones((QUESTIONS,), np.int32)}
    batch = jax.device_put(batch, sharding.logical_sharding(mesh, objective.batch_axes))
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
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=MLP,
                                      num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                                      max_position_embeddings=SEQ, num_labels=1, pad_token_id=0)
    model = transformers.LlamaForSequenceClassification(config).float().train()
    optim = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    ids, labels = (torch.as_tensor(x).long() for x in _tokens())

    def step():
        scores = model(input_ids=ids.reshape(-1, SEQ)).logits.reshape(QUESTIONS, OPTIONS)
        loss = torch.nn.functional.cross_entropy(scores, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
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
    parser.add_argument("--rounds", type=int, default=2, help="alternating jax/torch rounds")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round (after one warm-up step)")
    parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps({"jax": run_jax, "torch": run_torch}[args.worker](args.steps)), flush=True)
        return

    import torch
    import transformers

    tokens = QUESTIONS * OPTIONS * SEQ
    print(f"model: vocab {VOCAB}, hidden {HIDDEN}, {LAYERS} layers, {HEADS} heads, MLP {MLP}, one-score head; "
          f"{QUESTIONS} questions x {OPTIONS} options x {SEQ} tokens, fp32, AdamW; {os.cpu_count()} CPUs; "
          f"peer: torch {torch.__version__}, transformers {transformers.__version__}")
    best = {"jax": float("inf"), "torch": float("inf")}
    for round_index in range(args.rounds):
        for kind in ("jax", "torch"):
            step_time = min(spawn_worker(__file__, kind, args.steps))
            best[kind] = min(best[kind], step_time)
            print(f"round {round_index + 1} {kind:5s}: {step_time:.3f} s/step, {tokens / step_time:,.0f} tokens/s",
                  flush=True)
    print(f"\nours (JAX):                               {tokens / best['jax']:,.0f} tokens/s")
    print(f"LlamaForSequenceClassification + PyTorch: {tokens / best['torch']:,.0f} tokens/s")
    print(f"speed-up vs LlamaForSequenceClassification + PyTorch: {best['torch'] / best['jax']:.2f}x")


if __name__ == "__main__":
    main()

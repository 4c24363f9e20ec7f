"""Input pipeline throughput vs. what a training step of the CPU demo model consumes, in one run.

    python bench/data_pipeline.py [--max_length=256 --global_batch_size=8 --vocab_size=1024 ...]

1. Pipeline: the real training iterator (TFDS array_record source built from the bundled sample ->
   shuffle -> Alpaca prompt -> sentencepiece -> loss mask -> truncation -> packing -> batches), run in
   this process pinned to ONE CPU core with no reader threads. Reported as row tokens/s (batch x
   max_length, what the trainer is fed) and as real (non-padding) tokens/s.
2. Consumer: a jitted forward + backward + AdamW update of the demo-sized LLaMA on the same batch shape,
   on all CPU cores (as the demo trainer runs), in row tokens/s.
3. Peer: AlpaCare's preprocessing (Stanford Alpaca `train.py`: the HF tokenizer called once per
   prompt and once per prompt+response, torch tensors, prompt labels set to -100; no packing), on the
   same records and the same (HF-loaded) tokenizer, on the same single core.
The ratio pipeline / consumer says how far the pipeline is from being the bottleneck (target >= 20x).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--global_batch_size", type=int, default=8)
    p.add_argument("--vocab_size", type=int, default=1024, help="sentencepiece vocabulary trained on the sample")
    p.add_argument("--packing", type=int, default=1)
    p.add_argument("--hidden_size", type=int, default=256)
    p.add_argument("--intermediate_size", type=int, default=688)
    p.add_argument("--num_layers", type=int, default=4)
    p.add_argument("--num_heads", type=int, default=4)
    p.add_argument("--pipeline_seconds", type=float, default=8.0)
    p.add_argument("--train_steps", type=int, default=10)
    return p.parse_args()


def time_train_step(args, batch) -> float:
    """Seconds per jitted forward + backward + AdamW update of the demo-sized model."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from alpacare_jax.model import Llama, LlamaConfig

    config = LlamaConfig.tiny(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_layers=args.num_layers, num_heads=args.num_heads, num_kv_heads=args.num_heads,
        max_position_embeddings=max(args.max_length, 512),
    )
    model = Llama(config, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(1e-3)
    opt_state = tx.init(params)

    def loss_fn(params, batch):
        logits = nnx.merge(graphdef, params, rest)(
            batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"])
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
        mask = batch["loss_mask"].astype(jnp.float32)
        return (nll * mask).sum() / jnp.maximum(mask.sum(), 1.0)

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    params, opt_state, loss = step(params, opt_state, batch)  # compile
    jax.block_until_ready(loss)
    start = time.perf_counter()
    for _ in range(args.train_steps):
        params, opt_state, loss = step(params, opt_state, batch)
    jax.block_until_ready(loss)
    return (time.perf_counter() - start) / args.train_steps


def alpaca_preprocess_tokens_per_second(records, tokenizer_dir: Path, max_length: int, seconds: float) -> float:
    """Real tokens/s of AlpaCare's per-example preprocessing (re-created here; HF Trainer does no packing)."""
    from transformers import AutoTokenizer

    from alpacare_jax.data.prompts import format_prompt

    hf = AutoTokenizer.from_pretrained(tokenizer_dir)

    def tokenize(text):
        return hf(text, return_tensors="pt", max_length=max_length, truncation=True).input_ids[0]

    tokens, start, i = 0, time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        r = records[i % len(records)]
        i += 1
        source = format_prompt(r["instruction"], r["input"])
        input_ids = tokenize(source + r["output"] + hf.eos_token)
        labels = input_ids.clone()
        labels[: len(tokenize(source))] = -100
        tokens += len(input_ids)
    return tokens / (time.perf_counter() - start)


def main() -> None:
    args = parse_args()
    import tensorflow_datasets as tfds

    from alpacare_jax.data import SAMPLE_JSON, pipeline
    from alpacare_jax.data.build import build_dataset
    from alpacare_jax.data.tokenizer import train_tokenizer

    tfds.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_tokenizer(SAMPLE_JSON, Path(tmp) / "tok", vocab_size=args.vocab_size)
        build_dataset("medinstruct_52k", SAMPLE_JSON, Path(tmp) / "tfds", validation_fraction=0.15)
        config = pipeline.default_data_config()
        config.data_dir = str(Path(tmp) / "tfds")
        config.max_length = args.max_length
        config.global_batch_size = args.global_batch_size
        config.packing = bool(args.packing)
        config.read_threads = 0  # everything on the calling thread ...

        # ... and the calling thread on one core. The train step below runs first, on all cores.
        first = next(pipeline.make_train_iterator(config, tokenizer, process_index=0, process_count=1))
        row_tokens = args.global_batch_size * args.max_length
        step_s = time_train_step(args, first)

        all_cores = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {min(all_cores)})
        it = pipeline.make_train_iterator(config, tokenizer, process_index=0, process_count=1)
        for _ in range(3):
            next(it)
        batches = real = 0
        start = time.perf_counter()
        while time.perf_counter() - start < args.pipeline_seconds:
            batch = next(it)
            batches += 1
            real += int((batch["segment_ids"] > 0).sum())
        elapsed = time.perf_counter() - start
        peer = alpaca_preprocess_tokens_per_second(
            json.loads(SAMPLE_JSON.read_text()), Path(tmp) / "tok", args.max_length, args.pipeline_seconds)
        os.sched_setaffinity(0, all_cores)

    pipe_rows = batches * row_tokens / elapsed
    train_rows = row_tokens / step_s
    print(f"batch {args.global_batch_size} x {args.max_length} tokens, packing={bool(args.packing)}, "
          f"vocab {args.vocab_size}; model hidden {args.hidden_size}, {args.num_layers} layers; "
          f"{len(all_cores)} cores for the train step")
    print(f"pipeline (1 core):        {pipe_rows:12,.0f} row tokens/s  {real / elapsed:12,.0f} non-pad tokens/s "
          f"({batches / elapsed:,.1f} batches/s, fill {real / (batches * row_tokens):.0%})")
    print(f"peer: AlpaCare preprocess: {'':>12}                 {peer:12,.0f} non-pad tokens/s "
          "(no packing, no batching)")
    print(f"train step (consumer):    {train_rows:12,.0f} row tokens/s  ({step_s * 1e3:,.1f} ms/step)")
    print(f"ratio pipeline / consumer: {pipe_rows / train_rows:,.1f}x (target >= 20x)")
    print(f"ratio pipeline / AlpaCare preprocess (non-pad tokens): {real / elapsed / peer:,.1f}x")


if __name__ == "__main__":
    main()

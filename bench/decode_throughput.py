"""Batched greedy decoding: our jitted KV-cache decoder against transformers' `generate`, same weights.

Both decode the same batch of prompts of different lengths (left-padded), greedy, a fixed number of new
tokens (no EOS), on the same CPU. Runs alternate (ours, theirs, ours, ...) so machine noise hits both;
the median of each is reported with the ratio. Our one-off compile time is reported separately.

    python bench/decode_throughput.py [--batch 8 --new-tokens 128 --repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax
import numpy as np
import torch
import transformers
from flax import nnx

from alpacare_jax import hf
from alpacare_jax.model import Llama, LlamaConfig, SamplingConfig, generate


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_layers=8, num_heads=8,
                         num_kv_heads=8, max_position_embeddings=1024)
    model = Llama(config, rngs=nnx.Rngs(0))
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(model, tmp, dtype="float32")
        torch_model = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()

    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, config.vocab_size, int(n)).tolist() for n in rng.integers(20, 61, args.batch)]
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    sampling = SamplingConfig(max_new_tokens=args.new_tokens)
    new_tokens = args.batch * args.new_tokens

    def ours():
        return generate(model, prompts, sampling, eos_ids=[-1])

    def theirs():
        with torch.no_grad():
            return torch_model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=args.new_tokens,
                                        min_new_tokens=args.new_tokens, pad_token_id=0)

    start = time.perf_counter()
    first = ours()
    compile_seconds = time.perf_counter() - start
    reference = theirs()[:, width:].tolist()
    agree = np.mean([a == b for a, b in zip(first, reference)])

    times = {"ours": [], "transformers": []}
    for _ in range(args.repeats):
        for name, fn in (("ours", ours), ("transformers", theirs)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    rate = {name: new_tokens / statistics.median(t) for name, t in times.items()}
    print(f"model: {config.num_params() / 1e6:.0f}M params, batch {args.batch}, prompts {min(map(len, prompts))}-"
          f"{width} tokens, {args.new_tokens} new tokens, greedy, fp32, {jax.devices()[0].platform}")
    print(f"identical greedy rows: {agree:.0%}; our first call (compile + run): {compile_seconds:.1f} s")
    for name, r in rate.items():
        print(f"{name:13s} {r:8.1f} new tokens/s  (runs: {', '.join(f'{t:.2f}s' for t in times[name])})")
    print(f"ratio ours / transformers: {rate['ours'] / rate['transformers']:.2f}x (target >= 2x)")


if __name__ == "__main__":
    main()

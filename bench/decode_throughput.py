"""Batched greedy decoding: our jitted KV-cache decoder against transformers' `generate`, same weights.

Both decode the same prompts of different lengths (left-padded for transformers; ours right-pads, each
row at its own positions), greedy, a fixed number of new tokens (no EOS), on the same CPU, for each batch
size asked. Runs alternate (ours, theirs, ours, ...) so that machine noise hits both; each side's best
run is compared (the shared machine only ever slows a run down), medians shown beside. Our one-off
compile time is reported separately, and the greedy tokens of the two are compared.

    python bench/decode_throughput.py [--batch 8 1 --new-tokens 128 --repeats 3] [--sample]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from alpacare_jax import hf
from alpacare_jax.model import Llama, LlamaConfig, SamplingConfig, generate


def matmuls_alone(model: Llama, batch: int, steps: int, repeats: int = 3) -> float:
    """Best seconds of `steps` decoding steps' matmuls alone at `batch` rows: each layer's q, k, v, o, gate,
    up and down projections and the head, chained through the argmax's embedding so that none is skipped."""
    config = model.config
    if config.num_kv_heads != config.num_heads:
        raise ValueError("the ceiling chains q + k + v into o: it needs as many KV heads as query heads")
    embed = config.hidden_size
    weights = ([nnx.to_pure_dict(state) for state in model.unstacked_layers()],  # as the decoder's steps read them
               model.head_weight(), model.embed_tokens[...])

    def step(x, weights):
        layers, head, table = weights
        for layer in layers:
            attention, mlp = layer["attention"], layer["mlp"]
            q, k, v = (x @ attention[name].reshape(embed, -1) for name in ("q_proj", "k_proj", "v_proj"))
            x = x + (q + k + v) @ attention["o_proj"].reshape(-1, embed)
            x = x + (jax.nn.silu(x @ mlp["gate_proj"]) * (x @ mlp["up_proj"])) @ mlp["down_proj"]
        return table[jnp.argmax(x @ head, axis=-1)]

    run = jax.jit(lambda x, weights: jax.lax.fori_loop(0, steps, lambda _, x: step(x, weights), x))
    x = weights[2][:batch]
    run(x, weights).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(x, weights).block_until_ready()
        times.append(time.perf_counter() - start)
    return min(times)


def run_batch(model, torch_model, config, batch: int, new_tokens: int, repeats: int, sample: bool) -> float:
    """Prints one batch size's comparison; returns the ratio of best runs."""
    rng = np.random.default_rng(batch)
    prompts = [rng.integers(3, config.vocab_size, int(n)).tolist() for n in rng.integers(20, 61, batch)]
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    # Sampled: temperature 0.8, top-k 40, top-p 0.9 on both sides (then the tokens differ: other random draws).
    settings = dict(temperature=0.8, top_k=40, top_p=0.9) if sample else {}
    sampling = SamplingConfig(max_new_tokens=new_tokens, **settings)

    def ours():
        return generate(model, prompts, sampling, eos_ids=[-1])

    def theirs():
        with torch.no_grad():
            return torch_model.generate(ids, attention_mask=mask, do_sample=sample, max_new_tokens=new_tokens,
                                        min_new_tokens=new_tokens, pad_token_id=0, **settings)

    start = time.perf_counter()
    first = ours()
    compile_seconds = time.perf_counter() - start
    reference = theirs()[:, width:].tolist()
    agree = np.mean([a == b for a, b in zip(first, reference)])

    times = {"ours": [], "transformers": []}
    for _ in range(repeats):
        for name, fn in (("ours", ours), ("transformers", theirs)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    tokens = batch * new_tokens
    agreement = "sampled" if sample else f"identical greedy rows: {agree:.0%}"
    print(f"batch {batch}: prompts {min(map(len, prompts))}-{width} tokens, {new_tokens} new tokens each; "
          f"{agreement}; our first call (compile + run): {compile_seconds:.1f} s")
    for name, t in times.items():
        print(f"  {name:13s} {tokens / min(t):8.1f} new tokens/s best, {tokens / statistics.median(t):8.1f} median "
              f"(runs: {', '.join(f'{s:.2f}s' for s in t)})")
    ratio = min(times["transformers"]) / min(times["ours"])
    floor = matmuls_alone(model, batch, new_tokens)
    print(f"  ceiling: {new_tokens} steps' matmuls alone take {floor:.2f} s ({floor / new_tokens * 1e3:.2f} ms a step; "
          f"ours {min(times['ours']) / new_tokens * 1e3:.2f} ms a token all told), at most "
          f"{min(times['transformers']) / floor:.2f}x transformers' best run")
    print(f"  ratio ours / transformers (best runs): {ratio:.2f}x (target >= 3x)")
    return ratio


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 1])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sample", action="store_true", help="temperature 0.8, top-k 40, top-p 0.9 instead of greedy")
    args = parser.parse_args()

    config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_layers=8, num_heads=8,
                         num_kv_heads=8, max_position_embeddings=1024)
    model = Llama(config, rngs=nnx.Rngs(0))
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(model, tmp, dtype="float32")
        torch_model = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    mode = "sampled" if args.sample else "greedy"
    print(f"model: {config.num_params() / 1e6:.0f}M params, {mode}, fp32, {jax.devices()[0].platform}; torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
          f"jax {jax.__version__}; load average {os.getloadavg()[0]:.1f} at the start")
    ratios = [run_batch(model, torch_model, config, b, args.new_tokens, args.repeats, args.sample) for b in args.batch]
    print(f"ratios: {', '.join(f'batch {b} {r:.2f}x' for b, r in zip(args.batch, ratios))}; load average "
          f"{os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()

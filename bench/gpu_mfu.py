"""Model FLOPs utilisation of the train step on one GPU: a ~1B LLaMA at sequence 2048, bf16 compute.

    python bench/gpu_mfu.py [--batch=4] [--steps=5] [--attention=cudnn] [--remat=none]

The model has TinyLlama-1.1B's shape (vocab 32000, hidden 2048, MLP 5632, 22 layers, 32 heads, 4 KV
heads): float32 master weights and AdamW state, bfloat16 compute, the trainer's own jitted step (fused
chunked loss, scanned layers). MFU = `LlamaConfig.flops_per_token` (6N + causal attention counted in
full, so rematerialisation is not credited) x tokens per second / the chip's dense bf16 peak from
`alpacare_jax.train.metrics.PEAK_FLOPS_PER_CHIP`. `--tiny` runs a small model at sequence 128 instead,
so the script can be checked on CPU.
"""

from __future__ import annotations

import argparse

from train_throughput import jax_step_times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4, help="rows of 2048 tokens per step")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after one compile + warm-up step)")
    parser.add_argument("--attention", default="cudnn", choices=("xla", "cudnn"))
    parser.add_argument("--remat", default="none", help="remat policy of the layer scan (see LlamaConfig)")
    parser.add_argument("--tiny", action="store_true", help="a small model at sequence 128 (CPU check)")
    args = parser.parse_args()

    import jax

    from alpacare_jax.model import LlamaConfig
    from alpacare_jax.train.metrics import peak_flops_per_device

    if args.tiny:
        sizes, seq = dict(hidden_size=128, intermediate_size=344, num_layers=2, num_heads=4, num_kv_heads=2), 128
    else:
        sizes, seq = dict(hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32, num_kv_heads=4), 2048
    config = LlamaConfig(vocab_size=32000, max_position_embeddings=seq, dtype="bfloat16",
                         attention_impl=args.attention, remat_policy=args.remat, **sizes)
    device = jax.devices()[0]
    print(f"{device.device_kind}: {config.num_params() / 1e9:.2f}B parameters, batch {args.batch} x seq {seq}, "
          f"bf16 compute, {args.attention} attention, remat {args.remat}")

    step_time = min(jax_step_times(config, args.batch, seq, args.steps))
    tokens = args.batch * seq
    flops = config.flops_per_token(seq) * tokens / step_time
    print(f"{step_time:.3f} s/step, {tokens / step_time:,.0f} tokens/s, {flops / 1e12:.1f} TFLOP/s")
    peak = peak_flops_per_device(device)
    print(f"MFU: {flops / peak:.1%} of {peak / 1e12:.0f} TFLOP/s" if peak else "MFU: no peak known for this device")


if __name__ == "__main__":
    main()

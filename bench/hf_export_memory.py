"""Peak host memory of HF export and import for a > 1 GB LLaMA, against transformers doing the same.

Each phase runs in a fresh subprocess and a sampler thread records its peak RSS (file pages of the
memory-mapped safetensors included). Reported per phase: the peak above the model's own size, as a
ratio to the largest checkpoint shard (target < 1.3) and to the whole checkpoint.

    python bench/hf_export_memory.py [--hidden 1024 --layers 16 --shard 5GB]

Our import also reports its steady-state overhead (compiled programs, allocator caches: a fixed cost
that does not grow with the model) apart from the transient peak of the data path.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil


class PeakRSS:
    """Samples this process's RSS every millisecond while active."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        proc = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, proc.memory_info().rss)
            time.sleep(0.001)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, psutil.Process().memory_info().rss)


def rss() -> int:
    import gc

    gc.collect()
    return psutil.Process().memory_info().rss


def phase_ours_export(args) -> dict:
    import jax
    from flax import nnx

    from alpacare_jax import hf
    from alpacare_jax.model import Llama, LlamaConfig

    config = LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.mlp,
                         num_layers=args.layers, num_heads=args.hidden // 64, num_kv_heads=args.hidden // 64)
    model = Llama(config, rngs=nnx.Rngs(0))
    jax.block_until_ready(nnx.state(model))
    model_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    base = rss()
    with PeakRSS() as peak:
        hf.save_pretrained(model, args.dir, dtype="float32", max_shard_size=args.shard)
    return dict(base=base, peak=peak.peak, model_bytes=model_bytes)


def phase_ours_import(args) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from alpacare_jax import hf

    jnp.zeros(1).block_until_ready()
    base = rss()  # after imports: only the loading itself is measured, as for transformers
    with PeakRSS() as peak:
        model = hf.load_pretrained(args.dir, dtype=jnp.float32)
        jax.block_until_ready(nnx.state(model))
    model_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    return dict(base=base, peak=peak.peak, model_bytes=model_bytes, final=rss())


def phase_transformers_import(args) -> dict:
    import torch
    import transformers
    from transformers import LlamaForCausalLM  # noqa: F401  (resolve the lazy module before measuring)

    torch.zeros(1)
    base = rss()
    with PeakRSS() as peak:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.dir, dtype=torch.float32)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return dict(base=base, peak=peak.peak, model_bytes=model_bytes)


def phase_transformers_export(args) -> dict:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(args.dir, dtype=torch.float32)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    base = rss()
    with PeakRSS() as peak:
        model.save_pretrained(args.dir + "_hf", max_shard_size=args.shard)
    return dict(base=base, peak=peak.peak, model_bytes=model_bytes)


PHASES = {
    "ours_export": phase_ours_export,
    "ours_import": phase_ours_import,
    "transformers_import": phase_transformers_import,
    "transformers_export": phase_transformers_export,
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--mlp", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--shard", default="5GB", help="max_shard_size (5GB is the HF and our default)")
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(PHASES[args.phase](args)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "model")
        results = {}
        for phase in ("ours_export", "ours_import", "transformers_import", "transformers_export"):
            cmd = [sys.executable, __file__, "--phase", phase, "--dir", ckpt, "--hidden", str(args.hidden),
                   "--mlp", str(args.mlp), "--layers", str(args.layers), "--shard", args.shard]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"phase {phase} failed:\n{proc.stderr[-3000:]}")
            out = proc.stdout
            results[phase] = json.loads(out.strip().splitlines()[-1])
        files = list(Path(ckpt).glob("*.safetensors"))
        total = sum(f.stat().st_size for f in files)
        largest = max(f.stat().st_size for f in files)

    gib = 2**30
    print(f"checkpoint: {total / gib:.2f} GiB in {len(files)} shards, largest {largest / gib:.3f} GiB "
          f"(model {results['ours_import']['model_bytes'] / gib:.2f} GiB fp32)")
    print(f"{'phase':22s} {'peak above base':>16s} {'minus model':>12s} {'/ largest shard':>16s} {'/ checkpoint':>13s}")
    extra = {}
    for phase, r in results.items():
        above = r["peak"] - r["base"]
        # Import allocates the model inside the measured window; export had it before.
        minus_model = above - (r["model_bytes"] if phase.endswith("import") else 0)
        extra[phase] = minus_model
        print(f"{phase:22s} {above / gib:13.2f} GiB {minus_model / gib:8.2f} GiB "
              f"{minus_model / largest:15.2f}x {minus_model / total:12.2f}x")
    ours = results["ours_import"]
    steady = ours["final"] - ours["base"] - ours["model_bytes"]
    print(f"ours_import breakdown: steady-state runtime overhead {steady / gib:.2f} GiB, "
          f"transient peak above steady state {(ours['peak'] - ours['final']) / gib:.2f} GiB "
          f"({(ours['peak'] - ours['final']) / largest:.2f}x largest shard)")
    for what in ("import", "export"):
        ours, theirs = extra[f"ours_{what}"], extra[f"transformers_{what}"]
        verdict = "meets" if ours < 1.3 * largest else "MISSES"
        print(f"{what}: ours {ours / largest:.2f}x largest shard ({verdict} the 1.3x target); "
              f"transformers {theirs / largest:.2f}x")


if __name__ == "__main__":
    main()
